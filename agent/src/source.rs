//! Sources of desired state. Standalone mode reads a directory of Kubernetes YAML (`dir`);
//! Kubernetes mode reads the API server (`kube`). Both produce objects for the `store`.
pub mod dir;
pub mod kube;
pub mod yaml;

use std::{fmt, path::PathBuf};

use self::{dir::DirSource, kube::KubeSource};

use serde::Serialize;

use crate::store::{FieldError, ObjectRef};

/// Where the pipeline reads desired state.
#[derive(Debug)]
pub enum Source {
    Dir(DirSource),
    Kubernetes(Box<KubeSource>),
}

impl Source {
    /// For status: `dir:PATH` or `kubernetes:SERVER (node NAME)`.
    pub fn describe(&self) -> String {
        match self {
            Self::Dir(d) => format!("dir:{}", d.dir().display()),
            Self::Kubernetes(k) => k.describe(),
        }
    }
}

/// Where a rejected document is in a directory source.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Location {
    pub file: PathBuf,
    /// 0-based document index in the file.
    pub document: usize,
    /// 1-based line where the document starts.
    pub line: usize,
}

/// A document (or an object from the API server) that was not accepted. Its object (when it
/// could be named) keeps its last good version.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Rejection {
    /// None for objects from the API server.
    #[serde(flatten, skip_serializing_if = "Option::is_none")]
    pub location: Option<Location>,
    pub object: Option<ObjectRef>,
    pub errors: Vec<FieldError>,
}

impl fmt::Display for Rejection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.location {
            Some(at) => {
                write!(
                    f,
                    "{}: document {} (line {})",
                    at.file.display(),
                    at.document,
                    at.line
                )?;
                if let Some(o) = &self.object {
                    write!(f, ", {o}")?;
                }
            }
            None => match &self.object {
                Some(o) => write!(f, "{o} from the API server")?,
                None => f.write_str("an object from the API server")?,
            },
        }
        for (i, e) in self.errors.iter().enumerate() {
            let sep = if i == 0 { ": " } else { "; " };
            if e.field.is_empty() {
                write!(f, "{sep}{}", e.message)?;
            } else {
                write!(f, "{sep}{}: {}", e.field, e.message)?;
            }
        }
        Ok(())
    }
}

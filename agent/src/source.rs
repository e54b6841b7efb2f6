//! Sources of desired state. Standalone mode reads a directory of Kubernetes YAML (`dir`);
//! Kubernetes mode (later) reads the API server. Both produce objects for the `store`.
pub mod dir;
pub mod yaml;

use std::{fmt, path::PathBuf};

use serde::Serialize;

use crate::store::{FieldError, ObjectRef};

/// A document that was not accepted. Its object (when it could be named) keeps its last good
/// version.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Rejection {
    pub file: PathBuf,
    /// 0-based document index in the file.
    pub document: usize,
    /// 1-based line where the document starts.
    pub line: usize,
    pub object: Option<ObjectRef>,
    pub errors: Vec<FieldError>,
}

impl fmt::Display for Rejection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}: document {} (line {})",
            self.file.display(),
            self.document,
            self.line
        )?;
        if let Some(o) = &self.object {
            write!(f, ", {o}")?;
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

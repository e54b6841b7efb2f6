//! `--source dir:PATH`: every `*.yaml` / `*.yml` file directly in PATH, each possibly holding
//! several documents.
//!
//! A rescan reads every file and re-decodes only those whose content changed, and in them only
//! the documents whose text changed (a tool rewriting a file of 1 000 policies to change one
//! costs one decode, not 1 000). Rules that keep
//! the last good state in force:
//! - a valid document replaces its object; an object whose document disappeared from a file
//!   that decoded completely is deleted;
//! - a rejected document that names its object keeps that object's previous version;
//! - a document that cannot even be parsed (so its object is unknown) keeps every previous
//!   object of its file that no valid document of the new version accounts for;
//! - an object defined in two files is taken from the first in path order and the other
//!   document is rejected.
use std::{
    collections::{BTreeMap, HashMap, btree_map::Entry, hash_map::DefaultHasher},
    fs,
    hash::{Hash, Hasher},
    io,
    os::unix::fs::MetadataExt as _,
    path::{Path, PathBuf},
};

use super::{Location, Rejection, yaml};
use crate::store::{self, FieldError, Object, ObjectRef, stand_in};

/// Errors of this module.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot read the source directory {dir}", dir = dir.display())]
    ReadDir {
        dir: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot watch the source directory {dir}", dir = dir.display())]
    Watch {
        dir: PathBuf,
        #[source]
        source: notify::Error,
    },
}

/// What identifies a version of a file without reading it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Fingerprint {
    dev: u64,
    ino: u64,
    len: u64,
    mtime: (i64, i64),
    ctime: (i64, i64),
}

/// A file modified this recently may still be in the middle of an in-place write.
const SETTLE: std::time::Duration = std::time::Duration::from_millis(20);

impl Fingerprint {
    fn is_fresh(&self, settle: std::time::Duration) -> bool {
        let modified = std::time::UNIX_EPOCH
            + std::time::Duration::new(
                self.mtime.0.max(0) as u64,
                self.mtime.1.clamp(0, 999_999_999) as u32,
            );
        std::time::SystemTime::now()
            .duration_since(modified)
            .is_ok_and(|age| age < settle)
    }

    fn of(path: &Path) -> Option<Self> {
        // Follows symlinks: a Kubernetes ConfigMap volume swaps a symlinked directory.
        let m = fs::metadata(path).ok()?;
        Some(Self {
            dev: m.dev(),
            ino: m.ino(),
            len: m.len(),
            mtime: (m.mtime(), m.mtime_nsec()),
            ctime: (m.ctime(), m.ctime_nsec()),
        })
    }
}

#[derive(Debug, Clone)]
struct FileState {
    /// Unchanged metadata: the file is not read again (10 000 Services are megabytes).
    fingerprint: Option<Fingerprint>,
    hash: u64,
    /// Object, and the document it came from.
    objects: BTreeMap<ObjectRef, (usize, Object)>,
    rejections: Vec<Rejection>,
    /// What each document text of this version decoded to, by the hash of its text.
    decoded: HashMap<u64, Decoded>,
}

/// The outcome of decoding one document's text (its position in the file aside).
#[derive(Debug, Clone)]
enum Decoded {
    Object(ObjectRef, Object),
    /// Not YAML: the parser's message.
    Unparsable(String),
    Invalid(store::Invalid),
}

/// The state of a source directory.
#[derive(Debug)]
pub struct DirSource {
    dir: PathBuf,
    files: BTreeMap<PathBuf, FileState>,
    /// How long after its last modification a file is left alone (see [`SETTLE`]).
    settle: std::time::Duration,
    /// Files known complete (closed after writing, renamed into place) in this version: read
    /// without waiting for them to settle.
    complete: BTreeMap<PathBuf, Fingerprint>,
    /// `--node-name`: pods of other nodes are peers only (see `Store::unbind_other_nodes`).
    node: Option<String>,
}

/// What a rescan changed.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Rescan {
    /// Some file was added, removed or changed.
    pub changed: bool,
    /// Documents rejected in the files re-read by this rescan.
    pub new_rejections: usize,
    /// Some file was changing while it was read (or just now): rescan again shortly.
    pub unsettled: bool,
}

impl DirSource {
    pub fn new(dir: &Path) -> Self {
        Self::with_settle(dir, SETTLE)
    }

    /// Like [`DirSource::new`], leaving files alone for `settle` after they change.
    pub fn with_settle(dir: &Path, settle: std::time::Duration) -> Self {
        Self {
            dir: dir.to_owned(),
            files: BTreeMap::new(),
            settle,
            complete: BTreeMap::new(),
            node: None,
        }
    }

    /// This node's name (`--node-name`): pods whose `spec.nodeName` names another node are
    /// peers only, their cgroups another agent's.
    #[must_use]
    pub fn for_node(mut self, node: Option<String>) -> Self {
        self.node = node;
        self
    }

    /// See [`DirSource::for_node`].
    pub fn node(&self) -> Option<&str> {
        self.node.as_deref()
    }

    /// The file at `path` is complete as it is now (the watcher saw it closed after writing
    /// or renamed into place): while it stays this version, it needs no settling.
    pub fn mark_complete(&mut self, path: &Path) {
        if let Some(f) = Fingerprint::of(path) {
            self.complete.insert(path.to_owned(), f);
        }
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Re-reads the directory: the files whose metadata changed, or every file when `force`.
    pub fn rescan(&mut self, force: bool) -> Result<Rescan, Error> {
        let read_dir = |source| Error::ReadDir {
            dir: self.dir.clone(),
            source,
        };
        let mut present = Vec::new();
        for entry in fs::read_dir(&self.dir).map_err(read_dir)? {
            let path = entry.map_err(read_dir)?.path();
            if is_source_file(&path) {
                present.push(path);
            }
        }
        let mut result = Rescan::default();
        self.complete.retain(|p, _| present.contains(p));
        let before = self.files.len();
        self.files.retain(|p, _| present.contains(p));
        result.changed |= self.files.len() != before;
        for path in present {
            let fingerprint = Fingerprint::of(&path);
            let known = self.files.get(&path);
            let unchanged =
                fingerprint.is_some() && known.is_some_and(|f| f.fingerprint == fingerprint);
            if unchanged && !force {
                continue;
            }
            let text = match fs::read(&path) {
                Ok(bytes) => String::from_utf8(bytes).map_err(|e| e.to_string()),
                // Removed or replaced between listing and reading: the next event sees it.
                Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                Err(e) => Err(e.to_string()),
            };
            // A file still being written in place: read it once it has settled (unless it is
            // known complete as it is).
            let complete =
                fingerprint.is_some() && self.complete.get(&path) == fingerprint.as_ref();
            if Fingerprint::of(&path) != fingerprint
                || (!complete && fingerprint.is_some_and(|f| f.is_fresh(self.settle)))
            {
                result.unsettled = true;
                continue;
            }
            let state = match text {
                Ok(text) => {
                    let hash = hash_of(&text);
                    if let Some(f) = self.files.get_mut(&path)
                        && f.hash == hash
                    {
                        // Touched, not changed.
                        f.fingerprint = fingerprint;
                        continue;
                    }
                    decode_file(&path, &text, hash, self.files.get(&path))
                }
                Err(error) => unreadable(&path, &error, self.files.get(&path)),
            };
            result.changed = true;
            result.new_rejections += state.rejections.len();
            self.files.insert(
                path,
                FileState {
                    fingerprint,
                    ..state
                },
            );
        }
        Ok(result)
    }

    /// Every object in force, and every rejection (duplicates across files included).
    pub fn objects(&self) -> (BTreeMap<&ObjectRef, &Object>, Vec<Rejection>) {
        let mut objects = BTreeMap::new();
        let mut origin: BTreeMap<&ObjectRef, &Path> = BTreeMap::new();
        let mut rejections = Vec::new();
        for (path, file) in &self.files {
            rejections.extend(file.rejections.iter().cloned());
            for (r, (doc, obj)) in &file.objects {
                if let Some(first) = origin.get(r) {
                    rejections.push(Rejection {
                        location: Some(Location {
                            file: path.clone(),
                            document: *doc,
                            line: 0,
                        }),
                        object: Some(r.clone()),
                        errors: vec![FieldError {
                            field: "metadata.name".into(),
                            message: format!("already defined in {}", first.display()),
                        }],
                    });
                    continue;
                }
                origin.insert(r, path);
                objects.insert(r, obj);
            }
        }
        (objects, rejections)
    }
}

/// `*.yaml` or `*.yml`, not hidden (editors and atomic writers use hidden temporary files).
fn is_source_file(path: &Path) -> bool {
    let hidden = path
        .file_name()
        .and_then(|n| n.to_str())
        .is_none_or(|n| n.starts_with('.'));
    let yaml = path
        .extension()
        .and_then(|e| e.to_str())
        .is_some_and(|e| e == "yaml" || e == "yml");
    !hidden && yaml && path.is_file()
}

fn hash_of(text: &str) -> u64 {
    let mut h = DefaultHasher::new();
    text.hash(&mut h);
    h.finish()
}

/// A file that cannot be read (permissions, not UTF-8): one rejection, and its objects keep
/// their last good versions.
fn unreadable(path: &Path, error: &str, previous: Option<&FileState>) -> FileState {
    FileState {
        fingerprint: None,
        hash: 0,
        objects: previous.map(|p| p.objects.clone()).unwrap_or_default(),
        decoded: HashMap::new(),
        rejections: vec![Rejection {
            location: Some(Location {
                file: path.to_owned(),
                document: 0,
                line: 0,
            }),
            object: None,
            errors: vec![FieldError {
                field: String::new(),
                message: format!("cannot read the file: {error}"),
            }],
        }],
    }
}

/// What a rejected document leaves (`store::stand_in`): a pod's stand-in replaces it; a
/// policy's last version stays without its rules, the stand-in of the rejected one beside it,
/// so that what either selects is isolated and nothing either allowed stays allowed.
fn place_stand_ins(
    objects: &mut BTreeMap<ObjectRef, (usize, Object)>,
    stand_ins: Vec<(ObjectRef, (usize, Object))>,
) {
    for (r, (doc, s)) in stand_ins {
        let kept = objects
            .get(&r)
            .and_then(|(d, kept)| Some((*d, stand_in::kept_beside(kept)?)));
        match kept {
            Some((kept_doc, kept)) => {
                objects.insert(r.clone(), (kept_doc, kept));
                let (beside, s) = stand_in::beside(&r, s);
                objects.insert(beside, (doc, s));
            }
            _ => {
                objects.insert(r, (doc, s));
            }
        }
    }
}

/// The previous version of each rejected object (`kept`) that this version does not hold.
fn keep_good_versions(
    objects: &mut BTreeMap<ObjectRef, (usize, Object)>,
    previous: &FileState,
    kept: impl Fn(&ObjectRef) -> bool,
) {
    for (r, old) in &previous.objects {
        if kept(r) && !objects.contains_key(r) {
            objects.insert(r.clone(), old.clone());
        }
    }
}

fn decode_file(path: &Path, text: &str, hash: u64, previous: Option<&FileState>) -> FileState {
    let mut objects: BTreeMap<ObjectRef, (usize, Object)> = BTreeMap::new();
    let mut rejections = Vec::new();
    let mut keep: Vec<ObjectRef> = Vec::new();
    let mut keep_unaccounted = false;
    let mut stand_ins = Vec::new();
    let mut decoded = HashMap::new();
    for doc in yaml::documents(text) {
        let reject = |object: Option<ObjectRef>, errors: Vec<FieldError>| Rejection {
            location: Some(Location {
                file: path.to_owned(),
                document: doc.index,
                line: doc.first_line,
            }),
            object,
            errors,
        };
        let doc_hash = hash_of(doc.text);
        let outcome = previous
            .and_then(|p| p.decoded.get(&doc_hash))
            .cloned()
            .unwrap_or_else(|| match yaml::parse(doc.text) {
                Err(e) => Decoded::Unparsable(e.to_string()),
                Ok(value) => match store::decode(value) {
                    Ok((r, obj)) => Decoded::Object(r, obj),
                    Err(invalid) => Decoded::Invalid(invalid),
                },
            });
        decoded.insert(doc_hash, outcome.clone());
        match outcome {
            Decoded::Unparsable(e) => {
                keep_unaccounted = true;
                let error = FieldError {
                    field: String::new(),
                    message: format!("invalid YAML: {e}"),
                };
                rejections.push(reject(None, vec![error]));
            }
            Decoded::Object(r, obj) => match objects.entry(r) {
                Entry::Occupied(e) => {
                    let error = FieldError {
                        field: "metadata.name".into(),
                        message: format!("{} is defined twice in this file", e.key()),
                    };
                    rejections.push(reject(Some(e.key().clone()), vec![error]));
                }
                Entry::Vacant(e) => {
                    e.insert((doc.index, obj));
                }
            },
            Decoded::Invalid(invalid) => {
                match &invalid.object {
                    Some(r) => {
                        keep.push(r.clone());
                        if let Some(s) = invalid.stand_in {
                            stand_ins.push((r.clone(), (doc.index, s)));
                        }
                    }
                    None => keep_unaccounted = true,
                }
                rejections.push(reject(invalid.object, invalid.errors));
            }
        }
    }
    if let Some(prev) = previous {
        let kept = |r: &ObjectRef| keep_unaccounted || keep.contains(r);
        keep_good_versions(&mut objects, prev, kept);
    }
    place_stand_ins(&mut objects, stand_ins);
    FileState {
        fingerprint: None,
        hash,
        objects,
        rejections,
        decoded,
    }
}

/// Whether a watch's event is only a read: opening, reading, closing unwritten. A reader of
/// the directory sees its own reads, so taking them for changes makes each read set off the
/// next.
pub fn only_read(kind: &notify::EventKind) -> bool {
    use notify::event::{AccessKind, AccessMode};
    matches!(kind, notify::EventKind::Access(a) if *a != AccessKind::Close(AccessMode::Write))
}

/// Watches a directory (not recursively) and sends every change: files closed after writing
/// or renamed into place as complete, anything else as a change to look at.
pub fn watch(
    dir: &Path,
    tx: tokio::sync::mpsc::UnboundedSender<super::SourceEvent>,
) -> Result<notify::RecommendedWatcher, Error> {
    use notify::{
        EventKind, Watcher as _,
        event::{AccessKind, AccessMode, ModifyKind, RenameMode},
    };
    let err = |source| Error::Watch {
        dir: dir.to_owned(),
        source,
    };
    let mut watcher = notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
        let sent = match event {
            Err(e) => {
                // A lost event (queue overflow, watch removed) could hide a change: rescan.
                tracing::warn!(target: "weft::source", error = %e, "source watch reported an error; rescanning");
                super::SourceEvent::Changed
            }
            Ok(e) => match e.kind {
                EventKind::Access(AccessKind::Close(AccessMode::Write))
                | EventKind::Modify(ModifyKind::Name(RenameMode::To)) => {
                    super::SourceEvent::Complete(e.paths)
                }
                kind if only_read(&kind) => return,
                _ => super::SourceEvent::Changed,
            },
        };
        // The receiver is gone only when the agent stops.
        let _ = tx.send(sent);
    })
    .map_err(err)?;
    watcher
        .watch(dir, notify::RecursiveMode::NonRecursive)
        .map_err(err)?;
    Ok(watcher)
}

#[cfg(test)]
mod tests {
    use std::{sync::Arc, time::Duration};

    use super::*;
    use crate::tests::TempDir;

    const WEB: &str = "apiVersion: v1\nkind: Service\nmetadata:\n  name: web\nspec:\n  clusterIP: 10.96.0.10\n  ports:\n  - port: 80\n";
    const DB: &str = "apiVersion: v1\nkind: Service\nmetadata:\n  name: db\nspec:\n  clusterIP: 10.96.0.11\n  ports:\n  - port: 5432\n";

    fn names(src: &DirSource) -> Vec<String> {
        src.objects().0.keys().map(ToString::to_string).collect()
    }

    /// Reading the directory and its files, as every pass does, is no change; writing is.
    #[tokio::test]
    async fn reading_the_directory_is_not_a_change() {
        let d = TempDir::new("watch-read");
        d.write("a.yaml", "kind: Pod\n");
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        let _watcher = watch(d.path(), tx).expect("watch");
        assert_eq!(std::fs::read_dir(d.path()).expect("list").count(), 1);
        std::fs::read(d.path().join("a.yaml")).expect("read");
        let quiet = tokio::time::timeout(Duration::from_millis(300), rx.recv()).await;
        assert!(quiet.is_err(), "reading reported {quiet:?}");
        d.write("a.yaml", "kind: Service\n");
        let written = tokio::time::timeout(Duration::from_secs(10), rx.recv()).await;
        assert!(matches!(written, Ok(Some(_))), "{written:?}");
    }

    #[test]
    fn a_file_modified_just_now_is_read_once_it_settled() {
        let d = TempDir::new("settle");
        d.write("a.yaml", WEB);
        // Written a moment ago: maybe half of an in-place write. Not applied, but reported.
        let mut src = DirSource::with_settle(d.path(), Duration::from_secs(3600));
        let r = src.rescan(false).expect("rescan");
        assert!(r.unsettled && !r.changed, "{r:?}");
        assert!(names(&src).is_empty());
        // Once settled the same file is read, although its metadata has not changed since.
        src.settle = Duration::ZERO;
        let r = src.rescan(false).expect("rescan");
        assert!(r.changed && !r.unsettled, "{r:?}");
        assert_eq!(names(&src), ["Service default/web"]);
    }

    #[test]
    fn only_the_documents_whose_text_changed_are_decoded_again() {
        let d = TempDir::new("docs");
        let bad = WEB
            .replace("name: web", "name: bad")
            .replace("port: 80", "port: 0");
        d.write("a.yaml", &format!("{WEB}---\n{DB}---\n{bad}"));
        let mut src = DirSource::with_settle(d.path(), Duration::ZERO);
        src.rescan(false).expect("rescan");
        let service = |src: &DirSource, name: &str| {
            let (objects, _) = src.objects();
            match objects[&ObjectRef::new(store::Kind::Service, "default", name)] {
                Object::Service(s) => Arc::clone(s),
                _ => panic!("{name} is a service"),
            }
        };
        let web = service(&src, "web");
        // db changes and the documents move (a comment-only document comes first): web is the
        // same decoded object, db a new one, and the rejection names the bad document's new
        // position.
        d.write(
            "a.yaml",
            &format!(
                "# shop\n---\n{WEB}---\n{}---\n{bad}",
                DB.replace("5432", "5433")
            ),
        );
        assert!(src.rescan(false).expect("rescan").changed);
        assert!(
            Arc::ptr_eq(&web, &service(&src, "web")),
            "web was not decoded again"
        );
        let db = service(&src, "db");
        assert_eq!(
            db.spec
                .as_ref()
                .and_then(|s| s.ports.as_ref())
                .map(|p| p[0].port),
            Some(5433)
        );
        let (_, rejections) = src.objects();
        assert_eq!(rejections.len(), 1);
        assert!(
            rejections[0].to_string().contains("document 3 (line 21)"),
            "{}",
            rejections[0]
        );
    }

    #[test]
    fn a_file_known_complete_is_read_without_settling() {
        let d = TempDir::new("complete");
        d.write("a.yaml", WEB);
        let mut src = DirSource::with_settle(d.path(), Duration::from_secs(3600));
        assert!(src.rescan(false).expect("rescan").unsettled);
        // The watcher saw it closed after writing (or renamed into place).
        src.mark_complete(&d.path().join("a.yaml"));
        let r = src.rescan(false).expect("rescan");
        assert!(r.changed && !r.unsettled, "{r:?}");
        assert_eq!(names(&src), ["Service default/web"]);
        // Written again since: that version may be half written.
        d.write("a.yaml", &format!("{WEB}---\n{DB}"));
        assert!(src.rescan(false).expect("rescan").unsettled);
        assert_eq!(names(&src), ["Service default/web"]);
    }

    #[test]
    fn reads_multi_document_files_and_ignores_other_files() {
        let d = TempDir::new("multi");
        d.write("a.yaml", &format!("{WEB}---\n{DB}"));
        d.write(".a.yaml.swp", "garbage");
        d.write("notes.txt", "not yaml");
        let mut src = DirSource::with_settle(d.path(), Duration::ZERO);
        assert!(src.rescan(false).expect("rescan").changed);
        assert_eq!(names(&src), ["Service default/db", "Service default/web"]);
        assert!(
            !src.rescan(false).expect("rescan").changed,
            "nothing changed"
        );
    }

    #[test]
    fn a_rejected_document_keeps_the_last_good_version_of_its_object() {
        let d = TempDir::new("keep");
        d.write("a.yaml", &format!("{WEB}---\n{DB}"));
        let mut src = DirSource::with_settle(d.path(), Duration::ZERO);
        src.rescan(false).expect("rescan");
        // web gets an invalid port; db is removed from the file.
        d.write("a.yaml", &WEB.replace("port: 80", "port: 0"));
        let r = src.rescan(false).expect("rescan");
        assert_eq!(r.new_rejections, 1);
        let (objects, rejections) = src.objects();
        let web = &objects[&ObjectRef::new(store::Kind::Service, "default", "web")];
        let Object::Service(web) = web else {
            panic!("service")
        };
        assert_eq!(
            web.spec
                .as_ref()
                .and_then(|s| s.ports.as_ref())
                .map(|p| p[0].port),
            Some(80)
        );
        assert!(
            !objects.contains_key(&ObjectRef::new(store::Kind::Service, "default", "db")),
            "db was deleted"
        );
        assert_eq!(rejections.len(), 1);
        let text = rejections[0].to_string();
        assert!(
            text.contains("a.yaml: document 0 (line 1), Service default/web: spec.ports[0].port"),
            "{text}"
        );
    }

    #[test]
    fn unparsable_yaml_keeps_every_object_of_its_file() {
        let d = TempDir::new("unparsable");
        d.write("a.yaml", &format!("{WEB}---\n{DB}"));
        let mut src = DirSource::with_settle(d.path(), Duration::ZERO);
        src.rescan(false).expect("rescan");
        d.write("a.yaml", &format!("{WEB}---\nkind: [unclosed\n"));
        src.rescan(false).expect("rescan");
        assert_eq!(names(&src), ["Service default/db", "Service default/web"]);
        let (_, rejections) = src.objects();
        assert!(
            rejections[0].errors[0].message.starts_with("invalid YAML"),
            "{:?}",
            rejections[0]
        );
        // Fixing the file deletes what it no longer defines.
        d.write("a.yaml", WEB);
        src.rescan(false).expect("rescan");
        assert_eq!(names(&src), ["Service default/web"]);
    }

    #[test]
    fn duplicates_across_files_are_rejected() {
        let d = TempDir::new("dup");
        d.write("a.yaml", WEB);
        d.write("b.yml", WEB);
        let mut src = DirSource::with_settle(d.path(), Duration::ZERO);
        src.rescan(false).expect("rescan");
        let (objects, rejections) = src.objects();
        assert_eq!(objects.len(), 1);
        assert!(
            rejections[0].to_string().contains("already defined in"),
            "{}",
            rejections[0]
        );
    }

    #[test]
    fn removed_files_remove_their_objects() {
        let d = TempDir::new("removed");
        d.write("a.yaml", WEB);
        let mut src = DirSource::with_settle(d.path(), Duration::ZERO);
        src.rescan(false).expect("rescan");
        fs::remove_file(d.path().join("a.yaml")).expect("rm");
        assert!(src.rescan(false).expect("rescan").changed);
        assert!(names(&src).is_empty());
    }
}

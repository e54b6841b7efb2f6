//! An in-process fake Kubernetes API server for `weft agent --source kubernetes`: plain HTTP
//! on loopback, speaking the parts of the real protocol a reflector uses.
//!
//! - `GET <collection>` lists with `metadata.resourceVersion`, in pages of `limit` (or fewer,
//!   [`FakeApi::set_page_cap`]) with `continue` tokens; every page comes from the snapshot
//!   the first one was cut from, and a token older than the compaction gets 410 Gone.
//! - `GET <collection>?watch=true&resourceVersion=N` streams (chunked) every change after N
//!   as `ADDED` / `MODIFIED` / `DELETED`, and `BOOKMARK`s when asked; a version older than
//!   the last [`FakeApi::compact`] gets an `ERROR` event with a 410 `Expired` Status.
//!   Without a version the watch starts now; with `0`, every current object comes first as
//!   `ADDED`.
//! - [`FakeApi::fail_with`] answers every request (or [`FakeApi::fail_kind`] those of one
//!   kind) with an HTTP error and a Status body;
//!   [`FakeApi::set_down`] cuts open streams and closes new connections at once (the API
//!   server is unreachable); [`FakeApi::drop_streams`] cuts open watches once, without the
//!   final chunk, as a lost connection would.
//!
//! - Istio's collections (`security.istio.io/v1`, `networking.istio.io/v1`'s
//!   DestinationRules) and their discovery documents are served only once
//!   [`FakeApi::serve_security_api`] says the CRDs are installed; before, they answer 404 as
//!   a server without them does.
//!
//! One thread per connection; every response closes its connection.
use std::{
    collections::BTreeMap,
    io::{BufRead as _, BufReader, Write as _},
    net::{Shutdown, SocketAddr, TcpListener, TcpStream},
    path::{Path, PathBuf},
    sync::{
        Arc, Condvar, Mutex, MutexGuard,
        atomic::{AtomicBool, Ordering},
    },
    thread,
    time::{Duration, Instant},
};

use serde_json::{Value, json};

/// The collections served: (path, apiVersion, kind, namespaced).
const RESOURCES: [(&str, &str, &str, bool); 8] = [
    ("/api/v1/namespaces", "v1", "Namespace", false),
    ("/api/v1/pods", "v1", "Pod", true),
    ("/api/v1/services", "v1", "Service", true),
    (
        "/apis/discovery.k8s.io/v1/endpointslices",
        "discovery.k8s.io/v1",
        "EndpointSlice",
        true,
    ),
    (
        "/apis/networking.k8s.io/v1/networkpolicies",
        "networking.k8s.io/v1",
        "NetworkPolicy",
        true,
    ),
    (
        "/apis/security.istio.io/v1/peerauthentications",
        SECURITY_API,
        "PeerAuthentication",
        true,
    ),
    (
        "/apis/security.istio.io/v1/authorizationpolicies",
        SECURITY_API,
        "AuthorizationPolicy",
        true,
    ),
    (
        "/apis/networking.istio.io/v1/destinationrules",
        NETWORKING_API,
        "DestinationRule",
        true,
    ),
];

/// Istio's security API, served only once its CRDs are "installed".
const SECURITY_API: &str = "security.istio.io/v1";
/// Istio's networking API (DestinationRules), with the security API.
const NETWORKING_API: &str = "networking.istio.io/v1";
/// The group versions served only once Istio's CRDs are "installed".
const ISTIO_APIS: [&str; 2] = [SECURITY_API, NETWORKING_API];

/// How often a watch that asked for them gets a BOOKMARK.
const BOOKMARK_EVERY: Duration = Duration::from_millis(500);

#[derive(Debug, Default)]
struct State {
    /// The last resourceVersion handed out.
    rv: u64,
    /// (kind, namespace, name) → object.
    objects: BTreeMap<(String, String, String), Value>,
    /// Every change: (resourceVersion, kind, event type, object).
    history: Vec<(u64, String, &'static str, Value)>,
    /// Watches and continue tokens from before this version get 410 Gone.
    compacted: u64,
    /// Answer every request with this HTTP status.
    fail_with: Option<u16>,
    /// Answer the requests of these kinds with these HTTP statuses.
    fail_kinds: BTreeMap<String, u16>,
    /// A watch from a compacted version gets HTTP 410 instead of a 200 stream with an ERROR
    /// event (as some proxies and older servers answer).
    gone_as_http: bool,
    /// Pages hold at most this many objects, whatever the client's limit.
    page_cap: Option<usize>,
    /// Snapshots of lists being paged through: token id → (resourceVersion, objects).
    pages: BTreeMap<u64, (u64, Vec<Value>)>,
    next_page_id: u64,
    down: bool,
    /// Bumped by `drop_streams` and `set_down`: watches of an older epoch end.
    epoch: u64,
    /// Requests served, by kind and verb (`list` / `watch`), for tests to see relists.
    requests: BTreeMap<(String, &'static str), usize>,
    /// Istio's security CRDs are installed.
    security_served: bool,
}

#[derive(Debug, Default)]
struct Shared {
    state: Mutex<State>,
    changed: Condvar,
    stop: AtomicBool,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// The fake API server; stops on drop.
#[derive(Debug)]
pub struct FakeApi {
    addr: SocketAddr,
    shared: Arc<Shared>,
    acceptor: Option<thread::JoinHandle<()>>,
}

impl FakeApi {
    pub fn start() -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind the fake API server");
        let addr = listener.local_addr().expect("local address");
        let shared = Arc::new(Shared::default());
        let s = Arc::clone(&shared);
        let acceptor = thread::spawn(move || {
            for conn in listener.incoming() {
                if s.stop.load(Ordering::Acquire) {
                    return;
                }
                let Ok(conn) = conn else { continue };
                if s.lock().down {
                    let _ = conn.shutdown(Shutdown::Both);
                    continue;
                }
                let s = Arc::clone(&s);
                thread::spawn(move || serve(&s, conn));
            }
        });
        Self {
            addr,
            shared,
            acceptor: Some(acceptor),
        }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Writes a kubeconfig for this server into `dir` and returns its path.
    pub fn kubeconfig(&self, dir: &Path) -> PathBuf {
        let path = dir.join("kubeconfig");
        let text = format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: fake\n  cluster:\n    server: {}\n\
             contexts:\n- name: fake\n  context:\n    cluster: fake\n    user: fake\n\
             current-context: fake\nusers:\n- name: fake\n  user: {{}}\n",
            self.url()
        );
        std::fs::write(&path, text).unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
        path
    }

    /// Installs Istio's CRDs (security, and DestinationRules): their collections and
    /// discovery documents are served from now on.
    pub fn serve_security_api(&self) {
        self.shared.lock().security_served = true;
    }

    /// Creates or replaces an object (it needs `kind` and `metadata.name`; namespaced kinds
    /// default to `default`). Returns its new resourceVersion.
    pub fn apply(&self, mut object: Value) -> u64 {
        let kind = object["kind"]
            .as_str()
            .unwrap_or_else(|| panic!("object without kind: {object}"))
            .to_owned();
        let (_, api_version, _, namespaced) = resource_of_kind(&kind);
        object["apiVersion"] = json!(api_version);
        let name = object["metadata"]["name"]
            .as_str()
            .unwrap_or_else(|| panic!("object without metadata.name: {object}"))
            .to_owned();
        let namespace = if namespaced {
            let ns = object["metadata"]["namespace"]
                .as_str()
                .unwrap_or("default")
                .to_owned();
            object["metadata"]["namespace"] = json!(ns);
            ns
        } else {
            String::new()
        };
        let mut st = self.shared.lock();
        st.rv += 1;
        let rv = st.rv;
        let key = (kind.clone(), namespace, name.clone());
        let previous = st.objects.get(&key).cloned();
        let uid = previous
            .as_ref()
            .and_then(|p| p["metadata"]["uid"].as_str().map(str::to_owned))
            .or_else(|| object["metadata"]["uid"].as_str().map(str::to_owned))
            .unwrap_or_else(|| format!("fake-{kind}-{name}-{rv}").to_lowercase());
        object["metadata"]["uid"] = json!(uid);
        object["metadata"]["resourceVersion"] = json!(rv.to_string());
        let event = if previous.is_some() {
            "MODIFIED"
        } else {
            "ADDED"
        };
        st.objects.insert(key, object.clone());
        st.history.push((rv, kind, event, object));
        drop(st);
        self.shared.changed.notify_all();
        rv
    }

    /// Deletes an object; false when there was none.
    pub fn delete(&self, kind: &str, namespace: &str, name: &str) -> bool {
        let mut st = self.shared.lock();
        let key = (kind.to_owned(), namespace.to_owned(), name.to_owned());
        let Some(mut object) = st.objects.remove(&key) else {
            return false;
        };
        st.rv += 1;
        let rv = st.rv;
        object["metadata"]["resourceVersion"] = json!(rv.to_string());
        st.history.push((rv, kind.to_owned(), "DELETED", object));
        drop(st);
        self.shared.changed.notify_all();
        true
    }

    /// Forgets the history: a watch resuming from a version older than the current one
    /// gets 410 Gone and must relist.
    pub fn compact(&self) {
        let mut st = self.shared.lock();
        st.compacted = st.rv;
        st.history.clear();
    }

    /// Every request gets this HTTP status (None: serve normally). Open watches end.
    pub fn fail_with(&self, status: Option<u16>) {
        let mut st = self.shared.lock();
        st.fail_with = status;
        st.epoch += 1;
        drop(st);
        self.shared.changed.notify_all();
    }

    /// Requests of `kind` get this HTTP status (None: served again). Its open watches end.
    pub fn fail_kind(&self, kind: &str, status: Option<u16>) {
        let mut st = self.shared.lock();
        match status {
            Some(code) => st.fail_kinds.insert(kind.to_owned(), code),
            None => st.fail_kinds.remove(kind),
        };
        st.epoch += 1;
        drop(st);
        self.shared.changed.notify_all();
    }

    /// A watch from a compacted version is refused with HTTP 410 (true) instead of getting
    /// an ERROR event in a 200 stream (false, the real API server's way).
    pub fn set_gone_as_http(&self, on: bool) {
        self.shared.lock().gone_as_http = on;
    }

    /// Lists answer at most `cap` objects per page (None: the client's limit), as a server
    /// may: a continue token then leads to the rest.
    pub fn set_page_cap(&self, cap: Option<usize>) {
        self.shared.lock().page_cap = cap;
    }

    /// Down: open streams are cut and new connections closed unanswered.
    pub fn set_down(&self, down: bool) {
        let mut st = self.shared.lock();
        st.down = down;
        st.epoch += 1;
        drop(st);
        self.shared.changed.notify_all();
    }

    /// Cuts every open watch once, mid-stream.
    pub fn drop_streams(&self) {
        self.shared.lock().epoch += 1;
        self.shared.changed.notify_all();
    }

    /// How many `list` or `watch` requests of `kind` came (failed ones included).
    pub fn requests(&self, kind: &str, verb: &str) -> usize {
        self.shared
            .lock()
            .requests
            .iter()
            .filter(|((k, v), _)| k == kind && *v == verb)
            .map(|(_, n)| *n)
            .sum()
    }

    /// Waits until `pred` holds for the requests counted, or panics after `timeout`.
    pub fn wait_requests(&self, what: &str, timeout: Duration, pred: impl Fn(&Self) -> bool) {
        let deadline = Instant::now() + timeout;
        while !pred(self) {
            assert!(Instant::now() < deadline, "timed out waiting for {what}");
            thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for FakeApi {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::Release);
        self.shared.lock().epoch += 1;
        self.shared.changed.notify_all();
        // Wakes the acceptor so it sees `stop`.
        let _ = TcpStream::connect(self.addr);
        if let Some(t) = self.acceptor.take() {
            let _ = t.join();
        }
    }
}

fn resource_of_kind(kind: &str) -> (&'static str, &'static str, &'static str, bool) {
    RESOURCES
        .iter()
        .copied()
        .find(|r| r.2 == kind)
        .unwrap_or_else(|| panic!("the fake API server does not serve {kind}"))
}

/// The discovery document of `api`, one of [`ISTIO_APIS`].
fn istio_resources(api: &str) -> Value {
    let resources: Vec<Value> = RESOURCES
        .iter()
        .filter(|r| r.1 == api)
        .map(|(path, _, kind, namespaced)| {
            json!({"name": path.rsplit('/').next(), "singularName": kind.to_lowercase(),
                   "namespaced": namespaced, "kind": kind,
                   "verbs": ["get", "list", "watch"]})
        })
        .collect();
    json!({"kind": "APIResourceList", "apiVersion": "v1", "groupVersion": api,
           "resources": resources})
}

/// Reads one request and answers it.
fn serve(shared: &Shared, conn: TcpStream) {
    let _ = conn.set_read_timeout(Some(Duration::from_secs(5)));
    let mut reader = BufReader::new(match conn.try_clone() {
        Ok(c) => c,
        Err(_) => return,
    });
    let mut request_line = String::new();
    if reader.read_line(&mut request_line).is_err() {
        return;
    }
    // Headers (GET requests carry no body).
    loop {
        let mut line = String::new();
        match reader.read_line(&mut line) {
            Ok(0) | Err(_) => return,
            Ok(_) if line == "\r\n" || line == "\n" => break,
            Ok(_) => {}
        }
    }
    let mut conn = conn;
    let target = request_line.split_whitespace().nth(1).unwrap_or("/");
    let (path, query) = target.split_once('?').unwrap_or((target, ""));
    let params: BTreeMap<String, String> = query
        .split('&')
        .filter_map(|kv| kv.split_once('='))
        .map(|(k, v)| (k.to_owned(), decode(v)))
        .collect();
    let security_served = shared.lock().security_served;
    if let Some(api) = path.strip_prefix("/apis/")
        && ISTIO_APIS.contains(&api)
        && security_served
    {
        respond(&mut conn, 200, &istio_resources(api).to_string());
        return;
    }
    let Some(&(_, api_version, kind, _)) = RESOURCES
        .iter()
        .find(|r| r.0 == path && (!ISTIO_APIS.contains(&r.1) || security_served))
    else {
        respond_status(&mut conn, 404, "NotFound", &format!("no route {path}"));
        return;
    };
    let is_watch = params.get("watch").is_some_and(|w| w == "true" || w == "1");
    let verb = if is_watch { "watch" } else { "list" };
    let failing = {
        let mut st = shared.lock();
        *st.requests.entry((kind.to_owned(), verb)).or_default() += 1;
        st.fail_kinds.get(kind).copied().or(st.fail_with)
    };
    if let Some(code) = failing {
        let reason = if code == 503 {
            "ServiceUnavailable"
        } else {
            "InternalError"
        };
        respond_status(&mut conn, code, reason, "injected failure");
        return;
    }
    if is_watch {
        watch(shared, &mut conn, kind, &params);
    } else {
        list(shared, &mut conn, api_version, kind, &params);
    }
}

fn list(
    shared: &Shared,
    conn: &mut TcpStream,
    api_version: &str,
    kind: &str,
    params: &BTreeMap<String, String>,
) {
    let mut st = shared.lock();
    let token = params.get("continue").filter(|c| !c.is_empty());
    let (id, offset, rv, all) = match token {
        None => {
            // List items carry no apiVersion and kind, as the real server sends them.
            let all: Vec<Value> = st
                .objects
                .iter()
                .filter(|((k, _, _), _)| k == kind)
                .map(|(_, o)| {
                    let mut o = o.clone();
                    if let Some(m) = o.as_object_mut() {
                        m.remove("apiVersion");
                        m.remove("kind");
                    }
                    o
                })
                .collect();
            st.next_page_id += 1;
            (st.next_page_id, 0, st.rv, all)
        }
        Some(token) => {
            let parsed = token
                .split_once(':')
                .and_then(|(id, off)| Some((id.parse().ok()?, off.parse().ok()?)));
            let snapshot = parsed.and_then(|(id, off)| {
                let (rv, all) = st.pages.get(&id)?.clone();
                Some((id, off, rv, all))
            });
            match snapshot {
                Some(s) if s.2 >= st.compacted => s,
                _ => {
                    drop(st);
                    respond_status(
                        conn,
                        410,
                        "Expired",
                        "the provided continue parameter is too old",
                    );
                    return;
                }
            }
        }
    };
    let limit = params
        .get("limit")
        .and_then(|l| l.parse::<usize>().ok())
        .filter(|l| *l > 0)
        .unwrap_or(usize::MAX)
        .min(st.page_cap.unwrap_or(usize::MAX));
    let page: Vec<Value> = all.iter().skip(offset).take(limit).cloned().collect();
    let mut metadata = json!({"resourceVersion": rv.to_string()});
    let next = offset + page.len();
    if next < all.len() {
        metadata["continue"] = json!(format!("{id}:{next}"));
        st.pages.insert(id, (rv, all));
    } else {
        st.pages.remove(&id);
    }
    drop(st);
    let body = json!({
        "apiVersion": api_version,
        "kind": format!("{kind}List"),
        "metadata": metadata,
        "items": page,
    });
    respond(conn, 200, &body.to_string());
}

fn watch(shared: &Shared, conn: &mut TcpStream, kind: &str, params: &BTreeMap<String, String>) {
    let since = params.get("resourceVersion").map(String::as_str);
    let bookmarks = params
        .get("allowWatchBookmarks")
        .is_some_and(|b| b == "true");
    let timeout = params
        .get("timeoutSeconds")
        .and_then(|t| t.parse().ok())
        .map_or(Duration::from_secs(300), Duration::from_secs);
    let deadline = Instant::now() + timeout;
    let header = "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n";
    let mut st = shared.lock();
    // "0": every current object first, as ADDED; none: from now; N: every change after N.
    let mut initial = Vec::new();
    let since = match since.filter(|v| !v.is_empty()) {
        None => st.rv,
        Some("0") => {
            initial = st
                .objects
                .iter()
                .filter(|((k, _, _), _)| k == kind)
                .map(|(_, o)| json!({"type": "ADDED", "object": o}))
                .collect();
            st.rv
        }
        Some(v) => v.parse::<u64>().unwrap_or(0),
    };
    if since < st.compacted && st.gone_as_http {
        drop(st);
        respond_status(conn, 410, "Expired", "too old resource version");
        return;
    }
    if conn.write_all(header.as_bytes()).is_err() {
        return;
    }
    if since < st.compacted {
        drop(st);
        let status = status_body(410, "Expired", "too old resource version");
        let _ = chunk(conn, &json!({"type": "ERROR", "object": status}));
        let _ = conn.write_all(b"0\r\n\r\n");
        return;
    }
    let epoch = st.epoch;
    let mut sent = since;
    if !initial.is_empty() {
        drop(st);
        for e in &initial {
            if chunk(conn, e).is_err() {
                return;
            }
        }
        st = shared.lock();
    }
    let mut last_bookmark = Instant::now();
    loop {
        if st.epoch != epoch || shared.stop.load(Ordering::Acquire) {
            // Cut without the final chunk: the client sees a broken stream.
            drop(st);
            let _ = conn.shutdown(Shutdown::Both);
            return;
        }
        let events: Vec<Value> = st
            .history
            .iter()
            .filter(|(rv, k, _, _)| *rv > sent && k == kind)
            .map(|(_, _, t, o)| json!({"type": t, "object": o}))
            .collect();
        sent = sent.max(st.rv);
        let bookmark = bookmarks && last_bookmark.elapsed() >= BOOKMARK_EVERY;
        let rv = st.rv;
        drop(st);
        for e in &events {
            if chunk(conn, e).is_err() {
                return;
            }
        }
        if bookmark {
            last_bookmark = Instant::now();
            let (_, api_version, _, _) = resource_of_kind(kind);
            let b = json!({"type": "BOOKMARK", "object": {
                "apiVersion": api_version, "kind": kind,
                "metadata": {"resourceVersion": rv.to_string()}}});
            if chunk(conn, &b).is_err() {
                return;
            }
        }
        if Instant::now() >= deadline {
            let _ = conn.write_all(b"0\r\n\r\n");
            return;
        }
        st = shared.lock();
        if st.rv == sent && st.epoch == epoch {
            st = shared
                .changed
                .wait_timeout(st, BOOKMARK_EVERY)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }
}

fn chunk(conn: &mut TcpStream, value: &Value) -> std::io::Result<()> {
    let mut line = value.to_string();
    line.push('\n');
    write!(conn, "{:x}\r\n{line}\r\n", line.len())?;
    conn.flush()
}

fn status_body(code: u16, reason: &str, message: &str) -> Value {
    json!({
        "apiVersion": "v1", "kind": "Status", "metadata": {},
        "status": "Failure", "message": message, "reason": reason, "code": code,
    })
}

fn respond_status(conn: &mut TcpStream, code: u16, reason: &str, message: &str) {
    respond(conn, code, &status_body(code, reason, message).to_string());
}

fn respond(conn: &mut TcpStream, code: u16, body: &str) {
    let text = match code {
        200 => "OK",
        404 => "Not Found",
        410 => "Gone",
        500 => "Internal Server Error",
        503 => "Service Unavailable",
        _ => "Error",
    };
    let _ = write!(
        conn,
        "HTTP/1.1 {code} {text}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    let _ = conn.flush();
    let _ = conn.shutdown(Shutdown::Write);
}

/// Percent-decoding of a query value.
fn decode(v: &str) -> String {
    let bytes = v.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'%' if i + 2 < bytes.len() => {
                let hex = std::str::from_utf8(&bytes[i + 1..i + 3]).unwrap_or("");
                if let Ok(b) = u8::from_str_radix(hex, 16) {
                    out.push(b);
                    i += 3;
                    continue;
                }
                out.push(b'%');
            }
            b'+' => out.push(b' '),
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

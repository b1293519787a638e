//! An in-process stand-in for the Kubernetes API server, for tests of code that lists and
//! watches Kubernetes objects (kube-rs `Api`, `watcher`, `reflector`).
//!
//! [`FakeApiServer`] speaks plain HTTP/1.1 on `127.0.0.1` from its own thread with its own tokio
//! runtime, so sync and async tests can both drive it. It stores real Kubernetes JSON objects
//! (`serde_json::Value`) and serves them the way the API server does for the resources in
//! [`RESOURCES`]:
//!
//! * **list** (`GET /api/v1/pods`, `/api/v1/namespaces/{ns}/pods`, `/apis/{group}/{version}/…`):
//!   a `{Kind}List` with `metadata.resourceVersion`; `labelSelector` (`k=v`, `k==v`, `k!=v`, `k`,
//!   `!k`, `k in (a,b)`, `k notin (a,b)`), `fieldSelector` (`path=v`, `path!=v` on any dotted
//!   field path such as `metadata.name` or `spec.nodeName`), `limit` + `continue` pagination over
//!   a consistent snapshot (the snapshot is rebuilt from the event history; an expired one is 410
//!   Gone), and `resourceVersion` + `resourceVersionMatch=Exact`.
//! * **watch** (`watch=true`): a chunked stream of one JSON event per line. `resourceVersion`
//!   unset or `"0"` starts with the current objects as `ADDED`; a resource version resumes by
//!   replaying the history after it, or gets one `ERROR` event with a 410 `Expired` Status when it
//!   is older than the last [`FakeApiServer::compact`]. `allowWatchBookmarks`, `timeoutSeconds`
//!   (clean end) and `sendInitialEvents` (streaming lists, ending with the
//!   `k8s.io/initial-events-end` bookmark) are honoured. An object that stops (starts) matching a
//!   watch's selectors is sent to it as `DELETED` (`ADDED`).
//! * **single objects**: `GET`, `POST` (201, or 409 `AlreadyExists`), `PUT` (404 if absent, 409
//!   `Conflict` on a stale `resourceVersion`) and `DELETE` on every resource; errors are `Status`
//!   objects with the matching HTTP status. `GET /version` answers too.
//! * **the `/status` subresource**: `GET`, and `PUT` that takes only `status` from the body (409
//!   on a stale `resourceVersion`; `generation` unchanged), as route status writers use it.
//!
//! Tests change the world through [`FakeApiServer::apply`] / [`FakeApiServer::delete`], inject
//! faults ([`FakeApiServer::fail_next`], [`FakeApiServer::drop_watches`],
//! [`FakeApiServer::compact`]), line up races ([`FakeApiServer::hold`]) and inspect the request
//! log ([`FakeApiServer::requests`]).
//!
//! It does **not** model: authentication or authorization (every request is allowed, the
//! kubeconfig from [`FakeApiServer::kubeconfig`] has no credentials), TLS, admission (no
//! defaulting or validation beyond names and kinds), server-side apply and patches, subresources
//! other than `/status` (`/log`, …), `generateName`, finalizers and graceful deletion, discovery (`/api`,
//! `/apis`), protobuf, HTTP/2, and periodic bookmarks (only [`FakeApiServer::bookmark`] sends
//! them). Unlike the real server, [`FakeApiServer::apply`] of an unchanged object still bumps the
//! resource version and emits `MODIFIED`. Field selectors accept any field path (the real server
//! rejects unsupported ones).
//!
//! Channels are bounded: a watch whose client falls more than [`WATCH_BUFFER`] events behind
//! (beyond what the socket buffers hold) is closed abruptly, which a client treats like a dropped
//! connection (it resumes from its last resource version, losing nothing). A test that applies
//! more than [`WATCH_BUFFER`] matching objects in one tight loop can trigger that for a healthy
//! watch too, since the server thread may not have run in between. The event history keeps the
//! last [`MAX_HISTORY`] events.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::Context as _;
use bytes::Bytes;
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, Full};
use hyper::body::{Body, Frame, Incoming};
use hyper::{Method, Response, StatusCode};
use hyper_util::rt::TokioIo;
use serde_json::{json, Value};
use tokio::sync::{mpsc, oneshot};

/// Events buffered per watch before a slow watch is closed.
pub const WATCH_BUFFER: usize = 1024;
/// Events kept for resuming watches; older ones are compacted away automatically.
pub const MAX_HISTORY: usize = 100_000;

/// A served resource: `plural` under `group_version` holds objects of `kind`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Resource {
    /// `v1` for core, otherwise `group/version`: the objects' `apiVersion`.
    pub group_version: &'static str,
    pub plural: &'static str,
    pub kind: &'static str,
    pub namespaced: bool,
}

/// The resources served (add a line to serve another).
pub const RESOURCES: &[Resource] = &[
    Resource {
        group_version: "v1",
        plural: "namespaces",
        kind: "Namespace",
        namespaced: false,
    },
    Resource {
        group_version: "v1",
        plural: "pods",
        kind: "Pod",
        namespaced: true,
    },
    Resource {
        group_version: "v1",
        plural: "services",
        kind: "Service",
        namespaced: true,
    },
    Resource {
        group_version: "v1",
        plural: "secrets",
        kind: "Secret",
        namespaced: true,
    },
    Resource {
        group_version: "discovery.k8s.io/v1",
        plural: "endpointslices",
        kind: "EndpointSlice",
        namespaced: true,
    },
    Resource {
        group_version: "security.istio.io/v1",
        plural: "peerauthentications",
        kind: "PeerAuthentication",
        namespaced: true,
    },
    Resource {
        group_version: "security.istio.io/v1",
        plural: "authorizationpolicies",
        kind: "AuthorizationPolicy",
        namespaced: true,
    },
    Resource {
        group_version: "gateway.networking.k8s.io/v1",
        plural: "gateways",
        kind: "Gateway",
        namespaced: true,
    },
    Resource {
        group_version: "gateway.networking.k8s.io/v1",
        plural: "httproutes",
        kind: "HTTPRoute",
        namespaced: true,
    },
    Resource {
        group_version: "networking.istio.io/v1",
        plural: "virtualservices",
        kind: "VirtualService",
        namespaced: true,
    },
    Resource {
        group_version: "networking.istio.io/v1",
        plural: "destinationrules",
        kind: "DestinationRule",
        namespaced: true,
    },
];

fn resource_by_plural(group_version: &str, plural: &str) -> Option<&'static Resource> {
    RESOURCES
        .iter()
        .find(|r| r.group_version == group_version && r.plural == plural)
}

fn resource_by_kind(api_version: &str, kind: &str) -> Option<&'static Resource> {
    RESOURCES
        .iter()
        .find(|r| r.group_version == api_version && r.kind == kind)
}

/// One logged HTTP request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Request {
    pub method: String,
    pub path: String,
    /// The raw (still percent-encoded) query string, `""` when there is none.
    pub query: String,
    /// `watch=true` or `watch=1`.
    pub watch: bool,
    /// The `resourceVersion` parameter, if sent.
    pub resource_version: Option<String>,
}

impl Request {
    /// A decoded query parameter (the first one with that name).
    pub fn param(&self, name: &str) -> Option<String> {
        parse_query(&self.query)
            .into_iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v)
    }

    /// A list: a `GET` of a collection (not a watch, not a single object).
    pub fn is_list(&self) -> bool {
        self.method == "GET"
            && !self.watch
            && matches!(route(&self.path), Some(Target::Collection { .. }))
    }
}

/// The fake API server; see the [module docs](self). Dropping it stops its thread and closes
/// every connection.
pub struct FakeApiServer {
    url: String,
    state: Arc<Mutex<State>>,
    handle: tokio::runtime::Handle,
    stop: Option<oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl FakeApiServer {
    /// Starts a server listening on `127.0.0.1:0`.
    pub fn start() -> anyhow::Result<FakeApiServer> {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").context("bind 127.0.0.1:0")?;
        let url = format!("http://{}", listener.local_addr()?);
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .context("tokio runtime")?;
        let handle = runtime.handle().clone();
        let (stop, stopped) = oneshot::channel::<()>();
        let thread = std::thread::Builder::new()
            .name("fake-apiserver".into())
            .spawn(move || {
                runtime.block_on(async {
                    let _ = stopped.await;
                });
                // Dropping the runtime drops every task: listeners and connections close.
                drop(runtime);
            })
            .context("spawn fake-apiserver thread")?;
        let server = FakeApiServer {
            url,
            state: Arc::new(Mutex::new(State::new())),
            handle,
            stop: Some(stop),
            thread: Some(thread),
        };
        server.serve_listener(listener)?;
        Ok(server)
    }

    /// `http://127.0.0.1:PORT` of the listener made by [`FakeApiServer::start`].
    pub fn url(&self) -> String {
        self.url.clone()
    }

    /// Also serves on `l` (for example a listener bound inside a network namespace).
    pub fn serve_listener(&self, l: std::net::TcpListener) -> anyhow::Result<()> {
        l.set_nonblocking(true)?;
        let listener = {
            let _guard = self.handle.enter();
            tokio::net::TcpListener::from_std(l).context("register listener")?
        };
        self.handle
            .spawn(accept_loop(listener, Arc::clone(&self.state)));
        Ok(())
    }

    /// A kubeconfig with one cluster (`server: url`, no TLS), one user without credentials and
    /// one context (namespace `default`) that is the current context.
    pub fn kubeconfig(url: &str) -> String {
        format!(
            "apiVersion: v1
kind: Config
clusters:
- name: fake
  cluster:
    server: {url}
users:
- name: fake
  user: {{}}
contexts:
- name: fake
  context:
    cluster: fake
    user: fake
    namespace: default
current-context: fake
preferences: {{}}
"
        )
    }

    /// Creates or replaces `obj` (keyed by apiVersion, kind, namespace and name) and emits `ADDED`
    /// or `MODIFIED`. Sets `metadata.uid` (kept on replace), `metadata.resourceVersion`,
    /// `metadata.creationTimestamp` (kept on replace) and `metadata.generation` (bumped when
    /// anything outside `metadata` and `status` changed); a namespaced object without a namespace
    /// goes to `default`. Returns the stored object. Panics on an object without apiVersion, kind
    /// or metadata.name.
    pub fn apply(&self, obj: Value) -> Value {
        let mut st = self.lock();
        match st.apply(obj) {
            Ok(stored) => (*stored).clone(),
            Err(e) => panic!("FakeApiServer::apply: {e}"),
        }
    }

    /// Deletes an object and emits `DELETED` (with a new resourceVersion). False if absent.
    pub fn delete(
        &self,
        api_version: &str,
        kind: &str,
        namespace: Option<&str>,
        name: &str,
    ) -> bool {
        let key = Key::new(api_version, kind, namespace, name);
        self.lock().delete(&key).is_some()
    }

    /// The stored object, if any.
    pub fn get(
        &self,
        api_version: &str,
        kind: &str,
        namespace: Option<&str>,
        name: &str,
    ) -> Option<Value> {
        let key = Key::new(api_version, kind, namespace, name);
        self.lock().objects.get(&key).map(|o| (**o).clone())
    }

    /// Forgets the event history: watches (and `continue` tokens) that resume from a resource
    /// version older than the current one get 410 Gone. Open watches are not affected.
    pub fn compact(&self) {
        let mut st = self.lock();
        st.history.clear();
        st.floor = st.rv;
    }

    /// Abruptly closes every open watch connection (no final chunk); clients must reconnect.
    pub fn drop_watches(&self) {
        self.lock().watches.clear();
    }

    /// Sends a `BOOKMARK` at the current resource version to every open watch that set
    /// `allowWatchBookmarks=true`.
    pub fn bookmark(&self) {
        let mut st = self.lock();
        let rv = st.rv;
        let mut dead = Vec::new();
        for (id, w) in &st.watches {
            if w.bookmarks {
                let line = bookmark_line(&w.filter, rv, false);
                if w.tx.try_send(line).is_err() {
                    dead.push(*id);
                }
            }
        }
        for id in dead {
            st.watches.remove(&id);
        }
    }

    /// Every request received so far, oldest first.
    pub fn requests(&self) -> Vec<Request> {
        self.lock().requests.clone()
    }

    /// Number of watch streams currently registered (not yet ended, dropped or closed).
    pub fn open_watches(&self) -> usize {
        self.lock().watches.len()
    }

    /// The next `count` requests whose path starts with `path_prefix` get a `Status` error with
    /// HTTP status `status` (429 also carries `Retry-After: 1`).
    pub fn fail_next(&self, path_prefix: &str, status: u16, count: usize) {
        self.lock().failures.push(FailRule {
            prefix: path_prefix.to_string(),
            status,
            remaining: count,
        });
    }

    /// Holds every request with `method` whose path starts with `path_prefix` (logged in
    /// [`FakeApiServer::requests`] on arrival, answered only after [`FakeApiServer::release`]),
    /// to line up a race deterministically: e.g. hold `POST`s until several clients have all
    /// sent theirs. One gate at a time; a new call replaces the previous (releasing it).
    pub fn hold(&self, method: &str, path_prefix: &str) {
        let (open, _) = tokio::sync::watch::channel(false);
        let previous = self.lock().gate.replace(Gate {
            method: method.to_string(),
            prefix: path_prefix.to_string(),
            held: 0,
            open,
        });
        if let Some(g) = previous {
            g.open.send_replace(true);
        }
    }

    /// How many requests the gate of [`FakeApiServer::hold`] has held so far.
    pub fn held(&self) -> usize {
        self.lock().gate.as_ref().map_or(0, |g| g.held)
    }

    /// Answers the held requests (in the order they are then scheduled) and holds no more.
    pub fn release(&self) {
        if let Some(g) = self.lock().gate.take() {
            g.open.send_replace(true);
        }
    }

    /// How many `PUT .../status` requests were applied.
    pub fn status_writes(&self) -> u64 {
        self.lock().status_writes
    }

    /// The current (latest) resource version.
    pub fn resource_version(&self) -> u64 {
        self.lock().rv
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        lock(&self.state)
    }
}

impl Drop for FakeApiServer {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

fn lock(state: &Mutex<State>) -> MutexGuard<'_, State> {
    state.lock().unwrap_or_else(|e| e.into_inner())
}

// ---------------------------------------------------------------------------------------------
// State

#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
struct Key {
    api_version: String,
    kind: String,
    /// `""` for cluster-scoped objects.
    namespace: String,
    name: String,
}

impl Key {
    fn new(api_version: &str, kind: &str, namespace: Option<&str>, name: &str) -> Key {
        Key {
            api_version: api_version.to_string(),
            kind: kind.to_string(),
            namespace: namespace.unwrap_or("").to_string(),
            name: name.to_string(),
        }
    }

    fn of(obj: &Value) -> Key {
        let s = |p: &str| obj.pointer(p).and_then(Value::as_str).unwrap_or("");
        Key::new(
            s("/apiVersion"),
            s("/kind"),
            Some(s("/metadata/namespace")),
            s("/metadata/name"),
        )
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum EventType {
    Added,
    Modified,
    Deleted,
}

struct HistEvent {
    rv: u64,
    ty: EventType,
    /// The object before the change (None for ADDED).
    prev: Option<Arc<Value>>,
    /// The object after the change; for DELETED the removed object with the new RV.
    obj: Arc<Value>,
}

struct WatchEntry {
    filter: Filter,
    bookmarks: bool,
    tx: mpsc::Sender<Bytes>,
}

struct FailRule {
    prefix: String,
    status: u16,
    remaining: usize,
}

struct State {
    rv: u64,
    objects: BTreeMap<Key, Arc<Value>>,
    history: VecDeque<HistEvent>,
    /// History covers every event after `floor`: resuming from an RV below it is 410 Gone.
    floor: u64,
    watches: HashMap<u64, WatchEntry>,
    next_watch: u64,
    requests: Vec<Request>,
    failures: Vec<FailRule>,
    /// Requests held back until released (see [`FakeApiServer::hold`]).
    gate: Option<Gate>,
    uid_state: u64,
    /// `PUT .../status` requests answered 200.
    status_writes: u64,
}

/// Holds requests with `method` whose path starts with `prefix` until opened.
struct Gate {
    method: String,
    prefix: String,
    held: usize,
    open: tokio::sync::watch::Sender<bool>,
}

impl State {
    fn new() -> State {
        let seed = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(0);
        State {
            rv: 1,
            objects: BTreeMap::new(),
            history: VecDeque::new(),
            floor: 1,
            watches: HashMap::new(),
            next_watch: 1,
            requests: Vec::new(),
            failures: Vec::new(),
            gate: None,
            status_writes: 0,
            uid_state: seed ^ (std::process::id() as u64).rotate_left(32),
        }
    }

    fn new_uid(&mut self) -> String {
        let a = splitmix64(&mut self.uid_state);
        let b = splitmix64(&mut self.uid_state);
        format!(
            "{:08x}-{:04x}-4{:03x}-{:04x}-{:012x}",
            a >> 32,
            (a >> 16) & 0xffff,
            a & 0xfff,
            0x8000 | (b >> 48) & 0x3fff,
            b & 0xffff_ffff_ffff
        )
    }

    /// Create or replace.
    fn apply(&mut self, mut obj: Value) -> Result<Arc<Value>, String> {
        let map = obj.as_object_mut().ok_or("object is not a JSON object")?;
        let api_version = map
            .get("apiVersion")
            .and_then(Value::as_str)
            .filter(|s| !s.is_empty())
            .ok_or("missing apiVersion")?
            .to_string();
        let kind = map
            .get("kind")
            .and_then(Value::as_str)
            .filter(|s| !s.is_empty())
            .ok_or("missing kind")?
            .to_string();
        let meta = map
            .entry("metadata")
            .or_insert_with(|| json!({}))
            .as_object_mut()
            .ok_or("metadata is not an object")?;
        if meta
            .get("name")
            .and_then(Value::as_str)
            .is_none_or(str::is_empty)
        {
            return Err(format!("{kind} without metadata.name"));
        }
        match resource_by_kind(&api_version, &kind) {
            Some(r) if !r.namespaced => {
                meta.remove("namespace");
            }
            Some(_) => {
                let ns = meta.get("namespace").and_then(Value::as_str);
                if ns.is_none_or(str::is_empty) {
                    meta.insert("namespace".into(), json!("default"));
                }
            }
            None => {}
        }
        let key = Key::of(&obj);
        let prev = self.objects.get(&key).cloned();
        self.rv += 1;
        let rv = self.rv;
        let uid = match prev.as_deref().and_then(|p| p.pointer("/metadata/uid")) {
            Some(uid) => uid.clone(),
            None => json!(self.new_uid()),
        };
        let created = match prev
            .as_deref()
            .and_then(|p| p.pointer("/metadata/creationTimestamp"))
        {
            Some(t) => t.clone(),
            None => json!(now_rfc3339()),
        };
        let generation = match prev.as_deref() {
            None => 1,
            Some(p) => {
                let old = p
                    .pointer("/metadata/generation")
                    .and_then(Value::as_i64)
                    .unwrap_or(1);
                if without_meta_status(p) == without_meta_status(&obj) {
                    old
                } else {
                    old + 1
                }
            }
        };
        let meta = obj["metadata"].as_object_mut().expect("metadata checked");
        meta.insert("uid".into(), uid);
        meta.insert("resourceVersion".into(), json!(rv.to_string()));
        meta.insert("creationTimestamp".into(), created);
        meta.insert("generation".into(), json!(generation));
        let obj = Arc::new(obj);
        self.objects.insert(key, Arc::clone(&obj));
        let ty = if prev.is_some() {
            EventType::Modified
        } else {
            EventType::Added
        };
        self.record(ty, prev, Arc::clone(&obj));
        Ok(obj)
    }

    fn delete(&mut self, key: &Key) -> Option<Arc<Value>> {
        let prev = self.objects.remove(key)?;
        self.rv += 1;
        let mut obj = (*prev).clone();
        obj["metadata"]["resourceVersion"] = json!(self.rv.to_string());
        let obj = Arc::new(obj);
        self.record(EventType::Deleted, Some(prev), Arc::clone(&obj));
        Some(obj)
    }

    /// Sends the event to matching watches and appends it to the history.
    fn record(&mut self, ty: EventType, prev: Option<Arc<Value>>, obj: Arc<Value>) {
        let mut dead = Vec::new();
        for (id, w) in &self.watches {
            if let Some(t) = event_for(&w.filter, ty, prev.as_deref(), &obj) {
                if w.tx.try_send(event_line(t, &obj)).is_err() {
                    // Full (too slow) or closed: drop it, the client resumes from its last RV.
                    dead.push(*id);
                }
            }
        }
        for id in dead {
            self.watches.remove(&id);
        }
        self.history.push_back(HistEvent {
            rv: self.rv,
            ty,
            prev,
            obj,
        });
        while self.history.len() > MAX_HISTORY {
            if let Some(e) = self.history.pop_front() {
                self.floor = e.rv;
            }
        }
    }

    /// The objects as they were at resource version `rv`, or None when compacted away.
    fn snapshot(&self, rv: u64) -> Option<BTreeMap<Key, Arc<Value>>> {
        if rv < self.floor {
            return None;
        }
        let mut objects = self.objects.clone();
        for e in self.history.iter().rev().take_while(|e| e.rv > rv) {
            let key = Key::of(&e.obj);
            match &e.prev {
                Some(p) => objects.insert(key, Arc::clone(p)),
                None => objects.remove(&key),
            };
        }
        Some(objects)
    }

    /// History lines after `rv` for a watch with `filter`.
    fn replay(&self, filter: &Filter, rv: u64, out: &mut VecDeque<Bytes>) {
        let start = self.history.partition_point(|e| e.rv <= rv);
        for e in self.history.range(start..) {
            if let Some(t) = event_for(filter, e.ty, e.prev.as_deref(), &e.obj) {
                out.push_back(event_line(t, &e.obj));
            }
        }
    }
}

fn without_meta_status(v: &Value) -> Value {
    let mut v = v.clone();
    if let Some(m) = v.as_object_mut() {
        m.remove("metadata");
        m.remove("status");
    }
    v
}

fn splitmix64(state: &mut u64) -> u64 {
    *state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

fn now_rfc3339() -> String {
    let secs = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let (y, m, d) = civil_from_days((secs / 86_400) as i64);
    let rem = secs % 86_400;
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

/// Days since 1970-01-01 to (year, month, day) (H. Hinnant's algorithm).
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = if z >= 0 { z } else { z - 146_096 } / 146_097;
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m, d)
}

// ---------------------------------------------------------------------------------------------
// Selectors

#[derive(Clone, Debug)]
enum LabelReq {
    Eq(String, String),
    NotEq(String, String),
    Exists(String),
    NotExists(String),
    In(String, Vec<String>),
    NotIn(String, Vec<String>),
}

#[derive(Clone, Debug)]
struct FieldReq {
    path: String,
    value: String,
    negate: bool,
}

/// Which objects a list or watch sees.
#[derive(Clone, Debug)]
struct Filter {
    api_version: String,
    kind: String,
    namespace: Option<String>,
    labels: Vec<LabelReq>,
    fields: Vec<FieldReq>,
}

impl Filter {
    fn matches(&self, obj: &Value) -> bool {
        let s = |p: &str| obj.pointer(p).and_then(Value::as_str).unwrap_or("");
        if s("/apiVersion") != self.api_version || s("/kind") != self.kind {
            return false;
        }
        if let Some(ns) = &self.namespace {
            if s("/metadata/namespace") != ns {
                return false;
            }
        }
        let labels = obj.pointer("/metadata/labels").and_then(Value::as_object);
        let label = |k: &str| labels.and_then(|l| l.get(k)).and_then(Value::as_str);
        let labels_ok = self.labels.iter().all(|r| match r {
            LabelReq::Eq(k, v) => label(k) == Some(v.as_str()),
            LabelReq::NotEq(k, v) => label(k) != Some(v.as_str()),
            LabelReq::Exists(k) => label(k).is_some(),
            LabelReq::NotExists(k) => label(k).is_none(),
            LabelReq::In(k, vs) => label(k).is_some_and(|l| vs.iter().any(|v| v == l)),
            LabelReq::NotIn(k, vs) => !label(k).is_some_and(|l| vs.iter().any(|v| v == l)),
        });
        labels_ok
            && self
                .fields
                .iter()
                .all(|f| (field_value(obj, &f.path) == f.value) != f.negate)
    }
}

fn field_value(obj: &Value, path: &str) -> String {
    let pointer = format!("/{}", path.replace('.', "/"));
    match obj.pointer(&pointer) {
        Some(Value::String(s)) => s.clone(),
        Some(Value::Null) | None => String::new(),
        Some(v) => v.to_string(),
    }
}

/// Splits on commas outside parentheses.
fn split_terms(s: &str) -> Vec<&str> {
    let mut out = Vec::new();
    let (mut depth, mut start) = (0i32, 0);
    for (i, c) in s.char_indices() {
        match c {
            '(' => depth += 1,
            ')' => depth -= 1,
            ',' if depth == 0 => {
                out.push(&s[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    out.push(&s[start..]);
    out.into_iter()
        .map(str::trim)
        .filter(|t| !t.is_empty())
        .collect()
}

fn parse_label_selector(s: &str) -> Result<Vec<LabelReq>, String> {
    let bad = || format!("unable to parse requirement in label selector {s:?}");
    let key = |k: &str| -> Result<String, String> {
        let k = k.trim();
        if k.is_empty() || k.contains(char::is_whitespace) {
            Err(bad())
        } else {
            Ok(k.to_string())
        }
    };
    let mut reqs = Vec::new();
    for term in split_terms(s) {
        if let Some(k) = term.strip_prefix('!') {
            reqs.push(LabelReq::NotExists(key(k)?));
        } else if let Some(open) = term.find('(') {
            let (head, set) = term.split_at(open);
            let set = set
                .strip_prefix('(')
                .and_then(|x| x.strip_suffix(')'))
                .ok_or_else(bad)?;
            let values: Vec<String> = set.split(',').map(|v| v.trim().to_string()).collect();
            let head = head.trim_end();
            if let Some(k) = head.strip_suffix(" notin") {
                reqs.push(LabelReq::NotIn(key(k)?, values));
            } else if let Some(k) = head.strip_suffix(" in") {
                reqs.push(LabelReq::In(key(k)?, values));
            } else {
                return Err(bad());
            }
        } else if let Some((k, v)) = term.split_once("!=") {
            reqs.push(LabelReq::NotEq(key(k)?, v.trim().to_string()));
        } else if let Some((k, v)) = term.split_once("==") {
            reqs.push(LabelReq::Eq(key(k)?, v.trim().to_string()));
        } else if let Some((k, v)) = term.split_once('=') {
            reqs.push(LabelReq::Eq(key(k)?, v.trim().to_string()));
        } else {
            reqs.push(LabelReq::Exists(key(term)?));
        }
    }
    Ok(reqs)
}

fn parse_field_selector(s: &str) -> Result<Vec<FieldReq>, String> {
    let mut reqs = Vec::new();
    for term in split_terms(s) {
        let (path, value, negate) = if let Some((p, v)) = term.split_once("!=") {
            (p, v, true)
        } else if let Some((p, v)) = term.split_once("==") {
            (p, v, false)
        } else if let Some((p, v)) = term.split_once('=') {
            (p, v, false)
        } else {
            return Err(format!("invalid selector: {term:?}; can't understand"));
        };
        reqs.push(FieldReq {
            path: path.trim().to_string(),
            value: value.trim().to_string(),
            negate,
        });
    }
    Ok(reqs)
}

/// What a watch with `filter` sees of a change, if anything. Objects that stop (start)
/// matching are seen as DELETED (ADDED), as the real API server does.
fn event_for(
    filter: &Filter,
    ty: EventType,
    prev: Option<&Value>,
    obj: &Value,
) -> Option<&'static str> {
    match ty {
        EventType::Added => filter.matches(obj).then_some("ADDED"),
        EventType::Deleted => filter.matches(prev.unwrap_or(obj)).then_some("DELETED"),
        EventType::Modified => {
            let was = prev.is_some_and(|p| filter.matches(p));
            match (was, filter.matches(obj)) {
                (true, true) => Some("MODIFIED"),
                (false, true) => Some("ADDED"),
                (true, false) => Some("DELETED"),
                (false, false) => None,
            }
        }
    }
}

fn event_line(ty: &str, obj: &Value) -> Bytes {
    Bytes::from(format!("{{\"type\":\"{ty}\",\"object\":{obj}}}\n"))
}

fn bookmark_line(filter: &Filter, rv: u64, initial_events_end: bool) -> Bytes {
    let mut meta = json!({ "resourceVersion": rv.to_string() });
    if initial_events_end {
        meta["annotations"] = json!({ "k8s.io/initial-events-end": "true" });
    }
    let obj = json!({ "apiVersion": filter.api_version, "kind": filter.kind, "metadata": meta });
    event_line("BOOKMARK", &obj)
}

// ---------------------------------------------------------------------------------------------
// HTTP

type ApiBody = UnsyncBoxBody<Bytes, std::io::Error>;

fn full(bytes: impl Into<Bytes>) -> ApiBody {
    Full::new(bytes.into())
        .map_err(|never: Infallible| match never {})
        .boxed_unsync()
}

fn json_response(code: StatusCode, v: &Value) -> Response<ApiBody> {
    Response::builder()
        .status(code)
        .header("content-type", "application/json")
        .body(full(v.to_string()))
        .expect("valid response")
}

fn reason_for(code: u16) -> &'static str {
    match code {
        400 => "BadRequest",
        401 => "Unauthorized",
        403 => "Forbidden",
        404 => "NotFound",
        405 => "MethodNotAllowed",
        409 => "Conflict",
        410 => "Expired",
        422 => "Invalid",
        429 => "TooManyRequests",
        500 => "InternalError",
        503 => "ServiceUnavailable",
        504 => "Timeout",
        _ => "Unknown",
    }
}

fn status_value(code: u16, reason: &str, message: &str, details: Option<Value>) -> Value {
    let mut v = json!({
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": message,
        "reason": reason,
        "code": code,
    });
    if let Some(d) = details {
        v["details"] = d;
    }
    v
}

fn status_response(
    code: u16,
    reason: &str,
    message: &str,
    details: Option<Value>,
) -> Response<ApiBody> {
    let status = StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let mut resp = json_response(status, &status_value(code, reason, message, details));
    if code == 429 {
        resp.headers_mut()
            .insert("retry-after", hyper::header::HeaderValue::from_static("1"));
    }
    resp
}

fn bad_request(message: &str) -> Response<ApiBody> {
    status_response(400, "BadRequest", message, None)
}

fn not_found(res: &Resource, name: &str) -> Response<ApiBody> {
    status_response(
        404,
        "NotFound",
        &format!("{}.{} \"{name}\" not found", res.plural, group_of(res)),
        Some(json!({ "name": name, "group": group_of(res), "kind": res.plural })),
    )
}

fn group_of(res: &Resource) -> &'static str {
    res.group_version
        .rsplit_once('/')
        .map(|(g, _)| g)
        .unwrap_or("")
}

fn parse_query(q: &str) -> Vec<(String, String)> {
    q.split('&')
        .filter(|p| !p.is_empty())
        .map(|p| {
            let (k, v) = p.split_once('=').unwrap_or((p, ""));
            (percent_decode(k), percent_decode(v))
        })
        .collect()
}

fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'+' => out.push(b' '),
            b'%' if i + 2 < b.len() => {
                let hex = |c: u8| (c as char).to_digit(16);
                match (hex(b[i + 1]), hex(b[i + 2])) {
                    (Some(h), Some(l)) => {
                        out.push((h * 16 + l) as u8);
                        i += 2;
                    }
                    _ => out.push(b'%'),
                }
            }
            c => out.push(c),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

struct Params(Vec<(String, String)>);

impl Params {
    fn get(&self, name: &str) -> Option<&str> {
        self.0
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }

    fn flag(&self, name: &str) -> bool {
        matches!(self.get(name), Some("true" | "1"))
    }
}

enum Target {
    Collection {
        res: &'static Resource,
        namespace: Option<String>,
    },
    Item {
        res: &'static Resource,
        namespace: Option<String>,
        name: String,
    },
    /// The `/status` subresource of an item.
    Status {
        res: &'static Resource,
        namespace: Option<String>,
        name: String,
    },
}

fn route(path: &str) -> Option<Target> {
    let segs: Vec<&str> = path.trim_matches('/').split('/').collect();
    let (gv, rest) = match segs.as_slice() {
        ["api", "v1", rest @ ..] => ("v1".to_string(), rest),
        ["apis", g, v, rest @ ..] => (format!("{g}/{v}"), rest),
        _ => return None,
    };
    let res = |plural: &str| resource_by_plural(&gv, plural);
    match rest {
        [plural] => Some(Target::Collection {
            res: res(plural)?,
            namespace: None,
        }),
        [plural, name] => {
            let res = res(plural).filter(|r| !r.namespaced)?;
            Some(Target::Item {
                res,
                namespace: None,
                name: name.to_string(),
            })
        }
        ["namespaces", ns, plural] => Some(Target::Collection {
            res: res(plural).filter(|r| r.namespaced)?,
            namespace: Some(ns.to_string()),
        }),
        ["namespaces", ns, plural, name] => Some(Target::Item {
            res: res(plural).filter(|r| r.namespaced)?,
            namespace: Some(ns.to_string()),
            name: name.to_string(),
        }),
        [plural, name, "status"] => Some(Target::Status {
            res: res(plural).filter(|r| !r.namespaced)?,
            namespace: None,
            name: name.to_string(),
        }),
        ["namespaces", ns, plural, name, "status"] => Some(Target::Status {
            res: res(plural).filter(|r| r.namespaced)?,
            namespace: Some(ns.to_string()),
            name: name.to_string(),
        }),
        _ => None,
    }
}

async fn accept_loop(listener: tokio::net::TcpListener, state: Arc<Mutex<State>>) {
    loop {
        let stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            Err(_) => {
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        let state = Arc::clone(&state);
        tokio::spawn(async move {
            let svc = hyper::service::service_fn(move |req| handle(Arc::clone(&state), req));
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), svc)
                .await;
        });
    }
}

async fn handle(
    state: Arc<Mutex<State>>,
    req: hyper::Request<Incoming>,
) -> Result<Response<ApiBody>, Infallible> {
    let method = req.method().clone();
    let path = req.uri().path().to_string();
    let query = req.uri().query().unwrap_or("").to_string();
    let params = Params(parse_query(&query));
    let watch = params.flag("watch");
    {
        let mut st = lock(&state);
        st.requests.push(Request {
            method: method.to_string(),
            path: path.clone(),
            query: query.clone(),
            watch,
            resource_version: params.get("resourceVersion").map(str::to_string),
        });
        if let Some(rule) = st
            .failures
            .iter_mut()
            .find(|r| r.remaining > 0 && path.starts_with(&r.prefix))
        {
            rule.remaining -= 1;
            let code = rule.status;
            st.failures.retain(|r| r.remaining > 0);
            let msg = format!("injected failure {code} for {path}");
            return Ok(status_response(code, reason_for(code), &msg, None));
        }
    }
    let gate = {
        let mut st = lock(&state);
        match &mut st.gate {
            Some(g) if g.method == method.as_str() && path.starts_with(&g.prefix) => {
                g.held += 1;
                Some(g.open.subscribe())
            }
            _ => None,
        }
    };
    if let Some(mut open) = gate {
        // Released (true) or the gate dropped with the server: answer either way.
        let _ = open.wait_for(|o| *o).await;
    }
    let body = if method == Method::POST || method == Method::PUT {
        match req.into_body().collect().await {
            Ok(b) => b.to_bytes(),
            Err(e) => return Ok(bad_request(&format!("reading body: {e}"))),
        }
    } else {
        Bytes::new()
    };
    if path == "/version" {
        return Ok(json_response(StatusCode::OK, &version_info()));
    }
    let Some(target) = route(&path) else {
        return Ok(status_response(
            404,
            "NotFound",
            "the server could not find the requested resource",
            None,
        ));
    };
    let resp = match (target, method) {
        (Target::Collection { res, namespace }, Method::GET) => {
            let filter = match make_filter(res, namespace, &params) {
                Ok(f) => f,
                Err(e) => return Ok(bad_request(&e)),
            };
            if watch {
                start_watch(&state, filter, &params)
            } else {
                list(&lock(&state), res, &filter, &params)
            }
        }
        (Target::Collection { res, namespace }, Method::POST) => {
            create(&mut lock(&state), res, namespace, &body)
        }
        (
            Target::Item {
                res,
                namespace,
                name,
            },
            method,
        ) => {
            let key = Key::new(res.group_version, res.kind, namespace.as_deref(), &name);
            let mut st = lock(&state);
            match method {
                Method::GET => match st.objects.get(&key) {
                    Some(o) => json_response(StatusCode::OK, o),
                    None => not_found(res, &name),
                },
                Method::DELETE => match st.delete(&key) {
                    Some(o) => json_response(StatusCode::OK, &o),
                    None => not_found(res, &name),
                },
                Method::PUT => replace(&mut st, res, &key, &body),
                m => method_not_allowed(&m),
            }
        }
        (
            Target::Status {
                res,
                namespace,
                name,
            },
            method,
        ) => {
            let key = Key::new(res.group_version, res.kind, namespace.as_deref(), &name);
            let mut st = lock(&state);
            match method {
                Method::GET => match st.objects.get(&key) {
                    Some(o) => json_response(StatusCode::OK, o),
                    None => not_found(res, &name),
                },
                Method::PUT => replace_status(&mut st, res, &key, &body),
                m => method_not_allowed(&m),
            }
        }
        (_, m) => method_not_allowed(&m),
    };
    Ok(resp)
}

fn method_not_allowed(m: &Method) -> Response<ApiBody> {
    status_response(
        405,
        "MethodNotAllowed",
        &format!("the server does not allow this method on the requested resource: {m}"),
        None,
    )
}

fn version_info() -> Value {
    json!({
        "major": "1",
        "minor": "37",
        "gitVersion": "v1.37.0-fake",
        "gitCommit": "0000000000000000000000000000000000000000",
        "gitTreeState": "clean",
        "buildDate": "2026-01-01T00:00:00Z",
        "goVersion": "go1.25",
        "compiler": "gc",
        "platform": "linux/amd64",
    })
}

fn make_filter(
    res: &Resource,
    namespace: Option<String>,
    params: &Params,
) -> Result<Filter, String> {
    Ok(Filter {
        api_version: res.group_version.to_string(),
        kind: res.kind.to_string(),
        namespace,
        labels: parse_label_selector(params.get("labelSelector").unwrap_or(""))?,
        fields: parse_field_selector(params.get("fieldSelector").unwrap_or(""))?,
    })
}

fn parse_rv(s: &str) -> Result<u64, String> {
    s.parse()
        .map_err(|_| format!("invalid resource version: {s:?}"))
}

/// Sort key within one resource: namespace, then name.
fn pos(obj: &Value) -> (String, String) {
    let k = Key::of(obj);
    (k.namespace, k.name)
}

fn list(st: &State, res: &Resource, filter: &Filter, params: &Params) -> Response<ApiBody> {
    let expired = |what: &str| {
        status_response(
            410,
            "Expired",
            &format!(
                "{what}: the provided continue parameter or resource version is too old to \
                 display a consistent list result; start a new list"
            ),
            None,
        )
    };
    // (snapshot RV, objects at that RV, position to continue after)
    let (list_rv, snapshot, after) = if let Some(token) = params.get("continue") {
        let parsed = token.split_once(':').and_then(|(rv, pos)| {
            let (ns, name) = pos.split_once('/')?;
            Some((rv.parse::<u64>().ok()?, (ns.to_string(), name.to_string())))
        });
        let Some((rv, after)) = parsed else {
            return bad_request(&format!("invalid continue token {token:?}"));
        };
        match st.snapshot(rv) {
            Some(s) => (rv, Some(s), Some(after)),
            None => return expired("continue token too old"),
        }
    } else {
        match (
            params.get("resourceVersion"),
            params.get("resourceVersionMatch"),
        ) {
            (Some(rv), Some("Exact")) => {
                let rv = match parse_rv(rv) {
                    Ok(rv) => rv,
                    Err(e) => return bad_request(&e),
                };
                match st.snapshot(rv) {
                    Some(s) => (rv, Some(s), None),
                    None => return expired("resource version too old"),
                }
            }
            _ => (st.rv, None, None),
        }
    };
    let objects = snapshot.as_ref().unwrap_or(&st.objects);
    let limit = match params.get("limit").map(str::parse::<usize>) {
        None => 0,
        Some(Ok(l)) => l,
        Some(Err(_)) => return bad_request("invalid limit"),
    };
    let mut items: Vec<&Arc<Value>> = objects
        .values()
        .filter(|o| filter.matches(o))
        .filter(|o| after.as_ref().is_none_or(|a| pos(o) > *a))
        .collect();
    items.sort_by_key(|o| pos(o));
    let mut metadata = json!({ "resourceVersion": list_rv.to_string() });
    if limit > 0 && items.len() > limit {
        items.truncate(limit);
        let (ns, name) = pos(items[limit - 1]);
        metadata["continue"] = json!(format!("{list_rv}:{ns}/{name}"));
    }
    let items: Vec<&Value> = items.into_iter().map(|o| &**o).collect();
    let body = json!({
        "apiVersion": res.group_version,
        "kind": format!("{}List", res.kind),
        "metadata": metadata,
        "items": items,
    });
    json_response(StatusCode::OK, &body)
}

fn parse_object(body: &[u8], res: &Resource) -> Result<Value, String> {
    let mut obj: Value =
        serde_json::from_slice(body).map_err(|e| format!("invalid JSON body: {e}"))?;
    let Some(map) = obj.as_object_mut() else {
        return Err("body is not a JSON object".into());
    };
    for (field, want) in [("apiVersion", res.group_version), ("kind", res.kind)] {
        match map.get(field).and_then(Value::as_str) {
            None | Some("") => {
                map.insert(field.into(), json!(want));
            }
            Some(got) if got != want => {
                return Err(format!(
                    "the {field} of the object ({got}) does not match the path ({want})"
                ))
            }
            Some(_) => {}
        }
    }
    Ok(obj)
}

fn create(
    st: &mut State,
    res: &'static Resource,
    namespace: Option<String>,
    body: &[u8],
) -> Response<ApiBody> {
    let mut obj = match parse_object(body, res) {
        Ok(o) => o,
        Err(e) => return bad_request(&e),
    };
    if let Some(meta) = obj.get_mut("metadata").and_then(Value::as_object_mut) {
        meta.remove("resourceVersion");
        meta.remove("uid");
        meta.remove("creationTimestamp");
        meta.remove("generation");
    }
    if res.namespaced {
        let Some(ns) = namespace else {
            return method_not_allowed(&Method::POST);
        };
        match obj.pointer("/metadata/namespace").and_then(Value::as_str) {
            Some(got) if !got.is_empty() && got != ns => {
                return bad_request(&format!(
                    "the namespace of the object ({got}) does not match the namespace on the \
                     request ({ns})"
                ))
            }
            _ => {}
        }
        if obj.get("metadata").is_none_or(|m| !m.is_object()) {
            obj["metadata"] = json!({});
        }
        obj["metadata"]["namespace"] = json!(ns);
    }
    let name = obj
        .pointer("/metadata/name")
        .and_then(Value::as_str)
        .unwrap_or("")
        .to_string();
    if name.is_empty() {
        return status_response(
            422,
            "Invalid",
            &format!("{} is invalid: metadata.name: Required value", res.kind),
            None,
        );
    }
    if st.objects.contains_key(&Key::of(&obj)) {
        return status_response(
            409,
            "AlreadyExists",
            &format!("{}.{} \"{name}\" already exists", res.plural, group_of(res)),
            Some(json!({ "name": name, "group": group_of(res), "kind": res.plural })),
        );
    }
    match st.apply(obj) {
        Ok(o) => json_response(StatusCode::CREATED, &o),
        Err(e) => bad_request(&e),
    }
}

fn replace(st: &mut State, res: &'static Resource, key: &Key, body: &[u8]) -> Response<ApiBody> {
    let mut obj = match parse_object(body, res) {
        Ok(o) => o,
        Err(e) => return bad_request(&e),
    };
    let Some(current) = st.objects.get(key) else {
        return not_found(res, &key.name);
    };
    if Key::of(&obj).name != key.name {
        return bad_request("the name of the object does not match the name on the URL");
    }
    if let Some(conflict) = stale(&obj, current, res, key) {
        return conflict;
    }
    if res.namespaced {
        obj["metadata"]["namespace"] = json!(key.namespace);
    }
    match st.apply(obj) {
        Ok(o) => json_response(StatusCode::OK, &o),
        Err(e) => bad_request(&e),
    }
}

/// 409 Conflict when `sent` names a resourceVersion other than the stored object's (an
/// optimistic-concurrency write based on a stale read).
fn stale(
    sent: &Value,
    current: &Value,
    res: &'static Resource,
    key: &Key,
) -> Option<Response<ApiBody>> {
    let version = |v: &Value| {
        v.pointer("/metadata/resourceVersion")
            .and_then(Value::as_str)
            .unwrap_or("")
            .to_string()
    };
    let sent_rv = version(sent);
    if sent_rv.is_empty() || sent_rv == version(current) {
        return None;
    }
    Some(status_response(
        409,
        "Conflict",
        &format!(
            "Operation cannot be fulfilled on {}.{} \"{}\": the object has been modified; \
             please apply your changes to the latest version and try again",
            res.plural,
            group_of(res),
            key.name
        ),
        None,
    ))
}

/// `PUT .../status`: only `status` is taken from the body (the rest of the stored object stays),
/// with the same resourceVersion check as a replace; `generation` does not change.
fn replace_status(
    st: &mut State,
    res: &'static Resource,
    key: &Key,
    body: &[u8],
) -> Response<ApiBody> {
    let sent = match parse_object(body, res) {
        Ok(o) => o,
        Err(e) => return bad_request(&e),
    };
    let Some(current) = st.objects.get(key) else {
        return not_found(res, &key.name);
    };
    if let Some(conflict) = stale(&sent, current, res, key) {
        return conflict;
    }
    let mut obj = (**current).clone();
    match sent.get("status") {
        Some(status) => obj["status"] = status.clone(),
        None => {
            if let Some(m) = obj.as_object_mut() {
                m.remove("status");
            }
        }
    }
    st.status_writes += 1;
    match st.apply(obj) {
        Ok(o) => json_response(StatusCode::OK, &o),
        Err(e) => bad_request(&e),
    }
}

fn start_watch(state: &Arc<Mutex<State>>, filter: Filter, params: &Params) -> Response<ApiBody> {
    let bookmarks = params.flag("allowWatchBookmarks");
    let send_initial = params.flag("sendInitialEvents");
    let timeout = match params.get("timeoutSeconds").map(str::parse::<u64>) {
        None => None,
        Some(Ok(s)) => Some(Duration::from_secs(s)),
        Some(Err(_)) => return bad_request("invalid timeoutSeconds"),
    };
    let rv = params.get("resourceVersion").unwrap_or("");
    let mut st = lock(state);
    let mut pending = VecDeque::new();
    let mut gone = false;
    if send_initial || rv.is_empty() || rv == "0" {
        // Current (or, for sendInitialEvents with an RV, historical) state as ADDED events.
        let (base_rv, snapshot) = if rv.is_empty() || rv == "0" {
            (st.rv, None)
        } else {
            let r = match parse_rv(rv) {
                Ok(r) => r,
                Err(e) => return bad_request(&e),
            };
            (r, st.snapshot(r))
        };
        if base_rv != st.rv && snapshot.is_none() {
            pending.push_back(too_old(rv, st.floor));
            gone = true;
        } else {
            let objects = snapshot.as_ref().unwrap_or(&st.objects);
            for o in objects.values().filter(|o| filter.matches(o)) {
                pending.push_back(event_line("ADDED", o));
            }
            if send_initial && bookmarks {
                pending.push_back(bookmark_line(&filter, base_rv, true));
            }
            st.replay(&filter, base_rv, &mut pending);
        }
    } else {
        let r = match parse_rv(rv) {
            Ok(r) => r,
            Err(e) => return bad_request(&e),
        };
        if r < st.floor {
            pending.push_back(too_old(rv, st.floor));
            gone = true;
        } else {
            st.replay(&filter, r, &mut pending);
        }
    }
    let live = if gone {
        None
    } else {
        let (tx, rx) = mpsc::channel(WATCH_BUFFER);
        let id = st.next_watch;
        st.next_watch += 1;
        st.watches.insert(
            id,
            WatchEntry {
                filter,
                bookmarks,
                tx,
            },
        );
        Some((id, rx))
    };
    drop(st);
    let body = WatchBody {
        pending,
        live,
        deadline: timeout.map(|t| Box::pin(tokio::time::sleep(t))),
        state: Arc::clone(state),
        done: false,
    };
    Response::builder()
        .status(StatusCode::OK)
        .header("content-type", "application/json")
        .body(body.boxed_unsync())
        .expect("valid response")
}

fn too_old(rv: &str, floor: u64) -> Bytes {
    let status = status_value(
        410,
        "Expired",
        &format!("too old resource version: {rv} ({floor})"),
        None,
    );
    event_line("ERROR", &status)
}

/// The body of a watch response: initial/replayed lines, then live events until the timeout
/// (clean end) or until the server drops the watch (abrupt end: an error makes hyper close the
/// connection without the final chunk).
struct WatchBody {
    pending: VecDeque<Bytes>,
    live: Option<(u64, mpsc::Receiver<Bytes>)>,
    deadline: Option<Pin<Box<tokio::time::Sleep>>>,
    state: Arc<Mutex<State>>,
    done: bool,
}

impl WatchBody {
    fn unregister(&mut self) {
        if let Some((id, _)) = self.live.take() {
            lock(&self.state).watches.remove(&id);
        }
    }
}

impl Body for WatchBody {
    type Data = Bytes;
    type Error = std::io::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, std::io::Error>>> {
        let this = self.get_mut();
        if this.done {
            return Poll::Ready(None);
        }
        if let Some(line) = this.pending.pop_front() {
            return Poll::Ready(Some(Ok(Frame::data(line))));
        }
        if let Some(deadline) = &mut this.deadline {
            if deadline.as_mut().poll(cx).is_ready() {
                this.done = true;
                this.unregister();
                return Poll::Ready(None);
            }
        }
        let Some((_, rx)) = &mut this.live else {
            this.done = true;
            return Poll::Ready(None);
        };
        match rx.poll_recv(cx) {
            Poll::Ready(Some(line)) => Poll::Ready(Some(Ok(Frame::data(line)))),
            Poll::Ready(None) => {
                this.done = true;
                Poll::Ready(Some(Err(std::io::Error::new(
                    std::io::ErrorKind::ConnectionAborted,
                    "watch closed by the server",
                ))))
            }
            Poll::Pending => Poll::Pending,
        }
    }
}

impl Drop for WatchBody {
    fn drop(&mut self) {
        self.unregister();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn civil_dates() {
        assert_eq!(civil_from_days(0), (1970, 1, 1));
        assert_eq!(civil_from_days(19_723), (2024, 1, 1));
        assert_eq!(civil_from_days(19_782), (2024, 2, 29));
    }

    #[test]
    fn label_selectors() {
        let pod = json!({"apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": "a", "namespace": "x", "labels": {"app": "web", "tier": "1"}}});
        let f = |sel: &str| Filter {
            api_version: "v1".into(),
            kind: "Pod".into(),
            namespace: None,
            labels: parse_label_selector(sel).unwrap(),
            fields: vec![],
        };
        for (sel, want) in [
            ("", true),
            ("app=web", true),
            ("app==web,tier", true),
            ("app!=web", false),
            ("app!=db", true),
            ("missing", false),
            ("!missing", true),
            ("app in (db, web),tier notin (2)", true),
            ("app notin (web)", false),
        ] {
            assert_eq!(f(sel).matches(&pod), want, "{sel}");
        }
        assert!(parse_label_selector("app in web").is_err());
    }

    #[test]
    fn query_decoding() {
        assert_eq!(percent_decode("a%3Db%2Cc+d%"), "a=b,c d%");
        assert_eq!(
            parse_query("watch=true&labelSelector=app%3Dweb"),
            vec![
                ("watch".to_string(), "true".to_string()),
                ("labelSelector".to_string(), "app=web".to_string())
            ]
        );
    }
}

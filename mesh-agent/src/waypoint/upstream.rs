//! Upstream HTTP connections of the waypoint: each is an HTTP/1.1 or HTTP/2 client connection
//! carried in an HBONE tunnel the waypoint opens with its own identity, pooled per (backend
//! address, protocol) and reused across downstream requests and connections.
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::combinators::BoxBody;
use hyper::body::Incoming;
use hyper::client::conn::TrySendError;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::sync::Notify;

use super::telemetry::{ResponseFlag, UpstreamInfo};
use crate::model::Workload;
use crate::proxy::{Detected, Local, Proxy, Upstream};
use crate::state::State;
use crate::telemetry::EndpointLabels;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;

pub type Body = BoxBody<Bytes, hyper::Error>;

/// How long a request waiting for a connection sleeps before it looks again.
const RECHECK: Duration = Duration::from_millis(5);

/// Idle upstream connections kept per backend.
const MAX_IDLE_PER_BACKEND: usize = 64;

/// A pool key: the address dialed (a service VIP and port, or a workload address) and the
/// protocol spoken on it.
pub type Key = (SocketAddr, Detected);

/// A pooled upstream connection and where it goes (for the request metrics and access log).
struct Conn {
    sender: Sender,
    upstream: Arc<UpstreamInfo>,
    /// Requests it carried.
    served: u32,
    /// When it was last put back.
    idle_since: Instant,
    /// Its endpoint's requests-in-flight gauge.
    requests: Option<Gauge>,
}

impl Conn {
    fn new(sender: Sender, upstream: Arc<UpstreamInfo>, requests: Option<Gauge>) -> Conn {
        Conn {
            sender,
            upstream,
            served: 0,
            idle_since: Instant::now(),
            requests,
        }
    }
}

/// Counts one connection of a backend as open until dropped (when the connection ends, or its
/// opening failed).
struct OpenGuard {
    backends: Backends,
    key: Key,
}

impl OpenGuard {
    /// Counts one more connection of `key`, whatever the limit (a replacement for one that
    /// closed under a request).
    fn count(backends: &Backends, key: Key) -> OpenGuard {
        lock(backends).entry(key).or_default().open += 1;
        OpenGuard {
            backends: backends.clone(),
            key,
        }
    }
}

impl Drop for OpenGuard {
    fn drop(&mut self) {
        if let Some(b) = lock(&self.backends).get_mut(&self.key) {
            b.open = b.open.saturating_sub(1);
            b.freed.notify_one();
        }
    }
}

/// Counts one request in flight to a backend until dropped.
pub struct ActiveGuard {
    backends: Backends,
    key: Key,
}

impl Drop for ActiveGuard {
    fn drop(&mut self) {
        if let Some(b) = lock(&self.backends).get_mut(&self.key) {
            b.active = b.active.saturating_sub(1);
            // An HTTP/1 connection is free again when its response has ended.
            b.freed.notify_one();
        }
    }
}

/// Counts one request waiting for a connection until dropped.
struct PendingGuard {
    backends: Backends,
    key: Key,
}

impl Drop for PendingGuard {
    fn drop(&mut self) {
        if let Some(b) = lock(&self.backends).get_mut(&self.key) {
            b.pending = b.pending.saturating_sub(1);
        }
    }
}

/// A response body that holds its request's place among those in flight until it ends or is
/// dropped.
pub struct Tracked {
    inner: Incoming,
    active: Option<(ActiveGuard, Option<Held>)>,
}

fn track(response: Response<Incoming>, active: (ActiveGuard, Option<Held>)) -> Response<Tracked> {
    response.map(|inner| Tracked {
        inner,
        active: Some(active),
    })
}

impl hyper::body::Body for Tracked {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<hyper::body::Frame<Bytes>, hyper::Error>>> {
        let polled = std::pin::Pin::new(&mut self.inner).poll_frame(cx);
        if matches!(polled, std::task::Poll::Ready(None | Some(Err(_)))) {
            self.active = None;
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        self.inner.size_hint()
    }
}

/// One upstream HTTP connection's sending half.
enum Sender {
    H1(hyper::client::conn::http1::SendRequest<Body>),
    H2(hyper::client::conn::http2::SendRequest<Body>),
}

impl Sender {
    fn is_ready(&self) -> bool {
        match self {
            Sender::H1(s) => s.is_ready(),
            Sender::H2(s) => s.is_ready(),
        }
    }

    fn is_closed(&self) -> bool {
        match self {
            Sender::H1(s) => s.is_closed(),
            Sender::H2(s) => s.is_closed(),
        }
    }

    /// Sends `req`; a request the connection never started sending comes back in the error.
    async fn try_send(
        &mut self,
        req: Request<Body>,
    ) -> Result<Response<Incoming>, TrySendError<Request<Body>>> {
        match self {
            Sender::H1(s) => s.try_send_request(req).await,
            Sender::H2(s) => s.try_send_request(req).await,
        }
    }
}

/// Why a request got no response from upstream.
#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    /// No connection could be opened (Envoy's response flag `UF`, or `UH`/`UO`, in the error).
    #[error("upstream connect error: {0}")]
    Connect(String, ResponseFlag),
    /// The connection failed while the request was on it (`UC`).
    #[error("upstream connection terminated: {0}")]
    Reset(String),
    /// A circuit-breaker limit was reached (`UO`): the request was not sent.
    #[error("upstream overflow: {0}")]
    Overflow(String),
    /// The upstream refused the HTTP/2 stream (`REFUSED_STREAM`): it did not process the
    /// request.
    #[error("upstream refused the stream: {0}")]
    Refused(String),
}

/// The error of a request that went out on a connection and got no response.
fn reset(e: &hyper::Error) -> UpstreamError {
    let mut cause: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(c) = cause {
        if let Some(h2) = c.downcast_ref::<h2::Error>() {
            if h2.reason() == Some(h2::Reason::REFUSED_STREAM) {
                return UpstreamError::Refused(e.to_string());
            }
        }
        cause = c.source();
    }
    UpstreamError::Reset(e.to_string())
}

/// How a request reaches its backend: the limits it is held to and, when the caller chose one,
/// the endpoint.
#[derive(Clone, Copy)]
pub struct Via<'a> {
    pub limits: &'a Limits,
    pub endpoint: Option<Endpoint<'a>>,
}

/// A Service endpoint the caller chose for a request.
#[derive(Clone, Copy)]
pub struct Endpoint<'a> {
    pub workload: &'a Workload,
    /// Its address and target port.
    pub addr: SocketAddr,
    /// The most time the connection may take (`connectionPool.tcp.connectTimeout`).
    pub connect_timeout: Duration,
}

/// Circuit-breaker limits of one backend (a DestinationRule's `connectionPool`, as Envoy applies
/// it per upstream cluster); `None`: no limit. Past a limit a request fails at once with 503 and
/// the flag `UO`; nothing queues beyond `max_pending`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Limits {
    /// `tcp.maxConnections`: connections open to the backend at once.
    pub max_connections: Option<u32>,
    /// `http.http1MaxPendingRequests`: requests waiting for a connection when none may be
    /// opened.
    pub max_pending: Option<u32>,
    /// `http.http2MaxRequests`: requests in flight to the backend (every protocol, as Envoy
    /// counts them).
    pub max_requests: Option<u32>,
    /// `http.maxRequestsPerConnection`: requests a connection carries before it is closed.
    pub max_requests_per_connection: Option<u32>,
    /// `http.idleTimeout`: a connection idle this long is closed.
    pub idle_timeout: Option<Duration>,
}

/// One backend's connections and counts.
#[derive(Default)]
struct Backend {
    idle: Vec<Conn>,
    /// Connections open (idle or busy) or being opened.
    open: u32,
    /// Requests in flight: sent, or waiting, until their response body ends.
    active: u32,
    /// Requests waiting for a connection.
    pending: u32,
    /// Woken when a connection may have become free or a slot opened.
    freed: Arc<Notify>,
}

type Backends = Arc<Mutex<HashMap<Key, Backend>>>;

/// The pool of upstream connections, with per-backend limits.
#[derive(Default)]
pub struct Pool {
    backends: Backends,
    gauges: Option<Gauges>,
}

/// The per-endpoint gauges a pool keeps up to date.
#[derive(Clone)]
pub struct Gauges {
    pub connections: Family<EndpointLabels, Gauge>,
    pub requests: Family<EndpointLabels, Gauge>,
}

/// One unit of a gauge, taken back when dropped.
struct Held(Gauge);

impl Held {
    fn new(gauge: Gauge) -> Held {
        gauge.inc();
        Held(gauge)
    }
}

impl Drop for Held {
    fn drop(&mut self) {
        self.0.dec();
    }
}

/// What a request found in the pool.
enum Found {
    Conn(Conn),
    /// No idle connection: a new one may be opened, counted by the guard.
    Open(OpenGuard),
    /// None may be opened now: wait for this.
    Wait(Arc<Notify>),
}

fn lock(backends: &Backends) -> std::sync::MutexGuard<'_, HashMap<Key, Backend>> {
    backends.lock().unwrap_or_else(|e| e.into_inner())
}

impl Pool {
    /// A pool that reports its connections and requests per endpoint in `gauges`.
    pub fn with_gauges(gauges: Gauges) -> Pool {
        Pool {
            backends: Backends::default(),
            gauges: Some(gauges),
        }
    }

    /// An idle, ready connection for `key`; else the right to open one; else something to wait
    /// on.
    fn find(&self, key: Key, state: &State, limits: &Limits, to: Option<SocketAddr>) -> Found {
        let mut backends = lock(&self.backends);
        let backend = backends.entry(key).or_default();
        let now = Instant::now();
        // Closed ones go, and so do those idle too long and those to an endpoint that left the
        // Service since they were opened (scaled down, or relabeled out of it: it gets no new
        // requests); busy ones (an HTTP/1 connection whose last response is still being read)
        // stay for later.
        backend.idle.retain(|c| {
            !c.sender.is_closed()
                && limits
                    .idle_timeout
                    .is_none_or(|t| now.duration_since(c.idle_since) < t)
        });
        while let Some(ready) = backend
            .idle
            .iter()
            .rposition(|c| c.sender.is_ready() && to.is_none_or(|to| c.upstream.host == to))
        {
            let conn = backend.idle.swap_remove(ready);
            if still_routed(state, key.0, conn.upstream.host) {
                return Found::Conn(conn);
            }
        }
        if limits
            .max_connections
            .is_some_and(|max| backend.open >= max)
        {
            // An idle connection to another endpoint gives its place (it closes); otherwise
            // the request waits for one to be free.
            match backend.idle.iter().position(|c| c.sender.is_ready()) {
                Some(i) if to.is_some() => drop(backend.idle.swap_remove(i)),
                _ => return Found::Wait(backend.freed.clone()),
            }
        }
        backend.open += 1;
        Found::Open(OpenGuard {
            backends: self.backends.clone(),
            key,
        })
    }

    /// Keeps `conn` for the next request to `key`, unless it has carried its share.
    fn put_back(&self, key: Key, mut conn: Conn, limits: &Limits) {
        conn.served += 1;
        if limits
            .max_requests_per_connection
            .is_some_and(|max| conn.served >= max)
        {
            // Dropped: the connection closes once its response is done.
            return;
        }
        conn.idle_since = Instant::now();
        let mut backends = lock(&self.backends);
        // Closed connections go, of every backend, and backends with nothing left to count.
        backends.retain(|k, b| {
            b.idle.retain(|c| !c.sender.is_closed());
            *k == key || !(b.idle.is_empty() && b.open == 0 && b.active == 0 && b.pending == 0)
        });
        let backend = backends.entry(key).or_default();
        if backend.idle.len() < MAX_IDLE_PER_BACKEND {
            backend.idle.push(conn);
        }
        backend.freed.notify_one();
    }

    /// Counts a request in flight to `key`, or refuses it past `max_requests`.
    fn admit(&self, key: Key, limits: &Limits) -> Result<ActiveGuard, UpstreamError> {
        let mut backends = lock(&self.backends);
        let backend = backends.entry(key).or_default();
        if limits.max_requests.is_some_and(|max| backend.active >= max) {
            return Err(UpstreamError::Overflow(format!(
                "{} requests in flight, the most allowed (http2MaxRequests)",
                backend.active
            )));
        }
        backend.active += 1;
        Ok(ActiveGuard {
            backends: self.backends.clone(),
            key,
        })
    }

    /// Waits for `freed` as one of the pending requests of `key`, or refuses past
    /// `max_pending`.
    async fn wait(
        &self,
        key: Key,
        freed: Arc<Notify>,
        limits: &Limits,
    ) -> Result<(), UpstreamError> {
        {
            let mut backends = lock(&self.backends);
            let backend = backends.entry(key).or_default();
            if limits.max_pending.is_some_and(|max| backend.pending >= max) {
                return Err(UpstreamError::Overflow(format!(
                    "{} connections open and {} requests waiting, the most allowed \
                     (maxConnections, http1MaxPendingRequests)",
                    backend.open, backend.pending
                )));
            }
            backend.pending += 1;
        }
        let _pending = PendingGuard {
            backends: self.backends.clone(),
            key,
        };
        // Woken when a connection is put back, closes or ends a response; looked at again
        // after a short while anyway (an HTTP/1 connection is ready again only once hyper has
        // seen its response end, which wakes no one).
        let _ = tokio::time::timeout(RECHECK, freed.notified()).await;
        Ok(())
    }

    /// Sends `req` to `key` on an idle connection, else a new one, opened for the client at
    /// `peer`, within `limits`; to the Service endpoint `endpoint` (and its address) when the
    /// caller chose one. A pooled connection that closed before it started sending the
    /// request (the server's keep-alive ended at the same moment) is not the client's failure:
    /// the request is sent again, once, on a new connection. The response's body holds the
    /// request's place among those in flight until it ends.
    pub async fn send(
        &self,
        proxy: &Proxy,
        local: &Arc<Local>,
        peer: SocketAddr,
        key: Key,
        req: Request<Body>,
        via: Via<'_>,
    ) -> Result<(Response<Tracked>, Arc<UpstreamInfo>), UpstreamError> {
        let Via { limits, endpoint } = via;
        let active = self.admit(key, limits)?;
        let to = endpoint.map(|e| e.addr);
        let (mut conn, reused) = loop {
            match self.find(key, &proxy.state(), limits, to) {
                Found::Conn(conn) => break (conn, true),
                Found::Open(slot) => {
                    // Boxed: a new connection is the rare path, and its future is large
                    // enough to double the size of every request's (which is moved whole).
                    let conn =
                        Box::pin(self.connect(proxy, local, peer, key, endpoint, slot)).await?;
                    break (conn, false);
                }
                Found::Wait(freed) => self.wait(key, freed, limits).await?,
            }
        };
        let mut req = req;
        if reused {
            match self.send_on(key, conn, req, limits).await {
                Ok((response, upstream, held)) => {
                    return Ok((track(response, (active, held)), upstream));
                }
                Err(mut e) => match e.take_message() {
                    Some(unsent) => {
                        tracing::debug!(upstream = %key.0, error = %e.error(), "pooled connection closed before the request; sending it on a new one");
                        req = unsent;
                        let slot = OpenGuard::count(&self.backends, key);
                        conn =
                            Box::pin(self.connect(proxy, local, peer, key, endpoint, slot)).await?;
                    }
                    None => return Err(reset(e.error())),
                },
            }
        }
        match self.send_on(key, conn, req, limits).await {
            Ok((response, upstream, held)) => Ok((track(response, (active, held)), upstream)),
            Err(e) => Err(reset(e.error())),
        }
    }

    /// Sends `req` on `conn` and keeps the connection for the next request: an HTTP/2 one at
    /// once (it carries other requests while this one waits), an HTTP/1 one once the response
    /// has come.
    async fn send_on(
        &self,
        key: Key,
        mut conn: Conn,
        req: Request<Body>,
        limits: &Limits,
    ) -> Result<(Response<Incoming>, Arc<UpstreamInfo>, Option<Held>), TrySendError<Request<Body>>>
    {
        let upstream = conn.upstream.clone();
        let held = conn.requests.clone().map(Held::new);
        if let Sender::H2(shared) = &conn.sender {
            let mut shared = shared.clone();
            self.put_back(key, conn, limits);
            let response = shared.try_send_request(req).await?;
            return Ok((response, upstream, held));
        }
        let response = conn.sender.try_send(req).await?;
        self.put_back(key, conn, limits);
        Ok((response, upstream, held))
    }

    /// A new connection to an endpoint of `key.0` over HBONE, opened for the client at `peer`.
    async fn connect(
        &self,
        proxy: &Proxy,
        local: &Arc<Local>,
        peer: SocketAddr,
        key: Key,
        endpoint: Option<Endpoint<'_>>,
        slot: OpenGuard,
    ) -> Result<Conn, UpstreamError> {
        let connected = match endpoint {
            None => proxy.connect_upstream(local, peer, key.0).await,
            Some(e) => {
                let connecting = proxy.connect_upstream_endpoint(local, peer, key.0, e.workload);
                match tokio::time::timeout(e.connect_timeout, connecting).await {
                    Ok(connected) => connected,
                    Err(_) => {
                        return Err(UpstreamError::Connect(
                            format!(
                                "no connection to {} within the connect timeout ({:?})",
                                e.addr, e.connect_timeout
                            ),
                            ResponseFlag::UpstreamConnectionFailure,
                        ))
                    }
                }
            }
        }
        .map_err(|f| {
            UpstreamError::Connect(f.error.to_string(), ResponseFlag::for_connect(&f.error))
        })?;
        let upstream = Arc::new(UpstreamInfo::new(&connected.routed));
        let (open, requests) = match &self.gauges {
            None => (None, None),
            Some(g) => {
                let labels = EndpointLabels {
                    destination_service: connected
                        .routed
                        .route
                        .service
                        .as_ref()
                        .map_or_else(|| "unknown".to_string(), |s| s.hostname()),
                    endpoint: upstream.host.to_string(),
                };
                (
                    Some(Held::new(g.connections.get_or_create(&labels).clone())),
                    Some(g.requests.get_or_create(&labels).clone()),
                )
            }
        };
        let io = match connected.upstream {
            Upstream::Hbone(s) => TokioIo::new(Box::new(s) as Box<dyn Io>),
            Upstream::Tcp(s) => TokioIo::new(Box::new(s) as Box<dyn Io>),
        };
        let what = |e: hyper::Error| {
            UpstreamError::Connect(
                format!("HTTP handshake: {e}"),
                ResponseFlag::UpstreamConnectionFailure,
            )
        };
        // The connection's task holds its slot and its gauge unit while it lasts.
        let sender = if key.1 == Detected::Http2 {
            let (sender, conn) = hyper::client::conn::http2::handshake(TokioExecutor::new(), io)
                .await
                .map_err(what)?;
            tokio::spawn(async move {
                let _ = conn.await;
                drop((slot, open));
            });
            Sender::H2(sender)
        } else {
            let (sender, conn) = hyper::client::conn::http1::handshake(io)
                .await
                .map_err(what)?;
            tokio::spawn(async move {
                let _ = conn.await;
                drop((slot, open));
            });
            Sender::H1(sender)
        };
        Ok(Conn::new(sender, upstream, requests))
    }
}

/// Whether a connection opened to `host` for `target` may still carry requests for it: it went
/// where it was addressed (a workload address, or a Service reached through its own waypoint,
/// which balances), or `host` is still an endpoint of the Service whose VIP `target` is, on the
/// Service's current target port.
fn still_routed(state: &State, target: SocketAddr, host: SocketAddr) -> bool {
    if host == target {
        return true;
    }
    match state.service_by_vip(target.ip()) {
        Some(service) => {
            service.target_port(target.port()) == Some(host.port())
                && service.endpoints.iter().any(|w| w.ips.contains(&host.ip()))
        }
        None => true,
    }
}

trait Io: tokio::io::AsyncRead + tokio::io::AsyncWrite + Send + Unpin {}
impl<T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Send + Unpin> Io for T {}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;

    fn state(endpoints: &str) -> State {
        let text = format!(
            r#"
namespaces: [{{ name: default, labels: {{ istio.io/dataplane-mode: ambient }} }}]
workloads:
  - {{ name: v1, node: n1, ips: [10.0.0.1], netns: /run/netns/a }}
  - {{ name: v2, node: n1, ips: [10.0.0.2], netns: /run/netns/b }}
services:
  - {{ name: web, vips: [10.96.0.1], ports: [{{ port: 80, targetPort: 8080 }}], endpoints: {endpoints} }}
"#
        );
        State::from_mesh(
            &crate::config::parse(Path::new("t.yaml"), &text).unwrap(),
            "n1",
        )
    }

    /// An HTTP/1.1 client connection to a hyper server answering 200, over an in-memory pipe.
    async fn conn(host: SocketAddr) -> Conn {
        let (client, server) = tokio::io::duplex(4096);
        tokio::spawn(async move {
            let svc = hyper::service::service_fn(|_req| async {
                Ok::<_, std::convert::Infallible>(Response::new(
                    http_body_util::Empty::<Bytes>::new(),
                ))
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(server), svc)
                .await;
        });
        let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(client))
            .await
            .unwrap();
        tokio::spawn(conn);
        let mut sender = sender;
        // Ready once the connection task has run.
        sender.ready().await.unwrap();
        Conn::new(Sender::H1(sender), Arc::new(UpstreamInfo::at(host)), None)
    }

    const KEY: Key = (
        SocketAddr::new(
            std::net::IpAddr::V4(std::net::Ipv4Addr::new(10, 0, 0, 1)),
            8080,
        ),
        Detected::Http1,
    );

    fn counts(pool: &Pool) -> (u32, u32, u32, usize) {
        let backends = lock(&pool.backends);
        let b = &backends[&KEY];
        (b.open, b.active, b.pending, b.idle.len())
    }

    #[test]
    fn requests_past_http2_max_requests_overflow_and_a_finished_one_makes_room() {
        let pool = Pool::default();
        let limits = Limits {
            max_requests: Some(2),
            ..Limits::default()
        };
        let a = pool.admit(KEY, &limits).unwrap();
        let _b = pool.admit(KEY, &limits).unwrap();
        let e = pool.admit(KEY, &limits).err().expect("a third overflows");
        assert!(
            matches!(&e, UpstreamError::Overflow(m) if m.contains("http2MaxRequests")),
            "{e}"
        );
        drop(a);
        assert!(pool.admit(KEY, &limits).is_ok());
        assert!(
            pool.admit(KEY, &Limits::default()).is_ok(),
            "no limit, no refusal"
        );
    }

    #[tokio::test]
    async fn past_max_connections_requests_wait_up_to_the_pending_limit() {
        let pool = Pool::default();
        let state = state("[v1]");
        let limits = Limits {
            max_connections: Some(1),
            max_pending: Some(1),
            ..Limits::default()
        };
        let Found::Open(slot) = pool.find(KEY, &state, &limits, None) else {
            panic!("the first may open a connection");
        };
        let Found::Wait(freed) = pool.find(KEY, &state, &limits, None) else {
            panic!("the second must wait");
        };
        let pool = Arc::new(pool);
        let waiter = {
            let (pool, freed) = (pool.clone(), freed.clone());
            tokio::spawn(async move { pool.wait(KEY, freed, &limits).await })
        };
        while counts(&pool).2 == 0 {
            tokio::task::yield_now().await;
        }
        let e = pool
            .wait(KEY, freed, &limits)
            .await
            .expect_err("a second waiter");
        assert!(
            matches!(&e, UpstreamError::Overflow(m) if m.contains("http1MaxPendingRequests")),
            "{e}"
        );
        assert_eq!(counts(&pool), (1, 0, 1, 0));
        // The connection closes: the waiter wakes and may open one.
        drop(slot);
        waiter.await.unwrap().unwrap();
        assert_eq!(counts(&pool), (0, 0, 0, 0));
        assert!(matches!(
            pool.find(KEY, &state, &limits, None),
            Found::Open(_)
        ));
    }

    #[tokio::test]
    async fn a_connection_past_its_request_count_or_idle_too_long_is_not_reused() {
        let pool = Pool::default();
        let state = state("[v1]");
        let host = "10.0.0.1:8080".parse().unwrap();
        let per_two = Limits {
            max_requests_per_connection: Some(2),
            ..Limits::default()
        };
        pool.put_back(KEY, conn(host).await, &per_two);
        let Found::Conn(c) = pool.find(KEY, &state, &per_two, None) else {
            panic!("reused after one request");
        };
        pool.put_back(KEY, c, &per_two);
        assert!(
            !matches!(pool.find(KEY, &state, &per_two, None), Found::Conn(_)),
            "closed after its second request"
        );
        let idle = Limits {
            idle_timeout: Some(Duration::from_millis(20)),
            ..Limits::default()
        };
        pool.put_back(KEY, conn(host).await, &idle);
        tokio::time::sleep(Duration::from_millis(40)).await;
        assert!(
            !matches!(pool.find(KEY, &state, &idle, None), Found::Conn(_)),
            "idle longer than idleTimeout"
        );
    }

    #[test]
    fn a_pooled_connection_to_an_endpoint_that_left_the_service_is_not_reused() {
        let (vip, v2) = (
            "10.96.0.1:80".parse().unwrap(),
            "10.0.0.2:8080".parse().unwrap(),
        );
        assert!(still_routed(&state("[v1, v2]"), vip, v2));
        assert!(
            !still_routed(&state("[v1]"), vip, v2),
            "v2 left the Service"
        );
        let old_port = "10.0.0.2:9090".parse().unwrap();
        assert!(
            !still_routed(&state("[v1, v2]"), vip, old_port),
            "not the Service's target port"
        );
        // Reached through a waypoint, the connection goes to the address itself.
        assert!(still_routed(&state("[v1]"), vip, vip));
        // A workload address is its own endpoint.
        let direct = "10.0.0.2:8080".parse().unwrap();
        assert!(still_routed(&state("[v1]"), direct, v2));
    }
}

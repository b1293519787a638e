//! `http-server` and `http-client`: HTTP/1.1, h2c (prior knowledge) and gRPC-shaped traffic for
//! the L7 waypoint's tests and benchmark. These two modes run a tokio runtime (hyper 1); the rest
//! of the tool stays on std threads.
//!
//! Server: every connection is auto-detected (a connection that starts with the HTTP/2 preface
//! is HTTP/2, anything else HTTP/1.1 with keep-alive). Every response carries
//! `x-served-by: NAME`. A POST whose `content-type` starts with `application/grpc` is gRPC: 200,
//! `content-type: application/grpc`, the request body echoed verbatim (so a framed message comes
//! back as the same framed message), trailer `grpc-status: 0` or `x-grpc-status: N` (sent over
//! HTTP/2; hyper drops trailers of a sized HTTP/1.1 body, and gRPC is HTTP/2 anyway). Any other
//! request gets 200, `content-type: application/json` and
//! `{"body_bytes":N,"headers":{..},"host":..,"method":..,"name":..,"path":..,"protocol":..}`.
//! Request headers that shape the answer:
//!
//! * `x-response-status: NNN` (200..=599): answer that status (gRPC too);
//! * `x-response-bytes: N`: the JSON body is made exactly N bytes long, by a last field
//!   `"pad":"xxx…"` or, when N is too close to the body's own length for that field, by trailing
//!   spaces; a body already N bytes or longer is left as it is; ignored for gRPC;
//! * `x-delay-ms: N`: the answer is sent N ms after the request body was read;
//! * `x-grpc-status: N`: the gRPC trailer's status;
//! * `x-fail-percent: P` (0..=100): a random P % of such requests are answered 503 instead
//!   (each request draws on its own, so a retried request may succeed); `--fail-percent P`
//!   does the same for every request to this server (a misbehaving endpoint).
//!
//! A malformed value of one of these headers gets a 400 with `{"name":..,"error":..}`.
//!
//! Client: `--concurrency C` connections, each sending its requests one after the other (HTTP/2
//! too: one stream at a time per connection, so both protocols load the path alike); a connection
//! that fails or closes is replaced. Latency is from sending a request to having its whole
//! response body, connection setup excluded. A failed request (connect, protocol, timeout, or a
//! gRPC answer with `grpc-status: 0` whose body is not the message sent) makes `ok` false.
//! `--header 'host: H'` becomes the Host header (HTTP/1.1) or `:authority` (HTTP/2), else the
//! URL's is used. `--body-bytes N` sends N bytes of the tool's pattern (`--marker` applies);
//! `--grpc` (implies HTTP/2) sends them as one 5-byte-framed message, as a POST with
//! `content-type: application/grpc` and `te: trailers`, and counts `grpc-status` from the
//! trailers (or the headers of a trailers-only answer; "missing" when absent). `served_by`
//! counts the responses that carry `x-served-by`.

use super::{pattern, Opts, STOP};
use bytes::Bytes;
use hdrhistogram::Histogram;
use http::header::{HeaderMap, HeaderName, HeaderValue, CONTENT_TYPE, HOST};
use http::{Method, Request, Response, StatusCode, Uri, Version};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use mesh_tests::tool::{emit, raise_open_file_limit};
use serde_json::{json, Map, Value};
use std::collections::BTreeMap;
use std::convert::Infallible;
use std::net::{SocketAddr, ToSocketAddrs};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

/// The runtime of the two HTTP modes: `--workers W` threads, else one per CPU.
fn runtime(o: &Opts) -> Result<tokio::runtime::Runtime, String> {
    let mut b = tokio::runtime::Builder::new_multi_thread();
    if o.given("--workers") {
        b.worker_threads(o.workers);
    }
    b.enable_all()
        .build()
        .map_err(|e| format!("tokio runtime: {e}"))
}

/// An error with its sources, `outer: inner: …` (hyper's own text names only the outer kind).
fn chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        let t = c.to_string();
        if !s.ends_with(&t) {
            s.push_str(": ");
            s.push_str(&t);
        }
        cur = c.source();
    }
    s
}

/// Headers as a JSON object; a repeated name has its values joined by ", ".
fn headers_json(h: &HeaderMap) -> Value {
    let mut m = Map::new();
    for (k, v) in h {
        let v = String::from_utf8_lossy(v.as_bytes());
        match m.get_mut(k.as_str()) {
            Some(Value::String(prev)) => {
                prev.push_str(", ");
                prev.push_str(&v);
            }
            _ => {
                m.insert(k.as_str().to_owned(), Value::String(v.into_owned()));
            }
        }
    }
    Value::Object(m)
}

fn protocol(v: Version) -> &'static str {
    match v {
        Version::HTTP_09 => "HTTP/0.9",
        Version::HTTP_10 => "HTTP/1.0",
        Version::HTTP_11 => "HTTP/1.1",
        Version::HTTP_2 => "HTTP/2",
        Version::HTTP_3 => "HTTP/3",
        _ => "unknown",
    }
}

fn is_grpc(method: &Method, h: &HeaderMap) -> bool {
    method == Method::POST
        && h.get(CONTENT_TYPE)
            .is_some_and(|v| v.as_bytes().starts_with(b"application/grpc"))
}

// ---------------------------------------------------------------------------------------------
// http-server

type RespBody = BoxBody<Bytes, Infallible>;

struct Server {
    name: String,
    served_by: HeaderValue,
    log_requests: bool,
    fail_percent: u64,
    conn: auto::Builder<TokioExecutor>,
}

pub(crate) fn http_server(o: &Opts) -> Result<bool, String> {
    let name = o.name.clone().ok_or("--name is required")?;
    let served_by =
        HeaderValue::from_str(&name).map_err(|_| format!("--name {name:?} is no header value"))?;
    raise_open_file_limit();
    let listeners = super::bind_all(&o.listen)?;
    let addrs: Vec<String> = listeners
        .iter()
        .map(|l| l.local_addr().map(|a| a.to_string()).unwrap_or_default())
        .collect();
    let rt = runtime(o)?;
    let mut conn = auto::Builder::new(TokioExecutor::new());
    // Idle keep-alive connections stay open as long as the client keeps them (hyper's default
    // would close them after 30 s without a request).
    conn.http1()
        .timer(TokioTimer::new())
        .header_read_timeout(None);
    conn.http2().timer(TokioTimer::new());
    let server = Arc::new(Server {
        name,
        served_by,
        log_requests: o.log_requests,
        fail_percent: o.fail_percent,
        conn,
    });
    rt.block_on(async move {
        let mut tasks = Vec::new();
        for l in listeners {
            l.set_nonblocking(true)
                .map_err(|e| format!("set_nonblocking: {e}"))?;
            let l = tokio::net::TcpListener::from_std(l).map_err(|e| format!("listener: {e}"))?;
            tasks.push(tokio::spawn(accept_loop(l, server.clone())));
        }
        emit(&json!({
            "event": "listening",
            "listening": addrs,
            "name": server.name,
            "pid": std::process::id(),
        }));
        for t in tasks {
            let _ = t.await;
        }
        Ok(true)
    })
}

async fn accept_loop(l: tokio::net::TcpListener, server: Arc<Server>) {
    loop {
        match l.accept().await {
            Ok((s, peer)) => {
                let _ = s.set_nodelay(true);
                let local = s.local_addr().ok();
                let server = server.clone();
                tokio::spawn(async move {
                    let for_svc = server.clone();
                    let svc = hyper::service::service_fn(move |req| {
                        let server = for_svc.clone();
                        async move { Ok::<_, Infallible>(server.handle(req, peer, local).await) }
                    });
                    let _ = server.conn.serve_connection(TokioIo::new(s), svc).await;
                });
            }
            Err(e) => {
                emit(&json!({"event": "accept_error", "error": e.to_string()}));
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

/// A number from request header `name`, if present.
fn header_num<T: std::str::FromStr>(h: &HeaderMap, name: &str) -> Result<Option<T>, String> {
    let Some(v) = h.get(name) else {
        return Ok(None);
    };
    v.to_str()
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .map(Some)
        .ok_or_else(|| format!("{name}: not a number: {v:?}"))
}

/// What the request asks of its answer (the `x-…` headers).
struct Asked {
    status: StatusCode,
    bytes: Option<usize>,
    delay: Option<Duration>,
    grpc_status: u32,
    fail_percent: u64,
}

impl Asked {
    fn from(h: &HeaderMap) -> Result<Asked, String> {
        let status = match header_num::<u16>(h, "x-response-status")? {
            None => StatusCode::OK,
            Some(s @ 200..=599) => StatusCode::from_u16(s).map_err(|e| e.to_string())?,
            Some(s) => return Err(format!("x-response-status: {s} is not in 200..=599")),
        };
        Ok(Asked {
            status,
            bytes: header_num(h, "x-response-bytes")?,
            delay: header_num(h, "x-delay-ms")?.map(Duration::from_millis),
            grpc_status: header_num(h, "x-grpc-status")?.unwrap_or(0),
            fail_percent: match header_num::<u64>(h, "x-fail-percent")? {
                None => 0,
                Some(p @ 0..=100) => p,
                Some(p) => return Err(format!("x-fail-percent: {p} is not in 0..=100")),
            },
        })
    }

    /// The status to answer with: 503 for the share of requests asked to fail (by the request,
    /// or `server_percent` by the server's own flag).
    fn status(&self, server_percent: u64) -> StatusCode {
        let percent = self.fail_percent.max(server_percent);
        if percent > 0 && draw() % 100 < percent {
            StatusCode::SERVICE_UNAVAILABLE
        } else {
            self.status
        }
    }
}

/// A uniform random number (splitmix64 over a counter seeded from the clock at start): the
/// test server needs no cryptographic quality, only independent draws.
fn draw() -> u64 {
    static STATE: OnceLock<AtomicU64> = OnceLock::new();
    let state = STATE.get_or_init(|| {
        let seed = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64);
        AtomicU64::new(seed)
    });
    let mut z = state
        .fetch_add(0x9e37_79b9_7f4a_7c15, Ordering::Relaxed)
        .wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// Pads the text of a JSON object to exactly `want` bytes: a last field `"pad":"xxx…"` when
/// there is room for it, else trailing spaces; text already `want` bytes or longer is unchanged.
fn pad_json(mut text: String, want: usize) -> String {
    // `,"pad":""` in place of nothing: the closing brace stays.
    const FIELD: usize = r#","pad":"""#.len();
    let len = text.len();
    if want >= len + FIELD && text.ends_with('}') {
        text.pop();
        text.push_str(r#","pad":""#);
        text.extend(std::iter::repeat_n('x', want - len - FIELD));
        text.push_str("\"}");
    } else if want > len {
        text.extend(std::iter::repeat_n(' ', want - len));
    }
    text
}

impl Server {
    fn response(&self, status: StatusCode, content_type: &'static str) -> http::response::Builder {
        Response::builder()
            .status(status)
            .header("x-served-by", self.served_by.clone())
            .header(CONTENT_TYPE, content_type)
    }

    async fn handle(
        &self,
        req: Request<Incoming>,
        peer: SocketAddr,
        local: Option<SocketAddr>,
    ) -> Response<RespBody> {
        let (parts, body) = req.into_parts();
        let path = parts
            .uri
            .path_and_query()
            .map_or_else(|| parts.uri.to_string(), |p| p.to_string());
        let host = match parts.uri.authority() {
            Some(a) => a.to_string(),
            None => parts
                .headers
                .get(HOST)
                .map(|h| String::from_utf8_lossy(h.as_bytes()).into_owned())
                .unwrap_or_default(),
        };
        let grpc = is_grpc(&parts.method, &parts.headers);
        let body = body
            .collect()
            .await
            .map(|c| c.to_bytes())
            .map_err(|e| format!("reading the request body: {}", chain(&e)));
        let body_bytes = body.as_ref().map_or(0, |b| b.len());
        let resp = match Asked::from(&parts.headers).and_then(|a| Ok((a, body?))) {
            Err(e) => {
                let text = json!({"name": self.name, "error": e}).to_string();
                self.response(StatusCode::BAD_REQUEST, "application/json")
                    .body(Full::new(Bytes::from(text)).boxed())
            }
            Ok((asked, body)) => {
                if let Some(d) = asked.delay {
                    tokio::time::sleep(d).await;
                }
                let status = asked.status(self.fail_percent);
                if grpc {
                    let mut trailers = HeaderMap::new();
                    trailers.insert("grpc-status", HeaderValue::from(asked.grpc_status));
                    self.response(status, "application/grpc").body(
                        Full::new(body)
                            .with_trailers(std::future::ready(Some(Ok(trailers))))
                            .boxed(),
                    )
                } else {
                    let text = json!({
                        "name": self.name,
                        "method": parts.method.as_str(),
                        "path": path,
                        "host": host,
                        "headers": headers_json(&parts.headers),
                        "body_bytes": body_bytes,
                        "protocol": protocol(parts.version),
                    })
                    .to_string();
                    let text = match asked.bytes {
                        Some(n) => pad_json(text, n),
                        None => text,
                    };
                    self.response(status, "application/json")
                        .body(Full::new(Bytes::from(text)).boxed())
                }
            }
        };
        let resp = resp.unwrap_or_else(|e| {
            let mut r = Response::new(Full::new(Bytes::from(e.to_string())).boxed());
            *r.status_mut() = StatusCode::INTERNAL_SERVER_ERROR;
            r
        });
        if self.log_requests {
            emit(&json!({
                "event": "request",
                "peer": peer.to_string(),
                "local": local.map(|a| a.to_string()),
                "protocol": protocol(parts.version),
                "method": parts.method.as_str(),
                "path": path,
                "host": host,
                "grpc": grpc,
                "body_bytes": body_bytes,
                "status": resp.status().as_u16(),
            }));
        }
        resp
    }
}

// ---------------------------------------------------------------------------------------------
// http-client

/// Parses a `--header 'name: value'`: the name lower-cased, both trimmed.
fn parse_header(s: &str) -> Result<(HeaderName, HeaderValue), String> {
    let (k, v) = s
        .split_once(':')
        .ok_or_else(|| format!("--header {s:?}: expected 'name: value'"))?;
    let k = HeaderName::from_bytes(k.trim().to_ascii_lowercase().as_bytes())
        .map_err(|_| format!("--header {s:?}: bad name"))?;
    let v = HeaderValue::from_str(v.trim()).map_err(|_| format!("--header {s:?}: bad value"))?;
    Ok((k, v))
}

/// A latency histogram in microseconds, up to an hour, 3 significant figures. Fixed bounds:
/// `saturating_record` clamps to them (an auto-resizing histogram would clamp to its current,
/// tiny, bounds instead of growing).
fn histogram() -> Histogram<u64> {
    Histogram::new_with_max(3_600_000_000, 3).expect("valid histogram bounds")
}

/// Latency percentiles in microseconds (zeros without samples).
fn latency_json(h: &Histogram<u64>) -> Value {
    let q = |q: f64| {
        if h.is_empty() {
            0
        } else {
            h.value_at_quantile(q)
        }
    };
    json!({"p50": q(0.5), "p90": q(0.9), "p99": q(0.99), "max": h.max()})
}

/// The 5-byte gRPC frame (uncompressed, big-endian length) around `msg`.
fn grpc_frame(msg: &[u8]) -> Bytes {
    let mut b = Vec::with_capacity(5 + msg.len());
    b.push(0);
    b.extend_from_slice(&(msg.len() as u32).to_be_bytes());
    b.extend_from_slice(msg);
    Bytes::from(b)
}

/// What every request of a run is made of.
struct Plan {
    addr: SocketAddr,
    http2: bool,
    grpc: bool,
    method: Method,
    /// `http://AUTHORITY/PATH?Q` (HTTP/2) or `/PATH?Q` (HTTP/1.1, with a Host header).
    uri: Uri,
    /// Host header (HTTP/1.1) or :authority (HTTP/2): `--header 'host: …'`, else the URL's.
    authority: String,
    headers: HeaderMap,
    body: Bytes,
    timeout: Duration,
    requests: Option<u64>,
    deadline: Option<Instant>,
    next: AtomicU64,
    first: OnceLock<Value>,
    /// When the run started, for `first`'s timing.
    started: Instant,
}

impl Plan {
    fn from(o: &Opts) -> Result<Plan, String> {
        let url = o.url.as_deref().ok_or("--url is required")?;
        let parsed: Uri = url.parse().map_err(|e| format!("--url {url:?}: {e}"))?;
        if parsed.scheme_str() != Some("http") {
            return Err(format!("--url {url:?}: only http:// URLs"));
        }
        let auth = parsed
            .authority()
            .ok_or_else(|| format!("--url {url:?}: no host"))?;
        let target = format!("{}:{}", auth.host(), auth.port_u16().unwrap_or(80));
        let addr = target
            .to_socket_addrs()
            .map_err(|e| format!("resolving {target}: {e}"))?
            .next()
            .ok_or_else(|| format!("cannot resolve {target}"))?;
        let mut authority = auth.to_string();
        let mut headers = HeaderMap::new();
        for h in &o.headers {
            let (k, v) = parse_header(h)?;
            if k == HOST {
                authority = v
                    .to_str()
                    .map_err(|_| format!("--header {h:?}: not ASCII"))?
                    .to_owned();
            } else {
                headers.append(k, v);
            }
        }
        let pq = parsed.path_and_query().map_or("/", |p| p.as_str());
        let uri: Uri = if o.http2 || o.grpc {
            format!("http://{authority}{pq}")
        } else {
            pq.to_owned()
        }
        .parse()
        .map_err(|e| format!("request URI with authority {authority:?}: {e}"))?;
        let method = match &o.method {
            Some(m) => Method::from_bytes(m.as_bytes()).map_err(|_| format!("--method {m:?}"))?,
            None if o.grpc => Method::POST,
            None => Method::GET,
        };
        let mut payload = vec![0u8; o.body_bytes];
        pattern(1, 0, &mut payload);
        let body = if o.grpc {
            headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/grpc"));
            headers.insert("te", HeaderValue::from_static("trailers"));
            grpc_frame(&payload)
        } else {
            Bytes::from(payload)
        };
        let duration = o.given("--duration-ms").then_some(o.duration);
        let requests = match (o.requests, duration) {
            (None, None) => Some(1),
            (n, _) => n,
        };
        let started = Instant::now();
        Ok(Plan {
            addr,
            http2: o.http2 || o.grpc,
            grpc: o.grpc,
            method,
            uri,
            authority,
            headers,
            body,
            timeout: o.timeout,
            requests,
            deadline: duration.map(|d| started + d),
            next: AtomicU64::new(0),
            first: OnceLock::new(),
            started,
        })
    }

    /// Whether one more request is to be sent.
    fn claim(&self) -> bool {
        if STOP.load(Ordering::Relaxed) || self.deadline.is_some_and(|d| Instant::now() >= d) {
            return false;
        }
        self.requests
            .is_none_or(|n| self.next.fetch_add(1, Ordering::Relaxed) < n)
    }

    fn request(&self) -> Result<Request<Full<Bytes>>, String> {
        let mut b = Request::builder()
            .method(self.method.clone())
            .uri(self.uri.clone());
        if !self.http2 {
            b = b.header(HOST, &self.authority);
        }
        let mut req = b
            .body(Full::new(self.body.clone()))
            .map_err(|e| e.to_string())?;
        req.headers_mut().extend(self.headers.clone());
        Ok(req)
    }
}

enum Sender {
    H1(hyper::client::conn::http1::SendRequest<Full<Bytes>>),
    H2(hyper::client::conn::http2::SendRequest<Full<Bytes>>),
}

impl Sender {
    async fn connect(plan: &Plan) -> Result<Sender, String> {
        let s = tokio::net::TcpStream::connect(plan.addr)
            .await
            .map_err(|e| format!("connect {}: {e}", plan.addr))?;
        let _ = s.set_nodelay(true);
        let io = TokioIo::new(s);
        if plan.http2 {
            let (tx, conn) = hyper::client::conn::http2::Builder::new(TokioExecutor::new())
                .timer(TokioTimer::new())
                .handshake(io)
                .await
                .map_err(|e| format!("HTTP/2 handshake: {}", chain(&e)))?;
            tokio::spawn(conn);
            Ok(Sender::H2(tx))
        } else {
            let (tx, conn) = hyper::client::conn::http1::handshake(io)
                .await
                .map_err(|e| format!("HTTP/1.1 handshake: {}", chain(&e)))?;
            tokio::spawn(conn);
            Ok(Sender::H1(tx))
        }
    }

    /// Waits until the connection can take a request; false if it is gone.
    async fn ready(&mut self) -> bool {
        match self {
            Sender::H1(s) => s.ready().await.is_ok(),
            Sender::H2(s) => s.ready().await.is_ok(),
        }
    }

    async fn send(&mut self, req: Request<Full<Bytes>>) -> hyper::Result<Response<Incoming>> {
        match self {
            Sender::H1(s) => s.send_request(req).await,
            Sender::H2(s) => s.send_request(req).await,
        }
    }
}

/// One connection's tallies, merged at the end.
struct Tally {
    responses: u64,
    failed: u64,
    connections: u64,
    status: BTreeMap<String, u64>,
    served_by: BTreeMap<String, u64>,
    grpc_status: BTreeMap<String, u64>,
    latency: Histogram<u64>,
    errors: Vec<String>,
}

const MAX_ERRORS: usize = 10;

impl Tally {
    fn new() -> Tally {
        Tally {
            responses: 0,
            failed: 0,
            connections: 0,
            status: BTreeMap::new(),
            served_by: BTreeMap::new(),
            grpc_status: BTreeMap::new(),
            latency: histogram(),
            errors: Vec::new(),
        }
    }

    fn error(&mut self, e: String) {
        self.failed += 1;
        if self.errors.len() < MAX_ERRORS {
            self.errors.push(e);
        }
    }

    fn merge(&mut self, o: Tally) {
        self.responses += o.responses;
        self.failed += o.failed;
        self.connections += o.connections;
        for (mine, theirs) in [
            (&mut self.status, o.status),
            (&mut self.served_by, o.served_by),
            (&mut self.grpc_status, o.grpc_status),
        ] {
            for (k, n) in theirs {
                *mine.entry(k).or_default() += n;
            }
        }
        let _ = self.latency.add(&o.latency);
        for e in o.errors {
            if self.errors.len() < MAX_ERRORS {
                self.errors.push(e);
            }
        }
    }
}

/// The body of `first`, cut to 4 KiB.
const FIRST_BODY_MAX: usize = 4096;

/// One request on `conn` (connected first if need be); tallies its answer.
async fn one_request(plan: &Plan, conn: &mut Option<Sender>, t: &mut Tally) -> Result<(), String> {
    let alive = match conn.as_mut() {
        Some(s) => s.ready().await,
        None => false,
    };
    if !alive {
        // Never connected, or the server closed the connection between requests.
        t.connections += 1;
        *conn = Some(Sender::connect(plan).await?);
    }
    let sender = conn.as_mut().expect("connected");
    let req = plan.request()?;
    let sent = Instant::now();
    let resp = sender.send(req).await.map_err(|e| chain(&e))?;
    let (parts, body) = resp.into_parts();
    let collected = body
        .collect()
        .await
        .map_err(|e| format!("reading the response body: {}", chain(&e)))?;
    let trailers = collected.trailers().cloned();
    let body = collected.to_bytes();
    t.latency
        .saturating_record(sent.elapsed().as_micros().max(1) as u64);
    t.responses += 1;
    *t.status
        .entry(parts.status.as_u16().to_string())
        .or_default() += 1;
    if let Some(v) = parts.headers.get("x-served-by") {
        let v = String::from_utf8_lossy(v.as_bytes()).into_owned();
        *t.served_by.entry(v).or_default() += 1;
    }
    let mut mismatch = None;
    if plan.grpc {
        // A trailers-only answer carries grpc-status in its headers.
        let status = trailers
            .as_ref()
            .and_then(|tr| tr.get("grpc-status"))
            .or_else(|| parts.headers.get("grpc-status"))
            .map_or_else(
                || "missing".to_owned(),
                |v| String::from_utf8_lossy(v.as_bytes()).into_owned(),
            );
        if status == "0" && body != plan.body {
            mismatch = Some(format!(
                "gRPC echo mismatch: sent {} bytes, got {}",
                plan.body.len(),
                body.len()
            ));
        }
        *t.grpc_status.entry(status).or_default() += 1;
    }
    let _ = plan.first.get_or_init(|| {
        let cut = &body[..body.len().min(FIRST_BODY_MAX)];
        let mut v = json!({
            "status": parts.status.as_u16(),
            "protocol": protocol(parts.version),
            "headers": headers_json(&parts.headers),
            "body": String::from_utf8_lossy(cut),
            "body_bytes": body.len(),
            "at_ms": plan.started.elapsed().as_secs_f64() * 1000.0,
        });
        if let Some(tr) = &trailers {
            v["trailers"] = headers_json(tr);
        }
        v
    });
    mismatch.map_or(Ok(()), Err)
}

/// One request with its timeout; a failed connection is dropped.
async fn timed_request(plan: &Plan, conn: &mut Option<Sender>, t: &mut Tally, c: usize) {
    match tokio::time::timeout(plan.timeout, one_request(plan, conn, t)).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => {
            *conn = None;
            t.error(format!("conn {c}: {e}"));
        }
        Err(_) => {
            *conn = None;
            t.error(format!(
                "conn {c}: no complete response within {} ms",
                plan.timeout.as_millis()
            ));
        }
    }
}

/// One connection's requests to `a` as long as it lets claim; with `--paired-url`, each
/// followed by one to `b` on a connection of its own (swapped every other pair).
async fn worker(a: Arc<Plan>, b: Option<Arc<Plan>>, c: usize) -> (Tally, Tally) {
    let (mut ta, mut tb) = (Tally::new(), Tally::new());
    let (mut ca, mut cb): (Option<Sender>, Option<Sender>) = (None, None);
    let mut swap = false;
    while a.claim() {
        match &b {
            None => timed_request(&a, &mut ca, &mut ta, c).await,
            Some(b) if swap => {
                timed_request(b, &mut cb, &mut tb, c).await;
                timed_request(&a, &mut ca, &mut ta, c).await;
            }
            Some(b) => {
                timed_request(&a, &mut ca, &mut ta, c).await;
                timed_request(b, &mut cb, &mut tb, c).await;
            }
        }
        swap = !swap;
    }
    (ta, tb)
}

pub(crate) fn http_client(o: &Opts) -> Result<bool, String> {
    let rt = runtime(o)?;
    raise_open_file_limit();
    super::stop_on_signals();
    let plan = Arc::new(Plan::from(o)?);
    let paired = match &o.paired_url {
        Some(url) => Some(Arc::new(Plan::from(&Opts {
            url: Some(url.clone()),
            ..o.clone()
        })?)),
        None => None,
    };
    let (total, twin, elapsed) = rt.block_on(async {
        let tasks: Vec<_> = (0..o.concurrency.max(1))
            .map(|c| tokio::spawn(worker(plan.clone(), paired.clone(), c)))
            .collect();
        let (mut total, mut twin) = (Tally::new(), Tally::new());
        for t in tasks {
            match t.await {
                Ok((ta, tb)) => {
                    total.merge(ta);
                    twin.merge(tb);
                }
                Err(e) => total.error(format!("a connection task failed: {e}")),
            }
        }
        (total, twin, plan.started.elapsed())
    });
    let requests = total.responses + total.failed;
    let twin_ok = paired.is_none() || (twin.failed == 0 && twin.responses > 0);
    let ok = total.failed == 0 && requests > 0 && twin_ok;
    let secs = elapsed.as_secs_f64();
    let mut v = json!({
        "ok": ok,
        "requests": requests,
        "responses": total.responses,
        "failed": total.failed,
        "connections": total.connections,
        "protocol": if plan.http2 { "HTTP/2" } else { "HTTP/1.1" },
        "errors": total.errors,
        "status": total.status,
        "served_by": total.served_by,
        "latency_us": latency_json(&total.latency),
        "elapsed_ms": secs * 1000.0,
        "rps": if secs > 0.0 { total.responses as f64 / secs } else { 0.0 },
        "first": plan.first.get().cloned().unwrap_or(Value::Null),
    });
    if plan.grpc {
        v["grpc_status"] = json!(total.grpc_status);
    }
    if let Some(b) = &paired {
        v["paired"] = json!({
            "responses": twin.responses,
            "failed": twin.failed,
            "errors": twin.errors,
            "status": twin.status,
            "served_by": twin.served_by,
            "latency_us": latency_json(&twin.latency),
            "first": b.first.get().cloned().unwrap_or(Value::Null),
        });
    }
    emit(&v);
    Ok(ok)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles() {
        let mut h = histogram();
        assert_eq!(
            latency_json(&h),
            json!({"p50": 0, "p90": 0, "p99": 0, "max": 0})
        );
        for v in 1..=100 {
            h.record(v).unwrap();
        }
        assert_eq!(
            latency_json(&h),
            json!({"p50": 50, "p90": 90, "p99": 99, "max": 100})
        );
        // Merged tallies keep every sample.
        let (mut a, mut b) = (Tally::new(), Tally::new());
        a.latency.saturating_record(10);
        b.latency.saturating_record(250_000);
        a.merge(b);
        assert_eq!(a.latency.len(), 2);
        // 3 significant figures: within 0.1%.
        assert!(
            a.latency.max().abs_diff(250_000) <= 250,
            "{}",
            a.latency.max()
        );
    }

    #[test]
    fn padding() {
        let text = json!({"name": "a", "n": 1}).to_string();
        let len = text.len();
        for want in [0, len, len + 1, len + 8, len + 9, len + 10, 1024] {
            let padded = pad_json(text.clone(), want);
            assert_eq!(padded.len(), want.max(len), "want {want}");
            let v: Value = serde_json::from_str(&padded).unwrap();
            assert_eq!(v["name"], "a");
        }
        assert!(pad_json(text.clone(), 1024).contains(r#""pad":"xxx"#));
        assert!(pad_json(text.clone(), len + 3).ends_with("}   "));
    }

    #[test]
    fn headers_and_frames() {
        let (k, v) = parse_header("X-Test:  some value ").unwrap();
        assert_eq!((k.as_str(), v.to_str().unwrap()), ("x-test", "some value"));
        let (k, v) = parse_header("x-url: http://a:1/b").unwrap();
        assert_eq!((k.as_str(), v.to_str().unwrap()), ("x-url", "http://a:1/b"));
        assert!(parse_header("no colon").is_err());
        assert!(parse_header("bad name: v").is_err());
        assert_eq!(&grpc_frame(b"hi")[..], &[0, 0, 0, 0, 2, b'h', b'i']);
    }
}

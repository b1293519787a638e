//! `http-server`: HTTP/1.1, h2c (prior knowledge) and gRPC-shaped traffic for the L7 waypoint's
//! tests and benchmark. This mode runs a tokio runtime (hyper 1); the rest of the tool stays on
//! std threads.
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
//! * `x-grpc-status: N`: the gRPC trailer's status.
//!
//! A malformed value of one of these headers gets a 400 with `{"name":..,"error":..}`.

use super::Opts;
use bytes::Bytes;
use http::header::{HeaderMap, HeaderValue, CONTENT_TYPE, HOST};
use http::{Method, Request, Response, StatusCode, Version};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use mesh_tests::tool::{emit, raise_open_file_limit};
use serde_json::{json, Map, Value};
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

/// The runtime of the HTTP mode: `--workers W` threads, else one per CPU.
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
        })
    }
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
                if grpc {
                    let mut trailers = HeaderMap::new();
                    trailers.insert("grpc-status", HeaderValue::from(asked.grpc_status));
                    self.response(asked.status, "application/grpc").body(
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
                    self.response(asked.status, "application/json")
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

#[cfg(test)]
mod tests {
    use super::*;

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
}

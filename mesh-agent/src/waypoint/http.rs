//! The waypoint's HTTP side: a stream the proxy detected as HTTP is served with hyper (HTTP/1.1
//! or HTTP/2, as the client spoke), and each request is forwarded over an upstream HTTP
//! connection of the same version, carried in an HBONE tunnel the waypoint opens with its own
//! identity. Upstream connections are pooled per backend and reused across downstream requests
//! and connections. Each request is reported (`telemetry`): a record started when it arrives
//! and finished when its response has been sent.
use std::collections::HashMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::{combinators::BoxBody, BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};

use super::telemetry::{Downstream, ResponseFlag, Telemetry, UpstreamInfo};
use crate::policy::HttpAttributes;
use crate::proxy::{
    authorize_client, denied, BoxFuture, Detected, HttpHandler, HttpStream, Proxy, Upstream,
};

type Body = BoxBody<Bytes, hyper::Error>;

/// Idle upstream connections kept per backend.
const MAX_IDLE_PER_BACKEND: usize = 64;

/// The waypoint's HTTP handler; cheap to share.
pub struct Http {
    proxy: Arc<Proxy>,
    pool: Mutex<HashMap<(SocketAddr, Detected), Vec<Conn>>>,
    telemetry: Arc<Telemetry>,
}

/// A pooled upstream connection and where it goes (for the request metrics and access log).
struct Conn {
    sender: Sender,
    upstream: Arc<UpstreamInfo>,
}

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

    async fn send(&mut self, req: Request<Body>) -> hyper::Result<Response<Incoming>> {
        match self {
            Sender::H1(s) => s.send_request(req).await,
            Sender::H2(s) => s.send_request(req).await,
        }
    }
}

impl Http {
    pub fn new(proxy: Arc<Proxy>, telemetry: Arc<Telemetry>) -> Arc<Http> {
        Arc::new(Http {
            proxy,
            pool: Mutex::default(),
            telemetry,
        })
    }

    fn idle(&self, key: (SocketAddr, Detected)) -> Option<Conn> {
        let mut pool = self.pool.lock().unwrap_or_else(|e| e.into_inner());
        let senders = pool.get_mut(&key)?;
        // Closed ones go; busy ones (an HTTP/1 connection whose last response is still being
        // read) stay for later.
        senders.retain(|c| !c.sender.is_closed());
        let ready = senders.iter().position(|c| c.sender.is_ready())?;
        Some(senders.swap_remove(ready))
    }

    fn put_back(&self, key: (SocketAddr, Detected), sender: Conn) {
        let mut pool = self.pool.lock().unwrap_or_else(|e| e.into_inner());
        // Backends gone from the config keep no connections.
        pool.retain(|_, senders| {
            senders.retain(|c| !c.sender.is_closed());
            !senders.is_empty()
        });
        let senders = pool.entry(key).or_default();
        if senders.len() < MAX_IDLE_PER_BACKEND {
            senders.push(sender);
        }
    }

    /// A new upstream HTTP connection to an endpoint of `backend`, over HBONE.
    async fn connect(
        &self,
        stream: &StreamInfo,
        backend: SocketAddr,
        protocol: Detected,
    ) -> Result<Conn, (String, ResponseFlag)> {
        let connected = self
            .proxy
            .connect_upstream(&stream.local, stream.peer, backend)
            .await
            .map_err(|f| (f.error.to_string(), ResponseFlag::for_connect(&f.error)))?;
        let upstream = Arc::new(UpstreamInfo::new(&connected.routed));
        let io = match connected.upstream {
            Upstream::Hbone(s) => TokioIo::new(Box::new(s) as Box<dyn Io>),
            Upstream::Tcp(s) => TokioIo::new(Box::new(s) as Box<dyn Io>),
        };
        let what = |e: hyper::Error| {
            let e = format!("upstream HTTP handshake: {e}");
            (e, ResponseFlag::UpstreamConnectionFailure)
        };
        if protocol == Detected::Http2 {
            let (sender, conn) = hyper::client::conn::http2::handshake(TokioExecutor::new(), io)
                .await
                .map_err(what)?;
            tokio::spawn(conn);
            let sender = Sender::H2(sender);
            Ok(Conn { sender, upstream })
        } else {
            let (sender, conn) = hyper::client::conn::http1::handshake(io)
                .await
                .map_err(what)?;
            tokio::spawn(conn);
            let sender = Sender::H1(sender);
            Ok(Conn { sender, upstream })
        }
    }

    async fn forward(&self, stream: &StreamInfo, mut req: Request<Incoming>) -> Response<Body> {
        let mut record = self.telemetry.start(&stream.downstream, &mut req);
        let method = req.method().clone();
        let backend = stream.target;
        let attributes = HttpAttributes {
            method: method.to_string(),
            path: req
                .uri()
                .path_and_query()
                .map_or_else(|| "/".to_string(), |p| p.to_string()),
            host: req
                .headers()
                .get(http::header::HOST)
                .and_then(|h| h.to_str().ok())
                .map(str::to_string)
                .or_else(|| req.uri().authority().map(|a| a.to_string()))
                .unwrap_or_default(),
            headers: req.headers().clone(),
        };
        let client = (stream.peer.ip(), &*stream.peer_id);
        let verdict = authorize_client(&self.proxy.state(), backend, client, Some(&attributes));
        if let Err(decision) = verdict {
            denied(
                &self.proxy,
                &stream.local,
                backend,
                client,
                &decision,
                "request",
            );
            // Istio's answer to a request its RBAC filter denies.
            let denied = text(StatusCode::FORBIDDEN, "RBAC: access denied");
            return record.respond(denied, ResponseFlag::None);
        }
        strip_hop_by_hop(req.headers_mut());
        let key = (backend, stream.protocol);
        let mut conn = match self.idle(key) {
            Some(conn) => conn,
            None => match self.connect(stream, backend, stream.protocol).await {
                Ok(conn) => conn,
                Err((e, flag)) => {
                    tracing::warn!(%backend, error = %e, "upstream connect failed");
                    let failed = text(StatusCode::SERVICE_UNAVAILABLE, "upstream connect error");
                    return record.respond(failed, flag);
                }
            },
        };
        record.upstream(&conn.upstream);
        let req = req.map(|b| record.count_request(b).boxed());
        let result = conn.sender.send(req).await;
        match result {
            Ok(mut response) => {
                self.put_back(key, conn);
                strip_hop_by_hop(response.headers_mut());
                record.respond(response, ResponseFlag::None)
            }
            Err(e) => {
                tracing::warn!(%backend, %method, error = %e, "upstream request failed");
                let reset = text(StatusCode::SERVICE_UNAVAILABLE, "upstream reset");
                record.respond(reset, ResponseFlag::UpstreamConnectionTermination)
            }
        }
    }
}

/// What a request needs of the stream it came on.
struct StreamInfo {
    local: Arc<crate::proxy::Local>,
    peer: SocketAddr,
    peer_id: Arc<crate::identity::Identity>,
    target: SocketAddr,
    protocol: Detected,
    /// The client, as the request metrics and the access log name it.
    downstream: Arc<Downstream>,
}

trait Io: tokio::io::AsyncRead + tokio::io::AsyncWrite + Send + Unpin {}
impl<T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Send + Unpin> Io for T {}

/// Removes the hop-by-hop headers (RFC 9110 §7.6.1): those `Connection` names and the fixed
/// ones; they describe one connection, not the message, and must not be forwarded.
fn strip_hop_by_hop(headers: &mut http::HeaderMap) {
    let named: Vec<String> = headers
        .get_all(http::header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(|name| name.trim().to_ascii_lowercase())
        .filter(|name| !name.is_empty())
        .collect();
    for name in named {
        headers.remove(name.as_str());
    }
    for name in [
        "connection",
        "keep-alive",
        "proxy-connection",
        "proxy-authenticate",
        "proxy-authorization",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
    ] {
        headers.remove(name);
    }
}

fn text(status: StatusCode, body: &'static str) -> Response<Body> {
    let mut response = Response::new(
        Full::new(Bytes::from_static(body.as_bytes()))
            .map_err(|never| match never {})
            .boxed(),
    );
    *response.status_mut() = status;
    response
}

impl HttpHandler for Http {
    fn serve(self: Arc<Self>, stream: HttpStream) -> BoxFuture<()> {
        Box::pin(async move {
            let state = self.proxy.state();
            let downstream = Downstream::new(&state, stream.peer, &stream.peer_id, stream.target);
            drop(state);
            let info = Arc::new(StreamInfo {
                downstream: Arc::new(downstream),
                local: stream.local,
                peer: stream.peer,
                peer_id: stream.peer_id,
                target: stream.target,
                protocol: stream.protocol,
            });
            let io = TokioIo::new(stream.io);
            let (this, for_requests) = (self.clone(), info.clone());
            let service = hyper::service::service_fn(move |req| {
                let (this, info) = (this.clone(), for_requests.clone());
                async move { Ok::<_, Infallible>(this.forward(&info, req).await) }
            });
            let served = match info.protocol {
                Detected::Http2 => {
                    hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                        .serve_connection(io, service)
                        .await
                }
                _ => {
                    // The timer makes hyper's header read timeout (30 s) apply: a client that
                    // never finishes its request head cannot hold the stream.
                    hyper::server::conn::http1::Builder::new()
                        .timer(hyper_util::rt::TokioTimer::new())
                        .serve_connection(io, service)
                        .await
                }
            };
            if let Err(e) = served {
                tracing::debug!(waypoint = %info.local.workload.key(), peer = %info.peer, error = %e, "HTTP stream ended with an error");
            }
        })
    }
}

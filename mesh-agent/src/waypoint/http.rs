//! The waypoint's HTTP side: a stream the proxy detected as HTTP is served with hyper (HTTP/1.1
//! or HTTP/2, as the client spoke), and each request is forwarded over an upstream HTTP
//! connection of the same version, carried in an HBONE tunnel the waypoint opens with its own
//! identity. Upstream connections are pooled per backend and reused across downstream requests
//! and connections.
use std::collections::HashMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::{combinators::BoxBody, BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};

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
    pool: Mutex<HashMap<(SocketAddr, Detected), Vec<Sender>>>,
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
    pub fn new(proxy: Arc<Proxy>) -> Arc<Http> {
        Arc::new(Http {
            proxy,
            pool: Mutex::default(),
        })
    }

    fn idle(&self, key: (SocketAddr, Detected)) -> Option<Sender> {
        let mut pool = self.pool.lock().unwrap_or_else(|e| e.into_inner());
        let senders = pool.get_mut(&key)?;
        // Closed ones go; busy ones (an HTTP/1 connection whose last response is still being
        // read) stay for later.
        senders.retain(|s| !s.is_closed());
        let ready = senders.iter().position(Sender::is_ready)?;
        Some(senders.swap_remove(ready))
    }

    fn put_back(&self, key: (SocketAddr, Detected), sender: Sender) {
        let mut pool = self.pool.lock().unwrap_or_else(|e| e.into_inner());
        // Backends gone from the config keep no connections.
        pool.retain(|_, senders| {
            senders.retain(|s| !s.is_closed());
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
    ) -> Result<Sender, String> {
        let connected = self
            .proxy
            .connect_upstream(&stream.local, stream.peer, backend)
            .await
            .map_err(|f| f.error.to_string())?;
        let io = match connected.upstream {
            Upstream::Hbone(s) => TokioIo::new(Box::new(s) as Box<dyn Io>),
            Upstream::Tcp(s) => TokioIo::new(Box::new(s) as Box<dyn Io>),
        };
        let what = |e: hyper::Error| format!("upstream HTTP handshake: {e}");
        if protocol == Detected::Http2 {
            let (sender, conn) = hyper::client::conn::http2::handshake(TokioExecutor::new(), io)
                .await
                .map_err(what)?;
            tokio::spawn(conn);
            Ok(Sender::H2(sender))
        } else {
            let (sender, conn) = hyper::client::conn::http1::handshake(io)
                .await
                .map_err(what)?;
            tokio::spawn(conn);
            Ok(Sender::H1(sender))
        }
    }

    async fn forward(&self, stream: &StreamInfo, req: Request<Incoming>) -> Response<Body> {
        let started = Instant::now();
        let (method, path) = (req.method().clone(), req.uri().path().to_string());
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
        let verdict = authorize_client(
            &self.proxy.state(),
            &stream.local.workload,
            backend,
            client,
            Some(&attributes),
        );
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
            return text(StatusCode::FORBIDDEN, "RBAC: access denied");
        }
        let mut req = req;
        strip_hop_by_hop(req.headers_mut());
        let key = (backend, stream.protocol);
        let mut sender = match self.idle(key) {
            Some(sender) => sender,
            None => match self.connect(stream, backend, stream.protocol).await {
                Ok(sender) => sender,
                Err(e) => {
                    tracing::warn!(%backend, error = %e, "upstream connect failed");
                    return text(StatusCode::SERVICE_UNAVAILABLE, "upstream connect error");
                }
            },
        };
        let req = req.map(|b| b.boxed());
        let result = sender.send(req).await;
        let response = match result {
            Ok(mut response) => {
                self.put_back(key, sender);
                strip_hop_by_hop(response.headers_mut());
                response.map(|b| b.boxed())
            }
            Err(e) => {
                tracing::warn!(%backend, error = %e, "upstream request failed");
                text(StatusCode::SERVICE_UNAVAILABLE, "upstream reset")
            }
        };
        tracing::info!(
            waypoint = %stream.local.workload.key(),
            src_principal = %stream.peer_id,
            %method,
            authority = %backend,
            %path,
            status = response.status().as_u16(),
            duration_ms = started.elapsed().as_millis() as u64,
            "request"
        );
        response
    }
}

/// What a request needs of the stream it came on.
struct StreamInfo {
    local: Arc<crate::proxy::Local>,
    peer: SocketAddr,
    peer_id: Arc<crate::identity::Identity>,
    target: SocketAddr,
    protocol: Detected,
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
            let info = Arc::new(StreamInfo {
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

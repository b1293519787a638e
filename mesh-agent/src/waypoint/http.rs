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

use crate::proxy::{BoxFuture, Detected, HttpHandler, HttpStream, Proxy, Upstream};

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
        // Closed or busy ones go: an HTTP/1 connection is busy until its last response is read.
        while let Some(sender) = senders.pop() {
            if sender.is_ready() {
                return Some(sender);
            }
        }
        None
    }

    fn put_back(&self, key: (SocketAddr, Detected), sender: Sender) {
        let mut pool = self.pool.lock().unwrap_or_else(|e| e.into_inner());
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
            Ok(response) => {
                self.put_back(key, sender);
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
                    hyper::server::conn::http1::Builder::new()
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

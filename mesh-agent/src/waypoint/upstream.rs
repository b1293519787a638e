//! Upstream HTTP connections of the waypoint: each is an HTTP/1.1 or HTTP/2 client connection
//! carried in an HBONE tunnel the waypoint opens with its own identity, pooled per (backend
//! address, protocol) and reused across downstream requests and connections.
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::combinators::BoxBody;
use hyper::body::Incoming;
use hyper::client::conn::TrySendError;
use hyper_util::rt::{TokioExecutor, TokioIo};

use crate::proxy::{Detected, Local, Proxy, Upstream};

pub type Body = BoxBody<Bytes, hyper::Error>;

/// Idle upstream connections kept per backend.
const MAX_IDLE_PER_BACKEND: usize = 64;

/// A pool key: the address dialed (a service VIP and port, or a workload address) and the
/// protocol spoken on it.
pub type Key = (SocketAddr, Detected);

/// One upstream HTTP connection's sending half.
pub enum Sender {
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
    /// No connection could be opened (Envoy's response flag `UF`).
    #[error("upstream connect error: {0}")]
    Connect(String),
    /// The connection failed while the request was on it (`UC`).
    #[error("upstream connection terminated: {0}")]
    Reset(String),
}

/// The pool of idle upstream connections.
#[derive(Default)]
pub struct Pool {
    idle: Mutex<HashMap<Key, Vec<Sender>>>,
}

impl Pool {
    /// An idle connection for `key`, if one is ready.
    fn take(&self, key: Key) -> Option<Sender> {
        let mut pool = self.idle.lock().unwrap_or_else(|e| e.into_inner());
        let senders = pool.get_mut(&key)?;
        // Closed ones go; busy ones (an HTTP/1 connection whose last response is still being
        // read) stay for later.
        senders.retain(|s| !s.is_closed());
        let ready = senders.iter().position(Sender::is_ready)?;
        Some(senders.swap_remove(ready))
    }

    /// Keeps `sender` for the next request to `key`.
    fn put_back(&self, key: Key, sender: Sender) {
        let mut pool = self.idle.lock().unwrap_or_else(|e| e.into_inner());
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

    /// Sends `req` to `key` on an idle connection, else a new one, opened for the client at
    /// `peer`. A pooled connection that closed before it started sending the request (the
    /// server's keep-alive ended at the same moment) is not the client's failure: the request is
    /// sent again, once, on a new connection.
    pub async fn send(
        &self,
        proxy: &Proxy,
        local: &Arc<Local>,
        peer: SocketAddr,
        key: Key,
        req: Request<Body>,
    ) -> Result<Response<Incoming>, UpstreamError> {
        let (mut sender, reused) = match self.take(key) {
            Some(sender) => (sender, true),
            None => (self.connect(proxy, local, peer, key).await?, false),
        };
        let mut req = req;
        if reused {
            match sender.try_send(req).await {
                Ok(response) => {
                    self.put_back(key, sender);
                    return Ok(response);
                }
                Err(mut e) => match e.take_message() {
                    Some(unsent) => {
                        tracing::debug!(upstream = %key.0, error = %e.error(), "pooled connection closed before the request; sending it on a new one");
                        req = unsent;
                        sender = self.connect(proxy, local, peer, key).await?;
                    }
                    None => return Err(UpstreamError::Reset(e.error().to_string())),
                },
            }
        }
        match sender.try_send(req).await {
            Ok(response) => {
                self.put_back(key, sender);
                Ok(response)
            }
            Err(e) => Err(UpstreamError::Reset(e.error().to_string())),
        }
    }

    /// A new connection to an endpoint of `key.0` over HBONE, opened for the client at `peer`.
    async fn connect(
        &self,
        proxy: &Proxy,
        local: &Arc<Local>,
        peer: SocketAddr,
        key: Key,
    ) -> Result<Sender, UpstreamError> {
        let connected = proxy
            .connect_upstream(local, peer, key.0)
            .await
            .map_err(|f| UpstreamError::Connect(f.error.to_string()))?;
        let io = match connected.upstream {
            Upstream::Hbone(s) => TokioIo::new(Box::new(s) as Box<dyn Io>),
            Upstream::Tcp(s) => TokioIo::new(Box::new(s) as Box<dyn Io>),
        };
        let what = |e: hyper::Error| UpstreamError::Connect(format!("HTTP handshake: {e}"));
        if key.1 == Detected::Http2 {
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
}

trait Io: tokio::io::AsyncRead + tokio::io::AsyncWrite + Send + Unpin {}
impl<T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Send + Unpin> Io for T {}

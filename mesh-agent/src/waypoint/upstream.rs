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

    pub async fn send(&mut self, req: Request<Body>) -> hyper::Result<Response<Incoming>> {
        match self {
            Sender::H1(s) => s.send_request(req).await,
            Sender::H2(s) => s.send_request(req).await,
        }
    }
}

/// The pool of idle upstream connections.
#[derive(Default)]
pub struct Pool {
    idle: Mutex<HashMap<Key, Vec<Sender>>>,
}

impl Pool {
    /// An idle connection for `key`, if one is ready.
    pub fn take(&self, key: Key) -> Option<Sender> {
        let mut pool = self.idle.lock().unwrap_or_else(|e| e.into_inner());
        let senders = pool.get_mut(&key)?;
        // Closed ones go; busy ones (an HTTP/1 connection whose last response is still being
        // read) stay for later.
        senders.retain(|s| !s.is_closed());
        let ready = senders.iter().position(Sender::is_ready)?;
        Some(senders.swap_remove(ready))
    }

    /// Keeps `sender` for the next request to `key`.
    pub fn put_back(&self, key: Key, sender: Sender) {
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

    /// An idle connection for `key`, else a new one to an endpoint of `key.0` over HBONE,
    /// opened for the client at `peer`.
    pub async fn get(
        &self,
        proxy: &Proxy,
        local: &Arc<Local>,
        peer: SocketAddr,
        key: Key,
    ) -> Result<Sender, String> {
        if let Some(sender) = self.take(key) {
            return Ok(sender);
        }
        let connected = proxy
            .connect_upstream(local, peer, key.0)
            .await
            .map_err(|f| f.error.to_string())?;
        let io = match connected.upstream {
            Upstream::Hbone(s) => TokioIo::new(Box::new(s) as Box<dyn Io>),
            Upstream::Tcp(s) => TokioIo::new(Box::new(s) as Box<dyn Io>),
        };
        let what = |e: hyper::Error| format!("upstream HTTP handshake: {e}");
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

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

use super::telemetry::{ResponseFlag, UpstreamInfo};
use crate::proxy::{Detected, Local, Proxy, Upstream};
use crate::state::State;

pub type Body = BoxBody<Bytes, hyper::Error>;

/// Idle upstream connections kept per backend.
const MAX_IDLE_PER_BACKEND: usize = 64;

/// A pool key: the address dialed (a service VIP and port, or a workload address) and the
/// protocol spoken on it.
pub type Key = (SocketAddr, Detected);

/// A pooled upstream connection and where it goes (for the request metrics and access log).
struct Conn {
    sender: Sender,
    upstream: Arc<UpstreamInfo>,
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

/// The pool of idle upstream connections.
#[derive(Default)]
pub struct Pool {
    idle: Mutex<HashMap<Key, Vec<Conn>>>,
}

impl Pool {
    /// An idle connection for `key`, if one is ready.
    fn take(&self, key: Key, state: &State) -> Option<Conn> {
        let mut pool = self.idle.lock().unwrap_or_else(|e| e.into_inner());
        let conns = pool.get_mut(&key)?;
        // Closed ones go, and so do those to an endpoint that left the Service since they were
        // opened (scaled down, or relabeled out of it: it gets no new requests); busy ones (an
        // HTTP/1 connection whose last response is still being read) stay for later.
        conns.retain(|c| !c.sender.is_closed());
        loop {
            let ready = conns.iter().rposition(|c| c.sender.is_ready())?;
            let conn = conns.swap_remove(ready);
            if still_routed(state, key.0, conn.upstream.host) {
                return Some(conn);
            }
        }
    }

    /// Keeps `sender` for the next request to `key`.
    fn put_back(&self, key: Key, conn: Conn) {
        let mut pool = self.idle.lock().unwrap_or_else(|e| e.into_inner());
        // Closed connections go, of every backend (those to a former endpoint go when next
        // looked at in `take`).
        pool.retain(|_, conns| {
            conns.retain(|c| !c.sender.is_closed());
            !conns.is_empty()
        });
        let conns = pool.entry(key).or_default();
        if conns.len() < MAX_IDLE_PER_BACKEND {
            conns.push(conn);
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
    ) -> Result<(Response<Incoming>, Arc<UpstreamInfo>), UpstreamError> {
        let (mut conn, reused) = match self.take(key, &proxy.state()) {
            Some(conn) => (conn, true),
            None => (self.connect(proxy, local, peer, key).await?, false),
        };
        let mut req = req;
        if reused {
            match conn.sender.try_send(req).await {
                Ok(response) => {
                    let upstream = conn.upstream.clone();
                    self.put_back(key, conn);
                    return Ok((response, upstream));
                }
                Err(mut e) => match e.take_message() {
                    Some(unsent) => {
                        tracing::debug!(upstream = %key.0, error = %e.error(), "pooled connection closed before the request; sending it on a new one");
                        req = unsent;
                        conn = self.connect(proxy, local, peer, key).await?;
                    }
                    None => return Err(reset(e.error())),
                },
            }
        }
        match conn.sender.try_send(req).await {
            Ok(response) => {
                let upstream = conn.upstream.clone();
                self.put_back(key, conn);
                Ok((response, upstream))
            }
            Err(e) => Err(reset(e.error())),
        }
    }

    /// A new connection to an endpoint of `key.0` over HBONE, opened for the client at `peer`.
    async fn connect(
        &self,
        proxy: &Proxy,
        local: &Arc<Local>,
        peer: SocketAddr,
        key: Key,
    ) -> Result<Conn, UpstreamError> {
        let connected = proxy
            .connect_upstream(local, peer, key.0)
            .await
            .map_err(|f| {
                UpstreamError::Connect(f.error.to_string(), ResponseFlag::for_connect(&f.error))
            })?;
        let upstream = Arc::new(UpstreamInfo::new(&connected.routed));
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
        if key.1 == Detected::Http2 {
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

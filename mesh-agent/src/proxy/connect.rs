//! Connect: the last step of the outbound stack. A [`Routed`] connection to a mesh workload gets
//! an HBONE tunnel (mutual TLS with the local workload's identity, HTTP/2 CONNECT to
//! `<endpoint>:15008` with the headers of [`connect_request`], pooled per source and destination
//! identity); anything else gets plain TCP.
//! Every upstream socket is created in the listener's network namespace, with the proxy mark.
use std::net::SocketAddr;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use mesh_common::HBONE_PORT;
use tokio::net::TcpStream;

use super::budget::{boxed, BoxFuture};
use super::error::{Failure, ProxyError};
use super::hbone::{ConnectRequest, H2Stream, HbonePool, PoolKey};
use super::labels::workload_baggage;
use super::resolve::Routed;
use crate::identity::{CertManager, Identity};
use crate::net;
use crate::telemetry::Metrics;

/// An upstream connection, ready to relay.
pub enum Upstream {
    Tcp(TcpStream),
    Hbone(H2Stream),
}

/// A routed connection with its upstream open.
pub struct Connected {
    pub routed: Routed,
    pub upstream: Upstream,
}

/// The connect step: cheap to clone (shared state).
#[derive(Clone)]
pub struct Connect {
    inner: Arc<Connector>,
}

struct Connector {
    certs: Arc<CertManager>,
    pool: HbonePool,
    timeout: Duration,
    metrics: Arc<Metrics>,
}

impl Connect {
    pub fn new(
        certs: Arc<CertManager>,
        pool: HbonePool,
        timeout: Duration,
        metrics: Arc<Metrics>,
    ) -> Connect {
        Connect {
            inner: Arc::new(Connector {
                certs,
                pool,
                timeout,
                metrics,
            }),
        }
    }
}

impl tower::Service<Routed> for Connect {
    type Response = Connected;
    type Error = Failure;
    type Future = BoxFuture<Result<Connected, Failure>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Failure>> {
        // Bounded inside: the pool caps its waiters and every dial has a deadline.
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, routed: Routed) -> Self::Future {
        let connector = self.inner.clone();
        boxed("connect", async move {
            let upstream = match &routed.dst_identity {
                Some(dst_id) => connector.hbone(&routed, dst_id).await.map(Upstream::Hbone),
                None => net::connect(
                    routed.local.netns.as_deref(),
                    routed.route.target,
                    connector.timeout,
                )
                .await
                .map(Upstream::Tcp)
                .map_err(|error| ProxyError::UpstreamConnect {
                    dst: routed.route.target,
                    error,
                }),
            };
            match upstream {
                Ok(upstream) => Ok(Connected { routed, upstream }),
                Err(e) => Err(Failure::counted(e, routed.labels.clone())),
            }
        })
    }
}

impl Connector {
    /// Opens (or reuses) an HBONE connection to the destination's 15008 and sends a CONNECT for
    /// the route's target.
    async fn hbone(&self, routed: &Routed, dst_id: &Identity) -> Result<H2Stream, ProxyError> {
        let local = &routed.local;
        let route = &routed.route;
        let peer_ip = route
            .waypoint
            .as_ref()
            .map_or(route.target.ip(), |h| h.addr);
        let dst_addr = SocketAddr::new(peer_ip, HBONE_PORT);
        let key = PoolKey {
            src: local.identity.to_string(),
            src_ip: routed.client_addr.ip(),
            dst: dst_id.to_string(),
            dst_addr,
        };
        let req = connect_request(routed);
        let tls = self
            .certs
            .client_config(&local.identity, std::slice::from_ref(dst_id));
        let netns = local.netns.clone();
        let timeout = self.timeout;
        let dial = move || async move {
            let tcp = net::connect(netns.as_deref(), dst_addr, timeout).await?;
            let _ = tcp.set_nodelay(true);
            let name = rustls_pki_types::ServerName::IpAddress(dst_addr.ip().into());
            let connector = tokio_rustls::TlsConnector::from(tls);
            match tokio::time::timeout(timeout, connector.connect(name, tcp)).await {
                Ok(Ok(tls)) => Ok(tls),
                Ok(Err(e)) => Err(std::io::Error::new(
                    e.kind(),
                    format!("TLS handshake with {dst_addr} failed: {e}"),
                )),
                Err(_) => Err(std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    format!("TLS handshake with {dst_addr} timed out"),
                )),
            }
        };
        // Bounded: a peer that accepted the connection but never answers the CONNECT must not
        // hold the application's connection open.
        let stream =
            match tokio::time::timeout(timeout * 2, self.pool.connect(key, req, dial)).await {
                Ok(result) => result,
                Err(_) => {
                    return Err(ProxyError::HboneTimeout {
                        peer: dst_addr,
                        after: timeout * 2,
                    })
                }
            };
        self.metrics
            .hbone_pool_connections
            .set(self.pool.connections() as i64);
        stream.map_err(|error| ProxyError::Hbone {
            peer: dst_addr,
            error,
        })
    }
}

/// The CONNECT for a routed connection, with what ztunnel sends: the target, the client's
/// address and (when a service VIP was dialed) the service's host name in `forwarded`, and the
/// source's `baggage`.
pub(super) fn connect_request(routed: &Routed) -> ConnectRequest {
    ConnectRequest {
        authority: routed.route.target,
        forwarded_for: routed.client_addr,
        forwarded_host: routed.route.service.as_ref().map(|s| s.hostname()),
        baggage: Some(workload_baggage(&routed.src).header_value()),
        traceparent: None,
    }
}

//! Outbound capture: the in-pod listener on 15001.
//!
//! The eBPF connect hook rewrote the application's `connect()` to `127.0.0.1:15001` (or
//! `[::1]:15001`) inside the pod and recorded the original destination under the pod's netns cookie
//! and the application's source port. On accept the proxy takes that record and resolves it: a
//! service VIP is load-balanced to an endpoint; an enrolled destination is reached over HBONE
//! (mutual TLS, HTTP/2 CONNECT to `<pod ip>:15008`); anything else gets plain TCP. Every upstream
//! socket is created inside the source pod (so it carries the pod's own IP) with the proxy mark.
use std::net::{IpAddr, Ipv6Addr, SocketAddr};
use std::sync::Arc;

use mesh_common::{FlowKey, OrigDst, AF_INET, AF_INET6, HBONE_PORT};
use tokio::net::{TcpListener, TcpStream};

use super::accounting::{failed, Accounting};
use super::hbone::{ConnectRequest, H2Stream, PoolKey};
use super::labels::Ends;
use super::relay::relay;
use super::resolve::{resolve, Route};
use super::{PodContext, Proxy, ProxyError};
use crate::identity::Identity;
use crate::model::Workload;
use crate::net;

/// Accepts captured connections until the task is aborted.
pub async fn serve_outbound(listener: TcpListener, pod: Arc<PodContext>, proxy: Arc<Proxy>) {
    super::accept_loop(
        listener,
        pod,
        proxy,
        "outbound",
        // A shed connection's record goes too, or a shed storm would fill the map.
        |proxy, pod, peer| {
            let _ = original_destination(proxy, pod, peer);
        },
        |stream, peer, pod, proxy| async move { handle(stream, peer, &pod, &proxy).await },
    )
    .await
}

/// The original destination as a socket address (IPv4-mapped addresses become IPv4).
fn original_address(orig: &OrigDst) -> SocketAddr {
    let ip = IpAddr::V6(Ipv6Addr::from(orig.addr)).to_canonical();
    SocketAddr::new(ip, orig.port)
}

fn flow_key(netns_cookie: u64, peer: SocketAddr) -> FlowKey {
    FlowKey {
        netns: netns_cookie,
        port: peer.port(),
        family: if peer.is_ipv4() { AF_INET } else { AF_INET6 },
        _pad: 0,
    }
}

/// Where the application was connecting to, as the connect hook recorded it.
fn original_destination(
    proxy: &Proxy,
    pod: &PodContext,
    peer: SocketAddr,
) -> Result<SocketAddr, ProxyError> {
    match proxy.orig_dst.take(&flow_key(pod.netns.cookie(), peer)) {
        Ok(Some(orig)) => Ok(original_address(&orig)),
        Ok(None) => Err(ProxyError::NoOriginalDestination),
        Err(e) => Err(ProxyError::OrigDstMap(e.to_string())),
    }
}

async fn handle(client: TcpStream, peer: SocketAddr, pod: &PodContext, proxy: &Proxy) {
    let src_key = pod.workload.key();
    let orig = match original_destination(proxy, pod, peer) {
        Ok(orig) => orig,
        Err(e) => {
            tracing::warn!(pod = %src_key, %peer, reason = %e.reason(), error = %e, "closing the connection");
            return net::reset(client);
        }
    };
    let state = proxy.state.borrow().clone();
    // Labels may have changed since the pod was wired: read the current ones.
    let src = state
        .workloads
        .get(&src_key)
        .unwrap_or(&pod.workload)
        .clone();
    let route = match resolve(&state, orig, &proxy.balancer) {
        Ok(route) => route,
        Err(e) => {
            let e = ProxyError::Route(e);
            let ends = Ends {
                reporter: "source",
                src: Some(&src),
                src_identity: Some(&pod.identity),
                dst: None,
                dst_identity: None,
                service: state.service_by_vip(orig.ip()).map(Arc::as_ref),
                mtls: false,
            };
            failed(&proxy.metrics, ends.labels(), e.reason());
            tracing::warn!(src_workload = %src_key, dst = %orig, reason = %e.reason(), error = %e, "resetting the connection");
            return net::reset(client);
        }
    };
    let dst_identity = route
        .workload
        .as_ref()
        .filter(|_| route.is_mesh())
        .map(|w| proxy.identity_of(w));
    let ends = Ends {
        reporter: "source",
        src: Some(&src),
        src_identity: Some(&pod.identity),
        dst: route.workload.as_deref(),
        dst_identity: dst_identity.as_ref(),
        service: route.service.as_deref(),
        mtls: dst_identity.is_some(),
    };
    let labels = ends.labels();
    let _active = route.workload.as_ref().map(|w| proxy.balancer.track(w));
    let client_addr = SocketAddr::new(
        pod_ip(&src, route.target.is_ipv4()).unwrap_or(peer.ip()),
        peer.port(),
    );

    let upstream = match &dst_identity {
        Some(dst_id) => connect_hbone(proxy, pod, &route, dst_id, client_addr)
            .await
            .map(Upstream::Hbone),
        None => net::connect(Some(&pod.netns), route.target, proxy.connect_timeout)
            .await
            .map(Upstream::Tcp)
            .map_err(|error| ProxyError::UpstreamConnect {
                dst: route.target,
                error,
            }),
    };
    let mut upstream = match upstream {
        Ok(u) => u,
        Err(e) => {
            failed(&proxy.metrics, labels, e.reason());
            tracing::warn!(src_workload = %src_key, dst = %route.target, reason = %e.reason(), error = %e, "upstream connect failed; resetting the client");
            return net::reset(client);
        }
    };
    let mut client = client;
    let _ = client.set_nodelay(true);
    let accounting = Accounting::open(proxy.metrics.clone(), labels);
    let result = match &mut upstream {
        Upstream::Tcp(s) => relay(&mut client, s, accounting.meter()).await,
        Upstream::Hbone(s) => relay(&mut client, s, accounting.meter()).await,
    };
    let error = result.err().map(|e| e.to_string());
    let transferred = accounting.meter().transferred();
    let duration = accounting.close();
    tracing::info!(
        src_workload = %src_key,
        src_addr = %client_addr,
        dst = %route.target,
        dst_workload = %route.workload.as_ref().map_or_else(|| "-".to_string(), |w| w.key()),
        dst_service = %route.service.as_ref().map_or_else(|| "-".to_string(), |s| s.hostname()),
        dst_principal = %dst_identity.as_ref().map_or_else(|| "-".to_string(), |i| i.to_string()),
        bytes_sent = transferred.client_to_server,
        bytes_received = transferred.server_to_client,
        duration_ms = duration.as_millis() as u64,
        security = %if dst_identity.is_some() { "mutual_tls" } else { "none" },
        error = %error.as_deref().unwrap_or("-"),
        "outbound connection complete"
    );
}

enum Upstream {
    Tcp(TcpStream),
    Hbone(H2Stream),
}

/// The pod's address of the family in use (what the upstream sees as the source).
fn pod_ip(w: &Workload, v4: bool) -> Option<IpAddr> {
    if v4 {
        w.ip4().map(IpAddr::V4)
    } else {
        w.ip6().map(IpAddr::V6)
    }
}

/// Opens (or reuses) an HBONE connection to the destination pod's 15008 and sends a CONNECT for
/// the route's target.
async fn connect_hbone(
    proxy: &Proxy,
    pod: &PodContext,
    route: &Route,
    dst_id: &Identity,
    client_addr: SocketAddr,
) -> Result<H2Stream, ProxyError> {
    let dst_addr = SocketAddr::new(route.target.ip(), HBONE_PORT);
    let key = PoolKey {
        src: pod.identity.to_string(),
        src_ip: client_addr.ip(),
        dst: dst_id.to_string(),
        dst_addr,
    };
    let req = ConnectRequest {
        authority: route.target,
        forwarded_for: client_addr,
        baggage: Some(baggage(&pod.workload)),
        traceparent: None,
    };
    let tls = proxy
        .certs
        .client_config(&pod.identity, std::slice::from_ref(dst_id));
    let netns = pod.netns.clone();
    let timeout = proxy.connect_timeout;
    let dial = move || async move {
        let tcp = net::connect(Some(&netns), dst_addr, timeout).await?;
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
    // Bounded: a peer that accepted the connection but never answers the CONNECT must not hold
    // the application's connection open.
    let stream = match tokio::time::timeout(timeout * 2, proxy.pool.connect(key, req, dial)).await {
        Ok(result) => result,
        Err(_) => {
            return Err(ProxyError::HboneTimeout {
                peer: dst_addr,
                after: timeout * 2,
            })
        }
    };
    proxy
        .metrics
        .hbone_pool_connections
        .set(proxy.pool.connections() as i64);
    stream.map_err(|error| ProxyError::Hbone {
        peer: dst_addr,
        error,
    })
}

/// W3C baggage with the source's Kubernetes names, as Istio sends it.
fn baggage(w: &Workload) -> String {
    let mut b = format!(
        "k8s.namespace.name={},k8s.workload.name={},k8s.workload.type=pod,service.name={}",
        w.namespace,
        w.name,
        w.labels.get("app").unwrap_or(&w.name)
    );
    if let Some(version) = w.labels.get("version") {
        b.push_str(&format!(",service.version={version}"));
    }
    b
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn original_address_unmaps_ipv4() {
        let mut addr = [0u8; 16];
        addr[10] = 0xff;
        addr[11] = 0xff;
        addr[12..].copy_from_slice(&[10, 1, 2, 3]);
        let orig = OrigDst {
            addr,
            port: 80,
            family: AF_INET,
            _pad: 0,
            netns: 7,
        };
        assert_eq!(original_address(&orig), "10.1.2.3:80".parse().unwrap());
        let v6: Ipv6Addr = "fd00::1234".parse().unwrap();
        let orig = OrigDst {
            addr: v6.octets(),
            port: 8080,
            family: AF_INET6,
            _pad: 0,
            netns: 7,
        };
        assert_eq!(
            original_address(&orig),
            "[fd00::1234]:8080".parse().unwrap()
        );
    }

    #[test]
    fn flow_key_uses_the_peer_family_and_port() {
        let k = flow_key(9, "127.0.0.1:40000".parse().unwrap());
        assert_eq!((k.netns, k.port, k.family), (9, 40000, AF_INET));
        let k = flow_key(9, "[::1]:40001".parse().unwrap());
        assert_eq!((k.netns, k.port, k.family), (9, 40001, AF_INET6));
    }
}

//! Outbound capture: the in-pod listener on 15001.
//!
//! The eBPF connect hook rewrote the application's `connect()` to `127.0.0.1:15001` (or
//! `[::1]:15001`) inside the pod and recorded the original destination under the pod's netns cookie
//! and the application's source port. On accept the proxy takes that record and hands the
//! connection to the outbound stack ([`Proxy::outbound`]: resolve, then connect); whatever it
//! returns is relayed and accounted here. A connection that fails before the relay is reset and
//! counted, once, here.
use std::net::{IpAddr, Ipv6Addr, SocketAddr};
use std::sync::Arc;

use mesh_common::{FlowKey, OrigDst, AF_INET, AF_INET6};
use tokio::net::{TcpListener, TcpStream};
use tower::ServiceExt;

use super::accept::{accept_loop, Local};
use super::accounting::{failed, Accounting};
use super::connect::Upstream;
use super::relay::relay;
use super::resolve::Target;
use super::{Proxy, ProxyError};
use crate::net;

/// Accepts captured connections until the task is aborted.
pub async fn serve_outbound(listener: TcpListener, local: Arc<Local>, proxy: Arc<Proxy>) {
    accept_loop(
        listener,
        "outbound",
        local,
        proxy,
        // A shed connection's record goes too, or a shed storm would fill the map.
        |proxy, local, peer| {
            let _ = original_destination(proxy, local, peer);
        },
        handle,
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

/// Where the application was connecting to, as the connect hook recorded it. Only a listener in
/// a captured network namespace has records.
fn original_destination(
    proxy: &Proxy,
    local: &Local,
    peer: SocketAddr,
) -> Result<SocketAddr, ProxyError> {
    let (Some(netns), Some(table)) = (&local.netns, &proxy.orig_dst) else {
        return Err(ProxyError::NoOriginalDestination);
    };
    match table.take(&flow_key(netns.cookie(), peer)) {
        Ok(Some(orig)) => Ok(original_address(&orig)),
        Ok(None) => Err(ProxyError::NoOriginalDestination),
        Err(e) => Err(ProxyError::OrigDstMap(e.to_string())),
    }
}

pub(super) async fn handle(
    client: TcpStream,
    peer: SocketAddr,
    local: Arc<Local>,
    proxy: Arc<Proxy>,
) {
    let orig = match original_destination(&proxy, &local, peer) {
        Ok(orig) => orig,
        Err(e) => {
            tracing::warn!(workload = %local.workload.key(), %peer, reason = %e.reason(), error = %e, "closing the connection");
            return net::reset(client);
        }
    };
    let src_key = local.workload.key();
    let target = Target { local, orig, peer };
    let connected = match proxy.outbound.clone().oneshot(target).await {
        Ok(connected) => connected,
        Err(failure) => {
            let e = failure.error;
            if let Some(labels) = failure.labels {
                failed(&proxy.metrics, *labels, e.reason());
            }
            tracing::warn!(src_workload = %src_key, dst = %orig, reason = %e.reason(), error = %e, "outbound connection failed; resetting the client");
            return net::reset(client);
        }
    };
    let (routed, mut upstream) = (connected.routed, connected.upstream);
    let mut client = client;
    let _ = client.set_nodelay(true);
    let accounting = Accounting::open(proxy.metrics.clone(), routed.labels.clone());
    let result = match &mut upstream {
        Upstream::Tcp(s) => relay(&mut client, s, accounting.meter()).await,
        Upstream::Hbone(s) => relay(&mut client, s, accounting.meter()).await,
    };
    let error = result.err().map(|e| e.to_string());
    let transferred = accounting.meter().transferred();
    let duration = accounting.close();
    let route = &routed.route;
    let dst_identity = routed.dst_identity.as_ref();
    tracing::info!(
        src_workload = %src_key,
        src_addr = %routed.client_addr,
        dst = %route.target,
        dst_workload = %route.workload.as_ref().map_or_else(|| "-".to_string(), |w| w.key()),
        dst_service = %route.service.as_ref().map_or_else(|| "-".to_string(), |s| s.hostname()),
        dst_principal = %dst_identity.map_or_else(|| "-".to_string(), |i| i.to_string()),
        waypoint = %route.waypoint.as_ref().map_or("-", |h| h.waypoint.as_str()),
        bytes_sent = transferred.client_to_server,
        bytes_received = transferred.server_to_client,
        duration_ms = duration.as_millis() as u64,
        security = %if dst_identity.is_some() { "mutual_tls" } else { "none" },
        error = %error.as_deref().unwrap_or("-"),
        "outbound connection complete"
    );
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

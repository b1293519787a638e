//! Outbound capture: the in-pod listener on 15001.
//!
//! The eBPF connect hook rewrote the application's `connect()` to `127.0.0.1:15001` (or
//! `[::1]:15001`) inside the pod and recorded the original destination under the pod's netns cookie
//! and the application's source port. On accept the proxy takes that record, connects to the
//! original destination from inside the same pod (so the packet carries the pod's own IP), with
//! the proxy mark so the hook lets it through, and relays bytes both ways.
use std::net::{IpAddr, Ipv6Addr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use mesh_common::{FlowKey, OrigDst, AF_INET, AF_INET6};
use socket2::Domain;
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::sync::watch;

use super::relay::relay;
use super::tracker::ConnTracker;
use crate::datapath::OrigDstTable;
use crate::inpod::Netns;
use crate::state::{State, Workload};
use crate::telemetry::{ConnLabels, Metrics};

/// Everything a connection handler needs; shared by all pods of the node.
pub struct Proxy {
    pub state: watch::Receiver<Arc<State>>,
    pub orig_dst: OrigDstTable,
    pub metrics: Arc<Metrics>,
    pub tracker: ConnTracker,
    pub connect_timeout: Duration,
}

/// The enrolled pod a listener belongs to.
pub struct PodContext {
    pub workload: Arc<Workload>,
    pub netns: Arc<Netns>,
}

/// Accepts captured connections until the task is aborted.
pub async fn serve_outbound(listener: TcpListener, pod: Arc<PodContext>, proxy: Arc<Proxy>) {
    loop {
        match listener.accept().await {
            Ok((stream, peer)) => {
                let guard = proxy.tracker.track();
                let (pod, proxy) = (pod.clone(), proxy.clone());
                tokio::spawn(async move {
                    handle(stream, peer, &pod, &proxy).await;
                    drop(guard);
                });
            }
            Err(e) => {
                // EMFILE and friends: back off instead of spinning.
                tracing::warn!(pod = %pod.workload.key(), error = %e, "outbound accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
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

async fn handle(mut client: TcpStream, peer: SocketAddr, pod: &PodContext, proxy: &Proxy) {
    let src = pod.workload.key();
    let orig = match proxy.orig_dst.take(&flow_key(pod.netns.cookie(), peer)) {
        Ok(Some(orig)) => original_address(&orig),
        Ok(None) => {
            tracing::warn!(pod = %src, %peer, "no original destination recorded for this connection (was port 15001 dialed directly?); closing");
            reset(client);
            return;
        }
        Err(e) => {
            tracing::error!(pod = %src, %peer, error = %e, "cannot read the original destination map; closing");
            reset(client);
            return;
        }
    };
    let state = proxy.state.borrow().clone();
    // Labels may have changed since the pod was wired: read the current ones.
    let src_workload = state.workloads.get(&src).unwrap_or(&pod.workload);
    let dst_workload = state.workload_by_ip(orig.ip());
    let labels = labels(src_workload, dst_workload.map(Arc::as_ref));
    let started = Instant::now();

    let mut upstream = match connect_from_pod(&pod.netns, orig, proxy.connect_timeout).await {
        Ok(s) => s,
        Err(e) => {
            tracing::warn!(src_workload = %src, dst = %orig, error = %e, "upstream connect failed; resetting the client");
            reset(client);
            return;
        }
    };
    let _ = client.set_nodelay(true);
    let _ = upstream.set_nodelay(true);
    proxy
        .metrics
        .connections_opened
        .get_or_create(&labels)
        .inc();
    let result = relay(&mut client, &mut upstream).await;
    let elapsed = started.elapsed();
    proxy
        .metrics
        .connections_closed
        .get_or_create(&labels)
        .inc();
    let (received, sent, error) = match &result {
        Ok(t) => (t.client_to_server, t.server_to_client, None),
        Err(e) => (0, 0, Some(e.to_string())),
    };
    proxy
        .metrics
        .received_bytes
        .get_or_create(&labels)
        .inc_by(received);
    proxy.metrics.sent_bytes.get_or_create(&labels).inc_by(sent);
    tracing::info!(
        src_workload = %src,
        src_addr = %pod_source(&pod.workload, orig.is_ipv4()),
        dst = %orig,
        dst_workload = %labels.destination_workload_namespace_name(),
        bytes_sent = received,
        bytes_received = sent,
        duration_ms = elapsed.as_millis() as u64,
        security = "none",
        error = error.as_deref().unwrap_or("-"),
        "connection complete"
    );
}

/// The pod address the upstream sees (for the access log).
fn pod_source(w: &Workload, v4: bool) -> String {
    let ip = if v4 {
        w.ip4().map(IpAddr::V4)
    } else {
        w.ip6().map(IpAddr::V6)
    };
    ip.map_or_else(|| "-".into(), |ip| ip.to_string())
}

/// Connects to `dst` with a socket created inside the pod's network namespace.
async fn connect_from_pod(
    netns: &Netns,
    dst: SocketAddr,
    timeout: Duration,
) -> std::io::Result<TcpStream> {
    let domain = if dst.is_ipv4() {
        Domain::IPV4
    } else {
        Domain::IPV6
    };
    let socket = netns.socket(domain)?;
    super::mark_socket(&socket)?;
    let socket = TcpSocket::from_std_stream(std::net::TcpStream::from(socket));
    match tokio::time::timeout(timeout, socket.connect(dst)).await {
        Ok(result) => result,
        Err(_) => Err(std::io::Error::new(
            std::io::ErrorKind::TimedOut,
            format!("no answer from {dst} within {timeout:?}"),
        )),
    }
}

/// Closes with RST so the application sees a failure at once, not a clean EOF. (A zero linger
/// never blocks: the kernel drops the socket's state and sends the reset immediately.)
fn reset(stream: TcpStream) {
    let _ = socket2::SockRef::from(&stream).set_linger(Some(Duration::ZERO));
    drop(stream);
}

fn app_label(w: &Workload) -> String {
    w.labels
        .get("app")
        .or_else(|| w.labels.get("app.kubernetes.io/name"))
        .cloned()
        .unwrap_or_else(|| "unknown".into())
}

fn labels(src: &Workload, dst: Option<&Workload>) -> ConnLabels {
    let unknown = || "unknown".to_string();
    ConnLabels {
        reporter: "source",
        source_workload: src.name.clone(),
        source_workload_namespace: src.namespace.clone(),
        source_app: app_label(src),
        destination_workload: dst.map_or_else(unknown, |d| d.name.clone()),
        destination_workload_namespace: dst.map_or_else(unknown, |d| d.namespace.clone()),
        destination_app: dst.map_or_else(unknown, app_label),
        request_protocol: "tcp",
        connection_security_policy: "none",
    }
}

impl ConnLabels {
    fn destination_workload_namespace_name(&self) -> String {
        format!(
            "{}/{}",
            self.destination_workload_namespace, self.destination_workload
        )
    }
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

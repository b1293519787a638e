//! Inbound plaintext: the in-pod listener on 15006.
//!
//! The `sk_lookup` program hands this listener every TCP connection that arrives at the pod from
//! outside (any port but 15008 and the excluded ones). The accepted socket's local address is
//! the address the client dialed, so the original port needs no map. Policy is evaluated with no
//! peer identity: STRICT mTLS refuses it, and identity-based rules cannot match it.
use std::sync::Arc;

use tokio::net::{TcpListener, TcpStream};

use super::accounting::failed;
use super::inbound::{authorize, deliver, destination_labels};
use super::live::ConnFacts;
use super::{PodContext, Proxy, ProxyError};
use crate::net;

/// Accepts captured plaintext connections until the task is aborted.
pub async fn serve_plaintext(listener: TcpListener, pod: Arc<PodContext>, proxy: Arc<Proxy>) {
    super::accept_loop(
        listener,
        pod,
        proxy,
        "inbound plaintext",
        |_, _, _| {},
        |stream, peer, pod, proxy| async move { handle(stream, peer, &pod, &proxy).await },
    )
    .await
}

async fn handle(client: TcpStream, peer: std::net::SocketAddr, pod: &PodContext, proxy: &Proxy) {
    if let Err(e) = connect_and_deliver(client, peer, pod, proxy).await {
        failed(
            &proxy.metrics,
            destination_labels(proxy, pod, peer, None),
            e.reason(),
        );
        tracing::warn!(pod = %pod.workload.key(), %peer, reason = %e.reason(), error = %e, "rejected inbound plaintext connection");
    }
}

/// Authorizes the connection, connects to the application as the client, relays. A connection
/// that fails before the relay is reset (the client sees a failure at once, not a clean EOF).
async fn connect_and_deliver(
    client: TcpStream,
    peer: std::net::SocketAddr,
    pod: &PodContext,
    proxy: &Proxy,
) -> Result<(), ProxyError> {
    let target = match client.local_addr() {
        Ok(addr) => std::net::SocketAddr::new(addr.ip().to_canonical(), addr.port()),
        Err(e) => {
            net::reset(client);
            return Err(ProxyError::LocalAddress(e));
        }
    };
    let facts = ConnFacts {
        workload: pod.workload.key(),
        dst_ip: target.ip(),
        dst_port: target.port(),
        src_ip: peer.ip().to_canonical(),
        src: None,
    };
    if let Err(decision) = authorize(proxy, pod, &facts) {
        net::reset(client);
        return Err(ProxyError::PolicyDenied(decision.reason.to_string()));
    }
    let app =
        match net::connect_transparent(Some(&pod.netns), peer.ip(), target, proxy.connect_timeout)
            .await
        {
            Ok(s) => s,
            Err(error) => {
                net::reset(client);
                return Err(ProxyError::UpstreamConnect { dst: target, error });
            }
        };
    let _ = client.set_nodelay(true);
    deliver(proxy, pod, facts, peer, client, app).await;
    Ok(())
}

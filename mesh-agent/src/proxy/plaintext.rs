//! Inbound plaintext: the in-pod listener on 15006.
//!
//! The `sk_lookup` program hands this listener every TCP connection that arrives at the pod from
//! outside (any port but 15008 and the excluded ones). The accepted socket's local address is
//! the address the client dialed, so the original port needs no map. The connection goes through
//! the inbound stack ([`Proxy::inbound`]) with no peer identity: STRICT mTLS refuses it, and
//! identity-based rules cannot match it.
use std::net::SocketAddr;
use std::sync::Arc;

use tokio::net::{TcpListener, TcpStream};
use tower::ServiceExt;

use super::accept::{accept_loop, Local};
use super::accounting::failed;
use super::authorize::{Admitted, Inbound};
use super::inbound::{deliver, destination_labels};
use super::live::ConnFacts;
use super::{Proxy, ProxyError};
use crate::net;

/// Accepts captured plaintext connections until the task is aborted.
pub async fn serve_plaintext(listener: TcpListener, local: Arc<Local>, proxy: Arc<Proxy>) {
    accept_loop(
        listener,
        "inbound plaintext",
        local,
        proxy,
        |_, _, _| {},
        handle,
    )
    .await
}

/// Authorizes the connection, connects to the application as the client, relays. A connection
/// that fails before the relay is reset (the client sees a failure at once, not a clean EOF).
pub(super) async fn handle(
    client: TcpStream,
    peer: SocketAddr,
    local: Arc<Local>,
    proxy: Arc<Proxy>,
) {
    let admitted = match client.local_addr() {
        Ok(addr) => {
            let conn = Inbound {
                facts: ConnFacts {
                    workload: local.workload.key(),
                    dst_ip: addr.ip().to_canonical(),
                    dst_port: addr.port(),
                    src_ip: peer.ip().to_canonical(),
                    src: None,
                },
                local: local.clone(),
                peer,
            };
            proxy.inbound.clone().oneshot(conn).await
        }
        Err(e) => Err(ProxyError::LocalAddress(e)),
    };
    let labels = || {
        let state = proxy.state.borrow().clone();
        destination_labels(&state, &local, peer, None, None, None)
    };
    match admitted {
        Ok(Admitted { conn, app }) => {
            let _ = client.set_nodelay(true);
            deliver(&proxy, conn, Box::new(labels()), client, app).await;
        }
        Err(e) => {
            net::reset(client);
            failed(&proxy.metrics, labels(), e.reason());
            tracing::warn!(workload = %local.workload.key(), %peer, reason = %e.reason(), error = %e, "rejected inbound plaintext connection");
        }
    }
}

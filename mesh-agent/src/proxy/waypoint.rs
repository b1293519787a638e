//! A waypoint's HBONE listener (15008 in the waypoint's own pod): the same accept, admission and
//! TLS as a pod's (with the waypoint's identity), but a CONNECT names a destination the waypoint
//! fronts (a service VIP and port, or a workload address) rather than the local workload. The
//! stream then goes through the outbound stack as the waypoint itself: resolved to an endpoint
//! (never back through the waypoint) and tunnelled there with the waypoint's identity.
use std::net::SocketAddr;
use std::sync::Arc;

use tokio::net::TcpListener;
use tower::ServiceExt;

use super::accept::Local;
use super::accounting::{failed, Accounting};
use super::connect::Upstream;
use super::hbone::InboundRequest;
use super::inbound::{refuse, serve_hbone};
use super::relay::relay;
use super::resolve::Target;
use super::{Proxy, ProxyError};
use crate::identity::Identity;
use crate::state::{State, Via};

/// The `reporter` label of what a waypoint counts.
const REPORTER: &str = "waypoint";

/// Serves a waypoint's HBONE listener until the task is aborted.
pub async fn serve_waypoint(listener: TcpListener, local: Arc<Local>, proxy: Arc<Proxy>) {
    serve_hbone(listener, local, proxy, ("waypoint stream", handle_stream)).await
}

/// Whether the waypoint `local` belongs to fronts `target`: a service VIP, or a workload address,
/// whose traffic the state sends through it.
fn fronts(state: &State, local: &Local, target: SocketAddr) -> bool {
    let ours = |via: &Via| matches!(via, Via::Waypoint(w) if w.serves_from(&local.workload));
    let ip = target.ip().to_canonical();
    match state.service_by_vip(ip) {
        Some(svc) => ours(&svc.via),
        None => state
            .workload_by_ip(ip)
            .is_some_and(|w| ours(state.workload_via(w))),
    }
}

async fn handle_stream(
    req: InboundRequest,
    peer: SocketAddr,
    peer_id: Arc<Identity>,
    local: Arc<Local>,
    proxy: Arc<Proxy>,
) {
    let target = match req.target() {
        Ok(target) => target,
        Err(e) => {
            return refuse(
                &proxy,
                &local,
                peer,
                &peer_id,
                req,
                ProxyError::BadRequest(e),
            )
        }
    };
    if !fronts(&proxy.state.borrow(), &local, target) {
        let error = ProxyError::NotFronted {
            target,
            waypoint: local.workload.key(),
        };
        return refuse(&proxy, &local, peer, &peer_id, req, error);
    }
    let orig = Target {
        local: local.clone(),
        orig: target,
        peer,
    };
    let connected = match proxy.outbound.clone().oneshot(orig).await {
        Ok(connected) => connected,
        Err(failure) => {
            let e = failure.error;
            if let Some(mut labels) = failure.labels {
                labels.reporter = REPORTER;
                failed(&proxy.metrics, *labels, e.reason());
            }
            let status = e.status();
            tracing::warn!(waypoint = %local.workload.key(), %peer, peer_identity = %peer_id, dst = %target, status = status.as_u16(), reason = %e.reason(), error = %e, "rejected CONNECT");
            return req.reject(status);
        }
    };
    let (mut routed, mut upstream) = (connected.routed, connected.upstream);
    let mut tunnel = match req.accept() {
        Ok(t) => t,
        Err(e) => {
            tracing::debug!(waypoint = %local.workload.key(), %peer, error = %e, "client went away before the tunnel opened");
            return;
        }
    };
    routed.labels.reporter = REPORTER;
    let accounting = Accounting::open(proxy.metrics.clone(), routed.labels.clone());
    let result = match &mut upstream {
        Upstream::Tcp(s) => relay(&mut tunnel, s, accounting.meter()).await,
        Upstream::Hbone(s) => relay(&mut tunnel, s, accounting.meter()).await,
    };
    let error = result.err().map(|e| e.to_string());
    let transferred = accounting.meter().transferred();
    let duration = accounting.close();
    let route = &routed.route;
    tracing::info!(
        waypoint = %local.workload.key(),
        src_addr = %peer,
        src_principal = %peer_id,
        dst = %target,
        upstream = %route.target,
        dst_workload = %route.workload.as_ref().map_or_else(|| "-".to_string(), |w| w.key()),
        dst_service = %route.service.as_ref().map_or_else(|| "-".to_string(), |s| s.hostname()),
        bytes_sent = transferred.client_to_server,
        bytes_received = transferred.server_to_client,
        duration_ms = duration.as_millis() as u64,
        error = %error.as_deref().unwrap_or("-"),
        "waypoint connection complete"
    );
}

//! Inbound HBONE: the in-pod listener on 15008.
//!
//! TLS 1.3 with the local workload's certificate, a client certificate required and verified
//! against the trust bundle and trust domain; then HTTP/2 `CONNECT` streams. Each stream's target
//! must be the local workload (an address of it, or a service it is an endpoint of); it then goes
//! through the inbound stack ([`Proxy::inbound`]: authorize, connect to the application), is
//! answered 200 with the workload's `baggage`, and is relayed. A bad peer gets a clean rejection
//! and a log line naming the reason; the listener keeps serving everyone else.
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::server::TlsStream;
use tower::ServiceExt;

use super::accept::{accept_loop, Local};
use super::accounting::{failed, Accounting};
use super::authorize::{Admitted, Inbound};
use super::hbone::{serve_connection_until, Baggage, ConnectTarget, InboundRequest};
use super::labels::{workload_baggage, Ends};
use super::live::ConnFacts;
use super::relay::relay;
use super::{Proxy, ProxyError};
use crate::identity::{peer_identity, Identity};
use crate::model::Workload;
use crate::net;
use crate::state::{Service as MeshService, State};
use crate::telemetry::{ConnLabels, ReasonLabels};

/// Accepts HBONE connections until the task is aborted.
pub async fn serve_inbound(listener: TcpListener, local: Arc<Local>, proxy: Arc<Proxy>) {
    serve_hbone(listener, local, proxy, ("inbound stream", handle_stream)).await
}

/// What serves one CONNECT stream of an HBONE connection: the request, the peer's address and
/// identity, the listener's end, the proxy.
pub(super) trait StreamHandler<Fut>:
    Fn(InboundRequest, SocketAddr, Arc<Identity>, Arc<Local>, Arc<Proxy>) -> Fut
    + Clone
    + Send
    + Sync
    + 'static
{
}

impl<F, Fut> StreamHandler<Fut> for F where
    F: Fn(InboundRequest, SocketAddr, Arc<Identity>, Arc<Local>, Arc<Proxy>) -> Fut
        + Clone
        + Send
        + Sync
        + 'static
{
}

/// Accepts HBONE connections (admission, TLS with the local identity, the peer's identity) and
/// hands each CONNECT stream to `stream` (its name, for the future-size budget, and the handler),
/// until the task is aborted.
pub(super) async fn serve_hbone<H, Fut>(
    listener: TcpListener,
    local: Arc<Local>,
    proxy: Arc<Proxy>,
    stream: (&'static str, H),
) where
    H: StreamHandler<Fut>,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let tls = tokio_rustls::TlsAcceptor::from(proxy.certs.server_config(&local.identity));
    accept_loop(
        listener,
        "inbound HBONE",
        local,
        proxy,
        |_, _, _| {},
        move |s, peer, local, proxy| {
            let (what, handler) = (stream.0, stream.1.clone());
            connection(s, peer, tls.clone(), local, proxy, (what, handler))
        },
    )
    .await
}

pub(super) async fn connection<H, Fut>(
    stream: TcpStream,
    peer: SocketAddr,
    tls: tokio_rustls::TlsAcceptor,
    local: Arc<Local>,
    proxy: Arc<Proxy>,
    (what, handler): (&'static str, H),
) where
    H: StreamHandler<Fut>,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let _ = stream.set_nodelay(true);
    let (tls, peer_id) = match handshake(&proxy, &local, stream, peer, tls).await {
        Ok(Some(done)) => done,
        Ok(None) => return,
        Err(error) => {
            let state = proxy.state.borrow().clone();
            let labels = destination_labels(&state, &local, peer, None, None, None);
            failed(&proxy.metrics, labels, error.reason());
            tracing::warn!(workload = %local.workload.key(), %peer, reason = %error.reason(), %error, "rejected inbound HBONE connection");
            return;
        }
    };
    let settings = proxy.h2.clone();
    let (local2, proxy2, id2) = (local.clone(), proxy.clone(), peer_id.clone());
    // When the agent drains (shutdown, or a new agent took over), the connection says GOAWAY:
    // its streams finish here, the peer opens new ones elsewhere.
    let drain = proxy.drain.started();
    let served = serve_connection_until(
        tls,
        &settings,
        move |req| {
            let (local, proxy, peer_id) = (local2.clone(), proxy2.clone(), id2.clone());
            let stream = handler(req, peer, peer_id, local, proxy);
            super::budget::assert_future_size(what, &stream);
            stream
        },
        drain,
    )
    .await;
    if let Err(e) = served {
        tracing::debug!(workload = %local.workload.key(), %peer, peer_identity = %peer_id, error = %e, "HBONE connection ended with an error");
    }
}

/// Terminates TLS under the handshake caps and deadline and learns the peer's identity.
/// `Ok(None)`: over a handshake cap, already reset and counted.
async fn handshake(
    proxy: &Proxy,
    local: &Local,
    stream: TcpStream,
    peer: SocketAddr,
    tls: tokio_rustls::TlsAcceptor,
) -> Result<Option<(TlsStream<TcpStream>, Arc<Identity>)>, ProxyError> {
    let permit = match proxy.handshakes.admit(peer.ip()) {
        Ok(permit) => permit,
        Err(refusal) => {
            proxy
                .metrics
                .handshakes_rejected
                .get_or_create(&ReasonLabels {
                    reason: refusal.reason(),
                })
                .inc();
            if proxy.handshakes.should_log() {
                tracing::warn!(workload = %local.workload.key(), %peer, reason = refusal.reason(), "refusing inbound HBONE connections: too many TLS handshakes in progress (counted in mesh_inbound_handshakes_rejected_total; logged at most every 10 s)");
            }
            // Closed at once with a reset: nothing was read, nothing is owed.
            net::reset(stream);
            return Ok(None);
        }
    };
    let accepted = tokio::time::timeout(proxy.handshake_timeout, tls.accept(stream)).await;
    drop(permit);
    let tls = match accepted {
        Ok(Ok(tls)) => tls,
        Ok(Err(e)) => return Err(ProxyError::TlsHandshake(e)),
        Err(_) => return Err(ProxyError::TlsHandshakeTimeout(proxy.handshake_timeout)),
    };
    let peer_id = peer_identity(tls.get_ref().1.peer_certificates())
        .map_err(|e| ProxyError::PeerIdentity(e.to_string()))?;
    Ok(Some((tls, Arc::new(peer_id))))
}

/// One CONNECT stream: find its target on the local workload, run it through the inbound stack,
/// answer 200 with the local workload's `baggage`, relay.
pub(super) async fn handle_stream(
    req: InboundRequest,
    peer: SocketAddr,
    peer_id: Arc<Identity>,
    local: Arc<Local>,
    proxy: Arc<Proxy>,
) {
    let (conn, labels) = match stream_target(&req, &local, peer, &peer_id, &proxy) {
        Ok(found) => found,
        Err((error, labels)) => return refuse(&proxy, &local, peer, &peer_id, req, labels, error),
    };
    let Admitted { conn, app } = match proxy.inbound.clone().oneshot(conn).await {
        Ok(admitted) => admitted,
        Err(error) => return refuse(&proxy, &local, peer, &peer_id, req, labels, error),
    };
    let tunnel = match req.accept_with_baggage(&local_baggage(&proxy, &local)) {
        Ok(t) => t,
        Err(e) => {
            tracing::debug!(workload = %local.workload.key(), %peer, error = %e, "client went away before the tunnel opened");
            return;
        }
    };
    deliver(&proxy, conn, labels, tunnel, app).await;
}

/// A stream's target (see [`inbound_target`]) and its metric labels, under the current state.
/// The labels are boxed: they live in the stream's future until the relay starts.
fn stream_target(
    req: &InboundRequest,
    local: &Arc<Local>,
    peer: SocketAddr,
    peer_id: &Identity,
    proxy: &Proxy,
) -> Result<(Inbound, Box<ConnLabels>), (ProxyError, Box<ConnLabels>)> {
    let state = proxy.state.borrow().clone();
    let src_baggage = req.baggage();
    let labels = |service: Option<&MeshService>| {
        Box::new(destination_labels(
            &state,
            local,
            peer,
            Some(peer_id),
            service,
            src_baggage.as_ref(),
        ))
    };
    match inbound_target(req, &state, local, peer, peer_id) {
        Ok((conn, service)) => {
            let labels = labels(service.as_deref());
            Ok((conn, labels))
        }
        Err(error) => {
            let service = claimed_service(req, &state, &local.workload);
            Err((error, labels(service.as_deref())))
        }
    }
}

/// The stream's target, which must be the local workload, and the service it was for when that
/// is known:
///
/// * `ip:port`: an address of the local workload; the service is the one the client names in
///   `forwarded: …;host=` if [`claimed_service`] believes it;
/// * `host:port` (ztunnel sends that through an east-west gateway): see [`service_target`].
fn inbound_target(
    req: &InboundRequest,
    state: &State,
    local: &Arc<Local>,
    peer: SocketAddr,
    peer_id: &Identity,
) -> Result<(Inbound, Option<Arc<MeshService>>), ProxyError> {
    let (dst, service) = match req.target().map_err(ProxyError::BadRequest)? {
        ConnectTarget::Addr(target) => {
            let ip = target.ip().to_canonical();
            if !local.workload.ips.contains(&ip) {
                let pod = local.workload.key();
                return Err(ProxyError::WrongDestination { target, pod });
            }
            let service = claimed_service(req, state, &local.workload);
            (SocketAddr::new(ip, target.port()), service)
        }
        ConnectTarget::Host { host, port } => {
            let (dst, service) = service_target(state, &local.workload, &host, port, peer)?;
            (dst, Some(service))
        }
    };
    Ok((
        Inbound {
            local: local.clone(),
            facts: ConnFacts {
                workload: local.workload.key(),
                dst_ip: dst.ip(),
                dst_port: dst.port(),
                src_ip: peer.ip().to_canonical(),
                src: Some(peer_id.clone()),
            },
            peer,
        },
        service,
    ))
}

/// Where a `CONNECT` to `host:port` goes: `host` must name a service of the state that has the
/// local workload as an endpoint and `port` must be one of its ports; the connection then goes
/// to the local workload's address of the peer's family, on the service's target port.
///
/// ztunnel (commit 62d82653) resolves such a target the same way (the service by host name, its
/// target port, the local workload's address the tunnel came in on), but answers 503 when the
/// host or port is unknown and does not check that the workload is an endpoint. Here every such
/// target is a request this workload cannot take: 400, naming the reason.
fn service_target(
    state: &State,
    workload: &Workload,
    host: &str,
    port: u16,
    peer: SocketAddr,
) -> Result<(SocketAddr, Arc<MeshService>), ProxyError> {
    let target = format!("{host}:{port}");
    let Some(service) = state.service_by_hostname(host) else {
        return Err(ProxyError::UnknownServiceHost { target });
    };
    if !service.has_endpoint(workload) {
        return Err(ProxyError::NotAnEndpoint {
            target,
            service: service.key(),
            pod: workload.key(),
        });
    }
    let Some(target_port) = service.target_port(port) else {
        return Err(ProxyError::UnknownTargetPort {
            target,
            service: service.key(),
        });
    };
    let v4 = peer.ip().to_canonical().is_ipv4();
    let ip = if v4 {
        workload.ip4().map(IpAddr::V4)
    } else {
        workload.ip6().map(IpAddr::V6)
    };
    let Some(ip) = ip else {
        return Err(ProxyError::BadRequest(format!(
            "CONNECT target {target}: pod {} has no {} address for a peer at {peer}",
            workload.key(),
            if v4 { "IPv4" } else { "IPv6" }
        )));
    };
    Ok((SocketAddr::new(ip, target_port), service.clone()))
}

/// The service the client says it dialed (`forwarded: …;host=<host name>`), believed only when
/// it is a service of the state with the local workload as an endpoint. A peer must not be able
/// to label its traffic as any service it likes (inflating another service's metrics, or hiding
/// its own traffic under a service it does not reach); bounded this way, the worst a lying peer
/// can do is pick another service this very workload serves. ztunnel bounds the claim the same
/// way (only services the destination workload belongs to); without a believed host it guesses
/// one of them by target port, where this agent leaves the service unknown.
fn claimed_service(
    req: &InboundRequest,
    state: &State,
    workload: &Workload,
) -> Option<Arc<MeshService>> {
    let host = req.forwarded_host()?;
    let service = state.service_by_hostname(&host)?;
    if service.has_endpoint(workload) {
        Some(service.clone())
    } else {
        tracing::debug!(workload = %workload.key(), %host, "ignoring forwarded host: not a service of this workload");
        None
    }
}

/// The local workload's `baggage` for the 200, with its current labels.
fn local_baggage(proxy: &Proxy, local: &Local) -> Baggage {
    let state = proxy.state.borrow();
    let workload = state
        .workloads
        .get(&local.workload.key())
        .unwrap_or(&local.workload);
    workload_baggage(workload)
}

/// Answers a CONNECT that cannot be carried with the failure's status; counts and logs it.
pub(super) fn refuse(
    proxy: &Proxy,
    local: &Local,
    peer: SocketAddr,
    peer_id: &Identity,
    req: InboundRequest,
    labels: Box<ConnLabels>,
    error: ProxyError,
) {
    failed(&proxy.metrics, *labels, error.reason());
    let status = error.status();
    tracing::warn!(workload = %local.workload.key(), %peer, peer_identity = %peer_id, status = status.as_u16(), reason = %error.reason(), %error, "rejected CONNECT");
    req.reject(status);
}

/// The metric labels of an inbound connection from `peer`: the source as the state knows it
/// (else what its `baggage` says), the local workload, and the service the connection was for
/// when that is known and believed.
pub(super) fn destination_labels(
    state: &State,
    local: &Local,
    peer: SocketAddr,
    peer_id: Option<&Identity>,
    service: Option<&MeshService>,
    src_baggage: Option<&Baggage>,
) -> ConnLabels {
    Ends {
        reporter: "destination",
        src: state.workload_by_ip(peer.ip()).map(Arc::as_ref),
        src_identity: peer_id,
        dst: Some(&local.workload),
        dst_identity: Some(&local.identity),
        service,
        src_baggage,
        mtls: peer_id.is_some(),
    }
    .labels()
}

/// Relays an authorized inbound connection to the application until either side ends it or a
/// policy change revokes it; counts it under `labels` (boxed: they are part of every
/// connection's future) and logs it.
pub(super) async fn deliver<D>(
    proxy: &Proxy,
    conn: Inbound,
    labels: Box<ConnLabels>,
    mut downstream: D,
    mut app: tokio::net::TcpStream,
) where
    D: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    let Inbound {
        local: _local,
        facts,
        peer,
    } = conn;
    let live = proxy.live.register(facts.clone());
    let accounting = Accounting::open(proxy.metrics.clone(), *labels);
    let error = tokio::select! {
        result = relay(&mut downstream, &mut app, accounting.meter()) => result.err().map(|e| e.to_string()),
        () = live.revoked() => Some("closed: the policy now denies this connection".to_string()),
    };
    drop(live);
    let transferred = accounting.meter().transferred();
    let duration = accounting.close();
    let state = proxy.state.borrow().clone();
    tracing::info!(
        dst_workload = %facts.workload,
        src_addr = %peer,
        src_workload = %state.workload_by_ip(peer.ip()).map_or_else(|| "-".to_string(), |w| w.key()),
        src_principal = %facts.src.as_ref().map_or_else(|| "-".to_string(), |i| i.to_string()),
        dst = %SocketAddr::new(facts.dst_ip, facts.dst_port),
        bytes_received = transferred.client_to_server,
        bytes_sent = transferred.server_to_client,
        duration_ms = duration.as_millis() as u64,
        security = %if facts.src.is_some() { "mutual_tls" } else { "none" },
        error = %error.as_deref().unwrap_or("-"),
        "inbound connection complete"
    );
}

//! A waypoint's HBONE listener (15008 in the waypoint's own pod): the same accept, admission and
//! TLS as a pod's (with the waypoint's identity), but a CONNECT names a destination the waypoint
//! fronts (a service VIP and port, or a workload address) rather than the local workload.
//!
//! The stream's protocol is settled first ([`detect`](super::detect)): HTTP goes to the
//! waypoint's [`HttpHandler`] (the `waypoint` module's L7 stack); anything else goes through the
//! outbound stack as the waypoint itself, resolved to an endpoint (never back through the
//! waypoint), tunnelled there with the waypoint's identity and relayed.
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpListener;

use super::accept::Local;
use super::accounting::{failed, Accounting};
use super::budget::BoxFuture;
use super::connect::{Connected, Upstream};
use super::detect::{declared, sniff, sniff_http_version, Detected, Rewind, DETECTION_TIMEOUT};
use super::hbone::{ConnectTarget, H2Stream, InboundRequest};
use super::inbound::{destination_labels, refuse, serve_hbone};
use super::labels::Ends;
use super::relay::relay;
use super::{Failure, Proxy, ProxyError};
use crate::identity::Identity;
use crate::model::{Waypoint, Workload};
use crate::policy::{Connection, Decision, HttpAttributes, Reason, Request, WaypointBinding};
use crate::state::{State, Via};
use crate::telemetry::DenialLabels;

/// The `reporter` label of what a waypoint counts.
const REPORTER: &str = "waypoint";

/// A CONNECT stream a waypoint took, that speaks HTTP.
pub struct HttpStream {
    /// The tunnel, with the bytes read to detect its protocol put back.
    pub io: Rewind<H2Stream>,
    pub protocol: Detected,
    pub local: Arc<Local>,
    /// The HBONE peer (a node agent) and the identity it presented: the client's.
    pub peer: SocketAddr,
    pub peer_id: Arc<Identity>,
    /// The CONNECT authority: the service VIP and port (or workload address) the client dialed.
    pub target: SocketAddr,
}

/// What a waypoint does with a stream that speaks HTTP.
pub trait HttpHandler: Send + Sync + 'static {
    fn serve(self: Arc<Self>, stream: HttpStream) -> BoxFuture<()>;
}

/// Serves a waypoint's HBONE listener until the task is aborted; HTTP streams go to `http`.
pub async fn serve_waypoint(
    listener: TcpListener,
    local: Arc<Local>,
    proxy: Arc<Proxy>,
    http: Arc<dyn HttpHandler>,
) {
    let handler = move |req, peer, peer_id, local, proxy| {
        handle_stream(req, peer, peer_id, local, proxy, http.clone())
    };
    serve_hbone(listener, local, proxy, ("waypoint stream", handler)).await
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

/// A waypoint's two decisions for the client it acts for (the HBONE peer's address and
/// identity; with HTTP attributes, one request). Both must allow.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WaypointVerdict {
    /// The AuthorizationPolicies bound by `targetRefs` to the waypoint's Gateway or to the
    /// addressed Service: only the waypoint enforces them.
    pub bound: Decision,
    /// The destination workloads' own policies (selector, namespace, mesh-wide), decided for the
    /// client: every workload the target can reach must allow it (the first denial, else the
    /// first workload's decision), since the destination's agent sees only the waypoint.
    pub destination: Decision,
}

impl WaypointVerdict {
    /// The deciding decision: a denial of the bound policies (the waypoint decides before the
    /// destination sees anything), else one of the destination's, else the allowing one that
    /// names a policy.
    pub fn decision(&self) -> &Decision {
        if !self.bound.is_allowed() || !self.destination.is_allowed() {
            return if self.bound.is_allowed() {
                &self.destination
            } else {
                &self.bound
            };
        }
        match self.bound.reason {
            Reason::AllowedBy { .. } => &self.bound,
            _ => &self.destination,
        }
    }
}

/// The decisions of the waypoint `gateway` for traffic from `client` to `target` (a service
/// VIP and service port, or a workload address), as [`WaypointVerdict`] describes. Bound
/// policies see the target as the client addressed it (the service port); the destination's
/// own see each endpoint's address and target port, as its agent would.
pub fn decide_at_waypoint(
    state: &State,
    gateway: &Waypoint,
    target: SocketAddr,
    client: (IpAddr, &Identity),
    http: Option<&HttpAttributes>,
) -> WaypointVerdict {
    let ip = target.ip().to_canonical();
    let service = state.service_by_vip(ip);
    let at = WaypointBinding {
        gateway: (&gateway.namespace, &gateway.name),
        service: service.map(|s| (s.spec.namespace.as_str(), s.spec.name.as_str())),
    };
    let bound = state.policies.evaluate_bound(
        &at,
        &Connection {
            dst_ip: ip,
            dst_port: target.port(),
            src_ip: client.0.to_canonical(),
            src: Some(client.1),
            http,
        },
    );
    let destination = destination_decision(state, target, client, http);
    WaypointVerdict { bound, destination }
}

/// The destination workloads' own policies for `client` (see [`WaypointVerdict::destination`]).
fn destination_decision(
    state: &State,
    target: SocketAddr,
    client: (IpAddr, &Identity),
    http: Option<&HttpAttributes>,
) -> Decision {
    let ip = target.ip().to_canonical();
    let (dsts, port): (Vec<&Arc<Workload>>, u16) = match state.service_by_vip(ip) {
        Some(svc) => (
            svc.endpoints.iter().collect(),
            svc.target_port(target.port()).unwrap_or(target.port()),
        ),
        None => (
            state.workload_by_ip(ip).into_iter().collect(),
            target.port(),
        ),
    };
    let mut first = None;
    for dst in dsts {
        let dst_ip = if ip.is_ipv4() {
            dst.ip4().map(IpAddr::V4)
        } else {
            dst.ip6().map(IpAddr::V6)
        };
        let decision = state.policies.evaluate(&Request {
            dst,
            dst_ip: dst_ip.unwrap_or(ip),
            dst_port: port,
            src_ip: client.0.to_canonical(),
            src: Some(client.1),
            http,
        });
        if !decision.is_allowed() {
            return decision;
        }
        first.get_or_insert(decision);
    }
    // No workload behind the target: nothing to decide here (the upstream connect fails).
    first.unwrap_or(Decision::allow(Reason::NoPolicies))
}

/// Decides at the waypoint whose pod is `waypoint` (its Gateway found in `state`) for the client
/// it acts for; returns the deciding denial. A waypoint whose Gateway left the config denies.
pub fn authorize_client(
    state: &State,
    waypoint: &Workload,
    target: SocketAddr,
    client: (IpAddr, &Identity),
    http: Option<&HttpAttributes>,
) -> Result<(), Decision> {
    let Some(gateway) = state.waypoints().find(|w| w.serves_from(waypoint)) else {
        return Err(Decision::deny(Reason::UnknownWaypoint {
            pod: waypoint.key(),
        }));
    };
    let verdict = decide_at_waypoint(state, &gateway.waypoint, target, client, http);
    let decision = verdict.decision();
    if decision.is_allowed() {
        Ok(())
    } else {
        Err(decision.clone())
    }
}

/// Counts and logs a denial at the waypoint.
pub fn denied(
    proxy: &Proxy,
    local: &Local,
    target: SocketAddr,
    client: (IpAddr, &Identity),
    decision: &Decision,
    what: &str,
) {
    proxy
        .metrics
        .policy_denials
        .get_or_create(&DenialLabels {
            destination_workload: local.workload.name.clone(),
            destination_workload_namespace: local.workload.namespace.clone(),
            reason: decision.reason.metric_label(),
            policy: decision.reason.deciding_rule().unwrap_or_default(),
        })
        .inc();
    tracing::warn!(
        waypoint = %local.workload.key(),
        src = %client.0,
        src_principal = %client.1,
        dst = %target,
        policy = %decision.reason.deciding_rule().as_deref().unwrap_or("-"),
        reason = %decision.reason,
        "{what} denied by policy"
    );
}

/// The protocol the service port of `target` declares; `None` (detect) for a workload address or
/// a port without one.
fn declared_protocol(state: &State, target: SocketAddr) -> Option<Detected> {
    let svc = state.service_by_vip(target.ip().to_canonical())?;
    let port = svc.spec.ports.iter().find(|p| p.port == target.port())?;
    declared(port.protocol())
}

async fn handle_stream(
    req: InboundRequest,
    peer: SocketAddr,
    peer_id: Arc<Identity>,
    local: Arc<Local>,
    proxy: Arc<Proxy>,
    http: Arc<dyn HttpHandler>,
) {
    let target = match req.target().map_err(ProxyError::BadRequest).and_then(|t| {
        let state = proxy.state.borrow();
        fronted_addr(&state, t, peer)
    }) {
        Ok(target) => target,
        Err(error) => return reject_stream(&proxy, &local, peer, &peer_id, req, error),
    };
    let declared = {
        let state = proxy.state.borrow();
        if !fronts(&state, &local, target) {
            drop(state);
            let error = ProxyError::NotFronted {
                target,
                waypoint: local.workload.key(),
            };
            return reject_stream(&proxy, &local, peer, &peer_id, req, error);
        }
        declared_protocol(&state, target)
    };
    let client = (peer.ip(), &*peer_id);
    if declared == Some(Detected::Opaque) {
        let verdict =
            authorize_client(&proxy.state.borrow(), &local.workload, target, client, None);
        if let Err(decision) = verdict {
            denied(&proxy, &local, target, client, &decision, "connection");
            let error = ProxyError::PolicyDenied(decision.reason.to_string());
            return reject_stream(&proxy, &local, peer, &peer_id, req, error);
        }
        // Opaque by declaration: the upstream first, so a failure answers the CONNECT.
        let connected = match proxy.connect_upstream(&local, peer, target).await {
            Ok(connected) => connected,
            Err(failure) => return reject(&proxy, &local, peer, &peer_id, target, req, failure),
        };
        let Some(tunnel) = accept(req, &local, peer) else {
            return;
        };
        return forward(&proxy, &local, (peer, &peer_id), target, tunnel, connected).await;
    }
    let Some(mut tunnel) = accept(req, &local, peer) else {
        return;
    };
    let sniffed = match declared {
        // Declared HTTP: which version only.
        Some(_) => sniff_http_version(&mut tunnel, DETECTION_TIMEOUT).await,
        None => sniff(&mut tunnel, DETECTION_TIMEOUT).await,
    };
    let (prefix, protocol) = match sniffed {
        Ok(sniffed) => sniffed,
        Err(e) => {
            tracing::debug!(waypoint = %local.workload.key(), %peer, error = %e, "client went away before sending anything");
            return;
        }
    };
    let io = Rewind::new(prefix, tunnel);
    if protocol != Detected::Opaque {
        let stream = HttpStream {
            io,
            protocol,
            local,
            peer,
            peer_id,
            target,
        };
        return http.clone().serve(stream).await;
    }
    // Opaque: decided without HTTP attributes, so a client cannot slip past an L7 rule by not
    // speaking HTTP: a destination policy with L7 fields denies, and a bound policy follows
    // Istio's rule for TCP (an ALLOW rule with HTTP-only fields never matches; a DENY rule
    // ignores them).
    let verdict = authorize_client(&proxy.state.borrow(), &local.workload, target, client, None);
    if let Err(decision) = verdict {
        // The CONNECT was answered already: the tunnel is reset when dropped.
        return denied(&proxy, &local, target, client, &decision, "connection");
    }
    match proxy.connect_upstream(&local, peer, target).await {
        Ok(connected) => forward(&proxy, &local, (peer, &peer_id), target, io, connected).await,
        Err(failure) => {
            // The CONNECT was answered already: the tunnel is reset when dropped.
            count_failure(&proxy, &local, peer, &peer_id, target, failure);
        }
    }
}

/// The address a CONNECT target stands for at a waypoint: an address as is; a service host name
/// (`name.namespace.svc.cluster.local:port`) as that service's first VIP of the peer's family,
/// with the same (service) port, since a waypoint fronts services by VIP. A name with no such
/// service or VIP is a request the waypoint cannot take (400).
fn fronted_addr(
    state: &State,
    target: ConnectTarget,
    peer: SocketAddr,
) -> Result<SocketAddr, ProxyError> {
    let (host, port) = match target {
        ConnectTarget::Addr(addr) => return Ok(addr),
        ConnectTarget::Host { host, port } => (host, port),
    };
    let target = format!("{host}:{port}");
    let Some(service) = state.service_by_hostname(&host) else {
        return Err(ProxyError::UnknownServiceHost { target });
    };
    let v4 = peer.ip().to_canonical().is_ipv4();
    match service.spec.vips.iter().find(|ip| ip.is_ipv4() == v4) {
        Some(vip) => Ok(SocketAddr::new(*vip, port)),
        None => Err(ProxyError::BadRequest(format!(
            "CONNECT target {target}: service {} has no {} VIP for a peer at {peer}",
            service.key(),
            if v4 { "IPv4" } else { "IPv6" }
        ))),
    }
}

/// Refuses a CONNECT the waypoint cannot take, counted as the HBONE listener's (the waypoint
/// pod as the destination).
fn reject_stream(
    proxy: &Proxy,
    local: &Local,
    peer: SocketAddr,
    peer_id: &Identity,
    req: InboundRequest,
    error: ProxyError,
) {
    let labels = {
        let state = proxy.state.borrow();
        let baggage = req.baggage();
        let labels = destination_labels(&state, local, peer, Some(peer_id), None, baggage.as_ref());
        Box::new(labels)
    };
    refuse(proxy, local, peer, peer_id, req, labels, error);
}

fn accept(req: InboundRequest, local: &Local, peer: SocketAddr) -> Option<H2Stream> {
    match req.accept() {
        Ok(t) => Some(t),
        Err(e) => {
            tracing::debug!(waypoint = %local.workload.key(), %peer, error = %e, "client went away before the tunnel opened");
            None
        }
    }
}

/// Counts and logs a stream the waypoint could not carry; returns the status to answer.
fn count_failure(
    proxy: &Proxy,
    local: &Local,
    peer: SocketAddr,
    peer_id: &Identity,
    target: SocketAddr,
    failure: Failure,
) -> http::StatusCode {
    let e = failure.error;
    if let Some(mut labels) = failure.labels {
        labels.reporter = REPORTER;
        failed(&proxy.metrics, *labels, e.reason());
    }
    let status = e.status();
    tracing::warn!(waypoint = %local.workload.key(), %peer, peer_identity = %peer_id, dst = %target, status = status.as_u16(), reason = %e.reason(), error = %e, "rejected CONNECT");
    status
}

fn reject(
    proxy: &Proxy,
    local: &Local,
    peer: SocketAddr,
    peer_id: &Identity,
    target: SocketAddr,
    req: InboundRequest,
    failure: Failure,
) {
    let status = count_failure(proxy, local, peer, peer_id, target, failure);
    req.reject(status);
}

/// Relays the tunnel to the upstream until either side ends it; counts and logs it.
async fn forward<D>(
    proxy: &Proxy,
    local: &Local,
    (peer, peer_id): (SocketAddr, &Identity),
    target: SocketAddr,
    mut tunnel: D,
    connected: Connected,
) where
    D: AsyncRead + AsyncWrite + Unpin,
{
    let (routed, mut upstream) = (connected.routed, connected.upstream);
    // As Istio reports a waypoint's traffic: the source is the client it acts for.
    let labels = {
        let state = proxy.state.borrow().clone();
        Ends {
            reporter: REPORTER,
            src: state.workload_by_ip(peer.ip()).map(Arc::as_ref),
            src_identity: Some(peer_id),
            dst: routed.route.workload.as_deref(),
            dst_identity: routed.dst_identity.as_ref(),
            service: routed.route.service.as_deref(),
            src_baggage: None,
            mtls: true,
        }
        .labels()
    };
    let accounting = Accounting::open(proxy.metrics.clone(), labels);
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    #[test]
    fn a_service_host_name_stands_for_its_vip_of_the_peer_family() {
        let text = r#"
namespaces: [{ name: shop, labels: { istio.io/dataplane-mode: ambient } }]
workloads:
  - { name: a, namespace: shop, node: n1, ips: [10.0.0.1, "fd00::1"] }
services:
  - { name: web, namespace: shop, vips: [10.96.0.1, "fd00:96::1"], ports: [{ port: 80 }], endpoints: [a] }
  - { name: v4, namespace: shop, vips: [10.96.0.2], ports: [{ port: 80 }], endpoints: [a] }
"#;
        let config = crate::config::parse(Path::new("t.yaml"), text).unwrap();
        let state = State::from_mesh(&config, "n1");
        let addr = |s: &str| s.parse::<SocketAddr>().unwrap();
        let host = |h: &str, port| ConnectTarget::Host {
            host: h.to_string(),
            port,
        };
        let (v4, v6) = (addr("10.0.0.9:40000"), addr("[fd00::9]:40000"));
        let web = "web.shop.svc.cluster.local";
        assert_eq!(
            fronted_addr(&state, host(web, 80), v4).unwrap(),
            addr("10.96.0.1:80")
        );
        assert_eq!(
            fronted_addr(&state, host(web, 80), v6).unwrap(),
            addr("[fd00:96::1]:80")
        );
        let a = ConnectTarget::Addr(addr("10.96.0.1:80"));
        assert_eq!(fronted_addr(&state, a, v6).unwrap(), addr("10.96.0.1:80"));
        let e = fronted_addr(&state, host("nope.shop.svc.cluster.local", 80), v4).unwrap_err();
        assert_eq!((e.reason(), e.status().as_u16()), ("unknown_service", 400));
        let e = fronted_addr(&state, host("v4.shop.svc.cluster.local", 80), v6).unwrap_err();
        assert_eq!((e.reason(), e.status().as_u16()), ("bad_request", 400));
    }

    /// `web` (port 80 -> 8080 on `server`) behind the waypoint `wp` (pod `wp-1`); `policies` is
    /// appended.
    fn waypoint_state(policies: &str) -> State {
        let text = format!(
            r#"
namespaces: [{{ name: shop, labels: {{ istio.io/dataplane-mode: ambient }} }}]
workloads:
  - {{ name: client, namespace: shop, node: n1, ips: [10.0.0.1] }}
  - {{ name: server, namespace: shop, node: n2, ips: [10.0.0.2], labels: {{ app: server }} }}
  - {{ name: wp-1, namespace: shop, node: n1, ips: [10.0.0.8], serviceAccount: wp, labels: {{ gateway.networking.k8s.io/gateway-name: wp }} }}
services:
  - {{ name: web, namespace: shop, vips: [10.96.0.1], ports: [{{ port: 80, targetPort: 8080 }}], endpoints: [server], labels: {{ istio.io/use-waypoint: wp }} }}
gateways:
  - {{ apiVersion: gateway.networking.k8s.io/v1, kind: Gateway, metadata: {{ name: wp, namespace: shop }}, spec: {{ gatewayClassName: istio-waypoint }} }}
policies:
{policies}"#
        );
        let config = crate::config::parse(Path::new("t.yaml"), &text).unwrap();
        State::from_mesh(&config, "n1")
    }

    const GET_ONLY: &str = "  - { apiVersion: security.istio.io/v1, kind: AuthorizationPolicy, metadata: { name: get-only, namespace: shop }, spec: { targetRefs: [{ kind: Service, name: web }], rules: [{ to: [{ operation: { methods: [GET] } }] }] } }\n";
    const DENY_CLIENT: &str = "  - { apiVersion: security.istio.io/v1, kind: AuthorizationPolicy, metadata: { name: deny-client, namespace: shop }, spec: { selector: { matchLabels: { app: server } }, action: DENY, rules: [{ from: [{ source: { principals: [cluster.local/ns/shop/sa/client] } }] }] } }\n";
    const SERVER_PORT: &str = "  - { apiVersion: security.istio.io/v1, kind: AuthorizationPolicy, metadata: { name: port-8080, namespace: shop }, spec: { selector: { matchLabels: { app: server } }, rules: [{ to: [{ operation: { ports: ['8080'] } }] }] } }\n";

    #[test]
    fn a_request_needs_both_the_bound_and_the_destination_policies() {
        let addr = |s: &str| s.parse::<SocketAddr>().unwrap();
        let (web, client_ip) = (addr("10.96.0.1:80"), "10.0.0.1".parse().unwrap());
        let get = HttpAttributes {
            method: "GET".into(),
            path: "/".into(),
            ..HttpAttributes::default()
        };
        let post = HttpAttributes {
            method: "POST".into(),
            ..get.clone()
        };
        let client = Identity::new("cluster.local", "shop", "client");
        let other = Identity::new("cluster.local", "shop", "other");
        let wp = |state: &State| state.workloads["shop/wp-1"].clone();
        let decide = |state: &State, id: &Identity, http: &HttpAttributes| {
            authorize_client(state, &wp(state), web, (client_ip, id), Some(http))
                .map_err(|d| d.reason.to_string())
        };
        // Bound allows, destination denies: denied, by the destination's policy.
        let state = waypoint_state(&format!("{GET_ONLY}{DENY_CLIENT}"));
        assert_eq!(
            decide(&state, &client, &get).unwrap_err(),
            "denied by AuthorizationPolicy shop/deny-client rules[0]"
        );
        // Destination allows, bound denies: denied, by the bound one.
        assert_eq!(
            decide(&state, &other, &post).unwrap_err(),
            "no ALLOW policy with targetRefs matched at waypoint shop/wp"
        );
        assert_eq!(decide(&state, &other, &get), Ok(()));
        // The bound ALLOW names itself when both allow; the destination sees its target port.
        let state = waypoint_state(&format!("{GET_ONLY}{SERVER_PORT}"));
        let verdict = decide_at_waypoint(
            &state,
            &state.waypoints().next().unwrap().waypoint,
            web,
            (client_ip, &other),
            Some(&get),
        );
        assert_eq!(
            verdict.bound.reason.to_string(),
            "allowed by AuthorizationPolicy shop/get-only rules[0] (targetRefs Service shop/web, \
             at waypoint shop/wp)"
        );
        assert_eq!(
            verdict.destination.reason.to_string(),
            "allowed by AuthorizationPolicy shop/port-8080 rules[0]"
        );
        assert_eq!(verdict.decision(), &verdict.bound);
        // An opaque stream: the bound ALLOW with an HTTP-only field matches nothing.
        assert!(authorize_client(&state, &wp(&state), web, (client_ip, &other), None).is_err());
        // A pod that is no waypoint's decides nothing: denied.
        let server = state.workloads["shop/server"].clone();
        let e = authorize_client(&state, &server, web, (client_ip, &other), Some(&get));
        assert_eq!(e.unwrap_err().reason.metric_label(), "unknown_waypoint");
    }

    /// The size of what `f` returns, without calling it.
    fn output_size<F, A, B, C, D, E, G, R>(_: F) -> usize
    where
        F: FnOnce(A, B, C, D, E, G) -> R,
    {
        std::mem::size_of::<R>()
    }

    #[test]
    fn the_stream_future_stays_within_its_budget() {
        // `budget.rs`: "waypoint stream", checked when a stream is served.
        let size = output_size(handle_stream);
        println!("waypoint stream: {size} bytes");
        assert!(size <= 5 * 1024, "{size}");
    }
}

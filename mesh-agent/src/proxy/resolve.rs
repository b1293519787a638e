//! Resolve: where an outbound connection goes. A service VIP is load-balanced to an endpoint, an
//! enrolled workload is reached over HBONE, anything else is passed through as plain TCP.
//!
//! [`Resolve`] is the step of a connection stack (a tower `Service` over [`Target`]) that does
//! this under the current state and hands a [`Routed`] connection to the next step.
use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use futures::future::{ready, Either, Ready};
use tokio::sync::watch;
use tower::util::Oneshot;
use tower::{Service, ServiceExt};

use super::accept::Local;
use super::error::{Failure, ProxyError};
use super::labels::Ends;
use crate::identity::Identity;
use crate::model::LoadBalancing;
use crate::model::Workload;
use crate::state::{Service as MeshService, State, Via};
use crate::telemetry::ConnLabels;

/// An outbound connection before it is resolved.
pub struct Target {
    /// The listener's end: the workload sending.
    pub local: Arc<Local>,
    /// Where the application was connecting to.
    pub orig: SocketAddr,
    /// The application's socket address as the listener saw it.
    pub peer: SocketAddr,
}

/// A resolved outbound connection: who sends, where to, with whose identity.
pub struct Routed {
    pub local: Arc<Local>,
    /// The sending workload with its current labels.
    pub src: Arc<Workload>,
    pub route: Route,
    /// The source address the destination sees: the workload's address of the family in use
    /// and the application's port.
    pub client_addr: SocketAddr,
    /// The destination's identity when it is reached over HBONE.
    pub dst_identity: Option<Identity>,
    /// Its metric labels.
    pub labels: ConnLabels,
    /// Counts the connection against its endpoint (least-connections) while held.
    pub active: Option<ActiveGuard>,
}

/// The resolve step in front of `inner`.
#[derive(Clone)]
pub struct Resolve<S> {
    state: watch::Receiver<Arc<State>>,
    balancer: Arc<Balancer>,
    trust_domain: Arc<str>,
    inner: S,
}

impl<S> Resolve<S> {
    pub fn new(
        state: watch::Receiver<Arc<State>>,
        balancer: Arc<Balancer>,
        trust_domain: &str,
        inner: S,
    ) -> Resolve<S> {
        Resolve {
            state,
            balancer,
            trust_domain: trust_domain.into(),
            inner,
        }
    }

    /// Its load-balancing state.
    pub fn balancer(&self) -> &Balancer {
        &self.balancer
    }

    fn route(&self, target: Target) -> Result<Routed, Failure> {
        let state = self.state.borrow().clone();
        let local = target.local;
        // Labels may have changed since the listener opened: read the current ones.
        let src = state
            .workloads
            .get(&local.workload.key())
            .unwrap_or(&local.workload)
            .clone();
        let route = resolve_from(&state, Some(&src), target.orig, &self.balancer).map_err(|e| {
            let ends = Ends {
                reporter: "source",
                src: Some(&src),
                src_identity: Some(&local.identity),
                dst: None,
                dst_identity: None,
                service: state.service_by_vip(target.orig.ip()).map(Arc::as_ref),
                src_baggage: None,
                mtls: false,
            };
            Failure::counted(ProxyError::Route(e), ends.labels())
        })?;
        // Through a waypoint, the tunnel is to the waypoint's pod and must be its identity.
        let dst_identity = route
            .tunnel_peer()
            .filter(|_| route.is_mesh())
            .map(|w| Identity::new(&*self.trust_domain, &w.namespace, &w.service_account));
        let labels = Ends {
            reporter: "source",
            src: Some(&src),
            src_identity: Some(&local.identity),
            dst: route.tunnel_peer().map(Arc::as_ref),
            dst_identity: dst_identity.as_ref(),
            service: route.service.as_deref(),
            src_baggage: None,
            mtls: dst_identity.is_some(),
        }
        .labels();
        let active = route.tunnel_peer().map(|w| self.balancer.track(w));
        let client_addr = SocketAddr::new(
            address_of(&src, route.target.is_ipv4()).unwrap_or(target.peer.ip()),
            target.peer.port(),
        );
        Ok(Routed {
            local,
            src,
            route,
            client_addr,
            dst_identity,
            labels,
            active,
        })
    }
}

impl<S> Service<Target> for Resolve<S>
where
    S: Service<Routed, Error = Failure> + Clone,
{
    type Response = S::Response;
    type Error = Failure;
    type Future = Either<Ready<Result<S::Response, Failure>>, Oneshot<S, Routed>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Failure>> {
        // Resolution needs nothing that can run out; the next step is made ready per call.
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, target: Target) -> Self::Future {
        match self.route(target) {
            Ok(routed) => Either::Right(self.inner.clone().oneshot(routed)),
            Err(failure) => Either::Left(ready(Err(failure))),
        }
    }
}

/// The workload's address of the family in use.
fn address_of(w: &Workload, v4: bool) -> Option<IpAddr> {
    if v4 {
        w.ip4().map(IpAddr::V4)
    } else {
        w.ip6().map(IpAddr::V6)
    }
}

/// The resolved destination of one connection.
#[derive(Debug, Clone)]
pub struct Route {
    /// Address the application's bytes must reach (endpoint IP and target port); through a
    /// waypoint, the original destination (the service VIP and port, or the workload's
    /// address), which the waypoint resolves itself.
    pub target: SocketAddr,
    /// The workload behind `target`, when it is one the mesh knows (none for a service reached
    /// through its waypoint).
    pub workload: Option<Arc<Workload>>,
    /// The service whose VIP was dialed, if any.
    pub service: Option<Arc<MeshService>>,
    /// The waypoint pod the connection is tunnelled to first.
    pub waypoint: Option<WaypointHop>,
}

/// The waypoint pod a connection goes through, and its address of the family in use.
#[derive(Debug, Clone)]
pub struct WaypointHop {
    /// `namespace/name` of the waypoint.
    pub waypoint: String,
    pub pod: Arc<Workload>,
    pub addr: IpAddr,
}

impl Route {
    /// Enrolled destinations and waypoints are reached over HBONE; others as plain TCP.
    pub fn is_mesh(&self) -> bool {
        self.waypoint.is_some() || self.workload.as_ref().is_some_and(|w| w.enrolled)
    }

    /// The pod the HBONE tunnel goes to: the waypoint's, else the destination's.
    pub fn tunnel_peer(&self) -> Option<&Arc<Workload>> {
        self.waypoint
            .as_ref()
            .map(|h| &h.pod)
            .or(self.workload.as_ref())
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ResolveError {
    #[error("service {service} has no port {port}")]
    UnknownServicePort { service: String, port: u16 },
    #[error("service {service} has no endpoint with an {family} address")]
    NoEndpoints {
        service: String,
        family: &'static str,
    },
    #[error(
        "{dst} must go through waypoint {waypoint}, which {why} (the connection is refused, \
         never sent around the waypoint)"
    )]
    NoWaypoint {
        dst: String,
        waypoint: String,
        why: String,
    },
}

impl ResolveError {
    /// Short reason for the `istio_tcp_connections_failed_total` label.
    pub fn reason(&self) -> &'static str {
        match self {
            ResolveError::UnknownServicePort { .. } => "unknown_service_port",
            ResolveError::NoEndpoints { .. } => "no_healthy_upstream",
            ResolveError::NoWaypoint { .. } => "waypoint_unavailable",
        }
    }
}

/// Load-balancing state that outlives config snapshots: round-robin positions per service and
/// live connections per endpoint.
#[derive(Default)]
pub struct Balancer {
    next: Mutex<HashMap<String, usize>>,
    active: Arc<Mutex<HashMap<String, usize>>>,
}

/// Counts one live connection to an endpoint (for least-connections) until dropped.
pub struct ActiveGuard {
    active: Arc<Mutex<HashMap<String, usize>>>,
    endpoint: String,
}

impl Drop for ActiveGuard {
    fn drop(&mut self) {
        let mut active = self.active.lock().expect("balancer lock");
        if let Some(n) = active.get_mut(&self.endpoint) {
            *n -= 1;
            if *n == 0 {
                active.remove(&self.endpoint);
            }
        }
    }
}

impl Balancer {
    /// Picks one of `candidates` (non-empty) for the service (or waypoint) `key`.
    fn pick(&self, key: &str, lb: LoadBalancing, candidates: &[&Arc<Workload>]) -> usize {
        let rotate = || {
            let mut next = self.next.lock().expect("balancer lock");
            let n = next.entry(key.to_string()).or_default();
            let i = *n % candidates.len();
            *n = n.wrapping_add(1);
            i
        };
        match lb {
            LoadBalancing::RoundRobin => rotate(),
            LoadBalancing::Random => rand::random_range(0..candidates.len()),
            LoadBalancing::LeastConnections => {
                let start = rotate();
                let active = self.active.lock().expect("balancer lock");
                // Ties go to the round-robin position, so equal endpoints still share the load.
                (0..candidates.len())
                    .map(|k| (start + k) % candidates.len())
                    .min_by_key(|&i| active.get(&candidates[i].key()).copied().unwrap_or(0))
                    .unwrap_or(start)
            }
        }
    }

    /// Forgets the round-robin positions of services `state` no longer has (called on every
    /// config change; live-connection counts remove themselves).
    pub fn prune(&self, state: &State) {
        self.next.lock().expect("balancer lock").retain(|key, _| {
            state.services.contains_key(key)
                || key
                    .strip_prefix("waypoint ")
                    .is_some_and(|wp| state.waypoints().any(|w| w.waypoint.key() == wp))
        });
    }

    /// Services with a round-robin position.
    pub fn tracked_services(&self) -> usize {
        self.next.lock().expect("balancer lock").len()
    }

    /// Marks a connection to `endpoint` live until the guard drops.
    pub fn track(&self, endpoint: &Workload) -> ActiveGuard {
        let key = endpoint.key();
        *self
            .active
            .lock()
            .expect("balancer lock")
            .entry(key.clone())
            .or_default() += 1;
        ActiveGuard {
            active: self.active.clone(),
            endpoint: key,
        }
    }
}

/// Resolves the application's original destination, for a sender that is not a waypoint.
pub fn resolve(
    state: &State,
    orig: SocketAddr,
    balancer: &Balancer,
) -> Result<Route, ResolveError> {
    resolve_from(state, None, orig, balancer)
}

/// Resolves `src`'s connection to `orig`: a service VIP to one of its endpoints, or to its
/// waypoint; a workload's address to the workload, or to the waypoint that takes its traffic.
/// A waypoint's own connections never go back through it.
pub fn resolve_from(
    state: &State,
    src: Option<&Workload>,
    orig: SocketAddr,
    balancer: &Balancer,
) -> Result<Route, ResolveError> {
    let ip = orig.ip().to_canonical();
    let orig = SocketAddr::new(ip, orig.port());
    let want_v4 = ip.is_ipv4();
    let family = if want_v4 { "IPv4" } else { "IPv6" };
    let address = |w: &Workload| address_of(w, want_v4);
    let through = |via: &Via, dst: String| -> Result<Option<WaypointHop>, ResolveError> {
        let missing = |waypoint: &str, why: String| ResolveError::NoWaypoint {
            dst: dst.clone(),
            waypoint: waypoint.to_string(),
            why,
        };
        match via {
            Via::Direct => Ok(None),
            Via::Waypoint(wp) if src.is_some_and(|s| wp.serves_from(s)) => Ok(None),
            Via::Waypoint(wp) => {
                let key = wp.waypoint.key();
                let pods: Vec<&Arc<Workload>> =
                    wp.pods.iter().filter(|p| address(p).is_some()).collect();
                if pods.is_empty() {
                    return Err(missing(
                        &key,
                        format!("has no pod with an {family} address"),
                    ));
                }
                // Its own round-robin position: a Service may share the waypoint's name.
                let position = format!("waypoint {key}");
                let pod = pods[balancer.pick(&position, LoadBalancing::RoundRobin, &pods)].clone();
                let addr = address(&pod).expect("filtered above");
                Ok(Some(WaypointHop {
                    waypoint: key,
                    pod,
                    addr,
                }))
            }
            Via::Missing { waypoint, why } => Err(missing(waypoint, why.to_string())),
        }
    };
    let Some(service) = state.service_by_vip(ip) else {
        let workload = state.workload_by_ip(ip).cloned();
        let waypoint = match &workload {
            Some(w) => through(state.workload_via(w), format!("workload {}", w.key()))?,
            None => None,
        };
        return Ok(Route {
            target: orig,
            workload,
            service: None,
            waypoint,
        });
    };
    let port =
        service
            .target_port(orig.port())
            .ok_or_else(|| ResolveError::UnknownServicePort {
                service: service.key(),
                port: orig.port(),
            })?;
    if let Some(hop) = through(&service.via, format!("service {}", service.key()))? {
        return Ok(Route {
            target: orig,
            workload: None,
            service: Some(service.clone()),
            waypoint: Some(hop),
        });
    }
    let candidates: Vec<&Arc<Workload>> = service
        .endpoints
        .iter()
        .filter(|w| address(w).is_some())
        .collect();
    if candidates.is_empty() {
        return Err(ResolveError::NoEndpoints {
            service: service.key(),
            family,
        });
    }
    let chosen =
        candidates[balancer.pick(&service.key(), service.spec.load_balancing, &candidates)].clone();
    let target = SocketAddr::new(address(&chosen).expect("filtered above"), port);
    // The endpoint may have a waypoint of its own (for workload traffic): reached through a
    // service, it still goes through it.
    let waypoint = through(
        state.workload_via(&chosen),
        format!("workload {}", chosen.key()),
    )?;
    Ok(Route {
        target,
        workload: Some(chosen),
        service: Some(service.clone()),
        waypoint,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    fn state(lb: &str) -> State {
        let text = format!(
            r#"
namespaces: [{{ name: default, labels: {{ istio.io/dataplane-mode: ambient }} }}]
workloads:
  - {{ name: a, node: n1, ips: [10.0.0.1, "fd00::1"], netns: /run/netns/a }}
  - {{ name: b, node: n1, ips: [10.0.0.2], netns: /run/netns/b }}
  - {{ name: c, node: n2, ips: [10.0.0.3], netns: /run/netns/c }}
  - {{ name: plain, node: n2, ips: [10.0.0.4], netns: /run/netns/p, labels: {{ istio.io/dataplane-mode: none }} }}
services:
  - name: web
    vips: [10.96.0.1, "fd00:96::1"]
    ports: [{{ port: 80, targetPort: 8080 }}]
    loadBalancing: {lb}
    endpoints: [a, b, c]
  - name: empty
    vips: [10.96.0.2]
    ports: [{{ port: 80 }}]
"#
        );
        State::from_mesh(
            &crate::config::parse(Path::new("t.yaml"), &text).unwrap(),
            "n1",
        )
    }

    fn addr(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    fn spread(state: &State, balancer: &Balancer, n: usize) -> HashMap<String, usize> {
        let mut counts = HashMap::new();
        for _ in 0..n {
            let r = resolve(state, addr("10.96.0.1:80"), balancer).unwrap();
            *counts.entry(r.workload.unwrap().name.clone()).or_default() += 1;
        }
        counts
    }

    #[test]
    fn round_robin_cycles_through_endpoints_with_the_target_port() {
        let (state, balancer) = (state("roundRobin"), Balancer::default());
        let picks: Vec<SocketAddr> = (0..4)
            .map(|_| {
                resolve(&state, addr("10.96.0.1:80"), &balancer)
                    .unwrap()
                    .target
            })
            .collect();
        assert_eq!(
            picks,
            [
                addr("10.0.0.1:8080"),
                addr("10.0.0.2:8080"),
                addr("10.0.0.3:8080"),
                addr("10.0.0.1:8080")
            ]
        );
        assert_eq!(
            spread(&state, &balancer, 300)
                .values()
                .copied()
                .collect::<Vec<_>>(),
            [100, 100, 100]
        );
    }

    #[test]
    fn balancing_state_of_removed_services_is_pruned() {
        let (state, balancer) = (state("roundRobin"), Balancer::default());
        resolve(&state, addr("10.96.0.1:80"), &balancer).unwrap();
        assert_eq!(balancer.tracked_services(), 1);
        balancer.prune(&state);
        assert_eq!(balancer.tracked_services(), 1);
        balancer.prune(&State::default());
        assert_eq!(balancer.tracked_services(), 0);
    }

    #[test]
    fn random_spreads_over_every_endpoint() {
        let (state, balancer) = (state("random"), Balancer::default());
        let counts = spread(&state, &balancer, 3000);
        assert_eq!(counts.len(), 3);
        assert!(
            counts.values().all(|&n| (800..1200).contains(&n)),
            "{counts:?}"
        );
    }

    #[test]
    fn least_connections_prefers_idle_endpoints() {
        let (state, balancer) = (state("leastConnections"), Balancer::default());
        let a = state.workloads["default/a"].clone();
        let b = state.workloads["default/b"].clone();
        let _busy = [balancer.track(&a), balancer.track(&a), balancer.track(&b)];
        let r = resolve(&state, addr("10.96.0.1:80"), &balancer).unwrap();
        assert_eq!(r.workload.unwrap().name, "c");
        // Once the guards drop, all are equal again and the load rotates.
        drop(_busy);
        assert_eq!(spread(&state, &balancer, 30).len(), 3);
    }

    #[test]
    fn ipv6_vips_pick_only_endpoints_with_ipv6() {
        let (state, balancer) = (state("roundRobin"), Balancer::default());
        for _ in 0..3 {
            let r = resolve(&state, addr("[fd00:96::1]:80"), &balancer).unwrap();
            assert_eq!(r.target, addr("[fd00::1]:8080"));
        }
    }

    #[test]
    fn unknown_ports_and_empty_services_fail_fast() {
        let (state, balancer) = (state("roundRobin"), Balancer::default());
        let e = resolve(&state, addr("10.96.0.1:81"), &balancer).unwrap_err();
        assert_eq!(e.to_string(), "service default/web has no port 81");
        assert_eq!(e.reason(), "unknown_service_port");
        let e = resolve(&state, addr("10.96.0.2:80"), &balancer).unwrap_err();
        assert_eq!(
            e.to_string(),
            "service default/empty has no endpoint with an IPv4 address"
        );
    }

    #[test]
    fn workloads_and_unknown_addresses_resolve_directly() {
        let (state, balancer) = (state("roundRobin"), Balancer::default());
        let r = resolve(&state, addr("10.0.0.3:9000"), &balancer).unwrap();
        assert!(r.is_mesh() && r.service.is_none() && r.target == addr("10.0.0.3:9000"));
        let r = resolve(&state, addr("10.0.0.4:9000"), &balancer).unwrap();
        assert!(
            !r.is_mesh() && r.workload.is_some(),
            "not enrolled: plain TCP"
        );
        let r = resolve(&state, addr("[::ffff:192.0.2.1]:443"), &balancer).unwrap();
        assert!(!r.is_mesh() && r.workload.is_none() && r.target == addr("192.0.2.1:443"));
    }

    const WITH_WAYPOINT: &str = r#"
namespaces: [{ name: default, labels: { istio.io/dataplane-mode: ambient } }]
workloads:
  - { name: a, node: n1, ips: [10.0.0.1] }
  - { name: b, node: n2, ips: [10.0.0.2], labels: { istio.io/use-waypoint: wp-all } }
  - { name: wp-1, node: n1, ips: [10.0.0.8], serviceAccount: wp, labels: { gateway.networking.k8s.io/gateway-name: wp } }
  - { name: all-1, node: n1, ips: [10.0.0.9], serviceAccount: wp-all, labels: { gateway.networking.k8s.io/gateway-name: wp-all } }
services:
  - { name: web, vips: [10.96.0.1], ports: [{ port: 80, targetPort: 8080 }], endpoints: [a], labels: { istio.io/use-waypoint: wp } }
  - { name: lost, vips: [10.96.0.2], ports: [{ port: 80 }], endpoints: [a], labels: { istio.io/use-waypoint: gone } }
  - { name: bsvc, vips: [10.96.0.3], ports: [{ port: 80, targetPort: 9000 }], endpoints: [b] }
gateways:
  - { apiVersion: gateway.networking.k8s.io/v1, kind: Gateway, metadata: { name: wp }, spec: { gatewayClassName: istio-waypoint } }
  - { apiVersion: gateway.networking.k8s.io/v1, kind: Gateway, metadata: { name: wp-all, labels: { istio.io/waypoint-for: all } }, spec: { gatewayClassName: istio-waypoint } }
"#;

    #[test]
    fn traffic_for_a_service_or_workload_with_a_waypoint_is_tunnelled_to_the_waypoint() {
        let config = crate::config::parse(Path::new("t.yaml"), WITH_WAYPOINT).unwrap();
        let state = State::from_mesh(&config, "n1");
        let balancer = Balancer::default();
        let a = state.workloads["default/a"].clone();
        // To the service: the waypoint's pod, with the VIP and service port as the target.
        let r = resolve_from(&state, Some(&a), addr("10.96.0.1:80"), &balancer).unwrap();
        assert_eq!(r.target, addr("10.96.0.1:80"));
        let hop = r.waypoint.as_ref().unwrap();
        assert_eq!(
            (hop.waypoint.as_str(), hop.pod.name.as_str()),
            ("default/wp", "wp-1")
        );
        assert_eq!(hop.addr, "10.0.0.8".parse::<IpAddr>().unwrap());
        assert!(r.is_mesh());
        assert_eq!(r.tunnel_peer().unwrap().service_account, "wp");
        // The waypoint itself reaches the endpoint.
        let wp = state.workloads["default/wp-1"].clone();
        let r = resolve_from(&state, Some(&wp), addr("10.96.0.1:80"), &balancer).unwrap();
        assert_eq!(r.target, addr("10.0.0.1:8080"));
        assert!(r.waypoint.is_none());
        // A workload address, with a waypoint for workloads.
        let r = resolve_from(&state, Some(&a), addr("10.0.0.2:9000"), &balancer).unwrap();
        assert_eq!(r.target, addr("10.0.0.2:9000"));
        assert_eq!(r.waypoint.unwrap().pod.name, "all-1");
        // Through a service without a waypoint to an endpoint with one: still through it, with
        // the endpoint as the authority.
        let r = resolve_from(&state, Some(&a), addr("10.96.0.3:80"), &balancer).unwrap();
        assert_eq!(r.target, addr("10.0.0.2:9000"));
        assert_eq!(r.waypoint.unwrap().pod.name, "all-1");
        // A waypoint that is not there: refused, never around it.
        let e = resolve_from(&state, Some(&a), addr("10.96.0.2:80"), &balancer).unwrap_err();
        assert_eq!(e.reason(), "waypoint_unavailable");
        assert_eq!(
            e.to_string(),
            "service default/lost must go through waypoint default/gone, which does not exist \
             (the connection is refused, never sent around the waypoint)"
        );
    }
}

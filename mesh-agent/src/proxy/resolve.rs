//! Resolve: where an outbound connection goes. A service VIP is load-balanced to an endpoint, an
//! enrolled workload is reached over HBONE, anything else is passed through as plain TCP.
//!
//! [`Resolve`] is the step of a connection stack (a tower `Service` over [`Target`]) that does
//! this under the current state and hands a [`Routed`] connection to the next step.
use std::collections::hash_map::Entry;
use std::collections::HashMap;
use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{ready, Context, Poll};
use std::time::{Duration, Instant};

use futures::future::{ready, Either, Ready};
use pin_project_lite::pin_project;
use tokio::sync::watch;
use tower::util::Oneshot;
use tower::{Service, ServiceExt};

use super::accept::Local;
use super::accounting::failed;
use super::error::{Failure, ProxyError};
use super::labels::Ends;
use crate::identity::Identity;
use crate::model::{EjectionPolicy, LoadBalancing, Workload};
use crate::state::{Service as MeshService, State, Via};
use crate::telemetry::{ConnLabels, EjectionLabels, Metrics};

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
    shared: Arc<Shared>,
    inner: S,
}

struct Shared {
    state: watch::Receiver<Arc<State>>,
    balancer: Arc<Balancer>,
    trust_domain: Arc<str>,
    metrics: Arc<Metrics>,
}

impl<S> Resolve<S> {
    pub fn new(
        state: watch::Receiver<Arc<State>>,
        balancer: Arc<Balancer>,
        trust_domain: &str,
        metrics: Arc<Metrics>,
        inner: S,
    ) -> Resolve<S> {
        Resolve {
            shared: Arc::new(Shared {
                state,
                balancer,
                trust_domain: trust_domain.into(),
                metrics,
            }),
            inner,
        }
    }

    /// Its load-balancing state.
    pub fn balancer(&self) -> &Balancer {
        &self.shared.balancer
    }

    /// Routes `target`, picking a service endpoint other than `avoid` if the service has one, or
    /// the `chosen` one.
    fn route(
        &self,
        target: &Target,
        avoid: Option<&Workload>,
        chosen: Option<&Workload>,
    ) -> Result<Routed, Failure> {
        let shared = &*self.shared;
        let state = shared.state.borrow().clone();
        let local = target.local.clone();
        // Labels may have changed since the listener opened: read the current ones.
        let src = state
            .workloads
            .get(&local.workload.key())
            .unwrap_or(&local.workload)
            .clone();
        let route = resolve_avoiding(
            &state,
            Some(&src),
            target.orig,
            &shared.balancer,
            avoid,
            chosen,
        )
        .map_err(|e| {
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
            .map(|w| Identity::new(&*shared.trust_domain, &w.namespace, &w.service_account));
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
        let active = route.tunnel_peer().map(|w| shared.balancer.track(w));
        let client_addr = SocketAddr::new(
            src.address(route.target.is_ipv4())
                .unwrap_or(target.peer.ip()),
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

    /// Resolves `target` (a service VIP and port) to the service's endpoint `endpoint`, chosen by
    /// the caller, and connects: no balancing, no health report and no retry here (a waypoint
    /// does its own). An endpoint that left the service is an error (no endpoint), not replaced.
    pub async fn call_endpoint(
        &self,
        target: Target,
        endpoint: &Workload,
    ) -> Result<S::Response, Failure>
    where
        S: Service<Routed, Error = Failure> + Clone,
    {
        let routed = self.route(&target, None, Some(endpoint))?;
        self.inner.clone().oneshot(routed).await
    }

    /// Counts, logs and records against the endpoint's health a failed attempt to a service
    /// endpoint; the failure says the endpoint is bad.
    fn endpoint_failed(&self, picked: &Picked, error: &ProxyError) {
        let (service, endpoint) = (&picked.service, &picked.endpoint);
        let Some(ejection) = self.shared.balancer.failed(service, endpoint) else {
            return;
        };
        let (service, endpoint) = (service.key(), endpoint.key());
        tracing::warn!(
            %service,
            %endpoint,
            ejected_for_ms = ejection.length.as_millis() as u64,
            times = ejection.times,
            reason = %error.reason(),
            error = %error,
            "endpoint ejected from the service's load balancing: a connection to it failed"
        );
        self.shared
            .metrics
            .endpoint_ejections
            .get_or_create(&EjectionLabels { service, endpoint })
            .inc();
    }
}

/// The service endpoint the balancer picked for an attempt: its result is the endpoint's
/// health.
struct Picked {
    service: Arc<MeshService>,
    endpoint: Arc<Workload>,
}

impl Picked {
    /// Set when the balancer picked the route's endpoint among a service's, and the connection
    /// goes to it directly (not through a waypoint, whose failures are not the endpoint's).
    fn of(route: &Route) -> Option<Picked> {
        match (&route.service, &route.workload, &route.waypoint) {
            (Some(service), Some(endpoint), None) => Some(Picked {
                service: service.clone(),
                endpoint: endpoint.clone(),
            }),
            _ => None,
        }
    }
}

/// What the future of an attempt to a service endpoint keeps to report its result, and to try
/// another endpoint once.
struct Attempt<S> {
    resolve: Resolve<S>,
    picked: Picked,
    /// The connection, while it may be retried: the service has more than one endpoint and
    /// this is the first attempt.
    retry: Option<Target>,
}

pin_project! {
    /// The resolve step's future: the next step's, and for a service endpoint the report of its
    /// result and at most one retry on another endpoint.
    pub struct ResolveFuture<S: Service<Routed, Error = Failure>> {
        #[pin]
        call: Either<Ready<Result<S::Response, Failure>>, Oneshot<S, Routed>>,
        attempt: Option<Attempt<S>>,
    }
}

impl<S> Future for ResolveFuture<S>
where
    S: Service<Routed, Error = Failure> + Clone,
{
    type Output = Result<S::Response, Failure>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let mut this = self.project();
        loop {
            let result = ready!(this.call.as_mut().poll(cx));
            let Some(attempt) = this.attempt.take() else {
                return Poll::Ready(result);
            };
            let Attempt {
                resolve,
                picked,
                retry,
            } = attempt;
            let failure = match result {
                Ok(response) => {
                    resolve
                        .shared
                        .balancer
                        .succeeded(&picked.service, &picked.endpoint);
                    return Poll::Ready(Ok(response));
                }
                Err(failure) if failure.error.is_endpoint_failure() => failure,
                Err(failure) => return Poll::Ready(Err(failure)),
            };
            resolve.endpoint_failed(&picked, &failure.error);
            // Nothing of the client's was sent yet: another endpoint may take the connection.
            let Some(target) = retry else {
                return Poll::Ready(Err(failure));
            };
            let routed = match resolve.route(&target, Some(&picked.endpoint), None) {
                Ok(routed)
                    if routed.route.workload.as_ref().is_some_and(|w| {
                        (&w.namespace, &w.name)
                            != (&picked.endpoint.namespace, &picked.endpoint.name)
                    }) =>
                {
                    routed
                }
                // No other endpoint: the first failure is the answer.
                _ => return Poll::Ready(Err(failure)),
            };
            let Failure { error, labels } = failure;
            if let Some(labels) = labels {
                failed(&resolve.shared.metrics, *labels, error.reason());
            }
            tracing::warn!(
                service = %picked.service.key(),
                endpoint = %picked.endpoint.key(),
                retry_endpoint = %routed.route.workload.as_ref().map_or_else(String::new, |w| w.key()),
                reason = %error.reason(),
                error = %error,
                "connection to a service endpoint failed before any byte was sent; trying another endpoint"
            );
            let next = Picked::of(&routed.route);
            this.call
                .set(Either::Right(resolve.inner.clone().oneshot(routed)));
            *this.attempt = next.map(|picked| Attempt {
                resolve,
                picked,
                retry: None,
            });
        }
    }
}

impl<S> Service<Target> for Resolve<S>
where
    S: Service<Routed, Error = Failure> + Clone,
{
    type Response = S::Response;
    type Error = Failure;
    type Future = ResolveFuture<S>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Failure>> {
        // Resolution needs nothing that can run out; the next step is made ready per call.
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, target: Target) -> Self::Future {
        let routed = match self.route(&target, None, None) {
            Ok(routed) => routed,
            Err(failure) => {
                return ResolveFuture {
                    call: Either::Left(ready(Err(failure))),
                    attempt: None,
                }
            }
        };
        let attempt = Picked::of(&routed.route).map(|picked| Attempt {
            resolve: self.clone(),
            // Only a service VIP is retried, never a waypoint hop or a pod's own address.
            retry: (picked.service.endpoints.len() > 1).then_some(target),
            picked,
        });
        ResolveFuture {
            call: Either::Right(self.inner.clone().oneshot(routed)),
            attempt,
        }
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

/// Load-balancing state that outlives config snapshots: per service (or waypoint) its
/// round-robin position and its endpoints' health, and live connections per endpoint.
pub struct Balancer {
    services: Mutex<HashMap<String, ServiceLb>>,
    active: Arc<Mutex<HashMap<String, usize>>>,
    /// Endpoints with health state, over every service: while none has any, picking and
    /// reporting a success look nothing up.
    watched: AtomicUsize,
    clock: Clock,
}

/// Where the balancer reads the time (injected in tests).
pub type Clock = Arc<dyn Fn() -> Instant + Send + Sync>;

impl Default for Balancer {
    fn default() -> Self {
        Balancer::with_clock(Arc::new(Instant::now))
    }
}

#[derive(Default)]
struct ServiceLb {
    next: usize,
    /// By endpoint `namespace/name`: only endpoints that failed lately, bounded by the
    /// service's endpoints (pruned with them).
    health: HashMap<String, Health>,
}

/// One endpoint's passive health within a service.
#[derive(Debug, Clone, Copy)]
struct Health {
    /// Failed attempts since the last success or ejection.
    failures: u32,
    /// Envoy's ejection multiplier: times ejected, less one per `interval` spent in since.
    times: u32,
    /// Left out of the balancing until then.
    ejected_until: Option<Instant>,
    /// When it was last let back in (or first failed).
    since: Instant,
}

impl Health {
    /// The ejection count after the decay for the time it has been in.
    fn decayed(&self, now: Instant, policy: &EjectionPolicy) -> u32 {
        if self.ejected_until.is_some() || policy.interval.is_zero() {
            return self.times;
        }
        let spent =
            now.saturating_duration_since(self.since).as_nanos() / policy.interval.as_nanos();
        self.times
            .saturating_sub(u32::try_from(spent).unwrap_or(u32::MAX))
    }

    fn is_ejected(&self) -> bool {
        self.ejected_until.is_some()
    }
}

/// An endpoint just ejected.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ejection {
    /// How long it stays out.
    pub length: Duration,
    /// Its ejection multiplier (1 the first time).
    pub times: u32,
}

/// An endpoint out of its service's balancing now (`mesh-agent` admin endpoint).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ejected {
    pub service: String,
    pub endpoint: String,
    /// Time left.
    pub remaining: Duration,
}

/// `endpoint`'s score for a client: the highest-scoring eligible endpoint takes the client, so an
/// endpoint leaving (or ejected) moves only its own clients.
fn rendezvous(client: IpAddr, endpoint: &Workload) -> u64 {
    use std::hash::{Hash, Hasher};
    // Fixed keys: every agent of a build scores alike.
    let mut h = std::hash::DefaultHasher::new();
    (client.to_canonical(), &endpoint.namespace, &endpoint.name).hash(&mut h);
    h.finish()
}

/// Whether `key` (`namespace/name`) names `w`, without building its key.
fn names(key: &str, w: &Workload) -> bool {
    key.split_once('/')
        .is_some_and(|(ns, name)| ns == w.namespace && name == w.name)
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
    pub fn with_clock(clock: Clock) -> Balancer {
        Balancer {
            services: Mutex::default(),
            active: Arc::default(),
            watched: AtomicUsize::new(0),
            clock,
        }
    }

    /// Picks one of `candidates` (non-empty) for the service (or waypoint) `key`. Ejected
    /// endpoints and `avoid` are left out of `candidates` first, unless that would leave none
    /// (every endpoint ejected: all are balanced over, as Envoy's panic mode does); `avoid` is
    /// left out whenever another candidate remains.
    ///
    /// `source` is the client's address, for [`LoadBalancing::SourceIpHash`] (without one it
    /// picks at random).
    fn pick(
        &self,
        key: &str,
        lb: LoadBalancing,
        candidates: &mut Vec<&Arc<Workload>>,
        avoid: Option<&Workload>,
        source: Option<IpAddr>,
    ) -> usize {
        let filter = avoid.is_some() || self.watched.load(Ordering::Relaxed) > 0;
        let ordered = matches!(
            lb,
            LoadBalancing::RoundRobin | LoadBalancing::LeastConnections
        );
        let position = if !ordered && !filter {
            0
        } else {
            let mut services = self.services.lock().expect("balancer lock");
            if !services.contains_key(key) {
                services.insert(key.to_string(), ServiceLb::default());
            }
            let service = services.get_mut(key).expect("inserted above");
            if filter {
                self.keep_eligible(key, &mut service.health, candidates, avoid);
            }
            let n = service.next;
            service.next = n.wrapping_add(1);
            n
        };
        match lb {
            LoadBalancing::RoundRobin => position % candidates.len(),
            LoadBalancing::Random => rand::random_range(0..candidates.len()),
            LoadBalancing::LeastConnections => {
                let start = position % candidates.len();
                let active = self.active.lock().expect("balancer lock");
                // Ties go to the round-robin position, so equal endpoints still share the load.
                (0..candidates.len())
                    .map(|k| (start + k) % candidates.len())
                    .min_by_key(|&i| active.get(&candidates[i].key()).copied().unwrap_or(0))
                    .unwrap_or(start)
            }
            LoadBalancing::LeastRequest => {
                let n = candidates.len();
                if n == 1 {
                    return 0;
                }
                let a = rand::random_range(0..n);
                let b = (a + rand::random_range(1..n)) % n;
                let active = self.active.lock().expect("balancer lock");
                let load = |i: usize| active.get(&candidates[i].key()).copied().unwrap_or(0);
                if load(b) < load(a) {
                    b
                } else {
                    a
                }
            }
            LoadBalancing::SourceIpHash => match source {
                Some(ip) => (0..candidates.len())
                    .max_by_key(|&i| rendezvous(ip, candidates[i]))
                    .unwrap_or(0),
                None => rand::random_range(0..candidates.len()),
            },
        }
    }

    /// Leaves out of `candidates` the endpoints ejected now and `avoid`, unless none would
    /// remain; lets back in the endpoints whose ejection ended.
    fn keep_eligible(
        &self,
        service: &str,
        health: &mut HashMap<String, Health>,
        candidates: &mut Vec<&Arc<Workload>>,
        avoid: Option<&Workload>,
    ) {
        if !health.is_empty() {
            let now = (self.clock)();
            for (endpoint, h) in health.iter_mut() {
                let_back_in(service, endpoint, h, now);
            }
        }
        let avoided =
            |w: &Workload| avoid.is_some_and(|a| a.namespace == w.namespace && a.name == w.name);
        let ejected = |w: &Workload| health.iter().any(|(k, h)| h.is_ejected() && names(k, w));
        if candidates.iter().any(|w| !avoided(w) && !ejected(w)) {
            candidates.retain(|w| !avoided(w) && !ejected(w));
        } else if candidates.iter().any(|w| !avoided(w)) {
            candidates.retain(|w| !avoided(w));
        }
    }

    /// Records a failed connection attempt to `endpoint` of `service` that says the endpoint is
    /// bad; returns the ejection it caused, if any.
    pub fn failed(&self, service: &MeshService, endpoint: &Workload) -> Option<Ejection> {
        let policy = service.spec.ejection;
        if policy.consecutive_failures == 0 {
            return None;
        }
        let now = (self.clock)();
        let key = service.key();
        let mut services = self.services.lock().expect("balancer lock");
        let lb = services.entry(key.clone()).or_default();
        let endpoint_key = endpoint.key();
        for (k, h) in lb.health.iter_mut() {
            let_back_in(&key, k, h, now);
        }
        let ejected_now = lb.health.values().filter(|h| h.is_ejected()).count();
        let h = match lb.health.entry(endpoint_key) {
            Entry::Occupied(e) => e.into_mut(),
            Entry::Vacant(e) => {
                self.watched.fetch_add(1, Ordering::Relaxed);
                e.insert(Health {
                    failures: 0,
                    times: 0,
                    ejected_until: None,
                    since: now,
                })
            }
        };
        if h.is_ejected() {
            // An attempt that started before the ejection.
            return None;
        }
        h.failures = h.failures.saturating_add(1);
        if h.failures < policy.consecutive_failures
            || ejected_now >= policy.max_ejected(service.endpoints.len())
        {
            return None;
        }
        let times = h.decayed(now, &policy).saturating_add(1);
        let length = policy.length(times);
        *h = Health {
            failures: 0,
            times,
            ejected_until: Some(now + length),
            since: now,
        };
        Some(Ejection { length, times })
    }

    /// Records a connection to `endpoint` of `service` that worked: its failures are forgotten.
    pub fn succeeded(&self, service: &MeshService, endpoint: &Workload) {
        if self.watched.load(Ordering::Relaxed) == 0 {
            return;
        }
        let policy = service.spec.ejection;
        let service_key = service.key();
        let mut services = self.services.lock().expect("balancer lock");
        let Some(lb) = services.get_mut(&service_key) else {
            return;
        };
        let Some((key, h)) = lb.health.iter_mut().find(|(k, _)| names(k, endpoint)) else {
            return;
        };
        h.failures = 0;
        let now = (self.clock)();
        let_back_in(&service_key, key, h, now);
        if !h.is_ejected() && h.decayed(now, &policy) == 0 {
            let key = key.clone();
            lb.health.remove(&key);
            self.watched.fetch_sub(1, Ordering::Relaxed);
        }
    }

    /// Endpoints out of their service's balancing now, by service and endpoint.
    pub fn ejected(&self) -> Vec<Ejected> {
        let now = (self.clock)();
        let services = self.services.lock().expect("balancer lock");
        let mut out: Vec<Ejected> = services
            .iter()
            .flat_map(|(service, lb)| {
                lb.health.iter().filter_map(move |(endpoint, h)| {
                    let until = h.ejected_until.filter(|&u| u > now)?;
                    Some(Ejected {
                        service: service.clone(),
                        endpoint: endpoint.clone(),
                        remaining: until - now,
                    })
                })
            })
            .collect();
        out.sort_by(|a, b| (&a.service, &a.endpoint).cmp(&(&b.service, &b.endpoint)));
        out
    }

    /// Forgets the balancing state of services `state` no longer has, and the health of
    /// endpoints that left their service (called on every config change; live-connection
    /// counts remove themselves).
    pub fn prune(&self, state: &State) {
        let mut services = self.services.lock().expect("balancer lock");
        services.retain(|key, lb| {
            if let Some(service) = state.services.get(key) {
                lb.health
                    .retain(|k, _| service.endpoints.iter().any(|w| names(k, w)));
                return true;
            }
            lb.health.clear();
            key.strip_prefix("waypoint ")
                .is_some_and(|wp| state.waypoints().any(|w| w.waypoint.key() == wp))
        });
        let watched = services.values().map(|lb| lb.health.len()).sum();
        self.watched.store(watched, Ordering::Relaxed);
    }

    /// Services with balancing state.
    pub fn tracked_services(&self) -> usize {
        self.services.lock().expect("balancer lock").len()
    }

    /// Endpoints with health state, over all services.
    pub fn watched_endpoints(&self) -> usize {
        self.watched.load(Ordering::Relaxed)
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

/// Lets `endpoint` back into `service`'s balancing if its ejection has ended by `now`.
fn let_back_in(service: &str, endpoint: &str, h: &mut Health, now: Instant) {
    if let Some(until) = h.ejected_until.filter(|&u| u <= now) {
        h.ejected_until = None;
        h.since = until;
        tracing::info!(
            %service,
            %endpoint,
            "endpoint back in the service's load balancing: its ejection ended"
        );
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
    resolve_avoiding(state, src, orig, balancer, None, None)
}

/// [`resolve_from`], picking a service endpoint other than `avoid` (one that just failed) when
/// the service has another.
fn resolve_avoiding(
    state: &State,
    src: Option<&Workload>,
    orig: SocketAddr,
    balancer: &Balancer,
    avoid: Option<&Workload>,
    chosen: Option<&Workload>,
) -> Result<Route, ResolveError> {
    let ip = orig.ip().to_canonical();
    let orig = SocketAddr::new(ip, orig.port());
    let want_v4 = ip.is_ipv4();
    let family = if want_v4 { "IPv4" } else { "IPv6" };
    let address = |w: &Workload| w.address(want_v4);
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
                let mut pods: Vec<&Arc<Workload>> =
                    wp.pods.iter().filter(|p| address(p).is_some()).collect();
                if pods.is_empty() {
                    return Err(missing(
                        &key,
                        format!("has no pod with an {family} address"),
                    ));
                }
                // Its own round-robin position: a Service may share the waypoint's name.
                let position = format!("waypoint {key}");
                let pick =
                    balancer.pick(&position, LoadBalancing::RoundRobin, &mut pods, None, None);
                let pod = pods[pick].clone();
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
    let mut candidates: Vec<&Arc<Workload>> = service
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
    // An endpoint the caller chose (a waypoint balancing per request) is taken while it is
    // still one of the service's.
    let named = chosen.and_then(|c| {
        candidates
            .iter()
            .position(|w| (&w.namespace, &w.name) == (&c.namespace, &c.name))
    });
    let pick = match (named, chosen) {
        (Some(i), _) => i,
        // The chosen endpoint left the service (or its subset) meanwhile: another one of the
        // service's might not be of the subset the caller chose from.
        (None, Some(c)) => {
            return Err(ResolveError::NoEndpoints {
                service: format!("{} (endpoint {} is gone)", service.key(), c.key()),
                family,
            })
        }
        (None, None) => balancer.pick(
            &service.key(),
            service.balancing(orig.port()),
            &mut candidates,
            avoid,
            src.and_then(|s| s.address(want_v4).or(s.ips.first().copied())),
        ),
    };
    let chosen = candidates[pick].clone();
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
#[path = "resolve/balancing_tests.rs"]
mod balancing_tests;

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

    /// Service `web` (VIP 10.96.0.1) over a, b and c with the given `ejection` settings, and a
    /// balancer whose clock the test moves.
    fn with_clock(ejection: &str) -> (State, Balancer, impl Fn(u64)) {
        let now = Arc::new(Mutex::new(Instant::now()));
        let clock: Clock = {
            let now = now.clone();
            Arc::new(move || *now.lock().unwrap())
        };
        let advance = move |secs: u64| *now.lock().unwrap() += Duration::from_secs(secs);
        let state = web(ejection, "[a, b, c]");
        (state, Balancer::with_clock(clock), advance)
    }

    fn web(ejection: &str, endpoints: &str) -> State {
        let text = format!(
            r#"
namespaces: [{{ name: default, labels: {{ istio.io/dataplane-mode: ambient }} }}]
workloads:
  - {{ name: a, node: n1, ips: [10.0.0.1] }}
  - {{ name: b, node: n1, ips: [10.0.0.2] }}
  - {{ name: c, node: n2, ips: [10.0.0.3] }}
services:
  - name: web
    vips: [10.96.0.1]
    ports: [{{ port: 80 }}]
    ejection: {ejection}
    endpoints: {endpoints}
"#
        );
        State::from_mesh(
            &crate::config::parse(Path::new("t.yaml"), &text).unwrap(),
            "n1",
        )
    }

    fn fail(state: &State, balancer: &Balancer, endpoint: &str) -> Option<Ejection> {
        balancer.failed(
            state.service_by_vip("10.96.0.1".parse().unwrap()).unwrap(),
            &state.workloads[&format!("default/{endpoint}")],
        )
    }

    fn succeed(state: &State, balancer: &Balancer, endpoint: &str) {
        balancer.succeeded(
            state.service_by_vip("10.96.0.1".parse().unwrap()).unwrap(),
            &state.workloads[&format!("default/{endpoint}")],
        )
    }

    fn picked(state: &State, balancer: &Balancer, n: usize) -> Vec<String> {
        let mut names: Vec<String> = spread(state, balancer, n).into_keys().collect();
        names.sort();
        names
    }

    #[test]
    fn a_failing_endpoint_is_ejected_for_longer_each_time_until_it_stays_healthy() {
        let (state, balancer, advance) = with_clock("{ baseSeconds: 5, maxSeconds: 12 }");
        assert_eq!(
            fail(&state, &balancer, "b"),
            Some(Ejection {
                length: Duration::from_secs(5),
                times: 1
            })
        );
        assert_eq!(picked(&state, &balancer, 30), ["a", "c"]);
        assert_eq!(balancer.ejected()[0].endpoint, "default/b");
        assert_eq!(balancer.ejected()[0].remaining, Duration::from_secs(5));
        advance(4);
        assert_eq!(picked(&state, &balancer, 30), ["a", "c"]);
        advance(1);
        assert_eq!(picked(&state, &balancer, 30), ["a", "b", "c"]);
        assert!(balancer.ejected().is_empty());
        // Failing again soon after: out twice as long; then the length stops at the maximum.
        advance(1);
        assert_eq!(
            fail(&state, &balancer, "b").unwrap().length,
            Duration::from_secs(10)
        );
        advance(9);
        assert_eq!(picked(&state, &balancer, 30), ["a", "c"]);
        advance(1);
        assert_eq!(
            fail(&state, &balancer, "b").unwrap().length,
            Duration::from_secs(12)
        );
        advance(12);
        // In for two intervals of 10 s: the count drops from 3 to 1, the next ejection is 5 s.
        advance(20);
        succeed(&state, &balancer, "b");
        assert_eq!(
            balancer.watched_endpoints(),
            1,
            "one ejection not yet forgiven"
        );
        assert_eq!(
            fail(&state, &balancer, "b").unwrap().length,
            Duration::from_secs(10)
        );
        advance(10 + 20);
        succeed(&state, &balancer, "b");
        assert_eq!(balancer.watched_endpoints(), 0, "forgiven: no state left");
        assert_eq!(fail(&state, &balancer, "b").unwrap().times, 1);
    }

    #[test]
    fn consecutive_failures_eject_and_a_success_clears_the_count() {
        let (state, balancer, _) = with_clock("{ consecutiveFailures: 2 }");
        assert_eq!(fail(&state, &balancer, "a"), None);
        succeed(&state, &balancer, "a");
        assert_eq!(balancer.watched_endpoints(), 0);
        assert_eq!(fail(&state, &balancer, "a"), None);
        assert_eq!(picked(&state, &balancer, 30), ["a", "b", "c"]);
        assert!(fail(&state, &balancer, "a").is_some());
        assert_eq!(picked(&state, &balancer, 30), ["b", "c"]);
        // Failures of an attempt that started before the ejection do not extend it.
        assert_eq!(fail(&state, &balancer, "a"), None);
        let (state, balancer, _) = with_clock("{ consecutiveFailures: 0 }");
        for _ in 0..5 {
            assert_eq!(fail(&state, &balancer, "a"), None, "ejection is off");
        }
        assert_eq!(picked(&state, &balancer, 30), ["a", "b", "c"]);
    }

    #[test]
    fn ejections_stop_at_the_maximum_share_and_all_ejected_balances_over_all() {
        // 50 % of 3 endpoints: one at a time.
        let (state, balancer, advance) = with_clock("{}");
        assert!(fail(&state, &balancer, "a").is_some());
        assert_eq!(fail(&state, &balancer, "b"), None);
        assert_eq!(picked(&state, &balancer, 30), ["b", "c"]);
        advance(5);
        assert!(
            fail(&state, &balancer, "b").is_some(),
            "a is back: b may go"
        );
        // 100 %: every endpoint may go, and then every endpoint is picked again (panic mode).
        let (state, balancer, _) = with_clock("{ maxEjectionPercent: 100 }");
        for e in ["a", "b", "c"] {
            assert!(fail(&state, &balancer, e).is_some());
        }
        assert_eq!(balancer.ejected().len(), 3);
        assert_eq!(picked(&state, &balancer, 30), ["a", "b", "c"]);
    }

    #[test]
    fn a_retry_avoids_the_failed_endpoint_unless_it_is_the_only_one() {
        let (state, balancer, _) = with_clock("{ consecutiveFailures: 0 }");
        let a = state.workloads["default/a"].clone();
        let orig = addr("10.96.0.1:80");
        for _ in 0..6 {
            let r = resolve_avoiding(&state, None, orig, &balancer, Some(&a), None).unwrap();
            assert_ne!(r.workload.unwrap().name, "a");
        }
        let (state, balancer) = (self::state("roundRobin"), Balancer::default());
        let c = state.workloads["default/c"].clone();
        // Over IPv6 only a has an address: it is the only choice.
        let r = resolve_avoiding(
            &state,
            None,
            addr("[fd00:96::1]:80"),
            &balancer,
            Some(&c),
            None,
        );
        assert_eq!(r.unwrap().workload.unwrap().name, "a");
        let r = resolve_avoiding(
            &state,
            None,
            addr("[fd00:96::1]:80"),
            &balancer,
            Some(&a),
            None,
        );
        assert_eq!(r.unwrap().workload.unwrap().name, "a");
    }

    #[test]
    fn an_endpoint_the_caller_chose_is_taken_while_it_belongs_to_the_service() {
        let (state, balancer) = (self::state("roundRobin"), Balancer::default());
        let orig = addr("10.96.0.1:80");
        let c = state.workloads["default/c"].clone();
        for _ in 0..3 {
            let r = resolve_avoiding(&state, None, orig, &balancer, None, Some(&c)).unwrap();
            assert_eq!(r.workload.unwrap().name, "c");
            assert_eq!(r.target, addr("10.0.0.3:8080"));
        }
        // Not one of the service's (it left, say): no other endpoint is taken in its place.
        let plain = state.workloads["default/plain"].clone();
        let e = resolve_avoiding(&state, None, orig, &balancer, None, Some(&plain)).unwrap_err();
        assert!(e.to_string().contains("default/plain"), "{e}");
    }

    #[test]
    fn health_of_endpoints_that_leave_and_of_removed_services_is_pruned() {
        let (state, balancer, _) = with_clock("{ maxEjectionPercent: 100 }");
        fail(&state, &balancer, "a");
        fail(&state, &balancer, "b");
        assert_eq!(balancer.watched_endpoints(), 2);
        balancer.prune(&web("{ maxEjectionPercent: 100 }", "[b, c]"));
        assert_eq!(balancer.watched_endpoints(), 1);
        assert_eq!(balancer.ejected()[0].endpoint, "default/b");
        balancer.prune(&State::default());
        assert_eq!(
            (balancer.watched_endpoints(), balancer.tracked_services()),
            (0, 0)
        );
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

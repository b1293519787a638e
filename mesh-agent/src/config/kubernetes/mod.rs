//! Kubernetes mode: the [`Mesh`] comes from the API server instead of a file, on the same kind of
//! channel, so everything downstream (State, datapath, in-pod listeners, proxy, policy) is the
//! file mode's code path.
//!
//! # Watchers
//!
//! One `kube::runtime::watcher` with its own reflector store per resource, each with the standard
//! list/watch: a paginated LIST, then a WATCH from its resourceVersion with bookmarks, resumed
//! from the last seen resourceVersion when the connection drops, and a fresh LIST when the API
//! server answers 410 Gone (the version left its watch window). During a re-list the store keeps
//! its old contents until the list is complete and then swaps, so the Mesh never passes through
//! an empty or half state. A watch connection that ends or breaks is reopened at once from the
//! last resourceVersion (kube logs the broken one); API errors (5xx, 403, unreachable server) are
//! retried with kube's default backoff (0.8 s doubling to 30 s, with jitter, reset after 2 min
//! without errors). The Mesh in force stays as it is meanwhile, and so does readiness once the
//! first sync is done. A missing CRD (404: the policy CRDs, the Gateway API's, Istio's networking
//! ones) counts as "none of them" with one warning per resource, and keeps being retried.
//!
//! | resource | scope | why |
//! |---|---|---|
//! | `namespaces` | all | `istio.io/dataplane-mode` of a namespace enrolls its pods |
//! | `pods`, `spec.nodeName=<node>` | this node | the workloads the agent wires |
//! | `pods`, `spec.nodeName!=<node>` | other nodes | destinations: enrolled or not, their identity |
//! | `services`, `endpointslices` (discovery.k8s.io/v1) | all | VIPs resolved by the proxy |
//! | `peerauthentications`, `authorizationpolicies` (security.istio.io/v1) | all | L4 policy |
//! | `gateways`, `httproutes` (gateway.networking.k8s.io/v1) | all | waypoints (class `istio-waypoint` only) and routes |
//! | `virtualservices`, `destinationrules` (networking.istio.io/v1) | all | Istio's HTTP routing and traffic policy, for waypoints (and a DestinationRule's `loadBalancer` for the agent's L4 balancing) |
//!
//! Remote pods: the agent has no control plane to ask whether a destination pod is enrolled, or
//! which SPIFFE identity it must present (Istio's ztunnel gets both from istiod over xDS). So each
//! agent watches every pod of the cluster itself. The cost is one pod watch per node on the API
//! server (its watch cache serves them, no etcd reads) and memory per pod in every agent, which
//! the `strip` module keeps to names, labels, service account, node, phase and IPs; every change
//! also rebuilds the Mesh from all stores (linear in the cluster's pods). A cluster large
//! enough for that to matter wants a control plane that pushes only what each node needs; the
//! trade-off is accepted here to keep the agent self-contained.
//!
//! # Conversion
//!
//! After every change (debounced: a burst of events within ~50 ms makes one Mesh) and only once
//! every watcher has completed its first full list, [`build`] turns the stores into a Mesh; it
//! is sent when it differs from the last one, and the `synced` flag (readiness) turns true with
//! the first (it never turns false again). Objects the agent cannot take are skipped one by one
//! with a warning naming `Kind namespace/name`; a policy object whose new version does not parse
//! keeps its last good version (a DENY policy must not vanish because an edit broke it). A Mesh
//! that still fails [`Mesh::validate`] (named by object and field, [`convert::describe_error`]) is logged and not sent: the last good one stays in
//! force.
//!
//! RBAC: `list` and `watch` on the resources above, nothing else (no `get`). The waypoint
//! ([`KubeOptions::route_status_for`]) also writes route status ([`route_status`]): `update` on
//! `httproutes/status`, from a task of its own fed the latest objects after every change.
mod convert;
mod error;
mod gateway_api;
mod istio_networking;
pub mod route_status;
mod status_writer;
mod strip;

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::hash::Hash;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::core::v1::{Namespace, Pod, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::api::{Api, ApiResource, DynamicObject};
use kube::runtime::reflector::store::Writer;
use kube::runtime::reflector::Store;
use kube::runtime::{watcher, WatchStreamExt};
use serde::de::DeserializeOwned;
use tokio::sync::{watch, Notify};
use tokio::task::JoinSet;
use tokio::time::Instant;
use tracing::{debug, info, warn};

pub use convert::{
    build, build_config, policy_document_json, Built, Objects, PolicyId, POLICY_API_VERSION,
    SERVICE_NAME_LABEL,
};
pub use error::{KubeError, RBAC_MANIFEST};

use crate::model::Mesh;

/// A burst of events closer together than this makes one Mesh.
const DEBOUNCE_QUIET: Duration = Duration::from_millis(50);
/// A steady stream of events still yields a Mesh at least this often.
const DEBOUNCE_MAX: Duration = Duration::from_millis(250);

/// Options of Kubernetes mode.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KubeOptions {
    /// This node's name (`spec.nodeName` of the pods the agent wires).
    pub node: String,
    /// Istio's root namespace: its policies apply mesh-wide.
    pub root_namespace: String,
    /// Destination ports never redirected into the proxy.
    pub excluded_ports: Vec<u16>,
    /// The waypoint process only: its Gateway (`namespace/name`), for which it writes the
    /// status of HTTPRoutes. Node agents write nothing.
    pub route_status_for: Option<String>,
    /// The mesh-wide default of the `mesh.dev/waypoint-only` label (no bypass).
    pub waypoint_only_default: bool,
}

impl Default for KubeOptions {
    fn default() -> Self {
        KubeOptions {
            node: String::new(),
            root_namespace: crate::model::DEFAULT_ROOT_NAMESPACE.to_string(),
            excluded_ports: Vec::new(),
            route_status_for: None,
            waypoint_only_default: false,
        }
    }
}

impl KubeOptions {
    /// What [`run`] checks before it starts.
    pub fn check(&self) -> Result<(), KubeError> {
        if self.node.is_empty() {
            return Err(KubeError::Options(
                "the node name is empty (set --node or NODE_NAME from the pod's spec.nodeName)"
                    .into(),
            ));
        }
        if self.root_namespace.is_empty() {
            return Err(KubeError::Options("the root namespace is empty".into()));
        }
        if self.excluded_ports.len() > mesh_common::MAX_EXCLUDED_PORTS {
            return Err(KubeError::Options(format!(
                "at most {} excluded ports",
                mesh_common::MAX_EXCLUDED_PORTS
            )));
        }
        if self.excluded_ports.contains(&0) {
            return Err(KubeError::Options("excluded port 0 is not a port".into()));
        }
        Ok(())
    }
}

/// The resources the agent watches.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Resource {
    Namespaces,
    /// Pods on this node.
    Pods,
    /// Pods on every other node.
    RemotePods,
    Services,
    EndpointSlices,
    PeerAuthentications,
    AuthorizationPolicies,
    /// `gateway.networking.k8s.io/v1` Gateways (waypoints).
    Gateways,
    HttpRoutes,
    /// `networking.istio.io/v1` VirtualServices and DestinationRules.
    VirtualServices,
    DestinationRules,
}

impl Resource {
    pub const ALL: [Resource; 11] = [
        Resource::Namespaces,
        Resource::Pods,
        Resource::RemotePods,
        Resource::Services,
        Resource::EndpointSlices,
        Resource::PeerAuthentications,
        Resource::AuthorizationPolicies,
        Resource::Gateways,
        Resource::HttpRoutes,
        Resource::VirtualServices,
        Resource::DestinationRules,
    ];

    /// How logs and errors name it.
    pub fn describe(self) -> &'static str {
        match self {
            Resource::Namespaces => "namespaces",
            Resource::Pods => "pods on this node",
            Resource::RemotePods => "pods on other nodes",
            Resource::Services => "services",
            Resource::EndpointSlices => "endpointslices",
            Resource::PeerAuthentications => "peerauthentications.security.istio.io",
            Resource::AuthorizationPolicies => "authorizationpolicies.security.istio.io",
            Resource::Gateways => "gateways.gateway.networking.k8s.io",
            Resource::HttpRoutes => "httproutes.gateway.networking.k8s.io",
            Resource::VirtualServices => "virtualservices.networking.istio.io",
            Resource::DestinationRules => "destinationrules.networking.istio.io",
        }
    }

    /// The API group (RBAC `apiGroups`).
    pub fn group(self) -> &'static str {
        match self {
            Resource::EndpointSlices => "discovery.k8s.io",
            Resource::PeerAuthentications | Resource::AuthorizationPolicies => "security.istio.io",
            Resource::Gateways | Resource::HttpRoutes => GATEWAY_API_GROUP,
            Resource::VirtualServices | Resource::DestinationRules => ISTIO_NETWORKING_GROUP,
            _ => "",
        }
    }

    /// The plural (RBAC `resources`).
    pub fn plural(self) -> &'static str {
        match self {
            Resource::Namespaces => "namespaces",
            Resource::Pods | Resource::RemotePods => "pods",
            Resource::Services => "services",
            Resource::EndpointSlices => "endpointslices",
            Resource::PeerAuthentications => "peerauthentications",
            Resource::AuthorizationPolicies => "authorizationpolicies",
            Resource::Gateways => "gateways",
            Resource::HttpRoutes => "httproutes",
            Resource::VirtualServices => "virtualservices",
            Resource::DestinationRules => "destinationrules",
        }
    }

    /// Custom resources: when their CRD is missing there can be none of them.
    fn is_custom(self) -> bool {
        matches!(
            self,
            Resource::PeerAuthentications
                | Resource::AuthorizationPolicies
                | Resource::Gateways
                | Resource::HttpRoutes
                | Resource::VirtualServices
                | Resource::DestinationRules
        )
    }

    fn index(self) -> usize {
        Resource::ALL
            .iter()
            .position(|r| *r == self)
            .unwrap_or_default()
    }
}

impl fmt::Display for Resource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.describe())
    }
}

/// The `ApiResource` of a policy kind, `PeerAuthentication` or `AuthorizationPolicy` (static:
/// no discovery call).
pub fn policy_api_resource(kind: &str) -> ApiResource {
    let plural = match kind {
        "PeerAuthentication" => Resource::PeerAuthentications.plural(),
        _ => Resource::AuthorizationPolicies.plural(),
    };
    ApiResource {
        group: "security.istio.io".into(),
        version: "v1".into(),
        api_version: POLICY_API_VERSION.into(),
        kind: kind.into(),
        plural: plural.into(),
    }
}

/// The API group of Gateways and HTTPRoutes.
pub const GATEWAY_API_GROUP: &str = "gateway.networking.k8s.io";

/// The `ApiResource` of a Gateway API kind, `Gateway` or `HTTPRoute` (`v1`; static).
pub fn gateway_api_resource(kind: &str) -> ApiResource {
    let plural = match kind {
        "Gateway" => Resource::Gateways.plural(),
        _ => Resource::HttpRoutes.plural(),
    };
    ApiResource {
        group: GATEWAY_API_GROUP.into(),
        version: "v1".into(),
        api_version: format!("{GATEWAY_API_GROUP}/v1"),
        kind: kind.into(),
        plural: plural.into(),
    }
}

/// The API group of VirtualServices and DestinationRules.
pub const ISTIO_NETWORKING_GROUP: &str = "networking.istio.io";

/// The `ApiResource` of an Istio networking kind, `VirtualService` or `DestinationRule` (`v1`;
/// static).
pub fn istio_networking_resource(kind: &str) -> ApiResource {
    let plural = match kind {
        "VirtualService" => Resource::VirtualServices.plural(),
        _ => Resource::DestinationRules.plural(),
    };
    ApiResource {
        group: ISTIO_NETWORKING_GROUP.into(),
        version: "v1".into(),
        api_version: format!("{ISTIO_NETWORKING_GROUP}/v1"),
        kind: kind.into(),
        plural: plural.into(),
    }
}

/// State the watcher tasks share with the loop that builds Configs.
struct Shared {
    synced: [AtomicBool; Resource::ALL.len()],
    changed: Notify,
}

impl Shared {
    fn all_synced(&self) -> bool {
        self.synced.iter().all(|s| s.load(Ordering::SeqCst))
    }
}

/// Watches the API server and publishes a Mesh on `tx` after every change, once every
/// resource has been listed; sets `synced` to true with the first Mesh. Returns when every
/// receiver of `tx` is gone, or at once (dropping `tx`) with an error log when `opts` fail
/// [`KubeOptions::check`]. API errors are logged and retried, never returned.
pub async fn run(
    client: kube::Client,
    opts: KubeOptions,
    tx: watch::Sender<Arc<Mesh>>,
    synced: watch::Sender<bool>,
) {
    if let Err(e) = opts.check() {
        tracing::error!("{e}");
        return;
    }
    let shared = Arc::new(Shared {
        synced: Default::default(),
        changed: Notify::new(),
    });
    let mut tasks = JoinSet::new();
    let mut spawn = Spawner {
        tasks: &mut tasks,
        shared: &shared,
    };
    let default = watcher::Config::default;
    let namespaces = spawn.watch(
        Api::<Namespace>::all(client.clone()),
        default(),
        Resource::Namespaces,
        (),
        strip::namespace,
    );
    let local_pods = spawn.watch(
        Api::<Pod>::all(client.clone()),
        default().fields(&format!("spec.nodeName={}", opts.node)),
        Resource::Pods,
        (),
        strip::pod,
    );
    let remote_pods = spawn.watch(
        Api::<Pod>::all(client.clone()),
        default().fields(&format!("spec.nodeName!={}", opts.node)),
        Resource::RemotePods,
        (),
        strip::pod,
    );
    let services = spawn.watch(
        Api::<Service>::all(client.clone()),
        default(),
        Resource::Services,
        (),
        strip::service,
    );
    let endpoint_slices = spawn.watch(
        Api::<EndpointSlice>::all(client.clone()),
        default(),
        Resource::EndpointSlices,
        (),
        strip::endpoint_slice,
    );
    let pa = policy_api_resource("PeerAuthentication");
    let peer_authentications = spawn.watch(
        Api::<DynamicObject>::all_with(client.clone(), &pa),
        default(),
        Resource::PeerAuthentications,
        pa.clone(),
        strip::policy,
    );
    let ap = policy_api_resource("AuthorizationPolicy");
    let authorization_policies = spawn.watch(
        Api::<DynamicObject>::all_with(client.clone(), &ap),
        default(),
        Resource::AuthorizationPolicies,
        ap.clone(),
        strip::policy,
    );
    let gw = gateway_api_resource("Gateway");
    let gateways = spawn.watch(
        Api::<DynamicObject>::all_with(client.clone(), &gw),
        default(),
        Resource::Gateways,
        gw.clone(),
        strip::gateway,
    );
    let hr = gateway_api_resource("HTTPRoute");
    let http_routes = spawn.watch(
        Api::<DynamicObject>::all_with(client.clone(), &hr),
        default(),
        Resource::HttpRoutes,
        hr.clone(),
        strip::http_route,
    );
    let vs = istio_networking_resource("VirtualService");
    let virtual_services = spawn.watch(
        Api::<DynamicObject>::all_with(client.clone(), &vs),
        default(),
        Resource::VirtualServices,
        vs.clone(),
        strip::policy,
    );
    let dr = istio_networking_resource("DestinationRule");
    let destination_rules = spawn.watch(
        Api::<DynamicObject>::all_with(client.clone(), &dr),
        default(),
        Resource::DestinationRules,
        dr.clone(),
        strip::policy,
    );
    // The waypoint writes route status from a task of its own, so a slow API server never
    // holds up the Mesh.
    let status_tx = opts.route_status_for.as_ref().map(|_| {
        let (tx, rx) = watch::channel(Arc::new(status_writer::Snapshot::default()));
        tasks.spawn(status_writer::run(client.clone(), rx));
        tx
    });
    info!(
        node = %opts.node,
        "watching the Kubernetes API; not ready until every resource is listed"
    );

    let mut last_good_policies = HashMap::new();
    let mut last_built: Option<Mesh> = None;
    let mut logged_warnings: HashSet<String> = HashSet::new();
    loop {
        tokio::select! {
            _ = shared.changed.notified() => {}
            _ = tx.closed() => return,
        }
        debounce(&shared.changed).await;
        if !shared.all_synced() {
            continue;
        }
        let objects = Objects {
            namespaces: namespaces.state(),
            local_pods: local_pods.state(),
            remote_pods: remote_pods.state(),
            services: services.state(),
            endpoint_slices: endpoint_slices.state(),
            peer_authentications: peer_authentications.state(),
            authorization_policies: authorization_policies.state(),
            gateways: gateways.state(),
            http_routes: http_routes.state(),
            virtual_services: virtual_services.state(),
            destination_rules: destination_rules.state(),
            last_good_policies: std::mem::take(&mut last_good_policies),
        };
        let mut built = build(&objects, &opts);
        if let (Some(tx), Some(waypoint)) = (&status_tx, &opts.route_status_for) {
            tx.send_replace(Arc::new(status_writer::snapshot(
                &objects, &built, waypoint,
            )));
        }
        last_good_policies = std::mem::take(&mut built.good_policies);
        // Each distinct warning once while it lasts, not on every rebuild.
        let current: HashSet<String> = built.warnings.into_iter().collect();
        for w in current.difference(&logged_warnings) {
            warn!("Kubernetes object: {w}");
        }
        logged_warnings = current;
        let config = built.config;
        if last_built.as_ref() == Some(&config) {
            debug!("kubernetes change without effect on the config");
            continue;
        }
        last_built = Some(config.clone());
        if let Err(e) = config.validate() {
            warn!(
                "rejected config built from the Kubernetes API (the last good one stays in \
                 force): {}",
                convert::describe_error(&config, &e)
            );
            continue;
        }
        info!(
            namespaces = config.namespaces.len(),
            workloads = config.workloads.len(),
            local_workloads = config
                .workloads
                .iter()
                .filter(|w| w.node == opts.node)
                .count(),
            services = config.services.len(),
            policies = config.policies.len(),
            waypoints = config.waypoints.len(),
            routes = config.routes.len(),
            virtual_services = config.virtual_services.len(),
            destination_rules = config.destination_rules.len(),
            "config from the Kubernetes API"
        );
        if tx.send(Arc::new(config)).is_err() {
            return;
        }
        if !*synced.borrow() {
            info!("initial sync from the Kubernetes API complete: ready");
            synced.send_replace(true);
        }
    }
}

/// Waits until no change arrived for `DEBOUNCE_QUIET`, at most `DEBOUNCE_MAX`.
async fn debounce(changed: &Notify) {
    let deadline = Instant::now() + DEBOUNCE_MAX;
    loop {
        let quiet = tokio::time::sleep_until((Instant::now() + DEBOUNCE_QUIET).min(deadline));
        tokio::select! {
            _ = changed.notified() => {
                if Instant::now() >= deadline {
                    // Keep the permit's meaning: something changed after this build started.
                    changed.notify_one();
                    return;
                }
            }
            _ = quiet => return,
        }
    }
}

struct Spawner<'a> {
    tasks: &'a mut JoinSet<()>,
    shared: &'a Arc<Shared>,
}

impl Spawner<'_> {
    /// Starts the watcher of `resource` in a task; returns its store.
    fn watch<K>(
        &mut self,
        api: Api<K>,
        config: watcher::Config,
        resource: Resource,
        dyntype: K::DynamicType,
        strip: fn(&mut K),
    ) -> Store<K>
    where
        K: kube::Resource + Clone + DeserializeOwned + fmt::Debug + Send + Sync + 'static,
        K::DynamicType: Eq + Hash + Clone + Send + Sync,
    {
        let writer = Writer::new(dyntype);
        let store = writer.as_reader();
        self.tasks.spawn(drive(
            api,
            config,
            writer,
            strip,
            resource,
            self.shared.clone(),
        ));
        store
    }
}

/// Runs one watcher forever, applying its events to the store and logging its state changes.
async fn drive<K>(
    api: Api<K>,
    config: watcher::Config,
    mut writer: Writer<K>,
    strip: fn(&mut K),
    resource: Resource,
    shared: Arc<Shared>,
) where
    K: kube::Resource + Clone + DeserializeOwned + fmt::Debug + Send + Sync + 'static,
    K::DynamicType: Eq + Hash + Clone + Send + Sync,
{
    let synced = &shared.synced[resource.index()];
    let mut health = Health::default();
    loop {
        let mut stream = std::pin::pin!(watcher(api.clone(), config.clone()).default_backoff());
        while let Some(item) = stream.next().await {
            let event = match item {
                Ok(event) => event.modify(strip),
                Err(err) => match health.failed(&err, resource, &shared) {
                    OnError::Continue => continue,
                    OnError::Restart => break,
                },
            };
            writer.apply_watcher_event(&event);
            match event {
                watcher::Event::Init => {
                    if synced.load(Ordering::SeqCst) && !health.relist_announced {
                        info!(resource = %resource, "re-listing");
                    }
                }
                watcher::Event::InitApply(_) => {}
                watcher::Event::InitDone => {
                    let objects = writer.as_reader().len();
                    if !synced.swap(true, Ordering::SeqCst) {
                        info!(resource = %resource, objects, "initial list complete");
                    } else {
                        info!(resource = %resource, objects, "re-list complete");
                    }
                    health.recovered(resource);
                    shared.changed.notify_one();
                }
                watcher::Event::Apply(_) | watcher::Event::Delete(_) => {
                    health.recovered(resource);
                    shared.changed.notify_one();
                }
            }
        }
        // Only a restart (or a stream that ended, which kube's never does) gets here.
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

enum OnError {
    /// The watcher recovers by itself (after kube's backoff).
    Continue,
    /// Start a new watcher, which re-lists into the same store.
    Restart,
}

/// One watcher's error streak: the first error and every different one are logged as warnings,
/// repeats of the same one at debug level (the backoff already spaces them), and the recovery
/// once.
#[derive(Default)]
struct Health {
    failures: u32,
    last: Option<String>,
    /// A 410 was logged: the re-list that follows is not news.
    relist_announced: bool,
}

impl Health {
    fn failed(&mut self, err: &watcher::Error, resource: Resource, shared: &Shared) -> OnError {
        let Some(error) = KubeError::from_watcher(err, resource) else {
            info!(resource = %resource, "resourceVersion expired (410 Gone): re-listing");
            self.relist_announced = true;
            return OnError::Continue;
        };
        // kube's watcher would retry a watch refused with HTTP 410 (rather than a 410 event)
        // from the same resourceVersion forever: re-list instead.
        if matches!(err, watcher::Error::WatchStartFailed(kube::Error::Api(s)) if s.code == 410) {
            info!(resource = %resource, "resourceVersion expired (410 Gone): re-listing");
            self.relist_announced = true;
            return OnError::Restart;
        }
        self.failures += 1;
        let mut message = error.to_string();
        if matches!(error, KubeError::NotServed { .. }) && resource.is_custom() {
            // Without its CRD no object of the kind can exist: listed, empty. The watcher keeps
            // retrying, so installing the CRD later brings the objects in.
            message.push_str("; taking it as none until it is served");
            if !shared.synced[resource.index()].swap(true, Ordering::SeqCst) {
                shared.changed.notify_one();
            }
        } else {
            message.push_str("; retrying with backoff, the current config stays in force");
        }
        if self.last.as_ref() != Some(&message) {
            warn!(resource = %resource, "{message}");
            self.last = Some(message);
        } else {
            debug!(resource = %resource, failures = self.failures, "{message}");
        }
        OnError::Continue
    }

    fn recovered(&mut self, resource: Resource) {
        if self.failures > 0 {
            info!(resource = %resource, failures = self.failures, "watching again");
        }
        *self = Health::default();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn options_are_checked_before_any_watch() {
        let ok = KubeOptions {
            node: "n1".into(),
            ..KubeOptions::default()
        };
        assert!(ok.check().is_ok());
        assert!(KubeOptions::default()
            .check()
            .unwrap_err()
            .to_string()
            .contains("NODE_NAME"));
        let zero = KubeOptions {
            excluded_ports: vec![0],
            ..ok.clone()
        };
        assert!(zero.check().is_err());
    }

    #[test]
    fn policy_resources_are_static() {
        let ar = policy_api_resource("AuthorizationPolicy");
        assert_eq!(ar.plural, "authorizationpolicies");
        assert_eq!(ar.api_version, "security.istio.io/v1");
        assert_eq!(
            policy_api_resource("PeerAuthentication").plural,
            "peerauthentications"
        );
        for r in Resource::ALL {
            assert_eq!(Resource::ALL[r.index()], r);
        }
    }

    #[tokio::test]
    async fn debounce_waits_for_quiet_but_not_forever() {
        let n = Notify::new();
        let start = Instant::now();
        debounce(&n).await;
        assert!(start.elapsed() >= DEBOUNCE_QUIET);
        assert!(start.elapsed() < DEBOUNCE_MAX);
        // A steady stream of changes: returns by DEBOUNCE_MAX (plus scheduling slack).
        let n = Arc::new(Notify::new());
        let pinger = {
            let n = n.clone();
            tokio::spawn(async move {
                loop {
                    n.notify_one();
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
            })
        };
        let start = Instant::now();
        debounce(&n).await;
        pinger.abort();
        assert!(start.elapsed() >= DEBOUNCE_MAX - Duration::from_millis(20));
        assert!(start.elapsed() < DEBOUNCE_MAX * 2);
    }
}

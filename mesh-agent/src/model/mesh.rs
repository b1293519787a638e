//! The whole mesh as one value: what a config source produces and `state` indexes.
use super::destination_rule::{merge_for_host, DestinationRule};
use super::policy::PolicyDocument;
use super::route::HttpRoute;
use super::service::Service;
use super::virtual_service::VirtualService;
use super::waypoint::Waypoint;
use super::workload::{Namespace, Workload};

/// Istio's default root namespace: its policies without a selector apply mesh-wide.
pub const DEFAULT_ROOT_NAMESPACE: &str = "istio-system";

#[derive(Debug, Clone, PartialEq)]
pub struct Mesh {
    /// Destination ports never redirected into the proxy (for example SSH).
    pub excluded_ports: Vec<u16>,
    pub namespaces: Vec<Namespace>,
    pub workloads: Vec<Workload>,
    pub services: Vec<Service>,
    /// Istio's root namespace: policies there apply mesh-wide.
    pub root_namespace: String,
    /// `PeerAuthentication` and `AuthorizationPolicy` documents.
    pub policies: Vec<PolicyDocument>,
    /// Gateways of class `istio-waypoint`.
    pub waypoints: Vec<Waypoint>,
    /// Gateway API `HTTPRoute`s (their `parentRefs` attach them to Services or waypoints).
    pub routes: Vec<HttpRoute>,
    /// Istio `VirtualService`s (`networking.istio.io/v1`; their `hosts` name Services).
    pub virtual_services: Vec<VirtualService>,
    /// Istio `DestinationRule`s (`networking.istio.io/v1`; their `host` names a Service).
    pub destination_rules: Vec<DestinationRule>,
    /// The mesh-wide default of `mesh.dev/waypoint-only` (see `waypoint_only`): off unless set.
    pub waypoint_only_default: bool,
}

impl Default for Mesh {
    fn default() -> Self {
        Mesh {
            excluded_ports: Vec::new(),
            namespaces: Vec::new(),
            workloads: Vec::new(),
            services: Vec::new(),
            root_namespace: DEFAULT_ROOT_NAMESPACE.to_string(),
            policies: Vec::new(),
            waypoints: Vec::new(),
            routes: Vec::new(),
            virtual_services: Vec::new(),
            destination_rules: Vec::new(),
            waypoint_only_default: false,
        }
    }
}

impl Mesh {
    /// A namespace by name.
    pub fn namespace(&self, name: &str) -> Option<&Namespace> {
        self.namespaces.iter().find(|ns| ns.name == name)
    }

    /// The DestinationRule in force for Service `namespace/name`: every rule whose `host` names
    /// it, merged as Istio merges them ([`merge_for_host`]: the oldest by `creationTimestamp` is
    /// the base, later ones add only subsets it lacks and a top-level policy if it has none).
    pub fn destination_rule_for(&self, service_key: &str) -> Option<DestinationRule> {
        merge_for_host(
            self.destination_rules
                .iter()
                .filter(|r| r.service().is_ok_and(|s| s.key() == service_key)),
        )
    }

    /// What is allowed but probably not meant, as `(Kind namespace/name, message)`: a
    /// DestinationRule for a Service the mesh does not have, or a subset whose labels select none
    /// of its Service's endpoints (Istio accepts both; requests to such a subset find no
    /// endpoint).
    pub fn traffic_warnings(&self) -> Vec<(String, String)> {
        let mut out = Vec::new();
        for rule in &self.destination_rules {
            let object = format!("DestinationRule {}", rule.key());
            let Ok(service) = rule.service() else {
                continue;
            };
            let Some(svc) = self.services.iter().find(|s| s.key() == service.key()) else {
                out.push((
                    object,
                    format!(
                        "host {:?} names Service {service}, which the mesh does not have",
                        rule.spec.host
                    ),
                ));
                continue;
            };
            for subset in &rule.spec.subsets {
                let selected = svc.endpoints.iter().any(|e| {
                    let key = svc.endpoint_key(e);
                    self.workloads
                        .iter()
                        .any(|w| w.key() == key && subset.selects(&w.labels))
                });
                if !selected {
                    out.push((
                        object.clone(),
                        format!(
                            "subset {:?} selects no endpoint of Service {service} (labels {:?})",
                            subset.name, subset.labels
                        ),
                    ));
                }
            }
        }
        out
    }
}

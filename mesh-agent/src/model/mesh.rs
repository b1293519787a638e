//! The whole mesh as one value: what a config source produces and `state` indexes.
use super::policy::PolicyDocument;
use super::route::HttpRoute;
use super::service::Service;
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
            waypoint_only_default: false,
        }
    }
}

impl Mesh {
    /// A namespace by name.
    pub fn namespace(&self, name: &str) -> Option<&Namespace> {
        self.namespaces.iter().find(|ns| ns.name == name)
    }
}

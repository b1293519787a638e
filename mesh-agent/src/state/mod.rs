//! The snapshot the rest of the agent reads: a [`Mesh`] indexed (workloads by IP, services by VIP,
//! endpoints resolved, policies compiled), immutable once built.
//!
//! A new snapshot replaces the old one as a whole (`tokio::sync::watch` of `Arc<State>`), so a
//! reader never sees half an update.
use std::collections::{BTreeMap, HashMap};
use std::net::IpAddr;
use std::sync::Arc;

use crate::model::{self, Mesh, Workload};
use crate::policy::{check_waypoint_only, Decision, PolicySet, Request, Warning, WaypointOnly};

mod balancing;
mod waypoint_only;
mod waypoints;
pub use waypoints::{Via, WaypointPods};

/// A service as configured, with its endpoints resolved to workloads.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Service {
    /// The service as the config source gave it (its `endpoints` are references by name).
    pub spec: model::Service,
    /// The workloads behind it.
    pub endpoints: Vec<Arc<Workload>>,
    /// Where its traffic goes first (`istio.io/use-waypoint`).
    pub via: Via,
    /// How the node agent picks an endpoint, per Service port (`balancing::per_port`).
    pub balancing: Vec<(u16, model::LoadBalancing)>,
}

impl Service {
    /// `namespace/name`.
    pub fn key(&self) -> String {
        self.spec.key()
    }

    /// The host name Istio reports as `destination_service`.
    pub fn hostname(&self) -> String {
        self.spec.hostname()
    }

    /// The endpoint port for a service port, if the service exposes it.
    pub fn target_port(&self, port: u16) -> Option<u16> {
        self.spec.target_port(port)
    }

    /// How the node agent picks an endpoint for a connection to Service port `port`.
    pub fn balancing(&self, port: u16) -> model::LoadBalancing {
        self.balancing
            .iter()
            .find(|(p, _)| *p == port)
            .map_or(self.spec.load_balancing, |(_, lb)| *lb)
    }

    /// Whether `workload` (by `namespace/name`) is one of its endpoints.
    pub fn has_endpoint(&self, workload: &Workload) -> bool {
        let (ns, name) = (&workload.namespace, &workload.name);
        self.endpoints
            .iter()
            .any(|e| &e.namespace == ns && &e.name == name)
    }
}

/// A consistent view of the mesh as seen from one node.
#[derive(Debug, Default)]
pub struct State {
    /// The node this agent serves.
    pub node: String,
    /// Every workload of the mesh, by `namespace/name`.
    pub workloads: BTreeMap<String, Arc<Workload>>,
    by_ip: HashMap<IpAddr, Arc<Workload>>,
    /// Every service, by `namespace/name`.
    pub services: BTreeMap<String, Arc<Service>>,
    by_vip: HashMap<IpAddr, Arc<Service>>,
    by_hostname: HashMap<String, Arc<Service>>,
    pub excluded_ports: Vec<u16>,
    /// Authorization and peer authentication, evaluated at the destination.
    pub policies: Arc<PolicySet>,
    /// What the policy model could not take as written, and services marked waypoint-only that
    /// guard nothing (logged on every change).
    pub policy_warnings: Vec<Warning>,
    waypoints: waypoints::Waypoints,
    /// Workloads whose own traffic (to their address, not a service's) goes through a waypoint.
    workload_via: HashMap<String, Via>,
    /// Gateway API `HTTPRoute`s, as configured; a waypoint compiles those attached to it.
    pub routes: Vec<model::route::HttpRoute>,
    /// Istio `VirtualService`s, as configured; a waypoint compiles those of its Services
    /// (`waypoint::routes`).
    pub virtual_services: Vec<model::virtual_service::VirtualService>,
    /// Istio `DestinationRule`s, as configured; [`State::destination_rule_for`] merges those of
    /// one Service.
    pub destination_rules: Vec<model::destination_rule::DestinationRule>,
    /// No bypass: the target ports of services marked `mesh.dev/waypoint-only`, per endpoint.
    waypoint_only: waypoint_only::Guards,
}

impl State {
    pub fn from_mesh(config: &Mesh, node: &str) -> State {
        let (policies, policy_warnings) = PolicySet::new(&config.policies, &config.root_namespace);
        let mut state = State {
            node: node.to_string(),
            excluded_ports: config.excluded_ports.clone(),
            policies: Arc::new(policies),
            policy_warnings,
            routes: config.routes.clone(),
            virtual_services: config.virtual_services.clone(),
            destination_rules: config.destination_rules.clone(),
            ..State::default()
        };
        for w in &config.workloads {
            let mut w = w.clone();
            // A waypoint's pods speak HBONE themselves; their traffic is never captured.
            if config.waypoints.iter().any(|wp| wp.has_pod(&w)) {
                w.enrolled = false;
            }
            let workload = Arc::new(w);
            for ip in &workload.ips {
                state.by_ip.insert(*ip, workload.clone());
            }
            state.workloads.insert(workload.key(), workload);
        }
        state.waypoints = waypoints::index(config, &state.workloads);
        for w in state.workloads.values() {
            let via = state.waypoints.via(config, &w.namespace, &w.labels, false);
            if via != Via::Direct {
                state.workload_via.insert(w.key(), via);
            }
        }
        for svc in &config.services {
            let via = state
                .waypoints
                .via(config, &svc.namespace, &svc.labels, true);
            let rule = state.destination_rule_for(&svc.key());
            // A Service whose waypoint is missing (no pod yet) still has one: no warning.
            let direct = matches!(via, Via::Direct);
            let (balancing, warnings) = balancing::per_port(svc, rule.as_ref(), direct);
            if let Some(rule) = &rule {
                state
                    .policy_warnings
                    .extend(warnings.into_iter().map(|message| Warning {
                        policy: format!("DestinationRule {}", rule.key()),
                        message,
                    }));
            }
            let service = Arc::new(Service {
                via,
                balancing,
                spec: svc.clone(),
                // The config was validated: every endpoint names a workload.
                endpoints: svc
                    .endpoints
                    .iter()
                    .filter_map(|e| state.workloads.get(&svc.endpoint_key(e)).cloned())
                    .collect(),
            });
            for vip in &svc.vips {
                state.by_vip.insert(*vip, service.clone());
            }
            state
                .by_hostname
                .insert(service.hostname(), service.clone());
            state.services.insert(service.key(), service);
        }
        let (guards, warnings) = waypoint_only::Guards::index(config, &state.services);
        state.waypoint_only = guards;
        state.policy_warnings.extend(warnings);
        state
            .policy_warnings
            .extend(
                config
                    .traffic_warnings()
                    .into_iter()
                    .map(|(object, message)| Warning {
                        policy: object,
                        message,
                    }),
            );
        state
    }

    /// The DestinationRule in force for Service `namespace/name`: those of the Service's own
    /// namespace (a rule elsewhere must not set another team's policy), several merged as Istio
    /// does (`model::destination_rule::merge_for_host`).
    pub fn destination_rule_for(
        &self,
        service_key: &str,
    ) -> Option<model::destination_rule::DestinationRule> {
        let namespace = service_key.split_once('/').map_or("", |(ns, _)| ns);
        model::destination_rule::merge_for_host(self.destination_rules.iter().filter(|r| {
            r.metadata.namespace == namespace && r.service().is_ok_and(|s| s.key() == service_key)
        }))
    }

    /// The no-bypass guards of `workload`'s port `port` (a target port of services marked
    /// `mesh.dev/waypoint-only`); empty when the port is not guarded.
    pub fn waypoint_only(&self, workload: &Workload, port: u16) -> &[Arc<WaypointOnly>] {
        self.waypoint_only.on(&workload.key(), port)
    }

    /// The destination agent's decision for an inbound connection: no bypass first (a guarded
    /// port admits only its services' waypoints), then the AuthorizationPolicies.
    pub fn decide_inbound(&self, req: &Request) -> Decision {
        let guards = self.waypoint_only(req.dst, req.dst_port);
        if let Some(denied) = check_waypoint_only(guards, req.src) {
            return denied;
        }
        self.policies.evaluate(req)
    }

    /// The service that owns the virtual IP `ip`.
    pub fn service_by_vip(&self, ip: IpAddr) -> Option<&Arc<Service>> {
        self.by_vip.get(&ip.to_canonical())
    }

    /// The service whose host name (`name.namespace.svc.cluster.local`) is `hostname`, in any
    /// case.
    pub fn service_by_hostname(&self, hostname: &str) -> Option<&Arc<Service>> {
        match self.by_hostname.get(hostname) {
            Some(service) => Some(service),
            None => self.by_hostname.get(&hostname.to_ascii_lowercase()),
        }
    }

    /// Workloads this agent must wire: enrolled and scheduled on this node.
    pub fn local_enrolled(&self) -> impl Iterator<Item = &Arc<Workload>> {
        self.workloads
            .values()
            .filter(|w| w.enrolled && w.node == self.node)
    }

    /// Where traffic addressed to the workload itself goes first.
    pub fn workload_via(&self, w: &Workload) -> &Via {
        self.workload_via.get(&w.key()).unwrap_or(&Via::Direct)
    }

    /// Every waypoint with its pods.
    pub fn waypoints(&self) -> impl Iterator<Item = &Arc<WaypointPods>> {
        self.waypoints.all()
    }

    /// The workload that owns `ip`, also for IPv4-mapped IPv6 addresses.
    pub fn workload_by_ip(&self, ip: IpAddr) -> Option<&Arc<Workload>> {
        self.by_ip.get(&ip.to_canonical())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    #[test]
    fn local_enrolled_filters_by_node_and_label_and_ip_lookup_is_canonical() {
        let config = crate::config::parse(
            Path::new("t.yaml"),
            r#"
namespaces: [{ name: default, labels: { istio.io/dataplane-mode: ambient } }]
workloads:
  - { name: a, node: n1, ips: [10.0.0.1], netns: /run/netns/a }
  - { name: b, node: n2, ips: [10.0.0.2], netns: /run/netns/b }
  - { name: c, node: n1, ips: [10.0.0.3], netns: /run/netns/c, labels: { istio.io/dataplane-mode: none } }
"#,
        )
        .unwrap();
        let state = State::from_mesh(&config, "n1");
        let local: Vec<_> = state.local_enrolled().map(|w| w.key()).collect();
        assert_eq!(local, ["default/a"]);
        let mapped: IpAddr = "::ffff:10.0.0.2".parse().unwrap();
        assert_eq!(state.workload_by_ip(mapped).unwrap().name, "b");
        assert!(state.workload_by_ip("10.9.9.9".parse().unwrap()).is_none());
    }

    #[test]
    fn services_and_workloads_resolve_their_waypoint_by_istio_labels() {
        let config = crate::config::parse(
            Path::new("t.yaml"),
            r#"
namespaces:
  - { name: default, labels: { istio.io/dataplane-mode: ambient, istio.io/use-waypoint: wp } }
  - { name: other, labels: { istio.io/dataplane-mode: ambient } }
workloads:
  - { name: a, node: n1, ips: [10.0.0.1] }
  - { name: b, node: n1, ips: [10.0.0.2], labels: { istio.io/use-waypoint: none } }
  - { name: wp-1, node: n1, ips: [10.0.0.9], serviceAccount: wp, labels: { gateway.networking.k8s.io/gateway-name: wp } }
  - { name: fake, node: n1, ips: [10.0.0.10], labels: { gateway.networking.k8s.io/gateway-name: wp } }
  - { name: c, namespace: other, node: n1, ips: [10.0.1.1], labels: { istio.io/use-waypoint: all, istio.io/use-waypoint-namespace: default } }
  - { name: d, namespace: other, node: n1, ips: [10.0.1.2], labels: { istio.io/use-waypoint: gone } }
services:
  - { name: web, vips: [10.96.0.1], ports: [{ port: 80 }], endpoints: [a] }
  - { name: direct, vips: [10.96.0.2], ports: [{ port: 80 }], labels: { istio.io/use-waypoint: none } }
  - { name: o, namespace: other, vips: [10.96.0.3], ports: [{ port: 80 }] }
  - { name: lost, namespace: other, vips: [10.96.0.4], ports: [{ port: 80 }], labels: { istio.io/use-waypoint: gone } }
gateways:
  - apiVersion: gateway.networking.k8s.io/v1
    kind: Gateway
    metadata: { name: wp, namespace: default }
    spec: { gatewayClassName: istio-waypoint }
  - apiVersion: gateway.networking.k8s.io/v1
    kind: Gateway
    metadata: { name: all, namespace: default, labels: { istio.io/waypoint-for: all } }
    spec: { gatewayClassName: istio-waypoint }
"#,
        )
        .unwrap();
        let state = State::from_mesh(&config, "n1");
        let via = |vip: &str| {
            let svc = state.service_by_vip(vip.parse().unwrap()).unwrap();
            match &svc.via {
                Via::Direct => "direct".to_string(),
                Via::Waypoint(w) => format!("through {}", w.waypoint.key()),
                Via::Missing { waypoint, why } => format!("{waypoint} {why}"),
            }
        };
        assert_eq!(
            via("10.96.0.1"),
            "through default/wp",
            "the namespace's label"
        );
        assert_eq!(via("10.96.0.2"), "direct", "none on the service wins");
        assert_eq!(via("10.96.0.3"), "direct", "no label anywhere");
        assert_eq!(
            via("10.96.0.4"),
            "other/gone does not exist",
            "fails, never skips"
        );
        let wl = |key: &str| state.workload_via(&state.workloads[key]).clone();
        // `wp` takes service traffic only: a's own address is reached directly.
        assert_eq!(wl("default/a"), Via::Direct);
        assert_eq!(wl("default/b"), Via::Direct);
        // `all` in default, named from another namespace, has no pod: fails closed.
        let missing = |waypoint: &str, why| Via::Missing {
            waypoint: waypoint.into(),
            why,
        };
        assert_eq!(wl("other/c"), missing("default/all", "has no pod"));
        assert_eq!(wl("other/d"), missing("other/gone", "does not exist"));
        // The waypoint's own pod is never captured, and it is the waypoint's pod.
        let pod = &state.workloads["default/wp-1"];
        assert!(!pod.enrolled);
        let wp: Vec<_> = state.waypoints().map(|w| w.waypoint.key()).collect();
        assert_eq!(
            wp,
            ["default/all", "default/wp"],
            "both waypoints, in key order"
        );
        let Via::Waypoint(w) = &state
            .service_by_vip("10.96.0.1".parse().unwrap())
            .unwrap()
            .via
        else {
            unreachable!()
        };
        assert!(w.serves_from(pod));
        assert_eq!(
            w.pods.len(),
            1,
            "a pod with the label but not the account is not one"
        );
        assert!(state.workloads["default/fake"].enrolled);
    }
}

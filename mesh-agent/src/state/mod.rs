//! The snapshot the rest of the agent reads: a [`Mesh`] indexed (workloads by IP, services by VIP,
//! endpoints resolved, policies compiled), immutable once built.
//!
//! A new snapshot replaces the old one as a whole (`tokio::sync::watch` of `Arc<State>`), so a
//! reader never sees half an update.
use std::collections::{BTreeMap, HashMap};
use std::net::IpAddr;
use std::sync::Arc;

use crate::model::{self, Mesh, Workload};
use crate::policy::{PolicySet, Warning};

/// A service as configured, with its endpoints resolved to workloads.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Service {
    /// The service as the config source gave it (its `endpoints` are references by name).
    pub spec: model::Service,
    /// The workloads behind it.
    pub endpoints: Vec<Arc<Workload>>,
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
    pub excluded_ports: Vec<u16>,
    /// Authorization and peer authentication, evaluated at the destination.
    pub policies: Arc<PolicySet>,
    /// What the policy model could not take as written (logged on every change).
    pub policy_warnings: Vec<Warning>,
}

impl State {
    pub fn from_mesh(config: &Mesh, node: &str) -> State {
        let (policies, policy_warnings) = PolicySet::new(&config.policies, &config.root_namespace);
        let mut state = State {
            node: node.to_string(),
            excluded_ports: config.excluded_ports.clone(),
            policies: Arc::new(policies),
            policy_warnings,
            ..State::default()
        };
        for w in &config.workloads {
            let workload = Arc::new(w.clone());
            for ip in &w.ips {
                state.by_ip.insert(*ip, workload.clone());
            }
            state.workloads.insert(workload.key(), workload);
        }
        for svc in &config.services {
            let service = Arc::new(Service {
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
            state.services.insert(service.key(), service);
        }
        state
    }

    /// The service that owns the virtual IP `ip`.
    pub fn service_by_vip(&self, ip: IpAddr) -> Option<&Arc<Service>> {
        self.by_vip.get(&ip.to_canonical())
    }

    /// Workloads this agent must wire: enrolled and scheduled on this node.
    pub fn local_enrolled(&self) -> impl Iterator<Item = &Arc<Workload>> {
        self.workloads
            .values()
            .filter(|w| w.enrolled && w.node == self.node)
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
}

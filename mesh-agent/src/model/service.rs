//! Services: virtual IPs resolved by the proxy to one of their endpoint workloads.
use std::net::IpAddr;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Service {
    pub name: String,
    pub namespace: String,
    /// Virtual IPs (at most one per family), never a workload's own address.
    pub vips: Vec<IpAddr>,
    pub ports: Vec<ServicePort>,
    /// How a connection picks an endpoint.
    pub load_balancing: LoadBalancing,
    /// Workloads behind the service: `name` (same namespace) or `namespace/name`.
    pub endpoints: Vec<String>,
}

impl Service {
    /// `namespace/name`.
    pub fn key(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }

    /// The host name Istio reports as `destination_service`.
    pub fn hostname(&self) -> String {
        format!("{}.{}.svc.cluster.local", self.name, self.namespace)
    }

    /// The endpoint port for a service port, if the service exposes it.
    pub fn target_port(&self, port: u16) -> Option<u16> {
        self.ports
            .iter()
            .find(|p| p.port == port)
            .map(|p| p.target_port.unwrap_or(p.port))
    }

    /// The `namespace/name` key of an endpoint reference.
    pub fn endpoint_key(&self, endpoint: &str) -> String {
        if endpoint.contains('/') {
            endpoint.to_string()
        } else {
            format!("{}/{}", self.namespace, endpoint)
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ServicePort {
    pub port: u16,
    /// The endpoint port; `None`: the same as `port`.
    pub target_port: Option<u16>,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum LoadBalancing {
    #[default]
    RoundRobin,
    Random,
    LeastConnections,
}

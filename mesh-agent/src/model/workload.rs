//! Workloads (pods) and the namespaces that hold them.
use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::path::PathBuf;

/// The label that enrolls a namespace or workload into the mesh (`ambient`) or opts it out (`none`).
pub const DATAPLANE_MODE_LABEL: &str = "istio.io/dataplane-mode";

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Namespace {
    pub name: String,
    pub labels: BTreeMap<String, String>,
}

/// One workload (pod).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Workload {
    pub name: String,
    pub namespace: String,
    pub service_account: String,
    /// The node it runs on; an agent only wires its own node's workloads.
    pub node: String,
    /// At most one IPv4 and one IPv6 address.
    pub ips: Vec<IpAddr>,
    /// Its network namespace; `None`: found by the workload's IP when it is wired.
    pub netns: Option<PathBuf>,
    pub labels: BTreeMap<String, String>,
    /// Captured by the mesh: [`is_enrolled`] of its labels and its namespace's.
    pub enrolled: bool,
}

impl Workload {
    /// `namespace/name`, the key operators use.
    pub fn key(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }

    pub fn ip4(&self) -> Option<Ipv4Addr> {
        self.ips.iter().find_map(|ip| match ip {
            IpAddr::V4(v4) => Some(*v4),
            IpAddr::V6(_) => None,
        })
    }

    pub fn ip6(&self) -> Option<Ipv6Addr> {
        self.ips.iter().find_map(|ip| match ip {
            IpAddr::V6(v6) => Some(*v6),
            IpAddr::V4(_) => None,
        })
    }

    /// Its address of one family: IPv4 when `v4`, else IPv6.
    pub fn address(&self, v4: bool) -> Option<IpAddr> {
        if v4 {
            self.ip4().map(IpAddr::V4)
        } else {
            self.ip6().map(IpAddr::V6)
        }
    }
}

/// Whether a workload is enrolled: its own `istio.io/dataplane-mode` label wins (`none` opts
/// out, `ambient` opts in); otherwise its namespace's label decides.
pub fn is_enrolled(
    workload_labels: &BTreeMap<String, String>,
    namespace_labels: Option<&BTreeMap<String, String>>,
) -> bool {
    match workload_labels
        .get(DATAPLANE_MODE_LABEL)
        .map(String::as_str)
    {
        Some("none") => false,
        Some("ambient") => true,
        _ => namespace_labels
            .and_then(|labels| labels.get(DATAPLANE_MODE_LABEL))
            .is_some_and(|mode| mode == "ambient"),
    }
}

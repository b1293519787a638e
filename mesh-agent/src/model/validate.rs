//! What makes a [`Mesh`] consistent. Errors name the field by its path as users write it
//! (`workloads[1].ips[0]`); each source turns the path into a position it knows (a line of the
//! YAML file, a Kubernetes object).
use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt;
use std::net::IpAddr;

use super::mesh::Mesh;
use super::waypoint_only::check_waypoint_only;
use super::workload::DATAPLANE_MODE_LABEL;

/// Why a [`Mesh`] is not consistent, and where.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FieldError {
    /// Path of the offending field: `workloads[1].ips[0]`, `services[0].name`, `excludedPorts`.
    pub field: String,
    pub message: String,
}

impl fmt::Display for FieldError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "field `{}`: {}", self.field, self.message)
    }
}

impl std::error::Error for FieldError {}

fn invalid(field: impl Into<String>, message: impl Into<String>) -> FieldError {
    FieldError {
        field: field.into(),
        message: message.into(),
    }
}

/// A DNS label (RFC 1123): what workload, namespace and service account names must be.
pub fn is_dns_label(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 63
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !name.starts_with('-')
        && !name.ends_with('-')
}

/// A lower-case DNS subdomain (RFC 1123) of at most 253 characters: what Kubernetes object
/// names (Deployments, Services, ...) and route host names must be.
pub fn is_dns_subdomain(name: &str) -> bool {
    name.len() <= 253 && name.split('.').all(is_subdomain_label)
}

/// One label of a DNS subdomain: `[a-z0-9]([-a-z0-9]*[a-z0-9])?` (no length of its own).
fn is_subdomain_label(label: &str) -> bool {
    !label.is_empty()
        && label
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !label.starts_with('-')
        && !label.ends_with('-')
}

fn check_dns_label(name: &str) -> Result<(), String> {
    if is_dns_label(name) {
        Ok(())
    } else {
        Err(format!(
            "{name:?} is not a valid name (lower-case letters, digits and '-', at most 63 characters)"
        ))
    }
}

fn check_mode_label(labels: &BTreeMap<String, String>) -> Result<(), String> {
    match labels.get(DATAPLANE_MODE_LABEL).map(String::as_str) {
        None | Some("ambient") | Some("none") => Ok(()),
        Some(other) => Err(format!(
            "{DATAPLANE_MODE_LABEL}={other:?} is not supported (use \"ambient\" or \"none\")"
        )),
    }
}

impl Mesh {
    /// Checks names, addresses, references and uniqueness; the first problem found is returned.
    pub fn validate(&self) -> Result<(), FieldError> {
        if self.excluded_ports.len() > mesh_common::MAX_EXCLUDED_PORTS {
            return Err(invalid(
                "excludedPorts",
                format!("at most {} ports", mesh_common::MAX_EXCLUDED_PORTS),
            ));
        }
        if self.excluded_ports.contains(&0) {
            return Err(invalid("excludedPorts", "port 0 is not a port"));
        }
        let mut ns_seen = HashMap::new();
        for (i, ns) in self.namespaces.iter().enumerate() {
            let field = format!("namespaces[{i}].name");
            check_dns_label(&ns.name).map_err(|m| invalid(&field, m))?;
            check_mode_label(&ns.labels)
                .and_then(|()| check_waypoint_only(&ns.labels))
                .map_err(|m| invalid(format!("namespaces[{i}].labels"), m))?;
            if ns_seen.insert(ns.name.as_str(), i).is_some() {
                return Err(invalid(
                    field,
                    format!("namespace {:?} is listed twice", ns.name),
                ));
            }
        }
        let mut keys = HashMap::new();
        let mut ips = HashMap::new();
        for (i, w) in self.workloads.iter().enumerate() {
            let at = |field: &str| format!("workloads[{i}].{field}");
            check_dns_label(&w.name).map_err(|m| invalid(at("name"), m))?;
            check_dns_label(&w.namespace).map_err(|m| invalid(at("namespace"), m))?;
            check_dns_label(&w.service_account).map_err(|m| invalid(at("serviceAccount"), m))?;
            if w.node.is_empty() {
                return Err(invalid(at("node"), "must not be empty"));
            }
            if let Some(netns) = w.netns.as_ref().filter(|p| !p.is_absolute()) {
                return Err(invalid(
                    at("netns"),
                    format!("{:?} is not an absolute path", netns.display().to_string()),
                ));
            }
            check_mode_label(&w.labels).map_err(|m| invalid(at("labels"), m))?;
            if w.ips.is_empty() {
                return Err(invalid(at("ips"), "a workload needs at least one IP"));
            }
            let v4 = w.ips.iter().filter(|ip| ip.is_ipv4()).count();
            if v4 > 1 || w.ips.len() - v4 > 1 {
                return Err(invalid(
                    at("ips"),
                    "at most one IPv4 and one IPv6 address per workload",
                ));
            }
            if let Some(first) = keys.insert(w.key(), i) {
                return Err(invalid(
                    at("name"),
                    format!(
                        "workload {} is already defined as workloads[{first}]",
                        w.key()
                    ),
                ));
            }
            for (n, ip) in w.ips.iter().enumerate() {
                if let Some(other) = ips.insert(*ip, i) {
                    return Err(invalid(
                        at(&format!("ips[{n}]")),
                        format!("IP {ip} is already used by {}", self.workloads[other].key()),
                    ));
                }
            }
        }
        self.validate_services(&ips, &keys)
    }

    fn validate_services(
        &self,
        workload_ips: &HashMap<IpAddr, usize>,
        workload_keys: &HashMap<String, usize>,
    ) -> Result<(), FieldError> {
        let mut keys = HashMap::new();
        let mut vips: HashMap<IpAddr, String> = HashMap::new();
        for (i, svc) in self.services.iter().enumerate() {
            let at = |field: &str| format!("services[{i}].{field}");
            check_dns_label(&svc.name).map_err(|m| invalid(at("name"), m))?;
            check_dns_label(&svc.namespace).map_err(|m| invalid(at("namespace"), m))?;
            check_waypoint_only(&svc.labels).map_err(|m| invalid(at("labels"), m))?;
            if let Some(first) = keys.insert(svc.key(), i) {
                return Err(invalid(
                    at("name"),
                    format!(
                        "service {} is already defined as services[{first}]",
                        svc.key()
                    ),
                ));
            }
            let v4 = svc.vips.iter().filter(|ip| ip.is_ipv4()).count();
            if svc.vips.is_empty() || v4 > 1 || svc.vips.len() - v4 > 1 {
                return Err(invalid(
                    at("vips"),
                    "a service needs one or two VIPs (at most one IPv4 and one IPv6)",
                ));
            }
            for (n, vip) in svc.vips.iter().enumerate() {
                if let Some(w) = workload_ips.get(vip) {
                    return Err(invalid(
                        at(&format!("vips[{n}]")),
                        format!(
                            "VIP {vip} is the address of workload {}",
                            self.workloads[*w].key()
                        ),
                    ));
                }
                if let Some(other) = vips.insert(*vip, svc.key()) {
                    return Err(invalid(
                        at(&format!("vips[{n}]")),
                        format!("VIP {vip} is already used by service {other}"),
                    ));
                }
            }
            if svc.ports.is_empty() {
                return Err(invalid(at("ports"), "a service needs at least one port"));
            }
            let mut seen = HashSet::new();
            for (p, port) in svc.ports.iter().enumerate() {
                if port.port == 0 || port.target_port == Some(0) {
                    return Err(invalid(at(&format!("ports[{p}]")), "port 0 is not a port"));
                }
                if !seen.insert(port.port) {
                    return Err(invalid(
                        at(&format!("ports[{p}]")),
                        format!("port {} is listed twice", port.port),
                    ));
                }
            }
            for (e, endpoint) in svc.endpoints.iter().enumerate() {
                let key = svc.endpoint_key(endpoint);
                if !workload_keys.contains_key(&key) {
                    return Err(invalid(
                        at(&format!("endpoints[{e}]")),
                        format!("endpoint {key} is not a workload of this config"),
                    ));
                }
            }
        }
        let mut waypoints = HashMap::new();
        for (i, wp) in self.waypoints.iter().enumerate() {
            let at = |field: &str| format!("gateways[{i}].metadata.{field}");
            check_dns_label(&wp.name).map_err(|m| invalid(at("name"), m))?;
            check_dns_label(&wp.namespace).map_err(|m| invalid(at("namespace"), m))?;
            if let Some(first) = waypoints.insert(wp.key(), i) {
                return Err(invalid(
                    at("name"),
                    format!(
                        "waypoint {} is already defined as gateways[{first}]",
                        wp.key()
                    ),
                ));
            }
        }
        let mut routes = HashMap::new();
        for (i, route) in self.routes.iter().enumerate() {
            route.validate().map_err(|e| FieldError {
                field: format!("routes[{i}].{}", e.field),
                message: e.message,
            })?;
            if let Some(first) = routes.insert(route.key(), i) {
                return Err(invalid(
                    format!("routes[{i}].metadata.name"),
                    format!(
                        "HTTPRoute {} is already defined as routes[{first}]",
                        route.key()
                    ),
                ));
            }
        }
        let mut seen = HashMap::new();
        for (i, vs) in self.virtual_services.iter().enumerate() {
            vs.validate().map_err(|e| FieldError {
                field: format!("virtualServices[{i}].{}", e.field),
                message: e.message,
            })?;
            if let Some(first) = seen.insert(vs.key(), i) {
                return Err(invalid(
                    format!("virtualServices[{i}].metadata.name"),
                    format!(
                        "VirtualService {} is already defined as virtualServices[{first}]",
                        vs.key()
                    ),
                ));
            }
        }
        let mut seen = HashMap::new();
        for (i, rule) in self.destination_rules.iter().enumerate() {
            rule.validate().map_err(|e| FieldError {
                field: format!("destinationRules[{i}].{}", e.field),
                message: e.message,
            })?;
            if let Some(first) = seen.insert(rule.key(), i) {
                return Err(invalid(
                    format!("destinationRules[{i}].metadata.name"),
                    format!(
                        "DestinationRule {} is already defined as destinationRules[{first}]",
                        rule.key()
                    ),
                ));
            }
        }
        Ok(())
    }
}

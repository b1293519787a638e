//! Sources of truth. File mode: one YAML file listing namespaces and workloads, watched for edits.
//!
//! Parsing is strict: unknown fields, wrong types and inconsistent entries are errors that name the
//! file, the line and the field. A rejected edit never replaces the last good configuration.
pub mod kubernetes;
mod watch;

pub use watch::watch_file;

use std::collections::{BTreeMap, HashMap};
use std::net::IpAddr;
use std::path::{Path, PathBuf};

use serde::Deserialize;

/// The label that enrolls a namespace or workload into the mesh (`ambient`) or opts it out (`none`).
pub const DATAPLANE_MODE_LABEL: &str = "istio.io/dataplane-mode";

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {error}")]
    Read {
        path: PathBuf,
        error: std::io::Error,
    },
    /// A YAML or type error; serde's message already names the field path and the position.
    #[error("config file {path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("config file {path}, line {line}: field `{field}`: {message}")]
    Invalid {
        path: PathBuf,
        line: usize,
        field: String,
        message: String,
    },
}

/// The file as written by the user.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Config {
    /// Destination ports never redirected into the proxy (for example SSH).
    #[serde(default)]
    pub excluded_ports: Vec<u16>,
    #[serde(default)]
    pub namespaces: Vec<Namespace>,
    #[serde(default)]
    pub workloads: Vec<Workload>,
    #[serde(default)]
    pub services: Vec<Service>,
    /// Istio's root namespace: policies there apply mesh-wide.
    #[serde(default = "default_root_namespace")]
    pub root_namespace: String,
    /// `PeerAuthentication` and `AuthorizationPolicy` documents, as `kubectl apply` takes them.
    #[serde(default)]
    pub policies: Vec<crate::policy::PolicyDocument>,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            excluded_ports: Vec::new(),
            namespaces: Vec::new(),
            workloads: Vec::new(),
            services: Vec::new(),
            root_namespace: default_root_namespace(),
            policies: Vec::new(),
        }
    }
}

fn default_root_namespace() -> String {
    crate::policy::DEFAULT_ROOT_NAMESPACE.to_string()
}

/// A service: virtual IPs resolved by the proxy to one of its endpoint workloads.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Service {
    pub name: String,
    #[serde(default = "default_namespace")]
    pub namespace: String,
    /// Virtual IPs (at most one per family), never a workload's own address.
    pub vips: Vec<IpAddr>,
    pub ports: Vec<ServicePort>,
    /// How a connection picks an endpoint.
    #[serde(default)]
    pub load_balancing: LoadBalancing,
    /// Workloads behind the service: `name` (same namespace) or `namespace/name`.
    #[serde(default)]
    pub endpoints: Vec<String>,
}

#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct ServicePort {
    pub port: u16,
    /// The endpoint port; defaults to `port`.
    #[serde(default)]
    pub target_port: Option<u16>,
}

#[derive(Debug, Clone, Copy, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub enum LoadBalancing {
    #[default]
    RoundRobin,
    Random,
    LeastConnections,
}

impl Service {
    /// `namespace/name`.
    pub fn key(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
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

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Namespace {
    pub name: String,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Workload {
    pub name: String,
    #[serde(default = "default_namespace")]
    pub namespace: String,
    #[serde(default = "default_service_account")]
    pub service_account: String,
    /// Name of the node this workload runs on; an agent only wires its own node's workloads.
    pub node: String,
    /// At most one IPv4 and one IPv6 address.
    pub ips: Vec<IpAddr>,
    /// Path of the pod's network namespace, for example `/var/run/netns/<name>`. When omitted the
    /// agent finds the namespace whose interface holds the workload's IP (as in Kubernetes mode).
    #[serde(default)]
    pub netns: Option<PathBuf>,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
}

fn default_namespace() -> String {
    "default".to_string()
}

fn default_service_account() -> String {
    "default".to_string()
}

impl Workload {
    /// `namespace/name`, the key operators use.
    pub fn key(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }
}

impl Config {
    /// Reads and validates a config file.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            error: source,
        })?;
        Config::parse(path, &text)
    }

    /// Parses and validates config text; `path` is only used in messages.
    pub fn parse(path: &Path, text: &str) -> Result<Config, ConfigError> {
        let config: Config = if text.trim().is_empty() {
            Config::default()
        } else {
            serde_yaml_ng::from_str(text).map_err(|e| ConfigError::Parse {
                path: path.to_path_buf(),
                message: e.to_string(),
            })?
        };
        config.validate(path, text)?;
        Ok(config)
    }

    /// Validates a config assembled by a program rather than read from a file (Kubernetes mode).
    /// Errors name `source` and the field; their line number means nothing.
    pub fn validate_built(&self, source: &Path) -> Result<(), ConfigError> {
        self.validate(source, "")
    }

    /// Whether the workload is enrolled: its own `istio.io/dataplane-mode` label wins (`none` opts
    /// out, `ambient` opts in); otherwise its namespace's label decides.
    pub fn is_enrolled(&self, workload: &Workload) -> bool {
        match workload
            .labels
            .get(DATAPLANE_MODE_LABEL)
            .map(String::as_str)
        {
            Some("none") => false,
            Some("ambient") => true,
            _ => self
                .namespaces
                .iter()
                .find(|ns| ns.name == workload.namespace)
                .and_then(|ns| ns.labels.get(DATAPLANE_MODE_LABEL))
                .is_some_and(|mode| mode == "ambient"),
        }
    }

    fn validate(&self, path: &Path, text: &str) -> Result<(), ConfigError> {
        // Errors point at the `nth` line holding `needle` within the list the field belongs to.
        let invalid = |needle: &str, nth: usize, field: String, message: String| {
            let section = match field.split(['[', '.']).next() {
                Some("workloads") => "workloads:",
                Some("namespaces") => "namespaces:",
                Some("services") => "services:",
                _ => "",
            };
            ConfigError::Invalid {
                path: path.to_path_buf(),
                line: line_of(text, section, needle, nth),
                field,
                message,
            }
        };
        if self.excluded_ports.len() > mesh_common::MAX_EXCLUDED_PORTS {
            return Err(invalid(
                "excludedPorts",
                0,
                "excludedPorts".into(),
                format!("at most {} ports", mesh_common::MAX_EXCLUDED_PORTS),
            ));
        }
        if self.excluded_ports.contains(&0) {
            return Err(invalid(
                "excludedPorts",
                0,
                "excludedPorts".into(),
                "port 0 is not a port".into(),
            ));
        }
        let mut ns_seen = HashMap::new();
        for (i, ns) in self.namespaces.iter().enumerate() {
            let field = format!("namespaces[{i}].name");
            check_dns_label(&ns.name)
                .map_err(|m| invalid(&format!("name: {}", ns.name), 0, field.clone(), m))?;
            check_mode_label(&ns.labels).map_err(|m| {
                invalid(
                    DATAPLANE_MODE_LABEL,
                    0,
                    format!("namespaces[{i}].labels"),
                    m,
                )
            })?;
            if ns_seen.insert(ns.name.as_str(), i).is_some() {
                return Err(invalid(
                    &ns.name,
                    1,
                    field,
                    format!("namespace {:?} is listed twice", ns.name),
                ));
            }
        }
        let mut keys = HashMap::new();
        let mut ips = HashMap::new();
        for (i, w) in self.workloads.iter().enumerate() {
            let at = |field: &str| format!("workloads[{i}].{field}");
            check_dns_label(&w.name)
                .map_err(|m| invalid(&format!("name: {}", w.name), 0, at("name"), m))?;
            check_dns_label(&w.namespace)
                .map_err(|m| invalid(&w.namespace, 0, at("namespace"), m))?;
            check_dns_label(&w.service_account)
                .map_err(|m| invalid(&w.service_account, 0, at("serviceAccount"), m))?;
            if w.node.is_empty() {
                return Err(invalid("node:", i, at("node"), "must not be empty".into()));
            }
            if let Some(netns) = w.netns.as_ref().filter(|p| !p.is_absolute()) {
                let shown = netns.display().to_string();
                return Err(invalid(
                    &shown,
                    0,
                    at("netns"),
                    format!("{shown:?} is not an absolute path"),
                ));
            }
            check_mode_label(&w.labels)
                .map_err(|m| invalid(DATAPLANE_MODE_LABEL, 0, at("labels"), m))?;
            if w.ips.is_empty() {
                return Err(invalid(
                    &w.name,
                    0,
                    at("ips"),
                    "a workload needs at least one IP".into(),
                ));
            }
            let v4 = w.ips.iter().filter(|ip| ip.is_ipv4()).count();
            if v4 > 1 || w.ips.len() - v4 > 1 {
                return Err(invalid(
                    &w.name,
                    0,
                    at("ips"),
                    "at most one IPv4 and one IPv6 address per workload".into(),
                ));
            }
            if let Some(first) = keys.insert(w.key(), i) {
                return Err(invalid(
                    &format!("name: {}", w.name),
                    occurrences_before(&self.workloads, i, |o| o.name == w.name),
                    at("name"),
                    format!(
                        "workload {} is already defined as workloads[{first}]",
                        w.key()
                    ),
                ));
            }
            for ip in &w.ips {
                if let Some(other) = ips.insert(*ip, i) {
                    let ip_text = ip.to_string();
                    return Err(invalid(
                        &ip_text,
                        occurrences_before(&self.workloads, i, |o| o.ips.contains(ip)),
                        at("ips"),
                        format!("IP {ip} is already used by {}", self.workloads[other].key()),
                    ));
                }
            }
        }
        self.validate_services(&ips, &keys, &invalid)
    }

    fn validate_services(
        &self,
        workload_ips: &HashMap<IpAddr, usize>,
        workload_keys: &HashMap<String, usize>,
        invalid: &dyn Fn(&str, usize, String, String) -> ConfigError,
    ) -> Result<(), ConfigError> {
        let mut keys = HashMap::new();
        let mut vips: HashMap<IpAddr, String> = HashMap::new();
        for (i, svc) in self.services.iter().enumerate() {
            let at = |field: &str| format!("services[{i}].{field}");
            let name_line = format!("name: {}", svc.name);
            check_dns_label(&svc.name).map_err(|m| invalid(&name_line, 0, at("name"), m))?;
            check_dns_label(&svc.namespace)
                .map_err(|m| invalid(&svc.namespace, 0, at("namespace"), m))?;
            if let Some(first) = keys.insert(svc.key(), i) {
                let nth = self.services[..i]
                    .iter()
                    .filter(|o| o.name == svc.name)
                    .count();
                let message = format!(
                    "service {} is already defined as services[{first}]",
                    svc.key()
                );
                return Err(invalid(&name_line, nth, at("name"), message));
            }
            let v4 = svc.vips.iter().filter(|ip| ip.is_ipv4()).count();
            if svc.vips.is_empty() || v4 > 1 || svc.vips.len() - v4 > 1 {
                let message =
                    "a service needs one or two VIPs (at most one IPv4 and one IPv6)".to_string();
                return Err(invalid(&name_line, 0, at("vips"), message));
            }
            for vip in &svc.vips {
                let shown = vip.to_string();
                if let Some(w) = workload_ips.get(vip) {
                    let message = format!(
                        "VIP {vip} is the address of workload {}",
                        self.workloads[*w].key()
                    );
                    return Err(invalid(&shown, 0, at("vips"), message));
                }
                if let Some(other) = vips.insert(*vip, svc.key()) {
                    return Err(invalid(
                        &shown,
                        1,
                        at("vips"),
                        format!("VIP {vip} is already used by service {other}"),
                    ));
                }
            }
            if svc.ports.is_empty() {
                return Err(invalid(
                    &name_line,
                    0,
                    at("ports"),
                    "a service needs at least one port".into(),
                ));
            }
            let mut seen = std::collections::HashSet::new();
            for (p, port) in svc.ports.iter().enumerate() {
                let line = format!("port: {}", port.port);
                if port.port == 0 || port.target_port == Some(0) {
                    return Err(invalid(
                        &line,
                        0,
                        at(&format!("ports[{p}]")),
                        "port 0 is not a port".into(),
                    ));
                }
                if !seen.insert(port.port) {
                    return Err(invalid(
                        &line,
                        1,
                        at(&format!("ports[{p}]")),
                        format!("port {} is listed twice", port.port),
                    ));
                }
            }
            for (e, endpoint) in svc.endpoints.iter().enumerate() {
                let key = svc.endpoint_key(endpoint);
                if !workload_keys.contains_key(&key) {
                    let message = format!("endpoint {key} is not a workload of this config");
                    return Err(invalid(
                        endpoint,
                        0,
                        at(&format!("endpoints[{e}]")),
                        message,
                    ));
                }
            }
        }
        Ok(())
    }
}

fn occurrences_before(workloads: &[Workload], i: usize, pred: impl Fn(&Workload) -> bool) -> usize {
    workloads[..i].iter().filter(|w| pred(w)).count()
}

/// 1-based line of the `nth` (0-based) line containing `needle` after the top-level `section`
/// key; 1 if it is not found.
fn line_of(text: &str, section: &str, needle: &str, nth: usize) -> usize {
    let start = text
        .lines()
        .position(|l| l.starts_with(section))
        .unwrap_or(0);
    text.lines()
        .enumerate()
        .skip(start)
        .filter(|(_, l)| !needle.is_empty() && l.contains(needle))
        .nth(nth)
        .map_or(1, |(n, _)| n + 1)
}

/// A DNS label (RFC 1123): what workload, namespace and service account names must be.
pub(crate) fn is_dns_label(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 63
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !name.starts_with('-')
        && !name.ends_with('-')
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

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
excludedPorts: [22]
namespaces:
  - name: default
    labels: { istio.io/dataplane-mode: ambient }
  - name: legacy
workloads:
  - name: client
    node: node1
    serviceAccount: sleep
    ips: [10.20.1.2, "fd00:20:1::2"]
    netns: /var/run/netns/client
  - name: opted-out
    node: node1
    ips: [10.20.1.3]
    netns: /var/run/netns/out
    labels: { istio.io/dataplane-mode: none }
  - name: old
    namespace: legacy
    node: node2
    ips: [10.20.2.2]
    netns: /var/run/netns/old
  - name: opted-in
    namespace: legacy
    node: node2
    ips: [10.20.2.3]
    netns: /var/run/netns/in
    labels: { istio.io/dataplane-mode: ambient }
"#;

    fn parse(text: &str) -> Result<Config, ConfigError> {
        Config::parse(Path::new("/etc/mesh/config.yaml"), text)
    }

    #[test]
    fn parses_a_good_file_and_applies_enrollment_labels() {
        let c = parse(GOOD).unwrap();
        assert_eq!(c.excluded_ports, vec![22]);
        let enrolled: Vec<_> = c
            .workloads
            .iter()
            .filter(|w| c.is_enrolled(w))
            .map(|w| w.key())
            .collect();
        assert_eq!(enrolled, ["default/client", "legacy/opted-in"]);
        assert_eq!(c.workloads[0].service_account, "sleep");
        assert_eq!(c.workloads[1].service_account, "default");
    }

    #[test]
    fn empty_file_is_an_empty_config() {
        assert_eq!(parse("  \n").unwrap(), Config::default());
    }

    fn err(text: &str) -> String {
        parse(text).unwrap_err().to_string()
    }

    #[test]
    fn a_bad_ip_names_file_line_and_field() {
        let text = GOOD.replace("10.20.1.3", "10.20.1.300");
        let e = err(&text);
        assert!(e.contains("/etc/mesh/config.yaml"), "{e}");
        assert!(e.contains("workloads[1].ips[0]"), "{e}");
        assert!(e.contains("line 15"), "{e}");
    }

    #[test]
    fn an_unknown_field_is_rejected() {
        let e = err(&GOOD.replace("serviceAccount: sleep", "serviceAcount: sleep"));
        assert!(e.contains("unknown field `serviceAcount`"), "{e}");
        assert!(e.contains("line 10"), "{e}");
    }

    #[test]
    fn a_missing_required_field_is_rejected() {
        let e = err(&GOOD.replace("    node: node1\n    serviceAccount", "    serviceAccount"));
        assert!(e.contains("missing field `node`"), "{e}");
    }

    #[test]
    fn duplicates_are_rejected_with_the_line_of_the_second() {
        let text = GOOD.replace("name: opted-out", "name: client");
        let e = err(&text);
        assert!(e.contains("workloads[1].name"), "{e}");
        assert!(e.contains("line 13"), "{e}");
        assert!(e.contains("already defined as workloads[0]"), "{e}");

        let e = err(&GOOD.replace("10.20.1.3", "10.20.1.2"));
        assert!(
            e.contains("IP 10.20.1.2 is already used by default/client"),
            "{e}"
        );
        assert!(e.contains("line 15"), "{e}");
    }

    #[test]
    fn semantic_errors_name_the_field() {
        let e = err(&GOOD.replace("netns: /var/run/netns/out", "netns: relative/out"));
        assert!(
            e.contains("workloads[1].netns") && e.contains("not an absolute path"),
            "{e}"
        );
        let e = err(&GOOD.replace("name: opted-in", "name: Opted_In"));
        assert!(
            e.contains("workloads[3].name") && e.contains("not a valid name"),
            "{e}"
        );
        let e = err(&GOOD.replace("mode: none", "mode: sidecar"));
        assert!(
            e.contains("workloads[1].labels") && e.contains("\"sidecar\""),
            "{e}"
        );
        let e = err(&GOOD.replace("[10.20.1.3]", "[10.20.1.3, 10.20.1.4]"));
        assert!(e.contains("at most one IPv4"), "{e}");
        let e = err(&GOOD.replace("excludedPorts: [22]", "excludedPorts: [22, 0]"));
        assert!(e.contains("line 2: field `excludedPorts`: port 0"), "{e}");
        let e = err(&GOOD.replace("[10.20.1.3]", "[]"));
        assert!(e.contains("at least one IP"), "{e}");
    }

    #[test]
    fn the_shipped_example_is_valid() {
        let text = include_str!("../../../deploy/local/example.yaml");
        let c = parse(text).unwrap();
        let enrolled: Vec<_> = c
            .workloads
            .iter()
            .filter(|w| c.is_enrolled(w))
            .map(|w| w.key())
            .collect();
        assert_eq!(enrolled, ["default/client", "default/server"]);
    }

    const SERVICES: &str = r#"
services:
  - name: web
    vips: [10.96.0.10, "fd00:96::10"]
    ports:
      - port: 80
        targetPort: 8080
      - port: 443
    loadBalancing: leastConnections
    endpoints: [client, legacy/old]
"#;

    #[test]
    fn services_parse_with_defaults_and_references() {
        let c = parse(&format!("{GOOD}{SERVICES}")).unwrap();
        let svc = &c.services[0];
        assert_eq!(svc.key(), "default/web");
        assert_eq!(svc.load_balancing, LoadBalancing::LeastConnections);
        assert_eq!(
            svc.ports[0],
            ServicePort {
                port: 80,
                target_port: Some(8080)
            }
        );
        assert_eq!(svc.ports[1].target_port, None);
        let keys: Vec<_> = svc.endpoints.iter().map(|e| svc.endpoint_key(e)).collect();
        assert_eq!(keys, ["default/client", "legacy/old"]);
    }

    #[test]
    fn bad_services_are_rejected_with_field_and_line() {
        let with = |svc: &str| err(&format!("{GOOD}{svc}"));
        let line_of = |svc: &str, needle: &str| {
            let text = format!("{GOOD}{svc}");
            format!(
                "line {}",
                text.lines().position(|l| l.contains(needle)).unwrap() + 1
            )
        };
        let bad = SERVICES.replace("legacy/old", "legacy/missing");
        let e = with(&bad);
        assert!(
            e.contains("services[0].endpoints[1]")
                && e.contains("legacy/missing is not a workload"),
            "{e}"
        );
        assert!(e.contains(&line_of(&bad, "legacy/missing")), "{e}");
        let e = with(&SERVICES.replace("10.96.0.10", "10.20.1.2"));
        assert!(
            e.contains("services[0].vips") && e.contains("address of workload default/client"),
            "{e}"
        );
        let e = with(&SERVICES.replace("port: 443", "port: 80"));
        assert!(
            e.contains("services[0].ports[1]") && e.contains("listed twice"),
            "{e}"
        );
        let bad = SERVICES.replace("leastConnections", "fastest");
        let e = with(&bad);
        assert!(
            e.contains("unknown variant `fastest`") && e.contains(&line_of(&bad, "fastest")),
            "{e}"
        );
        let e = with(&format!(
            "{SERVICES}{}",
            SERVICES.replace("services:\n", "")
        ));
        assert!(
            e.contains("services[1].name") && e.contains("already defined as services[0]"),
            "{e}"
        );
        let e = with(&SERVICES.replace("[10.96.0.10, \"fd00:96::10\"]", "[]"));
        assert!(e.contains("one or two VIPs"), "{e}");
    }

    #[test]
    fn yaml_syntax_errors_have_a_position() {
        let e = err("workloads:\n  - name: [unclosed\n");
        assert!(e.contains("line"), "{e}");
    }
}

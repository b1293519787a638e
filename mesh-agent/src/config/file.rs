//! The config file as the user writes it: a thin serde schema, converted into the model.
use std::collections::BTreeMap;
use std::net::IpAddr;
use std::path::PathBuf;

use serde::Deserialize;

use crate::model::destination_rule::DestinationRule;
use crate::model::policy::PolicyDocument;
use crate::model::route::HttpRoute;
use crate::model::virtual_service::VirtualService;
use crate::model::waypoint::GatewayDocument;
use crate::model::{self, FieldError, Mesh, DEFAULT_ROOT_NAMESPACE};

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct File {
    #[serde(default)]
    excluded_ports: Vec<u16>,
    #[serde(default)]
    namespaces: Vec<Namespace>,
    #[serde(default)]
    workloads: Vec<Workload>,
    #[serde(default)]
    services: Vec<Service>,
    #[serde(default = "default_root_namespace")]
    root_namespace: String,
    /// `PeerAuthentication` and `AuthorizationPolicy` documents, as `kubectl apply` takes them.
    #[serde(default)]
    policies: Vec<PolicyDocument>,
    /// Gateway API `Gateway` documents; those of class `istio-waypoint` are waypoints.
    #[serde(default)]
    gateways: Vec<GatewayDocument>,
    /// Gateway API `HTTPRoute` documents (v1, standard channel).
    #[serde(default)]
    routes: Vec<HttpRoute>,
    /// Istio `VirtualService` documents (`networking.istio.io/v1`).
    #[serde(default)]
    virtual_services: Vec<VirtualService>,
    /// Istio `DestinationRule` documents (`networking.istio.io/v1`).
    #[serde(default)]
    destination_rules: Vec<DestinationRule>,
    /// The mesh-wide default of the `mesh.dev/waypoint-only` label (no bypass).
    #[serde(default)]
    waypoint_only_default: bool,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct Namespace {
    name: String,
    #[serde(default)]
    labels: BTreeMap<String, String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct Workload {
    name: String,
    #[serde(default = "default_name")]
    namespace: String,
    #[serde(default = "default_name")]
    service_account: String,
    node: String,
    ips: Vec<IpAddr>,
    #[serde(default)]
    netns: Option<PathBuf>,
    #[serde(default)]
    labels: BTreeMap<String, String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct Service {
    name: String,
    #[serde(default = "default_name")]
    namespace: String,
    vips: Vec<IpAddr>,
    ports: Vec<ServicePort>,
    #[serde(default)]
    load_balancing: LoadBalancing,
    /// Passive health: when a failing endpoint is left out (`model::EjectionPolicy`).
    #[serde(default)]
    ejection: Ejection,
    #[serde(default)]
    endpoints: Vec<String>,
    #[serde(default)]
    labels: BTreeMap<String, String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct ServicePort {
    port: u16,
    #[serde(default)]
    target_port: Option<u16>,
    #[serde(default)]
    name: Option<String>,
    #[serde(default)]
    app_protocol: Option<String>,
}

/// Each field left out keeps `model::EjectionPolicy`'s default.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct Ejection {
    consecutive_failures: Option<u32>,
    #[serde(default, deserialize_with = "seconds")]
    base_seconds: Option<u64>,
    #[serde(default, deserialize_with = "seconds")]
    max_seconds: Option<u64>,
    #[serde(default, deserialize_with = "percent")]
    max_ejection_percent: Option<u8>,
}

/// An ejection length, at most a day (a longer one is a typo, and would overflow the clock).
fn seconds<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<u64>, D::Error> {
    let value = u64::deserialize(d)?;
    if value > 86_400 {
        return Err(serde::de::Error::custom(format!(
            "{value} seconds is more than a day (86400)"
        )));
    }
    Ok(Some(value))
}

fn percent<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<u8>, D::Error> {
    let value = u8::deserialize(d)?;
    if value > 100 {
        return Err(serde::de::Error::custom(format!(
            "{value} is not a percentage (0 to 100)"
        )));
    }
    Ok(Some(value))
}

impl Ejection {
    fn policy(&self) -> model::EjectionPolicy {
        let default = model::EjectionPolicy::default();
        model::EjectionPolicy {
            consecutive_failures: self
                .consecutive_failures
                .unwrap_or(default.consecutive_failures),
            base: self
                .base_seconds
                .map_or(default.base, std::time::Duration::from_secs),
            max: self
                .max_seconds
                .map_or(default.max, std::time::Duration::from_secs),
            max_ejection_percent: self
                .max_ejection_percent
                .unwrap_or(default.max_ejection_percent),
            interval: default.interval,
        }
    }
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
enum LoadBalancing {
    #[default]
    RoundRobin,
    Random,
    LeastConnections,
    LeastRequest,
}

fn default_root_namespace() -> String {
    DEFAULT_ROOT_NAMESPACE.to_string()
}

fn default_name() -> String {
    "default".to_string()
}

/// Why the text is not a mesh.
pub enum Error {
    /// serde's message, with the field path and the position.
    Parse(String),
    /// A document that parsed but means nothing valid, by its field path.
    Field(FieldError),
}

/// Reads the YAML text into the model (not yet validated).
pub fn from_str(text: &str) -> Result<Mesh, Error> {
    let file: File = serde_yaml_ng::from_str(text).map_err(|e| Error::Parse(e.to_string()))?;
    file.into_mesh().map_err(Error::Field)
}

impl File {
    fn into_mesh(self) -> Result<Mesh, FieldError> {
        let mut waypoints = Vec::new();
        for (i, doc) in self.gateways.iter().enumerate() {
            match doc.waypoint() {
                Ok(Some(w)) => waypoints.push(w),
                // Nothing here serves other Gateways; listing one is a mistake to report (and
                // keeps `gateways[i]` and the i-th waypoint the same document in errors).
                Ok(None) => {
                    return Err(FieldError {
                        field: format!("gateways[{i}].spec.gatewayClassName"),
                        message: format!(
                            "{:?} is not served here: only class istio-waypoint (a waypoint)",
                            doc.spec.gateway_class_name
                        ),
                    })
                }
                Err(message) => {
                    let (field, message) = message
                        .split_once(": ")
                        .map_or((String::new(), message.clone()), |(f, m)| {
                            (format!(".{f}"), m.to_string())
                        });
                    return Err(FieldError {
                        field: format!("gateways[{i}]{field}"),
                        message,
                    });
                }
            }
        }
        let namespaces: Vec<model::Namespace> = self
            .namespaces
            .into_iter()
            .map(|ns| model::Namespace {
                name: ns.name,
                labels: ns.labels,
            })
            .collect();
        let namespace_labels = |name: &str| {
            namespaces
                .iter()
                .find(|ns| ns.name == name)
                .map(|ns| ns.labels.clone())
        };
        let workloads = self
            .workloads
            .into_iter()
            .map(|w| model::Workload {
                enrolled: model::is_enrolled(&w.labels, namespace_labels(&w.namespace).as_ref()),
                name: w.name,
                namespace: w.namespace,
                service_account: w.service_account,
                node: w.node,
                ips: w.ips,
                netns: w.netns,
                labels: w.labels,
            })
            .collect();
        let services = self
            .services
            .into_iter()
            .map(|s| model::Service {
                name: s.name,
                namespace: s.namespace,
                vips: s.vips,
                ports: s
                    .ports
                    .into_iter()
                    .map(|p| model::ServicePort {
                        port: p.port,
                        target_port: p.target_port,
                        name: p.name,
                        app_protocol: p.app_protocol,
                    })
                    .collect(),
                load_balancing: match s.load_balancing {
                    LoadBalancing::RoundRobin => model::LoadBalancing::RoundRobin,
                    LoadBalancing::Random => model::LoadBalancing::Random,
                    LoadBalancing::LeastConnections => model::LoadBalancing::LeastConnections,
                    LoadBalancing::LeastRequest => model::LoadBalancing::LeastRequest,
                },
                ejection: s.ejection.policy(),
                endpoints: s.endpoints,
                labels: s.labels,
            })
            .collect();
        Ok(Mesh {
            excluded_ports: self.excluded_ports,
            namespaces,
            workloads,
            services,
            root_namespace: self.root_namespace,
            policies: self.policies,
            waypoints,
            routes: self.routes,
            virtual_services: self.virtual_services,
            destination_rules: self.destination_rules,
            waypoint_only_default: self.waypoint_only_default,
        })
    }
}

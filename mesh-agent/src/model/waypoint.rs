//! Waypoints, as Istio ambient defines them (Istio 1.24+): a waypoint is a Gateway API `Gateway`
//! (`gateway.networking.k8s.io/v1`) of class `istio-waypoint`; its pods carry the label
//! `gateway.networking.k8s.io/gateway-name: <gateway name>` in the Gateway's namespace.
//!
//! * `istio.io/waypoint-for` on the Gateway says which traffic it takes: `service` (the default),
//!   `workload`, `all` or `none`.
//! * `istio.io/use-waypoint: <name>` on a Service, a pod or a namespace sends that traffic through
//!   the waypoint; the resource's own label wins over its namespace's, and `none` opts out.
//!   `istio.io/use-waypoint-namespace` names the waypoint's namespace when it is not the
//!   resource's own.
use std::collections::BTreeMap;

use serde::Deserialize;

use super::workload::Workload;

/// The class of a waypoint Gateway.
pub const WAYPOINT_CLASS: &str = "istio-waypoint";
/// On a Gateway: which traffic the waypoint takes.
pub const WAYPOINT_FOR_LABEL: &str = "istio.io/waypoint-for";
/// On a Service, pod or namespace: the waypoint its traffic goes through.
pub const USE_WAYPOINT_LABEL: &str = "istio.io/use-waypoint";
/// Beside [`USE_WAYPOINT_LABEL`]: the waypoint's namespace.
pub const USE_WAYPOINT_NAMESPACE_LABEL: &str = "istio.io/use-waypoint-namespace";
/// On a waypoint's pods: the Gateway they serve.
pub const GATEWAY_NAME_LABEL: &str = "gateway.networking.k8s.io/gateway-name";

/// Which traffic a waypoint takes.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum WaypointFor {
    #[default]
    Service,
    Workload,
    All,
    None,
}

impl WaypointFor {
    pub fn parse(value: &str) -> Result<WaypointFor, String> {
        match value {
            "service" => Ok(WaypointFor::Service),
            "workload" => Ok(WaypointFor::Workload),
            "all" => Ok(WaypointFor::All),
            "none" => Ok(WaypointFor::None),
            other => Err(format!(
                "{WAYPOINT_FOR_LABEL}: {other:?} is not one of service, workload, all, none"
            )),
        }
    }

    pub fn takes_services(self) -> bool {
        matches!(self, WaypointFor::Service | WaypointFor::All)
    }

    pub fn takes_workloads(self) -> bool {
        matches!(self, WaypointFor::Workload | WaypointFor::All)
    }
}

/// A waypoint Gateway.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Waypoint {
    pub name: String,
    pub namespace: String,
    pub waypoint_for: WaypointFor,
}

impl Waypoint {
    /// `namespace/name`.
    pub fn key(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }

    /// Whether a workload is one of this waypoint's pods: in the Gateway's namespace, labelled
    /// with its name, and running as the service account named after the Gateway (as Istio
    /// deploys waypoints). The label alone is not enough: any pod can set a label, and a pod
    /// taken for a waypoint receives other services' traffic.
    pub fn has_pod(&self, w: &Workload) -> bool {
        w.namespace == self.namespace
            && w.service_account == self.name
            && w.labels.get(GATEWAY_NAME_LABEL).map(String::as_str) == Some(self.name.as_str())
    }
}

/// What a resource's labels (and its namespace's) say about its waypoint.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum UseWaypoint {
    /// No label, or `none`: traffic goes straight to the destination.
    No,
    /// Through the waypoint `namespace/name`.
    Named { namespace: String, name: String },
}

/// Istio's rule: the resource's own `istio.io/use-waypoint` wins (`none` opts out even when the
/// namespace names one); otherwise the namespace's label. The waypoint's namespace comes from
/// `istio.io/use-waypoint-namespace` beside the label that named it, else the namespace of the
/// resource carrying that label (always `namespace`).
pub fn use_waypoint(
    namespace: &str,
    labels: &BTreeMap<String, String>,
    namespace_labels: Option<&BTreeMap<String, String>>,
) -> UseWaypoint {
    let named = |labels: &BTreeMap<String, String>| {
        labels.get(USE_WAYPOINT_LABEL).map(|name| {
            if name == "none" {
                return UseWaypoint::No;
            }
            UseWaypoint::Named {
                namespace: labels
                    .get(USE_WAYPOINT_NAMESPACE_LABEL)
                    .cloned()
                    .unwrap_or_else(|| namespace.to_string()),
                name: name.clone(),
            }
        })
    };
    named(labels)
        .or_else(|| namespace_labels.and_then(named))
        .unwrap_or(UseWaypoint::No)
}

/// A `Gateway` document, as `kubectl apply` takes it; only what a waypoint needs is read, the
/// rest of its spec (listeners, addresses) is Istio's to fill and is accepted as written.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct GatewayDocument {
    pub api_version: String,
    pub kind: String,
    pub metadata: GatewayMetadata,
    pub spec: GatewaySpec,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct GatewayMetadata {
    pub name: String,
    #[serde(default = "default_namespace")]
    pub namespace: String,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct GatewaySpec {
    pub gateway_class_name: String,
}

fn default_namespace() -> String {
    "default".to_string()
}

/// The API version of the Gateways read.
pub const GATEWAY_API_VERSION: &str = "gateway.networking.k8s.io/v1";

impl GatewayDocument {
    /// The waypoint this Gateway defines; `Ok(None)` for a Gateway of another class (not ours to
    /// serve); an error names the bad field.
    pub fn waypoint(&self) -> Result<Option<Waypoint>, String> {
        if self.api_version != GATEWAY_API_VERSION || self.kind != "Gateway" {
            return Err(format!(
                "apiVersion/kind: expected {GATEWAY_API_VERSION} Gateway, found {} {}",
                self.api_version, self.kind
            ));
        }
        if self.spec.gateway_class_name != WAYPOINT_CLASS {
            return Ok(None);
        }
        let waypoint_for = match self.metadata.labels.get(WAYPOINT_FOR_LABEL) {
            Some(value) => {
                WaypointFor::parse(value).map_err(|e| format!("metadata.labels: {e}"))?
            }
            None => WaypointFor::Service,
        };
        Ok(Some(Waypoint {
            name: self.metadata.name.clone(),
            namespace: self.metadata.namespace.clone(),
            waypoint_for,
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn named(namespace: &str, name: &str) -> UseWaypoint {
        UseWaypoint::Named {
            namespace: namespace.into(),
            name: name.into(),
        }
    }

    #[test]
    fn the_resource_label_wins_over_the_namespace_and_none_opts_out() {
        let ns = labels(&[(USE_WAYPOINT_LABEL, "ns-wp")]);
        let cases = [
            (labels(&[]), None, UseWaypoint::No),
            (labels(&[]), Some(&ns), named("shop", "ns-wp")),
            (
                labels(&[(USE_WAYPOINT_LABEL, "own")]),
                Some(&ns),
                named("shop", "own"),
            ),
            (
                labels(&[(USE_WAYPOINT_LABEL, "none")]),
                Some(&ns),
                UseWaypoint::No,
            ),
            (
                labels(&[
                    (USE_WAYPOINT_LABEL, "shared"),
                    (USE_WAYPOINT_NAMESPACE_LABEL, "infra"),
                ]),
                None,
                named("infra", "shared"),
            ),
        ];
        for (own, namespace, want) in cases {
            assert_eq!(use_waypoint("shop", &own, namespace), want, "{own:?}");
        }
        // The namespace's own namespace label travels with its use-waypoint label.
        let ns = labels(&[
            (USE_WAYPOINT_LABEL, "shared"),
            (USE_WAYPOINT_NAMESPACE_LABEL, "infra"),
        ]);
        assert_eq!(
            use_waypoint("shop", &labels(&[]), Some(&ns)),
            named("infra", "shared")
        );
    }

    #[test]
    fn a_gateway_of_class_istio_waypoint_is_a_waypoint() {
        let doc = |class: &str, waypoint_for: Option<&str>| {
            let labels = waypoint_for
                .map(|v| format!("labels: {{ {WAYPOINT_FOR_LABEL}: {v} }}"))
                .unwrap_or_default();
            let text = format!(
                "apiVersion: gateway.networking.k8s.io/v1\nkind: Gateway\n\
                 metadata: {{ name: wp, namespace: shop, {labels} }}\n\
                 spec: {{ gatewayClassName: {class}, listeners: [{{ name: mesh, port: 15008, \
                 protocol: HBONE }}] }}\n"
            );
            serde_yaml_ng::from_str::<GatewayDocument>(&text).unwrap()
        };
        let wp = doc("istio-waypoint", None).waypoint().unwrap().unwrap();
        assert_eq!(
            (wp.key(), wp.waypoint_for),
            ("shop/wp".to_string(), WaypointFor::Service)
        );
        let wp = doc("istio-waypoint", Some("all"))
            .waypoint()
            .unwrap()
            .unwrap();
        assert!(wp.waypoint_for.takes_services() && wp.waypoint_for.takes_workloads());
        assert_eq!(doc("istio", None).waypoint().unwrap(), None);
        let err = doc("istio-waypoint", Some("pods")).waypoint().unwrap_err();
        assert_eq!(
            err,
            "metadata.labels: istio.io/waypoint-for: \"pods\" is not one of service, \
             workload, all, none"
        );
        let pod = |namespace: &str, sa: &str, labels: BTreeMap<String, String>| Workload {
            name: "wp-1".into(),
            namespace: namespace.into(),
            service_account: sa.into(),
            node: "n1".into(),
            ips: vec![],
            netns: None,
            labels,
            enrolled: false,
        };
        let label = || labels(&[(GATEWAY_NAME_LABEL, "wp")]);
        assert!(wp.has_pod(&pod("shop", "wp", label())));
        assert!(!wp.has_pod(&pod("other", "wp", label())));
        assert!(!wp.has_pod(&pod("shop", "wp", labels(&[]))));
        assert!(
            !wp.has_pod(&pod("shop", "web", label())),
            "a pod that only sets the label is not the waypoint"
        );
    }
}

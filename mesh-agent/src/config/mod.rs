//! Sources of truth: the YAML file ([`load`], [`parse`], [`watch_file`]) and the Kubernetes API
//! ([`kubernetes`]). Each builds a [`Mesh`] (`crate::model`); neither is read by anything but the
//! agent's wiring in `cli`.
//!
//! Parsing is strict: unknown fields, wrong types and inconsistent entries are errors that name the
//! file, the line and the field (positions come from the YAML parser's spans). A rejected edit
//! never replaces the last good configuration.
mod file;
pub mod kubernetes;
mod positions;
mod watch;

pub use watch::watch_file;

use std::path::{Path, PathBuf};

use crate::model::Mesh;
use positions::Positions;

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
    #[error("config file {path}{}: field `{field}`: {message}", at_line(*line))]
    Invalid {
        path: PathBuf,
        /// 1-based; `None` when the parser could not place the field.
        line: Option<usize>,
        field: String,
        message: String,
    },
}

fn at_line(line: Option<usize>) -> String {
    line.map(|l| format!(", line {l}")).unwrap_or_default()
}

/// Reads and validates a config file.
pub fn load(path: &Path) -> Result<Mesh, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|error| ConfigError::Read {
        path: path.to_path_buf(),
        error,
    })?;
    parse(path, &text)
}

/// Parses and validates config text; `path` is only used in messages.
pub fn parse(path: &Path, text: &str) -> Result<Mesh, ConfigError> {
    let invalid = |e: crate::model::FieldError| ConfigError::Invalid {
        path: path.to_path_buf(),
        line: Positions::index(text).find(&e.field).map(|p| p.line),
        field: e.field,
        message: e.message,
    };
    let mesh = if text.trim().is_empty() {
        Mesh::default()
    } else {
        file::from_str(text).map_err(|e| match e {
            file::Error::Parse(message) => ConfigError::Parse {
                path: path.to_path_buf(),
                message,
            },
            file::Error::Field(e) => invalid(e),
        })?
    };
    mesh.validate().map_err(invalid)?;
    Ok(mesh)
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

    use crate::model::{LoadBalancing, ServicePort};

    fn parse(text: &str) -> Result<Mesh, ConfigError> {
        super::parse(Path::new("/etc/mesh/config.yaml"), text)
    }

    #[test]
    fn parses_a_good_file_and_applies_enrollment_labels() {
        let c = parse(GOOD).unwrap();
        assert_eq!(c.excluded_ports, vec![22]);
        let enrolled: Vec<_> = c
            .workloads
            .iter()
            .filter(|w| w.enrolled)
            .map(|w| w.key())
            .collect();
        assert_eq!(enrolled, ["default/client", "legacy/opted-in"]);
        assert_eq!(c.workloads[0].service_account, "sleep");
        assert_eq!(c.workloads[1].service_account, "default");
    }

    #[test]
    fn empty_file_is_an_empty_config() {
        assert_eq!(parse("  \n").unwrap(), Mesh::default());
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
            .filter(|w| w.enrolled)
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
                target_port: Some(8080),
                name: None,
                app_protocol: None,
            }
        );
        assert_eq!(svc.ports[1].target_port, None);
        let keys: Vec<_> = svc.endpoints.iter().map(|e| svc.endpoint_key(e)).collect();
        assert_eq!(keys, ["default/client", "legacy/old"]);
        assert_eq!(svc.ejection, crate::model::EjectionPolicy::default());
    }

    #[test]
    fn a_service_sets_its_ejection_and_a_bad_share_is_rejected() {
        let with = |ejection: &str| {
            format!(
                "{GOOD}{}",
                SERVICES.replace(
                    "    loadBalancing",
                    &format!("    ejection: {ejection}\n    loadBalancing")
                )
            )
        };
        let c = parse(&with("{ baseSeconds: 2, maxEjectionPercent: 100 }")).unwrap();
        let policy = c.services[0].ejection;
        assert_eq!(policy.base, std::time::Duration::from_secs(2));
        assert_eq!(policy.max_ejection_percent, 100);
        assert_eq!(
            policy.max,
            crate::model::EjectionPolicy::default().max,
            "unset: the default"
        );
        let e = err(&with("{ maxEjectionPercent: 150 }"));
        assert!(e.contains("150 is not a percentage (0 to 100)"), "{e}");
        let e = err(&with("{ baseTime: 5s }"));
        assert!(e.contains("unknown field `baseTime`"), "{e}");
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
    fn the_line_is_the_parsers_position_of_the_field_even_when_its_value_repeats() {
        // The invalid namespace `Bad` also appears earlier, as a label value, and a field left
        // out (the workload's `serviceAccount`) is placed at its item.
        let text = GOOD
            .replace(
                "    labels: { istio.io/dataplane-mode: none }",
                "    labels: { istio.io/dataplane-mode: none, team: Bad }",
            )
            .replace(
                "    namespace: legacy\n    node: node2\n    ips: [10.20.2.3]",
                "    namespace: Bad\n    node: node2\n    ips: [10.20.2.3]",
            );
        let e = err(&text);
        let line = text
            .lines()
            .position(|l| l == "    namespace: Bad")
            .unwrap()
            + 1;
        assert!(e.contains("workloads[3].namespace"), "{e}");
        assert!(e.contains(&format!("line {line}:")), "{e}");
        let first = text.lines().position(|l| l.contains("team: Bad")).unwrap() + 1;
        assert!(first < line);
    }

    #[test]
    fn yaml_syntax_errors_have_a_position() {
        let e = err("workloads:\n  - name: [unclosed\n");
        assert!(e.contains("line"), "{e}");
    }

    #[test]
    fn a_bad_waypoint_gateway_is_rejected_with_its_line_and_field() {
        let text = "gateways:
  - apiVersion: gateway.networking.k8s.io/v1
    kind: Gateway
    metadata:
      name: wp
      labels: { istio.io/waypoint-for: pods }
    spec: { gatewayClassName: istio-waypoint }
";
        let e = parse(text).unwrap_err().to_string();
        assert_eq!(
            e,
            "config file /etc/mesh/config.yaml, line 6: field `gateways[0].metadata.labels`: \
             istio.io/waypoint-for: \"pods\" is not one of service, workload, all, none"
        );
        let twice = format!(
            "{}  - apiVersion: gateway.networking.k8s.io/v1
    kind: Gateway
    metadata: {{ name: wp }}
    spec: {{ gatewayClassName: istio-waypoint }}
",
            text.replace("pods", "all")
        );
        let e = parse(&twice).unwrap_err().to_string();
        assert_eq!(
            e,
            "config file /etc/mesh/config.yaml, line 10: field `gateways[1].metadata.name`: waypoint \
             default/wp is already defined as gateways[0]"
        );
        let ingress = text
            .replace("pods", "all")
            .replace("istio-waypoint", "istio");
        let e = parse(&ingress).unwrap_err().to_string();
        assert_eq!(
            e,
            "config file /etc/mesh/config.yaml, line 7: field `gateways[0].spec.gatewayClassName`: \
             \"istio\" is not served here: only class istio-waypoint (a waypoint)"
        );
    }

    #[test]
    fn routes_are_read_and_a_bad_one_is_rejected_with_its_line_and_field() {
        let text = "routes:
  - apiVersion: gateway.networking.k8s.io/v1
    kind: HTTPRoute
    metadata: { name: split, namespace: shop }
    spec:
      parentRefs: [{ group: \"\", kind: Service, name: web }]
      rules:
        - matches: [{ path: { type: PathPrefix, value: /api } }]
          backendRefs: [{ name: web-v1, port: 80, weight: 90 }, { name: web-v2, port: 80, weight: 10 }]
";
        let mesh = parse(text).unwrap();
        assert_eq!(mesh.routes.len(), 1);
        assert_eq!(mesh.routes[0].key(), "shop/split");
        let e = parse(&text.replace("/api", "api")).unwrap_err().to_string();
        assert!(
            e.starts_with(
                "config file /etc/mesh/config.yaml, line 8: field \
                 `routes[0].spec.rules[0].matches[0].path.value`:"
            ),
            "{e}"
        );
        let twice = format!("{text}{}", &text["routes:\n".len()..]);
        let e = parse(&twice).unwrap_err().to_string();
        assert!(
            e.ends_with("HTTPRoute shop/split is already defined as routes[0]"),
            "{e}"
        );
        let e = parse(&text.replace("weight: 10", "weight: 10, extra: 1"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("unknown field `extra`"), "{e}");
    }

    const TRAFFIC: &str = "virtualServices:
  - apiVersion: networking.istio.io/v1
    kind: VirtualService
    metadata: { name: reviews, namespace: shop }
    spec:
      hosts: [reviews]
      http:
        - route:
            - destination: { host: reviews, subset: v1 }
              weight: 90
            - destination: { host: reviews, subset: v2 }
              weight: 10
destinationRules:
  - apiVersion: networking.istio.io/v1
    kind: DestinationRule
    metadata: { name: reviews, namespace: shop }
    spec:
      host: reviews
      subsets:
        - { name: v1, labels: { version: v1 } }
        - { name: v2, labels: { version: v2 } }
";

    #[test]
    fn virtual_services_and_destination_rules_are_read_and_errors_name_line_and_field() {
        let mesh = parse(TRAFFIC).unwrap();
        assert_eq!(mesh.virtual_services.len(), 1);
        assert_eq!(mesh.virtual_services[0].key(), "shop/reviews");
        assert_eq!(mesh.virtual_services[0].spec.http[0].route[1].weight, 10);
        assert_eq!(mesh.destination_rules.len(), 1);
        let rule = mesh.destination_rule_for("shop/reviews").unwrap();
        assert_eq!(rule.spec.subsets.len(), 2);
        // Reading: serde's path and line.
        let e = parse(&TRAFFIC.replace("hosts: [reviews]", "hosts: [reviews]\n      tcp: []"))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("virtualServices[0].spec.tcp: `tcp` is not supported"),
            "{e}"
        );
        assert!(e.contains("line 7"), "{e}");
        // Validation: the file's line for the model's field.
        let e = parse(
            &TRAFFIC
                .replace("weight: 90", "weight: 0")
                .replace("weight: 10", "weight: 0"),
        )
        .unwrap_err()
        .to_string();
        assert!(
            e.starts_with(
                "config file /etc/mesh/config.yaml, line 9: field \
                 `virtualServices[0].spec.http[0].route`: the weights of several destinations"
            ),
            "{e}"
        );
        let e = parse(&TRAFFIC.replace("{ name: v2,", "{ name: V2,"))
            .unwrap_err()
            .to_string();
        assert!(
            e.starts_with(
                "config file /etc/mesh/config.yaml, line 21: field \
                 `destinationRules[0].spec.subsets[1].name`: \"V2\" is not a valid subset name"
            ),
            "{e}"
        );
        let e = parse(&TRAFFIC.replace("host: reviews\n", "host: \"*.shop.svc.cluster.local\"\n"))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("`destinationRules[0].spec.host`: wildcard host"),
            "{e}"
        );
        let twice = TRAFFIC.replace(
            "destinationRules:\n",
            &format!(
                "{}destinationRules:\n",
                &TRAFFIC["virtualServices:\n".len()..TRAFFIC.find("destinationRules:").unwrap()]
            ),
        );
        let e = parse(&twice).unwrap_err().to_string();
        assert!(
            e.ends_with("VirtualService shop/reviews is already defined as virtualServices[0]"),
            "{e}"
        );
    }

    #[test]
    fn subsets_selecting_nothing_and_rules_for_unknown_services_are_warnings_not_errors() {
        let text = format!(
            "{TRAFFIC}  - apiVersion: networking.istio.io/v1
    kind: DestinationRule
    metadata: {{ name: gone, namespace: shop }}
    spec: {{ host: gone }}
namespaces: [{{ name: shop }}]
workloads:
  - {{ name: reviews-v1, namespace: shop, node: n1, ips: [10.0.0.1], labels: {{ version: v1 }} }}
services:
  - {{ name: reviews, namespace: shop, vips: [10.96.0.1], ports: [{{ port: 9080 }}],
      endpoints: [reviews-v1] }}
"
        );
        let mesh = parse(&text).unwrap();
        assert_eq!(
            mesh.traffic_warnings(),
            [
                (
                    "DestinationRule shop/reviews".to_string(),
                    "subset \"v2\" selects no endpoint of Service shop/reviews (labels \
                     {\"version\": \"v2\"})"
                        .to_string()
                ),
                (
                    "DestinationRule shop/gone".to_string(),
                    "host \"gone\" names Service shop/gone, which the mesh does not have"
                        .to_string()
                ),
            ]
        );
        let state = crate::state::State::from_mesh(&mesh, "n1");
        let logged: Vec<String> = state
            .policy_warnings
            .iter()
            .map(|w| w.policy.clone())
            .collect();
        assert_eq!(
            logged,
            ["DestinationRule shop/reviews", "DestinationRule shop/gone"]
        );
        assert!(state.destination_rule_for("shop/reviews").is_some());
        assert!(state.destination_rule_for("shop/other").is_none());
    }

    #[tokio::test]
    async fn a_broken_traffic_edit_is_rejected_and_the_last_good_config_stays() {
        use std::sync::Arc;
        use tokio::sync::{mpsc, watch};

        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("mesh.yaml");
        std::fs::write(&path, TRAFFIC).unwrap();
        let first = super::load(&path).unwrap();
        let (tx, mut rx) = watch::channel(Arc::new(first.clone()));
        let (results_tx, mut results) = mpsc::unbounded_channel();
        let task = tokio::spawn(super::watch_file(
            path.clone(),
            std::time::Duration::from_millis(10),
            TRAFFIC.as_bytes().to_vec(),
            tx,
            move |r: Result<&Mesh, &ConfigError>| {
                let _ = results_tx.send(r.map(|_| ()).map_err(|e| e.to_string()));
            },
        ));
        // A weight above Istio's int32 maximum: rejected, nothing published.
        std::fs::write(&path, TRAFFIC.replace("weight: 10", "weight: 3000000000")).unwrap();
        let rejected = results.recv().await.unwrap().unwrap_err();
        assert!(
            rejected.contains("`virtualServices[0].spec.http[0].route[1].weight`"),
            "{rejected}"
        );
        assert!(!rx.has_changed().unwrap());
        assert_eq!(**rx.borrow(), first);
        // A good edit after it is applied.
        std::fs::write(&path, TRAFFIC.replace("weight: 90", "weight: 80")).unwrap();
        results.recv().await.unwrap().unwrap();
        rx.changed().await.unwrap();
        assert_eq!(
            rx.borrow().virtual_services[0].spec.http[0].route[0].weight,
            80
        );
        drop(rx);
        task.await.unwrap();
    }

    #[test]
    fn waypoint_only_is_read_and_a_bad_value_names_its_line_and_field() {
        let text = "waypointOnlyDefault: true
namespaces:
  - name: shop
    labels: { mesh.dev/waypoint-only: \"false\" }
services:
  - name: web
    namespace: shop
    vips: [10.96.0.1]
    ports: [{ port: 80 }]
    labels: { mesh.dev/waypoint-only: \"true\" }
";
        let mesh = parse(text).unwrap();
        assert!(mesh.waypoint_only_default);
        assert!(!parse("excludedPorts: []").unwrap().waypoint_only_default);
        let e = parse(&text.replace("\"true\" }", "yes }"))
            .unwrap_err()
            .to_string();
        assert_eq!(
            e,
            "config file /etc/mesh/config.yaml, line 10: field `services[0].labels`: \
             mesh.dev/waypoint-only=\"yes\" is not supported (use \"true\" or \"false\")"
        );
        let e = parse(&text.replace("\"false\" }", "off }"))
            .unwrap_err()
            .to_string();
        assert!(
            e.starts_with(
                "config file /etc/mesh/config.yaml, line 4: field `namespaces[0].labels`: \
                 mesh.dev/waypoint-only=\"off\""
            ),
            "{e}"
        );
        let e = parse(&text.replace("Default: true", "Default: maybe"))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("waypointOnlyDefault") && e.contains("line 1"),
            "{e}"
        );
    }
}

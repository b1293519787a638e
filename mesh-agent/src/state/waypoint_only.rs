//! The no-bypass index: for each workload, the target ports that Services marked
//! `mesh.dev/waypoint-only` (with a waypoint, or a missing one) guard, and the guard.
use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use super::{Service, Via};
use crate::model::waypoint::USE_WAYPOINT_LABEL;
use crate::model::waypoint_only::waypoint_only;
use crate::model::Mesh;
use crate::policy::{Warning, WaypointOnly};

/// Guards by workload `namespace/name`, then by target port.
#[derive(Debug, Default)]
pub(super) struct Guards {
    by_workload: HashMap<String, HashMap<u16, Vec<Arc<WaypointOnly>>>>,
}

impl Guards {
    /// The guards of the marked services among `services`, and a warning for each marked
    /// service that goes direct (no waypoint, or one that does not take service traffic): it has
    /// nothing to guard, which its operator most likely did not mean.
    pub(super) fn index(
        mesh: &Mesh,
        services: &BTreeMap<String, Arc<Service>>,
    ) -> (Guards, Vec<Warning>) {
        let mut guards = Guards::default();
        let mut warnings = Vec::new();
        for svc in services.values() {
            let ns_labels = mesh.namespace(&svc.spec.namespace).map(|ns| &ns.labels);
            if !waypoint_only(&svc.spec.labels, ns_labels, mesh.waypoint_only_default) {
                continue;
            }
            let guard = match &svc.via {
                Via::Direct => {
                    // Worth a warning when a label (the Service's or its namespace's) asked for
                    // the guard: the mesh default covers every Service, most of them without a
                    // waypoint, and `istio.io/use-waypoint: none` on the Service says it goes
                    // direct on purpose.
                    let labelled = waypoint_only(&svc.spec.labels, ns_labels, false);
                    let opted_out =
                        svc.spec.labels.get(USE_WAYPOINT_LABEL).map(String::as_str) == Some("none");
                    if labelled && !opted_out {
                        warnings.push(Warning::new(
                            "Service",
                            &svc.key(),
                            "is labelled waypoint-only (mesh.dev/waypoint-only on it or its \
                             namespace) but its traffic goes through no waypoint (no \
                             istio.io/use-waypoint on it or its namespace, or that waypoint's \
                             istio.io/waypoint-for excludes service traffic): nothing is guarded",
                        ));
                    }
                    continue;
                }
                Via::Waypoint(wp) => {
                    let mut identities: Vec<(String, String)> = wp
                        .pods
                        .iter()
                        .map(|p| (p.namespace.clone(), p.service_account.clone()))
                        .collect();
                    identities.sort();
                    identities.dedup();
                    WaypointOnly {
                        service: svc.key(),
                        waypoint: wp.waypoint.key(),
                        identities,
                        missing: None,
                    }
                }
                Via::Missing { waypoint, why } => WaypointOnly {
                    service: svc.key(),
                    waypoint: waypoint.clone(),
                    identities: Vec::new(),
                    missing: Some(why),
                },
            };
            let guard = Arc::new(guard);
            for endpoint in &svc.endpoints {
                let ports = guards.by_workload.entry(endpoint.key()).or_default();
                for port in &svc.spec.ports {
                    let target = port.target_port.unwrap_or(port.port);
                    let list = ports.entry(target).or_default();
                    // Two ports of one service may share a target port.
                    if !list.iter().any(|g| Arc::ptr_eq(g, &guard)) {
                        list.push(guard.clone());
                    }
                }
            }
        }
        (guards, warnings)
    }

    /// The guards of `workload`'s `port`, by service key (services are indexed in key order).
    pub(super) fn on(&self, workload: &str, port: u16) -> &[Arc<WaypointOnly>] {
        self.by_workload
            .get(workload)
            .and_then(|ports| ports.get(&port))
            .map_or(&[], Vec::as_slice)
    }
}

#[cfg(test)]
mod tests {
    use std::net::IpAddr;
    use std::path::Path;

    use super::super::State;
    use crate::identity::Identity;
    use crate::policy::Request;

    /// `shop` marks its services through its namespace label; `web` uses waypoint `wp`,
    /// `direct` has no waypoint, `lost` names one that does not exist, `open` opts out.
    const CONFIG: &str = r#"
waypointOnlyDefault: DEFAULT
namespaces:
  - { name: shop, labels: { istio.io/dataplane-mode: ambient, mesh.dev/waypoint-only: "NS" } }
  - { name: other, labels: { istio.io/dataplane-mode: ambient } }
workloads:
  - { name: server, namespace: shop, node: n1, ips: [10.0.0.2] }
  - { name: db, namespace: shop, node: n1, ips: [10.0.0.3] }
  - { name: lonely, namespace: shop, node: n1, ips: [10.0.0.4] }
  - { name: misc, namespace: shop, node: n1, ips: [10.0.0.5] }
  - { name: app, namespace: other, node: n1, ips: [10.0.1.2] }
  - { name: wp-1, namespace: shop, node: n1, ips: [10.0.0.9], serviceAccount: wp, labels: { gateway.networking.k8s.io/gateway-name: wp } }
services:
  - { name: web, namespace: shop, vips: [10.96.0.1], ports: [{ port: 80, targetPort: 8080 }, { port: 81, targetPort: 8080 }], endpoints: [server], labels: { istio.io/use-waypoint: wp } }
  - { name: direct, namespace: shop, vips: [10.96.0.2], ports: [{ port: 80, targetPort: 9090 }], endpoints: [server] }
  - { name: lost, namespace: shop, vips: [10.96.0.3], ports: [{ port: 5432 }], endpoints: [db], labels: { istio.io/use-waypoint: gone } }
  - { name: open, namespace: shop, vips: [10.96.0.4], ports: [{ port: 80 }], endpoints: [misc], labels: { istio.io/use-waypoint: wp, mesh.dev/waypoint-only: "false" } }
  - { name: app, namespace: other, vips: [10.96.1.1], ports: [{ port: 80 }], endpoints: [app], labels: { istio.io/use-waypoint: wp, istio.io/use-waypoint-namespace: shop } }
  - { name: own, namespace: shop, vips: [10.96.0.5], ports: [{ port: 7000 }], endpoints: [lonely], labels: { istio.io/use-waypoint: wp, mesh.dev/waypoint-only: "true" } }
gateways:
  - apiVersion: gateway.networking.k8s.io/v1
    kind: Gateway
    metadata: { name: wp, namespace: shop }
    spec: { gatewayClassName: istio-waypoint }
"#;

    fn state(mesh_default: bool, namespace: &str) -> State {
        let text = CONFIG
            .replace("DEFAULT", &mesh_default.to_string())
            .replace("NS", namespace);
        let config = crate::config::parse(Path::new("t.yaml"), &text).unwrap();
        State::from_mesh(&config, "n1")
    }

    /// The decision at `workload`'s `port` for a peer (`None`: plaintext), as text.
    fn decide(state: &State, workload: &str, port: u16, src: Option<(&str, &str)>) -> String {
        let dst = &state.workloads[workload];
        let src = src.map(|(ns, sa)| Identity::new("cluster.local", ns, sa));
        state
            .decide_inbound(&Request {
                dst,
                dst_ip: dst.ips[0],
                dst_port: port,
                src_ip: IpAddr::from([10, 0, 0, 100]),
                src: src.as_ref(),
                http: None,
            })
            .to_string()
    }

    const CLIENT: Option<(&str, &str)> = Some(("shop", "client"));
    const WAYPOINT: Option<(&str, &str)> = Some(("shop", "wp"));
    const ALLOW: &str = "allow: no ALLOW policy applies to the workload";

    #[test]
    fn a_marked_service_admits_only_its_waypoint_on_its_target_ports() {
        let s = state(false, "true");
        let web = "deny: service shop/web accepts only its waypoint shop/wp (no-bypass)";
        assert_eq!(decide(&s, "shop/server", 8080, CLIENT), web);
        assert_eq!(decide(&s, "shop/server", 8080, None), web, "plaintext");
        assert_eq!(decide(&s, "shop/server", 8080, WAYPOINT), ALLOW);
        assert_eq!(
            s.waypoint_only(&s.workloads["shop/server"], 8080).len(),
            1,
            "two service ports on one target port: one guard"
        );
        // Another port of the same pod, and a service of it without a waypoint: unguarded.
        assert_eq!(decide(&s, "shop/server", 9090, CLIENT), ALLOW);
        assert_eq!(decide(&s, "shop/server", 80, CLIENT), ALLOW);
        // A waypoint that does not exist admits nobody.
        assert_eq!(
            decide(&s, "shop/db", 5432, WAYPOINT),
            "deny: service shop/lost accepts only its waypoint shop/gone, which does not exist \
             (no-bypass)"
        );
        // `false` on the service beats its namespace's `true`.
        assert_eq!(decide(&s, "shop/misc", 80, CLIENT), ALLOW);
        // `other` has no label and the mesh default is off.
        assert_eq!(decide(&s, "other/app", 80, CLIENT), ALLOW);
    }

    #[test]
    fn a_marked_service_without_a_waypoint_is_warned_about() {
        // `direct` (namespace label) has no waypoint; the others are guarded or opted out.
        let s = state(false, "true");
        let warned: Vec<String> = s
            .policy_warnings
            .iter()
            .map(|w| format!("{}: {}", w.policy, w.message))
            .collect();
        assert_eq!(warned.len(), 1, "{warned:?}");
        assert!(
            warned[0].starts_with("Service shop/direct: is labelled waypoint-only")
                && warned[0].ends_with("nothing is guarded"),
            "{warned:?}"
        );
        assert!(state(false, "false").policy_warnings.is_empty());
        // The mesh default alone marks `direct` too, but warns about nothing.
        assert!(state(true, "false").policy_warnings.is_empty());
        // `istio.io/use-waypoint: none` on the Service: direct on purpose.
        let text = CONFIG
            .replace("DEFAULT", "false")
            .replace("NS", "true")
            .replace(
                "{ name: direct, namespace: shop, vips: [10.96.0.2], ports: [{ port: 80, targetPort: 9090 }], endpoints: [server] }",
                "{ name: direct, namespace: shop, vips: [10.96.0.2], ports: [{ port: 80, targetPort: 9090 }], endpoints: [server], labels: { istio.io/use-waypoint: none } }",
            );
        let config = crate::config::parse(Path::new("t.yaml"), &text).unwrap();
        assert!(State::from_mesh(&config, "n1").policy_warnings.is_empty());
    }

    #[test]
    fn the_mesh_default_marks_what_no_label_opts_out_of() {
        // Namespace `shop` says false: only `own` (its own label) and `other/app` are marked.
        let s = state(true, "false");
        assert_eq!(decide(&s, "shop/server", 8080, CLIENT), ALLOW);
        assert_eq!(decide(&s, "shop/db", 5432, CLIENT), ALLOW);
        assert_eq!(decide(&s, "shop/misc", 80, CLIENT), ALLOW);
        assert!(decide(&s, "shop/lonely", 7000, CLIENT).contains("service shop/own"));
        assert!(decide(&s, "other/app", 80, CLIENT).contains("its waypoint shop/wp"));
        assert_eq!(decide(&s, "other/app", 80, WAYPOINT), ALLOW);
        // Everything off: nothing guarded, the labelled `own` aside.
        let s = state(false, "false");
        assert_eq!(decide(&s, "other/app", 80, CLIENT), ALLOW);
        assert!(decide(&s, "shop/lonely", 7000, None).starts_with("deny: "));
    }
}

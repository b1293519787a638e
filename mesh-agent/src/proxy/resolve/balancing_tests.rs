//! The node agent balancing a Service's connections as its DestinationRule says.
use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::path::Path;

use super::*;

/// Service `web` (VIP 10.96.0.1, ports 80 and 81, its own setting least-connections) over a, b
/// and c, clients x0..x7, and a DestinationRule for it with `policy` as its `trafficPolicy`.
fn with_rule(policy: &str, endpoints: &str) -> State {
    let clients: String = (0..8)
        .map(|i| format!("  - {{ name: x{i}, node: n1, ips: [10.0.1.{i}] }}\n"))
        .collect();
    let text = format!(
        r#"
namespaces: [{{ name: default, labels: {{ istio.io/dataplane-mode: ambient }} }}]
workloads:
  - {{ name: a, node: n1, ips: [10.0.0.1] }}
  - {{ name: b, node: n1, ips: [10.0.0.2] }}
  - {{ name: c, node: n2, ips: [10.0.0.3] }}
{clients}services:
  - name: web
    vips: [10.96.0.1]
    ports: [{{ port: 80 }}, {{ port: 81 }}]
    loadBalancing: leastConnections
    endpoints: {endpoints}
destinationRules:
  - apiVersion: networking.istio.io/v1
    kind: DestinationRule
    metadata: {{ name: web, namespace: default }}
    spec:
      host: web.default.svc.cluster.local
      trafficPolicy: {policy}
"#
    );
    State::from_mesh(
        &crate::config::parse(Path::new("t.yaml"), &text).unwrap(),
        "n1",
    )
}

/// The endpoint a connection from client `x{client}` to port `port` goes to.
fn pick(state: &State, balancer: &Balancer, client: usize, port: u16) -> String {
    let src = state.workloads[&format!("default/x{client}")].clone();
    let to = SocketAddr::new("10.96.0.1".parse().unwrap(), port);
    let route = resolve_from(state, Some(&src), to, balancer).unwrap();
    route.workload.unwrap().name.clone()
}

#[test]
fn the_rules_simple_policy_replaces_the_services_own_per_port() {
    let state = with_rule(
        "{ loadBalancer: { simple: RANDOM }, portLevelSettings: \
         [{ port: { number: 81 }, loadBalancer: { simple: LEAST_REQUEST } }] }",
        "[a, b, c]",
    );
    let web = &state.services["default/web"];
    assert_eq!(web.balancing(80), LoadBalancing::Random);
    assert_eq!(web.balancing(81), LoadBalancing::LeastRequest);
    assert!(
        state.policy_warnings.is_empty(),
        "{:?}",
        state.policy_warnings
    );

    // UNSPECIFIED, and a rule without a load balancer, leave the Service's own.
    for policy in [
        "{ loadBalancer: { simple: UNSPECIFIED } }",
        "{ connectionPool: { tcp: { maxConnections: 10 } } }",
    ] {
        let state = with_rule(policy, "[a, b, c]");
        let web = &state.services["default/web"];
        assert_eq!(
            web.balancing(80),
            LoadBalancing::LeastConnections,
            "{policy}"
        );
    }

    // ROUND_ROBIN is applied to the connections: exactly even.
    let state = with_rule("{ loadBalancer: { simple: ROUND_ROBIN } }", "[a, b, c]");
    let balancer = Balancer::default();
    let mut counts: HashMap<String, usize> = HashMap::new();
    for _ in 0..300 {
        *counts.entry(pick(&state, &balancer, 0, 80)).or_default() += 1;
    }
    assert_eq!(counts.values().copied().collect::<Vec<_>>(), [100; 3]);
}

#[test]
fn least_request_never_picks_the_busiest_of_three_and_shares_the_rest() {
    let state = with_rule("{ loadBalancer: { simple: LEAST_REQUEST } }", "[a, b, c]");
    let balancer = Balancer::default();
    let busy = state.workloads["default/a"].clone();
    let _held: Vec<ActiveGuard> = (0..5).map(|_| balancer.track(&busy)).collect();
    let mut counts: HashMap<String, usize> = HashMap::new();
    for _ in 0..600 {
        // The picks are not held: b and c stay idle, a stays busy.
        *counts.entry(pick(&state, &balancer, 0, 80)).or_default() += 1;
    }
    // Two distinct endpoints are drawn: a loses to either of the others every time.
    assert!(!counts.contains_key("a"), "{counts:?}");
    assert!(
        counts.values().all(|&n| (200..400).contains(&n)),
        "{counts:?}"
    );
}

#[test]
fn a_source_ip_hash_keeps_each_client_on_one_endpoint_and_moves_only_a_gone_ones() {
    let policy = "{ loadBalancer: { consistentHash: { useSourceIp: true } } }";
    let state = with_rule(policy, "[a, b, c]");
    assert_eq!(
        state.services["default/web"].balancing(80),
        LoadBalancing::SourceIpHash
    );
    let balancer = Balancer::default();
    let first: Vec<String> = (0..8).map(|x| pick(&state, &balancer, x, 80)).collect();
    for _ in 0..20 {
        for (x, endpoint) in first.iter().enumerate() {
            assert_eq!(&pick(&state, &balancer, x, 80), endpoint, "client x{x}");
        }
    }
    let used: HashSet<&String> = first.iter().collect();
    assert!(
        used.len() >= 2,
        "eight clients all on one endpoint: {first:?}"
    );

    // c leaves the Service: its clients move, every other client stays where it was.
    let state = with_rule(policy, "[a, b]");
    for (x, endpoint) in first.iter().enumerate() {
        let now = pick(&state, &balancer, x, 80);
        if endpoint != "c" {
            assert_eq!(
                &now, endpoint,
                "client x{x} moved although {endpoint} stayed"
            );
        }
        assert_ne!(now, "c");
    }
}

#[test]
fn a_hash_on_http_fields_is_reported_and_the_services_own_balancing_stays() {
    let state = with_rule(
        "{ loadBalancer: { consistentHash: { httpHeaderName: x-user } } }",
        "[a, b, c]",
    );
    assert_eq!(
        state.services["default/web"].balancing(80),
        LoadBalancing::LeastConnections
    );
    let warning = state
        .policy_warnings
        .iter()
        .find(|w| w.policy == "DestinationRule default/web")
        .expect("a warning about the hash");
    assert!(
        warning.message.contains("httpHeaderName")
            && warning.message.contains("port 80 of Service default/web")
            && warning.message.contains("needs a waypoint"),
        "{}",
        warning.message
    );
    // The connections still go everywhere.
    let balancer = Balancer::default();
    let picked: HashSet<String> = (0..30).map(|_| pick(&state, &balancer, 0, 80)).collect();
    assert_eq!(picked.len(), 3, "{picked:?}");
}

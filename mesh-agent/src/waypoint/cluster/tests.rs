use std::path::Path;

use super::*;

const DR: &str = r#"
destinationRules:
  - apiVersion: networking.istio.io/v1
    kind: DestinationRule
    metadata: { name: reviews, namespace: default }
    spec:
      host: reviews
      trafficPolicy:
        loadBalancer: { simple: ROUND_ROBIN }
        connectionPool:
          tcp: { maxConnections: 2, connectTimeout: 250ms }
          http: { http1MaxPendingRequests: 1, http2MaxRequests: 5, maxRequestsPerConnection: 10, maxRetries: 3, idleTimeout: 30s }
        outlierDetection: { consecutive5xxErrors: 2, interval: 1s, baseEjectionTime: 5s, maxEjectionPercent: 50 }
      subsets:
        - name: v1
          labels: { version: v1 }
        - name: v2
          labels: { version: v2 }
          trafficPolicy:
            loadBalancer:
              consistentHash: { httpHeaderName: x-user, maglev: { tableSize: 65537 } }
"#;

fn state(extra: &str) -> State {
    let text = format!(
        r#"
namespaces: [{{ name: default, labels: {{ istio.io/dataplane-mode: ambient }} }}]
workloads:
  - {{ name: r1, node: n1, ips: [10.0.0.1], netns: /run/netns/a, labels: {{ version: v1 }} }}
  - {{ name: r2, node: n1, ips: [10.0.0.2], netns: /run/netns/b, labels: {{ version: v2 }} }}
  - {{ name: r3, node: n1, ips: [10.0.0.3], netns: /run/netns/c, labels: {{ version: v2 }} }}
services:
  - {{ name: reviews, vips: [10.96.0.1], ports: [{{ port: 80, targetPort: 9080 }}], endpoints: [r1, r2, r3] }}
  - {{ name: plain, vips: [10.96.0.2], ports: [{{ port: 80 }}], endpoints: [r1] }}
{extra}"#
    );
    State::from_mesh(
        &crate::config::parse(Path::new("t.yaml"), &text).unwrap(),
        "n1",
    )
}

fn addr(s: &str) -> SocketAddr {
    s.parse().unwrap()
}

#[test]
fn a_destination_rule_sets_the_balancer_the_limits_and_outlier_detection() {
    let state = state(DR);
    let c = Cluster::of(&state, addr("10.96.0.1:80"), None)
        .unwrap()
        .unwrap();
    assert_eq!(c.name, "default/reviews:80");
    let p = &c.policy;
    assert_eq!(p.lb, LbPolicy::RoundRobin);
    assert_eq!(
        p.limits,
        Limits {
            max_connections: Some(2),
            max_pending: Some(1),
            max_requests: Some(5),
            max_requests_per_connection: Some(10),
            idle_timeout: Some(Duration::from_secs(30)),
        }
    );
    assert_eq!(p.max_retries, Some(3));
    assert_eq!(p.connect_timeout, Duration::from_millis(250));
    let o = p.outlier.unwrap();
    assert_eq!(o.consecutive_5xx, Some(2));
    assert_eq!(o.consecutive_gateway, None, "0: off");
    assert_eq!(o.base_ejection, Duration::from_secs(5));
    assert_eq!(o.max_ejection_percent, 50);
    // The subset's load balancer replaces the rule's; the rest is inherited.
    let v2 = Cluster::of(&state, addr("10.96.0.1:80"), Some("v2"))
        .unwrap()
        .unwrap();
    assert_eq!(v2.name, "default/reviews#v2:80");
    assert_eq!(
        v2.policy.lb,
        LbPolicy::Hash(HashTable::Maglev { size: 65537 })
    );
    assert_eq!(
        v2.policy.hash_key,
        Some(HashKey::HttpHeaderName("x-user".to_string()))
    );
    assert_eq!(v2.policy.limits.max_connections, Some(2));
}

#[test]
fn subsets_select_endpoints_by_label_and_unknown_ones_are_errors() {
    let state = state(DR);
    let v2 = Cluster::of(&state, addr("10.96.0.1:80"), Some("v2"))
        .unwrap()
        .unwrap();
    let eps: Vec<SocketAddr> = v2.endpoints(true).into_iter().map(|(_, a)| a).collect();
    assert_eq!(eps, [addr("10.0.0.2:9080"), addr("10.0.0.3:9080")]);
    let all = Cluster::of(&state, addr("10.96.0.1:80"), None)
        .unwrap()
        .unwrap();
    assert_eq!(all.endpoints(true).len(), 3);
    assert!(all.endpoints(false).is_empty(), "no IPv6 addresses");
    let e = Cluster::of(&state, addr("10.96.0.1:80"), Some("v9")).unwrap_err();
    assert!(
        e.contains("\"v9\"") && e.contains("does not define it"),
        "{e}"
    );
    // Without a DestinationRule: no cluster (the Service address is used), and no subsets.
    assert!(Cluster::of(&state, addr("10.96.0.2:80"), None)
        .unwrap()
        .is_none());
    let e = Cluster::of(&state, addr("10.96.0.2:80"), Some("v1")).unwrap_err();
    assert!(e.contains("no DestinationRule"), "{e}");
}

#[test]
fn istios_defaults_apply_where_the_rule_sets_nothing() {
    let state = state(
        r#"
destinationRules:
  - apiVersion: networking.istio.io/v1
    kind: DestinationRule
    metadata: { name: plain, namespace: default }
    spec: { host: plain }
"#,
    );
    let c = Cluster::of(&state, addr("10.96.0.2:80"), None)
        .unwrap()
        .unwrap();
    assert_eq!(c.policy.lb, LbPolicy::LeastRequest);
    assert_eq!(c.policy.limits, Limits::default());
    assert_eq!(c.policy.outlier, None);
    assert_eq!(c.policy.max_retries, None);
}

#[test]
fn hash_keys_come_from_headers_cookies_query_parameters_or_the_client() {
    let parts = |uri: &str, headers: &[(&str, &str)]| {
        let mut b = http::Request::builder().uri(uri);
        for (k, v) in headers {
            b = b.header(*k, *v);
        }
        b.body(()).unwrap().into_parts().0
    };
    let client: IpAddr = "10.0.0.9".parse().unwrap();
    let header = HashKey::HttpHeaderName("x-user".to_string());
    let p = parts("/", &[("x-user", "alice")]);
    assert_eq!(hash_key(&header, &p, client), Some(balance::hash(b"alice")));
    assert_eq!(hash_key(&header, &parts("/", &[]), client), None);
    let cookie: HashKey = match serde_yaml_ng::from_str::<crate::model::destination_rule::HttpCookie>(
        "{ name: session }",
    ) {
        Ok(c) => HashKey::HttpCookie(c),
        Err(e) => panic!("{e}"),
    };
    let p = parts("/", &[("cookie", "a=1; session=xyz"), ("cookie", "b=2")]);
    assert_eq!(hash_key(&cookie, &p, client), Some(balance::hash(b"xyz")));
    let query = HashKey::HttpQueryParameterName("u".to_string());
    let p = parts("/x?a=1&u=bob", &[]);
    assert_eq!(hash_key(&query, &p, client), Some(balance::hash(b"bob")));
    assert_eq!(
        hash_key(&HashKey::UseSourceIp, &parts("/", &[]), client),
        Some(balance::hash(b"10.0.0.9"))
    );
}

fn cookie_key(yaml: &str) -> HashKey {
    match serde_yaml_ng::from_str::<crate::model::destination_rule::HttpCookie>(yaml) {
        Ok(c) => HashKey::HttpCookie(c),
        Err(e) => panic!("{e}"),
    }
}

#[test]
fn a_cookie_with_a_ttl_is_generated_for_a_request_without_it_and_read_back() {
    let (client, target) = (addr("10.0.0.9:40000"), addr("10.96.0.2:80"));
    let key = cookie_key("{ name: session, path: /, ttl: 60s }");
    let (hash, header) = generated_cookie(&key, client, target).unwrap();
    let text = header.to_str().unwrap().to_string();
    let value = text
        .strip_prefix("session=\"")
        .and_then(|t| t.split_once('"'))
        .map(|(v, _)| v.to_string())
        .unwrap_or_else(|| panic!("{text}"));
    assert_eq!(value.len(), 16, "{text}");
    assert!(text.ends_with("\"; Max-Age=60; Path=/; HttpOnly"), "{text}");
    // The same connection gets the same value; another client another one.
    assert_eq!(generated_cookie(&key, client, target).unwrap().0, hash);
    assert_ne!(
        generated_cookie(&key, addr("10.0.0.9:40001"), target)
            .unwrap()
            .0,
        hash
    );
    // The client sends it back (quoted, as set): the same hash key as the request that got it.
    let sent = http::Request::builder()
        .header("cookie", format!("other=1; session=\"{value}\""))
        .body(())
        .unwrap()
        .into_parts()
        .0;
    assert_eq!(hash_key(&key, &sent, client.ip()), Some(hash));

    // A zero ttl makes a session cookie (no Max-Age); without a ttl nothing is generated.
    let session = cookie_key("{ name: s, ttl: 0s }");
    let text = generated_cookie(&session, client, target).unwrap().1;
    assert!(text.to_str().unwrap().ends_with("\"; HttpOnly"), "{text:?}");
    assert!(generated_cookie(&cookie_key("{ name: s }"), client, target).is_none());
    assert!(generated_cookie(&HashKey::UseSourceIp, client, target).is_none());
}

#[test]
fn an_empty_cookie_is_none_and_a_sub_second_ttl_makes_a_session_cookie() {
    let (client, target) = (addr("10.0.0.9:40000"), addr("10.96.0.2:80"));
    let key = cookie_key("{ name: session, ttl: 500ms }");
    let empty = http::Request::builder()
        .header("cookie", "session=")
        .body(())
        .unwrap()
        .into_parts()
        .0;
    assert_eq!(hash_key(&key, &empty, client.ip()), None);
    let quoted_empty = http::Request::builder()
        .header("cookie", "session=\"\"")
        .body(())
        .unwrap()
        .into_parts()
        .0;
    assert_eq!(hash_key(&key, &quoted_empty, client.ip()), None);
    let text = generated_cookie(&key, client, target).unwrap().1;
    assert!(!text.to_str().unwrap().contains("Max-Age"), "{text:?}");
}

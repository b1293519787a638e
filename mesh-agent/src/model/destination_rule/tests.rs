//! Reading DestinationRules (every supported field, defaults, every refusal), validation with
//! field paths, and Istio's merge rules.
use std::time::Duration;

use super::*;
use crate::model::networking::assert_contains_all;
use crate::model::FieldError;

fn dr_yaml(spec: &str) -> String {
    let spec: String = spec
        .trim_matches('\n')
        .lines()
        .map(|l| format!("  {l}\n"))
        .collect();
    format!(
        "apiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata:\n  name: dr\n  \
         namespace: shop\nspec:\n{spec}"
    )
}

fn read(spec: &str) -> DestinationRule {
    let yaml = dr_yaml(spec);
    serde_yaml_ng::from_str(&yaml).unwrap_or_else(|e| panic!("{e}\n---\n{yaml}"))
}

fn read_error(spec: &str) -> String {
    let yaml = dr_yaml(spec);
    match serde_yaml_ng::from_str::<DestinationRule>(&yaml) {
        Ok(dr) => panic!("read: {dr:?}\n---\n{yaml}"),
        Err(e) => e.to_string(),
    }
}

fn validation_error(spec: &str) -> FieldError {
    let dr = read(spec);
    match dr.validate() {
        Ok(()) => panic!("valid: {dr:?}"),
        Err(e) => e,
    }
}

fn valid(spec: &str) -> DestinationRule {
    let dr = read(spec);
    dr.validate().unwrap_or_else(|e| panic!("{e}\n---\n{spec}"));
    dr
}

/// `host: reviews` and a top-level traffic policy (indented under `trafficPolicy:`).
fn policy(body: &str) -> String {
    let body: String = body
        .trim_matches('\n')
        .lines()
        .map(|l| format!("  {l}\n"))
        .collect();
    format!("host: reviews\ntrafficPolicy:\n{body}")
}

#[test]
fn a_full_destination_rule_reads_every_supported_field() {
    let yaml = r#"
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata:
  name: reviews
  namespace: bookinfo
  creationTimestamp: "2024-05-01T12:00:00Z"
spec:
  host: reviews.bookinfo.svc.cluster.local
  exportTo: ["."]
  trafficPolicy:
    loadBalancer: {simple: LEAST_REQUEST}
    connectionPool:
      tcp: {maxConnections: 100, connectTimeout: 30ms}
      http:
        http1MaxPendingRequests: 10
        http2MaxRequests: 1000
        maxRequestsPerConnection: 1
        maxRetries: 3
        idleTimeout: 90s
    outlierDetection:
      consecutive5xxErrors: 7
      consecutiveGatewayErrors: 3
      interval: 1m
      baseEjectionTime: 15m
      maxEjectionPercent: 100
      minHealthPercent: 50
    tls: {mode: ISTIO_MUTUAL}
    portLevelSettings:
    - port: {number: 9080}
      loadBalancer: {simple: ROUND_ROBIN}
  subsets:
  - name: v1
    labels: {version: v1}
  - name: v2
    labels: {version: v2, app.kubernetes.io/name: reviews}
    trafficPolicy:
      loadBalancer:
        consistentHash:
          httpCookie: {name: user, path: /, ttl: 0s}
          maglev: {tableSize: 65537}
  - name: v3
    trafficPolicy:
      loadBalancer:
        consistentHash: {httpHeaderName: x-user, ringHash: {minimumRingSize: 2048}}
  - name: v4
    trafficPolicy:
      loadBalancer: {consistentHash: {useSourceIp: true}}
  - name: v5
    trafficPolicy:
      loadBalancer: {consistentHash: {httpQueryParameterName: user, minimumRingSize: 4096}}
  - name: v6
    trafficPolicy:
      loadBalancer: {simple: RANDOM}
  - name: v7
    trafficPolicy:
      loadBalancer: {simple: UNSPECIFIED}
  - name: v8
    trafficPolicy:
      loadBalancer: {simple: LEAST_CONN}
"#;
    let rules = parse_destination_rules(yaml).unwrap_or_else(|e| panic!("{e}"));
    let dr = &rules[0];
    assert_eq!(dr.key(), "bookinfo/reviews");
    assert_eq!(dr.service().unwrap().key(), "bookinfo/reviews");
    assert_eq!(dr.spec.export_to, ["."]);
    let top = dr.spec.traffic_policy.as_ref().unwrap();
    assert_eq!(
        top.load_balancer,
        Some(LoadBalancerSettings::Simple(SimpleLb::LeastRequest))
    );
    let pool = top.connection_pool.as_ref().unwrap();
    let tcp = pool.tcp.as_ref().unwrap();
    assert_eq!(tcp.max_connections(), 100);
    assert_eq!(tcp.connect_timeout(), Duration::from_millis(30));
    let http = pool.http.as_ref().unwrap();
    assert_eq!(http.http1_max_pending_requests(), 10);
    assert_eq!(http.http2_max_requests(), 1000);
    assert_eq!(http.max_requests_per_connection(), Some(1));
    assert_eq!(http.max_retries(), 3);
    assert_eq!(http.idle_timeout(), Duration::from_secs(90));
    let outlier = top.outlier_detection.as_ref().unwrap();
    assert_eq!(outlier.consecutive_5xx_errors, 7);
    assert_eq!(outlier.consecutive_gateway_errors, 3);
    assert_eq!(outlier.interval, Duration::from_secs(60));
    assert_eq!(outlier.base_ejection_time, Duration::from_secs(900));
    assert_eq!(outlier.max_ejection_percent, 100);
    assert_eq!(outlier.min_health_percent, 50);
    assert_eq!(top.tls, Some(ClientTlsSettings));
    assert_eq!(top.port_level(9080).unwrap().port.number, 9080);
    assert!(top.port_level(80).is_none());

    let subset = |name: &str| dr.subset(name).unwrap();
    assert_eq!(subset("v1").labels["version"], "v1");
    assert!(subset("v2").selects(
        &[
            ("version".to_string(), "v2".to_string()),
            ("app.kubernetes.io/name".to_string(), "reviews".to_string()),
            ("extra".to_string(), "x".to_string()),
        ]
        .into()
    ));
    assert!(!subset("v2").selects(&[("version".to_string(), "v2".to_string())].into()));
    let lb = |name: &str| {
        subset(name)
            .traffic_policy
            .as_ref()
            .unwrap()
            .load_balancer
            .clone()
            .unwrap()
    };
    assert_eq!(
        lb("v2"),
        LoadBalancerSettings::ConsistentHash(ConsistentHashLb {
            hash_key: HashKey::HttpCookie(HttpCookie {
                name: "user".into(),
                path: Some("/".into()),
                ttl: Some(Duration::ZERO),
                attributes: None,
            }),
            algorithm: Some(HashAlgorithm::Maglev { table_size: 65537 }),
        })
    );
    assert_eq!(
        lb("v3"),
        LoadBalancerSettings::ConsistentHash(ConsistentHashLb {
            hash_key: HashKey::HttpHeaderName("x-user".into()),
            algorithm: Some(HashAlgorithm::RingHash {
                minimum_ring_size: 2048
            }),
        })
    );
    let LoadBalancerSettings::ConsistentHash(v4) = lb("v4") else {
        panic!()
    };
    assert_eq!(v4.hash_key, HashKey::UseSourceIp);
    assert_eq!(
        v4.algorithm(),
        HashAlgorithm::RingHash {
            minimum_ring_size: DEFAULT_MINIMUM_RING_SIZE
        },
        "no algorithm: Istio's default ring hash"
    );
    assert_eq!(
        lb("v5"),
        LoadBalancerSettings::ConsistentHash(ConsistentHashLb {
            hash_key: HashKey::HttpQueryParameterName("user".into()),
            algorithm: Some(HashAlgorithm::RingHash {
                minimum_ring_size: 4096
            }),
        }),
        "the deprecated minimumRingSize is a ring hash"
    );
    assert_eq!(lb("v6"), LoadBalancerSettings::Simple(SimpleLb::Random));
    assert_eq!(
        lb("v7"),
        LoadBalancerSettings::Simple(SimpleLb::Unspecified)
    );
    assert_eq!(
        lb("v8"),
        LoadBalancerSettings::Simple(SimpleLb::LeastRequest),
        "LEAST_CONN is LEAST_REQUEST's old name"
    );
}

#[test]
fn defaults_are_istios() {
    let dr = valid(&policy(
        "outlierDetection: {}\nconnectionPool: {tcp: {}, http: {maxRequestsPerConnection: 0}}",
    ));
    let top = dr.spec.traffic_policy.as_ref().unwrap();
    let outlier = top.outlier_detection.as_ref().unwrap();
    assert_eq!(*outlier, OutlierDetection::default());
    assert_eq!(outlier.consecutive_5xx_errors, 5);
    assert_eq!(outlier.consecutive_gateway_errors, 0);
    assert_eq!(outlier.interval, Duration::from_secs(10));
    assert_eq!(outlier.base_ejection_time, Duration::from_secs(30));
    assert_eq!(outlier.max_ejection_percent, 10);
    assert_eq!(outlier.min_health_percent, 0);
    let pool = top.connection_pool.as_ref().unwrap();
    let tcp = pool.tcp.as_ref().unwrap();
    assert_eq!(tcp.max_connections(), UNLIMITED);
    assert_eq!(tcp.connect_timeout(), Duration::from_secs(10));
    let http = pool.http.as_ref().unwrap();
    assert_eq!(http.http1_max_pending_requests(), UNLIMITED);
    assert_eq!(http.http2_max_requests(), UNLIMITED);
    assert_eq!(http.max_requests_per_connection(), None);
    assert_eq!(http.max_retries(), UNLIMITED);
    assert_eq!(http.idle_timeout(), Duration::from_secs(3600));
    assert_eq!(HttpSettings::default().max_retries(), UNLIMITED);
}

#[test]
fn unsupported_fields_are_refused_by_name_and_path() {
    let cases: &[(&str, String, &[&str])] = &[
        (
            "workloadSelector",
            "host: a\nworkloadSelector: {matchLabels: {app: a}}\n".into(),
            &["spec.workloadSelector: `workloadSelector` is not supported"],
        ),
        (
            "tunnel",
            policy("tunnel: {targetHost: a, targetPort: 1}"),
            &["`tunnel` is not supported"],
        ),
        (
            "proxyProtocol",
            policy("proxyProtocol: {version: V1}"),
            &["spec.trafficPolicy.proxyProtocol: `proxyProtocol` is not supported"],
        ),
        (
            "retryBudget",
            policy("retryBudget: {percent: 5}"),
            &["`retryBudget` is not supported"],
        ),
        (
            "localityLbSetting",
            policy("loadBalancer: {simple: RANDOM, localityLbSetting: {enabled: true}}"),
            &[
                "spec.trafficPolicy.loadBalancer.localityLbSetting: `localityLbSetting` is not supported",
            ],
        ),
        (
            "zoneAwareLbSetting",
            policy("loadBalancer: {zoneAwareLbSetting: {enabled: true}}"),
            &["`zoneAwareLbSetting` is not supported"],
        ),
        (
            "warmup",
            policy("loadBalancer: {simple: RANDOM, warmup: {duration: 10s}}"),
            &["`warmup` is not supported"],
        ),
        (
            "warmupDurationSecs",
            policy("loadBalancer: {simple: RANDOM, warmupDurationSecs: 10s}"),
            &["`warmupDurationSecs` is not supported"],
        ),
        (
            "backendUtilization",
            policy("loadBalancer: {backendUtilization: {}}"),
            &["`backendUtilization` is not supported"],
        ),
        (
            "PASSTHROUGH",
            policy("loadBalancer: {simple: PASSTHROUGH}"),
            &[
                "spec.trafficPolicy.loadBalancer.simple",
                "PASSTHROUGH is not supported",
            ],
        ),
        (
            "unknown simple",
            policy("loadBalancer: {simple: FASTEST}"),
            &["unknown load balancer \"FASTEST\""],
        ),
        (
            "cookie attributes",
            policy(
                "loadBalancer: {consistentHash: {httpCookie: {name: c, attributes: [{name: a}]}}}",
            ),
            &[
                "spec.trafficPolicy.loadBalancer.consistentHash.httpCookie",
                "`attributes` is not supported",
            ],
        ),
        (
            "tcpKeepalive",
            policy("connectionPool: {tcp: {tcpKeepalive: {time: 1s}}}"),
            &[
                "spec.trafficPolicy.connectionPool.tcp.tcpKeepalive: `tcpKeepalive` is not supported",
                "HBONE",
            ],
        ),
        (
            "maxConnectionDuration",
            policy("connectionPool: {tcp: {maxConnectionDuration: 1h}}"),
            &["`maxConnectionDuration` is not supported"],
        ),
        (
            "tcp idleTimeout",
            policy("connectionPool: {tcp: {idleTimeout: 1h}}"),
            &["`idleTimeout` is not supported"],
        ),
        (
            "h2UpgradePolicy",
            policy("connectionPool: {http: {h2UpgradePolicy: UPGRADE}}"),
            &[
                "spec.trafficPolicy.connectionPool.http.h2UpgradePolicy: `h2UpgradePolicy` is not supported",
            ],
        ),
        (
            "useClientProtocol",
            policy("connectionPool: {http: {useClientProtocol: true}}"),
            &["`useClientProtocol` is not supported"],
        ),
        (
            "maxConcurrentStreams",
            policy("connectionPool: {http: {maxConcurrentStreams: 5}}"),
            &["`maxConcurrentStreams` is not supported"],
        ),
        (
            "http2KeepAlive",
            policy("connectionPool: {http: {http2KeepAlive: {interval: 1s, timeout: 1s}}}"),
            &["`http2KeepAlive` is not supported"],
        ),
        (
            "consecutiveErrors",
            policy("outlierDetection: {consecutiveErrors: 5}"),
            &[
                "spec.trafficPolicy.outlierDetection.consecutiveErrors: `consecutiveErrors` is not supported",
                "deprecated",
            ],
        ),
        (
            "consecutiveLocalOriginFailures",
            policy("outlierDetection: {consecutiveLocalOriginFailures: 5}"),
            &["`consecutiveLocalOriginFailures` is not supported"],
        ),
        (
            "splitExternalLocalOriginErrors",
            policy("outlierDetection: {splitExternalLocalOriginErrors: true}"),
            &["`splitExternalLocalOriginErrors` is not supported"],
        ),
        (
            "outlierDetectionHttpErrorCodes",
            policy("outlierDetection: {outlierDetectionHttpErrorCodes: [500]}"),
            &["`outlierDetectionHttpErrorCodes` is not supported"],
        ),
        (
            "tls SIMPLE",
            policy("tls: {mode: SIMPLE}"),
            &[
                "spec.trafficPolicy.tls",
                "`mode: SIMPLE` is not supported",
                "ISTIO_MUTUAL",
            ],
        ),
        (
            "tls DISABLE",
            policy("tls: {mode: DISABLE}"),
            &["`mode: DISABLE` is not supported"],
        ),
        (
            "tls MUTUAL",
            policy("tls: {mode: MUTUAL}"),
            &["`mode: MUTUAL` is not supported"],
        ),
        (
            "tls sni",
            policy("tls: {mode: ISTIO_MUTUAL, sni: a.example.com}"),
            &["`sni` is not supported"],
        ),
        (
            "tls credentialName",
            policy("tls: {mode: ISTIO_MUTUAL, credentialName: c}"),
            &["`credentialName` is not supported"],
        ),
        (
            "subset tls",
            "host: a\nsubsets:\n- name: v1\n  trafficPolicy: {tls: {mode: MUTUAL}}\n".into(),
            &[
                "spec.subsets[0].trafficPolicy.tls",
                "`mode: MUTUAL` is not supported",
            ],
        ),
        (
            "port-level tls",
            policy("portLevelSettings: [{port: {number: 80}, tls: {mode: SIMPLE}}]"),
            &[
                "spec.trafficPolicy.portLevelSettings[0].tls",
                "`mode: SIMPLE`",
            ],
        ),
        (
            "unknown field",
            policy("loadBalancer: {simple: RANDOM}\ncolour: red"),
            &["spec.trafficPolicy", "unknown field `colour`"],
        ),
    ];
    for (case, spec, parts) in cases {
        assert_contains_all(&read_error(spec), parts, case);
    }
}

#[test]
fn tls_settings_beside_istio_mutual_are_refused_by_name() {
    for (field, value) in [
        ("clientCertificate", "/c.pem"),
        ("privateKey", "/k.pem"),
        ("caCertificates", "/ca.pem"),
        ("credentialName", "c"),
        ("subjectAltNames", "[a]"),
        ("sni", "a.example.com"),
        ("insecureSkipVerify", "true"),
        ("caCrl", "/crl.pem"),
    ] {
        let e = read_error(&policy(&format!(
            "tls: {{mode: ISTIO_MUTUAL, {field}: {value}}}"
        )));
        assert_contains_all(
            &e,
            &[
                "spec.trafficPolicy.tls",
                &format!("`{field}` is not supported"),
                "the mesh's own certificates",
            ],
            field,
        );
    }
}

#[test]
fn values_are_checked_while_reading() {
    let cases: &[(&str, String, &[&str])] = &[
        (
            "empty load balancer",
            policy("loadBalancer: {}"),
            &["spec.trafficPolicy.loadBalancer", "set `simple` or `consistentHash`"],
        ),
        (
            "simple and hash",
            policy("loadBalancer: {simple: RANDOM, consistentHash: {useSourceIp: true}}"),
            &["set only one of `simple` and `consistentHash`"],
        ),
        (
            "no hash key",
            policy("loadBalancer: {consistentHash: {ringHash: {}}}"),
            &["spec.trafficPolicy.loadBalancer.consistentHash", "set what to hash"],
        ),
        (
            "two hash keys",
            policy("loadBalancer: {consistentHash: {httpHeaderName: a, useSourceIp: true}}"),
            &["set only one hash key (httpHeaderName and useSourceIp are set)"],
        ),
        (
            "useSourceIp false",
            policy("loadBalancer: {consistentHash: {useSourceIp: false}}"),
            &["`useSourceIp: false` hashes nothing"],
        ),
        (
            "ring and maglev",
            policy("loadBalancer: {consistentHash: {useSourceIp: true, ringHash: {}, maglev: {tableSize: 7}}}"),
            &["set only one of `ringHash` and `maglev`"],
        ),
        (
            "deprecated ring size and maglev",
            policy("loadBalancer: {consistentHash: {useSourceIp: true, minimumRingSize: 5, maglev: {tableSize: 7}}}"),
            &["`minimumRingSize` (deprecated)"],
        ),
        (
            "cookie without name",
            policy("loadBalancer: {consistentHash: {httpCookie: {path: /}}}"),
            &["missing field `name`"],
        ),
        (
            "duration",
            policy("outlierDetection: {interval: 10}"),
            &["spec.trafficPolicy.outlierDetection.interval", "lacks its unit"],
        ),
        (
            "zero connect timeout",
            policy("connectionPool: {tcp: {connectTimeout: 0s}}"),
            &["spec.trafficPolicy.connectionPool.tcp.connectTimeout", "below the minimum duration"],
        ),
        (
            "negative max connections",
            policy("connectionPool: {tcp: {maxConnections: -1}}"),
            &["spec.trafficPolicy.connectionPool.tcp.maxConnections", "expected u32"],
        ),
        (
            "tls mode unknown",
            policy("tls: {mode: SOMETIMES}"),
            &["unknown TLS mode \"SOMETIMES\""],
        ),
        (
            "subset without name",
            "host: a\nsubsets: [{labels: {a: b}}]\n".into(),
            &["spec.subsets[0]", "missing field `name`"],
        ),
    ];
    for (case, spec, parts) in cases {
        assert_contains_all(&read_error(spec), parts, case);
    }
}

#[test]
fn validation_names_the_field() {
    let cases: &[(&str, String, &str, &str)] = &[
        ("wildcard host", "host: '*.shop.svc.cluster.local'\n".into(), "spec.host", "wildcard host"),
        ("external host", "host: example.com\n".into(), "spec.host", "ServiceEntry hosts"),
        ("exportTo", "host: a\nexportTo: ['~']\n".into(), "spec.exportTo[0]", "\"~\" is not supported"),
        (
            "empty policy",
            "host: a\ntrafficPolicy: {}\n".into(),
            "spec.trafficPolicy",
            "at least one field",
        ),
        (
            "subset name",
            "host: a\nsubsets: [{name: V1}]\n".into(),
            "spec.subsets[0].name",
            "not a valid subset name",
        ),
        (
            "subset twice",
            "host: a\nsubsets: [{name: v1}, {name: v1}]\n".into(),
            "spec.subsets[1].name",
            "defined twice",
        ),
        (
            "subset label",
            "host: a\nsubsets: [{name: v1, labels: {'-bad': x}}]\n".into(),
            "spec.subsets[0].labels.-bad",
            "not a valid label name",
        ),
        (
            "subset label value",
            "host: a\nsubsets: [{name: v1, labels: {version: 'v 1'}}]\n".into(),
            "spec.subsets[0].labels.version",
            "not a valid label value",
        ),
        (
            "empty pool",
            policy("connectionPool: {}"),
            "spec.trafficPolicy.connectionPool",
            "must set `tcp` or `http`",
        ),
        (
            "pool limit",
            policy("connectionPool: {http: {maxRetries: 3000000000}}"),
            "spec.trafficPolicy.connectionPool.http.maxRetries",
            "above the maximum",
        ),
        (
            "maxEjectionPercent",
            policy("outlierDetection: {maxEjectionPercent: 101}"),
            "spec.trafficPolicy.outlierDetection.maxEjectionPercent",
            "101 is not a percentage",
        ),
        (
            "minHealthPercent",
            "host: a\nsubsets:\n- name: v1\n  trafficPolicy: {outlierDetection: {minHealthPercent: 200}}\n".into(),
            "spec.subsets[0].trafficPolicy.outlierDetection.minHealthPercent",
            "200 is not a percentage",
        ),
        (
            "maglev not prime",
            policy("loadBalancer: {consistentHash: {useSourceIp: true, maglev: {tableSize: 65536}}}"),
            "spec.trafficPolicy.loadBalancer.consistentHash.maglev.tableSize",
            "not a prime",
        ),
        (
            "ring too big",
            policy("loadBalancer: {consistentHash: {useSourceIp: true, ringHash: {minimumRingSize: 18446744073709551615}}}"),
            "spec.trafficPolicy.loadBalancer.consistentHash.ringHash.minimumRingSize",
            "Envoy's largest ring",
        ),
        (
            "maglev too big",
            policy("loadBalancer: {consistentHash: {useSourceIp: true, maglev: {tableSize: 5000011}}}"),
            "spec.trafficPolicy.loadBalancer.consistentHash.maglev.tableSize",
            "must be less than 5000011",
        ),
        (
            "maglev unset",
            policy("loadBalancer: {consistentHash: {useSourceIp: true, maglev: {}}}"),
            "spec.trafficPolicy.loadBalancer.consistentHash.maglev.tableSize",
            "must be set",
        ),
        (
            "hash header",
            policy("loadBalancer: {consistentHash: {httpHeaderName: 'a b'}}"),
            "spec.trafficPolicy.loadBalancer.consistentHash.httpHeaderName",
            "not a valid header name",
        ),
        (
            "cookie path",
            policy("loadBalancer: {consistentHash: {httpCookie: {name: c, path: x}}}"),
            "spec.trafficPolicy.loadBalancer.consistentHash.httpCookie.path",
            "absolute path",
        ),
        (
            "cookie path attribute",
            policy("loadBalancer: {consistentHash: {httpCookie: {name: c, path: '/; Domain=x'}}}"),
            "spec.trafficPolicy.loadBalancer.consistentHash.httpCookie.path",
            "must not contain ';'",
        ),
        (
            "port-level port",
            policy("portLevelSettings: [{port: {number: 0}, loadBalancer: {simple: RANDOM}}]"),
            "spec.trafficPolicy.portLevelSettings[0].port.number",
            "0 is not a port",
        ),
        (
            "port-level twice",
            policy(
                "portLevelSettings:\n- {port: {number: 80}, loadBalancer: {simple: RANDOM}}\n- \
                 {port: {number: 80}, tls: {mode: ISTIO_MUTUAL}}",
            ),
            "spec.trafficPolicy.portLevelSettings[1].port.number",
            "port 80 has settings twice",
        ),
        (
            "port-level empty",
            policy("portLevelSettings: [{port: {number: 80}}]"),
            "spec.trafficPolicy.portLevelSettings[0]",
            "at least one of",
        ),
        (
            "port-level outlier",
            policy("portLevelSettings: [{port: {number: 80}, outlierDetection: {maxEjectionPercent: 101}}]"),
            "spec.trafficPolicy.portLevelSettings[0].outlierDetection.maxEjectionPercent",
            "101",
        ),
    ];
    for (case, spec, field, message) in cases {
        let e = validation_error(spec);
        assert_eq!(e.field, *field, "{case}: {e}");
        assert!(e.message.contains(message), "{case}: {e}");
    }
}

fn lb(simple: SimpleLb) -> Option<LoadBalancerSettings> {
    Some(LoadBalancerSettings::Simple(simple))
}

#[test]
fn the_effective_policy_follows_istios_merge_rules() {
    let dr = valid(
        r#"
host: reviews
trafficPolicy:
  loadBalancer: {simple: ROUND_ROBIN}
  connectionPool: {tcp: {maxConnections: 10}}
  outlierDetection: {consecutive5xxErrors: 1}
  portLevelSettings:
  - port: {number: 8080}
    loadBalancer: {simple: RANDOM}
subsets:
- name: plain
- name: lb
  trafficPolicy:
    loadBalancer: {simple: LEAST_REQUEST}
- name: ported
  trafficPolicy:
    tls: {mode: ISTIO_MUTUAL}
    portLevelSettings:
    - port: {number: 9090}
      connectionPool: {http: {maxRetries: 1}}
"#,
    );
    let pool10 = Some(ConnectionPoolSettings {
        tcp: Some(TcpSettings {
            max_connections: Some(10),
            ..TcpSettings::default()
        }),
        http: None,
    });
    let outlier1 = Some(OutlierDetection {
        consecutive_5xx_errors: 1,
        ..OutlierDetection::default()
    });
    // The whole Service, no port: the top-level settings.
    let top = dr.effective_policy(None, None);
    assert_eq!(top.load_balancer, lb(SimpleLb::RoundRobin));
    assert_eq!(top.connection_pool, pool10);
    assert_eq!(top.outlier_detection, outlier1);
    assert_eq!(top.tls, None);
    // A port with its own settings: they replace all four, inheriting nothing.
    let port = dr.effective_policy(None, Some(8080));
    assert_eq!(
        port,
        EffectivePolicy {
            load_balancer: lb(SimpleLb::Random),
            ..EffectivePolicy::default()
        }
    );
    // Another port: the top-level settings.
    assert_eq!(dr.effective_policy(None, Some(80)), top);
    // A subset without a policy, and a subset the rule does not define: the rule's.
    assert_eq!(dr.effective_policy(Some("plain"), None), top);
    assert_eq!(dr.effective_policy(Some("nope"), Some(8080)), port);
    // A subset's setting replaces the rule's; the others stay.
    let subset = dr.effective_policy(Some("lb"), None);
    assert_eq!(subset.load_balancer, lb(SimpleLb::LeastRequest));
    assert_eq!(subset.connection_pool, pool10);
    assert_eq!(subset.outlier_detection, outlier1);
    // ... also over the rule's port-level settings.
    let subset_port = dr.effective_policy(Some("lb"), Some(8080));
    assert_eq!(subset_port.load_balancer, lb(SimpleLb::LeastRequest));
    assert_eq!(subset_port.connection_pool, None);
    // A subset's port-level entry replaces everything for that port.
    let ported = dr.effective_policy(Some("ported"), Some(9090));
    assert_eq!(
        ported,
        EffectivePolicy {
            connection_pool: Some(ConnectionPoolSettings {
                tcp: None,
                http: Some(HttpSettings {
                    max_retries: Some(1),
                    ..HttpSettings::default()
                }),
            }),
            ..EffectivePolicy::default()
        }
    );
    // ... and on other ports its top-level settings override the rule's.
    let ported_other = dr.effective_policy(Some("ported"), Some(80));
    assert_eq!(ported_other.tls, Some(ClientTlsSettings));
    assert_eq!(ported_other.load_balancer, lb(SimpleLb::RoundRobin));
}

fn rule(name: &str, created: Option<&str>, body: &str) -> DestinationRule {
    let mut dr = valid(body);
    dr.metadata.name = name.into();
    dr.metadata.creation_timestamp = created.map(str::to_string);
    dr
}

#[test]
fn several_rules_for_one_host_merge_oldest_first() {
    let newer = rule(
        "newer",
        Some("2024-06-01T00:00:00Z"),
        "host: reviews\nsubsets: [{name: v1, labels: {version: new}}, {name: v3}]\n\
         trafficPolicy: {loadBalancer: {simple: RANDOM}}\n",
    );
    let older = rule(
        "older",
        Some("2024-05-01T00:00:00Z"),
        "host: reviews\nsubsets: [{name: v1, labels: {version: old}}, {name: v2}]\n",
    );
    let from_file = rule(
        "file",
        None,
        "host: reviews\ntrafficPolicy: {loadBalancer: {simple: ROUND_ROBIN}}\n",
    );
    let merged = merge_for_host([&newer, &from_file, &older]).unwrap();
    assert_eq!(merged.key(), "shop/older", "the oldest is the base");
    let names: Vec<&str> = merged
        .spec
        .subsets
        .iter()
        .map(|s| s.name.as_str())
        .collect();
    assert_eq!(names, ["v1", "v2", "v3"]);
    assert_eq!(
        merged.subset("v1").unwrap().labels["version"],
        "old",
        "a later duplicate subset is dropped"
    );
    assert_eq!(
        merged.spec.traffic_policy.unwrap().load_balancer,
        lb(SimpleLb::Random),
        "the oldest rule with a top-level policy gives it"
    );
    assert!(merge_for_host([]).is_none());
    // Equal timestamps: by namespace/name.
    let a = rule("a", None, "host: reviews\nsubsets: [{name: x}]\n");
    let b = rule("b", None, "host: reviews\nsubsets: [{name: y}]\n");
    assert_eq!(merge_for_host([&b, &a]).unwrap().key(), "shop/a");
}

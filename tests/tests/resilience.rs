//! End to end: a waypoint applying Istio `DestinationRule`s (and `VirtualService`s) to a Service
//! with two endpoints: circuit breaking, outlier detection, consistent hashing and subsets.
//! Two nodes, one agent each, real eBPF and TLS, a real waypoint process in its own pod, and
//! HTTP test servers that misbehave on demand. Needs root.
use std::collections::BTreeMap;
use std::time::Duration;

use anyhow::Result;
use mesh_tests::agent::{
    eventually, metric_sum, render_config, write_config, Agent, Waypoint, WorkloadSpec,
};
use mesh_tests::{Proc, Topology};

const T: Duration = Duration::from_secs(15);
const HTTP_PORT: u16 = 8080;
/// Service `reviews` (endpoints `server` = version v1, `server-b` = version v2).
const REVIEWS: &str = "http://10.96.0.40:80";

const SERVICES: &str = "services:
  - name: reviews
    vips: [10.96.0.40]
    ports: [{ port: 80, targetPort: 8080 }]
    endpoints: [server, server-b]
    labels: { istio.io/use-waypoint: wp }
gateways:
  - apiVersion: gateway.networking.k8s.io/v1
    kind: Gateway
    metadata: { name: wp, namespace: default }
    spec: { gatewayClassName: istio-waypoint }
";

struct Mesh {
    // Field order is drop order: processes die before the topology is torn down.
    waypoint: Waypoint,
    _agents: Vec<Agent>,
    servers: BTreeMap<&'static str, Proc>,
    topo: Topology,
}

/// node1: client and the waypoint's pod; node2: `server` (label version v1) and `server-b`
/// (v2), each with an HTTP server on 8080 named after its version. `extra` is appended to the
/// config.
fn setup(extra: &str) -> Result<Mesh> {
    let topo = Topology::new(&[
        ("node1", &["client", "wp-1"]),
        ("node2", &["server", "server-b"]),
    ])?;
    let config = topo.work_dir().join("mesh.yaml");
    let specs = [
        WorkloadSpec::mesh("client"),
        WorkloadSpec::mesh("server").label("version", "v1"),
        WorkloadSpec::mesh("server-b").label("version", "v2"),
        WorkloadSpec::mesh("wp-1")
            .label("gateway.networking.k8s.io/gateway-name", "wp")
            .service_account("wp"),
    ];
    write_config(
        &config,
        &format!("{}{SERVICES}{extra}", render_config(&topo, &specs)),
    )?;
    let mut servers = BTreeMap::new();
    servers.insert("server", http_server(&topo, "server", "v1", &[])?);
    servers.insert("server-b", http_server(&topo, "server-b", "v2", &[])?);
    let agents = vec![
        Agent::start(&topo, "node1", &config)?,
        Agent::start(&topo, "node2", &config)?,
    ];
    let waypoint = Waypoint::start(&topo, "wp-1", "wp", &config)?;
    Ok(Mesh {
        waypoint,
        _agents: agents,
        servers,
        topo,
    })
}

/// `mesh-testapp http-server` in `pod` on 8080, answering as `name`, logging each request.
fn http_server(topo: &Topology, pod: &str, name: &str, extra: &[&str]) -> Result<Proc> {
    let mut cmd = std::process::Command::new(mesh_tests::testapp_bin());
    cmd.args([
        "http-server",
        "--name",
        name,
        "--workers",
        "1",
        "--log-requests",
    ])
    .args(["--listen", &format!("0.0.0.0:{HTTP_PORT}")])
    .args(extra);
    let p = topo.spawn_in_pod(pod, cmd)?;
    p.wait_for_line(|l| l.contains("\"listening\""), T)?;
    Ok(p)
}

/// `mesh-testapp http-client` in the client pod; its JSON summary.
fn http_client(topo: &Topology, args: &[&str]) -> Result<serde_json::Value> {
    let bin = mesh_tests::testapp_bin();
    let mut all = vec![bin.to_str().expect("path"), "http-client", "--workers", "1"];
    all.extend_from_slice(args);
    let out = topo.run_in_pod("client", &all)?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    Ok(serde_json::from_str(
        stdout.lines().last().unwrap_or_default(),
    )?)
}

fn count(v: &serde_json::Value, field: &str, key: &str) -> u64 {
    v[field][key].as_u64().unwrap_or(0)
}

fn destination_rule(spec: &str) -> String {
    format!(
        "destinationRules:
  - apiVersion: networking.istio.io/v1
    kind: DestinationRule
    metadata: {{ name: reviews, namespace: default }}
    spec:
      host: reviews
{spec}"
    )
}

#[test]
fn the_circuit_breaker_rejects_exactly_past_its_limits() -> Result<()> {
    // One connection, one request waiting for it: of five concurrent slow requests, two are
    // served and three fail at once with 503 UO.
    let m = setup(&destination_rule(
        "      trafficPolicy:
        loadBalancer: { simple: ROUND_ROBIN }
        connectionPool:
          tcp: { maxConnections: 1 }
          http: { http1MaxPendingRequests: 1 }
",
    ))?;
    let r = http_client(
        &m.topo,
        &[
            "--url",
            &format!("{REVIEWS}/slow"),
            "--requests",
            "5",
            "--concurrency",
            "5",
            "--header",
            "x-delay-ms: 600",
        ],
    )?;
    assert_eq!(count(&r, "status", "200"), 2, "{r}");
    assert_eq!(count(&r, "status", "503"), 3, "{r}");
    m.waypoint
        .wait_access_log("\"GET /slow HTTP/1.1\" 503 UO ", T)?;
    let text = m.waypoint.metrics(&m.topo)?;
    assert_eq!(
        metric_sum(
            &text,
            "istio_requests_total",
            &[("response_code", "503"), ("response_flags", "UO")]
        ),
        3.0,
        "{text}"
    );
    // The per-endpoint gauges: one connection open at most, no request left in flight.
    let service = [("destination_service", "reviews.default.svc.cluster.local")];
    let mut text = String::new();
    let settled = eventually(T, || {
        text = m.waypoint.metrics(&m.topo).unwrap_or_default();
        metric_sum(&text, "mesh_upstream_connections", &service) == 1.0
            && metric_sum(&text, "mesh_upstream_requests_active", &service) == 0.0
    });
    assert!(settled, "{text}");
    Ok(())
}

#[test]
fn http2_max_requests_caps_the_requests_in_flight() -> Result<()> {
    let m = setup(&destination_rule(
        "      trafficPolicy:
        connectionPool:
          http: { http2MaxRequests: 2 }
",
    ))?;
    let r = http_client(
        &m.topo,
        &[
            "--url",
            &format!("{REVIEWS}/slow"),
            "--requests",
            "6",
            "--concurrency",
            "6",
            "--header",
            "x-delay-ms: 600",
        ],
    )?;
    assert_eq!(count(&r, "status", "200"), 2, "{r}");
    assert_eq!(count(&r, "status", "503"), 4, "{r}");
    Ok(())
}

#[test]
fn outlier_detection_ejects_a_failing_endpoint_and_lets_it_back() -> Result<()> {
    let mut m = setup(&destination_rule(
        "      trafficPolicy:
        loadBalancer: { simple: ROUND_ROBIN }
        outlierDetection:
          consecutive5xxErrors: 3
          interval: 1s
          baseEjectionTime: 3s
          maxEjectionPercent: 100
",
    ))?;
    // server-b answers 503 to everything.
    drop(m.servers.remove("server-b"));
    let failing = http_server(&m.topo, "server-b", "v2", &["--fail-percent", "100"])?;
    let r = http_client(
        &m.topo,
        &["--url", &format!("{REVIEWS}/o"), "--requests", "30"],
    )?;
    // Round robin: v2's first three answers are 503; then it is ejected and v1 takes the rest.
    assert_eq!(count(&r, "status", "503"), 3, "{r}");
    assert_eq!(count(&r, "status", "200"), 27, "{r}");
    let ejected = m
        .waypoint
        .proc
        .stderr_lines()
        .iter()
        .any(|l| l.contains("ejected by outlier detection"));
    assert!(ejected, "{:?}", m.waypoint.proc.stderr_lines());
    // server-b recovers; after the ejection time it gets its share again.
    drop(failing);
    m.servers
        .insert("server-b", http_server(&m.topo, "server-b", "v2", &[])?);
    std::thread::sleep(Duration::from_millis(3200));
    let r = http_client(
        &m.topo,
        &["--url", &format!("{REVIEWS}/o"), "--requests", "10"],
    )?;
    assert_eq!(count(&r, "status", "200"), 10, "{r}");
    assert_eq!(count(&r, "served_by", "v2"), 5, "{r}");
    Ok(())
}

#[test]
fn a_consistent_hash_keeps_a_header_value_on_one_endpoint() -> Result<()> {
    let m = setup(&destination_rule(
        "      trafficPolicy:
        loadBalancer:
          consistentHash: { httpHeaderName: x-user }
",
    ))?;
    for user in ["alice", "bob", "carol"] {
        let r = http_client(
            &m.topo,
            &[
                "--url",
                &format!("{REVIEWS}/h"),
                "--requests",
                "20",
                "--header",
                &format!("x-user: {user}"),
            ],
        )?;
        let v1 = count(&r, "served_by", "v1");
        let v2 = count(&r, "served_by", "v2");
        assert!(
            (v1, v2) == (20, 0) || (v1, v2) == (0, 20),
            "{user}: one endpoint for all: {r}"
        );
    }
    // Many users spread over both endpoints.
    let mut seen = BTreeMap::new();
    for i in 0..16 {
        let r = http_client(
            &m.topo,
            &[
                "--url",
                &format!("{REVIEWS}/h"),
                "--requests",
                "1",
                "--header",
                &format!("x-user: user-{i}"),
            ],
        )?;
        for v in ["v1", "v2"] {
            *seen.entry(v).or_insert(0) += count(&r, "served_by", v);
        }
    }
    assert!(seen["v1"] > 0 && seen["v2"] > 0, "{seen:?}");
    Ok(())
}

#[test]
fn a_retry_goes_to_another_endpoint_than_the_try_before() -> Result<()> {
    // Random balancing over two endpoints, one retry on 5xx, server-b failing everything: a
    // retry that could land on server-b again would fail about a quarter of the requests.
    let mut m = setup(&format!(
        "{}virtualServices:
  - apiVersion: networking.istio.io/v1
    kind: VirtualService
    metadata: {{ name: reviews, namespace: default }}
    spec:
      hosts: [reviews]
      http:
      - retries: {{ attempts: 1, retryOn: 5xx }}
        route: [{{ destination: {{ host: reviews }} }}]
",
        destination_rule(
            "      trafficPolicy:
        loadBalancer: { simple: RANDOM }
"
        )
    ))?;
    drop(m.servers.remove("server-b"));
    let _failing = http_server(&m.topo, "server-b", "v2", &["--fail-percent", "100"])?;
    let r = http_client(
        &m.topo,
        &["--url", &format!("{REVIEWS}/p"), "--requests", "60"],
    )?;
    assert_eq!(count(&r, "status", "200"), 60, "{r}");
    assert_eq!(count(&r, "served_by", "v1"), 60, "{r}");
    Ok(())
}

#[test]
fn a_generated_session_cookie_keeps_the_client_on_one_endpoint() -> Result<()> {
    let m = setup(&destination_rule(
        "      trafficPolicy:
        loadBalancer:
          consistentHash: { httpCookie: { name: session, path: /, ttl: 60s } }
",
    ))?;
    // No cookie yet: the waypoint picks by one it makes up and hands it out.
    let r = http_client(
        &m.topo,
        &["--url", &format!("{REVIEWS}/c"), "--requests", "1"],
    )?;
    let set = r["first"]["headers"]["set-cookie"]
        .as_str()
        .unwrap_or_else(|| panic!("no set-cookie: {r}"))
        .to_string();
    assert!(
        set.starts_with("session=\"") && set.ends_with("\"; Max-Age=60; Path=/; HttpOnly"),
        "{set}"
    );
    let first = ["v1", "v2"]
        .into_iter()
        .find(|v| count(&r, "served_by", v) == 1)
        .expect("served");
    let cookie = set.split(';').next().expect("name=value").to_string();
    // Sent back, it keeps every request on that endpoint, and no new cookie is set.
    let r = http_client(
        &m.topo,
        &[
            "--url",
            &format!("{REVIEWS}/c"),
            "--requests",
            "20",
            "--header",
            &format!("cookie: {cookie}"),
        ],
    )?;
    assert_eq!(count(&r, "served_by", first), 20, "{cookie}: {r}");
    assert!(r["first"]["headers"]["set-cookie"].is_null(), "{r}");
    // Other sessions spread over both endpoints.
    let mut seen = BTreeMap::new();
    for i in 0..16 {
        let r = http_client(
            &m.topo,
            &[
                "--url",
                &format!("{REVIEWS}/c"),
                "--header",
                &format!("cookie: session=\"s{i}\""),
            ],
        )?;
        for v in ["v1", "v2"] {
            *seen.entry(v).or_insert(0) += count(&r, "served_by", v);
        }
    }
    assert!(seen["v1"] > 0 && seen["v2"] > 0, "{seen:?}");
    Ok(())
}

/// The canary as operators write it (DestinationRule subsets by version, a VirtualService
/// splitting 90/10), with rules for faults, a timeout and retries in front of it.
const CANARY: &str = "destinationRules:
  - apiVersion: networking.istio.io/v1
    kind: DestinationRule
    metadata: { name: reviews, namespace: default }
    spec:
      host: reviews
      subsets:
      - name: v1
        labels:
          version: v1
      - name: v2
        labels:
          version: v2
virtualServices:
  - apiVersion: networking.istio.io/v1
    kind: VirtualService
    metadata: { name: reviews, namespace: default }
    spec:
      hosts:
      - reviews
      http:
      - match: [{ uri: { prefix: /fault } }]
        fault:
          delay: { percentage: { value: 30 }, fixedDelay: 100ms }
          abort: { percentage: { value: 20 }, httpStatus: 418 }
        route: [{ destination: { host: reviews, subset: v1 } }]
      - match: [{ uri: { prefix: /slow } }]
        timeout: 300ms
        route: [{ destination: { host: reviews, subset: v1 } }]
      - match: [{ uri: { prefix: /flaky } }]
        retries: { attempts: 8, retryOn: 5xx }
        route: [{ destination: { host: reviews, subset: v2 } }]
      - route:
        - destination:
            host: reviews
            subset: v1
          weight: 90
        - destination:
            host: reviews
            subset: v2
          weight: 10
";

#[test]
fn the_canary_virtual_service_splits_90_10_over_its_subsets() -> Result<()> {
    let m = setup(CANARY)?;
    let r = http_client(
        &m.topo,
        &[
            "--url",
            &format!("{REVIEWS}/reviews"),
            "--requests",
            "2000",
            "--concurrency",
            "4",
        ],
    )?;
    assert_eq!(count(&r, "status", "200"), 2000, "{r}");
    let (v1, v2) = (count(&r, "served_by", "v1"), count(&r, "served_by", "v2"));
    // 1,800 expected; the binomial standard deviation is 13.4: ±5 of them.
    assert!((1733..=1867).contains(&v1), "v1 {v1}, v2 {v2}");
    assert_eq!(v1 + v2, 2000);
    Ok(())
}

#[test]
fn faults_delay_and_abort_their_share_and_are_flagged() -> Result<()> {
    let m = setup(CANARY)?;
    let r = http_client(
        &m.topo,
        &[
            "--url",
            &format!("{REVIEWS}/fault"),
            "--requests",
            "500",
            "--concurrency",
            "10",
        ],
    )?;
    let aborted = count(&r, "status", "418");
    assert_eq!(aborted + count(&r, "status", "200"), 500, "{r}");
    // 20 % aborted: 100 expected, standard deviation 8.9.
    assert!((60..=140).contains(&aborted), "{r}");
    assert_eq!(count(&r, "served_by", "v1"), 500 - aborted, "{r}");
    let text = m.waypoint.metrics(&m.topo)?;
    let flagged = |code: &str, flag: &str| {
        metric_sum(
            &text,
            "istio_requests_total",
            &[("response_code", code), ("response_flags", flag)],
        )
    };
    assert_eq!(flagged("418", "FI"), aborted as f64, "{text}");
    // 30 % delayed, of which those not aborted answer 200 flagged DI: 120 expected (sd 10).
    let delayed = flagged("200", "DI");
    assert!((80.0..=160.0).contains(&delayed), "{delayed}\n{text}");
    assert_eq!(delayed + flagged("200", "-"), (500 - aborted) as f64);
    m.waypoint
        .wait_access_log("\"GET /fault HTTP/1.1\" 418 FI ", T)?;
    Ok(())
}

#[test]
fn a_virtual_service_timeout_answers_504_ut_and_its_retries_lift_failures() -> Result<()> {
    let m = setup(CANARY)?;
    let started = std::time::Instant::now();
    let r = http_client(
        &m.topo,
        &[
            "--url",
            &format!("{REVIEWS}/slow"),
            "--requests",
            "1",
            "--header",
            "x-delay-ms: 3000",
        ],
    )?;
    let took = started.elapsed();
    assert_eq!(count(&r, "status", "504"), 1, "{r}");
    assert!(
        took >= Duration::from_millis(300) && took < Duration::from_millis(2000),
        "{took:?}"
    );
    m.waypoint
        .wait_access_log("\"GET /slow HTTP/1.1\" 504 UT ", T)?;
    let r = http_client(
        &m.topo,
        &[
            "--url",
            &format!("{REVIEWS}/flaky"),
            "--requests",
            "200",
            "--header",
            "x-fail-percent: 50",
        ],
    )?;
    assert!(count(&r, "status", "200") >= 198, "{r}");
    assert_eq!(count(&r, "served_by", "v2"), 200, "subset v2 only: {r}");
    let text = m.waypoint.metrics(&m.topo)?;
    assert!(
        metric_sum(&text, "mesh_request_retries_total", &[]) >= 100.0,
        "{text}"
    );
    Ok(())
}

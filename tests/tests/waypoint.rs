//! End to end: a waypoint (`mesh-agent waypoint` in its own pod, no eBPF) in front of a service
//! labelled `istio.io/use-waypoint`. The client's agent tunnels to the waypoint with the service
//! as the CONNECT authority; the waypoint tunnels on to an endpoint with its own identity. Two
//! nodes, one agent each, real eBPF and real TLS. Needs root.
use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use anyhow::Result;
use mesh_tests::agent::{
    apply_config, eventually, metric_series, metric_sum, render_config, write_config, Agent,
    Waypoint, WorkloadSpec,
};
use mesh_tests::apps::{
    accepted_peers, client, client_with, echo_server, soak_with, wait_accepted, wait_soak_event,
};
use mesh_tests::{Proc, Topology};

const PORT: u16 = 7000;
const T: Duration = Duration::from_secs(15);
const OPENED: &str = "istio_tcp_connections_opened_total";
const SPIFFE: &str = "spiffe://cluster.local/ns/default/sa/";

const HTTP_PORT: u16 = 8080;

const SERVICES: &str = "services:
  - name: api
    vips: [10.96.0.22]
    ports: [{ port: 80, targetPort: 8080 }]
    endpoints: [server]
    labels: { istio.io/use-waypoint: wp }
  - name: web
    vips: [10.96.0.20]
    ports: [{ port: 80, targetPort: 7000 }]
    endpoints: [server]
    labels: { istio.io/use-waypoint: wp }
  - name: plain
    vips: [10.96.0.21]
    ports: [{ port: 80, targetPort: 7000 }]
    endpoints: [server]
  - name: api-named
    vips: [10.96.0.25]
    ports: [{ port: 80, targetPort: 8080, name: http-api }]
    endpoints: [server]
    labels: { istio.io/use-waypoint: wp }
  - name: api-v1
    vips: [10.96.0.23]
    ports: [{ port: 80, targetPort: 8080 }]
    endpoints: [server]
  - name: api-v2
    vips: [10.96.0.24]
    ports: [{ port: 80, targetPort: 8081 }]
    endpoints: [server]
gateways:
  - apiVersion: gateway.networking.k8s.io/v1
    kind: Gateway
    metadata: { name: wp, namespace: default }
    spec: { gatewayClassName: istio-waypoint }
";

struct Mesh {
    // Field order is drop order: processes die before the topology is torn down.
    waypoint: Option<Waypoint>,
    agents: Vec<Agent>,
    server: Proc,
    _http_server: Proc,
    topo: Topology,
}

impl Mesh {
    /// The last log lines of the agents and the waypoint, for a failure message.
    fn logs(&self) -> String {
        let mut out = String::new();
        for a in &self.agents {
            for l in a.log().iter().rev().take(8).rev() {
                out.push_str(&format!("{}: {l}\n", a.node));
            }
        }
        if let Some(w) = &self.waypoint {
            for l in w
                .proc
                .stderr_lines()
                .iter()
                .filter(|l| {
                    l.contains("panicked")
                        || l.contains("budget")
                        || l.contains("WARN")
                        || l.contains("ERROR")
                })
                .take(8)
            {
                out.push_str(&format!("waypoint: {l}\n"));
            }
        }
        out
    }

    fn metrics(&self, node: &str) -> String {
        let agent = self.agents.iter().find(|a| a.node == node).expect("agent");
        agent.metrics(&self.topo).unwrap_or_default()
    }
}

/// node1: client and the waypoint's pod `wp-1` (service account `wp`, as Istio names a
/// waypoint's); node2: server. `extra` is appended to the config.
fn setup(extra: &str) -> Result<Mesh> {
    let topo = Topology::new(&[("node1", &["client", "wp-1"]), ("node2", &["server"])])?;
    let config = topo.work_dir().join("mesh.yaml");
    let specs = [
        WorkloadSpec::mesh("client"),
        WorkloadSpec::mesh("server"),
        WorkloadSpec::mesh("wp-1")
            .label("gateway.networking.k8s.io/gateway-name", "wp")
            .service_account("wp"),
    ];
    write_config(
        &config,
        &format!("{}{SERVICES}{extra}", render_config(&topo, &specs)),
    )?;
    let server = echo_server(&topo, "server", PORT)?;
    let http_server = http_server(&topo, "server", HTTP_PORT, "v1")?;
    let agents = vec![
        Agent::start(&topo, "node1", &config)?,
        Agent::start(&topo, "node2", &config)?,
    ];
    let waypoint = Some(Waypoint::start(&topo, "wp-1", "wp", &config)?);
    Ok(Mesh {
        waypoint,
        agents,
        server,
        _http_server: http_server,
        topo,
    })
}

/// `mesh-testapp http-server` in `pod` on `port`, answering as `name`.
fn http_server(topo: &Topology, pod: &str, port: u16, name: &str) -> Result<Proc> {
    let mut cmd = std::process::Command::new(mesh_tests::testapp_bin());
    cmd.args(["http-server", "--name", name, "--workers", "1"])
        .args(["--listen", &format!("0.0.0.0:{port}")]);
    let p = topo.spawn_in_pod(pod, cmd)?;
    p.wait_for_line(|l| l.contains("\"listening\""), T)?;
    Ok(p)
}

/// `mesh-testapp http-client` in `pod`; its JSON summary.
fn http_client(topo: &Topology, pod: &str, args: &[&str]) -> Result<serde_json::Value> {
    let bin = mesh_tests::testapp_bin();
    let mut all = vec![bin.to_str().expect("path"), "http-client", "--workers", "1"];
    all.extend_from_slice(args);
    let out = topo.run_in_pod(pod, &all)?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    Ok(serde_json::from_str(
        stdout.lines().last().unwrap_or_default(),
    )?)
}

#[test]
fn http_through_the_waypoint_is_served_per_request_over_http1_and_http2() -> Result<()> {
    let m = setup("")?;
    let url = "http://10.96.0.22:80/hello?x=1";
    for extra in [&[][..], &["--http2"][..]] {
        let mut args = vec!["--url", url, "--requests", "20", "--concurrency", "2"];
        args.extend_from_slice(extra);
        let r = http_client(&m.topo, "client", &args)?;
        assert_eq!(r["ok"], true, "{r}\n{}", m.logs());
        assert_eq!(r["status"]["200"], 20, "{r}");
        assert_eq!(r["served_by"]["v1"], 20, "{r}");
        // The request arrived whole: path, query and host as the client sent them.
        let body: serde_json::Value =
            serde_json::from_str(r["first"]["body"].as_str().unwrap_or_default())?;
        assert_eq!(body["path"], "/hello?x=1", "{body}");
        assert!(
            body["host"]
                .as_str()
                .unwrap_or_default()
                .starts_with("10.96.0.22"),
            "{body}"
        );
    }
    // A port declared HTTP by its name takes HTTP/1.1 and HTTP/2 (prior knowledge) alike.
    for extra in [&[][..], &["--http2"][..]] {
        let mut args = vec!["--url", "http://10.96.0.25:80/named", "--requests", "5"];
        args.extend_from_slice(extra);
        let r = http_client(&m.topo, "client", &args)?;
        assert_eq!(r["status"]["200"], 5, "{extra:?}: {r}\n{}", m.logs());
    }
    // Every request was logged at the waypoint (its access log), with the client's identity.
    let wp = m.waypoint.as_ref().expect("waypoint");
    let line = wp.wait_access_log("\"GET /hello?x=1 HTTP/1.1\" 200 ", T)?;
    assert!(line.contains(&format!(" {SPIFFE}client ")), "{line}");
    Ok(())
}

#[test]
fn a_denied_http_request_gets_istios_403_at_the_waypoint() -> Result<()> {
    let m = setup(DENY_CLIENT)?;
    let r = http_client(&m.topo, "client", &["--url", "http://10.96.0.22:80/x"])?;
    assert_eq!(r["status"]["403"], 1, "{r}\n{}", m.logs());
    assert_eq!(r["first"]["body"], "RBAC: access denied", "{r}");
    let wp = m.waypoint.as_ref().expect("waypoint");
    let line = wp.wait_log("request denied by policy", T)?;
    assert!(line.contains("deny-client"), "{line}");
    Ok(())
}

#[test]
fn a_service_with_a_waypoint_is_reached_through_it_with_the_waypoint_identity() -> Result<()> {
    let m = setup("")?;
    let wp_principal = format!("{SPIFFE}wp");
    let client_principal = format!("{SPIFFE}client");

    let r = client(&m.topo, "client", "10.96.0.20:80", 2, 64 * 1024)?;
    assert_eq!(r["ok"], true, "{r}\n{}", m.logs());
    // The client's agent tunnelled to the waypoint, expecting the waypoint's identity.
    let to_waypoint = [
        ("reporter", "source"),
        ("source_workload", "client"),
        ("destination_principal", wp_principal.as_str()),
        ("destination_service", "web.default.svc.cluster.local"),
    ];
    assert!(
        eventually(T, || metric_sum(&m.metrics("node1"), OPENED, &to_waypoint)
            == 2.0),
        "{}",
        m.metrics("node1")
    );
    // The server's agent saw the waypoint, not the client, as the peer.
    let at_server = [
        ("reporter", "destination"),
        ("destination_workload", "server"),
        ("source_principal", wp_principal.as_str()),
    ];
    assert!(
        eventually(T, || metric_sum(&m.metrics("node2"), OPENED, &at_server)
            == 2.0),
        "{}",
        m.metrics("node2")
    );
    // The waypoint counted both as reporter="waypoint" and logged the client's identity.
    let wp = m.waypoint.as_ref().expect("waypoint");
    let line = wp.wait_log("waypoint connection complete", T)?;
    assert!(line.contains(&client_principal), "{line}");
    assert!(line.contains("dst=10.96.0.20:80"), "{line}");
    // As Istio reports it: the source is the client the waypoint acts for.
    let through = [
        ("reporter", "waypoint"),
        ("destination_workload", "server"),
        ("source_workload", "client"),
        ("source_principal", client_principal.as_str()),
        ("destination_service", "web.default.svc.cluster.local"),
    ];
    assert!(
        eventually(T, || {
            metric_sum(&wp.metrics(&m.topo).unwrap_or_default(), OPENED, &through) == 2.0
        }),
        "{}",
        wp.metrics(&m.topo).unwrap_or_default()
    );

    // A service without the label is reached directly: the server sees the client.
    let r = client(&m.topo, "client", "10.96.0.21:80", 1, 1024)?;
    assert_eq!(r["ok"], true, "{r}");
    let direct = [
        ("reporter", "destination"),
        ("destination_workload", "server"),
        ("source_principal", client_principal.as_str()),
    ];
    assert!(
        eventually(T, || metric_sum(&m.metrics("node2"), OPENED, &direct)
            == 1.0),
        "{}",
        m.metrics("node2")
    );
    Ok(())
}

#[test]
fn with_the_waypoint_gone_the_client_fails_at_once_and_nothing_goes_around_it() -> Result<()> {
    let mut m = setup("")?;
    let r = client(&m.topo, "client", "10.96.0.20:80", 1, 1024)?;
    assert_eq!(r["ok"], true, "{r}");
    let accepted = accepted_peers(&m.server, 0).len();
    assert_eq!(accepted, 1);

    let mut wp = m.waypoint.take().expect("waypoint");
    wp.proc.kill()?;
    let started = Instant::now();
    let r = client_with(
        &m.topo,
        "client",
        "10.96.0.20:80",
        1,
        1024,
        &["--timeout-ms", "10000"],
    )?;
    assert_eq!(r["ok"], false, "{r}");
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "a clear failure, not a hang: {r} after {:?}",
        started.elapsed()
    );
    // Nothing reached the server around the waypoint.
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(accepted_peers(&m.server, 0).len(), accepted);
    let failed = [
        ("reporter", "source"),
        ("source_workload", "client"),
        ("destination_service", "web.default.svc.cluster.local"),
    ];
    assert!(
        eventually(T, || metric_sum(
            &m.metrics("node1"),
            "istio_tcp_connections_failed_total",
            &failed
        ) >= 1.0),
        "{}",
        m.metrics("node1")
    );
    Ok(())
}

const DENY_CLIENT: &str = "policies:
  - apiVersion: security.istio.io/v1
    kind: AuthorizationPolicy
    metadata: { name: deny-client, namespace: default }
    spec:
      selector: { matchLabels: { app: server } }
      action: DENY
      rules: [{ from: [{ source: { principals: [cluster.local/ns/default/sa/client] } }] }]
";

#[test]
fn the_waypoint_decides_the_destination_policy_for_the_client_not_for_itself() -> Result<()> {
    // The server's agent sees only the waypoint's identity; the client's is checked at the
    // waypoint, so a DENY on the client's principal cannot be bypassed through the waypoint.
    let m = setup(DENY_CLIENT)?;
    let r = client(&m.topo, "client", "10.96.0.20:80", 1, 1024)?;
    assert_eq!(r["ok"], false, "{r}");
    let wp = m.waypoint.as_ref().expect("waypoint");
    let line = wp.wait_log("connection denied by policy", T)?;
    assert!(
        line.contains("denied by AuthorizationPolicy default/deny-client rules[0]"),
        "{line}"
    );
    assert_eq!(
        accepted_peers(&m.server, 0).len(),
        0,
        "nothing reached the server"
    );
    // Directly (no waypoint) the server's own agent denies it too.
    let r = client(&m.topo, "client", "10.96.0.21:80", 1, 1024)?;
    assert_eq!(r["ok"], false, "{r}");
    assert_eq!(accepted_peers(&m.server, 0).len(), 0);
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Request telemetry: Istio's request metrics, the access log, W3C trace context.

const API: &str = "api.default.svc.cluster.local";

/// The labels Istio gives a request from `client` to `server` through the waypoint, with the
/// outcome's labels.
fn request_labels(outcome: &[(&str, &str)]) -> BTreeMap<String, String> {
    let client = format!("{SPIFFE}client");
    let server = format!("{SPIFFE}server");
    let mut labels: BTreeMap<String, String> = [
        ("reporter", "waypoint"),
        ("source_workload", "client"),
        ("source_workload_namespace", "default"),
        ("source_principal", client.as_str()),
        ("source_app", "client"),
        ("source_version", "unknown"),
        ("source_cluster", "Kubernetes"),
        ("destination_workload", "server"),
        ("destination_workload_namespace", "default"),
        ("destination_principal", server.as_str()),
        ("destination_app", "server"),
        ("destination_version", "unknown"),
        ("destination_service", API),
        ("destination_service_name", "api"),
        ("destination_service_namespace", "default"),
        ("destination_cluster", "Kubernetes"),
        ("request_protocol", "http"),
        ("response_code", "200"),
        ("grpc_response_status", ""),
        ("response_flags", "-"),
        ("connection_security_policy", "mutual_tls"),
    ]
    .iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect();
    for (k, v) in outcome {
        assert!(labels.contains_key(*k), "{k} is no request label");
        labels.insert(k.to_string(), v.to_string());
    }
    labels
}

/// The value of the series of `name` with exactly `labels` (0 when there is none).
fn series_value(text: &str, name: &str, labels: &BTreeMap<String, String>) -> f64 {
    metric_series(text, name)
        .into_iter()
        .find(|(l, _)| l == labels)
        .map_or(0.0, |(_, v)| v)
}

#[test]
fn waypoint_requests_are_counted_under_istios_request_metrics() -> Result<()> {
    let m = setup("")?;
    let url = "http://10.96.0.22:80/count";
    let r = http_client(
        &m.topo,
        "client",
        &[
            "--url",
            url,
            "--requests",
            "6",
            "--concurrency",
            "2",
            "--method",
            "POST",
            "--body-bytes",
            "100",
            "--header",
            "x-response-bytes: 2000",
        ],
    )?;
    assert_eq!(r["status"]["200"], 6, "{r}\n{}", m.logs());
    assert_eq!(r["first"]["body_bytes"], 2000, "{r}");
    let r = http_client(
        &m.topo,
        "client",
        &[
            "--url",
            url,
            "--grpc",
            "--requests",
            "3",
            "--body-bytes",
            "10",
        ],
    )?;
    assert_eq!(r["grpc_status"]["0"], 3, "{r}\n{}", m.logs());

    let wp = m.waypoint.as_ref().expect("waypoint");
    let http = request_labels(&[]);
    let grpc = request_labels(&[("request_protocol", "grpc"), ("grpc_response_status", "0")]);
    let metrics = || wp.metrics(&m.topo).unwrap_or_default();
    assert!(
        eventually(T, || {
            let text = metrics();
            series_value(&text, "istio_requests_total", &http) == 6.0
                && series_value(&text, "istio_requests_total", &grpc) == 3.0
        }),
        "{}",
        metrics()
    );
    let text = metrics();
    // Nothing else was counted (no request reported twice or as cut short).
    assert_eq!(
        metric_series(&text, "istio_requests_total").len(),
        2,
        "{text}"
    );
    // A gRPC request is 5 bytes of framing and the 10-byte message each way.
    for (labels, n, sent, received) in [(&http, 6.0, 100.0, 2000.0), (&grpc, 3.0, 15.0, 15.0)] {
        for name in [
            "istio_request_duration_milliseconds_count",
            "istio_request_bytes_count",
            "istio_response_bytes_count",
        ] {
            assert_eq!(series_value(&text, name, labels), n, "{name}\n{text}");
        }
        let sum = |name| series_value(&text, name, labels);
        assert_eq!(sum("istio_request_bytes_sum"), n * sent, "{text}");
        assert_eq!(sum("istio_response_bytes_sum"), n * received, "{text}");
        // Envoy's default buckets: every request is within the last finite one.
        let mut le = labels.clone();
        le.insert("le".into(), "3600000.0".into());
        assert_eq!(
            series_value(&text, "istio_request_duration_milliseconds_bucket", &le),
            n,
            "{text}"
        );
    }

    // Every request has its access-log line, which names the request and both ends.
    let server = m.topo.pod("server").ip4;
    let client = m.topo.pod("client").ip4;
    let line = wp.wait_access_log("\"POST /count HTTP/1.1\"", T)?;
    assert!(
        line.contains("\"POST /count HTTP/1.1\" 200 - 100 2000 "),
        "{line}"
    );
    assert!(
        line.contains(&format!(" \"10.96.0.22:80\" \"{server}:8080\" {client}:")),
        "{line}"
    );
    assert!(
        line.ends_with(&format!(" {SPIFFE}client {SPIFFE}server -")),
        "{line}"
    );
    assert!(
        eventually(T, || wp.access_log().len() == 9),
        "{:#?}",
        wp.access_log()
    );
    let grpc_lines = wp
        .access_log()
        .into_iter()
        .filter(|l| l.contains("\"POST /count HTTP/2\" 200 - 15 15 "))
        .count();
    assert_eq!(grpc_lines, 3, "{:#?}", wp.access_log());
    Ok(())
}

#[test]
fn a_request_the_waypoint_denies_is_counted_and_logged_as_its_403() -> Result<()> {
    let m = setup(DENY_CLIENT)?;
    let url = "http://10.96.0.22:80/x";
    let r = http_client(&m.topo, "client", &["--url", url, "--requests", "2"])?;
    assert_eq!(r["status"]["403"], 2, "{r}\n{}", m.logs());
    // No upstream was picked: the destination is the service alone, and Envoy's RBAC filter
    // sets no response flag.
    let labels = request_labels(&[
        ("response_code", "403"),
        ("destination_workload", "unknown"),
        ("destination_workload_namespace", "unknown"),
        ("destination_principal", "unknown"),
        ("destination_app", "unknown"),
        ("destination_cluster", "unknown"),
    ]);
    let wp = m.waypoint.as_ref().expect("waypoint");
    let metrics = || wp.metrics(&m.topo).unwrap_or_default();
    assert!(
        eventually(T, || series_value(
            &metrics(),
            "istio_requests_total",
            &labels
        ) == 2.0),
        "{}",
        metrics()
    );
    assert_eq!(
        series_value(&metrics(), "istio_response_bytes_sum", &labels),
        2.0 * "RBAC: access denied".len() as f64
    );
    let line = wp.wait_access_log("\"GET /x HTTP/1.1\"", T)?;
    assert!(line.contains("\"GET /x HTTP/1.1\" 403 - 0 19 "), "{line}");
    assert!(line.contains(" \"10.96.0.22:80\" \"-\" "), "{line}");
    assert!(line.ends_with(&format!(" {SPIFFE}client - -")), "{line}");
    Ok(())
}

/// `00-<trace id>-<span id>-<flags>`, split; fails unless well formed.
fn traceparent(v: &serde_json::Value) -> (String, String, String) {
    let text = v.as_str().unwrap_or_default();
    let parts: Vec<&str> = text.split('-').collect();
    assert_eq!(parts.len(), 4, "traceparent {text:?}");
    assert_eq!(parts[0], "00", "traceparent {text:?}");
    assert!(
        parts[1].len() == 32 && parts[2].len() == 16 && parts[3].len() == 2,
        "traceparent {text:?}"
    );
    (parts[1].into(), parts[2].into(), parts[3].into())
}

#[test]
fn the_trace_context_goes_on_with_a_new_span_and_the_json_access_log_has_it() -> Result<()> {
    let mut m = setup("")?;
    // The same waypoint, logging JSON, on two worker threads (the other tests run it on one:
    // both runtimes carry requests).
    drop(m.waypoint.take());
    let config = m.topo.work_dir().join("mesh.yaml");
    m.waypoint = Some(Waypoint::start_with(
        &m.topo,
        "wp-1",
        "wp",
        &config,
        &["--access-log", "json", "--workers", "2"],
    )?);
    let wp = m.waypoint.as_ref().expect("waypoint");

    let (trace, span) = ("4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7");
    let sent = [
        ("traceparent", format!("00-{trace}-{span}-01")),
        (
            "tracestate",
            "congo=t61rcWkgMzE,rojo=00f067aa0ba902b7".into(),
        ),
        ("x-b3-traceid", "80f198ee56343ba864fe8b2a57d3eff7".into()),
        ("x-b3-spanid", "e457b5a2e4d86bd1".into()),
        ("x-b3-sampled", "1".into()),
        ("x-request-id", "9d6a4c1e-req".into()),
    ];
    let headers: Vec<String> = sent.iter().map(|(k, v)| format!("{k}: {v}")).collect();
    let mut args = vec!["--url", "http://10.96.0.22:80/traced?q=1", "--http2"];
    for h in &headers {
        args.extend(["--header", h.as_str()]);
    }
    let r = http_client(&m.topo, "client", &args)?;
    assert_eq!(r["status"]["200"], 1, "{r}\n{}", m.logs());
    // What the server received: the client's trace, the waypoint's span, the same flags; the
    // rest as the client sent it.
    let body: serde_json::Value =
        serde_json::from_str(r["first"]["body"].as_str().unwrap_or_default())?;
    let got = &body["headers"];
    let (got_trace, got_span, flags) = traceparent(&got["traceparent"]);
    assert_eq!((got_trace.as_str(), flags.as_str()), (trace, "01"), "{got}");
    assert_ne!(got_span, span, "{got}");
    assert_ne!(got_span, "0000000000000000", "{got}");
    for (k, v) in &sent[1..] {
        assert_eq!(got[*k], v.as_str(), "{k}: {got}");
    }

    // Its access-log line, by value.
    let line = wp.wait_access_log(trace, T)?;
    let log: serde_json::Value = serde_json::from_str(&line)?;
    let server = m.topo.pod("server").ip4;
    let client = m.topo.pod("client").ip4;
    for (field, want) in [
        ("method", serde_json::json!("GET")),
        ("path", "/traced?q=1".into()),
        ("authority", "10.96.0.22:80".into()),
        ("protocol", "HTTP/2".into()),
        ("response_code", 200.into()),
        ("response_flags", "-".into()),
        ("bytes_received", 0.into()),
        ("bytes_sent", r["first"]["body_bytes"].clone()),
        ("upstream_host", format!("{server}:8080").into()),
        ("trace_id", trace.into()),
        ("downstream_peer_uri_san", format!("{SPIFFE}client").into()),
        ("upstream_peer_uri_san", format!("{SPIFFE}server").into()),
        ("route_name", serde_json::Value::Null),
    ] {
        assert_eq!(log[field], want, "{field}: {line}");
    }
    let remote = log["downstream_remote_address"]
        .as_str()
        .unwrap_or_default();
    assert!(remote.starts_with(&format!("{client}:")), "{line}");
    let start = log["start_time"].as_str().unwrap_or_default();
    assert!(
        start.len() == 24 && start.ends_with('Z') && start.as_bytes()[19] == b'.',
        "{line}"
    );
    assert!(log["duration"].as_u64().is_some(), "{line}");

    // Without a traceparent, the waypoint starts the trace (not sampled) and drops tracestate.
    let r = http_client(
        &m.topo,
        "client",
        &[
            "--url",
            "http://10.96.0.22:80/fresh",
            "--header",
            "tracestate: congo=t61rcWkgMzE",
        ],
    )?;
    assert_eq!(r["status"]["200"], 1, "{r}");
    let body: serde_json::Value =
        serde_json::from_str(r["first"]["body"].as_str().unwrap_or_default())?;
    let (new_trace, _, flags) = traceparent(&body["headers"]["traceparent"]);
    assert_eq!(flags, "00", "{body}");
    assert!(body["headers"].get("tracestate").is_none(), "{body}");
    let line = wp.wait_access_log("\"/fresh\"", T)?;
    let log: serde_json::Value = serde_json::from_str(&line)?;
    assert_eq!(log["trace_id"], new_trace.as_str(), "{line}");
    Ok(())
}

/// Routes for `api` (through the waypoint): by path, by header, a redirect, a rewrite, a mirror,
/// a timeout and a 90/10 split between `api-v1` (the server's `v1` on 8080) and `api-v2` (`v2`
/// on 8081).
const ROUTES: &str = "routes:
  - apiVersion: gateway.networking.k8s.io/v1
    kind: HTTPRoute
    metadata: { name: api, namespace: default }
    spec:
      parentRefs: [{ group: '', kind: Service, name: api, port: 80 }]
      rules:
        - matches: [{ path: { type: PathPrefix, value: /v2 } }]
          backendRefs: [{ name: api-v2, port: 80 }]
        - matches: [{ path: { type: PathPrefix, value: /split }, headers: [{ name: x-canary, value: 'yes' }] }]
          backendRefs: [{ name: api-v2, port: 80 }]
          filters:
            - type: ResponseHeaderModifier
              responseHeaderModifier: { set: [{ name: x-route, value: canary }] }
        - matches: [{ path: { type: Exact, value: /old } }]
          filters:
            - type: RequestRedirect
              requestRedirect: { path: { type: ReplaceFullPath, replaceFullPath: /new }, statusCode: 301 }
        - matches: [{ path: { type: PathPrefix, value: /rewrite } }]
          filters:
            - type: URLRewrite
              urlRewrite: { path: { type: ReplacePrefixMatch, replacePrefixMatch: /inner } }
            - type: RequestHeaderModifier
              requestHeaderModifier: { add: [{ name: x-added, value: by-route }] }
            - type: RequestMirror
              requestMirror: { backendRef: { name: api-v2, port: 80 } }
          backendRefs: [{ name: api-v1, port: 80 }]
        - matches: [{ path: { type: PathPrefix, value: /slow } }]
          timeouts: { request: 300ms }
          backendRefs: [{ name: api-v1, port: 80 }]
        - matches: [{ path: { type: PathPrefix, value: /split } }]
          backendRefs: [{ name: api-v1, port: 80, weight: 90 }, { name: api-v2, port: 80, weight: 10 }]
";

/// `mesh-testapp http-server` `v2` on 8081 in the server pod, logging every request.
fn http_server_v2(topo: &Topology) -> Result<Proc> {
    let mut cmd = std::process::Command::new(mesh_tests::testapp_bin());
    cmd.args([
        "http-server",
        "--name",
        "v2",
        "--workers",
        "1",
        "--log-requests",
    ])
    .args(["--listen", "0.0.0.0:8081"]);
    let p = topo.spawn_in_pod("server", cmd)?;
    p.wait_for_line(|l| l.contains("\"listening\""), T)?;
    Ok(p)
}

#[test]
fn the_waypoint_routes_by_path_and_header_with_filters_redirects_and_timeouts() -> Result<()> {
    let m = setup(ROUTES)?;
    let v2 = http_server_v2(&m.topo)?;
    let url = |path: &str| format!("http://10.96.0.22:80{path}");
    for extra in [&[][..], &["--http2"][..]] {
        let get = |path: &str, more: &[&str]| -> Result<serde_json::Value> {
            let url = url(path);
            let mut args = vec!["--url", url.as_str(), "--requests", "5"];
            args.extend_from_slice(more);
            args.extend_from_slice(extra);
            http_client(&m.topo, "client", &args)
        };
        // By path.
        let r = get("/v2/a", &[])?;
        assert_eq!(r["served_by"]["v2"], 5, "{r}\n{}", m.logs());
        // By header (with a response header set by the rule).
        let r = get("/split", &["--header", "x-canary: yes"])?;
        assert_eq!(r["served_by"]["v2"], 5, "{r}");
        assert_eq!(r["first"]["headers"]["x-route"], "canary", "{r}");
        // A redirect answered by the waypoint itself.
        let r = get("/old?q=1", &[])?;
        assert_eq!(r["status"]["301"], 5, "{r}");
        assert_eq!(
            r["first"]["headers"]["location"], "http://10.96.0.22/new?q=1",
            "{r}"
        );
        // A rewrite and an added header reach the backend.
        let r = get("/rewrite/x", &[])?;
        assert_eq!(r["served_by"]["v1"], 5, "{r}");
        let body: serde_json::Value =
            serde_json::from_str(r["first"]["body"].as_str().unwrap_or_default())?;
        assert_eq!(body["path"], "/inner/x", "{body}");
        assert_eq!(body["headers"]["x-added"], "by-route", "{body}");
        // No rule matches: 404.
        let r = get("/nothing", &[])?;
        assert_eq!(r["status"]["404"], 5, "{r}");
        // The route's timeout answers 504 long before the backend would.
        let started = Instant::now();
        let r = get(
            "/slow",
            &["--header", "x-delay-ms: 3000", "--requests", "1"],
        )?;
        assert_eq!(r["status"]["504"], 1, "{r}");
        assert_eq!(r["first"]["body"], "upstream request timeout", "{r}");
        assert!(started.elapsed() < Duration::from_millis(2500), "{r}");
    }
    // The access log names the route and Envoy's flags: NR for no route, UT for the timeout.
    let wp = m.waypoint.as_ref().expect("waypoint");
    let line = wp.wait_access_log("\"GET /nothing HTTP/1.1\" 404 NR ", T)?;
    assert!(line.ends_with(" -"), "no route, no name: {line}");
    let line = wp.wait_access_log("\"GET /slow HTTP/1.1\" 504 UT ", T)?;
    assert!(line.ends_with(" default/api"), "{line}");
    let line = wp.wait_access_log("\"GET /v2/a HTTP/1.1\" 200 - ", T)?;
    assert!(
        line.contains(" \"10.96.0.24:80\" ") || line.contains(":8081\" "),
        "{line}"
    );
    assert!(line.ends_with(" default/api"), "{line}");
    // The mirror got a copy of every /rewrite request, marked as a shadow.
    assert!(
        eventually(T, || {
            v2.stdout_lines()
                .iter()
                .filter(|l| l.contains("\"path\":\"/inner/x\"") && l.contains("-shadow"))
                .count()
                == 10
        }),
        "mirror copies: {:?}\n{:?}",
        v2.stdout_lines(),
        wp.proc.stderr_lines()
    );
    Ok(())
}

#[test]
fn a_90_10_split_holds_over_2000_requests_on_http1_and_http2() -> Result<()> {
    let m = setup(ROUTES)?;
    let _v2 = http_server_v2(&m.topo)?;
    for (extra, n) in [(&[][..], 2000.0), (&["--http2"][..], 2000.0)] {
        let count = format!("{n}");
        let mut args = vec![
            "--url",
            "http://10.96.0.22:80/split",
            "--requests",
            &count,
            "--concurrency",
            "4",
        ];
        args.extend_from_slice(extra);
        let r = http_client(&m.topo, "client", &args)?;
        assert_eq!(r["ok"], true, "{r}\n{}", m.logs());
        let v1 = r["served_by"]["v1"].as_f64().unwrap_or(0.0);
        let v2 = r["served_by"]["v2"].as_f64().unwrap_or(0.0);
        assert_eq!(v1 + v2, n, "{r}");
        // Binomial(n, 0.1): the standard deviation is sqrt(n * 0.1 * 0.9) ≈ 13.4 at n = 2000;
        // five of them either side fails a correct split about once in 3.5 million runs.
        let sd = (n * 0.1 * 0.9_f64).sqrt();
        assert!(
            (v2 - n * 0.1).abs() <= 5.0 * sd,
            "v2 got {v2} of {n} requests, expected {} ± {:.0}: {r}",
            n * 0.1,
            5.0 * sd
        );
    }
    Ok(())
}

/// No bypass, mesh-wide: every service with a waypoint (`web` and `api`, both through `wp`)
/// accepts its target ports only from the waypoint. `plain` shares `web`'s target port, so it is
/// guarded too.
const NO_BYPASS: &str = "waypointOnlyDefault: true\n";

#[test]
fn with_no_bypass_a_direct_connection_is_refused_and_the_waypoint_path_works() -> Result<()> {
    let m = setup(NO_BYPASS)?;
    let server_agent = m.agents.iter().find(|a| a.node == "node2").expect("agent");
    let direct = format!("{}:{PORT}", m.topo.pod("server").ip4);
    let client_principal = format!("{SPIFFE}client");

    // A mesh client straight to the pod: its agent tunnels to the server's, which refuses it.
    let r = client(&m.topo, "client", &direct, 1, 1024)?;
    assert_eq!(r["ok"], false, "{r}\n{}", m.logs());
    assert_eq!(accepted_peers(&m.server, 0).len(), 0, "nothing reached it");
    let line = server_agent.wait_log("bypasses the service's waypoint", 0, T)?;
    assert!(
        line.contains("service default/web accepts only its waypoint default/wp (no-bypass)")
            && line.contains(&format!("src_principal={client_principal}")),
        "{line}"
    );
    let refused = [
        ("reporter", "destination"),
        ("destination_workload", "server"),
        ("source_principal", client_principal.as_str()),
        ("reason", "waypoint_bypass"),
    ];
    assert!(
        eventually(T, || metric_sum(
            &m.metrics("node2"),
            "istio_tcp_connections_failed_total",
            &refused
        ) == 1.0),
        "{}",
        m.metrics("node2")
    );

    // Through the service (and so the waypoint) it works; the server sees the waypoint.
    let r = client(&m.topo, "client", "10.96.0.20:80", 1, 1024)?;
    assert_eq!(r["ok"], true, "{r}\n{}", m.logs());
    assert_eq!(wait_accepted(&m.server, 0, 1).len(), 1);

    // The mark off (the same file without the default): the direct path works, and stays open
    // until the mark is back, which closes it as a policy change would.
    let path = m.topo.work_dir().join("mesh.yaml");
    let marked = std::fs::read_to_string(&path)?;
    let agents: Vec<&Agent> = m.agents.iter().collect();
    apply_config(&agents, &path, &marked.replace(NO_BYPASS, ""), T)?;
    let r = client(&m.topo, "client", &direct, 1, 1024)?;
    assert_eq!(r["ok"], true, "{r}\n{}", m.logs());
    let traffic = soak_with(&m.topo, "client", &direct, 60_000, &["--long-lived-only"])?;
    wait_soak_event(&traffic, "long_lived_open", 0, T)?;
    apply_config(&agents, &path, &marked, T)?;
    let line = server_agent.wait_log("closing a live connection", 0, T)?;
    assert!(line.contains("(no-bypass)"), "{line}");
    let (_, cut) = wait_soak_event(&traffic, "long_lived_error", 0, T)?;
    assert!(cut["roundtrips"].as_u64().unwrap_or(0) >= 1, "{cut}");
    Ok(())
}

const DENIALS: &str = "mesh_policy_denials_total";

/// Bound to the waypoint's Gateway: applies to everything through it.
const NO_DELETE_AT_THE_WAYPOINT: &str = "policies:
  - apiVersion: security.istio.io/v1
    kind: AuthorizationPolicy
    metadata: { name: no-delete, namespace: default }
    spec:
      targetRefs: [{ kind: Gateway, group: gateway.networking.k8s.io, name: wp }]
      action: DENY
      rules: [{ to: [{ operation: { methods: [DELETE] } }] }]
";

#[test]
fn a_targetrefs_policy_on_the_waypoint_gateway_denies_delete_with_403() -> Result<()> {
    let m = setup(NO_DELETE_AT_THE_WAYPOINT)?;
    let url = "http://10.96.0.22:80/items/1";
    for extra in [&[][..], &["--http2"][..]] {
        let mut args = vec!["--url", url, "--method", "DELETE"];
        args.extend_from_slice(extra);
        let r = http_client(&m.topo, "client", &args)?;
        assert_eq!(r["status"]["403"], 1, "{r}\n{}", m.logs());
        assert_eq!(r["first"]["body"], "RBAC: access denied", "{r}");
        let mut args = vec!["--url", url, "--method", "GET"];
        args.extend_from_slice(extra);
        let r = http_client(&m.topo, "client", &args)?;
        assert_eq!(r["status"]["200"], 1, "{r}\n{}", m.logs());
        assert_eq!(r["served_by"]["v1"], 1, "{r}");
    }
    // The waypoint's log and metric name the deciding policy and rule.
    let wp = m.waypoint.as_ref().expect("waypoint");
    let line = wp.wait_log("request denied by policy", T)?;
    assert!(
        line.contains("policy=AuthorizationPolicy default/no-delete rules[0]"),
        "{line}"
    );
    assert!(
        line.contains("(targetRefs Gateway default/wp, at waypoint default/wp)"),
        "{line}"
    );
    let by_rule = [
        ("reason", "denied_by_policy"),
        ("policy", "AuthorizationPolicy default/no-delete rules[0]"),
        ("destination_workload", "wp-1"),
    ];
    assert!(
        eventually(T, || metric_sum(
            &wp.metrics(&m.topo).unwrap_or_default(),
            DENIALS,
            &by_rule
        ) == 2.0),
        "{}",
        wp.metrics(&m.topo).unwrap_or_default()
    );
    // The server's agent enforces nothing of it: a direct DELETE (no waypoint) is served.
    let direct = format!("http://{}:{HTTP_PORT}/items/1", m.topo.pod("server").ip4);
    let r = http_client(&m.topo, "client", &["--url", &direct, "--method", "DELETE"])?;
    assert_eq!(r["status"]["200"], 1, "{r}\n{}", m.logs());
    Ok(())
}

/// Bound to the Service `api`: applies to requests to it through its waypoint.
const GET_PUBLIC_ON_THE_SERVICE: &str = "policies:
  - apiVersion: security.istio.io/v1
    kind: AuthorizationPolicy
    metadata: { name: get-public, namespace: default }
    spec:
      targetRefs: [{ kind: Service, group: \"\", name: api }]
      action: ALLOW
      rules: [{ to: [{ operation: { methods: [GET], paths: [\"/public/*\"] } }] }]
";

#[test]
fn a_targetrefs_policy_on_the_service_allows_only_get_on_public_paths() -> Result<()> {
    let m = setup(GET_PUBLIC_ON_THE_SERVICE)?;
    let get = |path: &str, method: &str| {
        let url = format!("http://10.96.0.22:80{path}");
        http_client(&m.topo, "client", &["--url", &url, "--method", method])
    };
    let r = get("/public/x", "GET")?;
    assert_eq!(r["status"]["200"], 1, "{r}\n{}", m.logs());
    for (path, method) in [("/private", "GET"), ("/public/x", "POST")] {
        let r = get(path, method)?;
        assert_eq!(r["status"]["403"], 1, "{method} {path}: {r}\n{}", m.logs());
        assert_eq!(r["first"]["body"], "RBAC: access denied", "{r}");
    }
    let wp = m.waypoint.as_ref().expect("waypoint");
    let line = wp.wait_log("request denied by policy", T)?;
    assert!(
        line.contains("no ALLOW policy with targetRefs matched at waypoint default/wp"),
        "{line}"
    );
    let no_match = [("reason", "no_allow_policy_matched"), ("policy", "")];
    assert!(
        eventually(T, || metric_sum(
            &wp.metrics(&m.topo).unwrap_or_default(),
            DENIALS,
            &no_match
        ) == 2.0),
        "{}",
        wp.metrics(&m.topo).unwrap_or_default()
    );
    // Another service behind the same waypoint is not bound by it.
    let r = client(&m.topo, "client", "10.96.0.20:80", 1, 1024)?;
    assert_eq!(r["ok"], true, "{r}\n{}", m.logs());
    Ok(())
}

/// The client may not reach the server's `v2` port (8081, behind `api-v2`), nor `/admin`.
const NO_V2_NO_ADMIN: &str = "policies:
  - apiVersion: security.istio.io/v1
    kind: AuthorizationPolicy
    metadata: { name: no-v2, namespace: default }
    spec:
      selector: { matchLabels: { app: server } }
      action: DENY
      rules:
        - from: [{ source: { principals: [cluster.local/ns/default/sa/client] } }]
          to: [{ operation: { ports: ['8081'] } }]
  # Paths are L7: bound to the waypoint (a DENY with HTTP fields on a workload would deny all of
  # its TCP at its agent, as Istio's ztunnel does).
  - apiVersion: security.istio.io/v1
    kind: AuthorizationPolicy
    metadata: { name: no-admin, namespace: default }
    spec:
      targetRefs: [{ kind: Service, group: '', name: api }]
      action: DENY
      rules: [{ to: [{ operation: { paths: [/admin*] } }] }]
";

#[test]
fn routing_and_path_tricks_cannot_reach_what_policy_denies() -> Result<()> {
    let m = setup(&format!("{ROUTES}{NO_V2_NO_ADMIN}"))?;
    let v2 = http_server_v2(&m.topo)?;
    let get = |path: &str| {
        http_client(
            &m.topo,
            "client",
            &["--url", &format!("http://10.96.0.22:80{path}")],
        )
    };
    // A route to another Service: that Service's workloads decide for the client too.
    let r = get("/v2/a")?;
    assert_eq!(r["status"]["403"], 1, "{r}\n{}", m.logs());
    assert_eq!(r["first"]["body"], "RBAC: access denied", "{r}");
    // A mirror the client may not reach is not sent; the request itself is served.
    let r = get("/rewrite/x")?;
    assert_eq!(r["served_by"]["v1"], 1, "{r}");
    // The path is decided as the backend will read it (Istio's normalization).
    for path in ["/admin", "/public/../admin", "/%61dmin", "/./admin/x"] {
        // Policy comes first: no route matches these, but the answer is 403, not 404.
        let r = get(path)?;
        assert_eq!(r["status"]["403"], 1, "{path}: {r}");
    }
    std::thread::sleep(Duration::from_millis(500));
    assert!(
        !v2.stdout_lines()
            .iter()
            .any(|l| l.contains("\"event\":\"request\"")),
        "v2 got a request: {:?}",
        v2.stdout_lines()
    );
    Ok(())
}

const RETRY_ROUTES: &str = "routes:
  - apiVersion: gateway.networking.k8s.io/v1
    kind: HTTPRoute
    metadata: { name: api, namespace: default }
    spec:
      parentRefs: [{ group: '', kind: Service, name: api }]
      rules:
        - matches: [{ path: { type: PathPrefix, value: /flaky } }]
          retry: { codes: [503], attempts: 9, backoff: 1ms }
          backendRefs: [{ name: api-v2, port: 80 }]
        - matches: [{ path: { type: PathPrefix, value: /outage } }]
          retry: { codes: [503], attempts: 9, backoff: 20ms }
          backendRefs: [{ name: api-v2, port: 80 }]
        - matches: [{ path: { type: PathPrefix, value: /slow } }]
          retry: { attempts: 2, backoff: 10ms }
          timeouts: { request: 5s, backendRequest: 200ms }
          backendRefs: [{ name: api-v2, port: 80 }]
";

/// The requests the logging server `v2` answered for `path`, by status.
fn served(v2: &Proc, path: &str) -> BTreeMap<u64, u64> {
    let mut by_status = BTreeMap::new();
    for line in v2.stdout_lines() {
        let Ok(v) = serde_json::from_str::<serde_json::Value>(&line) else {
            continue;
        };
        if v["event"] == "request" && v["path"] == path {
            *by_status
                .entry(v["status"].as_u64().unwrap_or(0))
                .or_default() += 1;
        }
    }
    by_status
}

const API_V2: &str = "api-v2.default.svc.cluster.local";

#[test]
fn retries_lift_a_backend_failing_half_its_requests_and_are_counted_once() -> Result<()> {
    let m = setup(RETRY_ROUTES)?;
    let v2 = http_server_v2(&m.topo)?;
    let wp = m.waypoint.as_ref().expect("waypoint");
    let r = http_client(
        &m.topo,
        "client",
        &[
            "--url",
            "http://10.96.0.22:80/flaky",
            "--requests",
            "400",
            "--header",
            "x-fail-percent: 50",
        ],
    )?;
    let ok = r["status"]["200"].as_u64().unwrap_or(0);
    assert!(ok >= 396, "at least 99 % succeed: {r}\n{}", m.logs());
    // Every try reached the backend: the client's requests plus the retries the waypoint
    // counted; each retry followed a 503 (the ones the client did not see).
    let text = wp.metrics(&m.topo)?;
    let retries = metric_sum(
        &text,
        "mesh_request_retries_total",
        &[("destination_service", API_V2), ("reason", "status")],
    );
    // The server logs a request as it answers it: wait for the last line.
    let mut by_status = BTreeMap::new();
    let complete = eventually(T, || {
        by_status = served(&v2, "/flaky");
        by_status.values().sum::<u64>() == 400 + retries as u64
    });
    let failed_seen = 400 - ok;
    assert!(complete, "{by_status:?} retries {retries}");
    assert_eq!(
        by_status.get(&503).copied().unwrap_or(0),
        retries as u64 + failed_seen,
        "{by_status:?}"
    );
    // Half the tries fail: about one retry per request (a binomial count; far outside is a bug).
    assert!((250.0..=600.0).contains(&retries), "retries {retries}");
    // Istio's request metrics count each request once.
    let counted = metric_sum(
        &text,
        "istio_requests_total",
        &[("destination_service", API_V2)],
    );
    assert_eq!(counted, 400.0, "{text}");
    // A POST is not idempotent: its 503 is passed on after one try.
    let before = served(&v2, "/flaky").values().sum::<u64>();
    let r = http_client(
        &m.topo,
        "client",
        &[
            "--url",
            "http://10.96.0.22:80/flaky",
            "--method",
            "POST",
            "--requests",
            "3",
            "--header",
            "x-fail-percent: 100",
        ],
    )?;
    assert_eq!(r["status"]["503"], 3, "{r}");
    assert!(
        eventually(T, || served(&v2, "/flaky").values().sum::<u64>()
            == before + 3),
        "{:?}",
        served(&v2, "/flaky")
    );
    wp.wait_access_log("\"POST /flaky HTTP/1.1\" 503 - ", T)?;

    // A PUT is idempotent: its body, streamed on the first try, is sent whole again.
    let r = http_client(
        &m.topo,
        "client",
        &[
            "--url",
            "http://10.96.0.22:80/flaky/put",
            "--method",
            "PUT",
            "--body-bytes",
            "3000",
            "--requests",
            "100",
            "--header",
            "x-fail-percent: 50",
        ],
    )?;
    assert!(r["status"]["200"].as_u64().unwrap_or(0) >= 99, "{r}");
    let bodies = || -> Vec<u64> {
        v2.stdout_lines()
            .iter()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .filter(|v| v["event"] == "request" && v["path"] == "/flaky/put")
            .map(|v| v["body_bytes"].as_u64().unwrap_or(0))
            .collect()
    };
    assert!(
        eventually(T, || bodies().len() > 130),
        "about 200 tries expected: {:?}",
        served(&v2, "/flaky/put")
    );
    assert!(bodies().iter().all(|&n| n == 3000), "{:?}", bodies());
    Ok(())
}

#[test]
fn under_a_full_outage_the_retry_budget_keeps_retries_from_multiplying_the_load() -> Result<()> {
    let m = setup(RETRY_ROUTES)?;
    let v2 = http_server_v2(&m.topo)?;
    let wp = m.waypoint.as_ref().expect("waypoint");
    let r = http_client(
        &m.topo,
        "client",
        &[
            "--url",
            "http://10.96.0.22:80/outage",
            "--requests",
            "300",
            "--concurrency",
            "20",
            "--header",
            "x-fail-percent: 100",
        ],
    )?;
    assert_eq!(r["status"]["503"], 300, "{r}\n{}", m.logs());
    let text = wp.metrics(&m.topo)?;
    let retries = metric_sum(
        &text,
        "mesh_request_retries_total",
        &[("destination_service", API_V2)],
    );
    let skipped = metric_sum(
        &text,
        "mesh_request_retries_skipped_total",
        &[("destination_service", API_V2), ("reason", "budget")],
    );
    let tries: u64 = served(&v2, "/outage").values().sum();
    // Without a budget, 9 retries each would make 3,000 tries; with it, retries in flight
    // stay within max(3, 20 % of 20 requests) = 4, each held for at least its backoff.
    assert!(skipped > 0.0, "the budget refused retries: {text}");
    assert_eq!(tries, 300 + retries as u64);
    assert!(
        retries < 300.0,
        "retries {retries} must stay below the requests, not 9 × them"
    );
    // The answers passed on after a refused retry carry Envoy's URX.
    wp.wait_access_log("\"GET /outage HTTP/1.1\" 503 URX ", T)?;
    Ok(())
}

#[test]
fn a_per_try_timeout_is_retried_and_the_last_one_answers_504_ut() -> Result<()> {
    let m = setup(RETRY_ROUTES)?;
    let v2 = http_server_v2(&m.topo)?;
    let wp = m.waypoint.as_ref().expect("waypoint");
    let started = Instant::now();
    let r = http_client(
        &m.topo,
        "client",
        &[
            "--url",
            "http://10.96.0.22:80/slow",
            "--requests",
            "1",
            "--header",
            "x-delay-ms: 3000",
        ],
    )?;
    let took = started.elapsed();
    assert_eq!(r["status"]["504"], 1, "{r}\n{}", m.logs());
    assert_eq!(r["first"]["body"], "upstream request timeout", "{r}");
    // Three tries of 200 ms and two backoffs of 10–30 ms, well before the 3 s the backend
    // takes and the request's 5 s.
    assert!(
        took >= Duration::from_millis(600) && took < Duration::from_millis(2500),
        "{took:?}"
    );
    let text = wp.metrics(&m.topo)?;
    assert_eq!(
        metric_sum(
            &text,
            "mesh_request_retries_total",
            &[
                ("destination_service", API_V2),
                ("reason", "per_try_timeout")
            ],
        ),
        2.0,
        "{text}"
    );
    wp.wait_access_log("\"GET /slow HTTP/1.1\" 504 UT ", T)?;
    drop(v2);
    Ok(())
}

#[test]
fn a_rate_limited_route_answers_429_rl_past_its_burst() -> Result<()> {
    let m = setup(
        "routes:
  - apiVersion: gateway.networking.k8s.io/v1
    kind: HTTPRoute
    metadata:
      name: api
      namespace: default
      annotations: { mesh.dev/rate-limit: '5/m' }
    spec:
      parentRefs: [{ group: '', kind: Service, name: api }]
      rules: [{ backendRefs: [{ name: api, port: 80 }] }]
",
    )?;
    let wp = m.waypoint.as_ref().expect("waypoint");
    let r = http_client(
        &m.topo,
        "client",
        &["--url", "http://10.96.0.22:80/limited", "--requests", "8"],
    )?;
    // Five a minute, all at once: the burst passes, the rest is refused.
    assert_eq!(r["status"]["200"], 5, "{r}\n{}", m.logs());
    assert_eq!(r["status"]["429"], 3, "{r}");
    wp.wait_access_log("\"GET /limited HTTP/1.1\" 429 RL ", T)?;
    let text = wp.metrics(&m.topo)?;
    assert_eq!(
        metric_sum(
            &text,
            "istio_requests_total",
            &[("response_code", "429"), ("response_flags", "RL")]
        ),
        3.0,
        "{text}"
    );
    Ok(())
}

//! The demo's L7 part: the waypoint `shop/waypoint` in its own pod, a live 90/10 canary split
//! by an HTTPRoute and counted from the waypoint's metrics, an L7 deny explained, and
//! resilience: a retry that hides a flaky backend and a circuit breaker that sheds load.
use std::path::Path;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use mesh_tests::agent::{eventually, metric_sum, write_config, Waypoint};
use mesh_tests::{agent_bin, testapp_bin, Proc, Topology};

use super::{heading, indent};

/// The HTTP servers' port in cart (v1) and cart-b (v2).
const HTTP_PORT: u16 = 9080;
/// Service `web` (through the waypoint).
const WEB: &str = "10.96.0.30:80";
const REQUESTS: u64 = 1000;

/// The L7 policy the demo adds: no DELETE through the waypoint.
const NO_DELETE: &str = "policies:
  - apiVersion: security.istio.io/v1
    kind: AuthorizationPolicy
    metadata: { name: no-delete, namespace: shop }
    spec:
      targetRefs: [{ group: gateway.networking.k8s.io, kind: Gateway, name: waypoint }]
      action: DENY
      rules:
        - to: [{ operation: { methods: [DELETE], paths: [\"/orders/*\"] } }]
";

/// The resilience the demo adds (the file's `routes:` list goes on, then a DestinationRule): a
/// route for `/flaky` with a retry, and a circuit breaker on web-v1.
const RESILIENCE: &str = "  - apiVersion: gateway.networking.k8s.io/v1
    kind: HTTPRoute
    metadata: { name: web-resilience, namespace: shop }
    spec:
      parentRefs: [{ group: \"\", kind: Service, name: web, port: 80 }]
      rules:
        - matches: [{ path: { type: PathPrefix, value: /flaky } }]
          retry: { codes: [503], attempts: 4, backoff: 10ms }
          backendRefs: [{ name: web-v1, port: 80 }]
destinationRules:
  - apiVersion: networking.istio.io/v1
    kind: DestinationRule
    metadata: { name: web-v1, namespace: shop }
    spec:
      host: web-v1
      trafficPolicy:
        connectionPool: { http: { http2MaxRequests: 2 } }
";

/// Runs the section; `config` is the file the agents and the waypoint read, `current` its text.
pub fn section(topo: &Topology, config: &Path, current: &str) -> Result<()> {
    heading("Waypoint: an L7 proxy in its own pod (mesh-agent waypoint), chosen by istio.io/use-waypoint");
    // The last good config back in the file (the previous section left a broken edit there).
    write_config(config, current)?;
    let servers = [
        http_server(topo, "cart", "v1")?,
        http_server(topo, "cart-b", "v2")?,
    ];
    let waypoint = Waypoint::start_in(topo, "waypoint", "shop", "waypoint", config, &[])?;
    println!(
        "waypoint shop/waypoint ready in pod waypoint (node2), identity spiffe://cluster.local/ns/shop/sa/waypoint"
    );
    println!("service web (10.96.0.30:80, label istio.io/use-waypoint: waypoint) -> cart (v1) and cart-b (v2) on :{HTTP_PORT}");

    heading("Canary: HTTPRoute web-canary sends 90 % of web's requests to web-v1, 10 % to web-v2");
    let route = current
        .split_once("routes:\n")
        .map(|(_, r)| format!("routes:\n{r}"))
        .unwrap_or_default();
    print!("{}", indent(&route));
    let url = format!("http://{WEB}/orders");
    let summary = http_client(
        topo,
        &[
            "--url",
            &url,
            "--requests",
            &REQUESTS.to_string(),
            "--concurrency",
            "4",
        ],
    )?;
    if summary["ok"] != true {
        bail!(
            "canary traffic failed: {summary}\n{}",
            waypoint_log(&waypoint)
        );
    }
    let counted = |text: &str, version: &str| {
        metric_sum(
            text,
            "istio_requests_total",
            &[
                ("reporter", "waypoint"),
                ("destination_service_name", version),
                ("response_code", "200"),
            ],
        )
    };
    let mut text = String::new();
    eventually(Duration::from_secs(10), || {
        text = waypoint.metrics(topo).unwrap_or_default();
        counted(&text, "web-v1") + counted(&text, "web-v2") >= REQUESTS as f64
    });
    let (v1, v2) = (counted(&text, "web-v1"), counted(&text, "web-v2"));
    println!("frontend sent {REQUESTS} GET {url} (HTTP/1.1, 4 keep-alive connections); the waypoint counted:");
    for line in text
        .lines()
        .filter(|l| l.starts_with("istio_requests_total{") && l.contains("reporter=\"waypoint\""))
    {
        println!("  {}", shorten(line));
    }
    println!(
        "v1 {v1} ({:.1} %), v2 {v2} ({:.1} %); the servers' own counts agree: {}",
        100.0 * v1 / (v1 + v2).max(1.0),
        100.0 * v2 / (v1 + v2).max(1.0),
        summary["served_by"]
    );
    if v1 + v2 < REQUESTS as f64 || v2 == 0.0 || v1 < v2 {
        bail!("the split is not a 90/10 canary: v1 {v1}, v2 {v2}");
    }

    heading("L7 authorization at the waypoint: an AuthorizationPolicy with targetRefs");
    write_config(config, &format!("{current}{NO_DELETE}"))?;
    waypoint
        .wait_log("configuration applied", Duration::from_secs(10))
        .context("the waypoint did not apply the policy")?;
    print!("{}", indent(NO_DELETE));
    for method in ["GET", "DELETE"] {
        let url = format!("http://{WEB}/orders/7");
        let r = http_client(topo, &["--url", &url, "--method", method])?;
        println!(
            "  frontend {method:<6} {url}: {} {:?}",
            r["first"]["status"],
            r["first"]["body"]
                .as_str()
                .map(|b| if b.len() > 40 { "(json)" } else { b })
                .unwrap_or_default()
        );
    }
    let denied = waypoint.wait_log("denied by policy", Duration::from_secs(5))?;
    println!(
        "  waypoint log: {}",
        denied
            .split_once(" WARN ")
            .map_or(denied.as_str(), |(_, rest)| rest)
    );
    let rendered = config.display().to_string();
    let agent = agent_bin();
    let args = [
        agent.to_str().unwrap_or_default(),
        "explain",
        "--config",
        &rendered,
        "--from",
        "shop/frontend",
        "--to",
        WEB,
        "--method",
        "DELETE",
        "--path",
        "/orders/7",
    ];
    let out = topo.run_in_node("node1", &args)?;
    println!(
        "  $ mesh-agent explain --from shop/frontend --to {WEB} --method DELETE --path /orders/7"
    );
    print!("{}", indent(&indent(&String::from_utf8_lossy(&out.stdout))));
    if !out.status.success() {
        bail!(
            "explain failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }

    heading("Resilience: a retry hides a flaky backend, a circuit breaker sheds load");
    let applied = || {
        waypoint
            .proc
            .stderr_lines()
            .iter()
            .filter(|l| l.contains("configuration applied"))
            .count()
    };
    let before = applied();
    let resilient = format!("{current}\n{RESILIENCE}");
    write_config(config, &resilient)?;
    if !eventually(Duration::from_secs(10), || applied() > before) {
        bail!(
            "the waypoint did not apply the route and the DestinationRule\n{}",
            waypoint_log(&waypoint)
        );
    }
    print!("{}", indent(RESILIENCE));
    resilience(topo, &waypoint)?;
    write_config(config, current)?;
    drop(waypoint);
    drop(servers);
    Ok(())
}

/// A retry (the backend fails a third of its answers; the client sees none) and a circuit
/// breaker (two requests in flight at most; the rest get 503 UO at once), shown from the
/// waypoint's metrics and access log.
fn resilience(topo: &Topology, waypoint: &Waypoint) -> Result<()> {
    let url = format!("http://{WEB}/flaky");
    let r = http_client(
        topo,
        &[
            "--url",
            &url,
            "--requests",
            "30",
            "--header",
            "x-fail-percent: 33",
        ],
    )?;
    let text = waypoint.metrics(topo)?;
    let retries = metric_sum(&text, "mesh_request_retries_total", &[]);
    println!(
        "  frontend: 30 GET {url} with x-fail-percent: 33 (cart fails a third of them): {}",
        r["status"]
    );
    println!("  the waypoint retried {retries} times (mesh_request_retries_total):");
    for line in text
        .lines()
        .filter(|l| l.starts_with("mesh_request_retries_total{"))
    {
        println!("    {line}");
    }
    if r["status"]["200"] != 30 || retries < 1.0 {
        bail!("the retry did not hide the failures: {r}, {retries} retries");
    }
    let r = http_client(
        topo,
        &[
            "--url",
            &url,
            "--requests",
            "6",
            "--concurrency",
            "6",
            "--header",
            "x-delay-ms: 500",
        ],
    )?;
    println!(
        "  frontend: 6 slow GETs at once to web-v1 (http2MaxRequests: 2): {}",
        r["status"]
    );
    let line = waypoint
        .wait_access_log("\"GET /flaky HTTP/1.1\" 503 UO ", Duration::from_secs(5))
        .context("no circuit-breaker line in the access log")?;
    println!("  waypoint access log: {}", shorten(&line));
    if r["status"]["503"] != 4 {
        bail!("the circuit breaker did not shed exactly the excess: {r}");
    }
    Ok(())
}

/// `mesh-testapp http-server` answering as `name` on the HTTP port of `pod`.
fn http_server(topo: &Topology, pod: &str, name: &str) -> Result<Proc> {
    let mut cmd = std::process::Command::new(testapp_bin());
    cmd.args(["http-server", "--name", name, "--workers", "1"])
        .args(["--listen", &format!("0.0.0.0:{HTTP_PORT}")]);
    let p = topo.spawn_in_pod(pod, cmd)?;
    p.wait_for_line(|l| l.contains("\"listening\""), Duration::from_secs(10))?;
    Ok(p)
}

/// `mesh-testapp http-client` in frontend; its JSON summary.
fn http_client(topo: &Topology, args: &[&str]) -> Result<serde_json::Value> {
    let bin = testapp_bin();
    let mut all = vec![
        bin.to_str().unwrap_or_default(),
        "http-client",
        "--workers",
        "1",
    ];
    all.extend_from_slice(args);
    let out = topo.run_in_pod("frontend", &all)?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    Ok(serde_json::from_str(
        stdout.lines().last().unwrap_or_default(),
    )?)
}

fn waypoint_log(waypoint: &Waypoint) -> String {
    waypoint
        .proc
        .stderr_lines()
        .iter()
        .rev()
        .take(10)
        .rev()
        .cloned()
        .collect::<Vec<_>>()
        .join("\n")
}

/// A metric line with the labels an operator reads first.
fn shorten(line: &str) -> String {
    let Some((labels, value)) = line
        .strip_prefix("istio_requests_total{")
        .and_then(|l| l.rsplit_once("} "))
    else {
        return line.to_string();
    };
    let keep = [
        "source_workload",
        "destination_workload",
        "destination_service_name",
        "destination_version",
        "response_code",
        "request_protocol",
    ];
    let kept: Vec<&str> = labels
        .split(',')
        .filter(|kv| keep.iter().any(|k| kv.starts_with(&format!("{k}="))))
        .collect();
    format!("istio_requests_total{{{}, ...}} {value}", kept.join(","))
}

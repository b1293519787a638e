//! The `http` measurement: HTTP/1.1 keep-alive request/response with a 1 KiB body each way,
//! `direct`, through the L4 mesh (`mesh`), through the L7 waypoint (`mesh-waypoint`) and through
//! the waypoint with a realistic policy set (`mesh-waypoint-policy`: an HTTPRoute with a retry
//! and timeouts, a DestinationRule with circuit-breaker limits, outlier detection and its own
//! balancing), side by side in every repetition; and the waypoint process's own CPU and memory.
//!
//! This module holds the rows, the figures made of the samples, the targets and their report;
//! `runner::http` runs the load (`mesh-testapp http-server` / `http-client`).
use std::collections::BTreeMap;
use std::fmt::Write as _;

use serde_json::{json, Map, Value};

use super::report::{fmt_num, mib, Target};
use super::scenario::{
    PodSpec, MESH_CLIENT, MESH_SERVER_CROSS, PLAIN_CLIENT, PLAIN_SERVER_CROSS, WAYPOINT_POD,
};
use super::stats::Stat;

/// Port of the `mesh-testapp http-server`s (the `mesh-bench` servers hold 8080).
pub const HTTP_PORT: u16 = 8090;
/// The port the two Services expose (to `HTTP_PORT`).
pub const SERVICE_PORT: u16 = 80;
/// Request body and response body, bytes.
pub const BODY_BYTES: usize = 1024;
/// The waypoint's Gateway (class `istio-waypoint`) and its pod's service account.
pub const WAYPOINT: &str = "wp";

pub const DIRECT: &str = "direct";
pub const MESH: &str = "mesh";
pub const MESH_WAYPOINT: &str = "mesh-waypoint";
pub const MESH_WAYPOINT_POLICY: &str = "mesh-waypoint-policy";

/// One row: who sends to whom, and how the request is addressed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HttpRow {
    pub name: &'static str,
    pub about: &'static str,
    pub client: PodSpec,
    pub server: PodSpec,
    /// The Service the client addresses (name, virtual IP); `None`: the server pod's address.
    pub service: Option<(&'static str, &'static str)>,
    /// Whether that Service is labelled `istio.io/use-waypoint: wp`.
    pub waypoint: bool,
    /// Whether the waypoint applies the realistic policy set ([`POLICY_SET`]) to it.
    pub policies: bool,
}

pub const HTTP_ROWS: &[HttpRow] = &[
    HttpRow {
        name: DIRECT,
        about: "no mesh: plain client on node1 to the plain server pod on node2",
        client: PLAIN_CLIENT,
        server: PLAIN_SERVER_CROSS,
        service: None,
        waypoint: false,
        policies: false,
    },
    HttpRow {
        name: MESH,
        about: "enrolled client on node1 to Service bench-l4 (endpoint on node2): L4 HBONE only, \
                node1 agent to node2 agent",
        client: MESH_CLIENT,
        server: MESH_SERVER_CROSS,
        service: Some(("bench-l4", "10.96.0.30")),
        waypoint: false,
        policies: false,
    },
    HttpRow {
        name: MESH_WAYPOINT,
        about: "the same through Service bench-wp (istio.io/use-waypoint: wp): node1 agent to \
                the waypoint pod (node1), which parses each request and tunnels it to the node2 \
                agent",
        client: MESH_CLIENT,
        server: MESH_SERVER_CROSS,
        service: Some(("bench-wp", "10.96.0.31")),
        waypoint: true,
        policies: false,
    },
    HttpRow {
        name: MESH_WAYPOINT_POLICY,
        about: "the same through Service bench-wp-policy, to which the waypoint applies an \
                HTTPRoute (retry, timeouts) and a DestinationRule (connection-pool limits, \
                outlier detection, least-request balancing): the cost of the policy layers on \
                the success path",
        client: MESH_CLIENT,
        server: MESH_SERVER_CROSS,
        service: Some(("bench-wp-policy", "10.96.0.32")),
        waypoint: true,
        policies: true,
    },
];

/// The realistic policy set of issue 14's benchmark, for Service `{service}`: limits far above
/// the load, so that they are checked on every request but never reached.
const POLICY_SET: &str = "routes:
  - apiVersion: gateway.networking.k8s.io/v1
    kind: HTTPRoute
    metadata: { name: {service}, namespace: {ns} }
    spec:
      parentRefs: [{ group: '', kind: Service, name: {service} }]
      rules:
        - matches: [{ path: { type: PathPrefix, value: / } }]
          timeouts: { request: 10s, backendRequest: 5s }
          retry: { codes: [502, 503], attempts: 2, backoff: 25ms }
          backendRefs: [{ name: {service}, port: {port} }]
destinationRules:
  - apiVersion: networking.istio.io/v1
    kind: DestinationRule
    metadata: { name: {service}, namespace: {ns} }
    spec:
      host: {service}
      trafficPolicy:
        loadBalancer: { simple: LEAST_REQUEST }
        connectionPool:
          tcp: { maxConnections: 1024, connectTimeout: 1s }
          http: { http1MaxPendingRequests: 1024, http2MaxRequests: 10000, maxRetries: 64 }
        outlierDetection: { consecutive5xxErrors: 5, interval: 10s, baseEjectionTime: 30s, maxEjectionPercent: 50 }
";

/// Every pod the rows use, the waypoint's included.
pub fn pods() -> Vec<PodSpec> {
    let mut out = Vec::new();
    for p in HTTP_ROWS
        .iter()
        .flat_map(|r| [r.client, r.server])
        .chain([WAYPOINT_POD])
    {
        if !out.contains(&p) {
            out.push(p);
        }
    }
    out
}

/// The servers to start (each server pod once).
pub fn server_pods() -> Vec<PodSpec> {
    let mut out: Vec<PodSpec> = HTTP_ROWS.iter().map(|r| r.server).collect();
    out.dedup();
    out
}

/// The config's `services:` and `gateways:` for the rows (appended after the workloads).
pub fn services_config() -> String {
    let mut s = String::from("services:\n");
    for r in HTTP_ROWS {
        let Some((name, vip)) = r.service else {
            continue;
        };
        let _ = writeln!(
            s,
            "  - name: {name}\n    vips: [{vip}]\n    ports: [{{ port: {SERVICE_PORT}, targetPort: {HTTP_PORT} }}]\n    endpoints: [{}]",
            r.server.name
        );
        if r.waypoint {
            let _ = writeln!(s, "    labels: {{ istio.io/use-waypoint: {WAYPOINT} }}");
        }
    }
    let _ = writeln!(
        s,
        "gateways:\n  - apiVersion: gateway.networking.k8s.io/v1\n    kind: Gateway\n    metadata: {{ name: {WAYPOINT}, namespace: {} }}\n    spec: {{ gatewayClassName: istio-waypoint }}",
        crate::agent::MESH_NS
    );
    for r in HTTP_ROWS.iter().filter(|r| r.policies) {
        let Some((name, _)) = r.service else {
            continue;
        };
        s += &POLICY_SET
            .replace("{service}", name)
            .replace("{ns}", crate::agent::MESH_NS)
            .replace("{port}", &SERVICE_PORT.to_string());
    }
    s
}

// ---------------------------------------------------------------------------------------------
// figures

/// Issue 13's targets for the waypoint.
pub const TARGET_VCPU_PER_1K_RPS: f64 = 0.1;
pub const TARGET_RSS_BYTES: f64 = 30e6;
pub const TARGET_ADDED_P50_US: f64 = 150.0;
/// Issue 14's target for the policy layers on the success path.
pub const TARGET_POLICY_P50_US: f64 = 5.0;

/// One repetition's interleaved run of two rows (`mesh` and `mesh-waypoint`, or `mesh-waypoint`
/// and `mesh-waypoint-policy`): one client, one request at a time, alternating between the two
/// Services, so that both see the same machine at the same moment (the rows' own runs are
/// seconds apart, and this machine's drift between them is larger than the differences judged).
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Interleaved {
    /// The first row's p50 (`mesh`, or `mesh-waypoint`).
    pub base_p50_us: f64,
    /// The second's (`mesh-waypoint`, or `mesh-waypoint-policy`).
    pub other_p50_us: f64,
    /// Requests per side.
    pub requests: u64,
}

/// One repetition of one row.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct RepSample {
    /// Latency run: one connection, one request at a time.
    pub p50_us: f64,
    pub p90_us: f64,
    pub p99_us: f64,
    pub latency_rps: f64,
    /// Throughput run: several connections.
    pub rps: f64,
    pub requests: u64,
    /// CPU seconds over the throughput run: both agents summed, and the waypoint process.
    pub agents_cpu_s: f64,
    pub waypoint_cpu_s: Option<f64>,
}

/// CPU seconds per 1,000 requests. Numerically this is also the vCPU a steady 1,000 requests/s
/// needs (1,000 requests/s for one second is 1,000 requests).
pub fn cpu_per_1k(cpu_s: f64, requests: u64) -> Option<f64> {
    (requests > 0 && cpu_s.is_finite() && cpu_s >= 0.0).then(|| cpu_s / (requests as f64 / 1e3))
}

/// A reported figure of a row.
pub struct HttpMetric {
    pub key: &'static str,
    pub label: &'static str,
    pub digits: usize,
}

const fn hm(key: &'static str, label: &'static str, digits: usize) -> HttpMetric {
    HttpMetric { key, label, digits }
}

pub const HTTP_METRICS: &[HttpMetric] = &[
    hm("p50_us", "p50 (µs)", 1),
    hm("p90_us", "p90 (µs)", 1),
    hm("p99_us", "p99 (µs)", 1),
    hm("latency_rps", "req/s, 1 connection", 0),
    hm("rps", "req/s, N connections", 0),
    hm("agents_cpu_s_per_1k_req", "Agents' CPU s per 1,000 req", 4),
    hm(
        "waypoint_cpu_s_per_1k_req",
        "Waypoint CPU s per 1,000 req",
        4,
    ),
];

#[derive(Debug, Clone)]
pub struct HttpRowResult {
    pub row: HttpRow,
    pub samples: Vec<RepSample>,
    pub metrics: BTreeMap<&'static str, Stat>,
}

#[derive(Debug, Clone)]
pub struct HttpResults {
    /// Connections of the throughput run.
    pub conns: usize,
    pub rows: Vec<HttpRowResult>,
    /// `mesh-waypoint` p50 minus `mesh` p50 in the interleaved runs ([`Interleaved`]), per
    /// repetition; from the rows' own runs when there are none.
    pub added_p50_us: Option<Stat>,
    /// The same from the rows' own latency runs (seconds apart), for comparison.
    pub added_p50_rows_us: Option<Stat>,
    pub waypoint_pairs: Vec<Interleaved>,
    /// `mesh-waypoint-policy` p50 minus `mesh-waypoint` p50 in the interleaved run
    /// ([`Interleaved`]), per repetition: what the policy layers add on the success path.
    pub policy_p50_us: Option<Stat>,
    /// The same from the rows' own latency runs (seconds apart), for comparison.
    pub policy_p50_rows_us: Option<Stat>,
    pub policy_pairs: Vec<Interleaved>,
    pub waypoint_node: &'static str,
    /// The waypoint's VmRSS after the runs and its peak (VmHWM), bytes.
    pub waypoint_rss_bytes: u64,
    pub waypoint_peak_rss_bytes: u64,
}

impl HttpResults {
    /// The figures of every row (samples in repetition order) and the paired p50 difference.
    pub fn new(
        conns: usize,
        rows: Vec<(HttpRow, Vec<RepSample>)>,
        waypoint_pairs: Vec<Interleaved>,
        policy_pairs: Vec<Interleaved>,
        waypoint_rss_bytes: u64,
        waypoint_peak_rss_bytes: u64,
    ) -> HttpResults {
        let rows: Vec<HttpRowResult> = rows
            .into_iter()
            .map(|(row, samples)| {
                let mut metrics = BTreeMap::new();
                let mut put = |k: &'static str, v: Vec<f64>| {
                    if let Some(s) = Stat::of(&v) {
                        metrics.insert(k, s);
                    }
                };
                let f = |g: fn(&RepSample) -> f64| samples.iter().map(g).collect::<Vec<f64>>();
                put("p50_us", f(|s| s.p50_us));
                put("p90_us", f(|s| s.p90_us));
                put("p99_us", f(|s| s.p99_us));
                put("latency_rps", f(|s| s.latency_rps));
                put("rps", f(|s| s.rps));
                let per_1k = |cpu: fn(&RepSample) -> Option<f64>| -> Vec<f64> {
                    samples
                        .iter()
                        .filter_map(|s| cpu_per_1k(cpu(s)?, s.requests))
                        .collect()
                };
                if row.service.is_some() {
                    put("agents_cpu_s_per_1k_req", per_1k(|s| Some(s.agents_cpu_s)));
                }
                put("waypoint_cpu_s_per_1k_req", per_1k(|s| s.waypoint_cpu_s));
                HttpRowResult {
                    row,
                    samples,
                    metrics,
                }
            })
            .collect();
        let p50s = |name: &str| -> Vec<f64> {
            rows.iter()
                .find(|r| r.row.name == name)
                .map(|r| r.samples.iter().map(|s| s.p50_us).collect())
                .unwrap_or_default()
        };
        let paired = |a: &str, b: &str| -> Vec<f64> {
            p50s(a).iter().zip(p50s(b)).map(|(x, y)| x - y).collect()
        };
        let diffs = paired(MESH_WAYPOINT, MESH);
        let policy = paired(MESH_WAYPOINT_POLICY, MESH_WAYPOINT);
        let added = |pairs: &[Interleaved]| -> Vec<f64> {
            pairs
                .iter()
                .map(|p| p.other_p50_us - p.base_p50_us)
                .collect()
        };
        let interleaved = added(&policy_pairs);
        let waypoint = added(&waypoint_pairs);
        HttpResults {
            conns,
            rows,
            added_p50_us: Stat::of(if waypoint.is_empty() {
                &diffs
            } else {
                &waypoint
            }),
            added_p50_rows_us: Stat::of(&diffs),
            waypoint_pairs,
            policy_p50_us: Stat::of(&interleaved),
            policy_p50_rows_us: Stat::of(&policy),
            policy_pairs,
            waypoint_node: WAYPOINT_POD.node,
            waypoint_rss_bytes,
            waypoint_peak_rss_bytes,
        }
    }

    fn row(&self, name: &str) -> Option<&HttpRowResult> {
        self.rows.iter().find(|r| r.row.name == name)
    }

    fn median(&self, row: &str, key: &str) -> Option<f64> {
        Some(self.row(row)?.metrics.get(key)?.median)
    }

    /// `row / direct` of a figure's medians.
    pub fn ratio_to_direct(&self, row: &str, key: &str) -> Option<f64> {
        let b = self.median(DIRECT, key)?;
        let v = self.median(row, key)?;
        (b != 0.0).then(|| v / b)
    }

    /// Issue 13's targets, evaluated (reported, never asserted).
    pub fn targets(&self) -> Vec<Target> {
        let cpu = self.median(MESH_WAYPOINT, "waypoint_cpu_s_per_1k_req");
        let added = self.added_p50_us.as_ref().map(|s| s.median);
        let policy = self.policy_p50_us.as_ref().map(|s| s.median);
        let peak = self.waypoint_peak_rss_bytes as f64;
        vec![
            Target {
                what: "Waypoint CPU per 1,000 requests/s (CPU s per 1,000 requests)".into(),
                goal: format!(
                    "≤ {TARGET_VCPU_PER_1K_RPS} vCPU (Istio's Envoy waypoint: about 0.25)"
                ),
                value: cpu.map_or("not run".into(), |c| format!("{c:.3} vCPU")),
                met: cpu.map(|c| c <= TARGET_VCPU_PER_1K_RPS),
            },
            Target {
                what: "Waypoint RSS, peak (VmHWM) over the runs".into(),
                goal: "≤ 30 MB (Istio's Envoy waypoint: about 60 MB)".into(),
                value: format!(
                    "{} ({} bytes); {} after the runs",
                    mib(peak),
                    fmt_num(peak, 0),
                    mib(self.waypoint_rss_bytes as f64)
                ),
                met: (self.waypoint_peak_rss_bytes > 0).then_some(peak <= TARGET_RSS_BYTES),
            },
            Target {
                what: format!("Added p50 latency, {MESH_WAYPOINT} − {MESH}, interleaved"),
                goal: format!("≤ {TARGET_ADDED_P50_US:.0} µs"),
                value: added.map_or("not run".into(), |a| format!("{a:.1} µs")),
                met: added.map(|a| a <= TARGET_ADDED_P50_US),
            },
            Target {
                what: format!(
                    "Policy layers' added p50, {MESH_WAYPOINT_POLICY} − {MESH_WAYPOINT}, \
                     interleaved (issue 14)"
                ),
                goal: format!("≤ {TARGET_POLICY_P50_US:.0} µs"),
                value: policy.map_or("not run".into(), |a| format!("{a:.1} µs")),
                met: policy.map(|a| a <= TARGET_POLICY_P50_US),
            },
        ]
    }

    pub fn to_json(&self) -> Value {
        let pod = |p: &PodSpec| json!({"pod": p.name, "node": p.node, "enrolled": p.mesh});
        let rows: Vec<Value> = self
            .rows
            .iter()
            .map(|r| {
                let metrics: Map<String, Value> = r
                    .metrics
                    .iter()
                    .map(|(k, v)| (k.to_string(), v.to_json()))
                    .collect();
                let ratios: Map<String, Value> = ["p50_us", "p90_us", "p99_us", "latency_rps", "rps"]
                    .iter()
                    .filter_map(|k| Some((k.to_string(), json!(self.ratio_to_direct(r.row.name, k)?))))
                    .collect();
                json!({
                    "name": r.row.name,
                    "about": r.row.about,
                    "client": pod(&r.row.client),
                    "server": pod(&r.row.server),
                    "service": r.row.service.map(|(n, vip)| json!({"name": n, "vip": vip, "port": SERVICE_PORT})),
                    "waypoint": r.row.waypoint.then_some(WAYPOINT),
                    "metrics": metrics,
                    "ratios_to_direct": ratios,
                    "requests_per_throughput_run": r.samples.iter().map(|s| s.requests).collect::<Vec<_>>(),
                })
            })
            .collect();
        let cpu = self.median(MESH_WAYPOINT, "waypoint_cpu_s_per_1k_req");
        json!({
            "protocol": "HTTP/1.1 keep-alive",
            "method": "POST",
            "request_body_bytes": BODY_BYTES,
            "response_body_bytes": BODY_BYTES,
            "latency_run_connections": 1,
            "throughput_run_connections": self.conns,
            "rows": rows,
            "added_p50_us": self.added_p50_us.as_ref().map(Stat::to_json),
            "policy_added_p50_us": self.policy_p50_us.as_ref().map(Stat::to_json),
            "policy_added_p50_rows_us": self.policy_p50_rows_us.as_ref().map(Stat::to_json),
            "added_p50_rows_us": self.added_p50_rows_us.as_ref().map(Stat::to_json),
            "waypoint_pairs": self.waypoint_pairs.iter().map(|p| json!({
                "mesh_p50_us": p.base_p50_us,
                "waypoint_p50_us": p.other_p50_us,
                "requests_per_side": p.requests,
            })).collect::<Vec<_>>(),
            "policy_pairs": self.policy_pairs.iter().map(|p| json!({
                "bare_p50_us": p.base_p50_us,
                "policy_p50_us": p.other_p50_us,
                "requests_per_side": p.requests,
            })).collect::<Vec<_>>(),
            "waypoint": {
                "gateway": WAYPOINT,
                "pod": WAYPOINT_POD.name,
                "node": self.waypoint_node,
                "cpu_s_per_1k_req": cpu,
                "vcpu_per_1k_rps": cpu,
                "rss_bytes_after_runs": self.waypoint_rss_bytes,
                "peak_rss_bytes": self.waypoint_peak_rss_bytes,
            },
            "targets": self.targets().into_iter().map(|t| json!({"what": t.what, "goal": t.goal, "value": t.value, "met": t.met})).collect::<Vec<_>>(),
        })
    }

    pub fn markdown(&self, reps: u64) -> String {
        let mut s = String::new();
        let _ = writeln!(
            s,
            "\n**HTTP/1.1 keep-alive, POST with {BODY_BYTES}-byte body, {BODY_BYTES}-byte response \
             (median of {reps} repetitions, rows interleaved in each; latency: 1 connection, one \
             request at a time; req/s, N connections: N = {}; × ratio to `{DIRECT}`)**\n",
            self.conns
        );
        let _ = write!(s, "| Row |");
        for m in HTTP_METRICS {
            let _ = write!(s, " {} |", m.label.replace('N', &self.conns.to_string()));
        }
        let _ = writeln!(s, "\n|---|{}", "---:|".repeat(HTTP_METRICS.len()));
        for r in &self.rows {
            let _ = write!(s, "| `{}` |", r.row.name);
            for m in HTTP_METRICS {
                let cell = match r.metrics.get(m.key) {
                    None => "—".to_string(),
                    Some(st) => {
                        let v = fmt_num(st.median, m.digits);
                        match self.ratio_to_direct(r.row.name, m.key) {
                            Some(x) if r.row.name != DIRECT && !m.key.contains("cpu") => {
                                format!("{v} ({x:.2}×)")
                            }
                            _ => v,
                        }
                    }
                };
                let _ = write!(s, " {cell} |");
            }
            let _ = writeln!(s);
        }
        let _ = writeln!(s, "\nSpread (min – max over the repetitions):\n");
        let _ = writeln!(
            s,
            "| Row | p50 (µs) | p99 (µs) | req/s, {} connections |\n|---|---:|---:|---:|",
            self.conns
        );
        for r in &self.rows {
            let cell = |k: &str, d: usize| {
                r.metrics.get(k).map_or("—".into(), |st| {
                    format!("{} – {}", fmt_num(st.min, d), fmt_num(st.max, d))
                })
            };
            let _ = writeln!(
                s,
                "| `{}` | {} | {} | {} |",
                r.row.name,
                cell("p50_us", 1),
                cell("p99_us", 1),
                cell("rps", 0)
            );
        }
        if let Some(a) = &self.added_p50_us {
            let how = if self.waypoint_pairs.is_empty() {
                "per repetition, from the rows' runs".to_string()
            } else {
                let runs: Vec<String> = self
                    .waypoint_pairs
                    .iter()
                    .map(|p| format!("{:.0} vs {:.0} µs", p.other_p50_us, p.base_p50_us))
                    .collect();
                format!(
                    "one client alternating requests between the two Services, one run per repetition: {}",
                    runs.join("; ")
                )
            };
            let _ = writeln!(
                s,
                "\nAdded p50, `{MESH_WAYPOINT}` − `{MESH}` ({how}): median {:.1} µs, min {:.1}, max {:.1}.",
                a.median, a.min, a.max
            );
        }
        if let (Some(a), false) = (&self.added_p50_rows_us, self.waypoint_pairs.is_empty()) {
            let _ = writeln!(
                s,
                "The same from the rows' own latency runs (seconds apart, for comparison): median {:.1} µs, min {:.1}, max {:.1}.",
                a.median, a.min, a.max
            );
        }
        if let Some(a) = &self.policy_p50_us {
            let runs: Vec<String> = self
                .policy_pairs
                .iter()
                .map(|p| {
                    format!(
                        "{:.0} vs {:.0} µs over {} requests each",
                        p.other_p50_us, p.base_p50_us, p.requests
                    )
                })
                .collect();
            let _ = writeln!(
                s,
                "Policy layers' added p50, `{MESH_WAYPOINT_POLICY}` − `{MESH_WAYPOINT}`, one client alternating requests between the two Services (one run per repetition: {}): median {:.1} µs, min {:.1}, max {:.1}.",
                runs.join("; "),
                a.median,
                a.min,
                a.max
            );
        }
        if let Some(a) = &self.policy_p50_rows_us {
            let _ = writeln!(
                s,
                "The same from the rows' own latency runs (seconds apart, for comparison): median {:.1} µs, min {:.1}, max {:.1}.",
                a.median, a.min, a.max
            );
        }
        let _ = writeln!(
            s,
            "Waypoint (pod `{}` on {}): VmRSS after the runs {}, peak (VmHWM) {}.",
            WAYPOINT_POD.name,
            self.waypoint_node,
            mib(self.waypoint_rss_bytes as f64),
            mib(self.waypoint_peak_rss_bytes as f64)
        );
        super::report::targets_table(
            &mut s,
            "Waypoint targets (issue 13; reported, not asserted)",
            &self.targets(),
        );
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use mesh_agent::state::{State, Via};

    fn sample(p50: f64, rps: f64, requests: u64, wp_cpu: Option<f64>) -> RepSample {
        RepSample {
            p50_us: p50,
            p90_us: p50 * 1.5,
            p99_us: p50 * 3.0,
            latency_rps: 1e6 / p50,
            rps,
            requests,
            agents_cpu_s: 1.0,
            waypoint_cpu_s: wp_cpu,
        }
    }

    fn results(wp_p50: [f64; 3], wp_cpu: f64, peak: u64) -> HttpResults {
        let rows = vec![
            (
                HTTP_ROWS[0],
                vec![
                    sample(50.0, 20_000.0, 200_000, None),
                    sample(60.0, 20_000.0, 200_000, None),
                    sample(55.0, 20_000.0, 200_000, None),
                ],
            ),
            (
                HTTP_ROWS[1],
                vec![
                    sample(100.0, 10_000.0, 100_000, None),
                    sample(200.0, 10_000.0, 100_000, None),
                    sample(110.0, 10_000.0, 100_000, None),
                ],
            ),
            (
                HTTP_ROWS[2],
                wp_p50
                    .iter()
                    .map(|&p| sample(p, 5_000.0, 50_000, Some(wp_cpu)))
                    .collect(),
            ),
        ];
        HttpResults::new(8, rows, Vec::new(), Vec::new(), peak / 2, peak)
    }

    #[test]
    fn rows_share_the_scenarios_pods_and_the_waypoint_has_its_own() {
        let all = crate::bench::scenario::select(&["all".into()]).unwrap();
        let mut pods_all = crate::bench::scenario::pods(&all).unwrap();
        crate::bench::scenario::add_pods(&mut pods_all, pods()).unwrap();
        assert!(pods_all.contains(&WAYPOINT_POD));
        assert!(HTTP_ROWS
            .iter()
            .all(|r| r.client != WAYPOINT_POD && r.server != WAYPOINT_POD));
        assert_eq!(server_pods(), [PLAIN_SERVER_CROSS, MESH_SERVER_CROSS]);
        assert_eq!(HTTP_ROWS.iter().filter(|r| r.waypoint).count(), 2);
        assert_eq!(HTTP_ROWS.iter().filter(|r| r.policies).count(), 1);
    }

    #[test]
    fn cpu_per_thousand_requests() {
        assert_eq!(cpu_per_1k(2.0, 40_000), Some(0.05));
        assert_eq!(cpu_per_1k(1.0, 0), None);
        assert_eq!(cpu_per_1k(f64::NAN, 10), None);
        assert_eq!(cpu_per_1k(-0.1, 10), None);
    }

    #[test]
    fn added_p50_is_the_median_of_paired_differences() {
        // Differences per repetition: 100, 120, 90 (not the difference of the medians: 100).
        let r = results([200.0, 320.0, 200.0], 2.5, 20 << 20);
        let a = r.added_p50_us.as_ref().unwrap();
        assert_eq!((a.median, a.min, a.max), (100.0, 90.0, 120.0));
        assert_eq!(a.samples, vec![100.0, 120.0, 90.0]);
        let wp = r.row(MESH_WAYPOINT).unwrap();
        // 2.5 CPU s over 50,000 requests.
        assert_eq!(wp.metrics["waypoint_cpu_s_per_1k_req"].median, 0.05);
        // No waypoint CPU for the other rows, no agent CPU for the direct row.
        assert!(!r
            .row(MESH)
            .unwrap()
            .metrics
            .contains_key("waypoint_cpu_s_per_1k_req"));
        assert!(!r
            .row(DIRECT)
            .unwrap()
            .metrics
            .contains_key("agents_cpu_s_per_1k_req"));
        assert_eq!(r.ratio_to_direct(MESH, "rps"), Some(0.5));
    }

    #[test]
    fn targets_pass_and_fail_at_their_bounds() {
        let met = |r: &HttpResults| r.targets().iter().map(|t| t.met).collect::<Vec<_>>();
        // 0.1 vCPU, 30 MB and 150 µs exactly are met.
        let at = results([250.0, 350.0, 260.0], 5.0, 30_000_000 / 1024 * 1024);
        assert_eq!(met(&at), [Some(true), Some(true), Some(true), None]);
        let over = results([261.0, 351.0, 261.0], 5.1, 30_001_152);
        assert_eq!(met(&over), [Some(false), Some(false), Some(false), None]);
        // Without a waypoint row nothing is judged but the memory, which was not read either.
        let none = HttpResults::new(
            8,
            vec![(HTTP_ROWS[0], vec![sample(50.0, 1.0, 1, None)])],
            Vec::new(),
            Vec::new(),
            0,
            0,
        );
        assert_eq!(met(&none), [None, None, None, None]);
        // The policy layers: judged on the interleaved runs, 5 µs over the bare waypoint is
        // met, 5.5 is not, whatever the rows' own runs say.
        let with_policy = |p50: f64| {
            let rows: Vec<(HttpRow, Vec<RepSample>)> = vec![
                (
                    HTTP_ROWS[2],
                    vec![sample(200.0, 5_000.0, 50_000, Some(2.5))],
                ),
                (
                    HTTP_ROWS[3],
                    vec![sample(260.0, 5_000.0, 50_000, Some(2.5))],
                ),
            ];
            let pair = |bare: f64, policy: f64| Interleaved {
                base_p50_us: bare,
                other_p50_us: policy,
                requests: 1000,
            };
            let pairs = vec![
                pair(300.0, p50),
                pair(200.0, p50 - 100.0),
                pair(250.0, 250.0),
            ];
            HttpResults::new(8, rows, Vec::new(), pairs, 0, 0)
        };
        let r = with_policy(305.0);
        assert_eq!(met(&r)[3], Some(true));
        assert_eq!(r.policy_p50_us.as_ref().unwrap().samples, [5.0, 5.0, 0.0]);
        assert_eq!(r.policy_p50_rows_us.as_ref().unwrap().median, 60.0);
        assert_eq!(met(&with_policy(305.5))[3], Some(false));
        // The waypoint's added p50 is judged on its interleaved runs when there are some.
        let rows = vec![
            (HTTP_ROWS[1], vec![sample(100.0, 1.0, 1, None)]),
            (HTTP_ROWS[2], vec![sample(400.0, 1.0, 1, Some(0.1))]),
        ];
        let w = Interleaved {
            base_p50_us: 200.0,
            other_p50_us: 340.0,
            requests: 1000,
        };
        let r = HttpResults::new(8, rows, vec![w], Vec::new(), 0, 0);
        assert_eq!(r.added_p50_us.as_ref().unwrap().median, 140.0);
        assert_eq!(r.added_p50_rows_us.as_ref().unwrap().median, 300.0);
        assert_eq!(met(&r)[2], Some(true));
        assert!(r.markdown(1).contains("340 vs 200 µs"), "{}", r.markdown(1));
        let md = with_policy(305.0).markdown(3);
        assert!(md.contains("305 vs 300 µs over 1000 requests each"), "{md}");
    }

    #[test]
    fn report_has_the_three_rows_ratios_and_verdicts() {
        let r = results([200.0, 320.0, 200.0], 2.5, 20 << 20);
        let md = r.markdown(3);
        for row in ["`direct`", "`mesh`", "`mesh-waypoint`"] {
            assert!(md.contains(&format!("| {row} |")), "{md}");
        }
        assert!(md.contains("req/s, 8 connections"), "{md}");
        // mesh p50 110 over direct 55.
        assert!(md.contains("| `mesh` | 110.0 (2.00×) |"), "{md}");
        assert!(md.contains("median 100.0 µs"), "{md}");
        assert!(md.contains("| 0.050 vCPU | met |"), "{md}");
        assert!(md.contains("20.0 MiB"), "{md}");
        let v = r.to_json();
        assert_eq!(v["rows"].as_array().unwrap().len(), 3);
        assert_eq!(v["rows"][2]["service"]["vip"], "10.96.0.31");
        assert_eq!(v["rows"][2]["waypoint"], WAYPOINT);
        assert_eq!(v["rows"][1]["ratios_to_direct"]["rps"], 0.5);
        assert_eq!(v["waypoint"]["vcpu_per_1k_rps"], 0.05);
        assert_eq!(v["waypoint"]["peak_rss_bytes"], 20 << 20);
        assert_eq!(v["added_p50_us"]["median"], 100.0);
        assert_eq!(v["targets"][2]["met"], true);
    }

    /// The Services and Gateway the bench writes are what the agent reads: the L4 Service goes
    /// straight to its endpoint, the other through the waypoint, whose pod is the bench's.
    #[test]
    fn services_config_routes_only_the_waypoint_row_through_the_waypoint() {
        let mut text = format!(
            "namespaces:\n  - name: {}\n    labels: {{ istio.io/dataplane-mode: ambient }}\nworkloads:\n",
            crate::agent::MESH_NS
        );
        for (i, p) in pods().iter().filter(|p| p.mesh).enumerate() {
            let _ = writeln!(
                text,
                "  - name: {n}\n    namespace: {ns}\n    serviceAccount: {sa}\n    node: {node}\n    ips: [10.20.1.{ip}]\n    netns: /run/netns/{n}\n    labels:\n      app: {n}",
                n = p.name,
                ns = crate::agent::MESH_NS,
                sa = if *p == WAYPOINT_POD { WAYPOINT } else { p.name },
                node = p.node,
                ip = i + 2
            );
            if *p == WAYPOINT_POD {
                let _ = writeln!(
                    text,
                    "      gateway.networking.k8s.io/gateway-name: {WAYPOINT}"
                );
            }
        }
        text += &services_config();
        let mesh = mesh_agent::config::parse(std::path::Path::new("bench.yaml"), &text)
            .unwrap_or_else(|e| panic!("{e}\n{text}"));
        let state = State::from_mesh(&mesh, "node1");
        for row in HTTP_ROWS {
            let Some((name, vip)) = row.service else {
                continue;
            };
            let svc = state.service_by_vip(vip.parse().unwrap()).expect(name);
            assert_eq!(svc.spec.name, name);
            assert_eq!(svc.endpoints.len(), 1);
            assert_eq!(svc.endpoints[0].name, row.server.name);
            match (&svc.via, row.waypoint) {
                (Via::Direct, false) => {}
                (Via::Waypoint(w), true) => {
                    let pods: Vec<&str> = w.pods.iter().map(|p| p.name.as_str()).collect();
                    assert_eq!(pods, [WAYPOINT_POD.name]);
                }
                (via, _) => panic!("{name}: {via:?}"),
            }
        }
    }
}

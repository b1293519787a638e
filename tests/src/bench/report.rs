//! Output: `bench.json` (every figure and the machine facts), Markdown tables with ratios to the
//! baseline, and `bench.svg` (a bar chart of the main ratios, written by hand).
use std::fmt::Write as _;
use std::path::Path;

use anyhow::{Context, Result};
use serde_json::{json, Map, Value};

use super::{Results, ScenarioResult, BASELINE};

/// One reported figure.
pub struct MetricDef {
    pub key: &'static str,
    pub label: &'static str,
    pub unit: &'static str,
    pub higher_is_better: bool,
    pub digits: usize,
    /// Whether a ratio to the baseline means something (not for agent costs: the baseline has no
    /// agent in its path).
    pub ratio: bool,
}

const fn m(
    key: &'static str,
    label: &'static str,
    unit: &'static str,
    higher_is_better: bool,
    digits: usize,
    ratio: bool,
) -> MetricDef {
    MetricDef {
        key,
        label,
        unit,
        higher_is_better,
        digits,
        ratio,
    }
}

pub const METRICS: &[MetricDef] = &[
    m(
        "tput_1_gbps",
        "Throughput, 1 stream",
        "Gbit/s",
        true,
        2,
        true,
    ),
    m(
        "tput_8_gbps",
        "Throughput, 8 streams",
        "Gbit/s",
        true,
        2,
        true,
    ),
    m(
        "rr_p50_us",
        "1 KiB req/resp latency p50",
        "µs",
        false,
        1,
        true,
    ),
    m(
        "rr_p90_us",
        "1 KiB req/resp latency p90",
        "µs",
        false,
        1,
        true,
    ),
    m(
        "rr_p99_us",
        "1 KiB req/resp latency p99",
        "µs",
        false,
        1,
        true,
    ),
    m(
        "rr_p999_us",
        "1 KiB req/resp latency p99.9",
        "µs",
        false,
        1,
        true,
    ),
    m(
        "rr_rps",
        "1 KiB req/resp rate (1 connection)",
        "req/s",
        true,
        0,
        true,
    ),
    m(
        "crr_cps",
        "Connection rate (connect, 1-byte echo, close)",
        "conn/s",
        true,
        0,
        true,
    ),
    m(
        "crr_p50_us",
        "Connection setup latency p50",
        "µs",
        false,
        1,
        true,
    ),
    m(
        "crr_p99_us",
        "Connection setup latency p99",
        "µs",
        false,
        1,
        true,
    ),
    m(
        "cpu_s_per_gib",
        "Agent CPU per GiB moved",
        "CPU s",
        false,
        3,
        false,
    ),
    m(
        "cpu_s_per_10k_req",
        "Agent CPU per 10k requests",
        "CPU s",
        false,
        3,
        false,
    ),
    m(
        "cpu_s_per_10k_conn",
        "Agent CPU per 10k connections",
        "CPU s",
        false,
        3,
        false,
    ),
    m(
        "idle_conn_bytes",
        "Agent RSS per idle proxied connection",
        "bytes",
        false,
        0,
        false,
    ),
];

/// The figures of the chart: (metric, label).
const CHART: &[(&str, &str)] = &[
    ("tput_1_gbps", "Throughput, 1 stream"),
    ("tput_8_gbps", "Throughput, 8 streams"),
    ("rr_p99_us", "Req/resp p99 latency"),
    ("crr_cps", "Connection rate"),
];

fn baseline(r: &Results) -> Option<&ScenarioResult> {
    r.scenarios.iter().find(|s| s.scenario.name == BASELINE)
}

fn scenario<'a>(r: &'a Results, name: &str) -> Option<&'a ScenarioResult> {
    r.scenarios.iter().find(|s| s.scenario.name == name)
}

/// `scenario / baseline` of the medians.
pub fn ratio(r: &Results, s: &ScenarioResult, key: &str) -> Option<f64> {
    let b = baseline(r)?.metrics.get(key)?.median;
    let v = s.metrics.get(key)?.median;
    (b != 0.0).then(|| v / b)
}

pub(super) fn fmt_num(v: f64, digits: usize) -> String {
    if !v.is_finite() {
        return "—".into();
    }
    if digits > 0 {
        return format!("{v:.digits$}");
    }
    let n = v.round() as i64;
    let s = n.unsigned_abs().to_string();
    let mut out = String::new();
    for (i, c) in s.chars().enumerate() {
        if i > 0 && (s.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    if n < 0 {
        format!("-{out}")
    } else {
        out
    }
}

pub(super) fn mib(b: f64) -> String {
    format!("{:.1} MiB", b / (1u64 << 20) as f64)
}

// ---------------------------------------------------------------------------------------------
// targets

pub struct Target {
    pub what: String,
    pub goal: String,
    pub value: String,
    pub met: Option<bool>,
}

/// The issue's targets, evaluated (reported, never asserted).
/// A titled Markdown table of targets: goal, measured value, met or not.
pub fn targets_table(s: &mut String, title: &str, targets: &[Target]) {
    let _ = writeln!(s, "\n**{title}**\n");
    let _ = writeln!(s, "| Target | Goal | Measured | |\n|---|---|---:|---|");
    for t in targets {
        let _ = writeln!(
            s,
            "| {} | {} | {} | {} |",
            t.what,
            t.goal,
            t.value,
            match t.met {
                Some(true) => "met",
                Some(false) => "**not met**",
                None => "—",
            }
        );
    }
}

pub fn targets(r: &Results) -> Vec<Target> {
    let mut out = Vec::new();
    let med = |sc: &str, k: &str| scenario(r, sc)?.metrics.get(k).map(|s| s.median);
    let tput = scenario(r, "mesh-cross-node").and_then(|s| ratio(r, s, "tput_1_gbps"));
    out.push(Target {
        what: "Cross-node mesh throughput, 1 stream, vs direct".into(),
        goal: "≥ 50 %".into(),
        value: tput.map_or("not run".into(), |t| format!("{:.0} %", t * 100.0)),
        met: tput.map(|t| t >= 0.5),
    });
    for (mesh, plain) in [
        ("mesh-cross-node", "direct"),
        ("mesh-same-node", "direct-same-node"),
    ] {
        let added = med(mesh, "rr_p50_us")
            .zip(med(plain, "rr_p50_us"))
            .map(|(a, b)| a - b);
        out.push(Target {
            what: format!("Added p50 request latency, {mesh} − {plain}"),
            goal: "≤ 60 µs".into(),
            value: added.map_or("not run".into(), |a| format!("{a:.1} µs")),
            met: added.map(|a| a <= 60.0),
        });
    }
    for mesh in ["mesh-cross-node", "mesh-same-node"] {
        let cps = med(mesh, "crr_cps");
        out.push(Target {
            what: format!("New mesh connections per second, {mesh}"),
            goal: "≥ 5,000/s".into(),
            value: cps.map_or("not run".into(), |c| format!("{}/s", fmt_num(c, 0))),
            met: cps.map(|c| c >= 5000.0),
        });
    }
    out.push(Target {
        what: "Agent RSS idle (node1, median of fresh starts)".into(),
        goal: "≤ 30 MB".into(),
        value: format!(
            "{} ({} bytes)",
            mib(r.rss_idle.median),
            fmt_num(r.rss_idle.median, 0)
        ),
        met: Some(r.rss_idle.median <= 30e6),
    });
    let per_pod = r.pod_steps.last();
    out.push(Target {
        what: format!(
            "Agent RSS per enrolled pod (at {} pods)",
            per_pod.map_or(0, |p| p.pods)
        ),
        goal: "≤ 64 KiB".into(),
        value: per_pod.map_or("not run".into(), |p| {
            format!(
                "{} bytes ({:.1} KiB)",
                fmt_num(p.bytes_per_pod, 0),
                p.bytes_per_pod / 1024.0
            )
        }),
        met: per_pod.map(|p| p.bytes_per_pod <= 65536.0),
    });
    for mesh in ["mesh-cross-node", "mesh-same-node"] {
        let b = scenario(r, mesh)
            .filter(|s| s.idle.conns > 0)
            .map(|s| s.idle.bytes_per_conn);
        out.push(Target {
            what: format!("Agent RSS per idle proxied connection, {mesh} (both agents)"),
            goal: "≤ 32 KiB".into(),
            value: b.map_or("not run".into(), |b| {
                format!("{} bytes ({:.1} KiB)", fmt_num(b, 0), b / 1024.0)
            }),
            met: b.map(|b| b <= 32768.0),
        });
    }
    out
}

// ---------------------------------------------------------------------------------------------
// JSON

pub fn to_json(r: &Results) -> Value {
    let scenarios: Vec<Value> = r
        .scenarios
        .iter()
        .map(|s| {
            let metrics: Map<String, Value> = s
                .metrics
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_json()))
                .collect();
            let ratios: Map<String, Value> = METRICS
                .iter()
                .filter(|d| d.ratio)
                .filter_map(|d| Some((d.key.to_string(), json!(ratio(r, s, d.key)?))))
                .collect();
            let ebpf: Map<String, Value> = s
                .ebpf
                .iter()
                .map(|(k, p)| {
                    (
                        k.clone(),
                        json!({
                            "run_time_ns": p.run_time_ns,
                            "run_cnt": p.run_cnt,
                            "ns_per_run": (p.run_cnt > 0).then(|| p.run_time_ns as f64 / p.run_cnt as f64),
                        }),
                    )
                })
                .collect();
            let pod = |p: &super::scenario::PodSpec| json!({"pod": p.name, "node": p.node, "enrolled": p.mesh});
            json!({
                "name": s.scenario.name,
                "about": s.scenario.about,
                "client": pod(&s.scenario.client),
                "server": pod(&s.scenario.server),
                "metrics": metrics,
                "ratios_to_baseline": ratios,
                "ebpf": ebpf,
                "crr_conns": s.crr_conns,
                "crr_errors": s.crr_errors,
                "idle_conns": {
                    "conns": s.idle.conns,
                    "agents": ["node1", "node2"],
                    "rss_before_bytes": s.idle.rss_before,
                    "rss_during_bytes": s.idle.rss_during,
                    "bytes_per_conn": s.idle.bytes_per_conn,
                    "open_secs": s.idle.open_secs,
                },
            })
        })
        .collect();
    let targets: Vec<Value> = targets(r)
        .into_iter()
        .map(|t| json!({"what": t.what, "goal": t.goal, "value": t.value, "met": t.met}))
        .collect();
    json!({
        "schema": 1,
        "machine": r.facts,
        "options": r.options,
        "baseline": BASELINE,
        "units": {
            "tput_*_gbps": "Gbit/s of delivered payload (10^9 bits/s)",
            "*_us": "microseconds",
            "rr_rps": "requests/s, one connection, closed loop",
            "crr_cps": "connections/s",
            "cpu_*": "agent user+system CPU seconds (both agents summed)",
            "idle_conn_bytes": "growth of both agents' RSS per held connection",
        },
        "metric_labels": METRICS.iter().map(|d| (d.key.to_string(), json!(format!("{} ({})", d.label, d.unit)))).collect::<Map<_, _>>(),
        "scenarios": scenarios,
        "agent": {
            "rss_idle_bytes": r.rss_idle.to_json(),
            "rss_after_traffic_bytes": r.agent_rss_after_traffic,
            "enrolled_pods": {
                "base_rss_bytes": r.pod_base_rss,
                "steps": r.pod_steps.iter().map(|p| json!({
                    "pods": p.pods,
                    "rss_bytes": p.rss_bytes,
                    "bytes_per_pod": p.bytes_per_pod,
                    "create_secs": p.create_secs,
                    "enroll_secs": p.enroll_secs,
                })).collect::<Vec<_>>(),
            },
            "shutdown_secs": r.agent_shutdown_secs,
        },
        "targets": targets,
        "http": r.http.as_ref().map(super::http::HttpResults::to_json),
        "upgrade": r.upgrade.as_ref().map(|u| json!({
            "scenario": u.scenario,
            "conns": u.conns,
            "errors": u.errors,
            "first_errors": u.first_errors,
            "p99_us": u.p99_us,
            "longest_setup_us": u.max_us,
            "long_lived": u.long_lived,
            "long_lived_roundtrips": u.long_lived_roundtrips,
            "long_lived_errors": u.long_lived_errors,
            "handover_ms": u.handover_ms,
            "kill": {
                "conns": u.kill_conns,
                "errors": u.kill_errors,
                "first_errors": u.kill_first_errors,
                "longest_setup_us": u.kill_max_us,
                "restart_ready_ms": u.restart_ms,
            },
        })),
        "bpf_stats_enabled": {"previous": r.bpf_stats_previous, "restored_to": r.bpf_stats_restored},
        "loadavg_at_end": r.loadavg_at_end,
        "leftovers": r.leftovers,
        "phases_secs": r.phases.iter().map(|(k, v)| (k.clone(), json!(v))).collect::<Map<_, _>>(),
        "wall_secs": r.wall_secs,
    })
}

// ---------------------------------------------------------------------------------------------
// Markdown

pub fn markdown(r: &Results) -> String {
    let f = &r.facts;
    let reps = r.options["reps"].as_u64().unwrap_or(0);
    let mut s = String::new();
    let _ = writeln!(
        s,
        "Commit `{}`, {}, {} ({} cores{}), kernel {}{}.",
        f["commit"].as_str().unwrap_or("?"),
        f["date"].as_str().unwrap_or("?"),
        f["cpu_model"].as_str().unwrap_or("?"),
        f["cores"],
        if f["virtualized"] == true { ", VM" } else { "" },
        f["kernel"].as_str().unwrap_or("?"),
        if r.options["quick"] == true {
            "; **quick run: sizes too small for meaningful figures**"
        } else {
            ""
        }
    );
    let _ = writeln!(
        s,
        "Median of {reps} repetitions; {} per throughput run, {} s per latency and connection-rate run; {}.\n",
        human_bytes(r.options["volume_bytes"].as_u64().unwrap_or(0)),
        r.options["duration_secs"],
        r.options["pinning"].as_str().unwrap_or("")
    );
    if let Some(note) = r.options["note"].as_str().filter(|n| !n.is_empty()) {
        let _ = writeln!(s, "Note: {note}\n");
    }
    let names: Vec<&str> = r.scenarios.iter().map(|s| s.scenario.name).collect();
    let header = |s: &mut String, first: &str| {
        let _ = writeln!(s, "| {first} | {} |", names.join(" | "));
        let _ = writeln!(s, "|---|{}", "---:|".repeat(names.len()));
    };
    let _ = writeln!(s, "**Figures (median; × ratio to `{BASELINE}`)**\n");
    header(&mut s, "Metric");
    for d in METRICS {
        let mut row = format!("| {} ({}) |", d.label, d.unit);
        for sc in &r.scenarios {
            let cell = match sc.metrics.get(d.key) {
                None => "—".to_string(),
                Some(st) => {
                    let v = fmt_num(st.median, d.digits);
                    match ratio(r, sc, d.key) {
                        Some(x) if d.ratio && sc.scenario.name != BASELINE => {
                            format!("{v} ({x:.2}×)")
                        }
                        _ => v,
                    }
                }
            };
            let _ = write!(row, " {cell} |");
        }
        let _ = writeln!(s, "{row}");
    }
    let _ = writeln!(s, "\n**Spread (min – max over the repetitions)**\n");
    header(&mut s, "Metric");
    for d in METRICS.iter().filter(|d| d.key != "idle_conn_bytes") {
        let mut row = format!("| {} |", d.label);
        for sc in &r.scenarios {
            let cell = sc.metrics.get(d.key).map_or("—".into(), |st| {
                format!(
                    "{} – {} (±{:.0} %)",
                    fmt_num(st.min, d.digits),
                    fmt_num(st.max, d.digits),
                    st.spread() * 50.0
                )
            });
            let _ = write!(row, " {cell} |");
        }
        let _ = writeln!(s, "{row}");
    }

    let _ = writeln!(
        s,
        "\n**eBPF run time per invocation (ns; runs during the performance phase, both nodes)**\n"
    );
    header(&mut s, "Program");
    let mut progs: Vec<&String> = r.scenarios.iter().flat_map(|s| s.ebpf.keys()).collect();
    progs.sort();
    progs.dedup();
    for p in progs.into_iter().filter(|p| {
        r.scenarios
            .iter()
            .any(|s| s.ebpf.get(*p).is_some_and(|x| x.run_cnt > 0))
    }) {
        let mut row = format!("| `{p}` |");
        for sc in &r.scenarios {
            let cell = sc
                .ebpf
                .get(p)
                .filter(|x| x.run_cnt > 0)
                .map_or("—".into(), |x| {
                    format!(
                        "{:.0} ({} runs)",
                        x.run_time_ns as f64 / x.run_cnt as f64,
                        fmt_num(x.run_cnt as f64, 0)
                    )
                });
            let _ = write!(row, " {cell} |");
        }
        let _ = writeln!(s, "{row}");
    }

    let _ = writeln!(s, "\n**Agent memory (VmRSS)**\n");
    let _ = writeln!(s, "| What | Value |\n|---|---:|");
    let _ = writeln!(
        s,
        "| Idle, node1 agent with the bench pods enrolled (median [min – max] of {} fresh starts) | {} [{} – {}] |",
        r.rss_idle.samples.len(),
        mib(r.rss_idle.median),
        mib(r.rss_idle.min),
        mib(r.rss_idle.max)
    );
    for (i, b) in r.agent_rss_after_traffic.iter().enumerate() {
        let _ = writeln!(
            s,
            "| node{} agent after the performance phase | {} |",
            i + 1,
            mib(*b as f64)
        );
    }
    for p in &r.pod_steps {
        let _ = writeln!(
            s,
            "| node1 agent with {} more enrolled pods | {} ({} bytes/pod; pods created in {:.1} s, enrolled in {:.1} s) |",
            p.pods,
            mib(p.rss_bytes as f64),
            fmt_num(p.bytes_per_pod, 0),
            p.create_secs,
            p.enroll_secs
        );
    }
    for sc in r.scenarios.iter().filter(|s| s.idle.conns > 0) {
        let _ = writeln!(
            s,
            "| {} idle connections, {} (growth of both agents) | {} bytes/conn (opened in {:.2} s) |",
            fmt_num(sc.idle.conns as f64, 0),
            sc.scenario.name,
            fmt_num(sc.idle.bytes_per_conn, 0),
            sc.idle.open_secs
        );
    }
    let _ = writeln!(
        s,
        "| Agent shutdown (SIGTERM to exit) with every pod enrolled | {:.2} s |",
        r.agent_shutdown_secs
    );

    targets_table(
        &mut s,
        "Targets (issue 4; reported, not asserted)",
        &targets(r),
    );
    if let Some(h) = &r.http {
        s.push_str(&h.markdown(reps));
    }
    if let Some(u) = &r.upgrade {
        let ms = |v: &[f64]| {
            v.iter()
                .map(|x| format!("{x:.0} ms"))
                .collect::<Vec<_>>()
                .join(", ")
        };
        let _ = writeln!(
            s,
            "\n**Upgrade and crash under load** ({}: connection-rate load plus long-lived echo \
             streams, each agent in turn)\n",
            u.scenario
        );
        let _ = writeln!(s, "| | Measured |\n|---|---:|");
        let _ = writeln!(
            s,
            "| Hitless upgrade: new connections, failed | {} of {} |",
            u.errors,
            u.conns + u.errors
        );
        let _ = writeln!(
            s,
            "| Hitless upgrade: connection setup p99 / longest (the longest stall) | {:.2} ms / {:.1} ms |",
            u.p99_us / 1e3,
            u.max_us / 1e3
        );
        let _ = writeln!(
            s,
            "| Hitless upgrade: long-lived streams, errors (round trips) | {} streams, {} errors ({} round trips) |",
            u.long_lived, u.long_lived_errors, u.long_lived_roundtrips
        );
        let _ = writeln!(
            s,
            "| Hitless upgrade: new agent start to sockets taken over | {} |",
            ms(&u.handover_ms)
        );
        let _ = writeln!(
            s,
            "| SIGKILL + restart: new connections, failed (refused while no agent ran) | {} of {} |",
            u.kill_errors,
            u.kill_conns + u.kill_errors
        );
        let _ = writeln!(
            s,
            "| SIGKILL + restart: restarted agent ready after | {} |",
            ms(&u.restart_ms)
        );
        if !u.first_errors.is_empty() || !u.kill_first_errors.is_empty() {
            let _ = writeln!(
                s,
                "\nFirst errors: upgrade {:?}; SIGKILL {:?}.",
                u.first_errors, u.kill_first_errors
            );
        }
    }
    let crr_errors: Vec<String> = r
        .scenarios
        .iter()
        .filter(|s| s.crr_errors > 0)
        .map(|s| {
            format!(
                "{}: {} of {}",
                s.scenario.name,
                s.crr_errors,
                s.crr_conns + s.crr_errors
            )
        })
        .collect();
    if !crr_errors.is_empty() {
        let _ = writeln!(s, "\nConnection-rate errors: {}.", crr_errors.join("; "));
    }
    let _ = writeln!(
        s,
        "\nLoad average at start {}, at end {}. Wall time {:.0} s ({}). Leftovers after teardown: {}.",
        r.facts["loadavg_at_start"].as_str().unwrap_or("?"),
        r.loadavg_at_end,
        r.wall_secs,
        r.phases
            .iter()
            .map(|(k, v)| format!("{k} {v:.0} s"))
            .collect::<Vec<_>>()
            .join(", "),
        if r.leftovers.is_empty() {
            "none".to_string()
        } else {
            r.leftovers.join(", ")
        }
    );
    s
}

fn human_bytes(b: u64) -> String {
    if b >= 1 << 30 && b.is_multiple_of(1 << 30) {
        format!("{} GiB", b >> 30)
    } else if b >= 1 << 20 {
        format!("{:.0} MiB", b as f64 / (1u64 << 20) as f64)
    } else {
        format!("{b} bytes")
    }
}

// ---------------------------------------------------------------------------------------------
// SVG

fn esc(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

const PALETTE: &[&str] = &[
    "#7f7f7f", "#bcbd22", "#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e",
];

/// A grouped bar chart: for each main figure, one bar per scenario with its ratio to the
/// baseline (the baseline's bar is 1).
pub fn svg(r: &Results) -> String {
    let (w, h) = (960.0f64, 500.0f64);
    let (left, right, top, bottom) = (70.0, 20.0, 90.0, 90.0);
    let plot_w = w - left - right;
    let plot_h = h - top - bottom;
    let n = r.scenarios.len().max(1) as f64;
    let ratios: Vec<Vec<Option<f64>>> = CHART
        .iter()
        .map(|(k, _)| r.scenarios.iter().map(|s| ratio(r, s, k)).collect())
        .collect();
    let max = ratios
        .iter()
        .flatten()
        .flatten()
        .fold(1.0f64, |a, &b| a.max(b));
    let step = if max <= 1.5 {
        0.25
    } else if max <= 3.0 {
        0.5
    } else {
        1.0
    };
    let ymax = ((max * 1.1) / step).ceil() * step;
    let y = |v: f64| top + plot_h * (1.0 - v / ymax);
    let f = &r.facts;
    let mut s = String::new();
    let _ = writeln!(
        s,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" viewBox="0 0 {w} {h}" font-family="sans-serif" font-size="12">"#
    );
    let _ = writeln!(s, r#"<rect width="{w}" height="{h}" fill="white"/>"#);
    let _ = writeln!(
        s,
        r#"<text x="{left}" y="24" font-size="16" font-weight="bold">Mesh cost: ratio to {BASELINE} (median of {} repetitions)</text>"#,
        r.options["reps"]
    );
    let _ = writeln!(
        s,
        r##"<text x="{left}" y="42" fill="#444">{}</text>"##,
        esc(&format!(
            "commit {} · {} · {} · {} cores · kernel {}{}",
            f["commit"].as_str().unwrap_or("?"),
            f["date"].as_str().unwrap_or("?"),
            f["cpu_model"].as_str().unwrap_or("?"),
            f["cores"],
            f["kernel"].as_str().unwrap_or("?"),
            if r.options["quick"] == true {
                " · QUICK RUN"
            } else {
                ""
            }
        ))
    );
    // Legend.
    let mut lx = left;
    for (i, sc) in r.scenarios.iter().enumerate() {
        let color = PALETTE[i % PALETTE.len()];
        let _ = writeln!(
            s,
            r#"<rect x="{lx}" y="58" width="12" height="12" fill="{color}"/><text x="{}" y="68">{}</text>"#,
            lx + 16.0,
            esc(sc.scenario.name)
        );
        lx += 30.0 + 7.0 * sc.scenario.name.len() as f64;
    }
    // Grid.
    let mut v = 0.0;
    while v <= ymax + 1e-9 {
        let yy = y(v);
        let _ = writeln!(
            s,
            r##"<line x1="{left}" y1="{yy:.1}" x2="{:.1}" y2="{yy:.1}" stroke="#e0e0e0"/><text x="{:.1}" y="{:.1}" text-anchor="end" fill="#444">{v:.2}×</text>"##,
            left + plot_w,
            left - 6.0,
            yy + 4.0
        );
        v += step;
    }
    let one = y(1.0);
    let _ = writeln!(
        s,
        r##"<line x1="{left}" y1="{one:.1}" x2="{:.1}" y2="{one:.1}" stroke="#333" stroke-dasharray="6,4"/>"##,
        left + plot_w
    );
    // Bars.
    let group_w = plot_w / CHART.len() as f64;
    let bar_w = (group_w * 0.8 / n).min(60.0);
    for (g, (key, label)) in CHART.iter().enumerate() {
        let gx = left + group_w * g as f64;
        let x0 = gx + (group_w - bar_w * n) / 2.0;
        for (i, rv) in ratios[g].iter().enumerate() {
            let Some(rv) = rv else { continue };
            let color = PALETTE[i % PALETTE.len()];
            let (bx, by) = (x0 + bar_w * i as f64, y(*rv));
            let _ = writeln!(
                s,
                r#"<rect x="{bx:.1}" y="{by:.1}" width="{:.1}" height="{:.1}" fill="{color}"><title>{}: {rv:.3}×</title></rect>"#,
                bar_w - 4.0,
                (y(0.0) - by).max(0.0),
                esc(r.scenarios[i].scenario.name)
            );
            let _ = writeln!(
                s,
                r#"<text x="{:.1}" y="{:.1}" text-anchor="middle" font-size="11">{rv:.2}</text>"#,
                bx + (bar_w - 4.0) / 2.0,
                by - 4.0
            );
        }
        let better = if METRICS.iter().any(|d| d.key == *key && d.higher_is_better) {
            "higher is better"
        } else {
            "lower is better"
        };
        let _ = writeln!(
            s,
            r##"<text x="{:.1}" y="{:.1}" text-anchor="middle" font-weight="bold">{}</text><text x="{:.1}" y="{:.1}" text-anchor="middle" fill="#666">{better}</text>"##,
            gx + group_w / 2.0,
            y(0.0) + 20.0,
            esc(label),
            gx + group_w / 2.0,
            y(0.0) + 36.0
        );
    }
    let _ = writeln!(
        s,
        r##"<line x1="{left}" y1="{:.1}" x2="{:.1}" y2="{:.1}" stroke="#333"/>"##,
        y(0.0),
        left + plot_w,
        y(0.0)
    );
    let _ = writeln!(
        s,
        r##"<text x="{left}" y="{:.1}" fill="#444">Each bar: the scenario's median divided by {BASELINE}'s median. Dashed line: parity with {BASELINE}.</text>"##,
        h - 16.0
    );
    s.push_str("</svg>\n");
    s
}

/// Writes `bench.json`, `bench.md` and `bench.svg`.
pub fn write_all(r: &Results, dir: &Path) -> Result<()> {
    let write = |name: &str, text: String| {
        let p = dir.join(name);
        std::fs::write(&p, text).with_context(|| format!("writing {}", p.display()))
    };
    write(
        "bench.json",
        serde_json::to_string_pretty(&to_json(r))? + "\n",
    )?;
    write("bench.md", markdown(r))?;
    write("bench.svg", svg(r))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbers() {
        assert_eq!(fmt_num(1234567.4, 0), "1,234,567");
        assert_eq!(fmt_num(999.0, 0), "999");
        assert_eq!(fmt_num(1.2345, 2), "1.23");
        assert_eq!(fmt_num(f64::NAN, 2), "—");
        assert_eq!(human_bytes(1 << 30), "1 GiB");
        assert_eq!(human_bytes(64 << 20), "64 MiB");
        assert_eq!(esc("a<b&c"), "a&lt;b&amp;c");
    }
}

//! `mesh-bench-run --compare OLD.json NEW.json` (`cargo xtask bench --compare ...`): every figure
//! two runs share, old against new, with the change and whether it went the right way; then the
//! targets whose verdict changed, and how many figures only one run has.
//!
//! A figure is any number in `bench.json` outside the run's description (`machine`, `options`,
//! `units`, labels, phase times): a summary (`{median, min, max, samples}`) counts as its median;
//! list items are named by their `name` (rows, scenarios), `what` (targets) or `pods` (enrolled-pod
//! steps), so runs with different sets of rows or pod counts still line up, and plain numbers in
//! a list by their position (`handover_ms[2]`). Which way is better is read from the figure's name
//! (times, bytes, CPU, errors: lower; rates and throughput: higher). A figure named neither way
//! (a count or a setting, such as a port) gets no verdict and is shown only when it differs.
use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::Path;

use anyhow::{Context, Result};
use serde_json::Value;

/// Top-level keys that describe the run rather than measure it.
const NOT_FIGURES: &[&str] = &[
    "schema",
    "machine",
    "options",
    "units",
    "metric_labels",
    "baseline",
    "phases_secs",
    "wall_secs",
    "loadavg_at_end",
    "bpf_stats_enabled",
    "leftovers",
];

/// A target's verdict and the value it was judged on.
#[derive(Debug, PartialEq)]
pub struct Verdict {
    pub verdict: &'static str,
    pub value: String,
}

/// One run's figures by path (`scenarios/mesh/metrics/rr_p50_us`), and its targets' verdicts.
#[derive(Debug, Default, PartialEq)]
pub struct Figures {
    pub values: BTreeMap<String, f64>,
    pub targets: BTreeMap<String, Verdict>,
}

pub fn load(path: &Path) -> Result<Figures> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let json: Value = serde_json::from_str(&text)
        .with_context(|| format!("{} is not a bench.json (invalid JSON)", path.display()))?;
    if !json.is_object() || json.get("schema").is_none() {
        anyhow::bail!(
            "{} is not a bench.json (no \"schema\" field at the top)",
            path.display()
        );
    }
    Ok(figures(&json))
}

pub fn figures(json: &Value) -> Figures {
    let mut out = Figures::default();
    if let Some(map) = json.as_object() {
        for (key, value) in map {
            if !NOT_FIGURES.contains(&key.as_str()) {
                walk(value, key, &mut out);
            }
        }
    }
    out
}

fn walk(value: &Value, path: &str, out: &mut Figures) {
    match value {
        Value::Number(n) => {
            if let Some(v) = n.as_f64() {
                out.values.insert(path.to_string(), v);
            }
        }
        Value::Object(map) => {
            if let Some(median) = map.get("median").and_then(Value::as_f64) {
                out.values.insert(path.to_string(), median);
                return;
            }
            // A target: its verdict, by what it measures.
            if let (Some(what), Some(met)) =
                (map.get("what").and_then(Value::as_str), map.get("met"))
            {
                let verdict = match met {
                    Value::Bool(true) => "met",
                    Value::Bool(false) => "not met",
                    _ => "not run",
                };
                let value = map.get("value").and_then(Value::as_str).unwrap_or("");
                out.targets.insert(
                    what.to_string(),
                    Verdict {
                        verdict,
                        value: value.to_string(),
                    },
                );
                return;
            }
            for (key, v) in map {
                if key != "samples" && key != "min" && key != "max" {
                    walk(v, &format!("{path}/{key}"), out);
                }
            }
        }
        Value::Array(items) => {
            for (i, item) in items.iter().enumerate() {
                if item.is_number() {
                    walk(item, &format!("{path}[{i}]"), out);
                    continue;
                }
                let name = ["name", "what", "pods"]
                    .iter()
                    .find_map(|k| item.get(*k))
                    .map_or_else(
                        || i.to_string(),
                        |v| v.as_str().map_or_else(|| v.to_string(), str::to_string),
                    );
                walk(item, &format!("{path}/{name}"), out);
            }
        }
        _ => {}
    }
}

/// Whether a larger value of the figure at `path` is better; `None`: not known (a count or a
/// setting of the run, such as a port or a body size).
pub fn higher_is_better(path: &str) -> Option<bool> {
    let last = path.rsplit('/').next().unwrap_or(path);
    // A plain number in a list is named by the list.
    let name = last.split('[').next().unwrap_or(last);
    let ends = |suffixes: &[&str]| suffixes.iter().any(|s| name.ends_with(s));
    let has = |words: &[&str]| words.iter().any(|w| name.contains(w));
    if ends(&["_body_bytes", "_connections"]) {
        None
    } else if ends(&["_us", "_ms", "_ns", "_secs", "ns_per_run"])
        || has(&["cpu", "rss", "bytes", "errors"])
    {
        Some(false)
    } else if has(&["gbps", "rps", "cps"]) {
        Some(true)
    } else {
        None
    }
}

/// The comparison as Markdown.
pub fn report(old: &Figures, new: &Figures, old_name: &str, new_name: &str) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "Figures of {old_name} (old) against {new_name} (new)\n"
    );
    out.push_str("| Figure | Old | New | Change | |\n|---|---:|---:|---:|---|\n");
    for (path, &a) in &old.values {
        let Some(&b) = new.values.get(path) else {
            continue;
        };
        let up = higher_is_better(path);
        // Figures neither run measured (zero in both); counts and settings that did not change.
        if (a == 0.0 && b == 0.0) || (up.is_none() && a == b) {
            continue;
        }
        let change = if a == 0.0 {
            "—".to_string()
        } else {
            format!("{:+.1} %", (b - a) / a.abs() * 100.0)
        };
        let verdict = match up {
            _ if a == b => "",
            Some(up) if (b > a) == up => "better",
            Some(_) => "worse",
            None => "",
        };
        let _ = writeln!(
            out,
            "| `{path}` | {} | {} | {change} | {verdict} |",
            number(a),
            number(b)
        );
    }
    let changed: Vec<_> = old
        .targets
        .iter()
        .filter_map(|(what, a)| {
            let b = new.targets.get(what)?;
            (a.verdict != b.verdict).then_some((what, a, b))
        })
        .collect();
    if !changed.is_empty() {
        out.push_str("\nTargets whose verdict changed:\n\n| Target | Old | New |\n|---|---|---|\n");
        for (what, a, b) in changed {
            let _ = writeln!(
                out,
                "| {what} | {} ({}) | {} ({}) |",
                a.verdict, a.value, b.verdict, b.value
            );
        }
    }
    for (name, only, other) in [(old_name, old, new), (new_name, new, old)] {
        let missing: Vec<&String> = only
            .values
            .keys()
            .filter(|k| !other.values.contains_key(*k))
            .collect();
        if let Some(first) = missing.first() {
            let _ = writeln!(
                out,
                "\nOnly in {name}: {} figure(s), e.g. `{first}`",
                missing.len()
            );
        }
    }
    out
}

fn number(v: f64) -> String {
    if v.fract() == 0.0 && v.abs() < 1e15 {
        format!("{v:.0}")
    } else if v.abs() >= 100.0 {
        format!("{v:.1}")
    } else {
        format!("{v:.4}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    /// A run shaped like `report::to_json`'s output (the parts that matter here).
    fn run(p50: f64, rps: f64, met: bool, pods: [u64; 2], new: bool) -> Value {
        let mut v = json!({
            "schema": 1,
            "machine": { "cores": 2, "commit": "abc" },
            "options": { "reps": 3 },
            "wall_secs": 100.0,
            "scenarios": [
                { "name": "direct", "metrics": { "rr_p50_us": { "median": 50.0, "min": 40.0, "max": 60.0, "samples": [40.0, 50.0, 60.0] } } },
                { "name": "mesh", "metrics": { "rr_p50_us": { "median": p50, "min": 1.0, "max": 1.0, "samples": [] }, "rr_rps": { "median": rps } },
                  "ebpf": { "mesh_connect4": { "ns_per_run": 120.0, "run_cnt": 10 } } }
            ],
            "agent": {
                "rss_after_traffic_bytes": [2000, 3000],
                "enrolled_pods": { "steps": [
                    { "pods": pods[0], "rss_bytes": 100 },
                    { "pods": pods[1], "rss_bytes": 200 }
                ] }
            },
            "upgrade": { "handover_ms": [5.0, 6.0], "conns": 1000 },
            "http": {
                "waypoint": { "peak_rss_bytes": 1000 },
                "unmeasured_p99_us": 0.0,
                "request_body_bytes": 1024,
                "throughput_run_connections": 8
            },
            "targets": [ { "what": "Added p50", "goal": "≤ 60 µs", "value": format!("{p50} µs"), "met": met } ]
        });
        if new {
            v["http"]["only_new_p50_us"] = json!(7);
            v["http"]["throughput_run_connections"] = json!(16);
            v["upgrade"]["handover_ms"] = json!([4.0, 6.0]);
            v["scenarios"][1]["ebpf"]["mesh_connect4"]["ns_per_run"] = json!(130.0);
        }
        v
    }

    #[test]
    fn figures_are_named_by_path_with_list_items_by_name_and_summaries_by_median() {
        let f = figures(&run(80.0, 5000.0, false, [100, 1000], false));
        assert_eq!(f.values["scenarios/mesh/metrics/rr_p50_us"], 80.0);
        assert_eq!(f.values["scenarios/direct/metrics/rr_p50_us"], 50.0);
        assert_eq!(f.values["scenarios/mesh/metrics/rr_rps"], 5000.0);
        assert_eq!(f.values["http/waypoint/peak_rss_bytes"], 1000.0);
        assert_eq!(f.values["agent/rss_after_traffic_bytes[1]"], 3000.0);
        assert_eq!(f.values["upgrade/handover_ms[0]"], 5.0);
        // Enrolled-pod steps by their pod count, not their position.
        assert_eq!(f.values["agent/enrolled_pods/steps/1000/rss_bytes"], 200.0);
        // The run's description is not a figure; neither are a summary's parts.
        assert!(!f
            .values
            .keys()
            .any(|k| k.starts_with("machine") || k.starts_with("options") || k == "wall_secs"));
        assert!(!f
            .values
            .keys()
            .any(|k| k.contains("samples") || k.ends_with("/min")));
        assert_eq!(
            f.targets["Added p50"],
            Verdict {
                verdict: "not met",
                value: "80 µs".into()
            }
        );
    }

    #[test]
    fn real_figure_names_have_a_direction_and_settings_have_none() {
        for (path, up) in [
            ("scenarios/mesh/metrics/rr_p50_us", Some(false)),
            ("http/rows/mesh/ratios_to_direct/p50_us", Some(false)),
            ("scenarios/mesh/metrics/tput_8_gbps", Some(true)),
            ("scenarios/mesh/metrics/crr_cps", Some(true)),
            ("http/rows/mesh/metrics/latency_rps", Some(true)),
            ("http/waypoint/vcpu_per_1k_rps", Some(false)),
            ("scenarios/mesh/metrics/cpu_s_per_gib", Some(false)),
            ("scenarios/mesh/ebpf/mesh_connect4/ns_per_run", Some(false)),
            ("scenarios/mesh/ebpf/mesh_connect4/run_time_ns", Some(false)),
            ("upgrade/handover_ms[3]", Some(false)),
            ("upgrade/kill/restart_ready_ms", Some(false)),
            ("agent/shutdown_secs", Some(false)),
            ("upgrade/errors", Some(false)),
            ("agent/rss_after_traffic_bytes[0]", Some(false)),
            ("http/request_body_bytes", None),
            ("http/throughput_run_connections", None),
            ("http/rows/mesh/service/port", None),
            ("upgrade/conns", None),
        ] {
            assert_eq!(higher_is_better(path), up, "{path}");
        }
    }

    #[test]
    fn the_report_says_which_way_each_figure_went_and_which_targets_changed() {
        let old = figures(&run(80.0, 5000.0, false, [100, 1000], false));
        let new = figures(&run(60.0, 4000.0, true, [10, 1000], true));
        let text = report(&old, &new, "a.json", "b.json");
        for row in [
            "| `scenarios/mesh/metrics/rr_p50_us` | 80 | 60 | -25.0 % | better |",
            "| `scenarios/mesh/metrics/rr_rps` | 5000 | 4000 | -20.0 % | worse |",
            "| `scenarios/direct/metrics/rr_p50_us` | 50 | 50 | +0.0 % |  |",
            "| `upgrade/handover_ms[0]` | 5 | 4 | -20.0 % | better |",
            "| `scenarios/mesh/ebpf/mesh_connect4/ns_per_run` | 120 | 130 | +8.3 % | worse |",
            "| `agent/enrolled_pods/steps/1000/rss_bytes` | 200 | 200 | +0.0 % |  |",
            // A setting that changed is shown, without a verdict.
            "| `http/throughput_run_connections` | 8 | 16 | +100.0 % |  |",
            "| Added p50 | not met (80 µs) | met (60 µs) |",
            "Only in a.json: 2 figure(s), e.g. `agent/enrolled_pods/steps/100/pods`",
            "Only in b.json: 3 figure(s), e.g. `agent/enrolled_pods/steps/10/pods`",
        ] {
            assert!(text.contains(row), "{row}\n{text}");
        }
        // Settings that did not change, and figures neither run measured, are left out.
        assert!(!text.contains("request_body_bytes"), "{text}");
        assert!(!text.contains("unmeasured_p99_us"), "{text}");
        assert!(!text.contains("upgrade/conns"), "{text}");
        // A target whose value moved but whose verdict did not is not listed.
        let again = figures(&run(70.0, 4000.0, false, [100, 1000], false));
        let text = report(&old, &again, "a.json", "c.json");
        assert!(!text.contains("Targets whose verdict changed"), "{text}");
    }

    #[test]
    fn a_file_that_is_not_a_bench_json_is_named_in_the_error() {
        let dir = std::env::temp_dir().join(format!("mesh-compare-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let bad = dir.join("bad.json");
        std::fs::write(&bad, "{ not json").unwrap();
        let other = dir.join("other.json");
        std::fs::write(&other, "{\"a\": 1}").unwrap();
        let e1 = format!("{:#}", load(&bad).unwrap_err());
        let e2 = format!("{:#}", load(&other).unwrap_err());
        let e3 = format!("{:#}", load(&dir.join("missing.json")).unwrap_err());
        std::fs::remove_dir_all(&dir).unwrap();
        assert!(
            e1.contains("bad.json is not a bench.json (invalid JSON)"),
            "{e1}"
        );
        assert!(e2.contains("other.json is not a bench.json"), "{e2}");
        assert!(
            e3.contains("reading") && e3.contains("missing.json"),
            "{e3}"
        );
    }
}

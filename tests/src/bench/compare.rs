//! `mesh-bench-run --compare OLD.json NEW.json` (`cargo xtask bench --compare ...`): every figure
//! two runs share, old against new, with the change and whether it went the right way; then the
//! targets whose verdict changed, and the figures only one run has.
//!
//! A figure is any number in `bench.json` outside the run's description (`machine`, `options`,
//! `units`, labels): a summary (`{median, min, max, samples}`) counts as its median, list items
//! are named by their `name` (rows, scenarios) or `what` (targets), so runs with different sets
//! of rows still line up. Which way is better is read from the figure's name (`..._us`, bytes
//! and CPU: lower; rates and throughput: higher); a figure named neither way gets no verdict.
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
];

/// One run's figures by path (`scenarios/mesh/metrics/rr_p50_us`), and its targets' verdicts.
#[derive(Debug, Default, PartialEq)]
pub struct Figures {
    pub values: BTreeMap<String, f64>,
    pub targets: BTreeMap<String, String>,
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
                out.targets
                    .insert(what.to_string(), format!("{verdict} ({value})"));
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
                let name = item
                    .get("name")
                    .or_else(|| item.get("what"))
                    .and_then(Value::as_str)
                    .map_or_else(|| i.to_string(), str::to_string);
                walk(item, &format!("{path}/{name}"), out);
            }
        }
        _ => {}
    }
}

/// Whether a larger value of the figure at `path` is better; `None`: not known (a count or a
/// setting of the run, such as a port or a body size: not compared).
pub fn higher_is_better(path: &str) -> Option<bool> {
    let name = path.rsplit('/').next().unwrap_or(path);
    let has = |words: &[&str]| words.iter().any(|w| name.contains(w));
    if name.ends_with("_body_bytes") || name.ends_with("_connections") {
        None
    } else if has(&[
        "cpu", "rss", "bytes", "_us", "secs", "errors", "lost", "refused",
    ]) {
        Some(false)
    } else if has(&["gbps", "rps", "cps", "conns_ok", "ratio"]) {
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
        // Settings and counts, and figures neither run measured (zero in both).
        let Some(up) = higher_is_better(path) else {
            continue;
        };
        if a == 0.0 && b == 0.0 {
            continue;
        }
        let change = if a == 0.0 {
            if b == 0.0 {
                "0 %".to_string()
            } else {
                "—".to_string()
            }
        } else {
            format!("{:+.1} %", (b - a) / a.abs() * 100.0)
        };
        let verdict = if a == b {
            ""
        } else if (b > a) == up {
            "better"
        } else {
            "worse"
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
            (a != b).then_some((what, a, b))
        })
        .collect();
    if !changed.is_empty() {
        out.push_str(
            "\nTargets whose verdict or value changed:\n\n| Target | Old | New |\n|---|---|---|\n",
        );
        for (what, a, b) in changed {
            let _ = writeln!(out, "| {what} | {a} | {b} |");
        }
    }
    for (name, only, other) in [(old_name, old, new), (new_name, new, old)] {
        let missing: Vec<&String> = only
            .values
            .keys()
            .filter(|k| !other.values.contains_key(*k) && higher_is_better(k).is_some())
            .collect();
        if !missing.is_empty() {
            let _ = writeln!(
                out,
                "\nOnly in {name}: {} figures, e.g. `{}`",
                missing.len(),
                missing[0]
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

    fn run(p50: f64, rps: f64, met: bool, extra: bool) -> Value {
        let mut v = json!({
            "schema": 1,
            "machine": { "cores": 2, "commit": "abc" },
            "options": { "reps": 3 },
            "scenarios": [
                { "name": "direct", "metrics": { "rr_p50_us": { "median": 50.0, "min": 40.0, "max": 60.0, "samples": [40.0, 50.0, 60.0] } } },
                { "name": "mesh", "metrics": { "rr_p50_us": { "median": p50, "min": 1.0, "max": 1.0, "samples": [] }, "rr_rps": { "median": rps } } }
            ],
            "http": { "waypoint": { "peak_rss_bytes": 1000 }, "unmeasured_p99_us": 0.0 },
            "targets": [ { "what": "Added p50", "goal": "≤ 60 µs", "value": format!("{p50} µs"), "met": met } ]
        });
        if extra {
            v["http"]["only_new_p50_us"] = json!(7);
            v["http"]["request_body_bytes"] = json!(1024);
        }
        v
    }

    #[test]
    fn figures_are_named_by_path_with_list_items_by_name_and_summaries_by_median() {
        let f = figures(&run(80.0, 5000.0, false, false));
        assert_eq!(f.values["scenarios/mesh/metrics/rr_p50_us"], 80.0);
        assert_eq!(f.values["scenarios/direct/metrics/rr_p50_us"], 50.0);
        assert_eq!(f.values["scenarios/mesh/metrics/rr_rps"], 5000.0);
        assert_eq!(f.values["http/waypoint/peak_rss_bytes"], 1000.0);
        // The run's description is not a figure; neither are a summary's parts.
        assert!(!f
            .values
            .keys()
            .any(|k| k.starts_with("machine") || k.starts_with("options")));
        assert!(!f
            .values
            .keys()
            .any(|k| k.contains("samples") || k.ends_with("/min")));
        assert_eq!(f.targets["Added p50"], "not met (80 µs)");
    }

    #[test]
    fn the_report_says_which_way_each_figure_went_and_which_targets_changed() {
        let old = figures(&run(80.0, 5000.0, false, false));
        let new = figures(&run(60.0, 4000.0, true, true));
        let text = report(&old, &new, "a.json", "b.json");
        assert!(
            text.contains("| `scenarios/mesh/metrics/rr_p50_us` | 80 | 60 | -25.0 % | better |"),
            "{text}"
        );
        assert!(
            text.contains("| `scenarios/mesh/metrics/rr_rps` | 5000 | 4000 | -20.0 % | worse |"),
            "{text}"
        );
        assert!(
            text.contains("| `scenarios/direct/metrics/rr_p50_us` | 50 | 50 | +0.0 % |  |"),
            "{text}"
        );
        assert!(
            text.contains("| Added p50 | not met (80 µs) | met (60 µs) |"),
            "{text}"
        );
        assert!(
            text.contains("Only in b.json: 1 figures, e.g. `http/only_new_p50_us`"),
            "{text}"
        );
        // A setting of the run is not a figure to compare, nor one neither run measured.
        assert!(!text.contains("request_body_bytes"), "{text}");
        assert!(!text.contains("unmeasured_p99_us"), "{text}");
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

//! The module layering ARCHITECTURE.md states, checked against the source: which top-level module
//! of `mesh-agent/src` may use which (`crate::x` paths outside tests), no cycle, and who may touch
//! aya or enter a network namespace.
use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

/// Each module and the modules it may use. Data flows one way: config -> model -> state ->
/// {datapath, inpod, proxy} -> waypoint; `cli` wires everything.
const ALLOWED: &[(&str, &[&str])] = &[
    ("model", &[]),
    ("net", &[]),
    ("datapath", &[]),
    ("handover", &[]),
    ("identity", &[]),
    ("telemetry", &["identity"]),
    ("config", &["model"]),
    ("policy", &["model", "identity"]),
    ("state", &["model", "policy"]),
    (
        "proxy",
        &[
            "model",
            "state",
            "policy",
            "identity",
            "net",
            "datapath",
            "telemetry",
        ],
    ),
    (
        "inpod",
        &["model", "state", "identity", "net", "datapath", "proxy"],
    ),
    (
        "waypoint",
        &[
            "model",
            "state",
            "policy",
            "identity",
            "net",
            "proxy",
            "telemetry",
        ],
    ),
    (
        "cli",
        &[
            "config",
            "model",
            "state",
            "policy",
            "identity",
            "net",
            "datapath",
            "inpod",
            "proxy",
            "telemetry",
            "handover",
            "waypoint",
        ],
    ),
];

/// Source text of every non-test file under `dir`, by path relative to `src`.
fn sources(dir: &Path, src: &Path, out: &mut BTreeMap<String, String>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        let name = path.file_name().unwrap().to_string_lossy().to_string();
        if path.is_dir() {
            if name != "tests" {
                sources(&path, src, out);
            }
        } else if name.ends_with(".rs")
            && name != "tests.rs"
            && !name.ends_with("_tests.rs")
            && name != "test_support.rs"
        {
            let text = std::fs::read_to_string(&path).unwrap();
            let code: String = text
                .lines()
                .map(|l| l.split("//").next().unwrap_or(""))
                .collect::<Vec<_>>()
                .join("\n");
            let code = without_test_items(&code);
            let rel = path
                .strip_prefix(src)
                .unwrap()
                .to_string_lossy()
                .to_string();
            out.insert(rel, code);
        }
    }
}

/// `code` without the items marked `#[cfg(test)]` (a `mod x;`, or an item up to its matching
/// closing brace): what only tests use is not part of the layering.
fn without_test_items(code: &str) -> String {
    let mut out = String::new();
    let mut rest = code;
    while let Some(at) = rest.find("#[cfg(test)]") {
        out.push_str(&rest[..at]);
        let item = &rest[at + "#[cfg(test)]".len()..];
        let end = match (item.find(';'), item.find('{')) {
            (Some(semi), Some(open)) if semi < open => semi + 1,
            (Some(semi), None) => semi + 1,
            (_, Some(open)) => {
                let mut depth = 0usize;
                let mut close = item.len();
                for (i, c) in item[open..].char_indices() {
                    match c {
                        '{' => depth += 1,
                        '}' => {
                            depth -= 1;
                            if depth == 0 {
                                close = open + i + 1;
                                break;
                            }
                        }
                        _ => {}
                    }
                }
                close
            }
            (None, None) => item.len(),
        };
        rest = &item[end..];
    }
    out.push_str(rest);
    out
}

fn top_module(rel: &str) -> &str {
    rel.split('/').next().unwrap().trim_end_matches(".rs")
}

/// Top-level modules a file names through `crate::x` (also inside `use crate::{x, y::z}`).
fn uses(code: &str) -> BTreeSet<String> {
    let mut found = BTreeSet::new();
    let mut rest = code;
    while let Some(i) = rest.find("crate::") {
        rest = &rest[i + "crate::".len()..];
        if let Some(group) = rest.strip_prefix('{') {
            // Top-level names of the group: those at brace depth 0.
            let mut depth = 0;
            let mut name = String::new();
            let mut at_start = true;
            for c in group.chars() {
                match c {
                    '{' => depth += 1,
                    '}' if depth == 0 => break,
                    '}' => depth -= 1,
                    ',' if depth == 0 => {
                        at_start = true;
                        continue;
                    }
                    _ => {}
                }
                if depth == 0 && at_start {
                    if c.is_ascii_alphanumeric() || c == '_' {
                        name.push(c);
                    } else if !name.is_empty() {
                        found.insert(std::mem::take(&mut name));
                        at_start = false;
                    }
                }
            }
            if !name.is_empty() {
                found.insert(name);
            }
        } else {
            let name: String = rest
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                .collect();
            found.insert(name);
        }
    }
    found
}

fn graph() -> (BTreeMap<String, BTreeSet<String>>, BTreeMap<String, String>) {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = BTreeMap::new();
    sources(&src, &src, &mut files);
    let mut edges: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for (rel, code) in &files {
        let from = top_module(rel);
        if from == "lib" || from == "main" {
            continue;
        }
        for to in uses(code) {
            if to != from && to != "self" && to != "super" {
                edges.entry(from.to_string()).or_default().insert(to);
            }
        }
    }
    (edges, files)
}

#[test]
fn modules_use_only_what_the_layering_allows() {
    let (edges, _) = graph();
    let allowed: BTreeMap<&str, &[&str]> = ALLOWED.iter().copied().collect();
    let mut wrong = Vec::new();
    for (from, tos) in &edges {
        let Some(ok) = allowed.get(from.as_str()) else {
            wrong.push(format!("module {from} is not in the layering table"));
            continue;
        };
        for to in tos {
            if !ok.contains(&to.as_str()) {
                wrong.push(format!("{from} uses {to}"));
            }
        }
    }
    assert!(wrong.is_empty(), "layering broken: {wrong:#?}");
}

#[test]
fn the_layering_has_no_cycle() {
    // Depth-first search over the allowed graph (what the code uses is a subset of it).
    fn visit<'a>(
        m: &'a str,
        allowed: &BTreeMap<&'a str, &'a [&'a str]>,
        path: &mut Vec<&'a str>,
        done: &mut BTreeSet<&'a str>,
    ) {
        if done.contains(m) {
            return;
        }
        assert!(!path.contains(&m), "cycle: {path:?} -> {m}");
        path.push(m);
        for next in allowed.get(m).copied().unwrap_or(&[]) {
            visit(next, allowed, path, done);
        }
        path.pop();
        done.insert(m);
    }
    let allowed: BTreeMap<&str, &[&str]> = ALLOWED.iter().copied().collect();
    let mut done = BTreeSet::new();
    for m in allowed.keys() {
        visit(m, &allowed, &mut Vec::new(), &mut done);
    }
}

#[test]
fn only_datapath_touches_aya_and_only_net_calls_setns() {
    let (_, files) = graph();
    for (rel, code) in &files {
        let module = top_module(rel);
        if code.contains("aya::") || code.contains("use aya") {
            assert_eq!(module, "datapath", "{rel} uses aya");
        }
        if code.contains("sched::setns") || code.contains("libc::setns") {
            assert_eq!(module, "net", "{rel} calls setns(2) itself");
        }
    }
}

#[test]
fn only_test_items_are_left_out() {
    let code = "use crate::model::A;\n#[cfg(test)]\nmod tests;\nfn f() { crate::net::x(); }\n\
                #[cfg(test)]\nimpl A { fn t() { crate::proxy::y(); } }\nfn g() { crate::state::z(); }\n\
                #[cfg(test)]\nmod tests2 { use crate::cli::W; }\n";
    let kept = without_test_items(code);
    assert_eq!(
        uses(&kept).into_iter().collect::<Vec<_>>(),
        ["model", "net", "state"]
    );
}

#[test]
fn the_use_parser_reads_groups_and_paths() {
    let found = uses("use crate::{model::{A, B}, net};\nlet x = crate::proxy::y();");
    assert_eq!(
        found.into_iter().collect::<Vec<_>>(),
        ["model", "net", "proxy"]
    );
}

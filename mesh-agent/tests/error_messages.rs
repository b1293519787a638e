//! What an operator reads when the agent cannot start: each cause once, in one line.
//!
//! Error types in this crate carry their cause in their message and do not also expose it as
//! `source()`, so `main`'s `{:#}` (which appends every source) cannot print a cause twice.
use std::process::Command;

fn agent_error(args: &[&str]) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_mesh-agent"))
        .args(args)
        .env("RUST_LOG", "error")
        .output()
        .expect("run mesh-agent");
    assert!(!out.status.success(), "mesh-agent {args:?} succeeded");
    let stderr = String::from_utf8_lossy(&out.stderr);
    stderr
        .lines()
        .rfind(|l| l.starts_with("error: "))
        .unwrap_or_else(|| panic!("no `error:` line in {stderr}"))
        .to_string()
}

/// `mesh-agent run` with `config` and a private state, pin and cgroup directory under `dir`
/// (`cgroup` names the cgroup root given); its `error:` line.
fn run_error(dir: &std::path::Path, config: &std::path::Path, cgroup: &std::path::Path) -> String {
    agent_error(&[
        "run",
        "--node",
        "n1",
        "--config",
        config.to_str().unwrap(),
        "--state-dir",
        dir.join("state").to_str().unwrap(),
        "--pin-dir",
        dir.join("pins").to_str().unwrap(),
        "--cgroup-root",
        cgroup.to_str().unwrap(),
    ])
}

#[test]
fn a_missing_config_file_is_named_with_its_cause_once() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("missing.yaml");
    let line = run_error(dir.path(), &config, &dir.path().join("cgroup"));
    assert_eq!(
        line,
        format!(
            "error: cannot read config file {}: No such file or directory (os error 2)",
            config.display()
        )
    );
}

#[test]
fn a_missing_cgroup_root_is_named_with_its_cause_once() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("mesh.yaml");
    std::fs::write(&config, "workloads: []\n").unwrap();
    let cgroup = dir.path().join("cgroup");
    let line = run_error(dir.path(), &config, &cgroup);
    assert_eq!(
        line,
        format!(
            "error: inspecting cgroup root {}: No such file or directory (os error 2)",
            cgroup.display()
        )
    );
}

//! `cargo xtask bench [--quick] [--scenario NAME]... [--duration SECS] [--volume BYTES] [--out DIR]`:
//! builds the agent and the bench tools in release mode and runs `mesh-bench-run` (every scenario
//! side by side on one network-namespace topology; see tests/src/bench/ and BENCHMARKS.md). All
//! options are passed through; `--help` lists them.
//!
//! `--compare OLD.json NEW.json` prints two runs' figures side by side (no root, runs nothing).
//!
//! `--quick` is a smoke run of the harness (CI runs it after the tests): it asserts no number, so
//! it uses the debug build the tests already made instead of a release build of its own.
use std::process::Command;

use anyhow::Result;

use crate::{cargo, require_root, root, run, target_dir};

/// `--compare OLD.json NEW.json`: reads two bench.json files; no agent, no topology, no root,
/// no set-up (the runner builds on the stable toolchain alone).
pub fn compare(args: &[String]) -> Result<()> {
    run(cargo().args([
        "build",
        "--release",
        "-p",
        "mesh-tests",
        "--bin",
        "mesh-bench-run",
    ]))?;
    let dir = target_dir().join("release");
    // Paths as the user gave them, relative to where they ran cargo.
    run(Command::new(dir.join("mesh-bench-run")).args(args))
}

pub fn bench(args: &[String]) -> Result<()> {
    require_root("cargo xtask bench")?;
    let quick = args.iter().any(|a| a == "--quick");
    let profile = if quick {
        // The same build as `cargo xtask test`'s, so after the tests nothing is compiled again.
        crate::build()?;
        "debug"
    } else {
        run(cargo().args([
            "build",
            "--release",
            "-p",
            "mesh-agent",
            "--bin",
            "mesh-agent",
            "-p",
            "mesh-tests",
            "--bin",
            "mesh-bench",
            "--bin",
            "mesh-bench-run",
            // The HTTP rows' load and the upgrade phase's echo server and long-lived streams.
            "--bin",
            "mesh-testapp",
        ]))?;
        "release"
    };
    let dir = target_dir().join(profile);
    let mut cmd = Command::new(dir.join("mesh-bench-run"));
    cmd.args(args)
        .current_dir(root())
        .env("MESH_AGENT_BIN", dir.join("mesh-agent"))
        .env("MESH_BENCH_BIN", dir.join("mesh-bench"))
        .env("MESH_TESTAPP_BIN", dir.join("mesh-testapp"));
    run(&mut cmd)
}

//! The gates `cargo xtask test` runs before anything else: formatting, clippy on every crate
//! (the eBPF crate too, for its own target on the nightly), and `cargo deny` (licenses, bans,
//! duplicate versions and sources; `deny.toml`).
//!
//! `cargo deny check advisories` needs the RustSec database, which is fetched from GitHub; this
//! project's machines reach crates.io but not GitHub, so advisories are checked only when
//! `MESH_DENY_ADVISORIES=1` is set (on a machine that can fetch the database).
use std::process::Command;

use anyhow::{Context, Result};

use crate::{cargo, root, run};

pub fn all() -> Result<()> {
    let step = |name: &str, result: Result<()>| {
        result.with_context(|| format!("lint gate `{name}` failed (fix it before the tests run)"))
    };
    step("cargo fmt --check", fmt())?;
    step("cargo clippy", clippy())?;
    step("cargo clippy (mesh-ebpf)", clippy_ebpf())?;
    step("cargo deny", deny())?;
    Ok(())
}

fn fmt() -> Result<()> {
    run(cargo().args(["fmt", "--all", "--check"]))?;
    // The fuzz targets are a workspace of their own.
    run(cargo().args(["fmt", "--check", "--manifest-path", "fuzz/Cargo.toml"]))
}

fn clippy() -> Result<()> {
    run(cargo().args([
        "clippy",
        "--quiet",
        "--workspace",
        "--exclude",
        "mesh-ebpf",
        "--all-targets",
        "--",
        "-D",
        "warnings",
    ]))
}

/// The eBPF programs, linted for the target they are built for (as `mesh-agent/build.rs` builds
/// them: nightly, `build-std=core`).
fn clippy_ebpf() -> Result<()> {
    let mut cmd = Command::new("cargo");
    cmd.current_dir(root().join("mesh-ebpf"))
        // The nested cargo must pick the nightly, not inherit the stable one running xtask.
        .env_remove("RUSTUP_TOOLCHAIN")
        .env_remove("CARGO")
        .env_remove("RUSTC")
        .args([
            "+nightly",
            "clippy",
            "--quiet",
            "--release",
            "--target",
            "bpfel-unknown-none",
            "-Z",
            "build-std=core",
            "--",
            "-D",
            "warnings",
        ]);
    run(&mut cmd)
}

fn deny() -> Result<()> {
    let mut checks = vec!["licenses", "bans", "sources"];
    if std::env::var_os("MESH_DENY_ADVISORIES").is_some_and(|v| v == "1") {
        checks.push("advisories");
    }
    // The fuzz workspace (fuzz/) is a developer tool that ships nothing; it is not checked.
    run(cargo().args(["deny", "check"]).args(&checks))
}

//! Developer and CI tasks: `cargo xtask <setup|build|test|demo|bench|validate-manifests>`.
//!
//! Every task but `setup` and `validate-manifests` runs `setup` first; `setup` is idempotent and
//! takes well under a second when everything is already installed.
mod bench;
mod manifests;
mod setup;

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context, Result};

const USAGE: &str = "usage: cargo xtask <command>

commands:
  setup   install what building and testing need (nightly rust-src, bpf-linker, Debian packages)
  build   build the agent (with its eBPF programs) and the test tools
  test    validate-manifests, then unit tests and end-to-end tests (root: they create network
          namespaces and cgroups)
  demo    two nodes, a few pods, one agent per node: send traffic and show what the mesh did
  bench   mesh vs direct, every scenario side by side: JSON, Markdown table, SVG chart
          [--quick] [--scenario NAME]... [--duration SECS] [--volume BYTES] [--out DIR] (--help: more)
  validate-manifests
          build deploy/'s kustomizations and validate every document offline (Kubernetes
          schemas, strict; the CRDs' own schemas for the example policies)
";

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let result = match args.first().map(String::as_str) {
        Some("setup") => setup::all(),
        Some("build") => setup::all().and_then(|()| build()),
        Some("test") => setup::all().and_then(|()| test(&args[1..])),
        Some("demo") => setup::all().and_then(|()| demo()),
        Some("bench") => setup::all().and_then(|()| bench::bench(&args[1..])),
        Some("validate-manifests") => manifests::validate(),
        Some("-h" | "--help" | "help") => {
            print!("{USAGE}");
            Ok(())
        }
        _ => {
            eprint!("{USAGE}");
            std::process::exit(2);
        }
    };
    if let Err(e) = result {
        eprintln!("xtask: error: {e:#}");
        std::process::exit(1);
    }
}

/// The workspace root (xtask lives one level below it).
pub fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask has a parent")
        .to_path_buf()
}

pub fn run(cmd: &mut Command) -> Result<()> {
    let shown = format!("{cmd:?}");
    let status = cmd
        .status()
        .with_context(|| format!("cannot start {shown}"))?;
    if !status.success() {
        bail!("{shown} failed with {status}");
    }
    Ok(())
}

fn cargo() -> Command {
    let mut cmd = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
    cmd.current_dir(root());
    cmd
}

fn build() -> Result<()> {
    run(cargo().args(["build", "--bins", "-p", "mesh-agent", "-p", "mesh-tests"]))
}

fn require_root(what: &str) -> Result<()> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        bail!(
            "{what} needs root: it loads eBPF programs and creates network namespaces and cgroups"
        );
    }
    Ok(())
}

/// Paths of the binaries the end-to-end tests and the demo start.
fn bin_env(cmd: &mut Command) {
    let target =
        std::env::var_os("CARGO_TARGET_DIR").map_or_else(|| root().join("target"), PathBuf::from);
    let dir = target.join("debug");
    cmd.env("MESH_AGENT_BIN", dir.join("mesh-agent"));
    cmd.env("MESH_TESTAPP_BIN", dir.join("mesh-testapp"));
}

fn test(extra: &[String]) -> Result<()> {
    require_root("cargo xtask test")?;
    manifests::validate()?;
    build()?;
    let mut cmd = cargo();
    cmd.args(["test", "--workspace", "--exclude", "mesh-ebpf"]);
    cmd.args(extra);
    bin_env(&mut cmd);
    run(&mut cmd)
}

fn demo() -> Result<()> {
    require_root("cargo xtask demo")?;
    build()?;
    let mut cmd = cargo();
    cmd.args([
        "run",
        "--quiet",
        "-p",
        "mesh-tests",
        "--bin",
        "mesh-demo",
        "--",
    ]);
    cmd.arg(root().join("deploy/local/demo.yaml"));
    bin_env(&mut cmd);
    run(&mut cmd)
}

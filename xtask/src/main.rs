//! Developer and CI tasks: `cargo xtask <setup|build|test|demo|bench|fuzz|validate-manifests>`.
//!
//! Every task but `setup` and `validate-manifests` runs `setup` first; `setup` is idempotent and
//! takes well under a second when everything is already installed.
mod bench;
mod fuzz;
mod lint;
mod manifests;
mod setup;
mod summary;

use std::io::{IsTerminal, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

const USAGE: &str = "usage: cargo xtask <command>

commands:
  setup   install what building and testing need (nightly rust-src, bpf-linker, Debian packages)
  build   build the agent (with its eBPF programs) and the test tools
  test    the lint gates first (cargo fmt --check, cargo clippy -D warnings on every crate, the
          eBPF crate included, cargo deny), validate-manifests, then unit tests and end-to-end
          tests (root: they create network namespaces and cgroups); every test binary runs
          (--no-fail-fast), then a summary of each, the failures and the totals. Arguments go to
          `cargo test`, after --no-fail-fast
  lint    only the lint gates
  demo    two nodes, a few pods, one agent per node: send traffic and show what the mesh did
  bench   mesh vs direct, every scenario side by side: JSON, Markdown table, SVG chart
          [--quick] [--scenario NAME]... [--duration SECS] [--volume BYTES] [--out DIR] (--help: more);
          --compare OLD.json NEW.json: two runs' figures side by side, with the change
  fuzz    run every cargo-fuzz target (fuzz/) from its committed seed corpus
          [--seconds N (default 60)] [TARGET]...
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
        Some("lint") => setup::all().and_then(|()| lint::all()),
        Some("demo") => setup::all().and_then(|()| demo()),
        // Comparing two runs' files needs no set-up (nor root): only the stable toolchain.
        Some("bench") if args.iter().any(|a| a == "--compare") => bench::compare(&args[1..]),
        Some("bench") => setup::all().and_then(|()| bench::bench(&args[1..])),
        Some("fuzz") => setup::all().and_then(|()| fuzz::fuzz(&args[1..])),
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

pub fn cargo() -> Command {
    let mut cmd = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
    cmd.current_dir(root());
    cmd
}

pub(crate) fn build() -> Result<()> {
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

/// Where cargo builds: `CARGO_TARGET_DIR`, else the workspace's `target`.
pub fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR").map_or_else(|| root().join("target"), PathBuf::from)
}

/// Paths of the binaries the end-to-end tests and the demo start.
fn bin_env(cmd: &mut Command) {
    let dir = target_dir().join("debug");
    cmd.env("MESH_AGENT_BIN", dir.join("mesh-agent"));
    cmd.env("MESH_TESTAPP_BIN", dir.join("mesh-testapp"));
}

/// `cargo test` of the workspace with `--no-fail-fast`, so every test binary runs even when an
/// earlier one failed; its output streams as usual and is summarized at the end ([`summary`]): a
/// line per test binary, the failed tests with the start of their output, and the totals.
fn test(extra: &[String]) -> Result<()> {
    require_root("cargo xtask test")?;
    lint::all()?;
    manifests::validate()?;
    build()?;
    let mut cmd = cargo();
    cmd.args(test_args(extra));
    bin_env(&mut cmd);
    // cargo writes to a pipe now; keep its colors for a terminal (the summary ignores them).
    if std::io::stdout().is_terminal() && std::env::var_os("CARGO_TERM_COLOR").is_none() {
        cmd.env("CARGO_TERM_COLOR", "always");
    }
    summarized(cmd)
}

/// Runs `cmd` (a `cargo test`), then prints the summary of its output; fails if any test binary
/// or cargo did.
fn summarized(cmd: Command) -> Result<()> {
    let (lines, status) = run_merged(cmd, Box::new(std::io::stdout()), Duration::from_secs(5))?;
    let summary = summary::Summary::parse(&lines);
    print!("{}", summary.render(status.success()));
    let failed = summary.failed(status.success());
    if !failed.is_empty() {
        bail!(
            "{} test binar{} failed: {}",
            failed.len(),
            if failed.len() == 1 { "y" } else { "ies" },
            failed.join(", ")
        );
    }
    if !status.success() {
        bail!(
            "cargo test failed with {status}{}",
            if summary.suites.is_empty() {
                " before running any test binary (see its errors above)"
            } else {
                " (see its output above)"
            }
        );
    }
    Ok(())
}

/// `cargo test`'s arguments: ours, `--no-fail-fast` (unless given already), then the user's, so
/// that test-binary arguments after a `--` of theirs stay after it.
fn test_args(extra: &[String]) -> Vec<String> {
    let mut args: Vec<String> = ["test", "--workspace", "--exclude", "mesh-ebpf"]
        .map(String::from)
        .into();
    let own = extra.iter().take_while(|a| *a != "--");
    if !own.into_iter().any(|a| a == "--no-fail-fast") {
        args.push("--no-fail-fast".into());
    }
    args.extend(extra.iter().cloned());
    args
}

/// Runs `cmd` with its stdout and stderr in one pipe (so they stay in order), echoing what it
/// prints to `echo` as it comes, and returns its lines and exit status. Once it has exited,
/// whatever it left running gets `grace` to close the pipe.
fn run_merged(
    mut cmd: Command,
    mut echo: Box<dyn Write + Send>,
    grace: Duration,
) -> Result<(Vec<String>, ExitStatus)> {
    let shown = format!("{cmd:?}");
    let (mut reader, writer) = std::io::pipe().context("cannot create a pipe")?;
    cmd.stdout(writer.try_clone().context("cannot duplicate a pipe")?)
        .stderr(writer);
    let mut child = cmd
        .spawn()
        .with_context(|| format!("cannot start {shown}"))?;
    // `cmd` holds the pipe's write end: dropped, the pipe ends when the child (and whatever it
    // started) is done.
    drop(cmd);
    let (tx, rx) = mpsc::channel::<String>();
    std::thread::spawn(move || {
        let mut buf = vec![0; 64 * 1024];
        let mut pending: Vec<u8> = Vec::new();
        let line = |bytes: &[u8]| {
            let text = String::from_utf8_lossy(bytes);
            text.trim_end_matches(['\n', '\r']).to_string()
        };
        loop {
            let n = match reader.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(_) => break,
            };
            // Echo as read, not by line: a test's `test name ... ` shows before its outcome.
            let _ = echo.write_all(&buf[..n]);
            let _ = echo.flush();
            pending.extend_from_slice(&buf[..n]);
            let mut start = 0;
            while let Some(end) = pending[start..].iter().position(|&b| b == b'\n') {
                let _ = tx.send(line(&pending[start..start + end]));
                start += end + 1;
            }
            pending.drain(..start);
        }
        if !pending.is_empty() {
            let _ = tx.send(line(&pending));
        }
    });
    let status = child
        .wait()
        .with_context(|| format!("cannot wait for {shown}"))?;
    // A process the tests started and left running may hold the pipe open: read what is there,
    // then go on without it.
    let deadline = Instant::now() + grace;
    let mut lines = Vec::new();
    loop {
        match rx.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
            Ok(line) => lines.push(line),
            Err(mpsc::RecvTimeoutError::Disconnected) => break,
            Err(mpsc::RecvTimeoutError::Timeout) => {
                eprintln!(
                    "xtask: a process started by the tests still holds cargo's output open; \
                     summarizing what was printed until cargo exited"
                );
                break;
            }
        }
    }
    Ok((lines, status))
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn no_fail_fast_goes_before_the_users_arguments() {
        let args =
            |extra: &[&str]| test_args(&extra.iter().map(|a| a.to_string()).collect::<Vec<_>>());
        assert_eq!(
            args(&[]),
            [
                "test",
                "--workspace",
                "--exclude",
                "mesh-ebpf",
                "--no-fail-fast"
            ]
        );
        assert_eq!(
            args(&[
                "-p",
                "mesh-agent",
                "--",
                "--test-threads=1",
                "--no-fail-fast"
            ])[4..],
            [
                "--no-fail-fast",
                "-p",
                "mesh-agent",
                "--",
                "--test-threads=1",
                "--no-fail-fast"
            ]
        );
        assert_eq!(
            args(&["--no-fail-fast", "--", "x"])[4..],
            ["--no-fail-fast", "--", "x"]
        );
    }

    #[test]
    fn merges_stdout_and_stderr_in_order() {
        let mut cmd = Command::new("sh");
        cmd.args([
            "-c",
            "echo out1; echo err1 >&2; printf 'out2\\r\\nlast'; exit 3",
        ]);
        let (lines, status) =
            run_merged(cmd, Box::new(std::io::sink()), Duration::from_secs(5)).unwrap();
        assert_eq!(lines, ["out1", "err1", "out2", "last"]);
        assert_eq!(status.code(), Some(3));
    }

    #[test]
    fn a_leftover_process_holding_the_pipe_does_not_block() {
        let mut cmd = Command::new("sh");
        cmd.args(["-c", "sleep 3 & echo started"]);
        let start = Instant::now();
        let (lines, status) =
            run_merged(cmd, Box::new(std::io::sink()), Duration::from_millis(300)).unwrap();
        assert!(start.elapsed() < Duration::from_secs(2));
        assert_eq!(lines, ["started"]);
        assert!(status.success());
    }
}

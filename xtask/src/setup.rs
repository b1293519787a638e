//! `cargo xtask setup`: the toolchain pieces eBPF needs, and the Debian tools the tests use.
//!
//! Each step checks first and only installs what is missing, so a second run is quick.
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use anyhow::{bail, Context, Result};

use crate::{root, run};

/// Debian packages the project needs (command they provide, package).
const PACKAGES: &[(&str, &str)] = &[
    ("bpftool", "bpftool"),
    ("ip", "iproute2"),
    ("tcpdump", "tcpdump"),
];

/// The cargo-deny release the gate is written for (its config format changes between releases).
const CARGO_DENY_VERSION: &str = "0.20.2";

pub fn all() -> Result<()> {
    nightly_rust_src()?;
    bpf_linker()?;
    nightly_clippy()?;
    cargo_deny()?;
    debian_packages()?;
    Ok(())
}

fn output(cmd: &mut Command) -> Result<String> {
    let shown = format!("{cmd:?}");
    let out = cmd
        .stderr(Stdio::inherit())
        .output()
        .with_context(|| format!("cannot start {shown}"))?;
    if !out.status.success() {
        bail!("{shown} failed with {}", out.status);
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
}

fn nightly_sysroot() -> Result<PathBuf> {
    let sysroot = output(Command::new("rustc").args(["+nightly", "--print", "sysroot"]))
        .context("the nightly toolchain is needed to build the eBPF programs (rustup toolchain install nightly)")?;
    Ok(PathBuf::from(sysroot))
}

fn nightly_rust_src() -> Result<()> {
    let sysroot = nightly_sysroot()?;
    let src = sysroot.join("lib/rustlib/src/rust/library/core/src/lib.rs");
    if src.exists() {
        return Ok(());
    }
    eprintln!("setup: adding rust-src to the nightly toolchain");
    if run(Command::new("rustup").args(["component", "add", "rust-src", "--toolchain", "nightly"]))
        .is_ok()
        && src.exists()
    {
        return Ok(());
    }
    // Fallback: the archive shipped beside the project for exactly this nightly.
    let version = output(Command::new("rustc").args(["+nightly", "-vV"]))?;
    let hash = version
        .lines()
        .find_map(|l| l.strip_prefix("commit-hash: "))
        .map(|h| h[..9].to_string())
        .unwrap_or_default();
    let shared = root().join("../shared/toolchain");
    let archive = std::fs::read_dir(&shared)
        .ok()
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.path())
        .find(|p| p.to_string_lossy().contains(&hash) && p.to_string_lossy().contains("rust-src"));
    let Some(archive) = archive else {
        bail!(
            "rustup could not add rust-src and {} has no rust-src archive for nightly {hash}",
            shared.display()
        );
    };
    eprintln!("setup: rustup failed; unpacking {}", archive.display());
    let dest = sysroot.join("lib/rustlib/src");
    std::fs::create_dir_all(&dest)?;
    run(Command::new("tar")
        .arg("-xJf")
        .arg(&archive)
        .arg("-C")
        .arg(&dest))?;
    if !src.exists() {
        bail!("{} did not provide {}", archive.display(), src.display());
    }
    Ok(())
}

/// Where the libLLVM symlinks live; bpf-linker's rpath points here, so it must last.
fn llvm_prefix() -> PathBuf {
    let home = std::env::var_os("HOME").map_or_else(|| PathBuf::from("/root"), PathBuf::from);
    home.join(".local/share/mesh-bpf-llvm")
}

/// Whether `cmd` runs and succeeds (its output discarded): is a tool installed and working.
fn succeeds(cmd: &mut Command) -> bool {
    cmd.stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

fn bpf_linker() -> Result<()> {
    if succeeds(Command::new("bpf-linker").arg("--version")) {
        return Ok(());
    }
    let sysroot = nightly_sysroot()?;
    let lib = sysroot.join("lib");
    let llvm = std::fs::read_dir(&lib)?
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .find(|n| n.starts_with("libLLVM.so."))
        .with_context(|| {
            format!(
                "no libLLVM.so.* in {}: the nightly toolchain looks incomplete",
                lib.display()
            )
        })?;
    let prefix = llvm_prefix();
    let prefix_lib = prefix.join("lib");
    std::fs::create_dir_all(&prefix_lib)?;
    for name in ["libLLVM.so", llvm.as_str()] {
        let link = prefix_lib.join(name);
        let _ = std::fs::remove_file(&link);
        std::os::unix::fs::symlink(lib.join(&llvm), &link)
            .with_context(|| format!("cannot create {}", link.display()))?;
    }
    let major = llvm
        .trim_start_matches("libLLVM.so.")
        .split('.')
        .next()
        .unwrap_or("22")
        .to_string();
    eprintln!("setup: building bpf-linker against the nightly's LLVM {major} (about a minute)");
    run(Command::new("cargo")
        .args([
            "install",
            "bpf-linker",
            "--no-default-features",
            "--features",
        ])
        .arg(format!("llvm-{major}"))
        .env("LLVM_PREFIX", &prefix))?;
    Ok(())
}

/// Clippy for the nightly (the eBPF crate is linted with it).
fn nightly_clippy() -> Result<()> {
    if succeeds(
        Command::new("cargo")
            .args(["+nightly", "clippy", "--version"])
            .env_remove("RUSTUP_TOOLCHAIN"),
    ) {
        return Ok(());
    }
    eprintln!("setup: adding clippy to the nightly toolchain");
    run(Command::new("rustup").args(["component", "add", "clippy", "--toolchain", "nightly"]))
}

/// `cargo deny` (a lint gate of `cargo xtask test`), built from crates.io with its lock file.
fn cargo_deny() -> Result<()> {
    if succeeds(Command::new("cargo").args(["deny", "--version"])) {
        return Ok(());
    }
    eprintln!("setup: building cargo-deny {CARGO_DENY_VERSION} (a few minutes, once)");
    run(Command::new("cargo").args([
        "install",
        "--locked",
        "cargo-deny",
        "--version",
        CARGO_DENY_VERSION,
    ]))
}

fn has_command(name: &str) -> bool {
    std::env::var_os("PATH")
        .map(|paths| std::env::split_paths(&paths).any(|p| is_executable(&p.join(name))))
        .unwrap_or(false)
        || ["/usr/sbin", "/sbin"]
            .iter()
            .any(|d| is_executable(&Path::new(d).join(name)))
}

fn is_executable(p: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    p.metadata()
        .is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

fn debian_packages() -> Result<()> {
    let missing: Vec<&str> = PACKAGES
        .iter()
        .filter(|(cmd, _)| !has_command(cmd))
        .map(|(_, pkg)| *pkg)
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    eprintln!("setup: installing {}", missing.join(" "));
    run(Command::new("apt-get").arg("update").arg("-qq"))?;
    run(Command::new("apt-get")
        .args(["install", "-y", "-qq", "--no-install-recommends"])
        .args(&missing)
        .env("DEBIAN_FRONTEND", "noninteractive"))
}

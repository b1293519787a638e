//! Builds the eBPF programs (`mesh-ebpf`) for `bpfel-unknown-none` with the nightly toolchain
//! and bpf-linker, and leaves the object at `$OUT_DIR/mesh-ebpf`, which the agent embeds with
//! `aya::include_bytes_aligned!`.
//!
//! `AYA_BUILD_SKIP=1` skips the eBPF build (for tools that only type-check); the agent then
//! carries an empty object and `Datapath::load` refuses to start with a clear message.
use std::{
    env,
    ffi::OsStr,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{anyhow, bail, Context as _};
use aya_build::{Package, Toolchain};

const SETUP_HINT: &str = "run `cargo xtask setup` to install the eBPF toolchain \
                          (nightly Rust with rust-src, and bpf-linker)";

fn main() -> anyhow::Result<()> {
    let manifest_dir =
        PathBuf::from(env::var_os("CARGO_MANIFEST_DIR").context("CARGO_MANIFEST_DIR not set")?);
    let workspace = manifest_dir
        .parent()
        .context("mesh-agent has no parent directory")?;
    let ebpf_dir = workspace.join("mesh-ebpf");
    let common_dir = workspace.join("mesh-common");
    // aya-build prints the eBPF crate's directory; the shared types live elsewhere.
    println!("cargo:rerun-if-changed={}", common_dir.display());
    println!("cargo:rerun-if-changed={}", ebpf_dir.display());
    println!("cargo:rerun-if-env-changed=AYA_BUILD_SKIP");

    let out_dir = PathBuf::from(env::var_os("OUT_DIR").context("OUT_DIR not set")?);
    if skip_requested() {
        let object = out_dir.join("mesh-ebpf");
        std::fs::write(&object, b"")
            .with_context(|| format!("writing placeholder {}", object.display()))?;
        println!(
            "cargo:warning=AYA_BUILD_SKIP is set: the agent is built without its eBPF programs \
             and cannot load the datapath"
        );
        return Ok(());
    }

    check_toolchain()?;
    // aya-build turns every line the nested cargo prints into a `cargo:warning`; keep it to
    // real diagnostics. Build scripts are single-threaded, so changing the environment is sound.
    env::set_var("CARGO_TERM_QUIET", "true");

    let root_dir = ebpf_dir
        .to_str()
        .ok_or_else(|| anyhow!("{} is not valid UTF-8", ebpf_dir.display()))?;
    aya_build::build_ebpf(
        [Package {
            name: "mesh-ebpf",
            root_dir,
            ..Default::default()
        }],
        Toolchain::Nightly,
    )
    .with_context(|| format!("building the eBPF programs in {root_dir} failed; if the toolchain is incomplete, {SETUP_HINT}"))
}

fn skip_requested() -> bool {
    env::var_os("AYA_BUILD_SKIP").is_some_and(|v| v == "1" || v.eq_ignore_ascii_case("true"))
}

/// Fails early, with the fix, when a piece of the eBPF toolchain is missing: otherwise the nested
/// cargo build fails with an error that does not say what to do.
fn check_toolchain() -> anyhow::Result<()> {
    if find_in_path("bpf-linker").is_none() {
        bail!("bpf-linker was not found on PATH; {SETUP_HINT}");
    }
    let Some(rustup) = find_in_path("rustup") else {
        // aya-build then uses the current toolchain and says so; nothing more to check here.
        return Ok(());
    };
    let sysroot = Command::new(&rustup)
        .args(["run", "nightly", "rustc", "--print", "sysroot"])
        .env_remove("RUSTC")
        .env_remove("RUSTC_WORKSPACE_WRAPPER")
        .output()
        .context("running `rustup run nightly rustc --print sysroot`")?;
    if !sysroot.status.success() {
        bail!(
            "the nightly Rust toolchain is not installed ({}); {SETUP_HINT}",
            String::from_utf8_lossy(&sysroot.stderr).trim()
        );
    }
    let sysroot = PathBuf::from(String::from_utf8_lossy(&sysroot.stdout).trim());
    let core_src = sysroot.join("lib/rustlib/src/rust/library/core");
    if !core_src.is_dir() {
        bail!(
            "rust-src is not installed for the nightly toolchain ({} is missing); {SETUP_HINT}",
            core_src.display()
        );
    }
    Ok(())
}

fn find_in_path(name: impl AsRef<OsStr>) -> Option<PathBuf> {
    let path = env::var_os("PATH")?;
    env::split_paths(&path)
        .map(|dir| dir.join(name.as_ref()))
        .find(|candidate| is_executable(candidate))
}

fn is_executable(path: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt as _;
    path.metadata()
        .is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

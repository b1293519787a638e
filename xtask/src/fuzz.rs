//! `cargo xtask fuzz [--seconds N] [TARGET]...`: runs every `cargo fuzz` target of `fuzz/`
//! (libFuzzer, nightly) for N seconds each (default 60), starting from the committed seed corpus
//! `fuzz/corpus/<target>/`. New inputs libFuzzer finds go to `fuzz/target/corpus/<target>/`
//! (not committed); a crash stops the run and names the input under `fuzz/artifacts/`.
use std::process::Command;

use anyhow::{bail, Context, Result};

use crate::{root, run};

/// The targets in `fuzz/Cargo.toml`, one per parser that takes outside input.
pub const TARGETS: &[&str] = &[
    "config_file",
    "policy_documents",
    "kubernetes_objects",
    "hbone_request",
    "certificate",
];
/// The cargo-fuzz release installed when missing.
const CARGO_FUZZ: &str = "0.13.1";

pub fn fuzz(args: &[String]) -> Result<()> {
    let mut seconds: u64 = 60;
    let mut targets = Vec::new();
    let mut it = args.iter();
    while let Some(a) = it.next() {
        match a.as_str() {
            "--seconds" => {
                let v = it.next().context("--seconds needs a number")?;
                seconds = v
                    .parse()
                    .with_context(|| format!("--seconds: {v:?} is not a number"))?;
            }
            t if TARGETS.contains(&t) => targets.push(t),
            other => bail!(
                "unknown fuzz target or option {other:?}; targets: {}",
                TARGETS.join(", ")
            ),
        }
    }
    if targets.is_empty() {
        targets = TARGETS.to_vec();
    }
    install_cargo_fuzz()?;
    let fuzz_dir = root().join("fuzz");
    for t in targets {
        let scratch = fuzz_dir.join("target/corpus").join(t);
        std::fs::create_dir_all(&scratch)?;
        eprintln!("fuzz: {t} for {seconds} s");
        run(Command::new("cargo")
            .current_dir(&fuzz_dir)
            .args(["+nightly", "fuzz", "run", t])
            .arg(&scratch)
            .arg(fuzz_dir.join("corpus").join(t))
            .arg("--")
            .arg(format!("-max_total_time={seconds}"))
            // The parsers need no eBPF programs.
            .env("AYA_BUILD_SKIP", "1"))
        .with_context(|| {
            format!(
                "fuzz target {t} failed (a build error above, or a crash: its input is then \
                 under fuzz/artifacts/{t}/; reproduce with \
                 `cd fuzz && AYA_BUILD_SKIP=1 cargo +nightly fuzz run {t} <that file>`)"
            )
        })?;
    }
    Ok(())
}

fn install_cargo_fuzz() -> Result<()> {
    let installed = Command::new("cargo")
        .args(["+nightly", "fuzz", "--version"])
        .output()
        .is_ok_and(|o| o.status.success());
    if installed {
        return Ok(());
    }
    eprintln!("fuzz: installing cargo-fuzz {CARGO_FUZZ}");
    run(Command::new("cargo").args(["install", "--locked", "cargo-fuzz", "--version", CARGO_FUZZ]))
}

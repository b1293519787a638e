//! `cargo xtask bench` runs this (as root): every scenario side by side on one network-namespace
//! topology with an agent per node; writes `bench.json`, `bench.md` and `bench.svg` to the out
//! directory and prints the Markdown tables.
//!
//! Needs `MESH_AGENT_BIN` (a release `mesh-agent`) and finds `mesh-bench` and `mesh-testapp` next
//! to itself (or at `MESH_BENCH_BIN`, `MESH_TESTAPP_BIN`).
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use mesh_tests::bench::{self, compare, probe, Options, SCENARIOS};

const USAGE: &str = "usage: mesh-bench-run [--quick] [--scenario NAME]... [--duration SECS] [--warmup SECS] [--volume BYTES]
                      [--out DIR] [--reps N] [--pods N,N] [--idle-conns N] [--concurrency N]
                      [--http-conns N] [--no-pin] [--note TEXT] [--only bulk,rr,crr,http,idle,pods,upgrade]
       mesh-bench-run --compare OLD.json NEW.json

  --compare        print every figure two runs' bench.json share, old against new, with the change
                   and whether it went the right way, and the targets whose verdict changed (runs
                   nothing; no root needed)

  --quick          smoke run (small sizes, every phase; CI runs it): well under 2 minutes
  --scenario NAME  run NAME (repeatable; `direct` always runs, it is the baseline; `all` = every one)
  --duration SECS  length of each request/response and connection-rate run (default 10, quick 1)
  --warmup SECS    warm-up before each repetition of a scenario (default 1, quick 0.3)
  --volume BYTES   bytes per throughput run, suffixes K M G (default 1G, quick 64M)
  --out DIR        where bench.json, bench.md and bench.svg go (default target/bench/<timestamp>)
  --reps N         repetitions of every performance figure (default 3, quick 2)
  --pods N,N       enrolled-pod counts for the agent memory figure (default 100,1000; quick 10,50)
  --idle-conns N   idle proxied connections for the memory-per-connection figure (default 1000; quick 100)
  --concurrency N  concurrent connectors in the connection-rate run (default 4)
  --http-conns N   keep-alive connections of the HTTP throughput run (default 8)
  --note TEXT      free text recorded in bench.json and bench.md (e.g. what the agent build is)
  --no-pin         do not pin the client to CPU 0 and the server to CPU 1
  --only LIST      run only these measurements: bulk (1 and 8 streams), rr, crr, http (HTTP/1.1
                   1 KiB request/response direct, through the mesh and through the waypoint;
                   the waypoint's CPU and RSS), idle (memory per idle connection), pods (memory
                   per enrolled pod), upgrade (connections through agent upgrades and crashes)";

fn main() -> ExitCode {
    match run() {
        Ok(code) => code,
        Err(e) => {
            eprintln!("mesh-bench-run: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn parse_bytes(v: &str) -> Result<u64> {
    let v = v.trim();
    let lower = v.to_ascii_lowercase();
    let digits = lower.trim_end_matches(|c: char| c.is_ascii_alphabetic());
    let mult: u64 = match &lower[digits.len()..] {
        "" | "b" => 1,
        "k" | "kib" | "kb" => 1 << 10,
        "m" | "mib" | "mb" => 1 << 20,
        "g" | "gib" | "gb" => 1 << 30,
        s => bail!("unknown size suffix {s:?} in {v:?}"),
    };
    let n: f64 = digits
        .parse()
        .with_context(|| format!("not a size: {v:?}"))?;
    Ok((n * mult as f64) as u64)
}

fn default_out() -> PathBuf {
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map_or_else(|| probe::workspace_root().join("target"), PathBuf::from);
    let stamp = probe::iso8601(probe::unix_now())
        .replace(['-', ':'], "")
        .replace('T', "-")
        .trim_end_matches('Z')
        .to_string();
    target.join("bench").join(stamp)
}

fn run() -> Result<ExitCode> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.iter().any(|a| a == "-h" || a == "--help") {
        println!("{USAGE}\n\nscenarios:");
        for s in SCENARIOS {
            println!(
                "  {:<18} {}{}",
                s.name,
                s.about,
                if s.default {
                    ""
                } else {
                    " (not run by default)"
                }
            );
        }
        return Ok(ExitCode::SUCCESS);
    }
    if let Some(i) = args.iter().position(|a| a == "--compare") {
        let files: Vec<&String> = args[i + 1..]
            .iter()
            .take_while(|a| !a.starts_with("--"))
            .collect();
        let others: Vec<&String> = args
            .iter()
            .enumerate()
            .filter(|(j, _)| *j != i && !(i + 1..=i + files.len()).contains(j))
            .map(|(_, a)| a)
            .collect();
        if files.len() != 2 {
            bail!(
                "--compare takes two bench.json files (OLD NEW), got {}: {files:?}",
                files.len()
            );
        }
        if !others.is_empty() {
            bail!("--compare runs nothing and takes no other argument: {others:?}");
        }
        let (old, new) = (PathBuf::from(files[0]), PathBuf::from(files[1]));
        let (a, b) = (compare::load(&old)?, compare::load(&new)?);
        let name = |p: &PathBuf| p.display().to_string();
        print!("{}", compare::report(&a, &b, &name(&old), &name(&new)));
        return Ok(ExitCode::SUCCESS);
    }
    let quick = args.iter().any(|a| a == "--quick");
    let mut o = if quick {
        Options::quick(PathBuf::new())
    } else {
        Options::full(PathBuf::new())
    };
    let mut out = None;
    let mut it = args.iter();
    while let Some(flag) = it.next() {
        let mut val = || {
            it.next()
                .cloned()
                .with_context(|| format!("{flag} needs a value\n{USAGE}"))
        };
        match flag.as_str() {
            "--quick" => {}
            "--scenario" => o.scenarios.extend(val()?.split(',').map(str::to_string)),
            "--duration" => {
                let secs: f64 = val()?.parse().context("--duration: seconds")?;
                o.duration = Duration::from_secs_f64(secs.max(0.1));
            }
            "--warmup" => {
                let secs: f64 = val()?.parse().context("--warmup: seconds")?;
                o.warmup = Duration::from_secs_f64(secs.max(0.0));
            }
            "--volume" => o.volume = parse_bytes(&val()?)?.max(1 << 20),
            "--out" => out = Some(PathBuf::from(val()?)),
            "--reps" => o.reps = val()?.parse::<usize>().context("--reps")?.max(1),
            "--pods" => {
                o.pod_steps = val()?
                    .split(',')
                    .filter(|s| !s.is_empty())
                    .map(|s| s.parse::<usize>().context("--pods"))
                    .collect::<Result<_>>()?;
                o.pod_steps.sort_unstable();
            }
            "--idle-conns" => {
                o.idle_conns = val()?.parse::<usize>().context("--idle-conns")?.max(1)
            }
            "--concurrency" => {
                o.crr_concurrency = val()?.parse::<usize>().context("--concurrency")?.max(1)
            }
            "--http-conns" => {
                o.http_conns = val()?.parse::<usize>().context("--http-conns")?.max(1)
            }
            "--no-pin" => o.pin = false,
            "--note" => o.note = val()?,
            "--only" => o.only.extend(
                val()?
                    .split(',')
                    .filter(|s| !s.is_empty())
                    .map(str::to_string),
            ),
            other => bail!("unknown option {other:?}\n{USAGE}"),
        }
    }
    o.out = out.unwrap_or_else(default_out);
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        bail!("the bench needs root: it creates network namespaces and cgroups and loads eBPF");
    }
    let bench_bin = bench::bench_bin();
    if !bench_bin.is_file() {
        bail!("{} not found: build it with `cargo build --release -p mesh-tests --bin mesh-bench` or set MESH_BENCH_BIN", bench_bin.display());
    }
    let results = bench::run(&o)?;
    println!("{}", bench::report::markdown(&results));
    println!(
        "written: {0}/bench.json, {0}/bench.md, {0}/bench.svg",
        o.out.display()
    );
    if !results.leftovers.is_empty() {
        eprintln!("mesh-bench-run: the teardown left {:?}", results.leftovers);
        return Ok(ExitCode::FAILURE);
    }
    if results.bpf_stats_restored.as_deref() != Some(&results.bpf_stats_previous.to_string()) {
        eprintln!(
            "mesh-bench-run: kernel.bpf_stats_enabled is {:?}, expected {} to be restored",
            results.bpf_stats_restored, results.bpf_stats_previous
        );
        return Ok(ExitCode::FAILURE);
    }
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!(parse_bytes("1G").unwrap(), 1 << 30);
        assert_eq!(parse_bytes("64M").unwrap(), 64 << 20);
        assert_eq!(parse_bytes("512k").unwrap(), 512 << 10);
        assert_eq!(parse_bytes("1000").unwrap(), 1000);
        assert_eq!(parse_bytes("1.5GiB").unwrap(), 3 << 29);
        assert!(parse_bytes("1X").is_err());
    }
}

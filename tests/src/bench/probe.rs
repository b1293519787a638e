//! What the bench reads from the machine: facts about it, a process's CPU time and RSS, the
//! kernel's per-program BPF run-time statistics, and Ctrl-C.
use std::collections::BTreeMap;
use std::ffi::CStr;
use std::path::Path;
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicI32, Ordering};

use anyhow::{bail, Context, Result};
use serde_json::{json, Value};

// ---------------------------------------------------------------------------------------------
// machine facts

fn first_line_with(text: &str, key: &str) -> Option<String> {
    text.lines()
        .find(|l| l.starts_with(key))
        .and_then(|l| l.split_once(':'))
        .map(|(_, v)| v.trim().to_string())
}

fn command_output(prog: &str, args: &[&str], dir: Option<&Path>) -> Option<String> {
    let mut cmd = Command::new(prog);
    cmd.args(args);
    if let Some(d) = dir {
        cmd.current_dir(d);
    }
    let out = cmd.output().ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).trim().to_string())
}

/// The workspace this binary was built from.
pub fn workspace_root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ has a parent")
}

/// `git rev-parse --short HEAD` of the workspace, with `-dirty` when the tree has changes.
pub fn git_commit() -> String {
    let root = workspace_root();
    let Some(head) = command_output("git", &["rev-parse", "--short", "HEAD"], Some(root)) else {
        return "unknown".into();
    };
    let dirty = command_output(
        "git",
        &["status", "--porcelain", "--untracked-files=no"],
        Some(root),
    )
    .is_some_and(|s| !s.is_empty());
    if dirty {
        format!("{head}-dirty")
    } else {
        head
    }
}

/// Seconds since the epoch as `YYYY-MM-DDTHH:MM:SSZ`.
pub fn iso8601(secs: u64) -> String {
    let (days, rem) = ((secs / 86_400) as i64, secs % 86_400);
    // Civil-from-days (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem / 60 % 60,
        rem % 60
    )
}

pub fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// CPU model, cores, kernel, memory, OS, toolchain, commit, date.
pub fn machine_facts() -> Value {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    let os = std::fs::read_to_string("/etc/os-release").unwrap_or_default();
    let mem_kib: u64 = first_line_with(&meminfo, "MemTotal")
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0);
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    let hypervisor = cpuinfo
        .lines()
        .find(|l| l.starts_with("flags"))
        .is_some_and(|l| l.split_whitespace().any(|f| f == "hypervisor"));
    json!({
        "cpu_model": first_line_with(&cpuinfo, "model name").unwrap_or_else(|| "unknown".into()),
        "cores": cores,
        "virtualized": hypervisor,
        "kernel": std::fs::read_to_string("/proc/sys/kernel/osrelease").map(|s| s.trim().to_string()).unwrap_or_default(),
        "memory_bytes": mem_kib * 1024,
        "os": first_line_with(&os.replace('=', ":"), "PRETTY_NAME").map(|s| s.trim_matches('"').to_string()).unwrap_or_default(),
        "rustc": command_output("rustc", &["--version"], None).unwrap_or_default(),
        "commit": git_commit(),
        "loadavg_at_start": loadavg(),
        "date": iso8601(unix_now()),
    })
}

/// `/proc/loadavg` (1, 5, 15 minutes, runnable/total, last pid): how busy the machine was.
pub fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.trim().to_string())
        .unwrap_or_default()
}

// ---------------------------------------------------------------------------------------------
// processes

/// User + system CPU seconds of a process (all its threads, from `/proc/<pid>/stat`).
pub fn cpu_secs(pid: u32) -> Result<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .with_context(|| format!("reading /proc/{pid}/stat"))?;
    let rest = stat
        .rsplit_once(')')
        .map(|(_, r)| r)
        .context("malformed stat")?;
    let f: Vec<&str> = rest.split_whitespace().collect();
    // After the command: state(3) ... utime(14) stime(15).
    let ticks: u64 = f
        .get(11)
        .zip(f.get(12))
        .and_then(|(u, s)| Some(u.parse::<u64>().ok()? + s.parse::<u64>().ok()?))
        .context("malformed stat")?;
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    Ok(ticks as f64 / hz)
}

/// Resident set size in bytes (`VmRSS` of `/proc/<pid>/status`).
pub fn rss_bytes(pid: u32) -> Result<u64> {
    status_bytes(pid, "VmRSS")
}

/// Resident set size and its peak in bytes (`VmRSS`, `VmHWM`), from one reading of
/// `/proc/<pid>/status`: two readings apart could see the process free memory in between and
/// report a peak below the size.
pub fn rss_and_peak_bytes(pid: u32) -> Result<(u64, u64)> {
    let status = read_status(pid)?;
    let value =
        |key| status_value(&status, key).with_context(|| format!("no {key} in /proc/{pid}/status"));
    Ok((value("VmRSS")?, value("VmHWM")?))
}

/// A `KEY:  N kB` line of `/proc/<pid>/status`, in bytes.
fn status_bytes(pid: u32, key: &str) -> Result<u64> {
    status_value(&read_status(pid)?, key).with_context(|| format!("no {key} in /proc/{pid}/status"))
}

fn read_status(pid: u32) -> Result<String> {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .with_context(|| format!("reading /proc/{pid}/status"))
}

/// `key`'s value in bytes in the text of a `/proc/<pid>/status`.
fn status_value(status: &str, key: &str) -> Option<u64> {
    let kib: u64 = first_line_with(status, &format!("{key}:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())?;
    Some(kib * 1024)
}

// ---------------------------------------------------------------------------------------------
// Ctrl-C and the BPF stats sysctl

const STATS_SYSCTL: &str = "/proc/sys/kernel/bpf_stats_enabled";
const STATS_SYSCTL_C: &CStr = c"/proc/sys/kernel/bpf_stats_enabled";

static INTERRUPTED: AtomicBool = AtomicBool::new(false);
/// The value to put back into the sysctl on exit (`-1`: nothing to restore).
static STATS_RESTORE: AtomicI32 = AtomicI32::new(-1);

/// True once SIGINT/SIGTERM/SIGHUP arrived: every wait of the bench gives up and unwinds, so the
/// topology is torn down as usual.
pub fn interrupted() -> bool {
    INTERRUPTED.load(Ordering::SeqCst)
}

/// Writes the saved sysctl value back with async-signal-safe calls only.
fn restore_stats_raw() {
    let v = STATS_RESTORE.swap(-1, Ordering::SeqCst);
    if v < 0 {
        return;
    }
    let byte = [b'0' + (v as u8).min(9)];
    // SAFETY: open/write/close are async-signal-safe; the path is a valid C string.
    unsafe {
        let fd = libc::open(STATS_SYSCTL_C.as_ptr(), libc::O_WRONLY | libc::O_CLOEXEC);
        if fd >= 0 {
            libc::write(fd, byte.as_ptr().cast(), 1);
            libc::close(fd);
        }
    }
}

extern "C" fn on_signal(_sig: libc::c_int) {
    if INTERRUPTED.swap(true, Ordering::SeqCst) {
        // Second signal: give up on a clean teardown (the next run sweeps what is left).
        restore_stats_raw();
        // SAFETY: _exit is async-signal-safe.
        unsafe { libc::_exit(130) };
    }
    // The sysctl is host-wide: put it back at once, the teardown may take a while.
    restore_stats_raw();
}

/// Installs the handler for SIGINT, SIGTERM and SIGHUP (children get the default back at exec).
pub fn install_interrupt_handler() {
    // SAFETY: a zeroed sigaction with a valid handler and an empty mask.
    unsafe {
        let mut sa: libc::sigaction = std::mem::zeroed();
        sa.sa_sigaction = on_signal as extern "C" fn(libc::c_int) as usize;
        libc::sigemptyset(&mut sa.sa_mask);
        for sig in [libc::SIGINT, libc::SIGTERM, libc::SIGHUP] {
            libc::sigaction(sig, &sa, std::ptr::null_mut());
        }
    }
}

/// Turns `kernel.bpf_stats_enabled` on for the lifetime of the guard and puts the previous value
/// back on drop (and from the signal handler on Ctrl-C).
pub struct BpfStats {
    previous: i32,
}

impl BpfStats {
    pub fn enable() -> Result<BpfStats> {
        let prev = std::fs::read_to_string(STATS_SYSCTL)
            .with_context(|| format!("reading {STATS_SYSCTL}"))?;
        let previous: i32 = prev.trim().parse().context("parsing bpf_stats_enabled")?;
        if previous != 1 {
            STATS_RESTORE.store(previous, Ordering::SeqCst);
            if let Err(e) = std::fs::write(STATS_SYSCTL, "1") {
                STATS_RESTORE.store(-1, Ordering::SeqCst);
                bail!("cannot enable BPF run-time statistics ({STATS_SYSCTL}): {e}");
            }
        }
        Ok(BpfStats { previous })
    }

    pub fn previous(&self) -> i32 {
        self.previous
    }

    /// Restores now (idempotent); returns the value read back.
    pub fn restore(&self) -> Option<String> {
        restore_stats_raw();
        std::fs::read_to_string(STATS_SYSCTL)
            .ok()
            .map(|s| s.trim().to_string())
    }
}

impl Drop for BpfStats {
    fn drop(&mut self) {
        restore_stats_raw();
    }
}

// ---------------------------------------------------------------------------------------------
// BPF program statistics

/// Cumulative run time and run count of one program.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ProgStats {
    pub run_time_ns: u64,
    pub run_cnt: u64,
}

fn bpftool_json(args: &[&str]) -> Result<Value> {
    let out = Command::new("bpftool")
        .args(args)
        .arg("-j")
        .output()
        .context("running bpftool (cargo xtask setup installs it)")?;
    if !out.status.success() {
        bail!(
            "bpftool {} failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    serde_json::from_slice(&out.stdout).context("parsing bpftool JSON")
}

/// Program id -> name of the agents' programs: every `mesh_*` program that uses one of the maps
/// pinned under `pin_dirs` (cgroup hooks, sockops, sk_lookup alike). Programs of other agents on
/// the host (other test runs) use other maps and are not counted.
pub fn agent_programs(pin_dirs: &[&Path]) -> Result<BTreeMap<u64, String>> {
    let mut maps = std::collections::BTreeSet::new();
    for dir in pin_dirs {
        for e in std::fs::read_dir(dir).with_context(|| format!("listing {}", dir.display()))? {
            let path = e?.path();
            // The maps only: the programs' pinned links live in the `links/` directory.
            if path.is_dir() {
                continue;
            }
            let p = path.to_str().context("pin path")?;
            if let Some(id) = bpftool_json(&["map", "show", "pinned", p])?["id"].as_u64() {
                maps.insert(id);
            }
        }
    }
    let v = bpftool_json(&["prog", "show"])?;
    Ok(v.as_array()
        .into_iter()
        .flatten()
        .filter(|p| {
            p["map_ids"].as_array().is_some_and(|ids| {
                ids.iter()
                    .filter_map(Value::as_u64)
                    .any(|id| maps.contains(&id))
            })
        })
        .filter_map(|p| Some((p["id"].as_u64()?, p["name"].as_str()?.to_string())))
        .filter(|(_, name)| name.starts_with("mesh_"))
        .collect())
}

/// Run-time statistics of the given programs, summed by program name.
pub fn prog_stats(ids: &BTreeMap<u64, String>) -> Result<BTreeMap<String, ProgStats>> {
    let v = bpftool_json(&["prog", "show"])?;
    let mut out: BTreeMap<String, ProgStats> = ids
        .values()
        .map(|n| (n.clone(), ProgStats::default()))
        .collect();
    for p in v.as_array().into_iter().flatten() {
        let Some(id) = p["id"].as_u64() else { continue };
        let Some(name) = ids.get(&id) else { continue };
        let e = out.entry(name.clone()).or_default();
        e.run_time_ns += p["run_time_ns"].as_u64().unwrap_or(0);
        e.run_cnt += p["run_cnt"].as_u64().unwrap_or(0);
    }
    Ok(out)
}

/// `after - before` per program.
pub fn prog_delta(
    before: &BTreeMap<String, ProgStats>,
    after: &BTreeMap<String, ProgStats>,
) -> BTreeMap<String, ProgStats> {
    after
        .iter()
        .map(|(k, a)| {
            let b = before.get(k).copied().unwrap_or_default();
            (
                k.clone(),
                ProgStats {
                    run_time_ns: a.run_time_ns.saturating_sub(b.run_time_ns),
                    run_cnt: a.run_cnt.saturating_sub(b.run_cnt),
                },
            )
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dates() {
        assert_eq!(iso8601(0), "1970-01-01T00:00:00Z");
        assert_eq!(iso8601(951_782_400), "2000-02-29T00:00:00Z");
        assert_eq!(iso8601(1_767_225_599), "2025-12-31T23:59:59Z");
    }

    #[test]
    fn own_process() {
        let me = std::process::id();
        assert!(cpu_secs(me).unwrap() >= 0.0);
        assert!(rss_bytes(me).unwrap() > 0);
        // Both from one reading: the peak is at least the size.
        let (rss, peak) = rss_and_peak_bytes(me).unwrap();
        assert!(rss > 0);
        assert!(peak > 0);
        assert!(peak >= rss, "{peak} < {rss}");
    }
}

//! Finding a pod's network namespace by its IP address, without help from a CNI plugin.
//!
//! Kubernetes tells the agent a pod's IP but not its network namespace. The namespace is the one
//! whose interfaces hold that IP, so the finder looks at every namespace it can name: the files
//! in `/var/run/netns` (bind mounts made by `ip netns`, containerd and CRI-O) and
//! `/proc/<pid>/ns/net` of every process (which needs the host's PID namespace, `hostPID: true`).
//! Many paths name the same namespace — every process of a pod, plus its bind mount — so the
//! paths are first reduced to distinct namespaces by the (device, inode) of their nsfs file, and
//! each distinct namespace is entered once per scan (on a helper thread, with `setns`) to read
//! its addresses with `getifaddrs`. The agent's own namespace is skipped.
//!
//! The answer is a path to open later: the `/var/run/netns` bind mount when there is one (it
//! lives as long as the sandbox), otherwise `/proc/<pid>/ns/net` of one process in the namespace
//! (which dies with that process). Either way it comes with the namespace's [`NsId`], so the
//! caller can tell later whether the path still names the same namespace.
//!
//! One scan fills a cache of every address it saw, so many pods enrolled at once cost one scan.
//! A cached answer is re-checked before use (the path still names the same namespace, the
//! address is still on one of its interfaces); a miss triggers a new scan, at most one per
//! [`MIN_SCAN_INTERVAL`], so a pod that never appears does not keep the agent scanning `/proc`.
use std::collections::{HashMap, HashSet};
use std::fs::{self, File};
use std::io;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::net::netns::{self, NsId};

/// Where `ip netns`, containerd and CRI-O bind-mount network namespaces.
pub const DEFAULT_NETNS_DIR: &str = "/var/run/netns";
/// The host's procfs (mounted at another place in a container: pass it with `--proc-dir`).
pub const DEFAULT_PROC_DIR: &str = "/proc";
/// At most one full scan per this interval; misses in between are answered from the last scan.
pub const MIN_SCAN_INTERVAL: Duration = Duration::from_millis(500);

/// A network namespace found by address: a path to open, and which namespace it named when found.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FoundNetns {
    pub path: PathBuf,
    pub id: NsId,
}

impl FoundNetns {
    /// Whether `path` still names the namespace it named when found: one `stat`, no `setns`.
    /// False once the bind mount is removed, the process exited, or its pid was reused.
    pub fn is_current(&self) -> bool {
        NsId::of_path(&self.path).is_ok_and(|id| id == self.id)
    }
}

/// Why a workload's namespace was not found. The messages are meant for operators.
#[derive(Debug, thiserror::Error)]
pub enum DiscoverError {
    #[error("the workload has no IP address to find its network namespace by")]
    NoAddress,
    #[error(
        "no network namespace on this node holds {ips} (is the pod running on this node? does \
         the agent see the host's {proc_dir} — hostPID: true — and {netns_dir}?); {detail}"
    )]
    NotFound {
        ips: String,
        netns_dir: String,
        proc_dir: String,
        /// What the last scan looked at and what got in its way.
        detail: String,
    },
    #[error(
        "{ip} is on an interface in {count} network namespaces ({paths}); refusing to guess \
         which one is the pod's"
    )]
    Ambiguous {
        ip: IpAddr,
        count: usize,
        paths: String,
    },
    #[error(
        "the workload's addresses are in different network namespaces: {ip_a} in {path_a}, \
         {ip_b} in {path_b}"
    )]
    Split {
        ip_a: IpAddr,
        path_a: String,
        ip_b: IpAddr,
        path_b: String,
    },
}

/// Counters, for logs and tests.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct FinderStats {
    /// Full scans so far.
    pub scans: u64,
    /// Namespaces entered by scans (each distinct namespace once per scan).
    pub entered: u64,
    /// Namespaces entered to re-check a cached answer.
    pub rechecks: u64,
    /// Paths the last scan looked at (netns dir entries and processes).
    pub last_paths: usize,
    /// Distinct namespaces among them, the agent's own excluded: what the last scan entered.
    pub last_namespaces: usize,
    pub last_duration: Duration,
}

/// What the last scan saw, for the not-found message.
struct LastScan {
    at: Instant,
    namespaces: usize,
    problems: Vec<String>,
}

/// Finds the network namespace holding an IP address; see the module documentation.
pub struct NetnsFinder {
    netns_dir: PathBuf,
    proc_dir: PathBuf,
    min_scan_interval: Duration,
    /// Every address the last scan saw (loopback and link-local left out), with the namespaces
    /// holding it (normally one).
    cache: HashMap<IpAddr, Vec<FoundNetns>>,
    last_scan: Option<LastScan>,
    stats: FinderStats,
}

impl Default for NetnsFinder {
    fn default() -> Self {
        NetnsFinder::new(DEFAULT_NETNS_DIR.into(), DEFAULT_PROC_DIR.into())
    }
}

impl NetnsFinder {
    /// Scans the files in `netns_dir` and `proc_dir/<pid>/ns/net`. Neither needs to exist, but
    /// without the host's `/proc` only namespaces with a bind mount can be found.
    pub fn new(netns_dir: PathBuf, proc_dir: PathBuf) -> NetnsFinder {
        NetnsFinder {
            netns_dir,
            proc_dir,
            min_scan_interval: MIN_SCAN_INTERVAL,
            cache: HashMap::new(),
            last_scan: None,
            stats: FinderStats::default(),
        }
    }

    /// Changes the minimum time between two full scans (default [`MIN_SCAN_INTERVAL`]).
    pub fn with_min_scan_interval(mut self, interval: Duration) -> NetnsFinder {
        self.min_scan_interval = interval;
        self
    }

    pub fn stats(&self) -> &FinderStats {
        &self.stats
    }

    /// The namespace that holds the workload's addresses. A cached answer is re-checked first;
    /// a miss scans the node (at most once per minimum interval). With several addresses, those
    /// found must all be in one namespace; some may be missing (an IPv6 address not configured
    /// yet, say) as long as one is found.
    pub fn find(&mut self, ips: &[IpAddr]) -> Result<FoundNetns, DiscoverError> {
        let mut wanted: Vec<IpAddr> = Vec::new();
        for ip in ips.iter().map(IpAddr::to_canonical) {
            if !wanted.contains(&ip) {
                wanted.push(ip);
            }
        }
        if wanted.is_empty() {
            return Err(DiscoverError::NoAddress);
        }
        let mut complete = true;
        for ip in &wanted {
            let Some(entries) = self.cache.remove(ip) else {
                complete = false;
                continue;
            };
            let valid: Vec<FoundNetns> = entries
                .into_iter()
                .filter(|found| self.recheck(found, *ip))
                .collect();
            if valid.is_empty() {
                complete = false;
            } else {
                self.cache.insert(*ip, valid);
            }
        }
        if !complete && self.may_scan() {
            self.rescan();
        }
        self.answer(&wanted)
    }

    /// Whether `found` still names the same namespace and `ip` is still on one of its interfaces.
    fn recheck(&mut self, found: &FoundNetns, ip: IpAddr) -> bool {
        if !found.is_current() {
            return false;
        }
        self.stats.rechecks += 1;
        let result = on_helper_thread(|| addresses_in(found));
        matches!(result, Ok(Ok(addrs)) if addrs.contains(&ip))
    }

    fn may_scan(&self) -> bool {
        self.last_scan
            .as_ref()
            .is_none_or(|last| last.at.elapsed() >= self.min_scan_interval)
    }

    /// One full scan; replaces the whole cache.
    fn rescan(&mut self) {
        let scan = scan(&self.netns_dir, &self.proc_dir);
        self.stats.scans += 1;
        self.stats.entered += scan.namespaces as u64;
        self.stats.last_paths = scan.paths;
        self.stats.last_namespaces = scan.namespaces;
        self.stats.last_duration = scan.duration;
        tracing::debug!(
            netns_dir = %self.netns_dir.display(),
            proc_dir = %self.proc_dir.display(),
            paths = scan.paths,
            namespaces = scan.namespaces,
            addresses = scan.by_ip.len(),
            took_ms = scan.duration.as_secs_f64() * 1e3,
            "scanned the node's network namespaces"
        );
        self.cache = scan.by_ip;
        self.last_scan = Some(LastScan {
            at: Instant::now(),
            namespaces: scan.namespaces,
            problems: scan.problems,
        });
    }

    /// The answer the cache gives for `ips`, as it is now.
    fn answer(&self, ips: &[IpAddr]) -> Result<FoundNetns, DiscoverError> {
        let mut found: Option<(IpAddr, &FoundNetns)> = None;
        for ip in ips {
            let Some(entries) = self.cache.get(ip) else {
                continue;
            };
            if entries.len() > 1 {
                return Err(DiscoverError::Ambiguous {
                    ip: *ip,
                    count: entries.len(),
                    paths: entries
                        .iter()
                        .map(|f| format!("{} {}", f.path.display(), f.id))
                        .collect::<Vec<_>>()
                        .join(", "),
                });
            }
            let this = &entries[0];
            match found {
                None => found = Some((*ip, this)),
                Some((_, first)) if first.id == this.id => {}
                Some((first_ip, first)) => {
                    return Err(DiscoverError::Split {
                        ip_a: first_ip,
                        path_a: first.path.display().to_string(),
                        ip_b: *ip,
                        path_b: this.path.display().to_string(),
                    })
                }
            }
        }
        if let Some((_, found)) = found {
            return Ok(found.clone());
        }
        let detail = match &self.last_scan {
            None => "no scan yet".to_string(),
            Some(last) => {
                let mut detail = format!(
                    "the last scan, {} ms ago, looked into {} namespaces",
                    last.at.elapsed().as_millis(),
                    last.namespaces
                );
                for problem in &last.problems {
                    detail.push_str("; ");
                    detail.push_str(problem);
                }
                detail
            }
        };
        Err(DiscoverError::NotFound {
            ips: ips
                .iter()
                .map(IpAddr::to_string)
                .collect::<Vec<_>>()
                .join(", "),
            netns_dir: self.netns_dir.display().to_string(),
            proc_dir: self.proc_dir.display().to_string(),
            detail,
        })
    }
}

struct Scan {
    by_ip: HashMap<IpAddr, Vec<FoundNetns>>,
    paths: usize,
    namespaces: usize,
    problems: Vec<String>,
    duration: Duration,
}

/// Lists every namespace `netns_dir` and `proc_dir` name, once each, and reads their addresses.
fn scan(netns_dir: &Path, proc_dir: &Path) -> Scan {
    let started = Instant::now();
    // The agent's own namespace (the host's, with hostNetwork) is never a pod's. Its device is
    // nsfs's: every namespace file has it, so other files (a stale, unmounted entry in
    // /var/run/netns) are skipped without opening them.
    let own = NsId::of_path(Path::new("/proc/self/ns/net")).ok();
    let mut problems = Vec::new();
    let mut paths = Vec::new();
    match fs::read_dir(netns_dir) {
        Ok(dir) => {
            let mut entries: Vec<PathBuf> = dir.filter_map(|e| Some(e.ok()?.path())).collect();
            entries.sort();
            paths.extend(entries);
        }
        // No `ip netns` user on this node: normal.
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => problems.push(format!("cannot read {}: {e}", netns_dir.display())),
    }
    match fs::read_dir(proc_dir) {
        Ok(dir) => {
            let mut pids: Vec<u32> = dir
                .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
                .collect();
            pids.sort_unstable();
            paths.extend(
                pids.into_iter()
                    .map(|pid| proc_dir.join(pid.to_string()).join("ns/net")),
            );
        }
        Err(e) => problems.push(format!("cannot read {}: {e}", proc_dir.display())),
    }
    // Bind mounts come first, so a namespace that has one is named by it.
    let mut seen = HashSet::new();
    let mut candidates = Vec::new();
    let mut denied: Vec<&Path> = Vec::new();
    for path in &paths {
        let id = match NsId::of_path(path) {
            Ok(id) => id,
            Err(e) if e.kind() == io::ErrorKind::PermissionDenied => {
                denied.push(path);
                continue;
            }
            // Processes come and go during the scan: one fewer path.
            Err(_) => continue,
        };
        if own.is_some_and(|own| own == id || own.dev != id.dev) {
            continue;
        }
        if seen.insert(id) {
            candidates.push(FoundNetns {
                path: path.clone(),
                id,
            });
        }
    }
    if let Some(first) = denied.first() {
        problems.push(format!(
            "{} namespace paths could not be read (first: {}: permission denied; another user's \
             /proc/<pid>/ns/net needs CAP_SYS_PTRACE)",
            denied.len(),
            first.display()
        ));
    }
    let results = on_helper_thread(|| candidates.iter().map(addresses_in).collect::<Vec<_>>())
        .unwrap_or_else(|e| {
            problems.push(format!("cannot start the scanning thread: {e}"));
            Vec::new()
        });
    let mut by_ip: HashMap<IpAddr, Vec<FoundNetns>> = HashMap::new();
    let mut namespaces = 0;
    let mut failed: Vec<String> = Vec::new();
    for (found, result) in candidates.iter().zip(results) {
        match result {
            Ok(addrs) => {
                namespaces += 1;
                for ip in addrs {
                    let ip = ip.to_canonical();
                    if !is_pod_address(ip) {
                        continue;
                    }
                    let holders = by_ip.entry(ip).or_default();
                    if !holders.contains(found) {
                        holders.push(found.clone());
                    }
                }
            }
            // Gone between stat and open.
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => {
                let hint = if e.kind() == io::ErrorKind::PermissionDenied {
                    " (entering a namespace needs CAP_SYS_ADMIN)"
                } else {
                    ""
                };
                failed.push(format!("{}: {e}{hint}", found.path.display()));
            }
        }
    }
    if let Some(first) = failed.first() {
        problems.push(format!(
            "{} namespaces could not be entered (first: {first})",
            failed.len()
        ));
    }
    Scan {
        by_ip,
        paths: paths.len(),
        namespaces,
        problems,
        duration: started.elapsed(),
    }
}

/// Loopback and link-local addresses are in every namespace; they never identify a pod.
fn is_pod_address(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => !v4.is_loopback() && !v4.is_unspecified(),
        IpAddr::V6(v6) => !v6.is_loopback() && !v6.is_unspecified() && !v6.is_unicast_link_local(),
    }
}

/// Runs `f` on a new thread (which may enter other namespaces and then just ends, so no thread
/// of the runtime ever leaves the agent's namespace).
fn on_helper_thread<T: Send>(f: impl FnOnce() -> T + Send) -> io::Result<T> {
    std::thread::scope(|scope| {
        let helper = std::thread::Builder::new()
            .name("mesh-netns-scan".into())
            .spawn_scoped(scope, f)?;
        Ok(helper
            .join()
            .unwrap_or_else(|panic| std::panic::resume_unwind(panic)))
    })
}

/// The addresses on the interfaces of `found`'s namespace. Moves the calling thread into it: call
/// only on a helper thread.
fn addresses_in(found: &FoundNetns) -> io::Result<Vec<IpAddr>> {
    let file = File::open(&found.path)?;
    // The path may name another namespace by now (a pid reused): not the one we are after.
    if NsId::of_file(&file)? != found.id {
        return Err(io::Error::new(
            io::ErrorKind::NotFound,
            "names another namespace now",
        ));
    }
    netns::setns(&file)?;
    interface_addresses()
}

/// `getifaddrs(3)` in the calling thread's network namespace: IPv4 and IPv6 addresses only.
fn interface_addresses() -> io::Result<Vec<IpAddr>> {
    let addrs = nix::ifaddrs::getifaddrs()?
        .filter_map(|ifa| {
            let addr = ifa.address?;
            if let Some(sin) = addr.as_sockaddr_in() {
                Some(IpAddr::V4(sin.ip()))
            } else {
                addr.as_sockaddr_in6().map(|sin6| IpAddr::V6(sin6.ip()))
            }
        })
        .collect();
    Ok(addrs)
}

#[cfg(test)]
mod tests;

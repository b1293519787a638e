//! Low-level helpers: cgroup2 discovery, network namespaces, mounts, process scanning and
//! race-free signalling (pidfd). Everything here acts only on paths and processes it is told about.

use anyhow::{anyhow, bail, Context, Result};
use std::collections::BTreeSet;
use std::fs::{self, File};
use std::io::{self, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// Directory where `ip netns` keeps its named namespaces.
pub const NETNS_DIR: &str = "/var/run/netns";

/// Environment variable set on every process spawned by a topology; its value is the prefix.
pub const OWNER_ENV: &str = "MESH_TESTS_OWNER";

/// The mount point of the cgroup v2 hierarchy, read from `/proc/mounts` (first `cgroup2` entry).
pub fn cgroup2_mount() -> Result<PathBuf> {
    let mounts = fs::read_to_string("/proc/mounts").context("reading /proc/mounts")?;
    for line in mounts.lines() {
        let mut fields = line.split_whitespace();
        let (_src, Some(target), Some(fstype)) = (fields.next(), fields.next(), fields.next())
        else {
            continue;
        };
        if fstype == "cgroup2" {
            return Ok(PathBuf::from(unescape_mount_path(target)));
        }
    }
    bail!("no cgroup2 mount found in /proc/mounts")
}

/// `/proc/mounts` and `/proc/self/mountinfo` escape space, tab, newline and backslash as `\ooo`.
fn unescape_mount_path(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\'
            && i + 3 < b.len()
            && b[i + 1..i + 4].iter().all(|c| (b'0'..=b'7').contains(c))
        {
            let v = u32::from(b[i + 1] - b'0') * 64
                + u32::from(b[i + 2] - b'0') * 8
                + u32::from(b[i + 3] - b'0');
            out.push((v & 0xff) as u8);
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// All mount points of this mount namespace (from `/proc/self/mountinfo`).
pub fn mount_points() -> Vec<PathBuf> {
    let Ok(info) = fs::read_to_string("/proc/self/mountinfo") else {
        return Vec::new();
    };
    info.lines()
        .filter_map(|l| l.split(' ').nth(4))
        .map(|p| PathBuf::from(unescape_mount_path(p)))
        .collect()
}

/// Runs `f` on a fresh thread that has joined the network namespace at `netns_path`.
/// The namespace switch is verified (inode comparison) before `f` runs, so `f` can never act on the
/// caller's namespace by mistake. Only this helper thread changes namespace; the process does not.
pub fn in_netns<T, F>(netns_path: &Path, f: F) -> Result<T>
where
    T: Send,
    F: FnOnce() -> Result<T> + Send,
{
    let file =
        File::open(netns_path).with_context(|| format!("opening {}", netns_path.display()))?;
    let expected = file.metadata()?.ino();
    std::thread::scope(|s| {
        s.spawn(move || {
            // SAFETY: plain syscall on a valid fd; affects only this thread.
            if unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                return Err(io::Error::last_os_error())
                    .with_context(|| format!("setns into {}", netns_path.display()));
            }
            let now = fs::metadata("/proc/thread-self/ns/net")?.ino();
            if now != expected {
                bail!("setns into {} did not take effect", netns_path.display());
            }
            f()
        })
        .join()
        .map_err(|_| anyhow!("netns helper thread panicked"))?
    })
}

/// Sets sysctls (paths relative to /proc/sys, e.g. `net/ipv4/ip_forward`) inside a network namespace.
pub fn netns_sysctls(netns_path: &Path, settings: &[(&str, &str)]) -> Result<()> {
    in_netns(netns_path, || {
        for (key, value) in settings {
            let path = Path::new("/proc/sys").join(key);
            fs::write(&path, value).with_context(|| format!("writing {}", path.display()))?;
        }
        Ok(())
    })
}

/// Runs `ip` with the given arguments (and optional batch input on stdin).
pub fn ip(args: &[&str], batch: Option<&str>) -> Result<()> {
    let mut cmd = Command::new("ip");
    cmd.args(args)
        .stdin(if batch.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd
        .spawn()
        .context("spawning ip (is iproute2 installed?)")?;
    if let Some(input) = batch {
        let mut stdin = child.stdin.take().expect("piped stdin");
        stdin.write_all(input.as_bytes())?;
    }
    let out = child.wait_with_output()?;
    if !out.status.success() {
        bail!(
            "ip {} failed ({}): {}{}",
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim(),
            batch.map(|b| format!("\nbatch:\n{b}")).unwrap_or_default()
        );
    }
    Ok(())
}

/// Creates a named network namespace (`ip netns add`).
pub fn netns_add(name: &str) -> Result<PathBuf> {
    ip(&["netns", "add", name], None)?;
    Ok(Path::new(NETNS_DIR).join(name))
}

/// Removes a named network namespace: lazy-unmounts its bind mount and unlinks the file
/// (what `ip netns del` does). The namespace itself goes away once nothing references it.
pub fn netns_del(name: &str) -> Result<()> {
    let path = Path::new(NETNS_DIR).join(name);
    if !path.exists() {
        return Ok(());
    }
    let _ = umount_detach(&path);
    fs::remove_file(&path).with_context(|| format!("removing {}", path.display()))
}

/// Lists named network namespaces.
pub fn netns_names() -> Vec<String> {
    let Ok(rd) = fs::read_dir(NETNS_DIR) else {
        return Vec::new();
    };
    rd.filter_map(|e| e.ok())
        .filter_map(|e| e.file_name().to_str().map(str::to_owned))
        .collect()
}

/// Inode of a namespace file (e.g. `/var/run/netns/x`).
pub fn ns_inode(path: &Path) -> Option<u64> {
    fs::metadata(path).ok().map(|m| m.ino())
}

/// Lazily unmounts `path` (`umount -l`).
pub fn umount_detach(path: &Path) -> Result<()> {
    nix::mount::umount2(path, nix::mount::MntFlags::MNT_DETACH)
        .with_context(|| format!("umount {}", path.display()))
}

/// Mounts a private bpffs on the existing directory `path`.
pub fn mount_bpffs(path: &Path) -> Result<()> {
    nix::mount::mount(
        Some("bpf"),
        path,
        Some("bpf"),
        nix::mount::MsFlags::empty(),
        None::<&str>,
    )
    .with_context(|| format!("mount -t bpf bpf {}", path.display()))
}

/// All directories of a cgroup subtree, deepest first (the root itself last).
pub fn cgroup_dirs_leaf_first(root: &Path) -> Vec<PathBuf> {
    fn walk(dir: &Path, out: &mut Vec<PathBuf>) {
        if let Ok(rd) = fs::read_dir(dir) {
            for e in rd.flatten() {
                if e.file_type().map(|t| t.is_dir()).unwrap_or(false) {
                    walk(&e.path(), out);
                }
            }
        }
        out.push(dir.to_path_buf());
    }
    let mut out = Vec::new();
    if root.is_dir() {
        walk(root, &mut out);
    }
    out
}

/// PIDs listed in `cgroup.procs` anywhere in a cgroup subtree.
pub fn cgroup_pids(root: &Path) -> BTreeSet<i32> {
    let mut pids = BTreeSet::new();
    for dir in cgroup_dirs_leaf_first(root) {
        if let Ok(s) = fs::read_to_string(dir.join("cgroup.procs")) {
            pids.extend(s.lines().filter_map(|l| l.trim().parse::<i32>().ok()));
        }
    }
    pids
}

/// Removes a cgroup subtree, leaf first, retrying while cgroups are still busy (exiting tasks).
pub fn remove_cgroup_tree(root: &Path, timeout: Duration) -> Result<()> {
    let deadline = Instant::now() + timeout;
    for dir in cgroup_dirs_leaf_first(root) {
        loop {
            match fs::remove_dir(&dir) {
                Ok(()) => break,
                Err(e) if e.kind() == io::ErrorKind::NotFound => break,
                Err(e) if Instant::now() < deadline => {
                    let _ = e;
                    std::thread::sleep(Duration::from_millis(10));
                }
                Err(e) => {
                    return Err(e).with_context(|| format!("rmdir {}", dir.display()));
                }
            }
        }
    }
    Ok(())
}

/// All PIDs currently in /proc.
pub fn all_pids() -> Vec<i32> {
    let Ok(rd) = fs::read_dir("/proc") else {
        return Vec::new();
    };
    rd.flatten()
        .filter_map(|e| e.file_name().to_str().and_then(|s| s.parse::<i32>().ok()))
        .collect()
}

/// Process state letter from /proc/PID/stat (`R`, `S`, `Z`, ...), None if gone.
pub fn proc_state(pid: i32) -> Option<char> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = &stat[stat.rfind(')')? + 1..];
    rest.trim_start().chars().next()
}

/// True if the process exists and is not a zombie.
pub fn pid_alive(pid: i32) -> bool {
    matches!(proc_state(pid), Some(s) if s != 'Z' && s != 'X')
}

pub fn proc_comm(pid: i32) -> String {
    fs::read_to_string(format!("/proc/{pid}/comm"))
        .map(|s| s.trim().to_owned())
        .unwrap_or_default()
}

/// Network namespace inode of a process.
pub fn proc_netns_inode(pid: i32) -> Option<u64> {
    let link = fs::read_link(format!("/proc/{pid}/ns/net")).ok()?;
    let s = link.to_str()?;
    s.strip_prefix("net:[")?.strip_suffix(']')?.parse().ok()
}

/// Value of the owner marker variable in a process's environment.
pub fn proc_owner_marker(pid: i32) -> Option<String> {
    let env = fs::read(format!("/proc/{pid}/environ")).ok()?;
    let key = format!("{OWNER_ENV}=");
    env.split(|b| *b == 0)
        .find_map(|kv| kv.strip_prefix(key.as_bytes()))
        .map(|v| String::from_utf8_lossy(v).into_owned())
}

/// A pidfd that pins one process, so signals cannot hit a recycled PID.
pub fn pidfd_open(pid: i32) -> Option<OwnedFd> {
    // SAFETY: plain syscall.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
    if fd < 0 {
        return None;
    }
    // SAFETY: the kernel returned a fresh fd that we now own.
    Some(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

pub fn pidfd_signal(fd: &OwnedFd, sig: i32) -> bool {
    // SAFETY: plain syscall on a valid pidfd.
    unsafe {
        libc::syscall(
            libc::SYS_pidfd_send_signal,
            fd.as_raw_fd(),
            sig,
            std::ptr::null::<libc::siginfo_t>(),
            0,
        ) == 0
    }
}

/// True once the process behind the pidfd has exited (zombie or reaped).
pub fn pidfd_exited(fd: &OwnedFd, wait: Duration) -> bool {
    let mut p = libc::pollfd {
        fd: fd.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    let ms = wait.as_millis().min(i32::MAX as u128) as i32;
    // SAFETY: one valid pollfd.
    let rc = unsafe { libc::poll(&mut p, 1, ms) };
    rc > 0
}

/// Terminates processes: pins each with a pidfd, re-checks `still_ours(pid)` (so a recycled PID is
/// never signalled), sends SIGTERM, waits up to `grace`, then SIGKILLs what is left and waits.
/// Returns descriptions of processes that could not be confirmed dead.
pub fn terminate_pids(
    pids: &BTreeSet<i32>,
    still_ours: impl Fn(i32) -> bool,
    grace: Duration,
) -> Vec<String> {
    let me = std::process::id() as i32;
    let mut pinned = Vec::new();
    for &pid in pids {
        if pid == me || pid <= 1 {
            continue;
        }
        if let Some(fd) = pidfd_open(pid) {
            if still_ours(pid) && pid_alive(pid) {
                pinned.push((pid, fd));
            }
        }
    }
    for (_, fd) in &pinned {
        pidfd_signal(fd, libc::SIGTERM);
    }
    let deadline = Instant::now() + grace;
    let mut left: Vec<_> = pinned;
    while !left.is_empty() && Instant::now() < deadline {
        left.retain(|(_, fd)| !pidfd_exited(fd, Duration::from_millis(0)));
        if !left.is_empty() {
            std::thread::sleep(Duration::from_millis(10));
        }
    }
    for (_, fd) in &left {
        pidfd_signal(fd, libc::SIGKILL);
    }
    let deadline = Instant::now() + Duration::from_secs(5);
    left.retain(|(_, fd)| {
        let remaining = deadline.saturating_duration_since(Instant::now());
        !pidfd_exited(fd, remaining)
    });
    left.iter()
        .map(|(pid, _)| format!("process {pid} ({}) did not die", proc_comm(*pid)))
        .collect()
}

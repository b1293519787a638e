//! The finder against real network namespaces (root): `ip netns add` bind mounts and processes
//! started with `unshare --net`, holding addresses from 10.250.0.0/16 and fd00:250::/64 on a veth
//! pair of their own (both ends inside; veth needs no extra kernel module, unlike dummy).
//!
//! Each test scans a private directory pair instead of the machine's `/var/run/netns` and
//! `/proc` (other tests, and other test runs, create namespaces concurrently): `<lab>/netns/<name>`
//! links to the bind mount, `<lab>/proc/<pid>` to the process's real `/proc/<pid>`. So counts are
//! exact. One test uses the real directories. Everything is removed by [`Lab`]'s `Drop`, also
//! when a test panics.
use std::io::{BufRead as _, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};

use super::*;
use crate::test_support::{nodad, sh};

static NEXT_LAB: AtomicUsize = AtomicUsize::new(0);

/// Private netns and proc directories, the namespaces and processes behind them.
struct Lab {
    id: String,
    root: PathBuf,
    netns: Vec<String>,
    children: Vec<Child>,
}

impl Lab {
    fn new() -> Lab {
        // Same convention as the datapath tests: these tests need root and say so.
        // SAFETY: geteuid has no preconditions.
        assert_eq!(
            unsafe { libc::geteuid() },
            0,
            "the netns discovery tests create network namespaces: run them as root (cargo xtask test)"
        );
        let id = format!(
            "{}-{}",
            std::process::id(),
            NEXT_LAB.fetch_add(1, Ordering::Relaxed)
        );
        let root = std::env::temp_dir().join(format!("mdisc-{id}"));
        fs::create_dir_all(root.join("netns")).unwrap();
        fs::create_dir_all(root.join("proc")).unwrap();
        Lab {
            id,
            root,
            netns: Vec::new(),
            children: Vec::new(),
        }
    }

    fn netns_dir(&self) -> PathBuf {
        self.root.join("netns")
    }

    fn proc_dir(&self) -> PathBuf {
        self.root.join("proc")
    }

    /// A finder over this lab's directories only, without the rate limit.
    fn finder(&self) -> NetnsFinder {
        NetnsFinder::new(self.netns_dir(), self.proc_dir()).with_min_scan_interval(Duration::ZERO)
    }

    /// A new `ip netns` namespace holding `addrs` on `d0`, linked into the lab's netns dir.
    fn add_netns(&mut self, addrs: &[&str]) -> String {
        let name = format!("mdisc-{}-{}", self.id, self.netns.len());
        sh(&format!("ip netns add {name}"));
        self.netns.push(name.clone());
        let mut script = "link add d0 type veth peer name d1\nlink set d0 up\n".to_string();
        for addr in addrs {
            script.push_str(&format!("addr add {addr} dev d0{}\n", nodad(addr)));
        }
        sh(&format!("ip -n {name} -batch - <<'EOF'\n{script}EOF"));
        std::os::unix::fs::symlink(
            Path::new(DEFAULT_NETNS_DIR).join(&name),
            self.netns_dir().join(&name),
        )
        .unwrap();
        name
    }

    fn bind_path(&self, name: &str) -> PathBuf {
        self.netns_dir().join(name)
    }

    /// Deletes an `ip netns` namespace (its link in the lab stays, dangling).
    fn del_netns(&mut self, name: &str) {
        sh(&format!("ip netns del {name}"));
        self.netns.retain(|n| n != name);
    }

    /// A process in a namespace of its own (no bind mount) holding `addrs`; listed in the lab's
    /// proc dir. Returns its pid.
    fn spawn_unshared(&mut self, addrs: &[&str]) -> u32 {
        let mut script = "ip link add d0 type veth peer name d1 && ip link set d0 up".to_string();
        for addr in addrs {
            script.push_str(&format!(" && ip addr add {addr} dev d0{}", nodad(addr)));
        }
        script.push_str(" && echo ready && exec sleep 600");
        self.spawn(Command::new("unshare").args(["--net", "sh", "-c", &script]))
    }

    /// A process inside the existing `ip netns` namespace `name`; listed in the lab's proc dir.
    fn spawn_in(&mut self, name: &str) -> u32 {
        self.spawn(Command::new("ip").args([
            "netns",
            "exec",
            name,
            "sh",
            "-c",
            "echo ready && exec sleep 600",
        ]))
    }

    fn spawn(&mut self, cmd: &mut Command) -> u32 {
        let mut child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawn");
        let pid = child.id();
        let stdout = child.stdout.take().unwrap();
        self.children.push(child);
        let mut line = String::new();
        BufReader::new(stdout).read_line(&mut line).unwrap();
        assert_eq!(line.trim(), "ready", "process {pid} did not start");
        self.link_proc(pid);
        pid
    }

    /// Lists process `pid` in the lab's proc dir.
    fn link_proc(&self, pid: u32) {
        std::os::unix::fs::symlink(
            Path::new("/proc").join(pid.to_string()),
            self.proc_dir().join(pid.to_string()),
        )
        .unwrap();
    }

    fn proc_path(&self, pid: u32) -> PathBuf {
        self.proc_dir().join(pid.to_string()).join("ns/net")
    }

    fn kill(&mut self, pid: u32) {
        if let Some(i) = self.children.iter().position(|c| c.id() == pid) {
            let mut child = self.children.remove(i);
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        for child in &mut self.children {
            let _ = child.kill();
            let _ = child.wait();
        }
        for name in &self.netns {
            let _ = Command::new("ip").args(["netns", "del", name]).status();
        }
        let _ = fs::remove_dir_all(&self.root);
    }
}

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

#[test]
fn found_through_the_netns_dir() {
    let mut lab = Lab::new();
    let other = lab.add_netns(&["10.250.1.1/32"]);
    let pod = lab.add_netns(&["10.250.1.2/24"]);
    let mut finder = lab.finder();
    let found = finder.find(&[ip("10.250.1.2")]).unwrap();
    assert_eq!(found.path, lab.bind_path(&pod));
    assert_eq!(found.id, NsId::of_path(&lab.bind_path(&pod)).unwrap());
    assert!(found.is_current());
    // It is the namespace itself, not a copy: a socket opened through the path is in it.
    let ns = netns::Netns::open(&found.path).unwrap();
    assert_eq!(ns.id(), found.id);
    assert_eq!(
        finder.find(&[ip("10.250.1.1")]).unwrap().path,
        lab.bind_path(&other)
    );
    assert_eq!(finder.stats().scans, 1, "one scan answers both");
    assert_eq!(finder.stats().last_namespaces, 2);
}

#[test]
fn found_through_proc_only() {
    let mut lab = Lab::new();
    let pid = lab.spawn_unshared(&["10.250.2.2/32"]);
    let mut finder = lab.finder();
    let found = finder.find(&[ip("10.250.2.2")]).unwrap();
    assert_eq!(found.path, lab.proc_path(pid));
    assert_eq!(
        found.id,
        NsId::of_path(&Path::new("/proc").join(pid.to_string()).join("ns/net")).unwrap()
    );
    // The process dies with its namespace path.
    lab.kill(pid);
    assert!(!found.is_current());
    let err = finder.find(&[ip("10.250.2.2")]).unwrap_err();
    assert!(matches!(err, DiscoverError::NotFound { .. }), "{err}");
}

#[test]
fn a_namespace_named_twice_is_entered_once_and_the_agents_own_is_skipped() {
    let mut lab = Lab::new();
    let pod = lab.add_netns(&["10.250.3.2/32"]);
    // Two processes in the same bind-mounted namespace, and this test process (in the agent's
    // own namespace), all in the proc dir.
    lab.spawn_in(&pod);
    lab.spawn_in(&pod);
    lab.link_proc(std::process::id());
    let mut finder = lab.finder();
    let found = finder.find(&[ip("10.250.3.2")]).unwrap();
    assert_eq!(
        found.path,
        lab.bind_path(&pod),
        "the bind mount is preferred"
    );
    let stats = finder.stats();
    assert_eq!(stats.last_paths, 4, "{stats:?}");
    assert_eq!(stats.last_namespaces, 1, "{stats:?}");
    assert_eq!(stats.entered, 1, "{stats:?}");
}

#[test]
fn not_found_says_what_to_check_and_does_not_rescan_in_a_hot_loop() {
    let mut lab = Lab::new();
    lab.add_netns(&["10.250.4.1/32"]);
    let mut finder = NetnsFinder::new(lab.netns_dir(), lab.proc_dir());
    let err = finder.find(&[ip("10.250.4.9")]).unwrap_err().to_string();
    for needle in [
        "no network namespace on this node holds 10.250.4.9",
        "is the pod running on this node?",
        &format!("the host's {} — hostPID: true", lab.proc_dir().display()),
        &lab.netns_dir().display().to_string(),
        "looked into 1 namespaces",
    ] {
        assert!(err.contains(needle), "{needle:?} not in {err:?}");
    }
    // Misses within the minimum interval are answered from the last scan.
    for _ in 0..20 {
        finder.find(&[ip("10.250.4.9")]).unwrap_err();
    }
    assert_eq!(finder.stats().scans, 1);
    std::thread::sleep(MIN_SCAN_INTERVAL);
    finder.find(&[ip("10.250.4.9")]).unwrap_err();
    assert_eq!(finder.stats().scans, 2);
    // A hit never scans.
    let scans = finder.stats().scans;
    for _ in 0..5 {
        finder.find(&[ip("10.250.4.1")]).unwrap();
    }
    assert_eq!(finder.stats().scans, scans);

    // Unreadable directories are named.
    let mut finder = NetnsFinder::new(lab.netns_dir(), lab.root.join("no-such-proc"));
    let err = finder.find(&[ip("10.250.4.9")]).unwrap_err().to_string();
    assert!(err.contains("no-such-proc: No such file"), "{err}");
    assert_eq!(
        DiscoverError::NoAddress.to_string(),
        finder.find(&[]).unwrap_err().to_string()
    );
}

#[test]
fn a_vanished_namespace_invalidates_the_cached_answer() {
    let mut lab = Lab::new();
    let pod = lab.add_netns(&["10.250.5.2/32"]);
    let mut finder = lab.finder();
    let found = finder.find(&[ip("10.250.5.2")]).unwrap();
    // Cached and still valid: rechecked, not rescanned.
    assert_eq!(finder.find(&[ip("10.250.5.2")]).unwrap(), found);
    assert_eq!(finder.stats().scans, 1);
    assert!(finder.stats().rechecks >= 1);
    // Held open by someone (as a wired pod's handle does): the namespace lives on, but its
    // path is gone, so it is not the pod's any more.
    let handle = File::open(&found.path).unwrap();
    lab.del_netns(&pod);
    assert!(!found.is_current());
    let err = finder.find(&[ip("10.250.5.2")]).unwrap_err();
    assert!(matches!(err, DiscoverError::NotFound { .. }), "{err}");
    assert_eq!(finder.stats().scans, 2);
    drop(handle);
}

#[test]
fn an_address_that_moves_is_found_in_its_new_namespace() {
    let mut lab = Lab::new();
    let a = lab.add_netns(&["10.250.6.2/32"]);
    let b = lab.add_netns(&[]);
    let mut finder = lab.finder();
    assert_eq!(
        finder.find(&[ip("10.250.6.2")]).unwrap().path,
        lab.bind_path(&a)
    );
    // Same paths, the address elsewhere: the recheck notices.
    sh(&format!(
        "ip -n {a} addr del 10.250.6.2/32 dev d0 && ip -n {b} addr add 10.250.6.2/32 dev d0"
    ));
    assert_eq!(
        finder.find(&[ip("10.250.6.2")]).unwrap().path,
        lab.bind_path(&b)
    );
    // From a bind-mounted namespace to a process's.
    lab.del_netns(&b);
    let pid = lab.spawn_unshared(&["10.250.6.2/32"]);
    assert_eq!(
        finder.find(&[ip("10.250.6.2")]).unwrap().path,
        lab.proc_path(pid)
    );
    assert_eq!(finder.stats().scans, 3);
}

#[test]
fn ipv6_and_dual_stack() {
    let mut lab = Lab::new();
    let v6 = lab.add_netns(&["fd00:250::7:2/128"]);
    let dual = lab.add_netns(&["10.250.7.3/32", "fd00:250::7:3/128"]);
    let mut finder = lab.finder();
    assert_eq!(
        finder.find(&[ip("fd00:250::7:2")]).unwrap().path,
        lab.bind_path(&v6)
    );
    assert_eq!(
        finder
            .find(&[ip("10.250.7.3"), ip("fd00:250::7:3")])
            .unwrap()
            .path,
        lab.bind_path(&dual)
    );
    // A v4-mapped address is the IPv4 one.
    assert_eq!(
        finder.find(&[ip("::ffff:10.250.7.3")]).unwrap().path,
        lab.bind_path(&dual)
    );
    // One address found is enough; the other may come later.
    assert_eq!(
        finder
            .find(&[ip("10.250.7.3"), ip("fd00:250::7:99")])
            .unwrap()
            .path,
        lab.bind_path(&dual)
    );
    // Addresses in two namespaces, or one address in two: refused.
    let err = finder
        .find(&[ip("10.250.7.3"), ip("fd00:250::7:2")])
        .unwrap_err();
    assert!(matches!(err, DiscoverError::Split { .. }), "{err}");
    let twin = lab.add_netns(&["fd00:250::7:2/128"]);
    let err = finder.find(&[ip("fd00:250::7:99")]).unwrap_err();
    assert!(matches!(err, DiscoverError::NotFound { .. }), "{err}");
    let err = finder.find(&[ip("fd00:250::7:2")]).unwrap_err().to_string();
    assert!(
        err.contains("fd00:250::7:2 is on an interface in 2 network namespaces")
            && err.contains(&v6)
            && err.contains(&twin),
        "{err}"
    );
}

#[test]
fn one_scan_serves_many_pods() {
    let mut lab = Lab::new();
    let names: Vec<String> = (1..=8)
        .map(|i| lab.add_netns(&[&format!("10.250.8.{i}/32")]))
        .collect();
    let pids: Vec<u32> = (11..=14)
        .map(|i| lab.spawn_unshared(&[&format!("10.250.8.{i}/32")]))
        .collect();
    let mut finder = lab.finder();
    for (i, name) in (1..).zip(&names) {
        let found = finder.find(&[ip(&format!("10.250.8.{i}"))]).unwrap();
        assert_eq!(found.path, lab.bind_path(name));
    }
    for (i, pid) in (11..).zip(&pids) {
        let found = finder.find(&[ip(&format!("10.250.8.{i}"))]).unwrap();
        assert_eq!(found.path, lab.proc_path(*pid));
    }
    let stats = finder.stats();
    assert_eq!(stats.scans, 1, "{stats:?}");
    assert_eq!(stats.entered, 12, "{stats:?}");
}

/// An agent without CAP_SYS_PTRACE cannot read the namespace of another user's process: the
/// error says so.
#[test]
fn a_missing_capability_is_named() {
    let mut lab = Lab::new();
    let pid = lab.spawn(Command::new("unshare").args([
        "--net",
        "sh",
        "-c",
        "ip link add d0 type veth peer name d1 && ip addr add 10.250.10.2/32 dev d0 && \
         echo ready && exec setpriv --reuid 65534 --regid 65534 --clear-groups sleep 600",
    ]));
    // setpriv has run once the process is sleeping under the new uid.
    let status = Path::new("/proc").join(pid.to_string()).join("status");
    let deadline = Instant::now() + Duration::from_secs(5);
    while !fs::read_to_string(&status)
        .unwrap_or_default()
        .contains("\t65534\t")
    {
        assert!(Instant::now() < deadline, "setpriv did not switch user");
        std::thread::sleep(Duration::from_millis(10));
    }
    let mut finder = lab.finder();
    let err = on_helper_thread(move || {
        drop_effective_capability(19); // CAP_SYS_PTRACE
        finder.find(&[ip("10.250.10.2")]).unwrap_err().to_string()
    })
    .unwrap();
    assert!(
        err.contains("1 namespace paths could not be read") && err.contains("needs CAP_SYS_PTRACE"),
        "{err}"
    );
    assert!(lab.finder().find(&[ip("10.250.10.2")]).is_ok());
}

/// Drops `cap` from the calling thread's effective set (capabilities are per thread).
fn drop_effective_capability(cap: u32) {
    #[repr(C)]
    struct Header {
        version: u32,
        pid: i32,
    }
    #[repr(C)]
    #[derive(Clone, Copy, Default)]
    struct Data {
        effective: u32,
        permitted: u32,
        inheritable: u32,
    }
    let mut header = Header {
        version: 0x2008_0522, // _LINUX_CAPABILITY_VERSION_3
        pid: 0,
    };
    let mut data = [Data::default(); 2];
    // SAFETY: capget/capset with a v3 header and two data structs, as the ABI wants.
    unsafe {
        assert_eq!(
            libc::syscall(libc::SYS_capget, &mut header, data.as_mut_ptr()),
            0
        );
        data[(cap / 32) as usize].effective &= !(1 << (cap % 32));
        assert_eq!(
            libc::syscall(libc::SYS_capset, &mut header, data.as_ptr()),
            0,
            "capset: {}",
            io::Error::last_os_error()
        );
    }
}

/// The machine's own `/var/run/netns` and `/proc`, as the agent uses them by default.
#[test]
fn found_in_the_real_directories() {
    let mut lab = Lab::new();
    // Unique on this machine even while other runs of this test scan it too.
    let pid = std::process::id();
    let addr = format!("fd00:250::{:x}:{:x}", 0x8000 | (pid >> 16), pid & 0xffff);
    let by_mount = lab.add_netns(&[&format!("{addr}/128")]);
    let addr2 = format!("fd00:250::{:x}:{:x}", 0x9000 | (pid >> 16), pid & 0xffff);
    let by_proc = lab.spawn_unshared(&[&format!("{addr2}/128")]);
    let mut finder = NetnsFinder::default();
    let found = finder.find(&[ip(&addr)]).unwrap();
    assert_eq!(found.path, Path::new(DEFAULT_NETNS_DIR).join(&by_mount));
    let found = finder.find(&[ip(&addr2)]).unwrap();
    assert_eq!(
        found.path,
        Path::new(DEFAULT_PROC_DIR)
            .join(by_proc.to_string())
            .join("ns/net")
    );
    let stats = finder.stats();
    assert_eq!(stats.scans, 1);
    eprintln!(
        "real scan: {} paths, {} namespaces entered, {:?}",
        stats.last_paths, stats.last_namespaces, stats.last_duration
    );
}

/// What a scan costs with many namespaces: `cargo test -p mesh-agent --lib scan_cost --
/// --ignored --nocapture` (root). MESH_SCAN_NAMESPACES sets how many (default 200).
#[test]
#[ignore = "a measurement, not a check"]
fn scan_cost() {
    let n: usize = std::env::var("MESH_SCAN_NAMESPACES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(200);
    let mut lab = Lab::new();
    for i in 0..n {
        lab.add_netns(&[&format!("10.250.{}.{}/32", 100 + i / 250, 1 + i % 250)]);
    }
    let mut finder = NetnsFinder::default().with_min_scan_interval(Duration::ZERO);
    let mut durations = Vec::new();
    for _ in 0..5 {
        finder.find(&[ip("10.250.99.99")]).unwrap_err();
        durations.push(finder.stats().last_duration);
    }
    durations.sort();
    let stats = finder.stats();
    eprintln!(
        "{} paths, {} namespaces entered per scan; 5 scans: min {:?}, median {:?}, max {:?}",
        stats.last_paths, stats.last_namespaces, durations[0], durations[2], durations[4]
    );
    let started = Instant::now();
    finder.find(&[ip("10.250.100.1")]).unwrap();
    eprintln!("cached lookup with recheck: {:?}", started.elapsed());
}

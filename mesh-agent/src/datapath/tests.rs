//! Tests against the real kernel: they load the programs, attach them to a private cgroup v2
//! child, pin into a private bpffs and run real clients (python3) inside a private network
//! namespace. They need root. Nothing leaves the private namespace: it has only `lo`.
//!
//! Every resource is created by [`TestEnv`] and removed by its `Drop`, also when a test panics.
use std::{
    fs::{self, File, OpenOptions},
    io::{self, BufRead as _, BufReader},
    net::{IpAddr, Ipv6Addr, SocketAddr, TcpListener, TcpStream},
    os::{fd::AsRawFd as _, unix::process::CommandExt as _},
    path::{Path, PathBuf},
    process::{Child, ChildStdout, Command, Stdio},
    sync::{
        atomic::{AtomicUsize, Ordering},
        Mutex,
    },
    thread,
    time::{Duration, Instant},
};

use mesh_common::{AF_INET, AF_INET6, PROXY_MARK};

use super::*;
use crate::net::netns_cookie;

/// Runs `f` on a helper thread that first joins the network namespace `netns_file`.
fn in_netns<T: Send>(netns_file: &File, f: impl FnOnce() -> T + Send) -> io::Result<T> {
    use std::os::fd::{AsFd as _, AsRawFd as _};
    let fd = netns_file.as_fd();
    std::thread::scope(|scope| {
        let helper = std::thread::Builder::new()
            .name("mesh-netns".into())
            .spawn_scoped(scope, move || {
                // SAFETY: setns(2) on a valid descriptor; affects only this helper thread.
                if unsafe { libc::setns(fd.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                    return Err(io::Error::last_os_error());
                }
                Ok(f())
            })?;
        helper
            .join()
            .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
    })
}

const ENETUNREACH: i32 = libc::ENETUNREACH;
const ECONNREFUSED: i32 = libc::ECONNREFUSED;
const EXCLUDED_PORT: u16 = 9999;
const POD_IP4: [u8; 4] = [10, 0, 0, 5];
const POD_IP6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0, 0, 0, 0, 0, 0, 5);

static NEXT_ID: AtomicUsize = AtomicUsize::new(0);

/// A private cgroup, bpffs mount and network namespace, removed on drop.
struct TestEnv {
    id: String,
    cgroup: Option<PathBuf>,
    bpffs: Option<PathBuf>,
    netns: Vec<(String, File)>,
    children: Mutex<Vec<Child>>,
}

impl TestEnv {
    fn new() -> TestEnv {
        let id = format!(
            "{}-{}",
            std::process::id(),
            NEXT_ID.fetch_add(1, Ordering::Relaxed)
        );
        let mut env = TestEnv {
            id,
            cgroup: None,
            bpffs: None,
            netns: Vec::new(),
            children: Mutex::new(Vec::new()),
        };

        let cgroup = default_cgroup_root()
            .expect("cgroup2 mount")
            .join(format!("mesh-dp-test-{}", env.id));
        fs::create_dir(&cgroup).expect("create test cgroup");
        env.cgroup = Some(cgroup);

        let bpffs = std::env::temp_dir().join(format!("mesh-dp-bpffs-{}", env.id));
        fs::create_dir(&bpffs).expect("create bpffs mount point");
        if let Err(e) = crate::test_support::mount_bpffs(&bpffs) {
            let _ = fs::remove_dir(&bpffs);
            panic!("mount bpffs: {e}");
        }
        env.bpffs = Some(bpffs);

        env.add_netns();
        env
    }

    /// Creates one more network namespace with `lo` up; returns its index.
    fn add_netns(&mut self) -> usize {
        let idx = self.netns.len();
        let name = format!("mdp{}x{}", self.id.replace('-', "x"), idx);
        run(Command::new("ip").args(["netns", "add", &name]));
        // Registered before anything else can fail, so Drop deletes it.
        let file = match File::open(Path::new("/run/netns").join(&name)) {
            Ok(f) => f,
            Err(e) => {
                let _ = Command::new("ip").args(["netns", "del", &name]).status();
                panic!("open netns {name}: {e}");
            }
        };
        self.netns.push((name.clone(), file));
        run(Command::new("ip").args(["-n", &name, "link", "set", "lo", "up"]));
        idx
    }

    fn cgroup(&self) -> &Path {
        self.cgroup.as_deref().unwrap()
    }

    fn netns(&self, idx: usize) -> &File {
        &self.netns[idx].1
    }

    fn config(&self) -> DatapathConfig {
        DatapathConfig {
            cgroup_root: self.cgroup().to_path_buf(),
            pin_dir: self.pin_dir(),
            excluded_ports: vec![EXCLUDED_PORT],
        }
    }

    fn pin_dir(&self) -> PathBuf {
        self.bpffs.as_ref().unwrap().join("mesh")
    }

    /// Listeners on 127.0.0.1:15001 and [::1]:15001 inside network namespace `idx`.
    fn listeners(&self, idx: usize) -> Listeners {
        let (v4, v6) = in_netns(self.netns(idx), || {
            (
                TcpListener::bind("127.0.0.1:15001"),
                TcpListener::bind("[::1]:15001"),
            )
        })
        .expect("enter netns");
        let (v4, v6) = (
            v4.expect("bind 127.0.0.1:15001"),
            v6.expect("bind [::1]:15001"),
        );
        v4.set_nonblocking(true).unwrap();
        v6.set_nonblocking(true).unwrap();
        Listeners { v4, v6 }
    }

    /// Runs the python client in our cgroup and network namespace `idx`; returns its first line.
    fn client(&self, idx: usize, spec: &ClientSpec) -> ClientResult {
        let procs = OpenOptions::new()
            .write(true)
            .open(self.cgroup().join("cgroup.procs"))
            .expect("open cgroup.procs");
        let (procs_fd, netns_fd) = (procs.as_raw_fd(), self.netns(idx).as_raw_fd());
        let mut cmd = Command::new("python3");
        cmd.args([
            "-c",
            CLIENT_PY,
            if spec.v6 { "6" } else { "4" },
            spec.host,
            &spec.port.to_string(),
            &spec.mark.to_string(),
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit());
        // SAFETY: only async-signal-safe calls (write, setns) on descriptors that stay open
        // until spawn returns.
        unsafe {
            cmd.pre_exec(move || {
                if libc::write(procs_fd, b"0".as_ptr().cast(), 1) != 1 {
                    return Err(io::Error::last_os_error());
                }
                if libc::setns(netns_fd, libc::CLONE_NEWNET) != 0 {
                    return Err(io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let mut child = cmd.spawn().expect("spawn python3 client");
        drop(procs);
        let stdout = child.stdout.take().unwrap();
        self.children.lock().unwrap().push(child);
        ClientResult::read(stdout)
    }
}

impl Drop for TestEnv {
    fn drop(&mut self) {
        for child in self.children.get_mut().unwrap_or_else(|e| e.into_inner()) {
            let _ = child.kill();
            let _ = child.wait();
        }
        if let Some(cgroup) = self.cgroup.take() {
            // Anything still in the cgroup was started by this test: kill it by PID.
            if let Ok(procs) = fs::read_to_string(cgroup.join("cgroup.procs")) {
                for pid in procs.lines().filter_map(|l| l.trim().parse::<i32>().ok()) {
                    // SAFETY: plain kill(2).
                    unsafe { libc::kill(pid, libc::SIGKILL) };
                }
            }
            let deadline = Instant::now() + Duration::from_secs(5);
            while fs::remove_dir(&cgroup).is_err() && Instant::now() < deadline {
                thread::sleep(Duration::from_millis(20));
            }
        }
        if let Some(bpffs) = self.bpffs.take() {
            crate::test_support::unmount(&bpffs);
            let _ = fs::remove_dir(&bpffs);
        }
        for (name, file) in self.netns.drain(..) {
            drop(file);
            let _ = Command::new("ip")
                .args(["netns", "del", &name])
                .stderr(Stdio::null())
                .status();
        }
    }
}

fn run(cmd: &mut Command) {
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

struct Listeners {
    v4: TcpListener,
    v6: TcpListener,
}

impl Listeners {
    fn accept(listener: &TcpListener) -> Option<(TcpStream, SocketAddr)> {
        let deadline = Instant::now() + Duration::from_secs(3);
        loop {
            match listener.accept() {
                Ok(conn) => return Some(conn),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    if Instant::now() > deadline {
                        return None;
                    }
                    thread::sleep(Duration::from_millis(10));
                }
                Err(e) => panic!("accept: {e}"),
            }
        }
    }

    /// Neither listener has a connection waiting.
    fn assert_idle(&self) {
        for l in [&self.v4, &self.v6] {
            match l.accept() {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Ok((_, peer)) => panic!("unexpected connection from {peer}"),
                Err(e) => panic!("accept: {e}"),
            }
        }
    }
}

/// Connects, prints `OK <peer ip> <peer port> <local ip> <local port> <socket cookie>
/// <netns cookie>` or `ERR <errno>`, then waits for the server to close.
const CLIENT_PY: &str = r#"
import signal, socket, sys
signal.alarm(15)
fam = socket.AF_INET6 if sys.argv[1] == '6' else socket.AF_INET
host, port, mark = sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
s = socket.socket(fam, socket.SOCK_STREAM)
if mark:
    s.setsockopt(socket.SOL_SOCKET, socket.SO_MARK, mark)
if fam == socket.AF_INET6:
    s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
s.settimeout(3)
try:
    s.connect((host, port))
except OSError as e:
    print('ERR', e.errno if e.errno is not None else -1, flush=True)
    sys.exit(0)
cookie = int.from_bytes(s.getsockopt(socket.SOL_SOCKET, 57, 8), sys.byteorder)
netns = int.from_bytes(s.getsockopt(socket.SOL_SOCKET, 71, 8), sys.byteorder)
p, l = s.getpeername(), s.getsockname()
print('OK', p[0], p[1], l[0], l[1], cookie, netns, flush=True)
s.settimeout(10)
try:
    s.recv(1)
except OSError:
    pass
"#;

struct ClientSpec<'a> {
    v6: bool,
    host: &'a str,
    port: u16,
    mark: u32,
}

fn v4(host: &str, port: u16) -> ClientSpec<'_> {
    ClientSpec {
        v6: false,
        host,
        port,
        mark: 0,
    }
}

fn v6(host: &str, port: u16) -> ClientSpec<'_> {
    ClientSpec {
        v6: true,
        host,
        port,
        mark: 0,
    }
}

#[derive(Debug)]
enum ClientResult {
    Connected {
        peer: SocketAddr,
        local: SocketAddr,
        socket_cookie: u64,
        netns_cookie: u64,
        /// Keeps the pipe open; the client exits when the server side closes.
        _stdout: BufReader<ChildStdout>,
    },
    Failed(i32),
}

impl ClientResult {
    fn read(stdout: ChildStdout) -> ClientResult {
        let mut stdout = BufReader::new(stdout);
        let mut line = String::new();
        stdout.read_line(&mut line).expect("read client output");
        let f: Vec<&str> = line.split_whitespace().collect();
        match f.as_slice() {
            ["OK", pip, pport, lip, lport, cookie, netns] => {
                let addr = |ip: &str, port: &str| {
                    SocketAddr::new(ip.parse::<IpAddr>().unwrap(), port.parse().unwrap())
                };
                ClientResult::Connected {
                    peer: addr(pip, pport),
                    local: addr(lip, lport),
                    socket_cookie: cookie.parse().unwrap(),
                    netns_cookie: netns.parse().unwrap(),
                    _stdout: stdout,
                }
            }
            ["ERR", errno] => ClientResult::Failed(errno.parse().unwrap()),
            _ => panic!("unexpected client output {line:?}"),
        }
    }

    fn connected(self) -> (SocketAddr, SocketAddr, u64, u64) {
        match self {
            ClientResult::Connected {
                peer,
                local,
                socket_cookie,
                netns_cookie,
                ..
            } => (peer, local, socket_cookie, netns_cookie),
            ClientResult::Failed(errno) => panic!(
                "client failed to connect: {}",
                io::Error::from_raw_os_error(errno)
            ),
        }
    }

    fn errno(&self) -> i32 {
        match self {
            ClientResult::Failed(errno) => *errno,
            other => panic!("expected the connect to fail, got {other:?}"),
        }
    }
}

fn pod() -> Enrolled {
    Enrolled::new(POD_IP4, POD_IP6.octets(), "default/client")
}

fn mapped(ip: [u8; 4]) -> [u8; 16] {
    std::net::Ipv4Addr::from(ip).to_ipv6_mapped().octets()
}

fn flow(netns: u64, peer: SocketAddr, family: u16) -> FlowKey {
    FlowKey {
        netns,
        port: peer.port(),
        family,
        _pad: 0,
    }
}

fn bpftool_cgroup_tree(cgroup: &Path) -> String {
    let out = Command::new("bpftool")
        .arg("cgroup")
        .arg("tree")
        .arg(cgroup)
        .output()
        .expect("run bpftool");
    assert!(
        out.status.success(),
        "bpftool: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

const OUR_PROGRAMS: [&str; 7] = [
    mesh_common::PROG_CONNECT4,
    mesh_common::PROG_CONNECT6,
    mesh_common::PROG_SOCKOPS,
    mesh_common::PROG_PEERNAME4,
    mesh_common::PROG_PEERNAME6,
    mesh_common::PROG_SOCKNAME4,
    mesh_common::PROG_SOCKNAME6,
];

#[test]
fn handles_are_send_and_sync() {
    fn assert_send_sync<T: Send + Sync>() {}
    assert_send_sync::<Datapath>();
    assert_send_sync::<OrigDstTable>();
}

#[test]
fn netns_cookie_matches_what_sockets_report() {
    let env = TestEnv::new();
    let ours = netns_cookie(&File::open("/proc/thread-self/ns/net").unwrap()).unwrap();
    let theirs = netns_cookie(env.netns(0)).unwrap();
    assert_ne!(ours, theirs);
    let again = netns_cookie(env.netns(0)).unwrap();
    assert_eq!(theirs, again);
    // The calling thread stayed where it was.
    let now = netns_cookie(&File::open("/proc/thread-self/ns/net").unwrap()).unwrap();
    assert_eq!(ours, now);
}

#[test]
fn redirects_ipv4_and_restores_the_peer() {
    let env = TestEnv::new();
    let dp = Datapath::load(&env.config()).expect("load datapath");
    let cookie = netns_cookie(env.netns(0)).unwrap();
    dp.enroll(cookie, &pod()).unwrap();
    let listeners = env.listeners(0);

    let (peer, local, socket_cookie, client_netns) = env.client(0, &v4("10.1.2.3", 80)).connected();
    assert_eq!(
        client_netns, cookie,
        "netns_cookie() agrees with SO_NETNS_COOKIE"
    );
    assert_eq!(
        peer,
        "10.1.2.3:80".parse().unwrap(),
        "getpeername shows the original peer"
    );
    // getsockname shows the pod's address, as behind an in-pod iptables redirect; the socket
    // really is on loopback (the proxy accepts it from 127.0.0.1), with the same port.
    assert_eq!(
        local.ip(),
        IpAddr::from(POD_IP4),
        "getsockname shows the pod"
    );

    let (conn, accepted_peer) = Listeners::accept(&listeners.v4).expect("redirected to 15001");
    assert_eq!(
        accepted_peer,
        SocketAddr::new([127, 0, 0, 1].into(), local.port())
    );

    let want = OrigDst {
        addr: mapped([10, 1, 2, 3]),
        port: 80,
        family: AF_INET,
        _pad: 0,
        netns: cookie,
    };
    let key = flow(cookie, accepted_peer, AF_INET);

    // What `inspect maps` sees while the agent runs.
    let pin_dir = env.pin_dir();
    assert_eq!(
        pinned::read_enrolled(&pin_dir).unwrap(),
        vec![(cookie, pod())]
    );
    assert_eq!(dp.enrolled().unwrap(), vec![(cookie, pod())]);
    assert_eq!(
        pinned::read_excluded_ports(&pin_dir).unwrap(),
        vec![EXCLUDED_PORT]
    );
    assert!(pinned::read_sock_dst(&pin_dir)
        .unwrap()
        .contains(&(socket_cookie, want)));
    assert_eq!(pinned::read_orig_dst(&pin_dir).unwrap(), vec![(key, want)]);

    let table = dp.orig_dst();
    assert_eq!(table.take(&key).unwrap(), Some(want));
    assert_eq!(table.take(&key).unwrap(), None, "take deletes");
    assert!(pinned::read_orig_dst(&pin_dir).unwrap().is_empty());

    // Closing the connection drops the socket-cookie record (sockops state callback).
    drop(conn);
    let deadline = Instant::now() + Duration::from_secs(3);
    while pinned::read_sock_dst(&pin_dir)
        .unwrap()
        .iter()
        .any(|(c, _)| *c == socket_cookie)
    {
        assert!(
            Instant::now() < deadline,
            "SOCK_DST entry not removed on close"
        );
        thread::sleep(Duration::from_millis(20));
    }

    dp.uninstall().unwrap();
}

#[test]
fn redirects_ipv6() {
    let env = TestEnv::new();
    let dp = Datapath::load(&env.config()).expect("load datapath");
    let cookie = netns_cookie(env.netns(0)).unwrap();
    dp.enroll(cookie, &pod()).unwrap();
    let listeners = env.listeners(0);

    let (peer, local, _, _) = env.client(0, &v6("fd00::1234", 8080)).connected();
    assert_eq!(peer, "[fd00::1234]:8080".parse().unwrap());
    assert_eq!(
        local.ip(),
        IpAddr::from(POD_IP6),
        "getsockname shows the pod"
    );

    let (_conn, accepted_peer) =
        Listeners::accept(&listeners.v6).expect("redirected to [::1]:15001");
    assert_eq!(
        accepted_peer,
        SocketAddr::new(Ipv6Addr::LOCALHOST.into(), local.port())
    );
    let want = OrigDst {
        addr: "fd00::1234".parse::<Ipv6Addr>().unwrap().octets(),
        port: 8080,
        family: AF_INET6,
        _pad: 0,
        netns: cookie,
    };
    let table = dp.orig_dst();
    assert_eq!(
        table.take(&flow(cookie, accepted_peer, AF_INET6)).unwrap(),
        Some(want)
    );
    assert_eq!(
        table.take(&flow(cookie, accepted_peer, AF_INET6)).unwrap(),
        None
    );
    dp.uninstall().unwrap();
}

#[test]
fn redirects_v4_mapped_destinations_of_dual_stack_sockets() {
    let env = TestEnv::new();
    let dp = Datapath::load(&env.config()).expect("load datapath");
    let cookie = netns_cookie(env.netns(0)).unwrap();
    dp.enroll(cookie, &pod()).unwrap();
    let listeners = env.listeners(0);

    let (peer, local, _, _) = env.client(0, &v6("::ffff:10.1.2.3", 80)).connected();
    assert_eq!(peer, "[::ffff:10.1.2.3]:80".parse().unwrap());
    assert_eq!(
        local.ip(),
        IpAddr::from(std::net::Ipv4Addr::from(POD_IP4).to_ipv6_mapped()),
        "getsockname shows the pod's IPv4 address, mapped"
    );

    // The connection is IPv4 on the wire: the IPv4 listener gets it, and the proxy looks it up
    // with the family of that listener.
    let (_conn, accepted_peer) = Listeners::accept(&listeners.v4).expect("redirected to 15001");
    assert_eq!(accepted_peer.port(), local.port());
    let want = OrigDst {
        addr: mapped([10, 1, 2, 3]),
        port: 80,
        family: AF_INET6,
        _pad: 0,
        netns: cookie,
    };
    assert_eq!(
        dp.orig_dst()
            .take(&flow(cookie, accepted_peer, AF_INET))
            .unwrap(),
        Some(want)
    );
    dp.uninstall().unwrap();
}

#[test]
fn leaves_exempt_connections_alone() {
    let env = TestEnv::new();
    let dp = Datapath::load(&env.config()).expect("load datapath");
    let cookie = netns_cookie(env.netns(0)).unwrap();
    dp.enroll(cookie, &pod()).unwrap();
    let listeners = env.listeners(0);

    // The netns has no route but loopback: a connection that is not redirected to 10.x fails
    // with ENETUNREACH; one to a loopback port nobody listens on is refused.
    let proxy_owned = ClientSpec {
        mark: PROXY_MARK,
        ..v4("10.1.2.3", 80)
    };
    assert_eq!(
        env.client(0, &proxy_owned).errno(),
        ENETUNREACH,
        "SO_MARK 0x539"
    );
    let proxy_owned6 = ClientSpec {
        mark: PROXY_MARK,
        ..v6("fd00::1234", 80)
    };
    assert_eq!(
        env.client(0, &proxy_owned6).errno(),
        ENETUNREACH,
        "SO_MARK 0x539, v6"
    );
    assert_eq!(
        env.client(0, &v4("10.1.2.3", EXCLUDED_PORT)).errno(),
        ENETUNREACH,
        "excluded port"
    );
    assert_eq!(
        env.client(0, &v6("fd00::1234", EXCLUDED_PORT)).errno(),
        ENETUNREACH,
        "excluded port, v6"
    );
    for port in [15006, 15008] {
        assert_eq!(
            env.client(0, &v4("10.1.2.3", port)).errno(),
            ENETUNREACH,
            "mesh port {port}"
        );
    }
    assert_eq!(
        env.client(0, &v4("10.0.0.5", 80)).errno(),
        ENETUNREACH,
        "own IPv4"
    );
    assert_eq!(
        env.client(0, &v6("fd00::5", 80)).errno(),
        ENETUNREACH,
        "own IPv6"
    );
    assert_eq!(
        env.client(0, &v6("::ffff:10.0.0.5", 80)).errno(),
        ENETUNREACH,
        "own IPv4, mapped"
    );
    assert_eq!(
        env.client(0, &v4("127.0.0.1", 15002)).errno(),
        ECONNREFUSED,
        "loopback"
    );
    assert_eq!(
        env.client(0, &v4("127.1.2.3", 15002)).errno(),
        ECONNREFUSED,
        "loopback /8"
    );
    assert_eq!(
        env.client(0, &v6("::1", 15002)).errno(),
        ECONNREFUSED,
        "loopback v6"
    );
    assert_eq!(
        env.client(0, &v6("::ffff:127.0.0.1", 15002)).errno(),
        ECONNREFUSED,
        "loopback mapped"
    );

    // Excluded ports can change at run time.
    dp.set_excluded_ports(&[7777, EXCLUDED_PORT]).unwrap();
    assert_eq!(
        pinned::read_excluded_ports(&env.pin_dir()).unwrap(),
        vec![7777, EXCLUDED_PORT]
    );
    assert_eq!(
        env.client(0, &v4("10.1.2.3", 7777)).errno(),
        ENETUNREACH,
        "new excluded port"
    );
    dp.set_excluded_ports(&[]).unwrap();
    assert_eq!(dp.excluded_ports().unwrap(), Vec::<u16>::new());
    let (peer, ..) = env.client(0, &v4("10.1.2.3", EXCLUDED_PORT)).connected();
    assert_eq!(peer.port(), EXCLUDED_PORT, "no longer excluded, redirected");
    let (_conn, accepted) = Listeners::accept(&listeners.v4).expect("redirected");
    assert!(dp
        .orig_dst()
        .take(&flow(cookie, accepted, AF_INET))
        .unwrap()
        .is_some());

    listeners.assert_idle();
    assert!(pinned::read_orig_dst(&env.pin_dir()).unwrap().is_empty());
    dp.uninstall().unwrap();
}

#[test]
fn ignores_namespaces_that_are_not_enrolled() {
    let mut env = TestEnv::new();
    let other = env.add_netns();
    let dp = Datapath::load(&env.config()).expect("load datapath");
    let cookie = netns_cookie(env.netns(0)).unwrap();
    dp.enroll(cookie, &pod()).unwrap();
    let listeners = env.listeners(other);

    assert_eq!(env.client(other, &v4("10.1.2.3", 80)).errno(), ENETUNREACH);
    assert_eq!(
        env.client(other, &v6("fd00::1234", 80)).errno(),
        ENETUNREACH
    );
    listeners.assert_idle();

    // Unenrolling stops the redirection; unenrolling twice is fine.
    let own = env.listeners(0);
    dp.unenroll(cookie).unwrap();
    dp.unenroll(cookie).unwrap();
    assert!(dp.enrolled().unwrap().is_empty());
    assert_eq!(env.client(0, &v4("10.1.2.3", 80)).errno(), ENETUNREACH);
    own.assert_idle();
    dp.uninstall().unwrap();
}

#[test]
fn uninstall_detaches_everything_and_removes_the_pins() {
    let env = TestEnv::new();
    let dp = Datapath::load(&env.config()).expect("load datapath");
    let cookie = netns_cookie(env.netns(0)).unwrap();
    dp.enroll(cookie, &pod()).unwrap();

    let tree = bpftool_cgroup_tree(env.cgroup());
    for name in OUR_PROGRAMS {
        assert!(tree.contains(name), "{name} not attached:\n{tree}");
    }
    let pin_dir = env.pin_dir();
    for name in mesh_common::ALL_MAPS {
        assert!(pin_dir.join(name).exists(), "{name} not pinned");
    }
    // The maps carry BTF: bpftool prints named fields.
    let dump = Command::new("bpftool")
        .args(["-j", "map", "dump", "pinned"])
        .arg(pin_dir.join(mesh_common::MAP_ENROLLED))
        .output()
        .expect("run bpftool");
    let dump = String::from_utf8_lossy(&dump.stdout);
    assert!(
        dump.contains("\"formatted\"") && dump.contains("\"ip6\"") && dump.contains("\"name\""),
        "no BTF-formatted dump: {dump}"
    );

    dp.uninstall().unwrap();
    let tree = bpftool_cgroup_tree(env.cgroup());
    for name in OUR_PROGRAMS {
        assert!(!tree.contains(name), "{name} still attached:\n{tree}");
    }
    assert!(!pin_dir.exists(), "pin dir left behind");
    assert!(matches!(
        pinned::read_enrolled(&pin_dir),
        Err(DatapathError::NotPinned { .. })
    ));

    let _listeners = env.listeners(0);
    assert_eq!(
        env.client(0, &v4("10.1.2.3", 80)).errno(),
        ENETUNREACH,
        "nothing redirects"
    );
}

/// How many times each of our programs is attached to the test's cgroup.
fn attach_counts(env: &TestEnv) -> Vec<(&'static str, usize)> {
    let tree = bpftool_cgroup_tree(env.cgroup());
    OUR_PROGRAMS
        .iter()
        .map(|name| {
            let count = tree
                .split(|c: char| !(c.is_alphanumeric() || c == '_'))
                .filter(|w| w == name)
                .count();
            (*name, count)
        })
        .collect()
}

#[test]
fn a_crash_leaves_the_datapath_attached_and_the_next_agent_takes_it_over() {
    let env = TestEnv::new();
    let pin_dir = env.pin_dir();
    let dp = Datapath::load(&env.config()).expect("load datapath");
    assert_eq!(dp.adopted(), Adopted::default());
    let cookie = netns_cookie(env.netns(0)).unwrap();
    dp.enroll(cookie, &pod()).unwrap();
    dp.enroll(42, &Enrolled::new([10, 0, 0, 42], [0; 16], "default/gone"))
        .unwrap();
    // A second agent on the same pin directory is refused while the first runs.
    match Datapath::load(&env.config()) {
        Err(DatapathError::PinDirBusy { path }) => assert_eq!(path, pin_dir),
        other => panic!("expected PinDirBusy, got {other:?}"),
    }
    let once: Vec<(&str, usize)> = OUR_PROGRAMS.iter().map(|n| (*n, 1)).collect();
    assert_eq!(attach_counts(&env), once);

    // Dropping without uninstall is what a crash (or a stop) leaves: every program stays
    // attached through its pinned link, and so does the enrollment. With nothing listening on
    // 15001, the pod's connections are refused at once instead of leaving in plaintext.
    drop(dp);
    assert_eq!(attach_counts(&env), once, "programs stay attached");
    for name in OUR_PROGRAMS {
        assert!(
            links::program_pin(&pin_dir, name).exists(),
            "{name} link not pinned"
        );
    }
    assert_eq!(pinned::read_enrolled(&pin_dir).unwrap().len(), 2);
    assert_eq!(
        env.client(0, &v4("10.1.2.3", 80)).errno(),
        libc::ECONNREFUSED,
        "fail closed: redirected to a proxy that is not there"
    );

    // The next agent takes over: the same maps (entries kept), its programs in place of the
    // old ones (still once each, never zero), and it serves again.
    let dp = Datapath::load(&DatapathConfig {
        excluded_ports: vec![1, 2],
        ..env.config()
    })
    .expect("take over");
    assert_eq!(
        dp.adopted(),
        Adopted {
            maps: mesh_common::PINNED_MAPS.len(),
            programs: OUR_PROGRAMS.len(),
            inbound: 0
        }
    );
    assert_eq!(attach_counts(&env), once, "replaced, not added");
    assert_eq!(pinned::read_enrolled(&pin_dir).unwrap().len(), 2);
    assert_eq!(pinned::read_excluded_ports(&pin_dir).unwrap(), vec![1, 2]);
    let listeners = env.listeners(0);
    let (peer, _, _, _) = env.client(0, &v4("10.1.2.3", 80)).connected();
    assert_eq!(peer, "10.1.2.3:80".parse().unwrap());
    assert!(Listeners::accept(&listeners.v4).is_some());

    // What the previous agent enrolled and this one does not want goes.
    let removed = dp.prune(|c, _| c == cookie).unwrap();
    assert_eq!(removed, ["default/gone"]);
    assert_eq!(
        pinned::read_enrolled(&pin_dir).unwrap(),
        vec![(cookie, pod())]
    );

    assert!(!dp.uninstall().unwrap().is_empty());
    assert!(!pin_dir.exists());
    assert!(attach_counts(&env).iter().all(|(_, n)| *n == 0));
}

#[test]
fn a_pinned_map_of_another_layout_is_refused_before_anything_is_attached() {
    let env = TestEnv::new();
    let pin_dir = env.pin_dir();
    std::fs::create_dir_all(&pin_dir).unwrap();
    // What an incompatible agent version might have left: ENROLLED with 4-byte values.
    let pin = pin_dir.join(mesh_common::MAP_ENROLLED);
    crate::test_support::sh(&format!(
        "bpftool map create {} type hash key 8 value 4 entries 16 name ENROLLED",
        pin.display()
    ));
    // The check a new agent makes before asking a running one to hand over says the same.
    let early = check_adoptable(&pin_dir).unwrap_err();
    assert!(
        early
            .to_string()
            .contains("ENROLLED has key 8 / value 4 bytes"),
        "{early}"
    );
    let err = Datapath::load(&env.config()).unwrap_err();
    assert!(matches!(err, DatapathError::Adopt { .. }), "{err}");
    assert!(
        err.to_string()
            .contains("ENROLLED has key 8 / value 4 bytes"),
        "{err}"
    );
    assert!(err.to_string().contains("mesh-agent uninstall"), "{err}");
    assert!(attach_counts(&env).iter().all(|(_, n)| *n == 0));
    assert!(pin.exists(), "what was there stays");
    // uninstall clears it.
    assert!(uninstall_pinned(&pin_dir)
        .unwrap()
        .contains(&"ENROLLED".to_string()));
}

#[test]
fn uninstall_without_an_agent_removes_everything_it_left() {
    let env = TestEnv::new();
    let pin_dir = env.pin_dir();
    let dp = Datapath::load(&env.config()).expect("load datapath");
    // Refused while an agent holds the pin directory.
    assert!(matches!(
        uninstall_pinned(&pin_dir),
        Err(DatapathError::InstallBusy { .. })
    ));
    drop(dp);
    let removed = uninstall_pinned(&pin_dir).unwrap();
    for name in OUR_PROGRAMS {
        assert!(removed.contains(&format!("links/{name}")), "{removed:?}");
    }
    for name in mesh_common::ALL_MAPS {
        assert!(removed.iter().any(|r| r == name), "{removed:?}");
    }
    assert!(!pin_dir.exists());
    assert!(attach_counts(&env).iter().all(|(_, n)| *n == 0));
    // Again: nothing to do.
    assert!(uninstall_pinned(&pin_dir).unwrap().is_empty());
}

#[test]
fn refuses_wrong_mounts_with_operator_messages() {
    let env = TestEnv::new();
    let not_bpffs = std::env::temp_dir().join(format!("mesh-dp-notbpf-{}", env.id));
    let err = Datapath::load(&DatapathConfig {
        pin_dir: not_bpffs.clone(),
        ..env.config()
    })
    .unwrap_err();
    assert!(matches!(err, DatapathError::NotBpffs { .. }), "{err}");
    assert!(
        err.to_string().contains("mount -t bpf bpf /sys/fs/bpf"),
        "{err}"
    );
    assert!(
        !not_bpffs.exists(),
        "created a pin dir on the wrong file system"
    );

    let err = Datapath::load(&DatapathConfig {
        cgroup_root: std::env::temp_dir(),
        ..env.config()
    })
    .unwrap_err();
    assert!(matches!(err, DatapathError::NotCgroup2 { .. }), "{err}");
    assert!(
        err.to_string().contains("is not a cgroup v2 directory"),
        "{err}"
    );

    let err = Datapath::load(&DatapathConfig {
        excluded_ports: (1..=1000).collect(),
        ..env.config()
    })
    .unwrap_err();
    assert!(
        matches!(err, DatapathError::TooManyExcludedPorts { .. }),
        "{err}"
    );

    // Nothing was left attached or pinned by the failed loads.
    let tree = bpftool_cgroup_tree(env.cgroup());
    assert!(!OUR_PROGRAMS.iter().any(|n| tree.contains(n)), "{tree}");
    assert!(!env.pin_dir().exists());
}

/// Inbound capture (`mesh_sklookup`): a pod namespace and a client namespace joined by a veth
/// pair, both private to the test.
mod inbound {
    use std::{
        net::{Ipv4Addr, SocketAddrV4, SocketAddrV6},
        os::{fd::AsFd as _, unix::fs::MetadataExt as _},
    };

    use socket2::{Domain, Socket, Type};

    use super::*;

    const POD: usize = 0;
    const CLIENT: usize = 1;
    const POD4: Ipv4Addr = Ipv4Addr::new(10, 55, 0, 2);
    const CLIENT4: Ipv4Addr = Ipv4Addr::new(10, 55, 0, 1);
    const POD6: Ipv6Addr = Ipv6Addr::new(0xfd55, 0, 0, 0, 0, 0, 0, 2);
    const CLIENT6: Ipv6Addr = Ipv6Addr::new(0xfd55, 0, 0, 0, 0, 0, 0, 1);
    const APP_PORT: u16 = 8080;
    const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);

    /// A TCP listener in the calling thread's network namespace (non-blocking; IPv6 ones are
    /// v6only so that IPv4 and IPv6 listeners can share a port).
    fn listen(addr: SocketAddr) -> io::Result<TcpListener> {
        let s = Socket::new(Domain::for_address(addr), Type::STREAM, None)?;
        if addr.is_ipv6() {
            s.set_only_v6(true)?;
        }
        s.set_reuse_address(true)?;
        s.bind(&addr.into())?;
        s.listen(16)?;
        s.set_nonblocking(true)?;
        Ok(s.into())
    }

    /// `0.0.0.0:port` and `[::]:port` in network namespace `idx`.
    fn dual_listener(env: &TestEnv, idx: usize, port: u16) -> Listeners {
        let (v4, v6) = in_netns(env.netns(idx), || {
            (
                listen(SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, port).into()),
                listen(SocketAddrV6::new(Ipv6Addr::UNSPECIFIED, port, 0, 0).into()),
            )
        })
        .expect("enter netns");
        Listeners {
            v4: v4.unwrap_or_else(|e| panic!("listen 0.0.0.0:{port}: {e}")),
            v6: v6.unwrap_or_else(|e| panic!("listen [::]:{port}: {e}")),
        }
    }

    /// Connects from network namespace `idx`; the socket stays in that namespace.
    fn connect_from(env: &TestEnv, idx: usize, to: SocketAddr) -> io::Result<TcpStream> {
        in_netns(env.netns(idx), || {
            TcpStream::connect_timeout(&to, CONNECT_TIMEOUT)
        })
        .expect("enter netns")
    }

    fn sa(ip: impl Into<IpAddr>, port: u16) -> SocketAddr {
        SocketAddr::new(ip.into(), port)
    }

    fn family_of(listeners: &Listeners, ip: IpAddr) -> &TcpListener {
        if ip.is_ipv4() {
            &listeners.v4
        } else {
            &listeners.v6
        }
    }

    /// Connects from the client namespace and asserts the connection is refused (`sk_lookup`
    /// dropped the lookup: no socket, so the kernel answers the SYN with a reset) and none of
    /// `idle` got anything.
    fn assert_dropped(env: &TestEnv, from: usize, to: SocketAddr, idle: &[&Listeners]) {
        match connect_from(env, from, to) {
            Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => {}
            other => panic!("connect {to}: expected a refusal, got {other:?}"),
        }
        for l in idle {
            l.assert_idle();
        }
    }

    /// Connects from the client namespace and asserts the connection is accepted by
    /// `expected` (of the destination's family) with the destination as its local address,
    /// and by none of `idle`.
    fn assert_lands_on(
        env: &TestEnv,
        from: usize,
        to: SocketAddr,
        expected: &Listeners,
        idle: &[&Listeners],
        what: &str,
    ) {
        let client =
            connect_from(env, from, to).unwrap_or_else(|e| panic!("{what}: connect {to}: {e}"));
        assert_accepted(&client, to, expected, idle, what);
    }

    /// `client`, connected to `to`, was accepted by `expected` and by none of `idle`.
    fn assert_accepted(
        client: &TcpStream,
        to: SocketAddr,
        expected: &Listeners,
        idle: &[&Listeners],
        what: &str,
    ) {
        let (conn, peer) = Listeners::accept(family_of(expected, to.ip())).unwrap_or_else(|| {
            for l in idle {
                if let Ok((c, peer)) = family_of(l, to.ip()).accept() {
                    panic!(
                        "{what}: connection to {to} from {peer} accepted by the listener \
                             on {}",
                        c.local_addr().unwrap()
                    );
                }
            }
            panic!("{what}: connection to {to} not accepted where expected")
        });
        assert_eq!(peer, client.local_addr().unwrap(), "{what}: peer");
        assert_eq!(
            conn.local_addr().unwrap(),
            to,
            "{what}: the accepted socket keeps the original destination"
        );
        for l in idle {
            l.assert_idle();
        }
    }

    /// The pod and client namespaces joined by a veth pair, with the test addresses.
    fn pod_network() -> TestEnv {
        let mut env = TestEnv::new();
        assert_eq!(env.add_netns(), CLIENT);
        let (pod, client) = (env.netns[POD].0.clone(), env.netns[CLIENT].0.clone());
        // Interface names only need to be unique inside the private namespaces.
        run(Command::new("ip").args([
            "-n", &pod, "link", "add", "mpod0", "type", "veth", "peer", "name", "mcli0", "netns",
            &client,
        ]));
        for (ns, dev, ip4, ip6) in [
            (&pod, "mpod0", "10.55.0.2/24", "fd55::2/64"),
            (&client, "mcli0", "10.55.0.1/24", "fd55::1/64"),
        ] {
            run(Command::new("ip").args(["-n", ns, "addr", "add", ip4, "dev", dev]));
            run(Command::new("ip").args(["-n", ns, "-6", "addr", "add", ip6, "dev", dev, "nodad"]));
            run(Command::new("ip").args(["-n", ns, "link", "set", dev, "up"]));
        }
        env
    }

    /// Everything a test needs in the pod: the loaded datapath with the plaintext listeners
    /// registered and `mesh_sklookup` attached, and the application listeners.
    struct Pod {
        dp: Datapath,
        cookie: u64,
        plaintext: Listeners,
        app: Listeners,
    }

    fn pod(env: &TestEnv) -> Pod {
        let dp = Datapath::load(&env.config()).expect("load datapath");
        let cookie = netns_cookie(env.netns(POD)).unwrap();
        let plaintext = dual_listener(env, POD, mesh_common::INBOUND_PLAINTEXT_PORT);
        let app = dual_listener(env, POD, APP_PORT);
        dp.set_inbound_listener(POD4.into(), plaintext.v4.as_fd())
            .expect("register IPv4 listener");
        dp.set_inbound_listener(POD6.into(), plaintext.v6.as_fd())
            .expect("register IPv6 listener");
        dp.attach_inbound(cookie, env.netns(POD))
            .expect("attach sk_lookup");
        Pod {
            dp,
            cookie,
            plaintext,
            app,
        }
    }

    /// The in-pod routing for the proxy's transparent sockets, with `ip`: everything marked
    /// INBOUND_MARK is local, via `lo`.
    ///
    /// The mark rule must come BEFORE the `local` table (which is therefore moved from priority 0
    /// to 100): otherwise the proxy's SYN to the pod's own address is routed by the `local`
    /// table's route for that address, whose device is the pod's interface, and `sk_lookup`
    /// sees that device as `ingress_ifindex` instead of `lo`, and captures the proxy's own
    /// connection to the application.
    fn install_inbound_routing(env: &TestEnv, idx: usize) {
        let ns = env.netns[idx].0.as_str();
        let mark = format!("{:#x}/0xfff", mesh_common::INBOUND_MARK);
        let table = mesh_common::INBOUND_ROUTE_TABLE.to_string();
        for family in ["-4", "-6"] {
            run(Command::new("ip").args([
                "-n", ns, family, "rule", "add", "fwmark", &mark, "lookup", &table, "pref", "50",
            ]));
            run(Command::new("ip").args([
                "-n", ns, family, "rule", "add", "lookup", "local", "pref", "100",
            ]));
            run(Command::new("ip").args(["-n", ns, family, "rule", "del", "pref", "0"]));
            run(Command::new("ip").args([
                "-n", ns, family, "route", "add", "local", "default", "dev", "lo", "table", &table,
            ]));
        }
        in_netns(env.netns(idx), || {
            fs::write("/proc/sys/net/ipv4/tcp_fwmark_accept", "1")
        })
        .expect("enter netns")
        .expect("set tcp_fwmark_accept");
    }

    /// The proxy's connection to an application: transparent, bound to the client's address,
    /// marked INBOUND_MARK.
    fn transparent_connect(from: IpAddr, to: SocketAddr) -> io::Result<TcpStream> {
        let s = Socket::new(Domain::for_address(to), Type::STREAM, None)?;
        if to.is_ipv4() {
            s.set_ip_transparent_v4(true)?;
        } else {
            let on: libc::c_int = 1;
            // SAFETY: setsockopt with a valid int option value.
            let rc = unsafe {
                libc::setsockopt(
                    s.as_raw_fd(),
                    libc::SOL_IPV6,
                    libc::IPV6_TRANSPARENT,
                    (&raw const on).cast(),
                    std::mem::size_of::<libc::c_int>() as libc::socklen_t,
                )
            };
            if rc != 0 {
                return Err(io::Error::last_os_error());
            }
        }
        s.set_mark(mesh_common::INBOUND_MARK)?;
        s.bind(&SocketAddr::new(from, 0).into())?;
        s.connect_timeout(&to.into(), CONNECT_TIMEOUT)?;
        Ok(s.into())
    }

    /// `(link id, program id)` of the sk_lookup links attached to the network namespace with
    /// inode `netns_ino`, from `bpftool link`.
    fn sk_lookup_links(netns_ino: u64) -> Vec<(u64, u64)> {
        let out = Command::new("bpftool")
            .args(["-j", "link", "show"])
            .output()
            .expect("run bpftool");
        assert!(
            out.status.success(),
            "bpftool: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let links: serde_json::Value =
            serde_json::from_slice(&out.stdout).expect("bpftool prints JSON");
        links
            .as_array()
            .expect("a list of links")
            .iter()
            .filter(|l| {
                l["type"] == "netns"
                    && l["attach_type"] == "sk_lookup"
                    && l["netns_ino"].as_u64() == Some(netns_ino)
            })
            .map(|l| (l["id"].as_u64().unwrap(), l["prog_id"].as_u64().unwrap()))
            .collect()
    }

    /// Waits (up to 10 s) until the network namespace `netns` has no sk_lookup link and no
    /// sk_lookup program left in its run array. A link goes when its last descriptor (or pin)
    /// goes; a process another test thread is forking at that moment holds a copy of ours until
    /// it execs, so the release can come a little after our close. The kernel frees a link's id
    /// before it takes the program out of the namespace's run array, so the link list alone can
    /// be empty while the program still steers connections: the run array is what counts.
    fn no_sk_lookup_links(netns: &File) -> bool {
        let ino = netns.metadata().unwrap().ino();
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        loop {
            if sk_lookup_links(ino).is_empty() && sk_lookup_programs(netns) == 0 {
                return true;
            }
            if std::time::Instant::now() >= deadline {
                return false;
            }
            thread::sleep(Duration::from_millis(10));
        }
    }

    /// How many sk_lookup programs run in `netns` (BPF_PROG_QUERY on the namespace).
    fn sk_lookup_programs(netns: &File) -> u32 {
        const BPF_PROG_QUERY: libc::c_long = 16;
        const BPF_SK_LOOKUP: u32 = 36;
        // union bpf_attr, `query`: target_fd, attach_type, query_flags, attach_flags,
        // prog_ids (u64), prog_cnt (u32) at byte 24; zero elsewhere.
        let mut attr = [0u32; 16];
        attr[0] = netns.as_raw_fd() as u32;
        attr[1] = BPF_SK_LOOKUP;
        // SAFETY: `attr` is a zeroed, large enough bpf_attr that lives across the call; with
        // no prog_ids buffer the kernel writes only the count into it.
        let rc = unsafe {
            libc::syscall(
                libc::SYS_bpf,
                BPF_PROG_QUERY,
                attr.as_mut_ptr(),
                std::mem::size_of_val(&attr),
            )
        };
        assert_eq!(rc, 0, "BPF_PROG_QUERY: {}", io::Error::last_os_error());
        attr[6]
    }

    fn netns_ino(env: &TestEnv, idx: usize) -> u64 {
        env.netns(idx).metadata().unwrap().ino()
    }

    #[test]
    fn listener_keys_are_canonical() {
        use mesh_common::ListenerKey;
        assert_eq!(
            maps::listener_key(POD4.into()),
            ListenerKey::v4(POD4.octets())
        );
        assert_eq!(
            maps::listener_key(POD4.to_ipv6_mapped().into()),
            ListenerKey::v4(POD4.octets()),
            "IPv4-mapped is IPv4"
        );
        assert_eq!(
            maps::listener_key(POD6.into()),
            ListenerKey::v6(POD6.octets())
        );
        for ip in [IpAddr::from(POD4), IpAddr::from(POD6)] {
            assert_eq!(maps::listener_ip(&maps::listener_key(ip)), Some(ip));
        }
    }

    #[test]
    fn captures_inbound_tcp_to_the_plaintext_listener() {
        let env = pod_network();
        let pod = pod(&env);
        assert_eq!(pod.dp.inbound_attached(), vec![pod.cookie]);
        let registered = vec![IpAddr::from(POD4), IpAddr::from(POD6)];
        assert_eq!(pod.dp.inbound_listeners().unwrap(), registered);
        assert_eq!(
            pinned::read_inbound_listeners(&env.pin_dir()).unwrap(),
            registered,
            "keys of the pinned map"
        );

        for (to, what) in [
            (sa(POD4, APP_PORT), "IPv4"),
            (sa(POD6, APP_PORT), "IPv6"),
            (sa(POD4, 1), "IPv4, a port nobody listens on"),
        ] {
            assert_lands_on(&env, CLIENT, to, &pod.plaintext, &[&pod.app], what);
        }

        // No listener registered for the address (no agent serves the pod): dropped, never
        // handed to the application (fail closed).
        pod.dp.remove_inbound_listener(POD4.into()).unwrap();
        pod.dp.remove_inbound_listener(POD4.into()).unwrap();
        assert_eq!(
            pod.dp.inbound_listeners().unwrap(),
            vec![IpAddr::from(POD6)]
        );
        assert_dropped(
            &env,
            CLIENT,
            sa(POD4, APP_PORT),
            &[&pod.app, &pod.plaintext],
        );
        assert_lands_on(
            &env,
            CLIENT,
            sa(POD6, APP_PORT),
            &pod.plaintext,
            &[&pod.app],
            "IPv6 still registered",
        );
        // A listener that is closed leaves the map by itself (the kernel unlinks a socket from
        // every sockmap when it is released). Released, not closed: a process another test
        // thread is forking at that moment holds a copy of our descriptors until it execs, so
        // the release (and the unlink) can come a little after our close.
        let other = Ipv4Addr::new(10, 55, 0, 99);
        let gone = dual_listener(&env, POD, 15106);
        pod.dp
            .set_inbound_listener(other.into(), gone.v4.as_fd())
            .unwrap();
        assert!(pod.dp.inbound_listeners().unwrap().contains(&other.into()));
        drop(gone);
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while pod.dp.inbound_listeners().unwrap() != vec![IpAddr::from(POD6)]
            && std::time::Instant::now() < deadline
        {
            thread::sleep(Duration::from_millis(5));
        }
        assert_eq!(
            pod.dp.inbound_listeners().unwrap(),
            vec![IpAddr::from(POD6)],
            "closed listener unlinked"
        );
        // Registering a socket that cannot receive connections is refused.
        let udp = in_netns(env.netns(POD), || std::net::UdpSocket::bind("0.0.0.0:0"))
            .unwrap()
            .unwrap();
        let err = pod
            .dp
            .set_inbound_listener(other.into(), udp.as_fd())
            .unwrap_err();
        assert!(
            matches!(err, DatapathError::NotATcpListener { .. }),
            "{err}"
        );
        let unbound = Socket::new(Domain::IPV4, Type::STREAM, None).unwrap();
        let err = pod
            .dp
            .set_inbound_listener(other.into(), unbound.as_fd())
            .unwrap_err();
        assert!(err.to_string().contains("not listening"), "{err}");
        // Registering again (and replacing) works.
        pod.dp
            .set_inbound_listener(POD4.to_ipv6_mapped().into(), pod.plaintext.v4.as_fd())
            .unwrap();
        pod.dp
            .set_inbound_listener(POD4.into(), pod.plaintext.v4.as_fd())
            .unwrap();
        assert_lands_on(
            &env,
            CLIENT,
            sa(POD4, APP_PORT),
            &pod.plaintext,
            &[&pod.app],
            "re-registered",
        );

        // Detached: the application gets its connections directly.
        pod.dp.detach_inbound(pod.cookie).unwrap();
        pod.dp.detach_inbound(pod.cookie).unwrap();
        assert!(pod.dp.inbound_attached().is_empty());
        assert!(no_sk_lookup_links(env.netns(POD)));
        assert_lands_on(
            &env,
            CLIENT,
            sa(POD4, APP_PORT),
            &pod.app,
            &[&pod.plaintext],
            "detached, IPv4",
        );
        assert_lands_on(
            &env,
            CLIENT,
            sa(POD6, APP_PORT),
            &pod.app,
            &[&pod.plaintext],
            "detached, IPv6",
        );
        pod.dp.uninstall().unwrap();
    }

    #[test]
    fn leaves_mesh_ports_excluded_ports_and_loopback_alone() {
        let env = pod_network();
        let pod = pod(&env);
        let hbone = dual_listener(&env, POD, mesh_common::HBONE_PORT);
        let excluded = dual_listener(&env, POD, EXCLUDED_PORT);

        for ip in [IpAddr::from(POD4), IpAddr::from(POD6)] {
            assert_lands_on(
                &env,
                CLIENT,
                sa(ip, mesh_common::HBONE_PORT),
                &hbone,
                &[&pod.plaintext],
                "HBONE",
            );
            assert_lands_on(
                &env,
                CLIENT,
                sa(ip, EXCLUDED_PORT),
                &excluded,
                &[&pod.plaintext],
                "excluded port",
            );
            // Nothing listens on the pod address at 15001 (the proxy's is on loopback).
            let err = connect_from(&env, CLIENT, sa(ip, mesh_common::OUTBOUND_PORT)).unwrap_err();
            assert_eq!(
                err.raw_os_error(),
                Some(ECONNREFUSED),
                "15001 not captured: {err}"
            );
            // From inside the pod to its own address: over lo, not captured.
            assert_lands_on(
                &env,
                POD,
                sa(ip, APP_PORT),
                &pod.app,
                &[&pod.plaintext],
                "from the pod itself",
            );
        }
        // The proxy's paths to the application: loopback, and transparent sockets with the
        // client's address, marked INBOUND_MARK and routed to `lo` by the in-pod routing.
        install_inbound_routing(&env, POD);
        for (from, to) in [
            (IpAddr::from(CLIENT4), sa(POD4, APP_PORT)),
            (IpAddr::from(CLIENT6), sa(POD6, APP_PORT)),
        ] {
            let client = in_netns(env.netns(POD), || transparent_connect(from, to))
                .expect("enter netns")
                .unwrap_or_else(|e| panic!("transparent connect from {from} to {to}: {e}"));
            assert_eq!(client.local_addr().unwrap().ip(), from);
            assert_accepted(
                &client,
                to,
                &pod.app,
                &[&pod.plaintext],
                "transparent proxy socket",
            );
        }
        assert_lands_on(
            &env,
            POD,
            sa(Ipv4Addr::LOCALHOST, APP_PORT),
            &pod.app,
            &[&pod.plaintext],
            "loopback",
        );

        // Excluded ports change at run time.
        pod.dp.set_excluded_ports(&[]).unwrap();
        assert_lands_on(
            &env,
            CLIENT,
            sa(POD4, EXCLUDED_PORT),
            &pod.plaintext,
            &[&excluded],
            "no longer excluded",
        );
        pod.dp.uninstall().unwrap();
    }

    #[test]
    fn attach_is_idempotent_and_shutdown_detaches() {
        let env = pod_network();
        let pod = pod(&env);
        let ino = netns_ino(&env, POD);
        pod.dp.attach_inbound(pod.cookie, env.netns(POD)).unwrap();
        let links = sk_lookup_links(ino);
        assert_eq!(links.len(), 1, "attached once: {links:?}");
        assert_eq!(pod.dp.inbound_attached(), vec![pod.cookie]);
        assert!(sk_lookup_links(netns_ino(&env, CLIENT)).is_empty());

        // Detach and attach again.
        pod.dp.detach_inbound(pod.cookie).unwrap();
        assert!(no_sk_lookup_links(env.netns(POD)));
        pod.dp.attach_inbound(pod.cookie, env.netns(POD)).unwrap();
        assert_eq!(sk_lookup_links(ino).len(), 1);
        assert_eq!(sk_lookup_programs(env.netns(POD)), 1, "the program runs");
        assert_lands_on(
            &env,
            CLIENT,
            sa(POD6, APP_PORT),
            &pod.plaintext,
            &[&pod.app],
            "re-attached",
        );

        let pin_dir = env.pin_dir();
        assert!(
            pin_dir.join(mesh_common::MAP_INBOUND).exists(),
            "INBOUND_LSN pinned"
        );
        pod.dp.uninstall().unwrap();
        assert!(
            no_sk_lookup_links(env.netns(POD)),
            "sk_lookup link left after shutdown"
        );
        assert!(!pin_dir.exists(), "pin dir left behind");
        assert_lands_on(
            &env,
            CLIENT,
            sa(POD4, APP_PORT),
            &pod.app,
            &[&pod.plaintext],
            "after shutdown",
        );
    }

    #[test]
    fn a_crash_leaves_inbound_capture_failing_closed_until_taken_over() {
        let env = pod_network();
        let Pod {
            dp,
            cookie,
            plaintext,
            app,
        } = pod(&env);
        let ino = netns_ino(&env, POD);
        let before = sk_lookup_links(ino);
        assert_eq!(before.len(), 1);
        // What a crash leaves: the link stays pinned; the proxy's listeners die with it. So
        // plaintext from outside is dropped, never handed to the application.
        drop(dp);
        drop(plaintext);
        assert_eq!(sk_lookup_links(ino), before, "sk_lookup stays attached");
        assert_dropped(&env, CLIENT, sa(POD4, APP_PORT), &[&app]);

        // The next agent takes the link over and serves again.
        let dp = Datapath::load(&env.config()).expect("take over");
        assert_eq!(dp.adopted().inbound, 1);
        assert_eq!(dp.inbound_attached(), vec![cookie]);
        let plaintext = dual_listener(&env, POD, mesh_common::INBOUND_PLAINTEXT_PORT);
        dp.set_inbound_listener(POD4.into(), plaintext.v4.as_fd())
            .unwrap();
        dp.attach_inbound(cookie, env.netns(POD)).unwrap();
        let after = sk_lookup_links(ino);
        assert_eq!(after.len(), 1, "replaced, not added: {after:?}");
        assert_ne!(after[0].1, before[0].1, "our program, not the old one");
        assert_lands_on(
            &env,
            CLIENT,
            sa(POD4, APP_PORT),
            &plaintext,
            &[&app],
            "taken over",
        );

        // A namespace nobody enrolls any more loses it (here: not in ENROLLED at all).
        dp.prune(|_, _| true).unwrap();
        assert!(
            no_sk_lookup_links(env.netns(POD)),
            "stale sk_lookup link kept"
        );
        assert_lands_on(
            &env,
            CLIENT,
            sa(POD4, APP_PORT),
            &app,
            &[&plaintext],
            "pruned",
        );
        dp.uninstall().unwrap();
    }
}

#[test]
fn event_counters_are_pinned_and_summed_over_the_cpus_across_restarts() {
    let env = TestEnv::new();
    let dp = Datapath::load(&env.config()).expect("load datapath");
    let zero: Vec<_> = mesh_common::COUNTER_NAMES.iter().map(|n| (*n, 0)).collect();
    assert_eq!(dp.event_counts().unwrap(), zero);
    // What the programs do on each CPU, done from user space through the pin.
    let pin = env.pin_dir().join(mesh_common::MAP_COUNTERS);
    let mut map = aya::maps::PerCpuArray::<_, u64>::try_from(aya::maps::Map::PerCpuArray(
        aya::maps::MapData::from_pin(&pin).unwrap(),
    ))
    .unwrap();
    let cpus = aya::util::nr_cpus().unwrap();
    let values = aya::maps::PerCpuValues::try_from(vec![2u64; cpus]).unwrap();
    map.set(mesh_common::COUNTER_CONNECT_NOT_REDIRECTED, values, 0)
        .unwrap();
    let counts = dp.event_counts().unwrap();
    assert_eq!(counts[0], ("connect_not_redirected", 2 * cpus as u64));
    assert_eq!(counts[1], ("orig_dst_not_stored", 0));
    // A restart (the next agent on the pin directory) keeps them. (A child process another test
    // forks at this moment holds a copy of the lock until it execs: retry while busy.)
    drop(dp);
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let dp = loop {
        match Datapath::load(&env.config()) {
            Err(DatapathError::PinDirBusy { .. }) if std::time::Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(20));
            }
            other => break other.expect("reload datapath"),
        }
    };
    assert_eq!(dp.event_counts().unwrap()[0].1, 2 * cpus as u64);
}

/// [`OrigDstTable`]: thread-owned handles, the fallback shards and their guarantees, with entries
/// written through the pin (nothing is enrolled, so the programs write none).
mod orig_dst_table {
    use std::{collections::BTreeMap, sync::Barrier};

    use super::*;
    use crate::datapath::maps::{open_orig_dst, OrigDstMap, ORIG_DST};

    /// A cookie no network namespace has.
    const NETNS: u64 = u64::MAX - 7;

    fn key(i: usize) -> FlowKey {
        FlowKey {
            netns: NETNS,
            port: u16::try_from(i / 2).unwrap(),
            family: if i.is_multiple_of(2) {
                AF_INET
            } else {
                AF_INET6
            },
            _pad: 0,
        }
    }

    fn value(i: usize, round: usize) -> OrigDst {
        OrigDst {
            addr: mapped([10, 9, (round % 256) as u8, (i % 256) as u8]),
            port: u16::try_from(i % 65_536).unwrap(),
            family: AF_INET,
            _pad: 0,
            netns: NETNS,
        }
    }

    /// A handle of our own on the loaded `ORIG_DST`, to write entries as the programs would.
    fn writer(env: &TestEnv) -> OrigDstMap {
        open_orig_dst(&env.pin_dir().join(ORIG_DST.name)).unwrap()
    }

    fn table(env: &TestEnv, pool: usize, fallback: usize) -> OrigDstTable {
        let pin = env.pin_dir().join(ORIG_DST.name);
        let open = |n| (0..n).map(|_| open_orig_dst(&pin).unwrap()).collect();
        OrigDstTable::new(open(pool), open(fallback))
    }

    #[test]
    fn concurrent_takes_of_one_key_give_it_to_exactly_one_caller() {
        const THREADS: usize = 6;
        const ROUNDS: usize = 300;
        let env = TestEnv::new();
        let _dp = Datapath::load(&env.config()).expect("load datapath");
        let mut writer = writer(&env);
        // Fewer handles than threads: thread-owned handles and the fallback shard race.
        let table = table(&env, 2, 1);
        let start = Barrier::new(THREADS + 1);
        let done = Barrier::new(THREADS + 1);
        let winners = thread::scope(|scope| {
            let takers: Vec<_> = (0..THREADS)
                .map(|_| {
                    scope.spawn(|| {
                        let mut got = Vec::new();
                        for round in 0..ROUNDS {
                            start.wait();
                            if let Some(v) = table.take(&key(0)).unwrap() {
                                got.push((round, v));
                            }
                            done.wait();
                        }
                        got
                    })
                })
                .collect();
            for round in 0..ROUNDS {
                writer.insert(key(0), value(0, round), 0).unwrap();
                start.wait();
                done.wait();
            }
            takers
                .into_iter()
                .flat_map(|t| t.join().unwrap())
                .collect::<Vec<_>>()
        });
        let mut by_round = BTreeMap::new();
        for (round, v) in winners {
            assert!(
                by_round.insert(round, v).is_none(),
                "round {round}: two callers got the entry"
            );
        }
        assert_eq!(by_round.len(), ROUNDS, "every round someone got the entry");
        for (round, v) in by_round {
            assert_eq!(v, value(0, round));
        }
        assert!(table.fallback_uses() > 0, "the fallback shard took part");
        assert!(pinned::read_orig_dst(&env.pin_dir()).unwrap().is_empty());
    }

    #[test]
    fn many_threads_on_many_keys_take_each_entry_exactly_once() {
        const KEYS: usize = 4096;
        let env = TestEnv::new();
        let dp = Datapath::load(&env.config()).expect("load datapath");
        let mut writer = writer(&env);
        for i in 0..KEYS {
            writer.insert(key(i), value(i, 0), 0).unwrap();
        }
        assert_eq!(pinned::read_orig_dst(&env.pin_dir()).unwrap().len(), KEYS);
        // The agent's table, with more threads than its pool has handles.
        let table = dp.orig_dst();
        let threads = table.spare_handles() + 4;
        let claimed = Barrier::new(threads);
        let taken: Vec<(usize, OrigDst)> = thread::scope(|scope| {
            let takers: Vec<_> = (0..threads)
                .map(|t| {
                    let (table, claimed) = (&table, &claimed);
                    scope.spawn(move || {
                        // Each thread walks all keys from its own starting point.
                        let mut got = Vec::new();
                        for n in 0..KEYS {
                            let i = (t * KEYS / threads + n) % KEYS;
                            if let Some(v) = table.take(&key(i)).unwrap() {
                                got.push((i, v));
                            }
                            if n == 0 {
                                // Everyone has made a first take (and claimed a handle if one
                                // was left) before anyone can finish and give one back.
                                claimed.wait();
                            }
                        }
                        got
                    })
                })
                .collect();
            takers.into_iter().flat_map(|t| t.join().unwrap()).collect()
        });
        let mut seen = vec![false; KEYS];
        for (i, v) in &taken {
            assert!(!seen[*i], "key {i} taken twice");
            seen[*i] = true;
            assert_eq!(*v, value(*i, 0), "key {i}");
        }
        assert_eq!(taken.len(), KEYS, "every entry taken");
        assert!(
            table.fallback_uses() >= 4,
            "the threads beyond the pool used the fallback: {}",
            table.fallback_uses()
        );
        assert!(pinned::read_orig_dst(&env.pin_dir()).unwrap().is_empty());
        // The threads are gone and gave their handles back.
        assert_eq!(table.spare_handles(), threads - 4);
    }

    #[test]
    fn runtime_workers_take_without_the_fallback_lock() {
        const WORKERS: usize = 2;
        const KEYS: usize = 2000;
        let env = TestEnv::new();
        let dp = Datapath::load(&env.config()).expect("load datapath");
        let mut writer = writer(&env);
        for i in 0..KEYS {
            writer.insert(key(i), value(i, 0), 0).unwrap();
        }
        let table = dp.orig_dst();
        let pool = table.spare_handles();
        assert!(pool > WORKERS, "{pool} handles");
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(WORKERS)
            .build()
            .unwrap();
        let taken = rt.block_on(async {
            let tasks: Vec<_> = (0..KEYS)
                .map(|i| {
                    let table = table.clone();
                    tokio::spawn(async move {
                        tokio::task::yield_now().await;
                        table.take(&key(i)).unwrap().map(|v| (i, v))
                    })
                })
                .collect();
            let mut taken = Vec::new();
            for task in tasks {
                taken.push(task.await.unwrap());
            }
            taken
        });
        for (i, got) in taken.into_iter().enumerate() {
            assert_eq!(got, Some((i, value(i, 0))));
        }
        assert_eq!(table.fallback_uses(), 0, "no take went through a lock");
        assert!(table.spare_handles() < pool, "workers own handles");
        drop(rt);
        assert_eq!(
            table.spare_handles(),
            pool,
            "stopped workers give theirs back"
        );

        // Threads come and go without draining the pool: each gives its handle back on exit.
        for i in 0..pool + 3 {
            writer.insert(key(i), value(i, 1), 0).unwrap();
            let table = table.clone();
            let got = thread::spawn(move || table.take(&key(i)).unwrap())
                .join()
                .unwrap();
            assert_eq!(got, Some(value(i, 1)));
        }
        assert_eq!(table.fallback_uses(), 0);
        assert_eq!(table.spare_handles(), pool);
        assert!(pinned::read_orig_dst(&env.pin_dir()).unwrap().is_empty());
    }
}

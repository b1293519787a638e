//! The manager with pods found by IP (root): the real datapath on a private cgroup and bpffs, a
//! real proxy, pods in real network namespaces that are deleted and recreated under it.
use std::fs;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use tokio::sync::watch;

use super::*;
use crate::datapath::{default_cgroup_root, DatapathConfig};
use crate::identity::{CaOptions, CertManager, CertificateAuthority, SignFuture, Signer};
use crate::proxy::ProxyOptions;
use crate::telemetry::Metrics;
use crate::test_support::{mount_bpffs, nodad, sh, unmount};
use socket2::Domain;

static NEXT: AtomicUsize = AtomicUsize::new(0);

/// A private cgroup, bpffs, netns/proc directories and CA dir; the namespaces and processes the
/// test makes. Removed on drop, also when the test panics.
struct Env {
    id: String,
    root: PathBuf,
    cgroup: PathBuf,
    bpffs: PathBuf,
    netns: Vec<String>,
    children: Vec<Child>,
}

impl Env {
    fn new() -> Env {
        // SAFETY: geteuid has no preconditions.
        assert_eq!(
            unsafe { libc::geteuid() },
            0,
            "the in-pod manager tests load eBPF programs and create network namespaces: run them \
             as root (cargo xtask test)"
        );
        let id = format!(
            "{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        );
        let root = std::env::temp_dir().join(format!("minpod-{id}"));
        for dir in ["netns", "proc", "ca", "bpffs"] {
            fs::create_dir_all(root.join(dir)).unwrap();
        }
        let mut env = Env {
            cgroup: default_cgroup_root()
                .expect("cgroup2 mount")
                .join(format!("mesh-inpod-test-{id}")),
            bpffs: PathBuf::new(),
            id,
            root,
            netns: Vec::new(),
            children: Vec::new(),
        };
        fs::create_dir(&env.cgroup).expect("create test cgroup");
        let bpffs = env.root.join("bpffs");
        mount_bpffs(&bpffs).expect("mount bpffs");
        env.bpffs = bpffs;
        env
    }

    fn datapath(&self) -> Arc<Datapath> {
        Arc::new(
            Datapath::load(&DatapathConfig {
                cgroup_root: self.cgroup.clone(),
                pin_dir: self.bpffs.join("mesh"),
                excluded_ports: vec![],
            })
            .expect("load the datapath"),
        )
    }

    fn finder(&self) -> NetnsFinder {
        NetnsFinder::new(self.root.join("netns"), self.root.join("proc"))
            .with_min_scan_interval(Duration::ZERO)
    }

    /// `ip netns add <name>` with `lo` up and `addrs` on a veth inside, linked into the
    /// private netns dir. Returns the bind mount's path.
    fn add_netns(&mut self, tag: &str, addrs: &[&str]) -> PathBuf {
        let name = format!("minpod-{}-{tag}", self.id);
        sh(&format!("ip netns add {name}"));
        self.netns.push(name.clone());
        let mut script =
            "link set lo up\nlink add d0 type veth peer name d1\nlink set d0 up\n".to_string();
        for addr in addrs {
            script.push_str(&format!("addr add {addr} dev d0{}\n", nodad(addr)));
        }
        sh(&format!("ip -n {name} -batch - <<'EOF'\n{script}EOF"));
        let link = self.root.join("netns").join(&name);
        if !link.exists() {
            std::os::unix::fs::symlink(Path::new(DEFAULT_NETNS_DIR).join(&name), &link).unwrap();
        }
        Path::new(DEFAULT_NETNS_DIR).join(&name)
    }

    fn del_netns(&mut self, tag: &str) {
        let name = format!("minpod-{}-{tag}", self.id);
        sh(&format!("ip netns del {name}"));
        self.netns.retain(|n| *n != name);
    }

    /// A process in a new network namespace (no bind mount) holding `addrs`; listed in the
    /// private proc dir.
    fn spawn_unshared(&mut self, addrs: &[&str]) -> u32 {
        let mut script =
            "ip link set lo up && ip link add d0 type veth peer name d1 && ip link set d0 up"
                .to_string();
        for addr in addrs {
            script.push_str(&format!(" && ip addr add {addr} dev d0{}", nodad(addr)));
        }
        script.push_str(" && echo ready && exec sleep 600");
        let mut child = Command::new("unshare")
            .args(["--net", "sh", "-c", &script])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .spawn()
            .expect("spawn unshare");
        let pid = child.id();
        let stdout = child.stdout.take().unwrap();
        self.children.push(child);
        let mut line = String::new();
        io::BufRead::read_line(&mut io::BufReader::new(stdout), &mut line).unwrap();
        assert_eq!(line.trim(), "ready");
        std::os::unix::fs::symlink(
            Path::new("/proc").join(pid.to_string()),
            self.root.join("proc").join(pid.to_string()),
        )
        .unwrap();
        pid
    }

    /// A second process in the network namespace of `pid` (a pod's other container).
    fn spawn_joined(&mut self, pid: u32) -> u32 {
        let child = Command::new("nsenter")
            .arg(format!("--net=/proc/{pid}/ns/net"))
            .args(["sleep", "600"])
            .stdin(Stdio::null())
            .spawn()
            .expect("spawn nsenter");
        let joined = child.id();
        self.children.push(child);
        // nsenter has entered once its own ns/net differs from ours.
        let mine = NsId::of_path(Path::new("/proc/self/ns/net")).unwrap();
        let path = Path::new("/proc").join(joined.to_string()).join("ns/net");
        for _ in 0..200 {
            if NsId::of_path(&path).is_ok_and(|id| id != mine) {
                break;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        std::os::unix::fs::symlink(
            Path::new("/proc").join(joined.to_string()),
            self.root.join("proc").join(joined.to_string()),
        )
        .unwrap();
        joined
    }

    fn kill(&mut self, pid: u32) {
        if let Some(i) = self.children.iter().position(|c| c.id() == pid) {
            let mut child = self.children.remove(i);
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for Env {
    fn drop(&mut self) {
        for child in &mut self.children {
            let _ = child.kill();
            let _ = child.wait();
        }
        for name in &self.netns {
            let _ = Command::new("ip")
                .args(["netns", "del", name])
                .stderr(Stdio::null())
                .status();
        }
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while self.cgroup.exists()
            && fs::remove_dir(&self.cgroup).is_err()
            && std::time::Instant::now() < deadline
        {
            std::thread::sleep(Duration::from_millis(20));
        }
        unmount(&self.bpffs);
        let _ = fs::remove_dir_all(&self.root);
    }
}

fn proxy(env: &Env, datapath: &Datapath, state: watch::Receiver<Arc<State>>) -> Arc<Proxy> {
    proxy_signing_with(env, datapath, state, |ca| ca)
}

fn proxy_signing_with(
    env: &Env,
    datapath: &Datapath,
    state: watch::Receiver<Arc<State>>,
    signer: impl FnOnce(Arc<dyn Signer>) -> Arc<dyn Signer>,
) -> Arc<Proxy> {
    let ca = CertificateAuthority::load_or_generate(&CaOptions {
        ca_cert: None,
        ca_key: None,
        state_dir: env.root.join("ca"),
        trust_domain: "cluster.local".into(),
        extra_roots: None,
    })
    .unwrap();
    let bundle = ca.trust_bundle();
    let certs = CertManager::new(
        signer(Arc::new(ca)),
        bundle,
        "cluster.local".into(),
        Duration::from_secs(3600),
    );
    let options = ProxyOptions {
        connect_timeout: Duration::from_secs(1),
        ..ProxyOptions::default()
    };
    Arc::new(Proxy::new(
        &options,
        state,
        Some(datapath.orig_dst()),
        Arc::new(Metrics::new()),
        certs,
    ))
}

fn state(yaml: &str) -> Arc<State> {
    let config = crate::config::parse(Path::new("test.yaml"), yaml).unwrap();
    Arc::new(State::from_mesh(&config, "n1"))
}

/// The ENROLLED cookies and sk_lookup attachments, sorted.
fn enrolled(datapath: &Datapath) -> (Vec<u64>, Vec<u64>) {
    let mut cookies: Vec<u64> = datapath
        .enrolled()
        .unwrap()
        .into_iter()
        .map(|(c, _)| c)
        .collect();
    cookies.sort_unstable();
    (cookies, datapath.inbound_attached())
}

/// A manager with one enrolled workload `name` at `ip` (found by IP), reconciled: wired.
async fn wired_one(
    env: &Env,
    datapath: &Arc<Datapath>,
    name: &str,
    ip: &str,
) -> (InpodManager, watch::Sender<Arc<State>>) {
    let yaml = format!(
        "namespaces: [{{ name: default, labels: {{ istio.io/dataplane-mode: ambient }} }}]\n\
         workloads:\n  - {{ name: {name}, node: n1, ips: [{ip}] }}\n"
    );
    let (state_tx, state_rx) = watch::channel(state(&yaml));
    let snapshot = state_rx.borrow().clone();
    let mut manager = InpodManager::new(
        datapath.clone(),
        proxy(env, datapath, state_rx),
        env.finder(),
    );
    assert!(manager.reconcile(&snapshot).await.is_empty());
    (manager, state_tx)
}

fn cookie_of(path: &Path) -> u64 {
    Netns::open(path).unwrap().cookie()
}

#[tokio::test]
async fn pods_found_by_ip_are_unwired_when_their_namespace_goes_and_wired_again_when_it_returns() {
    let mut env = Env::new();
    let a_path = env.add_netns("a", &["10.250.20.2/32", "fd00:250::20:2/128"]);
    let b_path = env.add_netns("b", &["10.250.20.3/32"]);
    let c_pid = env.spawn_unshared(&["10.250.20.4/32"]);
    let datapath = env.datapath();
    let yaml = format!(
        r#"
namespaces: [{{ name: default, labels: {{ istio.io/dataplane-mode: ambient }} }}]
workloads:
  - {{ name: a, node: n1, ips: [10.250.20.2, "fd00:250::20:2"] }}
  - {{ name: b, node: n1, ips: [10.250.20.3], netns: {} }}
  - {{ name: c, node: n1, ips: [10.250.20.4] }}
"#,
        b_path.display()
    );
    let (_state_tx, state_rx) = watch::channel(state(&yaml));
    let snapshot = state_rx.borrow().clone();
    let mut manager = InpodManager::new(
        datapath.clone(),
        proxy(&env, &datapath, state_rx),
        env.finder(),
    );

    // a by its bind mount, b by its configured path, c by its process; one scan for a and c.
    assert!(manager.reconcile(&snapshot).await.is_empty());
    assert_eq!(manager.wired(), 3);
    assert_eq!(manager.finder_stats().scans, 1);
    let c_path = Path::new("/proc").join(c_pid.to_string()).join("ns/net");
    let a_cookie = cookie_of(&a_path);
    let mut want = vec![a_cookie, cookie_of(&b_path), cookie_of(&c_path)];
    want.sort_unstable();
    assert_eq!(enrolled(&datapath), (want.clone(), want));
    // Nothing changed: no pruning, no scan.
    assert_eq!(manager.prune_vanished(), 0);
    assert!(manager.reconcile(&snapshot).await.is_empty());
    assert_eq!(manager.finder_stats().scans, 1);

    // a's sandbox is deleted while wired (its listeners and sk_lookup link are inside it; our
    // handle keeps the namespace alive): unwired at once, pending until it is back.
    env.del_netns("a");
    assert_eq!(manager.prune_vanished(), 1);
    assert_eq!(manager.wired(), 2);
    let (cookies, attached) = enrolled(&datapath);
    assert!(
        !cookies.contains(&a_cookie) && !attached.contains(&a_cookie),
        "{cookies:?} {attached:?}"
    );
    let pending = manager.reconcile(&snapshot).await;
    assert_eq!(pending.len(), 1, "{pending:?}");
    let reason = pending.first().unwrap();
    assert!(
        reason.starts_with(
            "default/a (no network namespace on this node holds 10.250.20.2, fd00:250::20:2"
        ),
        "{reason}"
    );

    // A new sandbox with the same address: found and wired again, in the new namespace.
    let a_path = env.add_netns("a", &["10.250.20.2/32", "fd00:250::20:2/128"]);
    assert!(manager.reconcile(&snapshot).await.is_empty());
    assert_eq!(manager.wired(), 3);
    let new_cookie = cookie_of(&a_path);
    assert_ne!(new_cookie, a_cookie);
    assert!(enrolled(&datapath).0.contains(&new_cookie));
    assert!(enrolled(&datapath).1.contains(&new_cookie));

    // c's process exits: its /proc path is gone with it.
    let c_cookie = cookie_of(&c_path);
    env.kill(c_pid);
    let pending = manager.reconcile(&snapshot).await;
    assert_eq!(pending.len(), 1, "{pending:?}");
    assert!(pending.first().unwrap().starts_with("default/c ("));
    assert!(!enrolled(&datapath).0.contains(&c_cookie));

    // b's configured path is recreated: same path, another namespace; rewired there.
    let b_cookie = cookie_of(&b_path);
    env.del_netns("b");
    env.add_netns("b", &["10.250.20.3/32"]);
    assert_eq!(manager.prune_vanished(), 1);
    let pending = manager.reconcile(&snapshot).await;
    assert_eq!(pending.len(), 1, "{pending:?}");
    assert_eq!(manager.wired(), 2);
    let (cookies, _) = enrolled(&datapath);
    assert!(!cookies.contains(&b_cookie) && cookies.contains(&cookie_of(&b_path)));

    manager.unwire_all();
    assert_eq!(enrolled(&datapath), (vec![], vec![]));
    drop(manager);
    let Ok(datapath) = Arc::try_unwrap(datapath) else {
        panic!("the datapath is still shared");
    };
    datapath.uninstall().unwrap();
}

#[tokio::test]
async fn a_pod_whose_first_process_exits_stays_wired_through_its_other_process() {
    let mut env = Env::new();
    let first = env.spawn_unshared(&["10.250.21.2/32"]);
    let datapath = env.datapath();
    let (mut manager, _state_tx) = wired_one(&env, &datapath, "p", "10.250.21.2").await;
    let cookie = cookie_of(&Path::new("/proc").join(first.to_string()).join("ns/net"));
    // The pod's other container joins the namespace; then the process the path named exits.
    let second = env.spawn_joined(first);
    env.kill(first);
    assert_eq!(
        manager.prune_vanished(),
        0,
        "still there under the other process"
    );
    assert_eq!(manager.wired(), 1);
    assert!(enrolled(&datapath).0.contains(&cookie), "never unenrolled");
    // Now the last process goes: unwired.
    env.kill(second);
    assert_eq!(manager.prune_vanished(), 1);
    assert_eq!(manager.wired(), 0);

    manager.unwire_all();
    drop(manager);
    let Ok(datapath) = Arc::try_unwrap(datapath) else {
        panic!("the datapath is still shared");
    };
    datapath.uninstall().unwrap();
}

/// A connection already queued on a pod's listener when the pod is unenrolled (its connect()
/// read the map just before the entry went) is still accepted, not reset by a closing listener.
#[tokio::test]
async fn a_connection_queued_when_its_pod_is_unenrolled_is_accepted_not_reset() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut env = Env::new();
    let path = env.add_netns("q", &["10.250.22.2/32"]);
    let datapath = env.datapath();
    let (mut manager, _state_tx) = wired_one(&env, &datapath, "q", "10.250.22.2").await;

    // Queued: this test's single-threaded runtime has not run the accept loop since.
    let socket = Netns::open(&path).unwrap().socket(Domain::IPV4).unwrap();
    let hbone = SocketAddr::from((Ipv4Addr::LOCALHOST, HBONE_PORT));
    socket.set_nonblocking(false).unwrap();
    socket.connect(&hbone.into()).unwrap();
    socket.set_nonblocking(true).unwrap();
    let mut conn = tokio::net::TcpStream::from_std(socket.into()).unwrap();
    assert!(manager.reconcile(&state("workloads: []")).await.is_empty());
    assert_eq!(manager.wired(), 0);

    // Accepted: the TLS server answers garbage with an alert or a close, never a reset.
    conn.write_all(b"not a TLS record\r\n\r\n").await.unwrap();
    let mut buf = [0u8; 64];
    let read = tokio::time::timeout(Duration::from_secs(5), conn.read(&mut buf))
        .await
        .expect("the queued connection is answered");
    assert!(read.is_ok(), "queued connection reset: {read:?}");

    drop(manager);
    tokio::time::sleep(2 * UNWIRE_GRACE).await;
    let Ok(datapath) = Arc::try_unwrap(datapath) else {
        panic!("the datapath is still shared");
    };
    datapath.uninstall().unwrap();
}

/// A signer that answers after a delay, counting the requests it holds at once.
struct SlowSigner {
    inner: Arc<dyn Signer>,
    in_flight: AtomicUsize,
    most: Arc<AtomicUsize>,
}

impl Signer for SlowSigner {
    fn sign<'a>(&'a self, id: &'a Identity, lifetime: Duration) -> SignFuture<'a> {
        Box::pin(async move {
            let now = self.in_flight.fetch_add(1, Ordering::SeqCst) + 1;
            self.most.fetch_max(now, Ordering::SeqCst);
            tokio::time::sleep(Duration::from_millis(300)).await;
            self.in_flight.fetch_sub(1, Ordering::SeqCst);
            self.inner.sign(id, lifetime).await
        })
    }
}

#[tokio::test]
async fn the_first_certificates_of_many_pods_are_asked_for_at_once() {
    let mut env = Env::new();
    let mut workloads = String::new();
    for i in 0..4 {
        let ip = format!("10.250.21.{}", i + 2);
        env.add_netns(&format!("p{i}"), &[&format!("{ip}/32")]);
        workloads.push_str(&format!(
            "  - {{ name: p{i}, serviceAccount: sa{i}, node: n1, ips: [{ip}] }}\n"
        ));
    }
    let yaml = format!(
        "namespaces: [{{ name: default, labels: {{ istio.io/dataplane-mode: ambient }} }}]\n\
         workloads:\n{workloads}"
    );
    let datapath = env.datapath();
    let (_state_tx, state_rx) = watch::channel(state(&yaml));
    let snapshot = state_rx.borrow().clone();
    let most = Arc::new(AtomicUsize::new(0));
    let slow = {
        let most = most.clone();
        move |inner| -> Arc<dyn Signer> {
            Arc::new(SlowSigner {
                inner,
                in_flight: AtomicUsize::new(0),
                most,
            })
        }
    };
    let proxy = proxy_signing_with(&env, &datapath, state_rx, slow);
    let mut manager = InpodManager::new(datapath.clone(), proxy.clone(), env.finder());
    assert!(manager.reconcile(&snapshot).await.is_empty());
    assert_eq!(manager.wired(), 4);
    assert_eq!(
        most.load(Ordering::SeqCst),
        4,
        "four identities, signed concurrently"
    );
    // Each identity is held once, by its pod: the prefetch let go of its own references.
    for i in 0..4 {
        let id = Identity::new("cluster.local", "default", format!("sa{i}"));
        assert!(proxy.certs.current(&id).is_some());
        proxy.certs.release(&id);
        assert!(
            proxy.certs.current(&id).is_none(),
            "sa{i} had one reference left"
        );
    }
    manager.unwire_all();
}

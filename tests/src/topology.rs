//! A Kubernetes-like cluster made of network namespaces, bridges, veth pairs and a private cgroup
//! v2 subtree, plus a private bpffs.
//!
//! ```text
//!                       fabric netns "<prefix>-fabric": bridge br0 (no address)
//!              vn1 |                                     | vn2
//!   node netns "<prefix>-n-node1"              node netns "<prefix>-n-node2"
//!     eth0 192.168.200.1/24 fd00:200::1/64       eth0 192.168.200.2/24 fd00:200::2/64
//!     podbr0 10.20.1.1/24 fd00:20:1::1/64        podbr0 10.20.2.1/24 fd00:20:2::1/64
//!     route 10.20.2.0/24 via 192.168.200.2       route 10.20.1.0/24 via 192.168.200.1
//!      vp2 |          vp3 |                        vp2 |
//!   pod "<prefix>-p-a"  pod "<prefix>-p-b"       pod "<prefix>-p-c"
//!     eth0 10.20.1.2      eth0 10.20.1.3           eth0 10.20.2.2   (and fd00:20:N::M/64)
//! ```
//!
//! Nothing is created in the host's network namespace and no host sysctl is touched: veth pairs
//! are created inside the fabric/node namespaces with their peer placed straight into the target
//! namespace, and sysctls are written by a helper thread that has verifiably joined the namespace.
//!
//! Every name carries the prefix `mt<owner pid>x<counter>`; `Drop` removes everything, and
//! [`sweep_stale`] (called by every [`Topology::new`]) removes what earlier, killed runs left.

use crate::process::Placement;
use crate::sys;
use anyhow::{anyhow, bail, ensure, Context, Result};
use std::collections::BTreeSet;
use std::fs;
use std::io::{Read, Write};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpStream, ToSocketAddrs};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Mutex, MutexGuard};
use std::time::Duration;

pub use crate::process::{Proc, Stdio2, KILL_GRACE};
pub use crate::sys::in_netns;

/// Fabric bridge name inside the fabric namespace.
pub const FABRIC_BRIDGE: &str = "br0";
/// A node's uplink to the fabric (inside the node namespace).
pub const NODE_UPLINK: &str = "eth0";
/// A node's pod bridge (inside the node namespace).
pub const POD_BRIDGE: &str = "podbr0";
/// A pod's interface (inside the pod namespace).
pub const POD_IFACE: &str = "eth0";

/// Timeout for [`Topology::run_in_node`] / [`Topology::run_in_pod`].
pub const RUN_TIMEOUT: Duration = Duration::from_secs(60);

static COUNTER: AtomicU32 = AtomicU32::new(0);
static SWEEP_LOCK: Mutex<()> = Mutex::new(());

/// Blocks [`sweep_stale`] while the guard lives, in this process and in every other one (a test
/// re-executes its own binary, and its `Topology::new` sweeps too). For tests that fabricate
/// stale leftovers and must not have a concurrent sweep remove them half-built.
pub fn hold_sweeps() -> SweepGuard {
    let thread = SWEEP_LOCK.lock().unwrap_or_else(|e| e.into_inner());
    // Across processes: an exclusive flock on the directory the prefixes live in (released by
    // the kernel when the holder dies, so a killed test cannot wedge the others). Nothing is
    // created for it.
    let process = std::fs::File::open(tmp_root())
        .and_then(|dir| dir.lock().map(|()| dir))
        .ok();
    SweepGuard {
        _process: process,
        _thread: thread,
    }
}

/// See [`hold_sweeps`].
pub struct SweepGuard {
    _process: Option<std::fs::File>,
    _thread: MutexGuard<'static, ()>,
}

/// A node: its own network namespace, attached to the fabric, with a pod bridge.
#[derive(Debug, Clone)]
pub struct Node {
    pub name: String,
    /// 1-based index N: fabric IPs 192.168.200.N / fd00:200::N, pod CIDRs 10.20.N.0/24 / fd00:20:N::/64.
    pub index: u8,
    /// `ip netns` name.
    pub netns: String,
    /// `/var/run/netns/<netns>`.
    pub netns_path: PathBuf,
    pub ip4: Ipv4Addr,
    pub ip6: Ipv6Addr,
    /// Pod gateway on the node's pod bridge: 10.20.N.1 / fd00:20:N::1.
    pub gateway4: Ipv4Addr,
    pub gateway6: Ipv6Addr,
    /// `<cgroup2>/<prefix>/<node>`: attach the node's cgroup programs here.
    pub cgroup_root: PathBuf,
    /// `<cgroup2>/<prefix>/<node>/agent`: processes from `spawn_in_node` / `run_in_node`.
    pub agent_cgroup: PathBuf,
    /// `<bpffs>/<node>`: not created; the agent creates it.
    pub pin_dir: PathBuf,
    next_pod_octet: u8,
}

/// A pod: a network namespace with a veth into its node's pod bridge, and its own cgroup.
#[derive(Debug, Clone)]
pub struct Pod {
    pub name: String,
    /// Name of the node the pod runs on.
    pub node: String,
    pub netns: String,
    pub netns_path: PathBuf,
    pub ip4: Ipv4Addr,
    pub ip6: Ipv6Addr,
    /// Interface name of the pod's veth peer inside the node namespace (`vp<M>`).
    pub node_veth: String,
    /// `<cgroup2>/<prefix>/<node>/pods/<pod>`.
    pub cgroup: PathBuf,
}

/// The whole cluster. Dropping it removes everything it created (also while unwinding a panic):
/// processes first, then network namespaces, cgroups (leaf first), the bpffs mount, temp dirs.
pub struct Topology {
    prefix: String,
    cgroup2: PathBuf,
    cgroup_base: PathBuf,
    tmp_dir: PathBuf,
    bpffs: PathBuf,
    work_dir: PathBuf,
    fabric_netns: String,
    fabric_netns_path: PathBuf,
    nodes: Vec<Node>,
    pods: Vec<Pod>,
}

impl std::fmt::Debug for Topology {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Topology")
            .field("prefix", &self.prefix)
            .field("nodes", &self.nodes)
            .field("pods", &self.pods)
            .finish()
    }
}

fn check_name(kind: &str, name: &str) -> Result<()> {
    ensure!(
        !name.is_empty()
            && name.len() <= 40
            && name
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
            && !name.starts_with('-'),
        "invalid {kind} name {name:?}: use 1-40 chars of [a-z0-9-]"
    );
    ensure!(
        !matches!(name, "pods" | "agent"),
        "{kind} name {name:?} is reserved"
    );
    Ok(())
}

/// Splits a name like `mt123x4-n-node1` into (`mt123x4`, 123).
pub fn parse_prefix(name: &str) -> Option<(String, u32)> {
    let rest = name.strip_prefix("mt")?;
    let x = rest.find('x')?;
    let pid: u32 = rest[..x].parse().ok()?;
    let after = &rest[x + 1..];
    let end = after.find('-').unwrap_or(after.len());
    let counter = &after[..end];
    if counter.is_empty() || !counter.bytes().all(|b| b.is_ascii_digit()) || rest[..x].is_empty() {
        return None;
    }
    if !rest[..x].bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    Some((format!("mt{pid}x{counter}"), pid))
}

/// True if `name` is the prefix itself or starts with `<prefix>-`.
fn has_prefix(name: &str, prefix: &str) -> bool {
    name == prefix
        || name
            .strip_prefix(prefix)
            .is_some_and(|rest| rest.starts_with('-'))
}

fn tmp_root() -> PathBuf {
    PathBuf::from("/tmp")
}

impl Topology {
    /// Builds a cluster: `[("node1", &["client", "server"]), ("node2", &["remote"])]`.
    pub fn new(spec: &[(&str, &[&str])]) -> Result<Topology> {
        sweep_stale();
        let cgroup2 = sys::cgroup2_mount()?;
        let prefix = format!(
            "mt{}x{}",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::SeqCst)
        );
        let tmp_dir = tmp_root().join(&prefix);
        let mut topo = Topology {
            cgroup_base: cgroup2.join(&prefix),
            cgroup2,
            bpffs: tmp_dir.join("bpffs"),
            work_dir: tmp_dir.join("work"),
            tmp_dir,
            fabric_netns: format!("{prefix}-fabric"),
            fabric_netns_path: PathBuf::new(),
            prefix,
            nodes: Vec::new(),
            pods: Vec::new(),
        };
        // From here on, an error drops `topo`, which removes whatever was created.
        topo.build(spec)
            .with_context(|| format!("building topology {}", topo.prefix))?;
        Ok(topo)
    }

    fn build(&mut self, spec: &[(&str, &[&str])]) -> Result<()> {
        fs::create_dir(&self.tmp_dir)
            .with_context(|| format!("creating {}", self.tmp_dir.display()))?;
        fs::create_dir(&self.bpffs)?;
        fs::create_dir(&self.work_dir)?;
        sys::mount_bpffs(&self.bpffs)?;
        fs::create_dir(&self.cgroup_base)
            .with_context(|| format!("creating cgroup {}", self.cgroup_base.display()))?;

        self.fabric_netns_path = sys::netns_add(&self.fabric_netns)?;
        sys::netns_sysctls(&self.fabric_netns_path, NO_DAD)?;
        sys::ip(
            &["-n", &self.fabric_netns, "-batch", "-"],
            Some(&format!(
                "link set lo up\nlink add {FABRIC_BRIDGE} type bridge\nlink set {FABRIC_BRIDGE} up\n"
            )),
        )?;
        for (node, _) in spec {
            self.add_node(node)?;
        }
        for (node, pods) in spec {
            for pod in pods.iter() {
                self.add_pod(node, pod)?;
            }
        }
        Ok(())
    }

    /// Adds a node (with routes to and from every existing node).
    pub fn add_node(&mut self, name: &str) -> Result<()> {
        check_name("node", name)?;
        ensure!(
            self.nodes.iter().all(|n| n.name != name),
            "node {name} exists"
        );
        ensure!(self.nodes.len() < 250, "too many nodes");
        let index = self.nodes.len() as u8 + 1;
        let netns = format!("{}-n-{name}", self.prefix);
        let cgroup_root = self.cgroup_base.join(name);
        let node = Node {
            name: name.to_owned(),
            index,
            netns_path: Path::new(sys::NETNS_DIR).join(&netns),
            netns,
            ip4: Ipv4Addr::new(192, 168, 200, index),
            ip6: Ipv6Addr::new(0xfd00, 0x200, 0, 0, 0, 0, 0, index.into()),
            gateway4: Ipv4Addr::new(10, 20, index, 1),
            gateway6: Ipv6Addr::new(0xfd00, 0x20, index.into(), 0, 0, 0, 0, 1),
            agent_cgroup: cgroup_root.join("agent"),
            cgroup_root,
            pin_dir: self.bpffs.join(name),
            next_pod_octet: 2,
        };
        fs::create_dir(&node.cgroup_root)
            .with_context(|| format!("creating {}", node.cgroup_root.display()))?;
        fs::create_dir(node.cgroup_root.join("pods"))?;
        fs::create_dir(&node.agent_cgroup)?;
        sys::netns_add(&node.netns)?;
        sys::netns_sysctls(
            &node.netns_path,
            &[
                ("net/ipv6/conf/all/accept_dad", "0"),
                ("net/ipv6/conf/default/accept_dad", "0"),
                ("net/ipv4/ip_forward", "1"),
                ("net/ipv6/conf/all/forwarding", "1"),
            ],
        )?;
        let vn = format!("vn{index}");
        sys::ip(
            &["-n", &self.fabric_netns, "-batch", "-"],
            Some(&format!(
                "link add {vn} type veth peer name {NODE_UPLINK} netns {}\n\
                 link set {vn} master {FABRIC_BRIDGE}\n\
                 link set {vn} up\n",
                node.netns
            )),
        )?;
        let mut batch = format!(
            "link set lo up\n\
             link set {NODE_UPLINK} up\n\
             addr add {}/24 dev {NODE_UPLINK}\n\
             addr add {}/64 dev {NODE_UPLINK} nodad\n\
             link add {POD_BRIDGE} type bridge\n\
             link set {POD_BRIDGE} up\n\
             addr add {}/24 dev {POD_BRIDGE}\n\
             addr add {}/64 dev {POD_BRIDGE} nodad\n",
            node.ip4, node.ip6, node.gateway4, node.gateway6
        );
        for other in &self.nodes {
            batch += &routes_to(other);
            sys::ip(
                &["-n", &other.netns, "-batch", "-"],
                Some(&routes_to(&node)),
            )?;
        }
        sys::ip(&["-n", &node.netns, "-batch", "-"], Some(&batch))?;
        self.nodes.push(node);
        Ok(())
    }

    /// Adds a pod to a node: netns, veth into the node's pod bridge, addresses, default routes,
    /// cgroup. Cheap enough for scale tests (three `ip` invocations).
    pub fn add_pod(&mut self, node: &str, pod: &str) -> Result<()> {
        check_name("pod", pod)?;
        ensure!(self.pods.iter().all(|p| p.name != pod), "pod {pod} exists");
        let prefix = self.prefix.clone();
        let n = self
            .nodes
            .iter_mut()
            .find(|n| n.name == node)
            .ok_or_else(|| anyhow!("no node {node}"))?;
        ensure!(
            n.next_pod_octet < 255,
            "node {node} has no free pod address"
        );
        let m = n.next_pod_octet;
        n.next_pod_octet += 1;
        let n = n.clone();
        let netns = format!("{prefix}-p-{pod}");
        let p = Pod {
            name: pod.to_owned(),
            node: node.to_owned(),
            netns_path: Path::new(sys::NETNS_DIR).join(&netns),
            netns,
            ip4: Ipv4Addr::new(10, 20, n.index, m),
            ip6: Ipv6Addr::new(0xfd00, 0x20, n.index.into(), 0, 0, 0, 0, m.into()),
            node_veth: format!("vp{m}"),
            cgroup: n.cgroup_root.join("pods").join(pod),
        };
        fs::create_dir(&p.cgroup).with_context(|| format!("creating {}", p.cgroup.display()))?;
        sys::netns_add(&p.netns)?;
        // Register before configuring so that a failure below is still cleaned up by name.
        self.pods.push(p.clone());
        sys::netns_sysctls(&p.netns_path, NO_DAD)?;
        sys::ip(
            &["-n", &n.netns, "-batch", "-"],
            Some(&format!(
                "link add {v} type veth peer name {POD_IFACE} netns {ns}\n\
                 link set {v} master {POD_BRIDGE}\n\
                 link set {v} up\n",
                v = p.node_veth,
                ns = p.netns
            )),
        )?;
        sys::ip(
            &["-n", &p.netns, "-batch", "-"],
            Some(&format!(
                "link set lo up\n\
                 link set {POD_IFACE} up\n\
                 addr add {}/24 dev {POD_IFACE}\n\
                 addr add {}/64 dev {POD_IFACE} nodad\n\
                 route add default via {}\n\
                 route add ::/0 via {}\n",
                p.ip4, p.ip6, n.gateway4, n.gateway6
            )),
        )?;
        Ok(())
    }

    /// Removes a pod: kills its processes, deletes its netns (and so its veth) and its cgroup.
    pub fn remove_pod(&mut self, pod: &str) -> Result<()> {
        let idx = self
            .pods
            .iter()
            .position(|p| p.name == pod)
            .ok_or_else(|| anyhow!("no pod {pod}"))?;
        let p = self.pods.remove(idx);
        let ino = sys::ns_inode(&p.netns_path);
        let mut pids = sys::cgroup_pids(&p.cgroup);
        if let Some(ino) = ino {
            pids.extend(
                sys::all_pids()
                    .into_iter()
                    .filter(|&pid| sys::proc_netns_inode(pid) == Some(ino)),
            );
        }
        let cg = p.cgroup.clone();
        let failed = sys::terminate_pids(
            &pids,
            |pid| {
                sys::proc_netns_inode(pid).is_some_and(|i| Some(i) == ino)
                    || sys::cgroup_pids(&cg).contains(&pid)
            },
            Duration::from_secs(2),
        );
        ensure!(failed.is_empty(), "removing pod {pod}: {failed:?}");
        sys::netns_del(&p.netns)?;
        sys::remove_cgroup_tree(&p.cgroup, Duration::from_secs(5))?;
        Ok(())
    }

    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// The cgroup2 mount point (detected from /proc/mounts).
    pub fn cgroup2_mount(&self) -> &Path {
        &self.cgroup2
    }

    /// `<cgroup2>/<prefix>`: the topology's private cgroup subtree.
    pub fn cgroup_base(&self) -> &Path {
        &self.cgroup_base
    }

    /// The private bpffs mount point of this topology.
    pub fn bpffs(&self) -> &Path {
        &self.bpffs
    }

    /// A scratch directory (config files, logs) removed with the topology.
    pub fn work_dir(&self) -> &Path {
        &self.work_dir
    }

    pub fn fabric_netns(&self) -> &str {
        &self.fabric_netns
    }

    pub fn fabric_netns_path(&self) -> &Path {
        &self.fabric_netns_path
    }

    /// Panics if there is no such node.
    pub fn node(&self, name: &str) -> &Node {
        self.nodes
            .iter()
            .find(|n| n.name == name)
            .unwrap_or_else(|| panic!("topology {} has no node {name:?}", self.prefix))
    }

    /// Panics if there is no such pod.
    pub fn pod(&self, name: &str) -> &Pod {
        self.pods
            .iter()
            .find(|p| p.name == name)
            .unwrap_or_else(|| panic!("topology {} has no pod {name:?}", self.prefix))
    }

    pub fn nodes(&self) -> impl Iterator<Item = &Node> {
        self.nodes.iter()
    }

    pub fn pods(&self) -> impl Iterator<Item = &Pod> {
        self.pods.iter()
    }

    /// Pods of one node.
    pub fn pods_on<'a>(&'a self, node: &'a str) -> impl Iterator<Item = &'a Pod> + 'a {
        self.pods.iter().filter(move |p| p.node == node)
    }

    fn placement_pod(&self, pod: &str) -> Result<Placement> {
        let p = self.pod(pod);
        Placement::new(&p.netns_path, Some(&p.cgroup), &self.prefix)
    }

    fn placement_node(&self, node: &str) -> Result<Placement> {
        let n = self.node(node);
        Placement::new(&n.netns_path, Some(&n.agent_cgroup), &self.prefix)
    }

    /// Spawns `cmd` inside a pod: the child joins the pod's cgroup and network namespace before
    /// exec. stdin is /dev/null; stdout/stderr are captured.
    pub fn spawn_in_pod(&self, pod: &str, cmd: Command) -> Result<Proc> {
        self.placement_pod(pod)?
            .spawn(cmd)
            .with_context(|| format!("in pod {pod}"))
    }

    /// Spawns `cmd` on a node: the child joins the node's agent cgroup and the node network
    /// namespace (by `setns`, so it still sees the host's /sys, cgroup2 and bpffs mounts).
    pub fn spawn_in_node(&self, node: &str, cmd: Command) -> Result<Proc> {
        self.placement_node(node)?
            .spawn(cmd)
            .with_context(|| format!("on node {node}"))
    }

    /// Runs a short command on a node (agent cgroup + node netns) and returns its output.
    /// Killed after [`RUN_TIMEOUT`].
    pub fn run_in_node(&self, node: &str, args: &[&str]) -> Result<Output> {
        let (prog, rest) = args.split_first().context("empty command")?;
        let mut cmd = Command::new(prog);
        cmd.args(rest);
        self.placement_node(node)?.run(cmd, RUN_TIMEOUT)
    }

    /// Runs a short command inside a pod (pod cgroup + pod netns) and returns its output.
    pub fn run_in_pod(&self, pod: &str, args: &[&str]) -> Result<Output> {
        let (prog, rest) = args.split_first().context("empty command")?;
        let mut cmd = Command::new(prog);
        cmd.args(rest);
        self.placement_pod(pod)?.run(cmd, RUN_TIMEOUT)
    }

    /// Runs `f` on a helper thread inside a node's network namespace (the thread stays in the
    /// test's cgroup, so cgroup eBPF programs attached for pods do not apply to it).
    pub fn in_node_netns<T: Send>(
        &self,
        node: &str,
        f: impl FnOnce() -> Result<T> + Send,
    ) -> Result<T> {
        sys::in_netns(&self.node(node).netns_path, f)
    }

    /// Like [`Topology::in_node_netns`] for a pod's network namespace.
    pub fn in_pod_netns<T: Send>(
        &self,
        pod: &str,
        f: impl FnOnce() -> Result<T> + Send,
    ) -> Result<T> {
        sys::in_netns(&self.pod(pod).netns_path, f)
    }

    /// Describes everything carrying `prefix` that still exists: network namespaces, cgroup
    /// dirs, mounts, temp dirs and live processes (in the cgroups or namespaces, or carrying the
    /// owner marker in their environment). Empty after a clean teardown.
    pub fn leftovers(prefix: &str) -> Vec<String> {
        let mut out = Vec::new();
        let netns: Vec<String> = sys::netns_names()
            .into_iter()
            .filter(|n| has_prefix(n, prefix))
            .collect();
        let inodes: BTreeSet<u64> = netns
            .iter()
            .filter_map(|n| sys::ns_inode(&Path::new(sys::NETNS_DIR).join(n)))
            .collect();
        for n in &netns {
            out.push(format!("netns {n}"));
        }
        let cg = sys::cgroup2_mount().ok().map(|m| m.join(prefix));
        let cg_pids = cg.as_deref().map(sys::cgroup_pids).unwrap_or_default();
        if let Some(cg) = &cg {
            for d in sys::cgroup_dirs_leaf_first(cg) {
                out.push(format!("cgroup {}", d.display()));
            }
        }
        for m in sys::mount_points() {
            if mount_matches(&m, prefix) {
                out.push(format!("mount {}", m.display()));
            }
        }
        let tmp = tmp_root().join(prefix);
        if tmp.exists() {
            out.push(format!("dir {}", tmp.display()));
        }
        for pid in owned_pids(prefix, &cg_pids, &inodes) {
            out.push(format!("process {pid} ({})", sys::proc_comm(pid)));
        }
        out
    }
}

/// `(net.ipv6.conf.{all,default}.accept_dad = 0)`: addresses are usable at once.
const NO_DAD: &[(&str, &str)] = &[
    ("net/ipv6/conf/all/accept_dad", "0"),
    ("net/ipv6/conf/default/accept_dad", "0"),
];

fn routes_to(n: &Node) -> String {
    format!(
        "route add 10.20.{i}.0/24 via {ip4}\nroute add fd00:20:{i:x}::/64 via {ip6}\n",
        i = n.index,
        ip4 = n.ip4,
        ip6 = n.ip6
    )
}

fn mount_matches(m: &Path, prefix: &str) -> bool {
    m.components().any(|c| {
        c.as_os_str()
            .to_str()
            .is_some_and(|s| has_prefix(s, prefix))
    })
}

/// Live processes (not us, not zombies) that belong to `prefix`.
fn owned_pids(prefix: &str, cg_pids: &BTreeSet<i32>, netns_inodes: &BTreeSet<u64>) -> Vec<i32> {
    let me = std::process::id() as i32;
    let mut pids: BTreeSet<i32> = cg_pids.clone();
    for pid in sys::all_pids() {
        if pid == me {
            continue;
        }
        if sys::proc_netns_inode(pid).is_some_and(|i| netns_inodes.contains(&i))
            || sys::proc_owner_marker(pid).as_deref() == Some(prefix)
        {
            pids.insert(pid);
        }
    }
    pids.into_iter()
        .filter(|&p| p != me && sys::pid_alive(p))
        .collect()
}

/// Removes everything carrying `prefix`: processes (SIGTERM, then SIGKILL), network namespaces,
/// the cgroup subtree (leaf first), mounts, and the temp dir. Returns what failed.
pub fn cleanup_prefix(prefix: &str) -> Vec<String> {
    let mut errors = Vec::new();
    let netns: Vec<String> = sys::netns_names()
        .into_iter()
        .filter(|n| has_prefix(n, prefix))
        .collect();
    let inodes: BTreeSet<u64> = netns
        .iter()
        .filter_map(|n| sys::ns_inode(&Path::new(sys::NETNS_DIR).join(n)))
        .collect();
    let cg = sys::cgroup2_mount().ok().map(|m| m.join(prefix));

    // 1. processes
    let cg_pids = cg.as_deref().map(sys::cgroup_pids).unwrap_or_default();
    let pids: BTreeSet<i32> = owned_pids(prefix, &cg_pids, &inodes).into_iter().collect();
    if !pids.is_empty() {
        let still_ours = |pid: i32| {
            sys::proc_owner_marker(pid).as_deref() == Some(prefix)
                || sys::proc_netns_inode(pid).is_some_and(|i| inodes.contains(&i))
                || cg
                    .as_deref()
                    .is_some_and(|c| sys::cgroup_pids(c).contains(&pid))
        };
        errors.extend(sys::terminate_pids(
            &pids,
            still_ours,
            Duration::from_millis(1500),
        ));
    }
    // 2. network namespaces (their veths and bridges go with them)
    for n in &netns {
        if let Err(e) = sys::netns_del(n) {
            errors.push(format!("{e:#}"));
        }
    }
    // 3. cgroups, leaf first
    if let Some(cg) = &cg {
        if let Err(e) = sys::remove_cgroup_tree(cg, Duration::from_secs(5)) {
            errors.push(format!("{e:#}"));
        }
    }
    // 4. mounts (bpffs, stray netns bind mounts), deepest first
    let mut mounts: Vec<PathBuf> = sys::mount_points()
        .into_iter()
        .filter(|m| mount_matches(m, prefix))
        .collect();
    mounts.sort_by_key(|m| std::cmp::Reverse(m.components().count()));
    mounts.dedup();
    for m in &mounts {
        // A path can be mounted more than once; unmount until it is gone.
        for _ in 0..8 {
            if sys::umount_detach(m).is_err() {
                break;
            }
        }
    }
    // 5. temp dir, only when nothing is mounted below it any more
    let tmp = tmp_root().join(prefix);
    if tmp.exists() {
        if sys::mount_points().iter().any(|m| m.starts_with(&tmp)) {
            errors.push(format!("{} still has mounts; not removed", tmp.display()));
        } else if let Err(e) = fs::remove_dir_all(&tmp) {
            errors.push(format!("removing {}: {e}", tmp.display()));
        }
    }
    errors
}

impl Drop for Topology {
    fn drop(&mut self) {
        let errors = cleanup_prefix(&self.prefix);
        if !errors.is_empty() {
            eprintln!(
                "mesh-tests: teardown of {} incomplete: {errors:?}",
                self.prefix
            );
        }
    }
}

/// Removes leftovers of earlier runs whose owner process is dead. Everything of ours carries
/// `mt<owner pid>x<counter>` in its name (netns, cgroup dir, temp dir, mounts) or in the
/// environment of its processes. Prefixes of live processes (including this one) are not touched.
/// Returns the prefixes that were swept.
pub fn sweep_stale() -> Vec<String> {
    let _guard = hold_sweeps();
    let mut candidates: BTreeSet<(String, u32)> = BTreeSet::new();
    let mut consider = |name: &str| {
        if let Some(p) = parse_prefix(name) {
            candidates.insert(p);
        }
    };
    for n in sys::netns_names() {
        consider(&n);
    }
    if let Ok(cg) = sys::cgroup2_mount() {
        if let Ok(rd) = fs::read_dir(cg) {
            for e in rd.flatten() {
                consider(&e.file_name().to_string_lossy());
            }
        }
    }
    if let Ok(rd) = fs::read_dir(tmp_root()) {
        for e in rd.flatten() {
            consider(&e.file_name().to_string_lossy());
        }
    }
    for m in sys::mount_points() {
        for c in m.components() {
            consider(&c.as_os_str().to_string_lossy());
        }
    }
    for pid in sys::all_pids() {
        if let Some(owner) = sys::proc_owner_marker(pid) {
            consider(&owner);
        }
    }
    let me = std::process::id();
    let mut swept = Vec::new();
    for (prefix, owner) in candidates {
        if owner == me || sys::pid_alive(owner as i32) {
            continue;
        }
        let errors = cleanup_prefix(&prefix);
        if !errors.is_empty() {
            eprintln!("mesh-tests: sweeping stale {prefix}: {errors:?}");
        }
        swept.push(prefix);
    }
    swept
}

/// Plain HTTP/1.1 GET from inside a node's network namespace (a helper thread joins the netns).
/// `addr` is `ip:port`; returns the status code and the body (chunked encoding is decoded).
pub fn http_get(topo: &Topology, node: &str, addr: &str, path: &str) -> Result<(u16, String)> {
    http_get_in(
        &topo.node(node).netns_path,
        addr,
        path,
        Duration::from_secs(10),
    )
}

/// Like [`http_get`], for any network namespace path.
pub fn http_get_in(
    netns_path: &Path,
    addr: &str,
    path: &str,
    timeout: Duration,
) -> Result<(u16, String)> {
    let addr = addr.to_owned();
    let path = path.to_owned();
    sys::in_netns(netns_path, move || http_get_here(&addr, &path, timeout))
}

/// HTTP GET in the calling thread's network namespace.
pub fn http_get_here(addr: &str, path: &str, timeout: Duration) -> Result<(u16, String)> {
    let sa: SocketAddr = addr
        .to_socket_addrs()?
        .next()
        .ok_or_else(|| anyhow!("cannot resolve {addr}"))?;
    let mut s = TcpStream::connect_timeout(&sa, timeout)
        .with_context(|| format!("connecting to {addr}"))?;
    s.set_read_timeout(Some(timeout))?;
    s.set_write_timeout(Some(timeout))?;
    let host = match sa.ip() {
        IpAddr::V6(_) => format!("[{}]:{}", sa.ip(), sa.port()),
        IpAddr::V4(_) => sa.to_string(),
    };
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {host}\r\nUser-Agent: mesh-tests\r\nAccept: */*\r\nConnection: close\r\n\r\n"
    )?;
    let mut raw = Vec::new();
    s.read_to_end(&mut raw)
        .with_context(|| format!("reading response from {addr}{path}"))?;
    parse_http_response(&raw)
}

fn parse_http_response(raw: &[u8]) -> Result<(u16, String)> {
    let end = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .ok_or_else(|| anyhow!("incomplete HTTP response ({} bytes)", raw.len()))?;
    let head = String::from_utf8_lossy(&raw[..end]);
    let mut lines = head.split("\r\n");
    let status_line = lines.next().unwrap_or_default();
    let code: u16 = status_line
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| anyhow!("bad status line {status_line:?}"))?;
    let mut chunked = false;
    let mut length = None;
    for l in lines {
        if let Some((k, v)) = l.split_once(':') {
            let (k, v) = (k.trim().to_ascii_lowercase(), v.trim());
            if k == "transfer-encoding" && v.to_ascii_lowercase().contains("chunked") {
                chunked = true;
            } else if k == "content-length" {
                length = v.parse::<usize>().ok();
            }
        }
    }
    let mut body = &raw[end + 4..];
    let decoded;
    if chunked {
        decoded = dechunk(body)?;
        body = &decoded;
    } else if let Some(len) = length {
        ensure!(body.len() >= len, "truncated body: {} < {len}", body.len());
        body = &body[..len];
    }
    Ok((code, String::from_utf8_lossy(body).into_owned()))
}

fn dechunk(mut b: &[u8]) -> Result<Vec<u8>> {
    let mut out = Vec::new();
    loop {
        let nl = b
            .windows(2)
            .position(|w| w == b"\r\n")
            .ok_or_else(|| anyhow!("bad chunk header"))?;
        let size_str = String::from_utf8_lossy(&b[..nl]);
        let size_str = size_str.split(';').next().unwrap_or_default().trim();
        let size = usize::from_str_radix(size_str, 16)
            .map_err(|_| anyhow!("bad chunk size {size_str:?}"))?;
        b = &b[nl + 2..];
        if size == 0 {
            return Ok(out);
        }
        if b.len() < size {
            bail!("truncated chunk");
        }
        out.extend_from_slice(&b[..size]);
        b = b.get(size + 2..).unwrap_or_default();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefixes() {
        assert_eq!(parse_prefix("mt12x3"), Some(("mt12x3".into(), 12)));
        assert_eq!(parse_prefix("mt12x3-n-node1"), Some(("mt12x3".into(), 12)));
        assert_eq!(parse_prefix("mtx3"), None);
        assert_eq!(parse_prefix("mt12x"), None);
        assert_eq!(parse_prefix("mt12x3a"), None);
        assert_eq!(parse_prefix("other"), None);
        assert!(has_prefix("mt1x2-p-a", "mt1x2"));
        assert!(!has_prefix("mt1x23-p-a", "mt1x2"));
    }

    #[test]
    fn http_parsing() {
        let r = b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\nhello";
        assert_eq!(parse_http_response(r).unwrap(), (200, "hello".into()));
        let r = b"HTTP/1.1 404 Not Found\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n";
        assert_eq!(parse_http_response(r).unwrap(), (404, "abcde".into()));
    }
}

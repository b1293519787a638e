//! Loading, attaching, pinning and tearing down the datapath.
use std::{
    collections::{BTreeMap, BTreeSet},
    fs::{self, File},
    io,
    net::IpAddr,
    os::fd::BorrowedFd,
    path::{Path, PathBuf},
    sync::Mutex,
};

use aya::{
    programs::{
        links::{FdLink, PinnedLink},
        CgroupAttachMode, CgroupSockAddr, SkLookup, SockOps,
    },
    Ebpf, EbpfLoader,
};
use mesh_common::{
    Enrolled, MAX_EXCLUDED_PORTS, PROG_CONNECT4, PROG_CONNECT6, PROG_PEERNAME4, PROG_PEERNAME6,
    PROG_SKLOOKUP, PROG_SOCKNAME4, PROG_SOCKNAME6, PROG_SOCKOPS,
};
use tracing::{debug, info};

use super::{
    fsutil, links,
    maps::{
        self, entries, is_not_found, listener_key, lock, map_error, typed, typed_sock_hash,
        EnrolledMap, ExclPortsMap, InboundMap, MapSpec, OrigDstTable, SockDstMap, COUNTERS,
        EBPF_LOG, ENROLLED, EXCL_PORTS, INBOUND, ORIG_DST, SOCK_DST,
    },
    DatapathConfig, DatapathError,
};

/// The eBPF object built by `build.rs` from `mesh-ebpf`.
fn object() -> &'static [u8] {
    aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/mesh-ebpf"))
}

/// The maps in the order they are pinned (`mesh_common::PINNED_MAPS`).
const MAP_SPECS: [&MapSpec; 7] = [
    &ENROLLED,
    &SOCK_DST,
    &ORIG_DST,
    &EXCL_PORTS,
    &INBOUND,
    &COUNTERS,
    &EBPF_LOG,
];

#[derive(Clone, Copy)]
enum Hook {
    SockAddr,
    SockOps,
}

/// Attach order: the programs that only read records first, connect4/6 (which start redirecting)
/// last. Detached in reverse.
const PROGRAMS: [(&str, Hook); 7] = [
    (PROG_SOCKOPS, Hook::SockOps),
    (PROG_PEERNAME4, Hook::SockAddr),
    (PROG_PEERNAME6, Hook::SockAddr),
    (PROG_SOCKNAME4, Hook::SockAddr),
    (PROG_SOCKNAME6, Hook::SockAddr),
    (PROG_CONNECT4, Hook::SockAddr),
    (PROG_CONNECT6, Hook::SockAddr),
];

/// How [`Datapath::load`] found the pin directory.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Adopted {
    /// Maps pinned by a previous agent, now shared with our programs.
    pub maps: usize,
    /// Pinned links of a previous agent replaced by ours.
    pub programs: usize,
    /// Network namespaces whose pinned `mesh_sklookup` link a previous agent left.
    pub inbound: usize,
}

/// A pod's `mesh_sklookup` link.
#[derive(Debug)]
struct InboundLink {
    /// Held so the link cannot go while we run; pinned, so it stays when we exit.
    _link: PinnedLink,
    /// Attached by this agent (false: left by a previous one, not yet re-attached).
    current: bool,
}

/// The loaded and attached datapath. See the [module documentation](super).
pub struct Datapath {
    /// Attached (pinned) programs, in attach order.
    links: Mutex<Vec<(&'static str, PinnedLink)>>,
    /// `mesh_sklookup` links by network namespace cookie.
    inbound_links: Mutex<BTreeMap<u64, InboundLink>>,
    /// What a previous agent left that this one took over.
    adopted: Adopted,
    /// `INBOUND_LSN`: pod address -> inbound plaintext listener.
    inbound: Mutex<InboundMap>,
    enrolled: Mutex<EnrolledMap>,
    /// Kept so the socket-cookie map's descriptor lives as long as the datapath.
    _sock_dst: SockDstMap,
    excl_ports: Mutex<ExclPortsMap>,
    orig_dst: OrigDstTable,
    counters: maps::CountersMap,
    logger: Mutex<Option<super::log::EbpfLog>>,
    /// Owns the loaded programs; dropped after the links. Locked to attach `mesh_sklookup` to
    /// another network namespace (always after `inbound_links`).
    ebpf: Mutex<Ebpf>,
    cgroup_root: PathBuf,
    pin_dir: PathBuf,
    /// `flock` on the pin directory: one agent per pin directory. `None` once handed over.
    pin_lock: Mutex<Option<nix::fcntl::Flock<File>>>,
}

impl std::fmt::Debug for Datapath {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Datapath")
            .field("cgroup_root", &self.cgroup_root)
            .field("pin_dir", &self.pin_dir)
            .field(
                "programs",
                &lock(&self.links)
                    .iter()
                    .map(|(name, _)| *name)
                    .collect::<Vec<_>>(),
            )
            .field("inbound_attached", &self.inbound_attached())
            .finish_non_exhaustive()
    }
}

/// Removes what a failed [`Datapath::load`] pinned itself (never what a previous agent left:
/// that stays in force), so a failed start leaves nothing new behind.
struct PinCleanup<'a> {
    dir: &'a Path,
    pinned: Vec<PathBuf>,
    armed: bool,
}

impl Drop for PinCleanup<'_> {
    fn drop(&mut self) {
        if self.armed {
            for path in &self.pinned {
                let _ = fs::remove_file(path);
            }
            let _ = fs::remove_dir(self.dir);
        }
    }
}

impl Datapath {
    /// The programs' log records, to be forwarded by [`super::log::forward`] (once).
    pub fn take_log(&self) -> Option<super::log::EbpfLog> {
        lock(&self.logger).take()
    }

    /// The programs' event counters, summed over the CPUs: `(event, count)` for each of
    /// `mesh_common::COUNTER_NAMES`. They live in the pinned map, so they continue across agent
    /// restarts and upgrades.
    pub fn event_counts(&self) -> Result<Vec<(&'static str, u64)>, DatapathError> {
        mesh_common::COUNTER_NAMES
            .iter()
            .enumerate()
            .map(|(i, name)| {
                let per_cpu = self
                    .counters
                    .get(&(i as u32), 0)
                    .map_err(|e| map_error(&COUNTERS, e))?;
                Ok((*name, per_cpu.iter().sum()))
            })
            .collect()
    }

    /// Loads the programs, pins the maps under `cfg.pin_dir`, writes the excluded ports and
    /// attaches the cgroup programs to `cfg.cgroup_root` with links pinned under
    /// `<pin dir>/links`, so they stay attached after the agent exits (fail closed).
    ///
    /// What a previous agent left there is taken over without a gap: its pinned maps are
    /// reused by our programs (entries and all), and each of its pinned links is replaced by
    /// ours only once ours is attached. Its pods' `mesh_sklookup` links stay until
    /// [`Datapath::attach_inbound`] replaces them or [`Datapath::prune`] removes them.
    ///
    /// On error nothing new stays attached or pinned, and what a previous agent left stays.
    pub fn load(cfg: &DatapathConfig) -> Result<Datapath, DatapathError> {
        let object = object();
        if object.is_empty() {
            return Err(DatapathError::NoEbpfObject);
        }
        let excluded = excluded_set(&cfg.excluded_ports)?;

        let cgroup = open_cgroup_root(&cfg.cgroup_root)?;
        prepare_pin_dir(&cfg.pin_dir)?;
        let pin_lock = fsutil::try_lock_dir(&cfg.pin_dir)
            .map_err(|e| DatapathError::io("locking pin directory", &cfg.pin_dir, e))?
            .ok_or_else(|| DatapathError::PinDirBusy {
                path: cfg.pin_dir.clone(),
            })?;

        let mut cleanup = PinCleanup {
            dir: &cfg.pin_dir,
            pinned: Vec::new(),
            armed: true,
        };
        let mut adopted = Adopted::default();
        let mut loader = EbpfLoader::new();
        for spec in MAP_SPECS {
            let path = cfg.pin_dir.join(spec.name);
            if fs::symlink_metadata(&path).is_ok() {
                // Reused as it is by our programs: refuse one of another layout before anything
                // is attached (what the previous agent left stays in force meanwhile).
                check_pinned_map(spec, &path).map_err(|reason| DatapathError::Adopt {
                    pin_dir: cfg.pin_dir.clone(),
                    reason,
                })?;
                adopted.maps += 1;
            } else {
                cleanup.pinned.push(path.clone());
            }
            // Reused when pinned, else created and pinned there.
            loader.map_pin_path(spec.name, path);
        }
        let mut ebpf = loader.load(object).map_err(|e| {
            if adopted.maps > 0 {
                DatapathError::Adopt {
                    pin_dir: cfg.pin_dir.clone(),
                    reason: format!("loading our programs with its maps failed: {e}"),
                }
            } else {
                DatapathError::Object(e)
            }
        })?;
        let mut take = |spec: &MapSpec| {
            ebpf.take_map(spec.name).ok_or(DatapathError::MissingMap {
                name: spec.name,
                reason: "not in the object".into(),
            })
        };
        let enrolled: EnrolledMap = typed(&ENROLLED, take(&ENROLLED)?)?;
        let sock_dst: SockDstMap = typed(&SOCK_DST, take(&SOCK_DST)?)?;
        // Every handle the proxy will use, opened before anything is attached: a failure here
        // leaves nothing new in force.
        let orig_dst = orig_dst_table(
            typed(&ORIG_DST, take(&ORIG_DST)?)?,
            &cfg.pin_dir.join(ORIG_DST.name),
        )?;
        let mut excl_ports: ExclPortsMap = typed(&EXCL_PORTS, take(&EXCL_PORTS)?)?;
        let inbound = typed_sock_hash(&INBOUND, take(&INBOUND)?)?;
        let counters =
            maps::CountersMap::try_from(take(&COUNTERS)?).map_err(|e| map_error(&COUNTERS, e))?;
        let mut ebpf_log =
            maps::EbpfLogMap::try_from(take(&EBPF_LOG)?).map_err(|e| map_error(&EBPF_LOG, e))?;
        // Off at every start: `mesh-agent ebpf-log on` switches it on while the agent runs.
        ebpf_log.set(0, 0, 0).map_err(|e| map_error(&EBPF_LOG, e))?;
        // The programs' log records (ring buffer `AYA_LOGS`), read by `log::forward`.
        // A debug aid: the data path runs without it if it cannot be set up.
        let logger = match aya_log::EbpfLogger::init_with_logger(&mut ebpf, super::log::Forward) {
            Ok(logger) => Some(super::log::EbpfLog::new(logger)),
            Err(e) => {
                tracing::warn!(error = %e, "the eBPF programs' debug log is unavailable");
                None
            }
        };
        write_excluded_ports(&mut excl_ports, &excluded)?;

        // Loaded now, attached per network namespace by `attach_inbound`.
        sk_lookup_program(&mut ebpf)?
            .load()
            .map_err(|source| DatapathError::ProgramLoad {
                name: PROG_SKLOOKUP,
                error: source,
            })?;

        let mut links = Vec::with_capacity(PROGRAMS.len());
        for (name, hook) in PROGRAMS {
            let link = attach(&mut ebpf, name, hook, &cgroup, &cfg.cgroup_root)?;
            let path = links::program_pin(&cfg.pin_dir, name);
            let (pinned, replaced) = links::install(link, &path)?;
            if replaced {
                adopted.programs += 1;
            } else {
                cleanup.pinned.push(path);
            }
            links.push((name, pinned));
        }
        let mut inbound_links = BTreeMap::new();
        for cookie in links::pinned_sklookup_cookies(&cfg.pin_dir)? {
            adopted.inbound += 1;
            let path = links::sklookup_pin(&cfg.pin_dir, cookie);
            let link = PinnedLink::from_pin(&path).map_err(|e| DatapathError::Link {
                path: path.clone(),
                reason: format!("cannot open the pinned link: {e}"),
            })?;
            inbound_links.insert(
                cookie,
                InboundLink {
                    _link: link,
                    current: false,
                },
            );
        }

        cleanup.armed = false;
        if adopted == Adopted::default() {
            info!(
                cgroup_root = %cfg.cgroup_root.display(),
                pin_dir = %cfg.pin_dir.display(),
                excluded_ports = ?excluded,
                "datapath loaded: {} programs attached, {} maps pinned",
                links.len(),
                MAP_SPECS.len()
            );
        } else {
            info!(
                cgroup_root = %cfg.cgroup_root.display(),
                pin_dir = %cfg.pin_dir.display(),
                excluded_ports = ?excluded,
                maps = adopted.maps,
                programs = adopted.programs,
                inbound = adopted.inbound,
                "datapath taken over from a previous agent without detaching: its maps reused, \
                 its programs replaced by ours"
            );
        }
        Ok(Datapath {
            links: Mutex::new(links),
            inbound_links: Mutex::new(inbound_links),
            adopted,
            inbound: Mutex::new(inbound),
            enrolled: Mutex::new(enrolled),
            _sock_dst: sock_dst,
            excl_ports: Mutex::new(excl_ports),
            orig_dst,
            counters,
            logger: Mutex::new(logger),
            ebpf: Mutex::new(ebpf),
            cgroup_root: cfg.cgroup_root.clone(),
            pin_dir: cfg.pin_dir.clone(),
            pin_lock: Mutex::new(Some(pin_lock)),
        })
    }

    /// What a previous agent left that this one took over.
    pub fn adopted(&self) -> Adopted {
        self.adopted
    }

    /// Removes what the enrollment map and the pinned `mesh_sklookup` links hold for network
    /// namespaces `keep` rejects (a previous agent's pods that are no longer enrolled, or
    /// gone). Call it once the pods that should be wired are. Returns the workloads removed.
    pub fn prune(
        &self,
        keep: impl Fn(u64, &Enrolled) -> bool,
    ) -> Result<Vec<String>, DatapathError> {
        let mut removed = Vec::new();
        let enrolled = self.enrolled()?;
        for (cookie, value) in &enrolled {
            if !keep(*cookie, value) {
                self.unenroll(*cookie)?;
                self.detach_inbound(*cookie)?;
                removed.push(String::from_utf8_lossy(value.name_bytes()).into_owned());
            }
        }
        // Links of namespaces that are not enrolled at all.
        let stale: Vec<u64> = lock(&self.inbound_links)
            .keys()
            .copied()
            .filter(|c| !enrolled.iter().any(|(e, _)| e == c))
            .collect();
        for cookie in stale {
            self.detach_inbound(cookie)?;
        }
        Ok(removed)
    }

    /// Captures the outbound TCP of the network namespace with this cookie (see
    /// [`super::netns_cookie`]). Replaces an existing entry.
    pub fn enroll(&self, netns_cookie: u64, value: &Enrolled) -> Result<(), DatapathError> {
        lock(&self.enrolled)
            .insert(netns_cookie, value, 0)
            .map_err(|e| map_error(&ENROLLED, e))
    }

    /// Stops capturing the namespace. Not an error if it was not enrolled.
    pub fn unenroll(&self, netns_cookie: u64) -> Result<(), DatapathError> {
        match lock(&self.enrolled).remove(&netns_cookie) {
            Ok(()) => Ok(()),
            Err(e) if is_not_found(&e) => Ok(()),
            Err(e) => Err(map_error(&ENROLLED, e)),
        }
    }

    /// The enrolled namespaces (cookie, record), in no particular order.
    pub fn enrolled(&self) -> Result<Vec<(u64, Enrolled)>, DatapathError> {
        entries(&ENROLLED, &lock(&self.enrolled))
    }

    /// Replaces the set of destination ports that are never redirected.
    pub fn set_excluded_ports(&self, ports: &[u16]) -> Result<(), DatapathError> {
        let wanted = excluded_set(ports)?;
        write_excluded_ports(&mut lock(&self.excl_ports), &wanted)
    }

    /// The current excluded ports, sorted.
    pub fn excluded_ports(&self) -> Result<Vec<u16>, DatapathError> {
        let map = lock(&self.excl_ports);
        let mut ports: Vec<u16> = entries(&EXCL_PORTS, &map)?
            .into_iter()
            .map(|(p, _)| p)
            .collect();
        ports.sort_unstable();
        Ok(ports)
    }

    /// Attaches `mesh_sklookup` to the network namespace `netns` (whose cookie is
    /// `netns_cookie`, see [`super::netns_cookie`]): from then on inbound TCP of that namespace
    /// to any port but 15008, 15001, 15006 and the excluded ports goes to the listener
    /// registered with [`Datapath::set_inbound_listener`] for its destination address (refused
    /// if there is none: register the listener first), unless the pod sent it to itself:
    /// `ingress_ifindex` is `lo`, or the source address is the destination address.
    ///
    /// The proxy's transparent connections to the application (the client's source address,
    /// `INBOUND_MARK`) are only left alone if the pod's policy rule for that mark is consulted
    /// before the `local` table, so that they are routed by `local default dev lo`; see
    /// `mesh-ebpf/src/sklookup.rs`.
    ///
    /// The BPF link is pinned: it stays attached when this `Datapath` is dropped or the process
    /// exits, until [`Datapath::detach_inbound`], [`Datapath::prune`] or an uninstall. A link a
    /// previous agent left for the namespace is replaced (without a gap). Idempotent: attaching
    /// a namespace this agent attached already does nothing.
    pub fn attach_inbound(&self, netns_cookie: u64, netns: &File) -> Result<(), DatapathError> {
        let mut inbound_links = lock(&self.inbound_links);
        if inbound_links.get(&netns_cookie).is_some_and(|l| l.current) {
            return Ok(());
        }
        let mut ebpf = lock(&self.ebpf);
        let program = sk_lookup_program(&mut ebpf)?;
        let attach_err = |source| DatapathError::AttachNetns {
            name: PROG_SKLOOKUP,
            netns_cookie,
            error: source,
        };
        let id = program.attach(netns).map_err(attach_err)?;
        let link = FdLink::from(program.take_link(id).map_err(attach_err)?);
        // Replaces a previous agent's link for this namespace, if any, without a gap.
        let path = links::sklookup_pin(&self.pin_dir, netns_cookie);
        let (pinned, replaced) = links::install(link, &path)?;
        inbound_links.insert(
            netns_cookie,
            InboundLink {
                _link: pinned,
                current: true,
            },
        );
        debug!(netns_cookie, replaced, "inbound capture attached");
        Ok(())
    }

    /// Detaches `mesh_sklookup` from the network namespace. Not an error if it was not attached.
    pub fn detach_inbound(&self, netns_cookie: u64) -> Result<(), DatapathError> {
        let link = lock(&self.inbound_links).remove(&netns_cookie);
        let removed = links::remove(&links::sklookup_pin(&self.pin_dir, netns_cookie))?;
        // Our descriptor goes too: the kernel detaches the link.
        drop(link);
        if removed {
            debug!(netns_cookie, "inbound capture detached");
        }
        Ok(())
    }

    /// Cookies of the network namespaces `mesh_sklookup` is attached to (by this agent or, not
    /// yet replaced, a previous one), sorted.
    pub fn inbound_attached(&self) -> Vec<u64> {
        lock(&self.inbound_links).keys().copied().collect()
    }

    /// Registers `listener` (a listening TCP socket in the pod's network namespace, normally the
    /// proxy's `:15006`) as the receiver of captured inbound TCP to `ip`, the pod's own address.
    /// Replaces an earlier registration. The kernel drops the entry by itself when the socket
    /// is closed (its last descriptor, also the one in the proxy's netns helper).
    ///
    /// IPv4 traffic is assigned to the listener of the IPv4 address: register an IPv4 (or
    /// dual-stack) socket for it, and an IPv6 socket for the IPv6 address.
    pub fn set_inbound_listener(
        &self,
        ip: IpAddr,
        listener: BorrowedFd<'_>,
    ) -> Result<(), DatapathError> {
        check_tcp_listener(listener).map_err(|reason| DatapathError::NotATcpListener {
            ip,
            reason: reason.to_string(),
        })?;
        lock(&self.inbound)
            .insert(listener_key(ip), listener, 0)
            .map_err(|e| map_error(&INBOUND, e))
    }

    /// Forgets the listener of `ip`. Not an error if there is none.
    pub fn remove_inbound_listener(&self, ip: IpAddr) -> Result<(), DatapathError> {
        match lock(&self.inbound).remove(&listener_key(ip)) {
            Ok(()) => Ok(()),
            Err(e) if is_not_found(&e) => Ok(()),
            Err(e) => Err(map_error(&INBOUND, e)),
        }
    }

    /// The addresses with a registered inbound listener, sorted.
    pub fn inbound_listeners(&self) -> Result<Vec<IpAddr>, DatapathError> {
        let keys = maps::sock_hash_keys(&INBOUND, &lock(&self.inbound))?;
        let mut ips: Vec<IpAddr> = keys.iter().filter_map(maps::listener_ip).collect();
        ips.sort_unstable();
        Ok(ips)
    }

    /// Handle for the proxy to look up original destinations.
    pub fn orig_dst(&self) -> OrigDstTable {
        self.orig_dst.clone()
    }

    /// The cgroup the programs are attached to.
    pub fn cgroup_root(&self) -> &Path {
        &self.cgroup_root
    }

    /// Where the maps are pinned.
    pub fn pin_dir(&self) -> &Path {
        &self.pin_dir
    }

    /// Lets the next agent take the datapath over while this one drains (after a handover or a
    /// shutdown signal): closes this agent's link descriptors (the pins keep every program
    /// attached; the next agent's links replace them) and releases the pin directory lock. The
    /// maps stay shared: connections already relayed keep working. Nothing may be enrolled,
    /// attached or pruned afterwards.
    pub fn hand_over(&self) {
        lock(&self.links).clear();
        lock(&self.inbound_links).clear();
        lock(&self.pin_lock).take();
    }

    /// Removes the datapath from the node: detaches every program (the `sk_lookup` links of
    /// every namespace first, then connect4/6), unpins the maps and removes the pin directory.
    /// Connections already redirected keep working (they are plain loopback connections); new
    /// ones are no longer redirected. Dropping a `Datapath` instead leaves everything attached
    /// (fail closed) for the next agent to take over.
    pub fn uninstall(self) -> Result<Vec<String>, DatapathError> {
        let Datapath {
            links,
            inbound_links,
            ebpf,
            pin_dir,
            pin_lock,
            ..
        } = self;
        // Our descriptors go first (what is pinned then decides); the lock stays until the pins
        // are gone, so no agent starts on a half-removed datapath.
        drop((links, inbound_links, ebpf));
        let removed = remove_pins(&pin_dir)?;
        drop(pin_lock);
        remove_pin_dir(&pin_dir)?;
        Ok(removed)
    }
}

/// [`Datapath::uninstall`] without a running datapath (`mesh-agent uninstall`): detaches every
/// pinned link under `pin_dir` (with nobody holding their descriptors, removing the pin detaches
/// them), unpins the maps and removes the directory. Refused while an agent holds the pin
/// directory's lock. Returns what was removed (`links/NAME`, `NAME` for maps); a missing pin
/// directory is nothing to do.
pub fn uninstall_pinned(pin_dir: &Path) -> Result<Vec<String>, DatapathError> {
    if fs::symlink_metadata(pin_dir).is_err() {
        return Ok(Vec::new());
    }
    // An agent holds the lock while it runs. (A process just forked by someone who held it may
    // too, until it execs: give that a moment.)
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(2);
    let lock = loop {
        match fsutil::try_lock_dir(pin_dir)
            .map_err(|e| DatapathError::io("locking pin directory", pin_dir, e))?
        {
            Some(lock) => break lock,
            None if std::time::Instant::now() < deadline => {
                std::thread::sleep(std::time::Duration::from_millis(10));
            }
            None => {
                return Err(DatapathError::InstallBusy {
                    path: pin_dir.to_path_buf(),
                })
            }
        }
    };
    let removed = remove_pins(pin_dir)?;
    drop(lock);
    remove_pin_dir(pin_dir)?;
    info!(pin_dir = %pin_dir.display(), removed = removed.len(), "datapath uninstalled");
    Ok(removed)
}

/// Removes the pinned links (detaching them) and maps; returns what was removed.
fn remove_pins(pin_dir: &Path) -> Result<Vec<String>, DatapathError> {
    let mut removed: Vec<String> = links::remove_all(pin_dir)?
        .into_iter()
        .map(|n| format!("links/{n}"))
        .collect();
    for spec in MAP_SPECS {
        let path = pin_dir.join(spec.name);
        match fs::remove_file(&path) {
            Ok(()) => removed.push(spec.name.to_string()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(DatapathError::io("unpinning map", &path, e)),
        }
    }
    Ok(removed)
}

fn remove_pin_dir(pin_dir: &Path) -> Result<(), DatapathError> {
    match fs::remove_dir(pin_dir) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) if matches!(e.raw_os_error(), Some(libc::ENOTEMPTY | libc::EBUSY)) => {
            debug!(pin_dir = %pin_dir.display(), "pin directory kept: {e}");
        }
        Err(e) => return Err(DatapathError::io("removing pin directory", pin_dir, e)),
    }
    Ok(())
}

/// Checks, without loading or locking anything, that the maps a running or previous agent
/// pinned under `pin_dir` are ones this agent can take over (their layout is what ours
/// declares). A new agent runs this before it asks a running one to hand over, so an
/// incompatible version is refused while the old agent still serves.
pub fn check_adoptable(pin_dir: &Path) -> Result<(), DatapathError> {
    for spec in MAP_SPECS {
        let path = pin_dir.join(spec.name);
        if fs::symlink_metadata(&path).is_ok() {
            check_pinned_map(spec, &path).map_err(|reason| DatapathError::Adopt {
                pin_dir: pin_dir.to_path_buf(),
                reason,
            })?;
        }
    }
    Ok(())
}

/// A map pinned by a previous agent has the key and value sizes and capacity our object
/// declares (a layout that changed between versions is refused, never misread).
fn check_pinned_map(spec: &MapSpec, path: &Path) -> Result<(), String> {
    let info = aya::maps::MapInfo::from_pin(path).map_err(|e| {
        format!(
            "cannot read map {} pinned at {}: {e}",
            spec.name,
            path.display()
        )
    })?;
    let found = (
        info.key_size() as usize,
        info.value_size() as usize,
        info.max_entries() as usize,
    );
    let wanted = (spec.key_size, spec.value_size, spec.capacity);
    let matches =
        found.0 == wanted.0 && (spec.value_size == 0 || found.1 == wanted.1) && found.2 == wanted.2;
    if matches {
        Ok(())
    } else {
        Err(format!(
            "its map {} has key {} / value {} bytes and {} entries where this agent's has {} / \
             {} and {} (an incompatible version)",
            spec.name, found.0, found.1, found.2, wanted.0, wanted.1, wanted.2
        ))
    }
}

fn excluded_set(ports: &[u16]) -> Result<BTreeSet<u16>, DatapathError> {
    let set: BTreeSet<u16> = ports.iter().copied().collect();
    if set.len() > MAX_EXCLUDED_PORTS {
        return Err(DatapathError::TooManyExcludedPorts {
            count: set.len(),
            max: MAX_EXCLUDED_PORTS,
        });
    }
    Ok(set)
}

fn write_excluded_ports(
    map: &mut ExclPortsMap,
    wanted: &BTreeSet<u16>,
) -> Result<(), DatapathError> {
    let present: BTreeSet<u16> = entries(&EXCL_PORTS, map)?
        .into_iter()
        .map(|(p, _)| p)
        .collect();
    for port in present.difference(wanted) {
        match map.remove(port) {
            Ok(()) => {}
            Err(e) if is_not_found(&e) => {}
            Err(e) => return Err(map_error(&EXCL_PORTS, e)),
        }
    }
    for port in wanted.difference(&present) {
        map.insert(port, 1u8, 0)
            .map_err(|e| map_error(&EXCL_PORTS, e))?;
    }
    Ok(())
}

fn open_cgroup_root(path: &Path) -> Result<File, DatapathError> {
    let fs_type =
        fsutil::fs_type(path).map_err(|e| DatapathError::io("inspecting cgroup root", path, e))?;
    if fs_type != fsutil::CGROUP2_SUPER_MAGIC || !path.is_dir() {
        return Err(DatapathError::NotCgroup2 {
            path: path.to_path_buf(),
        });
    }
    File::open(path).map_err(|e| DatapathError::io("opening cgroup root", path, e))
}

/// Checks that the pin directory is (or will be) on bpffs, then creates it.
fn prepare_pin_dir(pin_dir: &Path) -> Result<(), DatapathError> {
    let existing = fsutil::nearest_existing(pin_dir);
    let fs_type = fsutil::fs_type(&existing)
        .map_err(|e| DatapathError::io("inspecting pin directory", &existing, e))?;
    if fs_type != fsutil::BPF_FS_MAGIC {
        return Err(DatapathError::NotBpffs {
            path: pin_dir.to_path_buf(),
        });
    }
    fs::create_dir_all(pin_dir).map_err(|e| DatapathError::io("creating pin directory", pin_dir, e))
}

/// Ok if `fd` is a TCP socket in the listening state; `sk_lookup` can assign nothing else to a
/// TCP SYN (the sockhash itself would also take UDP sockets).
fn check_tcp_listener(fd: BorrowedFd<'_>) -> Result<(), io::Error> {
    use std::os::fd::AsRawFd as _;
    let get = |level, name| -> io::Result<libc::c_int> {
        let mut value: libc::c_int = 0;
        let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
        // SAFETY: getsockopt with a valid descriptor and an int-sized buffer.
        let rc = unsafe {
            libc::getsockopt(
                fd.as_raw_fd(),
                level,
                name,
                (&raw mut value).cast(),
                &raw mut len,
            )
        };
        if rc != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(value)
    };
    if get(libc::SOL_SOCKET, libc::SO_PROTOCOL)? != libc::IPPROTO_TCP {
        return Err(io::Error::other("not a TCP socket"));
    }
    if get(libc::SOL_SOCKET, libc::SO_ACCEPTCONN)? == 0 {
        return Err(io::Error::other("the socket is not listening"));
    }
    Ok(())
}

fn sk_lookup_program(ebpf: &mut Ebpf) -> Result<&mut SkLookup, DatapathError> {
    let name = PROG_SKLOOKUP;
    ebpf.program_mut(name)
        .ok_or(DatapathError::MissingProgram { name })?
        .try_into()
        .map_err(|_| DatapathError::MissingProgram { name })
}

/// Attaches a cgroup program with a BPF link. The kernel lets several links of one kind share a
/// cgroup (flags 0 is all `BPF_LINK_CREATE` takes for cgroups): a previous agent's, for a
/// moment, or another product's.
fn attach(
    ebpf: &mut Ebpf,
    name: &'static str,
    hook: Hook,
    cgroup: &File,
    cgroup_path: &Path,
) -> Result<FdLink, DatapathError> {
    let program = ebpf
        .program_mut(name)
        .ok_or(DatapathError::MissingProgram { name })?;
    let attach_err = |source| DatapathError::Attach {
        name,
        cgroup: cgroup_path.to_path_buf(),
        error: source,
    };
    let not_a_link = |e: aya::programs::links::LinkError| DatapathError::Link {
        path: cgroup_path.to_path_buf(),
        reason: format!("{name} was not attached with a BPF link (kernel too old?): {e}"),
    };
    match hook {
        Hook::SockAddr => {
            let program: &mut CgroupSockAddr = program
                .try_into()
                .map_err(|_| DatapathError::MissingProgram { name })?;
            program
                .load()
                .map_err(|source| DatapathError::ProgramLoad {
                    name,
                    error: source,
                })?;
            let id = program
                .attach(cgroup, CgroupAttachMode::Single)
                .map_err(attach_err)?;
            let link = program.take_link(id).map_err(attach_err)?;
            FdLink::try_from(link).map_err(not_a_link)
        }
        Hook::SockOps => {
            let program: &mut SockOps = program
                .try_into()
                .map_err(|_| DatapathError::MissingProgram { name })?;
            program
                .load()
                .map_err(|source| DatapathError::ProgramLoad {
                    name,
                    error: source,
                })?;
            let id = program
                .attach(cgroup, CgroupAttachMode::Single)
                .map_err(attach_err)?;
            let link = program.take_link(id).map_err(attach_err)?;
            FdLink::try_from(link).map_err(not_a_link)
        }
    }
}

/// `ORIG_DST` for the proxy: the loaded map and more handles opened from its pin, all before
/// anything is attached. The pool has twice as many handles as the runtime has worker threads
/// by default (tokio's `TOKIO_WORKER_THREADS`, or the available parallelism), so every worker,
/// and the odd other thread, owns one and takes without a lock; the fallback shards (one per
/// CPU) serve threads beyond that.
fn orig_dst_table(first: maps::OrigDstMap, pin: &Path) -> Result<OrigDstTable, DatapathError> {
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    let workers = std::env::var("TOKIO_WORKER_THREADS")
        .ok()
        .and_then(|n| n.parse::<usize>().ok())
        .unwrap_or(cpus);
    let pool = workers.saturating_mul(2).clamp(4, 64);
    let shards = cpus.clamp(1, 16);
    let mut fallback = vec![first];
    for _ in 1..shards {
        fallback.push(maps::open_orig_dst(pin)?);
    }
    let pool = (0..pool)
        .map(|_| maps::open_orig_dst(pin))
        .collect::<Result<Vec<_>, _>>()?;
    Ok(OrigDstTable::new(pool, fallback))
}

//! The only module that touches aya: loads the eBPF programs of `mesh-ebpf`, attaches them to a
//! cgroup v2 root, pins their maps and offers typed handles to them.
//!
//! * [`Datapath::load`] loads the embedded object, pins the five maps under
//!   [`DatapathConfig::pin_dir`], writes the excluded ports and attaches `mesh_connect4/6`,
//!   `mesh_sockops`, `mesh_peername4/6` and `mesh_sockname4/6` to
//!   [`DatapathConfig::cgroup_root`] with BPF links pinned under `<pin dir>/links` ([`links`]).
//! * [`Datapath::enroll`] / [`Datapath::unenroll`] decide which network namespaces are captured.
//! * [`Datapath::attach_inbound`] / [`Datapath::detach_inbound`] attach `mesh_sklookup` (loaded
//!   by [`Datapath::load`]) to one pod's network namespace, also with a pinned link;
//!   [`Datapath::set_inbound_listener`] registers the proxy's 15006 listener under the pod's
//!   address in the `INBOUND_LSN` sockhash. That map is pinned with the others but is not in
//!   `mesh_common::ALL_MAPS` (what `inspect maps` dumps): its values are sockets, which user
//!   space cannot read; [`pinned::read_inbound_listeners`] lists its keys.
//! * [`OrigDstTable::take`] is what the proxy calls on `accept` to learn the original destination.
//! * [`pinned`] reads the pinned maps without loading anything (for `mesh-agent inspect maps`).
//! * [`Datapath::uninstall`] / [`uninstall_pinned`] detach everything and remove the pins.
//!
//! **Fail closed.** Every link is pinned, so the programs stay attached when the agent exits, by
//! a stop or a crash: an enrolled pod's connections are still redirected to its 15001 port,
//! where nothing listens, and refused; `mesh_sklookup` refuses inbound TCP it has no listener
//! for. Nothing leaves the pod around the mesh and no plaintext reaches it. Dropping a
//! [`Datapath`] leaves it all in place. The next [`Datapath::load`] on the same pin directory
//! takes it over without a gap (reusing the pinned maps, replacing each link only once its own
//! is attached), and [`Datapath::prune`] removes what no pod wants any more. Removing the mesh
//! from a node is the explicit act of [`uninstall_pinned`] (`mesh-agent uninstall`).
mod fsutil;
pub mod links;
mod load;
pub mod log;
mod maps;
pub mod pinned;
#[cfg(test)]
mod tests;

use std::{
    io,
    path::{Path, PathBuf},
};

pub use load::{check_adoptable, uninstall_pinned, Adopted, Datapath};
pub use maps::OrigDstTable;
pub use mesh_common::{Enrolled, FlowKey, ListenerKey, OrigDst};

/// Where and how to load the datapath.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DatapathConfig {
    /// A cgroup v2 directory; every process below it is subject to redirection (if its network
    /// namespace is enrolled). Production: the cgroup2 mount ([`default_cgroup_root`]).
    pub cgroup_root: PathBuf,
    /// A directory on a bpffs mount where the maps are pinned, e.g. `/sys/fs/bpf/mesh`. Created
    /// if missing (its parent must be on bpffs too).
    pub pin_dir: PathBuf,
    /// Destination ports that are never redirected (host order), at most
    /// [`mesh_common::MAX_EXCLUDED_PORTS`].
    pub excluded_ports: Vec<u16>,
}

/// Everything that can go wrong in the datapath, worded for the operator.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DatapathError {
    #[error(
        "no cgroup v2 mount in /proc/mounts; mount one with `mount -t cgroup2 none /sys/fs/cgroup` \
         or pass the cgroup root explicitly"
    )]
    NoCgroup2Mount,
    #[error("cgroup root {} is not a cgroup v2 directory", path.display())]
    NotCgroup2 { path: PathBuf },
    #[error(
        "pin directory {} is not on a bpffs mount; mount one with `mount -t bpf bpf /sys/fs/bpf`",
        path.display()
    )]
    NotBpffs { path: PathBuf },
    #[error(
        "pin directory {} is in use by another running mesh-agent; stop it or use another pin \
         directory",
        path.display()
    )]
    PinDirBusy { path: PathBuf },
    #[error(
        "no pinned map at {}: no agent has loaded the datapath with this pin directory, or it was \
         shut down cleanly (which removes the maps)",
        path.display()
    )]
    NotPinned { path: PathBuf },
    #[error(
        "this mesh-agent was built without its eBPF programs (AYA_BUILD_SKIP); rebuild it after \
         `cargo xtask setup`"
    )]
    NoEbpfObject,
    #[error(
        "{count} excluded ports configured, but the datapath holds at most {max}; shorten the list"
    )]
    TooManyExcludedPorts { count: usize, max: usize },
    #[error("{what} {}: {error}", path.display())]
    Io {
        what: &'static str,
        path: PathBuf,
        error: io::Error,
    },
    #[error("loading the eBPF object failed: {0}")]
    Object(aya::EbpfError),
    #[error("eBPF program {name} is missing from the object or has an unexpected type")]
    MissingProgram { name: &'static str },
    #[error("eBPF map {name} is missing from the object or has an unexpected type: {reason}")]
    MissingMap { name: &'static str, reason: String },
    #[error("loading eBPF program {name} into the kernel failed: {error}")]
    ProgramLoad {
        name: &'static str,
        error: aya::programs::ProgramError,
    },
    #[error("attaching eBPF program {name} to cgroup {} failed: {error}", cgroup.display())]
    Attach {
        name: &'static str,
        cgroup: PathBuf,
        error: aya::programs::ProgramError,
    },
    #[error("attaching eBPF program {name} to network namespace {netns_cookie} failed: {error}")]
    AttachNetns {
        name: &'static str,
        netns_cookie: u64,
        error: aya::programs::ProgramError,
    },
    #[error("the inbound listener for {ip} must be a listening TCP socket: {reason}")]
    NotATcpListener {
        ip: std::net::IpAddr,
        reason: String,
    },
    #[error("detaching eBPF program {name} failed: {error}")]
    Detach {
        name: &'static str,
        error: aya::programs::ProgramError,
    },
    #[error("pinning map {name} at {} failed: {error}", path.display())]
    Pin {
        name: &'static str,
        path: PathBuf,
        error: aya::pin::PinError,
    },
    #[error(
        "cannot take over the datapath a previous agent left in {}: {reason}; it stays in \
         force (pods fail closed); remove it with `mesh-agent uninstall --pin-dir {}` to start \
         afresh",
        pin_dir.display(),
        pin_dir.display()
    )]
    Adopt { pin_dir: PathBuf, reason: String },
    #[error("pinned link {}: {reason}", path.display())]
    Link { path: PathBuf, reason: String },
    #[error(
        "an agent is running with pin directory {} (it holds the lock); stop it before \
         uninstalling",
        path.display()
    )]
    InstallBusy { path: PathBuf },
    #[error("eBPF map {name}: {error}")]
    Map {
        name: &'static str,
        error: aya::maps::MapError,
    },
}

impl DatapathError {
    fn io(what: &'static str, path: &Path, source: io::Error) -> Self {
        DatapathError::Io {
            what,
            path: path.to_path_buf(),
            error: source,
        }
    }
}

/// The cgroup v2 mount point, from `/proc/mounts` (the first `cgroup2` entry).
pub fn default_cgroup_root() -> Result<PathBuf, DatapathError> {
    let mounts = std::fs::read_to_string("/proc/mounts")
        .map_err(|e| DatapathError::io("reading", Path::new("/proc/mounts"), e))?;
    fsutil::cgroup2_mount(&mounts).ok_or(DatapathError::NoCgroup2Mount)
}

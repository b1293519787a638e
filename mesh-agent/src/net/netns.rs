//! A handle on a pod's network namespace, and sockets created inside it.
//!
//! A socket belongs to the network namespace its creator was in when it called `socket()`. To make
//! a socket inside a pod, the calling thread enters the pod's namespace with `setns`, creates the
//! socket, and returns to its own namespace before doing anything else. The socket keeps the pod's
//! addresses and routes for its whole life, whichever thread later uses it.
use std::fs::File;
use std::io;
use std::os::fd::AsFd;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use nix::sched::CloneFlags;
use nix::sys::socket::getsockopt;
use nix::sys::statfs::{fstatfs, NSFS_MAGIC};
use nix::{getsockopt_impl, sockopt_impl};
use socket2::{Domain, Protocol, Socket, Type};

// `SO_NETNS_COOKIE` (Linux 5.14+): the 64-bit cookie that identifies a network namespace, the
// same value `bpf_get_netns_cookie` returns in the eBPF programs.
const SO_NETNS_COOKIE: libc::c_int = 71;
sockopt_impl!(NetnsCookie, GetOnly, libc::SOL_SOCKET, SO_NETNS_COOKIE, u64);

pub struct Netns {
    file: File,
    path: PathBuf,
    cookie: u64,
    id: NsId,
}

/// What identifies a network namespace from user space: the device and inode numbers of its
/// nsfs file (`/proc/<pid>/ns/net`, a bind mount under `/var/run/netns`). Two paths name the same
/// namespace exactly when their `NsId`s are equal; `ls -L -i` and `readlink /proc/<pid>/ns/net`
/// (`net:[<ino>]`) show the inode.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct NsId {
    pub dev: u64,
    pub ino: u64,
}

impl NsId {
    /// The namespace `path` names now (follows symbolic links).
    pub fn of_path(path: &Path) -> io::Result<NsId> {
        std::fs::metadata(path).map(|m| NsId {
            dev: m.dev(),
            ino: m.ino(),
        })
    }

    /// The namespace an open namespace file refers to.
    pub fn of_file(file: &File) -> io::Result<NsId> {
        file.metadata().map(|m| NsId {
            dev: m.dev(),
            ino: m.ino(),
        })
    }
}

impl std::fmt::Display for NsId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "net:[{}]", self.ino)
    }
}

impl std::fmt::Debug for Netns {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "netns {} ({}, cookie {})",
            self.path.display(),
            self.id,
            self.cookie
        )
    }
}

impl Netns {
    /// Opens the namespace file at `path` and reads its cookie.
    pub fn open(path: &Path) -> io::Result<Netns> {
        let file =
            File::open(path).map_err(|e| with_path(e, "cannot open network namespace", path))?;
        let fs = fstatfs(&file).map_err(|e| with_path(e.into(), "cannot stat", path))?;
        // nsfs: the filesystem of `/proc/*/ns/*` and bind-mounted namespaces.
        if fs.filesystem_type() != NSFS_MAGIC {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("{} is not a network namespace file (expected nsfs, like /var/run/netns/<name>)", path.display()),
            ));
        }
        let id = NsId::of_file(&file)?;
        let mut netns = Netns {
            file,
            path: path.to_path_buf(),
            cookie: 0,
            id,
        };
        let probe = netns.socket(Domain::IPV4)?;
        netns.cookie = socket_netns_cookie(&probe)?;
        Ok(netns)
    }

    pub fn cookie(&self) -> u64 {
        self.cookie
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The namespace this handle refers to (it stays the same while the handle is open, even if
    /// the path it was opened from goes away or names another namespace later).
    pub fn id(&self) -> NsId {
        self.id
    }

    /// The open namespace file (for attaching per-namespace eBPF programs).
    pub fn file(&self) -> &File {
        &self.file
    }

    /// Runs `f` on the current thread while it is inside this namespace. `f` must be short and
    /// must not yield to an async runtime.
    pub fn run<T>(&self, f: impl FnOnce() -> io::Result<T>) -> io::Result<T> {
        let home = File::open("/proc/thread-self/ns/net")?;
        setns(&self.file)
            .map_err(|e| with_path(e, "cannot enter network namespace", &self.path))?;
        let result = f();
        if let Err(e) = setns(&home) {
            // A worker thread stuck in a pod's namespace would send other pods' traffic from the
            // wrong place. There is no safe way to continue.
            eprintln!("fatal: cannot return to the agent's network namespace: {e}");
            std::process::abort();
        }
        result
    }

    /// A non-blocking TCP socket created inside this namespace.
    pub fn socket(&self, domain: Domain) -> io::Result<Socket> {
        self.run(|| tcp_socket(domain))
    }
}

/// A non-blocking, close-on-exec TCP socket in the calling thread's network namespace.
pub(super) fn tcp_socket(domain: Domain) -> io::Result<Socket> {
    Socket::new(
        domain,
        Type::STREAM.nonblocking().cloexec(),
        Some(Protocol::TCP),
    )
}

/// Runs `f` on the current thread inside the namespace `ns`, then returns to the thread's own.
fn run_in<T>(ns: &File, f: impl FnOnce() -> io::Result<T>) -> io::Result<T> {
    let home = File::open("/proc/thread-self/ns/net")?;
    setns(ns)?;
    let result = f();
    if let Err(e) = setns(&home) {
        // A worker thread stuck in a pod's namespace would send other pods' traffic from the
        // wrong place. There is no safe way to continue.
        eprintln!("fatal: cannot return to the agent's network namespace: {e}");
        std::process::abort();
    }
    result
}

/// The cookie of the network namespace `ns` refers to (an open `/proc/<pid>/ns/net` or
/// `/run/netns/<name>`): the key of the `ENROLLED` map, what `bpf_get_netns_cookie` returns.
pub fn netns_cookie(ns: &File) -> io::Result<u64> {
    run_in(ns, || {
        let probe = Socket::new(Domain::IPV4, Type::STREAM.cloexec(), None)?;
        socket_netns_cookie(&probe)
    })
}

/// Moves the calling thread into the network namespace `file` refers to.
pub(crate) fn setns(file: &File) -> io::Result<()> {
    nix::sched::setns(file.as_fd(), CloneFlags::CLONE_NEWNET).map_err(io::Error::from)
}

/// The network namespace cookie of the namespace `socket` was created in.
pub fn socket_netns_cookie(socket: &impl AsFd) -> io::Result<u64> {
    getsockopt(socket, NetnsCookie).map_err(io::Error::from)
}

fn with_path(e: io::Error, what: &str, path: &Path) -> io::Error {
    io::Error::new(e.kind(), format!("{what} {}: {e}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn own_namespace_has_a_cookie_and_sockets_report_it() {
        let ns = Netns::open(Path::new("/proc/self/ns/net")).unwrap();
        assert_ne!(ns.cookie(), 0);
        let s = Socket::new(Domain::IPV4, Type::STREAM, None).unwrap();
        assert_eq!(socket_netns_cookie(&s).unwrap(), ns.cookie());
    }

    #[test]
    fn a_regular_file_is_not_a_namespace() {
        let e = Netns::open(Path::new("/proc/self/status")).unwrap_err();
        assert!(
            e.to_string().contains("is not a network namespace file"),
            "{e}"
        );
        let e = Netns::open(Path::new("/nonexistent/ns")).unwrap_err();
        assert!(e.to_string().contains("/nonexistent/ns"), "{e}");
    }
}

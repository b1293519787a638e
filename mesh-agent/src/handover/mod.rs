//! Hitless upgrade: the running agent hands its listening sockets to a new one.
//!
//! A new agent started while another runs on the same pin directory connects to the running
//! one's handover socket and receives every listening socket it has (each pod's listeners, the
//! metrics, readiness and admin endpoints) as file descriptors (`SCM_RIGHTS`). The running agent
//! then stops accepting, closes its link descriptors (the pins keep the programs attached),
//! releases the pin directory lock and says so; from then on it only drains the connections it
//! already relays. The sockets themselves never close: connects that arrive meanwhile wait in
//! their backlog until the new agent accepts them.
//!
//! Protocol version 1. The socket is a `SOCK_SEQPACKET` Unix socket in the abstract namespace
//! (both agents run in the node's network namespace), named `mesh-agent-handover-<dev>-<ino>`
//! after the pin directory's device and inode. Each message is one JSON object:
//!
//! ```text
//! new     -> running  {"type":"request","version":1}
//! running -> new      {"type":"sockets","roles":["metrics","pod",...]}  + one descriptor per role
//!                     ... (at most 200 descriptors per message)
//! running -> new      {"type":"counters","chunk":"...","last":false}  its Prometheus text,
//!                     ... (in chunks of at most 16 KiB)
//! running -> new      {"type":"released","pid":1234}     stopped accepting, lock released
//!                  or {"type":"refused","reason":"..."}
//!     ... the old agent drains ...
//! running -> new      {"type":"counters",...} (again, at the end of the drain)
//! running -> new      {"type":"drained"}
//! ```
//!
//! The counters let the new agent continue the old one's (see `telemetry::carry`).
//!
//! Each side checks that the other runs as its own effective uid (`SO_PEERCRED`).
use std::io::{self, IoSlice, IoSliceMut};
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::time::Duration;

use nix::errno::Errno;
use nix::sys::socket::{
    self, sockopt, AddressFamily, Backlog, ControlMessage, ControlMessageOwned, MsgFlags, SockFlag,
    SockType, UnixAddr,
};
use nix::sys::time::TimeVal;
use serde::{Deserialize, Serialize};
use tokio::io::unix::AsyncFd;
use tokio::sync::mpsc;

pub const VERSION: u32 = 1;
/// Descriptors per message; the kernel takes at most 253 (`SCM_MAX_FD`).
const MAX_FDS: usize = 200;
/// How long either side waits for the other's next message.
const IO_TIMEOUT: Duration = Duration::from_secs(30);
/// Room for the largest message: a counters chunk whose every byte JSON escaped as `\u00XX`.
const MAX_MESSAGE: usize = 8 * COUNTER_CHUNK;

/// What a handed socket is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    Metrics,
    Readiness,
    Admin,
    /// A listener inside a pod's network namespace; the receiver finds which by asking the
    /// socket (its namespace cookie and local address).
    Pod,
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "lowercase")]
enum Message {
    Request { version: u32 },
    Sockets { roles: Vec<Role> },
    Counters { chunk: String, last: bool },
    Released { pid: u32 },
    Drained,
    Refused { reason: String },
}

/// The Prometheus text in chunks that fit a message.
const COUNTER_CHUNK: usize = 16 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum HandoverError {
    #[error("handover socket {name}: cannot {op}: {error}")]
    Io {
        name: String,
        op: &'static str,
        error: io::Error,
    },
    #[error(
        "handover socket {name}: the peer (pid {pid}) runs as uid {uid}, not {own}; refusing it"
    )]
    Peer {
        name: String,
        pid: i32,
        uid: u32,
        own: u32,
    },
    #[error("handover socket {name}: {problem}")]
    Protocol { name: String, problem: String },
    #[error("the running agent (pid {pid}) refused the handover: {reason}")]
    Refused { pid: i32, reason: String },
}

/// The abstract socket name for `pin_dir` (which must exist).
pub fn socket_name(pin_dir: &Path) -> io::Result<String> {
    let meta = std::fs::metadata(pin_dir)?;
    Ok(format!(
        "mesh-agent-handover-{:x}-{:x}",
        meta.dev(),
        meta.ino()
    ))
}

struct Conn {
    fd: OwnedFd,
    name: String,
    /// The peer's pid.
    pid: i32,
}

impl Conn {
    fn new(fd: OwnedFd, name: &str) -> Result<Conn, HandoverError> {
        let io = |op, e: Errno| HandoverError::Io {
            name: name.to_string(),
            op,
            error: e.into(),
        };
        let cred = socket::getsockopt(&fd, sockopt::PeerCredentials)
            .map_err(|e| io("read the peer's credentials", e))?;
        let own = nix::unistd::geteuid().as_raw();
        if cred.uid() != own {
            return Err(HandoverError::Peer {
                name: name.to_string(),
                pid: cred.pid(),
                uid: cred.uid(),
                own,
            });
        }
        let timeout = TimeVal::new(IO_TIMEOUT.as_secs() as _, 0);
        socket::setsockopt(&fd, sockopt::ReceiveTimeout, &timeout)
            .map_err(|e| io("set a timeout", e))?;
        socket::setsockopt(&fd, sockopt::SendTimeout, &timeout)
            .map_err(|e| io("set a timeout", e))?;
        Ok(Conn {
            fd,
            name: name.to_string(),
            pid: cred.pid(),
        })
    }

    fn protocol(&self, problem: impl Into<String>) -> HandoverError {
        HandoverError::Protocol {
            name: self.name.clone(),
            problem: problem.into(),
        }
    }

    fn send(&self, msg: &Message, fds: &[RawFd]) -> Result<(), HandoverError> {
        let body = serde_json::to_vec(msg).expect("messages serialize");
        let cmsgs: Vec<ControlMessage> = if fds.is_empty() {
            vec![]
        } else {
            vec![ControlMessage::ScmRights(fds)]
        };
        socket::sendmsg::<UnixAddr>(
            self.fd.as_raw_fd(),
            &[IoSlice::new(&body)],
            &cmsgs,
            MsgFlags::MSG_NOSIGNAL,
            None,
        )
        .map_err(|e| HandoverError::Io {
            name: self.name.clone(),
            op: "send",
            error: e.into(),
        })?;
        Ok(())
    }

    /// The next message and the descriptors that came with it; `None` at end of stream.
    fn recv(&self) -> Result<Option<(Message, Vec<OwnedFd>)>, HandoverError> {
        let mut buf = vec![0u8; MAX_MESSAGE];
        let mut cmsg = nix::cmsg_space!([RawFd; MAX_FDS]);
        let mut iov = [IoSliceMut::new(&mut buf)];
        let msg = socket::recvmsg::<UnixAddr>(
            self.fd.as_raw_fd(),
            &mut iov,
            Some(&mut cmsg),
            MsgFlags::MSG_CMSG_CLOEXEC,
        )
        .map_err(|e| HandoverError::Io {
            name: self.name.clone(),
            op: "receive",
            error: e.into(),
        })?;
        let mut fds = Vec::new();
        for c in msg.cmsgs().map_err(|e| self.protocol(e.to_string()))? {
            if let ControlMessageOwned::ScmRights(raw) = c {
                // SAFETY: the kernel just installed these descriptors in this process for us.
                fds.extend(
                    raw.into_iter()
                        .map(|fd| unsafe { OwnedFd::from_raw_fd(fd) }),
                );
            }
        }
        if msg
            .flags
            .intersects(MsgFlags::MSG_TRUNC | MsgFlags::MSG_CTRUNC)
        {
            return Err(self.protocol("a message or its descriptors did not fit"));
        }
        let len = msg.bytes;
        if len == 0 {
            return Ok(None);
        }
        let parsed = serde_json::from_slice(&buf[..len])
            .map_err(|e| self.protocol(format!("malformed message: {e}")))?;
        Ok(Some((parsed, fds)))
    }
}

fn io_error(name: &str, op: &'static str, e: Errno) -> HandoverError {
    HandoverError::Io {
        name: name.to_string(),
        op,
        error: e.into(),
    }
}

/// A `SOCK_SEQPACKET` Unix socket (close-on-exec, plus `flags`) and the abstract address `name`.
fn seqpacket(name: &str, flags: SockFlag) -> Result<(OwnedFd, UnixAddr), HandoverError> {
    let fd = socket::socket(
        AddressFamily::Unix,
        SockType::SeqPacket,
        SockFlag::SOCK_CLOEXEC | flags,
        None,
    )
    .map_err(|e| io_error(name, "create", e))?;
    let addr = UnixAddr::new_abstract(name.as_bytes()).map_err(|e| io_error(name, "name", e))?;
    Ok((fd, addr))
}

/// The sockets a new agent received from the one it replaces.
pub struct Handed {
    /// The agent handed over from, now draining.
    pub predecessor: i32,
    sockets: Vec<(Role, OwnedFd)>,
    /// Its counters when it handed over (Prometheus text).
    pub counters: String,
    conn: Option<Conn>,
}

impl std::fmt::Debug for Handed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Handed")
            .field("predecessor", &self.predecessor)
            .field("sockets", &self.sockets.len())
            .finish_non_exhaustive()
    }
}

/// The rest of a handover: the old agent's drain.
pub struct DrainWatch {
    conn: Conn,
}

impl DrainWatch {
    /// Blocks until the old agent has drained; returns its final counters (Prometheus text).
    pub fn wait(self) -> Result<String, HandoverError> {
        let conn = self.conn;
        // The drain takes as long as the connections the old agent holds.
        socket::setsockopt(&conn.fd, sockopt::ReceiveTimeout, &TimeVal::new(0, 0)).map_err(
            |e| HandoverError::Io {
                name: conn.name.clone(),
                op: "clear the timeout",
                error: e.into(),
            },
        )?;
        let mut counters = String::new();
        loop {
            match conn.recv()? {
                Some((Message::Counters { chunk, .. }, _)) => counters.push_str(&chunk),
                Some((Message::Drained, _)) => return Ok(counters),
                Some((other, _)) => return Err(conn.protocol(format!("unexpected {other:?}"))),
                None => {
                    return Err(conn.protocol(format!(
                        "the previous agent (pid {}) ended without reporting the end of its drain",
                        conn.pid
                    )))
                }
            }
        }
    }
}

impl Handed {
    /// The old agent's drain, to wait for (once).
    pub fn drain_watch(&mut self) -> Option<DrainWatch> {
        self.conn.take().map(|conn| DrainWatch { conn })
    }

    /// Removes and returns the sockets handed for `role`.
    pub fn take(&mut self, role: Role) -> Vec<OwnedFd> {
        let (taken, kept) = std::mem::take(&mut self.sockets)
            .into_iter()
            .partition(|(r, _)| *r == role);
        self.sockets = kept;
        taken.into_iter().map(|(_, fd)| fd).collect()
    }

    /// The listener handed for `role` if it listens on `addr`. One that does not (the new agent
    /// was configured another address) is closed.
    pub fn listener(
        &mut self,
        role: Role,
        addr: std::net::SocketAddr,
    ) -> Option<std::net::TcpListener> {
        self.take(role)
            .into_iter()
            .map(std::net::TcpListener::from)
            .find(|l| l.local_addr().is_ok_and(|a| a == addr))
    }
}

/// Whether an agent listens on the handover socket of `pin_dir` (probed with a connection that
/// asks for nothing; the agent ignores it).
pub fn running(pin_dir: &Path) -> bool {
    let Ok(name) = socket_name(pin_dir) else {
        return false;
    };
    let Ok((fd, addr)) = seqpacket(&name, SockFlag::empty()) else {
        return false;
    };
    socket::connect(fd.as_raw_fd(), &addr).is_ok()
}

/// Connects to the agent running on `pin_dir`, if any, and takes its sockets over. `Ok(None)`:
/// no agent runs there. Once this returns `Ok(Some)`, the previous agent no longer accepts and
/// has released the pin directory.
pub fn take_over(pin_dir: &Path) -> Result<Option<Handed>, HandoverError> {
    let Ok(name) = socket_name(pin_dir) else {
        return Ok(None);
    };
    let (fd, addr) = seqpacket(&name, SockFlag::empty())?;
    match socket::connect(fd.as_raw_fd(), &addr) {
        Ok(()) => {}
        Err(Errno::ECONNREFUSED | Errno::ENOENT) => return Ok(None),
        Err(e) => return Err(io_error(&name, "connect", e)),
    }
    let conn = Conn::new(fd, &name)?;
    conn.send(&Message::Request { version: VERSION }, &[])?;
    let mut sockets = Vec::new();
    let mut counters = String::new();
    loop {
        match conn.recv()? {
            None => {
                return Err(conn.protocol(format!(
                    "the running agent (pid {}) closed the connection before releasing",
                    conn.pid
                )))
            }
            Some((Message::Sockets { roles }, fds)) => {
                if roles.len() != fds.len() {
                    return Err(conn.protocol(format!(
                        "{} roles for {} descriptors",
                        roles.len(),
                        fds.len()
                    )));
                }
                sockets.extend(roles.into_iter().zip(fds));
            }
            Some((Message::Counters { chunk, .. }, _)) => counters.push_str(&chunk),
            Some((Message::Released { .. }, _)) => {
                return Ok(Some(Handed {
                    predecessor: conn.pid,
                    sockets,
                    counters,
                    conn: Some(conn),
                }))
            }
            Some((Message::Refused { reason }, _)) => {
                return Err(HandoverError::Refused {
                    pid: conn.pid,
                    reason,
                })
            }
            Some((other, _)) => return Err(conn.protocol(format!("unexpected {other:?}"))),
        }
    }
}

/// A new agent asking to take over, greeted and checked.
pub struct Successor {
    conn: Conn,
}

impl Successor {
    pub fn pid(&self) -> i32 {
        self.conn.pid
    }

    fn send_counters(&self, text: &str) -> Result<(), HandoverError> {
        let mut rest = text;
        loop {
            let mut at = rest.len().min(COUNTER_CHUNK);
            while !rest.is_char_boundary(at) {
                at -= 1;
            }
            let (chunk, tail) = rest.split_at(at);
            let last = tail.is_empty();
            self.conn.send(
                &Message::Counters {
                    chunk: chunk.to_string(),
                    last,
                },
                &[],
            )?;
            if last {
                return Ok(());
            }
            rest = tail;
        }
    }

    /// Sends `sockets` (duplicates arrive at the successor; ours stay open).
    pub fn send_sockets(&self, sockets: &[(Role, BorrowedFd<'_>)]) -> Result<(), HandoverError> {
        for chunk in sockets.chunks(MAX_FDS) {
            let roles = chunk.iter().map(|(r, _)| *r).collect();
            let fds: Vec<RawFd> = chunk.iter().map(|(_, fd)| fd.as_raw_fd()).collect();
            self.conn.send(&Message::Sockets { roles }, &fds)?;
        }
        Ok(())
    }

    /// Tells the successor that this agent stopped accepting and released the pin directory,
    /// with its `counters` (Prometheus text) so far.
    pub fn released(&self, counters: &str) -> Result<(), HandoverError> {
        self.send_counters(counters)?;
        self.conn.send(
            &Message::Released {
                pid: std::process::id(),
            },
            &[],
        )
    }

    /// Tells the successor the drain is over, with the final `counters`.
    pub fn drained(self, counters: &str) -> Result<(), HandoverError> {
        self.send_counters(counters)?;
        self.conn.send(&Message::Drained, &[])
    }

    pub fn refuse(self, reason: &str) {
        let _ = self.conn.send(
            &Message::Refused {
                reason: reason.to_string(),
            },
            &[],
        );
    }
}

/// The running agent's end: where successors connect.
pub struct Endpoint {
    fd: AsyncFd<OwnedFd>,
    name: String,
}

impl Endpoint {
    /// Listens on the handover socket of `pin_dir`. Fails if another agent does.
    pub fn bind(pin_dir: &Path) -> Result<Endpoint, HandoverError> {
        let name = socket_name(pin_dir).map_err(|e| HandoverError::Io {
            name: pin_dir.display().to_string(),
            op: "name the handover socket after the pin directory",
            error: e,
        })?;
        let (fd, addr) = seqpacket(&name, SockFlag::SOCK_NONBLOCK)?;
        socket::bind(fd.as_raw_fd(), &addr).map_err(|e| io_error(&name, "bind", e))?;
        socket::listen(&fd, Backlog::new(8).expect("small backlog"))
            .map_err(|e| io_error(&name, "listen", e))?;
        // SAFETY: the AsyncFd owns the descriptor, so it stays open and the same while it lives.
        let fd = unsafe { AsyncFd::register(fd) }.map_err(|e| HandoverError::Io {
            name: name.clone(),
            op: "register",
            error: e.into(),
        })?;
        Ok(Endpoint { fd, name })
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// Accepts successors for as long as the returned receiver lives. Each one is greeted (its
    /// uid and protocol version checked) on a blocking thread, so a silent peer holds nothing.
    pub fn serve(self) -> (mpsc::Receiver<Successor>, tokio::task::JoinHandle<()>) {
        let (tx, rx) = mpsc::channel(1);
        let task = tokio::spawn(async move {
            loop {
                let fd = match self.accept().await {
                    Ok(fd) => fd,
                    Err(e) => {
                        tracing::warn!(socket = %self.name, error = %e, "handover accept failed");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    }
                };
                let (name, tx) = (self.name.clone(), tx.clone());
                tokio::task::spawn_blocking(move || match greet(fd, &name) {
                    Ok(Some(successor)) => {
                        tracing::info!(pid = successor.pid(), "a new agent asks to take over");
                        let _ = tx.blocking_send(successor);
                    }
                    // A probe ([`running`]): connected, asked nothing.
                    Ok(None) => tracing::debug!("handover socket probed"),
                    Err(e) => tracing::warn!(error = %e, "handover request rejected"),
                });
            }
        });
        (rx, task)
    }

    async fn accept(&self) -> io::Result<OwnedFd> {
        loop {
            let mut guard = self.fd.readable().await?;
            match guard.try_io(|fd| {
                socket::accept4(fd.as_raw_fd(), SockFlag::SOCK_CLOEXEC).map_err(io::Error::from)
            }) {
                // SAFETY: accept4 returned a new descriptor that nothing else owns.
                Ok(result) => return result.map(|fd| unsafe { OwnedFd::from_raw_fd(fd) }),
                Err(_would_block) => continue,
            }
        }
    }
}

fn greet(fd: OwnedFd, name: &str) -> Result<Option<Successor>, HandoverError> {
    let conn = Conn::new(fd, name)?;
    match conn.recv()? {
        None => Ok(None),
        Some((Message::Request { version }, _)) if version == VERSION => {
            Ok(Some(Successor { conn }))
        }
        Some((Message::Request { version }, _)) => {
            let reason = format!("protocol version {version} is not {VERSION}");
            Successor { conn }.refuse(&reason);
            Err(HandoverError::Protocol {
                name: name.to_string(),
                problem: reason,
            })
        }
        other => Err(conn.protocol(format!("expected a request, got {other:?}"))),
    }
}

#[cfg(test)]
mod tests;

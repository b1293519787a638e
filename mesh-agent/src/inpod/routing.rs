//! In-pod routing that lets the inbound proxy keep the client's source address.
//!
//! The proxy connects to the application from a transparent socket bound to the client's IP and
//! marked [`INBOUND_MARK`]. With `net.ipv4.tcp_fwmark_accept=1` the application's accepted socket
//! inherits that mark (and with `fwmark_reflect` so do the kernel's resets for a closed port), and
//! a policy rule sends everything carrying it to a table whose only route is "local": the
//! application's replies come back to the proxy instead of leaving the pod. This
//! is what Istio does with iptables CONNMARK; here it is three sysctls, two rules and one route per
//! family, programmed over netlink inside the pod's namespace. Unmarked traffic is unaffected.
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::Path;

use mesh_common::{INBOUND_MARK, INBOUND_ROUTE_TABLE};

/// Priority of the mark rule: before the `local` table, so the proxy's marked connection to the
/// pod's own address also takes the `local default dev lo` route (it then arrives on `lo`, which
/// the sk_lookup program leaves alone).
const MARK_RULE_PRIORITY: u32 = 50;
/// Where the `local` table's rule moves to (from 0), as Cilium does.
const LOCAL_RULE_PRIORITY: u32 = 100;
const RT_TABLE_LOCAL: u32 = 255;
// Netlink constants (linux/netlink.h, linux/rtnetlink.h, linux/fib_rules.h).
const NLMSG_ERROR: u16 = 2;
const RTM_NEWROUTE: u16 = 24;
const RTM_DELROUTE: u16 = 25;
const RTM_NEWRULE: u16 = 32;
const RTM_DELRULE: u16 = 33;
const NLM_F_REQUEST: u16 = 0x1;
const NLM_F_ACK: u16 = 0x4;
const NLM_F_EXCL: u16 = 0x200;
const NLM_F_CREATE: u16 = 0x400;
const FR_ACT_TO_TBL: u8 = 1;
const FRA_PRIORITY: u16 = 6;
const FRA_FWMARK: u16 = 10;
const FRA_TABLE: u16 = 15;
const FRA_FWMASK: u16 = 16;
const RTA_OIF: u16 = 4;
const RTA_TABLE: u16 = 15;
const RTPROT_STATIC: u8 = 4;
const RT_SCOPE_HOST: u8 = 254;
const RTN_LOCAL: u8 = 2;
const RT_TABLE_UNSPEC: u8 = 0;

/// Sets up the sysctls, the mark rule, the moved `local` rule and the local route in the calling
/// thread's network namespace (call it inside [`super::Netns::run`]). Idempotent.
///
/// `sysctl_dir` is where the node's `/proc/sys` is visible (a container's own is read-only). A
/// net sysctl file answers for the network namespace of the thread that opens it, so opened from
/// inside the pod's namespace it sets the pod's value whatever mount it is reached through.
pub fn install(sysctl_dir: &Path) -> io::Result<()> {
    set_sysctls(sysctl_dir, "1")?;
    let nl = Netlink::open()?;
    let lo = loopback_index()?;
    let create = NLM_F_CREATE | NLM_F_EXCL;
    for family in [libc::AF_INET as u8, libc::AF_INET6 as u8] {
        ignore(
            nl.request(RTM_NEWROUTE, create, &local_route(family, lo)),
            libc::EEXIST,
        )?;
        ignore(
            nl.request(RTM_NEWRULE, create, &mark_rule(family)),
            libc::EEXIST,
        )?;
        // Move `lookup local` from priority 0 to behind the mark rule: the new rule first, so
        // local delivery never has a gap.
        let local = local_rule(family, LOCAL_RULE_PRIORITY);
        ignore(nl.request(RTM_NEWRULE, create, &local), libc::EEXIST)?;
        ignore(
            nl.request(RTM_DELRULE, 0, &local_rule(family, 0)),
            libc::ENOENT,
        )?;
    }
    Ok(())
}

/// Removes what [`install`] added and puts `lookup local` back at priority 0. Idempotent.
pub fn remove(sysctl_dir: &Path) -> io::Result<()> {
    let nl = Netlink::open()?;
    let lo = loopback_index()?;
    for family in [libc::AF_INET as u8, libc::AF_INET6 as u8] {
        let local = local_rule(family, 0);
        ignore(
            nl.request(RTM_NEWRULE, NLM_F_CREATE | NLM_F_EXCL, &local),
            libc::EEXIST,
        )?;
        let moved = local_rule(family, LOCAL_RULE_PRIORITY);
        ignore(nl.request(RTM_DELRULE, 0, &moved), libc::ENOENT)?;
        ignore(nl.request(RTM_DELRULE, 0, &mark_rule(family)), libc::ENOENT)?;
        ignore(
            nl.request(RTM_DELROUTE, 0, &local_route(family, lo)),
            libc::ESRCH,
        )?;
    }
    set_sysctls(sysctl_dir, "0")
}

/// Accepted sockets take the mark of the SYN; resets and ICMP errors the kernel sends in reply
/// take the mark of what they answer (so a refused connect reaches the proxy at once).
const SYSCTLS: [&str; 3] = [
    "net/ipv4/tcp_fwmark_accept",
    "net/ipv4/fwmark_reflect",
    "net/ipv6/fwmark_reflect",
];

fn set_sysctls(sysctl_dir: &Path, value: &str) -> io::Result<()> {
    for name in SYSCTLS {
        let path = sysctl_dir.join(name);
        std::fs::write(&path, value).map_err(|e| {
            let hint = if e.kind() == io::ErrorKind::ReadOnlyFilesystem {
                " (a container's /proc/sys is read-only: mount the node's /proc/sys/net and \
                 pass --sysctl-dir)"
            } else {
                ""
            };
            io::Error::new(e.kind(), format!("{}: {e}{hint}", path.display()))
        })?;
    }
    Ok(())
}

/// Treats `errno` (already there, already gone) as success.
fn ignore(result: io::Result<()>, errno: i32) -> io::Result<()> {
    match result {
        Err(e) if e.raw_os_error() == Some(errno) => Ok(()),
        other => other,
    }
}

fn loopback_index() -> io::Result<u32> {
    // SAFETY: a NUL-terminated literal.
    let index = unsafe { libc::if_nametoindex(c"lo".as_ptr()) };
    if index == 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(index)
}

fn attr(buf: &mut Vec<u8>, kind: u16, value: u32) {
    buf.extend_from_slice(&8u16.to_ne_bytes());
    buf.extend_from_slice(&kind.to_ne_bytes());
    buf.extend_from_slice(&value.to_ne_bytes());
}

/// `fib_rule_hdr` of a "lookup <table>" rule.
fn rule_header(family: u8) -> Vec<u8> {
    let mut b = vec![family, 0, 0, 0, RT_TABLE_UNSPEC, 0, 0, FR_ACT_TO_TBL];
    b.extend_from_slice(&0u32.to_ne_bytes()); // flags
    b
}

/// `fwmark INBOUND_MARK/0xfff lookup INBOUND_ROUTE_TABLE pref 50`.
fn mark_rule(family: u8) -> Vec<u8> {
    let mut b = rule_header(family);
    attr(&mut b, FRA_FWMARK, INBOUND_MARK);
    attr(&mut b, FRA_FWMASK, 0xfff);
    attr(&mut b, FRA_TABLE, INBOUND_ROUTE_TABLE);
    attr(&mut b, FRA_PRIORITY, MARK_RULE_PRIORITY);
    b
}

/// `lookup local pref <priority>`.
fn local_rule(family: u8, priority: u32) -> Vec<u8> {
    let mut b = rule_header(family);
    attr(&mut b, FRA_TABLE, RT_TABLE_LOCAL);
    attr(&mut b, FRA_PRIORITY, priority);
    b
}

/// `rtmsg` + attributes: `local default dev lo table INBOUND_ROUTE_TABLE`.
fn local_route(family: u8, lo: u32) -> Vec<u8> {
    let mut b = vec![
        family,
        0,
        0,
        0,
        RT_TABLE_UNSPEC,
        RTPROT_STATIC,
        RT_SCOPE_HOST,
        RTN_LOCAL,
    ];
    b.extend_from_slice(&0u32.to_ne_bytes()); // flags
    attr(&mut b, RTA_TABLE, INBOUND_ROUTE_TABLE);
    attr(&mut b, RTA_OIF, lo);
    b
}

/// A NETLINK_ROUTE socket of the namespace it was created in.
struct Netlink {
    fd: OwnedFd,
}

impl Netlink {
    fn open() -> io::Result<Netlink> {
        // SAFETY: plain socket(2); checked and owned at once.
        let fd = unsafe {
            libc::socket(
                libc::AF_NETLINK,
                libc::SOCK_RAW | libc::SOCK_CLOEXEC,
                libc::NETLINK_ROUTE,
            )
        };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: fd is a fresh descriptor we own.
        Ok(Netlink {
            fd: unsafe { OwnedFd::from_raw_fd(fd) },
        })
    }

    /// Sends one request and waits for its acknowledgement.
    fn request(&self, kind: u16, flags: u16, payload: &[u8]) -> io::Result<()> {
        let len = 16 + payload.len();
        let mut msg = Vec::with_capacity(len);
        msg.extend_from_slice(&(len as u32).to_ne_bytes());
        msg.extend_from_slice(&kind.to_ne_bytes());
        msg.extend_from_slice(&(flags | NLM_F_REQUEST | NLM_F_ACK).to_ne_bytes());
        msg.extend_from_slice(&1u32.to_ne_bytes()); // sequence
        msg.extend_from_slice(&0u32.to_ne_bytes()); // port id: the kernel fills it in
        msg.extend_from_slice(payload);
        // SAFETY: msg is a valid buffer of msg.len() bytes; the kernel is the default destination.
        if unsafe { libc::send(self.fd.as_raw_fd(), msg.as_ptr().cast(), msg.len(), 0) } < 0 {
            return Err(io::Error::last_os_error());
        }
        let mut reply = [0u8; 1024];
        // SAFETY: reply is writable for its whole length.
        let n = unsafe {
            libc::recv(
                self.fd.as_raw_fd(),
                reply.as_mut_ptr().cast(),
                reply.len(),
                0,
            )
        };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        let n = n as usize;
        if n >= 20 && u16::from_ne_bytes([reply[4], reply[5]]) == NLMSG_ERROR {
            let code = i32::from_ne_bytes([reply[16], reply[17], reply[18], reply[19]]);
            if code != 0 {
                return Err(io::Error::from_raw_os_error(-code));
            }
            return Ok(());
        }
        Err(io::Error::other("unexpected netlink reply"))
    }
}

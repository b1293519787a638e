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
use std::path::Path;

use mesh_common::{INBOUND_MARK, INBOUND_ROUTE_TABLE};
use netlink_packet_core::{
    NetlinkHeader, NetlinkMessage, NetlinkPayload, NLM_F_ACK, NLM_F_CREATE, NLM_F_EXCL,
    NLM_F_REQUEST,
};
use netlink_packet_route::route::{
    RouteAttribute, RouteMessage, RouteProtocol, RouteScope, RouteType,
};
use netlink_packet_route::rule::{RuleAction, RuleAttribute, RuleMessage};
use netlink_packet_route::{AddressFamily, RouteNetlinkMessage};
use netlink_sys::{protocols::NETLINK_ROUTE, Socket, SocketAddr};
use nix::errno::Errno;

/// Priority of the mark rule: before the `local` table, so the proxy's marked connection to the
/// pod's own address also takes the `local default dev lo` route (it then arrives on `lo`, which
/// the sk_lookup program leaves alone).
const MARK_RULE_PRIORITY: u32 = 50;
/// Where the `local` table's rule moves to (from 0), as Cilium does.
const LOCAL_RULE_PRIORITY: u32 = 100;
/// The mark bits the mark rule compares (`fwmark INBOUND_MARK/0xfff`).
const MARK_RULE_MASK: u32 = 0xfff;
/// `RT_TABLE_LOCAL`: the table of the addresses the namespace owns.
const RT_TABLE_LOCAL: u32 = 255;

/// Both address families, with the name error messages give them.
const FAMILIES: [(AddressFamily, &str); 2] = [
    (AddressFamily::Inet, "IPv4"),
    (AddressFamily::Inet6, "IPv6"),
];

/// Sets up the sysctls, the mark rule, the moved `local` rule and the local route in the calling
/// thread's network namespace (call it inside [`super::Netns::run`]). Idempotent.
///
/// `sysctl_dir` is where the node's `/proc/sys` is visible (a container's own is read-only). A
/// net sysctl file answers for the network namespace of the thread that opens it, so opened from
/// inside the pod's namespace it sets the pod's value whatever mount it is reached through.
pub fn install(sysctl_dir: &Path) -> io::Result<()> {
    set_sysctls(sysctl_dir, "1")?;
    let mut nl = Rtnl::open()?;
    let lo = loopback_index()?;
    for (family, name) in FAMILIES {
        nl.add(
            RouteNetlinkMessage::NewRoute(local_route(family, lo)),
            &format!("adding the inbound local route ({name}, table {INBOUND_ROUTE_TABLE})"),
        )?;
        nl.add(
            RouteNetlinkMessage::NewRule(mark_rule(family)),
            &format!("adding the inbound mark rule ({name})"),
        )?;
        // Move `lookup local` from priority 0 to behind the mark rule: the new rule first, so
        // local delivery never has a gap.
        nl.add(
            RouteNetlinkMessage::NewRule(local_rule(family, LOCAL_RULE_PRIORITY)),
            &format!("adding the `lookup local` rule at priority {LOCAL_RULE_PRIORITY} ({name})"),
        )?;
        nl.delete(
            RouteNetlinkMessage::DelRule(local_rule(family, 0)),
            Errno::ENOENT,
            &format!("removing the `lookup local` rule at priority 0 ({name})"),
        )?;
    }
    Ok(())
}

/// Removes what [`install`] added and puts `lookup local` back at priority 0. Idempotent.
pub fn remove(sysctl_dir: &Path) -> io::Result<()> {
    let mut nl = Rtnl::open()?;
    let lo = loopback_index()?;
    for (family, name) in FAMILIES {
        nl.add(
            RouteNetlinkMessage::NewRule(local_rule(family, 0)),
            &format!("restoring the `lookup local` rule at priority 0 ({name})"),
        )?;
        nl.delete(
            RouteNetlinkMessage::DelRule(local_rule(family, LOCAL_RULE_PRIORITY)),
            Errno::ENOENT,
            &format!("removing the `lookup local` rule at priority {LOCAL_RULE_PRIORITY} ({name})"),
        )?;
        nl.delete(
            RouteNetlinkMessage::DelRule(mark_rule(family)),
            Errno::ENOENT,
            &format!("removing the inbound mark rule ({name})"),
        )?;
        // A route that is not there (or a table that does not exist) is ESRCH, not ENOENT.
        nl.delete(
            RouteNetlinkMessage::DelRoute(local_route(family, lo)),
            Errno::ESRCH,
            &format!("removing the inbound local route ({name}, table {INBOUND_ROUTE_TABLE})"),
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

fn loopback_index() -> io::Result<u32> {
    nix::net::if_::if_nametoindex("lo")
        .map_err(|e| failed("looking up the loopback interface", e.into()))
}

/// `fwmark INBOUND_MARK/0xfff lookup INBOUND_ROUTE_TABLE pref 50`.
fn mark_rule(family: AddressFamily) -> RuleMessage {
    let mut rule = lookup_rule(family, INBOUND_ROUTE_TABLE, MARK_RULE_PRIORITY);
    rule.attributes.extend([
        RuleAttribute::FwMark(INBOUND_MARK),
        RuleAttribute::FwMask(MARK_RULE_MASK),
    ]);
    rule
}

/// `lookup local pref <priority>`.
fn local_rule(family: AddressFamily, priority: u32) -> RuleMessage {
    lookup_rule(family, RT_TABLE_LOCAL, priority)
}

/// `lookup <table> pref <priority>`. The header's table stays `RT_TABLE_UNSPEC`: the attribute
/// carries it (it can name tables above 255).
fn lookup_rule(family: AddressFamily, table: u32, priority: u32) -> RuleMessage {
    let mut rule = RuleMessage::default();
    rule.header.family = family;
    rule.header.action = RuleAction::ToTable;
    rule.attributes = vec![
        RuleAttribute::Table(table),
        RuleAttribute::Priority(priority),
    ];
    rule
}

/// `local default dev lo proto static scope host table INBOUND_ROUTE_TABLE`.
fn local_route(family: AddressFamily, lo: u32) -> RouteMessage {
    let mut route = RouteMessage::default();
    route.header.address_family = family;
    route.header.protocol = RouteProtocol::Static;
    route.header.scope = RouteScope::Host;
    route.header.kind = RouteType::Local;
    route.attributes = vec![
        RouteAttribute::Table(INBOUND_ROUTE_TABLE),
        RouteAttribute::Oif(lo),
    ];
    route
}

/// `<what> in the pod: <reason>`, of the same kind as `e` (the errno's description without the
/// "(os error N)" suffix).
fn failed(what: &str, e: io::Error) -> io::Error {
    let reason = match e.raw_os_error() {
        Some(code) => Errno::from_raw(code).desc().to_string(),
        None => e.to_string(),
    };
    io::Error::new(e.kind(), format!("{what} in the pod: {reason}"))
}

/// A NETLINK_ROUTE socket of the namespace it was created in, and the sequence number of its
/// last request.
struct Rtnl {
    socket: Socket,
    sequence: u32,
}

impl Rtnl {
    fn open() -> io::Result<Rtnl> {
        let socket =
            Socket::new(NETLINK_ROUTE).map_err(|e| failed("opening a route netlink socket", e))?;
        Ok(Rtnl {
            socket,
            sequence: 0,
        })
    }

    /// Creates what `message` describes; one that is already there is success.
    fn add(&mut self, message: RouteNetlinkMessage, what: &str) -> io::Result<()> {
        self.request(message, NLM_F_CREATE | NLM_F_EXCL, Errno::EEXIST, what)
    }

    /// Deletes what `message` describes; `absent` (the kernel's answer when it is not there) is
    /// success.
    fn delete(
        &mut self,
        message: RouteNetlinkMessage,
        absent: Errno,
        what: &str,
    ) -> io::Result<()> {
        self.request(message, 0, absent, what)
    }

    /// Sends one request and waits for its acknowledgement; the error `ignored` counts as one.
    fn request(
        &mut self,
        message: RouteNetlinkMessage,
        flags: u16,
        ignored: Errno,
        what: &str,
    ) -> io::Result<()> {
        match self.exchange(message, flags) {
            Err(e) if e.raw_os_error() == Some(ignored as i32) => Ok(()),
            result => result.map_err(|e| failed(what, e)),
        }
    }

    fn exchange(&mut self, message: RouteNetlinkMessage, flags: u16) -> io::Result<()> {
        self.sequence = self.sequence.wrapping_add(1);
        let mut header = NetlinkHeader::default();
        header.flags = flags | NLM_F_REQUEST | NLM_F_ACK;
        header.sequence_number = self.sequence;
        let mut request = NetlinkMessage::new(header, NetlinkPayload::InnerMessage(message));
        request.finalize();
        let mut buf = vec![0; request.buffer_len()];
        request.serialize(&mut buf);
        // Port 0 is the kernel.
        self.socket.send_to(&buf, &SocketAddr::new(0, 0), 0)?;

        let (reply, _) = self.socket.recv_from_full()?;
        let reply = NetlinkMessage::<RouteNetlinkMessage>::deserialize(&reply).map_err(|e| {
            io::Error::new(
                io::ErrorKind::InvalidData,
                format!("unreadable netlink reply: {e}"),
            )
        })?;
        if reply.header.sequence_number != self.sequence {
            return Err(io::Error::other(format!(
                "netlink reply to request {} while waiting for {}",
                reply.header.sequence_number, self.sequence
            )));
        }
        match reply.payload {
            NetlinkPayload::Error(e) if e.code.is_none() => Ok(()),
            NetlinkPayload::Error(e) => Err(e.to_io()),
            other => Err(io::Error::other(format!(
                "unexpected netlink reply (type {})",
                other.message_type()
            ))),
        }
    }
}

#[cfg(test)]
mod tests;

//! `sk_lookup`, attached to each enrolled pod's network namespace: inbound TCP that arrives from
//! outside the pod is handed to the proxy's plaintext listener (15006) in that namespace, so no
//! plaintext reaches an enrolled application without passing the proxy.
//!
//! The listener is found in `INBOUND_LSN` under the packet's destination address: the pod's own
//! IP, unique per pod, so one map serves every pod. The accepted socket keeps the packet's
//! addresses, so the proxy reads the original destination port from its `local_addr()`.
//!
//! Left to the normal socket lookup (`SK_PASS` without assigning):
//! * anything but TCP;
//! * what the pod sends to itself. `ingress_ifindex` is not simply the device the packet came
//!   in on: for traffic to a local address the kernel reports the device the *route* points to
//!   (`rt_iif`, the device that owns the address). So:
//!   * `ingress_ifindex` 1 (`lo`) covers `127.0.0.0/8` and `::1`, and the proxy's transparent
//!     sockets to the application (source: the client's address; marked `INBOUND_MARK`), but
//!     only if the in-pod rule for that mark sends them to the `local default dev lo` route of
//!     `INBOUND_ROUTE_TABLE` *before* the `local` table is consulted. If the `local` table
//!     comes first (its rule has priority 0), its route for the pod's address, whose device is
//!     the pod's interface, decides, and those connections would be captured;
//!   * a connection from the pod to its own address reports the pod's interface instead, but
//!     its source address is then that same address (a packet from outside with a local source
//!     is dropped as martian before any socket lookup), so "source == destination" covers it,
//!     including the proxy's unmarked fallback connections to the application;
//! * the mesh's own ports (15008 HBONE, 15001, 15006) and the excluded ports (`EXCL_PORTS`).
//!
//! Everything else is dropped when there is no listener to hand it to (`SK_DROP`): fail closed.
//! The program is attached only while the pod is enrolled, and the agent registers the listener
//! before attaching and detaches before closing it, so this only happens while no agent serves
//! the pod (it exited or crashed; its links stay pinned): plaintext from outside must not reach
//! an enrolled application then, bypassing STRICT mTLS and every policy. The lookup finds no
//! socket, so the kernel answers the SYN with a reset: the client is refused at once.
use core::ptr::{addr_of, read_volatile};

use aya_ebpf::{macros::sk_lookup, programs::SkLookupContext};
use aya_log_ebpf::debug;
use mesh_common::{
    ListenerKey, AF_INET, AF_INET6, HBONE_PORT, INBOUND_PLAINTEXT_PORT, LOOPBACK_IFINDEX,
    OUTBOUND_PORT,
};

use crate::{
    maps::{log_on, EXCL_PORTS, INBOUND_LSN},
    sockaddr::{v4_mapped, words_to_bytes},
};

/// `SK_PASS`: continue with (or keep) the socket the lookup selected.
const SK_PASS: u32 = 1;
/// `SK_DROP`: drop the packet.
const SK_DROP: u32 = 0;
const IPPROTO_TCP: u32 = 6;

#[sk_lookup]
pub fn mesh_sklookup(ctx: SkLookupContext) -> u32 {
    if let Some(key) = captured(&ctx) {
        // No listener registered (ENOENT) or one that cannot take this packet: fail closed.
        if INBOUND_LSN.redirect_sk_lookup(&ctx, key, 0).is_err() {
            if log_on() {
                debug!(
                    &ctx,
                    "sk_lookup: no proxy listener for this pod's address: dropped"
                );
            }
            return SK_DROP;
        }
    }
    SK_PASS
}

/// The fields of `struct bpf_sk_lookup` the program looks at.
struct Lookup {
    protocol: u32,
    ingress_ifindex: u32,
    /// Host order.
    local_port: u32,
    family: u32,
    /// Network-order words.
    remote_ip4: u32,
    local_ip4: u32,
    remote_ip6: [u32; 4],
    local_ip6: [u32; 4],
}

impl Lookup {
    /// Reads every field up front, one 4-byte load each at a constant offset from the context
    /// pointer. Read lazily in the branches, LLVM shares one `ctx + offset` pointer between the
    /// IPv4 and IPv6 paths, and the verifier refuses loads through a modified context pointer.
    #[inline(always)]
    fn read(ctx: &SkLookupContext) -> Lookup {
        let p = ctx.lookup;
        // SAFETY: `p` is the program's context; every field read here is readable by sk_lookup
        // programs with a 4-byte load.
        unsafe {
            Lookup {
                protocol: read_volatile(addr_of!((*p).protocol)),
                ingress_ifindex: read_volatile(addr_of!((*p).ingress_ifindex)),
                local_port: read_volatile(addr_of!((*p).local_port)),
                family: read_volatile(addr_of!((*p).family)),
                remote_ip4: read_volatile(addr_of!((*p).remote_ip4)),
                local_ip4: read_volatile(addr_of!((*p).local_ip4)),
                remote_ip6: [
                    read_volatile(addr_of!((*p).remote_ip6[0])),
                    read_volatile(addr_of!((*p).remote_ip6[1])),
                    read_volatile(addr_of!((*p).remote_ip6[2])),
                    read_volatile(addr_of!((*p).remote_ip6[3])),
                ],
                local_ip6: [
                    read_volatile(addr_of!((*p).local_ip6[0])),
                    read_volatile(addr_of!((*p).local_ip6[1])),
                    read_volatile(addr_of!((*p).local_ip6[2])),
                    read_volatile(addr_of!((*p).local_ip6[3])),
                ],
            }
        }
    }
}

/// The key of the listener this packet is to be assigned to, if it is to be captured.
#[inline(always)]
fn captured(ctx: &SkLookupContext) -> Option<ListenerKey> {
    let l = Lookup::read(ctx);
    if l.protocol != IPPROTO_TCP || l.ingress_ifindex == LOOPBACK_IFINDEX {
        return None;
    }
    if l.local_port > u32::from(u16::MAX) || port_is_exempt(l.local_port as u16) {
        return None;
    }
    let (addr, family) = if l.family == u32::from(AF_INET) {
        if l.remote_ip4 == l.local_ip4 {
            return None;
        }
        (words_to_bytes(v4_mapped(l.local_ip4)), AF_INET)
    } else if l.family == u32::from(AF_INET6) {
        let (r, a) = (&l.remote_ip6, &l.local_ip6);
        if r[0] == a[0] && r[1] == a[1] && r[2] == a[2] && r[3] == a[3] {
            return None;
        }
        (words_to_bytes(l.local_ip6), AF_INET6)
    } else {
        return None;
    };
    Some(ListenerKey {
        addr,
        family,
        _pad: 0,
    })
}

#[inline(always)]
fn port_is_exempt(port: u16) -> bool {
    port == HBONE_PORT
        || port == OUTBOUND_PORT
        || port == INBOUND_PLAINTEXT_PORT
        || EXCL_PORTS.get_ptr(port).is_some()
}

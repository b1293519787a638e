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
//! * packets that arrived on `lo`: the proxy's own connections to the application (and its
//!   transparent sockets) come over loopback, as does everything the pod sends to itself;
//! * the mesh's own ports (15008 HBONE, 15001, 15006) and the excluded ports (`EXCL_PORTS`);
//! * addresses with no registered listener (a pod being set up or torn down is not cut off).
//!
//! The program never drops.
use core::ptr::{addr_of, read_volatile};

use aya_ebpf::{macros::sk_lookup, programs::SkLookupContext};
use mesh_common::{
    ListenerKey, AF_INET, AF_INET6, HBONE_PORT, INBOUND_PLAINTEXT_PORT, LOOPBACK_IFINDEX,
    OUTBOUND_PORT,
};

use crate::{
    maps::{EXCL_PORTS, INBOUND_LSN},
    sockaddr::{v4_mapped, words_to_bytes},
};

/// `SK_PASS`: continue with (or keep) the socket the lookup selected.
const SK_PASS: u32 = 1;
const IPPROTO_TCP: u32 = 6;

#[sk_lookup]
pub fn mesh_sklookup(ctx: SkLookupContext) -> u32 {
    if let Some(key) = captured(&ctx) {
        // No listener registered (ENOENT) or one that cannot take this packet: normal lookup.
        let _ = INBOUND_LSN.redirect_sk_lookup(&ctx, key, 0);
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
    /// Network-order word.
    local_ip4: u32,
    /// Network-order words.
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
                local_ip4: read_volatile(addr_of!((*p).local_ip4)),
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
        (words_to_bytes(v4_mapped(l.local_ip4)), AF_INET)
    } else if l.family == u32::from(AF_INET6) {
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

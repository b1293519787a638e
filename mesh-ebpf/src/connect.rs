//! `cgroup/connect4` and `cgroup/connect6`: send enrolled pods' outbound TCP to the in-pod proxy
//! listener and remember where it was going, keyed by socket cookie.
//!
//! Both programs always return 1: they never refuse a connect, they only rewrite it.
use aya_ebpf::{bindings::BPF_ANY, macros::cgroup_sock_addr, programs::SockAddrContext};
use aya_log_ebpf::debug;
use mesh_common::{
    Enrolled, OrigDst, AF_INET, AF_INET6, COUNTER_CONNECT_NOT_REDIRECTED, HBONE_PORT,
    INBOUND_PLAINTEXT_PORT, OUTBOUND_PORT, PROXY_MARK,
};

use crate::{
    maps::{count, log_on, ENROLLED, EXCL_PORTS, SOCK_DST},
    sockaddr::{
        bytes_to_words, is_v4_mapped, v4_mapped, words_to_bytes, SockAddr, LOOPBACK4,
        LOOPBACK6_LAST,
    },
};

#[cgroup_sock_addr(connect4)]
pub fn mesh_connect4(ctx: SockAddrContext) -> i32 {
    connect4(&SockAddr::new(&ctx));
    1
}

#[cgroup_sock_addr(connect6)]
pub fn mesh_connect6(ctx: SockAddrContext) -> i32 {
    connect6(&SockAddr::new(&ctx));
    1
}

/// What connect4 and connect6 both check first: an enrolled pod's TCP socket that the proxy does
/// not own, to a port that may be redirected. Returns the pod's netns cookie and record.
#[inline(always)]
fn candidate(sa: &SockAddr, port: u16) -> Option<(u64, Enrolled)> {
    if !sa.is_tcp() {
        return None;
    }
    let netns = sa.netns_cookie();
    let pod = ENROLLED.get_ptr(netns)?;
    if sa.mark() == PROXY_MARK || port_is_excluded(port) {
        return None;
    }
    // SAFETY: a map value pointer from a successful lookup; copied at once.
    Some((netns, unsafe { *pod }))
}

#[inline(always)]
fn port_is_excluded(port: u16) -> bool {
    port == OUTBOUND_PORT
        || port == INBOUND_PLAINTEXT_PORT
        || port == HBONE_PORT
        || EXCL_PORTS.get_ptr(port).is_some()
}

/// Loopback, unspecified or the pod's own IPv4 address (network-order word).
#[inline(always)]
fn v4_is_local(ip: u32, pod: &Enrolled) -> bool {
    ip.to_ne_bytes()[0] == 127 || ip == 0 || ip == u32::from_ne_bytes(pod.ip4)
}

/// Stores the record first and rewrites only if that worked: a connection the proxy cannot
/// resolve is worse than one that bypasses it. A failure is counted
/// (`COUNTER_CONNECT_NOT_REDIRECTED`), never silent.
#[inline(always)]
fn remember(sa: &SockAddr, dst: &OrigDst) -> bool {
    let stored = SOCK_DST
        .insert(sa.socket_cookie(), dst, u64::from(BPF_ANY))
        .is_ok();
    if !stored {
        count(COUNTER_CONNECT_NOT_REDIRECTED);
    }
    stored
}

#[inline(always)]
fn connect4(sa: &SockAddr) {
    let port = sa.user_port();
    let Some((netns, pod)) = candidate(sa, port) else {
        return;
    };
    let ip = sa.user_ip4();
    if v4_is_local(ip, &pod) {
        return;
    }
    let dst = OrigDst {
        addr: words_to_bytes(v4_mapped(ip)),
        port,
        family: AF_INET,
        _pad: 0,
        netns,
    };
    let redirected = remember(sa, &dst);
    if redirected {
        sa.set_user_ip4(LOOPBACK4);
        sa.set_user_port(OUTBOUND_PORT);
    }
    if log_on() {
        debug!(
            sa.ctx(),
            "connect4 netns {} to {:i}:{}: {}",
            netns,
            u32::from_be(ip),
            port,
            if redirected {
                "redirected to the proxy"
            } else {
                "NOT redirected (record not stored)"
            }
        );
    }
}

#[inline(always)]
fn connect6(sa: &SockAddr) {
    let port = sa.user_port();
    let Some((netns, pod)) = candidate(sa, port) else {
        return;
    };
    let ip = sa.user_ip6();
    let mapped = is_v4_mapped(&ip);
    if mapped {
        if v4_is_local(ip[3], &pod) {
            return;
        }
    } else {
        let own = bytes_to_words(&pod.ip6);
        let unspecified = ip[0] == 0 && ip[1] == 0 && ip[2] == 0;
        if unspecified && (ip[3] == 0 || ip[3] == LOOPBACK6_LAST) {
            return;
        }
        if ip[0] == own[0] && ip[1] == own[1] && ip[2] == own[2] && ip[3] == own[3] {
            return;
        }
    }
    let dst = OrigDst {
        addr: words_to_bytes(ip),
        port,
        family: AF_INET6,
        _pad: 0,
        netns,
    };
    let redirected = remember(sa, &dst);
    if redirected {
        if mapped {
            sa.set_user_ip6(v4_mapped(LOOPBACK4));
        } else {
            sa.set_user_ip6([0, 0, 0, LOOPBACK6_LAST]);
        }
        sa.set_user_port(OUTBOUND_PORT);
    }
    if log_on() {
        debug!(
            sa.ctx(),
            "connect6 netns {} to [{:i}]:{}: {}",
            netns,
            dst.addr,
            port,
            if redirected {
                "redirected to the proxy"
            } else {
                "NOT redirected (record not stored)"
            }
        );
    }
}

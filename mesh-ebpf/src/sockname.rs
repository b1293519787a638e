//! `cgroup/getsockname4` and `cgroup/getsockname6`: a redirected socket reports the pod's own
//! address as its local address, as it would behind Istio's in-pod redirect, instead of the
//! loopback address its connection to the proxy really has (`127.0.0.1`, `::1` or
//! `::ffff:127.0.0.1`). Protocols and logs that use the local address see the pod's. The port is
//! the socket's real one and stays.
//!
//! The kernel requires these programs to return 1.
use aya_ebpf::{macros::cgroup_sock_addr, programs::SockAddrContext};
use mesh_common::{Enrolled, OrigDst, AF_INET, AF_INET6};

use crate::{
    maps::{ENROLLED, SOCK_DST},
    sockaddr::{bytes_to_words, is_v4_mapped, v4_mapped, SockAddr},
};

#[cgroup_sock_addr(getsockname4)]
pub fn mesh_sockname4(ctx: SockAddrContext) -> i32 {
    let sa = SockAddr::new(&ctx);
    if let Some((dst, pod)) = redirected(&sa) {
        if dst.family == AF_INET && pod.ip4 != [0; 4] {
            sa.set_user_ip4(u32::from_ne_bytes(pod.ip4));
        }
    }
    1
}

#[cgroup_sock_addr(getsockname6)]
pub fn mesh_sockname6(ctx: SockAddrContext) -> i32 {
    let sa = SockAddr::new(&ctx);
    if let Some((dst, pod)) = redirected(&sa) {
        if dst.family == AF_INET6 {
            // An IPv6 socket that connected to an IPv4-mapped address has a mapped local one.
            if is_v4_mapped(&bytes_to_words(&dst.addr)) {
                if pod.ip4 != [0; 4] {
                    sa.set_user_ip6(v4_mapped(u32::from_ne_bytes(pod.ip4)));
                }
            } else if pod.ip6 != [0; 16] {
                sa.set_user_ip6(bytes_to_words(&pod.ip6));
            }
        }
    }
    1
}

/// The original destination of this socket and its pod, if connect4/6 redirected it.
#[inline(always)]
fn redirected(sa: &SockAddr) -> Option<(OrigDst, Enrolled)> {
    let p = SOCK_DST.get_ptr(sa.socket_cookie())?;
    // SAFETY: a map value pointer from a successful lookup; copied at once.
    let dst = unsafe { *p };
    let pod = ENROLLED.get_ptr(dst.netns)?;
    // SAFETY: as above.
    Some((dst, unsafe { *pod }))
}

//! `cgroup/getpeername4` and `cgroup/getpeername6`: a redirected socket reports its original
//! destination as its peer, not the proxy's `127.0.0.1:15001`.
//!
//! The kernel requires these programs to return 1.
use aya_ebpf::{macros::cgroup_sock_addr, programs::SockAddrContext};
use mesh_common::{OrigDst, AF_INET, AF_INET6};

use crate::{
    maps::SOCK_DST,
    sockaddr::{bytes_to_words, SockAddr},
};

#[cgroup_sock_addr(getpeername4)]
pub fn mesh_peername4(ctx: SockAddrContext) -> i32 {
    let sa = SockAddr::new(&ctx);
    if let Some(dst) = recorded(&sa, AF_INET) {
        sa.set_user_ip4(bytes_to_words(&dst.addr)[3]);
        sa.set_user_port(dst.port);
    }
    1
}

#[cgroup_sock_addr(getpeername6)]
pub fn mesh_peername6(ctx: SockAddrContext) -> i32 {
    let sa = SockAddr::new(&ctx);
    if let Some(dst) = recorded(&sa, AF_INET6) {
        sa.set_user_ip6(bytes_to_words(&dst.addr));
        sa.set_user_port(dst.port);
    }
    1
}

/// The original destination of this socket, if connect4/6 redirected it. The family check only
/// guards against writing an address of the wrong family into the reply.
#[inline(always)]
fn recorded(sa: &SockAddr, family: u16) -> Option<OrigDst> {
    let p = SOCK_DST.get_ptr(sa.socket_cookie())?;
    // SAFETY: a map value pointer from a successful lookup; copied at once.
    let dst = unsafe { *p };
    (dst.family == family).then_some(dst)
}

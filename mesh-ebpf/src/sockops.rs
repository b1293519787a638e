//! `sockops`: when a redirected socket is established, re-key its original destination so the
//! proxy can find it on `accept`, and forget the socket-cookie record once the socket closes.
use aya_ebpf::{
    bindings::{
        BPF_ANY, BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB, BPF_SOCK_OPS_STATE_CB,
        BPF_SOCK_OPS_STATE_CB_FLAG, BPF_TCP_CLOSE,
    },
    helpers::bpf_get_socket_cookie,
    macros::sock_ops,
    programs::SockOpsContext,
    EbpfContext,
};
use mesh_common::{FlowKey, AF_INET, AF_INET6, COUNTER_ORIG_DST_NOT_STORED, OUTBOUND_PORT};

use crate::{
    maps::{count, ORIG_DST, SOCK_DST},
    sockaddr::is_v4_mapped,
};

#[sock_ops]
pub fn mesh_sockops(ctx: SockOpsContext) -> u32 {
    match ctx.op() {
        BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB => established(&ctx),
        BPF_SOCK_OPS_STATE_CB => state_changed(&ctx),
        _ => {}
    }
    1
}

/// `remote_port` holds the network-order port shifted into the upper half on little endian
/// (`skc_dport << 16`); read it without assuming which half.
#[inline(always)]
fn remote_port(ctx: &SockOpsContext) -> u16 {
    let v = u32::from_be(ctx.remote_port());
    if v > 0xffff {
        (v >> 16) as u16
    } else {
        v as u16
    }
}

#[inline(always)]
fn socket_cookie(ctx: &SockOpsContext) -> u64 {
    // SAFETY: helper available to sock_ops programs.
    unsafe { bpf_get_socket_cookie(ctx.as_ptr()) }
}

#[inline(always)]
fn established(ctx: &SockOpsContext) {
    if remote_port(ctx) != OUTBOUND_PORT {
        return;
    }
    let cookie = socket_cookie(ctx);
    let Some(p) = SOCK_DST.get_ptr(cookie) else {
        return;
    };
    // SAFETY: a map value pointer from a successful lookup; copied at once.
    let dst = unsafe { *p };
    // The key carries the family of the connection as the proxy's listener sees it: a dual-stack
    // socket connected to ::ffff:127.0.0.1 is accepted by the IPv4 listener.
    let family = ctx.family();
    let family = if family == u32::from(AF_INET) {
        AF_INET
    } else if family == u32::from(AF_INET6) {
        if is_v4_mapped(&ctx.remote_ip6()) {
            AF_INET
        } else {
            AF_INET6
        }
    } else {
        return;
    };
    let key = FlowKey {
        netns: dst.netns,
        port: ctx.local_port() as u16,
        family,
        _pad: 0,
    };
    if ORIG_DST.insert(key, dst, u64::from(BPF_ANY)).is_ok() {
        // Ask for state callbacks so the socket-cookie record goes away with the socket.
        let _ = ctx.set_cb_flags((ctx.cb_flags() | BPF_SOCK_OPS_STATE_CB_FLAG) as i32);
    } else {
        count(COUNTER_ORIG_DST_NOT_STORED);
    }
}

#[inline(always)]
fn state_changed(ctx: &SockOpsContext) {
    // args[0] is the old state, args[1] the new one.
    if ctx.arg(1) == BPF_TCP_CLOSE {
        let _ = SOCK_DST.remove(socket_cookie(ctx));
    }
}

//! Narrow, verifier-friendly access to `struct bpf_sock_addr` and the address helpers shared by
//! the connect and getpeername hooks.
//!
//! Addresses are handled as `u32` words holding network-order bytes (exactly what the kernel puts
//! in `user_ip4` / `user_ip6[i]`), so comparisons are plain word compares: no `memcmp`, which BPF
//! does not have. Every context access is a single 4- or 8-byte volatile load or store, the only
//! widths the verifier accepts for these fields.
use core::ptr::{addr_of, addr_of_mut, read_volatile, write_volatile};

use aya_ebpf::{
    bindings::{bpf_sock, bpf_sock_addr},
    helpers::{bpf_get_netns_cookie, bpf_get_socket_cookie},
    programs::SockAddrContext,
    EbpfContext,
};

/// `SOCK_STREAM` and `IPPROTO_TCP` as the kernel numbers them.
const SOCK_STREAM: u32 = 1;
const IPPROTO_TCP: u32 = 6;

/// `127.0.0.1`, `::1` and the `::ffff:0:0/96` prefix word, as network-order words.
pub const LOOPBACK4: u32 = u32::from_ne_bytes([127, 0, 0, 1]);
pub const LOOPBACK6_LAST: u32 = u32::from_ne_bytes([0, 0, 0, 1]);
pub const V4_MAPPED_PREFIX: u32 = u32::from_ne_bytes([0, 0, 0xff, 0xff]);

pub struct SockAddr<'a> {
    ctx: &'a SockAddrContext,
}

impl<'a> SockAddr<'a> {
    #[inline(always)]
    pub fn new(ctx: &'a SockAddrContext) -> Self {
        SockAddr { ctx }
    }

    /// The program's context (for aya-log).
    pub fn ctx(&self) -> &SockAddrContext {
        self.ctx
    }

    #[inline(always)]
    fn raw(&self) -> *mut bpf_sock_addr {
        self.ctx.sock_addr
    }

    /// Whether the socket is a TCP stream socket.
    #[inline(always)]
    pub fn is_tcp(&self) -> bool {
        // SAFETY: ctx fields readable by every cgroup/sock_addr program.
        let (ty, proto) = unsafe {
            (
                read_volatile(addr_of!((*self.raw()).type_)),
                read_volatile(addr_of!((*self.raw()).protocol)),
            )
        };
        ty == SOCK_STREAM && proto == IPPROTO_TCP
    }

    /// `SO_MARK` of the socket (`ctx->sk->mark`).
    #[inline(always)]
    pub fn mark(&self) -> u32 {
        // SAFETY: `ctx->sk` is a non-NULL PTR_TO_SOCKET for sock_addr programs, and `mark` is a
        // readable field of `struct bpf_sock`.
        unsafe {
            let sk: *mut bpf_sock = read_volatile(addr_of!((*self.raw()).__bindgen_anon_1.sk));
            read_volatile(addr_of!((*sk).mark))
        }
    }

    #[inline(always)]
    pub fn netns_cookie(&self) -> u64 {
        // SAFETY: helper available to every sock_addr program.
        unsafe { bpf_get_netns_cookie(self.ctx.as_ptr()) }
    }

    #[inline(always)]
    pub fn socket_cookie(&self) -> u64 {
        // SAFETY: helper available to every sock_addr program.
        unsafe { bpf_get_socket_cookie(self.ctx.as_ptr()) }
    }

    /// `user_ip4` (network-order word). Only valid in v4 hooks.
    #[inline(always)]
    pub fn user_ip4(&self) -> u32 {
        // SAFETY: readable in connect4 / getpeername4.
        unsafe { read_volatile(addr_of!((*self.raw()).user_ip4)) }
    }

    #[inline(always)]
    pub fn set_user_ip4(&self, ip: u32) {
        // SAFETY: writable in connect4 / getpeername4.
        unsafe { write_volatile(addr_of_mut!((*self.raw()).user_ip4), ip) }
    }

    /// `user_ip6` (network-order words). Only valid in v6 hooks.
    #[inline(always)]
    pub fn user_ip6(&self) -> [u32; 4] {
        // SAFETY: readable in connect6 / getpeername6, one word at a time.
        unsafe {
            let p = addr_of!((*self.raw()).user_ip6);
            [
                read_volatile(addr_of!((*p)[0])),
                read_volatile(addr_of!((*p)[1])),
                read_volatile(addr_of!((*p)[2])),
                read_volatile(addr_of!((*p)[3])),
            ]
        }
    }

    #[inline(always)]
    pub fn set_user_ip6(&self, ip: [u32; 4]) {
        // SAFETY: writable in connect6 / getpeername6, one word at a time.
        unsafe {
            let p = addr_of_mut!((*self.raw()).user_ip6);
            write_volatile(addr_of_mut!((*p)[0]), ip[0]);
            write_volatile(addr_of_mut!((*p)[1]), ip[1]);
            write_volatile(addr_of_mut!((*p)[2]), ip[2]);
            write_volatile(addr_of_mut!((*p)[3]), ip[3]);
        }
    }

    /// `user_port` in host order. The kernel keeps the network-order port in the first two bytes
    /// of the 32-bit field.
    #[inline(always)]
    pub fn user_port(&self) -> u16 {
        // SAFETY: readable in every sock_addr hook that has a port.
        let raw = unsafe { read_volatile(addr_of!((*self.raw()).user_port)) };
        let b = raw.to_ne_bytes();
        u16::from_be_bytes([b[0], b[1]])
    }

    #[inline(always)]
    pub fn set_user_port(&self, port: u16) {
        let b = port.to_be_bytes();
        let raw = u32::from_ne_bytes([b[0], b[1], 0, 0]);
        // SAFETY: writable in every sock_addr hook that has a port.
        unsafe { write_volatile(addr_of_mut!((*self.raw()).user_port), raw) }
    }
}

/// Network-order words -> the byte array stored in maps.
#[inline(always)]
pub fn words_to_bytes(w: [u32; 4]) -> [u8; 16] {
    let (a, b, c, d) = (
        w[0].to_ne_bytes(),
        w[1].to_ne_bytes(),
        w[2].to_ne_bytes(),
        w[3].to_ne_bytes(),
    );
    [
        a[0], a[1], a[2], a[3], b[0], b[1], b[2], b[3], c[0], c[1], c[2], c[3], d[0], d[1], d[2],
        d[3],
    ]
}

/// The byte array stored in maps -> network-order words.
#[inline(always)]
pub fn bytes_to_words(b: &[u8; 16]) -> [u32; 4] {
    [
        u32::from_ne_bytes([b[0], b[1], b[2], b[3]]),
        u32::from_ne_bytes([b[4], b[5], b[6], b[7]]),
        u32::from_ne_bytes([b[8], b[9], b[10], b[11]]),
        u32::from_ne_bytes([b[12], b[13], b[14], b[15]]),
    ]
}

/// `::ffff:a.b.c.d` for a network-order IPv4 word.
#[inline(always)]
pub fn v4_mapped(ip4: u32) -> [u32; 4] {
    [0, 0, V4_MAPPED_PREFIX, ip4]
}

/// Whether the words are an IPv4-mapped IPv6 address.
#[inline(always)]
pub fn is_v4_mapped(w: &[u32; 4]) -> bool {
    w[0] == 0 && w[1] == 0 && w[2] == V4_MAPPED_PREFIX
}

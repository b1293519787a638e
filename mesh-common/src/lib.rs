//! Types and constants shared by the eBPF programs (`mesh-ebpf`) and the agent (`mesh-agent`).
//!
//! Every map key and value is `#[repr(C)]` with explicit padding so the layout is identical on both
//! sides and `bpftool` can print it from BTF. Addresses are stored in network byte order as byte
//! arrays (so `bpftool` prints `[10,0,1,2]`), ports in host byte order.
#![cfg_attr(not(test), no_std)]

/// Port of the in-pod outbound capture listener (`127.0.0.1` / `[::1]`).
pub const OUTBOUND_PORT: u16 = 15001;
/// Port of the in-pod inbound plaintext capture listener.
pub const INBOUND_PLAINTEXT_PORT: u16 = 15006;
/// Port of the in-pod inbound HBONE listener.
pub const HBONE_PORT: u16 = 15008;
/// `SO_MARK` carried by every socket the proxy owns; such sockets are never redirected.
pub const PROXY_MARK: u32 = 0x539;

/// `SO_MARK` of the proxy's sockets towards an application that carry the client's source
/// address (transparent sockets). The application's replies inherit it (`tcp_fwmark_accept`) and
/// a policy rule routes them back to the proxy; distinct from [`PROXY_MARK`] so the proxy's own
/// outbound traffic keeps its normal routes.
pub const INBOUND_MARK: u32 = 0x111;
/// Routing table (inside each enrolled pod) holding the single `local` route for [`INBOUND_MARK`].
pub const INBOUND_ROUTE_TABLE: u32 = 133;

/// Address families as the kernel numbers them.
pub const AF_INET: u16 = 2;
pub const AF_INET6: u16 = 10;

/// Map names (the kernel keeps 15 characters; these fit).
pub const MAP_ENROLLED: &str = "ENROLLED";
pub const MAP_SOCK_DST: &str = "SOCK_DST";
pub const MAP_ORIG_DST: &str = "ORIG_DST";
pub const MAP_EXCL_PORTS: &str = "EXCL_PORTS";
pub const ALL_MAPS: [&str; 4] = [MAP_ENROLLED, MAP_SOCK_DST, MAP_ORIG_DST, MAP_EXCL_PORTS];
/// `SOCKHASH` of the in-pod inbound plaintext listeners, keyed by [`ListenerKey`]. Pinned with the
/// others but not in [`ALL_MAPS`]: a sockhash's values are sockets, which user space cannot read,
/// so `inspect maps` (which dumps keys and values) leaves it out; its keys can be listed with
/// `bpftool map dump` or the agent's `pinned::read_inbound_listeners`.
pub const MAP_INBOUND: &str = "INBOUND_LSN";
/// `PERCPU_ARRAY` of `u64` event counters the programs increment, indexed by `COUNTER_*`; the
/// agent sums the CPUs' slots and exports them as `mesh_datapath_events_total{event}`.
pub const MAP_COUNTERS: &str = "COUNTERS";
/// A connect of an enrolled pod went out without the mesh: recording its original destination
/// in `SOCK_DST` failed, so it was not redirected.
pub const COUNTER_CONNECT_NOT_REDIRECTED: u32 = 0;
/// A redirected connection's original destination could not be stored in `ORIG_DST`: the proxy
/// will not know where it was going and resets it.
pub const COUNTER_ORIG_DST_NOT_STORED: u32 = 1;
/// Slots in [`MAP_COUNTERS`] (room for counters a later version adds).
pub const MAX_COUNTERS: usize = 8;
/// The `event` label of each counter, by index.
pub const COUNTER_NAMES: [&str; 2] = ["connect_not_redirected", "orig_dst_not_stored"];

/// `ARRAY` of one `u32`: non-zero switches the programs' debug log on (their decisions, through
/// aya-log to the agent's log). Off by default; `mesh-agent ebpf-log on|off` flips it at run time.
pub const MAP_EBPF_LOG: &str = "EBPF_LOG";

/// Every map the agent pins, [`ALL_MAPS`] first.
pub const PINNED_MAPS: [&str; 7] = [
    MAP_ENROLLED,
    MAP_SOCK_DST,
    MAP_ORIG_DST,
    MAP_EXCL_PORTS,
    MAP_INBOUND,
    MAP_COUNTERS,
    MAP_EBPF_LOG,
];

/// Program names as they appear in the object file and in `bpftool prog`.
pub const PROG_CONNECT4: &str = "mesh_connect4";
pub const PROG_CONNECT6: &str = "mesh_connect6";
pub const PROG_SOCKOPS: &str = "mesh_sockops";
pub const PROG_PEERNAME4: &str = "mesh_peername4";
pub const PROG_PEERNAME6: &str = "mesh_peername6";
pub const PROG_SOCKNAME4: &str = "mesh_sockname4";
pub const PROG_SOCKNAME6: &str = "mesh_sockname6";
/// `sk_lookup` program attached to each enrolled pod's network namespace (inbound capture).
pub const PROG_SKLOOKUP: &str = "mesh_sklookup";

/// `ingress_ifindex` of the loopback device: `lo` is always interface 1 in every network
/// namespace. Inbound capture never touches packets whose `sk_lookup` `ingress_ifindex` is this
/// (loopback destinations, and the proxy's `INBOUND_MARK` sockets routed by the `local default
/// dev lo` route). Note that the pod's traffic to its own address reports the pod's interface
/// instead; `mesh_sklookup` recognizes that by its source being its destination.
pub const LOOPBACK_IFINDEX: u32 = 1;

/// Capacity of the maps.
pub const MAX_ENROLLED: usize = 16_384;
pub const MAX_FLOWS: usize = 65_536;
pub const MAX_EXCLUDED_PORTS: usize = 256;
/// Capacity of `INBOUND_LSN`: one IPv4 and one IPv6 listener per enrolled pod.
pub const MAX_INBOUND_LISTENERS: usize = 2 * MAX_ENROLLED;

/// Length of the workload name stored in [`Enrolled`] (`namespace/name`, NUL padded).
pub const NAME_LEN: usize = 64;

/// Value of `ENROLLED`, keyed by the pod's network namespace cookie (`u64`).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Enrolled {
    /// The pod's IPv4 address (network order), all zero if it has none.
    pub ip4: [u8; 4],
    /// Reserved, zero.
    pub flags: u32,
    /// The pod's IPv6 address (network order), all zero if it has none.
    pub ip6: [u8; 16],
    /// `namespace/name` of the workload, NUL padded; for inspection only.
    pub name: [u8; NAME_LEN],
}

impl Enrolled {
    /// Builds a value; `name` is cut to [`NAME_LEN`] bytes.
    pub fn new(ip4: [u8; 4], ip6: [u8; 16], name: &str) -> Self {
        let mut buf = [0u8; NAME_LEN];
        let bytes = name.as_bytes();
        let n = if bytes.len() < NAME_LEN {
            bytes.len()
        } else {
            NAME_LEN
        };
        buf[..n].copy_from_slice(&bytes[..n]);
        Enrolled {
            ip4,
            flags: 0,
            ip6,
            name: buf,
        }
    }

    /// The workload name, up to the first NUL (lossy on invalid UTF-8 is the caller's job).
    pub fn name_bytes(&self) -> &[u8] {
        let end = self.name.iter().position(|b| *b == 0).unwrap_or(NAME_LEN);
        &self.name[..end]
    }
}

/// An original destination as the application asked for it.
///
/// IPv4 destinations are stored as IPv4-mapped IPv6 (`::ffff:a.b.c.d`) with `family` = [`AF_INET`].
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct OrigDst {
    pub addr: [u8; 16],
    /// Destination port, host byte order.
    pub port: u16,
    /// [`AF_INET`] or [`AF_INET6`]: the family of the application's socket.
    pub family: u16,
    /// Reserved, zero.
    pub _pad: u32,
    /// Cookie of the network namespace the connection was made in.
    pub netns: u64,
}

/// Key of `ORIG_DST`: what the proxy can compute on `accept` from its listener's network namespace
/// and the peer address (the application's loopback source port).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct FlowKey {
    /// Network namespace cookie of the pod.
    pub netns: u64,
    /// The application's source port (host order) as seen by the proxy's listener.
    pub port: u16,
    /// [`AF_INET`] or [`AF_INET6`]: the family of the connection as the proxy's listener sees
    /// it (`AF_INET` for an IPv4-mapped destination of a dual-stack socket).
    pub family: u16,
    /// Reserved, zero.
    pub _pad: u32,
}

/// Key of `INBOUND_LSN`: a pod's own address, under which its inbound plaintext listener is
/// registered. Pod addresses are unique, so one map serves every pod on the node.
///
/// IPv4 addresses are stored IPv4-mapped (`::ffff:a.b.c.d`) with `family` = [`AF_INET`].
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct ListenerKey {
    /// The address, network order; IPv4-mapped for IPv4.
    pub addr: [u8; 16],
    /// [`AF_INET`] or [`AF_INET6`].
    pub family: u16,
    /// Reserved, zero.
    pub _pad: u16,
}

impl ListenerKey {
    /// The key of an IPv4 address (network-order bytes).
    pub const fn v4(ip: [u8; 4]) -> Self {
        ListenerKey {
            addr: [
                0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, ip[0], ip[1], ip[2], ip[3],
            ],
            family: AF_INET,
            _pad: 0,
        }
    }

    /// The key of an IPv6 address (network-order bytes).
    pub const fn v6(ip: [u8; 16]) -> Self {
        ListenerKey {
            addr: ip,
            family: AF_INET6,
            _pad: 0,
        }
    }
}

#[cfg(feature = "user")]
mod pod {
    // SAFETY: all four are repr(C), Copy, with explicit padding and no pointers.
    unsafe impl aya::Pod for super::Enrolled {}
    unsafe impl aya::Pod for super::OrigDst {}
    unsafe impl aya::Pod for super::FlowKey {}
    unsafe impl aya::Pod for super::ListenerKey {}
}

#[cfg(test)]
mod tests {
    use super::*;
    use core::mem::size_of;

    #[test]
    fn layouts_have_no_implicit_padding() {
        assert_eq!(size_of::<Enrolled>(), 4 + 4 + 16 + NAME_LEN);
        assert_eq!(size_of::<OrigDst>(), 16 + 2 + 2 + 4 + 8);
        assert_eq!(size_of::<FlowKey>(), 8 + 2 + 2 + 4);
        assert_eq!(size_of::<ListenerKey>(), 16 + 2 + 2);
        assert_eq!(core::mem::align_of::<ListenerKey>(), 2);
        assert_eq!(core::mem::offset_of!(ListenerKey, family), 16);
        assert_eq!(core::mem::offset_of!(ListenerKey, _pad), 18);
    }

    #[test]
    fn listener_keys_map_ipv4() {
        let k = ListenerKey::v4([10, 55, 0, 2]);
        assert_eq!(
            k.addr,
            [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, 10, 55, 0, 2]
        );
        assert_eq!((k.family, k._pad), (AF_INET, 0));
        let ip6 = [0xfd, 0x55, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 2];
        let k = ListenerKey::v6(ip6);
        assert_eq!((k.addr, k.family, k._pad), (ip6, AF_INET6, 0));
    }

    #[test]
    fn inbound_names_fit_the_kernel_limit() {
        for name in PINNED_MAPS.iter().chain([PROG_SKLOOKUP].iter()) {
            assert!(name.len() <= 15, "{name} is longer than 15 characters");
        }
    }

    #[test]
    fn pinned_maps_start_with_all_maps() {
        assert_eq!(PINNED_MAPS[..ALL_MAPS.len()], ALL_MAPS);
        assert!(!ALL_MAPS.contains(&MAP_INBOUND));
        assert!(PINNED_MAPS.contains(&MAP_INBOUND));
    }

    #[test]
    fn names_fit_the_kernel_limit() {
        for name in ALL_MAPS.iter().chain(
            [
                PROG_CONNECT4,
                PROG_CONNECT6,
                PROG_SOCKOPS,
                PROG_PEERNAME4,
                PROG_PEERNAME6,
                PROG_SOCKNAME4,
                PROG_SOCKNAME6,
            ]
            .iter(),
        ) {
            assert!(name.len() <= 15, "{name} is longer than 15 characters");
        }
    }

    #[test]
    fn enrolled_name_round_trips_and_truncates() {
        let e = Enrolled::new([10, 0, 0, 1], [0; 16], "default/client");
        assert_eq!(e.name_bytes(), b"default/client");
        let long = "x".repeat(100);
        let e = Enrolled::new([0; 4], [0; 16], &long);
        assert_eq!(e.name_bytes().len(), NAME_LEN);
    }
}

//! The maps shared with user space. Names are the static names (see `mesh_common::MAP_*`);
//! BTF map definitions so that `bpftool map dump` prints typed keys and values.
//!
//! The agent pins them under its pin directory after loading; BTF maps in aya-ebpf 0.2 carry no
//! pinning attribute.
use aya_ebpf::{
    btf_maps::{Array, HashMap, LruHashMap, PerCpuArray, SockHash},
    macros::btf_map,
};
use mesh_common::{
    Enrolled, FlowKey, ListenerKey, OrigDst, MAX_COUNTERS, MAX_ENROLLED, MAX_EXCLUDED_PORTS,
    MAX_FLOWS, MAX_INBOUND_LISTENERS,
};

/// Network namespace cookie of an enrolled pod -> its addresses.
#[btf_map]
pub static ENROLLED: HashMap<u64, Enrolled, MAX_ENROLLED> = HashMap::new();

/// Socket cookie of a redirected application socket -> where it wanted to go.
/// Written by connect4/6, read by sockops and getpeername4/6.
#[btf_map]
pub static SOCK_DST: LruHashMap<u64, OrigDst, MAX_FLOWS> = LruHashMap::new();

/// What the proxy computes on `accept` -> original destination. Written by sockops, read and
/// deleted by the proxy.
#[btf_map]
pub static ORIG_DST: LruHashMap<FlowKey, OrigDst, MAX_FLOWS> = LruHashMap::new();

/// Destination ports (host order) that are never redirected.
#[btf_map]
pub static EXCL_PORTS: HashMap<u16, u8, MAX_EXCLUDED_PORTS> = HashMap::new();

/// A pod's own address -> the proxy's inbound plaintext listener (15006) in that pod's network
/// namespace. Written by the agent, read by `mesh_sklookup`. A sockhash's values are sockets:
/// user space can list its keys but not read its values.
#[btf_map]
pub static INBOUND_LSN: SockHash<ListenerKey, MAX_INBOUND_LISTENERS> = SockHash::new();

/// Event counters (`mesh_common::COUNTER_*`), one slot per CPU: no contention, no atomics.
#[btf_map]
pub static COUNTERS: PerCpuArray<u64, MAX_COUNTERS> = PerCpuArray::new();

/// Adds one to counter `index` on this CPU.
#[inline(always)]
pub fn count(index: u32) {
    if let Some(slot) = COUNTERS.get_ptr_mut(index) {
        // SAFETY: this CPU's slot of a per-CPU array; a program runs on one CPU without
        // preemption, so nothing else writes it meanwhile.
        unsafe { *slot += 1 };
    }
}

/// Non-zero: log decisions at debug level (aya-log). Read once per program run; when off that
/// one array lookup is all the logging costs.
#[btf_map]
pub static EBPF_LOG: Array<u32, 1> = Array::new();

#[inline(always)]
pub fn log_on() -> bool {
    EBPF_LOG.get(0).is_some_and(|on| *on != 0)
}

//! Typed handles to the maps, shared by the loaded datapath and the pinned readers.
use std::{
    cell::RefCell,
    net::IpAddr,
    path::Path,
    sync::{
        atomic::{AtomicUsize, Ordering},
        Arc, Mutex, MutexGuard, Weak,
    },
};

use aya::{
    maps::{HashMap, Map, MapData, MapError, SockHash},
    Pod,
};
use mesh_common::{
    Enrolled, FlowKey, ListenerKey, OrigDst, AF_INET, AF_INET6, MAP_COUNTERS, MAP_EBPF_LOG,
    MAP_ENROLLED, MAP_EXCL_PORTS, MAP_INBOUND, MAP_ORIG_DST, MAP_SOCK_DST, MAX_COUNTERS,
    MAX_ENROLLED, MAX_EXCLUDED_PORTS, MAX_FLOWS, MAX_INBOUND_LISTENERS,
};

use super::DatapathError;

pub(super) type EnrolledMap = HashMap<MapData, u64, Enrolled>;
pub(super) type SockDstMap = HashMap<MapData, u64, OrigDst>;
pub(super) type OrigDstMap = HashMap<MapData, FlowKey, OrigDst>;
pub(super) type ExclPortsMap = HashMap<MapData, u16, u8>;
pub(super) type InboundMap = SockHash<MapData, ListenerKey>;
pub(super) type CountersMap = aya::maps::PerCpuArray<MapData, u64>;
pub(super) type EbpfLogMap = aya::maps::Array<MapData, u32>;

/// Static facts about one of our maps.
pub(super) struct MapSpec {
    pub name: &'static str,
    pub capacity: usize,
    /// Key and value sizes in bytes, as the eBPF object declares them (checked against a map a
    /// previous agent pinned before it is reused).
    pub key_size: usize,
    pub value_size: usize,
}

pub(super) const ENROLLED: MapSpec = MapSpec {
    name: MAP_ENROLLED,
    capacity: MAX_ENROLLED,
    key_size: size_of::<u64>(),
    value_size: size_of::<Enrolled>(),
};
pub(super) const SOCK_DST: MapSpec = MapSpec {
    name: MAP_SOCK_DST,
    capacity: MAX_FLOWS,
    key_size: size_of::<u64>(),
    value_size: size_of::<OrigDst>(),
};
pub(super) const ORIG_DST: MapSpec = MapSpec {
    name: MAP_ORIG_DST,
    capacity: MAX_FLOWS,
    key_size: size_of::<FlowKey>(),
    value_size: size_of::<OrigDst>(),
};
pub(super) const EXCL_PORTS: MapSpec = MapSpec {
    name: MAP_EXCL_PORTS,
    capacity: MAX_EXCLUDED_PORTS,
    key_size: size_of::<u16>(),
    value_size: size_of::<u8>(),
};

/// Per-CPU event counters (`mesh_common::COUNTER_*`).
pub(super) const COUNTERS: MapSpec = MapSpec {
    name: MAP_COUNTERS,
    capacity: MAX_COUNTERS,
    key_size: size_of::<u32>(),
    value_size: size_of::<u64>(),
};

/// The programs' debug-log switch.
pub(super) const EBPF_LOG: MapSpec = MapSpec {
    name: MAP_EBPF_LOG,
    capacity: 1,
    key_size: size_of::<u32>(),
    value_size: size_of::<u32>(),
};

/// A sockhash: its values are socket descriptors (4 bytes from user space; 8 in the kernel's
/// view of a map created with 8-byte values), so only the key is checked.
pub(super) const INBOUND: MapSpec = MapSpec {
    name: MAP_INBOUND,
    capacity: MAX_INBOUND_LISTENERS,
    key_size: size_of::<ListenerKey>(),
    value_size: 0,
};

/// Converts a generic map into the typed `INBOUND_LSN` sockhash (checks map type and key size).
pub(super) fn typed_sock_hash(spec: &MapSpec, map: Map) -> Result<InboundMap, DatapathError> {
    SockHash::try_from(map).map_err(|e| DatapathError::MissingMap {
        name: spec.name,
        reason: e.to_string(),
    })
}

/// The `INBOUND_LSN` key of a pod address. An IPv4-mapped IPv6 address is the IPv4 address: the
/// kernel presents such traffic to `sk_lookup` as IPv4.
pub(super) fn listener_key(ip: IpAddr) -> ListenerKey {
    match ip.to_canonical() {
        IpAddr::V4(v4) => ListenerKey::v4(v4.octets()),
        IpAddr::V6(v6) => ListenerKey::v6(v6.octets()),
    }
}

/// The address of an `INBOUND_LSN` key; `None` for a key no agent writes.
pub(super) fn listener_ip(key: &ListenerKey) -> Option<IpAddr> {
    match key.family {
        AF_INET => {
            let ip = std::net::Ipv6Addr::from(key.addr).to_ipv4_mapped()?;
            Some(IpAddr::V4(ip))
        }
        AF_INET6 => Some(IpAddr::V6(key.addr.into())),
        _ => None,
    }
}

/// All keys of the sockhash, bounded like [`entries`].
pub(super) fn sock_hash_keys(
    spec: &MapSpec,
    map: &InboundMap,
) -> Result<Vec<ListenerKey>, DatapathError> {
    map.keys()
        .take(spec.capacity.saturating_mul(2))
        .collect::<Result<Vec<_>, MapError>>()
        .map_err(|source| map_error(spec, source))
}

/// Converts a generic map into a typed hash map (checks map type and key/value sizes, so a pin
/// left by an incompatible agent version is refused instead of misread).
pub(super) fn typed<K: Pod, V: Pod>(
    spec: &MapSpec,
    map: Map,
) -> Result<HashMap<MapData, K, V>, DatapathError> {
    HashMap::try_from(map).map_err(|e| DatapathError::MissingMap {
        name: spec.name,
        reason: e.to_string(),
    })
}

/// All entries of a hash map. The walk is bounded by the capacity: a map that keeps changing
/// underneath (LRU maps under load) cannot make it loop forever.
pub(super) fn entries<K: Pod, V: Pod>(
    spec: &MapSpec,
    map: &HashMap<MapData, K, V>,
) -> Result<Vec<(K, V)>, DatapathError> {
    map.iter()
        .take(spec.capacity.saturating_mul(2))
        .collect::<Result<Vec<_>, MapError>>()
        .map_err(|source| map_error(spec, source))
}

pub(super) fn map_error(spec: &MapSpec, source: MapError) -> DatapathError {
    DatapathError::Map {
        name: spec.name,
        error: source,
    }
}

/// `ENOENT` from a lookup (aya maps it to `KeyNotFound`) or from a delete (a syscall error).
pub(super) fn is_not_found(e: &MapError) -> bool {
    match e {
        MapError::KeyNotFound => true,
        MapError::SyscallError(e) => e.io_error.raw_os_error() == Some(libc::ENOENT),
        _ => false,
    }
}

pub(super) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic while holding the lock cannot leave a map handle half-updated: the kernel map is
    // the state, the handle is just a descriptor.
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Opens one more handle (its own map fd) on the pinned `ORIG_DST`.
pub(super) fn open_orig_dst(pin: &Path) -> Result<OrigDstMap, DatapathError> {
    let data = MapData::from_pin(pin).map_err(|e| map_error(&ORIG_DST, e))?;
    typed(
        &ORIG_DST,
        Map::from_map_data(data).map_err(|e| map_error(&ORIG_DST, e))?,
    )
}

/// Handle to `ORIG_DST` for the proxy: cheap to clone, usable from any task or thread.
///
/// [`take`](Self::take) is a lookup then a delete, and owns the entry only if its delete
/// succeeds: the kernel deletes a key once, every other deleter gets `ENOENT`, so of concurrent
/// callers with the same key exactly one gets the entry, whichever handles they use.
///
/// aya deletes only through `&mut` (and has no `&self` lookup-and-delete for hash maps), so the
/// common path gives each thread a handle (its own map fd) of its own: a pool of handles is
/// opened with the table, before anything is attached, and a thread's first `take` moves one
/// into a thread-local slot; later calls on that thread use it without any lock. A thread
/// hands its handle back to the pool when it exits. When the pool is empty (more threads than
/// handles) a thread uses fallback shards, one handle behind a lock each, chosen by client port.
/// The descriptors stay bounded: the pool and the shards, whoever holds them (a thread keeps one
/// of a dropped table until its next `take` or its exit).
#[derive(Clone)]
pub struct OrigDstTable {
    shared: Arc<OrigDstShared>,
}

struct OrigDstShared {
    /// Handles no thread owns yet.
    spare: Mutex<Vec<OrigDstMap>>,
    /// `spare.len()`, read without the lock by threads on the fallback path.
    spare_count: AtomicUsize,
    /// For threads that found the pool empty.
    fallback: Box<[Mutex<OrigDstMap>]>,
    /// How many takes went through `fallback`.
    #[cfg(test)]
    fallback_uses: AtomicUsize,
}

/// A handle one thread owns, in its thread-local list.
struct OwnedHandle {
    /// The table it belongs to (also its identity: the allocation outlives this `Weak`).
    table: Weak<OrigDstShared>,
    /// Always `Some` until dropped.
    map: Option<OrigDstMap>,
}

impl Drop for OwnedHandle {
    fn drop(&mut self) {
        // Back to the table's pool, if the table still exists; otherwise the fd just closes.
        if let (Some(table), Some(map)) = (self.table.upgrade(), self.map.take()) {
            let mut spare = lock(&table.spare);
            spare.push(map);
            table.spare_count.store(spare.len(), Ordering::Relaxed);
        }
    }
}

thread_local! {
    /// This thread's `ORIG_DST` handles, one per table it has taken from.
    static OWNED_HANDLES: RefCell<Vec<OwnedHandle>> = const { RefCell::new(Vec::new()) };
}

impl std::fmt::Debug for OrigDstTable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OrigDstTable")
            .field("fallback_shards", &self.shared.fallback.len())
            .finish_non_exhaustive()
    }
}

impl OrigDstTable {
    /// A table over already opened handles: `pool` for threads to own, `fallback` (at least one)
    /// for the threads that find the pool empty.
    pub(super) fn new(pool: Vec<OrigDstMap>, fallback: Vec<OrigDstMap>) -> OrigDstTable {
        assert!(
            !fallback.is_empty(),
            "ORIG_DST table without a fallback shard"
        );
        OrigDstTable {
            shared: Arc::new(OrigDstShared {
                spare_count: AtomicUsize::new(pool.len()),
                spare: Mutex::new(pool),
                fallback: fallback.into_iter().map(Mutex::new).collect(),
                #[cfg(test)]
                fallback_uses: AtomicUsize::new(0),
            }),
        }
    }

    /// Looks up and deletes the original destination of the connection the proxy accepted with
    /// peer port `key.port` on its listener of family `key.family` in network namespace
    /// `key.netns`. `Ok(None)` if there is none (not a redirected connection, or already taken).
    ///
    /// Of concurrent callers with the same key exactly one gets the entry (the one whose delete
    /// succeeds). Takes no lock once the calling thread owns a handle (see the type's doc).
    pub fn take(&self, key: &FlowKey) -> Result<Option<OrigDst>, DatapathError> {
        let key = FlowKey { _pad: 0, ..*key };
        // `None`: this thread has no handle of this table (pool empty, or its thread-locals are
        // being destroyed).
        let owned = OWNED_HANDLES
            .try_with(|handles| {
                let mut handles = handles.try_borrow_mut().ok()?;
                let ours = Arc::as_ptr(&self.shared);
                let i = match handles.iter().position(|h| h.table.as_ptr() == ours) {
                    Some(i) => i,
                    None => {
                        let map = self.shared.claim()?;
                        // Close the handles of dropped tables while we are here.
                        handles.retain(|h| h.table.strong_count() > 0);
                        handles.push(OwnedHandle {
                            table: Arc::downgrade(&self.shared),
                            map: Some(map),
                        });
                        handles.len() - 1
                    }
                };
                handles[i].map.as_mut().map(|map| take_from(map, &key))
            })
            .ok()
            .flatten();
        match owned {
            Some(result) => result,
            None => self.shared.take_fallback(&key),
        }
    }

    /// How many takes used the fallback shards.
    #[cfg(test)]
    pub(super) fn fallback_uses(&self) -> usize {
        self.shared.fallback_uses.load(Ordering::Relaxed)
    }

    /// Handles in the pool that no thread owns.
    #[cfg(test)]
    pub(super) fn spare_handles(&self) -> usize {
        lock(&self.shared.spare).len()
    }
}

impl OrigDstShared {
    /// A handle from the pool for the calling thread to own, if one is left.
    fn claim(&self) -> Option<OrigDstMap> {
        if self.spare_count.load(Ordering::Relaxed) == 0 {
            return None;
        }
        let mut spare = lock(&self.spare);
        let map = spare.pop();
        self.spare_count.store(spare.len(), Ordering::Relaxed);
        map
    }

    fn take_fallback(&self, key: &FlowKey) -> Result<Option<OrigDst>, DatapathError> {
        #[cfg(test)]
        self.fallback_uses.fetch_add(1, Ordering::Relaxed);
        let shard = &self.fallback[usize::from(key.port) % self.fallback.len()];
        take_from(&mut lock(shard), key)
    }
}

/// Lookup, then delete: the entry is ours only if our delete removed it. A delete that finds
/// nothing means a concurrent caller (or the LRU) removed it after our lookup: not ours.
fn take_from(map: &mut OrigDstMap, key: &FlowKey) -> Result<Option<OrigDst>, DatapathError> {
    match map.get(key, 0) {
        Ok(dst) => match map.remove(key) {
            Ok(()) => Ok(Some(dst)),
            Err(e) if is_not_found(&e) => Ok(None),
            Err(e) => Err(map_error(&ORIG_DST, e)),
        },
        Err(e) if is_not_found(&e) => Ok(None),
        Err(e) => Err(map_error(&ORIG_DST, e)),
    }
}

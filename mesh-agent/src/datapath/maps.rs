//! Typed handles to the four maps, shared by the loaded datapath and the pinned readers.
use std::sync::{Arc, Mutex, MutexGuard};

use aya::{
    maps::{HashMap, Map, MapData, MapError},
    Pod,
};
use mesh_common::{
    Enrolled, FlowKey, OrigDst, MAP_ENROLLED, MAP_EXCL_PORTS, MAP_ORIG_DST, MAP_SOCK_DST,
    MAX_ENROLLED, MAX_EXCLUDED_PORTS, MAX_FLOWS,
};

use super::DatapathError;

pub(super) type EnrolledMap = HashMap<MapData, u64, Enrolled>;
pub(super) type SockDstMap = HashMap<MapData, u64, OrigDst>;
pub(super) type OrigDstMap = HashMap<MapData, FlowKey, OrigDst>;
pub(super) type ExclPortsMap = HashMap<MapData, u16, u8>;

/// Static facts about one of our maps.
pub(super) struct MapSpec {
    pub name: &'static str,
    pub capacity: usize,
}

pub(super) const ENROLLED: MapSpec = MapSpec {
    name: MAP_ENROLLED,
    capacity: MAX_ENROLLED,
};
pub(super) const SOCK_DST: MapSpec = MapSpec {
    name: MAP_SOCK_DST,
    capacity: MAX_FLOWS,
};
pub(super) const ORIG_DST: MapSpec = MapSpec {
    name: MAP_ORIG_DST,
    capacity: MAX_FLOWS,
};
pub(super) const EXCL_PORTS: MapSpec = MapSpec {
    name: MAP_EXCL_PORTS,
    capacity: MAX_EXCLUDED_PORTS,
};

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
        source,
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

/// Handle to `ORIG_DST` for the proxy: cheap to clone, usable from any task or thread.
#[derive(Clone)]
pub struct OrigDstTable {
    pub(super) map: Arc<Mutex<OrigDstMap>>,
}

impl std::fmt::Debug for OrigDstTable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OrigDstTable").finish_non_exhaustive()
    }
}

impl OrigDstTable {
    /// Looks up and deletes the original destination of the connection the proxy accepted with
    /// peer port `key.port` on its listener of family `key.family` in network namespace
    /// `key.netns`. `Ok(None)` if there is none (not a redirected connection, or already taken).
    ///
    /// The lookup and the delete happen under one lock, so of concurrent callers with the same
    /// key exactly one gets the entry.
    pub fn take(&self, key: &FlowKey) -> Result<Option<OrigDst>, DatapathError> {
        let key = FlowKey { _pad: 0, ..*key };
        let mut map = lock(&self.map);
        match map.get(&key, 0) {
            Ok(dst) => match map.remove(&key) {
                Ok(()) => Ok(Some(dst)),
                Err(e) if is_not_found(&e) => Ok(Some(dst)),
                Err(e) => Err(map_error(&ORIG_DST, e)),
            },
            Err(MapError::KeyNotFound) => Ok(None),
            Err(e) => Err(map_error(&ORIG_DST, e)),
        }
    }
}

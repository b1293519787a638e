//! Read-only access to the pinned maps by path, for `mesh-agent inspect maps`.
//!
//! Nothing is loaded or attached: this works while an agent runs (from another process) and after
//! an agent crashed (the maps stay pinned until the next agent starts).
use std::{io, net::IpAddr, path::Path};

use aya::{
    maps::{HashMap, Map, MapData, MapError},
    Pod,
};
use mesh_common::{Enrolled, FlowKey, OrigDst};

use super::{
    maps::{
        entries, listener_ip, sock_hash_keys, typed, typed_sock_hash, MapSpec, ENROLLED,
        EXCL_PORTS, INBOUND, ORIG_DST, SOCK_DST,
    },
    DatapathError,
};

/// `ENROLLED`: (netns cookie, pod record).
pub fn read_enrolled(pin_dir: &Path) -> Result<Vec<(u64, Enrolled)>, DatapathError> {
    let mut v = read(pin_dir, &ENROLLED)?;
    v.sort_unstable_by_key(|(k, _)| *k);
    Ok(v)
}

/// `SOCK_DST`: (socket cookie, original destination).
pub fn read_sock_dst(pin_dir: &Path) -> Result<Vec<(u64, OrigDst)>, DatapathError> {
    let mut v = read(pin_dir, &SOCK_DST)?;
    v.sort_unstable_by_key(|(k, _)| *k);
    Ok(v)
}

/// `ORIG_DST`: (flow key, original destination) not yet taken by the proxy.
pub fn read_orig_dst(pin_dir: &Path) -> Result<Vec<(FlowKey, OrigDst)>, DatapathError> {
    let mut v: Vec<(FlowKey, OrigDst)> = read(pin_dir, &ORIG_DST)?;
    v.sort_unstable_by_key(|(k, _)| (k.netns, k.family, k.port));
    Ok(v)
}

/// `EXCL_PORTS`, sorted.
pub fn read_excluded_ports(pin_dir: &Path) -> Result<Vec<u16>, DatapathError> {
    let mut v: Vec<u16> = read::<u16, u8>(pin_dir, &EXCL_PORTS)?
        .into_iter()
        .map(|(port, _)| port)
        .collect();
    v.sort_unstable();
    Ok(v)
}

/// `INBOUND_LSN`: the pod addresses with a registered inbound listener, sorted. Keys only: the
/// values are sockets, which user space cannot read.
pub fn read_inbound_listeners(pin_dir: &Path) -> Result<Vec<IpAddr>, DatapathError> {
    let map = typed_sock_hash(&INBOUND, open_map(pin_dir, &INBOUND)?)?;
    let mut v: Vec<IpAddr> = sock_hash_keys(&INBOUND, &map)?
        .iter()
        .filter_map(listener_ip)
        .collect();
    v.sort_unstable();
    Ok(v)
}

fn read<K: Pod, V: Pod>(pin_dir: &Path, spec: &MapSpec) -> Result<Vec<(K, V)>, DatapathError> {
    let map = open::<K, V>(pin_dir, spec)?;
    entries(spec, &map)
}

fn open<K: Pod, V: Pod>(
    pin_dir: &Path,
    spec: &MapSpec,
) -> Result<HashMap<MapData, K, V>, DatapathError> {
    typed(spec, open_map(pin_dir, spec)?)
}

pub(super) fn open_map(pin_dir: &Path, spec: &MapSpec) -> Result<Map, DatapathError> {
    let path = pin_dir.join(spec.name);
    let data = MapData::from_pin(&path).map_err(|e| match e {
        MapError::SyscallError(s) if s.io_error.kind() == io::ErrorKind::NotFound => {
            DatapathError::NotPinned { path: path.clone() }
        }
        MapError::SyscallError(s) => DatapathError::Io {
            what: "opening pinned map",
            path: path.clone(),
            error: s.io_error,
        },
        other => DatapathError::Map {
            name: spec.name,
            error: other,
        },
    })?;
    Map::from_map_data(data).map_err(|source| DatapathError::Map {
        name: spec.name,
        error: source,
    })
}

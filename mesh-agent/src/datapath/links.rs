//! BPF links pinned under `<pin dir>/links/`, so that the programs stay attached when the agent
//! exits for any reason (fail closed), and a new agent can take them over.
//!
//! * `links/<program>`: the cgroup programs (`mesh_connect4`, …);
//! * `links/sklookup-<netns cookie>`: `mesh_sklookup` in one pod's network namespace.
//!
//! A link is detached when its pin is removed and no process holds a descriptor of it.
//! Replacing a pinned link ([`install`]) never leaves a gap: the new link is attached (and held
//! by our descriptor) before the old pin goes, so both run for a moment; the programs are
//! written so that running twice changes nothing (a connect already rewritten to loopback is
//! not redirected again; records are overwritten with the same values).
use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use aya::programs::links::{FdLink, PinnedLink};

use super::DatapathError;

/// The directory of the pinned links.
pub fn dir(pin_dir: &Path) -> PathBuf {
    pin_dir.join("links")
}

/// Where the link of a cgroup program is pinned.
pub fn program_pin(pin_dir: &Path, program: &str) -> PathBuf {
    dir(pin_dir).join(program)
}

const SKLOOKUP_PREFIX: &str = "sklookup-";

/// Where the `mesh_sklookup` link of one network namespace is pinned.
pub fn sklookup_pin(pin_dir: &Path, netns_cookie: u64) -> PathBuf {
    dir(pin_dir).join(format!("{SKLOOKUP_PREFIX}{netns_cookie}"))
}

/// The network namespaces with a pinned `mesh_sklookup` link.
pub fn pinned_sklookup_cookies(pin_dir: &Path) -> Result<Vec<u64>, DatapathError> {
    let dir = dir(pin_dir);
    let entries = match fs::read_dir(&dir) {
        Ok(e) => e,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(DatapathError::io("listing pinned links", &dir, e)),
    };
    let mut cookies: Vec<u64> = entries
        .flatten()
        .filter_map(|e| {
            e.file_name()
                .to_str()?
                .strip_prefix(SKLOOKUP_PREFIX)?
                .parse()
                .ok()
        })
        .collect();
    cookies.sort_unstable();
    Ok(cookies)
}

/// Pins `link` at `path`, replacing a link pinned there before (detached once ours is pinned).
/// Returns whether one was replaced.
pub fn install(link: FdLink, path: &Path) -> Result<(PinnedLink, bool), DatapathError> {
    let parent = path.parent().unwrap_or(path);
    fs::create_dir_all(parent)
        .map_err(|e| DatapathError::io("creating the links directory", parent, e))?;
    let old = match PinnedLink::from_pin(path) {
        Ok(old) => Some(old),
        Err(_) if fs::symlink_metadata(path).is_err() => None,
        Err(e) => {
            return Err(DatapathError::Link {
                path: path.to_path_buf(),
                reason: format!("cannot open the pinned link: {e}"),
            })
        }
    };
    // Unpinned but still held (so still attached) until ours is in place.
    let old = match old.map(PinnedLink::unpin).transpose() {
        Ok(old) => old,
        Err(e) => return Err(DatapathError::io("unpinning the previous link", path, e)),
    };
    match link.pin(path) {
        Ok(pinned) => Ok((pinned, old.is_some())),
        Err(e) => {
            // Put the previous one back, so a failed replacement changes nothing.
            if let Some(old) = old {
                let _ = old.pin(path);
            }
            Err(DatapathError::Link {
                path: path.to_path_buf(),
                reason: format!("cannot pin the link: {e}"),
            })
        }
    }
}

/// Detaches the link pinned at `path`: removes the pin (the kernel detaches it once no
/// descriptor is left). Not an error if there is none.
pub fn remove(path: &Path) -> Result<bool, DatapathError> {
    match fs::remove_file(path) {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(false),
        Err(e) => Err(DatapathError::io("removing pinned link", path, e)),
    }
}

/// Removes every pinned link and the links directory; returns the names removed.
pub fn remove_all(pin_dir: &Path) -> Result<Vec<String>, DatapathError> {
    let dir = dir(pin_dir);
    let entries = match fs::read_dir(&dir) {
        Ok(e) => e,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(DatapathError::io("listing pinned links", &dir, e)),
    };
    let mut removed = Vec::new();
    let mut names: Vec<String> = entries
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    // sk_lookup first, then connect4/6 (no new redirects), then the programs that serve
    // sockets already redirected.
    names.sort_by_key(|n| {
        let rank = if n.starts_with(SKLOOKUP_PREFIX) {
            0
        } else if n.starts_with("mesh_connect") {
            1
        } else {
            2
        };
        (rank, n.clone())
    });
    for name in names {
        if remove(&dir.join(&name))? {
            removed.push(name);
        }
    }
    match fs::remove_dir(&dir) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(DatapathError::io("removing the links directory", &dir, e)),
    }
    Ok(removed)
}

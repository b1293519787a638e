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

/// The names of the pinned links (none when the directory does not exist).
fn names(dir: &Path) -> Result<Vec<String>, DatapathError> {
    match fs::read_dir(dir) {
        Ok(entries) => Ok(entries
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(Vec::new()),
        Err(e) => Err(DatapathError::io("listing pinned links", dir, e)),
    }
}

/// The network namespaces with a pinned `mesh_sklookup` link.
pub fn pinned_sklookup_cookies(pin_dir: &Path) -> Result<Vec<u64>, DatapathError> {
    let mut cookies: Vec<u64> = names(&dir(pin_dir))?
        .iter()
        .filter_map(|n| n.strip_prefix(SKLOOKUP_PREFIX)?.parse().ok())
        .collect();
    cookies.sort_unstable();
    Ok(cookies)
}

/// Pins `link` at `path`, replacing a link pinned there before. Returns whether one was
/// replaced. At no moment is neither pinned: ours is pinned beside it (`<path>-new`) and
/// renamed over it, which unpins the old one in the same step (it is detached then, as nobody
/// holds its descriptor). A crash in between leaves both attached, which is harmless, and the
/// next install or uninstall removes the spare pin.
pub fn install(link: FdLink, path: &Path) -> Result<(PinnedLink, bool), DatapathError> {
    let parent = path.parent().unwrap_or(path);
    fs::create_dir_all(parent)
        .map_err(|e| DatapathError::io("creating the links directory", parent, e))?;
    // (bpffs refuses names with a dot.)
    let mut spare = path.as_os_str().to_owned();
    spare.push("-new");
    let spare = PathBuf::from(spare);
    remove(&spare)?;
    let replaced = fs::symlink_metadata(path).is_ok();
    let pinned = link.pin(&spare).map_err(|e| DatapathError::Link {
        path: spare.clone(),
        reason: format!("cannot pin the link: {e}"),
    })?;
    if let Err(e) = fs::rename(&spare, path) {
        // Ours goes again; the previous one (if any) stays in force.
        let _ = remove(&spare);
        return Err(DatapathError::io("putting the new link in place", path, e));
    }
    drop(pinned);
    let pinned = PinnedLink::from_pin(path).map_err(|e| DatapathError::Link {
        path: path.to_path_buf(),
        reason: format!("cannot open the link just pinned: {e}"),
    })?;
    Ok((pinned, replaced))
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
    let mut removed = Vec::new();
    let mut names = names(&dir)?;
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

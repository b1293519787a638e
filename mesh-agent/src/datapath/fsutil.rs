//! File system checks: which mount a path is on, `/proc/mounts` parsing, the pin directory lock.
use std::{
    fs::File,
    io,
    path::{Path, PathBuf},
};

use nix::fcntl::{Flock, FlockArg};

/// `statfs(2)` magic numbers (linux/magic.h).
pub(super) const BPF_FS_MAGIC: i64 = 0xcafe_4a11;
pub(super) const CGROUP2_SUPER_MAGIC: i64 = 0x6367_7270;

/// The file system type (`f_type`) of the mount `path` is on.
pub(super) fn fs_type(path: &Path) -> io::Result<i64> {
    let stat = nix::sys::statfs::statfs(path)?;
    #[allow(clippy::unnecessary_cast, reason = "f_type is not i64 on every target")]
    Ok(stat.filesystem_type().0 as i64)
}

/// `path` itself if it exists, else its nearest existing ancestor.
pub(super) fn nearest_existing(path: &Path) -> PathBuf {
    let mut p = path;
    loop {
        if p.exists() {
            return p.to_path_buf();
        }
        match p.parent() {
            Some(parent) if !parent.as_os_str().is_empty() => p = parent,
            _ => return PathBuf::from("."),
        }
    }
}

/// Mount point of the first `cgroup2` entry in a `/proc/mounts` text.
pub(super) fn cgroup2_mount(mounts: &str) -> Option<PathBuf> {
    mounts.lines().find_map(|line| {
        let mut fields = line.split_whitespace();
        let (_source, target, fstype) = (fields.next()?, fields.next()?, fields.next()?);
        (fstype == "cgroup2").then(|| PathBuf::from(unescape_mount_field(target)))
    })
}

/// `/proc/mounts` escapes space, tab, newline and backslash as `\ooo` octal.
fn unescape_mount_field(field: &str) -> String {
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'\\' && i + 4 <= bytes.len() {
            let digits = &bytes[i + 1..i + 4];
            if digits.iter().all(|d| (b'0'..=b'7').contains(d)) {
                let v = digits
                    .iter()
                    .fold(0u32, |acc, d| acc * 8 + u32::from(d - b'0'));
                if let Ok(v) = u8::try_from(v) {
                    out.push(v);
                    i += 4;
                    continue;
                }
            }
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Takes a non-blocking exclusive `flock` on a directory, held until the returned handle drops.
/// `Ok(None)` if another process holds it.
pub(super) fn try_lock_dir(dir: &Path) -> io::Result<Option<Flock<File>>> {
    match Flock::lock(File::open(dir)?, FlockArg::LockExclusiveNonblock) {
        Ok(lock) => Ok(Some(lock)),
        Err((_, nix::errno::Errno::EWOULDBLOCK)) => Ok(None),
        Err((_, errno)) => Err(errno.into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_cgroup2_among_mounts() {
        let mounts = "sysfs /sys sysfs rw 0 0\n\
                      tmpfs /sys/fs/cgroup tmpfs ro 0 0\n\
                      cgroup /sys/fs/cgroup/cpu cgroup rw,cpu 0 0\n\
                      cgroup2 /sys/fs/cgroup/unified cgroup2 rw,nsdelegate 0 0\n";
        assert_eq!(
            cgroup2_mount(mounts),
            Some(PathBuf::from("/sys/fs/cgroup/unified"))
        );
        assert_eq!(cgroup2_mount("proc /proc proc rw 0 0\n"), None);
    }

    #[test]
    fn unescapes_octal_in_mount_points() {
        let mounts = "cgroup2 /mnt/my\\040cgroup cgroup2 rw 0 0\n";
        assert_eq!(cgroup2_mount(mounts), Some(PathBuf::from("/mnt/my cgroup")));
        assert_eq!(unescape_mount_field("a\\134b"), "a\\b");
        assert_eq!(unescape_mount_field("trailing\\04"), "trailing\\04");
    }
}

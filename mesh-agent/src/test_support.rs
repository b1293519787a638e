//! Helpers for the unit tests that build real kernel state: network namespaces, bpffs mounts.
//! What the end-to-end tests also use comes from `mesh_tests::sys`, the one home of such helpers.
use std::path::Path;
use std::process::Command;

/// Runs a shell script; panics with its stderr when it fails.
pub(crate) fn sh(script: &str) {
    let out = Command::new("sh")
        .args(["-c", script])
        .output()
        .expect("run sh");
    assert!(
        out.status.success(),
        "{script}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// ` nodad` for an IPv6 address (usable at once, without duplicate address detection).
pub(crate) fn nodad(addr: &str) -> &'static str {
    if addr.contains(':') {
        " nodad"
    } else {
        ""
    }
}

pub(crate) use mesh_tests::sys::{mount_bpffs, umount_detach};

/// Lazily unmounts `dir` (what [`mount_bpffs`] mounted); errors are ignored (cleanup).
pub(crate) fn unmount(dir: &Path) {
    let _ = umount_detach(dir);
}

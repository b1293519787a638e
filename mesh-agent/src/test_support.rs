//! Helpers shared by the tests that build real kernel state: network namespaces, bpffs mounts.
use std::ffi::CString;
use std::io;
use std::os::unix::ffi::OsStrExt as _;
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

/// Mounts a private bpffs on the existing directory `dir`.
pub(crate) fn mount_bpffs(dir: &Path) -> io::Result<()> {
    let c_path = CString::new(dir.as_os_str().as_bytes())?;
    // SAFETY: NUL-terminated strings, no data argument.
    let rc = unsafe {
        libc::mount(
            c"bpf".as_ptr(),
            c_path.as_ptr(),
            c"bpf".as_ptr(),
            0,
            std::ptr::null(),
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Lazily unmounts `dir` (what [`mount_bpffs`] mounted); errors are ignored (cleanup).
pub(crate) fn unmount(dir: &Path) {
    if let Ok(c_path) = CString::new(dir.as_os_str().as_bytes()) {
        // SAFETY: NUL-terminated path.
        unsafe { libc::umount2(c_path.as_ptr(), libc::MNT_DETACH) };
    }
}

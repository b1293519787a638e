//! Helpers shared by the in-pod tests that build real network namespaces.
use std::process::Command;

/// Runs a shell script; panics with its stderr when it fails.
pub(super) fn sh(script: &str) {
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
pub(super) fn nodad(addr: &str) -> &'static str {
    if addr.contains(':') {
        " nodad"
    } else {
        ""
    }
}

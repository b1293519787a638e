//! Pieces the command-line tools (`mesh-testapp`, `mesh-bench`) share.
use std::io::Write;
use std::net::{SocketAddr, ToSocketAddrs};

/// The `--connect` address, resolved; errors name what is missing or wrong.
pub fn connect_addr(connect: Option<&str>) -> Result<SocketAddr, String> {
    let a = connect.ok_or("--connect is required")?;
    a.to_socket_addrs()
        .map_err(|e| format!("resolving {a}: {e}"))?
        .next()
        .ok_or_else(|| format!("cannot resolve {a}"))
}

/// Prints one JSON line and flushes (tests read the tools' stdout line by line).
pub fn emit(v: &serde_json::Value) {
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{v}");
    let _ = out.flush();
}

/// Lifts the soft open-file limit to the hard one (the tools hold thousands of connections).
pub fn raise_open_file_limit() {
    // SAFETY: getrlimit/setrlimit with a valid struct.
    unsafe {
        let mut r: libc::rlimit = std::mem::zeroed();
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut r) == 0 && r.rlim_cur < r.rlim_max {
            r.rlim_cur = r.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &r);
        }
    }
}

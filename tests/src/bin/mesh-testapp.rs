//! mesh-testapp: a small TCP and HTTP tool for end-to-end tests and benchmarks. Prints JSON
//! lines on stdout. The TCP modes run on std threads; the two HTTP modes (module `http`) run a
//! tokio runtime of their own.
//!
//! ```text
//! mesh-testapp echo-server --listen ADDR [--listen ADDR ...]
//! mesh-testapp client --connect ADDR [--conns K] [--bytes N] [--timeout-ms T] [--marker TEXT]
//! mesh-testapp soak --connect ADDR --duration-ms D [--interval-ms I] [--timeout-ms T]
//!                   [--long-lived-only] [--progress-every N] [--long-lived N] [--workers W]
//! mesh-testapp hold --connect ADDR --conns K [--bytes N] [--workers W] [--timeout-ms T]
//! mesh-testapp http-server --listen ADDR [--listen ADDR ...] --name NAME [--log-requests]
//!     [--fail-percent P]
//!                          [--workers W]
//! mesh-testapp http-client --url http://HOST:PORT/PATH [--requests N] [--duration-ms D]
//!                          [--concurrency C] [--http2] [--grpc] [--method M]
//!                          [--header 'name: value' ...] [--body-bytes N] [--timeout-ms T]
//!                          [--workers W] [--paired-url http://HOST:PORT/PATH]
//! ```
//!
//! `http-server` prints `{"event":"listening","listening":[ADDR..],"name":NAME,"pid":P}`, then,
//! with `--log-requests` only, one `{"event":"request",..}` line per request. `http-client`
//! sends N requests (default 1), or with `--duration-ms` as many as fit in D ms (capped by
//! `--requests` if given), over C keep-alive connections (default 1), each one request at a
//! time, HTTP/2 with `--http2` or `--grpc`; it prints one summary line:
//!
//! ```text
//! {"ok":BOOL,"requests":N,"responses":N,"failed":N,"connections":N,"protocol":"HTTP/1.1",
//!  "errors":[first 10],"status":{"200":N},"served_by":{NAME:N},"grpc_status":{"0":N} (--grpc),
//!  "latency_us":{"p50":..,"p90":..,"p99":..,"max":..},"elapsed_ms":..,"rps":..,
//!  "first":{"status":..,"protocol":..,"headers":{..},"trailers":{..},"body":"first 4 KiB",
//!           "body_bytes":N,"at_ms":..}}
//! ```
//!
//! With `--paired-url`, each connection has a twin to that URL and every request to `--url` is
//! followed by one to it (the order swapped every other pair), so that both see the same
//! conditions; the twin's figures are under `"paired"` (`responses`, `failed`, `errors`,
//! `status`, `served_by`, `latency_us`, `first`) and `ok` covers both.
//!
//! `ok` is true when requests were sent and every one got a response, whatever its status (see
//! `http.rs` for what else counts as a failure). The server's request headers
//! (`x-response-status`, `x-response-bytes`, `x-delay-ms`, `x-grpc-status`) and its exact
//! answers are described in `http.rs`. `--workers W` sets the HTTP modes' runtime threads
//! (default one per CPU). SIGINT or SIGTERM ends a client run early, with its summary.

use mesh_tests::tool::{emit, raise_open_file_limit};
use serde_json::json;
use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream, ToSocketAddrs};
use std::os::fd::FromRawFd;
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

#[path = "mesh-testapp/http.rs"]
mod http;

const USAGE: &str = "usage:
  mesh-testapp echo-server --listen ADDR [--listen ADDR ...]
  mesh-testapp client --connect ADDR [--conns K] [--bytes N] [--timeout-ms T] [--marker TEXT]
  mesh-testapp soak --connect ADDR --duration-ms D [--interval-ms I] [--timeout-ms T]
                    [--long-lived-only] [--progress-every N] [--long-lived N] [--workers W]
  mesh-testapp hold --connect ADDR --conns K [--bytes N] [--workers W] [--timeout-ms T]
  mesh-testapp http-server --listen ADDR [--listen ADDR ...] --name NAME [--log-requests]
      [--fail-percent P]
                           [--workers W]
  mesh-testapp http-client --url http://HOST:PORT/PATH [--requests N] [--duration-ms D]
                           [--concurrency C] [--http2] [--grpc] [--method M]
                           [--header 'name: value' ...] [--body-bytes N] [--timeout-ms T]
                           [--workers W] [--paired-url http://HOST:PORT/PATH]";

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let Some((mode, rest)) = args.split_first() else {
        eprintln!("{USAGE}");
        return ExitCode::from(2);
    };
    let opts = match Opts::parse(rest) {
        Ok(o) => o,
        Err(e) => {
            eprintln!("mesh-testapp: {e}\n{USAGE}");
            return ExitCode::from(2);
        }
    };
    let r = match mode.as_str() {
        "echo-server" => echo_server(&opts),
        "client" => client(&opts),
        "soak" => soak(&opts),
        "hold" => hold(&opts),
        "http-server" => http::http_server(&opts),
        "http-client" => http::http_client(&opts),
        "-h" | "--help" | "help" => {
            println!("{USAGE}");
            Ok(true)
        }
        other => Err(format!("unknown mode {other:?}")),
    };
    match r {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::from(1),
        Err(e) => {
            eprintln!("mesh-testapp: {e}");
            emit(&json!({"ok": false, "errors": [e]}));
            ExitCode::from(2)
        }
    }
}

#[derive(Default, Clone)]
struct Opts {
    listen: Vec<String>,
    connect: Option<String>,
    conns: usize,
    bytes: u64,
    timeout: Duration,
    duration: Duration,
    interval: Duration,
    long_lived_only: bool,
    progress_every: u64,
    long_lived: usize,
    workers: usize,
    // http-server
    name: Option<String>,
    log_requests: bool,
    fail_percent: u64,
    // http-client
    url: Option<String>,
    paired_url: Option<String>,
    requests: Option<u64>,
    concurrency: usize,
    http2: bool,
    grpc: bool,
    method: Option<String>,
    headers: Vec<String>,
    body_bytes: usize,
    /// The flags given, for options whose default depends on the mode.
    given: Vec<String>,
}

impl Opts {
    fn parse(args: &[String]) -> Result<Opts, String> {
        let mut o = Opts {
            conns: 1,
            bytes: 1024,
            timeout: Duration::from_secs(20),
            duration: Duration::from_secs(10),
            interval: Duration::from_millis(100),
            long_lived: 1,
            workers: 1,
            concurrency: 1,
            ..Opts::default()
        };
        let mut it = args.iter();
        while let Some(flag) = it.next() {
            o.given.push(flag.clone());
            let mut val = || {
                it.next()
                    .cloned()
                    .ok_or_else(|| format!("{flag} needs a value"))
            };
            let num = |v: String| {
                v.parse::<u64>()
                    .map_err(|_| format!("{flag}: not a number: {v:?}"))
            };
            match flag.as_str() {
                "--listen" => o.listen.push(val()?),
                "--connect" => o.connect = Some(val()?),
                "--conns" => o.conns = num(val()?)? as usize,
                "--bytes" => o.bytes = num(val()?)?,
                "--timeout-ms" => o.timeout = Duration::from_millis(num(val()?)?.max(1)),
                "--duration-ms" => o.duration = Duration::from_millis(num(val()?)?),
                "--interval-ms" => o.interval = Duration::from_millis(num(val()?)?.max(1)),
                "--long-lived-only" => o.long_lived_only = true,
                "--progress-every" => o.progress_every = num(val()?)?,
                "--long-lived" => o.long_lived = num(val()?)? as usize,
                "--workers" => o.workers = num(val()?)?.max(1) as usize,
                "--marker" => {
                    let m = val()?;
                    if m.is_empty() {
                        return Err("--marker needs a non-empty text".into());
                    }
                    let _ = MARKER.set(m.into_bytes());
                }
                "--name" => o.name = Some(val()?),
                "--log-requests" => o.log_requests = true,
                "--fail-percent" => {
                    o.fail_percent = num(val()?)?;
                    if o.fail_percent > 100 {
                        return Err(format!("--fail-percent {}: at most 100", o.fail_percent));
                    }
                }
                "--url" => o.url = Some(val()?),
                "--paired-url" => o.paired_url = Some(val()?),
                "--requests" => o.requests = Some(num(val()?)?),
                "--concurrency" => o.concurrency = num(val()?)?.max(1) as usize,
                "--http2" => o.http2 = true,
                "--grpc" => o.grpc = true,
                "--method" => o.method = Some(val()?),
                "--header" => o.headers.push(val()?),
                "--body-bytes" => o.body_bytes = num(val()?)? as usize,
                _ => return Err(format!("unknown option {flag:?}")),
            }
        }
        Ok(o)
    }

    fn connect_addr(&self) -> Result<SocketAddr, String> {
        mesh_tests::tool::connect_addr(self.connect.as_deref())
    }

    fn given(&self, flag: &str) -> bool {
        self.given.iter().any(|f| f == flag)
    }
}

// ---------------------------------------------------------------------------------------------
// echo-server

/// Binds a listener. IPv6 listeners are V6ONLY, so `0.0.0.0:P` and `[::]:P` can both be bound.
fn bind(addr: SocketAddr) -> io::Result<TcpListener> {
    let SocketAddr::V6(a6) = addr else {
        return TcpListener::bind(addr);
    };
    // SAFETY: plain socket syscalls on an fd we own; the fd is handed to TcpListener.
    unsafe {
        let fd = libc::socket(libc::AF_INET6, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0);
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        let listener = TcpListener::from_raw_fd(fd);
        let one: libc::c_int = 1;
        for (level, opt) in [
            (libc::SOL_SOCKET, libc::SO_REUSEADDR),
            (libc::IPPROTO_IPV6, libc::IPV6_V6ONLY),
        ] {
            if libc::setsockopt(
                fd,
                level,
                opt,
                (&one as *const libc::c_int).cast(),
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            ) != 0
            {
                return Err(io::Error::last_os_error());
            }
        }
        let mut sa: libc::sockaddr_in6 = std::mem::zeroed();
        sa.sin6_family = libc::AF_INET6 as libc::sa_family_t;
        sa.sin6_port = a6.port().to_be();
        sa.sin6_flowinfo = a6.flowinfo();
        sa.sin6_scope_id = a6.scope_id();
        sa.sin6_addr.s6_addr = a6.ip().octets();
        if libc::bind(
            fd,
            (&sa as *const libc::sockaddr_in6).cast(),
            std::mem::size_of::<libc::sockaddr_in6>() as libc::socklen_t,
        ) != 0
        {
            return Err(io::Error::last_os_error());
        }
        if libc::listen(fd, 1024) != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(listener)
    }
}

/// Binds every `--listen` address (at least one).
fn bind_all(listen: &[String]) -> Result<Vec<TcpListener>, String> {
    if listen.is_empty() {
        return Err("--listen is required".into());
    }
    let mut listeners = Vec::new();
    for a in listen {
        let addr = a
            .to_socket_addrs()
            .map_err(|e| format!("resolving {a}: {e}"))?
            .next()
            .ok_or_else(|| format!("cannot resolve {a}"))?;
        let l = bind(addr).map_err(|e| format!("binding {addr}: {e}"))?;
        listeners.push(l);
    }
    Ok(listeners)
}

fn echo_server(o: &Opts) -> Result<bool, String> {
    raise_open_file_limit();
    let listeners = bind_all(&o.listen)?;
    let addrs: Vec<String> = listeners
        .iter()
        .map(|l| l.local_addr().map(|a| a.to_string()).unwrap_or_default())
        .collect();
    emit(&json!({"event": "listening", "addrs": addrs, "pid": std::process::id()}));
    let handles: Vec<_> = listeners
        .into_iter()
        .map(|l| std::thread::spawn(move || accept_loop(l)))
        .collect();
    for h in handles {
        let _ = h.join();
    }
    Ok(true)
}

fn accept_loop(l: TcpListener) {
    loop {
        match l.accept() {
            Ok((s, peer)) => {
                let local = s.local_addr().map(|a| a.to_string()).unwrap_or_default();
                emit(&json!({"event": "accept", "peer": peer.to_string(), "local": local}));
                // Small stacks: a test may hold ten thousand connections.
                let _ = std::thread::Builder::new()
                    .stack_size(128 * 1024)
                    .spawn(move || echo_conn(s, peer));
            }
            Err(e) => {
                emit(&json!({"event": "accept_error", "error": e.to_string()}));
                std::thread::sleep(Duration::from_millis(50));
            }
        }
    }
}

fn echo_conn(mut s: TcpStream, peer: SocketAddr) {
    let _ = s.set_nodelay(true);
    let mut buf = vec![0u8; 16 * 1024];
    let mut total: u64 = 0;
    let result = loop {
        match s.read(&mut buf) {
            Ok(0) => break s.shutdown(Shutdown::Write).map_err(|e| e.to_string()),
            Ok(n) => {
                if let Err(e) = s.write_all(&buf[..n]) {
                    break Err(e.to_string());
                }
                total += n as u64;
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => break Err(e.to_string()),
        }
    };
    let mut v = json!({"event": "closed", "peer": peer.to_string(), "bytes": total});
    if let Err(e) = result {
        v["error"] = json!(e);
    }
    emit(&v);
}

// ---------------------------------------------------------------------------------------------
// deterministic payload

fn splitmix64(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// With `--marker TEXT`, every payload is TEXT repeated (to look for it in packet captures).
static MARKER: std::sync::OnceLock<Vec<u8>> = std::sync::OnceLock::new();

/// Fills `buf` with bytes `off..off+len` of the stream identified by `seed`.
fn pattern(seed: u64, mut off: u64, buf: &mut [u8]) {
    if let Some(m) = MARKER.get() {
        for (i, b) in buf.iter_mut().enumerate() {
            *b = m[((off + i as u64) % m.len() as u64) as usize];
        }
        return;
    }
    let mut i = 0;
    while i < buf.len() {
        let block = splitmix64(seed.wrapping_mul(0x1000_0000_01B3) ^ (off / 8)).to_le_bytes();
        let within = (off % 8) as usize;
        let n = (8 - within).min(buf.len() - i);
        buf[i..i + n].copy_from_slice(&block[within..within + n]);
        i += n;
        off += n as u64;
    }
}

fn connect(addr: SocketAddr, timeout: Duration) -> Result<TcpStream, String> {
    let s =
        TcpStream::connect_timeout(&addr, timeout).map_err(|e| format!("connect {addr}: {e}"))?;
    s.set_read_timeout(Some(timeout))
        .map_err(|e| e.to_string())?;
    s.set_write_timeout(Some(timeout))
        .map_err(|e| e.to_string())?;
    let _ = s.set_nodelay(true);
    Ok(s)
}

/// Writes `len` pattern bytes while concurrently reading and verifying the echo; half-closes
/// after writing and reads to EOF. Returns (peer, local) of the socket.
fn echo_exchange(
    addr: SocketAddr,
    seed: u64,
    len: u64,
    timeout: Duration,
) -> Result<(String, String), String> {
    let s = connect(addr, timeout)?;
    let peer = s.peer_addr().map(|a| a.to_string()).unwrap_or_default();
    let local = s.local_addr().map(|a| a.to_string()).unwrap_or_default();
    let mut w = s.try_clone().map_err(|e| e.to_string())?;
    let writer = std::thread::spawn(move || -> Result<(), String> {
        let mut buf = vec![0u8; 64 * 1024];
        let mut off = 0u64;
        while off < len {
            let n = (len - off).min(buf.len() as u64) as usize;
            pattern(seed, off, &mut buf[..n]);
            w.write_all(&buf[..n])
                .map_err(|e| format!("write at {off}: {e}"))?;
            off += n as u64;
        }
        w.shutdown(Shutdown::Write)
            .map_err(|e| format!("shutdown(write): {e}"))
    });
    let mut r = s;
    let mut buf = vec![0u8; 64 * 1024];
    let mut want = vec![0u8; 64 * 1024];
    let mut got = 0u64;
    let read_result = loop {
        match r.read(&mut buf) {
            Ok(0) => break Ok(()),
            Ok(n) => {
                if got + n as u64 > len {
                    break Err(format!(
                        "received more than sent: {} > {len}",
                        got + n as u64
                    ));
                }
                pattern(seed, got, &mut want[..n]);
                if buf[..n] != want[..n] {
                    let i = buf[..n].iter().zip(&want[..n]).position(|(a, b)| a != b);
                    break Err(format!(
                        "payload mismatch at byte {}",
                        got + i.unwrap_or(0) as u64
                    ));
                }
                got += n as u64;
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => break Err(format!("read after {got} bytes: {e}")),
        }
    };
    if read_result.is_err() {
        let _ = r.shutdown(Shutdown::Both);
    }
    let write_result = writer
        .join()
        .unwrap_or_else(|_| Err("writer panicked".into()));
    read_result?;
    write_result?;
    if got != len {
        return Err(format!("EOF after {got} of {len} bytes"));
    }
    Ok((peer, local))
}

// ---------------------------------------------------------------------------------------------
// client

fn client(o: &Opts) -> Result<bool, String> {
    let addr = o.connect_addr()?;
    let started = Instant::now();
    let handles: Vec<_> = (0..o.conns)
        .map(|c| {
            let (bytes, timeout) = (o.bytes, o.timeout);
            std::thread::spawn(move || echo_exchange(addr, c as u64 + 1, bytes, timeout))
        })
        .collect();
    let mut errors = Vec::new();
    let (mut peer, mut local) = (String::new(), String::new());
    for (c, h) in handles.into_iter().enumerate() {
        match h.join().unwrap_or_else(|_| Err("thread panicked".into())) {
            Ok((p, l)) => {
                if c == 0 {
                    (peer, local) = (p, l);
                }
            }
            Err(e) => errors.push(format!("conn {c}: {e}")),
        }
    }
    let ok = errors.is_empty();
    let elapsed = started.elapsed();
    emit(&json!({
        "ok": ok,
        "conns": o.conns,
        "bytes": o.bytes,
        "peer": peer,
        "local": local,
        "elapsed_ms": elapsed.as_secs_f64() * 1000.0,
        "errors": errors,
    }));
    Ok(ok)
}

// ---------------------------------------------------------------------------------------------
// soak

#[derive(Default)]
struct SoakStats {
    long_lived_connections: AtomicU64,
    long_lived_roundtrips: AtomicU64,
    long_lived_errors: AtomicU64,
    new_conns_ok: AtomicU64,
    new_conns_failed: AtomicU64,
    errors: Mutex<Vec<String>>,
}

/// Set by SIGINT or SIGTERM: a soak run then ends early, cleanly, and prints its summary.
static STOP: AtomicBool = AtomicBool::new(false);

extern "C" fn on_stop_signal(_: libc::c_int) {
    STOP.store(true, Ordering::Relaxed);
}

fn stop_on_signals() {
    let handler: extern "C" fn(libc::c_int) = on_stop_signal;
    for sig in [libc::SIGINT, libc::SIGTERM] {
        // SAFETY: the handler only stores to an atomic, which is async-signal-safe.
        unsafe { libc::signal(sig, handler as libc::sighandler_t) };
    }
}

fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// Half-closes `s` and expects the peer to close too, with nothing more to read.
fn close_cleanly(s: &mut TcpStream, timeout: Duration) -> Result<(), String> {
    s.shutdown(Shutdown::Write)
        .map_err(|e| format!("shutdown: {e}"))?;
    s.set_read_timeout(Some(timeout))
        .map_err(|e| format!("set_read_timeout: {e}"))?;
    let mut rest = [0u8; 64];
    match s.read(&mut rest) {
        Ok(0) => Ok(()),
        Ok(n) => Err(format!("{n} unexpected bytes before the close")),
        Err(e) => Err(format!("waiting for the peer's close: {e}")),
    }
}

impl SoakStats {
    fn error(&self, e: String) {
        let mut v = self.errors.lock().unwrap();
        if v.len() < 10 {
            v.push(e);
        }
    }
}

fn soak(o: &Opts) -> Result<bool, String> {
    let addr = o.connect_addr()?;
    let deadline = Instant::now() + o.duration;
    let stats = Arc::new(SoakStats::default());
    let run = SoakRun {
        addr,
        interval: o.interval,
        timeout: o.timeout,
        progress_every: o.progress_every,
        deadline,
    };
    stop_on_signals();
    let mut threads: Vec<_> = (0..o.long_lived as u64)
        .map(|k| {
            let st = stats.clone();
            std::thread::spawn(move || long_lived(run, k, &st))
        })
        .collect();
    if !o.long_lived_only {
        threads.extend((0..o.workers as u64).map(|w| {
            let st = stats.clone();
            std::thread::spawn(move || new_conns(run, w, &st))
        }));
    }
    for t in threads {
        let _ = t.join();
    }

    let g = |a: &AtomicU64| a.load(Ordering::Relaxed);
    let (rt, lle) = (g(&stats.long_lived_roundtrips), g(&stats.long_lived_errors));
    let (nok, nfail) = (g(&stats.new_conns_ok), g(&stats.new_conns_failed));
    let ok = lle == 0 && nfail == 0 && rt > 0 && (nok > 0 || o.long_lived_only);
    let errors = stats.errors.lock().unwrap().clone();
    emit(&json!({
        "ok": ok,
        "long_lived_connections": g(&stats.long_lived_connections),
        "long_lived_roundtrips": rt,
        "long_lived_errors": lle,
        "new_conns_ok": nok,
        "new_conns_failed": nfail,
        "errors": errors,
    }));
    Ok(ok)
}

/// What every soak thread shares.
#[derive(Clone, Copy)]
struct SoakRun {
    addr: SocketAddr,
    interval: Duration,
    timeout: Duration,
    progress_every: u64,
    deadline: Instant,
}

impl SoakRun {
    fn running(&self) -> bool {
        Instant::now() < self.deadline && !STOP.load(Ordering::Relaxed)
    }
}

/// Long-lived connection number `k`: a 64-byte echo round trip every interval, checked byte for
/// byte; reconnects after a failure.
fn long_lived(run: SoakRun, k: u64, st: &SoakStats) {
    let SoakRun {
        addr,
        interval,
        timeout,
        progress_every,
        ..
    } = run;
    // The current connection, its local address and its round trips so far.
    let mut conn: Option<(TcpStream, String, u64)> = None;
    let mut seq: u64 = 0;
    let mut buf = [0u8; 64];
    let mut got = [0u8; 64];
    while run.running() {
        let r = (|| -> Result<(), String> {
            if conn.is_none() {
                let s = connect(addr, timeout)?;
                let local = s.local_addr().map(|a| a.to_string()).unwrap_or_default();
                st.long_lived_connections.fetch_add(1, Ordering::Relaxed);
                conn = Some((s, local, 0));
            }
            let (s, local, n) = conn.as_mut().expect("connected");
            pattern(0xABCD_0000 + (k << 32) + seq, 0, &mut buf);
            buf[..8].copy_from_slice(&seq.to_le_bytes());
            s.write_all(&buf).map_err(|e| format!("write: {e}"))?;
            s.read_exact(&mut got).map_err(|e| format!("read: {e}"))?;
            if got != buf {
                return Err("echo mismatch".into());
            }
            *n += 1;
            if *n == 1 {
                emit(&json!({"event": "long_lived_open", "local": local}));
            }
            if progress_every > 0 && *n % progress_every == 0 {
                emit(&json!({"event": "progress", "local": local, "roundtrips": *n}));
            }
            Ok(())
        })();
        match r {
            Ok(()) => {
                st.long_lived_roundtrips.fetch_add(1, Ordering::Relaxed);
            }
            Err(e) => {
                st.long_lived_errors.fetch_add(1, Ordering::Relaxed);
                st.error(format!("long-lived round trip {seq}: {e}"));
                let (local, n) = conn
                    .take()
                    .map(|(_, local, n)| (local, n))
                    .unwrap_or_default();
                emit(&json!({
                    "event": "long_lived_error",
                    "local": local,
                    "roundtrips": n,
                    "error": e,
                    "unix_ms": unix_ms(),
                }));
            }
        }
        seq += 1;
        std::thread::sleep(interval);
    }
    // A clean end: half-close, then the echo server's own close must follow (EOF, no reset,
    // no stray bytes).
    if let Some((mut s, local, _)) = conn {
        if let Err(e) = close_cleanly(&mut s, timeout) {
            st.long_lived_errors.fetch_add(1, Ordering::Relaxed);
            st.error(format!("long-lived close: {e}"));
            emit(
                &json!({"event": "long_lived_error", "local": local, "error": e, "unix_ms": unix_ms()}),
            );
        }
    }
}

/// New-connection worker `w`: one connect, 1 KiB echoed and checked, close; every interval.
fn new_conns(run: SoakRun, w: u64, st: &SoakStats) {
    let SoakRun {
        addr,
        interval,
        timeout,
        ..
    } = run;
    let mut i: u64 = 0;
    while run.running() {
        match echo_exchange(addr, 0x5EED_0000 + (w << 32) + i, 1024, timeout) {
            Ok(_) => {
                st.new_conns_ok.fetch_add(1, Ordering::Relaxed);
            }
            Err(e) => {
                st.new_conns_failed.fetch_add(1, Ordering::Relaxed);
                st.error(format!("new conn {i}: {e}"));
                emit(&json!({"event": "new_conn_error", "error": e, "unix_ms": unix_ms()}));
            }
        }
        i += 1;
        std::thread::sleep(interval);
    }
}

// ---------------------------------------------------------------------------------------------
// hold

/// Opens `--conns` connections (spread over `--workers` threads), each echoing `--bytes` of its
/// own pattern, checked byte for byte; prints `{"event":"held"}` with all of them open; on SIGINT
/// echoes a second `--bytes` on every one, checked again, and closes each cleanly.
fn hold(o: &Opts) -> Result<bool, String> {
    let addr = o.connect_addr()?;
    raise_open_file_limit();
    stop_on_signals();
    let (conns, bytes, timeout) = (o.conns, o.bytes as usize, o.timeout);
    let workers = o.workers.clamp(1, conns.max(1));
    let started = Instant::now();
    let opened = Arc::new(AtomicU64::new(0));
    let (go_tx, go_rx) = std::sync::mpsc::channel::<()>();
    let go_rx = Arc::new(Mutex::new(go_rx));
    let threads: Vec<_> = (0..workers)
        .map(|w| {
            let (opened, go_rx) = (opened.clone(), go_rx.clone());
            std::thread::spawn(move || -> Result<usize, String> {
                let mine: Vec<u64> = (w..conns).step_by(workers).map(|i| i as u64).collect();
                let mut held = Vec::with_capacity(mine.len());
                for &i in &mine {
                    let mut s = connect(addr, timeout).map_err(|e| format!("conn {i}: {e}"))?;
                    exchange(&mut s, i, 0, bytes).map_err(|e| format!("conn {i}: {e}"))?;
                    opened.fetch_add(1, Ordering::Relaxed);
                    held.push((i, s));
                }
                // Every worker waits for the one go signal, passed on to the next.
                let _ = go_rx.lock().unwrap().recv();
                for (i, s) in &mut held {
                    exchange(s, *i, bytes as u64, bytes)
                        .and_then(|()| close_cleanly(s, timeout))
                        .map_err(|e| format!("conn {i} after the hold: {e}"))?;
                }
                Ok(held.len())
            })
        })
        .collect();
    while opened.load(Ordering::Relaxed) < conns as u64 {
        if threads.iter().any(|t| t.is_finished()) {
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let n = opened.load(Ordering::Relaxed);
    if n == conns as u64 {
        emit(&json!({"event": "held", "conns": n, "secs": started.elapsed().as_secs_f64()}));
        while !STOP.load(Ordering::Relaxed) {
            std::thread::sleep(Duration::from_millis(20));
        }
    }
    for _ in 0..workers {
        let _ = go_tx.send(());
    }
    let mut verified = 0;
    let mut errors = Vec::new();
    for t in threads {
        match t.join() {
            Ok(Ok(k)) => verified += k,
            Ok(Err(e)) => errors.push(e),
            Err(_) => errors.push("a worker panicked".into()),
        }
    }
    let ok = errors.is_empty() && verified == conns;
    emit(&json!({"ok": ok, "conns": conns, "verified": verified, "errors": errors}));
    Ok(ok)
}

/// Writes bytes `off..off+len` of stream `seed`'s pattern and reads the same back.
fn exchange(s: &mut TcpStream, seed: u64, off: u64, len: usize) -> Result<(), String> {
    let mut out = vec![0u8; len];
    pattern(seed, off, &mut out);
    s.write_all(&out).map_err(|e| format!("write: {e}"))?;
    let mut back = vec![0u8; len];
    s.read_exact(&mut back).map_err(|e| format!("read: {e}"))?;
    if back != out {
        return Err("echo mismatch".into());
    }
    Ok(())
}

//! mesh-bench: the benchmark load generator, a client/server pair built in release mode so that
//! every scenario of `cargo xtask bench` runs identical code (std threads and blocking sockets,
//! no async runtime, nothing scenario-specific). Prints JSON lines on stdout.
//!
//! ```text
//! mesh-bench server --listen ADDR [--listen ADDR ...] [--cpu N] [--workers N]
//! mesh-bench client --connect ADDR --mode bulk|rr|crr|hold [options] [--cpu N]
//!   bulk: --streams N --bytes TOTAL         N connections move TOTAL bytes client -> server
//!   rr:   --size B --duration-ms D [--warmup-ms W]      closed-loop B-byte request/response
//!   crr:  --concurrency C --duration-ms D [--warmup-ms W]  connect + 1-byte echo + close
//!   hold: --conns N [--hold-ms T]           open N connections, confirm each, then keep them
//! ```
//!
//! Wire protocol: the client's first byte names the exchange; the server answers accordingly.
//! * `B` bulk: the server reads to EOF and answers the payload byte count (u64 LE), then closes.
//! * `R` + u32 LE size: the server reads `size` bytes and writes `size` bytes back, until EOF.
//! * `E`: the server writes one byte back, then reads to EOF and closes (the client closes first).
//! * `H`: the server writes one byte back and waits for EOF.
//!
//! Latencies are recorded in nanoseconds in an HDR histogram (3 significant digits) and reported
//! in microseconds.
use hdrhistogram::Histogram;
use mesh_tests::tool::emit;
use serde_json::{json, Value};
use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::process::ExitCode;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Barrier, Mutex};
use std::time::{Duration, Instant};

const USAGE: &str = "usage:
  mesh-bench server --listen ADDR [--listen ADDR ...] [--cpu N] [--workers N]
  mesh-bench client --connect ADDR --mode bulk|rr|crr|hold [--streams N] [--bytes N] [--size B]
                    [--duration-ms D] [--warmup-ms W] [--concurrency C] [--conns N]
                    [--hold-ms T] [--cpu N]";

/// Bulk transfer chunk (one `write`/`read` call).
const CHUNK: usize = 256 * 1024;
/// No single socket operation of a benchmark may block longer than this.
const IO_TIMEOUT: Duration = Duration::from_secs(120);
/// Histogram range: 1 ns .. 60 s.
const HIST_MAX_NS: u64 = 60_000_000_000;

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let Some((role, rest)) = args.split_first() else {
        eprintln!("{USAGE}");
        return ExitCode::from(2);
    };
    let opts = match Opts::parse(rest) {
        Ok(o) => o,
        Err(e) => {
            eprintln!("mesh-bench: {e}\n{USAGE}");
            return ExitCode::from(2);
        }
    };
    if let Some(cpu) = opts.cpu {
        if let Err(e) = pin_to_cpu(cpu) {
            eprintln!("mesh-bench: cannot pin to CPU {cpu}: {e}");
            return ExitCode::from(2);
        }
    }
    mesh_tests::tool::raise_open_file_limit();
    let r = match role.as_str() {
        "server" => server(&opts),
        "client" => client(&opts),
        "-h" | "--help" | "help" => {
            println!("{USAGE}");
            return ExitCode::SUCCESS;
        }
        other => Err(format!("unknown role {other:?}")),
    };
    match r {
        Ok(v) => {
            emit(&v);
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("mesh-bench: {e}");
            emit(&json!({"ok": false, "error": e}));
            ExitCode::from(1)
        }
    }
}

#[derive(Default)]
struct Opts {
    listen: Vec<String>,
    connect: Option<String>,
    mode: String,
    streams: usize,
    bytes: u64,
    size: usize,
    duration: Duration,
    warmup: Duration,
    concurrency: usize,
    conns: usize,
    hold: Duration,
    cpu: Option<usize>,
    workers: usize,
}

impl Opts {
    fn parse(args: &[String]) -> Result<Opts, String> {
        let mut o = Opts {
            streams: 1,
            bytes: 64 << 20,
            size: 1024,
            duration: Duration::from_secs(5),
            concurrency: 4,
            conns: 100,
            hold: Duration::from_secs(3600),
            workers: 4,
            ..Opts::default()
        };
        let mut it = args.iter();
        while let Some(flag) = it.next() {
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
                "--mode" => o.mode = val()?,
                "--streams" => o.streams = (num(val()?)? as usize).max(1),
                "--bytes" => o.bytes = num(val()?)?,
                "--size" => o.size = (num(val()?)? as usize).clamp(1, 1 << 24),
                "--duration-ms" => o.duration = Duration::from_millis(num(val()?)?),
                "--warmup-ms" => o.warmup = Duration::from_millis(num(val()?)?),
                "--concurrency" => o.concurrency = (num(val()?)? as usize).max(1),
                "--conns" => o.conns = num(val()?)? as usize,
                "--hold-ms" => o.hold = Duration::from_millis(num(val()?)?),
                "--cpu" => o.cpu = Some(num(val()?)? as usize),
                "--workers" => o.workers = (num(val()?)? as usize).max(1),
                _ => return Err(format!("unknown option {flag:?}")),
            }
        }
        Ok(o)
    }

    fn connect_addr(&self) -> Result<SocketAddr, String> {
        mesh_tests::tool::connect_addr(self.connect.as_deref())
    }
}

fn pin_to_cpu(cpu: usize) -> io::Result<()> {
    // SAFETY: a zeroed cpu_set_t is valid; CPU_SET stays within it for cpu < CPU_SETSIZE.
    unsafe {
        if cpu >= libc::CPU_SETSIZE as usize {
            return Err(io::Error::from(io::ErrorKind::InvalidInput));
        }
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        if libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) != 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(())
}

/// Thousands of sockets (hold mode, the server of it) need more than the usual 1024 fds.
fn histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, HIST_MAX_NS, 3).expect("valid histogram bounds")
}

fn record(h: &mut Histogram<u64>, d: Duration) {
    let ns = (d.as_nanos() as u64).clamp(1, HIST_MAX_NS);
    h.record(ns).expect("value within bounds");
}

/// Percentiles in microseconds.
fn latency_json(h: &Histogram<u64>) -> Value {
    let us = |q: f64| h.value_at_quantile(q) as f64 / 1000.0;
    json!({
        "p50_us": us(0.50),
        "p90_us": us(0.90),
        "p99_us": us(0.99),
        "p999_us": us(0.999),
        "max_us": h.max() as f64 / 1000.0,
        "mean_us": h.mean() / 1000.0,
        "samples": h.len(),
    })
}

// ---------------------------------------------------------------------------------------------
// server

fn server(o: &Opts) -> Result<Value, String> {
    if o.listen.is_empty() {
        return Err("--listen is required".into());
    }
    let mut listeners = Vec::new();
    for a in &o.listen {
        let addr: SocketAddr = a.parse().map_err(|e| format!("--listen {a}: {e}"))?;
        let l = TcpListener::bind(addr).map_err(|e| format!("binding {addr}: {e}"))?;
        emit(
            &json!({"event": "listening", "addr": l.local_addr().map(|a| a.to_string()).unwrap_or_default()}),
        );
        listeners.push(Arc::new(l));
    }
    let mut workers = Vec::new();
    for l in &listeners {
        for _ in 0..o.workers {
            let l = l.clone();
            workers.push(std::thread::spawn(move || loop {
                match l.accept() {
                    Ok((s, _)) => {
                        if let Err(e) = serve(s) {
                            eprintln!("mesh-bench server: {e}");
                        }
                    }
                    Err(e) => {
                        eprintln!("mesh-bench server: accept: {e}");
                        std::thread::sleep(Duration::from_millis(10));
                    }
                }
            }));
        }
    }
    for w in workers {
        let _ = w.join();
    }
    Ok(json!({"ok": true}))
}

/// Spawns a thread with a small stack for one long-lived connection.
fn spawn_conn(f: impl FnOnce() -> io::Result<()> + Send + 'static) -> io::Result<()> {
    std::thread::Builder::new()
        .stack_size(128 * 1024)
        .spawn(move || {
            if let Err(e) = f() {
                if e.kind() != io::ErrorKind::ConnectionReset {
                    eprintln!("mesh-bench server: {e}");
                }
            }
        })
        .map(drop)
}

/// Reads the exchange byte; short exchanges are served inline by the accepting worker, long ones
/// get a thread of their own.
fn serve(mut s: TcpStream) -> io::Result<()> {
    s.set_nodelay(true)?;
    s.set_read_timeout(Some(IO_TIMEOUT))?;
    let mut kind = [0u8; 1];
    if s.read(&mut kind)? == 0 {
        return Ok(());
    }
    match kind[0] {
        b'E' => {
            s.write_all(b"e")?;
            drain(&mut s)?;
            Ok(())
        }
        b'B' => spawn_conn(move || {
            let n = drain(&mut s)?;
            s.write_all(&n.to_le_bytes())
        }),
        b'R' => spawn_conn(move || {
            let mut size = [0u8; 4];
            s.read_exact(&mut size)?;
            let size = u32::from_le_bytes(size) as usize;
            let mut buf = vec![0u8; size];
            loop {
                match read_exact_or_eof(&mut s, &mut buf)? {
                    true => s.write_all(&buf)?,
                    false => return Ok(()),
                }
            }
        }),
        b'H' => spawn_conn(move || {
            s.set_read_timeout(None)?;
            s.write_all(b"h")?;
            drain(&mut s).map(drop)
        }),
        other => Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("unknown exchange byte {other:#x}"),
        )),
    }
}

/// Reads to EOF; returns the byte count.
fn drain(s: &mut TcpStream) -> io::Result<u64> {
    let mut buf = vec![0u8; CHUNK];
    let mut n = 0u64;
    loop {
        match s.read(&mut buf) {
            Ok(0) => return Ok(n),
            Ok(k) => n += k as u64,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
}

/// `read_exact`, except that EOF before the first byte is a clean end (false).
fn read_exact_or_eof(s: &mut TcpStream, buf: &mut [u8]) -> io::Result<bool> {
    let mut got = 0;
    while got < buf.len() {
        match s.read(&mut buf[got..]) {
            Ok(0) if got == 0 => return Ok(false),
            Ok(0) => return Err(io::ErrorKind::UnexpectedEof.into()),
            Ok(k) => got += k,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(true)
}

// ---------------------------------------------------------------------------------------------
// client

fn client(o: &Opts) -> Result<Value, String> {
    let addr = o.connect_addr()?;
    match o.mode.as_str() {
        "bulk" => bulk(o, addr),
        "rr" => rr(o, addr),
        "crr" => crr(o, addr),
        "hold" => hold(o, addr),
        m => Err(format!("--mode must be bulk, rr, crr or hold, not {m:?}")),
    }
}

fn connect(addr: SocketAddr) -> io::Result<TcpStream> {
    let s = TcpStream::connect_timeout(&addr, Duration::from_secs(10))?;
    s.set_read_timeout(Some(IO_TIMEOUT))?;
    s.set_write_timeout(Some(IO_TIMEOUT))?;
    Ok(s)
}

/// `--streams` connections move `--bytes` in total (split evenly) from client to server. All
/// connections are set up first; the clock runs from the common start until the last server
/// confirmed its byte count, so the figure is end-to-end delivered payload.
fn bulk(o: &Opts, addr: SocketAddr) -> Result<Value, String> {
    let n = o.streams;
    let mut streams = Vec::with_capacity(n);
    for i in 0..n {
        let mut s = connect(addr).map_err(|e| format!("connecting stream {i} to {addr}: {e}"))?;
        s.write_all(b"B").map_err(|e| format!("stream {i}: {e}"))?;
        streams.push(s);
    }
    let barrier = Arc::new(Barrier::new(n + 1));
    let mut threads = Vec::with_capacity(n);
    for (i, mut s) in streams.into_iter().enumerate() {
        let share = o.bytes / n as u64 + u64::from((i as u64) < o.bytes % n as u64);
        let barrier = barrier.clone();
        threads.push(std::thread::spawn(move || -> Result<Instant, String> {
            let data = vec![0x5au8; CHUNK];
            barrier.wait();
            let mut left = share;
            while left > 0 {
                let k = left.min(CHUNK as u64) as usize;
                s.write_all(&data[..k])
                    .map_err(|e| format!("stream {i} write: {e}"))?;
                left -= k as u64;
            }
            s.shutdown(Shutdown::Write)
                .map_err(|e| format!("stream {i} shutdown: {e}"))?;
            let mut count = [0u8; 8];
            s.read_exact(&mut count)
                .map_err(|e| format!("stream {i}: no byte count from the server: {e}"))?;
            let done = Instant::now();
            let count = u64::from_le_bytes(count);
            if count != share {
                return Err(format!(
                    "stream {i}: server received {count} bytes, sent {share}"
                ));
            }
            Ok(done)
        }));
    }
    barrier.wait();
    let start = Instant::now();
    let mut end = start;
    for t in threads {
        let done = t.join().map_err(|_| "bulk thread panicked".to_string())??;
        end = end.max(done);
    }
    let secs = (end - start).as_secs_f64().max(1e-9);
    Ok(json!({
        "ok": true,
        "mode": "bulk",
        "streams": n,
        "bytes": o.bytes,
        "secs": secs,
        "gbps": o.bytes as f64 * 8.0 / secs / 1e9,
    }))
}

/// One connection, closed loop: write a `--size` request, read a `--size` response, repeat.
fn rr(o: &Opts, addr: SocketAddr) -> Result<Value, String> {
    let mut s = connect(addr).map_err(|e| format!("connecting to {addr}: {e}"))?;
    s.set_nodelay(true).map_err(|e| e.to_string())?;
    let mut hello = vec![b'R'];
    hello.extend_from_slice(&(o.size as u32).to_le_bytes());
    s.write_all(&hello).map_err(|e| e.to_string())?;
    let req = vec![0x5au8; o.size];
    let mut resp = vec![0u8; o.size];
    let mut one = |s: &mut TcpStream| -> Result<(), String> {
        s.write_all(&req).map_err(|e| format!("request: {e}"))?;
        s.read_exact(&mut resp)
            .map_err(|e| format!("response: {e}"))
    };
    let warm_end = Instant::now() + o.warmup;
    while Instant::now() < warm_end {
        one(&mut s)?;
    }
    let mut h = histogram();
    let start = Instant::now();
    let end = start + o.duration;
    let mut now = start;
    while now < end {
        one(&mut s)?;
        let t = Instant::now();
        record(&mut h, t - now);
        now = t;
    }
    let secs = (now - start).as_secs_f64().max(1e-9);
    let mut v = latency_json(&h);
    v["ok"] = json!(true);
    v["mode"] = json!("rr");
    v["size"] = json!(o.size);
    v["requests"] = json!(h.len());
    v["secs"] = json!(secs);
    v["rps"] = json!(h.len() as f64 / secs);
    Ok(v)
}

/// `--concurrency` threads each loop: connect, send one byte, read the echo, close. The setup
/// latency of a connection is from before `connect` until the echo arrived (so it includes
/// whatever the path does to establish the connection end to end, not just the local accept).
fn crr(o: &Opts, addr: SocketAddr) -> Result<Value, String> {
    let start = Instant::now();
    let measure_from = start + o.warmup;
    let measure_to = measure_from + o.duration;
    let errors = Arc::new(AtomicU64::new(0));
    let first_errors = Arc::new(Mutex::new(Vec::<String>::new()));
    let mut threads = Vec::new();
    for _ in 0..o.concurrency {
        let (errors, first_errors) = (errors.clone(), first_errors.clone());
        threads.push(std::thread::spawn(move || {
            let mut h = histogram();
            let note = |e: String| {
                errors.fetch_add(1, Ordering::Relaxed);
                let mut f = first_errors.lock().unwrap();
                if f.len() < 5 && !f.contains(&e) {
                    f.push(e);
                }
            };
            loop {
                let t0 = Instant::now();
                if t0 >= measure_to {
                    break;
                }
                let r = (|| -> io::Result<()> {
                    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
                    s.set_read_timeout(Some(Duration::from_secs(10)))?;
                    s.set_nodelay(true)?;
                    s.write_all(b"E")?;
                    let mut b = [0u8; 1];
                    s.read_exact(&mut b)?;
                    Ok(())
                })();
                match r {
                    Ok(()) if t0 >= measure_from => record(&mut h, t0.elapsed()),
                    Ok(()) => {}
                    Err(e) => {
                        note(e.to_string());
                        std::thread::sleep(Duration::from_millis(1));
                    }
                }
            }
            h
        }));
    }
    let mut h = histogram();
    for t in threads {
        let part = t.join().map_err(|_| "crr thread panicked".to_string())?;
        h.add(part).map_err(|e| e.to_string())?;
    }
    let secs = o.duration.as_secs_f64().max(1e-9);
    let mut v = latency_json(&h);
    v["ok"] = json!(true);
    v["mode"] = json!("crr");
    v["concurrency"] = json!(o.concurrency);
    v["conns"] = json!(h.len());
    v["secs"] = json!(secs);
    v["cps"] = json!(h.len() as f64 / secs);
    v["errors"] = json!(errors.load(Ordering::Relaxed));
    v["first_errors"] = json!(*first_errors.lock().unwrap());
    Ok(v)
}

/// Opens `--conns` connections, each confirmed end to end by the server's one-byte answer, prints
/// `{"event":"held"}` and keeps them open for `--hold-ms` (or until killed).
fn hold(o: &Opts, addr: SocketAddr) -> Result<Value, String> {
    let start = Instant::now();
    let mut held = Vec::with_capacity(o.conns);
    for i in 0..o.conns {
        let mut s = connect(addr).map_err(|e| format!("connection {i}: {e}"))?;
        s.write_all(b"H")
            .and_then(|()| {
                let mut b = [0u8; 1];
                s.read_exact(&mut b)
            })
            .map_err(|e| format!("connection {i}: {e}"))?;
        held.push(s);
    }
    emit(&json!({"event": "held", "conns": held.len(), "secs": start.elapsed().as_secs_f64()}));
    std::thread::sleep(o.hold);
    Ok(json!({"ok": true, "mode": "hold", "conns": held.len()}))
}

//! Child processes placed into a network namespace and a cgroup, with captured output.

use crate::sys;
use anyhow::{anyhow, bail, Context, Result};
use std::fs::{File, OpenOptions};
use std::io::{self, BufRead, BufReader, Read};
use std::os::fd::AsRawFd;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// Default grace period between SIGTERM and SIGKILL in [`Proc::kill`].
pub const KILL_GRACE: Duration = Duration::from_secs(5);

/// Set `MESH_TESTS_ECHO=1` to mirror every captured line of every child to the test's stderr.
const ECHO_ENV: &str = "MESH_TESTS_ECHO";

#[derive(Default)]
struct StreamState {
    lines: Vec<String>,
    eof: bool,
}

#[derive(Default)]
struct Stream {
    state: Mutex<StreamState>,
    cv: Condvar,
}

impl Stream {
    fn lines(&self) -> Vec<String> {
        self.state.lock().unwrap().lines.clone()
    }
}

/// Which captured stream to look at.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stdio2 {
    Stdout,
    Stderr,
}

/// A spawned child process. Its stdout and stderr are captured line by line by background
/// threads. Dropping a `Proc` SIGKILLs the child (by PID; the PID cannot be recycled while the
/// child is unreaped, and only `Proc` reaps it) and reaps it.
///
/// The child gets `PR_SET_PDEATHSIG(SIGKILL)`, which the kernel ties to the *thread* that spawned
/// it: spawn long-lived processes (agents, servers) from the test's own thread, not from a helper
/// thread that exits early, or the child is killed when that thread ends.
pub struct Proc {
    name: String,
    child: Child,
    status: Option<ExitStatus>,
    out: Arc<Stream>,
    err: Arc<Stream>,
    readers: Vec<JoinHandle<()>>,
}

impl std::fmt::Debug for Proc {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Proc")
            .field("name", &self.name)
            .field("pid", &self.child.id())
            .field("status", &self.status)
            .finish()
    }
}

fn reader_thread(
    name: String,
    tag: &'static str,
    src: impl Read + Send + 'static,
    stream: Arc<Stream>,
) -> JoinHandle<()> {
    let echo = std::env::var_os(ECHO_ENV).is_some_and(|v| v != "0" && !v.is_empty());
    std::thread::Builder::new()
        .name(format!("{name}-{tag}"))
        .spawn(move || {
            let mut r = BufReader::new(src);
            let mut buf = Vec::new();
            loop {
                buf.clear();
                match r.read_until(b'\n', &mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(_) => {
                        while matches!(buf.last(), Some(b'\n' | b'\r')) {
                            buf.pop();
                        }
                        let line = String::from_utf8_lossy(&buf).into_owned();
                        if echo {
                            eprintln!("[{name} {tag}] {line}");
                        }
                        stream.state.lock().unwrap().lines.push(line);
                        stream.cv.notify_all();
                    }
                }
            }
            stream.state.lock().unwrap().eof = true;
            stream.cv.notify_all();
        })
        .expect("spawning reader thread")
}

impl Proc {
    pub(crate) fn from_child(name: String, mut child: Child) -> Proc {
        let out = Arc::new(Stream::default());
        let err = Arc::new(Stream::default());
        let mut readers = Vec::new();
        match child.stdout.take() {
            Some(s) => readers.push(reader_thread(name.clone(), "out", s, out.clone())),
            None => out.state.lock().unwrap().eof = true,
        }
        match child.stderr.take() {
            Some(s) => readers.push(reader_thread(name.clone(), "err", s, err.clone())),
            None => err.state.lock().unwrap().eof = true,
        }
        Proc {
            name,
            child,
            status: None,
            out,
            err,
            readers,
        }
    }

    /// Spawns `cmd` with captured output and no namespace or cgroup change.
    pub fn spawn(mut cmd: Command) -> Result<Proc> {
        let name = command_name(&cmd);
        cmd.stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let parent = std::process::id() as libc::pid_t;
        // SAFETY: only async-signal-safe syscalls in the closure.
        unsafe {
            cmd.pre_exec(move || death_signal(parent));
        }
        let child = cmd.spawn().with_context(|| format!("spawning {name}"))?;
        Ok(Proc::from_child(name, child))
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// Sends a signal. Fails if the child has already been reaped.
    pub fn signal(&mut self, sig: i32) -> Result<()> {
        if self.try_wait()?.is_some() {
            bail!("{}: already exited ({:?})", self.name, self.status);
        }
        // SAFETY: the child is not reaped yet, so its PID is still ours.
        if unsafe { libc::kill(self.child.id() as libc::pid_t, sig) } != 0 {
            return Err(io::Error::last_os_error()).context("kill");
        }
        Ok(())
    }

    /// Non-blocking exit check (reaps the child if it exited).
    pub fn try_wait(&mut self) -> Result<Option<ExitStatus>> {
        if self.status.is_none() {
            self.status = self.child.try_wait()?;
        }
        Ok(self.status)
    }

    /// Waits up to `timeout` for exit. When the child exited, also waits (briefly) until its
    /// output has been read to EOF, so `stdout_lines()` is complete afterwards.
    pub fn wait_timeout(&mut self, timeout: Duration) -> Result<Option<ExitStatus>> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(st) = self.try_wait()? {
                self.wait_eof(Duration::from_secs(2));
                return Ok(Some(st));
            }
            if Instant::now() >= deadline {
                return Ok(None);
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// Waits for exit; fails (after killing the child) if it takes longer than `timeout`.
    pub fn wait_exit(&mut self, timeout: Duration) -> Result<ExitStatus> {
        match self.wait_timeout(timeout)? {
            Some(st) => Ok(st),
            None => {
                let _ = self.kill_with_grace(Duration::from_millis(200));
                bail!(
                    "{} did not exit within {:?}\n{}",
                    self.name,
                    timeout,
                    self.diagnostics()
                )
            }
        }
    }

    fn wait_eof(&self, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        for s in [&self.out, &self.err] {
            let mut st = s.state.lock().unwrap();
            while !st.eof {
                let left = deadline.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    break;
                }
                st = s.cv.wait_timeout(st, left).unwrap().0;
            }
        }
    }

    /// SIGTERM, then SIGKILL after [`KILL_GRACE`]; returns the exit status.
    pub fn kill(&mut self) -> Result<ExitStatus> {
        self.kill_with_grace(KILL_GRACE)
    }

    /// SIGTERM, then SIGKILL after `grace`; returns the exit status.
    pub fn kill_with_grace(&mut self, grace: Duration) -> Result<ExitStatus> {
        if let Some(st) = self.try_wait()? {
            return Ok(st);
        }
        let _ = self.signal(libc::SIGTERM);
        if let Some(st) = self.wait_timeout(grace)? {
            return Ok(st);
        }
        let _ = self.signal(libc::SIGKILL);
        let st = self.child.wait()?;
        self.status = Some(st);
        self.wait_eof(Duration::from_secs(1));
        Ok(st)
    }

    /// Snapshot of the stdout lines captured so far.
    pub fn stdout_lines(&self) -> Vec<String> {
        self.out.lines()
    }

    /// Snapshot of the stderr lines captured so far.
    pub fn stderr_lines(&self) -> Vec<String> {
        self.err.lines()
    }

    /// Waits until a stdout line (any captured so far, or a later one) satisfies `pred`.
    pub fn wait_for_line(&self, pred: impl Fn(&str) -> bool, timeout: Duration) -> Result<String> {
        self.wait_for_line_in(Stdio2::Stdout, 0, pred, timeout)
            .map(|(_, l)| l)
    }

    /// Waits until a stderr line satisfies `pred` (agents usually log to stderr).
    pub fn wait_for_stderr_line(
        &self,
        pred: impl Fn(&str) -> bool,
        timeout: Duration,
    ) -> Result<String> {
        self.wait_for_line_in(Stdio2::Stderr, 0, pred, timeout)
            .map(|(_, l)| l)
    }

    /// Waits until a line with index >= `start` of the chosen stream satisfies `pred`;
    /// returns its index and text. Fails early when the stream reached EOF without a match.
    pub fn wait_for_line_in(
        &self,
        which: Stdio2,
        start: usize,
        pred: impl Fn(&str) -> bool,
        timeout: Duration,
    ) -> Result<(usize, String)> {
        let stream = match which {
            Stdio2::Stdout => &self.out,
            Stdio2::Stderr => &self.err,
        };
        let deadline = Instant::now() + timeout;
        let mut next = start;
        let mut st = stream.state.lock().unwrap();
        loop {
            while next < st.lines.len() {
                if pred(&st.lines[next]) {
                    return Ok((next, st.lines[next].clone()));
                }
                next += 1;
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if st.eof || left.is_zero() {
                let why = if st.eof { "stream closed" } else { "timed out" };
                drop(st);
                return Err(anyhow!(
                    "{}: no matching {:?} line ({why} after {:?})\n{}",
                    self.name,
                    which,
                    timeout,
                    self.diagnostics()
                ));
            }
            st = stream.cv.wait_timeout(st, left).unwrap().0;
        }
    }

    /// Name, PID, exit status and the last 40 lines of stdout and stderr, for error messages.
    pub fn diagnostics(&self) -> String {
        let tail = |v: Vec<String>| {
            let skip = v.len().saturating_sub(40);
            v[skip..].join("\n    ")
        };
        format!(
            "--- {} (pid {}, status {:?})\n  stdout:\n    {}\n  stderr:\n    {}",
            self.name,
            self.child.id(),
            self.status,
            tail(self.stdout_lines()),
            tail(self.stderr_lines())
        )
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if self.status.is_none() {
            if let Ok(Some(st)) = self.child.try_wait() {
                self.status = Some(st);
            } else {
                // SAFETY: unreaped child: the PID is still ours.
                unsafe {
                    libc::kill(self.child.id() as libc::pid_t, libc::SIGKILL);
                }
                self.status = self.child.wait().ok();
            }
        }
        // Reader threads finish at EOF; they are not joined (a grandchild could hold the pipe).
        self.readers.clear();
    }
}

pub(crate) fn command_name(cmd: &Command) -> String {
    let prog = Path::new(cmd.get_program())
        .file_name()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_else(|| "proc".into());
    match cmd.get_args().next() {
        Some(a) if !a.to_string_lossy().starts_with('-') => {
            format!("{prog} {}", a.to_string_lossy())
        }
        _ => prog,
    }
}

/// In the forked child: die with the parent, and detect a parent that already died.
fn death_signal(parent: libc::pid_t) -> io::Result<()> {
    // SAFETY: async-signal-safe syscalls only.
    unsafe {
        if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL, 0, 0, 0) != 0 {
            return Err(io::Error::last_os_error());
        }
        if libc::getppid() != parent {
            libc::_exit(127);
        }
    }
    Ok(())
}

/// Where a child goes: a network namespace and optionally a cgroup. The files are opened before
/// the fork; the forked child only does `write(cgroup.procs, "0")` and `setns`.
pub(crate) struct Placement {
    netns: File,
    cgroup_procs: Option<File>,
    owner: String,
}

impl Placement {
    pub(crate) fn new(netns_path: &Path, cgroup: Option<&Path>, owner: &str) -> Result<Placement> {
        let netns = File::open(netns_path)
            .with_context(|| format!("opening netns {}", netns_path.display()))?;
        let cgroup_procs = match cgroup {
            Some(cg) => {
                let p = cg.join("cgroup.procs");
                Some(
                    OpenOptions::new()
                        .write(true)
                        .open(&p)
                        .with_context(|| format!("opening {}", p.display()))?,
                )
            }
            None => None,
        };
        Ok(Placement {
            netns,
            cgroup_procs,
            owner: owner.to_owned(),
        })
    }

    /// Installs the pre-exec hook. `self` must outlive the `spawn()` of `cmd`.
    fn apply(&self, cmd: &mut Command) {
        let netns_fd = self.netns.as_raw_fd();
        let cg_fd = self.cgroup_procs.as_ref().map_or(-1, |f| f.as_raw_fd());
        let parent = std::process::id() as libc::pid_t;
        cmd.env(sys::OWNER_ENV, &self.owner);
        // SAFETY: the closure only makes async-signal-safe syscalls; the fds stay open until after
        // spawn() returns because `self` is borrowed by the caller across the spawn.
        unsafe {
            cmd.pre_exec(move || {
                death_signal(parent)?;
                if cg_fd >= 0 && libc::write(cg_fd, b"0".as_ptr().cast(), 1) != 1 {
                    return Err(io::Error::last_os_error());
                }
                if libc::setns(netns_fd, libc::CLONE_NEWNET) != 0 {
                    return Err(io::Error::last_os_error());
                }
                Ok(())
            });
        }
    }

    pub(crate) fn spawn(&self, mut cmd: Command) -> Result<Proc> {
        let name = command_name(&cmd);
        cmd.stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        self.apply(&mut cmd);
        let child = cmd.spawn().with_context(|| format!("spawning {name}"))?;
        Ok(Proc::from_child(name, child))
    }

    /// Runs to completion with raw output capture; kills the child after `timeout`.
    pub(crate) fn run(&self, mut cmd: Command, timeout: Duration) -> Result<Output> {
        let name = command_name(&cmd);
        cmd.stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        self.apply(&mut cmd);
        let mut child = cmd.spawn().with_context(|| format!("spawning {name}"))?;
        let collect = |r: Option<Box<dyn Read + Send>>| {
            std::thread::spawn(move || {
                let mut v = Vec::new();
                if let Some(mut r) = r {
                    let _ = r.read_to_end(&mut v);
                }
                v
            })
        };
        let out = collect(
            child
                .stdout
                .take()
                .map(|s| Box::new(s) as Box<dyn Read + Send>),
        );
        let err = collect(
            child
                .stderr
                .take()
                .map(|s| Box::new(s) as Box<dyn Read + Send>),
        );
        let deadline = Instant::now() + timeout;
        let status = loop {
            if let Some(st) = child.try_wait()? {
                break st;
            }
            if Instant::now() >= deadline {
                let _ = child.kill();
                let _ = child.wait();
                bail!("{name} did not finish within {timeout:?}");
            }
            std::thread::sleep(Duration::from_millis(2));
        };
        Ok(Output {
            status,
            stdout: out.join().unwrap_or_default(),
            stderr: err.join().unwrap_or_default(),
        })
    }
}

/// Spawns `cmd` into a network namespace and (optionally) a cgroup, marking it with the owner
/// prefix so `Topology::leftovers` / `sweep_stale` recognise it. Usually you want
/// `Topology::spawn_in_pod` / `spawn_in_node` instead.
pub fn spawn_placed(
    cmd: Command,
    netns_path: &Path,
    cgroup: Option<&Path>,
    owner: &str,
) -> Result<Proc> {
    Placement::new(netns_path, cgroup, owner)?.spawn(cmd)
}

//! The topology itself, with no agent: pods reach each other across and within nodes, the
//! server sees the client pod's address, and teardown (normal, on panic, or by sweeping a dead
//! owner's leftovers) leaves nothing behind. Needs root.

use anyhow::{Context, Result};
use mesh_tests::topology::{Proc, Topology};
use mesh_tests::{http_get, sweep_stale, sys, testapp_bin};
use serde_json::Value;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

const T: Duration = Duration::from_secs(10);

fn testapp(args: &[&str]) -> Command {
    let mut c = Command::new(testapp_bin());
    c.args(args);
    c
}

fn json(line: &str) -> Value {
    serde_json::from_str(line).unwrap_or_else(|e| panic!("not JSON ({e}): {line}"))
}

fn start_echo(topo: &Topology, pod: &str) -> Result<Proc> {
    let p = topo.spawn_in_pod(
        pod,
        testapp(&[
            "echo-server",
            "--listen",
            "0.0.0.0:7000",
            "--listen",
            "[::]:7000",
        ]),
    )?;
    p.wait_for_line(|l| l.contains("\"listening\""), T)?;
    Ok(p)
}

/// Runs a client in `from` against `addr` and checks the summary and the server's accept line.
fn check_echo(topo: &Topology, from: &str, server: &Proc, addr: &str, conns: &str, bytes: &str) {
    let seen_before = server.stdout_lines().len();
    let out = topo
        .run_in_pod(
            from,
            &[
                testapp_bin().to_str().unwrap(),
                "client",
                "--connect",
                addr,
                "--conns",
                conns,
                "--bytes",
                bytes,
                "--timeout-ms",
                "10000",
            ],
        )
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let summary = json(stdout.lines().last().unwrap_or_default());
    assert!(
        out.status.success() && summary["ok"] == true,
        "client {from} -> {addr} failed: {stdout} {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(summary["conns"], conns.parse::<u64>().unwrap());
    assert_eq!(summary["bytes"], bytes.parse::<u64>().unwrap());

    let client = topo.pod(from);
    let want_ip = if addr.starts_with('[') {
        client.ip6.to_string()
    } else {
        client.ip4.to_string()
    };
    // The client's own view: it connected from its pod address to the address it dialed.
    let local = summary["local"].as_str().unwrap();
    assert!(
        local.starts_with(&want_ip) || local.starts_with(&format!("[{want_ip}]")),
        "client local {local}, want {want_ip}"
    );
    assert_eq!(summary["peer"].as_str().unwrap(), addr);
    // The server's view: the peer is the client pod.
    let (_, line) = server
        .wait_for_line_in(
            mesh_tests::topology::Stdio2::Stdout,
            seen_before,
            |l| l.contains("\"accept\""),
            T,
        )
        .unwrap();
    let peer = json(&line)["peer"].as_str().unwrap().to_owned();
    let peer_ip: std::net::SocketAddr = peer.parse().unwrap();
    assert_eq!(peer_ip.ip().to_string(), want_ip, "server saw {peer}");
}

#[test]
fn pods_talk_and_teardown_is_clean() {
    let prefix;
    {
        let topo = Topology::new(&[("node1", &["a", "b"]), ("node2", &["c"])]).unwrap();
        prefix = topo.prefix().to_owned();
        eprintln!("topology {prefix}");

        // Layout.
        let n1 = topo.node("node1");
        let n2 = topo.node("node2");
        assert_eq!(n1.ip4.to_string(), "192.168.200.1");
        assert_eq!(n2.ip6.to_string(), "fd00:200::2");
        assert_eq!(topo.pod("a").ip4.to_string(), "10.20.1.2");
        assert_eq!(topo.pod("b").ip4.to_string(), "10.20.1.3");
        assert_eq!(topo.pod("c").ip6.to_string(), "fd00:20:2::2");
        assert_eq!(topo.pods().count(), 3);
        assert!(topo
            .pod("c")
            .cgroup
            .ends_with(format!("{prefix}/node2/pods/c")));
        assert!(n1.agent_cgroup.is_dir() && n1.cgroup_root.join("pods/a").is_dir());
        assert!(!n1.pin_dir.exists() && n1.pin_dir.parent() == Some(topo.bpffs()));
        let ip_forward = topo
            .in_node_netns("node1", || {
                Ok(std::fs::read_to_string("/proc/sys/net/ipv4/ip_forward")?)
            })
            .unwrap();
        assert_eq!(ip_forward.trim(), "1");

        // A node process runs in the agent cgroup and the node netns, and still sees the host's
        // cgroup2 and the private bpffs (no /sys remount).
        let out = topo
            .run_in_node(
                "node1",
                &[
                    "sh",
                    "-c",
                    "cat /proc/self/cgroup; readlink /proc/self/ns/net; grep ' bpf ' /proc/mounts",
                ],
            )
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(out.status.success(), "{text}");
        assert!(
            text.contains(&format!("0::/{prefix}/node1/agent")),
            "{text}"
        );
        let node_ino = sys::ns_inode(&n1.netns_path).unwrap();
        assert!(text.contains(&format!("net:[{node_ino}]")), "{text}");
        assert!(
            text.contains(topo.bpffs().to_str().unwrap()),
            "bpffs not visible: {text}"
        );
        assert!(topo.cgroup2_mount().join(&prefix).is_dir());

        // Servers in c (other node) and b (same node).
        let server_c = start_echo(&topo, "c").unwrap();
        let server_b = start_echo(&topo, "b").unwrap();
        let c = topo.pod("c").clone();
        let b = topo.pod("b").clone();
        let in_cgroup = std::fs::read_to_string(c.cgroup.join("cgroup.procs")).unwrap();
        assert!(
            in_cgroup
                .lines()
                .any(|l| l.trim() == server_c.pid().to_string()),
            "server not in pod cgroup: {in_cgroup}"
        );

        check_echo(
            &topo,
            "a",
            &server_c,
            &format!("{}:7000", c.ip4),
            "4",
            "200000",
        );
        check_echo(
            &topo,
            "a",
            &server_c,
            &format!("[{}]:7000", c.ip6),
            "2",
            "100000",
        );
        check_echo(
            &topo,
            "a",
            &server_b,
            &format!("{}:7000", b.ip4),
            "3",
            "50000",
        );
        check_echo(
            &topo,
            "a",
            &server_b,
            &format!("[{}]:7000", b.ip6),
            "1",
            "0",
        );
        // Node to pod across the fabric.
        let out = topo
            .run_in_node(
                "node1",
                &[
                    testapp_bin().to_str().unwrap(),
                    "client",
                    "--connect",
                    &format!("{}:7000", c.ip4),
                ],
            )
            .unwrap();
        assert!(out.status.success(), "{:?}", out);

        // Soak: a long-lived connection plus a stream of new ones.
        let out = topo
            .run_in_pod(
                "a",
                &[
                    testapp_bin().to_str().unwrap(),
                    "soak",
                    "--connect",
                    &format!("[{}]:7000", c.ip6),
                    "--duration-ms",
                    "500",
                    "--interval-ms",
                    "50",
                ],
            )
            .unwrap();
        // The summary is the last line (event lines come before it). How many round trips fit
        // in 500 ms depends on the machine's load: at least one of each, all without error.
        let stdout = String::from_utf8_lossy(&out.stdout);
        let soak = json(stdout.lines().last().unwrap_or_default());
        assert!(out.status.success() && soak["ok"] == true, "{soak}");
        assert!(
            soak["long_lived_roundtrips"].as_u64().unwrap() >= 1,
            "{soak}"
        );
        assert!(soak["new_conns_ok"].as_u64().unwrap() >= 1, "{soak}");
        assert_eq!(soak["long_lived_connections"], 1, "{soak}");

        // http_get reaches a node-local (127.0.0.1) server from inside the node netns only.
        std::fs::write(topo.work_dir().join("metrics"), "up 1\n").unwrap();
        let mut http = Command::new("python3");
        http.args(["-u", "-m", "http.server", "15020", "--bind", "127.0.0.1"])
            .current_dir(topo.work_dir());
        let http = topo.spawn_in_node("node1", http).unwrap();
        http.wait_for_line(|l| l.contains("Serving HTTP"), T)
            .unwrap();
        let (code, body) = http_get(&topo, "node1", "127.0.0.1:15020", "/metrics").unwrap();
        assert_eq!((code, body.as_str()), (200, "up 1\n"));
        let (code, _) = http_get(&topo, "node1", "127.0.0.1:15020", "/nope").unwrap();
        assert_eq!(code, 404);
        assert!(http_get(&topo, "node2", "127.0.0.1:15020", "/metrics").is_err());

        // Servers keep running; the topology must kill them on drop.
        assert!(sys::pid_alive(server_c.pid() as i32));
        drop(topo);
        assert!(
            !sys::pid_alive(server_c.pid() as i32),
            "server survived teardown"
        );
        drop((server_b, server_c, http));
    }
    let left = Topology::leftovers(&prefix);
    assert!(left.is_empty(), "leftovers: {left:?}");
}

#[test]
fn panic_while_alive_leaves_nothing() {
    let prefix = std::sync::Mutex::new(String::new());
    let orphan = std::sync::Mutex::new(None::<Proc>);
    let r = std::panic::catch_unwind(|| {
        let topo = Topology::new(&[("n1", &["p1"]), ("n2", &["p2"])]).unwrap();
        *prefix.lock().unwrap() = topo.prefix().to_owned();
        let _server = start_echo(&topo, "p2").unwrap();
        // A process that would outlive its Proc if teardown forgot it.
        let mut sleeper = Command::new("sleep");
        sleeper.arg("300");
        // Kept outside the closure, so only the topology's own teardown can kill it.
        *orphan.lock().unwrap() = Some(topo.spawn_in_node("n1", sleeper).unwrap());
        assert!(!Topology::leftovers(topo.prefix()).is_empty());
        panic!("deliberate panic with a live topology");
    });
    assert!(r.is_err());
    let prefix = prefix.into_inner().unwrap();
    assert!(!prefix.is_empty());
    let left = Topology::leftovers(&prefix);
    assert!(left.is_empty(), "leftovers after panic: {left:?}");
    let mut orphan = orphan.into_inner().unwrap().expect("sleeper was spawned");
    let status = orphan.wait_timeout(Duration::ZERO).unwrap();
    assert!(status.is_some(), "sleeper survived the teardown");
}

#[test]
fn failed_build_leaves_nothing() {
    // The second "p" fails after the fabric, the node and the first pod exist.
    let err = Topology::new(&[("n1", &["p", "p"])]).unwrap_err();
    let msg = format!("{err:#}");
    assert!(msg.contains("pod p exists"), "{msg}");
    let prefix = msg
        .split_whitespace()
        .find(|w| w.starts_with("mt"))
        .map(|w| w.trim_end_matches(':'))
        .unwrap_or_else(|| panic!("no prefix in {msg}"));
    assert!(
        mesh_tests::topology::parse_prefix(prefix).is_some(),
        "{msg}"
    );
    let left = Topology::leftovers(prefix);
    assert!(left.is_empty(), "leftovers of a failed build: {left:?}");
}

#[test]
fn add_and_remove_pods() {
    let mut topo = Topology::new(&[("n1", &[]), ("n2", &["srv"])]).unwrap();
    for i in 0..10 {
        topo.add_pod("n1", &format!("x{i}")).unwrap();
    }
    assert_eq!(topo.pods_on("n1").count(), 10);
    let server = start_echo(&topo, "srv").unwrap();
    let addr = format!("{}:7000", topo.pod("srv").ip4);
    check_echo(&topo, "x9", &server, &addr, "1", "1000");
    let x9 = topo.pod("x9").clone();
    topo.remove_pod("x9").unwrap();
    assert!(!x9.netns_path.exists() && !x9.cgroup.exists());
    check_echo(&topo, "x0", &server, &addr, "1", "1000");
}

#[test]
fn sweep_removes_dead_owners_leftovers() {
    // PIDs above pid_max cannot exist, so this owner is certainly dead.
    let pid_max: u32 = std::fs::read_to_string("/proc/sys/kernel/pid_max")
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    let prefix = format!("mt{}x{}", pid_max + 1 + std::process::id() % 1000, 7);
    let cg2 = sys::cgroup2_mount().unwrap();
    let cg = cg2.join(&prefix).join("node1").join("pods").join("p");
    let tmp = Path::new("/tmp").join(&prefix);
    let bpffs = tmp.join("bpffs");
    let netns = format!("{prefix}-n-node1");

    let setup = || -> Result<Proc> {
        std::fs::create_dir_all(&cg)?;
        std::fs::create_dir_all(&bpffs)?;
        sys::mount_bpffs(&bpffs)?;
        let ns_path = sys::netns_add(&netns)?;
        // A process left behind in the stale cgroup and netns.
        let mut sleeper = Command::new("sleep");
        sleeper.arg("300");
        mesh_tests::process::spawn_placed(sleeper, &ns_path, Some(&cg), &prefix)
            .context("spawning sleeper")
    };
    let guard = mesh_tests::topology::hold_sweeps();
    let sleeper = match setup() {
        Ok(p) => p,
        Err(e) => {
            mesh_tests::topology::cleanup_prefix(&prefix);
            panic!("setup: {e:#}");
        }
    };
    let before = Topology::leftovers(&prefix);
    for what in ["netns", "cgroup", "mount", "dir", "process"] {
        assert!(
            before.iter().any(|l| l.starts_with(what)),
            "{what} missing from {before:?}"
        );
    }
    drop(guard);
    let swept = sweep_stale();
    // Another test's Topology::new may have swept it first; either way it must be gone.
    let left = Topology::leftovers(&prefix);
    assert!(left.is_empty(), "left after sweep ({swept:?}): {left:?}");
    assert!(!sys::pid_alive(sleeper.pid() as i32));
    drop(sleeper);
}

/// Helper for `killed_owner_is_swept`: run only in a re-executed copy of this test binary.
#[test]
#[ignore = "helper: run by killed_owner_is_swept in a child process"]
fn hold_topology_until_killed() {
    if std::env::var_os("MESH_TESTS_HOLD").is_none() {
        return;
    }
    let topo = Topology::new(&[("n1", &["p1"])]).unwrap();
    let _server = start_echo(&topo, "p1").unwrap();
    println!("HOLDING {}", topo.prefix());
    std::thread::sleep(Duration::from_secs(60));
}

#[test]
fn killed_owner_is_swept() {
    // A copy of this test binary builds a topology with a server in a pod, then is SIGKILLed,
    // so no Drop runs: PDEATHSIG must kill its children and sweep_stale() the rest.
    let mut cmd = Command::new(std::env::current_exe().unwrap());
    cmd.args([
        "--exact",
        "hold_topology_until_killed",
        "--ignored",
        "--nocapture",
        "--test-threads",
        "1",
    ])
    .env("MESH_TESTS_HOLD", "1");
    let mut holder = Proc::spawn(cmd).unwrap();
    let line = holder
        .wait_for_line(|l| l.contains("HOLDING "), Duration::from_secs(60))
        .unwrap();
    let prefix = line.rsplit(' ').next().unwrap().to_owned();
    let before = Topology::leftovers(&prefix);
    assert!(
        before.iter().any(|l| l.starts_with("process")),
        "expected the pod's server among {before:?}"
    );
    holder.signal(libc::SIGKILL).unwrap();
    holder.wait_exit(Duration::from_secs(10)).unwrap();
    // PDEATHSIG: the server dies with its parent (a bound for a loaded machine, not a target).
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while Topology::leftovers(&prefix)
        .iter()
        .any(|l| l.starts_with("process"))
    {
        assert!(
            std::time::Instant::now() < deadline,
            "children survived their parent: {:?}",
            Topology::leftovers(&prefix)
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(!Topology::leftovers(&prefix).is_empty());
    sweep_stale();
    let left = Topology::leftovers(&prefix);
    assert!(left.is_empty(), "left after sweep: {left:?}");
}

/// Scale smoke test: `cargo test -p mesh-tests --test topology -- --ignored many_pods`.
#[test]
#[ignore = "slow: scale smoke test"]
fn many_pods() {
    let started = std::time::Instant::now();
    let mut topo = Topology::new(&[("n1", &[]), ("n2", &["srv"])]).unwrap();
    for i in 0..100 {
        topo.add_pod(if i % 2 == 0 { "n1" } else { "n2" }, &format!("s{i}"))
            .unwrap();
    }
    eprintln!("101 pods on 2 nodes in {:?}", started.elapsed());
    let server = start_echo(&topo, "srv").unwrap();
    let addr = format!("{}:7000", topo.pod("srv").ip4);
    for from in ["s0", "s51", "s98"] {
        check_echo(&topo, from, &server, &addr, "2", "10000");
    }
    let prefix = topo.prefix().to_owned();
    let t = std::time::Instant::now();
    drop(topo);
    eprintln!("teardown in {:?}", t.elapsed());
    assert!(Topology::leftovers(&prefix).is_empty());
}

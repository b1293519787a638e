//! [`install`] and [`remove`] in a private network namespace (root), checked with `ip rule`,
//! `ip route` and `sysctl` from outside the agent's code.
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};

use super::*;
use crate::net::Netns;
use crate::test_support::sh;

static NEXT: AtomicUsize = AtomicUsize::new(0);

/// A network namespace made by `ip netns add` with `lo` up (as in a pod); deleted on drop, also
/// when the test panics.
struct TestNetns {
    name: String,
}

impl TestNetns {
    fn new() -> TestNetns {
        assert!(
            nix::unistd::geteuid().is_root(),
            "the routing tests create network namespaces: run them as root (cargo xtask test)"
        );
        let name = format!(
            "mroute-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        );
        sh(&format!("ip netns add {name}"));
        let netns = TestNetns { name };
        sh(&format!("ip -n {} link set lo up", netns.name));
        netns
    }

    fn path(&self) -> PathBuf {
        Path::new(crate::inpod::DEFAULT_NETNS_DIR).join(&self.name)
    }

    /// The trimmed lines `ip -n <name> <args>` prints.
    fn ip(&self, args: &[&str]) -> Vec<String> {
        let out = Command::new("ip")
            .args(["-n", &self.name])
            .args(args)
            .output()
            .expect("run ip");
        assert!(
            out.status.success(),
            "ip {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .map(|l| l.trim_end().to_string())
            .filter(|l| !l.is_empty())
            .collect()
    }

    fn sysctl(&self, name: &str) -> String {
        let out = Command::new("ip")
            .args(["netns", "exec", &self.name, "sysctl", "-n", name])
            .output()
            .expect("run sysctl");
        assert!(out.status.success(), "sysctl {name}");
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    }
}

impl Drop for TestNetns {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .stderr(Stdio::null())
            .status();
    }
}

const SYSCTL_NAMES: [&str; 3] = [
    "net.ipv4.tcp_fwmark_accept",
    "net.ipv4.fwmark_reflect",
    "net.ipv6.fwmark_reflect",
];

fn rules(ns: &TestNetns) -> (Vec<String>, Vec<String>) {
    (ns.ip(&["-4", "rule"]), ns.ip(&["-6", "rule"]))
}

fn routes(ns: &TestNetns) -> (Vec<String>, Vec<String>) {
    let table = INBOUND_ROUTE_TABLE.to_string();
    (
        ns.ip(&["-4", "route", "show", "table", &table]),
        ns.ip(&["-6", "route", "show", "table", &table]),
    )
}

fn lines(text: &[&str]) -> Vec<String> {
    text.iter().map(|l| l.to_string()).collect()
}

#[test]
fn install_and_remove_are_idempotent_and_exact() {
    let ns = TestNetns::new();
    let netns = Netns::open(&ns.path()).expect("open the test namespace");
    let sysctl_dir = Path::new("/proc/sys");
    let host_accept = std::fs::read_to_string("/proc/sys/net/ipv4/tcp_fwmark_accept").unwrap();
    let before = rules(&ns);

    for _ in 0..2 {
        netns.run(|| install(sysctl_dir)).expect("install");
    }
    let mark = format!("fwmark {INBOUND_MARK:#x}/{MARK_RULE_MASK:#x} lookup {INBOUND_ROUTE_TABLE}");
    assert_eq!(
        rules(&ns),
        (
            lines(&[
                &format!("{MARK_RULE_PRIORITY}:\tfrom all {mark}"),
                &format!("{LOCAL_RULE_PRIORITY}:\tfrom all lookup local"),
                "32766:\tfrom all lookup main",
                "32767:\tfrom all lookup default",
            ]),
            lines(&[
                &format!("{MARK_RULE_PRIORITY}:\tfrom all {mark}"),
                &format!("{LOCAL_RULE_PRIORITY}:\tfrom all lookup local"),
                "32766:\tfrom all lookup main",
            ]),
        )
    );
    assert_eq!(
        routes(&ns),
        (
            lines(&["local default dev lo proto static scope host"]),
            lines(&["local default dev lo proto static metric 1024 pref medium"]),
        )
    );
    for name in SYSCTL_NAMES {
        assert_eq!(ns.sysctl(name), "1", "{name} inside the namespace");
    }
    assert_eq!(
        std::fs::read_to_string("/proc/sys/net/ipv4/tcp_fwmark_accept").unwrap(),
        host_accept,
        "the test's own namespace is left alone"
    );

    for _ in 0..2 {
        netns.run(|| remove(sysctl_dir)).expect("remove");
    }
    assert_eq!(rules(&ns), before, "the rules a new namespace starts with");
    assert_eq!(routes(&ns), (vec![], vec![]));
    for name in SYSCTL_NAMES {
        assert_eq!(ns.sysctl(name), "0", "{name} inside the namespace");
    }
}

#[test]
fn a_refused_request_names_what_failed() {
    let ns = TestNetns::new();
    let netns = Netns::open(&ns.path()).expect("open the test namespace");
    let (err, then) = netns
        .run(|| {
            let mut nl = Rtnl::open()?;
            // No interface has this index.
            let err = nl
                .add(
                    RouteNetlinkMessage::NewRoute(local_route(AddressFamily::Inet, 999_999)),
                    "adding the inbound local route (IPv4)",
                )
                .unwrap_err();
            // The socket stays usable: the next request gets its own answer.
            let then = nl.add(
                RouteNetlinkMessage::NewRule(mark_rule(AddressFamily::Inet)),
                "adding the inbound mark rule (IPv4)",
            );
            Ok((err, then))
        })
        .unwrap();
    assert_eq!(
        err.to_string(),
        "adding the inbound local route (IPv4) in the pod: No such device"
    );
    assert_eq!(err.raw_os_error(), None);
    then.expect("a request after a refused one");
    assert_eq!(ns.ip(&["-4", "rule", "show", "pref", "50"]).len(), 1);
}

#[test]
fn failures_keep_their_kind() {
    let e = failed(
        "adding the inbound mark rule (IPv4)",
        io::Error::from_raw_os_error(libc::EEXIST),
    );
    assert_eq!(
        e.to_string(),
        "adding the inbound mark rule (IPv4) in the pod: File exists"
    );
    assert_eq!(e.kind(), io::ErrorKind::AlreadyExists);
}

//! End-to-end test support for the mesh.
//!
//! * [`apiserver`]: an in-process stand-in for the Kubernetes API server (list/watch, faults).
//! * [`topology`]: a Kubernetes-like cluster of network namespaces (fabric, nodes, pods) with a
//!   private cgroup v2 subtree and a private bpffs; everything is removed on drop.
//! * [`watch_tap`]: a client-side layer telling when a kube client consumed a watch bookmark.
//! * [`istio_ca`]: a stand-in for istiod's certificate service (for a real ztunnel), signing with
//!   the mesh CA.
//! * [`Proc`]: child processes with captured output that die with the test.
//! * [`testapp_bin`] / [`agent_bin`]: where the `mesh-testapp` and `mesh-agent` binaries are.
//!
//! Needs root (network namespaces, cgroups, mounts). Run the topology tests with
//! `cargo test -p mesh-tests` (cargo builds `mesh-testapp` for this package's own integration
//! tests; other packages' tests need `cargo build -p mesh-tests --bins` first). Set
//! `MESH_TESTS_ECHO=1` to mirror every child's output to stderr.

pub mod agent;
pub mod apiserver;
pub mod apps;
pub mod bench;
pub mod istio_ca;
pub mod process;
pub mod sys;
pub mod tool;
pub mod topology;
pub mod watch_tap;

pub use process::Proc;
pub use topology::{http_get, sweep_stale, Node, Pod, Topology};

use std::path::PathBuf;

/// Path of the `mesh-testapp` binary: `$MESH_TESTAPP_BIN`, else next to the running test's
/// target dir (`target/<profile>/mesh-testapp`). Panics with build instructions when missing.
pub fn testapp_bin() -> PathBuf {
    sibling_bin(
        "MESH_TESTAPP_BIN",
        "mesh-testapp",
        "cargo build -p mesh-tests --bins",
    )
}

/// Path of the `mesh-agent` binary: `$MESH_AGENT_BIN`, else `target/<profile>/mesh-agent`.
/// Panics with build instructions when missing.
pub fn agent_bin() -> PathBuf {
    sibling_bin(
        "MESH_AGENT_BIN",
        "mesh-agent",
        "cargo build -p mesh-agent --bins",
    )
}

fn sibling_bin(env: &str, name: &str, build: &str) -> PathBuf {
    if let Some(p) = std::env::var_os(env).filter(|p| !p.is_empty()) {
        let p = PathBuf::from(p);
        assert!(
            p.is_file(),
            "{env}={} does not name a file; build it with `{build}`",
            p.display()
        );
        return p;
    }
    let exe = std::env::current_exe().expect("current_exe");
    let mut dir = exe.parent().expect("exe has a parent").to_path_buf();
    if dir.file_name().is_some_and(|n| n == "deps") {
        dir.pop();
    }
    let p = dir.join(name);
    assert!(
        p.is_file(),
        "{name} not found at {}: build it with `{build}` (same profile and CARGO_TARGET_DIR as \
         the tests), or set {env} to its path",
        p.display()
    );
    p
}

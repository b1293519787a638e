//! The scenarios: which pod talks to which, on which node, enrolled or not.
//!
//! Every scenario runs on the same topology (node1 and node2, an agent on each, the same
//! `mesh-bench` client and server binaries, the same payloads). Adding one is a row here: name its
//! client and server pods (a pod name may be shared with other scenarios; the same name must
//! always mean the same node and enrollment). The HTTP rows (`direct`, `mesh`, `mesh-waypoint`)
//! are a table of their own in `super::http`, on the same pods.

/// A pod of a scenario.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PodSpec {
    pub name: &'static str,
    pub node: &'static str,
    /// Enrolled (namespace labelled `istio.io/dataplane-mode: ambient`) or not.
    pub mesh: bool,
}

const fn pod(name: &'static str, node: &'static str, mesh: bool) -> PodSpec {
    PodSpec { name, node, mesh }
}

#[derive(Debug, Clone, Copy)]
pub struct Scenario {
    pub name: &'static str,
    pub about: &'static str,
    pub client: PodSpec,
    pub server: PodSpec,
    /// Run when no `--scenario` is given.
    pub default: bool,
}

/// The baseline every ratio is computed against.
pub const BASELINE: &str = "direct";

/// Plain client and servers (never enrolled).
pub const PLAIN_CLIENT: PodSpec = pod("pc", "node1", false);
const PLAIN_SERVER_SAME: PodSpec = pod("ps1", "node1", false);
pub const PLAIN_SERVER_CROSS: PodSpec = pod("ps2", "node2", false);
/// Enrolled client and servers.
pub const MESH_CLIENT: PodSpec = pod("mc", "node1", true);
const MESH_SERVER_SAME: PodSpec = pod("ms1", "node1", true);
pub const MESH_SERVER_CROSS: PodSpec = pod("ms2", "node2", true);
/// The waypoint's own pod (enrolled namespace; the waypoint proxy runs in it, nothing else).
pub const WAYPOINT_POD: PodSpec = pod("wp", "node1", true);

pub const SCENARIOS: &[Scenario] = &[
    Scenario {
        name: "direct",
        about: "no mesh: client on node1, server on node2, neither enrolled (plain TCP over the fabric)",
        client: PLAIN_CLIENT,
        server: PLAIN_SERVER_CROSS,
        default: true,
    },
    Scenario {
        name: "direct-same-node",
        about: "no mesh: client and server on node1, neither enrolled",
        client: PLAIN_CLIENT,
        server: PLAIN_SERVER_SAME,
        default: true,
    },
    Scenario {
        name: "mesh-same-node",
        about: "HBONE (mTLS + HTTP/2 CONNECT) through node1's agent: client and server both on node1",
        client: MESH_CLIENT,
        server: MESH_SERVER_SAME,
        default: true,
    },
    Scenario {
        name: "mesh-cross-node",
        about: "HBONE between node1's agent (outbound) and node2's agent (inbound)",
        client: MESH_CLIENT,
        server: MESH_SERVER_CROSS,
        default: true,
    },
    Scenario {
        name: "mesh-plain-egress",
        about: "enrolled client to a pod outside the mesh: node1's outbound proxy relays plain TCP \
                (no TLS, no HTTP/2); isolates the capture + relay cost",
        client: MESH_CLIENT,
        server: PLAIN_SERVER_CROSS,
        default: false,
    },
];

/// The scenarios named by `--scenario` (in table order, baseline always included), or the
/// defaults. `all` selects every row.
pub fn select(names: &[String]) -> anyhow::Result<Vec<Scenario>> {
    if names.is_empty() {
        return Ok(SCENARIOS.iter().filter(|s| s.default).copied().collect());
    }
    for n in names {
        if n != "all" && !SCENARIOS.iter().any(|s| s.name == n) {
            anyhow::bail!(
                "unknown scenario {n:?}; known: {}, all",
                SCENARIOS
                    .iter()
                    .map(|s| s.name)
                    .collect::<Vec<_>>()
                    .join(", ")
            );
        }
    }
    let all = names.iter().any(|n| n == "all");
    Ok(SCENARIOS
        .iter()
        .filter(|s| all || s.name == BASELINE || names.iter().any(|n| n == s.name))
        .copied()
        .collect())
}

/// Every pod the scenarios use, once each.
pub fn pods(scenarios: &[Scenario]) -> anyhow::Result<Vec<PodSpec>> {
    let mut out: Vec<PodSpec> = Vec::new();
    add_pods(
        &mut out,
        scenarios.iter().flat_map(|s| [s.client, s.server]),
    )?;
    Ok(out)
}

/// Adds the pods of `more` that `out` lacks; a name already there must mean the same pod.
pub fn add_pods(
    out: &mut Vec<PodSpec>,
    more: impl IntoIterator<Item = PodSpec>,
) -> anyhow::Result<()> {
    for p in more {
        match out.iter().find(|q| q.name == p.name) {
            Some(q) if *q != p => anyhow::bail!("pod {} is declared twice differently", p.name),
            Some(_) => {}
            None => out.push(p),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_is_consistent() {
        let all = select(&["all".into()]).unwrap();
        assert_eq!(all.len(), SCENARIOS.len());
        pods(&all).unwrap();
        assert!(SCENARIOS.iter().any(|s| s.name == BASELINE));
        let picked = select(&["mesh-cross-node".into()]).unwrap();
        let names: Vec<_> = picked.iter().map(|s| s.name).collect();
        assert_eq!(
            names,
            ["direct", "mesh-cross-node"],
            "the baseline always runs"
        );
        assert!(select(&["nope".into()]).is_err());
    }
}

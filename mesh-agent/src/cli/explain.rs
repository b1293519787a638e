//! `mesh-agent explain`: the decision and the deciding rule for one connection, from the config
//! file alone (no agent, no traffic), exactly as the destination's proxy would decide it.
use std::net::IpAddr;
use std::sync::Arc;

use anyhow::{bail, Context};

use super::ExplainArgs;
use crate::identity::Identity;
use crate::model::Workload;
use crate::policy::Request;
use crate::state::State;

/// Returns the explanation text.
pub fn explain(args: &ExplainArgs) -> anyhow::Result<String> {
    let config = crate::config::load(&args.config)?;
    // The node does not matter for a decision: policy is the same on every node.
    let state = State::from_mesh(&config, "");
    let (src_workload, src_ip) = endpoint(&state, &args.from, "--from")?;
    let (to, port) = args
        .to
        .rsplit_once(':')
        .with_context(|| format!("--to {:?} needs a port: <workload or IP>:<port>", args.to))?;
    let port: u16 = port
        .parse()
        .with_context(|| format!("--to {:?}: {port:?} is not a port", args.to))?;
    let (dst, dst_ip) = endpoint(
        &state,
        to.trim_start_matches('[').trim_end_matches(']'),
        "--to",
    )?;
    let Some(dst) = dst else {
        bail!(
            "--to {to:?} is not a workload of {}: policy applies to workloads",
            args.config.display()
        );
    };
    if !dst.enrolled {
        return Ok(format!(
            "{} is not enrolled in the mesh: nothing is enforced for it (allow)\n",
            dst.key()
        ));
    }
    let identity = src_workload
        .as_ref()
        .filter(|w| w.enrolled && !args.plaintext)
        .map(|w| Identity::new(&args.trust_domain, &w.namespace, &w.service_account));
    let decision = state.policies.evaluate(&Request {
        dst: &dst,
        dst_ip,
        dst_port: port,
        src_ip,
        src: identity.as_ref(),
        http: None,
    });
    let from = match (&src_workload, &identity) {
        (Some(w), Some(id)) => format!("{} ({src_ip}, {id}, mutual TLS)", w.key()),
        (Some(w), None) => format!("{} ({src_ip}, plaintext)", w.key()),
        (None, _) => format!("{src_ip} (not a mesh workload, plaintext)"),
    };
    Ok(format!(
        "from:     {from}\nto:       {} {} port {port} (mTLS mode {})\ndecision: {}\nreason:   {}\n",
        dst.key(),
        dst_ip,
        state.policies.mtls_mode(&dst, port),
        decision.verdict.to_string().to_uppercase(),
        decision.reason
    ))
}

/// A workload name, `namespace/name`, or an IP (with the workload that owns it, if any).
fn endpoint(
    state: &State,
    text: &str,
    flag: &str,
) -> anyhow::Result<(Option<Arc<Workload>>, IpAddr)> {
    if let Ok(ip) = text.parse::<IpAddr>() {
        return Ok((state.workload_by_ip(ip).cloned(), ip));
    }
    let key = if text.contains('/') {
        text.to_string()
    } else {
        format!("default/{text}")
    };
    let Some(w) = state.workloads.get(&key) else {
        bail!(
            "{flag} {text:?} is neither an IP nor a workload (known: {})",
            known(state)
        );
    };
    let ip = w
        .ips
        .first()
        .copied()
        .with_context(|| format!("{key} has no IP"))?;
    Ok((Some(w.clone()), ip))
}

fn known(state: &State) -> String {
    state
        .workloads
        .keys()
        .cloned()
        .collect::<Vec<_>>()
        .join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;

    const CONFIG: &str = r#"
namespaces:
  - { name: default, labels: { istio.io/dataplane-mode: ambient } }
  - { name: other, labels: { istio.io/dataplane-mode: ambient } }
workloads:
  - { name: client, node: n1, ips: [10.0.0.1], netns: /run/netns/a }
  - { name: server, node: n2, ips: [10.0.0.2], netns: /run/netns/b, labels: { app: server } }
  - { name: intruder, namespace: other, node: n2, ips: [10.0.0.3], netns: /run/netns/c }
policies:
  - apiVersion: security.istio.io/v1
    kind: AuthorizationPolicy
    metadata: { name: only-default, namespace: default }
    spec:
      selector: { matchLabels: { app: server } }
      action: ALLOW
      rules:
        - from: [{ source: { namespaces: ["default"] } }]
"#;

    fn run(from: &str, to: &str, plaintext: bool) -> String {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.yaml");
        std::fs::write(&path, CONFIG).unwrap();
        let args = ExplainArgs {
            config: path,
            from: from.into(),
            to: to.into(),
            plaintext,
            trust_domain: "cluster.local".into(),
        };
        let out = explain(&args).unwrap_or_else(|e| format!("error: {e:#}"));
        out
    }

    #[test]
    fn names_the_decision_and_the_deciding_rule() {
        let out = run("client", "server:8080", false);
        assert!(out.contains("decision: ALLOW"), "{out}");
        assert!(
            out.contains("allowed by AuthorizationPolicy default/only-default rule 0"),
            "{out}"
        );
        assert!(
            out.contains("spiffe://cluster.local/ns/default/sa/default"),
            "{out}"
        );
        let out = run("other/intruder", "10.0.0.2:8080", false);
        assert!(
            out.contains("decision: DENY") && out.contains("no ALLOW policy matched"),
            "{out}"
        );
        let out = run("client", "server:8080", true);
        assert!(
            out.contains("plaintext") && out.contains("decision: DENY"),
            "{out}"
        );
    }

    #[test]
    fn bad_arguments_are_named() {
        assert!(run("nobody", "server:80", false)
            .contains("\"nobody\" is neither an IP nor a workload"));
        assert!(run("client", "server", false).contains("needs a port"));
        assert!(run("client", "10.9.9.9:80", false).contains("is not a workload"));
    }
}

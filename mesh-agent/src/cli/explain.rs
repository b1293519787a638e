//! `mesh-agent explain`: the decision and the deciding rule for one connection, from the config
//! file alone (no agent, no traffic), exactly as the destination's proxy would decide it; or, with
//! HTTP flags, for one request as a waypoint would decide it.
use std::net::IpAddr;
use std::sync::Arc;

use anyhow::{bail, Context};
use http::{HeaderMap, HeaderName, HeaderValue};

use super::ExplainArgs;
use crate::identity::Identity;
use crate::model::Workload;
use crate::policy::{HttpAttributes, Request};
use crate::state::State;

/// Returns the explanation text.
pub fn explain(args: &ExplainArgs) -> anyhow::Result<String> {
    let http = http_attributes(args)?;
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
    // A waypoint's pods are not enrolled (never captured) but speak HBONE with their identity.
    let identity = src_workload
        .as_ref()
        .filter(|w| {
            (w.enrolled || state.waypoints().any(|wp| wp.serves_from(w))) && !args.plaintext
        })
        .map(|w| Identity::new(&args.trust_domain, &w.namespace, &w.service_account));
    let req = Request {
        dst: &dst,
        dst_ip,
        dst_port: port,
        src_ip,
        src: identity.as_ref(),
        http: http.as_ref(),
    };
    // At L4 the destination's agent decides (no bypass first); a request is decided as the
    // waypoint in front of it would, which no bypass does not concern.
    let decision = if http.is_some() {
        state.policies.evaluate(&req)
    } else {
        state.decide_inbound(&req)
    };
    let from = match (&src_workload, &identity) {
        (Some(w), Some(id)) => format!("{} ({src_ip}, {id}, mutual TLS)", w.key()),
        (Some(w), None) => format!("{} ({src_ip}, plaintext)", w.key()),
        (None, _) => format!("{src_ip} (not a mesh workload, plaintext)"),
    };
    let mut text = format!(
        "from:     {from}\nto:       {} {} port {port} (mTLS mode {})\n",
        dst.key(),
        dst_ip,
        state.policies.mtls_mode(&dst, port),
    );
    if let Some(http) = &http {
        text += &format!(
            "http:     {} {} host {} (one request, evaluated as a waypoint would: L7 fields \
             included)\n",
            http.method, http.path, http.host
        );
        for (name, value) in &http.headers {
            text += &format!(
                "header:   {name}: {}\n",
                String::from_utf8_lossy(value.as_bytes())
            );
        }
    }
    text += &format!(
        "decision: {}\nreason:   {}\n",
        decision.verdict.to_string().to_uppercase(),
        decision.reason
    );
    Ok(text)
}

/// The HTTP request the flags describe; `None` without any HTTP flag (a connection at L4).
fn http_attributes(args: &ExplainArgs) -> anyhow::Result<Option<HttpAttributes>> {
    if args.method.is_none()
        && args.path.is_none()
        && args.host.is_none()
        && args.headers.is_empty()
    {
        return Ok(None);
    }
    let mut headers = HeaderMap::new();
    for text in &args.headers {
        let (name, value) = text
            .split_once(':')
            .with_context(|| format!("--header {text:?} needs NAME:VALUE"))?;
        let name = HeaderName::from_bytes(name.trim().as_bytes())
            .with_context(|| format!("--header {text:?}: {name:?} is not a header name"))?;
        let value = HeaderValue::from_str(value.trim())
            .with_context(|| format!("--header {text:?}: {value:?} is not a header value"))?;
        headers.append(name, value);
    }
    // A Host header is the request's host (Envoy's `:authority`), unless --host names one.
    let host_header = headers
        .remove(http::header::HOST)
        .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned());
    Ok(Some(HttpAttributes {
        method: args.method.clone().unwrap_or_else(|| "GET".to_string()),
        path: args.path.clone().unwrap_or_else(|| "/".to_string()),
        host: args
            .host
            .clone()
            .or(host_header)
            .unwrap_or_else(|| args.to.clone()),
        headers,
    }))
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

    /// A DENY policy with L7 fields on `server`, one field per rule.
    const L7_POLICY: &str = r#"
  - apiVersion: security.istio.io/v1
    kind: AuthorizationPolicy
    metadata: { name: no-admin, namespace: default }
    spec:
      selector: { matchLabels: { app: server } }
      action: DENY
      rules:
        - to: [{ operation: { paths: ["/admin*"] } }]
        - when: [{ key: "request.headers[x-debug]", values: ["*"] }]
        - to: [{ operation: { hosts: ["admin.example"] } }]
        - to: [{ operation: { methods: ["DELETE"] } }]
"#;

    fn args(from: &str, to: &str, plaintext: bool) -> ExplainArgs {
        ExplainArgs {
            config: Default::default(),
            from: from.into(),
            to: to.into(),
            plaintext,
            trust_domain: "cluster.local".into(),
            method: None,
            path: None,
            host: None,
            headers: Vec::new(),
        }
    }

    /// The explanation for `args` under `config`, or the error as text.
    fn run_with(config: &str, mut args: ExplainArgs) -> String {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.yaml");
        std::fs::write(&path, config).unwrap();
        args.config = path;
        explain(&args).unwrap_or_else(|e| format!("error: {e:#}"))
    }

    fn run(from: &str, to: &str, plaintext: bool) -> String {
        run_with(CONFIG, args(from, to, plaintext))
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
    fn http_flags_evaluate_one_request_as_a_waypoint() {
        let config = format!("{CONFIG}{L7_POLICY}");
        // Without HTTP flags: the node agent's L4 decision, and no HTTP line.
        let out = run_with(&config, args("client", "server:8080", false));
        assert!(
            out.contains("decision: DENY")
                && out.contains(
                    "AuthorizationPolicy default/no-admin uses L7 fields (paths, \
                                 request.headers[x-debug], hosts, methods) and no waypoint"
                ),
            "{out}"
        );
        assert_eq!(out.lines().count(), 4, "{out}");
        assert!(!out.contains("waypoint would"), "{out}");
        // One flag is enough; the others take their defaults, shown in the output.
        let out = run_with(
            &config,
            ExplainArgs {
                path: Some("/public?q=1".into()),
                ..args("client", "server:8080", false)
            },
        );
        assert!(
            out.contains(
                "http:     GET /public?q=1 host server:8080 (one request, evaluated as a \
                          waypoint would: L7 fields included)"
            ) && out.contains("decision: ALLOW")
                && out.contains("allowed by AuthorizationPolicy default/only-default rule 0"),
            "{out}"
        );
        // Each flag reaches its field: the matching DENY rule is named.
        let denied = |edit: &dyn Fn(&mut ExplainArgs), rule: usize| {
            let mut a = args("client", "server:8080", false);
            edit(&mut a);
            let out = run_with(&config, a);
            assert!(
                out.contains("decision: DENY")
                    && out.contains(&format!(
                        "denied by AuthorizationPolicy default/no-admin rule {rule}"
                    )),
                "rule {rule}: {out}"
            );
            out
        };
        denied(&|a| a.path = Some("/admin/users?x=1".into()), 0);
        let out = denied(&|a| a.headers = vec!["X-Debug: 1".into()], 1);
        assert!(out.contains("header:   x-debug: 1"), "{out}");
        denied(&|a| a.host = Some("Admin.Example:8080".into()), 2);
        denied(&|a| a.headers = vec!["host:admin.example".into()], 2);
        denied(&|a| a.method = Some("DELETE".into()), 3);
        // L4 fields still apply to the request.
        let out = run_with(
            &config,
            ExplainArgs {
                method: Some("GET".into()),
                ..args("other/intruder", "server:8080", false)
            },
        );
        assert!(out.contains("no ALLOW policy matched"), "{out}");
    }

    #[test]
    fn bad_arguments_are_named() {
        assert!(run("nobody", "server:80", false)
            .contains("\"nobody\" is neither an IP nor a workload"));
        assert!(run("client", "server", false).contains("needs a port"));
        assert!(run("client", "10.9.9.9:80", false).contains("is not a workload"));
        let header = |h: &str| {
            run_with(
                CONFIG,
                ExplainArgs {
                    headers: vec![h.into()],
                    ..args("client", "server:80", false)
                },
            )
        };
        assert!(header("x-user").contains("--header \"x-user\" needs NAME:VALUE"));
        assert!(header("bad name:1").contains("is not a header name"));
    }

    #[test]
    fn no_bypass_is_named_when_it_decides() {
        let config = r#"
waypointOnlyDefault: true
namespaces: [{ name: default, labels: { istio.io/dataplane-mode: ambient } }]
workloads:
  - { name: client, node: n1, ips: [10.0.0.1] }
  - { name: server, node: n2, ips: [10.0.0.2] }
  - { name: wp-1, node: n1, ips: [10.0.0.9], serviceAccount: wp, labels: { gateway.networking.k8s.io/gateway-name: wp } }
services:
  - { name: web, vips: [10.96.0.1], ports: [{ port: 80, targetPort: 8080 }], endpoints: [server], labels: { istio.io/use-waypoint: wp } }
gateways:
  - apiVersion: gateway.networking.k8s.io/v1
    kind: Gateway
    metadata: { name: wp, namespace: default }
    spec: { gatewayClassName: istio-waypoint }
"#;
        let out = run_with(config, args("client", "server:8080", false));
        assert!(
            out.contains(
                "decision: DENY\nreason:   service default/web accepts only its waypoint \
                          default/wp (no-bypass)"
            ),
            "{out}"
        );
        // The waypoint's pod is not enrolled but speaks HBONE with its identity.
        let out = run_with(config, args("wp-1", "server:8080", false));
        assert!(
            out.contains("spiffe://cluster.local/ns/default/sa/wp, mutual TLS")
                && out.contains("decision: ALLOW"),
            "{out}"
        );
        let out = run_with(config, args("wp-1", "server:8080", true));
        assert!(
            out.contains("(no-bypass)"),
            "plaintext is never the waypoint: {out}"
        );
        // Another port of the pod is not guarded; nor is a request as the waypoint decides it.
        let out = run_with(config, args("client", "server:9090", false));
        assert!(out.contains("decision: ALLOW"), "{out}");
        let out = run_with(
            config,
            ExplainArgs {
                method: Some("GET".into()),
                ..args("client", "server:8080", false)
            },
        );
        assert!(out.contains("decision: ALLOW"), "{out}");
    }
}

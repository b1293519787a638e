//! `mesh-agent explain`: the decision and the deciding rule for one connection, from the config
//! file alone (no agent, no traffic), exactly as the destination's proxy would decide it; or, with
//! HTTP flags, for one request. When the destination is reached through a waypoint (a service or
//! workload with `istio.io/use-waypoint`, from a mesh workload), it decides as that waypoint
//! would: the policies bound to it by `targetRefs` and the destination workloads' own, both.
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use anyhow::{bail, Context};
use http::{HeaderMap, HeaderName, HeaderValue};

use super::ExplainArgs;
use crate::identity::Identity;
use crate::model::{Waypoint, Workload};
use crate::policy::{Decision, HttpAttributes, Request};
use crate::proxy::decide_at_waypoint;
use crate::state::{Service, State, Via};
use crate::waypoint::routes::Routes;
use crate::waypoint::routing::RouteKind;

/// What `--to` names.
enum Destination {
    Workload(Arc<Workload>, IpAddr),
    Service(Arc<Service>, IpAddr),
}

/// Returns the explanation text: a line per fact, `decision:` and `reason:` last.
pub fn explain(args: &ExplainArgs) -> anyhow::Result<String> {
    let mut http = http_attributes(args)?;
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
    let to = to.trim_start_matches('[').trim_end_matches(']');
    // A waypoint's pods are not enrolled (never captured) but speak HBONE with their identity.
    let identity = src_workload
        .as_ref()
        .filter(|w| {
            (w.enrolled || state.waypoints().any(|wp| wp.serves_from(w))) && !args.plaintext
        })
        .map(|w| Identity::new(&args.trust_domain, &w.namespace, &w.service_account));
    let from = match (&src_workload, &identity) {
        (Some(w), Some(id)) => format!("{} ({src_ip}, {id}, mutual TLS)", w.key()),
        (Some(w), None) => format!("{} ({src_ip}, plaintext)", w.key()),
        (None, _) => format!("{src_ip} (not a mesh workload, plaintext)"),
    };
    let mut text = format!("from:     {from}\n");
    let (dst, dst_ip) = match destination(&state, to, args)? {
        Destination::Workload(w, ip) => (w, ip),
        Destination::Service(svc, vip) => {
            // A client names a service by its host name: the default Host.
            if let Some(http) = http.as_mut().filter(|_| !host_given(args)) {
                http.host = match port {
                    80 => svc.hostname(),
                    _ => format!("{}:{port}", svc.hostname()),
                };
            }
            let (dst, dst_ip) = (
                svc.endpoints.first().cloned().with_context(|| {
                    format!("service {} has no endpoints: nothing to decide", svc.key())
                })?,
                vip,
            );
            let target = SocketAddr::new(vip, port);
            if let Some(through) = via_waypoint(&state, &svc.via, target, &identity, src_ip, &http)
            {
                text += &format!("to:       service {} {vip} port {port}", svc.key());
                return Ok(text + &through);
            }
            // Without a waypoint (or from outside the mesh, which no agent sends to one), a
            // service is its endpoints: decided as the first one's agent would.
            text += &format!(
                "service:  {} {vip} port {port} (no waypoint on this path: its endpoint's agent \
                 decides)\n",
                svc.key()
            );
            let port = svc.target_port(port).unwrap_or(port);
            let ip = endpoint_ip(&dst, dst_ip);
            return Ok(text
                + &direct(
                    &state,
                    &dst,
                    ip,
                    port,
                    src_ip,
                    identity.as_ref(),
                    http.as_ref(),
                ));
        }
    };
    if !dst.enrolled {
        return Ok(format!(
            "{} is not enrolled in the mesh: nothing is enforced for it (allow)\n",
            dst.key()
        ));
    }
    let via = state.workload_via(&dst);
    let target = SocketAddr::new(dst_ip, port);
    if let Some(through) = via_waypoint(&state, via, target, &identity, src_ip, &http) {
        return Ok(text + &format!("to:       {} {dst_ip} port {port}", dst.key()) + &through);
    }
    Ok(text
        + &direct(
            &state,
            &dst,
            dst_ip,
            port,
            src_ip,
            identity.as_ref(),
            http.as_ref(),
        ))
}

/// The rest of the `to:` line and the waypoint's decisions, when `via` sends a mesh workload's
/// traffic to `target` through a waypoint; `None` when it goes straight to the destination.
fn via_waypoint(
    state: &State,
    via: &Via,
    target: SocketAddr,
    identity: &Option<Identity>,
    src_ip: IpAddr,
    http: &Option<HttpAttributes>,
) -> Option<String> {
    let id = identity.as_ref()?;
    match via {
        Via::Direct => None,
        Via::Missing { waypoint, why } => Some(format!(
            ", through waypoint {waypoint}, which {why}\ndecision: DENY\nreason:   the \
             traffic fails: its waypoint {waypoint} {why}\n"
        )),
        Via::Waypoint(w) => Some(through_waypoint(
            state,
            &w.waypoint,
            target,
            (src_ip, id),
            http.as_ref(),
        )),
    }
}

/// What `--to` names: an IP (a service VIP, else a workload's), a workload (`name` in `default`,
/// or `namespace/name`), else a service (likewise, or its host name).
fn destination(state: &State, to: &str, args: &ExplainArgs) -> anyhow::Result<Destination> {
    if let Ok(ip) = to.parse::<IpAddr>() {
        if let Some(svc) = state.service_by_vip(ip) {
            return Ok(Destination::Service(svc.clone(), ip));
        }
    }
    let key = if to.contains('/') {
        to.to_string()
    } else {
        format!("default/{to}")
    };
    if to.parse::<IpAddr>().is_err() && !state.workloads.contains_key(&key) {
        let service = state
            .services
            .get(&key)
            .or_else(|| state.service_by_hostname(to));
        if let Some(svc) = service {
            let vip = svc
                .spec
                .vips
                .first()
                .copied()
                .with_context(|| format!("service {} has no VIP", svc.key()))?;
            return Ok(Destination::Service(svc.clone(), vip));
        }
    }
    let (dst, dst_ip) = endpoint(state, to, "--to")?;
    let Some(dst) = dst else {
        bail!(
            "--to {to:?} is neither a service VIP nor a workload of {}: policy applies to \
             workloads",
            args.config.display()
        );
    };
    Ok(Destination::Workload(dst, dst_ip))
}

/// The address of `dst` of the family of `like`.
fn endpoint_ip(dst: &Workload, like: IpAddr) -> IpAddr {
    let ip = if like.is_ipv4() {
        dst.ip4().map(IpAddr::V4)
    } else {
        dst.ip6().map(IpAddr::V6)
    };
    ip.or(dst.ips.first().copied()).unwrap_or(like)
}

/// The destination agent's decision for a connection (or, with `http`, one request).
fn direct(
    state: &State,
    dst: &Workload,
    dst_ip: IpAddr,
    port: u16,
    src_ip: IpAddr,
    identity: Option<&Identity>,
    http: Option<&HttpAttributes>,
) -> String {
    let req = Request {
        dst,
        dst_ip,
        dst_port: port,
        src_ip,
        src: identity,
        http,
    };
    // At L4 the destination's agent decides (no bypass first); a request is decided as the
    // waypoint in front of it would, which no bypass does not concern.
    let decision = if http.is_some() {
        state.policies.evaluate(&req)
    } else {
        state.decide_inbound(&req)
    };
    let mut text = format!(
        "to:       {} {} port {port} (mTLS mode {})\n",
        dst.key(),
        dst_ip,
        state.policies.mtls_mode(dst, port),
    );
    if let Some(http) = http {
        text += &http_lines(
            http,
            "one request, evaluated as a waypoint would: L7 fields included",
        );
    }
    text + &decision_lines(&decision)
}

/// The decisions of `waypoint` for traffic to `target`; the caller has written the start of the
/// `to:` line.
fn through_waypoint(
    state: &State,
    waypoint: &Waypoint,
    target: SocketAddr,
    client: (IpAddr, &Identity),
    http: Option<&HttpAttributes>,
) -> String {
    let mut text = format!(", through waypoint {}\n", waypoint.key());
    match http {
        Some(http) => {
            text += &http_lines(http, "one request, decided at the waypoint");
            text += &route_line(state, waypoint, target, http);
        }
        None => {
            text += "stream:   opaque TCP (no HTTP flags): a rule with HTTP-only fields never \
                     matches in an ALLOW policy and is ignored in a DENY policy\n"
        }
    }
    let verdict = decide_at_waypoint(state, waypoint, target, client, http);
    text += &format!("targetRefs policies:   {}\n", verdict.bound);
    text += &format!(
        "destination policies:  {} (selector, namespace and mesh-wide policies of the \
         destination workloads, decided at the waypoint for the client)\n",
        verdict.destination
    );
    text + &decision_lines(verdict.decision())
}

/// Which HTTPRoute rule the waypoint would pick for the request (after policy allows it).
fn route_line(
    state: &State,
    waypoint: &Waypoint,
    target: SocketAddr,
    http: &HttpAttributes,
) -> String {
    let Some(service) = state.service_by_vip(target.ip()) else {
        return "route:    none (a workload address: HTTPRoutes attach to services)\n".into();
    };
    let routes = Routes::build(state, &waypoint.key());
    let Some(table) = routes.for_service(service, target.port()) else {
        return format!(
            "route:    no HTTPRoute attached: the request goes to service {} as sent\n",
            service.key()
        );
    };
    let mut request = http::Request::builder()
        .method(http.method.as_str())
        .uri(http.path.as_str());
    for (name, value) in &http.headers {
        request = request.header(name, value);
    }
    if !http.headers.contains_key(http::header::HOST) {
        request = request.header(http::header::HOST, http.host.as_str());
    }
    let Ok(request) = request.body(()) else {
        return format!(
            "route:    {} {} is not a request the waypoint could route\n",
            http.method, http.path
        );
    };
    let (parts, ()) = request.into_parts();
    let Some(selected) = table.select(&parts) else {
        let kind = table
            .routes()
            .first()
            .map_or("HTTPRoute", |r| r.kind.as_str());
        return format!(
            "route:    no rule of the attached {kind}s matches: 404 (response flag NR)\n"
        );
    };
    let backends: Vec<String> = selected
        .rule
        .backends
        .iter()
        .map(|b| {
            format!(
                "{}{}:{} weight {}",
                b.reference.name,
                b.reference
                    .subset
                    .as_ref()
                    .map_or(String::new(), |s| format!(" (subset {s})")),
                b.reference.port.map_or("-".into(), |p| p.to_string()),
                b.weight
            )
        })
        .collect();
    format!(
        "route:    {} {} {}[{}] ({}[{}]) -> {}\n",
        selected.route.kind.as_str(),
        selected.route.key(),
        match selected.route.kind {
            RouteKind::HttpRoute => "rules",
            RouteKind::VirtualService => "http",
        },
        selected.rule.index,
        match selected.route.kind {
            RouteKind::HttpRoute => "matches",
            RouteKind::VirtualService => "match",
        },
        selected.match_index,
        if backends.is_empty() {
            "no backend (its filters answer, or 500)".to_string()
        } else {
            backends.join(", ")
        }
    )
}

fn http_lines(http: &HttpAttributes, what: &str) -> String {
    let mut text = format!(
        "http:     {} {} host {} ({what})\n",
        http.method, http.path, http.host
    );
    for (name, value) in &http.headers {
        text += &format!(
            "header:   {name}: {}\n",
            String::from_utf8_lossy(value.as_bytes())
        );
    }
    text
}

fn decision_lines(decision: &Decision) -> String {
    format!(
        "decision: {}\nreason:   {}\n",
        decision.verdict.to_string().to_uppercase(),
        decision.reason
    )
}

/// Whether `--host` or a `--header host:...` names the request's host.
fn host_given(args: &ExplainArgs) -> bool {
    args.host.is_some()
        || args.headers.iter().any(|h| {
            h.split(':')
                .next()
                .is_some_and(|name| name.trim().eq_ignore_ascii_case("host"))
        })
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
            out.contains("allowed by AuthorizationPolicy default/only-default rules[0]"),
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
                && out.contains("allowed by AuthorizationPolicy default/only-default rules[0]"),
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
                        "denied by AuthorizationPolicy default/no-admin rules[{rule}]"
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

    /// `shop/web` (port 80 -> 8080 on `server`) behind the waypoint `shop/wp`, a Service-bound
    /// DENY of DELETE and a selector ALLOW on `server` for namespace `shop`.
    const WAYPOINT: &str = r#"
namespaces: [{ name: shop, labels: { istio.io/dataplane-mode: ambient } }]
workloads:
  - { name: client, namespace: shop, node: n1, ips: [10.0.0.1] }
  - { name: server, namespace: shop, node: n2, ips: [10.0.0.2], labels: { app: server } }
  - { name: wp-1, namespace: shop, node: n1, ips: [10.0.0.8], serviceAccount: wp, labels: { gateway.networking.k8s.io/gateway-name: wp } }
services:
  - { name: web, namespace: shop, vips: [10.96.0.1], ports: [{ port: 80, targetPort: 8080 }], endpoints: [server], labels: { istio.io/use-waypoint: wp } }
gateways:
  - { apiVersion: gateway.networking.k8s.io/v1, kind: Gateway, metadata: { name: wp, namespace: shop }, spec: { gatewayClassName: istio-waypoint } }
policies:
  - apiVersion: security.istio.io/v1
    kind: AuthorizationPolicy
    metadata: { name: no-delete, namespace: shop }
    spec:
      targetRefs: [{ kind: Service, group: "", name: web }]
      action: DENY
      rules: [{ to: [{ operation: { methods: [DELETE] } }] }]
  - apiVersion: security.istio.io/v1
    kind: AuthorizationPolicy
    metadata: { name: shop-only, namespace: shop }
    spec:
      selector: { matchLabels: { app: server } }
      rules: [{ from: [{ source: { namespaces: [shop] } }] }]
"#;

    #[test]
    fn through_a_waypoint_both_policy_sets_are_explained() {
        let request = |to: &str, method: Option<&str>| {
            run_with(
                WAYPOINT,
                ExplainArgs {
                    method: method.map(str::to_string),
                    path: method.map(|_| "/items/1".to_string()),
                    ..args("shop/client", to, false)
                },
            )
        };
        let out = request("shop/web:80", Some("DELETE"));
        let expected = "\
from:     shop/client (10.0.0.1, spiffe://cluster.local/ns/shop/sa/default, mutual TLS)
to:       service shop/web 10.96.0.1 port 80, through waypoint shop/wp
http:     DELETE /items/1 host web.shop.svc.cluster.local (one request, decided at the waypoint)
route:    no HTTPRoute attached: the request goes to service shop/web as sent
targetRefs policies:   deny: denied by AuthorizationPolicy shop/no-delete rules[0] (targetRefs Service shop/web, at waypoint shop/wp)
destination policies:  allow: allowed by AuthorizationPolicy shop/shop-only rules[0] (selector, namespace and mesh-wide policies of the destination workloads, decided at the waypoint for the client)
decision: DENY
reason:   denied by AuthorizationPolicy shop/no-delete rules[0] (targetRefs Service shop/web, at waypoint shop/wp)
";
        assert_eq!(out, expected);
        // The VIP and the host name name the service too; GET passes both sets.
        for to in ["10.96.0.1:80", "web.shop.svc.cluster.local:80"] {
            let out = request(to, Some("GET"));
            assert!(
                out.ends_with(
                    "decision: ALLOW\nreason:   allowed by AuthorizationPolicy \
                     shop/shop-only rules[0]\n"
                ),
                "{out}"
            );
            assert!(
                out.contains(
                    "targetRefs policies:   allow: no ALLOW policy with targetRefs applies at \
                     waypoint shop/wp\n"
                ),
                "{out}"
            );
        }
        // No HTTP flags: an opaque stream, which a DENY rule on `methods` alone denies (Istio).
        let out = request("shop/web:80", None);
        assert!(out.contains("stream:   opaque TCP"), "{out}");
        assert!(out.ends_with("decision: DENY\nreason:   denied by AuthorizationPolicy shop/no-delete rules[0] (targetRefs Service shop/web, at waypoint shop/wp)\n"), "{out}");
        // The pod's own address does not go through a service's waypoint: its agent decides,
        // and the bound policy is not among its policies.
        let out = request("shop/server:8080", Some("DELETE"));
        assert!(!out.contains("waypoint shop/wp"), "{out}");
        assert!(out.contains("decision: ALLOW"), "{out}");
        // Plaintext never goes through the waypoint: the endpoint's agent decides.
        let out = run_with(
            WAYPOINT,
            ExplainArgs {
                method: Some("DELETE".into()),
                ..args("shop/client", "shop/web:80", true)
            },
        );
        assert!(out.contains("service:  shop/web 10.96.0.1 port 80 (no waypoint on this path: its endpoint's agent decides)\nto:       shop/server 10.0.0.2 port 8080"), "{out}");
        assert!(
            out.ends_with("decision: DENY\nreason:   no ALLOW policy matched\n"),
            "{out}"
        );
    }

    #[test]
    fn bad_arguments_are_named() {
        assert!(run("nobody", "server:80", false)
            .contains("\"nobody\" is neither an IP nor a workload"));
        assert!(run("client", "server", false).contains("needs a port"));
        assert!(
            run("client", "10.9.9.9:80", false).contains("is neither a service VIP nor a workload")
        );
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

    #[test]
    fn through_a_waypoint_the_deciding_route_is_named() {
        let routes = r#"routes:
  - apiVersion: gateway.networking.k8s.io/v1
    kind: HTTPRoute
    metadata: { name: web, namespace: shop }
    spec:
      parentRefs: [{ group: "", kind: Service, name: web }]
      rules:
        - matches: [{ path: { type: PathPrefix, value: /items } }]
          backendRefs: [{ name: web, port: 80, weight: 90 }, { name: web, port: 81, weight: 10 }]
        - matches: [{ path: { type: Exact, value: /old } }]
          filters: [{ type: RequestRedirect, requestRedirect: { path: { type: ReplaceFullPath, replaceFullPath: /new } } }]
"#;
        let config = format!("{WAYPOINT}{routes}");
        let request = |path: &str| {
            run_with(
                &config,
                ExplainArgs {
                    method: Some("GET".into()),
                    path: Some(path.into()),
                    ..args("shop/client", "shop/web:80", false)
                },
            )
        };
        let line = |out: &str| {
            out.lines()
                .find(|l| l.starts_with("route:"))
                .unwrap_or_default()
                .to_string()
        };
        assert_eq!(
            line(&request("/items/1")),
            "route:    HTTPRoute shop/web rules[0] (matches[0]) -> web:80 weight 90, web:81 \
             weight 10"
        );
        assert_eq!(
            line(&request("/old")),
            "route:    HTTPRoute shop/web rules[1] (matches[0]) -> no backend (its filters \
             answer, or 500)"
        );
        assert_eq!(
            line(&request("/elsewhere")),
            "route:    no rule of the attached HTTPRoutes matches: 404 (response flag NR)"
        );
    }

    #[test]
    fn through_a_waypoint_the_deciding_virtual_service_is_named() {
        let virtual_services = r#"virtualServices:
  - apiVersion: networking.istio.io/v1
    kind: VirtualService
    metadata: { name: web, namespace: shop }
    spec:
      hosts: [web]
      http:
        - match: [{ uri: { exact: /old } }, { uri: { prefix: /items } }]
          route:
            - { destination: { host: web, subset: v1 }, weight: 90 }
            - { destination: { host: web, subset: v2 }, weight: 10 }
"#;
        let config = format!("{WAYPOINT}{virtual_services}");
        let request = |path: &str| {
            run_with(
                &config,
                ExplainArgs {
                    method: Some("GET".into()),
                    path: Some(path.into()),
                    ..args("shop/client", "shop/web:80", false)
                },
            )
        };
        let line = |out: &str| {
            out.lines()
                .find(|l| l.starts_with("route:"))
                .unwrap_or_default()
                .to_string()
        };
        assert_eq!(
            line(&request("/items/1")),
            "route:    VirtualService shop/web http[0] (match[1]) -> web (subset v1):80 weight \
             90, web (subset v2):80 weight 10"
        );
        assert_eq!(
            line(&request("/elsewhere")),
            "route:    no rule of the attached VirtualServices matches: 404 (response flag NR)"
        );
    }
}

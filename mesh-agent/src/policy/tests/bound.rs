//! Policies bound by `targetRefs` (a waypoint's): reading them, the node agents ignoring them, and
//! a waypoint's decision over those bound to its Gateway or to the addressed Service, for HTTP
//! requests and for TCP streams (Istio's rule for HTTP-only fields on TCP).
use http::{HeaderMap, HeaderName, HeaderValue};

use super::evaluate::{allowed_by, decide, no_policies, CLIENT, HTTPBIN, SLEEP};
use super::{ap, ip, policy_set};
use crate::identity::Identity;
use crate::model::policy::{parse_documents, PolicyDocument, TargetKind, TargetRef};
use crate::policy::{
    Binding, Connection, Decision, HttpAttributes, PolicySet, Reason, WaypointBinding,
};

/// The waypoint `foo/wp` in front of the service `foo/httpbin`.
const AT: WaypointBinding<'static> = WaypointBinding {
    gateway: ("foo", "wp"),
    service: Some(("foo", "httpbin")),
};

fn refs(yaml: &str) -> Vec<TargetRef> {
    match parse_documents(yaml)
        .unwrap_or_else(|e| panic!("{e}"))
        .remove(0)
    {
        PolicyDocument::AuthorizationPolicy(p) => p.spec.target_refs,
        other => panic!("{other:?}"),
    }
}

fn error_of(yaml: &str) -> String {
    match parse_documents(yaml) {
        Ok(docs) => panic!("accepted: {docs:?}"),
        Err(e) => e,
    }
}

#[test]
fn target_refs_are_read() {
    let gateway = TargetRef {
        kind: TargetKind::Gateway,
        name: "wp".into(),
    };
    let service = TargetRef {
        kind: TargetKind::Service,
        name: "web".into(),
    };
    let both = "{targetRefs: [{kind: Gateway, group: gateway.networking.k8s.io, name: wp}, \
                {kind: Service, group: '', name: web}]}";
    assert_eq!(
        refs(&ap("foo", "x", both)),
        [gateway.clone(), service.clone()]
    );
    // The deprecated singular form; `group` omitted is the core group.
    let single = "{targetRef: {kind: Service, name: web}}";
    assert_eq!(refs(&ap("foo", "x", single)), [service]);
    let single = "{targetRef: {kind: Gateway, group: gateway.networking.k8s.io, name: wp}}";
    assert_eq!(refs(&ap("foo", "x", single)), [gateway]);
    // An empty namespace is no namespace.
    let empty_ns = "{targetRefs: [{kind: Service, name: web, namespace: ''}]}";
    assert_eq!(refs(&ap("foo", "x", empty_ns)).len(), 1);
}

#[test]
fn bad_target_refs_are_named() {
    let spec = |s: &str| ap("foo", "x", s);
    let cases = [
        (
            spec("{targetRefs: [{kind: GatewayClass, group: gateway.networking.k8s.io, name: istio-waypoint}]}"),
            "document 1: spec.targetRefs[0]: unsupported target kind \"GatewayClass\" of group \
             \"gateway.networking.k8s.io\": expected `kind: Gateway` with `group: \
             gateway.networking.k8s.io` (a waypoint) or `kind: Service` with `group: \"\"` at \
             line 4 column 21",
        ),
        (
            spec("{targetRefs: [{kind: ServiceEntry, group: networking.istio.io, name: ext}]}"),
            "document 1: spec.targetRefs[0]: unsupported target kind \"ServiceEntry\" of group \
             \"networking.istio.io\": expected `kind: Gateway` with `group: \
             gateway.networking.k8s.io` (a waypoint) or `kind: Service` with `group: \"\"` at \
             line 4 column 21",
        ),
        (
            spec("{targetRefs: [{kind: Service, name: a}, {kind: Gateway, name: wp}]}"),
            "document 1: spec.targetRefs[1]: unsupported target kind \"Gateway\" in the core group \
             (\"\"): expected `kind: Gateway` with `group: gateway.networking.k8s.io` (a \
             waypoint) or `kind: Service` with `group: \"\"` at line 4 column 47",
        ),
        (
            spec("{targetRef: {kind: Service, group: apps, name: web}}"),
            "document 1: spec.targetRef: unsupported target kind \"Service\" of group \"apps\": \
             expected `kind: Gateway` with `group: gateway.networking.k8s.io` (a waypoint) or \
             `kind: Service` with `group: \"\"` at line 4 column 19",
        ),
        (
            spec("{targetRefs: [{kind: Service, name: web, namespace: bar}]}"),
            "document 1: spec.targetRefs[0]: `namespace` must not be set (found \"bar\"): a \
             targetRef names an object in the policy's own namespace (Istio does not support \
             cross-namespace references) at line 4 column 21",
        ),
        (
            spec("{targetRefs: [{kind: Service, name: ''}]}"),
            "document 1: spec.targetRefs[0]: `name` must not be empty at line 4 column 21",
        ),
        (
            spec("{targetRefs: [{kind: Service}]}"),
            "document 1: spec.targetRefs[0]: missing field `name` at line 4 column 21",
        ),
        (
            spec("{targetRefs: [{kind: Service, name: web, sectionName: http}]}"),
            "document 1: spec.targetRefs[0]: unknown field `sectionName`, expected one of \
             `group`, `kind`, `name`, `namespace` at line 4 column 21",
        ),
        (
            spec("{selector: {matchLabels: {app: web}}, targetRefs: [{kind: Service, name: web}]}"),
            // A check across fields of `spec`: named by the fields, without a line.
            "document 1: `selector` and `targetRef(s)` cannot both be set: a policy either \
             selects workloads (enforced by their node agents) or binds to a waypoint Gateway or \
             a Service (enforced by the waypoint)",
        ),
        (
            spec("{targetRef: {kind: Service, name: a}, targetRefs: [{kind: Service, name: b}]}"),
            "document 1: `targetRef` and `targetRefs` cannot both be set (`targetRef` is \
             deprecated: list it in `targetRefs`)",
        ),
        (
            spec("{targetRefs: [{kind: Service, name: web}], action: CUSTOM, provider: {name: x}}"),
            "document 1: spec.action: action CUSTOM (external authorization) is not supported: \
             only ALLOW and DENY are at line 4 column 58",
        ),
        (
            spec("{rules: [{from: [{source: {requestPrincipals: ['*']}}]}]}"),
            "document 1: spec.rules[0].from[0]: `requestPrincipals` needs JWT \
             authentication (a RequestAuthentication), which this mesh does not support at line \
             4 column 24",
        ),
        (
            spec("{rules: [{from: [{source: {notRequestPrincipals: ['*']}}]}]}"),
            "document 1: spec.rules[0].from[0]: `notRequestPrincipals` needs JWT \
             authentication (a RequestAuthentication), which this mesh does not support at line \
             4 column 24",
        ),
        (
            spec("{rules: [{when: [{key: 'request.auth.claims[iss]', values: [a]}]}]}"),
            "document 1: spec.rules[0].when: `when` key \"request.auth.claims[iss]\" needs \
             JWT authentication (a RequestAuthentication), which this mesh does not support at \
             line 4 column 23",
        ),
    ];
    let failures: Vec<String> = cases
        .iter()
        .filter(|(yaml, expected)| error_of(yaml) != *expected)
        .map(|(yaml, _)| format!("{yaml}=> {}", error_of(yaml)))
        .collect();
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

/// A Gateway-bound DENY of `DELETE` (Istio's waypoint example).
fn no_delete() -> String {
    ap(
        "foo",
        "no-delete",
        "{targetRefs: [{kind: Gateway, group: gateway.networking.k8s.io, name: wp}], \
         action: DENY, rules: [{to: [{operation: {methods: [DELETE]}}]}]}",
    )
}

/// A Service-bound ALLOW of `GET /api/*` from `sleep` (Istio's waypoint example).
fn get_api() -> String {
    ap(
        "foo",
        "get-api",
        "{targetRefs: [{kind: Service, group: '', name: httpbin}], rules: [{from: [{source: \
         {principals: [cluster.local/ns/foo/sa/sleep]}}], to: [{operation: {methods: [GET], \
         paths: ['/api/*']}}]}]}",
    )
}

fn request(method: &str, path: &str, headers: &[(&str, &str)]) -> HttpAttributes {
    let mut map = HeaderMap::new();
    for (name, value) in headers {
        map.append(
            HeaderName::from_bytes(name.as_bytes()).unwrap(),
            HeaderValue::from_str(value).unwrap(),
        );
    }
    HttpAttributes {
        method: method.into(),
        path: path.into(),
        host: "httpbin.foo.svc.cluster.local".into(),
        headers: map,
    }
}

/// The waypoint's decision over the bound policies for `sa` in `foo` at 10.1.0.5 calling the
/// service's port 80; `http: None` is a TCP stream.
fn bound(
    set: &PolicySet,
    at: &WaypointBinding,
    sa: &str,
    http: Option<&HttpAttributes>,
) -> Decision {
    let id = Identity::new("cluster.local", "foo", sa);
    set.evaluate_bound(
        at,
        &Connection {
            dst_ip: ip("10.96.0.1"),
            dst_port: 80,
            src_ip: ip("10.1.0.5"),
            src: Some(&id),
            http,
        },
    )
}

fn binding(kind: TargetKind, target: &str) -> Option<Binding> {
    Some(Binding {
        kind,
        target: target.into(),
        waypoint: "foo/wp".into(),
    })
}

fn denied(policy: &str, rule: usize, bound: Option<Binding>) -> Decision {
    Decision {
        verdict: crate::policy::Verdict::Deny,
        reason: Reason::DeniedBy {
            policy: policy.into(),
            rule,
            bound,
        },
    }
}

fn allowed(policy: &str, rule: usize, bound: Option<Binding>) -> Decision {
    Decision {
        verdict: crate::policy::Verdict::Allow,
        reason: Reason::AllowedBy {
            policy: policy.into(),
            rule,
            bound,
        },
    }
}

fn no_bound_match() -> Decision {
    Decision {
        verdict: crate::policy::Verdict::Deny,
        reason: Reason::NoBoundAllowPolicyMatched {
            waypoint: "foo/wp".into(),
        },
    }
}

fn no_bound_policies() -> Decision {
    Decision {
        verdict: crate::policy::Verdict::Allow,
        reason: Reason::NoBoundPolicies {
            waypoint: "foo/wp".into(),
        },
    }
}

#[test]
fn a_gateway_bound_deny_of_delete() {
    let (set, warnings) = policy_set(&no_delete());
    assert!(warnings.is_empty(), "{warnings:?}");
    let gw = binding(TargetKind::Gateway, "foo/wp");
    let delete = request("DELETE", "/api/x", &[]);
    assert_eq!(
        bound(&set, &AT, "sleep", Some(&delete)),
        denied("foo/no-delete", 0, gw.clone())
    );
    assert_eq!(
        bound(&set, &AT, "sleep", Some(&delete)).reason.to_string(),
        "denied by AuthorizationPolicy foo/no-delete rules[0] (targetRefs Gateway foo/wp, at \
         waypoint foo/wp)"
    );
    let get = request("GET", "/api/x", &[]);
    assert_eq!(bound(&set, &AT, "sleep", Some(&get)), no_bound_policies());
    // Every service behind the waypoint, and traffic to a workload address too.
    let other = WaypointBinding {
        service: Some(("foo", "other")),
        ..AT
    };
    let workload = WaypointBinding {
        service: None,
        ..AT
    };
    for at in [other, workload] {
        assert_eq!(
            bound(&set, &at, "sleep", Some(&delete)),
            denied("foo/no-delete", 0, gw.clone())
        );
    }
    // Not another waypoint, nor a waypoint of that name in another namespace.
    for gateway in [("foo", "wp2"), ("bar", "wp")] {
        let at = WaypointBinding {
            gateway,
            service: None,
        };
        assert!(bound(&set, &at, "sleep", Some(&delete)).is_allowed());
    }
}

#[test]
fn a_service_bound_allow_of_get_api_from_a_principal() {
    let (set, _) = policy_set(&get_api());
    let svc = binding(TargetKind::Service, "foo/httpbin");
    let get = request("GET", "/api/users?id=1", &[]);
    assert_eq!(
        bound(&set, &AT, "sleep", Some(&get)),
        allowed("foo/get-api", 0, svc)
    );
    // Another principal, method or path: no ALLOW policy matched.
    assert_eq!(bound(&set, &AT, "other", Some(&get)), no_bound_match());
    let post = request("POST", "/api/users", &[]);
    assert_eq!(bound(&set, &AT, "sleep", Some(&post)), no_bound_match());
    let root = request("GET", "/apix", &[]);
    assert_eq!(bound(&set, &AT, "sleep", Some(&root)), no_bound_match());
    assert_eq!(
        no_bound_match().reason.to_string(),
        "no ALLOW policy with targetRefs matched at waypoint foo/wp"
    );
    // Only requests to that service: not another service, nor a workload address.
    for service in [Some(("foo", "other")), None] {
        let at = WaypointBinding { service, ..AT };
        assert_eq!(bound(&set, &at, "other", Some(&get)), no_bound_policies());
    }
}

#[test]
fn not_paths_and_header_conditions() {
    let not_admin = ap(
        "foo",
        "not-admin",
        "{targetRefs: [{kind: Service, name: httpbin}], rules: [{to: [{operation: {notPaths: \
         ['/admin*']}}]}]}",
    );
    let (set, _) = policy_set(&not_admin);
    let svc = binding(TargetKind::Service, "foo/httpbin");
    let public = request("GET", "/public", &[]);
    assert_eq!(
        bound(&set, &AT, "sleep", Some(&public)),
        allowed("foo/not-admin", 0, svc.clone())
    );
    let admin = request("GET", "/admin/users", &[]);
    assert_eq!(bound(&set, &AT, "sleep", Some(&admin)), no_bound_match());

    let header = ap(
        "foo",
        "canary-only",
        "{targetRefs: [{kind: Gateway, group: gateway.networking.k8s.io, name: wp}], action: \
         DENY, rules: [{when: [{key: 'request.headers[X-Env]', notValues: [canary]}]}]}",
    );
    let (set, _) = policy_set(&header);
    let gw = binding(TargetKind::Gateway, "foo/wp");
    let canary = request("GET", "/", &[("x-env", "canary")]);
    assert_eq!(
        bound(&set, &AT, "sleep", Some(&canary)),
        no_bound_policies()
    );
    let prod = request("GET", "/", &[("X-Env", "prod")]);
    assert_eq!(
        bound(&set, &AT, "sleep", Some(&prod)),
        denied("foo/canary-only", 0, gw.clone())
    );
    let none = request("GET", "/", &[]);
    assert_eq!(
        bound(&set, &AT, "sleep", Some(&none)),
        denied("foo/canary-only", 0, gw)
    );
}

#[test]
fn both_bound_sets_combine_deny_first() {
    // A Gateway-bound DENY and a Service-bound ALLOW: the DENY wins, then the ALLOW must match.
    let (set, _) = policy_set(&(no_delete() + &get_api()));
    let delete = request("DELETE", "/api/x", &[]);
    assert_eq!(
        bound(&set, &AT, "sleep", Some(&delete)),
        denied("foo/no-delete", 0, binding(TargetKind::Gateway, "foo/wp"))
    );
    let get = request("GET", "/api/x", &[]);
    assert!(bound(&set, &AT, "sleep", Some(&get)).is_allowed());
    assert_eq!(bound(&set, &AT, "other", Some(&get)), no_bound_match());
    // A policy bound to both names its Gateway binding.
    let both = ap(
        "foo",
        "both",
        "{targetRefs: [{kind: Service, name: httpbin}, {kind: Gateway, group: \
         gateway.networking.k8s.io, name: wp}], rules: [{}]}",
    );
    let (set, _) = policy_set(&both);
    assert_eq!(
        bound(&set, &AT, "sleep", Some(&get)),
        allowed("foo/both", 0, binding(TargetKind::Gateway, "foo/wp"))
    );
}

/// Istio's rule for TCP at a waypoint: an ALLOW rule with HTTP-only fields matches nothing; a
/// DENY rule ignores them and applies the rest.
#[test]
fn tcp_streams_follow_istios_rule_for_http_only_fields() {
    let svc = "{targetRefs: [{kind: Service, name: httpbin}]";
    let policy = |name: &str, rest: &str| ap("foo", name, &format!("{svc}, {rest}}}"));
    // ALLOW: the rule with `methods` never matches TCP, even OR-ed with a matching port.
    let (set, _) = policy_set(&policy(
        "a",
        "rules: [{to: [{operation: {methods: [GET]}}, {operation: {ports: ['80']}}]}]",
    ));
    assert_eq!(bound(&set, &AT, "sleep", None), no_bound_match());
    // ... while a rule without HTTP fields still does.
    let (set, _) = policy_set(&policy(
        "a",
        "rules: [{to: [{operation: {methods: [GET]}}]}, {to: [{operation: {ports: ['80']}}]}]",
    ));
    assert_eq!(
        bound(&set, &AT, "sleep", None),
        allowed("foo/a", 1, binding(TargetKind::Service, "foo/httpbin"))
    );
    // DENY: `methods: [DELETE]` alone denies every TCP stream...
    let (set, _) = policy_set(&policy(
        "d",
        "action: DENY, rules: [{to: [{operation: {methods: [DELETE]}}]}]",
    ));
    assert!(!bound(&set, &AT, "sleep", None).is_allowed());
    // ... `notPaths` and header conditions are ignored likewise ...
    let (set, _) = policy_set(&policy(
        "d",
        "action: DENY, rules: [{to: [{operation: {notPaths: [/public]}}], when: [{key: \
         'request.headers[x-a]', values: [b]}]}]",
    ));
    assert!(!bound(&set, &AT, "sleep", None).is_allowed());
    // ... and the rest of the rule still applies: another port, or another source, is spared.
    let (set, _) = policy_set(&policy(
        "d",
        "action: DENY, rules: [{to: [{operation: {methods: [DELETE], ports: ['9090']}}]}]",
    ));
    assert_eq!(bound(&set, &AT, "sleep", None), no_bound_policies());
    let (set, _) = policy_set(&policy(
        "d",
        "action: DENY, rules: [{from: [{source: {principals: [cluster.local/ns/foo/sa/x]}}], \
         to: [{operation: {methods: [DELETE]}}]}]",
    ));
    assert_eq!(bound(&set, &AT, "sleep", None), no_bound_policies());
    // remoteIpBlocks is the source address, on TCP too.
    let (set, _) = policy_set(&policy(
        "r",
        "rules: [{from: [{source: {remoteIpBlocks: [10.1.0.0/16]}}]}]",
    ));
    assert!(bound(&set, &AT, "sleep", None).is_allowed());
}

/// Node agents never enforce a bound policy: it selects no workload, even one named like its
/// target, and its L7 fields raise no "needs a waypoint" warning.
#[test]
fn node_agents_ignore_bound_policies() {
    let deny_all_to_httpbin = ap(
        "foo",
        "deny",
        "{targetRefs: [{kind: Service, name: httpbin}], action: DENY, rules: [{}]}",
    );
    let (set, warnings) = policy_set(&(deny_all_to_httpbin + &get_api()));
    assert!(warnings.is_empty(), "{warnings:?}");
    assert_eq!(decide(&set, &SLEEP, &HTTPBIN, None), no_policies());
    let get = request("GET", "/", &[]);
    assert_eq!(decide(&set, &CLIENT, &HTTPBIN, Some(&get)), no_policies());
    // A selector policy next to them still applies.
    let (set, _) = policy_set(&(get_api() + &ap("foo", "ns", "{rules: [{}]}")));
    assert_eq!(
        decide(&set, &SLEEP, &HTTPBIN, None),
        allowed_by("foo/ns", 0)
    );
}

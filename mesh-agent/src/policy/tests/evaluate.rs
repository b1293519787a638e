//! The evaluation table: every case asserts the verdict and the reason.
use super::{ap, ip, pa, policy_set, workload};
use crate::identity::Identity;
use crate::policy::{Decision, HttpAttributes, PolicySet, Reason, Request};

/// The connecting side.
pub(super) struct Peer {
    identity: Option<(&'static str, &'static str)>,
    ip: &'static str,
}

/// `sleep` in `foo`, over HBONE.
pub(super) const SLEEP: Peer = mtls("foo", "sleep", "10.1.0.5");
/// `client` in `bar`, over HBONE.
pub(super) const CLIENT: Peer = mtls("bar", "client", "10.3.0.7");
/// A plaintext client outside the mesh.
pub(super) const PLAIN: Peer = plain("192.168.1.20");

const fn mtls(namespace: &'static str, sa: &'static str, ip: &'static str) -> Peer {
    Peer {
        identity: Some((namespace, sa)),
        ip,
    }
}

pub(super) const fn plain(ip: &'static str) -> Peer {
    Peer { identity: None, ip }
}

/// The destination: a workload of `namespace` with `labels`, and the port.
pub(super) struct Target {
    namespace: &'static str,
    labels: &'static [(&'static str, &'static str)],
    ip: &'static str,
    port: u16,
}

const HTTPBIN_LABELS: &[(&str, &str)] = &[("app", "httpbin"), ("version", "v1")];

/// `httpbin` in `foo`, labels app=httpbin,version=v1, at 10.2.0.10.
const fn httpbin(port: u16) -> Target {
    Target {
        namespace: "foo",
        labels: HTTPBIN_LABELS,
        ip: "10.2.0.10",
        port,
    }
}

pub(super) const HTTPBIN: Target = httpbin(8080);

struct Case {
    name: &'static str,
    policies: String,
    from: Peer,
    to: Target,
    expect: Decision,
}

fn allow(reason: Reason) -> Decision {
    Decision::allow(reason)
}

pub(super) fn deny(reason: Reason) -> Decision {
    Decision::deny(reason)
}

pub(super) fn allowed_by(policy: &str, rule: usize) -> Decision {
    allow(Reason::AllowedBy {
        policy: policy.to_string(),
        rule,
        bound: None,
    })
}

pub(super) fn denied_by(policy: &str, rule: usize) -> Decision {
    deny(Reason::DeniedBy {
        policy: policy.to_string(),
        rule,
        bound: None,
    })
}

pub(super) fn no_match() -> Decision {
    deny(Reason::NoAllowPolicyMatched)
}

pub(super) fn no_policies() -> Decision {
    allow(Reason::NoPolicies)
}

pub(super) fn l7(policy: &str, fields: &[&str]) -> Decision {
    deny(Reason::L7PolicyWithoutWaypoint {
        policy: policy.to_string(),
        fields: fields.iter().map(|f| f.to_string()).collect(),
    })
}

/// An ALLOW policy `foo/allow` with one rule `{from: [{source: SOURCE}]}`.
pub(super) fn allow_from(source: &str) -> String {
    ap(
        "foo",
        "allow",
        &format!("{{rules: [{{from: [{{source: {source}}}]}}]}}"),
    )
}

/// A DENY policy `foo/deny` with one rule `{from: [{source: SOURCE}]}`.
pub(super) fn deny_from(source: &str) -> String {
    ap(
        "foo",
        "deny",
        &format!("{{action: DENY, rules: [{{from: [{{source: {source}}}]}}]}}"),
    )
}

/// An ALLOW policy `foo/allow` with one rule `{when: [CONDITION]}`.
pub(super) fn allow_when(condition: &str) -> String {
    ap(
        "foo",
        "allow",
        &format!("{{rules: [{{when: [{condition}]}}]}}"),
    )
}

fn case(name: &'static str, policies: String, from: Peer, to: Target, expect: Decision) -> Case {
    Case {
        name,
        policies,
        from,
        to,
        expect,
    }
}

// One row per case reads better than rustfmt's layout.
#[rustfmt::skip]
fn cases() -> Vec<Case> {
    let strict_mesh = pa("istio-system", "mesh", "{mtls: {mode: STRICT}}");
    vec![
        // Defaults and empty policies.
        case("no policy, mTLS", String::new(), SLEEP, HTTPBIN, no_policies()),
        case("no policy, plaintext", String::new(), PLAIN, HTTPBIN, no_policies()),
        case("ALLOW without rules denies all", ap("foo", "allow-nothing", "{}"), SLEEP, HTTPBIN, no_match()),
        case("ALLOW with rule {} allows all", ap("foo", "allow-all", "{rules: [{}]}"), PLAIN, HTTPBIN, allowed_by("foo/allow-all", 0)),
        case("DENY with rule {} denies all", ap("foo", "deny-all", "{action: DENY, rules: [{}]}"), SLEEP, HTTPBIN, denied_by("foo/deny-all", 0)),
        case("DENY without rules never denies", ap("foo", "deny-nothing", "{action: DENY}"), SLEEP, HTTPBIN, no_policies()),
        // principals / notPrincipals.
        case("principals exact", allow_from("{principals: [cluster.local/ns/foo/sa/sleep]}"), SLEEP, HTTPBIN, allowed_by("foo/allow", 0)),
        case("principals exact, other peer", allow_from("{principals: [cluster.local/ns/foo/sa/sleep]}"), CLIENT, HTTPBIN, no_match()),
        case("principals written with spiffe://", allow_from("{principals: ['spiffe://cluster.local/ns/foo/sa/sleep']}"), SLEEP, HTTPBIN, allowed_by("foo/allow", 0)),
        case("principals prefix*", allow_from("{principals: ['cluster.local/ns/foo/*']}"), SLEEP, HTTPBIN, allowed_by("foo/allow", 0)),
        case("principals *suffix", allow_from("{principals: ['*/sa/client']}"), CLIENT, HTTPBIN, allowed_by("foo/allow", 0)),
        case("principals * needs an identity", allow_from("{principals: ['*']}"), PLAIN, HTTPBIN, no_match()),
        case("principals * with mTLS", allow_from("{principals: ['*']}"), CLIENT, HTTPBIN, allowed_by("foo/allow", 0)),
        case("notPrincipals excludes the peer", allow_from("{notPrincipals: [cluster.local/ns/foo/sa/sleep]}"), SLEEP, HTTPBIN, no_match()),
        case("notPrincipals, other peer", allow_from("{notPrincipals: [cluster.local/ns/foo/sa/sleep]}"), CLIENT, HTTPBIN, allowed_by("foo/allow", 0)),
        case("DENY notPrincipals * rejects plaintext", deny_from("{notPrincipals: ['*']}"), PLAIN, HTTPBIN, denied_by("foo/deny", 0)),
        case("DENY notPrincipals * passes mTLS", deny_from("{notPrincipals: ['*']}"), SLEEP, HTTPBIN, no_policies()),
        // namespaces / notNamespaces.
        case("namespaces exact", allow_from("{namespaces: [foo]}"), SLEEP, HTTPBIN, allowed_by("foo/allow", 0)),
        case("namespaces, other namespace", allow_from("{namespaces: [foo]}"), CLIENT, HTTPBIN, no_match()),
        case("namespaces never match plaintext", allow_from("{namespaces: [foo]}"), PLAIN, HTTPBIN, no_match()),
        case("namespaces prefix*", allow_from("{namespaces: ['ba*']}"), CLIENT, HTTPBIN, allowed_by("foo/allow", 0)),
        case("namespaces: values OR-ed", allow_from("{namespaces: [baz, bar]}"), CLIENT, HTTPBIN, allowed_by("foo/allow", 0)),
        case("DENY notNamespaces, outsider", deny_from("{notNamespaces: [foo]}"), CLIENT, HTTPBIN, denied_by("foo/deny", 0)),
        case("DENY notNamespaces, insider", deny_from("{notNamespaces: [foo]}"), SLEEP, HTTPBIN, no_policies()),
        case("notNamespaces matches plaintext", allow_from("{notNamespaces: [bar]}"), PLAIN, HTTPBIN, allowed_by("foo/allow", 0)),
        // ipBlocks / notIpBlocks.
        case("ipBlocks CIDR", allow_from("{ipBlocks: [10.1.0.0/16]}"), SLEEP, HTTPBIN, allowed_by("foo/allow", 0)),
        case("ipBlocks CIDR, outside", allow_from("{ipBlocks: [10.1.0.0/16]}"), CLIENT, HTTPBIN, no_match()),
        case("ipBlocks single address, plaintext", allow_from("{ipBlocks: [192.168.1.20]}"), PLAIN, HTTPBIN, allowed_by("foo/allow", 0)),
        case("ipBlocks IPv6", allow_from("{ipBlocks: ['fd00::/64']}"), plain("fd00::5"), HTTPBIN, allowed_by("foo/allow", 0)),
        case("ipBlocks IPv4 vs IPv6 source", allow_from("{ipBlocks: [0.0.0.0/0]}"), plain("fd00::5"), HTTPBIN, no_match()),
        case("ipBlocks IPv4-mapped source", allow_from("{ipBlocks: [10.1.0.0/16]}"), plain("::ffff:10.1.0.5"), HTTPBIN, allowed_by("foo/allow", 0)),
        case("DENY notIpBlocks", deny_from("{notIpBlocks: [10.0.0.0/8]}"), PLAIN, HTTPBIN, denied_by("foo/deny", 0)),
        case("DENY notIpBlocks, inside", deny_from("{notIpBlocks: [10.0.0.0/8]}"), SLEEP, HTTPBIN, no_policies()),
        // ports / notPorts.
        case("ports", ap("foo", "allow", "{rules: [{to: [{operation: {ports: ['8080']}}]}]}"), PLAIN, HTTPBIN, allowed_by("foo/allow", 0)),
        case("ports, other port", ap("foo", "allow", "{rules: [{to: [{operation: {ports: ['8080']}}]}]}"), PLAIN, httpbin(9090), no_match()),
        case("DENY notPorts, other port", ap("foo", "deny", "{action: DENY, rules: [{to: [{operation: {notPorts: [8080]}}]}]}"), SLEEP, httpbin(9090), denied_by("foo/deny", 0)),
        case("DENY notPorts, listed port", ap("foo", "deny", "{action: DENY, rules: [{to: [{operation: {notPorts: [8080]}}]}]}"), SLEEP, HTTPBIN, no_policies()),
        case("to entries OR-ed", ap("foo", "allow", "{rules: [{to: [{operation: {ports: ['1']}}, {operation: {ports: ['8080']}}]}]}"), SLEEP, HTTPBIN, allowed_by("foo/allow", 0)),
        // Combinations inside a rule and across rules.
        case("from AND to", ap("foo", "allow", "{rules: [{from: [{source: {namespaces: [foo]}}], to: [{operation: {ports: ['9090']}}]}]}"), SLEEP, HTTPBIN, no_match()),
        case("source fields AND-ed", allow_from("{principals: [cluster.local/ns/foo/sa/sleep], ipBlocks: [10.3.0.0/16]}"), SLEEP, HTTPBIN, no_match()),
        case("from entries OR-ed", ap("foo", "allow", "{rules: [{from: [{source: {namespaces: [bar]}}, {source: {ipBlocks: [10.1.0.0/16]}}]}]}"), SLEEP, HTTPBIN, allowed_by("foo/allow", 0)),
        case("rules OR-ed, second matches", ap("foo", "allow", "{rules: [{from: [{source: {namespaces: [bar]}}]}, {to: [{operation: {ports: ['8080']}}]}]}"), SLEEP, HTTPBIN, allowed_by("foo/allow", 1)),
        // when.
        case("when source.ip", allow_when("{key: source.ip, values: [10.1.0.0/16]}"), SLEEP, HTTPBIN, allowed_by("foo/allow", 0)),
        case("when source.ip notValues", allow_when("{key: source.ip, notValues: [10.1.0.0/16]}"), SLEEP, HTTPBIN, no_match()),
        case("when source.namespace", allow_when("{key: source.namespace, values: [bar]}"), CLIENT, HTTPBIN, allowed_by("foo/allow", 0)),
        case("when source.namespace notValues", allow_when("{key: source.namespace, notValues: [bar]}"), CLIENT, HTTPBIN, no_match()),
        case("when source.principal", allow_when("{key: source.principal, values: ['spiffe://cluster.local/ns/foo/*']}"), SLEEP, HTTPBIN, allowed_by("foo/allow", 0)),
        case("when source.principal, plaintext", allow_when("{key: source.principal, values: ['*']}"), PLAIN, HTTPBIN, no_match()),
        case("when destination.port", allow_when("{key: destination.port, values: ['9090']}"), SLEEP, httpbin(9090), allowed_by("foo/allow", 0)),
        case("when destination.ip", allow_when("{key: destination.ip, values: [10.2.0.0/16]}"), SLEEP, HTTPBIN, allowed_by("foo/allow", 0)),
        case("when destination.ip, other address", allow_when("{key: destination.ip, values: [10.2.0.0/16]}"), SLEEP, Target { ip: "10.9.0.1", ..HTTPBIN }, no_match()),
        case("when conditions AND-ed", ap("foo", "allow", "{rules: [{when: [{key: source.namespace, values: [foo]}, {key: destination.port, values: ['1']}]}]}"), SLEEP, HTTPBIN, no_match()),
        // Precedence between policies.
        case("DENY overrides ALLOW", ap("foo", "allow-all", "{rules: [{}]}") + &deny_from("{namespaces: [foo]}"), SLEEP, HTTPBIN, denied_by("foo/deny", 0)),
        case("ALLOW applies when DENY does not match", ap("foo", "allow-all", "{rules: [{}]}") + &deny_from("{namespaces: [bar]}"), SLEEP, HTTPBIN, allowed_by("foo/allow-all", 0)),
        case("second ALLOW policy matches", allow_from("{namespaces: [bar]}") + &ap("foo", "allow-2", "{rules: [{from: [{source: {namespaces: [foo]}}]}]}"), SLEEP, HTTPBIN, allowed_by("foo/allow-2", 0)),
        case("first matching DENY is reported", ap("foo", "deny-1", "{action: DENY, rules: [{to: [{operation: {ports: ['1']}}]}, {}]}") + &ap("foo", "deny-2", "{action: DENY, rules: [{}]}"), SLEEP, HTTPBIN, denied_by("foo/deny-1", 1)),
        // Scope.
        case("policy of another namespace", ap("bar", "allow-nothing", "{}"), SLEEP, HTTPBIN, no_policies()),
        case("mesh-wide policy", ap("istio-system", "allow-nothing", "{}"), SLEEP, HTTPBIN, no_match()),
        case("root-namespace selector reaches every namespace", ap("istio-system", "deny-httpbin", "{selector: {matchLabels: {app: httpbin}}, action: DENY, rules: [{}]}"), SLEEP, HTTPBIN, denied_by("istio-system/deny-httpbin", 0)),
        case("selector of another workload", ap("foo", "allow-nothing", "{selector: {matchLabels: {app: other}}}"), SLEEP, HTTPBIN, no_policies()),
        case("selector with all labels present", ap("foo", "allow-nothing", "{selector: {matchLabels: {app: httpbin, version: v1}}}"), SLEEP, HTTPBIN, no_match()),
        case("selector with one label missing", ap("foo", "allow-nothing", "{selector: {matchLabels: {app: httpbin, tier: db}}}"), SLEEP, HTTPBIN, no_policies()),
        case("selector in another namespace", ap("bar", "allow-nothing", "{selector: {matchLabels: {app: httpbin}}}"), SLEEP, HTTPBIN, no_policies()),
        case("empty matchLabels is namespace-wide", ap("foo", "allow-nothing", "{selector: {matchLabels: {}}}"), SLEEP, HTTPBIN, no_match()),
        // L7 without a waypoint.
        case("L7 ALLOW policy denies", ap("foo", "get-only", "{rules: [{to: [{operation: {methods: [GET]}}]}]}"), SLEEP, HTTPBIN, l7("foo/get-only", &["methods"])),
        case("L7 DENY policy denies", ap("foo", "no-admin", "{action: DENY, rules: [{to: [{operation: {paths: ['/admin*']}}]}]}"), SLEEP, HTTPBIN, l7("foo/no-admin", &["paths"])),
        case("L7 checked before DENY", deny_from("{namespaces: [foo]}") + &ap("foo", "get", "{rules: [{to: [{operation: {methods: [GET]}}]}]}"), SLEEP, HTTPBIN, l7("foo/get", &["methods"])),
        case("L7 policy of another workload", ap("foo", "get-only", "{selector: {matchLabels: {app: other}}, rules: [{to: [{operation: {methods: [GET]}}]}]}"), SLEEP, HTTPBIN, no_policies()),
        // mTLS modes.
        case("STRICT rejects plaintext", strict_mesh.clone(), PLAIN, HTTPBIN, deny(Reason::StrictMtls)),
        case("STRICT accepts mTLS", strict_mesh.clone(), SLEEP, HTTPBIN, no_policies()),
        case("STRICT before ALLOW", strict_mesh.clone() + &ap("foo", "allow-all", "{rules: [{}]}"), PLAIN, HTTPBIN, deny(Reason::StrictMtls)),
        case("PERMISSIVE: plaintext subject to ALLOW", pa("foo", "ns", "{mtls: {mode: PERMISSIVE}}") + &allow_from("{principals: ['*']}"), PLAIN, HTTPBIN, no_match()),
        case("namespace PERMISSIVE over mesh STRICT", strict_mesh.clone() + &pa("foo", "ns", "{mtls: {mode: PERMISSIVE}}"), PLAIN, HTTPBIN, no_policies()),
        case("workload STRICT over namespace PERMISSIVE", pa("foo", "ns", "{mtls: {mode: PERMISSIVE}}") + &pa("foo", "httpbin", "{selector: {matchLabels: {app: httpbin}}, mtls: {mode: STRICT}}"), PLAIN, HTTPBIN, deny(Reason::StrictMtls)),
        case("portLevelMtls PERMISSIVE port", pa("foo", "httpbin", "{selector: {matchLabels: {app: httpbin}}, mtls: {mode: STRICT}, portLevelMtls: {9090: {mode: PERMISSIVE}}}"), PLAIN, httpbin(9090), no_policies()),
        case("portLevelMtls, other port", pa("foo", "httpbin", "{selector: {matchLabels: {app: httpbin}}, mtls: {mode: STRICT}, portLevelMtls: {9090: {mode: PERMISSIVE}}}"), PLAIN, HTTPBIN, deny(Reason::StrictMtls)),
        case("DISABLE reads as PERMISSIVE", strict_mesh.clone() + &pa("foo", "ns", "{mtls: {mode: DISABLE}}"), PLAIN, HTTPBIN, no_policies()),
    ]
}

/// `set`'s decision for a connection (or, with `http`, a request) from `from` to `to`.
pub(super) fn decide(
    set: &PolicySet,
    from: &Peer,
    to: &Target,
    http: Option<&HttpAttributes>,
) -> Decision {
    let dst = workload(to.namespace, "httpbin", to.labels);
    let identity = from
        .identity
        .map(|(ns, sa)| Identity::new("cluster.local", ns, sa));
    set.evaluate(&Request {
        dst: &dst,
        dst_ip: ip(to.ip),
        dst_port: to.port,
        src_ip: ip(from.ip),
        src: identity.as_ref(),
        http,
    })
}

#[test]
fn evaluation_table() {
    let cases = cases();
    assert!(cases.len() >= 40, "only {} cases", cases.len());
    let mut failures = Vec::new();
    for case in &cases {
        let (set, _) = policy_set(&case.policies);
        let got = decide(&set, &case.from, &case.to, None);
        if got != case.expect {
            failures.push(format!(
                "{}: expected {}, got {}",
                case.name, case.expect, got
            ));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn case_names_are_unique() {
    let cases = cases();
    let mut names: Vec<_> = cases.iter().map(|c| c.name).collect();
    names.sort_unstable();
    names.dedup();
    assert_eq!(names.len(), cases.len());
}

#[test]
fn reasons_read_as_operator_text() {
    let texts = [
        (
            denied_by("foo/deny-ns", 0).reason,
            "denied by AuthorizationPolicy foo/deny-ns rules[0]",
        ),
        (
            allowed_by("foo/allow", 2).reason,
            "allowed by AuthorizationPolicy foo/allow rules[2]",
        ),
        (Reason::NoAllowPolicyMatched, "no ALLOW policy matched"),
        (
            Reason::NoPolicies,
            "no ALLOW policy applies to the workload",
        ),
        (Reason::StrictMtls, "STRICT mTLS: plaintext rejected"),
        (
            l7("foo/bar", &["methods"]).reason,
            "AuthorizationPolicy foo/bar uses L7 fields (methods) and no waypoint serves this \
             workload",
        ),
    ];
    for (reason, text) in texts {
        assert_eq!(reason.to_string(), text);
    }
    assert_eq!(no_match().to_string(), "deny: no ALLOW policy matched");
}

//! L7 fields evaluated with HTTP attributes (a waypoint's view): the table asserts the verdict
//! and the reason of each case; without the attributes the same policies still deny at L4.
use http::{HeaderMap, HeaderName, HeaderValue};

use super::evaluate::{
    allow_from, allow_when, allowed_by, decide, denied_by, deny, deny_from, l7, no_match,
    no_policies, Peer, CLIENT, HTTPBIN, PLAIN, SLEEP,
};
use super::{ap, pa, policy_set};
use crate::policy::{Decision, HttpAttributes, Reason};

/// The request on the connection.
#[derive(Clone, Copy)]
struct Http {
    method: &'static str,
    path: &'static str,
    host: &'static str,
    headers: &'static [(&'static str, &'static str)],
}

/// `GET <path>` to `httpbin.foo`, without other headers.
const fn get(path: &'static str) -> Http {
    Http {
        method: "GET",
        path,
        host: "httpbin.foo",
        headers: &[],
    }
}

impl Http {
    const fn method(self, method: &'static str) -> Http {
        Http { method, ..self }
    }

    const fn host(self, host: &'static str) -> Http {
        Http { host, ..self }
    }

    const fn headers(self, headers: &'static [(&'static str, &'static str)]) -> Http {
        Http { headers, ..self }
    }

    fn attributes(&self) -> HttpAttributes {
        let mut headers = HeaderMap::new();
        for (name, value) in self.headers {
            headers.append(
                HeaderName::from_bytes(name.as_bytes()).unwrap(),
                HeaderValue::from_static(value),
            );
        }
        HttpAttributes {
            method: self.method.to_string(),
            path: self.path.to_string(),
            host: self.host.to_string(),
            headers,
        }
    }
}

const GET: Http = get("/");

struct Case {
    name: &'static str,
    policies: String,
    from: Peer,
    http: Http,
    expect: Decision,
}

fn case(name: &'static str, policies: String, from: Peer, http: Http, expect: Decision) -> Case {
    Case {
        name,
        policies,
        from,
        http,
        expect,
    }
}

/// An ALLOW policy `foo/allow` with one rule `{to: [{operation: OPERATION}]}`.
fn allow_to(operation: &str) -> String {
    ap(
        "foo",
        "allow",
        &format!("{{rules: [{{to: [{{operation: {operation}}}]}}]}}"),
    )
}

/// A DENY policy `foo/deny` with one rule `{to: [{operation: OPERATION}]}`.
fn deny_to(operation: &str) -> String {
    ap(
        "foo",
        "deny",
        &format!("{{action: DENY, rules: [{{to: [{{operation: {operation}}}]}}]}}"),
    )
}

/// A DENY policy `foo/deny` with one rule `{when: [CONDITION]}`.
fn deny_when(condition: &str) -> String {
    ap(
        "foo",
        "deny",
        &format!("{{action: DENY, rules: [{{when: [{condition}]}}]}}"),
    )
}

/// `foo/allow-all`, so that a DENY policy that does not match lets the request through with a
/// reason naming this policy.
fn allow_all() -> String {
    ap("foo", "allow-all", "{rules: [{}]}")
}

// One row per case reads better than rustfmt's layout.
#[rustfmt::skip]
fn cases() -> Vec<Case> {
    let allowed = || allowed_by("foo/allow", 0);
    let denied = || denied_by("foo/deny", 0);
    let through = || allowed_by("foo/allow-all", 0);
    vec![
        // methods / notMethods: exact and case-sensitive.
        case("methods exact", allow_to("{methods: [GET]}"), SLEEP, GET, allowed()),
        case("methods, other method", allow_to("{methods: [GET]}"), SLEEP, GET.method("POST"), no_match()),
        case("methods are case-sensitive", allow_to("{methods: [GET]}"), SLEEP, GET.method("get"), no_match()),
        case("methods: values OR-ed", allow_to("{methods: [POST, GET]}"), SLEEP, GET, allowed()),
        case("notMethods excludes the method", allow_to("{notMethods: [DELETE]}"), SLEEP, GET.method("DELETE"), no_match()),
        case("notMethods, other method", allow_to("{notMethods: [DELETE]}"), SLEEP, GET, allowed()),
        case("DENY notMethods, other method", deny_to("{notMethods: [GET, HEAD]}"), SLEEP, GET.method("POST"), denied()),
        case("DENY notMethods, listed method", deny_to("{notMethods: [GET, HEAD]}"), SLEEP, GET, no_policies()),
        // paths / notPaths: Istio string match on the path without its query.
        case("paths exact", allow_to("{paths: [/info]}"), SLEEP, get("/info"), allowed()),
        case("paths exact, longer path", allow_to("{paths: [/info]}"), SLEEP, get("/info/x"), no_match()),
        case("paths ignore the query", allow_to("{paths: [/info]}"), SLEEP, get("/info?user=1"), allowed()),
        case("paths never see the query", allow_to("{paths: ['/info?user=1']}"), SLEEP, get("/info?user=1"), no_match()),
        case("paths are case-sensitive", allow_to("{paths: [/info]}"), SLEEP, get("/INFO"), no_match()),
        case("paths prefix*", allow_to("{paths: ['/api/*']}"), SLEEP, get("/api/v1/users"), allowed()),
        case("paths prefix*, other prefix", allow_to("{paths: ['/api/*']}"), SLEEP, get("/apix"), no_match()),
        case("paths *suffix, before the query", allow_to("{paths: ['*.png']}"), SLEEP, get("/img/a.png?size=2"), allowed()),
        case("paths *suffix, other suffix", allow_to("{paths: ['*.png']}"), SLEEP, get("/a.png.exe"), no_match()),
        case("paths * matches any path", allow_to("{paths: ['*']}"), SLEEP, get("/anything?at=all"), allowed()),
        case("paths * needs a path", allow_to("{paths: ['*']}"), SLEEP, get("?only=query"), no_match()),
        case("notPaths excludes the path", allow_to("{notPaths: ['/admin*']}"), SLEEP, get("/admin/users"), no_match()),
        case("notPaths, other path", allow_to("{notPaths: ['/admin*']}"), SLEEP, get("/public"), allowed()),
        case("DENY notPaths, other path", deny_to("{notPaths: ['/healthz']}"), SLEEP, get("/admin"), denied()),
        case("DENY notPaths, listed path with a query", deny_to("{notPaths: ['/healthz']}"), SLEEP, get("/healthz?full=1"), no_policies()),
        // Path templates are not supported: fail closed.
        case("ALLOW paths template never matches", allow_to("{paths: ['/api/{*}/x']}"), SLEEP, get("/api/v1/x"), no_match()),
        case("ALLOW paths template is not literal", allow_to("{paths: ['/api/{*}/x']}"), SLEEP, get("/api/{*}/x"), no_match()),
        case("DENY paths template denies", deny_to("{paths: ['/api/{**}']}") + &allow_all(), SLEEP, get("/public"), denied()),
        // hosts / notHosts: case-insensitive, with or without the port.
        case("hosts exact", allow_to("{hosts: [httpbin.foo]}"), SLEEP, GET, allowed()),
        case("hosts ignore case", allow_to("{hosts: [httpbin.foo]}"), SLEEP, GET.host("HTTPBIN.Foo"), allowed()),
        case("hosts ignore the port", allow_to("{hosts: [httpbin.foo]}"), SLEEP, GET.host("httpbin.foo:8080"), allowed()),
        case("hosts host:* idiom", allow_to("{hosts: ['httpbin.foo:*']}"), SLEEP, GET.host("httpbin.foo:8080"), allowed()),
        case("hosts host:* idiom ignores case", allow_to("{hosts: ['httpbin.foo:*']}"), SLEEP, GET.host("HTTPBIN.Foo:8080"), allowed()),
        case("hosts, other host", allow_to("{hosts: [httpbin.foo]}"), SLEEP, GET.host("httpbin.foo.evil"), no_match()),
        case("hosts *suffix", allow_to("{hosts: ['*.example.com']}"), SLEEP, GET.host("API.Example.com:443"), allowed()),
        case("hosts *suffix, the bare domain", allow_to("{hosts: ['*.example.com']}"), SLEEP, GET.host("example.com"), no_match()),
        case("hosts prefix*", allow_to("{hosts: ['httpbin.*']}"), SLEEP, GET.host("httpbin.foo.svc.cluster.local"), allowed()),
        case("hosts IPv6 with a port", allow_to("{hosts: ['[fd00::1]']}"), SLEEP, GET.host("[fd00::1]:8080"), allowed()),
        case("DENY notHosts, other host", deny_to("{notHosts: [httpbin.foo]}"), SLEEP, GET.host("evil.example"), denied()),
        case("DENY notHosts, listed host in another case and with a port", deny_to("{notHosts: [httpbin.foo]}"), SLEEP, GET.host("HTTPBIN.FOO:8080"), no_policies()),
        // remoteIpBlocks: the source IP.
        case("remoteIpBlocks, source inside", allow_from("{remoteIpBlocks: [10.1.0.0/16]}"), SLEEP, GET, allowed()),
        case("remoteIpBlocks, source outside", allow_from("{remoteIpBlocks: [10.1.0.0/16]}"), CLIENT, GET, no_match()),
        case("remoteIpBlocks ignore X-Forwarded-For", allow_from("{remoteIpBlocks: [203.0.113.0/24]}"), SLEEP, GET.headers(&[("x-forwarded-for", "203.0.113.9")]), no_match()),
        case("DENY notRemoteIpBlocks, outside", deny_from("{notRemoteIpBlocks: [10.0.0.0/8]}"), PLAIN, GET, denied()),
        case("DENY notRemoteIpBlocks, inside", deny_from("{notRemoteIpBlocks: [10.0.0.0/8]}"), SLEEP, GET, no_policies()),
        case("ALLOW remoteIpBlocks malformed never matches", allow_from("{remoteIpBlocks: [not-an-ip]}"), SLEEP, GET, no_match()),
        case("DENY notRemoteIpBlocks malformed denies", deny_from("{notRemoteIpBlocks: [not-an-ip]}") + &allow_all(), SLEEP, GET, denied()),
        // when request.headers[...]: the name in any case, the values case-sensitive.
        case("when header", allow_when("{key: 'request.headers[X-User]', values: [alice]}"), SLEEP, GET.headers(&[("x-user", "alice")]), allowed()),
        case("when header name in any case", allow_when("{key: 'request.headers[x-USER]', values: [alice]}"), SLEEP, GET.headers(&[("X-User", "alice")]), allowed()),
        case("when header values are case-sensitive", allow_when("{key: 'request.headers[x-user]', values: [alice]}"), SLEEP, GET.headers(&[("x-user", "Alice")]), no_match()),
        case("when header prefix*", allow_when("{key: 'request.headers[User-Agent]', values: ['Mozilla/*']}"), SLEEP, GET.headers(&[("user-agent", "Mozilla/5.0")]), allowed()),
        case("when header missing", allow_when("{key: 'request.headers[x-user]', values: [alice]}"), SLEEP, GET, no_match()),
        case("when header * needs the header", allow_when("{key: 'request.headers[x-user]', values: ['*']}"), SLEEP, GET, no_match()),
        case("when header * with the header", allow_when("{key: 'request.headers[x-user]', values: ['*']}"), SLEEP, GET.headers(&[("x-user", "bob")]), allowed()),
        case("when header repeated: values joined", allow_when("{key: 'request.headers[x-user]', values: ['alice,bob']}"), SLEEP, GET.headers(&[("x-user", "alice"), ("x-user", "bob")]), allowed()),
        case("when header notValues, listed", allow_when("{key: 'request.headers[x-user]', notValues: [bob]}"), SLEEP, GET.headers(&[("x-user", "bob")]), no_match()),
        case("when header notValues, other value", allow_when("{key: 'request.headers[x-user]', notValues: [bob]}"), SLEEP, GET.headers(&[("x-user", "alice")]), allowed()),
        case("when header notValues, header missing", allow_when("{key: 'request.headers[x-user]', notValues: [bob]}"), SLEEP, GET, allowed()),
        case("when header host is the host", allow_when("{key: 'request.headers[Host]', values: [httpbin.foo]}"), SLEEP, GET, allowed()),
        // when remote.ip.
        case("when remote.ip", allow_when("{key: remote.ip, values: [10.1.0.0/16]}"), SLEEP, GET, allowed()),
        case("when remote.ip, outside", allow_when("{key: remote.ip, values: [10.1.0.0/16]}"), CLIENT, GET, no_match()),
        // Unsupported keys fail closed.
        case("ALLOW when connection.sni never matches", allow_when("{key: connection.sni, values: ['*']}"), SLEEP, GET, no_match()),
        case("ALLOW when unsupported notValues never match", allow_when("{key: connection.sni, notValues: [other.example]}"), SLEEP, GET, no_match()),
        case("DENY when unsupported key denies", deny_when("{key: 'experimental.envoy.filters.a.b[c]', values: [x]}") + &allow_all(), SLEEP, GET, denied()),
        case("DENY unsupported key, known field does not match", ap("foo", "deny", "{action: DENY, rules: [{to: [{operation: {paths: [/admin]}}], when: [{key: connection.sni, values: ['*']}]}]}") + &allow_all(), SLEEP, get("/public"), through()),
        // Combinations, L4 fields and precedence with HTTP attributes.
        case("DENY with L7 fields, matching request", ap("foo", "deny", "{action: DENY, rules: [{to: [{operation: {methods: [POST], paths: ['/admin*']}}]}]}") + &allow_all(), SLEEP, get("/admin/users").method("POST"), denied()),
        case("DENY with L7 fields, other method", ap("foo", "deny", "{action: DENY, rules: [{to: [{operation: {methods: [POST], paths: ['/admin*']}}]}]}") + &allow_all(), SLEEP, get("/admin/users"), through()),
        case("DENY with L7 fields, other path", ap("foo", "deny", "{action: DENY, rules: [{to: [{operation: {methods: [POST], paths: ['/admin*']}}]}]}") + &allow_all(), SLEEP, get("/public").method("POST"), through()),
        case("L4 and L7 fields AND-ed, both match", ap("foo", "allow", "{rules: [{from: [{source: {namespaces: [foo]}}], to: [{operation: {methods: [GET]}}]}]}"), SLEEP, GET, allowed()),
        case("L4 and L7 fields AND-ed, L4 fails", ap("foo", "allow", "{rules: [{from: [{source: {namespaces: [foo]}}], to: [{operation: {methods: [GET]}}]}]}"), CLIENT, GET, no_match()),
        case("operation fields AND-ed", allow_to("{ports: ['8080'], methods: [GET], paths: [/info]}"), SLEEP, get("/other"), no_match()),
        case("second rule of an L7 policy", ap("foo", "allow", "{rules: [{to: [{operation: {methods: [POST]}}]}, {to: [{operation: {paths: [/info]}}]}]}"), SLEEP, get("/info"), allowed_by("foo/allow", 1)),
        case("L4 policy unchanged with HTTP", allow_from("{namespaces: [foo]}"), SLEEP, GET, allowed()),
        case("no policy with HTTP", String::new(), SLEEP, GET, no_policies()),
        case("STRICT before L7 fields", pa("istio-system", "mesh", "{mtls: {mode: STRICT}}") + &allow_to("{methods: [GET]}"), PLAIN, GET, deny(Reason::StrictMtls)),
    ]
}

#[test]
fn l7_evaluation_table() {
    let cases = cases();
    assert!(cases.len() >= 60, "only {} cases", cases.len());
    let mut failures = Vec::new();
    for case in &cases {
        let (set, _) = policy_set(&case.policies);
        let http = case.http.attributes();
        let got = decide(&set, &case.from, &HTTPBIN, Some(&http));
        if got != case.expect {
            failures.push(format!(
                "{}: expected {}, got {}",
                case.name, case.expect, got
            ));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

/// The node agent's path: without HTTP attributes every policy of the table that uses L7 fields
/// still denies the connection with `L7PolicyWithoutWaypoint`, naming it and its fields.
#[test]
fn without_http_attributes_l7_policies_deny_at_l4() {
    let mut checked = 0;
    for case in cases() {
        let (set, _) = policy_set(&case.policies);
        let Some(policy) = set.authorization_policies().iter().find(|p| p.is_l7()) else {
            continue;
        };
        if case.expect.reason == Reason::StrictMtls {
            continue;
        }
        let got = decide(&set, &case.from, &HTTPBIN, None);
        assert_eq!(
            got,
            l7(
                &policy.key(),
                &policy
                    .l7_fields
                    .iter()
                    .map(String::as_str)
                    .collect::<Vec<_>>()
            ),
            "{}",
            case.name
        );
        checked += 1;
    }
    assert!(checked >= 50, "only {checked} cases use L7 fields");
    // And the reason names the policy and its fields exactly.
    let (set, _) = policy_set(&deny_to("{methods: [POST], paths: ['/admin*']}"));
    assert_eq!(
        decide(&set, &SLEEP, &HTTPBIN, None),
        l7("foo/deny", &["methods", "paths"])
    );
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
fn path_without_query_and_host_without_port() {
    let paths = [
        ("/info", "/info"),
        ("/info?x=1", "/info"),
        ("/info?x=1#frag", "/info"),
        ("/info#frag", "/info"),
        ("/?", "/"),
        ("", ""),
    ];
    for (path, url_path) in paths {
        let http = HttpAttributes {
            path: path.to_string(),
            ..HttpAttributes::default()
        };
        assert_eq!(http.url_path(), url_path, "{path}");
    }
    let hosts = [
        ("example.com", "example.com"),
        ("example.com:8080", "example.com"),
        ("Example.COM:", "Example.COM"),
        ("10.0.0.1:80", "10.0.0.1"),
        ("[fd00::1]:8080", "[fd00::1]"),
        ("[fd00::1]", "[fd00::1]"),
        ("fd00::1", "fd00::1"),
        ("example.com:http", "example.com:http"),
    ];
    for (host, without_port) in hosts {
        let http = HttpAttributes {
            host: host.to_string(),
            ..HttpAttributes::default()
        };
        assert_eq!(http.host_without_port(), without_port, "{host}");
    }
}

//! Matching, precedence, weighted choice and filters, each over the exact request or response
//! they produce.
use http::header::{HOST, LOCATION};
use http::uri::Scheme;
use http::{request, response, StatusCode};

use super::*;
use crate::model::route::parse_routes;

/// A route document: `name` in `namespace`, created at `created` if given, with `spec` (YAML
/// indented by two spaces under `spec:`).
fn doc(namespace: &str, name: &str, created: Option<&str>, spec: &str) -> String {
    let created = created
        .map(|t| format!("  creationTimestamp: \"{t}\"\n"))
        .unwrap_or_default();
    let spec: String = spec
        .trim_matches('\n')
        .lines()
        .map(|l| format!("  {l}\n"))
        .collect();
    format!(
        "apiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata:\n  name: {name}\n  \
         namespace: {namespace}\n{created}spec:\n{spec}---\n"
    )
}

fn table(documents: &[String]) -> RouteTable {
    let routes = parse_routes(&documents.concat()).unwrap_or_else(|e| panic!("{e}"));
    RouteTable::new(&routes)
}

/// One route `ns/r` with `spec`.
fn one_route(spec: &str) -> RouteTable {
    table(&[doc("ns", "r", None, spec)])
}

/// A request: `method`, `uri` and headers (`name: value`).
fn request(method: &str, uri: &str, headers: &[(&str, &str)]) -> request::Parts {
    let mut builder = http::Request::builder().method(method).uri(uri);
    for (name, value) in headers {
        builder = builder.header(*name, *value);
    }
    builder.body(()).unwrap().into_parts().0
}

fn get(uri: &str) -> request::Parts {
    request("GET", uri, &[("host", "example.com")])
}

/// `namespace/name` of the route and the name of the rule (`#index` if unnamed) selected.
fn selected(table: &RouteTable, request: &request::Parts) -> Option<String> {
    table.select(request).map(|s| {
        let rule = s
            .rule
            .name
            .clone()
            .unwrap_or_else(|| format!("#{}", s.rule.index));
        format!("{}/{} {rule}", s.route.namespace, s.route.name)
    })
}

fn headers_of(map: &http::HeaderMap) -> Vec<(String, String)> {
    let mut out: Vec<_> = map
        .iter()
        .map(|(n, v)| (n.to_string(), v.to_str().unwrap().to_string()))
        .collect();
    out.sort();
    out
}

fn pairs(list: &[(&str, &str)]) -> Vec<(String, String)> {
    let mut out: Vec<_> = list
        .iter()
        .map(|(n, v)| (n.to_string(), v.to_string()))
        .collect();
    out.sort();
    out
}

const HTTP_80: Listener = Listener {
    scheme: Scheme::HTTP,
    port: 80,
};

/// Deterministic uniform `u32`s (SplitMix64).
fn randoms(seed: u64) -> impl Iterator<Item = u32> {
    let mut state = seed;
    std::iter::repeat_with(move || {
        state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = state;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        ((z ^ (z >> 31)) >> 32) as u32
    })
}

// ---------------------------------------------------------------------------------------------
// Matching

#[test]
fn each_match_type_matches_exactly_what_the_spec_says() {
    // (match, method, uri, extra headers, matches)
    type Case<'a> = (&'a str, &'a str, &'a str, &'a [(&'a str, &'a str)], bool);
    let cases: &[Case] = &[
        // Exact: the whole path, case-sensitively; the query is not part of it.
        (
            "{path: {type: Exact, value: /foo}}",
            "GET",
            "/foo",
            &[],
            true,
        ),
        (
            "{path: {type: Exact, value: /foo}}",
            "GET",
            "/foo?x=1",
            &[],
            true,
        ),
        (
            "{path: {type: Exact, value: /foo}}",
            "GET",
            "/foo/",
            &[],
            false,
        ),
        (
            "{path: {type: Exact, value: /foo}}",
            "GET",
            "/Foo",
            &[],
            false,
        ),
        (
            "{path: {type: Exact, value: /foo}}",
            "GET",
            "/foobar",
            &[],
            false,
        ),
        // PathPrefix: whole segments; a trailing `/` in the value is ignored.
        ("{path: {value: /foo}}", "GET", "/foo", &[], true),
        ("{path: {value: /foo}}", "GET", "/foo/", &[], true),
        ("{path: {value: /foo}}", "GET", "/foo/bar", &[], true),
        ("{path: {value: /foo}}", "GET", "/foo?x", &[], true),
        ("{path: {value: /foo}}", "GET", "/foobar", &[], false),
        ("{path: {value: /foo}}", "GET", "/fo", &[], false),
        ("{path: {value: /foo}}", "GET", "/FOO", &[], false),
        ("{path: {value: /foo/}}", "GET", "/foo", &[], true),
        ("{path: {value: /foo/}}", "GET", "/foo/bar", &[], true),
        ("{path: {value: /foo/}}", "GET", "/foobar", &[], false),
        ("{path: {value: /}}", "GET", "/anything/at/all", &[], true),
        // RegularExpression: the whole path.
        (
            "{path: {type: RegularExpression, value: '/v[0-9]+/.*'}}",
            "GET",
            "/v12/x",
            &[],
            true,
        ),
        (
            "{path: {type: RegularExpression, value: '/v[0-9]+/.*'}}",
            "GET",
            "/v12",
            &[],
            false,
        ),
        (
            "{path: {type: RegularExpression, value: '/v[0-9]+'}}",
            "GET",
            "/v1/extra",
            &[],
            false,
        ),
        (
            "{path: {type: RegularExpression, value: '/v[0-9]+'}}",
            "GET",
            "/x/v1",
            &[],
            false,
        ),
        // Headers: names case-insensitive, values exact; regular expressions whole.
        (
            "{headers: [{name: X-Version, value: v2}]}",
            "GET",
            "/",
            &[("x-version", "v2")],
            true,
        ),
        (
            "{headers: [{name: x-version, value: v2}]}",
            "GET",
            "/",
            &[("X-VERSION", "v2")],
            true,
        ),
        (
            "{headers: [{name: X-Version, value: v2}]}",
            "GET",
            "/",
            &[("x-version", "V2")],
            false,
        ),
        (
            "{headers: [{name: X-Version, value: v2}]}",
            "GET",
            "/",
            &[],
            false,
        ),
        (
            "{headers: [{type: RegularExpression, name: user, value: 'jas.n'}]}",
            "GET",
            "/",
            &[("user", "jason")],
            true,
        ),
        (
            "{headers: [{type: RegularExpression, name: user, value: 'jas.n'}]}",
            "GET",
            "/",
            &[("user", "jason2")],
            false,
        ),
        // A repeated header is matched against its values joined with `,`.
        (
            "{headers: [{name: x, value: 'a,b'}]}",
            "GET",
            "/",
            &[("x", "a"), ("x", "b")],
            true,
        ),
        (
            "{headers: [{name: x, value: a}]}",
            "GET",
            "/",
            &[("x", "a"), ("x", "b")],
            false,
        ),
        // Of two header matches naming one header in different case, only the first counts.
        (
            "{headers: [{name: X-A, value: '1'}, {name: x-a, value: '2'}]}",
            "GET",
            "/",
            &[("x-a", "1")],
            true,
        ),
        (
            "{headers: [{name: X-A, value: '1'}, {name: x-a, value: '2'}]}",
            "GET",
            "/",
            &[("x-a", "2")],
            false,
        ),
        // All header matches must hold.
        (
            "{headers: [{name: a, value: '1'}, {name: b, value: '2'}]}",
            "GET",
            "/",
            &[("a", "1")],
            false,
        ),
        // Query parameters: names exact, the first occurrence counts, percent-decoded.
        (
            "{queryParams: [{name: debug, value: '1'}]}",
            "GET",
            "/?debug=1",
            &[],
            true,
        ),
        (
            "{queryParams: [{name: debug, value: '1'}]}",
            "GET",
            "/p?x=2&debug=1",
            &[],
            true,
        ),
        (
            "{queryParams: [{name: debug, value: '1'}]}",
            "GET",
            "/?debug=2",
            &[],
            false,
        ),
        (
            "{queryParams: [{name: debug, value: '1'}]}",
            "GET",
            "/?Debug=1",
            &[],
            false,
        ),
        (
            "{queryParams: [{name: debug, value: '1'}]}",
            "GET",
            "/?debug=1&debug=2",
            &[],
            true,
        ),
        (
            "{queryParams: [{name: debug, value: '1'}]}",
            "GET",
            "/?debug=2&debug=1",
            &[],
            false,
        ),
        (
            "{queryParams: [{name: debug, value: '1'}]}",
            "GET",
            "/?debug=%31",
            &[],
            true,
        ),
        (
            "{queryParams: [{name: debug, value: '1'}]}",
            "GET",
            "/?deb%75g=1",
            &[],
            true,
        ),
        (
            "{queryParams: [{name: debug, value: '1'}]}",
            "GET",
            "/?debug",
            &[],
            false,
        ),
        (
            "{queryParams: [{name: debug, value: '1'}]}",
            "GET",
            "/",
            &[],
            false,
        ),
        (
            "{queryParams: [{name: q, value: 'a b'}]}",
            "GET",
            "/?q=a%20b",
            &[],
            true,
        ),
        (
            "{queryParams: [{name: q, value: 'a b'}]}",
            "GET",
            "/?q=a+b",
            &[],
            false,
        ),
        (
            "{queryParams: [{type: RegularExpression, name: id, value: '[0-9]+'}]}",
            "GET",
            "/?id=42",
            &[],
            true,
        ),
        (
            "{queryParams: [{type: RegularExpression, name: id, value: '[0-9]+'}]}",
            "GET",
            "/?id=4a",
            &[],
            false,
        ),
        // Method.
        ("{method: GET}", "GET", "/", &[], true),
        ("{method: GET}", "POST", "/", &[], false),
        ("{method: PATCH}", "PATCH", "/", &[], true),
        // Every condition of one match must hold.
        (
            "{path: {value: /api}, method: POST, headers: [{name: a, value: '1'}], queryParams: \
             [{name: q, value: '1'}]}",
            "POST",
            "/api/x?q=1",
            &[("a", "1")],
            true,
        ),
        (
            "{path: {value: /api}, method: POST, headers: [{name: a, value: '1'}], queryParams: \
             [{name: q, value: '1'}]}",
            "POST",
            "/api/x?q=2",
            &[("a", "1")],
            false,
        ),
    ];
    for (matching, method, uri, headers, expected) in cases {
        let table = one_route(&format!("rules:\n- matches: [{matching}]\n"));
        let mut all_headers = vec![("host", "example.com")];
        all_headers.extend_from_slice(headers);
        let found = table.select(&request(method, uri, &all_headers)).is_some();
        assert_eq!(
            found, *expected,
            "match {matching} on {method} {uri} {headers:?}"
        );
    }
}

#[test]
fn any_one_match_of_a_rule_selects_it_and_says_which() {
    // The spec's example: path /foo with header version: v2, or path /v2/foo.
    let table = one_route(
        "rules:\n- matches:\n  - path: {value: /foo}\n    headers: [{name: version, value: \
         v2}]\n  - path: {value: /v2/foo}\n",
    );
    let with_header = request("GET", "/foo", &[("host", "example.com"), ("version", "v2")]);
    assert_eq!(table.select(&with_header).unwrap().match_index, 0);
    assert_eq!(table.select(&get("/v2/foo")).unwrap().match_index, 1);
    assert!(table.select(&get("/foo")).is_none());
}

#[test]
fn no_matching_rule_selects_nothing() {
    let table = one_route("rules:\n- matches: [{path: {value: /a}}]\n");
    assert!(table.select(&get("/b")).is_none());
    assert!(RouteTable::new(&[]).select(&get("/")).is_none());
}

// ---------------------------------------------------------------------------------------------
// Precedence

#[test]
fn precedence_follows_the_spec_across_rules_and_routes() {
    // (routes, request, expected `ns/route rule`). The expected winner is never first in the
    // input, so that input order cannot be what decides.
    let r = |name: &str, spec: &str| doc("ns", name, None, spec);
    let cases: Vec<(Vec<String>, request::Parts, &str)> = vec![
        (
            vec![
                r("a", "rules:\n- name: prefix\n  matches: [{path: {value: /foo}}]"),
                r("b", "rules:\n- name: exact\n  matches: [{path: {type: Exact, value: /foo}}]"),
            ],
            get("/foo"),
            "ns/b exact",
        ),
        (
            vec![
                r("a", "rules:\n- name: prefix\n  matches: [{path: {value: /foo}}]"),
                r("b", "rules:\n- name: exact\n  matches: [{path: {type: Exact, value: /foo}}]"),
            ],
            get("/foo/bar"),
            "ns/a prefix",
        ),
        (
            vec![
                r("a", "rules:\n- name: short\n  matches: [{path: {value: /foo}}]"),
                r("b", "rules:\n- name: long\n  matches: [{path: {value: /foo/bar}}]"),
            ],
            get("/foo/bar/baz"),
            "ns/b long",
        ),
        (
            // A longer prefix beats a method, headers and query parameters.
            vec![r(
                "a",
                "rules:\n- name: short\n  matches: [{path: {value: /foo}, method: GET, headers: \
                 [{name: h, value: '1'}], queryParams: [{name: q, value: '1'}]}]\n- name: long\n  \
                 matches: [{path: {value: /foo/bar}}]",
            )],
            request("GET", "/foo/bar?q=1", &[("host", "x"), ("h", "1")]),
            "ns/a long",
        ),
        (
            // Prefixes before regular expressions (Istio's order).
            vec![
                r("a", "rules:\n- name: regex\n  matches: [{path: {type: RegularExpression, value: '/foo/.*'}}]"),
                r("b", "rules:\n- name: prefix\n  matches: [{path: {value: /}}]"),
            ],
            get("/foo/bar"),
            "ns/b prefix",
        ),
        (
            // A method beats more headers.
            vec![r(
                "a",
                "rules:\n- name: headers\n  matches: [{headers: [{name: a, value: '1'}, {name: b, \
                 value: '2'}]}]\n- name: method\n  matches: [{method: GET}]",
            )],
            request("GET", "/", &[("host", "x"), ("a", "1"), ("b", "2")]),
            "ns/a method",
        ),
        (
            // More headers beat fewer, and beat more query parameters.
            vec![r(
                "a",
                "rules:\n- name: one\n  matches: [{headers: [{name: a, value: '1'}], queryParams: \
                 [{name: q, value: '1'}, {name: r, value: '1'}]}]\n- name: two\n  matches: \
                 [{headers: [{name: a, value: '1'}, {name: b, value: '2'}]}]",
            )],
            request("GET", "/?q=1&r=1", &[("host", "x"), ("a", "1"), ("b", "2")]),
            "ns/a two",
        ),
        (
            // More query parameters beat fewer.
            vec![r(
                "a",
                "rules:\n- name: one\n  matches: [{queryParams: [{name: q, value: '1'}]}]\n- name: \
                 two\n  matches: [{queryParams: [{name: q, value: '1'}, {name: r, value: '1'}]}]",
            )],
            get("/?q=1&r=1"),
            "ns/a two",
        ),
        (
            // Precedence is per match: the rule's other, less specific match does not count.
            vec![r(
                "a",
                "rules:\n- name: mixed\n  matches: [{path: {value: /}}, {path: {type: Exact, \
                 value: /x}}]\n- name: prefix\n  matches: [{path: {value: /x}}]",
            )],
            get("/x"),
            "ns/a mixed",
        ),
    ];
    for (routes, request, expected) in cases {
        let table = table(&routes);
        assert_eq!(
            selected(&table, &request).as_deref(),
            Some(expected),
            "{}",
            routes.concat()
        );
    }
}

#[test]
fn ties_go_to_the_oldest_route_then_by_name_then_to_the_first_rule() {
    let spec = |rule: &str| format!("rules:\n- name: {rule}\n  matches: [{{path: {{value: /}}}}]");
    // Oldest first, whatever the names.
    let t = table(&[
        doc("a", "a", Some("2024-02-01T00:00:00Z"), &spec("newer")),
        doc("z", "z", Some("2024-01-01T00:00:00Z"), &spec("older")),
    ]);
    assert_eq!(selected(&t, &get("/")).as_deref(), Some("z/z older"));
    // Without timestamps (a file): by namespace, then name.
    let t = table(&[
        doc("b", "a", None, &spec("second")),
        doc("a", "z", None, &spec("first")),
    ]);
    assert_eq!(selected(&t, &get("/")).as_deref(), Some("a/z first"));
    let t = table(&[
        doc("a", "b", None, &spec("second")),
        doc("a", "a", None, &spec("first")),
    ]);
    assert_eq!(selected(&t, &get("/")).as_deref(), Some("a/a first"));
    // A route with a timestamp is older than one without.
    let t = table(&[
        doc("a", "a", None, &spec("untimed")),
        doc("z", "z", Some("2030-01-01T00:00:00Z"), &spec("timed")),
    ]);
    assert_eq!(selected(&t, &get("/")).as_deref(), Some("z/z timed"));
    // Within a route, the first rule.
    let t = one_route(
        "rules:\n- name: first\n  matches: [{path: {value: /}}]\n- name: second\n  matches: \
         [{path: {value: /}}]",
    );
    assert_eq!(selected(&t, &get("/")).as_deref(), Some("ns/r first"));
}

// ---------------------------------------------------------------------------------------------
// Hostnames

#[test]
fn hostnames_match_exactly_or_by_wildcard_ignoring_case_and_port() {
    // (route hostnames, request host, matches)
    let cases = [
        ("[foo.example.com]", "foo.example.com", true),
        ("[foo.example.com]", "FOO.Example.COM", true),
        ("[foo.example.com]", "foo.example.com:8080", true),
        ("[foo.example.com]", "foo.example.com.", true),
        ("[foo.example.com]", "bar.example.com", false),
        ("[foo.example.com]", "example.com", false),
        ("['*.example.com']", "a.example.com", true),
        ("['*.example.com']", "a.b.example.com", true),
        ("['*.example.com']", "A.EXAMPLE.com:443", true),
        ("['*.example.com']", "example.com", false),
        ("['*.example.com']", "aexample.com", false),
        ("['*.example.com']", "a.example.org", false),
        ("[a.example.com, b.example.com]", "b.example.com", true),
        ("[]", "anything.at.all", true),
        ("[]", "[::1]:8080", true),
    ];
    for (hostnames, host, expected) in cases {
        let table = one_route(&format!("hostnames: {hostnames}\nrules: [{{}}]"));
        let found = table
            .select(&request("GET", "/", &[("host", host)]))
            .is_some();
        assert_eq!(found, expected, "hostnames {hostnames}, host {host}");
    }
}

#[test]
fn the_host_comes_from_the_uri_authority_before_the_host_header() {
    let table = one_route("hostnames: [foo.example.com]\nrules: [{}]");
    // HTTP/2 (`:authority`) and absolute-form requests carry it in the URI.
    assert!(table
        .select(&request("GET", "http://foo.example.com/x", &[]))
        .is_some());
    assert!(table
        .select(&request(
            "GET",
            "http://bar.example.com/x",
            &[("host", "foo.example.com")]
        ))
        .is_none());
    // A request without a host matches only routes without hostnames.
    assert!(table.select(&request("GET", "/x", &[])).is_none());
    let any = one_route("rules: [{}]");
    assert!(any.select(&request("GET", "/x", &[])).is_some());
}

#[test]
fn the_most_specific_hostname_wins_before_path_precedence() {
    let routes = [
        doc(
            "ns",
            "any",
            None,
            "rules:\n- name: any-exact\n  matches: [{path: {type: Exact, value: /api}}]",
        ),
        doc(
            "ns",
            "wild",
            None,
            "hostnames: ['*.example.com']\nrules:\n- name: wild\n  matches: [{path: {type: \
             Exact, value: /api}}]",
        ),
        doc(
            "ns",
            "deeper",
            None,
            "hostnames: ['*.foo.example.com']\nrules:\n- name: deeper\n  matches: [{path: {value: \
             /}}]",
        ),
        doc(
            "ns",
            "exact",
            None,
            "hostnames: [foo.example.com]\nrules:\n- name: exact-host\n  matches: [{path: {value: \
             /api}}]",
        ),
    ];
    let t = table(&routes);
    let at = |host: &str, path: &str| selected(&t, &request("GET", path, &[("host", host)]));
    // The exact hostname wins over the wildcard one and the one without hostnames, although
    // their paths match more precisely.
    assert_eq!(
        at("foo.example.com", "/api").as_deref(),
        Some("ns/exact exact-host")
    );
    // Where the exact-host route has no matching rule, the next hostname takes over.
    assert_eq!(at("foo.example.com", "/other").as_deref(), None);
    assert_eq!(
        at("bar.example.com", "/api").as_deref(),
        Some("ns/wild wild")
    );
    // A longer wildcard wins over a shorter one.
    assert_eq!(
        at("a.foo.example.com", "/api").as_deref(),
        Some("ns/deeper deeper")
    );
    assert_eq!(at("other.org", "/api").as_deref(), Some("ns/any any-exact"));
    assert_eq!(at("bar.example.com", "/none").as_deref(), None);
    let with_fallback = table(&[
        routes[3].clone(),
        doc("ns", "fallback", None, "rules:\n- name: fallback"),
    ]);
    assert_eq!(
        selected(
            &with_fallback,
            &request("GET", "/other", &[("host", "foo.example.com")])
        )
        .as_deref(),
        Some("ns/fallback fallback")
    );
}

// ---------------------------------------------------------------------------------------------
// Backends

fn weighted(weights: &[u32]) -> RouteTable {
    let backends: Vec<String> = weights
        .iter()
        .enumerate()
        .map(|(i, w)| format!("{{name: b{i}, port: 80, weight: {w}}}"))
        .collect();
    one_route(&format!("rules:\n- backendRefs: [{}]", backends.join(", ")))
}

fn counts(rule: &Rule, samples: impl Iterator<Item = u32>) -> Vec<usize> {
    let mut counts = vec![0; rule.backends.len()];
    for random in samples {
        let backend = rule.pick_backend(random).unwrap();
        let index = rule
            .backends
            .iter()
            .position(|b| std::ptr::eq(b, backend))
            .unwrap();
        counts[index] += 1;
    }
    counts
}

#[test]
fn backends_are_picked_in_proportion_to_their_weights() {
    let t = weighted(&[90, 10]);
    let rule = t.select(&get("/")).unwrap().rule;
    let picked = counts(rule, randoms(7).take(100_000));
    let share = picked[0] as f64 / 100_000.0;
    assert!((share - 0.9).abs() < 0.01, "{picked:?}");
    // Equal weights split the range of random numbers in halves.
    let t = weighted(&[1, 1]);
    let rule = t.select(&get("/")).unwrap().rule;
    assert_eq!(rule.pick_backend(0).unwrap().reference.name, "b0");
    assert_eq!(
        rule.pick_backend((1 << 31) - 1).unwrap().reference.name,
        "b0"
    );
    assert_eq!(rule.pick_backend(1 << 31).unwrap().reference.name, "b1");
    assert_eq!(rule.pick_backend(u32::MAX).unwrap().reference.name, "b1");
    // One backend takes everything.
    let t = weighted(&[3]);
    let rule = t.select(&get("/")).unwrap().rule;
    assert_eq!(counts(rule, randoms(1).take(1000)), [1000]);
}

#[test]
fn a_backend_of_weight_zero_is_never_picked() {
    let t = weighted(&[0, 5, 0, 5, 0]);
    let rule = t.select(&get("/")).unwrap().rule;
    let edges = [0, 1, (1 << 31) - 1, 1 << 31, u32::MAX - 1, u32::MAX];
    let picked = counts(rule, randoms(3).take(100_000).chain(edges));
    assert_eq!(picked[0] + picked[2] + picked[4], 0, "{picked:?}");
    assert!(picked[1] > 0 && picked[3] > 0, "{picked:?}");
}

#[test]
fn a_rule_without_a_usable_backend_answers_500() {
    for spec in [
        "rules:\n- backendRefs: [{name: a, port: 80, weight: 0}, {name: b, port: 80, weight: 0}]",
        "rules:\n- matches: [{path: {value: /}}]",
        "rules:\n- filters: [{type: RequestHeaderModifier, requestHeaderModifier: {set: [{name: \
         a, value: b}]}}]",
    ] {
        let t = one_route(spec);
        let rule = t.select(&get("/")).unwrap().rule;
        let error = rule.pick_backend(12345).unwrap_err();
        assert_eq!(error, RoutingError::NoBackend, "{spec}");
        assert_eq!(error.status(), StatusCode::INTERNAL_SERVER_ERROR);
        assert_eq!(error.reason(), "no_backend");
    }
}

#[test]
fn backend_references_resolve_their_namespace_and_defaults() {
    let t = one_route(
        "rules:\n- backendRefs:\n  - {name: a, port: 80}\n  - {name: b, namespace: other, port: \
         81}\n  - {group: example.com, kind: Backend, name: c}",
    );
    let rule = t.select(&get("/")).unwrap().rule;
    let refs: Vec<_> = rule.backends.iter().map(|b| &b.reference).collect();
    assert_eq!(
        *refs[0],
        BackendReference {
            group: String::new(),
            kind: "Service".into(),
            name: "a".into(),
            namespace: "ns".into(),
            port: Some(80),
            subset: None,
        }
    );
    assert!(refs[0].is_service());
    assert_eq!(refs[1].namespace, "other");
    assert!(!refs[2].is_service());
    assert_eq!(refs[2].port, None);
}

// ---------------------------------------------------------------------------------------------
// Filters

/// The single rule of a route with these rule-level `filters` (and `matches`, if given).
fn filtered(matches: &str, filters: &str) -> RouteTable {
    one_route(&format!(
        "rules:\n- matches: [{matches}]\n  filters: [{filters}]\n"
    ))
}

#[test]
fn header_modifiers_set_add_and_remove_as_the_spec_examples_show() {
    // (input headers, modifier, output headers)
    type Case<'a> = (&'a [(&'a str, &'a str)], &'a str, &'a [(&'a str, &'a str)]);
    let cases: &[Case] = &[
        (
            &[("my-header", "foo")],
            "{set: [{name: my-header, value: bar}]}",
            &[("my-header", "bar")],
        ),
        (
            &[("my-header", "foo"), ("my-header", "foo2")],
            "{set: [{name: My-Header, value: bar}]}",
            &[("my-header", "bar")],
        ),
        (
            &[("my-header", "foo")],
            "{add: [{name: my-header, value: 'bar,baz'}]}",
            &[("my-header", "foo,bar,baz")],
        ),
        (&[], "{add: [{name: X-New, value: v}]}", &[("x-new", "v")]),
        (
            &[
                ("my-header1", "foo"),
                ("my-header2", "bar"),
                ("my-header3", "baz"),
            ],
            "{remove: [my-header1, My-Header3]}",
            &[("my-header2", "bar")],
        ),
        (
            &[("a", "1"), ("b", "2")],
            "{set: [{name: a, value: x}], add: [{name: c, value: y}], remove: [b]}",
            &[("a", "x"), ("c", "y")],
        ),
    ];
    for (input, modifier, output) in cases {
        let t = filtered(
            "{}",
            &format!("{{type: RequestHeaderModifier, requestHeaderModifier: {modifier}}}"),
        );
        let mut all = vec![("host", "example.com")];
        all.extend_from_slice(input);
        let mut parts = request("GET", "/", &all);
        let rule = t.select(&parts).unwrap().rule;
        let outcome = rule.filters.apply_request(&mut parts, &HTTP_80).unwrap();
        assert!(matches!(outcome, RequestOutcome::Forward));
        let mut expected = vec![("host", "example.com")];
        expected.extend_from_slice(output);
        assert_eq!(headers_of(&parts.headers), pairs(&expected), "{modifier}");
    }
}

#[test]
fn adding_set_cookie_adds_a_field_of_its_own() {
    let t = filtered(
        "{}",
        "{type: ResponseHeaderModifier, responseHeaderModifier: {add: [{name: Set-Cookie, value: \
         'b=2'}]}}",
    );
    let rule = t.select(&get("/")).unwrap().rule;
    let (mut response, ()) = http::Response::builder()
        .header("set-cookie", "a=1")
        .body(())
        .unwrap()
        .into_parts();
    rule.filters.apply_response(&mut response);
    let cookies: Vec<_> = response.headers.get_all("set-cookie").iter().collect();
    assert_eq!(cookies, ["a=1", "b=2"]);
}

#[test]
fn response_header_modifiers_change_only_the_response() {
    let t = filtered(
        "{}",
        "{type: ResponseHeaderModifier, responseHeaderModifier: {set: [{name: x-frame-options, \
         value: DENY}], remove: [server]}}",
    );
    let mut parts = get("/");
    let rule = t.select(&parts).unwrap().rule;
    rule.filters.apply_request(&mut parts, &HTTP_80).unwrap();
    assert_eq!(
        headers_of(&parts.headers),
        pairs(&[("host", "example.com")])
    );
    let (mut response, ()): (response::Parts, ()) = http::Response::builder()
        .header("server", "envoy")
        .header("content-type", "text/plain")
        .body(())
        .unwrap()
        .into_parts();
    rule.filters.apply_response(&mut response);
    assert_eq!(
        headers_of(&response.headers),
        pairs(&[("content-type", "text/plain"), ("x-frame-options", "DENY")])
    );
}

#[test]
fn replace_prefix_match_follows_the_spec_table() {
    // Request path, prefix match, replacement, modified path: the table of the spec.
    let cases = [
        ("/foo/bar", "/foo", "/xyz", "/xyz/bar"),
        ("/foo/bar", "/foo", "/xyz/", "/xyz/bar"),
        ("/foo/bar", "/foo/", "/xyz", "/xyz/bar"),
        ("/foo/bar", "/foo/", "/xyz/", "/xyz/bar"),
        ("/foo", "/foo", "/xyz", "/xyz"),
        ("/foo/", "/foo", "/xyz", "/xyz/"),
        ("/foo/bar", "/foo", "", "/bar"),
        ("/foo/", "/foo", "", "/"),
        ("/foo", "/foo", "", "/"),
        ("/foo/", "/foo", "/", "/"),
        ("/foo", "/foo", "/", "/"),
        // Beyond the table: the root prefix, and a path the prefix does not match.
        ("/abc", "/", "/xyz", "/xyz/abc"),
        ("/", "/", "/xyz", "/xyz/"),
        ("/", "/", "", "/"),
    ];
    for (path, prefix, replacement, expected) in cases {
        assert_eq!(
            replace_prefix(path, prefix, replacement).as_deref(),
            Some(expected),
            "{path} {prefix} {replacement}"
        );
        // The same through a URLRewrite filter, which keeps the query.
        let t = filtered(
            &format!("{{path: {{value: '{prefix}'}}}}"),
            &format!(
                "{{type: URLRewrite, urlRewrite: {{path: {{type: ReplacePrefixMatch, \
                 replacePrefixMatch: '{replacement}'}}}}}}"
            ),
        );
        let mut parts = get(&format!("{path}?a=1&b=2"));
        let rule = t.select(&parts).unwrap().rule;
        rule.filters.apply_request(&mut parts, &HTTP_80).unwrap();
        assert_eq!(
            parts.uri.path_and_query().unwrap().as_str(),
            format!("{expected}?a=1&b=2"),
            "{path} {prefix} {replacement}"
        );
    }
    assert_eq!(replace_prefix("/foobar", "/foo", "/xyz"), None);
}

#[test]
fn url_rewrite_replaces_the_full_path_and_the_host() {
    let t = filtered(
        "{}",
        "{type: URLRewrite, urlRewrite: {hostname: internal.example.com, path: {type: \
         ReplaceFullPath, replaceFullPath: /v2/all}}}",
    );
    // HTTP/1: the Host header.
    let mut parts = request("GET", "/a/b?x=1", &[("host", "example.com:8080")]);
    let rule = t.select(&parts).unwrap().rule;
    rule.filters.apply_request(&mut parts, &HTTP_80).unwrap();
    assert_eq!(parts.uri.to_string(), "/v2/all?x=1");
    assert_eq!(parts.headers[HOST], "internal.example.com");
    // HTTP/2: the URI's authority (no Host header is added).
    let mut parts = request("GET", "https://example.com:8443/a", &[]);
    rule.filters.apply_request(&mut parts, &HTTP_80).unwrap();
    assert_eq!(parts.uri.to_string(), "https://internal.example.com/v2/all");
    assert!(!parts.headers.contains_key(HOST));
}

#[test]
fn redirects_build_the_location_the_spec_describes() {
    // (filter settings, match, request URI, request host, listener, status, Location)
    type Case<'a> = (&'a str, &'a str, &'a str, &'a str, Listener, u16, &'a str);
    let https_443 = Listener {
        scheme: Scheme::HTTPS,
        port: 443,
    };
    let http_8080 = Listener {
        scheme: Scheme::HTTP,
        port: 8080,
    };
    let cases: &[Case] = &[
        (
            "{}",
            "{}",
            "/foo?x=1",
            "example.com",
            HTTP_80,
            302,
            "http://example.com/foo?x=1",
        ),
        (
            "{statusCode: 301}",
            "{}",
            "/foo",
            "example.com",
            HTTP_80,
            301,
            "http://example.com/foo",
        ),
        // The listener's port, unless it is the scheme's well-known one.
        (
            "{}",
            "{}",
            "/foo",
            "example.com:8080",
            http_8080.clone(),
            302,
            "http://example.com:8080/foo",
        ),
        (
            "{}",
            "{}",
            "/foo",
            "example.com",
            https_443.clone(),
            302,
            "https://example.com/foo",
        ),
        // A scheme set: its well-known port, left out.
        (
            "{scheme: https}",
            "{}",
            "/foo",
            "example.com:8080",
            http_8080.clone(),
            302,
            "https://example.com/foo",
        ),
        (
            "{scheme: http}",
            "{}",
            "/foo",
            "example.com",
            https_443.clone(),
            302,
            "http://example.com/foo",
        ),
        // A port set: kept unless well-known for the scheme.
        (
            "{scheme: https, port: 8443}",
            "{}",
            "/foo",
            "example.com",
            HTTP_80,
            302,
            "https://example.com:8443/foo",
        ),
        (
            "{port: 80}",
            "{}",
            "/foo",
            "example.com",
            http_8080.clone(),
            302,
            "http://example.com/foo",
        ),
        (
            "{port: 443}",
            "{}",
            "/foo",
            "example.com",
            HTTP_80,
            302,
            "http://example.com:443/foo",
        ),
        (
            "{hostname: new.example.com}",
            "{}",
            "/foo",
            "example.com",
            HTTP_80,
            302,
            "http://new.example.com/foo",
        ),
        (
            "{path: {type: ReplaceFullPath, replaceFullPath: /bar}}",
            "{}",
            "/foo/x?q=1",
            "example.com",
            HTTP_80,
            302,
            "http://example.com/bar?q=1",
        ),
        (
            "{path: {type: ReplacePrefixMatch, replacePrefixMatch: /bar}}",
            "{path: {value: /foo}}",
            "/foo/baz?q=1",
            "example.com",
            HTTP_80,
            302,
            "http://example.com/bar/baz?q=1",
        ),
        (
            "{scheme: https, hostname: secure.example.com, port: 8443, statusCode: 301, path: \
             {type: ReplacePrefixMatch, replacePrefixMatch: /}}",
            "{path: {value: /old}}",
            "/old/page",
            "example.com",
            HTTP_80,
            301,
            "https://secure.example.com:8443/page",
        ),
        (
            "{}",
            "{}",
            "/",
            "[::1]:8080",
            http_8080.clone(),
            302,
            "http://[::1]:8080/",
        ),
    ];
    for (settings, matching, uri, host, listener, status, location) in cases {
        let t = filtered(
            matching,
            &format!("{{type: RequestRedirect, requestRedirect: {settings}}}"),
        );
        let mut parts = request("GET", uri, &[("host", host)]);
        let rule = t.select(&parts).unwrap().rule;
        let RequestOutcome::Redirect(response) =
            rule.filters.apply_request(&mut parts, listener).unwrap()
        else {
            panic!("no redirect for {settings}");
        };
        assert_eq!(response.status.as_u16(), *status, "{settings}");
        assert_eq!(
            response.headers[LOCATION], *location,
            "{settings} {uri} {host}"
        );
    }
}

#[test]
fn a_redirect_uses_the_uri_scheme_and_authority_of_an_absolute_request() {
    let t = filtered("{}", "{type: RequestRedirect, requestRedirect: {}}");
    let listener = Listener {
        scheme: Scheme::HTTP,
        port: 8443,
    };
    let mut parts = request(
        "GET",
        "https://example.com/a?b",
        &[("host", "other.example.com")],
    );
    let rule = t.select(&parts).unwrap().rule;
    let RequestOutcome::Redirect(response) =
        rule.filters.apply_request(&mut parts, &listener).unwrap()
    else {
        panic!("no redirect");
    };
    // The scheme and host of the URI; the port of the listener (no port in the filter).
    assert_eq!(response.headers[LOCATION], "https://example.com:8443/a?b");
}

#[test]
fn a_redirect_without_any_host_is_a_bad_request() {
    let t = filtered("{}", "{type: RequestRedirect, requestRedirect: {}}");
    let mut parts = request("GET", "/a", &[]);
    let rule = t.select(&parts).unwrap().rule;
    let error = rule
        .filters
        .apply_request(&mut parts, &HTTP_80)
        .unwrap_err();
    assert_eq!(error, RoutingError::RedirectWithoutHost);
    assert_eq!(error.status(), StatusCode::BAD_REQUEST);
    // With a hostname in the filter, the request's host is not needed.
    let t = filtered(
        "{}",
        "{type: RequestRedirect, requestRedirect: {hostname: example.com}}",
    );
    let mut parts = request("GET", "/a", &[]);
    let rule = t.select(&parts).unwrap().rule;
    assert!(matches!(
        rule.filters.apply_request(&mut parts, &HTTP_80),
        Ok(RequestOutcome::Redirect(_))
    ));
}

#[test]
fn request_filters_apply_in_the_order_written_and_stop_at_a_redirect() {
    let rewrite = "{type: URLRewrite, urlRewrite: {hostname: rewritten.example.com}}";
    let set_host = "{type: RequestHeaderModifier, requestHeaderModifier: {set: [{name: host, \
                    value: set.example.com}]}}";
    for (filters, host) in [
        (format!("{rewrite}, {set_host}"), "set.example.com"),
        (format!("{set_host}, {rewrite}"), "rewritten.example.com"),
    ] {
        let t = filtered("{}", &filters);
        let mut parts = get("/");
        let rule = t.select(&parts).unwrap().rule;
        rule.filters.apply_request(&mut parts, &HTTP_80).unwrap();
        assert_eq!(parts.headers[HOST], host, "{filters}");
    }
    let t = filtered(
        "{}",
        "{type: RequestRedirect, requestRedirect: {}}, {type: RequestHeaderModifier, \
         requestHeaderModifier: {set: [{name: x-after, value: '1'}]}}",
    );
    let mut parts = get("/");
    let rule = t.select(&parts).unwrap().rule;
    let outcome = rule.filters.apply_request(&mut parts, &HTTP_80).unwrap();
    assert!(matches!(outcome, RequestOutcome::Redirect(_)));
    assert!(!parts.headers.contains_key("x-after"));
}

#[test]
fn mirrors_return_their_backend_for_their_share_of_requests() {
    let t = filtered(
        "{}",
        "{type: RequestMirror, requestMirror: {backendRef: {name: shadow, port: 80}}}, \
         {type: RequestMirror, requestMirror: {backendRef: {name: half, namespace: other, port: \
         81}, percent: 50}}, \
         {type: RequestMirror, requestMirror: {backendRef: {name: rare, port: 82}, fraction: \
         {numerator: 1, denominator: 1000}}}, \
         {type: RequestMirror, requestMirror: {backendRef: {name: never, port: 83}, percent: 0}}",
    );
    let rule = t.select(&get("/")).unwrap().rule;
    let mut seen = std::collections::BTreeMap::<String, usize>::new();
    for random in randoms(11).take(100_000) {
        for backend in rule.filters.mirrors(random) {
            *seen
                .entry(format!("{}/{}", backend.namespace, backend.name))
                .or_default() += 1;
        }
    }
    assert_eq!(seen["ns/shadow"], 100_000);
    let half = seen["other/half"] as f64 / 100_000.0;
    assert!((half - 0.5).abs() < 0.01, "{seen:?}");
    assert!((50..=150).contains(&seen["ns/rare"]), "{seen:?}");
    assert!(!seen.contains_key("ns/never"), "{seen:?}");
    // A mirror filter changes nothing in the request itself.
    let mut parts = get("/a?b");
    rule.filters.apply_request(&mut parts, &HTTP_80).unwrap();
    assert_eq!(parts.uri.to_string(), "/a?b");
}

#[test]
fn a_mirror_share_is_exact_at_its_edges() {
    let t = filtered(
        "{}",
        "{type: RequestMirror, requestMirror: {backendRef: {name: m, port: 80}, percent: 50}}",
    );
    let rule = t.select(&get("/")).unwrap().rule;
    assert_eq!(rule.filters.mirrors((1 << 31) - 1).count(), 1);
    assert_eq!(rule.filters.mirrors(1 << 31).count(), 0);
}

#[test]
fn backend_filters_apply_after_the_rules_and_only_to_their_backend() {
    let t = one_route(
        "rules:\n- filters:\n  - {type: RequestHeaderModifier, requestHeaderModifier: {set: \
         [{name: x-level, value: rule}]}}\n  - {type: ResponseHeaderModifier, \
         responseHeaderModifier: {set: [{name: x-level, value: rule}]}}\n  backendRefs:\n  - \
         name: plain\n    port: 80\n  - name: special\n    port: 80\n    filters:\n    - {type: \
         RequestHeaderModifier, requestHeaderModifier: {set: [{name: x-level, value: \
         backend}]}}\n    - {type: ResponseHeaderModifier, responseHeaderModifier: {set: [{name: \
         x-level, value: backend}]}}\n    - {type: RequestMirror, requestMirror: {backendRef: \
         {name: shadow, port: 80}}}",
    );
    for (random, backend, level, mirrors) in
        [(0, "plain", "rule", 0), (u32::MAX, "special", "backend", 1)]
    {
        let mut parts = get("/");
        let selected = t.select(&parts).unwrap();
        selected
            .rule
            .filters
            .apply_request(&mut parts, &HTTP_80)
            .unwrap();
        let chosen = selected.rule.pick_backend(random).unwrap();
        assert_eq!(chosen.reference.name, backend);
        chosen.filters.apply_request(&mut parts, &HTTP_80).unwrap();
        assert_eq!(parts.headers["x-level"], level);
        assert_eq!(chosen.filters.mirrors(random).count(), mirrors);
        let (mut response, ()) = http::Response::new(()).into_parts();
        selected.rule.filters.apply_response(&mut response);
        chosen.filters.apply_response(&mut response);
        assert_eq!(response.headers["x-level"], level);
    }
}

#[test]
fn timeouts_are_carried_for_the_caller() {
    let t = one_route("rules:\n- timeouts: {request: 10s, backendRequest: 1s500ms}\n- {}");
    let rule = t.select(&get("/")).unwrap().rule;
    assert_eq!(rule.request_timeout, Some(Duration::from_secs(10)));
    assert_eq!(
        rule.backend_request_timeout,
        Some(Duration::from_millis(1500))
    );
    let second = &t.routes()[0].rules[1];
    assert_eq!(
        (second.request_timeout, second.backend_request_timeout),
        (None, None)
    );
}

#[test]
fn an_unvalidated_route_compiles_without_panicking_and_its_bad_matches_never_match() {
    let mut routes = parse_routes(&doc(
        "ns",
        "r",
        None,
        "rules:\n- matches: [{path: {type: RegularExpression, value: x}}]",
    ))
    .unwrap();
    routes[0].spec.rules[0].matches[0].path.value = "(".to_string();
    let t = RouteTable::new(&routes);
    assert!(t.select(&get("/")).is_none());
}

//! VirtualService rules compiled and applied: order, every match kind, destinations, header
//! changes, rewrites, redirects, direct responses, mirrors, timeouts, retries and faults, each
//! over the exact request or response they produce.
use std::time::Duration;

use http::header::{CONTENT_TYPE, HOST, LOCATION};
use http::uri::Scheme;
use http::{request, StatusCode};

use super::*;
use crate::model::virtual_service::parse_virtual_services;
use crate::waypoint::fault::Fault;

/// A VirtualService `shop/name` (created at `created`, if given) around `spec` (YAML indented by
/// two spaces under `spec:`).
fn doc(name: &str, created: Option<&str>, spec: &str) -> String {
    let created = created
        .map(|t| format!("  creationTimestamp: \"{t}\"\n"))
        .unwrap_or_default();
    let spec: String = spec
        .trim_matches('\n')
        .lines()
        .map(|l| format!("  {l}\n"))
        .collect();
    format!(
        "apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata:\n  name: {name}\n  \
         namespace: shop\n{created}spec:\n{spec}---\n"
    )
}

/// `reviews` has two ports (9080, 9090), `ratings` one (8080); others are unknown.
fn only_port(service: &ServiceRef) -> Option<u16> {
    (service.name == "ratings").then_some(8080)
}

fn compile_at(documents: &[String], port: u16) -> (RouteTable, Vec<String>) {
    let parsed = parse_virtual_services(&documents.concat()).unwrap_or_else(|e| panic!("{e}"));
    let refs: Vec<&VirtualService> = parsed.iter().collect();
    let mut warnings = Vec::new();
    let table = compile(&refs, port, &only_port, &mut warnings);
    (table, warnings)
}

/// One VirtualService `shop/vs` for `reviews` with these `http` rules (YAML list items at
/// column 0), for requests to port 9080.
fn table(http: &str) -> RouteTable {
    let (table, warnings) = compile_at(
        &[doc("vs", None, &format!("hosts: [reviews]\nhttp:\n{http}"))],
        9080,
    );
    assert!(warnings.is_empty(), "{warnings:?}");
    table
}

fn request(method: &str, uri: &str, headers: &[(&str, &str)]) -> request::Parts {
    let mut builder = http::Request::builder().method(method).uri(uri);
    for (name, value) in headers {
        builder = builder.header(*name, *value);
    }
    builder.body(()).unwrap().into_parts().0
}

fn get(uri: &str) -> request::Parts {
    request("GET", uri, &[("host", "reviews")])
}

/// The selected rule as `name` (`#index` if unnamed) and the match entry's index.
fn selected(table: &RouteTable, request: &request::Parts) -> Option<(String, usize)> {
    table.select(request).map(|s| {
        let name = s
            .rule
            .name
            .clone()
            .unwrap_or_else(|| format!("#{}", s.rule.index));
        (name, s.match_index)
    })
}

const HTTP_9080: Listener = Listener {
    scheme: Scheme::HTTP,
    port: 9080,
};

/// The request after the selected rule's and its first backend's request filters.
fn forwarded(table: &RouteTable, mut request: request::Parts) -> request::Parts {
    let rule = table.select(&request).expect("a rule matches").rule;
    let outcome = rule
        .filters
        .apply_request(&mut request, &HTTP_9080)
        .unwrap();
    assert!(matches!(outcome, RequestOutcome::Forward), "{outcome:?}");
    if let Some(backend) = rule.backends.first() {
        let outcome = backend
            .filters
            .apply_request(&mut request, &HTTP_9080)
            .unwrap();
        assert!(matches!(outcome, RequestOutcome::Forward), "{outcome:?}");
    }
    request
}

fn header_list(map: &http::HeaderMap, name: &str) -> Vec<String> {
    map.get_all(name)
        .iter()
        .map(|v| v.to_str().unwrap().to_string())
        .collect()
}

// ---------------------------------------------------------------------------------------------
// Order and matching

const ROUTE: &str = "  route: [{destination: {host: reviews}}]";

#[test]
fn the_first_rule_that_matches_wins_even_when_a_later_one_is_more_specific() {
    let t = table(&format!(
        "- name: broad\n  match: [{{uri: {{prefix: /reviews}}}}]\n{ROUTE}\n\
         - name: exact\n  match: [{{uri: {{exact: /reviews/1}}}}, {{method: {{exact: GET}}}}]\n{ROUTE}\n\
         - name: rest\n{ROUTE}"
    ));
    assert_eq!(selected(&t, &get("/reviews/1")), Some(("broad".into(), 0)));
    // The second entry of `exact` selects it: the match index is the entry's.
    assert_eq!(selected(&t, &get("/other")), Some(("exact".into(), 1)));
    // A rule without `match` takes every request.
    assert_eq!(
        selected(&t, &request("POST", "/other", &[])),
        Some(("rest".into(), 0))
    );
    // Without it, a request no rule matches selects nothing (404).
    let t = table(&format!("- match: [{{uri: {{exact: /a}}}}]\n{ROUTE}"));
    assert_eq!(selected(&t, &get("/b")), None);
}

#[test]
fn each_match_kind_matches_what_istio_says() {
    // (match entry, method, uri, headers, matches)
    type Case<'a> = (&'a str, &'a str, &'a str, &'a [(&'a str, &'a str)], bool);
    let cases: &[Case] = &[
        // uri: exact, the query apart; case-sensitive unless ignoreUriCase.
        ("{uri: {exact: /foo}}", "GET", "/foo?x=1", &[], true),
        ("{uri: {exact: /foo}}", "GET", "/foo/", &[], false),
        ("{uri: {exact: /foo}}", "GET", "/FOO", &[], false),
        (
            "{uri: {exact: /foo}, ignoreUriCase: true}",
            "GET",
            "/FOO",
            &[],
            true,
        ),
        // prefix: a plain string prefix, not whole segments.
        ("{uri: {prefix: /foo}}", "GET", "/foobar", &[], true),
        ("{uri: {prefix: /foo}}", "GET", "/foo/bar", &[], true),
        ("{uri: {prefix: /foo}}", "GET", "/fo", &[], false),
        ("{uri: {prefix: /foo}}", "GET", "/Foo", &[], false),
        (
            "{uri: {prefix: /foo}, ignoreUriCase: true}",
            "GET",
            "/FOObar",
            &[],
            true,
        ),
        // regex: the whole path, without the query; ignoreUriCase does not apply to it.
        ("{uri: {regex: '/b[0-9]+'}}", "GET", "/b12?q=1", &[], true),
        ("{uri: {regex: '/b[0-9]+'}}", "GET", "/b12/x", &[], false),
        (
            "{uri: {regex: '/b'}, ignoreUriCase: true}",
            "GET",
            "/B",
            &[],
            false,
        ),
        // headers: by name in any case; exact, prefix, regex (`.*`: present).
        (
            "{headers: {x-user: {exact: jason}}}",
            "GET",
            "/",
            &[("X-User", "jason")],
            true,
        ),
        (
            "{headers: {x-user: {exact: jason}}}",
            "GET",
            "/",
            &[("x-user", "Jason")],
            false,
        ),
        (
            "{headers: {x-user: {exact: jason}}}",
            "GET",
            "/",
            &[],
            false,
        ),
        (
            "{headers: {x-user: {prefix: ja}}}",
            "GET",
            "/",
            &[("x-user", "jason")],
            true,
        ),
        (
            "{headers: {x-user: {prefix: so}}}",
            "GET",
            "/",
            &[("x-user", "jason")],
            false,
        ),
        (
            "{headers: {x-user: {regex: '.*'}}}",
            "GET",
            "/",
            &[("x-user", "")],
            true,
        ),
        ("{headers: {x-user: {regex: '.*'}}}", "GET", "/", &[], false),
        (
            "{headers: {':authority': {exact: 'reviews:9080'}}}",
            "GET",
            "/",
            &[("host", "reviews:9080")],
            true,
        ),
        (
            "{headers: {':method': {exact: POST}}}",
            "GET",
            "/",
            &[],
            false,
        ),
        // withoutHeaders: the entry holds only if the header does not match (absent: holds).
        (
            "{withoutHeaders: {x-canary: {exact: 'yes'}}}",
            "GET",
            "/",
            &[("x-canary", "yes")],
            false,
        ),
        (
            "{withoutHeaders: {x-canary: {exact: 'yes'}}}",
            "GET",
            "/",
            &[("x-canary", "no")],
            true,
        ),
        (
            "{withoutHeaders: {x-canary: {exact: 'yes'}}}",
            "GET",
            "/",
            &[],
            true,
        ),
        // queryParams: the first value, percent-decoded; exact, prefix, regex.
        (
            "{queryParams: {v: {exact: 'a b'}}}",
            "GET",
            "/?v=a%20b&v=c",
            &[],
            true,
        ),
        (
            "{queryParams: {v: {exact: c}}}",
            "GET",
            "/?v=a&v=c",
            &[],
            false,
        ),
        (
            "{queryParams: {v: {prefix: ab}}}",
            "GET",
            "/?v=abc",
            &[],
            true,
        ),
        (
            "{queryParams: {v: {regex: '[0-9]+'}}}",
            "GET",
            "/?v=12",
            &[],
            true,
        ),
        (
            "{queryParams: {v: {regex: '[0-9]+'}}}",
            "GET",
            "/?v=12a",
            &[],
            false,
        ),
        ("{queryParams: {v: {exact: a}}}", "GET", "/", &[], false),
        // method: a StringMatch.
        ("{method: {exact: GET}}", "GET", "/", &[], true),
        ("{method: {exact: GET}}", "POST", "/", &[], false),
        ("{method: {regex: 'P(UT|OST)'}}", "PUT", "/", &[], true),
        ("{method: {prefix: P}}", "GET", "/", &[], false),
        // All conditions of one entry must hold.
        (
            "{uri: {prefix: /a}, method: {exact: GET}}",
            "POST",
            "/a",
            &[],
            false,
        ),
    ];
    for (m, method, uri, headers, want) in cases {
        let t = table(&format!("- match: [{m}]\n{ROUTE}"));
        let got = t.select(&request(method, uri, headers)).is_some();
        assert_eq!(got, *want, "{m} on {method} {uri} {headers:?}");
    }
}

#[test]
fn a_match_on_another_port_never_applies_and_a_rule_only_there_is_left_out() {
    let http = format!(
        "- name: admin\n  match: [{{port: 9090, uri: {{prefix: /}}}}]\n{ROUTE}\n\
         - name: mixed\n  match: [{{port: 9090}}, {{port: 9080, uri: {{prefix: /x}}}}]\n{ROUTE}"
    );
    let documents = [doc("vs", None, &format!("hosts: [reviews]\nhttp:\n{http}"))];
    let (at_9080, _) = compile_at(&documents, 9080);
    assert_eq!(selected(&at_9080, &get("/x")), Some(("mixed".into(), 1)));
    assert_eq!(selected(&at_9080, &get("/y")), None);
    let (at_9090, _) = compile_at(&documents, 9090);
    assert_eq!(selected(&at_9090, &get("/x")), Some(("admin".into(), 0)));
    let (at_80, _) = compile_at(&documents, 80);
    assert!(at_80.is_empty());
}

#[test]
fn several_virtual_services_merge_oldest_first_then_by_name() {
    let rule = |name: &str| format!("hosts: [reviews]\nhttp:\n- name: {name}\n{ROUTE}");
    let (t, _) = compile_at(
        &[
            doc("from-file", None, &rule("file")),
            doc("new", Some("2024-06-01T00:00:00Z"), &rule("new")),
            doc("old", Some("2024-01-01T00:00:00Z"), &rule("old")),
            doc("a-file", None, &rule("a-file")),
        ],
        9080,
    );
    let order: Vec<&str> = t.routes().iter().map(|r| r.name.as_str()).collect();
    assert_eq!(order, ["old", "new", "a-file", "from-file"]);
    assert_eq!(selected(&t, &get("/")), Some(("old".into(), 0)));
    assert!(t
        .routes()
        .iter()
        .all(|r| r.kind == RouteKind::VirtualService
            && r.rate_limit.is_none()
            && r.key().starts_with("shop/")));
}

// ---------------------------------------------------------------------------------------------
// Destinations

/// How often each backend of `rule` is picked over `n` evenly spread draws.
fn counts(rule: &Rule, n: u32) -> Vec<u32> {
    let mut counts = vec![0; rule.backends.len()];
    for i in 0..n {
        // Evenly spread over 0..2^32.
        let draw = (u64::from(i) << 32).div_ceil(u64::from(n)) as u32;
        let picked = rule.pick_backend(draw).unwrap();
        let index = rule
            .backends
            .iter()
            .position(|b| std::ptr::eq(b, picked))
            .unwrap();
        counts[index] += 1;
    }
    counts
}

#[test]
fn the_canary_splits_90_10_between_the_subsets() {
    // As operators write it (with DestinationRule `reviews`: subsets v1 and v2 by `version`).
    let yaml = "apiVersion: networking.istio.io/v1
kind: VirtualService
metadata:
  name: reviews
  namespace: shop
spec:
  hosts:
  - reviews
  http:
  - route:
    - destination:
        host: reviews
        subset: v1
      weight: 90
    - destination:
        host: reviews
        subset: v2
      weight: 10
";
    let parsed = parse_virtual_services(yaml).unwrap();
    let mut warnings = Vec::new();
    let t = compile(&[&parsed[0]], 9080, &only_port, &mut warnings);
    let rule = t.select(&get("/reviews/1")).unwrap().rule;
    let refs: Vec<_> = rule.backends.iter().map(|b| &b.reference).collect();
    let v1 = BackendReference {
        group: String::new(),
        kind: "Service".into(),
        name: "reviews".into(),
        namespace: "shop".into(),
        // No port given and two ports: the request's.
        port: Some(9080),
        subset: Some("v1".into()),
    };
    assert_eq!(*refs[0], v1);
    assert_eq!(refs[1].subset.as_deref(), Some("v2"));
    assert!(refs[0].is_service());
    assert_eq!(counts(rule, 10_000), [9_000, 1_000]);
    // Default retries, no timeout.
    assert_eq!(rule.request_timeout, None);
    assert_eq!(rule.retry.as_ref().map(|r| r.retries), Some(2));
}

#[test]
fn destination_ports_and_namespaces_resolve_as_istio_does() {
    let t = table(
        "- route:
  - destination: {host: reviews, port: {number: 9090}}
    weight: 1
  - destination: {host: ratings}
    weight: 1
  - destination: {host: details.other.svc.cluster.local}
    weight: 0",
    );
    let rule = t.select(&get("/")).unwrap().rule;
    let got: Vec<(String, Option<u16>)> = rule
        .backends
        .iter()
        .map(|b| (b.reference.key_for_test(), b.reference.port))
        .collect();
    assert_eq!(
        got,
        [
            ("shop/reviews".to_string(), Some(9090)),
            // The Service's only port.
            ("shop/ratings".to_string(), Some(8080)),
            // Unknown: the request's port.
            ("other/details".to_string(), Some(9080)),
        ]
    );
    // Weight 0 is never picked.
    assert_eq!(counts(rule, 1_000)[2], 0);
    // One destination takes everything, whatever its weight.
    let t = table("- route: [{destination: {host: reviews}, weight: 0}]");
    assert!(t.select(&get("/")).unwrap().rule.pick_backend(7).is_ok());
}

impl BackendReference {
    fn key_for_test(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }
}

// ---------------------------------------------------------------------------------------------
// Header changes

#[test]
fn header_operations_remove_then_set_then_add_at_rule_and_destination_level() {
    let t = table(
        "- headers:
    request:
      set: {x-set: one, x-both: set}
      add: {x-add: two}
      remove: [x-gone, x-both]
    response:
      set: {x-resp: r}
      remove: [server]
  route:
  - destination: {host: reviews}
    headers:
      request: {set: {x-set: destination}, add: {x-dest: d}}
      response: {add: {x-resp: d}}",
    );
    let forwarded = forwarded(
        &t,
        request(
            "GET",
            "/",
            &[
                ("host", "reviews"),
                ("x-add", "zero"),
                ("x-gone", "1"),
                ("x-both", "old"),
            ],
        ),
    );
    let h = &forwarded.headers;
    // The destination's set comes after the rule's.
    assert_eq!(header_list(h, "x-set"), ["destination"]);
    // Removed before set: the set value stays.
    assert_eq!(header_list(h, "x-both"), ["set"]);
    // `add` appends a field of its own.
    assert_eq!(header_list(h, "x-add"), ["zero", "two"]);
    assert_eq!(header_list(h, "x-dest"), ["d"]);
    assert!(h.get("x-gone").is_none());
    // Responses: the rule's, then the destination's.
    let rule = t.select(&get("/")).unwrap().rule;
    let (mut response, ()) = http::Response::builder()
        .header("server", "app")
        .header("x-resp", "app")
        .body(())
        .unwrap()
        .into_parts();
    rule.filters.apply_response(&mut response);
    rule.backends[0].filters.apply_response(&mut response);
    assert_eq!(header_list(&response.headers, "x-resp"), ["r", "d"]);
    assert!(response.headers.get("server").is_none());
}

#[test]
fn a_host_header_set_rewrites_the_authority() {
    let t = table("- headers: {request: {set: {host: ratings.example}}}\n  route: [{destination: {host: reviews}}]");
    let origin_form = forwarded(&t, get("/a"));
    assert_eq!(
        header_list(&origin_form.headers, "host"),
        ["ratings.example"]
    );
    let absolute = forwarded(&t, request("GET", "http://reviews:9080/a", &[]));
    assert_eq!(absolute.uri.to_string(), "http://ratings.example/a");
}

// ---------------------------------------------------------------------------------------------
// Rewrites

#[test]
fn rewrite_uri_replaces_what_the_match_matched() {
    // (match entry or none, rewrite uri, request path, forwarded path and query)
    let cases = [
        (
            Some("{uri: {prefix: /foo}}"),
            "/bar",
            "/foo/x?q=1",
            "/bar/x?q=1",
        ),
        // A plain string prefix: the rest is kept as it is.
        (Some("{uri: {prefix: /foo}}"), "/bar", "/foobaz", "/barbaz"),
        (Some("{uri: {prefix: /foo/}}"), "/", "/foo/x", "/x"),
        (
            Some("{uri: {prefix: /Foo}, ignoreUriCase: true}"),
            "/b",
            "/FOO/x",
            "/b/x",
        ),
        // exact and regex: the whole path; the query stays.
        (Some("{uri: {exact: /old}}"), "/new", "/old?q=1", "/new?q=1"),
        (Some("{uri: {regex: '/o.d'}}"), "/new", "/old", "/new"),
        // No uri match: Envoy's route matches prefix `/`, which is what is replaced.
        (None, "/v2", "/foo", "/v2foo"),
        (
            Some("{headers: {x: {exact: y}}}"),
            "/v2/",
            "/foo",
            "/v2/foo",
        ),
    ];
    for (m, uri, path, want) in cases {
        let mut rule = format!("- rewrite: {{uri: '{uri}'}}\n");
        if let Some(m) = m {
            rule += &format!("  match: [{m}]\n");
        }
        let t = table(&(rule + ROUTE));
        let forwarded = forwarded(&t, request("GET", path, &[("x", "y")]));
        assert_eq!(forwarded.uri.to_string(), want, "{m:?} {uri} {path}");
    }
}

#[test]
fn uri_regex_rewrite_replaces_every_match_with_groups() {
    let t = table(
        "- rewrite:
    uriRegexRewrite: {match: '^/service/([^/]+)(/.*)$', rewrite: '\\2/instance/\\1'}
  route: [{destination: {host: reviews}}]",
    );
    let forwarded = forwarded(&t, get("/service/foo/v1/api?x=$1"));
    assert_eq!(forwarded.uri.to_string(), "/v1/api/instance/foo?x=$1");
    // Every match, and a `$` of the replacement is literal.
    let t = table(
        "- rewrite: {uriRegexRewrite: {match: 'a', rewrite: '$b'}}\n  route: [{destination: {host: reviews}}]",
    );
    assert_eq!(forwarded_path(&t, "/banana"), "/b$bn$bn$b");
    assert_eq!(envoy_substitution(r"\1-\\-$0"), r"${1}-\-$$0");
}

fn forwarded_path(t: &RouteTable, path: &str) -> String {
    forwarded(t, get(path)).uri.to_string()
}

#[test]
fn rewrite_authority_replaces_the_host() {
    let t =
        table("- rewrite: {authority: 'ratings:8080'}\n  route: [{destination: {host: reviews}}]");
    let forwarded = forwarded(&t, get("/x"));
    assert_eq!(header_list(&forwarded.headers, "host"), ["ratings:8080"]);
    assert_eq!(forwarded.uri.to_string(), "/x");
}

// ---------------------------------------------------------------------------------------------
// Answers of the waypoint

fn outcome(t: &RouteTable, mut request: request::Parts) -> RequestOutcome {
    let rule = t.select(&request).expect("a rule matches").rule;
    rule.filters
        .apply_request(&mut request, &HTTP_9080)
        .unwrap()
}

#[test]
fn redirects_answer_with_the_location_istio_builds() {
    // (redirect, request, status, Location)
    let cases = [
        (
            "{uri: /v2/reviews}",
            "/reviews/1?x=1",
            301,
            "http://reviews:9080/v2/reviews?x=1",
        ),
        (
            "{uri: '/new?a=b', redirectCode: 302}",
            "/old?x=1",
            302,
            "http://reviews:9080/new?a=b",
        ),
        (
            "{authority: 'example.com:8443', scheme: https}",
            "/p",
            301,
            "https://example.com:8443/p",
        ),
        ("{scheme: https}", "/p", 301, "https://reviews/p"),
        // A new host without a port: no port (not the request's).
        (
            "{authority: example.com}",
            "/p",
            301,
            "http://example.com/p",
        ),
        ("{port: 8000}", "/p", 301, "http://reviews:8000/p"),
    ];
    for (redirect, path, status, location) in cases {
        let t = table(&format!("- redirect: {redirect}"));
        match outcome(&t, get(path)) {
            RequestOutcome::Redirect(parts) => {
                assert_eq!(parts.status.as_u16(), status, "{redirect}");
                assert_eq!(parts.headers[LOCATION], location, "{redirect}");
            }
            other => panic!("{redirect}: {other:?}"),
        }
    }
}

#[test]
fn a_direct_response_answers_with_its_status_body_and_response_headers() {
    let t = table(
        "- directResponse: {status: 503, body: {string: 'down for maintenance'}}
  headers: {response: {set: {retry-after: '120'}}}",
    );
    match outcome(&t, get("/")) {
        RequestOutcome::Respond(parts, body) => {
            assert_eq!(parts.status, StatusCode::SERVICE_UNAVAILABLE);
            assert_eq!(&body[..], b"down for maintenance");
            assert_eq!(parts.headers[CONTENT_TYPE], "text/plain");
            assert_eq!(parts.headers["retry-after"], "120");
        }
        other => panic!("{other:?}"),
    }
    let t = table("- directResponse: {status: 204}");
    match outcome(&t, get("/")) {
        RequestOutcome::Respond(parts, body) => {
            assert_eq!(parts.status, StatusCode::NO_CONTENT);
            assert!(body.is_empty());
            assert!(parts.headers.get(CONTENT_TYPE).is_none());
        }
        other => panic!("{other:?}"),
    }
    let rule = t.select(&get("/")).unwrap().rule;
    assert!(rule.backends.is_empty());
}

// ---------------------------------------------------------------------------------------------
// Mirrors, timeouts, retries, faults

#[test]
fn mirrors_take_their_percentage_to_the_millionth() {
    let t = table(
        "- route: [{destination: {host: reviews}}]
  mirrors:
  - destination: {host: ratings, subset: v2}
    percentage: {value: 12.5}
  - destination: {host: reviews}",
    );
    let rule = t.select(&get("/")).unwrap().rule;
    let mirrors: Vec<&Mirror> = rule
        .filters
        .0
        .iter()
        .filter_map(|f| match f {
            Filter::RequestMirror(m) => Some(m),
            _ => None,
        })
        .collect();
    assert_eq!(mirrors.len(), 2);
    assert_eq!(
        (mirrors[0].numerator, mirrors[0].denominator),
        (125_000, MILLION)
    );
    assert_eq!(mirrors[0].backend.subset.as_deref(), Some("v2"));
    assert_eq!(mirrors[0].backend.port, Some(8080));
    // An eighth of the draws, and the second mirror (no percentage) every time.
    let eighth = (u64::from(u32::MAX) + 1) / 8;
    assert!(mirrors[0].takes((eighth - 1) as u32));
    assert!(!mirrors[0].takes(eighth as u32));
    assert!(mirrors[1].takes(u32::MAX));
    let t = table(
        "- route: [{destination: {host: reviews}}]
  mirror: {host: ratings}
  mirrorPercentage: {value: 0.000001}",
    );
    let rule = t.select(&get("/")).unwrap().rule;
    let Filter::RequestMirror(m) = &rule.filters.0[0] else {
        panic!("{:?}", rule.filters);
    };
    assert_eq!((m.numerator, m.denominator), (0, MILLION));
    assert_eq!(rule.filters.mirrors(0).count(), 0);
}

#[test]
fn timeout_retries_and_faults_map_onto_the_rule() {
    let t = table(
        "- timeout: 3s
  retries: {attempts: 4, perTryTimeout: 500ms, retryOn: '5xx,reset,retriable-4xx,409,503,unavailable,deadline-exceeded,gateway-error'}
  fault:
    delay: {percentage: {value: 10}, fixedDelay: 2s}
    abort: {percentage: {value: 50}, grpcStatus: UNAVAILABLE}
  route: [{destination: {host: reviews}}]",
    );
    let rule = t.select(&get("/")).unwrap().rule;
    assert_eq!(rule.request_timeout, Some(Duration::from_secs(3)));
    assert_eq!(
        rule.backend_request_timeout,
        Some(Duration::from_millis(500))
    );
    let retry = rule.retry.as_ref().unwrap();
    assert_eq!(retry.retries, 4);
    assert_eq!(retry.per_try_timeout, Some(Duration::from_millis(500)));
    assert_eq!(retry.backoff, DEFAULT_BACKOFF);
    assert_eq!(
        retry.on,
        retry::RetryOn {
            server_error: true,
            gateway_error: true,
            reset: true,
            retriable_4xx: true,
            codes: vec![409, 503],
            grpc: vec![14, 4],
            ..retry::RetryOn::default()
        }
    );
    assert_eq!(
        rule.fault,
        Some(Fault {
            delay: Some((0.1, Duration::from_secs(2))),
            abort: Some((0.5, AbortWith::Grpc(14))),
        })
    );
    let t = table("- fault: {abort: {httpStatus: 418}}\n  route: [{destination: {host: reviews}}]");
    let fault = t.select(&get("/")).unwrap().rule.fault.clone().unwrap();
    assert_eq!(
        fault.abort,
        Some((0.0, AbortWith::Status(StatusCode::IM_A_TEAPOT)))
    );
    assert_eq!(fault.delay, None);
}

#[test]
fn without_retries_istio_s_default_policy_applies_and_attempts_0_disables() {
    let t = table(&format!("- name: plain\n{ROUTE}"));
    let retry = t.select(&get("/")).unwrap().rule.retry.clone().unwrap();
    assert_eq!(retry.retries, 2);
    assert_eq!(retry.per_try_timeout, None);
    assert_eq!(
        retry.on,
        retry::RetryOn {
            connect_failure: true,
            refused_stream: true,
            codes: vec![503],
            grpc: vec![14, 1],
            ..retry::RetryOn::default()
        }
    );
    // `retries` without `retryOn`: the default conditions, its own attempts.
    let t = table(&format!("- retries: {{attempts: 5}}\n{ROUTE}"));
    let retry = t.select(&get("/")).unwrap().rule.retry.clone().unwrap();
    assert_eq!((retry.retries, retry.on.codes.clone()), (5, vec![503]));
    let t = table(&format!("- retries: {{attempts: 0}}\n{ROUTE}"));
    assert!(t.select(&get("/")).unwrap().rule.retry.is_none());
    // `retriable-status-codes` alone lists no code: none is retried.
    let t = table(&format!(
        "- retries: {{attempts: 1, retryOn: 'retriable-status-codes,connect-failure'}}\n{ROUTE}"
    ));
    let on = t.select(&get("/")).unwrap().rule.retry.clone().unwrap().on;
    assert!(on.codes.is_empty() && on.connect_failure && on.grpc.is_empty());
}

#[test]
fn retry_words_the_waypoint_cannot_honour_are_reported() {
    let documents = [doc(
        "vs",
        None,
        &format!(
            "hosts: [reviews]\nhttp:\n- retries: {{attempts: 1, retryOn: \
             'envoy-ratelimited,retriable-headers,5xx'}}\n{ROUTE}"
        ),
    )];
    let (t, warnings) = compile_at(&documents, 9080);
    assert_eq!(warnings.len(), 2, "{warnings:?}");
    assert!(warnings[0].starts_with(
        "VirtualService shop/vs spec.http[0].retries.retryOn: `envoy-ratelimited` is ignored"
    ));
    assert!(warnings[1].contains("`retriable-headers` is ignored"));
    let on = t.select(&get("/")).unwrap().rule.retry.clone().unwrap().on;
    assert_eq!(
        on,
        retry::RetryOn {
            server_error: true,
            ..retry::RetryOn::default()
        }
    );
}

#[test]
fn a_host_header_used_for_matching_is_the_host() {
    // `:authority` matches the Host header of an origin-form request.
    let t = table(&format!(
        "- match: [{{headers: {{':authority': {{prefix: reviews}}}}}}]\n{ROUTE}"
    ));
    assert!(t
        .select(&request("GET", "/", &[(HOST.as_str(), "reviews.shop")]))
        .is_some());
    assert!(t
        .select(&request("GET", "/", &[(HOST.as_str(), "ratings")]))
        .is_none());
    // `host` reads the authority too: an absolute-form (HTTP/2) request has no Host header.
    let t = table(&format!(
        "- match: [{{headers: {{host: {{exact: 'reviews:9080'}}}}}}]\n{ROUTE}"
    ));
    assert!(t
        .select(&request("GET", "http://reviews:9080/", &[]))
        .is_some());
    assert!(t
        .select(&request("GET", "/", &[(HOST.as_str(), "reviews:9080")]))
        .is_some());
}

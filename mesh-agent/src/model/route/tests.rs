//! Reading HTTPRoutes (fields, defaults, refused fields), validation with field paths, and
//! GEP-2257 durations.
use std::time::Duration;

use super::*;
use crate::model::FieldError;

/// A route document around `spec` (YAML indented by two spaces under `spec:`).
fn route_yaml(spec: &str) -> String {
    let spec: String = spec
        .trim_matches('\n')
        .lines()
        .map(|l| format!("  {l}\n"))
        .collect();
    format!(
        "apiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata:\n  name: r\n  \
         namespace: ns\nspec:\n{spec}"
    )
}

/// Reads one route without validating it.
fn read(spec: &str) -> HttpRoute {
    let yaml = route_yaml(spec);
    serde_yaml_ng::from_str(&yaml).unwrap_or_else(|e| panic!("{e}\n---\n{yaml}"))
}

fn read_error(spec: &str) -> String {
    let yaml = route_yaml(spec);
    match serde_yaml_ng::from_str::<HttpRoute>(&yaml) {
        Ok(route) => panic!("read: {route:?}\n---\n{yaml}"),
        Err(e) => e.to_string(),
    }
}

fn validation_error(spec: &str) -> FieldError {
    let route = read(spec);
    match route.validate() {
        Ok(()) => panic!("valid: {route:?}"),
        Err(e) => e,
    }
}

fn valid(spec: &str) -> HttpRoute {
    let route = read(spec);
    route
        .validate()
        .unwrap_or_else(|e| panic!("{e}\n---\n{spec}"));
    route
}

#[test]
fn a_full_route_reads_every_standard_field() {
    let yaml = r#"
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata:
  name: reviews
  namespace: bookinfo
  labels: {app: reviews}
  annotations: {note: x}
  creationTimestamp: "2024-05-01T12:00:00Z"
spec:
  parentRefs:
  - {group: "", kind: Service, name: reviews, port: 9080}
  - {name: waypoint, namespace: istio-system, sectionName: http}
  hostnames: ["reviews.example.com", "*.example.com"]
  rules:
  - name: canary
    matches:
    - path: {type: Exact, value: /reviews}
      headers:
      - {name: X-Version, value: v2}
      - {type: RegularExpression, name: user, value: "jason|json"}
      queryParams:
      - {name: debug, value: "1"}
      method: GET
    filters:
    - type: RequestHeaderModifier
      requestHeaderModifier:
        set: [{name: x-set, value: a}]
        add: [{name: x-add, value: b}]
        remove: [x-remove]
    - type: ResponseHeaderModifier
      responseHeaderModifier: {remove: [server]}
    - type: RequestMirror
      requestMirror:
        backendRef: {name: shadow, port: 80}
        fraction: {numerator: 1, denominator: 1000}
    - type: URLRewrite
      urlRewrite:
        hostname: internal.example.com
        path: {type: ReplaceFullPath, replaceFullPath: /v2/reviews}
    backendRefs:
    - name: reviews-v1
      port: 9080
      weight: 90
    - name: reviews-v2
      namespace: canary
      port: 9080
      weight: 10
      filters:
      - type: RequestHeaderModifier
        requestHeaderModifier: {add: [{name: x-canary, value: "true"}]}
    timeouts: {request: 10s, backendRequest: 500ms}
    retry: {codes: [502, 503], attempts: 4, backoff: 50ms}
  - matches:
    - path: {type: PathPrefix, value: /old}
    filters:
    - type: RequestRedirect
      requestRedirect:
        scheme: https
        hostname: new.example.com
        path: {type: ReplacePrefixMatch, replacePrefixMatch: /new}
        port: 8443
        statusCode: 301
"#;
    let routes = parse_routes(yaml).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(routes.len(), 1);
    let route = &routes[0];
    assert_eq!(route.key(), "bookinfo/reviews");
    assert_eq!(
        route.metadata.creation_timestamp.as_deref(),
        Some("2024-05-01T12:00:00Z")
    );
    assert_eq!(
        route.spec.parent_refs,
        [
            ParentReference {
                group: String::new(),
                kind: "Service".into(),
                namespace: None,
                name: "reviews".into(),
                section_name: None,
                port: Some(9080),
            },
            ParentReference {
                group: "gateway.networking.k8s.io".into(),
                kind: "Gateway".into(),
                namespace: Some("istio-system".into()),
                name: "waypoint".into(),
                section_name: Some("http".into()),
                port: None,
            },
        ]
    );
    assert_eq!(
        route.spec.hostnames,
        ["reviews.example.com", "*.example.com"]
    );
    let rule = &route.spec.rules[0];
    assert_eq!(rule.name.as_deref(), Some("canary"));
    let m = &rule.matches[0];
    assert_eq!(
        m.path,
        HttpPathMatch {
            type_: PathMatchType::Exact,
            value: "/reviews".into()
        }
    );
    assert_eq!(m.headers[0].type_, ValueMatchType::Exact);
    assert_eq!(m.headers[1].type_, ValueMatchType::RegularExpression);
    assert_eq!(m.query_params[0].name, "debug");
    assert_eq!(m.method, Some(HttpMethod::Get));
    let types: Vec<_> = rule.filters.iter().map(|f| f.type_name()).collect();
    assert_eq!(
        types,
        [
            "RequestHeaderModifier",
            "ResponseHeaderModifier",
            "RequestMirror",
            "URLRewrite"
        ]
    );
    let HttpRouteFilter::RequestMirror(mirror) = &rule.filters[2] else {
        panic!("{:?}", rule.filters[2]);
    };
    assert_eq!(mirror.share(), (1, 1000));
    assert_eq!(mirror.backend_ref.kind, "Service");
    assert_eq!(
        rule.backend_refs[1].backend.namespace.as_deref(),
        Some("canary")
    );
    assert_eq!(rule.backend_refs[1].weight, 10);
    assert_eq!(rule.backend_refs[1].filters.len(), 1);
    assert_eq!(
        rule.timeouts,
        Some(HttpRouteTimeouts {
            request: Some(Duration::from_secs(10)),
            backend_request: Some(Duration::from_millis(500)),
        })
    );
    assert_eq!(
        rule.retry,
        Some(HttpRouteRetry {
            codes: vec![502, 503],
            attempts: Some(4),
            backoff: Some(Duration::from_millis(50)),
        })
    );
    let HttpRouteFilter::RequestRedirect(redirect) = &route.spec.rules[1].filters[0] else {
        panic!("{:?}", route.spec.rules[1].filters[0]);
    };
    assert_eq!(
        *redirect,
        HttpRequestRedirectFilter {
            scheme: Some(RedirectScheme::Https),
            hostname: Some("new.example.com".into()),
            path: Some(HttpPathModifier::ReplacePrefixMatch("/new".into())),
            port: Some(8443),
            status_code: 301,
        }
    );
}

#[test]
fn defaults_are_filled_in_as_the_crd_defaults_them() {
    let route = read(
        r#"
parentRefs: [{name: gw}]
rules:
- backendRefs: [{name: a, port: 80}]
- matches:
  - path: {}
  - path: {type: Exact}
  - path: {value: /foo}
  - headers: [{name: h, value: v}]
    queryParams: [{name: q, value: v}]
  filters:
  - type: RequestRedirect
    requestRedirect: {}
  - type: RequestMirror
    requestMirror: {backendRef: {name: m, port: 1}, fraction: {numerator: 5}}
- matches: []
"#,
    );
    assert_eq!(route.metadata.namespace, "ns");
    let parent = &route.spec.parent_refs[0];
    assert_eq!(
        (parent.group.as_str(), parent.kind.as_str()),
        ("gateway.networking.k8s.io", "Gateway")
    );
    let prefix_root = HttpPathMatch {
        type_: PathMatchType::PathPrefix,
        value: "/".into(),
    };
    // A rule without matches matches `PathPrefix /`; so does an empty list.
    assert_eq!(route.spec.rules[0].matches, [HttpRouteMatch::default()]);
    assert_eq!(route.spec.rules[0].matches[0].path, prefix_root);
    assert_eq!(route.spec.rules[2].matches, [HttpRouteMatch::default()]);
    let backend = &route.spec.rules[0].backend_refs[0];
    assert_eq!(
        (
            backend.backend.group.as_str(),
            backend.backend.kind.as_str()
        ),
        ("", "Service")
    );
    assert_eq!(backend.weight, 1);
    let matches = &route.spec.rules[1].matches;
    assert_eq!(matches[0].path, prefix_root);
    assert_eq!(
        matches[1].path,
        HttpPathMatch {
            type_: PathMatchType::Exact,
            value: "/".into()
        }
    );
    assert_eq!(
        matches[2].path,
        HttpPathMatch {
            type_: PathMatchType::PathPrefix,
            value: "/foo".into()
        }
    );
    assert_eq!(matches[3].path, prefix_root);
    assert_eq!(matches[3].headers[0].type_, ValueMatchType::Exact);
    assert_eq!(matches[3].query_params[0].type_, ValueMatchType::Exact);
    let HttpRouteFilter::RequestRedirect(redirect) = &route.spec.rules[1].filters[0] else {
        panic!();
    };
    assert_eq!(redirect.status_code, 302);
    let HttpRouteFilter::RequestMirror(mirror) = &route.spec.rules[1].filters[1] else {
        panic!();
    };
    assert_eq!(mirror.share(), (5, 100));
}

#[test]
fn a_route_without_rules_gets_the_default_rule_and_a_file_route_the_default_namespace() {
    let routes = parse_routes(
        "apiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata: {name: r}\nspec: {}\n",
    )
    .unwrap();
    assert_eq!(routes[0].metadata.namespace, "default");
    assert_eq!(routes[0].spec.rules, [HttpRouteRule::default()]);
    assert!(routes[0].spec.rules[0].backend_refs.is_empty());
}

#[test]
fn fields_outside_the_standard_channel_are_refused_by_name() {
    let cases: &[(&str, &str, &[&str])] = &[
        (
            "sessionPersistence",
            "rules:\n- sessionPersistence: {sessionName: s}\n",
            &["`sessionPersistence` is not supported", "experimental channel"],
        ),
        (
            "useDefaultGateways",
            "useDefaultGateways: All\n",
            &["`useDefaultGateways` is not supported", "experimental channel"],
        ),
        (
            "CORS filter type",
            "rules:\n- filters:\n  - type: CORS\n",
            &["spec.rules[0].filters[0]", "filter type CORS is not supported", "experimental"],
        ),
        (
            "cors field",
            "rules:\n- filters:\n  - cors: {allowOrigins: ['*']}\n    type: CORS\n",
            &["`cors` is not supported", "experimental channel"],
        ),
        (
            "ExternalAuth filter type",
            "rules:\n- filters:\n  - type: ExternalAuth\n",
            &["filter type ExternalAuth is not supported", "experimental"],
        ),
        (
            "externalAuth field",
            "rules:\n- filters:\n  - type: ExternalAuth\n    externalAuth: {protocol: HTTP}\n",
            &["`externalAuth` is not supported"],
        ),
        (
            "ExtensionRef filter type",
            "rules:\n- filters:\n  - type: ExtensionRef\n",
            &["filter type ExtensionRef is not supported", "implementation-specific"],
        ),
        (
            "extensionRef field",
            "rules:\n- filters:\n  - type: ExtensionRef\n    extensionRef: {group: g, kind: K, name: n}\n",
            &["`extensionRef` is not supported", "implementation-specific"],
        ),
    ];
    for (what, spec, expected) in cases {
        let error = read_error(spec);
        for part in *expected {
            assert!(
                error.contains(part),
                "{what}: error {error:?} lacks {part:?}"
            );
        }
    }
}

#[test]
fn reading_errors_name_the_field_and_the_problem() {
    let cases: &[(&str, &str, &[&str])] = &[
        ("unknown field", "rules:\n- mathces: []\n", &["spec.rules[0]", "unknown field `mathces`"]),
        (
            "unknown path type",
            "rules:\n- matches:\n  - path: {type: Prefix, value: /}\n",
            &["spec.rules[0].matches[0].path.type", "unknown variant `Prefix`"],
        ),
        (
            "unknown method",
            "rules:\n- matches:\n  - method: get\n",
            &["spec.rules[0].matches[0].method", "unknown variant `get`"],
        ),
        (
            "unknown filter type",
            "rules:\n- filters:\n  - type: Rewrite\n",
            &["spec.rules[0].filters[0]", "unknown filter type \"Rewrite\"", "URLRewrite"],
        ),
        (
            "filter without its settings",
            "rules:\n- filters:\n  - type: URLRewrite\n",
            &["needs its settings in `urlRewrite`"],
        ),
        (
            "settings of another type",
            "rules:\n- filters:\n  - type: RequestHeaderModifier\n    requestHeaderModifier: {}\n    \
             responseHeaderModifier: {}\n",
            &["`responseHeaderModifier` is set on a filter of type RequestHeaderModifier"],
        ),
        (
            "path modifier of the other type",
            "rules:\n- filters:\n  - type: URLRewrite\n    urlRewrite:\n      path: {type: \
             ReplaceFullPath, replacePrefixMatch: /x}\n",
            &["spec.rules[0].filters[0].urlRewrite.path", "set only `replaceFullPath`"],
        ),
        (
            "unknown scheme",
            "rules:\n- filters:\n  - type: RequestRedirect\n    requestRedirect: {scheme: ftp}\n",
            &["requestRedirect.scheme", "unknown variant `ftp`"],
        ),
        (
            "negative weight",
            "rules:\n- backendRefs: [{name: a, port: 80, weight: -1}]\n",
            &["spec.rules[0].backendRefs[0].weight", "-1"],
        ),
        (
            "negative retry attempts",
            "rules:\n- retry: {attempts: -1}\n",
            &["spec.rules[0].retry.attempts", "-1"],
        ),
        (
            "bad retry backoff",
            "rules:\n- retry: {backoff: 1.5s}\n",
            &["spec.rules[0].retry.backoff", "not a Gateway API duration"],
        ),
        (
            "unknown retry field",
            "rules:\n- retry: {perTryTimeout: 1s}\n",
            &["spec.rules[0].retry", "unknown field `perTryTimeout`"],
        ),
        (
            "bad duration",
            "rules:\n- timeouts: {request: 1.5s}\n",
            &["spec.rules[0].timeouts.request", "\"1.5s\" is not a Gateway API duration"],
        ),
    ];
    for (what, spec, expected) in cases {
        let error = read_error(spec);
        for part in *expected {
            assert!(
                error.contains(part),
                "{what}: error {error:?} lacks {part:?}"
            );
        }
    }
}

#[test]
fn documents_of_another_api_or_kind_are_refused() {
    let error = parse_routes(
        "apiVersion: gateway.networking.k8s.io/v1beta1\nkind: HTTPRoute\nmetadata: {name: r}\n\
         spec: {}\n",
    )
    .unwrap_err();
    assert!(error.contains("document 1"), "{error}");
    assert!(
        error.contains("unsupported apiVersion \"gateway.networking.k8s.io/v1beta1\""),
        "{error}"
    );
    let error = parse_routes(
        "apiVersion: gateway.networking.k8s.io/v1\nkind: GRPCRoute\nmetadata: {name: r}\nspec: {}\n",
    )
    .unwrap_err();
    assert!(
        error.contains("unsupported kind \"GRPCRoute\": expected HTTPRoute"),
        "{error}"
    );
}

#[test]
fn parse_routes_reads_several_documents_and_names_the_invalid_one() {
    let one = route_yaml("rules: [{backendRefs: [{name: a, port: 80}]}]");
    let two = route_yaml("hostnames: [\"Bad_Host\"]");
    assert_eq!(parse_routes(&format!("{one}---\n{one}")).unwrap().len(), 2);
    let error = parse_routes(&format!("{one}---\n{two}")).unwrap_err();
    assert!(
        error.starts_with("document 2 (HTTPRoute ns/r): field `spec.hostnames[0]`:"),
        "{error}"
    );
}

#[test]
fn validation_errors_carry_the_field_path() {
    // (spec, field path, part of the message)
    let cases: &[(&str, &str, &str)] = &[
        (
            "rules:\n- {}\n- matches:\n  - path: {type: PathPrefix, value: foo}\n",
            "spec.rules[1].matches[0].path.value",
            "must be an absolute path, starting with '/'",
        ),
        (
            "rules:\n- matches:\n  - path: {type: Exact, value: /a//b}\n",
            "spec.rules[0].matches[0].path.value",
            "must not contain \"//\"",
        ),
        (
            "rules:\n- matches:\n  - path: {value: /a/../b}\n",
            "spec.rules[0].matches[0].path.value",
            "must not contain \"/../\"",
        ),
        (
            "rules:\n- matches:\n  - path: {value: /a%2Fb}\n",
            "spec.rules[0].matches[0].path.value",
            "must not contain \"%2F\"",
        ),
        (
            "rules:\n- matches:\n  - path: {value: /a/.}\n",
            "spec.rules[0].matches[0].path.value",
            "must not end with \"/.\"",
        ),
        (
            "rules:\n- matches:\n  - path: {value: /a b}\n",
            "spec.rules[0].matches[0].path.value",
            "contains ' ', which is not allowed in a path",
        ),
        (
            "rules:\n- matches:\n  - path: {value: /a%zz}\n",
            "spec.rules[0].matches[0].path.value",
            "'%' must start an escape",
        ),
        (
            "rules:\n- matches:\n  - path: {type: RegularExpression, value: \"/a(\"}\n",
            "spec.rules[0].matches[0].path.value",
            "is not a valid regular expression",
        ),
        (
            "rules:\n- matches:\n  - path: {type: RegularExpression, value: \"a)|(b\"}\n",
            "spec.rules[0].matches[0].path.value",
            "is not a valid regular expression",
        ),
        (
            "rules:\n- matches:\n  - headers: [{name: \":path\", value: /}]\n",
            "spec.rules[0].matches[0].headers[0].name",
            "is not a valid header name",
        ),
        (
            "rules:\n- matches:\n  - headers: [{name: a, value: x}, {name: a, value: y}]\n",
            "spec.rules[0].matches[0].headers[1].name",
            "is matched twice",
        ),
        (
            "rules:\n- matches:\n  - headers: [{type: RegularExpression, name: a, value: \"[\"}]\n",
            "spec.rules[0].matches[0].headers[0].value",
            "is not a valid regular expression",
        ),
        (
            "rules:\n- matches:\n  - queryParams: [{name: q, value: \"\"}]\n",
            "spec.rules[0].matches[0].queryParams[0].value",
            "must be 1 to 1024 characters",
        ),
        (
            "hostnames: [\"*\"]\n",
            "spec.hostnames[0]",
            "is not a valid host name",
        ),
        (
            "hostnames: [\"a.*.example.com\"]\n",
            "spec.hostnames[0]",
            "is not a valid host name",
        ),
        (
            "hostnames: [\"10.0.0.1\"]\n",
            "spec.hostnames[0]",
            "is an IP address",
        ),
        (
            "parentRefs: [{name: gw}, {name: gw}]\n",
            "spec.parentRefs[1].sectionName",
            "each reference must name a sectionName",
        ),
        (
            "parentRefs: [{name: gw, sectionName: a}, {name: gw, sectionName: a}]\n",
            "spec.parentRefs[1].sectionName",
            "sections must differ",
        ),
        (
            "parentRefs: [{name: gw, port: 0}]\n",
            "spec.parentRefs[0].port",
            "port 0 is not a port",
        ),
        (
            "rules:\n- name: a\n- name: a\n",
            "spec.rules[1].name",
            "is used twice",
        ),
        (
            "rules:\n- backendRefs: [{name: a}]\n",
            "spec.rules[0].backendRefs[0].port",
            "Service a needs a port",
        ),
        (
            "rules:\n- backendRefs: [{name: a, port: 80, weight: 1000001}]\n",
            "spec.rules[0].backendRefs[0].weight",
            "above the maximum, 1000000",
        ),
        (
            "rules:\n- backendRefs: [{name: a, port: 80, namespace: Bad}]\n",
            "spec.rules[0].backendRefs[0].namespace",
            "is not a valid namespace",
        ),
        (
            "rules:\n- filters:\n  - {type: RequestHeaderModifier, requestHeaderModifier: {set: \
             [{name: X-A, value: a}], remove: [x-a]}}\n",
            "spec.rules[0].filters[0].requestHeaderModifier.remove[0]",
            "only one action per header",
        ),
        (
            "rules:\n- filters:\n  - {type: RequestHeaderModifier, requestHeaderModifier: {add: \
             [{name: x, value: \"a\\nb\"}]}}\n",
            "spec.rules[0].filters[0].requestHeaderModifier.add[0].value",
            "control character",
        ),
        (
            "rules:\n- filters:\n  - {type: ResponseHeaderModifier, responseHeaderModifier: {}}\n  \
             - {type: ResponseHeaderModifier, responseHeaderModifier: {}}\n",
            "spec.rules[0].filters[1]",
            "a second ResponseHeaderModifier filter: it cannot be repeated",
        ),
        (
            "rules:\n- filters:\n  - {type: URLRewrite, urlRewrite: {}}\n  - {type: \
             RequestRedirect, requestRedirect: {}}\n",
            "spec.rules[0].filters[1]",
            "RequestRedirect cannot be used with a URLRewrite filter",
        ),
        (
            "rules:\n- filters:\n  - {type: RequestRedirect, requestRedirect: {}}\n  backendRefs: \
             [{name: a, port: 80}]\n",
            "spec.rules[0].filters[0]",
            "cannot be used with backendRefs",
        ),
        (
            "rules:\n- filters:\n  - {type: RequestRedirect, requestRedirect: {statusCode: 307}}\n",
            "spec.rules[0].filters[0].requestRedirect.statusCode",
            "307 is not supported: use 301 or 302",
        ),
        (
            "rules:\n- filters:\n  - {type: RequestRedirect, requestRedirect: {hostname: \
             \"*.example.com\"}}\n",
            "spec.rules[0].filters[0].requestRedirect.hostname",
            "is not a valid host name",
        ),
        (
            "rules:\n- matches: [{path: {type: Exact, value: /a}}]\n  filters:\n  - {type: \
             URLRewrite, urlRewrite: {path: {type: ReplacePrefixMatch, replacePrefixMatch: /b}}}\n",
            "spec.rules[0].filters[0].urlRewrite.path",
            "ReplacePrefixMatch needs the rule to have exactly one match",
        ),
        (
            "rules:\n- matches: [{path: {value: /a}}, {path: {value: /b}}]\n  backendRefs:\n  - \
             name: a\n    port: 80\n    filters:\n    - {type: URLRewrite, urlRewrite: {path: \
             {type: ReplacePrefixMatch, replacePrefixMatch: /b}}}\n",
            "spec.rules[0].backendRefs[0].filters[0].urlRewrite.path",
            "ReplacePrefixMatch needs the rule to have exactly one match",
        ),
        (
            "rules:\n- filters:\n  - {type: URLRewrite, urlRewrite: {path: {type: \
             ReplaceFullPath, replaceFullPath: \"x\"}}}\n",
            "spec.rules[0].filters[0].urlRewrite.path.replaceFullPath",
            "must be an absolute path",
        ),
        (
            "rules:\n- filters:\n  - {type: RequestMirror, requestMirror: {backendRef: {name: m, \
             port: 80}, percent: 101}}\n",
            "spec.rules[0].filters[0].requestMirror.percent",
            "101 is above 100",
        ),
        (
            "rules:\n- filters:\n  - {type: RequestMirror, requestMirror: {backendRef: {name: m, \
             port: 80}, percent: 5, fraction: {numerator: 1}}}\n",
            "spec.rules[0].filters[0].requestMirror",
            "set `percent` or `fraction`, not both",
        ),
        (
            "rules:\n- filters:\n  - {type: RequestMirror, requestMirror: {backendRef: {name: m, \
             port: 80}, fraction: {numerator: 3, denominator: 2}}}\n",
            "spec.rules[0].filters[0].requestMirror.fraction.numerator",
            "3 is above the denominator, 2",
        ),
        (
            "rules:\n- filters:\n  - {type: RequestMirror, requestMirror: {backendRef: {name: \
             m}}}\n",
            "spec.rules[0].filters[0].requestMirror.backendRef.port",
            "needs a port",
        ),
        (
            "rules:\n- timeouts: {request: 1s, backendRequest: 2s}\n",
            "spec.rules[0].timeouts.backendRequest",
            "2s is longer than the request timeout, 1s",
        ),
        (
            "rules:\n- retry: {codes: [503, 302]}\n",
            "spec.rules[0].retry.codes[1]",
            "302 is not a status code from 400 to 599",
        ),
    ];
    for (spec, field, message) in cases {
        let error = validation_error(spec);
        assert_eq!(error.field, *field, "{spec}\n{error}");
        assert!(
            error.message.contains(message),
            "{spec}\nmessage {:?} lacks {message:?}",
            error.message
        );
    }
}

#[test]
fn metadata_is_validated() {
    let yaml = |metadata: &str| {
        format!("apiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata: {metadata}\nspec: {{}}\n")
    };
    let cases = [
        ("{name: Bad}", "metadata.name"),
        ("{name: r, namespace: a.b}", "metadata.namespace"),
        (
            "{name: r, creationTimestamp: \"2024-05-01 12:00:00\"}",
            "metadata.creationTimestamp",
        ),
    ];
    for (metadata, field) in cases {
        let route: HttpRoute = serde_yaml_ng::from_str(&yaml(metadata)).unwrap();
        assert_eq!(route.validate().unwrap_err().field, field, "{metadata}");
    }
}

#[test]
fn accepted_values_at_the_edges_of_the_rules() {
    valid(
        r#"
parentRefs:
- {name: gw, sectionName: a}
- {name: gw, sectionName: b}
- {group: "", kind: Service, name: svc, port: 80}
hostnames: ["*.example.com", "example.com", "a-b.c"]
rules:
- matches:
  - path: {value: "/a/b/"}
  - path: {type: Exact, value: "/~user/%41;x=1"}
  - path: {type: RegularExpression, value: "/v[0-9]+/.*"}
  backendRefs:
  - {name: a, port: 80, weight: 0}
  - {name: b, port: 80, weight: 1000000}
  - {group: example.com, kind: Backend, name: c}
- matches: [{path: {value: /a}}]
  filters:
  - {type: URLRewrite, urlRewrite: {path: {type: ReplacePrefixMatch, replacePrefixMatch: ""}}}
  - {type: RequestMirror, requestMirror: {backendRef: {name: m, port: 80}, percent: 100}}
  - {type: RequestMirror, requestMirror: {backendRef: {name: n, port: 80}, fraction: {numerator: 0}}}
- filters:
  - {type: RequestRedirect, requestRedirect: {path: {type: ReplaceFullPath, replaceFullPath: /}}}
  timeouts: {request: 0s, backendRequest: 1h}
"#,
    );
}

#[test]
fn list_sizes_follow_the_crd_limits() {
    let repeat = |item: &str, n: usize| vec![item; n].join(", ");
    let rule = "{backendRefs: [{name: a, port: 80}]}";
    let header_filter = "{type: RequestHeaderModifier, requestHeaderModifier: {}}";
    let mirror = "{type: RequestMirror, requestMirror: {backendRef: {name: m, port: 80}}}";
    // (spec at the limit, spec over it, field)
    let cases = [
        (
            format!("rules: [{}]", repeat(rule, 16)),
            format!("rules: [{}]", repeat(rule, 17)),
            "spec.rules",
        ),
        (
            format!("hostnames: [{}]", repeat("a.b", 16)),
            format!("hostnames: [{}]", repeat("a.b", 17)),
            "spec.hostnames",
        ),
        (
            format!("rules: [{{matches: [{}]}}]", repeat("{}", 64)),
            format!("rules: [{{matches: [{}]}}]", repeat("{}", 65)),
            "spec.rules[0].matches",
        ),
        (
            format!(
                "rules: [{}]",
                repeat(&format!("{{matches: [{}]}}", repeat("{}", 8)), 16)
            ),
            format!(
                "rules: [{}, {{matches: [{}]}}]",
                repeat(&format!("{{matches: [{}]}}", repeat("{}", 8)), 15),
                repeat("{}", 9)
            ),
            "spec.rules",
        ),
        (
            format!(
                "rules: [{{filters: [{header_filter}, {}]}}]",
                repeat(mirror, 15)
            ),
            format!(
                "rules: [{{filters: [{header_filter}, {}]}}]",
                repeat(mirror, 16)
            ),
            "spec.rules[0].filters",
        ),
        (
            format!(
                "rules: [{{backendRefs: [{}]}}]",
                repeat("{name: a, port: 80}", 16)
            ),
            format!(
                "rules: [{{backendRefs: [{}]}}]",
                repeat("{name: a, port: 80}", 17)
            ),
            "spec.rules[0].backendRefs",
        ),
        (
            format!(
                "parentRefs: [{}]",
                (0..32)
                    .map(|i| format!("{{name: gw{i}}}"))
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
            format!(
                "parentRefs: [{}]",
                (0..33)
                    .map(|i| format!("{{name: gw{i}}}"))
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
            "spec.parentRefs",
        ),
    ];
    for (at_limit, over, field) in cases {
        valid(&at_limit);
        let error = validation_error(&over);
        assert_eq!(error.field, field, "{over}");
        assert!(error.message.starts_with("at most "), "{error}");
    }
}

#[test]
fn durations_parse_as_gep_2257_says() {
    let ms = Duration::from_millis;
    let h = |n: u64| Duration::from_secs(n * 3600);
    let m = |n: u64| Duration::from_secs(n * 60);
    let s = Duration::from_secs;
    // The GEP's test vectors, and the examples of the brief.
    let valid = [
        ("0h", Duration::ZERO),
        ("0s", Duration::ZERO),
        ("0h0m0s", Duration::ZERO),
        ("1h", h(1)),
        ("30m", m(30)),
        ("10s", s(10)),
        ("500ms", ms(500)),
        ("2h30m", h(2) + m(30)),
        ("150m", h(2) + m(30)),
        ("7230s", h(2) + s(30)),
        ("1h30m10s", h(1) + m(30) + s(10)),
        ("10s30m1h", h(1) + m(30) + s(10)),
        ("100ms200ms300ms", ms(600)),
        ("1h2m", h(1) + m(2)),
        ("01h", h(1)),
        ("00060m", h(1)),
        ("1h2h20m10m", h(3) + m(30)),
        ("99999h", h(99_999)),
    ];
    for (text, expected) in valid {
        assert_eq!(parse_duration(text), Ok(expected), "{text}");
    }
    let invalid = [
        ("", "it is empty"),
        ("1", "lacks its unit"),
        ("1m1", "lacks its unit"),
        ("1d", "units are h, m, s and ms"),
        ("1h30m10s20ms50h", "more than 4 parts"),
        ("999999h", "more than 5 digits"),
        ("1.5h", "units are h, m, s and ms"),
        ("-15m", "must start with a number"),
        ("h", "must start with a number"),
        ("1us", "units are h, m, s and ms"),
        (" 1s", "must start with a number"),
    ];
    for (text, why) in invalid {
        let error = parse_duration(text).unwrap_err();
        assert!(error.contains(why), "{text:?}: {error}");
        assert!(error.contains("is not a Gateway API duration"), "{error}");
    }
}

#[test]
fn durations_format_in_the_standard_form() {
    let cases = [
        (Duration::ZERO, "0s"),
        (Duration::from_secs(3600), "1h"),
        (Duration::from_secs(1800), "30m"),
        (Duration::from_secs(10), "10s"),
        (Duration::from_millis(500), "500ms"),
        (Duration::from_secs(9000), "2h30m"),
        (Duration::from_secs(5410), "1h30m10s"),
        (Duration::from_millis(600), "600ms"),
        (Duration::from_millis(7_200_600), "2h600ms"),
        (Duration::from_millis(9_010_600), "2h30m10s600ms"),
        (Duration::from_secs(240 * 3600), "240h"),
    ];
    for (duration, text) in cases {
        assert_eq!(format_duration(duration), text);
        assert_eq!(parse_duration(text), Ok(duration));
    }
}

#[test]
fn the_rate_limit_annotation_is_checked_and_read() {
    let doc = |value: &str| {
        format!(
            "apiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata:\n  name: r\n  \
             annotations: {{ mesh.dev/rate-limit: \"{value}\" }}\nspec: {{}}\n"
        )
    };
    let routes = parse_routes(&doc("100/s;burst=20")).unwrap();
    assert_eq!(
        routes[0].metadata.rate_limit(),
        Some(RateLimit {
            requests: 100,
            per: Duration::from_secs(1),
            burst: 20
        })
    );
    let e = parse_routes(&doc("lots")).unwrap_err();
    assert!(
        e.contains("metadata.annotations[mesh.dev/rate-limit]") && e.contains("\"lots\""),
        "{e}"
    );
}

//! Reading VirtualServices (every supported field, defaults, every refusal) and validation with
//! field paths.
use std::time::Duration;

use super::*;
use crate::model::networking::assert_contains_all;
use crate::model::FieldError;

/// A VirtualService document around `spec` (YAML indented by two spaces under `spec:`).
fn vs_yaml(spec: &str) -> String {
    let spec: String = spec
        .trim_matches('\n')
        .lines()
        .map(|l| format!("  {l}\n"))
        .collect();
    format!(
        "apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata:\n  name: vs\n  \
         namespace: shop\nspec:\n{spec}"
    )
}

fn read(spec: &str) -> VirtualService {
    let yaml = vs_yaml(spec);
    serde_yaml_ng::from_str(&yaml).unwrap_or_else(|e| panic!("{e}\n---\n{yaml}"))
}

fn read_error(spec: &str) -> String {
    let yaml = vs_yaml(spec);
    match serde_yaml_ng::from_str::<VirtualService>(&yaml) {
        Ok(vs) => panic!("read: {vs:?}\n---\n{yaml}"),
        Err(e) => e.to_string(),
    }
}

fn validation_error(spec: &str) -> FieldError {
    let vs = read(spec);
    match vs.validate() {
        Ok(()) => panic!("valid: {vs:?}"),
        Err(e) => e,
    }
}

fn valid(spec: &str) -> VirtualService {
    let vs = read(spec);
    vs.validate().unwrap_or_else(|e| panic!("{e}\n---\n{spec}"));
    vs
}

/// A spec with `hosts: [reviews]` and `route` (YAML list items at column 0) as its `http`.
fn with_route(route: &str) -> String {
    format!("hosts: [reviews]\nhttp:\n{route}\n")
}

#[test]
fn a_full_virtual_service_reads_every_supported_field() {
    let yaml = r#"
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata:
  name: reviews
  namespace: bookinfo
  labels: {app: reviews}
  annotations: {note: x}
  creationTimestamp: "2024-05-01T12:00:00Z"
spec:
  hosts: [reviews, ratings.other.svc.cluster.local]
  gateways: [mesh]
  exportTo: ["*"]
  http:
  - name: canary
    match:
    - name: jason
      uri: {prefix: /reviews}
      method: {exact: GET}
      headers:
        end-user: {exact: jason}
        x-trace: {regex: "[0-9a-f]+"}
      queryParams:
        debug: {exact: "1"}
      withoutHeaders:
        x-skip: {prefix: "y"}
      ignoreUriCase: true
      port: 9080
    route:
    - destination: {host: reviews, subset: v1, port: {number: 9080}}
      weight: 90
      headers:
        request: {set: {x-subset: v1}}
    - destination: {host: reviews.bookinfo.svc.cluster.local, subset: v2}
      weight: 10
    timeout: 10s
    retries:
      attempts: 3
      perTryTimeout: 2s
      retryOn: "5xx,gateway-error,reset,reset-before-request,connect-failure,envoy-ratelimited,retriable-4xx,refused-stream,retriable-status-codes,retriable-headers,cancelled,deadline-exceeded,internal,resource-exhausted,unavailable,503"
      retryRemoteLocalities: false
    fault:
      delay: {percentage: {value: 0.1}, fixedDelay: 5s}
      abort: {percentage: {value: 50}, grpcStatus: UNAVAILABLE}
    mirror: {host: shadow, subset: v3, port: {number: 80}}
    mirrorPercentage: {value: 25}
    headers:
      request: {set: {x-a: "1"}, add: {x-b: "2"}, remove: [x-c]}
      response: {set: {x-d: "3"}, add: {x-e: "4"}, remove: [server]}
    rewrite: {uri: /v2/reviews, authority: reviews-v2}
  - name: mirrors
    route:
    - destination: {host: reviews}
    mirrors:
    - destination: {host: shadow}
      percentage: {value: 5}
    - destination: {host: shadow2}
    rewrite:
      uriRegexRewrite: {match: "^/old/(.*)$", rewrite: '/new/\1'}
    fault:
      abort: {httpStatus: 503}
  - name: moved
    match: [{uri: {exact: /old}}]
    redirect: {uri: /new, authority: new.example.com, port: 8443, scheme: https, redirectCode: 308}
  - name: teapot
    directResponse: {status: 418, body: {string: "short and stout"}}
"#;
    let all = parse_virtual_services(yaml).unwrap_or_else(|e| panic!("{e}"));
    let vs = &all[0];
    assert_eq!(vs.key(), "bookinfo/reviews");
    assert_eq!(
        vs.services().iter().map(|s| s.key()).collect::<Vec<_>>(),
        ["bookinfo/reviews", "other/ratings"]
    );
    assert_eq!(vs.spec.gateways, ["mesh"]);
    assert_eq!(vs.spec.export_to, ["*"]);
    let canary = &vs.spec.http[0];
    assert_eq!(canary.name.as_deref(), Some("canary"));
    let m = &canary.matches[0];
    assert_eq!(m.name.as_deref(), Some("jason"));
    assert_eq!(m.uri, Some(StringMatch::Prefix("/reviews".into())));
    assert_eq!(m.method, Some(StringMatch::Exact("GET".into())));
    assert_eq!(m.headers["end-user"], StringMatch::Exact("jason".into()));
    assert_eq!(m.headers["x-trace"], StringMatch::Regex("[0-9a-f]+".into()));
    assert_eq!(m.query_params["debug"], StringMatch::Exact("1".into()));
    assert_eq!(m.without_headers["x-skip"], StringMatch::Prefix("y".into()));
    assert!(m.ignore_uri_case);
    assert_eq!(m.port, Some(9080));
    assert_eq!(
        canary.route[0].destination,
        Destination {
            host: "reviews".into(),
            subset: Some("v1".into()),
            port: Some(PortSelector { number: 9080 }),
        }
    );
    assert_eq!(canary.route[0].weight, 90);
    assert_eq!(
        canary.route[0]
            .headers
            .as_ref()
            .unwrap()
            .request
            .as_ref()
            .unwrap()
            .set["x-subset"],
        "v1"
    );
    assert_eq!(
        vs.destination_service(&canary.route[1].destination)
            .unwrap()
            .key(),
        "bookinfo/reviews"
    );
    assert_eq!(canary.timeout, Some(Duration::from_secs(10)));
    let retries = canary.retries.as_ref().unwrap();
    assert_eq!(retries.attempts, 3);
    assert_eq!(retries.per_try_timeout, Some(Duration::from_secs(2)));
    assert_eq!(retries.retry_on.len(), 16);
    assert_eq!(retries.retry_on[0], RetryOn::FiveXx);
    assert_eq!(retries.retry_on[14], RetryOn::Unavailable);
    assert_eq!(retries.retry_on[15], RetryOn::Status(503));
    assert_eq!(
        retries
            .retry_on
            .iter()
            .map(|r| r.as_string())
            .collect::<Vec<_>>()
            .join(","),
        "5xx,gateway-error,reset,reset-before-request,connect-failure,envoy-ratelimited,\
         retriable-4xx,refused-stream,retriable-status-codes,retriable-headers,cancelled,\
         deadline-exceeded,internal,resource-exhausted,unavailable,503"
    );
    assert_eq!(retries.retry_remote_localities, Some(false));
    let fault = canary.fault.as_ref().unwrap();
    let delay = fault.delay.as_ref().unwrap();
    assert_eq!(delay.fixed_delay, Duration::from_secs(5));
    assert!((delay.share() - 0.001).abs() < 1e-12);
    let abort = fault.abort.as_ref().unwrap();
    assert_eq!(abort.error, AbortError::GrpcStatus(GrpcCode(14)));
    assert_eq!(GrpcCode(14).name(), "UNAVAILABLE");
    assert_eq!(abort.share(), 0.5);
    assert_eq!(
        canary.mirror.as_ref().unwrap().subset.as_deref(),
        Some("v3")
    );
    assert_eq!(canary.mirror_share(), 0.25);
    let headers = canary.headers.as_ref().unwrap();
    let request = headers.request.as_ref().unwrap();
    assert_eq!(
        (&request.set["x-a"], &request.add["x-b"], &request.remove[0]),
        (&"1".to_string(), &"2".to_string(), &"x-c".to_string())
    );
    let response = headers.response.as_ref().unwrap();
    assert_eq!(response.remove, ["server"]);
    let rewrite = canary.rewrite.as_ref().unwrap();
    assert_eq!(rewrite.uri.as_deref(), Some("/v2/reviews"));
    assert_eq!(rewrite.authority.as_deref(), Some("reviews-v2"));

    let mirrors = &vs.spec.http[1];
    assert_eq!(mirrors.mirrors[0].share(), 0.05);
    assert_eq!(mirrors.mirrors[1].share(), 1.0, "absent percentage: all");
    assert_eq!(
        mirrors.rewrite.as_ref().unwrap().uri_regex_rewrite,
        Some(RegexRewrite {
            match_: "^/old/(.*)$".into(),
            rewrite: "/new/\\1".into()
        })
    );
    let abort = mirrors.fault.as_ref().unwrap().abort.as_ref().unwrap();
    assert_eq!(abort.error, AbortError::HttpStatus(503));
    assert_eq!(abort.share(), 0.0, "absent percentage: no request aborted");

    let redirect = vs.spec.http[2].redirect.as_ref().unwrap();
    assert_eq!(redirect.uri.as_deref(), Some("/new"));
    assert_eq!(redirect.authority.as_deref(), Some("new.example.com"));
    assert_eq!(redirect.port, Some(8443));
    assert_eq!(redirect.scheme.as_deref(), Some("https"));
    assert_eq!(redirect.redirect_code, 308);
    let direct = vs.spec.http[3].direct_response.as_ref().unwrap();
    assert_eq!(direct.status, 418);
    assert_eq!(direct.body.as_ref().unwrap().string, "short and stout");
}

#[test]
fn defaults_are_istios() {
    let vs = valid(
        r#"
hosts: [reviews]
http:
- route: [{destination: {host: reviews}}]
  mirror: {host: shadow}
  fault: {delay: {fixedDelay: 1s}}
- redirect: {uri: /x}
"#,
    );
    assert_eq!(vs.metadata.namespace, "shop");
    assert!(vs.spec.gateways.is_empty() && vs.spec.export_to.is_empty());
    let route = &vs.spec.http[0];
    assert!(route.matches.is_empty(), "no match: every request");
    assert_eq!(route.route[0].weight, 0, "absent weight reads as 0");
    assert_eq!(route.mirror_share(), 1.0, "absent mirrorPercentage: all");
    assert_eq!(
        route
            .fault
            .as_ref()
            .unwrap()
            .delay
            .as_ref()
            .unwrap()
            .share(),
        0.0
    );
    assert_eq!(route.timeout, None);
    assert_eq!(route.retries, None);
    assert_eq!(
        vs.spec.http[1].redirect.as_ref().unwrap().redirect_code,
        301
    );
    // A file's object without a namespace is in `default`.
    let files = parse_virtual_services(
        "apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {name: r}\n\
         spec: {hosts: [a], http: [{route: [{destination: {host: a}}]}]}\n",
    )
    .unwrap();
    assert_eq!(files[0].key(), "default/r");
}

#[test]
fn unsupported_fields_are_refused_by_name_and_path() {
    let cases: &[(&str, &str, &[&str])] = &[
        (
            "tcp",
            "hosts: [a]\ntcp: [{route: [{destination: {host: a}}]}]\n",
            &["spec.tcp: `tcp` is not supported", "L4"],
        ),
        ("tls", "hosts: [a]\ntls: []\n", &["`tls` is not supported"]),
        (
            "gateway other than mesh",
            "hosts: [a]\ngateways: [mesh, istio-system/ingress]\n",
            &[
                "spec",
                "`gateways` entry \"istio-system/ingress\" is not supported",
                "a waypoint serves mesh traffic",
            ],
        ),
        (
            "corsPolicy",
            "http:\n- corsPolicy: {allowOrigins: [{exact: x}]}\n",
            &["spec.http[0].corsPolicy: `corsPolicy` is not supported"],
        ),
        (
            "delegate",
            "http:\n- delegate: {name: d}\n",
            &["`delegate` is not supported"],
        ),
        (
            "mirrorPercent",
            "http:\n- mirrorPercent: 5\n",
            &["`mirrorPercent` is not supported", "mirrorPercentage"],
        ),
        (
            "mirror_percent",
            "http:\n- mirror_percent: 5\n",
            &["`mirror_percent` is not supported"],
        ),
        (
            "sourceLabels",
            "http:\n- match: [{sourceLabels: {app: a}}]\n",
            &["spec.http[0].match[0].sourceLabels: `sourceLabels` is not supported"],
        ),
        (
            "sourceNamespace",
            "http:\n- match: [{sourceNamespace: x}]\n",
            &["`sourceNamespace` is not supported"],
        ),
        (
            "match gateways",
            "http:\n- match: [{gateways: [mesh]}]\n",
            &["`gateways` is not supported"],
        ),
        (
            "statPrefix",
            "http:\n- match: [{statPrefix: x}]\n",
            &["`statPrefix` is not supported"],
        ),
        (
            "scheme",
            "http:\n- match: [{scheme: {exact: https}}]\n",
            &["`scheme` is not supported"],
        ),
        (
            "authority",
            "http:\n- match: [{authority: {exact: a}}]\n",
            &["`authority` is not supported"],
        ),
        (
            "backoff",
            "http:\n- retries: {attempts: 1, backoff: 1s}\n",
            &["spec.http[0].retries.backoff: `backoff` is not supported"],
        ),
        (
            "retryIgnorePreviousHosts",
            "http:\n- retries: {attempts: 1, retryIgnorePreviousHosts: true}\n",
            &["`retryIgnorePreviousHosts` is not supported"],
        ),
        (
            "derivePort",
            "http:\n- redirect: {derivePort: FROM_REQUEST_PORT}\n",
            &["`derivePort` is not supported"],
        ),
        (
            "prefixRewrite",
            "http:\n- redirect: {prefixRewrite: /x}\n",
            &["`prefixRewrite` is not supported"],
        ),
        (
            "http2Error",
            "http:\n- fault: {abort: {http2Error: x}}\n",
            &["spec.http[0].fault.abort.http2Error: `http2Error` is not supported"],
        ),
        (
            "exponentialDelay",
            "http:\n- fault: {delay: {exponentialDelay: 1s}}\n",
            &["`exponentialDelay` is not supported"],
        ),
        (
            "delay percent",
            "http:\n- fault: {delay: {percent: 5, fixedDelay: 1s}}\n",
            &["`percent` is not supported", "percentage"],
        ),
        (
            "body bytes",
            "http:\n- directResponse: {status: 200, body: {string: a, bytes: YQ==}}\n",
            &["`bytes` is not supported"],
        ),
        (
            "unknown field",
            "http:\n- name: a\n  colour: red\n",
            &["spec.http[0]", "unknown field `colour`"],
        ),
    ];
    for (case, spec, parts) in cases {
        assert_contains_all(&read_error(spec), parts, case);
    }
}

#[test]
fn values_are_checked_while_reading() {
    let cases: &[(&str, &str, &[&str])] = &[
        (
            "empty string match",
            "http:\n- match: [{uri: {}}]\n",
            &[
                "spec.http[0].match[0].uri",
                "set one of `exact`, `prefix` or `regex`",
            ],
        ),
        (
            "two string matches",
            "http:\n- match: [{headers: {a: {exact: x, prefix: y}}}]\n",
            &["set only one of `exact`, `prefix` or `regex`"],
        ),
        (
            "retryOn word",
            "http:\n- retries: {attempts: 1, retryOn: \"5xx,sometimes\"}\n",
            &[
                "spec.http[0].retries.retryOn",
                "\"sometimes\" is not a valid retryOn condition",
            ],
        ),
        (
            "retryOn status",
            "http:\n- retries: {attempts: 1, retryOn: \"600\"}\n",
            &["\"600\" is not a valid retryOn condition"],
        ),
        (
            "grpc status",
            "http:\n- fault: {abort: {grpcStatus: SOMETIMES}}\n",
            &[
                "spec.http[0].fault.abort.grpcStatus",
                "\"SOMETIMES\" is not a gRPC status name",
            ],
        ),
        (
            "abort without error",
            "http:\n- fault: {abort: {percentage: {value: 1}}}\n",
            &[
                "spec.http[0].fault.abort",
                "set `httpStatus` or `grpcStatus`",
            ],
        ),
        (
            "abort with both",
            "http:\n- fault: {abort: {httpStatus: 500, grpcStatus: INTERNAL}}\n",
            &["set only one of `httpStatus` and `grpcStatus`"],
        ),
        (
            "duration",
            "http:\n- timeout: 10\n",
            &["spec.http[0].timeout", "lacks its unit"],
        ),
        (
            "duration too small",
            "http:\n- retries: {attempts: 1, perTryTimeout: 0s}\n",
            &[
                "spec.http[0].retries.perTryTimeout",
                "below the minimum duration, 1ms",
            ],
        ),
        (
            "delay without fixedDelay",
            "http:\n- fault: {delay: {percentage: {value: 1}}}\n",
            &["missing field `fixedDelay`"],
        ),
        (
            "negative weight",
            "http:\n- route: [{destination: {host: a}, weight: -1}]\n",
            &["spec.http[0].route[0].weight", "expected u32"],
        ),
        ("wrong apiVersion", "", &["unsupported apiVersion"]),
    ];
    for (case, spec, parts) in cases {
        let text = if *case == "wrong apiVersion" {
            match serde_yaml_ng::from_str::<VirtualService>(
                "apiVersion: networking.istio.io/v1beta1\nkind: VirtualService\nmetadata: \
                 {name: a}\nspec: {}\n",
            ) {
                Ok(vs) => panic!("{vs:?}"),
                Err(e) => e.to_string(),
            }
        } else {
            read_error(spec)
        };
        assert_contains_all(&text, parts, case);
    }
}

#[test]
fn validation_names_the_field() {
    let cases: &[(&str, String, &str, &str)] = &[
        (
            "no hosts",
            "http: [{route: [{destination: {host: a}}]}]\n".into(),
            "spec.hosts",
            "at least one host is required",
        ),
        (
            "wildcard host",
            "hosts: ['*']\nhttp: [{route: [{destination: {host: a}}]}]\n".into(),
            "spec.hosts[0]",
            "wildcard host \"*\" is not supported",
        ),
        (
            "host listed twice",
            "hosts: [a, a.shop.svc.cluster.local]\nhttp: [{route: [{destination: {host: a}}]}]\n"
                .into(),
            "spec.hosts[1]",
            "names Service shop/a again",
        ),
        (
            "exportTo",
            "hosts: [a]\nexportTo: [other]\nhttp: [{route: [{destination: {host: a}}]}]\n".into(),
            "spec.exportTo[0]",
            "\"other\" is not supported",
        ),
        (
            "no http",
            "hosts: [a]\n".into(),
            "spec.http",
            "at least one HTTP route is required",
        ),
        (
            "route name twice",
            "hosts: [a]\nhttp:\n- {name: x, route: [{destination: {host: a}}]}\n- {name: x, \
             route: [{destination: {host: a}}]}\n"
                .into(),
            "spec.http[1].name",
            "used twice",
        ),
        (
            "nothing to do",
            with_route("- name: x"),
            "spec.http[0]",
            "needs `route`, `redirect` or `directResponse`",
        ),
        (
            "route and redirect",
            with_route("- route: [{destination: {host: a}}]\n  redirect: {uri: /x}"),
            "spec.http[0].redirect",
            "cannot be used with `route`",
        ),
        (
            "redirect and direct response",
            with_route("- redirect: {uri: /x}\n  directResponse: {status: 200}"),
            "spec.http[0].directResponse",
            "cannot be used with `route` or `redirect`",
        ),
        (
            "redirect and fault",
            with_route("- redirect: {uri: /x}\n  fault: {abort: {httpStatus: 500}}"),
            "spec.http[0].fault",
            "cannot be used with `redirect`",
        ),
        (
            "direct response and rewrite",
            with_route("- directResponse: {status: 200}\n  rewrite: {uri: /x}"),
            "spec.http[0].rewrite",
            "cannot be used with `directResponse`",
        ),
        (
            "weights all zero",
            with_route(
                "- route:\n  - {destination: {host: a, subset: v1}}\n  - {destination: {host: a, \
                 subset: v2}}",
            ),
            "spec.http[0].route",
            "must not all be 0",
        ),
        (
            "weight too large",
            with_route("- route: [{destination: {host: a}, weight: 3000000000}]"),
            "spec.http[0].route[0].weight",
            "above the maximum",
        ),
        (
            "destination host",
            with_route("- route: [{destination: {host: a.b}}]"),
            "spec.http[0].route[0].destination.host",
            "write `a.b.svc.cluster.local`",
        ),
        (
            "subset name",
            with_route("- route: [{destination: {host: a, subset: V_1}}]"),
            "spec.http[0].route[0].destination.subset",
            "not a valid subset name",
        ),
        (
            "destination port",
            with_route("- route: [{destination: {host: a, port: {number: 70000}}}]"),
            "spec.http[0].route[0].destination.port.number",
            "70000 is not a port",
        ),
        (
            "regex",
            with_route(
                "- match: [{uri: {regex: '(unclosed'}}]\n  route: [{destination: {host: a}}]",
            ),
            "spec.http[0].match[0].uri.regex",
            "not a valid regular expression",
        ),
        (
            "empty prefix",
            with_route("- match: [{method: {prefix: ''}}]\n  route: [{destination: {host: a}}]"),
            "spec.http[0].match[0].method.prefix",
            "must not be empty",
        ),
        (
            "header name",
            with_route(
                "- match: [{headers: {'bad name': {exact: x}}}]\n  route: [{destination: {host: \
                 a}}]",
            ),
            "spec.http[0].match[0].headers.bad name",
            "not a valid header name",
        ),
        (
            "without header regex",
            with_route(
                "- match: [{withoutHeaders: {x: {regex: '['}}}]\n  route: [{destination: {host: \
                 a}}]",
            ),
            "spec.http[0].match[0].withoutHeaders.x.regex",
            "not a valid regular expression",
        ),
        (
            "match port",
            with_route("- match: [{port: 0}]\n  route: [{destination: {host: a}}]"),
            "spec.http[0].match[0].port",
            "0 is not a port",
        ),
        (
            "redirect empty",
            with_route("- redirect: {redirectCode: 302}"),
            "spec.http[0].redirect",
            "must set `uri`, `authority`, `scheme` or `port`",
        ),
        (
            "redirect code",
            with_route("- redirect: {uri: /x, redirectCode: 200}"),
            "spec.http[0].redirect.redirectCode",
            "200 is not a redirect code",
        ),
        (
            "redirect scheme",
            with_route("- redirect: {scheme: ftp}"),
            "spec.http[0].redirect.scheme",
            "\"ftp\" is not a redirect scheme",
        ),
        (
            "redirect uri",
            with_route("- redirect: {uri: relative}"),
            "spec.http[0].redirect.uri",
            "must be an absolute path",
        ),
        (
            "direct response status",
            with_route("- directResponse: {status: 99}"),
            "spec.http[0].directResponse.status",
            "HTTP status 99 is not in the range 200 to 599",
        ),
        (
            "rewrite both",
            with_route(
                "- rewrite: {uri: /x, uriRegexRewrite: {match: a, rewrite: b}}\n  route: \
                 [{destination: {host: a}}]",
            ),
            "spec.http[0].rewrite.uriRegexRewrite",
            "cannot be used with `uri`",
        ),
        (
            "rewrite empty",
            with_route("- rewrite: {}\n  route: [{destination: {host: a}}]"),
            "spec.http[0].rewrite",
            "must set `uri`, `uriRegexRewrite` or `authority`",
        ),
        (
            "rewrite regex",
            with_route(
                "- rewrite: {uriRegexRewrite: {match: '(', rewrite: b}}\n  route: \
                 [{destination: {host: a}}]",
            ),
            "spec.http[0].rewrite.uriRegexRewrite.match",
            "not a valid regular expression",
        ),
        (
            "retries disabled but configured",
            with_route("- retries: {retryOn: 5xx}\n  route: [{destination: {host: a}}]"),
            "spec.http[0].retries.attempts",
            "`attempts` is 0",
        ),
        (
            "retryRemoteLocalities",
            with_route(
                "- retries: {attempts: 2, retryRemoteLocalities: true}\n  route: \
                 [{destination: {host: a}}]",
            ),
            "spec.http[0].retries.retryRemoteLocalities",
            "`true` is not supported",
        ),
        (
            "empty fault",
            with_route("- fault: {}\n  route: [{destination: {host: a}}]"),
            "spec.http[0].fault",
            "needs a `delay` and/or an `abort`",
        ),
        (
            "fault percentage",
            with_route(
                "- fault: {delay: {fixedDelay: 1s, percentage: {value: 101}}}\n  route: \
                 [{destination: {host: a}}]",
            ),
            "spec.http[0].fault.delay.percentage.value",
            "101 is not a percentage",
        ),
        (
            "abort status",
            with_route("- fault: {abort: {httpStatus: 700}}\n  route: [{destination: {host: a}}]"),
            "spec.http[0].fault.abort.httpStatus",
            "HTTP status 700",
        ),
        (
            "mirror and mirrors",
            with_route(
                "- mirror: {host: m}\n  mirrors: [{destination: {host: m}}]\n  route: \
                 [{destination: {host: a}}]",
            ),
            "spec.http[0].mirrors",
            "cannot be used with `mirror`",
        ),
        (
            "mirrorPercentage without mirror",
            with_route("- mirrorPercentage: {value: 5}\n  route: [{destination: {host: a}}]"),
            "spec.http[0].mirrorPercentage",
            "applies to `mirror`",
        ),
        (
            "mirror percentage",
            with_route(
                "- mirror: {host: m}\n  mirrorPercentage: {value: -1}\n  route: [{destination: \
                 {host: a}}]",
            ),
            "spec.http[0].mirrorPercentage.value",
            "-1 is not a percentage",
        ),
        (
            "mirrors percentage",
            with_route(
                "- mirrors: [{destination: {host: m}, percentage: {value: 200}}]\n  route: \
                 [{destination: {host: a}}]",
            ),
            "spec.http[0].mirrors[0].percentage.value",
            "200 is not a percentage",
        ),
        (
            "mirror host",
            with_route("- mirror: {host: '*.a'}\n  route: [{destination: {host: a}}]"),
            "spec.http[0].mirror.host",
            "wildcard host",
        ),
        (
            "header operation on host",
            with_route(
                "- headers: {response: {set: {host: x}}}\n  route: [{destination: {host: a}}]",
            ),
            "spec.http[0].headers.response.set.host",
            "cannot be changed here",
        ),
        (
            "remove pseudo-header",
            with_route(
                "- headers: {request: {remove: [':path']}}\n  route: [{destination: {host: a}}]",
            ),
            "spec.http[0].headers.request.remove[0]",
            "cannot be changed here",
        ),
        (
            "authority twice",
            with_route(
                "- rewrite: {authority: b}\n  headers: {request: {set: {host: c}}}\n  route: \
                 [{destination: {host: a}}]",
            ),
            "spec.http[0].headers.request.set.host",
            "changed more than once",
        ),
        (
            "header value",
            with_route(
                "- route: [{destination: {host: a}, headers: {request: {add: {x: \"a\\nb\"}}}}]",
            ),
            "spec.http[0].route[0].headers.request.add.x",
            "control character",
        ),
    ];
    for (case, spec, field, message) in cases {
        let e = validation_error(spec);
        assert_eq!(e.field, *field, "{case}: {e}");
        assert!(e.message.contains(message), "{case}: {e}");
    }
}

#[test]
fn weights_are_proportions_and_one_destination_needs_none() {
    valid(&with_route("- route: [{destination: {host: a}}]"));
    valid(&with_route(
        "- route:\n  - {destination: {host: a, subset: v1}, weight: 1}\n  - {destination: {host: \
         a, subset: v2}, weight: 1}",
    ));
    // Request set of the authority alone is fine; so is a rewrite alone.
    valid(&with_route(
        "- headers: {request: {set: {':authority': b}}}\n  route: [{destination: {host: a}}]",
    ));
}

#[test]
fn parse_errors_name_the_document_and_the_object() {
    let yaml = "apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {name: a, \
                namespace: ns}\nspec: {hosts: [a], http: [{route: [{destination: {host: a}}]}]}\n\
                ---\napiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {name: \
                b, namespace: ns}\nspec: {hosts: [a]}\n";
    let e = parse_virtual_services(yaml).unwrap_err();
    assert!(
        e.starts_with("document 2 (VirtualService ns/b): field `spec.http`"),
        "{e}"
    );
    let e = parse_virtual_services("---\nkind: VirtualService\n").unwrap_err();
    assert!(
        e.starts_with("document 1:") || e.starts_with("document 2:"),
        "{e}"
    );
    assert!(e.contains("missing field"), "{e}");
}

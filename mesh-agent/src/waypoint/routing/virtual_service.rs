//! Istio `VirtualService` HTTP routes (Istio 1.31, as Envoy applies Istio's translation)
//! compiled into the routing engine's types, for the requests to one Service port.
//!
//! * **Order.** The VirtualServices of a Service are merged as Istio merges them: the rules of
//!   the oldest (`metadata.creationTimestamp`; objects without one, read from a file, after those
//!   with one; then by `namespace/name`) first, each's `http` in the order written. The first
//!   rule that matches wins ([`RouteTable::in_order`]), however specific a later one is.
//! * **Matching.** A rule without `match` matches every request; otherwise any one entry, all of
//!   whose conditions hold. `uri`: `exact`, `prefix` (a plain string prefix: `/foo` matches
//!   `/foobar`), `regex` (the whole path); `ignoreUriCase` makes `exact` and `prefix` compare
//!   ASCII case-insensitively; the query is not part of the path. `headers` and `method`: a
//!   StringMatch on the value (several values of a header joined with `,`; `:authority`,
//!   `:method`, `:path`, `:scheme` read the request's); `withoutHeaders`: the entry holds only
//!   if none of these matches (an absent header does not); `queryParams`: on the first value,
//!   percent-decoded; `port`: an entry naming another port than the table's never matches.
//! * **One [`Rule`] per (rule, match entry)**, as Istio makes one Envoy route per entry: a
//!   `rewrite.uri` replaces what that entry's `uri` matched. Each has the rule's `name` and
//!   index.
//! * **Destinations** become [`Backend`]s: the Service `host` names (resolved against the
//!   VirtualService's namespace), its `subset`, and the port: `port.number`, else the Service's
//!   only port if it has one, else the port the request was sent to (the table's), as Istio's
//!   `GetDestinationCluster` does. A single destination takes every request whatever its weight.
//! * **Header changes** (`headers.request/response` of the rule, then of the destination):
//!   Envoy's order, `remove` first, then `set`, then `add`, which appends a value (a field of
//!   its own). `host` or `:authority` in the request's `set`/`add` rewrites the authority, as
//!   `rewrite.authority` does.
//! * **Rewrite**: `uri` replaces what the entry's `uri` matched: the prefix for `prefix`, the
//!   whole path for `exact` and `regex`, and, without a `uri` match, the leading `/` (Envoy's
//!   route then matches prefix `/`: `/foo` rewritten with `/v2` is `/v2foo`). An empty `uri`
//!   rewrites nothing (Envoy reads an empty `prefix_rewrite` as none). `uriRegexRewrite`:
//!   every match in the path replaced, `\1` standing for a group. `authority` replaces the
//!   host.
//! * **Redirect**: `uri` replaces the whole path (its query, if it has one, the request's);
//!   `authority` the host and the port (the one it names, else none: the scheme's default);
//!   `port`, `scheme`; `redirectCode` (301 by default). **Direct response**: `status`, `body.string` (`text/plain`).
//! * **Mirrors**: `mirror` with `mirrorPercentage`, or `mirrors[]` each with its `percentage`,
//!   in millionths (Istio's percentages have up to 6 decimals).
//! * **Timeout** and **retries**: `timeout` is the request's; `retries` as Istio translates
//!   them (`retry::RetryOn` for Envoy's words; `perTryTimeout`; backoff
//!   [`retry::DEFAULT_BACKOFF`]); `attempts: 0` disables them. **Without `retries`, Istio's
//!   default policy applies**: 2 retries on `connect-failure,refused-stream,unavailable,
//!   cancelled,retriable-status-codes` with code 503. With `retryOn` given, its status codes
//!   are the only ones retried. `envoy-ratelimited` and `retriable-headers` are ignored with a
//!   warning: nothing upstream of a waypoint sets Envoy's rate-limit header, and Istio gives no
//!   way to list the retriable headers.
//! * **Fault**: `delay` and `abort` with their shares (absent percentage: none).
use super::*;
use crate::model::networking::{resolve_host, ServiceRef};
use crate::model::virtual_service::{
    AbortError, Destination, HeaderOperations, Headers, HttpMatchRequest, HttpRetry, RetryOn,
    StringMatch, VirtualService,
};
use crate::waypoint::fault::AbortWith;
use crate::waypoint::retry::{self, DEFAULT_BACKOFF, DEFAULT_RETRIES};

/// Istio's percentages have up to 6 decimals: mirror shares are kept in millionths.
const MILLION: u32 = 1_000_000;

/// What a VirtualService compile needs to know of the mesh.
pub trait Services {
    /// The only port of a Service, if it has exactly one (`None` also for an unknown one).
    fn only_port(&self, service: &ServiceRef) -> Option<u16>;
}

impl<F: Fn(&ServiceRef) -> Option<u16>> Services for F {
    fn only_port(&self, service: &ServiceRef) -> Option<u16> {
        self(service)
    }
}

/// Compiles the VirtualServices attached to one Service for requests sent to its port `port`,
/// merged in Istio's order (see the module comment). What cannot be honoured as written is
/// reported in `warnings`, naming the VirtualService and the field.
pub fn compile(
    virtual_services: &[&VirtualService],
    port: u16,
    services: &dyn Services,
    warnings: &mut Vec<String>,
) -> RouteTable {
    let mut ordered: Vec<&VirtualService> = virtual_services.to_vec();
    ordered.sort_by_key(|vs| {
        let created = vs.metadata.creation_timestamp.as_deref();
        (
            created.is_none(),
            created,
            vs.metadata.namespace.as_str(),
            vs.metadata.name.as_str(),
        )
    });
    RouteTable::in_order(
        ordered
            .into_iter()
            .map(|vs| compile_one(vs, port, services, warnings))
            .collect(),
    )
}

fn compile_one(
    vs: &VirtualService,
    port: u16,
    services: &dyn Services,
    warnings: &mut Vec<String>,
) -> Route {
    let namespace = &vs.metadata.namespace;
    let mut rules = Vec::new();
    for (index, http) in vs.spec.http.iter().enumerate() {
        let at = format!("VirtualService {} spec.http[{index}]", vs.key());
        let retry = retry_policy(http.retries.as_ref(), &at, warnings);
        let fault = http.fault.as_ref().map(|f| Fault {
            delay: f.delay.as_ref().map(|d| (d.share(), d.fixed_delay)),
            abort: f.abort.as_ref().map(|a| {
                let with = match a.error {
                    AbortError::HttpStatus(status) => AbortWith::Status(
                        StatusCode::from_u16(status as u16)
                            .unwrap_or(StatusCode::SERVICE_UNAVAILABLE),
                    ),
                    AbortError::GrpcStatus(code) => AbortWith::Grpc(u32::from(code.0)),
                };
                (a.share(), with)
            }),
        });
        let entries: Vec<(usize, Option<&HttpMatchRequest>)> = if http.matches.is_empty() {
            vec![(0, None)]
        } else {
            http.matches
                .iter()
                .enumerate()
                .filter(|(_, m)| m.port.is_none_or(|p| p == u32::from(port)))
                .map(|(i, m)| (i, Some(m)))
                .collect()
        };
        for (match_offset, entry) in entries {
            let (matching, matched) = compile_match(entry);
            let filters = rule_filters(http, matched, namespace, port, services);
            let backends: Vec<Backend> = http
                .route
                .iter()
                .map(|d| Backend {
                    reference: reference(&d.destination, namespace, port, services),
                    weight: if http.route.len() == 1 {
                        d.weight.max(1)
                    } else {
                        d.weight
                    },
                    filters: header_filters(d.headers.as_ref()),
                })
                .collect();
            let per_try = retry.as_ref().and_then(|r| r.per_try_timeout);
            rules.push(Rule {
                index,
                name: http.name.clone(),
                matches: vec![matching],
                match_offset,
                filters,
                total_weight: backends.iter().map(|b| u64::from(b.weight)).sum(),
                backends,
                request_timeout: http.timeout,
                backend_request_timeout: per_try,
                retry: retry.clone(),
                fault: fault.clone(),
            });
        }
    }
    Route {
        kind: RouteKind::VirtualService,
        key: format!("{namespace}/{}", vs.metadata.name).into(),
        namespace: namespace.clone(),
        name: vs.metadata.name.clone(),
        rate_limit: None,
        hostnames: Vec::new(),
        rules,
    }
}

// ---------------------------------------------------------------------------------------------
// Matches

/// What a `rewrite.uri` replaces: the first `n` bytes of the path (a prefix match, or `/`
/// without a `uri` match), or all of it (`None`: `exact` or `regex`).
type Matched = Option<usize>;

fn compile_match(entry: Option<&HttpMatchRequest>) -> (Match, Matched) {
    let root = || PathMatch::StringPrefix("/".to_string());
    let Some(m) = entry else {
        return (everything(root()), Some(1));
    };
    let (path, matched) = match &m.uri {
        None => (root(), Some(1)),
        Some(StringMatch::Exact(s)) if m.ignore_uri_case => {
            (PathMatch::ExactIgnoreCase(s.clone()), None)
        }
        Some(StringMatch::Exact(s)) => (PathMatch::Exact(s.clone()), None),
        Some(StringMatch::Prefix(s)) if m.ignore_uri_case => {
            (PathMatch::StringPrefixIgnoreCase(s.clone()), Some(s.len()))
        }
        Some(StringMatch::Prefix(s)) => (PathMatch::StringPrefix(s.clone()), Some(s.len())),
        // `ignoreUriCase` does not apply to a regex (Envoy's `case_sensitive` does not).
        Some(StringMatch::Regex(r)) => (
            compile_regex(r).map_or(PathMatch::Never, PathMatch::Regex),
            None,
        ),
    };
    let mut broken = false;
    let mut headers_of = |map: &std::collections::BTreeMap<String, StringMatch>| {
        map.iter()
            .filter_map(|(name, value)| match HeaderKey::parse(name) {
                Some(key) => Some((key, value_match(value))),
                None => {
                    broken = true;
                    None
                }
            })
            .collect::<Vec<_>>()
    };
    let headers = headers_of(&m.headers);
    let without_headers = headers_of(&m.without_headers);
    let matching = Match {
        path: if broken { PathMatch::Never } else { path },
        method: m.method.as_ref().map(value_match),
        headers,
        without_headers,
        query: m
            .query_params
            .iter()
            .map(|(name, value)| (name.clone(), value_match(value)))
            .collect(),
        specificity: Specificity::default(),
    };
    (matching, matched)
}

fn everything(path: PathMatch) -> Match {
    Match {
        path,
        method: None,
        headers: Vec::new(),
        without_headers: Vec::new(),
        query: Vec::new(),
        specificity: Specificity::default(),
    }
}

fn value_match(value: &StringMatch) -> ValueMatch {
    match value {
        StringMatch::Exact(s) => ValueMatch::Exact(s.clone()),
        StringMatch::Prefix(s) => ValueMatch::Prefix(s.clone()),
        StringMatch::Regex(r) => compile_regex(r).map_or(ValueMatch::Never, ValueMatch::Regex),
    }
}

// ---------------------------------------------------------------------------------------------
// Destinations

fn reference(
    destination: &Destination,
    namespace: &str,
    port: u16,
    services: &dyn Services,
) -> BackendReference {
    // Validation checked that the host resolves; one that does not is kept as written, and
    // the caller finds no such Service.
    let service = resolve_host(&destination.host, namespace).unwrap_or_else(|_| ServiceRef {
        namespace: namespace.to_string(),
        name: destination.host.clone(),
    });
    let port = match destination.port {
        Some(selector) => u16::try_from(selector.number).unwrap_or(port),
        None => services.only_port(&service).unwrap_or(port),
    };
    BackendReference {
        group: String::new(),
        kind: "Service".to_string(),
        name: service.name,
        namespace: service.namespace,
        port: Some(port),
        subset: destination.subset.clone(),
    }
}

fn mirror(
    destination: &Destination,
    share: f64,
    namespace: &str,
    port: u16,
    services: &dyn Services,
) -> Filter {
    Filter::RequestMirror(Mirror {
        backend: reference(destination, namespace, port, services),
        numerator: (share.clamp(0.0, 1.0) * f64::from(MILLION)).round() as u32,
        denominator: MILLION,
    })
}

// ---------------------------------------------------------------------------------------------
// Filters

/// The rule's filters, in the order they act: header changes, the rewrite, mirrors, then what
/// answers the request (a redirect or a direct response).
fn rule_filters(
    http: &crate::model::virtual_service::HttpRoute,
    matched: Matched,
    namespace: &str,
    port: u16,
    services: &dyn Services,
) -> Filters {
    let mut filters = header_filters(http.headers.as_ref()).0;
    if let Some(rewrite) = &http.rewrite {
        let path = match (&rewrite.uri, &rewrite.uri_regex_rewrite) {
            (_, Some(regex)) => {
                regex::Regex::new(&regex.match_)
                    .ok()
                    .map(|compiled| PathRewrite::Regex {
                        regex: compiled,
                        replacement: envoy_substitution(&regex.rewrite),
                    })
            }
            (Some(uri), None) if uri.is_empty() => None,
            (Some(uri), None) => Some(match matched {
                Some(len) => PathRewrite::StringPrefix {
                    len,
                    replacement: uri.clone(),
                },
                None => PathRewrite::Full(uri.clone()),
            }),
            (None, None) => None,
        };
        let hostname = rewrite.authority.as_deref().and_then(authority);
        if path.is_some() || hostname.is_some() {
            filters.push(Filter::UrlRewrite(UrlRewrite { hostname, path }));
        }
    }
    if let Some(destination) = &http.mirror {
        filters.push(mirror(
            destination,
            http.mirror_share(),
            namespace,
            port,
            services,
        ));
    }
    for m in &http.mirrors {
        filters.push(mirror(&m.destination, m.share(), namespace, port, services));
    }
    if let Some(r) = &http.redirect {
        let (hostname, authority_port) = match r.authority.as_deref().map(split_port) {
            Some((host, port)) => (Some(host.to_string()), port),
            None => (None, None),
        };
        filters.push(Filter::RequestRedirect(Redirect {
            scheme: r.scheme.as_deref().map(|s| match s {
                "https" => RedirectScheme::Https,
                _ => RedirectScheme::Http,
            }),
            hostname,
            path: r.uri.clone().map(PathRewrite::Full),
            // Envoy keeps the request's port only when the host is the request's too: a new
            // authority without a port gets the scheme's well-known one (left out of Location).
            port: r
                .port
                .and_then(|p| u16::try_from(p).ok())
                .or(authority_port)
                .or_else(|| {
                    r.authority.as_ref().map(|_| match r.scheme.as_deref() {
                        Some("https") => 443,
                        _ => 80,
                    })
                }),
            status: u16::try_from(r.redirect_code)
                .ok()
                .and_then(|c| StatusCode::from_u16(c).ok())
                .unwrap_or(StatusCode::MOVED_PERMANENTLY),
        }));
    }
    if let Some(d) = &http.direct_response {
        filters.push(Filter::DirectResponse(DirectResponse {
            status: u16::try_from(d.status)
                .ok()
                .and_then(|c| StatusCode::from_u16(c).ok())
                .unwrap_or(StatusCode::INTERNAL_SERVER_ERROR),
            body: d
                .body
                .as_ref()
                .map_or_else(Bytes::new, |b| Bytes::from(b.string.clone())),
        }));
    }
    Filters(filters)
}

/// `host:port` split; an IPv6 address keeps its brackets.
fn split_port(authority: &str) -> (&str, Option<u16>) {
    match authority.rsplit_once(':') {
        Some((host, port))
            if !host.is_empty()
                && (!host.contains(':') || host.ends_with(']'))
                && port.bytes().all(|b| b.is_ascii_digit()) =>
        {
            (host, port.parse().ok())
        }
        _ => (authority, None),
    }
}

/// A new authority for the request, as `URLRewrite` keeps it.
fn authority(value: &str) -> Option<(Authority, HeaderValue)> {
    Some((value.parse().ok()?, HeaderValue::from_str(value).ok()?))
}

/// Envoy's substitution (RE2's `\N` for a group, `\\` for a backslash) in the `regex` crate's
/// syntax: `${N}`, and a `$` of the text escaped as `$$`.
fn envoy_substitution(rewrite: &str) -> String {
    let mut out = String::with_capacity(rewrite.len() + 4);
    let mut chars = rewrite.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '$' => out.push_str("$$"),
            '\\' => match chars.peek().copied() {
                Some(d) if d.is_ascii_digit() => {
                    chars.next();
                    out.push_str("${");
                    out.push(d);
                    out.push('}');
                }
                Some('\\') => {
                    chars.next();
                    out.push('\\');
                }
                _ => out.push('\\'),
            },
            other => out.push(other),
        }
    }
    out
}

/// `headers.request` and `headers.response` as header modifiers (and a host rewrite for a
/// `host`/`:authority` in the request's `set` or `add`).
fn header_filters(headers: Option<&Headers>) -> Filters {
    let mut filters = Vec::new();
    let Some(headers) = headers else {
        return Filters(filters);
    };
    if let Some(ops) = &headers.request {
        let is_authority = |name: &str| {
            name.eq_ignore_ascii_case("host") || name.eq_ignore_ascii_case(":authority")
        };
        let host = ops
            .set
            .iter()
            .chain(&ops.add)
            .find(|(name, _)| is_authority(name))
            .and_then(|(_, value)| authority(value));
        filters.push(Filter::RequestHeaderModifier(modifier(ops, &is_authority)));
        if let Some(host) = host {
            filters.push(Filter::UrlRewrite(UrlRewrite {
                hostname: Some(host),
                path: None,
            }));
        }
    }
    if let Some(ops) = &headers.response {
        filters.push(Filter::ResponseHeaderModifier(modifier(ops, &|_| false)));
    }
    Filters(filters)
}

fn modifier(ops: &HeaderOperations, skip: &dyn Fn(&str) -> bool) -> HeaderModifier {
    let pairs = |map: &std::collections::BTreeMap<String, String>| {
        map.iter()
            .filter(|(name, _)| !skip(name))
            .filter_map(|(name, value)| {
                Some((
                    HeaderName::from_bytes(name.as_bytes()).ok()?,
                    HeaderValue::from_str(value).ok()?,
                ))
            })
            .collect()
    };
    HeaderModifier {
        set: pairs(&ops.set),
        add: pairs(&ops.add),
        remove: ops
            .remove
            .iter()
            .filter_map(|n| HeaderName::from_bytes(n.as_bytes()).ok())
            .collect(),
        envoy: true,
    }
}

// ---------------------------------------------------------------------------------------------
// Retries

/// Istio's default retry policy, for a route without `retries`.
fn istio_default_retry_on() -> retry::RetryOn {
    retry::RetryOn {
        connect_failure: true,
        refused_stream: true,
        codes: vec![503],
        grpc: vec![14, 1],
        ..retry::RetryOn::default()
    }
}

fn retry_policy(
    retries: Option<&HttpRetry>,
    at: &str,
    warnings: &mut Vec<String>,
) -> Option<RetryPolicy> {
    let (count, per_try_timeout, on) = match retries {
        None => (DEFAULT_RETRIES, None, istio_default_retry_on()),
        Some(r) if r.attempts == 0 => return None,
        Some(r) if r.retry_on.is_empty() => {
            (r.attempts, r.per_try_timeout, istio_default_retry_on())
        }
        Some(r) => (
            r.attempts,
            r.per_try_timeout,
            retry_on(&r.retry_on, at, warnings),
        ),
    };
    Some(RetryPolicy {
        retries: count,
        per_try_timeout,
        on,
        backoff: DEFAULT_BACKOFF,
        max_backoff: DEFAULT_BACKOFF * 10,
    })
}

fn retry_on(words: &[RetryOn], at: &str, warnings: &mut Vec<String>) -> retry::RetryOn {
    let mut on = retry::RetryOn::default();
    for word in words {
        let grpc = match *word {
            RetryOn::Cancelled => 1,
            RetryOn::DeadlineExceeded => 4,
            RetryOn::ResourceExhausted => 8,
            RetryOn::Internal => 13,
            RetryOn::Unavailable => 14,
            RetryOn::FiveXx => {
                on.server_error = true;
                continue;
            }
            RetryOn::GatewayError => {
                on.gateway_error = true;
                continue;
            }
            RetryOn::Reset => {
                on.reset = true;
                continue;
            }
            RetryOn::ResetBeforeRequest => {
                on.reset_before_request = true;
                continue;
            }
            RetryOn::ConnectFailure => {
                on.connect_failure = true;
                continue;
            }
            RetryOn::RefusedStream => {
                on.refused_stream = true;
                continue;
            }
            RetryOn::Retriable4xx => {
                on.retriable_4xx = true;
                continue;
            }
            // The codes listed are what it retries; without any, nothing.
            RetryOn::RetriableStatusCodes => continue,
            RetryOn::Status(code) => {
                if !on.codes.contains(&code) {
                    on.codes.push(code);
                }
                continue;
            }
            RetryOn::EnvoyRatelimited | RetryOn::RetriableHeaders => {
                let why = if *word == RetryOn::EnvoyRatelimited {
                    "it retries on Envoy's `x-envoy-ratelimited` response header, which nothing \
                     upstream of the waypoint sets"
                } else {
                    "Istio gives no way to list the retriable headers, and the waypoint does not \
                     read `x-envoy-retriable-header-names`"
                };
                warnings.push(format!(
                    "{at}.retries.retryOn: `{}` is ignored: {why}",
                    word.as_string()
                ));
                continue;
            }
        };
        if !on.grpc.contains(&grpc) {
            on.grpc.push(grpc);
        }
    }
    on
}

#[cfg(test)]
mod tests;

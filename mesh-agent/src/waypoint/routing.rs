//! HTTP request routing after Gateway API's `HTTPRoute` (v1.4.1 standard channel): a
//! [`RouteTable`] compiled from validated routes selects the rule a request matches, the rule
//! picks a backend by weight, and filters change the request or the response. Pure: no I/O, no
//! clock, no randomness of its own (callers pass a random number), synchronous; matching
//! allocates nothing unless a header is repeated or a query parameter is percent-encoded.
//!
//! A proxy uses it in this order:
//!
//! 1. [`RouteTable::select`]: `None` means no rule matches, answered with 404.
//! 2. The rule's [`Filters::apply_request`]: header changes and URL rewrites in the order
//!    written; a `RequestRedirect` ends here with the response to send
//!    ([`RequestOutcome::Redirect`]), as does a `VirtualService`'s direct response
//!    ([`RequestOutcome::Respond`]).
//! 3. The rule's [`Filters::mirrors`]: where to send copies of the request (their responses are
//!    dropped).
//! 4. [`Rule::pick_backend`]: by weight (a `VirtualService` destination's `subset` is in
//!    [`BackendReference::subset`], its port always set); [`RoutingError::NoBackend`] (no backend, or all of
//!    weight 0) is answered with its [`RoutingError::status`], 500. A backend the proxy cannot
//!    resolve (unknown Service, unsupported kind) is answered with 500 too, by the caller: the
//!    spec wants the share of requests weighted to an invalid backend to fail, not moved.
//! 5. The backend's own [`Filters`] (`Backend::filters`), likewise.
//! 6. On the response: the rule's [`Filters::apply_response`], then the backend's (the more
//!    specific level is applied last, so it wins).
//!
//! **Precedence.** Among the routes whose hostnames match the request's host, a route with the
//! longest matching non-wildcard hostname comes first, then the longest matching hostname
//! (a route without hostnames matches any host, last). Then, across all rules of those routes,
//! the match with: an `Exact` path, then a `PathPrefix` path with more characters (a trailing
//! `/` not counted), then a `RegularExpression` path (implementation-specific in the spec; this
//! is Istio's order: after prefixes, a longer pattern first); then a method; then more header
//! matches; then more query parameter matches. Remaining ties go to the oldest route by
//! `metadata.creationTimestamp`, then to the route first by `namespace/name`, then to the first
//! rule and match in the route. Routes without a creation timestamp (read from a file) count as
//! newer than every route that has one, so among themselves they are ordered by name.
//!
//! **Matching.** The path is matched as the request carries it (without the query): normalizing
//! it (dot segments, repeated slashes, encoded characters) is the caller's job, before
//! [`RouteTable::select`], as Istio does. `PathPrefix` matches whole segments. Header names
//! compare case-insensitively; a header sent several times is matched against its values joined
//! with `,`; of several matches naming one header in different case only the first counts.
//! Query parameters are percent-decoded (`+` is not a space) and the first occurrence counts.
//! Regular expressions match the whole value ([`crate::model::route::compile_regex`]). The host
//! is the URI's authority (HTTP/2 `:authority`, absolute-form) or the `Host` header, without
//! port and a final `.`, compared case-insensitively; `*.example.com` matches `a.example.com`
//! and `a.b.example.com`, not `example.com`.
//!
//! **Istio `VirtualService`s** compile into the same types ([`virtual_service`]): their table
//! ([`RouteTable::in_order`]) tries the rules in the order written, first match wins, with the
//! match kinds Istio adds (a plain-string `prefix`, `ignoreUriCase`, prefix matches of header and
//! query values and of the method, `withoutHeaders`, pseudo-headers such as `:authority`).
//!
//! Not done here: matching a route's hostnames against a Gateway listener's (a waypoint has no
//! listener hostnames), `parentRefs` (the caller picks the routes that apply to a Service or
//! waypoint), `timeouts` and `retry` (carried as data for the caller to enforce; `retry`
//! compiled into a [`RetryPolicy`]).
use std::borrow::Cow;
use std::cmp::Reverse;
use std::sync::Arc;
use std::time::Duration;

use http::header::{Entry, HeaderMap, HeaderName, HeaderValue, HOST, LOCATION, SET_COOKIE};
use http::uri::{Authority, PathAndQuery, Scheme, Uri};
use http::{request, response, StatusCode};
use regex::bytes::Regex;

use bytes::Bytes;
use http::header::CONTENT_TYPE;

use super::fault::Fault;
use super::retry::RetryPolicy;
use crate::model::route::{
    compile_regex, BackendObjectReference, HttpHeaderFilter, HttpHeaderMatch, HttpPathModifier,
    HttpRoute, HttpRouteFilter, HttpRouteMatch, HttpRouteRule, PathMatchType, RateLimit,
    RedirectScheme, ValueMatchType,
};

/// Why a request cannot go on; [`RoutingError::status`] is the answer to send.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RoutingError {
    #[error("the rule has no backend to send the request to (none listed, or all of weight 0)")]
    NoBackend,
    #[error("a redirect needs a host: the request has none and the filter sets no hostname")]
    RedirectWithoutHost,
    #[error("the rewritten request is not valid: {0}")]
    InvalidRewrite(String),
}

impl RoutingError {
    /// The status to answer with: 500 for no backend (as the spec requires) and for a broken
    /// rewrite, 400 for a request a redirect cannot be built from.
    pub fn status(&self) -> StatusCode {
        match self {
            RoutingError::NoBackend | RoutingError::InvalidRewrite(_) => {
                StatusCode::INTERNAL_SERVER_ERROR
            }
            RoutingError::RedirectWithoutHost => StatusCode::BAD_REQUEST,
        }
    }

    /// A short label for metrics and logs.
    pub fn reason(&self) -> &'static str {
        match self {
            RoutingError::NoBackend => "no_backend",
            RoutingError::RedirectWithoutHost => "redirect_without_host",
            RoutingError::InvalidRewrite(_) => "invalid_rewrite",
        }
    }
}

/// Where the request came in, for redirects that keep the request's scheme or port.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Listener {
    /// Used when the request's URI has no scheme (origin-form HTTP/1).
    pub scheme: Scheme,
    /// The port a redirect names when its filter sets neither `port` nor `scheme`.
    pub port: u16,
}

/// What the request filters decided.
#[derive(Debug)]
pub enum RequestOutcome {
    /// Send the (possibly changed) request on.
    Forward,
    /// Answer with this response (status 301 or 302 and `Location`), without a backend.
    Redirect(response::Parts),
    /// Answer with this response and body, without a backend (a `VirtualService`'s
    /// `directResponse`; the rule's own response header changes already applied).
    Respond(response::Parts, Bytes),
}

// ---------------------------------------------------------------------------------------------
// The table

/// Every rule of a set of routes, ordered for matching.
#[derive(Debug, Default)]
pub struct RouteTable {
    /// Oldest first, then by `namespace/name`.
    routes: Vec<Route>,
    /// Every match of every rule, most specific first (hostnames aside), or in the order
    /// written ([`RouteTable::in_order`]).
    entries: Vec<Candidate>,
}

#[derive(Debug, Clone, Copy)]
struct Candidate {
    route: usize,
    rule: usize,
    matching: usize,
}

/// The rule a request matched, and how.
#[derive(Debug, Clone, Copy)]
pub struct Selected<'t> {
    pub route: &'t Route,
    pub rule: &'t Rule,
    /// Which of the rule's matches matched (its index in the source's `matches` or `match`).
    pub match_index: usize,
}

/// What a [`Route`] was compiled from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RouteKind {
    HttpRoute,
    /// A `VirtualService`: its destinations may be in any namespace (Istio needs no
    /// ReferenceGrant) and carry a `subset`.
    VirtualService,
}

impl RouteKind {
    /// As the API names the kind.
    pub fn as_str(self) -> &'static str {
        match self {
            RouteKind::HttpRoute => "HTTPRoute",
            RouteKind::VirtualService => "VirtualService",
        }
    }
}

/// A compiled `HTTPRoute` (or `VirtualService`, see [`RouteKind`]).
#[derive(Debug)]
pub struct Route {
    pub kind: RouteKind,
    pub namespace: String,
    pub name: String,
    /// `namespace/name`, made once: every request it routes names it.
    key: Arc<str>,
    /// Its `mesh.dev/rate-limit` annotation.
    pub rate_limit: Option<RateLimit>,
    hostnames: Vec<Hostname>,
    pub rules: Vec<Rule>,
}

#[derive(Debug)]
enum Hostname {
    Exact(String),
    /// `*.example.com`, kept as `.example.com`.
    Wildcard(String),
}

/// How well a route's hostnames fit a host: (longest exact match, longest match), in
/// characters as written. Higher wins.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
struct HostScore {
    exact: usize,
    any: usize,
}

/// A compiled rule.
#[derive(Debug)]
pub struct Rule {
    /// Its index in the route's `rules` (a `VirtualService`'s `http`; one of its rules compiles
    /// into one `Rule` per `match` entry, all with its index).
    pub index: usize,
    pub name: Option<String>,
    matches: Vec<Match>,
    /// The index of `matches[0]` in the source rule's matches.
    match_offset: usize,
    /// In the order written.
    pub filters: Filters,
    pub backends: Vec<Backend>,
    total_weight: u64,
    /// As written (zero disables; absent leaves it to the proxy).
    pub request_timeout: Option<Duration>,
    pub backend_request_timeout: Option<Duration>,
    /// From the rule's `retry`; its per-try timeout is `backend_request_timeout`.
    pub retry: Option<RetryPolicy>,
    /// Faults to inject (a `VirtualService`'s; an `HTTPRoute` has none).
    pub fault: Option<Fault>,
}

/// Where requests (or mirrored copies) go, the namespace resolved.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BackendReference {
    pub group: String,
    pub kind: String,
    pub name: String,
    pub namespace: String,
    pub port: Option<u16>,
    /// A `VirtualService` destination's `subset` (of the Service's DestinationRules); `None`
    /// for an `HTTPRoute`'s backends. The caller picks the endpoints of the subset.
    pub subset: Option<String>,
}

impl BackendReference {
    /// A Service of the core group: the only kind this mesh resolves today.
    pub fn is_service(&self) -> bool {
        self.group.is_empty() && self.kind == "Service"
    }

    fn compile(backend: &BackendObjectReference, route_namespace: &str) -> BackendReference {
        BackendReference {
            group: backend.group.clone(),
            kind: backend.kind.clone(),
            name: backend.name.clone(),
            namespace: backend
                .namespace
                .clone()
                .unwrap_or_else(|| route_namespace.to_string()),
            port: backend.port,
            subset: None,
        }
    }
}

/// One of a rule's backends.
#[derive(Debug)]
pub struct Backend {
    pub reference: BackendReference,
    pub weight: u32,
    /// Applied only to requests sent to this backend, after the rule's.
    pub filters: Filters,
}

impl RouteTable {
    /// Compiles routes that passed [`HttpRoute::validate`]. Given an invalid one it does not
    /// fail: a match it cannot compile (a bad regular expression or header name) never matches,
    /// and a header value it cannot represent is left out of its filter.
    pub fn new(routes: &[HttpRoute]) -> RouteTable {
        let mut ordered: Vec<&HttpRoute> = routes.iter().collect();
        ordered.sort_by_key(|r| {
            let created = r.metadata.creation_timestamp.as_deref();
            (
                created.is_none(),
                created,
                r.metadata.namespace.as_str(),
                r.metadata.name.as_str(),
            )
        });
        let routes: Vec<Route> = ordered.into_iter().map(Route::compile).collect();
        let mut keyed = Vec::new();
        for (r, route) in routes.iter().enumerate() {
            for (u, rule) in route.rules.iter().enumerate() {
                for (m, matching) in rule.matches.iter().enumerate() {
                    keyed.push((matching.specificity, r, u, m));
                }
            }
        }
        keyed.sort_unstable();
        let entries = keyed
            .into_iter()
            .map(|(_, route, rule, matching)| Candidate {
                route,
                rule,
                matching,
            })
            .collect();
        RouteTable { routes, entries }
    }

    /// A table that tries every match of every rule in the order given (routes, then their
    /// rules, then each rule's matches): the first that matches wins, whatever its specificity.
    /// Istio's `VirtualService` semantics; hostnames play no part (a `VirtualService`'s routes
    /// have none).
    pub fn in_order(routes: Vec<Route>) -> RouteTable {
        let mut entries = Vec::new();
        for (r, route) in routes.iter().enumerate() {
            for (u, rule) in route.rules.iter().enumerate() {
                for m in 0..rule.matches.len() {
                    entries.push(Candidate {
                        route: r,
                        rule: u,
                        matching: m,
                    });
                }
            }
        }
        RouteTable { routes, entries }
    }

    /// Whether no request can match (no rule, or no match).
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// The routes, oldest first, then by `namespace/name` (or as given to `in_order`).
    pub fn routes(&self) -> &[Route] {
        &self.routes
    }

    /// The rule with precedence among those matching the request (see the module comment);
    /// `None`: answer 404.
    pub fn select(&self, request: &request::Parts) -> Option<Selected<'_>> {
        let host = match_host(request);
        let best_possible = self
            .routes
            .iter()
            .filter_map(|r| r.host_score(host))
            .max()?;
        let mut best: Option<(HostScore, Candidate)> = None;
        for entry in &self.entries {
            let route = &self.routes[entry.route];
            let Some(score) = route.host_score(host) else {
                continue;
            };
            if best.is_some_and(|(found, _)| score <= found) {
                continue;
            }
            if route.rules[entry.rule].matches[entry.matching].matches(request) {
                best = Some((score, *entry));
                if score == best_possible {
                    break;
                }
            }
        }
        best.map(|(_, entry)| {
            let route = &self.routes[entry.route];
            let rule = &route.rules[entry.rule];
            Selected {
                route,
                rule,
                match_index: rule.match_offset + entry.matching,
            }
        })
    }
}

impl Route {
    /// `namespace/name`.
    pub fn key(&self) -> &Arc<str> {
        &self.key
    }

    fn compile(route: &HttpRoute) -> Route {
        let namespace = &route.metadata.namespace;
        Route {
            kind: RouteKind::HttpRoute,
            key: format!("{namespace}/{}", route.metadata.name).into(),
            namespace: namespace.clone(),
            name: route.metadata.name.clone(),
            rate_limit: route.metadata.rate_limit(),
            hostnames: route
                .spec
                .hostnames
                .iter()
                .map(|h| match h.strip_prefix('*') {
                    Some(suffix) => Hostname::Wildcard(suffix.to_string()),
                    None => Hostname::Exact(h.clone()),
                })
                .collect(),
            rules: route
                .spec
                .rules
                .iter()
                .enumerate()
                .map(|(index, rule)| Rule::compile(index, rule, namespace))
                .collect(),
        }
    }

    /// `None`: the route does not apply to this host.
    fn host_score(&self, host: Option<&str>) -> Option<HostScore> {
        if self.hostnames.is_empty() {
            return Some(HostScore { exact: 0, any: 0 });
        }
        let host = host?;
        let mut score: Option<HostScore> = None;
        for hostname in &self.hostnames {
            let found = match hostname {
                Hostname::Exact(name) if host.eq_ignore_ascii_case(name) => HostScore {
                    exact: name.len(),
                    any: name.len(),
                },
                Hostname::Wildcard(suffix) if ends_with_ignore_case(host, suffix) => HostScore {
                    exact: 0,
                    any: suffix.len() + 1,
                },
                _ => continue,
            };
            score = score.max(Some(found));
        }
        score
    }
}

/// `host` has `suffix` (`.example.com`) and at least one character before it.
fn ends_with_ignore_case(host: &str, suffix: &str) -> bool {
    host.len() > suffix.len()
        && host.as_bytes()[host.len() - suffix.len()..].eq_ignore_ascii_case(suffix.as_bytes())
}

/// The request's host as routes match it: without port or final `.`.
fn match_host(request: &request::Parts) -> Option<&str> {
    let host = request_host(request)?;
    let host = host.strip_suffix('.').unwrap_or(host);
    Some(host).filter(|h| !h.is_empty())
}

/// The URI's authority, else the `Host` header, without the port (an IPv6 address keeps its
/// brackets).
fn request_host(request: &request::Parts) -> Option<&str> {
    if let Some(authority) = request.uri.authority() {
        return Some(authority.host()).filter(|h| !h.is_empty());
    }
    let host = request.headers.get(HOST)?.to_str().ok()?;
    let host = if host.starts_with('[') {
        host.find(']').map_or(host, |end| &host[..=end])
    } else {
        match host.rsplit_once(':') {
            Some((name, port)) if port.bytes().all(|b| b.is_ascii_digit()) => name,
            _ => host,
        }
    };
    Some(host).filter(|h| !h.is_empty())
}

// ---------------------------------------------------------------------------------------------
// Matches

#[derive(Debug)]
struct Match {
    path: PathMatch,
    method: Option<ValueMatch>,
    headers: Vec<(HeaderKey, ValueMatch)>,
    /// The request must have none of these (a `VirtualService`'s `withoutHeaders`).
    without_headers: Vec<(HeaderKey, ValueMatch)>,
    query: Vec<(String, ValueMatch)>,
    specificity: Specificity,
}

/// What a header match reads: a header, or a pseudo-header of the request (HTTP/2's names,
/// which Envoy matches as headers).
#[derive(Debug, Clone, PartialEq, Eq)]
enum HeaderKey {
    Name(HeaderName),
    /// `:authority`: the URI's authority, else the `Host` header.
    Authority,
    /// `:method`.
    Method,
    /// `:path`: the path and query.
    Path,
    /// `:scheme`: the URI's, else `http` (requests reach a waypoint as plain HTTP).
    Scheme,
    /// A name no request carries (`:status`): never present.
    Absent,
}

impl HeaderKey {
    /// `None`: not a valid header name. `host` is the authority, as in Envoy (an HTTP/2
    /// request carries it as `:authority`).
    fn parse(name: &str) -> Option<HeaderKey> {
        Some(match name.to_ascii_lowercase().as_str() {
            ":authority" | "host" => HeaderKey::Authority,
            ":method" => HeaderKey::Method,
            ":path" => HeaderKey::Path,
            ":scheme" => HeaderKey::Scheme,
            ":status" => HeaderKey::Absent,
            _ => HeaderKey::Name(HeaderName::from_bytes(name.as_bytes()).ok()?),
        })
    }

    fn matches(&self, request: &request::Parts, expected: &ValueMatch) -> bool {
        match self {
            HeaderKey::Name(name) => header_matches(&request.headers, name, expected),
            HeaderKey::Authority => {
                let authority = match request.uri.authority() {
                    Some(a) => Some(a.as_str()),
                    None => request.headers.get(HOST).and_then(|h| h.to_str().ok()),
                };
                authority.is_some_and(|a| expected.matches(a.as_bytes()))
            }
            HeaderKey::Method => expected.matches(request.method.as_str().as_bytes()),
            HeaderKey::Path => request
                .uri
                .path_and_query()
                .is_some_and(|p| expected.matches(p.as_str().as_bytes())),
            HeaderKey::Scheme => {
                expected.matches(request.uri.scheme_str().unwrap_or("http").as_bytes())
            }
            HeaderKey::Absent => false,
        }
    }
}

/// Sorts most specific first.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord)]
struct Specificity {
    path_kind: Reverse<u8>,
    path_len: Reverse<usize>,
    method: Reverse<bool>,
    headers: Reverse<usize>,
    query: Reverse<usize>,
}

#[derive(Debug)]
enum PathMatch {
    Exact(String),
    /// Without a trailing `/` (so `/` is the empty prefix); whole segments.
    Prefix(String),
    Regex(Regex),
    /// `exact` compared ASCII case-insensitively (`ignoreUriCase`).
    ExactIgnoreCase(String),
    /// A plain string prefix (`/foo` matches `/foobar`), as an Istio `uri.prefix`.
    StringPrefix(String),
    /// Likewise, compared ASCII case-insensitively.
    StringPrefixIgnoreCase(String),
    /// A match that could not be compiled.
    Never,
}

#[derive(Debug)]
enum ValueMatch {
    Exact(String),
    /// The value starts with this.
    Prefix(String),
    Regex(Regex),
    Never,
}

impl ValueMatch {
    fn compile(type_: ValueMatchType, value: &str) -> ValueMatch {
        match type_ {
            ValueMatchType::Exact => ValueMatch::Exact(value.to_string()),
            ValueMatchType::RegularExpression => {
                compile_regex(value).map_or(ValueMatch::Never, ValueMatch::Regex)
            }
        }
    }

    fn matches(&self, value: &[u8]) -> bool {
        match self {
            ValueMatch::Exact(expected) => value == expected.as_bytes(),
            ValueMatch::Prefix(prefix) => value.starts_with(prefix.as_bytes()),
            ValueMatch::Regex(regex) => regex.is_match(value),
            ValueMatch::Never => false,
        }
    }
}

/// `path` is `prefix` (without its trailing `/`) followed by nothing or a `/`.
fn prefix_matches(path: &str, prefix: &str) -> bool {
    path.starts_with(prefix) && matches!(path.as_bytes().get(prefix.len()), None | Some(b'/'))
}

impl PathMatch {
    fn matches(&self, path: &str) -> bool {
        match self {
            PathMatch::Exact(expected) => path == expected,
            PathMatch::Prefix(prefix) => prefix_matches(path, prefix),
            PathMatch::Regex(regex) => regex.is_match(path.as_bytes()),
            PathMatch::ExactIgnoreCase(expected) => path.eq_ignore_ascii_case(expected),
            PathMatch::StringPrefix(prefix) => path.starts_with(prefix.as_str()),
            PathMatch::StringPrefixIgnoreCase(prefix) => path
                .as_bytes()
                .get(..prefix.len())
                .is_some_and(|start| start.eq_ignore_ascii_case(prefix.as_bytes())),
            PathMatch::Never => false,
        }
    }
}

impl Match {
    fn compile(m: &HttpRouteMatch) -> Match {
        let value = &m.path.value;
        let (path, path_kind, path_len) = match m.path.type_ {
            PathMatchType::Exact => (PathMatch::Exact(value.clone()), 3, value.len()),
            PathMatchType::PathPrefix => {
                let prefix = value.trim_end_matches('/');
                (PathMatch::Prefix(prefix.to_string()), 2, prefix.len())
            }
            PathMatchType::RegularExpression => (
                compile_regex(value).map_or(PathMatch::Never, PathMatch::Regex),
                1,
                value.len(),
            ),
        };
        let mut headers: Vec<(HeaderKey, ValueMatch)> = Vec::new();
        let mut broken = false;
        for h in &m.headers {
            match HeaderName::from_bytes(h.name.as_bytes()) {
                // Of names equal but for case, only the first counts.
                Ok(name)
                    if headers
                        .iter()
                        .any(|(seen, _)| *seen == HeaderKey::Name(name.clone())) => {}
                Ok(name) => headers.push((
                    HeaderKey::Name(name),
                    ValueMatch::compile(h.type_, &h.value),
                )),
                Err(_) => broken = true,
            }
        }
        let query: Vec<(String, ValueMatch)> = dedup_query(&m.query_params)
            .map(|q| (q.name.clone(), ValueMatch::compile(q.type_, &q.value)))
            .collect();
        let specificity = Specificity {
            path_kind: Reverse(path_kind),
            path_len: Reverse(path_len),
            method: Reverse(m.method.is_some()),
            headers: Reverse(headers.len()),
            query: Reverse(query.len()),
        };
        Match {
            path: if broken { PathMatch::Never } else { path },
            method: m
                .method
                .map(|method| ValueMatch::Exact(method.as_str().to_string())),
            headers,
            without_headers: Vec::new(),
            query,
            specificity,
        }
    }

    fn matches(&self, request: &request::Parts) -> bool {
        self.path.matches(request.uri.path())
            && self
                .method
                .as_ref()
                .is_none_or(|m| m.matches(request.method.as_str().as_bytes()))
            && self
                .headers
                .iter()
                .all(|(key, value)| key.matches(request, value))
            && !self
                .without_headers
                .iter()
                .any(|(key, value)| key.matches(request, value))
            && self.query.iter().all(|(name, value)| {
                query_param(request.uri.query().unwrap_or(""), name)
                    .is_some_and(|found| value.matches(&found))
            })
    }
}

/// The first of each query parameter name.
fn dedup_query(params: &[HttpHeaderMatch]) -> impl Iterator<Item = &HttpHeaderMatch> {
    params
        .iter()
        .enumerate()
        .filter(|(i, p)| !params[..*i].iter().any(|q| q.name == p.name))
        .map(|(_, p)| p)
}

fn header_matches(headers: &HeaderMap, name: &HeaderName, expected: &ValueMatch) -> bool {
    let mut values = headers.get_all(name).iter();
    let Some(first) = values.next() else {
        return false;
    };
    let Some(second) = values.next() else {
        return expected.matches(first.as_bytes());
    };
    let mut joined = first.as_bytes().to_vec();
    for value in std::iter::once(second).chain(values) {
        joined.push(b',');
        joined.extend_from_slice(value.as_bytes());
    }
    expected.matches(&joined)
}

/// The percent-decoded value of the first parameter called `name` (decoded) in `query`.
fn query_param<'q>(query: &'q str, name: &str) -> Option<Cow<'q, [u8]>> {
    query.split('&').find_map(|pair| {
        let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
        (*percent_decode(key) == *name.as_bytes()).then(|| percent_decode(value))
    })
}

/// `%XX` escapes decoded; a `%` not followed by two hex digits is kept as it is.
fn percent_decode(text: &str) -> Cow<'_, [u8]> {
    if !text.contains('%') {
        return Cow::Borrowed(text.as_bytes());
    }
    let hex = |b: u8| char::from(b).to_digit(16).map(|d| d as u8);
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' && i + 2 < bytes.len() {
            if let (Some(high), Some(low)) = (hex(bytes[i + 1]), hex(bytes[i + 2])) {
                out.push(high << 4 | low);
                i += 3;
                continue;
            }
        }
        out.push(bytes[i]);
        i += 1;
    }
    Cow::Owned(out)
}

// ---------------------------------------------------------------------------------------------
// Rules and backends

impl Rule {
    fn compile(index: usize, rule: &HttpRouteRule, namespace: &str) -> Rule {
        let matches: Vec<Match> = rule.matches.iter().map(Match::compile).collect();
        // What ReplacePrefixMatch replaces: the rule's one PathPrefix match (validation
        // requires exactly one); `/` (the empty prefix) if there is none.
        let prefix = rule
            .matches
            .iter()
            .find(|m| m.path.type_ == PathMatchType::PathPrefix)
            .map_or("", |m| m.path.value.trim_end_matches('/'));
        let filters = compile_filters(&rule.filters, prefix, namespace);
        let backends: Vec<Backend> = rule
            .backend_refs
            .iter()
            .map(|b| Backend {
                reference: BackendReference::compile(&b.backend, namespace),
                weight: b.weight,
                filters: compile_filters(&b.filters, prefix, namespace),
            })
            .collect();
        let timeouts = rule.timeouts.unwrap_or_default();
        Rule {
            index,
            name: rule.name.clone(),
            matches,
            match_offset: 0,
            filters,
            total_weight: backends.iter().map(|b| u64::from(b.weight)).sum(),
            backends,
            request_timeout: timeouts.request,
            backend_request_timeout: timeouts.backend_request,
            retry: rule.retry.as_ref().map(|r| {
                RetryPolicy::for_http_route(
                    &r.codes,
                    r.attempts,
                    r.backoff,
                    timeouts.backend_request,
                )
            }),
            fault: None,
        }
    }

    /// A backend chosen in proportion to the weights: `random` (uniform over `u32`) falls in
    /// one backend's share of `0..2^32`. A backend of weight 0 is never chosen; with no backend
    /// of weight above 0 the answer is [`RoutingError::NoBackend`] (500).
    pub fn pick_backend(&self, random: u32) -> Result<&Backend, RoutingError> {
        if self.total_weight == 0 {
            return Err(RoutingError::NoBackend);
        }
        let mut point = (u64::from(random) * self.total_weight) >> 32;
        for backend in &self.backends {
            let weight = u64::from(backend.weight);
            if point < weight {
                return Ok(backend);
            }
            point -= weight;
        }
        Err(RoutingError::NoBackend)
    }
}

// ---------------------------------------------------------------------------------------------
// Filters

/// A rule's or a backend's filters, in the order written.
#[derive(Debug, Default)]
pub struct Filters(pub Vec<Filter>);

/// A compiled filter.
#[derive(Debug)]
pub enum Filter {
    RequestHeaderModifier(HeaderModifier),
    ResponseHeaderModifier(HeaderModifier),
    RequestMirror(Mirror),
    RequestRedirect(Redirect),
    UrlRewrite(UrlRewrite),
    /// Answers the request itself (a `VirtualService`'s `directResponse`).
    DirectResponse(DirectResponse),
}

fn compile_filters(filters: &[HttpRouteFilter], prefix: &str, namespace: &str) -> Filters {
    Filters(
        filters
            .iter()
            .map(|filter| match filter {
                HttpRouteFilter::RequestHeaderModifier(h) => {
                    Filter::RequestHeaderModifier(HeaderModifier::compile(h))
                }
                HttpRouteFilter::ResponseHeaderModifier(h) => {
                    Filter::ResponseHeaderModifier(HeaderModifier::compile(h))
                }
                HttpRouteFilter::RequestMirror(m) => {
                    let (numerator, denominator) = m.share();
                    Filter::RequestMirror(Mirror {
                        backend: BackendReference::compile(&m.backend_ref, namespace),
                        numerator,
                        denominator,
                    })
                }
                HttpRouteFilter::RequestRedirect(r) => Filter::RequestRedirect(Redirect {
                    scheme: r.scheme,
                    hostname: r.hostname.clone(),
                    path: r.path.as_ref().map(|p| PathRewrite::compile(p, prefix)),
                    port: r.port,
                    status: StatusCode::from_u16(r.status_code).unwrap_or(StatusCode::FOUND),
                }),
                HttpRouteFilter::UrlRewrite(r) => Filter::UrlRewrite(UrlRewrite {
                    hostname: r
                        .hostname
                        .as_ref()
                        .and_then(|h| Some((h.parse().ok()?, HeaderValue::from_str(h).ok()?))),
                    path: r.path.as_ref().map(|p| PathRewrite::compile(p, prefix)),
                }),
            })
            .collect(),
    )
}

impl Filter {
    /// Applies a request-side filter: header changes and rewrites change `request`, a redirect
    /// returns the response to send. Response header modifiers and mirrors do nothing here.
    pub fn apply_to_request(
        &self,
        request: &mut request::Parts,
        listener: &Listener,
    ) -> Result<RequestOutcome, RoutingError> {
        match self {
            Filter::RequestHeaderModifier(m) => m.apply(&mut request.headers),
            Filter::UrlRewrite(r) => r.apply(request)?,
            Filter::RequestRedirect(r) => {
                return r.response(request, listener).map(RequestOutcome::Redirect)
            }
            Filter::DirectResponse(d) => {
                let (parts, body) = d.response();
                return Ok(RequestOutcome::Respond(parts, body));
            }
            Filter::ResponseHeaderModifier(_) | Filter::RequestMirror(_) => {}
        }
        Ok(RequestOutcome::Forward)
    }

    /// Applies a `ResponseHeaderModifier`; other filters do nothing here.
    pub fn apply_to_response(&self, response: &mut response::Parts) {
        if let Filter::ResponseHeaderModifier(m) = self {
            m.apply(&mut response.headers);
        }
    }
}

impl Filters {
    /// Applies the request filters in order, stopping at a redirect or a direct response; the
    /// latter gets these filters' response header changes at once (Envoy applies a route's
    /// response headers to its direct responses).
    pub fn apply_request(
        &self,
        request: &mut request::Parts,
        listener: &Listener,
    ) -> Result<RequestOutcome, RoutingError> {
        for filter in &self.0 {
            match filter.apply_to_request(request, listener)? {
                RequestOutcome::Forward => {}
                RequestOutcome::Respond(mut parts, body) => {
                    self.apply_response(&mut parts);
                    return Ok(RequestOutcome::Respond(parts, body));
                }
                redirect => return Ok(redirect),
            }
        }
        Ok(RequestOutcome::Forward)
    }

    /// Applies the `ResponseHeaderModifier`s, in order.
    pub fn apply_response(&self, response: &mut response::Parts) {
        for filter in &self.0 {
            filter.apply_to_response(response);
        }
    }

    /// The targets of the `RequestMirror` filters that take this request, given a `random`
    /// number uniform over `u32`. The first mirror decides on `random` itself, the others on
    /// numbers derived from it, so that their shares are independent.
    pub fn mirrors(&self, random: u32) -> impl Iterator<Item = &BackendReference> {
        self.0
            .iter()
            .filter_map(|f| match f {
                Filter::RequestMirror(m) => Some(m),
                _ => None,
            })
            .enumerate()
            .filter(move |(i, m)| m.takes(derived_random(random, *i)))
            .map(|(_, m)| &m.backend)
    }
}

/// `random` for the first, a mix of it and `index` for the others.
fn derived_random(random: u32, index: usize) -> u32 {
    if index == 0 {
        return random;
    }
    let mut x = random ^ (index as u32).wrapping_mul(0x9E37_79B9);
    x ^= x >> 16;
    x = x.wrapping_mul(0x85EB_CA6B);
    x ^= x >> 13;
    x = x.wrapping_mul(0xC2B2_AE35);
    x ^ (x >> 16)
}

/// `RequestHeaderModifier` / `ResponseHeaderModifier`: set, then add, then remove (each name
/// appears in one list only). A `VirtualService`'s header operations (`envoy`) go in Envoy's
/// order instead: remove, then set, then add, each added value a field of its own.
#[derive(Debug, Default)]
pub struct HeaderModifier {
    set: Vec<(HeaderName, HeaderValue)>,
    add: Vec<(HeaderName, HeaderValue)>,
    remove: Vec<HeaderName>,
    envoy: bool,
}

impl HeaderModifier {
    fn compile(filter: &HttpHeaderFilter) -> HeaderModifier {
        let pairs = |list: &[crate::model::route::HttpHeader]| {
            list.iter()
                .filter_map(|h| {
                    Some((
                        HeaderName::from_bytes(h.name.as_bytes()).ok()?,
                        HeaderValue::from_str(&h.value).ok()?,
                    ))
                })
                .collect()
        };
        HeaderModifier {
            set: pairs(&filter.set),
            add: pairs(&filter.add),
            remove: filter
                .remove
                .iter()
                .filter_map(|n| HeaderName::from_bytes(n.as_bytes()).ok())
                .collect(),
            envoy: false,
        }
    }

    /// `set` replaces every value of a header; `add` appends to the values there, as one value
    /// joined with `,` (`foo` + `bar,baz` gives `foo,bar,baz`; `Set-Cookie` gets a field of its
    /// own instead); `remove` drops every value.
    pub fn apply(&self, headers: &mut HeaderMap) {
        if self.envoy {
            for name in &self.remove {
                headers.remove(name);
            }
            for (name, value) in &self.set {
                headers.insert(name.clone(), value.clone());
            }
            for (name, value) in &self.add {
                headers.append(name.clone(), value.clone());
            }
            return;
        }
        for (name, value) in &self.set {
            headers.insert(name.clone(), value.clone());
        }
        for (name, value) in &self.add {
            add_header(headers, name, value);
        }
        for name in &self.remove {
            headers.remove(name);
        }
    }
}

fn add_header(headers: &mut HeaderMap, name: &HeaderName, value: &HeaderValue) {
    if *name == SET_COOKIE {
        headers.append(name.clone(), value.clone());
        return;
    }
    match headers.entry(name.clone()) {
        Entry::Vacant(vacant) => {
            vacant.insert(value.clone());
        }
        Entry::Occupied(mut occupied) => {
            let mut joined = Vec::new();
            for existing in occupied.iter() {
                joined.extend_from_slice(existing.as_bytes());
                joined.push(b',');
            }
            joined.extend_from_slice(value.as_bytes());
            match HeaderValue::from_bytes(&joined) {
                Ok(joined) => {
                    occupied.insert(joined);
                }
                Err(_) => occupied.append(value.clone()),
            }
        }
    }
}

/// `RequestMirror`: a copy of the request goes to `backend` for a share of requests.
#[derive(Debug)]
pub struct Mirror {
    pub backend: BackendReference,
    numerator: u32,
    denominator: u32,
}

impl Mirror {
    /// Whether this request is copied: `random` (uniform over `u32`) falls in the first
    /// `numerator / denominator` of `0..2^32`.
    pub fn takes(&self, random: u32) -> bool {
        self.denominator != 0
            && u64::from(random) * u64::from(self.denominator)
                < u64::from(self.numerator.min(self.denominator)) << 32
    }
}

/// A path change of a redirect or rewrite.
#[derive(Debug)]
enum PathRewrite {
    Full(String),
    /// `matched` and `replacement` without a trailing `/`.
    Prefix {
        matched: String,
        replacement: String,
    },
    /// Envoy's `prefix_rewrite`: the first `len` bytes (what a plain-string prefix match
    /// matched) replaced, as they are, by `replacement`.
    StringPrefix {
        len: usize,
        replacement: String,
    },
    /// Envoy's `regex_rewrite`: every match of `regex` replaced by `replacement` (the `regex`
    /// crate's syntax, `${1}` for a group).
    Regex {
        regex: regex::Regex,
        replacement: String,
    },
}

impl PathRewrite {
    fn compile(modifier: &HttpPathModifier, prefix: &str) -> PathRewrite {
        match modifier {
            HttpPathModifier::ReplaceFullPath(path) => PathRewrite::Full(path.clone()),
            HttpPathModifier::ReplacePrefixMatch(replacement) => PathRewrite::Prefix {
                matched: prefix.to_string(),
                replacement: replacement.trim_end_matches('/').to_string(),
            },
        }
    }

    /// The new path; a path the prefix does not match is kept.
    fn apply<'p>(&self, path: &'p str) -> Cow<'p, str> {
        match self {
            PathRewrite::Full(full) => Cow::Owned(full.clone()),
            PathRewrite::Prefix {
                matched,
                replacement,
            } => replace_prefix(path, matched, replacement).map_or(Cow::Borrowed(path), Cow::Owned),
            PathRewrite::StringPrefix { len, replacement } => match path.get(*len..) {
                Some(rest) => Cow::Owned(format!("{replacement}{rest}")),
                None => Cow::Borrowed(path),
            },
            PathRewrite::Regex { regex, replacement } => {
                match regex.replace_all(path, replacement.as_str()) {
                    Cow::Borrowed(_) => Cow::Borrowed(path),
                    Cow::Owned(changed) => Cow::Owned(changed),
                }
            }
        }
    }
}

/// `ReplacePrefixMatch`: `path` with the segments `prefix` matched replaced by `replacement`
/// (both without a trailing `/`), the rest kept; `/` if nothing is left. `None` if `prefix` does
/// not match `path`.
pub fn replace_prefix(path: &str, prefix: &str, replacement: &str) -> Option<String> {
    let prefix = prefix.trim_end_matches('/');
    let replacement = replacement.trim_end_matches('/');
    if !prefix_matches(path, prefix) {
        return None;
    }
    let rest = &path[prefix.len()..];
    let mut out = String::with_capacity(replacement.len() + rest.len() + 1);
    out.push_str(replacement);
    out.push_str(rest);
    if out.is_empty() {
        out.push('/');
    }
    Some(out)
}

/// `RequestRedirect`.
#[derive(Debug)]
pub struct Redirect {
    scheme: Option<RedirectScheme>,
    hostname: Option<String>,
    path: Option<PathRewrite>,
    port: Option<u16>,
    status: StatusCode,
}

fn well_known_port(scheme: &str) -> Option<u16> {
    match scheme {
        "http" => Some(80),
        "https" => Some(443),
        _ => None,
    }
}

impl Redirect {
    /// The redirect response: its status (302 unless set) and `Location` =
    /// `scheme://host[:port]path[?query]`: scheme, host and path from the filter or else the
    /// request (the listener's scheme for an origin-form request), the query kept. The port is
    /// the filter's, else the well-known port of the filter's scheme, else the listener's; it is
    /// left out when it is the scheme's well-known one (80 for http, 443 for https).
    pub fn response(
        &self,
        request: &request::Parts,
        listener: &Listener,
    ) -> Result<response::Parts, RoutingError> {
        let scheme = match self.scheme {
            Some(scheme) => scheme.as_str(),
            None => request
                .uri
                .scheme_str()
                .unwrap_or_else(|| listener.scheme.as_str()),
        };
        let host = match &self.hostname {
            Some(hostname) => hostname.as_str(),
            None => request_host(request).ok_or(RoutingError::RedirectWithoutHost)?,
        };
        let port = self.port.unwrap_or_else(|| match self.scheme {
            Some(scheme) => well_known_port(scheme.as_str()).unwrap_or(listener.port),
            None => listener.port,
        });
        let path = match &self.path {
            Some(rewrite) => rewrite.apply(request.uri.path()),
            None => Cow::Borrowed(request.uri.path()),
        };
        // A replacement path with a query of its own replaces the request's (Envoy's
        // `path_redirect`).
        let query = request.uri.query().filter(|_| !path.contains('?'));
        let mut location = String::with_capacity(
            scheme.len() + host.len() + path.len() + query.map_or(0, str::len) + 10,
        );
        location.push_str(scheme);
        location.push_str("://");
        location.push_str(host);
        if well_known_port(scheme) != Some(port) {
            location.push(':');
            location.push_str(&port.to_string());
        }
        location.push_str(&path);
        if let Some(query) = query {
            location.push('?');
            location.push_str(query);
        }
        let location = HeaderValue::try_from(location)
            .map_err(|e| RoutingError::InvalidRewrite(format!("Location: {e}")))?;
        let (mut parts, ()) = http::Response::new(()).into_parts();
        parts.status = self.status;
        parts.headers.insert(LOCATION, location);
        Ok(parts)
    }
}

/// A direct response: `status` and `body` (`content-type: text/plain` when there is one, as
/// Envoy's local replies).
#[derive(Debug)]
pub struct DirectResponse {
    status: StatusCode,
    body: Bytes,
}

impl DirectResponse {
    fn response(&self) -> (response::Parts, Bytes) {
        let (mut parts, ()) = http::Response::new(()).into_parts();
        parts.status = self.status;
        if !self.body.is_empty() {
            parts
                .headers
                .insert(CONTENT_TYPE, HeaderValue::from_static("text/plain"));
        }
        (parts, self.body.clone())
    }
}

/// `URLRewrite`.
#[derive(Debug)]
pub struct UrlRewrite {
    hostname: Option<(Authority, HeaderValue)>,
    path: Option<PathRewrite>,
}

impl UrlRewrite {
    /// Replaces the host (the URI's authority when it has one, without port, and the `Host`
    /// header when there is one or no authority) and the path; the query is kept.
    pub fn apply(&self, request: &mut request::Parts) -> Result<(), RoutingError> {
        let mut parts = request.uri.clone().into_parts();
        if let Some((authority, value)) = &self.hostname {
            if parts.authority.is_some() {
                parts.authority = Some(authority.clone());
            }
            if parts.authority.is_none() || request.headers.contains_key(HOST) {
                request.headers.insert(HOST, value.clone());
            }
        }
        if let Some(rewrite) = &self.path {
            let path = rewrite.apply(request.uri.path());
            let path_and_query = match request.uri.query() {
                Some(query) => format!("{path}?{query}"),
                None => path.into_owned(),
            };
            parts.path_and_query = Some(
                PathAndQuery::try_from(path_and_query)
                    .map_err(|e| RoutingError::InvalidRewrite(format!("path: {e}")))?,
            );
        }
        request.uri =
            Uri::from_parts(parts).map_err(|e| RoutingError::InvalidRewrite(e.to_string()))?;
        Ok(())
    }
}

pub mod virtual_service;

#[cfg(test)]
mod tests;

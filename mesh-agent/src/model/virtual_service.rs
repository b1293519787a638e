//! Istio `VirtualService` documents (`networking.istio.io/v1`) as data, following **Istio 1.31**
//! (its CRD's fields and defaults and its validation; see `model::networking`), for the HTTP
//! routes a waypoint serves.
//!
//! Reading is strict, as for HTTPRoutes: an unknown field is an error that serde reports with the
//! field path and line, and a field of the API this proxy does not implement (`tcp`, `tls`,
//! `corsPolicy`, `delegate`, `sourceLabels`, gateways other than `mesh`, ...) is refused by name
//! with the reason, never ignored. A StringMatch must set exactly one of `exact`, `prefix` and
//! `regex` (Istio's empty match, header presence, is written `regex: ".*"` here).
//!
//! What the data means, where Istio gives an absent field a meaning:
//!
//! * no `match`: the route matches every request; the routes are tried in order, first match wins;
//! * one `route` destination takes every request whatever its `weight`; with several, each takes
//!   `weight / sum of weights` (Istio 1.31 treats weights as proportions and requires only a
//!   positive sum; an absent weight is 0);
//! * a fault's `percentage` absent: no request is delayed or aborted (Istio's translation gives
//!   0%); `mirrorPercentage` or a mirror's `percentage` absent: every request is mirrored;
//! * `redirect.redirectCode` absent: 301; `timeout` absent: none; `retries` absent: the mesh's
//!   default retry policy (the waypoint decides it).
//!
//! [`VirtualService::validate`] checks values and the rules between fields with Istio's rules
//! (route vs redirect vs directResponse, regular expressions, header names, hosts that name a
//! Service of the mesh); its errors name the field (`spec.http[0].route[1].weight`).
//! [`parse_virtual_services`] does both.
use std::collections::BTreeMap;
use std::time::Duration;

use serde::de::Deserializer;
use serde::Deserialize;

use super::networking::{self, api_version, PortSelector, ServiceRef};
use super::policy::deserialize_parsed;
use super::route::{deserialize_converted, RouteMetadata};

pub use super::networking::Percent;

mod validate;

const NOT_HTTP: &str = "a waypoint routes HTTP; TCP and TLS traffic passes it at L4 unchanged";
const ONE_LEVEL: &str = "delegation between VirtualServices is not implemented";
const NO_SOURCE: &str = "the waypoint routes by request, not by which workload or gateway sent \
                         it";
const NO_CORS: &str = "CORS handling is not implemented by this waypoint";
const DEPRECATED_MIRROR: &str = "it is deprecated in Istio; use `mirrorPercentage`";

/// One `VirtualService`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(try_from = "RawVirtualService")]
pub struct VirtualService {
    pub metadata: RouteMetadata,
    pub spec: VirtualServiceSpec,
}

impl VirtualService {
    /// `namespace/name`.
    pub fn key(&self) -> String {
        self.metadata.key()
    }

    /// The Services its `hosts` name, in order (validation has checked that each resolves).
    pub fn services(&self) -> Vec<ServiceRef> {
        self.spec
            .hosts
            .iter()
            .filter_map(|h| networking::resolve_host(h, &self.metadata.namespace).ok())
            .collect()
    }

    /// The Service a destination's `host` names (resolved against this object's namespace).
    pub fn destination_service(&self, destination: &Destination) -> Result<ServiceRef, String> {
        networking::resolve_host(&destination.host, &self.metadata.namespace)
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct RawVirtualService {
    #[serde(deserialize_with = "api_version")]
    #[allow(dead_code)] // Checked while reading.
    api_version: (),
    #[serde(deserialize_with = "kind")]
    #[allow(dead_code)] // Checked while reading.
    kind: (),
    metadata: RouteMetadata,
    spec: VirtualServiceSpec,
}

impl From<RawVirtualService> for VirtualService {
    fn from(raw: RawVirtualService) -> Self {
        VirtualService {
            metadata: raw.metadata,
            spec: raw.spec,
        }
    }
}

fn kind<'de, D: Deserializer<'de>>(deserializer: D) -> Result<(), D::Error> {
    deserialize_parsed(deserializer, "a kind", |value| {
        if value == "VirtualService" {
            Ok(())
        } else {
            Err(format!(
                "unsupported kind {value:?}: expected VirtualService"
            ))
        }
    })
}

refuse_field!(refuse_tcp, "tcp", NOT_HTTP);
refuse_field!(refuse_tls, "tls", NOT_HTTP);
refuse_field!(refuse_delegate, "delegate", ONE_LEVEL);
refuse_field!(refuse_cors_policy, "corsPolicy", NO_CORS);
refuse_field!(refuse_mirror_percent, "mirrorPercent", DEPRECATED_MIRROR);
refuse_field!(
    refuse_mirror_percent_snake,
    "mirror_percent",
    DEPRECATED_MIRROR
);
refuse_field!(refuse_source_labels, "sourceLabels", NO_SOURCE);
refuse_field!(refuse_source_namespace, "sourceNamespace", NO_SOURCE);
refuse_field!(refuse_match_gateways, "gateways", NO_SOURCE);
refuse_field!(
    refuse_stat_prefix,
    "statPrefix",
    "per-route statistics prefixes are Envoy's; this waypoint reports Istio's standard metrics"
);
refuse_field!(
    refuse_scheme,
    "scheme",
    "requests reach a waypoint as plain HTTP inside HBONE, so the scheme says nothing"
);
refuse_field!(
    refuse_authority,
    "authority",
    "the VirtualService's `hosts` already select by authority; match on `headers` if needed"
);
refuse_field!(
    refuse_backoff,
    "backoff",
    "the retry back-off interval is the waypoint's own"
);
refuse_field!(
    refuse_retry_ignore_previous_hosts,
    "retryIgnorePreviousHosts",
    "the waypoint's retries already prefer another endpoint"
);
refuse_field!(
    refuse_derive_port,
    "derivePort",
    "set `port` explicitly (or leave it out to keep the request's)"
);
refuse_field!(
    refuse_prefix_rewrite,
    "prefixRewrite",
    "use `uri` for a redirect's path"
);
refuse_field!(
    refuse_http2_error,
    "http2Error",
    "Istio itself does not implement HTTP/2 abort faults yet; use `httpStatus` or `grpcStatus`"
);
refuse_field!(
    refuse_exponential_delay,
    "exponentialDelay",
    "Istio itself does not implement it yet; use `fixedDelay`"
);
refuse_field!(
    refuse_percent,
    "percent",
    "it is deprecated in Istio; use `percentage: {value: N}`"
);
refuse_field!(refuse_bytes, "bytes", "give the body as `string`");

#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct VirtualServiceSpec {
    /// The Services whose traffic these routes apply to: `name` (this namespace) or
    /// `name.namespace.svc.cluster.local`.
    #[serde(default)]
    pub hosts: Vec<String>,
    /// Absent, empty or `[mesh]`: the only gateway a waypoint is.
    #[serde(default, deserialize_with = "mesh_gateways")]
    pub gateways: Vec<String>,
    /// `*` or `.` only (see `model::networking`).
    #[serde(default)]
    pub export_to: Vec<String>,
    /// Tried in order; the first whose `match` holds is used.
    #[serde(default)]
    pub http: Vec<HttpRoute>,
    #[serde(default, deserialize_with = "refuse_tcp")]
    #[allow(dead_code)] // Never read: reading one fails.
    tcp: Option<networking::Refused>,
    #[serde(default, deserialize_with = "refuse_tls")]
    #[allow(dead_code)] // Never read: reading one fails.
    tls: Option<networking::Refused>,
}

fn mesh_gateways<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Vec<String>, D::Error> {
    let gateways = Vec::<String>::deserialize(deserializer)?;
    if let Some(other) = gateways.iter().find(|g| g.as_str() != "mesh") {
        return Err(serde::de::Error::custom(format!(
            "`gateways` entry {other:?} is not supported: a waypoint serves mesh traffic, so \
             only `mesh` (or no `gateways`) is accepted"
        )));
    }
    Ok(gateways)
}

/// One HTTP route: conditions, then what to do (forward to `route`, answer with `redirect` or
/// `directResponse`) and how.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct HttpRoute {
    #[serde(default)]
    pub name: Option<String>,
    /// Any one holding selects the route; empty: every request.
    #[serde(default, rename = "match")]
    pub matches: Vec<HttpMatchRequest>,
    /// Where requests go, weighted.
    #[serde(default)]
    pub route: Vec<HttpRouteDestination>,
    #[serde(default)]
    pub redirect: Option<HttpRedirect>,
    #[serde(default)]
    pub direct_response: Option<HttpDirectResponse>,
    #[serde(default)]
    pub rewrite: Option<HttpRewrite>,
    /// The whole request; absent: no timeout.
    #[serde(default, deserialize_with = "networking::duration")]
    pub timeout: Option<Duration>,
    #[serde(default)]
    pub retries: Option<HttpRetry>,
    #[serde(default)]
    pub fault: Option<HttpFaultInjection>,
    /// Copies of the requests go here too (responses dropped); see `mirror_share`.
    #[serde(default)]
    pub mirror: Option<Destination>,
    /// Share of requests `mirror` gets; absent: all.
    #[serde(default)]
    pub mirror_percentage: Option<Percent>,
    /// Several mirrors, each with its own share (not with `mirror`).
    #[serde(default)]
    pub mirrors: Vec<HttpMirrorPolicy>,
    /// Header changes for every request of this route (before a destination's own).
    #[serde(default)]
    pub headers: Option<Headers>,
    #[serde(default, deserialize_with = "refuse_delegate")]
    #[allow(dead_code)] // Never read: reading one fails.
    delegate: Option<networking::Refused>,
    #[serde(default, deserialize_with = "refuse_cors_policy")]
    #[allow(dead_code)] // Never read: reading one fails.
    cors_policy: Option<networking::Refused>,
    #[serde(default, deserialize_with = "refuse_mirror_percent")]
    #[allow(dead_code)] // Never read: reading one fails.
    mirror_percent: Option<networking::Refused>,
    #[serde(
        default,
        rename = "mirror_percent",
        deserialize_with = "refuse_mirror_percent_snake"
    )]
    #[allow(dead_code)] // Never read: reading one fails.
    mirror_percent_snake: Option<networking::Refused>,
}

impl HttpRoute {
    /// The share of requests `mirror` gets, 0.0 to 1.0 (all when `mirrorPercentage` is absent).
    pub fn mirror_share(&self) -> f64 {
        self.mirror_percentage.map_or(1.0, Percent::fraction)
    }
}

/// All its conditions must hold.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct HttpMatchRequest {
    #[serde(default)]
    pub name: Option<String>,
    /// The path (with the query removed).
    #[serde(default)]
    pub uri: Option<StringMatch>,
    #[serde(default)]
    pub method: Option<StringMatch>,
    /// By lower-case name.
    #[serde(default)]
    pub headers: BTreeMap<String, StringMatch>,
    #[serde(default)]
    pub query_params: BTreeMap<String, StringMatch>,
    /// The request must not have a header matching any of these.
    #[serde(default)]
    pub without_headers: BTreeMap<String, StringMatch>,
    /// `uri` compares case-insensitively (`exact` and `prefix`).
    #[serde(default)]
    pub ignore_uri_case: bool,
    /// The Service port the request was sent to.
    #[serde(default)]
    pub port: Option<u32>,
    #[serde(default, deserialize_with = "refuse_scheme")]
    #[allow(dead_code)] // Never read: reading one fails.
    scheme: Option<networking::Refused>,
    #[serde(default, deserialize_with = "refuse_authority")]
    #[allow(dead_code)] // Never read: reading one fails.
    authority: Option<networking::Refused>,
    #[serde(default, deserialize_with = "refuse_source_labels")]
    #[allow(dead_code)] // Never read: reading one fails.
    source_labels: Option<networking::Refused>,
    #[serde(default, deserialize_with = "refuse_source_namespace")]
    #[allow(dead_code)] // Never read: reading one fails.
    source_namespace: Option<networking::Refused>,
    #[serde(default, deserialize_with = "refuse_match_gateways")]
    #[allow(dead_code)] // Never read: reading one fails.
    gateways: Option<networking::Refused>,
    #[serde(default, deserialize_with = "refuse_stat_prefix")]
    #[allow(dead_code)] // Never read: reading one fails.
    stat_prefix: Option<networking::Refused>,
}

/// Exactly one of `exact`, `prefix` or `regex` (RE2 syntax, matching the whole value; compiled
/// with `model::route::compile_regex`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StringMatch {
    Exact(String),
    Prefix(String),
    Regex(String),
}

impl<'de> Deserialize<'de> for StringMatch {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserialize_converted::<D, RawStringMatch, _>(deserializer, "a string match")
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawStringMatch {
    #[serde(default)]
    exact: Option<String>,
    #[serde(default)]
    prefix: Option<String>,
    #[serde(default)]
    regex: Option<String>,
}

impl TryFrom<RawStringMatch> for StringMatch {
    type Error = String;

    fn try_from(raw: RawStringMatch) -> Result<Self, String> {
        match (raw.exact, raw.prefix, raw.regex) {
            (Some(s), None, None) => Ok(StringMatch::Exact(s)),
            (None, Some(s), None) => Ok(StringMatch::Prefix(s)),
            (None, None, Some(s)) => Ok(StringMatch::Regex(s)),
            (None, None, None) => Err("set one of `exact`, `prefix` or `regex` (for the mere \
                                       presence of a header, `regex: \".*\"`)"
                .to_string()),
            _ => Err("set only one of `exact`, `prefix` or `regex`".to_string()),
        }
    }
}

/// A destination and its share of the route's requests.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct HttpRouteDestination {
    pub destination: Destination,
    /// Relative; absent: 0 (see the module comment).
    #[serde(default)]
    pub weight: u32,
    /// Header changes for requests sent to this destination (after the route's own).
    #[serde(default)]
    pub headers: Option<Headers>,
}

/// A Service, optionally one of its DestinationRule subsets and one of its ports.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Destination {
    /// `name` (the VirtualService's namespace) or `name.namespace.svc.cluster.local`.
    pub host: String,
    /// A subset of the host's DestinationRule.
    #[serde(default)]
    pub subset: Option<String>,
    /// Needed when the Service has several ports.
    #[serde(default)]
    pub port: Option<PortSelector>,
}

/// Header changes; names in `set` and `add` of a request may be `host`/`:authority` (once).
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Headers {
    #[serde(default)]
    pub request: Option<HeaderOperations>,
    #[serde(default)]
    pub response: Option<HeaderOperations>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct HeaderOperations {
    /// Replaces the header's values.
    #[serde(default)]
    pub set: BTreeMap<String, String>,
    /// Appends a value.
    #[serde(default)]
    pub add: BTreeMap<String, String>,
    #[serde(default)]
    pub remove: Vec<String>,
}

/// Answers with a redirect built from the request and these.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct HttpRedirect {
    /// Replaces the path (and query).
    #[serde(default)]
    pub uri: Option<String>,
    #[serde(default)]
    pub authority: Option<String>,
    #[serde(default)]
    pub port: Option<u32>,
    /// `http` or `https`.
    #[serde(default)]
    pub scheme: Option<String>,
    /// A 3xx status; absent: 301.
    #[serde(default = "moved_permanently")]
    pub redirect_code: u32,
    #[serde(default, deserialize_with = "refuse_derive_port")]
    #[allow(dead_code)] // Never read: reading one fails.
    derive_port: Option<networking::Refused>,
    #[serde(default, deserialize_with = "refuse_prefix_rewrite")]
    #[allow(dead_code)] // Never read: reading one fails.
    prefix_rewrite: Option<networking::Refused>,
}

fn moved_permanently() -> u32 {
    301
}

/// Answers the request itself.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct HttpDirectResponse {
    /// 200 to 599.
    pub status: u32,
    #[serde(default)]
    pub body: Option<HttpBody>,
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct HttpBody {
    pub string: String,
    #[serde(default, deserialize_with = "refuse_bytes")]
    #[allow(dead_code)] // Never read: reading one fails.
    bytes: Option<networking::Refused>,
}

/// Changes the request on its way to the destination.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct HttpRewrite {
    /// Replaces the part of the path the match's `uri` matched (all of it for `exact` or
    /// `regex`, the prefix for `prefix`).
    #[serde(default)]
    pub uri: Option<String>,
    /// Replaces the Host/`:authority`.
    #[serde(default)]
    pub authority: Option<String>,
    #[serde(default)]
    pub uri_regex_rewrite: Option<RegexRewrite>,
}

/// Rewrites the path with a regular expression and a replacement (`\1` for groups).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct RegexRewrite {
    #[serde(rename = "match")]
    pub match_: String,
    pub rewrite: String,
}

/// Retries of a request that failed as `retry_on` says.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct HttpRetry {
    /// Retries after the first try; 0 disables retries.
    #[serde(default)]
    pub attempts: u32,
    /// Each try; absent: the route's `timeout` applies to the whole.
    #[serde(default, deserialize_with = "networking::duration")]
    pub per_try_timeout: Option<Duration>,
    /// Empty: the waypoint's default conditions.
    #[serde(default, deserialize_with = "retry_on")]
    pub retry_on: Vec<RetryOn>,
    /// Only `false` (the default) is supported.
    #[serde(default)]
    pub retry_remote_localities: Option<bool>,
    #[serde(default, deserialize_with = "refuse_backoff")]
    #[allow(dead_code)] // Never read: reading one fails.
    backoff: Option<networking::Refused>,
    #[serde(default, deserialize_with = "refuse_retry_ignore_previous_hosts")]
    #[allow(dead_code)] // Never read: reading one fails.
    retry_ignore_previous_hosts: Option<networking::Refused>,
}

/// One condition of `retryOn` (Envoy's `x-envoy-retry-on` and `x-envoy-retry-grpc-on` words, or
/// a status code that is retried).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum RetryOn {
    FiveXx,
    GatewayError,
    Reset,
    ResetBeforeRequest,
    ConnectFailure,
    EnvoyRatelimited,
    Retriable4xx,
    RefusedStream,
    RetriableStatusCodes,
    RetriableHeaders,
    /// gRPC status CANCELLED.
    Cancelled,
    DeadlineExceeded,
    Internal,
    ResourceExhausted,
    Unavailable,
    /// An HTTP status code (100 to 599).
    Status(u16),
}

const RETRY_ON_WORDS: [(&str, RetryOn); 15] = [
    ("5xx", RetryOn::FiveXx),
    ("gateway-error", RetryOn::GatewayError),
    ("reset", RetryOn::Reset),
    ("reset-before-request", RetryOn::ResetBeforeRequest),
    ("connect-failure", RetryOn::ConnectFailure),
    ("envoy-ratelimited", RetryOn::EnvoyRatelimited),
    ("retriable-4xx", RetryOn::Retriable4xx),
    ("refused-stream", RetryOn::RefusedStream),
    ("retriable-status-codes", RetryOn::RetriableStatusCodes),
    ("retriable-headers", RetryOn::RetriableHeaders),
    ("cancelled", RetryOn::Cancelled),
    ("deadline-exceeded", RetryOn::DeadlineExceeded),
    ("internal", RetryOn::Internal),
    ("resource-exhausted", RetryOn::ResourceExhausted),
    ("unavailable", RetryOn::Unavailable),
];

impl RetryOn {
    /// Parses one comma-separated item.
    pub fn parse(word: &str) -> Result<RetryOn, String> {
        if let Some((_, on)) = RETRY_ON_WORDS.iter().find(|(w, _)| *w == word) {
            return Ok(*on);
        }
        if word.len() == 3 && word.bytes().all(|b| b.is_ascii_digit()) {
            if let Ok(code @ 100..=599) = word.parse::<u16>() {
                return Ok(RetryOn::Status(code));
            }
        }
        let words: Vec<&str> = RETRY_ON_WORDS.iter().map(|(w, _)| *w).collect();
        Err(format!(
            "{word:?} is not a valid retryOn condition: use {} or an HTTP status code such as 503",
            words.join(", ")
        ))
    }

    /// As written in `retryOn`.
    pub fn as_string(self) -> String {
        match self {
            RetryOn::Status(code) => code.to_string(),
            other => RETRY_ON_WORDS
                .iter()
                .find(|(_, on)| *on == other)
                .map(|(w, _)| (*w).to_string())
                .unwrap_or_default(),
        }
    }
}

fn retry_on<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Vec<RetryOn>, D::Error> {
    deserialize_parsed(deserializer, "comma-separated retry conditions", |text| {
        text.split(',').map(|w| RetryOn::parse(w.trim())).collect()
    })
}

/// Delays and aborts injected before the request is forwarded.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct HttpFaultInjection {
    #[serde(default)]
    pub delay: Option<Delay>,
    #[serde(default)]
    pub abort: Option<Abort>,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Delay {
    /// Absent: no request is delayed (as in Istio).
    #[serde(default)]
    pub percentage: Option<Percent>,
    #[serde(deserialize_with = "networking::required_duration")]
    pub fixed_delay: Duration,
    #[serde(default, deserialize_with = "refuse_exponential_delay")]
    #[allow(dead_code)] // Never read: reading one fails.
    exponential_delay: Option<networking::Refused>,
    #[serde(default, deserialize_with = "refuse_percent")]
    #[allow(dead_code)] // Never read: reading one fails.
    percent: Option<networking::Refused>,
}

impl Delay {
    /// The share of requests delayed, 0.0 to 1.0.
    pub fn share(&self) -> f64 {
        self.percentage.map_or(0.0, Percent::fraction)
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct Abort {
    /// Absent: no request is aborted (as in Istio).
    pub percentage: Option<Percent>,
    pub error: AbortError,
}

impl Abort {
    /// The share of requests aborted, 0.0 to 1.0.
    pub fn share(&self) -> f64 {
        self.percentage.map_or(0.0, Percent::fraction)
    }
}

/// What an aborted request gets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AbortError {
    /// An HTTP status, 200 to 599.
    HttpStatus(u32),
    /// A gRPC status, by its code (`UNAVAILABLE` is 14).
    GrpcStatus(GrpcCode),
}

impl<'de> Deserialize<'de> for Abort {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserialize_converted::<D, RawAbort, _>(deserializer, "an abort")
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct RawAbort {
    #[serde(default)]
    percentage: Option<Percent>,
    #[serde(default)]
    http_status: Option<u32>,
    #[serde(default)]
    grpc_status: Option<GrpcCode>,
    #[serde(default, deserialize_with = "refuse_http2_error")]
    #[allow(dead_code)] // Never read: reading one fails.
    http2_error: Option<networking::Refused>,
}

impl TryFrom<RawAbort> for Abort {
    type Error = String;

    fn try_from(raw: RawAbort) -> Result<Self, String> {
        let error = match (raw.http_status, raw.grpc_status) {
            (Some(status), None) => AbortError::HttpStatus(status),
            (None, Some(code)) => AbortError::GrpcStatus(code),
            (None, None) => return Err("set `httpStatus` or `grpcStatus`".to_string()),
            (Some(_), Some(_)) => {
                return Err("set only one of `httpStatus` and `grpcStatus`".to_string())
            }
        };
        Ok(Abort {
            percentage: raw.percentage,
            error,
        })
    }
}

/// A gRPC status code, written by name in YAML (`UNAVAILABLE`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct GrpcCode(pub u8);

const GRPC_CODES: [&str; 17] = [
    "OK",
    "CANCELLED",
    "UNKNOWN",
    "INVALID_ARGUMENT",
    "DEADLINE_EXCEEDED",
    "NOT_FOUND",
    "ALREADY_EXISTS",
    "PERMISSION_DENIED",
    "RESOURCE_EXHAUSTED",
    "FAILED_PRECONDITION",
    "ABORTED",
    "OUT_OF_RANGE",
    "UNIMPLEMENTED",
    "INTERNAL",
    "UNAVAILABLE",
    "DATA_LOSS",
    "UNAUTHENTICATED",
];

impl GrpcCode {
    pub fn parse(name: &str) -> Result<GrpcCode, String> {
        GRPC_CODES
            .iter()
            .position(|c| *c == name)
            .map(|i| GrpcCode(i as u8))
            .ok_or_else(|| {
                format!(
                    "{name:?} is not a gRPC status name (such as UNAVAILABLE or NOT_FOUND; one \
                     of {})",
                    GRPC_CODES.join(", ")
                )
            })
    }

    pub fn name(self) -> &'static str {
        GRPC_CODES.get(usize::from(self.0)).copied().unwrap_or("")
    }
}

impl<'de> Deserialize<'de> for GrpcCode {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserialize_parsed(deserializer, "a gRPC status name", GrpcCode::parse)
    }
}

/// One of `mirrors`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct HttpMirrorPolicy {
    pub destination: Destination,
    /// Absent: every request.
    #[serde(default)]
    pub percentage: Option<Percent>,
}

impl HttpMirrorPolicy {
    /// The share of requests mirrored, 0.0 to 1.0.
    pub fn share(&self) -> f64 {
        self.percentage.map_or(1.0, Percent::fraction)
    }
}

/// Parses multi-document YAML (`---` separated) of `VirtualService`s and validates each; empty
/// documents are skipped. Errors name the document (1-based), then the field path and the line
/// (reading) or the object and the field path (validation).
pub fn parse_virtual_services(yaml: &str) -> Result<Vec<VirtualService>, String> {
    let mut out = Vec::new();
    for (index, document) in serde_yaml_ng::Deserializer::from_str(yaml).enumerate() {
        let parsed = Option::<VirtualService>::deserialize(document)
            .map_err(|e| format!("document {}: {e}", index + 1))?;
        if let Some(vs) = parsed {
            vs.validate().map_err(|e| {
                format!("document {} (VirtualService {}): {e}", index + 1, vs.key())
            })?;
            out.push(vs);
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests;

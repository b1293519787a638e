//! Gateway API `HTTPRoute` documents (`gateway.networking.k8s.io/v1`) as data, following the
//! **v1.4.1 standard channel** CRD: the fields it defines, their defaults and its validation
//! (maximum list sizes, value patterns and the CEL rules), so that a route the API server would
//! refuse is refused here too, and with the field named.
//!
//! Reading is strict, as for the policy documents: an unknown field or enum value is an error
//! that serde reports with the field path and line. Of the experimental channel's fields, a rule's
//! `retry` (GEP-1731) is read; the others (`sessionPersistence`, `useDefaultGateways`, the `CORS`
//! and `ExternalAuth` filters) and the implementation-specific `ExtensionRef` filter are refused
//! with a message saying they are not supported, never ignored. Defaults are filled in while reading (a rule without `matches`
//! matches `PathPrefix /`, a backend's `kind` is `Service`, its `weight` 1, ...), so the data
//! holds what the route means.
//!
//! [`HttpRoute::validate`] then checks values and the rules between fields; its errors name the
//! field by its path (`spec.rules[1].matches[0].path.value`). [`parse_routes`] does both.
//! Regular expressions use the `regex` crate's dialect (RE2-like: no look-around, no
//! back-references) and must match the whole value ([`compile_regex`]).
use std::collections::BTreeMap;
use std::fmt;
use std::marker::PhantomData;
use std::time::Duration;

use serde::de::{self, Deserializer, MapAccess, Visitor};
use serde::Deserialize;

use super::policy::deserialize_parsed;

mod duration;
mod rate_limit;
mod validate;

pub use duration::{format_duration, parse_duration};
pub use rate_limit::{RateLimit, RATE_LIMIT_ANNOTATION};
pub use validate::compile_regex;

/// The only `apiVersion` read.
pub const API_VERSION: &str = "gateway.networking.k8s.io/v1";
/// The Gateway API release whose standard channel this module follows.
pub const GATEWAY_API_RELEASE: &str = "v1.4.1";

const EXPERIMENTAL: &str =
    "it belongs to Gateway API's experimental channel, and this proxy implements the standard \
     channel (v1.4)";
const IMPLEMENTATION_SPECIFIC: &str = "this proxy has no implementation-specific filters";

/// One `HTTPRoute`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(try_from = "RawHttpRoute")]
pub struct HttpRoute {
    pub metadata: RouteMetadata,
    pub spec: HttpRouteSpec,
}

impl HttpRoute {
    /// `namespace/name`.
    pub fn key(&self) -> String {
        self.metadata.key()
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct RawHttpRoute {
    #[serde(deserialize_with = "api_version")]
    #[allow(dead_code)] // Checked while reading.
    api_version: (),
    #[serde(deserialize_with = "kind")]
    #[allow(dead_code)] // Checked while reading.
    kind: (),
    metadata: RouteMetadata,
    spec: HttpRouteSpec,
}

impl From<RawHttpRoute> for HttpRoute {
    fn from(raw: RawHttpRoute) -> Self {
        HttpRoute {
            metadata: raw.metadata,
            spec: raw.spec,
        }
    }
}

fn api_version<'de, D: Deserializer<'de>>(deserializer: D) -> Result<(), D::Error> {
    deserialize_parsed(deserializer, "an apiVersion", |value| {
        if value == API_VERSION {
            Ok(())
        } else {
            Err(format!(
                "unsupported apiVersion {value:?}: expected {API_VERSION}"
            ))
        }
    })
}

fn kind<'de, D: Deserializer<'de>>(deserializer: D) -> Result<(), D::Error> {
    deserialize_parsed(deserializer, "a kind", |value| {
        if value == "HTTPRoute" {
            Ok(())
        } else {
            Err(format!("unsupported kind {value:?}: expected HTTPRoute"))
        }
    })
}

/// The object's identity. Routes have no `creationTimestamp` when they come from a file; see
/// `waypoint::routing` for how precedence treats that.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct RouteMetadata {
    pub name: String,
    #[serde(default = "default_namespace")]
    pub namespace: String,
    /// Tolerated, unused.
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    /// Tolerated, unused, except [`RATE_LIMIT_ANNOTATION`].
    #[serde(default)]
    pub annotations: BTreeMap<String, String>,
    /// As the API server writes it: `2024-05-01T12:00:00Z` (RFC 3339, UTC, whole seconds).
    #[serde(default)]
    pub creation_timestamp: Option<String>,
}

impl RouteMetadata {
    /// `namespace/name`.
    pub fn key(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }

    /// The route's local rate limit ([`RATE_LIMIT_ANNOTATION`]), if it has a valid one.
    pub fn rate_limit(&self) -> Option<RateLimit> {
        RateLimit::parse(self.annotations.get(RATE_LIMIT_ANNOTATION)?).ok()
    }
}

fn default_namespace() -> String {
    "default".to_string()
}

/// A field this implementation refuses; reading one fails first.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Refused {}

/// Reads `Raw` from a mapping and converts it while the mapping is being read, so that a
/// conversion error is reported at the mapping's own path (`spec.rules[0].filters[1]`), not at
/// its parent's as `#[serde(try_from)]` would. Also used by the Istio networking documents.
pub(super) fn deserialize_converted<'de, D, Raw, T>(
    deserializer: D,
    expecting: &'static str,
) -> Result<T, D::Error>
where
    D: Deserializer<'de>,
    Raw: Deserialize<'de>,
    T: TryFrom<Raw, Error = String>,
{
    struct Converting<Raw, T>(&'static str, PhantomData<(Raw, T)>);

    impl<'de, Raw, T> Visitor<'de> for Converting<Raw, T>
    where
        Raw: Deserialize<'de>,
        T: TryFrom<Raw, Error = String>,
    {
        type Value = T;

        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str(self.0)
        }

        fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<T, A::Error> {
            let raw = Raw::deserialize(de::value::MapAccessDeserializer::new(map))?;
            T::try_from(raw).map_err(de::Error::custom)
        }
    }

    deserializer.deserialize_map(Converting(expecting, PhantomData))
}

/// A `deserialize_with` function that refuses the field it is put on, saying why.
macro_rules! refuse {
    ($function:ident, $field:literal, $why:expr) => {
        fn $function<'de, D: Deserializer<'de>>(_: D) -> Result<Option<Refused>, D::Error> {
            Err(de::Error::custom(format!(
                concat!("`", $field, "` is not supported: {}"),
                $why
            )))
        }
    };
}

refuse!(
    refuse_use_default_gateways,
    "useDefaultGateways",
    EXPERIMENTAL
);
refuse!(
    refuse_session_persistence,
    "sessionPersistence",
    EXPERIMENTAL
);
refuse!(refuse_cors, "cors", EXPERIMENTAL);
refuse!(refuse_external_auth, "externalAuth", EXPERIMENTAL);
refuse!(
    refuse_extension_ref,
    "extensionRef",
    IMPLEMENTATION_SPECIFIC
);

// ---------------------------------------------------------------------------------------------
// Spec

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(from = "RawSpec")]
pub struct HttpRouteSpec {
    /// The Gateways or Services the route attaches to (at most 32).
    pub parent_refs: Vec<ParentReference>,
    /// Host names (`*.example.com` matches subdomains at any depth; at most 16). Empty: any.
    pub hostnames: Vec<String>,
    /// At most 16. Absent: one rule matching `PathPrefix /` with no backend (the CRD's default).
    pub rules: Vec<HttpRouteRule>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct RawSpec {
    #[serde(default)]
    parent_refs: Vec<ParentReference>,
    #[serde(default)]
    hostnames: Vec<String>,
    #[serde(default)]
    rules: Option<Vec<HttpRouteRule>>,
    #[serde(default, deserialize_with = "refuse_use_default_gateways")]
    #[allow(dead_code)] // Never read: reading one fails.
    use_default_gateways: Option<Refused>,
}

impl From<RawSpec> for HttpRouteSpec {
    fn from(raw: RawSpec) -> Self {
        HttpRouteSpec {
            parent_refs: raw.parent_refs,
            hostnames: raw.hostnames,
            rules: raw.rules.unwrap_or_else(|| vec![HttpRouteRule::default()]),
        }
    }
}

/// `group` defaults to `gateway.networking.k8s.io` and `kind` to `Gateway`; a Service parent
/// (GAMMA, as for a waypoint) is `group: ""`, `kind: Service`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct ParentReference {
    #[serde(default = "gateway_group")]
    pub group: String,
    #[serde(default = "gateway_kind")]
    pub kind: String,
    /// Absent: the route's namespace.
    #[serde(default)]
    pub namespace: Option<String>,
    pub name: String,
    #[serde(default)]
    pub section_name: Option<String>,
    #[serde(default)]
    pub port: Option<u16>,
}

fn gateway_group() -> String {
    "gateway.networking.k8s.io".to_string()
}

fn gateway_kind() -> String {
    "Gateway".to_string()
}

// ---------------------------------------------------------------------------------------------
// Rules and matches

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(from = "RawRule")]
pub struct HttpRouteRule {
    /// Unique within the route when set.
    pub name: Option<String>,
    /// Any one matching selects the rule (at most 64). Never empty: absent or empty reads as one
    /// `PathPrefix /` match.
    pub matches: Vec<HttpRouteMatch>,
    /// In order; at most 16.
    pub filters: Vec<HttpRouteFilter>,
    /// At most 16. Empty (or all weights 0): requests matching the rule get a 500, unless a
    /// `RequestRedirect` filter answers them.
    pub backend_refs: Vec<HttpBackendRef>,
    pub timeouts: Option<HttpRouteTimeouts>,
    /// The experimental channel's `retry` (Gateway API v1.4.1).
    pub retry: Option<HttpRouteRetry>,
}

impl Default for HttpRouteRule {
    fn default() -> Self {
        HttpRouteRule {
            name: None,
            matches: vec![HttpRouteMatch::default()],
            filters: Vec::new(),
            backend_refs: Vec::new(),
            timeouts: None,
            retry: None,
        }
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct RawRule {
    #[serde(default)]
    name: Option<String>,
    #[serde(default)]
    matches: Vec<HttpRouteMatch>,
    #[serde(default)]
    filters: Vec<HttpRouteFilter>,
    #[serde(default)]
    backend_refs: Vec<HttpBackendRef>,
    #[serde(default)]
    timeouts: Option<HttpRouteTimeouts>,
    #[serde(default)]
    retry: Option<HttpRouteRetry>,
    #[serde(default, deserialize_with = "refuse_session_persistence")]
    #[allow(dead_code)] // Never read: reading one fails.
    session_persistence: Option<Refused>,
}

impl From<RawRule> for HttpRouteRule {
    fn from(raw: RawRule) -> Self {
        let matches = if raw.matches.is_empty() {
            vec![HttpRouteMatch::default()]
        } else {
            raw.matches
        };
        HttpRouteRule {
            name: raw.name,
            matches,
            filters: raw.filters,
            backend_refs: raw.backend_refs,
            timeouts: raw.timeouts,
            retry: raw.retry,
        }
    }
}

/// All of its conditions must hold. The default matches every request (`PathPrefix /`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct HttpRouteMatch {
    #[serde(default)]
    pub path: HttpPathMatch,
    /// At most 16; names compare case-insensitively.
    #[serde(default)]
    pub headers: Vec<HttpHeaderMatch>,
    /// At most 16; names compare exactly.
    #[serde(default)]
    pub query_params: Vec<HttpQueryParamMatch>,
    #[serde(default)]
    pub method: Option<HttpMethod>,
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct HttpPathMatch {
    #[serde(rename = "type", default)]
    pub type_: PathMatchType,
    #[serde(default = "root_path")]
    pub value: String,
}

impl Default for HttpPathMatch {
    fn default() -> Self {
        HttpPathMatch {
            type_: PathMatchType::PathPrefix,
            value: root_path(),
        }
    }
}

fn root_path() -> String {
    "/".to_string()
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Deserialize)]
pub enum PathMatchType {
    /// The whole path, case-sensitively.
    Exact,
    /// Whole `/`-separated segments: `/foo` matches `/foo` and `/foo/bar`, not `/foobar`; a
    /// trailing `/` in the value is ignored.
    #[default]
    PathPrefix,
    /// The whole path against a regular expression ([`compile_regex`]).
    RegularExpression,
}

/// A header (or, as [`HttpQueryParamMatch`], a query parameter) and the value it must have.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct HttpHeaderMatch {
    #[serde(rename = "type", default)]
    pub type_: ValueMatchType,
    pub name: String,
    pub value: String,
}

/// The same shape as a header match; the name compares exactly and the first occurrence of the
/// parameter in the query counts.
pub type HttpQueryParamMatch = HttpHeaderMatch;

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Deserialize)]
pub enum ValueMatchType {
    #[default]
    Exact,
    /// The whole value against a regular expression ([`compile_regex`]).
    RegularExpression,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Deserialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum HttpMethod {
    Get,
    Head,
    Post,
    Put,
    Delete,
    Connect,
    Options,
    Trace,
    Patch,
}

impl HttpMethod {
    pub fn as_str(self) -> &'static str {
        match self {
            HttpMethod::Get => "GET",
            HttpMethod::Head => "HEAD",
            HttpMethod::Post => "POST",
            HttpMethod::Put => "PUT",
            HttpMethod::Delete => "DELETE",
            HttpMethod::Connect => "CONNECT",
            HttpMethod::Options => "OPTIONS",
            HttpMethod::Trace => "TRACE",
            HttpMethod::Patch => "PATCH",
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Filters

/// One filter, by its `type`; exactly the field of that type is set in YAML.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HttpRouteFilter {
    RequestHeaderModifier(HttpHeaderFilter),
    ResponseHeaderModifier(HttpHeaderFilter),
    RequestMirror(HttpRequestMirrorFilter),
    RequestRedirect(HttpRequestRedirectFilter),
    UrlRewrite(HttpUrlRewriteFilter),
}

impl HttpRouteFilter {
    /// The `type` as written in YAML.
    pub fn type_name(&self) -> &'static str {
        self.field().0
    }

    /// The YAML field holding the filter's settings.
    pub fn field_name(&self) -> &'static str {
        self.field().1
    }

    fn field(&self) -> (&'static str, &'static str) {
        match self {
            HttpRouteFilter::RequestHeaderModifier(_) => {
                ("RequestHeaderModifier", "requestHeaderModifier")
            }
            HttpRouteFilter::ResponseHeaderModifier(_) => {
                ("ResponseHeaderModifier", "responseHeaderModifier")
            }
            HttpRouteFilter::RequestMirror(_) => ("RequestMirror", "requestMirror"),
            HttpRouteFilter::RequestRedirect(_) => ("RequestRedirect", "requestRedirect"),
            HttpRouteFilter::UrlRewrite(_) => ("URLRewrite", "urlRewrite"),
        }
    }
}

impl<'de> Deserialize<'de> for HttpRouteFilter {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserialize_converted::<D, RawFilter, _>(deserializer, "a filter with a type")
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct RawFilter {
    #[serde(rename = "type")]
    type_: String,
    #[serde(default)]
    request_header_modifier: Option<HttpHeaderFilter>,
    #[serde(default)]
    response_header_modifier: Option<HttpHeaderFilter>,
    #[serde(default)]
    request_mirror: Option<HttpRequestMirrorFilter>,
    #[serde(default)]
    request_redirect: Option<HttpRequestRedirectFilter>,
    #[serde(default)]
    url_rewrite: Option<HttpUrlRewriteFilter>,
    #[serde(default, deserialize_with = "refuse_cors")]
    #[allow(dead_code)] // Never read: reading one fails.
    cors: Option<Refused>,
    #[serde(default, deserialize_with = "refuse_external_auth")]
    #[allow(dead_code)] // Never read: reading one fails.
    external_auth: Option<Refused>,
    #[serde(default, deserialize_with = "refuse_extension_ref")]
    #[allow(dead_code)] // Never read: reading one fails.
    extension_ref: Option<Refused>,
}

const FILTER_TYPES: &str =
    "RequestHeaderModifier, ResponseHeaderModifier, RequestMirror, RequestRedirect or URLRewrite";

impl TryFrom<RawFilter> for HttpRouteFilter {
    type Error = String;

    fn try_from(raw: RawFilter) -> Result<Self, String> {
        let set = [
            (
                "requestHeaderModifier",
                raw.request_header_modifier.is_some(),
            ),
            (
                "responseHeaderModifier",
                raw.response_header_modifier.is_some(),
            ),
            ("requestMirror", raw.request_mirror.is_some()),
            ("requestRedirect", raw.request_redirect.is_some()),
            ("urlRewrite", raw.url_rewrite.is_some()),
        ];
        let filter = match raw.type_.as_str() {
            "RequestHeaderModifier" => raw
                .request_header_modifier
                .map(HttpRouteFilter::RequestHeaderModifier),
            "ResponseHeaderModifier" => raw
                .response_header_modifier
                .map(HttpRouteFilter::ResponseHeaderModifier),
            "RequestMirror" => raw.request_mirror.map(HttpRouteFilter::RequestMirror),
            "RequestRedirect" => raw.request_redirect.map(HttpRouteFilter::RequestRedirect),
            "URLRewrite" => raw.url_rewrite.map(HttpRouteFilter::UrlRewrite),
            "CORS" | "ExternalAuth" => {
                return Err(format!(
                    "filter type {} is not supported: {EXPERIMENTAL}",
                    raw.type_
                ))
            }
            "ExtensionRef" => {
                return Err(format!(
                    "filter type ExtensionRef is not supported: {IMPLEMENTATION_SPECIFIC}"
                ))
            }
            other => {
                return Err(format!(
                    "unknown filter type {other:?}: expected {FILTER_TYPES}"
                ))
            }
        };
        let Some(filter) = filter else {
            let field = lower_first(&raw.type_);
            return Err(format!(
                "a filter of type {} needs its settings in `{field}`",
                raw.type_
            ));
        };
        let own = filter.field_name();
        if let Some((other, _)) = set.iter().find(|(name, is_set)| *is_set && *name != own) {
            return Err(format!(
                "`{other}` is set on a filter of type {}: set only `{own}`",
                raw.type_
            ));
        }
        Ok(filter)
    }
}

/// `URLRewrite` -> `urlRewrite`, `RequestMirror` -> `requestMirror`.
fn lower_first(type_name: &str) -> String {
    if type_name == "URLRewrite" {
        return "urlRewrite".to_string();
    }
    let mut chars = type_name.chars();
    chars
        .next()
        .map(|c| c.to_ascii_lowercase().to_string() + chars.as_str())
        .unwrap_or_default()
}

/// Header names compare case-insensitively; a name may appear in only one of the three lists.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct HttpHeaderFilter {
    /// Replaces every value of the header.
    #[serde(default)]
    pub set: Vec<HttpHeader>,
    /// Appends to the values already there (`foo` + `bar,baz` = `foo,bar,baz`).
    #[serde(default)]
    pub add: Vec<HttpHeader>,
    /// Header names.
    #[serde(default)]
    pub remove: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct HttpHeader {
    pub name: String,
    pub value: String,
}

/// A copy of each request goes to `backendRef` (responses are dropped), for `percent` or
/// `fraction` of the requests (neither: all).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct HttpRequestMirrorFilter {
    pub backend_ref: BackendObjectReference,
    #[serde(default)]
    pub percent: Option<u32>,
    #[serde(default)]
    pub fraction: Option<Fraction>,
}

impl HttpRequestMirrorFilter {
    /// The share of requests mirrored, as `(numerator, denominator)`.
    pub fn share(&self) -> (u32, u32) {
        match (self.percent, &self.fraction) {
            (Some(percent), _) => (percent, 100),
            (None, Some(f)) => (f.numerator, f.denominator),
            (None, None) => (1, 1),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Fraction {
    pub numerator: u32,
    #[serde(default = "hundred")]
    pub denominator: u32,
}

fn hundred() -> u32 {
    100
}

/// Answers the request with a redirect built from the request and these settings.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct HttpRequestRedirectFilter {
    /// Absent: the request's.
    #[serde(default)]
    pub scheme: Option<RedirectScheme>,
    /// Absent: the request's host.
    #[serde(default)]
    pub hostname: Option<String>,
    /// Absent: the request's path.
    #[serde(default)]
    pub path: Option<HttpPathModifier>,
    /// Absent: the scheme's well-known port when `scheme` is set, else the listener's port.
    #[serde(default)]
    pub port: Option<u16>,
    /// 301 or 302.
    #[serde(default = "found")]
    pub status_code: u16,
}

fn found() -> u16 {
    302
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RedirectScheme {
    Http,
    Https,
}

impl RedirectScheme {
    pub fn as_str(self) -> &'static str {
        match self {
            RedirectScheme::Http => "http",
            RedirectScheme::Https => "https",
        }
    }
}

/// How a redirect or a rewrite changes the path; the query is kept.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HttpPathModifier {
    ReplaceFullPath(String),
    /// Replaces the segments the rule's `PathPrefix` match matched, keeping the rest.
    ReplacePrefixMatch(String),
}

impl<'de> Deserialize<'de> for HttpPathModifier {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserialize_converted::<D, RawPathModifier, _>(deserializer, "a path modifier")
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct RawPathModifier {
    #[serde(rename = "type")]
    type_: PathModifierType,
    #[serde(default)]
    replace_full_path: Option<String>,
    #[serde(default)]
    replace_prefix_match: Option<String>,
}

#[derive(Deserialize)]
enum PathModifierType {
    ReplaceFullPath,
    ReplacePrefixMatch,
}

impl TryFrom<RawPathModifier> for HttpPathModifier {
    type Error = String;

    fn try_from(raw: RawPathModifier) -> Result<Self, String> {
        match (raw.type_, raw.replace_full_path, raw.replace_prefix_match) {
            (PathModifierType::ReplaceFullPath, Some(path), None) => {
                Ok(HttpPathModifier::ReplaceFullPath(path))
            }
            (PathModifierType::ReplacePrefixMatch, None, Some(prefix)) => {
                Ok(HttpPathModifier::ReplacePrefixMatch(prefix))
            }
            (PathModifierType::ReplaceFullPath, _, Some(_)) => Err(
                "`replacePrefixMatch` is set but `type` is ReplaceFullPath: set only \
                 `replaceFullPath`"
                    .to_string(),
            ),
            (PathModifierType::ReplacePrefixMatch, Some(_), _) => Err(
                "`replaceFullPath` is set but `type` is ReplacePrefixMatch: set only \
                 `replacePrefixMatch`"
                    .to_string(),
            ),
            (PathModifierType::ReplaceFullPath, None, None) => {
                Err("type ReplaceFullPath needs `replaceFullPath`".to_string())
            }
            (PathModifierType::ReplacePrefixMatch, None, None) => {
                Err("type ReplacePrefixMatch needs `replacePrefixMatch`".to_string())
            }
        }
    }
}

/// Changes the request on its way to the backend.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct HttpUrlRewriteFilter {
    /// Replaces the Host header (and the URI's authority).
    #[serde(default)]
    pub hostname: Option<String>,
    #[serde(default)]
    pub path: Option<HttpPathModifier>,
}

// ---------------------------------------------------------------------------------------------
// Backends and timeouts

/// An object requests go to: by default a Service of the core group (which needs `port`).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct BackendObjectReference {
    #[serde(default)]
    pub group: String,
    #[serde(default = "service_kind")]
    pub kind: String,
    pub name: String,
    /// Absent: the route's namespace.
    #[serde(default)]
    pub namespace: Option<String>,
    #[serde(default)]
    pub port: Option<u16>,
}

impl BackendObjectReference {
    /// A Service of the core group.
    pub fn is_service(&self) -> bool {
        self.group.is_empty() && self.kind == "Service"
    }
}

fn service_kind() -> String {
    "Service".to_string()
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(from = "RawBackendRef")]
pub struct HttpBackendRef {
    pub backend: BackendObjectReference,
    /// Share of the rule's requests: `weight / sum of weights`; 0 never receives any.
    pub weight: u32,
    /// Applied only to requests sent to this backend, after the rule's.
    pub filters: Vec<HttpRouteFilter>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct RawBackendRef {
    #[serde(default)]
    group: String,
    #[serde(default = "service_kind")]
    kind: String,
    name: String,
    #[serde(default)]
    namespace: Option<String>,
    #[serde(default)]
    port: Option<u16>,
    #[serde(default = "one")]
    weight: u32,
    #[serde(default)]
    filters: Vec<HttpRouteFilter>,
}

fn one() -> u32 {
    1
}

impl From<RawBackendRef> for HttpBackendRef {
    fn from(raw: RawBackendRef) -> Self {
        HttpBackendRef {
            backend: BackendObjectReference {
                group: raw.group,
                kind: raw.kind,
                name: raw.name,
                namespace: raw.namespace,
                port: raw.port,
            },
            weight: raw.weight,
            filters: raw.filters,
        }
    }
}

/// Zero (`0s`) disables a timeout; absent leaves it to the proxy.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct HttpRouteTimeouts {
    /// The whole request, from the client's first byte to the response's last.
    #[serde(default, deserialize_with = "duration::deserialize_optional")]
    pub request: Option<Duration>,
    /// One try at a backend; at most `request` unless that is zero.
    #[serde(default, deserialize_with = "duration::deserialize_optional")]
    pub backend_request: Option<Duration>,
}

/// When to send a request again (GEP-1731, experimental channel). Besides the `codes`, a
/// connection error (refused, reset, timed out) is retried whenever a rule has a `retry`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct HttpRouteRetry {
    /// Response status codes to retry, 400 to 599.
    #[serde(default)]
    pub codes: Vec<u16>,
    /// Retries after the first try; absent: the proxy's default.
    #[serde(default)]
    pub attempts: Option<u32>,
    /// The least time between tries; absent: the proxy's default.
    #[serde(default, deserialize_with = "duration::deserialize_optional")]
    pub backoff: Option<Duration>,
}

// ---------------------------------------------------------------------------------------------
// Documents

/// Parses multi-document YAML (`---` separated) of `HTTPRoute`s and validates each; empty
/// documents are skipped. Errors name the document (1-based), then the field path and the line
/// (reading) or the route and the field path (validation).
pub fn parse_routes(yaml: &str) -> Result<Vec<HttpRoute>, String> {
    let mut routes = Vec::new();
    for (index, document) in serde_yaml_ng::Deserializer::from_str(yaml).enumerate() {
        let parsed = Option::<HttpRoute>::deserialize(document)
            .map_err(|e| format!("document {}: {e}", index + 1))?;
        if let Some(route) = parsed {
            route
                .validate()
                .map_err(|e| format!("document {} (HTTPRoute {}): {e}", index + 1, route.key()))?;
            routes.push(route);
        }
    }
    Ok(routes)
}

#[cfg(test)]
mod tests;

//! The HTTP attributes of one request, and how a value of an L7 field matches them, following
//! what Istio generates for Envoy's RBAC filter.
use std::borrow::Cow;

use http::HeaderMap;

/// One HTTP request as a waypoint sees it. With these attributes, policies are evaluated with
/// their L7 fields (`methods`, `paths`, `hosts`, `request.headers[...]`, ...) instead of being
/// refused at L4.
///
/// The path is matched as given: a waypoint normalises it (Istio's default resolves `.` and
/// `..` segments) before building the attributes, or `/public/../admin` escapes a rule on
/// `/admin*`.
#[derive(Debug, Clone, Default)]
pub struct HttpAttributes {
    /// As on the request line (`GET`); matched case-sensitively.
    pub method: String,
    /// The request target as on the request line, query included (`/info?x=1`).
    pub path: String,
    /// `:authority` (HTTP/2) or `Host` (HTTP/1.1) as sent, port included.
    pub host: String,
    /// The other request headers.
    pub headers: HeaderMap,
}

impl HttpAttributes {
    /// The path without its query (and fragment): what `paths` match (Istio's
    /// `request.url_path`).
    pub fn url_path(&self) -> &str {
        self.path.split(['?', '#']).next().unwrap_or_default()
    }

    /// The host without its port: `example.com:8080` -> `example.com`, `[fd00::1]:80` ->
    /// `[fd00::1]`.
    pub fn host_without_port(&self) -> &str {
        let host = self.host.as_str();
        if host.starts_with('[') {
            return match host.find(']') {
                Some(end) => &host[..=end],
                None => host,
            };
        }
        match host.rsplit_once(':') {
            Some((name, port))
                if !name.contains(':') && port.bytes().all(|b| b.is_ascii_digit()) =>
            {
                name
            }
            _ => host,
        }
    }

    /// The value Envoy matches for header `name` (any case): every value of the header joined
    /// by `,`, or `None` when the request does not carry it. `host` (`:authority`), `:method` and
    /// `:path` are the request's own attributes, as in Envoy's header map.
    pub(super) fn header(&self, name: &str) -> Option<Cow<'_, [u8]>> {
        let name = name.to_ascii_lowercase();
        match name.as_str() {
            "host" | ":authority" => return Some(Cow::Borrowed(self.host.as_bytes())),
            ":method" => return Some(Cow::Borrowed(self.method.as_bytes())),
            ":path" => return Some(Cow::Borrowed(self.path.as_bytes())),
            _ => {}
        }
        let mut values = self.headers.get_all(name.as_str()).iter();
        let first = values.next()?;
        let rest: Vec<_> = values.collect();
        if rest.is_empty() {
            return Some(Cow::Borrowed(first.as_bytes()));
        }
        let mut joined = first.as_bytes().to_vec();
        for value in rest {
            joined.push(b',');
            joined.extend_from_slice(value.as_bytes());
        }
        Some(Cow::Owned(joined))
    }
}

/// Istio's string match of an L7 `pattern` against a value the request carries: `*` alone
/// matches any value (Envoy's presence match), `*suffix` and `prefix*` match the end and the
/// start, anything else matches exactly. Istio reads only a leading or a trailing `*`: any other
/// `*` is a literal character.
pub(super) fn string_matches(pattern: &str, value: &[u8], ignore_case: bool) -> bool {
    let same = |a: &[u8], b: &[u8]| {
        if ignore_case {
            a.eq_ignore_ascii_case(b)
        } else {
            a == b
        }
    };
    let pattern = pattern.as_bytes();
    if pattern == b"*" {
        true
    } else if let Some(suffix) = pattern.strip_prefix(b"*") {
        value.len() >= suffix.len() && same(&value[value.len() - suffix.len()..], suffix)
    } else if let Some(prefix) = pattern.strip_suffix(b"*") {
        value.len() >= prefix.len() && same(&value[..prefix.len()], prefix)
    } else {
        same(value, pattern)
    }
}

/// Whether a `paths` entry matches the request's path (without its query); `None` for a path
/// template (`{*}`, `{**}`), which is not supported. `*` needs a non-empty path, as Istio's `.+`.
pub(super) fn path_matches(pattern: &str, http: &HttpAttributes) -> Option<bool> {
    if pattern.contains("{*}") || pattern.contains("{**}") {
        return None;
    }
    let path = http.url_path();
    Some(if pattern == "*" {
        !path.is_empty()
    } else {
        string_matches(pattern, path.as_bytes(), false)
    })
}

/// Whether a `hosts` entry matches the request's host, case-insensitively, as sent or without
/// its port: `example.com` matches `example.com:8080`, and Istio's `example.com:*` idiom keeps
/// matching it too.
pub(super) fn host_matches(pattern: &str, http: &HttpAttributes) -> bool {
    string_matches(pattern, http.host.as_bytes(), true)
        || string_matches(pattern, http.host_without_port().as_bytes(), true)
}

/// The header name of a `request.headers[<name>]` key; `None` for any other key.
pub(super) fn header_key(key: &str) -> Option<&str> {
    key.strip_prefix("request.headers[")?
        .strip_suffix(']')
        .filter(|name| !name.is_empty())
}

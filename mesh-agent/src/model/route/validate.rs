//! What makes an [`HttpRoute`] valid: the v1.4.1 standard CRD's limits, patterns and CEL rules,
//! plus what this proxy needs to use a value (regular expressions compile, header values are
//! valid HTTP, rewritten paths are paths). Errors name the field by its path as users write it
//! (`spec.rules[1].matches[0].path.value`); the first problem found is returned.
use std::collections::HashSet;
use std::net::Ipv4Addr;

use regex::bytes::{Regex, RegexBuilder};

use super::{
    BackendObjectReference, HttpHeaderFilter, HttpHeaderMatch, HttpPathModifier, HttpRoute,
    HttpRouteFilter, HttpRouteRule, PathMatchType, ValueMatchType,
};
use crate::model::{is_dns_label, is_dns_subdomain, FieldError};

const MAX_PARENT_REFS: usize = 32;
const MAX_HOSTNAMES: usize = 16;
const MAX_RULES: usize = 16;
const MAX_MATCHES: usize = 64;
const MAX_MATCHES_PER_ROUTE: usize = 128;
const MAX_VALUE_MATCHES: usize = 16;
const MAX_FILTERS: usize = 16;
const MAX_BACKEND_REFS: usize = 16;
const MAX_HEADER_ACTIONS: usize = 16;
const MAX_WEIGHT: u32 = 1_000_000;
const MAX_PATH_LEN: usize = 1024;
const MAX_HEADER_NAME_LEN: usize = 256;
const MAX_HEADER_VALUE_LEN: usize = 4096;
const MAX_QUERY_VALUE_LEN: usize = 1024;
const MAX_NAME_LEN: usize = 253;
/// Compiled size of one regular expression; the `regex` crate's default is ten times this.
const REGEX_SIZE_LIMIT: usize = 1 << 20;

fn invalid(field: impl Into<String>, message: impl Into<String>) -> FieldError {
    FieldError {
        field: field.into(),
        message: message.into(),
    }
}

fn at_most<T>(field: &str, list: &[T], max: usize) -> Result<(), FieldError> {
    if list.len() > max {
        Err(invalid(
            field,
            format!("at most {max} entries ({} given)", list.len()),
        ))
    } else {
        Ok(())
    }
}

/// Compiles a `RegularExpression` match value as the routing uses it: the `regex` crate's
/// syntax, matching the whole value (anchored at both ends), on bytes, at most 1 MiB compiled.
pub fn compile_regex(pattern: &str) -> Result<Regex, String> {
    let build = |p: &str| RegexBuilder::new(p).size_limit(REGEX_SIZE_LIMIT).build();
    // Alone first, so that a pattern such as `a)|(b` cannot escape the anchoring group.
    build(pattern)
        .and_then(|_| build(&format!("^(?:{pattern})$")))
        .map_err(|e| {
            let detail = e
                .to_string()
                .split_whitespace()
                .collect::<Vec<_>>()
                .join(" ");
            format!("{pattern:?} is not a valid regular expression: {detail}")
        })
}

fn check_subdomain(field: &str, name: &str, what: &str) -> Result<(), FieldError> {
    if is_dns_subdomain(name) {
        Ok(())
    } else {
        Err(invalid(
            field,
            format!(
                "{name:?} is not a valid {what} (lower-case DNS labels of letters, digits and \
                 '-', separated by '.', at most 253 characters)"
            ),
        ))
    }
}

/// A precise host name: a subdomain that is not an IPv4 address.
fn check_precise_hostname(field: &str, name: &str) -> Result<(), FieldError> {
    check_subdomain(field, name, "host name")?;
    if name.parse::<Ipv4Addr>().is_ok() {
        return Err(invalid(
            field,
            format!("{name:?} is an IP address; a host name is required"),
        ));
    }
    Ok(())
}

/// A route host name: precise, or a wildcard label `*.` followed by a precise name.
fn check_hostname(field: &str, name: &str) -> Result<(), FieldError> {
    let precise = name.strip_prefix("*.").unwrap_or(name);
    if name.len() > MAX_NAME_LEN || !is_dns_subdomain(precise) {
        return Err(invalid(
            field,
            format!(
                "{name:?} is not a valid host name (lower-case DNS labels, optionally after a \
                 leading \"*.\"; at most 253 characters)"
            ),
        ));
    }
    check_precise_hostname(field, precise)
}

/// `Kind`: `^[a-zA-Z]([-a-zA-Z0-9]*[a-zA-Z0-9])?$`, at most 63 characters.
fn check_kind(field: &str, kind: &str) -> Result<(), FieldError> {
    let ok = kind.len() <= 63
        && kind.bytes().next().is_some_and(|b| b.is_ascii_alphabetic())
        && kind.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
        && !kind.ends_with('-');
    if ok {
        Ok(())
    } else {
        Err(invalid(
            field,
            format!(
                "{kind:?} is not a valid kind (letters, digits and '-', starting with a letter)"
            ),
        ))
    }
}

/// `Group`: empty (the core group) or a DNS subdomain.
fn check_group(field: &str, group: &str) -> Result<(), FieldError> {
    if group.is_empty() {
        Ok(())
    } else {
        check_subdomain(field, group, "API group")
    }
}

fn check_object_name(field: &str, name: &str) -> Result<(), FieldError> {
    if name.is_empty() || name.len() > MAX_NAME_LEN {
        Err(invalid(field, "must be 1 to 253 characters"))
    } else {
        Ok(())
    }
}

fn check_namespace(field: &str, namespace: &str) -> Result<(), FieldError> {
    if is_dns_label(namespace) {
        Ok(())
    } else {
        Err(invalid(
            field,
            format!(
                "{namespace:?} is not a valid namespace (lower-case letters, digits and '-', at \
                 most 63 characters)"
            ),
        ))
    }
}

fn check_port(field: &str, port: Option<u16>) -> Result<(), FieldError> {
    if port == Some(0) {
        Err(invalid(field, "port 0 is not a port (1 to 65535)"))
    } else {
        Ok(())
    }
}

/// `HeaderName`: an HTTP token (`^[A-Za-z0-9!#$%&'*+\-.^_`|~]+$`) of at most 256 characters.
fn is_header_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= MAX_HEADER_NAME_LEN
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b))
}

fn check_header_name(field: &str, name: &str) -> Result<(), FieldError> {
    if is_header_name(name) {
        Ok(())
    } else {
        Err(invalid(
            field,
            format!(
                "{name:?} is not a valid header name (letters, digits and !#$%&'*+-.^_`|~, at \
                 most 256 characters; pseudo-headers such as :path are not allowed)"
            ),
        ))
    }
}

/// A value an HTTP header can carry: visible ASCII, space, tab and bytes above 0x7f.
fn check_header_value(field: &str, value: &str, max: usize) -> Result<(), FieldError> {
    if value.is_empty() || value.len() > max {
        return Err(invalid(field, format!("must be 1 to {max} characters")));
    }
    if value.bytes().any(|b| (b < 0x20 && b != b'\t') || b == 0x7f) {
        return Err(invalid(
            field,
            format!("{value:?} contains a control character, which HTTP does not allow"),
        ));
    }
    Ok(())
}

/// The rules of an `Exact` or `PathPrefix` value (and of a rewritten path): an absolute path
/// without `//`, dot segments, encoded `/` or `#`, of URI path characters.
fn check_path(field: &str, value: &str) -> Result<(), FieldError> {
    if value.len() > MAX_PATH_LEN {
        return Err(invalid(field, "at most 1024 characters"));
    }
    if !value.starts_with('/') {
        return Err(invalid(
            field,
            format!("{value:?} must be an absolute path, starting with '/'"),
        ));
    }
    for bad in ["//", "/./", "/../", "%2f", "%2F", "#"] {
        if value.contains(bad) {
            return Err(invalid(
                field,
                format!("{value:?} must not contain {bad:?}"),
            ));
        }
    }
    for bad in ["/..", "/."] {
        if value.ends_with(bad) {
            return Err(invalid(
                field,
                format!("{value:?} must not end with {bad:?}"),
            ));
        }
    }
    let bytes = value.as_bytes();
    let mut i = 0;
    while i < bytes.len() {
        let b = bytes[i];
        if b == b'%' {
            let escaped = bytes.get(i + 1..i + 3);
            if !escaped.is_some_and(|h| h.iter().all(u8::is_ascii_hexdigit)) {
                return Err(invalid(
                    field,
                    format!("{value:?}: '%' must start an escape of two hex digits (%XX)"),
                ));
            }
            i += 3;
            continue;
        }
        if !(b.is_ascii_alphanumeric() || b"-/._~!$&'()*+,;=:@".contains(&b)) {
            return Err(invalid(
                field,
                format!(
                    "{value:?} contains {:?}, which is not allowed in a path (letters, digits, \
                     -/._~!$&'()*+,;=:@ and %XX escapes)",
                    char::from(b)
                ),
            ));
        }
        i += 1;
    }
    Ok(())
}

fn check_regex(field: &str, pattern: &str, max: usize) -> Result<(), FieldError> {
    if pattern.is_empty() || pattern.len() > max {
        return Err(invalid(field, format!("must be 1 to {max} characters")));
    }
    compile_regex(pattern)
        .map(drop)
        .map_err(|m| invalid(field, m))
}

/// `2024-05-01T12:00:00Z`: what the API server writes (and what sorts as text).
fn check_timestamp(field: &str, value: &str) -> Result<(), FieldError> {
    let shape = b"dddd-dd-ddTdd:dd:ddZ";
    let ok = value.len() == shape.len()
        && value.bytes().zip(shape).all(|(b, s)| match s {
            b'd' => b.is_ascii_digit(),
            other => b == *other,
        });
    if ok {
        Ok(())
    } else {
        Err(invalid(
            field,
            format!("{value:?} is not a timestamp of the form 2024-05-01T12:00:00Z (UTC)"),
        ))
    }
}

impl HttpRoute {
    /// Checks names, values, limits and the rules between fields; see the module comment.
    pub fn validate(&self) -> Result<(), FieldError> {
        let meta = &self.metadata;
        check_subdomain("metadata.name", &meta.name, "name")?;
        check_namespace("metadata.namespace", &meta.namespace)?;
        if let Some(ts) = &meta.creation_timestamp {
            check_timestamp("metadata.creationTimestamp", ts)?;
        }
        if let Some(limit) = meta.annotations.get(super::RATE_LIMIT_ANNOTATION) {
            super::RateLimit::parse(limit).map_err(|e| {
                invalid(
                    format!("metadata.annotations[{}]", super::RATE_LIMIT_ANNOTATION),
                    e,
                )
            })?;
        }
        self.validate_parent_refs()?;
        let spec = &self.spec;
        at_most("spec.hostnames", &spec.hostnames, MAX_HOSTNAMES)?;
        for (i, hostname) in spec.hostnames.iter().enumerate() {
            check_hostname(&format!("spec.hostnames[{i}]"), hostname)?;
        }
        at_most("spec.rules", &spec.rules, MAX_RULES)?;
        let matches: usize = spec.rules.iter().map(|r| r.matches.len()).sum();
        if matches > MAX_MATCHES_PER_ROUTE {
            return Err(invalid(
                "spec.rules",
                format!(
                    "at most {MAX_MATCHES_PER_ROUTE} matches over all rules of a route \
                     ({matches} given)"
                ),
            ));
        }
        let mut names = HashSet::new();
        for (i, rule) in spec.rules.iter().enumerate() {
            let at = format!("spec.rules[{i}]");
            if let Some(name) = &rule.name {
                check_subdomain(&format!("{at}.name"), name, "rule name")?;
                if !names.insert(name.as_str()) {
                    return Err(invalid(
                        format!("{at}.name"),
                        format!("rule name {name:?} is used twice; names must be unique"),
                    ));
                }
            }
            validate_rule(&at, rule)?;
        }
        Ok(())
    }

    fn validate_parent_refs(&self) -> Result<(), FieldError> {
        let refs = &self.spec.parent_refs;
        at_most("spec.parentRefs", refs, MAX_PARENT_REFS)?;
        for (i, parent) in refs.iter().enumerate() {
            let at = |field: &str| format!("spec.parentRefs[{i}].{field}");
            check_group(&at("group"), &parent.group)?;
            check_kind(&at("kind"), &parent.kind)?;
            if let Some(ns) = &parent.namespace {
                check_namespace(&at("namespace"), ns)?;
            }
            check_object_name(&at("name"), &parent.name)?;
            if let Some(section) = &parent.section_name {
                check_subdomain(&at("sectionName"), section, "section name")?;
            }
            check_port(&at("port"), parent.port)?;
        }
        // The CRD's rules for two references to one parent: both name a section, distinct ones.
        let namespace = |ns: &Option<String>| ns.clone().filter(|n| !n.is_empty());
        let section = |s: &Option<String>| s.clone().filter(|n| !n.is_empty());
        for (j, b) in refs.iter().enumerate() {
            for a in &refs[..j] {
                let same_parent = a.group == b.group
                    && a.kind == b.kind
                    && a.name == b.name
                    && namespace(&a.namespace) == namespace(&b.namespace);
                if !same_parent {
                    continue;
                }
                let field = format!("spec.parentRefs[{j}].sectionName");
                let (sa, sb) = (section(&a.section_name), section(&b.section_name));
                if sa.is_none() || sb.is_none() {
                    return Err(invalid(
                        field,
                        format!(
                            "{} {} is referenced more than once: each reference must name a \
                             sectionName",
                            b.kind, b.name
                        ),
                    ));
                }
                if sa == sb {
                    return Err(invalid(
                        field,
                        format!(
                            "{} {} is referenced twice with sectionName {:?}; sections must \
                             differ",
                            b.kind,
                            b.name,
                            sb.unwrap_or_default()
                        ),
                    ));
                }
            }
        }
        Ok(())
    }
}

fn validate_rule(at: &str, rule: &HttpRouteRule) -> Result<(), FieldError> {
    at_most(&format!("{at}.matches"), &rule.matches, MAX_MATCHES)?;
    for (j, m) in rule.matches.iter().enumerate() {
        let at = format!("{at}.matches[{j}]");
        let value = &m.path.value;
        let field = format!("{at}.path.value");
        match m.path.type_ {
            PathMatchType::Exact | PathMatchType::PathPrefix => check_path(&field, value)?,
            PathMatchType::RegularExpression => check_regex(&field, value, MAX_PATH_LEN)?,
        }
        validate_value_matches(&format!("{at}.headers"), &m.headers, MAX_HEADER_VALUE_LEN)?;
        validate_value_matches(
            &format!("{at}.queryParams"),
            &m.query_params,
            MAX_QUERY_VALUE_LEN,
        )?;
    }
    validate_filters(&format!("{at}.filters"), &rule.filters)?;
    at_most(
        &format!("{at}.backendRefs"),
        &rule.backend_refs,
        MAX_BACKEND_REFS,
    )?;
    for (k, backend) in rule.backend_refs.iter().enumerate() {
        let at = format!("{at}.backendRefs[{k}]");
        validate_backend_object(&at, &backend.backend)?;
        if backend.weight > MAX_WEIGHT {
            return Err(invalid(
                format!("{at}.weight"),
                format!("{} is above the maximum, {MAX_WEIGHT}", backend.weight),
            ));
        }
        validate_filters(&format!("{at}.filters"), &backend.filters)?;
    }
    if !rule.backend_refs.is_empty() {
        if let Some(f) = rule
            .filters
            .iter()
            .position(|f| matches!(f, HttpRouteFilter::RequestRedirect(_)))
        {
            return Err(invalid(
                format!("{at}.filters[{f}]"),
                "a RequestRedirect filter answers the request itself: it cannot be used with \
                 backendRefs",
            ));
        }
    }
    // ReplacePrefixMatch replaces what the rule's one PathPrefix match matched.
    let single_prefix =
        rule.matches.len() == 1 && rule.matches[0].path.type_ == PathMatchType::PathPrefix;
    if !single_prefix {
        let rule_filters = rule
            .filters
            .iter()
            .enumerate()
            .map(|(f, filter)| (format!("{at}.filters[{f}]"), filter));
        let backend_filters = rule.backend_refs.iter().enumerate().flat_map(|(k, b)| {
            b.filters
                .iter()
                .enumerate()
                .map(move |(f, filter)| (format!("{at}.backendRefs[{k}].filters[{f}]"), filter))
        });
        for (field, filter) in rule_filters.chain(backend_filters) {
            if matches!(
                path_modifier(filter),
                Some(HttpPathModifier::ReplacePrefixMatch(_))
            ) {
                return Err(invalid(
                    format!("{field}.{}.path", filter.field_name()),
                    "ReplacePrefixMatch needs the rule to have exactly one match, and that \
                     match's path of type PathPrefix",
                ));
            }
        }
    }
    if let Some(retry) = &rule.retry {
        for (c, code) in retry.codes.iter().enumerate() {
            if !(400..=599).contains(code) {
                return Err(invalid(
                    format!("{at}.retry.codes[{c}]"),
                    format!("{code} is not a status code from 400 to 599"),
                ));
            }
        }
    }
    if let Some(timeouts) = &rule.timeouts {
        if let (Some(request), Some(backend)) = (timeouts.request, timeouts.backend_request) {
            if !request.is_zero() && backend > request {
                return Err(invalid(
                    format!("{at}.timeouts.backendRequest"),
                    format!(
                        "{} is longer than the request timeout, {}",
                        super::format_duration(backend),
                        super::format_duration(request)
                    ),
                ));
            }
        }
    }
    Ok(())
}

fn path_modifier(filter: &HttpRouteFilter) -> Option<&HttpPathModifier> {
    match filter {
        HttpRouteFilter::RequestRedirect(r) => r.path.as_ref(),
        HttpRouteFilter::UrlRewrite(r) => r.path.as_ref(),
        _ => None,
    }
}

fn validate_value_matches(
    at: &str,
    matches: &[HttpHeaderMatch],
    max_value: usize,
) -> Result<(), FieldError> {
    at_most(at, matches, MAX_VALUE_MATCHES)?;
    let mut names = HashSet::new();
    for (k, m) in matches.iter().enumerate() {
        let at = format!("{at}[{k}]");
        check_header_name(&format!("{at}.name"), &m.name)?;
        if !names.insert(m.name.as_str()) {
            return Err(invalid(
                format!("{at}.name"),
                format!("{:?} is matched twice in one match", m.name),
            ));
        }
        let field = format!("{at}.value");
        match m.type_ {
            ValueMatchType::Exact => check_header_value(&field, &m.value, max_value)?,
            ValueMatchType::RegularExpression => check_regex(&field, &m.value, max_value)?,
        }
    }
    Ok(())
}

fn validate_filters(at: &str, filters: &[HttpRouteFilter]) -> Result<(), FieldError> {
    at_most(at, filters, MAX_FILTERS)?;
    let mut seen: Vec<&'static str> = Vec::new();
    for (f, filter) in filters.iter().enumerate() {
        let at = format!("{at}[{f}]");
        let type_name = filter.type_name();
        let repeatable = matches!(filter, HttpRouteFilter::RequestMirror(_));
        if !repeatable && seen.contains(&type_name) {
            return Err(invalid(
                &at,
                format!("a second {type_name} filter: it cannot be repeated"),
            ));
        }
        let clash = match filter {
            HttpRouteFilter::RequestRedirect(_) => "URLRewrite",
            HttpRouteFilter::UrlRewrite(_) => "RequestRedirect",
            _ => "",
        };
        if seen.contains(&clash) {
            return Err(invalid(
                &at,
                format!("{type_name} cannot be used with a {clash} filter"),
            ));
        }
        seen.push(type_name);
        let at = format!("{at}.{}", filter.field_name());
        match filter {
            HttpRouteFilter::RequestHeaderModifier(h)
            | HttpRouteFilter::ResponseHeaderModifier(h) => validate_header_filter(&at, h)?,
            HttpRouteFilter::RequestMirror(m) => {
                validate_backend_object(&format!("{at}.backendRef"), &m.backend_ref)?;
                if m.percent.is_some() && m.fraction.is_some() {
                    return Err(invalid(&at, "set `percent` or `fraction`, not both"));
                }
                if let Some(percent) = m.percent.filter(|p| *p > 100) {
                    return Err(invalid(
                        format!("{at}.percent"),
                        format!("{percent} is above 100"),
                    ));
                }
                if let Some(fraction) = &m.fraction {
                    if fraction.denominator == 0 {
                        return Err(invalid(
                            format!("{at}.fraction.denominator"),
                            "must be at least 1",
                        ));
                    }
                    if fraction.numerator > fraction.denominator {
                        return Err(invalid(
                            format!("{at}.fraction.numerator"),
                            format!(
                                "{} is above the denominator, {}",
                                fraction.numerator, fraction.denominator
                            ),
                        ));
                    }
                }
            }
            HttpRouteFilter::RequestRedirect(r) => {
                if let Some(hostname) = &r.hostname {
                    check_precise_hostname(&format!("{at}.hostname"), hostname)?;
                }
                if let Some(path) = &r.path {
                    validate_path_modifier(&format!("{at}.path"), path)?;
                }
                check_port(&format!("{at}.port"), r.port)?;
                if !matches!(r.status_code, 301 | 302) {
                    return Err(invalid(
                        format!("{at}.statusCode"),
                        format!("{} is not supported: use 301 or 302", r.status_code),
                    ));
                }
            }
            HttpRouteFilter::UrlRewrite(r) => {
                if let Some(hostname) = &r.hostname {
                    check_precise_hostname(&format!("{at}.hostname"), hostname)?;
                }
                if let Some(path) = &r.path {
                    validate_path_modifier(&format!("{at}.path"), path)?;
                }
            }
        }
    }
    Ok(())
}

fn validate_header_filter(at: &str, filter: &HttpHeaderFilter) -> Result<(), FieldError> {
    at_most(&format!("{at}.set"), &filter.set, MAX_HEADER_ACTIONS)?;
    at_most(&format!("{at}.add"), &filter.add, MAX_HEADER_ACTIONS)?;
    at_most(&format!("{at}.remove"), &filter.remove, MAX_HEADER_ACTIONS)?;
    // One action per header name, compared case-insensitively.
    let mut names = HashSet::new();
    let mut name_once = |field: &str, name: &str| {
        check_header_name(field, name)?;
        if names.insert(name.to_ascii_lowercase()) {
            Ok(())
        } else {
            Err(invalid(
                field,
                format!(
                    "header {name:?} is named twice in this filter; only one action per header \
                     is allowed (names compare case-insensitively)"
                ),
            ))
        }
    };
    for (list, headers) in [("set", &filter.set), ("add", &filter.add)] {
        for (i, header) in headers.iter().enumerate() {
            let at = format!("{at}.{list}[{i}]");
            name_once(&format!("{at}.name"), &header.name)?;
            check_header_value(&format!("{at}.value"), &header.value, MAX_HEADER_VALUE_LEN)?;
        }
    }
    for (i, name) in filter.remove.iter().enumerate() {
        name_once(&format!("{at}.remove[{i}]"), name)?;
    }
    Ok(())
}

fn validate_path_modifier(at: &str, modifier: &HttpPathModifier) -> Result<(), FieldError> {
    match modifier {
        HttpPathModifier::ReplaceFullPath(path) => {
            check_path(&format!("{at}.replaceFullPath"), path)
        }
        // Empty replaces the prefix with nothing (`/foo/bar` -> `/bar`).
        HttpPathModifier::ReplacePrefixMatch(prefix) if prefix.is_empty() => Ok(()),
        HttpPathModifier::ReplacePrefixMatch(prefix) => {
            check_path(&format!("{at}.replacePrefixMatch"), prefix)
        }
    }
}

fn validate_backend_object(at: &str, backend: &BackendObjectReference) -> Result<(), FieldError> {
    check_group(&format!("{at}.group"), &backend.group)?;
    check_kind(&format!("{at}.kind"), &backend.kind)?;
    check_object_name(&format!("{at}.name"), &backend.name)?;
    if let Some(ns) = &backend.namespace {
        check_namespace(&format!("{at}.namespace"), ns)?;
    }
    check_port(&format!("{at}.port"), backend.port)?;
    if backend.is_service() && backend.port.is_none() {
        return Err(invalid(
            format!("{at}.port"),
            format!(
                "Service {} needs a port (the Service's port, not its target port)",
                backend.name
            ),
        ));
    }
    Ok(())
}

//! What makes a [`VirtualService`] valid: Istio 1.31's validation of the fields this proxy
//! reads (`ValidateVirtualService` and the HTTP route checks), plus what the proxy needs to use a
//! value (hosts that name a Service of the mesh, regular expressions that compile). Errors name
//! the field by its path (`spec.http[0].route[1].weight`); the first problem found is returned.
use std::collections::HashSet;

use super::{
    Destination, HeaderOperations, Headers, HttpMatchRequest, HttpRoute, StringMatch,
    VirtualService,
};
use crate::model::networking::{
    check_export_to, check_host, check_percent, check_port, check_subset_name, invalid,
    resolve_host,
};
use crate::model::route::compile_regex;
use crate::model::{is_dns_label, is_dns_subdomain, FieldError};

/// Istio refuses direct response bodies of 1 MB or more.
const MAX_BODY: usize = 1 << 20;

impl VirtualService {
    /// Checks names, values and the rules between fields; see the module comment.
    pub fn validate(&self) -> Result<(), FieldError> {
        let meta = &self.metadata;
        if !is_dns_subdomain(&meta.name) {
            return Err(invalid(
                "metadata.name",
                format!("{:?} is not a valid name (a DNS subdomain)", meta.name),
            ));
        }
        if !is_dns_label(&meta.namespace) {
            return Err(invalid(
                "metadata.namespace",
                format!(
                    "{:?} is not a valid namespace (a DNS label)",
                    meta.namespace
                ),
            ));
        }
        let ns = &meta.namespace;
        let spec = &self.spec;
        if spec.hosts.is_empty() {
            return Err(invalid(
                "spec.hosts",
                "at least one host is required (a VirtualService without hosts is a delegate, \
                 which is not supported)",
            ));
        }
        let mut services = HashSet::new();
        for (i, host) in spec.hosts.iter().enumerate() {
            let field = format!("spec.hosts[{i}]");
            let service = resolve_host(host, ns).map_err(|m| invalid(&field, m))?;
            if !services.insert(service.key()) {
                return Err(invalid(
                    field,
                    format!(
                        "{host:?} names Service {service} again; each host must be listed once"
                    ),
                ));
            }
        }
        check_export_to(&spec.export_to)?;
        if spec.http.is_empty() {
            return Err(invalid(
                "spec.http",
                "at least one HTTP route is required (`tcp` and `tls` routes are not supported)",
            ));
        }
        let mut names = HashSet::new();
        for (i, route) in spec.http.iter().enumerate() {
            let at = format!("spec.http[{i}]");
            if let Some(name) = &route.name {
                if !names.insert(name.as_str()) {
                    return Err(invalid(
                        format!("{at}.name"),
                        format!("route name {name:?} is used twice; names must be unique"),
                    ));
                }
            }
            validate_route(&at, route, ns)?;
        }
        Ok(())
    }
}

fn validate_route(at: &str, route: &HttpRoute, ns: &str) -> Result<(), FieldError> {
    // What the route does: exactly one of forwarding, redirecting or answering.
    let field = |name: &str| format!("{at}.{name}");
    match (
        !route.route.is_empty(),
        route.redirect.is_some(),
        route.direct_response.is_some(),
    ) {
        (false, false, false) => {
            return Err(invalid(
                at,
                "an HTTP route needs `route`, `redirect` or `directResponse`",
            ))
        }
        (true, true, _) => {
            return Err(invalid(
                field("redirect"),
                "cannot be used with `route`: a route either forwards or redirects",
            ))
        }
        (true, _, true) | (_, true, true) => {
            return Err(invalid(
                field("directResponse"),
                "cannot be used with `route` or `redirect`",
            ))
        }
        _ => {}
    }
    if route.redirect.is_some() || route.direct_response.is_some() {
        let what = if route.redirect.is_some() {
            "`redirect`"
        } else {
            "`directResponse`"
        };
        for (name, set) in [
            ("fault", route.fault.is_some()),
            ("rewrite", route.rewrite.is_some()),
        ] {
            if set {
                return Err(invalid(
                    field(name),
                    format!("cannot be used with {what}: nothing is forwarded"),
                ));
            }
        }
    }
    for (j, m) in route.matches.iter().enumerate() {
        validate_match(&format!("{at}.match[{j}]"), m)?;
    }
    let total: u64 = route.route.iter().map(|d| u64::from(d.weight)).sum();
    for (k, dest) in route.route.iter().enumerate() {
        let at = format!("{at}.route[{k}]");
        validate_destination(&format!("{at}.destination"), &dest.destination, ns)?;
        if dest.weight > i32::MAX as u32 {
            return Err(invalid(
                format!("{at}.weight"),
                format!("{} is above the maximum, {}", dest.weight, i32::MAX),
            ));
        }
        if let Some(headers) = &dest.headers {
            validate_headers(&format!("{at}.headers"), headers, None)?;
        }
    }
    if route.route.len() > 1 && total == 0 {
        return Err(invalid(
            format!("{at}.route"),
            "the weights of several destinations must not all be 0 (weights are proportions: \
             give each destination its share)",
        ));
    }
    if total > i32::MAX as u64 {
        return Err(invalid(
            format!("{at}.route"),
            format!(
                "the weights add up to {total}, above the maximum, {}",
                i32::MAX
            ),
        ));
    }
    if let Some(redirect) = &route.redirect {
        let at = field("redirect");
        if redirect.uri.is_none()
            && redirect.authority.is_none()
            && redirect.port.is_none()
            && redirect.scheme.is_none()
        {
            return Err(invalid(
                &at,
                "a redirect must set `uri`, `authority`, `scheme` or `port`",
            ));
        }
        if let Some(uri) = &redirect.uri {
            check_path(&format!("{at}.uri"), uri)?;
        }
        if let Some(authority) = &redirect.authority {
            check_authority(&format!("{at}.authority"), authority)?;
        }
        if let Some(port) = redirect.port {
            check_port(&format!("{at}.port"), port)?;
        }
        if let Some(scheme) = redirect.scheme.as_deref() {
            if scheme != "http" && scheme != "https" {
                return Err(invalid(
                    format!("{at}.scheme"),
                    format!("{scheme:?} is not a redirect scheme: use \"http\" or \"https\""),
                ));
            }
        }
        if !(300..=399).contains(&redirect.redirect_code) {
            return Err(invalid(
                format!("{at}.redirectCode"),
                format!("{} is not a redirect code (3xx)", redirect.redirect_code),
            ));
        }
    }
    if let Some(direct) = &route.direct_response {
        let at = field("directResponse");
        check_status(&format!("{at}.status"), direct.status)?;
        if let Some(body) = &direct.body {
            if body.string.len() >= MAX_BODY {
                return Err(invalid(
                    format!("{at}.body.string"),
                    format!(
                        "{} bytes: a direct response body must be under 1 MB",
                        body.string.len()
                    ),
                ));
            }
        }
    }
    if let Some(rewrite) = &route.rewrite {
        let at = field("rewrite");
        match (&rewrite.uri, &rewrite.uri_regex_rewrite) {
            (Some(_), Some(_)) => {
                return Err(invalid(
                    format!("{at}.uriRegexRewrite"),
                    "cannot be used with `uri`: set one of them",
                ))
            }
            (None, None) if rewrite.authority.is_none() => {
                return Err(invalid(
                    &at,
                    "a rewrite must set `uri`, `uriRegexRewrite` or `authority`",
                ))
            }
            _ => {}
        }
        if let Some(uri) = &rewrite.uri {
            // Empty is Istio's way to drop the matched prefix (`/foo/bar` -> `/bar`).
            if !uri.is_empty() {
                check_path(&format!("{at}.uri"), uri)?;
            }
        }
        if let Some(authority) = &rewrite.authority {
            check_authority(&format!("{at}.authority"), authority)?;
        }
        if let Some(regex) = &rewrite.uri_regex_rewrite {
            let at = format!("{at}.uriRegexRewrite");
            if regex.match_.is_empty() {
                return Err(invalid(format!("{at}.match"), "must not be empty"));
            }
            if regex.rewrite.is_empty() {
                return Err(invalid(format!("{at}.rewrite"), "must not be empty"));
            }
            compile_regex(&regex.match_).map_err(|m| invalid(format!("{at}.match"), m))?;
        }
    }
    if let Some(retries) = &route.retries {
        let at = field("retries");
        if retries.attempts > i32::MAX as u32 {
            return Err(invalid(
                format!("{at}.attempts"),
                format!("{} is above the maximum, {}", retries.attempts, i32::MAX),
            ));
        }
        if retries.attempts == 0
            && (retries.per_try_timeout.is_some()
                || !retries.retry_on.is_empty()
                || retries.retry_remote_localities.is_some())
        {
            return Err(invalid(
                format!("{at}.attempts"),
                "retry settings are given but `attempts` is 0 (retries disabled): set attempts \
                 to 1 or more",
            ));
        }
        if retries.retry_remote_localities == Some(true) {
            return Err(invalid(
                format!("{at}.retryRemoteLocalities"),
                "`true` is not supported: the mesh has no localities, so there is no remote \
                 one to retry in",
            ));
        }
    }
    if let Some(fault) = &route.fault {
        let at = field("fault");
        if fault.delay.is_none() && fault.abort.is_none() {
            return Err(invalid(&at, "a fault needs a `delay` and/or an `abort`"));
        }
        if let Some(delay) = &fault.delay {
            check_percent(&format!("{at}.delay.percentage"), delay.percentage)?;
        }
        if let Some(abort) = &fault.abort {
            check_percent(&format!("{at}.abort.percentage"), abort.percentage)?;
            if let super::AbortError::HttpStatus(status) = abort.error {
                check_status(&format!("{at}.abort.httpStatus"), status)?;
            }
        }
    }
    if let Some(mirror) = &route.mirror {
        if !route.mirrors.is_empty() {
            return Err(invalid(
                field("mirrors"),
                "cannot be used with `mirror`: list every mirror in `mirrors`",
            ));
        }
        validate_destination(&field("mirror"), mirror, ns)?;
    }
    if route.mirror_percentage.is_some() && route.mirror.is_none() {
        return Err(invalid(
            field("mirrorPercentage"),
            "applies to `mirror`, which is not set (`mirrors` entries have their own \
             `percentage`)",
        ));
    }
    check_percent(&field("mirrorPercentage"), route.mirror_percentage)?;
    for (m, mirror) in route.mirrors.iter().enumerate() {
        let at = format!("{at}.mirrors[{m}]");
        validate_destination(&format!("{at}.destination"), &mirror.destination, ns)?;
        check_percent(&format!("{at}.percentage"), mirror.percentage)?;
    }
    if let Some(headers) = &route.headers {
        let rewritten = route.rewrite.as_ref().and_then(|r| r.authority.as_deref());
        validate_headers(&field("headers"), headers, rewritten)?;
    }
    Ok(())
}

fn validate_match(at: &str, m: &HttpMatchRequest) -> Result<(), FieldError> {
    if let Some(uri) = &m.uri {
        check_string_match(&format!("{at}.uri"), uri)?;
    }
    if let Some(method) = &m.method {
        check_string_match(&format!("{at}.method"), method)?;
    }
    for (list, map) in [
        ("headers", &m.headers),
        ("queryParams", &m.query_params),
        ("withoutHeaders", &m.without_headers),
    ] {
        for (name, value) in map {
            let field = format!("{at}.{list}.{name}");
            if list == "queryParams" {
                if name.is_empty() {
                    return Err(invalid(field, "a query parameter name must not be empty"));
                }
            } else {
                check_match_header_name(&field, name)?;
            }
            check_string_match(&field, value)?;
        }
    }
    if let Some(port) = m.port {
        check_port(&format!("{at}.port"), port)?;
    }
    Ok(())
}

fn check_string_match(field: &str, value: &StringMatch) -> Result<(), FieldError> {
    match value {
        StringMatch::Exact(_) => Ok(()),
        StringMatch::Prefix(p) if p.is_empty() => Err(invalid(
            format!("{field}.prefix"),
            "a prefix must not be empty (leave the match out to match everything)",
        )),
        StringMatch::Prefix(_) => Ok(()),
        StringMatch::Regex(r) if r.is_empty() => {
            Err(invalid(format!("{field}.regex"), "must not be empty"))
        }
        StringMatch::Regex(r) => compile_regex(r)
            .map(drop)
            .map_err(|m| invalid(format!("{field}.regex"), m)),
    }
}

fn validate_destination(at: &str, dest: &Destination, ns: &str) -> Result<(), FieldError> {
    check_host(&format!("{at}.host"), &dest.host, ns)?;
    if let Some(subset) = &dest.subset {
        check_subset_name(&format!("{at}.subset"), subset)?;
    }
    if let Some(port) = dest.port {
        check_port(&format!("{at}.port.number"), port.number)?;
    }
    Ok(())
}

/// An HTTP token (RFC 9110), the syntax Istio's header-name pattern accepts.
fn is_token(name: &str) -> bool {
    !name.is_empty()
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b))
}

/// Names in `headers` and `withoutHeaders`: a token, or one of the pseudo-headers Istio allows.
fn check_match_header_name(field: &str, name: &str) -> Result<(), FieldError> {
    if is_token(name)
        || matches!(
            name,
            ":method" | ":authority" | ":path" | ":scheme" | ":status"
        )
    {
        Ok(())
    } else {
        Err(invalid(
            field,
            format!("{name:?} is not a valid header name (letters, digits and !#$%&'*+-.^_`|~)"),
        ))
    }
}

/// Header changes; `rewritten` is the route's `rewrite.authority`, which counts as a change of
/// the authority (Istio allows one).
fn validate_headers(
    at: &str,
    headers: &Headers,
    rewritten: Option<&str>,
) -> Result<(), FieldError> {
    let mut authority_set = rewritten.is_some();
    if let Some(request) = &headers.request {
        let at = format!("{at}.request");
        for (list, map) in [("set", &request.set), ("add", &request.add)] {
            for (name, value) in map {
                let field = format!("{at}.{list}.{name}");
                let is_authority =
                    name.eq_ignore_ascii_case("host") || name.eq_ignore_ascii_case(":authority");
                if is_authority {
                    if authority_set {
                        return Err(invalid(
                            field,
                            "the authority is changed more than once (by `rewrite.authority` or \
                             another `host`/`:authority` header); change it once",
                        ));
                    }
                    authority_set = true;
                } else {
                    check_operation_name(&field, name)?;
                }
                check_header_value(&field, value)?;
            }
        }
        check_removes(&at, request)?;
    }
    if let Some(response) = &headers.response {
        let at = format!("{at}.response");
        for (list, map) in [("set", &response.set), ("add", &response.add)] {
            for (name, value) in map {
                let field = format!("{at}.{list}.{name}");
                check_operation_name(&field, name)?;
                check_header_value(&field, value)?;
            }
        }
        check_removes(&at, response)?;
    }
    Ok(())
}

fn check_removes(at: &str, ops: &HeaderOperations) -> Result<(), FieldError> {
    for (i, name) in ops.remove.iter().enumerate() {
        check_operation_name(&format!("{at}.remove[{i}]"), name)?;
    }
    Ok(())
}

/// A header a route may change: a token that is not `host` nor a pseudo-header.
fn check_operation_name(field: &str, name: &str) -> Result<(), FieldError> {
    if name.eq_ignore_ascii_case("host") || name.starts_with(':') {
        return Err(invalid(
            field,
            format!(
                "header {name:?} cannot be changed here (the Host/:authority only in \
                 `headers.request.set`/`add` or with `rewrite.authority`; other pseudo-headers \
                 never)"
            ),
        ));
    }
    if !is_token(name) {
        return Err(invalid(
            field,
            format!("{name:?} is not a valid header name (letters, digits and !#$%&'*+-.^_`|~)"),
        ));
    }
    Ok(())
}

fn check_header_value(field: &str, value: &str) -> Result<(), FieldError> {
    if value.bytes().any(|b| (b < 0x20 && b != b'\t') || b == 0x7f) {
        return Err(invalid(
            field,
            format!("{value:?} contains a control character, which HTTP does not allow"),
        ));
    }
    Ok(())
}

fn check_status(field: &str, status: u32) -> Result<(), FieldError> {
    if (200..=599).contains(&status) {
        Ok(())
    } else {
        Err(invalid(
            field,
            format!("HTTP status {status} is not in the range 200 to 599"),
        ))
    }
}

/// A path to redirect or rewrite to: absolute, no control characters or spaces.
fn check_path(field: &str, path: &str) -> Result<(), FieldError> {
    if !path.starts_with('/') {
        return Err(invalid(
            field,
            format!("{path:?} must be an absolute path, starting with '/'"),
        ));
    }
    if path.bytes().any(|b| b <= b' ' || b == 0x7f) {
        return Err(invalid(
            field,
            format!("{path:?} contains a space or control character; escape it (%XX)"),
        ));
    }
    Ok(())
}

/// `host` or `host:port`.
fn check_authority(field: &str, authority: &str) -> Result<(), FieldError> {
    let host = match authority.rsplit_once(':') {
        Some((host, port)) if !port.is_empty() && port.bytes().all(|b| b.is_ascii_digit()) => host,
        _ => authority,
    };
    let lower = host.to_ascii_lowercase();
    if is_dns_subdomain(&lower) || host.parse::<std::net::IpAddr>().is_ok() {
        Ok(())
    } else {
        Err(invalid(
            field,
            format!("{authority:?} is not a host name (with an optional :port)"),
        ))
    }
}

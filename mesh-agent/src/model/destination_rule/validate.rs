//! What makes a [`DestinationRule`] valid: Istio 1.31's `ValidateDestinationRule` for the fields
//! this proxy reads, and a `host` that names a Service of the mesh. Errors name the field by its
//! path (`spec.subsets[1].trafficPolicy.outlierDetection.maxEjectionPercent`).
use std::collections::HashSet;

use super::RING_MAX_SIZE;
use super::{
    ConnectionPoolSettings, DestinationRule, HashAlgorithm, HashKey, LoadBalancerSettings,
    OutlierDetection, TrafficPolicy,
};
use crate::model::networking::{
    check_export_to, check_host, check_port, check_subset_name, invalid,
};
use crate::model::{is_dns_label, is_dns_subdomain, FieldError};

/// Istio's bound on a Maglev table (Envoy's largest supported prime is below it).
const MAGLEV_MAX_TABLE: u64 = 5_000_011;
/// Istio's int32 fields.
const INT32_MAX: u32 = i32::MAX as u32;

impl DestinationRule {
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
        let spec = &self.spec;
        check_host("spec.host", &spec.host, &meta.namespace)?;
        check_export_to(&spec.export_to)?;
        if let Some(policy) = &spec.traffic_policy {
            validate_policy("spec.trafficPolicy", policy)?;
        }
        let mut names = HashSet::new();
        for (i, subset) in spec.subsets.iter().enumerate() {
            let at = format!("spec.subsets[{i}]");
            check_subset_name(&format!("{at}.name"), &subset.name)?;
            if !names.insert(subset.name.as_str()) {
                return Err(invalid(
                    format!("{at}.name"),
                    format!("subset {:?} is defined twice", subset.name),
                ));
            }
            for (key, value) in &subset.labels {
                check_label(&format!("{at}.labels.{key}"), key, value)?;
            }
            if let Some(policy) = &subset.traffic_policy {
                validate_policy(&format!("{at}.trafficPolicy"), policy)?;
            }
        }
        Ok(())
    }
}

fn validate_policy(at: &str, policy: &TrafficPolicy) -> Result<(), FieldError> {
    if policy.load_balancer.is_none()
        && policy.connection_pool.is_none()
        && policy.outlier_detection.is_none()
        && policy.tls.is_none()
        && policy.port_level_settings.is_empty()
    {
        return Err(invalid(at, "a traffic policy must set at least one field"));
    }
    validate_settings(
        at,
        &policy.load_balancer,
        &policy.connection_pool,
        &policy.outlier_detection,
    )?;
    let mut ports = HashSet::new();
    for (i, p) in policy.port_level_settings.iter().enumerate() {
        let at = format!("{at}.portLevelSettings[{i}]");
        check_port(&format!("{at}.port.number"), p.port.number)?;
        if !ports.insert(p.port.number) {
            return Err(invalid(
                format!("{at}.port.number"),
                format!("port {} has settings twice", p.port.number),
            ));
        }
        if p.load_balancer.is_none()
            && p.connection_pool.is_none()
            && p.outlier_detection.is_none()
            && p.tls.is_none()
        {
            return Err(invalid(
                &at,
                "a port's traffic policy must set at least one of `loadBalancer`, \
                 `connectionPool`, `outlierDetection` or `tls`",
            ));
        }
        validate_settings(
            &at,
            &p.load_balancer,
            &p.connection_pool,
            &p.outlier_detection,
        )?;
    }
    Ok(())
}

fn validate_settings(
    at: &str,
    load_balancer: &Option<LoadBalancerSettings>,
    pool: &Option<ConnectionPoolSettings>,
    outlier: &Option<OutlierDetection>,
) -> Result<(), FieldError> {
    if let Some(LoadBalancerSettings::ConsistentHash(hash)) = load_balancer {
        let at = format!("{at}.loadBalancer.consistentHash");
        match &hash.hash_key {
            HashKey::HttpHeaderName(name) => {
                if !is_token(name) {
                    return Err(invalid(
                        format!("{at}.httpHeaderName"),
                        format!("{name:?} is not a valid header name"),
                    ));
                }
            }
            HashKey::HttpCookie(cookie) => {
                if cookie.name.is_empty() || !is_token(&cookie.name) {
                    return Err(invalid(
                        format!("{at}.httpCookie.name"),
                        format!("{:?} is not a valid cookie name", cookie.name),
                    ));
                }
                if let Some(path) = cookie.path.as_deref().filter(|p| !p.starts_with('/')) {
                    return Err(invalid(
                        format!("{at}.httpCookie.path"),
                        format!("{path:?} must be an absolute path, starting with '/'"),
                    ));
                }
                // RFC 6265's path-value: any character but controls and ';' (it would end the
                // attribute and start another in the Set-Cookie the waypoint sends).
                if let Some(path) = cookie
                    .path
                    .as_deref()
                    .filter(|p| p.chars().any(|c| c == ';' || c.is_control()))
                {
                    return Err(invalid(
                        format!("{at}.httpCookie.path"),
                        format!("{path:?} must not contain ';' or control characters"),
                    ));
                }
            }
            HashKey::HttpQueryParameterName(name) if name.is_empty() => {
                return Err(invalid(
                    format!("{at}.httpQueryParameterName"),
                    "must not be empty",
                ));
            }
            HashKey::HttpQueryParameterName(_) | HashKey::UseSourceIp => {}
        }
        if let Some(HashAlgorithm::RingHash { minimum_ring_size }) = hash.algorithm {
            if minimum_ring_size > RING_MAX_SIZE {
                return Err(invalid(
                    format!("{at}.ringHash.minimumRingSize"),
                    format!(
                        "{minimum_ring_size} is more than {RING_MAX_SIZE}, Envoy's largest ring"
                    ),
                ));
            }
        }
        if let Some(HashAlgorithm::Maglev { table_size }) = hash.algorithm {
            let field = format!("{at}.maglev.tableSize");
            if table_size == 0 {
                return Err(invalid(field, "must be set for maglev"));
            }
            if table_size >= MAGLEV_MAX_TABLE {
                return Err(invalid(
                    field,
                    format!("{table_size} must be less than {MAGLEV_MAX_TABLE}"),
                ));
            }
            if !is_prime(table_size) {
                return Err(invalid(
                    field,
                    format!("{table_size} is not a prime number, which maglev needs"),
                ));
            }
        }
    }
    if let Some(pool) = pool {
        let at = format!("{at}.connectionPool");
        if pool.tcp.is_none() && pool.http.is_none() {
            return Err(invalid(&at, "a connection pool must set `tcp` or `http`"));
        }
        let mut limits = Vec::new();
        if let Some(tcp) = &pool.tcp {
            limits.push(("tcp.maxConnections", tcp.max_connections));
        }
        if let Some(http) = &pool.http {
            limits.extend([
                (
                    "http.http1MaxPendingRequests",
                    http.http1_max_pending_requests,
                ),
                ("http.http2MaxRequests", http.http2_max_requests),
                (
                    "http.maxRequestsPerConnection",
                    http.max_requests_per_connection,
                ),
                ("http.maxRetries", http.max_retries),
            ]);
        }
        for (field, value) in limits {
            if let Some(value) = value.filter(|v| *v > INT32_MAX) {
                return Err(invalid(
                    format!("{at}.{field}"),
                    format!("{value} is above the maximum, {INT32_MAX}"),
                ));
            }
        }
    }
    if let Some(outlier) = outlier {
        let at = format!("{at}.outlierDetection");
        for (field, value) in [
            ("maxEjectionPercent", outlier.max_ejection_percent),
            ("minHealthPercent", outlier.min_health_percent),
        ] {
            if value > 100 {
                return Err(invalid(
                    format!("{at}.{field}"),
                    format!("{value} is not a percentage from 0 to 100"),
                ));
            }
        }
    }
    Ok(())
}

/// A label as Kubernetes allows it: an optional DNS-subdomain prefix and `/`, a name of at most
/// 63 characters, and a value of at most 63 (names and values: alphanumerics, `-`, `_`, `.`,
/// starting and ending alphanumeric; a value may be empty).
fn check_label(field: &str, key: &str, value: &str) -> Result<(), FieldError> {
    let (prefix, name) = key.rsplit_once('/').unwrap_or(("", key));
    let word = |s: &str| {
        !s.is_empty()
            && s.len() <= 63
            && s.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
            && s.bytes().next().is_some_and(|b| b.is_ascii_alphanumeric())
            && s.bytes().last().is_some_and(|b| b.is_ascii_alphanumeric())
    };
    if (!prefix.is_empty() && !is_dns_subdomain(prefix)) || key.ends_with('/') || !word(name) {
        return Err(invalid(field, format!("{key:?} is not a valid label name")));
    }
    if !value.is_empty() && !word(value) {
        return Err(invalid(
            field,
            format!("{value:?} is not a valid label value"),
        ));
    }
    Ok(())
}

fn is_token(name: &str) -> bool {
    !name.is_empty()
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b))
}

fn is_prime(n: u64) -> bool {
    if n < 2 {
        return false;
    }
    let mut d = 2;
    while d * d <= n {
        if n.is_multiple_of(d) {
            return false;
        }
        d += 1;
    }
    true
}

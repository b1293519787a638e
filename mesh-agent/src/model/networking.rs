//! What Istio's `networking.istio.io/v1` VirtualService and DestinationRule share: the API
//! version, durations, percentages, port selectors, `exportTo`, and how a `host` names a Service.
//!
//! Both follow **Istio 1.31** (the `networking.istio.io/v1` CRDs and validation of the 1.31
//! release line, istio/api v1.31): a field this proxy does not support is refused by name when
//! the document is read, never ignored.
//!
//! **Durations** are what Istio's CRDs take: a string in Go's duration syntax (the API server
//! checks it with CEL's `duration()`, Istio reads it with Go's `time.ParseDuration`): one or more
//! decimal numbers, each with an optional fraction and a unit `h`, `m`, `s`, `ms`, `us` (or `µs`)
//! or `ns`, summed (`10s`, `0.5s`, `1.5h`, `1m30s`, `100ms`), after an optional `+`; `0` alone
//! is zero; digits beyond a nanosecond are dropped. Istio then requires at least 1 ms and a whole
//! number of milliseconds (`ValidateDuration`), and so does [`parse_duration`];
//! [`parse_duration_or_zero`] also takes zero where Istio gives zero a meaning (a cookie's `ttl`).
//! Our CRDs check only the syntax (a pattern, without the `+`); the agent checks the rest.
use std::fmt;
use std::net::IpAddr;
use std::time::Duration;

use serde::de::{self, Deserializer, MapAccess, SeqAccess, Visitor};
use serde::Deserialize;

use super::policy::deserialize_parsed;
use super::FieldError;

/// The only `apiVersion` read.
pub const API_VERSION: &str = "networking.istio.io/v1";
/// The Istio release whose API and validation these modules follow.
pub const ISTIO_RELEASE: &str = "1.31";
/// The cluster's DNS domain, as the rest of the mesh names Services (`name.ns.svc.cluster.local`).
pub const CLUSTER_DOMAIN: &str = "cluster.local";

/// A field this implementation refuses; reading one fails first.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Refused {}

/// A `deserialize_with` function that refuses the field it is put on, saying why. The error is
/// raised while the field's value is read, so that the reader reports the field's own path
/// (`spec.http[0].corsPolicy`).
macro_rules! refuse_field {
    ($function:ident, $field:literal, $why:expr) => {
        fn $function<'de, D: serde::Deserializer<'de>>(
            deserializer: D,
        ) -> Result<Option<super::networking::Refused>, D::Error> {
            deserializer.deserialize_any(super::networking::RefuseVisitor(format!(
                concat!("`", $field, "` is not supported: {}"),
                $why
            )))
        }
    };
}

/// Fails on any value with its message (see `refuse_field!`).
pub(super) struct RefuseVisitor(pub String);

impl<'de> Visitor<'de> for RefuseVisitor {
    type Value = Option<Refused>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("nothing (the field is not supported)")
    }

    fn visit_bool<E: de::Error>(self, _: bool) -> Result<Self::Value, E> {
        Err(E::custom(self.0))
    }

    fn visit_i64<E: de::Error>(self, _: i64) -> Result<Self::Value, E> {
        Err(E::custom(self.0))
    }

    fn visit_u64<E: de::Error>(self, _: u64) -> Result<Self::Value, E> {
        Err(E::custom(self.0))
    }

    fn visit_f64<E: de::Error>(self, _: f64) -> Result<Self::Value, E> {
        Err(E::custom(self.0))
    }

    fn visit_str<E: de::Error>(self, _: &str) -> Result<Self::Value, E> {
        Err(E::custom(self.0))
    }

    fn visit_unit<E: de::Error>(self) -> Result<Self::Value, E> {
        Err(E::custom(self.0))
    }

    fn visit_none<E: de::Error>(self) -> Result<Self::Value, E> {
        Err(E::custom(self.0))
    }

    fn visit_seq<A: SeqAccess<'de>>(self, _: A) -> Result<Self::Value, A::Error> {
        Err(de::Error::custom(self.0))
    }

    fn visit_map<A: MapAccess<'de>>(self, _: A) -> Result<Self::Value, A::Error> {
        Err(de::Error::custom(self.0))
    }
}

pub(super) fn invalid(field: impl Into<String>, message: impl Into<String>) -> FieldError {
    FieldError {
        field: field.into(),
        message: message.into(),
    }
}

/// Checks `apiVersion` while reading.
pub(super) fn api_version<'de, D: Deserializer<'de>>(deserializer: D) -> Result<(), D::Error> {
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

// ---------------------------------------------------------------------------------------------
// Durations

/// Parses an Istio duration of at least 1 ms, in whole milliseconds (see the module comment).
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let duration = parse_go_duration(text)?;
    if duration < Duration::from_millis(1) {
        return Err(format!("{text:?} is below the minimum duration, 1ms"));
    }
    check_millis(text, duration)
}

/// As [`parse_duration`], but zero (`0s`, `0`) is taken too.
pub fn parse_duration_or_zero(text: &str) -> Result<Duration, String> {
    let duration = parse_go_duration(text)?;
    check_millis(text, duration)
}

fn check_millis(text: &str, duration: Duration) -> Result<Duration, String> {
    if !duration.subsec_nanos().is_multiple_of(1_000_000) {
        return Err(format!(
            "{text:?} is not a whole number of milliseconds; Istio supports durations to ms \
             precision only"
        ));
    }
    Ok(duration)
}

/// Go's `time.ParseDuration` syntax; a negative duration is never valid here.
fn parse_go_duration(text: &str) -> Result<Duration, String> {
    let bad = |why: &str| {
        Err(format!(
            "{text:?} is not a duration ({why}; write numbers with a unit h, m, s, ms, us or ns, \
             such as \"10s\", \"0.5s\", \"100ms\" or \"1m30s\")"
        ))
    };
    if text.starts_with('-') {
        return bad("it is negative");
    }
    // Go takes a leading `+`.
    let unsigned = text.strip_prefix('+').unwrap_or(text);
    if unsigned == "0" {
        return Ok(Duration::ZERO);
    }
    if unsigned.is_empty() {
        return bad("it is empty");
    }
    let mut total: u128 = 0;
    let mut rest = unsigned;
    while !rest.is_empty() {
        let whole_len = rest.bytes().take_while(u8::is_ascii_digit).count();
        let whole = &rest[..whole_len];
        rest = &rest[whole_len..];
        let mut fraction = "";
        if let Some(after) = rest.strip_prefix('.') {
            let len = after.bytes().take_while(u8::is_ascii_digit).count();
            fraction = &after[..len];
            rest = &after[len..];
        }
        if whole.is_empty() && fraction.is_empty() {
            return bad("each part must start with a number");
        }
        let unit_len = rest
            .char_indices()
            .find(|(_, c)| c.is_ascii_digit() || *c == '.')
            .map_or(rest.len(), |(i, _)| i);
        let nanos_per_unit: u128 = match &rest[..unit_len] {
            "ns" => 1,
            "us" | "µs" | "μs" => 1_000,
            "ms" => 1_000_000,
            "s" => 1_000_000_000,
            "m" => 60_000_000_000,
            "h" => 3_600_000_000_000,
            "" => return bad("a number lacks its unit"),
            _ => return bad("unknown unit"),
        };
        rest = &rest[unit_len..];
        let too_long = || bad("it is too long");
        let whole: u128 = if whole.is_empty() {
            0
        } else {
            match whole.parse() {
                Ok(n) => n,
                Err(_) => return too_long(),
            }
        };
        let mut part = match whole.checked_mul(nanos_per_unit) {
            Some(n) => n,
            None => return too_long(),
        };
        // Digits beyond the unit's nanosecond resolution are dropped, as Go does.
        let mut scale = nanos_per_unit;
        for digit in fraction.bytes() {
            scale /= 10;
            part += u128::from(digit - b'0') * scale;
        }
        total = match total.checked_add(part) {
            Some(n) => n,
            None => return too_long(),
        };
    }
    // Go's limit: what fits in an int64 of nanoseconds (about 292 years).
    if total > i64::MAX as u128 {
        return bad("it is longer than Go's maximum duration, about 2562047h");
    }
    let total = total as u64;
    Ok(Duration::new(
        total / 1_000_000_000,
        (total % 1_000_000_000) as u32,
    ))
}

/// For `#[serde(default, deserialize_with = ...)]` on an `Option<Duration>` field (at least 1 ms).
pub(super) fn duration<'de, D: Deserializer<'de>>(
    deserializer: D,
) -> Result<Option<Duration>, D::Error> {
    deserialize_parsed(deserializer, "a duration such as 10s", |text| {
        parse_duration(text).map(Some)
    })
}

/// For `#[serde(default, deserialize_with = ...)]` on an `Option<Duration>` that may be zero.
pub(super) fn duration_or_zero<'de, D: Deserializer<'de>>(
    deserializer: D,
) -> Result<Option<Duration>, D::Error> {
    deserialize_parsed(deserializer, "a duration such as 10s", |text| {
        parse_duration_or_zero(text).map(Some)
    })
}

/// For a required duration field (with a serde default supplied by the caller's type).
pub(super) fn required_duration<'de, D: Deserializer<'de>>(
    deserializer: D,
) -> Result<Duration, D::Error> {
    deserialize_parsed(deserializer, "a duration such as 10s", parse_duration)
}

// ---------------------------------------------------------------------------------------------
// Small value types

/// Istio's `Percent`: `{value: 0.0 to 100.0}`.
#[derive(Debug, Clone, Copy, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Percent {
    pub value: f64,
}

impl Percent {
    /// The share of requests, 0.0 to 1.0.
    pub fn fraction(self) -> f64 {
        self.value / 100.0
    }
}

pub(super) fn check_percent(field: &str, percent: Option<Percent>) -> Result<(), FieldError> {
    match percent {
        Some(p) if !(0.0..=100.0).contains(&p.value) => Err(invalid(
            format!("{field}.value"),
            format!("{} is not a percentage from 0 to 100", p.value),
        )),
        _ => Ok(()),
    }
}

/// `port: {number: N}`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PortSelector {
    pub number: u32,
}

pub(super) fn check_port(field: &str, port: u32) -> Result<(), FieldError> {
    if (1..=65535).contains(&port) {
        Ok(())
    } else {
        Err(invalid(field, format!("{port} is not a port (1 to 65535)")))
    }
}

/// `exportTo`: only `*` (every namespace, the default) and `.` (the object's own namespace).
pub(super) fn check_export_to(export_to: &[String]) -> Result<(), FieldError> {
    for (i, entry) in export_to.iter().enumerate() {
        let field = format!("spec.exportTo[{i}]");
        if entry != "*" && entry != "." {
            return Err(invalid(
                field,
                format!(
                    "{entry:?} is not supported: only \"*\" (every namespace) and \".\" (this \
                     namespace) are accepted; exporting to named namespaces or to none (\"~\") is \
                     not implemented"
                ),
            ));
        }
        if export_to[..i].contains(entry) {
            return Err(invalid(field, format!("{entry:?} is listed twice")));
        }
    }
    if export_to.len() > 1 {
        return Err(invalid(
            "spec.exportTo[1]",
            "\"*\" (public) and \".\" cannot be listed together",
        ));
    }
    Ok(())
}

/// The DNS-1123 label Istio requires of subset names.
pub(super) fn check_subset_name(field: &str, name: &str) -> Result<(), FieldError> {
    if super::is_dns_label(name) {
        Ok(())
    } else {
        Err(invalid(
            field,
            format!(
                "{name:?} is not a valid subset name (a DNS label: lower-case letters, digits \
                 and '-', at most 63 characters)"
            ),
        ))
    }
}

// ---------------------------------------------------------------------------------------------
// Hosts

/// A Service of the mesh, as a VirtualService or DestinationRule `host` names it.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ServiceRef {
    pub namespace: String,
    pub name: String,
}

impl ServiceRef {
    /// `namespace/name`, the key of `model::Service`.
    pub fn key(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }
}

impl fmt::Display for ServiceRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

/// Resolves a `host` as Istio does for a Kubernetes Service: a short name (no dot) is a Service
/// of `namespace` (the object's own); `name.ns.svc.cluster.local` is Service `ns/name`. Istio
/// reads every other name with a dot, `name.ns` included, as a fully qualified name of its own
/// (a ServiceEntry's host), which this mesh does not have, and wildcards (`*`, `*.example.com`)
/// match many hosts: both are refused with a message saying what to write.
pub fn resolve_host(host: &str, namespace: &str) -> Result<ServiceRef, String> {
    if host.contains('*') {
        return Err(format!(
            "wildcard host {host:?} is not supported: name one Service, as `name` or \
             `name.namespace.svc.{CLUSTER_DOMAIN}`"
        ));
    }
    if host.parse::<IpAddr>().is_ok() {
        return Err(format!(
            "{host:?} is an IP address: name a Service, as `name` or \
             `name.namespace.svc.{CLUSTER_DOMAIN}`"
        ));
    }
    let suffix = format!(".svc.{CLUSTER_DOMAIN}");
    let (name, ns) = if !host.contains('.') {
        (host, namespace)
    } else if let Some((name, ns)) = host
        .strip_suffix(suffix.as_str())
        .and_then(|rest| rest.split_once('.'))
        .filter(|(_, ns)| !ns.contains('.'))
    {
        (name, ns)
    } else {
        let hint = match host.split_once('.') {
            Some((name, ns)) if !ns.contains('.') => format!(
                " (Istio reads `{host}` as an external host name, not as Service {ns}/{name}: \
                 write `{name}.{ns}.svc.{CLUSTER_DOMAIN}`)"
            ),
            _ => String::new(),
        };
        return Err(format!(
            "{host:?} is not a Service of this mesh: name one as `name` (in the object's \
             namespace) or `name.namespace.svc.{CLUSTER_DOMAIN}`; ServiceEntry hosts are not \
             supported{hint}"
        ));
    };
    for (what, label) in [("name", name), ("namespace", ns)] {
        if !super::is_dns_label(label) {
            return Err(format!(
                "{host:?}: the Service {what} {label:?} is not a DNS label (lower-case letters, \
                 digits and '-', at most 63 characters)"
            ));
        }
    }
    Ok(ServiceRef {
        namespace: ns.to_string(),
        name: name.to_string(),
    })
}

pub(super) fn check_host(field: &str, host: &str, namespace: &str) -> Result<(), FieldError> {
    resolve_host(host, namespace)
        .map(drop)
        .map_err(|m| invalid(field, m))
}

/// For the tests of both documents: reading must refuse, with this text in the message.
#[cfg(test)]
pub(super) fn assert_contains_all(text: &str, parts: &[&str], case: &str) {
    for part in parts {
        assert!(text.contains(part), "{case}: {text:?} lacks {part:?}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_follow_go_syntax_with_istio_limits() {
        let ok = [
            ("10s", Duration::from_secs(10)),
            ("0.5s", Duration::from_millis(500)),
            (".25s", Duration::from_millis(250)),
            ("100ms", Duration::from_millis(100)),
            ("1.5h", Duration::from_secs(5400)),
            ("1m30s", Duration::from_secs(90)),
            ("2h45m", Duration::from_secs(9900)),
            ("1000us", Duration::from_millis(1)),
            ("1000000ns", Duration::from_millis(1)),
            ("1s500ms", Duration::from_millis(1500)),
            ("+2s", Duration::from_secs(2)),
            ("5.s", Duration::from_secs(5)),
        ];
        for (text, want) in ok {
            assert_eq!(parse_duration(text), Ok(want), "{text}");
        }
        let bad = [
            ("", "it is empty"),
            ("10", "lacks its unit"),
            ("10d", "unknown unit"),
            ("-1s", "it is negative"),
            ("+", "it is empty"),
            ("s", "must start with a number"),
            ("0s", "below the minimum duration, 1ms"),
            ("0", "below the minimum duration, 1ms"),
            ("500us", "below the minimum duration"),
            ("1.0005s", "not a whole number of milliseconds"),
            ("99999999999h", "longer than Go's maximum duration"),
            ("99999999999999999999999999999999999999999h", "too long"),
        ];
        for (text, want) in bad {
            let e = parse_duration(text).unwrap_err();
            assert!(e.contains(want), "{text}: {e}");
        }
        assert_eq!(parse_duration_or_zero("0s"), Ok(Duration::ZERO));
        assert_eq!(parse_duration_or_zero("0"), Ok(Duration::ZERO));
        assert!(parse_duration_or_zero("1ns").is_err());
    }

    #[test]
    fn hosts_resolve_to_services_like_istio() {
        let svc = |ns: &str, name: &str| {
            Ok(ServiceRef {
                namespace: ns.into(),
                name: name.into(),
            })
        };
        assert_eq!(resolve_host("reviews", "shop"), svc("shop", "reviews"));
        assert_eq!(
            resolve_host("reviews.other.svc.cluster.local", "shop"),
            svc("other", "reviews")
        );
        assert_eq!(
            resolve_host("reviews", "shop").unwrap().key(),
            "shop/reviews"
        );
        let refused = [
            ("*", "wildcard host \"*\" is not supported"),
            ("*.shop.svc.cluster.local", "wildcard host"),
            ("reviews.other", "write `reviews.other.svc.cluster.local`"),
            ("example.com", "ServiceEntry hosts are not supported"),
            ("a.b.svc.other.domain", "is not a Service of this mesh"),
            ("x.y.z.svc.cluster.local", "is not a Service of this mesh"),
            ("10.0.0.1", "is an IP address"),
            ("Reviews", "is not a DNS label"),
            (".shop.svc.cluster.local", "is not a DNS label"),
        ];
        for (host, want) in refused {
            let e = resolve_host(host, "shop").unwrap_err();
            assert!(e.contains(want), "{host}: {e}");
        }
    }

    #[test]
    fn export_to_takes_only_public_or_own_namespace() {
        assert!(check_export_to(&[]).is_ok());
        assert!(check_export_to(&["*".into()]).is_ok());
        assert!(check_export_to(&[".".into()]).is_ok());
        let e = check_export_to(&["other".into()]).unwrap_err();
        assert_eq!(e.field, "spec.exportTo[0]");
        assert!(e.message.contains("\"other\" is not supported"), "{e}");
        let e = check_export_to(&[".".into(), ".".into()]).unwrap_err();
        assert!(e.message.contains("listed twice"), "{e}");
        let e = check_export_to(&["*".into(), ".".into()]).unwrap_err();
        assert!(e.message.contains("cannot be listed together"), "{e}");
    }
}

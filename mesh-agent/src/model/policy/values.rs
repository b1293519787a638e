//! Value types of policy documents and how one value matches: Istio string patterns, CIDR blocks
//! and ports, each parsed (and so validated) when a document is read.
use std::fmt;
use std::net::IpAddr;

use serde::de::{self, Deserializer, Visitor};
use serde::Deserialize;

/// An Istio string pattern: exact, `prefix*`, `*suffix`, or `*` (any non-empty value).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StringMatch {
    Exact(String),
    Prefix(String),
    Suffix(String),
    /// `*`: any non-empty value.
    Presence,
}

impl StringMatch {
    /// Parses a pattern; `*` is allowed only alone, first or last, and the empty string is refused.
    pub fn parse(pattern: &str) -> Result<StringMatch, String> {
        let parsed = if pattern == "*" {
            StringMatch::Presence
        } else if let Some(suffix) = pattern.strip_prefix('*') {
            StringMatch::Suffix(suffix.to_string())
        } else if let Some(prefix) = pattern.strip_suffix('*') {
            StringMatch::Prefix(prefix.to_string())
        } else {
            StringMatch::Exact(pattern.to_string())
        };
        match &parsed {
            _ if pattern.is_empty() => Err("an empty string is not a valid pattern".to_string()),
            StringMatch::Exact(s) | StringMatch::Prefix(s) | StringMatch::Suffix(s)
                if s.contains('*') =>
            {
                Err(format!(
                    "invalid pattern {pattern:?}: `*` is only supported alone, as a prefix \
                     (`*suffix`) or as a suffix (`prefix*`)"
                ))
            }
            _ => Ok(parsed),
        }
    }

    pub fn matches(&self, value: &str) -> bool {
        match self {
            StringMatch::Exact(s) => value == s,
            StringMatch::Prefix(s) => value.starts_with(s.as_str()),
            StringMatch::Suffix(s) => value.ends_with(s.as_str()),
            StringMatch::Presence => !value.is_empty(),
        }
    }

    /// The same pattern with `prefix` removed from its text, for principals written as
    /// `spiffe://...` (Istio compares them without the scheme).
    pub fn without_prefix(self, prefix: &str) -> StringMatch {
        let strip = |s: String| s.strip_prefix(prefix).map(str::to_string).unwrap_or(s);
        match self {
            StringMatch::Exact(s) => StringMatch::Exact(strip(s)),
            StringMatch::Prefix(s) => StringMatch::Prefix(strip(s)),
            other => other,
        }
    }
}

impl fmt::Display for StringMatch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            StringMatch::Exact(s) => write!(f, "{s}"),
            StringMatch::Prefix(s) => write!(f, "{s}*"),
            StringMatch::Suffix(s) => write!(f, "*{s}"),
            StringMatch::Presence => write!(f, "*"),
        }
    }
}

impl<'de> Deserialize<'de> for StringMatch {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserialize_parsed(deserializer, "a string pattern", StringMatch::parse)
    }
}

/// An address block: `10.0.0.0/8`, `fd00::/64` or a single address.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cidr {
    addr: IpAddr,
    prefix_len: u8,
}

impl Cidr {
    pub fn parse(text: &str) -> Result<Cidr, String> {
        let bad = |why: &str| format!("invalid IP block {text:?}: {why}");
        let (addr, len) = match text.split_once('/') {
            Some((addr, len)) => (addr, Some(len)),
            None => (text, None),
        };
        let addr: IpAddr = addr
            .parse()
            .map_err(|_| bad("expected an IPv4 or IPv6 address or CIDR"))?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let prefix_len = match len {
            None => max,
            Some(len) => len
                .parse::<u8>()
                .ok()
                .filter(|l| *l <= max)
                .ok_or_else(|| bad(&format!("the prefix length must be 0 to {max}")))?,
        };
        Ok(Cidr::canonical(addr, prefix_len))
    }

    /// IPv4-mapped IPv6 blocks (`::ffff:10.0.0.0/104`) become IPv4 blocks (`10.0.0.0/8`).
    fn canonical(addr: IpAddr, prefix_len: u8) -> Cidr {
        match addr.to_canonical() {
            IpAddr::V4(v4) if addr.is_ipv6() && prefix_len >= 96 => Cidr {
                addr: IpAddr::V4(v4),
                prefix_len: prefix_len - 96,
            },
            _ => Cidr { addr, prefix_len },
        }
    }

    /// Whether `ip` is in the block; IPv4-mapped IPv6 addresses count as IPv4.
    pub fn contains(&self, ip: IpAddr) -> bool {
        match (self.addr, ip.to_canonical()) {
            (IpAddr::V4(net), IpAddr::V4(ip)) => same_prefix(
                u32::from(net).into(),
                u32::from(ip).into(),
                self.prefix_len,
                32,
            ),
            (IpAddr::V6(net), IpAddr::V6(ip)) => {
                same_prefix(u128::from(net), u128::from(ip), self.prefix_len, 128)
            }
            _ => false,
        }
    }
}

/// Whether the top `len` of `bits` bits of `a` and `b` agree.
fn same_prefix(a: u128, b: u128, len: u8, bits: u32) -> bool {
    let shift = bits - u32::from(len);
    a.checked_shr(shift).unwrap_or(0) == b.checked_shr(shift).unwrap_or(0)
}

impl fmt::Display for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix_len)
    }
}

impl<'de> Deserialize<'de> for Cidr {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserialize_parsed(deserializer, "an IP address or CIDR", Cidr::parse)
    }
}

/// A port number, written as a string (`"8080"`, as Istio's YAML does) or a number.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Port(pub u16);

impl Port {
    pub fn parse(text: &str) -> Result<Port, String> {
        text.trim()
            .parse::<u64>()
            .map_err(|_| format!("invalid port {text:?}: expected a number from 1 to 65535"))
            .and_then(Port::from_number)
    }

    fn from_number(n: u64) -> Result<Port, String> {
        match u16::try_from(n) {
            Ok(p) if p != 0 => Ok(Port(p)),
            _ => Err(format!(
                "invalid port {n}: expected a number from 1 to 65535"
            )),
        }
    }
}

impl<'de> Deserialize<'de> for Port {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_any(PortVisitor)
    }
}

struct PortVisitor;

impl Visitor<'_> for PortVisitor {
    type Value = Port;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a port number (1 to 65535), as a string or a number")
    }

    fn visit_u64<E: de::Error>(self, n: u64) -> Result<Port, E> {
        Port::from_number(n).map_err(E::custom)
    }

    fn visit_i64<E: de::Error>(self, n: i64) -> Result<Port, E> {
        let n = u64::try_from(n).map_err(|_| E::custom(format!("invalid port {n}")))?;
        self.visit_u64(n)
    }

    fn visit_str<E: de::Error>(self, s: &str) -> Result<Port, E> {
        Port::parse(s).map_err(E::custom)
    }
}

/// Deserializes a string through `parse`, so that errors carry the value's own position.
pub(crate) fn deserialize_parsed<'de, D: Deserializer<'de>, T>(
    deserializer: D,
    expecting: &'static str,
    parse: fn(&str) -> Result<T, String>,
) -> Result<T, D::Error> {
    deserializer.deserialize_str(ParsedVisitor { expecting, parse })
}

struct ParsedVisitor<T> {
    expecting: &'static str,
    parse: fn(&str) -> Result<T, String>,
}

impl<T> Visitor<'_> for ParsedVisitor<T> {
    type Value = T;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.expecting)
    }

    fn visit_str<E: de::Error>(self, s: &str) -> Result<T, E> {
        (self.parse)(s).map_err(E::custom)
    }
}

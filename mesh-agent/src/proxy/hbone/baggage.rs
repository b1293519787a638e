//! The W3C `baggage` header as HBONE peers use it: the Kubernetes names of one end of a tunnel.
//!
//! Matched against ztunnel at commit 62d82653 (master after 1.31.0-alpha.0): a client sends the
//! source's baggage on every `CONNECT`, and a server answers a `CONNECT` it accepts with the
//! destination's baggage on the 200 (rejections carry none). The keys, in the order ztunnel
//! writes them, each left out when empty:
//!
//! `k8s.cluster.name`, `k8s.namespace.name`, `k8s.<kind>.name` (kind `deployment`, `cronjob`,
//! `pod` or `job`), `service.name` (the canonical service), `service.version` (the canonical
//! revision), `cloud.region`, `cloud.availability_zone`.
//!
//! ztunnel reads exactly those keys (an empty value counts as absent, unknown keys are ignored,
//! later values win). This parser reads them too, and also the keys this agent sent before it
//! followed ztunnel (`k8s.workload.name`, `k8s.workload.type`), so mixed-version agents still
//! understand each other.
use std::fmt::Write;

/// The kinds ztunnel writes and reads in `k8s.<kind>.name`.
const KINDS: [&str; 4] = ["deployment", "cronjob", "pod", "job"];

/// One end of a tunnel as described by `baggage`. `None`: not given (or given empty).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Baggage {
    /// `k8s.cluster.name`.
    pub cluster: Option<String>,
    /// `k8s.namespace.name`.
    pub namespace: Option<String>,
    /// The kind of `k8s.<kind>.name`: `deployment`, `cronjob`, `pod` or `job`; written as `pod`
    /// when unset (or another value).
    pub workload_kind: Option<String>,
    /// The name in `k8s.<kind>.name`.
    pub workload_name: Option<String>,
    /// `service.name`: Istio's canonical service.
    pub service_name: Option<String>,
    /// `service.version`: Istio's canonical revision.
    pub service_version: Option<String>,
    /// `cloud.region`.
    pub region: Option<String>,
    /// `cloud.availability_zone`.
    pub zone: Option<String>,
}

impl Baggage {
    /// The header value: `key=value` members joined by `,` (no spaces), in ztunnel's order.
    /// Values are percent-encoded where W3C baggage requires it (and `=`, which ztunnel's parser
    /// would cut a value at); Kubernetes names and label values never need it.
    pub fn header_value(&self) -> String {
        let kind = self
            .workload_kind
            .as_deref()
            .filter(|k| KINDS.contains(k))
            .unwrap_or("pod");
        let workload_key = format!("k8s.{kind}.name");
        let members = [
            ("k8s.cluster.name", &self.cluster),
            ("k8s.namespace.name", &self.namespace),
            (workload_key.as_str(), &self.workload_name),
            ("service.name", &self.service_name),
            ("service.version", &self.service_version),
            ("cloud.region", &self.region),
            ("cloud.availability_zone", &self.zone),
        ];
        let mut out = String::new();
        for (key, value) in members {
            let Some(value) = value.as_deref().filter(|v| !v.is_empty()) else {
                continue;
            };
            if !out.is_empty() {
                out.push(',');
            }
            out.push_str(key);
            out.push('=');
            encode_into(&mut out, value);
        }
        out
    }

    /// Reads every `baggage` value in order (later members win). Members that are not
    /// `key=value`, unknown keys and W3C properties (`;…` after a value) are ignored; values are
    /// trimmed and percent-decoded (kept as sent when that fails).
    pub fn parse<'a>(values: impl IntoIterator<Item = &'a str>) -> Baggage {
        let mut b = Baggage::default();
        for value in values {
            for member in value.split(',') {
                let member = member.split(';').next().unwrap_or_default();
                let Some((key, value)) = member.split_once('=') else {
                    continue;
                };
                let value = value.trim();
                let value = (!value.is_empty()).then(|| decode(value));
                let key = key.trim();
                match key {
                    "k8s.cluster.name" => b.cluster = value,
                    "k8s.namespace.name" => b.namespace = value,
                    "service.name" => b.service_name = value,
                    "service.version" => b.service_version = value,
                    "cloud.region" => b.region = value,
                    "cloud.availability_zone" => b.zone = value,
                    // This agent's keys before it followed ztunnel.
                    "k8s.workload.name" => b.workload_name = value,
                    "k8s.workload.type" => {
                        b.workload_kind = value.filter(|k| KINDS.contains(&k.as_str()));
                    }
                    _ => {
                        let kind = key
                            .strip_prefix("k8s.")
                            .and_then(|k| k.strip_suffix(".name"))
                            .filter(|k| KINDS.contains(k));
                        if let Some(kind) = kind {
                            b.workload_kind = Some(kind.to_string());
                            b.workload_name = value;
                        }
                    }
                }
            }
        }
        b
    }

    /// Reads the `baggage` headers of a request or response; `None` when there is none.
    pub fn from_headers(headers: &http::HeaderMap) -> Option<Baggage> {
        let mut values = headers
            .get_all("baggage")
            .iter()
            .filter_map(|v| v.to_str().ok())
            .peekable();
        values.peek()?;
        Some(Baggage::parse(values))
    }
}

/// W3C baggage-octet: printable ASCII but space, `"`, `,`, `;` and `\`. `%` (the escape) and
/// `=` are encoded as well.
fn plain(b: u8) -> bool {
    matches!(b, 0x21 | 0x23..=0x24 | 0x26..=0x2B | 0x2D..=0x3A | 0x3C | 0x3E..=0x5B | 0x5D..=0x7E)
}

fn encode_into(out: &mut String, value: &str) {
    for &b in value.as_bytes() {
        if plain(b) {
            out.push(b as char);
        } else {
            let _ = write!(out, "%{b:02X}");
        }
    }
}

/// Percent-decodes `value`; a bad escape or a result that is not UTF-8 keeps it as it came.
fn decode(value: &str) -> String {
    if !value.contains('%') {
        return value.to_string();
    }
    let bytes = value.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = bytes
                .get(i + 1..i + 3)
                .filter(|h| h.iter().all(u8::is_ascii_hexdigit))
                .and_then(|h| std::str::from_utf8(h).ok())
                .and_then(|h| u8::from_str_radix(h, 16).ok());
            match hex {
                Some(b) => {
                    out.push(b);
                    i += 3;
                    continue;
                }
                None => return value.to_string(),
            }
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8(out).unwrap_or_else(|_| value.to_string())
}

//! Istio `DestinationRule` documents (`networking.istio.io/v1`) as data, following **Istio 1.31**
//! (its CRD's fields and its validation; see `model::networking`): the subsets of a Service and
//! the traffic policy (load balancing, connection pool, outlier detection) for requests to it.
//!
//! Reading is strict: an unknown field is an error with the field path and line, and a field this
//! proxy does not implement is refused by name with the reason:
//!
//! * `workloadSelector`, `trafficPolicy.tunnel`, `proxyProtocol`, `retryBudget`,
//!   `loadBalancer.localityLbSetting`, `zoneAwareLbSetting`, `warmup`, `warmupDurationSecs`,
//!   `backendUtilization`, `simple: PASSTHROUGH`, a cookie's `attributes`;
//! * `connectionPool.tcp.tcpKeepalive`, `maxConnectionDuration` and `idleTimeout`: the waypoint
//!   reaches endpoints over HBONE streams pooled by the mesh, whose TCP connections these would
//!   have to describe (they do not map onto one stream);
//! * `connectionPool.http.h2UpgradePolicy`, `useClientProtocol`, `maxConcurrentStreams` and
//!   `http2KeepAlive`: the waypoint picks the upstream protocol and tunes HTTP/2 itself;
//! * `outlierDetection.consecutiveErrors` (deprecated in Istio: use `consecutive5xxErrors`),
//!   `consecutiveLocalOriginFailures` and `splitExternalLocalOriginErrors` (local-origin failures
//!   are not counted apart) and `outlierDetectionHttpErrorCodes`;
//! * `tls` other than `mode: ISTIO_MUTUAL`: traffic between workloads is always mutual TLS
//!   (HBONE), which is what `ISTIO_MUTUAL` asks for; `DISABLE`, `SIMPLE` and `MUTUAL` would need
//!   TLS originated by the waypoint and are refused, as are the other TLS settings.
//!
//! Defaults are Istio's and are filled in while reading where Istio documents a value
//! (outlier detection: `consecutive5xxErrors` 5, `interval` 10s, `baseEjectionTime` 30s,
//! `maxEjectionPercent` 10, `minHealthPercent` 0, `consecutiveGatewayErrors` 0 = off), or given by
//! methods where absence itself means something (connection pool limits:
//! [`TcpSettings::max_connections`] and friends).
//!
//! [`DestinationRule::effective_policy`] applies Istio's merge rules for a subset and a port;
//! [`merge_for_host`] applies Istio's rule for several DestinationRules of one host (the oldest
//! first; later ones add only subsets it lacks and a top-level policy if it has none).
use std::collections::BTreeMap;
use std::time::Duration;

use serde::de::Deserializer;
use serde::Deserialize;

use super::networking::{self, api_version, PortSelector, ServiceRef};
use super::policy::deserialize_parsed;
use super::route::{deserialize_converted, RouteMetadata};

mod merge;
mod validate;

pub use merge::{merge_for_host, EffectivePolicy};

const NO_SELECTOR: &str =
    "a waypoint applies a DestinationRule to every caller of its Service; per-client rules are \
     not implemented";
const NO_LOCALITY: &str = "the mesh has no localities or zones to balance across";
const NO_WARMUP: &str = "slow start is not implemented by the waypoint's balancer";
const HBONE_POOL: &str = "the waypoint reaches endpoints over HBONE streams pooled by the mesh, \
                          whose TCP connections this setting would describe";
const OWN_H2: &str = "the waypoint picks the upstream protocol and tunes HTTP/2 itself";
const NO_LOCAL_ORIGIN: &str = "local-origin failures are not counted apart from responses";

/// One `DestinationRule`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(try_from = "RawDestinationRule")]
pub struct DestinationRule {
    pub metadata: RouteMetadata,
    pub spec: DestinationRuleSpec,
}

impl DestinationRule {
    /// `namespace/name`.
    pub fn key(&self) -> String {
        self.metadata.key()
    }

    /// The Service `spec.host` names (resolved against this object's namespace).
    pub fn service(&self) -> Result<ServiceRef, String> {
        networking::resolve_host(&self.spec.host, &self.metadata.namespace)
    }

    /// A subset by name.
    pub fn subset(&self, name: &str) -> Option<&Subset> {
        self.spec.subsets.iter().find(|s| s.name == name)
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct RawDestinationRule {
    #[serde(deserialize_with = "api_version")]
    #[allow(dead_code)] // Checked while reading.
    api_version: (),
    #[serde(deserialize_with = "kind")]
    #[allow(dead_code)] // Checked while reading.
    kind: (),
    metadata: RouteMetadata,
    spec: DestinationRuleSpec,
}

impl From<RawDestinationRule> for DestinationRule {
    fn from(raw: RawDestinationRule) -> Self {
        DestinationRule {
            metadata: raw.metadata,
            spec: raw.spec,
        }
    }
}

fn kind<'de, D: Deserializer<'de>>(deserializer: D) -> Result<(), D::Error> {
    deserialize_parsed(deserializer, "a kind", |value| {
        if value == "DestinationRule" {
            Ok(())
        } else {
            Err(format!(
                "unsupported kind {value:?}: expected DestinationRule"
            ))
        }
    })
}

refuse_field!(refuse_workload_selector, "workloadSelector", NO_SELECTOR);
refuse_field!(
    refuse_tunnel,
    "tunnel",
    "the mesh tunnels everything in HBONE already"
);
refuse_field!(
    refuse_proxy_protocol,
    "proxyProtocol",
    "the waypoint does not send PROXY protocol headers"
);
refuse_field!(
    refuse_retry_budget,
    "retryBudget",
    "retries are limited per route by `retries.attempts`"
);
refuse_field!(refuse_locality, "localityLbSetting", NO_LOCALITY);
refuse_field!(refuse_zone_aware, "zoneAwareLbSetting", NO_LOCALITY);
refuse_field!(refuse_warmup, "warmup", NO_WARMUP);
refuse_field!(refuse_warmup_secs, "warmupDurationSecs", NO_WARMUP);
refuse_field!(
    refuse_backend_utilization,
    "backendUtilization",
    "the waypoint does not receive endpoints' load reports"
);
refuse_field!(
    refuse_cookie_attributes,
    "attributes",
    "the waypoint sets only the cookie's name, path and TTL"
);
refuse_field!(refuse_tcp_keepalive, "tcpKeepalive", HBONE_POOL);
refuse_field!(
    refuse_max_connection_duration,
    "maxConnectionDuration",
    HBONE_POOL
);
refuse_field!(refuse_tcp_idle_timeout, "idleTimeout", HBONE_POOL);
refuse_field!(refuse_h2_upgrade, "h2UpgradePolicy", OWN_H2);
refuse_field!(refuse_use_client_protocol, "useClientProtocol", OWN_H2);
refuse_field!(
    refuse_max_concurrent_streams,
    "maxConcurrentStreams",
    OWN_H2
);
refuse_field!(refuse_http2_keepalive, "http2KeepAlive", OWN_H2);
refuse_field!(
    refuse_consecutive_errors,
    "consecutiveErrors",
    "it is deprecated in Istio; use `consecutive5xxErrors` or `consecutiveGatewayErrors`"
);
refuse_field!(
    refuse_local_origin_failures,
    "consecutiveLocalOriginFailures",
    NO_LOCAL_ORIGIN
);
refuse_field!(
    refuse_split_local_origin,
    "splitExternalLocalOriginErrors",
    NO_LOCAL_ORIGIN
);
refuse_field!(
    refuse_error_codes,
    "outlierDetectionHttpErrorCodes",
    "an endpoint is ejected on 5xx or gateway errors, as `consecutive5xxErrors` and \
     `consecutiveGatewayErrors` say"
);

#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct DestinationRuleSpec {
    /// `name` (this namespace) or `name.namespace.svc.cluster.local`.
    pub host: String,
    /// `*` or `.` only (see `model::networking`).
    #[serde(default)]
    pub export_to: Vec<String>,
    #[serde(default)]
    pub subsets: Vec<Subset>,
    #[serde(default)]
    pub traffic_policy: Option<TrafficPolicy>,
    #[serde(default, deserialize_with = "refuse_workload_selector")]
    #[allow(dead_code)] // Never read: reading one fails.
    workload_selector: Option<networking::Refused>,
}

/// A named group of the Service's endpoints, by their labels.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Subset {
    /// A DNS label, unique in the rule.
    pub name: String,
    /// The endpoints whose workloads carry all of these; empty: every endpoint.
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    /// Overrides the rule's (see [`DestinationRule::effective_policy`]).
    #[serde(default)]
    pub traffic_policy: Option<TrafficPolicy>,
}

impl Subset {
    /// Whether a workload with `labels` belongs to the subset.
    pub fn selects(&self, labels: &BTreeMap<String, String>) -> bool {
        self.labels.iter().all(|(k, v)| labels.get(k) == Some(v))
    }
}

/// How requests to the Service (or a subset, or a port) are sent.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct TrafficPolicy {
    #[serde(default)]
    pub load_balancer: Option<LoadBalancerSettings>,
    #[serde(default)]
    pub connection_pool: Option<ConnectionPoolSettings>,
    #[serde(default)]
    pub outlier_detection: Option<OutlierDetection>,
    #[serde(default)]
    pub tls: Option<ClientTlsSettings>,
    /// Per Service port; a port's entry replaces the four settings above for that port.
    #[serde(default)]
    pub port_level_settings: Vec<PortTrafficPolicy>,
    #[serde(default, deserialize_with = "refuse_tunnel")]
    #[allow(dead_code)] // Never read: reading one fails.
    tunnel: Option<networking::Refused>,
    #[serde(default, deserialize_with = "refuse_proxy_protocol")]
    #[allow(dead_code)] // Never read: reading one fails.
    proxy_protocol: Option<networking::Refused>,
    #[serde(default, deserialize_with = "refuse_retry_budget")]
    #[allow(dead_code)] // Never read: reading one fails.
    retry_budget: Option<networking::Refused>,
}

impl TrafficPolicy {
    /// The settings of `port`, if `portLevelSettings` has an entry for it.
    pub fn port_level(&self, port: u16) -> Option<&PortTrafficPolicy> {
        self.port_level_settings
            .iter()
            .find(|p| p.port.number == u32::from(port))
    }
}

/// The traffic policy of one Service port. Settings left out take their defaults: they are not
/// inherited from the enclosing policy (Istio's rule).
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct PortTrafficPolicy {
    pub port: PortSelector,
    #[serde(default)]
    pub load_balancer: Option<LoadBalancerSettings>,
    #[serde(default)]
    pub connection_pool: Option<ConnectionPoolSettings>,
    #[serde(default)]
    pub outlier_detection: Option<OutlierDetection>,
    #[serde(default)]
    pub tls: Option<ClientTlsSettings>,
}

// ---------------------------------------------------------------------------------------------
// Load balancing

/// `simple` or `consistentHash` (exactly one).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LoadBalancerSettings {
    Simple(SimpleLb),
    ConsistentHash(ConsistentHashLb),
}

impl<'de> Deserialize<'de> for LoadBalancerSettings {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserialize_converted::<D, RawLoadBalancer, _>(deserializer, "load balancer settings")
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct RawLoadBalancer {
    #[serde(default)]
    simple: Option<SimpleLb>,
    #[serde(default)]
    consistent_hash: Option<ConsistentHashLb>,
    #[serde(default, deserialize_with = "refuse_locality")]
    #[allow(dead_code)] // Never read: reading one fails.
    locality_lb_setting: Option<networking::Refused>,
    #[serde(default, deserialize_with = "refuse_zone_aware")]
    #[allow(dead_code)] // Never read: reading one fails.
    zone_aware_lb_setting: Option<networking::Refused>,
    #[serde(default, deserialize_with = "refuse_warmup")]
    #[allow(dead_code)] // Never read: reading one fails.
    warmup: Option<networking::Refused>,
    #[serde(default, deserialize_with = "refuse_warmup_secs")]
    #[allow(dead_code)] // Never read: reading one fails.
    warmup_duration_secs: Option<networking::Refused>,
    #[serde(default, deserialize_with = "refuse_backend_utilization")]
    #[allow(dead_code)] // Never read: reading one fails.
    backend_utilization: Option<networking::Refused>,
}

impl TryFrom<RawLoadBalancer> for LoadBalancerSettings {
    type Error = String;

    fn try_from(raw: RawLoadBalancer) -> Result<Self, String> {
        match (raw.simple, raw.consistent_hash) {
            (Some(simple), None) => Ok(LoadBalancerSettings::Simple(simple)),
            (None, Some(hash)) => Ok(LoadBalancerSettings::ConsistentHash(hash)),
            (None, None) => Err("set `simple` or `consistentHash`".to_string()),
            (Some(_), Some(_)) => Err("set only one of `simple` and `consistentHash`".to_string()),
        }
    }
}

/// Balancing without tuning.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum SimpleLb {
    /// The proxy's default (Istio's is `LEAST_REQUEST`).
    Unspecified,
    RoundRobin,
    /// Also read from `LEAST_CONN`, its deprecated name.
    LeastRequest,
    Random,
}

impl SimpleLb {
    pub fn parse(text: &str) -> Result<SimpleLb, String> {
        match text {
            "UNSPECIFIED" => Ok(SimpleLb::Unspecified),
            "ROUND_ROBIN" => Ok(SimpleLb::RoundRobin),
            "LEAST_REQUEST" | "LEAST_CONN" => Ok(SimpleLb::LeastRequest),
            "RANDOM" => Ok(SimpleLb::Random),
            "PASSTHROUGH" => Err(
                "PASSTHROUGH is not supported: the waypoint always balances over the Service's \
                 endpoints, it does not forward to the original destination address"
                    .to_string(),
            ),
            other => Err(format!(
                "unknown load balancer {other:?}: expected ROUND_ROBIN, LEAST_REQUEST, RANDOM or \
                 UNSPECIFIED"
            )),
        }
    }
}

impl<'de> Deserialize<'de> for SimpleLb {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserialize_parsed(deserializer, "a load balancer name", SimpleLb::parse)
    }
}

/// Session affinity: requests with the same hash key go to the same endpoint.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConsistentHashLb {
    pub hash_key: HashKey,
    /// Absent: a ring hash of [`DEFAULT_MINIMUM_RING_SIZE`] entries (Istio's default).
    pub algorithm: Option<HashAlgorithm>,
}

/// Istio's (and Envoy's) default minimum ring size.
pub const DEFAULT_MINIMUM_RING_SIZE: u64 = 1024;
/// Envoy's largest ring (`maximum_ring_size`'s own maximum): a larger minimum is refused.
pub const RING_MAX_SIZE: u64 = 8_388_608;

impl ConsistentHashLb {
    /// The algorithm with Istio's default filled in.
    pub fn algorithm(&self) -> HashAlgorithm {
        self.algorithm.unwrap_or(HashAlgorithm::RingHash {
            minimum_ring_size: DEFAULT_MINIMUM_RING_SIZE,
        })
    }
}

/// What is hashed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HashKey {
    HttpHeaderName(String),
    HttpCookie(HttpCookie),
    UseSourceIp,
    HttpQueryParameterName(String),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HashAlgorithm {
    /// Also read from the deprecated `minimumRingSize` beside the key.
    RingHash { minimum_ring_size: u64 },
    /// `table_size` is a prime below 5000011.
    Maglev { table_size: u64 },
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct HttpCookie {
    pub name: String,
    #[serde(default)]
    pub path: Option<String>,
    /// Absent or zero: a session cookie. The waypoint generates the cookie when absent from the
    /// request.
    #[serde(default, deserialize_with = "networking::duration_or_zero")]
    pub ttl: Option<Duration>,
    #[serde(default, deserialize_with = "refuse_cookie_attributes")]
    #[allow(dead_code)] // Never read: reading one fails.
    attributes: Option<networking::Refused>,
}

impl<'de> Deserialize<'de> for ConsistentHashLb {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserialize_converted::<D, RawConsistentHash, _>(deserializer, "consistent hash settings")
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct RawConsistentHash {
    #[serde(default)]
    http_header_name: Option<String>,
    #[serde(default)]
    http_cookie: Option<HttpCookie>,
    #[serde(default)]
    use_source_ip: Option<bool>,
    #[serde(default)]
    http_query_parameter_name: Option<String>,
    #[serde(default)]
    ring_hash: Option<RawRingHash>,
    #[serde(default)]
    maglev: Option<RawMaglev>,
    #[serde(default)]
    minimum_ring_size: Option<u64>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct RawRingHash {
    #[serde(default)]
    minimum_ring_size: Option<u64>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct RawMaglev {
    #[serde(default)]
    table_size: u64,
}

impl TryFrom<RawConsistentHash> for ConsistentHashLb {
    type Error = String;

    fn try_from(raw: RawConsistentHash) -> Result<Self, String> {
        let mut keys = Vec::new();
        if let Some(name) = raw.http_header_name {
            keys.push(("httpHeaderName", HashKey::HttpHeaderName(name)));
        }
        if let Some(cookie) = raw.http_cookie {
            keys.push(("httpCookie", HashKey::HttpCookie(cookie)));
        }
        match raw.use_source_ip {
            Some(true) => keys.push(("useSourceIp", HashKey::UseSourceIp)),
            Some(false) => {
                return Err(
                    "`useSourceIp: false` hashes nothing: leave it out and set another \
                            key"
                    .to_string(),
                )
            }
            None => {}
        }
        if let Some(name) = raw.http_query_parameter_name {
            keys.push((
                "httpQueryParameterName",
                HashKey::HttpQueryParameterName(name),
            ));
        }
        let hash_key = match keys.len() {
            0 => {
                return Err("set what to hash: one of `httpHeaderName`, `httpCookie`, \
                            `useSourceIp` or `httpQueryParameterName`"
                    .to_string())
            }
            1 => keys.remove(0).1,
            _ => {
                let names: Vec<&str> = keys.iter().map(|(n, _)| *n).collect();
                return Err(format!(
                    "set only one hash key ({} are set)",
                    names.join(" and ")
                ));
            }
        };
        let algorithm = match (raw.ring_hash, raw.maglev, raw.minimum_ring_size) {
            (None, None, None) => None,
            (Some(ring), None, None) => Some(HashAlgorithm::RingHash {
                minimum_ring_size: ring
                    .minimum_ring_size
                    .filter(|n| *n > 0)
                    .unwrap_or(DEFAULT_MINIMUM_RING_SIZE),
            }),
            (None, None, Some(size)) => Some(HashAlgorithm::RingHash {
                minimum_ring_size: if size == 0 {
                    DEFAULT_MINIMUM_RING_SIZE
                } else {
                    size
                },
            }),
            (None, Some(maglev), None) => Some(HashAlgorithm::Maglev {
                table_size: maglev.table_size,
            }),
            (_, _, Some(_)) => {
                return Err(
                    "set only one of `minimumRingSize` (deprecated), `ringHash` and \
                            `maglev`"
                        .to_string(),
                )
            }
            (Some(_), Some(_), None) => {
                return Err("set only one of `ringHash` and `maglev`".to_string())
            }
        };
        Ok(ConsistentHashLb {
            hash_key,
            algorithm,
        })
    }
}

// ---------------------------------------------------------------------------------------------
// Connection pool

/// Limits on the connections and requests to each endpoint.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct ConnectionPoolSettings {
    #[serde(default)]
    pub tcp: Option<TcpSettings>,
    #[serde(default)]
    pub http: Option<HttpSettings>,
}

/// Istio's "unlimited": 2^32 - 1.
pub const UNLIMITED: u32 = u32::MAX;
/// Istio's default TCP connect timeout (its mesh-wide `connectTimeout`).
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Istio's default idle timeout of upstream HTTP connections.
pub const DEFAULT_HTTP_IDLE_TIMEOUT: Duration = Duration::from_secs(3600);

#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct TcpSettings {
    #[serde(default)]
    pub max_connections: Option<u32>,
    #[serde(default, deserialize_with = "networking::duration")]
    pub connect_timeout: Option<Duration>,
    #[serde(default, deserialize_with = "refuse_tcp_keepalive")]
    #[allow(dead_code)] // Never read: reading one fails.
    tcp_keepalive: Option<networking::Refused>,
    #[serde(default, deserialize_with = "refuse_max_connection_duration")]
    #[allow(dead_code)] // Never read: reading one fails.
    max_connection_duration: Option<networking::Refused>,
    #[serde(default, deserialize_with = "refuse_tcp_idle_timeout")]
    #[allow(dead_code)] // Never read: reading one fails.
    idle_timeout: Option<networking::Refused>,
}

impl TcpSettings {
    /// Connections to one endpoint at once; absent or 0: unlimited (2^32 - 1).
    pub fn max_connections(&self) -> u32 {
        nonzero_or_unlimited(self.max_connections)
    }

    /// Absent: 10 s.
    pub fn connect_timeout(&self) -> Duration {
        self.connect_timeout.unwrap_or(DEFAULT_CONNECT_TIMEOUT)
    }
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct HttpSettings {
    #[serde(default)]
    pub http1_max_pending_requests: Option<u32>,
    #[serde(default)]
    pub http2_max_requests: Option<u32>,
    #[serde(default)]
    pub max_requests_per_connection: Option<u32>,
    #[serde(default)]
    pub max_retries: Option<u32>,
    #[serde(default, deserialize_with = "networking::duration")]
    pub idle_timeout: Option<Duration>,
    #[serde(default, deserialize_with = "refuse_h2_upgrade")]
    #[allow(dead_code)] // Never read: reading one fails.
    h2_upgrade_policy: Option<networking::Refused>,
    #[serde(default, deserialize_with = "refuse_use_client_protocol")]
    #[allow(dead_code)] // Never read: reading one fails.
    use_client_protocol: Option<networking::Refused>,
    #[serde(default, deserialize_with = "refuse_max_concurrent_streams")]
    #[allow(dead_code)] // Never read: reading one fails.
    max_concurrent_streams: Option<networking::Refused>,
    #[serde(default, deserialize_with = "refuse_http2_keepalive")]
    #[allow(dead_code)] // Never read: reading one fails.
    http2_keep_alive: Option<networking::Refused>,
}

impl HttpSettings {
    /// Requests waiting for a connection; absent or 0: unlimited (2^32 - 1).
    pub fn http1_max_pending_requests(&self) -> u32 {
        nonzero_or_unlimited(self.http1_max_pending_requests)
    }

    /// Requests in progress to the destination at once; absent or 0: unlimited.
    pub fn http2_max_requests(&self) -> u32 {
        nonzero_or_unlimited(self.http2_max_requests)
    }

    /// Requests per upstream connection; `None` (absent or 0): unlimited.
    pub fn max_requests_per_connection(&self) -> Option<u32> {
        self.max_requests_per_connection.filter(|n| *n > 0)
    }

    /// Retries outstanding to the destination at once; absent or 0: unlimited.
    pub fn max_retries(&self) -> u32 {
        nonzero_or_unlimited(self.max_retries)
    }

    /// Absent: 1 hour.
    pub fn idle_timeout(&self) -> Duration {
        self.idle_timeout.unwrap_or(DEFAULT_HTTP_IDLE_TIMEOUT)
    }
}

/// Istio gives 0 and absence the same meaning for these limits: Envoy's default, unlimited.
fn nonzero_or_unlimited(value: Option<u32>) -> u32 {
    value.filter(|n| *n > 0).unwrap_or(UNLIMITED)
}

// ---------------------------------------------------------------------------------------------
// Outlier detection

/// Ejects endpoints that keep failing; defaults filled in while reading (module comment).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct OutlierDetection {
    /// 5xx responses (and connection failures) in a row that eject; 0: off.
    #[serde(default = "five", rename = "consecutive5xxErrors")]
    pub consecutive_5xx_errors: u32,
    /// 502, 503, 504 (and connection failures) in a row that eject; 0: off.
    #[serde(default)]
    pub consecutive_gateway_errors: u32,
    /// Between ejection sweeps.
    #[serde(
        default = "ten_seconds",
        deserialize_with = "networking::required_duration"
    )]
    pub interval: Duration,
    /// An ejection lasts this times the number of times the endpoint was ejected.
    #[serde(
        default = "thirty_seconds",
        deserialize_with = "networking::required_duration"
    )]
    pub base_ejection_time: Duration,
    /// At most this share of the endpoints is ejected at once.
    #[serde(default = "ten")]
    pub max_ejection_percent: u32,
    /// Ejection stops while fewer than this share of the endpoints are healthy.
    #[serde(default)]
    pub min_health_percent: u32,
    #[serde(default, deserialize_with = "refuse_consecutive_errors")]
    #[allow(dead_code)] // Never read: reading one fails.
    consecutive_errors: Option<networking::Refused>,
    #[serde(default, deserialize_with = "refuse_local_origin_failures")]
    #[allow(dead_code)] // Never read: reading one fails.
    consecutive_local_origin_failures: Option<networking::Refused>,
    #[serde(default, deserialize_with = "refuse_split_local_origin")]
    #[allow(dead_code)] // Never read: reading one fails.
    split_external_local_origin_errors: Option<networking::Refused>,
    #[serde(default, deserialize_with = "refuse_error_codes")]
    #[allow(dead_code)] // Never read: reading one fails.
    outlier_detection_http_error_codes: Option<networking::Refused>,
}

impl Default for OutlierDetection {
    /// Istio's defaults, as an empty `outlierDetection: {}` reads.
    fn default() -> Self {
        OutlierDetection {
            consecutive_5xx_errors: five(),
            consecutive_gateway_errors: 0,
            interval: ten_seconds(),
            base_ejection_time: thirty_seconds(),
            max_ejection_percent: ten(),
            min_health_percent: 0,
            consecutive_errors: None,
            consecutive_local_origin_failures: None,
            split_external_local_origin_errors: None,
            outlier_detection_http_error_codes: None,
        }
    }
}

fn five() -> u32 {
    5
}

fn ten() -> u32 {
    10
}

fn ten_seconds() -> Duration {
    Duration::from_secs(10)
}

fn thirty_seconds() -> Duration {
    Duration::from_secs(30)
}

// ---------------------------------------------------------------------------------------------
// TLS

/// Only `mode: ISTIO_MUTUAL`, which the mesh's HBONE already is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ClientTlsSettings;

impl<'de> Deserialize<'de> for ClientTlsSettings {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserialize_converted::<D, RawTls, _>(deserializer, "TLS settings")
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct RawTls {
    mode: String,
    #[serde(default)]
    client_certificate: Option<serde::de::IgnoredAny>,
    #[serde(default)]
    private_key: Option<serde::de::IgnoredAny>,
    #[serde(default)]
    ca_certificates: Option<serde::de::IgnoredAny>,
    #[serde(default)]
    credential_name: Option<serde::de::IgnoredAny>,
    #[serde(default)]
    subject_alt_names: Option<serde::de::IgnoredAny>,
    #[serde(default)]
    sni: Option<serde::de::IgnoredAny>,
    #[serde(default)]
    insecure_skip_verify: Option<serde::de::IgnoredAny>,
    #[serde(default)]
    ca_crl: Option<serde::de::IgnoredAny>,
}

impl TryFrom<RawTls> for ClientTlsSettings {
    type Error = String;

    fn try_from(raw: RawTls) -> Result<Self, String> {
        match raw.mode.as_str() {
            "ISTIO_MUTUAL" => {}
            "DISABLE" | "SIMPLE" | "MUTUAL" => {
                return Err(format!(
                    "`mode: {}` is not supported: traffic between workloads of the mesh is always \
                     Istio mutual TLS (HBONE); only ISTIO_MUTUAL is accepted",
                    raw.mode
                ))
            }
            other => {
                return Err(format!(
                    "unknown TLS mode {other:?}: expected ISTIO_MUTUAL (DISABLE, SIMPLE and \
                     MUTUAL are not supported)"
                ))
            }
        }
        let others = [
            ("clientCertificate", raw.client_certificate.is_some()),
            ("privateKey", raw.private_key.is_some()),
            ("caCertificates", raw.ca_certificates.is_some()),
            ("credentialName", raw.credential_name.is_some()),
            ("subjectAltNames", raw.subject_alt_names.is_some()),
            ("sni", raw.sni.is_some()),
            ("insecureSkipVerify", raw.insecure_skip_verify.is_some()),
            ("caCrl", raw.ca_crl.is_some()),
        ];
        if let Some((name, _)) = others.iter().find(|(_, set)| *set) {
            return Err(format!(
                "`{name}` is not supported: with ISTIO_MUTUAL the mesh's own certificates and \
                 identities are used"
            ));
        }
        Ok(ClientTlsSettings)
    }
}

/// Parses multi-document YAML (`---` separated) of `DestinationRule`s and validates each; empty
/// documents are skipped. Errors name the document (1-based), then the field path and the line
/// (reading) or the object and the field path (validation).
pub fn parse_destination_rules(yaml: &str) -> Result<Vec<DestinationRule>, String> {
    let mut out = Vec::new();
    for (index, document) in serde_yaml_ng::Deserializer::from_str(yaml).enumerate() {
        let parsed = Option::<DestinationRule>::deserialize(document)
            .map_err(|e| format!("document {}: {e}", index + 1))?;
        if let Some(rule) = parsed {
            rule.validate().map_err(|e| {
                format!(
                    "document {} (DestinationRule {}): {e}",
                    index + 1,
                    rule.key()
                )
            })?;
            out.push(rule);
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests;

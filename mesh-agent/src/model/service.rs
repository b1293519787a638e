//! Services: virtual IPs resolved by the proxy to one of their endpoint workloads.
use std::collections::BTreeMap;
use std::net::IpAddr;
use std::time::Duration;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Service {
    pub name: String,
    pub namespace: String,
    /// Virtual IPs (at most one per family), never a workload's own address.
    pub vips: Vec<IpAddr>,
    pub ports: Vec<ServicePort>,
    /// How a connection picks an endpoint.
    pub load_balancing: LoadBalancing,
    /// When an endpoint that fails connections is left out of the balancing, and for how long.
    pub ejection: EjectionPolicy,
    /// Workloads behind the service: `name` (same namespace) or `namespace/name`.
    pub endpoints: Vec<String>,
    /// Its labels (`istio.io/use-waypoint` among them).
    pub labels: BTreeMap<String, String>,
}

impl Service {
    /// `namespace/name`.
    pub fn key(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }

    /// The host name Istio reports as `destination_service`.
    pub fn hostname(&self) -> String {
        format!("{}.{}.svc.cluster.local", self.name, self.namespace)
    }

    /// The endpoint port for a service port, if the service exposes it.
    pub fn target_port(&self, port: u16) -> Option<u16> {
        self.ports
            .iter()
            .find(|p| p.port == port)
            .map(|p| p.target_port.unwrap_or(p.port))
    }

    /// The `namespace/name` key of an endpoint reference.
    pub fn endpoint_key(&self, endpoint: &str) -> String {
        if endpoint.contains('/') {
            endpoint.to_string()
        } else {
            format!("{}/{}", self.namespace, endpoint)
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServicePort {
    pub port: u16,
    /// The endpoint port; `None`: the same as `port`.
    pub target_port: Option<u16>,
    /// Its name; Istio reads the protocol from a prefix (`http`, `http2`, `grpc`, ...) when
    /// there is no `app_protocol`.
    pub name: Option<String>,
    /// Its `appProtocol` (`http`, `http2`, `grpc`, `tcp`, ...).
    pub app_protocol: Option<String>,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum LoadBalancing {
    #[default]
    RoundRobin,
    Random,
    /// The endpoint with the fewest live connections, over all of them (ties in round-robin
    /// order).
    LeastConnections,
    /// The less busy of two endpoints drawn at random (Envoy's `LEAST_REQUEST`, the power of two
    /// choices), a connection counting as a request.
    LeastRequest,
    /// A client address to the same endpoint while that endpoint stays in (DestinationRule
    /// `consistentHash.useSourceIp`; rendezvous hashing over the eligible endpoints).
    SourceIpHash,
}

impl LoadBalancing {
    /// How it balances, for messages ("round-robin").
    pub fn describe(self) -> &'static str {
        match self {
            LoadBalancing::RoundRobin => "round-robin",
            LoadBalancing::Random => "at random",
            LoadBalancing::LeastConnections => "to the least-connected endpoint",
            LoadBalancing::LeastRequest => "to the less busy of two random endpoints",
            LoadBalancing::SourceIpHash => "by a hash of the client address",
        }
    }
}

/// Passive health of a service's endpoints (Envoy's outlier detection, for failed connection
/// attempts): an endpoint whose attempts fail `consecutive_failures` times in a row is ejected,
/// that is not picked for new connections, for `base` times the number of times it was ejected,
/// at most `max`. Each `interval` an endpoint stays in, that number drops by one. At most
/// `max_ejection_percent` of a service's endpoints are ejected at once (always at least one), and
/// a service whose endpoints are all ejected is balanced over all of them again.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EjectionPolicy {
    /// Failed attempts in a row that eject an endpoint; 0 turns ejection off.
    pub consecutive_failures: u32,
    /// The first ejection's length.
    pub base: Duration,
    /// The longest ejection.
    pub max: Duration,
    /// The most endpoints ejected at once, in percent of the service's endpoints.
    pub max_ejection_percent: u8,
    /// How long an endpoint must stay in for its ejection count to drop by one.
    pub interval: Duration,
}

impl Default for EjectionPolicy {
    fn default() -> Self {
        EjectionPolicy {
            consecutive_failures: 1,
            base: Duration::from_secs(5),
            max: Duration::from_secs(300),
            max_ejection_percent: 50,
            interval: Duration::from_secs(10),
        }
    }
}

impl EjectionPolicy {
    /// How long the `times`-th ejection (counting from 1) lasts.
    pub fn length(&self, times: u32) -> Duration {
        self.base.saturating_mul(times.max(1)).min(self.max)
    }

    /// How many of `endpoints` may be ejected at once.
    pub fn max_ejected(&self, endpoints: usize) -> usize {
        (endpoints * usize::from(self.max_ejection_percent.min(100)) / 100).max(1)
    }
}

/// The protocol of a service port, by Istio's rules (explicit protocol selection): the port's
/// `appProtocol`, else the prefix of its name before the first `-` (`http-web` is HTTP); names
/// and values compare in lower case.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PortProtocol {
    /// `http`: HTTP/1.1 (a client may still speak HTTP/2 with prior knowledge).
    Http,
    /// `http2`, `grpc`, `grpc-web`, `kubernetes.io/h2c`: HTTP/2.
    Http2,
    /// `tcp`, `tls`, `https`, `mongo`, `mysql`, `redis` and the like: bytes, never parsed.
    Tcp,
    /// Nothing declared: detected from the first bytes.
    Unspecified,
}

impl ServicePort {
    pub fn protocol(&self) -> PortProtocol {
        let classify = |word: &str| match word.to_ascii_lowercase().as_str() {
            "http" => Some(PortProtocol::Http),
            "http2" | "grpc" | "grpc-web" | "kubernetes.io/h2c" => Some(PortProtocol::Http2),
            "tcp" | "tls" | "https" | "mongo" | "mysql" | "redis" | "udp" => {
                Some(PortProtocol::Tcp)
            }
            _ => None,
        };
        if let Some(p) = self.app_protocol.as_deref().and_then(classify) {
            return p;
        }
        self.name
            .as_deref()
            .and_then(|name| {
                // `grpc-web` is a protocol of its own, not `grpc` with a suffix.
                classify(name).or_else(|| classify(name.split('-').next().unwrap_or(name)))
            })
            .unwrap_or(PortProtocol::Unspecified)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_port_protocol_comes_from_app_protocol_then_the_name_prefix() {
        let port = |name: Option<&str>, app: Option<&str>| ServicePort {
            port: 80,
            target_port: None,
            name: name.map(Into::into),
            app_protocol: app.map(Into::into),
        };
        let cases = [
            (None, None, PortProtocol::Unspecified),
            (Some("http"), None, PortProtocol::Http),
            (Some("http-web"), None, PortProtocol::Http),
            (Some("HTTP2-api"), None, PortProtocol::Http2),
            (Some("grpc"), None, PortProtocol::Http2),
            (Some("grpc-web"), None, PortProtocol::Http2),
            (Some("tcp-db"), None, PortProtocol::Tcp),
            (Some("web"), None, PortProtocol::Unspecified),
            (Some("httpx"), None, PortProtocol::Unspecified),
            (Some("tcp"), Some("http"), PortProtocol::Http),
            (Some("http"), Some("kubernetes.io/h2c"), PortProtocol::Http2),
            (Some("http"), Some("mysql"), PortProtocol::Tcp),
            (Some("http"), Some("custom"), PortProtocol::Http),
        ];
        for (name, app, want) in cases {
            assert_eq!(port(name, app).protocol(), want, "{name:?} {app:?}");
        }
    }
}

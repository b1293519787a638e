//! Why the proxy could not carry a connection: one enum for every listener, whose
//! [`reason`](ProxyError::reason) is the `reason` label of `istio_tcp_connections_failed_total`
//! and of the log line, and whose message says what happened for an operator.
use std::io;
use std::net::SocketAddr;
use std::time::Duration;

use http::StatusCode;

use super::hbone::HboneError;
use super::resolve::ResolveError;
use crate::telemetry::ConnLabels;

#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    #[error(
        "no original destination recorded for this connection (was port 15001 dialed directly?)"
    )]
    NoOriginalDestination,
    #[error("cannot read the original destination map: {0}")]
    OrigDstMap(String),
    #[error("cannot read the connection's original destination: {0}")]
    LocalAddress(io::Error),
    #[error("cannot route the connection: {0}")]
    Route(ResolveError),
    #[error("cannot reach {dst}: {error}")]
    UpstreamConnect { dst: SocketAddr, error: io::Error },
    #[error("HBONE tunnel to {peer}: {error}")]
    Hbone { peer: SocketAddr, error: HboneError },
    #[error("no answer to CONNECT from {peer} within {after:?}")]
    HboneTimeout { peer: SocketAddr, after: Duration },
    #[error("TLS handshake failed: {0}")]
    TlsHandshake(io::Error),
    #[error("TLS handshake timed out after {0:?}")]
    TlsHandshakeTimeout(Duration),
    #[error("peer certificate: {0}")]
    PeerIdentity(String),
    #[error("bad CONNECT request: {0}")]
    BadRequest(String),
    #[error("CONNECT target {target} is not this pod ({pod})")]
    WrongDestination { target: SocketAddr, pod: String },
    #[error("CONNECT target {target} is not a destination that waypoint pod {waypoint} fronts")]
    NotFronted {
        target: SocketAddr,
        waypoint: String,
    },
    #[error("CONNECT target {target}: no service has that host name")]
    UnknownServiceHost { target: String },
    #[error("CONNECT target {target}: this pod ({pod}) is not an endpoint of service {service}")]
    NotAnEndpoint {
        target: String,
        service: String,
        pod: String,
    },
    #[error("CONNECT target {target}: service {service} has no such port")]
    UnknownTargetPort { target: String, service: String },
    #[error("denied by policy: {0}")]
    PolicyDenied(String),
    /// No bypass: a direct connection to a port only the service's waypoint may reach.
    #[error("refused, it bypasses the waypoint: {0}")]
    WaypointBypass(String),
}

/// A connection a step could not carry, with the labels it is counted under in
/// `istio_tcp_connections_failed_total` when the failing step knew them (a connection that failed
/// before anything about it was known is logged only).
#[derive(Debug)]
pub struct Failure {
    pub error: ProxyError,
    pub labels: Option<Box<ConnLabels>>,
}

impl Failure {
    pub fn counted(error: ProxyError, labels: ConnLabels) -> Failure {
        Failure {
            error,
            labels: Some(Box::new(labels)),
        }
    }
}

impl From<ProxyError> for Failure {
    fn from(error: ProxyError) -> Failure {
        Failure {
            error,
            labels: None,
        }
    }
}

impl ProxyError {
    /// The `reason` label of the failure metric and log line.
    pub fn reason(&self) -> &'static str {
        match self {
            ProxyError::NoOriginalDestination => "no_original_destination",
            ProxyError::OrigDstMap(_) | ProxyError::LocalAddress(_) => "original_destination",
            ProxyError::Route(e) => e.reason(),
            ProxyError::UpstreamConnect { .. } => "upstream_connect",
            ProxyError::Hbone { error, .. } => error.reason(),
            ProxyError::HboneTimeout { .. } => "hbone_connect",
            ProxyError::TlsHandshake(_) | ProxyError::TlsHandshakeTimeout(_) => "tls_handshake",
            ProxyError::PeerIdentity(_) => "peer_identity",
            ProxyError::BadRequest(_) => "bad_request",
            ProxyError::WrongDestination { .. }
            | ProxyError::NotFronted { .. }
            | ProxyError::NotAnEndpoint { .. } => "wrong_destination",
            ProxyError::UnknownServiceHost { .. } => "unknown_service",
            ProxyError::UnknownTargetPort { .. } => "unknown_service_port",
            ProxyError::PolicyDenied(_) => "policy_denied",
            ProxyError::WaypointBypass(_) => "waypoint_bypass",
        }
    }

    /// Whether the failure says the endpoint itself is bad, for its passive health: its agent
    /// (or, for a workload outside the mesh, the endpoint) refused the connection, could not be
    /// reached or did not answer in time, the TLS or HTTP/2 handshake with it failed, or its
    /// agent answered the CONNECT with 502, 503 or 504 (the application refused the connection
    /// or could not be reached). A denial (401, 403), a bad request (400) and what the agent
    /// runs out of locally (a full pool) say nothing about the endpoint.
    pub fn is_endpoint_failure(&self) -> bool {
        match self {
            ProxyError::UpstreamConnect { error, .. } => peer_failed(error),
            ProxyError::HboneTimeout { .. } => true,
            ProxyError::Hbone { error, .. } => match error {
                HboneError::Dial(error) => peer_failed(error),
                HboneError::Handshake(_) | HboneError::KeepaliveTimeout(_) => true,
                HboneError::Status(status) => matches!(status.as_u16(), 502..=504),
                _ => false,
            },
            _ => false,
        }
    }

    /// What an inbound CONNECT is answered with when it fails this way (Istio's codes: 400 for
    /// a request this pod cannot take, 401 for policy, 503 for an application that cannot be
    /// reached).
    pub fn status(&self) -> StatusCode {
        match self {
            ProxyError::BadRequest(_)
            | ProxyError::WrongDestination { .. }
            | ProxyError::NotFronted { .. }
            | ProxyError::UnknownServiceHost { .. }
            | ProxyError::NotAnEndpoint { .. }
            | ProxyError::UnknownTargetPort { .. } => StatusCode::BAD_REQUEST,
            ProxyError::PolicyDenied(_) | ProxyError::WaypointBypass(_) => StatusCode::UNAUTHORIZED,
            _ => StatusCode::SERVICE_UNAVAILABLE,
        }
    }
}

/// An I/O error of a connection to a peer that comes from the peer or the path to it (TLS
/// errors come as `InvalidData`), not from this host's limits.
fn peer_failed(error: &io::Error) -> bool {
    use io::ErrorKind as K;
    matches!(
        error.kind(),
        K::ConnectionRefused
            | K::ConnectionReset
            | K::ConnectionAborted
            | K::HostUnreachable
            | K::NetworkUnreachable
            | K::TimedOut
            | K::UnexpectedEof
            | K::BrokenPipe
            | K::NotConnected
            | K::InvalidData
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reasons_and_statuses_follow_the_failure() {
        let dst: SocketAddr = "10.0.0.1:80".parse().unwrap();
        let refused = ProxyError::UpstreamConnect {
            dst,
            error: io::Error::new(io::ErrorKind::ConnectionRefused, "connection refused"),
        };
        assert_eq!(refused.reason(), "upstream_connect");
        assert_eq!(refused.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(
            refused.to_string(),
            "cannot reach 10.0.0.1:80: connection refused"
        );
        let full = ProxyError::Hbone {
            peer: dst,
            error: HboneError::PoolFull(3),
        };
        assert_eq!(full.reason(), "hbone_pool_full");
        assert_eq!(
            ProxyError::PolicyDenied("no ALLOW policy matched".into()).status(),
            StatusCode::UNAUTHORIZED
        );
        assert_eq!(
            ProxyError::BadRequest("no authority".into()).status(),
            StatusCode::BAD_REQUEST
        );
        let not_here = ProxyError::NotAnEndpoint {
            target: "web.shop.svc.cluster.local:80".into(),
            service: "shop/web".into(),
            pod: "shop/db-0".into(),
        };
        assert_eq!(
            (not_here.reason(), not_here.status()),
            ("wrong_destination", StatusCode::BAD_REQUEST)
        );
        assert_eq!(
            not_here.to_string(),
            "CONNECT target web.shop.svc.cluster.local:80: this pod (shop/db-0) is not an endpoint \
             of service shop/web"
        );
        let unknown = ProxyError::UnknownServiceHost {
            target: "nope.shop.svc.cluster.local:80".into(),
        };
        assert_eq!(
            (unknown.reason(), unknown.status()),
            ("unknown_service", StatusCode::BAD_REQUEST)
        );
        let bypass = ProxyError::WaypointBypass(
            "service shop/web accepts only its waypoint shop/wp (no-bypass)".into(),
        );
        assert_eq!(
            (bypass.reason(), bypass.status()),
            ("waypoint_bypass", StatusCode::UNAUTHORIZED)
        );
        assert_eq!(
            bypass.to_string(),
            "refused, it bypasses the waypoint: service shop/web accepts only its waypoint \
             shop/wp (no-bypass)"
        );
        let port = ProxyError::UnknownTargetPort {
            target: "web.shop.svc.cluster.local:81".into(),
            service: "shop/web".into(),
        };
        assert_eq!(
            (port.reason(), port.status()),
            ("unknown_service_port", StatusCode::BAD_REQUEST)
        );
    }
}

//! Istio's standard HTTP request metrics (Istio 1.24 and later): `istio_requests_total`,
//! `istio_request_duration_milliseconds`, `istio_request_bytes` and `istio_response_bytes`, with
//! the labels Istio gives them (less the canonical service and revision, which the TCP metrics
//! do not carry either).
//!
//! A request's labels are three parts: the source and the destination, which stay the same for
//! many requests and are shared (`Arc`) with their hash worked out once ([`Hashed`]), and the
//! outcome. Counting a request clones two `Arc`s, allocates nothing, and hashes two numbers and
//! the outcome per family.
use std::hash::{BuildHasher, Hash, Hasher};
use std::ops::Deref;
use std::sync::Arc;

use prometheus_client::encoding::{EncodeLabelSet, LabelSetEncoder};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;

/// The source half of a request's labels: the client a waypoint acts for.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct SourceLabels {
    pub reporter: &'static str,
    pub source_workload: String,
    pub source_workload_namespace: String,
    /// `spiffe://` identity of the source, `unknown` without one.
    pub source_principal: String,
    pub source_app: String,
    pub source_version: String,
    pub source_cluster: String,
}

/// The destination half: the workload that served the request and the service it was for.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DestinationLabels {
    pub destination_workload: String,
    pub destination_workload_namespace: String,
    pub destination_principal: String,
    pub destination_app: String,
    pub destination_version: String,
    /// Host name of the service, `unknown` when the request was for a workload address.
    pub destination_service: String,
    pub destination_service_name: String,
    pub destination_service_namespace: String,
    pub destination_cluster: String,
}

/// What became of one request.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct Outcome {
    /// `http` or `grpc`.
    pub request_protocol: &'static str,
    /// The status sent to the client; 0 when none was (the client went away first).
    pub response_code: u16,
    /// The gRPC status (`grpc-status`), empty for a request that is not gRPC or that got none.
    pub grpc_response_status: Option<u32>,
    /// Envoy's response flags (`-` for none).
    pub response_flags: &'static str,
    /// `mutual_tls` when the client came over HBONE.
    pub connection_security_policy: &'static str,
}

/// Labels that many requests share, with their hash worked out once: each request looks its
/// labels up in four families, and hashing the fifteen strings of both halves every time showed
/// in profiles. Equal values have equal hashes (one fixed hasher), so the families' maps still
/// hold one series per distinct set of labels.
#[derive(Debug)]
pub struct Hashed<T> {
    hash: u64,
    value: T,
}

impl<T: Hash> Hashed<T> {
    pub fn new(value: T) -> Hashed<T> {
        let hash =
            std::hash::BuildHasherDefault::<std::hash::DefaultHasher>::default().hash_one(&value);
        Hashed { hash, value }
    }
}

impl<T> Deref for Hashed<T> {
    type Target = T;
    fn deref(&self) -> &T {
        &self.value
    }
}

impl<T: PartialEq> PartialEq for Hashed<T> {
    fn eq(&self, other: &Self) -> bool {
        self.hash == other.hash && self.value == other.value
    }
}

impl<T: Eq> Eq for Hashed<T> {}

impl<T> Hash for Hashed<T> {
    fn hash<H: Hasher>(&self, state: &mut H) {
        state.write_u64(self.hash);
    }
}

/// The labels of the request metrics.
#[derive(Clone, Debug, Hash, PartialEq, Eq)]
pub struct RequestLabels {
    pub source: Arc<Hashed<SourceLabels>>,
    pub destination: Arc<Hashed<DestinationLabels>>,
    pub outcome: Outcome,
}

impl EncodeLabelSet for RequestLabels {
    fn encode(&self, encoder: &mut LabelSetEncoder) -> Result<(), std::fmt::Error> {
        self.source.encode(encoder)?;
        self.destination.encode(encoder)?;
        self.outcome.encode(encoder)
    }
}

/// Envoy's default histogram buckets, which Istio's standard histograms keep (durations in
/// milliseconds, sizes in bytes).
pub const BUCKETS: [f64; 19] = [
    0.5, 1.0, 5.0, 10.0, 25.0, 50.0, 100.0, 250.0, 500.0, 1000.0, 2500.0, 5000.0, 10000.0, 30000.0,
    60000.0, 300000.0, 600000.0, 1800000.0, 3600000.0,
];

fn histogram() -> Histogram {
    Histogram::new(BUCKETS)
}

pub type HistogramFamily = Family<RequestLabels, Histogram, fn() -> Histogram>;

/// The labels of the retry counters: where the retried request went and why.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RetryLabels {
    /// Host name of the service the request was sent to (`unknown` for a workload address).
    pub destination_service: String,
    /// Retried: what the try before ended with (`status`, `connect_failure`, `refused_stream`,
    /// `reset`, `per_try_timeout`). Not retried: why (`budget`, `body`).
    pub reason: &'static str,
}

/// The labels of the waypoint's per-endpoint gauges.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct EndpointLabels {
    /// Host name of the Service the connection serves (`unknown` for a workload address).
    pub destination_service: String,
    /// The endpoint's address and port.
    pub endpoint: String,
}

/// The four request metric families, and the waypoint's retry counters and upstream gauges.
#[derive(Clone)]
pub struct RequestMetrics {
    pub total: Family<RequestLabels, Counter>,
    pub duration_ms: HistogramFamily,
    pub request_bytes: HistogramFamily,
    pub response_bytes: HistogramFamily,
    /// Tries after the first (a request is still counted once in `total`).
    pub retries: Family<RetryLabels, Counter>,
    /// Retries a policy called for but that were not made.
    pub retries_skipped: Family<RetryLabels, Counter>,
    /// Upstream HTTP connections open, per endpoint.
    pub upstream_connections: Family<EndpointLabels, Gauge>,
    /// Requests in flight on them (until their response ends), per endpoint.
    pub upstream_requests: Family<EndpointLabels, Gauge>,
}

impl Default for RequestMetrics {
    fn default() -> Self {
        RequestMetrics {
            total: Family::default(),
            duration_ms: Family::new_with_constructor(histogram as fn() -> Histogram),
            request_bytes: Family::new_with_constructor(histogram as fn() -> Histogram),
            response_bytes: Family::new_with_constructor(histogram as fn() -> Histogram),
            retries: Family::default(),
            retries_skipped: Family::default(),
            upstream_connections: Family::default(),
            upstream_requests: Family::default(),
        }
    }
}

impl RequestMetrics {
    /// Counts one finished request.
    pub fn record(&self, labels: &RequestLabels, duration_ms: f64, received: u64, sent: u64) {
        self.total.get_or_create(labels).inc();
        self.duration_ms.get_or_create(labels).observe(duration_ms);
        self.request_bytes
            .get_or_create(labels)
            .observe(received as f64);
        self.response_bytes
            .get_or_create(labels)
            .observe(sent as f64);
    }

    pub(super) fn register(&self, registry: &mut prometheus_client::registry::Registry) {
        // prometheus-client appends `_total` to counters.
        registry.register(
            "istio_requests",
            "Requests handled, by source, destination and outcome",
            self.total.clone(),
        );
        registry.register(
            "istio_request_duration_milliseconds",
            "Time from a request's arrival to the end of its response, in milliseconds",
            self.duration_ms.clone(),
        );
        registry.register(
            "istio_request_bytes",
            "Body bytes received from the client per request",
            self.request_bytes.clone(),
        );
        registry.register(
            "istio_response_bytes",
            "Body bytes sent to the client per request",
            self.response_bytes.clone(),
        );
        registry.register(
            "mesh_request_retries",
            "Upstream tries a waypoint made after the first, by destination service and the \
             outcome of the try before",
            self.retries.clone(),
        );
        registry.register(
            "mesh_upstream_connections",
            "Upstream HTTP connections a waypoint has open, per endpoint",
            self.upstream_connections.clone(),
        );
        registry.register(
            "mesh_upstream_requests_active",
            "Requests a waypoint has in flight on its upstream connections, per endpoint",
            self.upstream_requests.clone(),
        );
        registry.register(
            "mesh_request_retries_skipped",
            "Retries a route's policy called for that a waypoint did not make: over the retry \
             budget, or a request body too large to send again",
            self.retries_skipped.clone(),
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn source(principal: &str) -> Arc<Hashed<SourceLabels>> {
        Arc::new(Hashed::new(SourceLabels {
            reporter: "waypoint",
            source_workload: "client".into(),
            source_workload_namespace: "shop".into(),
            source_principal: principal.into(),
            source_app: "web".into(),
            source_version: "v1".into(),
            source_cluster: "Kubernetes".into(),
        }))
    }

    fn labels(source: Arc<Hashed<SourceLabels>>) -> RequestLabels {
        RequestLabels {
            source,
            destination: Arc::new(Hashed::new(DestinationLabels {
                destination_workload: "api".into(),
                destination_workload_namespace: "shop".into(),
                destination_principal: "unknown".into(),
                destination_app: "api".into(),
                destination_version: "v1".into(),
                destination_service: "api.shop.svc.cluster.local".into(),
                destination_service_name: "api".into(),
                destination_service_namespace: "shop".into(),
                destination_cluster: "Kubernetes".into(),
            })),
            outcome: Outcome {
                request_protocol: "http",
                response_code: 200,
                grpc_response_status: None,
                response_flags: "-",
                connection_security_policy: "mutual_tls",
            },
        }
    }

    #[test]
    fn equal_labels_built_apart_count_in_one_series_and_different_ones_apart() {
        let metrics = RequestMetrics::default();
        // Two downstream streams of the same client: separate `Arc`s, equal labels.
        metrics.record(&labels(source("spiffe://a")), 1.0, 10, 20);
        metrics.record(&labels(source("spiffe://a")), 1.0, 10, 20);
        metrics.record(&labels(source("spiffe://b")), 1.0, 10, 20);
        let mut registry = prometheus_client::registry::Registry::default();
        metrics.register(&mut registry);
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &registry).unwrap();
        let totals: Vec<&str> = text
            .lines()
            .filter(|l| l.starts_with("istio_requests_total{"))
            .collect();
        assert_eq!(totals.len(), 2, "{text}");
        assert!(totals
            .iter()
            .any(|l| l.contains("source_principal=\"spiffe://a\"") && l.ends_with(" 2")));
        assert!(totals
            .iter()
            .any(|l| l.contains("source_principal=\"spiffe://b\"") && l.ends_with(" 1")));
    }
}

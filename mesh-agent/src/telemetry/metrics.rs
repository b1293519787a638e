//! Prometheus metrics with Istio's names and labels, so existing dashboards keep working.
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use serde::Deserialize;
use std::sync::{Arc, Mutex};

use super::carry::interned;
use super::requests::RequestMetrics;

/// Labels of the `istio_tcp_*` connection metrics (a subset of Istio's, growing with features).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet, Deserialize)]
pub struct ConnLabels {
    /// `source` for the outbound side (this agent serves the client), `destination` for inbound.
    #[serde(deserialize_with = "interned")]
    pub reporter: &'static str,
    pub source_workload: String,
    pub source_workload_namespace: String,
    pub source_app: String,
    /// `spiffe://` identity of the source, `unknown` without mTLS.
    pub source_principal: String,
    pub destination_workload: String,
    pub destination_workload_namespace: String,
    pub destination_app: String,
    pub destination_principal: String,
    /// Host name of the service whose VIP was dialed, `unknown` otherwise.
    pub destination_service: String,
    pub destination_service_name: String,
    pub destination_service_namespace: String,
    #[serde(deserialize_with = "interned")]
    pub request_protocol: &'static str,
    /// `mutual_tls` when carried over HBONE, `none` for plain TCP.
    #[serde(deserialize_with = "interned")]
    pub connection_security_policy: &'static str,
}

/// Labels of `istio_tcp_connections_failed_total`: the connection's labels and why it failed.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet, Deserialize)]
pub struct FailedLabels {
    #[prometheus(flatten)]
    #[serde(flatten)]
    pub conn: ConnLabels,
    /// Short machine-readable reason, e.g. `upstream_connect`, `tls_handshake`, `bad_request`.
    #[serde(deserialize_with = "interned")]
    pub reason: &'static str,
}

/// Labels of `mesh_policy_denials_total`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet, Deserialize)]
pub struct DenialLabels {
    pub destination_workload: String,
    pub destination_workload_namespace: String,
    /// `strict_mtls`, `denied_by_policy`, `no_allow_policy_matched`, `l7_policy_without_waypoint`.
    #[serde(deserialize_with = "interned")]
    pub reason: &'static str,
    /// The deciding rule, `AuthorizationPolicy ns/name rules[i]`; empty when no single rule
    /// decided (no ALLOW policy matched, STRICT mTLS, ...).
    #[serde(default)]
    pub policy: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet, Deserialize)]
pub struct ResultLabels {
    #[serde(deserialize_with = "interned")]
    pub result: &'static str,
}

/// Labels of `mesh_accept_errors_total`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet, Deserialize)]
pub struct AcceptErrorLabels {
    /// `outbound`, `inbound HBONE`, `inbound plaintext`.
    #[serde(deserialize_with = "interned")]
    pub listener: &'static str,
    /// `process_file_limit` (EMFILE), `system_file_limit` (ENFILE), `out_of_memory`, `other`.
    #[serde(deserialize_with = "interned")]
    pub reason: &'static str,
}

/// A reason alone (`mesh_inbound_handshakes_rejected_total`).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet, Deserialize)]
pub struct ReasonLabels {
    #[serde(deserialize_with = "interned")]
    pub reason: &'static str,
}

/// Labels of `mesh_endpoint_ejections_total`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet, Deserialize)]
pub struct EjectionLabels {
    /// `namespace/name` of the service.
    pub service: String,
    /// `namespace/name` of the endpoint workload.
    pub endpoint: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct BuildLabels {
    pub component: &'static str,
    pub tag: &'static str,
}

/// Labels of `mesh_datapath_events_total`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct EventLabels {
    event: &'static str,
}

/// Reads the eBPF programs' event counters at each scrape: `(event, count)`.
pub type EventSource = Box<dyn Fn() -> Vec<(&'static str, u64)> + Send + Sync>;

/// `mesh_datapath_events_total`, read from the datapath when scraped (set by the agent once its
/// datapath is loaded; nothing is exported before).
#[derive(Default)]
struct DatapathEvents(Arc<Mutex<Option<EventSource>>>);

impl std::fmt::Debug for DatapathEvents {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("DatapathEvents")
    }
}

impl prometheus_client::collector::Collector for DatapathEvents {
    fn encode(
        &self,
        mut encoder: prometheus_client::encoding::DescriptorEncoder,
    ) -> Result<(), std::fmt::Error> {
        use prometheus_client::encoding::EncodeMetric;
        let events = match &*self.0.lock().unwrap_or_else(|e| e.into_inner()) {
            Some(source) => source(),
            None => return Ok(()),
        };
        let mut family = encoder.encode_descriptor(
            "mesh_datapath_events",
            "Events the eBPF programs counted, by event (connect_not_redirected: an enrolled pod's connect went out without the mesh because its record could not be stored; orig_dst_not_stored: a redirected connection's destination could not be stored, so the proxy resets it)",
            None,
            prometheus_client::metrics::MetricType::Counter,
        )?;
        for (event, count) in events {
            let counter = prometheus_client::metrics::counter::ConstCounter::new(count);
            counter.encode(family.encode_family(&EventLabels { event })?)?;
        }
        Ok(())
    }
}

/// Every metric the agent exports. Cheap to share behind an `Arc`.
pub struct Metrics {
    pub registry: Registry,
    datapath_events: Arc<Mutex<Option<EventSource>>>,
    pub connections_opened: Family<ConnLabels, Counter>,
    pub connections_closed: Family<ConnLabels, Counter>,
    /// Bytes sent to the downstream client (the response direction), as Istio counts them.
    pub sent_bytes: Family<ConnLabels, Counter>,
    /// Bytes received from the downstream client (the request direction).
    pub received_bytes: Family<ConnLabels, Counter>,
    pub connections_failed: Family<FailedLabels, Counter>,
    /// Connections refused or closed by policy, by reason.
    pub policy_denials: Family<DenialLabels, Counter>,
    /// Live pooled HTTP/2 (HBONE) connections to other proxies.
    pub hbone_pool_connections: Gauge,
    pub config_reloads: Family<ResultLabels, Counter>,
    /// Inbound HBONE connections closed before their TLS handshake (a handshake cap was reached).
    pub handshakes_rejected: Family<ReasonLabels, Counter>,
    /// Failed accepts on pod listeners (the connection waits in the backlog), by reason.
    pub accept_errors: Family<AcceptErrorLabels, Counter>,
    /// Connections reset at accept because a concurrent-connection cap was reached.
    pub connections_shed: Family<AcceptErrorLabels, Counter>,
    /// Service endpoints left out of the balancing after a failed connection.
    pub endpoint_ejections: Family<EjectionLabels, Counter>,
    /// Generation of the configuration in force: 1 at start, +1 each time a new one is applied.
    pub config_generation: Gauge,
    pub workloads_enrolled: Gauge,
    pub workloads_pending: Gauge,
    /// Istio's HTTP request metrics (a waypoint's).
    pub requests: RequestMetrics,
}

#[cfg(test)]
impl ConnLabels {
    /// `client` (default) to `server` (default) as plain TCP, reported by `reporter`.
    pub(crate) fn sample(reporter: &'static str) -> ConnLabels {
        ConnLabels {
            reporter,
            source_workload: "client".into(),
            source_workload_namespace: "default".into(),
            source_app: "client".into(),
            source_principal: "spiffe://cluster.local/ns/default/sa/client".into(),
            destination_workload: "server".into(),
            destination_workload_namespace: "default".into(),
            destination_app: "unknown".into(),
            destination_principal: "unknown".into(),
            destination_service: "unknown".into(),
            destination_service_name: "unknown".into(),
            destination_service_namespace: "unknown".into(),
            request_protocol: "tcp",
            connection_security_policy: "none",
        }
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::default();
        let events = DatapathEvents::default();
        let datapath_events = events.0.clone();
        registry.register_collector(Box::new(events));
        let m = Metrics {
            datapath_events,
            connections_opened: Family::default(),
            connections_closed: Family::default(),
            sent_bytes: Family::default(),
            received_bytes: Family::default(),
            connections_failed: Family::default(),
            policy_denials: Family::default(),
            hbone_pool_connections: Gauge::default(),
            config_reloads: Family::default(),
            handshakes_rejected: Family::default(),
            accept_errors: Family::default(),
            connections_shed: Family::default(),
            endpoint_ejections: Family::default(),
            config_generation: Gauge::default(),
            workloads_enrolled: Gauge::default(),
            workloads_pending: Gauge::default(),
            requests: RequestMetrics::default(),
            registry: Registry::default(),
        };
        // prometheus-client appends `_total` to counters.
        registry.register(
            "istio_tcp_connections_opened",
            "TCP connections opened",
            m.connections_opened.clone(),
        );
        registry.register(
            "istio_tcp_connections_closed",
            "TCP connections closed",
            m.connections_closed.clone(),
        );
        registry.register(
            "istio_tcp_sent_bytes",
            "Bytes sent to the client of a TCP connection (response direction)",
            m.sent_bytes.clone(),
        );
        registry.register(
            "istio_tcp_received_bytes",
            "Bytes received from the client of a TCP connection (request direction)",
            m.received_bytes.clone(),
        );
        registry.register(
            "istio_tcp_connections_failed",
            "TCP connections that failed, by reason",
            m.connections_failed.clone(),
        );
        registry.register(
            "mesh_policy_denials",
            "Inbound connections denied by policy (at accept or after a policy change), by reason",
            m.policy_denials.clone(),
        );
        registry.register(
            "mesh_hbone_pool_connections",
            "Pooled HTTP/2 connections to other proxies",
            m.hbone_pool_connections.clone(),
        );
        registry.register(
            "mesh_config_reloads",
            "Config reloads by result (applied or rejected)",
            m.config_reloads.clone(),
        );
        registry.register(
            "mesh_inbound_handshakes_rejected",
            "Inbound HBONE connections closed before their TLS handshake because too many were in progress (per source or in all), by reason",
            m.handshakes_rejected.clone(),
        );
        registry.register(
            "mesh_accept_errors",
            "Failed accepts on pod listeners, by listener and reason (process_file_limit: out of file descriptors); the connection waits in the listen backlog",
            m.accept_errors.clone(),
        );
        registry.register(
            "mesh_connections_shed",
            "Connections reset when accepted because the node's or the pod's concurrent-connection cap was reached, by listener and reason",
            m.connections_shed.clone(),
        );
        registry.register(
            "mesh_endpoint_ejections",
            "Service endpoints ejected from the node's load balancing after a connection to them failed (refused, unreachable, timed out, or the application refused it), by service and endpoint",
            m.endpoint_ejections.clone(),
        );
        registry.register(
            "mesh_config_generation",
            "Generation of the configuration in force (1 at start, +1 per applied change)",
            m.config_generation.clone(),
        );
        registry.register(
            "mesh_workloads_enrolled",
            "Workloads of this node whose traffic is captured",
            m.workloads_enrolled.clone(),
        );
        registry.register(
            "mesh_workloads_pending",
            "Workloads of this node that should be captured but could not be wired yet (the log says why)",
            m.workloads_pending.clone(),
        );
        m.requests.register(&mut registry);
        let build: Family<BuildLabels, Gauge> = Family::default();
        build
            .get_or_create(&BuildLabels {
                component: "mesh-agent",
                tag: env!("CARGO_PKG_VERSION"),
            })
            .set(1);
        registry.register("istio_build", "Build of this agent", build);
        Metrics { registry, ..m }
    }

    /// Where `mesh_datapath_events_total` is read from at each scrape.
    pub fn set_datapath_events(&self, source: EventSource) {
        *self
            .datapath_events
            .lock()
            .unwrap_or_else(|e| e.into_inner()) = Some(source);
    }

    /// The Prometheus text exposition.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry)
            .expect("writing to a String cannot fail");
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exposes_istio_names_and_labels() {
        let m = Metrics::new();
        let labels = ConnLabels::sample("source");
        m.connections_opened.get_or_create(&labels).inc();
        m.sent_bytes.get_or_create(&labels).inc_by(42);
        m.connections_failed
            .get_or_create(&FailedLabels {
                conn: labels.clone(),
                reason: "tls_handshake",
            })
            .inc();
        let text = m.encode();
        assert!(
            text.contains(
                "istio_tcp_connections_opened_total{reporter=\"source\",source_workload=\"client\""
            ),
            "{text}"
        );
        assert!(
            text.contains("istio_tcp_sent_bytes_total{") && text.contains("} 42"),
            "{text}"
        );
        assert!(
            text.contains("istio_build{component=\"mesh-agent\""),
            "{text}"
        );
    }

    #[test]
    fn datapath_events_are_exported_once_a_source_is_set() {
        let m = Metrics::new();
        assert!(!m.encode().contains("mesh_datapath_events"));
        m.set_datapath_events(Box::new(|| {
            vec![("connect_not_redirected", 3), ("orig_dst_not_stored", 0)]
        }));
        let text = m.encode();
        assert!(
            text.contains("# TYPE mesh_datapath_events counter")
                && text.contains("mesh_datapath_events_total{event=\"connect_not_redirected\"} 3")
                && text.contains("mesh_datapath_events_total{event=\"orig_dst_not_stored\"} 0"),
            "{text}"
        );
    }
}

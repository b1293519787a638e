//! Metrics for one proxied connection: opened, failed, closed with bytes.
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::relay::Transferred;
use crate::telemetry::{ConnLabels, FailedLabels, Metrics};

/// Counts a connection as opened now and as closed (with its bytes) when `close` is called.
pub struct Accounting {
    metrics: Arc<Metrics>,
    labels: ConnLabels,
    started: Instant,
}

/// Counts a connection that never got relayed.
pub fn failed(metrics: &Metrics, labels: ConnLabels, reason: &'static str) {
    metrics
        .connections_failed
        .get_or_create(&FailedLabels {
            conn: labels,
            reason,
        })
        .inc();
}

impl Accounting {
    pub fn open(metrics: Arc<Metrics>, labels: ConnLabels) -> Accounting {
        metrics.connections_opened.get_or_create(&labels).inc();
        Accounting {
            metrics,
            labels,
            started: Instant::now(),
        }
    }

    /// Records the end of the connection; returns how long it lived.
    pub fn close(self, transferred: Transferred) -> Duration {
        let m = &self.metrics;
        m.connections_closed.get_or_create(&self.labels).inc();
        m.received_bytes
            .get_or_create(&self.labels)
            .inc_by(transferred.client_to_server);
        m.sent_bytes
            .get_or_create(&self.labels)
            .inc_by(transferred.server_to_client);
        self.started.elapsed()
    }
}

//! Metrics for one proxied connection: opened, failed, closed with bytes.
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::relay::Transferred;
use crate::telemetry::{ConnLabels, FailedLabels, Metrics};

/// Counts a connection as opened now and as closed (with its bytes) when `close` is called, or
/// as closed without bytes if it is dropped first (its task was cut at the drain deadline), so
/// every connection counted opened is counted closed.
pub struct Accounting {
    metrics: Arc<Metrics>,
    labels: ConnLabels,
    started: Instant,
    closed: bool,
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
            closed: false,
        }
    }

    /// Records the end of the connection; returns how long it lived.
    pub fn close(mut self, transferred: Transferred) -> Duration {
        self.closed = true;
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

impl Drop for Accounting {
    fn drop(&mut self) {
        if !self.closed {
            self.metrics
                .connections_closed
                .get_or_create(&self.labels)
                .inc();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn labels() -> ConnLabels {
        ConnLabels::sample("source")
    }

    #[test]
    fn every_opened_connection_is_counted_closed_once() {
        let m = Arc::new(Metrics::new());
        Accounting::open(m.clone(), labels()).close(Transferred {
            client_to_server: 3,
            server_to_client: 4,
        });
        // Cut (its task aborted): closed, without bytes.
        drop(Accounting::open(m.clone(), labels()));
        assert_eq!(m.connections_opened.get_or_create(&labels()).get(), 2);
        assert_eq!(m.connections_closed.get_or_create(&labels()).get(), 2);
        assert_eq!(m.received_bytes.get_or_create(&labels()).get(), 3);
    }
}

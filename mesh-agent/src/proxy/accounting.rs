//! Metrics for one proxied connection: opened, failed, closed; bytes are counted by the relay as
//! they move (its [`Meter`]).
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::relay::Meter;
use crate::telemetry::{ConnLabels, FailedLabels, Metrics};

/// Counts a connection as opened now and as closed when `close` is called or when it is dropped
/// first (its task was cut at the drain deadline), so every connection counted opened is counted
/// closed; its bytes are in the counters already, whatever ended it.
pub struct Accounting {
    metrics: Arc<Metrics>,
    labels: ConnLabels,
    meter: Meter,
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
        let meter = Meter::new(
            metrics.received_bytes.get_or_create(&labels).clone(),
            metrics.sent_bytes.get_or_create(&labels).clone(),
        );
        Accounting {
            metrics,
            labels,
            meter,
            started: Instant::now(),
            closed: false,
        }
    }

    /// Where the relay counts this connection's bytes.
    pub fn meter(&self) -> &Meter {
        &self.meter
    }

    /// Records the end of the connection; returns how long it lived.
    pub fn close(mut self) -> Duration {
        self.closed = true;
        self.metrics
            .connections_closed
            .get_or_create(&self.labels)
            .inc();
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
        let a = Accounting::open(m.clone(), labels());
        a.meter().add(true, 3);
        a.meter().add(false, 4);
        a.close();
        // Cut (its task aborted) after moving 2 bytes: closed, with its bytes.
        let cut = Accounting::open(m.clone(), labels());
        cut.meter().add(false, 2);
        drop(cut);
        assert_eq!(m.connections_opened.get_or_create(&labels()).get(), 2);
        assert_eq!(m.connections_closed.get_or_create(&labels()).get(), 2);
        assert_eq!(m.received_bytes.get_or_create(&labels()).get(), 3);
        assert_eq!(m.sent_bytes.get_or_create(&labels()).get(), 6);
    }
}

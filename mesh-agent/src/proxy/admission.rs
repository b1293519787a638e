//! Admission: a cap on inbound TLS handshakes in progress per source address and on the node, so
//! a slow or hostile peer (slowloris: connect and never finish the handshake) holds a bounded
//! share and cannot starve everyone else ([`HandshakeLimiter`]; each handshake also has a
//! deadline), and a cap on concurrent connections per pod and per node ([`ConnLimiter`]). A
//! connection over a cap is closed at once, counted and logged (at most every 10 s).
use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::telemetry::LogEvery;

/// Handshakes in progress allowed from one source address.
pub const DEFAULT_PER_SOURCE: usize = 64;
/// Handshakes in progress allowed on the node.
pub const DEFAULT_TOTAL: usize = 1024;

#[derive(Debug)]
pub struct HandshakeLimiter {
    per_source: usize,
    total: usize,
    state: Mutex<Counts>,
    logged: LogEvery,
}

#[derive(Debug, Default)]
struct Counts {
    total: usize,
    by_source: HashMap<IpAddr, usize>,
}

/// Why a connection was not admitted (the `reason` label of the rejection metric).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    PerSource,
    Total,
}

impl Refusal {
    pub fn reason(self) -> &'static str {
        match self {
            Refusal::PerSource => "per_source_handshake_limit",
            Refusal::Total => "handshake_limit",
        }
    }
}

/// A handshake slot; released when dropped.
#[derive(Debug)]
pub struct Permit {
    limiter: Arc<HandshakeLimiter>,
    source: IpAddr,
}

impl Default for HandshakeLimiter {
    fn default() -> Self {
        HandshakeLimiter::new(DEFAULT_PER_SOURCE, DEFAULT_TOTAL)
    }
}

impl HandshakeLimiter {
    pub fn new(per_source: usize, total: usize) -> Self {
        HandshakeLimiter {
            per_source: per_source.max(1),
            total: total.max(1),
            state: Mutex::default(),
            logged: LogEvery::new(Duration::from_secs(10)),
        }
    }

    fn counts(&self) -> std::sync::MutexGuard<'_, Counts> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A slot for a handshake from `source`, or why there is none. An IPv6 source counts by
    /// its /64: one host usually holds a whole /64, and could otherwise take a fresh address per
    /// connection.
    pub fn admit(self: &Arc<Self>, source: IpAddr) -> Result<Permit, Refusal> {
        let source = source_key(source);
        let mut counts = self.counts();
        if counts.total >= self.total {
            return Err(Refusal::Total);
        }
        let mine = counts.by_source.entry(source).or_default();
        if *mine >= self.per_source {
            return Err(Refusal::PerSource);
        }
        *mine += 1;
        counts.total += 1;
        Ok(Permit {
            limiter: self.clone(),
            source,
        })
    }

    /// Whether to log a refusal now: at most once per 10 s, however many there are.
    pub fn should_log(&self) -> bool {
        self.logged.ready()
    }

    /// Handshakes in progress.
    pub fn in_progress(&self) -> usize {
        self.counts().total
    }
}

/// What one source is counted as: an IPv4 address, or an IPv6 /64 (IPv4-mapped ones as IPv4).
fn source_key(ip: IpAddr) -> IpAddr {
    match ip.to_canonical() {
        IpAddr::V6(v6) => {
            let prefix = u128::from(v6) & !((1u128 << 64) - 1);
            IpAddr::V6(prefix.into())
        }
        v4 => v4,
    }
}

impl Drop for Permit {
    fn drop(&mut self) {
        let mut counts = self.limiter.counts();
        counts.total -= 1;
        if let Some(n) = counts.by_source.get_mut(&self.source) {
            *n -= 1;
            if *n == 0 {
                counts.by_source.remove(&self.source);
            }
        }
    }
}

/// Concurrent connections allowed on the node, all listeners.
pub const DEFAULT_MAX_CONNECTIONS: usize = 100_000;
/// Concurrent connections allowed through one pod's listeners.
pub const DEFAULT_MAX_CONNECTIONS_PER_POD: usize = 25_000;

/// A cap on concurrent connections per node and per pod, taken when a connection is accepted and
/// released when its task ends: one busy or hostile pod cannot take every socket and task of the
/// node. A connection over a cap is reset at once and counted.
#[derive(Debug)]
pub struct ConnLimiter {
    per_pod: usize,
    total: usize,
    active: AtomicUsize,
}

/// A local workload's share, kept with its listeners.
#[derive(Debug, Default)]
pub struct LocalConns(AtomicUsize);

/// Why a connection was shed (the `reason` label of `mesh_connections_shed_total`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Shed {
    PerPod,
    Total,
}

impl Shed {
    pub fn reason(self) -> &'static str {
        match self {
            Shed::PerPod => "per_pod_connection_limit",
            Shed::Total => "connection_limit",
        }
    }
}

/// One admitted connection; released when dropped.
#[derive(Debug)]
pub struct ConnPermit {
    limiter: Arc<ConnLimiter>,
    pod: Arc<LocalConns>,
}

impl Default for ConnLimiter {
    fn default() -> Self {
        ConnLimiter::new(DEFAULT_MAX_CONNECTIONS_PER_POD, DEFAULT_MAX_CONNECTIONS)
    }
}

impl ConnLimiter {
    pub fn new(per_pod: usize, total: usize) -> Self {
        ConnLimiter {
            per_pod: per_pod.max(1),
            total: total.max(1),
            active: AtomicUsize::new(0),
        }
    }

    /// A slot for one more connection of `pod`, or why there is none.
    pub fn admit(self: &Arc<Self>, pod: &Arc<LocalConns>) -> Result<ConnPermit, Shed> {
        // Each count only ever moves below its cap: a pod pressing against its own cap never
        // makes the node's count look full to the others.
        let below = |cap: usize| move |n: usize| (n < cap).then_some(n + 1);
        pod.0
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, below(self.per_pod))
            .map_err(|_| Shed::PerPod)?;
        if self
            .active
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, below(self.total))
            .is_err()
        {
            pod.0.fetch_sub(1, Ordering::AcqRel);
            return Err(Shed::Total);
        }
        Ok(ConnPermit {
            limiter: self.clone(),
            pod: pod.clone(),
        })
    }

    /// Connections admitted and not yet ended.
    pub fn active(&self) -> usize {
        self.active.load(Ordering::Acquire)
    }
}

impl LocalConns {
    pub fn active(&self) -> usize {
        self.0.load(Ordering::Acquire)
    }
}

impl Drop for ConnPermit {
    fn drop(&mut self) {
        self.pod.0.fetch_sub(1, Ordering::AcqRel);
        self.limiter.active.fetch_sub(1, Ordering::AcqRel);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_source_cannot_take_every_slot() {
        let limiter = Arc::new(HandshakeLimiter::new(2, 3));
        let (a, b, c): (IpAddr, IpAddr, IpAddr) = (
            "10.0.0.1".parse().unwrap(),
            "10.0.0.2".parse().unwrap(),
            "fd00::3".parse().unwrap(),
        );
        let a1 = limiter.admit(a).unwrap();
        let _a2 = limiter.admit(a).unwrap();
        assert_eq!(limiter.admit(a).unwrap_err(), Refusal::PerSource);
        let _b1 = limiter.admit(b).unwrap();
        assert_eq!(limiter.admit(c).unwrap_err(), Refusal::Total);
        drop(a1);
        assert_eq!(limiter.in_progress(), 2);
        let _c1 = limiter.admit(c).unwrap();
        assert_eq!(limiter.admit(a).unwrap_err(), Refusal::Total);
        assert!(limiter.should_log(), "the first refusal is logged");
        assert!(!limiter.should_log(), "the next ones within 10 s are not");
    }

    #[test]
    fn an_ipv6_source_is_its_slash_64() {
        let limiter = Arc::new(HandshakeLimiter::new(2, 10));
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        let _a = limiter.admit(ip("fd00:1:2:3::1")).unwrap();
        let _b = limiter.admit(ip("fd00:1:2:3:ffff::9")).unwrap();
        assert_eq!(
            limiter.admit(ip("fd00:1:2:3::abcd")).unwrap_err(),
            Refusal::PerSource,
            "same /64"
        );
        let _c = limiter.admit(ip("fd00:1:2:4::1")).unwrap();
        // IPv4-mapped is IPv4: its own source.
        let _d = limiter.admit(ip("::ffff:10.0.0.1")).unwrap();
        let _e = limiter.admit(ip("10.0.0.1")).unwrap();
        assert_eq!(
            limiter.admit(ip("10.0.0.1")).unwrap_err(),
            Refusal::PerSource
        );
    }

    #[test]
    fn slots_come_back_and_sources_are_forgotten() {
        let limiter = Arc::new(HandshakeLimiter::new(1, 10));
        let a: IpAddr = "10.0.0.1".parse().unwrap();
        for _ in 0..100 {
            let p = limiter.admit(a).unwrap();
            assert!(limiter.admit(a).is_err());
            drop(p);
        }
        assert_eq!(limiter.in_progress(), 0);
        assert!(limiter.counts().by_source.is_empty());
    }

    #[test]
    fn connections_are_capped_per_pod_and_in_all_and_released_on_drop() {
        let limiter = Arc::new(ConnLimiter::new(2, 3));
        let (a, b) = (
            Arc::new(LocalConns::default()),
            Arc::new(LocalConns::default()),
        );
        let a1 = limiter.admit(&a).unwrap();
        let _a2 = limiter.admit(&a).unwrap();
        assert_eq!(limiter.admit(&a).unwrap_err(), Shed::PerPod);
        let _b1 = limiter.admit(&b).unwrap();
        assert_eq!(limiter.admit(&b).unwrap_err(), Shed::Total);
        assert_eq!((limiter.active(), a.active(), b.active()), (3, 2, 1));
        drop(a1);
        let _b2 = limiter.admit(&b).unwrap();
        assert_eq!((limiter.active(), a.active(), b.active()), (3, 1, 2));
        assert_eq!(Shed::PerPod.reason(), "per_pod_connection_limit");
    }
}

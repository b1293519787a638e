//! Live inbound connections, so a policy change can close the ones it now denies.
use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use tokio::sync::Notify;

use crate::identity::Identity;
use crate::policy::{Decision, Request};
use crate::state::State;

/// What policy needs to decide about a connection again.
#[derive(Debug, Clone)]
pub struct ConnFacts {
    /// `namespace/name` of the destination workload (its current labels come from the state).
    pub workload: String,
    pub dst_ip: IpAddr,
    pub dst_port: u16,
    pub src_ip: IpAddr,
    /// `None` for plaintext.
    pub src: Option<Identity>,
}

impl ConnFacts {
    /// The decision under `state` (no bypass, then the policies); `None` when the workload left the state (its
    /// connections then keep running until they end, like those of an unenrolled pod).
    pub fn decide(&self, state: &State) -> Option<Decision> {
        let dst = state.workloads.get(&self.workload)?;
        Some(state.decide_inbound(&Request {
            dst,
            dst_ip: self.dst_ip,
            dst_port: self.dst_port,
            src_ip: self.src_ip,
            src: self.src.as_ref(),
            http: None,
        }))
    }
}

struct Entry {
    facts: ConnFacts,
    close: Arc<Notify>,
}

#[derive(Default)]
pub struct LiveConns {
    next: AtomicU64,
    conns: Mutex<HashMap<u64, Entry>>,
}

/// Deregisters its connection when dropped; `closed()` completes when policy revokes it.
pub struct LiveGuard<'a> {
    registry: &'a LiveConns,
    id: u64,
    close: Arc<Notify>,
}

impl LiveGuard<'_> {
    /// Completes when a policy change denies this connection.
    pub async fn revoked(&self) {
        self.close.notified().await;
    }
}

impl Drop for LiveGuard<'_> {
    fn drop(&mut self) {
        self.registry
            .conns
            .lock()
            .expect("live lock")
            .remove(&self.id);
    }
}

impl LiveConns {
    pub fn register(&self, facts: ConnFacts) -> LiveGuard<'_> {
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        let close = Arc::new(Notify::new());
        self.conns.lock().expect("live lock").insert(
            id,
            Entry {
                facts,
                close: close.clone(),
            },
        );
        LiveGuard {
            registry: self,
            id,
            close,
        }
    }

    /// Re-decides every live connection under `state` and revokes those now denied; returns
    /// them with the decision, for the log.
    pub fn reevaluate(&self, state: &State) -> Vec<(ConnFacts, Decision)> {
        let conns = self.conns.lock().expect("live lock");
        let mut revoked = Vec::new();
        for entry in conns.values() {
            if let Some(decision) = entry.facts.decide(state) {
                if !decision.is_allowed() {
                    // notify_one keeps a permit, so a relay that is not waiting yet still sees it.
                    entry.close.notify_one();
                    revoked.push((entry.facts.clone(), decision));
                }
            }
        }
        revoked
    }

    pub fn len(&self) -> usize {
        self.conns.lock().expect("live lock").len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

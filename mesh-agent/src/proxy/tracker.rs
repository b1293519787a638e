//! Counts live proxied connections so shutdown can drain them, and names the ones a drain
//! deadline cuts.
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::model::Workload;
use tokio::task::AbortHandle;

#[derive(Clone, Default)]
pub struct ConnTracker {
    inner: Arc<Inner>,
}

#[derive(Default)]
struct Inner {
    live: AtomicUsize,
    next_id: AtomicU64,
    conns: Mutex<HashMap<u64, (ConnInfo, Option<AbortHandle>)>>,
    idle: Notify,
}

/// What an operator needs to recognise a connection cut at the drain deadline.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConnInfo {
    /// The workload the listener serves.
    pub workload: Arc<Workload>,
    /// Which of its listeners accepted it (`outbound`, `inbound HBONE`, `inbound plaintext`).
    pub listener: &'static str,
    pub peer: SocketAddr,
    pub since: Instant,
}

/// Held by a connection task; the count drops when it is dropped.
pub struct ConnGuard {
    inner: Arc<Inner>,
    id: u64,
}

impl ConnTracker {
    pub fn track(&self, info: ConnInfo) -> ConnGuard {
        let id = self.inner.next_id.fetch_add(1, Ordering::Relaxed);
        self.inner
            .conns
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(id, (info, None));
        self.inner.live.fetch_add(1, Ordering::SeqCst);
        ConnGuard {
            inner: self.inner.clone(),
            id,
        }
    }

    pub fn live(&self) -> usize {
        self.inner.live.load(Ordering::SeqCst)
    }

    /// The live connections, oldest first.
    pub fn list(&self) -> Vec<ConnInfo> {
        let mut conns: Vec<ConnInfo> = self
            .inner
            .conns
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .values()
            .map(|(info, _)| info.clone())
            .collect();
        conns.sort_by_key(|c| c.since);
        conns
    }

    /// Lets [`cut_all`](Self::cut_all) end the task serving connection `id` (see
    /// [`ConnGuard::id`]); ignored if that connection already ended.
    pub fn set_task(&self, id: u64, task: AbortHandle) {
        if let Some(entry) = self
            .inner
            .conns
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get_mut(&id)
        {
            entry.1 = Some(task);
        }
    }

    /// Ends every live connection's task (their sockets close): the drain deadline.
    pub fn cut_all(&self) {
        for (_, task) in self
            .inner
            .conns
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .values()
        {
            if let Some(task) = task {
                task.abort();
            }
        }
    }

    /// Waits until no connection is live or `timeout` passed; returns how many are still live.
    pub async fn drain(&self, timeout: Duration) -> usize {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let notified = self.inner.idle.notified();
            let live = self.live();
            if live == 0 {
                return 0;
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                return self.live();
            }
        }
    }
}

impl ConnGuard {
    pub fn id(&self) -> u64 {
        self.id
    }
}

impl Drop for ConnGuard {
    fn drop(&mut self) {
        self.inner
            .conns
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&self.id);
        if self.inner.live.fetch_sub(1, Ordering::SeqCst) == 1 {
            self.inner.idle.notify_waiters();
        }
    }
}

/// Tells long-lived inbound HTTP/2 (HBONE) connections that the agent drains: each sends GOAWAY,
/// lets its streams in progress finish and takes no new ones, so peers open new connections
/// (to the agent that took over, after a handover).
#[derive(Default)]
pub struct Drain(CancellationToken);

impl Drain {
    pub fn start(&self) {
        self.0.cancel();
    }

    /// Completes once [`start`](Self::start) was called (at once if it already was).
    pub fn started(&self) -> impl std::future::Future<Output = ()> + Send + 'static {
        self.0.clone().cancelled_owned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn info(port: u16) -> ConnInfo {
        ConnInfo {
            workload: Arc::new(Workload {
                name: "a".into(),
                namespace: "default".into(),
                service_account: "a".into(),
                node: "n1".into(),
                ips: vec![],
                netns: None,
                labels: Default::default(),
                enrolled: true,
            }),
            listener: "outbound",
            peer: SocketAddr::from(([127, 0, 0, 1], port)),
            since: Instant::now(),
        }
    }

    #[tokio::test]
    async fn drain_returns_when_the_last_guard_drops_or_times_out() {
        let t = ConnTracker::default();
        assert_eq!(t.drain(Duration::from_millis(1)).await, 0);
        let g = t.track(info(1));
        assert_eq!(t.drain(Duration::from_millis(20)).await, 1);
        let t2 = t.clone();
        let waiter = tokio::spawn(async move { t2.drain(Duration::from_secs(5)).await });
        tokio::time::sleep(Duration::from_millis(20)).await;
        drop(g);
        assert_eq!(waiter.await.unwrap(), 0);
    }

    #[test]
    fn lists_the_live_connections_oldest_first() {
        let t = ConnTracker::default();
        let (a, b, c) = (t.track(info(1)), t.track(info(2)), t.track(info(3)));
        drop(b);
        let ports: Vec<u16> = t.list().iter().map(|c| c.peer.port()).collect();
        assert_eq!(ports, [1, 3]);
        drop((a, c));
        assert!(t.list().is_empty());
    }

    #[tokio::test]
    async fn cut_all_ends_the_tracked_tasks() {
        let t = ConnTracker::default();
        let guard = t.track(info(1));
        let id = guard.id();
        let task = tokio::spawn(async move {
            let _guard = guard;
            std::future::pending::<()>().await
        });
        t.set_task(id, task.abort_handle());
        t.cut_all();
        assert!(task.await.unwrap_err().is_cancelled());
        assert_eq!(t.live(), 0, "the guard went with the task");
        // A task registered after its connection ended is ignored.
        t.set_task(id, tokio::spawn(async {}).abort_handle());
        assert!(t.list().is_empty());
    }

    #[tokio::test]
    async fn drain_wakes_waiters_started_before_and_after() {
        let d = Drain::default();
        let before = tokio::spawn(d.started());
        tokio::task::yield_now().await;
        assert!(!before.is_finished());
        d.start();
        before.await.unwrap();
        tokio::time::timeout(Duration::from_secs(1), d.started())
            .await
            .expect("already started");
    }
}

//! Counts live proxied connections so shutdown can drain them.
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::Notify;

#[derive(Clone, Default)]
pub struct ConnTracker {
    inner: Arc<Inner>,
}

#[derive(Default)]
struct Inner {
    live: AtomicUsize,
    idle: Notify,
}

/// Held by a connection task; the count drops when it is dropped.
pub struct ConnGuard {
    inner: Arc<Inner>,
}

impl ConnTracker {
    pub fn track(&self) -> ConnGuard {
        self.inner.live.fetch_add(1, Ordering::SeqCst);
        ConnGuard {
            inner: self.inner.clone(),
        }
    }

    pub fn live(&self) -> usize {
        self.inner.live.load(Ordering::SeqCst)
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

impl Drop for ConnGuard {
    fn drop(&mut self) {
        if self.inner.live.fetch_sub(1, Ordering::SeqCst) == 1 {
            self.inner.idle.notify_waiters();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn drain_returns_when_the_last_guard_drops_or_times_out() {
        let t = ConnTracker::default();
        assert_eq!(t.drain(Duration::from_millis(1)).await, 0);
        let g = t.track();
        assert_eq!(t.drain(Duration::from_millis(20)).await, 1);
        let t2 = t.clone();
        let waiter = tokio::spawn(async move { t2.drain(Duration::from_secs(5)).await });
        tokio::time::sleep(Duration::from_millis(20)).await;
        drop(g);
        assert_eq!(waiter.await.unwrap(), 0);
    }
}

//! Local rate limits (our `mesh.dev/rate-limit` route annotation, `model::route::RateLimit`):
//! a token bucket per (route, Service) in this waypoint. A request that finds the bucket empty
//! is answered 429 `local_rate_limited` with the flag `RL`, as Envoy's local rate limit does.
//! Buckets outlive config reloads; a changed limit starts a full bucket.
use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Instant;

use crate::model::route::RateLimit;

/// Buckets kept before idle (full) ones are pruned.
const MAX_BUCKETS: usize = 4096;

/// The buckets of every rate-limited (route, Service).
#[derive(Debug, Default)]
pub struct Limiter {
    buckets: Mutex<HashMap<String, Bucket>>,
}

#[derive(Debug)]
struct Bucket {
    limit: RateLimit,
    tokens: f64,
    last: Instant,
}

impl Bucket {
    fn new(limit: RateLimit, now: Instant) -> Bucket {
        Bucket {
            limit,
            tokens: f64::from(limit.burst),
            last: now,
        }
    }

    fn refill(&mut self, now: Instant) {
        let elapsed = now.saturating_duration_since(self.last).as_secs_f64();
        let rate = f64::from(self.limit.requests) / self.limit.per.as_secs_f64();
        self.tokens = (self.tokens + elapsed * rate).min(f64::from(self.limit.burst));
        self.last = now;
    }
}

impl Limiter {
    /// Whether a request for `key` (route and Service) may go on under `limit` at `now`; takes
    /// a token if so.
    pub fn admit(&self, key: &str, limit: RateLimit, now: Instant) -> bool {
        let mut buckets = self.buckets.lock().unwrap_or_else(|e| e.into_inner());
        if buckets.len() >= MAX_BUCKETS && !buckets.contains_key(key) {
            buckets.retain(|_, b| {
                b.refill(now);
                b.tokens < f64::from(b.limit.burst)
            });
        }
        let bucket = match buckets.get_mut(key) {
            Some(b) if b.limit == limit => b,
            _ => {
                buckets.insert(key.to_string(), Bucket::new(limit, now));
                buckets.get_mut(key).expect("inserted")
            }
        };
        bucket.refill(now);
        if bucket.tokens >= 1.0 {
            bucket.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn limit(requests: u32, burst: u32) -> RateLimit {
        RateLimit {
            requests,
            per: Duration::from_secs(1),
            burst,
        }
    }

    #[test]
    fn a_bucket_lets_its_burst_through_then_its_rate() {
        let limiter = Limiter::default();
        let t0 = Instant::now();
        let l = limit(10, 5);
        let admitted = (0..8).filter(|_| limiter.admit("r|s", l, t0)).count();
        assert_eq!(admitted, 5, "the burst");
        // 10 per second: one token every 100 ms.
        assert!(!limiter.admit("r|s", l, t0 + Duration::from_millis(50)));
        assert!(limiter.admit("r|s", l, t0 + Duration::from_millis(100)));
        assert!(!limiter.admit("r|s", l, t0 + Duration::from_millis(150)));
        // A long pause refills up to the burst, not beyond.
        let later = t0 + Duration::from_secs(60);
        let admitted = (0..8).filter(|_| limiter.admit("r|s", l, later)).count();
        assert_eq!(admitted, 5);
    }

    #[test]
    fn keys_have_their_own_buckets_and_a_changed_limit_starts_afresh() {
        let limiter = Limiter::default();
        let t0 = Instant::now();
        assert!(limiter.admit("r|a", limit(1, 1), t0));
        assert!(!limiter.admit("r|a", limit(1, 1), t0));
        assert!(limiter.admit("r|b", limit(1, 1), t0), "another Service");
        assert!(limiter.admit("r|a", limit(2, 2), t0), "a new limit");
    }

    #[test]
    fn full_buckets_are_pruned_when_many_are_kept() {
        let limiter = Limiter::default();
        let t0 = Instant::now();
        for i in 0..MAX_BUCKETS {
            limiter.admit(&format!("r|{i}"), limit(1, 1), t0);
        }
        let later = t0 + Duration::from_secs(10);
        assert!(limiter.admit("new", limit(1, 1), later));
        assert_eq!(limiter.buckets.lock().unwrap().len(), 1);
    }
}

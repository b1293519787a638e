//! Retries of the waypoint's upstream requests: when a try's outcome calls for another one
//! ([`RetryPolicy::should_retry`]), how long to wait first ([`RetryPolicy::backoff`]), and the
//! budget that keeps retries from multiplying an outage ([`Budgets`]). Pure decisions and
//! counters; the request path (`http`) does the sending, the waiting and the timeouts.
//!
//! **Conditions** follow Envoy's `retryOn` words, which Istio's `VirtualService` passes through
//! and to which Istio maps an `HTTPRoute`'s `retry`: a rule's `retry` retries its `codes`, and
//! connection errors (connect failure, refused stream, reset, a try's timeout), and the gRPC
//! statuses `unavailable` and `cancelled`, as Istio does.
//!
//! **Safe by default.** A try that may have reached the application (it got a response, was
//! reset after the request went out, or timed out) is retried only for an idempotent method
//! (RFC 9110 §9.2.2: GET, HEAD, OPTIONS, TRACE, PUT, DELETE); one that certainly did not (the
//! connection could not be made, the stream was refused) is retried for every method. A body is
//! replayed only when it is at most [`MAX_REPLAY_BODY`] bytes and its length is known before it
//! is read; a request with a larger body is sent once.
//!
//! **Backoff**: before retry *n* (1-based) the waypoint waits `b = min(base × 2ⁿ⁻¹, max)` plus a
//! random share of up to half of `b` (jitter); never less than the base, which Gateway API's
//! `backoff` defines as the least time between tries.
//!
//! **Budget** (Envoy's retry budget): per destination, the retries in flight (waiting or sent) may
//! be at most [`BUDGET_PERCENT`] % of the requests in flight with a retry policy, and at least
//! [`BUDGET_MIN_RETRIES`]; and never more than a DestinationRule's `maxRetries`. A retry beyond it is not made: the last try's answer goes to the
//! client, flagged `URX`.
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use http::{Method, StatusCode};

/// The largest request body kept to be sent again.
pub const MAX_REPLAY_BODY: u64 = 64 * 1024;
/// Retries in flight, as a share of the requests in flight, per destination.
pub const BUDGET_PERCENT: u32 = 20;
/// Retries in flight always allowed per destination, whatever the share.
pub const BUDGET_MIN_RETRIES: u32 = 3;
/// Envoy's default base interval, used when the configuration names none.
pub const DEFAULT_BACKOFF: Duration = Duration::from_millis(25);
/// Istio's default number of retries.
pub const DEFAULT_RETRIES: u32 = 2;

/// The conditions that call for another try.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RetryOn {
    /// `5xx`: any 5xx response, or no response at all (connect failure, reset, try timeout).
    pub server_error: bool,
    /// `gateway-error`: 502, 503, 504, or a try timeout.
    pub gateway_error: bool,
    /// `reset`: no response: the connection or stream ended or the try timed out.
    pub reset: bool,
    /// `reset-before-request`: the stream ended before the request was sent.
    pub reset_before_request: bool,
    /// `connect-failure`: no connection could be made.
    pub connect_failure: bool,
    /// `refused-stream`: the upstream refused the HTTP/2 stream (`REFUSED_STREAM`).
    pub refused_stream: bool,
    /// `retriable-4xx`: 409.
    pub retriable_4xx: bool,
    /// `retriable-status-codes` and plain codes.
    pub codes: Vec<u16>,
    /// gRPC statuses (`cancelled` 1, `deadline-exceeded` 4, `resource-exhausted` 8, `internal`
    /// 13, `unavailable` 14), read from a trailers-only answer's `grpc-status`.
    pub grpc: Vec<u32>,
}

/// How one try ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// A response's head came back.
    Response {
        status: StatusCode,
        grpc_status: Option<u32>,
    },
    /// No connection could be made to the backend.
    ConnectFailure,
    /// The upstream refused the stream: the request was not processed.
    RefusedStream,
    /// The connection or stream ended before the response's head came.
    Reset,
    /// The try's own timeout passed first.
    TryTimeout,
    /// A circuit breaker refused the try: never retried (it would only add load).
    Overflow,
}

impl Outcome {
    /// The request certainly did not reach the application.
    fn not_sent(self) -> bool {
        matches!(self, Outcome::ConnectFailure | Outcome::RefusedStream)
    }

    /// A short label for metrics and logs.
    pub fn reason(self) -> &'static str {
        match self {
            Outcome::Response { .. } => "status",
            Outcome::ConnectFailure => "connect_failure",
            Outcome::RefusedStream => "refused_stream",
            Outcome::Reset => "reset",
            Outcome::TryTimeout => "per_try_timeout",
            Outcome::Overflow => "overflow",
        }
    }
}

impl RetryOn {
    /// Whether `outcome` is one of the conditions.
    pub fn matches(&self, outcome: Outcome) -> bool {
        let no_response = self.server_error || self.reset;
        match outcome {
            Outcome::Response {
                status,
                grpc_status,
            } => {
                let code = status.as_u16();
                (self.server_error && status.is_server_error())
                    || (self.gateway_error && matches!(code, 502..=504))
                    || (self.retriable_4xx && code == 409)
                    || self.codes.contains(&code)
                    || grpc_status.is_some_and(|g| self.grpc.contains(&g))
            }
            Outcome::ConnectFailure => {
                no_response || self.connect_failure || self.reset_before_request
            }
            Outcome::RefusedStream => {
                no_response || self.refused_stream || self.reset_before_request
            }
            Outcome::Reset => no_response,
            Outcome::TryTimeout => no_response || self.gateway_error,
            Outcome::Overflow => false,
        }
    }
}

/// A route's retry policy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RetryPolicy {
    /// Tries after the first.
    pub retries: u32,
    /// The time one try may take to its response's head; `None`: only the request's timeout.
    pub per_try_timeout: Option<Duration>,
    pub on: RetryOn,
    /// The least wait before a retry; it doubles per retry up to `max_backoff`.
    pub backoff: Duration,
    pub max_backoff: Duration,
}

impl RetryPolicy {
    /// The policy of an `HTTPRoute` rule's `retry`, as Istio reads one: its `codes`, connection
    /// errors, gRPC `unavailable` and `cancelled`; `attempts` (default 2) retries; `backoff`
    /// (default 25 ms) the least wait; the rule's `backendRequest` timeout per try.
    pub fn for_http_route(
        codes: &[u16],
        attempts: Option<u32>,
        backoff: Option<Duration>,
        per_try_timeout: Option<Duration>,
    ) -> RetryPolicy {
        let backoff = backoff.filter(|b| !b.is_zero()).unwrap_or(DEFAULT_BACKOFF);
        RetryPolicy {
            retries: attempts.unwrap_or(DEFAULT_RETRIES),
            per_try_timeout: per_try_timeout.filter(|t| !t.is_zero()),
            on: RetryOn {
                reset: true,
                connect_failure: true,
                refused_stream: true,
                codes: codes.to_vec(),
                grpc: vec![1, 14],
                ..RetryOn::default()
            },
            backoff,
            max_backoff: backoff * 10,
        }
    }

    /// Whether the try that ended with `outcome` is to be followed by another, given that
    /// `retried` retries were made so far (the budget aside).
    pub fn should_retry(&self, method: &Method, outcome: Outcome, retried: u32) -> bool {
        retried < self.retries
            && self.on.matches(outcome)
            && (outcome.not_sent() || is_idempotent(method))
    }

    /// The wait before retry number `retry` (1-based), given `random` drawn uniformly: see the
    /// module comment.
    pub fn backoff(&self, retry: u32, random: u32) -> Duration {
        let doubled = self
            .backoff
            .saturating_mul(1u32 << retry.saturating_sub(1).min(20));
        let bound = doubled.min(self.max_backoff).max(self.backoff);
        bound + bound.mul_f64(f64::from(random) / f64::from(u32::MAX) / 2.0)
    }
}

/// RFC 9110 §9.2.2.
pub fn is_idempotent(method: &Method) -> bool {
    matches!(
        *method,
        Method::GET | Method::HEAD | Method::OPTIONS | Method::TRACE | Method::PUT | Method::DELETE
    )
}

// ---------------------------------------------------------------------------------------------
// Budget

/// In-flight counts of one destination.
#[derive(Debug, Default)]
pub struct Budget {
    requests: AtomicU32,
    retries: AtomicU32,
}

/// The retry budgets of every destination, keyed by the address a request is sent to.
#[derive(Debug, Default)]
pub struct Budgets {
    by_target: Mutex<HashMap<SocketAddr, Arc<Budget>>>,
}

/// Destinations kept before idle ones are pruned.
const MAX_TRACKED: usize = 1024;

impl Budgets {
    /// Counts a request with a retry policy to `target` in flight while the guard lives.
    pub fn request(&self, target: SocketAddr) -> InFlight {
        let mut map = self.by_target.lock().unwrap_or_else(|e| e.into_inner());
        if map.len() >= MAX_TRACKED && !map.contains_key(&target) {
            map.retain(|_, b| Arc::strong_count(b) > 1);
        }
        let budget = map.entry(target).or_default().clone();
        drop(map);
        budget.requests.fetch_add(1, Ordering::Relaxed);
        InFlight { budget }
    }

    /// How many destinations are tracked (for tests).
    #[cfg(test)]
    fn tracked(&self) -> usize {
        self.by_target.lock().unwrap().len()
    }
}

/// A request in flight; it may take retries from its destination's budget.
pub struct InFlight {
    budget: Arc<Budget>,
}

impl InFlight {
    /// A retry, if the budget has room (and fewer than `max` retries are in flight, a
    /// DestinationRule's `maxRetries`): held until the retry's try ends.
    pub fn retry(&self, max: Option<u32>) -> Option<RetryGuard> {
        let requests = self.budget.requests.load(Ordering::Relaxed);
        let allowed = (requests.saturating_mul(BUDGET_PERCENT) / 100)
            .max(BUDGET_MIN_RETRIES)
            .min(max.unwrap_or(u32::MAX));
        self.budget
            .retries
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < allowed).then_some(n + 1)
            })
            .ok()
            .map(|_| RetryGuard {
                budget: self.budget.clone(),
            })
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.budget.requests.fetch_sub(1, Ordering::Relaxed);
    }
}

/// A retry counted in flight.
pub struct RetryGuard {
    budget: Arc<Budget>,
}

impl Drop for RetryGuard {
    fn drop(&mut self) {
        self.budget.retries.fetch_sub(1, Ordering::AcqRel);
    }
}

#[cfg(test)]
mod tests;

//! Fault injection (Istio's `VirtualService` `http[].fault`): a share of requests is delayed
//! before it is forwarded, a share is answered by the waypoint with an error instead. Decided
//! per request with draws the caller passes in (pure); the delay runs before the route's
//! timeouts start, as Envoy's fault filter does before its router.
use std::time::Duration;

use http::StatusCode;

/// A rule's faults.
#[derive(Debug, Clone, PartialEq)]
pub struct Fault {
    /// The share of requests (0.0 to 1.0) delayed, and by how long.
    pub delay: Option<(f64, Duration)>,
    /// The share of requests aborted, and with what.
    pub abort: Option<(f64, AbortWith)>,
}

/// What an aborted request gets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AbortWith {
    /// This HTTP status, body `fault filter abort` (Envoy's).
    Status(StatusCode),
    /// A trailers-only gRPC answer with this `grpc-status`.
    Grpc(u32),
}

/// What one request draws.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Injected {
    pub delay: Option<Duration>,
    pub abort: Option<AbortWith>,
}

impl Fault {
    /// The faults of one request given two independent uniform draws.
    pub fn draw(&self, for_delay: u32, for_abort: u32) -> Injected {
        let hit = |share: f64, draw: u32| f64::from(draw) < share * (f64::from(u32::MAX) + 1.0);
        Injected {
            delay: self
                .delay
                .filter(|(share, _)| hit(*share, for_delay))
                .map(|(_, d)| d),
            abort: self
                .abort
                .filter(|(share, _)| hit(*share, for_abort))
                .map(|(_, a)| a),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shares_decide_by_the_draw() {
        let f = Fault {
            delay: Some((0.25, Duration::from_millis(5))),
            abort: Some((1.0, AbortWith::Status(StatusCode::BAD_GATEWAY))),
        };
        let quarter = u32::MAX / 4;
        assert_eq!(f.draw(0, 0).delay, Some(Duration::from_millis(5)));
        assert_eq!(f.draw(quarter - 1, 0).delay, Some(Duration::from_millis(5)));
        assert_eq!(f.draw(quarter + 2, 0).delay, None);
        assert_eq!(
            f.draw(0, u32::MAX).abort,
            Some(AbortWith::Status(StatusCode::BAD_GATEWAY)),
            "100 % aborts every request"
        );
        let never = Fault {
            delay: Some((0.0, Duration::from_secs(1))),
            abort: None,
        };
        assert_eq!(never.draw(0, 0), Injected::default(), "0 % never");
    }

    #[test]
    fn over_many_draws_the_share_holds() {
        let f = Fault {
            delay: None,
            abort: Some((0.1, AbortWith::Grpc(14))),
        };
        let n = 100_000u32;
        let step = u32::MAX / n;
        let aborted = (0..n)
            .filter(|i| f.draw(0, i * step).abort.is_some())
            .count();
        assert!((9_900..=10_100).contains(&aborted), "{aborted}");
    }
}

//! Log lines that may repeat thousands of times a second (a flood, an exhausted resource) are
//! written at most once per period; the metrics count every occurrence.
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

#[derive(Debug)]
pub struct LogEvery {
    period: Duration,
    born: Instant,
    /// Milliseconds since `born` of the last line, +1 (0: none yet).
    last: AtomicU64,
}

impl LogEvery {
    pub fn new(period: Duration) -> Self {
        LogEvery {
            period,
            born: Instant::now(),
            last: AtomicU64::new(0),
        }
    }

    /// Whether to write the line now; true for at most one caller per period.
    pub fn ready(&self) -> bool {
        let now = self.born.elapsed().as_millis() as u64 + 1;
        let last = self.last.load(Ordering::Relaxed);
        (last == 0 || now >= last + self.period.as_millis() as u64)
            && self
                .last
                .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn once_per_period() {
        let l = LogEvery::new(Duration::from_millis(50));
        assert!(l.ready());
        assert!(!l.ready());
        std::thread::sleep(Duration::from_millis(60));
        assert!(l.ready());
        assert!(!l.ready());
    }
}

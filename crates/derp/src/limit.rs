//! A log-line budget: at most `burst` lines per `period`, and a count of the lines that
//! were held back, so that a flood of bad input cannot flood the log.

use std::time::{Duration, Instant};

#[derive(Debug)]
pub struct LogLimiter {
    period: Duration,
    burst: u32,
    window: Option<Instant>,
    used: u32,
    suppressed: u64,
}

impl LogLimiter {
    pub fn new(period: Duration, burst: u32) -> Self {
        LogLimiter {
            period,
            burst,
            window: None,
            used: 0,
            suppressed: 0,
        }
    }

    /// `Some(n)` when a line may be logged now, `n` being how many were held back since
    /// the last one logged; `None` when this one must be held back.
    pub fn allow(&mut self, now: Instant) -> Option<u64> {
        let fresh = self
            .window
            .is_none_or(|start| now.saturating_duration_since(start) >= self.period);
        if fresh {
            self.window = Some(now);
            self.used = 0;
        }
        if self.used < self.burst {
            self.used += 1;
            Some(std::mem::take(&mut self.suppressed))
        } else {
            self.suppressed += 1;
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bursts_then_holds_back_and_reports_the_count() {
        let mut l = LogLimiter::new(Duration::from_secs(10), 3);
        let t = Instant::now();
        assert_eq!(l.allow(t), Some(0));
        assert_eq!(l.allow(t), Some(0));
        assert_eq!(l.allow(t), Some(0));
        for _ in 0..50 {
            assert_eq!(l.allow(t + Duration::from_secs(5)), None);
        }
        assert_eq!(l.allow(t + Duration::from_secs(10)), Some(50));
        assert_eq!(l.allow(t + Duration::from_secs(10)), Some(0));
    }
}

//! Budgets, without I/O (time passed in):
//! * [`LogLimiter`]: at most `burst` log lines per `period`, and a count of the lines
//!   that were held back, so that a flood of bad input cannot flood the log;
//! * [`KeyedBuckets`]: a token bucket per key (a source address, a pair of node keys),
//!   in a table of bounded size, so that one source spending its share leaves everyone
//!   else's untouched.

use std::collections::HashMap;
use std::hash::Hash;
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

#[derive(Debug, Clone, Copy)]
struct Bucket {
    tokens: f64,
    at: Instant,
}

/// A token bucket per key: `per_second` tokens a second, at most `burst` saved up.
/// At most `max_keys` keys are tracked: when a new key finds the table full, keys whose
/// bucket has refilled are forgotten (they lose nothing), and if none has, the table
/// starts over (a key loses at most the debt it had run up).
#[derive(Debug)]
pub struct KeyedBuckets<K> {
    buckets: HashMap<K, Bucket>,
    per_second: f64,
    burst: f64,
    max_keys: usize,
}

impl<K: Hash + Eq + Clone> KeyedBuckets<K> {
    pub fn new(per_second: f64, burst: f64, max_keys: usize) -> Self {
        KeyedBuckets {
            buckets: HashMap::new(),
            per_second,
            burst,
            max_keys: max_keys.max(1),
        }
    }

    /// Takes a token from `key`'s bucket at `now`; false when it has none left.
    pub fn take(&mut self, key: &K, now: Instant) -> bool {
        if self.buckets.len() >= self.max_keys && !self.buckets.contains_key(key) {
            let (per_second, burst) = (self.per_second, self.burst);
            self.buckets.retain(|_, b| {
                b.tokens + now.saturating_duration_since(b.at).as_secs_f64() * per_second < burst
            });
            if self.buckets.len() >= self.max_keys {
                self.buckets.clear();
            }
        }
        let b = self.buckets.entry(key.clone()).or_insert(Bucket {
            tokens: self.burst,
            at: now,
        });
        let elapsed = now.saturating_duration_since(b.at).as_secs_f64();
        b.tokens = (b.tokens + elapsed * self.per_second).min(self.burst);
        b.at = now;
        if b.tokens >= 1.0 {
            b.tokens -= 1.0;
            true
        } else {
            false
        }
    }

    /// Keys tracked now (at most `max_keys`).
    pub fn len(&self) -> usize {
        self.buckets.len()
    }

    pub fn is_empty(&self) -> bool {
        self.buckets.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_key_has_its_own_budget_and_the_table_stays_bounded() {
        let mut b = KeyedBuckets::new(10.0, 5.0, 4);
        let t = Instant::now();
        let (flood, other) = ("flood".to_string(), "other".to_string());
        assert_eq!((0..100).filter(|_| b.take(&flood, t)).count(), 5);
        assert!(b.take(&other, t));
        let later = t + Duration::from_millis(500);
        assert_eq!((0..100).filter(|_| b.take(&flood, later)).count(), 5);
        for i in 0..100 {
            assert!(b.take(&i.to_string(), later));
            assert!(b.len() <= 4);
        }
    }

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

//! Per-key submit rate limiting: a token bucket per API key, in memory (one server process;
//! a restart forgives everyone, which is harmless).
//!
//! Only accepted work spends the budget: the submit takes a token after the input is valid and
//! gives it back ([`RateLimiter::refund`]) when the store answers a replay or refuses the job.

use kiln_core::ids::KeyId;
use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Instant;

pub(crate) struct RateLimiter {
    /// Tokens added per second; 0 turns limiting off.
    refill_per_s: f64,
    capacity: f64,
    /// One bucket per key that has submitted; keys are few (an operator creates them).
    buckets: Mutex<HashMap<KeyId, Bucket>>,
}

struct Bucket {
    tokens: f64,
    refilled_at: Instant,
}

impl RateLimiter {
    pub(crate) fn new(per_minute: u32, burst: u32) -> Self {
        Self {
            refill_per_s: f64::from(per_minute) / 60.0,
            // A burst of 0 would refuse everything; one request at a time is the least.
            capacity: f64::from(burst.max(1)),
            buckets: Mutex::new(HashMap::new()),
        }
    }

    /// Takes one token from `key`'s bucket, or says in how many whole seconds one will be there.
    pub(crate) fn take(&self, key: KeyId, now: Instant) -> Result<(), u64> {
        if self.refill_per_s == 0.0 {
            return Ok(());
        }
        let mut buckets = self
            .buckets
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        let bucket = buckets.entry(key).or_insert(Bucket {
            tokens: self.capacity,
            refilled_at: now,
        });
        let elapsed = now
            .saturating_duration_since(bucket.refilled_at)
            .as_secs_f64();
        bucket.tokens = (bucket.tokens + elapsed * self.refill_per_s).min(self.capacity);
        bucket.refilled_at = now;
        if bucket.tokens >= 1.0 {
            bucket.tokens -= 1.0;
            Ok(())
        } else {
            let wait_s = ((1.0 - bucket.tokens) / self.refill_per_s).ceil();
            Err((wait_s as u64).max(1))
        }
    }

    /// Gives back a token [`Self::take`] gave `key`, for a submit that queued nothing new (a
    /// replay of an `Idempotency-Key`, or one the store refused).
    pub(crate) fn refund(&self, key: KeyId) {
        if self.refill_per_s == 0.0 {
            return;
        }
        let mut buckets = self
            .buckets
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        if let Some(bucket) = buckets.get_mut(&key) {
            bucket.tokens = (bucket.tokens + 1.0).min(self.capacity);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn a_burst_passes_then_the_rate_applies() {
        let limiter = RateLimiter::new(60, 3);
        let (key, t0) = (KeyId::new(), Instant::now());
        for _ in 0..3 {
            assert_eq!(limiter.take(key, t0), Ok(()));
        }
        assert_eq!(limiter.take(key, t0), Err(1));
        assert_eq!(limiter.take(key, t0 + Duration::from_millis(500)), Err(1));
        assert_eq!(limiter.take(key, t0 + Duration::from_secs(1)), Ok(()));
        assert_eq!(limiter.take(key, t0 + Duration::from_secs(1)), Err(1));
    }

    #[test]
    fn retry_after_reflects_a_slow_rate_and_buckets_are_per_key() {
        // One token every 2 s (binary-exact rates keep the arithmetic exact).
        let limiter = RateLimiter::new(30, 1);
        let (a, b, t0) = (KeyId::new(), KeyId::new(), Instant::now());
        assert_eq!(limiter.take(a, t0), Ok(()));
        assert_eq!(limiter.take(a, t0), Err(2));
        assert_eq!(limiter.take(b, t0), Ok(()));
        assert_eq!(limiter.take(a, t0 + Duration::from_secs(1)), Err(1));
        assert_eq!(limiter.take(a, t0 + Duration::from_secs(2)), Ok(()));
    }

    #[test]
    fn the_bucket_never_holds_more_than_the_burst() {
        let limiter = RateLimiter::new(60, 2);
        let (key, t0) = (KeyId::new(), Instant::now());
        let later = t0 + Duration::from_secs(3600);
        assert_eq!(limiter.take(key, later), Ok(()));
        assert_eq!(limiter.take(key, later), Ok(()));
        assert_eq!(limiter.take(key, later), Err(1));
    }

    #[test]
    fn a_refund_gives_a_token_back_up_to_the_burst() {
        let limiter = RateLimiter::new(60, 2);
        let (key, t0) = (KeyId::new(), Instant::now());
        assert_eq!(limiter.take(key, t0), Ok(()));
        assert_eq!(limiter.take(key, t0), Ok(()));
        limiter.refund(key);
        assert_eq!(limiter.take(key, t0), Ok(()));
        assert_eq!(limiter.take(key, t0), Err(1));
        // Never above the burst, whatever is refunded.
        let other = KeyId::new();
        assert_eq!(limiter.take(other, t0), Ok(()));
        for _ in 0..5 {
            limiter.refund(other);
        }
        assert_eq!(limiter.take(other, t0), Ok(()));
        assert_eq!(limiter.take(other, t0), Ok(()));
        assert_eq!(limiter.take(other, t0), Err(1));
    }

    #[test]
    fn zero_turns_it_off() {
        let limiter = RateLimiter::new(0, 0);
        let (key, t0) = (KeyId::new(), Instant::now());
        for _ in 0..1000 {
            assert_eq!(limiter.take(key, t0), Ok(()));
        }
    }
}

//! The write rate of one account (`KEYRACK_WRITE_RATE`, writes per minute): a token bucket per
//! user id, in memory. A write over the rate answers 429 `too_many_requests` with `Retry-After`,
//! so that one account working flat out cannot fill the disk with the events of its writes (the
//! events of reads are folded instead: `store::fold`; reads are never refused for their rate, a
//! service reads for thousands of users).
//!
//! A bucket holds up to a minute's writes (a burst of that many passes at once) and refills at
//! the rate. Buckets that have refilled completely are forgotten (they are the same as no
//! bucket), so the map holds only the accounts that wrote within the last minute.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Instant;

use crate::lock;

/// Buckets kept before the full ones are swept out.
const SWEEP_AT: usize = 4096;

pub(crate) struct WriteRate {
    per_minute: u32,
    buckets: Mutex<HashMap<i64, Bucket>>,
}

#[derive(Debug, Clone, Copy)]
struct Bucket {
    /// Writes left, fractional while refilling.
    tokens: f64,
    at: Instant,
}

impl WriteRate {
    pub(crate) fn new(per_minute: u32) -> WriteRate {
        WriteRate {
            per_minute: per_minute.max(1),
            buckets: Mutex::new(HashMap::new()),
        }
    }

    /// Takes one write of `user` at `now`: `Ok`, or `Err(seconds)` to wait before the next one
    /// passes (at least 1).
    pub(crate) fn take(&self, user: i64, now: Instant) -> Result<(), u64> {
        let capacity = f64::from(self.per_minute);
        let per_sec = capacity / 60.0;
        let mut buckets = lock(&self.buckets);
        if buckets.len() >= SWEEP_AT {
            buckets.retain(|_, b| {
                b.tokens + now.saturating_duration_since(b.at).as_secs_f64() * per_sec < capacity
            });
        }
        let b = buckets.entry(user).or_insert(Bucket {
            tokens: capacity,
            at: now,
        });
        let elapsed = now.saturating_duration_since(b.at).as_secs_f64();
        b.tokens = (b.tokens + elapsed * per_sec).min(capacity);
        b.at = now;
        if b.tokens >= 1.0 {
            b.tokens -= 1.0;
            Ok(())
        } else {
            Err(((1.0 - b.tokens) / per_sec).ceil().max(1.0) as u64)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn a_burst_of_a_minute_then_the_rate_per_account() {
        let r = WriteRate::new(60);
        let t = Instant::now();
        for _ in 0..60 {
            assert_eq!(r.take(1, t), Ok(()));
        }
        assert_eq!(r.take(1, t), Err(1));
        // Another account has its own bucket.
        assert_eq!(r.take(2, t), Ok(()));
        // One write a second refills.
        assert_eq!(r.take(1, t + Duration::from_millis(1000)), Ok(()));
        assert_eq!(r.take(1, t + Duration::from_millis(1500)), Err(1));
        let slow = WriteRate::new(2);
        assert_eq!(slow.take(1, t), Ok(()));
        assert_eq!(slow.take(1, t), Ok(()));
        assert_eq!(slow.take(1, t), Err(30));
        assert_eq!(slow.take(1, t + Duration::from_secs(30)), Ok(()));
    }

    #[test]
    fn full_buckets_are_forgotten() {
        let r = WriteRate::new(60);
        let t = Instant::now();
        for user in 0..SWEEP_AT as i64 {
            r.take(user, t).unwrap();
        }
        let later = t + Duration::from_secs(2);
        r.take(-1, later).unwrap();
        assert_eq!(lock(&r.buckets).len(), 1);
    }
}

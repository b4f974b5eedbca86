//! One rate limit for everything a migration sends to the destination: memory frames (on
//! any connection) and disk frames draw from the same token bucket, so `--max-bandwidth`
//! bounds the link use of the whole migration, whatever its parts do at the moment.
//!
//! Owns the bucket only; the senders call [`RateLimit::take`] with the bytes they are about
//! to write.

use std::sync::Mutex;
use std::time::{Duration, Instant};

/// A token bucket of `rate` bytes/s holding at most 50 ms of tokens (at least 256 KiB).
/// A sender may go into debt: it then waits until the debt is paid off, so one large
/// write is never refused, only spaced out.
#[derive(Debug)]
pub struct RateLimit {
    state: Mutex<Bucket>,
}

#[derive(Debug)]
struct Bucket {
    rate: f64,
    burst: f64,
    tokens: f64,
    at: Instant,
}

impl Bucket {
    /// Adds what the rate earned since the last look, up to the burst.
    fn refill(&mut self, now: Instant) {
        let earned = now.duration_since(self.at).as_secs_f64() * self.rate;
        self.tokens = (self.tokens + earned).min(self.burst);
        self.at = now;
    }
}

fn burst_of(rate: f64) -> f64 {
    (rate * 0.05).max(256.0 * 1024.0)
}

impl RateLimit {
    pub fn new(bytes_per_sec: u64) -> Self {
        let rate = bytes_per_sec.max(1) as f64;
        let burst = burst_of(rate);
        RateLimit {
            state: Mutex::new(Bucket {
                rate,
                burst,
                tokens: burst,
                at: Instant::now(),
            }),
        }
    }

    fn bucket(&self) -> std::sync::MutexGuard<'_, Bucket> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn bytes_per_sec(&self) -> u64 {
        self.bucket().rate as u64
    }

    /// A new rate from now on (the bandwidth controller's); a debt already run up is paid
    /// at the new rate.
    pub fn set_rate(&self, bytes_per_sec: u64) {
        let mut b = self.bucket();
        b.refill(Instant::now());
        b.rate = bytes_per_sec.max(1) as f64;
        b.burst = burst_of(b.rate);
        b.tokens = b.tokens.min(b.burst);
    }

    /// Charges `n` bytes; returns how long the caller must wait before writing them.
    pub fn charge(&self, n: u64) -> Duration {
        let mut b = self.bucket();
        b.refill(Instant::now());
        b.tokens -= n as f64;
        if b.tokens >= 0.0 {
            Duration::ZERO
        } else {
            Duration::from_secs_f64(-b.tokens / b.rate)
        }
    }

    /// Charges `n` bytes and waits for them.
    pub async fn take(&self, n: u64) {
        let wait = self.charge(n);
        if !wait.is_zero() {
            tokio::time::sleep(wait).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn two_senders_share_one_rate() {
        let r = RateLimit::new(1 << 20); // 1 MiB/s, 256 KiB burst
        assert_eq!(r.charge(256 << 10), Duration::ZERO);
        // the next MiB from either sender waits about a second in total
        let a = r.charge(512 << 10);
        let b = r.charge(512 << 10);
        assert!(a.as_secs_f64() > 0.45 && a.as_secs_f64() < 0.55, "{a:?}");
        assert!(b.as_secs_f64() > 0.95 && b.as_secs_f64() < 1.05, "{b:?}");
    }

    #[test]
    fn idle_time_refills_only_up_to_the_burst() {
        let r = RateLimit::new(10 << 20);
        std::thread::sleep(Duration::from_millis(120));
        // 50 ms of 10 MiB/s = 512 KiB at most, not 1.2 MiB
        assert_eq!(r.charge(512 << 10), Duration::ZERO);
        assert!(r.charge(512 << 10) > Duration::from_millis(40));
    }

    #[test]
    fn a_new_rate_applies_from_now() {
        let r = RateLimit::new(1 << 20);
        assert_eq!(r.charge(256 << 10), Duration::ZERO);
        r.set_rate(10 << 20);
        assert_eq!(r.bytes_per_sec(), 10 << 20);
        // 1 MiB at 10 MiB/s: about 100 ms, not a second
        let w = r.charge(1 << 20);
        assert!(
            w > Duration::from_millis(80) && w < Duration::from_millis(120),
            "{w:?}"
        );
        // no limit in effect: nothing waits
        r.set_rate(u64::MAX);
        std::thread::sleep(Duration::from_millis(2));
        assert_eq!(r.charge(1 << 20), Duration::ZERO);
    }
}

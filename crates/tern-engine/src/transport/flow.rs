//! Flow control between the two QEMUs (v2): the destination reports how much of the stream
//! it has written to its QEMU (`Applied`); the source keeps what is in flight under a
//! window sized from the measured end-to-end rate and the round trip.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// Flow control (v2): the destination reports how much of the stream it has written to
/// its QEMU; the source keeps what is in flight under a window of about 1.5 x the
/// end-to-end rate x (round trip + 5 ms). Without it, tern's queues (and the expansion
/// of references at the destination) would hide the real rate from QEMU, which would then
/// stop the VM with seconds of data still on its way.
pub struct Flow {
    pub applied: AtomicU64,
    pub notify: tokio::sync::Notify,
    /// Set before a switchover the source starts itself (post-copy): the forwarder keeps
    /// only about one round trip of the link in flight ([`Window::drained_size`]), since
    /// everything in flight goes before QEMU's device state; cleared once that went.
    pub drain: AtomicBool,
    /// Raised by the forwarder once what is in flight is down to the drained size.
    pub drained: tokio::sync::Notify,
}

impl Flow {
    pub fn new() -> Self {
        Flow {
            applied: AtomicU64::new(0),
            notify: tokio::sync::Notify::new(),
            drain: AtomicBool::new(false),
            drained: tokio::sync::Notify::new(),
        }
    }

    /// Asks the forwarder to drain what is in flight and waits until it did, at most
    /// `max`; whether it did. (Left on: the forwarder ends it when the switchover's
    /// bytes went.)
    pub async fn drain_before(&self, max: Duration) -> bool {
        self.drain.store(true, Ordering::SeqCst);
        tokio::time::timeout(max, self.drained.notified())
            .await
            .is_ok()
    }
}

/// The window of [`Flow`], from the measured rate of the destination's progress.
pub struct Window {
    rtt: Duration,
    since: Instant,
    applied_then: u64,
    rate: f64,
}

impl Window {
    const MIN: u64 = 2 << 20;
    /// Time beyond the round trip the window covers: the pipeline's own jitter. Whatever
    /// is in flight when QEMU stops the VM drains inside the downtime, so no more than
    /// this (20 ms gave 84 ms of idle-guest downtime on loopback, 5 ms 49 ms, with the
    /// same throughput).
    const SLACK: Duration = Duration::from_millis(5);
    const MAX: u64 = tern_proto::limits::MAX_FLOW_WINDOW;
    /// The least of the drained window: what a destination may hold back of its count
    /// (so a drained source never waits on a report that does not come), and a few
    /// batches, so the pipeline is never empty.
    const DRAINED_MIN: u64 = tern_proto::limits::APPLIED_EVERY;

    pub fn new(rtt: Duration) -> Self {
        Window {
            rtt,
            since: Instant::now(),
            applied_then: 0,
            rate: 0.0,
        }
    }

    pub fn size(&mut self, applied: u64) -> u64 {
        self.measure(applied);
        if self.rate == 0.0 {
            return 8 << 20; // until the first measurement
        }
        let w = 1.5 * self.rate * (self.rtt + Self::SLACK).as_secs_f64();
        (w as u64).clamp(Self::MIN, Self::MAX)
    }

    /// The window while draining ([`Flow::drain`]): one round trip (plus the slack) of the
    /// measured rate, at least [`Self::DRAINED_MIN`]: the link stays busy, and no more
    /// waits in front of what comes next. Only for moments: held long, a rate that falls
    /// would shrink it further.
    pub fn drained_size(&mut self, applied: u64) -> u64 {
        self.measure(applied);
        let w = self.rate * (self.rtt + Self::SLACK).as_secs_f64();
        (w as u64).clamp(Self::DRAINED_MIN, Self::MIN)
    }

    fn measure(&mut self, applied: u64) {
        let dt = self.since.elapsed().as_secs_f64();
        if dt >= 0.2 {
            let r = (applied - self.applied_then) as f64 / dt;
            self.rate = if self.rate == 0.0 {
                r
            } else {
                0.5 * self.rate + 0.5 * r
            };
            self.since = Instant::now();
            self.applied_then = applied;
        }
    }
}

impl Default for Flow {
    fn default() -> Self {
        Flow::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn window(rtt_ms: u64, rate: f64) -> Window {
        Window {
            rtt: Duration::from_millis(rtt_ms),
            since: Instant::now(),
            applied_then: 0,
            rate,
        }
    }

    #[test]
    fn the_drained_window_is_one_round_trip_of_the_rate_within_its_bounds() {
        // 10 MB/s over 50 ms (+5 ms of slack): 550 kB, where the normal window keeps the
        // 2 MiB floor
        let mut w = window(50, 10e6);
        assert_eq!(w.drained_size(0), 550_000);
        assert_eq!(w.size(0), Window::MIN);
        // a slow link: never below what a destination may hold back of its count
        assert_eq!(window(50, 1e3).drained_size(0), Window::DRAINED_MIN);
        // a fast one: never above the normal window's floor
        assert_eq!(window(50, 1e9).drained_size(0), Window::MIN);
        // before any measurement: the floor, not the first guess of 8 MiB
        assert_eq!(window(50, 0.0).drained_size(0), Window::DRAINED_MIN);
    }

    #[tokio::test]
    async fn drain_before_returns_when_the_forwarder_says_drained_and_times_out_otherwise() {
        let f = Flow::new();
        assert!(!f.drain_before(Duration::from_millis(20)).await);
        assert!(f.drain.load(Ordering::SeqCst), "left on for the forwarder");
        f.drained.notify_one();
        assert!(f.drain_before(Duration::from_secs(5)).await);
    }
}

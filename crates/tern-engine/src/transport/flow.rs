//! Flow control between the two QEMUs (v2): the destination reports how much of the stream
//! it has written to its QEMU (`Applied`); the source keeps what is in flight under a
//! window sized from the measured end-to-end rate and the round trip.

use std::sync::atomic::AtomicU64;
use std::time::{Duration, Instant};

/// Flow control (v2): the destination reports how much of the stream it has written to
/// its QEMU; the source keeps what is in flight under a window of about 1.5 x the
/// end-to-end rate x (round trip + 5 ms). Without it, tern's queues (and the expansion
/// of references at the destination) would hide the real rate from QEMU, which would then
/// stop the VM with seconds of data still on its way.
pub struct Flow {
    pub applied: AtomicU64,
    pub notify: tokio::sync::Notify,
}

impl Flow {
    pub fn new() -> Self {
        Flow {
            applied: AtomicU64::new(0),
            notify: tokio::sync::Notify::new(),
        }
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

    pub fn new(rtt: Duration) -> Self {
        Window {
            rtt,
            since: Instant::now(),
            applied_then: 0,
            rate: 0.0,
        }
    }

    pub fn size(&mut self, applied: u64) -> u64 {
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
        if self.rate == 0.0 {
            return 8 << 20; // until the first measurement
        }
        let w = 1.5 * self.rate * (self.rtt + Self::SLACK).as_secs_f64();
        (w as u64).clamp(Self::MIN, Self::MAX)
    }
}

impl Default for Flow {
    fn default() -> Self {
        Flow::new()
    }
}

//! Flow control between the two QEMUs (v2): the destination reports how much of the stream
//! it has written to its QEMU (`Applied`); the source keeps what is in flight under a
//! window sized from the measured end-to-end rate and the round trip.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// Flow control (v2): the destination reports how much of the stream it has written to
/// its QEMU; the source keeps what is in flight under a window of about 1.5 x the
/// end-to-end rate x (round trip + 5 ms). Without it, tern's queues (and the expansion
/// of references at the destination) would hide the real rate from QEMU, which would then
/// stop the VM with seconds of data still on its way. Before post-copy and while it runs
/// the window is smaller still ([`Window::drained_size`], [`Window::postcopy_size`]).
pub struct Flow {
    pub applied: AtomicU64,
    pub notify: tokio::sync::Notify,
    /// Set before a switchover the source starts itself (post-copy): the forwarder keeps
    /// only about one round trip of the link in flight ([`Window::drained_size`]), since
    /// everything in flight goes before QEMU's device state; cleared once that went, or
    /// when QEMU stopped the VM or left pre-copy.
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

    /// Asks the forwarder to drain what is in flight ([`Flow::drained`] says when it did).
    /// The forwarder ends it when the switchover's bytes went; [`Flow::end_drain`] too.
    pub fn start_drain(&self) {
        self.drain.store(true, Ordering::SeqCst);
    }

    pub fn end_drain(&self) {
        self.drain.store(false, Ordering::SeqCst);
    }

    /// Returns once the forwarder drained what is in flight (after [`Flow::start_drain`]).
    pub async fn drained(&self) {
        self.drained.notified().await
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
    /// Post-copy: what a faulting page may wait behind, beyond the round trip.
    const POSTCOPY_QUEUE: Duration = Duration::from_millis(50);

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

    /// The window while draining ([`Flow::drain`]): one round trip (plus the slack) of
    /// `link`, between [`Self::DRAINED_MIN`] and [`Self::MIN`]: little waits in front of
    /// what comes next, and the link stays about busy (at 2 MiB per round trip at most: a
    /// fast link with a long round trip runs below its rate meanwhile).
    ///
    /// `link`: the stream rate the link carries, as the sender measured it (0: unknown,
    /// then the rate of `Applied`). Not the rate of `Applied` first: a window that limits
    /// the flow measures only itself, and a round trip longer than the one measured at the
    /// start would shrink it step by step.
    pub fn drained_size(&mut self, applied: u64, link: f64) -> u64 {
        self.measure(applied);
        let w = self.base(link) * (self.rtt + Self::SLACK).as_secs_f64();
        (w as u64).clamp(Self::DRAINED_MIN, Self::MIN)
    }

    fn base(&self, link: f64) -> f64 {
        if link > 0.0 {
            link
        } else {
            self.rate
        }
    }

    /// The window while post-copy runs: a page the destination's guest waits for comes
    /// behind whatever is in flight, so no more than about [`Self::POSTCOPY_QUEUE`] of
    /// `link` (as for [`Self::drained_size`]) beyond the round trip (never more than
    /// [`Self::size`], never less than [`Self::DRAINED_MIN`]). It holds that rate as long
    /// as the pipeline's own delay stays under that time.
    pub fn postcopy_size(&mut self, applied: u64, link: f64) -> u64 {
        let normal = self.size(applied);
        let base = self.base(link);
        if base == 0.0 {
            return normal.min(Self::MIN);
        }
        let w = base * (self.rtt + Self::POSTCOPY_QUEUE).as_secs_f64();
        (w as u64).max(Self::DRAINED_MIN).min(normal)
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
        assert_eq!(w.drained_size(0, 0.0), 550_000);
        assert_eq!(w.size(0), Window::MIN);
        // a slow link: never below what a destination may hold back of its count
        assert_eq!(window(50, 1e3).drained_size(0, 0.0), Window::DRAINED_MIN);
        // a fast one: never above the normal window's floor
        assert_eq!(window(50, 1e9).drained_size(0, 0.0), Window::MIN);
        // before any measurement: the floor, not the first guess of 8 MiB
        assert_eq!(window(50, 0.0).drained_size(0, 0.0), Window::DRAINED_MIN);
    }

    #[test]
    fn the_postcopy_window_keeps_50_ms_beyond_the_round_trip_and_never_grows_the_normal_one() {
        // 12.5 MB/s over 50 ms: 1.25 MB instead of the 2 MiB floor
        assert_eq!(window(50, 12.5e6).postcopy_size(0, 0.0), 1_250_000);
        // 4 MiB/s on loopback: the least, 256 KiB (the normal window: 2 MiB, 500 ms)
        assert_eq!(
            window(0, 4.0 * 1048576.0).postcopy_size(0, 0.0),
            Window::DRAINED_MIN
        );
        // a fast LAN: the normal window (1.5 x 1 GB/s x 5.2 ms) is the smaller
        let mut lan = Window {
            rtt: Duration::from_micros(200),
            ..window(0, 1e9)
        };
        let normal = lan.size(0);
        assert_eq!(lan.postcopy_size(0, 0.0), normal);
        assert_eq!(window(50, 0.0).postcopy_size(0, 0.0), Window::MIN);
        // a rate of Applied that fell (a longer round trip, the window limiting itself)
        // does not shrink them: the link's rate as the sender saw it sizes them
        let mut fell = window(50, 1e6);
        assert_eq!(fell.postcopy_size(0, 12.5e6), 1_250_000);
        assert_eq!(fell.drained_size(0, 12.5e6), 687_500);
    }

    #[tokio::test]
    async fn drained_returns_once_the_forwarder_said_so_even_before_it_was_awaited() {
        let f = Flow::new();
        f.start_drain();
        assert!(f.drain.load(Ordering::SeqCst));
        let quiet = tokio::time::timeout(Duration::from_millis(20), f.drained()).await;
        assert!(quiet.is_err(), "nothing said yet");
        // the forwarder's word, kept until the source looks
        f.drained.notify_one();
        tokio::time::timeout(Duration::from_secs(5), f.drained())
            .await
            .expect("drained");
        f.end_drain();
        assert!(!f.drain.load(Ordering::SeqCst));
    }
}

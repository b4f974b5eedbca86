//! Which data path pages take, re-decided as the migration runs: **lean** (every page's
//! bytes as they are; nothing hashed, kept or compared: the cheapest per page) or
//! **dedup** (references to content the destination holds, deltas against the version
//! it has, every page hashed and kept on both sides: the fewest bytes). Dedup pays only
//! when the link is the bottleneck; on a fast link its per-page work is what limits.
//!
//! Like the compression picker, it measures instead of guessing: it starts with what the
//! round trip suggests (dedup from [`DataPathPicker::WAN_RTT`] up, lean below), measures
//! how fast QEMU's stream goes through (stream bytes per second) for a window, then every
//! [`DataPathPicker::PROBE_EVERY`] (backing off to [`DataPathPicker::PROBE_MAX`] while
//! probes lose), where the other path could win (dedup while the link is the bottleneck,
//! lean while it is not), tries it for a window and keeps whichever moved the stream
//! faster: the current one unless the other was at least 25% faster ([`DataPathPicker::WIN`]),
//! so that the stream's own swings (a guest's dirtying, a destination faulting in fresh
//! memory) do not flip it, and a tie keeps what the link suggested. Where the link is the
//! bottleneck, dedup is typically several times faster, not 25%.

use std::time::{Duration, Instant};

/// What the operator asked for (`dedup` in the migrate request).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DataPathPolicy {
    /// Measured and re-decided (the default).
    Auto,
    /// Always lean (`dedup: false`).
    Lean,
    /// Always dedup (`dedup: true`).
    Dedup,
}

impl DataPathPolicy {
    pub fn from_request(dedup: Option<bool>) -> Self {
        match dedup {
            None => DataPathPolicy::Auto,
            Some(false) => DataPathPolicy::Lean,
            Some(true) => DataPathPolicy::Dedup,
        }
    }
}

#[derive(Debug, Clone, Copy)]
enum State {
    /// Measuring the current path from (`since`, `units`) on.
    Measure { since: Instant, units: u64 },
    /// Trying the other path: settling until `settle`, then measuring it.
    Probe {
        current_rate: f64,
        settle: Instant,
        since: Option<(Instant, u64)>,
    },
}

/// Picks lean or dedup for one outgoing migration.
pub struct DataPathPicker {
    policy: DataPathPolicy,
    dedup: bool,
    state: State,
    last_probe: Instant,
    /// Time between probes: [`DataPathPicker::PROBE_EVERY`], doubled after each probe the
    /// other path lost (up to [`DataPathPicker::PROBE_MAX`]), so a path that keeps losing
    /// costs less and less.
    probe_every: Duration,
    pub switches: u32,
}

impl DataPathPicker {
    /// From this round trip up, a link is taken for a WAN: dedup first.
    pub const WAN_RTT: Duration = Duration::from_millis(10);
    /// How long a window measures a path.
    pub const WINDOW: Duration = Duration::from_millis(1000);
    /// How long a switched path runs before it is measured (queues drain).
    pub const SETTLE: Duration = Duration::from_millis(250);
    /// How often the other path is tried at first.
    pub const PROBE_EVERY: Duration = Duration::from_secs(4);
    /// How much faster the other path must move the stream to be taken.
    pub const WIN: f64 = 1.25;
    /// The longest time between two probes.
    pub const PROBE_MAX: Duration = Duration::from_secs(32);

    pub fn new(policy: DataPathPolicy, rtt: Duration, now: Instant) -> Self {
        let dedup = match policy {
            DataPathPolicy::Auto => rtt >= Self::WAN_RTT,
            DataPathPolicy::Lean => false,
            DataPathPolicy::Dedup => true,
        };
        DataPathPicker {
            policy,
            dedup,
            state: State::Measure {
                since: now,
                units: 0,
            },
            last_probe: now,
            probe_every: Self::PROBE_EVERY,
            switches: 0,
        }
    }

    /// Whether pages go the dedup way now (during a probe: the path being tried).
    pub fn dedup(&self) -> bool {
        self.dedup
    }

    /// The path decided on (during a probe: the one it will come back to unless the
    /// probe wins): `lean` or `dedup`.
    pub fn name(&self) -> &'static str {
        let probing = matches!(self.state, State::Probe { .. });
        if self.dedup != probing {
            "dedup"
        } else {
            "lean"
        }
    }

    /// Told as the stream goes through (`units`: stream bytes forwarded so far;
    /// `link_bound`: the sender mostly waits for the link); returns whether the path
    /// changed (for a probe or for good). A probe runs only where the other path could
    /// win: dedup only while the link is the bottleneck (it saves bytes, not CPU), lean
    /// only while it is not (across a WAN a lean probe would send as bytes what dedup
    /// sends as references).
    pub fn tick(&mut self, units: u64, now: Instant, link_bound: bool) -> bool {
        if self.policy != DataPathPolicy::Auto {
            return false;
        }
        match self.state {
            State::Measure { since, units: u0 } => {
                let dt = now.saturating_duration_since(since);
                if dt < Self::WINDOW {
                    return false;
                }
                let rate = units.saturating_sub(u0) as f64 / dt.as_secs_f64();
                let could_win = link_bound != self.dedup;
                if now.saturating_duration_since(self.last_probe) >= self.probe_every
                    && rate > 0.0
                    && could_win
                {
                    self.last_probe = now;
                    self.dedup = !self.dedup;
                    self.state = State::Probe {
                        current_rate: rate,
                        settle: now + Self::SETTLE,
                        since: None,
                    };
                    return true;
                }
                self.state = State::Measure { since: now, units };
                false
            }
            State::Probe {
                current_rate,
                settle,
                since,
            } => {
                if now < settle {
                    return false;
                }
                let Some((t0, u0)) = since else {
                    self.state = State::Probe {
                        current_rate,
                        settle,
                        since: Some((now, units)),
                    };
                    return false;
                };
                let dt = now.saturating_duration_since(t0);
                if dt < Self::WINDOW {
                    return false;
                }
                let probed = units.saturating_sub(u0) as f64 / dt.as_secs_f64();
                self.state = State::Measure { since: now, units };
                self.last_probe = now;
                if probed >= Self::WIN * current_rate {
                    self.probe_every = Self::PROBE_EVERY;
                    tracing::info!(
                        to = self.name(),
                        probed_mbps = probed * 8e-6,
                        was_mbps = current_rate * 8e-6,
                        "data path changed"
                    );
                    self.switches += 1;
                    false
                } else {
                    self.dedup = !self.dedup; // back to what was faster
                    self.probe_every = (self.probe_every * 2).min(Self::PROBE_MAX);
                    true
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Runs the picker over `secs` of a migration whose stream moves at `rate(dedup)`
    /// bytes per second, ticking every 10 ms; returns the fraction of time spent deduping.
    fn run(
        p: &mut DataPathPicker,
        t0: Instant,
        secs: f64,
        rate: impl Fn(bool) -> f64,
        link_bound: bool,
    ) -> f64 {
        let mut units = 0.0;
        let mut dedup_time = 0.0;
        let step = 0.01;
        let mut t = 0.0;
        while t < secs {
            let d = p.dedup();
            units += rate(d) * step;
            if d {
                dedup_time += step;
            }
            t += step;
            p.tick(units as u64, t0 + Duration::from_secs_f64(t), link_bound);
        }
        dedup_time / secs
    }

    #[test]
    fn a_fast_link_keeps_the_lean_path_and_a_slow_one_moves_to_dedup() {
        let t0 = Instant::now();
        // loopback: dedup's per-page work makes the stream slower
        let mut p = DataPathPicker::new(DataPathPolicy::Auto, Duration::ZERO, t0);
        assert!(!p.dedup());
        // (a receiver slow enough to block the socket: the probes find dedup slower)
        let share = run(&mut p, t0, 60.0, |d| if d { 200e6 } else { 300e6 }, true);
        assert!(!p.dedup() && p.switches == 0, "{share}");
        assert_eq!(p.name(), "lean");
        // probes at 5 s, 14 s, 31 s (backing off), 1.25 s each
        assert!(share < 0.1, "probes only: {share}");
        // a link that is the bottleneck, where dedup sends a third of the bytes
        let mut p = DataPathPicker::new(DataPathPolicy::Auto, Duration::ZERO, t0);
        run(&mut p, t0, 30.0, |d| if d { 30e6 } else { 12e6 }, true);
        assert!(p.dedup());
        assert_eq!(p.switches, 1);
        // a link that never blocks: dedup is not even tried
        let mut p = DataPathPicker::new(DataPathPolicy::Auto, Duration::ZERO, t0);
        let share = run(&mut p, t0, 30.0, |d| if d { 30e6 } else { 12e6 }, false);
        assert!(!p.dedup() && share == 0.0, "{share}");
    }

    #[test]
    fn a_wan_starts_with_dedup_and_a_tie_keeps_it() {
        let t0 = Instant::now();
        let mut p = DataPathPicker::new(DataPathPolicy::Auto, Duration::from_millis(50), t0);
        assert!(p.dedup());
        run(&mut p, t0, 30.0, |_| 12e6, false);
        assert!(p.dedup() && p.switches == 0);
        // while the WAN link is the bottleneck, lean is never tried (it would send as
        // bytes what dedup sends as references)
        let mut p = DataPathPicker::new(DataPathPolicy::Auto, Duration::from_millis(50), t0);
        let share = run(&mut p, t0, 30.0, |d| if d { 12e6 } else { 40e6 }, true);
        assert!(p.dedup() && share > 0.999, "{share}");
    }

    #[test]
    fn fixed_policies_never_probe() {
        let t0 = Instant::now();
        for (policy, dedup) in [(DataPathPolicy::Lean, false), (DataPathPolicy::Dedup, true)] {
            let mut p = DataPathPicker::new(policy, Duration::from_millis(50), t0);
            let share = run(
                &mut p,
                t0,
                20.0,
                |d| if d == dedup { 1e6 } else { 100e6 },
                dedup,
            );
            assert_eq!(p.dedup(), dedup);
            let want = if dedup { 1.0 } else { 0.0 };
            assert!((share - want).abs() < 1e-9, "{share}");
        }
        assert_eq!(DataPathPolicy::from_request(None), DataPathPolicy::Auto);
    }
}

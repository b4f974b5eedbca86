//! Which compression the source puts on its frames, re-decided as the migration runs.
//!
//! The goal is the fastest transfer: a codec moves `min(link rate x its ratio, its
//! compression speed)` bytes of pages per second. The picker learns each candidate's
//! ratio and speed by compressing one sample frame with every candidate about once a
//! second (the real frames, so it follows the guest's data), and the link rate from how
//! long flushes to the socket block (once measured, it is kept and only raised by later
//! windows). When the link was never the bottleneck (a fast LAN) speed decides; on a
//! slow link, ratio does. Among codecs within 10% of the best
//! throughput it takes the one that sends fewer bytes.
//!
//! A socket that blocks does not say whether the link or the receiver is slow (on a LAN
//! or loopback it is mostly the destination, where compressing harder only costs CPU),
//! so the model's pick is a proposal: it is tried for a window, and kept only if the
//! stream (bytes before compression per second) went at least 15% faster than with the
//! codec before it; else the picker goes back, and does not propose that codec again for
//! a while (4 s, doubling up to 32 s). It starts uncompressed on a LAN and with lz4
//! across a WAN.

use std::time::{Duration, Instant};

use tern_proto::Codec;

/// What the operator asked for (`--compression`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CodecPolicy {
    Auto,
    Fixed(Codec),
}

impl From<tern_api::Compression> for CodecPolicy {
    fn from(c: tern_api::Compression) -> Self {
        use tern_api::Compression as C;
        match c {
            C::Auto => CodecPolicy::Auto,
            C::None => CodecPolicy::Fixed(Codec::None),
            C::Lz4 => CodecPolicy::Fixed(Codec::Lz4),
            C::Zstd(l) => CodecPolicy::Fixed(Codec::Zstd(l)),
        }
    }
}

const CANDIDATES: [Codec; 4] = [Codec::None, Codec::Lz4, Codec::Zstd(1), Codec::Zstd(3)];

#[derive(Debug, Clone, Copy)]
struct Estimate {
    /// raw bytes / compressed bytes
    ratio: f64,
    /// raw bytes per second of one core
    speed: f64,
}

/// A proposed codec on trial: the stream's rate with it against `from_rate` before it.
#[derive(Debug, Clone, Copy)]
struct Trial {
    from: Codec,
    from_rate: f64,
    /// Set at the trial's first progress: measuring starts then + SETTLE.
    settle: Option<Instant>,
    start: Option<(Instant, u64)>,
}

pub struct CodecPicker {
    policy: CodecPolicy,
    current: Codec,
    trial: Option<Trial>,
    /// Where the current codec's rate window started: (when, raw bytes then).
    measure: (Instant, u64),
    /// Raw bytes per second with the current codec, in the last window.
    rate: Option<f64>,
    /// Codecs that lost a trial, and until when they are not proposed again.
    rejected: Vec<(Codec, Instant)>,
    reject_for: Duration,
    /// The latest time the picker was told of.
    clock: Instant,
    est: [Estimate; 4],
    sampled: bool,
    last_sample: Option<Instant>,
    window_start: Instant,
    window_bytes: u64,
    window_blocked: Duration,
    /// Link rate (bytes/s) when the link was the bottleneck in the last window.
    link: Option<f64>,
    /// The last window mostly waited for the socket (or, across a WAN, the window).
    bound: bool,
    pub switches: u32,
}

impl CodecPicker {
    /// How long a trial runs after settling, and how long it settles.
    const TRIAL: Duration = Duration::from_millis(1000);
    /// How much faster the stream must go with a proposed codec for it to be kept: the
    /// stream's own swings (a destination faulting in fresh memory, a guest's dirtying)
    /// reach 10% between windows; where compression pays, it pays more than 15%.
    const WIN: f64 = 1.15;
    const SETTLE: Duration = Duration::from_millis(250);

    /// For a link with this round trip (a WAN starts compressed).
    pub fn new(policy: CodecPolicy, rtt: Duration) -> Self {
        let current = match policy {
            CodecPolicy::Fixed(c) => c,
            CodecPolicy::Auto if rtt >= crate::datapath::DataPathPicker::WAN_RTT => Codec::Lz4,
            CodecPolicy::Auto => Codec::None,
        };
        CodecPicker {
            policy,
            current,
            trial: None,
            measure: (Instant::now(), 0),
            rate: None,
            rejected: Vec::new(),
            reject_for: Duration::from_secs(4),
            clock: Instant::now(),
            // rough priors, replaced by the first sample
            est: [
                Estimate {
                    ratio: 1.0,
                    speed: 10e9,
                },
                Estimate {
                    ratio: 1.5,
                    speed: 1.5e9,
                },
                Estimate {
                    ratio: 2.0,
                    speed: 400e6,
                },
                Estimate {
                    ratio: 2.1,
                    speed: 250e6,
                },
            ],
            sampled: false,
            last_sample: None,
            window_start: Instant::now(),
            window_bytes: 0,
            window_blocked: Duration::ZERO,
            link: None,
            bound: false,
            switches: 0,
        }
    }

    pub fn codec(&self) -> Codec {
        self.current
    }

    /// Whether the next frame should be given to [`CodecPicker::sample`].
    pub fn wants_sample(&self) -> bool {
        self.policy == CodecPolicy::Auto
            && self
                .last_sample
                .is_none_or(|t| t.elapsed() >= Duration::from_secs(1))
    }

    /// Learns from one frame payload: compresses it with every candidate.
    pub fn sample(&mut self, payload: &[u8]) {
        self.sample_with(payload, None)
    }

    /// `sample`, with each candidate's speed (bytes/s of input) given instead of timed
    /// (unit tests: a loaded machine times the codecs slow and changes what is tried).
    fn sample_with(&mut self, payload: &[u8], speeds: Option<[f64; CANDIDATES.len()]>) {
        if payload.len() < 16 << 10 {
            return; // too small to say anything
        }
        self.last_sample = Some(Instant::now());
        for (i, c) in CANDIDATES.iter().enumerate() {
            let t = Instant::now();
            let n = match c {
                Codec::None => payload.len(),
                Codec::Lz4 => lz4_flex::block::compress(payload).len(),
                Codec::Zstd(l) => zstd::bulk::compress(payload, *l)
                    .map(|v| v.len())
                    .unwrap_or(payload.len()),
            };
            let secs = t.elapsed().as_secs_f64().max(1e-7);
            let e = Estimate {
                ratio: payload.len() as f64 / n.max(1) as f64,
                speed: match speeds {
                    Some(given) => given[i],
                    None if *c == Codec::None => 10e9,
                    None => payload.len() as f64 / secs,
                },
            };
            let old = &mut self.est[i];
            *old = if self.sampled {
                Estimate {
                    ratio: 0.5 * old.ratio + 0.5 * e.ratio,
                    speed: 0.5 * old.speed + 0.5 * e.speed,
                }
            } else {
                e
            };
        }
        self.sampled = true;
        self.decide();
    }

    /// A flush to the socket: `bytes` written, `blocked` spent waiting for it.
    pub fn flushed(&mut self, bytes: u64, blocked: Duration) {
        self.flushed_at(bytes, blocked, Instant::now());
    }

    /// [`CodecPicker::flushed`] at a given time.
    pub fn flushed_at(&mut self, bytes: u64, blocked: Duration, now: Instant) {
        self.clock = self.clock.max(now);
        self.window_bytes += bytes;
        self.window_blocked += blocked;
        let span = now.saturating_duration_since(self.window_start);
        if span >= Duration::from_millis(500) {
            // The link is the bottleneck when we mostly wait for it: then what went
            // through is its rate. Otherwise it carried all we had: its rate is at least
            // that (a link once measured stays known; a quiet spell says nothing new).
            let seen = self.window_bytes as f64 / span.as_secs_f64();
            self.bound = self.window_blocked.as_secs_f64() > 0.3 * span.as_secs_f64();
            if self.bound {
                self.link = Some(seen);
            } else if let Some(l) = self.link {
                self.link = Some(l.max(seen));
            }
            self.window_start = now;
            self.window_bytes = 0;
            self.window_blocked = Duration::ZERO;
            self.decide();
        }
    }

    /// How fast (bytes of QEMU's stream per second) pages that must travel as bytes get
    /// across: the link rate times the current codec's ratio. QEMU is told this as its
    /// switchover bandwidth, so that it stops the VM only when what is left to send fits
    /// the downtime limit (its own estimate counts references and deltas at the rate
    /// tern accepted them: far too optimistic for the last, freshly dirtied pages).
    /// `cap`: the migration's rate limit, bytes/s on the wire (the link rate is measured
    /// without the limiter's waits, so under a limit it is the link's, not the migration's).
    pub fn switchover_rate(&self, cap: Option<f64>) -> Option<f64> {
        let i = CANDIDATES.iter().position(|c| *c == self.current)?;
        self.link
            .map(|l| l.min(cap.unwrap_or(f64::INFINITY)) * self.est[i].ratio.max(1.0))
    }

    /// The measured link rate (bytes/s), when the link is the bottleneck.
    pub fn link_rate(&self) -> Option<f64> {
        self.link
    }

    /// Whether the last half second mostly waited for the link (or the receiver).
    pub fn link_bound(&self) -> bool {
        self.bound
    }

    /// How far the stream got: `raw` frame bytes (before compression) sent so far. Runs
    /// the rate windows and judges a trial.
    pub fn progress(&mut self, raw: u64, now: Instant) {
        self.clock = self.clock.max(now);
        if let Some(mut t) = self.trial {
            let settle = *t.settle.get_or_insert(now + Self::SETTLE);
            self.trial = Some(t);
            if now < settle {
                return;
            }
            let Some((t0, r0)) = t.start else {
                t.start = Some((now, raw));
                self.trial = Some(t);
                return;
            };
            let dt = now.saturating_duration_since(t0);
            if dt < Self::TRIAL {
                return;
            }
            let rate = raw.saturating_sub(r0) as f64 / dt.as_secs_f64();
            self.trial = None;
            self.measure = (now, raw);
            if rate >= Self::WIN * t.from_rate {
                tracing::info!(from = %t.from.name(), to = %self.current.name(), was_mbps = t.from_rate * 8e-6, now_mbps = rate * 8e-6, link_mbps = ?self.link.map(|l| l * 8e-6), "compression changed");
                self.rate = Some(rate);
                self.switches += 1;
                self.reject_for = Duration::from_secs(4);
            } else {
                tracing::debug!(tried = %self.current.name(), back_to = %t.from.name(), was_mbps = t.from_rate * 8e-6, tried_mbps = rate * 8e-6, "compression trial lost");
                self.rejected.retain(|(c, _)| *c != self.current);
                self.rejected.push((self.current, now + self.reject_for));
                self.reject_for = (self.reject_for * 2).min(Duration::from_secs(32));
                self.current = t.from;
                self.rate = Some(t.from_rate);
            }
            return;
        }
        let dt = now.saturating_duration_since(self.measure.0);
        if dt >= Self::TRIAL {
            self.rate = Some(raw.saturating_sub(self.measure.1) as f64 / dt.as_secs_f64());
            self.measure = (now, raw);
        }
    }

    fn decide(&mut self) {
        if self.policy != CodecPolicy::Auto || !self.sampled {
            return;
        }
        let rate = |e: &Estimate| match self.link {
            Some(l) => (l * e.ratio).min(e.speed),
            None => e.speed,
        };
        let best = self.est.iter().map(rate).fold(0.0, f64::max);
        let pick = CANDIDATES
            .iter()
            .zip(self.est.iter())
            .filter(|(_, e)| rate(e) >= 0.9 * best)
            .max_by(|a, b| a.1.ratio.total_cmp(&b.1.ratio))
            .map(|(c, _)| *c)
            .unwrap_or(Codec::None);
        if pick == self.current || self.trial.is_some() {
            return;
        }
        let now = self.clock;
        if self
            .rejected
            .iter()
            .any(|(c, until)| *c == pick && now < *until)
        {
            return;
        }
        // try it: kept only if the stream goes faster with it (see `progress`)
        let Some(from_rate) = self.rate else {
            return; // nothing measured yet to compare with
        };
        self.trial = Some(Trial {
            from: self.current,
            from_rate,
            settle: None,
            start: None,
        });
        self.current = pick;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn text(n: usize) -> Vec<u8> {
        let words = [
            "migrate", "page", "the", "of", "guest", "memory", "kernel", "a",
        ];
        let mut s = 7u64;
        let mut v = Vec::with_capacity(n);
        while v.len() < n {
            s = s
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            v.extend_from_slice(words[(s >> 60) as usize % words.len()].as_bytes());
            v.push(b' ');
        }
        v.truncate(n);
        v
    }

    /// What the codecs did on this text on one core of the CI's machine, unloaded,
    /// bytes/s (timed under a concurrent build they were half that, and the blocked-
    /// socket case tried no codec at all).
    const SPEEDS: Option<[f64; 4]> = Some([10e9, 400e6, 285e6, 250e6]);

    /// Runs `secs` of a migration from `t` on, in 10 ms steps: each step the stream moves
    /// `raw_rate(codec)` raw bytes and the socket blocks for `blocked` of it. Returns the
    /// time at the end.
    fn run(
        p: &mut CodecPicker,
        t: Instant,
        secs: f64,
        raw: &mut u64,
        raw_rate: impl Fn(Codec) -> f64,
        blocked: f64,
    ) -> Instant {
        let mut now = t;
        let step = Duration::from_millis(10);
        for _ in 0..(secs * 100.0) as usize {
            now += step;
            let n = (raw_rate(p.codec()) * 0.01) as u64;
            *raw += n;
            p.flushed_at(n, step.mul_f64(blocked), now);
            p.progress(*raw, now);
        }
        now
    }

    #[test]
    fn a_slow_link_gets_the_strongest_codec_once_a_trial_proves_it() {
        let mut p = CodecPicker::new(CodecPolicy::Auto, Duration::from_millis(50));
        assert_eq!(p.codec(), Codec::Lz4, "a WAN starts compressed");
        p.sample_with(&text(256 << 10), SPEEDS);
        // a 100 Mbit/s link, always blocked: what goes through is the link rate times
        // the codec's ratio
        let ratio = |c: Codec| match c {
            Codec::None => 1.0,
            Codec::Lz4 => 2.0,
            _ => 3.5,
        };
        let mut raw = 0;
        let t = run(
            &mut p,
            Instant::now(),
            6.0,
            &mut raw,
            |c| 12.5e6 * ratio(c),
            0.9,
        );
        assert!(p.link_rate().is_some());
        assert!(matches!(p.codec(), Codec::Zstd(_)), "{:?}", p.codec());
        assert_eq!(p.switches, 1);
        // a quiet spell at the end (little to send) keeps what was learnt of the link
        run(&mut p, t, 3.0, &mut raw, |_| 1e5, 0.0);
        assert!(matches!(p.codec(), Codec::Zstd(_)), "{:?}", p.codec());
    }

    #[test]
    fn a_socket_blocked_by_a_slow_receiver_keeps_the_stream_uncompressed() {
        let mut p = CodecPicker::new(CodecPolicy::Auto, Duration::ZERO);
        assert_eq!(p.codec(), Codec::None, "a LAN starts uncompressed");
        p.sample_with(&text(256 << 10), SPEEDS);
        // loopback: the socket blocks because the destination is busy; compressing only
        // adds work, the stream goes slower with any codec
        let mut raw = 0;
        run(
            &mut p,
            Instant::now(),
            30.0,
            &mut raw,
            |c| if c == Codec::None { 300e6 } else { 200e6 },
            0.5,
        );
        assert_eq!(p.codec(), Codec::None);
        assert_eq!(p.switches, 0);
        assert!(!p.rejected.is_empty(), "codecs were tried and lost");
    }

    #[test]
    fn random_data_on_a_slow_link_is_not_compressed_in_vain() {
        let mut p = CodecPicker::new(CodecPolicy::Auto, Duration::from_millis(50));
        let mut s = 1u64;
        let data: Vec<u8> = (0..256 << 10)
            .map(|_| {
                s ^= s << 13;
                s ^= s >> 7;
                s ^= s << 17;
                s as u8
            })
            .collect();
        p.sample_with(&data, SPEEDS);
        let t = Instant::now() + Duration::from_millis(510);
        p.flushed_at(6 << 20, Duration::from_millis(500), t);
        // all ratios ~1: within 10% of each other, the pick is whichever is not slower
        let e = p.est;
        assert!(e.iter().all(|e| e.ratio < 1.05), "{e:?}");
    }

    #[test]
    fn fixed_policies_never_change() {
        let mut p = CodecPicker::new(
            CodecPolicy::from(tern_api::Compression::Zstd(3)),
            Duration::ZERO,
        );
        p.sample_with(&text(256 << 10), SPEEDS);
        p.flushed(6 << 20, Duration::from_secs(1));
        assert_eq!(p.codec(), Codec::Zstd(3));
        assert!(!p.wants_sample());
        assert_eq!(
            CodecPolicy::from(tern_api::Compression::Lz4),
            CodecPolicy::Fixed(Codec::Lz4)
        );
    }
}

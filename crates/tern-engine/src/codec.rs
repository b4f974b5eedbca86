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

pub struct CodecPicker {
    policy: CodecPolicy,
    current: Codec,
    est: [Estimate; 4],
    sampled: bool,
    last_sample: Option<Instant>,
    window_start: Instant,
    window_bytes: u64,
    window_blocked: Duration,
    /// Link rate (bytes/s) when the link was the bottleneck in the last window.
    link: Option<f64>,
    pub switches: u32,
}

impl CodecPicker {
    pub fn new(policy: CodecPolicy) -> Self {
        let current = match policy {
            CodecPolicy::Fixed(c) => c,
            CodecPolicy::Auto => Codec::Lz4, // a safe start until the first sample
        };
        CodecPicker {
            policy,
            current,
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
                speed: if *c == Codec::None {
                    10e9
                } else {
                    payload.len() as f64 / secs
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
        self.window_bytes += bytes;
        self.window_blocked += blocked;
        let span = self.window_start.elapsed();
        if span >= Duration::from_millis(500) {
            // The link is the bottleneck when we mostly wait for it: then what went
            // through is its rate. Otherwise it carried all we had: its rate is at least
            // that (a link once measured stays known; a quiet spell says nothing new).
            let seen = self.window_bytes as f64 / span.as_secs_f64();
            if self.window_blocked.as_secs_f64() > 0.3 * span.as_secs_f64() {
                self.link = Some(seen);
            } else if let Some(l) = self.link {
                self.link = Some(l.max(seen));
            }
            self.window_start = Instant::now();
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
    pub fn switchover_rate(&self) -> Option<f64> {
        let i = CANDIDATES.iter().position(|c| *c == self.current)?;
        self.link.map(|l| l * self.est[i].ratio.max(1.0))
    }

    /// The measured link rate (bytes/s), when the link is the bottleneck.
    pub fn link_rate(&self) -> Option<f64> {
        self.link
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
        if pick != self.current {
            tracing::info!(from = %self.current.name(), to = %pick.name(), link_mbps = ?self.link.map(|l| l * 8e-6), "compression changed");
            self.current = pick;
            self.switches += 1;
        }
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

    #[test]
    fn a_slow_link_gets_the_strongest_codec_and_a_fast_one_the_fastest() {
        let mut p = CodecPicker::new(CodecPolicy::Auto);
        p.sample(&text(256 << 10));
        // fast link (never blocked): speed decides
        std::thread::sleep(Duration::from_millis(510));
        p.flushed(1 << 20, Duration::ZERO);
        assert_eq!(p.codec(), Codec::None);
        // 100 Mbit/s link, always blocked: ratio decides
        std::thread::sleep(Duration::from_millis(510));
        p.flushed(6 << 20, Duration::from_millis(500));
        assert!(p.link_rate().is_some());
        assert!(matches!(p.codec(), Codec::Zstd(_)), "{:?}", p.codec());
        assert!(p.switches >= 2);
        // a quiet spell at the end (little to send) keeps what was learnt of the link
        std::thread::sleep(Duration::from_millis(510));
        p.flushed(1000, Duration::ZERO);
        assert!(matches!(p.codec(), Codec::Zstd(_)), "{:?}", p.codec());
    }

    #[test]
    fn random_data_on_a_slow_link_is_not_compressed_in_vain() {
        let mut p = CodecPicker::new(CodecPolicy::Auto);
        let mut s = 1u64;
        let data: Vec<u8> = (0..256 << 10)
            .map(|_| {
                s ^= s << 13;
                s ^= s >> 7;
                s ^= s << 17;
                s as u8
            })
            .collect();
        p.sample(&data);
        std::thread::sleep(Duration::from_millis(510));
        p.flushed(6 << 20, Duration::from_millis(500));
        // all ratios ~1: within 10% of each other, the pick is whichever is not slower
        let e = p.est;
        assert!(e.iter().all(|e| e.ratio < 1.05), "{e:?}");
    }

    #[test]
    fn fixed_policies_never_change() {
        let mut p = CodecPicker::new(CodecPolicy::from(tern_api::Compression::Zstd(3)));
        p.sample(&text(256 << 10));
        p.flushed(6 << 20, Duration::from_secs(1));
        assert_eq!(p.codec(), Codec::Zstd(3));
        assert!(!p.wants_sample());
        assert_eq!(
            CodecPolicy::from(tern_api::Compression::Lz4),
            CodecPolicy::Fixed(Codec::Lz4)
        );
    }
}

//! Convergence: whether pre-copy gets closer to its switchover, what tern does when it does
//! not, and how far the migration is. Sans-I/O: the transfer phase feeds [`Converger`] what
//! QEMU and tern's counters say at each look ([`Sample`]); it answers with the step to take
//! ([`Step`]) and keeps the progress percentage and the time left ([`Estimate`]).
//!
//! The model (docs/convergence.md has it with its equations): pre-copy sends the dirty set
//! `S_k` of round `k` at the rate `X` memory crosses; meanwhile the guest dirties pages at
//! `D`, so `S_{k+1} ≈ min(W, D · S_k / X)`: the set shrinks by `ρ = D / X` each round and
//! QEMU switches over once `S_k ≤ B · downtime` (`B`: the switchover bandwidth tern tells
//! QEMU). With `ρ ≥ 1` it never gets there. Then, in this order and only as far as the
//! request allows: the guest's CPUs are slowed (QEMU's auto-converge throttle `p`, which
//! scales `D` by `1 - p`) to the level that makes `ρ` about [`TARGET_RHO`], raised by at
//! least [`THROTTLE_STEP`] each time two more rounds made no progress; then the downtime
//! limit is raised to what the smallest dirty set needs; then, where the request allows
//! post-copy as the last resort, post-copy starts as soon as two more rounds made no
//! progress; else, after `give_up_after` without progress, the migration stops with the
//! numbers (the VM keeps running).
//!
//! Owns the decisions and the estimate; must not talk to QEMU (the transfer phase applies
//! each step).

use std::collections::VecDeque;
use std::time::{Duration, Instant};

/// The share of the transfer rate the (throttled) dirty rate is brought to: each round's
/// dirty set is about half the last.
pub const TARGET_RHO: f64 = 0.5;
/// The least a throttle step raises the throttle, percent.
pub const THROTTLE_STEP: u8 = 10;
/// A dirty set counts as progress toward the switchover when it is below this share of
/// the smallest one so far.
const PROGRESS: f64 = 0.9;
/// Rounds without progress before the next step (after a step: rounds to see its effect).
const PATIENCE: u32 = 2;
/// Page size of the sets and rates (QEMU's target page on x86).
const PAGE: f64 = 4096.0;

/// What the request allows.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Policy {
    /// Highest throttle tern may ask for, percent (0: never slow the guest).
    pub max_throttle: u8,
    /// The downtime limit QEMU starts with, and the most tern may raise it to, ms.
    pub downtime_ms: u64,
    pub max_downtime_ms: u64,
    /// With nothing left to try: how long without progress before giving up.
    pub give_up_after: Duration,
    /// Post-copy as the last resort instead of giving up.
    pub postcopy: bool,
}

impl Policy {
    /// What a request allows (its defaults: throttle up to 99%, the downtime limit never
    /// raised, 60 s without progress).
    pub fn from_request(req: &tern_api::MigrateRequest) -> Policy {
        Policy {
            max_throttle: req.max_throttle.unwrap_or(99).min(99),
            downtime_ms: req.downtime_limit_ms(),
            max_downtime_ms: req
                .max_downtime_ms
                .unwrap_or(0)
                .max(req.downtime_limit_ms()),
            give_up_after: Duration::from_secs(req.converge_timeout_s.unwrap_or(60).max(1)),
            postcopy: req.postcopy_fallback,
        }
    }
}

/// What QEMU and tern's counters say at one look.
#[derive(Debug, Clone, Copy, Default)]
pub struct Sample {
    /// QEMU's dirty-bitmap syncs so far (1 during the first pass).
    pub sync_count: u64,
    /// Bytes of RAM still to send in this round (QEMU's `ram.remaining`).
    pub remaining: u64,
    /// QEMU's dirty rate over its last sync period, pages/s (under the throttle then in
    /// force).
    pub dirty_pages_rate: u64,
    /// Pages of QEMU's stream tern has taken: all, and those that were not zero.
    pub pages: u64,
    pub nonzero_pages: u64,
    /// The throttle QEMU applies now, percent.
    pub throttle: u8,
    /// The rate tern told QEMU its switchover can count on, bytes/s (0: not known).
    pub switchover_bps: u64,
    /// Guest RAM, bytes.
    pub ram_total: u64,
    /// Work done before memory started (the disks' full copy), bytes: counted in the
    /// percentage so that it goes on from where the disks left it.
    pub done_before: u64,
}

impl Sample {
    /// A look at a simulated pre-copy (`simulate`, tests), where every page is data:
    /// `remaining` and `dirty` in bytes and bytes/s, `rate` the switchover bandwidth.
    fn simulated(
        sync: u64,
        remaining: f64,
        dirty: f64,
        pages: u64,
        throttle: u8,
        rate: f64,
        ram: f64,
    ) -> Sample {
        Sample {
            sync_count: sync,
            remaining: remaining as u64,
            dirty_pages_rate: (dirty / PAGE) as u64,
            pages,
            nonzero_pages: pages,
            throttle,
            switchover_bps: rate as u64,
            ram_total: ram as u64,
            done_before: 0,
        }
    }
}

/// A step for the transfer phase to apply.
#[derive(Debug, Clone, PartialEq)]
pub enum Step {
    /// Let QEMU throttle the guest up to this percentage.
    Throttle(u8),
    /// Raise QEMU's downtime limit to this many ms.
    Downtime(u64),
    /// Stop: pre-copy cannot converge within what the request allows (why, with numbers).
    GiveUp(String),
    /// Post-copy, the last resort the request allowed (why, with numbers).
    Postcopy(String),
}

/// The progress percentage and the time left.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Estimate {
    pub percent: f64,
    pub eta: Option<Duration>,
}

/// The numbers of the last sync period.
#[derive(Debug, Clone, Copy)]
struct Mark {
    sync_count: u64,
    at: Instant,
    nonzero_pages: u64,
}

/// Convergence state of one migration.
#[derive(Debug)]
pub struct Converger {
    policy: Policy,
    started: Instant,
    /// The throttle ceiling tern set (0: none yet) and the downtime limit in force.
    throttle: u8,
    downtime_ms: u64,
    mark: Option<Mark>,
    /// Dirty and transfer rates of the last sync period, bytes/s.
    dirty_bps: f64,
    xfer_bps: f64,
    /// The smallest dirty set so far and when it was seen.
    best: Option<(u64, Instant)>,
    rounds_since_best: u32,
    rounds_since_step: u32,
    /// The highest throttle QEMU applied.
    throttle_seen: u8,
    steps: Vec<String>,
    /// Progress: the highest percentage shown, and recent (time, bytes done) for the rate.
    percent: f64,
    done_window: VecDeque<(Instant, f64)>,
    /// The last step was taken (gave up, or post-copy): nothing more to decide.
    gave_up: bool,
}

impl Converger {
    pub fn new(policy: Policy, now: Instant) -> Converger {
        Converger {
            policy,
            started: now,
            throttle: 0,
            downtime_ms: policy.downtime_ms,
            mark: None,
            dirty_bps: 0.0,
            xfer_bps: 0.0,
            best: None,
            rounds_since_best: 0,
            rounds_since_step: PATIENCE,
            throttle_seen: 0,
            steps: Vec::new(),
            percent: 0.0,
            done_window: VecDeque::new(),
            gave_up: false,
        }
    }

    /// Takes one look; the step to apply now, if any.
    pub fn observe(&mut self, s: &Sample, now: Instant) -> Option<Step> {
        self.throttle_seen = self.throttle_seen.max(s.throttle);
        if self.gave_up {
            return None;
        }
        let new_round = self.mark.is_some_and(|m| s.sync_count > m.sync_count);
        if let (true, Some(m)) = (new_round, self.mark) {
            let dt = now.duration_since(m.at).as_secs_f64().max(1e-3);
            self.xfer_bps = s.nonzero_pages.saturating_sub(m.nonzero_pages) as f64 * PAGE / dt;
            self.dirty_bps = s.dirty_pages_rate as f64 * PAGE;
        }
        if new_round || self.mark.is_none() {
            self.mark = Some(Mark {
                sync_count: s.sync_count,
                at: now,
                nonzero_pages: s.nonzero_pages,
            });
        }
        let mut step = None;
        if new_round && s.sync_count >= 2 {
            // `remaining` just after a sync: this round's dirty set
            let set = s.remaining;
            match self.best {
                Some((b, _)) if (set as f64) >= PROGRESS * b as f64 => self.rounds_since_best += 1,
                _ => {
                    self.best = Some((set, now));
                    self.rounds_since_best = 0;
                }
            }
            self.rounds_since_step = self.rounds_since_step.saturating_add(1);
            step = self.decide(s, set);
        }
        if step.is_none() {
            step = self.give_up(now);
        }
        if let Some(st) = &step {
            let at = now.duration_since(self.started).as_millis();
            let text = match st {
                Step::Throttle(p) => {
                    self.throttle = *p;
                    format!(
                        "{at} ms: throttle up to {p}% (dirty {:.1} MiB/s, memory crosses at {:.1} MiB/s)",
                        mib(self.dirty_bps),
                        mib(self.xfer_bps)
                    )
                }
                Step::Downtime(ms) => {
                    self.downtime_ms = *ms;
                    format!("{at} ms: downtime limit raised to {ms} ms")
                }
                Step::GiveUp(why) => {
                    self.gave_up = true;
                    format!("{at} ms: stopped: {why}")
                }
                Step::Postcopy(why) => {
                    self.gave_up = true;
                    format!("{at} ms: post-copy: {why}")
                }
            };
            self.rounds_since_step = 0;
            self.steps.push(text);
        }
        step
    }

    /// At a new round: whether pre-copy gets closer, and the next step when it does not.
    fn decide(&self, s: &Sample, set: u64) -> Option<Step> {
        let bw = if s.switchover_bps > 0 {
            s.switchover_bps as f64
        } else {
            self.xfer_bps
        };
        let goal = bw * self.downtime_ms as f64 / 1000.0;
        if (set as f64) <= goal || self.xfer_bps <= 0.0 {
            return None;
        }
        let rho = self.dirty_bps / self.xfer_bps;
        // the model says it will not get there, or it has not got closer for a while
        let stuck = rho >= PROGRESS || self.rounds_since_best >= PATIENCE;
        if !stuck || self.rounds_since_step < PATIENCE {
            return None;
        }
        if self.throttle < self.policy.max_throttle {
            // the guest's rate without the throttle now in force, and the level that
            // brings it to TARGET_RHO of the transfer rate
            let now_pct = f64::from(s.throttle.min(99));
            let free = self.dirty_bps / (1.0 - now_pct / 100.0);
            let needed = if free > 0.0 {
                (100.0 * (1.0 - TARGET_RHO * self.xfer_bps / free)).ceil()
            } else {
                0.0
            };
            let floor = if self.throttle == 0 {
                THROTTLE_STEP
            } else {
                self.throttle.saturating_add(THROTTLE_STEP)
            };
            let level = (needed.clamp(0.0, 99.0) as u8)
                .max(floor)
                .min(self.policy.max_throttle);
            return Some(Step::Throttle(level));
        }
        if self.downtime_ms < self.policy.max_downtime_ms {
            let smallest = self.best.map_or(set, |(b, _)| b) as f64;
            let needed = (1.25 * smallest / bw.max(1.0) * 1000.0).ceil() as u64;
            let next = needed
                .max(self.downtime_ms + self.downtime_ms / 2)
                .min(self.policy.max_downtime_ms);
            return Some(Step::Downtime(next));
        }
        if self.policy.postcopy {
            return Some(Step::Postcopy(format!(
                "pre-copy does not converge at the most the request allows: the guest dirties {:.1} MiB/s (throttled up to {}%) and its memory crosses at {:.1} MiB/s, the downtime limit is {} ms",
                mib(self.dirty_bps),
                self.throttle,
                mib(self.xfer_bps),
                self.downtime_ms
            )));
        }
        None
    }

    /// With nothing left to try, no progress for `give_up_after`: the reason to stop.
    fn give_up(&self, now: Instant) -> Option<Step> {
        let exhausted = self.throttle >= self.policy.max_throttle
            && self.downtime_ms >= self.policy.max_downtime_ms;
        let (_, best_at) = self.best?;
        if !exhausted
            || self.rounds_since_best < PATIENCE
            || self.rounds_since_step < PATIENCE
            || now.duration_since(best_at) < self.policy.give_up_after
        {
            return None;
        }
        let mut what = Vec::new();
        if self.policy.max_throttle == 0 {
            what.push("throttling is not allowed (--max-throttle 0)".to_string());
        } else {
            what.push(format!(
                "the guest is throttled to {}% (--max-throttle {})",
                self.throttle_seen, self.policy.max_throttle
            ));
        }
        what.push(format!(
            "the downtime limit is {} ms (--max-downtime {})",
            self.downtime_ms, self.policy.max_downtime_ms
        ));
        Some(Step::GiveUp(format!(
            "pre-copy does not converge: the guest dirties {:.1} MiB/s and its memory crosses at {:.1} MiB/s; {}; no progress toward the switchover for {} s. Allow more (--max-throttle up to 99, a higher --max-downtime), give the migration more bandwidth, or quiet the guest",
            mib(self.dirty_bps),
            mib(self.xfer_bps),
            what.join(", "),
            self.policy.give_up_after.as_secs()
        )))
    }

    /// The progress percentage (never lower than the last one) and the time left. Every
    /// sample passes here (`observe` only sees those of an active pre-copy), so this is also
    /// where the throttle QEMU applied is recorded for the report.
    pub fn estimate(&mut self, s: &Sample, now: Instant) -> Estimate {
        self.throttle_seen = self.throttle_seen.max(s.throttle);
        if s.ram_total == 0 && s.remaining == 0 {
            // QEMU reports nothing of RAM yet (its migration is setting up)
            return Estimate {
                percent: self.percent,
                eta: None,
            };
        }
        let done = s.pages as f64 * PAGE + s.done_before as f64;
        let left = if s.sync_count == 0 && s.remaining == 0 {
            (s.ram_total as f64 - s.pages as f64 * PAGE).max(0.0)
        } else {
            s.remaining as f64
        };
        // what later rounds will add: a geometric series of ratio rho, which tern keeps
        // at TARGET_RHO or below once it has to (the throttle), as the request allows
        let rho = match self.dirty_bps / self.xfer_bps {
            r if !r.is_finite() => 0.0,
            r if r < PROGRESS => r,
            _ if self.policy.max_throttle > 0 => TARGET_RHO,
            _ => PROGRESS,
        };
        let future = left * rho / (1.0 - rho);
        let raw = 100.0 * done / (done + left + future).max(1.0);
        self.percent = self.percent.max(raw.min(99.0));
        // the rate work gets done at, over the last few seconds
        self.done_window.push_back((now, done));
        while self
            .done_window
            .front()
            .is_some_and(|(t, _)| now.duration_since(*t) > Duration::from_secs(3))
        {
            self.done_window.pop_front();
        }
        let eta = match (self.done_window.front(), self.done_window.back()) {
            (Some((t0, d0)), Some((t1, d1)))
                if t1.duration_since(*t0) >= Duration::from_millis(500) =>
            {
                let rate = (d1 - d0) / t1.duration_since(*t0).as_secs_f64();
                (rate > 0.0).then(|| {
                    Duration::from_secs_f64((left + future) / rate)
                        + Duration::from_millis(self.downtime_ms)
                })
            }
            _ => None,
        };
        Estimate {
            percent: self.percent,
            eta,
        }
    }

    /// The downtime limit in force.
    pub fn downtime_ms(&self) -> u64 {
        self.downtime_ms
    }

    /// What tern did, for the report.
    pub fn report(&self, dirty_syncs: u64) -> tern_api::ConvergenceReport {
        tern_api::ConvergenceReport {
            dirty_syncs,
            throttle_max_pct: self.throttle_seen,
            downtime_limit_ms: self.downtime_ms,
            dirty_mibps: mib(self.dirty_bps),
            transfer_mibps: mib(self.xfer_bps),
            steps: self.steps.clone(),
        }
    }
}

/// A migration to predict (`--plan`): what was measured and what the request allows.
#[derive(Debug, Clone, Copy)]
pub struct Scenario {
    /// Bytes the first pass sends as pages (all of RAM unless known better).
    pub memory: f64,
    /// The guest's dirty rate, bytes/s (at full CPU: the throttle scales it).
    pub dirty_bps: f64,
    /// The rate memory crosses at, bytes/s of QEMU's stream.
    pub rate_bps: f64,
    /// What a page sent again (rounds after the first) costs against a fresh one: tern
    /// sends a rewritten page against its previous version (a delta) where the link is the
    /// bottleneck. 1: as much. QEMU still decides the switchover on the set's bytes and
    /// the switchover bandwidth, which gives deltas no credit.
    pub rewritten: f64,
    pub policy: Policy,
    /// The host's cores, where they bound the rate (None: they do not, or not known).
    pub cpu: Option<CpuBound>,
}

/// The source host's CPU as a bound on the rate: the data path needs `core_s_per_byte`
/// CPU seconds per byte of QEMU's stream. When the host has fewer cores than the guest,
/// the rest of the host and the migration ask for together, the scheduler slows them
/// alike: the migration gets that share of the rate it asks for, and the guest of its
/// dirtying. A throttle of θ takes θ of the guest's cores out of the asking.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct CpuBound {
    /// Cores online.
    pub cores: f64,
    /// Cores busy with everything but the guest's QEMU (other VMs, the host).
    pub other_cores: f64,
    /// Cores the guest's QEMU takes at full speed.
    pub guest_cores: f64,
    pub core_s_per_byte: f64,
}

impl CpuBound {
    /// With the guest throttled to `throttle` percent (100: paused) and the migration
    /// asking for `rate` bytes/s of QEMU's stream: the rate it gets, and the share of its
    /// speed the guest keeps (1: all).
    pub fn share(&self, throttle: u8, rate: f64) -> (f64, f64) {
        let guest = self.guest_cores.max(0.0) * (1.0 - f64::from(throttle.min(100)) / 100.0);
        let asked = self.other_cores.max(0.0) + guest + rate * self.core_s_per_byte.max(0.0);
        let s = if asked > self.cores && asked > 0.0 {
            (self.cores.max(0.1) / asked).clamp(0.0, 1.0)
        } else {
            1.0
        };
        (rate * s, s)
    }
}

/// What a simulated pre-copy did: the same [`Converger`] decides as in a real migration.
#[derive(Debug, Clone, PartialEq)]
pub struct Outcome {
    /// From the first page to the switchover, and the pause.
    pub transfer: Duration,
    pub downtime: Duration,
    /// Bytes of QEMU's stream sent, and what they cost in fresh bytes at the rate (the
    /// pages sent again at [`Scenario::rewritten`] each).
    pub stream_bytes: f64,
    pub priced_bytes: f64,
    pub rounds: u32,
    /// The throttle tern ends at and the downtime limit it ends at.
    pub throttle: u8,
    pub downtime_ms: u64,
    /// tern stops (`not-converging`) within what the policy allows.
    pub stops: bool,
    /// tern switches to post-copy (the policy's last resort): `transfer` then ends when
    /// the rest of memory crossed once, and `downtime` is the device state's only.
    pub postcopy: bool,
}

/// Pre-copy of `s`, round by round, with tern's decisions; at most a day of it.
pub fn simulate(s: &Scenario) -> Outcome {
    let start = Instant::now();
    let mut c = Converger::new(s.policy, start);
    let mut t = start;
    // the link's rate, and the guest's speed, as the cores share out at its throttle
    let rate_at = |throttle: u8| {
        let (rate, slow) = s
            .cpu
            .map_or((s.rate_bps, 1.0), |c| c.share(throttle, s.rate_bps));
        (rate.max(1.0), slow)
    };
    let (mut throttle, mut downtime_ms) = (0u8, s.policy.downtime_ms);
    let rewritten = s.rewritten.clamp(0.01, 1.0);
    let (mut pages, mut sync, mut sent, mut priced) = (0u64, 1u64, 0.0f64, 0.0f64);
    let mut set = s.memory;
    let mut rounds = 0;
    let outcome =
        |t: Instant, pause: f64, (sent, priced), rounds, throttle, downtime_ms, stops| Outcome {
            transfer: t.duration_since(start),
            downtime: Duration::from_secs_f64(pause),
            stream_bytes: sent,
            priced_bytes: priced,
            rounds,
            throttle,
            downtime_ms,
            stops,
            postcopy: false,
        };
    // post-copy from `t` on: what is left of this round's set crosses once, unthrottled
    let postcopy =
        |t: Instant, left: f64, (sent, priced): (f64, f64), rounds, throttle, downtime_ms| {
            let rate = rate_at(0).0;
            Outcome {
                transfer: t.duration_since(start)
                    + Duration::from_secs_f64(left * rewritten / rate),
                downtime: Duration::ZERO,
                stream_bytes: sent + left,
                priced_bytes: priced + left * rewritten,
                rounds,
                throttle,
                downtime_ms,
                stops: false,
                postcopy: true,
            }
        };
    loop {
        rounds += 1;
        let cost = if rounds == 1 { 1.0 } else { rewritten };
        let (rate, slow) = rate_at(throttle);
        let secs = set * cost / rate;
        // looks through the round, as the transfer phase takes them (at most 200)
        let looks = ((secs / 0.25).ceil() as u64).clamp(1, 200);
        let dirty = s.dirty_bps * (1.0 - f64::from(throttle) / 100.0) * slow;
        for i in 0..looks {
            t += Duration::from_secs_f64(secs / looks as f64);
            pages += (set / looks as f64 / PAGE) as u64;
            let left = set * (1.0 - (i + 1) as f64 / looks as f64);
            let sample = Sample::simulated(sync, left, dirty, pages, throttle, rate, s.memory);
            match c.observe(&sample, t) {
                Some(Step::GiveUp(_)) => {
                    return outcome(t, 0.0, (sent, priced), rounds, throttle, downtime_ms, true)
                }
                Some(Step::Postcopy(_)) => {
                    let done = set - left;
                    let spent = (sent + done, priced + done * cost);
                    return postcopy(
                        t,
                        s.memory.min(left + dirty * secs),
                        spent,
                        rounds,
                        throttle,
                        downtime_ms,
                    );
                }
                _ => {}
            }
        }
        sent += set;
        priced += set * cost;
        let next = (dirty * secs).min(s.memory);
        if next <= rate * downtime_ms as f64 / 1000.0 {
            // paused, the guest's cores are the migration's
            return outcome(
                t,
                next * rewritten / rate_at(100).0,
                (sent + next, priced + next * rewritten),
                rounds,
                throttle,
                downtime_ms,
                false,
            );
        }
        if t.duration_since(start) > Duration::from_secs(86_400) {
            return outcome(t, 0.0, (sent, priced), rounds, throttle, downtime_ms, true);
        }
        set = next;
        sync += 1;
        let sample = Sample::simulated(sync, set, dirty, pages, throttle, rate, s.memory);
        t += Duration::from_millis(1);
        match c.observe(&sample, t) {
            Some(Step::Throttle(p)) => throttle = p,
            Some(Step::Downtime(ms)) => downtime_ms = ms,
            Some(Step::GiveUp(_)) => {
                return outcome(t, 0.0, (sent, priced), rounds, throttle, downtime_ms, true)
            }
            Some(Step::Postcopy(_)) => {
                return postcopy(t, set, (sent, priced), rounds, throttle, downtime_ms)
            }
            None => {}
        }
    }
}

fn mib(bps: f64) -> f64 {
    (bps / 1048576.0 * 10.0).round() / 10.0
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1 << 20;

    fn policy() -> Policy {
        Policy {
            max_throttle: 99,
            downtime_ms: 300,
            max_downtime_ms: 300,
            give_up_after: Duration::from_secs(30),
            postcopy: false,
        }
    }

    /// A simulated pre-copy: a guest dirtying `dirty` bytes/s (scaled by the throttle
    /// the converger asks for) over a working set of `wss` bytes, a link of `link`
    /// bytes/s; rounds until the dirty set fits the downtime limit, or `max_rounds`.
    struct Sim {
        c: Converger,
        t: Instant,
        dirty: f64,
        link: f64,
        wss: f64,
        throttle: u8,
        downtime_ms: u64,
        pages: u64,
        sync: u64,
        percents: Vec<f64>,
    }

    impl Sim {
        fn new(p: Policy, dirty: f64, link: f64, wss: f64) -> Sim {
            let t = Instant::now();
            Sim {
                c: Converger::new(p, t),
                t,
                dirty,
                link,
                wss,
                throttle: 0,
                downtime_ms: p.downtime_ms,
                pages: 0,
                sync: 1,
                percents: Vec::new(),
            }
        }

        /// Runs rounds; Ok(rounds) once it converges, Err(step) if it gave up.
        fn run(&mut self, max_rounds: u32) -> Result<u32, String> {
            let mut set = self.wss; // the first pass sends the working set
            for round in 0..max_rounds {
                let secs = set / self.link;
                // look every 250 ms through the round
                let looks = ((secs / 0.25).ceil() as u64).max(1);
                for i in 0..looks {
                    self.t += Duration::from_secs_f64(secs / looks as f64);
                    self.pages += (set / looks as f64 / PAGE) as u64;
                    let s = Sample::simulated(
                        self.sync,
                        set * (1.0 - (i + 1) as f64 / looks as f64),
                        self.dirty * (1.0 - self.throttle as f64 / 100.0),
                        self.pages,
                        self.throttle,
                        self.link,
                        4.0 * self.wss,
                    );
                    let e = self.c.estimate(&s, self.t);
                    self.percents.push(e.percent);
                    let step = self.c.observe(&s, self.t);
                    self.apply(step)?;
                }
                // the sync: what was dirtied meanwhile
                let rate = self.dirty * (1.0 - self.throttle as f64 / 100.0);
                set = (rate * secs).min(self.wss);
                if set <= self.link * self.downtime_ms as f64 / 1000.0 {
                    return Ok(round + 1);
                }
                self.sync += 1;
                let s = Sample::simulated(
                    self.sync,
                    set,
                    rate,
                    self.pages,
                    self.throttle,
                    self.link,
                    4.0 * self.wss,
                );
                self.t += Duration::from_millis(1);
                let step = self.c.observe(&s, self.t);
                self.apply(step)?;
            }
            Err("did not converge in the rounds given".into())
        }

        fn apply(&mut self, step: Option<Step>) -> Result<(), String> {
            match step {
                // QEMU applies the ceiling at its next trigger (here: at once)
                Some(Step::Throttle(p)) => self.throttle = p,
                Some(Step::Downtime(ms)) => self.downtime_ms = ms,
                Some(Step::GiveUp(why)) => return Err(why),
                Some(Step::Postcopy(why)) => return Err(format!("post-copy: {why}")),
                None => {}
            }
            Ok(())
        }
    }

    fn scenario(dirty_mibps: f64, rate_mibps: f64, memory_mib: f64, p: Policy) -> Scenario {
        Scenario {
            rewritten: 1.0,
            memory: memory_mib * MIB as f64,
            dirty_bps: dirty_mibps * MIB as f64,
            rate_bps: rate_mibps * MIB as f64,
            policy: p,
            cpu: None,
        }
    }

    #[test]
    fn a_simulated_quiet_guest_takes_its_memory_over_the_rate_and_a_short_pause() {
        let o = simulate(&scenario(1.0, 100.0, 1024.0, policy()));
        assert!(!o.stops && o.throttle == 0, "{o:?}");
        let secs = o.transfer.as_secs_f64();
        assert!((10.2..10.6).contains(&secs), "{secs}");
        assert!(o.downtime < Duration::from_millis(300), "{o:?}");
        assert!(o.rounds <= 3, "{o:?}");
        assert!(o.stream_bytes < 1040.0 * MIB as f64, "{o:?}");
    }

    #[test]
    fn a_simulated_guest_at_one_and_a_half_times_the_rate_needs_the_throttle_tern_would_set() {
        let s = scenario(18.0, 12.0, 1024.0, policy());
        let o = simulate(&s);
        assert!(!o.stops, "{o:?}");
        assert!((60..=80).contains(&o.throttle), "{o:?}");
        let mut plain = s;
        plain.policy.max_throttle = 0;
        assert!(simulate(&plain).stops, "plain pre-copy does not converge");
        // a small guest may instead pause for its whole dirty set, when that is allowed
        let mut longer = scenario(18.0, 12.0, 64.0, policy());
        longer.policy.max_throttle = 0;
        longer.policy.max_downtime_ms = 60_000;
        let l = simulate(&longer);
        assert!(!l.stops && l.downtime_ms > 300 && l.throttle == 0, "{l:?}");
    }

    #[test]
    fn a_guest_that_dirties_slower_than_the_link_is_never_throttled() {
        let mut sim = Sim::new(
            policy(),
            4.0 * MIB as f64,
            12.0 * MIB as f64,
            64.0 * MIB as f64,
        );
        let rounds = sim.run(40).unwrap();
        assert!(rounds <= 6, "rounds {rounds}");
        assert_eq!(sim.throttle, 0);
        assert!(sim.c.report(0).steps.is_empty());
    }

    #[test]
    fn a_guest_at_one_and_a_half_times_the_link_is_throttled_just_enough_and_converges() {
        let mut sim = Sim::new(
            policy(),
            18.0 * MIB as f64,
            12.0 * MIB as f64,
            128.0 * MIB as f64,
        );
        let rounds = sim.run(40).unwrap();
        // rho 1.5 -> the level that brings it to 0.5: 1 - 0.5/1.5 = 67%
        assert!(
            (60..=80).contains(&sim.throttle),
            "throttle {}",
            sim.throttle
        );
        assert!(rounds < 15, "rounds {rounds}");
        let r = sim.c.report(sim.sync);
        assert!(r.steps[0].contains("throttle up to"), "{:?}", r.steps);
        assert_eq!(r.downtime_limit_ms, 300);
    }

    #[test]
    fn a_throttle_that_was_not_enough_is_raised_step_by_step() {
        // the guest's rate does not fall with the throttle as the model assumes: it
        // dirties 3x the link at first and the model's level leaves it above the link
        let mut p = policy();
        p.max_downtime_ms = 300;
        let mut sim = Sim::new(p, 36.0 * MIB as f64, 12.0 * MIB as f64, 128.0 * MIB as f64);
        // a guest whose dirtying falls only half as fast as the throttle
        let mut levels = Vec::new();
        let mut set = sim.wss;
        for _ in 0..30 {
            let secs = set / sim.link;
            sim.t += Duration::from_secs_f64(secs);
            sim.pages += (set / PAGE) as u64;
            let rate = sim.dirty * (1.0 - sim.throttle as f64 / 200.0);
            set = (rate * secs).min(sim.wss);
            sim.sync += 1;
            let s = Sample::simulated(sim.sync, set, rate, sim.pages, sim.throttle, sim.link, 0.0);
            if let Some(Step::Throttle(l)) = sim.c.observe(&s, sim.t) {
                levels.push(l);
                sim.throttle = l;
            }
        }
        assert!(levels.len() >= 2, "{levels:?}");
        assert!(
            levels
                .windows(2)
                .all(|w| w[1] >= w[0] + THROTTLE_STEP || w[1] == 99),
            "{levels:?}"
        );
        assert_eq!(*levels.last().unwrap(), 99);
    }

    #[test]
    fn without_throttling_the_downtime_limit_is_raised_within_the_bound() {
        let mut p = policy();
        p.max_throttle = 0;
        p.max_downtime_ms = 20_000;
        let mut sim = Sim::new(p, 18.0 * MIB as f64, 12.0 * MIB as f64, 32.0 * MIB as f64);
        sim.run(40).unwrap();
        assert_eq!(sim.throttle, 0);
        assert!(
            sim.downtime_ms > 300 && sim.downtime_ms <= 20_000,
            "{}",
            sim.downtime_ms
        );
        assert!(sim.c.report(0).steps.iter().all(|s| s.contains("downtime")));
    }

    #[test]
    fn with_nothing_allowed_it_gives_up_with_the_numbers_after_the_stated_time() {
        let mut p = policy();
        p.max_throttle = 0;
        p.give_up_after = Duration::from_secs(20);
        let mut sim = Sim::new(p, 18.0 * MIB as f64, 12.0 * MIB as f64, 64.0 * MIB as f64);
        let why = sim.run(100).unwrap_err();
        assert!(why.contains("does not converge"), "{why}");
        assert!(
            why.contains("18.0 MiB/s") && why.contains("12.0 MiB/s"),
            "{why}"
        );
        assert!(why.contains("--max-throttle 0"), "{why}");
        let gave_up_at = sim.t.duration_since(sim.c.started);
        // 64 MiB rounds of 5.3 s: the first round's set is the best; two more rounds and
        // 20 s without progress
        assert!(
            gave_up_at >= Duration::from_secs(20) && gave_up_at < Duration::from_secs(40),
            "{gave_up_at:?}"
        );
        assert!(
            sim.c.observe(&Sample::default(), sim.t).is_none(),
            "gives up once"
        );
    }

    #[test]
    fn with_postcopy_allowed_it_comes_after_the_throttle_and_instead_of_giving_up() {
        let mut p = policy();
        p.max_throttle = 30;
        p.give_up_after = Duration::from_secs(600);
        p.postcopy = true;
        // a guest the throttle allowed cannot bring under the link
        let mut sim = Sim::new(p, 18.0 * MIB as f64, 12.0 * MIB as f64, 64.0 * MIB as f64);
        let why = sim.run(100).unwrap_err();
        assert!(
            why.starts_with("post-copy: pre-copy does not converge"),
            "{why}"
        );
        assert!(why.contains("throttled up to 30%"), "{why}");
        assert_eq!(sim.throttle, 30, "the throttle came first");
        // long before the 600 s of giving up
        assert!(sim.t.duration_since(sim.c.started) < Duration::from_secs(120));
        let steps = sim.c.report(0).steps;
        assert!(
            steps.last().is_some_and(|s| s.contains("post-copy")),
            "{steps:?}"
        );
        assert!(sim.c.observe(&Sample::default(), sim.t).is_none(), "once");
        // a guest that converges never gets there
        let mut calm = Sim::new(p, 4.0 * MIB as f64, 12.0 * MIB as f64, 64.0 * MIB as f64);
        calm.run(40).unwrap();
    }

    #[test]
    fn the_percentage_never_goes_down_and_reaches_99_before_the_end() {
        let mut sim = Sim::new(
            policy(),
            18.0 * MIB as f64,
            12.0 * MIB as f64,
            128.0 * MIB as f64,
        );
        sim.run(40).unwrap();
        let p = &sim.percents;
        assert!(p.windows(2).all(|w| w[1] >= w[0]), "{p:?}");
        assert!(*p.last().unwrap() > 80.0, "{:?}", p.last());
        assert!(p.iter().all(|x| *x <= 99.0));
    }

    #[test]
    fn work_done_before_memory_counts_in_the_percentage() {
        let t = Instant::now();
        let mut c = Converger::new(policy(), t);
        // a 100 MiB disk copied, memory (100 MiB) not started: half way
        let s = Sample {
            sync_count: 1,
            ram_total: 100 * MIB,
            remaining: 100 * MIB,
            done_before: 100 * MIB,
            ..Default::default()
        };
        assert!((c.estimate(&s, t).percent - 50.0).abs() < 0.5);
        // while QEMU reports nothing of RAM yet, the disks' share is not taken for all
        let mut c = Converger::new(policy(), t);
        let setting_up = Sample {
            done_before: 100 * MIB,
            ..Default::default()
        };
        assert_eq!(c.estimate(&setting_up, t).percent, 0.0);
    }

    #[test]
    fn the_report_has_the_throttle_qemu_applied_even_after_pre_copy_ended() {
        // the last throttle step lands just before QEMU stops the guest: the samples that
        // show it come with status "device" or "completed", which observe() never sees
        let t = Instant::now();
        let mut c = Converger::new(policy(), t);
        let s = Sample {
            sync_count: 3,
            ram_total: 100 * MIB,
            remaining: MIB,
            throttle: 74,
            ..Default::default()
        };
        c.estimate(&s, t);
        assert_eq!(c.report(3).throttle_max_pct, 74);
    }

    #[test]
    fn the_time_left_comes_from_the_rate_work_gets_done() {
        let t = Instant::now();
        let mut c = Converger::new(policy(), t);
        let mut s = Sample {
            sync_count: 1,
            ram_total: 100 * MIB,
            remaining: 100 * MIB,
            ..Default::default()
        };
        assert_eq!(c.estimate(&s, t).eta, None, "no rate yet");
        // 10 MiB/s for 2 s: 80 MiB left -> 8 s (+ the downtime limit)
        s.pages = 20 * MIB / 4096;
        s.remaining = 80 * MIB;
        let e = c.estimate(&s, t + Duration::from_secs(2));
        let eta = e.eta.unwrap().as_secs_f64();
        assert!((eta - 8.3).abs() < 0.2, "{eta}");
        assert!((e.percent - 20.0).abs() < 0.5, "{}", e.percent);
    }
}

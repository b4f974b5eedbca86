//! The bandwidth controller: the rate a migration may send at, re-decided every look
//! (250 ms) from what it measures, for the objective the operator picked. Sans-I/O: the
//! source's pacing task (`source::pacing`) feeds it looks at the data connections
//! (`transport::probe`) and at the work left, and applies the rate it returns to the
//! migration's rate limit (`transport::rate`). docs/bandwidth.md has the equations.
//!
//! - `fastest`, `least-downtime`: the ceiling (`--max-bandwidth`), or no limit.
//! - `least-link-use` with a deadline: the lowest rate that still finishes in time,
//!   `r = 1.1 (W / T_left + D)`, recomputed each look (so it corrects itself).
//! - `least-link-use` without one: a delay-based scavenger (LEDBAT's idea, as a rate):
//!   queueing delay `q = srtt - base_rtt` above the target means other traffic shares the
//!   bottleneck, and the rate falls (multiplicatively, down to the floor that still lets
//!   pre-copy converge); below it the rate rises, so the link is taken back when the other
//!   traffic leaves.
//!
//! Owns the control law and its report; knows nothing of sockets, QEMU or tokio.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use tern_api::{Objective, PacingReport};

const MIB: f64 = 1048576.0;
/// The least rate the scavenger goes down to, bytes/s.
pub const MIN_RATE: f64 = MIB;
/// And the share of the most the link delivered (in a second) it keeps.
const FLOOR_SHARE: f64 = 0.2;
/// And this multiple of the dirty rate (pre-copy's rounds shrink by its inverse).
const FLOOR_DIRTY: f64 = 3.0;
/// Where `least-link-use` starts before it has measured anything, bytes/s.
const START_RATE: f64 = 16.0 * MIB;
/// The queueing delay the scavenger keeps the path under.
pub const TARGET_QUEUE: Duration = Duration::from_millis(20);
/// Per look: the most the rate falls (at twice the target) and rises (with no queue).
const DECREASE: f64 = 0.25;
const INCREASE_FAST: f64 = 0.25;
const INCREASE_SLOW: f64 = 0.04;
/// Under this share of the most the link delivered (in a second) the rate rises fast.
const NEAR_CAPACITY: f64 = 0.85;
/// Looks in a row with the queue under half the target before the rate rises fast.
const SETTLED: u32 = 4;
/// Of a deadline: kept back for the switchover and verification.
const RESERVE_MIN: Duration = Duration::from_secs(2);
const RESERVE_SHARE: f64 = 0.05;
/// Over the deadline's bare rate, for what the estimate misses.
const DEADLINE_MARGIN: f64 = 1.1;
/// With a deadline: the held rate is re-planned lower when the rate needed falls under
/// this share of it (in the first half of the time only).
const REPLAN_BELOW: f64 = 0.7;
/// The most steps a report lists.
const MAX_STEPS: usize = 40;

/// What the operator asked for.
#[derive(Debug, Clone, Copy)]
pub struct PacePolicy {
    pub objective: Objective,
    /// `--max-bandwidth`, bytes/s.
    pub ceiling: Option<f64>,
    pub deadline: Option<Duration>,
}

impl PacePolicy {
    pub fn from_request(req: &tern_api::MigrateRequest) -> PacePolicy {
        PacePolicy {
            objective: req.objective(),
            ceiling: req.max_bandwidth_mibps.map(|m| m as f64 * MIB),
            deadline: req.deadline_s.map(Duration::from_secs),
        }
    }

    /// Whether the controller ever changes the rate (else it is the ceiling, or none).
    pub fn adapts(&self) -> bool {
        self.objective == Objective::LeastLinkUse
    }
}

/// The data connections at one look (summed or combined over all of them).
#[derive(Debug, Clone, Copy, Default)]
pub struct LinkLook {
    /// Smoothed round trip of the connections that carried data since the last look.
    pub srtt: Duration,
    /// The least round trip any of them saw.
    pub min_rtt: Duration,
    /// Bytes the destination acknowledged, all connections, since they opened.
    pub acked: u64,
}

/// The work at one look, in bytes on the wire.
#[derive(Debug, Clone, Copy, Default)]
pub struct WorkLook {
    /// Still to send (this round's rest of memory and the disks' rest), without what the
    /// guest will dirty meanwhile.
    pub left: f64,
    /// What the guest dirties, per second.
    pub dirty_bps: f64,
}

/// What the controller says at one look.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Decision {
    /// The rate to send at, bytes/s (None: no limit).
    pub rate: Option<f64>,
    /// The queueing delay it saw.
    pub queue: Option<Duration>,
    pub srtt: Option<Duration>,
}

/// Of a deadline, what is kept back for the switchover and verification.
fn deadline_reserve(deadline: Duration) -> Duration {
    RESERVE_MIN.max(deadline.mul_f64(RESERVE_SHARE))
}

/// The lowest rate (bytes/s on the wire) that sends `left` bytes, and what the guest
/// dirties meanwhile at `dirty_bps` (pre-copy sends it again), `elapsed` into `deadline`:
/// `1.1 (W / T_left + D)`, with the reserve kept back. None when less than half a second
/// is left: no rate is enough.
pub fn deadline_rate(
    deadline: Duration,
    elapsed: Duration,
    left: f64,
    dirty_bps: f64,
) -> Option<f64> {
    let t_left = deadline
        .saturating_sub(elapsed + deadline_reserve(deadline))
        .as_secs_f64();
    (t_left >= 0.5).then(|| DEADLINE_MARGIN * (left / t_left + dirty_bps))
}

pub struct Pacer {
    policy: PacePolicy,
    start: Instant,
    rate: Option<f64>,
    base_rtt: Option<Duration>,
    /// (when, acked) over the last second, for the delivery rate.
    acked: VecDeque<(Instant, u64)>,
    first_acked: Option<(Instant, u64)>,
    last_acked: Option<(Instant, u64)>,
    delivered_max: f64,
    rate_min: Option<f64>,
    rate_max: Option<f64>,
    /// Looks in a row above the target (or below half of it, while backed off).
    over: u32,
    under: u32,
    backed_off_since: Option<Instant>,
    yields: u32,
    yielded: Duration,
    steps: Vec<String>,
    deadline_said: bool,
    /// With a deadline: a rate was planned (the start rate is not one).
    planned: bool,
    /// QEMU paused the guest for the switchover: what is left is downtime.
    paused: bool,
}

impl Pacer {
    pub fn new(policy: PacePolicy, now: Instant) -> Pacer {
        let rate = match policy.objective {
            Objective::LeastLinkUse => {
                Some(policy.ceiling.map_or(START_RATE, |c| c.min(START_RATE)))
            }
            _ => policy.ceiling,
        };
        Pacer {
            policy,
            start: now,
            rate,
            base_rtt: None,
            acked: VecDeque::new(),
            first_acked: None,
            last_acked: None,
            delivered_max: 0.0,
            rate_min: rate,
            rate_max: rate,
            over: 0,
            under: 0,
            backed_off_since: None,
            yields: 0,
            yielded: Duration::ZERO,
            steps: Vec::new(),
            deadline_said: false,
            planned: false,
            paused: false,
        }
    }

    /// The rate to start with (before the first look).
    pub fn rate(&self) -> Option<f64> {
        self.rate
    }

    /// The guest was paused for the switchover (QEMU's STOP): from now on [`Self::full_rate`]
    /// (least-link-use; the others keep their ceiling or no limit); returns the rate.
    pub fn guest_paused(&mut self, now: Instant) -> Option<f64> {
        if self.policy.adapts() {
            let full = self.full_rate();
            if !self.paused {
                self.step(
                    now,
                    format!("the guest is paused: the rest at {:.1} MiB/s", full / MIB),
                );
            }
            self.rate = Some(full);
        }
        self.paused = true;
        self.rate
    }

    /// Once the guest is paused every byte is downtime: the link's other traffic waits a
    /// moment. At the most the link has delivered, not unlimited: TCP windows opened
    /// earlier would burst into the bottleneck's queue and lose packets (measured: 1-2.8 s
    /// of downtime instead of 0.6 s at a 4.5 MiB/s deadline pace).
    fn full_rate(&self) -> f64 {
        let ceiling = self.policy.ceiling.unwrap_or(f64::INFINITY);
        self.rate
            .unwrap_or(START_RATE)
            .max(self.delivered_max)
            .min(ceiling)
    }

    /// Takes one look; returns the rate to send at from now.
    pub fn look(&mut self, link: Option<LinkLook>, work: WorkLook, now: Instant) -> Decision {
        let mut queue = None;
        let mut srtt = None;
        if let Some(l) = link {
            if !l.min_rtt.is_zero() {
                self.base_rtt = Some(self.base_rtt.map_or(l.min_rtt, |b| b.min(l.min_rtt)));
            }
            if !l.srtt.is_zero() {
                srtt = Some(l.srtt);
                queue = self.base_rtt.map(|b| l.srtt.saturating_sub(b));
            }
            self.first_acked.get_or_insert((now, l.acked));
            self.last_acked = Some((now, l.acked));
            self.acked.push_back((now, l.acked));
            while self
                .acked
                .front()
                .is_some_and(|(t, _)| now.duration_since(*t) > Duration::from_millis(1100))
            {
                self.acked.pop_front();
            }
            if let (Some(&(t0, a0)), true) = (self.acked.front(), self.acked.len() > 1) {
                let dt = now.duration_since(t0).as_secs_f64();
                if dt >= 0.9 {
                    let r = l.acked.saturating_sub(a0) as f64 / dt;
                    self.delivered_max = self.delivered_max.max(r);
                }
            }
        }
        if self.policy.adapts() {
            let next = self.adapt(queue, work, now);
            // infinite: the deadline is near and there is no ceiling
            self.rate = next.is_finite().then_some(next);
            if let Some(next) = self.rate {
                self.rate_min = Some(self.rate_min.map_or(next, |r| r.min(next)));
                self.rate_max = Some(self.rate_max.map_or(next, |r| r.max(next)));
            }
        }
        Decision {
            rate: self.rate,
            queue,
            srtt,
        }
    }

    fn adapt(&mut self, queue: Option<Duration>, work: WorkLook, now: Instant) -> f64 {
        let ceiling = self.policy.ceiling.unwrap_or(f64::INFINITY);
        let rate = self.rate.unwrap_or(START_RATE);
        let elapsed = now.duration_since(self.start);
        if self.paused {
            return self.full_rate();
        }
        if let Some(deadline) = self.policy.deadline {
            let Some(need) = deadline_rate(deadline, elapsed, work.left, work.dirty_bps) else {
                if !self.deadline_said {
                    self.deadline_said = true;
                    self.step(now, "the deadline is near: no limit but the ceiling".into());
                }
                return ceiling;
            };
            // held while on plan (a rate that follows W / T_left down approaches the
            // deadline without ever reaching the end); raised when behind; lowered when the
            // work turned out much cheaper than planned, but only in the first half (each
            // lower plan spends part of the margin the last one kept)
            let need = need.max(MIN_RATE);
            let first_half = elapsed.as_secs_f64()
                < 0.5
                    * deadline
                        .saturating_sub(deadline_reserve(deadline))
                        .as_secs_f64();
            let held = match self.rate {
                Some(r)
                    if self.planned && need <= r && (need >= REPLAN_BELOW * r || !first_half) =>
                {
                    r
                }
                _ => need,
            };
            self.planned = true;
            return held.min(ceiling);
        }
        // the scavenger: pre-copy must still converge at the floor, and finish: beside a
        // greedy flow that never leaves, floors of 1.5 D (each round two thirds of the
        // last) and then also a fifth of the link did not finish 320 MiB in 600 s
        // (tern-bench shared); at 3 D each round is a third of the last
        let floor = MIN_RATE
            .max(FLOOR_DIRTY * work.dirty_bps)
            .max(FLOOR_SHARE * self.delivered_max)
            .min(ceiling);
        let Some(q) = queue else {
            return rate.max(floor).min(ceiling);
        };
        let target = TARGET_QUEUE.as_secs_f64();
        let q_s = q.as_secs_f64();
        let next = if q_s > target {
            self.over += 1;
            self.under = 0;
            rate * (1.0 - DECREASE * ((q_s - target) / target).min(1.0))
        } else {
            self.over = 0;
            if q_s < target / 2.0 {
                self.under += 1;
            } else {
                self.under = 0;
            }
            // fast once the queue has stayed short for a second (the other traffic left)
            // and while well under the most the link has delivered; slowly near that, where
            // one look's overshoot fills the queue, and while the queue is not settled
            let gain = if self.under >= SETTLED && rate < NEAR_CAPACITY * self.delivered_max {
                INCREASE_FAST
            } else {
                INCREASE_SLOW
            };
            rate + rate.max(MIN_RATE) * gain * (target - q_s) / target
        };
        if self.over >= 2 && self.backed_off_since.is_none() {
            self.backed_off_since = Some(now);
            self.yields += 1;
            self.step(
                now,
                format!(
                    "queueing {:.0} ms over the path's {:.0} ms (target {:.0}): backing off from {:.1} MiB/s",
                    q_s * 1e3,
                    self.base_rtt.unwrap_or_default().as_secs_f64() * 1e3,
                    target * 1e3,
                    rate / MIB
                ),
            );
        }
        if let (Some(since), true) = (self.backed_off_since, self.under >= 2) {
            self.yielded += now.duration_since(since);
            self.backed_off_since = None;
            self.step(
                now,
                format!(
                    "queueing down to {:.0} ms: taking the link back from {:.1} MiB/s",
                    q_s * 1e3,
                    rate / MIB
                ),
            );
        }
        next.max(floor).min(ceiling)
    }

    fn step(&mut self, now: Instant, what: String) {
        if self.steps.len() < MAX_STEPS {
            let ms = now.duration_since(self.start).as_millis();
            self.steps.push(format!("{ms} ms: {what}"));
        }
    }

    /// What it did, at `end`.
    pub fn report(&self, end: Instant) -> PacingReport {
        let mean = match (self.first_acked, self.last_acked) {
            (Some((t0, a0)), Some((t1, a1))) if t1 > t0 => {
                a1.saturating_sub(a0) as f64 / t1.duration_since(t0).as_secs_f64()
            }
            _ => 0.0,
        };
        let yielded = self.yielded
            + self
                .backed_off_since
                .map_or(Duration::ZERO, |s| end.duration_since(s));
        let mib = |b: f64| (b / MIB * 10.0).round() / 10.0;
        PacingReport {
            objective: self.policy.objective.as_str().into(),
            deadline_s: self.policy.deadline.map(|d| d.as_secs()),
            deadline_met: self
                .policy
                .deadline
                .map(|d| end.duration_since(self.start) <= d),
            base_rtt_ms: self.base_rtt.map_or(0.0, |b| b.as_secs_f64() * 1e3),
            target_queue_ms: if self.policy.adapts() && self.policy.deadline.is_none() {
                TARGET_QUEUE.as_secs_f64() * 1e3
            } else {
                0.0
            },
            delivered_mean_mibps: mib(mean),
            delivered_max_mibps: mib(self.delivered_max),
            rate_min_mibps: self.rate_min.map(mib),
            rate_max_mibps: self.rate_max.map(mib),
            yields: self.yields,
            yielded_ms: yielded.as_millis() as u64,
            steps: self.steps.clone(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LOOK: Duration = Duration::from_millis(250);

    /// A bottleneck of `cap` bytes/s with a queue of at most `max_queue` (tc tbf's
    /// latency), a base round trip, tern sending at its rate and other traffic, greedy
    /// TCP (+1 MiB/s a look, 0.7 of it when the queue overflows) while `cross` says so.
    struct Link {
        cap: f64,
        base: Duration,
        max_queue: Duration,
        queue_bytes: f64,
        cross_rate: f64,
        acked: f64,
        cross_sent: f64,
    }

    impl Link {
        fn new(cap: f64) -> Link {
            Link {
                cap,
                base: Duration::from_millis(50),
                max_queue: Duration::from_millis(50),
                queue_bytes: 0.0,
                cross_rate: 0.0,
                acked: 0.0,
                cross_sent: 0.0,
            }
        }

        /// One look's worth of time; returns tern's delivered bytes.
        fn run(&mut self, tern_rate: f64, cross: bool) -> f64 {
            let dt = LOOK.as_secs_f64();
            let tern = tern_rate.min(self.cap * 4.0);
            let offered = tern + if cross { self.cross_rate } else { 0.0 };
            self.queue_bytes += (offered - self.cap) * dt;
            let max = self.cap * self.max_queue.as_secs_f64();
            let overflow = self.queue_bytes > max;
            self.queue_bytes = self.queue_bytes.clamp(0.0, max);
            // what got through, shared in proportion to what was offered
            let through = offered.min(self.cap) * dt;
            let tern_share = if offered > 0.0 { tern / offered } else { 0.0 };
            self.acked += through * tern_share;
            self.cross_sent += through * (1.0 - tern_share);
            if cross {
                // CUBIC: 0.7 of the rate on a loss, back up quickly
                self.cross_rate = if overflow {
                    self.cross_rate * 0.7
                } else {
                    self.cross_rate + MIB
                };
            } else {
                self.cross_rate = 0.0;
            }
            through * tern_share
        }

        fn look(&self) -> LinkLook {
            LinkLook {
                srtt: self.base + Duration::from_secs_f64(self.queue_bytes / self.cap),
                min_rtt: self.base,
                acked: self.acked as u64,
            }
        }
    }

    fn scavenger() -> PacePolicy {
        PacePolicy {
            objective: Objective::LeastLinkUse,
            ceiling: None,
            deadline: None,
        }
    }

    /// A scavenger starting now on a link of `cap` bytes/s, with endless work.
    fn scavenger_on(cap: f64) -> (Link, Instant, Pacer, WorkLook) {
        let t0 = Instant::now();
        let work = WorkLook {
            left: 1e12,
            dirty_bps: 0.0,
        };
        (Link::new(cap), t0, Pacer::new(scavenger(), t0), work)
    }

    #[test]
    fn alone_on_the_link_the_scavenger_takes_it_and_keeps_the_queue_short() {
        let cap = 12.0 * MIB;
        let (mut link, t0, mut p, work) = scavenger_on(cap);
        let (mut sent, mut queue_max) = (0.0, Duration::ZERO);
        for i in 1..=80 {
            let d = p.look(Some(link.look()), work, t0 + LOOK * i);
            let got = link.run(d.rate.unwrap(), false);
            if i > 40 {
                sent += got;
                queue_max = queue_max.max(d.queue.unwrap());
            }
        }
        let share = sent / (cap * 10.0);
        assert!(share > 0.8, "the link's share it used: {share:.2}");
        assert!(queue_max < TARGET_QUEUE * 2, "{queue_max:?}");
    }

    #[test]
    fn the_scavenger_yields_to_other_traffic_and_takes_the_link_back_when_it_leaves() {
        let cap = 12.0 * MIB;
        let (mut link, t0, mut p, work) = scavenger_on(cap);
        let mut shares = [0.0; 3];
        for i in 1..=120u32 {
            // other traffic from 10 s to 20 s
            let cross = (40..80).contains(&i);
            let d = p.look(Some(link.look()), work, t0 + LOOK * i);
            let got = link.run(d.rate.unwrap(), cross);
            // the second half of each 10 s
            if i % 40 >= 20 {
                shares[(i / 40) as usize] += got / (cap * 5.0);
            }
        }
        assert!(shares[0] > 0.8, "{shares:?}");
        assert!(
            shares[1] < 0.35,
            "it yields to the other traffic: {shares:?}"
        );
        assert!(
            shares[1] > 0.15,
            "down to a fifth of the link, not less: {shares:?}"
        );
        assert!(shares[2] > 0.8, "and takes the link back: {shares:?}");
        let r = p.report(t0 + LOOK * 120);
        assert!(r.yields >= 1, "{r:?}");
        assert!(r.yielded_ms > 3000, "{r:?}");
        assert!(
            r.steps.iter().any(|s| s.contains("taking the link back")),
            "{r:?}"
        );
        assert_eq!(r.base_rtt_ms, 50.0);
    }

    #[test]
    fn the_scavenger_never_goes_below_what_lets_pre_copy_converge() {
        let cap = 12.0 * MIB;
        let mut link = Link::new(cap);
        let t0 = Instant::now();
        let mut p = Pacer::new(scavenger(), t0);
        let work = WorkLook {
            left: 1e12,
            dirty_bps: 2.0 * MIB,
        };
        for i in 1..=80 {
            let d = p.look(Some(link.look()), work, t0 + LOOK * i);
            assert!(d.rate.unwrap() >= 6.0 * MIB - 1.0, "{d:?}");
            link.run(d.rate.unwrap(), true);
        }
    }

    #[test]
    fn with_a_deadline_it_sends_just_fast_enough_and_finishes_in_time() {
        let t0 = Instant::now();
        let policy = PacePolicy {
            objective: Objective::LeastLinkUse,
            ceiling: Some(100.0 * MIB),
            deadline: Some(Duration::from_secs(60)),
        };
        let mut p = Pacer::new(policy, t0);
        // 200 MiB to send, the guest dirties 1 MiB/s (which pre-copy sends again)
        let (mut left, dirty) = (200.0 * MIB, MIB);
        let mut t = t0;
        let mut rates = Vec::new();
        while left > 0.0 {
            t += LOOK;
            assert!(t.duration_since(t0) < Duration::from_secs(60), "late");
            let d = p.look(
                None,
                WorkLook {
                    left,
                    dirty_bps: dirty,
                },
                t,
            );
            let r = d.rate.unwrap();
            rates.push(r);
            left += (dirty - r) * LOOK.as_secs_f64();
        }
        let took = t.duration_since(t0).as_secs_f64();
        assert!(took > 40.0, "it did not rush: {took:.1} s");
        // the first look, 0.25 s in, 3 s kept back (5%): 1.1 * (200 MiB / 56.75 s + 1 MiB/s)
        assert!((rates[0] / MIB - 4.98).abs() < 0.01, "{}", rates[0] / MIB);
        assert!(rates.iter().all(|r| *r <= rates[0]), "never above the plan");
        assert!(
            rates.windows(2).filter(|w| w[1] != w[0]).count() < 10,
            "held, not changed every look"
        );
        let r = p.report(t);
        assert_eq!(r.deadline_met, Some(true));
        assert_eq!(r.objective, "least-link-use");
    }

    #[test]
    fn work_cheaper_than_planned_lowers_the_rate_early_on() {
        let t0 = Instant::now();
        let policy = PacePolicy {
            objective: Objective::LeastLinkUse,
            ceiling: None,
            deadline: Some(Duration::from_secs(100)),
        };
        let mut p = Pacer::new(policy, t0);
        let look = |left: f64| WorkLook {
            left,
            dirty_bps: 0.0,
        };
        // 1 GiB of RAM, costed at full pages before any was sent
        let first = p.look(None, look(1024.0 * MIB), t0 + Duration::from_secs(1));
        // most of it was zero: 100 MiB of wire bytes left
        let cheaper = p.look(None, look(100.0 * MIB), t0 + Duration::from_secs(3));
        assert!(
            cheaper.rate.unwrap() < 0.2 * first.rate.unwrap(),
            "{first:?} {cheaper:?}"
        );
        // late in the window the plan is held, not lowered
        let late = p.look(None, look(10.0 * MIB), t0 + Duration::from_secs(70));
        assert_eq!(late.rate, cheaper.rate);
    }

    #[test]
    fn once_the_guest_is_paused_the_rest_goes_at_what_the_link_delivered() {
        let t0 = Instant::now();
        // 64 MiB left, 600 s to go: a slow pace; the link delivered 10 MiB/s once
        let mut p = Pacer::new(
            PacePolicy {
                objective: Objective::LeastLinkUse,
                ceiling: None,
                deadline: Some(Duration::from_secs(600)),
            },
            t0,
        );
        let w = WorkLook {
            left: 64.0 * MIB,
            dirty_bps: MIB,
        };
        let mut before = None;
        for i in 1..=8u32 {
            let link = LinkLook {
                srtt: Duration::from_millis(50),
                min_rtt: Duration::from_millis(50),
                acked: (f64::from(i) * 2.5 * MIB) as u64,
            };
            before = p.look(Some(link), w, t0 + LOOK * i).rate;
        }
        assert!(before.unwrap() < 2.0 * MIB, "{before:?}");
        let after = p.guest_paused(t0 + LOOK * 9).unwrap();
        // and so it stays, look after look
        assert_eq!(p.look(None, w, t0 + LOOK * 10).rate, Some(after));
        assert!((after / MIB - 10.0).abs() < 0.1, "{}", after / MIB);
        let r = p.report(t0 + LOOK * 9);
        assert!(r.steps.iter().any(|s| s.contains("paused")), "{r:?}");
        // QEMU's STOP says the same, between looks
        let mut q = Pacer::new(scavenger(), t0);
        assert!(q.guest_paused(t0).is_some());
    }

    #[test]
    fn behind_the_deadline_it_takes_what_the_ceiling_allows() {
        let t0 = Instant::now();
        let policy = PacePolicy {
            objective: Objective::LeastLinkUse,
            ceiling: Some(50.0 * MIB),
            deadline: Some(Duration::from_secs(10)),
        };
        let mut p = Pacer::new(policy, t0);
        let work = WorkLook {
            left: 4000.0 * MIB,
            dirty_bps: 0.0,
        };
        assert_eq!(
            p.look(None, work, t0 + Duration::from_secs(1)).rate,
            Some(50.0 * MIB),
            "4000 MiB in 7 s is more than the ceiling"
        );
        let late = p.look(None, work, t0 + Duration::from_secs(9));
        assert_eq!(late.rate, Some(50.0 * MIB));
        assert!(p.report(t0 + Duration::from_secs(11)).deadline_met == Some(false));
    }

    #[test]
    fn fastest_and_least_downtime_keep_the_ceiling_or_no_limit() {
        let t0 = Instant::now();
        for (objective, ceiling) in [
            (Objective::Fastest, None),
            (Objective::Fastest, Some(10.0 * MIB)),
            (Objective::LeastDowntime, None),
        ] {
            let mut p = Pacer::new(
                PacePolicy {
                    objective,
                    ceiling,
                    deadline: None,
                },
                t0,
            );
            let mut link = Link::new(12.0 * MIB);
            for i in 1..=20 {
                let d = p.look(Some(link.look()), WorkLook::default(), t0 + LOOK * i);
                assert_eq!(d.rate, ceiling);
                link.run(d.rate.unwrap_or(1e9), true);
            }
            let r = p.report(t0 + LOOK * 20);
            assert_eq!(r.yields, 0);
            assert_eq!(r.rate_max_mibps, ceiling.map(|c| c / MIB));
        }
    }
}

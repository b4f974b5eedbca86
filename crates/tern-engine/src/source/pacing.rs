//! The source's pacing task: every 250 ms a look at the data connections (the kernel's
//! round trip and acknowledged bytes, `transport::probe`) and at the work left (from the
//! migration's progress), fed to the bandwidth controller (`crate::pace`); the rate it
//! returns goes to the migration's rate limit, which memory and disk frames draw from.
//! Runs from the end of Prepare to the end of the migration.

use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use tern_api::{PacingReport, Progress};

use super::AbortOnDrop;
use crate::handle::MigrationHandle;
use crate::pace::{LinkLook, PacePolicy, Pacer, WorkLook};
use crate::transport::probe::TcpProbe;
use crate::transport::rate::RateLimit;

const LOOK_EVERY: Duration = Duration::from_millis(250);
const PAGE: f64 = 4096.0;

/// The controller of one migration, and the task that drives it.
pub(crate) struct Pacing {
    pacer: Arc<Mutex<Pacer>>,
    budget: Option<Arc<RateLimit>>,
    _task: AbortOnDrop,
}

/// The rate limit a migration starts with: one when the controller adapts or there is a
/// ceiling, else none.
pub(crate) fn budget(policy: &PacePolicy, pacer: &Pacer) -> Option<Arc<RateLimit>> {
    if policy.adapts() || policy.ceiling.is_some() {
        Some(Arc::new(RateLimit::new(
            pacer.rate().map_or(u64::MAX, |r| r as u64),
        )))
    } else {
        None
    }
}

impl Pacing {
    pub fn start(
        handle: Arc<MigrationHandle>,
        probes: Vec<TcpProbe>,
        budget: Option<Arc<RateLimit>>,
        pacer: Pacer,
        dirty_hint: Option<f64>,
    ) -> Pacing {
        let pacer = Arc::new(Mutex::new(pacer));
        let p = pacer.clone();
        let limit = budget.clone();
        let task = crate::spawn(async move {
            let mut tick = tokio::time::interval(LOOK_EVERY);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            let mut last_acked = vec![0u64; probes.len()];
            // QEMU's last dirty-bitmap sync (its count, when tern saw it change)
            let mut sync = (None, Instant::now());
            loop {
                tick.tick().await;
                let link = look_at(&probes, &mut last_acked);
                let progress = handle.status().progress;
                if progress.dirty_sync_count != sync.0 {
                    sync = (progress.dirty_sync_count, Instant::now());
                }
                let work = work_left(&progress, dirty_hint, sync.1.elapsed());
                let d = p.lock().look(link, work, Instant::now());
                if let Some(b) = &limit {
                    b.set_rate(d.rate.map_or(u64::MAX, |r| r as u64));
                }
                let ms = |d: Duration| (d.as_secs_f64() * 1e4).round() / 10.0;
                handle.update(|s| {
                    s.progress.rate_limit_mibps =
                        d.rate.map(|r| (r / 1048576.0 * 10.0).round() / 10.0);
                    s.progress.rtt_ms = d.srtt.map(ms);
                    s.progress.queue_delay_ms = d.queue.map(ms);
                });
            }
        });
        Pacing {
            pacer,
            budget,
            _task: AbortOnDrop(task.abort_handle()),
        }
    }

    /// QEMU paused the guest for the switchover: what is left goes at the most the link
    /// delivered (within the ceiling) now, not at the next look.
    pub fn guest_paused(&self) {
        let rate = self.pacer.lock().guest_paused(Instant::now());
        if let Some(b) = &self.budget {
            b.set_rate(rate.map_or(u64::MAX, |r| r as u64));
        }
    }

    pub fn report(&self) -> PacingReport {
        self.pacer.lock().report(Instant::now())
    }
}

/// The connections together: the round trip of those that carried data since the last
/// look (else of all), the least round trip of any, the bytes acknowledged on all.
fn look_at(probes: &[TcpProbe], last_acked: &mut [u64]) -> Option<LinkLook> {
    let mut look = LinkLook::default();
    let (mut active, mut all) = ((Duration::ZERO, 0u32), (Duration::ZERO, 0u32));
    for (probe, last) in probes.iter().zip(last_acked.iter_mut()) {
        let Ok(st) = probe.read() else { continue };
        look.acked += st.bytes_acked;
        if !st.min_rtt.is_zero() && (look.min_rtt.is_zero() || st.min_rtt < look.min_rtt) {
            look.min_rtt = st.min_rtt;
        }
        all = (all.0 + st.srtt, all.1 + 1);
        if st.bytes_acked > *last {
            active = (active.0 + st.srtt, active.1 + 1);
        }
        *last = st.bytes_acked;
    }
    let (sum, n) = if active.1 > 0 { active } else { all };
    if n == 0 {
        return None;
    }
    look.srtt = sum / n;
    Some(look)
}

/// What is left to send, in bytes on the wire: memory at the rate pages have cost so far
/// (zero pages and references cost almost nothing), disks at what their scanned part cost;
/// what the guest dirties, at what a page that is not zero cost (QEMU measures the dirty
/// rate only from its second pass on: before, `dirty_hint`, sampled while tern connected).
/// Memory left counts what the guest dirtied since QEMU's last bitmap sync
/// (`since_sync` ago), which its count of remaining bytes does not show yet: at a 40 s
/// deadline, a pass of 30 s left 33 MiB for the next one that a plan without it missed.
fn work_left(p: &Progress, dirty_hint: Option<f64>, since_sync: Duration) -> WorkLook {
    let pages = p.pages.zero + p.pages.raw + p.pages.refs + p.pages.deltas;
    let disk_wire = p.disk.as_ref().map_or(0, |d| d.wire_bytes);
    let mem_wire = p.bytes_on_wire.saturating_sub(disk_wire) as f64;
    // what a byte of RAM costs on the wire: what the pages seen so far cost, pulled
    // towards a full byte until a quarter of RAM was seen (the first pages are the
    // kernel's and often zero: the plan must not bet the deadline on them)
    let seen = pages as f64 * PAGE;
    let prior = 0.25 * p.ram_total.unwrap_or(0) as f64;
    let per_byte = if seen.max(prior) > 0.0 {
        ((mem_wire + (prior - seen).max(0.0)) / seen.max(prior)).clamp(0.01, 1.1)
    } else {
        1.0
    };
    let mem_left = match (p.qemu_status.as_str(), p.ram_remaining) {
        ("" | "setup", _) | (_, None) => p.ram_total.unwrap_or(0),
        (_, Some(r)) => r,
    } as f64;
    let disk_left = p.disk.as_ref().map_or(0.0, |d| {
        let rest = d.virtual_bytes.saturating_sub(d.scanned_bytes) as f64;
        if d.scanned_bytes > 0 {
            rest * (d.wire_bytes as f64 / d.scanned_bytes as f64).min(1.1)
        } else {
            rest
        }
    });
    let data_pages = p.pages.raw + p.pages.refs + p.pages.deltas;
    let per_dirty_byte = if data_pages >= 256 {
        (mem_wire / (data_pages as f64 * PAGE)).clamp(0.01, 1.1)
    } else {
        1.0
    };
    let dirty = match p.dirty_sync_count.unwrap_or(0) {
        0 | 1 => dirty_hint.unwrap_or(0.0),
        _ => p.dirty_pages_rate.unwrap_or(0) as f64 * PAGE,
    };
    // at most every page already sent once is dirty again
    let sent = (p.ram_total.unwrap_or(0) as f64 - mem_left).max(0.0);
    let backlog = (dirty * since_sync.as_secs_f64()).min(sent);
    WorkLook {
        left: mem_left * per_byte + backlog * per_dirty_byte + disk_left,
        dirty_bps: dirty * per_dirty_byte,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_work_left_counts_memory_at_what_its_pages_cost_so_far() {
        let mut p = Progress {
            ram_total: Some(1 << 30),
            ..Default::default()
        };
        // nothing sent yet: all of RAM, at full cost
        assert_eq!(
            work_left(&p, None, Duration::ZERO).left,
            (1u64 << 30) as f64
        );
        // half the pages were zero so far (the wire carried half their bytes), 256 MiB
        // left in this round, 100 pages/s dirtied; a quarter of RAM was seen
        p.qemu_status = "active".into();
        p.pages.zero = 32768;
        p.pages.raw = 32768;
        p.bytes_on_wire = 32768 * 4096;
        p.ram_remaining = Some(256 << 20);
        p.dirty_pages_rate = Some(100);
        p.dirty_sync_count = Some(2);
        let w = work_left(&p, Some(1e9), Duration::ZERO);
        assert_eq!(w.left, (128u64 << 20) as f64);
        // dirtied pages are data: at what a data page cost (the whole wire went to them)
        assert_eq!(w.dirty_bps, 100.0 * 4096.0);
        // in the first pass QEMU has no dirty rate: the one sampled at the start counts
        p.dirty_sync_count = Some(1);
        assert_eq!(work_left(&p, Some(2e6), Duration::ZERO).dirty_bps, 2e6);
        // 10 s after the sync, 2 MB/s dirtied since then must go again: 20 MB more
        // (at a data page's cost, here a full byte)
        let later = work_left(&p, Some(2e6), Duration::from_secs(10));
        assert_eq!(later.left - w.left, 20e6);
        // but never more than was already sent (the rest is in QEMU's count)
        let long = work_left(&p, Some(2e6), Duration::from_secs(100_000));
        assert_eq!(long.left - w.left, ((1u64 << 30) - (256u64 << 20)) as f64);
        // after 16 MiB of zero pages: still costed near a full byte
        p.pages = Default::default();
        p.pages.zero = 4096;
        p.bytes_on_wire = 0;
        let early = work_left(&p, None, Duration::ZERO);
        assert!(
            (early.left / (256u64 << 20) as f64 - 0.9375).abs() < 1e-9,
            "{early:?}"
        );
    }
}

//! `--plan`: what moving a VM would cost, with nothing of it moved. It runs what a
//! migration starts with (the checks of QEMU's configuration and the disks' sizes, mutual
//! TLS, Hello, the policy on the destination's labels), measures the guest's dirty rate
//! (QEMU's page sampling), and runs the model (`converge::simulate`, the same decisions as
//! a real migration) over the rate memory crossed at to that destination before, which the
//! daemon remembers ([`LinkMemory`]), or `--max-bandwidth`.

use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::json;
use tern_api::{Direction, MigrationPlan, PlanInputs, PlanPrediction};
use tern_qemu::qmp::{QmpClient, QmpError};

use super::{checks, connect, MigrateError, MigrateRequest, Migration, SourceVm};
use crate::converge::{self, Scenario};
use crate::handle::{new_migration_id, MigrationHandle};
use crate::{Engine, Host};

/// How long QEMU samples the guest's dirty pages.
const DIRTY_SAMPLE: Duration = Duration::from_secs(1);
/// Before the first page: TLS, Hello, Prepare, the destination's QEMU starting.
const SETUP: Duration = Duration::from_secs(1);

/// What the daemon remembers of migrations to one destination.
#[derive(Debug, Clone, PartialEq)]
pub struct LinkMemory {
    /// Bytes/s of QEMU's stream that crossed (pages that were not zero), and wire bytes
    /// per stream byte.
    pub stream_bps: f64,
    pub wire_ratio: f64,
    /// Where it comes from, in words.
    pub from: String,
}

/// Measures and predicts; nothing of the VM moves.
pub async fn plan(
    engine: Arc<Engine>,
    host: Arc<dyn Host>,
    vm: SourceVm,
    req: MigrateRequest,
    link: Option<LinkMemory>,
) -> Result<MigrationPlan, MigrateError> {
    let handle = Arc::new(MigrationHandle::new(
        new_migration_id(),
        vm.spec.name.clone(),
        Direction::Outgoing,
        req.to.clone(),
    ));
    let mut m = Migration::new(engine, host, vm, req, handle, None);
    let checked = checks::run(&mut m).await?;
    let peer = connect::run(&mut m).await?;
    let (rtt, version, dest_agent) = (peer.rtt, peer.version, peer.agent.clone());
    // Hello only: the destination forgets the connection
    drop(peer);
    m.writer = None;
    let dirty_mibps = if m.source_running {
        dirty_rate(&m).await?
    } else {
        0.0
    };
    let content = sample_content(&m).await;
    let policy = converge::Policy::from_request(&m.req);
    let ram = u64::from(m.vm.spec.memory_mib) << 20;
    let disk_bytes: u64 = checked.disks.iter().flatten().map(|d| d.allocated).sum();
    let (rate, wire_ratio, link_from) = link_rate(link.as_ref(), &m.req, content);
    let mut notes = vec![
        match content {
            Some(c) => format!("{} pages of RAM sampled: {:.0}% zero (counted as free), the rest compresses to {:.0}%; pages the destination holds are counted as data", c.pages, c.zero * 100.0, c.ratio * 100.0),
            None => "all of RAM is counted as data (RAM could not be sampled; pages that are zero or the destination holds go faster: the prediction is an upper bound on the first pass)".to_string(),
        },
        "the throttle is assumed to slow the guest's dirtying in proportion (true of CPU-bound guests; a guest paced by I/O or a clock is slowed less)".to_string(),
    ];
    if disk_bytes > 0 {
        notes.push("disks are counted at their allocated size (blocks the destination's images hold are not sent)".into());
    }
    let prediction = match rate {
        None => {
            notes.push("the link's rate is not known: the first migration to this destination measures it (or give --max-bandwidth)".into());
            None
        }
        Some(rate) => Some(predict(
            ram as f64 * (1.0 - content.map_or(0.0, |c| c.zero)),
            dirty_mibps * 1048576.0,
            (rate, wire_ratio),
            disk_bytes,
            rtt,
            policy,
            m.req.deadline_s.map(Duration::from_secs),
        )),
    };
    if m.req.objective() == tern_api::Objective::LeastLinkUse && m.req.deadline_s.is_none() {
        notes.push("least-link-use yields to the link's other traffic: the prediction assumes the link is free (it takes longer while other traffic runs)".into());
    }
    Ok(MigrationPlan {
        vm: m.vm.spec.name.clone(),
        destination: m.req.to.clone(),
        destination_agent: dest_agent,
        protocol_version: version,
        inputs: PlanInputs {
            ram_bytes: ram,
            zero_fraction: content.map(|c| c.zero),
            compressed_ratio: content.map(|c| c.ratio),
            disk_bytes,
            dirty_mibps,
            dirty_sample_s: DIRTY_SAMPLE.as_secs(),
            rtt_ms: rtt.as_secs_f64() * 1e3,
            link_mibps: rate.map(|r| r / 1048576.0),
            wire_ratio,
            link_from,
            downtime_limit_ms: policy.downtime_ms,
            max_throttle: policy.max_throttle,
            max_downtime_ms: policy.max_downtime_ms,
        },
        prediction,
        notes,
    })
}

/// What a sample of the guest's RAM says: the share of pages that are zero, and wire bytes
/// per byte of the rest (zstd -1, as tern compresses where the link is the bottleneck).
#[derive(Debug, Clone, Copy, PartialEq)]
pub(super) struct Content {
    zero: f64,
    ratio: f64,
    pages: usize,
}

/// Samples 1024 pages of the guest's RAM (read from its QEMU process; nothing pauses).
async fn sample_content(m: &Migration) -> Option<Content> {
    let pid = m.vm.pid?;
    match tern_qemu::ramsample::sample(m.vm.qmp().ok()?, pid, 1024).await {
        Ok(s) if s.pages > 0 => {
            let ratio = if s.nonzero.is_empty() {
                1.0
            } else {
                zstd::bulk::compress(&s.nonzero, 1)
                    .map_or(1.0, |c| c.len() as f64 / s.nonzero.len() as f64)
                    .min(1.0)
            };
            Some(Content {
                zero: s.zero as f64 / s.pages as f64,
                ratio,
                pages: s.pages,
            })
        }
        Ok(_) => None,
        Err(e) => {
            tracing::debug!(migration = %m.handle.id, "no RAM sample for the prediction: {}", crate::error_chain(&e));
            None
        }
    }
}

/// The rate memory crosses at (bytes/s of QEMU's stream), wire bytes per stream byte, and
/// where they come from: the link's capacity this host learned in past migrations to the
/// destination, within `--max-bandwidth`; this guest's own content (a sample) says how
/// many stream bytes that capacity carries when the link is the bottleneck.
fn link_rate(
    link: Option<&LinkMemory>,
    req: &MigrateRequest,
    content: Option<Content>,
) -> (Option<f64>, f64, String) {
    let cap = req.max_bandwidth_mibps.map(|mib| (mib << 20) as f64);
    // the wire's capacity, and whether pages were compressed on it (the link was the
    // bottleneck), as far as known
    let (wire, compressed, from) = match (link, cap) {
        (Some(l), Some(c)) => (
            Some((l.stream_bps * l.wire_ratio).min(c)),
            true,
            format!("{}, within --max-bandwidth", l.from),
        ),
        (Some(l), None) => (
            Some(l.stream_bps * l.wire_ratio),
            l.wire_ratio < 0.9,
            l.from.clone(),
        ),
        (None, Some(c)) => (
            Some(c),
            true,
            "--max-bandwidth (no migration to this destination yet)".to_string(),
        ),
        (None, None) => (
            None,
            false,
            "unknown: no migration to this destination yet".to_string(),
        ),
    };
    let Some(wire) = wire else {
        return (None, 1.0, from);
    };
    match (content, link) {
        // the link is the bottleneck: this guest's pages compress as the sample says
        (Some(c), _) if compressed => (Some(wire / c.ratio.max(0.01)), c.ratio, from),
        (_, Some(l)) => (Some(l.stream_bps), l.wire_ratio, from),
        (_, None) => (Some(wire), 1.0, from),
    }
}

/// For the prediction a migration's report shows, when it can have one (the link's rate is
/// known): samples the guest's RAM and starts QEMU's sampling of its dirty rate (200 ms).
pub(super) async fn start_sampling(m: &mut Migration) {
    // the bandwidth controller needs the dirty rate from the start (QEMU has none until its
    // first pass ends)
    let wanted = link_rate(m.link.as_ref(), &m.req, None).0.is_some()
        || m.req.objective() == tern_api::Objective::LeastLinkUse;
    if !m.source_running || !wanted {
        return;
    }
    let Ok(qmp) = m.vm.qmp() else {
        return; // libvirt's QEMU: no sampling
    };
    m.content = sample_content(m).await;
    let r = start_dirty_rate(qmp, Duration::from_millis(200)).await;
    if let Err(e) = &r {
        tracing::debug!(migration = %m.handle.id, "no dirty-rate sampling for the prediction: {e}");
    }
    m.dirty_sampling = r.is_ok();
}

/// The dirty rate QEMU sampled while tern connected, bytes/s (None: not sampled, or not
/// done yet).
pub(super) async fn dirty_rate_at_start(m: &Migration) -> Option<f64> {
    if !m.dirty_sampling {
        return None;
    }
    Some(measured_dirty_rate(m.vm.qmp().ok()?).await.ok()?? * 1048576.0)
}

/// The prediction from what was known when the migration started (the dirty rate sampled
/// while it connected, the link this host learned before, Hello's round trip): None when
/// the link's rate was not known or the sample did not finish.
pub(super) async fn prediction_at_start(m: &Migration, disk_bytes: u64) -> Option<PlanPrediction> {
    if !m.dirty_sampling {
        return None;
    }
    let (rate, wire_ratio, _) = link_rate(m.link.as_ref(), &m.req, m.content);
    let rate = rate?;
    let dirty = measured_dirty_rate(m.vm.qmp().ok()?).await.ok()??;
    let zero = m.content.map_or(0.0, |c| c.zero);
    Some(predict(
        f64::from(m.vm.spec.memory_mib) * 1048576.0 * (1.0 - zero),
        dirty * 1048576.0,
        (rate, wire_ratio),
        disk_bytes,
        m.rtt,
        converge::Policy::from_request(&m.req),
        m.req.deadline_s.map(Duration::from_secs),
    ))
}

/// The model over measured inputs: rates in bytes/s.
/// `link`: the rate memory crosses at (bytes/s of QEMU's stream) and wire bytes per
/// stream byte.
fn predict(
    ram: f64,
    dirty_bps: f64,
    (rate, wire_ratio): (f64, f64),
    disk_bytes: u64,
    rtt: Duration,
    policy: converge::Policy,
    deadline: Option<Duration>,
) -> PlanPrediction {
    // with a deadline, tern paces to the lowest rate that finishes in time
    // (docs/bandwidth.md), when the link is faster than that
    let link = rate;
    let paced = deadline.and_then(|d| {
        let need =
            crate::pace::deadline_rate(d, SETUP + rtt * 4, ram + disk_bytes as f64, dirty_bps)?;
        (need < link).then_some(need)
    });
    let rate = paced.unwrap_or(link);
    let s = Scenario {
        memory: ram,
        dirty_bps,
        rate_bps: rate,
        policy,
    };
    let o = converge::simulate(&s);
    let mut plain = s;
    plain.policy.max_throttle = 0;
    plain.policy.max_downtime_ms = plain.policy.downtime_ms;
    let unhelped = converge::simulate(&plain);
    let disk_time = Duration::from_secs_f64(disk_bytes as f64 / rate);
    // the pause: the last dirty set, the device state and the commit's round trips
    let downtime = o.downtime + rtt * 2 + Duration::from_millis(30);
    let total = SETUP + rtt * 4 + disk_time + o.transfer + downtime;
    let summary = if o.stops {
        format!(
            "pre-copy will not converge within what is allowed (throttle up to {}%, downtime limit up to {} ms): tern will stop with not-converging after --converge-timeout; allow more or give it more bandwidth",
            policy.max_throttle, policy.max_downtime_ms
        )
    } else if !unhelped.stops && o.throttle == 0 && o.downtime_ms == policy.downtime_ms {
        "plain pre-copy converges: no throttle, no change to the downtime limit".to_string()
    } else {
        let mut what = Vec::new();
        if o.throttle > 0 {
            what.push(format!("throttle the guest to about {}%", o.throttle));
        }
        if o.downtime_ms > policy.downtime_ms {
            what.push(format!("raise the downtime limit to {} ms", o.downtime_ms));
        }
        format!(
            "plain pre-copy does not converge at this dirty rate: tern will {}",
            what.join(", then ")
        )
    };
    let summary = match (deadline, paced) {
        (Some(d), Some(r)) => format!(
            "paced to the {} s deadline at about {:.1} MiB/s of QEMU's stream (the link carries {:.1}); {summary}",
            d.as_secs(),
            r / 1048576.0,
            link / 1048576.0
        ),
        (Some(d), None) => format!(
            "the {} s deadline cannot be met at the link's rate: tern will send at the link's rate; {summary}",
            d.as_secs()
        ),
        _ => summary,
    };
    PlanPrediction {
        total_s: total.as_secs_f64(),
        downtime_ms: downtime.as_secs_f64() * 1e3,
        memory_wire_bytes: (o.stream_bytes * wire_ratio) as u64,
        disk_wire_bytes: (disk_bytes as f64 * wire_ratio) as u64,
        rounds: o.rounds,
        converges_without_help: !unhelped.stops,
        throttle_pct: o.throttle,
        downtime_limit_ms: o.downtime_ms,
        stops: o.stops,
        summary,
    }
}

/// The guest's dirty rate, MiB/s, by QEMU's page sampling over [`DIRTY_SAMPLE`].
async fn dirty_rate(m: &Migration) -> Result<f64, MigrateError> {
    let qmp = m.vm.qmp()?;
    start_dirty_rate(qmp, DIRTY_SAMPLE).await?;
    let within = DIRTY_SAMPLE + Duration::from_secs(10);
    let deadline = Instant::now() + within;
    loop {
        tokio::time::sleep(Duration::from_millis(200)).await;
        if let Some(rate) = measured_dirty_rate(qmp).await? {
            return Ok(rate);
        }
        if Instant::now() > deadline {
            return Err(MigrateError::Timeout(
                within,
                "QEMU's dirty-rate measurement",
            ));
        }
    }
}

/// Starts QEMU's page sampling of the guest's dirty rate over `calc` (16384 pages per
/// GiB, its most: with its default 512 a small working set is often missed). Whole
/// seconds go as seconds (every QEMU), anything else in ms (QEMU 8.2 and later).
async fn start_dirty_rate(qmp: &QmpClient, calc: Duration) -> Result<(), QmpError> {
    let args = if calc.subsec_millis() == 0 {
        json!({ "calc-time": calc.as_secs(), "sample-pages": 16384 })
    } else {
        json!({ "calc-time": calc.as_millis() as u64, "calc-time-unit": "millisecond", "sample-pages": 16384 })
    };
    qmp.execute("calc-dirty-rate", Some(args)).await?;
    Ok(())
}

/// The dirty rate QEMU measured, MiB/s; None while it is still measuring.
async fn measured_dirty_rate(qmp: &QmpClient) -> Result<Option<f64>, QmpError> {
    let v = qmp.execute("query-dirty-rate", None).await?;
    if v.get("status").and_then(|s| s.as_str()) != Some("measured") {
        return Ok(None);
    }
    Ok(Some(
        v.get("dirty-rate").and_then(|r| r.as_f64()).unwrap_or(0.0),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: f64 = 1048576.0;

    fn policy() -> converge::Policy {
        converge::Policy {
            max_throttle: 99,
            downtime_ms: 300,
            max_downtime_ms: 300,
            give_up_after: Duration::from_secs(60),
        }
    }

    #[test]
    fn a_quiet_guest_is_predicted_to_take_its_memory_over_the_rate() {
        let p = predict(
            1024.0 * MIB,
            0.5 * MIB,
            (100.0 * MIB, 0.5),
            0,
            Duration::from_millis(50),
            policy(),
            None,
        );
        assert!(
            p.converges_without_help && !p.stops && p.throttle_pct == 0,
            "{p:?}"
        );
        assert!((11.0..12.0).contains(&p.total_s), "{p:?}");
        assert!(p.memory_wire_bytes < (530.0 * MIB) as u64, "{p:?}");
        assert!(p.summary.contains("plain pre-copy converges"), "{p:?}");
        assert!(p.downtime_ms > 100.0 && p.downtime_ms < 300.0, "{p:?}");
    }

    #[test]
    fn a_guest_outrunning_the_link_is_predicted_to_need_the_throttle_or_to_stop() {
        let p = predict(
            1024.0 * MIB,
            18.0 * MIB,
            (12.0 * MIB, 1.0),
            64 << 20,
            Duration::from_millis(50),
            policy(),
            None,
        );
        assert!(!p.converges_without_help && !p.stops, "{p:?}");
        assert!(p.throttle_pct >= 50, "{p:?}");
        assert!(p.summary.contains("throttle the guest"), "{p:?}");
        assert_eq!(p.disk_wire_bytes, 64 << 20);
        let mut none = policy();
        none.max_throttle = 0;
        let q = predict(
            1024.0 * MIB,
            18.0 * MIB,
            (12.0 * MIB, 1.0),
            0,
            Duration::ZERO,
            none,
            None,
        );
        assert!(q.stops && q.summary.contains("not-converging"), "{q:?}");
    }

    #[test]
    fn a_deadline_is_predicted_at_the_paced_rate_or_said_to_be_out_of_reach() {
        // 512 MiB of data over a 100 MiB/s link: about 6 s at full speed
        let at = |deadline: u64| {
            predict(
                512.0 * MIB,
                0.5 * MIB,
                (100.0 * MIB, 1.0),
                0,
                Duration::from_millis(50),
                policy(),
                Some(Duration::from_secs(deadline)),
            )
        };
        let p = at(120);
        assert!(
            p.summary.starts_with("paced to the 120 s deadline"),
            "{p:?}"
        );
        assert!((80.0..120.0).contains(&p.total_s), "{p:?}");
        let q = at(3);
        assert!(q.summary.contains("cannot be met"), "{q:?}");
        assert!(q.total_s < 10.0, "{q:?}");
    }
}

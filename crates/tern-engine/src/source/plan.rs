//! `--plan`: what moving a VM would cost, with nothing of it moved. It runs what a
//! migration starts with (the checks of QEMU's configuration and the disks' sizes, mutual
//! TLS, Hello, the policy on the destination's labels), samples the guest's RAM (zero
//! pages, how the rest compresses, and, v9, how much of it the destination's page store
//! holds: `PlanQuery`), measures the guest's dirty rate (QEMU's page sampling), and runs
//! the model (`converge::simulate`, the same decisions as a real migration) over the rate
//! memory crossed at to that destination before, which the daemon remembers
//! ([`LinkMemory`]), or `--max-bandwidth`; with neither, a probe measures the link over the
//! agents' own TLS connection (v9: at most [`PROBE_FOR`] of filler, which the destination
//! drops).

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use serde_json::json;
use tern_api::{Direction, MigrationPlan, PlanInputs, PlanPrediction};
use tern_proto::limits::{MAX_PROBE_BYTES, MAX_PROBE_TIME};
use tern_proto::Message;
use tern_qemu::qmp::{QmpClient, QmpError};
use tern_store::Hash;

use super::{
    checks, connect, expect, send, unexpected, MigrateError, MigrateRequest, Migration, SourceVm,
};
use crate::converge::{self, Scenario};
use crate::handle::{new_migration_id, MigrationHandle};
use crate::hostcpu::{self, CpuWindow};
use crate::{Engine, Host};

/// How long QEMU samples the guest's dirty pages.
const DIRTY_SAMPLE: Duration = Duration::from_secs(1);
/// How long a migration looks at the host's CPU as it starts (a plan looks over its
/// [`DIRTY_SAMPLE`]).
const CPU_LOOK: Duration = Duration::from_millis(500);
/// Before the first page: TLS, Hello, Prepare, the destination's QEMU starting.
const SETUP: Duration = Duration::from_secs(1);
/// How long a plan's link probe sends filler (less when [`MAX_PROBE_BYTES`] go sooner).
pub const PROBE_FOR: Duration = Duration::from_secs(2);
/// The longest a plan's questions to the destination may take, the probe included (a
/// destination that reads slowly cannot hold the plan longer).
const SOUND_WITHIN: Duration = Duration::from_secs(45);
/// The probe's frames of filler.
const PROBE_FRAME: usize = 256 << 10;
/// Wire bytes of a page sent as a reference to content the destination holds (its hash
/// and the record around it), per byte of the page.
const REFERENCE_BYTES_PER_BYTE: f64 = 24.0 / 4096.0;
/// How fast pages the destination holds go by reference at most (bytes/s of QEMU's
/// stream: hashing and looking up each page on both sides). Measured on the 2-core TCG
/// machine of docs/benchmarks.md: a return trip of a 1 GiB guest that is all references
/// takes about 5 s.
const REFERENCE_RATE: f64 = 200.0 * 1048576.0;
/// Wire bytes of a disk block the destination's chunk index holds (its hash in the
/// manifest), per byte of the block.
const MANIFEST_BYTES_PER_BYTE: f64 = 16.0 / 4096.0;
/// Disk blocks a plan samples, over all local disks (in proportion to their data).
const DISK_SAMPLE: u64 = 1024;
/// A probed link faster than this is taken as not the bottleneck: pages go as they are
/// (tern's lean path), neither compressed nor by reference.
const LEAN_ABOVE: f64 = 1e9 / 8.0;

/// What the daemon remembers of migrations to one destination.
#[derive(Debug, Clone, PartialEq)]
pub struct LinkMemory {
    /// Bytes/s of QEMU's stream that crossed (pages that were not zero), and wire bytes
    /// per stream byte.
    pub stream_bps: f64,
    pub wire_ratio: f64,
    /// Where it comes from, in words.
    pub from: String,
    /// A probe's measurement of the wire (`stream_bps` is then the wire's rate, and
    /// `wire_ratio` 1), not a migration's.
    pub probed: bool,
    /// The part of the downtime that did not depend on the last dirty set in past
    /// migrations to this destination, ms (None: not learnt yet).
    pub switchover_fixed_ms: Option<f64>,
    /// CPU seconds per GiB of QEMU's stream the data path took on this host in past
    /// migrations to this destination (None: not learnt yet).
    pub core_s_per_gib: Option<f64>,
}

/// The part of the downtime that does not depend on the last dirty set: the stream's end
/// crossing and QEMU's SHUT coming back, the digests, the commit, the resume. Before
/// anything is learnt: 4 round trips and 30 ms (what the idle guests of
/// docs/benchmarks.md paused on both WAN profiles); then what past migrations to the
/// destination measured, never under 2 round trips.
pub(super) fn switchover_fixed(rtt: Duration, link: Option<&LinkMemory>) -> Duration {
    match link.and_then(|l| l.switchover_fixed_ms) {
        Some(ms) if ms.is_finite() => {
            Duration::from_secs_f64(ms.clamp(0.0, 60_000.0) / 1e3).max(rtt * 2)
        }
        _ => rtt * 4 + Duration::from_millis(30),
    }
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
    // the samples before the connection, which is then open only for the questions
    let (mut content, hashes, first_look) = match sample_content(&m).await {
        Some((c, h, s)) => (Some(c), h, Some(s)),
        None => (None, Vec::new(), None),
    };
    let disk_infos = checked.disks.as_deref().unwrap_or_default();
    let disk_bytes: u64 = disk_infos.iter().map(|d| d.allocated).sum();
    let disk_sample = sample_disks(&m, disk_infos).await;
    let mut disks = Disks {
        bytes: disk_bytes as f64,
        held: None,
        zero: disk_sample.zero,
        ratio: disk_sample.ratio,
    };
    let mut peer = connect::run(&mut m).await?;
    let (rtt, version, dest_agent) = (peer.rtt, peer.version, peer.agent.clone());
    // v9: what the destination holds of the samples, and the link when nothing else says
    // (a cap given is the rate: the link is not flooded to measure what is not used; a
    // probe kept from an earlier plan is measured again)
    let wants_probe = link.as_ref().is_none_or(|l| l.probed) && m.req.max_bandwidth_mibps.is_none();
    let mut probe = None;
    let mut unasked = None;
    if version >= 9 {
        let asked = tokio::time::timeout(
            SOUND_WITHIN,
            sound(&m, &mut peer, hashes, disk_sample.hashes, wants_probe),
        )
        .await;
        match asked {
            Ok(Ok((held, chunks_held, p))) => {
                if let Some(c) = content.as_mut() {
                    c.held = held;
                }
                disks.held = chunks_held;
                probe = p;
            }
            Ok(Err(e)) => unasked = Some(crate::error_chain(&e)),
            Err(_) => unasked = Some(format!("no answer within {SOUND_WITHIN:?}")),
        }
    }
    let probed_link = probe.as_ref().map(LinkProbe::memory);
    let link = match link {
        Some(l) if !l.probed => Some(l),
        // a fresh probe over one kept from an earlier plan
        kept => probed_link.or(kept),
    };
    // the destination forgets the connection
    drop(peer);
    m.writer = None;
    let (rate, wire_ratio, link_from, dedup) = link_rate(link.as_ref(), &m.req, content);
    // where pages go against their previous version (the dedup path), a look at the
    // sample just before QEMU measures the dirty rate and one just after price the pages
    // the guest rewrites meanwhile
    let before = match (m.source_running && dedup, first_look, m.vm.pid) {
        (true, Some(first), Some(pid)) => tern_qemu::ramsample::resample(pid, &first.addresses)
            .await
            .ok()
            .map(|s| (pid, s)),
        _ => None,
    };
    // the host's CPU over the dirty sample (or a moment, for a paused guest)
    let cpu_a = hostcpu::read(m.vm.pid);
    let dirty_mibps = if m.source_running {
        dirty_rate(&m).await?
    } else {
        tokio::time::sleep(CPU_LOOK).await;
        0.0
    };
    let cpu_now = cpu_a.and_then(|a| hostcpu::window(&a, &hostcpu::read(m.vm.pid)?));
    let cpu = cpu_bound(cpu_now.as_ref(), link.as_ref(), m.source_running);
    if let (Some(c), Some((pid, before))) = (content.as_mut(), before) {
        c.dirty_ratio = look_again(pid, &before).await;
    }
    let policy = converge::Policy::from_request(&m.req);
    let ram = u64::from(m.vm.spec.memory_mib) << 20;
    let mut notes = vec![
        match content {
            Some(c) => format!("{} pages of RAM sampled: {:.0}% zero (counted as free), the rest compresses to {:.0}%{}", c.pages, c.zero * 100.0, c.ratio * 100.0, match c.held {
                Some(h) => format!(", and the destination holds {:.0}% of it (sent by reference where the link is the bottleneck)", h * 100.0),
                None => "; pages the destination holds are counted as data (it could not be asked: an agent older than protocol v9)".to_string(),
            }),
            None => "all of RAM is counted as data (RAM could not be sampled; pages that are zero or the destination holds go faster: the prediction is an upper bound on the first pass)".to_string(),
        },
        "the throttle is assumed to slow the guest's dirtying in proportion (true of CPU-bound guests; a guest paced by I/O or a clock is slowed less)".to_string(),
    ];
    match content.and_then(|c| c.dirty_ratio) {
        Some(d) if dedup => notes.push(format!("pages the guest rewrites go against their previous version: {:.0}% of a page on the wire (a second look at the sample a second later)", d * 100.0)),
        _ => notes.push("pages the guest rewrites are counted as fresh pages (too few of the sample changed in a second to say what a delta would save, or the link is not the bottleneck)".into()),
    }
    if disk_bytes > 0 {
        notes.push(match disks.held {
            Some(h) => format!("of a sample of {} blocks of the local disks' data, {:.0}% are zero (free) and the destination's image index holds {:.0}% of the rest: those blocks go as their hashes, the rest {}", DISK_SAMPLE, disks.zero.unwrap_or(0.0) * 100.0, h * 100.0, match disks.ratio {
                Some(r) if dedup => format!("compressed to about {:.0}%", r * 100.0),
                _ => "as they are".to_string(),
            }),
            None => "disks are counted at their allocated size (what the destination's images hold could not be asked)".into(),
        });
    }
    if let Some(why) = &unasked {
        notes.push(format!("the destination could not be asked what it holds, nor the link probed ({why}): pages and disk blocks are counted as data"));
    }
    if let Some(p) = &probe {
        notes.push(format!(
            "the link was probed with {:.1} MiB of filler over the agents' TLS connection: {:.1} MiB/s on the wire (one connection, with whatever else the link carried just then)",
            p.bytes as f64 / 1048576.0,
            p.wire_bps / 1048576.0
        ));
    }
    let prediction = match rate {
        None => {
            notes.push("the link's rate is not known: the first migration to this destination measures it (or give --max-bandwidth)".into());
            None
        }
        Some(rate) => Some(predict(
            memory_of_ram(ram, content, dedup),
            dirty_mibps * 1048576.0,
            (rate, wire_ratio, cpu),
            disks.on_wire(dedup, wire_ratio),
            (rtt, switchover_fixed(rtt, link.as_ref())),
            policy,
            m.req.deadline_s.map(Duration::from_secs),
        )),
    };
    match (cpu, cpu_now, rate) {
        (Some(c), Some(w), Some(rate)) => {
            let (got, slow) = c.share(0, rate);
            notes.push(format!(
                "the data path took {:.1} CPU seconds per GiB of QEMU's stream here before; the host's {} cores are {:.1} busy while the guest runs (its QEMU {:.1}): {}",
                c.core_s_per_byte * (1u64 << 30) as f64,
                w.cores,
                w.busy_cores,
                c.guest_cores,
                if slow < 1.0 {
                    format!("the migration at the link's rate would ask for more than is left, so the scheduler slows all alike: about {:.1} MiB/s of the stream, and the guest to {:.0}% of its speed (less as a throttle slows the guest)", got / 1048576.0, slow * 100.0)
                } else {
                    "enough for the link's rate".to_string()
                },
            ));
        }
        (None, Some(w), _) => notes.push(format!(
            "{:.1} of the host's {} cores are free; what the data path costs them is not known yet (learnt from the first migration to this destination): the link is taken as the only bound",
            w.free_cores(),
            w.cores
        )),
        _ => {}
    }
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
            disk_held_fraction: disks.held,
            dirty_mibps,
            rewritten_ratio: content.and_then(|c| c.dirty_ratio),
            dirty_sample_s: DIRTY_SAMPLE.as_secs(),
            rtt_ms: rtt.as_secs_f64() * 1e3,
            held_fraction: content.and_then(|c| c.held),
            probe_mibps: probe.as_ref().map(|p| p.wire_bps / 1048576.0),
            probe_bytes: probe.as_ref().map_or(0, |p| p.bytes),
            link_mibps: rate.map(|r| r / 1048576.0),
            wire_ratio,
            link_from,
            downtime_limit_ms: policy.downtime_ms,
            max_throttle: policy.max_throttle,
            max_downtime_ms: policy.max_downtime_ms,
            cores: cpu_now.map(|w| w.cores),
            free_cores: cpu_now.map(|w| w.free_cores()),
            guest_cores: cpu_now.and_then(|w| w.process_cores),
            core_s_per_gib: link.as_ref().and_then(|l| l.core_s_per_gib),
        },
        prediction,
        notes,
    })
}

/// What a sample of the guest's RAM says: the share of pages that are zero, wire bytes
/// per byte of the rest (zstd -1, as tern compresses where the link is the bottleneck),
/// and the share of the rest the destination holds (None: not known).
#[derive(Debug, Clone, Copy, PartialEq)]
pub(super) struct Content {
    zero: f64,
    ratio: f64,
    pages: usize,
    pub(super) held: Option<f64>,
    /// Wire bytes per byte of a page the guest rewrote, sent against its previous version
    /// (a delta, or the page compressed when the delta is larger), from a second look at
    /// the same pages a moment later (None: not looked, or too few changed to say).
    dirty_ratio: Option<f64>,
}

/// Fewest changed pages between two looks at the sample to price a rewritten page by.
const MIN_CHANGED: usize = 8;
/// Bytes of a page record around its body (protocol: offset, kind, and for a delta its
/// result hash; a zero record has none).
const DELTA_RECORD: usize = 29;
const RAW_RECORD: usize = 13;
const ZERO_RECORD: usize = 10;

/// Samples 1024 pages of the guest's RAM (read from its QEMU process; nothing pauses), with
/// the content hashes (cluster key) of the pages that are not zero, and the sample itself
/// (for a second look at the same pages).
pub(super) async fn sample_content(
    m: &Migration,
) -> Option<(Content, Vec<Hash>, tern_qemu::ramsample::RamSample)> {
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
            let hashes = s
                .nonzero
                .chunks_exact(4096)
                .map(|p| m.engine.hasher.hash(p))
                .collect();
            Some((
                Content {
                    zero: s.zero as f64 / s.pages as f64,
                    ratio,
                    pages: s.pages,
                    held: None,
                    dirty_ratio: None,
                },
                hashes,
                s,
            ))
        }
        Ok(_) => None,
        Err(e) => {
            tracing::debug!(migration = %m.handle.id, "no RAM sample for the prediction: {}", crate::error_chain(&e));
            None
        }
    }
}

/// Reads the pages of `first` again and prices those the guest rewrote since
/// ([`rewritten_cost_of`]; None: unreadable, or too few changed).
async fn look_again(pid: u32, first: &tern_qemu::ramsample::RamSample) -> Option<f64> {
    let after = tern_qemu::ramsample::resample(pid, &first.addresses)
        .await
        .ok()?;
    rewritten_cost_of(first, &after)
}

/// What the pages the guest rewrote between two looks at the same addresses would cost
/// sent against their previous version, wire bytes per byte, as tern's encoder does it:
/// a delta record when the delta is at most a quarter of the page, else the page (the
/// frame compressed); a page that became zero is a zero record; one that was zero has no
/// version to diff against. None with fewer than [`MIN_CHANGED`] changed pages.
fn rewritten_cost_of(
    first: &tern_qemu::ramsample::RamSample,
    second: &tern_qemu::ramsample::RamSample,
) -> Option<f64> {
    use std::collections::HashMap;
    let pages = |s: &tern_qemu::ramsample::RamSample| -> HashMap<u32, Vec<u8>> {
        s.nonzero_at
            .iter()
            .copied()
            .zip(s.nonzero.chunks_exact(4096).map(<[u8]>::to_vec))
            .collect()
    };
    let (before, after) = (pages(first), pages(second));
    let (mut changed, mut cost) = (0usize, 0usize);
    let mut delta = Vec::new();
    for at in before
        .keys()
        .chain(after.keys().filter(|k| !before.contains_key(k)))
    {
        let Some(new) = after.get(at) else {
            changed += 1;
            cost += ZERO_RECORD;
            continue;
        };
        let compressed =
            || RAW_RECORD + zstd::bulk::compress(new, 1).map_or(4096, |c| c.len().min(4096));
        let Some(old) = before.get(at) else {
            changed += 1;
            cost += compressed();
            continue;
        };
        if old == new {
            continue;
        }
        changed += 1;
        delta.clear();
        cost += if tern_store::delta::diff(old, new, 1024, &mut delta) {
            DELTA_RECORD + delta.len()
        } else {
            compressed()
        };
    }
    (changed >= MIN_CHANGED).then(|| cost as f64 / (changed * 4096) as f64)
}

/// The rate memory crosses at (bytes/s of QEMU's stream), wire bytes per stream byte,
/// where they come from, and whether the link is the bottleneck (pages then go compressed
/// and by reference: tern's dedup path): the link's capacity this host learned in past
/// migrations to the destination or a plan's probe measured, within `--max-bandwidth`;
/// this guest's own content (a sample) says how many stream bytes that capacity carries
/// when the link is the bottleneck.
fn link_rate(
    link: Option<&LinkMemory>,
    req: &MigrateRequest,
    content: Option<Content>,
) -> (Option<f64>, f64, String, bool) {
    let cap = req.max_bandwidth_mibps.map(|mib| (mib << 20) as f64);
    // the wire's capacity, and whether pages were compressed on it (the link was the
    // bottleneck), as far as known
    let (wire, compressed, from) = match (link, cap) {
        (Some(l), Some(c)) => (
            Some((l.stream_bps * l.wire_ratio).min(c)),
            true,
            format!("{}, within --max-bandwidth", l.from),
        ),
        (Some(l), None) if l.probed => (
            Some(l.stream_bps),
            l.stream_bps < LEAN_ABOVE,
            l.from.clone(),
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
        return (None, 1.0, from, false);
    };
    match (content, link) {
        // the link is the bottleneck: this guest's pages compress as the sample says
        (Some(c), _) if compressed => (Some(wire / c.ratio.max(0.01)), c.ratio, from, true),
        (_, Some(l)) if l.probed => (Some(wire), 1.0, from, compressed),
        (_, Some(l)) => (Some(l.stream_bps), l.wire_ratio, from, compressed),
        (_, None) => (Some(wire), 1.0, from, compressed),
    }
}

/// The guest's memory as the model sees it: bytes that are not zero, and of them the
/// bytes the destination holds, which go by reference on the dedup path.
#[derive(Debug, Clone, Copy, PartialEq)]
struct Memory {
    data: f64,
    held: f64,
    /// What a rewritten page costs against a fresh one at the data rate (deltas on the
    /// dedup path; 1: as much).
    rewritten: f64,
}

fn memory_of_ram(ram: u64, content: Option<Content>, dedup: bool) -> Memory {
    let nonzero = ram as f64 * (1.0 - content.map_or(0.0, |c| c.zero));
    let held = match content.and_then(|c| c.held) {
        Some(h) if dedup => nonzero * h.clamp(0.0, 1.0),
        _ => 0.0,
    };
    // the encoder sends the cheaper of the delta and the page: never more than fresh
    let rewritten = match content {
        Some(Content {
            dirty_ratio: Some(d),
            ratio,
            ..
        }) if dedup => (d / ratio.max(0.01)).clamp(0.01, 1.0),
        _ => 1.0,
    };
    Memory {
        data: nonzero - held,
        held,
        rewritten,
    }
}

/// What a plan asks of a v9 destination: how much of the sample (`hashes`) its page store
/// holds, and, when `probe`, the link's rate (filler for [`PROBE_FOR`]).
async fn sound(
    m: &Migration,
    peer: &mut connect::Peer,
    hashes: Vec<Hash>,
    chunks: Vec<Hash>,
    probe: bool,
) -> Result<(Option<f64>, Option<f64>, Option<LinkProbe>), MigrateError> {
    let (asked, asked_chunks) = (hashes.len(), chunks.len());
    send(
        &peer.writer,
        &Message::PlanQuery {
            key_id: m.engine.hasher.key_id(),
            hashes,
            chunks,
        },
    )
    .await?;
    let (held, chunks_held) =
        match expect(&mut peer.reader, Duration::from_secs(10), "PlanHeld").await? {
            Message::PlanHeld { held, chunks_held }
                if held as usize <= asked && chunks_held as usize <= asked_chunks =>
            {
                (held, chunks_held)
            }
            Message::PlanHeld { held, chunks_held } => {
                return Err(MigrateError::Protocol(format!(
                    "the destination says it holds {held} of {asked} pages and {chunks_held} of {asked_chunks} disk blocks"
                )))
            }
            msg => return Err(unexpected(&msg, "PlanHeld")),
        };
    let mut sent = 0u64;
    let mut acked_bps = None;
    if probe {
        let filler = Bytes::from(vec![0u8; PROBE_FRAME]);
        let t0 = Instant::now();
        let acked = |p: &crate::transport::probe::TcpProbe| p.read().ok().map(|s| s.bytes_acked);
        let acked0 = peer.probe.as_ref().and_then(acked);
        // what the destination's kernel acknowledged, as the filler went
        let mut acks: Vec<(Instant, u64)> = Vec::new();
        'filler: while t0.elapsed() < PROBE_FOR && sent + PROBE_FRAME as u64 <= MAX_PROBE_BYTES {
            // at most about as much in flight as the peer acknowledged so far (at least
            // 1 MiB: TCP's own slow start grows no faster), so that what is left when the
            // time is up drains quickly on a slow link
            if let (Some(p), Some(a0)) = (&peer.probe, acked0) {
                while let Some(done) = acked(p).map(|a| a.saturating_sub(a0)) {
                    if sent.saturating_sub(done) <= done.max(1 << 20) {
                        break;
                    }
                    if t0.elapsed() >= PROBE_FOR {
                        break 'filler;
                    }
                    tokio::time::sleep(Duration::from_millis(2)).await;
                }
            }
            send(&peer.writer, &Message::ProbeBytes(filler.clone())).await?;
            sent += PROBE_FRAME as u64;
            if let (Some(p), Some(a0)) = (&peer.probe, acked0) {
                if let Some(a) = acked(p) {
                    acks.push((Instant::now(), a.saturating_sub(a0)));
                }
            }
        }
        acked_bps = acked_rate(&acks);
    }
    send(&peer.writer, &Message::ProbeEnd).await?;
    let within = MAX_PROBE_TIME + Duration::from_secs(5);
    let (bytes, micros) = match expect(&mut peer.reader, within, "ProbeResult").await? {
        Message::ProbeResult { bytes, micros } if bytes <= sent => (bytes, micros),
        Message::ProbeResult { bytes, .. } => {
            return Err(MigrateError::Protocol(format!(
                "the destination says {bytes} bytes of a {sent}-byte probe arrived"
            )))
        }
        msg => return Err(unexpected(&msg, "ProbeResult")),
    };
    // under 10 ms the clocks' grain is too coarse to say a rate
    // What the destination agent read in the later half can include what waited in its
    // socket from the first half (a reader that lagged: a CI run measured 13.6 MiB/s on a
    // 11.9 MiB/s link); what its kernel acknowledged cannot: the lower of the two.
    let probed = (probe && bytes > 0 && micros >= 10_000).then(|| {
        let read = bytes as f64 * 1e6 / micros as f64;
        LinkProbe {
            wire_bps: acked_bps.map_or(read, |a: f64| a.min(read)),
            bytes: sent,
        }
    });
    let share = |held: u32, of: usize| (of > 0).then(|| f64::from(held) / of as f64);
    Ok((share(held, asked), share(chunks_held, asked_chunks), probed))
}

/// The rate at which the destination's kernel acknowledged the probe over the later half
/// of `acks` ((time, bytes acknowledged so far), as the filler went), bytes/s; None with
/// too little to say (under 10 ms, or nothing acknowledged meanwhile).
fn acked_rate(acks: &[(Instant, u64)]) -> Option<f64> {
    let (bytes, d) = crate::transport::probe::later_half(acks, *acks.last()?)?;
    let dt = d.as_secs_f64();
    (dt >= 0.01 && bytes > 0).then(|| bytes as f64 / dt)
}

/// A VM's local disks as the model sees them: their allocated bytes, the share of their
/// data the destination's chunk index holds, and wire bytes per byte of the rest when
/// compressed (a sample's zstd -1).
#[derive(Debug, Clone, Copy, PartialEq)]
struct Disks {
    bytes: f64,
    /// Of the sampled blocks that are not zero, the share held there.
    held: Option<f64>,
    /// Of the sampled blocks, the share that is zero (sent as runs: free).
    zero: Option<f64>,
    ratio: Option<f64>,
}

impl Disks {
    /// Their bytes on the wire: what the destination holds as hashes in the manifest, the
    /// rest compressed where the link is the bottleneck (as the sample says, else as
    /// memory went).
    fn on_wire(&self, dedup: bool, wire_ratio: f64) -> f64 {
        let held = self.held.unwrap_or(0.0).clamp(0.0, 1.0);
        let data = self.bytes * (1.0 - self.zero.unwrap_or(0.0).clamp(0.0, 1.0));
        let ratio = match self.ratio {
            Some(r) if dedup => r,
            Some(_) => 1.0,
            None => wire_ratio,
        };
        data * ((1.0 - held) * ratio + held * MANIFEST_BYTES_PER_BYTE)
    }
}

/// What a sample of the local disks' data says: the hashes of its blocks that are not
/// zero, and how they compress.
#[derive(Debug, Default)]
struct DiskSample {
    hashes: Vec<Hash>,
    zero: Option<f64>,
    ratio: Option<f64>,
}

/// Samples [`DISK_SAMPLE`] blocks over the VM's local disks, in proportion to their data
/// (read as the guest sees them; nothing pauses). A disk that cannot be read is left out,
/// and the plan counts it at its allocated size.
async fn sample_disks(m: &Migration, infos: &[tern_proto::DiskInfo]) -> DiskSample {
    let total: u64 = infos.iter().map(|d| d.allocated).sum();
    if total == 0 {
        return DiskSample::default();
    }
    let disks: Vec<_> = crate::disk::local_disks(&m.vm.spec)
        .into_iter()
        .zip(infos)
        .map(|(i, d)| {
            let spec = &m.vm.spec.disks[i];
            let blocks = (DISK_SAMPLE * d.allocated / total).max(16) as usize;
            (
                spec.path.clone(),
                crate::disk::chunk_format(spec.format),
                blocks,
            )
        })
        .collect();
    let hasher = m.engine.hasher.clone();
    let id = m.handle.id.clone();
    tokio::task::spawn_blocking(move || {
        let mut out = DiskSample::default();
        let mut data = Vec::new();
        let mut zero = 0usize;
        for (path, format, blocks) in disks {
            match tern_chunks::sample_image(&path, format, &hasher, blocks) {
                Ok(s) => {
                    out.hashes.extend(s.hashes);
                    data.extend(s.data);
                    zero += s.zero;
                }
                Err(e) => tracing::warn!(migration = %id, disk = %path.display(), "no sample of a disk for the plan: {}", crate::error_chain(&e)),
            }
        }
        let read = out.hashes.len() + zero;
        out.zero = (read > 0).then(|| zero as f64 / read as f64);
        out.hashes.truncate(tern_proto::limits::MAX_PLAN_HASHES);
        if !data.is_empty() {
            out.ratio = zstd::bulk::compress(&data, 1)
                .ok()
                .map(|c| (c.len() as f64 / data.len() as f64).min(1.0));
        }
        out
    })
    .await
    .unwrap_or_default()
}

/// A plan's measurement of the link: wire bytes/s, and the filler it took.
#[derive(Debug, Clone, PartialEq)]
pub(super) struct LinkProbe {
    wire_bps: f64,
    bytes: u64,
}

impl LinkProbe {
    fn memory(&self) -> LinkMemory {
        LinkMemory {
            stream_bps: self.wire_bps,
            wire_ratio: 1.0,
            from: "a probe over the agents' connection just now (no migration to this destination yet)".into(),
            probed: true,
            switchover_fixed_ms: None,
            core_s_per_gib: None,
        }
    }
}

/// For the prediction a migration's report shows, when it can have one (the link's rate is
/// known): samples the guest's RAM and starts QEMU's sampling of its dirty rate (200 ms).
pub(super) async fn start_sampling(m: &mut Migration) {
    m.second_look = None;
    m.cpu_before = None;
    // the bandwidth controller needs the dirty rate from the start (QEMU has none until its
    // first pass ends)
    let wanted = link_rate(m.link.as_ref(), &m.req, None).0.is_some()
        || m.req.objective() == tern_api::Objective::LeastLinkUse;
    if !m.source_running || !wanted {
        m.cpu_before = Some(look_at_cpu(m.vm.pid));
        return;
    }
    let Ok(qmp) = m.vm.qmp() else {
        m.cpu_before = Some(look_at_cpu(m.vm.pid));
        return; // libvirt's QEMU: no sampling
    };
    let sampled = sample_content(m).await;
    // after the sample (reading and hashing it is the agent's work, not the host's load)
    m.cpu_before = Some(look_at_cpu(m.vm.pid));
    if let Some((c, hashes, first)) = sampled {
        m.content = Some(c);
        m.sample_hashes = hashes;
        // where rewritten pages go against their previous version, a second look at the
        // same pages a moment later prices them (as `plan` does), beside the migration
        if let (true, Some(pid)) = (link_rate(m.link.as_ref(), &m.req, Some(c)).3, m.vm.pid) {
            let look = Arc::new(std::sync::OnceLock::new());
            m.second_look = Some(look.clone());
            crate::spawn(async move {
                tokio::time::sleep(DIRTY_SAMPLE).await;
                if let Some(d) = look_again(pid, &first).await {
                    let _ = look.set(d);
                }
            });
        }
    }
    let r = start_dirty_rate(qmp, Duration::from_millis(200)).await;
    if let Err(e) = &r {
        tracing::debug!(migration = %m.handle.id, "no dirty-rate sampling for the prediction: {e}");
    }
    m.dirty_sampling = r.is_ok();
}

/// The host's CPU over [`CPU_LOOK`] while the guest runs as it does, before the
/// migration's transfer takes any (beside the migration: the connection goes on).
fn look_at_cpu(pid: Option<u32>) -> Arc<std::sync::OnceLock<CpuWindow>> {
    let before = Arc::new(std::sync::OnceLock::new());
    let window = before.clone();
    crate::spawn(async move {
        let Some(a) = hostcpu::read(pid) else { return };
        tokio::time::sleep(CPU_LOOK).await;
        if let Some(w) = hostcpu::read(pid).and_then(|b| hostcpu::window(&a, &b)) {
            let _ = window.set(w);
        }
    });
    before
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
    let (rate, wire_ratio, _, dedup) = link_rate(m.link.as_ref(), &m.req, m.content);
    let rate = rate?;
    let dirty = measured_dirty_rate(m.vm.qmp().ok()?).await.ok()??;
    // the second look, if it was done before the migration ended
    let mut content = m.content;
    if let Some(c) = content.as_mut() {
        c.dirty_ratio = m.second_look.as_ref().and_then(|l| l.get().copied());
    }
    let cpu = cpu_bound(
        m.cpu_before.as_ref().and_then(|b| b.get()),
        m.link.as_ref(),
        m.source_running,
    );
    tracing::debug!(
        migration = %m.handle.id,
        dirty_mibps = dirty,
        link_mibps = rate / 1048576.0,
        wire_ratio,
        ?content,
        ?cpu,
        "the prediction at the start: its inputs"
    );
    Some(predict(
        memory_of_ram(u64::from(m.vm.spec.memory_mib) << 20, content, dedup),
        dirty * 1048576.0,
        (rate, wire_ratio, cpu),
        Disks {
            bytes: disk_bytes as f64,
            held: None,
            zero: None,
            ratio: None,
        }
        .on_wire(dedup, wire_ratio),
        (m.rtt, switchover_fixed(m.rtt, m.link.as_ref())),
        converge::Policy::from_request(&m.req),
        m.req.deadline_s.map(Duration::from_secs),
    ))
}

/// The host's cores as a bound on the rate: those free while the guest ran as it does
/// now (`now`), and what the data path cost per byte here in past migrations to the
/// destination (None: either not known).
fn cpu_bound(
    now: Option<&CpuWindow>,
    link: Option<&LinkMemory>,
    guest_running: bool,
) -> Option<converge::CpuBound> {
    let now = now?;
    let per_gib = link?.core_s_per_gib.filter(|c| c.is_finite() && *c > 0.0)?;
    // a paused guest's QEMU asks for nothing a throttle could give back
    let guest = now.process_cores.unwrap_or(0.0).min(now.busy_cores);
    Some(converge::CpuBound {
        cores: f64::from(now.cores),
        other_cores: now.busy_cores - guest,
        guest_cores: if guest_running { guest } else { 0.0 },
        core_s_per_byte: per_gib / (1u64 << 30) as f64,
    })
}

/// The model over measured inputs: rates in bytes/s.
/// `link`: the rate memory crosses at (bytes/s of QEMU's stream) and wire bytes per
/// stream byte.
fn predict(
    mem: Memory,
    dirty_bps: f64,
    (rate, wire_ratio, cpu): (f64, f64, Option<converge::CpuBound>),
    disk_wire: f64,
    (rtt, fixed): (Duration, Duration),
    policy: converge::Policy,
    deadline: Option<Duration>,
) -> PlanPrediction {
    // with a deadline, tern paces to the lowest rate that finishes in time
    // (docs/bandwidth.md), when the link is faster than that
    let link = rate;
    // what the pages the destination holds cost, as bytes at the data rate: their
    // references on the wire, or the rate references go at, whichever takes longer
    let held_as_data = |rate: f64| {
        mem.held * (REFERENCE_BYTES_PER_BYTE / wire_ratio.max(0.01)).max(rate / REFERENCE_RATE)
    };
    let paced = deadline.and_then(|d| {
        let need = crate::pace::deadline_rate(
            d,
            SETUP + rtt * 4,
            mem.data + held_as_data(link) + disk_wire / wire_ratio.max(0.01),
            dirty_bps,
        )?;
        (need < link).then_some(need)
    });
    let rate = paced.unwrap_or(link);
    let held = held_as_data(rate);
    // a rewritten page costs its delta, and at least its hashing and keeping
    let rewritten = if mem.rewritten < 1.0 {
        mem.rewritten.max(rate / REFERENCE_RATE).min(1.0)
    } else {
        1.0
    };
    let s = Scenario {
        rewritten,
        memory: mem.data + held,
        dirty_bps,
        rate_bps: rate,
        policy,
        cpu,
    };
    let o = converge::simulate(&s);
    let mut plain = s;
    plain.policy.max_throttle = 0;
    plain.policy.max_downtime_ms = plain.policy.downtime_ms;
    let unhelped = converge::simulate(&plain);
    let disk_time = Duration::from_secs_f64(disk_wire / (rate * wire_ratio.max(0.01)));
    // the pause: the last dirty set, the device state and the commit's round trips
    let downtime = o.downtime + fixed;
    let total = SETUP + rtt * 4 + disk_time + o.transfer + downtime;
    let summary = if o.postcopy {
        format!(
            "pre-copy will not converge within what is allowed (throttle up to {}%, downtime limit up to {} ms): tern will switch to post-copy (--postcopy-fallback), the VM running at the destination while the rest of its memory follows; if this host dies during post-copy, the VM is lost",
            policy.max_throttle, policy.max_downtime_ms
        )
    } else if o.stops {
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
        memory_wire_bytes: ((o.priced_bytes - held).max(0.0) * wire_ratio
            + mem.held * REFERENCE_BYTES_PER_BYTE) as u64,
        disk_wire_bytes: disk_wire as u64,
        rounds: o.rounds,
        converges_without_help: !unhelped.stops,
        throttle_pct: o.throttle,
        downtime_limit_ms: o.downtime_ms,
        stops: o.stops,
        summary,
        switchover_fixed_ms: fixed.as_secs_f64() * 1e3,
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

    #[test]
    fn the_acknowledged_rate_is_the_later_half_of_the_probe() {
        let t0 = Instant::now();
        assert_eq!(acked_rate(&[]), None);
        assert_eq!(acked_rate(&[(t0, 5)]), None);
        // slow start, then 1 MB per 100 ms: from the sample at 400 ms to the one at 900 ms
        let mut acks = vec![(t0, 0)];
        for i in 1..=9u32 {
            acks.push((
                t0 + Duration::from_millis(100) * i,
                10_000 + 1_000_000 * u64::from(i - 1),
            ));
        }
        let r = acked_rate(&acks).unwrap();
        assert!((r - 10e6).abs() < 1.0, "{r}");
        // nothing acknowledged in the later half: nothing to say
        let stuck = [
            (t0, 0),
            (t0 + Duration::from_millis(500), 7),
            (t0 + Duration::from_secs(1), 7),
        ];
        assert_eq!(acked_rate(&stuck), None);
    }

    fn policy() -> converge::Policy {
        converge::Policy {
            max_throttle: 99,
            downtime_ms: 300,
            max_downtime_ms: 300,
            give_up_after: Duration::from_secs(60),
            postcopy: false,
        }
    }

    fn data(bytes: f64) -> Memory {
        Memory {
            data: bytes,
            held: 0.0,
            rewritten: 1.0,
        }
    }

    #[test]
    fn pages_the_destination_holds_cost_their_references_or_the_rate_references_go_at() {
        let rtt = (Duration::from_millis(50), Duration::from_millis(230));
        // 1 GiB not zero, over 12 MiB/s of wire at 0.5 compressed: a first trip
        let first = predict(
            data(1024.0 * MIB),
            0.0,
            (24.0 * MIB, 0.5, None),
            0.0,
            rtt,
            policy(),
            None,
        );
        // a return trip: the destination holds 95% of it
        let back = Memory {
            data: 0.05 * 1024.0 * MIB,
            held: 0.95 * 1024.0 * MIB,
            rewritten: 1.0,
        };
        let ret = predict(back, 0.0, (24.0 * MIB, 0.5, None), 0.0, rtt, policy(), None);
        assert!(first.total_s > 40.0, "{first:?}");
        // 51 MiB of data at 24 MiB/s, 973 MiB of references at REFERENCE_RATE: about 7 s
        assert!((4.0..10.0).contains(&ret.total_s), "{ret:?}");
        // on the wire: 25.6 MiB of compressed data and 5.7 MiB of references
        let wire = ret.memory_wire_bytes as f64 / MIB;
        assert!((28.0..34.0).contains(&wire), "{ret:?}");
        assert!(first.memory_wire_bytes as f64 / MIB > 500.0, "{first:?}");
    }

    #[test]
    fn a_probed_link_is_the_bottleneck_only_below_lean_above() {
        let c = Content {
            zero: 0.5,
            ratio: 0.4,
            pages: 1024,
            held: Some(0.5),
            dirty_ratio: None,
        };
        let req = |cap: Option<u64>| MigrateRequest {
            max_bandwidth_mibps: cap,
            ..serde_json::from_value(serde_json::json!({ "to": "b:7700" })).unwrap()
        };
        let probed = |bps: f64| {
            LinkProbe {
                wire_bps: bps,
                bytes: 1 << 20,
            }
            .memory()
        };
        // a WAN: compressed and by reference, the stream faster than the wire
        let (rate, ratio, from, dedup) = link_rate(Some(&probed(12.0 * MIB)), &req(None), Some(c));
        assert!(dedup && ratio == 0.4 && from.contains("probe"));
        assert!((rate.unwrap() - 30.0 * MIB).abs() < 1.0);
        let m = memory_of_ram(1 << 30, Some(c), dedup);
        assert_eq!((m.data, m.held), (256.0 * MIB, 256.0 * MIB));
        // a fast LAN: pages as they are, nothing held counts
        let (rate, ratio, _, dedup) = link_rate(Some(&probed(400.0 * MIB)), &req(None), Some(c));
        assert!(!dedup && ratio == 1.0 && rate == Some(400.0 * MIB));
        assert_eq!(memory_of_ram(1 << 30, Some(c), dedup).held, 0.0);
        // a cap below the probe: the cap
        let (rate, ..) = link_rate(Some(&probed(400.0 * MIB)), &req(Some(8)), Some(c));
        assert!((rate.unwrap() - 20.0 * MIB).abs() < 1.0);
    }

    #[test]
    fn rewritten_pages_are_priced_as_tern_sends_them_and_cost_less_after_the_first_pass() {
        use tern_qemu::ramsample::RamSample;
        let noise = |i: usize| -> Vec<u8> {
            let mut x = (i as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
            (0..4096)
                .map(|_| {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    x as u8
                })
                .collect()
        };
        let look = |pages: &[(u32, Vec<u8>)]| RamSample {
            pages: 128,
            zero: 128 - pages.len(),
            nonzero: pages.iter().flat_map(|(_, p)| p.clone()).collect(),
            nonzero_at: pages.iter().map(|(i, _)| *i).collect(),
            addresses: Vec::new(),
        };
        // 64 pages of incompressible bytes: an edit of 10 bytes goes as a delta record
        let first: Vec<(u32, Vec<u8>)> = (0..64).map(|i| (i as u32, noise(i))).collect();
        let edited = |n: usize| -> Vec<(u32, Vec<u8>)> {
            first
                .iter()
                .map(|(i, p)| {
                    let mut p = p.clone();
                    if (*i as usize) < n {
                        p[100..110].copy_from_slice(b"EDITEDTEXT");
                    }
                    (*i, p)
                })
                .collect()
        };
        let d = rewritten_cost_of(&look(&first), &look(&edited(16))).expect("16 changed");
        // a delta record of about 40 bytes a page, not the 4 KiB page
        assert!(d < 0.02, "{d}");
        // 7 changed pages say nothing, 8 do
        assert_eq!(rewritten_cost_of(&look(&first), &look(&edited(7))), None);
        assert!(rewritten_cost_of(&look(&first), &look(&edited(8))).is_some());
        // rewritten whole, gone to zero, new where a zero page was: the page or a zero record
        let mut later = edited(0);
        for (i, p) in later.iter_mut().take(8) {
            *p = noise(*i as usize + 1000);
        }
        later.retain(|(i, _)| !(8..12).contains(i));
        later.push((100, noise(100)));
        let d = rewritten_cost_of(&look(&first), &look(&later)).expect("13 changed");
        // 9 pages of noise (4 KiB + 13 each), 4 zero records, of 13 pages
        let want = (9.0 * (4096.0 + 13.0) + 4.0 * 10.0) / (13.0 * 4096.0);
        assert!((d - want).abs() < 0.01, "{d} against {want}");

        // a guest dirtying 10 MiB/s (pages edited: 1% of a page on the wire) over a link
        // carrying 30 MiB/s of its stream: after the first pass, re-sent pages are cheap
        let c = Content {
            zero: 0.5,
            ratio: 0.4,
            pages: 1024,
            held: Some(0.0),
            dirty_ratio: Some(0.004),
        };
        let rtt = (Duration::from_millis(50), Duration::from_millis(230));
        let at = |c: Content| {
            predict(
                memory_of_ram(1 << 30, Some(c), true),
                10.0 * MIB,
                (30.0 * MIB, 0.4, None),
                0.0,
                rtt,
                policy(),
                None,
            )
        };
        let fresh = at(Content {
            dirty_ratio: None,
            ..c
        });
        let edits = at(c);
        assert!(edits.total_s < fresh.total_s, "{edits:?} / {fresh:?}");
        assert!(
            edits.memory_wire_bytes < fresh.memory_wire_bytes,
            "{edits:?} / {fresh:?}"
        );
        // the first pass is the same: the difference is in the rounds after it
        assert!(
            edits.memory_wire_bytes as f64 > 512.0 * MIB * 0.4,
            "{edits:?}"
        );
        // on the lean path there are no deltas
        assert_eq!(memory_of_ram(1 << 30, Some(c), false).rewritten, 1.0);
    }

    #[test]
    fn a_quiet_guest_is_predicted_to_take_its_memory_over_the_rate() {
        let p = predict(
            data(1024.0 * MIB),
            0.5 * MIB,
            (100.0 * MIB, 0.5, None),
            0.0,
            (Duration::from_millis(50), Duration::from_millis(230)),
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
            data(1024.0 * MIB),
            18.0 * MIB,
            (12.0 * MIB, 1.0, None),
            64.0 * MIB,
            (Duration::from_millis(50), Duration::from_millis(230)),
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
            data(1024.0 * MIB),
            18.0 * MIB,
            (12.0 * MIB, 1.0, None),
            0.0,
            (Duration::ZERO, Duration::from_millis(30)),
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
                data(512.0 * MIB),
                0.5 * MIB,
                (100.0 * MIB, 1.0, None),
                0.0,
                (Duration::from_millis(50), Duration::from_millis(230)),
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

    #[test]
    fn a_host_short_of_cores_slows_the_migration_and_the_guest_alike() {
        // 2 cores, a 1 Gbit link, a text-like guest dirtying 64 MiB/s; the data path takes
        // 32 CPU seconds per GiB here (a core carries 32 MiB/s)
        let cpu = |other: f64, guest: f64| converge::CpuBound {
            cores: 2.0,
            other_cores: other,
            guest_cores: guest,
            core_s_per_byte: 32.0 / (1u64 << 30) as f64,
        };
        // at the link's 150 MiB/s the migration asks for 4.7 cores: with the guest's one,
        // 5.7 asked of 2, everyone at 35%
        let (rate, slow) = cpu(0.0, 1.0).share(0, 150.0 * MIB);
        assert!(
            (rate / MIB - 52.7).abs() < 0.1 && (slow - 0.352).abs() < 0.001,
            "{rate} {slow}"
        );
        // paused, the guest asks for nothing
        let (paused, _) = cpu(0.0, 1.0).share(100, 150.0 * MIB);
        assert!((paused / MIB - 64.0).abs() < 0.1, "{paused}");
        // a host with room: nobody slowed
        assert_eq!(cpu(0.2, 1.0).share(0, 16.0 * MIB), (16.0 * MIB, 1.0));
        let at = |c: Option<converge::CpuBound>| {
            predict(
                data(300.0 * MIB),
                64.0 * MIB,
                (150.0 * MIB, 0.4, c),
                0.0,
                (Duration::from_millis(20), Duration::from_millis(110)),
                policy(),
                None,
            )
        };
        let unbound = at(None);
        assert!(unbound.converges_without_help, "{unbound:?}");
        let idle_host = at(Some(cpu(0.0, 0.0)));
        assert!(
            idle_host.total_s > unbound.total_s * 1.5,
            "{idle_host:?} / {unbound:?}"
        );
        // the guest's vCPU asks for a core too: slower again
        let busy = at(Some(cpu(0.0, 1.0)));
        assert!(busy.total_s > idle_host.total_s, "{busy:?} / {idle_host:?}");
    }
}

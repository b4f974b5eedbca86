//! Phases `Transfer` and `Verify`: QEMU migrates into a socket it is handed; the stream
//! is forwarded (`forward.rs`) while the disk rounds go on beside it; QEMU's events mark
//! the guest's stop and its pause before the switchover (the disks' last round); once
//! QEMU's stream ended properly, the destination confirms (v1) or the commit already went
//! with SourceDone (v2). A link that makes no progress for the stall time ends it.

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant, SystemTime};

use serde_json::json;
use tern_proto::Message;
use tern_qemu::qmp::{QmpClient, QmpEvent};
use tokio::sync::{broadcast, mpsc};

use super::disks::{CopiedDisks, LiveDisks};
use super::forward::{forward, ForwardDone, ForwardPlan, StreamState};
use super::pacing::Pacing;
use super::peer::PeerEvent;
use super::prepare::Prepared;
use super::resume::{self, Carrier};
use super::{unexpected, AbortOnDrop, MigrateError, Migration, SourceQemu};
use crate::codec::CodecPicker;
use crate::converge::{self, Converger, Step};
use crate::datapath::{DataPathPicker, DataPathPolicy};
use crate::error::error_chain;
use crate::fault::fault;
use crate::handle::{
    page_counts, wait_cancelled, ConvergenceReport, Counters, DiskReport, EncodingReport, Phase,
};
use crate::transport::links::PeerWriter;

/// How the transfer ended.
pub(super) enum TransferEnd {
    /// v1: the destination is ready with this digest; the source decides (Commit).
    Ready { digest: [u8; 32] },
    /// v2: SourceDone carried the commit; Resumed may already be here.
    Committed { resumed: Option<u64> },
    /// The commit went out and then the transfer failed: only the destination knows.
    CommitLost(String),
}

/// The transfer, done: how it ended and what the switchover and the report need.
pub(super) struct Transferred {
    pub end: TransferEnd,
    pub writer: PeerWriter,
    pub events: mpsc::Receiver<PeerEvent>,
    pub version: u16,
    pub dest_agent: String,
    pub dest_qemu: String,
    /// QEMU's STOP event (the guest paused for the switchover).
    pub stopped_at: Option<SystemTime>,
    /// The digest of what QEMU's stream described, once it ended.
    pub source_digest: Option<[u8; 32]>,
    pub t_stream_end: Option<SystemTime>,
    pub t_ready: Option<SystemTime>,
    pub encoding: Option<EncodingReport>,
    pub disk_report: Option<DiskReport>,
    /// What tern did to make pre-copy converge.
    pub convergence: ConvergenceReport,
    /// The bandwidth controller (running until the report is made).
    pub pacing: Pacing,
    /// Post-copy: when it began (the source QEMU's postcopy-active).
    pub t_postcopy: Option<SystemTime>,
    /// Post-copy: the destination's count of its guest's page faults (v12).
    pub postcopy_faults: Option<tern_api::PostcopyFaults>,
    /// The host's CPU and QEMU's stream bytes as the transfer began, and over the
    /// transfer (to the guest's pause).
    pub cpu_start: Option<(crate::hostcpu::CpuReading, u64)>,
    pub cpu_during: Option<(crate::hostcpu::CpuWindow, u64)>,
    /// Tasks that end with the migration.
    pub _tasks: Vec<AbortOnDrop>,
}

/// tern's QEMU: its capabilities and parameters for tern's data path, then `migrate` into
/// a socket it is handed (it may not open paths itself). The socket, and QEMU's events
/// from before the migrate.
async fn start_qemu(
    m: &Migration,
    qmp: &QmpClient,
    policy_conv: &converge::Policy,
) -> Result<(tokio::net::UnixStream, broadcast::Receiver<QmpEvent>), MigrateError> {
    // post-copy never slows the guest
    let throttling = policy_conv.max_throttle > 0 && !m.req.postcopy;
    // auto-converge is QEMU's throttle; tern holds it at 1% (QEMU's least) until its own
    // model says pre-copy will not converge, then sets the level (`converge.rs`)
    qmp.set_migrate_capabilities(&[
        ("return-path", true),
        ("events", true),
        ("auto-converge", throttling),
        // post-copy: tern starts it after the first pass, or as the last resort
        // (`migrate-start-postcopy`)
        ("postcopy-ram", m.req.postcopy || m.postcopy_fallback),
    ])
    .await?;
    let mut params = json!({ "downtime-limit": policy_conv.downtime_ms });
    if throttling {
        params["cpu-throttle-initial"] = json!(1);
        params["max-cpu-throttle"] = json!(1);
        params["cpu-throttle-increment"] = json!(99);
        params["throttle-trigger-threshold"] = json!(50);
    }
    // Without a cap QEMU limits itself to 128 MiB/s; tern's socket applies back-pressure.
    let bw = m
        .req
        .max_bandwidth_mibps
        .map(|mib| mib << 20)
        .unwrap_or(1 << 40);
    params["max-bandwidth"] = json!(bw);
    if m.req.postcopy || m.postcopy_fallback {
        // (0: QEMU's own default, no limit of its own in post-copy)
        params["max-postcopy-bandwidth"] =
            json!(m.req.max_bandwidth_mibps.map_or(0, |mib| mib << 20));
    }
    qmp.set_migrate_parameters(params).await?;

    // QEMU migrates into a socket it is handed (it may not open paths itself)
    let fd_name = format!("tern-migrate-{}", m.wire_id());
    let qemu_sock = qmp.stream_socket(&fd_name, QEMU_OUT_BUFFER).await?;
    let qemu_events = qmp.subscribe();
    qmp.execute("migrate", Some(json!({ "uri": format!("fd:{fd_name}") })))
        .await?;
    Ok((qemu_sock, qemu_events))
}

/// QEMU's next event; never, for a QEMU tern has no monitor of.
async fn next_event(
    events: &mut Option<broadcast::Receiver<QmpEvent>>,
) -> Result<QmpEvent, broadcast::error::RecvError> {
    match events {
        Some(e) => e.recv().await,
        None => std::future::pending().await,
    }
}

/// Socket buffer between the source QEMU and its agent. Small on purpose: what QEMU has
/// written but tern has not taken is stream QEMU counts as sent, so a large buffer makes
/// QEMU overrate the link and stop the VM with megabytes still to drain (loopback bench,
/// 7 rounds: idle downtime 84 ms median with 4 MiB, 49 ms with 256 KiB, throughput the same).
pub(super) const QEMU_OUT_BUFFER: usize = 256 << 10;

pub(super) async fn run(
    m: &mut Migration,
    p: Prepared,
    disks: Option<CopiedDisks>,
) -> Result<Transferred, MigrateError> {
    m.handle.set_phase(Phase::Transfer);
    let Prepared {
        writer,
        version,
        dest_agent,
        dest_qemu,
        rtt,
        policy,
        links,
        mut encoder,
        budget,
        pacing,
        mut events,
        disk_inbox: _,
        mut qemu_tx,
        stream_end,
        flow,
        mut tasks,
    } = p;
    let mut policy_conv = converge::Policy::from_request(&m.req);
    // (as far as this VM and this destination allow it)
    policy_conv.postcopy = m.postcopy_fallback;
    let flow_ctl = flow.clone();
    // tern's QEMU: tern drives its migration; a libvirt domain's: libvirt does, tern
    // carries the stream it already migrates into
    let (qmp, qemu_sock, mut qemu_events) = match &mut m.vm.qemu {
        SourceQemu::Tern(q) => {
            let q = q.clone();
            let (sock, events) = start_qemu(m, &q, &policy_conv).await?;
            (Some(q), sock, Some(events))
        }
        SourceQemu::Libvirt(s) => {
            let sock = s.take().ok_or_else(|| {
                MigrateError::Protocol("the carried stream was taken twice".into())
            })?;
            (None, sock, None)
        }
    };
    let (qemu_rd, qemu_wr) = qemu_sock.into_split();
    if let Some(tx) = qemu_tx.take() {
        let _ = tx.send(qemu_wr);
    }
    let mut live = LiveDisks::start(disks);
    // v2: SourceDone carries the commit (the switchover point moves there); the forwarder
    // raises this flag just before sending it.
    let commit_sent = m.commit_sent.clone();
    let dedup = encoder.dedup();
    // post-copy: the lean path (below), but content the destination held before the
    // migration goes as a reference it resolves from its store without a round trip: a
    // page its guest faults on then does not cross the link (a return trip). From v13
    // only: an older destination refuses PostcopyRun while a record waits on a Want
    // (a summary prefix that matched by chance).
    encoder.set_held_refs(m.req.postcopy && version >= 13);
    let stream = StreamState::new(encoder);
    // post-copy: what another connection needs to carry the stream on if the link breaks
    let carrier = Carrier {
        stream: stream.clone(),
        policy,
        budget,
        rtt,
    };
    let mut fwd = crate::spawn(forward(
        qemu_rd,
        writer.clone(),
        m.handle.clone(),
        ForwardPlan {
            datapath: DataPathPicker::new(
                // post-copy: the lean path throughout, so that no page waits on a
                // Want/Content round trip while the guest runs at the destination
                if dedup && !m.req.postcopy {
                    DataPathPolicy::from_request(m.req.dedup)
                } else {
                    DataPathPolicy::Lean
                },
                rtt,
                std::time::Instant::now(),
            ),
            v5: version >= 5,
            stream,
            resumed: false,
            picker: CodecPicker::new(policy, rtt),
            // post-copy: the v1 ending (ReadyToResume with the destination's digest,
            // Commit, Resumed), so that the source sees whether the digests agree; the
            // VM already runs there
            commit: (version >= 2 && !m.req.postcopy).then(|| commit_sent.clone()),
            links,
            flow: flow.map(|f| (f, rtt)),
            stream_end,
            // each try records from its first byte
            record: m.vm.record.as_ref().map(|r| r.start()),
            postcopy: (m.req.postcopy || m.postcopy_fallback).then(|| m.postcopy_run.clone()),
            // a fallback switches to post-copy's lean path at its package
            held_refs: version >= 13,
            resume_state: (m.req.postcopy || m.postcopy_fallback).then(|| m.stream_resume.clone()),
        },
    ));
    tasks.push(AbortOnDrop(fwd.abort_handle()));

    let mut t = Transferred {
        end: TransferEnd::CommitLost(String::new()),
        writer,
        events: mpsc::channel(1).1,
        version,
        dest_agent,
        dest_qemu,
        stopped_at: None,
        source_digest: None,
        t_stream_end: None,
        t_ready: None,
        encoding: None,
        disk_report: None,
        t_postcopy: None,
        postcopy_faults: None,
        convergence: ConvergenceReport::default(),
        pacing,
        cpu_start: crate::hostcpu::read(m.vm.pid)
            .map(|r| (r, Counters::get(&m.handle.counters.bytes_from_qemu))),
        cpu_during: None,
        _tasks: Vec::new(),
    };
    let mut conv = Converger::new(policy_conv, Instant::now());
    let disk_bytes = m
        .handle
        .status()
        .progress
        .disk
        .map_or(0, |d| d.virtual_bytes);
    let mut syncs = 0u64;
    // post-copy: asked of QEMU once, after its first pass and a drain of what tern holds
    // in flight
    let mut postcopy = PostcopyStart::NotYet;
    m.handle
        .update(|s| s.progress.downtime_limit_ms = policy_conv.downtime_ms);
    let stall = m.engine.config.stall_timeout;
    let mut cancel = m.handle.cancelled();
    let mut last_progress = (0u64, Instant::now());
    let mut fwd_done = false;
    let mut told_bps = 0u64;
    let mut ticker = tokio::time::interval(Duration::from_millis(250));
    let forwarded = |t: &mut Transferred, done: ForwardDone| {
        t.source_digest = Some(done.digest);
        t.encoding = Some(done.encoding);
        t.t_stream_end = Some(SystemTime::now());
    };
    let mut resumes = 0u32;
    let ended: Result<TransferEnd, MigrateError> = loop {
        let leg: Result<TransferEnd, MigrateError> = async {
        loop {
            tokio::select! {
                r = &mut fwd, if !fwd_done => {
                    fwd_done = true;
                    let done = r.map_err(|e| MigrateError::Protocol(format!("forwarder panicked: {e}")))??;
                    forwarded(&mut t, done);
                    if commit_sent.load(Ordering::SeqCst) {
                        break Ok(TransferEnd::Committed { resumed: None });
                    }
                    m.handle.set_phase(Phase::Verify);
                }
                ev = events.recv() => match ev {
                    Some(PeerEvent::Msg(Message::ReadyToResume { digest })) => {
                        // The forwarder sent SourceDone (the destination answers only then)
                        // but its completion may not have been seen yet: join it first.
                        if !fwd_done {
                            let r = tokio::time::timeout(Duration::from_secs(10), &mut fwd)
                                .await
                                .map_err(|_| MigrateError::Protocol("ReadyToResume before SourceDone".into()))?;
                            let done = r.map_err(|e| MigrateError::Protocol(format!("forwarder panicked: {e}")))??;
                            forwarded(&mut t, done);
                        }
                        let Some(src) = t.source_digest else {
                            return Err(MigrateError::Protocol("ReadyToResume before SourceDone".into()));
                        };
                        t.t_ready = Some(SystemTime::now());
                        if src != digest {
                            return Err(MigrateError::DigestMismatch {
                                source_digest: hex::encode(src),
                                dest_digest: hex::encode(digest),
                            });
                        }
                        break Ok(TransferEnd::Ready { digest });
                    }
                    Some(PeerEvent::Msg(Message::Resumed { resumed_unix_us })) if commit_sent.load(Ordering::SeqCst) => {
                        // the forwarder sent SourceDone; its completion may not be seen yet
                        if !fwd_done {
                            if let Ok(Ok(Ok(done))) = tokio::time::timeout(Duration::from_secs(10), &mut fwd).await {
                                forwarded(&mut t, done);
                            }
                        }
                        break Ok(TransferEnd::Committed { resumed: Some(resumed_unix_us) });
                    }
                    Some(PeerEvent::Msg(Message::Abort { code, message })) => {
                        return Err(MigrateError::Remote { code, message });
                    }
                    Some(PeerEvent::Msg(Message::PostcopyFaults { requests, pages, blocktime, local })) => {
                        // only once, after a post-copy stream ended, from a v12 destination;
                        // otherwise ignored (it is only a report)
                        if t.version < 12 || !m.postcopy_run.load(Ordering::SeqCst) || t.postcopy_faults.is_some() {
                            tracing::warn!(migration = %m.handle.id, "the destination sent PostcopyFaults out of place: ignored");
                            continue;
                        }
                        t.postcopy_faults = Some(tern_api::PostcopyFaults {
                            requests,
                            pages,
                            served_locally: local,
                            all_vcpus_blocked_ms: blocktime.map(|b| b.all_vcpus_ms),
                            max_vcpu_blocked_ms: blocktime.map(|b| b.max_vcpu_ms),
                        });
                    }
                    Some(PeerEvent::Msg(msg)) => return Err(unexpected(&msg, "ReturnPath or ReadyToResume")),
                    Some(PeerEvent::Failed(e)) => return Err(e.into()),
                    Some(PeerEvent::Broken(why)) => return Err(MigrateError::Protocol(why)),
                    Some(PeerEvent::Closed) | None => return Err(MigrateError::PeerClosed("the transfer")),
                },
                ev = next_event(&mut qemu_events) => {
                    let Ok(ev) = ev else { continue };
                    let Some(qmp) = &qmp else { continue };
                    match ev.event.as_str() {
                        "STOP" => {
                            t.stopped_at = Some(ev.timestamp);
                            // post-copy began, QEMU finishes pre-copy, or the guest stopped
                            // for its own reasons: a small window gains nothing any more
                            // (while draining, post-copy is still asked for: QEMU takes
                            // the request harmlessly once it finished)
                            if let Some(f) = &flow_ctl {
                                f.end_drain();
                            }
                            if let Some((a, bytes)) = t.cpu_start {
                                let now = crate::hostcpu::read(m.vm.pid);
                                t.cpu_during = now.and_then(|b| crate::hostcpu::window(&a, &b)).map(|w| {
                                    (w, Counters::get(&m.handle.counters.bytes_from_qemu).saturating_sub(bytes))
                                });
                            }
                            t.pacing.guest_paused();
                            // what still comes for its cards goes on to the destination,
                            // to wait there for the guest (asking QEMU why it stopped
                            // would take until its device state is out); if the VM
                            // stays here after all, recovery takes the forwarding back
                            if let (false, Some(to)) = (m.vm.spec.nics.is_empty(), m.peer_ip) {
                                m.host.leaves(&m.vm.spec, to);
                            }
                        }
                        "MIGRATION" => {
                            let st = ev.data.get("status").and_then(|s| s.as_str()).unwrap_or("");
                            if st == "postcopy-active" {
                                t.t_postcopy.get_or_insert(ev.timestamp);
                            }
                            if let (Some(f), "device" | "postcopy-active" | "completed" | "pre-switchover") = (&flow_ctl, st) {
                                f.end_drain();
                            }
                            // (an event from before a resume is stale: QEMU says what is now)
                            if st == "postcopy-paused"
                                && qmp.query_migrate().await.is_ok_and(|i| i.status == "postcopy-paused")
                            {
                                return Err(MigrateError::PostcopyPaused);
                            }
                            if st == "failed" {
                                let info = qmp.query_migrate().await.ok();
                                let why = info.and_then(|i| i.error_desc).unwrap_or_else(|| "no reason given".into());
                                return Err(MigrateError::QemuMigration(why));
                            }
                            if st == "pre-switchover" {
                                // the guest is stopped and its disks drained: the last disk
                                // round, then QEMU sends the device state
                                if fault!(m.engine.config.fault, ExitAtPreSwitchover) {
                                    tracing::warn!("fault injection: exiting at pre-switchover");
                                    std::process::exit(70);
                                }
                                t.disk_report = live.finish(m, ev.timestamp).await?;
                            }
                        }
                        "SHUTDOWN" => return Err(MigrateError::QemuMigration("source QEMU shut down".into())),
                        _ => {}
                    }
                }
                // (post-copy began: the VM runs at the destination, a cancel would only
                // strand it there in postcopy-paused)
                _ = wait_cancelled(&mut cancel), if !m.postcopy_run.load(Ordering::SeqCst) => return Err(MigrateError::Cancelled),
                e = live.failed(), if live.running() => return Err(e),
                _ = drained(&flow_ctl), if matches!(postcopy, PostcopyStart::Draining(_)) => {
                    let (PostcopyStart::Draining(since), Some(qmp)) = (postcopy, &qmp) else { continue };
                    postcopy = start_postcopy(qmp, &m.handle.id, Some(since), conv.downtime_ms()).await?;
                }
                _ = ticker.tick() => {
                    let c = &m.handle.counters;
                    let moved = Counters::get(&c.bytes_from_qemu) + Counters::get(&c.wire_out) + Counters::get(&c.wire_in) + Counters::get(&c.wire_data);
                    if moved != last_progress.0 {
                        last_progress = (moved, Instant::now());
                    } else if last_progress.1.elapsed() > stall {
                        return Err(MigrateError::Timeout(stall, "any progress on the connection to the destination"));
                    }
                    // libvirt's QEMU: libvirt paces and converges it
                    let Some(qmp) = &qmp else { continue };
                    // in the first pass, at one stream byte per wire byte: a compression
                    // ratio sampled from its frames (zero-filled, text) says nothing of the
                    // last dirty pages, and a high one made QEMU stop with tens of MiB left
                    // (5 s of downtime at a 6 MiB/s deadline pace)
                    let bps = if syncs >= 2 {
                        Counters::get(&c.switchover_bps)
                    } else {
                        Counters::get(&c.switchover_wire_bps)
                    };
                    if bps > 0 && (bps as f64 - told_bps as f64).abs() > 0.15 * told_bps as f64 {
                        // QEMU >= 8.2; older ones keep their own estimate
                        tracing::debug!(migration = %m.handle.id, mibps = bps as f64 / 1048576.0, "switchover bandwidth told to QEMU");
                        let _ = qmp.set_migrate_parameters(json!({ "avail-switchover-bandwidth": bps })).await;
                        told_bps = bps;
                    }
                    if let Ok(Ok(info)) = tokio::time::timeout(Duration::from_millis(200), qmp.query_migrate()).await {
                        let pages = page_counts(c);
                        let sample = converge::Sample {
                            sync_count: info.dirty_sync_count.unwrap_or(0),
                            remaining: info.ram_remaining.unwrap_or(0),
                            dirty_pages_rate: info.dirty_pages_rate.unwrap_or(0),
                            pages: pages.total,
                            nonzero_pages: pages.raw + pages.refs + pages.deltas,
                            throttle: info.cpu_throttle_percentage.unwrap_or(0).min(99) as u8,
                            switchover_bps: bps,
                            ram_total: info.ram_total.unwrap_or(0),
                            done_before: disk_bytes,
                        };
                        syncs = syncs.max(sample.sync_count);
                        let now = Instant::now();
                        let est = conv.estimate(&sample, now);
                        let step = if info.status == "active" { conv.observe(&sample, now) } else { None };
                        // post-copy: after the first pass (as virsh --postcopy-after-precopy)
                        // the VM goes to the destination, never slowed nor given up on;
                        // as the last resort, when the converger says so
                        let step = if m.req.postcopy { None } else { step };
                        let first_pass_over = m.req.postcopy && sample.sync_count >= 2;
                        if let Some(Step::Postcopy(why)) = &step {
                            let note = format!("post-copy as the last resort: {why}; {}", tern_api::migration::POSTCOPY_RISK);
                            tracing::warn!(migration = %m.handle.id, "{note}");
                            m.handle.update(|s| s.progress.notes.push(note));
                        }
                        let last_resort = matches!(step, Some(Step::Postcopy(_)));
                        if (first_pass_over || last_resort) && postcopy == PostcopyStart::NotYet && info.status == "active" {
                            // what an agent restarted during post-copy needs to go on
                            super::restart::keep_mark(m, rtt);
                            // what tern holds in flight goes before QEMU's device state and
                            // so counts in the downtime: down to about one round trip of the
                            // link first (the guest still runs here meanwhile)
                            tracing::info!(migration = %m.handle.id, "the first pass is over: post-copy once what is in flight drained");
                            match &flow_ctl {
                                Some(f) => {
                                    // With postcopy-ram QEMU weighs finishing by pre-copy at
                                    // every step (all its RAM may go later): measured here, it
                                    // did so during the drain and sent 150-250 MB with the VM
                                    // stopped (12-20 s). A limit of 1 ms keeps it from that
                                    // until post-copy is asked for.
                                    qmp.set_migrate_parameters(json!({ "downtime-limit": 1 })).await?;
                                    f.start_drain();
                                    postcopy = PostcopyStart::Draining(Instant::now());
                                }
                                None => postcopy = start_postcopy(qmp, &m.handle.id, None, conv.downtime_ms()).await?,
                            }
                        }
                        match postcopy {
                            PostcopyStart::Draining(since) if since.elapsed() >= DRAIN_MAX => {
                                postcopy = start_postcopy(qmp, &m.handle.id, Some(since), conv.downtime_ms()).await?;
                            }
                            // QEMU has not switched yet (it waits for what must go before):
                            // pre-copy goes on at the full window meanwhile
                            PostcopyStart::Asked(at) if at.elapsed() >= DRAIN_MAX => {
                                if let Some(f) = &flow_ctl {
                                    f.end_drain();
                                }
                            }
                            _ => {}
                        }
                        match step {
                            Some(Step::Throttle(level)) => {
                                tracing::info!(migration = %m.handle.id, level, "pre-copy does not converge: throttling the guest");
                                qmp.set_migrate_parameters(json!({
                                    "cpu-throttle-initial": level,
                                    "max-cpu-throttle": level,
                                    "throttle-trigger-threshold": 1,
                                })).await?;
                            }
                            Some(Step::Downtime(ms)) => {
                                tracing::info!(migration = %m.handle.id, ms, "pre-copy does not converge: raising the downtime limit");
                                qmp.set_migrate_parameters(json!({ "downtime-limit": ms })).await?;
                            }
                            Some(Step::GiveUp(why)) => return Err(MigrateError::NotConverging(why)),
                            // (started above)
                            Some(Step::Postcopy(_)) | None => {}
                        }
                        m.handle.update(|s| {
                            s.progress.qemu_status = info.status.clone();
                            s.progress.ram_remaining = info.ram_remaining;
                            s.progress.ram_total = info.ram_total;
                            s.progress.dirty_pages_rate = info.dirty_pages_rate;
                            s.progress.dirty_sync_count = info.dirty_sync_count;
                            s.progress.percent = s.progress.percent.max(est.percent);
                            s.progress.eta_ms = est.eta.map(|d| d.as_millis() as u64);
                            s.progress.throttle_pct = sample.throttle;
                            s.progress.downtime_limit_ms = conv.downtime_ms();
                        });
                    }
                }
            }
        }
    }
    .await;
        // post-copy: the VM runs at the destination and the pages it lacks are here; a link
        // that broke is waited for and the stream resumed on a new connection (`resume.rs`)
        let left = m.req.outage_wait().saturating_sub(Duration::from_millis(
            m.outages.iter().map(|o| o.waited_ms).sum(),
        ));
        match (leg, &qmp) {
            (Err(e), Some(q))
                if m.postcopy_run.load(Ordering::SeqCst)
                    && resume::link_broke(&e)
                    && !left.is_zero()
                    && resumes < resume::MAX_RESUMES =>
            {
                // the old connection's tasks go, with the source QEMU's socket: it pauses
                fwd.abort();
                tasks.clear();
                let q = q.clone();
                if resume::qemu_completed(&q).await {
                    // QEMU sent everything: the destination says whether it all arrived
                    // (the switchover asks it, as after a lost commit)
                    break Ok(TransferEnd::CommitLost(error_chain(&e)));
                }
                resumes += 1;
                match resume::resume(m, &q, &carrier, &e, left).await {
                    Ok(leg) => {
                        m.outages.push(leg.outage);
                        fwd = leg.fwd;
                        fwd_done = false;
                        events = leg.events;
                        t.writer = leg.writer;
                        tasks = leg.tasks;
                        last_progress = (0, Instant::now());
                    }
                    Err(again) => {
                        tracing::warn!(migration = %m.handle.id, "post-copy could not be resumed: {}", error_chain(&again));
                        break Err(again);
                    }
                }
            }
            (leg, _) => break leg,
        }
    };
    t.end = match ended {
        Ok(end) => end,
        // The destination discarded everything (its Abort): the source may resume.
        Err(e @ MigrateError::Remote { .. }) => return Err(e),
        // The commit went out: never resume without the destination's word.
        Err(e) if commit_sent.load(Ordering::SeqCst) => TransferEnd::CommitLost(error_chain(&e)),
        Err(e) => return Err(e),
    };
    t.convergence = conv.report(syncs);
    t.events = events;
    t._tasks = tasks;
    Ok(t)
}

/// Where the source is in starting post-copy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum PostcopyStart {
    NotYet,
    /// Since then, the forwarder drains what is in flight.
    Draining(Instant),
    /// Asked of QEMU then.
    Asked(Instant),
}

/// The longest the source waits for the drain before it asks for post-copy anyway.
const DRAIN_MAX: Duration = Duration::from_secs(2);

/// Returns once the forwarder drained what is in flight (never without flow control).
async fn drained(flow: &Option<std::sync::Arc<crate::transport::flow::Flow>>) {
    match flow {
        Some(f) => f.drained().await,
        None => std::future::pending().await,
    }
}

/// `migrate-start-postcopy`, then QEMU's downtime limit back to `downtime_ms` after a
/// drain. (QEMU takes the request even once it finished by itself: that migration ends as
/// pre-copy. An error from a QEMU that is no longer `active`, e.g. a command that timed
/// out while QEMU held its lock to send the last of pre-copy, is not one either.)
async fn start_postcopy(
    qmp: &QmpClient,
    id: &str,
    drained_since: Option<Instant>,
    downtime_ms: u64,
) -> Result<PostcopyStart, MigrateError> {
    let waited_ms = drained_since.map(|t| t.elapsed().as_millis() as u64);
    tracing::info!(migration = %id, ?waited_ms, "starting post-copy");
    if let Err(e) = qmp.execute("migrate-start-postcopy", None).await {
        match qmp.query_migrate().await {
            Ok(i) if i.status != "active" => {
                tracing::info!(migration = %id, status = %i.status, "QEMU left pre-copy before post-copy was asked for: {e}");
                return Ok(PostcopyStart::Asked(Instant::now()));
            }
            _ => return Err(e.into()),
        }
    }
    if drained_since.is_some() {
        qmp.set_migrate_parameters(json!({ "downtime-limit": downtime_ms }))
            .await?;
    }
    Ok(PostcopyStart::Asked(Instant::now()))
}

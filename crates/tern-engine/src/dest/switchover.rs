//! Phase `Switchover` on the destination: the durable record first (no record, no run:
//! the source resumes its copy), then the guest runs (`cont`, its RESUME event), the VM is
//! handed to the daemon, and the source is told (Resumed). [`claim`] is that switchover
//! on its own: post-copy's transfer calls it at POSTCOPY_RUN (the VM runs here while the
//! rest of its memory arrives), and this phase then only reports.
//!
//! ===== SWITCHOVER POINT: from the record on, this host owns the VM. =====

use std::time::{Duration, SystemTime};

use tern_proto::{ErrorCode, Message};

use super::prepare::Prepared;
use super::record::{SwitchRecord, INCOMING_MARKER};
use super::transfer::Received;
use super::{qmp_failed, refuse, send, Conn, Incoming, IncomingError};
use crate::fault::fault;
use crate::handle::{page_counts, unix_us, Counters, MigrationReport, Phase};

pub(super) async fn run(
    inc: &mut Incoming,
    conn: &mut Conn,
    p: Prepared,
    mut r: Received,
) -> Result<(), IncomingError> {
    let handle = p.handle.clone();
    handle.set_phase(Phase::Switchover);
    // post-copy: the VM was claimed at POSTCOPY_RUN already (record, cont, adopted)
    let resumed_unix_us = match r.claimed {
        Some(us) => us,
        None => claim(inc, &conn.peer.fingerprint, &p).await?,
    };
    r.relay.abort();
    if fault!(inc.engine.config.fault, DropAfterCommit) {
        tracing::warn!("fault injection: dropping the connection instead of sending Resumed");
        let _ = conn.writer.lock().await.shutdown().await;
    } else {
        let _ = send(&conn.writer, &Message::Resumed { resumed_unix_us }).await;
    }
    succeeded(inc, conn, &p, r.source_digest, r.digest_ok, resumed_unix_us).await;
    Ok(())
}

/// The VM becomes this host's: the durable record first (no record, no run: the source
/// resumes its copy), then the guest runs (`cont`, its RESUME event) and the VM is handed
/// to the daemon. After the commit. The RESUME time (µs since the epoch; 0 for a VM that
/// stays paused).
pub(super) async fn claim(
    inc: &mut Incoming,
    peer: &str,
    p: &Prepared,
) -> Result<u64, IncomingError> {
    let run = record(inc, peer, p)?;
    let resumed_at = run_guest(p.qmp.clone(), run, !p.spec.nics.is_empty()).await?;
    let resumed_unix_us = if run { unix_us(resumed_at) } else { 0 };
    hand_over(inc, p, resumed_unix_us);
    Ok(resumed_unix_us)
}

/// Post-copy's claim, at POSTCOPY_RUN while the stream goes on: the record, the VM handed
/// to the daemon at once, and the guest run by a task the transfer does not wait on. QEMU
/// may already be loading the package, and its main loop can block on a page that only
/// the transfer brings (seen: `cont` timed out after 20 s while the transfer waited for
/// it). The task gives the RESUME time (`None`: the VM stays paused).
pub(super) fn claim_postcopy(
    inc: &mut Incoming,
    peer: &str,
    p: &Prepared,
) -> Result<tokio::task::JoinHandle<Result<Option<SystemTime>, IncomingError>>, IncomingError> {
    let run = record(inc, peer, p)?;
    hand_over(inc, p, 0);
    let (qmp, nics) = (p.qmp.clone(), !p.spec.nics.is_empty());
    Ok(crate::spawn(async move {
        let at = run_guest(qmp, run, nics).await?;
        Ok(run.then_some(at))
    }))
}

/// The switchover record, durable before the guest runs: a restarted agent must find that
/// this VM is ours (and answer the source's Query with "running"), never kill it as an
/// incoming VM that did not switch over. Whether the guest runs now (not when it was
/// paused at the source, nor on a host that fenced itself).
fn record(inc: &mut Incoming, peer: &str, p: &Prepared) -> Result<bool, IncomingError> {
    let fault = inc.engine.config.fault;
    let record = SwitchRecord {
        migration_id: p.id.clone(),
        peer: peer.to_string(),
        source_running: p.source_running,
        resumed_unix_us: 0,
    };
    if fault!(fault, FailSwitchRecord) {
        tracing::warn!("fault injection: the switchover record cannot be written");
        return Err(refuse(
            ErrorCode::ResourceExhausted,
            format!(
                "cannot record the switchover in {}: fault injection; the VM was not started here",
                p.run_dir.display()
            ),
        ));
    }
    record.write(&p.run_dir).map_err(|e| {
        refuse(
            ErrorCode::ResourceExhausted,
            format!(
                "cannot record the switchover in {}: {e}; the VM was not started here",
                p.run_dir.display()
            ),
        )
    })?;
    if !p.spec.nics.is_empty() {
        inc.host.runs_here(&p.spec);
    }
    if fault!(fault, ExitAtSwitchover) {
        tracing::warn!("fault injection: exiting between the switchover record and cont");
        std::process::exit(71);
    }
    let held = p.source_running && inc.host.holds_paused(&p.spec);
    if held {
        tracing::warn!(
            "this host fenced itself during the migration: the VM switched in and stays paused until the cluster controller releases it"
        );
    }
    Ok(p.source_running && !held)
}

/// `cont` (when `run`), the guest's RESUME event (at most 10 s), and the cards announced
/// from here. When it resumed.
async fn run_guest(
    qmp: Option<tern_qemu::qmp::QmpClient>,
    run: bool,
    nics: bool,
) -> Result<SystemTime, IncomingError> {
    let resumed_at = if run {
        let qmp = qmp.as_ref().ok_or_else(|| {
            IncomingError::Qemu("a libvirt domain's QEMU has no monitor for tern".into())
        })?;
        let mut ev = qmp.subscribe();
        // (post-copy: a `cont` before QEMU reached POSTCOPY_RUN runs the VM when it does)
        qmp.execute("cont", None)
            .await
            .map_err(qmp_failed("cont"))?;
        match qmp
            .wait_event(&mut ev, "RESUME", Duration::from_secs(10))
            .await
        {
            Ok(e) => e.timestamp,
            Err(_) => SystemTime::now(),
        }
    } else {
        SystemTime::now()
    };
    if let (true, Some(qmp)) = (nics, &qmp) {
        // the cards say where they are now (crate::announce_args), so switches forward
        // to this host at once
        crate::source::recover::announce(qmp).await;
    }
    Ok(resumed_at)
}

/// The VM is the daemon's from now on; the record says when it resumed (`resumed_unix_us`,
/// best effort).
fn hand_over(inc: &mut Incoming, p: &Prepared, resumed_unix_us: u64) {
    let process = inc
        .process
        .take()
        .expect("the process is set during a migration");
    inc.run_dir = None;
    set_resumed(&process.run_dir, resumed_unix_us);
    let _ = std::fs::remove_file(process.run_dir.join(INCOMING_MARKER));
    inc.host.adopt(p.spec.clone(), process);
    inc.name = None;
    inc.claimed = true;
}

/// The record in `run_dir` says the VM resumed at `resumed_unix_us` (best effort).
pub(super) fn set_resumed(run_dir: &std::path::Path, resumed_unix_us: u64) {
    if let Some(r) = SwitchRecord::read(run_dir) {
        let _ = SwitchRecord {
            resumed_unix_us,
            ..r
        }
        .write(run_dir);
    }
}

/// The migration succeeded here: its report (what crossed, the digest both sides agreed
/// on), and the handle is the registry's alone from now on.
pub(super) async fn succeeded(
    inc: &mut Incoming,
    conn: &Conn,
    p: &Prepared,
    digest: [u8; 32],
    digest_ok: bool,
    resumed_unix_us: u64,
) {
    let handle = &p.handle;
    let c = &handle.counters;
    let wire_out = conn.writer.lock().await.bytes_written;
    handle.finish_ok(MigrationReport {
        migration_id: p.id.clone(),
        vm: handle.vm.clone(),
        source: handle.peer.clone(),
        destination: inc.engine.config.name.clone(),
        outcome: "succeeded".into(),
        total_time_ms: handle.started.elapsed().as_millis() as u64,
        bytes_from_qemu: 0,
        bytes_on_wire: Counters::get(&c.wire_in) + Counters::get(&c.wire_data) + wire_out,
        pages: page_counts(c),
        digest_ok,
        digest: hex::encode(digest),
        source_was_running: p.source_running,
        protocol_version: p.version,
        resumed_unix_us,
        postcopy: p.postcopy,
        ..Default::default()
    });
    inc.handle = None;
}

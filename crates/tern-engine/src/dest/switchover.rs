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
/// to the daemon. After the commit; with post-copy, at POSTCOPY_RUN (the stream goes on,
/// the guest runs meanwhile). The RESUME time (µs since the epoch; 0 for a VM that stays
/// paused).
pub(super) async fn claim(
    inc: &mut Incoming,
    peer: &str,
    p: &Prepared,
) -> Result<u64, IncomingError> {
    let fault = inc.engine.config.fault;
    // Durable before the guest runs: a restarted agent must find that this VM is ours
    // (and answer the source's Query with "running"), never kill it as an incoming VM
    // that did not switch over.
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
    let resumed_at = if p.source_running && !held {
        let qmp = p.qmp()?;
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
    if !p.spec.nics.is_empty() {
        // the cards say where they are now (crate::announce_args), so switches forward
        // to this host at once
        if let Ok(qmp) = p.qmp() {
            crate::source::recover::announce(&qmp).await;
        }
    }
    let resumed_unix_us = if p.source_running && !held {
        unix_us(resumed_at)
    } else {
        0
    };
    let process = inc
        .process
        .take()
        .expect("the process is set during a migration");
    inc.run_dir = None;
    // the run directory is a VM's now; the record says when it resumed (best effort)
    let _ = SwitchRecord {
        resumed_unix_us,
        ..record
    }
    .write(&process.run_dir);
    let _ = std::fs::remove_file(process.run_dir.join(INCOMING_MARKER));
    inc.host.adopt(p.spec.clone(), process);
    inc.name = None;
    inc.claimed = true;
    Ok(resumed_unix_us)
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

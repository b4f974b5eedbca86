//! The one recovery path of an outgoing migration. Before the commit went out, a failure
//! (an error, a cancel, a panic) tells the destination (it discards everything), cancels
//! QEMU's migration, resumes the VM if it ran and removes tern's disk state from QEMU.
//! After the commit the source does not resume on its own: a panic there asks the
//! destination; otherwise the VM stays paused and the switchover is reported in doubt.
//! Once post-copy began (POSTCOPY_RUN went out) the VM is the destination's: the source
//! never resumes, whatever failed.

use std::time::{Duration, Instant};

use tern_proto::{Message, MigrationState};
use tern_qemu::qmp::QmpClient;

use super::{commit_went_out, MigrateError, Migration, SourceOutcome, SourceQemu};
use crate::disk;
use crate::error::error_chain;

/// After `e`: tell, recover, and say where the VM is.
pub(super) async fn after_failure(m: &mut Migration, e: MigrateError) -> SourceOutcome {
    let code = e.code();
    let message = error_chain(&e);
    if super::postcopy_ran(m) {
        // ===== post-copy began: the VM runs at the destination (or QEMU holds it there,
        // paused); this host's copy is incomplete and never runs again =====
        m.committed = true;
    }
    if matches!(e, MigrateError::Panicked(_)) && commit_went_out(m) {
        // the commit went out before the bug: only the destination knows
        m.committed = true;
        if let Ok((MigrationState::Running, _)) =
            super::switchover::ask_destination(m, "tern failed internally after the commit").await
        {
            tracing::error!(migration = %m.handle.id, "a panic after the commit; the VM runs on the destination");
            return SourceOutcome::MovedAfterBug { message };
        }
    }
    if let Some(w) = &m.writer {
        // Tell the destination (best effort) so it cleans up at once; the forwarder may
        // hold the writer, blocked on a dead link: bounded.
        if !matches!(e, MigrateError::Remote { .. } | MigrateError::InDoubt(_)) {
            let abort = Message::Abort {
                code,
                message: message.clone(),
            };
            let _ = tokio::time::timeout(Duration::from_secs(2), async {
                w.lock().await.send(&abort).await
            })
            .await;
        }
    }
    let vm_state = if matches!(e, MigrateError::PostcopyNeverRan(_)) {
        "stopped on the source: post-copy had begun here (the source QEMU stopped the VM and sent its device state), but the destination never got POSTCOPY_RUN and discarded its copy; this host's QEMU holds the whole VM in postcopy-paused, and QEMU refuses both to resume it there (\"Migration is not finalized yet\") and to cancel post-copy: do not kill that QEMU while the VM's memory matters; the VM can only be restarted (from its disks)".to_string()
    } else if super::postcopy_ran(m) {
        "at the destination: post-copy had begun (it runs there, or QEMU holds it there in postcopy-paused while pages are missing); the source keeps its paused copy and never resumes it".to_string()
    } else if m.committed {
        "paused on the source (switchover in doubt)".to_string()
    } else {
        let vm = &m.vm;
        match &vm.qemu {
            SourceQemu::Tern(qmp) => {
                // a host that fenced itself meanwhile keeps the VM paused (the cluster
                // controller may run it elsewhere)
                let resume = m.source_running && !m.host.holds_paused(&vm.spec);
                let state = recover_source(qmp, vm.exit_reason(), resume).await;
                if !vm.spec.nics.is_empty() && vm.exit_reason().is_none() {
                    // the VM is here (running, or paused as it was): a destination
                    // that recorded its switchover claimed the cards before it failed,
                    // and this host may have begun to send their frames there
                    m.host.runs_here(&vm.spec);
                }
                if !vm.spec.disks.is_empty() && vm.exit_reason().is_none() {
                    clear_disk_state(qmp, vm.spec.disks.len()).await;
                }
                if (m.req.postcopy || m.req.postcopy_fallback) && vm.exit_reason().is_none() {
                    // tern set it for this migration only
                    let _ = qmp
                        .set_migrate_capabilities(&[("postcopy-ram", false)])
                        .await;
                }
                state
            }
            // tern closes the stream (the carrier goes with the migration): the source
            // QEMU's migration fails and libvirt keeps the domain running there
            SourceQemu::Libvirt(_) => {
                "running on the source under libvirt (tern closed its stream: libvirt's migration fails there)".to_string()
            }
        }
    };
    SourceOutcome::Failed {
        code,
        message,
        vm_state,
    }
}

/// tern's exports, bitmaps, NBD server and the pause before switchover go from a QEMU
/// that stays where it is.
pub async fn clear_disk_state(qmp: &QmpClient, disks: usize) {
    disk::stop_source_disks(qmp, disks).await;
    let _ = qmp
        .set_migrate_capabilities(&[("pause-before-switchover", false)])
        .await;
}

/// Brings the source VM back to how it was before the migration: cancels QEMU's
/// migration if it still runs and resumes the VM if it was running. Returns its state.
/// The VM's network cards say they are here again: a destination QEMU that loaded the
/// stream announced the cards from there (QEMU does so by itself at the end of an
/// incoming migration, before tern's commit), so switches may send the guest's frames
/// there until it speaks. Best effort, bounded (nothing happens for a VM without cards).
pub(crate) async fn announce(qmp: &QmpClient) {
    let sent = tokio::time::timeout(
        std::time::Duration::from_secs(2),
        qmp.execute("announce-self", Some(crate::announce_args())),
    )
    .await;
    if !matches!(sent, Ok(Ok(_))) {
        tracing::warn!("announce-self failed or did not answer: {sent:?}");
    }
}

pub async fn recover_source(qmp: &QmpClient, exit: Option<String>, was_running: bool) -> String {
    if let Some(r) = exit {
        return format!("source QEMU {r}");
    }
    let status = qmp
        .query_migrate()
        .await
        .map(|m| m.status)
        .unwrap_or_default();
    if status.starts_with("postcopy") {
        // post-copy began: the VM runs at the destination; its copy here is incomplete
        // and must never run (no VM runs twice)
        return format!(
            "not resumed here: the source QEMU is in {status} (post-copy began), and a VM never runs here again once it did; it runs at the destination if that got its device state (or waits there for pages only this QEMU holds), else it stays stopped here"
        );
    }
    if matches!(
        status.as_str(),
        "setup" | "active" | "device" | "pre-switchover" | "wait-unplug"
    ) {
        let _ = qmp.execute("migrate_cancel", None).await;
        // QEMU leaves "cancelling" on its own; wait for a terminal state (bounded).
        let mut events = qmp.subscribe();
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let s = qmp
                .query_migrate()
                .await
                .map(|m| m.status)
                .unwrap_or_default();
            if !matches!(
                s.as_str(),
                "setup" | "active" | "cancelling" | "device" | "pre-switchover"
            ) {
                break;
            }
            if Instant::now() > deadline {
                break;
            }
            let _ = qmp
                .wait_event(&mut events, "MIGRATION", Duration::from_millis(500))
                .await;
        }
    }
    match qmp.query_status().await {
        Ok(s) if s.running => {
            announce(qmp).await;
            "running on the source".into()
        }
        Ok(s) if was_running => match qmp.execute("cont", None).await {
            Ok(_) => {
                announce(qmp).await;
                "running on the source (resumed)".into()
            }
            Err(e) => format!("paused on the source ({}; resume failed: {e})", s.status),
        },
        Ok(s) => format!("{} on the source (as before the migration)", s.status),
        Err(e) => format!("unknown ({e})"),
    }
}

//! An outgoing migration as the daemon runs it: the VM handed to the engine
//! (`tern_engine::source`), and what the outcome means for this host's VM registry. A VM
//! that moved goes from here (its QEMU quit, its disks kept and indexed for a return trip,
//! its run directory and TPM state removed) and leaves its departure snapshot (the stream
//! the engine recorded on the way, [`crate::snapshots`]); one that did not stays, free to
//! migrate again (the recording deleted).

use std::sync::atomic::Ordering;
use std::sync::Arc;

use tern_engine::source::{SourceOutcome, SourceQemu, SourceVm};
use tern_engine::MigrationHandle;
use tern_proto::ErrorCode;

use crate::vm::{StopMode, Vm};
use crate::Agent;

/// The VM as the engine takes it (with its vTPM key, if it has a vTPM).
pub fn source_vm(agent: &Agent, vm: &Vm) -> Result<SourceVm, String> {
    let tpm_key = if vm.spec.tpm {
        Some(
            crate::tpm_migration_key_of(&agent.config.state_dir, &vm.run_dir).map_err(|e| {
                format!("cannot read VM {}'s vTPM migration key: {e}", vm.spec.name)
            })?,
        )
    } else {
        None
    };
    Ok(SourceVm {
        spec: vm.spec.clone(),
        qemu: SourceQemu::Tern(vm.qmp.clone()),
        run_dir: vm.run_dir.clone(),
        qemu_version: vm.qemu_version.clone(),
        exited: vm.exit_watch(),
        tpm_key,
        pid: vm.pid,
        record: None,
    })
}

/// Runs the migration of `vm` to its end and records the outcome in `handle`.
pub async fn run(
    agent: Arc<Agent>,
    vm: Arc<Vm>,
    req: tern_api::MigrateRequest,
    handle: Arc<MigrationHandle>,
) {
    let mut source = match source_vm(&agent, &vm) {
        Ok(s) => s,
        Err(message) => {
            vm.migrating.store(false, Ordering::SeqCst);
            handle.finish_err(
                ErrorCode::Internal,
                message,
                "running on the source (nothing moved)".into(),
            );
            return;
        }
    };
    let recording = crate::snapshots::recording_for(&agent, &vm.spec, &handle.id);
    source.record = recording.engine();
    let req_to = req.to.clone();
    let link = crate::links::memory_of(&agent.config.state_dir, &req_to);
    let outcome = tern_engine::source::run(
        agent.engine.clone(),
        agent.host(),
        source,
        req,
        handle.clone(),
        link,
    )
    .await;
    finish(&agent, &vm, &handle, &req_to, recording, outcome).await;
}

/// A post-copy this host's previous agent began and died during (its mark found by
/// [`Agent::reattach`]): resumed under the same migration id, to the same end as any.
/// Its handle is registered (under the same id) before the API serves.
pub fn resume_restarted(
    agent: Arc<Agent>,
    vm: Arc<Vm>,
    mark: tern_engine::source::restart::PostcopyMark,
) -> impl std::future::Future<Output = ()> {
    let handle = Arc::new(MigrationHandle::new(
        mark.migration_id.clone(),
        vm.spec.name.clone(),
        tern_engine::handle::Direction::Outgoing,
        mark.req.to.clone(),
    ));
    agent.engine.registry.add_migration(handle.clone());
    resumed(agent, vm, mark, handle)
}

async fn resumed(
    agent: Arc<Agent>,
    vm: Arc<Vm>,
    mark: tern_engine::source::restart::PostcopyMark,
    handle: Arc<MigrationHandle>,
) {
    let req_to = mark.req.to.clone();
    let source = match source_vm(&agent, &vm) {
        Ok(s) => s,
        Err(message) => {
            // (the mark stays: an agent that can read the VM's files resumes it)
            vm.migrating.store(false, Ordering::SeqCst);
            handle.finish_err(
                ErrorCode::Internal,
                message,
                "at the destination, paused on the pages still here (post-copy not resumed)".into(),
            );
            return;
        }
    };
    let outcome = tern_engine::source::restart::resume_restarted(
        agent.engine.clone(),
        agent.host(),
        source,
        mark,
        handle.clone(),
    )
    .await;
    let recording = crate::snapshots::Recording::Not(
        "the source agent restarted during the migration: nothing was recorded".into(),
    );
    finish(&agent, &vm, &handle, &req_to, recording, outcome).await;
}

/// What the outcome of an outgoing migration means for this host.
async fn finish(
    agent: &Arc<Agent>,
    vm: &Arc<Vm>,
    handle: &Arc<MigrationHandle>,
    req_to: &str,
    recording: crate::snapshots::Recording,
    outcome: SourceOutcome,
) {
    let (agent, vm, req_to) = (agent.clone(), vm.clone(), req_to.to_string());
    match outcome {
        SourceOutcome::Moved(report) => {
            let left = Left {
                migration_id: handle.id.clone(),
                destination: req_to.clone(),
                recording,
                was_running: report.source_was_running,
            };
            moved(&agent, &vm, left).await;
            if let Err(e) = crate::links::record(&agent.config.state_dir, &req_to, &report) {
                tracing::warn!("cannot remember the link to {req_to} for plans: {e}");
            }
            handle.finish_ok(*report);
        }
        SourceOutcome::MovedAfterBug { message } => {
            let left = Left {
                migration_id: handle.id.clone(),
                destination: req_to.clone(),
                recording,
                was_running: true,
            };
            moved(&agent, &vm, left).await;
            vm.migrating.store(false, Ordering::SeqCst);
            handle.finish_err(
                ErrorCode::Internal,
                message,
                "running on the destination (the source copy was stopped)".into(),
            );
        }
        SourceOutcome::Failed {
            code,
            message,
            vm_state,
        } => {
            crate::snapshots::discard(recording);
            vm.migrating.store(false, Ordering::SeqCst);
            handle.finish_err(code, message, vm_state);
        }
    }
}

/// What a VM that moved leaves for its snapshot.
struct Left {
    migration_id: String,
    destination: String,
    recording: crate::snapshots::Recording,
    was_running: bool,
}

/// The destination runs the VM: the source's copy goes, its disks stay here, indexed, so
/// a return trip sends only what changed; its TPM state goes with the run directory (the
/// VM's secrets now live only at the destination, and in its snapshot here: the vTPM
/// migration key its recorded stream needs). The snapshot is kept in the background
/// (its recording may still be on its way to disk).
async fn moved(agent: &Arc<Agent>, vm: &Vm, left: Left) {
    let tpm_key = if vm.spec.tpm && left.recording.engine().is_some() {
        crate::tpm_migration_key_of(&agent.config.state_dir, &vm.run_dir).ok()
    } else {
        None
    };
    vm.stop(StopMode::Quit).await;
    agent.forget(&vm.spec.name);
    agent.vm_event(&vm.spec.name, "left", None);
    let kept = crate::images::keep_departed_disks(
        &agent.engine.chunks,
        &agent.images_dir,
        &vm.spec,
        &vm.run_dir,
    )
    .await;
    tokio::spawn(crate::snapshots::keep(
        agent.clone(),
        crate::snapshots::Departed {
            spec: vm.spec.clone(),
            migration_id: left.migration_id,
            destination: left.destination,
            recording: left.recording,
            kept: kept.clone(),
            tpm_key,
            was_running: left.was_running,
        },
    ));
    if !kept.is_empty() {
        let index = agent.engine.chunks.clone();
        tokio::spawn(async move { crate::images::index_kept(&index, kept).await });
    }
    agent.remove_run_dir(&vm.run_dir).await;
}

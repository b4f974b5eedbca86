//! An outgoing migration as the daemon runs it: the VM handed to the engine
//! (`tern_engine::source`), and what the outcome means for this host's VM registry. A VM
//! that moved goes from here (its QEMU quit, its disks kept and indexed for a return trip,
//! its run directory and TPM state removed); one that did not stays, free to migrate
//! again.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use tern_engine::source::{SourceOutcome, SourceVm};
use tern_engine::MigrationHandle;
use tern_proto::ErrorCode;

use crate::vm::{StopMode, Vm};
use crate::Agent;

/// Runs the migration of `vm` to its end and records the outcome in `handle`.
pub async fn run(
    agent: Arc<Agent>,
    vm: Arc<Vm>,
    req: tern_api::MigrateRequest,
    handle: Arc<MigrationHandle>,
) {
    let tpm_key = if vm.spec.tpm {
        match crate::tpm_migration_key_of(&agent.config.state_dir, &vm.run_dir) {
            Ok(k) => Some(k),
            Err(e) => {
                vm.migrating.store(false, Ordering::SeqCst);
                handle.finish_err(
                    ErrorCode::Internal,
                    format!("cannot read VM {}'s vTPM migration key: {e}", vm.spec.name),
                    "running on the source (nothing moved)".into(),
                );
                return;
            }
        }
    } else {
        None
    };
    let source = SourceVm {
        spec: vm.spec.clone(),
        qmp: vm.qmp.clone(),
        run_dir: vm.run_dir.clone(),
        qemu_version: vm.qemu_version.clone(),
        exited: vm.exit_watch(),
        tpm_key,
    };
    let outcome = tern_engine::source::run(
        agent.engine.clone(),
        agent.host(),
        source,
        req,
        handle.clone(),
    )
    .await;
    match outcome {
        SourceOutcome::Moved(report) => {
            moved(&agent, &vm).await;
            handle.finish_ok(*report);
        }
        SourceOutcome::MovedAfterBug { message } => {
            moved(&agent, &vm).await;
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
            vm.migrating.store(false, Ordering::SeqCst);
            handle.finish_err(code, message, vm_state);
        }
    }
}

/// The destination runs the VM: the source's copy goes, its disks stay here, indexed, so
/// a return trip sends only what changed; its TPM state goes with the run directory (the
/// VM's secrets now live only at the destination).
async fn moved(agent: &Arc<Agent>, vm: &Vm) {
    vm.stop(StopMode::Quit).await;
    agent.forget(&vm.spec.name);
    let kept = crate::images::keep_departed_disks(
        &agent.engine.chunks,
        &agent.images_dir,
        &vm.spec,
        &vm.run_dir,
    )
    .await;
    if !kept.is_empty() {
        let index = agent.engine.chunks.clone();
        tokio::spawn(async move { crate::images::index_kept(&index, kept).await });
    }
    agent.remove_run_dir(&vm.run_dir).await;
}

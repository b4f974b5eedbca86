//! Before anything moves: QEMU's configuration must be one tern's data path can carry,
//! the disks are described (their sizes for the destination), and whether the VM runs
//! decides whether it runs again on failure; with `postcopy`, what post-copy cannot carry
//! (local disks, shared memory) is refused.

use tern_proto::DiskInfo;
use tern_qemu::spec::GuestMemory;

use super::{MigrateError, Migration};
use crate::disk;

/// What the checks found.
pub(super) struct Plan {
    /// The VM's local disks, when it has some.
    pub disks: Option<Vec<DiskInfo>>,
}

pub(super) async fn run(m: &mut Migration) -> Result<Plan, MigrateError> {
    let qmp = m.vm.qmp()?;
    let mut caps = qmp.query_migrate_capabilities().await?;
    if m.req.postcopy || m.req.postcopy_fallback {
        // tern sets it itself (a try after a lost link finds it on from the last one)
        caps.retain(|(c, _)| c != "postcopy-ram");
    }
    if m.req.postcopy {
        check_postcopy(&m.vm.spec)?;
    }
    if m.req.postcopy_fallback {
        m.postcopy_fallback = match check_postcopy(&m.vm.spec) {
            Ok(()) => true,
            Err(e) => {
                let note = format!("no post-copy as the last resort, pre-copy only: {e}");
                tracing::warn!(migration = %m.handle.id, "{note}");
                m.handle.update(|s| s.progress.notes.push(note));
                false
            }
        };
    }
    check_capabilities(&caps)?;
    // (shared disks are not copied: the destination opens the same image)
    let disks = if disk::local_disks(&m.vm.spec).is_empty() {
        None
    } else {
        Some(disk::SourceDisks::describe(qmp, &m.vm.spec).await?)
    };
    if m.vm.spec.memory == GuestMemory::Shared {
        check_room_for_shared_memory(&m.vm)?;
    }
    m.source_running = qmp.query_status().await?.running;
    // the progress counts the disks' work against memory's (the stream says the exact
    // RAM size later)
    let ram = u64::from(m.vm.spec.memory_mib) << 20;
    m.handle.update(|s| s.progress.ram_total = Some(ram));
    Ok(Plan { disks })
}

/// What post-copy cannot carry yet, refused before anything moves.
fn check_postcopy(spec: &tern_qemu::spec::VmSpec) -> Result<(), MigrateError> {
    if !disk::local_disks(spec).is_empty() {
        return Err(MigrateError::PostcopyRefused(format!(
            "VM {:?} has local disks (their last round needs the guest paused at the switchover, and post-copy has none)",
            spec.name
        )));
    }
    if spec.memory == GuestMemory::Shared {
        return Err(MigrateError::PostcopyRefused(format!(
            "VM {:?} has shared memory (memory = \"shared\"), which post-copy does not take",
            spec.name
        )));
    }
    Ok(())
}

/// A guest with shared memory: QEMU's reads during the migration allocate every page it
/// has not touched yet ([`crate::hostmem`]). Refused when that does not fit here, instead
/// of the OOM killer taking a QEMU.
fn check_room_for_shared_memory(vm: &super::SourceVm) -> Result<(), MigrateError> {
    use crate::hostmem;
    let resident = vm.pid.and_then(hostmem::shared_resident_mib).unwrap_or(0);
    let Some(available_mib) = hostmem::available_mib() else {
        return Ok(()); // unknown: nothing to say
    };
    hostmem::room_for(u64::from(vm.spec.memory_mib), resident, available_mib).map_err(|need_mib| {
        MigrateError::SharedMemoryRoom {
            vm: vm.spec.name.clone(),
            need_mib,
            available_mib,
        }
    })
}

/// Refuses QEMU configurations tern's data path cannot carry, before anything moves.
pub fn check_capabilities(caps: &[(String, bool)]) -> Result<(), MigrateError> {
    for (name, on) in caps {
        if !on {
            continue;
        }
        if let Some((_, why)) = UNSUPPORTED_CAPABILITIES.iter().find(|(c, _)| c == name) {
            return Err(MigrateError::UnsupportedCapability {
                cap: name.clone(),
                why,
            });
        }
    }
    Ok(())
}

/// Capabilities tern cannot carry through its data path, and what to tell the operator.
pub const UNSUPPORTED_CAPABILITIES: &[(&str, &str)] = &[
    (
        "multifd",
        "multifd moves pages over side channels tern does not terminate",
    ),
    (
        "xbzrle",
        "XBZRLE deltas depend on destination state; tern does its own delta encoding",
    ),
    ("compress", "QEMU's compression is replaced by tern's own"),
    ("postcopy-ram", "postcopy is not supported by tern yet"),
    ("postcopy-preempt", "postcopy is not supported by tern yet"),
    (
        "postcopy-blocktime",
        "postcopy is not supported by tern yet",
    ),
    ("x-colo", "COLO is not supported"),
    ("rdma-pin-all", "RDMA is not supported"),
    (
        "dirty-bitmaps",
        "dirty-bitmap migration is not supported; tern migrates disks itself",
    ),
    (
        "block",
        "block migration is not supported; tern migrates disks itself",
    ),
    ("mapped-ram", "mapped-ram is for migration to a file"),
    (
        "background-snapshot",
        "background snapshots are not migrations",
    ),
    (
        "x-ignore-shared",
        "shared-memory skipping is not supported yet",
    ),
];

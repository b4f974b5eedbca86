//! What a destination takes from a peer's VM spec: its own decision, not the peer's. The
//! kernel and initrd (when the VM has them; else it boots its disk, which travels with it)
//! only from its boot directories, machine types its QEMU knows, no
//! migration capabilities from the peer, no VM larger than the host (and none with shared
//! memory larger than what it has available).

use std::path::PathBuf;

use tern_proto::ErrorCode;
use tern_qemu::spec::{GuestMemory, VmSpec};

use super::{refuse, IncomingError};
use crate::EngineConfig;

/// What a destination takes from a peer's VM spec, whatever the peer wrote: capabilities
/// are dropped (a peer does not configure this host's QEMU), the machine type must be one
/// this host's QEMU knows, the kernel and initrd must be files under this agent's boot
/// directories (refused with the same words whether or not a path exists elsewhere), and
/// the VM must fit this host's memory.
pub fn vet_incoming_spec(config: &EngineConfig, spec: &mut VmSpec) -> Result<(), IncomingError> {
    let host = &config.name;
    spec.migration_capabilities.clear();
    if !config.machine_types.contains(&spec.machine) {
        return Err(refuse(
            ErrorCode::SpecRejected,
            format!(
                "machine type {:?} is not one this host's QEMU ({host}) knows",
                spec.machine
            ),
        ));
    }
    if let Some(k) = &spec.kernel {
        spec.kernel = Some(boot_file("kernel", k, &config.boot_dirs, host)?);
    }
    if let Some(i) = &spec.initrd {
        spec.initrd = Some(boot_file("initrd", i, &config.boot_dirs, host)?);
    }
    for (i, d) in spec.disks.iter_mut().enumerate() {
        if !d.shared {
            d.sample = None;
            continue;
        }
        let what = format!("shared disk {i}");
        if d.format != tern_qemu::spec::DiskFormat::Raw {
            // a qcow2's header names files (backing, data file) QEMU would open as root
            return Err(refuse(
                ErrorCode::SpecRejected,
                format!("{what} is {}: a shared disk is raw", d.format.as_str()),
            ));
        }
        d.path = allowed_file(
            &what,
            &d.path,
            &config.shared_dirs,
            host,
            "shared storage directories",
            "--shared-dir",
        )?;
        if d.sample.is_none() {
            return Err(refuse(
                ErrorCode::Protocol,
                format!("{what} came without the source's sample"),
            ));
        }
    }
    fits_here(config, spec)?;
    if spec.memory == GuestMemory::Shared {
        // an incoming shared-memory guest fills all of its RAM here (crate::hostmem)
        if let Some(available) = crate::hostmem::available_mib() {
            if let Err(need) = crate::hostmem::room_for(u64::from(spec.memory_mib), 0, available) {
                return Err(refuse(
                    ErrorCode::ResourceExhausted,
                    format!(
                        "VM {} has {need} MiB of shared memory (memory = \"shared\"), which an incoming migration fills completely, and {host} has {available} MiB available",
                        spec.name
                    ),
                ));
            }
        }
    }
    Ok(())
}

/// `path`, if it names a regular file under one of `dirs` (canonical), as its canonical
/// path. The refusal says only that the path is not an allowed boot file here: nothing
/// about what exists outside the boot directories.
fn boot_file(
    what: &str,
    path: &std::path::Path,
    dirs: &[PathBuf],
    host: &str,
) -> Result<PathBuf, IncomingError> {
    allowed_file(what, path, dirs, host, "boot directories", "--boot-dir")
}

/// `path`, if it names a regular file under one of `dirs` (canonical; `kind` and `flag`
/// name them in the refusal), as its canonical path.
fn allowed_file(
    what: &str,
    path: &std::path::Path,
    dirs: &[PathBuf],
    host: &str,
    kind: &str,
    flag: &str,
) -> Result<PathBuf, IncomingError> {
    use std::path::Component;
    let refused =
        || {
            refuse(
                ErrorCode::SpecRejected,
                format!(
                "{what} {} is not a file in {host}'s {kind} ({}); put it there (tern agent {flag})",
                path.display(),
                dirs.iter().map(|d| d.display().to_string()).collect::<Vec<_>>().join(", ")
            ),
            )
        };
    let plain = path.is_absolute()
        && path
            .components()
            .all(|c| matches!(c, Component::RootDir | Component::Normal(_)));
    if !plain || !dirs.iter().any(|d| path.starts_with(d)) {
        return Err(refused());
    }
    // inside a boot directory: what exists there is no secret; symlinks must not lead out
    let real = std::fs::canonicalize(path).map_err(|_| refused())?;
    let is_file = std::fs::metadata(&real).is_ok_and(|m| m.is_file());
    if !is_file || !dirs.iter().any(|d| real.starts_with(d)) {
        return Err(refused());
    }
    Ok(real)
}

/// "10.0.2" -> (10, 0).
pub(super) fn major_minor(v: &str) -> Option<(u32, u32)> {
    let mut it = v.split('.');
    Some((
        it.next()?.trim().parse().ok()?,
        it.next()?.trim().parse().ok()?,
    ))
}

/// No incoming VM larger than this host.
pub(super) fn fits_here(config: &EngineConfig, spec: &VmSpec) -> Result<(), IncomingError> {
    if config.host_memory_mib > 0 && u64::from(spec.memory_mib) > config.host_memory_mib {
        return Err(refuse(
            ErrorCode::ResourceExhausted,
            format!(
                "VM {} has {} MiB of memory, more than {} has ({} MiB)",
                spec.name, spec.memory_mib, config.name, config.host_memory_mib
            ),
        ));
    }
    Ok(())
}

/// Opens `spec`'s shared disks (already vetted by [`vet_incoming_spec`]) for QEMU, each
/// checked against the source's sample, which goes from the spec: the descriptors by disk
/// index (None for a local disk) and which files they are. Blocking I/O, bounded by the
/// caller.
pub(super) fn open_shared_disks(
    spec: &mut VmSpec,
    host: &str,
) -> Result<Vec<Option<crate::disk::SharedImage>>, IncomingError> {
    let mut out = Vec::new();
    for (i, d) in spec.disks.iter_mut().enumerate() {
        let Some(sample) = d.sample.take().filter(|_| d.shared) else {
            out.push(None);
            continue;
        };
        let image = crate::disk::open_shared(&d.path, &sample).map_err(|why| {
            refuse(
                ErrorCode::SpecRejected,
                format!(
                    "shared disk {i} ({}) is not the image the source has: {why}. Mount the same shared storage at the same path on {host}, or make the disk local (shared = false) so that it is copied",
                    d.path.display()
                ),
            )
        })?;
        out.push(Some(image));
    }
    Ok(out)
}

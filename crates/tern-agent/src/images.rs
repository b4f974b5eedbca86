//! The host's image library: which disk images this agent reads chunks from when it
//! rebuilds an incoming disk (the chunk index, `tern_chunks::ChunkIndex`, under
//! `STATE_DIR/chunks`), and the disks that VMs leave behind when they migrate away.
//!
//! Owns importing (indexing an administrator's image in place), refreshing, listing, and
//! keeping a departed VM's disk for a return trip: a disk tern created for an incoming VM
//! (inside its run directory) moves to `STATE_DIR/images/VM-diskN.FMT` (one per VM disk,
//! replaced by the next departure, unless the VM, restarted from its snapshot, runs on an
//! overlay of it: then `VM-diskN.K.FMT`); a disk the operator owns stays where it is. Both are
//! indexed, so a VM that comes back is rebuilt from them plus what changed.
//! Must not talk to peers or QEMU.

use std::path::{Path, PathBuf};

use tern_chunks::{AddImageError, ChunkIndex, ImageFormat, RemoveImageError};
use tern_qemu::spec::{DiskFormat, VmSpec};

/// The agent's chunk index, shared by imports and migrations (blocking API: use it from
/// `spawn_blocking`).
pub use tern_engine::disk::SharedIndex;

fn lock(index: &SharedIndex) -> std::sync::MutexGuard<'_, ChunkIndex> {
    index.lock().unwrap_or_else(|e| e.into_inner())
}

pub use tern_api::image::{ImageInfo, ImportReport, RefreshSummary};

/// Why an image could not be imported.
#[derive(Debug, thiserror::Error)]
pub enum ImportError {
    #[error("cannot read {0} to tell its format")]
    Probe(PathBuf, #[source] std::io::Error),
    #[error("unknown image format {0:?}: use raw or qcow2")]
    Format(String),
    #[error(transparent)]
    Add(#[from] AddImageError),
    #[error(transparent)]
    Remove(#[from] RemoveImageError),
    #[error("the indexing task failed: {0}")]
    Task(String),
}

fn report(s: tern_chunks::ImageStats) -> ImportReport {
    ImportReport {
        path: s.path,
        format: s.format.as_str().into(),
        virtual_size: s.virtual_size,
        data_blocks: s.data_blocks,
        zero_blocks: s.zero_blocks,
        new_chunks: s.new_chunks,
        bytes_read: s.bytes_read,
        elapsed_ms: s.elapsed.as_millis() as u64,
    }
}

fn parse_format(path: &Path, format: Option<&str>) -> Result<ImageFormat, ImportError> {
    match format {
        None => ImageFormat::probe(path).map_err(|e| ImportError::Probe(path.to_path_buf(), e)),
        Some("raw") => Ok(ImageFormat::Raw),
        Some("qcow2") => Ok(ImageFormat::Qcow2),
        Some(other) => Err(ImportError::Format(other.into())),
    }
}

/// Indexes the image at `path` in place (its format from `format`, else from its magic),
/// replacing what the index held for it. Reads it whole: long for a large image.
pub async fn import(
    index: &SharedIndex,
    path: PathBuf,
    format: Option<String>,
) -> Result<ImportReport, ImportError> {
    let index = index.clone();
    tokio::task::spawn_blocking(move || {
        let format = parse_format(&path, format.as_deref())?;
        // the long read happens without the index: migrations plan against it meanwhile
        let hasher = lock(&index).hasher().clone();
        let scanned = ChunkIndex::scan_image_file(&hasher, &path, format)?;
        let stats = lock(&index).add_scanned(scanned)?;
        Ok(report(stats))
    })
    .await
    .map_err(|e| ImportError::Task(e.to_string()))?
}

/// Drops an image from the index (the file stays).
pub async fn remove(index: &SharedIndex, path: PathBuf) -> Result<(), ImportError> {
    let index = index.clone();
    tokio::task::spawn_blocking(move || {
        index
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove_image(&path)?;
        Ok(())
    })
    .await
    .map_err(|e| ImportError::Task(e.to_string()))?
}

/// Re-reads the images that changed since they were indexed, drops those whose file is
/// gone.
pub async fn refresh(index: &SharedIndex) -> Result<RefreshSummary, ImportError> {
    let index = index.clone();
    tokio::task::spawn_blocking(move || {
        // what to read again is decided under the lock; the reads happen without it
        let candidates = lock(&index).refresh_candidates();
        let mut summary = RefreshSummary {
            unchanged: lock(&index)
                .images()
                .map(|r| r.path().to_path_buf())
                .filter(|p| !candidates.iter().any(|(c, _, _)| c == p))
                .collect(),
            ..RefreshSummary::default()
        };
        summary.unchanged.sort();
        let chain = |e: &dyn std::error::Error| tern_engine::error_chain(e);
        for (path, format, gone) in candidates {
            if gone {
                match lock(&index).remove_image(&path) {
                    Ok(_) => summary.dropped.push(path),
                    Err(e) => summary.failed.push((path, chain(&e))),
                }
                continue;
            }
            let hasher = lock(&index).hasher().clone();
            match ChunkIndex::scan_image_file(&hasher, &path, format)
                .and_then(|s| lock(&index).add_scanned(s))
            {
                Ok(stats) => summary.reindexed.push(report(stats)),
                Err(e) => summary.failed.push((path, chain(&e))),
            }
        }
        summary
    })
    .await
    .map_err(|e| ImportError::Task(e.to_string()))
}

/// Every indexed image, by path.
pub fn list(index: &SharedIndex) -> Vec<ImageInfo> {
    let index = index.lock().unwrap_or_else(|e| e.into_inner());
    let mut v: Vec<ImageInfo> = index
        .images()
        .map(|r| ImageInfo {
            path: r.path().to_path_buf(),
            format: r.format().as_str().into(),
            virtual_size: r.virtual_size(),
            data_blocks: r.data_blocks(),
            zero_blocks: r.zero_blocks(),
            backing_files: r.backing_files().map(Path::to_path_buf).collect(),
            needs_reindex: r.needs_reindex(),
        })
        .collect();
    v.sort_by(|a, b| a.path.cmp(&b.path));
    v
}

/// After `spec`'s VM left this host (its QEMU is gone): keeps its disks for a return trip.
/// Disks inside `run_dir` (made by tern for an incoming VM) move to
/// `images_dir/VM-diskN.FMT`, since the run directory is removed next; the operator's own
/// disk files stay where they are. Returns what to index ([`index_kept`]). Errors are
/// logged: a disk not kept costs bytes on a later trip, never correctness.
pub async fn keep_departed_disks(
    index: &SharedIndex,
    images_dir: &Path,
    spec: &VmSpec,
    run_dir: &Path,
) -> Vec<(PathBuf, DiskFormat)> {
    let mut kept = Vec::new();
    for (i, d) in spec.disks.iter().enumerate() {
        if d.shared {
            // the destination runs on the same image: nothing of it stays here
            continue;
        }
        if !d.path.starts_with(run_dir) {
            kept.push((d.path.clone(), d.format));
            continue;
        }
        // a VM restarted from its snapshot runs on an overlay of the image kept for it: what
        // its disk is built on is never replaced (the next name that is not is taken)
        let chain = backing_chain(&d.path, d.format).await;
        let name = |k: usize| {
            let gen = if k == 0 {
                String::new()
            } else {
                format!(".{k}")
            };
            images_dir.join(format!("{}-disk{i}{gen}.{}", spec.name, d.format.as_str()))
        };
        let Some(to) = (0..64).map(name).find(|p| !chain.contains(p)) else {
            tracing::warn!(disk = %d.path.display(), "cannot keep the disk of a departed VM: its backing chain is too long");
            continue;
        };
        if to.exists() {
            // the previous departure's copy goes, and its index entries with it
            let _ = remove(index, to.clone()).await;
            let _ = std::fs::remove_file(&to);
        }
        match std::fs::create_dir_all(images_dir).and_then(|_| std::fs::rename(&d.path, &to)) {
            Ok(()) => kept.push((to, d.format)),
            Err(e) => {
                tracing::warn!(disk = %d.path.display(), to = %to.display(), "cannot keep the disk of a departed VM: {e}")
            }
        }
    }
    kept
}

/// The files a qcow2 image is built on (its backing chain, without itself), as absolute
/// paths; none for a raw image or one `qemu-img` cannot read.
async fn backing_chain(path: &Path, format: DiskFormat) -> Vec<PathBuf> {
    if format != DiskFormat::Qcow2 {
        return Vec::new();
    }
    let out = tokio::process::Command::new(tern_qemu::disk::qemu_img_binary())
        .args([
            "info",
            "-U",
            "--backing-chain",
            "--output=json",
            "-f",
            "qcow2",
        ])
        .arg(path)
        .output()
        .await;
    let Ok(out) = out.map_err(|e| e.to_string()).and_then(|o| {
        if o.status.success() {
            Ok(o.stdout)
        } else {
            Err(String::from_utf8_lossy(&o.stderr).into_owned())
        }
    }) else {
        return Vec::new();
    };
    let v: serde_json::Value = serde_json::from_slice(&out).unwrap_or_default();
    v.as_array()
        .map(|a| {
            a.iter()
                .skip(1)
                .filter_map(|e| e["filename"].as_str().map(PathBuf::from))
                .flat_map(|p| {
                    let c = std::fs::canonicalize(&p).ok();
                    std::iter::once(p).chain(c)
                })
                .collect()
        })
        .unwrap_or_default()
}

/// Indexes disks kept by [`keep_departed_disks`] (reads them whole: run it in the
/// background).
pub async fn index_kept(index: &SharedIndex, kept: Vec<(PathBuf, DiskFormat)>) {
    for (path, format) in kept {
        match import(index, path.clone(), Some(format.as_str().into())).await {
            Ok(r) => {
                tracing::info!(image = %path.display(), data_blocks = r.data_blocks, ms = r.elapsed_ms, "indexed the disk of a departed VM");
            }
            Err(e) => {
                tracing::warn!(image = %path.display(), "cannot index the disk of a departed VM: {}", tern_engine::error_chain(&e))
            }
        }
    }
}

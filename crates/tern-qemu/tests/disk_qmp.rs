//! `tern_qemu::disk` against a real QEMU whose guest never runs (`-S`): the QMP sequences
//! and their typed refusals, without a guest. Writes come from HMP `qemu-io -d` on the
//! guest's virtio-blk device, which goes through the same block layer (and dirty bitmaps)
//! as guest writes.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{bail, ensure, Result};
use serde_json::json;
use tern_nbd::{dirty_bitmap_context, ConnectOptions, NbdClient};
use tern_qemu::disk::{
    self, DirtyTracker, ExportError, ReleaseBitmapError, RemoveExportError, RemoveMode,
    StartNbdServerError, StartTrackingError, WaitPreSwitchoverError,
};
use tern_qemu::launch::{LaunchOptions, QemuProcess};
use tern_qemu::qmp::QmpClient;
use tern_qemu::spec::{Accel, DiskFormat, DiskSpec, VmSpec};

const MIB: u64 = 1 << 20;

/// The test guest's kernel (guest/build.sh, cached): QEMU checks it at start; with -S it
/// never runs.
fn kernel() -> Result<PathBuf> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let out = Command::new("bash")
        .arg(root.join("guest/build.sh"))
        .output()?;
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    match text.lines().find_map(|l| l.strip_prefix("kernel=")) {
        Some(k) => Ok(PathBuf::from(k)),
        None => bail!("guest/build.sh failed: {text}"),
    }
}

fn spec(disks: Vec<DiskSpec>) -> Result<VmSpec> {
    Ok(VmSpec {
        name: "d".into(),
        memory_mib: 64,
        vcpus: 1,
        accel: Accel::Tcg,
        kernel: Some(kernel()?),
        initrd: None,
        append: String::new(),
        machine: "pc".into(),
        migration_capabilities: vec![],
        tpm: false,
        disks,
        memory: Default::default(),
        libvirt: None,
        firmware: Default::default(),
        nics: vec![],
    })
}

fn qemu_img(args: &[&str], img: &Path, size: Option<u64>) -> Result<()> {
    let mut c = Command::new("qemu-img");
    c.args(args).arg(img);
    if let Some(s) = size {
        c.arg(s.to_string());
    }
    let out = c.output()?;
    ensure!(
        out.status.success(),
        "qemu-img {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(())
}

/// HMP `qemu-io -d DEVICE`: through the guest device's own block backend, as the guest
/// would write (a node-level qemu-io conflicts with the device's write permission).
async fn qemu_io(qmp: &QmpClient, device: &str, cmd: &str) -> Result<()> {
    let out = qmp
        .execute(
            "human-monitor-command",
            Some(json!({ "command-line": format!("qemu-io -d {device} \"{cmd}\"") })),
        )
        .await?;
    let out = out.as_str().unwrap_or_default();
    ensure!(out.is_empty(), "qemu-io {cmd}: {out}");
    Ok(())
}

async fn paused_vm(dir: &Path, disks: Vec<DiskSpec>, incoming: bool) -> Result<QemuProcess> {
    let mut o = LaunchOptions::new(dir.join(if incoming { "dst" } else { "src" }));
    o.start_paused = true;
    o.incoming_defer = incoming;
    Ok(QemuProcess::launch(&spec(disks)?, &o).await?)
}

fn qcow2(path: PathBuf) -> DiskSpec {
    DiskSpec {
        path,
        format: DiskFormat::Qcow2,
        shared: false,
        sample: None,
    }
}

#[tokio::test]
#[ignore = "tier qemu: needs QEMU 10 and its tools (bash scripts/test.sh runs it)"]
async fn rounds_freeze_export_release_and_requeue() -> Result<()> {
    let d = tempfile::tempdir()?;
    let dir = d.path();
    let img = dir.join("a.qcow2");
    qemu_img(&["create", "-q", "-f", "qcow2"], &img, Some(16 * MIB))?;
    let raw = dir.join("b.raw");
    qemu_img(&["create", "-q", "-f", "raw"], &raw, Some(MIB))?;
    let mut vm = paused_vm(
        dir,
        vec![
            qcow2(img.clone()),
            DiskSpec {
                path: raw.clone(),
                format: DiskFormat::Raw,
                shared: false,
                sample: None,
            },
        ],
        false,
    )
    .await?;
    let q = vm.qmp.clone();
    let node = disk::node_name(0);
    let dev = format!("/machine/peripheral/{}/virtio-backend", disk::device_id(0));
    let info = disk::query_node(&q, &node).await?;
    ensure!(
        info.virtual_size == 16 * MIB && info.driver == "qcow2" && info.filename == img,
        "{info:?}"
    );
    let raw_info = disk::query_node(&q, &disk::node_name(1)).await?;
    ensure!(
        raw_info.driver == "raw" && raw_info.virtual_size == MIB,
        "{raw_info:?}"
    );
    ensure!(matches!(
        disk::query_node(&q, "disk9").await,
        Err(disk::QueryNodeError::NoSuchNode(_))
    ));
    ensure!(matches!(
        DirtyTracker::start(&q, &node, Some(3000)).await,
        Err(StartTrackingError::BadGranularity(3000))
    ));

    let mut t = DirtyTracker::start(&q, &node, Some(4096)).await?;
    qemu_io(&q, &dev, "write -q -P 0xaa 1M 8k").await?;
    let f0 = t.freeze(&q).await?;
    ensure!(f0.bitmap == "tern-r0" && t.recording_bitmap() == "tern-r1");
    qemu_io(&q, &dev, "write -q -P 0xbb 2M 4k").await?;

    let sock = dir.join("nbd.sock");
    disk::start_nbd_server(&q, &sock).await?;
    ensure!(matches!(
        disk::start_nbd_server(&q, &sock).await,
        Err(StartNbdServerError::AlreadyRunning)
    ));
    let e0 = disk::export_frozen(&q, &f0).await?;
    ensure!(e0.id == "tern-disk0" && e0.name == "disk0" && !e0.writable);
    ensure!(matches!(
        disk::export_writable(&q, &node).await,
        Err(ExportError::AlreadyExported { .. })
    ));
    let mut c = NbdClient::connect_unix(
        &sock,
        &ConnectOptions::new("disk0").with_dirty_bitmap("tern-r0"),
    )
    .await?;
    let ctx = c.meta_context_id(&dirty_bitmap_context("tern-r0")).unwrap();
    ensure!(c.dirty_ranges(ctx, 0..16 * MIB).await? == vec![MIB..MIB + 8192]);
    // While a client is connected: safe removal waits and gives up, the bitmap is busy.
    match disk::remove_export(&q, &e0, RemoveMode::Safe, Duration::from_millis(200)).await {
        Err(RemoveExportError::StillInUse { id, .. }) => ensure!(id == "tern-disk0"),
        r => bail!("expected StillInUse, got {r:?}"),
    }
    match t.release(&q, f0.clone()).await {
        Err(ReleaseBitmapError::Busy { bitmap, .. }) => ensure!(bitmap == "tern-r0"),
        r => bail!("expected Busy, got {r:?}"),
    }
    // Hard removal drops the client.
    disk::remove_export(&q, &e0, RemoveMode::Hard, Duration::from_secs(5)).await?;
    ensure!(
        c.read(0, 4096).await.is_err(),
        "the client survived a hard removal"
    );
    ensure!(disk::export_ids(&q).await?.is_empty());
    // Removing it again is not an error.
    disk::remove_export(&q, &e0, RemoveMode::Safe, Duration::from_secs(1)).await?;

    // The round's bytes "did not arrive": requeue puts them into the recording bitmap.
    t.requeue(&q, f0).await?;
    let f1 = t.freeze(&q).await?;
    ensure!(f1.bitmap == "tern-r1");
    let bitmaps = disk::query_node(&q, &node).await?.dirty_bitmaps;
    let r1 = bitmaps.iter().find(|b| b.name == "tern-r1").unwrap();
    ensure!(
        !r1.recording && r1.dirty_bytes == 8192 + 4096,
        "{bitmaps:?}"
    );
    ensure!(!bitmaps.iter().any(|b| b.name == "tern-r0"), "{bitmaps:?}");
    let e1 = disk::export_frozen(&q, &f1).await?;
    let mut c = NbdClient::connect_unix(
        &sock,
        &ConnectOptions::new("disk0").with_dirty_bitmap("tern-r1"),
    )
    .await?;
    let ctx = c.meta_context_id(&dirty_bitmap_context("tern-r1")).unwrap();
    ensure!(
        c.dirty_ranges(ctx, 0..16 * MIB).await? == vec![MIB..MIB + 8192, 2 * MIB..2 * MIB + 4096]
    );
    ensure!(c.read(2 * MIB, 4096).await? == vec![0xbb; 4096]);
    c.disconnect().await?;
    // A client that just disconnected may hold the export a moment: safe removal waits.
    disk::remove_export(&q, &e1, RemoveMode::Safe, Duration::from_secs(5)).await?;
    t.release(&q, f1).await?;

    // nbd-server-stop drops exports too; stop removes every tern bitmap.
    let f2 = t.freeze(&q).await?;
    disk::export_frozen(&q, &f2).await?;
    disk::stop_nbd_server(&q).await?;
    disk::wait_export_gone(&q, "tern-disk0", Duration::from_secs(5)).await?;
    disk::stop_nbd_server(&q).await?;
    ensure!(disk::query_node(&q, &node).await?.dirty_bitmaps.len() == 2);
    t.stop(&q).await?;
    ensure!(disk::query_node(&q, &node).await?.dirty_bitmaps.is_empty());

    ensure!(matches!(
        disk::wait_for_pre_switchover(&q, Duration::from_secs(1)).await,
        Err(WaitPreSwitchoverError::NotMigrating(_))
    ));
    vm.quit(Duration::from_secs(10)).await;
    Ok(())
}

#[tokio::test]
#[ignore = "tier qemu: needs QEMU 10 and its tools (bash scripts/test.sh runs it)"]
async fn incoming_disk_is_exported_writable_and_handed_back_before_cont() -> Result<()> {
    let d = tempfile::tempdir()?;
    let dir = d.path();
    let img = dir.join("dst.qcow2");
    disk::create_image(&img, DiskFormat::Qcow2, 8 * MIB).await?;
    ensure!(matches!(
        disk::create_image(&img, DiskFormat::Qcow2, 8 * MIB).await,
        Err(disk::CreateImageError::Exists { .. })
    ));
    let mut vm = paused_vm(dir, vec![qcow2(img.clone())], true).await?;
    let q = vm.qmp.clone();
    let node = disk::node_name(0);
    ensure!(!disk::query_node(&q, &node).await?.active);
    ensure!(matches!(
        disk::export_writable(&q, &node).await,
        Err(ExportError::NoServer)
    ));
    let sock = dir.join("nbd.sock");
    disk::start_nbd_server(&q, &sock).await?;
    let e = disk::export_writable(&q, &node).await?;
    ensure!(e.writable && e.bitmap.is_none());
    ensure!(
        disk::query_node(&q, &node).await?.active,
        "export did not activate the node"
    );
    let mut c = NbdClient::connect_unix(&sock, &ConnectOptions::new(node.clone())).await?;
    c.write(&[0x5a; 65536], 3 * MIB).await?;
    c.flush().await?;
    // Still connected: the export cannot be handed back.
    ensure!(matches!(
        disk::finish_incoming(&q, &e, Duration::from_millis(200)).await,
        Err(disk::FinishIncomingError::Remove { .. })
    ));
    c.disconnect().await?;
    disk::finish_incoming(&q, &e, Duration::from_secs(5)).await?;
    ensure!(disk::export_ids(&q).await?.is_empty());
    disk::stop_nbd_server(&q).await?;
    vm.quit(Duration::from_secs(10)).await;
    let out = Command::new("qemu-io")
        .args(["-f", "qcow2", "-c", "read -q -P 0x5a 3M 64k"])
        .arg(&img)
        .output()?;
    ensure!(
        out.status.success() && out.stdout.is_empty(),
        "written data not in the image: {}",
        String::from_utf8_lossy(&out.stdout)
    );
    Ok(())
}

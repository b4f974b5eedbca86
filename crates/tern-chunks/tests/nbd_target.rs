//! [`NbdTarget`] with real parts: a Rebuild written through a writable NBD export
//! (qemu-nbd serving a qcow2, as the incoming destination QEMU serves its disk) equals the
//! source image, zero runs included, and a read-only export is refused.

mod common;

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Result};
use common::*;
use tern_chunks::{
    plan, scan_image, BlockTarget, ChunkIndex, ImageFormat, Manifest, NbdTarget,
    OpenNbdTargetError, Rebuild, BLOCK_BYTES,
};

/// qemu-nbd serving `img` on `sock` as export `target`; killed and reaped on drop.
struct Server(Child);

impl Server {
    fn start(img: &Path, fmt: &str, sock: &Path, read_only: bool) -> Result<Self> {
        let mut cmd = Command::new("qemu-nbd");
        cmd.args(["-f", fmt, "-x", "target", "-k"]).arg(sock);
        if read_only {
            cmd.arg("-r");
        }
        let mut s = Server(
            cmd.arg(img)
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .spawn()?,
        );
        let t0 = Instant::now();
        while !sock.exists() {
            if let Some(st) = s.0.try_wait()? {
                bail!("qemu-nbd exited: {st}");
            }
            if t0.elapsed() > Duration::from_secs(20) {
                bail!("qemu-nbd did not listen on {}", sock.display());
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        Ok(s)
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
#[ignore = "tier qemu: needs QEMU 10 and its tools (bash scripts/test.sh runs it)"]
fn rebuild_through_nbd_into_a_qcow2_equals_the_source() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let size = 8 * MIB;
    // The destination's index holds blocks 0..512 of seed 100.
    let library = dir.path().join("library.raw");
    create(&library, "raw", size, None)?;
    write(&library, "raw", 0, &blocks(100, 0, 512), "")?;
    let h = hasher();
    let mut index = ChunkIndex::open(dir.path().join("state"), h.clone())?;
    index.add_image(&library, ImageFormat::Raw)?;

    // The source: shared blocks in a backing file, its own blocks and a duplicate on top.
    let base = dir.path().join("base.qcow2");
    let source = dir.path().join("vm.qcow2");
    create(&base, "qcow2", size, None)?;
    write(&base, "qcow2", 0, &blocks(100, 0, 256), "")?;
    create(&source, "qcow2", size, Some(&base))?;
    write(&source, "qcow2", MIB, &blocks(102, 0, 300), "")?;
    write(&source, "qcow2", 6 * MIB, &block(103, 0), "")?;
    write(&source, "qcow2", 6 * MIB + 40 * KIB, &block(103, 0), "")?;

    // The target is a qcow2 with stale data where the source reads as zero.
    let target = dir.path().join("target.qcow2");
    create(&target, "qcow2", size, None)?;
    write(&target, "qcow2", 5 * MIB, &blocks(104, 0, 16), "")?;
    let sock = dir.path().join("nbd.sock");
    let server = Server::start(&target, "qcow2", &sock, false)?;

    let manifest = Manifest::decode(&scan_image(&source, ImageFormat::Qcow2, &h)?.encode())?;
    let p = plan(&manifest, &index);
    let out = NbdTarget::connect_unix(&sock, "target")?;
    assert_eq!(out.size(), size);
    let mut rebuild = Rebuild::new(&manifest, p, h.clone(), out);
    let local = rebuild.apply_local(&index)?;
    assert_eq!(local.blocks_written, 256);
    let content = guest_content(&source, "qcow2")?;
    for offset in rebuild.pending() {
        let o = offset as usize;
        rebuild.receive(offset, &content[o..o + BLOCK_BYTES])?;
    }
    assert!(rebuild.write_zeroes()? >= 16 * BLOCK);
    let (mut out, progress) = rebuild.finish()?;
    assert_eq!(
        (
            progress.local_blocks,
            progress.received_blocks,
            progress.dup_blocks
        ),
        (256, 301, 1)
    );
    // still usable after finish (flushed), then closed cleanly
    out.write_at(0, &block(100, 0))?;
    out.close()?;
    drop(server);
    qemu_img_compare(&source, "qcow2", &target, "qcow2")?;
    Ok(())
}

#[test]
#[ignore = "tier qemu: needs QEMU 10 and its tools (bash scripts/test.sh runs it)"]
fn read_only_exports_are_refused() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let img = dir.path().join("ro.qcow2");
    create(&img, "qcow2", MIB, None)?;
    let sock = dir.path().join("nbd.sock");
    let _server = Server::start(&img, "qcow2", &sock, true)?;
    match NbdTarget::connect_unix(&sock, "target") {
        Err(OpenNbdTargetError::ReadOnly { export, .. }) => assert_eq!(export, "target"),
        r => bail!("expected ReadOnly, got {r:?}"),
    }
    match NbdTarget::connect_unix(&dir.path().join("none.sock"), "target") {
        Err(OpenNbdTargetError::Connect { .. }) => {}
        r => bail!("expected Connect, got {r:?}"),
    }
    Ok(())
}

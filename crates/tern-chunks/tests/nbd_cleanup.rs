//! No qemu-nbd outlives its reader: after indexing, after reads, after a failed open, and
//! when the index is dropped inside async code (the blocking API used through
//! `spawn_blocking`, as the agent will). A test binary of its own, because it counts this
//! process's qemu-nbd children.

mod common;

use anyhow::Result;
use common::*;
use tern_chunks::{AddImageError, ChunkIndex, ImageFormat, BLOCK_BYTES};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "tier qemu: needs QEMU 10 and its tools (bash scripts/test.sh runs it)"]
async fn qemu_nbd_processes_end_with_their_readers() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let img = dir.path().join("disk.qcow2");
    create(&img, "qcow2", MIB, None)?;
    write(&img, "qcow2", 0, &blocks(1, 0, 4), "")?;
    let bad = dir.path().join("bad.qcow2");
    std::fs::write(&bad, b"QFI\xfbnot really a qcow2 image")?;
    assert!(qemu_nbd_children().is_empty());

    let state = dir.path().join("state");
    let index = tokio::task::spawn_blocking(move || -> Result<ChunkIndex> {
        let mut index = ChunkIndex::open(&state, hasher())?;
        index.add_image(&img, ImageFormat::Qcow2)?;
        // Indexing is over: its qemu-nbd is gone.
        assert!(qemu_nbd_children().is_empty());
        assert!(matches!(
            index.add_image(&bad, ImageFormat::Qcow2),
            Err(AddImageError::Open { .. })
        ));
        assert!(qemu_nbd_children().is_empty());
        let loc = index.lookup(&hasher().hash(&block(1, 2))).unwrap();
        index.read_chunk(&loc, &mut [0u8; BLOCK_BYTES])?;
        Ok(index)
    })
    .await??;
    // read_chunk keeps its reader (one qemu-nbd) for the next read.
    assert_eq!(qemu_nbd_children().len(), 1);
    index.close_readers();
    assert!(qemu_nbd_children().is_empty());

    // Reopen a reader, then drop the index right here, in async code: no panic, no leak.
    let index = tokio::task::spawn_blocking(move || -> Result<ChunkIndex> {
        let loc = index.lookup(&hasher().hash(&block(1, 3))).unwrap();
        index.read_chunk(&loc, &mut [0u8; BLOCK_BYTES])?;
        Ok(index)
    })
    .await??;
    assert_eq!(qemu_nbd_children().len(), 1);
    drop(index);
    assert!(qemu_nbd_children().is_empty());
    Ok(())
}

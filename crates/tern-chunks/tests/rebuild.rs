//! The destination's side end to end, with real images: the source's manifest over the
//! wire bytes, plan() against the destination's index, Rebuild from local chunks plus the
//! wanted ones, checked with `qemu-img compare`. Also the byte accounting and index speed.

mod common;

use std::collections::BTreeSet;
use std::time::Instant;

use anyhow::Result;
use common::*;
use tern_chunks::{
    plan, scan_image, ChunkIndex, FinishRebuildError, ImageFormat, Manifest, RawFileTarget,
    Rebuild, ReceiveChunkError, BLOCK_BYTES,
};

/// Destination: a raw image holding blocks 0..512 of seed 100 (at 0) and 512 of its own.
/// Source: a qcow2 overlay whose backing file has seed-100 blocks 0..256 at 0; the overlay
/// adds seed-100 blocks 256..512 at 3 MiB (shared content at another offset), 512 blocks
/// of its own at 1 MiB, and one block repeated at 6 MiB and 6 MiB + 40 KiB.
struct Setup {
    _dir: tempfile::TempDir,
    source: std::path::PathBuf,
    dest_image: std::path::PathBuf,
    target: std::path::PathBuf,
    index: ChunkIndex,
    size: u64,
}

fn setup() -> Result<Setup> {
    let dir = tempfile::tempdir()?;
    let size = 8 * MIB;
    let dest_image = dir.path().join("library.raw");
    create(&dest_image, "raw", size, None)?;
    write(&dest_image, "raw", 0, &blocks(100, 0, 512), "")?;
    write(&dest_image, "raw", 4 * MIB, &blocks(101, 0, 512), "")?;

    let base = dir.path().join("base.qcow2");
    let source = dir.path().join("vm.qcow2");
    create(&base, "qcow2", size, None)?;
    write(&base, "qcow2", 0, &blocks(100, 0, 256), "")?;
    create(&source, "qcow2", size, Some(&base))?;
    write(&source, "qcow2", 3 * MIB, &blocks(100, 256, 256), "")?;
    write(&source, "qcow2", MIB, &blocks(102, 0, 512), "")?;
    write(&source, "qcow2", 6 * MIB, &block(103, 0), "")?;
    write(&source, "qcow2", 6 * MIB + 40 * KIB, &block(103, 0), "")?;

    let target = dir.path().join("target.raw");
    create(&target, "raw", size, None)?;
    let mut index = ChunkIndex::open(dir.path().join("dest-state"), hasher())?;
    index.add_image(&dest_image, ImageFormat::Raw)?;
    Ok(Setup {
        source,
        dest_image,
        target,
        index,
        size,
        _dir: dir,
    })
}

/// The source's side: reads wanted blocks from its disk.
fn source_block(content: &[u8], offset: u64) -> &[u8] {
    &content[offset as usize..(offset as usize + BLOCK_BYTES).min(content.len())]
}

#[test]
#[ignore = "tier qemu: needs QEMU 10 and its tools (bash scripts/test.sh runs it)"]
fn plan_finds_exactly_the_blocks_the_destination_holds() -> Result<()> {
    let s = setup()?;
    let h = hasher();
    let manifest = scan_image(&s.source, ImageFormat::Qcow2, &h)?;
    assert_eq!(manifest.data_blocks(), 256 + 256 + 512 + 2);
    let wire = manifest.encode();
    let manifest = Manifest::decode(&wire)?;

    let p = plan(&manifest, &s.index);
    let have: BTreeSet<u64> = p.have.iter().map(|(o, _)| *o).collect();
    let shared: BTreeSet<u64> = (0..256)
        .map(|n| n * BLOCK)
        .chain((0..256).map(|n| 3 * MIB + n * BLOCK))
        .collect();
    assert_eq!(have, shared);
    // Shared content at another offset is found where the destination has it.
    let (_, loc) = p.have.iter().find(|(o, _)| *o == 3 * MIB).unwrap();
    assert_eq!(loc.offset, 256 * BLOCK);
    let want: BTreeSet<u64> = p.want.iter().copied().collect();
    let expect_want: BTreeSet<u64> = (0..512).map(|n| MIB + n * BLOCK).chain([6 * MIB]).collect();
    assert_eq!(want, expect_want);
    assert_eq!(p.dups, vec![(6 * MIB + 40 * KIB, 6 * MIB)]);
    assert_eq!(p.zeros, manifest.zeros());
    Ok(())
}

#[test]
#[ignore = "tier qemu: needs QEMU 10 and its tools (bash scripts/test.sh runs it)"]
fn rebuild_from_index_and_wanted_blocks_equals_the_source() -> Result<()> {
    let s = setup()?;
    let h = hasher();
    let manifest = Manifest::decode(&scan_image(&s.source, ImageFormat::Qcow2, &h)?.encode())?;
    let p = plan(&manifest, &s.index);
    let source_content = guest_content(&s.source, "qcow2")?;

    let mut rebuild = Rebuild::new(
        &manifest,
        p.clone(),
        h.clone(),
        RawFileTarget::open(&s.target)?,
    );
    let local = rebuild.apply_local(&s.index)?;
    assert_eq!(local.blocks_written, 512);
    assert!(local.refetch.is_empty() && local.read_errors.is_empty());
    assert_eq!(rebuild.pending(), p.want);

    // Errors leave the block pending.
    let first = p.want[0];
    assert!(matches!(
        rebuild.receive(first, &[1u8; BLOCK_BYTES]),
        Err(ReceiveChunkError::Mismatch { .. })
    ));
    assert!(matches!(
        rebuild.receive(first, &[1u8; 10]),
        Err(ReceiveChunkError::Length { .. })
    ));
    assert!(matches!(
        rebuild.receive(0, source_block(&source_content, 0)),
        Err(ReceiveChunkError::NotWanted { .. })
    ));
    for offset in rebuild.pending() {
        rebuild.receive(offset, source_block(&source_content, offset))?;
    }
    let progress = rebuild.progress();
    assert_eq!(
        (
            progress.local_blocks,
            progress.received_blocks,
            progress.dup_blocks,
            progress.pending_blocks
        ),
        (512, 513, 1, 0)
    );
    assert_eq!(progress.data_blocks, manifest.data_blocks());
    let (_, progress) = rebuild.finish()?;
    assert_eq!(progress.bytes_written, manifest.data_blocks() * BLOCK);
    qemu_img_compare(&s.source, "qcow2", &s.target, "raw")?;

    // What crossed the wire, against sending every allocated block.
    let sent = manifest.encode().len() as u64 + p.want.len() as u64 * 8 + p.want_bytes();
    let full = manifest.data_blocks() * BLOCK;
    eprintln!(
        "rebuild: manifest {} B, {} blocks wanted, {} from the index, {} dup; sent {:.3}x of the {} allocated bytes",
        manifest.encode().len(),
        p.want.len(),
        p.have.len(),
        p.dups.len(),
        sent as f64 / full as f64,
        full
    );
    assert!(sent * 100 < full * 52);
    Ok(())
}

#[test]
#[ignore = "tier qemu: needs QEMU 10 and its tools (bash scripts/test.sh runs it)"]
fn stale_local_blocks_are_refetched_and_the_result_still_equals_the_source() -> Result<()> {
    let s = setup()?;
    let h = hasher();
    let manifest = scan_image(&s.source, ImageFormat::Qcow2, &h)?;
    let p = plan(&manifest, &s.index);
    // The destination's image changes after planning, without a refresh: 3 of its
    // blocks (two adjacent) no longer hold what the index says.
    for n in [10u64, 11, 300] {
        write(&s.dest_image, "raw", n * BLOCK, &block(104, n), "")?;
    }
    let source_content = guest_content(&s.source, "qcow2")?;
    // A target holding old data: the zero runs must be written too.
    std::fs::write(&s.target, vec![0x5au8; s.size as usize])?;
    let rebuild = Rebuild::new(&manifest, p, h.clone(), RawFileTarget::open(&s.target)?);
    assert!(matches!(
        rebuild.finish(),
        Err(FinishRebuildError::LocalNotApplied { .. })
    ));

    let p = plan(&manifest, &s.index);
    let mut rebuild = Rebuild::new(&manifest, p, h, RawFileTarget::open(&s.target)?);
    let local = rebuild.apply_local(&s.index)?;
    // Block 300 of the library is shared at 3 MiB + 44 blocks of the source.
    assert_eq!(
        local.refetch,
        vec![10 * BLOCK, 11 * BLOCK, 3 * MIB + 44 * BLOCK]
    );
    assert_eq!(local.blocks_written, 509);
    rebuild.write_zeroes()?;
    let mut pending = rebuild.pending();
    let last = pending.pop().unwrap();
    for offset in pending {
        rebuild.receive(offset, source_block(&source_content, offset))?;
    }
    let Err(err) = Rebuild::finish(rebuild) else {
        panic!("finish with a block missing succeeded");
    };
    assert!(matches!(err, FinishRebuildError::Incomplete { pending: 1, first } if first == last));

    // Again, completely.
    let p = plan(&manifest, &s.index);
    let mut rebuild = Rebuild::new(&manifest, p, hasher(), RawFileTarget::open(&s.target)?);
    rebuild.apply_local(&s.index)?;
    rebuild.write_zeroes()?;
    for offset in rebuild.pending() {
        rebuild.receive(offset, source_block(&source_content, offset))?;
    }
    let (_, progress) = rebuild.finish()?;
    assert_eq!(progress.refetch_blocks, 3);
    qemu_img_compare(&s.source, "qcow2", &s.target, "raw")?;
    // The failed hash checks marked the library image: refresh reads it again.
    let mut index = s.index;
    assert_eq!(index.refresh().reindexed.len(), 1);
    Ok(())
}

#[test]
fn random_disk_costs_less_than_one_percent_over_its_bytes() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let img = dir.path().join("random.raw");
    std::fs::write(&img, blocks(110, 0, 16 * MIB / BLOCK))?;
    let h = hasher();
    let manifest = scan_image(&img, ImageFormat::Raw, &h)?;
    let index = ChunkIndex::open(dir.path().join("state"), h)?;
    let p = plan(&manifest, &index);
    assert_eq!(p.want.len() as u64, 16 * MIB / BLOCK);
    let overhead = manifest.encode().len() as u64 + p.want.len() as u64 * 8;
    let ratio = overhead as f64 / (16 * MIB) as f64;
    eprintln!(
        "random 16 MiB disk: manifest {} B + want list {} B = {:.3}% overhead",
        manifest.encode().len(),
        p.want.len() * 8,
        ratio * 100.0
    );
    assert!(ratio < 0.01);
    Ok(())
}

/// Index speed. Not an assertion: the machine is shared.
#[test]
#[ignore = "tier qemu: needs QEMU 10 and its tools (bash scripts/test.sh runs it)"]
fn index_speed_for_a_256_mib_raw_image_and_a_64_mib_qcow2() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let raw = dir.path().join("big.raw");
    {
        use std::io::Write;
        let mut f = std::io::BufWriter::new(std::fs::File::create(&raw)?);
        let mut buf = vec![0u8; 4 * MIB as usize];
        for i in 0..64u64 {
            let mut x = blake3::Hasher::new();
            x.update(&i.to_le_bytes());
            x.finalize_xof().fill(&mut buf);
            f.write_all(&buf)?;
        }
    }
    let mut index = ChunkIndex::open(dir.path().join("state"), hasher())?;
    let t = Instant::now();
    let s = index.add_image(&raw, ImageFormat::Raw)?;
    eprintln!(
        "index 256 MiB raw: {:.2?}, {:.0} MiB/s ({} blocks)",
        t.elapsed(),
        s.mib_per_sec(),
        s.data_blocks
    );
    // A 64 MiB qcow2 made from the first 64 MiB, read through qemu-nbd.
    let qcow = dir.path().join("big.qcow2");
    let head = dir.path().join("head.raw");
    std::fs::write(&head, &std::fs::read(&raw)?[..64 * MIB as usize])?;
    run(std::process::Command::new("qemu-img")
        .args(["convert", "-f", "raw", "-O", "qcow2"])
        .arg(&head)
        .arg(&qcow))?;
    let s = index.add_image(&qcow, ImageFormat::Qcow2)?;
    eprintln!(
        "index 64 MiB qcow2 through qemu-nbd: {:.2?}, {:.0} MiB/s",
        s.elapsed,
        s.mib_per_sec()
    );
    Ok(())
}

#[test]
#[ignore = "tier qemu: needs QEMU 10 and its tools (bash scripts/test.sh runs it)"]
fn runs_of_wanted_blocks_are_checked_whole_and_written_at_once() -> Result<()> {
    let s = setup()?;
    let h = hasher();
    let manifest = Manifest::decode(&scan_image(&s.source, ImageFormat::Qcow2, &h)?.encode())?;
    let p = plan(&manifest, &s.index);
    let source_content = guest_content(&s.source, "qcow2")?;
    let mut rebuild = Rebuild::new(&manifest, p, h, RawFileTarget::open(&s.target)?);
    rebuild.apply_local(&s.index)?;
    // The 512 wanted blocks at 1 MiB are one run; one bad block refuses the whole run.
    let run = &source_content[MIB as usize..(MIB + 512 * BLOCK) as usize];
    let mut bad = run.to_vec();
    bad[100 * BLOCK_BYTES + 7] ^= 1;
    assert!(matches!(
        rebuild.receive_run(MIB, &bad),
        Err(ReceiveChunkError::Mismatch { offset }) if offset == MIB + 100 * BLOCK
    ));
    assert_eq!(
        rebuild.pending().len(),
        513,
        "a refused run leaves every block pending"
    );
    // A run reaching past the wanted blocks is refused too.
    let long = &source_content[MIB as usize..(MIB + 513 * BLOCK) as usize];
    assert!(matches!(
        rebuild.receive_run(MIB, long),
        Err(ReceiveChunkError::NotWanted { .. })
    ));
    rebuild.receive_run(MIB, run)?;
    assert_eq!(rebuild.pending(), vec![6 * MIB]);
    assert!(!rebuild.is_complete());
    rebuild.receive_run(6 * MIB, source_block(&source_content, 6 * MIB))?;
    assert!(rebuild.is_complete());
    let (_, progress) = rebuild.finish()?;
    assert_eq!((progress.received_blocks, progress.dup_blocks), (513, 1));
    qemu_img_compare(&s.source, "qcow2", &s.target, "raw")?;
    Ok(())
}

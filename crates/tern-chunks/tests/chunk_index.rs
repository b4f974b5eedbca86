//! The chunk index against real images: raw, qcow2 (compressed clusters too), and a
//! qcow2 overlay on a backing file; persistence, refresh, staleness and damage.

mod common;

use std::path::Path;

use anyhow::Result;
use common::*;
use tern_chunks::{ChunkIndex, Hash, ImageFormat, IndexFileProblem, ReadChunkError, BLOCK_BYTES};

/// Every non-zero block of `content` is found, and reads back as itself from `image`.
fn assert_indexed(index: &ChunkIndex, content: &[u8], image_path: &Path) {
    let canon = std::fs::canonicalize(image_path).unwrap();
    let h = index.hasher().clone();
    for (offset, hash) in block_hashes(content, &h) {
        let loc = index
            .lookup(&hash)
            .unwrap_or_else(|| panic!("block at {offset} of {} not indexed", image_path.display()));
        assert_eq!(index.image(loc.image).unwrap().path(), canon);
        let mut buf = [0u8; BLOCK_BYTES];
        index.read_chunk(&loc, &mut buf).unwrap();
        assert_eq!(h.hash(&buf), hash);
    }
}

fn all_lookups(index: &ChunkIndex, hashes: &[Hash]) -> Vec<Option<(u64, std::path::PathBuf)>> {
    hashes
        .iter()
        .map(|h| {
            index
                .lookup(h)
                .map(|l| (l.offset, index.image(l.image).unwrap().path().to_path_buf()))
        })
        .collect()
}

#[test]
#[ignore = "tier qemu: needs QEMU 10 and its tools (bash scripts/test.sh runs it)"]
fn raw_and_qcow2_images_index_exactly_their_non_zero_blocks() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let raw = dir.path().join("disk.raw");
    let qcow = dir.path().join("disk.qcow2");
    create(&raw, "raw", 8 * MIB, None)?;
    create(&qcow, "qcow2", 8 * MIB, None)?;
    // Raw: 64 distinct blocks at 1 MiB, one unaligned 1000-byte write at 5 MiB + 100.
    write(&raw, "raw", MIB, &blocks(1, 0, 64), "")?;
    write(&raw, "raw", 5 * MIB + 100, &block(2, 0)[..1000], "")?;
    // qcow2: 32 blocks plain at 0, a compressed 64 KiB cluster at 4 MiB, and a
    // write-zeroes over data.
    write(&qcow, "qcow2", 0, &blocks(3, 0, 32), "")?;
    write(&qcow, "qcow2", 4 * MIB, &blocks(4, 0, 16), "-c")?;
    qemu_io(&qcow, "qcow2", &["write -q -z 8192 8192".into()])?;

    let mut index = ChunkIndex::open(dir.path().join("state"), hasher())?;
    let r = index.add_image(&raw, ImageFormat::Raw)?;
    assert_eq!(r.data_blocks, 65);
    assert_eq!(r.zero_blocks, 2048 - 65);
    assert_eq!(r.new_chunks, 65);
    let q = index.add_image(&qcow, ImageFormat::Qcow2)?;
    assert_eq!(q.data_blocks, 30 + 16);
    // Only the allocated clusters were read, not the whole 8 MiB.
    assert!(q.bytes_read < 2 * MIB, "read {} bytes", q.bytes_read);

    assert_indexed(&index, &guest_content(&raw, "raw")?, &raw);
    assert_indexed(&index, &guest_content(&qcow, "qcow2")?, &qcow);
    assert!(!index.contains(&index.hasher().hash(&[0u8; BLOCK_BYTES])));
    let s = index.stats();
    assert_eq!((s.images, s.chunks, s.images_read), (2, 65 + 46, 2));
    Ok(())
}

#[test]
#[ignore = "tier qemu: needs QEMU 10 and its tools (bash scripts/test.sh runs it)"]
fn overlay_is_indexed_with_the_content_it_reads_from_its_backing_file() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let base = dir.path().join("base.qcow2");
    let overlay = dir.path().join("vm.qcow2");
    create(&base, "qcow2", 4 * MIB, None)?;
    write(&base, "qcow2", 0, &blocks(10, 0, 256), "")?; // 0..1 MiB
    create(&overlay, "qcow2", 4 * MIB, Some(&base))?;
    write(&overlay, "qcow2", 256 * KIB, &blocks(11, 0, 64), "")?; // hides base blocks 64..128

    let h = hasher();
    let mut index = ChunkIndex::open(dir.path().join("state"), h.clone())?;
    let stats = index.add_image(&overlay, ImageFormat::Qcow2)?;
    assert_eq!(stats.data_blocks, 256);
    let content = guest_content(&overlay, "qcow2")?;
    assert_indexed(&index, &content, &overlay);
    // Base blocks the overlay hides are not guest-visible: not indexed.
    for n in 64..128 {
        assert!(
            !index.contains(&h.hash(&block(10, n))),
            "hidden base block {n} indexed"
        );
    }
    for n in (0..64).chain(128..256) {
        assert!(index.contains(&h.hash(&block(10, n))));
    }
    let rec = index.images().next().unwrap();
    assert_eq!(
        rec.backing_files().collect::<Vec<_>>(),
        vec![std::fs::canonicalize(&base)?.as_path()]
    );

    // A change to the backing file re-indexes the overlay on refresh.
    write(&base, "qcow2", 0, &block(12, 0), "")?;
    let report = index.refresh();
    assert_eq!(report.reindexed.len(), 1);
    assert!(index.contains(&h.hash(&block(12, 0))));
    assert!(!index.contains(&h.hash(&block(10, 0))));
    Ok(())
}

#[test]
#[ignore = "tier qemu: needs QEMU 10 and its tools (bash scripts/test.sh runs it)"]
fn a_sample_of_an_overlay_finds_what_an_index_of_its_base_holds() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let base = dir.path().join("base.qcow2");
    let overlay = dir.path().join("vm.qcow2");
    create(&base, "qcow2", 4 * MIB, None)?;
    write(&base, "qcow2", 0, &blocks(20, 0, 256), "")?; // 0..1 MiB
    create(&overlay, "qcow2", 4 * MIB, Some(&base))?;
    // a quarter of the data rewritten in the overlay, and 1 MiB of new data
    write(&overlay, "qcow2", 0, &blocks(21, 0, 64), "")?;
    write(&overlay, "qcow2", 2 * MIB, &blocks(22, 0, 256), "")?;

    let h = hasher();
    let mut index = ChunkIndex::open(dir.path().join("state"), h.clone())?;
    index.add_image(&base, ImageFormat::Qcow2)?;
    let s = tern_chunks::sample_image(&overlay, ImageFormat::Qcow2, &h, 128)?;
    // 512 data blocks, every 4th read: 128 samples, none of them zero
    assert_eq!(
        s.hashes.len() + s.zero,
        128,
        "{} + {}",
        s.hashes.len(),
        s.zero
    );
    assert_eq!(s.data.len(), s.hashes.len() * BLOCK_BYTES);
    let held = s.hashes.iter().filter(|x| index.contains(x)).count();
    // the base's 192 visible blocks of 512: 3/8
    assert!(
        (40..=56).contains(&held),
        "{held} of {} held",
        s.hashes.len()
    );
    // a raw image of zeros: its blocks are read and found zero
    let raw = dir.path().join("zeros.raw");
    create(&raw, "raw", MIB, None)?;
    let z = tern_chunks::sample_image(&raw, ImageFormat::Raw, &h, 16)?;
    assert_eq!((z.hashes.len(), z.zero), (0, 16));
    Ok(())
}

#[test]
#[ignore = "tier qemu: needs QEMU 10 and its tools (bash scripts/test.sh runs it)"]
fn index_reopened_from_disk_gives_the_same_lookups_without_reading_images() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let a = dir.path().join("a.raw");
    let b = dir.path().join("b.qcow2");
    create(&a, "raw", 4 * MIB, None)?;
    create(&b, "qcow2", 4 * MIB, None)?;
    write(&a, "raw", 0, &blocks(20, 0, 100), "")?;
    // b shares blocks 50..100 of a, plus 50 of its own.
    write(&b, "qcow2", MIB, &blocks(20, 50, 50), "")?;
    write(&b, "qcow2", 2 * MIB, &blocks(21, 0, 50), "")?;
    let h = hasher();
    let hashes: Vec<Hash> = (0..100)
        .map(|n| h.hash(&block(20, n)))
        .chain((0..50).map(|n| h.hash(&block(21, n))))
        .collect();

    let state = dir.path().join("state");
    let (before, stats_before) = {
        let mut index = ChunkIndex::open(&state, h.clone())?;
        index.add_image(&a, ImageFormat::Raw)?;
        index.add_image(&b, ImageFormat::Qcow2)?;
        (all_lookups(&index, &hashes), index.stats())
    };
    assert!(before.iter().all(Option::is_some));
    // Shared blocks are located in the raw image (cheaper to read back).
    assert!(before[50..100]
        .iter()
        .all(|l| l.as_ref().unwrap().1.ends_with("a.raw")));

    let mut index = ChunkIndex::open(&state, h.clone())?;
    assert!(index.load_problems().is_empty());
    assert_eq!(all_lookups(&index, &hashes), before);
    let s = index.stats();
    assert_eq!((s.images, s.chunks, s.data_blocks), (2, 150, 200));
    assert_eq!((s.chunks, stats_before.chunks), (150, 150));
    assert_eq!(s.images_read, 0);
    let report = index.refresh();
    assert_eq!(report.unchanged.len(), 2);
    assert!(report.reindexed.is_empty() && report.dropped.is_empty());
    assert_eq!(index.stats().images_read, 0);

    // Another cluster key: nothing comparable, both images re-indexed.
    let mut other = ChunkIndex::open(&state, tern_chunks::ContentHasher::new([8; 32]))?;
    assert_eq!(other.load_problems().len(), 2);
    assert!(matches!(
        other.load_problems()[0],
        IndexFileProblem::KeyChanged { .. }
    ));
    assert_eq!(other.stats().chunks, 0);
    assert_eq!(other.refresh().reindexed.len(), 2);
    assert_eq!(other.stats().chunks, 150);
    Ok(())
}

#[test]
#[ignore = "tier qemu: needs QEMU 10 and its tools (bash scripts/test.sh runs it)"]
fn refresh_rereads_only_the_modified_image() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let h = hasher();
    let mut index = ChunkIndex::open(dir.path().join("state"), h.clone())?;
    let paths: Vec<_> = (0..3)
        .map(|i| dir.path().join(format!("img{i}.raw")))
        .collect();
    for (i, p) in paths.iter().enumerate() {
        create(p, "raw", 2 * MIB, None)?;
        write(p, "raw", 0, &blocks(30 + i as u64, 0, 32), "")?;
        index.add_image(p, ImageFormat::Raw)?;
    }
    assert_eq!(index.stats().images_read, 3);

    write(&paths[1], "raw", 4096, &block(40, 0), "")?;
    let report = index.refresh();
    let reread: Vec<_> = report.reindexed.iter().map(|s| s.path.clone()).collect();
    assert_eq!(reread, vec![std::fs::canonicalize(&paths[1])?]);
    assert_eq!(report.unchanged.len(), 2);
    assert_eq!(index.stats().images_read, 4);
    assert!(index.contains(&h.hash(&block(40, 0))));
    assert!(
        !index.contains(&h.hash(&block(31, 1))),
        "overwritten block still indexed"
    );
    assert!(index.contains(&h.hash(&block(31, 2))));

    // Nothing changed since: nothing read.
    let report = index.refresh();
    assert_eq!((report.reindexed.len(), report.unchanged.len()), (0, 3));
    assert_eq!(index.stats().images_read, 4);
    Ok(())
}

#[test]
#[ignore = "tier qemu: needs QEMU 10 and its tools (bash scripts/test.sh runs it)"]
fn vanished_image_is_dropped_and_its_shared_chunks_stay_located_in_the_other() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let h = hasher();
    let a = dir.path().join("a.raw");
    let b = dir.path().join("b.raw");
    create(&a, "raw", MIB, None)?;
    create(&b, "raw", MIB, None)?;
    write(&a, "raw", 0, &blocks(50, 0, 20), "")?; // a: 0..20
    write(&b, "raw", 0, &blocks(50, 10, 20), "")?; // b: 10..30, shares 10..20
    let state = dir.path().join("state");
    let mut index = ChunkIndex::open(&state, h.clone())?;
    index.add_image(&a, ImageFormat::Raw)?;
    index.add_image(&b, ImageFormat::Raw)?;
    // Shared blocks are located in a (first indexed).
    let shared = h.hash(&block(50, 15));
    assert_eq!(
        index
            .image(index.lookup(&shared).unwrap().image)
            .unwrap()
            .path(),
        std::fs::canonicalize(&a)?
    );

    std::fs::remove_file(&a)?;
    let report = index.refresh();
    assert_eq!(report.dropped.len(), 1);
    assert_eq!(report.unchanged.len(), 1);
    let loc = index.lookup(&shared).expect("shared chunk still located");
    assert_eq!(
        index.image(loc.image).unwrap().path(),
        std::fs::canonicalize(&b)?
    );
    assert_eq!(loc.offset, 5 * BLOCK);
    let mut buf = [0u8; BLOCK_BYTES];
    index.read_chunk(&loc, &mut buf)?;
    assert!(!index.contains(&h.hash(&block(50, 5))));
    assert_eq!(index.stats().chunks, 20);

    // The same after reopening.
    let index = ChunkIndex::open(&state, h.clone())?;
    assert_eq!(index.stats().images, 1);
    assert_eq!(index.lookup(&shared), Some(loc));
    Ok(())
}

#[test]
#[ignore = "tier qemu: needs QEMU 10 and its tools (bash scripts/test.sh runs it)"]
fn remove_image_keeps_chunks_other_images_hold() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let h = hasher();
    let a = dir.path().join("a.qcow2");
    let b = dir.path().join("b.raw");
    create(&a, "qcow2", MIB, None)?;
    create(&b, "raw", MIB, None)?;
    write(&a, "qcow2", 0, &blocks(55, 0, 20), "")?;
    write(&b, "raw", 0, &blocks(55, 10, 20), "")?;
    let mut index = ChunkIndex::open(dir.path().join("state"), h.clone())?;
    index.add_image(&b, ImageFormat::Raw)?;
    index.add_image(&a, ImageFormat::Qcow2)?;
    let removed = index.remove_image(&b)?;
    assert_eq!(removed.path(), std::fs::canonicalize(&b)?);
    assert_eq!(index.stats().chunks, 20);
    assert!(index.contains(&h.hash(&block(55, 15))));
    assert!(!index.contains(&h.hash(&block(55, 25))));
    assert!(matches!(
        index.remove_image(&b),
        Err(tern_chunks::RemoveImageError::NotIndexed(_))
    ));
    Ok(())
}

#[test]
#[ignore = "tier qemu: needs QEMU 10 and its tools (bash scripts/test.sh runs it)"]
fn stale_entry_is_caught_by_the_hash_check_on_read() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let h = hasher();
    for (fmt, format) in [("raw", ImageFormat::Raw), ("qcow2", ImageFormat::Qcow2)] {
        let img = dir.path().join(format!("img.{fmt}"));
        create(&img, fmt, MIB, None)?;
        write(&img, fmt, 0, &blocks(60, 0, 8), "")?;
        let mut index = ChunkIndex::open(dir.path().join(format!("state-{fmt}")), h.clone())?;
        index.add_image(&img, format)?;
        let loc = index.lookup(&h.hash(&block(60, 3))).unwrap();
        let mut buf = [0u8; BLOCK_BYTES];
        index.read_chunk(&loc, &mut buf)?;

        // Changed behind the index's back (no refresh).
        write(&img, fmt, 3 * BLOCK, &block(61, 0), "")?;
        match index.read_chunk(&loc, &mut buf) {
            Err(ReadChunkError::Stale { offset, .. }) => assert_eq!(offset, 3 * BLOCK),
            other => panic!("{fmt}: expected Stale, got {other:?}"),
        }
        // Others still read fine; refresh fixes the entry.
        index.read_chunk(&index.lookup(&h.hash(&block(60, 4))).unwrap(), &mut buf)?;
        assert_eq!(index.refresh().reindexed.len(), 1);
        assert!(index.lookup(&h.hash(&block(60, 3))).is_none());
        let loc = index.lookup(&h.hash(&block(61, 0))).unwrap();
        index.read_chunk(&loc, &mut buf)?;
        assert_eq!(&buf[..], &block(61, 0)[..]);
    }
    Ok(())
}

#[test]
#[ignore = "tier qemu: needs QEMU 10 and its tools (bash scripts/test.sh runs it)"]
fn damaged_index_files_are_reported_and_their_images_reindexed_not_trusted() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let h = hasher();
    let state = dir.path().join("state");
    let a = dir.path().join("a.raw");
    let b = dir.path().join("b.raw");
    create(&a, "raw", MIB, None)?;
    create(&b, "raw", MIB, None)?;
    write(&a, "raw", 0, &blocks(70, 0, 10), "")?;
    write(&b, "raw", 0, &blocks(71, 0, 10), "")?;
    {
        let mut index = ChunkIndex::open(&state, h.clone())?;
        index.add_image(&a, ImageFormat::Raw)?; // 00000000.tci
        index.add_image(&b, ImageFormat::Raw)?; // 00000001.tci
    }
    let images = state.join("images");
    // a: a flipped byte in the block list; b: truncated inside its header.
    let fa = images.join("00000000.tci");
    let mut bytes = std::fs::read(&fa)?;
    let n = bytes.len();
    bytes[n - 40] ^= 0x01;
    std::fs::write(&fa, bytes)?;
    let fb = images.join("00000001.tci");
    let bytes = std::fs::read(&fb)?;
    std::fs::write(&fb, &bytes[..20])?;
    // A leftover from an interrupted write is ignored and cleaned.
    std::fs::write(images.join("00000005.tci.tmp"), b"partial")?;

    let mut index = ChunkIndex::open(&state, h.clone())?;
    let problems = index.load_problems().to_vec();
    assert_eq!(problems.len(), 2, "{problems:?}");
    assert!(problems.iter().any(
        |p| matches!(p, IndexFileProblem::BodyCorrupt { image, .. } if image.ends_with("a.raw"))
    ));
    assert!(problems
        .iter()
        .any(|p| matches!(p, IndexFileProblem::Unreadable { file } if file == &fb)));
    assert!(images.join("00000001.corrupt").exists());
    assert!(!images.join("00000005.tci.tmp").exists());
    // Nothing of a is trusted; its record survived and is marked for re-indexing.
    assert_eq!(index.stats().chunks, 0);
    assert_eq!(index.stats().images, 1);
    assert!(index.images().next().unwrap().needs_reindex());
    let report = index.refresh();
    assert_eq!(report.reindexed.len(), 1);
    assert!(index.contains(&h.hash(&block(70, 3))));
    // b was forgotten (its path was in the damaged header): import it again.
    assert!(!index.contains(&h.hash(&block(71, 3))));
    index.add_image(&b, ImageFormat::Raw)?;
    assert!(index.contains(&h.hash(&block(71, 3))));
    // A new id, not the quarantined file's.
    assert_eq!(
        index.images().map(|r| r.id().0).collect::<Vec<_>>(),
        vec![0, 2]
    );
    let index = ChunkIndex::open(&state, h)?;
    assert!(index.load_problems().is_empty());
    assert_eq!(index.stats().chunks, 20);
    Ok(())
}

#[test]
#[ignore = "tier qemu: needs QEMU 10 and its tools (bash scripts/test.sh runs it)"]
fn qcow2_held_open_by_another_qemu_can_be_indexed() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let img = dir.path().join("busy.qcow2");
    create(&img, "qcow2", MIB, None)?;
    write(&img, "qcow2", 0, &blocks(80, 0, 4), "")?;
    // qemu-io holds the image open read-write (and its write lock) while it sleeps.
    let mut holder = std::process::Command::new("qemu-io")
        .args(["-f", "qcow2", "-c", "sleep 60000"])
        .arg(&img)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()?;
    struct Kill<'a>(&'a mut std::process::Child);
    impl Drop for Kill<'_> {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let _kill = Kill(&mut holder);
    // Wait until qemu-io has the image open (it takes the lock as it opens, and exits if
    // it cannot). Probing with `qemu-img info` would race with it: the probe's own shared
    // lock can make qemu-io's open fail.
    let pid = _kill.0.id();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    loop {
        let open = std::fs::read_dir(format!("/proc/{pid}/fd"))
            .map(|d| {
                d.flatten()
                    .any(|e| std::fs::read_link(e.path()).is_ok_and(|t| t == img))
            })
            .unwrap_or(false);
        if open {
            break;
        }
        assert!(
            _kill.0.try_wait()?.is_none(),
            "qemu-io exited before holding the image"
        );
        assert!(
            std::time::Instant::now() < deadline,
            "qemu-io never opened the image"
        );
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    let mut index = ChunkIndex::open(dir.path().join("state"), hasher())?;
    assert_eq!(index.add_image(&img, ImageFormat::Qcow2)?.data_blocks, 4);
    let loc = index.lookup(&hasher().hash(&block(80, 2))).unwrap();
    index.read_chunk(&loc, &mut [0u8; BLOCK_BYTES])?;
    // qemu-io exits when it cannot lock: still running means it held the write lock
    // all along
    assert!(_kill.0.try_wait()?.is_none(), "the holder kept the image");
    assert!(
        run(std::process::Command::new("qemu-img").arg("info").arg(&img)).is_err(),
        "the image is locked while indexed"
    );
    Ok(())
}

#[test]
fn image_with_a_short_last_block_is_indexed_zero_padded() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let img = dir.path().join("odd.raw");
    let mut data = blocks(90, 0, 2);
    data.extend_from_slice(&block(90, 2)[..1000]);
    std::fs::write(&img, &data)?;
    let h = hasher();
    let mut index = ChunkIndex::open(dir.path().join("state"), h.clone())?;
    let s = index.add_image(&img, ImageFormat::Raw)?;
    assert_eq!((s.virtual_size, s.data_blocks), (2 * BLOCK + 1000, 3));
    let mut padded = [0u8; BLOCK_BYTES];
    padded[..1000].copy_from_slice(&block(90, 2)[..1000]);
    let loc = index.lookup(&h.hash(&padded)).unwrap();
    let mut buf = [0xffu8; BLOCK_BYTES];
    index.read_chunk(&loc, &mut buf)?;
    assert_eq!(buf, padded);
    Ok(())
}

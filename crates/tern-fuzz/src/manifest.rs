//! Target `manifest_decode`: disk manifests (`tern_chunks::Manifest`), as the destination
//! decodes them from `DiskManifest` frames and the chunk index from its files.

use tern_chunks::{Block, Manifest, BLOCK_SIZE};

/// Walking every block is linear in the range: only for manifests this small.
const MAX_WALK_BLOCKS: u64 = 1 << 16;

pub(crate) fn run(data: &[u8]) {
    if let Ok(m) = Manifest::decode(data) {
        assert_eq!(m.encode(), data, "decode then encode changed the bytes");
        check(&m);
    }
}

/// What every decoded manifest must satisfy.
pub(crate) fn check(m: &Manifest) {
    let r = m.range();
    assert!(
        r.start.is_multiple_of(BLOCK_SIZE) && r.start <= r.end,
        "range {r:?}"
    );
    let blocks = m.block_count();
    assert_eq!(blocks, (r.end - r.start).div_ceil(BLOCK_SIZE));
    // the last block's end (a short block counts whole) fits in 64 bits
    assert!(
        blocks
            .checked_mul(BLOCK_SIZE)
            .and_then(|l| r.start.checked_add(l))
            .is_some(),
        "range {r:?} has blocks past 2^64"
    );

    let mut next = r.start;
    for (o, h) in m.data() {
        assert!(
            *o >= next && o.is_multiple_of(BLOCK_SIZE) && *o < r.end,
            "data block {o}"
        );
        assert_eq!(m.hash_at(*o), Some(h));
        let len = m.block_len(*o);
        assert!(len > 0 && len as u64 <= BLOCK_SIZE);
        next = o.saturating_add(BLOCK_SIZE);
    }
    let mut next = r.start;
    for z in m.zeros() {
        assert!(
            z.start >= next && z.start < z.end && z.end <= r.end,
            "zero run {z:?}"
        );
        assert!(z.start.is_multiple_of(BLOCK_SIZE));
        assert!(
            z.end.is_multiple_of(BLOCK_SIZE) || z.end == r.end,
            "zero run {z:?}"
        );
        let i = m.data().partition_point(|(o, _)| *o < z.start);
        assert!(
            m.data().get(i).is_none_or(|(o, _)| *o >= z.end),
            "zero run {z:?} holds a data block"
        );
        next = z.end;
    }
    assert!(m.data_blocks() + m.zero_blocks() <= blocks);
    assert_eq!(
        m.unchanged_blocks(),
        blocks - m.data_blocks() - m.zero_blocks()
    );

    if blocks <= MAX_WALK_BLOCKS {
        let mut counts = [0u64; 3];
        let mut expect = r.start;
        for (o, b) in m.blocks() {
            assert_eq!(o, expect, "blocks() skipped or repeated a block");
            expect += BLOCK_SIZE;
            counts[match b {
                Block::Data(h) => {
                    assert_eq!(m.hash_at(o), Some(&h));
                    0
                }
                Block::Zero => 1,
                Block::Unchanged => 2,
            }] += 1;
        }
        assert_eq!(
            counts,
            [m.data_blocks(), m.zero_blocks(), m.unchanged_blocks()]
        );
    }
}

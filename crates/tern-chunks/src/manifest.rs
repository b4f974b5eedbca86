//! [`Manifest`]: what a range of a disk holds, block by block, as content hashes, and its
//! compact byte encoding (used on the wire and as the body of the index's image files).
//!
//! Owns the encoding and its validation. Must not do I/O: a manifest is built by whoever
//! reads the disk (the index, the source agent) and decoded from untrusted bytes, so
//! [`Manifest::decode`] checks everything and never panics or over-allocates.
//!
//! Encoding (all integers unsigned LEB128 varints, canonical: no overlong forms):
//!
//! ```text
//!  "TM" version(=1)  start_block  len_bytes  run*
//!  run = tag(u8) n_blocks(>=1) [n_blocks x 16-byte hash, for DATA only]
//!  tag: 0 reserved (invalid), 1 DATA, 2 ZERO, 3 UNCHANGED
//! ```
//!
//! The runs cover the `ceil(len_bytes / 4096)` blocks of the range exactly, in order, and
//! two adjacent runs never have the same tag, so every manifest has exactly one encoding
//! (decode then encode gives back the same bytes). A DATA block costs its 16-byte hash:
//! 0.39% of the block; a stretch of zero or unchanged blocks costs 2 to 11 bytes.

use std::ops::Range;

use tern_store::{ContentHasher, Hash};

/// Chunk size: 4 KiB blocks aligned to the disk offset, the same granularity as memory
/// pages and as filesystems' data placement.
pub const BLOCK_SIZE: u64 = 4096;
/// [`BLOCK_SIZE`] as a `usize`, for buffers.
pub const BLOCK_BYTES: usize = BLOCK_SIZE as usize;

const MAGIC: [u8; 2] = *b"TM";
const VERSION: u8 = 1;
const HASH_BYTES: usize = 16;

/// Run tags of the encoding. 0 is reserved so that zeroed memory never decodes.
const TAG_DATA: u8 = 1;
const TAG_ZERO: u8 = 2;
const TAG_UNCHANGED: u8 = 3;

/// The content of a byte range of a disk, per 4 KiB block: DATA blocks (by hash), ZERO
/// blocks, and blocks the manifest says nothing about (UNCHANGED: the receiver keeps what
/// it has, e.g. blocks not dirtied since the previous pass).
///
/// The range starts on a block boundary; it may end anywhere (a disk whose size is not a
/// multiple of 4 KiB): the last block is then short, and its hash is the hash of its bytes
/// padded with zeroes to 4 KiB.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Manifest {
    range: Range<u64>,
    /// Block offsets (aligned, strictly increasing, within `range`) and their hashes.
    data: Vec<(u64, Hash)>,
    /// Zero runs: aligned starts, ends aligned or equal to `range.end`, disjoint from
    /// `data`, in order, adjacent runs merged.
    zeros: Vec<Range<u64>>,
}

/// Why a block could not be added to a [`Manifest`] (or a manifest not created).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ManifestError {
    #[error(
        "manifest range {start}..{end} must start on a 4 KiB boundary and not end before it starts"
    )]
    BadRange { start: u64, end: u64 },
    #[error("offset {offset} is not on a 4 KiB boundary")]
    Unaligned { offset: u64 },
    #[error("block at {offset} comes before the end ({next}) of the previous block; blocks are added in order")]
    OutOfOrder { offset: u64, next: u64 },
    #[error("blocks {start}..{end} are not within the manifest range {range:?}")]
    OutOfRange {
        start: u64,
        end: u64,
        range: Range<u64>,
    },
}

/// Why bytes are not a valid [`Manifest`] encoding.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeManifestError {
    #[error("not a tern manifest (bad magic)")]
    Magic,
    #[error("unsupported manifest version {0} (this build reads version {VERSION})")]
    Version(u8),
    #[error("manifest ends early, at byte {at}")]
    Truncated { at: usize },
    #[error("bad varint at byte {at} (overlong or more than 64 bits)")]
    Varint { at: usize },
    #[error("manifest range (start block {start_block}, {len} bytes) overflows 64 bits")]
    RangeOverflow { start_block: u64, len: u64 },
    #[error("invalid run tag {tag} at byte {at}")]
    Tag { tag: u8, at: usize },
    #[error("run at byte {at} is empty or repeats the previous run's tag (not canonical)")]
    NotCanonical { at: usize },
    #[error("run at byte {at} of {n} blocks reaches past the manifest's {blocks} blocks")]
    RunTooLong { at: usize, n: u64, blocks: u64 },
    #[error("{0} bytes after the last run")]
    TrailingBytes(usize),
}

impl Manifest {
    /// An empty manifest (every block UNCHANGED) of `range`.
    pub fn new(range: Range<u64>) -> Result<Self, ManifestError> {
        if !range.start.is_multiple_of(BLOCK_SIZE) || range.end < range.start {
            return Err(ManifestError::BadRange {
                start: range.start,
                end: range.end,
            });
        }
        Ok(Self {
            range,
            data: Vec::new(),
            zeros: Vec::new(),
        })
    }

    /// The disk bytes this manifest describes.
    pub fn range(&self) -> Range<u64> {
        self.range.clone()
    }

    /// DATA blocks: (offset, hash), in order.
    pub fn data(&self) -> &[(u64, Hash)] {
        &self.data
    }

    /// ZERO runs, in order, adjacent runs merged.
    pub fn zeros(&self) -> &[Range<u64>] {
        &self.zeros
    }

    /// Blocks in the range (the last one possibly short).
    pub fn block_count(&self) -> u64 {
        blocks_in(self.range.end - self.range.start)
    }

    pub fn data_blocks(&self) -> u64 {
        self.data.len() as u64
    }

    pub fn zero_blocks(&self) -> u64 {
        self.zeros.iter().map(|r| blocks_in(r.end - r.start)).sum()
    }

    /// Blocks the manifest says nothing about.
    pub fn unchanged_blocks(&self) -> u64 {
        self.block_count() - self.data_blocks() - self.zero_blocks()
    }

    /// The hash of the DATA block at `offset`, if that block is DATA.
    pub fn hash_at(&self, offset: u64) -> Option<&Hash> {
        self.data
            .binary_search_by_key(&offset, |(o, _)| *o)
            .ok()
            .map(|i| &self.data[i].1)
    }

    /// Bytes of the disk that the block at `offset` covers: 4096, or less for the last
    /// block of a range that does not end on a block boundary.
    pub fn block_len(&self, offset: u64) -> usize {
        (self.range.end.saturating_sub(offset)).min(BLOCK_SIZE) as usize
    }

    /// Where the next block may start.
    fn next_offset(&self) -> u64 {
        let after_data = self.data.last().map_or(0, |(o, _)| o + BLOCK_SIZE);
        let after_zero = self.zeros.last().map_or(0, |r| r.end);
        self.range.start.max(after_data).max(after_zero)
    }

    fn check_block(&self, start: u64, end: u64) -> Result<(), ManifestError> {
        if !start.is_multiple_of(BLOCK_SIZE) {
            return Err(ManifestError::Unaligned { offset: start });
        }
        let next = self.next_offset();
        if start < next {
            return Err(ManifestError::OutOfOrder {
                offset: start,
                next,
            });
        }
        if start >= end || end > self.range.end {
            return Err(ManifestError::OutOfRange {
                start,
                end,
                range: self.range.clone(),
            });
        }
        Ok(())
    }

    /// Adds the DATA block at `offset` (after every block added so far).
    pub fn push_data(&mut self, offset: u64, hash: Hash) -> Result<(), ManifestError> {
        let end = offset.saturating_add(BLOCK_SIZE).min(self.range.end);
        self.check_block(offset, end)?;
        self.data.push((offset, hash));
        Ok(())
    }

    /// Adds ZERO blocks over `zeros` (after every block added so far). The start must be
    /// block aligned, the end too unless it is the end of the range.
    pub fn push_zeros(&mut self, zeros: Range<u64>) -> Result<(), ManifestError> {
        self.check_block(zeros.start, zeros.end)?;
        if !zeros.end.is_multiple_of(BLOCK_SIZE) && zeros.end != self.range.end {
            return Err(ManifestError::Unaligned { offset: zeros.end });
        }
        let last_data_end = self.data.last().map_or(0, |(o, _)| o + BLOCK_SIZE);
        match self.zeros.last_mut() {
            Some(last) if last.end == zeros.start && last.end > last_data_end => {
                last.end = zeros.end
            }
            _ => self.zeros.push(zeros),
        }
        Ok(())
    }

    /// Adds the block at `offset` from its content: ZERO if every byte is zero, else DATA
    /// with the hash of `block`. For the short last block of the range only its bytes
    /// within the range count, hashed zero-padded to 4 KiB.
    pub fn push_block(
        &mut self,
        offset: u64,
        block: &[u8],
        hasher: &ContentHasher,
    ) -> Result<(), ManifestError> {
        let len = self.block_len(offset);
        // Bytes past the end of the range (a padded last block) are not content.
        let block = &block[..block.len().min(len)];
        if is_zero(block) {
            return self.push_zeros(offset..offset.saturating_add(len as u64));
        }
        if block.len() == BLOCK_BYTES {
            self.push_data(offset, hasher.hash(block))
        } else {
            let mut padded = [0u8; BLOCK_BYTES];
            padded[..block.len()].copy_from_slice(block);
            self.push_data(offset, hasher.hash(&padded))
        }
    }

    /// Every block in order, as (offset, block), UNCHANGED ones included.
    pub fn blocks(&self) -> impl Iterator<Item = (u64, Block)> + '_ {
        let start = self.range.start;
        let mut data = self.data.iter().peekable();
        let mut zeros = self.zeros.iter().peekable();
        (0..self.block_count()).map(move |i| {
            let offset = start + i * BLOCK_SIZE;
            while zeros.peek().is_some_and(|z| z.end <= offset) {
                zeros.next();
            }
            if let Some((o, h)) = data.peek() {
                if *o == offset {
                    let h = *h;
                    data.next();
                    return (offset, Block::Data(h));
                }
            }
            match zeros.peek() {
                Some(z) if z.start <= offset => (offset, Block::Zero),
                _ => (offset, Block::Unchanged),
            }
        })
    }

    /// The canonical encoding (see the module doc).
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(16 + self.data.len() * (HASH_BYTES + 1));
        out.extend_from_slice(&MAGIC);
        out.push(VERSION);
        put_varint(&mut out, self.range.start / BLOCK_SIZE);
        put_varint(&mut out, self.range.end - self.range.start);

        let mut runs = Runs::default();
        // Walk DATA and ZERO in offset order; gaps are UNCHANGED.
        let (mut di, mut zi) = (0, 0);
        let mut at = self.range.start;
        loop {
            let next_data = self.data.get(di).map(|(o, _)| *o);
            let next_zero = self.zeros.get(zi).map(|r| r.start);
            let next = match (next_data, next_zero) {
                (None, None) => break,
                (Some(d), None) => d,
                (None, Some(z)) => z,
                (Some(d), Some(z)) => d.min(z),
            };
            if next > at {
                runs.push(&mut out, TAG_UNCHANGED, blocks_in(next - at), &[]);
            }
            if next_data == Some(next) {
                let mut n = 0;
                let first = di;
                while self
                    .data
                    .get(di)
                    .is_some_and(|(o, _)| *o == next + n * BLOCK_SIZE)
                {
                    n += 1;
                    di += 1;
                }
                runs.push(&mut out, TAG_DATA, n, &self.data[first..di]);
                at = next + n * BLOCK_SIZE;
            } else {
                let z = &self.zeros[zi];
                zi += 1;
                runs.push(&mut out, TAG_ZERO, blocks_in(z.end - z.start), &[]);
                at = z.end;
            }
        }
        let end = self.range.end;
        if end > at {
            runs.push(&mut out, TAG_UNCHANGED, blocks_in(end - at), &[]);
        }
        out
    }

    /// Parses an encoding; any malformed input is an error, never a panic, and memory use
    /// is bounded by the input's length.
    pub fn decode(bytes: &[u8]) -> Result<Self, DecodeManifestError> {
        let mut r = Reader { bytes, pos: 0 };
        if r.take(2)? != MAGIC {
            return Err(DecodeManifestError::Magic);
        }
        let version = r.take(1)?[0];
        if version != VERSION {
            return Err(DecodeManifestError::Version(version));
        }
        let start_block = r.varint()?;
        let len = r.varint()?;
        let blocks = blocks_in(len);
        // Offsets step a whole block at a time: the last block's end, even that of a
        // short last block, must fit in 64 bits too.
        let start = start_block
            .checked_mul(BLOCK_SIZE)
            .filter(|s| {
                blocks
                    .checked_mul(BLOCK_SIZE)
                    .and_then(|b| s.checked_add(b))
                    .is_some()
            })
            .ok_or(DecodeManifestError::RangeOverflow { start_block, len })?;
        let mut m = Manifest {
            range: start..start + len,
            data: Vec::new(),
            zeros: Vec::new(),
        };
        let mut covered = 0u64;
        let mut prev_tag = 0u8;
        while covered < blocks {
            let at = r.pos;
            let tag = r.take(1)?[0];
            let n = r.varint()?;
            if !(TAG_DATA..=TAG_UNCHANGED).contains(&tag) {
                return Err(DecodeManifestError::Tag { tag, at });
            }
            if n == 0 || tag == prev_tag {
                return Err(DecodeManifestError::NotCanonical { at });
            }
            if n > blocks - covered {
                return Err(DecodeManifestError::RunTooLong { at, n, blocks });
            }
            let run_start = start + covered * BLOCK_SIZE;
            match tag {
                TAG_DATA => {
                    // n <= blocks - covered, and the hashes must be in the input: bounds
                    // the allocation by the input length.
                    let need = usize::try_from(n)
                        .ok()
                        .and_then(|n| n.checked_mul(HASH_BYTES))
                        .filter(|need| *need <= r.remaining())
                        .ok_or(DecodeManifestError::Truncated { at: bytes.len() })?;
                    let hashes = r.take(need)?;
                    m.data.reserve(n as usize);
                    for (i, h) in hashes.chunks_exact(HASH_BYTES).enumerate() {
                        let mut hash = [0u8; HASH_BYTES];
                        hash.copy_from_slice(h);
                        m.data.push((run_start + i as u64 * BLOCK_SIZE, hash));
                    }
                }
                TAG_ZERO => {
                    let end = (run_start + n * BLOCK_SIZE).min(m.range.end);
                    m.zeros.push(run_start..end);
                }
                _ => {}
            }
            covered += n;
            prev_tag = tag;
        }
        if r.remaining() != 0 {
            return Err(DecodeManifestError::TrailingBytes(r.remaining()));
        }
        Ok(m)
    }
}

/// One block of a [`Manifest`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Block {
    Data(Hash),
    Zero,
    Unchanged,
}

/// True when every byte is zero (16 bytes at a time).
pub(crate) fn is_zero(block: &[u8]) -> bool {
    let words = block.chunks_exact(16);
    let rem = words.remainder();
    words
        .into_iter()
        .all(|w| u128::from_ne_bytes(w.try_into().expect("16 bytes")) == 0)
        && rem.iter().all(|b| *b == 0)
}

/// Blocks covering `len` bytes (the last one possibly short).
pub(crate) fn blocks_in(len: u64) -> u64 {
    len.div_ceil(BLOCK_SIZE)
}

/// Emits runs, checking the canonical-form invariant in debug builds.
#[derive(Default)]
struct Runs {
    prev: u8,
}

impl Runs {
    fn push(&mut self, out: &mut Vec<u8>, tag: u8, n: u64, data: &[(u64, Hash)]) {
        debug_assert!(n > 0 && tag != self.prev, "non-canonical run {tag} x{n}");
        out.push(tag);
        put_varint(out, n);
        for (_, h) in data {
            out.extend_from_slice(h);
        }
        self.prev = tag;
    }
}

pub(crate) fn put_varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

/// A cursor over untrusted bytes.
pub(crate) struct Reader<'a> {
    pub(crate) bytes: &'a [u8],
    pub(crate) pos: usize,
}

impl<'a> Reader<'a> {
    pub(crate) fn remaining(&self) -> usize {
        self.bytes.len() - self.pos
    }

    pub(crate) fn take(&mut self, n: usize) -> Result<&'a [u8], DecodeManifestError> {
        if n > self.remaining() {
            return Err(DecodeManifestError::Truncated {
                at: self.bytes.len(),
            });
        }
        let s = &self.bytes[self.pos..self.pos + n];
        self.pos += n;
        Ok(s)
    }

    /// A canonical LEB128 u64: at most 10 bytes, no bits past 64, no trailing zero byte.
    pub(crate) fn varint(&mut self) -> Result<u64, DecodeManifestError> {
        let at = self.pos;
        let mut v = 0u64;
        for i in 0..10 {
            let b = self.take(1)?[0];
            if i == 9 && b > 1 {
                return Err(DecodeManifestError::Varint { at });
            }
            v |= u64::from(b & 0x7f) << (7 * i);
            if b & 0x80 == 0 {
                if i > 0 && b == 0 {
                    return Err(DecodeManifestError::Varint { at });
                }
                return Ok(v);
            }
        }
        Err(DecodeManifestError::Varint { at })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn h(i: u8) -> Hash {
        [i; 16]
    }

    #[test]
    fn encoding_of_a_small_manifest_is_as_documented() {
        let mut m = Manifest::new(8192..8192 + 5 * 4096 + 100).unwrap();
        m.push_data(8192, h(1)).unwrap();
        m.push_data(12288, h(2)).unwrap();
        m.push_zeros(16384..24576).unwrap();
        // 24576..28672 unchanged, then a short last block of zeros.
        m.push_zeros(28672..28772).unwrap();
        let bytes = m.encode();
        let mut want = vec![b'T', b'M', 1, 2];
        put_varint(&mut want, 5 * 4096 + 100);
        want.extend_from_slice(&[TAG_DATA, 2]);
        want.extend_from_slice(&h(1));
        want.extend_from_slice(&h(2));
        want.extend_from_slice(&[TAG_ZERO, 2, TAG_UNCHANGED, 1, TAG_ZERO, 1]);
        assert_eq!(bytes, want);
        assert_eq!(Manifest::decode(&bytes).unwrap(), m);
        assert_eq!(
            (m.data_blocks(), m.zero_blocks(), m.unchanged_blocks()),
            (2, 3, 1)
        );
        assert_eq!(m.block_len(28672), 100);
        assert_eq!(m.hash_at(12288), Some(&h(2)));
        assert_eq!(m.hash_at(16384), None);
    }

    #[test]
    fn push_block_hashes_data_detects_zeros_and_pads_the_short_last_block() {
        let hasher = ContentHasher::new([1; 32]);
        let mut m = Manifest::new(0..2 * 4096 + 10).unwrap();
        m.push_block(0, &[0u8; BLOCK_BYTES], &hasher).unwrap();
        m.push_block(4096, &[7u8; BLOCK_BYTES], &hasher).unwrap();
        // The last block has 10 bytes of content; what lies past the end is ignored.
        let mut last = [9u8; BLOCK_BYTES];
        last[..10].copy_from_slice(&[5; 10]);
        m.push_block(8192, &last, &hasher).unwrap();
        let mut padded = [0u8; BLOCK_BYTES];
        padded[..10].copy_from_slice(&[5; 10]);
        assert_eq!(m.zeros().len(), 1);
        assert_eq!(m.zeros()[0], 0..4096);
        assert_eq!(
            m.data(),
            &[
                (4096, hasher.hash(&[7u8; BLOCK_BYTES])),
                (8192, hasher.hash(&padded))
            ]
        );
        assert!(m.push_block(12288, &[1u8; 4096], &hasher).is_err());
    }

    #[test]
    fn adjacent_zero_runs_merge_but_not_across_data() {
        let mut m = Manifest::new(0..10 * 4096).unwrap();
        m.push_zeros(0..4096).unwrap();
        m.push_zeros(4096..8192).unwrap();
        m.push_data(8192, h(1)).unwrap();
        m.push_zeros(12288..16384).unwrap();
        assert_eq!(m.zeros(), &[0..8192, 12288..16384]);
    }

    #[test]
    fn pushes_out_of_order_unaligned_or_out_of_range_are_refused() {
        let mut m = Manifest::new(0..8192).unwrap();
        m.push_data(4096, h(1)).unwrap();
        assert!(matches!(
            m.push_data(0, h(1)),
            Err(ManifestError::OutOfOrder { .. })
        ));
        assert!(matches!(
            m.push_data(4096, h(1)),
            Err(ManifestError::OutOfOrder { .. })
        ));
        assert!(matches!(
            m.push_data(8192, h(1)),
            Err(ManifestError::OutOfRange { .. })
        ));
        let mut m = Manifest::new(0..8192).unwrap();
        assert!(matches!(
            m.push_zeros(1..4096),
            Err(ManifestError::Unaligned { .. })
        ));
        assert!(matches!(
            m.push_zeros(0..100),
            Err(ManifestError::Unaligned { .. })
        ));
        assert!(Manifest::new(1..5).is_err());
        let (start, end) = (8192, 4096);
        assert!(Manifest::new(start..end).is_err());
    }

    #[test]
    fn hostile_inputs_are_rejected() {
        // A DATA run claiming 2^40 blocks with no hashes behind it.
        let mut b = vec![b'T', b'M', 1, 0];
        put_varint(&mut b, 1 << 52);
        b.push(TAG_DATA);
        put_varint(&mut b, 1 << 40);
        assert!(matches!(
            Manifest::decode(&b),
            Err(DecodeManifestError::Truncated { .. })
        ));
        // Range overflow.
        let mut b = vec![b'T', b'M', 1];
        put_varint(&mut b, u64::MAX / 4096);
        put_varint(&mut b, u64::MAX);
        assert!(matches!(
            Manifest::decode(&b),
            Err(DecodeManifestError::RangeOverflow { .. })
        ));
        // Overlong varint.
        assert!(matches!(
            Manifest::decode(&[b'T', b'M', 1, 0x80, 0x00]),
            Err(DecodeManifestError::Varint { .. })
        ));
        // Repeated tag.
        assert!(matches!(
            Manifest::decode(&[b'T', b'M', 1, 0, 0x80, 0x40, TAG_ZERO, 1, TAG_ZERO, 1]),
            Err(DecodeManifestError::NotCanonical { .. })
        ));
        // Zero-length run, tag 0, run too long, trailing bytes.
        assert!(Manifest::decode(&[b'T', b'M', 1, 0, 0x80, 0x40, TAG_ZERO, 0]).is_err());
        assert!(Manifest::decode(&[b'T', b'M', 1, 0, 0x80, 0x40, 0, 2]).is_err());
        assert!(Manifest::decode(&[b'T', b'M', 1, 0, 0x80, 0x40, TAG_ZERO, 3]).is_err());
        assert!(Manifest::decode(&[b'T', b'M', 1, 0, 0, 9]).is_err());
        assert!(Manifest::decode(&[b'T', b'M', 2]).is_err());
        assert!(Manifest::decode(&[]).is_err());
        // An empty range is valid.
        assert_eq!(
            Manifest::decode(&[b'T', b'M', 1, 3, 0]).unwrap(),
            Manifest::new(3 * 4096..3 * 4096).unwrap()
        );
    }

    #[test]
    fn a_range_whose_last_block_would_end_at_2_pow_64_is_refused() {
        // Found by the manifest_decode fuzz target: one short DATA block at 2^64 - 4096
        // decoded, and encoding it overflowed (a panic in debug builds).
        let mut b = vec![b'T', b'M', 1];
        put_varint(&mut b, u64::MAX / 4096);
        put_varint(&mut b, 1);
        b.extend_from_slice(&[TAG_DATA, 1]);
        b.extend_from_slice(&[7; 16]);
        assert!(matches!(
            Manifest::decode(&b),
            Err(DecodeManifestError::RangeOverflow { .. })
        ));
        // A zero run over a range of u64::MAX bytes: its end overflowed in decode.
        let mut b = vec![b'T', b'M', 1, 0];
        put_varint(&mut b, u64::MAX);
        b.push(TAG_ZERO);
        put_varint(&mut b, 1 << 52);
        assert!(matches!(
            Manifest::decode(&b),
            Err(DecodeManifestError::RangeOverflow { .. })
        ));
        // The highest range that still fits: its last block ends exactly at 2^64 - 4096.
        let mut b = vec![b'T', b'M', 1];
        put_varint(&mut b, u64::MAX / 4096 - 1);
        put_varint(&mut b, 4096);
        b.extend_from_slice(&[TAG_ZERO, 1]);
        let m = Manifest::decode(&b).unwrap();
        assert_eq!(m.encode(), b);
    }

    /// A manifest from a random block script: 0 = data, 1 = zero, 2 = unchanged.
    fn arb_manifest() -> impl Strategy<Value = Manifest> {
        (
            0u64..1000,
            proptest::collection::vec((0u8..3, any::<u8>()), 0..200),
            0u64..4096,
        )
            .prop_map(|(start_block, script, tail)| {
                let start = start_block * BLOCK_SIZE;
                let n = script.len() as u64;
                let end = if n == 0 {
                    start
                } else {
                    // A short last block when tail != 0.
                    start + (n - 1) * BLOCK_SIZE + if tail == 0 { BLOCK_SIZE } else { tail }
                };
                let mut m = Manifest::new(start..end).unwrap();
                for (i, (kind, byte)) in script.into_iter().enumerate() {
                    let off = start + i as u64 * BLOCK_SIZE;
                    match kind {
                        0 => m.push_data(off, [byte; 16]).unwrap(),
                        1 => m.push_zeros(off..(off + BLOCK_SIZE).min(end)).unwrap(),
                        _ => {}
                    }
                }
                m
            })
    }

    proptest! {
        #[test]
        fn manifest_round_trips(m in arb_manifest()) {
            let bytes = m.encode();
            let back = Manifest::decode(&bytes).unwrap();
            prop_assert_eq!(&back, &m);
            prop_assert_eq!(back.encode(), bytes);
            let counted = m.blocks().fold([0u64; 3], |mut c, (_, b)| {
                c[match b { Block::Data(_) => 0, Block::Zero => 1, Block::Unchanged => 2 }] += 1;
                c
            });
            prop_assert_eq!(counted, [m.data_blocks(), m.zero_blocks(), m.unchanged_blocks()]);
        }

        #[test]
        fn decode_never_panics_and_what_decodes_re_encodes_identically(
            bytes in proptest::collection::vec(any::<u8>(), 0..300)
        ) {
            if let Ok(m) = Manifest::decode(&bytes) {
                prop_assert_eq!(m.encode(), bytes);
            }
        }

        #[test]
        fn decode_of_garbage_after_a_valid_header_never_panics(
            tail in proptest::collection::vec(any::<u8>(), 0..300)
        ) {
            let mut bytes = vec![b'T', b'M', 1];
            bytes.extend_from_slice(&tail);
            if let Ok(m) = Manifest::decode(&bytes) {
                prop_assert_eq!(m.encode(), bytes);
            }
        }

        #[test]
        fn decode_of_mutated_valid_encodings_never_panics(
            m in arb_manifest(), flips in proptest::collection::vec((any::<usize>(), any::<u8>()), 1..4),
            cut in any::<usize>(),
        ) {
            let mut bytes = m.encode();
            for (i, x) in flips {
                let n = bytes.len();
                bytes[i % n] ^= x;
            }
            let cut = cut % (bytes.len() + 1);
            if let Ok(m) = Manifest::decode(&bytes[..cut]) {
                prop_assert_eq!(m.encode(), &bytes[..cut]);
            }
        }
    }
}

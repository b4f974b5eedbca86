//! [`Rebuild`]: fills a destination disk from a [`Plan`]: the blocks the local index
//! holds (read back and hash-checked), the wanted blocks as the source sends them (hash-
//! checked against the manifest), their duplicates, and optionally the zero runs.
//!
//! Owns the bookkeeping of what is still missing, and [`BlockTarget`], the writable side
//! (a raw file here; a qcow2 image through NBD later). Must not talk to the source: the
//! caller asks for [`Rebuild::pending`] blocks and hands them to [`Rebuild::receive`].

use std::collections::HashMap;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::Path;

use tern_store::{ContentHasher, Hash};

use crate::index::{ChunkIndex, ImageId, Location, ReadChunkError};
use crate::manifest::{Manifest, BLOCK_BYTES, BLOCK_SIZE};
use crate::plan::Plan;

/// Longest run of local blocks read (and written) in one request.
const MAX_RUN_BLOCKS: usize = 256;

/// Where a rebuilt disk is written. Writes are whole blocks at block offsets, except the
/// last block of a disk whose size is not a multiple of 4 KiB.
pub trait BlockTarget {
    fn write_at(&mut self, offset: u64, data: &[u8]) -> std::io::Result<()>;

    /// Makes `len` bytes at `offset` read as zero. The default writes zeroes.
    fn write_zeroes(&mut self, offset: u64, len: u64) -> std::io::Result<()> {
        let zeros = vec![0u8; (len.min(1 << 20)) as usize];
        let mut at = offset;
        while at < offset + len {
            let n = (offset + len - at).min(zeros.len() as u64) as usize;
            self.write_at(at, &zeros[..n])?;
            at += n as u64;
        }
        Ok(())
    }

    /// Makes the writes durable.
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl<T: BlockTarget + ?Sized> BlockTarget for &mut T {
    fn write_at(&mut self, offset: u64, data: &[u8]) -> std::io::Result<()> {
        (**self).write_at(offset, data)
    }
    fn write_zeroes(&mut self, offset: u64, len: u64) -> std::io::Result<()> {
        (**self).write_zeroes(offset, len)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        (**self).flush()
    }
}

/// A raw image file (e.g. made by `qemu-img create -f raw`), written in place.
#[derive(Debug)]
pub struct RawFileTarget {
    file: File,
}

impl RawFileTarget {
    /// Opens an existing file for writing (not truncated, not created).
    pub fn open(path: impl AsRef<Path>) -> std::io::Result<Self> {
        let file = std::fs::OpenOptions::new().write(true).open(path)?;
        Ok(Self { file })
    }

    pub fn new(file: File) -> Self {
        Self { file }
    }

    pub fn into_inner(self) -> File {
        self.file
    }
}

impl BlockTarget for RawFileTarget {
    fn write_at(&mut self, offset: u64, data: &[u8]) -> std::io::Result<()> {
        self.file.write_all_at(data, offset)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.file.sync_data()
    }
}

/// Counters of a rebuild, in blocks (4 KiB, the last one possibly short).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RebuildProgress {
    /// DATA blocks of the manifest.
    pub data_blocks: u64,
    /// Written from the local index.
    pub local_blocks: u64,
    /// Received from the source and written.
    pub received_blocks: u64,
    /// Written as copies of a received block.
    pub dup_blocks: u64,
    /// ZERO blocks written (0 unless [`Rebuild::write_zeroes`] was called).
    pub zero_blocks: u64,
    /// Local blocks that failed their hash check or could not be read, now wanted.
    pub refetch_blocks: u64,
    /// Wanted blocks not received yet (their duplicates not counted).
    pub pending_blocks: u64,
    /// Bytes written to the target.
    pub bytes_written: u64,
}

/// What [`Rebuild::apply_local`] did.
#[derive(Debug, Default)]
pub struct LocalApply {
    pub blocks_written: u64,
    /// Offsets that must now be requested from the source as well (stale or unreadable
    /// local copies); they are in [`Rebuild::pending`].
    pub refetch: Vec<u64>,
    /// Reads that failed, per image (its blocks are in `refetch`).
    pub read_errors: Vec<(ImageId, ReadChunkError)>,
}

/// Why local blocks could not be applied.
#[derive(Debug, thiserror::Error)]
pub enum ApplyLocalError {
    #[error("writing {len} bytes at {offset} of the target")]
    Target {
        offset: u64,
        len: usize,
        #[source]
        source: std::io::Error,
    },
}

/// Why zero runs could not be written.
#[derive(Debug, thiserror::Error)]
pub enum WriteZeroesError {
    #[error("zeroing {len} bytes at {offset} of the target")]
    Target {
        offset: u64,
        len: u64,
        #[source]
        source: std::io::Error,
    },
}

/// Why a block from the source was refused or not written.
#[derive(Debug, thiserror::Error)]
pub enum ReceiveChunkError {
    #[error("block at {offset} was not asked for (or was received already)")]
    NotWanted { offset: u64 },
    #[error("block at {offset} is {len} bytes, expected {expected}")]
    Length {
        offset: u64,
        len: usize,
        expected: usize,
    },
    #[error("block at {offset} does not match its hash in the manifest; it is still pending")]
    Mismatch { offset: u64 },
    #[error("writing {len} bytes at {offset} of the target")]
    Target {
        offset: u64,
        len: usize,
        #[source]
        source: std::io::Error,
    },
}

/// Why a rebuild could not be completed.
#[derive(Debug, thiserror::Error)]
pub enum FinishRebuildError {
    #[error("{blocks} blocks of the local index were never applied (call apply_local)")]
    LocalNotApplied { blocks: u64 },
    #[error("{pending} wanted blocks never arrived (first at offset {first})")]
    Incomplete { pending: u64, first: u64 },
    #[error("flushing the target")]
    Flush(#[source] std::io::Error),
}

#[derive(Debug)]
struct Pending {
    hash: Hash,
    dups: Vec<u64>,
}

/// Rebuilds a disk (or a range of it) into a [`BlockTarget`]. See the module doc.
#[derive(Debug)]
pub struct Rebuild<T> {
    target: T,
    hasher: ContentHasher,
    range_end: u64,
    have: Vec<(u64, Location)>,
    zeros: Vec<std::ops::Range<u64>>,
    pending: HashMap<u64, Pending>,
    progress: RebuildProgress,
}

impl<T: BlockTarget> Rebuild<T> {
    /// Starts a rebuild of `manifest`'s range following `plan` (made from this manifest
    /// by [`crate::plan`]). `hasher` is the cluster's, to check what arrives.
    pub fn new(manifest: &Manifest, plan: Plan, hasher: ContentHasher, target: T) -> Self {
        let mut pending: HashMap<u64, Pending> = plan
            .want
            .iter()
            .filter_map(|o| {
                manifest.hash_at(*o).map(|h| {
                    (
                        *o,
                        Pending {
                            hash: *h,
                            dups: Vec::new(),
                        },
                    )
                })
            })
            .collect();
        let mut dup_count = 0;
        for (offset, first) in plan.dups {
            if let Some(p) = pending.get_mut(&first) {
                p.dups.push(offset);
                dup_count += 1;
            }
        }
        let progress = RebuildProgress {
            data_blocks: plan.have.len() as u64 + pending.len() as u64 + dup_count,
            pending_blocks: pending.len() as u64,
            ..RebuildProgress::default()
        };
        Rebuild {
            target,
            hasher,
            range_end: manifest.range().end,
            have: plan.have,
            zeros: plan.zeros,
            pending,
            progress,
        }
    }

    fn block_len(&self, offset: u64) -> usize {
        self.range_end.saturating_sub(offset).min(BLOCK_SIZE) as usize
    }

    /// Writes every `have` block from the local index, reading runs of adjacent blocks
    /// at once and checking each block's hash. Blocks that fail (stale or unreadable)
    /// become pending, to be requested from the source.
    pub fn apply_local(&mut self, index: &ChunkIndex) -> Result<LocalApply, ApplyLocalError> {
        let mut have = std::mem::take(&mut self.have);
        have.sort_by_key(|(dst, loc)| (loc.image, loc.offset, *dst));
        let mut out = LocalApply::default();
        let mut buf = vec![0u8; MAX_RUN_BLOCKS * BLOCK_BYTES];
        // Stale hashes already re-requested: later blocks with the same hash are dups.
        let mut refetched: HashMap<Hash, u64> = HashMap::new();
        let mut i = 0;
        while i < have.len() {
            // A run: consecutive source blocks of one image.
            let (_, first) = have[i];
            let mut n = 1;
            while i + n < have.len()
                && n < MAX_RUN_BLOCKS
                && have[i + n].1.image == first.image
                && have[i + n].1.offset == first.offset + n as u64 * BLOCK_SIZE
            {
                n += 1;
            }
            let run = &have[i..i + n];
            i += n;
            let bytes = &mut buf[..n * BLOCK_BYTES];
            if let Err(e) = index.read_blocks(first.image, first.offset, bytes) {
                out.read_errors.push((first.image, e));
                for (dst, loc) in run {
                    self.refetch(*dst, loc.hash, &mut refetched, &mut out.refetch);
                }
                continue;
            }
            // Write maximal stretches of good blocks that are adjacent on the target too.
            let good: Vec<bool> = run
                .iter()
                .zip(bytes.chunks_exact(BLOCK_BYTES))
                .map(|((_, loc), b)| self.hasher.hash(b) == loc.hash)
                .collect();
            let mut j = 0;
            while j < n {
                let (dst, loc) = run[j];
                if !good[j] {
                    let _ = index.stale(&loc);
                    self.refetch(dst, loc.hash, &mut refetched, &mut out.refetch);
                    j += 1;
                    continue;
                }
                let mut k = j + 1;
                while k < n && good[k] && run[k].0 == dst + (k - j) as u64 * BLOCK_SIZE {
                    k += 1;
                }
                let last = run[k - 1].0;
                let len = (last - dst) as usize + self.block_len(last);
                self.target
                    .write_at(dst, &bytes[j * BLOCK_BYTES..j * BLOCK_BYTES + len])
                    .map_err(|source| ApplyLocalError::Target {
                        offset: dst,
                        len,
                        source,
                    })?;
                self.progress.local_blocks += (k - j) as u64;
                self.progress.bytes_written += len as u64;
                out.blocks_written += (k - j) as u64;
                j = k;
            }
        }
        out.refetch.sort_unstable();
        Ok(out)
    }

    fn refetch(
        &mut self,
        dst: u64,
        hash: Hash,
        refetched: &mut HashMap<Hash, u64>,
        list: &mut Vec<u64>,
    ) {
        self.progress.refetch_blocks += 1;
        match refetched.get(&hash) {
            Some(first) => {
                if let Some(p) = self.pending.get_mut(first) {
                    p.dups.push(dst);
                }
            }
            None => {
                refetched.insert(hash, dst);
                self.pending.insert(
                    dst,
                    Pending {
                        hash,
                        dups: Vec::new(),
                    },
                );
                self.progress.pending_blocks += 1;
                list.push(dst);
            }
        }
    }

    /// Writes the manifest's ZERO runs; only needed when the target may hold old data
    /// (a freshly created image reads as zero already). Returns the bytes zeroed.
    pub fn write_zeroes(&mut self) -> Result<u64, WriteZeroesError> {
        let mut total = 0;
        for z in std::mem::take(&mut self.zeros) {
            let len = z.end - z.start;
            self.target
                .write_zeroes(z.start, len)
                .map_err(|source| WriteZeroesError::Target {
                    offset: z.start,
                    len,
                    source,
                })?;
            self.progress.zero_blocks += len.div_ceil(BLOCK_SIZE);
            self.progress.bytes_written += len;
            total += len;
        }
        Ok(total)
    }

    /// Block offsets still to be received from the source, in order.
    pub fn pending(&self) -> Vec<u64> {
        let mut v: Vec<u64> = self.pending.keys().copied().collect();
        v.sort_unstable();
        v
    }

    /// Takes a wanted block from the source: checks it against the manifest's hash and
    /// writes it (and its duplicates). `data` is the block's bytes (4096, or the short
    /// length of the disk's last block, or that block zero-padded to 4096).
    pub fn receive(&mut self, offset: u64, data: &[u8]) -> Result<(), ReceiveChunkError> {
        let expected = self.block_len(offset);
        let Some(p) = self.pending.remove(&offset) else {
            return Err(ReceiveChunkError::NotWanted { offset });
        };
        if data.len() != expected && data.len() != BLOCK_BYTES {
            self.pending.insert(offset, p);
            return Err(ReceiveChunkError::Length {
                offset,
                len: data.len(),
                expected,
            });
        }
        let mut block = [0u8; BLOCK_BYTES];
        block[..data.len()].copy_from_slice(data);
        if self.hasher.hash(&block) != p.hash {
            self.pending.insert(offset, p);
            return Err(ReceiveChunkError::Mismatch { offset });
        }
        for dst in std::iter::once(offset).chain(p.dups.iter().copied()) {
            let len = self.block_len(dst);
            self.target.write_at(dst, &block[..len]).map_err(|source| {
                ReceiveChunkError::Target {
                    offset: dst,
                    len,
                    source,
                }
            })?;
            self.progress.bytes_written += len as u64;
        }
        self.progress.received_blocks += 1;
        self.progress.dup_blocks += p.dups.len() as u64;
        self.progress.pending_blocks -= 1;
        Ok(())
    }

    /// Takes a run of adjacent wanted blocks starting at `offset` (each 4096 bytes, the
    /// disk's last one possibly short): checks every block like [`Rebuild::receive`],
    /// then writes the run with one write (duplicates one by one). Nothing is written
    /// unless every block of the run checks.
    pub fn receive_run(&mut self, offset: u64, data: &[u8]) -> Result<(), ReceiveChunkError> {
        let mut at = offset;
        let mut rest = data;
        let mut taken: Vec<(u64, Pending)> = Vec::new();
        let mut fail = None;
        while !rest.is_empty() {
            let n = rest.len().min(BLOCK_BYTES);
            let (block, tail) = rest.split_at(n);
            let expected = self.block_len(at);
            let Some(p) = self.pending.remove(&at) else {
                fail = Some(ReceiveChunkError::NotWanted { offset: at });
                break;
            };
            let mut padded = [0u8; BLOCK_BYTES];
            if block.len() != expected && block.len() != BLOCK_BYTES {
                fail = Some(ReceiveChunkError::Length {
                    offset: at,
                    len: block.len(),
                    expected,
                });
                taken.push((at, p));
                break;
            }
            padded[..block.len()].copy_from_slice(block);
            if self.hasher.hash(&padded) != p.hash {
                fail = Some(ReceiveChunkError::Mismatch { offset: at });
                taken.push((at, p));
                break;
            }
            taken.push((at, p));
            at += BLOCK_SIZE;
            rest = tail;
        }
        if let Some(e) = fail {
            for (o, p) in taken {
                self.pending.insert(o, p);
            }
            return Err(e);
        }
        let len = (at - offset).min(self.range_end.saturating_sub(offset)) as usize;
        self.target
            .write_at(offset, &data[..len.min(data.len())])
            .map_err(|source| ReceiveChunkError::Target {
                offset,
                len,
                source,
            })?;
        self.progress.bytes_written += len as u64;
        for (o, p) in taken {
            if !p.dups.is_empty() {
                let i = (o - offset) as usize;
                let mut block = [0u8; BLOCK_BYTES];
                let end = (i + BLOCK_BYTES).min(data.len());
                block[..end - i].copy_from_slice(&data[i..end]);
                for dst in &p.dups {
                    let l = self.block_len(*dst);
                    self.target.write_at(*dst, &block[..l]).map_err(|source| {
                        ReceiveChunkError::Target {
                            offset: *dst,
                            len: l,
                            source,
                        }
                    })?;
                    self.progress.bytes_written += l as u64;
                }
            }
            self.progress.received_blocks += 1;
            self.progress.dup_blocks += p.dups.len() as u64;
            self.progress.pending_blocks -= 1;
        }
        Ok(())
    }

    /// True when every wanted block arrived (local blocks applied or not).
    pub fn is_complete(&self) -> bool {
        self.pending.is_empty()
    }

    pub fn progress(&self) -> RebuildProgress {
        self.progress
    }

    /// Checks nothing is missing, flushes the target and hands it back.
    pub fn finish(mut self) -> Result<(T, RebuildProgress), FinishRebuildError> {
        if !self.have.is_empty() {
            return Err(FinishRebuildError::LocalNotApplied {
                blocks: self.have.len() as u64,
            });
        }
        if let Some(first) = self.pending.keys().min() {
            return Err(FinishRebuildError::Incomplete {
                pending: self.pending.len() as u64,
                first: *first,
            });
        }
        self.target.flush().map_err(FinishRebuildError::Flush)?;
        Ok((self.target, self.progress))
    }
}

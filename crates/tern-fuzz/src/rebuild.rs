//! Target `chunks_rebuild`: `tern_chunks::Rebuild` into an in-memory disk, the way the
//! destination's disk worker (`tern_engine::disk`) drives it.
//!
//! Input: a mode byte. Even: a source disk of up to 16 blocks is made from the input (the
//! last one possibly short, contents from a small palette so duplicates occur, some blocks
//! UNCHANGED), its manifest built with `push_block`, and the rest of the input is a list of
//! runs sent, true or corrupted (see [`built`]). Odd: the rest is tern frames
//! (`DiskManifest`, `DiskData`, `DiskRoundEnd`) for one disk of [`worker_disk_size`], taken
//! as the worker takes them.
//!
//! The plan is made as `tern_chunks::plan` makes it against an empty index (every distinct
//! hash wanted once, repeats as duplicates): the index is files on disk, outside this
//! target.

use std::cell::RefCell;
use std::collections::{BTreeSet, HashMap};
use std::ops::Range;
use std::rc::Rc;

use bytes::BytesMut;
use tern_chunks::{
    BlockTarget, ContentHasher, Hash, Manifest, Plan, Rebuild, ReceiveChunkError, BLOCK_BYTES,
    BLOCK_SIZE,
};
use tern_proto::{decode, Message, DISK_DIRECT};

use crate::input::Input;

/// The cluster key of the fuzzed destination.
pub(crate) const KEY: [u8; 32] = [3; 32];
/// What a disk holds before anything is written to it, to tell written bytes apart.
const FRESH: u8 = 0xee;
/// Blocks of the disk in frame mode.
const WORKER_DISK_BLOCKS: u64 = 64;

pub(crate) fn hasher() -> ContentHasher {
    ContentHasher::new(KEY)
}

/// Content `k` of the palette, by `k % 6`: 0 zeroes, 1 to 4 shared, 5 unique to block `i`.
pub(crate) fn palette(k: u8, i: usize) -> [u8; BLOCK_BYTES] {
    let mut b = [0u8; BLOCK_BYTES];
    if !k.is_multiple_of(6) {
        let seed = if k % 6 == 5 {
            5 + i as u32
        } else {
            u32::from(k % 6)
        };
        for (j, x) in b.iter_mut().enumerate() {
            *x = ((j as u32)
                .wrapping_mul(2_654_435_761)
                .wrapping_add(seed * 977)
                >> 11) as u8;
        }
    }
    b
}

/// The disk size of frame mode: 64 blocks less `short` bytes (`short` < 4096).
pub(crate) fn worker_disk_size(short: u16) -> u64 {
    WORKER_DISK_BLOCKS * BLOCK_SIZE - u64::from(short % 4096)
}

/// An in-memory disk; counts writes.
struct Disk {
    bytes: Vec<u8>,
    writes: u64,
}

/// One rebuild's view of the disk: checks it writes within its manifest's range.
struct Target {
    disk: Rc<RefCell<Disk>>,
    range: Range<u64>,
}

impl BlockTarget for Target {
    fn write_at(&mut self, offset: u64, data: &[u8]) -> std::io::Result<()> {
        let mut d = self.disk.borrow_mut();
        d.writes += 1;
        if data.is_empty() {
            return Ok(());
        }
        let end = offset.checked_add(data.len() as u64);
        assert!(
            offset >= self.range.start && end.is_some_and(|e| e <= self.range.end),
            "write of {} bytes at {offset} outside the manifest's range {:?}",
            data.len(),
            self.range
        );
        let end = end.expect("checked") as usize;
        assert!(end <= d.bytes.len(), "write past the disk");
        d.bytes[offset as usize..end].copy_from_slice(data);
        Ok(())
    }
}

/// The plan against an empty index, as `tern_chunks::plan` makes it.
fn plan_without_index(m: &Manifest) -> Plan {
    let mut p = Plan {
        zeros: m.zeros().to_vec(),
        ..Plan::default()
    };
    let mut wanted: HashMap<Hash, u64> = HashMap::new();
    for (offset, hash) in m.data() {
        match wanted.get(hash) {
            Some(first) => p.dups.push((*offset, *first)),
            None => {
                wanted.insert(*hash, *offset);
                p.want.push(*offset);
            }
        }
    }
    p
}

/// What must hold around one `receive_run` (or `receive`) call.
fn receive_checked(
    rb: &mut Rebuild<Target>,
    m: &Manifest,
    disk: &Rc<RefCell<Disk>>,
    offset: u64,
    data: &[u8],
    single: bool,
) -> Result<(), ReceiveChunkError> {
    let hasher = hasher();
    let pending: BTreeSet<u64> = rb.pending().into_iter().collect();
    let progress = rb.progress();
    let writes = disk.borrow().writes;

    // the documented rule: every 4 KiB piece is a wanted block, of its length (or padded
    // to 4096), matching its hash
    let range_end = m.range().end;
    let mut at = Some(offset);
    let mut ok = true;
    let mut blocks = Vec::new();
    for piece in data.chunks(BLOCK_BYTES) {
        let Some(o) = at.filter(|o| pending.contains(o)) else {
            ok = false;
            break;
        };
        let short = range_end.saturating_sub(o).min(BLOCK_SIZE) as usize;
        let mut padded = [0u8; BLOCK_BYTES];
        padded[..piece.len()].copy_from_slice(piece);
        if (piece.len() != short && piece.len() != BLOCK_BYTES)
            || Some(&hasher.hash(&padded)) != m.hash_at(o)
        {
            ok = false;
            break;
        }
        blocks.push((o, padded, short));
        at = o.checked_add(BLOCK_SIZE);
    }
    if single {
        ok &= blocks.len() == 1 && data.len() <= BLOCK_BYTES;
    }

    let r = if single {
        rb.receive(offset, data)
    } else {
        rb.receive_run(offset, data)
    };
    assert_eq!(
        r.is_ok(),
        ok,
        "{} at {offset} of {} bytes: {r:?}",
        if single { "receive" } else { "receive_run" },
        data.len()
    );
    if let Err(e) = &r {
        assert!(!matches!(e, ReceiveChunkError::Target { .. }));
        assert_eq!(rb.pending(), pending.into_iter().collect::<Vec<_>>());
        assert_eq!(
            rb.progress(),
            progress,
            "a refused run changed the progress"
        );
        assert_eq!(disk.borrow().writes, writes, "a refused run was written");
        return r;
    }
    let now: BTreeSet<u64> = rb.pending().into_iter().collect();
    let d = disk.borrow();
    for (o, padded, short) in &blocks {
        assert!(
            pending.contains(o) && !now.contains(o),
            "block {o} still pending"
        );
        let at = *o as usize;
        assert_eq!(
            &d.bytes[at..at + short],
            &padded[..*short],
            "block {o} written wrong"
        );
    }
    assert_eq!(now.len() + blocks.len(), pending.len());
    assert_eq!(rb.progress().pending_blocks, now.len() as u64);
    Ok(())
}

/// What one input did (for the seed corpus's own tests).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct Outcome {
    /// Runs `Rebuild` took.
    pub taken: usize,
    /// Runs it refused.
    pub refused: usize,
    /// Rebuilds that finished complete.
    pub completed: usize,
}

pub(crate) fn run(data: &[u8]) -> Outcome {
    let mut input = Input::new(data);
    let mode = input.u8();
    if mode & 1 == 0 {
        built(mode, input)
    } else {
        worker(input)
    }
}

fn tally(out: &mut Outcome, r: &Result<(), ReceiveChunkError>) {
    match r {
        Ok(()) => out.taken += 1,
        Err(_) => out.refused += 1,
    }
}

/// Input after the mode byte (bit 1: write the zero runs first): `be16 start block`
/// (modulo 16), `u8 blocks - 1` (modulo 16), `be16 last block length` (0 or >= 4096:
/// whole), a palette byte per block (bit 7: UNCHANGED), then runs: `u8 op` (low 4 bits:
/// first block, bit 4: `receive` instead of `receive_run`, bit 5: pad a short last block,
/// bit 6: corrupt a byte, bit 7: an unaligned offset), `u8 blocks - 1` (modulo 4), and a
/// `be16` for bit 6 (where to corrupt) and for bit 7 (how far off).
fn built(mode: u8, mut input: Input) -> Outcome {
    let mut out = Outcome::default();
    let start = u64::from(input.u16() % 16) * BLOCK_SIZE;
    let n = usize::from(input.u8() % 16) + 1;
    let last = match input.u16() {
        0 => BLOCK_BYTES,
        l => usize::from(l).min(BLOCK_BYTES),
    };
    let len = (n as u64 - 1) * BLOCK_SIZE + last as u64;
    let hasher = hasher();
    let mut truth = Vec::with_capacity(n * BLOCK_BYTES);
    let mut m = Manifest::new(start..start + len).expect("aligned range");
    for i in 0..n {
        let k = input.u8();
        let mut block = palette(k, i);
        let offset = start + i as u64 * BLOCK_SIZE;
        if k & 0x80 == 0 {
            // bytes past the end of the disk are not content: push them anyway
            m.push_block(offset, &block, &hasher)
                .expect("blocks in order");
        }
        if i == n - 1 {
            block[last..].fill(0);
        }
        truth.extend_from_slice(&block);
    }
    let disk = Rc::new(RefCell::new(Disk {
        bytes: vec![FRESH; (start + n as u64 * BLOCK_SIZE) as usize],
        writes: 0,
    }));
    let target = Target {
        disk: disk.clone(),
        range: m.range(),
    };
    let mut rb = Rebuild::new(&m, plan_without_index(&m), hasher, target);
    if mode & 2 != 0 {
        rb.write_zeroes().expect("memory target");
    }
    while !input.is_empty() {
        let op = input.u8();
        let first = usize::from(op & 0x0f) % n;
        let count = usize::from(input.u8() % 4) + 1;
        let upto = (first + count).min(n);
        let mut data = truth[first * BLOCK_BYTES..upto * BLOCK_BYTES].to_vec();
        if upto == n && op & 0x20 == 0 {
            data.truncate(data.len() - (BLOCK_BYTES - last));
        }
        let mut offset = start + (first * BLOCK_BYTES) as u64;
        if op & 0x40 != 0 && !data.is_empty() {
            let at = usize::from(input.u16()) % data.len();
            data[at] ^= 0x5a;
        }
        if op & 0x80 != 0 {
            offset = offset.wrapping_add(u64::from(input.u16() % 4096));
        }
        let single = op & 0x10 != 0;
        if single {
            data.truncate(BLOCK_BYTES);
        }
        let r = receive_checked(&mut rb, &m, &disk, offset, &data, single);
        tally(&mut out, &r);
    }

    let complete = rb.is_complete();
    let zeroed = mode & 2 != 0;
    match rb.finish() {
        Ok((_, progress)) => {
            assert!(complete);
            out.completed += 1;
            assert_eq!(
                progress.received_blocks + progress.dup_blocks,
                m.data_blocks()
            );
            let d = disk.borrow();
            for (o, b) in m.blocks() {
                let i = ((o - start) / BLOCK_SIZE) as usize;
                let at = o as usize;
                let l = m.block_len(o);
                let want = &truth[i * BLOCK_BYTES..i * BLOCK_BYTES + l];
                let got = &d.bytes[at..at + l];
                match b {
                    tern_chunks::Block::Data(_) => assert_eq!(got, want, "block {o} differs"),
                    tern_chunks::Block::Zero if zeroed => {
                        assert!(got.iter().all(|x| *x == 0), "zero block {o} not zeroed")
                    }
                    _ => assert!(got.iter().all(|x| *x == FRESH), "block {o} written"),
                }
            }
        }
        Err(e) => assert!(!complete, "complete, yet: {e}"),
    }
    out
}

/// The worker's handling of one disk's frames (`DestDisks`, `migrate/disk.rs`).
fn worker(mut input: Input) -> Outcome {
    let mut out = Outcome::default();
    let size = worker_disk_size(input.u16());
    let disk = Rc::new(RefCell::new(Disk {
        bytes: vec![FRESH; (WORKER_DISK_BLOCKS * BLOCK_SIZE) as usize],
        writes: 0,
    }));
    let mut pieces: HashMap<u32, (Manifest, Rebuild<Target>)> = HashMap::new();
    let mut buf = BytesMut::from(input.rest());
    while let Ok(Some(msg)) = decode(&mut buf) {
        match msg {
            Message::DiskManifest {
                piece, manifest, ..
            } => {
                let Ok(m) = Manifest::decode(&manifest) else {
                    return out;
                };
                if m.range().end > size || pieces.contains_key(&piece) {
                    return out;
                }
                let target = Target {
                    disk: disk.clone(),
                    range: m.range(),
                };
                let rb = Rebuild::new(&m, plan_without_index(&m), hasher(), target);
                let want = rb.pending();
                assert_eq!(want.len() as u64, rb.progress().pending_blocks);
                for o in &want {
                    assert!(m.hash_at(*o).is_some(), "wanted block {o} is not DATA");
                }
                if rb.is_complete() {
                    assert!(rb.finish().is_ok());
                    out.completed += 1;
                } else {
                    pieces.insert(piece, (m, rb));
                }
            }
            Message::DiskData {
                piece,
                offset,
                data,
                ..
            } => {
                let end = offset.saturating_add(data.len() as u64);
                if end > size {
                    return out;
                }
                if piece == DISK_DIRECT {
                    let mut d = disk.borrow_mut();
                    d.bytes[offset as usize..end as usize].copy_from_slice(&data);
                    continue;
                }
                let Some((m, rb)) = pieces.get_mut(&piece) else {
                    return out;
                };
                let r = receive_checked(rb, m, &disk, offset, &data, false);
                tally(&mut out, &r);
                if r.is_err() {
                    return out;
                }
                if rb.is_complete() {
                    let (_, rb) = pieces.remove(&piece).expect("present");
                    assert!(rb.finish().is_ok(), "complete, yet finish failed");
                    out.completed += 1;
                }
            }
            Message::DiskRoundEnd { .. } if !pieces.is_empty() => return out,
            _ => {}
        }
    }
    out
}

//! Target `page_decode`: what the destination agent does with `Pages` and `Content`
//! frames (`tern_engine::dest`): each page record through `PageDecoder::resolve`, records in
//! order (a record whose content is missing holds back those after it until `Content`
//! brings it), and each record that reaches QEMU into the `MemoryDigest`.
//!
//! Input: tern frames. A first `RamBlocks` frame sets the RAM layout if it is small (at
//! most [`MAX_PAGES`] pages of at most 64 KiB); else the layout is [`DEFAULT_BLOCKS`] of
//! [`DEFAULT_PAGE`]-byte pages. (The agent takes a layout of any size: its page map and
//! digest are allocated for whatever the frame claims, an open finding in
//! docs/testing.md, which this target does not reproduce.) The page store holds
//! [`held_page`] 0..[`HELD`] before the first frame, so references to them resolve.

use std::collections::{BTreeMap, VecDeque};
use std::sync::Arc;

use bytes::{Bytes, BytesMut};
use tern_engine::digest::MemoryDigest;
use tern_engine::pages::{DecodeError, PageDecoder, Resolved, SharedStore};
use tern_proto::{decode, Message, Page, PageBody};
use tern_store::{ContentHasher, Hash, PageStore, TieredStore};

/// The cluster key of the fuzzed destination.
pub(crate) const KEY: [u8; 32] = [7; 32];
pub(crate) const DEFAULT_PAGE: u64 = 512;
pub(crate) const DEFAULT_BLOCKS: &[(&str, u64)] = &[("pc.ram", 16 * 512), ("vga", 4 * 512)];
/// Largest layout taken from a `RamBlocks` frame, in pages.
pub(crate) const MAX_PAGES: u64 = 1 << 12;
const MAX_PAGE_SIZE: u32 = 64 << 10;
/// Pages the store holds (memory only): small, so that eviction and pinning matter.
const STORE_PAGES: usize = 32;
/// How many [`held_page`]s the store holds before the migration.
pub(crate) const HELD: u8 = 4;

pub(crate) fn hasher() -> ContentHasher {
    ContentHasher::new(KEY)
}

/// Content the destination holds before the migration (non-zero, distinct per `k`).
pub(crate) fn held_page(k: u8, page_size: usize) -> Vec<u8> {
    (0..page_size)
        .map(|i| (i as u8).wrapping_mul(k | 1) ^ k.wrapping_add(1))
        .collect()
}

/// One record on its way to QEMU.
enum Rec {
    Zero {
        block: u16,
        offset: u64,
        fill: u8,
    },
    Page {
        block: u16,
        offset: u64,
        data: Option<Bytes>,
        hash: Hash,
    },
}

/// Why the destination would abort here (the target then stops feeding).
struct Refused;

/// What one input did (for the seed corpus's own tests).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Outcome {
    /// Records that reached QEMU (and the digest).
    pub written: usize,
    /// Records still waiting for content at the end.
    pub waiting: usize,
    /// The destination would have aborted the migration.
    pub refused: bool,
}

struct Dest {
    hasher: ContentHasher,
    page_size: u64,
    blocks: usize,
    dec: PageDecoder,
    digest: MemoryDigest,
    /// For range checks only: what the digest accepts.
    probe: MemoryDigest,
    queue: VecDeque<Rec>,
    /// The memory image the records written so far describe.
    image: BTreeMap<(usize, u64), Vec<u8>>,
    written: usize,
}

impl Dest {
    fn page(&mut self, block: u16, p: Page) -> Result<(), Refused> {
        let body = p.body.clone();
        let offset = p.offset;
        let r = match self.dec.resolve(block, offset, p.body) {
            Ok(r) => r,
            Err(DecodeError::OutOfRange { .. }) => {
                // the record's last page (a run's, if it has one) is what lies outside
                let last = match &body {
                    PageBody::ZeroRun { pages, .. } => u64::from(*pages)
                        .checked_sub(1)
                        .and_then(|n| n.checked_mul(self.page_size))
                        .and_then(|n| n.checked_add(offset)),
                    _ => Some(offset),
                };
                if let Some(at) = last {
                    assert!(
                        self.probe.fill(block.into(), offset, 0).is_err()
                            || self.probe.fill(block.into(), at, 0).is_err(),
                        "the decoder refused block #{block} offset {offset:#x}, the digest takes it"
                    );
                }
                return Err(Refused);
            }
            Err(_) => return Err(Refused),
        };
        let rec = match (r, body) {
            (Resolved::Zero { fill, pages }, PageBody::Zero { fill: f }) => {
                assert_eq!((fill, pages), (f, 1));
                Rec::Zero {
                    block,
                    offset,
                    fill,
                }
            }
            (Resolved::Zero { fill, pages }, PageBody::ZeroRun { fill: f, pages: n }) => {
                assert_eq!((fill, pages), (f, n));
                // the decoder checked the run fits the block (a small layout): every page
                // of it goes to QEMU, the last as this record
                for i in 0..u64::from(pages) - 1 {
                    let r = Rec::Zero {
                        block,
                        offset: offset + i * self.page_size,
                        fill,
                    };
                    self.queue_or_write(r)?;
                }
                Rec::Zero {
                    block,
                    offset: offset + (u64::from(pages) - 1) * self.page_size,
                    fill,
                }
            }
            (Resolved::Page(d), body) => {
                let hash = self.hasher.hash(&d);
                match body {
                    PageBody::Raw(x) | PageBody::Plain(x) => assert_eq!(d, x, "raw page changed"),
                    PageBody::Ref(h) => {
                        assert_eq!(hash, h, "a reference resolved to other content")
                    }
                    PageBody::Delta { result, .. } => {
                        assert_eq!(hash, result, "a delta gave other content than it names")
                    }
                    PageBody::Zero { .. } | PageBody::ZeroRun { .. } => {
                        panic!("a zero record resolved to a page")
                    }
                }
                Rec::Page {
                    block,
                    offset,
                    data: Some(d),
                    hash,
                }
            }
            (Resolved::Missing(h), body) => {
                match body {
                    PageBody::Ref(r) => {
                        assert_eq!(h, r);
                        assert!(self.dec.get(&h).is_none(), "missing, yet held");
                    }
                    PageBody::Delta { result, .. } => assert_eq!(h, result),
                    other => panic!("{other:?} resolved as missing"),
                }
                Rec::Page {
                    block,
                    offset,
                    data: None,
                    hash: h,
                }
            }
            (Resolved::Zero { .. }, other) => panic!("{other:?} resolved as a zero page"),
        };
        self.queue_or_write(rec)
    }

    fn queue_or_write(&mut self, rec: Rec) -> Result<(), Refused> {
        let ready = !matches!(rec, Rec::Page { data: None, .. });
        if self.queue.is_empty() && ready {
            self.write(rec)
        } else {
            self.queue.push_back(rec);
            Ok(())
        }
    }

    fn content(&mut self, h: Hash, data: Bytes) -> Result<(), Refused> {
        if self.dec.content(h, &data).is_err() {
            assert_ne!(
                self.hasher.hash(&data),
                h,
                "content refused though it matches"
            );
            return Err(Refused);
        }
        assert_eq!(
            self.hasher.hash(&data),
            h,
            "content taken though it does not match"
        );
        if let Some(held) = self.dec.get(&h) {
            assert_eq!(held, data, "the store holds other content under {h:02x?}");
        }
        for r in self.queue.iter_mut() {
            if let Rec::Page {
                data: d @ None,
                hash,
                ..
            } = r
            {
                if *hash == h {
                    *d = Some(data.clone());
                }
            }
        }
        while matches!(
            self.queue.front(),
            Some(Rec::Zero { .. } | Rec::Page { data: Some(_), .. })
        ) {
            let r = self.queue.pop_front().expect("front");
            self.write(r)?;
        }
        Ok(())
    }

    /// The record goes to QEMU: into the digest (and the image).
    fn write(&mut self, r: Rec) -> Result<(), Refused> {
        let (block, offset, bytes) = match r {
            Rec::Zero {
                block,
                offset,
                fill,
            } => {
                self.digest
                    .fill(block.into(), offset, fill)
                    .map_err(|_| Refused)?;
                (block, offset, vec![fill; self.page_size as usize])
            }
            Rec::Page {
                block,
                offset,
                data,
                ..
            } => {
                let data = data.expect("written once its content is here");
                if data.len() as u64 != self.page_size {
                    return Err(Refused);
                }
                self.digest
                    .page(block.into(), offset, &data)
                    .map_err(|_| Refused)?;
                (block, offset, data.to_vec())
            }
        };
        self.image.insert((block.into(), offset), bytes);
        self.written += 1;
        Ok(())
    }
}

pub(crate) fn run(data: &[u8]) -> Outcome {
    let mut buf = BytesMut::from(data);
    let mut frames = Vec::new();
    while let Ok(Some(m)) = decode(&mut buf) {
        frames.push(m);
    }
    let (page_size, layout): (u64, Vec<(String, u64)>) = match frames.first() {
        Some(Message::RamBlocks { page_size, blocks })
            if *page_size <= MAX_PAGE_SIZE
                && blocks
                    .iter()
                    .map(|b| b.used_length.div_ceil((*page_size).into()))
                    .try_fold(0u64, |sum, n| sum.checked_add(n))
                    .is_some_and(|n| n <= MAX_PAGES) =>
        {
            (
                (*page_size).into(),
                blocks
                    .iter()
                    .map(|b| (b.name.clone(), b.used_length))
                    .collect(),
            )
        }
        _ => (
            DEFAULT_PAGE,
            DEFAULT_BLOCKS
                .iter()
                .map(|(n, l)| (n.to_string(), *l))
                .collect(),
        ),
    };
    let hasher = hasher();
    let mut store =
        TieredStore::new(page_size as usize, STORE_PAGES, None).expect("a memory-only store");
    for k in 0..HELD {
        let p = held_page(k, page_size as usize);
        store
            .insert(hasher.hash(&p), &p)
            .expect("room in the store");
    }
    let shared: SharedStore = Arc::new(store.into());
    let mut dec = PageDecoder::new(hasher.clone(), shared);
    let (key_id, prefixes) = dec.summary();
    assert_eq!(key_id, hasher.key_id());
    assert_eq!(prefixes.len(), usize::from(HELD));
    let lengths: Vec<u64> = layout.iter().map(|(_, l)| *l).collect();
    dec.set_blocks(page_size, &lengths);
    let named = || layout.iter().map(|(n, l)| (n.as_str(), *l));
    let mut dest = Dest {
        hasher,
        page_size,
        blocks: layout.len(),
        dec,
        digest: MemoryDigest::new(page_size, named()),
        probe: MemoryDigest::new(page_size, named()),
        queue: VecDeque::new(),
        image: BTreeMap::new(),
        written: 0,
    };

    let refused = feed(&mut dest, frames).is_err();

    // last write wins, whatever the order: the digest of the final image equals it
    let mut again = MemoryDigest::new(page_size, named());
    for ((block, offset), bytes) in &dest.image {
        again
            .page(*block, *offset, bytes)
            .expect("the digest took this page before");
    }
    assert_eq!(
        again.finish(),
        dest.digest.finish(),
        "the digest depends on more than the final memory image"
    );
    Outcome {
        written: dest.written,
        waiting: dest.queue.len(),
        refused,
    }
}

fn feed(dest: &mut Dest, frames: Vec<Message>) -> Result<(), Refused> {
    for m in frames {
        match m {
            Message::Pages { block, pages } => {
                if usize::from(block) >= dest.blocks {
                    return Err(Refused);
                }
                for p in pages {
                    dest.page(block, p)?;
                }
            }
            Message::Content { pages } => {
                for (h, data) in pages {
                    dest.content(h, data)?;
                }
            }
            _ => {}
        }
    }
    Ok(())
}

//! How pages travel (protocol v2): the source's [`PageEncoder`] picks the cheapest form of
//! each page (zero, a reference to content the destination holds, a delta against the
//! page's previous version there, or the bytes), and the destination's [`PageDecoder`]
//! turns each record back into the page's bytes, using the agent's page store.
//!
//! Two data paths, switched as the migration runs ([`crate::datapath`]): **dedup** does all
//! of the above, hashing and keeping every page on both sides; **lean** sends every page's
//! bytes as they are and neither side hashes or keeps them (v5 `Plain`; to an older peer
//! `Raw`, which it keeps). A page sent lean has no known version at the destination, so
//! no later delta is made against it.
//!
//! Both sides track, per page of the VM, the hash of the version the destination has:
//! they see the same records in the same order, so they agree on every delta's base. A
//! reference the destination cannot resolve (a summary prefix that matched by chance, a
//! delta whose base is missing) becomes a [`Resolved::Missing`]: the destination asks for
//! that content (`Want`) and the source answers from its own store, where everything it
//! referenced stays pinned for the migration ([`Pins`]).

use std::collections::HashSet;
use std::sync::Arc;

use parking_lot::Mutex;

use bytes::Bytes;
use tern_proto::PageBody;
use tern_store::{delta, prefix, ContentHasher, Hash, PageStore, TieredStore};

/// The agent's page store, shared by its migrations.
pub type SharedStore = Arc<Mutex<TieredStore>>;

/// Hashes one migration pinned in the store; all unpinned when dropped.
pub struct Pins {
    store: SharedStore,
    held: HashSet<Hash>,
}

impl Pins {
    pub fn new(store: SharedStore) -> Self {
        Pins {
            store,
            held: HashSet::new(),
        }
    }

    /// Pins `h` once for this migration; false if the store does not hold it.
    fn pin(&mut self, st: &mut TieredStore, h: Hash) -> bool {
        if self.held.contains(&h) {
            return true;
        }
        if st.pin(&h) {
            self.held.insert(h);
            true
        } else {
            false
        }
    }

    /// Stores `data` and pins it; false if the store could not take it.
    fn keep(&mut self, st: &mut TieredStore, h: Hash, data: &[u8]) -> bool {
        if st.insert(h, data).is_err() {
            return false;
        }
        self.pin(st, h)
    }

    pub fn len(&self) -> usize {
        self.held.len()
    }

    pub fn is_empty(&self) -> bool {
        self.held.is_empty()
    }
}

impl Pins {
    /// Unpins everything this migration pinned (the pages stay, but may go).
    fn release(&mut self) {
        let mut st = self.store.lock();
        for h in self.held.drain() {
            st.unpin(&h);
        }
    }
}

impl Drop for Pins {
    fn drop(&mut self) {
        let mut st = self.store.lock();
        for h in &self.held {
            st.unpin(h);
        }
    }
}

/// Per page of each RAM block: the hash of the version the destination holds.
#[derive(Default)]
struct PageMap {
    page_size: u64,
    blocks: Vec<Vec<Option<Hash>>>,
}

impl PageMap {
    fn new(page_size: u64, lengths: &[u64]) -> Self {
        PageMap {
            page_size,
            blocks: lengths
                .iter()
                .map(|l| vec![None; l.div_ceil(page_size) as usize])
                .collect(),
        }
    }
    fn slot(&mut self, block: u16, offset: u64) -> Option<&mut Option<Hash>> {
        self.blocks
            .get_mut(block as usize)?
            .get_mut((offset / self.page_size) as usize)
    }
}

/// What the encoder did, for the report.
#[derive(Debug, Default, Clone, Copy)]
pub struct EncodeStats {
    pub zero: u64,
    pub raw: u64,
    /// Pages sent as bytes by the lean path (counted in `raw` too).
    pub lean: u64,
    pub refs: u64,
    pub deltas: u64,
    pub delta_bytes: u64,
}

/// The source side: one per outgoing migration.
pub struct PageEncoder {
    hasher: ContentHasher,
    store: SharedStore,
    pins: Pins,
    /// References and deltas possible (v2 peer with the same cluster key, not turned off).
    dedup: bool,
    /// The lean path is in use: bytes as they are, nothing hashed or kept.
    lean: bool,
    /// The peer takes `Plain` pages (v5): lean pages it need not keep.
    plain: bool,
    /// Post-copy: the lean path, except that content the destination's summary holds
    /// goes as a reference (no Want round trip: it pinned all of it before the
    /// migration). A page it asks for then comes from its store, not across the link.
    held_refs: bool,
    /// Prefixes of what the destination's store held when the migration started.
    summary: HashSet<u64>,
    /// Content the destination received or was referred to in this migration (it keeps
    /// it pinned): the only content its `Want`s may ask for.
    sent: Offered,
    map: PageMap,
    diff: Vec<u8>,
    pub stats: EncodeStats,
}

impl PageEncoder {
    pub fn new(
        hasher: ContentHasher,
        store: SharedStore,
        dedup: bool,
        summary: HashSet<u64>,
    ) -> Self {
        PageEncoder {
            hasher,
            pins: Pins::new(store.clone()),
            store,
            dedup,
            lean: !dedup,
            plain: false,
            held_refs: false,
            summary,
            sent: Offered::default(),
            map: PageMap::default(),
            diff: Vec::with_capacity(4096),
            stats: EncodeStats::default(),
        }
    }

    pub fn dedup(&self) -> bool {
        self.dedup
    }

    /// Switches between the data paths (the dedup path only where it is possible).
    pub fn set_lean(&mut self, lean: bool) {
        self.lean = lean || !self.dedup;
    }

    /// The peer speaks v5: lean pages go as `Plain`, which it neither hashes nor keeps.
    pub fn set_plain(&mut self, plain: bool) {
        self.plain = plain;
    }

    /// Post-copy's lean path: references only to content the destination's summary
    /// holds (no delta, no reference to what this migration sent, nothing else kept:
    /// every reference resolves at the destination without a round trip, barring a
    /// 64-bit prefix that matched by chance, which a Want still answers).
    pub fn set_held_refs(&mut self, on: bool) {
        self.held_refs = on && self.dedup;
    }

    pub fn summary_len(&self) -> usize {
        self.summary.len()
    }

    /// What this migration sent or referred to, for answering the destination's Wants.
    pub fn offered(&self) -> Offered {
        self.sent.clone()
    }

    /// The VM's RAM blocks (lengths in bytes), from QEMU's MEM_SIZE record.
    pub fn set_blocks(&mut self, page_size: u64, lengths: &[u64]) {
        self.map = PageMap::new(page_size, lengths);
    }

    pub fn zero(&mut self, block: u16, offset: u64) {
        self.stats.zero += 1;
        if let Some(s) = self.map.slot(block, offset) {
            *s = None;
        }
    }

    /// The cheapest body for this page.
    pub fn page(&mut self, block: u16, offset: u64, data: Bytes) -> PageBody {
        if self.lean && self.held_refs && !self.summary.is_empty() {
            let h = self.hasher.hash(&data);
            if self.summary.contains(&prefix(&h)) {
                let mut st = self.store.lock();
                // kept pinned here so that a Want (a prefix that matched by chance) is
                // answered; offered only once referred to
                if self.pins.keep(&mut st, h, &data) {
                    drop(st);
                    self.sent.0.lock().insert(h);
                    if let Some(s) = self.map.slot(block, offset) {
                        *s = None; // no delta is made on this path
                    }
                    self.stats.refs += 1;
                    return PageBody::Ref(h);
                }
            }
        }
        if self.lean {
            self.stats.raw += 1;
            self.stats.lean += 1;
            // the source will not know this version: no delta against it later (an older
            // peer keeps a Raw page under its hash, but nothing here refers to it)
            if let Some(s) = self.map.slot(block, offset) {
                *s = None;
            }
            return if self.plain {
                PageBody::Plain(data)
            } else {
                PageBody::Raw(data)
            };
        }
        let h = self.hasher.hash(&data);
        let prev = self.map.slot(block, offset).and_then(|s| s.replace(h));
        let mut st = self.store.lock();
        // Everything referenced must stay answerable (a Want): keep it pinned here.
        if !self.pins.keep(&mut st, h, &data) {
            drop(st);
            if let Some(s) = self.map.slot(block, offset) {
                *s = None; // unknown base: no delta against this version
            }
            self.stats.raw += 1;
            return PageBody::Raw(data);
        }
        let known = !self.sent.0.lock().insert(h);
        if known || self.summary.contains(&prefix(&h)) {
            self.stats.refs += 1;
            return PageBody::Ref(h);
        }
        if let Some(base) = prev.and_then(|p| st.get(&p).ok().flatten()) {
            drop(st);
            self.diff.clear();
            if base.len() == data.len() && delta::diff(&base, &data, data.len() / 4, &mut self.diff)
            {
                self.stats.deltas += 1;
                self.stats.delta_bytes += self.diff.len() as u64;
                return PageBody::Delta {
                    result: h,
                    diff: Bytes::copy_from_slice(&self.diff),
                };
            }
        }
        self.stats.raw += 1;
        PageBody::Raw(data)
    }
}

/// The content one outgoing migration sent or referred to (shared between its encoder and
/// the reader that answers Wants).
#[derive(Clone, Default)]
pub struct Offered(Arc<Mutex<HashSet<Hash>>>);

/// Why a destination's Want cannot be answered.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum WantError {
    #[error("the destination asked for {0} pages at once (at most {max})", max = tern_proto::limits::MAX_WANT_HASHES)]
    TooMany(usize),
    #[error("the destination asked for page {0}, which this migration never sent or referred to")]
    NotOffered(String),
    #[error("the destination asked for {0} pages this host no longer holds")]
    Gone(usize),
}

/// Answers a destination's Want: only with content of this migration (`offered`), never
/// anything else the page store holds (other VMs' pages), from the store where everything
/// referenced stays pinned. At most [`tern_proto::limits::MAX_WANT_HASHES`] per Want.
pub fn answer_want(
    store: &SharedStore,
    offered: &Offered,
    hashes: &[Hash],
) -> Result<Vec<(Hash, Bytes)>, WantError> {
    if hashes.len() > tern_proto::limits::MAX_WANT_HASHES {
        return Err(WantError::TooMany(hashes.len()));
    }
    {
        let offered = offered.0.lock();
        if let Some(h) = hashes.iter().find(|h| !offered.contains(*h)) {
            return Err(WantError::NotOffered(hex::encode(h)));
        }
    }
    let mut st = store.lock();
    let found: Vec<(Hash, Bytes)> = hashes
        .iter()
        .filter_map(|h| st.get(h).ok().flatten().map(|d| (*h, d)))
        .collect();
    if found.len() < hashes.len() {
        // cannot happen while the pins hold; the destination would wait forever
        return Err(WantError::Gone(hashes.len() - found.len()));
    }
    Ok(found)
}

/// A page record turned back into content.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Resolved {
    /// `pages` pages from the record's offset, every byte `fill`.
    Zero {
        fill: u8,
        pages: u32,
    },
    Page(Bytes),
    /// Content this host does not hold: ask the source for it.
    Missing(Hash),
}

/// Why a page record cannot be applied.
#[derive(Debug, thiserror::Error)]
pub enum DecodeError {
    #[error("page record for block #{block} offset {offset:#x} outside the VM's RAM")]
    OutOfRange { block: u16, offset: u64 },
    #[error("delta for block #{block} offset {offset:#x} is malformed: {source}")]
    Delta {
        block: u16,
        offset: u64,
        source: delta::DeltaError,
    },
    #[error("delta for block #{block} offset {offset:#x} does not give the content it names (wrong base)")]
    DeltaResult { block: u16, offset: u64 },
    #[error("content sent for {0} does not match its hash")]
    ContentMismatch(String),
}

/// The destination side: one per incoming migration.
pub struct PageDecoder {
    hasher: ContentHasher,
    store: SharedStore,
    pins: Pins,
    map: PageMap,
}

impl PageDecoder {
    pub fn new(hasher: ContentHasher, store: SharedStore) -> Self {
        PageDecoder {
            hasher,
            pins: Pins::new(store.clone()),
            store,
            map: PageMap::default(),
        }
    }

    pub fn set_blocks(&mut self, page_size: u64, lengths: &[u64]) {
        self.map = PageMap::new(page_size, lengths);
    }

    /// Pins everything the store holds for this migration and returns the summary:
    /// the cluster key's id and the 64-bit prefixes of every hash.
    pub fn summary(&mut self) -> (u64, Vec<u64>) {
        let mut st = self.store.lock();
        let hashes = st.hashes();
        let mut prefixes = Vec::with_capacity(hashes.len());
        for h in hashes {
            if self.pins.pin(&mut st, h) {
                prefixes.push(prefix(&h));
            }
        }
        (self.hasher.key_id(), prefixes)
    }

    pub fn resolve(
        &mut self,
        block: u16,
        offset: u64,
        body: PageBody,
    ) -> Result<Resolved, DecodeError> {
        let oor = DecodeError::OutOfRange { block, offset };
        match body {
            PageBody::Zero { fill } => {
                *self.map.slot(block, offset).ok_or(oor)? = None;
                Ok(Resolved::Zero { fill, pages: 1 })
            }
            PageBody::ZeroRun { fill, pages } => {
                let ps = self.map.page_size.max(1);
                let end = u64::from(pages)
                    .checked_mul(ps)
                    .and_then(|n| n.checked_add(offset))
                    .ok_or(DecodeError::OutOfRange { block, offset })?;
                if pages == 0 || self.map.slot(block, end - ps).is_none() {
                    return Err(DecodeError::OutOfRange { block, offset });
                }
                for i in 0..u64::from(pages) {
                    if let Some(s) = self.map.slot(block, offset + i * ps) {
                        *s = None;
                    }
                }
                Ok(Resolved::Zero { fill, pages })
            }
            PageBody::Plain(data) => {
                // the lean path: nothing refers to this version later, nothing is kept
                *self.map.slot(block, offset).ok_or(oor)? = None;
                Ok(Resolved::Page(data))
            }
            PageBody::Raw(data) => {
                let h = self.hasher.hash(&data);
                *self.map.slot(block, offset).ok_or(oor)? = Some(h);
                let mut st = self.store.lock();
                self.pins.keep(&mut st, h, &data);
                Ok(Resolved::Page(data))
            }
            PageBody::Ref(h) => {
                *self.map.slot(block, offset).ok_or(oor)? = Some(h);
                let mut st = self.store.lock();
                match st.get(&h).ok().flatten() {
                    Some(d) => {
                        self.pins.pin(&mut st, h);
                        Ok(Resolved::Page(d))
                    }
                    None => Ok(Resolved::Missing(h)),
                }
            }
            PageBody::Delta { result, diff } => {
                let slot = self.map.slot(block, offset).ok_or(oor)?;
                let base = slot.replace(result);
                let mut st = self.store.lock();
                let Some(base) = base.and_then(|b| st.get(&b).ok().flatten()) else {
                    return Ok(Resolved::Missing(result));
                };
                let mut out = vec![0u8; base.len()];
                delta::apply(&base, &diff, &mut out).map_err(|source| DecodeError::Delta {
                    block,
                    offset,
                    source,
                })?;
                if self.hasher.hash(&out) != result {
                    return Err(DecodeError::DeltaResult { block, offset });
                }
                self.pins.keep(&mut st, result, &out);
                Ok(Resolved::Page(out.into()))
            }
        }
    }

    /// Content the source sent for a Want: checked against its hash, then stored.
    pub fn content(&mut self, h: Hash, data: &[u8]) -> Result<(), DecodeError> {
        if self.hasher.hash(data) != h {
            return Err(DecodeError::ContentMismatch(hex::encode(h)));
        }
        let mut st = self.store.lock();
        self.pins.keep(&mut st, h, data);
        Ok(())
    }

    /// The migration's pages stay in the store, unpinned (it no longer needs them).
    pub fn release(&mut self) {
        self.pins.release();
    }

    /// The content under `h`, if this host holds it.
    pub fn get(&self, h: &Hash) -> Option<Bytes> {
        self.store.lock().get(h).ok().flatten()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const PS: usize = 4096;

    fn store(pages: usize) -> SharedStore {
        Arc::new(Mutex::new(TieredStore::new(PS, pages, None).unwrap()))
    }

    /// Content family `k`, edited at `edit` (0 = unedited): pages of one family differ in
    /// a few bytes, so deltas apply; equal (k, edit) are equal pages, so references do.
    fn content(k: u8, edit: u8) -> Bytes {
        let mut p: Vec<u8> = (0..PS).map(|i| (i as u8).wrapping_mul(k | 1) ^ k).collect();
        if edit > 0 {
            let at = edit as usize * 37 % (PS - 16);
            p[at..at + 16].fill(edit);
        }
        p.into()
    }

    #[derive(Debug, Clone)]
    enum Op {
        Zero(u8),
        Write(u8, u8, u8),
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            1 => (0u8..8).prop_map(Op::Zero),
            6 => (0u8..8, 0u8..4, 0u8..4).prop_map(|(i, k, e)| Op::Write(i, k, e)),
        ]
    }

    proptest! {
        /// Whatever the destination held before (summary), whatever the sequence of page
        /// writes, the destination reconstructs every page exactly, asking for what it
        /// misses; prefixes the destination does not actually hold cost a Want only.
        #[test]
        fn the_destination_rebuilds_every_page(
            ops in proptest::collection::vec(op(), 1..60),
            held in proptest::collection::vec((0u8..4, 0u8..4), 0..6),
            phantom in proptest::collection::vec((0u8..4, 0u8..4), 0..3),
            // 0: dedup; 1: lean; 2: post-copy's lean with references to held content
            path in 0u8..3,
        ) {
            let hasher = ContentHasher::new([9; 32]);
            let (src_store, dst_store) = (store(64), store(64));
            for &(k, e) in &held {
                let c = content(k, e);
                dst_store.lock().insert(hasher.hash(&c), &c).unwrap();
            }
            let mut dec = PageDecoder::new(hasher.clone(), dst_store.clone());
            let (key_id, mut prefixes) = dec.summary();
            prop_assert_eq!(key_id, hasher.key_id());
            // prefixes that match nothing the destination holds (chance, or eviction)
            prefixes.extend(phantom.iter().map(|&(k, e)| prefix(&hasher.hash(&content(k, e)))));
            let mut enc = PageEncoder::new(hasher.clone(), src_store.clone(), true, prefixes.into_iter().collect());
            enc.set_plain(true);
            enc.set_lean(path > 0);
            enc.set_held_refs(path == 2);
            enc.set_blocks(PS as u64, &[8 * PS as u64]);
            dec.set_blocks(PS as u64, &[8 * PS as u64]);
            for op in ops {
                match op {
                    Op::Zero(i) => {
                        enc.zero(0, i as u64 * PS as u64);
                        let r = dec.resolve(0, i as u64 * PS as u64, PageBody::Zero { fill: 0 }).unwrap();
                        prop_assert_eq!(r, Resolved::Zero { fill: 0, pages: 1 });
                    }
                    Op::Write(i, k, e) => {
                        let c = content(k, e);
                        let off = i as u64 * PS as u64;
                        let body = enc.page(0, off, c.clone());
                        let got = match dec.resolve(0, off, body).unwrap() {
                            Resolved::Page(d) => d,
                            Resolved::Missing(h) => {
                                let answer = answer_want(&src_store, &enc.offered(), &[h]).unwrap();
                                prop_assert_eq!(answer.len(), 1);
                                dec.content(answer[0].0, &answer[0].1).unwrap();
                                answer[0].1.clone()
                            }
                            Resolved::Zero { .. } => panic!("page became zero"),
                        };
                        prop_assert_eq!(got, c);
                    }
                }
            }
            let s = enc.stats;
            prop_assert!(s.raw + s.refs + s.deltas + s.zero > 0);
        }
    }

    #[test]
    fn repeated_and_edited_pages_travel_small() {
        let hasher = ContentHasher::new([1; 32]);
        let mut enc = PageEncoder::new(hasher.clone(), store(64), true, HashSet::new());
        enc.set_blocks(PS as u64, &[4 * PS as u64]);
        assert!(matches!(enc.page(0, 0, content(1, 0)), PageBody::Raw(_)));
        // the same content at another page: a reference
        assert_eq!(
            enc.page(0, PS as u64, content(1, 0)),
            PageBody::Ref(hasher.hash(&content(1, 0)))
        );
        // an edit of page 0: a delta of about the edit's size
        match enc.page(0, 0, content(1, 3)) {
            PageBody::Delta { diff, .. } => assert!(diff.len() < 40, "{} bytes", diff.len()),
            other => panic!("{other:?}"),
        }
        // other content entirely: the bytes
        assert!(matches!(enc.page(0, 0, content(2, 0)), PageBody::Raw(_)));
        // without dedup (v1 peer, other key): always the bytes
        let mut plain = PageEncoder::new(hasher, store(64), false, HashSet::new());
        plain.set_blocks(PS as u64, &[4 * PS as u64]);
        plain.page(0, 0, content(1, 0));
        assert!(matches!(
            plain.page(0, PS as u64, content(1, 0)),
            PageBody::Raw(_)
        ));
    }

    #[test]
    fn postcopy_refers_only_to_what_the_destination_held() {
        let hasher = ContentHasher::new([1; 32]);
        let dst = store(64);
        dst.lock()
            .insert(hasher.hash(&content(1, 0)), &content(1, 0))
            .unwrap();
        let mut dec = PageDecoder::new(hasher.clone(), dst);
        let (_, mut prefixes) = dec.summary();
        // a prefix that matches nothing held (chance): costs a Want, nothing else
        prefixes.push(prefix(&hasher.hash(&content(3, 0))));
        let src = store(64);
        let mut enc = PageEncoder::new(
            hasher.clone(),
            src.clone(),
            true,
            prefixes.into_iter().collect(),
        );
        enc.set_plain(true);
        enc.set_lean(true);
        enc.set_held_refs(true);
        enc.set_blocks(PS as u64, &[4 * PS as u64]);
        dec.set_blocks(PS as u64, &[4 * PS as u64]);
        let held = hasher.hash(&content(1, 0));
        assert_eq!(enc.page(0, 0, content(1, 0)), PageBody::Ref(held));
        assert_eq!(
            dec.resolve(0, 0, PageBody::Ref(held)).unwrap(),
            Resolved::Page(content(1, 0))
        );
        // content not held goes as bytes, twice: nothing this migration sent is kept there
        for at in [PS, 2 * PS] {
            assert!(matches!(
                enc.page(0, at as u64, content(2, 0)),
                PageBody::Plain(_)
            ));
        }
        // and no delta against an edited held page
        assert!(matches!(enc.page(0, 0, content(1, 5)), PageBody::Plain(_)));
        let phantom = hasher.hash(&content(3, 0));
        assert_eq!(
            enc.page(0, 3 * PS as u64, content(3, 0)),
            PageBody::Ref(phantom)
        );
        assert_eq!(
            dec.resolve(0, 3 * PS as u64, PageBody::Ref(phantom))
                .unwrap(),
            Resolved::Missing(phantom)
        );
        let answer = answer_want(&src, &enc.offered(), &[phantom]).unwrap();
        assert_eq!(answer, vec![(phantom, content(3, 0))]);
        assert_eq!((enc.stats.refs, enc.stats.lean), (2, 3));
        // without a summary: no hashing at all, the plain lean path
        let mut bare = PageEncoder::new(hasher, store(64), true, HashSet::new());
        bare.set_plain(true);
        bare.set_lean(true);
        bare.set_held_refs(true);
        bare.set_blocks(PS as u64, &[4 * PS as u64]);
        assert!(matches!(bare.page(0, 0, content(1, 0)), PageBody::Plain(_)));
    }

    #[test]
    fn bad_deltas_and_content_are_refused() {
        let hasher = ContentHasher::new([1; 32]);
        let mut dec = PageDecoder::new(hasher.clone(), store(64));
        dec.set_blocks(PS as u64, &[2 * PS as u64]);
        dec.resolve(0, 0, PageBody::Raw(content(1, 0))).unwrap();
        let wrong = PageBody::Delta {
            result: hasher.hash(&content(2, 0)),
            diff: Bytes::from_static(&[0, 1, 9]),
        };
        assert!(matches!(
            dec.resolve(0, 0, wrong),
            Err(DecodeError::DeltaResult { .. })
        ));
        assert!(matches!(
            dec.resolve(0, 9 * PS as u64, PageBody::Zero { fill: 0 }),
            Err(DecodeError::OutOfRange { .. })
        ));
        assert!(matches!(
            dec.content([0; 16], &content(1, 0)),
            Err(DecodeError::ContentMismatch(_))
        ));
    }

    #[test]
    fn pins_keep_a_migrations_pages_until_it_ends() {
        let hasher = ContentHasher::new([1; 32]);
        let st = store(2);
        {
            let mut enc = PageEncoder::new(hasher.clone(), st.clone(), true, HashSet::new());
            enc.set_blocks(PS as u64, &[8 * PS as u64]);
            enc.page(0, 0, content(1, 0));
            enc.page(0, PS as u64, content(2, 0));
            // the store is full of this migration's pinned pages: the next goes raw, unkept
            assert!(matches!(
                enc.page(0, 2 * PS as u64, content(3, 0)),
                PageBody::Raw(_)
            ));
            assert_eq!(enc.pins.len(), 2);
            assert!(st
                .lock()
                .insert(hasher.hash(&content(4, 0)), &content(4, 0))
                .is_err());
        }
        // the migration is over: its pages stay but may go
        st.lock()
            .insert(hasher.hash(&content(4, 0)), &content(4, 0))
            .unwrap();
    }
}

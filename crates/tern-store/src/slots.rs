//! Fixed-size slot stores: an index (hash -> slot, age, pins) over a backend that keeps
//! the bytes, in memory or in a file. Eviction takes the oldest unpinned entry.

use std::collections::{HashMap, VecDeque};
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use bytes::Bytes;

use crate::{Hash, PageStore, StoreError};

/// Where a slot store keeps page bytes.
pub trait Backend {
    fn write(&mut self, slot: u32, data: &[u8]) -> Result<(), StoreError>;
    fn read(&self, slot: u32, page_size: usize) -> Result<Bytes, StoreError>;
    fn release(&mut self, _slot: u32) {}
}

/// Page bytes in memory.
#[derive(Default)]
pub struct MemBackend {
    slots: Vec<Bytes>,
}

impl Backend for MemBackend {
    fn write(&mut self, slot: u32, data: &[u8]) -> Result<(), StoreError> {
        let i = slot as usize;
        if i >= self.slots.len() {
            self.slots.resize(i + 1, Bytes::new());
        }
        self.slots[i] = Bytes::copy_from_slice(data);
        Ok(())
    }
    fn read(&self, slot: u32, _page_size: usize) -> Result<Bytes, StoreError> {
        Ok(self.slots[slot as usize].clone())
    }
    fn release(&mut self, slot: u32) {
        self.slots[slot as usize] = Bytes::new();
    }
}

/// Page bytes in a file of fixed-size slots (the file is scratch: it is truncated when
/// opened, the index lives in memory).
pub struct FileBackend {
    file: File,
    path: PathBuf,
    page_size: usize,
}

impl FileBackend {
    fn io(&self, source: std::io::Error) -> StoreError {
        StoreError::Io {
            path: self.path.display().to_string(),
            source,
        }
    }
}

impl Backend for FileBackend {
    fn write(&mut self, slot: u32, data: &[u8]) -> Result<(), StoreError> {
        self.file
            .write_all_at(data, slot as u64 * self.page_size as u64)
            .map_err(|e| self.io(e))
    }
    fn read(&self, slot: u32, page_size: usize) -> Result<Bytes, StoreError> {
        let mut buf = vec![0u8; page_size];
        self.file
            .read_exact_at(&mut buf, slot as u64 * page_size as u64)
            .map_err(|e| self.io(e))?;
        Ok(buf.into())
    }
}

struct Entry {
    slot: u32,
    seq: u64,
    pins: u32,
}

/// An index of fixed-size slots over a backend, `capacity` pages at most.
pub struct SlotStore<B> {
    map: HashMap<Hash, Entry>,
    /// Entries with pins > 0: when all are pinned, eviction answers at once instead of
    /// turning the whole queue over (a store full of a migration's pins took an insert
    /// O(n), and a source agent minutes per page).
    pinned: usize,
    /// FIFO entries looked at by eviction so far (for tests of its cost).
    scanned: u64,
    /// (seq, hash) in insertion order; entries whose seq is no longer the map's are stale.
    fifo: VecDeque<(u64, Hash)>,
    /// Pinned entries eviction passed over, oldest first.
    parked: VecDeque<(u64, Hash)>,
    free: Vec<u32>,
    next_slot: u32,
    capacity: usize,
    seq: u64,
    page_size: usize,
    backend: B,
}

/// Pages in memory.
pub type MemStore = SlotStore<MemBackend>;
/// Pages in a file.
pub type FileStore = SlotStore<FileBackend>;

impl MemStore {
    pub fn new(page_size: usize, capacity: usize) -> Self {
        SlotStore::with_backend(page_size, capacity, MemBackend::default())
    }
}

impl FileStore {
    /// Creates (or truncates) the slot file at `path`.
    pub fn create(path: &Path, page_size: usize, capacity: usize) -> Result<Self, StoreError> {
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(path)
            .map_err(|source| StoreError::Io {
                path: path.display().to_string(),
                source,
            })?;
        Ok(SlotStore::with_backend(
            page_size,
            capacity,
            FileBackend {
                file,
                path: path.to_path_buf(),
                page_size,
            },
        ))
    }
}

impl<B: Backend> SlotStore<B> {
    fn with_backend(page_size: usize, capacity: usize, backend: B) -> Self {
        SlotStore {
            map: HashMap::new(),
            pinned: 0,
            scanned: 0,
            fifo: VecDeque::new(),
            parked: VecDeque::new(),
            free: Vec::new(),
            next_slot: 0,
            capacity,
            seq: 0,
            page_size,
            backend,
        }
    }

    pub fn page_size(&self) -> usize {
        self.page_size
    }

    pub fn capacity(&self) -> usize {
        self.capacity
    }

    pub fn is_full(&self) -> bool {
        self.map.len() >= self.capacity
    }

    /// How many queue entries eviction has looked at (its cost, for tests).
    pub fn eviction_scans(&self) -> u64 {
        self.scanned
    }

    /// Entries in the eviction queues, stale ones included (their cost, for tests).
    pub fn queued(&self) -> usize {
        self.fifo.len() + self.parked.len()
    }

    /// Entries with at least one pin.
    pub fn pinned(&self) -> usize {
        self.pinned
    }

    /// Takes the oldest entry out (pinned ones too when `take_pinned`), returning its
    /// hash, bytes and pin count; `None` when nothing can go. Pinned entries met on the
    /// way are parked aside (back in the queue once unpinned), so no entry is looked at
    /// twice while it stays pinned.
    pub fn evict_oldest(
        &mut self,
        take_pinned: bool,
    ) -> Result<Option<(Hash, Bytes, u32)>, StoreError> {
        if !take_pinned && self.pinned >= self.map.len() {
            return Ok(None);
        }
        loop {
            let fifo = self.live_front(false);
            let pick = if take_pinned {
                let parked = self.live_front(true);
                match (fifo, parked) {
                    (Some(a), Some(b)) if b.0 < a.0 => self.parked.pop_front(),
                    (Some(_), _) => self.fifo.pop_front(),
                    (None, Some(_)) => self.parked.pop_front(),
                    (None, None) => None,
                }
            } else {
                fifo.and_then(|_| self.fifo.pop_front())
            };
            let Some((seq, h)) = pick else {
                return Ok(None);
            };
            let pins = self.map.get(&h).map_or(0, |e| e.pins);
            if pins > 0 && !take_pinned {
                self.parked.push_back((seq, h));
                continue;
            }
            let e = self.map.remove(&h).expect("live entry");
            if e.pins > 0 {
                self.pinned -= 1;
            }
            let data = self.backend.read(e.slot, self.page_size)?;
            self.backend.release(e.slot);
            self.free.push(e.slot);
            return Ok(Some((h, data, e.pins)));
        }
    }

    /// The first entry of the queue (or of the parked ones) that is still current,
    /// dropping stale ones on the way.
    fn live_front(&mut self, parked: bool) -> Option<(u64, Hash)> {
        loop {
            let q = if parked {
                &mut self.parked
            } else {
                &mut self.fifo
            };
            let &(seq, h) = q.front()?;
            self.scanned += 1;
            if self.map.get(&h).is_some_and(|e| e.seq == seq) {
                return Some((seq, h));
            }
            let q = if parked {
                &mut self.parked
            } else {
                &mut self.fifo
            };
            q.pop_front();
        }
    }

    /// Inserts with a pin count already set (a tier handing an entry on).
    pub fn insert_pinned(&mut self, h: Hash, data: &[u8], pins: u32) -> Result<(), StoreError> {
        if data.len() != self.page_size {
            return Err(StoreError::PageSize {
                got: data.len(),
                want: self.page_size,
            });
        }
        self.seq += 1;
        let seq = self.seq;
        if let Some(e) = self.map.get_mut(&h) {
            e.seq = seq;
            if e.pins == 0 && pins > 0 {
                self.pinned += 1;
            }
            e.pins += pins;
            self.fifo.push_back((seq, h));
            self.compact();
            return Ok(());
        }
        if self.map.len() >= self.capacity && self.evict_oldest(false)?.is_none() {
            return Err(StoreError::Full(self.capacity));
        }
        let slot = match self.free.pop() {
            Some(s) => s,
            None => {
                self.next_slot += 1;
                self.next_slot - 1
            }
        };
        if let Err(e) = self.backend.write(slot, data) {
            self.free.push(slot);
            return Err(e);
        }
        self.map.insert(h, Entry { slot, seq, pins });
        if pins > 0 {
            self.pinned += 1;
        }
        self.fifo.push_back((seq, h));
        self.compact();
        Ok(())
    }

    fn compact(&mut self) {
        if self.fifo.len() + self.parked.len() > 2 * self.map.len() + 64 {
            let map = &self.map;
            self.fifo
                .retain(|(seq, h)| map.get(h).is_some_and(|e| e.seq == *seq));
            self.parked
                .retain(|(seq, h)| map.get(h).is_some_and(|e| e.seq == *seq && e.pins > 0));
        }
    }

    /// Removes `h` whatever its pins, returning its bytes and pins.
    pub fn take(&mut self, h: &Hash) -> Result<Option<(Bytes, u32)>, StoreError> {
        let Some(e) = self.map.remove(h) else {
            return Ok(None);
        };
        if e.pins > 0 {
            self.pinned -= 1;
        }
        let data = self.backend.read(e.slot, self.page_size)?;
        self.backend.release(e.slot);
        self.free.push(e.slot);
        Ok(Some((data, e.pins)))
    }
}

impl<B: Backend> PageStore for SlotStore<B> {
    fn insert(&mut self, h: Hash, data: &[u8]) -> Result<(), StoreError> {
        self.insert_pinned(h, data, 0)
    }

    fn get(&mut self, h: &Hash) -> Result<Option<Bytes>, StoreError> {
        match self.map.get(h) {
            Some(e) => self.backend.read(e.slot, self.page_size).map(Some),
            None => Ok(None),
        }
    }

    fn contains(&self, h: &Hash) -> bool {
        self.map.contains_key(h)
    }

    fn pin(&mut self, h: &Hash) -> bool {
        match self.map.get_mut(h) {
            Some(e) => {
                if e.pins == 0 {
                    self.pinned += 1;
                }
                e.pins += 1;
                true
            }
            None => false,
        }
    }

    fn unpin(&mut self, h: &Hash) {
        if let Some(e) = self.map.get_mut(h) {
            if e.pins == 1 {
                self.pinned -= 1;
                // evictable again: back in the queue as the newest entry (a page a
                // migration just used), under a new sequence number, so that the copies
                // already queued or parked are stale and each entry is queued once (with
                // its old number a page pinned and unpinned by every migration piled up
                // copies no compaction could drop, and each insert then compacted the
                // whole queue: a host that was a source before took minutes per page)
                self.seq += 1;
                e.seq = self.seq;
                self.fifo.push_back((e.seq, *h));
            }
            e.pins = e.pins.saturating_sub(1);
        }
    }

    fn len(&self) -> usize {
        self.map.len()
    }

    fn hashes(&self) -> Vec<Hash> {
        self.map.keys().copied().collect()
    }
}

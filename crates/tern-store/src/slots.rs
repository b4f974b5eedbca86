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
    /// (seq, hash) in insertion order; entries whose seq is no longer the map's are stale.
    fifo: VecDeque<(u64, Hash)>,
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
            fifo: VecDeque::new(),
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

    /// Takes the oldest entry out (pinned ones too when `take_pinned`), returning its
    /// hash, bytes and pin count; `None` when nothing can go.
    pub fn evict_oldest(
        &mut self,
        take_pinned: bool,
    ) -> Result<Option<(Hash, Bytes, u32)>, StoreError> {
        let mut rotated = 0;
        while let Some((seq, h)) = self.fifo.pop_front() {
            let Some(e) = self.map.get(&h) else { continue };
            if e.seq != seq {
                continue;
            }
            if e.pins > 0 && !take_pinned {
                // keep its age order among the pinned: push back, stop after a full turn
                self.fifo.push_back((seq, h));
                rotated += 1;
                if rotated > self.map.len() {
                    return Ok(None);
                }
                continue;
            }
            let e = self.map.remove(&h).expect("present");
            let data = self.backend.read(e.slot, self.page_size)?;
            self.backend.release(e.slot);
            self.free.push(e.slot);
            return Ok(Some((h, data, e.pins)));
        }
        Ok(None)
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
        self.fifo.push_back((seq, h));
        self.compact();
        Ok(())
    }

    fn compact(&mut self) {
        if self.fifo.len() > 2 * self.map.len() + 64 {
            let map = &self.map;
            self.fifo
                .retain(|(seq, h)| map.get(h).is_some_and(|e| e.seq == *seq));
        }
    }

    /// Removes `h` whatever its pins, returning its bytes and pins.
    pub fn take(&mut self, h: &Hash) -> Result<Option<(Bytes, u32)>, StoreError> {
        let Some(e) = self.map.remove(h) else {
            return Ok(None);
        };
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
                e.pins += 1;
                true
            }
            None => false,
        }
    }

    fn unpin(&mut self, h: &Hash) {
        if let Some(e) = self.map.get_mut(h) {
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

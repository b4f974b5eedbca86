//! Memory first, spilling to a file: the agent's page store. An entry pushed out of memory
//! moves to the file (pins and all); one pushed out of the file is gone. Storing content
//! the file holds brings it back into memory.

use std::path::Path;

use bytes::Bytes;

use crate::{FileStore, Hash, MemStore, PageStore, StoreError};

pub struct TieredStore {
    mem: MemStore,
    file: Option<FileStore>,
}

/// How full each tier is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TieredStats {
    pub page_size: usize,
    pub mem_pages: usize,
    pub mem_capacity: usize,
    pub file_pages: usize,
    pub file_capacity: usize,
}

impl TieredStore {
    /// `mem_pages` in memory; `file` = (path, pages) for the spill tier, or none.
    pub fn new(
        page_size: usize,
        mem_pages: usize,
        file: Option<(&Path, usize)>,
    ) -> Result<Self, StoreError> {
        let file = match file {
            Some((path, pages)) if pages > 0 => Some(FileStore::create(path, page_size, pages)?),
            _ => None,
        };
        Ok(TieredStore {
            mem: MemStore::new(page_size, mem_pages),
            file,
        })
    }

    pub fn page_size(&self) -> usize {
        self.mem.page_size()
    }

    pub fn stats(&self) -> TieredStats {
        TieredStats {
            page_size: self.mem.page_size(),
            mem_pages: self.mem.len(),
            mem_capacity: self.mem.capacity(),
            file_pages: self.file.as_ref().map_or(0, |f| f.len()),
            file_capacity: self.file.as_ref().map_or(0, |f| f.capacity()),
        }
    }

    fn insert_with(&mut self, h: Hash, data: &[u8], mut pins: u32) -> Result<(), StoreError> {
        if data.len() != self.mem.page_size() {
            return Err(StoreError::PageSize {
                got: data.len(),
                want: self.mem.page_size(),
            });
        }
        if self.mem.contains(&h) {
            return self.mem.insert_pinned(h, data, pins);
        }
        if let Some(f) = self.file.as_mut() {
            if let Some((_, p)) = f.take(&h)? {
                pins += p;
            }
        }
        if self.mem.is_full() {
            if let Some(f) = self.file.as_mut() {
                if !f.is_full() || f.evict_oldest(false)?.is_some() {
                    // room in the file: the oldest in memory moves there, pins and all
                    if let Some((eh, ed, ep)) = self.mem.evict_oldest(true)? {
                        f.insert_pinned(eh, &ed, ep)?;
                    }
                } else if self.mem.evict_oldest(false)?.is_none() {
                    return Err(StoreError::Full(self.mem.capacity() + f.capacity()));
                }
            }
        }
        self.mem.insert_pinned(h, data, pins)
    }
}

impl PageStore for TieredStore {
    fn insert(&mut self, h: Hash, data: &[u8]) -> Result<(), StoreError> {
        self.insert_with(h, data, 0)
    }

    fn get(&mut self, h: &Hash) -> Result<Option<Bytes>, StoreError> {
        if let Some(d) = self.mem.get(h)? {
            return Ok(Some(d));
        }
        match self.file.as_mut() {
            Some(f) => f.get(h),
            None => Ok(None),
        }
    }

    fn contains(&self, h: &Hash) -> bool {
        self.mem.contains(h) || self.file.as_ref().is_some_and(|f| f.contains(h))
    }

    fn pin(&mut self, h: &Hash) -> bool {
        self.mem.pin(h) || self.file.as_mut().is_some_and(|f| f.pin(h))
    }

    fn unpin(&mut self, h: &Hash) {
        if self.mem.contains(h) {
            self.mem.unpin(h);
        } else if let Some(f) = self.file.as_mut() {
            f.unpin(h);
        }
    }

    fn len(&self) -> usize {
        self.mem.len() + self.file.as_ref().map_or(0, |f| f.len())
    }

    fn hashes(&self) -> Vec<Hash> {
        let mut v = self.mem.hashes();
        if let Some(f) = &self.file {
            v.extend(f.hashes());
        }
        v
    }
}

//! tern's page store: what content an agent holds, by content hash.
//!
//! Owns three things the WAN data path builds on:
//! - [`ContentHasher`]: a page's identity, the first 128 bits of BLAKE3 keyed with the
//!   cluster key (see docs/adr/0004-content-hashing.md for the choice and the collision
//!   stance: a guest cannot craft collisions without the key);
//! - stores: [`MemStore`] and [`FileStore`] (fixed-size slots, evicted oldest first,
//!   pinned entries never dropped) and [`TieredStore`], memory first, spilling to a file;
//! - [`delta`]: a page as the spans that changed against its previous version.
//!
//! No sockets, no async: the agent wraps a store in a mutex and calls it per batch.
#![forbid(unsafe_code)]

pub mod delta;
mod slots;
mod tiered;

pub use slots::{FileStore, MemStore, SlotStore};
pub use tiered::{TieredStats, TieredStore};

/// A page's content identity (16 bytes of keyed BLAKE3).
pub type Hash = [u8; 16];

/// Why a store operation failed.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("page of {got} bytes does not fit this store's {want}-byte slots")]
    PageSize { got: usize, want: usize },
    #[error("the store is full of pinned pages ({0} slots)")]
    Full(usize),
    #[error("page store file {path}: {source}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },
}

/// Hashes page content with the cluster key. Every agent of a cluster must use the same
/// key for references between hosts to match; [`ContentHasher::key_id`] tells peers apart.
#[derive(Clone)]
pub struct ContentHasher {
    key: [u8; 32],
}

impl std::fmt::Debug for ContentHasher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "ContentHasher(key_id {:016x})", self.key_id())
    }
}

impl ContentHasher {
    pub fn new(key: [u8; 32]) -> Self {
        ContentHasher { key }
    }

    /// The content hash of `data`.
    pub fn hash(&self, data: &[u8]) -> Hash {
        let h = blake3::keyed_hash(&self.key, data);
        let mut out = [0u8; 16];
        out.copy_from_slice(&h.as_bytes()[..16]);
        out
    }

    /// A public name of the key (safe to send: derived, not reversible), so that two
    /// agents can tell whether their hashes are comparable.
    pub fn key_id(&self) -> u64 {
        let h = blake3::derive_key("tern cluster key id v1", &self.key);
        u64::from_be_bytes(h[..8].try_into().expect("8 bytes"))
    }
}

/// The first 64 bits of a hash, as summaries carry them.
pub fn prefix(h: &Hash) -> u64 {
    u64::from_be_bytes(h[..8].try_into().expect("8 bytes"))
}

/// What every store offers. Entries are whole pages of the store's page size.
pub trait PageStore {
    /// Stores `data` under `h` (its content hash). Storing what is there already makes
    /// it the newest entry. Evicts the oldest unpinned entries to make room.
    fn insert(&mut self, h: Hash, data: &[u8]) -> Result<(), StoreError>;
    /// The content stored under `h`.
    fn get(&mut self, h: &Hash) -> Result<Option<bytes::Bytes>, StoreError>;
    fn contains(&self, h: &Hash) -> bool;
    /// Keeps `h` from being dropped until as many `unpin`s; false if not held.
    fn pin(&mut self, h: &Hash) -> bool;
    fn unpin(&mut self, h: &Hash);
    fn len(&self) -> usize;
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// Every hash held, in no particular order.
    fn hashes(&self) -> Vec<Hash>;
}

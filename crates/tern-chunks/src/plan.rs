//! [`plan`]: the destination's answer to a [`Manifest`]: which blocks it can fill from its
//! own chunk index, which it must be sent, and which repeat a block it is sent anyway.
//!
//! Owns that split only; pure (index lookups, no I/O).

use std::collections::HashMap;
use std::ops::Range;

use tern_store::Hash;

use crate::index::{ChunkIndex, Location};
use crate::manifest::{Manifest, BLOCK_SIZE};

/// How the destination fills the DATA blocks of a manifest.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Plan {
    /// Blocks found in the local index: (disk offset, where to read the content here).
    pub have: Vec<(u64, Location)>,
    /// Blocks to ask the source for, in order, one per distinct missing hash.
    pub want: Vec<u64>,
    /// Blocks whose content equals a wanted block's: (disk offset, wanted offset); written
    /// when that one arrives, never sent twice.
    pub dups: Vec<(u64, u64)>,
    /// ZERO runs of the manifest (to write only if the target is not known to be zero).
    pub zeros: Vec<Range<u64>>,
}

impl Plan {
    /// Bytes the source must send (block payloads only).
    pub fn want_bytes(&self) -> u64 {
        self.want.len() as u64 * BLOCK_SIZE
    }

    /// Bytes filled locally: from the index, and by repeating wanted blocks.
    pub fn local_bytes(&self) -> u64 {
        (self.have.len() + self.dups.len()) as u64 * BLOCK_SIZE
    }
}

/// Splits `manifest`'s DATA blocks into `have` (in `index`), `want` (first block of each
/// missing hash) and `dups` (later blocks with a missing hash already wanted).
pub fn plan(manifest: &Manifest, index: &ChunkIndex) -> Plan {
    let mut p = Plan {
        zeros: manifest.zeros().to_vec(),
        ..Plan::default()
    };
    let mut wanted: HashMap<Hash, u64> = HashMap::new();
    for (offset, hash) in manifest.data() {
        if let Some(loc) = index.lookup(hash) {
            p.have.push((*offset, loc));
        } else if let Some(first) = wanted.get(hash) {
            p.dups.push((*offset, *first));
        } else {
            wanted.insert(*hash, *offset);
            p.want.push(*offset);
        }
    }
    p
}

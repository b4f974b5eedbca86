//! The exactness proof: a digest of the guest memory image that a migration stream
//! describes (page records applied in order, last write wins). Both agents compute it,
//! the source from what QEMU wrote, the destination from what it gives its QEMU; they must
//! agree before the destination VM may run.
//!
//! Each page's content is hashed with xxh3-128 as it passes; the final digest is BLAKE3
//! over the block table and every page's latest hash (pages never sent hash to 0).

use xxhash_rust::xxh3::xxh3_128;

/// Why a page record does not fit the VM's RAM blocks.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum DigestError {
    #[error("page record for unknown RAM block #{0}")]
    UnknownBlock(usize),
    #[error("page at offset {offset:#x} is outside RAM block {block} ({len} bytes)")]
    OutOfRange {
        block: String,
        offset: u64,
        len: u64,
    },
}

struct Block {
    name: String,
    len: u64,
    hashes: Vec<u128>,
}

pub struct MemoryDigest {
    page_size: u64,
    blocks: Vec<Block>,
    zero_hash: u128,
    pub pages: u64,
}

impl MemoryDigest {
    pub fn new<'a>(page_size: u64, blocks: impl IntoIterator<Item = (&'a str, u64)>) -> Self {
        let blocks = blocks
            .into_iter()
            .map(|(name, len)| Block {
                name: name.to_string(),
                len,
                hashes: vec![0; len.div_ceil(page_size) as usize],
            })
            .collect();
        let zero_hash = xxh3_128(&vec![0u8; page_size as usize]);
        MemoryDigest {
            page_size,
            blocks,
            zero_hash,
            pages: 0,
        }
    }

    fn slot(&mut self, block: usize, offset: u64) -> Result<&mut u128, DigestError> {
        let ps = self.page_size;
        let b = self
            .blocks
            .get_mut(block)
            .ok_or(DigestError::UnknownBlock(block))?;
        if !offset.is_multiple_of(ps) || offset >= b.len {
            return Err(DigestError::OutOfRange {
                block: b.name.clone(),
                offset,
                len: b.len,
            });
        }
        Ok(&mut b.hashes[(offset / ps) as usize])
    }

    pub fn page_size(&self) -> u64 {
        self.page_size
    }

    /// Records a page whose every byte is `fill`.
    pub fn fill(&mut self, block: usize, offset: u64, fill: u8) -> Result<(), DigestError> {
        let h = if fill == 0 {
            self.zero_hash
        } else {
            xxh3_128(&vec![fill; self.page_size as usize])
        };
        *self.slot(block, offset)? = h;
        self.pages += 1;
        Ok(())
    }

    /// Records a page's bytes.
    pub fn page(&mut self, block: usize, offset: u64, data: &[u8]) -> Result<(), DigestError> {
        let h = xxh3_128(data);
        *self.slot(block, offset)? = h;
        self.pages += 1;
        Ok(())
    }

    pub fn finish(&self) -> [u8; 32] {
        let mut h = blake3::Hasher::new();
        h.update(&self.page_size.to_le_bytes());
        for b in &self.blocks {
            h.update(&(b.name.len() as u64).to_le_bytes());
            h.update(b.name.as_bytes());
            h.update(&b.len.to_le_bytes());
            for x in &b.hashes {
                h.update(&x.to_le_bytes());
            }
        }
        *h.finalize().as_bytes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn last_write_wins_and_order_of_distinct_pages_does_not_matter() {
        let mut a = MemoryDigest::new(4096, [("pc.ram", 3 * 4096)]);
        let mut b = MemoryDigest::new(4096, [("pc.ram", 3 * 4096)]);
        a.page(0, 0, &[1; 4096]).unwrap();
        a.page(0, 0, &[2; 4096]).unwrap();
        a.fill(0, 4096, 0).unwrap();
        b.fill(0, 4096, 0).unwrap();
        b.page(0, 0, &[2; 4096]).unwrap();
        assert_eq!(a.finish(), b.finish());
        b.page(0, 8192, &[0; 4096]).unwrap();
        assert_ne!(
            a.finish(),
            b.finish(),
            "a page never sent differs from a zero page"
        );
        a.fill(0, 8192, 0).unwrap();
        assert_eq!(a.finish(), b.finish(), "ZERO record == PAGE of zeros");
    }

    #[test]
    fn out_of_range_pages_are_errors() {
        let mut a = MemoryDigest::new(4096, [("pc.ram", 4096)]);
        assert!(matches!(
            a.page(0, 4096, &[0; 4096]),
            Err(DigestError::OutOfRange { .. })
        ));
        assert!(matches!(
            a.page(0, 1, &[0; 4096]),
            Err(DigestError::OutOfRange { .. })
        ));
        assert_eq!(a.fill(1, 0, 0), Err(DigestError::UnknownBlock(1)));
    }
}

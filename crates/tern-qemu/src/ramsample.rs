//! A sample of a running guest's RAM, read by the host from the QEMU process
//! (`/proc/PID/mem` at the host address QEMU's `x-query-ramblock` reports for its main RAM
//! block): which sampled pages are zero and the bytes of the rest. The guest is not paused
//! and QEMU opens nothing. For predictions only (`--plan`): the caller counts and
//! compresses the pages and drops them.
//!
//! Owns reading QEMU's RAM-block table and the process's memory; must not keep guest data.

use std::os::unix::fs::FileExt;

use serde_json::Value;

use crate::qmp::{QmpClient, QmpError};

/// Why the sample could not be taken.
#[derive(Debug, thiserror::Error)]
pub enum SampleError {
    #[error("QEMU's x-query-ramblock failed")]
    Qmp(#[from] QmpError),
    #[error("QEMU's RAM-block table has no RAM block tern can read: {0:?}")]
    NoBlock(String),
    #[error("cannot read QEMU process {pid}'s memory")]
    Read {
        pid: u32,
        #[source]
        source: std::io::Error,
    },
}

/// Sampled pages of guest RAM, evenly spread over its main block.
#[derive(Debug, Default)]
pub struct RamSample {
    /// Pages read, and of them those that are all zero.
    pub pages: usize,
    pub zero: usize,
    /// The bytes of the pages that are not zero, 4 KiB each, one after another.
    pub nonzero: Vec<u8>,
    /// Where each of those pages is in the sample (its index among the pages read).
    pub nonzero_at: Vec<u32>,
    /// The host addresses read, in order: [`resample`] reads the same pages again.
    pub addresses: Vec<u64>,
}

/// One row of `x-query-ramblock`: the block's name, its used size and host address.
#[derive(Debug, PartialEq)]
pub struct RamBlockRow {
    pub name: String,
    pub used: u64,
    pub hva: u64,
}

/// Parses QEMU's RAM-block table (`Block Name PSize Offset Used Total HVA RO`).
pub fn parse_ramblocks(text: &str) -> Vec<RamBlockRow> {
    let hex = |s: &str| u64::from_str_radix(s.trim_start_matches("0x"), 16).ok();
    text.lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            // name, psize value, psize unit, offset, used, total, hva, ro
            if f.len() < 8 || !f[3].starts_with("0x") {
                return None;
            }
            Some(RamBlockRow {
                name: f[0].to_string(),
                used: hex(f[4])?,
                hva: hex(f[6])?,
            })
        })
        .collect()
}

impl RamBlockRow {
    /// The host addresses of `pages` pages spread evenly over the block (at most one per
    /// page of it), or None when the block QEMU describes does not fit the address space
    /// (a QEMU that is not to be believed).
    pub fn sample_addresses(&self, pages: usize) -> Option<Vec<u64>> {
        let total = self.used / 4096;
        if total == 0 {
            return None;
        }
        let n = (pages as u64).clamp(1, total);
        self.hva.checked_add((total - 1).checked_mul(4096)?)?;
        // the index math in u128: `i * total` need not fit 64 bits
        let at = |i: u64| (u128::from(i) * u128::from(total) / u128::from(n)) as u64;
        Some((0..n).map(|i| self.hva + at(i) * 4096).collect())
    }
}

/// Reads `pages` pages spread evenly over the guest's main RAM block of QEMU process `pid`.
pub async fn sample(qmp: &QmpClient, pid: u32, pages: usize) -> Result<RamSample, SampleError> {
    let v = qmp.execute("x-query-ramblock", None).await?;
    let text = v
        .get("human-readable-text")
        .and_then(Value::as_str)
        .unwrap_or_default()
        .to_string();
    let rows = parse_ramblocks(&text);
    let block = rows
        .iter()
        .filter(|r| r.used >= 4096 && r.hva != 0)
        .max_by_key(|r| r.used)
        .ok_or_else(|| SampleError::NoBlock(text.clone()))?;
    let addresses = block
        .sample_addresses(pages)
        .ok_or_else(|| SampleError::NoBlock(text.clone()))?;
    resample(pid, &addresses).await
}

/// Reads the pages of an earlier sample again, at the same host addresses (a page the
/// guest rewrote meanwhile shows its new content).
pub async fn resample(pid: u32, addresses: &[u64]) -> Result<RamSample, SampleError> {
    let addresses = addresses.to_vec();
    tokio::task::spawn_blocking(move || read_pages(pid, &addresses))
        .await
        .map_err(|e| SampleError::Read {
            pid,
            source: std::io::Error::other(e.to_string()),
        })?
}

fn read_pages(pid: u32, addresses: &[u64]) -> Result<RamSample, SampleError> {
    let mem = std::fs::File::open(format!("/proc/{pid}/mem"))
        .map_err(|source| SampleError::Read { pid, source })?;
    let mut s = RamSample::default();
    let mut page = [0u8; 4096];
    for (i, &at) in addresses.iter().enumerate() {
        mem.read_exact_at(&mut page, at)
            .map_err(|source| SampleError::Read { pid, source })?;
        s.pages += 1;
        if page.iter().all(|b| *b == 0) {
            s.zero += 1;
        } else {
            s.nonzero.extend_from_slice(&page);
            s.nonzero_at.push(i as u32);
        }
    }
    s.addresses = addresses.to_vec();
    Ok(s)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn qemus_ramblock_table_is_read_row_by_row() {
        let text = "              Block Name    PSize              Offset               Used              Total                HVA  RO\n                  pc.ram    4 KiB  0x0000000000000000 0x0000000010000000 0x0000000010000000 0x00007f5e1bc00000  rw\n             vga.vram    4 KiB  0x0000000010080000 0x0000000001000000 0x0000000001000000 0x00007f5e1a800000  rw\n";
        let rows = parse_ramblocks(text);
        assert_eq!(
            rows,
            vec![
                RamBlockRow {
                    name: "pc.ram".into(),
                    used: 0x1000_0000,
                    hva: 0x7f5e_1bc0_0000
                },
                RamBlockRow {
                    name: "vga.vram".into(),
                    used: 0x100_0000,
                    hva: 0x7f5e_1a80_0000
                },
            ]
        );
        assert!(parse_ramblocks("garbage\n\n").is_empty());
    }

    #[test]
    fn sample_addresses_stay_inside_the_block_and_the_address_space() {
        let row = |hva, used| RamBlockRow {
            name: "pc.ram".into(),
            used,
            hva,
        };
        let a = row(0x1000_0000, 256 << 20).sample_addresses(1024).unwrap();
        assert_eq!(a.len(), 1024);
        assert_eq!(a[0], 0x1000_0000);
        assert!(*a.last().unwrap() + 4096 <= 0x1000_0000 + (256 << 20));
        assert!(a.windows(2).all(|w| w[1] - w[0] == 64 * 4096));
        // a block smaller than the sample: each page once
        assert_eq!(row(0, 3 * 4096).sample_addresses(1024).unwrap().len(), 3);
        // what a QEMU not to be believed could say
        assert_eq!(row(u64::MAX - 4095, 8192).sample_addresses(16), None);
        assert_eq!(row(1 << 63, u64::MAX).sample_addresses(1024), None);
        assert_eq!(row(4096, 100).sample_addresses(16), None);
    }
}

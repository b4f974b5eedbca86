//! Reading an image into a [`Manifest`]: every 4 KiB block of its guest-visible content
//! as DATA (hash) or ZERO. Used by the index for each image, and by a source to describe
//! a disk it sends.
//!
//! Owns the read loop only (sequential, 4 MiB requests, qcow2 zero extents skipped
//! without reading); persists nothing.

use std::path::{Path, PathBuf};

use tern_store::ContentHasher;

use crate::image::{ImageFormat, ImageReader, OpenImageError, ReadImageError};
use crate::manifest::{Manifest, BLOCK_BYTES, BLOCK_SIZE};

/// Bytes read per request.
const SCAN_BUFFER_BYTES: usize = 4 << 20;

/// Why an image could not be scanned.
#[derive(Debug, thiserror::Error)]
pub enum ScanImageError {
    #[error("cannot open image {path}")]
    Open {
        path: PathBuf,
        #[source]
        source: OpenImageError,
    },
    #[error("cannot read image {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: ReadImageError,
    },
}

fn open(path: &Path, format: ImageFormat) -> Result<ImageReader, ScanImageError> {
    ImageReader::open(path, format).map_err(|source| ScanImageError::Open {
        path: path.to_path_buf(),
        source,
    })
}

/// The manifest of a whole image (range `0..virtual size`, DATA and ZERO blocks only).
pub fn scan_image(
    path: &Path,
    format: ImageFormat,
    hasher: &ContentHasher,
) -> Result<Manifest, ScanImageError> {
    let mut reader = open(path, format)?;
    scan_reader(&mut reader, hasher)
        .map(|(m, _)| m)
        .map_err(|source| ScanImageError::Read {
            path: path.to_path_buf(),
            source,
        })
}

/// Reads `reader` whole; returns its manifest and the bytes read.
pub(crate) fn scan_reader(
    reader: &mut ImageReader,
    hasher: &ContentHasher,
) -> Result<(Manifest, u64), ReadImageError> {
    let size = reader.size();
    let mut manifest = Manifest::new(0..size).expect("0 is aligned");
    let mut buf = vec![0u8; SCAN_BUFFER_BYTES];
    let mut bytes_read = 0u64;
    let mut at = 0u64;
    for range in reader.data_ranges()? {
        if range.start > at {
            manifest
                .push_zeros(at..range.start.min(size))
                .expect("in order");
        }
        let mut off = range.start;
        while off < range.end {
            let n = ((range.end - off) as usize).min(buf.len());
            reader.read_at(&mut buf[..n], off)?;
            bytes_read += size.min(off + n as u64).saturating_sub(off);
            for (i, block) in buf[..n].chunks_exact(BLOCK_BYTES).enumerate() {
                manifest
                    .push_block(off + (i * BLOCK_BYTES) as u64, block, hasher)
                    .expect("in order");
            }
            off += n as u64;
        }
        at = range.end;
    }
    if size > at {
        manifest.push_zeros(at..size).expect("in order");
    }
    debug_assert_eq!(manifest.unchanged_blocks(), 0);
    Ok((manifest, bytes_read))
}

/// A sample of an image's data blocks ([`sample_image`]): the hashes of the blocks that
/// are not zero, and their bytes one after another (for a compression estimate).
#[derive(Debug, Default)]
pub struct ImageSample {
    pub hashes: Vec<tern_store::Hash>,
    pub data: Vec<u8>,
    /// Blocks read that were all zero.
    pub zero: usize,
}

/// Reads `blocks` 4 KiB blocks spread evenly over the image's data (what qcow2 does not
/// report as zero; a raw file's whole length), for a plan's question to the destination:
/// how much of this disk its chunk index holds. A running VM's image is read as it is
/// (qcow2 through qemu-nbd with force-share): a block it rewrites meanwhile is a sample
/// of either version.
pub fn sample_image(
    path: &Path,
    format: ImageFormat,
    hasher: &ContentHasher,
    blocks: usize,
) -> Result<ImageSample, ScanImageError> {
    let mut reader = open(path, format)?;
    let read_err = |source| ScanImageError::Read {
        path: path.to_path_buf(),
        source,
    };
    let ranges = reader.data_ranges().map_err(read_err)?;
    let total: u64 = ranges.iter().map(|r| (r.end - r.start) / BLOCK_SIZE).sum();
    let mut out = ImageSample::default();
    if total == 0 || blocks == 0 {
        return Ok(out);
    }
    // sample i is data block i·total/blocks (every block when there are fewer)
    let want = (blocks as u64).min(total);
    let nth = |i: u64| (u128::from(i) * u128::from(total) / u128::from(want)) as u64;
    let mut buf = vec![0u8; BLOCK_BYTES];
    let mut i = 0u64; // the next sample
    let mut before = 0u64; // data blocks in the ranges passed
    for r in &ranges {
        let n = (r.end - r.start) / BLOCK_SIZE;
        while i < want && nth(i) < before + n {
            reader
                .read_at(&mut buf, r.start + (nth(i) - before) * BLOCK_SIZE)
                .map_err(read_err)?;
            if buf.iter().all(|&b| b == 0) {
                out.zero += 1;
            } else {
                out.hashes.push(hasher.hash(&buf));
                out.data.extend_from_slice(&buf);
            }
            i += 1;
        }
        before += n;
    }
    Ok(out)
}

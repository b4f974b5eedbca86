//! Reading an image into a [`Manifest`]: every 4 KiB block of its guest-visible content
//! as DATA (hash) or ZERO. Used by the index for each image, and by a source to describe
//! a disk it sends.
//!
//! Owns the read loop only (sequential, 4 MiB requests, qcow2 zero extents skipped
//! without reading); persists nothing.

use std::path::{Path, PathBuf};

use tern_store::ContentHasher;

use crate::image::{ImageFormat, ImageReader, OpenImageError, ReadImageError};
use crate::manifest::{Manifest, BLOCK_BYTES};

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

/// The manifest of a whole image (range `0..virtual size`, DATA and ZERO blocks only).
pub fn scan_image(
    path: &Path,
    format: ImageFormat,
    hasher: &ContentHasher,
) -> Result<Manifest, ScanImageError> {
    let mut reader = ImageReader::open(path, format).map_err(|source| ScanImageError::Open {
        path: path.to_path_buf(),
        source,
    })?;
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

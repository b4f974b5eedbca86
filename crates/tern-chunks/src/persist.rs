//! The index's on-disk format: one file per indexed image, `DIR/images/<id>.tci`, written
//! to `<id>.tmp`, fsynced and renamed over the old one (then the directory fsynced), so a
//! crash leaves either the old or the new file, never a mix.
//!
//! ```text
//!  offset   size  field (integers little-endian)
//!  0        8     magic "TERNCIDX"
//!  8        4     version (1)
//!  12       4     R = record length
//!  16       8     B = body length
//!  24       8     key id of the cluster key that made the hashes (ContentHasher::key_id)
//!  32       R     record: id u32, format u8 (1 raw, 2 qcow2), flags u8 (bit 0: needs
//!                 re-index), virtual size u64, data blocks u64, zero blocks u64,
//!                 stamp count u16, then per stamp (the image, then its backing files):
//!                 dev u64, ino u64, size u64, mtime ns i64, ctime ns i64, path len u32, path
//!  32+R     16    BLAKE3 of bytes [0, 32+R)        (header checksum)
//!  48+R     B     body: the image's Manifest encoding over 0..virtual size (DATA + ZERO)
//!  48+R+B   16    BLAKE3 of the body               (body checksum)
//! ```
//!
//! Two checksums so that a damaged body still leaves a trusted record: the image's path
//! is known and it is re-indexed; a damaged header makes the file unusable (it is renamed
//! to `<id>.corrupt` and reported). The map from hash to location is not stored: it is
//! rebuilt from the bodies on open (0.2 s per million entries, debug build).
//!
//! Owns encoding, decoding and atomic writes; must not touch the in-memory index.

use std::fs::File;
use std::io::Write;
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::path::{Path, PathBuf};

use crate::image::{FileStamp, ImageFormat};
use crate::index::{ImageId, ImageRecord};
use crate::manifest::{Manifest, Reader};

const MAGIC: [u8; 8] = *b"TERNCIDX";
pub(crate) const VERSION: u32 = 1;
const PREFIX: usize = 32;
const SUM: usize = 16;
const FLAG_NEEDS_REINDEX: u8 = 1;

pub(crate) const EXT: &str = "tci";
pub(crate) const TMP_EXT: &str = "tmp";
pub(crate) const CORRUPT_EXT: &str = "corrupt";

/// Why an index file was not loaded as it is.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IndexFileProblem {
    #[error("{file}: not a tern chunk index file, or truncated within its header; moved aside, its image is forgotten (import it again)")]
    Unreadable { file: PathBuf },
    #[error(
        "{file}: header checksum mismatch; moved aside, its image is forgotten (import it again)"
    )]
    HeaderCorrupt { file: PathBuf },
    #[error(
        "{file}: written by index format version {version}, this build reads {VERSION}; left alone"
    )]
    UnsupportedVersion { file: PathBuf, version: u32 },
    #[error("{file}: block list of {image} is damaged ({detail}); it will be re-indexed on the next refresh")]
    BodyCorrupt {
        file: PathBuf,
        image: PathBuf,
        detail: String,
    },
    #[error("{file}: hashes of {image} were made with another cluster key; it will be re-indexed on the next refresh")]
    KeyChanged { file: PathBuf, image: PathBuf },
}

/// A file's content as far as it can be trusted.
pub enum Loaded {
    /// Record and block list intact.
    Ok(ImageRecord, Manifest),
    /// The record is intact, the block list is not usable (or was never written because
    /// the image awaits re-indexing): keep the record, re-index the image.
    RecordOnly(ImageRecord, Option<IndexFileProblem>),
    /// Nothing usable.
    Bad(IndexFileProblem),
}

fn sum(bytes: &[u8]) -> [u8; SUM] {
    let mut out = [0u8; SUM];
    out.copy_from_slice(&blake3::hash(bytes).as_bytes()[..SUM]);
    out
}

pub(crate) fn file_name(id: ImageId) -> String {
    format!("{:08x}.{EXT}", id.0)
}

/// The id a file name stands for, if it is an index file name.
pub(crate) fn parse_file_name(name: &str) -> Option<ImageId> {
    let stem = name.strip_suffix(&format!(".{EXT}"))?;
    if stem.len() != 8 {
        return None;
    }
    u32::from_str_radix(stem, 16).ok().map(ImageId)
}

fn encode_record(r: &ImageRecord, out: &mut Vec<u8>) {
    out.extend_from_slice(&r.id.0.to_le_bytes());
    out.push(r.format.code());
    out.push(if r.needs_reindex {
        FLAG_NEEDS_REINDEX
    } else {
        0
    });
    out.extend_from_slice(&r.virtual_size.to_le_bytes());
    out.extend_from_slice(&r.data_blocks.to_le_bytes());
    out.extend_from_slice(&r.zero_blocks.to_le_bytes());
    out.extend_from_slice(&(r.stamps.len() as u16).to_le_bytes());
    for s in &r.stamps {
        out.extend_from_slice(&s.dev.to_le_bytes());
        out.extend_from_slice(&s.ino.to_le_bytes());
        out.extend_from_slice(&s.size.to_le_bytes());
        out.extend_from_slice(&s.mtime_ns.to_le_bytes());
        out.extend_from_slice(&s.ctime_ns.to_le_bytes());
        let p = s.path.as_os_str().as_bytes();
        out.extend_from_slice(&(p.len() as u32).to_le_bytes());
        out.extend_from_slice(p);
    }
}

fn decode_record(bytes: &[u8]) -> Option<ImageRecord> {
    let mut r = Reader { bytes, pos: 0 };
    let mut take = |n: usize| r.take(n).ok();
    let id = ImageId(u32::from_le_bytes(take(4)?.try_into().ok()?));
    let format = ImageFormat::from_code(take(1)?[0])?;
    let flags = take(1)?[0];
    let virtual_size = u64::from_le_bytes(take(8)?.try_into().ok()?);
    let data_blocks = u64::from_le_bytes(take(8)?.try_into().ok()?);
    let zero_blocks = u64::from_le_bytes(take(8)?.try_into().ok()?);
    let n = u16::from_le_bytes(take(2)?.try_into().ok()?);
    let mut stamps = Vec::with_capacity(usize::from(n).min(64));
    for _ in 0..n {
        let dev = u64::from_le_bytes(take(8)?.try_into().ok()?);
        let ino = u64::from_le_bytes(take(8)?.try_into().ok()?);
        let size = u64::from_le_bytes(take(8)?.try_into().ok()?);
        let mtime_ns = i64::from_le_bytes(take(8)?.try_into().ok()?);
        let ctime_ns = i64::from_le_bytes(take(8)?.try_into().ok()?);
        let len = u32::from_le_bytes(take(4)?.try_into().ok()?);
        let path = PathBuf::from(std::ffi::OsString::from_vec(
            take(usize::try_from(len).ok()?)?.to_vec(),
        ));
        stamps.push(FileStamp {
            path,
            dev,
            ino,
            size,
            mtime_ns,
            ctime_ns,
        });
    }
    if r.remaining() != 0 || stamps.is_empty() {
        return None;
    }
    Some(ImageRecord {
        id,
        path: stamps[0].path.clone(),
        format,
        virtual_size,
        data_blocks,
        zero_blocks,
        stamps,
        needs_reindex: flags & FLAG_NEEDS_REINDEX != 0,
    })
}

/// The whole file for `record` and its block list (`None`: record only, flagged for
/// re-indexing).
pub fn encode_file(record: &ImageRecord, key_id: u64, manifest: Option<&Manifest>) -> Vec<u8> {
    let mut rec = Vec::new();
    encode_record(record, &mut rec);
    let body = manifest.map(Manifest::encode).unwrap_or_default();
    let mut out = Vec::with_capacity(PREFIX + rec.len() + SUM + body.len() + SUM);
    out.extend_from_slice(&MAGIC);
    out.extend_from_slice(&VERSION.to_le_bytes());
    out.extend_from_slice(&(rec.len() as u32).to_le_bytes());
    out.extend_from_slice(&(body.len() as u64).to_le_bytes());
    out.extend_from_slice(&key_id.to_le_bytes());
    out.extend_from_slice(&rec);
    let header_sum = sum(&out);
    out.extend_from_slice(&header_sum);
    out.extend_from_slice(&body);
    out.extend_from_slice(&sum(&body));
    out
}

/// Parses a file's bytes, trusting only what its checksums cover.
pub fn decode_file(file: &Path, bytes: &[u8], key_id: u64) -> Loaded {
    let file = file.to_path_buf();
    if bytes.len() < PREFIX || bytes[..8] != MAGIC {
        return Loaded::Bad(IndexFileProblem::Unreadable { file });
    }
    let le32 = |at: usize| u32::from_le_bytes(bytes[at..at + 4].try_into().expect("4 bytes"));
    let le64 = |at: usize| u64::from_le_bytes(bytes[at..at + 8].try_into().expect("8 bytes"));
    let version = le32(8);
    if version != VERSION {
        return Loaded::Bad(IndexFileProblem::UnsupportedVersion { file, version });
    }
    let rec_len = le32(12) as usize;
    let body_len = le64(16);
    let file_key = le64(24);
    let rec_end = PREFIX + rec_len;
    if bytes.len() < rec_end + SUM {
        return Loaded::Bad(IndexFileProblem::Unreadable { file });
    }
    if sum(&bytes[..rec_end]) != bytes[rec_end..rec_end + SUM] {
        return Loaded::Bad(IndexFileProblem::HeaderCorrupt { file });
    }
    let Some(record) = decode_record(&bytes[PREFIX..rec_end]) else {
        return Loaded::Bad(IndexFileProblem::HeaderCorrupt { file });
    };
    let body_problem = |detail: String| IndexFileProblem::BodyCorrupt {
        file: file.clone(),
        image: record.path.clone(),
        detail,
    };
    let body_start = rec_end + SUM;
    let expected_len = u64::try_from(body_start + SUM)
        .ok()
        .and_then(|n| n.checked_add(body_len));
    if expected_len != Some(bytes.len() as u64) {
        let p = body_problem(format!(
            "file is {} bytes, its header says {}",
            bytes.len(),
            expected_len.map_or("more than 2^64".to_string(), |n| n.to_string())
        ));
        return Loaded::RecordOnly(record, Some(p));
    }
    let body = &bytes[body_start..bytes.len() - SUM];
    if sum(body) != bytes[bytes.len() - SUM..] {
        let p = body_problem("checksum mismatch".into());
        return Loaded::RecordOnly(record, Some(p));
    }
    if record.needs_reindex {
        return Loaded::RecordOnly(record, None);
    }
    if file_key != key_id {
        let p = IndexFileProblem::KeyChanged {
            file,
            image: record.path.clone(),
        };
        return Loaded::RecordOnly(record, Some(p));
    }
    match Manifest::decode(body) {
        Ok(m)
            if m.range() == (0..record.virtual_size)
                && m.data_blocks() == record.data_blocks
                && m.zero_blocks() == record.zero_blocks =>
        {
            Loaded::Ok(record, m)
        }
        Ok(_) => {
            let p = body_problem("block list does not match the record".into());
            Loaded::RecordOnly(record, Some(p))
        }
        Err(e) => {
            let p = body_problem(e.to_string());
            Loaded::RecordOnly(record, Some(p))
        }
    }
}

/// Writes `bytes` as `dir/name` atomically and durably: temporary file, fsync, rename,
/// fsync of the directory.
pub(crate) fn write_atomic(dir: &Path, name: &str, bytes: &[u8]) -> std::io::Result<()> {
    let tmp = dir.join(format!("{name}.{TMP_EXT}"));
    let mut f = File::create(&tmp)?;
    f.write_all(bytes)?;
    f.sync_all()?;
    drop(f);
    std::fs::rename(&tmp, dir.join(name))?;
    File::open(dir)?.sync_all()
}

/// Removes `dir/name` durably; a missing file is fine.
pub(crate) fn remove(dir: &Path, name: &str) -> std::io::Result<()> {
    match std::fs::remove_file(dir.join(name)) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e),
    }
    File::open(dir)?.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record() -> ImageRecord {
        let stamp = |p: &str, i: u64| FileStamp {
            path: PathBuf::from(p),
            dev: 1,
            ino: i,
            size: 3 * 4096,
            mtime_ns: 1_700_000_000_123_456_789,
            ctime_ns: -5,
        };
        ImageRecord {
            id: ImageId(7),
            path: PathBuf::from("/images/vm,1.qcow2"),
            format: ImageFormat::Qcow2,
            virtual_size: 3 * 4096,
            data_blocks: 1,
            zero_blocks: 2,
            stamps: vec![stamp("/images/vm,1.qcow2", 2), stamp("/images/base.raw", 3)],
            needs_reindex: false,
        }
    }

    fn manifest() -> Manifest {
        let mut m = Manifest::new(0..3 * 4096).unwrap();
        m.push_zeros(0..8192).unwrap();
        m.push_data(8192, [9; 16]).unwrap();
        m
    }

    #[test]
    fn file_round_trips() {
        let bytes = encode_file(&record(), 42, Some(&manifest()));
        match decode_file(Path::new("f"), &bytes, 42) {
            Loaded::Ok(r, m) => {
                assert_eq!(r, record());
                assert_eq!(m, manifest());
            }
            _ => panic!("did not load"),
        }
        assert_eq!(
            parse_file_name(&file_name(ImageId(0xab))),
            Some(ImageId(0xab))
        );
        assert_eq!(parse_file_name("000000ab.tmp"), None);
    }

    #[test]
    fn every_truncation_and_every_bit_flip_is_detected() {
        let bytes = encode_file(&record(), 42, Some(&manifest()));
        for cut in 0..bytes.len() {
            assert!(
                !matches!(
                    decode_file(Path::new("f"), &bytes[..cut], 42),
                    Loaded::Ok(..)
                ),
                "truncation to {cut} bytes not detected"
            );
        }
        for i in 0..bytes.len() {
            for bit in 0..8 {
                let mut b = bytes.clone();
                b[i] ^= 1 << bit;
                if let Loaded::Ok(..) = decode_file(Path::new("f"), &b, 42) {
                    panic!("flip of bit {bit} of byte {i} not detected");
                }
            }
        }
    }

    #[test]
    fn damaged_body_keeps_the_record_and_another_key_forces_reindex() {
        let mut bytes = encode_file(&record(), 42, Some(&manifest()));
        let n = bytes.len();
        bytes[n - 20] ^= 0xff;
        match decode_file(Path::new("f"), &bytes, 42) {
            Loaded::RecordOnly(r, Some(IndexFileProblem::BodyCorrupt { .. })) => {
                assert_eq!(r.path, record().path)
            }
            _ => panic!("expected the record with a body problem"),
        }
        let bytes = encode_file(&record(), 42, Some(&manifest()));
        assert!(matches!(
            decode_file(Path::new("f"), &bytes, 43),
            Loaded::RecordOnly(_, Some(IndexFileProblem::KeyChanged { .. }))
        ));
    }
}

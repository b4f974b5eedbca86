//! Target `chunk_index_file`: the chunk index's per-image files (layout in
//! crates/tern-chunks/src/persist.rs).
//!
//! Input: a mode byte, then the file. Mode bit 0 makes both checksums valid before
//! decoding (else random bytes never get past the header checksum), bit 1 sets the body
//! length field to what the file holds, bit 2 decodes with the file's own key id (else 42).

use std::path::Path;

use tern_chunks::fuzzing::{decode_file, encode_file, Loaded};

use crate::manifest;

/// Offsets in the file (persist.rs).
const PREFIX: usize = 32;
const SUM: usize = 16;
const FLAGS_AT: usize = PREFIX + 5;
/// The key id the seeds are made with.
pub(crate) const SEED_KEY_ID: u64 = 42;

fn sum(bytes: &[u8]) -> [u8; SUM] {
    let mut out = [0u8; SUM];
    out.copy_from_slice(&blake3::hash(bytes).as_bytes()[..SUM]);
    out
}

fn le32(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().expect("4 bytes"))
}

fn le64(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().expect("8 bytes"))
}

/// Rewrites the length and checksum fields of a file as the mode asks.
fn fix_up(mode: u8, file: &mut [u8]) {
    if file.len() < PREFIX {
        return;
    }
    let rec_end = PREFIX + le32(file, 12) as usize;
    if mode & 2 != 0 && file.len() >= rec_end + 2 * SUM {
        let body_len = (file.len() - rec_end - 2 * SUM) as u64;
        file[16..24].copy_from_slice(&body_len.to_le_bytes());
    }
    if mode & 1 != 0 && file.len() >= rec_end + SUM {
        let s = sum(&file[..rec_end]);
        file[rec_end..rec_end + SUM].copy_from_slice(&s);
        if file.len() >= rec_end + 2 * SUM {
            let n = file.len();
            let s = sum(&file[rec_end + SUM..n - SUM]);
            file[n - SUM..].copy_from_slice(&s);
        }
    }
}

pub(crate) fn run(data: &[u8]) {
    let Some((&mode, file)) = data.split_first() else {
        return;
    };
    let mut file = file.to_vec();
    fix_up(mode, &mut file);
    let key = if mode & 4 != 0 && file.len() >= PREFIX {
        le64(&file, 24)
    } else {
        SEED_KEY_ID
    };
    let name = Path::new("fuzz.tci");
    match decode_file(name, &file, key) {
        Loaded::Ok(rec, m) => {
            assert!(
                !rec.needs_reindex(),
                "a record awaiting re-index loaded its blocks"
            );
            assert_eq!(m.range(), 0..rec.virtual_size());
            assert_eq!(m.data_blocks(), rec.data_blocks());
            assert_eq!(m.zero_blocks(), rec.zero_blocks());
            let _ = (rec.file_size(), rec.mtime_ns(), rec.backing_files().count());
            manifest::check(&m);
            let again = encode_file(&rec, key, Some(&m));
            match decode_file(name, &again, key) {
                Loaded::Ok(r2, m2) => {
                    assert_eq!(r2, rec, "record changed through encode/decode");
                    assert_eq!(m2, m, "block list changed through encode/decode");
                }
                _ => panic!("a re-encoded file does not load"),
            }
            // the encoding is canonical but for flag bits this build does not know
            if file[FLAGS_AT] & !1 == 0 {
                assert_eq!(again, file, "a loaded file re-encodes differently");
            }
        }
        Loaded::RecordOnly(rec, problem) => {
            if problem.is_none() {
                assert!(rec.needs_reindex(), "record only, and no problem given");
            }
            let _ = (rec.file_size(), rec.mtime_ns(), rec.backing_files().count());
            let again = encode_file(&rec, key, None);
            match decode_file(name, &again, key) {
                Loaded::RecordOnly(r2, _) => assert_eq!(r2, rec, "record changed"),
                _ => panic!("a re-encoded record does not load as a record"),
            }
        }
        Loaded::Bad(_) => {}
    }
}

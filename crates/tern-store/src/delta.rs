//! A page as the spans that changed against its previous version.
//!
//! Format: a sequence of spans, each `varint gap | varint len | len bytes`, where `gap`
//! counts unchanged bytes since the end of the previous span (or the page start).
//! Changed runs closer than [`MERGE_GAP`] bytes are sent as one span (a varint pair costs
//! about as much). Applying a delta to the wrong base is caught by the caller, which
//! checks the result's content hash.

/// Unchanged runs shorter than this are carried inside a span.
pub const MERGE_GAP: usize = 8;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum DeltaError {
    #[error("delta is truncated")]
    Truncated,
    #[error("delta spans past the end of the {0}-byte page")]
    OutOfRange(usize),
}

/// Appends the delta from `old` to `new` (same length) to `out`; `false` (and `out`
/// left as it was) when it would exceed `limit` bytes: send the page instead.
pub fn diff(old: &[u8], new: &[u8], limit: usize, out: &mut Vec<u8>) -> bool {
    assert_eq!(
        old.len(),
        new.len(),
        "delta between pages of different sizes"
    );
    let start_len = out.len();
    let n = new.len();
    let mut pos = 0; // end of the previous span
    let mut i = 0;
    while i < n {
        // skip equal bytes, 8 at a time where possible
        while i + 8 <= n && old[i..i + 8] == new[i..i + 8] {
            i += 8;
        }
        while i < n && old[i] == new[i] {
            i += 1;
        }
        if i >= n {
            break;
        }
        let begin = i;
        // extend the span until MERGE_GAP equal bytes in a row
        let mut end = i + 1;
        let mut j = end;
        while j < n {
            if old[j] != new[j] {
                end = j + 1;
                j += 1;
            } else if j - end >= MERGE_GAP {
                break;
            } else {
                j += 1;
            }
        }
        put_varint(out, (begin - pos) as u64);
        put_varint(out, (end - begin) as u64);
        out.extend_from_slice(&new[begin..end]);
        if out.len() - start_len > limit {
            out.truncate(start_len);
            return false;
        }
        pos = end;
        i = end;
    }
    true
}

/// Writes `base` with `delta` applied into `out` (same length as `base`).
pub fn apply(base: &[u8], delta: &[u8], out: &mut [u8]) -> Result<(), DeltaError> {
    let n = base.len();
    out.copy_from_slice(base);
    let mut d = delta;
    let mut pos = 0usize;
    while !d.is_empty() {
        let gap = get_varint(&mut d)? as usize;
        let len = get_varint(&mut d)? as usize;
        let begin = pos.checked_add(gap).ok_or(DeltaError::OutOfRange(n))?;
        let end = begin.checked_add(len).ok_or(DeltaError::OutOfRange(n))?;
        if end > n {
            return Err(DeltaError::OutOfRange(n));
        }
        if d.len() < len {
            return Err(DeltaError::Truncated);
        }
        out[begin..end].copy_from_slice(&d[..len]);
        d = &d[len..];
        pos = end;
    }
    Ok(())
}

fn put_varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

fn get_varint(d: &mut &[u8]) -> Result<u64, DeltaError> {
    let mut v = 0u64;
    for shift in (0..64).step_by(7) {
        let (&b, rest) = d.split_first().ok_or(DeltaError::Truncated)?;
        *d = rest;
        v |= u64::from(b & 0x7f) << shift;
        if b & 0x80 == 0 {
            return Ok(v);
        }
    }
    Err(DeltaError::Truncated)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn roundtrip(old: &[u8], new: &[u8]) -> usize {
        let mut d = Vec::new();
        assert!(diff(old, new, usize::MAX, &mut d));
        let mut out = vec![0u8; old.len()];
        apply(old, &d, &mut out).unwrap();
        assert_eq!(out, new);
        d.len()
    }

    #[test]
    fn small_changes_make_small_deltas() {
        let old: Vec<u8> = (0..4096).map(|i| (i * 7 % 251) as u8).collect();
        assert_eq!(roundtrip(&old, &old), 0);
        let mut new = old.clone();
        new[0..8].copy_from_slice(&42u64.to_le_bytes());
        assert!(roundtrip(&old, &new) <= 11);
        new[4000] ^= 1;
        new[4095] ^= 1;
        assert!(roundtrip(&old, &new) <= 11 + 4 + 96);
        let random: Vec<u8> = (0..4096u32)
            .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8)
            .collect();
        let mut d = Vec::new();
        assert!(
            !diff(&old, &random, 2048, &mut d),
            "a rewritten page is not worth a delta"
        );
        assert!(d.is_empty());
    }

    #[test]
    fn bad_deltas_are_errors() {
        let base = [0u8; 64];
        let mut out = [0u8; 64];
        assert_eq!(apply(&base, &[0x80], &mut out), Err(DeltaError::Truncated));
        assert_eq!(
            apply(&base, &[60, 5, 1, 2, 3, 4, 5], &mut out),
            Err(DeltaError::OutOfRange(64))
        );
        assert_eq!(
            apply(&base, &[0, 5, 1], &mut out),
            Err(DeltaError::Truncated)
        );
        assert_eq!(
            apply(
                &base,
                &[0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x01, 1],
                &mut out
            ),
            Err(DeltaError::OutOfRange(64))
        );
    }

    proptest! {
        #[test]
        fn apply_inverts_diff(old in proptest::collection::vec(any::<u8>(), 0..600),
                              edits in proptest::collection::vec((any::<u16>(), any::<u8>()), 0..40)) {
            let mut new = old.clone();
            for (at, v) in edits {
                if !new.is_empty() {
                    let i = at as usize % new.len();
                    new[i] = v;
                }
            }
            roundtrip(&old, &new);
        }

        #[test]
        fn apply_never_panics(base in proptest::collection::vec(any::<u8>(), 0..100),
                              delta in proptest::collection::vec(any::<u8>(), 0..100)) {
            let mut out = vec![0u8; base.len()];
            let _ = apply(&base, &delta, &mut out);
        }
    }
}

//! Target `stream_parser`: QEMU's migration stream and its return path.
//!
//! The input is fed after a valid header when its first byte is odd (and it does not start
//! with a header of its own), so mutations reach the RAM and tail states quickly. A first
//! byte [`RESUMED`] is postcopy recovery: `RESUMED | be16 n | n bytes of the first
//! connection (from its header) | the new connection`, which a [`Parser::resumed`] of the
//! first connection's parser reads, wherever that one stopped. The same input goes to the
//! return-path parser.

use bytes::Bytes;
use tern_qemu::rp::{encode_rp, parse_rp};
use tern_qemu::stream::{Encoder, NameMode, Parser};

use crate::input::Input;

/// A valid stream header: magic, version 3, configuration section "pc-10x".
pub(crate) const HEADER: &[u8] = b"QEVM\x00\x00\x00\x03\x07\x00\x00\x00\x06pc-10x";

/// First byte of a resumed-stream input (even: no header is prepended; return-path
/// messages start with 0, types being below 256).
pub(crate) const RESUMED: u8 = 0x02;

pub(crate) fn run(data: &[u8]) {
    if data.first() == Some(&RESUMED) {
        let mut input = Input::new(&data[1..]);
        let first = input.counted();
        let (p, _) = walk(Parser::new(), first);
        let (r, _) = walk(p.resumed(), input.rest());
        let _ = r.finish();
    } else {
        let mut input = Vec::new();
        if data.first().is_some_and(|b| b & 1 == 1) && !data.starts_with(&HEADER[..4]) {
            input.extend_from_slice(HEADER);
        }
        input.extend_from_slice(data);
        let (p, _) = walk(Parser::new(), &input);
        let _ = p.finish();
    }

    let mut rest = data;
    while let Ok(Some((msg, n))) = parse_rp(rest) {
        assert!(
            n >= 4 && n <= rest.len(),
            "return-path message of {n} bytes"
        );
        assert_eq!(parse_rp(&rest[..n - 1]), Ok(None), "{msg:?} cut short");
        let mut again = Vec::new();
        encode_rp(&msg, &mut again);
        // block names are UTF-8 or refused: every message re-encodes to its bytes
        assert_eq!(again, &rest[..n], "{msg:?} re-encodes differently");
        rest = &rest[n..];
    }
}

/// Parses `input` with `start` as far as it goes: what parses re-encodes to the same
/// bytes, and parsing from shared `Bytes` gives the same items. Returns the parser where it
/// stopped and how many bytes it took.
pub(crate) fn walk(start: Parser, input: &[u8]) -> (Parser, usize) {
    let mut p = start.clone();
    let mut enc = Encoder::new(4096);
    let mut out = Vec::new();
    let mut items = Vec::new();
    let mut pos = 0;
    while let Ok(Some((item, n))) = p.parse(&input[pos..]) {
        assert!(
            n > 0 && n <= input.len() - pos,
            "item of {n} bytes at {pos}"
        );
        enc.encode(&item, NameMode::AsInput, &mut out);
        items.push(item);
        pos += n;
    }
    assert_eq!(
        &out[..],
        &input[..pos],
        "re-encoding differs from what was parsed"
    );
    assert_eq!(p.offset(), pos as u64);

    // the same items from shared bytes (page data sliced, not copied)
    let shared = Bytes::copy_from_slice(input);
    let mut q = start;
    let mut at = 0;
    for want in &items {
        let (got, n) = q
            .parse_bytes(&shared.slice(at..))
            .expect("parse_bytes refused what parse accepted")
            .expect("parse_bytes wants more than parse did");
        assert_eq!(&got, want, "parse_bytes differs from parse at {at}");
        at += n;
    }
    (p, pos)
}

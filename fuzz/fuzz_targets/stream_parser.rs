//! QEMU stream parser and return-path parser on arbitrary bytes: never panic, and what
//! parses re-encodes to the same bytes. The input is fed after a valid header half the
//! time, so the fuzzer reaches the RAM and tail states quickly.
#![no_main]
use libfuzzer_sys::fuzz_target;
use tern_qemu::rp::parse_rp;
use tern_qemu::stream::{Encoder, NameMode, Parser};

const HEADER: &[u8] = b"QEVM\x00\x00\x00\x03\x07\x00\x00\x00\x06pc-10x";

fuzz_target!(|data: &[u8]| {
    let mut input = Vec::new();
    if data.first().is_some_and(|b| b & 1 == 1) {
        input.extend_from_slice(HEADER);
    }
    input.extend_from_slice(data);
    let mut p = Parser::new();
    let mut enc = Encoder::new(4096);
    let mut out = Vec::new();
    let mut pos = 0;
    while let Ok(Some((item, n))) = p.parse(&input[pos..]) {
        enc.encode(&item, NameMode::AsInput, &mut out);
        pos += n;
    }
    assert_eq!(&out[..], &input[..pos], "re-encoding differs from what was parsed");
    let _ = p.finish();
    let mut rest = data;
    while let Ok(Some((_, n))) = parse_rp(rest) {
        rest = &rest[n..];
    }
});

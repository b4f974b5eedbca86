//! QEMU migration stream and return path: what parses re-encodes to the same bytes.
//! The body, and the properties it asserts, are `tern_fuzz::stream_parser`.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| tern_fuzz::stream_parser(data));

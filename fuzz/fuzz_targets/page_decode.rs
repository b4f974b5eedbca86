//! The destination's page decoding and memory digest, fed Pages and Content frames.
//! The body, and the properties it asserts, are `tern_fuzz::page_decode`.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| tern_fuzz::page_decode(data));

//! tern frames: decode/encode round trips, plain, as segments and compressed.
//! The body, and the properties it asserts, are `tern_fuzz::frames`.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| tern_fuzz::frames(data));

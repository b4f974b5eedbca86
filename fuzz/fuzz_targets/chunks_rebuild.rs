//! Rebuilding a disk piece from a manifest and received runs, true or corrupted.
//! The body, and the properties it asserts, are `tern_fuzz::chunks_rebuild`.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| tern_fuzz::chunks_rebuild(data));

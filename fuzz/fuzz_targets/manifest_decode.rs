//! Disk manifests: what decodes re-encodes identically, blocks within the range.
//! The body, and the properties it asserts, are `tern_fuzz::manifest_decode`.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| tern_fuzz::manifest_decode(data));

//! Chunk index files (checksums fixed up): what loads agrees with its record.
//! The body, and the properties it asserts, are `tern_fuzz::chunk_index_file`.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| tern_fuzz::chunk_index_file(data));

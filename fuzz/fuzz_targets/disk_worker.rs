//! The destination's disk worker on arbitrary disk frames (see `tern_fuzz::disk_worker`).
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| tern_fuzz::disk_worker(data));

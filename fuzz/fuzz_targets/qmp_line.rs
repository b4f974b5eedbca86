//! QMP lines: replies, events, greeting versions, query-migrate answers.
//! The body, and the properties it asserts, are `tern_fuzz::qmp_line`.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| tern_fuzz::qmp_line(data));

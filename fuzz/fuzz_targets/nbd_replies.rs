//! NBD option and transmission replies: decoded fields re-encode to the input.
//! The body, and the properties it asserts, are `tern_fuzz::nbd_replies`.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| tern_fuzz::nbd_replies(data));

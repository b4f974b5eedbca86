//! Page deltas: apply on any (base, delta); diff then apply gives the page back.
//! The body, and the properties it asserts, are `tern_fuzz::delta_apply`.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| tern_fuzz::delta_apply(data));

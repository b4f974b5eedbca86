//! Target `delta_apply`: page deltas (`tern_store::delta`).
//!
//! Input: `be16 base length | base | be16 delta length | delta | edits`. The base and the
//! delta go to `apply` as they are; then an old page (the base, repeated to the page
//! length the edits' first byte picks) and a new page (the old one with the edits) go
//! through `diff` and back through `apply`.

use tern_store::delta::{apply, diff, DeltaError};

use crate::input::Input;

pub(crate) fn run(data: &[u8]) {
    let mut input = Input::new(data);
    let base = input.counted();
    let delta = input.counted();

    let mut out = vec![0xa5u8; base.len()];
    match apply(base, delta, &mut out) {
        Ok(()) => {
            // what applied can be re-derived, and re-applied to the same result
            let mut again = Vec::new();
            assert!(diff(base, &out, usize::MAX, &mut again));
            let mut back = vec![0u8; base.len()];
            apply(base, &again, &mut back).expect("diff made a delta apply refuses");
            assert_eq!(back, out, "diff of an applied delta gives another page");
        }
        Err(DeltaError::OutOfRange(n)) => assert_eq!(n, base.len()),
        Err(DeltaError::Truncated) => {}
    }

    // diff then apply, on pages derived from the input
    let len = match input.u8() % 4 {
        0 => 4096,
        1 => 512,
        2 => 64,
        _ => usize::from(input.u8()),
    };
    let old: Vec<u8> = if base.is_empty() {
        vec![0; len]
    } else {
        base.iter().copied().cycle().take(len).collect()
    };
    let mut new = old.clone();
    let limit = match input.u8() % 3 {
        0 => usize::MAX,
        1 => len / 4,
        _ => usize::from(input.u16()),
    };
    while !input.is_empty() && len > 0 {
        // (position, byte, run): set `run` bytes from `position`
        let at = usize::from(input.u16()) % len;
        let v = input.u8();
        let run = usize::from(input.u8() % 32);
        for b in new.iter_mut().skip(at).take(run.max(1)) {
            *b = v;
        }
    }
    let prefix = b"earlier deltas";
    let mut d = prefix.to_vec();
    if diff(&old, &new, limit, &mut d) {
        assert_eq!(&d[..prefix.len()], prefix, "diff touched what out held");
        let delta = &d[prefix.len()..];
        assert!(
            delta.len() <= limit,
            "{} bytes over the {limit} limit",
            delta.len()
        );
        assert_eq!(delta.is_empty(), old == new);
        let mut back = vec![0u8; len];
        apply(&old, delta, &mut back).expect("diff made a delta apply refuses");
        assert_eq!(back, new, "apply(diff(old, new)) is not new");
    } else {
        assert_eq!(d, prefix, "diff over its limit left bytes in out");
        // spans cost at most 4 bytes each beyond their data, and are 8 bytes apart
        assert!(limit < 2 * len + 8, "refused a delta under {limit} bytes");
    }
}

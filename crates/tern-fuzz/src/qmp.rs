//! Target `qmp_line`: what QEMU writes on its QMP socket, line by line as the client's
//! reader task takes it, `query-migrate`'s answer, and `x-query-ramblock`'s table (the
//! host addresses a RAM sample reads).

use serde_json::Value;
use tern_qemu::qmp::{parse_qmp_line_for_fuzzing, MigrationInfo};
use tern_qemu::ramsample::parse_ramblocks;

pub(crate) fn run(data: &[u8]) {
    let text = String::from_utf8_lossy(data);
    for line in text.split('\n') {
        let line = line.strip_suffix('\r').unwrap_or(line);
        let got = parse_qmp_line_for_fuzzing(line);
        let Ok(v) = serde_json::from_str::<Value>(line) else {
            assert!(got.is_err(), "not JSON, yet accepted: {line:?}");
            continue;
        };
        // refused: a reply (an id, not an event) with neither return nor error
        let refused = v.get("event").and_then(Value::as_str).is_none()
            && v.get("id").and_then(Value::as_u64).is_some()
            && v.get("return").is_none()
            && v.get("error").is_none();
        assert_eq!(got.is_err(), refused, "{line:?}: {got:?}");
        let _ = MigrationInfo::from_json(&v);
        if let Some(r) = v.get("return") {
            let _ = MigrationInfo::from_json(r);
            if let Some(text) = r.get("human-readable-text").and_then(Value::as_str) {
                for row in parse_ramblocks(text) {
                    if let Some(a) = row.sample_addresses(1024) {
                        assert!(a.len() <= 1024 && a.len() as u64 <= row.used / 4096);
                        let end = row.hva + (row.used / 4096 - 1) * 4096;
                        assert!(a.iter().all(|x| *x >= row.hva && *x <= end));
                    }
                }
            }
        }
    }
}

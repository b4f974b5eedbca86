//! What this host remembers of the links to other agents (`STATE_DIR/links.json`): for each
//! destination, the rate memory crossed at and the wire bytes per byte of QEMU's stream,
//! averaged over its past migrations. `--plan` predicts from it; every migration that
//! succeeds updates it.
//!
//! Owns that file; must not hold anything a peer sent (only what this host measured).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use tern_api::{MigrationReport, Phase};
use tern_engine::source::plan::LinkMemory;

/// Weight of the newest migration in the average.
const NEW: f64 = 0.5;

/// One destination's link, as measured here.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct LinkRecord {
    /// Bytes/s of QEMU's stream that crossed (pages that were not zero).
    pub stream_bps: f64,
    /// Wire bytes per byte of QEMU's stream.
    pub wire_ratio: f64,
    pub migrations: u64,
    /// When the last one ended (seconds since the epoch).
    pub last_unix: u64,
}

fn file(state_dir: &Path) -> PathBuf {
    state_dir.join("links.json")
}

fn load(state_dir: &Path) -> BTreeMap<String, LinkRecord> {
    std::fs::read(file(state_dir))
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
        .unwrap_or_default()
}

/// What the plan may use for `destination` (None: never migrated there from here).
pub fn memory_of(state_dir: &Path, destination: &str) -> Option<LinkMemory> {
    let r = load(state_dir).remove(destination)?;
    (r.stream_bps > 0.0).then(|| LinkMemory {
        stream_bps: r.stream_bps,
        wire_ratio: r.wire_ratio,
        from: format!(
            "{} past migration{} to this destination",
            r.migrations,
            if r.migrations == 1 { "" } else { "s" }
        ),
    })
}

/// Folds a successful migration to `destination` into what this host remembers.
pub fn record(state_dir: &Path, destination: &str, r: &MigrationReport) -> std::io::Result<()> {
    // the rate memory crossed at: the converger's last measurement, or the stream over
    // the transfer phase
    let transfer = r
        .timeline
        .time_in(
            Phase::Transfer,
            std::time::Duration::from_millis(r.total_time_ms),
        )
        .as_secs_f64();
    let stream_bps = if r.convergence.transfer_mibps > 0.0 {
        r.convergence.transfer_mibps * 1048576.0
    } else if transfer > 0.5 {
        r.bytes_from_qemu as f64 / transfer
    } else {
        return Ok(()); // too short to say anything about the link
    };
    let memory_wire = r
        .bytes_on_wire
        .saturating_sub(r.disk.as_ref().map_or(0, |d| d.wire_bytes));
    let wire_ratio = if r.bytes_from_qemu > 0 {
        (memory_wire as f64 / r.bytes_from_qemu as f64).clamp(0.01, 2.0)
    } else {
        1.0
    };
    let mut all = load(state_dir);
    let e = all.entry(destination.to_string()).or_insert(LinkRecord {
        stream_bps,
        wire_ratio,
        migrations: 0,
        last_unix: 0,
    });
    if e.migrations > 0 {
        e.stream_bps = (1.0 - NEW) * e.stream_bps + NEW * stream_bps;
        e.wire_ratio = (1.0 - NEW) * e.wire_ratio + NEW * wire_ratio;
    }
    e.migrations += 1;
    e.last_unix = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let tmp = file(state_dir).with_extension("json.tmp");
    std::fs::write(&tmp, serde_json::to_vec_pretty(&all)?)?;
    std::fs::rename(tmp, file(state_dir))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn migrations_to_a_destination_are_averaged_and_kept_per_destination() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(memory_of(dir.path(), "b:7700"), None);
        let mut r = MigrationReport {
            bytes_from_qemu: 100 << 20,
            bytes_on_wire: 50 << 20,
            ..Default::default()
        };
        r.convergence.transfer_mibps = 10.0;
        record(dir.path(), "b:7700", &r).unwrap();
        let m = memory_of(dir.path(), "b:7700").unwrap();
        assert_eq!(m.stream_bps, 10.0 * 1048576.0);
        assert!((m.wire_ratio - 0.5).abs() < 1e-9);
        assert!(m.from.starts_with("1 past migration to"), "{}", m.from);
        r.convergence.transfer_mibps = 20.0;
        record(dir.path(), "b:7700", &r).unwrap();
        let m = memory_of(dir.path(), "b:7700").unwrap();
        assert_eq!(m.stream_bps, 15.0 * 1048576.0);
        assert!(m.from.starts_with("2 past migrations"), "{}", m.from);
        assert_eq!(memory_of(dir.path(), "c:7700"), None);
        // too short to measure: nothing recorded
        record(dir.path(), "c:7700", &MigrationReport::default()).unwrap();
        assert_eq!(memory_of(dir.path(), "c:7700"), None);
    }
}

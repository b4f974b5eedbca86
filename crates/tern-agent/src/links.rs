//! What this host remembers of the links to other agents (`STATE_DIR/links.json`): for each
//! destination, the rate memory crossed at and the wire bytes per byte of QEMU's stream,
//! averaged over its past migrations, and the last plan's probe of the link (used only
//! until a migration measured it). `--plan` and every migration's prediction use it; every
//! migration that succeeds and every probe updates it.
//!
//! Owns that file. It holds what this host measured, and one number a peer sent: the
//! filler of a plan's probe that the destination says arrived (never more than was sent),
//! which can mislead only predictions of migrations to that same destination, and only
//! until a migration there measured the link.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use tern_api::{MigrationReport, Phase};
use tern_engine::source::plan::LinkMemory;

/// Weight of the newest migration in the average.
const NEW: f64 = 0.5;

/// One destination's link, as measured here.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct LinkRecord {
    /// Bytes/s of QEMU's stream that crossed (pages that were not zero).
    pub stream_bps: f64,
    /// Wire bytes per byte of QEMU's stream.
    pub wire_ratio: f64,
    pub migrations: u64,
    /// When the last one ended (seconds since the epoch).
    pub last_unix: u64,
    /// The wire's rate a plan's probe measured last (bytes/s), and when.
    #[serde(default)]
    pub probe_bps: Option<f64>,
    #[serde(default)]
    pub probe_unix: u64,
    /// The part of the downtime that did not depend on the last dirty set, ms, averaged
    /// over migrations whose prediction put little in that set.
    #[serde(default)]
    pub switchover_fixed_ms: Option<f64>,
    /// CPU seconds per GiB of QEMU's stream the data path took on this host, averaged
    /// over past migrations to this destination.
    #[serde(default)]
    pub core_s_per_gib: Option<f64>,
}

/// A migration teaches the switchover's fixed part only when the model put at most this
/// much of its predicted downtime in the last dirty set (otherwise the model's error on
/// that set would be learnt as a fixed cost).
const DIRTY_PART_MAX_MS: f64 = 100.0;

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
    if r.migrations > 0 && r.stream_bps > 0.0 {
        return Some(LinkMemory {
            stream_bps: r.stream_bps,
            wire_ratio: r.wire_ratio,
            from: format!(
                "{} past migration{} to this destination",
                r.migrations,
                if r.migrations == 1 { "" } else { "s" }
            ),
            probed: false,
            switchover_fixed_ms: r.switchover_fixed_ms,
            core_s_per_gib: r.core_s_per_gib,
        });
    }
    let probe = r.probe_bps.filter(|b| *b > 0.0)?;
    Some(LinkMemory {
        stream_bps: probe,
        wire_ratio: 1.0,
        from: format!(
            "a plan's probe {} ago (no migration to this destination yet)",
            ago(r.probe_unix)
        ),
        probed: true,
        switchover_fixed_ms: r.switchover_fixed_ms,
        core_s_per_gib: r.core_s_per_gib,
    })
}

fn now_unix() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

fn ago(unix: u64) -> String {
    let s = now_unix().saturating_sub(unix);
    match s {
        0..=119 => format!("{s} s"),
        120..=7199 => format!("{} min", s / 60),
        _ => format!("{} h", s / 3600),
    }
}

/// Read-modify-write of the file, one at a time (a plan's probe and a migration's end may
/// come together).
static WRITING: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn save(state_dir: &Path, all: &BTreeMap<String, LinkRecord>) -> std::io::Result<()> {
    let tmp = file(state_dir).with_extension("json.tmp");
    std::fs::write(&tmp, serde_json::to_vec_pretty(all)?)?;
    std::fs::rename(tmp, file(state_dir))
}

/// Keeps what a plan's probe measured of the wire to `destination` (bytes/s).
pub fn record_probe(state_dir: &Path, destination: &str, wire_bps: f64) -> std::io::Result<()> {
    if !(wire_bps.is_finite() && wire_bps > 0.0) {
        return Ok(());
    }
    let _writing = WRITING.lock().unwrap_or_else(|p| p.into_inner());
    let mut all = load(state_dir);
    // (a record without migrations has no rates yet: `memory_of` reads only the probe)
    let e = all.entry(destination.to_string()).or_default();
    e.probe_bps = Some(wire_bps);
    e.probe_unix = now_unix();
    save(state_dir, &all)
}

/// Folds a successful migration to `destination` into what this host remembers.
pub fn record(state_dir: &Path, destination: &str, r: &MigrationReport) -> std::io::Result<()> {
    // the rate memory crossed at: the converger's last measurement or the stream over the
    // transfer phase, whichever is higher (a last round of a few MiB does not fill a WAN
    // link: a CI run learnt 4.5 MiB/s of stream, 2.7 of wire, on a 100 Mbit/s link whose
    // trip averaged 7 MiB/s of wire, and the next prediction throttled a guest that
    // converged on its own)
    let transfer = r
        .timeline
        .time_in(
            Phase::Transfer,
            std::time::Duration::from_millis(r.total_time_ms),
        )
        .as_secs_f64();
    let mean = (transfer > 0.5).then(|| r.bytes_from_qemu as f64 / transfer);
    let last =
        (r.convergence.transfer_mibps > 0.0).then_some(r.convergence.transfer_mibps * 1048576.0);
    let measured = match (last, mean) {
        (Some(l), Some(m)) => Some(l.max(m)),
        (l, m) => l.or(m),
    };
    let Some(measured) = measured else {
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
    // never more wire than the link delivered in its best second: a small last round goes
    // into tern's buffers faster than the link takes it (a CI run learnt 38.7 MiB/s of
    // stream at 0.59 wire bytes per byte, 23 MiB/s of wire, on a 100 Mbit/s link)
    let stream_bps = match r.pacing.delivered_max_mibps * 1048576.0 {
        best if best > 0.0 => measured.min(best / wire_ratio),
        _ => measured,
    };
    let _writing = WRITING.lock().unwrap_or_else(|p| p.into_inner());
    let mut all = load(state_dir);
    let e = all.entry(destination.to_string()).or_default();
    // the downtime's fixed part: what the pause took beyond the model's last dirty set
    if let Some(p) = r.prediction.as_ref().filter(|_| r.downtime_ms > 0) {
        let dirty_part = p.downtime_ms - p.switchover_fixed_ms;
        if p.switchover_fixed_ms > 0.0 && (0.0..=DIRTY_PART_MAX_MS).contains(&dirty_part) {
            let fixed = (r.downtime_ms as f64 - dirty_part).max(0.0);
            e.switchover_fixed_ms = Some(match e.switchover_fixed_ms {
                Some(old) => (1.0 - NEW) * old + NEW * fixed,
                None => fixed,
            });
        }
    }
    // what the data path cost this host's CPU, from migrations that ran as the model
    // has them: at the link's rate (not paced or capped), the guest not throttled (it
    // would give back cores counted as the migration's saving), no disks (their work is
    // not in QEMU's stream)
    let plain = r.pacing.rate_min_mibps.is_none()
        && r.pacing.deadline_s.is_none()
        && r.pacing.objective != "least-link-use"
        && r.convergence.throttle_max_pct == 0
        && r.disk.is_none();
    if let Some(c) = r
        .host_cpu
        .as_ref()
        .and_then(|c| c.core_s_per_gib)
        .filter(|c| plain && c.is_finite() && *c > 0.0)
    {
        e.core_s_per_gib = Some(match e.core_s_per_gib {
            Some(old) => (1.0 - NEW) * old + NEW * c,
            None => c,
        });
    }
    if e.migrations > 0 {
        e.stream_bps = (1.0 - NEW) * e.stream_bps + NEW * stream_bps;
        e.wire_ratio = (1.0 - NEW) * e.wire_ratio + NEW * wire_ratio;
    } else {
        (e.stream_bps, e.wire_ratio) = (stream_bps, wire_ratio);
    }
    e.migrations += 1;
    e.last_unix = now_unix();
    save(state_dir, &all)
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
        assert_eq!(m.core_s_per_gib, None);
        r.convergence.transfer_mibps = 20.0;
        r.host_cpu = Some(tern_api::HostCpuReport {
            core_s_per_gib: Some(8.0),
            ..Default::default()
        });
        record(dir.path(), "b:7700", &r).unwrap();
        let m = memory_of(dir.path(), "b:7700").unwrap();
        assert_eq!(m.stream_bps, 15.0 * 1048576.0);
        // the CPU the data path took: the first measurement, then averaged
        assert_eq!(m.core_s_per_gib, Some(8.0));
        r.host_cpu.as_mut().unwrap().core_s_per_gib = Some(4.0);
        record(dir.path(), "b:7700", &r).unwrap();
        assert_eq!(
            memory_of(dir.path(), "b:7700").unwrap().core_s_per_gib,
            Some(6.0)
        );
        // a throttled or paced migration teaches nothing of it
        r.host_cpu.as_mut().unwrap().core_s_per_gib = Some(40.0);
        r.convergence.throttle_max_pct = 50;
        record(dir.path(), "b:7700", &r).unwrap();
        r.convergence.throttle_max_pct = 0;
        r.pacing.rate_min_mibps = Some(1.0);
        record(dir.path(), "b:7700", &r).unwrap();
        assert_eq!(
            memory_of(dir.path(), "b:7700").unwrap().core_s_per_gib,
            Some(6.0)
        );
        assert!(m.from.starts_with("2 past migrations"), "{}", m.from);
        assert_eq!(memory_of(dir.path(), "c:7700"), None);
        // too short to measure: nothing recorded
        record(dir.path(), "c:7700", &MigrationReport::default()).unwrap();
        assert_eq!(memory_of(dir.path(), "c:7700"), None);
    }

    #[test]
    fn a_last_round_faster_than_the_link_delivered_is_not_the_link() {
        let dir = tempfile::tempdir().unwrap();
        // 0.6 wire bytes per stream byte; the link delivered 12 MiB/s at best; the last
        // round said 38 MiB/s of stream (23 of wire): 20 MiB/s of stream is learnt
        let mut r = MigrationReport {
            bytes_from_qemu: 100 << 20,
            bytes_on_wire: 60 << 20,
            ..Default::default()
        };
        r.pacing.delivered_max_mibps = 12.0;
        r.convergence.transfer_mibps = 38.0;
        record(dir.path(), "b:7700", &r).unwrap();
        let m = memory_of(dir.path(), "b:7700").unwrap();
        assert!((m.stream_bps / 1048576.0 - 20.0).abs() < 1e-6, "{m:?}");
        // a last round slower than the link (a throttled end) is kept
        let dir = tempfile::tempdir().unwrap();
        r.convergence.transfer_mibps = 6.0;
        record(dir.path(), "b:7700", &r).unwrap();
        let m = memory_of(dir.path(), "b:7700").unwrap();
        assert!((m.stream_bps / 1048576.0 - 6.0).abs() < 1e-6, "{m:?}");
    }

    #[test]
    fn a_last_round_slower_than_the_whole_transfer_is_not_the_link() {
        let dir = tempfile::tempdir().unwrap();
        // 120 MiB of stream over 8 s of transfer (15 MiB/s); the last round said 4.5
        let mut r = MigrationReport {
            bytes_from_qemu: 120 << 20,
            bytes_on_wire: 72 << 20,
            total_time_ms: 9_000,
            ..Default::default()
        };
        r.timeline
            .enter(Phase::Transfer, std::time::Duration::from_secs(1));
        r.timeline
            .enter(Phase::Switchover, std::time::Duration::from_secs(9));
        r.convergence.transfer_mibps = 4.5;
        record(dir.path(), "b:7700", &r).unwrap();
        let m = memory_of(dir.path(), "b:7700").unwrap();
        assert!((m.stream_bps / 1048576.0 - 15.0).abs() < 0.01, "{m:?}");
    }

    #[test]
    fn a_probe_stands_in_only_until_a_migration_measured_the_link() {
        let dir = tempfile::tempdir().unwrap();
        record_probe(dir.path(), "b:7700", 12.0 * 1048576.0).unwrap();
        record_probe(dir.path(), "b:7700", f64::NAN).unwrap();
        let m = memory_of(dir.path(), "b:7700").unwrap();
        assert!(m.probed && m.stream_bps == 12.0 * 1048576.0, "{m:?}");
        assert!(m.from.contains("probe"), "{}", m.from);
        let mut r = MigrationReport {
            bytes_from_qemu: 100 << 20,
            bytes_on_wire: 50 << 20,
            ..Default::default()
        };
        r.convergence.transfer_mibps = 20.0;
        record(dir.path(), "b:7700", &r).unwrap();
        let m = memory_of(dir.path(), "b:7700").unwrap();
        // the migration's own numbers, not an average with the probe's
        assert!(!m.probed && m.stream_bps == 20.0 * 1048576.0, "{m:?}");
        assert!((m.wire_ratio - 0.5).abs() < 1e-9);
        record_probe(dir.path(), "b:7700", 1.0).unwrap();
        assert!(!memory_of(dir.path(), "b:7700").unwrap().probed);
    }

    #[test]
    fn the_switchover_fixed_part_is_learnt_only_when_little_was_left_dirty() {
        let dir = tempfile::tempdir().unwrap();
        let report = |downtime_ms: u64, predicted: f64, fixed: f64| {
            let mut r = MigrationReport {
                bytes_from_qemu: 100 << 20,
                bytes_on_wire: 50 << 20,
                downtime_ms,
                prediction: Some(tern_api::PlanPrediction {
                    downtime_ms: predicted,
                    switchover_fixed_ms: fixed,
                    ..Default::default()
                }),
                ..Default::default()
            };
            r.convergence.transfer_mibps = 10.0;
            r
        };
        // predicted 250 ms, 230 of them fixed; it took 300: the fixed part is 280
        record(dir.path(), "b:7700", &report(300, 250.0, 230.0)).unwrap();
        let m = memory_of(dir.path(), "b:7700").unwrap();
        assert_eq!(m.switchover_fixed_ms, Some(280.0));
        // most of the prediction was the dirty set: nothing learnt from it
        record(dir.path(), "b:7700", &report(2000, 900.0, 230.0)).unwrap();
        let m = memory_of(dir.path(), "b:7700").unwrap();
        assert_eq!(m.switchover_fixed_ms, Some(280.0));
        // averaged
        record(dir.path(), "b:7700", &report(200, 230.0, 230.0)).unwrap();
        let m = memory_of(dir.path(), "b:7700").unwrap();
        assert_eq!(m.switchover_fixed_ms, Some(240.0));
    }
}

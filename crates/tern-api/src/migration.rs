//! Migrations as the API shows them: the request that starts one, its phase and timeline,
//! progress while it runs, and the report (or failure) at the end.

use std::time::Duration;

use serde::{Deserialize, Serialize};

/// What the operator asked for (`POST /v1/vms/{name}/migrate`, `tern migrate`).
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct MigrateRequest {
    /// Destination agent, HOST:PORT.
    pub to: String,
    /// QEMU's downtime limit (default 300 ms, QEMU's own).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub downtime_ms: Option<u64>,
    /// Cap on what the migration sends, MiB/s (default: none): bytes on the wire of memory
    /// and disks together, and QEMU's own stream rate.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_bandwidth_mibps: Option<u64>,
    /// Frame compression (default: auto).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub compression: Option<Compression>,
    /// The data path: unset (the default) measures and switches between lean and dedup as
    /// the migration runs; `false` always lean (every page's bytes, nothing hashed or
    /// kept); `true` always dedup (references and deltas wherever they are smaller).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dedup: Option<bool>,
    /// Extra TCP connections for data (parallel streams); default: 4 when the round trip
    /// is 10 ms or more, else none (the control connection carries the data).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub streams: Option<u16>,
}

/// Frame compression a migration uses: `auto` (picked from the link and the CPU as it
/// runs), `none`, `lz4` or `zstd-1` to `zstd-19`. Its JSON form is that name.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Compression {
    #[default]
    Auto,
    None,
    Lz4,
    Zstd(i32),
}

impl std::str::FromStr for Compression {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        Ok(match s {
            "auto" => Compression::Auto,
            "none" => Compression::None,
            "lz4" => Compression::Lz4,
            _ => match s.strip_prefix("zstd-").and_then(|l| l.parse::<i32>().ok()) {
                Some(l) if (1..=19).contains(&l) => Compression::Zstd(l),
                _ => {
                    return Err(format!(
                        "compression {s:?}: use auto, none, lz4 or zstd-1 .. zstd-19"
                    ))
                }
            },
        })
    }
}

impl std::fmt::Display for Compression {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Compression::Auto => f.write_str("auto"),
            Compression::None => f.write_str("none"),
            Compression::Lz4 => f.write_str("lz4"),
            Compression::Zstd(l) => write!(f, "zstd-{l}"),
        }
    }
}

impl Serialize for Compression {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Compression {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// `POST /v1/vms/{name}/migrate` answers with the new migration's id.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct MigrateStarted {
    pub id: String,
}

/// Which way a migration goes, seen from this agent.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Direction {
    Outgoing,
    Incoming,
}

/// Where a migration is. A source goes Connect, Prepare, (DiskCopy), Transfer, Verify,
/// Switchover, then Done or Failed; a destination Prepare, Transfer, Verify, Switchover.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum Phase {
    #[default]
    Connect,
    Prepare,
    /// The VM's local disks: the full copy and the rounds before memory moves.
    DiskCopy,
    Transfer,
    Verify,
    Switchover,
    Done,
    Failed,
}

impl Phase {
    pub fn as_str(self) -> &'static str {
        match self {
            Phase::Connect => "connect",
            Phase::Prepare => "prepare",
            Phase::DiskCopy => "disk-copy",
            Phase::Transfer => "transfer",
            Phase::Verify => "verify",
            Phase::Switchover => "switchover",
            Phase::Done => "done",
            Phase::Failed => "failed",
        }
    }

    /// Done or Failed.
    pub fn is_final(self) -> bool {
        matches!(self, Phase::Done | Phase::Failed)
    }
}

impl std::fmt::Display for Phase {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One phase of a migration: when it started and ended, in ms since the migration began.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct PhaseSpan {
    pub phase: Phase,
    pub start_ms: f64,
    /// None while it lasts.
    pub end_ms: Option<f64>,
}

/// When each phase started and ended: the report is built from it, not from loose
/// timestamps. Phases follow each other; entering one ends the one before.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Timeline {
    pub spans: Vec<PhaseSpan>,
}

impl Timeline {
    /// `phase` starts `at` after the migration began (ending the phase before). Entering
    /// the phase it is in already changes nothing.
    pub fn enter(&mut self, phase: Phase, at: Duration) {
        let ms = at.as_secs_f64() * 1e3;
        if let Some(last) = self.spans.last_mut() {
            if last.phase == phase && last.end_ms.is_none() {
                return;
            }
            if last.end_ms.is_none() {
                last.end_ms = Some(ms.max(last.start_ms));
            }
        }
        self.spans.push(PhaseSpan {
            phase,
            start_ms: ms,
            end_ms: if phase.is_final() { Some(ms) } else { None },
        });
    }

    /// The phase now (Connect before any).
    pub fn current(&self) -> Phase {
        self.spans.last().map_or(Phase::Connect, |s| s.phase)
    }

    /// How long `phase` took in all (0 if it never ran; up to `now` if it still runs).
    pub fn time_in(&self, phase: Phase, now: Duration) -> Duration {
        let now = now.as_secs_f64() * 1e3;
        let ms: f64 = self
            .spans
            .iter()
            .filter(|s| s.phase == phase)
            .map(|s| s.end_ms.unwrap_or(now) - s.start_ms)
            .sum();
        Duration::from_secs_f64(ms.max(0.0) / 1e3)
    }

    /// Whether the migration went through `phase`.
    pub fn reached(&self, phase: Phase) -> bool {
        self.spans.iter().any(|s| s.phase == phase)
    }
}

/// Pages by how they crossed the wire.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct PageCounts {
    pub zero: u64,
    pub raw: u64,
    /// Sent as a reference to content the destination held.
    #[serde(default)]
    pub refs: u64,
    /// Sent as the changes against the destination's previous version.
    #[serde(default)]
    pub deltas: u64,
    pub total: u64,
}

/// Progress as the API reports it while a migration runs.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Progress {
    pub elapsed_ms: u64,
    pub bytes_from_qemu: u64,
    pub bytes_on_wire: u64,
    pub pages: PageCounts,
    pub qemu_status: String,
    pub ram_remaining: Option<u64>,
    pub ram_total: Option<u64>,
    pub dirty_pages_rate: Option<u64>,
    pub dirty_sync_count: Option<u64>,
    /// Pages the destination's store held at the start (its summary).
    #[serde(default)]
    pub destination_held_pages: u64,
    /// The compression in use now.
    #[serde(default)]
    pub codec: String,
    /// The data path in use now: `lean` or `dedup`.
    #[serde(default)]
    pub data_path: String,
    /// The disks so far (source side; None: the VM has none, or they have not started).
    #[serde(default)]
    pub disk: Option<DiskReport>,
}

/// The final report of a migration (`tern migrate --json` prints it).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct MigrationReport {
    pub migration_id: String,
    pub vm: String,
    pub source: String,
    pub destination: String,
    pub outcome: String,
    pub total_time_ms: u64,
    /// End to end: source QEMU's STOP event to destination QEMU's RESUME event (wall
    /// clocks of the two hosts); for a VM that was paused before, 0.
    pub downtime_ms: u64,
    /// What the source QEMU itself reports as downtime.
    pub qemu_downtime_ms: Option<u64>,
    /// The source QEMU's own migration time (from `migrate` to completed): the transfer,
    /// without tern's connect/prepare steps.
    pub qemu_total_time_ms: Option<u64>,
    pub ram_bytes: u64,
    pub bytes_from_qemu: u64,
    pub bytes_on_wire: u64,
    pub pages: PageCounts,
    pub throughput_mbps: f64,
    pub digest_ok: bool,
    pub digest: String,
    pub qemu_version: String,
    pub destination_qemu_version: String,
    pub source_was_running: bool,
    pub protocol_version: u16,
    /// Where the downtime went (source side clocks; RESUME from the destination's).
    pub switchover: Option<SwitchoverTimes>,
    /// The destination QEMU's RESUME event (wall clock, µs); 0 if the VM was paused.
    pub resumed_unix_us: u64,
    /// Set when Resumed was lost and the outcome was learned by asking the destination.
    pub resolved_by_query: bool,
    /// How the WAN data path encoded the stream (source side).
    #[serde(default)]
    pub encoding: EncodingReport,
    /// What the VM's local disks cost (None: the VM has none).
    #[serde(default)]
    pub disk: Option<DiskReport>,
    /// When each phase started and ended.
    #[serde(default)]
    pub timeline: Timeline,
}

/// How the VM's local disks moved (source side). Memory's share of the wire is
/// `bytes_on_wire - disk.wire_bytes`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct DiskReport {
    pub disks: u32,
    /// Guest-visible size of all disks.
    pub virtual_bytes: u64,
    /// Round 0: how far the source has read through the disks (progress).
    #[serde(default)]
    pub scanned_bytes: u64,
    /// Round 0: bytes of blocks that do not read as zero (what a full copy sends).
    pub data_bytes: u64,
    /// Round 0: bytes the destination filled from images it held (its chunk index), or
    /// by repeating a block it was sent.
    pub local_bytes: u64,
    /// Block bytes sent, all rounds (before compression).
    pub sent_bytes: u64,
    /// Disk frames on the wire (manifests, wants, blocks; compressed, headers included).
    pub wire_bytes: u64,
    /// Rounds per disk (round 0 = the full copy; the last ran with the VM paused).
    pub rounds: u32,
    /// Time to the end of round 0 and the live rounds before memory started, ms.
    pub copy_ms: u64,
    /// The last round (guest paused, before QEMU's switchover): bytes and time.
    pub last_round_bytes: u64,
    pub last_round_ms: f64,
    /// From QEMU's pause before the switchover to `migrate-continue`: the part of the
    /// downtime the disks add (the end of a live round in progress, then the last round).
    #[serde(default)]
    pub pause_ms: f64,
    /// Of which: waiting for a live round in progress to end.
    #[serde(default)]
    pub live_round_wait_ms: f64,
}

/// What the source's encoder did.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct EncodingReport {
    /// References and deltas were possible (v2 peer, same cluster key, not turned off);
    /// whether pages went that way is `data_path`.
    pub dedup: bool,
    /// Pages the destination's store held at the start.
    pub destination_held_pages: u64,
    /// Bytes of all delta bodies.
    pub delta_bytes: u64,
    /// Frame payload bytes before compression, and after (headers included).
    pub frames_raw_bytes: u64,
    pub frames_wire_bytes: u64,
    /// Compression in use at the end, and how often it changed.
    pub codec: String,
    pub codec_switches: u32,
    /// Contents the destination asked for (references it could not resolve).
    pub wants: u64,
    /// Extra TCP connections that carried the data (0: the control connection did).
    #[serde(default)]
    pub data_streams: u16,
    /// How the data path treated pages, and how often that changed: `lean` (bytes as
    /// they are, nothing hashed or kept: the link is not the bottleneck) or `dedup`
    /// (references, deltas, the page store: the link is).
    #[serde(default)]
    pub data_path: String,
    #[serde(default)]
    pub data_path_switches: u32,
    /// Pages the lean path sent (the rest of the non-zero pages went the dedup way).
    #[serde(default)]
    pub lean_pages: u64,
}

/// The steps of the switchover, in ms, as the source saw them.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct SwitchoverTimes {
    /// Source QEMU stopped the VM -> its stream ended (device state sent, SHUT came back).
    pub stop_to_stream_end_ms: Option<f64>,
    /// Stream end -> the destination confirmed digest and load (ReadyToResume).
    pub stream_end_to_ready_ms: Option<f64>,
    /// ReadyToResume -> Commit sent.
    pub ready_to_commit_ms: Option<f64>,
    /// Commit sent -> the destination QEMU's RESUME event.
    pub commit_to_resume_ms: Option<f64>,
}

/// A failure as the API reports it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct FailureInfo {
    pub code: String,
    pub message: String,
    pub retryable: bool,
    /// Where the VM is now, in words an operator can act on.
    pub vm_state: String,
}

/// What `GET /v1/migrations/{id}` returns.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct MigrationStatus {
    pub id: String,
    pub vm: String,
    pub direction: Direction,
    pub peer: String,
    pub phase: Phase,
    pub finished: bool,
    pub progress: Progress,
    pub report: Option<MigrationReport>,
    pub error: Option<FailureInfo>,
    /// The QEMU this migration started on the destination (incoming side only).
    pub dest_qemu_pid: Option<u32>,
    /// When each phase started and ended so far.
    #[serde(default)]
    pub timeline: Timeline,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    #[test]
    fn phases_follow_each_other_and_the_final_one_closes_the_timeline() {
        let mut t = Timeline::default();
        assert_eq!(t.current(), Phase::Connect);
        t.enter(Phase::Connect, ms(0));
        t.enter(Phase::Prepare, ms(10));
        t.enter(Phase::Prepare, ms(15)); // already there
        t.enter(Phase::Transfer, ms(40));
        assert_eq!(t.current(), Phase::Transfer);
        assert_eq!(t.time_in(Phase::Prepare, ms(100)), ms(30));
        assert_eq!(t.time_in(Phase::Transfer, ms(100)), ms(60), "still running");
        t.enter(Phase::Done, ms(120));
        assert_eq!(t.time_in(Phase::Transfer, ms(500)), ms(80));
        assert_eq!(t.spans.len(), 4);
        assert!(t.spans.iter().all(|s| s.end_ms.is_some()));
        assert!(t.reached(Phase::Prepare) && !t.reached(Phase::DiskCopy));
        assert_eq!(t.time_in(Phase::Verify, ms(500)), Duration::ZERO);
    }

    #[test]
    fn a_clock_that_goes_back_does_not_make_negative_spans() {
        let mut t = Timeline::default();
        t.enter(Phase::Transfer, ms(50));
        t.enter(Phase::Verify, ms(40));
        assert!(t.spans[0].end_ms.unwrap() >= t.spans[0].start_ms);
        assert_eq!(t.time_in(Phase::Transfer, ms(60)), Duration::ZERO);
    }

    #[test]
    fn phases_and_compression_have_stable_names() {
        assert_eq!(
            serde_json::to_string(&Phase::DiskCopy).unwrap(),
            "\"disk-copy\""
        );
        for p in [
            Phase::Connect,
            Phase::Prepare,
            Phase::DiskCopy,
            Phase::Transfer,
            Phase::Verify,
            Phase::Switchover,
            Phase::Done,
            Phase::Failed,
        ] {
            let json = serde_json::to_string(&p).unwrap();
            assert_eq!(json, format!("\"{}\"", p.as_str()));
            assert_eq!(serde_json::from_str::<Phase>(&json).unwrap(), p);
        }
        for c in ["auto", "none", "lz4", "zstd-1", "zstd-19"] {
            let parsed: Compression = c.parse().unwrap();
            assert_eq!(parsed.to_string(), c);
            let json = serde_json::to_string(&parsed).unwrap();
            assert_eq!(serde_json::from_str::<Compression>(&json).unwrap(), parsed);
        }
        for bad in ["zstd-0", "zstd-20", "gzip", ""] {
            assert!(bad.parse::<Compression>().is_err(), "{bad}");
            assert!(serde_json::from_str::<Compression>(&format!("\"{bad}\"")).is_err());
        }
        // a request without the optional fields reads as the defaults
        let r: MigrateRequest = serde_json::from_str(r#"{"to": "b:7700"}"#).unwrap();
        assert_eq!(r.compression, None);
        assert_eq!(r.to, "b:7700");
    }
}

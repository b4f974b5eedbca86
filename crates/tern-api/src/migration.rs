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
    /// How far tern may slow the guest's CPUs (QEMU's throttle, percent, 0-99) when
    /// pre-copy does not converge; 0 never slows it. Default 99.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_throttle: Option<u8>,
    /// How far tern may raise the downtime limit, ms, once the throttle is at its most and
    /// pre-copy still does not converge. Default: the downtime limit (never raised).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_downtime_ms: Option<u64>,
    /// With the throttle and the downtime limit at their most: how long pre-copy may go
    /// without getting closer to the switchover before the migration stops (the VM keeps
    /// running here), seconds. Default 60.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub converge_timeout_s: Option<u64>,
    /// What the bandwidth controller optimises (default: fastest; least-link-use when only
    /// a deadline is given). See docs/bandwidth.md.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub objective: Option<Objective>,
    /// With `least-link-use`: finish within this many seconds of the start, at the lowest
    /// rate that does.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub deadline_s: Option<u64>,
    /// When the link to the destination is lost before the switchover: how long, seconds,
    /// tern waits for it to come back (the VM keeps running here) and then goes on, what
    /// the destination already holds travelling as references. Default 120; 0 fails at
    /// the first stall.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub outage_wait_s: Option<u64>,
    /// Post-copy: after the first pass the VM runs at the destination, which fetches the
    /// pages still here as it goes; the guest is never slowed. Risk: if this host dies
    /// during post-copy, the VM is lost. tern's own VMs only, without local disks or
    /// shared memory, to a destination of protocol v10 or newer.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub postcopy: bool,
    /// Post-copy as the last resort: pre-copy as usual (the throttle up to
    /// `max_throttle`, the downtime limit up to `max_downtime_ms`), and when that still
    /// does not converge, post-copy instead of giving up (with `postcopy`'s risk from
    /// then on). Ignored, with a note, where post-copy is not possible (local disks,
    /// shared memory, a destination older than protocol v13).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub postcopy_fallback: bool,
}

/// What `postcopy` risks, said before it starts (the CLI's output, the migration's notes).
pub const POSTCOPY_RISK: &str = "post-copy: once the VM runs at the destination, memory it has not fetched yet is only on this host: if this host dies during post-copy, the VM is lost (a link that breaks is waited for, up to --outage-wait, and post-copy resumes; meanwhile the VM waits at the destination on the pages it lacks)";

/// What the bandwidth controller optimises.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Objective {
    /// Total time: every byte the link (and `--max-bandwidth`) takes, as TCP shares it.
    #[default]
    Fastest,
    /// Downtime: the link at full rate, and a low starting downtime limit (50 ms unless
    /// given), so pre-copy runs more rounds and stops on a smaller dirty set.
    LeastDowntime,
    /// The link's other traffic: with a deadline, the lowest rate that still finishes in
    /// time; without one, what the link has spare (tern backs off when queueing delay on
    /// the path grows and takes the link back when it falls).
    LeastLinkUse,
}

impl Objective {
    pub fn as_str(self) -> &'static str {
        match self {
            Objective::Fastest => "fastest",
            Objective::LeastDowntime => "least-downtime",
            Objective::LeastLinkUse => "least-link-use",
        }
    }
}

impl std::str::FromStr for Objective {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "fastest" => Ok(Objective::Fastest),
            "least-downtime" => Ok(Objective::LeastDowntime),
            "least-link-use" => Ok(Objective::LeastLinkUse),
            _ => Err(format!(
                "objective {s:?}: use fastest, least-downtime or least-link-use"
            )),
        }
    }
}

/// The longest `--deadline`: a week.
pub const MAX_DEADLINE_S: u64 = 7 * 86_400;

/// Reads a duration the way an operator writes it: `90`, `90s`, `10m`, `2h`.
pub fn parse_duration_s(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let (num, mult) = match t.char_indices().last() {
        Some((i, 's')) => (&t[..i], 1),
        Some((i, 'm')) => (&t[..i], 60),
        Some((i, 'h')) => (&t[..i], 3600),
        _ => (t, 1),
    };
    num.parse::<u64>()
        .ok()
        .and_then(|n| n.checked_mul(mult))
        .ok_or_else(|| format!("duration {s:?}: write it as 90, 90s, 10m or 2h"))
}

/// How long a lost link is waited for unless the request says (`outage_wait_s`).
pub const DEFAULT_OUTAGE_WAIT_S: u64 = 120;
/// The longest `--outage-wait`: a day.
pub const MAX_OUTAGE_WAIT_S: u64 = 86_400;

/// The most `downtime_ms` / `max_downtime_ms` may be: a minute paused is no live migration.
pub const MAX_DOWNTIME_MS: u64 = 60_000;

impl MigrateRequest {
    /// The downtime limit QEMU starts with, ms (300, QEMU's own default; 50 for
    /// `least-downtime`).
    pub fn downtime_limit_ms(&self) -> u64 {
        match (self.downtime_ms, self.objective()) {
            (Some(ms), _) => ms,
            (None, Objective::LeastDowntime) => 50,
            (None, _) => 300,
        }
    }

    /// How long a lost link is waited for before the migration fails.
    pub fn outage_wait(&self) -> std::time::Duration {
        std::time::Duration::from_secs(self.outage_wait_s.unwrap_or(DEFAULT_OUTAGE_WAIT_S))
    }

    /// The objective in force: as given, else least-link-use when a deadline is given,
    /// else fastest.
    pub fn objective(&self) -> Objective {
        match (self.objective, self.deadline_s) {
            (Some(o), _) => o,
            (None, Some(_)) => Objective::LeastLinkUse,
            (None, None) => Objective::Fastest,
        }
    }

    /// Refuses a request that cannot be carried out as asked, with what to change;
    /// nothing has moved when it is refused.
    pub fn validate(&self) -> Result<(), String> {
        if self.to.trim().is_empty() {
            return Err("no destination: give --to HOST:PORT".into());
        }
        let downtime = self.downtime_limit_ms();
        if downtime == 0 || downtime > MAX_DOWNTIME_MS {
            return Err(format!(
                "downtime limit {downtime} ms: give 1 to {MAX_DOWNTIME_MS} ms"
            ));
        }
        if let Some(max) = self.max_downtime_ms {
            if max < downtime || max > MAX_DOWNTIME_MS {
                return Err(format!(
                    "--max-downtime {max} ms: give at least the downtime limit ({downtime} ms) and at most {MAX_DOWNTIME_MS} ms"
                ));
            }
        }
        if let Some(bw) = self.max_bandwidth_mibps {
            if bw == 0 || bw > 1 << 20 {
                return Err(format!(
                    "--max-bandwidth {bw} MiB/s: give 1 to {} MiB/s (leave it out for no cap)",
                    1u64 << 20
                ));
            }
        }
        if let Some(t) = self.max_throttle {
            if t > 99 {
                return Err(format!(
                    "--max-throttle {t}%: give 0 (never slow the guest) to 99"
                ));
            }
        }
        if self.converge_timeout_s == Some(0) {
            return Err("--converge-timeout 0 s: give at least 1 s".into());
        }
        if self.postcopy && self.postcopy_fallback {
            return Err(
                "--postcopy and --postcopy-fallback: give one (post-copy after the first pass, or only when pre-copy cannot converge)".into(),
            );
        }
        if self.postcopy && self.max_throttle.is_some_and(|t| t > 0) {
            return Err(
                "--postcopy never slows the guest: leave out --max-throttle (or give 0)".into(),
            );
        }
        if let Some(w) = self.outage_wait_s.filter(|w| *w > MAX_OUTAGE_WAIT_S) {
            return Err(format!(
                "--outage-wait {w} s: give 0 (fail at the first stall) to {MAX_OUTAGE_WAIT_S} s (a day)"
            ));
        }
        if let Some(d) = self.deadline_s {
            if d == 0 || d > MAX_DEADLINE_S {
                return Err(format!(
                    "--deadline {d} s: give 1 s to {MAX_DEADLINE_S} s (7 days)"
                ));
            }
            if self.objective() != Objective::LeastLinkUse {
                return Err(format!(
                    "--deadline is for --objective least-link-use (the lowest rate that finishes in time); {} does not pace to a deadline",
                    self.objective().as_str()
                ));
            }
        }
        Ok(())
    }
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

/// `POST /v1/libvirt/{domain}/migrate`: carry a libvirt domain's migration. libvirt runs
/// it (`virsh migrate --live DOMAIN LIBVIRT_TO --migrateuri unix://DIR/DOMAIN.sock`, run by
/// the source agent) and tern carries the stream between the agents.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LibvirtMigrateRequest {
    /// The destination's libvirt, as `virsh migrate` takes it (e.g.
    /// `qemu+tls://host-b/system`).
    pub libvirt_to: String,
    /// Further `virsh migrate` flags, from [`LIBVIRT_FLAGS`].
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub virsh_flags: Vec<String>,
    /// The domain's local disks move too: libvirt copies them (`--copy-storage-all`) over
    /// NBD connections tern carries (`--disks-uri`, storage tunnels). The destination
    /// needs each image at the same path with the same size, as libvirt does.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub copy_storage: bool,
    /// The destination agent and tern's options for the stream.
    #[serde(flatten)]
    pub migrate: MigrateRequest,
}

/// The `virsh migrate` flags a carried migration may add: those that change what libvirt
/// does with the domain's definition or its convergence, not how the stream travels
/// (`--tunnelled`, `--parallel`, `--compressed`, `--postcopy` would bypass tern or put in
/// the stream what tern does not carry; local disks go with
/// [`LibvirtMigrateRequest::copy_storage`], whose NBD connections tern carries).
pub const LIBVIRT_FLAGS: &[&str] = &[
    "--persistent",
    "--undefinesource",
    "--auto-converge",
    "--abort-on-error",
    "--unsafe",
];

impl LibvirtMigrateRequest {
    pub fn validate(&self) -> Result<(), String> {
        self.migrate.validate()?;
        if self.migrate.postcopy || self.migrate.postcopy_fallback {
            return Err("--postcopy and --postcopy-fallback are not available for a libvirt domain (libvirt drives its migration): leave them out".into());
        }
        if self.libvirt_to.trim().is_empty() || self.libvirt_to.starts_with('-') {
            return Err(
                "no destination libvirt: give --libvirt-to URI (e.g. qemu+tls://host-b/system)"
                    .into(),
            );
        }
        if let Some(f) = self
            .virsh_flags
            .iter()
            .find(|f| !LIBVIRT_FLAGS.contains(&f.as_str()))
        {
            return Err(format!(
                "virsh migrate flag {f:?} cannot be used with a carried migration; allowed: {}",
                LIBVIRT_FLAGS.join(" ")
            ));
        }
        Ok(())
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
/// A source that lost the link before the switchover waits for it (WaitingForLink) and
/// goes through the phases again from Connect.
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
    /// The link to the destination was lost before the switchover: the VM runs here, tern
    /// waits for the link to come back (up to `outage_wait_s`).
    WaitingForLink,
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
            Phase::WaitingForLink => "waiting-for-link",
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
    /// How far the migration is, percent (source side): never goes down, dirty rounds
    /// included; 100 only when it is done.
    #[serde(default)]
    pub percent: f64,
    /// Time left, ms, re-estimated from the model as the migration runs (None: not known
    /// yet).
    #[serde(default)]
    pub eta_ms: Option<u64>,
    /// The guest CPU throttle QEMU applies now, percent (0: none).
    #[serde(default)]
    pub throttle_pct: u8,
    /// QEMU's downtime limit now, ms (tern may raise it up to --max-downtime).
    #[serde(default)]
    pub downtime_limit_ms: u64,
    /// The rate the bandwidth controller allows now, MiB/s (None: no limit).
    #[serde(default)]
    pub rate_limit_mibps: Option<f64>,
    /// The path to the destination as the data connections see it (TCP's smoothed round
    /// trip, and how far it is above the least seen: queueing on the path), ms.
    #[serde(default)]
    pub rtt_ms: Option<f64>,
    #[serde(default)]
    pub queue_delay_ms: Option<f64>,
    /// What the operator should know of this migration as it runs (post-copy's risk, said
    /// before post-copy starts).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub notes: Vec<String>,
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
    /// What tern did to make pre-copy converge (source side).
    #[serde(default)]
    pub convergence: ConvergenceReport,
    /// What the model predicted from what was known when the migration started (the
    /// guest's dirty rate sampled while it connected, the link's rate this host learned in
    /// past migrations to that destination): beside what happened. None for the first
    /// migration to a destination (without --max-bandwidth).
    #[serde(default)]
    pub prediction: Option<PlanPrediction>,
    /// What the bandwidth controller did (source side).
    #[serde(default)]
    pub pacing: PacingReport,
    /// Links lost before the switchover and waited out (source side), in order.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub outages: Vec<LinkOutage>,
    /// What the migration took of the source host's CPU (None: /proc could not be read,
    /// or the transfer was too short to say).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host_cpu: Option<HostCpuReport>,
    /// Post-copy was used (`postcopy` asked): the VM ran at the destination from
    /// POSTCOPY_RUN on; `postcopy_ms` is how long post-copy took (RUN to the stream's end).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub postcopy: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub postcopy_ms: Option<u64>,
    /// Post-copy: what the guest's page faults cost it, as the destination counted them
    /// (None: no post-copy, or a destination older than protocol v12).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub postcopy_faults: Option<PostcopyFaults>,
}

/// The page faults of a post-copy migration at the destination.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PostcopyFaults {
    /// Page requests the destination QEMU sent to the source (its guest touched a page
    /// it did not have yet).
    pub requests: u64,
    /// The pages those requests asked for.
    pub pages: u64,
    /// Of those pages, how many came from the destination's page store: the source sent a
    /// reference to content the destination held (a return trip, content it had seen
    /// before), so the page's bytes did not cross the link (protocol v13; 0 from an older
    /// destination).
    #[serde(default)]
    pub served_locally: u64,
    /// The time every vCPU waited on a page at once, ms (QEMU's `postcopy-blocktime`;
    /// None: that QEMU did not measure it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub all_vcpus_blocked_ms: Option<u64>,
    /// The most any one vCPU waited on pages in all, ms.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_vcpu_blocked_ms: Option<u64>,
}

/// The source host's CPU around a migration, from `/proc/stat`: everything on the host
/// counted (on a host that runs the destination too, its side is in it).
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct HostCpuReport {
    /// Cores online.
    pub cores: u32,
    /// Cores busy just before the migration (the guest included), and over the transfer
    /// (to the guest's pause).
    pub busy_before: f64,
    pub busy_during: f64,
    /// Cores the guest's QEMU took over the transfer (its vCPUs and its migration thread).
    #[serde(default)]
    pub qemu_during: Option<f64>,
    /// CPU seconds the migration added on this host per GiB of QEMU's stream (the
    /// prediction's input: how fast the data path can go on the cores left free).
    #[serde(default)]
    pub core_s_per_gib: Option<f64>,
}

/// A lost link the source waited out.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct LinkOutage {
    /// When tern gave the try up (ms since the migration started).
    pub lost_at_ms: u64,
    /// How long until the destination answered again.
    pub waited_ms: u64,
    /// What failed.
    pub cause: String,
    /// Bytes on the wire up to the loss (the report's total counts them too).
    pub wire_bytes_before: u64,
}

/// What the bandwidth controller did.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct PacingReport {
    /// `fastest`, `least-downtime` or `least-link-use`.
    pub objective: String,
    pub deadline_s: Option<u64>,
    /// Whether it finished within the deadline (None: no deadline).
    pub deadline_met: Option<bool>,
    /// The least round trip the data connections saw, ms (the path without queueing).
    pub base_rtt_ms: f64,
    /// The queueing delay the controller holds the path under, ms (least-link-use).
    pub target_queue_ms: f64,
    /// What the link delivered (bytes the destination acknowledged per second), MiB/s:
    /// the mean over the transfer and the highest of one second.
    pub delivered_mean_mibps: f64,
    pub delivered_max_mibps: f64,
    /// The limit the controller set: least and highest (None: never limited).
    pub rate_min_mibps: Option<f64>,
    pub rate_max_mibps: Option<f64>,
    /// Times it backed off for other traffic, and for how long in all, ms.
    pub yields: u32,
    pub yielded_ms: u64,
    /// Each decision that changed the regime, in words, with when (ms since the start).
    pub steps: Vec<String>,
}

/// What tern did to make pre-copy converge.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct ConvergenceReport {
    /// Dirty-bitmap syncs QEMU made (1: the first pass was the only one).
    pub dirty_syncs: u64,
    /// The highest guest CPU throttle QEMU applied, percent (0: never slowed).
    pub throttle_max_pct: u8,
    /// The downtime limit at the end, ms (higher than asked if tern raised it).
    pub downtime_limit_ms: u64,
    /// The guest's dirty rate and the rate its memory crossed, at the last sync, MiB/s.
    pub dirty_mibps: f64,
    pub transfer_mibps: f64,
    /// Each step tern took, in words, with when (ms since the migration began).
    pub steps: Vec<String>,
}

/// What a migration would cost, before it starts (`tern migrate VM --to HOST --plan`,
/// `POST /v1/vms/{name}/plan`): the inputs, measured, and the prediction of the model
/// (docs/convergence.md). Nothing of the VM moves to make it.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct MigrationPlan {
    pub vm: String,
    pub destination: String,
    /// The destination agent's name and the protocol version both speak.
    pub destination_agent: String,
    pub protocol_version: u16,
    pub inputs: PlanInputs,
    /// None when the link's rate is not known (no migration to that destination yet and
    /// no --max-bandwidth): `notes` says so.
    pub prediction: Option<PlanPrediction>,
    /// What the inputs assume, in words.
    pub notes: Vec<String>,
}

/// What a plan was made from.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct PlanInputs {
    pub ram_bytes: u64,
    /// From a sample of 1024 pages of RAM (None: it could not be read): the share that is
    /// zero, and compressed bytes per byte of the rest (zstd -1).
    #[serde(default)]
    pub zero_fraction: Option<f64>,
    #[serde(default)]
    pub compressed_ratio: Option<f64>,
    /// The local disks' allocated bytes (what a copy without help from the destination
    /// sends).
    pub disk_bytes: u64,
    /// Of a sample of the local disks' data, the share the destination's chunk index
    /// holds (None: no local disk, or it could not be asked).
    #[serde(default)]
    pub disk_held_fraction: Option<f64>,
    /// The guest's dirty rate, MiB/s (QEMU's page sampling over `dirty_sample_s`).
    pub dirty_mibps: f64,
    /// Wire bytes per byte of a page the guest rewrote, sent against its previous version
    /// (a delta, or the page compressed), from a second look at the RAM sample (None: too
    /// few of its pages changed to say).
    #[serde(default)]
    pub rewritten_ratio: Option<f64>,
    pub dirty_sample_s: u64,
    /// The round trip to the destination agent (TLS connection, Hello), ms.
    pub rtt_ms: f64,
    /// Of the sampled pages that are not zero, the share the destination's page store
    /// holds (None: not asked, a destination older than protocol v9, or no sample).
    #[serde(default)]
    pub held_fraction: Option<f64>,
    /// The link as a probe measured it over the agents' TLS connection (only when no past
    /// migration and no `--max-bandwidth` said the rate): wire MiB/s, and the filler sent.
    #[serde(default)]
    pub probe_mibps: Option<f64>,
    #[serde(default)]
    pub probe_bytes: u64,
    /// The rate memory crossed at to this destination before, MiB/s of QEMU's stream,
    /// and wire bytes per stream byte; where they come from.
    pub link_mibps: Option<f64>,
    pub wire_ratio: f64,
    pub link_from: String,
    pub downtime_limit_ms: u64,
    pub max_throttle: u8,
    pub max_downtime_ms: u64,
    /// The source host's cores, and those left free while the guest ran as it does now
    /// (None: not measured).
    #[serde(default)]
    pub cores: Option<u32>,
    #[serde(default)]
    pub free_cores: Option<f64>,
    /// Cores the guest's QEMU took meanwhile (what a throttle can give back).
    #[serde(default)]
    pub guest_cores: Option<f64>,
    /// CPU seconds per GiB of QEMU's stream the data path took here in past migrations to
    /// this destination (None: not learnt yet): with the free cores, how fast it can go.
    #[serde(default)]
    pub core_s_per_gib: Option<f64>,
}

/// What the model predicts.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct PlanPrediction {
    pub total_s: f64,
    pub downtime_ms: f64,
    /// Bytes on the wire: memory and disks apart.
    pub memory_wire_bytes: u64,
    pub disk_wire_bytes: u64,
    /// Pre-copy rounds (1: the first pass was enough).
    pub rounds: u32,
    /// Whether plain pre-copy converges at this dirty rate, without tern's help.
    pub converges_without_help: bool,
    /// What tern will do: the throttle it will need, the downtime limit it will end at,
    /// and whether it will stop (`not-converging`) within what the request allows.
    pub throttle_pct: u8,
    pub downtime_limit_ms: u64,
    pub stops: bool,
    /// The same, in words.
    pub summary: String,
    /// Of `downtime_ms`: the part that does not depend on the last dirty set (the stream's
    /// end crossing, the digests, the commit, the resume), as assumed or as learnt from past
    /// migrations to this destination.
    #[serde(default)]
    pub switchover_fixed_ms: f64,
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
    fn postcopy_and_its_fallback_are_one_or_the_other() {
        let mut r = MigrateRequest {
            to: "host-b:7700".into(),
            postcopy_fallback: true,
            max_throttle: Some(50),
            ..Default::default()
        };
        // the fallback throttles first
        assert_eq!(r.validate(), Ok(()));
        r.max_throttle = None;
        r.postcopy = true;
        let why = r.validate().unwrap_err();
        assert!(why.contains("--postcopy-fallback"), "{why}");
        let carried = LibvirtMigrateRequest {
            libvirt_to: "qemu+tls://b/system".into(),
            virsh_flags: Vec::new(),
            copy_storage: false,
            migrate: MigrateRequest {
                to: "host-b:7700".into(),
                postcopy_fallback: true,
                ..Default::default()
            },
        };
        assert!(carried.validate().unwrap_err().contains("libvirt"));
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
            Phase::WaitingForLink,
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

    #[test]
    fn requests_that_cannot_be_carried_out_are_refused_with_what_to_change() {
        let ok = MigrateRequest {
            to: "b:7700".into(),
            ..Default::default()
        };
        assert_eq!(ok.validate(), Ok(()));
        let bad = |f: &dyn Fn(&mut MigrateRequest)| {
            let mut r = ok.clone();
            f(&mut r);
            r.validate().unwrap_err()
        };
        assert!(bad(&|r| r.to = " ".into()).contains("--to"));
        assert!(bad(&|r| r.max_bandwidth_mibps = Some(0)).contains("--max-bandwidth"));
        assert!(bad(&|r| r.max_bandwidth_mibps = Some(u64::MAX)).contains("--max-bandwidth"));
        assert!(bad(&|r| r.max_throttle = Some(100)).contains("--max-throttle"));
        assert!(bad(&|r| r.downtime_ms = Some(0)).contains("downtime"));
        assert!(bad(&|r| {
            r.downtime_ms = Some(500);
            r.max_downtime_ms = Some(400)
        })
        .contains("--max-downtime"));
        assert!(bad(&|r| r.max_downtime_ms = Some(3_600_000)).contains("--max-downtime"));
        assert!(bad(&|r| r.converge_timeout_s = Some(0)).contains("--converge-timeout"));
        assert!(bad(&|r| r.deadline_s = Some(0)).contains("--deadline"));
        assert!(bad(&|r| {
            r.deadline_s = Some(600);
            r.objective = Some(Objective::Fastest)
        })
        .contains("least-link-use"));
        assert!(bad(&|r| r.outage_wait_s = Some(MAX_OUTAGE_WAIT_S + 1)).contains("--outage-wait"));
        assert_eq!(ok.outage_wait().as_secs(), DEFAULT_OUTAGE_WAIT_S);
        let mut fine = ok.clone();
        fine.outage_wait_s = Some(0);
        assert_eq!(fine.validate(), Ok(()), "0: fail at the first stall");
        assert!(fine.outage_wait().is_zero());
        fine.max_throttle = Some(0);
        fine.max_downtime_ms = Some(2000);
        assert_eq!(fine.validate(), Ok(()));
    }

    #[test]
    fn objectives_deadlines_and_the_downtime_they_start_with() {
        let mut r = MigrateRequest {
            to: "b:7700".into(),
            ..Default::default()
        };
        assert_eq!(
            (r.objective(), r.downtime_limit_ms()),
            (Objective::Fastest, 300)
        );
        r.deadline_s = Some(600);
        assert_eq!(r.objective(), Objective::LeastLinkUse, "a deadline alone");
        assert_eq!(r.validate(), Ok(()));
        r.deadline_s = None;
        r.objective = Some(Objective::LeastDowntime);
        assert_eq!(r.downtime_limit_ms(), 50);
        r.downtime_ms = Some(120);
        assert_eq!(r.downtime_limit_ms(), 120, "the operator's limit wins");
        for o in ["fastest", "least-downtime", "least-link-use"] {
            let parsed: Objective = o.parse().unwrap();
            assert_eq!(parsed.as_str(), o);
            assert_eq!(serde_json::to_string(&parsed).unwrap(), format!("\"{o}\""));
        }
        assert!("cheapest".parse::<Objective>().is_err());
        assert_eq!(parse_duration_s("90"), Ok(90));
        assert_eq!(parse_duration_s("90s"), Ok(90));
        assert_eq!(parse_duration_s("10m"), Ok(600));
        assert_eq!(parse_duration_s("2h"), Ok(7200));
        for bad in ["", "m", "ten", "-5s", "1.5m", "99999999999999999999h"] {
            assert!(parse_duration_s(bad).is_err(), "{bad}");
        }
    }
}

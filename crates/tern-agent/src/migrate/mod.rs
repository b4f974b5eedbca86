//! Migration in both directions: the source side ([`source`]) drives the source QEMU and
//! forwards its stream; the destination side ([`dest`]) starts the destination QEMU and
//! rebuilds the stream for it. This module holds what both share: the handle the API
//! reads progress from, the report, the typed errors and the fault-injection hooks.
//!
//! Safety rule (Propolis-style): the source stays authoritative until the switchover
//! point, the `Commit` message. Before it, every failure resumes the source VM and
//! removes the destination's. After it, the destination owns the VM.

pub mod codec;
pub mod dest;
pub mod digest;
pub mod disk;
pub mod pages;
pub mod rate;
pub mod source;

use parking_lot::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Instant, SystemTime};

pub use tern_api::{
    Direction, DiskReport, EncodingReport, FailureInfo, MigrationReport, MigrationStatus,
    PageCounts, Phase, Progress, SwitchoverTimes, Timeline,
};
use tern_proto::ErrorCode;
use tokio::sync::watch;

/// Faults a test can inject into an agent (env `TERN_FAULT`). Never set in production.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// The destination flips one byte of the first non-zero page it receives, as a
    /// decoding bug would: the digest comparison must catch it before the VM runs there.
    CorruptPage,
    /// The destination resumes the VM after Commit but drops the connection instead of
    /// answering Resumed: the source must find out by asking (Query), not guess.
    DropAfterCommit,
    /// The destination copies each disk image to `PATH.at-switchover` after the last disk
    /// round, just before the VM runs there: a test's witness of the images at the
    /// switchover (the running guest changes them right after).
    DiskCopyAtSwitchover,
    /// The source agent exits (as if killed) when its QEMU pauses before the switchover:
    /// the VM is left paused, migrating into a dead socket, with tern's NBD state in it.
    ExitAtPreSwitchover,
    /// The destination agent exits right after it recorded the switchover, before `cont`:
    /// the VM is paused there, the source committed and waiting.
    ExitAtSwitchover,
    /// The destination cannot write its switchover record: it must not run the VM.
    FailSwitchRecord,
    /// The destination panics (a bug) on the first page frame of its first incoming
    /// migration, holding the page store's lock: it must clean up like an error does and
    /// take the next migration.
    PanicInTransfer,
    /// The destination takes 35 s more to finish after its QEMU loaded the stream (as a
    /// large disk's last flush would): the source must wait, not declare doubt.
    SlowFinish,
}

/// Whether a once-per-process fault fires now (the first time it is asked).
pub fn fault_once() -> bool {
    static FIRED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);
    !FIRED.swap(true, Ordering::SeqCst)
}

impl std::str::FromStr for Fault {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "corrupt-page" => Ok(Fault::CorruptPage),
            "drop-after-commit" => Ok(Fault::DropAfterCommit),
            "disk-copy-at-switchover" => Ok(Fault::DiskCopyAtSwitchover),
            "exit-at-pre-switchover" => Ok(Fault::ExitAtPreSwitchover),
            "exit-at-switchover" => Ok(Fault::ExitAtSwitchover),
            "fail-switch-record" => Ok(Fault::FailSwitchRecord),
            "panic-in-transfer" => Ok(Fault::PanicInTransfer),
            "slow-finish" => Ok(Fault::SlowFinish),
            _ => Err(format!(
                "unknown fault {s:?} (known: corrupt-page, drop-after-commit, disk-copy-at-switchover, exit-at-pre-switchover, exit-at-switchover, fail-switch-record, panic-in-transfer, slow-finish)"
            )),
        }
    }
}

/// Live counters, updated by the data path without locks.
#[derive(Debug, Default)]
pub struct Counters {
    pub bytes_from_qemu: AtomicU64,
    pub wire_out: AtomicU64,
    pub wire_in: AtomicU64,
    pub pages_zero: AtomicU64,
    pub pages_raw: AtomicU64,
    pub pages_ref: AtomicU64,
    pub pages_delta: AtomicU64,
    /// Contents the destination had to ask for (references it could not resolve).
    pub wants: AtomicU64,
    /// Bytes through the extra data connections (parallel streams), either direction.
    pub wire_data: AtomicU64,
    /// Bytes/s of QEMU's stream the link carries for pages sent as bytes (0: unknown).
    pub switchover_bps: AtomicU64,
}

impl Counters {
    pub fn add(c: &AtomicU64, n: u64) {
        c.fetch_add(n, Ordering::Relaxed);
    }
    pub fn get(c: &AtomicU64) -> u64 {
        c.load(Ordering::Relaxed)
    }
}

/// Pages by how they crossed the wire, from the live counters.
pub fn page_counts(c: &Counters) -> PageCounts {
    let zero = Counters::get(&c.pages_zero);
    let raw = Counters::get(&c.pages_raw);
    let refs = Counters::get(&c.pages_ref);
    let deltas = Counters::get(&c.pages_delta);
    PageCounts {
        zero,
        raw,
        refs,
        deltas,
        total: zero + raw + refs + deltas,
    }
}

/// The shared handle of one migration: the engine writes, the API reads.
pub struct MigrationHandle {
    pub id: String,
    pub vm: String,
    pub direction: Direction,
    pub peer: String,
    /// Incoming: the certificate of the peer that prepared it (empty in plaintext mode);
    /// only it may attach data connections and ask what became of the migration.
    peer_cert: String,
    pub started: Instant,
    pub counters: Counters,
    status: Mutex<MigrationStatus>,
    cancel_tx: watch::Sender<bool>,
}

impl MigrationHandle {
    pub fn new(id: String, vm: String, direction: Direction, peer: String) -> MigrationHandle {
        let status = MigrationStatus {
            id: id.clone(),
            vm: vm.clone(),
            direction,
            peer: peer.clone(),
            phase: Phase::Connect,
            finished: false,
            progress: Progress::default(),
            report: None,
            error: None,
            dest_qemu_pid: None,
            timeline: Timeline::default(),
        };
        MigrationHandle {
            id,
            vm,
            direction,
            peer,
            peer_cert: String::new(),
            started: Instant::now(),
            counters: Counters::default(),
            status: Mutex::new(status),
            cancel_tx: watch::channel(false).0,
        }
    }

    /// An incoming migration, bound to the certificate `peer_cert` that prepared it.
    pub fn incoming(id: String, vm: String, peer: String, peer_cert: String) -> MigrationHandle {
        MigrationHandle {
            peer_cert,
            ..MigrationHandle::new(id, vm, Direction::Incoming, peer)
        }
    }

    pub fn peer_fingerprint(&self) -> &str {
        &self.peer_cert
    }

    pub fn status(&self) -> MigrationStatus {
        let mut s = self.status.lock().clone();
        if !s.finished {
            let c = &self.counters;
            s.progress.elapsed_ms = self.started.elapsed().as_millis() as u64;
            s.progress.bytes_from_qemu = Counters::get(&c.bytes_from_qemu);
            s.progress.bytes_on_wire = Counters::get(&c.wire_out)
                + Counters::get(&c.wire_in)
                + Counters::get(&c.wire_data);
            s.progress.pages = page_counts(c);
        }
        s
    }

    pub fn update(&self, f: impl FnOnce(&mut MigrationStatus)) {
        f(&mut self.status.lock())
    }

    /// The migration enters `phase` (its timeline records when).
    pub fn set_phase(&self, phase: Phase) {
        tracing::info!(migration = %self.id, vm = %self.vm, phase = phase.as_str(), "migration phase");
        let at = self.started.elapsed();
        self.update(|s| {
            s.phase = phase;
            s.timeline.enter(phase, at);
        });
    }

    pub fn is_finished(&self) -> bool {
        self.status.lock().finished
    }

    pub fn finish_ok(&self, mut report: MigrationReport) {
        let at = self.started.elapsed();
        self.update(|s| {
            s.phase = Phase::Done;
            s.timeline.enter(Phase::Done, at);
            report.timeline = s.timeline.clone();
            s.finished = true;
            s.progress.elapsed_ms = report.total_time_ms;
            s.progress.bytes_from_qemu = report.bytes_from_qemu;
            s.progress.bytes_on_wire = report.bytes_on_wire;
            s.progress.pages = report.pages.clone();
            s.report = Some(report);
        });
    }

    pub fn finish_err(&self, code: ErrorCode, message: String, vm_state: String) {
        tracing::warn!(migration = %self.id, vm = %self.vm, code = code.name(), %message, %vm_state, "migration failed");
        let at = self.started.elapsed();
        self.update(|s| {
            s.phase = Phase::Failed;
            s.timeline.enter(Phase::Failed, at);
            s.finished = true;
            s.progress.elapsed_ms = self.started.elapsed().as_millis() as u64;
            s.error = Some(FailureInfo {
                code: code.name().into(),
                message,
                retryable: code.retryable(),
                vm_state,
            });
        });
    }

    /// Asks the migration to stop; it fails with `cancelled` unless past switchover.
    pub fn cancel(&self) {
        let _ = self.cancel_tx.send(true);
    }

    pub fn cancelled(&self) -> watch::Receiver<bool> {
        self.cancel_tx.subscribe()
    }

    pub fn is_cancelled(&self) -> bool {
        *self.cancel_tx.borrow()
    }
}

/// Resolves once the migration was asked to stop.
pub async fn wait_cancelled(rx: &mut watch::Receiver<bool>) {
    let cancelled = rx.wait_for(|c| *c).await.is_ok();
    if !cancelled {
        // the handle is gone: never resolve
        std::future::pending::<()>().await;
    }
}

/// What a caught panic said, for an error message.
pub fn panic_message(p: &(dyn std::any::Any + Send)) -> String {
    p.downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| p.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "panic".into())
}

/// A new migration id: short, unique enough per agent pair, safe in file names.
pub fn new_migration_id() -> String {
    let t = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    let h = xxhash_rust::xxh3::xxh3_64(&t.to_le_bytes()) ^ u64::from(std::process::id());
    format!("m{:012x}", h & 0xffff_ffff_ffff)
}

pub fn unix_us(t: SystemTime) -> u64 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_micros() as u64)
        .unwrap_or(0)
}

/// Capabilities tern cannot carry through its data path, and what to tell the operator.
pub const UNSUPPORTED_CAPABILITIES: &[(&str, &str)] = &[
    (
        "multifd",
        "multifd moves pages over side channels tern does not terminate",
    ),
    (
        "xbzrle",
        "XBZRLE deltas depend on destination state; tern does its own delta encoding",
    ),
    ("compress", "QEMU's compression is replaced by tern's own"),
    ("postcopy-ram", "postcopy is not supported by tern yet"),
    ("postcopy-preempt", "postcopy is not supported by tern yet"),
    (
        "postcopy-blocktime",
        "postcopy is not supported by tern yet",
    ),
    ("x-colo", "COLO is not supported"),
    ("rdma-pin-all", "RDMA is not supported"),
    (
        "dirty-bitmaps",
        "dirty-bitmap migration is not supported; tern migrates disks itself",
    ),
    (
        "block",
        "block migration is not supported; tern migrates disks itself",
    ),
    ("mapped-ram", "mapped-ram is for migration to a file"),
    (
        "background-snapshot",
        "background snapshots are not migrations",
    ),
    (
        "x-ignore-shared",
        "shared-memory skipping is not supported yet",
    ),
];

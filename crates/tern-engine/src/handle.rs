//! One migration as the daemon's API sees it: the shared [`MigrationHandle`] the engine
//! writes (phase and timeline, live [`Counters`], the final report or failure) and the API
//! reads, its cancellation, and small helpers both directions use (ids, wall-clock
//! stamps). Must not drive a migration.

use parking_lot::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Instant, SystemTime};

pub use tern_api::{
    ConvergenceReport, Direction, DiskReport, EncodingReport, FailureInfo, MigrationReport,
    MigrationStatus, PageCounts, Phase, Progress, SwitchoverTimes, Timeline,
};
use tern_proto::ErrorCode;

use tokio::sync::watch;

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
    /// Bytes the control connections of earlier tries carried (a try that lost the link;
    /// `wire_out` and `wire_in` count the current try's connection).
    pub wire_earlier: AtomicU64,
    /// Bytes/s of QEMU's stream the link carries for pages sent as bytes (0: unknown).
    pub switchover_bps: AtomicU64,
    /// The same at one byte of stream per byte on the wire (what the first pass may
    /// assume: the compression ratio of its pages says nothing of the last dirty ones).
    pub switchover_wire_bps: AtomicU64,
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
    /// Where its phase changes go (the registry's event stream), once registered.
    events: std::sync::OnceLock<std::sync::Arc<crate::events::EventLog>>,
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
            events: std::sync::OnceLock::new(),
        }
    }

    /// An incoming migration, bound to the certificate `peer_cert` that prepared it.
    pub fn incoming(id: String, vm: String, peer: String, peer_cert: String) -> MigrationHandle {
        MigrationHandle {
            peer_cert,
            ..MigrationHandle::new(id, vm, Direction::Incoming, peer)
        }
    }

    /// Its phase changes go to `events` from now on.
    pub fn tell(&self, events: std::sync::Arc<crate::events::EventLog>) {
        let _ = self.events.set(events);
    }

    fn emit(&self) {
        if let Some(e) = self.events.get() {
            e.emit(tern_api::events::AgentEvent::Migration {
                status: Box::new(self.status()),
            });
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
                + Counters::get(&c.wire_data)
                + Counters::get(&c.wire_earlier);
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
        self.emit();
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
            s.progress.percent = 100.0;
            s.progress.eta_ms = Some(0);
            s.report = Some(report);
        });
        self.emit();
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
        self.emit();
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

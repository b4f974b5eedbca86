//! Departure snapshots: what a VM leaves on this host when it migrates away, so that a
//! cluster controller can run it here again when the host it went to dies.
//!
//! While a VM migrates out, the engine records the stream its QEMU sends
//! (`tern_engine::source::record`) into `STATE_DIR/snapshots/.incoming-ID/stream`. Once
//! the VM runs at the destination, the recording becomes `STATE_DIR/snapshots/VM/`:
//! `stream` (the VM's memory and device state at the switchover), `spec.toml`,
//! `meta.json` ([`SnapshotMeta`]; its disks are the ones `images::keep_departed_disks`
//! kept, as they were at the switchover) and, for a VM with a vTPM, its migration key.
//! It is written under a temporary name and renamed, so a half-written snapshot is never
//! listed. The VM's next departure replaces it; the VM arriving here again removes it;
//! the oldest others go when the total passes `--snapshot-limit-mib`.
//!
//! A departure is its migration's id, noted when the migration begins
//! ([`recording_for`]). Only the newest departure of a VM, and only while the VM has not
//! arrived here since, puts its snapshot in place (checked under the lock that renames):
//! a VM that left, came back and left again keeps its disks under the same names, so an
//! older departure's snapshot finished last would pair its stream with the newer
//! departure's disks. Such an older one discards its own files instead.
//!
//! [`restart`] runs a snapshot again: a QEMU started as an incoming migration's
//! destination, on a qcow2 overlay of each kept disk (the kept image stays unchanged),
//! fed the recorded stream through a socket pair, then resumed and registered like any
//! started VM.
//!
//! Owns the snapshot directory and its rules; must not move bytes of a migration (the
//! engine records) or decide when to restart (the controller does).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use parking_lot::Mutex;
use serde_json::json;
use tern_api::snapshot::{RestartReport, SnapshotDisk, SnapshotInfo, SnapshotMeta};
use tern_engine::source::record::{RecordState, StreamRecording};
use tern_qemu::launch::LaunchOptions;
use tern_qemu::spec::{DiskFormat, VmSpec};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::vm::Vm;
use crate::Agent;

/// `--snapshot-limit-mib` unless set: the recorded streams this host keeps, in all.
pub const DEFAULT_LIMIT_MIB: u64 = 8192;
/// Why a VM with a shared disk leaves no restartable snapshot.
pub const SHARED_DISK: &str =
    "a shared disk moved on with the VM; its memory here is older than the disk";
/// How long a departure waits for its recording to be on disk.
const SETTLE_WITHIN: Duration = Duration::from_secs(600);

/// The snapshot directory of an agent and the lock its renames take.
pub struct Snapshots {
    dir: PathBuf,
    limit_bytes: u64,
    /// Held while a snapshot is put in place or removed; what it guards says which
    /// departure may still put one in place.
    lock: Mutex<Departures>,
}

/// Per VM, the one departure (migration id) whose snapshot may still be put in place:
/// the newest that began here, until the VM arrives here again or that departure's
/// snapshot is done with. Every other departure of the VM is superseded.
#[derive(Debug, Default)]
struct Departures(HashMap<String, String>);

impl Departures {
    /// Migration `id` of VM `vm` began: any older departure of it is superseded.
    fn began(&mut self, vm: &str, id: &str) {
        self.0.insert(vm.to_string(), id.to_string());
    }

    /// VM `vm` runs here again: every departure of it so far is superseded.
    fn arrived(&mut self, vm: &str) {
        self.0.remove(vm);
    }

    /// Whether departure `id` of VM `vm` may put its snapshot in place.
    fn is_newest(&self, vm: &str, id: &str) -> bool {
        self.0.get(vm).is_some_and(|newest| newest == id)
    }

    /// Departure `id` of VM `vm` is done with (its snapshot put in place or given up);
    /// whether it was the newest.
    fn ended(&mut self, vm: &str, id: &str) -> bool {
        let newest = self.is_newest(vm, id);
        if newest {
            self.0.remove(vm);
        }
        newest
    }
}

/// What became of a departure's snapshot ([`Snapshots::commit`]).
#[derive(Debug)]
enum Commit {
    /// In place; these others went to fit the limit.
    Kept { evicted: Vec<String> },
    /// A newer departure of the VM, or its arrival here, came after it: discarded.
    Superseded,
    /// The VM runs here again: discarded.
    RunsHere,
    /// It could not be renamed into place: discarded.
    Failed(std::io::Error),
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

impl Snapshots {
    pub fn new(state_dir: &Path, limit_mib: u64) -> Snapshots {
        Snapshots {
            dir: state_dir.join("snapshots"),
            limit_bytes: limit_mib.saturating_mul(1 << 20),
            lock: Mutex::new(Departures::default()),
        }
    }

    /// Where VM `vm`'s snapshot is.
    pub fn dir_of(&self, vm: &str) -> PathBuf {
        self.dir.join(vm)
    }

    /// What a previous agent left half done (recordings, snapshots being written or
    /// removed) goes.
    pub fn clean_partial(&self) {
        let Ok(entries) = std::fs::read_dir(&self.dir) else {
            return;
        };
        for e in entries.flatten() {
            if e.file_name().to_string_lossy().starts_with('.') {
                let _ = std::fs::remove_dir_all(e.path());
            }
        }
    }

    /// Every snapshot here, by VM name.
    pub fn list(&self) -> Vec<SnapshotInfo> {
        let now = now_ms();
        let mut out: Vec<SnapshotInfo> = self
            .metas()
            .into_iter()
            .map(|meta| SnapshotInfo {
                age_s: now.saturating_sub(meta.taken_unix_ms) as f64 / 1000.0,
                meta,
            })
            .collect();
        out.sort_by(|a, b| a.meta.vm.cmp(&b.meta.vm));
        out
    }

    fn metas(&self) -> Vec<SnapshotMeta> {
        let Ok(entries) = std::fs::read_dir(&self.dir) else {
            return Vec::new();
        };
        entries
            .flatten()
            .filter(|e| !e.file_name().to_string_lossy().starts_with('.'))
            .filter_map(|e| match read_meta(&e.path()) {
                Ok(m) => Some(m),
                Err(why) => {
                    tracing::warn!(dir = %e.path().display(), "an unreadable snapshot: {why}");
                    None
                }
            })
            .collect()
    }

    /// Removes VM `vm`'s snapshot; false if there was none.
    pub fn remove(&self, vm: &str) -> bool {
        let _g = self.lock.lock();
        self.remove_locked(vm)
    }

    fn remove_locked(&self, vm: &str) -> bool {
        let dir = self.dir_of(vm);
        if !dir.exists() {
            return false;
        }
        // out of the listing at once; the bytes go in the background
        let trash = self.dir.join(format!(".trash-{vm}-{}", now_ms()));
        match std::fs::rename(&dir, &trash) {
            Ok(()) => {
                std::thread::spawn(move || {
                    let _ = std::fs::remove_dir_all(&trash);
                });
            }
            Err(_) => {
                let _ = std::fs::remove_dir_all(&dir);
            }
        }
        true
    }

    /// VM `vm` runs here again (it arrived, or was restarted): its snapshot is stale, and
    /// so is any of its departures whose snapshot is still being kept.
    pub fn arrived(&self, vm: &str) {
        let removed = {
            let mut departures = self.lock.lock();
            departures.arrived(vm);
            self.remove_locked(vm)
        };
        if removed {
            tracing::info!(
                vm,
                "removed the VM's departure snapshot: it runs here again"
            );
        }
    }
}

impl Snapshots {
    /// Migration `id` of VM `vm` began: it is the VM's newest departure.
    fn departure_began(&self, vm: &str, id: &str) {
        self.lock.lock().began(vm, id);
    }

    /// Puts the snapshot written at `tmp` in place as VM `vm`'s, if departure `id` is its
    /// newest and the VM does not run here (`runs_here`, asked under the lock); then
    /// drops the oldest others while the total passes the limit. What is not put in
    /// place is removed.
    fn commit(&self, vm: &str, id: &str, tmp: &Path, runs_here: impl FnOnce() -> bool) -> Commit {
        let mut departures = self.lock.lock();
        if !departures.ended(vm, id) {
            let _ = std::fs::remove_dir_all(tmp);
            return Commit::Superseded;
        }
        if runs_here() {
            // it came back meanwhile: its state here is the running VM's
            let _ = std::fs::remove_dir_all(tmp);
            return Commit::RunsHere;
        }
        self.remove_locked(vm);
        if let Err(e) = std::fs::rename(tmp, self.dir_of(vm)) {
            let _ = std::fs::remove_dir_all(tmp);
            return Commit::Failed(e);
        }
        let all: Vec<(String, u64, u64)> = self
            .metas()
            .into_iter()
            .map(|m| (m.vm, m.taken_unix_ms, m.file_bytes))
            .collect();
        let evicted = evict(&all, vm, self.limit_bytes);
        for v in &evicted {
            self.remove_locked(v);
        }
        Commit::Kept { evicted }
    }

    /// Departure `id` of VM `vm` leaves no snapshot: the one the VM has goes (it is
    /// older than its disks now), unless that departure is superseded (the snapshot is
    /// then a newer one's, or none). Whether it was the newest.
    fn departed_without(&self, vm: &str, id: &str) -> bool {
        let mut departures = self.lock.lock();
        if !departures.ended(vm, id) {
            return false;
        }
        self.remove_locked(vm);
        true
    }
}

fn read_meta(dir: &Path) -> Result<SnapshotMeta, String> {
    let text = std::fs::read(dir.join("meta.json")).map_err(|e| e.to_string())?;
    serde_json::from_slice(&text).map_err(|e| e.to_string())
}

/// The snapshots to drop so that the others fit in `limit_bytes` with `keep`: the oldest
/// first, never `keep`. `all` is (VM, taken_unix_ms, file_bytes).
pub fn evict(all: &[(String, u64, u64)], keep: &str, limit_bytes: u64) -> Vec<String> {
    let mut total: u64 = all.iter().map(|(_, _, b)| *b).sum();
    let mut others: Vec<&(String, u64, u64)> = all.iter().filter(|(v, _, _)| v != keep).collect();
    others.sort_by_key(|(v, t, _)| (*t, v.clone()));
    let mut out = Vec::new();
    for (vm, _, bytes) in others {
        if total <= limit_bytes {
            break;
        }
        total -= bytes;
        out.push(vm.clone());
    }
    out
}

/// How an outgoing migration's stream is recorded.
pub enum Recording {
    /// Snapshots are off (`--snapshot-limit-mib 0`).
    Off,
    /// Not recorded, for this reason (the snapshot says it cannot restart).
    Not(String),
    /// Recorded by the engine into `.incoming-ID/stream`.
    Into(Arc<StreamRecording>),
}

impl Recording {
    /// For the engine ([`tern_engine::source::SourceVm::record`]).
    pub fn engine(&self) -> Option<Arc<StreamRecording>> {
        match self {
            Recording::Into(r) => Some(r.clone()),
            _ => None,
        }
    }
}

/// Whether and where migration `id` of `spec`'s VM records its stream.
/// Migration `id` becomes the VM's newest departure (see the module's doc).
pub fn recording_for(agent: &Agent, spec: &VmSpec, id: &str) -> Recording {
    let s = &agent.snapshots;
    s.departure_began(&spec.name, id);
    if s.limit_bytes == 0 {
        return Recording::Off;
    }
    if spec.disks.iter().any(|d| d.shared) {
        return Recording::Not(SHARED_DISK.into());
    }
    let mem = u64::from(spec.memory_mib) << 20;
    if mem > s.limit_bytes {
        return Recording::Not(format!(
            "its memory ({} MiB) is more than the snapshots may take here (--snapshot-limit-mib {})",
            spec.memory_mib,
            s.limit_bytes >> 20
        ));
    }
    let dir = s.dir.join(format!(".incoming-{id}"));
    if let Err(e) = std::fs::create_dir_all(&dir) {
        return Recording::Not(format!("cannot create {}: {e}", dir.display()));
    }
    Recording::Into(StreamRecording::new(dir.join("stream"), s.limit_bytes))
}

/// A migration that failed: its recording goes (once its writer is done with it).
pub fn discard(recording: Recording) {
    let Recording::Into(r) = recording else {
        return;
    };
    let dir = r.path().parent().map(Path::to_path_buf);
    tokio::spawn(async move {
        r.settled(SETTLE_WITHIN).await;
        if let Some(d) = dir {
            let _ = std::fs::remove_dir_all(d);
        }
    });
}

/// A VM that left: what its snapshot is made of.
pub struct Departed {
    pub spec: VmSpec,
    pub migration_id: String,
    pub destination: String,
    pub recording: Recording,
    /// Its local disks as `images::keep_departed_disks` kept them.
    pub kept: Vec<(PathBuf, DiskFormat)>,
    /// Its vTPM migration key (a VM with a vTPM); None if it could not be read.
    pub tpm_key: Option<[u8; 32]>,
    pub was_running: bool,
}

/// Makes `d` the VM's snapshot (replacing the one it had), then drops the oldest others
/// while the total passes the limit; unless `d` is no longer the VM's newest departure
/// (see the module's doc): then its files go and the snapshot stays as it is. Runs after
/// the migration is reported (it waits for the recording to be on disk).
pub async fn keep(agent: Arc<Agent>, d: Departed) {
    let s = &agent.snapshots;
    let vm = d.spec.name.clone();
    let mut why_not: Option<String> = None;
    let mut file_bytes = 0u64;
    let mut taken_unix_ms = now_ms();
    let mut stream: Option<PathBuf> = None;
    match &d.recording {
        Recording::Off => {
            // no snapshot: the one it had is older than its disks now
            s.departed_without(&vm, &d.migration_id);
            return;
        }
        Recording::Not(why) => why_not = Some(why.clone()),
        Recording::Into(r) => match r.settled(SETTLE_WITHIN).await {
            RecordState::Complete {
                bytes,
                ended_unix_ms,
            } => {
                file_bytes = bytes;
                taken_unix_ms = ended_unix_ms;
                stream = Some(r.path().to_path_buf());
            }
            RecordState::GaveUp(why) => {
                why_not = Some(format!("its stream was not recorded: {why}"))
            }
            RecordState::Writing => why_not = Some("its stream was not on disk in time".into()),
            RecordState::Idle => why_not = Some("its stream was not recorded".into()),
        },
    }
    let local = d.spec.disks.iter().filter(|x| !x.shared).count();
    if why_not.is_none() && d.kept.len() != local {
        why_not = Some("a disk of it could not be kept here".into());
    }
    if why_not.is_none() && d.spec.tpm && d.tpm_key.is_none() {
        why_not = Some("its vTPM migration key could not be kept".into());
    }
    let restartable = why_not.is_none();
    let meta = SnapshotMeta {
        vm: vm.clone(),
        migration_id: d.migration_id.clone(),
        destination: d.destination.clone(),
        taken_unix_ms,
        mem_bytes: u64::from(d.spec.memory_mib) << 20,
        file_bytes: if restartable { file_bytes } else { 0 },
        disks: d
            .kept
            .iter()
            .map(|(p, f)| SnapshotDisk {
                path: p.clone(),
                format: f.as_str().into(),
            })
            .collect(),
        restartable,
        why_not,
        was_running: d.was_running,
    };
    let tmp = s.dir.join(format!(".tmp-{vm}-{}", d.migration_id));
    let written = write_snapshot(&tmp, &d, &meta, stream.as_deref().filter(|_| restartable));
    if let Recording::Into(r) = &d.recording {
        if let Some(dir) = r.path().parent() {
            let _ = std::fs::remove_dir_all(dir);
        }
    }
    if let Err(e) = written {
        tracing::warn!(vm = %vm, migration = %d.migration_id, "cannot keep the VM's departure snapshot: {e}");
        let _ = std::fs::remove_dir_all(&tmp);
        s.departed_without(&vm, &d.migration_id);
        return;
    }
    let evicted = match s.commit(&vm, &d.migration_id, &tmp, || agent.vm(&vm).is_some()) {
        Commit::Kept { evicted } => evicted,
        Commit::Superseded => {
            tracing::info!(
                vm = %vm,
                migration = %d.migration_id,
                "discarded the departure snapshot of an older migration: the VM left again or arrived here after it"
            );
            return;
        }
        Commit::RunsHere => return,
        Commit::Failed(e) => {
            tracing::warn!(vm = %vm, migration = %d.migration_id, "cannot keep the VM's departure snapshot: {e}");
            return;
        }
    };
    if !evicted.is_empty() {
        tracing::info!(
            limit_mib = s.limit_bytes >> 20,
            ?evicted,
            "dropped the oldest departure snapshots: the snapshots passed --snapshot-limit-mib"
        );
    }
    tracing::info!(
        vm = %vm,
        restartable = meta.restartable,
        why_not = meta.why_not.as_deref().unwrap_or(""),
        file_mib = meta.file_bytes >> 20,
        "kept the VM's departure snapshot"
    );
}

fn write_snapshot(
    tmp: &Path,
    d: &Departed,
    meta: &SnapshotMeta,
    stream: Option<&Path>,
) -> std::io::Result<()> {
    let _ = std::fs::remove_dir_all(tmp);
    std::fs::create_dir_all(tmp)?;
    if let Some(s) = stream {
        std::fs::rename(s, tmp.join("stream"))?;
    }
    std::fs::write(tmp.join("spec.toml"), d.spec.to_toml())?;
    if let (true, Some(key)) = (meta.restartable, &d.tpm_key) {
        tern_engine::secret::write_file(&tmp.join(TPM_KEY), key, 0o600)
            .map_err(std::io::Error::other)?;
    }
    let text = serde_json::to_vec_pretty(meta).map_err(std::io::Error::other)?;
    let f = tmp.join("meta.json");
    std::fs::write(&f, text)?;
    std::fs::File::open(&f)?.sync_all()?;
    Ok(())
}

/// The vTPM migration key's file in a snapshot.
const TPM_KEY: &str = "tpm-migration.key";

/// Why a snapshot could not run again.
#[derive(Debug, thiserror::Error)]
pub enum RestartError {
    #[error("no snapshot of VM {0:?} on this host")]
    NotFound(String),
    #[error("a VM named {0:?} runs (or is arriving) on this host: its snapshot is not restarted beside it")]
    Exists(String),
    #[error("the snapshot of VM {vm:?} cannot restart: {why}")]
    NotRestartable { vm: String, why: String },
    #[error("{0}")]
    Fenced(String),
    #[error("the snapshot of VM {vm:?} is unreadable: {why}")]
    Unreadable { vm: String, why: String },
    #[error("cannot make the overlay of kept disk {index} ({}): {why}", .base.display())]
    Overlay {
        index: usize,
        base: PathBuf,
        why: String,
    },
    #[error("cannot prepare the run directory {}", .0.display())]
    RunDir(PathBuf, #[source] std::io::Error),
    #[error("cannot start the VM's QEMU")]
    Launch(#[source] crate::vm::StartVmError),
    #[error("the VM's QEMU refused {what}")]
    Qmp {
        what: &'static str,
        #[source]
        source: tern_qemu::qmp::QmpError,
    },
    #[error("the VM's QEMU did not load the recorded stream: {0}")]
    Load(String),
    #[error("the VM's QEMU did not load the recorded stream within {0:?}")]
    Timeout(Duration),
}

/// Runs VM `vm` here again from its snapshot; see the module's doc.
pub async fn restart(agent: &Arc<Agent>, vm: &str) -> Result<RestartReport, RestartError> {
    if let Some(why) = agent.fence.refuses_restart() {
        return Err(RestartError::Fenced(why));
    }
    let s = &agent.snapshots;
    let dir = s.dir_of(vm);
    if !vm_name_ok(vm) || !dir.join("meta.json").exists() {
        return Err(RestartError::NotFound(vm.into()));
    }
    let unreadable = |why: String| RestartError::Unreadable { vm: vm.into(), why };
    let meta = read_meta(&dir).map_err(|e| unreadable(format!("meta.json: {e}")))?;
    if !meta.restartable {
        return Err(RestartError::NotRestartable {
            vm: vm.into(),
            why: meta.why_not.unwrap_or_else(|| "no reason kept".into()),
        });
    }
    if agent.vm(vm).is_some() || !agent.reserve_name(vm) {
        return Err(RestartError::Exists(vm.into()));
    }
    let mut spec = std::fs::read_to_string(dir.join("spec.toml"))
        .map_err(|e| e.to_string())
        .and_then(|t| VmSpec::from_toml(&t).map_err(|e| tern_engine::error_chain(&e)))
        .map_err(|e| {
            agent.release_name(vm);
            unreadable(format!("spec.toml: {e}"))
        })?;
    let run_dir = agent.new_run_dir(vm);
    let mut process = None;
    let r = run_again(agent, &dir, &meta, &mut spec, &run_dir, &mut process).await;
    match r {
        Ok(()) => {}
        Err(e) => {
            // no QEMU and no run directory left behind
            if let Some(mut p) = process {
                p.kill().await;
            }
            agent.remove_run_dir(&run_dir).await;
            agent.release_name(vm);
            return Err(e);
        }
    }
    let process = process.expect("a restarted VM has its QEMU");
    let _ = std::fs::remove_file(run_dir.join(tern_engine::dest::INCOMING_MARKER));
    let vm_arc = Arc::new(Vm::supervise(spec, process));
    agent.adopt(vm_arc.clone());
    agent.vm_event(vm, "started", vm_arc.pid);
    agent.cards_here(&vm_arc.spec);
    s.arrived(vm);
    let now = now_ms();
    let report = RestartReport {
        vm: vm.into(),
        restarted_from_unix_ms: meta.taken_unix_ms,
        age_s: now.saturating_sub(meta.taken_unix_ms) as f64 / 1000.0,
        run_dir: run_dir.clone(),
    };
    tracing::warn!(
        vm,
        age_s = report.age_s,
        run_dir = %run_dir.display(),
        "restarted the VM from its departure snapshot: it runs as it was {:.1} s ago",
        report.age_s
    );
    Ok(report)
}

/// A VM name as a directory name (no path of its own).
fn vm_name_ok(vm: &str) -> bool {
    !vm.is_empty() && !vm.starts_with('.') && !vm.contains('/') && vm != ".."
}

/// The restart's steps up to a loaded, running QEMU (`process` set once it started, for
/// the caller's clean-up).
async fn run_again(
    agent: &Arc<Agent>,
    dir: &Path,
    meta: &SnapshotMeta,
    spec: &mut VmSpec,
    run_dir: &Path,
    process: &mut Option<tern_qemu::launch::QemuProcess>,
) -> Result<(), RestartError> {
    let rd_err = |e| RestartError::RunDir(run_dir.to_path_buf(), e);
    // until it runs it is not a VM of ours: a restarted agent removes it
    std::fs::create_dir_all(run_dir.join("disks")).map_err(rd_err)?;
    std::fs::write(run_dir.join(tern_engine::dest::INCOMING_MARKER), b"restart").map_err(rd_err)?;
    if spec.disks.len() != meta.disks.len() {
        return Err(RestartError::Unreadable {
            vm: spec.name.clone(),
            why: format!(
                "the spec has {} disks, the snapshot kept {}",
                spec.disks.len(),
                meta.disks.len()
            ),
        });
    }
    for (i, (d, kept)) in spec.disks.iter_mut().zip(&meta.disks).enumerate() {
        let overlay = run_dir.join("disks").join(format!("disk{i}.qcow2"));
        make_overlay(&kept.path, &kept.format, &overlay)
            .await
            .map_err(|why| RestartError::Overlay {
                index: i,
                base: kept.path.clone(),
                why,
            })?;
        d.path = overlay;
        d.format = DiskFormat::Qcow2;
    }
    if spec.tpm {
        let key = std::fs::read(dir.join(TPM_KEY)).map_err(rd_err)?;
        tern_engine::secret::write_file(&tern_engine::tpm_migration_key_path(run_dir), &key, 0o600)
            .map_err(|e| rd_err(std::io::Error::other(e)))?;
    }
    let mut opts = LaunchOptions::new(run_dir.to_path_buf());
    opts.incoming_defer = true;
    opts.start_paused = true;
    // clean-up is explicit; once it runs, the VM outlives the agent
    opts.kill_on_drop = false;
    let p = agent
        .launch(spec, &opts)
        .await
        .map_err(RestartError::Launch)?;
    let qmp = p.qmp.clone();
    *process = Some(p);
    let q = |what| move |source| RestartError::Qmp { what, source };
    // as the destination of a migration: the stream has the return path on
    qmp.set_migrate_capabilities(&[("return-path", true), ("events", true)])
        .await
        .map_err(q("its migration capabilities"))?;
    let sock = qmp
        .stream_socket("tern-restart", tern_qemu::qmp::STREAM_SOCKET_BUFFER)
        .await
        .map_err(q("the stream's socket"))?;
    qmp.execute(
        "migrate-incoming",
        Some(json!({ "uri": "fd:tern-restart" })),
    )
    .await
    .map_err(q("migrate-incoming"))?;
    let within = Duration::from_secs(60) + Duration::from_secs(meta.file_bytes / (50 << 20));
    feed(&qmp, &dir.join("stream"), sock, within).await?;
    if meta.was_running {
        qmp.execute("cont", None).await.map_err(q("cont"))?;
    }
    if !spec.nics.is_empty() {
        // its cards say where they are (best effort, as after a migration)
        let _ = tokio::time::timeout(
            Duration::from_secs(2),
            qmp.execute("announce-self", Some(tern_engine::announce_args())),
        )
        .await;
    }
    Ok(())
}

/// Stops a task when dropped.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// `qemu-img create -f qcow2 -b BASE -F FMT OVERLAY`.
async fn make_overlay(base: &Path, format: &str, overlay: &Path) -> Result<(), String> {
    if !matches!(format, "raw" | "qcow2") {
        return Err(format!("unknown format {format:?}"));
    }
    if !base.exists() {
        return Err("the kept image is gone".into());
    }
    let out = tokio::process::Command::new(tern_qemu::disk::qemu_img_binary())
        .args(["create", "-q", "-f", "qcow2", "-b"])
        .arg(base)
        .args(["-F", format])
        .arg(overlay)
        .output()
        .await
        .map_err(|e| format!("cannot run qemu-img: {e}"))?;
    if !out.status.success() {
        return Err(String::from_utf8_lossy(&out.stderr).trim().to_string());
    }
    Ok(())
}

/// Writes the recorded stream into QEMU's incoming socket (reading and dropping what its
/// return path answers: PONGs, SHUT) and waits until QEMU loaded all of it.
async fn feed(
    qmp: &tern_qemu::qmp::QmpClient,
    stream: &Path,
    sock: tokio::net::UnixStream,
    within: Duration,
) -> Result<(), RestartError> {
    let (mut rd, mut wr) = sock.into_split();
    let drain = tokio::spawn(async move {
        let mut buf = vec![0u8; 64 << 10];
        while let Ok(n) = rd.read(&mut buf).await {
            if n == 0 {
                break;
            }
        }
    });
    let _drain = AbortOnDrop(drain);
    let deadline = tokio::time::Instant::now() + within;
    let copy = async {
        let file = tokio::fs::File::open(stream).await?;
        let mut r = tokio::io::BufReader::with_capacity(1 << 20, file);
        let n = tokio::io::copy_buf(&mut r, &mut wr).await?;
        wr.flush().await?;
        Ok::<u64, std::io::Error>(n)
    };
    let copied = tokio::time::timeout_at(deadline, copy).await;
    let why_failed = |what: String| async move {
        let desc = qmp
            .query_migrate()
            .await
            .ok()
            .and_then(|i| i.error_desc)
            .map(|d| format!(" (QEMU: {d})"))
            .unwrap_or_default();
        RestartError::Load(format!("{what}{desc}"))
    };
    match copied {
        Err(_) => return Err(RestartError::Timeout(within)),
        Ok(Err(e)) => return Err(why_failed(format!("writing the stream: {e}")).await),
        Ok(Ok(_)) => {}
    }
    loop {
        let info = qmp
            .query_migrate()
            .await
            .map_err(|source| RestartError::Qmp {
                what: "query-migrate",
                source,
            })?;
        match info.status.as_str() {
            "completed" => return Ok(()),
            "failed" | "cancelled" => {
                return Err(RestartError::Load(format!(
                    "its incoming migration {}: {}",
                    info.status,
                    info.error_desc.unwrap_or_default()
                )))
            }
            _ => {}
        }
        if tokio::time::Instant::now() >= deadline {
            return Err(RestartError::Timeout(within));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(vm: &str, t: u64, mib: u64) -> (String, u64, u64) {
        (vm.into(), t, mib << 20)
    }

    #[test]
    fn the_oldest_others_go_until_the_total_fits_never_the_one_kept() {
        let all = vec![
            s("a", 100, 300),
            s("b", 300, 300),
            s("c", 200, 300),
            s("new", 400, 300),
        ];
        // 1200 MiB in all, 700 allowed: a (oldest), then c
        assert_eq!(evict(&all, "new", 700 << 20), vec!["a", "c"]);
        // it fits: nothing goes
        assert!(evict(&all, "new", 1200 << 20).is_empty());
        // even when the one kept alone passes the limit, only the others go
        assert_eq!(evict(&all, "new", 100 << 20), vec!["a", "c", "b"]);
        // snapshots without a stream count nothing
        let meta_only = vec![s("x", 1, 0), s("new", 2, 500)];
        assert!(evict(&meta_only, "new", 500 << 20).is_empty());
    }

    #[test]
    fn only_the_newest_departure_of_a_vm_may_become_its_snapshot() {
        let mut d = Departures::default();
        assert!(!d.is_newest("web1", "m1"), "a departure never noted");
        d.began("web1", "m1");
        d.began("db", "m9");
        assert!(d.is_newest("web1", "m1"));
        // it left, came back, left again: the first departure is superseded
        d.arrived("web1");
        assert!(!d.is_newest("web1", "m1"));
        d.began("web1", "m2");
        assert!(!d.is_newest("web1", "m1") && d.is_newest("web1", "m2"));
        assert!(
            !d.ended("web1", "m1"),
            "the older one finishing first changes nothing"
        );
        assert!(d.is_newest("web1", "m2"));
        assert!(d.ended("web1", "m2"));
        // once done with, no departure of it is the newest until the next one begins
        assert!(!d.is_newest("web1", "m2") && !d.is_newest("web1", "m1"));
        // other VMs are their own
        assert!(d.is_newest("db", "m9"));
    }

    /// A snapshot of departure `id` of `vm` written as `keep` writes it, not yet in place.
    fn written(snaps: &Snapshots, vm: &str, id: &str) -> PathBuf {
        let tmp = snaps.dir.join(format!(".tmp-{vm}-{id}"));
        std::fs::create_dir_all(&tmp).unwrap();
        std::fs::write(tmp.join("stream"), id).unwrap();
        let m = SnapshotMeta {
            vm: vm.into(),
            migration_id: id.into(),
            destination: "b".into(),
            taken_unix_ms: now_ms(),
            mem_bytes: 1 << 27,
            file_bytes: 1 << 10,
            disks: vec![],
            restartable: true,
            why_not: None,
            was_running: true,
        };
        std::fs::write(tmp.join("meta.json"), serde_json::to_vec(&m).unwrap()).unwrap();
        tmp
    }

    fn kept_migration(snaps: &Snapshots, vm: &str) -> Option<String> {
        let l = snaps.list();
        let m = l.iter().find(|i| i.meta.vm == vm)?;
        let stream = std::fs::read_to_string(snaps.dir_of(vm).join("stream")).unwrap();
        assert_eq!(
            stream, m.meta.migration_id,
            "the stream and the meta of one departure"
        );
        Some(m.meta.migration_id.clone())
    }

    #[test]
    fn an_older_departure_finishing_last_does_not_replace_the_newer_one() {
        let dir = tempfile::tempdir().unwrap();
        let snaps = Snapshots::new(dir.path(), 64);
        // left (m1), came back, left again (m2); m2's keep finishes first
        snaps.departure_began("web1", "m1");
        snaps.arrived("web1");
        snaps.departure_began("web1", "m2");
        let t2 = written(&snaps, "web1", "m2");
        assert!(matches!(
            snaps.commit("web1", "m2", &t2, || false),
            Commit::Kept { .. }
        ));
        let t1 = written(&snaps, "web1", "m1");
        assert!(matches!(
            snaps.commit("web1", "m1", &t1, || false),
            Commit::Superseded
        ));
        assert!(!t1.exists(), "the superseded one's files stay behind");
        assert_eq!(kept_migration(&snaps, "web1").as_deref(), Some("m2"));
        // nor does it take away the newer one when it keeps nothing
        assert!(!snaps.departed_without("web1", "m1"));
        assert_eq!(kept_migration(&snaps, "web1").as_deref(), Some("m2"));

        // the same, with m1 finishing first: m2 replaces it
        snaps.arrived("web1");
        assert_eq!(kept_migration(&snaps, "web1"), None);
        snaps.departure_began("web1", "m3");
        snaps.arrived("web1");
        snaps.departure_began("web1", "m4");
        let t3 = written(&snaps, "web1", "m3");
        assert!(matches!(
            snaps.commit("web1", "m3", &t3, || false),
            Commit::Superseded
        ));
        assert_eq!(kept_migration(&snaps, "web1"), None);
        let t4 = written(&snaps, "web1", "m4");
        assert!(matches!(
            snaps.commit("web1", "m4", &t4, || false),
            Commit::Kept { .. }
        ));
        assert_eq!(kept_migration(&snaps, "web1").as_deref(), Some("m4"));
        // a departure that keeps nothing is done with; an older one that finishes after
        // it still loses
        snaps.arrived("web1");
        snaps.departure_began("web1", "m5");
        let t4b = written(&snaps, "web1", "m4");
        assert!(matches!(
            snaps.commit("web1", "m4", &t4b, || false),
            Commit::Superseded
        ));
        assert!(snaps.departed_without("web1", "m5"));
        assert_eq!(kept_migration(&snaps, "web1"), None);
    }

    #[test]
    fn a_keep_in_progress_when_the_vm_arrives_does_not_commit() {
        let dir = tempfile::tempdir().unwrap();
        let snaps = Snapshots::new(dir.path(), 64);
        snaps.departure_began("web1", "m1");
        // it arrives here again before m1's snapshot is in place (and may leave again
        // without a migration of this host's, e.g. stopped)
        snaps.arrived("web1");
        let t1 = written(&snaps, "web1", "m1");
        assert!(matches!(
            snaps.commit("web1", "m1", &t1, || false),
            Commit::Superseded
        ));
        assert!(!t1.exists());
        assert_eq!(kept_migration(&snaps, "web1"), None);
        // registered, but not yet said to have arrived: still not put in place
        snaps.departure_began("web1", "m2");
        let t2 = written(&snaps, "web1", "m2");
        assert!(matches!(
            snaps.commit("web1", "m2", &t2, || true),
            Commit::RunsHere
        ));
        assert!(!t2.exists());
        assert_eq!(kept_migration(&snaps, "web1"), None);
        // another VM's departures are not touched by it
        snaps.departure_began("db", "m7");
        snaps.arrived("web1");
        let t7 = written(&snaps, "db", "m7");
        assert!(matches!(
            snaps.commit("db", "m7", &t7, || false),
            Commit::Kept { .. }
        ));
        assert_eq!(kept_migration(&snaps, "db").as_deref(), Some("m7"));
    }

    #[test]
    fn a_snapshot_is_listed_only_once_it_is_whole() {
        let dir = tempfile::tempdir().unwrap();
        let snaps = Snapshots::new(dir.path(), 1);
        std::fs::create_dir_all(snaps.dir.join(".tmp-web1-m1")).unwrap();
        std::fs::create_dir_all(snaps.dir.join(".incoming-m2")).unwrap();
        assert!(snaps.list().is_empty());
        let m = SnapshotMeta {
            vm: "web1".into(),
            migration_id: "m1".into(),
            destination: "b".into(),
            taken_unix_ms: now_ms() - 2000,
            mem_bytes: 1 << 27,
            file_bytes: 1 << 20,
            disks: vec![],
            restartable: true,
            why_not: None,
            was_running: true,
        };
        std::fs::create_dir_all(snaps.dir_of("web1")).unwrap();
        std::fs::write(
            snaps.dir_of("web1").join("meta.json"),
            serde_json::to_vec(&m).unwrap(),
        )
        .unwrap();
        let l = snaps.list();
        assert_eq!(l.len(), 1);
        assert_eq!(l[0].meta, m);
        assert!(l[0].age_s >= 2.0 && l[0].age_s < 60.0, "{}", l[0].age_s);
        snaps.clean_partial();
        assert_eq!(std::fs::read_dir(&snaps.dir).unwrap().count(), 1);
        assert!(snaps.remove("web1"));
        assert!(snaps.list().is_empty());
        assert!(!snaps.remove("web1"));
    }
}

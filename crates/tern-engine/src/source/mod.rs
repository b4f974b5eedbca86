//! The source side of a migration: from the VM running here to the VM running there.
//!
//! [`run`] reads as the phases, in order, each in its own file:
//!
//! | phase | file | does |
//! |---|---|---|
//! | checks | `checks.rs` | QEMU's capabilities tern can carry, the disks' sizes, whether the VM runs |
//! | `Connect` | `connect.rs` | mutual TLS, Hello, the policy on the destination's labels |
//! | `Prepare` | `prepare.rs` | DiskOffer, TpmKey, Prepare; the destination's summary; data connections, encoder, the reader of the destination's frames (`peer.rs`) |
//! | `DiskCopy` | `disks.rs` | the disks' full copy and rounds before memory moves |
//! | `Transfer`, `Verify` | `transfer.rs` | QEMU migrates into a handed socket; the stream is forwarded (`forward.rs`), and recorded to a file when the daemon asks (`record.rs`) |
//! | `Switchover` | `switchover.rs` | the commit, Resumed, or asking the destination when it did not come |
//! | report | `report.rs` | the report, from the timeline and counters |
//!
//! `plan.rs` (`--plan`) runs the checks and `Connect` only, measures the guest's dirty rate
//! and predicts the rest with the model of `converge.rs`.
//!
//! A try that lost the link before the switchover is given up that way too, then
//! `outage.rs` waits for the destination to answer again (`WaitingForLink`, up to
//! `outage_wait_s`) and the phases run again from Connect as a new try (its own id on the
//! wire, `{id}-r{n}`), what the destination already holds going as references.
//!
//! Post-copy is not given up that way once the VM runs at the destination: `resume.rs`
//! (still `Transfer`, `WaitingForLink` while the link is down) waits for the destination
//! on a new connection and resumes QEMU's migration into it (protocol v11). An agent that
//! restarted during post-copy does the same from the mark its predecessor left in the
//! VM's run directory (`restart.rs`).
//!
//! One recovery path ([`recover`]): until the commit went out, any failure (an error, a
//! cancel, a panic) tells the destination, cancels QEMU's migration, resumes the VM if it
//! ran and clears tern's disk state in QEMU. After the commit the source never resumes
//! without the destination's word that it holds nothing of the VM.

mod checks;
mod connect;
mod disks;
mod forward;
mod outage;
mod pacing;
mod peer;
pub mod plan;
mod prepare;
pub mod record;
pub mod recover;
mod report;
pub mod restart;
mod resume;
mod switchover;
mod transfer;

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::FutureExt;
use tern_proto::{ErrorCode, Message, MigrationState};
use tern_qemu::qmp::{QmpClient, QmpError};
use tern_qemu::spec::VmSpec;
use tern_qemu::stream::StreamError;
use tokio::sync::watch;

pub use checks::{check_capabilities, UNSUPPORTED_CAPABILITIES};
pub use tern_api::MigrateRequest;

use crate::digest::DigestError;
use crate::disk;
use crate::error::panic_message;
use crate::handle::{MigrationHandle, MigrationReport};
use crate::transport::conn::{ExpectError, FrameReader, RecvError};
use crate::transport::links::{PeerWriter, SendError};
use crate::transport::tls::HandshakeError;
use crate::{Engine, Host};

/// The VM being moved, as the daemon hands it over.
pub struct SourceVm {
    pub spec: VmSpec,
    pub qemu: SourceQemu,
    pub run_dir: PathBuf,
    pub qemu_version: String,
    /// Set once QEMU is gone (why).
    pub exited: watch::Receiver<Option<String>>,
    /// The vTPM migration key its swtpm runs with (a VM with `tpm = true`).
    pub tpm_key: Option<[u8; 32]>,
    /// Its QEMU's process (for sampling its RAM in a plan); None if not known.
    pub pid: Option<u32>,
    /// Where to record the stream as it passes (the daemon's departure snapshot,
    /// [`record`]); None: not recorded.
    pub record: Option<Arc<record::StreamRecording>>,
}

/// Who runs the VM's QEMU, and what tern holds of it.
pub enum SourceQemu {
    /// tern's own: its QMP monitor. tern drives the migration (capabilities, pacing,
    /// convergence, the switchover).
    Tern(QmpClient),
    /// A libvirt domain's (its name is `spec.libvirt`): libvirt drives the migration and
    /// owns the monitor; tern holds the stream the QEMU migrates into (its carrier socket,
    /// connected; the transfer takes it) and carries it.
    Libvirt(Option<tokio::net::UnixStream>),
}

impl SourceVm {
    /// tern's monitor of the VM's QEMU; a libvirt domain's QEMU has none.
    pub fn qmp(&self) -> Result<&QmpClient, MigrateError> {
        match &self.qemu {
            SourceQemu::Tern(q) => Ok(q),
            SourceQemu::Libvirt(_) => Err(MigrateError::LibvirtOwned),
        }
    }

    /// `Some(reason)` once QEMU is gone.
    pub fn exit_reason(&self) -> Option<String> {
        self.exited.borrow().clone()
    }
}

/// How an outgoing migration ended, for the daemon.
#[derive(Debug)]
pub enum SourceOutcome {
    /// The VM runs at the destination: the source's copy must go.
    Moved(Box<MigrationReport>),
    /// It failed; the VM is where `vm_state` says (resumed here unless the commit went out
    /// and the destination could not be asked).
    Failed {
        code: ErrorCode,
        message: String,
        vm_state: String,
    },
    /// tern failed internally after the commit, and the destination says the VM runs
    /// there: the source's copy must go, the failure still be told.
    MovedAfterBug { message: String },
}

/// Why an outgoing migration failed.
#[derive(Debug, thiserror::Error)]
pub enum MigrateError {
    #[error("QEMU migration capability {cap:?} is on ({why}): turn it off with migrate-set-capabilities, or remove it from the VM spec's migration_capabilities")]
    UnsupportedCapability { cap: String, why: &'static str },
    #[error("VM {vm:?} has shared memory (memory = \"shared\"): migrating it makes its QEMU fill all of its RAM on this host, {need_mib} MiB more than it holds now, but this host has {available_mib} MiB available: free memory here first, or restart the VM with memory = \"private\" (it then migrates without filling)")]
    SharedMemoryRoom {
        vm: String,
        need_mib: u64,
        available_mib: u64,
    },
    #[error("cannot open a secure connection to the destination agent")]
    Handshake(#[from] HandshakeError),
    #[error("{0}")]
    NotAuthorized(String),
    #[error("destination agent refused ({}): {message}", code.name())]
    Remote { code: ErrorCode, message: String },
    #[error("the source QEMU's migration stream cannot be carried")]
    Stream(#[from] StreamError),
    #[error("connection to the destination agent failed")]
    Peer(#[from] RecvError),
    #[error("sending to the destination agent failed")]
    PeerWrite(#[source] std::io::Error),
    #[error("the destination agent closed the connection during {0}")]
    PeerClosed(&'static str),
    #[error("the destination agent broke the protocol: {0}")]
    Protocol(String),
    #[error("talking to the source QEMU failed")]
    Qmp(#[from] QmpError),
    #[error("this is a libvirt domain: libvirt owns its QEMU's monitor, and this step needs it (not available with --libvirt)")]
    LibvirtOwned,
    #[error("the source QEMU's migration failed: {0}")]
    QemuMigration(String),
    #[error("the source QEMU's stream does not match its RAM blocks")]
    Digest(#[from] DigestError),
    #[error("memory digests differ: source {source_digest}, destination {dest_digest}")]
    DigestMismatch {
        source_digest: String,
        dest_digest: String,
    },
    #[error("cancelled by the operator")]
    Cancelled,
    #[error("bad request: {0}")]
    BadRequest(String),
    #[error("timed out after {0:?} waiting for {1}")]
    Timeout(Duration, &'static str),
    #[error("local socket for QEMU's stream failed")]
    LocalIo(#[source] std::io::Error),
    #[error("moving the VM's disks failed")]
    Disk(#[source] Box<disk::SourceDiskError>),
    #[error("switchover in doubt: Commit was sent but the destination did not confirm ({0}); the source VM is kept paused: check the destination (tern vm list there) and stop one of the two copies")]
    InDoubt(String),
    #[error("{0}")]
    NotConverging(String),
    #[error("tern failed internally (a bug: {0}); the migration was stopped")]
    Panicked(String),
    #[error("post-copy cannot be used here: {0}; nothing moved (migrate without --postcopy)")]
    PostcopyRefused(String),
    #[error(
        "the source QEMU paused post-copy (postcopy-paused): its stream to the destination broke"
    )]
    PostcopyPaused,
    #[error("the source agent restarted during post-copy: its QEMU paused when the old agent's stream closed")]
    AgentRestarted,
    #[error("the link to the destination broke during post-copy ({cause}) and post-copy could not go on within the outage wait (--outage-wait, {waited_s} s): the VM waits at the destination (postcopy-paused) for pages only this host holds; this host keeps them (its QEMU in postcopy-paused) and never runs the VM again")]
    PostcopyNotResumed { cause: String, waited_s: u64 },
    #[error("the link to the destination broke as post-copy began ({0}), before the destination got POSTCOPY_RUN: it discarded its copy and never ran the VM")]
    PostcopyNeverRan(String),
}

impl From<disk::SourceDiskError> for MigrateError {
    fn from(e: disk::SourceDiskError) -> Self {
        MigrateError::Disk(Box::new(e))
    }
}

impl From<SendError> for MigrateError {
    fn from(e: SendError) -> Self {
        match e {
            SendError::Write(e) => MigrateError::PeerWrite(e),
            SendError::LinkClosed(i) => MigrateError::PeerWrite(std::io::Error::new(
                std::io::ErrorKind::BrokenPipe,
                format!("data stream {i} closed"),
            )),
        }
    }
}

impl MigrateError {
    pub fn code(&self) -> ErrorCode {
        let timed_out = |e: &std::io::Error| e.kind() == std::io::ErrorKind::TimedOut;
        use crate::transport::tls::is_tls_failure;
        match self {
            // a dead link, noticed by the socket's keepalive / user timeout
            MigrateError::Peer(RecvError::Io(e)) | MigrateError::PeerWrite(e) if timed_out(e) => {
                ErrorCode::Timeout
            }
            // a TLS record failed authentication: altered on the wire
            MigrateError::Peer(RecvError::Io(e)) | MigrateError::PeerWrite(e)
                if is_tls_failure(e) =>
            {
                ErrorCode::Security
            }
            MigrateError::Handshake(HandshakeError::Tls { .. }) => ErrorCode::Security,
            MigrateError::NotAuthorized(_) => ErrorCode::NotAuthorized,
            MigrateError::SharedMemoryRoom { .. } => ErrorCode::ResourceExhausted,
            MigrateError::UnsupportedCapability { .. } => ErrorCode::StreamUnsupported,
            MigrateError::Handshake(_) | MigrateError::PeerWrite(_) => ErrorCode::Internal,
            MigrateError::Remote { code, .. } => *code,
            MigrateError::Stream(StreamError::Unsupported { .. }) => ErrorCode::StreamUnsupported,
            MigrateError::Stream(_) | MigrateError::Digest(_) => ErrorCode::StreamMalformed,
            MigrateError::Peer(_) | MigrateError::PeerClosed(_) | MigrateError::Protocol(_) => {
                ErrorCode::Protocol
            }
            MigrateError::Qmp(_) | MigrateError::QemuMigration(_) => ErrorCode::QemuFailed,
            MigrateError::DigestMismatch { .. } => ErrorCode::DigestMismatch,
            MigrateError::Cancelled => ErrorCode::Cancelled,
            MigrateError::BadRequest(_) | MigrateError::LibvirtOwned => ErrorCode::SpecRejected,
            MigrateError::Timeout(..) => ErrorCode::Timeout,
            MigrateError::LocalIo(_) | MigrateError::InDoubt(_) | MigrateError::Panicked(_) => {
                ErrorCode::Internal
            }
            MigrateError::Disk(e) => e.code(),
            MigrateError::NotConverging(_) => ErrorCode::NotConverging,
            MigrateError::PostcopyRefused(_) => ErrorCode::SpecRejected,
            MigrateError::PostcopyPaused => ErrorCode::QemuFailed,
            MigrateError::AgentRestarted => ErrorCode::Internal,
            MigrateError::PostcopyNotResumed { .. } | MigrateError::PostcopyNeverRan(_) => {
                ErrorCode::Timeout
            }
        }
    }
}

/// One outgoing migration, as its phases share it.
pub(crate) struct Migration {
    engine: Arc<Engine>,
    host: Arc<dyn Host>,
    vm: SourceVm,
    req: MigrateRequest,
    handle: Arc<MigrationHandle>,
    t0: Instant,
    /// The VM ran when the migration started (so it runs again if it fails).
    source_running: bool,
    /// The switchover point passed: the source never resumes without the destination's
    /// word.
    committed: bool,
    /// v2: raised by the forwarder just before SourceDone carries the commit.
    commit_sent: Arc<AtomicBool>,
    /// Post-copy: raised by the forwarder before QEMU's PACKAGED (which ends with
    /// POSTCOPY_RUN) goes on. From then on the VM runs at the destination: the source
    /// never resumes (its QEMU could not anyway).
    postcopy_run: Arc<AtomicBool>,
    /// `postcopy_fallback` asked and possible here (the VM, the destination): post-copy is
    /// the converger's last resort.
    postcopy_fallback: bool,
    /// What a parser of QEMU's stream resumed by another agent would need (the forwarder
    /// sets it once the RAM blocks are known; [`restart::PostcopyMark`]).
    stream_resume: Arc<std::sync::Mutex<Option<tern_qemu::stream::ResumeState>>>,
    /// The control connection, for telling the destination about a failure.
    writer: Option<PeerWriter>,
    /// What the daemon remembers of the link to the destination (for the prediction the
    /// report shows beside what happened), Hello's round trip, and whether QEMU samples
    /// the guest's dirty rate for it.
    link: Option<plan::LinkMemory>,
    rtt: Duration,
    dirty_sampling: bool,
    content: Option<plan::Content>,
    /// The content hashes of the sample's pages that are not zero (what the destination
    /// holds of them is known once its summary came).
    sample_hashes: Vec<tern_store::Hash>,
    /// What a rewritten page costs against its previous version, from a second look at the
    /// RAM sample a second after the first (set beside the migration; unset: not looked
    /// yet, or too few pages changed).
    second_look: Option<Arc<std::sync::OnceLock<f64>>>,
    /// The host's CPU over half a second as the migration starts, after its RAM sample
    /// (the guest running as it does; set beside the migration).
    cpu_before: Option<Arc<std::sync::OnceLock<crate::hostcpu::CpuWindow>>>,
    /// Which try this is (1, then 2 after a link was lost and came back, ...).
    attempt: u32,
    /// The lost links waited out so far.
    outages: Vec<tern_api::LinkOutage>,
    /// The destination agent's address (its overlay VTEP), once connected.
    peer_ip: Option<std::net::IpAddr>,
}

/// Runs an outgoing migration to its end: the VM moved, or it is where the outcome says.
pub async fn run(
    engine: Arc<Engine>,
    host: Arc<dyn Host>,
    vm: SourceVm,
    req: MigrateRequest,
    handle: Arc<MigrationHandle>,
    link: Option<plan::LinkMemory>,
) -> SourceOutcome {
    let run_dir = vm.run_dir.clone();
    let outcome = tries(Migration::new(engine, host, vm, req, handle, link)).await;
    // (kept while a restarted agent could have resumed post-copy)
    restart::PostcopyMark::remove(&run_dir);
    outcome
}

async fn tries(mut m: Migration) -> SourceOutcome {
    let mut wait_left = m.req.outage_wait();
    loop {
        // A bug that panics mid-migration must not leave the VM paused, nor half a
        // migration behind: it takes the same way out as an error.
        let result = match std::panic::AssertUnwindSafe(m.phases())
            .catch_unwind()
            .await
        {
            Ok(r) => r,
            Err(p) => Err(MigrateError::Panicked(panic_message(&*p))),
        };
        let e = match result {
            Ok(mut report) => {
                report.outages = std::mem::take(&mut m.outages);
                return SourceOutcome::Moved(Box::new(report));
            }
            Err(e) => e,
        };
        // (a carried stream ends with its connection: nothing to try again)
        let wait = outage::lost_link(&e)
            && !wait_left.is_zero()
            && m.attempt < outage::MAX_TRIES
            && matches!(m.vm.qemu, SourceQemu::Tern(_));
        let outcome = recover::after_failure(&mut m, e).await;
        let SourceOutcome::Failed {
            code,
            message,
            vm_state,
        } = outcome
        else {
            return outcome;
        };
        if !wait || m.committed || m.vm.exit_reason().is_some() {
            return SourceOutcome::Failed {
                code,
                message,
                vm_state,
            };
        }
        match outage::wait_for_link(&m, &message, wait_left).await {
            Ok(outage) => {
                wait_left = wait_left.saturating_sub(Duration::from_millis(outage.waited_ms));
                m.outages.push(outage);
                m.next_attempt();
            }
            Err(None) => {
                return SourceOutcome::Failed {
                    code,
                    message: format!(
                    "{message}; the destination did not answer again within {} s (--outage-wait)",
                    m.req.outage_wait().as_secs()
                ),
                    vm_state,
                }
            }
            Err(Some(e)) => {
                return SourceOutcome::Failed {
                    code: e.code(),
                    message: crate::error::error_chain(&e),
                    vm_state,
                }
            }
        }
    }
}

impl Migration {
    fn new(
        engine: Arc<Engine>,
        host: Arc<dyn Host>,
        vm: SourceVm,
        req: MigrateRequest,
        handle: Arc<MigrationHandle>,
        link: Option<plan::LinkMemory>,
    ) -> Migration {
        Migration {
            engine,
            host,
            vm,
            req,
            handle,
            t0: Instant::now(),
            source_running: false,
            committed: false,
            commit_sent: Arc::new(AtomicBool::new(false)),
            postcopy_run: Arc::new(AtomicBool::new(false)),
            postcopy_fallback: false,
            stream_resume: Default::default(),
            writer: None,
            link,
            rtt: Duration::ZERO,
            dirty_sampling: false,
            content: None,
            sample_hashes: Vec::new(),
            second_look: None,
            cpu_before: None,
            attempt: 1,
            outages: Vec::new(),
            peer_ip: None,
        }
    }

    /// The id this try has on the wire: the migration's, then `{id}-r{n}` for try n (a
    /// destination never takes an id twice).
    pub(crate) fn wire_id(&self) -> String {
        match self.attempt {
            1 => self.handle.id.clone(),
            n => format!("{}-r{n}", self.handle.id),
        }
    }

    /// After a lost link came back: a new try, with nothing of the last one's connection.
    fn next_attempt(&mut self) {
        use crate::handle::Counters;
        let c = &self.handle.counters;
        let last = c.wire_out.swap(0, Ordering::Relaxed) + c.wire_in.swap(0, Ordering::Relaxed);
        Counters::add(&c.wire_earlier, last);
        self.attempt += 1;
        self.committed = false;
        self.commit_sent = Arc::new(AtomicBool::new(false));
        self.writer = None;
        self.rtt = Duration::ZERO;
    }

    /// The phases, in order.
    async fn phases(&mut self) -> Result<MigrationReport, MigrateError> {
        if let SourceQemu::Libvirt(_) = self.vm.qemu {
            return self.carried_phases().await;
        }
        let plan = checks::run(self).await?;
        if self.req.postcopy && self.attempt == 1 {
            tracing::warn!(migration = %self.handle.id, "{}", tern_api::migration::POSTCOPY_RISK);
            self.handle.update(|s| {
                s.progress
                    .notes
                    .push(tern_api::migration::POSTCOPY_RISK.into())
            });
        }
        if self.postcopy_fallback && self.attempt == 1 {
            let note = format!(
                "if pre-copy cannot converge, tern switches to {}",
                tern_api::migration::POSTCOPY_RISK
            );
            tracing::warn!(migration = %self.handle.id, "{note}");
            self.handle.update(|s| s.progress.notes.push(note));
        }
        // for the prediction: the guest's RAM sampled, its dirty rate sampled by QEMU while
        // tern connects
        plan::start_sampling(self).await;
        let peer = connect::run(self).await?;
        self.rtt = peer.rtt;
        let mut prepared = prepare::run(self, peer, plan.disks.as_deref()).await?;
        let disks = disks::copy(self, &mut prepared, plan.disks).await?;
        let transferred = transfer::run(self, prepared, disks).await?;
        let mut transferred = transferred;
        let resolved = switchover::run(self, &mut transferred).await?;
        report::build(self, transferred, resolved).await
    }
}

impl Migration {
    /// A libvirt domain's migration, carried: libvirt started it (its QEMU is already
    /// migrating into the carrier socket) and decides the switchover; tern connects,
    /// prepares the destination (which connects to the QEMU libvirt started there),
    /// carries the stream, and the destination hands QEMU the device state only once the
    /// digests agree. No checks over QMP (libvirt's QEMU has no monitor for tern), no disk
    /// copy (a carried domain's disks are shared), no pacing of QEMU.
    async fn carried_phases(&mut self) -> Result<MigrationReport, MigrateError> {
        if self.req.postcopy {
            return Err(MigrateError::PostcopyRefused(
                "a libvirt domain migrates with libvirt in charge".into(),
            ));
        }
        self.source_running = true;
        let ram = u64::from(self.vm.spec.memory_mib) << 20;
        self.handle.update(|s| s.progress.ram_total = Some(ram));
        let peer = connect::run(self).await?;
        self.rtt = peer.rtt;
        let prepared = prepare::run(self, peer, None).await?;
        let mut transferred = transfer::run(self, prepared, None).await?;
        let resolved = switchover::run(self, &mut transferred).await?;
        report::build(self, transferred, resolved).await
    }
}

pub(crate) async fn send(w: &PeerWriter, m: &Message) -> Result<(), MigrateError> {
    w.lock()
        .await
        .send(m)
        .await
        .map_err(MigrateError::PeerWrite)
}

pub(crate) async fn expect<R: tokio::io::AsyncRead + Unpin>(
    r: &mut FrameReader<R>,
    within: Duration,
    what: &'static str,
) -> Result<Message, MigrateError> {
    r.expect(within, what).await.map_err(|e| match e {
        ExpectError::Timeout(d, w) => MigrateError::Timeout(d, w),
        ExpectError::Closed(w) => MigrateError::PeerClosed(w),
        ExpectError::Aborted { code, message } => MigrateError::Remote { code, message },
        ExpectError::Recv(e) => MigrateError::Peer(e),
    })
}

pub(crate) fn unexpected(m: &Message, wanted: &str) -> MigrateError {
    MigrateError::Protocol(format!("expected {wanted}, got {}", m.name()))
}

/// Aborts a task when dropped (a failed migration leaves none running).
pub(crate) struct AbortOnDrop(pub tokio::task::AbortHandle);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Whether the commit went out (the forwarder raised it, or the v1 Commit was sent).
pub(crate) fn commit_went_out(m: &Migration) -> bool {
    m.committed || m.commit_sent.load(Ordering::SeqCst) || postcopy_ran(m)
}

/// Post-copy began: the VM runs at the destination (or QEMU holds it there, paused).
pub(crate) fn postcopy_ran(m: &Migration) -> bool {
    m.postcopy_run.load(Ordering::SeqCst)
}

/// What the destination says became of this migration, asked on a new connection.
pub(crate) async fn query_destination(
    m: &Migration,
) -> Result<(MigrationState, u64), MigrateError> {
    connect::query_once(m).await
}

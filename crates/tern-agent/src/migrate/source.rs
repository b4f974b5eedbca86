//! The source side of a migration: checks that QEMU's configuration can be carried,
//! connects to the destination agent, has the source QEMU migrate into a local socket,
//! parses that stream and forwards it as tern frames, relays the return path back, and
//! runs the switchover handshake.
//!
//! Phases, in order: connect -> prepare -> transfer -> verify -> switchover -> done.
//! Until `Commit` is sent, any failure cancels QEMU's migration and resumes the VM if it
//! was running (see [`recover_source`]). After `Commit`, the source never resumes: if the
//! destination does not confirm, the source VM is kept paused and the failure says so.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use bytes::{Buf, Bytes, BytesMut};
use futures_util::FutureExt;
use serde_json::json;
use tern_proto::{
    Codec, ErrorCode, FrameCompressor, Message, MigrationState, Page, PageBody, RamBlock,
};
use tern_qemu::qmp::QmpError;
use tern_qemu::stream::{BlockName, Encoder, Item, NameMode, Parser, RamRecord, StreamError};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::unix;

use crate::policy::VmFacts;
use tokio::sync::{mpsc, Mutex};

use super::codec::{CodecPicker, CodecPolicy};
use super::digest::{DigestError, MemoryDigest};
use super::disk;
use super::pages::{answer_want, Offered, PageEncoder, SharedStore};
use super::{
    unix_us, Counters, EncodingReport, MigrationHandle, MigrationReport, PageCounts,
    SwitchoverTimes, UNSUPPORTED_CAPABILITIES,
};
use crate::conn::{ExpectError, FrameReader, FrameWriter, RecvError};
use crate::vm::{StopMode, Vm};
use crate::Agent;

pub use tern_api::MigrateRequest;

/// Why an outgoing migration failed.
#[derive(Debug, thiserror::Error)]
pub enum MigrateError {
    #[error("QEMU migration capability {cap:?} is on ({why}): turn it off with migrate-set-capabilities, or remove it from the VM spec's migration_capabilities")]
    UnsupportedCapability { cap: String, why: &'static str },
    #[error("cannot open a secure connection to the destination agent")]
    Handshake(#[from] crate::tls::HandshakeError),
    #[error(transparent)]
    NotAuthorized(#[from] crate::policy::Refusal),
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
    #[error("tern failed internally (a bug: {0}); the migration was stopped")]
    Panicked(String),
}

impl From<disk::SourceDiskError> for MigrateError {
    fn from(e: disk::SourceDiskError) -> Self {
        MigrateError::Disk(Box::new(e))
    }
}

impl MigrateError {
    pub fn code(&self) -> ErrorCode {
        let timed_out = |e: &std::io::Error| e.kind() == std::io::ErrorKind::TimedOut;
        match self {
            // a dead link, noticed by the socket's keepalive / user timeout
            MigrateError::Peer(RecvError::Io(e)) | MigrateError::PeerWrite(e) if timed_out(e) => {
                ErrorCode::Timeout
            }
            // a TLS record failed authentication: altered on the wire
            MigrateError::Peer(RecvError::Io(e)) | MigrateError::PeerWrite(e)
                if crate::tls::is_tls_failure(e) =>
            {
                ErrorCode::Security
            }
            MigrateError::Handshake(crate::tls::HandshakeError::Tls { .. }) => ErrorCode::Security,
            MigrateError::NotAuthorized(_) => ErrorCode::NotAuthorized,
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
            MigrateError::BadRequest(_) => ErrorCode::SpecRejected,
            MigrateError::Timeout(..) => ErrorCode::Timeout,
            MigrateError::LocalIo(_) | MigrateError::InDoubt(_) | MigrateError::Panicked(_) => {
                ErrorCode::Internal
            }
            MigrateError::Disk(e) => e.code(),
        }
    }
}

/// From Prepare to Prepared: the destination starts its QEMU (and makes its disk images)
/// meanwhile.
const PREPARE_WITHIN: Duration = Duration::from_secs(60);

/// Refuses QEMU configurations tern's data path cannot carry, before anything moves.
pub fn check_capabilities(caps: &[(String, bool)]) -> Result<(), MigrateError> {
    for (name, on) in caps {
        if !on {
            continue;
        }
        if let Some((_, why)) = UNSUPPORTED_CAPABILITIES.iter().find(|(c, _)| c == name) {
            return Err(MigrateError::UnsupportedCapability {
                cap: name.clone(),
                why,
            });
        }
    }
    Ok(())
}

type PeerWriter = Arc<Mutex<FrameWriter<crate::tls::PeerWrite>>>;

/// Control messages from the destination, as the peer reader passes them on.
enum PeerEvent {
    Msg(Message),
    Closed,
    Failed(RecvError),
    /// The exchange cannot go on (the message says why).
    Broken(String),
}

type LiveDisks = tokio::task::JoinHandle<(
    disk::SourceDisks,
    disk::DiskInbox,
    Result<(), disk::SourceDiskError>,
)>;

/// At QEMU's pause before the switchover (`paused_at`): ends the live disk rounds, runs
/// the last one and lets QEMU send the device state, within `stall` (the guest is
/// paused meanwhile). Tern's exports are gone then; the bitmaps and the NBD server go
/// with the source QEMU, or with the cleanup of a failure.
async fn finish_disks(
    qmp: &tern_qemu::qmp::QmpClient,
    task: LiveDisks,
    stop: Option<tokio::sync::watch::Sender<bool>>,
    paused_at: SystemTime,
    stall: Duration,
    migration: &str,
) -> Result<super::DiskReport, MigrateError> {
    let work = async {
        let event_ms = SystemTime::now()
            .duration_since(paused_at)
            .map_or(0.0, |d| d.as_secs_f64() * 1e3);
        let t_seen = Instant::now();
        if let Some(s) = stop {
            let _ = s.send(true);
        }
        let (mut d, mut inbox, r) = task
            .await
            .map_err(|e| MigrateError::Protocol(format!("disk task failed: {e}")))?;
        r?;
        let live_ms = t_seen.elapsed().as_secs_f64() * 1e3;
        d.last_round(&mut inbox).await?;
        tern_qemu::disk::continue_switchover(qmp)
            .await
            .map_err(|e| MigrateError::Qmp(e.0))?;
        // where the guest's pause went before QEMU went on
        d.report.pause_ms = event_ms + t_seen.elapsed().as_secs_f64() * 1e3;
        d.report.live_round_wait_ms = live_ms;
        tracing::info!(%migration, bytes = d.report.last_round_bytes, ms = d.report.last_round_ms, event_ms, live_ms, "last disk round done");
        Ok::<_, MigrateError>(d.report.clone())
    };
    tokio::time::timeout(stall, work)
        .await
        .map_err(|_| MigrateError::Timeout(stall, "the last disk round (guest paused)"))?
}

/// The error a control event means while the source waits for something else.
fn peer_event_error(ev: Option<PeerEvent>) -> MigrateError {
    match ev {
        Some(PeerEvent::Msg(Message::Abort { code, message })) => {
            MigrateError::Remote { code, message }
        }
        Some(PeerEvent::Msg(m)) => unexpected(&m, "disk replies"),
        Some(PeerEvent::Failed(e)) => MigrateError::Peer(e),
        Some(PeerEvent::Broken(m)) => MigrateError::Protocol(m),
        Some(PeerEvent::Closed) | None => MigrateError::PeerClosed("the disk copy"),
    }
}

/// Runs an outgoing migration to the end and records the outcome in `handle`.
pub async fn run(
    agent: Arc<Agent>,
    vm: Arc<Vm>,
    req: MigrateRequest,
    handle: Arc<MigrationHandle>,
) {
    let t0 = Instant::now();
    let mut ctx = SourceCtx {
        agent: agent.clone(),
        vm: vm.clone(),
        req,
        handle: handle.clone(),
        t0,
        source_running: false,
        committed: false,
        commit_sent: Arc::new(AtomicBool::new(false)),
        writer: None,
    };
    // A bug that panics mid-migration must not leave the VM paused, nor half a
    // migration behind: it takes the same way out as an error.
    let result = match std::panic::AssertUnwindSafe(ctx.migrate())
        .catch_unwind()
        .await
    {
        Ok(r) => r,
        Err(p) => Err(MigrateError::Panicked(super::panic_message(&*p))),
    };
    if matches!(result, Err(MigrateError::Panicked(_)))
        && ctx.commit_sent.load(Ordering::SeqCst)
        && !ctx.committed
    {
        // the commit went out before the panic: only the destination knows
        ctx.committed = true;
        if let Ok((MigrationState::Running, _)) = ctx
            .ask_destination("tern failed internally after the commit")
            .await
        {
            tracing::error!(migration = %handle.id, "a panic after the commit; the VM runs on the destination");
            vm.stop(StopMode::Quit).await;
            agent.forget(&vm.spec.name);
            agent.remove_run_dir(&vm.run_dir).await;
            vm.migrating.store(false, Ordering::SeqCst);
            handle.finish_err(
                ErrorCode::Internal,
                error_chain(result.as_ref().expect_err("an error")),
                "running on the destination (the source copy was stopped)".into(),
            );
            return;
        }
    }
    match result {
        Ok(report) => {
            // The destination runs the VM: the source QEMU goes away.
            vm.stop(StopMode::Quit).await;
            agent.forget(&vm.spec.name);
            // its disks stay here, indexed, so a return trip sends only what changed
            let kept = crate::images::keep_departed_disks(
                &agent.chunks,
                &agent.images_dir,
                &vm.spec,
                &vm.run_dir,
            )
            .await;
            if !kept.is_empty() {
                let index = agent.chunks.clone();
                tokio::spawn(async move { crate::images::index_kept(&index, kept).await });
            }
            // with its TPM state: the VM's secrets now live only at the destination
            agent.remove_run_dir(&vm.run_dir).await;
            handle.finish_ok(report);
        }
        Err(e) => {
            let code = e.code();
            let message = error_chain(&e);
            if let Some(w) = &ctx.writer {
                // Tell the destination (best effort) so it cleans up at once; the
                // forwarder may hold the writer, blocked on a dead link: bounded.
                if !matches!(e, MigrateError::Remote { .. } | MigrateError::InDoubt(_)) {
                    let abort = Message::Abort {
                        code,
                        message: message.clone(),
                    };
                    let _ = tokio::time::timeout(Duration::from_secs(2), async {
                        w.lock().await.send(&abort).await
                    })
                    .await;
                }
            }
            let vm_state = if ctx.committed {
                "paused on the source (switchover in doubt)".to_string()
            } else {
                let state = recover_source(&vm, ctx.source_running).await;
                if !vm.spec.disks.is_empty() && vm.exit_reason().is_none() {
                    // exports, bitmaps, NBD server and the pause before switchover go
                    disk::stop_source_disks(&vm.qmp, vm.spec.disks.len()).await;
                    let _ = vm
                        .qmp
                        .set_migrate_capabilities(&[("pause-before-switchover", false)])
                        .await;
                }
                state
            };
            vm.migrating.store(false, Ordering::SeqCst);
            handle.finish_err(code, message, vm_state);
        }
    }
}

/// The whole chain of an error, once, for reports and logs.
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}

/// Brings the source VM back to how it was before the migration: cancels QEMU's
/// migration if it still runs and resumes the VM if it was running. Returns its state.
pub async fn recover_source(vm: &Vm, was_running: bool) -> String {
    if let Some(r) = vm.exit_reason() {
        return format!("source QEMU {r}");
    }
    let qmp = &vm.qmp;
    let status = qmp
        .query_migrate()
        .await
        .map(|m| m.status)
        .unwrap_or_default();
    if matches!(
        status.as_str(),
        "setup" | "active" | "device" | "pre-switchover" | "wait-unplug"
    ) {
        let _ = qmp.execute("migrate_cancel", None).await;
        // QEMU leaves "cancelling" on its own; wait for a terminal state (bounded).
        let mut events = qmp.subscribe();
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let s = qmp
                .query_migrate()
                .await
                .map(|m| m.status)
                .unwrap_or_default();
            if !matches!(
                s.as_str(),
                "setup" | "active" | "cancelling" | "device" | "pre-switchover"
            ) {
                break;
            }
            if Instant::now() > deadline {
                break;
            }
            let _ = qmp
                .wait_event(&mut events, "MIGRATION", Duration::from_millis(500))
                .await;
        }
    }
    match qmp.query_status().await {
        Ok(s) if s.running => "running on the source".into(),
        Ok(s) if was_running => match qmp.execute("cont", None).await {
            Ok(_) => "running on the source (resumed)".into(),
            Err(e) => format!("paused on the source ({}; resume failed: {e})", s.status),
        },
        Ok(s) => format!("{} on the source (as before the migration)", s.status),
        Err(e) => format!("unknown ({e})"),
    }
}

struct SourceCtx {
    agent: Arc<Agent>,
    vm: Arc<Vm>,
    req: MigrateRequest,
    handle: Arc<MigrationHandle>,
    t0: Instant,
    source_running: bool,
    committed: bool,
    /// v2: raised by the forwarder just before SourceDone carries the commit.
    commit_sent: Arc<AtomicBool>,
    writer: Option<PeerWriter>,
}

impl SourceCtx {
    async fn migrate(&mut self) -> Result<MigrationReport, MigrateError> {
        let qmp = self.vm.qmp.clone();
        let mut cancel = self.handle.cancelled();

        // --- checks before anything moves
        let caps = qmp.query_migrate_capabilities().await?;
        check_capabilities(&caps)?;
        let has_disks = !self.vm.spec.disks.is_empty();
        let disk_plan = if has_disks {
            Some(disk::SourceDisks::describe(&qmp, &self.vm.spec).await?)
        } else {
            None
        };
        self.source_running = qmp.query_status().await?.running;

        // --- connect
        self.handle.set_phase(super::Phase::Connect);
        let (stream, peer) = self.dial(Duration::from_secs(10)).await?;
        let (rd, wr) = stream.split();
        let mut reader = FrameReader::new(rd);
        let writer: PeerWriter = Arc::new(Mutex::new(FrameWriter::new(wr)));
        self.writer = Some(writer.clone());

        let t_hello = Instant::now();
        send(
            &writer,
            &Message::Hello {
                min_version: tern_proto::MIN_PROTOCOL_VERSION,
                max_version: self.agent.config.max_protocol,
                agent: self.agent.config.name.clone(),
            },
        )
        .await?;
        let (version, dest_agent) =
            match expect(&mut reader, Duration::from_secs(10), "HelloAck").await? {
                Message::HelloAck { version, agent } => (version, agent),
                m => return Err(unexpected(&m, "HelloAck")),
            };
        let rtt = t_hello.elapsed();

        // --- authorisation, on the labels the cluster CA gave the destination
        let host = match peer.names.first() {
            Some(n) => format!("{dest_agent} ({n})"),
            None => dest_agent.clone(),
        };
        self.agent
            .policy
            .check(&VmFacts::of(&self.vm.spec), &host, &peer.labels)?;

        // --- prepare
        self.handle.set_phase(super::Phase::Prepare);
        if let Some(infos) = &disk_plan {
            if version < 3 {
                return Err(MigrateError::BadRequest(format!(
                    "VM {} has local disks and the destination agent speaks protocol v{version}: moving disks needs v3 (upgrade tern on {dest_agent})",
                    self.vm.spec.name
                )));
            }
            send(
                &writer,
                &Message::DiskOffer {
                    disks: infos.clone(),
                },
            )
            .await?;
        }
        if self.vm.spec.tpm {
            // only now, after the policy allowed this destination: the key that opens the
            // VM's TPM state in the stream
            if version < 4 {
                return Err(MigrateError::BadRequest(format!(
                    "VM {} has a vTPM and the destination agent speaks protocol v{version}: moving a vTPM needs v4 (upgrade tern on {dest_agent})",
                    self.vm.spec.name
                )));
            }
            let key = crate::tpm_migration_key_of(&self.agent.config.state_dir, &self.vm.run_dir)
                .map_err(MigrateError::LocalIo)?;
            send(&writer, &Message::TpmKey { key }).await?;
        }
        send(
            &writer,
            &Message::Prepare {
                migration_id: self.handle.id.clone(),
                spec_toml: self.vm.spec.to_toml(),
                source_running: self.source_running,
                qemu_version: self.vm.qemu_version.clone(),
            },
        )
        .await?;
        let policy = CodecPolicy::from(self.req.compression.unwrap_or_default());
        let mut summary: HashSet<u64> = HashSet::new();
        let mut dest_key = None;
        // one budget for the whole exchange: a destination that keeps sending Summary
        // frames cannot hold the source here
        let prepare_deadline = tokio::time::Instant::now() + PREPARE_WITHIN;
        let mut summary_cut = false;
        let dest_qemu = loop {
            let left = prepare_deadline.saturating_duration_since(tokio::time::Instant::now());
            let m = tokio::select! {
                m = expect(&mut reader, left, "Prepared") => m?,
                _ = super::wait_cancelled(&mut cancel) => return Err(MigrateError::Cancelled),
            };
            match m {
                Message::Summary { key_id, prefixes } => {
                    if dest_key.is_some_and(|k| k != key_id) {
                        return Err(MigrateError::Protocol(
                            "Summary frames with two cluster key ids".into(),
                        ));
                    }
                    dest_key = Some(key_id);
                    let room =
                        tern_proto::limits::MAX_SUMMARY_PREFIXES.saturating_sub(summary.len());
                    if prefixes.len() > room && !summary_cut {
                        summary_cut = true;
                        tracing::warn!(migration = %self.handle.id, kept = tern_proto::limits::MAX_SUMMARY_PREFIXES, "the destination's summary is larger than this agent keeps: the rest is ignored (fewer references)");
                    }
                    summary.extend(prefixes.into_iter().take(room));
                }
                Message::Prepared { qemu_version } => break qemu_version,
                m => return Err(unexpected(&m, "Prepared")),
            }
        };
        let same_key = dest_key == Some(self.agent.hasher.key_id());
        if version >= 2 && !same_key {
            tracing::warn!(migration = %self.handle.id, "the destination uses another cluster key: no references or deltas (give both agents the same --cluster-key)");
        }
        let dedup = version >= 2 && same_key && self.req.dedup.unwrap_or(true);
        let policy = if version >= 2 {
            policy
        } else {
            CodecPolicy::Fixed(Codec::None)
        };
        self.handle
            .update(|s| s.progress.destination_held_pages = summary.len() as u64);
        // Parallel streams: extra connections that carry the data frames, in sequence.
        let data_streams = if version >= 2 {
            match self.req.streams {
                Some(n) => n.min(16),
                None if rtt >= Duration::from_millis(10) => 4,
                None => 0,
            }
        } else {
            0
        };
        // --max-bandwidth: one budget for memory and disk bytes on the wire
        let budget = self
            .req
            .max_bandwidth_mibps
            .map(|m| Arc::new(super::rate::RateLimit::new(m << 20)));
        let mut links = Links {
            budget: budget.clone(),
            ..Links::default()
        };
        let mut _link_tasks = Vec::new();
        for index in 1..=data_streams {
            let w = self.open_data_stream(index).await?;
            let (tx, rx) = mpsc::channel(2);
            let handle = self.handle.clone();
            _link_tasks.push(AbortOnDrop(tokio::spawn(async move {
                if let Err(e) = data_link(w, rx, handle).await {
                    tracing::warn!("data stream {index} failed: {e}");
                }
            })));
            links.senders.push(tx);
        }
        if data_streams > 0 {
            tracing::info!(migration = %self.handle.id, streams = data_streams, rtt_ms = rtt.as_millis() as u64, "parallel data streams");
        }
        let encoder = PageEncoder::new(
            self.agent.hasher.clone(),
            self.agent.store.clone(),
            dedup,
            summary,
        );

        // The destination's frames: return path (once QEMU is connected), disk replies,
        // control messages.
        let (ev_tx, mut ev_rx) = mpsc::channel(16);
        let (disk_tx, mut disk_inbox) = mpsc::channel(tern_proto::limits::MAX_DISK_REPLIES);
        let (qemu_tx, qemu_rx) = tokio::sync::oneshot::channel();
        let flow = (version >= 2).then(|| Arc::new(Flow::new()));
        let rp_task = tokio::spawn(peer_reader(
            reader,
            qemu_rx,
            ev_tx,
            disk_tx,
            self.handle.clone(),
            writer.clone(),
            (self.agent.store.clone(), encoder.offered()),
            flow.clone(),
        ));
        let _guard = AbortOnDrop(rp_task);

        // --- disks: the full copy and rounds until little is dirty, before memory moves
        let mut disks = None;
        if let Some(infos) = disk_plan {
            self.handle.set_phase(super::Phase::DiskCopy);
            let codec = match policy {
                CodecPolicy::Fixed(c) => c,
                CodecPolicy::Auto if rtt >= Duration::from_millis(10) => Codec::Zstd(3),
                CodecPolicy::Auto => Codec::Lz4,
            };
            let mut d = disk::SourceDisks::start(
                qmp.clone(),
                &self.vm.run_dir,
                &infos,
                writer.clone(),
                self.agent.hasher.clone(),
                codec,
                self.agent.config.stall_timeout,
                budget.clone(),
                self.handle.clone(),
            )
            .await?;
            tokio::select! {
                r = d.copy(&mut disk_inbox) => r?,
                ev = ev_rx.recv() => return Err(peer_event_error(ev)),
                _ = super::wait_cancelled(&mut cancel) => return Err(MigrateError::Cancelled),
            }
            tracing::info!(migration = %self.handle.id, report = ?d.report, "disk copy done, memory next");
            tern_qemu::disk::enable_pause_before_switchover(&qmp)
                .await
                .map_err(|e| MigrateError::Qmp(e.0))?;
            disks = Some(d);
        }

        // --- transfer
        self.handle.set_phase(super::Phase::Transfer);
        qmp.set_migrate_capabilities(&[("return-path", true), ("events", true)])
            .await?;
        let mut params = json!({ "downtime-limit": self.req.downtime_ms.unwrap_or(300) });
        // Without a cap QEMU limits itself to 128 MiB/s; tern's socket applies back-pressure.
        let bw = self
            .req
            .max_bandwidth_mibps
            .map(|m| m << 20)
            .unwrap_or(1 << 40);
        params["max-bandwidth"] = json!(bw);
        qmp.set_migrate_parameters(params).await?;

        // QEMU migrates into a socket it is handed (it may not open paths itself)
        let fd_name = format!("tern-migrate-{}", self.handle.id);
        let qemu_sock = qmp.stream_socket(&fd_name).await?;
        let mut events = qmp.subscribe();
        qmp.execute("migrate", Some(json!({ "uri": format!("fd:{fd_name}") })))
            .await?;
        let (qemu_rd, qemu_wr) = qemu_sock.into_split();
        let _ = qemu_tx.send(qemu_wr);
        // disk rounds go on beside memory until QEMU pauses before the switchover
        let (disk_stop_tx, disk_stop_rx) = tokio::sync::watch::channel(false);
        let mut disk_stop = Some(disk_stop_tx);
        let mut disk_task = disks
            .take()
            .map(|d| tokio::spawn(d.live(disk_inbox, disk_stop_rx)));
        // a failed migration must not leave rounds running behind its cleanup
        let _disk_guard = disk_task
            .as_ref()
            .map(|t| AbortHandleOnDrop(t.abort_handle()));
        let mut disk_report = None;
        // v2: SourceDone carries the commit (the switchover point moves there); the
        // forwarder raises this flag just before sending it.
        let commit_sent = self.commit_sent.clone();
        let fwd_task = tokio::spawn(forward(
            qemu_rd,
            writer.clone(),
            self.handle.clone(),
            ForwardPlan {
                pages: encoder,
                picker: CodecPicker::new(policy),
                commit: (version >= 2).then(|| commit_sent.clone()),
                links,
                flow: flow.map(|f| (f, rtt)),
            },
        ));
        let abort_fwd = fwd_task.abort_handle();
        let mut fwd = fwd_task;
        let _fwd_guard = AbortHandleOnDrop(abort_fwd);
        let stall = self.agent.config.stall_timeout;
        let mut last_progress = (0u64, Instant::now());

        let mut stopped_at: Option<SystemTime> = None;
        let mut source_digest: Option<[u8; 32]> = None;
        let mut fwd_stats: Option<ForwardDone> = None;
        let mut fwd_done = false;
        let mut t_stream_end: Option<SystemTime> = None;
        let mut t_ready: Option<SystemTime> = None;
        let mut told_bps = 0u64;
        let mut ticker = tokio::time::interval(Duration::from_millis(250));
        let transfer: Result<TransferEnd, MigrateError> = async { loop {
            tokio::select! {
                r = &mut fwd, if !fwd_done => {
                    fwd_done = true;
                    let done = r.map_err(|e| MigrateError::Protocol(format!("forwarder panicked: {e}")))??;
                    source_digest = Some(done.digest);
                    fwd_stats = Some(done);
                    t_stream_end = Some(SystemTime::now());
                    if commit_sent.load(Ordering::SeqCst) {
                        break Ok(TransferEnd::Committed { resumed: None });
                    }
                    self.handle.set_phase(super::Phase::Verify);
                }
                ev = ev_rx.recv() => match ev {
                    Some(PeerEvent::Msg(Message::ReadyToResume { digest })) => {
                        // The forwarder sent SourceDone (the destination answers only then)
                        // but its completion may not have been seen yet: join it first.
                        if !fwd_done {
                            let r = tokio::time::timeout(Duration::from_secs(10), &mut fwd)
                                .await
                                .map_err(|_| MigrateError::Protocol("ReadyToResume before SourceDone".into()))?;
                            // (every path out of this arm leaves the loop: no fwd_done needed)
                            let done = r.map_err(|e| MigrateError::Protocol(format!("forwarder panicked: {e}")))??;
                            source_digest = Some(done.digest);
                            fwd_stats = Some(done);
                            t_stream_end = Some(SystemTime::now());
                        }
                        let Some(src) = source_digest else {
                            return Err(MigrateError::Protocol("ReadyToResume before SourceDone".into()));
                        };
                        t_ready = Some(SystemTime::now());
                        if src != digest {
                            return Err(MigrateError::DigestMismatch {
                                source_digest: hex::encode(src),
                                dest_digest: hex::encode(digest),
                            });
                        }
                        break Ok(TransferEnd::Ready { digest });
                    }
                    Some(PeerEvent::Msg(Message::Resumed { resumed_unix_us })) if commit_sent.load(Ordering::SeqCst) => {
                        // the forwarder sent SourceDone; its completion may not be seen yet
                        if !fwd_done {
                            if let Ok(Ok(Ok(done))) = tokio::time::timeout(Duration::from_secs(10), &mut fwd).await {
                                source_digest = Some(done.digest);
                                fwd_stats = Some(done);
                                t_stream_end = Some(SystemTime::now());
                            }
                        }
                        break Ok(TransferEnd::Committed { resumed: Some(resumed_unix_us) });
                    }
                    Some(PeerEvent::Msg(Message::Abort { code, message })) => {
                        return Err(MigrateError::Remote { code, message });
                    }
                    Some(PeerEvent::Msg(m)) => return Err(unexpected(&m, "ReturnPath or ReadyToResume")),
                    Some(PeerEvent::Failed(e)) => return Err(e.into()),
                    Some(PeerEvent::Broken(m)) => return Err(MigrateError::Protocol(m)),
                    Some(PeerEvent::Closed) | None => return Err(MigrateError::PeerClosed("the transfer")),
                },
                ev = events.recv() => {
                    if let Ok(ev) = ev {
                        match ev.event.as_str() {
                            "STOP" => stopped_at = Some(ev.timestamp),
                            "MIGRATION" => {
                                let st = ev.data.get("status").and_then(|s| s.as_str()).unwrap_or("");
                                if st == "failed" {
                                    let info = qmp.query_migrate().await.ok();
                                    let why = info.and_then(|i| i.error_desc).unwrap_or_else(|| "no reason given".into());
                                    return Err(MigrateError::QemuMigration(why));
                                }
                                if st == "pre-switchover" {
                                    // the guest is stopped and its disks drained: the
                                    // last disk round, then QEMU sends the device state
                                    if self.agent.config.fault == Some(super::Fault::ExitAtPreSwitchover) {
                                        tracing::warn!("fault injection: exiting at pre-switchover");
                                        std::process::exit(70);
                                    }
                                    if let Some(task) = disk_task.take() {
                                        let r = finish_disks(&qmp, task, disk_stop.take(), ev.timestamp, stall, &self.handle.id).await?;
                                        disk_report = Some(r);
                                    } else {
                                        tern_qemu::disk::continue_switchover(&qmp).await.map_err(|e| MigrateError::Qmp(e.0))?;
                                    }
                                }
                            }
                            "SHUTDOWN" => return Err(MigrateError::QemuMigration("source QEMU shut down".into())),
                            _ => {}
                        }
                    }
                }
                _ = super::wait_cancelled(&mut cancel) => return Err(MigrateError::Cancelled),
                r = async { disk_task.as_mut().expect("guarded").await }, if disk_task.is_some() => {
                    // live rounds end only when told to, or on failure
                    disk_task = None;
                    let (_, _, r) = r.map_err(|e| MigrateError::Protocol(format!("disk task failed: {e}")))?;
                    r?;
                    return Err(MigrateError::Protocol("disk rounds ended before the switchover".into()));
                }
                _ = ticker.tick() => {
                    let c = &self.handle.counters;
                    let moved = Counters::get(&c.bytes_from_qemu) + Counters::get(&c.wire_out) + Counters::get(&c.wire_in) + Counters::get(&c.wire_data);
                    if moved != last_progress.0 {
                        last_progress = (moved, Instant::now());
                    } else if last_progress.1.elapsed() > stall {
                        return Err(MigrateError::Timeout(stall, "any progress on the connection to the destination"));
                    }
                    let bps = Counters::get(&c.switchover_bps);
                    if bps > 0 && (bps as f64 - told_bps as f64).abs() > 0.15 * told_bps as f64 {
                        // QEMU >= 8.2; older ones keep their own estimate
                        let _ = qmp.set_migrate_parameters(json!({ "avail-switchover-bandwidth": bps })).await;
                        told_bps = bps;
                    }
                    if let Ok(Ok(info)) = tokio::time::timeout(Duration::from_millis(200), qmp.query_migrate()).await {
                        self.handle.update(|s| {
                            s.progress.qemu_status = info.status.clone();
                            s.progress.ram_remaining = info.ram_remaining;
                            s.progress.ram_total = info.ram_total;
                            s.progress.dirty_pages_rate = info.dirty_pages_rate;
                            s.progress.dirty_sync_count = info.dirty_sync_count;
                        });
                    }
                }
            }
        } }.await;

        let (dest_digest, t_commit, resumed) = match transfer {
            Ok(TransferEnd::Ready { digest }) => {
                // --- v1: the source QEMU must have completed (it did when it closed the
                // stream); then Commit
                let info = qmp.query_migrate().await?;
                if info.status != "completed" {
                    return Err(MigrateError::QemuMigration(format!(
                        "source QEMU reports {:?} after sending everything",
                        info.status
                    )));
                }
                if self.handle.is_cancelled() {
                    return Err(MigrateError::Cancelled);
                }
                // ===== SWITCHOVER POINT (v1): after Commit the source never resumes. =====
                self.handle.set_phase(super::Phase::Switchover);
                self.committed = true;
                let t_commit = SystemTime::now();
                // a failed send may still have reached it: ask, never guess
                let resumed = match send(&writer, &Message::Commit).await {
                    Ok(()) => await_resumed(&mut ev_rx, &self.handle.counters).await,
                    Err(e) => Err(Lost::Unknown(format!(
                        "sending Commit failed: {}",
                        error_chain(&e)
                    ))),
                };
                (digest, t_commit, resumed)
            }
            Ok(TransferEnd::Committed { resumed }) => {
                // ===== SWITCHOVER POINT (v2): SourceDone carried the commit. =====
                self.handle.set_phase(super::Phase::Switchover);
                self.committed = true;
                let resumed = match resumed {
                    Some(us) => Ok(us),
                    None => await_resumed(&mut ev_rx, &self.handle.counters).await,
                };
                // (the destination resumes only when its digest equals the source's)
                let src = source_digest.unwrap_or_default();
                (src, t_stream_end.unwrap_or_else(SystemTime::now), resumed)
            }
            // The destination discarded everything (its Abort): the source may resume.
            Err(e @ MigrateError::Remote { .. }) => return Err(e),
            Err(e) if commit_sent.load(Ordering::SeqCst) => {
                // The commit went out: never resume without the destination's word.
                self.handle.set_phase(super::Phase::Switchover);
                self.committed = true;
                let src = source_digest.unwrap_or_default();
                (
                    src,
                    t_stream_end.unwrap_or_else(SystemTime::now),
                    Err(Lost::Unknown(error_chain(&e))),
                )
            }
            Err(e) => return Err(e),
        };
        let mut resolved_by_query = false;
        let resumed_us = match resumed {
            Ok(us) => us,
            Err(Lost::Discarded { code, message }) => {
                // it said so itself, before running anything
                self.committed = false;
                return Err(MigrateError::Remote { code, message });
            }
            // Resumed did not come: ask the destination what it did, never guess.
            Err(Lost::Unknown(why)) => match self.ask_destination(&why).await? {
                (MigrationState::Running, us) => {
                    resolved_by_query = true;
                    us
                }
                (state, _) => {
                    // The destination holds nothing of the VM: the source may run it again.
                    self.committed = false;
                    return Err(MigrateError::Remote {
                        code: ErrorCode::Internal,
                        message: format!(
                            "the destination did not confirm the switchover ({why}) and reports the migration as {state:?}: nothing of the VM runs there"
                        ),
                    });
                }
            },
        };
        let info = qmp.query_migrate().await?;
        let pages = super::page_counts(&self.handle.counters).total;
        let total = self.t0.elapsed();
        let ms = |a: Option<SystemTime>, b: SystemTime| -> Option<f64> {
            Some(b.duration_since(a?).ok()?.as_secs_f64() * 1000.0)
        };
        let resumed_at = SystemTime::UNIX_EPOCH + Duration::from_micros(resumed_us);
        let switchover = SwitchoverTimes {
            stop_to_stream_end_ms: t_stream_end.and_then(|e| ms(stopped_at, e)),
            stream_end_to_ready_ms: t_ready.and_then(|r| ms(t_stream_end, r)),
            ready_to_commit_ms: ms(t_ready, t_commit),
            commit_to_resume_ms: ms(Some(t_commit), resumed_at),
        };
        tracing::info!(migration = %self.handle.id, ?switchover, "switchover timing");
        let downtime_ms = match (self.source_running, stopped_at) {
            (true, Some(stop)) => resumed_us.saturating_sub(unix_us(stop)) / 1000,
            _ => 0,
        };
        let c = &self.handle.counters;
        let bytes_from_qemu = Counters::get(&c.bytes_from_qemu);
        let wire = {
            let w = writer.lock().await;
            w.bytes_written + Counters::get(&c.wire_in) + Counters::get(&c.wire_data)
        };
        let ram_bytes = self.handle.status().progress.ram_total.unwrap_or(0);
        let secs = total.as_secs_f64().max(1e-6);
        Ok(MigrationReport {
            migration_id: self.handle.id.clone(),
            vm: self.vm.spec.name.clone(),
            source: self.agent.config.name.clone(),
            destination: format!("{dest_agent} ({})", self.req.to),
            outcome: "succeeded".into(),
            total_time_ms: total.as_millis() as u64,
            downtime_ms,
            qemu_downtime_ms: info.downtime_ms,
            qemu_total_time_ms: info.total_time_ms,
            ram_bytes,
            bytes_from_qemu,
            bytes_on_wire: wire,
            pages: PageCounts {
                total: pages,
                ..super::page_counts(c)
            },
            throughput_mbps: bytes_from_qemu as f64 * 8.0 / 1e6 / secs,
            digest_ok: true,
            digest: hex::encode(dest_digest),
            qemu_version: self.vm.qemu_version.clone(),
            destination_qemu_version: dest_qemu,
            source_was_running: self.source_running,
            protocol_version: version,
            switchover: Some(switchover),
            resumed_unix_us: resumed_us,
            resolved_by_query,
            encoding: fwd_stats.map(|f| f.encoding).unwrap_or_default(),
            disk: disk_report,
            timeline: self.handle.status().timeline,
        })
    }

    /// After a lost Resumed: asks the destination agent, on a new connection, what became
    /// of this migration (retrying while it is still in progress or unreachable, ~30 s).
    async fn ask_destination(&self, why: &str) -> Result<(MigrationState, u64), MigrateError> {
        tracing::warn!(migration = %self.handle.id, %why, "no Resumed after Commit: asking the destination");
        let deadline = Instant::now() + Duration::from_secs(30);
        let mut last = why.to_string();
        while Instant::now() < deadline {
            match self.query_once().await {
                Ok((MigrationState::InProgress, _)) => last = "still in progress".into(),
                Ok(answer) => return Ok(answer),
                Err(e) => last = error_chain(&e),
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
        Err(MigrateError::InDoubt(format!(
            "{why}; asking the destination failed: {last}"
        )))
    }

    /// A mutually authenticated connection to the destination agent.
    async fn dial(
        &self,
        within: Duration,
    ) -> Result<(crate::tls::PeerStream, crate::tls::PeerIdentity), MigrateError> {
        Ok(self
            .agent
            .security
            .connect(&self.req.to, within, self.agent.config.stall_timeout)
            .await?)
    }

    /// Opens extra data connection `index` for this migration (Hello, then Attach).
    async fn open_data_stream(
        &self,
        index: u16,
    ) -> Result<FrameWriter<crate::tls::PeerWrite>, MigrateError> {
        let (stream, _) = self.dial(Duration::from_secs(10)).await?;
        let (rd, wr) = stream.split();
        let mut reader = FrameReader::new(rd);
        let mut writer = FrameWriter::new(wr);
        writer
            .send(&Message::Hello {
                min_version: tern_proto::MIN_PROTOCOL_VERSION,
                max_version: self.agent.config.max_protocol,
                agent: self.agent.config.name.clone(),
            })
            .await
            .map_err(MigrateError::PeerWrite)?;
        match expect(&mut reader, Duration::from_secs(10), "HelloAck").await? {
            Message::HelloAck { .. } => {}
            m => return Err(unexpected(&m, "HelloAck")),
        }
        writer
            .send(&Message::Attach {
                migration_id: self.handle.id.clone(),
                index,
            })
            .await
            .map_err(MigrateError::PeerWrite)?;
        Ok(writer)
    }

    async fn query_once(&self) -> Result<(MigrationState, u64), MigrateError> {
        let (stream, _) = self.dial(Duration::from_secs(5)).await?;
        let (rd, wr) = stream.split();
        let mut reader = FrameReader::new(rd);
        let mut writer = FrameWriter::new(wr);
        writer
            .send(&Message::Hello {
                min_version: tern_proto::MIN_PROTOCOL_VERSION,
                max_version: self.agent.config.max_protocol,
                agent: self.agent.config.name.clone(),
            })
            .await
            .map_err(MigrateError::PeerWrite)?;
        match expect(&mut reader, Duration::from_secs(5), "HelloAck").await? {
            Message::HelloAck { .. } => {}
            m => return Err(unexpected(&m, "HelloAck")),
        }
        writer
            .send(&Message::Query {
                migration_id: self.handle.id.clone(),
            })
            .await
            .map_err(MigrateError::PeerWrite)?;
        match expect(&mut reader, Duration::from_secs(5), "QueryAnswer").await? {
            Message::QueryAnswer {
                state,
                resumed_unix_us,
            } => Ok((state, resumed_unix_us)),
            m => Err(unexpected(&m, "QueryAnswer")),
        }
    }
}

/// How the transfer phase ended.
enum TransferEnd {
    /// v1: the destination is ready; the source decides (Commit).
    Ready { digest: [u8; 32] },
    /// v2: SourceDone carried the commit; Resumed may already be here.
    Committed { resumed: Option<u64> },
}

/// Why no Resumed came after the commit.
enum Lost {
    /// The destination aborted: it discarded everything, nothing of the VM runs there.
    Discarded { code: ErrorCode, message: String },
    /// No word from it (connection lost, timeout): ask it.
    Unknown(String),
}

/// How long the source waits for Resumed without hearing anything from the destination
/// (a busy destination sends keepalives, `limits::KEEPALIVE_INTERVAL`)...
const RESUMED_SILENCE: Duration = Duration::from_secs(30);
/// ...and at most in all, keepalives or not.
const RESUMED_WITHIN: Duration = Duration::from_secs(600);

/// Waits for the destination's Resumed after the commit: until it has been silent for
/// [`RESUMED_SILENCE`] (any frame counts: `wire_in` moves), at most [`RESUMED_WITHIN`].
async fn await_resumed(ev_rx: &mut mpsc::Receiver<PeerEvent>, c: &Counters) -> Result<u64, Lost> {
    let start = Instant::now();
    let mut heard = (Counters::get(&c.wire_in), Instant::now());
    loop {
        let now = Counters::get(&c.wire_in);
        if now != heard.0 {
            heard = (now, Instant::now());
        }
        if heard.1.elapsed() > RESUMED_SILENCE {
            return Err(Lost::Unknown(format!(
                "no word from the destination for {} s",
                RESUMED_SILENCE.as_secs()
            )));
        }
        if start.elapsed() > RESUMED_WITHIN {
            return Err(Lost::Unknown(format!(
                "no Resumed within {} s",
                RESUMED_WITHIN.as_secs()
            )));
        }
        match tokio::time::timeout(Duration::from_secs(1), ev_rx.recv()).await {
            Err(_) => continue,
            Ok(Some(PeerEvent::Msg(Message::Resumed { resumed_unix_us }))) => {
                return Ok(resumed_unix_us)
            }
            Ok(Some(PeerEvent::Msg(Message::ReturnPath(_) | Message::Applied { .. }))) => continue,
            Ok(Some(PeerEvent::Msg(Message::Abort { code, message }))) => {
                return Err(Lost::Discarded { code, message })
            }
            Ok(Some(PeerEvent::Msg(m))) => {
                return Err(Lost::Unknown(format!(
                    "got {} instead of Resumed",
                    m.name()
                )))
            }
            Ok(Some(PeerEvent::Failed(e))) => return Err(Lost::Unknown(error_chain(&e))),
            Ok(Some(PeerEvent::Broken(m))) => return Err(Lost::Unknown(m)),
            Ok(Some(PeerEvent::Closed)) | Ok(None) => {
                return Err(Lost::Unknown("connection closed".to_string()))
            }
        }
    }
}

struct AbortHandleOnDrop(tokio::task::AbortHandle);
impl Drop for AbortHandleOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

struct AbortOnDrop(tokio::task::JoinHandle<()>);
impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

async fn send(w: &PeerWriter, m: &Message) -> Result<(), MigrateError> {
    w.lock()
        .await
        .send(m)
        .await
        .map_err(MigrateError::PeerWrite)
}

async fn expect<R: tokio::io::AsyncRead + Unpin>(
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

fn unexpected(m: &Message, wanted: &str) -> MigrateError {
    MigrateError::Protocol(format!("expected {wanted}, got {}", m.name()))
}

/// Reads the destination's frames: return-path bytes go straight into the source QEMU's
/// socket (no buffering: PONG and SHUT must not wait), a Want is answered from the page
/// store at once, everything else goes to the orchestrator.
#[allow(clippy::too_many_arguments)]
async fn peer_reader(
    mut reader: FrameReader<crate::tls::PeerRead>,
    mut qemu_rx: tokio::sync::oneshot::Receiver<unix::OwnedWriteHalf>,
    tx: mpsc::Sender<PeerEvent>,
    disk_tx: mpsc::Sender<Message>,
    handle: Arc<MigrationHandle>,
    writer: PeerWriter,
    (store, offered): (SharedStore, Offered),
    flow: Option<Arc<Flow>>,
) {
    let mut qemu_ok = true;
    let mut qemu: Option<unix::OwnedWriteHalf> = None;
    loop {
        let r = reader.next().await;
        handle
            .counters
            .wire_in
            .store(reader.bytes_read, Ordering::Relaxed);
        let ev = match r {
            Ok(Some(Message::ReturnPath(b))) => {
                if qemu.is_none() && qemu_ok {
                    // the return path starts after QEMU connected to us
                    match (&mut qemu_rx).await {
                        Ok(q) => qemu = Some(q),
                        Err(_) => qemu_ok = false,
                    }
                }
                let Some(q) = qemu.as_mut() else { continue };
                if qemu_ok && q.write_all(&b).await.is_err() {
                    // QEMU closed its end (done or failed): its own status tells which.
                    qemu_ok = false;
                }
                continue;
            }
            Ok(Some(Message::Applied { units })) if flow.is_some() => {
                if let Some(f) = &flow {
                    f.applied.fetch_max(units, Ordering::SeqCst);
                    f.notify.notify_one();
                }
                continue;
            }
            Ok(Some(m @ (Message::DiskWant { .. } | Message::DiskRoundDone { .. }))) => {
                match disk_tx.try_send(m) {
                    // rounds that ended drop their inbox
                    Ok(()) | Err(mpsc::error::TrySendError::Closed(_)) => continue,
                    Err(mpsc::error::TrySendError::Full(_)) => PeerEvent::Broken(format!(
                        "the destination sent more than {} disk replies nobody asked for",
                        tern_proto::limits::MAX_DISK_REPLIES
                    )),
                }
            }
            Ok(Some(Message::Want { hashes })) => {
                Counters::add(&handle.counters.wants, hashes.len() as u64);
                match answer_want(&store, &offered, &hashes) {
                    Err(e) => PeerEvent::Broken(e.to_string()),
                    Ok(pages) => {
                        if writer
                            .lock()
                            .await
                            .send(&Message::Content { pages })
                            .await
                            .is_err()
                        {
                            PeerEvent::Closed
                        } else {
                            continue;
                        }
                    }
                }
            }
            Ok(Some(m)) => PeerEvent::Msg(m),
            Ok(None) => PeerEvent::Closed,
            Err(e) => PeerEvent::Failed(e),
        };
        let last = !matches!(ev, PeerEvent::Msg(_));
        if tx.send(ev).await.is_err() || last {
            return;
        }
    }
}

/// Batches page records per block and keeps them in order with verbatim bytes.
struct Outbox {
    verbatim: BytesMut,
    batch: Vec<Page>,
    batch_block: u16,
    batch_bytes: usize,
    queued: Vec<Message>,
    queued_bytes: usize,
}

const BATCH_PAGES: usize = 64;

/// A frame ready for the writer: as a message (bulk data not copied) or already encoded.
enum Out {
    Frame(Message),
    Encoded(Bytes),
}

/// Frame compression state of one migration.
struct Compression {
    fc: FrameCompressor,
    picker: CodecPicker,
    buf: BytesMut,
    sample: BytesMut,
    raw: u64,
    wire: u64,
}

impl Outbox {
    fn new() -> Self {
        Outbox {
            verbatim: BytesMut::new(),
            batch: Vec::with_capacity(BATCH_PAGES),
            batch_block: 0,
            batch_bytes: 0,
            queued: Vec::new(),
            queued_bytes: 0,
        }
    }

    fn close_batch(&mut self) {
        if !self.batch.is_empty() {
            let pages = std::mem::replace(&mut self.batch, Vec::with_capacity(BATCH_PAGES));
            self.queued.push(Message::Pages {
                block: self.batch_block,
                pages,
            });
            self.queued_bytes += self.batch_bytes;
            self.batch_bytes = 0;
        }
    }

    fn close_verbatim(&mut self) {
        if !self.verbatim.is_empty() {
            let b = self.verbatim.split().freeze();
            self.queued_bytes += b.len();
            self.queued.push(Message::QemuBytes(b));
        }
    }

    fn verbatim(&mut self, b: &[u8]) {
        self.close_batch();
        self.verbatim.extend_from_slice(b);
    }

    fn page(&mut self, block: u16, page: Page) {
        self.close_verbatim();
        if !self.batch.is_empty() && self.batch_block != block {
            self.close_batch();
        }
        self.batch_block = block;
        self.batch_bytes += match &page.body {
            PageBody::Raw(d) => d.len() + 13,
            PageBody::Zero { .. } => 10,
            PageBody::Ref(_) => 25,
            PageBody::Delta { diff, .. } => 29 + diff.len(),
        };
        self.batch.push(page);
        if self.batch.len() >= BATCH_PAGES {
            self.close_batch();
        }
    }

    fn message(&mut self, m: Message) {
        self.close_batch();
        self.close_verbatim();
        self.queued.push(m);
    }

    fn size(&self) -> usize {
        self.queued_bytes + self.verbatim.len() + self.batch_bytes
    }

    /// Everything queued, in order, as frames: bulk frames compressed with the picker's
    /// codec (done here, before the writer is locked), the rest as messages.
    fn drain(&mut self, comp: &mut Compression) -> Vec<Out> {
        self.close_batch();
        self.close_verbatim();
        self.queued_bytes = 0;
        let codec = comp.picker.codec();
        let mut v = Vec::with_capacity(self.queued.len());
        for m in self.queued.drain(..) {
            let bulk = matches!(m, Message::Pages { .. } | Message::QemuBytes(_));
            if bulk && comp.picker.wants_sample() {
                comp.sample.clear();
                tern_proto::encode(&m, &mut comp.sample);
                comp.picker.sample(&comp.sample[tern_proto::HEADER_LEN..]);
            }
            if bulk && codec != Codec::None {
                let r = comp.fc.encode(&m, codec, &mut comp.buf);
                comp.raw += (r.raw + tern_proto::HEADER_LEN) as u64;
                comp.wire += r.wire as u64;
                v.push(Out::Encoded(comp.buf.split().freeze()));
            } else {
                let n = tern_proto::frame_len(&m) as u64;
                comp.raw += n;
                comp.wire += n;
                v.push(Out::Frame(m));
            }
        }
        v
    }
}

/// How the forwarder encodes and sends: decided before the transfer starts.
struct ForwardPlan {
    pages: PageEncoder,
    picker: CodecPicker,
    /// v2: raised just before SourceDone carries the commit.
    commit: Option<Arc<AtomicBool>>,
    /// Extra data connections (none: the control connection carries the data).
    links: Links,
    /// v2 flow control, with the round trip to the destination.
    flow: Option<(Arc<Flow>, Duration)>,
}

/// What the forwarder hands back once QEMU's stream ended properly.
struct ForwardDone {
    digest: [u8; 32],
    encoding: EncodingReport,
}

/// Parses the source QEMU's stream and forwards it to the destination agent, each page
/// in the cheapest form the encoder finds; returns the memory digest of what it
/// forwarded once QEMU closed the stream at a proper end.
async fn forward(
    mut qemu: unix::OwnedReadHalf,
    writer: PeerWriter,
    handle: Arc<MigrationHandle>,
    plan: ForwardPlan,
) -> Result<ForwardDone, MigrateError> {
    let ForwardPlan {
        mut pages,
        picker,
        commit,
        mut links,
        flow,
    } = plan;
    let mut window = flow.as_ref().map(|(_, rtt)| Window::new(*rtt));
    // stream units handed to the outbox so far (the destination counts the same)
    let mut units = 0u64;
    let mut parser = Parser::new();
    let mut enc = Encoder::new(tern_qemu::stream::DEFAULT_PAGE_SIZE);
    let mut inbuf = BytesMut::with_capacity(4 << 20);
    let mut out = Outbox::new();
    let mut comp = Compression {
        fc: FrameCompressor::default(),
        picker,
        buf: BytesMut::new(),
        sample: BytesMut::new(),
        raw: 0,
        wire: 0,
    };
    let mut scratch = Vec::with_capacity(64 << 10);
    let mut digest: Option<MemoryDigest> = None;
    let mut block_index: HashMap<BlockName, u16> = HashMap::new();
    let c = &handle.counters;
    // Bytes read from QEMU live in `inbuf`; each round freezes them so that page records
    // are slices of the read buffer (no copy) all the way into the socket to the peer.
    let mut rest = Bytes::new();
    loop {
        match parser.parse_bytes(&rest)? {
            Some((item, used)) => {
                rest.advance(used);
                match item {
                    Item::Ram(RamRecord::Zero {
                        block,
                        offset,
                        fill,
                        ..
                    }) => {
                        let idx = lookup(&block_index, &block, parser.offset())?;
                        digest_of(&mut digest, parser.offset())?.fill(
                            idx as usize,
                            offset,
                            fill,
                        )?;
                        pages.zero(idx, offset);
                        units += parser.page_size();
                        out.page(
                            idx,
                            Page {
                                offset,
                                body: PageBody::Zero { fill },
                            },
                        );
                        Counters::add(&c.pages_zero, 1);
                    }
                    Item::Ram(RamRecord::Page {
                        block,
                        offset,
                        data,
                        ..
                    }) => {
                        let idx = lookup(&block_index, &block, parser.offset())?;
                        digest_of(&mut digest, parser.offset())?.page(
                            idx as usize,
                            offset,
                            &data,
                        )?;
                        let body = pages.page(idx, offset, data);
                        units += parser.page_size();
                        Counters::add(
                            match &body {
                                PageBody::Ref(_) => &c.pages_ref,
                                PageBody::Delta { .. } => &c.pages_delta,
                                _ => &c.pages_raw,
                            },
                            1,
                        );
                        out.page(idx, Page { offset, body });
                    }
                    Item::Ram(RamRecord::MemSize { ref blocks, total }) => {
                        if blocks.len() > u16::MAX as usize {
                            return Err(MigrateError::Protocol(
                                "more than 65535 RAM blocks".into(),
                            ));
                        }
                        block_index = blocks
                            .iter()
                            .enumerate()
                            .map(|(i, b)| (b.name.clone(), i as u16))
                            .collect();
                        let ps = parser.page_size();
                        digest = Some(MemoryDigest::new(
                            ps,
                            blocks.iter().map(|b| (&*b.name, b.used_length)),
                        ));
                        let lengths: Vec<u64> = blocks.iter().map(|b| b.used_length).collect();
                        pages.set_blocks(ps, &lengths);
                        handle.update(|s| s.progress.ram_total = Some(total));
                        scratch.clear();
                        enc.encode(&item, NameMode::Auto, &mut scratch);
                        units += scratch.len() as u64;
                        out.verbatim(&scratch);
                        out.message(Message::RamBlocks {
                            page_size: ps as u32,
                            blocks: blocks
                                .iter()
                                .map(|b| RamBlock {
                                    name: b.name.to_string(),
                                    used_length: b.used_length,
                                })
                                .collect(),
                        });
                    }
                    Item::Tail(b) => {
                        units += b.len() as u64;
                        out.verbatim(&b);
                    }
                    other => {
                        scratch.clear();
                        enc.encode(&other, NameMode::Auto, &mut scratch);
                        units += scratch.len() as u64;
                        out.verbatim(&scratch);
                    }
                }
                if out.size() >= 1 << 20 {
                    flush_out(&mut out, &mut comp, &writer, &mut links, &handle).await?;
                }
            }
            None => {
                // Flow control: do not take more from QEMU while the window is full.
                if let (Some((f, _)), Some(w)) = (&flow, window.as_mut()) {
                    loop {
                        let applied = f.applied.load(Ordering::SeqCst);
                        if units.saturating_sub(applied) <= w.size(applied) {
                            break;
                        }
                        flush_out(&mut out, &mut comp, &writer, &mut links, &handle).await?;
                        let t = Instant::now();
                        if tokio::time::timeout(Duration::from_secs(5), f.notify.notified())
                            .await
                            .is_err()
                        {
                            tracing::warn!(
                                migration = %handle.id,
                                units,
                                applied,
                                window = w.size(applied),
                                wire_out = handle.counters.wire_out.load(Ordering::Relaxed),
                                "flow control: no progress from the destination for 5 s"
                            );
                        }
                        // waiting for the path is waiting for the link, to the picker
                        comp.picker.flushed(0, t.elapsed());
                    }
                }
                // keep the partial record (a few KiB at most) in front of the next read
                inbuf.extend_from_slice(&rest);
                if inbuf.capacity() - inbuf.len() < 256 << 10 {
                    inbuf.reserve(4 << 20);
                }
                // Read what QEMU has already written without waiting; only when the read
                // would block, send what we hold first, so no PING/SHUT exchange can wait
                // on bytes sitting in our buffer (and writes stay large while QEMU streams).
                let n = match qemu.try_read_buf(&mut inbuf) {
                    Ok(n) => n,
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                        flush_out(&mut out, &mut comp, &writer, &mut links, &handle).await?;
                        qemu.read_buf(&mut inbuf)
                            .await
                            .map_err(MigrateError::LocalIo)?
                    }
                    Err(e) => return Err(MigrateError::LocalIo(e)),
                };
                rest = inbuf.split().freeze();
                if n == 0 {
                    break;
                }
                Counters::add(&c.bytes_from_qemu, n as u64);
            }
        }
    }
    if !rest.is_empty() {
        return Err(StreamError::Truncated {
            offset: parser.offset(),
            state: "a record",
        }
        .into());
    }
    parser.finish()?;
    let d = digest.ok_or(StreamError::Truncated {
        offset: parser.offset(),
        state: "RAM setup",
    })?;
    let sum = d.finish();
    if let Some(flag) = &commit {
        // ===== SWITCHOVER POINT (v2): from here on the source never resumes unless the
        // destination says it holds nothing of the VM. =====
        flag.store(true, Ordering::SeqCst);
    }
    out.message(Message::SourceDone {
        digest: sum,
        pages: d.pages,
        commit: commit.is_some(),
    });
    flush_out(&mut out, &mut comp, &writer, &mut links, &handle).await?;
    let s = pages.stats;
    Ok(ForwardDone {
        digest: sum,
        encoding: EncodingReport {
            dedup: pages.dedup(),
            destination_held_pages: pages.summary_len() as u64,
            delta_bytes: s.delta_bytes,
            frames_raw_bytes: comp.raw,
            frames_wire_bytes: comp.wire,
            codec: comp.picker.codec().name(),
            codec_switches: comp.picker.switches,
            wants: Counters::get(&c.wants),
            data_streams: links.senders.len() as u16,
            data_path: if pages.dedup() { "dedup" } else { "lean" }.into(),
            data_path_switches: 0,
        },
    })
}

fn lookup(
    index: &HashMap<BlockName, u16>,
    block: &BlockName,
    at: u64,
) -> Result<u16, MigrateError> {
    index.get(block).copied().ok_or_else(|| {
        StreamError::Malformed {
            offset: at,
            what: format!("page of unknown RAM block {block:?}"),
        }
        .into()
    })
}

fn digest_of(d: &mut Option<MemoryDigest>, at: u64) -> Result<&mut MemoryDigest, MigrateError> {
    d.as_mut().ok_or_else(|| {
        StreamError::Malformed {
            offset: at,
            what: "page record before the RAM block list".into(),
        }
        .into()
    })
}

/// Flow control (v2): the destination reports how much of the stream it has written to
/// its QEMU; the source keeps what is in flight under a window of about 1.5 x the
/// end-to-end rate x (round trip + 20 ms). Without it, tern's queues (and the expansion
/// of references at the destination) would hide the real rate from QEMU, which would then
/// stop the VM with seconds of data still on its way.
pub struct Flow {
    applied: AtomicU64,
    notify: tokio::sync::Notify,
}

impl Flow {
    fn new() -> Self {
        Flow {
            applied: AtomicU64::new(0),
            notify: tokio::sync::Notify::new(),
        }
    }
}

/// The window of [`Flow`], from the measured rate of the destination's progress.
struct Window {
    rtt: Duration,
    since: Instant,
    applied_then: u64,
    rate: f64,
}

impl Window {
    const MIN: u64 = 2 << 20;
    const MAX: u64 = 256 << 20;

    fn new(rtt: Duration) -> Self {
        Window {
            rtt,
            since: Instant::now(),
            applied_then: 0,
            rate: 0.0,
        }
    }

    fn size(&mut self, applied: u64) -> u64 {
        let dt = self.since.elapsed().as_secs_f64();
        if dt >= 0.2 {
            let r = (applied - self.applied_then) as f64 / dt;
            self.rate = if self.rate == 0.0 {
                r
            } else {
                0.5 * self.rate + 0.5 * r
            };
            self.since = Instant::now();
            self.applied_then = applied;
        }
        if self.rate == 0.0 {
            return 8 << 20; // until the first measurement
        }
        let w = 1.5 * self.rate * (self.rtt.as_secs_f64() + 0.020);
        (w as u64).clamp(Self::MIN, Self::MAX)
    }
}

/// The extra data connections of a migration (parallel streams), fed round robin.
#[derive(Default)]
struct Links {
    /// The migration's rate limit (memory and disks draw from it), if capped.
    budget: Option<Arc<super::rate::RateLimit>>,
    senders: Vec<mpsc::Sender<Vec<Out>>>,
    next_seq: u64,
    next_link: usize,
}

/// Writes the frames one data connection is given, in order; closes it at the end.
async fn data_link(
    mut w: FrameWriter<crate::tls::PeerWrite>,
    mut rx: mpsc::Receiver<Vec<Out>>,
    handle: Arc<MigrationHandle>,
) -> std::io::Result<()> {
    let mut counted = 0;
    while let Some(batch) = rx.recv().await {
        for f in batch {
            match f {
                Out::Frame(m) => w.push(&m),
                Out::Encoded(b) => w.push_encoded(b),
            }
        }
        w.flush().await?;
        Counters::add(&handle.counters.wire_data, w.bytes_written - counted);
        counted = w.bytes_written;
    }
    w.shutdown().await
}

async fn flush_out(
    out: &mut Outbox,
    comp: &mut Compression,
    writer: &PeerWriter,
    links: &mut Links,
    handle: &MigrationHandle,
) -> Result<(), MigrateError> {
    if !links.senders.is_empty() {
        // Parallel streams: this batch goes to the next connection, each frame numbered.
        let frames = out.drain(comp);
        if frames.is_empty() {
            return Ok(());
        }
        let mut batch = Vec::with_capacity(frames.len() * 2);
        let mut bytes = 0u64;
        for f in frames {
            batch.push(Out::Frame(Message::Seq {
                seq: links.next_seq,
            }));
            links.next_seq += 1;
            bytes += 14
                + match &f {
                    Out::Frame(m) => tern_proto::frame_len(m),
                    Out::Encoded(b) => b.len(),
                } as u64;
            batch.push(f);
        }
        let i = links.next_link % links.senders.len();
        links.next_link += 1;
        if let Some(b) = &links.budget {
            b.take(bytes).await;
        }
        let t = Instant::now();
        links.senders[i].send(batch).await.map_err(|_| {
            MigrateError::PeerWrite(std::io::Error::new(
                std::io::ErrorKind::BrokenPipe,
                format!("data stream {} closed", i + 1),
            ))
        })?;
        comp.picker.flushed(bytes, t.elapsed());
        if let Some(r) = comp.picker.switchover_rate() {
            handle
                .counters
                .switchover_bps
                .store(r as u64, Ordering::Relaxed);
        }
        return Ok(());
    }
    let frames = out.drain(comp);
    let mut w = writer.lock().await;
    for f in frames {
        match f {
            Out::Frame(m) => w.push(&m),
            Out::Encoded(b) => w.push_encoded(b),
        }
    }
    let n = w.pending() as u64;
    if n > 0 {
        if let Some(b) = &links.budget {
            b.take(n).await;
        }
        let t = Instant::now();
        w.flush().await.map_err(MigrateError::PeerWrite)?;
        comp.picker.flushed(n, t.elapsed());
        if let Some(r) = comp.picker.switchover_rate() {
            handle
                .counters
                .switchover_bps
                .store(r as u64, Ordering::Relaxed);
        }
    }
    handle
        .counters
        .wire_out
        .store(w.bytes_written, Ordering::Relaxed);
    let codec = comp.picker.codec();
    drop(w);
    if handle.status().progress.codec != codec.name() {
        handle.update(|s| s.progress.codec = codec.name());
    }
    Ok(())
}

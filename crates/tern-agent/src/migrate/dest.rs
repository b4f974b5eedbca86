//! The destination side of a migration: answers a peer agent, starts the destination QEMU
//! (`-incoming defer`, paused), rebuilds an ordinary QEMU stream from tern frames and
//! writes it into that QEMU, tunnels the return path back, checks the memory digest and
//! resumes the VM only after the source's `Commit`.
//!
//! Before `Commit`, any failure (peer gone, Abort, QEMU died, digest mismatch) kills the
//! destination QEMU and removes its run directory: nothing is left behind. After
//! `Commit`, this host owns the VM.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use std::collections::{BTreeMap, HashSet, VecDeque};

use bytes::Bytes;
use futures_util::FutureExt;
use serde_json::json;
use tern_proto::{limits, ErrorCode, Message, PageBody};
use tern_qemu::launch::{LaunchOptions, QemuProcess};
use tern_qemu::qmp::QmpClient;
use tern_qemu::rp::{parse_rp, RpMessage};
use tern_qemu::spec::VmSpec;
use tern_qemu::stream::{BlockName, Encoder, Item, NameMode, RamRecord};
use tern_store::Hash;
use tokio::io::AsyncReadExt;
use tokio::net::unix;
use tokio::sync::{mpsc, Mutex};

use super::digest::MemoryDigest;
use super::disk::{free_bytes, incoming_disk_path, DestDiskError, DestDisks};
use super::pages::{PageDecoder, Resolved};
use super::source::error_chain;
use super::{unix_us, Counters, Fault, MigrationHandle};
use crate::conn::{ExpectError, FrameReader, FrameWriter, RecvError, Segments};
use crate::vm::Vm;
use crate::Agent;

type PeerWriter = Arc<Mutex<FrameWriter<crate::tls::PeerWrite>>>;

/// File in a run directory while its QEMU is an incoming migration not yet switched over.
pub const INCOMING_MARKER: &str = "incoming";
/// File in a run directory naming the migration that brought the VM here
/// ([`SwitchRecord`]).
pub const SWITCHED_IN: &str = "switched-in";

/// What a destination writes, durably, before an incoming VM runs: the VM is this host's
/// from then on. A restarted agent reads it to answer the source's Query and to finish a
/// switchover its predecessor began (a run directory with both this and
/// [`INCOMING_MARKER`] died between this record and `cont`).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct SwitchRecord {
    pub migration_id: String,
    /// The certificate of the source agent (only it may ask about the migration).
    pub peer: String,
    /// The VM ran on the source: it must run here.
    pub source_running: bool,
    /// When it resumed here (0: not yet, or it was paused).
    #[serde(default)]
    pub resumed_unix_us: u64,
}

impl SwitchRecord {
    /// Writes the record into `run_dir` and makes it durable (file and directory synced).
    pub fn write(&self, run_dir: &std::path::Path) -> std::io::Result<()> {
        use std::io::Write;
        let tmp = run_dir.join(format!("{SWITCHED_IN}.tmp"));
        let _ = std::fs::remove_file(&tmp);
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&tmp)?;
        f.write_all(&serde_json::to_vec(self).map_err(std::io::Error::other)?)?;
        f.sync_all()?;
        std::fs::rename(&tmp, run_dir.join(SWITCHED_IN))?;
        std::fs::File::open(run_dir)?.sync_all()
    }

    /// The record in `run_dir`, if there is a readable one.
    pub fn read(run_dir: &std::path::Path) -> Option<SwitchRecord> {
        let b = std::fs::read(run_dir.join(SWITCHED_IN)).ok()?;
        serde_json::from_slice(&b).ok()
    }
}

/// Sends `Applied{units}` (unchanged: no new stream) every
/// [`limits::KEEPALIVE_INTERVAL`] until dropped.
fn keepalive(writer: PeerWriter, units: u64) -> AbortOnDropTask {
    AbortOnDropTask(tokio::spawn(async move {
        let mut tick = tokio::time::interval(limits::KEEPALIVE_INTERVAL);
        tick.tick().await;
        loop {
            tick.tick().await;
            let sent = tokio::time::timeout(limits::KEEPALIVE_INTERVAL, async {
                writer.lock().await.send(&Message::Applied { units }).await
            })
            .await;
            if matches!(sent, Ok(Err(_))) {
                return;
            }
        }
    }))
}

struct AbortOnDropTask(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDropTask {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Why an incoming migration failed (the code is sent to the source in `Abort`).
#[derive(Debug, thiserror::Error)]
pub enum IncomingError {
    #[error("{message}")]
    Refuse { code: ErrorCode, message: String },
    #[error("the source agent aborted ({}): {message}", code.name())]
    Aborted { code: ErrorCode, message: String },
    #[error("connection to the source agent failed")]
    Peer(#[from] RecvError),
    #[error("sending to the source agent failed")]
    PeerWrite(#[source] std::io::Error),
    #[error("the source agent closed the connection during {0}")]
    PeerClosed(&'static str),
    #[error("the destination QEMU failed: {0}")]
    Qemu(String),
    #[error("timed out after {0:?} waiting for {1}")]
    Timeout(Duration, &'static str),
}

impl IncomingError {
    fn code(&self) -> ErrorCode {
        let timed_out = |e: &std::io::Error| e.kind() == std::io::ErrorKind::TimedOut;
        match self {
            IncomingError::Peer(RecvError::Io(e)) | IncomingError::PeerWrite(e) if timed_out(e) => {
                ErrorCode::Timeout
            }
            IncomingError::Peer(RecvError::Io(e)) | IncomingError::PeerWrite(e)
                if crate::tls::is_tls_failure(e) =>
            {
                ErrorCode::Security
            }
            IncomingError::Refuse { code, .. } | IncomingError::Aborted { code, .. } => *code,
            IncomingError::Peer(_) | IncomingError::PeerClosed(_) | IncomingError::PeerWrite(_) => {
                ErrorCode::Protocol
            }
            IncomingError::Qemu(_) => ErrorCode::QemuFailed,
            IncomingError::Timeout(..) => ErrorCode::Timeout,
        }
    }
}

fn refuse(code: ErrorCode, message: impl Into<String>) -> IncomingError {
    IncomingError::Refuse {
        code,
        message: message.into(),
    }
}

/// What is set up on this host for the incoming VM, torn down unless it switches over.
struct Incoming {
    name: Option<String>,
    process: Option<QemuProcess>,
    run_dir: Option<PathBuf>,
}

impl Incoming {
    async fn cleanup(&mut self, agent: &Agent) {
        if let Some(mut p) = self.process.take() {
            p.kill().await;
        }
        if let Some(d) = self.run_dir.take() {
            let _ = std::fs::remove_dir_all(d);
        }
        if let Some(n) = self.name.take() {
            agent.release_name(&n);
        }
    }
}

/// Serves one peer connection (one incoming migration) to its end.
pub async fn serve_peer(
    agent: Arc<Agent>,
    stream: crate::tls::PeerStream,
    addr: SocketAddr,
    peer: crate::tls::PeerIdentity,
) {
    tracing::debug!(peer = %addr, names = ?peer.names, labels = ?peer.labels, "peer authenticated");
    let (rd, wr) = stream.split();
    let mut reader = FrameReader::new(rd);
    let writer: PeerWriter = Arc::new(Mutex::new(
        FrameWriter::new(wr).with_deadline(agent.config.stall_timeout),
    ));
    let mut inc = Incoming {
        name: None,
        process: None,
        run_dir: None,
    };
    let mut handle: Option<Arc<MigrationHandle>> = None;
    // A bug that panics here cleans up like an error: QEMU, run directory, name.
    let result = std::panic::AssertUnwindSafe(receive(
        &agent,
        &mut reader,
        &writer,
        &mut inc,
        &mut handle,
        addr,
        &peer,
    ))
    .catch_unwind()
    .await
    .unwrap_or_else(|p| {
        Err(refuse(
            ErrorCode::Internal,
            format!(
                "tern failed internally (a bug: {})",
                super::panic_message(&*p)
            ),
        ))
    });
    if let Ok(Some((id, index))) = &result {
        // an extra data connection: hand it to its migration
        let refused = match agent.attach_stream(id, &peer.fingerprint, *index, reader) {
            Ok(()) => return,
            Err(crate::AttachRefused::Unknown) => (
                ErrorCode::Protocol,
                format!("no incoming migration {id} here"),
            ),
            Err(crate::AttachRefused::OtherPeer) => (
                ErrorCode::NotAuthorized,
                format!("migration {id} was prepared by another peer's certificate"),
            ),
        };
        tracing::warn!(peer = %addr, migration = %id, "data connection refused: {}", refused.1);
        let _ = writer
            .lock()
            .await
            .send(&Message::Abort {
                code: refused.0,
                message: refused.1,
            })
            .await;
        return;
    }
    if let Err(e) = result {
        let code = e.code();
        let message = error_chain(&e);
        tracing::warn!(peer = %addr, code = code.name(), %message, "incoming migration failed");
        // Nothing of the VM may run here once the source hears of the failure (it resumes
        // its copy then): clean up first, then tell it.
        inc.cleanup(&agent).await;
        if !matches!(
            e,
            IncomingError::Aborted { .. } | IncomingError::PeerClosed(_)
        ) {
            // bounded: the return-path relay may hold the writer, blocked on a dead link
            let abort = Message::Abort {
                code,
                message: message.clone(),
            };
            let _ = tokio::time::timeout(Duration::from_secs(2), async {
                writer.lock().await.send(&abort).await
            })
            .await;
        }
        if let Some(h) = handle {
            h.finish_err(code, message, "removed from this host".into());
        }
    }
}

async fn next_msg(
    reader: &mut FrameReader<crate::tls::PeerRead>,
    within: Duration,
    what: &'static str,
) -> Result<Message, IncomingError> {
    reader.expect(within, what).await.map_err(|e| match e {
        ExpectError::Timeout(d, w) => IncomingError::Timeout(d, w),
        ExpectError::Closed(w) => IncomingError::PeerClosed(w),
        ExpectError::Aborted { code, message } => IncomingError::Aborted { code, message },
        ExpectError::Recv(e) => IncomingError::Peer(e),
    })
}

async fn receive(
    agent: &Arc<Agent>,
    reader: &mut FrameReader<crate::tls::PeerRead>,
    writer: &PeerWriter,
    inc: &mut Incoming,
    handle_slot: &mut Option<Arc<MigrationHandle>>,
    addr: SocketAddr,
    peer: &crate::tls::PeerIdentity,
) -> Result<Option<(String, u16)>, IncomingError> {
    // --- hello
    let (peer_min, peer_max, peer_name) =
        match next_msg(reader, Duration::from_secs(30), "Hello").await? {
            Message::Hello {
                min_version,
                max_version,
                agent,
            } => (min_version, max_version, agent),
            m => {
                return Err(refuse(
                    ErrorCode::Protocol,
                    format!("expected Hello, got {}", m.name()),
                ))
            }
        };
    let Some(version) = tern_proto::negotiate(peer_min, peer_max.min(agent.config.max_protocol))
    else {
        return Err(refuse(
            ErrorCode::VersionMismatch,
            format!(
                "no common protocol version: peer speaks {peer_min}..={peer_max}, this agent {}..={}",
                tern_proto::MIN_PROTOCOL_VERSION,
                tern_proto::PROTOCOL_VERSION
            ),
        ));
    };
    send(
        writer,
        &Message::HelloAck {
            version,
            agent: agent.config.name.clone(),
        },
    )
    .await?;

    // --- prepare (v3: the VM's disks first, when it has some; v4: its vTPM key)
    let mut first = next_msg(reader, Duration::from_secs(30), "Prepare").await?;
    let mut disk_offer = None;
    let mut tpm_key = None;
    loop {
        match first {
            Message::DiskOffer { disks } if disk_offer.is_none() => {
                if version < 3 {
                    return Err(refuse(ErrorCode::Protocol, "DiskOffer needs protocol v3"));
                }
                disk_offer = Some(disks);
            }
            Message::TpmKey { key } if tpm_key.is_none() => {
                if version < 4 {
                    return Err(refuse(ErrorCode::Protocol, "TpmKey needs protocol v4"));
                }
                tpm_key = Some(key);
            }
            _ => break,
        }
        first = next_msg(reader, Duration::from_secs(30), "Prepare").await?;
    }
    let (id, spec_toml, source_running, source_qemu) = match first {
        Message::Prepare {
            migration_id,
            spec_toml,
            source_running,
            qemu_version,
        } => (migration_id, spec_toml, source_running, qemu_version),
        Message::Attach {
            migration_id,
            index,
        } if version >= 2 => return Ok(Some((migration_id, index))),
        Message::Query { migration_id } => {
            let (state, resumed_unix_us) =
                agent
                    .incoming_state(&migration_id, &peer.fingerprint)
                    .map_err(|e| refuse(ErrorCode::NotAuthorized, e.to_string()))?;
            tracing::info!(migration = %migration_id, ?state, "answered a query");
            send(
                writer,
                &Message::QueryAnswer {
                    state,
                    resumed_unix_us,
                },
            )
            .await?;
            return Ok(None);
        }
        m => {
            return Err(refuse(
                ErrorCode::Protocol,
                format!("expected Prepare, got {}", m.name()),
            ))
        }
    };
    if !id.chars().all(|c| c.is_ascii_alphanumeric() || c == '-') || id.is_empty() || id.len() > 64
    {
        return Err(refuse(
            ErrorCode::Protocol,
            format!("invalid migration id {id:?}"),
        ));
    }
    let mut spec = VmSpec::from_toml(&spec_toml)
        .map_err(|e| refuse(ErrorCode::SpecRejected, error_chain(&e)))?;
    vet_incoming_spec(agent, &mut spec)?;
    if spec.tpm != tpm_key.is_some() {
        return Err(refuse(
            if spec.tpm {
                ErrorCode::SpecRejected
            } else {
                ErrorCode::Protocol
            },
            if spec.tpm {
                "a VM with a vTPM needs its migration key (TpmKey) before Prepare"
            } else {
                "TpmKey for a VM without a vTPM"
            },
        ));
    }
    let offer = disk_offer.unwrap_or_default();
    if offer.len() != spec.disks.len() {
        return Err(refuse(
            ErrorCode::Protocol,
            format!(
                "the spec has {} disks, the source offered {}",
                spec.disks.len(),
                offer.len()
            ),
        ));
    }
    {
        // the disks are made here below; the rest must exist already
        let mut files = spec.clone();
        files.disks.clear();
        files
            .check_files()
            .map_err(|e| refuse(ErrorCode::SpecRejected, error_chain(&e)))?;
    }
    // the source checked our labels; check again with our own policy
    agent
        .policy
        .check(
            &crate::policy::VmFacts::of(&spec),
            &agent.config.name,
            agent.security.own_labels(),
        )
        .map_err(|e| refuse(ErrorCode::NotAuthorized, e.to_string()))?;
    let handle = Arc::new(MigrationHandle::incoming(
        id.clone(),
        spec.name.clone(),
        format!("{peer_name} ({addr})"),
        peer.fingerprint.clone(),
    ));
    match agent.add_incoming(handle.clone()) {
        Ok(()) => {}
        Err(crate::AddIncomingError::KnownId) => {
            return Err(refuse(
                ErrorCode::Protocol,
                format!(
                    "migration id {id} is already known on {}",
                    agent.config.name
                ),
            ))
        }
        Err(crate::AddIncomingError::Busy(n)) => {
            return Err(refuse(
                ErrorCode::ResourceExhausted,
                format!(
                    "{} already receives {n} migrations at once; try again when one has finished",
                    agent.config.name
                ),
            ))
        }
    }
    *handle_slot = Some(handle.clone());
    if !agent.reserve_name(&spec.name) {
        return Err(refuse(
            ErrorCode::VmExists,
            format!(
                "a VM named {:?} already exists on {}",
                spec.name, agent.config.name
            ),
        ));
    }
    inc.name = Some(spec.name.clone());
    handle.set_phase(super::Phase::Prepare);

    let run_dir = agent.new_run_dir(&spec.name);
    inc.run_dir = Some(run_dir.clone());
    let mut opts = LaunchOptions::new(run_dir.clone());
    opts.incoming_defer = true;
    opts.start_paused = true;
    opts.kill_on_drop = false; // cleanup is explicit; after switchover the VM outlives us
                               // Until the switchover this QEMU is not a VM of ours: a restarted agent removes it.
    std::fs::create_dir_all(&run_dir)
        .and_then(|_| std::fs::write(run_dir.join(INCOMING_MARKER), id.as_bytes()))
        .map_err(|e| {
            refuse(
                ErrorCode::ResourceExhausted,
                format!("cannot create {}: {e}", run_dir.display()),
            )
        })?;
    if let Some(key) = &tpm_key {
        crate::write_tpm_migration_key(&run_dir, key).map_err(|e| {
            refuse(
                ErrorCode::ResourceExhausted,
                format!(
                    "cannot keep the vTPM key in {}: {}",
                    run_dir.display(),
                    error_chain(&e)
                ),
            )
        })?;
    }
    if !spec.disks.is_empty() {
        prepare_disks(agent, &mut spec, &offer, &run_dir).await?;
    }
    let process = agent
        .launch(&spec, &opts)
        .await
        .map_err(|e| refuse(ErrorCode::QemuLaunchFailed, error_chain(&e)))?;
    let qmp = process.qmp.clone();
    let qemu_version = qmp.version().to_string();
    handle.update(|s| s.dest_qemu_pid = process.pid());
    inc.process = Some(process);
    // QEMU migrates only to the same or a newer version (an older one rejects what it does
    // not know, e.g. 7.2 and SWITCHOVER_START): refuse before anything moves.
    if let (Some(src), Some(dst)) = (major_minor(&source_qemu), major_minor(&qemu_version)) {
        if dst < src {
            return Err(refuse(
                ErrorCode::SpecRejected,
                format!(
                    "destination QEMU {qemu_version} is older than the source's {source_qemu}: QEMU migrates only to the same or a newer version; upgrade QEMU on {}",
                    agent.config.name
                ),
            ));
        }
    }
    let qemu_err = |e: tern_qemu::qmp::QmpError| IncomingError::Qemu(error_chain(&e));
    qmp.set_migrate_capabilities(&[("return-path", true), ("events", true)])
        .await
        .map_err(qemu_err)?;
    let mut events = qmp.subscribe();
    // the stream comes in over a socket QEMU is handed (it may not open paths itself)
    let qemu_sock = qmp.stream_socket("tern-incoming").await.map_err(qemu_err)?;
    qmp.execute(
        "migrate-incoming",
        Some(json!({ "uri": "fd:tern-incoming" })),
    )
    .await
    .map_err(qemu_err)?;
    // the disks: written through the incoming QEMU's own NBD exports
    let mut disks = if spec.disks.is_empty() {
        None
    } else {
        Some(
            DestDisks::start(
                &qmp,
                &run_dir,
                offer.iter().map(|d| d.virtual_size).collect(),
                offer
                    .iter()
                    .fold(0u64, |a, d| a.saturating_add(d.allocated)),
                agent.chunks.clone(),
                agent.hasher.clone(),
                writer.clone(),
            )
            .await
            .map_err(|e| IncomingError::Qemu(format!("cannot export the incoming disks: {e}")))?,
        )
    };
    let (qemu_rd, mut qemu_wr) = qemu_sock.into_split();
    // What this host holds, so the source can send references instead of pages (v2).
    let mut pages = PageDecoder::new(agent.hasher.clone(), agent.store.clone());
    if version >= 2 {
        let (key_id, prefixes) = pages.summary();
        tracing::info!(migration = %id, pages = prefixes.len(), "sending the page summary");
        let mut chunks = prefixes.chunks(128 << 10).peekable();
        if chunks.peek().is_none() {
            send(
                writer,
                &Message::Summary {
                    key_id,
                    prefixes: Vec::new(),
                },
            )
            .await?;
        }
        for chunk in chunks {
            send(
                writer,
                &Message::Summary {
                    key_id,
                    prefixes: chunk.to_vec(),
                },
            )
            .await?;
        }
    }
    // Extra data connections (parallel streams) arrive through the agent.
    let (attach_tx, mut attach_rx) = mpsc::unbounded_channel();
    let _attach = agent.accept_streams(&id, &peer.fingerprint, attach_tx);
    send(writer, &Message::Prepared { qemu_version }).await?;

    // --- transfer: frames -> QEMU stream; QEMU's return path -> frames
    handle.set_phase(super::Phase::Transfer);
    let rp_task = tokio::spawn(return_path(qemu_rd, writer.clone()));
    let mut rp_task = AbortOnDrop(Some(rp_task));
    let mut rb = Rebuild {
        enc: Encoder::new(tern_qemu::stream::DEFAULT_PAGE_SIZE),
        out: Segments::default(),
        names: Vec::new(),
        digest: None,
        corrupt_pending: agent.config.fault == Some(Fault::CorruptPage),
        pending: VecDeque::new(),
        pending_bytes: 0,
        missing: HashSet::new(),
        lengths: Vec::new(),
        out_units: 0,
        applied: 0,
        reported: 0,
    };
    let c = &handle.counters;
    let mut rp_result: Option<Result<bool, String>> = None;
    let stall = agent.config.stall_timeout;
    let mut source_done: Option<[u8; 32]> = None;
    let mut early_commit = false;
    // Data frames from parallel streams, applied in sequence order.
    let (data_tx, mut data_rx) = mpsc::channel::<DataFrame>(64);
    let mut reorder = Reorder::default();
    let mut attached: HashSet<u16> = HashSet::new();
    let mut ready: VecDeque<Message> = VecDeque::new();
    let mut last_input = tokio::time::Instant::now();
    let source_digest = loop {
        if let Some(d) = source_done {
            // (disks: their last rounds travel on the control connection, SourceDone may
            // come first on a data connection)
            if rb.pending.is_empty() && disks.as_ref().is_none_or(DestDisks::all_last) {
                rb.flush(&mut qemu_wr, writer, version).await?;
                break d;
            }
        }
        let msg = if let Some(m) = ready.pop_front() {
            Ok(Some(m))
        } else {
            // Write to QEMU only when the next frame is not here yet (and nothing more is
            // waiting in the sockets), or when a lot is queued: large writes, no stalls.
            if !reader.has_frame() && data_rx.is_empty() && !rb.out.is_empty() {
                reader.try_fill()?;
                if !reader.has_frame() {
                    rb.flush(&mut qemu_wr, writer, version).await?;
                }
            }
            tokio::select! {
                m = reader.next() => m,
                d = data_rx.recv() => {
                    last_input = tokio::time::Instant::now();
                    match d.expect("the loop holds a sender") {
                        Ok((seq, m)) => {
                            reorder.insert(seq, m).map_err(|why| refuse(ErrorCode::Protocol, why))?;
                            while let Some(m) = reorder.pop() {
                                ready.push_back(m);
                            }
                        }
                        Err(e) => return Err(e),
                    }
                    continue;
                }
                a = attach_rx.recv() => {
                    if let Some((index, r)) = a {
                        if index == 0 || index > limits::MAX_DATA_STREAMS || !attached.insert(index) {
                            return Err(refuse(
                                ErrorCode::Protocol,
                                format!("data connection #{index}: numbered 1..={} and each once", limits::MAX_DATA_STREAMS),
                            ));
                        }
                        tracing::info!(migration = %id, index, "data connection attached");
                        tokio::spawn(data_stream(r, data_tx.clone(), handle.clone()));
                    }
                    continue;
                }
                _ = tokio::time::sleep_until(last_input + stall) => {
                    tracing::warn!(
                        migration = %id,
                        wire_in = reader.bytes_read,
                        applied = rb.applied,
                        reported = rb.reported,
                        queued = rb.out.len(),
                        pending = rb.pending.len(),
                        missing = rb.missing.len(),
                        ready = ready.len(),
                        reorder = reorder.held.len(),
                        "no data from the source"
                    );
                    return Err(IncomingError::Timeout(stall, "data from the source"));
                }
                e = async { disks.as_mut().expect("guarded").failed.recv().await }, if disks.is_some() => {
                    return Err(disk_failure(e));
                }
                r = rp_task.join(), if rp_result.is_none() => {
                    let r = r.unwrap_or_else(|e| Err(format!("return-path task failed: {e}")));
                    if let Err(why) = &r {
                        return Err(IncomingError::Qemu(why.clone()));
                    }
                    rp_result = Some(r);
                    continue;
                }
            }
        };
        last_input = tokio::time::Instant::now();
        c.wire_in.store(reader.bytes_read, Ordering::Relaxed);
        match msg? {
            Some(Message::QemuBytes(b)) => rb.push(Pending::Verbatim(b), c)?,
            Some(Message::RamBlocks { page_size, blocks }) => {
                if rb.digest.is_some() {
                    return Err(refuse(
                        ErrorCode::Protocol,
                        "RamBlocks twice in one migration",
                    ));
                }
                check_ram_blocks(page_size, &blocks, spec.memory_mib)
                    .map_err(|why| refuse(ErrorCode::Protocol, format!("RamBlocks: {why}")))?;
                rb.lengths = blocks.iter().map(|b| b.used_length).collect();
                rb.names = blocks
                    .iter()
                    .map(|b| BlockName::from(b.name.as_str()))
                    .collect();
                rb.enc = Encoder::new(u64::from(page_size));
                rb.digest = Some(MemoryDigest::new(
                    u64::from(page_size),
                    blocks.iter().map(|b| (b.name.as_str(), b.used_length)),
                ));
                let lengths: Vec<u64> = blocks.iter().map(|b| b.used_length).collect();
                pages.set_blocks(u64::from(page_size), &lengths);
            }
            Some(Message::Pages {
                block,
                pages: records,
            }) => {
                if rb.digest.is_none() || rb.names.get(block as usize).is_none() {
                    return Err(refuse(
                        ErrorCode::Protocol,
                        format!("Pages for unknown block #{block}"),
                    ));
                }
                if agent.config.fault == Some(Fault::PanicInTransfer) && super::fault_once() {
                    let _store = agent.store.lock();
                    panic!("fault injection: panic in the transfer, holding the page store");
                }
                let mut want = Vec::new();
                for p in records {
                    rb.check_record(block, &p)?;
                    let counter = match &p.body {
                        PageBody::Zero { .. } => &c.pages_zero,
                        PageBody::Raw(_) => &c.pages_raw,
                        PageBody::Ref(_) => &c.pages_ref,
                        PageBody::Delta { .. } => &c.pages_delta,
                    };
                    Counters::add(counter, 1);
                    let offset = p.offset;
                    let item = match pages
                        .resolve(block, offset, p.body)
                        .map_err(|e| refuse(ErrorCode::Protocol, e.to_string()))?
                    {
                        Resolved::Zero(fill) => Pending::Zero {
                            block,
                            offset,
                            fill,
                        },
                        Resolved::Page(data) => Pending::Page {
                            block,
                            offset,
                            data: Some(data),
                            hash: [0; 16],
                        },
                        Resolved::Missing(hash) => {
                            if rb.missing.insert(hash) {
                                want.push(hash);
                            }
                            Pending::Page {
                                block,
                                offset,
                                data: None,
                                hash,
                            }
                        }
                    };
                    rb.push(item, c)?;
                }
                if !want.is_empty() {
                    Counters::add(&c.wants, want.len() as u64);
                    tracing::info!(
                        n = want.len(),
                        "asking the source for content this host lacks"
                    );
                    for hashes in want.chunks(limits::MAX_WANT_HASHES) {
                        send(
                            writer,
                            &Message::Want {
                                hashes: hashes.to_vec(),
                            },
                        )
                        .await?;
                    }
                }
                if rb.out.len() >= 1 << 20 {
                    rb.flush(&mut qemu_wr, writer, version).await?;
                }
            }
            Some(Message::Content { pages: contents }) => {
                if contents.len() > limits::MAX_WANT_HASHES {
                    return Err(refuse(
                        ErrorCode::Protocol,
                        format!(
                            "Content with {} pages (at most {})",
                            contents.len(),
                            limits::MAX_WANT_HASHES
                        ),
                    ));
                }
                for (h, data) in contents {
                    if !rb.missing.contains(&h) {
                        return Err(refuse(
                            ErrorCode::Protocol,
                            format!(
                                "Content for page {} that this host did not ask for",
                                hex::encode(h)
                            ),
                        ));
                    }
                    if data.len() as u64 != limits::PAGE_SIZE {
                        return Err(refuse(
                            ErrorCode::Protocol,
                            "Content page of the wrong size",
                        ));
                    }
                    pages
                        .content(h, &data)
                        .map_err(|e| refuse(ErrorCode::Protocol, e.to_string()))?;
                    rb.fill(h, &data);
                }
                rb.drain(c)?;
            }
            Some(Message::SourceDone {
                digest: src,
                commit,
                ..
            }) => {
                source_done = Some(src);
                early_commit = commit;
            }
            Some(Message::Abort { code, message }) => {
                return Err(IncomingError::Aborted { code, message })
            }
            Some(
                m @ (Message::DiskManifest { .. }
                | Message::DiskData { .. }
                | Message::DiskRoundEnd { .. }),
            ) => match disks.as_mut() {
                Some(d) => {
                    if d.handle(m).await.is_err() {
                        return Err(disk_failure(d.failed.recv().await));
                    }
                }
                None => {
                    return Err(refuse(
                        ErrorCode::Protocol,
                        format!("{} for a VM without disks", m.name()),
                    ))
                }
            },
            Some(m) => {
                return Err(refuse(
                    ErrorCode::Protocol,
                    format!("unexpected {} during transfer", m.name()),
                ))
            }
            None => return Err(IncomingError::PeerClosed("the transfer")),
        }
    };
    let digest = rb.digest.take();
    // From here the destination works without reading the source's frames for a while
    // (QEMU loads the rest, disks are flushed, the VM resumed): it says it is alive, so
    // the source's silence limit means a dead peer, not a busy one.
    let _keepalive = (version >= 2).then(|| keepalive(writer.clone(), rb.applied));

    // --- verify: digests, and QEMU loaded everything
    handle.set_phase(super::Phase::Verify);
    let ours = digest.as_ref().map(|d| d.finish()).unwrap_or([0; 32]);
    drop(pages); // this migration's pages stay in the store, unpinned
    if ours != source_digest {
        return Err(refuse(
            ErrorCode::DigestMismatch,
            format!(
                "memory digest mismatch: source {}, destination {}",
                hex::encode(source_digest),
                hex::encode(ours)
            ),
        ));
    }
    wait_incoming_done(&qmp, &mut events, Duration::from_secs(30)).await?;
    if agent.config.fault == Some(Fault::SlowFinish) {
        tracing::warn!("fault injection: finishing 35 s late");
        tokio::time::sleep(Duration::from_secs(35)).await;
    }
    // every disk's last round was read (the loop above waits for it) and queued before
    // Finish, so the worker has written and flushed it: NBD goes, then the guest may run
    if let Some(d) = disks.take() {
        let written = d
            .finish(&qmp)
            .await
            .map_err(|e| IncomingError::Qemu(format!("cannot hand the disks to the guest: {e}")))?;
        tracing::info!(migration = %id, written, "disks rebuilt");
        if agent.config.fault == Some(Fault::DiskCopyAtSwitchover) {
            for d in &spec.disks {
                let mut to = d.path.clone().into_os_string();
                to.push(".at-switchover");
                let ok = tokio::process::Command::new("cp")
                    .arg("--sparse=always")
                    .arg(&d.path)
                    .arg(&to)
                    .status()
                    .await
                    .is_ok_and(|s| s.success());
                tracing::warn!(disk = %d.path.display(), ok, "fault injection: copied the disk at the switchover");
            }
        }
    }
    // --- the source's decision: given with SourceDone (v2), or asked for (v1)
    if !early_commit {
        send(writer, &Message::ReadyToResume { digest: ours }).await?;
        loop {
            match next_msg(reader, Duration::from_secs(60), "Commit").await? {
                Message::Commit => break,
                Message::ReturnPath(_) => continue,
                m => {
                    return Err(refuse(
                        ErrorCode::Protocol,
                        format!("expected Commit, got {}", m.name()),
                    ))
                }
            }
        }
    }
    // ===== SWITCHOVER POINT: this host owns the VM from here on. =====
    handle.set_phase(super::Phase::Switchover);
    // Durable before the guest runs: a restarted agent must find that this VM is ours
    // (and answer the source's Query with "running"), never kill it as an incoming VM
    // that did not switch over. No record, no run: the source resumes its copy.
    let record = SwitchRecord {
        migration_id: id.clone(),
        peer: peer.fingerprint.clone(),
        source_running,
        resumed_unix_us: 0,
    };
    if agent.config.fault == Some(Fault::FailSwitchRecord) {
        tracing::warn!("fault injection: the switchover record cannot be written");
        return Err(refuse(
            ErrorCode::ResourceExhausted,
            format!(
                "cannot record the switchover in {}: fault injection; the VM was not started here",
                run_dir.display()
            ),
        ));
    }
    record.write(&run_dir).map_err(|e| {
        refuse(
            ErrorCode::ResourceExhausted,
            format!(
                "cannot record the switchover in {}: {e}; the VM was not started here",
                run_dir.display()
            ),
        )
    })?;
    if agent.config.fault == Some(Fault::ExitAtSwitchover) {
        tracing::warn!("fault injection: exiting between the switchover record and cont");
        std::process::exit(71);
    }
    let resumed_at = if source_running {
        let mut ev = qmp.subscribe();
        qmp.execute("cont", None).await.map_err(qemu_err)?;
        match qmp
            .wait_event(&mut ev, "RESUME", Duration::from_secs(10))
            .await
        {
            Ok(e) => e.timestamp,
            Err(_) => SystemTime::now(),
        }
    } else {
        SystemTime::now()
    };
    let process = inc
        .process
        .take()
        .expect("process is set during a migration");
    inc.run_dir = None;
    // the run directory is a VM's now; the record says when it resumed (best effort)
    let _ = SwitchRecord {
        resumed_unix_us: if source_running {
            unix_us(resumed_at)
        } else {
            0
        },
        ..record
    }
    .write(&process.run_dir);
    let _ = std::fs::remove_file(process.run_dir.join(INCOMING_MARKER));
    let vm = Arc::new(Vm::supervise(spec, process));
    vm.migrating.store(false, Ordering::SeqCst);
    agent.adopt(vm);
    inc.name = None;
    let resumed_unix_us = if source_running {
        unix_us(resumed_at)
    } else {
        0
    };
    rp_task.abort();
    if agent.config.fault == Some(Fault::DropAfterCommit) {
        tracing::warn!("fault injection: dropping the connection instead of sending Resumed");
        let _ = writer.lock().await.shutdown().await;
    } else {
        let _ = send(
            writer,
            &Message::Resumed {
                resumed_unix_us: unix_us(resumed_at),
            },
        )
        .await;
    }
    let total = handle.started.elapsed();
    handle.finish_ok(super::MigrationReport {
        migration_id: id,
        vm: handle.vm.clone(),
        source: handle.peer.clone(),
        destination: agent.config.name.clone(),
        outcome: "succeeded".into(),
        total_time_ms: total.as_millis() as u64,
        bytes_from_qemu: 0,
        bytes_on_wire: Counters::get(&c.wire_in)
            + Counters::get(&c.wire_data)
            + writer.lock().await.bytes_written,
        pages: super::page_counts(c),
        digest_ok: true,
        digest: hex::encode(ours),
        source_was_running: source_running,
        protocol_version: version,
        resumed_unix_us,
        ..Default::default()
    });
    Ok(None)
}

/// The disk worker's failure as this migration's error.
fn disk_failure(e: Option<DestDiskError>) -> IncomingError {
    match e {
        Some(e) => refuse(e.code(), error_chain(&e)),
        None => refuse(ErrorCode::Internal, "the disk worker stopped"),
    }
}

/// Room, paths and empty images for an incoming VM's disks: each goes to
/// `RUN/disks/diskN.FMT` (a flat image of the source's virtual size; the rebuild fills
/// it), and `spec` is rewritten to use them. Refuses before QEMU starts when the
/// filesystem lacks room for what the source has allocated.
async fn prepare_disks(
    agent: &Agent,
    spec: &mut VmSpec,
    offer: &[tern_proto::DiskInfo],
    run_dir: &std::path::Path,
) -> Result<(), IncomingError> {
    let dir = run_dir.join("disks");
    std::fs::create_dir_all(&dir).map_err(|e| {
        refuse(
            ErrorCode::ResourceExhausted,
            format!("cannot create {}: {e}", dir.display()),
        )
    })?;
    for (i, d) in offer.iter().enumerate() {
        if d.virtual_size == 0
            || d.virtual_size > limits::MAX_DISK_BYTES
            || !d.virtual_size.is_multiple_of(512)
            || d.allocated > d.virtual_size
        {
            return Err(refuse(
                ErrorCode::Protocol,
                format!(
                    "DiskOffer: disk {i} of {} bytes with {} allocated (sizes are multiples of 512 up to {} TiB, allocated at most the size)",
                    d.virtual_size,
                    d.allocated,
                    limits::MAX_DISK_BYTES >> 40
                ),
            ));
        }
    }
    let needed = offer
        .iter()
        .fold(0u64, |a, d| a.saturating_add(d.allocated));
    // qcow2 metadata and the filesystem's own needs; the copy keeps this much free too,
    // whatever `allocated` said (the disk worker watches)
    let margin = super::disk::FREE_SPACE_RESERVE;
    let free = free_bytes(&dir).map_err(|e| {
        refuse(
            ErrorCode::ResourceExhausted,
            format!("cannot tell the free space in {}: {e}", dir.display()),
        )
    })?;
    if free < needed.saturating_add(margin) {
        return Err(refuse(
            ErrorCode::ResourceExhausted,
            format!(
                "not enough disk space on {} for VM {}'s disks: they hold {} MiB on the source, {} has {} MiB free; free space there or migrate elsewhere",
                agent.config.name,
                spec.name,
                needed.div_ceil(1 << 20),
                dir.display(),
                free >> 20
            ),
        ));
    }
    for (i, (d, info)) in spec.disks.iter_mut().zip(offer).enumerate() {
        let path = incoming_disk_path(run_dir, i, d.format.as_str());
        tern_qemu::disk::create_image(&path, d.format, info.virtual_size)
            .await
            .map_err(|e| {
                refuse(
                    ErrorCode::ResourceExhausted,
                    format!(
                        "cannot create disk {i} at {}: {}",
                        path.display(),
                        error_chain(&e)
                    ),
                )
            })?;
        d.path = path;
    }
    Ok(())
}

/// What a destination takes from a peer's VM spec, whatever the peer wrote: capabilities
/// are dropped (a peer does not configure this host's QEMU), the machine type must be one
/// this host's QEMU knows, the kernel and initrd must be files under this agent's boot
/// directories (refused with the same words whether or not a path exists elsewhere), and
/// the VM must fit this host's memory.
fn vet_incoming_spec(agent: &Agent, spec: &mut VmSpec) -> Result<(), IncomingError> {
    let host = &agent.config.name;
    spec.migration_capabilities.clear();
    if !agent.machine_types.contains(&spec.machine) {
        return Err(refuse(
            ErrorCode::SpecRejected,
            format!(
                "machine type {:?} is not one this host's QEMU ({host}) knows",
                spec.machine
            ),
        ));
    }
    spec.kernel = boot_file("kernel", &spec.kernel, &agent.boot_dirs, host)?;
    if let Some(i) = &spec.initrd {
        spec.initrd = Some(boot_file("initrd", i, &agent.boot_dirs, host)?);
    }
    if agent.host_memory_mib > 0 && u64::from(spec.memory_mib) > agent.host_memory_mib {
        return Err(refuse(
            ErrorCode::ResourceExhausted,
            format!(
                "VM {} has {} MiB of memory, more than {host} has ({} MiB)",
                spec.name, spec.memory_mib, agent.host_memory_mib
            ),
        ));
    }
    Ok(())
}

/// `path`, if it names a regular file under one of `dirs` (canonical), as its canonical
/// path. The refusal says only that the path is not an allowed boot file here: nothing
/// about what exists outside the boot directories.
fn boot_file(
    what: &str,
    path: &std::path::Path,
    dirs: &[PathBuf],
    host: &str,
) -> Result<PathBuf, IncomingError> {
    use std::path::Component;
    let refused = || {
        refuse(
            ErrorCode::SpecRejected,
            format!(
                "{what} {} is not a file in {host}'s boot directories ({}); put the VM's boot files there (tern agent --boot-dir)",
                path.display(),
                dirs.iter().map(|d| d.display().to_string()).collect::<Vec<_>>().join(", ")
            ),
        )
    };
    let plain = path.is_absolute()
        && path
            .components()
            .all(|c| matches!(c, Component::RootDir | Component::Normal(_)));
    if !plain || !dirs.iter().any(|d| path.starts_with(d)) {
        return Err(refused());
    }
    // inside a boot directory: what exists there is no secret; symlinks must not lead out
    let real = std::fs::canonicalize(path).map_err(|_| refused())?;
    let is_file = std::fs::metadata(&real).is_ok_and(|m| m.is_file());
    if !is_file || !dirs.iter().any(|d| real.starts_with(d)) {
        return Err(refused());
    }
    Ok(real)
}

/// "10.0.2" -> (10, 0).
fn major_minor(v: &str) -> Option<(u32, u32)> {
    let mut it = v.split('.');
    Some((
        it.next()?.trim().parse().ok()?,
        it.next()?.trim().parse().ok()?,
    ))
}

/// One data frame from a parallel stream: its sequence number and the message.
type DataFrame = Result<(u64, Message), IncomingError>;

/// Reads one extra data connection: `Seq{n}` then the frame numbered n, again and again,
/// handing them to the migration's loop (which applies them in order).
async fn data_stream(
    mut r: FrameReader<crate::tls::PeerRead>,
    tx: mpsc::Sender<DataFrame>,
    handle: Arc<MigrationHandle>,
) {
    let mut counted = r.bytes_read;
    loop {
        let item = match r.next().await {
            Ok(Some(Message::Seq { seq })) => match r.next().await {
                Ok(Some(m)) => Ok((seq, m)),
                Ok(None) => Err(IncomingError::PeerClosed("a data stream")),
                Err(e) => Err(e.into()),
            },
            Ok(Some(m)) => Err(refuse(
                ErrorCode::Protocol,
                format!("expected Seq on a data connection, got {}", m.name()),
            )),
            Ok(None) => return, // the source is done with this stream
            Err(e) => Err(e.into()),
        };
        Counters::add(&handle.counters.wire_data, r.bytes_read - counted);
        counted = r.bytes_read;
        let last = item.is_err();
        if tx.send(item).await.is_err() || last {
            return;
        }
    }
}

/// Something for the destination QEMU, in stream order.
enum Pending {
    Verbatim(Bytes),
    Zero {
        block: u16,
        offset: u64,
        fill: u8,
    },
    /// `data` is `None` while the content (`hash`) is asked for.
    Page {
        block: u16,
        offset: u64,
        data: Option<Bytes>,
        hash: Hash,
    },
}

impl Pending {
    /// What holding this back costs in memory.
    fn bytes(&self) -> u64 {
        match self {
            Pending::Verbatim(b) => b.len() as u64,
            Pending::Zero { .. } => 16,
            Pending::Page { .. } => limits::PAGE_SIZE,
        }
    }
}

/// Data frames of parallel streams, released in sequence order; what waits for an
/// earlier frame is bounded ([`limits::MAX_REORDER_FRAMES`], [`limits::MAX_REORDER_BYTES`]).
#[derive(Default)]
struct Reorder {
    next: u64,
    held: BTreeMap<u64, Message>,
    bytes: u64,
}

impl Reorder {
    fn insert(&mut self, seq: u64, m: Message) -> Result<(), String> {
        if seq < self.next || self.held.contains_key(&seq) {
            return Err(format!("data frame #{seq} twice"));
        }
        if seq - self.next > limits::MAX_REORDER_FRAMES as u64 {
            return Err(format!(
                "data frame #{seq} is more than {} frames ahead of #{}",
                limits::MAX_REORDER_FRAMES,
                self.next
            ));
        }
        self.bytes += tern_proto::frame_len(&m) as u64;
        self.held.insert(seq, m);
        if self.held.len() > limits::MAX_REORDER_FRAMES || self.bytes > limits::MAX_REORDER_BYTES {
            return Err(format!(
                "{} data frames ({} bytes) wait for #{}",
                self.held.len(),
                self.bytes,
                self.next
            ));
        }
        Ok(())
    }

    /// The next frame in order, if it is here.
    fn pop(&mut self) -> Option<Message> {
        let m = self.held.remove(&self.next)?;
        self.bytes -= tern_proto::frame_len(&m) as u64;
        self.next += 1;
        Some(m)
    }
}

/// The rules for a peer's RamBlocks: the target page size only, at most
/// [`limits::MAX_RAM_BLOCKS`] named blocks, adding up to no more than the spec's memory
/// plus [`limits::RAM_SLACK_BYTES`].
fn check_ram_blocks(
    page_size: u32,
    blocks: &[tern_proto::RamBlock],
    memory_mib: u32,
) -> Result<(), String> {
    if u64::from(page_size) != limits::PAGE_SIZE {
        return Err(format!(
            "page size {page_size} (this host takes {} only)",
            limits::PAGE_SIZE
        ));
    }
    if blocks.is_empty() || blocks.len() > limits::MAX_RAM_BLOCKS {
        return Err(format!(
            "{} RAM blocks (1..={})",
            blocks.len(),
            limits::MAX_RAM_BLOCKS
        ));
    }
    let mut names = HashSet::new();
    let mut total = 0u64;
    for b in blocks {
        if b.name.is_empty() || b.name.len() > limits::MAX_RAM_BLOCK_NAME || !names.insert(&b.name)
        {
            return Err(format!(
                "RAM block name {:?} empty, too long or twice",
                b.name
            ));
        }
        total = total.saturating_add(b.used_length);
    }
    let allowed = (u64::from(memory_mib) << 20) + limits::RAM_SLACK_BYTES;
    if total > allowed {
        return Err(format!(
            "RAM blocks add up to {total} bytes, more than the VM's {memory_mib} MiB plus {} MiB",
            limits::RAM_SLACK_BYTES >> 20
        ));
    }
    Ok(())
}

/// Rebuilds QEMU's stream. Records go out in the order they came; when one lacks its
/// content, it and everything after it wait in `pending` until the content arrives.
/// The memory digest is taken as records go out, so it follows the same order.
struct Rebuild {
    enc: Encoder,
    out: Segments,
    names: Vec<BlockName>,
    digest: Option<MemoryDigest>,
    corrupt_pending: bool,
    pending: VecDeque<Pending>,
    /// Bytes of what `pending` holds (bounded: [`limits::MAX_PENDING_BYTES`]).
    pending_bytes: u64,
    missing: HashSet<Hash>,
    /// The RAM blocks' lengths, from RamBlocks.
    lengths: Vec<u64>,
    /// Stream units in `out`, written to QEMU so far, and last told to the source.
    out_units: u64,
    applied: u64,
    reported: u64,
}

impl Rebuild {
    /// Writes what is queued into QEMU; tells the source (v2) every 256 KiB of stream.
    async fn flush(
        &mut self,
        qemu: &mut unix::OwnedWriteHalf,
        writer: &PeerWriter,
        version: u16,
    ) -> Result<(), IncomingError> {
        write_qemu(qemu, &mut self.out).await?;
        self.applied += std::mem::take(&mut self.out_units);
        if version >= 2 && self.applied - self.reported >= 256 << 10 {
            self.reported = self.applied;
            send(
                writer,
                &Message::Applied {
                    units: self.applied,
                },
            )
            .await?;
        }
        Ok(())
    }

    /// A page record fits the VM's RAM blocks and carries a whole page: checked before
    /// anything of it is stored or hashed.
    fn check_record(&self, block: u16, p: &tern_proto::Page) -> Result<(), IncomingError> {
        let len = self.lengths.get(block as usize).copied().unwrap_or(0);
        if !p.offset.is_multiple_of(limits::PAGE_SIZE) || p.offset >= len {
            return Err(refuse(
                ErrorCode::Protocol,
                format!(
                    "page record at {:#x} of block #{block} is outside its {len} bytes or not page-aligned",
                    p.offset
                ),
            ));
        }
        if let PageBody::Raw(d) = &p.body {
            if d.len() as u64 != limits::PAGE_SIZE {
                return Err(refuse(
                    ErrorCode::Protocol,
                    format!(
                        "page of {} bytes (pages are {})",
                        d.len(),
                        limits::PAGE_SIZE
                    ),
                ));
            }
        }
        Ok(())
    }

    fn push(&mut self, p: Pending, c: &Counters) -> Result<(), IncomingError> {
        let ready = !matches!(p, Pending::Page { data: None, .. });
        if self.pending.is_empty() && ready {
            return self.write(p, c);
        }
        self.pending_bytes += p.bytes();
        self.pending.push_back(p);
        if self.pending.len() > limits::MAX_PENDING_RECORDS
            || self.pending_bytes > limits::MAX_PENDING_BYTES
        {
            return Err(refuse(
                ErrorCode::Protocol,
                format!(
                    "{} records ({} bytes) wait behind {} pages the source referred to and did not send",
                    self.pending.len(),
                    self.pending_bytes,
                    self.missing.len()
                ),
            ));
        }
        Ok(())
    }

    fn fill(&mut self, h: Hash, data: &Bytes) {
        self.missing.remove(&h);
        for p in self.pending.iter_mut() {
            if let Pending::Page {
                data: d @ None,
                hash,
                ..
            } = p
            {
                if *hash == h {
                    *d = Some(data.clone());
                }
            }
        }
    }

    fn drain(&mut self, c: &Counters) -> Result<(), IncomingError> {
        while let Some(p) = self.pending.front() {
            if matches!(p, Pending::Page { data: None, .. }) {
                break;
            }
            let p = self.pending.pop_front().expect("front");
            self.pending_bytes -= p.bytes();
            self.write(p, c)?;
        }
        Ok(())
    }

    fn write(&mut self, p: Pending, _c: &Counters) -> Result<(), IncomingError> {
        let bad = |e: super::digest::DigestError| refuse(ErrorCode::Protocol, e.to_string());
        let d = self.digest.as_mut();
        let rec = match p {
            Pending::Verbatim(b) => {
                self.out_units += b.len() as u64;
                self.out.push(b);
                return Ok(());
            }
            Pending::Zero {
                block,
                offset,
                fill,
            } => {
                d.ok_or_else(|| refuse(ErrorCode::Protocol, "page before RamBlocks"))?
                    .fill(block as usize, offset, fill)
                    .map_err(bad)?;
                RamRecord::Zero {
                    block: self.names[block as usize].clone(),
                    offset,
                    fill,
                    named: false,
                }
            }
            Pending::Page {
                block,
                offset,
                data,
                ..
            } => {
                let d = d.ok_or_else(|| refuse(ErrorCode::Protocol, "page before RamBlocks"))?;
                let data = data.expect("written only once its content is here");
                if data.len() as u64 != d.page_size() {
                    return Err(refuse(ErrorCode::Protocol, "page of the wrong size"));
                }
                let data = if self.corrupt_pending && data.iter().any(|&b| b != 0) {
                    self.corrupt_pending = false;
                    let mut v = data.to_vec();
                    v[100] ^= 0x5a;
                    v.into()
                } else {
                    data
                };
                d.page(block as usize, offset, &data).map_err(bad)?;
                RamRecord::Page {
                    block: self.names[block as usize].clone(),
                    offset,
                    data,
                    named: false,
                }
            }
        };
        self.out_units += self.enc.page_size();
        self.enc
            .encode(&Item::Ram(rec), NameMode::Auto, self.out.scratch());
        Ok(())
    }
}

async fn send(w: &PeerWriter, m: &Message) -> Result<(), IncomingError> {
    w.lock()
        .await
        .send(m)
        .await
        .map_err(IncomingError::PeerWrite)
}

async fn write_qemu(w: &mut unix::OwnedWriteHalf, out: &mut Segments) -> Result<(), IncomingError> {
    out.write_to(w)
        .await
        .map_err(|e| IncomingError::Qemu(format!("writing its stream failed: {e}")))?;
    Ok(())
}

/// Waits until the destination QEMU has loaded the whole stream.
async fn wait_incoming_done(
    qmp: &QmpClient,
    events: &mut tokio::sync::broadcast::Receiver<tern_qemu::qmp::QmpEvent>,
    within: Duration,
) -> Result<(), IncomingError> {
    let deadline = tokio::time::Instant::now() + within;
    loop {
        let info = qmp
            .query_migrate()
            .await
            .map_err(|e| IncomingError::Qemu(error_chain(&e)))?;
        match info.status.as_str() {
            "completed" => return Ok(()),
            "failed" | "cancelled" => {
                return Err(IncomingError::Qemu(format!(
                    "incoming migration {}: {}",
                    info.status,
                    info.error_desc.unwrap_or_default()
                )))
            }
            _ => {}
        }
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        if left.is_zero() {
            return Err(IncomingError::Timeout(
                within,
                "the destination QEMU to load the stream",
            ));
        }
        let _ = qmp
            .wait_event(events, "MIGRATION", left.min(Duration::from_millis(500)))
            .await;
    }
}

/// Relays the destination QEMU's return path to the source agent, one message per frame,
/// flushed at once. Returns Ok(true) if QEMU said SHUT(0) before closing, an error text if
/// QEMU closed without SHUT (it died or failed).
async fn return_path(mut qemu: unix::OwnedReadHalf, writer: PeerWriter) -> Result<bool, String> {
    let mut buf = bytes::BytesMut::with_capacity(64 << 10);
    let mut shut_ok = false;
    loop {
        loop {
            match parse_rp(&buf) {
                Ok(Some((msg, used))) => {
                    let raw = buf.split_to(used).freeze();
                    if let RpMessage::Shut(status) = msg {
                        shut_ok = status == 0;
                        if status != 0 {
                            let _ = writer.lock().await.send(&Message::ReturnPath(raw)).await;
                            return Err(format!("it reported a failed load (SHUT {status})"));
                        }
                    }
                    writer
                        .lock()
                        .await
                        .send(&Message::ReturnPath(raw))
                        .await
                        .map_err(|e| format!("relaying its return path failed: {e}"))?;
                }
                Ok(None) => break,
                Err(e) => return Err(format!("its return path is malformed: {e}")),
            }
        }
        match qemu.read_buf(&mut buf).await {
            Ok(0) if shut_ok => return Ok(true),
            Ok(0) => {
                return Err("it closed the migration socket without finishing (exited?)".into())
            }
            Ok(_) => {}
            Err(e) if shut_ok => {
                tracing::debug!("return path after SHUT: {e}");
                return Ok(true);
            }
            Err(e) => return Err(format!("reading its return path failed: {e}")),
        }
    }
}

struct AbortOnDrop(Option<tokio::task::JoinHandle<Result<bool, String>>>);

impl AbortOnDrop {
    async fn join(&mut self) -> Result<Result<bool, String>, tokio::task::JoinError> {
        match self.0.as_mut() {
            Some(h) => {
                let r = h.await;
                self.0 = None;
                r
            }
            None => std::future::pending().await,
        }
    }
    fn abort(&mut self) {
        if let Some(h) = self.0.take() {
            h.abort();
        }
    }
}

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.abort();
    }
}

//! The destination side of a migration: answers a peer agent, starts the destination QEMU
//! (`-incoming defer`, paused), rebuilds an ordinary QEMU stream from tern frames and
//! writes it into that QEMU, relays the return path, checks the memory digest and runs the
//! VM only once the source committed.
//!
//! [`serve_peer`] reads as the phases, in order, each in its own file:
//!
//! | phase | file | does |
//! |---|---|---|
//! | hello | `hello.rs` | the version; what the connection is for: Prepare (after DiskOffer, TpmKey), Query, Attach, PostcopyResume, Tunnel (`crate::tunnel`), a plan's PlanQuery and link probe (`plan.rs`) |
//! | `Prepare` | `prepare.rs` | the spec vetted (`spec.rs`), the migration admitted, its QEMU launched (a libvirt domain's: connected to, `crate::libvirt`), disks exported, the summary, Prepared |
//! | `Transfer` | `transfer.rs` | frames in order (reordered from data connections) rebuilt into QEMU's stream; the return path relayed (`relay.rs`); post-copy, once the VM runs here: a broken link waited out and the stream taken again on the source's new connection (`resume.rs`, v11) |
//! | `Verify` | `verify.rs` | digests equal, QEMU loaded everything, disks handed to the guest, the commit (v1: asked for) |
//! | `Switchover` | `switchover.rs` | the durable record (`record.rs`), `cont`, the VM handed to the daemon, Resumed; post-copy takes the record, `cont` and the hand-over (`switchover::claim`) at PostcopyRun, mid-transfer |
//! | `Verify`, `Switchover` of a libvirt domain | `carried.rs` | digests equal once the QEMU libvirt started has loaded the stream (its SHUT, which the source holds back from its QEMU until then), Resumed |
//!
//! Every message received goes through the conversation's order
//! (`tern_proto::conversation`) first. Before the switchover record, any failure (peer
//! gone, Abort, QEMU died, digest mismatch, a panic) kills the destination QEMU, removes
//! its run directory and releases its name, and only then tells the source. After it,
//! this host owns the VM.

mod carried;
mod hello;
mod plan;
mod prepare;
pub mod record;
mod relay;
mod resume;
pub mod spec;
mod switchover;
mod transfer;
mod verify;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use futures_util::FutureExt;
use tern_proto::conversation::{Conversation, Side};
use tern_proto::{ErrorCode, Message};
use tern_qemu::launch::QemuProcess;
use tern_qemu::qmp::QmpError;
use tokio::sync::Mutex;

pub use record::{SwitchRecord, INCOMING_MARKER, SWITCHED_IN};
pub use transfer::check_ram_blocks;

use crate::disk::DestDiskError;
use crate::error::{error_chain, panic_message};
use crate::handle::MigrationHandle;
use crate::registry::AttachRefused;
use crate::transport::conn::{ExpectError, FrameReader, FrameWriter, RecvError};
use crate::transport::links::{DataStreamError, PeerWriter};
use crate::transport::tls::{is_tls_failure, PeerIdentity, PeerRead, PeerStream};
use crate::{Engine, Host};

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
    #[error("the destination QEMU failed: {what}")]
    Qmp {
        what: &'static str,
        #[source]
        source: QmpError,
    },
    #[error("the disks failed")]
    Disk(#[from] DestDiskError),
    #[error("timed out after {0:?} waiting for {1}")]
    Timeout(Duration, &'static str),
    #[error("the link to the source broke during post-copy ({cause}) and the source did not resume within {waited:?}: the VM stays here, paused on the pages it lacks")]
    NotResumed { cause: String, waited: Duration },
}

impl IncomingError {
    fn code(&self) -> ErrorCode {
        let timed_out = |e: &std::io::Error| e.kind() == std::io::ErrorKind::TimedOut;
        match self {
            IncomingError::Peer(RecvError::Io(e)) | IncomingError::PeerWrite(e) if timed_out(e) => {
                ErrorCode::Timeout
            }
            IncomingError::Peer(RecvError::Io(e)) | IncomingError::PeerWrite(e)
                if is_tls_failure(e) =>
            {
                ErrorCode::Security
            }
            IncomingError::Refuse { code, .. } | IncomingError::Aborted { code, .. } => *code,
            IncomingError::Peer(_) | IncomingError::PeerClosed(_) | IncomingError::PeerWrite(_) => {
                ErrorCode::Protocol
            }
            IncomingError::Qemu(_) | IncomingError::Qmp { .. } => ErrorCode::QemuFailed,
            IncomingError::Disk(e) => e.code(),
            IncomingError::Timeout(..) | IncomingError::NotResumed { .. } => ErrorCode::Timeout,
        }
    }
}

impl From<DataStreamError> for IncomingError {
    fn from(e: DataStreamError) -> Self {
        match e {
            DataStreamError::Recv(e) => IncomingError::Peer(e),
            DataStreamError::Closed => IncomingError::PeerClosed("a data stream"),
            DataStreamError::NotSeq(got) => refuse(
                ErrorCode::Protocol,
                format!("expected Seq on a data connection, got {got}"),
            ),
        }
    }
}

pub(crate) fn refuse(code: ErrorCode, message: impl Into<String>) -> IncomingError {
    IncomingError::Refuse {
        code,
        message: message.into(),
    }
}

/// A QMP failure of the destination QEMU, typed.
pub(crate) fn qmp_failed(what: &'static str) -> impl Fn(QmpError) -> IncomingError {
    move |source| IncomingError::Qmp { what, source }
}

/// What is set up on this host for the incoming VM, torn down unless it switches over.
pub(crate) struct Incoming {
    engine: Arc<Engine>,
    host: Arc<dyn Host>,
    name: Option<String>,
    process: Option<QemuProcess>,
    run_dir: Option<PathBuf>,
    handle: Option<Arc<MigrationHandle>>,
    /// The VM became this host's mid-transfer (post-copy, at POSTCOPY_RUN): a failure
    /// after that leaves it here, as QEMU has it.
    claimed: bool,
}

impl Incoming {
    async fn cleanup(&mut self) {
        if let Some(mut p) = self.process.take() {
            p.kill().await;
        }
        if let Some(d) = self.run_dir.take() {
            let _ = std::fs::remove_dir_all(d);
        }
        if let Some(n) = self.name.take() {
            self.host.release_name(&n);
        }
    }
}

/// One peer connection: frames in order, as the conversation allows them.
pub(crate) struct Conn {
    reader: FrameReader<PeerRead>,
    writer: PeerWriter,
    conv: Conversation,
    addr: SocketAddr,
    peer: PeerIdentity,
}

impl Conn {
    /// The next message within `within`, checked against the conversation's order; the
    /// peer's Abort and a clean close are errors.
    async fn next(
        &mut self,
        within: Duration,
        what: &'static str,
    ) -> Result<Message, IncomingError> {
        let m = self
            .reader
            .expect(within, what)
            .await
            .map_err(|e| match e {
                ExpectError::Timeout(d, w) => IncomingError::Timeout(d, w),
                ExpectError::Closed(w) => IncomingError::PeerClosed(w),
                ExpectError::Aborted { code, message } => IncomingError::Aborted { code, message },
                ExpectError::Recv(e) => IncomingError::Peer(e),
            })?;
        self.check(&m)?;
        Ok(m)
    }

    /// `m` from the source may come now.
    fn check(&mut self, m: &Message) -> Result<(), IncomingError> {
        self.conv
            .on(Side::Source, m)
            .map_err(|e| refuse(ErrorCode::Protocol, e.to_string()))
    }

    async fn send(&mut self, m: &Message) -> Result<(), IncomingError> {
        // (what this side sends keeps the conversation's stage in step)
        let _ = self.conv.on(Side::Destination, m);
        send(&self.writer, m).await
    }
}

/// Serves one peer connection (one incoming migration, a Query, or a data connection) to
/// its end.
pub async fn serve_peer(
    engine: Arc<Engine>,
    host: Arc<dyn Host>,
    stream: PeerStream,
    addr: SocketAddr,
    peer: PeerIdentity,
) {
    use tracing::Instrument;
    // the id is recorded once the peer says it (Prepare or Attach)
    let span = tracing::info_span!(
        "incoming",
        peer = %addr,
        migration = tracing::field::Empty,
        vm = tracing::field::Empty
    );
    serve(engine, host, stream, addr, peer)
        .instrument(span)
        .await
}

async fn serve(
    engine: Arc<Engine>,
    host: Arc<dyn Host>,
    stream: PeerStream,
    addr: SocketAddr,
    peer: PeerIdentity,
) {
    tracing::debug!(peer = %addr, names = ?peer.names, labels = ?peer.labels, "peer authenticated");
    let (rd, wr) = stream.split();
    let mut conn = Conn {
        reader: FrameReader::new(rd),
        writer: Arc::new(Mutex::new(
            FrameWriter::new(wr).with_deadline(engine.config.stall_timeout),
        )),
        conv: Conversation::new(),
        addr,
        peer,
    };
    let mut inc = Incoming {
        engine: engine.clone(),
        host,
        name: None,
        process: None,
        run_dir: None,
        handle: None,
        claimed: false,
    };
    // A bug that panics here cleans up like an error: QEMU, run directory, name.
    let result = std::panic::AssertUnwindSafe(receive(&mut inc, &mut conn))
        .catch_unwind()
        .await
        .unwrap_or_else(|p| {
            Err(refuse(
                ErrorCode::Internal,
                format!("tern failed internally (a bug: {})", panic_message(&*p)),
            ))
        });
    match result {
        Ok(Then::Attach { id, index }) => attach(&engine, conn, &id, index).await,
        Ok(Then::Tunnel { domain }) => tunnel(&engine, conn, &domain).await,
        Ok(Then::Resume { id }) => resume_handoff(&engine, conn, &id).await,
        Ok(Then::Done) => {}
        Err(e) => {
            let code = e.code();
            let message = error_chain(&e);
            tracing::warn!(peer = %addr, code = code.name(), %message, "incoming migration failed");
            // Nothing of the VM may run here once the source hears of the failure (it
            // resumes its copy then): clean up first, then tell it.
            inc.cleanup().await;
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
                    conn.writer.lock().await.send(&abort).await
                })
                .await;
            }
            if let Some(h) = inc.handle.take() {
                let vm_state = if inc.claimed {
                    "here: it has run on this host since post-copy began (POSTCOPY_RUN); QEMU keeps it (postcopy-paused if pages are still missing: the source host holds them)"
                } else {
                    "removed from this host"
                };
                h.finish_err(code, message, vm_state.into());
            }
        }
    }
}

/// What a connection does once [`receive`] is through with it.
enum Then {
    /// Nothing more (a migration or a Query ended).
    Done,
    /// It is extra data connection `index` of migration `id`.
    Attach { id: String, index: u16 },
    /// It carries a storage connection of libvirt domain `domain`.
    Tunnel { domain: String },
    /// Post-copy migration `id` goes on on it (v11), after the link broke.
    Resume { id: String },
}

/// The phases of an incoming migration, or what else the connection is for.
async fn receive(inc: &mut Incoming, conn: &mut Conn) -> Result<Then, IncomingError> {
    let request = match hello::run(inc, conn).await? {
        hello::Opening::Prepare(r) => r,
        hello::Opening::Attach { id, index } => {
            tracing::Span::current().record("migration", id.as_str());
            return Ok(Then::Attach { id, index });
        }
        hello::Opening::Tunnel { domain } => {
            tracing::Span::current().record("vm", domain.as_str());
            return Ok(Then::Tunnel { domain });
        }
        hello::Opening::Answered => return Ok(Then::Done),
        hello::Opening::Resume { id } => {
            tracing::Span::current().record("migration", id.as_str());
            return Ok(Then::Resume { id });
        }
        hello::Opening::Plan {
            key_id,
            hashes,
            chunks,
        } => {
            plan::answer(inc, conn, key_id, hashes, chunks).await?;
            return Ok(Then::Done);
        }
        hello::Opening::Locations { peer, entries } => {
            // bounded: a peer's long list must not hold the connection (and its slot)
            let ours = tokio::time::timeout(
                crate::overlay::TELL_WITHIN,
                inc.host.located(&peer, conn.addr, entries),
            )
            .await
            .map_err(|_| {
                refuse(
                    ErrorCode::ResourceExhausted,
                    "the locations took too long to take",
                )
            })?
            .map_err(|e| refuse(ErrorCode::NotAuthorized, e))?;
            conn.send(&Message::Locations { entries: ours }).await?;
            if conn.conv.version() >= 8 {
                // v8: the cards' addresses, for ARP suppression
                let Message::Addresses { entries } =
                    conn.next(crate::overlay::TELL_WITHIN, "Addresses").await?
                else {
                    return Err(refuse(ErrorCode::Protocol, "Addresses expected"));
                };
                let ours = tokio::time::timeout(
                    crate::overlay::TELL_WITHIN,
                    inc.host.addressed(&peer, conn.addr, entries),
                )
                .await
                .map_err(|_| {
                    refuse(
                        ErrorCode::ResourceExhausted,
                        "the addresses took too long to take",
                    )
                })?
                .map_err(|e| refuse(ErrorCode::NotAuthorized, e))?;
                conn.send(&Message::Addresses { entries: ours }).await?;
            }
            return Ok(Then::Done);
        }
    };
    let span = tracing::Span::current();
    span.record("migration", request.id.as_str());
    if let Ok(spec) = tern_qemu::spec::VmSpec::from_toml(&request.spec_toml) {
        span.record("vm", spec.name.as_str());
    }
    let mut prepared = prepare::run(inc, conn, request).await?;
    let received = transfer::run(inc, conn, &mut prepared).await?;
    if prepared.qmp.is_none() {
        // a libvirt domain's QEMU: libvirt resumes it
        carried::finish(inc, conn, prepared, received).await?;
        return Ok(Then::Done);
    }
    // From here the destination works without reading the source's frames for a while
    // (QEMU loads the rest, disks are flushed, the VM resumed): it says it is alive, so the
    // source's silence limit means a dead peer, not a busy one.
    let _alive =
        (prepared.version >= 2).then(|| relay::keepalive(conn.writer.clone(), received.applied));
    let mut received = received;
    verify::run(inc, conn, &mut prepared, &mut received).await?;
    switchover::run(inc, conn, prepared, received).await?;
    Ok(Then::Done)
}

/// Carries a storage tunnel to its end (its conversation said `Tunnel`: no frame follows).
async fn tunnel(engine: &Engine, conn: Conn, domain: &str) {
    let Conn {
        reader,
        writer,
        addr,
        peer,
        ..
    } = conn;
    let Ok(writer) = Arc::try_unwrap(writer) else {
        tracing::warn!(peer = %addr, "storage tunnel: the connection's writer is still shared");
        return;
    };
    match crate::tunnel::serve(
        engine,
        domain,
        &peer.fingerprint,
        reader,
        writer.into_inner(),
    )
    .await
    {
        Ok(b) => tracing::info!(
            peer = %addr,
            domain,
            to_destination = b.to_destination,
            to_source = b.to_source,
            "storage tunnel ended"
        ),
        Err(e) => tracing::warn!(
            peer = %addr,
            domain,
            "storage tunnel refused: {}",
            error_chain(&e)
        ),
    }
}

/// Hands a connection on which post-copy goes on to its migration (only from the
/// certificate that prepared it, only while its VM runs here in post-copy).
async fn resume_handoff(engine: &Engine, conn: Conn, id: &str) {
    let addr = conn.addr;
    let writer = conn.writer.clone();
    let fingerprint = conn.peer.fingerprint.clone();
    let refused = match engine.registry.resume(id, &fingerprint, conn) {
        Ok(()) => {
            tracing::info!(peer = %addr, migration = %id, "the source resumes post-copy on a new connection");
            return;
        }
        Err(AttachRefused::Unknown) => (
            ErrorCode::Protocol,
            format!("no post-copy migration {id} waits here for its source (or {} of its new connections wait to be taken already)", resume::QUEUED_RESUMES),
        ),
        Err(AttachRefused::OtherPeer) => (
            ErrorCode::NotAuthorized,
            format!("migration {id} was prepared by another peer's certificate"),
        ),
    };
    tracing::warn!(peer = %addr, migration = %id, "post-copy resume refused: {}", refused.1);
    tell_refused(&writer, refused).await;
}

/// A connection's purpose refused: the peer hears why (best effort).
async fn tell_refused(writer: &PeerWriter, (code, message): (ErrorCode, String)) {
    let _ = writer
        .lock()
        .await
        .send(&Message::Abort { code, message })
        .await;
}

/// Hands an extra data connection to its migration (only from the certificate that
/// prepared it).
async fn attach(engine: &Engine, conn: Conn, id: &str, index: u16) {
    let refused =
        match engine
            .registry
            .attach_stream(id, &conn.peer.fingerprint, index, conn.reader)
        {
            Ok(()) => return,
            Err(AttachRefused::Unknown) => (
                ErrorCode::Protocol,
                format!("no incoming migration {id} here"),
            ),
            Err(AttachRefused::OtherPeer) => (
                ErrorCode::NotAuthorized,
                format!("migration {id} was prepared by another peer's certificate"),
            ),
        };
    tracing::warn!(peer = %conn.addr, migration = %id, "data connection refused: {}", refused.1);
    tell_refused(&conn.writer, refused).await;
}

pub(crate) async fn send(w: &PeerWriter, m: &Message) -> Result<(), IncomingError> {
    w.lock()
        .await
        .send(m)
        .await
        .map_err(IncomingError::PeerWrite)
}

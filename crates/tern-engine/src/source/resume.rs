//! Post-copy recovery, the source's half: once POSTCOPY_RUN went out the VM runs at the
//! destination and the pages it still lacks are only here, so a link that breaks then
//! must not end the migration. The connection's tasks go (the source QEMU's socket with
//! them: QEMU pauses in `postcopy-paused`, keeping its pages), then tern asks the
//! destination every [`ASK_EVERY`] to go on (a new mutually authenticated connection,
//! PostcopyResume, v11) until it answers PostcopyResumed (its QEMU waits on a new stream,
//! `migrate-recover`) or `outage_wait_s` ran out. Then QEMU resumes into a new socket
//! (`migrate` with `resume`: it asks which pages the destination holds, RECV_BITMAP, and
//! sends the rest), and a new forwarder reads that stream with what the last one knew
//! ([`StreamState`]: the RAM blocks, the memory digest).

use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::json;
use tern_api::LinkOutage;
use tern_proto::{limits, MigrationState};
use tern_qemu::qmp::QmpClient;
use tokio::sync::{mpsc, oneshot};

use super::forward::{forward, ForwardDone, ForwardPlan, StreamState};
use super::peer::{peer_reader, PeerEvent};
use super::{AbortOnDrop, MigrateError, Migration};
use crate::codec::{CodecPicker, CodecPolicy};
use crate::datapath::{DataPathPicker, DataPathPolicy};
use crate::error::error_chain;
use crate::handle::Phase;
use crate::transport::flow::Flow;
use crate::transport::links::{Links, PeerWriter};
use crate::transport::rate::RateLimit;

/// How often the destination is asked while the link is down.
const ASK_EVERY: Duration = Duration::from_secs(2);
/// The most times one migration resumes post-copy (a link that breaks each time does not
/// loop).
pub(super) const MAX_RESUMES: u32 = 4;
/// How long the source QEMU may take to pause once its socket closed.
const PAUSE_WITHIN: Duration = Duration::from_secs(30);

/// Whether post-copy may go on after `e` on a new connection: the link to the destination
/// failed (silent, closed, reset, a write or read error), or the source QEMU paused
/// because its stream broke. Not the destination's Abort (it gave up), QEMU's failure, a
/// malformed stream or a broken protocol.
pub(super) fn link_broke(e: &MigrateError) -> bool {
    matches!(
        e,
        MigrateError::Peer(_)
            | MigrateError::PeerWrite(_)
            | MigrateError::PeerClosed(_)
            | MigrateError::Timeout(..)
            | MigrateError::PostcopyPaused
    )
}

/// What the transfer needs to make another connection carry the stream.
pub(super) struct Carrier {
    pub stream: Arc<tokio::sync::Mutex<StreamState>>,
    pub policy: CodecPolicy,
    pub budget: Option<Arc<RateLimit>>,
    pub rtt: Duration,
}

/// A new connection carrying the resumed stream.
pub(super) struct Leg {
    pub writer: PeerWriter,
    pub events: mpsc::Receiver<PeerEvent>,
    pub fwd: tokio::task::JoinHandle<Result<ForwardDone, MigrateError>>,
    pub tasks: Vec<AbortOnDrop>,
    pub outage: LinkOutage,
}

/// After the link broke with `cause` during post-copy (the last connection's tasks are
/// gone): waits for the source QEMU to pause, then for the destination, at most `left`;
/// resumes QEMU's migration into a new connection.
pub(super) async fn resume(
    m: &mut Migration,
    qmp: &QmpClient,
    carrier: &Carrier,
    cause: &MigrateError,
    left: Duration,
) -> Result<Leg, MigrateError> {
    let since = Instant::now();
    let cause_text = error_chain(cause);
    tracing::warn!(migration = %m.handle.id, cause = %cause_text, wait_s = left.as_secs(), "the link broke during post-copy: the VM waits at the destination for its pages; resuming when the link is back");
    m.handle.set_phase(Phase::WaitingForLink);
    m.handle
        .update(|s| s.progress.qemu_status = "postcopy-paused".into());
    wait_paused(qmp).await?;
    let until = since + left;
    // (no cancel here: it would strand the VM at the destination without its pages)
    let (reader, writer, version) = loop {
        let tried = super::connect::resume_postcopy(m).await;
        match tried {
            Ok(c) => break c,
            // the destination refused: it never ran the VM (the link broke with
            // POSTCOPY_RUN on its way), or it runs it and has not noticed the break yet
            // (it gives up on its old connection within its stall time; a source agent
            // that restarted may come first), or it gave up on the VM; it says which
            Err(e @ MigrateError::Remote { .. }) => match super::connect::query_once(m).await {
                Ok((MigrationState::Discarded | MigrationState::Unknown, _)) => {
                    return Err(MigrateError::PostcopyNeverRan(cause_text))
                }
                Ok((MigrationState::Running | MigrationState::InProgress, _)) | Err(_) => {
                    tracing::debug!(migration = %m.handle.id, "the destination cannot resume yet: {}", error_chain(&e))
                }
            },
            Err(e) => {
                tracing::debug!(migration = %m.handle.id, "the destination cannot resume yet: {}", error_chain(&e))
            }
        }
        let now = Instant::now();
        if now >= until {
            return Err(MigrateError::PostcopyNotResumed {
                cause: cause_text,
                waited_s: since.elapsed().as_secs(),
            });
        }
        tokio::time::sleep(ASK_EVERY.min(until - now)).await;
    };
    let waited = since.elapsed();
    tracing::info!(migration = %m.handle.id, waited_ms = waited.as_millis() as u64, "the destination waits on a new stream: resuming post-copy");
    // QEMU resumes into a new socket; it asks the destination which pages it holds
    let n = m.outages.len() + 1;
    let fd_name = format!("tern-migrate-{}-resume{n}", m.wire_id());
    let qemu_sock = qmp
        .stream_socket(&fd_name, super::transfer::QEMU_OUT_BUFFER)
        .await?;
    qmp.execute(
        "migrate",
        Some(json!({ "uri": format!("fd:{fd_name}"), "resume": true })),
    )
    .await?;
    let (qemu_rd, qemu_wr) = qemu_sock.into_split();
    m.writer = Some(writer.clone());
    m.handle.set_phase(Phase::Transfer);
    let (ev_tx, events) = mpsc::channel(16);
    // (no disks in post-copy: replies nobody reads)
    let (disk_tx, _disk_rx) = mpsc::channel(limits::MAX_DISK_REPLIES);
    let (qemu_tx, qemu_rx) = oneshot::channel();
    let _ = qemu_tx.send(qemu_wr);
    let flow = (version >= 2).then(|| Arc::new(Flow::new()));
    let offered = carrier.stream.lock().await.pages.offered();
    let mut tasks = Vec::new();
    let t = crate::spawn(peer_reader(
        reader,
        (qemu_rx, None),
        ev_tx,
        disk_tx,
        m.handle.clone(),
        writer.clone(),
        (m.engine.store.clone(), offered),
        flow.clone(),
    ));
    tasks.push(AbortOnDrop(t.abort_handle()));
    let fwd = crate::spawn(forward(
        qemu_rd,
        writer.clone(),
        m.handle.clone(),
        ForwardPlan {
            stream: carrier.stream.clone(),
            resumed: true,
            datapath: DataPathPicker::new(DataPathPolicy::Lean, carrier.rtt, Instant::now()),
            v5: version >= 5,
            picker: CodecPicker::new(carrier.policy, carrier.rtt),
            commit: None,
            links: Links::new(carrier.budget.clone()),
            flow: flow.map(|f| (f, carrier.rtt)),
            stream_end: None,
            // a copy of the stream is of one connection's stream only
            record: None,
            postcopy: Some(m.postcopy_run.clone()),
            // (the encoder keeps what the package set)
            held_refs: false,
            // (the mark is written once, before post-copy began)
            resume_state: None,
        },
    ));
    tasks.push(AbortOnDrop(fwd.abort_handle()));
    Ok(Leg {
        writer,
        events,
        fwd,
        tasks,
        outage: LinkOutage {
            lost_at_ms: since.duration_since(m.t0).as_millis() as u64,
            waited_ms: waited.as_millis() as u64,
            cause: cause_text,
            wire_bytes_before: m.handle.status().progress.bytes_on_wire,
        },
    })
}

/// Whether the source QEMU sent its whole stream before the link broke (`completed`):
/// then there is nothing to resume, and only the destination knows whether all of it
/// arrived.
pub(super) async fn qemu_completed(qmp: &QmpClient) -> bool {
    qmp.query_migrate()
        .await
        .is_ok_and(|i| i.status == "completed")
}

/// Waits until the source QEMU paused its post-copy (its stream closed under it).
async fn wait_paused(qmp: &QmpClient) -> Result<(), MigrateError> {
    let mut events = qmp.subscribe();
    let deadline = Instant::now() + PAUSE_WITHIN;
    loop {
        let status = qmp.query_migrate().await?.status;
        match status.as_str() {
            "postcopy-paused" => return Ok(()),
            "postcopy-active" | "postcopy-recover-setup" | "postcopy-recover" => {}
            // (`completed` is the transfer's to handle, before it asks to resume): failed,
            // cancelled, or a state post-copy cannot resume from
            other => {
                return Err(MigrateError::QemuMigration(format!(
                    "the link broke during post-copy and the source QEMU is {other:?}, not postcopy-paused: it cannot resume; the VM stays paused at the destination"
                )))
            }
        }
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(MigrateError::Timeout(
                PAUSE_WITHIN,
                "the source QEMU to pause its post-copy",
            ));
        }
        let _ = qmp
            .wait_event(&mut events, "MIGRATION", left.min(Duration::from_secs(1)))
            .await;
    }
}

//! Post-copy recovery, the destination's half: the VM runs here from POSTCOPY_RUN on, and
//! a link that breaks after that must not lose it. The transfer drops QEMU's stream (QEMU
//! pauses in `postcopy-paused`; a vCPU that touches a missing page waits), and waits for
//! the source to come back on a new connection (PostcopyResume, v11, only from the
//! certificate that prepared the migration), at most [`RESUME_WITHIN`]. QEMU takes a new
//! stream (`migrate-recover`, out of band: under TCG a vCPU waiting on a missing page can
//! hold the big lock, so in-band commands hang; the stream's socket was handed over
//! earlier, [`stage_spares`]), tells the source which pages it holds over the return path
//! (RECV_BITMAP), and the transfer goes on with the new connection.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use serde_json::json;
use tern_proto::{ErrorCode, Message};
use tern_qemu::qmp::{QmpClient, QmpError};
use tokio::net::UnixStream;
use tokio::sync::mpsc;

use super::prepare::Prepared;
use super::{qmp_failed, refuse, Conn, IncomingError};
use crate::error::error_chain;
use crate::handle::Phase;

/// How long a VM that runs here waits for its source to resume post-copy. Past it the
/// migration is reported failed; QEMU keeps the VM (paused on what it lacks).
const RESUME_WITHIN: Duration = Duration::from_secs(30 * 60);
/// How many times post-copy may resume (the spare streams QEMU holds for it; the source's
/// limit is the same).
const SPARE_STREAMS: usize = 4;
/// Connections a source may have opened to resume, waiting to be taken (the newest wins:
/// the others died while this side got ready, or their sender gave up on them).
pub(super) const QUEUED_RESUMES: usize = 4;
/// How long QEMU may take to pause once its stream closed.
const PAUSE_WITHIN: Duration = Duration::from_secs(30);

/// Whether post-copy may go on after `e` on a new connection from the source: the link to
/// it failed (silent, closed, reset, a read or write error). Not its Abort, QEMU's failure
/// or a broken protocol.
pub(super) fn link_broke(e: &IncomingError) -> bool {
    matches!(
        e,
        IncomingError::Peer(_)
            | IncomingError::PeerWrite(_)
            | IncomingError::PeerClosed(_)
            | IncomingError::Timeout(..)
    )
}

/// Sockets QEMU holds (`getfd`) for the streams post-copy may resume on: handed over
/// while its main loop answers (at POSTCOPY_RUN), because once the link broke a vCPU that
/// waits on a missing page can hold QEMU's big lock, and then only out-of-band commands
/// (`migrate-recover`) get through.
pub(super) async fn stage_spares(qmp: &QmpClient) -> Vec<(String, UnixStream)> {
    // (names QEMU has not seen)
    static SPARES: AtomicU64 = AtomicU64::new(0);
    let mut spares = Vec::new();
    for _ in 0..SPARE_STREAMS {
        let name = format!("tern-recover-{}", SPARES.fetch_add(1, Ordering::Relaxed));
        match qmp
            .stream_socket(&name, tern_qemu::qmp::STREAM_SOCKET_BUFFER)
            .await
        {
            Ok(sock) => spares.push((name, sock)),
            Err(e) => {
                tracing::warn!("post-copy: QEMU took no spare stream for a recovery: {e}");
                break;
            }
        }
    }
    spares
}

/// After the link broke with `cause` (this QEMU's stream is closed): QEMU pauses and
/// takes a spare stream (`migrate-recover`, out of band); then the source's new connection
/// (`fresh` if it came already) is told to go on. Returns it and QEMU's new stream.
pub(super) async fn await_resume(
    p: &mut Prepared,
    rx: &mut mpsc::Receiver<Conn>,
    fresh: Option<Conn>,
    spares: &mut Vec<(String, UnixStream)>,
    cause: &IncomingError,
) -> Result<(Conn, UnixStream), IncomingError> {
    let since = Instant::now();
    let cause = error_chain(cause);
    tracing::warn!(migration = %p.id, %cause, "the link to the source broke during post-copy: the VM waits here for the pages it lacks until the source resumes");
    p.handle.set_phase(Phase::WaitingForLink);
    let qmp = p
        .qmp
        .clone()
        .ok_or_else(|| refuse(ErrorCode::Internal, "post-copy without a QEMU monitor"))?;
    let Some((name, sock)) = spares.pop() else {
        return Err(IncomingError::Qemu(format!(
            "the link broke during post-copy and QEMU holds no spare stream to resume on (it takes {SPARE_STREAMS} as the transfer begins: this break is one more, or it took none)"
        )));
    };
    recover(&qmp, &name).await?;
    let until = since + RESUME_WITHIN;
    let mut next = fresh;
    loop {
        let mut conn = match next.take() {
            Some(c) => c,
            None => match tokio::time::timeout_at(until.into(), rx.recv()).await {
                Ok(Some(c)) => c,
                Ok(None) | Err(_) => {
                    return Err(IncomingError::NotResumed {
                        cause,
                        waited: since.elapsed(),
                    })
                }
            },
        };
        // the newest of those that came meanwhile
        while let Ok(c) = rx.try_recv() {
            conn = c;
        }
        // (QEMU recovers on the same spare stream, whichever connection carries it)
        match conn.send(&Message::PostcopyResumed).await {
            Ok(()) => {
                tracing::info!(migration = %p.id, waited_ms = since.elapsed().as_millis() as u64, "the source is back: post-copy goes on");
                return Ok((conn, sock));
            }
            Err(e) => {
                tracing::warn!(migration = %p.id, "the source's new connection failed at once, waiting for another: {}", error_chain(&e))
            }
        }
    }
}

/// `migrate-recover` on spare stream `name`, out of band, once QEMU paused its post-copy
/// (its stream closed under it; it says so with a MIGRATION event).
async fn recover(qmp: &QmpClient, name: &str) -> Result<(), IncomingError> {
    let mut events = qmp.subscribe();
    let deadline = Instant::now() + PAUSE_WITHIN;
    loop {
        let tried = qmp
            .execute_oob(
                "migrate-recover",
                Some(json!({ "uri": format!("fd:{name}") })),
            )
            .await;
        let e = match tried {
            Ok(_) => return Ok(()),
            // not paused yet: QEMU says so at once
            Err(e @ QmpError::Command { .. }) => e,
            Err(e) => return Err(qmp_failed("migrate-recover")(e)),
        };
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(qmp_failed("migrate-recover")(e));
        }
        let _ = qmp
            .wait_event(
                &mut events,
                "MIGRATION",
                left.min(Duration::from_millis(500)),
            )
            .await;
    }
}

//! Phase `Switchover`: the commit (v1: Commit after ReadyToResume; v2: it went with
//! SourceDone), then the destination's Resumed. When Resumed does not come, the source
//! asks the destination (Query, on a new connection) and never guesses: "running"
//! completes the migration, "discarded" or "unknown" lets the source resume, no answer
//! leaves the VM paused here with the switchover in doubt.
//!
//! ===== SWITCHOVER POINT: after the commit the source never resumes on its own. =====

use std::time::{Duration, Instant, SystemTime};

use tern_proto::{ErrorCode, Message, MigrationState};
use tokio::sync::mpsc;

use super::peer::PeerEvent;
use super::transfer::{TransferEnd, Transferred};
use super::{send, MigrateError, Migration};
use crate::error::error_chain;
use crate::handle::{Counters, Phase};

/// How long the source waits for Resumed without hearing anything from the destination
/// (a busy destination sends keepalives, `limits::KEEPALIVE_INTERVAL`)...
const RESUMED_SILENCE: Duration = Duration::from_secs(30);
/// ...and at most in all, keepalives or not.
const RESUMED_WITHIN: Duration = Duration::from_secs(600);

/// The switchover, done: the VM runs at the destination.
pub(super) struct Resolved {
    /// The digest both sides agreed on.
    pub digest: [u8; 32],
    /// When the commit went out.
    pub t_commit: SystemTime,
    /// The destination QEMU's RESUME (µs since the epoch; 0 for a paused VM).
    pub resumed_us: u64,
    /// Resumed was lost; the outcome came from asking the destination.
    pub by_query: bool,
}

/// Why no Resumed came after the commit.
enum Lost {
    /// The destination aborted: it discarded everything, nothing of the VM runs there.
    Discarded { code: ErrorCode, message: String },
    /// No word from it (connection lost, timeout): ask it.
    Unknown(String),
}

pub(super) async fn run(m: &mut Migration, t: &mut Transferred) -> Result<Resolved, MigrateError> {
    let (digest, t_commit, resumed) =
        match std::mem::replace(&mut t.end, TransferEnd::CommitLost(String::new())) {
            TransferEnd::Ready { digest } => {
                // v1: the source QEMU must have completed (it did when it closed the
                // stream); then Commit
                let info = m.vm.qmp()?.query_migrate().await?;
                if info.status != "completed" {
                    return Err(MigrateError::QemuMigration(format!(
                        "source QEMU reports {:?} after sending everything",
                        info.status
                    )));
                }
                if m.handle.is_cancelled() && !super::postcopy_ran(m) {
                    return Err(MigrateError::Cancelled);
                }
                m.handle.set_phase(Phase::Switchover);
                m.committed = true;
                let t_commit = SystemTime::now();
                // a failed send may still have reached it: ask, never guess
                let resumed = match send(&t.writer, &Message::Commit).await {
                    Ok(()) => await_resumed(&mut t.events, &m.handle.counters).await,
                    Err(e) => Err(Lost::Unknown(format!(
                        "sending Commit failed: {}",
                        error_chain(&e)
                    ))),
                };
                (digest, t_commit, resumed)
            }
            TransferEnd::Committed { resumed } => {
                m.handle.set_phase(Phase::Switchover);
                m.committed = true;
                let resumed = match resumed {
                    Some(us) => Ok(us),
                    None => await_resumed(&mut t.events, &m.handle.counters).await,
                };
                // (the destination resumes only when its digest equals the source's)
                (
                    t.source_digest.unwrap_or_default(),
                    t.t_stream_end.unwrap_or_else(SystemTime::now),
                    resumed,
                )
            }
            TransferEnd::CommitLost(why) => {
                m.handle.set_phase(Phase::Switchover);
                m.committed = true;
                (
                    t.source_digest.unwrap_or_default(),
                    t.t_stream_end.unwrap_or_else(SystemTime::now),
                    Err(Lost::Unknown(why)),
                )
            }
        };
    let (resumed_us, by_query) = match resumed {
        Ok(us) => (us, false),
        Err(Lost::Discarded { code, message }) => {
            // it said so itself, before running anything
            m.committed = false;
            return Err(MigrateError::Remote { code, message });
        }
        // Resumed did not come: ask the destination what it did, never guess.
        Err(Lost::Unknown(why)) => match ask_destination(m, &why).await? {
            (MigrationState::Running, us) => (us, true),
            (state, _) => {
                // The destination holds nothing of the VM: the source may run it again.
                m.committed = false;
                return Err(MigrateError::Remote {
                    code: ErrorCode::Internal,
                    message: format!(
                        "the destination did not confirm the switchover ({why}) and reports the migration as {state:?}: nothing of the VM runs there"
                    ),
                });
            }
        },
    };
    Ok(Resolved {
        digest,
        t_commit,
        resumed_us,
        by_query,
    })
}

/// Waits for the destination's Resumed after the commit: until it has been silent for
/// [`RESUMED_SILENCE`] (any frame counts: `wire_in` moves), at most [`RESUMED_WITHIN`].
async fn await_resumed(events: &mut mpsc::Receiver<PeerEvent>, c: &Counters) -> Result<u64, Lost> {
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
        match tokio::time::timeout(Duration::from_secs(1), events.recv()).await {
            Err(_) => continue,
            Ok(Some(PeerEvent::Msg(Message::Resumed { resumed_unix_us }))) => {
                return Ok(resumed_unix_us)
            }
            Ok(Some(PeerEvent::Msg(Message::ReturnPath(_) | Message::Applied { .. }))) => continue,
            Ok(Some(PeerEvent::Msg(Message::Abort { code, message }))) => {
                return Err(Lost::Discarded { code, message })
            }
            Ok(Some(PeerEvent::Msg(msg))) => {
                return Err(Lost::Unknown(format!(
                    "got {} instead of Resumed",
                    msg.name()
                )))
            }
            Ok(Some(PeerEvent::Failed(e))) => return Err(Lost::Unknown(error_chain(&e))),
            Ok(Some(PeerEvent::Broken(why))) => return Err(Lost::Unknown(why)),
            Ok(Some(PeerEvent::Closed)) | Ok(None) => {
                return Err(Lost::Unknown("connection closed".to_string()))
            }
        }
    }
}

/// After a lost Resumed: asks the destination agent, on a new connection, what became of
/// this migration (retrying while it is still in progress or unreachable, ~30 s).
pub(super) async fn ask_destination(
    m: &Migration,
    why: &str,
) -> Result<(MigrationState, u64), MigrateError> {
    tracing::warn!(migration = %m.handle.id, %why, "no Resumed after Commit: asking the destination");
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut last = why.to_string();
    while Instant::now() < deadline {
        match super::query_destination(m).await {
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

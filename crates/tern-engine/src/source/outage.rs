//! Phase `WaitingForLink`: a try that lost the link to the destination before the
//! switchover does not end the migration. The try is given up the usual way (the
//! destination told if it can hear, QEMU's migration cancelled, the VM running here), then
//! tern asks the destination every [`ASK_EVERY`] what became of the try (Query, on a new
//! mutually authenticated connection): once it answers that the try is gone, the next try
//! starts from Connect. What the destination received stays in its page store, so the
//! next try sends those pages as references. Past `outage_wait_s` the migration fails
//! with the error that lost the link, as it would without waiting.

use std::time::{Duration, Instant};

use tern_api::LinkOutage;
use tern_proto::{ErrorCode, MigrationState};

use super::{MigrateError, Migration};
use crate::handle::{wait_cancelled, Phase};
use crate::transport::conn::RecvError;

/// How often the destination is asked while the link is down.
const ASK_EVERY: Duration = Duration::from_secs(2);
/// The most tries one migration makes (a link that drops each try does not loop).
pub(super) const MAX_TRIES: u32 = 8;

/// Whether `e` is the link going away, which another try may get past: a connection
/// that went silent (the keepalive or a bounded wait ran out, either side) or a network
/// the kernel says is unreachable. Not a closed or reset connection (the destination agent
/// ended it: a crash, or a peer that means it), a refusal, a bad stream, a security
/// failure or the operator's cancel: those fail at once, as before.
pub(super) fn lost_link(e: &MigrateError) -> bool {
    let unreachable = |e: &std::io::Error| {
        matches!(
            e.kind(),
            std::io::ErrorKind::HostUnreachable | std::io::ErrorKind::NetworkUnreachable
        )
    };
    match e {
        MigrateError::Peer(RecvError::Io(e)) | MigrateError::PeerWrite(e) if unreachable(e) => true,
        // also the destination's Abort when it gave up on a silent link first and its word
        // still came through (a Remote error's code is the destination's)
        e => e.code() == ErrorCode::Timeout,
    }
}

/// Waits until the destination answers and holds nothing of the last try, which failed
/// with `cause`. Err(None) when `left` ran out, Err(Some) for another reason to stop (the
/// operator's cancel).
pub(super) async fn wait_for_link(
    m: &Migration,
    cause: &str,
    left: Duration,
) -> Result<LinkOutage, Option<MigrateError>> {
    let since = Instant::now();
    tracing::warn!(migration = %m.handle.id, try_id = %m.wire_id(), %cause, wait_s = left.as_secs(), "lost the link to the destination: waiting for it");
    m.handle.set_phase(Phase::WaitingForLink);
    let mut cancel = m.handle.cancelled();
    let until = since + left;
    loop {
        let answer = tokio::select! {
            a = super::connect::query_once(m) => a,
            _ = wait_cancelled(&mut cancel) => return Err(Some(MigrateError::Cancelled)),
        };
        match answer {
            // gone there (or never arrived): go on
            Ok((MigrationState::Discarded | MigrationState::Unknown, _)) => break,
            // the destination still holds the try: it gives up on its own within its
            // stall timeout
            Ok((MigrationState::InProgress, _)) => {}
            Ok((MigrationState::Running, _)) => {
                // cannot be before a commit; never run the VM twice
                return Err(Some(MigrateError::Protocol(
                    "the destination says a try that never switched over runs there".into(),
                )));
            }
            Err(e) => {
                tracing::debug!(migration = %m.handle.id, "the destination does not answer yet: {}", crate::error::error_chain(&e))
            }
        }
        let now = Instant::now();
        if now >= until {
            return Err(None);
        }
        tokio::select! {
            _ = tokio::time::sleep(ASK_EVERY.min(until - now)) => {}
            _ = wait_cancelled(&mut cancel) => return Err(Some(MigrateError::Cancelled)),
        }
    }
    let waited = since.elapsed();
    tracing::info!(migration = %m.handle.id, waited_ms = waited.as_millis() as u64, "the destination answers again: going on");
    Ok(LinkOutage {
        lost_at_ms: since.duration_since(m.t0).as_millis() as u64,
        waited_ms: waited.as_millis() as u64,
        cause: cause.to_string(),
        wire_bytes_before: m.handle.status().progress.bytes_on_wire,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Error, ErrorKind};

    #[test]
    fn only_a_silent_or_unreachable_link_is_waited_for() {
        let io = |k: ErrorKind| Error::new(k, "x");
        for e in [
            MigrateError::PeerWrite(io(ErrorKind::TimedOut)),
            MigrateError::Peer(RecvError::Io(io(ErrorKind::TimedOut))),
            MigrateError::Peer(RecvError::Io(io(ErrorKind::HostUnreachable))),
            MigrateError::Timeout(Duration::from_secs(20), "Prepared"),
            MigrateError::Remote {
                code: ErrorCode::Timeout,
                message: "no data for 20 s".into(),
            },
        ] {
            assert!(lost_link(&e), "{e:?}");
        }
        for e in [
            // the agent closed it: a crash, or a peer that means it
            MigrateError::PeerClosed("Transfer"),
            MigrateError::PeerWrite(io(ErrorKind::ConnectionReset)),
            MigrateError::Remote {
                code: ErrorCode::QemuFailed,
                message: "its QEMU died".into(),
            },
            MigrateError::Protocol("Pages before Prepared".into()),
            MigrateError::Cancelled,
            MigrateError::NotConverging("stalled".into()),
        ] {
            assert!(!lost_link(&e), "{e:?}");
        }
    }
}

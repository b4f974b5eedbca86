//! Phase `Verify`: the digest of what this side wrote to its QEMU equals the source's,
//! QEMU loaded the whole stream, the disks' last rounds are written and handed to the guest
//! (no NBD export may stay on a running guest's disk); then the source's decision: given
//! with SourceDone (v2), or asked for with ReadyToResume (v1). Post-copy: the VM already
//! runs here (claimed at POSTCOPY_RUN); a digest mismatch is reported, not refused.

use std::time::Duration;

use tern_proto::{Blocktime, ErrorCode, Message};
use tern_qemu::qmp::{MigrationInfo, QmpClient};

use super::prepare::Prepared;
use super::transfer::Received;
use super::{qmp_failed, refuse, Conn, Incoming, IncomingError};
use crate::fault::fault;
use crate::handle::Phase;

pub(super) async fn run(
    inc: &mut Incoming,
    conn: &mut Conn,
    p: &mut Prepared,
    r: &mut Received,
) -> Result<(), IncomingError> {
    let ours = digests_agree(p, r)?;
    r.digest_ok = ours == r.source_digest;
    let qmp = p.qmp()?;
    let Some(events) = p.qemu_events.as_mut() else {
        return Err(IncomingError::Qemu("tern's QEMU without its events".into()));
    };
    let done = wait_incoming_done(&qmp, events, Duration::from_secs(30)).await?;
    if fault!(inc.engine.config.fault, SlowFinish) {
        tracing::warn!("fault injection: finishing 35 s late");
        tokio::time::sleep(Duration::from_secs(35)).await;
    }
    // every disk's last round was read (the transfer waits for it) and queued before
    // Finish, so the worker has written and flushed it: NBD goes, then the guest may run
    if let Some(d) = p.disks.take() {
        let written = d
            .finish(&qmp)
            .await
            .map_err(|e| IncomingError::Qemu(format!("cannot hand the disks to the guest: {e}")))?;
        tracing::info!(migration = %p.id, written, "disks rebuilt");
        if fault!(inc.engine.config.fault, DiskCopyAtSwitchover) {
            for d in &p.spec.disks {
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
    if r.claimed.is_some() && p.version >= 12 {
        // post-copy: what the guest's page faults cost it, for the source's report
        let faults = faults_message(r, &done, p.version);
        tracing::info!(migration = %p.id, ?faults, "post-copy's page faults");
        conn.send(&faults).await?;
    }
    // the source's decision: given with SourceDone (v2), or asked for (v1)
    if !r.early_commit {
        conn.send(&Message::ReadyToResume { digest: ours }).await?;
        match conn.next(Duration::from_secs(60), "Commit").await? {
            Message::Commit => {}
            m => {
                return Err(refuse(
                    ErrorCode::Protocol,
                    format!("expected Commit, got {}", m.name()),
                ))
            }
        }
    }
    Ok(())
}

/// Phase `Verify` begins: the digest of what this side wrote to its QEMU must equal the
/// source's. This migration's pages stay in the store, unpinned. Post-copy: the VM has
/// run here since POSTCOPY_RUN, nothing can be refused any more: a mismatch is logged
/// and reported (`digest_ok` false), and this digest returned.
pub(super) fn digests_agree(p: &mut Prepared, r: &Received) -> Result<[u8; 32], IncomingError> {
    p.handle.set_phase(Phase::Verify);
    let ours = r.digest.as_ref().map(|d| d.finish()).unwrap_or([0; 32]);
    p.pages.release();
    if ours != r.source_digest {
        let message = format!(
            "memory digest mismatch: source {}, destination {}",
            hex::encode(r.source_digest),
            hex::encode(ours)
        );
        if r.claimed.is_some() {
            tracing::error!(migration = %p.id, "{message}: the VM runs here since post-copy began (reported as digest_ok false)");
            return Ok(ours);
        }
        return Err(refuse(ErrorCode::DigestMismatch, message));
    }
    Ok(ours)
}

/// [`Message::PostcopyFaults`]: the relay's count of QEMU's page requests, and QEMU's
/// blocktime from its `query-migrate` once it completed (if it measured it); the pages
/// served from this host's store only to a v13 source (an older one refuses the field).
fn faults_message(r: &Received, done: &MigrationInfo, version: u16) -> Message {
    use std::sync::atomic::Ordering;
    Message::PostcopyFaults {
        requests: r.faults.requests.load(Ordering::Relaxed),
        pages: r.faults.pages.load(Ordering::Relaxed),
        local: if version >= 13 {
            r.faults.local.load(Ordering::Relaxed)
        } else {
            0
        },
        blocktime: done.postcopy_blocktime_ms.map(|all| Blocktime {
            all_vcpus_ms: all,
            max_vcpu_ms: done
                .postcopy_vcpu_blocktime_ms
                .as_ref()
                .and_then(|v| v.iter().max().copied())
                .unwrap_or(all),
        }),
    }
}

/// Waits until the destination QEMU has loaded the whole stream; its last `query-migrate`.
async fn wait_incoming_done(
    qmp: &QmpClient,
    events: &mut tokio::sync::broadcast::Receiver<tern_qemu::qmp::QmpEvent>,
    within: Duration,
) -> Result<MigrationInfo, IncomingError> {
    let deadline = tokio::time::Instant::now() + within;
    loop {
        let info = qmp
            .query_migrate()
            .await
            .map_err(qmp_failed("query-migrate"))?;
        match info.status.as_str() {
            "completed" => return Ok(info),
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

//! Phases `Verify` and `Switchover` of a carried libvirt migration on the destination.
//! libvirt runs the destination QEMU and resumes it; tern's part is the stream's content.
//! The destination QEMU loads the whole stream and says SHUT on its return path; the source
//! agent holds that SHUT back from the source QEMU (which cannot complete without it) and
//! ends the stream there (SourceDone, with its digest). Here the digest of what was
//! written to QEMU must equal the source's: then Resumed, the source QEMU gets its SHUT and
//! completes, and libvirt finishes the migration. A mismatch, or any failure before, ends
//! with Abort instead: the source closes its QEMU's socket without SHUT, its migration
//! fails, and libvirt keeps the domain running at the source (and discards this QEMU).

use std::sync::atomic::Ordering;
use std::time::SystemTime;

use tern_proto::{ErrorCode, Message};

use super::prepare::Prepared;
use super::transfer::Received;
use super::{refuse, send, Conn, Incoming, IncomingError};
use crate::handle::{page_counts, unix_us, Counters, MigrationReport, Phase};

pub(super) async fn finish(
    inc: &mut Incoming,
    conn: &mut Conn,
    mut p: Prepared,
    r: Received,
) -> Result<(), IncomingError> {
    let handle = p.handle.clone();
    handle.set_phase(Phase::Verify);
    let ours = r.digest.as_ref().map(|d| d.finish()).unwrap_or([0; 32]);
    p.pages.release();
    if ours != r.source_digest {
        return Err(refuse(
            ErrorCode::DigestMismatch,
            format!(
                "memory digest mismatch: source {}, destination {}",
                hex::encode(r.source_digest),
                hex::encode(ours)
            ),
        ));
    }
    if !r.early_commit {
        return Err(refuse(
            ErrorCode::Protocol,
            "SourceDone without the commit in a carried migration",
        ));
    }
    // the source ends the stream only on this SHUT, relayed after the flag went up
    if !r.shut.load(Ordering::SeqCst) {
        return Err(refuse(
            ErrorCode::Protocol,
            "the source ended the stream before the destination QEMU said it loaded it (SHUT)",
        ));
    }
    handle.set_phase(Phase::Switchover);
    let loaded_at = unix_us(SystemTime::now());
    tracing::info!(migration = %p.id, "the destination QEMU loaded the stream and the digests agree: libvirt finishes the migration");
    let _ = send(
        &conn.writer,
        &Message::Resumed {
            resumed_unix_us: loaded_at,
        },
    )
    .await;
    let c = &handle.counters;
    let wire_out = conn.writer.lock().await.bytes_written;
    handle.finish_ok(MigrationReport {
        migration_id: p.id,
        vm: handle.vm.clone(),
        source: handle.peer.clone(),
        destination: inc.engine.config.name.clone(),
        outcome: "succeeded".into(),
        total_time_ms: handle.started.elapsed().as_millis() as u64,
        bytes_on_wire: Counters::get(&c.wire_in) + Counters::get(&c.wire_data) + wire_out,
        pages: page_counts(c),
        digest_ok: true,
        digest: hex::encode(r.source_digest),
        source_was_running: p.source_running,
        protocol_version: p.version,
        resumed_unix_us: loaded_at,
        ..Default::default()
    });
    inc.handle = None;
    Ok(())
}

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
use crate::handle::{unix_us, Phase};

pub(super) async fn finish(
    inc: &mut Incoming,
    conn: &mut Conn,
    mut p: Prepared,
    r: Received,
) -> Result<(), IncomingError> {
    let digest = super::verify::digests_agree(&mut p, &r)?;
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
    p.handle.set_phase(Phase::Switchover);
    let loaded_at = unix_us(SystemTime::now());
    tracing::info!(migration = %p.id, "the destination QEMU loaded the stream and the digests agree: libvirt finishes the migration");
    let _ = send(
        &conn.writer,
        &Message::Resumed {
            resumed_unix_us: loaded_at,
        },
    )
    .await;
    super::switchover::succeeded(inc, conn, &p, digest, true, loaded_at).await;
    Ok(())
}

//! The reader of the destination's frames on the control connection, for the whole
//! migration: return-path bytes go straight into the source QEMU's socket (no buffering:
//! PONG and SHUT must not wait), Applied feeds flow control, a Want is answered at once
//! (only with content of this migration), disk replies go to the disk rounds (a bounded
//! inbox), everything else to the phase that waits for it ([`PeerEvent`]).
//!
//! A libvirt domain's migration (carried) holds one return-path message back: the
//! destination QEMU's SHUT(0), which says it loaded the whole stream. Without it the source
//! QEMU neither completes nor closes the stream, so its arrival is where tern ends the
//! stream (the `shut_gate` fires; the forwarder sends SourceDone), and the source QEMU
//! gets it only once the destination answered Resumed (the digests agreed). Otherwise
//! it never gets it: its migration fails and libvirt keeps the domain here.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use tern_proto::Message;
use tern_qemu::rp::{parse_rp, RpMessage};
use tokio::io::AsyncWriteExt;
use tokio::net::unix;
use tokio::sync::mpsc;

use super::{unexpected, MigrateError};
use crate::handle::{Counters, MigrationHandle};
use crate::pages::{answer_want, Offered, SharedStore};
use crate::transport::conn::{FrameReader, RecvError};
use crate::transport::flow::Flow;
use crate::transport::links::PeerWriter;
use crate::transport::tls::PeerRead;

/// Control messages from the destination, as the peer reader passes them on.
pub(super) enum PeerEvent {
    Msg(Message),
    Closed,
    Failed(RecvError),
    /// The exchange cannot go on (the message says why).
    Broken(String),
}

/// The error a control event means while the source waits for something else.
pub(super) fn peer_event_error(ev: Option<PeerEvent>, during: &'static str) -> MigrateError {
    match ev {
        Some(PeerEvent::Msg(Message::Abort { code, message })) => {
            MigrateError::Remote { code, message }
        }
        Some(PeerEvent::Msg(m)) => unexpected(&m, during),
        Some(PeerEvent::Failed(e)) => MigrateError::Peer(e),
        Some(PeerEvent::Broken(m)) => MigrateError::Protocol(m),
        Some(PeerEvent::Closed) | None => MigrateError::PeerClosed(during),
    }
}

/// Reads the destination's frames: return-path bytes go straight into the source QEMU's
/// socket (no buffering: PONG and SHUT must not wait), a Want is answered from the page
/// store at once, everything else goes to the orchestrator.
#[allow(clippy::too_many_arguments)]
pub(super) async fn peer_reader(
    mut reader: FrameReader<PeerRead>,
    (qemu_rx, mut shut_gate): (
        tokio::sync::oneshot::Receiver<unix::OwnedWriteHalf>,
        Option<tokio::sync::oneshot::Sender<()>>,
    ),
    tx: mpsc::Sender<PeerEvent>,
    disk_tx: mpsc::Sender<Message>,
    handle: Arc<MigrationHandle>,
    writer: PeerWriter,
    (store, offered): (SharedStore, Offered),
    flow: Option<Arc<Flow>>,
) {
    let mut qemu = ReturnPathOut {
        rx: qemu_rx,
        w: None,
        ok: true,
    };
    let mut held_shut: Option<bytes::Bytes> = None;
    loop {
        let r = reader.next().await;
        handle
            .counters
            .wire_in
            .store(reader.bytes_read, Ordering::Relaxed);
        let ev = match r {
            Ok(Some(Message::ReturnPath(b)))
                if shut_gate.is_some()
                    && matches!(parse_rp(&b), Ok(Some((RpMessage::Shut(0), n))) if n == b.len()) =>
            {
                held_shut = Some(b);
                if let Some(g) = shut_gate.take() {
                    let _ = g.send(());
                }
                continue;
            }
            Ok(Some(Message::Resumed { resumed_unix_us })) if held_shut.is_some() => {
                // the digests agreed: the source QEMU may complete now
                if let Some(b) = held_shut.take() {
                    qemu.write(&b).await;
                }
                PeerEvent::Msg(Message::Resumed { resumed_unix_us })
            }
            Ok(Some(Message::ReturnPath(b))) => {
                qemu.write(&b).await;
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

/// Where the return path goes: the source QEMU's socket, once QEMU connected to us.
struct ReturnPathOut {
    rx: tokio::sync::oneshot::Receiver<unix::OwnedWriteHalf>,
    w: Option<unix::OwnedWriteHalf>,
    /// False once the socket is gone or closed.
    ok: bool,
}

impl ReturnPathOut {
    async fn write(&mut self, b: &[u8]) {
        if self.w.is_none() && self.ok {
            // the return path starts after QEMU connected to us
            match (&mut self.rx).await {
                Ok(q) => self.w = Some(q),
                Err(_) => self.ok = false,
            }
        }
        let Some(q) = self.w.as_mut() else { return };
        if self.ok && q.write_all(b).await.is_err() {
            // QEMU closed its end (done or failed): its own status tells which.
            self.ok = false;
        }
    }
}

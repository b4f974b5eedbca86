//! The destination QEMU's return path (PONG, SHUT, page requests, ...), relayed to the
//! source agent one message per frame, flushed at once: the source QEMU waits for them.
//! Post-copy's page requests are counted on the way ([`Faults`]).

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use parking_lot::Mutex;

use tern_proto::Message;
use tern_qemu::rp::{parse_rp, RpMessage};
use tokio::io::AsyncReadExt;
use tokio::net::unix;

use tern_proto::limits;

use crate::transport::links::PeerWriter;

/// Why the relay stopped without QEMU's SHUT(0).
#[derive(Debug, thiserror::Error)]
pub(super) enum RelayError {
    /// QEMU's side: it failed, closed early, or wrote junk.
    #[error("{0}")]
    Qemu(String),
    /// The source agent's side: the relay could not send to it (post-copy may go on on a
    /// new connection).
    #[error("relaying its return path failed")]
    Peer(#[source] std::io::Error),
}

/// Post-copy's page requests the destination QEMU sent (its guest touched a page it did
/// not have yet), across the connections of one migration, and how many of the pages
/// they asked for came from this host's page store.
#[derive(Debug, Default)]
pub(super) struct Faults {
    pub requests: AtomicU64,
    /// Pages the requests asked for (target pages of [`limits::PAGE_SIZE`]).
    pub pages: AtomicU64,
    /// Asked-for pages whose first arrival after the request was a reference this host
    /// resolved from its store (their bytes did not cross the link).
    pub local: AtomicU64,
    asked: Mutex<Asked>,
}

/// The pages asked for that have not arrived yet (bounded: past [`Asked::MAX`] the
/// count of local pages is a lower bound).
#[derive(Debug, Default)]
struct Asked {
    /// The stream's RAM blocks, by the index page records use.
    blocks: Vec<String>,
    /// The block of the last request that named one (a request without a name is for it).
    last: Option<u16>,
    pages: HashSet<(u16, u64)>,
}

impl Asked {
    const MAX: usize = 1 << 20;
}

impl Faults {
    /// The stream's RAM blocks (from RamBlocks), in the order page records number them.
    pub fn set_blocks(&self, names: impl IntoIterator<Item = String>) {
        self.asked.lock().blocks = names.into_iter().collect();
    }

    fn count(&self, msg: &RpMessage) {
        let (offset, len) = match msg {
            RpMessage::ReqPagesId { offset, len, block } => {
                let mut a = self.asked.lock();
                a.last = a.blocks.iter().position(|b| b == block).map(|i| i as u16);
                (*offset, *len)
            }
            RpMessage::ReqPages { offset, len } => (*offset, *len),
            _ => return,
        };
        let pages = u64::from(len).div_ceil(limits::PAGE_SIZE);
        self.requests.fetch_add(1, Ordering::Relaxed);
        self.pages.fetch_add(pages, Ordering::Relaxed);
        let mut a = self.asked.lock();
        if let Some(b) = a.last {
            let first = offset / limits::PAGE_SIZE;
            for p in first..first + pages {
                if a.pages.len() >= Asked::MAX {
                    break;
                }
                a.pages.insert((b, p));
            }
        }
    }

    /// `pages` pages of `block` from `offset` arrived; `local`: as a reference this host
    /// resolved from its store. Counts the asked-for ones among them.
    pub fn arrived(&self, block: u16, offset: u64, pages: u64, local: bool) {
        let mut a = self.asked.lock();
        if a.pages.is_empty() {
            return;
        }
        let first = offset / limits::PAGE_SIZE;
        if pages == 1 {
            if a.pages.remove(&(block, first)) && local {
                self.local.fetch_add(1, Ordering::Relaxed);
            }
        } else if (pages as usize) < a.pages.len() {
            // a zero run: never local
            for p in first..first + pages {
                a.pages.remove(&(block, p));
            }
        } else {
            a.pages
                .retain(|&(b, p)| b != block || p < first || p >= first + pages);
        }
    }
}

/// Relays the destination QEMU's return path to the source agent, one message per frame,
/// flushed at once. Returns Ok(true) if QEMU said SHUT(0) before closing, an error text if
/// QEMU closed without SHUT (it died or failed), or the source agent could not be sent to. `shut` is raised just before a SHUT(0) is
/// relayed: QEMU loaded the whole stream.
pub(super) async fn return_path(
    mut qemu: unix::OwnedReadHalf,
    writer: PeerWriter,
    shut: Arc<AtomicBool>,
    faults: Arc<Faults>,
) -> Result<bool, RelayError> {
    let mut buf = bytes::BytesMut::with_capacity(64 << 10);
    let mut shut_ok = false;
    loop {
        loop {
            match parse_rp(&buf) {
                Ok(Some((msg, used))) => {
                    let raw = buf.split_to(used).freeze();
                    faults.count(&msg);
                    if let RpMessage::Shut(status) = msg {
                        shut_ok = status == 0;
                        shut.store(shut_ok, Ordering::SeqCst);
                        if status != 0 {
                            let _ = writer.lock().await.send(&Message::ReturnPath(raw)).await;
                            return Err(RelayError::Qemu(format!(
                                "it reported a failed load (SHUT {status})"
                            )));
                        }
                    }
                    writer
                        .lock()
                        .await
                        .send(&Message::ReturnPath(raw))
                        .await
                        .map_err(RelayError::Peer)?;
                }
                Ok(None) => break,
                Err(e) => {
                    return Err(RelayError::Qemu(format!(
                        "its return path is malformed: {e}"
                    )))
                }
            }
        }
        match qemu.read_buf(&mut buf).await {
            Ok(0) if shut_ok => return Ok(true),
            Ok(0) => {
                return Err(RelayError::Qemu(
                    "it closed the migration socket without finishing (exited?)".into(),
                ))
            }
            Ok(_) => {}
            Err(e) if shut_ok => {
                tracing::debug!("return path after SHUT: {e}");
                return Ok(true);
            }
            Err(e) => {
                return Err(RelayError::Qemu(format!(
                    "reading its return path failed: {e}"
                )))
            }
        }
    }
}

pub(super) struct AbortOnDrop(pub(super) Option<tokio::task::JoinHandle<Result<bool, RelayError>>>);

impl AbortOnDrop {
    pub(super) async fn join(
        &mut self,
    ) -> Result<Result<bool, RelayError>, tokio::task::JoinError> {
        match self.0.as_mut() {
            Some(h) => {
                let r = h.await;
                self.0 = None;
                r
            }
            None => std::future::pending().await,
        }
    }
    pub(super) fn abort(&mut self) {
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

/// Sends `Applied{units}` (unchanged: no new stream) every
/// [`limits::KEEPALIVE_INTERVAL`] until dropped.
pub(super) fn keepalive(writer: PeerWriter, units: u64) -> AbortOnDropTask {
    AbortOnDropTask(crate::spawn(async move {
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

pub(super) struct AbortOnDropTask(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDropTask {
    fn drop(&mut self) {
        self.0.abort();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn page_requests_are_counted_with_their_pages_and_nothing_else_is() {
        let f = Faults::default();
        f.count(&RpMessage::ReqPagesId {
            offset: 0,
            len: 4096,
            block: "pc.ram".into(),
        });
        // a request for a huge page's worth counts its target pages; a part page is one
        f.count(&RpMessage::ReqPages {
            offset: 8192,
            len: 3 * 4096,
        });
        f.count(&RpMessage::ReqPages {
            offset: 65536,
            len: 100,
        });
        f.count(&RpMessage::Shut(0));
        f.count(&RpMessage::Pong(7));
        f.count(&RpMessage::ResumeAck(1));
        assert_eq!(f.requests.load(Ordering::Relaxed), 3);
        assert_eq!(f.pages.load(Ordering::Relaxed), 5);
    }

    #[test]
    fn asked_pages_that_came_from_the_store_are_counted_once() {
        let f = Faults::default();
        f.set_blocks(["pc.ram".to_string(), "vga.vram".to_string()]);
        f.count(&RpMessage::ReqPagesId {
            offset: 0,
            len: 2 * 4096,
            block: "vga.vram".into(),
        });
        // the same block again, without its name
        f.count(&RpMessage::ReqPages {
            offset: 10 * 4096,
            len: 4096,
        });
        // a block the stream never named: counted as a request, not tracked
        f.count(&RpMessage::ReqPagesId {
            offset: 0,
            len: 4096,
            block: "other".into(),
        });
        f.arrived(0, 0, 1, true); // pc.ram's page 0 was not asked for
        f.arrived(1, 0, 1, true); // asked, from the store
        f.arrived(1, 0, 1, true); // again: already arrived
        f.arrived(1, 4096, 1, false); // asked, its bytes came
        f.arrived(1, 4096, 1, true);
        f.arrived(1, 8 * 4096, 4, false); // a zero run covering page 10
        f.arrived(1, 10 * 4096, 1, true);
        assert_eq!(f.local.load(Ordering::Relaxed), 1);
        assert_eq!(f.requests.load(Ordering::Relaxed), 3);
        assert!(f.asked.lock().pages.is_empty());
    }
}

//! Recording an outgoing migration's stream as it passes: every byte the source QEMU
//! sends (every round of pages, then the device state at the switchover) goes on to the
//! destination as always, and a copy of each read chunk (the same `Bytes`, no copy) to a
//! writer thread that appends it to a file. Replayed into a QEMU started with `-incoming`,
//! the file is the VM as it was at the switchover: the daemon keeps it as the VM's
//! departure snapshot.
//!
//! The recording never slows or fails the migration: the writer is fed through a bounded
//! queue, and when that is full (the disk fell behind), a write fails or the file would pass
//! its size limit, the recording gives up (one warning, its file deleted) and the
//! migration goes on. Each try of a migration records afresh (into a file of its own,
//! renamed to [`StreamRecording::path`] once its stream ended properly and is on disk).
//!
//! Owns the tee and the file; must not know what the daemon does with it (where snapshots
//! live, how they are kept or restarted).

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use parking_lot::Mutex;
use tokio::sync::{mpsc, watch};

/// Chunks that may wait for the writer (QEMU's reads are at most a few hundred KiB).
const QUEUE_CHUNKS: usize = 256;
/// Bytes that may wait for the writer; more and the recording gives up.
pub const QUEUE_BYTES: u64 = 64 << 20;

/// What became of a recording (its last try's).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RecordState {
    /// Nothing recorded yet (the migration did not reach its transfer).
    Idle,
    /// A try records, or its writer still finishes the file.
    Writing,
    /// The last try's stream ended properly and is all in [`StreamRecording::path`],
    /// synced to disk.
    Complete {
        bytes: u64,
        /// When the stream ended (the switchover: the VM's state is as of then).
        ended_unix_ms: u64,
    },
    /// The recording gave up (why); nothing of it is left on disk.
    GaveUp(String),
}

/// A migration's recording, as the daemon asks for it (a file and a size limit) and reads
/// what became of it once the migration ended.
#[derive(Debug)]
pub struct StreamRecording {
    path: PathBuf,
    limit_bytes: u64,
    /// Which try records now (a finished try's writer only reports for its own).
    generation: AtomicU64,
    state: watch::Sender<RecordState>,
}

impl StreamRecording {
    /// Records into `path` (its directory exists), giving up past `limit_bytes`.
    pub fn new(path: PathBuf, limit_bytes: u64) -> Arc<StreamRecording> {
        Arc::new(StreamRecording {
            path,
            limit_bytes,
            generation: AtomicU64::new(0),
            state: watch::channel(RecordState::Idle).0,
        })
    }

    /// Where a complete recording is.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// What became of it now.
    pub fn state(&self) -> RecordState {
        self.state.borrow().clone()
    }

    /// What became of it once no writer works on it any more (waiting at most `within`;
    /// still [`RecordState::Writing`] then).
    pub async fn settled(&self, within: Duration) -> RecordState {
        let mut rx = self.state.subscribe();
        let _ =
            tokio::time::timeout(within, rx.wait_for(|s| !matches!(s, RecordState::Writing))).await;
        let s = rx.borrow().clone();
        s
    }

    /// Sets the state if `generation` is still the try that records.
    fn report(&self, generation: u64, state: RecordState) {
        self.state.send_if_modified(|s| {
            if self.generation.load(Ordering::SeqCst) != generation {
                return false;
            }
            *s = state;
            true
        });
    }

    /// A new try records from its first byte (a previous try's file is dropped).
    pub(crate) fn start(self: &Arc<Self>) -> Recorder {
        let generation = self.generation.fetch_add(1, Ordering::SeqCst) + 1;
        self.state.send_replace(RecordState::Writing);
        let part = {
            let mut p = self.path.clone().into_os_string();
            p.push(format!(".part{generation}"));
            PathBuf::from(p)
        };
        let (tx, rx) = mpsc::channel(QUEUE_CHUNKS);
        let shared = Arc::new(Shared {
            queued: AtomicU64::new(0),
            end: Mutex::new(None),
        });
        let rec = self.clone();
        let s = shared.clone();
        // The writer's lines belong to the migration that records (its id and VM).
        let span = tracing::Span::current();
        std::thread::Builder::new()
            .name("tern-record".into())
            .spawn(move || span.in_scope(|| writer(rx, part, rec, generation, s)))
            .map(|_| Recorder {
                tx: Some(tx),
                bytes: 0,
                limit: self.limit_bytes,
                shared,
            })
            .unwrap_or_else(|e| {
                self.report(
                    generation,
                    RecordState::GaveUp(format!("cannot start its writer: {e}")),
                );
                Recorder {
                    tx: None,
                    bytes: 0,
                    limit: 0,
                    shared: Arc::new(Shared {
                        queued: AtomicU64::new(0),
                        end: Mutex::new(None),
                    }),
                }
            })
    }
}

/// How a try's recording ended, told to its writer.
#[derive(Debug)]
enum End {
    /// The stream ended properly at this time.
    Complete {
        ended_unix_ms: u64,
    },
    GaveUp(String),
}

#[derive(Debug)]
struct Shared {
    /// Bytes handed to the writer and not yet written.
    queued: AtomicU64,
    /// Set before the channel closes; none: the try failed.
    end: Mutex<Option<End>>,
}

/// One try's tee, in the forwarder: each chunk read from QEMU goes in; gives up rather
/// than wait.
#[derive(Debug)]
pub(crate) struct Recorder {
    tx: Option<mpsc::Sender<Bytes>>,
    bytes: u64,
    limit: u64,
    shared: Arc<Shared>,
}

impl Recorder {
    /// Hands `chunk` (the next bytes of the stream) to the writer.
    pub(crate) fn tee(&mut self, chunk: Bytes) {
        let Some(tx) = &self.tx else { return };
        let n = chunk.len() as u64;
        if self.bytes + n > self.limit {
            return self.give_up(format!(
                "the stream passed the size limit of {} MiB",
                self.limit >> 20
            ));
        }
        if self.shared.queued.load(Ordering::SeqCst) + n > QUEUE_BYTES {
            return self.give_up(format!(
                "writing it to disk fell {} MiB behind the migration",
                QUEUE_BYTES >> 20
            ));
        }
        self.shared.queued.fetch_add(n, Ordering::SeqCst);
        match tx.try_send(chunk) {
            Ok(()) => self.bytes += n,
            Err(mpsc::error::TrySendError::Full(_)) => {
                self.give_up("writing it to disk fell behind the migration".into())
            }
            // the writer stopped (a write failed; it said so)
            Err(mpsc::error::TrySendError::Closed(_)) => self.tx = None,
        }
    }

    fn give_up(&mut self, why: String) {
        tracing::warn!(
            bytes = self.bytes,
            "not recording the stream any more: {why}"
        );
        *self.shared.end.lock() = Some(End::GaveUp(why));
        self.tx = None;
    }

    /// The stream ended properly: the writer finishes the file (in the background).
    pub(crate) fn finish(mut self) {
        if self.tx.is_some() {
            let ended_unix_ms = SystemTime::now()
                .duration_since(SystemTime::UNIX_EPOCH)
                .map_or(0, |d| d.as_millis() as u64);
            *self.shared.end.lock() = Some(End::Complete { ended_unix_ms });
            self.tx = None;
        }
    }

    /// Bytes recorded so far.
    #[cfg(test)]
    pub(crate) fn bytes(&self) -> u64 {
        self.bytes
    }

    /// Still recording.
    #[cfg(test)]
    pub(crate) fn recording(&self) -> bool {
        self.tx.is_some()
    }
}

/// The writer thread: appends what comes to `part`; at the end, a complete recording is
/// synced and renamed to its path, anything else deleted.
fn writer(
    mut rx: mpsc::Receiver<Bytes>,
    part: PathBuf,
    rec: Arc<StreamRecording>,
    generation: u64,
    shared: Arc<Shared>,
) {
    let open = || {
        use std::os::unix::fs::OpenOptionsExt;
        std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&part)
    };
    let fail = |what: String| {
        tracing::warn!(file = %part.display(), "not recording the stream any more: {what}");
        let _ = std::fs::remove_file(&part);
        rec.report(generation, RecordState::GaveUp(what));
    };
    let mut file = match open() {
        Ok(f) => f,
        Err(e) => {
            drop(rx);
            return fail(format!("cannot create {}: {e}", part.display()));
        }
    };
    let mut bytes = 0u64;
    while let Some(chunk) = rx.blocking_recv() {
        let n = chunk.len() as u64;
        if let Err(e) = file.write_all(&chunk) {
            drop(rx);
            return fail(format!("cannot write {}: {e}", part.display()));
        }
        bytes += n;
        shared.queued.fetch_sub(n, Ordering::SeqCst);
    }
    let end = shared.end.lock().take();
    match end {
        Some(End::Complete { ended_unix_ms }) => {
            if let Err(e) = file.sync_all() {
                return fail(format!("cannot sync {}: {e}", part.display()));
            }
            drop(file);
            if let Err(e) = std::fs::rename(&part, &rec.path) {
                return fail(format!("cannot rename it to {}: {e}", rec.path.display()));
            }
            tracing::info!(file = %rec.path.display(), bytes, "recorded the stream");
            rec.report(
                generation,
                RecordState::Complete {
                    bytes,
                    ended_unix_ms,
                },
            );
        }
        Some(End::GaveUp(why)) => {
            drop(file);
            let _ = std::fs::remove_file(&part);
            rec.report(generation, RecordState::GaveUp(why));
        }
        None => {
            drop(file);
            let _ = std::fs::remove_file(&part);
            rec.report(
                generation,
                RecordState::GaveUp("the stream did not end properly (the try failed)".into()),
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chunk(n: usize, b: u8) -> Bytes {
        Bytes::from(vec![b; n])
    }

    #[tokio::test]
    async fn a_complete_stream_is_the_bytes_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let rec = StreamRecording::new(dir.path().join("stream"), 1 << 20);
        let mut r = rec.start();
        r.tee(chunk(1000, 1));
        r.tee(chunk(24, 2));
        assert_eq!(r.bytes(), 1024);
        r.finish();
        let st = rec.settled(Duration::from_secs(10)).await;
        assert!(
            matches!(st, RecordState::Complete { bytes: 1024, ended_unix_ms } if ended_unix_ms > 0),
            "{st:?}"
        );
        let got = std::fs::read(rec.path()).unwrap();
        assert_eq!(got.len(), 1024);
        assert!(got[..1000].iter().all(|&b| b == 1) && got[1000..].iter().all(|&b| b == 2));
        // only the recording is left (no part file)
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
    }

    #[tokio::test]
    async fn a_recording_passing_its_limit_gives_up_and_leaves_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let rec = StreamRecording::new(dir.path().join("stream"), 1000);
        let mut r = rec.start();
        r.tee(chunk(600, 1));
        assert!(r.recording());
        r.tee(chunk(600, 1));
        assert!(!r.recording(), "it recorded past its limit");
        // later chunks and the end change nothing
        r.tee(chunk(10, 1));
        r.finish();
        let st = rec.settled(Duration::from_secs(10)).await;
        assert!(
            matches!(&st, RecordState::GaveUp(why) if why.contains("size limit")),
            "{st:?}"
        );
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
    }

    #[tokio::test]
    async fn a_recording_whose_writer_falls_behind_gives_up_rather_than_wait() {
        let dir = tempfile::tempdir().unwrap();
        let rec = StreamRecording::new(dir.path().join("stream"), u64::MAX);
        let mut r = rec.start();
        // far more than may wait, handed on faster than any disk writes: the tee never
        // blocks, and once the queue is full it stops recording
        let big = chunk(4 << 20, 7);
        let mut handed = 0u64;
        while r.recording() && handed < 8 * QUEUE_BYTES {
            r.tee(big.clone());
            handed += big.len() as u64;
        }
        r.finish();
        let st = rec.settled(Duration::from_secs(30)).await;
        if handed < 8 * QUEUE_BYTES {
            assert!(
                matches!(&st, RecordState::GaveUp(why) if why.contains("behind")),
                "{st:?}"
            );
            assert!(!rec.path().exists());
        } else {
            // a disk as fast as memory kept up: then it is complete
            assert!(matches!(st, RecordState::Complete { .. }), "{st:?}");
        }
    }

    #[tokio::test]
    async fn a_failed_try_leaves_nothing_and_the_next_records_afresh() {
        let dir = tempfile::tempdir().unwrap();
        let rec = StreamRecording::new(dir.path().join("stream"), 1 << 20);
        let mut first = rec.start();
        first.tee(chunk(100, 1));
        drop(first); // the try failed: no finish
        let st = rec.settled(Duration::from_secs(10)).await;
        assert!(matches!(st, RecordState::GaveUp(_)), "{st:?}");
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
        let mut second = rec.start();
        assert_eq!(rec.state(), RecordState::Writing);
        second.tee(chunk(10, 3));
        second.finish();
        let st = rec.settled(Duration::from_secs(10)).await;
        assert!(
            matches!(st, RecordState::Complete { bytes: 10, .. }),
            "{st:?}"
        );
        assert_eq!(std::fs::read(rec.path()).unwrap(), vec![3u8; 10]);
    }
}

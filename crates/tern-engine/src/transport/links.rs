//! A migration's extra data connections (parallel streams, v2): on the source, batches of
//! frames handed round robin to one writer task per connection, each frame preceded by
//! `Seq{n}`; on the destination, each connection's frames handed to the migration, which
//! applies them in `n` order within bounded memory ([`Reorder`]). Also the source's one
//! way of sending a batch, over the data connections or the control connection
//! ([`send_frames`]), under the migration's rate limit.

use std::collections::BTreeMap;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Instant;

use tern_proto::{limits, Message};
use tokio::sync::{mpsc, Mutex};

use super::batch::{Compression, Out};
use super::conn::{FrameReader, FrameWriter, RecvError};
use super::rate::RateLimit;
use super::tls::{PeerRead, PeerWrite};
use crate::codec::CodecPicker;
use crate::handle::{Counters, MigrationHandle};

/// The control connection's writer, shared by the tasks that send on it.
pub type PeerWriter = Arc<Mutex<FrameWriter<PeerWrite>>>;

/// Why the source could not hand a batch on.
#[derive(Debug, thiserror::Error)]
pub enum SendError {
    #[error("sending to the destination agent failed")]
    Write(#[source] std::io::Error),
    #[error("data stream {0} closed")]
    LinkClosed(usize),
}

/// The extra data connections of a migration (parallel streams), fed round robin.
#[derive(Default)]
pub struct Links {
    /// The migration's rate limit (memory and disks draw from it), if capped.
    pub budget: Option<Arc<RateLimit>>,
    pub senders: Vec<mpsc::Sender<Vec<Out>>>,
    next_seq: u64,
    next_link: usize,
}

impl Links {
    /// No data connections yet (the control connection carries the data), under `budget`.
    pub fn new(budget: Option<Arc<RateLimit>>) -> Links {
        Links {
            budget,
            ..Links::default()
        }
    }
}

/// Writes the frames one data connection is given, in order; closes it at the end.
pub async fn data_link(
    mut w: FrameWriter<PeerWrite>,
    mut rx: mpsc::Receiver<Vec<Out>>,
    handle: Arc<MigrationHandle>,
) -> std::io::Result<()> {
    let mut counted = 0;
    while let Some(batch) = rx.recv().await {
        for f in batch {
            match f {
                Out::Frame(m) => w.push(&m),
                Out::Encoded(b) => w.push_encoded(b),
            }
        }
        w.flush().await?;
        Counters::add(&handle.counters.wire_data, w.bytes_written - counted);
        counted = w.bytes_written;
    }
    w.shutdown().await
}

/// Sends `frames`, in order: compressed (`comp`), over the data connections (numbered,
/// round robin) when there are any, else on the control connection; charged to the rate
/// limit and told to the codec picker (how long the link took: only the wait for the
/// socket, not the compression).
pub async fn send_frames(
    frames: Vec<Message>,
    comp: &mut Compression,
    writer: &PeerWriter,
    links: &mut Links,
    handle: &MigrationHandle,
) -> Result<(), SendError> {
    if !links.senders.is_empty() {
        // Parallel streams: this batch goes to the next connection, each frame numbered.
        let frames = comp.encode(frames);
        if frames.is_empty() {
            return Ok(());
        }
        let mut batch = Vec::with_capacity(frames.len() * 2);
        let mut bytes = 0u64;
        for f in frames {
            batch.push(Out::Frame(Message::Seq {
                seq: links.next_seq,
            }));
            links.next_seq += 1;
            bytes += tern_proto::frame_len(&Message::Seq { seq: 0 }) as u64
                + match &f {
                    Out::Frame(m) => tern_proto::frame_len(m),
                    Out::Encoded(b) => b.len(),
                } as u64;
            batch.push(f);
        }
        let i = links.next_link % links.senders.len();
        links.next_link += 1;
        if let Some(b) = &links.budget {
            b.take(bytes).await;
        }
        let t = Instant::now();
        links.senders[i]
            .send(batch)
            .await
            .map_err(|_| SendError::LinkClosed(i + 1))?;
        comp.picker.flushed(bytes, t.elapsed());
        tell_switchover_rate(&comp.picker, links, handle);
        return Ok(());
    }
    let frames = comp.encode(frames);
    let mut w = writer.lock().await;
    for f in frames {
        match f {
            Out::Frame(m) => w.push(&m),
            Out::Encoded(b) => w.push_encoded(b),
        }
    }
    let n = w.pending() as u64;
    if n > 0 {
        if let Some(b) = &links.budget {
            b.take(n).await;
        }
        let t = Instant::now();
        w.flush().await.map_err(SendError::Write)?;
        comp.picker.flushed(n, t.elapsed());
        tell_switchover_rate(&comp.picker, links, handle);
    }
    handle
        .counters
        .wire_out
        .store(w.bytes_written, Ordering::Relaxed);
    let codec = comp.picker.codec();
    drop(w);
    if handle.status().progress.codec != codec.name() {
        handle.update(|s| s.progress.codec = codec.name());
    }
    Ok(())
}

/// What the link carries now, for QEMU's switchover decision (`Counters::switchover_bps`).
fn tell_switchover_rate(picker: &CodecPicker, links: &Links, handle: &MigrationHandle) {
    let cap = links.budget.as_ref().map(|b| b.bytes_per_sec() as f64);
    let c = &handle.counters;
    if let Some(r) = picker.switchover_rate(cap) {
        c.switchover_bps.store(r as u64, Ordering::Relaxed);
    }
    if let Some(l) = picker.link_rate() {
        let wire = l.min(cap.unwrap_or(f64::INFINITY));
        c.switchover_wire_bps.store(wire as u64, Ordering::Relaxed);
    }
}

/// Data frames of parallel streams, released in sequence order; what waits for an
/// earlier frame is bounded ([`limits::MAX_REORDER_FRAMES`], [`limits::MAX_REORDER_BYTES`]).
#[derive(Default)]
pub struct Reorder {
    next: u64,
    /// Frames waiting for an earlier one.
    pub held: BTreeMap<u64, Message>,
    bytes: u64,
}

impl Reorder {
    pub fn insert(&mut self, seq: u64, m: Message) -> Result<(), String> {
        if seq < self.next || self.held.contains_key(&seq) {
            return Err(format!("data frame #{seq} twice"));
        }
        if seq - self.next > limits::MAX_REORDER_FRAMES as u64 {
            return Err(format!(
                "data frame #{seq} is more than {} frames ahead of #{}",
                limits::MAX_REORDER_FRAMES,
                self.next
            ));
        }
        self.bytes += tern_proto::frame_len(&m) as u64;
        self.held.insert(seq, m);
        if self.held.len() > limits::MAX_REORDER_FRAMES || self.bytes > limits::MAX_REORDER_BYTES {
            return Err(format!(
                "{} data frames ({} bytes) wait for #{}",
                self.held.len(),
                self.bytes,
                self.next
            ));
        }
        Ok(())
    }

    /// The next frame in order, if it is here.
    pub fn pop(&mut self) -> Option<Message> {
        let m = self.held.remove(&self.next)?;
        self.bytes -= tern_proto::frame_len(&m) as u64;
        self.next += 1;
        Some(m)
    }
}

/// Why a data connection could not hand on a frame.
#[derive(Debug, thiserror::Error)]
pub enum DataStreamError {
    #[error(transparent)]
    Recv(#[from] RecvError),
    #[error("the source closed a data connection in the middle of a frame pair")]
    Closed,
    #[error("expected Seq on a data connection, got {0}")]
    NotSeq(&'static str),
}

/// One data frame from a parallel stream: its sequence number and the message.
pub type DataFrame = Result<(u64, Message), DataStreamError>;

/// Reads one extra data connection: `Seq{n}` then the frame numbered n, again and again,
/// handing them to the migration's loop (which applies them in order, [`Reorder`]).
pub async fn data_stream(
    mut r: FrameReader<PeerRead>,
    tx: mpsc::Sender<DataFrame>,
    handle: Arc<MigrationHandle>,
) {
    let mut counted = r.bytes_read;
    loop {
        let item = match r.next().await {
            Ok(Some(Message::Seq { seq })) => match r.next().await {
                Ok(Some(m)) => Ok((seq, m)),
                Ok(None) => Err(DataStreamError::Closed),
                Err(e) => Err(e.into()),
            },
            Ok(Some(m)) => Err(DataStreamError::NotSeq(m.name())),
            Ok(None) => return, // the source is done with this stream
            Err(e) => Err(e.into()),
        };
        Counters::add(&handle.counters.wire_data, r.bytes_read - counted);
        counted = r.bytes_read;
        let last = item.is_err();
        if tx.send(item).await.is_err() || last {
            return;
        }
    }
}

//! The pump of an outgoing migration, a pipeline of two tasks (so two cores work on it
//! where the host has them):
//!
//! - the **reader** (this task) reads QEMU's stream, parses it item by item, digests the
//!   memory image the stream describes, turns page records into the form the data path
//!   gives them (lean: the bytes; dedup: zero, bytes, a reference or a delta, whichever is
//!   cheapest; [`DataPathPicker`] switches between them) and everything else into verbatim
//!   QEMU bytes, in order, and hands batches of frames on under flow control;
//! - the **sender** ([`sender`]) compresses them with the codec the picker chose, encrypts
//!   (TLS) and writes them to the destination.
//!
//! Between them at most [`SEND_QUEUE`] batches of about 1 MiB wait, so the final pass and
//! the device state are never held behind more than that. Page data is a slice of what
//! was read from QEMU all the way to the socket (no copy before TLS's own).

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::{Buf, Bytes, BytesMut};
use tern_proto::{FrameCompressor, Message, Page, PageBody, RamBlock};
use tern_qemu::stream::{
    BlockName, Encoder, Item, NameMode, Package, Parser, PostcopyCommand, RamRecord, StreamError,
};
use tokio::io::AsyncReadExt;
use tokio::net::unix;

use super::record::Recorder;
use super::MigrateError;
use crate::codec::CodecPicker;
use crate::datapath::DataPathPicker;
use crate::digest::MemoryDigest;
use crate::handle::{Counters, EncodingReport, MigrationHandle};
use crate::pages::PageEncoder;
use crate::transport::batch::{Compression, Outbox};
use crate::transport::flow::{Flow, Window};
use crate::transport::links::{send_frames, Links, PeerWriter, SendError};
use tokio::sync::mpsc;

/// Batches of frames that may wait between the reader and the sender.
pub(super) const SEND_QUEUE: usize = 4;

/// From the reader to the sender.
enum ToSender {
    Frames(Vec<Message>),
    /// The reader waited this long for the destination (flow control) across a WAN: for
    /// the codec picker, waiting for the path there is waiting for the link.
    Waited(Duration),
}

/// The sending half of the pipeline: compresses, encrypts and writes what the reader
/// hands on, in order; gives back its compression state and links at the end.
async fn sender(
    mut rx: mpsc::Receiver<ToSender>,
    mut comp: Compression,
    mut links: Links,
    writer: PeerWriter,
    handle: Arc<MigrationHandle>,
    link_bound: Arc<AtomicBool>,
) -> Result<(Compression, Links), SendError> {
    while let Some(m) = rx.recv().await {
        match m {
            ToSender::Frames(frames) => {
                send_frames(frames, &mut comp, &writer, &mut links, &handle).await?;
                comp.picker.progress(comp.raw, Instant::now());
            }
            ToSender::Waited(d) => comp.picker.flushed(0, d),
        }
        link_bound.store(comp.picker.link_bound(), Ordering::Relaxed);
    }
    Ok((comp, links))
}

/// The reader's end of the pipeline.
struct Pipe {
    tx: Option<mpsc::Sender<ToSender>>,
    task: Option<tokio::task::JoinHandle<Result<(Compression, Links), SendError>>>,
}

impl Pipe {
    /// Hands everything `out` holds to the sender (waits only while it is
    /// [`SEND_QUEUE`] batches behind).
    async fn hand(&mut self, out: &mut Outbox) -> Result<(), MigrateError> {
        let frames = out.take();
        if frames.is_empty() {
            return Ok(());
        }
        self.send(ToSender::Frames(frames)).await
    }

    async fn send(&mut self, m: ToSender) -> Result<(), MigrateError> {
        let ok = match &self.tx {
            Some(tx) => tx.send(m).await.is_ok(),
            None => false,
        };
        if ok {
            return Ok(());
        }
        // the sender stopped: its error says why
        match self.finish().await {
            Err(e) => Err(e),
            Ok(_) => Err(MigrateError::Protocol("the sender stopped early".into())),
        }
    }

    /// Waits until everything handed on is written; the sender's state back.
    async fn finish(&mut self) -> Result<(Compression, Links), MigrateError> {
        self.tx = None;
        match self.task.take() {
            Some(t) => match t.await {
                Ok(r) => Ok(r?),
                Err(e) => Err(MigrateError::Protocol(format!("the sender failed: {e}"))),
            },
            None => Err(MigrateError::Protocol("the sender stopped".into())),
        }
    }
}

impl Drop for Pipe {
    fn drop(&mut self) {
        if let Some(t) = &self.task {
            t.abort();
        }
    }
}

/// What the forwarder knows of QEMU's stream, kept across the connections of one
/// migration: after a link broke during post-copy, the next forwarder reads the resumed
/// stream (no header, RAM blocks known) with it and the memory digest goes on. The
/// forwarder holds its lock while it runs, so a forwarder that is aborted leaves it as it
/// was between two items.
pub(super) struct StreamState {
    pub parser: Parser,
    pub digest: Option<MemoryDigest>,
    pub block_index: HashMap<BlockName, u16>,
    pub pages: PageEncoder,
}

impl StreamState {
    pub fn new(pages: PageEncoder) -> Arc<tokio::sync::Mutex<StreamState>> {
        Arc::new(tokio::sync::Mutex::new(StreamState {
            parser: Parser::new(),
            digest: None,
            block_index: HashMap::new(),
            pages,
        }))
    }
}

/// How the forwarder encodes and sends: decided before the transfer starts.
pub(super) struct ForwardPlan {
    pub stream: Arc<tokio::sync::Mutex<StreamState>>,
    /// The stream is QEMU's resumed one (post-copy recovery): no header, the RAM blocks
    /// as the last forwarder saw them.
    pub resumed: bool,
    pub picker: CodecPicker,
    /// v2: raised just before SourceDone carries the commit.
    pub commit: Option<Arc<AtomicBool>>,
    /// Extra data connections (none: the control connection carries the data).
    pub links: Links,
    /// Lean or dedup, re-decided as the stream goes.
    pub datapath: DataPathPicker,
    /// The peer speaks v5 (Plain pages, zero runs).
    pub v5: bool,
    /// v2 flow control, with the round trip to the destination.
    pub flow: Option<(Arc<Flow>, Duration)>,
    /// A libvirt domain's QEMU: the stream is complete when this fires (the destination
    /// QEMU's SHUT came; the source QEMU closes the stream only after it gets it).
    pub stream_end: Option<tokio::sync::oneshot::Receiver<()>>,
    /// A copy of the stream to a file, when the daemon asked for one (`record.rs`): each
    /// chunk read from QEMU, as it was read; never waited for.
    pub record: Option<Recorder>,
    /// Post-copy: raised just before QEMU's PACKAGED (it ends with POSTCOPY_RUN) goes on,
    /// followed by PostcopyRun. None: a postcopy stream is refused.
    pub postcopy: Option<Arc<AtomicBool>>,
    /// From QEMU's package on, pages go by the lean path; with this (a v13 destination)
    /// content the destination held before still goes as references.
    pub held_refs: bool,
    /// Post-copy possible: where the parser's state goes once the RAM blocks are known
    /// (for an agent that restarts mid-post-copy).
    pub resume_state: Option<Arc<std::sync::Mutex<Option<tern_qemu::stream::ResumeState>>>>,
}

/// What the forwarder hands back once QEMU's stream ended properly.
pub(super) struct ForwardDone {
    pub digest: [u8; 32],
    pub encoding: EncodingReport,
}

/// Parses the source QEMU's stream and forwards it to the destination agent, each page
/// in the cheapest form the encoder finds; returns the memory digest of what it
/// forwarded once QEMU closed the stream at a proper end.
pub(super) async fn forward(
    mut qemu: unix::OwnedReadHalf,
    writer: PeerWriter,
    handle: Arc<MigrationHandle>,
    plan: ForwardPlan,
) -> Result<ForwardDone, MigrateError> {
    let ForwardPlan {
        stream,
        resumed,
        picker,
        commit,
        links,
        flow,
        mut datapath,
        v5,
        mut stream_end,
        mut record,
        postcopy,
        held_refs,
        resume_state,
    } = plan;
    let mut held = stream.lock_owned().await;
    let StreamState {
        parser,
        digest,
        block_index,
        pages,
    } = &mut *held;
    *parser = if resumed {
        parser.resumed()
    } else {
        Parser::new()
    };
    pages.set_plain(v5);
    pages.set_lean(!datapath.dedup());
    let mut window = flow.as_ref().map(|(_, rtt)| Window::new(*rtt));
    // stream units handed to the outbox so far (the destination counts the same)
    let mut units = 0u64;
    let mut enc = Encoder::new(tern_qemu::stream::DEFAULT_PAGE_SIZE);
    let mut inbuf = BytesMut::with_capacity(4 << 20);
    let mut out = Outbox::new();
    out.zero_runs = v5;
    let comp = Compression {
        fc: FrameCompressor::default(),
        picker,
        buf: BytesMut::new(),
        sample: BytesMut::new(),
        raw: 0,
        wire: 0,
    };
    let (tx, rx) = mpsc::channel(SEND_QUEUE);
    // the sender's view of the link, for the data path's probes
    let link_bound = Arc::new(AtomicBool::new(false));
    let mut pipe = Pipe {
        tx: Some(tx),
        task: Some(crate::spawn(sender(
            rx,
            comp,
            links,
            writer,
            handle.clone(),
            link_bound.clone(),
        ))),
    };
    let mut scratch = Vec::with_capacity(64 << 10);
    let c = &handle.counters;
    // Bytes read from QEMU live in `inbuf`; each round freezes them so that page records
    // are slices of the read buffer (no copy) all the way into the socket to the peer.
    let mut rest = Bytes::new();
    loop {
        match parser.parse_bytes(&rest)? {
            Some((item, used)) => {
                rest.advance(used);
                match item {
                    Item::Ram(RamRecord::Zero {
                        block,
                        offset,
                        fill,
                        ..
                    }) => {
                        let idx = lookup(block_index, &block, parser.offset())?;
                        digest_of(digest, parser.offset())?.fill(idx as usize, offset, fill)?;
                        pages.zero(idx, offset);
                        units += parser.page_size();
                        out.page(
                            idx,
                            Page {
                                offset,
                                body: PageBody::Zero { fill },
                            },
                        );
                        Counters::add(&c.pages_zero, 1);
                    }
                    Item::Ram(RamRecord::Page {
                        block,
                        offset,
                        data,
                        ..
                    }) => {
                        let idx = lookup(block_index, &block, parser.offset())?;
                        digest_of(digest, parser.offset())?.page(idx as usize, offset, &data)?;
                        let body = pages.page(idx, offset, data);
                        units += parser.page_size();
                        Counters::add(
                            match &body {
                                PageBody::Ref(_) => &c.pages_ref,
                                PageBody::Delta { .. } => &c.pages_delta,
                                _ => &c.pages_raw,
                            },
                            1,
                        );
                        out.page(idx, Page { offset, body });
                    }
                    Item::Ram(RamRecord::MemSize { ref blocks, total }) => {
                        if blocks.len() > u16::MAX as usize {
                            return Err(MigrateError::Protocol(
                                "more than 65535 RAM blocks".into(),
                            ));
                        }
                        *block_index = blocks
                            .iter()
                            .enumerate()
                            .map(|(i, b)| (b.name.clone(), i as u16))
                            .collect();
                        let ps = parser.page_size();
                        *digest = Some(MemoryDigest::new(
                            ps,
                            blocks.iter().map(|b| (&*b.name, b.used_length)),
                        ));
                        let lengths: Vec<u64> = blocks.iter().map(|b| b.used_length).collect();
                        pages.set_blocks(ps, &lengths);
                        if let Some(rs) = &resume_state {
                            *rs.lock().expect("resume state") = Some(parser.resume_state());
                        }
                        handle.update(|s| s.progress.ram_total = Some(total));
                        scratch.clear();
                        enc.encode(&item, NameMode::Auto, &mut scratch);
                        units += scratch.len() as u64;
                        out.verbatim(&scratch);
                        out.message(Message::RamBlocks {
                            page_size: ps as u32,
                            blocks: blocks
                                .iter()
                                .map(|b| RamBlock {
                                    name: b.name.to_string(),
                                    used_length: b.used_length,
                                })
                                .collect(),
                        });
                    }
                    Item::Tail(b) => {
                        units += b.len() as u64;
                        out.verbatim(&b);
                    }
                    Item::Postcopy(ref cmd) => {
                        // (RECV_BITMAP and RESUME: a stream resumed after the link broke)
                        let carried = match cmd {
                            PostcopyCommand::Advise { .. } | PostcopyCommand::RamDiscard { .. } => {
                                true
                            }
                            PostcopyCommand::RecvBitmap { .. } | PostcopyCommand::Resume => resumed,
                            _ => false,
                        };
                        if postcopy.is_none() || !carried {
                            return Err(postcopy_unsupported(parser.offset(), postcopy.is_some()));
                        }
                        if let (Some(rs), PostcopyCommand::Advise { .. }) = (&resume_state, cmd) {
                            *rs.lock().expect("resume state") = Some(parser.resume_state());
                        }
                        scratch.clear();
                        enc.encode(&item, NameMode::Auto, &mut scratch);
                        units += scratch.len() as u64;
                        out.verbatim(&scratch);
                    }
                    Item::Packaged(ref pkg) => {
                        let Some(flag) = &postcopy else {
                            return Err(postcopy_unsupported(parser.offset(), false));
                        };
                        check_package(pkg, parser.offset())?;
                        scratch.clear();
                        enc.encode(&item, NameMode::Auto, &mut scratch);
                        units += scratch.len() as u64;
                        // ===== SWITCHOVER POINT (post-copy): the package holds the device
                        // state and POSTCOPY_RUN; from here on the source never resumes. =====
                        flag.store(true, Ordering::SeqCst);
                        // what follows may be a page the guest waits for there: no Want
                        // round trip for it, the lean path from here on (pre-copy may have
                        // run the dedup path: post-copy as the last resort)
                        pages.set_lean(true);
                        pages.set_held_refs(held_refs);
                        out.verbatim(&scratch);
                        out.message(Message::PostcopyRun);
                        pipe.hand(&mut out).await?;
                        if let Some((f, _)) = &flow {
                            // the package went behind no more than the drained window
                            f.end_drain();
                        }
                        handle.update(|s| s.progress.qemu_status = "postcopy-active".into());
                    }
                    other => {
                        scratch.clear();
                        enc.encode(&other, NameMode::Auto, &mut scratch);
                        units += scratch.len() as u64;
                        out.verbatim(&scratch);
                    }
                }
                if out.size() >= 1 << 20 {
                    pipe.hand(&mut out).await?;
                    let running_there = postcopy.as_ref().is_some_and(|p| p.load(Ordering::SeqCst));
                    if !running_there
                        && datapath.tick(units, Instant::now(), link_bound.load(Ordering::Relaxed))
                    {
                        pages.set_lean(!datapath.dedup());
                        handle.update(|s| s.progress.data_path = datapath.name().into());
                    }
                }
            }
            None => {
                // Flow control: do not take more from QEMU while the window is full.
                if let (Some((f, rtt)), Some(w)) = (&flow, window.as_mut()) {
                    loop {
                        let fit = fit_window(f, w, units, postcopy.as_deref(), c);
                        if fit.fits {
                            break;
                        }
                        pipe.hand(&mut out).await?;
                        let t = Instant::now();
                        if tokio::time::timeout(Duration::from_secs(5), f.notify.notified())
                            .await
                            .is_err()
                        {
                            tracing::warn!(
                                migration = %handle.id,
                                units,
                                applied = fit.applied,
                                window = fit.limit,
                                wire_out = handle.counters.wire_out.load(Ordering::Relaxed),
                                "flow control: no progress from the destination for 5 s"
                            );
                        }
                        // Across a WAN the window fills because the link is slow; on a LAN
                        // because the destination is (its QEMU loading), where compressing
                        // harder would only cost CPU: only the former tells the codec picker
                        // about the link (a slow LAN link shows as writes that block).
                        // A window kept small on purpose says nothing of the link either
                        // (told as a wait, the link's rate would follow it down, and
                        // the small windows, sized from that rate, with it).
                        if *rtt >= DataPathPicker::WAN_RTT && !fit.small {
                            pipe.send(ToSender::Waited(t.elapsed())).await?;
                        }
                    }
                }
                // keep the partial record (a few KiB at most) in front of the next read
                inbuf.extend_from_slice(&rest);
                if inbuf.capacity() - inbuf.len() < 256 << 10 {
                    inbuf.reserve(4 << 20);
                }
                // Read what QEMU has already written without waiting; only when the read
                // would block, send what we hold first, so no PING/SHUT exchange can wait
                // on bytes sitting in our buffer (and writes stay large while QEMU streams).
                let n = match qemu.try_read_buf(&mut inbuf) {
                    Ok(n) => n,
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                        pipe.hand(&mut out).await?;
                        if let (Some((f, _)), Some(w)) = (&flow, window.as_mut()) {
                            // QEMU is quiet: a drain that got there says so now
                            fit_window(f, w, units, postcopy.as_deref(), c);
                        }
                        tokio::select! {
                            r = qemu.read_buf(&mut inbuf) => r.map_err(MigrateError::LocalIo)?,
                            // the destination QEMU loaded everything sent so far: as at EOF,
                            // the stream must have ended properly (checked below)
                            () = ended(&mut stream_end) => 0,
                        }
                    }
                    Err(e) => return Err(MigrateError::LocalIo(e)),
                };
                rest = inbuf.split().freeze();
                if n == 0 {
                    break;
                }
                if let Some(r) = record.as_mut() {
                    // the new bytes (behind the partial record kept from the last read)
                    r.tee(rest.slice(rest.len() - n..));
                }
                Counters::add(&c.bytes_from_qemu, n as u64);
            }
        }
    }
    if !rest.is_empty() {
        return Err(StreamError::Truncated {
            offset: parser.offset(),
            state: "a record",
        }
        .into());
    }
    parser.finish()?;
    if let Some(r) = record.take() {
        // the whole stream, ended properly: the VM as at the switchover
        r.finish();
    }
    let d = digest.take().ok_or(StreamError::Truncated {
        offset: parser.offset(),
        state: "RAM setup",
    })?;
    let sum = d.finish();
    // post-copy ran (the last resort of a pre-copy that would have committed here): the
    // v1 ending, whose ReadyToResume says whether the digests agree; the VM runs there
    let commit = commit.filter(|_| !postcopy.as_ref().is_some_and(|p| p.load(Ordering::SeqCst)));
    if let Some(flag) = &commit {
        // ===== SWITCHOVER POINT (v2): from here on the source never resumes unless the
        // destination says it holds nothing of the VM. =====
        flag.store(true, Ordering::SeqCst);
    }
    out.message(Message::SourceDone {
        digest: sum,
        pages: d.pages,
        commit: commit.is_some(),
    });
    pipe.hand(&mut out).await?;
    let (comp, links) = pipe.finish().await?;
    let s = pages.stats;
    Ok(ForwardDone {
        digest: sum,
        encoding: EncodingReport {
            dedup: pages.dedup(),
            destination_held_pages: pages.summary_len() as u64,
            delta_bytes: s.delta_bytes,
            frames_raw_bytes: comp.raw,
            frames_wire_bytes: comp.wire,
            codec: comp.picker.codec().name(),
            codec_switches: comp.picker.switches,
            wants: Counters::get(&c.wants),
            data_streams: links.senders.len() as u16,
            data_path: datapath.name().into(),
            data_path_switches: datapath.switches,
            lean_pages: s.lean,
        },
    })
}

/// A postcopy stream where tern does not carry one (or a command it does not carry yet).
fn postcopy_unsupported(offset: u64, asked: bool) -> MigrateError {
    StreamError::Unsupported {
        offset,
        feature: "postcopy".into(),
        hint: if asked {
            "bitmap-only postcopy, and recovery commands outside a resumed stream, are not carried by tern".into()
        } else {
            "postcopy was not asked for: turn off the postcopy-ram capability, or migrate with --postcopy".into()
        },
    }
    .into()
}

/// The package tern carries: the device state between LISTEN and RUN, no RAM (QEMU sends
/// none there without postcopy-preempt's or multifd's channels, which tern refuses).
fn check_package(pkg: &Package, offset: u64) -> Result<(), MigrateError> {
    let ends_with_run = pkg.items.last() == Some(&Item::Postcopy(PostcopyCommand::Run));
    let ram = pkg.items.iter().any(|i| matches!(i, Item::Ram(_)));
    if !ends_with_run || ram {
        return Err(StreamError::Unsupported {
            offset,
            feature: "postcopy package".into(),
            hint: if ram {
                "a package holding RAM records is not carried by tern".into()
            } else {
                "a package that does not end with POSTCOPY_RUN is not carried by tern".into()
            },
        }
        .into());
    }
    Ok(())
}

/// Fires once `end` did; never without one (or once its sender is gone without firing).
async fn ended(end: &mut Option<tokio::sync::oneshot::Receiver<()>>) {
    let Some(rx) = end else {
        return std::future::pending().await;
    };
    let fired = rx.await.is_ok();
    *end = None;
    if !fired {
        std::future::pending::<()>().await;
    }
}

fn lookup(
    index: &HashMap<BlockName, u16>,
    block: &BlockName,
    at: u64,
) -> Result<u16, MigrateError> {
    index.get(block).copied().ok_or_else(|| {
        StreamError::Malformed {
            offset: at,
            what: format!("page of unknown RAM block {block:?}"),
        }
        .into()
    })
}

fn digest_of(d: &mut Option<MemoryDigest>, at: u64) -> Result<&mut MemoryDigest, MigrateError> {
    d.as_mut().ok_or_else(|| {
        StreamError::Malformed {
            offset: at,
            what: "page record before the RAM block list".into(),
        }
        .into()
    })
}

/// Where the stream units handed on stand against the window in effect.
struct Fit {
    fits: bool,
    applied: u64,
    limit: u64,
    /// The window is kept small on purpose (a drain, or post-copy): waiting on it says
    /// nothing of the link.
    small: bool,
}

/// Whether `units` handed on fit the window in effect: the drained one before post-copy
/// ([`Window::drained_size`]), post-copy's while the guest runs at the destination and
/// its faults wait behind what is in flight ([`Window::postcopy_size`]), else the normal
/// one. Raises [`Flow::drained`] when they fit a drain. The small windows are sized from
/// the stream rate the link carries for pages sent as bytes, as the sender measured it.
fn fit_window(
    f: &Flow,
    w: &mut Window,
    units: u64,
    postcopy: Option<&AtomicBool>,
    c: &crate::handle::Counters,
) -> Fit {
    let applied = f.applied.load(Ordering::SeqCst);
    let draining = f.drain.load(Ordering::SeqCst);
    let small = draining || postcopy.is_some_and(|p| p.load(Ordering::SeqCst));
    let link = Counters::get(&c.switchover_bps) as f64;
    let limit = if draining {
        w.drained_size(applied, link)
    } else if small {
        w.postcopy_size(applied, link)
    } else {
        w.size(applied)
    };
    let fits = units.saturating_sub(applied) <= limit;
    if fits && draining {
        f.drained.notify_one();
    }
    Fit {
        fits,
        applied,
        limit,
        small,
    }
}

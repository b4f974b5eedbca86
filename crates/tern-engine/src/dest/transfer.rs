//! Phase `Transfer`: frames become QEMU's stream again. Frames come from the control
//! connection and, numbered, from the extra data connections (applied in number order,
//! [`Reorder`]); each is checked against the conversation's order and every bound a peer
//! must keep (`tern_proto::limits`) before anything is allocated; page records are
//! resolved (zero, bytes, a reference to content held here, a delta) and written to QEMU in
//! the order they came, a record whose content must be asked for (Want) holding back those
//! after it. Disk frames go to the disk worker; QEMU's return path is relayed meanwhile.
//! Ends when SourceDone came and everything before it is written. Post-copy: at
//! PostcopyRun (right after QEMU's PACKAGED), once every record before it is written, the
//! VM becomes this host's and runs (`switchover::claim`) while the rest of the stream
//! comes; the pages QEMU asked for are counted as they come, and those that came from
//! this host's store ([`Faults::arrived`]).

use std::collections::{HashSet, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use bytes::Bytes;
use tern_proto::{limits, ErrorCode, Message, PageBody};
use tern_qemu::stream::{BlockName, Encoder, Item, NameMode, RamRecord};
use tern_store::Hash;
use tokio::net::unix;
use tokio::sync::mpsc;

use super::prepare::Prepared;
use super::relay::{return_path, AbortOnDrop, Faults, RelayError};
use super::{refuse, send, Conn, Incoming, IncomingError};
use crate::digest::MemoryDigest;
use crate::disk::{DestDiskError, DestDisks};
use crate::fault::{fault, fault_once};
use crate::handle::{Counters, Phase};
use crate::pages::Resolved;
use crate::transport::conn::Segments;
use crate::transport::links::{data_stream, DataFrame, PeerWriter, Reorder};

/// What the transfer leaves for the verification.
pub(super) struct Received {
    /// The source's digest (SourceDone) and whether it carried the commit (v2).
    pub source_digest: [u8; 32],
    pub early_commit: bool,
    /// The digest of what this side wrote to its QEMU.
    pub digest: Option<MemoryDigest>,
    /// Stream units written to QEMU (for keepalives).
    pub applied: u64,
    /// The return-path relay, still running.
    pub relay: AbortOnDrop,
    /// Raised once the relay passed on QEMU's SHUT(0) (it loaded the whole stream).
    pub shut: Arc<std::sync::atomic::AtomicBool>,
    /// Post-copy's page requests, as the relay counted them.
    pub faults: Arc<Faults>,
    /// Post-copy: the VM became this host's at PostcopyRun, running since this RESUME
    /// (µs since the epoch; 0: it stays paused).
    pub claimed: Option<u64>,
    /// The digests agree (set by the verification).
    pub digest_ok: bool,
}

pub(super) async fn run(
    inc: &mut Incoming,
    conn: &mut Conn,
    p: &mut Prepared,
) -> Result<Received, IncomingError> {
    p.handle.set_phase(Phase::Transfer);
    let qemu_rd = p
        .qemu_rd
        .take()
        .expect("the transfer takes QEMU's return path once");
    let shut = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let faults = Arc::new(Faults::default());
    let rp_task = crate::spawn(return_path(
        qemu_rd,
        conn.writer.clone(),
        shut.clone(),
        faults.clone(),
    ));
    let mut rp_task = AbortOnDrop(Some(rp_task));
    let feeder = Feeder::start(
        p.qemu_wr
            .take()
            .expect("the transfer takes QEMU's stream once"),
        conn.writer.clone(),
        p.version,
    );
    let mut rb = Rebuild {
        version: p.version,
        feeder,
        enc: Encoder::new(tern_qemu::stream::DEFAULT_PAGE_SIZE),
        out: Segments::default(),
        names: Vec::new(),
        digest: None,
        corrupt_pending: fault!(inc.engine.config.fault, CorruptPage),
        pending: VecDeque::new(),
        pending_bytes: 0,
        missing: HashSet::new(),
        lengths: Vec::new(),
        out_units: 0,
    };
    let handle = p.handle.clone();
    let c = &handle.counters;
    let mut rp_done = false;
    // post-copy: where the source's new connection comes once the VM runs here, and one
    // that came while the old one still looked alive
    let mut resume_rx: Option<mpsc::Receiver<Conn>> = None;
    let mut _resume_guard = None;
    let mut fresh: Option<Conn> = None;
    let mut _arriving = None;
    // post-copy: the task that runs the guest, until it did
    let mut running = None;
    // (handed to QEMU now, while nothing can block its main loop)
    let mut spares = match (&p.qmp, p.postcopy) {
        (Some(q), true) => super::resume::stage_spares(q).await,
        _ => Vec::new(),
    };
    let id = &p.id.clone();
    let handle = &handle;
    let stall = inc.engine.config.stall_timeout;
    let mut source_done: Option<[u8; 32]> = None;
    let mut early_commit = false;
    // Data frames from parallel streams, applied in sequence order.
    let (mut data_tx, mut data_rx) = mpsc::channel::<DataFrame>(64);
    let mut reorder = Reorder::default();
    let mut attached: HashSet<u16> = HashSet::new();
    let mut ready: VecDeque<Message> = VecDeque::new();
    let mut last_input = tokio::time::Instant::now();
    let mut claimed = None;
    // post-copy: PostcopyRun came; the VM becomes this host's once every record before it
    // is written (one may wait on content asked for)
    let mut run_due = false;
    let source_digest = loop {
        let step: Result<Option<[u8; 32]>, IncomingError> = async {
                if let Some(d) = source_done {
                    // (disks: their last rounds travel on the control connection, SourceDone may
                    // come first on a data connection)
                    if rb.pending.is_empty() && p.disks.as_ref().is_none_or(DestDisks::all_last) {
                        rb.flush().await?;
                        p.qemu_wr = Some(rb.feeder.finish().await?);
                        return Ok(Some(d));
                    }
                }
                let msg = if let Some(m) = ready.pop_front() {
                    Ok(Some(m))
                } else {
                    // Write to QEMU only when the next frame is not here yet (and nothing more is
                    // waiting in the sockets), or when a lot is queued: large writes, no stalls.
                    if !conn.reader.has_frame() && data_rx.is_empty() && !rb.out.is_empty() {
                        conn.reader.try_fill()?;
                        if !conn.reader.has_frame() {
                            rb.flush().await?;
                        }
                    }
                    tokio::select! {
                        m = conn.reader.next() => m,
                        d = data_rx.recv() => {
                            last_input = tokio::time::Instant::now();
                            match d.expect("the loop holds a sender") {
                                Ok((seq, m)) => {
                                    reorder.insert(seq, m).map_err(|why| refuse(ErrorCode::Protocol, why))?;
                                    while let Some(m) = reorder.pop() {
                                        ready.push_back(m);
                                    }
                                }
                                Err(e) => return Err(e.into()),
                            }
                            return Ok(None);
                        }
                        a = p.attached.recv() => {
                            if let Some((index, r)) = a {
                                if index == 0 || index > limits::MAX_DATA_STREAMS || !attached.insert(index) {
                                    return Err(refuse(
                                        ErrorCode::Protocol,
                                        format!("data connection #{index}: numbered 1..={} and each once", limits::MAX_DATA_STREAMS),
                                    ));
                                }
                                tracing::info!(migration = %id, index, "data connection attached");
                                crate::spawn(data_stream(r, data_tx.clone(), handle.clone()));
                            }
                            return Ok(None);
                        }
                        _ = tokio::time::sleep_until(last_input + stall) => {
                            tracing::warn!(
                                migration = %id,
                                wire_in = conn.reader.bytes_read,
                                applied = rb.feeder.applied(),
                                queued = rb.out.len(),
                                pending = rb.pending.len(),
                                missing = rb.missing.len(),
                                ready = ready.len(),
                                reorder = reorder.held.len(),
                                "no data from the source"
                            );
                            return Err(IncomingError::Timeout(stall, "data from the source"));
                        }
                        e = async { p.disks.as_mut().expect("guarded").failed.recv().await }, if p.disks.is_some() => {
                            return Err(disk_failure(e));
                        }
                        r = rp_task.join(), if !rp_done => {
                            match r {
                                Ok(Ok(_)) => rp_done = true,
                                Ok(Err(RelayError::Peer(e))) => return Err(IncomingError::PeerWrite(e)),
                                Ok(Err(RelayError::Qemu(why))) => return Err(IncomingError::Qemu(why)),
                                Err(e) => return Err(IncomingError::Qemu(format!("return-path task failed: {e}"))),
                            }
                            return Ok(None);
                        }
                        r = guest_running(&mut running) => {
                    // post-copy: the guest runs here (its RESUME time into the record)
                    if let Some(at) = r? {
                        let us = crate::handle::unix_us(at);
                        claimed = Some(us);
                        super::switchover::set_resumed(&p.run_dir, us);
                    }
                    return Ok(None);
                }
                c = next_resume(&mut resume_rx) => {
                            // the source gave up on the old connection before this side noticed
                            fresh = Some(c);
                            return Err(IncomingError::PeerClosed("the transfer (the source went on on a new connection)"));
                        }
                    }
                };
                last_input = tokio::time::Instant::now();
                c.wire_in.store(conn.reader.bytes_read, Ordering::Relaxed);
                let msg = msg?;
                if let Some(m) = &msg {
                    conn.check(m)?;
                }
                match msg {
                    Some(Message::QemuBytes(b)) => rb.push(Pending::Verbatim(b), c)?,
                    Some(Message::RamBlocks { page_size, blocks }) => {
                        if rb.digest.is_some() {
                            return Err(refuse(
                                ErrorCode::Protocol,
                                "RamBlocks twice in one migration",
                            ));
                        }
                        check_ram_blocks(page_size, &blocks, p.spec.memory_mib)
                            .map_err(|why| refuse(ErrorCode::Protocol, format!("RamBlocks: {why}")))?;
                        rb.lengths = blocks.iter().map(|b| b.used_length).collect();
                        rb.names = blocks
                            .iter()
                            .map(|b| BlockName::from(b.name.as_str()))
                            .collect();
                        faults.set_blocks(blocks.iter().map(|b| b.name.clone()));
                        rb.enc = Encoder::new(u64::from(page_size));
                        rb.digest = Some(MemoryDigest::new(
                            u64::from(page_size),
                            blocks.iter().map(|b| (b.name.as_str(), b.used_length)),
                        ));
                        let lengths: Vec<u64> = blocks.iter().map(|b| b.used_length).collect();
                        p.pages.set_blocks(u64::from(page_size), &lengths);
                    }
                    Some(Message::Pages {
                        block,
                        pages: records,
                    }) => {
                        if rb.digest.is_none() || rb.names.get(block as usize).is_none() {
                            return Err(refuse(
                                ErrorCode::Protocol,
                                format!("Pages for unknown block #{block}"),
                            ));
                        }
                        if fault!(inc.engine.config.fault, PanicInTransfer) && fault_once() {
                            let _store = inc.engine.store.lock();
                            panic!("fault injection: panic in the transfer, holding the page store");
                        }
                        let mut want = Vec::new();
                        for rec in records {
                            rb.check_record(block, &rec)?;
                            let counter = match &rec.body {
                                PageBody::Zero { .. } | PageBody::ZeroRun { .. } => &c.pages_zero,
                                PageBody::Raw(_) | PageBody::Plain(_) => &c.pages_raw,
                                PageBody::Ref(_) => &c.pages_ref,
                                PageBody::Delta { .. } => &c.pages_delta,
                            };
                            Counters::add(counter, rec.body.pages());
                            let offset = rec.offset;
                            let (is_ref, n) = (matches!(rec.body, PageBody::Ref(_)), rec.body.pages());
                            let item = match p
                                .pages
                                .resolve(block, offset, rec.body)
                                .map_err(|e| refuse(ErrorCode::Protocol, e.to_string()))?
                            {
                                Resolved::Zero { fill, pages } => Pending::Zero {
                                    block,
                                    offset,
                                    fill,
                                    pages,
                                },
                                Resolved::Page(data) => Pending::Page {
                                    block,
                                    offset,
                                    data: Some(data),
                                    hash: [0; 16],
                                },
                                Resolved::Missing(hash) => {
                                    if rb.missing.insert(hash) {
                                        want.push(hash);
                                    }
                                    Pending::Page {
                                        block,
                                        offset,
                                        data: None,
                                        hash,
                                    }
                                }
                            };
                            if claimed.is_some() {
                                // post-copy: a page QEMU asked for may be here, perhaps from
                                // this host's store
                                let local = is_ref && matches!(item, Pending::Page { data: Some(_), .. });
                                faults.arrived(block, offset, n, local);
                            }
                            rb.push(item, c)?;
                        }
                        if !want.is_empty() {
                            Counters::add(&c.wants, want.len() as u64);
                            tracing::info!(
                                n = want.len(),
                                "asking the source for content this host lacks"
                            );
                            for hashes in want.chunks(limits::MAX_WANT_HASHES) {
                                conn.send(&Message::Want {
                                    hashes: hashes.to_vec(),
                                })
                                .await?;
                            }
                        }
                        if rb.out.len() >= 256 << 10 {
                            rb.flush().await?;
                        }
                    }
                    Some(Message::Content { pages: contents }) => {
                        if contents.len() > limits::MAX_WANT_HASHES {
                            return Err(refuse(
                                ErrorCode::Protocol,
                                format!(
                                    "Content with {} pages (at most {})",
                                    contents.len(),
                                    limits::MAX_WANT_HASHES
                                ),
                            ));
                        }
                        for (h, data) in contents {
                            if !rb.missing.contains(&h) {
                                return Err(refuse(
                                    ErrorCode::Protocol,
                                    format!(
                                        "Content for page {} that this host did not ask for",
                                        hex::encode(h)
                                    ),
                                ));
                            }
                            if data.len() as u64 != limits::PAGE_SIZE {
                                return Err(refuse(
                                    ErrorCode::Protocol,
                                    "Content page of the wrong size",
                                ));
                            }
                            p.pages
                                .content(h, &data)
                                .map_err(|e| refuse(ErrorCode::Protocol, e.to_string()))?;
                            rb.fill(h, &data);
                        }
                        rb.drain(c)?;
                    }
                    Some(Message::SourceDone {
                        digest: src,
                        commit,
                        ..
                    }) => {
                        source_done = Some(src);
                        early_commit = commit;
                    }
                    Some(Message::PostcopyRun) => {
                        // the source sent QEMU's PACKAGED (device state, then POSTCOPY_RUN) just
                        // before: it goes to QEMU, then the VM becomes this host's and runs while
                        // the rest of its memory comes (QEMU asks for what it touches first, over
                        // the return path)
                        if !p.postcopy || run_due || claimed.is_some() {
                            return Err(refuse(
                                ErrorCode::Protocol,
                                "PostcopyRun outside a post-copy migration, or twice",
                            ));
                        }
                        if !rb.pending.is_empty() {
                            // (a reference whose 64-bit prefix matched by chance: one round trip)
                            tracing::info!(migration = %id, pending = rb.pending.len(), "post-copy: QEMU's package waits on content asked for");
                        }
                        run_due = true;
                    }
                    Some(Message::Abort { code, message }) => {
                        return Err(IncomingError::Aborted { code, message })
                    }
                    Some(
                        m @ (Message::DiskManifest { .. }
                        | Message::DiskData { .. }
                        | Message::DiskRoundEnd { .. }),
                    ) => match p.disks.as_mut() {
                        Some(d) => {
                            if d.handle(m).await.is_err() {
                                return Err(disk_failure(d.failed.recv().await));
                            }
                        }
                        None => {
                            return Err(refuse(
                                ErrorCode::Protocol,
                                format!("{} for a VM without disks", m.name()),
                            ))
                        }
                    },
                    Some(m) => {
                        return Err(refuse(
                            ErrorCode::Protocol,
                            format!("unexpected {} during transfer", m.name()),
                        ))
                    }
                    None => return Err(IncomingError::PeerClosed("the transfer")),
                }
                if run_due && rb.pending.is_empty() {
                    run_due = false;
                    rb.flush().await?;
                    // ===== SWITCHOVER POINT (post-copy): from here on this host owns the VM. =====
                    // (the guest runs beside the transfer: QEMU may need pages first)
                    running = Some(super::switchover::claim_postcopy(inc, &conn.peer.fingerprint, p)?);
                    // if the link breaks from here on, the source resumes on a new connection
                    let (tx, rx) = mpsc::channel(super::resume::QUEUED_RESUMES);
                    _resume_guard = Some(inc.engine.registry.accept_resume(id, &conn.peer.fingerprint, tx));
                    resume_rx = Some(rx);
                    // no in-band QMP from the daemon while memory still comes
                    _arriving = Some(Arriving::new(inc.host.clone(), &p.spec.name));
                    tracing::info!(migration = %id, "post-copy: the VM runs here; the rest of its memory follows");
                    handle.update(|s| s.progress.qemu_status = "postcopy-active".into());
                    claimed = Some(0);
                }
            Ok(None)
        }
        .await;
        match step {
            Ok(Some(d)) => break d,
            Ok(None) => {}
            // post-copy: the VM runs here and the pages it lacks are at the source; a link
            // that broke is waited for, and the stream goes on over a new connection
            // QEMU loaded everything (its SHUT went by): nothing to resume; the VM runs
            // here whole, only the source's word (SourceDone) was lost
            Err(e) if claimed.is_some() && shut.load(Ordering::SeqCst) => {
                return Err(refuse(
                    ErrorCode::Timeout,
                    format!(
                        "the link to the source broke after QEMU loaded the whole stream ({}): the VM runs here with all its memory; the digests were not compared",
                        crate::error::error_chain(&e)
                    ),
                ));
            }
            Err(e) if claimed.is_some() && super::resume::link_broke(&e) => {
                rp_task.abort();
                rb.feeder = Feeder::closed();
                // what the old stream's writer had queued and the old data connections
                rb.out = Segments::default();
                rb.out_units = 0;
                rb.pending.clear();
                rb.pending_bytes = 0;
                rb.missing.clear();
                ready.clear();
                reorder = Reorder::default();
                attached.clear();
                (data_tx, data_rx) = mpsc::channel::<DataFrame>(64);
                let rx = resume_rx.as_mut().expect("post-copy claimed: resumable");
                let (next, qemu) =
                    super::resume::await_resume(p, rx, fresh.take(), &mut spares, &e).await?;
                *conn = next;
                let (qemu_rd, qemu_wr) = qemu.into_split();
                rb.feeder = Feeder::start(qemu_wr, conn.writer.clone(), p.version);
                // a new stream: the first page names its block again
                rb.enc = Encoder::new(limits::PAGE_SIZE);
                rp_task = AbortOnDrop(Some(crate::spawn(return_path(
                    qemu_rd,
                    conn.writer.clone(),
                    shut.clone(),
                    faults.clone(),
                ))));
                rp_done = false;
                last_input = tokio::time::Instant::now();
                p.handle.set_phase(Phase::Transfer);
            }
            Err(e) => return Err(e),
        }
    };

    if running.is_some() {
        // (it ran beside the transfer; it is bounded by QMP's own deadlines)
        if let Some(at) = guest_running(&mut running).await? {
            let us = crate::handle::unix_us(at);
            claimed = Some(us);
            super::switchover::set_resumed(&p.run_dir, us);
        }
    }
    Ok(Received {
        source_digest,
        early_commit,
        digest: rb.digest.take(),
        applied: rb.feeder.applied(),
        relay: rp_task,
        shut,
        faults,
        claimed,
        digest_ok: true,
    })
}

/// While the VM, adopted at PostcopyRun, still receives memory: the daemon leaves its
/// QEMU's monitor alone ([`crate::Host::arriving`]).
struct Arriving {
    host: Arc<dyn crate::Host>,
    name: String,
}

impl Arriving {
    fn new(host: Arc<dyn crate::Host>, name: &str) -> Arriving {
        host.arriving(name, true);
        Arriving {
            host,
            name: name.to_string(),
        }
    }
}

impl Drop for Arriving {
    fn drop(&mut self) {
        self.host.arriving(&self.name, false);
    }
}

/// When the task running a post-copy guest ended; never without one.
async fn guest_running(
    task: &mut Option<
        tokio::task::JoinHandle<Result<Option<std::time::SystemTime>, IncomingError>>,
    >,
) -> Result<Option<std::time::SystemTime>, IncomingError> {
    let Some(t) = task.as_mut() else {
        return std::future::pending().await;
    };
    let r = t.await;
    *task = None;
    r.unwrap_or_else(|e| {
        Err(IncomingError::Qemu(format!(
            "running the guest failed: {e}"
        )))
    })
}

/// The next connection a source resumed post-copy on; never without a slot.
async fn next_resume(rx: &mut Option<mpsc::Receiver<Conn>>) -> Conn {
    match rx {
        Some(rx) => match rx.recv().await {
            Some(c) => c,
            None => std::future::pending().await,
        },
        None => std::future::pending().await,
    }
}

/// The disk worker's failure as this migration's error.
fn disk_failure(e: Option<DestDiskError>) -> IncomingError {
    match e {
        Some(e) => e.into(),
        None => refuse(ErrorCode::Internal, "the disk worker stopped"),
    }
}

/// Something for the destination QEMU, in stream order.
pub(super) enum Pending {
    Verbatim(Bytes),
    /// `pages` pages from `offset`, every byte `fill`.
    Zero {
        block: u16,
        offset: u64,
        fill: u8,
        pages: u32,
    },
    /// `data` is `None` while the content (`hash`) is asked for.
    Page {
        block: u16,
        offset: u64,
        data: Option<Bytes>,
        hash: Hash,
    },
}

impl Pending {
    /// What holding this back costs in memory.
    fn bytes(&self) -> u64 {
        match self {
            Pending::Verbatim(b) => b.len() as u64,
            Pending::Zero { .. } => 16,
            Pending::Page { .. } => limits::PAGE_SIZE,
        }
    }
}

/// The rules for a peer's RamBlocks: the target page size only, at most
/// [`limits::MAX_RAM_BLOCKS`] named blocks, adding up to no more than the spec's memory
/// plus [`limits::RAM_SLACK_BYTES`].
pub fn check_ram_blocks(
    page_size: u32,
    blocks: &[tern_proto::RamBlock],
    memory_mib: u32,
) -> Result<(), String> {
    if u64::from(page_size) != limits::PAGE_SIZE {
        return Err(format!(
            "page size {page_size} (this host takes {} only)",
            limits::PAGE_SIZE
        ));
    }
    if blocks.is_empty() || blocks.len() > limits::MAX_RAM_BLOCKS {
        return Err(format!(
            "{} RAM blocks (1..={})",
            blocks.len(),
            limits::MAX_RAM_BLOCKS
        ));
    }
    let mut names = HashSet::new();
    let mut total = 0u64;
    for b in blocks {
        if b.name.is_empty() || b.name.len() > limits::MAX_RAM_BLOCK_NAME || !names.insert(&b.name)
        {
            return Err(format!(
                "RAM block name {:?} empty, too long or twice",
                b.name
            ));
        }
        total = total.saturating_add(b.used_length);
    }
    let allowed = (u64::from(memory_mib) << 20) + limits::RAM_SLACK_BYTES;
    if total > allowed {
        return Err(format!(
            "RAM blocks add up to {total} bytes, more than the VM's {memory_mib} MiB plus {} MiB",
            limits::RAM_SLACK_BYTES >> 20
        ));
    }
    Ok(())
}

/// Rebuilds QEMU's stream. Records go out in the order they came; when one lacks its
/// content, it and everything after it wait in `pending` until the content arrives.
/// The memory digest is taken as records go out, so it follows the same order.
pub(super) struct Rebuild {
    /// The protocol version of the migration (which page records may come).
    version: u16,
    feeder: Feeder,
    enc: Encoder,
    out: Segments,
    names: Vec<BlockName>,
    digest: Option<MemoryDigest>,
    corrupt_pending: bool,
    pending: VecDeque<Pending>,
    /// Bytes of what `pending` holds (bounded: [`limits::MAX_PENDING_BYTES`]).
    pending_bytes: u64,
    missing: HashSet<Hash>,
    /// The RAM blocks' lengths, from RamBlocks.
    lengths: Vec<u64>,
    /// Stream units in `out`.
    out_units: u64,
}

/// Writes the rebuilt stream into the destination QEMU on a task of its own, so that the
/// migration goes on reading, checking and resolving the next frames while QEMU takes the
/// last ones (QEMU starts loading as soon as bytes arrive, and neither side waits on the
/// other); tells the source (v2) how much QEMU took, every 256 KiB and whenever it took
/// all that was queued. At most
/// [`Feeder::QUEUE`] batches wait for it.
struct Feeder {
    tx: Option<mpsc::Sender<(Segments, u64)>>,
    task: Option<tokio::task::JoinHandle<Result<unix::OwnedWriteHalf, IncomingError>>>,
    applied: Arc<AtomicU64>,
}

impl Feeder {
    const QUEUE: usize = 8;

    /// None (its stream went with a broken link): a feed fails.
    fn closed() -> Feeder {
        Feeder {
            tx: None,
            task: None,
            applied: Arc::new(AtomicU64::new(0)),
        }
    }

    fn start(mut qemu: unix::OwnedWriteHalf, writer: PeerWriter, version: u16) -> Feeder {
        let (tx, mut rx) = mpsc::channel::<(Segments, u64)>(Self::QUEUE);
        let applied = Arc::new(AtomicU64::new(0));
        let a = applied.clone();
        let task = crate::spawn(async move {
            let mut reported = 0;
            while let Some((mut out, units)) = rx.recv().await {
                out.write_to(&mut qemu)
                    .await
                    .map_err(|e| IncomingError::Qemu(format!("writing its stream failed: {e}")))?;
                let applied = a.fetch_add(units, Ordering::Relaxed) + units;
                // also whenever QEMU has taken all there is: a source that keeps little in
                // flight (draining before post-copy) waits on this word
                if version >= 2
                    && applied > reported
                    && (applied - reported >= limits::APPLIED_EVERY || rx.is_empty())
                {
                    reported = applied;
                    send(&writer, &Message::Applied { units: applied }).await?;
                }
            }
            Ok(qemu)
        });
        Feeder {
            tx: Some(tx),
            task: Some(task),
            applied,
        }
    }

    /// Stream units QEMU has taken.
    fn applied(&self) -> u64 {
        self.applied.load(Ordering::Relaxed)
    }

    /// Queues a batch; waits only while [`Feeder::QUEUE`] batches are ahead of it.
    async fn feed(&mut self, out: Segments, units: u64) -> Result<(), IncomingError> {
        let sent = match &self.tx {
            Some(tx) => tx.send((out, units)).await.is_ok(),
            None => false,
        };
        if sent {
            Ok(())
        } else {
            // the task ended early: its error says why
            Err(self
                .join()
                .await
                .err()
                .unwrap_or_else(|| IncomingError::Qemu("its stream writer stopped".into())))
        }
    }

    /// Waits until QEMU took everything queued; gives its stream back.
    async fn finish(&mut self) -> Result<unix::OwnedWriteHalf, IncomingError> {
        self.tx = None;
        self.join().await
    }

    async fn join(&mut self) -> Result<unix::OwnedWriteHalf, IncomingError> {
        self.tx = None;
        match self.task.take() {
            Some(t) => t
                .await
                .map_err(|e| IncomingError::Qemu(format!("its stream writer failed: {e}")))?,
            None => Err(IncomingError::Qemu("its stream writer stopped".into())),
        }
    }
}

impl Drop for Feeder {
    fn drop(&mut self) {
        if let Some(t) = &self.task {
            t.abort();
        }
    }
}

impl Rebuild {
    /// Hands what is queued to the feeder.
    async fn flush(&mut self) -> Result<(), IncomingError> {
        if self.out.is_empty() {
            return Ok(());
        }
        let out = std::mem::take(&mut self.out);
        let units = std::mem::take(&mut self.out_units);
        self.feeder.feed(out, units).await
    }

    /// A page record fits the VM's RAM blocks and carries a whole page: checked before
    /// anything of it is stored or hashed.
    fn check_record(&self, block: u16, p: &tern_proto::Page) -> Result<(), IncomingError> {
        let len = self.lengths.get(block as usize).copied().unwrap_or(0);
        if !p.offset.is_multiple_of(limits::PAGE_SIZE) || p.offset >= len {
            return Err(refuse(
                ErrorCode::Protocol,
                format!(
                    "page record at {:#x} of block #{block} is outside its {len} bytes or not page-aligned",
                    p.offset
                ),
            ));
        }
        if p.body.since() > self.version {
            return Err(refuse(
                ErrorCode::Protocol,
                format!(
                    "a page record of protocol v{} in a v{} migration",
                    p.body.since(),
                    self.version
                ),
            ));
        }
        if let PageBody::ZeroRun { pages, .. } = &p.body {
            let end = u64::from(*pages)
                .checked_mul(limits::PAGE_SIZE)
                .and_then(|n| n.checked_add(p.offset));
            if *pages == 0 || end.is_none_or(|e| e > len) {
                return Err(refuse(
                    ErrorCode::Protocol,
                    format!(
                        "a run of {pages} zero pages at {:#x} of block #{block} does not fit its {len} bytes",
                        p.offset
                    ),
                ));
            }
        }
        if let PageBody::Raw(d) | PageBody::Plain(d) = &p.body {
            if d.len() as u64 != limits::PAGE_SIZE {
                return Err(refuse(
                    ErrorCode::Protocol,
                    format!(
                        "page of {} bytes (pages are {})",
                        d.len(),
                        limits::PAGE_SIZE
                    ),
                ));
            }
        }
        Ok(())
    }

    fn push(&mut self, p: Pending, c: &Counters) -> Result<(), IncomingError> {
        let ready = !matches!(p, Pending::Page { data: None, .. });
        if self.pending.is_empty() && ready {
            return self.write(p, c);
        }
        self.pending_bytes += p.bytes();
        self.pending.push_back(p);
        if self.pending.len() > limits::MAX_PENDING_RECORDS
            || self.pending_bytes > limits::MAX_PENDING_BYTES
        {
            return Err(refuse(
                ErrorCode::Protocol,
                format!(
                    "{} records ({} bytes) wait behind {} pages the source referred to and did not send",
                    self.pending.len(),
                    self.pending_bytes,
                    self.missing.len()
                ),
            ));
        }
        Ok(())
    }

    fn fill(&mut self, h: Hash, data: &Bytes) {
        self.missing.remove(&h);
        for p in self.pending.iter_mut() {
            if let Pending::Page {
                data: d @ None,
                hash,
                ..
            } = p
            {
                if *hash == h {
                    *d = Some(data.clone());
                }
            }
        }
    }

    fn drain(&mut self, c: &Counters) -> Result<(), IncomingError> {
        while let Some(p) = self.pending.front() {
            if matches!(p, Pending::Page { data: None, .. }) {
                break;
            }
            let p = self.pending.pop_front().expect("front");
            self.pending_bytes -= p.bytes();
            self.write(p, c)?;
        }
        Ok(())
    }

    fn write(&mut self, p: Pending, _c: &Counters) -> Result<(), IncomingError> {
        let bad = |e: crate::digest::DigestError| refuse(ErrorCode::Protocol, e.to_string());
        let d = self.digest.as_mut();
        let rec = match p {
            Pending::Verbatim(b) => {
                self.out_units += b.len() as u64;
                self.out.push(b);
                return Ok(());
            }
            Pending::Zero {
                block,
                offset,
                fill,
                pages,
            } => {
                let d = d.ok_or_else(|| refuse(ErrorCode::Protocol, "page before RamBlocks"))?;
                let ps = self.enc.page_size();
                for i in 0..u64::from(pages) {
                    d.fill(block as usize, offset + i * ps, fill).map_err(bad)?;
                    self.out_units += ps;
                    let rec = RamRecord::Zero {
                        block: self.names[block as usize].clone(),
                        offset: offset + i * ps,
                        fill,
                        named: false,
                    };
                    self.enc
                        .encode(&Item::Ram(rec), NameMode::Auto, self.out.scratch());
                }
                return Ok(());
            }
            Pending::Page {
                block,
                offset,
                data,
                ..
            } => {
                let d = d.ok_or_else(|| refuse(ErrorCode::Protocol, "page before RamBlocks"))?;
                let data = data.expect("written only once its content is here");
                if data.len() as u64 != d.page_size() {
                    return Err(refuse(ErrorCode::Protocol, "page of the wrong size"));
                }
                let data = if self.corrupt_pending && data.iter().any(|&b| b != 0) {
                    self.corrupt_pending = false;
                    let mut v = data.to_vec();
                    v[100] ^= 0x5a;
                    v.into()
                } else {
                    data
                };
                d.page(block as usize, offset, &data).map_err(bad)?;
                RamRecord::Page {
                    block: self.names[block as usize].clone(),
                    offset,
                    data,
                    named: false,
                }
            }
        };
        self.out_units += self.enc.page_size();
        self.enc
            .encode(&Item::Ram(rec), NameMode::Auto, self.out.scratch());
        Ok(())
    }
}

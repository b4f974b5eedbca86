//! A VM's local disks inside a migration (protocol v3): the source's rounds and the
//! destination's rebuild.
//!
//! ```text
//!  source                                              destination
//!  DiskOffer{sizes} (before Prepare)     ------------>  room? images in RUN/disks, QEMU
//!                                                       -incoming, writable NBD exports
//!  round 0, per 4 MiB piece with data:
//!   read (frozen bitmap tern-r0 export), hash blocks
//!   DiskManifest{piece, hashes}         ------------>  plan against the chunk index,
//!                                                       write the blocks it holds
//!                                       <------------  DiskWant{piece, runs it lacks}
//!   DiskData{piece, run} (from the same read) ------->  hash-checked against the manifest
//!  rounds 1..: blocks a frozen dirty bitmap marks
//!   DiskData{DIRECT, offset, bytes}     ------------>  written as they are
//!  every round: DiskRoundEnd            ------------>  all written, flushed
//!                                       <------------  DiskRoundDone (not awaited for
//!                                                      the last round, nor for a live
//!                                                      round once QEMU paused)
//!  the last round runs at QEMU's pre-switchover (guest stopped, disks drained), before
//!  migrate-continue; the destination drops its exports before the VM runs.
//! ```
//!
//! Owns the order of disk messages, the window of pieces in flight, the destination's
//! worker thread (tern-chunks is blocking) and the disk part of the report. QMP sequences
//! are `tern_qemu::disk`'s, NBD is `tern_nbd`'s, hashing and rebuilding `tern_chunks`'.
//! Disk frames share the control connection with memory, so one link and one writer carry
//! both.

use std::cell::RefCell;
use std::collections::HashMap;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::rc::Rc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use tern_chunks::{BlockTarget, Manifest, NbdTarget, Rebuild, BLOCK_BYTES, BLOCK_SIZE};
use tern_nbd::{dirty_bitmap_context, ConnectOptions, NbdClient, BASE_ALLOCATION};
use tern_proto::{Codec, DiskInfo, ErrorCode, FrameCompressor, Message, DISK_DIRECT};
use tern_qemu::disk::{self as qdisk, DirtyTracker, FrozenBitmap, NbdExport, RemoveMode};
use tern_qemu::qmp::QmpClient;
use tern_qemu::spec::VmSpec;
use tokio::net::UnixStream;
use tokio::sync::{mpsc, oneshot, watch};

use crate::error::error_chain;
use crate::handle::{DiskReport, MigrationHandle};
use crate::transport::links::PeerWriter;
use crate::transport::rate::RateLimit;

/// The host's chunk index, shared by imports and migrations (blocking API: use it from a
/// worker thread or `spawn_blocking`).
pub type SharedIndex = Arc<std::sync::Mutex<tern_chunks::ChunkIndex>>;

/// Round 0 reads and describes the disk in pieces of this size.
pub const PIECE_BYTES: u64 = 4 << 20;
/// Pieces whose DiskWant has not come yet (their bytes are held until it does).
const WINDOW: usize = 8;
/// Largest DiskData payload.
const DATA_BYTES: usize = 1 << 20;
/// Live rounds before memory moves stop once a round finds this little dirty...
const CONVERGED_BYTES: u64 = 1 << 20;
/// ...or after this many rounds.
const MAX_ROUNDS_BEFORE_MEMORY: u32 = 10;
/// While memory moves, a new dirty round starts at most this often.
const LIVE_ROUND_INTERVAL: Duration = Duration::from_millis(250);
/// QMP export removal and similar waits.
const QEMU_WAIT: Duration = Duration::from_secs(10);

/// Why the source's disk rounds failed.
#[derive(Debug, thiserror::Error)]
pub enum SourceDiskError {
    #[error("disk {disk}: cannot describe its block node")]
    Query {
        disk: usize,
        #[source]
        source: qdisk::QueryNodeError,
    },
    #[error("cannot start QEMU's NBD server for the disks")]
    NbdServer(#[source] qdisk::StartNbdServerError),
    #[error("disk {disk}: cannot start dirty tracking")]
    Track {
        disk: usize,
        #[source]
        source: qdisk::StartTrackingError,
    },
    #[error("disk {disk}: cannot end a dirty-bitmap round")]
    Freeze {
        disk: usize,
        #[source]
        source: qdisk::FreezeRoundError,
    },
    #[error("disk {disk}: cannot export it over NBD")]
    Export {
        disk: usize,
        #[source]
        source: qdisk::ExportError,
    },
    #[error("disk {disk}: cannot remove its NBD export")]
    RemoveExport {
        disk: usize,
        #[source]
        source: qdisk::RemoveExportError,
    },
    #[error("disk {disk}: cannot drop a round's dirty bitmap")]
    Release {
        disk: usize,
        #[source]
        source: qdisk::ReleaseBitmapError,
    },
    #[error("disk {disk}: cannot connect to its NBD export")]
    Connect {
        disk: usize,
        #[source]
        source: tern_nbd::ConnectError,
    },
    #[error("disk {disk}: reading it over NBD failed")]
    Read {
        disk: usize,
        #[source]
        source: tern_nbd::ReadError,
    },
    #[error("disk {disk}: asking QEMU which blocks hold data failed")]
    Status {
        disk: usize,
        #[source]
        source: tern_nbd::BlockStatusError,
    },
    #[error("sending disk data to the destination agent failed")]
    PeerWrite(#[source] std::io::Error),
    #[error("the connection to the destination agent ended during the disk copy")]
    PeerGone,
    #[error("the destination agent broke the disk protocol: {0}")]
    Protocol(String),
    #[error("no answer from the destination agent for {0:?} during the disk copy")]
    Stalled(Duration),
}

impl SourceDiskError {
    pub fn code(&self) -> ErrorCode {
        match self {
            SourceDiskError::PeerWrite(_) | SourceDiskError::PeerGone => ErrorCode::Protocol,
            SourceDiskError::Protocol(_) => ErrorCode::Protocol,
            SourceDiskError::Stalled(_) => ErrorCode::Timeout,
            _ => ErrorCode::QemuFailed,
        }
    }
}

/// What the destination tells the source's disk rounds.
pub type DiskInbox = mpsc::Receiver<Message>;

/// One disk on the source.
struct SrcDisk {
    size: u64,
    tracker: DirtyTracker,
    rounds: u32,
}

/// The source's disks during a migration: NBD server, dirty trackers, counters.
pub struct SourceDisks {
    qmp: QmpClient,
    sock: PathBuf,
    disks: Vec<SrcDisk>,
    writer: PeerWriter,
    hasher: tern_store::ContentHasher,
    codec: Codec,
    comp: FrameCompressor,
    buf: BytesMut,
    stall: Duration,
    budget: Option<Arc<RateLimit>>,
    handle: Arc<MigrationHandle>,
    pub report: DiskReport,
    started: Instant,
}

/// Bytes of the disk files behind `path` (the image and its backing file), at most `cap`:
/// what the destination must have room for.
fn allocated_bytes(path: &Path, backing: Option<&Path>, cap: u64) -> u64 {
    use std::os::unix::fs::MetadataExt;
    let used = |p: &Path| std::fs::metadata(p).map_or(0, |m| m.blocks() * 512);
    // a qcow2 header may name its backing file relative to the image's directory
    let backing = backing.map(|b| match path.parent() {
        Some(dir) if b.is_relative() => dir.join(b),
        _ => b.to_path_buf(),
    });
    (used(path) + backing.as_deref().map_or(0, used)).min(cap)
}

/// Block runs `(offset, blocks)` of sorted block offsets.
pub fn runs_of(offsets: &[u64]) -> Vec<(u64, u32)> {
    let mut runs: Vec<(u64, u32)> = Vec::new();
    for &o in offsets {
        match runs.last_mut() {
            Some((start, n)) if *start + u64::from(*n) * BLOCK_SIZE == o && *n < u32::MAX => {
                *n += 1
            }
            _ => runs.push((o, 1)),
        }
    }
    runs
}

impl SourceDisks {
    /// Describes the VM's disks (sizes for the destination) before anything is exported.
    pub async fn describe(
        qmp: &QmpClient,
        spec: &VmSpec,
    ) -> Result<Vec<DiskInfo>, SourceDiskError> {
        let mut infos = Vec::new();
        for i in local_disks(spec) {
            let d = &spec.disks[i];
            let info = qdisk::query_node(qmp, &qdisk::node_name(i))
                .await
                .map_err(|source| SourceDiskError::Query { disk: i, source })?;
            infos.push(DiskInfo {
                virtual_size: info.virtual_size,
                allocated: allocated_bytes(
                    &d.path,
                    info.backing_file.as_deref(),
                    info.virtual_size,
                ),
            });
        }
        Ok(infos)
    }

    /// Starts QEMU's NBD server (socket in `run_dir`) and dirty tracking of every local
    /// disk ([`SourceDisks::describe`]'s, in spec order; `nodes[k]` is the spec index of
    /// the k-th, [`local_disks`]).
    #[allow(clippy::too_many_arguments)]
    pub async fn start(
        qmp: QmpClient,
        run_dir: &Path,
        nodes: &[usize],
        disks_info: &[DiskInfo],
        writer: PeerWriter,
        hasher: tern_store::ContentHasher,
        codec: Codec,
        stall: Duration,
        budget: Option<Arc<RateLimit>>,
        handle: Arc<MigrationHandle>,
    ) -> Result<Self, SourceDiskError> {
        let sock = run_dir.join("disk-nbd.sock");
        let _ = std::fs::remove_file(&sock);
        let mut disks = Vec::new();
        let mut report = DiskReport {
            disks: disks_info.len() as u32,
            ..DiskReport::default()
        };
        // an agent that died mid-migration may have left its NBD server, exports and
        // bitmaps in this QEMU: start from none
        stop_source_disks(&qmp, nodes.iter().max().map_or(0, |n| n + 1)).await;
        qdisk::start_nbd_server(&qmp, &sock)
            .await
            .map_err(SourceDiskError::NbdServer)?;
        for (i, info) in disks_info.iter().enumerate() {
            let size = info.virtual_size;
            let node = qdisk::node_name(nodes.get(i).copied().unwrap_or(i));
            let tracker = DirtyTracker::start(&qmp, &node, Some(BLOCK_SIZE as u32))
                .await
                .map_err(|source| SourceDiskError::Track { disk: i, source })?;
            report.virtual_bytes += size;
            disks.push(SrcDisk {
                size,
                tracker,
                rounds: 0,
            });
        }
        Ok(SourceDisks {
            qmp,
            sock,
            disks,
            writer,
            hasher,
            codec,
            comp: FrameCompressor::default(),
            buf: BytesMut::new(),
            stall,
            budget,
            handle,
            report,
            started: Instant::now(),
        })
    }

    /// Sends one frame (bulk frames compressed with the migration's disk codec).
    async fn send(&mut self, m: &Message, bulk: bool) -> Result<(), SourceDiskError> {
        // compressed before the writer is locked: memory frames need not wait for it
        let (frame, n) = if bulk && self.codec != Codec::None {
            let r = self.comp.encode(m, self.codec, &mut self.buf);
            (Some(self.buf.split().freeze()), r.wire as u64)
        } else {
            (None, tern_proto::frame_len(m) as u64)
        };
        self.report.wire_bytes += n;
        if let Some(b) = &self.budget {
            b.take(n).await;
        }
        let mut w = self.writer.lock().await;
        match frame {
            Some(f) => w.push_encoded(f),
            None => w.push(m),
        }
        w.flush().await.map_err(SourceDiskError::PeerWrite)?;
        self.handle
            .counters
            .wire_out
            .store(w.bytes_written, std::sync::atomic::Ordering::Relaxed);
        Ok(())
    }

    /// Shows the disks' progress in the migration's status.
    fn publish(&mut self) {
        self.report.rounds = self.disks.iter().map(|d| d.rounds).max().unwrap_or(0);
        let r = self.report.clone();
        self.handle.update(|s| {
            // the disks' full copy as a share of all the work (disks, then memory)
            let all = r.virtual_bytes as f64 + s.progress.ram_total.unwrap_or(0) as f64;
            let pct = 100.0 * r.scanned_bytes as f64 / all.max(1.0);
            s.progress.percent = s.progress.percent.max(pct.min(99.0));
            s.progress.disk = Some(r);
        });
    }

    async fn next_reply(&self, inbox: &mut DiskInbox) -> Result<Message, SourceDiskError> {
        match tokio::time::timeout(self.stall, inbox.recv()).await {
            Ok(Some(m)) => Ok(m),
            Ok(None) => Err(SourceDiskError::PeerGone),
            Err(_) => Err(SourceDiskError::Stalled(self.stall)),
        }
    }

    /// Freezes disk `d`'s round, exports it and connects to the export.
    async fn open_round(
        &mut self,
        d: usize,
    ) -> Result<(FrozenBitmap, NbdExport, NbdClient<UnixStream>), SourceDiskError> {
        let tracker = &mut self.disks[d].tracker;
        let frozen = tracker
            .freeze(&self.qmp)
            .await
            .map_err(|source| SourceDiskError::Freeze { disk: d, source })?;
        let export = qdisk::export_frozen(&self.qmp, &frozen)
            .await
            .map_err(|source| SourceDiskError::Export { disk: d, source })?;
        let opts = ConnectOptions::new(export.name.clone())
            .with_dirty_bitmap(&frozen.bitmap)
            .with_base_allocation();
        let client = NbdClient::connect_unix(&self.sock, &opts)
            .await
            .map_err(|source| SourceDiskError::Connect { disk: d, source })?;
        Ok((frozen, export, client))
    }

    /// Ends disk `d`'s round: the destination confirms, then the export and the round's
    /// bitmap go. When `stop` turns true meanwhile (QEMU paused for the switchover), the
    /// confirmation is not awaited: the round's data went out before the last round's,
    /// on the same connection, and the destination applies all of it before the VM runs.
    #[allow(clippy::too_many_arguments)]
    async fn close_round(
        &mut self,
        d: usize,
        round: u32,
        frozen: FrozenBitmap,
        export: NbdExport,
        client: NbdClient<UnixStream>,
        inbox: &mut DiskInbox,
        stop: Option<&mut watch::Receiver<bool>>,
    ) -> Result<(), SourceDiskError> {
        self.send(
            &Message::DiskRoundEnd {
                disk: d as u16,
                round,
                last: false,
            },
            false,
        )
        .await?;
        let reply = match stop {
            Some(stop) => tokio::select! {
                r = self.next_reply(inbox) => Some(r?),
                _ = stop.wait_for(|v| *v) => None,
            },
            None => Some(self.next_reply(inbox).await?),
        };
        match reply {
            None => {}
            Some(Message::DiskRoundDone { disk, round: r, .. })
                if disk as usize == d && r == round => {}
            Some(m) => {
                return Err(SourceDiskError::Protocol(format!(
                    "expected DiskRoundDone for disk {d} round {round}, got {}",
                    m.name()
                )))
            }
        }
        let _ = client.disconnect().await;
        qdisk::remove_export(&self.qmp, &export, RemoveMode::Safe, QEMU_WAIT)
            .await
            .map_err(|source| SourceDiskError::RemoveExport { disk: d, source })?;
        let tracker = &mut self.disks[d].tracker;
        tracker
            .release(&self.qmp, frozen)
            .await
            .map_err(|source| SourceDiskError::Release { disk: d, source })?;
        self.disks[d].rounds += 1;
        Ok(())
    }

    /// Round 0 of disk `d`: every piece with data as a manifest, then the blocks the
    /// destination lacks, from the same read.
    async fn full_round(&mut self, d: usize, inbox: &mut DiskInbox) -> Result<(), SourceDiskError> {
        let (frozen, export, mut client) = self.open_round(d).await?;
        let size = self.disks[d].size;
        let alloc = client.meta_context_id(BASE_ALLOCATION).ok_or_else(|| {
            SourceDiskError::Protocol("QEMU did not offer base:allocation".into())
        })?;
        let data: Vec<Range<u64>> = client
            .extents(alloc, 0..size)
            .await
            .map_err(|source| SourceDiskError::Status { disk: d, source })?
            .into_iter()
            .filter(|e| !e.is_zero())
            .map(|e| e.range())
            .collect();
        // pieces in flight: piece -> (start, bytes read, data blocks in its manifest)
        let mut inflight: HashMap<u32, (u64, Bytes, u64)> = HashMap::new();
        let mut next_range = 0;
        let pieces = size.div_ceil(PIECE_BYTES);
        for piece in 0..pieces {
            let start = piece * PIECE_BYTES;
            let end = (start + PIECE_BYTES).min(size);
            // the data ranges that touch this piece
            while next_range < data.len() && data[next_range].end <= start {
                next_range += 1;
            }
            let touching: Vec<Range<u64>> = data[next_range..]
                .iter()
                .take_while(|r| r.start < end)
                .map(|r| r.start.max(start)..r.end.min(end))
                .collect();
            if touching.is_empty() {
                continue; // reads as zero; so does the destination's new image
            }
            while inflight.len() >= WINDOW {
                self.answer_want(d, inbox, &mut inflight).await?;
            }
            let mut buf = vec![0u8; (end - start) as usize];
            for r in &touching {
                client
                    .read_into(
                        &mut buf[(r.start - start) as usize..(r.end - start) as usize],
                        r.start,
                    )
                    .await
                    .map_err(|source| SourceDiskError::Read { disk: d, source })?;
            }
            let mut manifest = Manifest::new(start..end).expect("piece starts are aligned");
            for (i, block) in buf.chunks(BLOCK_BYTES).enumerate() {
                manifest
                    .push_block(start + (i * BLOCK_BYTES) as u64, block, &self.hasher)
                    .expect("blocks in order");
            }
            let data_blocks = manifest.data_blocks();
            self.report.data_bytes += data_blocks * BLOCK_SIZE;
            self.report.scanned_bytes += end - start;
            self.publish();
            if data_blocks == 0 {
                continue;
            }
            self.send(
                &Message::DiskManifest {
                    disk: d as u16,
                    piece: piece as u32,
                    manifest: Bytes::from(manifest.encode()),
                },
                false,
            )
            .await?;
            inflight.insert(piece as u32, (start, Bytes::from(buf), data_blocks));
        }
        while !inflight.is_empty() {
            self.answer_want(d, inbox, &mut inflight).await?;
        }
        self.close_round(d, 0, frozen, export, client, inbox, None)
            .await
    }

    /// Waits for one DiskWant and sends what it asks for.
    async fn answer_want(
        &mut self,
        d: usize,
        inbox: &mut DiskInbox,
        inflight: &mut HashMap<u32, (u64, Bytes, u64)>,
    ) -> Result<(), SourceDiskError> {
        let (piece, runs) = match self.next_reply(inbox).await? {
            Message::DiskWant { disk, piece, runs } if disk as usize == d => (piece, runs),
            m => {
                return Err(SourceDiskError::Protocol(format!(
                    "expected DiskWant for disk {d}, got {}",
                    m.name()
                )))
            }
        };
        let Some((start, bytes, data_blocks)) = inflight.remove(&piece) else {
            return Err(SourceDiskError::Protocol(format!(
                "DiskWant for piece {piece} of disk {d}, which is not in flight"
            )));
        };
        // runs in order, apart, inside the piece: each block is sent at most once (all
        // checked before anything is sent)
        let mut covered = start;
        for &(offset, blocks) in &runs {
            let end = offset.saturating_add(u64::from(blocks) * BLOCK_SIZE);
            if offset < covered
                || end > start + bytes.len() as u64 + BLOCK_SIZE
                || blocks == 0
                || !(offset - start).is_multiple_of(BLOCK_SIZE)
            {
                return Err(SourceDiskError::Protocol(format!(
                    "DiskWant run {offset}+{blocks} blocks is outside piece {piece}, unaligned, or overlaps another"
                )));
            }
            covered = end;
        }
        let mut wanted = 0u64;
        for (offset, blocks) in runs {
            let end = offset.saturating_add(u64::from(blocks) * BLOCK_SIZE);
            let end = end.min(start + bytes.len() as u64);
            wanted += u64::from(blocks);
            let mut at = offset;
            while at < end {
                let n = ((end - at) as usize).min(DATA_BYTES);
                let lo = (at - start) as usize;
                let data = bytes.slice(lo..lo + n);
                self.report.sent_bytes += n as u64;
                self.send(
                    &Message::DiskData {
                        disk: d as u16,
                        piece,
                        offset: at,
                        data,
                    },
                    true,
                )
                .await?;
                at += n as u64;
            }
        }
        self.report.local_bytes += data_blocks.saturating_sub(wanted) * BLOCK_SIZE;
        Ok(())
    }

    /// A dirty round of disk `d`: the blocks its frozen bitmap marks, as they are now.
    /// Returns the dirty bytes.
    async fn dirty_round(
        &mut self,
        d: usize,
        inbox: &mut DiskInbox,
        last: bool,
        stop: Option<&mut watch::Receiver<bool>>,
    ) -> Result<u64, SourceDiskError> {
        let round = self.disks[d].rounds;
        let (frozen, export, mut client) = self.open_round(d).await?;
        let size = self.disks[d].size;
        let ctx = dirty_bitmap_context(&frozen.bitmap);
        let id = client
            .meta_context_id(&ctx)
            .ok_or_else(|| SourceDiskError::Protocol(format!("QEMU did not offer {ctx}")))?;
        let dirty = client
            .dirty_ranges(id, 0..size)
            .await
            .map_err(|source| SourceDiskError::Status { disk: d, source })?;
        let mut total = 0;
        let mut buf = vec![0u8; DATA_BYTES];
        for r in dirty {
            let mut at = r.start;
            while at < r.end {
                let n = ((r.end - at) as usize).min(DATA_BYTES);
                client
                    .read_into(&mut buf[..n], at)
                    .await
                    .map_err(|source| SourceDiskError::Read { disk: d, source })?;
                self.report.sent_bytes += n as u64;
                total += n as u64;
                self.send(
                    &Message::DiskData {
                        disk: d as u16,
                        piece: DISK_DIRECT,
                        offset: at,
                        data: Bytes::copy_from_slice(&buf[..n]),
                    },
                    true,
                )
                .await?;
                at += n as u64;
            }
        }
        if last {
            // no waiting for DiskRoundDone: the destination applies this round before
            // its VM runs
            self.send(
                &Message::DiskRoundEnd {
                    disk: d as u16,
                    round,
                    last: true,
                },
                false,
            )
            .await?;
            // QEMU inactivates its disks at the switchover: no export may hold them then
            // (the bitmaps stay until the VM is gone or a failure cleans up)
            let _ = client.disconnect().await;
            qdisk::remove_export(&self.qmp, &export, RemoveMode::Hard, QEMU_WAIT)
                .await
                .map_err(|source| SourceDiskError::RemoveExport { disk: d, source })?;
            drop(frozen);
            self.disks[d].rounds += 1;
            return Ok(total);
        }
        self.close_round(d, round, frozen, export, client, inbox, stop)
            .await?;
        self.publish();
        Ok(total)
    }

    /// Before memory moves: round 0 of every disk, then dirty rounds until one finds
    /// little (the guest keeps writing meanwhile).
    pub async fn copy(&mut self, inbox: &mut DiskInbox) -> Result<(), SourceDiskError> {
        for d in 0..self.disks.len() {
            self.full_round(d, inbox).await?;
            self.report.scanned_bytes = self.disks[..=d].iter().map(|d| d.size).sum();
            self.publish();
        }
        for _ in 1..MAX_ROUNDS_BEFORE_MEMORY {
            let mut dirty = 0;
            for d in 0..self.disks.len() {
                dirty += self.dirty_round(d, inbox, false, None).await?;
            }
            if dirty <= CONVERGED_BYTES {
                break;
            }
        }
        self.report.copy_ms = self.started.elapsed().as_millis() as u64;
        Ok(())
    }

    /// While memory moves: dirty rounds, at most every [`LIVE_ROUND_INTERVAL`], until
    /// `stop` says the last round is due. Hands itself back for it.
    pub async fn live(
        mut self,
        mut inbox: DiskInbox,
        mut stop: watch::Receiver<bool>,
    ) -> (Self, DiskInbox, Result<(), SourceDiskError>) {
        loop {
            let t = Instant::now();
            for d in 0..self.disks.len() {
                if *stop.borrow() {
                    return (self, inbox, Ok(()));
                }
                if let Err(e) = self
                    .dirty_round(d, &mut inbox, false, Some(&mut stop))
                    .await
                {
                    return (self, inbox, Err(e));
                }
            }
            let rest = LIVE_ROUND_INTERVAL.saturating_sub(t.elapsed());
            tokio::select! {
                _ = stop.wait_for(|v| *v) => return (self, inbox, Ok(())),
                _ = tokio::time::sleep(rest) => {}
            }
        }
    }

    /// The last round, with the guest stopped at pre-switchover: afterwards the
    /// destination's images equal the source's.
    pub async fn last_round(&mut self, inbox: &mut DiskInbox) -> Result<(), SourceDiskError> {
        let t = Instant::now();
        let mut bytes = 0;
        for d in 0..self.disks.len() {
            bytes += self.dirty_round(d, inbox, true, None).await?;
        }
        self.report.last_round_bytes = bytes;
        self.report.last_round_ms = t.elapsed().as_secs_f64() * 1e3;
        self.report.rounds = self.disks.iter().map(|d| d.rounds).max().unwrap_or(0);
        Ok(())
    }
}

/// Removes tern's exports, bitmaps and NBD server from a source QEMU with `disks` disks:
/// after the last round, or after a failed migration (the VM keeps running untouched).
pub async fn stop_source_disks(qmp: &QmpClient, disks: usize) {
    for i in 0..disks {
        let node = qdisk::node_name(i);
        let export = NbdExport {
            id: qdisk::export_id(&node),
            name: node.clone(),
            node: node.clone(),
            bitmap: None,
            writable: false,
        };
        let _ = qdisk::remove_export(qmp, &export, RemoveMode::Hard, QEMU_WAIT).await;
        if let Err(e) = qdisk::remove_tern_bitmaps(qmp, &node).await {
            tracing::warn!(%node, "cannot remove tern's dirty bitmaps: {e}");
        }
    }
    let _ = qdisk::stop_nbd_server(qmp).await;
}

/// The chunk format of a VM disk format.
pub fn chunk_format(f: tern_qemu::spec::DiskFormat) -> tern_chunks::ImageFormat {
    match f {
        tern_qemu::spec::DiskFormat::Raw => tern_chunks::ImageFormat::Raw,
        tern_qemu::spec::DiskFormat::Qcow2 => tern_chunks::ImageFormat::Qcow2,
    }
}

/// The spec indexes of `spec`'s local disks (those a migration copies), in order: the
/// k-th of them is disk k on the wire (DiskOffer, DiskData, ...). Shared disks
/// (`shared = true`) are not copied.
pub fn local_disks(spec: &VmSpec) -> Vec<usize> {
    (0..spec.disks.len())
        .filter(|&i| !spec.disks[i].shared)
        .collect()
}

/// Blocks a shared disk's sample reads ([`shared_sample`]).
const SAMPLE_BLOCKS: u64 = 8;

/// What a host sees of a shared disk's image at `path`: its length and the content of 8
/// blocks of 4 KiB spread over it (the first among them), as `len=N OFFSET:HASH ...`
/// (BLAKE3, 128 bits). The source sends it; the destination computes its own from the
/// image it opened ([`open_shared`]) and compares the two whole. Opened as
/// [`open_shared_image`] does. Blocking I/O.
pub fn shared_sample(path: &Path) -> Result<String, String> {
    let (f, _) = open_shared_image(path)?;
    sample_of(&f.plain).map_err(|e| format!("cannot read it ({e})"))
}

fn sample_of(f: &std::fs::File) -> std::io::Result<String> {
    let len = f.metadata()?.len();
    let mut out = format!("len={len}");
    for k in 0..SAMPLE_BLOCKS {
        let off = (len / SAMPLE_BLOCKS * k) & !4095;
        out.push_str(&format!(" {off}:{}", block_hash(f, off)?));
    }
    Ok(out)
}

fn block_hash(f: &std::fs::File, off: u64) -> std::io::Result<String> {
    use std::os::unix::fs::FileExt;
    let mut buf = vec![0u8; 4096];
    let mut n = 0;
    while n < buf.len() {
        match f.read_at(&mut buf[n..], off + n as u64)? {
            0 => break,
            k => n += k,
        }
    }
    let h = blake3::hash(&buf[..n]);
    Ok(h.as_bytes()[..16]
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect())
}

/// A shared disk's image, opened without trusting its path: a plain descriptor (for
/// reading a sample) and one for QEMU (read-write, O_DIRECT).
pub struct OpenedImage {
    pub plain: std::fs::File,
    pub direct: std::os::fd::OwnedFd,
}

/// Opens the image at `path` without trusting the path: no symbolic link anywhere in it
/// (`openat2` `RESOLVE_NO_SYMLINKS`, so a link swapped in leads nowhere), looked at
/// through an `O_PATH` descriptor first (nothing is opened for I/O before it is known to
/// be a regular file with one name: no device, FIFO or hard link to a file from
/// elsewhere), then reopened through that descriptor. With its (device, inode).
/// Blocking I/O: run it off the async threads.
pub fn open_shared_image(path: &Path) -> Result<(OpenedImage, (u64, u64)), String> {
    use rustix::fs::{openat2, Mode, OFlags, ResolveFlags, CWD};
    let at = openat2(
        CWD,
        path,
        OFlags::PATH | OFlags::CLOEXEC,
        Mode::empty(),
        ResolveFlags::NO_SYMLINKS | ResolveFlags::NO_MAGICLINKS,
    )
    .map_err(|e| format!("cannot open it ({e}; no symbolic links are followed)"))?;
    let st = rustix::fs::fstat(&at).map_err(|e| format!("cannot look at it ({e})"))?;
    if rustix::fs::FileType::from_raw_mode(st.st_mode) != rustix::fs::FileType::RegularFile {
        return Err("it is not a regular file".into());
    }
    if st.st_nlink != 1 {
        return Err("it has more than one name (hard links)".into());
    }
    let again = |flags: OFlags| {
        rustix::fs::open(
            format!("/proc/self/fd/{}", std::os::fd::AsRawFd::as_raw_fd(&at)),
            flags | OFlags::CLOEXEC | OFlags::NOCTTY,
            Mode::empty(),
        )
        .map_err(|e| format!("cannot open it ({e})"))
    };
    let plain = std::fs::File::from(again(OFlags::RDWR)?);
    let direct = again(OFlags::RDWR | OFlags::DIRECT)?;
    #[allow(clippy::unnecessary_cast)]
    let id = (st.st_dev as u64, st.st_ino as u64);
    Ok((OpenedImage { plain, direct }, id))
}

/// A shared disk's image opened for an incoming VM: QEMU gets `fd` (read-write,
/// O_DIRECT) instead of opening the path itself.
pub struct SharedImage {
    pub fd: std::os::fd::OwnedFd,
    /// (device, inode): which file it is, whatever the path.
    pub id: (u64, u64),
}

/// Opens the image at `path` (canonical, under a shared directory) that a peer named, as
/// [`open_shared_image`] does, and only if what it holds equals the source's `sample`
/// ([`shared_sample`]). Blocking I/O.
pub fn open_shared(path: &Path, sample: &str) -> Result<SharedImage, String> {
    let (image, id) = open_shared_image(path)?;
    let mine = sample_of(&image.plain).map_err(|e| format!("cannot read it here ({e})"))?;
    if mine != sample {
        return Err("its length or content differs from the image the source has".into());
    }
    Ok(SharedImage {
        fd: image.direct,
        id,
    })
}

// ---------------------------------------------------------------- destination

/// Free bytes for unprivileged use on the filesystem holding `dir`.
pub fn free_bytes(dir: &Path) -> std::io::Result<u64> {
    let s = rustix::fs::statvfs(dir).map_err(std::io::Error::from)?;
    Ok(s.f_bavail.saturating_mul(s.f_frsize))
}

/// Where the destination puts disk `index` of an incoming VM.
pub fn incoming_disk_path(run_dir: &Path, index: usize, format: &str) -> PathBuf {
    run_dir.join("disks").join(format!("disk{index}.{format}"))
}

/// Where the destination's disk worker writes one disk: the incoming QEMU's NBD export
/// (or, for fuzzing, memory).
pub trait DiskTarget: BlockTarget {
    /// Done with the disk: everything written is on it.
    fn close(self) -> std::io::Result<()>;
}

impl DiskTarget for NbdTarget {
    fn close(self) -> std::io::Result<()> {
        NbdTarget::close(self)
    }
}

/// A rebuild target shared by the pieces of one disk; flushed once per round.
struct SharedTarget<T>(Rc<RefCell<T>>);

impl<T: BlockTarget> BlockTarget for SharedTarget<T> {
    fn write_at(&mut self, offset: u64, data: &[u8]) -> std::io::Result<()> {
        self.0.borrow_mut().write_at(offset, data)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Why the destination's disk worker stopped.
#[derive(Debug, thiserror::Error)]
pub enum DestDiskError {
    #[error("the source sent a bad disk message: {0}")]
    Protocol(String),
    #[error("this host ran out of disk space writing disk {disk} at {offset}: free space in {dir} or migrate elsewhere")]
    Full {
        disk: u16,
        offset: u64,
        dir: PathBuf,
    },
    #[error("writing disk {disk} at {offset} into the destination QEMU failed: {message}")]
    Write {
        disk: u16,
        offset: u64,
        message: String,
    },
    #[error("cannot open disk {disk}'s NBD export: {0}", disk = .1)]
    Open(String, u16),
    #[error("reading this host's images failed: {0}")]
    Local(String),
}

impl DestDiskError {
    pub fn code(&self) -> ErrorCode {
        match self {
            DestDiskError::Protocol(_) => ErrorCode::Protocol,
            DestDiskError::Full { .. } => ErrorCode::ResourceExhausted,
            _ => ErrorCode::QemuFailed,
        }
    }
}

fn is_enospc(e: &dyn std::error::Error) -> bool {
    let mut cur: Option<&dyn std::error::Error> = Some(e);
    while let Some(c) = cur {
        let s = c.to_string();
        if s.contains("ENOSPC") || s.contains("No space left") {
            return true;
        }
        cur = c.source();
    }
    false
}

enum Cmd {
    Msg(Message),
    Finish(oneshot::Sender<Result<u64, DestDiskError>>),
}

/// The destination's disks during a migration: a worker thread writing into the incoming
/// QEMU's NBD exports.
pub struct DestDisks {
    tx: mpsc::Sender<Cmd>,
    /// Disks whose last round's DiskRoundEnd came.
    last_rounds: std::collections::HashSet<u16>,
    count: usize,
    /// The worker's failure, once.
    pub failed: mpsc::UnboundedReceiver<DestDiskError>,
    exports: Vec<NbdExport>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl DestDisks {
    /// Exports every disk of the incoming QEMU writable on an NBD server in `run_dir` and
    /// starts the worker. Replies (DiskWant, DiskRoundDone) go out through `writer`.
    /// `nodes[k]` is the spec index of the k-th disk offered (its local disks).
    #[allow(clippy::too_many_arguments)]
    pub async fn start(
        qmp: &QmpClient,
        run_dir: &Path,
        nodes: &[usize],
        sizes: Vec<u64>,
        claimed: u64,
        index: SharedIndex,
        hasher: tern_store::ContentHasher,
        writer: PeerWriter,
    ) -> Result<Self, String> {
        let sock = run_dir.join("disk-nbd.sock");
        qdisk::start_nbd_server(qmp, &sock)
            .await
            .map_err(|e| error_chain(&e))?;
        let mut exports = Vec::new();
        for i in 0..sizes.len() {
            let node = qdisk::node_name(nodes.get(i).copied().unwrap_or(i));
            let e = qdisk::export_writable(qmp, &node)
                .await
                .map_err(|e| error_chain(&e))?;
            exports.push(e);
        }
        let sizes_len = sizes.len();
        let (tx, mut rx) = mpsc::channel::<Cmd>(64);
        let (fail_tx, failed) = mpsc::unbounded_channel();
        let (reply_tx, mut reply_rx) = mpsc::unbounded_channel::<Message>();
        crate::spawn(async move {
            while let Some(m) = reply_rx.recv().await {
                if writer.lock().await.send(&m).await.is_err() {
                    return; // the connection is gone: the main loop finds out itself
                }
            }
        });
        let dir = run_dir.join("disks");
        let names: Vec<String> = exports.iter().map(|e| e.name.clone()).collect();
        // the worker's lines belong to the migration (its id and VM)
        let span = tracing::Span::current();
        let thread = std::thread::Builder::new()
            .name("tern-disk-in".into())
            .spawn(move || {
                let _entered = span.enter();
                let mut w = match Worker::open(
                    &sock,
                    &names,
                    WorkerSetup {
                        sizes,
                        claimed,
                        index,
                        hasher,
                        reply: reply_tx,
                        dir,
                    },
                ) {
                    Ok(w) => w,
                    Err(e) => {
                        let _ = fail_tx.send(e);
                        return;
                    }
                };
                while let Some(cmd) = rx.blocking_recv() {
                    match cmd {
                        Cmd::Msg(m) => {
                            if let Err(e) = w.handle(m) {
                                let _ = fail_tx.send(e);
                                return;
                            }
                        }
                        Cmd::Finish(done) => {
                            let _ = done.send(w.finish());
                            return;
                        }
                    }
                }
            })
            .map_err(|e| format!("cannot start the disk worker: {e}"))?;
        Ok(DestDisks {
            last_rounds: Default::default(),
            count: sizes_len,
            tx,
            failed,
            exports,
            thread: Some(thread),
        })
    }

    /// True once every disk's last round ended (its data is queued for the worker).
    pub fn all_last(&self) -> bool {
        self.last_rounds.len() == self.count
    }

    /// Hands a disk message to the worker (waits while it is busy: back-pressure).
    pub async fn handle(&mut self, m: Message) -> Result<(), DestDiskError> {
        if let Message::DiskRoundEnd {
            disk, last: true, ..
        } = m
        {
            // (a disk beyond the VM's is refused by the worker; it must not count here)
            if (disk as usize) < self.count {
                self.last_rounds.insert(disk);
            }
        }
        self.tx
            .send(Cmd::Msg(m))
            .await
            .map_err(|_| DestDiskError::Protocol("the disk worker stopped".into()))
    }

    /// After the last round, before the VM runs: every piece done, the NBD connections
    /// closed, the exports and the NBD server gone. Returns the bytes written.
    pub async fn finish(mut self, qmp: &QmpClient) -> Result<u64, String> {
        let (done_tx, done_rx) = oneshot::channel();
        self.tx
            .send(Cmd::Finish(done_tx))
            .await
            .map_err(|_| "the disk worker stopped early".to_string())?;
        let written = tokio::time::timeout(QEMU_WAIT * 6, done_rx)
            .await
            .map_err(|_| "the disk worker did not finish within 60 s".to_string())?
            .map_err(|_| "the disk worker stopped early".to_string())?
            .map_err(|e| e.to_string())?;
        if let Some(t) = self.thread.take() {
            let _ = tokio::task::spawn_blocking(move || t.join()).await;
        }
        for e in &self.exports {
            qdisk::finish_incoming(qmp, e, QEMU_WAIT)
                .await
                .map_err(|e| error_chain(&e))?;
        }
        qdisk::stop_nbd_server(qmp)
            .await
            .map_err(|e| error_chain(&e))?;
        Ok(written)
    }
}

struct Worker<T> {
    targets: Vec<Rc<RefCell<T>>>,
    sizes: Vec<u64>,
    pieces: HashMap<(u16, u32), Rebuild<SharedTarget<T>>>,
    index: SharedIndex,
    hasher: tern_store::ContentHasher,
    reply: mpsc::UnboundedSender<Message>,
    dir: PathBuf,
    round_written: Vec<u64>,
    written: u64,
    /// Bytes written per disk since its last flush: flushed every [`FLUSH_BYTES`], so the
    /// flush at a round's end (which the source waits for) stays short.
    unflushed: Vec<u64>,
    /// Per disk: the round whose data comes now, and whether its last round ended.
    rounds: Vec<u32>,
    closed: Vec<bool>,
    /// Round 0's pieces already described (each comes once).
    seen_pieces: Vec<std::collections::HashSet<u32>>,
    /// What the source said its disks hold, and what was written (all disks).
    claimed: u64,
    total_written: u64,
    checked_at: u64,
}

/// The destination flushes a disk at least every this many bytes written.
const FLUSH_BYTES: u64 = 64 << 20;

/// Free space an incoming disk copy leaves on the destination's filesystem, whatever the
/// source claimed (the room check before the copy keeps the same margin).
pub const FREE_SPACE_RESERVE: u64 = 16 << 20;

/// Past the claimed allocation, the free space is looked at every this many bytes written.
const FREE_CHECK_BYTES: u64 = 4 << 20;

/// What a disk worker needs besides its disks.
struct WorkerSetup {
    sizes: Vec<u64>,
    /// What the source said its disks hold (the free-space watch starts past it).
    claimed: u64,
    index: SharedIndex,
    hasher: tern_store::ContentHasher,
    reply: mpsc::UnboundedSender<Message>,
    /// Where the disks are (for the free space).
    dir: PathBuf,
}

impl Worker<NbdTarget> {
    fn open(sock: &Path, names: &[String], setup: WorkerSetup) -> Result<Self, DestDiskError> {
        let mut targets = Vec::new();
        for (i, name) in names.iter().enumerate() {
            let t = NbdTarget::connect_unix(sock, name)
                .map_err(|e| DestDiskError::Open(error_chain(&e), i as u16))?;
            targets.push(t);
        }
        Ok(Worker::new(targets, setup))
    }
}

impl<T: DiskTarget> Worker<T> {
    fn new(targets: Vec<T>, setup: WorkerSetup) -> Self {
        let WorkerSetup {
            sizes,
            claimed,
            index,
            hasher,
            reply,
            dir,
        } = setup;
        let targets: Vec<Rc<RefCell<T>>> = targets
            .into_iter()
            .map(|t| Rc::new(RefCell::new(t)))
            .collect();
        Worker {
            round_written: vec![0; targets.len()],
            unflushed: vec![0; targets.len()],
            rounds: vec![0; targets.len()],
            closed: vec![false; targets.len()],
            seen_pieces: vec![Default::default(); targets.len()],
            claimed,
            total_written: 0,
            checked_at: 0,
            targets,
            sizes,
            pieces: HashMap::new(),
            index,
            hasher,
            reply,
            dir,
            written: 0,
        }
    }

    fn disk(&self, disk: u16) -> Result<usize, DestDiskError> {
        let d = disk as usize;
        if d >= self.targets.len() {
            return Err(DestDiskError::Protocol(format!(
                "disk {disk}: the VM has {} disks",
                self.targets.len()
            )));
        }
        Ok(d)
    }

    /// A disk that may still get data (its last round has not ended).
    fn open_disk(&self, disk: u16) -> Result<usize, DestDiskError> {
        let d = self.disk(disk)?;
        if self.closed[d] {
            return Err(DestDiskError::Protocol(format!(
                "disk {disk}: data after its last round"
            )));
        }
        Ok(d)
    }

    fn write_error(&self, disk: u16, offset: u64, e: &dyn std::error::Error) -> DestDiskError {
        if is_enospc(e) {
            DestDiskError::Full {
                disk,
                offset,
                dir: self.dir.clone(),
            }
        } else {
            DestDiskError::Write {
                disk,
                offset,
                message: error_chain(e),
            }
        }
    }

    /// Counts `n` bytes written to disk `d`; flushes it when enough piled up. Past what
    /// the source said it has allocated, the filesystem's free space is watched: the
    /// copy stops before it would leave less than [`FREE_SPACE_RESERVE`] for everything
    /// else on this host (a source's `allocated` is a claim, not a promise).
    fn wrote(&mut self, d: usize, n: u64) -> Result<(), DestDiskError> {
        self.total_written += n;
        if self.total_written > self.claimed
            && self.total_written - self.checked_at >= FREE_CHECK_BYTES
        {
            self.checked_at = self.total_written;
            match free_bytes(&self.dir) {
                Ok(free) if free < FREE_SPACE_RESERVE => {
                    return Err(DestDiskError::Full {
                        disk: d as u16,
                        offset: 0,
                        dir: self.dir.clone(),
                    })
                }
                Ok(_) => {}
                Err(e) => {
                    tracing::warn!(dir = %self.dir.display(), "cannot tell the free space: {e}")
                }
            }
        }
        self.unflushed[d] += n;
        if self.unflushed[d] >= FLUSH_BYTES {
            self.unflushed[d] = 0;
            self.targets[d]
                .borrow_mut()
                .flush()
                .map_err(|e| self.write_error(d as u16, 0, &e))?;
        }
        Ok(())
    }

    fn handle(&mut self, m: Message) -> Result<(), DestDiskError> {
        match m {
            Message::DiskManifest {
                disk,
                piece,
                manifest,
            } => self.manifest(disk, piece, &manifest),
            Message::DiskData {
                disk,
                piece,
                offset,
                data,
            } => {
                let d = self.open_disk(disk)?;
                let end = offset.saturating_add(data.len() as u64);
                if end > self.sizes[d] {
                    return Err(DestDiskError::Protocol(format!(
                        "disk {disk}: data at {offset}..{end} beyond its {} bytes",
                        self.sizes[d]
                    )));
                }
                if piece == DISK_DIRECT {
                    self.targets[d]
                        .borrow_mut()
                        .write_at(offset, &data)
                        .map_err(|e| self.write_error(disk, offset, &e))?;
                } else {
                    let Some(rb) = self.pieces.get_mut(&(disk, piece)) else {
                        return Err(DestDiskError::Protocol(format!(
                            "disk {disk}: data for piece {piece}, which is not pending"
                        )));
                    };
                    if let Err(e) = rb.receive_run(offset, &data) {
                        return Err(match e {
                            tern_chunks::ReceiveChunkError::Target { .. } => {
                                self.write_error(disk, offset, &e)
                            }
                            e => DestDiskError::Protocol(format!("disk {disk}: {e}")),
                        });
                    }
                    if rb.is_complete() {
                        let rb = self.pieces.remove(&(disk, piece)).expect("present");
                        rb.finish()
                            .map_err(|e| DestDiskError::Protocol(e.to_string()))?;
                    }
                }
                self.round_written[d] += data.len() as u64;
                self.wrote(d, data.len() as u64)
            }
            Message::DiskRoundEnd { disk, round, last } => {
                let d = self.open_disk(disk)?;
                if round != self.rounds[d] {
                    return Err(DestDiskError::Protocol(format!(
                        "disk {disk}: round {round} ended, round {} was due",
                        self.rounds[d]
                    )));
                }
                self.rounds[d] += 1;
                self.closed[d] = last;
                let open = self.pieces.keys().filter(|(k, _)| *k == disk).count();
                if open > 0 {
                    return Err(DestDiskError::Protocol(format!(
                        "disk {disk} round {round} ended with {open} pieces incomplete"
                    )));
                }
                self.targets[d]
                    .borrow_mut()
                    .flush()
                    .map_err(|e| self.write_error(disk, 0, &e))?;
                self.unflushed[d] = 0;
                let written = std::mem::take(&mut self.round_written[d]);
                self.written += written;
                let _ = self.reply.send(Message::DiskRoundDone {
                    disk,
                    round,
                    written,
                });
                Ok(())
            }
            m => Err(DestDiskError::Protocol(format!(
                "{} is not a disk message",
                m.name()
            ))),
        }
    }

    fn manifest(&mut self, disk: u16, piece: u32, bytes: &[u8]) -> Result<(), DestDiskError> {
        let d = self.open_disk(disk)?;
        if self.rounds[d] != 0 {
            return Err(DestDiskError::Protocol(format!(
                "disk {disk}: a manifest in round {} (manifests are round 0's)",
                self.rounds[d]
            )));
        }
        let Some(range) = tern_proto::limits::disk_piece_range(piece, self.sizes[d]) else {
            return Err(DestDiskError::Protocol(format!(
                "disk {disk}: piece {piece} is past the end of its {} bytes",
                self.sizes[d]
            )));
        };
        if self.pieces.contains_key(&(disk, piece)) || !self.seen_pieces[d].insert(piece) {
            return Err(DestDiskError::Protocol(format!(
                "disk {disk}: piece {piece} twice"
            )));
        }
        if self.pieces.len() >= tern_proto::limits::MAX_OPEN_PIECES {
            return Err(DestDiskError::Protocol(format!(
                "more than {} disk pieces open at once",
                tern_proto::limits::MAX_OPEN_PIECES
            )));
        }
        let m = Manifest::decode(bytes)
            .map_err(|e| DestDiskError::Protocol(format!("disk {disk} piece {piece}: {e}")))?;
        if m.range() != range {
            return Err(DestDiskError::Protocol(format!(
                "disk {disk} piece {piece}: its manifest covers {:?}, the piece is {range:?}",
                m.range()
            )));
        }
        let rb = {
            let index = self.index.lock().unwrap_or_else(|e| e.into_inner());
            let plan = tern_chunks::plan(&m, &index);
            let mut rb = Rebuild::new(
                &m,
                plan,
                self.hasher.clone(),
                SharedTarget(self.targets[d].clone()),
            );
            let local = rb.apply_local(&index).map_err(|e| match e {
                tern_chunks::ApplyLocalError::Target { offset, .. } => {
                    self.write_error(disk, offset, &e)
                }
                #[allow(unreachable_patterns)]
                e => DestDiskError::Local(e.to_string()),
            })?;
            for (image, e) in &local.read_errors {
                tracing::warn!(
                    ?image,
                    "chunk index read failed, asking the source instead: {e}"
                );
            }
            rb
        };
        let runs = runs_of(&rb.pending());
        self.round_written[d] += rb.progress().bytes_written;
        self.wrote(d, rb.progress().bytes_written)?;
        let _ = self.reply.send(Message::DiskWant { disk, piece, runs });
        if rb.is_complete() {
            rb.finish()
                .map_err(|e| DestDiskError::Protocol(format!("disk {disk} piece {piece}: {e}")))?;
        } else {
            self.pieces.insert((disk, piece), rb);
        }
        Ok(())
    }

    fn finish(self) -> Result<u64, DestDiskError> {
        if let Some((disk, piece)) = self.pieces.keys().next() {
            return Err(DestDiskError::Protocol(format!(
                "disk {disk} piece {piece} never completed"
            )));
        }
        for (i, t) in self.targets.into_iter().enumerate() {
            let t = Rc::try_unwrap(t)
                .map_err(|_| DestDiskError::Protocol("disk target still in use".into()))?
                .into_inner();
            t.close().map_err(|e| DestDiskError::Write {
                disk: i as u16,
                offset: 0,
                message: format!("closing the disk: {e}"),
            })?;
        }
        Ok(self.written)
    }
}

/// The destination's disk worker without QEMU, for the fuzz targets in `crates/tern-fuzz`:
/// disks in memory, an empty chunk index. Not an API.
#[doc(hidden)]
pub mod fuzzing {
    use super::*;

    /// A disk in memory; a write past its end is a bug of the worker's checks.
    pub struct MemDisk(pub Vec<u8>);

    impl BlockTarget for MemDisk {
        fn write_at(&mut self, offset: u64, data: &[u8]) -> std::io::Result<()> {
            let end = offset as usize + data.len();
            assert!(
                end <= self.0.len(),
                "the worker wrote {offset}..{end} on a disk of {} bytes",
                self.0.len()
            );
            self.0[offset as usize..end].copy_from_slice(data);
            Ok(())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    impl DiskTarget for MemDisk {
        fn close(self) -> std::io::Result<()> {
            Ok(())
        }
    }

    /// Feeds `msgs` to a worker holding disks of `sizes` (the source claimed `claimed`
    /// bytes); then finishes it. Err: the worker refused (what a peer's bad message must
    /// cause), with the reason.
    pub fn disk_worker(
        sizes: &[u64],
        claimed: u64,
        index: SharedIndex,
        hasher: tern_store::ContentHasher,
        msgs: impl IntoIterator<Item = Message>,
    ) -> Result<u64, String> {
        let (reply, _replies) = mpsc::unbounded_channel();
        let disks = sizes
            .iter()
            .map(|s| MemDisk(vec![0; *s as usize]))
            .collect();
        let mut w = Worker::new(
            disks,
            WorkerSetup {
                sizes: sizes.to_vec(),
                claimed,
                index,
                hasher,
                reply,
                dir: std::env::temp_dir(),
            },
        );
        for m in msgs {
            w.handle(m).map_err(|e| e.to_string())?;
        }
        w.finish().map_err(|e| e.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn runs_merge_adjacent_blocks_only() {
        assert_eq!(runs_of(&[]), vec![]);
        assert_eq!(
            runs_of(&[0, 4096, 8192, 16384, 20480, 1 << 30]),
            vec![(0, 3), (16384, 2), (1 << 30, 1)]
        );
    }
}

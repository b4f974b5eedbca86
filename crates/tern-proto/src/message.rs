//! The messages of the protocol: what each carries and how its payload is laid out (the
//! frame around it is [`crate::frame`]'s). Every message type is declared once, in
//! [`MessageType`]; docs/protocol.md is the normative table.

use bytes::{Buf, BufMut, Bytes, BytesMut};

use crate::error::{ErrorCode, MigrationState};
use crate::frame::FrameError;

/// Declares every message type once: its name, its frame type byte (stable: never
/// renumber, only add; 0 is reserved as invalid) and the protocol version that brought it.
macro_rules! message_types {
    ($($variant:ident = $tag:literal, since $since:literal;)*) => {
        /// A frame's type: which [`Message`] it carries.
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
        #[repr(u8)]
        pub enum MessageType {
            $($variant = $tag,)*
        }

        impl MessageType {
            /// Every type, in frame-type order.
            pub const ALL: &'static [MessageType] = &[$(MessageType::$variant,)*];

            pub fn from_tag(tag: u8) -> Option<MessageType> {
                match tag {
                    $($tag => Some(MessageType::$variant),)*
                    _ => None,
                }
            }

            pub fn tag(self) -> u8 {
                self as u8
            }

            pub fn name(self) -> &'static str {
                match self {
                    $(MessageType::$variant => stringify!($variant),)*
                }
            }

            /// The protocol version that introduced it: a peer on an older version must
            /// never be sent it.
            pub fn since(self) -> u16 {
                match self {
                    $(MessageType::$variant => $since,)*
                }
            }
        }
    };
}

message_types! {
    Hello = 1, since 1;
    HelloAck = 2, since 1;
    Prepare = 3, since 1;
    Prepared = 4, since 1;
    QemuBytes = 5, since 1;
    RamBlocks = 6, since 1;
    Pages = 7, since 1;
    ReturnPath = 8, since 1;
    SourceDone = 9, since 1;
    ReadyToResume = 10, since 1;
    Commit = 11, since 1;
    Resumed = 12, since 1;
    Abort = 13, since 1;
    Query = 14, since 1;
    QueryAnswer = 15, since 1;
    Summary = 16, since 2;
    Want = 17, since 2;
    Content = 18, since 2;
    Attach = 19, since 2;
    Seq = 20, since 2;
    Applied = 21, since 2;
    DiskOffer = 22, since 3;
    DiskManifest = 23, since 3;
    DiskWant = 24, since 3;
    DiskData = 25, since 3;
    DiskRoundEnd = 26, since 3;
    DiskRoundDone = 27, since 3;
    TpmKey = 28, since 4;
    Tunnel = 29, since 6;
    TunnelOpen = 30, since 6;
    TunnelBytes = 31, since 6;
    Locations = 32, since 7;
    Addresses = 33, since 8;
    PlanQuery = 34, since 9;
    PlanHeld = 35, since 9;
    ProbeBytes = 36, since 9;
    ProbeEnd = 37, since 9;
    ProbeResult = 38, since 9;
    PostcopyOffer = 39, since 10;
    PostcopyRun = 40, since 10;
    PostcopyResume = 41, since 11;
    PostcopyResumed = 42, since 11;
    PostcopyFaults = 43, since 12;
}

/// [`Message::DiskData`] with this piece number is a plain write (a later round's dirty
/// blocks), not an answer to a [`Message::DiskWant`].
pub const DISK_DIRECT: u32 = u32::MAX;

/// One disk of a VM as the source offers it (v3, in [`Message::DiskOffer`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DiskInfo {
    /// The guest-visible size in bytes.
    pub virtual_size: u64,
    /// Bytes that do not read as zero, as far as the source knows (allocation): what the
    /// destination must have room for.
    pub allocated: u64,
}

/// Where one network card of a VM lives (v7, in [`Message::Locations`]): frames for MAC
/// `mac` on network `network` go to the host whose VTEP is `vtep`. `seq` orders claims
/// for one card (the newest wins): the claiming host's wall clock, in microseconds, when
/// the VM began to run there.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Location {
    pub network: String,
    pub mac: [u8; 6],
    pub vtep: std::net::Ipv4Addr,
    pub seq: u64,
}

/// The IPv4 address of one network card of a VM (v8, in [`Message::Addresses`]): on
/// network `network`, `ip` is the card `mac`'s. What an agent answers ARP requests for
/// in its peers' stead (ARP suppression).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CardAddress {
    pub network: String,
    pub mac: [u8; 6],
    pub ip: std::net::Ipv4Addr,
}

/// A page's content identity: the first 16 bytes of the cluster-keyed BLAKE3 of its bytes
/// (`tern-store` computes it; this crate only carries it).
pub type ContentHash = [u8; 16];

/// One RAM block of the VM, as announced before the pages that refer to it by index.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RamBlock {
    pub name: String,
    pub used_length: u64,
}

/// How one page travels.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PageBody {
    /// Every byte of the page is `fill` (QEMU's ZERO record; `fill` is 0 from QEMU >= 9).
    Zero { fill: u8 },
    /// The page's bytes.
    Raw(Bytes),
    /// Content the destination holds already (v2): in its page store, under this hash.
    Ref(ContentHash),
    /// The page's previous version at the destination with `diff` applied (v2); `result`
    /// names the new content, so a destination missing the base can ask for it instead.
    Delta { result: ContentHash, diff: Bytes },
    /// The page's bytes, which the destination need not keep (v5, the lean data path):
    /// no later reference or delta will name them, so it neither hashes nor stores them.
    Plain(Bytes),
    /// `pages` consecutive pages from this record's offset, every byte of each `fill` (v5):
    /// a run of QEMU's ZERO records in one.
    ZeroRun { fill: u8, pages: u32 },
}

impl PageBody {
    /// The protocol version that brought this kind of page record.
    pub fn since(&self) -> u16 {
        match self {
            PageBody::Zero { .. } | PageBody::Raw(_) => 1,
            PageBody::Ref(_) | PageBody::Delta { .. } => 2,
            PageBody::Plain(_) | PageBody::ZeroRun { .. } => 5,
        }
    }

    /// How many guest pages the record stands for.
    pub fn pages(&self) -> u64 {
        match self {
            PageBody::ZeroRun { pages, .. } => u64::from(*pages),
            _ => 1,
        }
    }

    /// Encoded size of a page record with this body (offset and kind included).
    pub fn record_len(&self) -> usize {
        match self {
            PageBody::Zero { .. } => 10,
            PageBody::Raw(d) | PageBody::Plain(d) => 13 + d.len(),
            PageBody::Ref(_) => 25,
            PageBody::Delta { diff, .. } => 29 + diff.len(),
            PageBody::ZeroRun { .. } => 14,
        }
    }
}

const PAGE_ZERO: u8 = 0;
const PAGE_RAW: u8 = 1;
const PAGE_REF: u8 = 2;
const PAGE_DELTA: u8 = 3;
const PAGE_PLAIN: u8 = 4;
const PAGE_ZERO_RUN: u8 = 5;

/// One page record: the page at byte `offset` of a block.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Page {
    pub offset: u64,
    pub body: PageBody,
}

/// A protocol message. See the module doc for the order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Message {
    Hello {
        min_version: u16,
        max_version: u16,
        agent: String,
    },
    HelloAck {
        version: u16,
        agent: String,
    },
    Prepare {
        migration_id: String,
        spec_toml: String,
        source_running: bool,
        qemu_version: String,
    },
    Prepared {
        qemu_version: String,
    },
    /// Bytes of QEMU's stream that are not page records, to be written out verbatim and in
    /// order with the pages.
    QemuBytes(Bytes),
    /// The VM's RAM blocks (from QEMU's MEM_SIZE record); `Pages.block` indexes this list.
    RamBlocks {
        page_size: u32,
        blocks: Vec<RamBlock>,
    },
    /// Page records of one block, in stream order.
    Pages {
        block: u16,
        pages: Vec<Page>,
    },
    /// Return-path bytes of the destination QEMU (PONG, SHUT...), for the source QEMU.
    ReturnPath(Bytes),
    /// The source QEMU's stream ended properly; digest of the memory image it described.
    /// With `commit` (v2) the switchover point is here: the destination runs the VM as
    /// soon as the digests agree and its QEMU loaded everything, without ReadyToResume
    /// and Commit (one round trip less of downtime).
    SourceDone {
        digest: [u8; 32],
        pages: u64,
        commit: bool,
    },
    /// The destination QEMU loaded everything and the digests agree.
    ReadyToResume {
        digest: [u8; 32],
    },
    /// The switchover point: the source will not resume its VM after sending this.
    Commit,
    /// The destination VM runs (`resumed_unix_us` = its RESUME event, wall clock).
    Resumed {
        resumed_unix_us: u64,
    },
    Abort {
        code: ErrorCode,
        message: String,
    },
    /// On a new connection, after Hello: "what became of this migration?" (the source asks
    /// when Resumed did not arrive after Commit).
    Query {
        migration_id: String,
    },
    QueryAnswer {
        state: MigrationState,
        resumed_unix_us: u64,
    },
    /// Destination -> source before Prepared (v2): 64-bit prefixes of the content hashes
    /// its page store holds (several frames for a large store). A hint: a prefix that turns
    /// out not to be held costs one [`Message::Want`] round trip, never correctness.
    /// `key_id` names the cluster key the hashes were made with: references work only
    /// between agents with the same key.
    Summary {
        key_id: u64,
        prefixes: Vec<u64>,
    },
    /// Destination -> source (v2): contents it was referred to but does not hold.
    Want {
        hashes: Vec<ContentHash>,
    },
    /// Source -> destination (v2): the contents asked for by a Want.
    Content {
        pages: Vec<(ContentHash, Bytes)>,
    },
    /// Source -> destination (v2), first after Hello/HelloAck on an extra data
    /// connection: it carries frames of this migration (parallel streams).
    Attach {
        migration_id: String,
        index: u16,
    },
    /// Source -> destination (v2), on data connections: the next frame is number `seq` of
    /// the migration's data frames; the destination processes them in `seq` order.
    Seq {
        seq: u64,
    },
    /// Destination -> source (v2): how much of the migration stream it has written to its
    /// QEMU, cumulative, in stream units (page records count a page each, QemuBytes their
    /// length). The source keeps what is in flight under a window (flow control).
    Applied {
        units: u64,
    },
    /// Source -> destination (v3), just before Prepare when the VM has local disks: their
    /// sizes, in the spec's order. The destination creates images of these sizes (and
    /// refuses if it has no room) before it starts QEMU.
    DiskOffer {
        disks: Vec<DiskInfo>,
    },
    /// Source -> destination (v3): the content of one piece of disk `disk` as a
    /// tern-chunks manifest (hashes of its 4 KiB blocks). Round 0 only.
    DiskManifest {
        disk: u16,
        piece: u32,
        manifest: Bytes,
    },
    /// Destination -> source (v3): the blocks of a piece it does not hold, as runs
    /// (offset, blocks); empty when it holds all of them. Every manifest gets one answer.
    DiskWant {
        disk: u16,
        piece: u32,
        runs: Vec<(u64, u32)>,
    },
    /// Source -> destination (v3): disk bytes at `offset`. For a piece: blocks it wanted
    /// (checked against the manifest); [`DISK_DIRECT`]: a later round's blocks, written as
    /// they are.
    DiskData {
        disk: u16,
        piece: u32,
        offset: u64,
        data: Bytes,
    },
    /// Source -> destination (v3): everything of round `round` of disk `disk` was sent.
    /// `last`: the final round (the guest is paused); the source does not wait for its
    /// DiskRoundDone, and the destination must have applied it before the VM runs.
    DiskRoundEnd {
        disk: u16,
        round: u32,
        last: bool,
    },
    /// Destination -> source (v3): round `round` of disk `disk` is written and flushed.
    DiskRoundDone {
        disk: u16,
        round: u32,
        written: u64,
    },
    /// Source -> destination (v4), before Prepare, for a VM with a vTPM, and only to a
    /// destination the source's policy allows: the VM's own swtpm migration key (its TPM
    /// state travels encrypted with it inside QEMU's stream). Random per VM, never derived
    /// from anything every host holds.
    TpmKey {
        key: [u8; 32],
    },
    /// Source -> destination (v6), first after Hello/HelloAck: this connection carries,
    /// byte for byte, one connection of libvirt domain `domain`'s storage migration (its
    /// source QEMU's NBD client to its destination QEMU's NBD server, which libvirt puts
    /// on the same socket path on both hosts). No frame follows it on the connection.
    Tunnel {
        domain: String,
    },
    /// Destination -> source (v6): the destination QEMU's NBD server took the tunnel; from
    /// now on the connection carries TunnelBytes both ways.
    TunnelOpen,
    /// Either way (v6), after TunnelOpen: the next bytes of the tunnelled connection, in
    /// order (the source's usually compressed). A side's clean close ends its direction.
    TunnelBytes(Bytes),
    /// Either way (v7), first after Hello/HelloAck, then as the one answer: where network
    /// cards live (the overlay's control plane between agents). The opener says what
    /// changed on its side (or everything it runs, when it starts); the answer is
    /// everything the answering host runs. Nothing follows the answer.
    Locations {
        entries: Vec<Location>,
    },
    /// The addresses of the cards the sender runs (v8, after the Locations exchange).
    Addresses {
        entries: Vec<CardAddress>,
    },
    /// Source -> destination (v9), first after Hello for a `--plan`: content hashes of a
    /// sample of the VM's pages and of its local disks' blocks (made with the cluster key
    /// `key_id`); the destination answers how many of each its page store and its chunk
    /// index hold ([`Message::PlanHeld`]). At most [`crate::limits::MAX_PLAN_HASHES`]
    /// each.
    PlanQuery {
        key_id: u64,
        hashes: Vec<ContentHash>,
        chunks: Vec<ContentHash>,
    },
    /// Destination -> source (v9): how many of a PlanQuery's page hashes and disk chunk
    /// hashes it holds (0 when the key is not its own).
    PlanHeld {
        held: u32,
        chunks_held: u32,
    },
    /// Source -> destination (v9), after PlanHeld: filler that measures the link (the
    /// destination discards it, at most [`crate::limits::MAX_PROBE_BYTES`] in all).
    ProbeBytes(Bytes),
    /// Source -> destination (v9): the probe's filler is over.
    ProbeEnd,
    /// Destination -> source (v9): what arrived of the probe in the later half of its
    /// time (after the link's slow start): `bytes` in `micros`.
    ProbeResult {
        bytes: u64,
        micros: u64,
    },
    /// Source -> destination (v10), before Prepare: this migration is post-copy; the
    /// destination QEMU must take it (capability `postcopy-ram`).
    PostcopyOffer,
    /// Source -> destination (v10), in the transfer, right after the bytes of QEMU's
    /// PACKAGED command (which ends with POSTCOPY_RUN): the source QEMU stopped for good;
    /// the destination records the switchover and runs the VM. From here on the source
    /// never resumes.
    PostcopyRun,
    /// Source -> destination (v11), the first message of a new connection after the link
    /// broke during post-copy: go on with migration `migration_id` (the try's wire id),
    /// whose VM runs (or waits in postcopy-paused) there. Only from the certificate that
    /// prepared it.
    PostcopyResume {
        migration_id: String,
    },
    /// Destination -> source (v11): its QEMU is recovering (`migrate-recover`) on a new
    /// stream; the source resumes its QEMU's migration into this connection.
    PostcopyResumed,
    /// Destination -> source (v12), after a post-copy stream ended, before ReadyToResume:
    /// what the guest's page faults cost while post-copy ran. `requests`/`pages`: the page
    /// requests its QEMU sent on the return path and the pages they asked for; `blocktime`:
    /// QEMU's own measure (capability `postcopy-blocktime`), if it gave one.
    PostcopyFaults {
        requests: u64,
        pages: u64,
        blocktime: Option<Blocktime>,
        /// v13: of the requested pages, how many came as a reference to content the
        /// destination's page store held (their content did not cross the link). Sent
        /// only to a v13 peer: a v12 peer rejects trailing bytes, so a sender leaves it 0
        /// for a peer below 13 (0 is not sent; the frame is then the v12 one).
        local: u64,
    },
}

/// The destination QEMU's measure of what post-copy's page faults cost the guest (v12,
/// in [`Message::PostcopyFaults`]), milliseconds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Blocktime {
    /// Time during which every vCPU waited on a page at once (QEMU's `postcopy-blocktime`).
    pub all_vcpus_ms: u64,
    /// The most any one vCPU waited on pages in all (the largest of
    /// `postcopy-vcpu-blocktime`).
    pub max_vcpu_ms: u64,
}

impl Message {
    /// The type of this message.
    pub fn kind(&self) -> MessageType {
        match self {
            Message::Hello { .. } => MessageType::Hello,
            Message::HelloAck { .. } => MessageType::HelloAck,
            Message::Prepare { .. } => MessageType::Prepare,
            Message::Prepared { .. } => MessageType::Prepared,
            Message::QemuBytes(_) => MessageType::QemuBytes,
            Message::RamBlocks { .. } => MessageType::RamBlocks,
            Message::Pages { .. } => MessageType::Pages,
            Message::ReturnPath(_) => MessageType::ReturnPath,
            Message::SourceDone { .. } => MessageType::SourceDone,
            Message::ReadyToResume { .. } => MessageType::ReadyToResume,
            Message::Commit => MessageType::Commit,
            Message::Resumed { .. } => MessageType::Resumed,
            Message::Abort { .. } => MessageType::Abort,
            Message::Query { .. } => MessageType::Query,
            Message::QueryAnswer { .. } => MessageType::QueryAnswer,
            Message::Summary { .. } => MessageType::Summary,
            Message::Want { .. } => MessageType::Want,
            Message::Content { .. } => MessageType::Content,
            Message::Attach { .. } => MessageType::Attach,
            Message::Seq { .. } => MessageType::Seq,
            Message::Applied { .. } => MessageType::Applied,
            Message::DiskOffer { .. } => MessageType::DiskOffer,
            Message::DiskManifest { .. } => MessageType::DiskManifest,
            Message::DiskWant { .. } => MessageType::DiskWant,
            Message::DiskData { .. } => MessageType::DiskData,
            Message::DiskRoundEnd { .. } => MessageType::DiskRoundEnd,
            Message::DiskRoundDone { .. } => MessageType::DiskRoundDone,
            Message::TpmKey { .. } => MessageType::TpmKey,
            Message::Tunnel { .. } => MessageType::Tunnel,
            Message::TunnelOpen => MessageType::TunnelOpen,
            Message::TunnelBytes(_) => MessageType::TunnelBytes,
            Message::Locations { .. } => MessageType::Locations,
            Message::Addresses { .. } => MessageType::Addresses,
            Message::PlanQuery { .. } => MessageType::PlanQuery,
            Message::PlanHeld { .. } => MessageType::PlanHeld,
            Message::ProbeBytes(_) => MessageType::ProbeBytes,
            Message::ProbeEnd => MessageType::ProbeEnd,
            Message::ProbeResult { .. } => MessageType::ProbeResult,
            Message::PostcopyOffer => MessageType::PostcopyOffer,
            Message::PostcopyRun => MessageType::PostcopyRun,
            Message::PostcopyResume { .. } => MessageType::PostcopyResume,
            Message::PostcopyResumed => MessageType::PostcopyResumed,
            Message::PostcopyFaults { .. } => MessageType::PostcopyFaults,
        }
    }

    /// Its frame type byte.
    pub fn tag(&self) -> u8 {
        self.kind().tag()
    }

    /// A short name for logs and errors.
    pub fn name(&self) -> &'static str {
        self.kind().name()
    }
}

/// Appends `msg`'s payload: small fields into `out`; before each bulk part (page data,
/// QEMU bytes) what `out` holds moves into `segs`, then the bulk itself (not copied).
pub(crate) fn encode_payload(msg: &Message, out: &mut BytesMut, segs: &mut Vec<Bytes>) {
    let bulk = |scratch: &mut BytesMut, segs: &mut Vec<Bytes>, b: &Bytes| {
        if !scratch.is_empty() {
            segs.push(scratch.split().freeze());
        }
        if !b.is_empty() {
            segs.push(b.clone());
        }
    };
    match msg {
        Message::Hello {
            min_version,
            max_version,
            agent,
        } => {
            out.put_u16(*min_version);
            out.put_u16(*max_version);
            put_str(out, agent);
        }
        Message::HelloAck { version, agent } => {
            out.put_u16(*version);
            put_str(out, agent);
        }
        Message::Prepare {
            migration_id,
            spec_toml,
            source_running,
            qemu_version,
        } => {
            put_str(out, migration_id);
            put_bytes(out, spec_toml.as_bytes());
            out.put_u8(u8::from(*source_running));
            put_str(out, qemu_version);
        }
        Message::Prepared { qemu_version } => put_str(out, qemu_version),
        Message::QemuBytes(b)
        | Message::ReturnPath(b)
        | Message::TunnelBytes(b)
        | Message::ProbeBytes(b) => bulk(out, segs, b),
        Message::RamBlocks { page_size, blocks } => {
            out.put_u32(*page_size);
            out.put_u32(blocks.len() as u32);
            for b in blocks {
                put_str(out, &b.name);
                out.put_u64(b.used_length);
            }
        }
        Message::Pages { block, pages } => {
            out.put_u16(*block);
            out.put_u32(pages.len() as u32);
            for p in pages {
                out.put_u64(p.offset);
                match &p.body {
                    PageBody::Zero { fill } => {
                        out.put_u8(PAGE_ZERO);
                        out.put_u8(*fill);
                    }
                    PageBody::Raw(data) => {
                        out.put_u8(PAGE_RAW);
                        out.put_u32(data.len() as u32);
                        bulk(out, segs, data);
                    }
                    PageBody::Ref(h) => {
                        out.put_u8(PAGE_REF);
                        out.put_slice(h);
                    }
                    PageBody::Delta { result, diff } => {
                        out.put_u8(PAGE_DELTA);
                        out.put_slice(result);
                        put_bytes(out, diff);
                    }
                    PageBody::Plain(data) => {
                        out.put_u8(PAGE_PLAIN);
                        out.put_u32(data.len() as u32);
                        bulk(out, segs, data);
                    }
                    PageBody::ZeroRun { fill, pages } => {
                        out.put_u8(PAGE_ZERO_RUN);
                        out.put_u8(*fill);
                        out.put_u32(*pages);
                    }
                }
            }
        }
        Message::SourceDone {
            digest,
            pages,
            commit,
        } => {
            out.put_slice(digest);
            out.put_u64(*pages);
            if *commit {
                out.put_u8(1); // v2; a v1 frame ends before it
            }
        }
        Message::ReadyToResume { digest } => out.put_slice(digest),
        Message::Commit => {}
        Message::Resumed { resumed_unix_us } => out.put_u64(*resumed_unix_us),
        Message::Abort { code, message } => {
            out.put_u16(code.to_u16());
            put_str(out, message);
        }
        Message::Query { migration_id } => put_str(out, migration_id),
        Message::QueryAnswer {
            state,
            resumed_unix_us,
        } => {
            out.put_u8(state.to_u8());
            out.put_u64(*resumed_unix_us);
        }
        Message::Summary { key_id, prefixes } => {
            out.put_u64(*key_id);
            out.put_u32(prefixes.len() as u32);
            for p in prefixes {
                out.put_u64(*p);
            }
        }
        Message::Want { hashes } => {
            out.put_u32(hashes.len() as u32);
            for h in hashes {
                out.put_slice(h);
            }
        }
        Message::Content { pages } => {
            out.put_u32(pages.len() as u32);
            for (h, data) in pages {
                out.put_slice(h);
                out.put_u32(data.len() as u32);
                bulk(out, segs, data);
            }
        }
        Message::Attach {
            migration_id,
            index,
        } => {
            put_str(out, migration_id);
            out.put_u16(*index);
        }
        Message::Seq { seq } => out.put_u64(*seq),
        Message::Applied { units } => out.put_u64(*units),
        Message::DiskOffer { disks } => {
            out.put_u16(disks.len() as u16);
            for d in disks {
                out.put_u64(d.virtual_size);
                out.put_u64(d.allocated);
            }
        }
        Message::DiskManifest {
            disk,
            piece,
            manifest,
        } => {
            out.put_u16(*disk);
            out.put_u32(*piece);
            bulk(out, segs, manifest);
        }
        Message::DiskWant { disk, piece, runs } => {
            out.put_u16(*disk);
            out.put_u32(*piece);
            out.put_u32(runs.len() as u32);
            for (offset, blocks) in runs {
                out.put_u64(*offset);
                out.put_u32(*blocks);
            }
        }
        Message::DiskData {
            disk,
            piece,
            offset,
            data,
        } => {
            out.put_u16(*disk);
            out.put_u32(*piece);
            out.put_u64(*offset);
            bulk(out, segs, data);
        }
        Message::DiskRoundEnd { disk, round, last } => {
            out.put_u16(*disk);
            out.put_u32(*round);
            out.put_u8(u8::from(*last));
        }
        Message::DiskRoundDone {
            disk,
            round,
            written,
        } => {
            out.put_u16(*disk);
            out.put_u32(*round);
            out.put_u64(*written);
        }
        Message::TpmKey { key } => out.put_slice(key),
        Message::Tunnel { domain } => put_str(out, domain),
        Message::TunnelOpen => {}
        Message::Locations { entries } => {
            out.put_u16(entries.len() as u16);
            for e in entries {
                put_str(out, &e.network);
                out.put_slice(&e.mac);
                out.put_slice(&e.vtep.octets());
                out.put_u64(e.seq);
            }
        }
        Message::Addresses { entries } => {
            out.put_u16(entries.len() as u16);
            for e in entries {
                put_str(out, &e.network);
                out.put_slice(&e.mac);
                out.put_slice(&e.ip.octets());
            }
        }
        Message::PlanQuery {
            key_id,
            hashes,
            chunks,
        } => {
            out.put_u64(*key_id);
            for list in [hashes, chunks] {
                out.put_u32(list.len() as u32);
                for h in list {
                    out.put_slice(h);
                }
            }
        }
        Message::PlanHeld { held, chunks_held } => {
            out.put_u32(*held);
            out.put_u32(*chunks_held);
        }
        Message::ProbeEnd
        | Message::PostcopyOffer
        | Message::PostcopyRun
        | Message::PostcopyResumed => {}
        Message::PostcopyResume { migration_id } => put_str(out, migration_id),
        Message::ProbeResult { bytes, micros } => {
            out.put_u64(*bytes);
            out.put_u64(*micros);
        }
        Message::PostcopyFaults {
            requests,
            pages,
            blocktime,
            local,
        } => {
            out.put_u64(*requests);
            out.put_u64(*pages);
            match blocktime {
                Some(b) => {
                    out.put_u8(1);
                    out.put_u64(b.all_vcpus_ms);
                    out.put_u64(b.max_vcpu_ms);
                }
                None => out.put_u8(0),
            }
            if *local != 0 {
                out.put_u64(*local); // v13; a v12 frame ends before it
            }
        }
    }
}

/// The payload length of `msg`'s frame.
pub(crate) fn payload_len(msg: &Message) -> usize {
    let s = |x: &str| 2 + wire_str(x).len();
    match msg {
        Message::Hello { agent, .. } => 4 + s(agent),
        Message::HelloAck { agent, .. } => 2 + s(agent),
        Message::Prepare {
            migration_id,
            spec_toml,
            qemu_version,
            ..
        } => s(migration_id) + 4 + spec_toml.len() + 1 + s(qemu_version),
        Message::Prepared { qemu_version } => s(qemu_version),
        Message::QemuBytes(b)
        | Message::ReturnPath(b)
        | Message::TunnelBytes(b)
        | Message::ProbeBytes(b) => b.len(),
        Message::RamBlocks { blocks, .. } => {
            8 + blocks.iter().map(|b| s(&b.name) + 8).sum::<usize>()
        }
        Message::Pages { pages, .. } => {
            6 + pages.iter().map(|p| p.body.record_len()).sum::<usize>()
        }
        Message::SourceDone { commit, .. } => 40 + usize::from(*commit),
        Message::ReadyToResume { .. } => 32,
        Message::Commit => 0,
        Message::Resumed { .. } => 8,
        Message::Abort { message, .. } => 2 + s(message),
        Message::Query { migration_id } => s(migration_id),
        Message::QueryAnswer { .. } => 9,
        Message::Summary { prefixes, .. } => 12 + 8 * prefixes.len(),
        Message::Want { hashes } => 4 + 16 * hashes.len(),
        Message::Content { pages } => 4 + pages.iter().map(|(_, d)| 20 + d.len()).sum::<usize>(),
        Message::Attach { migration_id, .. } => s(migration_id) + 2,
        Message::Seq { .. } | Message::Applied { .. } => 8,
        Message::DiskOffer { disks } => 2 + 16 * disks.len(),
        Message::DiskManifest { manifest, .. } => 6 + manifest.len(),
        Message::DiskWant { runs, .. } => 10 + 12 * runs.len(),
        Message::DiskData { data, .. } => 14 + data.len(),
        Message::DiskRoundEnd { .. } => 7,
        Message::DiskRoundDone { .. } => 14,
        Message::TpmKey { .. } => 32,
        Message::Tunnel { domain } => s(domain),
        Message::TunnelOpen => 0,
        Message::Locations { entries } => {
            2 + entries.iter().map(|e| s(&e.network) + 18).sum::<usize>()
        }
        Message::Addresses { entries } => {
            2 + entries.iter().map(|e| s(&e.network) + 10).sum::<usize>()
        }
        Message::PlanQuery { hashes, chunks, .. } => 16 + 16 * (hashes.len() + chunks.len()),
        Message::PlanHeld { .. } => 8,
        Message::ProbeEnd
        | Message::PostcopyOffer
        | Message::PostcopyRun
        | Message::PostcopyResumed => 0,
        Message::PostcopyResume { migration_id } => s(migration_id),
        Message::ProbeResult { .. } => 16,
        Message::PostcopyFaults {
            blocktime, local, ..
        } => 17 + if blocktime.is_some() { 16 } else { 0 } + if *local != 0 { 8 } else { 0 },
    }
}

pub(crate) fn decode_payload(ty: MessageType, payload: Bytes) -> Result<Message, FrameError> {
    let mut r = Reader {
        b: payload,
        msg: ty.name(),
    };
    let msg = match ty {
        MessageType::Hello => Message::Hello {
            min_version: r.u16()?,
            max_version: r.u16()?,
            agent: r.str()?,
        },
        MessageType::HelloAck => Message::HelloAck {
            version: r.u16()?,
            agent: r.str()?,
        },
        MessageType::Prepare => Message::Prepare {
            migration_id: r.str()?,
            spec_toml: String::from_utf8(r.bytes()?.to_vec())
                .map_err(|_| r.invalid("spec (not UTF-8)"))?,
            source_running: r.bool()?,
            qemu_version: r.str()?,
        },
        MessageType::Prepared => Message::Prepared {
            qemu_version: r.str()?,
        },
        MessageType::QemuBytes => Message::QemuBytes(r.rest()),
        MessageType::ReturnPath => Message::ReturnPath(r.rest()),
        MessageType::RamBlocks => {
            let page_size = r.u32()?;
            if !page_size.is_power_of_two() || !(512..=(1 << 30)).contains(&page_size) {
                return Err(r.invalid("page size"));
            }
            let n = r.u32()? as usize;
            let mut blocks = Vec::with_capacity(n.min(1024));
            for _ in 0..n {
                blocks.push(RamBlock {
                    name: r.str()?,
                    used_length: r.u64()?,
                });
            }
            Message::RamBlocks { page_size, blocks }
        }
        MessageType::Pages => {
            let block = r.u16()?;
            let n = r.u32()? as usize;
            // every page record takes at least 10 bytes: bound the allocation by the payload
            let mut pages = Vec::with_capacity(n.min(r.b.len() / 10 + 1));
            for _ in 0..n {
                let offset = r.u64()?;
                let body = match r.u8()? {
                    PAGE_ZERO => PageBody::Zero { fill: r.u8()? },
                    PAGE_RAW => PageBody::Raw(r.bytes()?),
                    PAGE_REF => PageBody::Ref(r.hash()?),
                    PAGE_DELTA => PageBody::Delta {
                        result: r.hash()?,
                        diff: r.bytes()?,
                    },
                    PAGE_PLAIN => PageBody::Plain(r.bytes()?),
                    PAGE_ZERO_RUN => PageBody::ZeroRun {
                        fill: r.u8()?,
                        pages: r.u32()?,
                    },
                    _ => return Err(r.invalid("page kind")),
                };
                pages.push(Page { offset, body });
            }
            Message::Pages { block, pages }
        }
        MessageType::SourceDone => Message::SourceDone {
            digest: r.digest()?,
            pages: r.u64()?,
            commit: if r.b.is_empty() { false } else { r.bool()? },
        },
        MessageType::ReadyToResume => Message::ReadyToResume {
            digest: r.digest()?,
        },
        MessageType::Commit => Message::Commit,
        MessageType::Resumed => Message::Resumed {
            resumed_unix_us: r.u64()?,
        },
        MessageType::Abort => Message::Abort {
            code: ErrorCode::from_u16(r.u16()?),
            message: r.str()?,
        },
        MessageType::Query => Message::Query {
            migration_id: r.str()?,
        },
        MessageType::QueryAnswer => Message::QueryAnswer {
            state: MigrationState::from_u8(r.u8()?).ok_or_else(|| r.invalid("migration state"))?,
            resumed_unix_us: r.u64()?,
        },
        MessageType::Summary => {
            let key_id = r.u64()?;
            let n = r.u32()? as usize;
            r.need(n.saturating_mul(8))?;
            Message::Summary {
                key_id,
                prefixes: (0..n).map(|_| r.b.get_u64()).collect(),
            }
        }
        MessageType::Want => {
            let n = r.u32()? as usize;
            r.need(n.saturating_mul(16))?;
            let mut hashes = Vec::with_capacity(n);
            for _ in 0..n {
                hashes.push(r.hash()?);
            }
            Message::Want { hashes }
        }
        MessageType::Content => {
            let n = r.u32()? as usize;
            let mut pages = Vec::with_capacity(n.min(r.b.len() / 20 + 1));
            for _ in 0..n {
                pages.push((r.hash()?, r.bytes()?));
            }
            Message::Content { pages }
        }
        MessageType::Attach => Message::Attach {
            migration_id: r.str()?,
            index: r.u16()?,
        },
        MessageType::Seq => Message::Seq { seq: r.u64()? },
        MessageType::Applied => Message::Applied { units: r.u64()? },
        MessageType::DiskOffer => {
            let n = r.u16()? as usize;
            r.need(n * 16)?;
            Message::DiskOffer {
                disks: (0..n)
                    .map(|_| DiskInfo {
                        virtual_size: r.b.get_u64(),
                        allocated: r.b.get_u64(),
                    })
                    .collect(),
            }
        }
        MessageType::DiskManifest => Message::DiskManifest {
            disk: r.u16()?,
            piece: r.u32()?,
            manifest: r.rest(),
        },
        MessageType::DiskWant => {
            let disk = r.u16()?;
            let piece = r.u32()?;
            let n = r.u32()? as usize;
            r.need(n.saturating_mul(12))?;
            Message::DiskWant {
                disk,
                piece,
                runs: (0..n).map(|_| (r.b.get_u64(), r.b.get_u32())).collect(),
            }
        }
        MessageType::DiskData => Message::DiskData {
            disk: r.u16()?,
            piece: r.u32()?,
            offset: r.u64()?,
            data: r.rest(),
        },
        MessageType::DiskRoundEnd => Message::DiskRoundEnd {
            disk: r.u16()?,
            round: r.u32()?,
            last: r.bool()?,
        },
        MessageType::DiskRoundDone => Message::DiskRoundDone {
            disk: r.u16()?,
            round: r.u32()?,
            written: r.u64()?,
        },
        MessageType::TpmKey => Message::TpmKey { key: r.digest()? },
        MessageType::Tunnel => Message::Tunnel { domain: r.str()? },
        MessageType::TunnelOpen => Message::TunnelOpen,
        MessageType::TunnelBytes => Message::TunnelBytes(r.rest()),
        MessageType::Locations => {
            let n = r.u16()? as usize;
            if n > crate::limits::MAX_LOCATIONS {
                return Err(r.invalid("count of locations"));
            }
            let mut entries = Vec::with_capacity(n);
            for _ in 0..n {
                let network = r.str()?;
                r.need(18)?;
                let mut mac = [0u8; 6];
                r.b.copy_to_slice(&mut mac);
                let vtep = std::net::Ipv4Addr::from(r.b.get_u32());
                entries.push(Location {
                    network,
                    mac,
                    vtep,
                    seq: r.b.get_u64(),
                });
            }
            Message::Locations { entries }
        }
        MessageType::Addresses => {
            let n = r.u16()? as usize;
            if n > crate::limits::MAX_LOCATIONS {
                return Err(r.invalid("count of addresses"));
            }
            let mut entries = Vec::with_capacity(n);
            for _ in 0..n {
                let network = r.str()?;
                r.need(10)?;
                let mut mac = [0u8; 6];
                r.b.copy_to_slice(&mut mac);
                entries.push(CardAddress {
                    network,
                    mac,
                    ip: std::net::Ipv4Addr::from(r.b.get_u32()),
                });
            }
            Message::Addresses { entries }
        }
        MessageType::PlanQuery => {
            let key_id = r.u64()?;
            let mut lists = [Vec::new(), Vec::new()];
            for list in &mut lists {
                let n = r.u32()? as usize;
                if n > crate::limits::MAX_PLAN_HASHES {
                    return Err(r.invalid("count of a plan's hashes"));
                }
                r.need(n * 16)?;
                list.reserve_exact(n);
                for _ in 0..n {
                    list.push(r.hash()?);
                }
            }
            let [hashes, chunks] = lists;
            Message::PlanQuery {
                key_id,
                hashes,
                chunks,
            }
        }
        MessageType::PlanHeld => Message::PlanHeld {
            held: r.u32()?,
            chunks_held: r.u32()?,
        },
        MessageType::ProbeBytes => Message::ProbeBytes(r.rest()),
        MessageType::ProbeEnd => Message::ProbeEnd,
        MessageType::PostcopyOffer => Message::PostcopyOffer,
        MessageType::PostcopyRun => Message::PostcopyRun,
        MessageType::PostcopyResume => Message::PostcopyResume {
            migration_id: r.str()?,
        },
        MessageType::PostcopyResumed => Message::PostcopyResumed,
        MessageType::ProbeResult => Message::ProbeResult {
            bytes: r.u64()?,
            micros: r.u64()?,
        },
        MessageType::PostcopyFaults => Message::PostcopyFaults {
            requests: r.u64()?,
            pages: r.u64()?,
            blocktime: match r.bool()? {
                true => Some(Blocktime {
                    all_vcpus_ms: r.u64()?,
                    max_vcpu_ms: r.u64()?,
                }),
                false => None,
            },
            local: if r.b.is_empty() { 0 } else { r.u64()? },
        },
    };
    if !r.b.is_empty() {
        return Err(FrameError::Trailing(r.b.len(), r.msg));
    }
    Ok(msg)
}

/// Strings on this protocol are names and short messages: cut at 64 KiB, on a char boundary.
fn wire_str(s: &str) -> &str {
    let mut end = s.len().min(u16::MAX as usize);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

fn put_str(out: &mut BytesMut, s: &str) {
    let s = wire_str(s);
    out.put_u16(s.len() as u16);
    out.put_slice(s.as_bytes());
}

fn put_bytes(out: &mut BytesMut, b: &[u8]) {
    out.put_u32(b.len() as u32);
    out.put_slice(b);
}

struct Reader {
    b: Bytes,
    msg: &'static str,
}

impl Reader {
    fn need(&self, n: usize) -> Result<(), FrameError> {
        if self.b.len() < n {
            return Err(FrameError::Short {
                msg: self.msg,
                needed: n - self.b.len(),
            });
        }
        Ok(())
    }
    fn invalid(&self, what: &'static str) -> FrameError {
        FrameError::Invalid {
            msg: self.msg,
            what,
        }
    }
    fn u8(&mut self) -> Result<u8, FrameError> {
        self.need(1)?;
        Ok(self.b.get_u8())
    }
    fn bool(&mut self) -> Result<bool, FrameError> {
        match self.u8()? {
            0 => Ok(false),
            1 => Ok(true),
            _ => Err(self.invalid("boolean")),
        }
    }
    fn u16(&mut self) -> Result<u16, FrameError> {
        self.need(2)?;
        Ok(self.b.get_u16())
    }
    fn u32(&mut self) -> Result<u32, FrameError> {
        self.need(4)?;
        Ok(self.b.get_u32())
    }
    fn u64(&mut self) -> Result<u64, FrameError> {
        self.need(8)?;
        Ok(self.b.get_u64())
    }
    fn digest(&mut self) -> Result<[u8; 32], FrameError> {
        self.need(32)?;
        let mut d = [0u8; 32];
        self.b.copy_to_slice(&mut d);
        Ok(d)
    }
    fn hash(&mut self) -> Result<ContentHash, FrameError> {
        self.need(16)?;
        let mut h = [0u8; 16];
        self.b.copy_to_slice(&mut h);
        Ok(h)
    }
    fn str(&mut self) -> Result<String, FrameError> {
        let n = self.u16()? as usize;
        self.need(n)?;
        let s = self.b.split_to(n);
        String::from_utf8(s.to_vec()).map_err(|_| self.invalid("string (not UTF-8)"))
    }
    fn bytes(&mut self) -> Result<Bytes, FrameError> {
        let n = self.u32()? as usize;
        self.need(n)?;
        Ok(self.b.split_to(n))
    }
    fn rest(&mut self) -> Bytes {
        std::mem::take(&mut self.b)
    }
}

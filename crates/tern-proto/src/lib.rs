//! tern's agent-to-agent wire protocol: frames, messages, versions and error codes.
//!
//! Pure functions over bytes: no sockets, no clocks, no QEMU. The agents own the I/O
//! (`tern-agent`), this crate owns what the bytes mean. docs/protocol.md is the normative
//! description; this module doc is the short version.
//!
//! ```text
//!  source agent                                   destination agent
//!  ------------                                   -----------------
//!  Hello{min,max,agent}            ------------>
//!                                  <------------  HelloAck{version,agent}
//!  Prepare{id,spec,running,qemu}   ------------>  starts QEMU -incoming defer (-S)
//!                                  <------------  Summary{key id, hash prefixes}+ (v2)
//!                                  <------------  Prepared{qemu}
//!  QemuBytes / RamBlocks / Pages   ============>  rebuilds QEMU's stream, in order
//!    (pages: zero, raw, ref, delta)
//!                                  <============  ReturnPath (PONG, SHUT, ...)
//!                                  <------------  Want{hashes}    (v2, rare: a ref missed)
//!  Content{hash, bytes}            ------------>
//!
//!  parallel streams (v2): extra connections, each Hello / HelloAck, Attach{id, index},
//!  then data frames each preceded by Seq{n}; the destination applies them in n order.
//!  SourceDone{digest}              ------------>  compares digests, QEMU loaded
//!                                  <------------  ReadyToResume{digest}
//!  Commit          (switchover point: the source will never resume after this)
//!                                  ------------>  cont
//!                                  <------------  Resumed{at}
//!  either side, any time before Commit:  Abort{code,message}
//!
//!  no Resumed after Commit? on a new connection:
//!  Hello / HelloAck, Query{id}      ------------>
//!                                  <------------  QueryAnswer{state, resumed_at}
//! ```
//!
//! A frame is `u8 type | u8 flags | be32 payload length | payload`; flags 1 and 2 (v2)
//! mean the payload is `be32 raw length + lz4 / zstd block`, 0 that it is plain. Type 0 is reserved
//! as invalid. Integers are big-endian, strings are `be16 length + UTF-8`, byte strings
//! `be32 length + bytes`. A receiver rejects unknown types, unknown flags, lengths above
//! [`MAX_PAYLOAD`] and payloads with bytes left over.
#![forbid(unsafe_code)]

pub mod limits;

use bytes::{Buf, BufMut, Bytes, BytesMut};

/// Newest protocol version this build speaks.
pub const PROTOCOL_VERSION: u16 = 4;
/// Oldest protocol version this build still accepts (N and N-1). With a v1 peer a source
/// sends zero and raw pages only, uncompressed.
pub const MIN_PROTOCOL_VERSION: u16 = 1;
/// Largest payload a frame may carry.
pub const MAX_PAYLOAD: usize = 32 << 20;
/// Bytes in a frame header.
pub const HEADER_LEN: usize = 6;

/// Frame type bytes. Stable: never renumber, only add.
pub mod tag {
    pub const INVALID: u8 = 0;
    pub const HELLO: u8 = 1;
    pub const HELLO_ACK: u8 = 2;
    pub const PREPARE: u8 = 3;
    pub const PREPARED: u8 = 4;
    pub const QEMU_BYTES: u8 = 5;
    pub const RAM_BLOCKS: u8 = 6;
    pub const PAGES: u8 = 7;
    pub const RETURN_PATH: u8 = 8;
    pub const SOURCE_DONE: u8 = 9;
    pub const READY_TO_RESUME: u8 = 10;
    pub const COMMIT: u8 = 11;
    pub const RESUMED: u8 = 12;
    pub const ABORT: u8 = 13;
    pub const QUERY: u8 = 14;
    pub const QUERY_ANSWER: u8 = 15;
    pub const SUMMARY: u8 = 16;
    pub const WANT: u8 = 17;
    pub const CONTENT: u8 = 18;
    pub const ATTACH: u8 = 19;
    pub const SEQ: u8 = 20;
    pub const APPLIED: u8 = 21;
    pub const DISK_OFFER: u8 = 22;
    pub const DISK_MANIFEST: u8 = 23;
    pub const DISK_WANT: u8 = 24;
    pub const DISK_DATA: u8 = 25;
    pub const DISK_ROUND_END: u8 = 26;
    pub const DISK_ROUND_DONE: u8 = 27;
    pub const TPM_KEY: u8 = 28;
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

/// A page's content identity: the first 16 bytes of the cluster-keyed BLAKE3 of its bytes
/// (`tern-store` computes it; this crate only carries it).
pub type ContentHash = [u8; 16];

/// What a destination agent knows of a migration, answering [`Message::Query`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MigrationState {
    /// No such migration here (never seen, or the agent restarted: no VM from it runs).
    Unknown,
    /// Switched over: the VM runs here.
    Running,
    /// Failed before the switchover: everything of it was removed here.
    Discarded,
    /// Still going; ask again.
    InProgress,
}

impl MigrationState {
    fn to_u8(self) -> u8 {
        match self {
            MigrationState::Unknown => 0,
            MigrationState::Running => 1,
            MigrationState::Discarded => 2,
            MigrationState::InProgress => 3,
        }
    }
    fn from_u8(v: u8) -> Option<Self> {
        Some(match v {
            0 => MigrationState::Unknown,
            1 => MigrationState::Running,
            2 => MigrationState::Discarded,
            3 => MigrationState::InProgress,
            _ => return None,
        })
    }
}

/// Why a migration was aborted, as carried on the wire. Codes are stable.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ErrorCode {
    /// A bug or an unexpected local failure.
    Internal,
    /// The peer broke the protocol (bad frame, message out of order).
    Protocol,
    /// No common protocol version.
    VersionMismatch,
    /// The destination already has a VM of that name.
    VmExists,
    /// The destination refused the VM spec (invalid, or files missing there).
    SpecRejected,
    /// The destination could not start QEMU.
    QemuLaunchFailed,
    /// A QEMU process failed during the migration.
    QemuFailed,
    /// The source QEMU's stream uses a feature tern does not carry.
    StreamUnsupported,
    /// The source QEMU's stream could not be parsed.
    StreamMalformed,
    /// The memory digests of the two sides differ.
    DigestMismatch,
    /// An operator cancelled the migration.
    Cancelled,
    /// A step took too long.
    Timeout,
    /// The destination lacks a resource (disk, memory).
    ResourceExhausted,
    /// The authorisation policy does not allow this VM on that host.
    NotAuthorized,
    /// Peer authentication or integrity failed (certificate refused, data altered).
    Security,
    /// A code this build does not know (a newer peer).
    Unknown(u16),
}

impl ErrorCode {
    pub fn to_u16(self) -> u16 {
        match self {
            ErrorCode::Internal => 1,
            ErrorCode::Protocol => 2,
            ErrorCode::VersionMismatch => 3,
            ErrorCode::VmExists => 4,
            ErrorCode::SpecRejected => 5,
            ErrorCode::QemuLaunchFailed => 6,
            ErrorCode::QemuFailed => 7,
            ErrorCode::StreamUnsupported => 8,
            ErrorCode::StreamMalformed => 9,
            ErrorCode::DigestMismatch => 10,
            ErrorCode::Cancelled => 11,
            ErrorCode::Timeout => 12,
            ErrorCode::ResourceExhausted => 13,
            ErrorCode::NotAuthorized => 14,
            ErrorCode::Security => 15,
            ErrorCode::Unknown(c) => c,
        }
    }

    pub fn from_u16(c: u16) -> ErrorCode {
        match c {
            1 => ErrorCode::Internal,
            2 => ErrorCode::Protocol,
            3 => ErrorCode::VersionMismatch,
            4 => ErrorCode::VmExists,
            5 => ErrorCode::SpecRejected,
            6 => ErrorCode::QemuLaunchFailed,
            7 => ErrorCode::QemuFailed,
            8 => ErrorCode::StreamUnsupported,
            9 => ErrorCode::StreamMalformed,
            10 => ErrorCode::DigestMismatch,
            11 => ErrorCode::Cancelled,
            12 => ErrorCode::Timeout,
            13 => ErrorCode::ResourceExhausted,
            14 => ErrorCode::NotAuthorized,
            15 => ErrorCode::Security,
            c => ErrorCode::Unknown(c),
        }
    }

    /// Whether trying the same migration again may succeed without operator action.
    pub fn retryable(self) -> bool {
        matches!(
            self,
            ErrorCode::Internal
                | ErrorCode::QemuFailed
                | ErrorCode::DigestMismatch
                | ErrorCode::Cancelled
                | ErrorCode::Timeout
                | ErrorCode::Unknown(_)
        )
    }

    /// A short stable name, for logs and JSON reports.
    pub fn name(self) -> &'static str {
        match self {
            ErrorCode::Internal => "internal",
            ErrorCode::Protocol => "protocol",
            ErrorCode::VersionMismatch => "version-mismatch",
            ErrorCode::VmExists => "vm-exists",
            ErrorCode::SpecRejected => "spec-rejected",
            ErrorCode::QemuLaunchFailed => "qemu-launch-failed",
            ErrorCode::QemuFailed => "qemu-failed",
            ErrorCode::StreamUnsupported => "stream-unsupported",
            ErrorCode::StreamMalformed => "stream-malformed",
            ErrorCode::DigestMismatch => "digest-mismatch",
            ErrorCode::Cancelled => "cancelled",
            ErrorCode::Timeout => "timeout",
            ErrorCode::ResourceExhausted => "resource-exhausted",
            ErrorCode::NotAuthorized => "not-authorized",
            ErrorCode::Security => "security",
            ErrorCode::Unknown(_) => "unknown",
        }
    }
}

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
}

const PAGE_ZERO: u8 = 0;
const PAGE_RAW: u8 = 1;
const PAGE_REF: u8 = 2;
const PAGE_DELTA: u8 = 3;

/// Payload compression of a frame, in the low bits of its flags byte (v2).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Codec {
    None,
    Lz4,
    /// zstd at the given level (the level matters to the sender only).
    Zstd(i32),
}

impl Codec {
    fn flag(self) -> u8 {
        match self {
            Codec::None => 0,
            Codec::Lz4 => FLAG_LZ4,
            Codec::Zstd(_) => FLAG_ZSTD,
        }
    }
    pub fn name(self) -> String {
        match self {
            Codec::None => "none".into(),
            Codec::Lz4 => "lz4".into(),
            Codec::Zstd(l) => format!("zstd-{l}"),
        }
    }
}

const FLAG_LZ4: u8 = 1;
const FLAG_ZSTD: u8 = 2;
const FLAG_CODEC_MASK: u8 = 3;

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
}

impl Message {
    pub fn tag(&self) -> u8 {
        match self {
            Message::Hello { .. } => tag::HELLO,
            Message::HelloAck { .. } => tag::HELLO_ACK,
            Message::Prepare { .. } => tag::PREPARE,
            Message::Prepared { .. } => tag::PREPARED,
            Message::QemuBytes(_) => tag::QEMU_BYTES,
            Message::RamBlocks { .. } => tag::RAM_BLOCKS,
            Message::Pages { .. } => tag::PAGES,
            Message::ReturnPath(_) => tag::RETURN_PATH,
            Message::SourceDone { .. } => tag::SOURCE_DONE,
            Message::ReadyToResume { .. } => tag::READY_TO_RESUME,
            Message::Commit => tag::COMMIT,
            Message::Resumed { .. } => tag::RESUMED,
            Message::Abort { .. } => tag::ABORT,
            Message::Query { .. } => tag::QUERY,
            Message::QueryAnswer { .. } => tag::QUERY_ANSWER,
            Message::Summary { .. } => tag::SUMMARY,
            Message::Want { .. } => tag::WANT,
            Message::Content { .. } => tag::CONTENT,
            Message::Attach { .. } => tag::ATTACH,
            Message::Seq { .. } => tag::SEQ,
            Message::Applied { .. } => tag::APPLIED,
            Message::DiskOffer { .. } => tag::DISK_OFFER,
            Message::DiskManifest { .. } => tag::DISK_MANIFEST,
            Message::DiskWant { .. } => tag::DISK_WANT,
            Message::DiskData { .. } => tag::DISK_DATA,
            Message::DiskRoundEnd { .. } => tag::DISK_ROUND_END,
            Message::DiskRoundDone { .. } => tag::DISK_ROUND_DONE,
            Message::TpmKey { .. } => tag::TPM_KEY,
        }
    }

    /// A short name for logs and errors.
    pub fn name(&self) -> &'static str {
        match self {
            Message::Hello { .. } => "Hello",
            Message::HelloAck { .. } => "HelloAck",
            Message::Prepare { .. } => "Prepare",
            Message::Prepared { .. } => "Prepared",
            Message::QemuBytes(_) => "QemuBytes",
            Message::RamBlocks { .. } => "RamBlocks",
            Message::Pages { .. } => "Pages",
            Message::ReturnPath(_) => "ReturnPath",
            Message::SourceDone { .. } => "SourceDone",
            Message::ReadyToResume { .. } => "ReadyToResume",
            Message::Commit => "Commit",
            Message::Resumed { .. } => "Resumed",
            Message::Abort { .. } => "Abort",
            Message::Query { .. } => "Query",
            Message::QueryAnswer { .. } => "QueryAnswer",
            Message::Summary { .. } => "Summary",
            Message::Want { .. } => "Want",
            Message::Content { .. } => "Content",
            Message::Attach { .. } => "Attach",
            Message::Seq { .. } => "Seq",
            Message::Applied { .. } => "Applied",
            Message::DiskOffer { .. } => "DiskOffer",
            Message::DiskManifest { .. } => "DiskManifest",
            Message::DiskWant { .. } => "DiskWant",
            Message::DiskData { .. } => "DiskData",
            Message::DiskRoundEnd { .. } => "DiskRoundEnd",
            Message::DiskRoundDone { .. } => "DiskRoundDone",
            Message::TpmKey { .. } => "TpmKey",
        }
    }
}

/// Why bytes from a peer are not a valid frame.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum FrameError {
    #[error("unknown frame type {0}")]
    UnknownType(u8),
    #[error("frame type {0} has non-zero flags {1:#04x}")]
    BadFlags(u8, u8),
    #[error("frame payload of {0} bytes exceeds the {MAX_PAYLOAD}-byte limit")]
    TooLarge(usize),
    #[error("{msg} payload ends early (needs {needed} more bytes)")]
    Short { msg: &'static str, needed: usize },
    #[error("{msg} payload has {0} bytes left over", msg = .1)]
    Trailing(usize, &'static str),
    #[error("{msg}: invalid {what}")]
    Invalid {
        msg: &'static str,
        what: &'static str,
    },
}

/// Appends the frame for `msg` to `out`.
pub fn encode(msg: &Message, out: &mut BytesMut) {
    let mut segs = Vec::new();
    encode_segments(msg, out, &mut segs);
    if !segs.is_empty() {
        // bulk payloads were split off: put the frame back together in order
        let tail = out.split();
        for s in segs {
            out.extend_from_slice(&s);
        }
        out.extend_from_slice(&tail);
    }
}

/// Appends the frame for `msg` as segments, without copying bulk data: header and small
/// fields are written to `scratch`; before each bulk payload (page data, QEMU bytes) what
/// `scratch` holds is moved into `segs`, then the payload itself is pushed. The frame's
/// bytes are `segs` followed by what is left in `scratch`. Same bytes as [`encode`].
pub fn encode_segments(msg: &Message, scratch: &mut BytesMut, segs: &mut Vec<Bytes>) {
    let bulk = |scratch: &mut BytesMut, segs: &mut Vec<Bytes>, b: &Bytes| {
        if !scratch.is_empty() {
            segs.push(scratch.split().freeze());
        }
        if !b.is_empty() {
            segs.push(b.clone());
        }
    };
    scratch.put_u8(msg.tag());
    scratch.put_u8(0);
    scratch.put_u32(payload_len(msg) as u32);
    let out = scratch;
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
        Message::QemuBytes(b) | Message::ReturnPath(b) => bulk(out, segs, b),
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
    }
}

/// How much of the migration stream a data message stands for, in the units of
/// [`Message::Applied`]: QemuBytes their length, each page record `page_size`.
pub fn stream_units(msg: &Message, page_size: u64) -> u64 {
    match msg {
        Message::QemuBytes(b) => b.len() as u64,
        Message::Pages { pages, .. } => pages.len() as u64 * page_size,
        _ => 0,
    }
}

/// The length of `msg`'s frame, header included (uncompressed).
pub fn frame_len(msg: &Message) -> usize {
    HEADER_LEN + payload_len(msg)
}

/// The payload length of `msg`'s frame.
fn payload_len(msg: &Message) -> usize {
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
        Message::QemuBytes(b) | Message::ReturnPath(b) => b.len(),
        Message::RamBlocks { blocks, .. } => {
            8 + blocks.iter().map(|b| s(&b.name) + 8).sum::<usize>()
        }
        Message::Pages { pages, .. } => {
            6 + pages
                .iter()
                .map(|p| match &p.body {
                    PageBody::Zero { .. } => 10,
                    PageBody::Raw(d) => 13 + d.len(),
                    PageBody::Ref(_) => 25,
                    PageBody::Delta { diff, .. } => 29 + diff.len(),
                })
                .sum::<usize>()
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
    }
}

/// Takes one whole frame off the front of `buf` and decodes it. `Ok(None)` means more
/// bytes are needed. Page data is sliced out of `buf` without copying.
pub fn decode(buf: &mut BytesMut) -> Result<Option<Message>, FrameError> {
    if buf.len() < HEADER_LEN {
        return Ok(None);
    }
    let ty = buf[0];
    let flags = buf[1];
    let len = u32::from_be_bytes([buf[2], buf[3], buf[4], buf[5]]) as usize;
    if !(tag::HELLO..=tag::TPM_KEY).contains(&ty) {
        return Err(FrameError::UnknownType(ty));
    }
    let codec = flags & FLAG_CODEC_MASK;
    if flags & !FLAG_CODEC_MASK != 0 || codec == FLAG_CODEC_MASK {
        return Err(FrameError::BadFlags(ty, flags));
    }
    if len > MAX_PAYLOAD {
        return Err(FrameError::TooLarge(len));
    }
    if buf.len() < HEADER_LEN + len {
        buf.reserve(HEADER_LEN + len - buf.len());
        return Ok(None);
    }
    buf.advance(HEADER_LEN);
    let payload = buf.split_to(len).freeze();
    let payload = if codec == 0 {
        payload
    } else {
        decompress(ty, codec, &payload)?
    };
    decode_payload(ty, payload).map(Some)
}

fn decompress(ty: u8, codec: u8, payload: &[u8]) -> Result<Bytes, FrameError> {
    let bad = |what| FrameError::Invalid {
        msg: tag_name(ty),
        what,
    };
    if payload.len() < 4 {
        return Err(bad("compressed payload (no length)"));
    }
    let raw_len = u32::from_be_bytes([payload[0], payload[1], payload[2], payload[3]]) as usize;
    if raw_len > MAX_PAYLOAD {
        return Err(FrameError::TooLarge(raw_len));
    }
    let data = &payload[4..];
    let out = if codec == FLAG_LZ4 {
        lz4_flex::block::decompress(data, raw_len).map_err(|_| bad("lz4 payload"))?
    } else {
        zstd::bulk::decompress(data, raw_len).map_err(|_| bad("zstd payload"))?
    };
    if out.len() != raw_len {
        return Err(bad("compressed payload (length differs)"));
    }
    Ok(Bytes::from(out))
}

/// Encodes frames with their payload compressed (v2 peers only); keeps the zstd context
/// between frames. A frame whose payload does not shrink goes uncompressed.
#[derive(Default)]
pub struct FrameCompressor {
    zstd: Option<(i32, zstd::bulk::Compressor<'static>)>,
    scratch: BytesMut,
}

/// What [`FrameCompressor::encode`] did to one frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Compressed {
    /// Payload bytes before compression.
    pub raw: usize,
    /// Frame bytes appended to `out` (header included).
    pub wire: usize,
}

impl FrameCompressor {
    /// Appends `msg`'s frame to `out`, its payload compressed with `codec`.
    pub fn encode(&mut self, msg: &Message, codec: Codec, out: &mut BytesMut) -> Compressed {
        self.scratch.clear();
        encode(msg, &mut self.scratch);
        let raw = self.scratch.len() - HEADER_LEN;
        let payload = &self.scratch[HEADER_LEN..];
        let packed = match codec {
            Codec::None => None,
            Codec::Lz4 => Some(lz4_flex::block::compress(payload)),
            Codec::Zstd(level) => {
                if self.zstd.as_ref().map(|(l, _)| *l) != Some(level) {
                    self.zstd = zstd::bulk::Compressor::new(level).ok().map(|c| (level, c));
                }
                self.zstd
                    .as_mut()
                    .and_then(|(_, c)| c.compress(payload).ok())
            }
        };
        let start = out.len();
        match packed {
            Some(p) if p.len() + 4 < raw => {
                out.put_u8(msg.tag());
                out.put_u8(codec.flag());
                out.put_u32((p.len() + 4) as u32);
                out.put_u32(raw as u32);
                out.put_slice(&p);
            }
            _ => out.extend_from_slice(&self.scratch),
        }
        Compressed {
            raw,
            wire: out.len() - start,
        }
    }
}

fn decode_payload(ty: u8, payload: Bytes) -> Result<Message, FrameError> {
    let mut r = Reader {
        b: payload,
        msg: tag_name(ty),
    };
    let msg = match ty {
        tag::HELLO => Message::Hello {
            min_version: r.u16()?,
            max_version: r.u16()?,
            agent: r.str()?,
        },
        tag::HELLO_ACK => Message::HelloAck {
            version: r.u16()?,
            agent: r.str()?,
        },
        tag::PREPARE => Message::Prepare {
            migration_id: r.str()?,
            spec_toml: String::from_utf8(r.bytes()?.to_vec())
                .map_err(|_| r.invalid("spec (not UTF-8)"))?,
            source_running: r.bool()?,
            qemu_version: r.str()?,
        },
        tag::PREPARED => Message::Prepared {
            qemu_version: r.str()?,
        },
        tag::QEMU_BYTES => Message::QemuBytes(r.rest()),
        tag::RETURN_PATH => Message::ReturnPath(r.rest()),
        tag::RAM_BLOCKS => {
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
        tag::PAGES => {
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
                    _ => return Err(r.invalid("page kind")),
                };
                pages.push(Page { offset, body });
            }
            Message::Pages { block, pages }
        }
        tag::SOURCE_DONE => Message::SourceDone {
            digest: r.digest()?,
            pages: r.u64()?,
            commit: if r.b.is_empty() { false } else { r.bool()? },
        },
        tag::READY_TO_RESUME => Message::ReadyToResume {
            digest: r.digest()?,
        },
        tag::COMMIT => Message::Commit,
        tag::RESUMED => Message::Resumed {
            resumed_unix_us: r.u64()?,
        },
        tag::ABORT => Message::Abort {
            code: ErrorCode::from_u16(r.u16()?),
            message: r.str()?,
        },
        tag::QUERY => Message::Query {
            migration_id: r.str()?,
        },
        tag::QUERY_ANSWER => Message::QueryAnswer {
            state: MigrationState::from_u8(r.u8()?).ok_or_else(|| r.invalid("migration state"))?,
            resumed_unix_us: r.u64()?,
        },
        tag::SUMMARY => {
            let key_id = r.u64()?;
            let n = r.u32()? as usize;
            r.need(n.saturating_mul(8))?;
            Message::Summary {
                key_id,
                prefixes: (0..n).map(|_| r.b.get_u64()).collect(),
            }
        }
        tag::WANT => {
            let n = r.u32()? as usize;
            r.need(n.saturating_mul(16))?;
            let mut hashes = Vec::with_capacity(n);
            for _ in 0..n {
                hashes.push(r.hash()?);
            }
            Message::Want { hashes }
        }
        tag::CONTENT => {
            let n = r.u32()? as usize;
            let mut pages = Vec::with_capacity(n.min(r.b.len() / 20 + 1));
            for _ in 0..n {
                pages.push((r.hash()?, r.bytes()?));
            }
            Message::Content { pages }
        }
        tag::ATTACH => Message::Attach {
            migration_id: r.str()?,
            index: r.u16()?,
        },
        tag::SEQ => Message::Seq { seq: r.u64()? },
        tag::APPLIED => Message::Applied { units: r.u64()? },
        tag::DISK_OFFER => {
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
        tag::DISK_MANIFEST => Message::DiskManifest {
            disk: r.u16()?,
            piece: r.u32()?,
            manifest: r.rest(),
        },
        tag::DISK_WANT => {
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
        tag::DISK_DATA => Message::DiskData {
            disk: r.u16()?,
            piece: r.u32()?,
            offset: r.u64()?,
            data: r.rest(),
        },
        tag::DISK_ROUND_END => Message::DiskRoundEnd {
            disk: r.u16()?,
            round: r.u32()?,
            last: r.bool()?,
        },
        tag::DISK_ROUND_DONE => Message::DiskRoundDone {
            disk: r.u16()?,
            round: r.u32()?,
            written: r.u64()?,
        },
        tag::TPM_KEY => Message::TpmKey { key: r.digest()? },
        other => return Err(FrameError::UnknownType(other)),
    };
    if !r.b.is_empty() {
        return Err(FrameError::Trailing(r.b.len(), r.msg));
    }
    Ok(msg)
}

fn tag_name(ty: u8) -> &'static str {
    match ty {
        tag::HELLO => "Hello",
        tag::HELLO_ACK => "HelloAck",
        tag::PREPARE => "Prepare",
        tag::PREPARED => "Prepared",
        tag::QEMU_BYTES => "QemuBytes",
        tag::RAM_BLOCKS => "RamBlocks",
        tag::PAGES => "Pages",
        tag::RETURN_PATH => "ReturnPath",
        tag::SOURCE_DONE => "SourceDone",
        tag::READY_TO_RESUME => "ReadyToResume",
        tag::COMMIT => "Commit",
        tag::RESUMED => "Resumed",
        tag::ABORT => "Abort",
        tag::QUERY => "Query",
        tag::QUERY_ANSWER => "QueryAnswer",
        tag::SUMMARY => "Summary",
        tag::WANT => "Want",
        tag::CONTENT => "Content",
        tag::ATTACH => "Attach",
        tag::SEQ => "Seq",
        tag::APPLIED => "Applied",
        tag::DISK_OFFER => "DiskOffer",
        tag::DISK_MANIFEST => "DiskManifest",
        tag::DISK_WANT => "DiskWant",
        tag::DISK_DATA => "DiskData",
        tag::DISK_ROUND_END => "DiskRoundEnd",
        tag::DISK_ROUND_DONE => "DiskRoundDone",
        tag::TPM_KEY => "TpmKey",
        _ => "Invalid",
    }
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

/// Picks the protocol version for a peer offering `[min, max]`: the newest both speak.
pub fn negotiate(peer_min: u16, peer_max: u16) -> Option<u16> {
    let hi = peer_max.min(PROTOCOL_VERSION);
    let lo = peer_min.max(MIN_PROTOCOL_VERSION);
    (lo <= hi).then_some(hi)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn roundtrip(m: &Message) -> Message {
        let mut b = BytesMut::new();
        encode(m, &mut b);
        let got = decode(&mut b).unwrap().unwrap();
        assert!(b.is_empty(), "decode left {} bytes", b.len());
        got
    }

    fn all_messages() -> Vec<Message> {
        vec![
            Message::Hello {
                min_version: 1,
                max_version: 3,
                agent: "host-a".into(),
            },
            Message::HelloAck {
                version: 1,
                agent: "host-b".into(),
            },
            Message::Prepare {
                migration_id: "m-1".into(),
                spec_toml: "name = \"vm\"\n".into(),
                source_running: true,
                qemu_version: "10.0.2".into(),
            },
            Message::Prepared {
                qemu_version: "10.0.2".into(),
            },
            Message::QemuBytes(Bytes::from_static(b"\x01\x02")),
            Message::RamBlocks {
                page_size: 4096,
                blocks: vec![RamBlock {
                    name: "pc.ram".into(),
                    used_length: 1 << 29,
                }],
            },
            Message::Pages {
                block: 3,
                pages: vec![
                    Page {
                        offset: 0,
                        body: PageBody::Zero { fill: 0 },
                    },
                    Page {
                        offset: 4096,
                        body: PageBody::Raw(Bytes::from(vec![7u8; 4096])),
                    },
                ],
            },
            Message::ReturnPath(Bytes::from_static(b"\x00\x01\x00\x04\x00\x00\x00\x00")),
            Message::SourceDone {
                digest: [9; 32],
                pages: 77,
                commit: false,
            },
            Message::SourceDone {
                digest: [9; 32],
                pages: 77,
                commit: true,
            },
            Message::ReadyToResume { digest: [8; 32] },
            Message::Commit,
            Message::Resumed {
                resumed_unix_us: 1_700_000_000_000_000,
            },
            Message::Abort {
                code: ErrorCode::DigestMismatch,
                message: "differs".into(),
            },
            Message::Abort {
                code: ErrorCode::Unknown(999),
                message: String::new(),
            },
            Message::Query {
                migration_id: "m-1".into(),
            },
            Message::QueryAnswer {
                state: MigrationState::Running,
                resumed_unix_us: 5,
            },
            Message::QueryAnswer {
                state: MigrationState::Discarded,
                resumed_unix_us: 0,
            },
            Message::Pages {
                block: 3,
                pages: vec![
                    Page {
                        offset: 4096,
                        body: PageBody::Ref([5; 16]),
                    },
                    Page {
                        offset: 8192,
                        body: PageBody::Delta {
                            result: [6; 16],
                            diff: Bytes::from_static(b"\x00\x02ab"),
                        },
                    },
                ],
            },
            Message::Summary {
                key_id: 77,
                prefixes: vec![1, u64::MAX, 0],
            },
            Message::Summary {
                key_id: 0,
                prefixes: vec![],
            },
            Message::Want {
                hashes: vec![[1; 16], [2; 16]],
            },
            Message::Content {
                pages: vec![
                    ([3; 16], Bytes::from(vec![9u8; 4096])),
                    ([4; 16], Bytes::new()),
                ],
            },
            Message::DiskOffer {
                disks: vec![
                    DiskInfo {
                        virtual_size: 1 << 30,
                        allocated: 5 << 20,
                    },
                    DiskInfo {
                        virtual_size: 0,
                        allocated: 0,
                    },
                ],
            },
            Message::DiskOffer { disks: vec![] },
            Message::DiskManifest {
                disk: 1,
                piece: 7,
                manifest: Bytes::from_static(b"manifest bytes"),
            },
            Message::DiskWant {
                disk: 0,
                piece: 3,
                runs: vec![(4096, 2), (1 << 40, u32::MAX)],
            },
            Message::DiskWant {
                disk: 0,
                piece: 4,
                runs: vec![],
            },
            Message::DiskData {
                disk: 2,
                piece: DISK_DIRECT,
                offset: 8192,
                data: Bytes::from(vec![1u8; 8192]),
            },
            Message::DiskRoundEnd {
                disk: 0,
                round: 5,
                last: false,
            },
            Message::DiskRoundEnd {
                disk: 1,
                round: 9,
                last: true,
            },
            Message::DiskRoundDone {
                disk: 0,
                round: 5,
                written: 12345,
            },
            Message::TpmKey { key: [7; 32] },
        ]
    }

    #[test]
    fn every_message_roundtrips() {
        for m in all_messages() {
            assert_eq!(roundtrip(&m), m);
        }
    }

    #[test]
    fn segments_hold_the_same_bytes_and_share_page_data() {
        for m in all_messages() {
            let mut whole = BytesMut::new();
            encode(&m, &mut whole);
            let mut scratch = BytesMut::new();
            let mut segs = Vec::new();
            encode_segments(&m, &mut scratch, &mut segs);
            let mut joined: Vec<u8> = segs.iter().flat_map(|s| s.iter().copied()).collect();
            joined.extend_from_slice(&scratch);
            assert_eq!(joined, &whole[..], "{}", m.name());
            if let Message::Pages { pages, .. } = &m {
                for p in pages {
                    if let PageBody::Raw(d) = &p.body {
                        assert!(
                            segs.iter().any(|s| s.as_ptr() == d.as_ptr()),
                            "page data was copied"
                        );
                    }
                }
            }
        }
        // a string longer than 64 KiB is cut, and the length prefix agrees with the cut
        let long = "é".repeat(40_000);
        let m = Message::Abort {
            code: ErrorCode::Internal,
            message: long,
        };
        let mut b = BytesMut::new();
        encode(&m, &mut b);
        assert!(matches!(decode(&mut b), Ok(Some(Message::Abort { .. }))));
    }

    #[test]
    fn partial_frames_need_more_bytes() {
        for m in all_messages() {
            let mut full = BytesMut::new();
            encode(&m, &mut full);
            for cut in 0..full.len() {
                let mut b = BytesMut::from(&full[..cut]);
                assert_eq!(decode(&mut b), Ok(None), "{} cut at {cut}", m.name());
            }
        }
    }

    #[test]
    fn bad_frames_are_rejected() {
        let mut b = BytesMut::from(&[0u8, 0, 0, 0, 0, 0][..]);
        assert_eq!(decode(&mut b), Err(FrameError::UnknownType(0)));
        let mut b = BytesMut::from(&[200u8, 0, 0, 0, 0, 0][..]);
        assert_eq!(decode(&mut b), Err(FrameError::UnknownType(200)));
        let mut b =
            BytesMut::from(&[tag::QUERY_ANSWER, 0, 0, 0, 0, 9, 7, 0, 0, 0, 0, 0, 0, 0, 0][..]);
        assert!(matches!(
            decode(&mut b),
            Err(FrameError::Invalid {
                what: "migration state",
                ..
            })
        ));
        let mut b = BytesMut::from(&[tag::COMMIT, 0x80, 0, 0, 0, 0][..]);
        assert_eq!(decode(&mut b), Err(FrameError::BadFlags(tag::COMMIT, 0x80)));
        // a compressed payload too short to hold its length
        let mut b = BytesMut::from(&[tag::COMMIT, 1, 0, 0, 0, 0][..]);
        assert!(matches!(decode(&mut b), Err(FrameError::Invalid { .. })));
        let mut b = BytesMut::from(&[tag::QEMU_BYTES, 0, 0xff, 0xff, 0xff, 0xff][..]);
        assert!(matches!(decode(&mut b), Err(FrameError::TooLarge(_))));
        let mut b = BytesMut::from(&[tag::COMMIT, 0, 0, 0, 0, 1, 5][..]);
        assert_eq!(decode(&mut b), Err(FrameError::Trailing(1, "Commit")));
        let mut b = BytesMut::from(&[tag::RESUMED, 0, 0, 0, 0, 2, 0, 0][..]);
        assert!(matches!(
            decode(&mut b),
            Err(FrameError::Short { msg: "Resumed", .. })
        ));
        // a page record with an unknown kind
        let mut b = BytesMut::from(
            &[
                tag::PAGES,
                0,
                0,
                0,
                0,
                15,
                0,
                0,
                0,
                0,
                0,
                1,
                0,
                0,
                0,
                0,
                0,
                0,
                0,
                0,
                9,
            ][..],
        );
        assert!(matches!(
            decode(&mut b),
            Err(FrameError::Invalid {
                what: "page kind",
                ..
            })
        ));
    }

    #[test]
    fn version_negotiation_picks_newest_common() {
        assert_eq!(negotiate(1, 1), Some(1));
        assert_eq!(negotiate(1, 9), Some(PROTOCOL_VERSION));
        assert_eq!(negotiate(PROTOCOL_VERSION + 1, PROTOCOL_VERSION + 5), None);
        assert_eq!(negotiate(0, 0), None);
    }

    #[test]
    fn error_codes_are_stable() {
        for c in 1..=15u16 {
            assert_eq!(ErrorCode::from_u16(c).to_u16(), c);
            assert_ne!(ErrorCode::from_u16(c).name(), "unknown");
        }
        assert_eq!(ErrorCode::from_u16(10), ErrorCode::DigestMismatch);
        assert!(!ErrorCode::StreamUnsupported.retryable());
        assert!(ErrorCode::Timeout.retryable());
    }

    #[test]
    fn compressible_frames_shrink_and_bad_compressed_payloads_are_errors() {
        let m = Message::QemuBytes(Bytes::from(vec![b'a'; 100_000]));
        for codec in [Codec::Lz4, Codec::Zstd(3)] {
            let mut b = BytesMut::new();
            let r = FrameCompressor::default().encode(&m, codec, &mut b);
            assert!(r.wire < 2000, "{codec:?}: {} bytes", r.wire);
            assert_ne!(b[1], 0, "flags name the codec");
            let mut bad = b.clone();
            let n = bad.len();
            bad[n - 3] ^= 0xff;
            bad[n - 2] ^= 0xff;
            // a corrupted body either fails to decompress or decompresses to other bytes
            match decode(&mut bad) {
                Err(FrameError::Invalid { .. }) => {}
                Ok(Some(got)) => assert_ne!(got, m),
                other => panic!("{codec:?}: {other:?}"),
            }
            let mut lie = b.clone();
            lie[6..10].copy_from_slice(&(MAX_PAYLOAD as u32 + 1).to_be_bytes());
            assert_eq!(decode(&mut lie), Err(FrameError::TooLarge(MAX_PAYLOAD + 1)));
            assert_eq!(decode(&mut b).unwrap().unwrap(), m);
        }
        let mut b = BytesMut::new();
        encode(&m, &mut b);
        b[1] = 3;
        assert_eq!(
            decode(&mut b),
            Err(FrameError::BadFlags(tag::QEMU_BYTES, 3))
        );
    }

    proptest! {
        #[test]
        fn decode_never_panics(data in proptest::collection::vec(any::<u8>(), 0..300)) {
            let mut b = BytesMut::from(&data[..]);
            while let Ok(Some(_)) = decode(&mut b) {}
        }

        #[test]
        fn pages_roundtrip(pages in proptest::collection::vec(
            (any::<u64>(), prop_oneof![
                any::<u8>().prop_map(|fill| PageBody::Zero { fill }),
                proptest::collection::vec(any::<u8>(), 0..64).prop_map(|v| PageBody::Raw(Bytes::from(v))),
                any::<[u8; 16]>().prop_map(PageBody::Ref),
                (any::<[u8; 16]>(), proptest::collection::vec(any::<u8>(), 0..64))
                    .prop_map(|(result, d)| PageBody::Delta { result, diff: Bytes::from(d) }),
            ]), 0..20), block in any::<u16>()) {
            let m = Message::Pages { block, pages: pages.into_iter().map(|(offset, body)| Page { offset, body }).collect() };
            prop_assert_eq!(roundtrip(&m), m);
        }

        #[test]
        fn compressed_frames_decode_to_the_same_message(
            data in proptest::collection::vec(0u8..4, 0..20000),
            codec in prop_oneof![Just(Codec::None), Just(Codec::Lz4), (1i32..6).prop_map(Codec::Zstd)],
        ) {
            let m = Message::Pages { block: 1, pages: vec![Page { offset: 0, body: PageBody::Raw(Bytes::from(data)) }] };
            let mut c = FrameCompressor::default();
            let mut b = BytesMut::new();
            let r = c.encode(&m, codec, &mut b);
            prop_assert_eq!(r.wire, b.len());
            prop_assert!(r.wire <= r.raw + HEADER_LEN);
            prop_assert_eq!(decode(&mut b).unwrap().unwrap(), m);
            prop_assert!(b.is_empty());
        }

        #[test]
        fn byte_at_a_time_decodes_the_same(split in 0usize..64) {
            let msgs = all_messages();
            let mut all = BytesMut::new();
            for m in &msgs { encode(m, &mut all); }
            let mut got = Vec::new();
            let mut buf = BytesMut::new();
            for chunk in all.chunks(split + 1) {
                buf.extend_from_slice(chunk);
                while let Some(m) = decode(&mut buf).unwrap() { got.push(m); }
            }
            prop_assert_eq!(got, msgs);
        }
    }
}

//! NBD wire format: magic numbers, option / command / reply codes, and pure encoders and
//! decoders over byte slices. No I/O: the handshake and the client drive these over a
//! stream. Every decoder returns [`ProtocolError`] on malformed input and never panics.
//!
//! Constants follow the NBD protocol document (NetworkBlockDevice/nbd `doc/proto.md`)
//! and were checked against QEMU's `include/block/nbd.h` and against `qemu-nbd` 10.0.
//! Note that `NBD_OPT_LIST_META_CONTEXT` is 9 and `NBD_OPT_SET_META_CONTEXT` is 10 (old
//! drafts of the spec said 10 and 11; 11 is now `NBD_OPT_EXTENDED_HEADERS`).

use std::fmt;

// ---- handshake -------------------------------------------------------------------------

/// `NBDMAGIC`, first 8 bytes the server sends.
pub(crate) const NBDMAGIC: u64 = 0x4e42_444d_4147_4943;
/// `IHAVEOPT`: newstyle server magic, and prefix of every option the client sends.
pub(crate) const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
/// Oldstyle negotiation magic (`cliserv_magic`), which this client rejects.
pub(crate) const CLISERV_MAGIC: u64 = 0x0000_4202_8186_1253;
/// Magic of every option reply.
pub const OPTION_REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;

/// Handshake flag: server supports fixed newstyle (client echoes it as `NBD_FLAG_C_*`).
pub(crate) const FLAG_FIXED_NEWSTYLE: u16 = 1 << 0;
/// Handshake flag: server can omit the 124 zero bytes after `NBD_OPT_EXPORT_NAME`.
pub(crate) const FLAG_NO_ZEROES: u16 = 1 << 1;
pub(crate) const FLAG_C_FIXED_NEWSTYLE: u32 = 1 << 0;
pub(crate) const FLAG_C_NO_ZEROES: u32 = 1 << 1;

pub(crate) const OPT_EXPORT_NAME: u32 = 1;
pub(crate) const OPT_ABORT: u32 = 2;
pub(crate) const OPT_LIST: u32 = 3;
pub(crate) const OPT_STARTTLS: u32 = 5;
pub(crate) const OPT_INFO: u32 = 6;
pub const OPT_GO: u32 = 7;
pub(crate) const OPT_STRUCTURED_REPLY: u32 = 8;
pub(crate) const OPT_LIST_META_CONTEXT: u32 = 9;
pub(crate) const OPT_SET_META_CONTEXT: u32 = 10;
pub(crate) const OPT_EXTENDED_HEADERS: u32 = 11;

pub const REP_ACK: u32 = 1;
pub const REP_INFO: u32 = 3;
pub const REP_META_CONTEXT: u32 = 4;
pub const REP_FLAG_ERROR: u32 = 1 << 31;
pub(crate) const REP_ERR_UNSUP: u32 = REP_FLAG_ERROR | 1;
pub(crate) const REP_ERR_POLICY: u32 = REP_FLAG_ERROR | 2;
pub(crate) const REP_ERR_INVALID: u32 = REP_FLAG_ERROR | 3;
pub(crate) const REP_ERR_PLATFORM: u32 = REP_FLAG_ERROR | 4;
pub(crate) const REP_ERR_TLS_REQD: u32 = REP_FLAG_ERROR | 5;
pub(crate) const REP_ERR_UNKNOWN: u32 = REP_FLAG_ERROR | 6;
pub(crate) const REP_ERR_SHUTDOWN: u32 = REP_FLAG_ERROR | 7;
pub(crate) const REP_ERR_BLOCK_SIZE_REQD: u32 = REP_FLAG_ERROR | 8;
pub(crate) const REP_ERR_TOO_BIG: u32 = REP_FLAG_ERROR | 9;
pub(crate) const REP_ERR_EXT_HEADER_REQD: u32 = REP_FLAG_ERROR | 10;

pub const INFO_EXPORT: u16 = 0;
pub const INFO_BLOCK_SIZE: u16 = 3;

// ---- transmission ----------------------------------------------------------------------

pub(crate) const REQUEST_MAGIC: u32 = 0x2560_9513;
pub const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
pub const STRUCTURED_REPLY_MAGIC: u32 = 0x668e_33ef;
/// Extended-header reply magic; only valid after `NBD_OPT_EXTENDED_HEADERS`, which this
/// client never sends. Recognised only to give a clearer error.
pub(crate) const EXTENDED_REPLY_MAGIC: u32 = 0x6e8a_278c;

pub(crate) const CMD_READ: u16 = 0;
pub(crate) const CMD_WRITE: u16 = 1;
pub(crate) const CMD_DISC: u16 = 2;
pub(crate) const CMD_FLUSH: u16 = 3;
pub(crate) const CMD_BLOCK_STATUS: u16 = 7;

/// Structured reply flag: last chunk of this reply.
pub const REPLY_FLAG_DONE: u16 = 1 << 0;

pub const REPLY_TYPE_NONE: u16 = 0;
pub const REPLY_TYPE_OFFSET_DATA: u16 = 1;
pub const REPLY_TYPE_OFFSET_HOLE: u16 = 2;
pub const REPLY_TYPE_BLOCK_STATUS: u16 = 5;
pub const REPLY_TYPE_ERROR_BIT: u16 = 1 << 15;
pub const REPLY_TYPE_ERROR: u16 = REPLY_TYPE_ERROR_BIT | 1;
pub const REPLY_TYPE_ERROR_OFFSET: u16 = REPLY_TYPE_ERROR_BIT | 2;

/// Bytes of a request header.
pub(crate) const REQUEST_LEN: usize = 28;
/// Bytes of a simple reply header (magic included).
pub const SIMPLE_REPLY_LEN: usize = 16;
/// Bytes of a structured reply chunk header (magic included).
pub const CHUNK_HEADER_LEN: usize = 20;
/// Bytes of an option reply header.
pub const OPTION_REPLY_HEADER_LEN: usize = 20;

/// Largest option reply or non-data chunk payload accepted. Spec strings are at most
/// 4096 bytes and QEMU caps a block status reply at about 1 MiB of extents; anything far
/// beyond that is a broken or hostile server, not a reason to allocate.
pub const MAX_METADATA_PAYLOAD: u32 = 16 << 20;

/// Largest string (export or context name) the client will send.
pub(crate) const MAX_STRING_LEN: usize = 4096;

/// Name of the standard allocation metadata context.
pub const BASE_ALLOCATION: &str = "base:allocation";
/// Name of QEMU's allocation-depth context (`qemu-nbd -A`, `allocation-depth: true`).
pub const QEMU_ALLOCATION_DEPTH: &str = "qemu:allocation-depth";
/// Prefix of QEMU's dirty-bitmap contexts: `qemu:dirty-bitmap:<bitmap name>`.
pub const QEMU_DIRTY_BITMAP_PREFIX: &str = "qemu:dirty-bitmap:";

/// `base:allocation` flag: the extent is a hole (unallocated).
pub const STATE_HOLE: u32 = 1 << 0;
/// `base:allocation` flag: the extent reads as zeroes.
pub const STATE_ZERO: u32 = 1 << 1;
/// `qemu:dirty-bitmap:*` flag: the extent is dirty.
pub const STATE_DIRTY: u32 = 1 << 0;

/// A malformed or out-of-protocol message from the NBD server. After one of these the
/// byte stream can no longer be trusted; the connection must be dropped.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ProtocolError {
    #[error(
        "reply magic {0:#010x} is an extended-header reply, but extended headers were not negotiated"
    )]
    UnexpectedExtendedReply(u32),
    #[error("reply magic {0:#010x} is neither a simple nor a structured reply")]
    BadReplyMagic(u32),
    #[error("option reply magic {0:#018x} is wrong")]
    BadOptionReplyMagic(u64),
    #[error("option reply answers option {got} but option {expected} was sent")]
    OptionMismatch { expected: u32, got: u32 },
    #[error("option reply type {0:#x} is not valid here")]
    UnexpectedOptionReply(u32),
    #[error("{what} has a malformed {len}-byte payload")]
    BadPayload { what: &'static str, len: u64 },
    #[error("{what} payload of {len} bytes exceeds the {max}-byte limit")]
    PayloadTooLarge {
        what: &'static str,
        len: u64,
        max: u64,
    },
    #[error("{what} is not valid UTF-8")]
    NotUtf8 { what: &'static str },
    #[error("reply cookie {0:#x} matches no request in flight")]
    UnknownCookie(u64),
    #[error("structured reply chunk type {ty} is not valid in a reply to {command}")]
    UnexpectedChunk { ty: u16, command: &'static str },
    #[error("structured reply chunk arrived, but structured replies were not negotiated")]
    StructuredNotNegotiated,
    #[error("simple success reply to {command}, which must be answered with a structured reply")]
    UnexpectedSimpleReply { command: &'static str },
    #[error("NBD_REPLY_TYPE_NONE chunk without the done flag or with a payload")]
    BadNoneChunk,
    #[error(
        "content chunk {offset}+{len} lies outside the request {request_offset}+{request_len}"
    )]
    ChunkOutOfRange {
        offset: u64,
        len: u64,
        request_offset: u64,
        request_len: u64,
    },
    #[error("content chunk {offset}+{len} overlaps an earlier chunk of the same reply")]
    ChunkOverlap { offset: u64, len: u64 },
    #[error("reply marked done after {covered} of {len} requested bytes, without an error")]
    IncompleteRead { covered: u64, len: u64 },
    #[error("block status descriptor has length zero")]
    ZeroLengthExtent,
    #[error("block status for meta context {0}, which was not negotiated")]
    UnknownContext(u32),
    #[error("block status reply repeats meta context {0}")]
    DuplicateContext(u32),
    #[error("block status reply has no extents for negotiated meta context {0}")]
    MissingContext(u32),
    #[error("server acknowledged NBD_OPT_GO without sending NBD_INFO_EXPORT")]
    MissingExportInfo,
    #[error(
        "server sent NBD_INFO_BLOCK_SIZE {minimum}/{preferred}/{maximum}, which is inconsistent"
    )]
    BadBlockSize {
        minimum: u32,
        preferred: u32,
        maximum: u32,
    },
    #[error("transmission flags {0:#06x} lack NBD_FLAG_HAS_FLAGS")]
    MissingHasFlags(u16),
}

/// An NBD error value from a reply. Servers map errno onto this small set.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NbdErrno {
    Perm,
    Io,
    NoMem,
    Inval,
    NoSpc,
    Overflow,
    NotSup,
    Shutdown,
    Other(u32),
}

impl NbdErrno {
    pub fn from_wire(value: u32) -> Self {
        match value {
            1 => Self::Perm,
            5 => Self::Io,
            12 => Self::NoMem,
            22 => Self::Inval,
            28 => Self::NoSpc,
            75 => Self::Overflow,
            95 => Self::NotSup,
            108 => Self::Shutdown,
            other => Self::Other(other),
        }
    }

    pub fn to_wire(self) -> u32 {
        match self {
            Self::Perm => 1,
            Self::Io => 5,
            Self::NoMem => 12,
            Self::Inval => 22,
            Self::NoSpc => 28,
            Self::Overflow => 75,
            Self::NotSup => 95,
            Self::Shutdown => 108,
            Self::Other(v) => v,
        }
    }
}

impl fmt::Display for NbdErrno {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Perm => f.write_str("EPERM (operation not permitted)"),
            Self::Io => f.write_str("EIO (input/output error)"),
            Self::NoMem => f.write_str("ENOMEM (server out of memory)"),
            Self::Inval => f.write_str("EINVAL (invalid argument)"),
            Self::NoSpc => f.write_str("ENOSPC (no space left on device)"),
            Self::Overflow => f.write_str("EOVERFLOW (value too large)"),
            Self::NotSup => f.write_str("ENOTSUP (operation not supported)"),
            Self::Shutdown => f.write_str("ESHUTDOWN (server is shutting down)"),
            Self::Other(v) => write!(f, "error {v}"),
        }
    }
}

/// An error the server reported for one request: errno, its human message (may be
/// empty), and the offset it concerns when the server said (`NBD_REPLY_TYPE_ERROR_OFFSET`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerError {
    pub errno: NbdErrno,
    pub message: String,
    pub offset: Option<u64>,
}

impl ServerError {
    /// An error from a simple reply: errno only, no message.
    pub(crate) fn from_errno(errno: u32) -> Self {
        Self {
            errno: NbdErrno::from_wire(errno),
            message: String::new(),
            offset: None,
        }
    }
}

impl fmt::Display for ServerError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.errno)?;
        if let Some(offset) = self.offset {
            write!(f, " at offset {offset}")?;
        }
        if !self.message.is_empty() {
            write!(f, ": {}", self.message)?;
        }
        Ok(())
    }
}

/// Human name of an option, for error messages.
pub(crate) fn option_name(option: u32) -> &'static str {
    match option {
        OPT_EXPORT_NAME => "NBD_OPT_EXPORT_NAME",
        OPT_ABORT => "NBD_OPT_ABORT",
        OPT_LIST => "NBD_OPT_LIST",
        OPT_STARTTLS => "NBD_OPT_STARTTLS",
        OPT_INFO => "NBD_OPT_INFO",
        OPT_GO => "NBD_OPT_GO",
        OPT_STRUCTURED_REPLY => "NBD_OPT_STRUCTURED_REPLY",
        OPT_LIST_META_CONTEXT => "NBD_OPT_LIST_META_CONTEXT",
        OPT_SET_META_CONTEXT => "NBD_OPT_SET_META_CONTEXT",
        OPT_EXTENDED_HEADERS => "NBD_OPT_EXTENDED_HEADERS",
        _ => "unknown option",
    }
}

/// Human name of an option error reply type, for error messages.
pub(crate) fn option_error_name(reply_type: u32) -> &'static str {
    match reply_type {
        REP_ERR_UNSUP => "NBD_REP_ERR_UNSUP (option not supported)",
        REP_ERR_POLICY => "NBD_REP_ERR_POLICY (refused by server policy)",
        REP_ERR_INVALID => "NBD_REP_ERR_INVALID (invalid option)",
        REP_ERR_PLATFORM => "NBD_REP_ERR_PLATFORM (not supported on this platform)",
        REP_ERR_TLS_REQD => "NBD_REP_ERR_TLS_REQD (TLS required)",
        REP_ERR_UNKNOWN => "NBD_REP_ERR_UNKNOWN (export unknown)",
        REP_ERR_SHUTDOWN => "NBD_REP_ERR_SHUTDOWN (server shutting down)",
        REP_ERR_BLOCK_SIZE_REQD => "NBD_REP_ERR_BLOCK_SIZE_REQD (block size negotiation required)",
        REP_ERR_TOO_BIG => "NBD_REP_ERR_TOO_BIG (payload too big)",
        REP_ERR_EXT_HEADER_REQD => "NBD_REP_ERR_EXT_HEADER_REQD (extended headers required)",
        _ => "unknown option error",
    }
}

fn be16(b: &[u8]) -> u16 {
    u16::from_be_bytes([b[0], b[1]])
}

fn be32(b: &[u8]) -> u32 {
    u32::from_be_bytes([b[0], b[1], b[2], b[3]])
}

fn be64(b: &[u8]) -> u64 {
    u64::from_be_bytes([b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7]])
}

// ---- option haggling -------------------------------------------------------------------

/// Encodes one client option: `IHAVEOPT, option, length, data`.
pub(crate) fn encode_option(option: u32, data: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(16 + data.len());
    out.extend_from_slice(&IHAVEOPT.to_be_bytes());
    out.extend_from_slice(&option.to_be_bytes());
    out.extend_from_slice(&(data.len() as u32).to_be_bytes());
    out.extend_from_slice(data);
    out
}

/// Data of `NBD_OPT_GO`: the export name and no explicit info requests (the server
/// always sends `NBD_INFO_EXPORT`; QEMU also sends `NBD_INFO_BLOCK_SIZE` unasked).
pub(crate) fn encode_go_data(export_name: &str) -> Vec<u8> {
    let mut out = Vec::with_capacity(6 + export_name.len());
    out.extend_from_slice(&(export_name.len() as u32).to_be_bytes());
    out.extend_from_slice(export_name.as_bytes());
    out.extend_from_slice(&0u16.to_be_bytes());
    out
}

/// Data of `NBD_OPT_SET_META_CONTEXT`: export name, number of queries, each query.
pub(crate) fn encode_set_meta_context_data(export_name: &str, queries: &[String]) -> Vec<u8> {
    let mut out = Vec::new();
    out.extend_from_slice(&(export_name.len() as u32).to_be_bytes());
    out.extend_from_slice(export_name.as_bytes());
    out.extend_from_slice(&(queries.len() as u32).to_be_bytes());
    for q in queries {
        out.extend_from_slice(&(q.len() as u32).to_be_bytes());
        out.extend_from_slice(q.as_bytes());
    }
    out
}

/// Header of one option reply.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OptionReplyHeader {
    pub option: u32,
    pub reply_type: u32,
    pub length: u32,
}

pub fn parse_option_reply_header(
    buf: &[u8; OPTION_REPLY_HEADER_LEN],
    expected_option: u32,
) -> Result<OptionReplyHeader, ProtocolError> {
    let magic = be64(&buf[0..8]);
    if magic != OPTION_REPLY_MAGIC {
        return Err(ProtocolError::BadOptionReplyMagic(magic));
    }
    let header = OptionReplyHeader {
        option: be32(&buf[8..12]),
        reply_type: be32(&buf[12..16]),
        length: be32(&buf[16..20]),
    };
    if header.option != expected_option {
        return Err(ProtocolError::OptionMismatch {
            expected: expected_option,
            got: header.option,
        });
    }
    if header.length > MAX_METADATA_PAYLOAD {
        return Err(ProtocolError::PayloadTooLarge {
            what: "option reply",
            len: header.length.into(),
            max: MAX_METADATA_PAYLOAD.into(),
        });
    }
    Ok(header)
}

/// One `NBD_REP_INFO` payload.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Info {
    Export {
        size: u64,
        flags: u16,
    },
    BlockSize {
        minimum: u32,
        preferred: u32,
        maximum: u32,
    },
    /// Name, description, or an info type this client does not use.
    Other,
}

pub fn parse_info(payload: &[u8]) -> Result<Info, ProtocolError> {
    let bad = || ProtocolError::BadPayload {
        what: "NBD_REP_INFO",
        len: payload.len() as u64,
    };
    if payload.len() < 2 {
        return Err(bad());
    }
    match be16(payload) {
        INFO_EXPORT => {
            if payload.len() != 12 {
                return Err(bad());
            }
            Ok(Info::Export {
                size: be64(&payload[2..10]),
                flags: be16(&payload[10..12]),
            })
        }
        INFO_BLOCK_SIZE => {
            if payload.len() != 14 {
                return Err(bad());
            }
            let (minimum, preferred, maximum) = (
                be32(&payload[2..6]),
                be32(&payload[6..10]),
                be32(&payload[10..14]),
            );
            // Spec: powers of two (max need not be), min <= 64 KiB, min <= pref <= max
            // (max may be smaller than pref only in that it caps requests).
            if minimum == 0
                || !minimum.is_power_of_two()
                || preferred < minimum
                || maximum < minimum
            {
                return Err(ProtocolError::BadBlockSize {
                    minimum,
                    preferred,
                    maximum,
                });
            }
            Ok(Info::BlockSize {
                minimum,
                preferred,
                maximum,
            })
        }
        _ => Ok(Info::Other),
    }
}

/// One `NBD_REP_META_CONTEXT` payload: context id and name.
pub fn parse_meta_context(payload: &[u8]) -> Result<(u32, String), ProtocolError> {
    if payload.len() < 4 {
        return Err(ProtocolError::BadPayload {
            what: "NBD_REP_META_CONTEXT",
            len: payload.len() as u64,
        });
    }
    let id = be32(payload);
    let name = std::str::from_utf8(&payload[4..]).map_err(|_| ProtocolError::NotUtf8 {
        what: "meta context name",
    })?;
    Ok((id, name.to_owned()))
}

/// Error message carried by an option error reply (lossy: it is only for display).
pub fn option_error_message(payload: &[u8]) -> String {
    String::from_utf8_lossy(payload).into_owned()
}

// ---- transmission ----------------------------------------------------------------------

/// One request header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Request {
    pub flags: u16,
    pub command: u16,
    pub cookie: u64,
    pub offset: u64,
    pub length: u32,
}

impl Request {
    pub(crate) fn encode(&self) -> [u8; REQUEST_LEN] {
        let mut out = [0u8; REQUEST_LEN];
        out[0..4].copy_from_slice(&REQUEST_MAGIC.to_be_bytes());
        out[4..6].copy_from_slice(&self.flags.to_be_bytes());
        out[6..8].copy_from_slice(&self.command.to_be_bytes());
        out[8..16].copy_from_slice(&self.cookie.to_be_bytes());
        out[16..24].copy_from_slice(&self.offset.to_be_bytes());
        out[24..28].copy_from_slice(&self.length.to_be_bytes());
        out
    }
}

/// Header of a structured reply chunk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChunkHeader {
    pub flags: u16,
    pub ty: u16,
    pub cookie: u64,
    pub length: u32,
}

impl ChunkHeader {
    pub(crate) fn is_done(&self) -> bool {
        self.flags & REPLY_FLAG_DONE != 0
    }
}

/// A reply header: simple or structured chunk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReplyHeader {
    Simple { error: u32, cookie: u64 },
    Chunk(ChunkHeader),
}

/// Total header length (magic included) for a reply starting with `magic`.
pub fn reply_header_len(magic: u32) -> Result<usize, ProtocolError> {
    match magic {
        SIMPLE_REPLY_MAGIC => Ok(SIMPLE_REPLY_LEN),
        STRUCTURED_REPLY_MAGIC => Ok(CHUNK_HEADER_LEN),
        EXTENDED_REPLY_MAGIC => Err(ProtocolError::UnexpectedExtendedReply(magic)),
        other => Err(ProtocolError::BadReplyMagic(other)),
    }
}

/// Parses a whole reply header (magic included; length from [`reply_header_len`]).
pub fn parse_reply_header(buf: &[u8]) -> Result<ReplyHeader, ProtocolError> {
    if buf.len() < 4 {
        return Err(ProtocolError::BadPayload {
            what: "reply header",
            len: buf.len() as u64,
        });
    }
    let magic = be32(buf);
    let expected = reply_header_len(magic)?;
    if buf.len() != expected {
        return Err(ProtocolError::BadPayload {
            what: "reply header",
            len: buf.len() as u64,
        });
    }
    if magic == SIMPLE_REPLY_MAGIC {
        Ok(ReplyHeader::Simple {
            error: be32(&buf[4..8]),
            cookie: be64(&buf[8..16]),
        })
    } else {
        Ok(ReplyHeader::Chunk(ChunkHeader {
            flags: be16(&buf[4..6]),
            ty: be16(&buf[6..8]),
            cookie: be64(&buf[8..16]),
            length: be32(&buf[16..20]),
        }))
    }
}

/// `NBD_REPLY_TYPE_OFFSET_HOLE` payload: offset and nonzero hole size.
pub fn parse_hole(payload: &[u8]) -> Result<(u64, u32), ProtocolError> {
    let bad = || ProtocolError::BadPayload {
        what: "NBD_REPLY_TYPE_OFFSET_HOLE",
        len: payload.len() as u64,
    };
    if payload.len() != 12 {
        return Err(bad());
    }
    let size = be32(&payload[8..12]);
    if size == 0 {
        return Err(bad());
    }
    Ok((be64(&payload[0..8]), size))
}

/// Any error chunk (type with bit 15 set): errno, message, and for
/// `NBD_REPLY_TYPE_ERROR_OFFSET` the offset. Unknown error types keep the common prefix.
pub fn parse_error_chunk(ty: u16, payload: &[u8]) -> Result<ServerError, ProtocolError> {
    let bad = || ProtocolError::BadPayload {
        what: "error chunk",
        len: payload.len() as u64,
    };
    if payload.len() < 6 {
        return Err(bad());
    }
    let errno = be32(&payload[0..4]);
    let msg_len = usize::from(be16(&payload[4..6]));
    let rest = &payload[6..];
    if msg_len > rest.len() {
        return Err(bad());
    }
    let message = String::from_utf8_lossy(&rest[..msg_len]).into_owned();
    let tail = &rest[msg_len..];
    let offset = if ty == REPLY_TYPE_ERROR_OFFSET {
        if tail.len() != 8 {
            return Err(bad());
        }
        Some(be64(tail))
    } else {
        if ty == REPLY_TYPE_ERROR && !tail.is_empty() {
            return Err(bad());
        }
        None
    };
    // Spec: error MUST be nonzero; treat a zero as a generic I/O error rather than success.
    let errno = if errno == 0 {
        NbdErrno::Io
    } else {
        NbdErrno::from_wire(errno)
    };
    Ok(ServerError {
        errno,
        message,
        offset,
    })
}

/// `NBD_REPLY_TYPE_BLOCK_STATUS` payload: context id and `(length, flags)` descriptors,
/// none of zero length.
pub fn parse_block_status(payload: &[u8]) -> Result<(u32, Vec<(u32, u32)>), ProtocolError> {
    if payload.len() < 12 || !(payload.len() - 4).is_multiple_of(8) {
        return Err(ProtocolError::BadPayload {
            what: "NBD_REPLY_TYPE_BLOCK_STATUS",
            len: payload.len() as u64,
        });
    }
    let context = be32(payload);
    let mut descriptors = Vec::with_capacity((payload.len() - 4) / 8);
    for d in payload[4..].chunks_exact(8) {
        let length = be32(&d[0..4]);
        if length == 0 {
            return Err(ProtocolError::ZeroLengthExtent);
        }
        descriptors.push((length, be32(&d[4..8])));
    }
    Ok((context, descriptors))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn magics_spell_what_the_spec_says() {
        assert_eq!(&NBDMAGIC.to_be_bytes(), b"NBDMAGIC");
        assert_eq!(&IHAVEOPT.to_be_bytes(), b"IHAVEOPT");
    }

    #[test]
    fn request_header_layout() {
        let r = Request {
            flags: 0x0102,
            command: CMD_BLOCK_STATUS,
            cookie: 7,
            offset: 1 << 40,
            length: 512,
        };
        let b = r.encode();
        assert_eq!(&b[0..4], &[0x25, 0x60, 0x95, 0x13]);
        assert_eq!(&b[4..6], &[1, 2]);
        assert_eq!(&b[6..8], &[0, 7]);
        assert_eq!(be64(&b[8..16]), 7);
        assert_eq!(be64(&b[16..24]), 1 << 40);
        assert_eq!(be32(&b[24..28]), 512);
    }

    #[test]
    fn go_and_set_meta_context_data_layout() {
        assert_eq!(encode_go_data("ab"), vec![0, 0, 0, 2, b'a', b'b', 0, 0]);
        let d = encode_set_meta_context_data("e", &["x:y".to_owned()]);
        assert_eq!(
            d,
            vec![0, 0, 0, 1, b'e', 0, 0, 0, 1, 0, 0, 0, 3, b'x', b':', b'y']
        );
    }

    #[test]
    fn error_chunk_with_offset() {
        let mut p = vec![0, 0, 0, 5, 0, 2, b'n', b'o'];
        p.extend_from_slice(&42u64.to_be_bytes());
        let e = parse_error_chunk(REPLY_TYPE_ERROR_OFFSET, &p).unwrap();
        assert_eq!(
            e,
            ServerError {
                errno: NbdErrno::Io,
                message: "no".into(),
                offset: Some(42)
            }
        );
        // message longer than the payload
        assert!(parse_error_chunk(REPLY_TYPE_ERROR, &[0, 0, 0, 5, 0, 9, b'x']).is_err());
        // trailing junk after a plain error
        assert!(parse_error_chunk(REPLY_TYPE_ERROR, &[0, 0, 0, 5, 0, 0, 1]).is_err());
        // unknown error type: common prefix only, tail ignored
        assert!(parse_error_chunk(REPLY_TYPE_ERROR_BIT | 9, &[0, 0, 0, 22, 0, 0, 1, 2]).is_ok());
    }

    #[test]
    fn block_status_rejects_zero_length_and_ragged_payloads() {
        let mut p = 3u32.to_be_bytes().to_vec();
        p.extend_from_slice(&[0, 0, 2, 0, 0, 0, 0, 1]);
        assert_eq!(parse_block_status(&p).unwrap(), (3, vec![(512, 1)]));
        p.extend_from_slice(&[0, 0, 0, 0, 0, 0, 0, 1]);
        assert_eq!(parse_block_status(&p), Err(ProtocolError::ZeroLengthExtent));
        assert!(parse_block_status(&p[..7]).is_err());
        assert!(parse_block_status(&p[..4]).is_err());
    }

    #[test]
    fn reply_header_rejects_unknown_and_extended_magic() {
        assert_eq!(
            reply_header_len(0xdead_beef),
            Err(ProtocolError::BadReplyMagic(0xdead_beef))
        );
        assert!(matches!(
            reply_header_len(EXTENDED_REPLY_MAGIC),
            Err(ProtocolError::UnexpectedExtendedReply(_))
        ));
        let mut h = STRUCTURED_REPLY_MAGIC.to_be_bytes().to_vec();
        h.extend_from_slice(&[0, 1, 0, 5, 0, 0, 0, 0, 0, 0, 0, 9, 0, 0, 0, 12]);
        assert_eq!(
            parse_reply_header(&h).unwrap(),
            ReplyHeader::Chunk(ChunkHeader {
                flags: 1,
                ty: 5,
                cookie: 9,
                length: 12
            })
        );
    }

    proptest! {
        #[test]
        fn decoders_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..128), ty in any::<u16>()) {
            let _ = parse_reply_header(&bytes);
            let _ = parse_hole(&bytes);
            let _ = parse_error_chunk(ty, &bytes);
            let _ = parse_block_status(&bytes);
            let _ = parse_info(&bytes);
            let _ = parse_meta_context(&bytes);
            if bytes.len() >= OPTION_REPLY_HEADER_LEN {
                let mut h = [0u8; OPTION_REPLY_HEADER_LEN];
                h.copy_from_slice(&bytes[..OPTION_REPLY_HEADER_LEN]);
                let _ = parse_option_reply_header(&h, OPT_GO);
            }
        }

        #[test]
        fn block_status_descriptors_are_never_zero(bytes in proptest::collection::vec(any::<u8>(), 0..256)) {
            if let Ok((_, ds)) = parse_block_status(&bytes) {
                prop_assert!(!ds.is_empty());
                prop_assert!(ds.iter().all(|&(len, _)| len > 0));
            }
        }
    }
}

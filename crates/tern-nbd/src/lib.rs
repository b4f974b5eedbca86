//! tern's own NBD client, for live disk migration: the source agent reads a running VM's
//! disk through QEMU's NBD export and asks which blocks the guest dirtied.
//!
//! Owns the NBD protocol from the client side: the fixed newstyle handshake
//! (`NBD_OPT_STRUCTURED_REPLY`, `NBD_OPT_SET_META_CONTEXT`, `NBD_OPT_GO`), and the
//! transmission phase (`NBD_CMD_READ` with structured replies and holes, `NBD_CMD_BLOCK_STATUS`
//! for `base:allocation` and `qemu:dirty-bitmap:NAME`, `NBD_CMD_WRITE`, `NBD_CMD_FLUSH`,
//! `NBD_CMD_DISC`) over any `AsyncRead + AsyncWrite` stream (TCP or unix socket).
//! Must not: talk QMP, decide what to migrate, or hold a connection open by itself. Setting
//! up the export (bitmap, `nbd-server-start`, `block-export-add`) is the caller's job.
//!
//! ```text
//!  client                                       server (qemu-nbd / nbd-server-start)
//!                                <------------  NBDMAGIC IHAVEOPT flags(FIXED_NEWSTYLE|NO_ZEROES)
//!  client flags                  ------------>
//!  OPT_STRUCTURED_REPLY          ------------>
//!                                <------------  REP_ACK
//!  OPT_SET_META_CONTEXT(export, [base:allocation, qemu:dirty-bitmap:b0])
//!                                <------------  REP_META_CONTEXT(id, name)*  REP_ACK
//!  OPT_GO(export)                ------------>
//!                                <------------  REP_INFO(EXPORT size flags) REP_INFO(BLOCK_SIZE)  REP_ACK
//!  ---- transmission: requests carry a cookie; replies may interleave ----
//!  CMD_READ(cookie, off, len)*   ------------>  (several in flight)
//!                                <------------  OFFSET_DATA / OFFSET_HOLE / ERROR chunks, DONE
//!  CMD_BLOCK_STATUS(off, len)    ------------>
//!                                <------------  BLOCK_STATUS(ctx id, [(len, flags)]) per context, DONE
//!  CMD_DISC                      ------------>  closes
//! ```
//!
//! Modules: `wire` (constants, pure encoders/decoders, never panics), `handshake`,
//! `client` ([`NbdClient`]), `status` ([`Extent`], [`ExtentWalk`]), `error` (one enum per
//! operation).

mod client;
mod error;
mod handshake;
mod status;
mod wire;

#[cfg(test)]
mod stream_tests;

pub use client::NbdClient;
pub use error::{
    BlockStatusError, ConnectError, DisconnectError, FlushError, ReadError, WriteError,
};
pub use handshake::{
    dirty_bitmap_context, BlockSize, ConnectOptions, ExportInfo, MetaContext, MetaContextId,
    TransmissionFlags, DEFAULT_MAX_REQUEST_BYTES, DEFAULT_PIPELINE_DEPTH,
};
pub use status::{BlockStatus, Extent, ExtentWalk};
pub use wire::{
    NbdErrno, ProtocolError, ServerError, BASE_ALLOCATION, QEMU_ALLOCATION_DEPTH,
    QEMU_DIRTY_BITMAP_PREFIX, STATE_DIRTY, STATE_HOLE, STATE_ZERO,
};

/// The reply decoders of `wire` and the protocol numbers they use, for the fuzz targets in
/// `crates/tern-fuzz`. Not an API: no stability promise.
#[doc(hidden)]
pub mod fuzzing {
    pub use crate::wire::{
        option_error_message, parse_block_status, parse_error_chunk, parse_hole, parse_info,
        parse_meta_context, parse_option_reply_header, parse_reply_header, reply_header_len,
        ChunkHeader, Info, OptionReplyHeader, ReplyHeader, CHUNK_HEADER_LEN, INFO_BLOCK_SIZE,
        INFO_EXPORT, MAX_METADATA_PAYLOAD, OPTION_REPLY_HEADER_LEN, OPTION_REPLY_MAGIC, OPT_GO,
        REPLY_FLAG_DONE, REPLY_TYPE_BLOCK_STATUS, REPLY_TYPE_ERROR, REPLY_TYPE_ERROR_BIT,
        REPLY_TYPE_ERROR_OFFSET, REPLY_TYPE_NONE, REPLY_TYPE_OFFSET_DATA, REPLY_TYPE_OFFSET_HOLE,
        REP_ACK, REP_FLAG_ERROR, REP_INFO, REP_META_CONTEXT, SIMPLE_REPLY_LEN, SIMPLE_REPLY_MAGIC,
        STRUCTURED_REPLY_MAGIC,
    };
}

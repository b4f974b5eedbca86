//! One error enum per operation: connecting (handshake), read, block status, write, flush,
//! disconnect. Display text says what went wrong and what to do; it does not repeat its
//! `#[source]`. Server-reported errors carry the server's own message.

use std::io;

use crate::wire::{ProtocolError, ServerError};

/// Connecting to an NBD server and negotiating an export (fixed newstyle handshake).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConnectError {
    #[error("could not connect to the NBD server at {addr}; is the server (qemu-nbd or nbd-server-start) running and listening there?")]
    Connect {
        addr: String,
        #[source]
        source: io::Error,
    },
    #[error("I/O error during the NBD handshake (the server may have dropped us: qemu-nbd's --shared limit, --handshake-limit timeout, or it exited)")]
    Io(#[source] io::Error),
    #[error("the peer is not an NBD server: it opened with {0:#018x}, not NBDMAGIC; check the address or socket path")]
    NotNbd(u64),
    #[error("the NBD server uses oldstyle negotiation, which tern does not support; export the disk with qemu-nbd or QEMU's nbd-server-start")]
    Oldstyle,
    #[error("the NBD server does not offer fixed newstyle negotiation, which tern requires; use qemu-nbd or QEMU's nbd-server-start")]
    NoFixedNewstyle,
    #[error("the NBD server has no export {name:?}: {message}; check the export name (qemu-nbd -x NAME, block-export-add \"name\")")]
    ExportNotFound { name: String, message: String },
    #[error("the NBD server requires TLS, which tern's NBD client does not speak: {message}; export without --tls-creds / tls-creds")]
    TlsRequired { message: String },
    #[error("the NBD server does not support structured replies, which block status needs (requested meta contexts: {contexts:?}); use QEMU >= 2.11")]
    StructuredRepliesUnsupported { contexts: Vec<String> },
    #[error("the NBD server does not offer meta context {name:?} on export {export:?}; for qemu:dirty-bitmap:NAME export with qemu-nbd -B NAME or block-export-add \"bitmaps\": [\"NAME\"], for qemu:allocation-depth with -A / \"allocation-depth\": true")]
    MetaContextNotFound { name: String, export: String },
    #[error("the NBD server does not support NBD_OPT_GO; tern needs QEMU >= 2.10 or another server with the INFO extension")]
    GoUnsupported,
    #[error("the NBD server refused {option} with {code}: {message}")]
    OptionRefused {
        option: &'static str,
        code: &'static str,
        reply_type: u32,
        message: String,
    },
    #[error("{what} is {len} bytes; NBD strings are at most 4096 bytes")]
    NameTooLong { what: &'static str, len: usize },
    #[error("the NBD server sent a malformed handshake reply")]
    Protocol(#[source] ProtocolError),
}

/// Reading a byte range of the export (`NBD_CMD_READ`).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ReadError {
    #[error(
        "read of {len} bytes at offset {offset} reaches past the end of the {size}-byte export"
    )]
    OutOfBounds { offset: u64, len: u64, size: u64 },
    #[error("the NBD server failed the read of {len} bytes at offset {offset}: {error}")]
    Server {
        offset: u64,
        len: u64,
        error: ServerError,
    },
    #[error(
        "I/O error on the NBD connection during a read; the connection is unusable, reconnect"
    )]
    Io(#[source] io::Error),
    #[error(
        "the NBD server sent a malformed reply to a read; the connection is unusable, reconnect"
    )]
    Protocol(#[source] ProtocolError),
    #[error(
        "the NBD connection is unusable after an earlier failure or a cancelled request; reconnect"
    )]
    Broken,
}

/// Querying metadata contexts (`NBD_CMD_BLOCK_STATUS`).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum BlockStatusError {
    #[error("no meta contexts were negotiated; ask for them in ConnectOptions (with_dirty_bitmap, with_base_allocation)")]
    NoMetaContexts,
    #[error("meta context id {0} was not negotiated on this connection")]
    UnknownContext(u32),
    #[error("block status of {len} bytes at offset {offset} reaches past the end of the {size}-byte export")]
    OutOfBounds { offset: u64, len: u64, size: u64 },
    #[error("the NBD server failed block status for {len} bytes at offset {offset}: {error}")]
    Server {
        offset: u64,
        len: u64,
        error: ServerError,
    },
    #[error("I/O error on the NBD connection during block status; the connection is unusable, reconnect")]
    Io(#[source] io::Error),
    #[error("the NBD server sent a malformed reply to block status; the connection is unusable, reconnect")]
    Protocol(#[source] ProtocolError),
    #[error(
        "the NBD connection is unusable after an earlier failure or a cancelled request; reconnect"
    )]
    Broken,
}

/// Writing a byte range of the export (`NBD_CMD_WRITE`).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum WriteError {
    #[error("the NBD export is read-only; export it writable (qemu-nbd without -r, block-export-add \"writable\": true)")]
    ReadOnly,
    #[error(
        "write of {len} bytes at offset {offset} reaches past the end of the {size}-byte export"
    )]
    OutOfBounds { offset: u64, len: u64, size: u64 },
    #[error("the NBD server failed the write of {len} bytes at offset {offset}: {error}")]
    Server {
        offset: u64,
        len: u64,
        error: ServerError,
    },
    #[error(
        "I/O error on the NBD connection during a write; the connection is unusable, reconnect"
    )]
    Io(#[source] io::Error),
    #[error(
        "the NBD server sent a malformed reply to a write; the connection is unusable, reconnect"
    )]
    Protocol(#[source] ProtocolError),
    #[error(
        "the NBD connection is unusable after an earlier failure or a cancelled request; reconnect"
    )]
    Broken,
}

/// Flushing written data to stable storage (`NBD_CMD_FLUSH`).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum FlushError {
    #[error("the NBD export does not advertise NBD_FLAG_SEND_FLUSH, so it cannot be flushed")]
    Unsupported,
    #[error("the NBD server failed the flush: {0}")]
    Server(ServerError),
    #[error(
        "I/O error on the NBD connection during a flush; the connection is unusable, reconnect"
    )]
    Io(#[source] io::Error),
    #[error(
        "the NBD server sent a malformed reply to a flush; the connection is unusable, reconnect"
    )]
    Protocol(#[source] ProtocolError),
    #[error(
        "the NBD connection is unusable after an earlier failure or a cancelled request; reconnect"
    )]
    Broken,
}

/// Ending the session (`NBD_CMD_DISC`).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DisconnectError {
    #[error("I/O error while sending NBD_CMD_DISC; the server will see a hard disconnect")]
    Io(#[source] io::Error),
}

/// Internal outcome of one transmission exchange, mapped by each operation to its own
/// error type. `Server` leaves the connection usable; the others do not.
#[derive(Debug)]
pub(crate) enum Failure {
    Server(ServerError),
    Io(io::Error),
    Protocol(ProtocolError),
}

impl From<io::Error> for Failure {
    fn from(e: io::Error) -> Self {
        Self::Io(e)
    }
}

impl From<ProtocolError> for Failure {
    fn from(e: ProtocolError) -> Self {
        Self::Protocol(e)
    }
}

impl Failure {
    pub(crate) fn simple(errno: u32) -> Self {
        Self::Server(ServerError::from_errno(errno))
    }
}

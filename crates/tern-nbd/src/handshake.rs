//! Fixed newstyle handshake: what the client asks for ([`ConnectOptions`]), what the
//! server granted ([`ExportInfo`]), and the option haggling between them
//! (`NBD_OPT_STRUCTURED_REPLY`, `NBD_OPT_SET_META_CONTEXT`, `NBD_OPT_GO`). Owns nothing
//! after the handshake: the stream is handed to the client in transmission phase.

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use crate::error::ConnectError;
use crate::wire::{self, Info, OptionReplyHeader, ProtocolError};

/// Default cap on one read or write request: the spec says clients should not exceed
/// 32 MiB unless the server advertised more, and QEMU's maximum is exactly 32 MiB.
pub const DEFAULT_MAX_REQUEST_BYTES: u32 = 32 << 20;
/// Default number of read requests kept in flight by [`crate::NbdClient::read_into`].
pub const DEFAULT_PIPELINE_DEPTH: usize = 4;

/// What to negotiate: export name, meta contexts, request sizing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConnectOptions {
    export_name: String,
    meta_contexts: Vec<String>,
    max_request_bytes: u32,
    pipeline_depth: usize,
}

impl ConnectOptions {
    /// Options for export `export_name` (`""` is qemu-nbd's default export).
    pub fn new(export_name: impl Into<String>) -> Self {
        Self {
            export_name: export_name.into(),
            meta_contexts: Vec::new(),
            max_request_bytes: DEFAULT_MAX_REQUEST_BYTES,
            pipeline_depth: DEFAULT_PIPELINE_DEPTH,
        }
    }

    /// Asks for a meta context by its full name (e.g. `qemu:allocation-depth`).
    pub fn with_meta_context(mut self, name: impl Into<String>) -> Self {
        let name = name.into();
        if !self.meta_contexts.contains(&name) {
            self.meta_contexts.push(name);
        }
        self
    }

    /// Asks for QEMU's `qemu:dirty-bitmap:<bitmap>` context.
    pub fn with_dirty_bitmap(self, bitmap: &str) -> Self {
        self.with_meta_context(dirty_bitmap_context(bitmap))
    }

    /// Asks for the standard `base:allocation` context (holes and zeroes).
    pub fn with_base_allocation(self) -> Self {
        self.with_meta_context(wire::BASE_ALLOCATION)
    }

    /// Caps one read/write request (further capped by the server's maximum block size).
    /// Clamped to at least 512 bytes.
    pub fn with_max_request_bytes(mut self, bytes: u32) -> Self {
        self.max_request_bytes = bytes.max(512);
        self
    }

    /// How many read requests to keep in flight (at least 1).
    pub fn with_pipeline_depth(mut self, depth: usize) -> Self {
        self.pipeline_depth = depth.max(1);
        self
    }

    pub fn export_name(&self) -> &str {
        &self.export_name
    }

    pub fn meta_contexts(&self) -> &[String] {
        &self.meta_contexts
    }

    pub(crate) fn max_request_bytes(&self) -> u32 {
        self.max_request_bytes
    }

    pub(crate) fn pipeline_depth(&self) -> usize {
        self.pipeline_depth
    }
}

/// Full context name for a QEMU dirty bitmap: `qemu:dirty-bitmap:<bitmap>`.
pub fn dirty_bitmap_context(bitmap: &str) -> String {
    format!("{}{bitmap}", wire::QEMU_DIRTY_BITMAP_PREFIX)
}

/// Id the server assigned to a negotiated meta context, used in block status replies.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct MetaContextId(pub u32);

/// A negotiated meta context.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MetaContext {
    pub name: String,
    pub id: MetaContextId,
}

/// Transmission flags of the export (`NBD_FLAG_*`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TransmissionFlags(pub u16);

impl TransmissionFlags {
    pub fn read_only(self) -> bool {
        self.0 & (1 << 1) != 0
    }
    pub fn can_flush(self) -> bool {
        self.0 & (1 << 2) != 0
    }
    pub fn can_fua(self) -> bool {
        self.0 & (1 << 3) != 0
    }
    pub fn can_trim(self) -> bool {
        self.0 & (1 << 5) != 0
    }
    pub fn can_write_zeroes(self) -> bool {
        self.0 & (1 << 6) != 0
    }
    pub fn can_multi_conn(self) -> bool {
        self.0 & (1 << 8) != 0
    }
}

/// Block size constraints from `NBD_INFO_BLOCK_SIZE`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BlockSize {
    pub minimum: u32,
    pub preferred: u32,
    pub maximum: u32,
}

/// What the server granted for the export.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExportInfo {
    pub name: String,
    pub size: u64,
    pub flags: TransmissionFlags,
    pub block_size: Option<BlockSize>,
    pub structured_replies: bool,
    pub meta_contexts: Vec<MetaContext>,
}

impl ExportInfo {
    /// Id of a negotiated meta context by full name.
    pub fn meta_context_id(&self, name: &str) -> Option<MetaContextId> {
        self.meta_contexts
            .iter()
            .find(|c| c.name == name)
            .map(|c| c.id)
    }
}

/// Runs the handshake on `stream`; on success the stream is in transmission phase.
pub(crate) async fn handshake<S>(
    stream: &mut S,
    opts: &ConnectOptions,
) -> Result<ExportInfo, ConnectError>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    check_len("export name", &opts.export_name)?;
    for c in &opts.meta_contexts {
        check_len("meta context name", c)?;
    }

    let magic = stream.read_u64().await.map_err(ConnectError::Io)?;
    if magic != wire::NBDMAGIC {
        return Err(ConnectError::NotNbd(magic));
    }
    match stream.read_u64().await.map_err(ConnectError::Io)? {
        wire::IHAVEOPT => {}
        wire::CLISERV_MAGIC => return Err(ConnectError::Oldstyle),
        other => return Err(ConnectError::NotNbd(other)),
    }
    let server_flags = stream.read_u16().await.map_err(ConnectError::Io)?;
    if server_flags & wire::FLAG_FIXED_NEWSTYLE == 0 {
        return Err(ConnectError::NoFixedNewstyle);
    }
    let mut client_flags = wire::FLAG_C_FIXED_NEWSTYLE;
    if server_flags & wire::FLAG_NO_ZEROES != 0 {
        client_flags |= wire::FLAG_C_NO_ZEROES;
    }
    stream
        .write_all(&client_flags.to_be_bytes())
        .await
        .map_err(ConnectError::Io)?;

    // Structured replies: needed for block status and for sparse, error-safe reads.
    send_option(stream, wire::OPT_STRUCTURED_REPLY, &[]).await?;
    let (header, payload) = recv_option_reply(stream, wire::OPT_STRUCTURED_REPLY).await?;
    let structured_replies = match header.reply_type {
        wire::REP_ACK => true,
        wire::REP_ERR_UNSUP => false,
        _ => return Err(refused(opts, &header, &payload)),
    };

    let mut meta_contexts = Vec::new();
    if !opts.meta_contexts.is_empty() {
        if !structured_replies {
            return Err(ConnectError::StructuredRepliesUnsupported {
                contexts: opts.meta_contexts.clone(),
            });
        }
        let data = wire::encode_set_meta_context_data(&opts.export_name, &opts.meta_contexts);
        send_option(stream, wire::OPT_SET_META_CONTEXT, &data).await?;
        loop {
            let (header, payload) = recv_option_reply(stream, wire::OPT_SET_META_CONTEXT).await?;
            match header.reply_type {
                wire::REP_META_CONTEXT => {
                    let (id, name) =
                        wire::parse_meta_context(&payload).map_err(ConnectError::Protocol)?;
                    meta_contexts.push(MetaContext {
                        name,
                        id: MetaContextId(id),
                    });
                }
                wire::REP_ACK => break,
                _ => return Err(refused(opts, &header, &payload)),
            }
        }
        for wanted in &opts.meta_contexts {
            if !meta_contexts.iter().any(|c| &c.name == wanted) {
                return Err(ConnectError::MetaContextNotFound {
                    name: wanted.clone(),
                    export: opts.export_name.clone(),
                });
            }
        }
    }

    send_option(
        stream,
        wire::OPT_GO,
        &wire::encode_go_data(&opts.export_name),
    )
    .await?;
    let mut export = None;
    let mut block_size = None;
    loop {
        let (header, payload) = recv_option_reply(stream, wire::OPT_GO).await?;
        match header.reply_type {
            wire::REP_INFO => match wire::parse_info(&payload).map_err(ConnectError::Protocol)? {
                Info::Export { size, flags } => export = Some((size, flags)),
                Info::BlockSize {
                    minimum,
                    preferred,
                    maximum,
                } => {
                    block_size = Some(BlockSize {
                        minimum,
                        preferred,
                        maximum,
                    })
                }
                Info::Other => {}
            },
            wire::REP_ACK => break,
            wire::REP_ERR_UNSUP => return Err(ConnectError::GoUnsupported),
            _ => return Err(refused(opts, &header, &payload)),
        }
    }
    let (size, flags) = export.ok_or(ConnectError::Protocol(ProtocolError::MissingExportInfo))?;
    if flags & 1 == 0 {
        return Err(ConnectError::Protocol(ProtocolError::MissingHasFlags(
            flags,
        )));
    }
    Ok(ExportInfo {
        name: opts.export_name.clone(),
        size,
        flags: TransmissionFlags(flags),
        block_size,
        structured_replies,
        meta_contexts,
    })
}

fn check_len(what: &'static str, s: &str) -> Result<(), ConnectError> {
    if s.len() > wire::MAX_STRING_LEN {
        return Err(ConnectError::NameTooLong { what, len: s.len() });
    }
    Ok(())
}

async fn send_option<S>(stream: &mut S, option: u32, data: &[u8]) -> Result<(), ConnectError>
where
    S: AsyncWrite + Unpin,
{
    stream
        .write_all(&wire::encode_option(option, data))
        .await
        .map_err(ConnectError::Io)?;
    stream.flush().await.map_err(ConnectError::Io)
}

async fn recv_option_reply<S>(
    stream: &mut S,
    option: u32,
) -> Result<(OptionReplyHeader, Vec<u8>), ConnectError>
where
    S: AsyncRead + Unpin,
{
    let mut buf = [0u8; wire::OPTION_REPLY_HEADER_LEN];
    stream
        .read_exact(&mut buf)
        .await
        .map_err(ConnectError::Io)?;
    let header = wire::parse_option_reply_header(&buf, option).map_err(ConnectError::Protocol)?;
    let mut payload = vec![0u8; header.length as usize];
    stream
        .read_exact(&mut payload)
        .await
        .map_err(ConnectError::Io)?;
    Ok((header, payload))
}

/// Maps an option reply that is neither the expected success nor handled specially.
fn refused(opts: &ConnectOptions, header: &OptionReplyHeader, payload: &[u8]) -> ConnectError {
    let message = wire::option_error_message(payload);
    match header.reply_type {
        wire::REP_ERR_UNKNOWN => ConnectError::ExportNotFound {
            name: opts.export_name.clone(),
            message,
        },
        wire::REP_ERR_TLS_REQD => ConnectError::TlsRequired { message },
        t if t & wire::REP_FLAG_ERROR != 0 => ConnectError::OptionRefused {
            option: wire::option_name(header.option),
            code: wire::option_error_name(t),
            reply_type: t,
            message,
        },
        t => ConnectError::Protocol(ProtocolError::UnexpectedOptionReply(t)),
    }
}

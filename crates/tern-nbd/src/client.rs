//! The NBD client in transmission phase: owns the stream, the negotiated [`ExportInfo`]
//! and the cookie counter; sends requests and reassembles replies. Reads are split at the
//! request cap and pipelined; block status, writes and flushes are one request at a time.
//!
//! Cancellation: every operation marks the connection busy before its first byte and clears
//! the mark only when the stream is back at a message boundary, so a dropped future (e.g.
//! by `tokio::time::timeout`) or an I/O / protocol failure leaves the client `Broken`
//! instead of silently desynchronised. Server-reported errors leave it usable.

use std::collections::BTreeMap;
use std::ops::Range;
use std::path::Path;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufStream};
use tokio::net::{TcpStream, ToSocketAddrs, UnixStream};

use crate::error::{
    BlockStatusError, ConnectError, DisconnectError, Failure, FlushError, ReadError, WriteError,
};
use crate::handshake::{self, ConnectOptions, ExportInfo, MetaContextId};
use crate::status::{BlockStatus, Extent, ExtentWalk};
use crate::wire::{self, ProtocolError, ReplyHeader, Request, ServerError};

/// Size of the read and write buffers around the stream.
const STREAM_BUFFER_BYTES: usize = 64 << 10;

/// Largest length of one block status request: 4 GiB minus 4 KiB, so it stays aligned.
pub(crate) const MAX_STATUS_REQUEST: u64 = (u32::MAX as u64) & !0xfff;

/// An NBD connection in transmission phase, over any byte stream (TCP, unix socket, or an
/// in-memory pipe in tests).
#[derive(Debug)]
pub struct NbdClient<S> {
    stream: BufStream<S>,
    info: ExportInfo,
    next_cookie: u64,
    /// Set while a request is in progress and left set after I/O or protocol failure.
    broken: bool,
    max_request: u32,
    pipeline_depth: usize,
}

impl NbdClient<UnixStream> {
    /// Connects to a unix socket (`qemu-nbd -k PATH`, `nbd-server-start` with
    /// `{"type": "unix", "path": PATH}`) and negotiates the export.
    pub async fn connect_unix(
        path: impl AsRef<Path>,
        opts: &ConnectOptions,
    ) -> Result<Self, ConnectError> {
        let path = path.as_ref();
        let stream = UnixStream::connect(path)
            .await
            .map_err(|source| ConnectError::Connect {
                addr: path.display().to_string(),
                source,
            })?;
        Self::handshake(stream, opts).await
    }
}

impl NbdClient<TcpStream> {
    /// Connects over TCP (`qemu-nbd -b HOST -p PORT`, `nbd-server-start` with
    /// `{"type": "inet", ...}`), disables Nagle, and negotiates the export.
    pub async fn connect_tcp<A>(addr: A, opts: &ConnectOptions) -> Result<Self, ConnectError>
    where
        A: ToSocketAddrs + std::fmt::Display,
    {
        let name = addr.to_string();
        let stream = TcpStream::connect(addr)
            .await
            .map_err(|source| ConnectError::Connect {
                addr: name.clone(),
                source,
            })?;
        stream
            .set_nodelay(true)
            .map_err(|source| ConnectError::Connect { addr: name, source })?;
        Self::handshake(stream, opts).await
    }
}

impl<S> NbdClient<S>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    /// Runs the fixed newstyle handshake on an already connected stream.
    pub async fn handshake(stream: S, opts: &ConnectOptions) -> Result<Self, ConnectError> {
        let mut stream = BufStream::with_capacity(STREAM_BUFFER_BYTES, STREAM_BUFFER_BYTES, stream);
        let info = handshake::handshake(&mut stream, opts).await?;
        let mut max_request = opts.max_request_bytes();
        if let Some(bs) = info.block_size {
            max_request = max_request.min(bs.maximum);
            // Keep whole requests aligned to the server's minimum block size.
            if bs.minimum > 1 && max_request >= bs.minimum {
                max_request -= max_request % bs.minimum;
            }
        }
        Ok(Self {
            stream,
            info,
            next_cookie: 1,
            broken: false,
            max_request: max_request.max(1),
            pipeline_depth: opts.pipeline_depth(),
        })
    }

    /// What the server granted: size, flags, block sizes, meta context ids.
    pub fn info(&self) -> &ExportInfo {
        &self.info
    }

    /// Export size in bytes.
    pub fn size(&self) -> u64 {
        self.info.size
    }

    /// Id of a negotiated meta context by full name (e.g. `qemu:dirty-bitmap:b0`).
    pub fn meta_context_id(&self, name: &str) -> Option<MetaContextId> {
        self.info.meta_context_id(name)
    }

    /// Largest read or write request this client sends.
    pub fn max_request_bytes(&self) -> u32 {
        self.max_request
    }

    /// False once an I/O or protocol failure (or a cancelled request) made the stream
    /// unusable; every further request then fails with `Broken`.
    pub fn is_usable(&self) -> bool {
        !self.broken
    }

    /// Reads `buf.len()` bytes at `offset` into `buf`. Splits the range into requests of at
    /// most [`Self::max_request_bytes`] and keeps several in flight; holes are zero-filled.
    pub async fn read_into(&mut self, buf: &mut [u8], offset: u64) -> Result<(), ReadError> {
        let len = buf.len() as u64;
        if offset
            .checked_add(len)
            .is_none_or(|end| end > self.info.size)
        {
            return Err(ReadError::OutOfBounds {
                offset,
                len,
                size: self.info.size,
            });
        }
        if buf.is_empty() {
            return Ok(());
        }
        if !self.begin() {
            return Err(ReadError::Broken);
        }
        let r = self.read_inner(buf, offset).await;
        self.finish(&r);
        r.map_err(|f| match f {
            Failure::Server(error) => ReadError::Server { offset, len, error },
            Failure::Io(e) => ReadError::Io(e),
            Failure::Protocol(e) => ReadError::Protocol(e),
        })
    }

    /// Reads `len` bytes at `offset` into a new vector.
    pub async fn read(&mut self, offset: u64, len: usize) -> Result<Vec<u8>, ReadError> {
        if offset
            .checked_add(len as u64)
            .is_none_or(|end| end > self.info.size)
        {
            return Err(ReadError::OutOfBounds {
                offset,
                len: len as u64,
                size: self.info.size,
            });
        }
        let mut buf = vec![0u8; len];
        self.read_into(&mut buf, offset).await?;
        Ok(buf)
    }

    /// One `NBD_CMD_BLOCK_STATUS` request for `length` bytes at `offset`. The server may
    /// describe less than asked (each context's extents then end early); extents reaching
    /// past the request are truncated to it. Use [`ExtentWalk`] to cover a whole range.
    pub async fn block_status(
        &mut self,
        offset: u64,
        length: u32,
    ) -> Result<BlockStatus, BlockStatusError> {
        if self.info.meta_contexts.is_empty() {
            return Err(BlockStatusError::NoMetaContexts);
        }
        let len = u64::from(length);
        if length == 0
            || offset
                .checked_add(len)
                .is_none_or(|end| end > self.info.size)
        {
            return Err(BlockStatusError::OutOfBounds {
                offset,
                len,
                size: self.info.size,
            });
        }
        if !self.begin() {
            return Err(BlockStatusError::Broken);
        }
        let r = self.block_status_inner(offset, length).await;
        self.finish(&r);
        r.map_err(|f| match f {
            Failure::Server(error) => BlockStatusError::Server { offset, len, error },
            Failure::Io(e) => BlockStatusError::Io(e),
            Failure::Protocol(e) => BlockStatusError::Protocol(e),
        })
    }

    /// All extents of `context` over `range`, adjacent extents with equal flags merged.
    /// For a huge disk with a fragmented bitmap prefer [`ExtentWalk`], which is lazy.
    pub async fn extents(
        &mut self,
        context: MetaContextId,
        range: Range<u64>,
    ) -> Result<Vec<Extent>, BlockStatusError> {
        let mut walk = ExtentWalk::new(context, range);
        let mut out: Vec<Extent> = Vec::new();
        while let Some(e) = walk.next(self).await? {
            match out.last_mut() {
                Some(last) if last.end() == e.offset && last.flags == e.flags => {
                    last.length += e.length
                }
                _ => out.push(e),
            }
        }
        Ok(out)
    }

    /// Byte ranges within `range` that the dirty-bitmap context `bitmap` marks dirty,
    /// merged and in order (granularity is the bitmap's, e.g. 64 KiB).
    pub async fn dirty_ranges(
        &mut self,
        bitmap: MetaContextId,
        range: Range<u64>,
    ) -> Result<Vec<Range<u64>>, BlockStatusError> {
        let mut walk = ExtentWalk::new(bitmap, range);
        let mut out = Vec::new();
        while let Some(r) = walk.next_dirty(self).await? {
            out.push(r);
        }
        Ok(out)
    }

    /// Writes `data` at `offset`, split at the request cap, one request at a time.
    pub async fn write(&mut self, data: &[u8], offset: u64) -> Result<(), WriteError> {
        let len = data.len() as u64;
        if self.info.flags.read_only() {
            return Err(WriteError::ReadOnly);
        }
        if offset
            .checked_add(len)
            .is_none_or(|end| end > self.info.size)
        {
            return Err(WriteError::OutOfBounds {
                offset,
                len,
                size: self.info.size,
            });
        }
        if data.is_empty() {
            return Ok(());
        }
        if !self.begin() {
            return Err(WriteError::Broken);
        }
        let r = self.write_inner(data, offset).await;
        self.finish(&r);
        r.map_err(|f| match f {
            Failure::Server(error) => WriteError::Server { offset, len, error },
            Failure::Io(e) => WriteError::Io(e),
            Failure::Protocol(e) => WriteError::Protocol(e),
        })
    }

    /// Asks the server to persist every write it has acknowledged (`NBD_CMD_FLUSH`).
    pub async fn flush(&mut self) -> Result<(), FlushError> {
        if !self.info.flags.can_flush() {
            return Err(FlushError::Unsupported);
        }
        if !self.begin() {
            return Err(FlushError::Broken);
        }
        let r = self.command_inner(wire::CMD_FLUSH, "NBD_CMD_FLUSH").await;
        self.finish(&r);
        r.map_err(|f| match f {
            Failure::Server(e) => FlushError::Server(e),
            Failure::Io(e) => FlushError::Io(e),
            Failure::Protocol(e) => FlushError::Protocol(e),
        })
    }

    /// Ends the session cleanly: `NBD_CMD_DISC` (unless the stream is already broken),
    /// then shuts down the write side. Dropping the client instead is a hard disconnect.
    pub async fn disconnect(mut self) -> Result<(), DisconnectError> {
        if !self.broken {
            let req = Request {
                flags: 0,
                command: wire::CMD_DISC,
                cookie: self.cookie(),
                offset: 0,
                length: 0,
            };
            self.stream
                .write_all(&req.encode())
                .await
                .map_err(DisconnectError::Io)?;
        }
        self.stream.flush().await.map_err(DisconnectError::Io)?;
        self.stream.shutdown().await.map_err(DisconnectError::Io)
    }

    // ---- internals ---------------------------------------------------------------------

    fn begin(&mut self) -> bool {
        if self.broken {
            return false;
        }
        self.broken = true;
        true
    }

    fn finish<T>(&mut self, r: &Result<T, Failure>) {
        if matches!(r, Ok(_) | Err(Failure::Server(_))) {
            self.broken = false;
        }
    }

    fn cookie(&mut self) -> u64 {
        let c = self.next_cookie;
        self.next_cookie = self.next_cookie.wrapping_add(1);
        c
    }

    async fn send(&mut self, req: &Request) -> Result<(), Failure> {
        self.stream.write_all(&req.encode()).await?;
        Ok(())
    }

    async fn recv_header(&mut self) -> Result<ReplyHeader, Failure> {
        let mut buf = [0u8; wire::CHUNK_HEADER_LEN];
        self.stream.read_exact(&mut buf[..4]).await?;
        let magic = u32::from_be_bytes([buf[0], buf[1], buf[2], buf[3]]);
        let len = wire::reply_header_len(magic)?;
        self.stream.read_exact(&mut buf[4..len]).await?;
        let header = wire::parse_reply_header(&buf[..len])?;
        if matches!(header, ReplyHeader::Chunk(_)) && !self.info.structured_replies {
            return Err(ProtocolError::StructuredNotNegotiated.into());
        }
        Ok(header)
    }

    async fn recv_payload(&mut self, what: &'static str, len: u32) -> Result<Vec<u8>, Failure> {
        if len > wire::MAX_METADATA_PAYLOAD {
            return Err(ProtocolError::PayloadTooLarge {
                what,
                len: len.into(),
                max: wire::MAX_METADATA_PAYLOAD.into(),
            }
            .into());
        }
        let mut payload = vec![0u8; len as usize];
        self.stream.read_exact(&mut payload).await?;
        Ok(payload)
    }

    async fn read_inner(&mut self, buf: &mut [u8], offset: u64) -> Result<(), Failure> {
        let max = self.max_request as usize;
        let mut next = 0usize;
        let mut slots: Vec<ReadSlot> = Vec::with_capacity(self.pipeline_depth);
        let mut first_error: Option<ServerError> = None;
        loop {
            let mut sent = false;
            while slots.len() < self.pipeline_depth && next < buf.len() && first_error.is_none() {
                let n = max.min(buf.len() - next);
                let cookie = self.cookie();
                let piece_offset = offset + next as u64;
                let req = Request {
                    flags: 0,
                    command: wire::CMD_READ,
                    cookie,
                    offset: piece_offset,
                    length: n as u32,
                };
                self.send(&req).await?;
                slots.push(ReadSlot::new(cookie, next, piece_offset, n as u32));
                next += n;
                sent = true;
            }
            if sent {
                self.stream.flush().await?;
            }
            if slots.is_empty() {
                break;
            }
            if let Some(i) = self.recv_read_message(buf, &mut slots).await? {
                let slot = slots.swap_remove(i);
                match slot.error {
                    Some(e) => {
                        first_error.get_or_insert(e);
                    }
                    None if slot.covered != u64::from(slot.len) => {
                        return Err(ProtocolError::IncompleteRead {
                            covered: slot.covered,
                            len: slot.len.into(),
                        }
                        .into())
                    }
                    None => {}
                }
            }
        }
        match first_error {
            Some(e) => Err(Failure::Server(e)),
            None => Ok(()),
        }
    }

    /// Handles one reply message for a read; returns the index of the slot it completed.
    async fn recv_read_message(
        &mut self,
        buf: &mut [u8],
        slots: &mut [ReadSlot],
    ) -> Result<Option<usize>, Failure> {
        let find = |slots: &[ReadSlot], cookie: u64| {
            slots
                .iter()
                .position(|s| s.cookie == cookie)
                .ok_or(ProtocolError::UnknownCookie(cookie))
        };
        match self.recv_header().await? {
            ReplyHeader::Simple { error, cookie } => {
                let i = find(slots, cookie)?;
                let slot = &mut slots[i];
                if error != 0 {
                    slot.error.get_or_insert(ServerError::from_errno(error));
                } else if self.info.structured_replies {
                    return Err(ProtocolError::UnexpectedSimpleReply {
                        command: "NBD_CMD_READ",
                    }
                    .into());
                } else {
                    let range = slot.buf_start..slot.buf_start + slot.len as usize;
                    self.stream.read_exact(&mut buf[range]).await?;
                    slot.covered = slot.len.into();
                }
                Ok(Some(i))
            }
            ReplyHeader::Chunk(h) => {
                let i = find(slots, h.cookie)?;
                let slot = &mut slots[i];
                match h.ty {
                    wire::REPLY_TYPE_OFFSET_DATA => {
                        if h.length < 9 {
                            return Err(ProtocolError::BadPayload {
                                what: "NBD_REPLY_TYPE_OFFSET_DATA",
                                len: h.length.into(),
                            }
                            .into());
                        }
                        let chunk_offset = self.stream.read_u64().await?;
                        let data_len = u64::from(h.length - 8);
                        let start = slot.buf_start + slot.claim(chunk_offset, data_len)?;
                        self.stream
                            .read_exact(&mut buf[start..start + data_len as usize])
                            .await?;
                    }
                    wire::REPLY_TYPE_OFFSET_HOLE => {
                        if h.length != 12 {
                            return Err(ProtocolError::BadPayload {
                                what: "NBD_REPLY_TYPE_OFFSET_HOLE",
                                len: h.length.into(),
                            }
                            .into());
                        }
                        let mut p = [0u8; 12];
                        self.stream.read_exact(&mut p).await?;
                        let (hole_offset, size) = wire::parse_hole(&p)?;
                        let start = slot.buf_start + slot.claim(hole_offset, size.into())?;
                        buf[start..start + size as usize].fill(0);
                    }
                    wire::REPLY_TYPE_NONE => {
                        if h.length != 0 || !h.is_done() {
                            return Err(ProtocolError::BadNoneChunk.into());
                        }
                    }
                    t if t & wire::REPLY_TYPE_ERROR_BIT != 0 => {
                        let p = self.recv_payload("error chunk", h.length).await?;
                        let e = wire::parse_error_chunk(t, &p)?;
                        slots[i].error.get_or_insert(e);
                    }
                    t => {
                        return Err(ProtocolError::UnexpectedChunk {
                            ty: t,
                            command: "NBD_CMD_READ",
                        }
                        .into())
                    }
                }
                Ok(h.is_done().then_some(i))
            }
        }
    }

    async fn block_status_inner(
        &mut self,
        offset: u64,
        length: u32,
    ) -> Result<BlockStatus, Failure> {
        let cookie = self.cookie();
        self.send(&Request {
            flags: 0,
            command: wire::CMD_BLOCK_STATUS,
            cookie,
            offset,
            length,
        })
        .await?;
        self.stream.flush().await?;
        let end = offset + u64::from(length);
        let mut contexts: Vec<(MetaContextId, Vec<Extent>)> = Vec::new();
        let mut error: Option<ServerError> = None;
        loop {
            match self.recv_header().await? {
                ReplyHeader::Simple {
                    error: errno,
                    cookie: c,
                } => {
                    if c != cookie {
                        return Err(ProtocolError::UnknownCookie(c).into());
                    }
                    if errno == 0 {
                        return Err(ProtocolError::UnexpectedSimpleReply {
                            command: "NBD_CMD_BLOCK_STATUS",
                        }
                        .into());
                    }
                    return Err(Failure::simple(errno));
                }
                ReplyHeader::Chunk(h) => {
                    if h.cookie != cookie {
                        return Err(ProtocolError::UnknownCookie(h.cookie).into());
                    }
                    match h.ty {
                        wire::REPLY_TYPE_BLOCK_STATUS => {
                            let p = self
                                .recv_payload("NBD_REPLY_TYPE_BLOCK_STATUS", h.length)
                                .await?;
                            let (id, descriptors) = wire::parse_block_status(&p)?;
                            if !self.info.meta_contexts.iter().any(|c| c.id.0 == id) {
                                return Err(ProtocolError::UnknownContext(id).into());
                            }
                            if contexts.iter().any(|(c, _)| c.0 == id) {
                                return Err(ProtocolError::DuplicateContext(id).into());
                            }
                            let mut pos = offset;
                            let mut extents = Vec::with_capacity(descriptors.len());
                            for (len, flags) in descriptors {
                                if pos >= end {
                                    break;
                                }
                                let len = u64::from(len).min(end - pos);
                                extents.push(Extent {
                                    offset: pos,
                                    length: len,
                                    flags,
                                });
                                pos += len;
                            }
                            contexts.push((MetaContextId(id), extents));
                        }
                        wire::REPLY_TYPE_NONE => {
                            if h.length != 0 || !h.is_done() {
                                return Err(ProtocolError::BadNoneChunk.into());
                            }
                        }
                        t if t & wire::REPLY_TYPE_ERROR_BIT != 0 => {
                            let p = self.recv_payload("error chunk", h.length).await?;
                            error.get_or_insert(wire::parse_error_chunk(t, &p)?);
                        }
                        t => {
                            return Err(ProtocolError::UnexpectedChunk {
                                ty: t,
                                command: "NBD_CMD_BLOCK_STATUS",
                            }
                            .into())
                        }
                    }
                    if h.is_done() {
                        break;
                    }
                }
            }
        }
        if let Some(e) = error {
            return Err(Failure::Server(e));
        }
        for c in &self.info.meta_contexts {
            if !contexts.iter().any(|(id, _)| *id == c.id) {
                return Err(ProtocolError::MissingContext(c.id.0).into());
            }
        }
        Ok(BlockStatus {
            offset,
            length: length.into(),
            contexts,
        })
    }

    async fn write_inner(&mut self, data: &[u8], offset: u64) -> Result<(), Failure> {
        for (i, piece) in data.chunks(self.max_request as usize).enumerate() {
            let piece_offset = offset + (i * self.max_request as usize) as u64;
            let cookie = self.cookie();
            let req = Request {
                flags: 0,
                command: wire::CMD_WRITE,
                cookie,
                offset: piece_offset,
                length: piece.len() as u32,
            };
            self.send(&req).await?;
            self.stream.write_all(piece).await?;
            self.stream.flush().await?;
            self.recv_ack(cookie, "NBD_CMD_WRITE").await?;
        }
        Ok(())
    }

    async fn command_inner(&mut self, command: u16, name: &'static str) -> Result<(), Failure> {
        let cookie = self.cookie();
        self.send(&Request {
            flags: 0,
            command,
            cookie,
            offset: 0,
            length: 0,
        })
        .await?;
        self.stream.flush().await?;
        self.recv_ack(cookie, name).await
    }

    /// Receives the reply to a command without reply payload (write, flush).
    async fn recv_ack(&mut self, cookie: u64, command: &'static str) -> Result<(), Failure> {
        let mut error: Option<ServerError> = None;
        loop {
            match self.recv_header().await? {
                ReplyHeader::Simple {
                    error: errno,
                    cookie: c,
                } => {
                    if c != cookie {
                        return Err(ProtocolError::UnknownCookie(c).into());
                    }
                    if errno != 0 {
                        return Err(Failure::simple(errno));
                    }
                    return Ok(());
                }
                ReplyHeader::Chunk(h) => {
                    if h.cookie != cookie {
                        return Err(ProtocolError::UnknownCookie(h.cookie).into());
                    }
                    match h.ty {
                        wire::REPLY_TYPE_NONE => {
                            if h.length != 0 || !h.is_done() {
                                return Err(ProtocolError::BadNoneChunk.into());
                            }
                        }
                        t if t & wire::REPLY_TYPE_ERROR_BIT != 0 => {
                            let p = self.recv_payload("error chunk", h.length).await?;
                            error.get_or_insert(wire::parse_error_chunk(t, &p)?);
                        }
                        t => return Err(ProtocolError::UnexpectedChunk { ty: t, command }.into()),
                    }
                    if h.is_done() {
                        break;
                    }
                }
            }
        }
        match error {
            Some(e) => Err(Failure::Server(e)),
            None => Ok(()),
        }
    }

    #[cfg(test)]
    pub(crate) fn from_parts(
        stream: S,
        info: ExportInfo,
        max_request: u32,
        pipeline_depth: usize,
    ) -> Self {
        Self {
            stream: BufStream::new(stream),
            info,
            next_cookie: 1,
            broken: false,
            max_request,
            pipeline_depth,
        }
    }
}

/// One read request in flight: where its data goes and what has arrived.
#[derive(Debug)]
struct ReadSlot {
    cookie: u64,
    buf_start: usize,
    offset: u64,
    len: u32,
    covered: u64,
    /// Received content chunks, start -> end, adjacent ones merged.
    seen: BTreeMap<u64, u64>,
    error: Option<ServerError>,
}

impl ReadSlot {
    fn new(cookie: u64, buf_start: usize, offset: u64, len: u32) -> Self {
        Self {
            cookie,
            buf_start,
            offset,
            len,
            covered: 0,
            seen: BTreeMap::new(),
            error: None,
        }
    }

    /// Records a content chunk; returns its start relative to this request. Rejects chunks
    /// outside the request or overlapping an earlier one.
    fn claim(&mut self, offset: u64, len: u64) -> Result<usize, ProtocolError> {
        let request_end = self.offset + u64::from(self.len);
        let out_of_range = ProtocolError::ChunkOutOfRange {
            offset,
            len,
            request_offset: self.offset,
            request_len: self.len.into(),
        };
        let end = match offset.checked_add(len) {
            Some(end) if offset >= self.offset && end <= request_end => end,
            _ => return Err(out_of_range),
        };
        let mut start = offset;
        if let Some((&s, &e)) = self.seen.range(..end).next_back() {
            if e > offset {
                return Err(ProtocolError::ChunkOverlap { offset, len });
            }
            if e == offset {
                start = s;
            }
        }
        let mut merged_end = end;
        if let Some(next_end) = self.seen.remove(&end) {
            merged_end = next_end;
        }
        self.seen.insert(start, merged_end);
        self.covered += len;
        Ok((offset - self.offset) as usize)
    }
}

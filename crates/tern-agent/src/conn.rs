//! Framed agent-to-agent connections: a reader that turns socket bytes into
//! [`tern_proto::Message`]s and a writer that batches frames and flushes on request.
//! Owns byte counting for reports; knows nothing about migration phases.

use bytes::BytesMut;
use tern_proto::{FrameError, Message};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// Why a frame could not be read from the peer.
#[derive(Debug, thiserror::Error)]
pub enum RecvError {
    #[error("peer connection failed")]
    Io(#[from] std::io::Error),
    #[error("peer sent an invalid frame")]
    Frame(#[from] FrameError),
    #[error("peer closed the connection in the middle of a frame")]
    TruncatedFrame,
}

pub struct FrameReader<R> {
    r: R,
    buf: BytesMut,
    pub bytes_read: u64,
}

impl<R: AsyncRead + Unpin> FrameReader<R> {
    pub fn new(r: R) -> Self {
        FrameReader {
            r,
            buf: BytesMut::with_capacity(1 << 20),
            bytes_read: 0,
        }
    }

    /// The next message; `Ok(None)` when the peer closed cleanly between frames.
    pub async fn next(&mut self) -> Result<Option<Message>, RecvError> {
        loop {
            if let Some(m) = tern_proto::decode(&mut self.buf)? {
                return Ok(Some(m));
            }
            if self.buf.capacity() - self.buf.len() < 64 << 10 {
                self.buf.reserve(1 << 20);
            }
            let n = self.r.read_buf(&mut self.buf).await?;
            if n == 0 {
                return if self.buf.is_empty() {
                    Ok(None)
                } else {
                    Err(RecvError::TruncatedFrame)
                };
            }
            self.bytes_read += n as u64;
        }
    }

    /// Whether a whole frame is already buffered (so `next` will not wait on the socket).
    pub fn has_frame(&self) -> bool {
        if self.buf.len() < tern_proto::HEADER_LEN {
            return false;
        }
        let len = u32::from_be_bytes([self.buf[2], self.buf[3], self.buf[4], self.buf[5]]) as usize;
        self.buf.len() >= tern_proto::HEADER_LEN + len
    }
}

pub struct FrameWriter<W> {
    w: W,
    buf: BytesMut,
    pub bytes_written: u64,
}

impl<W: AsyncWrite + Unpin> FrameWriter<W> {
    pub fn new(w: W) -> Self {
        FrameWriter {
            w,
            buf: BytesMut::with_capacity(1 << 20),
            bytes_written: 0,
        }
    }

    /// Queues a frame; nothing is sent until [`FrameWriter::flush`].
    pub fn push(&mut self, m: &Message) {
        tern_proto::encode(m, &mut self.buf);
    }

    pub fn pending(&self) -> usize {
        self.buf.len()
    }

    pub async fn flush(&mut self) -> std::io::Result<()> {
        if !self.buf.is_empty() {
            self.w.write_all(&self.buf).await?;
            self.bytes_written += self.buf.len() as u64;
            self.buf.clear();
        }
        self.w.flush().await
    }

    pub async fn send(&mut self, m: &Message) -> std::io::Result<()> {
        self.push(m);
        self.flush().await
    }

    pub async fn shutdown(&mut self) -> std::io::Result<()> {
        self.flush().await?;
        self.w.shutdown().await
    }
}

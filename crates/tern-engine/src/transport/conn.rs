//! Framed agent-to-agent connections: a reader that turns socket bytes into
//! [`tern_proto::Message`]s and a writer that batches frames and flushes on request, plus
//! [`Segments`], the copy-free output queue both the peer writer and the destination's
//! QEMU writer use (page data is written from where it was received, with writev).
//! Owns byte counting for reports; knows nothing about migration phases.

use std::io::IoSlice;

use bytes::{Buf, Bytes, BytesMut};
use tern_proto::{FrameError, Message};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// Why a frame could not be read from the peer.
#[derive(Debug, thiserror::Error)]
pub enum RecvError {
    #[error("peer connection failed: {}", super::tls::describe(.0))]
    Io(std::io::Error),
    #[error("peer sent an invalid frame")]
    Frame(#[from] FrameError),
    #[error("peer closed the connection in the middle of a frame")]
    TruncatedFrame,
}

impl From<std::io::Error> for RecvError {
    fn from(e: std::io::Error) -> Self {
        RecvError::Io(e)
    }
}

/// Why [`FrameReader::expect`] got no message.
#[derive(Debug, thiserror::Error)]
pub enum ExpectError {
    #[error("timed out after {0:?} waiting for {1}")]
    Timeout(std::time::Duration, &'static str),
    #[error("the peer closed the connection while we waited for {0}")]
    Closed(&'static str),
    #[error("the peer aborted ({}): {message}", code.name())]
    Aborted {
        code: tern_proto::ErrorCode,
        message: String,
    },
    #[error(transparent)]
    Recv(#[from] RecvError),
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
            self.make_room();
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

    /// Keeps at least 64 KiB free for the next read.
    fn make_room(&mut self) {
        if self.buf.capacity() - self.buf.len() < 64 << 10 {
            self.buf.reserve(1 << 20);
        }
    }

    /// The next message within `within`; the peer's Abort and a clean close are errors.
    pub async fn expect(
        &mut self,
        within: std::time::Duration,
        what: &'static str,
    ) -> Result<Message, ExpectError> {
        match tokio::time::timeout(within, self.next()).await {
            Err(_) => Err(ExpectError::Timeout(within, what)),
            Ok(Err(e)) => Err(e.into()),
            Ok(Ok(None)) => Err(ExpectError::Closed(what)),
            Ok(Ok(Some(Message::Abort { code, message }))) => {
                Err(ExpectError::Aborted { code, message })
            }
            Ok(Ok(Some(m))) => Ok(m),
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

/// Bytes waiting to be written: small pieces gathered in a scratch buffer, bulk data kept
/// as the `Bytes` it arrived in; written with vectored I/O, so bulk data is never copied.
#[derive(Default)]
pub struct Segments {
    segs: Vec<Bytes>,
    scratch: BytesMut,
    len: usize,
}

impl Segments {
    /// Pending bytes.
    pub fn len(&self) -> usize {
        self.len + self.scratch.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Where small pieces go (they are written after everything pushed before them).
    pub fn scratch(&mut self) -> &mut BytesMut {
        &mut self.scratch
    }

    fn seal(&mut self) {
        if !self.scratch.is_empty() {
            let b = self.scratch.split().freeze();
            self.len += b.len();
            self.segs.push(b);
        }
    }

    /// Queues bulk data without copying it.
    pub fn push(&mut self, b: Bytes) {
        self.seal();
        if !b.is_empty() {
            self.len += b.len();
            self.segs.push(b);
        }
    }

    /// Queues one tern frame (page data and QEMU bytes are not copied).
    pub fn push_frame(&mut self, m: &Message) {
        let mut bulk = Vec::new();
        tern_proto::encode_segments(m, &mut self.scratch, &mut bulk);
        for b in bulk {
            // encode_segments moved the scratch bytes into `bulk` in order
            self.len += b.len();
            self.segs.push(b);
        }
    }

    /// Writes everything; returns the number of bytes written.
    pub async fn write_to<W: AsyncWrite + Unpin>(&mut self, w: &mut W) -> std::io::Result<u64> {
        self.seal();
        let total = self.len as u64;
        let mut first = 0;
        while first < self.segs.len() {
            let n = {
                let slices: Vec<IoSlice<'_>> = self.segs[first..]
                    .iter()
                    .take(512)
                    .map(|b| IoSlice::new(b))
                    .collect();
                w.write_vectored(&slices).await?
            };
            if n == 0 {
                return Err(std::io::ErrorKind::WriteZero.into());
            }
            let mut left = n;
            while left > 0 {
                let seg = &mut self.segs[first];
                if seg.len() <= left {
                    left -= seg.len();
                    first += 1;
                } else {
                    seg.advance(left);
                    left = 0;
                }
            }
        }
        self.segs.clear();
        self.len = 0;
        Ok(total)
    }
}

impl<R: AsyncRead + Unpin> FrameReader<R> {
    /// Reads whatever the connection already holds, without waiting. Returns false at EOF.
    pub fn try_fill(&mut self) -> Result<bool, RecvError> {
        use std::future::Future;
        self.make_room();
        let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
        let read = std::pin::pin!(self.r.read_buf(&mut self.buf));
        match read.poll(&mut cx) {
            std::task::Poll::Pending => Ok(true),
            std::task::Poll::Ready(Ok(0)) => Ok(false),
            std::task::Poll::Ready(Ok(n)) => {
                self.bytes_read += n as u64;
                Ok(true)
            }
            std::task::Poll::Ready(Err(e)) => Err(e.into()),
        }
    }
}

/// Makes a peer connection notice a dead link by itself, in any phase: keepalive probes
/// after a second of silence, and the connection aborted when what it sent (data or
/// probes) stays unacknowledged for `dead_after` (TCP_USER_TIMEOUT). Without this a
/// connection waiting for an answer over a link that died waits for its own timeout.
pub fn watch_peer_socket(s: &tokio::net::TcpStream, dead_after: std::time::Duration) {
    let sock = socket2::SockRef::from(s);
    let ka = socket2::TcpKeepalive::new()
        .with_time(std::time::Duration::from_secs(1))
        .with_interval(std::time::Duration::from_secs(1))
        .with_retries((dead_after.as_secs() as u32).clamp(2, 60));
    if let Err(e) = sock
        .set_tcp_keepalive(&ka)
        .and_then(|_| sock.set_tcp_user_timeout(Some(dead_after)))
    {
        tracing::warn!("cannot set keepalive on a peer connection: {e}");
    }
}

pub struct FrameWriter<W> {
    w: W,
    q: Segments,
    pub bytes_written: u64,
    /// A flush that the peer does not take within this fails (a peer that stops reading
    /// must not hold a writer, and what waits on it, forever).
    deadline: Option<std::time::Duration>,
}

impl<W: AsyncWrite + Unpin> FrameWriter<W> {
    pub fn new(w: W) -> Self {
        FrameWriter {
            w,
            q: Segments::default(),
            bytes_written: 0,
            deadline: None,
        }
    }

    /// Fails every flush that takes longer than `d` ([`std::io::ErrorKind::TimedOut`]).
    pub fn with_deadline(mut self, d: std::time::Duration) -> Self {
        self.deadline = Some(d);
        self
    }

    /// Queues a frame; nothing is sent until [`FrameWriter::flush`].
    pub fn push(&mut self, m: &Message) {
        self.q.push_frame(m);
    }

    /// Queues bytes that already are whole frames (e.g. compressed ones).
    pub fn push_encoded(&mut self, b: Bytes) {
        self.q.push(b);
    }

    pub fn pending(&self) -> usize {
        self.q.len()
    }

    pub async fn flush(&mut self) -> std::io::Result<()> {
        let Some(d) = self.deadline else {
            return self.flush_now().await;
        };
        match tokio::time::timeout(d, self.flush_now()).await {
            Ok(r) => r,
            Err(_) => Err(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                format!("the peer took none of our data for {d:?}"),
            )),
        }
    }

    async fn flush_now(&mut self) -> std::io::Result<()> {
        if !self.q.is_empty() {
            self.bytes_written += self.q.write_to(&mut self.w).await?;
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

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn segments_write_everything_in_order_through_partial_writes() {
        // a pipe with a tiny buffer forces many partial vectored writes
        let (mut a, mut b) = tokio::io::duplex(7);
        let mut q = Segments::default();
        let mut want = Vec::new();
        for i in 0..50u8 {
            q.scratch().extend_from_slice(&[i; 3]);
            want.extend_from_slice(&[i; 3]);
            let bulk = Bytes::from(vec![i ^ 0xff; 100 + i as usize]);
            want.extend_from_slice(&bulk);
            q.push(bulk);
        }
        let reader = crate::spawn(async move {
            let mut got = Vec::new();
            b.read_to_end(&mut got).await.unwrap();
            got
        });
        let n = q.write_to(&mut a).await.unwrap();
        drop(a);
        assert_eq!(n as usize, want.len());
        assert_eq!(reader.await.unwrap(), want);
        assert!(q.is_empty());
    }
}

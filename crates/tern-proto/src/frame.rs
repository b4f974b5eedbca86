//! Frames: `u8 type | u8 flags | be32 payload length | payload`. Encoding a message into
//! one (as bytes, or as segments that share bulk data instead of copying it) and taking a
//! whole frame off a buffer; the limits every receiver applies to a frame itself.

use bytes::{Buf, BufMut, Bytes, BytesMut};

use crate::compression::{decompress, FLAG_CODEC_MASK};
use crate::message::{decode_payload, encode_payload, payload_len, Message, MessageType};

/// Largest payload a frame may carry.
pub const MAX_PAYLOAD: usize = 32 << 20;
/// Bytes in a frame header.
pub const HEADER_LEN: usize = 6;

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
    scratch.put_u8(msg.kind().tag());
    scratch.put_u8(0);
    scratch.put_u32(payload_len(msg) as u32);
    encode_payload(msg, scratch, segs);
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

/// Takes one whole frame off the front of `buf` and decodes it. `Ok(None)` means more
/// bytes are needed. Page data is sliced out of `buf` without copying.
pub fn decode(buf: &mut BytesMut) -> Result<Option<Message>, FrameError> {
    if buf.len() < HEADER_LEN {
        return Ok(None);
    }
    let ty = buf[0];
    let flags = buf[1];
    let len = u32::from_be_bytes([buf[2], buf[3], buf[4], buf[5]]) as usize;
    let Some(kind) = MessageType::from_tag(ty) else {
        return Err(FrameError::UnknownType(ty));
    };
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
        decompress(kind, codec, &payload)?
    };
    decode_payload(kind, payload).map(Some)
}

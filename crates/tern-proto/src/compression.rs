//! Frame payload compression (v2): the codecs a frame's flags name, compressing frames
//! for the wire ([`FrameCompressor`]) and decompressing what a peer sent, bounded by
//! [`crate::MAX_PAYLOAD`].

use bytes::{BufMut, Bytes, BytesMut};

use crate::frame::{encode, FrameError, HEADER_LEN, MAX_PAYLOAD};
use crate::message::{Message, MessageType};

/// Payload compression of a frame, in the low bits of its flags byte (v2).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Codec {
    None,
    Lz4,
    /// zstd at the given level (the level matters to the sender only).
    Zstd(i32),
}

impl Codec {
    pub(crate) fn flag(self) -> u8 {
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

pub(crate) const FLAG_LZ4: u8 = 1;
pub(crate) const FLAG_ZSTD: u8 = 2;
pub(crate) const FLAG_CODEC_MASK: u8 = 3;

pub(crate) fn decompress(ty: MessageType, codec: u8, payload: &[u8]) -> Result<Bytes, FrameError> {
    let bad = |what| FrameError::Invalid {
        msg: ty.name(),
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
                out.put_u8(msg.kind().tag());
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

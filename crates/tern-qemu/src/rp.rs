//! Return-path messages (destination QEMU -> source QEMU, on the migration socket):
//! `be16 type, be16 len, payload`. Sans-IO parse and encode, so agents can relay the
//! return path one message at a time and see SHUT, and, for postcopy, read the page
//! requests (REQ_PAGES_ID / REQ_PAGES: offset and length in bytes within a RAM block) and
//! the recovery messages (RECV_BITMAP, RESUME_ACK). Every parsed message encodes back to
//! the same bytes. Must not interpret migration state (which block a REQ_PAGES means is
//! the reader's to remember: the last REQ_PAGES_ID's).

use bytes::Bytes;

const RP_SHUT: u16 = 1;
const RP_PONG: u16 = 2;
const RP_REQ_PAGES_ID: u16 = 3;
const RP_REQ_PAGES: u16 = 4;
const RP_RECV_BITMAP: u16 = 5;
const RP_RESUME_ACK: u16 = 6;
const RP_SWITCHOVER_ACK: u16 = 7;
const BITMAP_END: u64 = 0x0123_4567_89AB_CDEF;
/// Largest received-page bitmap: one block of 8 TiB in 4 KiB pages.
pub const MAX_BITMAP: u64 = 1 << 28;

/// The size QEMU gives the RECV_BITMAP bitmap of a block of `used_length` bytes: one bit
/// per target page, rounded up to whole 64-bit words.
pub fn recv_bitmap_len(used_length: u64, page_size: u64) -> u64 {
    used_length.div_ceil(page_size.max(1)).div_ceil(64) * 8
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RpMessage {
    Shut(u32),
    Pong(u32),
    /// A postcopy page fault in `block` (and the block for the REQ_PAGES after it).
    ReqPagesId {
        offset: u64,
        len: u32,
        block: String,
    },
    /// A postcopy page fault in the block of the last REQ_PAGES_ID.
    ReqPages {
        offset: u64,
        len: u32,
    },
    /// Postcopy recovery: `block`'s received-page bitmap, little-endian 64-bit words.
    RecvBitmap {
        block: String,
        bitmap: Bytes,
    },
    ResumeAck(u32),
    SwitchoverAck,
    Unknown {
        ty: u16,
        payload: Bytes,
    },
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum RpError {
    #[error("return-path message type 0 (invalid)")]
    InvalidType,
    #[error("return-path message type {ty} has a malformed {len}-byte payload")]
    BadPayload { ty: u16, len: usize },
    #[error("return-path bitmap is malformed: {0}")]
    BadBitmap(String),
    #[error("return-path message type {ty} names a RAM block that is empty or not UTF-8")]
    BadBlockName { ty: u16 },
    #[error("return-path page request {offset:#x}+{len:#x} overflows")]
    BadPageRange { offset: u64, len: u32 },
}

/// A block name as QEMU writes it: non-empty UTF-8 (so it re-encodes to the same bytes).
fn block_name(ty: u16, b: &[u8]) -> Result<String, RpError> {
    match std::str::from_utf8(b) {
        Ok(s) if !s.is_empty() => Ok(s.to_owned()),
        _ => Err(RpError::BadBlockName { ty }),
    }
}

/// Only what no block can hold; whether the range is inside its block (and not empty,
/// which QEMU's source refuses) is for the reader, who knows the blocks.
fn page_range(offset: u64, len: u32) -> Result<(), RpError> {
    if offset.checked_add(len as u64).is_none() {
        return Err(RpError::BadPageRange { offset, len });
    }
    Ok(())
}

fn be32(b: &[u8]) -> u32 {
    u32::from_be_bytes([b[0], b[1], b[2], b[3]])
}

fn be64(b: &[u8]) -> u64 {
    u64::from_be_bytes([b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7]])
}

/// Parses one message from the front of `buf`; `None` = need more bytes.
pub fn parse_rp(buf: &[u8]) -> Result<Option<(RpMessage, usize)>, RpError> {
    if buf.len() < 4 {
        return Ok(None);
    }
    let ty = u16::from_be_bytes([buf[0], buf[1]]);
    let len = u16::from_be_bytes([buf[2], buf[3]]) as usize;
    if buf.len() < 4 + len {
        return Ok(None);
    }
    let p = &buf[4..4 + len];
    let bad = || RpError::BadPayload { ty, len };
    let msg = match ty {
        0 => return Err(RpError::InvalidType),
        RP_SHUT if len == 4 => RpMessage::Shut(be32(p)),
        RP_PONG if len == 4 => RpMessage::Pong(be32(p)),
        RP_RESUME_ACK if len == 4 => RpMessage::ResumeAck(be32(p)),
        RP_SWITCHOVER_ACK if len == 0 => RpMessage::SwitchoverAck,
        RP_REQ_PAGES if len == 12 => {
            let (offset, len) = (be64(p), be32(&p[8..]));
            page_range(offset, len)?;
            RpMessage::ReqPages { offset, len }
        }
        RP_REQ_PAGES_ID if len >= 13 && 13 + p[12] as usize == len => {
            let (offset, len) = (be64(p), be32(&p[8..]));
            page_range(offset, len)?;
            RpMessage::ReqPagesId {
                offset,
                len,
                block: block_name(ty, &p[13..])?,
            }
        }
        RP_RECV_BITMAP if len >= 1 && 1 + p[0] as usize == len => {
            let block = block_name(ty, &p[1..])?;
            let rest = &buf[4 + len..];
            if rest.len() < 8 {
                return Ok(None);
            }
            let size = be64(rest);
            if size > MAX_BITMAP || !size.is_multiple_of(8) {
                return Err(RpError::BadBitmap(format!("{size} bytes")));
            }
            let total = 4 + len + 8 + size as usize + 8;
            if buf.len() < total {
                return Ok(None);
            }
            let end = be64(&buf[total - 8..]);
            if end != BITMAP_END {
                return Err(RpError::BadBitmap(format!("end marker {end:#x}")));
            }
            let bitmap = Bytes::copy_from_slice(&buf[4 + len + 8..total - 8]);
            return Ok(Some((RpMessage::RecvBitmap { block, bitmap }, total)));
        }
        RP_SHUT | RP_PONG | RP_RESUME_ACK | RP_SWITCHOVER_ACK | RP_REQ_PAGES | RP_REQ_PAGES_ID
        | RP_RECV_BITMAP => return Err(bad()),
        _ => RpMessage::Unknown {
            ty,
            payload: Bytes::copy_from_slice(p),
        },
    };
    Ok(Some((msg, 4 + len)))
}

/// Appends the wire form of `msg`.
pub fn encode_rp(msg: &RpMessage, out: &mut Vec<u8>) {
    let head = |ty: u16, len: usize, out: &mut Vec<u8>| {
        out.extend_from_slice(&ty.to_be_bytes());
        out.extend_from_slice(&(len as u16).to_be_bytes());
    };
    match msg {
        RpMessage::Shut(v) | RpMessage::Pong(v) | RpMessage::ResumeAck(v) => {
            let ty = match msg {
                RpMessage::Shut(_) => RP_SHUT,
                RpMessage::Pong(_) => RP_PONG,
                _ => RP_RESUME_ACK,
            };
            head(ty, 4, out);
            out.extend_from_slice(&v.to_be_bytes());
        }
        RpMessage::SwitchoverAck => head(RP_SWITCHOVER_ACK, 0, out),
        RpMessage::ReqPages { offset, len } => {
            head(RP_REQ_PAGES, 12, out);
            out.extend_from_slice(&offset.to_be_bytes());
            out.extend_from_slice(&len.to_be_bytes());
        }
        RpMessage::ReqPagesId { offset, len, block } => {
            head(RP_REQ_PAGES_ID, 13 + block.len(), out);
            out.extend_from_slice(&offset.to_be_bytes());
            out.extend_from_slice(&len.to_be_bytes());
            out.push(block.len() as u8);
            out.extend_from_slice(block.as_bytes());
        }
        RpMessage::RecvBitmap { block, bitmap } => {
            head(RP_RECV_BITMAP, 1 + block.len(), out);
            out.push(block.len() as u8);
            out.extend_from_slice(block.as_bytes());
            out.extend_from_slice(&(bitmap.len() as u64).to_be_bytes());
            out.extend_from_slice(bitmap);
            out.extend_from_slice(&BITMAP_END.to_be_bytes());
        }
        RpMessage::Unknown { ty, payload } => {
            head(*ty, payload.len(), out);
            out.extend_from_slice(payload);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_message_roundtrips_and_needs_all_its_bytes() {
        let msgs = [
            RpMessage::Shut(0),
            RpMessage::Pong(1),
            RpMessage::ReqPagesId {
                offset: 4096,
                len: 4096,
                block: "pc.ram".into(),
            },
            RpMessage::ReqPages {
                offset: 8192,
                len: 4096,
            },
            RpMessage::RecvBitmap {
                block: "pc.ram".into(),
                bitmap: Bytes::from_static(&[1, 2, 3, 4, 5, 6, 7, 8]),
            },
            RpMessage::ResumeAck(1),
            RpMessage::SwitchoverAck,
            RpMessage::Unknown {
                ty: 99,
                payload: Bytes::from_static(b"xy"),
            },
        ];
        for m in msgs {
            let mut b = Vec::new();
            encode_rp(&m, &mut b);
            assert_eq!(parse_rp(&b), Ok(Some((m.clone(), b.len()))));
            for cut in 0..b.len() {
                assert_eq!(parse_rp(&b[..cut]), Ok(None), "{m:?} cut at {cut}");
            }
        }
    }

    #[test]
    fn malformed_messages_are_errors() {
        assert_eq!(parse_rp(&[0, 0, 0, 0]), Err(RpError::InvalidType));
        assert_eq!(
            parse_rp(&[0, 1, 0, 2, 0, 0]),
            Err(RpError::BadPayload { ty: 1, len: 2 })
        );
        let mut b = Vec::new();
        encode_rp(
            &RpMessage::RecvBitmap {
                block: "a".into(),
                bitmap: Bytes::from_static(&[0; 8]),
            },
            &mut b,
        );
        let n = b.len();
        b[n - 1] ^= 1;
        assert!(matches!(parse_rp(&b), Err(RpError::BadBitmap(_))));
    }

    #[test]
    fn postcopy_messages_parse_into_typed_values_from_qemus_bytes() {
        // REQ_PAGES_ID: be64 offset, be32 length, counted name
        let b = b"\x00\x03\x00\x13\x00\x00\x00\x00\x00\x12\x30\x00\x00\x00\x10\x00\x06pc.ram";
        assert_eq!(
            parse_rp(b),
            Ok(Some((
                RpMessage::ReqPagesId {
                    offset: 0x12_3000,
                    len: 4096,
                    block: "pc.ram".into()
                },
                b.len()
            )))
        );
        let b = b"\x00\x04\x00\x0c\x00\x00\x00\x00\x00\x00\x20\x00\x00\x00\x10\x00";
        assert_eq!(
            parse_rp(b),
            Ok(Some((
                RpMessage::ReqPages {
                    offset: 0x2000,
                    len: 4096
                },
                b.len()
            )))
        );
        // RECV_BITMAP: counted name, then outside the length: be64 size, bitmap, end mark
        let mut b = b"\x00\x05\x00\x04\x03vga".to_vec();
        b.extend_from_slice(&16u64.to_be_bytes());
        b.extend_from_slice(&[0xff, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0]);
        b.extend_from_slice(&BITMAP_END.to_be_bytes());
        b.extend_from_slice(b"\x00\x06\x00\x04\x00\x00\x00\x01");
        let (m, n) = parse_rp(&b).unwrap().unwrap();
        assert_eq!(n, b.len() - 8);
        let RpMessage::RecvBitmap { block, bitmap } = &m else {
            panic!("{m:?}")
        };
        assert_eq!(
            (block.as_str(), bitmap.len(), bitmap[0], bitmap[8]),
            ("vga", 16, 0xff, 1)
        );
        let mut again = Vec::new();
        encode_rp(&m, &mut again);
        assert_eq!(again, &b[..n]);
        assert_eq!(parse_rp(&b[n..]), Ok(Some((RpMessage::ResumeAck(1), 8))));
        assert_eq!(recv_bitmap_len(16 * 4096, 4096), 8);
        assert_eq!(recv_bitmap_len(65 * 4096, 4096), 16);
        assert_eq!(recv_bitmap_len(512 << 20, 4096), 16384);
    }

    #[test]
    fn malformed_postcopy_messages_are_errors() {
        // page requests past the end of the address space
        let mut b = Vec::new();
        encode_rp(
            &RpMessage::ReqPages {
                offset: u64::MAX,
                len: 1,
            },
            &mut b,
        );
        assert!(matches!(parse_rp(&b), Err(RpError::BadPageRange { .. })));
        b.clear();
        encode_rp(
            &RpMessage::ReqPagesId {
                offset: u64::MAX - 10,
                len: 4096,
                block: "pc.ram".into(),
            },
            &mut b,
        );
        assert!(matches!(parse_rp(&b), Err(RpError::BadPageRange { .. })));
        // names: empty or not UTF-8 (would not re-encode to the same bytes)
        let b = b"\x00\x03\x00\x0f\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x10\x00\x02\xff\xfe";
        assert_eq!(parse_rp(b), Err(RpError::BadBlockName { ty: 3 }));
        let b = b"\x00\x05\x00\x01\x00";
        assert_eq!(parse_rp(b), Err(RpError::BadBlockName { ty: 5 }));
        // counted name longer than the message
        let b = b"\x00\x03\x00\x0e\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x10\x00\x05a";
        assert_eq!(parse_rp(b), Err(RpError::BadPayload { ty: 3, len: 14 }));
        // bitmap sizes: over the limit (refused before waiting for it), not whole words
        for size in [MAX_BITMAP + 8, 12] {
            let mut b = b"\x00\x05\x00\x02\x01a".to_vec();
            b.extend_from_slice(&size.to_be_bytes());
            assert!(matches!(parse_rp(&b), Err(RpError::BadBitmap(_))), "{size}");
        }
        // RESUME_ACK of the wrong size
        assert_eq!(
            parse_rp(b"\x00\x06\x00\x02\x00\x01"),
            Err(RpError::BadPayload { ty: 6, len: 2 })
        );
    }
}

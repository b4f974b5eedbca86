//! Return-path messages (destination QEMU -> source QEMU, on the migration socket):
//! `be16 type, be16 len, payload`. Sans-IO parse and encode, so agents can relay the
//! return path one message at a time and see SHUT. Must not interpret migration state.

use bytes::Bytes;

const RP_SHUT: u16 = 1;
const RP_PONG: u16 = 2;
const RP_REQ_PAGES_ID: u16 = 3;
const RP_REQ_PAGES: u16 = 4;
const RP_RECV_BITMAP: u16 = 5;
const RP_RESUME_ACK: u16 = 6;
const RP_SWITCHOVER_ACK: u16 = 7;
const BITMAP_END: u64 = 0x0123_4567_89AB_CDEF;
const MAX_BITMAP: u64 = 1 << 30;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RpMessage {
    Shut(u32),
    Pong(u32),
    ReqPagesId {
        offset: u64,
        len: u32,
        block: String,
    },
    ReqPages {
        offset: u64,
        len: u32,
    },
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
        RP_REQ_PAGES if len == 12 => RpMessage::ReqPages {
            offset: be64(p),
            len: be32(&p[8..]),
        },
        RP_REQ_PAGES_ID if len >= 13 && 13 + p[12] as usize == len => RpMessage::ReqPagesId {
            offset: be64(p),
            len: be32(&p[8..]),
            block: String::from_utf8_lossy(&p[13..]).into_owned(),
        },
        RP_RECV_BITMAP if len >= 1 && 1 + p[0] as usize == len => {
            let block = String::from_utf8_lossy(&p[1..]).into_owned();
            let rest = &buf[4 + len..];
            if rest.len() < 8 {
                return Ok(None);
            }
            let size = be64(rest);
            if size > MAX_BITMAP {
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
}

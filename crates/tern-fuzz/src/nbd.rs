//! Target `nbd_replies`: tern-nbd's decoders of what an NBD server sends.
//!
//! Input: a selector byte, then what that decoder reads (see [`sel`]). Selector 0 walks a
//! stream of transmission replies as the client reads them: header, then the chunk's
//! payload by type.

use tern_nbd::fuzzing::{
    option_error_message, parse_block_status, parse_error_chunk, parse_hole, parse_info,
    parse_meta_context, parse_option_reply_header, parse_reply_header, reply_header_len,
    ChunkHeader, Info, ReplyHeader, CHUNK_HEADER_LEN, INFO_BLOCK_SIZE, INFO_EXPORT,
    MAX_METADATA_PAYLOAD, OPTION_REPLY_HEADER_LEN, OPTION_REPLY_MAGIC, REPLY_FLAG_DONE,
    REPLY_TYPE_BLOCK_STATUS, REPLY_TYPE_ERROR, REPLY_TYPE_ERROR_BIT, REPLY_TYPE_ERROR_OFFSET,
    REPLY_TYPE_NONE, REPLY_TYPE_OFFSET_DATA, REPLY_TYPE_OFFSET_HOLE, SIMPLE_REPLY_LEN,
    SIMPLE_REPLY_MAGIC, STRUCTURED_REPLY_MAGIC,
};
use tern_nbd::NbdErrno;

use crate::input::Input;

/// Selectors: which decoder the rest of the input goes to.
pub(crate) mod sel {
    pub const STREAM: u8 = 0;
    pub const REPLY_HEADER: u8 = 1;
    pub const HOLE: u8 = 2;
    /// `be16 chunk type`, then the payload.
    pub const ERROR_CHUNK: u8 = 3;
    pub const BLOCK_STATUS: u8 = 4;
    /// `be32 option sent`, then the 20-byte header.
    pub const OPTION_REPLY_HEADER: u8 = 5;
    pub const INFO: u8 = 6;
    pub const META_CONTEXT: u8 = 7;
    pub const OPTION_ERROR: u8 = 8;
    pub const COUNT: u8 = 9;
}

pub(crate) fn run(data: &[u8]) {
    let mut input = Input::new(data);
    match input.u8() % sel::COUNT {
        sel::STREAM => stream(input.rest()),
        sel::REPLY_HEADER => reply_header(input.rest()),
        sel::HOLE => {
            hole(input.rest());
        }
        sel::ERROR_CHUNK => {
            let ty = input.u16();
            error_chunk(ty, input.rest());
        }
        sel::BLOCK_STATUS => {
            block_status(input.rest());
        }
        sel::OPTION_REPLY_HEADER => {
            let expected = input.u32();
            let mut h = [0u8; OPTION_REPLY_HEADER_LEN];
            let b = input.bytes(OPTION_REPLY_HEADER_LEN);
            h[..b.len()].copy_from_slice(b);
            if let Ok(r) = parse_option_reply_header(&h, expected) {
                assert_eq!(r.option, expected);
                assert!(
                    r.length <= MAX_METADATA_PAYLOAD,
                    "option reply of {} bytes",
                    r.length
                );
                let mut again = OPTION_REPLY_MAGIC.to_be_bytes().to_vec();
                for v in [r.option, r.reply_type, r.length] {
                    again.extend_from_slice(&v.to_be_bytes());
                }
                assert_eq!(again, h);
            }
        }
        sel::INFO => info(input.rest()),
        sel::META_CONTEXT => {
            let p = input.rest();
            if let Ok((id, name)) = parse_meta_context(p) {
                assert_eq!(id.to_be_bytes(), p[..4]);
                assert_eq!(name.as_bytes(), &p[4..]);
            }
        }
        _ => {
            let p = input.rest();
            let m = option_error_message(p);
            if let Ok(s) = std::str::from_utf8(p) {
                assert_eq!(m, s);
            }
        }
    }
}

/// Transmission replies back to back, read the way `NbdClient` reads them.
fn stream(mut b: &[u8]) {
    while b.len() >= 4 {
        let magic = u32::from_be_bytes([b[0], b[1], b[2], b[3]]);
        let Ok(n) = reply_header_len(magic) else {
            return;
        };
        if b.len() < n {
            return;
        }
        let (head, rest) = b.split_at(n);
        b = rest;
        reply_header(head);
        let h = match parse_reply_header(head) {
            Ok(ReplyHeader::Simple { .. }) => continue,
            Ok(ReplyHeader::Chunk(h)) => h,
            Err(e) => panic!("a {n}-byte header with magic {magic:#x} refused: {e}"),
        };
        if h.ty != REPLY_TYPE_OFFSET_DATA && h.length > MAX_METADATA_PAYLOAD {
            return; // the client refuses before reading it
        }
        let len = h.length as usize;
        if b.len() < len {
            return;
        }
        let (payload, rest) = b.split_at(len);
        b = rest;
        if !chunk(&h, payload) {
            return;
        }
    }
}

/// One chunk's payload; false where the client would drop the connection.
fn chunk(h: &ChunkHeader, payload: &[u8]) -> bool {
    match h.ty {
        REPLY_TYPE_OFFSET_DATA => payload.len() >= 9,
        REPLY_TYPE_OFFSET_HOLE => payload.len() == 12 && hole(payload),
        REPLY_TYPE_NONE => payload.is_empty() && h.flags & REPLY_FLAG_DONE != 0,
        REPLY_TYPE_BLOCK_STATUS => block_status(payload),
        t if t & REPLY_TYPE_ERROR_BIT != 0 => error_chunk(t, payload),
        _ => false,
    }
}

fn reply_header(b: &[u8]) {
    let Ok(h) = parse_reply_header(b) else {
        return;
    };
    let mut again = Vec::new();
    match h {
        ReplyHeader::Simple { error, cookie } => {
            assert_eq!(b.len(), SIMPLE_REPLY_LEN);
            again.extend_from_slice(&SIMPLE_REPLY_MAGIC.to_be_bytes());
            again.extend_from_slice(&error.to_be_bytes());
            again.extend_from_slice(&cookie.to_be_bytes());
        }
        ReplyHeader::Chunk(c) => {
            assert_eq!(b.len(), CHUNK_HEADER_LEN);
            again.extend_from_slice(&STRUCTURED_REPLY_MAGIC.to_be_bytes());
            again.extend_from_slice(&c.flags.to_be_bytes());
            again.extend_from_slice(&c.ty.to_be_bytes());
            again.extend_from_slice(&c.cookie.to_be_bytes());
            again.extend_from_slice(&c.length.to_be_bytes());
        }
    }
    assert_eq!(again, b, "{h:?} re-encodes differently");
}

fn hole(p: &[u8]) -> bool {
    let Ok((offset, size)) = parse_hole(p) else {
        return false;
    };
    assert!(size > 0);
    let mut again = offset.to_be_bytes().to_vec();
    again.extend_from_slice(&size.to_be_bytes());
    assert_eq!(again, p);
    true
}

fn error_chunk(ty: u16, p: &[u8]) -> bool {
    let Ok(e) = parse_error_chunk(ty, p) else {
        return false;
    };
    let errno = u32::from_be_bytes(p[..4].try_into().expect("4 bytes"));
    let msg_len = usize::from(u16::from_be_bytes([p[4], p[5]]));
    assert!(
        6 + msg_len <= p.len(),
        "message of {msg_len} bytes in {}",
        p.len()
    );
    assert_eq!(e.message, String::from_utf8_lossy(&p[6..6 + msg_len]));
    if errno == 0 {
        assert_eq!(e.errno, NbdErrno::Io, "errno 0 is not success");
    } else {
        assert_eq!(e.errno.to_wire(), errno);
    }
    let tail = &p[6 + msg_len..];
    match ty {
        REPLY_TYPE_ERROR_OFFSET => {
            assert_eq!(tail.len(), 8);
            let offset = u64::from_be_bytes(tail.try_into().expect("8 bytes"));
            assert_eq!(e.offset, Some(offset));
        }
        REPLY_TYPE_ERROR => {
            assert!(tail.is_empty());
            assert_eq!(e.offset, None);
        }
        _ => assert_eq!(e.offset, None),
    }
    true
}

fn block_status(p: &[u8]) -> bool {
    let Ok((context, extents)) = parse_block_status(p) else {
        return false;
    };
    assert!(!extents.is_empty());
    let mut again = context.to_be_bytes().to_vec();
    for (len, flags) in &extents {
        assert!(*len > 0, "zero-length extent");
        again.extend_from_slice(&len.to_be_bytes());
        again.extend_from_slice(&flags.to_be_bytes());
    }
    assert_eq!(again, p);
    true
}

fn info(p: &[u8]) {
    let Ok(i) = parse_info(p) else {
        return;
    };
    let ty = u16::from_be_bytes([p[0], p[1]]);
    let mut again = ty.to_be_bytes().to_vec();
    match i {
        Info::Export { size, flags } => {
            assert_eq!(ty, INFO_EXPORT);
            again.extend_from_slice(&size.to_be_bytes());
            again.extend_from_slice(&flags.to_be_bytes());
        }
        Info::BlockSize {
            minimum,
            preferred,
            maximum,
        } => {
            assert_eq!(ty, INFO_BLOCK_SIZE);
            assert!(minimum.is_power_of_two() && preferred >= minimum && maximum >= minimum);
            for v in [minimum, preferred, maximum] {
                again.extend_from_slice(&v.to_be_bytes());
            }
        }
        Info::Other => {
            assert!(
                ty != INFO_EXPORT && ty != INFO_BLOCK_SIZE,
                "info type {ty} ignored"
            );
            return;
        }
    }
    assert_eq!(again, p, "{i:?} re-encodes differently");
}

//! Client-level tests over scripted in-memory server byte streams: reassembly of
//! out-of-order and interleaved chunks, and property tests that arbitrary or malformed
//! server bytes produce an error (never a panic, never a hang: the script ends in EOF).

use std::io::Cursor;

use proptest::prelude::*;
use tokio::io::{Join, Sink};

use crate::handshake::{ExportInfo, MetaContext, MetaContextId, TransmissionFlags};
use crate::wire::*;
use crate::{ConnectOptions, NbdClient, ProtocolError, ReadError};

type Scripted = Join<Cursor<Vec<u8>>, Sink>;

const SIZE: u64 = 1 << 20;

fn info() -> ExportInfo {
    ExportInfo {
        name: String::new(),
        size: SIZE,
        flags: TransmissionFlags(1 | (1 << 2)),
        block_size: None,
        structured_replies: true,
        meta_contexts: vec![
            MetaContext {
                name: BASE_ALLOCATION.into(),
                id: MetaContextId(1),
            },
            MetaContext {
                name: "qemu:dirty-bitmap:b0".into(),
                id: MetaContextId(2),
            },
        ],
    }
}

fn client(script: Vec<u8>, max_request: u32, depth: usize) -> NbdClient<Scripted> {
    NbdClient::from_parts(
        tokio::io::join(Cursor::new(script), tokio::io::sink()),
        info(),
        max_request,
        depth,
    )
}

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

fn chunk(flags: u16, ty: u16, cookie: u64, payload: &[u8]) -> Vec<u8> {
    let mut v = STRUCTURED_REPLY_MAGIC.to_be_bytes().to_vec();
    v.extend_from_slice(&flags.to_be_bytes());
    v.extend_from_slice(&ty.to_be_bytes());
    v.extend_from_slice(&cookie.to_be_bytes());
    v.extend_from_slice(&(payload.len() as u32).to_be_bytes());
    v.extend_from_slice(payload);
    v
}

fn data(cookie: u64, offset: u64, bytes: &[u8], done: bool) -> Vec<u8> {
    let mut p = offset.to_be_bytes().to_vec();
    p.extend_from_slice(bytes);
    chunk(u16::from(done), REPLY_TYPE_OFFSET_DATA, cookie, &p)
}

fn hole(cookie: u64, offset: u64, len: u32, done: bool) -> Vec<u8> {
    let mut p = offset.to_be_bytes().to_vec();
    p.extend_from_slice(&len.to_be_bytes());
    chunk(u16::from(done), REPLY_TYPE_OFFSET_HOLE, cookie, &p)
}

fn status(cookie: u64, ctx: u32, extents: &[(u32, u32)], done: bool) -> Vec<u8> {
    let mut p = ctx.to_be_bytes().to_vec();
    for (l, f) in extents {
        p.extend_from_slice(&l.to_be_bytes());
        p.extend_from_slice(&f.to_be_bytes());
    }
    chunk(u16::from(done), REPLY_TYPE_BLOCK_STATUS, cookie, &p)
}

#[test]
fn pipelined_reads_reassemble_interleaved_out_of_order_chunks() {
    // Three 8-byte requests (cookies 1..=3) in flight at once; replies interleave and
    // arrive out of order; cookie 2 is half hole.
    let mut s = Vec::new();
    s.extend(data(3, 20, &[3; 4], false));
    s.extend(data(1, 4, &[1; 4], false));
    s.extend(hole(2, 8, 4, false));
    s.extend(data(3, 16, &[3; 4], true));
    s.extend(data(1, 0, &[1; 4], true));
    s.extend(data(2, 12, &[2; 4], false));
    s.extend(chunk(REPLY_FLAG_DONE, REPLY_TYPE_NONE, 2, &[]));
    let mut c = client(s, 8, 4);
    let mut buf = [0xffu8; 24];
    rt().block_on(c.read_into(&mut buf, 0)).unwrap();
    assert_eq!(buf[..8], [1; 8]);
    assert_eq!(buf[8..12], [0; 4]);
    assert_eq!(buf[12..16], [2; 4]);
    assert_eq!(buf[16..], [3; 8]);
    assert!(c.is_usable());
}

#[test]
fn read_error_chunk_is_reported_with_message_and_connection_stays_usable() {
    let mut p = 5u32.to_be_bytes().to_vec();
    p.extend_from_slice(&4u16.to_be_bytes());
    p.extend_from_slice(b"oops");
    let mut s = chunk(REPLY_FLAG_DONE, REPLY_TYPE_ERROR, 1, &p);
    s.extend(data(2, 0, &[7; 4], true));
    let mut c = client(s, 1 << 20, 1);
    let r = rt().block_on(c.read(0, 4));
    match r {
        Err(ReadError::Server { error, .. }) => {
            assert_eq!(error.errno, NbdErrno::Io);
            assert_eq!(error.message, "oops");
        }
        other => panic!("expected a server error, got {other:?}"),
    }
    assert!(c.is_usable());
    assert_eq!(rt().block_on(c.read(0, 4)).unwrap(), vec![7; 4]);
}

#[test]
fn overlapping_or_short_read_replies_are_protocol_errors() {
    let mut s = data(1, 0, &[1; 4], false);
    s.extend(data(1, 2, &[1; 4], true));
    let mut c = client(s, 1 << 20, 1);
    let r = rt().block_on(c.read(0, 8));
    assert!(
        matches!(
            r,
            Err(ReadError::Protocol(ProtocolError::ChunkOverlap { .. }))
        ),
        "{r:?}"
    );
    assert!(!c.is_usable());
    assert!(matches!(
        rt().block_on(c.read(0, 8)),
        Err(ReadError::Broken)
    ));

    let mut c = client(data(1, 0, &[1; 4], true), 1 << 20, 1);
    let r = rt().block_on(c.read(0, 8));
    assert!(
        matches!(
            r,
            Err(ReadError::Protocol(ProtocolError::IncompleteRead { .. }))
        ),
        "{r:?}"
    );

    let mut c = client(data(1, 6, &[1; 4], true), 1 << 20, 1);
    let r = rt().block_on(c.read(0, 8));
    assert!(
        matches!(
            r,
            Err(ReadError::Protocol(ProtocolError::ChunkOutOfRange { .. }))
        ),
        "{r:?}"
    );
}

#[test]
fn block_status_truncates_overlong_extents_and_walk_covers_short_replies() {
    // First reply covers only 4 KiB of the requested 64 KiB; second covers the rest and
    // reaches past it (truncated).
    let mut s = status(1, 1, &[(4096, 3)], false);
    s.extend(status(1, 2, &[(4096, 1)], true));
    s.extend(status(2, 1, &[(65536, 0)], false));
    s.extend(status(2, 2, &[(61440 + 512, 0)], true));
    let mut c = client(s, 1 << 20, 1);
    let rt = rt();
    let all = rt.block_on(c.extents(MetaContextId(2), 0..65536)).unwrap();
    assert_eq!(
        all,
        vec![
            crate::Extent {
                offset: 0,
                length: 4096,
                flags: 1
            },
            crate::Extent {
                offset: 4096,
                length: 61440,
                flags: 0
            },
        ]
    );
}

#[test]
fn block_status_with_zero_length_extent_is_a_protocol_error_not_a_loop() {
    let mut s = status(1, 1, &[(0, 3)], false);
    s.extend(status(1, 2, &[(4096, 1)], true));
    let mut c = client(s, 1 << 20, 1);
    let r = rt().block_on(c.dirty_ranges(MetaContextId(2), 0..SIZE));
    assert!(
        matches!(
            r,
            Err(crate::BlockStatusError::Protocol(
                ProtocolError::ZeroLengthExtent
            ))
        ),
        "{r:?}"
    );
}

/// A server message: mostly well framed (so the fuzzer gets past the magic), sometimes junk.
fn message() -> impl Strategy<Value = Vec<u8>> {
    let framed = (
        any::<bool>(),
        prop_oneof![
            Just(0u16),
            Just(1),
            Just(2),
            Just(5),
            Just(0x8001),
            Just(0x8002),
            any::<u16>()
        ],
        0u64..5,
        proptest::collection::vec(any::<u8>(), 0..40),
        proptest::option::of(0u64..64),
    )
        .prop_map(|(done, ty, cookie, mut payload, offset)| {
            if let Some(off) = offset {
                let mut p = off.to_be_bytes().to_vec();
                p.append(&mut payload);
                payload = p;
            }
            chunk(u16::from(done), ty, cookie, &payload)
        });
    let simple = (any::<u32>(), 0u64..5).prop_map(|(err, cookie)| {
        let mut v = SIMPLE_REPLY_MAGIC.to_be_bytes().to_vec();
        v.extend_from_slice(&(err % 3).to_be_bytes());
        v.extend_from_slice(&cookie.to_be_bytes());
        v
    });
    prop_oneof![6 => framed, 1 => simple, 1 => proptest::collection::vec(any::<u8>(), 0..24)]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn any_server_bytes_give_a_result_never_a_panic(
        msgs in proptest::collection::vec(message(), 0..8),
        depth in 1usize..4,
        max_request in prop_oneof![Just(16u32), Just(64), Just(4096)],
    ) {
        let script: Vec<u8> = msgs.concat();
        let rt = rt();
        let mut c = client(script.clone(), max_request, depth);
        let mut buf = vec![0u8; 64];
        let _ = rt.block_on(c.read_into(&mut buf, 0));
        let mut c = client(script.clone(), max_request, depth);
        let _ = rt.block_on(c.dirty_ranges(MetaContextId(2), 0..SIZE));
        let mut c = client(script.clone(), max_request, depth);
        let _ = rt.block_on(c.write(&[1; 40], 8));
        let mut c = client(script, max_request, depth);
        let _ = rt.block_on(c.flush());
    }

    #[test]
    fn any_handshake_bytes_give_a_result_never_a_panic(
        tail in proptest::collection::vec(any::<u8>(), 0..200),
        prefix in 0usize..3,
    ) {
        let mut script = Vec::new();
        if prefix >= 1 { script.extend_from_slice(b"NBDMAGICIHAVEOPT\x00\x03"); }
        if prefix >= 2 {
            // ack structured replies, then fuzz the meta context / GO replies
            script.extend_from_slice(&0x0003_e889_0455_65a9u64.to_be_bytes());
            script.extend_from_slice(&8u32.to_be_bytes());
            script.extend_from_slice(&1u32.to_be_bytes());
            script.extend_from_slice(&0u32.to_be_bytes());
        }
        script.extend_from_slice(&tail);
        let stream = tokio::io::join(Cursor::new(script), tokio::io::sink());
        let opts = ConnectOptions::new("x").with_base_allocation();
        let _ = rt().block_on(NbdClient::handshake(stream, &opts));
    }
}

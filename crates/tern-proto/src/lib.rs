//! tern's agent-to-agent wire protocol: frames, messages, versions and error codes.
//!
//! Pure functions over bytes: no sockets, no clocks, no QEMU. The agents own the I/O
//! (`tern-agent`), this crate owns what the bytes mean. docs/protocol.md is the normative
//! description; this module doc is the short version.
//!
//! ```text
//!  source agent                                   destination agent
//!  ------------                                   -----------------
//!  Hello{min,max,agent}            ------------>
//!                                  <------------  HelloAck{version,agent}
//!  Prepare{id,spec,running,qemu}   ------------>  starts QEMU -incoming defer (-S)
//!                                  <------------  Summary{key id, hash prefixes}+ (v2)
//!                                  <------------  Prepared{qemu}
//!  QemuBytes / RamBlocks / Pages   ============>  rebuilds QEMU's stream, in order
//!    (pages: zero, raw, ref, delta)
//!                                  <============  ReturnPath (PONG, SHUT, ...)
//!                                  <------------  Want{hashes}    (v2, rare: a ref missed)
//!  Content{hash, bytes}            ------------>
//!
//!  parallel streams (v2): extra connections, each Hello / HelloAck, Attach{id, index},
//!  then data frames each preceded by Seq{n}; the destination applies them in n order.
//!  SourceDone{digest}              ------------>  compares digests, QEMU loaded
//!                                  <------------  ReadyToResume{digest}
//!  Commit          (switchover point: the source will never resume after this)
//!                                  ------------>  cont
//!                                  <------------  Resumed{at}
//!  either side, any time before Commit:  Abort{code,message}
//!
//!  no Resumed after Commit? on a new connection:
//!  Hello / HelloAck, Query{id}      ------------>
//!                                  <------------  QueryAnswer{state, resumed_at}
//! ```
//!
//! A frame is `u8 type | u8 flags | be32 payload length | payload`; flags 1 and 2 (v2)
//! mean the payload is `be32 raw length + lz4 / zstd block`, 0 that it is plain. Type 0 is reserved
//! as invalid. Integers are big-endian, strings are `be16 length + UTF-8`, byte strings
//! `be32 length + bytes`. A receiver rejects unknown types, unknown flags, lengths above
//! [`MAX_PAYLOAD`] and payloads with bytes left over.
#![forbid(unsafe_code)]

pub mod compression;
pub mod conversation;
pub mod error;
pub mod frame;
pub mod limits;
pub mod message;
pub mod version;

pub use compression::{Codec, Compressed, FrameCompressor};
pub use error::{ErrorCode, MigrationState};
pub use frame::{
    decode, encode, encode_segments, frame_len, stream_units, FrameError, HEADER_LEN, MAX_PAYLOAD,
};
pub use message::{
    Blocktime, CardAddress, ContentHash, DiskInfo, Location, Message, MessageType, Page, PageBody,
    RamBlock, DISK_DIRECT,
};
pub use version::{negotiate, MIN_PROTOCOL_VERSION, PROTOCOL_VERSION};

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::{Bytes, BytesMut};
    use proptest::prelude::*;

    fn roundtrip(m: &Message) -> Message {
        let mut b = BytesMut::new();
        encode(m, &mut b);
        let got = decode(&mut b).unwrap().unwrap();
        assert!(b.is_empty(), "decode left {} bytes", b.len());
        got
    }

    fn all_messages() -> Vec<Message> {
        vec![
            Message::Hello {
                min_version: 1,
                max_version: 3,
                agent: "host-a".into(),
            },
            Message::HelloAck {
                version: 1,
                agent: "host-b".into(),
            },
            Message::Prepare {
                migration_id: "m-1".into(),
                spec_toml: "name = \"vm\"\n".into(),
                source_running: true,
                qemu_version: "10.0.2".into(),
            },
            Message::Prepared {
                qemu_version: "10.0.2".into(),
            },
            Message::QemuBytes(Bytes::from_static(b"\x01\x02")),
            Message::RamBlocks {
                page_size: 4096,
                blocks: vec![RamBlock {
                    name: "pc.ram".into(),
                    used_length: 1 << 29,
                }],
            },
            Message::Pages {
                block: 3,
                pages: vec![
                    Page {
                        offset: 0,
                        body: PageBody::Zero { fill: 0 },
                    },
                    Page {
                        offset: 4096,
                        body: PageBody::Raw(Bytes::from(vec![7u8; 4096])),
                    },
                ],
            },
            Message::ReturnPath(Bytes::from_static(b"\x00\x01\x00\x04\x00\x00\x00\x00")),
            Message::SourceDone {
                digest: [9; 32],
                pages: 77,
                commit: false,
            },
            Message::SourceDone {
                digest: [9; 32],
                pages: 77,
                commit: true,
            },
            Message::ReadyToResume { digest: [8; 32] },
            Message::Commit,
            Message::Resumed {
                resumed_unix_us: 1_700_000_000_000_000,
            },
            Message::Abort {
                code: ErrorCode::DigestMismatch,
                message: "differs".into(),
            },
            Message::Abort {
                code: ErrorCode::Unknown(999),
                message: String::new(),
            },
            Message::Query {
                migration_id: "m-1".into(),
            },
            Message::QueryAnswer {
                state: MigrationState::Running,
                resumed_unix_us: 5,
            },
            Message::QueryAnswer {
                state: MigrationState::Discarded,
                resumed_unix_us: 0,
            },
            Message::Pages {
                block: 3,
                pages: vec![
                    Page {
                        offset: 4096,
                        body: PageBody::Ref([5; 16]),
                    },
                    Page {
                        offset: 8192,
                        body: PageBody::Delta {
                            result: [6; 16],
                            diff: Bytes::from_static(b"\x00\x02ab"),
                        },
                    },
                ],
            },
            Message::Summary {
                key_id: 77,
                prefixes: vec![1, u64::MAX, 0],
            },
            Message::Summary {
                key_id: 0,
                prefixes: vec![],
            },
            Message::Want {
                hashes: vec![[1; 16], [2; 16]],
            },
            Message::Content {
                pages: vec![
                    ([3; 16], Bytes::from(vec![9u8; 4096])),
                    ([4; 16], Bytes::new()),
                ],
            },
            Message::DiskOffer {
                disks: vec![
                    DiskInfo {
                        virtual_size: 1 << 30,
                        allocated: 5 << 20,
                    },
                    DiskInfo {
                        virtual_size: 0,
                        allocated: 0,
                    },
                ],
            },
            Message::DiskOffer { disks: vec![] },
            Message::DiskManifest {
                disk: 1,
                piece: 7,
                manifest: Bytes::from_static(b"manifest bytes"),
            },
            Message::DiskWant {
                disk: 0,
                piece: 3,
                runs: vec![(4096, 2), (1 << 40, u32::MAX)],
            },
            Message::DiskWant {
                disk: 0,
                piece: 4,
                runs: vec![],
            },
            Message::DiskData {
                disk: 2,
                piece: DISK_DIRECT,
                offset: 8192,
                data: Bytes::from(vec![1u8; 8192]),
            },
            Message::DiskRoundEnd {
                disk: 0,
                round: 5,
                last: false,
            },
            Message::DiskRoundEnd {
                disk: 1,
                round: 9,
                last: true,
            },
            Message::DiskRoundDone {
                disk: 0,
                round: 5,
                written: 12345,
            },
            Message::TpmKey { key: [7; 32] },
            Message::Tunnel {
                domain: "web-1".into(),
            },
            Message::TunnelOpen,
            Message::TunnelBytes(Bytes::from_static(b"\x25\x60\x95\x13nbd")),
            Message::Locations {
                entries: vec![
                    Location {
                        network: "lab".into(),
                        mac: [0x52, 0x54, 0, 1, 2, 3],
                        vtep: std::net::Ipv4Addr::new(198, 18, 1, 1),
                        seq: u64::MAX,
                    },
                    Location {
                        network: "x".into(),
                        mac: [0; 6],
                        vtep: std::net::Ipv4Addr::UNSPECIFIED,
                        seq: 0,
                    },
                ],
            },
            Message::Locations { entries: vec![] },
            Message::Addresses {
                entries: vec![CardAddress {
                    network: "lab".into(),
                    mac: [0x52, 0x54, 0, 1, 2, 3],
                    ip: std::net::Ipv4Addr::new(198, 19, 0, 2),
                }],
            },
            Message::Addresses { entries: vec![] },
            Message::PlanQuery {
                key_id: 9,
                hashes: vec![[3; 16], [4; 16]],
                chunks: vec![[5; 16]],
            },
            Message::PlanQuery {
                key_id: 9,
                hashes: vec![],
                chunks: vec![],
            },
            Message::PlanHeld {
                held: 1,
                chunks_held: 0,
            },
            Message::ProbeBytes(Bytes::from(vec![0u8; 4096])),
            Message::ProbeEnd,
            Message::ProbeResult {
                bytes: 1 << 20,
                micros: 250_000,
            },
            Message::PostcopyFaults {
                requests: 3,
                pages: 5,
                blocktime: None,
                local: 0,
            },
            Message::PostcopyFaults {
                requests: 3,
                pages: 5,
                blocktime: Some(Blocktime {
                    all_vcpus_ms: 7,
                    max_vcpu_ms: 11,
                }),
                local: 2,
            },
            Message::PostcopyFaults {
                requests: 3,
                pages: 5,
                blocktime: None,
                local: u64::MAX,
            },
        ]
    }

    #[test]
    fn postcopy_faults_local_is_an_optional_trailing_field() {
        let v12 = Message::PostcopyFaults {
            requests: 3,
            pages: 5,
            blocktime: None,
            local: 0,
        };
        let mut short = BytesMut::new();
        encode(&v12, &mut short);
        let v13 = Message::PostcopyFaults {
            requests: 3,
            pages: 5,
            blocktime: None,
            local: 4,
        };
        let mut long = BytesMut::new();
        encode(&v13, &mut long);
        // v13 = the v12 frame (length aside) + be64 local
        assert_eq!(long.len(), short.len() + 8);
        assert_eq!(long[6..short.len()], short[6..]);
        assert_eq!(long[short.len()..], 4u64.to_be_bytes());
        // a byte past local is still refused
        let mut b = long.clone();
        b.extend_from_slice(&[0]);
        let len = u32::from_be_bytes(b[2..6].try_into().unwrap()) + 1;
        b[2..6].copy_from_slice(&len.to_be_bytes());
        assert_eq!(
            decode(&mut b),
            Err(FrameError::Trailing(1, "PostcopyFaults"))
        );
        // a partial local is short, not zero
        let mut b = long.clone();
        b.truncate(b.len() - 1);
        let len = u32::from_be_bytes(b[2..6].try_into().unwrap()) - 1;
        b[2..6].copy_from_slice(&len.to_be_bytes());
        assert!(matches!(
            decode(&mut b),
            Err(FrameError::Short {
                msg: "PostcopyFaults",
                ..
            })
        ));
    }

    #[test]
    fn every_message_roundtrips() {
        for m in all_messages() {
            assert_eq!(roundtrip(&m), m);
        }
    }

    #[test]
    fn segments_hold_the_same_bytes_and_share_page_data() {
        for m in all_messages() {
            let mut whole = BytesMut::new();
            encode(&m, &mut whole);
            let mut scratch = BytesMut::new();
            let mut segs = Vec::new();
            encode_segments(&m, &mut scratch, &mut segs);
            let mut joined: Vec<u8> = segs.iter().flat_map(|s| s.iter().copied()).collect();
            joined.extend_from_slice(&scratch);
            assert_eq!(joined, &whole[..], "{}", m.name());
            if let Message::Pages { pages, .. } = &m {
                for p in pages {
                    if let PageBody::Raw(d) = &p.body {
                        assert!(
                            segs.iter().any(|s| s.as_ptr() == d.as_ptr()),
                            "page data was copied"
                        );
                    }
                }
            }
        }
        // a string longer than 64 KiB is cut, and the length prefix agrees with the cut
        let long = "é".repeat(40_000);
        let m = Message::Abort {
            code: ErrorCode::Internal,
            message: long,
        };
        let mut b = BytesMut::new();
        encode(&m, &mut b);
        assert!(matches!(decode(&mut b), Ok(Some(Message::Abort { .. }))));
    }

    #[test]
    fn partial_frames_need_more_bytes() {
        for m in all_messages() {
            let mut full = BytesMut::new();
            encode(&m, &mut full);
            for cut in 0..full.len() {
                let mut b = BytesMut::from(&full[..cut]);
                assert_eq!(decode(&mut b), Ok(None), "{} cut at {cut}", m.name());
            }
        }
    }

    #[test]
    fn bad_frames_are_rejected() {
        let mut b = BytesMut::from(&[0u8, 0, 0, 0, 0, 0][..]);
        assert_eq!(decode(&mut b), Err(FrameError::UnknownType(0)));
        let mut b = BytesMut::from(&[200u8, 0, 0, 0, 0, 0][..]);
        assert_eq!(decode(&mut b), Err(FrameError::UnknownType(200)));
        let mut b = BytesMut::from(
            &[
                MessageType::QueryAnswer.tag(),
                0,
                0,
                0,
                0,
                9,
                7,
                0,
                0,
                0,
                0,
                0,
                0,
                0,
                0,
            ][..],
        );
        assert!(matches!(
            decode(&mut b),
            Err(FrameError::Invalid {
                what: "migration state",
                ..
            })
        ));
        let mut b = BytesMut::from(&[MessageType::Commit.tag(), 0x80, 0, 0, 0, 0][..]);
        assert_eq!(
            decode(&mut b),
            Err(FrameError::BadFlags(MessageType::Commit.tag(), 0x80))
        );
        // a compressed payload too short to hold its length
        let mut b = BytesMut::from(&[MessageType::Commit.tag(), 1, 0, 0, 0, 0][..]);
        assert!(matches!(decode(&mut b), Err(FrameError::Invalid { .. })));
        let mut b = BytesMut::from(&[MessageType::QemuBytes.tag(), 0, 0xff, 0xff, 0xff, 0xff][..]);
        assert!(matches!(decode(&mut b), Err(FrameError::TooLarge(_))));
        let mut b = BytesMut::from(&[MessageType::Commit.tag(), 0, 0, 0, 0, 1, 5][..]);
        assert_eq!(decode(&mut b), Err(FrameError::Trailing(1, "Commit")));
        let mut b = BytesMut::from(&[MessageType::Resumed.tag(), 0, 0, 0, 0, 2, 0, 0][..]);
        assert!(matches!(
            decode(&mut b),
            Err(FrameError::Short { msg: "Resumed", .. })
        ));
        // a page record with an unknown kind
        let mut b = BytesMut::from(
            &[
                MessageType::Pages.tag(),
                0,
                0,
                0,
                0,
                15,
                0,
                0,
                0,
                0,
                0,
                1,
                0,
                0,
                0,
                0,
                0,
                0,
                0,
                0,
                9,
            ][..],
        );
        assert!(matches!(
            decode(&mut b),
            Err(FrameError::Invalid {
                what: "page kind",
                ..
            })
        ));
    }

    #[test]
    fn version_negotiation_picks_newest_common() {
        assert_eq!(negotiate(1, 1), Some(1));
        assert_eq!(negotiate(1, 9), Some(9));
        assert_eq!(negotiate(1, 10), Some(10));
        assert_eq!(negotiate(1, 11), Some(11));
        assert_eq!(negotiate(1, 12), Some(12));
        assert_eq!(negotiate(1, 13), Some(PROTOCOL_VERSION));
        assert_eq!(negotiate(PROTOCOL_VERSION + 1, PROTOCOL_VERSION + 5), None);
        assert_eq!(negotiate(0, 0), None);
    }

    #[test]
    fn error_codes_are_stable() {
        for c in 1..=15u16 {
            assert_eq!(ErrorCode::from_u16(c).to_u16(), c);
            assert_ne!(ErrorCode::from_u16(c).name(), "unknown");
        }
        assert_eq!(ErrorCode::from_u16(10), ErrorCode::DigestMismatch);
        assert!(!ErrorCode::StreamUnsupported.retryable());
        assert!(ErrorCode::Timeout.retryable());
    }

    #[test]
    fn compressible_frames_shrink_and_bad_compressed_payloads_are_errors() {
        let m = Message::QemuBytes(Bytes::from(vec![b'a'; 100_000]));
        for codec in [Codec::Lz4, Codec::Zstd(3)] {
            let mut b = BytesMut::new();
            let r = FrameCompressor::default().encode(&m, codec, &mut b);
            assert!(r.wire < 2000, "{codec:?}: {} bytes", r.wire);
            assert_ne!(b[1], 0, "flags name the codec");
            let mut bad = b.clone();
            let n = bad.len();
            bad[n - 3] ^= 0xff;
            bad[n - 2] ^= 0xff;
            // a corrupted body either fails to decompress or decompresses to other bytes
            match decode(&mut bad) {
                Err(FrameError::Invalid { .. }) => {}
                Ok(Some(got)) => assert_ne!(got, m),
                other => panic!("{codec:?}: {other:?}"),
            }
            let mut lie = b.clone();
            lie[6..10].copy_from_slice(&(MAX_PAYLOAD as u32 + 1).to_be_bytes());
            assert_eq!(decode(&mut lie), Err(FrameError::TooLarge(MAX_PAYLOAD + 1)));
            assert_eq!(decode(&mut b).unwrap().unwrap(), m);
        }
        let mut b = BytesMut::new();
        encode(&m, &mut b);
        b[1] = 3;
        assert_eq!(
            decode(&mut b),
            Err(FrameError::BadFlags(MessageType::QemuBytes.tag(), 3))
        );
    }

    proptest! {
        #[test]
        fn decode_never_panics(data in proptest::collection::vec(any::<u8>(), 0..300)) {
            let mut b = BytesMut::from(&data[..]);
            while let Ok(Some(_)) = decode(&mut b) {}
        }

        #[test]
        fn pages_roundtrip(pages in proptest::collection::vec(
            (any::<u64>(), prop_oneof![
                any::<u8>().prop_map(|fill| PageBody::Zero { fill }),
                proptest::collection::vec(any::<u8>(), 0..64).prop_map(|v| PageBody::Raw(Bytes::from(v))),
                any::<[u8; 16]>().prop_map(PageBody::Ref),
                (any::<[u8; 16]>(), proptest::collection::vec(any::<u8>(), 0..64))
                    .prop_map(|(result, d)| PageBody::Delta { result, diff: Bytes::from(d) }),
                proptest::collection::vec(any::<u8>(), 0..64).prop_map(|v| PageBody::Plain(Bytes::from(v))),
                (any::<u8>(), any::<u32>()).prop_map(|(fill, pages)| PageBody::ZeroRun { fill, pages }),
            ]), 0..20), block in any::<u16>()) {
            let m = Message::Pages { block, pages: pages.into_iter().map(|(offset, body)| Page { offset, body }).collect() };
            prop_assert_eq!(roundtrip(&m), m);
        }

        #[test]
        fn compressed_frames_decode_to_the_same_message(
            data in proptest::collection::vec(0u8..4, 0..20000),
            codec in prop_oneof![Just(Codec::None), Just(Codec::Lz4), (1i32..6).prop_map(Codec::Zstd)],
        ) {
            let m = Message::Pages { block: 1, pages: vec![Page { offset: 0, body: PageBody::Raw(Bytes::from(data)) }] };
            let mut c = FrameCompressor::default();
            let mut b = BytesMut::new();
            let r = c.encode(&m, codec, &mut b);
            prop_assert_eq!(r.wire, b.len());
            prop_assert!(r.wire <= r.raw + HEADER_LEN);
            prop_assert_eq!(decode(&mut b).unwrap().unwrap(), m);
            prop_assert!(b.is_empty());
        }

        #[test]
        fn byte_at_a_time_decodes_the_same(split in 0usize..64) {
            let msgs = all_messages();
            let mut all = BytesMut::new();
            for m in &msgs { encode(m, &mut all); }
            let mut got = Vec::new();
            let mut buf = BytesMut::new();
            for chunk in all.chunks(split + 1) {
                buf.extend_from_slice(chunk);
                while let Some(m) = decode(&mut buf).unwrap() { got.push(m); }
            }
            prop_assert_eq!(got, msgs);
        }
    }
}

//! Golden bytes per protocol version: every message type a version has, encoded as this
//! build encodes it, must equal the bytes committed under `tests/golden/vN/` (what agents of
//! that version send and expect), and those bytes must decode to the same message. A change
//! that alters a frame of a version already out fails here; a new version gets its own
//! directory (`cargo test -p tern-proto --test golden -- --ignored write_golden` writes
//! the missing files and never rewrites existing ones).

use std::path::PathBuf;

use bytes::{Bytes, BytesMut};
use tern_proto::{
    decode, encode, Blocktime, CardAddress, Codec, DiskInfo, ErrorCode, FrameCompressor, Location,
    Message, MessageType, MigrationState, Page, PageBody, RamBlock, DISK_DIRECT, PROTOCOL_VERSION,
};

/// One message of each type, with fixed contents, as version `v` sends it.
fn canonical(v: u16) -> Vec<Message> {
    let all = vec![
        Message::Hello {
            min_version: 1,
            max_version: v,
            agent: "host-a".into(),
        },
        Message::HelloAck {
            version: v,
            agent: "host-b".into(),
        },
        Message::Prepare {
            migration_id: "m0123456789ab".into(),
            spec_toml: "name = \"vm\"\nmemory_mib = 64\n".into(),
            source_running: true,
            qemu_version: "10.0.2".into(),
        },
        Message::Prepared {
            qemu_version: "10.0.2".into(),
        },
        Message::QemuBytes(Bytes::from_static(b"QEVM\x00\x00\x00\x03")),
        Message::RamBlocks {
            page_size: 4096,
            blocks: vec![
                RamBlock {
                    name: "pc.ram".into(),
                    used_length: 64 << 20,
                },
                RamBlock {
                    name: "pc.bios".into(),
                    used_length: 256 << 10,
                },
            ],
        },
        Message::Pages {
            block: 0,
            pages: {
                let mut p = vec![
                    Page {
                        offset: 0,
                        body: PageBody::Zero { fill: 0 },
                    },
                    Page {
                        offset: 4096,
                        body: PageBody::Raw(Bytes::from(
                            (0..4096u32).map(|i| i as u8).collect::<Vec<_>>(),
                        )),
                    },
                ];
                if v >= 2 {
                    p.push(Page {
                        offset: 8192,
                        body: PageBody::Ref([0x11; 16]),
                    });
                    p.push(Page {
                        offset: 12288,
                        body: PageBody::Delta {
                            result: [0x22; 16],
                            diff: Bytes::from_static(&[3, 2, 0xaa, 0xbb]),
                        },
                    });
                }
                if v >= 5 {
                    p.push(Page {
                        offset: 16384,
                        body: PageBody::Plain(Bytes::from(vec![0x5a; 4096])),
                    });
                    p.push(Page {
                        offset: 20480,
                        body: PageBody::ZeroRun {
                            fill: 0,
                            pages: 300,
                        },
                    });
                }
                p
            },
        },
        Message::ReturnPath(Bytes::from_static(b"\x00\x03\x00\x04\x00\x00\x00\x01")),
        Message::SourceDone {
            digest: [0x5a; 32],
            pages: 16384,
            commit: v >= 2,
        },
        Message::ReadyToResume { digest: [0x5a; 32] },
        Message::Commit,
        Message::Resumed {
            resumed_unix_us: 1_796_000_000_000_000,
        },
        Message::Abort {
            code: ErrorCode::DigestMismatch,
            message: "memory digest mismatch".into(),
        },
        Message::Query {
            migration_id: "m0123456789ab".into(),
        },
        Message::QueryAnswer {
            state: MigrationState::Running,
            resumed_unix_us: 1_796_000_000_000_000,
        },
        Message::Summary {
            key_id: 0x0102_0304_0506_0708,
            prefixes: vec![1, 2, u64::MAX],
        },
        Message::Want {
            hashes: vec![[0x33; 16], [0x44; 16]],
        },
        Message::Content {
            pages: vec![([0x33; 16], Bytes::from(vec![9u8; 4096]))],
        },
        Message::Attach {
            migration_id: "m0123456789ab".into(),
            index: 2,
        },
        Message::Seq { seq: 41 },
        Message::Applied { units: 1 << 30 },
        Message::DiskOffer {
            disks: vec![DiskInfo {
                virtual_size: 1 << 30,
                allocated: 123 << 20,
            }],
        },
        Message::DiskManifest {
            disk: 0,
            piece: 3,
            manifest: Bytes::from_static(b"TM\x01manifest-bytes"),
        },
        Message::DiskWant {
            disk: 0,
            piece: 3,
            runs: vec![(12 << 20, 4), ((12 << 20) + 65536, 1)],
        },
        Message::DiskData {
            disk: 1,
            piece: DISK_DIRECT,
            offset: 1 << 20,
            data: Bytes::from(vec![7u8; 8192]),
        },
        Message::DiskRoundEnd {
            disk: 0,
            round: 2,
            last: true,
        },
        Message::DiskRoundDone {
            disk: 0,
            round: 2,
            written: 8192,
        },
        Message::TpmKey { key: [0x77; 32] },
        Message::Tunnel {
            domain: "web-1".into(),
        },
        Message::TunnelOpen,
        Message::TunnelBytes(Bytes::from_static(b"\x25\x60\x95\x13nbd")),
        Message::Locations {
            entries: vec![Location {
                network: "lab".into(),
                mac: [0x52, 0x54, 0, 0x12, 0x34, 0x56],
                vtep: std::net::Ipv4Addr::new(198, 18, 2, 1),
                seq: 1_765_000_000_000_000,
            }],
        },
        Message::Addresses {
            entries: vec![CardAddress {
                network: "lab".into(),
                mac: [0x52, 0x54, 0, 0x12, 0x34, 0x56],
                ip: std::net::Ipv4Addr::new(198, 19, 0, 2),
            }],
        },
        Message::PlanQuery {
            key_id: 0x7e57_0000_0000_0009,
            hashes: vec![[0x5a; 16]],
            chunks: vec![[0xa5; 16]],
        },
        Message::PlanHeld {
            held: 1,
            chunks_held: 1,
        },
        Message::ProbeBytes(Bytes::from(vec![0u8; 64])),
        Message::ProbeEnd,
        Message::ProbeResult {
            bytes: 8 << 20,
            micros: 700_000,
        },
        Message::PostcopyOffer,
        Message::PostcopyRun,
        Message::PostcopyResume {
            migration_id: "m0123456789ab".into(),
        },
        Message::PostcopyResumed,
        Message::PostcopyFaults {
            requests: 1234,
            pages: 1300,
            blocktime: Some(Blocktime {
                all_vcpus_ms: 87,
                max_vcpu_ms: 912,
            }),
            local: if v >= 13 { 421 } else { 0 },
        },
    ];
    assert_eq!(all.len(), MessageType::ALL.len(), "one message per type");
    all.into_iter().filter(|m| m.kind().since() <= v).collect()
}

fn dir(v: u16) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/golden")
        .join(format!("v{v}"))
}

fn file(v: u16, m: &Message) -> PathBuf {
    dir(v).join(format!("{:02}-{}.bin", m.tag(), m.name()))
}

fn bytes_of(m: &Message) -> Vec<u8> {
    let mut b = BytesMut::new();
    encode(m, &mut b);
    b.to_vec()
}

#[test]
fn every_version_keeps_its_bytes() {
    for v in 1..=PROTOCOL_VERSION {
        for m in canonical(v) {
            let path = file(v, &m);
            let want = std::fs::read(&path).unwrap_or_else(|e| {
                panic!(
                    "{}: {e} (a new version or message: run the ignored write_golden test)",
                    path.display()
                )
            });
            assert_eq!(bytes_of(&m), want, "v{v} {} encodes differently", m.name());
            let mut b = BytesMut::from(&want[..]);
            assert_eq!(
                decode(&mut b).unwrap().as_ref(),
                Some(&m),
                "v{v} {}",
                m.name()
            );
            assert!(b.is_empty());
        }
        // nothing committed that this build does not know
        let known: Vec<PathBuf> = canonical(v).iter().map(|m| file(v, m)).collect();
        for e in std::fs::read_dir(dir(v)).unwrap().flatten() {
            assert!(
                known.contains(&e.path()),
                "unexpected golden file {}",
                e.path().display()
            );
        }
    }
}

#[test]
fn v12_postcopy_faults_decode_with_local_zero_and_local_zero_encodes_as_v12() {
    // v13's `local` is an optional trailing field: a v12 frame ends before it
    let m = canonical(12)
        .into_iter()
        .find(|m| m.kind() == MessageType::PostcopyFaults)
        .unwrap();
    let Message::PostcopyFaults { local, .. } = m else {
        unreachable!()
    };
    assert_eq!(local, 0);
    let v12 = std::fs::read(file(12, &m)).unwrap();
    let mut b = BytesMut::from(&v12[..]);
    let got = decode(&mut b).unwrap().unwrap();
    assert!(b.is_empty());
    assert!(matches!(got, Message::PostcopyFaults { local: 0, .. }));
    assert_eq!(got, m);
    assert_eq!(bytes_of(&got), v12, "local 0 encodes as v12");
    // the v13 frame is the v12 one with be64 local after it
    let m13 = canonical(13)
        .into_iter()
        .find(|m| m.kind() == MessageType::PostcopyFaults)
        .unwrap();
    let v13 = std::fs::read(file(13, &m13)).unwrap();
    assert_eq!(v13.len(), v12.len() + 8);
    assert_eq!(v13[..2], v12[..2]);
    assert_eq!(v13[6..v12.len()], v12[6..]);
    assert_eq!(v13[v12.len()..], 421u64.to_be_bytes());
}

#[test]
fn compressed_golden_frames_still_decode() {
    // the compressed form may change with the compressor; what it decodes to may not
    for v in 2..=PROTOCOL_VERSION {
        for m in canonical(v) {
            for codec in [Codec::Lz4, Codec::Zstd(3)] {
                let mut b = BytesMut::new();
                FrameCompressor::default().encode(&m, codec, &mut b);
                assert_eq!(decode(&mut b).unwrap(), Some(m.clone()));
            }
        }
    }
}

#[test]
#[ignore = "writes the golden files of a new version; existing ones are never rewritten"]
fn write_golden() {
    for v in 1..=PROTOCOL_VERSION {
        std::fs::create_dir_all(dir(v)).unwrap();
        for m in canonical(v) {
            let path = file(v, &m);
            if !path.exists() {
                std::fs::write(&path, bytes_of(&m)).unwrap();
            }
        }
    }
}

//! The seed corpus: valid encodings of everything the targets decode, so that mutations
//! start from real structure. `fuzz/corpus/<target>/` holds what [`all`] returns; it is
//! regenerated with
//!
//! ```text
//! cargo test -p tern-fuzz --test corpus -- --ignored write_seed_corpus
//! ```
//!
//! (no QEMU here: the stream seeds are built by hand like the codec's unit tests, the
//! post-copy ones with tern-qemu's own encoders, `Encoder` and `encode_rp`, in the shapes
//! of shared/reference/qemu-stream.md §8-9; the captured real streams of
//! `tern-qemu/tests/stream_capture.rs` are not kept in the tree).

use bytes::{Bytes, BytesMut};
use tern_chunks::{Manifest, BLOCK_BYTES, BLOCK_SIZE};
use tern_proto::{
    encode, Codec, DiskInfo, ErrorCode, FrameCompressor, Message, MigrationState, Page, PageBody,
    RamBlock, DISK_DIRECT,
};
use tern_qemu::rp::{encode_rp, recv_bitmap_len, RpMessage};
use tern_qemu::stream::{
    cmd, DiscardRange, Encoder, Item, NameMode, Package, PostcopyCommand, RamBlockInfo, RamRecord,
    SectionHeader, SectionKind,
};
use tern_store::delta;

use crate::{index_file, nbd, pages, rebuild, stream};

/// One seed file: its name in the target's corpus directory and its bytes.
pub type Seed = (String, Vec<u8>);

/// Every target's seeds, by target name.
pub fn all() -> Vec<(&'static str, Vec<Seed>)> {
    vec![
        ("frames", frames()),
        ("stream_parser", stream_parser()),
        ("delta_apply", delta_apply()),
        ("manifest_decode", manifest_decode()),
        ("chunk_index_file", chunk_index_file()),
        ("nbd_replies", nbd_replies()),
        ("qmp_line", qmp_line()),
        ("page_decode", page_decode()),
        ("chunks_rebuild", chunks_rebuild()),
        (
            "disk_worker",
            chunks_rebuild()
                .into_iter()
                .filter(|(name, _)| name.starts_with("worker"))
                .collect(),
        ),
    ]
}

fn frame(m: &Message) -> Vec<u8> {
    let mut b = BytesMut::new();
    encode(m, &mut b);
    b.to_vec()
}

fn frames_of(ms: &[Message]) -> Vec<u8> {
    ms.iter().flat_map(frame).collect()
}

fn seed(name: impl Into<String>, bytes: Vec<u8>) -> Seed {
    (name.into(), bytes)
}

/// A page-like pattern of `n` bytes.
fn pattern(n: usize, k: u8) -> Vec<u8> {
    (0..n)
        .map(|i| ((i as u32).wrapping_mul(31).wrapping_add(u32::from(k) * 7) >> 2) as u8)
        .collect()
}

/// One message of every type (small payloads).
fn messages() -> Vec<Message> {
    vec![
        Message::Hello {
            min_version: 1,
            max_version: 3,
            agent: "host-a".into(),
        },
        Message::HelloAck {
            version: 3,
            agent: "host-b".into(),
        },
        Message::Prepare {
            migration_id: "m-1".into(),
            spec_toml: "name = \"vm\"\nmemory_mib = 128\n".into(),
            source_running: true,
            qemu_version: "10.0.2".into(),
        },
        Message::Prepared {
            qemu_version: "10.0.2".into(),
        },
        Message::QemuBytes(Bytes::from_static(b"\x01\x00\x00\x00\x02\x03ram")),
        Message::RamBlocks {
            page_size: 4096,
            blocks: vec![
                RamBlock {
                    name: "pc.ram".into(),
                    used_length: 1 << 27,
                },
                RamBlock {
                    name: "vga".into(),
                    used_length: 1 << 24,
                },
            ],
        },
        Message::Pages {
            block: 0,
            pages: vec![
                Page {
                    offset: 0,
                    body: PageBody::Zero { fill: 0 },
                },
                Page {
                    offset: 4096,
                    body: PageBody::Raw(Bytes::from(pattern(64, 1))),
                },
                Page {
                    offset: 8192,
                    body: PageBody::Ref([5; 16]),
                },
                Page {
                    offset: 12288,
                    body: PageBody::Delta {
                        result: [6; 16],
                        diff: Bytes::from_static(b"\x00\x02ab\x10\x01c"),
                    },
                },
            ],
        },
        Message::ReturnPath(Bytes::from_static(b"\x00\x02\x00\x04\x00\x00\x00\x01")),
        Message::SourceDone {
            digest: [9; 32],
            pages: 77,
            commit: true,
        },
        Message::SourceDone {
            digest: [9; 32],
            pages: 77,
            commit: false,
        },
        Message::ReadyToResume { digest: [8; 32] },
        Message::Commit,
        Message::Resumed {
            resumed_unix_us: 1_700_000_000_000_000,
        },
        Message::Abort {
            code: ErrorCode::DigestMismatch,
            message: "memory digest mismatch".into(),
        },
        Message::Query {
            migration_id: "m-1".into(),
        },
        Message::QueryAnswer {
            state: MigrationState::Running,
            resumed_unix_us: 5,
        },
        Message::Summary {
            key_id: 77,
            prefixes: vec![1, u64::MAX, 0x0123_4567_89ab_cdef],
        },
        Message::Want {
            hashes: vec![[1; 16], [2; 16]],
        },
        Message::Content {
            pages: vec![
                ([3; 16], Bytes::from(pattern(64, 3))),
                ([4; 16], Bytes::new()),
            ],
        },
        Message::Attach {
            migration_id: "m-1".into(),
            index: 2,
        },
        Message::Seq { seq: 42 },
        Message::Applied { units: 1 << 20 },
        Message::DiskOffer {
            disks: vec![DiskInfo {
                virtual_size: 1 << 30,
                allocated: 5 << 20,
            }],
        },
        Message::DiskManifest {
            disk: 0,
            piece: 7,
            manifest: Bytes::from(small_manifest().encode()),
        },
        Message::DiskWant {
            disk: 0,
            piece: 7,
            runs: vec![(4096, 2), (1 << 30, 1)],
        },
        Message::DiskData {
            disk: 0,
            piece: DISK_DIRECT,
            offset: 8192,
            data: Bytes::from(pattern(100, 9)),
        },
        Message::DiskRoundEnd {
            disk: 0,
            round: 5,
            last: true,
        },
        Message::DiskRoundDone {
            disk: 0,
            round: 5,
            written: 12345,
        },
        // v12: the one message of post-copy with a body worth mutating (a flag, then more)
        // (the seed count per target is bounded: other newer types come by mutation)
        Message::PostcopyFaults {
            requests: 460,
            pages: 470,
            blocktime: Some(tern_proto::Blocktime {
                all_vcpus_ms: 10_100,
                max_vcpu_ms: 10_100,
            }),
            // v13's trailing field
            local: 120,
        },
    ]
}

fn frames() -> Vec<Seed> {
    let mut out: Vec<Seed> = messages()
        .iter()
        .enumerate()
        .map(|(i, m)| seed(format!("{i:02}-{}", m.name().to_lowercase()), frame(m)))
        .collect();
    // compressed frames (payloads that shrink)
    let big = Message::QemuBytes(Bytes::from(b"abcdefgh".repeat(64)));
    let pages = Message::Pages {
        block: 1,
        pages: (0..4)
            .map(|i| Page {
                offset: i * 4096,
                body: PageBody::Raw(Bytes::from(vec![i as u8; 128])),
            })
            .collect(),
    };
    for (name, codec) in [("lz4", Codec::Lz4), ("zstd", Codec::Zstd(3))] {
        let mut b = BytesMut::new();
        let mut c = FrameCompressor::default();
        c.encode(&big, codec, &mut b);
        c.encode(&pages, codec, &mut b);
        out.push(seed(format!("compressed-{name}"), b.to_vec()));
    }
    // a conversation's worth of frames, back to back
    out.push(seed("sequence", frames_of(&messages()[..8])));
    out
}

// ---- QEMU stream --------------------------------------------------------------------

const T_START: u8 = 0x01;
const T_PART: u8 = 0x02;
const T_END: u8 = 0x03;
const T_FULL: u8 = 0x04;
const T_SUBSECTION: u8 = 0x05;
const T_VMDESC: u8 = 0x06;
const T_CONFIG: u8 = 0x07;
const T_COMMAND: u8 = 0x08;
const T_FOOTER: u8 = 0x7e;
const F_ZERO: u64 = 0x02;
const F_MEM_SIZE: u64 = 0x04;
const F_PAGE: u64 = 0x08;
const F_EOS: u64 = 0x10;
const F_CONTINUE: u64 = 0x20;

/// Stream pieces, as in tern-qemu's codec tests (shared/reference/qemu-stream.md).
struct StreamBuf(Vec<u8>);

impl StreamBuf {
    /// Header with a configuration section; `page_bits` adds the target-page-bits
    /// subsection, `caps` the capabilities subsection.
    fn header(page_bits: Option<u32>, caps: &[&str]) -> Self {
        let mut v = b"QEVM\x00\x00\x00\x03".to_vec();
        v.push(T_CONFIG);
        v.extend_from_slice(&6u32.to_be_bytes());
        v.extend_from_slice(b"pc-10x");
        let mut s = StreamBuf(v);
        if let Some(bits) = page_bits {
            s.subsection("configuration/target-page-bits");
            s.0.extend_from_slice(&bits.to_be_bytes());
        }
        if !caps.is_empty() {
            s.subsection("configuration/capabilities");
            s.0.extend_from_slice(&(caps.len() as u32).to_be_bytes());
            for c in caps {
                s.counted(c);
            }
        }
        s
    }
    fn subsection(&mut self, name: &str) {
        self.0.push(T_SUBSECTION);
        self.counted(name);
        self.0.extend_from_slice(&1u32.to_be_bytes());
    }
    fn counted(&mut self, s: &str) {
        self.0.push(s.len() as u8);
        self.0.extend_from_slice(s.as_bytes());
    }
    fn be64(&mut self, v: u64) {
        self.0.extend_from_slice(&v.to_be_bytes());
    }
    fn command(&mut self, cmd: u16, data: &[u8]) {
        self.0.push(T_COMMAND);
        self.0.extend_from_slice(&cmd.to_be_bytes());
        self.0.extend_from_slice(&(data.len() as u16).to_be_bytes());
        self.0.extend_from_slice(data);
    }
    /// START of "ram" (section 2) with MEM_SIZE, EOS and footer; `gpa` for x-ignore-shared.
    fn start_ram(&mut self, blocks: &[(&str, u64)], gpa: bool) {
        self.0.push(T_START);
        self.0.extend_from_slice(&2u32.to_be_bytes());
        self.counted("ram");
        self.0.extend_from_slice(&0u32.to_be_bytes());
        self.0.extend_from_slice(&4u32.to_be_bytes());
        let total: u64 = blocks.iter().map(|b| b.1).sum();
        self.be64(total | F_MEM_SIZE);
        for (i, (n, l)) in blocks.iter().enumerate() {
            self.counted(n);
            self.be64(*l);
            if gpa {
                self.be64(i as u64 * (1 << 32));
            }
        }
        self.eos_footer();
    }
    fn eos_footer(&mut self) {
        self.be64(F_EOS);
        self.0.push(T_FOOTER);
        self.0.extend_from_slice(&2u32.to_be_bytes());
    }
    fn part(&mut self, end: bool) {
        self.0.push(if end { T_END } else { T_PART });
        self.0.extend_from_slice(&2u32.to_be_bytes());
    }
    fn record(&mut self, name: Option<&str>, offset: u64, flag: u64) {
        let cont = if name.is_none() { F_CONTINUE } else { 0 };
        self.be64(offset | flag | cont);
        if let Some(n) = name {
            self.counted(n);
        }
    }
    fn page(&mut self, name: Option<&str>, offset: u64, page_size: usize, k: u8) {
        self.record(name, offset, F_PAGE);
        self.0.extend_from_slice(&pattern(page_size, k));
    }
    fn zero(&mut self, name: Option<&str>, offset: u64) {
        self.record(name, offset, F_ZERO);
        self.0.push(0);
    }
    /// A device FULL section, EOF and the vmdesc JSON: the verbatim tail.
    fn tail(&mut self, vmdesc: bool) {
        self.0.push(T_FULL);
        self.0.extend_from_slice(&3u32.to_be_bytes());
        self.counted("timer");
        self.0.extend_from_slice(&0u32.to_be_bytes());
        self.0.extend_from_slice(&2u32.to_be_bytes());
        self.0.extend_from_slice(&[1, 2, 3, 4, 5]);
        self.0.push(T_FOOTER);
        self.0.extend_from_slice(&3u32.to_be_bytes());
        self.0.push(0); // EOF
        if vmdesc {
            let js = br#"{"page_size":1024,"devices":[{"name":"timer"}]}"#;
            self.0.push(T_VMDESC);
            self.0.extend_from_slice(&(js.len() as u32).to_be_bytes());
            self.0.extend_from_slice(js);
        }
    }
}

fn stream_parser() -> Vec<Seed> {
    const PS: usize = 1024;
    let blocks = [("pc.ram", 16 * PS as u64), ("vga", 4 * PS as u64)];
    // a whole small stream with 1 KiB pages: START, PARTs with pages across two blocks,
    // END, the device tail
    let mut s = StreamBuf::header(Some(10), &[]);
    s.command(1, &[]);
    s.start_ram(&blocks, false);
    s.part(false);
    s.page(Some("pc.ram"), 0, PS, 1);
    s.zero(None, PS as u64);
    s.page(Some("vga"), 2 * PS as u64, PS, 2);
    s.eos_footer();
    s.part(false);
    s.zero(None, 0);
    s.eos_footer();
    s.command(2, &[0, 0, 0, 1]);
    s.command(11, &[]);
    s.part(true);
    s.page(Some("pc.ram"), PS as u64, PS, 4);
    s.eos_footer();
    s.tail(true);
    let mut out = vec![seed("stream-1k-pages", s.0)];

    // capabilities: x-ignore-shared adds each block's guest address
    let mut s = StreamBuf::header(Some(10), &["x-ignore-shared", "events"]);
    s.start_ram(&blocks, true);
    s.part(true);
    s.zero(Some("vga"), 0);
    s.zero(None, PS as u64);
    s.eos_footer();
    s.tail(false);
    out.push(seed("stream-ignore-shared", s.0));

    // only the header
    out.push(seed(
        "header-only",
        StreamBuf::header(Some(12), &["events"]).0,
    ));

    // a body after the default header (first byte odd: the target prepends it), 4 KiB
    // pages, zero pages only but one
    let mut s = StreamBuf(Vec::new());
    s.start_ram(&[("pc.ram", 8 * 4096)], false);
    s.part(false);
    for i in 0..6 {
        s.zero(if i == 0 { Some("pc.ram") } else { None }, i * 4096);
    }
    s.eos_footer();
    s.part(true);
    s.page(None, 7 * 4096, 4096, 7);
    s.eos_footer();
    s.tail(true);
    out.push(seed("body-4k-pages", s.0));

    // return-path messages (first byte even: no header, the stream parser refuses it)
    let mut rp = Vec::new();
    for (ty, payload) in [
        (2u16, 1u32.to_be_bytes().to_vec()),
        (3, {
            let mut p = 4096u64.to_be_bytes().to_vec();
            p.extend_from_slice(&4096u32.to_be_bytes());
            p.push(6);
            p.extend_from_slice(b"pc.ram");
            p
        }),
        (4, [0u8; 12].to_vec()),
        (7, Vec::new()),
        (1, 0u32.to_be_bytes().to_vec()),
    ] {
        rp.extend_from_slice(&ty.to_be_bytes());
        rp.extend_from_slice(&(payload.len() as u16).to_be_bytes());
        rp.extend_from_slice(&payload);
    }
    out.push(seed("return-path", rp));
    // a received-bitmap message
    let mut b = vec![0, 5, 0, 7, 6];
    b.extend_from_slice(b"pc.ram");
    b.extend_from_slice(&8u64.to_be_bytes());
    b.extend_from_slice(&[0xff; 8]);
    b.extend_from_slice(&0x0123_4567_89ab_cdefu64.to_be_bytes());
    out.push(seed("return-path-bitmap", b));
    out.extend(postcopy());
    out
}

// ---- post-copy: the stream and the return path, built with tern-qemu's encoders -----

/// RAM's section id in the post-copy seeds.
const RAM_SID: u32 = 2;
const PS: u64 = 4096;
const HUGE: u64 = 2 << 20;

/// Stream items, put into bytes by tern-qemu's `Encoder` (which also sets the length of
/// a package); the header is [`stream::HEADER`] (4 KiB target pages).
#[derive(Default)]
struct Items(Vec<Item>);

impl Items {
    fn bytes(&self) -> Vec<u8> {
        let mut enc = Encoder::new(PS);
        let mut out = Vec::new();
        for it in &self.0 {
            enc.encode(it, NameMode::AsInput, &mut out);
        }
        out
    }
    fn with_header(&self) -> Vec<u8> {
        [stream::HEADER, &self.bytes()].concat()
    }
    fn command(&mut self, c: u16, data: &[u8]) -> &mut Self {
        self.0.push(Item::Command {
            cmd: c,
            data: Bytes::copy_from_slice(data),
        });
        self
    }
    fn ping(&mut self, v: u32) -> &mut Self {
        self.command(cmd::PING, &v.to_be_bytes())
    }
    fn postcopy(&mut self, c: PostcopyCommand) -> &mut Self {
        self.0.push(Item::Postcopy(c));
        self
    }
    fn advise(&mut self, page_sizes: u64) -> &mut Self {
        self.postcopy(PostcopyCommand::Advise {
            page_sizes,
            target_page_size: PS,
        })
    }
    fn discard(&mut self, block: &str, ranges: &[(u64, u64)]) -> &mut Self {
        self.postcopy(PostcopyCommand::RamDiscard {
            block: block.into(),
            ranges: ranges
                .iter()
                .map(|&(start, length)| DiscardRange { start, length })
                .collect(),
        })
    }
    fn ram_section(&mut self, kind: SectionKind) -> &mut Self {
        let start = kind == SectionKind::Start;
        self.0.push(Item::Section(SectionHeader {
            kind,
            section_id: RAM_SID,
            idstr: start.then(|| "ram".into()),
            instance_id: 0,
            version_id: if start { 4 } else { 0 },
        }));
        self
    }
    /// START of RAM with MEM_SIZE (name, length, page size if not the host's), EOS, footer.
    fn start_ram(&mut self, blocks: &[(&str, u64, Option<u64>)]) -> &mut Self {
        self.ram_section(SectionKind::Start);
        self.0.push(Item::Ram(RamRecord::MemSize {
            total: blocks.iter().map(|b| b.1).sum(),
            blocks: blocks
                .iter()
                .map(|&(name, used_length, page_size)| RamBlockInfo {
                    name: name.into(),
                    used_length,
                    page_size,
                    gpa: None,
                })
                .collect(),
        }));
        self.eos_footer()
    }
    fn eos_footer(&mut self) -> &mut Self {
        self.0.push(Item::Ram(RamRecord::Eos));
        self.0.push(Item::Footer {
            section_id: RAM_SID,
        });
        self
    }
    /// `named`: the record names its block (else CONTINUE: the last block written).
    fn page(&mut self, block: &str, offset: u64, named: bool, k: u8) -> &mut Self {
        self.0.push(Item::Ram(RamRecord::Page {
            block: block.into(),
            offset,
            data: Bytes::from(pattern(PS as usize, k)),
            named,
        }));
        self
    }
    fn zero(&mut self, block: &str, offset: u64, named: bool) -> &mut Self {
        self.0.push(Item::Ram(RamRecord::Zero {
            block: block.into(),
            offset,
            fill: 0,
            named,
        }));
        self
    }
    /// A device's FULL section in a package: header, body, footer.
    fn device(&mut self, sid: u32, idstr: &str, body: &[u8]) -> &mut Self {
        self.0.push(Item::Section(SectionHeader {
            kind: SectionKind::Full,
            section_id: sid,
            idstr: Some(idstr.into()),
            instance_id: 0,
            version_id: 1,
        }));
        self.0.push(Item::DeviceState(Bytes::copy_from_slice(body)));
        self.0.push(Item::Footer { section_id: sid });
        self
    }
    fn packaged(&mut self, inner: Items) -> &mut Self {
        self.0.push(Item::Packaged(Package { items: inner.0 }));
        self
    }
    /// The package QEMU sends at the switch: LISTEN, the devices, a PING, RUN.
    fn switch_package(&mut self, ping: u32) -> &mut Self {
        let mut p = Items::default();
        p.postcopy(PostcopyCommand::Listen)
            .device(3, "timer", &[0, 0, 0, 0, 0, 0x12, 0x34, 0x56])
            .device(4, "cpu", &[1, 0, 0, 0, 0xff, 0, 0, 0, 2])
            .ping(ping)
            .postcopy(PostcopyCommand::Run);
        self.packaged(p)
    }
    /// A top-level EOF: what follows END ram in post-copy (the devices went in the package).
    fn eof(&mut self) -> &mut Self {
        self.0.push(Item::Tail(Bytes::from_static(&[0])));
        self
    }
}

/// The RAM blocks of the post-copy seeds.
const BLOCKS: [(&str, u64, Option<u64>); 2] = [("pc.ram", 16 * PS, None), ("vga", 4 * PS, None)];

/// A page record cut where the first connection of `postcopy-resumed` broke: its header and
/// this many bytes of its data.
pub(crate) const RESUMED_CUT_DATA: usize = 100;

fn rp(msgs: &[RpMessage]) -> Vec<u8> {
    let mut out = Vec::new();
    for m in msgs {
        encode_rp(m, &mut out);
    }
    out
}

/// A received-page bitmap of a block of `pages` pages with `received` set (QEMU's layout:
/// little-endian 64-bit words).
fn bitmap(pages: u64, received: &[u64]) -> Bytes {
    let mut b = vec![0u8; recv_bitmap_len(pages * PS, PS) as usize];
    for &p in received {
        b[(p / 8) as usize] |= 1 << (p % 8);
    }
    Bytes::from(b)
}

fn postcopy() -> Vec<Seed> {
    let mut out = Vec::new();

    // precopy then post-copy, as QEMU 7.2 sends it: ADVISE, RAM, DISCARDs, the package
    // (LISTEN, devices, PING 3, RUN), then pages (CONTINUE across the package), END, EOF
    let mut s = Items::default();
    s.command(cmd::OPEN_RETURN_PATH, &[])
        .ping(1)
        .advise(PS)
        .start_ram(&BLOCKS)
        .ram_section(SectionKind::Part)
        .page("pc.ram", 0, true, 1)
        .zero("pc.ram", PS, false)
        .zero("vga", 0, true)
        .eos_footer()
        .discard("pc.ram", &[(0, PS), (2 * PS, 2 * PS)])
        .discard("vga", &[(0, 4 * PS)])
        .ping(2)
        .switch_package(3)
        .ping(4)
        .ram_section(SectionKind::Part)
        .zero("vga", PS, false)
        .page("pc.ram", 2 * PS, true, 2)
        .eos_footer()
        .ram_section(SectionKind::End)
        .eos_footer()
        .eof();
    out.push(seed("postcopy-stream", s.with_header()));

    // huge pages: ADVISE's summary has 2 MiB, so MEM_SIZE gives pc.ram's page size; 10.2's
    // PING 0x42 in the package
    let mut s = Items::default();
    s.command(cmd::OPEN_RETURN_PATH, &[])
        .advise(PS | HUGE)
        .start_ram(&[("pc.ram", 2 * HUGE, Some(HUGE)), ("vga", 4 * PS, None)])
        .ram_section(SectionKind::Part)
        .zero("pc.ram", HUGE, true)
        .zero("vga", 0, true)
        .eos_footer()
        .discard("pc.ram", &[(HUGE, HUGE)])
        .switch_package(0x42)
        .ram_section(SectionKind::End)
        .eos_footer()
        .eof();
    out.push(seed("postcopy-hugepages", s.with_header()));

    // post-copy recovery (mode byte, be16 length of the first connection): the first
    // connection breaks inside a page after the switch; the new one has no header and
    // asks for the received bitmaps, RESUMEs, then pages, END, EOF
    let mut first = Items::default();
    first
        .command(cmd::OPEN_RETURN_PATH, &[])
        .ping(1)
        .advise(PS)
        .start_ram(&BLOCKS)
        .ram_section(SectionKind::Part)
        .zero("pc.ram", 0, true)
        .eos_footer()
        .discard("pc.ram", &[(0, PS)])
        .ping(2)
        .switch_package(3)
        .ping(4)
        .ram_section(SectionKind::Part)
        .zero("pc.ram", PS, true)
        .page("pc.ram", 2 * PS, false, 3);
    let mut first = first.with_header();
    first.truncate(first.len() - PS as usize + RESUMED_CUT_DATA);
    let mut second = Items::default();
    second
        .postcopy(PostcopyCommand::RecvBitmap {
            block: "pc.ram".into(),
        })
        .postcopy(PostcopyCommand::RecvBitmap {
            block: "vga".into(),
        })
        .postcopy(PostcopyCommand::Resume)
        .ram_section(SectionKind::Part)
        .page("vga", PS, true, 4)
        .zero("pc.ram", 2 * PS, true)
        .zero("pc.ram", 3 * PS, false)
        .eos_footer()
        .ram_section(SectionKind::End)
        .eos_footer()
        .eof();
    let mut v = vec![stream::RESUMED];
    v.extend_from_slice(&(first.len() as u16).to_be_bytes());
    v.extend_from_slice(&first);
    v.extend_from_slice(&second.bytes());
    out.push(seed("postcopy-resumed", v));

    // the destination's return path in post-copy: PONGs (in the order QEMU sent them),
    // page faults (REQ_PAGES_ID names the block, REQ_PAGES reuses it), SHUT
    let req_id = |offset, len, block: &str| RpMessage::ReqPagesId {
        offset,
        len,
        block: block.into(),
    };
    out.push(seed(
        "rp-postcopy-faults",
        rp(&[
            RpMessage::Pong(1),
            RpMessage::Pong(2),
            RpMessage::Pong(4),
            RpMessage::Pong(3),
            req_id(2 * PS, 4096, "pc.ram"),
            RpMessage::ReqPages {
                offset: 3 * PS,
                len: 4096,
            },
            RpMessage::ReqPages {
                offset: 9 * PS,
                len: 8192,
            },
            req_id(PS, 4096, "vga"),
            RpMessage::ReqPages {
                offset: 0,
                len: 4096,
            },
            RpMessage::Shut(0),
        ]),
    ));
    // its answer to postcopy-resumed: each block's received bitmap, RESUME_ACK, then
    // faults again and SHUT
    out.push(seed(
        "rp-postcopy-recovery",
        rp(&[
            RpMessage::RecvBitmap {
                block: "pc.ram".into(),
                bitmap: bitmap(16, &[0, 1, 9]),
            },
            RpMessage::RecvBitmap {
                block: "vga".into(),
                bitmap: bitmap(4, &[0]),
            },
            RpMessage::ResumeAck(1),
            req_id(PS, 4096, "vga"),
            RpMessage::ReqPages {
                offset: 2 * PS,
                len: 4096,
            },
            RpMessage::Shut(0),
        ]),
    ));
    out
}

// ---- deltas -------------------------------------------------------------------------

fn delta_input(base: &[u8], d: &[u8], edits: &[u8]) -> Vec<u8> {
    let mut v = (base.len() as u16).to_be_bytes().to_vec();
    v.extend_from_slice(base);
    v.extend_from_slice(&(d.len() as u16).to_be_bytes());
    v.extend_from_slice(d);
    v.extend_from_slice(edits);
    v
}

fn delta_apply() -> Vec<Seed> {
    let old = pattern(512, 1);
    let mut out = Vec::new();
    for (name, edits) in [
        ("one-byte", vec![(100usize, 1usize)]),
        ("two-spans", vec![(0, 8), (300, 20)]),
        ("close-spans", vec![(10, 1), (14, 1), (40, 3)]),
        ("last-byte", vec![(511, 1)]),
        ("rewritten", vec![(0, 512)]),
    ] {
        let mut new = old.clone();
        for (at, n) in edits {
            for b in &mut new[at..at + n] {
                *b ^= 0x5a;
            }
        }
        let mut d = Vec::new();
        assert!(delta::diff(&old, &new, usize::MAX, &mut d));
        // edits for the second half: page length 64 (selector 2), limit len/4, two edits
        out.push(seed(
            name,
            delta_input(&old, &d, &[2, 1, 0, 5, 0x77, 3, 0, 40, 0x11, 1]),
        ));
    }
    out.push(seed("empty-delta", delta_input(&old, &[], &[0, 0])));
    out.push(seed(
        "big-gap",
        delta_input(
            &pattern(64, 2),
            &[0xff, 0xff, 0x03, 1, 9],
            &[3, 200, 2, 0, 7],
        ),
    ));
    out.push(seed("empty-base", delta_input(&[], &[0, 0], &[1, 0])));
    out
}

// ---- manifests ----------------------------------------------------------------------

fn small_manifest() -> Manifest {
    let mut m = Manifest::new(8192..8192 + 5 * BLOCK_SIZE + 100).expect("range");
    m.push_data(8192, [1; 16]).expect("in order");
    m.push_data(12288, [2; 16]).expect("in order");
    m.push_zeros(16384..24576).expect("in order");
    m.push_zeros(28672..28772).expect("in order");
    m
}

fn manifest_decode() -> Vec<Seed> {
    let mut out = vec![seed("small", small_manifest().encode())];
    out.push(seed(
        "empty-range",
        Manifest::new(3 * BLOCK_SIZE..3 * BLOCK_SIZE)
            .expect("range")
            .encode(),
    ));
    // 4 MiB piece: data, zeros and unchanged alternating
    let mut m = Manifest::new(1 << 30..(1 << 30) + (4 << 20)).expect("range");
    for i in 0..1024u64 {
        let o = (1 << 30) + i * BLOCK_SIZE;
        match i % 7 {
            0..=2 => m.push_data(o, [i as u8; 16]).expect("in order"),
            3 | 4 => m.push_zeros(o..o + BLOCK_SIZE).expect("in order"),
            _ => {}
        }
    }
    out.push(seed("piece-4m", m.encode()));
    // a 1 TiB disk that is all zeroes but one block, and one that says nothing
    let mut m = Manifest::new(0..1 << 40).expect("range");
    m.push_zeros(0..(1 << 39)).expect("in order");
    m.push_data(1 << 39, [7; 16]).expect("in order");
    m.push_zeros((1 << 39) + BLOCK_SIZE..1 << 40)
        .expect("in order");
    out.push(seed("zeros-1t", m.encode()));
    out.push(seed(
        "unchanged-1t",
        Manifest::new(0..1 << 40).expect("range").encode(),
    ));
    // a short last block, high on the disk
    let top = (1u64 << 50) * BLOCK_SIZE;
    let mut m = Manifest::new(top..top + BLOCK_SIZE + 10).expect("range");
    m.push_data(top, [8; 16]).expect("in order");
    m.push_zeros(top + BLOCK_SIZE..top + BLOCK_SIZE + 10)
        .expect("in order");
    out.push(seed("short-last-block-high", m.encode()));
    out
}

// ---- chunk index files --------------------------------------------------------------

/// One stamp of an index record: (path, size).
struct Stamp<'a>(&'a str, u64);

/// An index file as persist.rs lays it out (checksums valid), with `flags` and `key_id`.
fn index_file(
    format: u8,
    flags: u8,
    key_id: u64,
    m: Option<&Manifest>,
    stamps: &[Stamp],
) -> Vec<u8> {
    let virtual_size = m.map_or(1 << 20, |m| m.range().end);
    let mut rec = 7u32.to_le_bytes().to_vec();
    rec.push(format);
    rec.push(flags);
    rec.extend_from_slice(&virtual_size.to_le_bytes());
    rec.extend_from_slice(&m.map_or(0, Manifest::data_blocks).to_le_bytes());
    rec.extend_from_slice(&m.map_or(0, Manifest::zero_blocks).to_le_bytes());
    rec.extend_from_slice(&(stamps.len() as u16).to_le_bytes());
    for (i, Stamp(path, size)) in stamps.iter().enumerate() {
        for v in [1u64, 100 + i as u64, *size] {
            rec.extend_from_slice(&v.to_le_bytes());
        }
        for v in [1_700_000_000_123_456_789i64, -5] {
            rec.extend_from_slice(&v.to_le_bytes());
        }
        rec.extend_from_slice(&(path.len() as u32).to_le_bytes());
        rec.extend_from_slice(path.as_bytes());
    }
    let body = m.map(Manifest::encode).unwrap_or_default();
    let mut f = b"TERNCIDX".to_vec();
    f.extend_from_slice(&1u32.to_le_bytes());
    f.extend_from_slice(&(rec.len() as u32).to_le_bytes());
    f.extend_from_slice(&(body.len() as u64).to_le_bytes());
    f.extend_from_slice(&key_id.to_le_bytes());
    f.extend_from_slice(&rec);
    let h = blake3::hash(&f);
    f.extend_from_slice(&h.as_bytes()[..16]);
    f.extend_from_slice(&body);
    f.extend_from_slice(&blake3::hash(&body).as_bytes()[..16]);
    f
}

fn chunk_index_file() -> Vec<Seed> {
    let key = index_file::SEED_KEY_ID;
    let mut m = Manifest::new(0..6 * BLOCK_SIZE).expect("range");
    m.push_zeros(0..2 * BLOCK_SIZE).expect("in order");
    m.push_data(2 * BLOCK_SIZE, [9; 16]).expect("in order");
    m.push_data(3 * BLOCK_SIZE, [10; 16]).expect("in order");
    m.push_zeros(4 * BLOCK_SIZE..6 * BLOCK_SIZE)
        .expect("in order");
    let raw = [Stamp("/var/lib/tern/images/base.raw", 6 * 4096)];
    let qcow = [
        Stamp("/images/vm,1.qcow2", 200_704),
        Stamp("/images/base.raw", 6 * 4096),
    ];
    let mut short = Manifest::new(0..BLOCK_SIZE + 512).expect("range");
    short.push_data(0, [1; 16]).expect("in order");
    short
        .push_zeros(BLOCK_SIZE..BLOCK_SIZE + 512)
        .expect("in order");
    let mut out = Vec::new();
    // mostly with the checksums fixed up (mode bit 0), so that mutants reach the decoders
    for (name, mode, file) in [
        ("raw-as-written", 0u8, index_file(1, 0, key, Some(&m), &raw)),
        ("raw", 3, index_file(1, 0, key, Some(&m), &raw)),
        ("qcow2-backing", 1, index_file(2, 0, key, Some(&m), &qcow)),
        ("short-image", 3, index_file(1, 0, key, Some(&short), &raw)),
        ("needs-reindex", 3, index_file(2, 1, key, None, &qcow)),
        ("other-key", 3, index_file(1, 0, key + 1, Some(&m), &raw)),
        ("own-key", 7, index_file(1, 0, 0xfeed, Some(&m), &raw)),
    ] {
        let mut v = vec![mode];
        v.extend_from_slice(&file);
        out.push(seed(name, v));
    }
    // a damaged body: the record survives
    let mut v = vec![0u8];
    v.extend_from_slice(&index_file(1, 0, key, Some(&m), &raw));
    let n = v.len();
    v[n - 20] ^= 0xff;
    out.push(seed("damaged-body", v));
    out
}

// ---- NBD ----------------------------------------------------------------------------

fn nbd_replies() -> Vec<Seed> {
    use tern_nbd::fuzzing::*;
    let sel = |s: u8, body: Vec<u8>| {
        let mut v = vec![s];
        v.extend_from_slice(&body);
        v
    };
    let chunk = |flags: u16, ty: u16, cookie: u64, payload: &[u8]| {
        let mut v = STRUCTURED_REPLY_MAGIC.to_be_bytes().to_vec();
        v.extend_from_slice(&flags.to_be_bytes());
        v.extend_from_slice(&ty.to_be_bytes());
        v.extend_from_slice(&cookie.to_be_bytes());
        v.extend_from_slice(&(payload.len() as u32).to_be_bytes());
        v.extend_from_slice(payload);
        v
    };
    let simple = |error: u32, cookie: u64| {
        let mut v = SIMPLE_REPLY_MAGIC.to_be_bytes().to_vec();
        v.extend_from_slice(&error.to_be_bytes());
        v.extend_from_slice(&cookie.to_be_bytes());
        v
    };
    let hole = {
        let mut p = (1u64 << 20).to_be_bytes().to_vec();
        p.extend_from_slice(&65536u32.to_be_bytes());
        p
    };
    let error = |ty: u16, msg: &str| {
        let mut p = 5u32.to_be_bytes().to_vec();
        p.extend_from_slice(&(msg.len() as u16).to_be_bytes());
        p.extend_from_slice(msg.as_bytes());
        if ty == REPLY_TYPE_ERROR_OFFSET {
            p.extend_from_slice(&4096u64.to_be_bytes());
        }
        p
    };
    let status = {
        let mut p = 1u32.to_be_bytes().to_vec();
        for (len, flags) in [(65536u32, 0u32), (4096, 3), (1 << 20, 1)] {
            p.extend_from_slice(&len.to_be_bytes());
            p.extend_from_slice(&flags.to_be_bytes());
        }
        p
    };
    let mut data = (1u64 << 20).to_be_bytes().to_vec();
    data.extend_from_slice(&pattern(64, 1));
    let read_reply = [
        chunk(0, REPLY_TYPE_OFFSET_DATA, 1, &data),
        chunk(0, REPLY_TYPE_OFFSET_HOLE, 1, &hole),
        chunk(
            0,
            REPLY_TYPE_ERROR_OFFSET,
            2,
            &error(REPLY_TYPE_ERROR_OFFSET, "read failed"),
        ),
        chunk(REPLY_FLAG_DONE, REPLY_TYPE_NONE, 1, &[]),
    ]
    .concat();
    let status_reply = [
        chunk(0, REPLY_TYPE_BLOCK_STATUS, 3, &status),
        chunk(
            REPLY_FLAG_DONE,
            REPLY_TYPE_ERROR,
            3,
            &error(REPLY_TYPE_ERROR, "no"),
        ),
    ]
    .concat();
    let option_header = |reply_type: u32, len: u32| {
        let mut v = OPT_GO.to_be_bytes().to_vec();
        v.extend_from_slice(&OPTION_REPLY_MAGIC.to_be_bytes());
        v.extend_from_slice(&OPT_GO.to_be_bytes());
        v.extend_from_slice(&reply_type.to_be_bytes());
        v.extend_from_slice(&len.to_be_bytes());
        v
    };
    let mut export = INFO_EXPORT.to_be_bytes().to_vec();
    export.extend_from_slice(&(1u64 << 30).to_be_bytes());
    export.extend_from_slice(&0x004du16.to_be_bytes());
    let mut block_size = INFO_BLOCK_SIZE.to_be_bytes().to_vec();
    for v in [1u32, 4096, 32 << 20] {
        block_size.extend_from_slice(&v.to_be_bytes());
    }
    let mut meta = 1u32.to_be_bytes().to_vec();
    meta.extend_from_slice(b"qemu:dirty-bitmap:tern-0");
    let mut error_ty = REPLY_TYPE_ERROR_OFFSET.to_be_bytes().to_vec();
    error_ty.extend_from_slice(&error(REPLY_TYPE_ERROR_OFFSET, "at offset"));
    vec![
        seed("stream-read", sel(nbd::sel::STREAM, read_reply)),
        seed("stream-block-status", sel(nbd::sel::STREAM, status_reply)),
        seed(
            "stream-simple",
            sel(nbd::sel::STREAM, [simple(0, 7), simple(5, 8)].concat()),
        ),
        seed(
            "reply-header",
            sel(
                nbd::sel::REPLY_HEADER,
                chunk(REPLY_FLAG_DONE, REPLY_TYPE_NONE, 9, &[]),
            ),
        ),
        seed("hole", sel(nbd::sel::HOLE, hole.clone())),
        seed("error-chunk", sel(nbd::sel::ERROR_CHUNK, error_ty)),
        seed("block-status", sel(nbd::sel::BLOCK_STATUS, status.clone())),
        seed(
            "option-reply-info",
            sel(nbd::sel::OPTION_REPLY_HEADER, option_header(REP_INFO, 12)),
        ),
        seed(
            "option-reply-ack",
            sel(nbd::sel::OPTION_REPLY_HEADER, option_header(REP_ACK, 0)),
        ),
        seed(
            "option-reply-meta",
            sel(
                nbd::sel::OPTION_REPLY_HEADER,
                option_header(REP_META_CONTEXT, 28),
            ),
        ),
        seed(
            "option-reply-error",
            sel(
                nbd::sel::OPTION_REPLY_HEADER,
                option_header(REP_FLAG_ERROR | 6, 20),
            ),
        ),
        seed("info-export", sel(nbd::sel::INFO, export)),
        seed("info-block-size", sel(nbd::sel::INFO, block_size)),
        seed("meta-context", sel(nbd::sel::META_CONTEXT, meta)),
        seed(
            "option-error",
            sel(
                nbd::sel::OPTION_ERROR,
                b"export 'tern-0' not found".to_vec(),
            ),
        ),
    ]
}

// ---- QMP ----------------------------------------------------------------------------

fn qmp_line() -> Vec<Seed> {
    [
        ("greeting", r#"{"QMP": {"version": {"qemu": {"micro": 2, "minor": 0, "major": 10}, "package": "Debian 1:10.0.2+ds-1"}, "capabilities": ["oob"]}}"#),
        ("return-empty", r#"{"return": {}, "id": 1}"#),
        ("return-status", r#"{"return": {"status": "running", "singlestep": false, "running": true}, "id": 7}"#),
        ("error", r#"{"error": {"class": "GenericError", "desc": "Parameter 'x' is unexpected"}, "id": 3}"#),
        ("event-stop", r#"{"timestamp": {"seconds": 1700000000, "microseconds": 250}, "event": "STOP"}"#),
        ("event-migration", r#"{"timestamp": {"seconds": 1700000001, "microseconds": 999999}, "event": "MIGRATION", "data": {"status": "pre-switchover"}}"#),
        ("event-no-timestamp", r#"{"event": "RESUME"}"#),
        ("query-migrate", r#"{"return": {"status": "completed", "setup-time": 4, "downtime": 12, "total-time": 900, "ram": {"total": 134217728, "remaining": 0, "transferred": 5500000, "duplicate": 30000, "normal": 1300, "mbps": 1000.5, "dirty-pages-rate": 12, "dirty-sync-count": 3}}, "id": 12}"#),
        ("query-migrate-failed", r#"{"return": {"status": "failed", "error-desc": "Unable to write to socket: Broken pipe"}, "id": 13}"#),
        ("capabilities", r#"{"return": [{"state": false, "capability": "xbzrle"}, {"state": true, "capability": "events"}], "id": 5}"#),
        ("no-return", r#"{"id": 4}"#),
        ("ramblocks", r#"{"return": {"human-readable-text": "              Block Name    PSize              Offset               Used              Total                HVA  RO\n                  pc.ram    4 KiB  0x0000000000000000 0x0000000010000000 0x0000000010000000 0x00007f9cffe00000  rw\n                 pc.bios    4 KiB  0x0000000010000000 0x0000000000040000 0x0000000000040000 0x00007f9d5ae00000  ro\n"}, "id": 9}"#),
        ("several-lines", "{\"return\": {}, \"id\": 1}\r\n{\"event\": \"RESUME\", \"timestamp\": {\"seconds\": 1, \"microseconds\": 2}}\n{\"return\": {}}\n"),
    ]
    .iter()
    .map(|(n, l)| seed(*n, l.as_bytes().to_vec()))
    .collect()
}

// ---- the destination's pages --------------------------------------------------------

fn page_decode() -> Vec<Seed> {
    let ps = pages::DEFAULT_PAGE as usize;
    let hasher = pages::hasher();
    let held = |k| pages::held_page(k, ps);
    let h = |d: &[u8]| hasher.hash(d);
    let raw = |offset: u64, d: Vec<u8>| Page {
        offset,
        body: PageBody::Raw(Bytes::from(d)),
    };
    let reference = |offset: u64, hash| Page {
        offset,
        body: PageBody::Ref(hash),
    };
    let zero = |offset: u64, fill| Page {
        offset,
        body: PageBody::Zero { fill },
    };
    let old = pattern(ps, 1);
    let mut new = old.clone();
    new[100..120].fill(0xab);
    let mut diff = Vec::new();
    assert!(delta::diff(&old, &new, ps / 4, &mut diff));
    let unknown = pattern(ps, 9);
    let p = ps as u64;

    let mut out = vec![seed(
        "every-kind",
        frames_of(&[Message::Pages {
            block: 0,
            pages: vec![
                zero(0, 0),
                raw(p, old.clone()),
                reference(2 * p, h(&held(0))),
                reference(3 * p, h(&old)),
                Page {
                    offset: p,
                    body: PageBody::Delta {
                        result: h(&new),
                        diff: Bytes::from(diff.clone()),
                    },
                },
                zero(4 * p, 0x11),
            ],
        }]),
    )];
    // the lean path (v5): plain pages, runs of zero pages (one that fits, one past the
    // block's end, one of no pages), then a delta against a plain page (no base)
    out.push(seed(
        "lean-plain-and-zero-runs",
        frames_of(&[
            Message::Pages {
                block: 0,
                pages: vec![
                    Page {
                        offset: 0,
                        body: PageBody::Plain(Bytes::from(old.clone())),
                    },
                    Page {
                        offset: p,
                        body: PageBody::ZeroRun { fill: 0, pages: 5 },
                    },
                    Page {
                        offset: 6 * p,
                        body: PageBody::ZeroRun { fill: 3, pages: 2 },
                    },
                ],
            },
            Message::Pages {
                block: 1,
                pages: vec![
                    Page {
                        offset: 2 * p,
                        body: PageBody::ZeroRun { fill: 0, pages: 3 },
                    },
                    Page {
                        offset: 0,
                        body: PageBody::ZeroRun { fill: 0, pages: 0 },
                    },
                ],
            },
            Message::Pages {
                block: 0,
                pages: vec![Page {
                    offset: 0,
                    body: PageBody::Delta {
                        result: h(&new),
                        diff: Bytes::from(diff.clone()),
                    },
                }],
            },
        ]),
    ));
    // a reference the destination lacks: held back until Content brings it
    out.push(seed(
        "want-then-content",
        frames_of(&[
            Message::Pages {
                block: 1,
                pages: vec![reference(0, h(&unknown)), raw(p, held(1)), zero(0, 0)],
            },
            Message::Content {
                pages: vec![(h(&unknown), Bytes::from(unknown.clone()))],
            },
            Message::Pages {
                block: 1,
                pages: vec![reference(2 * p, h(&unknown))],
            },
        ]),
    ));
    // content that does not match its hash
    out.push(seed(
        "bad-content",
        frames_of(&[
            Message::Pages {
                block: 0,
                pages: vec![reference(0, [1; 16])],
            },
            Message::Content {
                pages: vec![([1; 16], Bytes::from(held(2)))],
            },
        ]),
    ));
    // a delta whose base the destination does not have
    out.push(seed(
        "delta-without-base",
        frames_of(&[Message::Pages {
            block: 0,
            pages: vec![Page {
                offset: 5 * p,
                body: PageBody::Delta {
                    result: h(&new),
                    diff: Bytes::from(diff),
                },
            }],
        }]),
    ));
    // records outside the layout
    out.push(seed(
        "out-of-range",
        frames_of(&[Message::Pages {
            block: 1,
            pages: vec![zero(3 * p, 0), zero(4 * p, 0), raw(5 * p, held(3))],
        }]),
    ));
    // a layout of its own: 4 KiB pages, as on x86
    out.push(seed(
        "ram-blocks-4k",
        frames_of(&[
            Message::RamBlocks {
                page_size: 4096,
                blocks: vec![RamBlock {
                    name: "pc.ram".into(),
                    used_length: 8 * 4096,
                }],
            },
            Message::Pages {
                block: 0,
                pages: vec![
                    raw(0, pattern(4096, 4)),
                    zero(4096, 0),
                    reference(8192, hasher.hash(&pages::held_page(2, 4096))),
                ],
            },
        ]),
    ));
    out
}

// ---- the destination's disks --------------------------------------------------------

fn chunks_rebuild() -> Vec<Seed> {
    let mut out = Vec::new();
    // built mode (even mode byte): start block, blocks - 1, last length, palette, runs
    for (name, mode, start, last, palette, runs) in [
        (
            "built-all-sent",
            0u8,
            0u16,
            0u16,
            vec![1u8, 2, 5, 0],
            vec![(0u8, 3u8, None)],
        ),
        (
            "built-dups-and-short-last",
            2,
            3,
            1000,
            vec![1, 1, 2, 0x80, 0, 5],
            vec![(0, 1, None), (2, 1, None), (0x25, 1, None)],
        ),
        (
            "built-corrupt-then-true",
            0,
            1,
            0,
            vec![3, 4, 5],
            vec![(0x40, 3, Some(17u16)), (0, 3, None), (0x10, 1, None)],
        ),
        (
            "built-unaligned",
            0,
            0,
            4095,
            vec![5, 5],
            vec![
                (0x80, 1, Some(512)),
                (0x11, 1, None),
                (0x00, 1, None),
                (0x01, 1, None),
            ],
        ),
    ] {
        let mut v = vec![mode];
        v.extend_from_slice(&start.to_be_bytes());
        v.push(palette.len() as u8 - 1);
        v.extend_from_slice(&last.to_be_bytes());
        v.extend_from_slice(&palette);
        for (op, count, pos) in runs {
            v.push(op);
            v.push(count - 1);
            if let Some(p) = pos {
                v.extend_from_slice(&p.to_be_bytes());
            }
        }
        out.push(seed(name, v));
    }

    // worker mode (odd mode byte): disk-size byte pair, then frames
    let hasher = rebuild::hasher();
    let short = 100u16;
    let size = rebuild::worker_disk_size(short);
    let blocks: Vec<[u8; BLOCK_BYTES]> = (0..8).map(|i| rebuild::palette(i % 4, 0)).collect();
    let mut m = Manifest::new(0..8 * BLOCK_SIZE).expect("range");
    for (i, b) in blocks.iter().enumerate() {
        m.push_block(i as u64 * BLOCK_SIZE, b, &hasher)
            .expect("in order");
    }
    // the disk's last piece, with its short last block
    let tail_start = size - (size % BLOCK_SIZE) - BLOCK_SIZE;
    let mut t = Manifest::new(tail_start..size).expect("range");
    let tail_blocks = [rebuild::palette(5, 1), rebuild::palette(5, 2)];
    for (i, b) in tail_blocks.iter().enumerate() {
        t.push_block(tail_start + i as u64 * BLOCK_SIZE, b, &hasher)
            .expect("in order");
    }
    let last_len = (size % BLOCK_SIZE) as usize;
    let mut tail_data = tail_blocks[0].to_vec();
    tail_data.extend_from_slice(&tail_blocks[1][..last_len]);
    let data = |piece: u32, offset: u64, bytes: Vec<u8>| Message::DiskData {
        disk: 0,
        piece,
        offset,
        data: Bytes::from(bytes),
    };
    let run = |from: usize, to: usize| blocks[from..to].concat();
    let mut v = vec![1u8];
    v.extend_from_slice(&short.to_be_bytes());
    v.extend_from_slice(&frames_of(&[
        Message::DiskManifest {
            disk: 0,
            piece: 0,
            manifest: Bytes::from(m.encode()),
        },
        Message::DiskManifest {
            disk: 0,
            piece: 1,
            manifest: Bytes::from(t.encode()),
        },
        data(0, BLOCK_SIZE, run(1, 4)),
        data(1, tail_start, tail_data),
        data(DISK_DIRECT, 20 * BLOCK_SIZE, pattern(5000, 3)),
        Message::DiskRoundEnd {
            disk: 0,
            round: 0,
            last: false,
        },
    ]));
    out.push(seed("worker-round", v));
    // the same piece, its run corrupted
    let mut bad = run(1, 4);
    bad[5000] ^= 1;
    let mut v = vec![3u8, 0, 0];
    v.extend_from_slice(&frames_of(&[
        Message::DiskManifest {
            disk: 0,
            piece: 0,
            manifest: Bytes::from(m.encode()),
        },
        data(0, BLOCK_SIZE, bad),
        data(0, BLOCK_SIZE, run(1, 4)),
    ]));
    out.push(seed("worker-corrupt-run", v));
    out
}

#[cfg(test)]
mod tests {
    //! The seeds are what they claim to be: a seed that does not decode gives mutations
    //! no structure to start from.

    use std::path::Path;

    use bytes::BytesMut;
    use tern_chunks::fuzzing::{decode_file, Loaded};
    use tern_chunks::IndexFileProblem;
    use tern_qemu::rp::parse_rp;
    use tern_qemu::stream::parse_all;

    use super::*;
    use crate::{pages, rebuild, stream};

    fn seeds(target: &str) -> Vec<Seed> {
        all()
            .into_iter()
            .find(|(t, _)| *t == target)
            .expect("target")
            .1
    }

    fn seed_of(target: &str, name: &str) -> Vec<u8> {
        seeds(target)
            .into_iter()
            .find(|(n, _)| n == name)
            .unwrap_or_else(|| panic!("no seed {target}/{name}"))
            .1
    }

    #[test]
    fn names_are_unique_and_sizes_small() {
        let mut total = 0;
        for (target, seeds) in all() {
            let mut names: Vec<&str> = seeds.iter().map(|(n, _)| n.as_str()).collect();
            names.sort_unstable();
            names.dedup();
            assert_eq!(names.len(), seeds.len(), "{target}: two seeds share a name");
            assert!(seeds.len() <= 32, "{target}: {} seeds", seeds.len());
            for (n, b) in &seeds {
                assert!(b.len() <= 32 << 10, "{target}/{n}: {} bytes", b.len());
                total += b.len();
            }
        }
        assert!(total < 256 << 10, "{total} bytes of seeds");
    }

    #[test]
    fn frame_seeds_are_whole_frames() {
        for (name, bytes) in seeds("frames") {
            let mut b = BytesMut::from(&bytes[..]);
            while !b.is_empty() {
                assert!(matches!(tern_proto::decode(&mut b), Ok(Some(_))), "{name}");
            }
        }
    }

    #[test]
    fn stream_seeds_parse_to_their_end() {
        for name in ["stream-1k-pages", "stream-ignore-shared"] {
            let (_, end) = parse_all(&seed_of("stream_parser", name)).expect(name);
            assert!(end.tail_bytes > 0, "{name}");
        }
        let mut body = stream::HEADER.to_vec();
        body.extend_from_slice(&seed_of("stream_parser", "body-4k-pages"));
        parse_all(&body).expect("body after the default header");
        for name in ["return-path", "return-path-bitmap"] {
            let b = seed_of("stream_parser", name);
            let mut rest = &b[..];
            while !rest.is_empty() {
                let (_, n) = parse_rp(rest).expect(name).expect(name);
                rest = &rest[n..];
            }
        }
    }

    fn postcopy_commands(items: &[Item]) -> Vec<&PostcopyCommand> {
        items
            .iter()
            .filter_map(|i| match i {
                Item::Postcopy(c) => Some(c),
                _ => None,
            })
            .collect()
    }

    fn package(items: &[Item]) -> &[Item] {
        items
            .iter()
            .find_map(|i| match i {
                Item::Packaged(p) => Some(&p.items[..]),
                _ => None,
            })
            .expect("a package")
    }

    #[test]
    fn postcopy_stream_seeds_parse_to_their_end() {
        use PostcopyCommand::*;
        let (items, end) = parse_all(&seed_of("stream_parser", "postcopy-stream")).unwrap();
        assert_eq!(end.tail_bytes, 1);
        let pc = postcopy_commands(&items);
        assert!(matches!(
            pc[..],
            [Advise { .. }, RamDiscard { .. }, RamDiscard { .. }]
        ));
        let pkg = package(&items);
        assert_eq!(pkg.first(), Some(&Item::Postcopy(Listen)));
        assert_eq!(pkg.last(), Some(&Item::Postcopy(Run)));
        assert_eq!(
            pkg.iter()
                .filter(|i| matches!(i, Item::DeviceState(_)))
                .count(),
            2
        );
        // the CONTINUE after the package means the block before it
        assert!(items.iter().any(|i| matches!(
            i,
            Item::Ram(RamRecord::Zero { block, named: false, .. }) if &**block == "vga"
        )));

        let (items, _) = parse_all(&seed_of("stream_parser", "postcopy-hugepages")).unwrap();
        let sizes: Vec<_> = items
            .iter()
            .find_map(|i| match i {
                Item::Ram(RamRecord::MemSize { blocks, .. }) => {
                    Some(blocks.iter().map(|b| b.page_size).collect())
                }
                _ => None,
            })
            .expect("MEM_SIZE");
        assert_eq!(sizes, [Some(HUGE), None]);
        assert!(package(&items).contains(&Item::Command {
            cmd: cmd::PING,
            data: Bytes::from_static(&[0, 0, 0, 0x42]),
        }));
    }

    #[test]
    fn the_resumed_seed_breaks_in_a_page_and_resumes_to_its_end() {
        use tern_qemu::stream::Parser;
        let v = seed_of("stream_parser", "postcopy-resumed");
        assert_eq!(v[0], stream::RESUMED);
        let n = usize::from(u16::from_be_bytes([v[1], v[2]]));
        let (first, second) = v[3..].split_at(n);
        let (p, at) = stream::walk(Parser::new(), first);
        // stopped for want of bytes, in the page record cut short
        assert_eq!(at, first.len() - 8 - RESUMED_CUT_DATA);
        assert!(matches!(p.clone().parse(&first[at..]), Ok(None)));
        assert_eq!(
            postcopy_commands(&parse_items(first)).len(),
            2,
            "ADVISE and DISCARD"
        );
        let (r, at) = stream::walk(p.resumed(), second);
        assert_eq!(at, second.len());
        assert_eq!(r.finish().unwrap().tail_bytes, 1);
        let mut r = p.resumed();
        let mut items = Vec::new();
        let mut pos = 0;
        while let Some((it, n)) = r.parse(&second[pos..]).unwrap() {
            items.push(it);
            pos += n;
        }
        assert_eq!(
            postcopy_commands(&items),
            [
                &PostcopyCommand::RecvBitmap {
                    block: "pc.ram".into()
                },
                &PostcopyCommand::RecvBitmap {
                    block: "vga".into()
                },
                &PostcopyCommand::Resume
            ]
        );
    }

    /// The items of a stream that may end early.
    fn parse_items(b: &[u8]) -> Vec<Item> {
        let mut p = tern_qemu::stream::Parser::new();
        let mut items = Vec::new();
        let mut pos = 0;
        while let Ok(Some((it, n))) = p.parse(&b[pos..]) {
            items.push(it);
            pos += n;
        }
        items
    }

    #[test]
    fn postcopy_return_path_seeds_are_whole_messages() {
        for (name, want) in [
            ("rp-postcopy-faults", "PPPPIRRIRS"),
            ("rp-postcopy-recovery", "BBAIRS"),
        ] {
            let b = seed_of("stream_parser", name);
            let mut rest = &b[..];
            let mut got = String::new();
            while !rest.is_empty() {
                let (m, n) = parse_rp(rest).expect(name).expect(name);
                got.push(match m {
                    RpMessage::Pong(_) => 'P',
                    RpMessage::ReqPagesId { .. } => 'I',
                    RpMessage::ReqPages { .. } => 'R',
                    RpMessage::RecvBitmap { bitmap, .. } => {
                        assert_eq!(bitmap.len(), 8, "{name}");
                        'B'
                    }
                    RpMessage::ResumeAck(1) => 'A',
                    RpMessage::Shut(0) => 'S',
                    m => panic!("{name}: {m:?}"),
                });
                rest = &rest[n..];
            }
            assert_eq!(got, want, "{name}");
        }
    }

    #[test]
    fn delta_seeds_apply_but_the_broken_one() {
        for (name, bytes) in seeds("delta_apply") {
            let base_len = usize::from(u16::from_be_bytes([bytes[0], bytes[1]]));
            let base = &bytes[2..2 + base_len];
            let at = 2 + base_len;
            let d_len = usize::from(u16::from_be_bytes([bytes[at], bytes[at + 1]]));
            let d = &bytes[at + 2..at + 2 + d_len];
            let mut out = vec![0; base.len()];
            let r = delta::apply(base, d, &mut out);
            assert_eq!(r.is_ok(), name != "big-gap", "{name}: {r:?}");
        }
    }

    #[test]
    fn manifest_seeds_decode() {
        for (name, bytes) in seeds("manifest_decode") {
            Manifest::decode(&bytes).unwrap_or_else(|e| panic!("{name}: {e}"));
        }
    }

    #[test]
    fn index_file_seeds_load_as_their_names_say() {
        for (name, bytes) in seeds("chunk_index_file") {
            let key = if bytes[0] & 4 != 0 {
                0xfeed
            } else {
                index_file::SEED_KEY_ID
            };
            let loaded = decode_file(Path::new("seed"), &bytes[1..], key);
            let ok = match (name.as_str(), loaded) {
                ("needs-reindex", Loaded::RecordOnly(r, None)) => r.needs_reindex(),
                ("other-key", Loaded::RecordOnly(_, Some(p))) => {
                    matches!(p, IndexFileProblem::KeyChanged { .. })
                }
                ("damaged-body", Loaded::RecordOnly(_, Some(p))) => {
                    matches!(p, IndexFileProblem::BodyCorrupt { .. })
                }
                ("qcow2-backing", Loaded::Ok(r, _)) => r.backing_files().count() == 1,
                (_, Loaded::Ok(..)) => true,
                _ => false,
            };
            assert!(ok, "{name} did not load as intended");
        }
    }

    #[test]
    fn nbd_seeds_decode() {
        use tern_nbd::fuzzing::*;
        for (name, bytes) in seeds("nbd_replies") {
            let p = &bytes[1..];
            let ok = match bytes[0] {
                nbd::sel::STREAM => {
                    let n = reply_header_len(u32::from_be_bytes([p[0], p[1], p[2], p[3]]));
                    n.is_ok_and(|n| parse_reply_header(&p[..n]).is_ok())
                }
                nbd::sel::REPLY_HEADER => parse_reply_header(p).is_ok(),
                nbd::sel::HOLE => parse_hole(p).is_ok(),
                nbd::sel::ERROR_CHUNK => {
                    parse_error_chunk(u16::from_be_bytes([p[0], p[1]]), &p[2..]).is_ok()
                }
                nbd::sel::BLOCK_STATUS => parse_block_status(p).is_ok(),
                nbd::sel::OPTION_REPLY_HEADER => {
                    let expected = u32::from_be_bytes(p[..4].try_into().expect("4 bytes"));
                    let h: [u8; OPTION_REPLY_HEADER_LEN] = p[4..].try_into().expect("header");
                    parse_option_reply_header(&h, expected).is_ok()
                }
                nbd::sel::INFO => parse_info(p).is_ok(),
                nbd::sel::META_CONTEXT => parse_meta_context(p).is_ok(),
                nbd::sel::OPTION_ERROR => !option_error_message(p).is_empty(),
                s => panic!("{name}: selector {s}"),
            };
            assert!(ok, "{name} does not decode");
        }
    }

    #[test]
    fn qmp_seeds_are_qmp() {
        for (name, bytes) in seeds("qmp_line") {
            let text = String::from_utf8(bytes).expect("UTF-8");
            for line in text.lines().filter(|l| !l.is_empty()) {
                let r = tern_qemu::qmp::parse_qmp_line_for_fuzzing(line);
                assert_eq!(r.is_ok(), name != "no-return", "{name}: {line}");
            }
        }
    }

    #[test]
    fn page_seeds_reach_qemu_as_intended() {
        let run = |name| pages::run(&seed_of("page_decode", name));
        let o = run("every-kind");
        assert_eq!((o.written, o.waiting, o.refused), (6, 0, false), "{o:?}");
        let o = run("want-then-content");
        assert_eq!((o.written, o.waiting, o.refused), (4, 0, false), "{o:?}");
        assert!(run("bad-content").refused);
        let o = run("delta-without-base");
        assert_eq!((o.written, o.waiting, o.refused), (0, 1, false), "{o:?}");
        let o = run("out-of-range");
        assert_eq!((o.written, o.refused), (1, true), "{o:?}");
        let o = run("ram-blocks-4k");
        assert_eq!((o.written, o.waiting, o.refused), (3, 0, false), "{o:?}");
    }

    #[test]
    fn rebuild_seeds_complete_as_intended() {
        let run = |name| rebuild::run(&seed_of("chunks_rebuild", name));
        for name in ["built-all-sent", "built-dups-and-short-last"] {
            assert_eq!(run(name).completed, 1, "{name}: {:?}", run(name));
        }
        let o = run("built-corrupt-then-true");
        assert_eq!((o.taken, o.refused, o.completed), (1, 2, 1), "{o:?}");
        let o = run("built-unaligned");
        assert_eq!((o.taken, o.refused, o.completed), (2, 2, 1), "{o:?}");
        let o = run("worker-round");
        assert_eq!((o.taken, o.refused, o.completed), (2, 0, 2), "{o:?}");
        let o = run("worker-corrupt-run");
        assert_eq!((o.taken, o.refused), (0, 1), "{o:?}");
    }
}

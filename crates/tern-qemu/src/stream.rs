//! Sans-IO codec for QEMU's precopy migration stream (main channel), QEMU 7.2 to 10.x.
//!
//! [`Parser::parse`] turns bytes into [`Item`]s (header, section headers, RAM records,
//! footers, commands, and the verbatim device-state tail); [`Encoder::encode`] turns items
//! back into QEMU's bytes, byte-identical with [`NameMode::AsInput`]. The format is in
//! shared/reference/qemu-stream.md. Device state (FULL sections) has no length, so from
//! the first device FULL section after RAM's END everything is passed as [`Item::Tail`];
//! [`Parser::finish`] checks that the stream then ended with EOF (+ vmdesc).
//!
//! What tern cannot carry is refused with [`StreamError::Unsupported`], whose hint tells
//! the operator what to turn off. This module does no I/O and must never panic on input.

use std::collections::HashMap;
use std::sync::Arc;

use bytes::{BufMut, Bytes};

pub const DEFAULT_PAGE_SIZE: u64 = 4096;
pub type BlockName = Arc<str>;

const MAGIC: u32 = 0x5145_564D;
const VERSION: u32 = 3;

const T_EOF: u8 = 0x00;
const T_START: u8 = 0x01;
const T_PART: u8 = 0x02;
const T_END: u8 = 0x03;
const T_FULL: u8 = 0x04;
const T_SUBSECTION: u8 = 0x05;
const T_VMDESC: u8 = 0x06;
const T_CONFIG: u8 = 0x07;
const T_COMMAND: u8 = 0x08;
const T_FOOTER: u8 = 0x7E;

const F_ZERO: u64 = 0x02;
const F_MEM_SIZE: u64 = 0x04;
const F_PAGE: u64 = 0x08;
const F_EOS: u64 = 0x10;
const F_CONTINUE: u64 = 0x20;
const F_XBZRLE: u64 = 0x40;
const F_HOOK: u64 = 0x80;
const F_COMPRESS_PAGE: u64 = 0x100;
const F_MULTIFD_FLUSH: u64 = 0x200;

/// Command numbers that pass through.
pub mod cmd {
    pub const OPEN_RETURN_PATH: u16 = 1;
    pub const PING: u16 = 2;
    pub const SWITCHOVER_START: u16 = 11;
}

/// Largest length-prefixed thing the parser will wait for (bigger is an error).
const MAX_ITEM: usize = 16 << 20;

#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct StreamConfig {
    pub machine: Option<String>,
    pub target_page_bits: Option<u32>,
    pub capabilities: Vec<String>,
    pub uuid: Option<[u8; 16]>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Header {
    pub version: u32,
    pub config: Option<StreamConfig>,
    /// The exact bytes from the magic to the end of the configuration section.
    pub raw: Bytes,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SectionKind {
    Start,
    Part,
    End,
    Full,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SectionHeader {
    pub kind: SectionKind,
    pub section_id: u32,
    /// START and FULL only.
    pub idstr: Option<String>,
    pub instance_id: u32,
    pub version_id: u32,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RamBlockInfo {
    pub name: BlockName,
    pub used_length: u64,
    pub page_size: Option<u64>,
    pub gpa: Option<u64>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RamRecord {
    MemSize {
        total: u64,
        blocks: Vec<RamBlockInfo>,
    },
    /// `named`: the input wrote the block name (no CONTINUE flag).
    Zero {
        block: BlockName,
        offset: u64,
        fill: u8,
        named: bool,
    },
    Page {
        block: BlockName,
        offset: u64,
        data: Bytes,
        named: bool,
    },
    Eos,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Item {
    Header(Header),
    Section(SectionHeader),
    Ram(RamRecord),
    Footer {
        section_id: u32,
    },
    Command {
        cmd: u16,
        data: Bytes,
    },
    /// Verbatim device-state tail: from the first non-RAM FULL section header (after RAM's
    /// END), or a top-level EOF, to the end of input. Emitted in chunks as bytes arrive.
    Tail(Bytes),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StreamEnd {
    pub tail_bytes: u64,
    pub vmdesc_bytes: Option<u64>,
    pub vmdesc_devices: Option<usize>,
}

#[derive(Debug, thiserror::Error)]
pub enum StreamError {
    #[error("not a QEMU migration stream (magic {0:#010x})")]
    BadMagic(u32),
    #[error("unsupported stream version {0}")]
    UnsupportedVersion(u32),
    #[error("malformed stream at byte {offset}: {what}")]
    Malformed { offset: u64, what: String },
    #[error("unsupported at byte {offset}: {feature}; {hint}")]
    Unsupported {
        offset: u64,
        feature: String,
        hint: String,
    },
    #[error("stream ended early at byte {offset} (in {state})")]
    Truncated { offset: u64, state: &'static str },
}

/// How the encoder decides between a block name and the CONTINUE flag.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NameMode {
    /// Name only when the output's last block differs (own CONTINUE state).
    Auto,
    /// Honour each record's `named` (byte-identical re-encoding).
    AsInput,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Header,
    Top,
    RamBody { sid: u32 },
    Footer { sid: u32 },
    Tail,
}

/// Incremental parser; see the module doc.
pub struct Parser {
    state: State,
    offset: u64,
    page_size: u64,
    ignore_shared: bool,
    last_block: Option<BlockName>,
    blocks: Vec<RamBlockInfo>,
    block_len: HashMap<BlockName, u64>,
    ram_sid: Option<u32>,
    ram_ended: bool,
    in_end: bool,
    tail: Vec<u8>,
    /// During [`Parser::parse_bytes`]: the input, so page data can be sliced, not copied.
    shared: Option<Bytes>,
}

impl Default for Parser {
    fn default() -> Self {
        Self::new()
    }
}

/// A bounds-checked cursor over the unconsumed input. `None` = need more bytes.
struct Cur<'a> {
    b: &'a [u8],
    p: usize,
}

impl<'a> Cur<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        let s = self.b.get(self.p..self.p.checked_add(n)?)?;
        self.p += n;
        Some(s)
    }
    fn u8(&mut self) -> Option<u8> {
        Some(self.take(1)?[0])
    }
    fn be16(&mut self) -> Option<u16> {
        Some(u16::from_be_bytes(self.take(2)?.try_into().ok()?))
    }
    fn be32(&mut self) -> Option<u32> {
        Some(u32::from_be_bytes(self.take(4)?.try_into().ok()?))
    }
    fn be64(&mut self) -> Option<u64> {
        Some(u64::from_be_bytes(self.take(8)?.try_into().ok()?))
    }
    fn counted(&mut self) -> Option<&'a [u8]> {
        let n = self.u8()? as usize;
        self.take(n)
    }
    fn peek(&self) -> Option<u8> {
        self.b.get(self.p).copied()
    }
}

macro_rules! need {
    ($e:expr) => {
        match $e {
            Some(v) => v,
            None => return Ok(None),
        }
    };
}

/// For error messages only: names that reach items are checked with [`Parser::name`].
fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

impl Parser {
    pub fn new() -> Parser {
        Parser {
            state: State::Header,
            offset: 0,
            page_size: DEFAULT_PAGE_SIZE,
            ignore_shared: false,
            last_block: None,
            blocks: Vec::new(),
            block_len: HashMap::new(),
            ram_sid: None,
            ram_ended: false,
            in_end: false,
            tail: Vec::new(),
            shared: None,
        }
    }

    pub fn page_size(&self) -> u64 {
        self.page_size
    }

    /// Bytes consumed so far.
    pub fn offset(&self) -> u64 {
        self.offset
    }

    /// RAM blocks, once MEM_SIZE was seen.
    pub fn blocks(&self) -> &[RamBlockInfo] {
        &self.blocks
    }

    /// A name from the stream (machine type, idstr, block, capability). QEMU's are ASCII;
    /// anything that is not UTF-8 is refused, so re-encoding can never change the bytes.
    fn name(&self, b: &[u8], at: usize, what: &str) -> Result<String, StreamError> {
        String::from_utf8(b.to_vec())
            .map_err(|_| self.malformed(at, format!("{what} {:?} is not UTF-8", text(b))))
    }

    fn malformed(&self, at: usize, what: impl Into<String>) -> StreamError {
        StreamError::Malformed {
            offset: self.offset + at as u64,
            what: what.into(),
        }
    }

    fn unsupported(&self, at: usize, feature: &str, hint: &str) -> StreamError {
        StreamError::Unsupported {
            offset: self.offset + at as u64,
            feature: feature.into(),
            hint: hint.into(),
        }
    }

    /// Like [`Parser::parse`], but page data and tail chunks are slices of `buf` (no copy).
    pub fn parse_bytes(&mut self, buf: &Bytes) -> Result<Option<(Item, usize)>, StreamError> {
        self.shared = Some(buf.clone());
        let r = self.parse(buf);
        self.shared = None;
        r
    }

    /// `buf[start..end]` as Bytes: a slice of the shared input, or a copy.
    fn bytes_of(&self, buf: &[u8], start: usize, end: usize) -> Bytes {
        match &self.shared {
            Some(b) => b.slice(start..end),
            None => Bytes::copy_from_slice(&buf[start..end]),
        }
    }

    /// Parses the next item from `buf` (the bytes not consumed yet). Returns the item and
    /// how many bytes it took, or `None` when more bytes are needed.
    pub fn parse(&mut self, buf: &[u8]) -> Result<Option<(Item, usize)>, StreamError> {
        let r = match self.state {
            State::Header => self.header(buf),
            State::Top => self.top(buf),
            State::RamBody { sid } => self.ram_record(buf, sid),
            State::Footer { sid } => self.footer(buf, sid),
            State::Tail => {
                if buf.is_empty() {
                    Ok(None)
                } else {
                    self.tail.extend_from_slice(buf);
                    Ok(Some((
                        Item::Tail(self.bytes_of(buf, 0, buf.len())),
                        buf.len(),
                    )))
                }
            }
        }?;
        if let Some((_, n)) = &r {
            self.offset += *n as u64;
        }
        Ok(r)
    }

    fn header(&mut self, buf: &[u8]) -> Result<Option<(Item, usize)>, StreamError> {
        let mut c = Cur { b: buf, p: 0 };
        let magic = need!(c.be32());
        if magic != MAGIC {
            return Err(StreamError::BadMagic(magic));
        }
        let version = need!(c.be32());
        if version != VERSION {
            return Err(StreamError::UnsupportedVersion(version));
        }
        let mut config = None;
        if need!(c.peek()) == T_CONFIG {
            c.p += 1;
            let n = need!(c.be32()) as usize;
            if n > 4096 {
                return Err(self.malformed(c.p, format!("machine type name of {n} bytes")));
            }
            let mut cfg = StreamConfig {
                machine: Some(self.name(need!(c.take(n)), c.p, "machine type")?),
                ..Default::default()
            };
            while need!(c.peek()) == T_SUBSECTION {
                c.p += 1;
                let at = c.p;
                let name = self.name(need!(c.counted()), c.p, "configuration subsection")?;
                let _version = need!(c.be32());
                match name.as_str() {
                    "configuration/target-page-bits" => {
                        let bits = need!(c.be32());
                        if !(10..=30).contains(&bits) {
                            return Err(self.malformed(at, format!("target page bits {bits}")));
                        }
                        cfg.target_page_bits = Some(bits);
                    }
                    "configuration/capabilities" => {
                        let n = need!(c.be32());
                        if n > 256 {
                            return Err(self.malformed(at, format!("{n} configuration capabilities")));
                        }
                        for _ in 0..n {
                            let cap = self.name(need!(c.counted()), c.p, "capability")?;
                            cfg.capabilities.push(cap);
                        }
                    }
                    "configuration/uuid" => {
                        let mut u = [0u8; 16];
                        u.copy_from_slice(need!(c.take(16)));
                        cfg.uuid = Some(u);
                    }
                    other => {
                        return Err(self.unsupported(
                            at,
                            &format!("configuration subsection {other:?}"),
                            "this QEMU is newer than tern knows; migrate with a supported QEMU (7.2 to 10.x)",
                        ))
                    }
                }
            }
            if cfg.capabilities.iter().any(|c| c == "mapped-ram") {
                return Err(self.unsupported(
                    0,
                    "mapped-ram",
                    "mapped-ram is for migration to a file; turn off the mapped-ram capability",
                ));
            }
            config = Some(cfg);
        }
        // commit options only once the whole header is here
        if let Some(cfg) = &config {
            if let Some(bits) = cfg.target_page_bits {
                self.page_size = 1 << bits;
            }
            self.ignore_shared = cfg.capabilities.iter().any(|c| c == "x-ignore-shared");
        }
        self.state = State::Top;
        let raw = Bytes::copy_from_slice(&buf[..c.p]);
        Ok(Some((
            Item::Header(Header {
                version,
                config,
                raw,
            }),
            c.p,
        )))
    }

    fn enter_tail(&mut self, buf: &[u8]) -> Result<Option<(Item, usize)>, StreamError> {
        self.state = State::Tail;
        self.tail.extend_from_slice(buf);
        Ok(Some((
            Item::Tail(self.bytes_of(buf, 0, buf.len())),
            buf.len(),
        )))
    }

    fn top(&mut self, buf: &[u8]) -> Result<Option<(Item, usize)>, StreamError> {
        let mut c = Cur { b: buf, p: 0 };
        let t = need!(c.u8());
        match t {
            T_START | T_FULL => {
                let sid = need!(c.be32());
                let idstr = self.name(need!(c.counted()), c.p, "section idstr")?;
                let instance_id = need!(c.be32());
                let version_id = need!(c.be32());
                if t == T_FULL {
                    if idstr != "ram" && self.ram_ended {
                        return self.enter_tail(buf);
                    }
                    return Err(self.unsupported(
                        0,
                        &format!("device section {idstr:?} before the end of RAM (early-setup device such as virtio-mem)"),
                        "remove the early-migration device (x-early-migration) from the VM",
                    ));
                }
                if idstr != "ram" {
                    let hint = match idstr.as_str() {
                        "block" => "block migration is not supported by tern: turn off the block capability (tern migrates disks itself)",
                        "dirty-bitmap" => "dirty-bitmap migration is not supported by tern: turn off the dirty-bitmaps capability",
                        _ => "this live section (e.g. a VFIO device) cannot be carried by tern: remove the device",
                    };
                    return Err(self.unsupported(0, &format!("live section {idstr:?}"), hint));
                }
                if self.ram_sid.is_some() {
                    return Err(self.malformed(0, "second START for ram"));
                }
                self.ram_sid = Some(sid);
                self.state = State::RamBody { sid };
                let h = SectionHeader {
                    kind: SectionKind::Start,
                    section_id: sid,
                    idstr: Some(idstr),
                    instance_id,
                    version_id,
                };
                Ok(Some((Item::Section(h), c.p)))
            }
            T_PART | T_END => {
                let sid = need!(c.be32());
                if Some(sid) != self.ram_sid {
                    return Err(self.malformed(1, format!("PART/END for unknown section id {sid}")));
                }
                if self.ram_ended {
                    return Err(self.malformed(0, "RAM section continues after its END"));
                }
                self.in_end = t == T_END;
                self.state = State::RamBody { sid };
                let kind = if t == T_END {
                    SectionKind::End
                } else {
                    SectionKind::Part
                };
                let h = SectionHeader {
                    kind,
                    section_id: sid,
                    idstr: None,
                    instance_id: 0,
                    version_id: 0,
                };
                Ok(Some((Item::Section(h), c.p)))
            }
            T_COMMAND => {
                let cmd = need!(c.be16());
                let len = need!(c.be16()) as usize;
                let data = need!(c.take(len));
                let (feature, hint) = match cmd {
                    cmd::OPEN_RETURN_PATH | cmd::SWITCHOVER_START if len == 0 => {
                        return Ok(Some((
                            Item::Command {
                                cmd,
                                data: Bytes::new(),
                            },
                            c.p,
                        )))
                    }
                    cmd::PING if len == 4 => {
                        return Ok(Some((
                            Item::Command {
                                cmd,
                                data: Bytes::copy_from_slice(data),
                            },
                            c.p,
                        )))
                    }
                    cmd::OPEN_RETURN_PATH | cmd::SWITCHOVER_START | cmd::PING => {
                        return Err(
                            self.malformed(0, format!("command {cmd} with a {len}-byte payload"))
                        )
                    }
                    3..=7 => ("postcopy", "turn off the postcopy-ram capability"),
                    8 => ("COLO", "turn off the x-colo capability"),
                    9 | 10 => ("postcopy recovery", "turn off the postcopy-ram capability"),
                    _ => return Err(self.malformed(0, format!("unknown command {cmd}"))),
                };
                Err(self.unsupported(0, feature, hint))
            }
            T_EOF => self.enter_tail(buf),
            T_SUBSECTION | T_VMDESC | T_CONFIG | T_FOOTER => {
                Err(self.malformed(0, format!("item type {t:#04x} at top level")))
            }
            _ => Err(self.malformed(0, format!("unknown item type {t:#04x}"))),
        }
    }

    fn ram_record(&mut self, buf: &[u8], sid: u32) -> Result<Option<(Item, usize)>, StreamError> {
        let mut c = Cur { b: buf, p: 0 };
        let hdr = need!(c.be64());
        let mask = self.page_size - 1;
        let flags = hdr & mask;
        let addr = hdr & !mask;
        let kind = flags & !F_CONTINUE;
        let unsupported = |feature: &str, hint: &str| Err(self.unsupported(0, feature, hint));
        match kind {
            F_XBZRLE => return unsupported("XBZRLE page", "turn off the xbzrle capability"),
            F_COMPRESS_PAGE => {
                return unsupported("compressed page", "turn off the compress capability")
            }
            F_MULTIFD_FLUSH => return unsupported("multifd", "turn off the multifd capability"),
            F_HOOK => {
                return unsupported(
                    "RDMA hook",
                    "RDMA is not supported: use a TCP or unix transport",
                )
            }
            F_ZERO | F_PAGE | F_MEM_SIZE | F_EOS => {}
            _ => return Err(self.malformed(0, format!("unknown RAM flags {flags:#x}"))),
        }
        if kind == F_MEM_SIZE || kind == F_EOS {
            if flags & F_CONTINUE != 0 {
                return Err(
                    self.malformed(0, format!("CONTINUE on a non-page RAM record {flags:#x}"))
                );
            }
            if kind == F_EOS {
                if addr != 0 {
                    return Err(self.malformed(0, format!("EOS record with offset bits {addr:#x}")));
                }
                self.state = State::Footer { sid };
                return Ok(Some((Item::Ram(RamRecord::Eos), c.p)));
            }
            let total = addr;
            let mut blocks = Vec::new();
            let mut sum: u64 = 0;
            while sum < total {
                if blocks.len() >= 4096 || c.p > MAX_ITEM {
                    return Err(self.malformed(0, "RAM block list too long"));
                }
                let name = need!(c.counted());
                if name.is_empty() {
                    return Err(self.malformed(c.p, "empty RAM block name"));
                }
                let used_length = need!(c.be64());
                let gpa = if self.ignore_shared {
                    Some(need!(c.be64()))
                } else {
                    None
                };
                sum = sum
                    .checked_add(used_length)
                    .ok_or_else(|| self.malformed(0, "RAM block sizes overflow"))?;
                blocks.push(RamBlockInfo {
                    name: Arc::from(self.name(name, c.p, "RAM block name")?),
                    used_length,
                    page_size: None,
                    gpa,
                });
            }
            if sum != total {
                return Err(self.malformed(
                    0,
                    format!("RAM blocks add up to {sum}, MEM_SIZE says {total}"),
                ));
            }
            self.block_len = blocks
                .iter()
                .map(|b| (b.name.clone(), b.used_length))
                .collect();
            self.blocks = blocks.clone();
            self.last_block = None;
            return Ok(Some((Item::Ram(RamRecord::MemSize { total, blocks }), c.p)));
        }
        // a page record
        let named = flags & F_CONTINUE == 0;
        let block: BlockName = if named {
            let n = need!(c.counted());
            // strictly UTF-8: a lossy conversion would match bytes that name no block
            match std::str::from_utf8(n)
                .ok()
                .and_then(|name| self.block_len.get_key_value(name))
            {
                Some((k, _)) => k.clone(),
                None if self.blocks.is_empty() => Arc::from(self.name(n, 8, "RAM block name")?),
                None => {
                    return Err(
                        self.malformed(8, format!("page of unknown RAM block {:?}", text(n)))
                    )
                }
            }
        } else {
            match &self.last_block {
                Some(b) => b.clone(),
                None => {
                    return Err(self.malformed(0, "CONTINUE page record with no previous block"))
                }
            }
        };
        if let Some(len) = self.block_len.get(&block) {
            if addr >= *len {
                return Err(self.malformed(
                    0,
                    format!("page offset {addr:#x} outside RAM block {block:?} ({len} bytes)"),
                ));
            }
        }
        let rec = if kind == F_ZERO {
            let fill = need!(c.u8());
            RamRecord::Zero {
                block: block.clone(),
                offset: addr,
                fill,
                named,
            }
        } else {
            let data = need!(c.take(self.page_size as usize));
            RamRecord::Page {
                block: block.clone(),
                offset: addr,
                data: self.bytes_of(buf, c.p - data.len(), c.p),
                named,
            }
        };
        self.last_block = Some(block);
        Ok(Some((Item::Ram(rec), c.p)))
    }

    fn footer(&mut self, buf: &[u8], sid: u32) -> Result<Option<(Item, usize)>, StreamError> {
        let mut c = Cur { b: buf, p: 0 };
        let t = need!(c.u8());
        if t != T_FOOTER {
            return Err(self.malformed(
                0,
                format!("expected the footer of section {sid}, found byte {t:#04x}"),
            ));
        }
        let fsid = need!(c.be32());
        if fsid != sid {
            return Err(
                self.malformed(1, format!("footer for section {fsid} closes section {sid}"))
            );
        }
        if self.in_end {
            self.ram_ended = true;
        }
        self.state = State::Top;
        Ok(Some((Item::Footer { section_id: sid }, c.p)))
    }

    /// Checks, once the input reached its end with nothing left over, that the stream
    /// ended properly: in the tail, with EOF and an optional vmdesc of the right length.
    pub fn finish(&self) -> Result<StreamEnd, StreamError> {
        let state = match self.state {
            State::Header => "the header",
            State::Top => "between sections (no EOF)",
            State::RamBody { .. } => "a RAM section",
            State::Footer { .. } => "a section footer",
            State::Tail => "",
        };
        if !state.is_empty() {
            return Err(StreamError::Truncated {
                offset: self.offset,
                state,
            });
        }
        let t = &self.tail;
        let truncated = || StreamError::Truncated {
            offset: self.offset,
            state: "the device state (no EOF/vmdesc at the end)",
        };
        if t.last() == Some(&T_EOF) {
            return Ok(StreamEnd {
                tail_bytes: t.len() as u64,
                vmdesc_bytes: None,
                vmdesc_devices: None,
            });
        }
        // EOF, VMDESCRIPTION, be32 len, JSON that runs exactly to the end
        let n = t.len();
        let mut p = n.saturating_sub(6);
        loop {
            if n >= 6 && t[p] == T_EOF && t[p + 1] == T_VMDESC {
                let len = u32::from_be_bytes([t[p + 2], t[p + 3], t[p + 4], t[p + 5]]) as usize;
                if p + 6 + len == n {
                    if let Ok(v) = serde_json::from_slice::<serde_json::Value>(&t[p + 6..]) {
                        let devices = v.get("devices").and_then(|d| d.as_array()).map(|d| d.len());
                        return Ok(StreamEnd {
                            tail_bytes: n as u64,
                            vmdesc_bytes: Some(len as u64),
                            vmdesc_devices: devices,
                        });
                    }
                }
            }
            if p == 0 {
                return Err(truncated());
            }
            p -= 1;
        }
    }
}

/// Turns items back into QEMU's bytes, with its own "last block written" state.
pub struct Encoder {
    page_size: u64,
    last_block: Option<BlockName>,
}

impl Encoder {
    pub fn new(page_size: u64) -> Encoder {
        Encoder {
            page_size,
            last_block: None,
        }
    }

    pub fn page_size(&self) -> u64 {
        self.page_size
    }

    /// Writes the header of a PAGE record (its `page_size` data bytes are the caller's to
    /// append, e.g. as a separate buffer for vectored I/O), with [`NameMode::Auto`].
    pub fn page_header<B: BufMut>(&mut self, out: &mut B, block: &BlockName, offset: u64) {
        self.page_head(out, block, offset, F_PAGE, false, NameMode::Auto);
    }

    fn page_head<B: BufMut>(
        &mut self,
        out: &mut B,
        block: &BlockName,
        offset: u64,
        flag: u64,
        named: bool,
        mode: NameMode,
    ) {
        let write_name = match mode {
            NameMode::Auto => self.last_block.as_ref() != Some(block),
            NameMode::AsInput => named,
        };
        if write_name {
            out.put_slice(&(offset | flag).to_be_bytes());
            out.put_u8(block.len() as u8);
            out.put_slice(block.as_bytes());
            self.last_block = Some(block.clone());
        } else {
            out.put_slice(&(offset | flag | F_CONTINUE).to_be_bytes());
        }
    }

    pub fn encode<B: BufMut>(&mut self, item: &Item, mode: NameMode, out: &mut B) {
        match item {
            Item::Header(h) => out.put_slice(&h.raw),
            Item::Section(h) => {
                let t = match h.kind {
                    SectionKind::Start => T_START,
                    SectionKind::Part => T_PART,
                    SectionKind::End => T_END,
                    SectionKind::Full => T_FULL,
                };
                out.put_u8(t);
                out.put_slice(&h.section_id.to_be_bytes());
                if matches!(h.kind, SectionKind::Start | SectionKind::Full) {
                    let id = h.idstr.as_deref().unwrap_or("");
                    out.put_u8(id.len() as u8);
                    out.put_slice(id.as_bytes());
                    out.put_slice(&h.instance_id.to_be_bytes());
                    out.put_slice(&h.version_id.to_be_bytes());
                }
            }
            Item::Ram(RamRecord::MemSize { total, blocks }) => {
                out.put_slice(&(total | F_MEM_SIZE).to_be_bytes());
                for b in blocks {
                    out.put_u8(b.name.len() as u8);
                    out.put_slice(b.name.as_bytes());
                    out.put_slice(&b.used_length.to_be_bytes());
                    if let Some(ps) = b.page_size {
                        out.put_slice(&ps.to_be_bytes());
                    }
                    if let Some(g) = b.gpa {
                        out.put_slice(&g.to_be_bytes());
                    }
                }
                self.last_block = None;
            }
            Item::Ram(RamRecord::Zero {
                block,
                offset,
                fill,
                named,
            }) => {
                self.page_head(out, block, *offset, F_ZERO, *named, mode);
                out.put_u8(*fill);
            }
            Item::Ram(RamRecord::Page {
                block,
                offset,
                data,
                named,
            }) => {
                self.page_head(out, block, *offset, F_PAGE, *named, mode);
                out.put_slice(data);
            }
            Item::Ram(RamRecord::Eos) => out.put_slice(&F_EOS.to_be_bytes()),
            Item::Footer { section_id } => {
                out.put_u8(T_FOOTER);
                out.put_slice(&section_id.to_be_bytes());
            }
            Item::Command { cmd, data } => {
                out.put_u8(T_COMMAND);
                out.put_slice(&cmd.to_be_bytes());
                out.put_slice(&(data.len() as u16).to_be_bytes());
                out.put_slice(data);
            }
            Item::Tail(b) => out.put_slice(b),
        }
    }
}

/// Parses a whole in-memory stream (tests, tools): every item, then [`Parser::finish`].
pub fn parse_all(data: &[u8]) -> Result<(Vec<Item>, StreamEnd), StreamError> {
    let mut p = Parser::new();
    let mut items = Vec::new();
    let mut pos = 0;
    while let Some((item, n)) = p.parse(&data[pos..])? {
        items.push(item);
        pos += n;
    }
    if pos != data.len() {
        return Err(StreamError::Truncated {
            offset: pos as u64,
            state: "an item",
        });
    }
    let end = p.finish()?;
    Ok((items, end))
}

#[cfg(test)]
mod tests;

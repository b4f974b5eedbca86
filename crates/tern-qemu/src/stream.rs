//! Sans-IO codec for QEMU's migration stream (main channel), QEMU 7.2 to 10.x: precopy,
//! and postcopy's commands and package.
//!
//! [`Parser::parse`] turns bytes into [`Item`]s (header, section headers, RAM records,
//! footers, commands, and the verbatim device-state tail); [`Encoder::encode`] turns items
//! back into QEMU's bytes, byte-identical with [`NameMode::AsInput`]. The format is in
//! shared/reference/qemu-stream.md. Device state (FULL sections) has no length, so from
//! the first device FULL section after RAM's END everything is passed as [`Item::Tail`];
//! [`Parser::finish`] checks that the stream then ended with EOF (+ vmdesc).
//!
//! Postcopy (§8): ADVISE, LISTEN, RUN, RAM_DISCARD, RESUME and RECV_BITMAP are typed
//! [`Item::Postcopy`] commands. PACKAGED is one [`Item::Packaged`] holding the items of its
//! sub-stream (LISTEN, FULL device sections, PINGs, RUN, and RAM if any): the whole
//! package (at most [`MAX_PACKAGED`] bytes, QEMU's own limit) is buffered, and since its
//! end is known, each device section inside is split at its footer ([`Item::DeviceState`]
//! holds the body verbatim). The encoder recomputes the package length. After postcopy
//! recovery the source continues on a new connection with no header:
//! [`Parser::resumed`] parses that one.
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

/// Command numbers (§8). OPEN_RETURN_PATH, PING and SWITCHOVER_START pass through as
/// [`Item::Command`]; the postcopy ones are typed ([`Item::Postcopy`], [`Item::Packaged`]).
pub mod cmd {
    pub const OPEN_RETURN_PATH: u16 = 1;
    pub const PING: u16 = 2;
    pub const POSTCOPY_ADVISE: u16 = 3;
    pub const POSTCOPY_LISTEN: u16 = 4;
    pub const POSTCOPY_RUN: u16 = 5;
    pub const POSTCOPY_RAM_DISCARD: u16 = 6;
    pub const PACKAGED: u16 = 7;
    pub const ENABLE_COLO: u16 = 8;
    pub const POSTCOPY_RESUME: u16 = 9;
    pub const RECV_BITMAP: u16 = 10;
    pub const SWITCHOVER_START: u16 = 11;
}

/// Largest length-prefixed thing the parser will wait for (bigger is an error).
const MAX_ITEM: usize = 16 << 20;

/// Largest PACKAGED blob: QEMU's `MAX_VM_CMD_PACKAGED_SIZE` (its destination refuses more).
pub const MAX_PACKAGED: usize = 1 << 24;

/// The only POSTCOPY_RAM_DISCARD payload version QEMU has.
const DISCARD_VERSION: u8 = 0;

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

/// A RAM block as [`ResumeState`] keeps it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct SavedBlock {
    pub name: String,
    pub used_length: u64,
    pub page_size: Option<u64>,
    pub gpa: Option<u64>,
}

/// A parser's state between items, as a parser of the resumed stream needs it
/// ([`Parser::resume_state`]).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ResumeState {
    pub page_size: u64,
    pub host_page_size: u64,
    pub ignore_shared: bool,
    pub postcopy_page_sizes: Option<u64>,
    pub postcopy_advised: bool,
    pub blocks: Vec<SavedBlock>,
    pub ram_sid: Option<u32>,
    pub ram_ended: bool,
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

/// A byte range of a RAM block that the destination must drop (POSTCOPY_RAM_DISCARD).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DiscardRange {
    pub start: u64,
    pub length: u64,
}

/// The postcopy commands (§8), typed. Each encodes back to the bytes it was parsed from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PostcopyCommand {
    /// POSTCOPY_ADVISE with its payload: the OR of every RAM block's page size and the
    /// target page size.
    Advise {
        page_sizes: u64,
        target_page_size: u64,
    },
    /// POSTCOPY_ADVISE with no payload: postcopy of dirty bitmaps only, not of RAM.
    AdviseBitmapsOnly,
    /// First item of the package: the destination starts listening for page faults.
    Listen,
    /// Last item of the package: the destination starts the guest.
    Run,
    /// Pages sent in precopy and dirtied since, in bytes within `block`.
    RamDiscard {
        block: BlockName,
        ranges: Vec<DiscardRange>,
    },
    /// Postcopy recovery, on the new connection.
    Resume,
    /// Postcopy recovery: asks the destination for `block`'s received-page bitmap (it
    /// answers on the return path).
    RecvBitmap { block: BlockName },
}

/// A PACKAGED command's sub-stream, as items. Its length on the wire is that of their
/// encoding.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Package {
    pub items: Vec<Item>,
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
    Postcopy(PostcopyCommand),
    Packaged(Package),
    /// Inside a [`Package`] only: the body of the device section (FULL) just before it,
    /// verbatim, up to its footer.
    DeviceState(Bytes),
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
    RamBody {
        sid: u32,
    },
    /// Inside a package only, where the whole body is in the buffer.
    DeviceBody {
        sid: u32,
    },
    Footer {
        sid: u32,
    },
    Tail,
}

/// Incremental parser; see the module doc.
#[derive(Clone)]
pub struct Parser {
    state: State,
    offset: u64,
    page_size: u64,
    host_page_size: u64,
    ignore_shared: bool,
    /// POSTCOPY_ADVISE's page-size summary, once seen.
    postcopy_page_sizes: Option<u64>,
    postcopy_advised: bool,
    /// This parser reads a PACKAGED blob (the whole of it is in every `buf`).
    in_package: bool,
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
    fn peek_be64(&self) -> Option<u64> {
        let s = self.b.get(self.p..self.p.checked_add(8)?)?;
        Some(u64::from_be_bytes(s.try_into().ok()?))
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
            host_page_size: DEFAULT_PAGE_SIZE,
            ignore_shared: false,
            postcopy_page_sizes: None,
            postcopy_advised: false,
            in_package: false,
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

    /// The source host's page size (default 4096), which decides, with postcopy, which RAM
    /// blocks carry a page size in MEM_SIZE (those whose page size differs from it).
    /// Ignored unless a power of two.
    pub fn set_host_page_size(&mut self, size: u64) {
        if size.is_power_of_two() {
            self.host_page_size = size;
        }
    }

    /// POSTCOPY_ADVISE was seen (with or without a RAM page-size summary).
    pub fn postcopy_advised(&self) -> bool {
        self.postcopy_advised
    }

    /// POSTCOPY_ADVISE's summary: the OR of every RAM block's page size.
    pub fn postcopy_page_sizes(&self) -> Option<u64> {
        self.postcopy_page_sizes
    }

    /// What a parser of the stream resumed after postcopy recovery needs of this one: for
    /// a process that did not read the stream before (an agent restarted mid-post-copy),
    /// kept on disk meanwhile; [`Parser::from_resume_state`] makes that parser.
    pub fn resume_state(&self) -> ResumeState {
        ResumeState {
            page_size: self.page_size,
            host_page_size: self.host_page_size,
            ignore_shared: self.ignore_shared,
            postcopy_page_sizes: self.postcopy_page_sizes,
            postcopy_advised: self.postcopy_advised,
            blocks: self
                .blocks
                .iter()
                .map(|b| SavedBlock {
                    name: b.name.to_string(),
                    used_length: b.used_length,
                    page_size: b.page_size,
                    gpa: b.gpa,
                })
                .collect(),
            ram_sid: self.ram_sid,
            ram_ended: self.ram_ended,
        }
    }

    /// The parser [`Parser::resumed`] would make of the parser `s` came from.
    pub fn from_resume_state(s: ResumeState) -> Parser {
        let blocks: Vec<RamBlockInfo> = s
            .blocks
            .into_iter()
            .map(|b| RamBlockInfo {
                name: b.name.into(),
                used_length: b.used_length,
                page_size: b.page_size,
                gpa: b.gpa,
            })
            .collect();
        let mut p = Parser::new();
        p.page_size = s.page_size;
        p.host_page_size = s.host_page_size;
        p.ignore_shared = s.ignore_shared;
        p.postcopy_page_sizes = s.postcopy_page_sizes;
        p.postcopy_advised = s.postcopy_advised;
        p.block_len = blocks
            .iter()
            .map(|b| (b.name.clone(), b.used_length))
            .collect();
        p.blocks = blocks;
        p.ram_sid = s.ram_sid;
        p.ram_ended = s.ram_ended;
        p.resumed()
    }

    /// A parser for the new main connection after postcopy recovery: the source sends no
    /// header there and continues the RAM section (RECV_BITMAP, RESUME, PART ram ...), so
    /// this one starts between items and keeps the RAM blocks and postcopy state. The
    /// source forgets its last block on a new channel, so CONTINUE state starts empty.
    pub fn resumed(&self) -> Parser {
        let mut p = self.clone();
        p.state = State::Top;
        p.offset = 0;
        p.last_block = None;
        p.in_end = false;
        p.tail = Vec::new();
        p.shared = None;
        p.in_package = false;
        p
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
            State::DeviceBody { sid } => self.device_body(buf, sid),
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
                    if self.in_package {
                        if idstr == "ram" {
                            return Err(self.malformed(0, "FULL section for ram in the package"));
                        }
                        self.state = State::DeviceBody { sid };
                        let h = SectionHeader {
                            kind: SectionKind::Full,
                            section_id: sid,
                            idstr: Some(idstr),
                            instance_id,
                            version_id,
                        };
                        return Ok(Some((Item::Section(h), c.p)));
                    }
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
                if cmd == cmd::PACKAGED {
                    return self.packaged(c, data);
                }
                let item = self.command(cmd, data)?;
                Ok(Some((item, c.p)))
            }
            T_EOF if self.in_package => Err(self.malformed(0, "EOF inside the package")),
            T_EOF => self.enter_tail(buf),
            T_SUBSECTION | T_VMDESC | T_CONFIG | T_FOOTER => {
                Err(self.malformed(0, format!("item type {t:#04x} at top level")))
            }
            _ => Err(self.malformed(0, format!("unknown item type {t:#04x}"))),
        }
    }

    /// A command other than PACKAGED; `data` is its whole payload. Errors point at the
    /// command's type byte.
    fn command(&mut self, cmd: u16, data: &[u8]) -> Result<Item, StreamError> {
        let len = data.len();
        let bad =
            |this: &Self| this.malformed(0, format!("command {cmd} with a {len}-byte payload"));
        let pc = |c: PostcopyCommand| Ok(Item::Postcopy(c));
        match cmd {
            cmd::OPEN_RETURN_PATH | cmd::SWITCHOVER_START if len == 0 => Ok(Item::Command {
                cmd,
                data: Bytes::new(),
            }),
            cmd::PING if len == 4 => Ok(Item::Command {
                cmd,
                data: Bytes::copy_from_slice(data),
            }),
            cmd::POSTCOPY_ADVISE if len == 0 => {
                self.postcopy_advised = true;
                pc(PostcopyCommand::AdviseBitmapsOnly)
            }
            cmd::POSTCOPY_ADVISE if len == 16 => {
                let mut c = Cur { b: data, p: 0 };
                let (page_sizes, tps) = match (c.be64(), c.be64()) {
                    (Some(a), Some(b)) => (a, b),
                    _ => return Err(bad(self)),
                };
                if tps != self.page_size {
                    return Err(self.malformed(
                        0,
                        format!(
                            "POSTCOPY_ADVISE says target pages of {tps} bytes, the stream has {}",
                            self.page_size
                        ),
                    ));
                }
                // an OR of powers of two, each at least the target page size
                if page_sizes == 0 || page_sizes % tps != 0 {
                    return Err(self.malformed(
                        0,
                        format!("POSTCOPY_ADVISE page-size summary {page_sizes:#x}"),
                    ));
                }
                if self.ram_sid.is_some() {
                    return Err(self.malformed(0, "POSTCOPY_ADVISE after RAM's START"));
                }
                self.postcopy_advised = true;
                self.postcopy_page_sizes = Some(page_sizes);
                pc(PostcopyCommand::Advise {
                    page_sizes,
                    target_page_size: tps,
                })
            }
            cmd::POSTCOPY_LISTEN if len == 0 => pc(PostcopyCommand::Listen),
            cmd::POSTCOPY_RUN if len == 0 => pc(PostcopyCommand::Run),
            cmd::POSTCOPY_RESUME if len == 0 => pc(PostcopyCommand::Resume),
            cmd::POSTCOPY_RAM_DISCARD => self.discard(data).map(Item::Postcopy),
            cmd::RECV_BITMAP if len >= 2 && 1 + data[0] as usize == len => {
                let block = self.known_block(&data[1..], 5, "RECV_BITMAP")?;
                pc(PostcopyCommand::RecvBitmap { block })
            }
            cmd::OPEN_RETURN_PATH
            | cmd::SWITCHOVER_START
            | cmd::PING
            | cmd::POSTCOPY_ADVISE
            | cmd::POSTCOPY_LISTEN
            | cmd::POSTCOPY_RUN
            | cmd::POSTCOPY_RESUME
            | cmd::RECV_BITMAP => Err(bad(self)),
            cmd::ENABLE_COLO => Err(self.unsupported(0, "COLO", "turn off the x-colo capability")),
            _ => Err(self.malformed(0, format!("unknown command {cmd}"))),
        }
    }

    /// POSTCOPY_RAM_DISCARD: u8 version 0, counted block name, u8 0, then (be64 start,
    /// be64 length) pairs in bytes, at least one (QEMU refuses fewer).
    fn discard(&self, data: &[u8]) -> Result<PostcopyCommand, StreamError> {
        let bad = |what: String| self.malformed(5, format!("POSTCOPY_RAM_DISCARD: {what}"));
        let mut c = Cur { b: data, p: 0 };
        let version = c.u8().ok_or_else(|| bad("empty payload".into()))?;
        if version != DISCARD_VERSION {
            return Err(bad(format!("version {version}")));
        }
        let name = c
            .counted()
            .filter(|n| !n.is_empty())
            .ok_or_else(|| bad("no block name".into()))?;
        if c.u8() != Some(0) {
            return Err(bad("no terminator after the block name".into()));
        }
        let block = self.known_block(name, 7, "POSTCOPY_RAM_DISCARD")?;
        let rest = &data[c.p..];
        if rest.is_empty() || !rest.len().is_multiple_of(16) {
            return Err(bad(format!(
                "{} bytes of ranges, not a positive multiple of 16",
                rest.len()
            )));
        }
        let block_len = self.block_len.get(&block).copied();
        let mut ranges = Vec::with_capacity(rest.len() / 16);
        while let (Some(start), Some(length)) = (c.be64(), c.be64()) {
            let end = start.checked_add(length);
            if start % self.page_size != 0 || length % self.page_size != 0 {
                return Err(bad(format!(
                    "range {start:#x}+{length:#x} not aligned to target pages"
                )));
            }
            match (end, block_len) {
                (None, _) => return Err(bad(format!("range {start:#x}+{length:#x} overflows"))),
                (Some(e), Some(l)) if e > l => {
                    return Err(bad(format!(
                        "range {start:#x}+{length:#x} outside RAM block {block:?} ({l} bytes)"
                    )))
                }
                _ => {}
            }
            ranges.push(DiscardRange { start, length });
        }
        Ok(PostcopyCommand::RamDiscard { block, ranges })
    }

    /// A block name in a command: one of MEM_SIZE's blocks (any UTF-8 name before it).
    fn known_block(&self, n: &[u8], at: usize, what: &str) -> Result<BlockName, StreamError> {
        match std::str::from_utf8(n)
            .ok()
            .and_then(|name| self.block_len.get_key_value(name))
        {
            Some((k, _)) => Ok(k.clone()),
            None if self.blocks.is_empty() => Ok(Arc::from(self.name(n, at, "RAM block name")?)),
            None => Err(self.malformed(at, format!("{what} of unknown RAM block {:?}", text(n)))),
        }
    }

    /// PACKAGED: `data` is its 4-byte payload (the blob's length); the blob follows in
    /// `buf` after `c`. Parses the blob as a sub-stream with a copy of this parser's state
    /// and takes that state back (RAM's CONTINUE state, RAM's end) when it parsed whole.
    fn packaged(
        &mut self,
        mut c: Cur<'_>,
        data: &[u8],
    ) -> Result<Option<(Item, usize)>, StreamError> {
        if self.in_package {
            return Err(self.malformed(0, "PACKAGED inside a package"));
        }
        let len = match data.try_into() {
            Ok(b) => u32::from_be_bytes(b) as usize,
            Err(_) => {
                return Err(self.malformed(
                    0,
                    format!("PACKAGED command with a {}-byte payload", data.len()),
                ))
            }
        };
        if len > MAX_PACKAGED {
            return Err(self.malformed(
                1,
                format!("PACKAGED of {len} bytes (at most {MAX_PACKAGED})"),
            ));
        }
        let start = c.p;
        let blob = need!(c.take(len));
        let mut sub = self.clone();
        sub.state = State::Top;
        sub.in_package = true;
        sub.offset = self.offset + start as u64;
        let shared = self.shared.as_ref().map(|b| b.slice(start..start + len));
        let mut items = Vec::new();
        let mut pos = 0;
        while pos < blob.len() {
            // page data and device state stay slices of the caller's buffer
            sub.shared = shared.as_ref().map(|b| b.slice(pos..));
            match sub.parse(&blob[pos..])? {
                Some((item, n)) => {
                    items.push(item);
                    pos += n;
                }
                None => {
                    return Err(StreamError::Malformed {
                        offset: sub.offset,
                        what: "the package ends inside an item".into(),
                    })
                }
            }
        }
        if sub.state != State::Top {
            return Err(StreamError::Malformed {
                offset: sub.offset,
                what: "the package ends inside a section".into(),
            });
        }
        sub.in_package = false;
        sub.shared = self.shared.take();
        sub.offset = self.offset;
        *self = sub;
        Ok(Some((Item::Packaged(Package { items }), c.p)))
    }

    /// The body of a device section inside a package, up to its footer `7E sid`. Device
    /// state has no length: the footer is the first `7E sid` followed by the end of the
    /// package or by something that parses as the start of a next item. A device body that
    /// happened to hold such bytes would be split early: the items would then name the wrong
    /// bytes as its body, but the bytes, and their re-encoding, stay the same.
    fn device_body(&mut self, buf: &[u8], sid: u32) -> Result<Option<(Item, usize)>, StreamError> {
        if !self.in_package {
            return Err(self.malformed(0, "device section body outside a package"));
        }
        let mut pat = [T_FOOTER, 0, 0, 0, 0];
        pat[1..].copy_from_slice(&sid.to_be_bytes());
        let mut from = 0;
        while let Some(i) = buf[from..].windows(5).position(|w| w == pat) {
            let q = from + i;
            if self.plausible_next(&buf[q + 5..]) {
                self.state = State::Footer { sid };
                return Ok(Some((Item::DeviceState(self.bytes_of(buf, 0, q)), q)));
            }
            from = q + 1;
        }
        Err(self.malformed(
            0,
            format!("device section {sid} in the package has no footer"),
        ))
    }

    /// Whether `rest` (inside a package, after a candidate footer) starts like an item.
    fn plausible_next(&self, rest: &[u8]) -> bool {
        let mut c = Cur { b: rest, p: 0 };
        match c.u8() {
            None => true,
            Some(T_FULL) => {
                let name = c.be32().and_then(|_| c.counted());
                matches!(name, Some(n) if !n.is_empty() && n.iter().all(|b| b.is_ascii_graphic()))
                    && c.take(8).is_some()
            }
            Some(T_COMMAND) => match (c.be16(), c.be16()) {
                (Some(cmd), Some(len)) => (1..=11).contains(&cmd) && c.take(len as usize).is_some(),
                _ => false,
            },
            Some(T_PART | T_END) => self.ram_sid.is_some() && c.be32() == self.ram_sid,
            _ => false,
        }
    }

    /// With postcopy-ram, MEM_SIZE gives a block's page size only when it differs from the
    /// host page size, and nothing marks it. ADVISE's summary says whether any block does;
    /// if so, the next be64 is taken as a page size when it is one of the summary's sizes
    /// (other than the host's) and divides the block: a next block's name-length byte, EOS
    /// or MULTIFD_FLUSH never is. (With x-ignore-shared as well, a block at a GPA equal to
    /// one of those sizes would be misread; QEMU gives no way to tell.) `None` = need more
    /// bytes.
    fn block_page_size(&self, c: &Cur<'_>, used_length: u64) -> Option<Option<u64>> {
        let summary = match self.postcopy_page_sizes {
            Some(s) if s != self.host_page_size => s,
            _ => return Some(None),
        };
        let v = c.peek_be64()?;
        let is_page_size = v.is_power_of_two()
            && v != self.host_page_size
            && v >= self.page_size
            && v & summary != 0
            && used_length.is_multiple_of(v);
        Some(is_page_size.then_some(v))
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
                let page_size = need!(self.block_page_size(&c, used_length));
                if page_size.is_some() {
                    c.p += 8;
                }
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
                    page_size,
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
            State::DeviceBody { .. } => "a device section",
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
            Item::Postcopy(c) => encode_postcopy(c, out),
            Item::Packaged(pkg) => {
                let mut inner = Vec::new();
                for it in &pkg.items {
                    self.encode(it, mode, &mut inner);
                }
                command_head(out, cmd::PACKAGED, 4);
                out.put_u32(inner.len() as u32);
                out.put_slice(&inner);
            }
            Item::DeviceState(b) | Item::Tail(b) => out.put_slice(b),
        }
    }
}

fn command_head<B: BufMut>(out: &mut B, cmd: u16, len: usize) {
    out.put_u8(T_COMMAND);
    out.put_u16(cmd);
    out.put_u16(len as u16);
}

/// The wire form of a postcopy command. A RAM_DISCARD's payload must fit a be16 length
/// (at most 4091 ranges; QEMU sends 12 per command).
fn encode_postcopy<B: BufMut>(c: &PostcopyCommand, out: &mut B) {
    match c {
        PostcopyCommand::Advise {
            page_sizes,
            target_page_size,
        } => {
            command_head(out, cmd::POSTCOPY_ADVISE, 16);
            out.put_u64(*page_sizes);
            out.put_u64(*target_page_size);
        }
        PostcopyCommand::AdviseBitmapsOnly => command_head(out, cmd::POSTCOPY_ADVISE, 0),
        PostcopyCommand::Listen => command_head(out, cmd::POSTCOPY_LISTEN, 0),
        PostcopyCommand::Run => command_head(out, cmd::POSTCOPY_RUN, 0),
        PostcopyCommand::Resume => command_head(out, cmd::POSTCOPY_RESUME, 0),
        PostcopyCommand::RamDiscard { block, ranges } => {
            command_head(
                out,
                cmd::POSTCOPY_RAM_DISCARD,
                3 + block.len() + 16 * ranges.len(),
            );
            out.put_u8(DISCARD_VERSION);
            out.put_u8(block.len() as u8);
            out.put_slice(block.as_bytes());
            out.put_u8(0);
            for r in ranges {
                out.put_u64(r.start);
                out.put_u64(r.length);
            }
        }
        PostcopyCommand::RecvBitmap { block } => {
            command_head(out, cmd::RECV_BITMAP, 1 + block.len());
            out.put_u8(block.len() as u8);
            out.put_slice(block.as_bytes());
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

//! Fuzz targets for every tern decoder that takes bytes from outside the process: the
//! agent-to-agent frames, QEMU's migration stream and return path, what a destination does
//! with pages (decoding, the memory digest) and disk pieces (manifests, the rebuild), page
//! deltas, the chunk index's files, NBD replies and QMP lines.
//!
//! Owns one `pub fn NAME(data: &[u8])` per target: it feeds the bytes to the decoder and
//! asserts what must hold (no panic; what decodes re-encodes the same where an encoder
//! exists; decoded lengths and offsets stay within bounds). The same functions run under
//! libFuzzer (`fuzz/fuzz_targets/NAME.rs`, nightly or `RUSTC_BOOTSTRAP=1`) and, on stable,
//! in `tests/corpus.rs`: every file of `fuzz/corpus/NAME/`, then a fixed budget of
//! deterministic mutations. [`seeds`] makes that corpus. A failing assertion is a panic,
//! which is what both runners report as a crash.
//!
//! Must not: hold decoding logic of its own beyond what a property needs, or be a
//! dependency of production code. The decoders' own crates keep their unit tests and
//! proptests; a crash found here becomes a unit test there.
#![forbid(unsafe_code)]

mod delta;
mod disk_worker;
mod frames;
mod index_file;
mod input;
mod manifest;
mod nbd;
mod pages;
mod qmp;
mod rebuild;
pub mod seeds;
mod stream;

/// A fuzz target: takes any bytes, panics only on a bug.
pub type Target = fn(&[u8]);

/// Every target by name (the name of its libFuzzer binary and of its corpus directory).
pub const TARGETS: &[(&str, Target)] = &[
    ("frames", frames),
    ("stream_parser", stream_parser),
    ("delta_apply", delta_apply),
    ("manifest_decode", manifest_decode),
    ("chunk_index_file", chunk_index_file),
    ("nbd_replies", nbd_replies),
    ("qmp_line", qmp_line),
    ("page_decode", page_decode),
    ("chunks_rebuild", chunks_rebuild),
    ("disk_worker", disk_worker),
];

/// tern frames (`tern_proto::decode`): no panic; every decoded message re-encodes to
/// [`tern_proto::frame_len`] bytes (plain and as segments alike) that decode to the same
/// message, a frame cut short needs more bytes, and the same holds through lz4 and zstd
/// ([`tern_proto::FrameCompressor`]).
pub fn frames(data: &[u8]) {
    frames::run(data)
}

/// QEMU's migration stream (`tern_qemu::stream::Parser`: precopy, post-copy, and after a
/// first byte 2 a stream resumed after post-copy recovery, `Parser::resumed`) and return
/// path (`tern_qemu::rp::parse_rp`): no panic; what parses re-encodes to the same bytes,
/// and parsing from shared `Bytes` gives the same items as from a slice.
pub fn stream_parser(data: &[u8]) {
    stream::run(data)
}

/// `tern_store::delta::apply` on a (base, delta) split from the input: no panic, and a
/// delta that applies is re-derived by `diff`; plus `diff` then `apply` on two pages made
/// from the input gives the new page back, within the size limit.
pub fn delta_apply(data: &[u8]) {
    delta::run(data)
}

/// `tern_chunks::Manifest::decode`: no panic; what decodes re-encodes identically, and its
/// blocks lie within its range, in order, counted consistently.
pub fn manifest_decode(data: &[u8]) {
    manifest::run(data)
}

/// The chunk index's per-image file (`tern_chunks::fuzzing::decode_file`), as read and
/// with its checksums made valid so that the fuzzer reaches the record and the body: no
/// panic; what loads agrees with its record and loads the same after re-encoding.
pub fn chunk_index_file(data: &[u8]) {
    index_file::run(data)
}

/// tern-nbd's reply decoders (`tern_nbd::fuzzing`): option reply headers, NBD_REP_INFO,
/// meta contexts, reply headers, holes, error chunks, block status, and a reply stream
/// walked as the client does: no panic; decoded fields re-encode to the input.
pub fn nbd_replies(data: &[u8]) {
    nbd::run(data)
}

/// A QMP line (`tern_qemu::qmp::parse_qmp_line_for_fuzzing`: replies, events, the greeting's
/// version) and `MigrationInfo::from_json`: no panic; a line is refused exactly when it is
/// not JSON or is a reply with an id but neither `return` nor `error`.
pub fn qmp_line(data: &[u8]) {
    qmp::run(data)
}

/// The destination's page handling: `Pages` and `Content` frames through
/// `tern_engine::pages::PageDecoder` (with a small in-memory page store) in the
/// order `tern_engine::dest` applies them, and `tern_engine::digest::MemoryDigest` over the
/// records that reach QEMU: no panic; resolved content matches the hash it was named by;
/// the decoder refuses nothing the digest would accept; the digest equals one taken over
/// the final memory image in another order.
pub fn page_decode(data: &[u8]) {
    pages::run(data);
}

/// `tern_chunks::Rebuild` into an in-memory target, as the destination's disk worker drives
/// it: a manifest (built from a disk made from the input, or decoded) and runs of received
/// data, true or corrupted: no panic; `receive_run` takes exactly the runs whose blocks are
/// all wanted and match, writes nothing when it refuses, and never writes outside the
/// manifest's range; a complete rebuild holds the source's blocks.
pub fn chunks_rebuild(data: &[u8]) {
    rebuild::run(data);
}

/// The destination's disk worker itself (`tern_engine::disk`), disks in memory:
/// whatever disk frames a source sends, no panic and no write outside a disk (the
/// in-memory disk asserts it); bad frames are refused, not applied.
pub fn disk_worker(data: &[u8]) {
    disk_worker::run(data);
}

//! Target `disk_worker`: the destination's real disk worker (`tern_engine::disk`,
//! through its `fuzzing` entry: disks in memory, an empty chunk index) fed the disk frames
//! a source may send. It must refuse what is wrong (out of range, out of order, not
//! wanted, not matching) and never write outside a disk.
//!
//! Input: a mode byte (ignored), `be16 short` (the disk is 64 blocks less `short % 4096`
//! bytes, as in `chunks_rebuild`'s frame mode, whose seeds this target shares), then tern
//! frames.

use std::sync::OnceLock;

use bytes::BytesMut;
use tern_engine::disk::SharedIndex;
use tern_proto::{decode, Message};

use crate::input::Input;
use crate::rebuild;

/// One empty chunk index for the process (an index is files on disk).
fn index() -> SharedIndex {
    static INDEX: OnceLock<(tempfile::TempDir, SharedIndex)> = OnceLock::new();
    INDEX
        .get_or_init(|| {
            let dir = tempfile::tempdir().expect("a temporary directory");
            let idx = tern_chunks::ChunkIndex::open(dir.path().join("chunks"), rebuild::hasher())
                .expect("an empty chunk index");
            (dir, std::sync::Arc::new(std::sync::Mutex::new(idx)))
        })
        .1
        .clone()
}

pub(crate) fn run(data: &[u8]) {
    let mut input = Input::new(data);
    let _mode = input.u8();
    let short = input.u16();
    let size = rebuild::worker_disk_size(short);
    let mut buf = BytesMut::from(input.rest());
    let mut msgs: Vec<Message> = Vec::new();
    while let Ok(Some(m)) = decode(&mut buf) {
        msgs.push(m);
        if msgs.len() >= 256 {
            break;
        }
    }
    // a claimed allocation of the whole disk: the free-space watch stays out of it
    let _ =
        tern_engine::disk::fuzzing::disk_worker(&[size], size, index(), rebuild::hasher(), msgs);
}

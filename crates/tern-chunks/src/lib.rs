//! tern's storage migration without shared storage: a per-host chunk index of disk
//! images, chunk manifests for the wire, and rebuilding a disk at the destination from
//! the chunks it holds plus the ones it is sent.
//!
//! ```text
//!  source                                        destination
//!  disk --read, hash 4 KiB blocks--> Manifest --encode--> bytes --decode--> Manifest
//!                                                          plan(&manifest, &ChunkIndex)
//!                                                          have | want | dups | zeros
//!        <------------------------------- want offsets ----------------------
//!  blocks at want offsets ----------------------------> Rebuild::receive  (hash-checked)
//!                                                       Rebuild::apply_local (index reads,
//!                                                       hash-checked)  -> BlockTarget
//! ```
//!
//! - [`ChunkIndex`] (`index`): hash -> one (image, offset) on this host where that
//!   content can be read, over raw and qcow2 images (qcow2 through a private read-only
//!   qemu-nbd, so backing files count); persisted one file per image (`persist`);
//!   refreshed per image by file stamps; every read re-checks the hash.
//! - [`Manifest`] (`manifest`): a disk range as DATA hashes, ZERO runs and UNCHANGED
//!   runs, with a canonical compact encoding whose decoder takes untrusted input.
//! - [`scan_image`] (`scan`): an image read whole into a [`Manifest`] (the source's
//!   side, and the index's reader).
//! - [`plan()`] (`plan`) and [`Rebuild`] (`rebuild`): the destination's side.
//! - [`NbdTarget`] (`nbd_target`): a [`BlockTarget`] writing through NBD, e.g. into the
//!   incoming destination QEMU's writable export of its disk.
//!
//! Hashes are [`tern_store::ContentHasher`]'s: keyed with the cluster key, so references
//! are comparable cluster-wide and a guest cannot craft collisions; reading a chunk back
//! verifies it anyway, so a stale index entry costs a re-fetch, never corrupt data.
//! The API is blocking (file and NBD I/O on the caller's thread): from async code call it
//! through `spawn_blocking`. No sockets to peers here: the agent carries the bytes.
#![forbid(unsafe_code)]

mod image;
mod index;
mod manifest;
mod nbd_target;
mod persist;
mod plan;
mod rebuild;
mod scan;

pub use image::{ImageFormat, OpenImageError, ReadImageError};
pub use index::{
    AddImageError, ChunkIndex, ImageId, ImageRecord, ImageStats, IndexStats, Location,
    OpenIndexError, ReadChunkError, RefreshReport, RemoveImageError, ScannedImage,
};
pub use manifest::{Block, DecodeManifestError, Manifest, ManifestError, BLOCK_BYTES, BLOCK_SIZE};
pub use nbd_target::{NbdTarget, OpenNbdTargetError};
pub use persist::IndexFileProblem;
pub use plan::{plan, Plan};
pub use rebuild::{
    ApplyLocalError, BlockTarget, FinishRebuildError, LocalApply, RawFileTarget, Rebuild,
    RebuildProgress, ReceiveChunkError, WriteZeroesError,
};
pub use scan::{sample_image, scan_image, ImageSample, ScanImageError};
pub use tern_store::{ContentHasher, Hash};

/// The index file format's encoder and decoder, for the fuzz targets in `crates/tern-fuzz`.
/// Not an API: no stability promise.
#[doc(hidden)]
pub mod fuzzing {
    pub use crate::persist::{decode_file, encode_file, Loaded};
}

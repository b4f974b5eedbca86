//! [`ChunkIndex`]: this host's map from chunk hash to one place the chunk can be read
//! (image, offset), over a set of indexed images, persisted in a directory.
//!
//! Owns the in-memory map, the per-image records, the image files under `DIR/images/`
//! (format in `persist`), and the cache of open image readers. Must not talk to peers or
//! trust its own entries: [`ChunkIndex::read_chunk`] re-hashes what it reads.
//!
//! Incrementality is per image: [`ChunkIndex::refresh`] stats every image (and its backing
//! files) and re-reads only those whose device, inode, size, mtime or ctime changed, plus
//! those a failed hash check marked suspect; an unchanged image is never read. A changed
//! image is re-read whole: comparing per-region fingerprints would need the region to be
//! read anyway, so nothing cheaper exists without the writer's help (a dirty bitmap).
//!
//! Blocking: indexing and reading do file and NBD I/O on the calling thread; from async
//! code call through `spawn_blocking`. One process owns a directory at a time.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::hash::{BuildHasherDefault, Hasher};
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use tern_store::{ContentHasher, Hash};

use crate::image::{
    qcow2_info, FileStamp, ImageFormat, ImageReader, OpenImageError, ReadImageError,
};
use crate::manifest::{Manifest, BLOCK_BYTES, BLOCK_SIZE};
use crate::persist::{self, IndexFileProblem, Loaded};
use crate::scan::scan_reader;

/// Open image readers kept for [`ChunkIndex::read_chunk`] (each qcow2 one is a qemu-nbd).
const MAX_OPEN_READERS: usize = 8;
/// Bits of a packed location that hold the block number (4 PiB images); the rest (24
/// bits) hold the image id.
const BLOCK_BITS: u32 = 40;
const MAX_IMAGE_ID: u32 = (1 << (64 - BLOCK_BITS)) - 1;

/// An indexed image's id within one index (the name of its file, `DIR/images/<id>.tci`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ImageId(pub u32);

/// Where a chunk can be read on this host: a block of an indexed image, and the hash it
/// had when indexed (checked again on every read).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Location {
    pub image: ImageId,
    /// Byte offset of the block in the image's guest-visible content (4 KiB aligned).
    pub offset: u64,
    pub hash: Hash,
}

/// What the index knows about one image.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageRecord {
    pub(crate) id: ImageId,
    pub(crate) path: PathBuf,
    pub(crate) format: ImageFormat,
    pub(crate) virtual_size: u64,
    pub(crate) data_blocks: u64,
    pub(crate) zero_blocks: u64,
    /// The image file first, then its backing files.
    pub(crate) stamps: Vec<FileStamp>,
    /// Its blocks are not in the index (damaged index file, failed re-index): the next
    /// refresh re-indexes it.
    pub(crate) needs_reindex: bool,
}

impl ImageRecord {
    pub fn id(&self) -> ImageId {
        self.id
    }
    /// Canonical path of the image file.
    pub fn path(&self) -> &Path {
        &self.path
    }
    pub fn format(&self) -> ImageFormat {
        self.format
    }
    /// Guest-visible size in bytes.
    pub fn virtual_size(&self) -> u64 {
        self.virtual_size
    }
    /// Size of the image file itself when indexed.
    pub fn file_size(&self) -> u64 {
        self.stamps[0].size
    }
    /// Modification time of the image file when indexed, nanoseconds since the epoch.
    pub fn mtime_ns(&self) -> i64 {
        self.stamps[0].mtime_ns
    }
    /// Non-zero 4 KiB blocks.
    pub fn data_blocks(&self) -> u64 {
        self.data_blocks
    }
    pub fn zero_blocks(&self) -> u64 {
        self.zero_blocks
    }
    /// Backing files (qcow2), nearest first; a change to any of them re-indexes the image.
    pub fn backing_files(&self) -> impl Iterator<Item = &Path> {
        self.stamps[1..].iter().map(|s| s.path.as_path())
    }
    /// True while the image's blocks are missing from the index (see [`ChunkIndex::refresh`]).
    pub fn needs_reindex(&self) -> bool {
        self.needs_reindex
    }
}

/// The result of indexing one image.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageStats {
    pub id: ImageId,
    pub path: PathBuf,
    pub format: ImageFormat,
    pub virtual_size: u64,
    pub data_blocks: u64,
    pub zero_blocks: u64,
    /// Distinct hashes of this image that the index did not hold before.
    pub new_chunks: u64,
    /// Guest-visible bytes read (zero ranges that qcow2 reports are not read).
    pub bytes_read: u64,
    pub elapsed: Duration,
}

impl ImageStats {
    /// Read and hash rate.
    pub fn mib_per_sec(&self) -> f64 {
        self.bytes_read as f64 / (1 << 20) as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }
}

/// What [`ChunkIndex::refresh`] did.
#[derive(Debug, Default)]
pub struct RefreshReport {
    /// Images found unchanged, not read.
    pub unchanged: Vec<PathBuf>,
    /// Images read again (changed, suspect, or awaiting re-indexing).
    pub reindexed: Vec<ImageStats>,
    /// Images whose file is gone: dropped from the index.
    pub dropped: Vec<PathBuf>,
    /// Images that could not be re-indexed: their blocks are out of the index until a
    /// later refresh succeeds.
    pub failed: Vec<(PathBuf, AddImageError)>,
}

/// Sizes and counters of an index.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct IndexStats {
    pub images: usize,
    /// Distinct chunk hashes that have a location.
    pub chunks: usize,
    /// Non-zero blocks over all images (duplicates counted).
    pub data_blocks: u64,
    pub zero_blocks: u64,
    /// Since open: images read whole (added or re-indexed), and their bytes.
    pub images_read: u64,
    pub bytes_read: u64,
}

/// Why the index directory could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum OpenIndexError {
    #[error("cannot create or read the chunk index directory {path}")]
    Dir {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot read index file {path}")]
    ReadFile {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// Why an image could not be indexed.
#[derive(Debug, thiserror::Error)]
pub enum AddImageError {
    #[error("cannot find image {path}")]
    Stat {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot open image {path} for indexing")]
    Open {
        path: PathBuf,
        #[source]
        source: OpenImageError,
    },
    #[error("cannot read image {path} for indexing")]
    Read {
        path: PathBuf,
        #[source]
        source: ReadImageError,
    },
    #[error("the index holds {MAX_IMAGE_ID} images, no id left")]
    TooManyImages,
    #[error("cannot write the index file {file} for {path}")]
    Persist {
        path: PathBuf,
        file: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// Why an image could not be removed from the index.
#[derive(Debug, thiserror::Error)]
pub enum RemoveImageError {
    #[error("{0} is not indexed")]
    NotIndexed(PathBuf),
    #[error("cannot delete the index file {file}")]
    Persist {
        file: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// Why a chunk could not be read back from its location.
#[derive(Debug, thiserror::Error)]
pub enum ReadChunkError {
    #[error("image {0:?} is not in the index (removed since the lookup?)")]
    UnknownImage(ImageId),
    #[error("cannot open {path} to read a chunk")]
    Open {
        path: PathBuf,
        #[source]
        source: OpenImageError,
    },
    #[error("cannot read a chunk of {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: ReadImageError,
    },
    #[error("the block at {offset} of {path} no longer holds the indexed content (the image changed since it was indexed; it is re-indexed on the next refresh)")]
    Stale { path: PathBuf, offset: u64 },
}

/// A hash as a map key, hashed by its first 8 bytes: keys are keyed-BLAKE3 outputs that
/// a guest cannot steer without the cluster key, so no further mixing (or DoS-resistant
/// SipHash) is needed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct ChunkKey(Hash);

impl std::hash::Hash for ChunkKey {
    fn hash<H: Hasher>(&self, state: &mut H) {
        state.write_u64(tern_store::prefix(&self.0));
    }
}

#[derive(Default)]
struct PrefixHasher(u64);

impl Hasher for PrefixHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for b in bytes {
            self.0 = self.0.rotate_left(8) ^ u64::from(*b);
        }
    }
    fn write_u64(&mut self, v: u64) {
        self.0 = v;
    }
}

type ChunkMap = HashMap<ChunkKey, PackedLoc, BuildHasherDefault<PrefixHasher>>;

/// (image id, block number) in 8 bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct PackedLoc(u64);

impl PackedLoc {
    fn new(image: ImageId, offset: u64) -> Self {
        PackedLoc((u64::from(image.0) << BLOCK_BITS) | (offset / BLOCK_SIZE))
    }
    fn image(self) -> ImageId {
        ImageId((self.0 >> BLOCK_BITS) as u32)
    }
    fn offset(self) -> u64 {
        (self.0 & ((1 << BLOCK_BITS) - 1)) * BLOCK_SIZE
    }
}

#[derive(Default)]
struct Readers {
    open: HashMap<ImageId, ImageReader>,
    /// Images a read found stale: re-indexed by the next refresh even if their stamps
    /// did not change (a write within the same timestamp tick as the indexing).
    suspects: HashSet<ImageId>,
}

/// The chunk index of one host. See the module doc.
pub struct ChunkIndex {
    images_dir: PathBuf,
    hasher: ContentHasher,
    images: BTreeMap<ImageId, ImageRecord>,
    by_path: HashMap<PathBuf, ImageId>,
    chunks: ChunkMap,
    next_id: u32,
    problems: Vec<IndexFileProblem>,
    readers: Mutex<Readers>,
    images_read: u64,
    bytes_read: u64,
}

impl std::fmt::Debug for ChunkIndex {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChunkIndex")
            .field("dir", &self.images_dir)
            .field("images", &self.images.len())
            .field("chunks", &self.chunks.len())
            .finish_non_exhaustive()
    }
}

/// The outcome of reading one image.
struct Scanned {
    record: ImageRecord,
    manifest: Manifest,
    bytes_read: u64,
}

impl ChunkIndex {
    /// Opens (creating if needed) the index in `dir` and loads every image file. Damaged
    /// files do not fail the open: they are reported in [`ChunkIndex::load_problems`]
    /// (and logged), their images are re-indexed by the next [`ChunkIndex::refresh`]
    /// when their record survived, forgotten otherwise.
    pub fn open(dir: impl AsRef<Path>, hasher: ContentHasher) -> Result<Self, OpenIndexError> {
        let images_dir = dir.as_ref().join("images");
        let dir_err = |source| OpenIndexError::Dir {
            path: images_dir.clone(),
            source,
        };
        std::fs::create_dir_all(&images_dir).map_err(dir_err)?;
        let mut files = Vec::new();
        let mut max_id = None::<u32>;
        for entry in std::fs::read_dir(&images_dir).map_err(dir_err)? {
            let entry = entry.map_err(dir_err)?;
            let name = entry.file_name();
            let Some(name) = name.to_str() else { continue };
            if name.ends_with(&format!(".{}", persist::TMP_EXT)) {
                // An interrupted write: the old file (if any) is still in place.
                let _ = std::fs::remove_file(entry.path());
                continue;
            }
            let stem_id = name
                .split('.')
                .next()
                .and_then(|s| u32::from_str_radix(s, 16).ok());
            if let Some(id) = stem_id {
                max_id = Some(max_id.map_or(id, |m| m.max(id)));
            }
            if let Some(id) = persist::parse_file_name(name) {
                files.push((id, entry.path()));
            }
        }
        files.sort();

        let key_id = hasher.key_id();
        let mut index = ChunkIndex {
            images_dir,
            hasher,
            images: BTreeMap::new(),
            by_path: HashMap::new(),
            chunks: ChunkMap::default(),
            next_id: max_id.map_or(0, |m| m.saturating_add(1)),
            problems: Vec::new(),
            readers: Mutex::new(Readers::default()),
            images_read: 0,
            bytes_read: 0,
        };
        let mut loaded = Vec::with_capacity(files.len());
        for (id, path) in files {
            let bytes = std::fs::read(&path).map_err(|source| OpenIndexError::ReadFile {
                path: path.clone(),
                source,
            })?;
            match persist::decode_file(&path, &bytes, key_id) {
                Loaded::Ok(record, manifest) if record.id == id => {
                    loaded.push((record, Some(manifest)))
                }
                Loaded::RecordOnly(mut record, problem) if record.id == id => {
                    if let Some(p) = problem {
                        index.report(p);
                    }
                    record.needs_reindex = true;
                    loaded.push((record, None));
                }
                Loaded::Bad(p @ IndexFileProblem::UnsupportedVersion { .. }) => index.report(p),
                Loaded::Bad(p) => {
                    index.report(p);
                    let _ = std::fs::rename(&path, path.with_extension(persist::CORRUPT_EXT));
                }
                Loaded::Ok(..) | Loaded::RecordOnly(..) => {
                    index.report(IndexFileProblem::HeaderCorrupt { file: path.clone() });
                    let _ = std::fs::rename(&path, path.with_extension(persist::CORRUPT_EXT));
                }
            }
        }
        let total: u64 = loaded
            .iter()
            .filter_map(|(_, m)| m.as_ref())
            .map(Manifest::data_blocks)
            .sum();
        index.chunks.reserve(total as usize);
        for (record, manifest) in loaded {
            if index.by_path.contains_key(&record.path) {
                // Two files for one image (should not happen): keep the first.
                continue;
            }
            if let Some(m) = &manifest {
                index.insert_all(record.id, record.format, m);
            }
            index.by_path.insert(record.path.clone(), record.id);
            index.images.insert(record.id, record);
        }
        Ok(index)
    }

    fn report(&mut self, p: IndexFileProblem) {
        tracing::warn!("chunk index: {p}");
        self.problems.push(p);
    }

    /// Problems found in the index files by [`ChunkIndex::open`].
    pub fn load_problems(&self) -> &[IndexFileProblem] {
        &self.problems
    }

    pub fn hasher(&self) -> &ContentHasher {
        &self.hasher
    }

    /// Indexes the image at `path` (read whole), replacing what the index held for it.
    /// `format` is the caller's knowledge of the image, not a guess (see
    /// [`ImageFormat::probe`] for files an administrator imports).
    pub fn add_image(
        &mut self,
        path: impl AsRef<Path>,
        format: ImageFormat,
    ) -> Result<ImageStats, AddImageError> {
        let path = canonical(path.as_ref())?;
        let id = self.id_for(&path)?;
        let mut orphans = HashSet::new();
        let stats = self.reindex(id, &path, format, &mut orphans)?;
        self.repoint(orphans);
        Ok(stats)
    }

    /// The id of the image at `path`: its own if indexed, else a new one.
    fn id_for(&mut self, path: &Path) -> Result<ImageId, AddImageError> {
        if let Some(id) = self.by_path.get(path) {
            return Ok(*id);
        }
        if self.next_id > MAX_IMAGE_ID {
            return Err(AddImageError::TooManyImages);
        }
        self.next_id += 1;
        Ok(ImageId(self.next_id - 1))
    }

    /// Reads `path` as image `id`, persists it, and swaps its entries in; the hashes it
    /// no longer has are added to `orphans` (for [`Self::repoint`]).
    fn reindex(
        &mut self,
        id: ImageId,
        path: &Path,
        format: ImageFormat,
        orphans: &mut HashSet<ChunkKey>,
    ) -> Result<ImageStats, AddImageError> {
        let started = Instant::now();
        self.forget_reader(id);
        let scanned = match scan_file(&self.hasher, id, path, format) {
            Ok(s) => s,
            Err(e) => {
                // Whatever the index held for it is no longer to be trusted.
                if let Some(mut record) = self.images.get(&id).cloned() {
                    record.needs_reindex = true;
                    orphans.extend(self.drop_entries(id));
                    let _ = self.persist(&record, None);
                    self.images.insert(id, record);
                }
                return Err(e);
            }
        };
        self.apply_scan(id, path, format, scanned, orphans)
            .map(|mut st| {
                st.elapsed = started.elapsed();
                st
            })
    }

    /// Persists a scanned image as `id` and swaps its entries in.
    fn apply_scan(
        &mut self,
        id: ImageId,
        path: &Path,
        format: ImageFormat,
        scanned: Scanned,
        orphans: &mut HashSet<ChunkKey>,
    ) -> Result<ImageStats, AddImageError> {
        self.forget_reader(id);
        self.images_read += 1;
        self.bytes_read += scanned.bytes_read;
        self.persist(&scanned.record, Some(&scanned.manifest))?;
        let mut new = HashSet::new();
        for (_, h) in scanned.manifest.data() {
            if !self.chunks.contains_key(&ChunkKey(*h)) {
                new.insert(ChunkKey(*h));
            }
        }
        orphans.extend(self.drop_entries(id));
        self.insert_all(id, format, &scanned.manifest);
        orphans.retain(|k| !self.chunks.contains_key(k));
        let record = scanned.record;
        let stats = ImageStats {
            id,
            path: path.to_path_buf(),
            format,
            virtual_size: record.virtual_size,
            data_blocks: record.data_blocks,
            zero_blocks: record.zero_blocks,
            new_chunks: new.len() as u64,
            bytes_read: scanned.bytes_read,
            elapsed: Duration::ZERO,
        };
        self.by_path.insert(path.to_path_buf(), id);
        self.images.insert(id, record);
        Ok(stats)
    }
}

/// An image read and hashed without the index ([`ChunkIndex::scan_image_file`]), to be
/// put in with [`ChunkIndex::add_scanned`]: the long read holds no lock on the index.
pub struct ScannedImage {
    path: PathBuf,
    format: ImageFormat,
    scanned: Scanned,
    started: Instant,
}

impl std::fmt::Debug for ScannedImage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ScannedImage")
            .field("path", &self.path)
            .field("format", &self.format)
            .finish()
    }
}

/// `given`, canonical: the index knows images by their real path.
fn canonical(given: &Path) -> Result<PathBuf, AddImageError> {
    std::fs::canonicalize(given).map_err(|source| AddImageError::Stat {
        path: given.to_path_buf(),
        source,
    })
}

/// Reads an image whole and hashes its non-zero blocks (as image `id`; the id is set
/// again when the scan is added).
fn scan_file(
    hasher: &ContentHasher,
    id: ImageId,
    path: &Path,
    format: ImageFormat,
) -> Result<Scanned, AddImageError> {
    let stat_err = |p: &Path| {
        let p = p.to_path_buf();
        move |source| AddImageError::Stat { path: p, source }
    };
    // Stamps are taken before reading: a write during the read leaves them older than
    // the file, so the next refresh reads the image again.
    let chain = match format {
        ImageFormat::Raw => vec![path.to_path_buf()],
        ImageFormat::Qcow2 => {
            qcow2_info(path)
                .map_err(|source| AddImageError::Open {
                    path: path.to_path_buf(),
                    source,
                })?
                .chain
        }
    };
    let mut stamps = Vec::with_capacity(chain.len());
    stamps.push(FileStamp::of(path).map_err(stat_err(path))?);
    for p in chain.iter().skip(1) {
        // A backing "file" that is not a local file (nbd://, json:) is not stamped.
        if let Ok(s) = FileStamp::of(p) {
            stamps.push(s);
        }
    }
    let mut reader = ImageReader::open(path, format).map_err(|source| AddImageError::Open {
        path: path.to_path_buf(),
        source,
    })?;
    let (manifest, bytes_read) =
        scan_reader(&mut reader, hasher).map_err(|source| AddImageError::Read {
            path: path.to_path_buf(),
            source,
        })?;
    let record = ImageRecord {
        id,
        path: path.to_path_buf(),
        format,
        virtual_size: manifest.range().end,
        data_blocks: manifest.data_blocks(),
        zero_blocks: manifest.zero_blocks(),
        stamps,
        needs_reindex: false,
    };
    Ok(Scanned {
        record,
        manifest,
        bytes_read,
    })
}

impl ChunkIndex {
    /// Phase one of adding an image without holding the index for the long read: reads
    /// and hashes it with `hasher` (the index's, [`ChunkIndex::hasher`]).
    pub fn scan_image_file(
        hasher: &ContentHasher,
        path: impl AsRef<Path>,
        format: ImageFormat,
    ) -> Result<ScannedImage, AddImageError> {
        let path = canonical(path.as_ref())?;
        let started = Instant::now();
        let scanned = scan_file(hasher, ImageId(0), &path, format)?;
        Ok(ScannedImage {
            path,
            format,
            scanned,
            started,
        })
    }

    /// Phase two: puts a scanned image in, replacing what the index held for that path.
    /// A change to the file after its scan started leaves its stamps older than the file:
    /// the next refresh reads it again (and reads through the index are re-hashed).
    pub fn add_scanned(&mut self, image: ScannedImage) -> Result<ImageStats, AddImageError> {
        let ScannedImage {
            path,
            format,
            mut scanned,
            started,
        } = image;
        let id = self.id_for(&path)?;
        scanned.record.id = id;
        let mut orphans = HashSet::new();
        let mut stats = self.apply_scan(id, &path, format, scanned, &mut orphans)?;
        stats.elapsed = started.elapsed();
        self.repoint(orphans);
        Ok(stats)
    }

    /// Images that [`ChunkIndex::refresh`] would read again (changed by stamp, found
    /// stale, awaiting re-indexing) and those whose file is gone: (path, format, gone).
    pub fn refresh_candidates(&self) -> Vec<(PathBuf, ImageFormat, bool)> {
        let suspects: HashSet<ImageId> = {
            let r = self.readers.lock().unwrap_or_else(|e| e.into_inner());
            r.suspects.clone()
        };
        let mut out = Vec::new();
        for record in self.images.values() {
            if matches!(FileStamp::of(&record.path), Err(e) if e.kind() == std::io::ErrorKind::NotFound)
            {
                out.push((record.path.clone(), record.format, true));
                continue;
            }
            let changed = record
                .stamps
                .iter()
                .any(|s| FileStamp::of(&s.path).ok().as_ref() != Some(s));
            if changed || record.needs_reindex || suspects.contains(&record.id) {
                out.push((record.path.clone(), record.format, false));
            }
        }
        out.sort_by(|a, b| a.0.cmp(&b.0));
        out
    }

    fn persist(
        &self,
        record: &ImageRecord,
        manifest: Option<&Manifest>,
    ) -> Result<(), AddImageError> {
        let name = persist::file_name(record.id);
        let bytes = persist::encode_file(record, self.hasher.key_id(), manifest);
        persist::write_atomic(&self.images_dir, &name, &bytes).map_err(|source| {
            AddImageError::Persist {
                path: record.path.clone(),
                file: self.images_dir.join(&name),
                source,
            }
        })
    }

    /// Adds an image's blocks: a hash already located elsewhere keeps its location,
    /// unless that is a qcow2 block and this one raw (cheaper to read back).
    fn insert_all(&mut self, id: ImageId, format: ImageFormat, m: &Manifest) {
        for (offset, hash) in m.data() {
            if offset / BLOCK_SIZE >= 1 << BLOCK_BITS {
                break; // Past 4 PiB: not locatable (no such images in practice).
            }
            let loc = PackedLoc::new(id, *offset);
            match self.chunks.entry(ChunkKey(*hash)) {
                std::collections::hash_map::Entry::Vacant(v) => {
                    v.insert(loc);
                }
                std::collections::hash_map::Entry::Occupied(mut o) => {
                    let old = o.get().image();
                    if old != id
                        && format == ImageFormat::Raw
                        && self
                            .images
                            .get(&old)
                            .is_some_and(|r| r.format == ImageFormat::Qcow2)
                    {
                        o.insert(loc);
                    }
                }
            }
        }
    }

    /// Removes every entry located in image `id`; returns their hashes.
    fn drop_entries(&mut self, id: ImageId) -> Vec<ChunkKey> {
        let mut gone = Vec::new();
        self.chunks.retain(|k, loc| {
            let keep = loc.image() != id;
            if !keep {
                gone.push(*k);
            }
            keep
        });
        gone
    }

    /// Finds other locations for hashes whose location went away, by reading the other
    /// images' block lists from their files (rare: only after a removal or re-index).
    fn repoint(&mut self, mut orphans: HashSet<ChunkKey>) {
        orphans.retain(|k| !self.chunks.contains_key(k));
        if orphans.is_empty() {
            return;
        }
        let key_id = self.hasher.key_id();
        let ids: Vec<ImageId> = self
            .images
            .values()
            .filter(|r| !r.needs_reindex)
            .map(|r| r.id)
            .collect();
        for id in ids {
            let file = self.images_dir.join(persist::file_name(id));
            let Ok(bytes) = std::fs::read(&file) else {
                continue;
            };
            // A file damaged since open is skipped here and reported by the next open.
            let Loaded::Ok(_, m) = persist::decode_file(&file, &bytes, key_id) else {
                continue;
            };
            for (offset, hash) in m.data() {
                let key = ChunkKey(*hash);
                if orphans.remove(&key) {
                    self.chunks.insert(key, PackedLoc::new(id, *offset));
                }
            }
            if orphans.is_empty() {
                break;
            }
        }
    }

    fn forget_reader(&self, id: ImageId) {
        let mut r = self.readers.lock().unwrap_or_else(|e| e.into_inner());
        r.open.remove(&id);
        r.suspects.remove(&id);
    }

    /// Re-reads the images that changed (by stamp), were found stale by a read, or await
    /// re-indexing after a damaged index file or a failed re-index; drops images whose
    /// file is gone; leaves the others unread.
    pub fn refresh(&mut self) -> RefreshReport {
        let candidates = self.refresh_candidates();
        let mut report = RefreshReport {
            unchanged: self
                .images
                .values()
                .filter(|r| !candidates.iter().any(|(p, _, _)| *p == r.path))
                .map(|r| r.path.clone())
                .collect(),
            ..RefreshReport::default()
        };
        let mut orphans = HashSet::new();
        for (path, format, gone) in candidates {
            let Some(&id) = self.by_path.get(&path) else {
                continue;
            };
            if gone {
                orphans.extend(self.drop_entries(id));
                if let Err(e) = self.forget(id) {
                    tracing::warn!("chunk index: {e}");
                }
                report.dropped.push(path);
                continue;
            }
            match self.reindex(id, &path, format, &mut orphans) {
                Ok(stats) => report.reindexed.push(stats),
                Err(e) => report.failed.push((path, e)),
            }
        }
        self.repoint(orphans);
        report
    }

    /// Removes an image's record, file and reader (its entries must be gone already).
    fn forget(&mut self, id: ImageId) -> Result<(), RemoveImageError> {
        self.forget_reader(id);
        if let Some(r) = self.images.remove(&id) {
            self.by_path.remove(&r.path);
        }
        let name = persist::file_name(id);
        persist::remove(&self.images_dir, &name).map_err(|source| RemoveImageError::Persist {
            file: self.images_dir.join(name),
            source,
        })
    }

    /// Drops an image from the index (its file is left alone). Its chunks that other
    /// images also hold stay in the index, located there.
    pub fn remove_image(
        &mut self,
        path: impl AsRef<Path>,
    ) -> Result<ImageRecord, RemoveImageError> {
        let given = path.as_ref();
        let id = std::fs::canonicalize(given)
            .ok()
            .and_then(|p| self.by_path.get(&p))
            .or_else(|| self.by_path.get(given))
            .copied()
            .ok_or_else(|| RemoveImageError::NotIndexed(given.to_path_buf()))?;
        let record = self.images[&id].clone();
        let orphans: HashSet<ChunkKey> = self.drop_entries(id).into_iter().collect();
        let result = self.forget(id);
        self.repoint(orphans);
        result.map(|()| record)
    }

    /// Where a chunk with this hash can be read on this host.
    pub fn lookup(&self, hash: &Hash) -> Option<Location> {
        self.chunks.get(&ChunkKey(*hash)).map(|l| Location {
            image: l.image(),
            offset: l.offset(),
            hash: *hash,
        })
    }

    pub fn contains(&self, hash: &Hash) -> bool {
        self.chunks.contains_key(&ChunkKey(*hash))
    }

    /// Reads the block at `loc` and checks that it still has `loc.hash`; a block that
    /// changed since indexing is [`ReadChunkError::Stale`] (and its image is re-indexed
    /// by the next refresh), never returned.
    pub fn read_chunk(
        &self,
        loc: &Location,
        buf: &mut [u8; BLOCK_BYTES],
    ) -> Result<(), ReadChunkError> {
        self.read_blocks(loc.image, loc.offset, buf)?;
        if self.hasher.hash(buf) != loc.hash {
            return Err(self.stale(loc));
        }
        Ok(())
    }

    /// The error for a block that failed its hash check; marks its image suspect.
    pub(crate) fn stale(&self, loc: &Location) -> ReadChunkError {
        let mut r = self.readers.lock().unwrap_or_else(|e| e.into_inner());
        r.suspects.insert(loc.image);
        ReadChunkError::Stale {
            path: self
                .images
                .get(&loc.image)
                .map(|r| r.path.clone())
                .unwrap_or_default(),
            offset: loc.offset,
        }
    }

    /// Reads `buf.len()` bytes of image `image` at `offset`, unchecked (callers check
    /// each block's hash); bytes past the image's end read as zero.
    pub(crate) fn read_blocks(
        &self,
        image: ImageId,
        offset: u64,
        buf: &mut [u8],
    ) -> Result<(), ReadChunkError> {
        let record = self
            .images
            .get(&image)
            .ok_or(ReadChunkError::UnknownImage(image))?;
        let mut r = self.readers.lock().unwrap_or_else(|e| e.into_inner());
        if !r.open.contains_key(&image) {
            if r.open.len() >= MAX_OPEN_READERS {
                let victim = *r.open.keys().next().expect("not empty");
                r.open.remove(&victim);
            }
            let reader = ImageReader::open(&record.path, record.format).map_err(|source| {
                ReadChunkError::Open {
                    path: record.path.clone(),
                    source,
                }
            })?;
            r.open.insert(image, reader);
        }
        let reader = r.open.get_mut(&image).expect("just opened");
        let result = reader.read_at(buf, offset);
        if result.is_err() {
            // A dead qemu-nbd or a replaced file: open afresh next time.
            r.open.remove(&image);
        }
        result.map_err(|source| ReadChunkError::Read {
            path: record.path.clone(),
            source,
        })
    }

    /// Closes the readers (and qemu-nbd processes) that `read_chunk` keeps open.
    pub fn close_readers(&self) {
        self.readers
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .open
            .clear();
    }

    pub fn image(&self, id: ImageId) -> Option<&ImageRecord> {
        self.images.get(&id)
    }

    /// Every indexed image, by id.
    pub fn images(&self) -> impl Iterator<Item = &ImageRecord> {
        self.images.values()
    }

    pub fn stats(&self) -> IndexStats {
        IndexStats {
            images: self.images.len(),
            chunks: self.chunks.len(),
            data_blocks: self.images.values().map(|r| r.data_blocks).sum(),
            zero_blocks: self.images.values().map(|r| r.zero_blocks).sum(),
            images_read: self.images_read,
            bytes_read: self.bytes_read,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Index files for 4 fake images of 250 000 distinct blocks each, written directly.
    fn write_fake_index(dir: &Path, hasher: &ContentHasher) {
        let images = dir.join("images");
        std::fs::create_dir_all(&images).unwrap();
        for img in 0..4u32 {
            let blocks = 250_000u64;
            let size = blocks * BLOCK_SIZE;
            let mut m = Manifest::new(0..size).unwrap();
            for b in 0..blocks {
                let mut h = [0u8; 16];
                h.copy_from_slice(
                    &blake3::hash(&(u64::from(img) << 32 | b).to_le_bytes()).as_bytes()[..16],
                );
                m.push_data(b * BLOCK_SIZE, h).unwrap();
            }
            let path = PathBuf::from(format!("/nonexistent/img{img}.raw"));
            let record = ImageRecord {
                id: ImageId(img),
                path: path.clone(),
                format: ImageFormat::Raw,
                virtual_size: size,
                data_blocks: blocks,
                zero_blocks: 0,
                stamps: vec![FileStamp {
                    path,
                    dev: 1,
                    ino: u64::from(img),
                    size,
                    mtime_ns: 0,
                    ctime_ns: 0,
                }],
                needs_reindex: false,
            };
            let bytes = persist::encode_file(&record, hasher.key_id(), Some(&m));
            persist::write_atomic(&images, &persist::file_name(record.id), &bytes).unwrap();
        }
    }

    #[test]
    fn a_million_entries_load_quickly() {
        let dir = tempfile::tempdir().unwrap();
        let hasher = ContentHasher::new([3; 32]);
        write_fake_index(dir.path(), &hasher);
        let t = Instant::now();
        let index = ChunkIndex::open(dir.path(), hasher).unwrap();
        let took = t.elapsed();
        eprintln!("open: 1 000 000 entries in {took:.2?} (debug build, shared machine)");
        assert_eq!(index.stats().chunks, 1_000_000);
        assert!(index.load_problems().is_empty());
        // Lenient bound for an unoptimised build on a busy machine; see the print.
        assert!(took < Duration::from_secs(10));
    }

    #[test]
    fn index_can_move_to_a_blocking_thread_and_be_shared() {
        fn send_sync<T: Send + Sync>() {}
        send_sync::<ChunkIndex>();
    }

    #[test]
    fn packed_locations_round_trip() {
        for (id, off) in [
            (0, 0),
            (MAX_IMAGE_ID, ((1u64 << BLOCK_BITS) - 1) * BLOCK_SIZE),
            (5, 4096 * 77),
        ] {
            let p = PackedLoc::new(ImageId(id), off);
            assert_eq!((p.image(), p.offset()), (ImageId(id), off));
        }
    }
}

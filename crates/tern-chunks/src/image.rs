//! Reading a disk image as the guest sees it: raw files directly, qcow2 (through its
//! backing chain) through a private, read-only `qemu-nbd` and tern's NBD client.
//!
//! Owns the qemu-nbd child process (killed and reaped on drop, [`QemuNbd`]), the
//! `qemu-img info` call that names the backing chain, and the file stamps that tell the
//! index whether an image changed. Must not hash or decide what to index.
//!
//! Blocking: an [`ImageReader`] for qcow2 drives its NBD connection on its own
//! current-thread tokio runtime, so callers inside async code must go through
//! `spawn_blocking` (the runtime is shut down in the background on drop, so dropping a
//! reader inside async code is fine).

use std::ffi::OsString;
use std::fs::File;
use std::io::Read;
use std::ops::Range;
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use tern_nbd::{ConnectOptions, NbdClient, BASE_ALLOCATION};
use tokio::net::UnixStream;

use crate::manifest::BLOCK_SIZE;

/// How long qemu-nbd gets to start listening.
const QEMU_NBD_STARTUP: Duration = Duration::from_secs(20);
const EXPORT: &str = "tern-chunks";

/// A disk image format the index can read.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ImageFormat {
    /// A plain file: guest offset = file offset.
    Raw,
    /// qcow2, read through qemu-nbd so that backing files, compression and unallocated
    /// clusters are resolved by QEMU itself.
    Qcow2,
}

impl ImageFormat {
    pub fn as_str(self) -> &'static str {
        match self {
            ImageFormat::Raw => "raw",
            ImageFormat::Qcow2 => "qcow2",
        }
    }

    /// Guesses the format from the file's magic (`QFI\xfb` = qcow2, else raw).
    ///
    /// Only for files an administrator hands over (`tern image import FILE`): never probe
    /// a raw disk a guest can write, since the guest could write a qcow2 header that
    /// names a host file as its backing file. Known VM disks carry their format.
    pub fn probe(path: &Path) -> std::io::Result<Self> {
        let mut magic = [0u8; 4];
        let mut f = File::open(path)?;
        let mut got = 0;
        while got < 4 {
            match f.read(&mut magic[got..])? {
                0 => break,
                n => got += n,
            }
        }
        Ok(if got == 4 && magic == *b"QFI\xfb" {
            ImageFormat::Qcow2
        } else {
            ImageFormat::Raw
        })
    }

    pub(crate) fn code(self) -> u8 {
        match self {
            ImageFormat::Raw => 1,
            ImageFormat::Qcow2 => 2,
        }
    }

    pub(crate) fn from_code(code: u8) -> Option<Self> {
        match code {
            1 => Some(ImageFormat::Raw),
            2 => Some(ImageFormat::Qcow2),
            _ => None,
        }
    }
}

impl std::fmt::Display for ImageFormat {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Identity and version of one file: if any field differs, the file changed (or was
/// replaced). ctime cannot be set back by tools the way mtime can.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct FileStamp {
    pub(crate) path: PathBuf,
    pub(crate) dev: u64,
    pub(crate) ino: u64,
    pub(crate) size: u64,
    pub(crate) mtime_ns: i64,
    pub(crate) ctime_ns: i64,
}

impl FileStamp {
    pub(crate) fn of(path: &Path) -> std::io::Result<Self> {
        let m = std::fs::metadata(path)?;
        Ok(FileStamp {
            path: path.to_path_buf(),
            dev: m.dev(),
            ino: m.ino(),
            size: m.size(),
            mtime_ns: m.mtime().saturating_mul(1_000_000_000) + m.mtime_nsec(),
            ctime_ns: m.ctime().saturating_mul(1_000_000_000) + m.ctime_nsec(),
        })
    }
}

/// Why an image could not be opened for reading.
#[derive(Debug, thiserror::Error)]
pub enum OpenImageError {
    #[error("cannot open image {path}")]
    Open {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("qemu-img info on {path} failed: {detail}")]
    QemuImgInfo { path: PathBuf, detail: String },
    #[error("{path} is a {found} image, not {expected}")]
    FormatMismatch {
        path: PathBuf,
        expected: ImageFormat,
        found: String,
    },
    #[error("cannot start a runtime for the NBD connection")]
    Runtime(#[source] std::io::Error),
    #[error("cannot start qemu-nbd (is qemu-utils installed?)")]
    SpawnQemuNbd(#[source] std::io::Error),
    #[error("qemu-nbd exited before serving {path} ({status}): {stderr}")]
    QemuNbdExited {
        path: PathBuf,
        status: std::process::ExitStatus,
        stderr: String,
    },
    #[error("qemu-nbd did not listen within {QEMU_NBD_STARTUP:?} for {path}")]
    QemuNbdTimeout { path: PathBuf },
    #[error("cannot connect to the qemu-nbd serving {path}")]
    Connect {
        path: PathBuf,
        #[source]
        source: Box<tern_nbd::ConnectError>,
    },
}

/// Why reading an open image failed.
#[derive(Debug, thiserror::Error)]
pub enum ReadImageError {
    #[error("reading {len} bytes at {offset} of {path}")]
    Io {
        path: PathBuf,
        offset: u64,
        len: usize,
        #[source]
        source: std::io::Error,
    },
    #[error("reading {len} bytes at {offset} of {path} through qemu-nbd")]
    Nbd {
        path: PathBuf,
        offset: u64,
        len: usize,
        #[source]
        source: Box<tern_nbd::ReadError>,
    },
    #[error("asking qemu-nbd which parts of {path} hold data")]
    BlockStatus {
        path: PathBuf,
        #[source]
        source: Box<tern_nbd::BlockStatusError>,
    },
}

/// What `qemu-img info --backing-chain` says about a qcow2 image.
pub(crate) struct QcowInfo {
    /// The image itself first, then its backing files, as absolute paths when the image
    /// path is absolute.
    pub(crate) chain: Vec<PathBuf>,
}

/// Runs `qemu-img info -U --backing-chain --output=json` (-U: the image may be in use by
/// a running VM).
pub(crate) fn qcow2_info(path: &Path) -> Result<QcowInfo, OpenImageError> {
    let fail = |detail: String| OpenImageError::QemuImgInfo {
        path: path.to_path_buf(),
        detail,
    };
    let out = Command::new("qemu-img")
        .args([
            "info",
            "-U",
            "--backing-chain",
            "--output=json",
            "-f",
            "qcow2",
        ])
        .arg(path)
        .stdin(Stdio::null())
        .output()
        .map_err(|e| fail(format!("cannot run qemu-img: {e}")))?;
    if !out.status.success() {
        return Err(fail(format!(
            "{}: {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    let v: serde_json::Value =
        serde_json::from_slice(&out.stdout).map_err(|e| fail(format!("bad JSON: {e}")))?;
    let chain = v
        .as_array()
        .filter(|a| !a.is_empty())
        .ok_or_else(|| fail("expected a non-empty JSON array".into()))?;
    let format = chain[0]["format"].as_str().unwrap_or("");
    if format != "qcow2" {
        return Err(OpenImageError::FormatMismatch {
            path: path.to_path_buf(),
            expected: ImageFormat::Qcow2,
            found: format.to_string(),
        });
    }
    let chain = chain
        .iter()
        .filter_map(|e| e["filename"].as_str().map(PathBuf::from))
        .collect();
    Ok(QcowInfo { chain })
}

/// A qemu-nbd process serving one image read-only on a unix socket in a private
/// temporary directory; killed and reaped on drop so that no error path leaks it.
pub(crate) struct QemuNbd {
    child: Child,
    dir: tempfile::TempDir,
}

impl QemuNbd {
    fn socket(&self) -> PathBuf {
        self.dir.path().join("nbd.sock")
    }

    fn stderr(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("stderr")).unwrap_or_default()
    }

    /// Starts `qemu-nbd -r -x NAME -k SOCK --image-opts driver=qcow2,force-share=on,...`.
    /// `force-share`: a running VM holds the image's write lock; we only read, and every
    /// chunk read later is checked against its hash. No `-t` (persistent): our single
    /// connection lives as long as the reader, and without `-t` qemu-nbd exits by itself
    /// when that connection closes, so even a crash of this process (no drop) leaves no
    /// qemu-nbd behind holding the image open.
    fn spawn(path: &Path) -> Result<Self, OpenImageError> {
        let dir = tempfile::Builder::new()
            .prefix("tern-chunks-nbd-")
            .tempdir()
            .map_err(OpenImageError::SpawnQemuNbd)?;
        let stderr =
            File::create(dir.path().join("stderr")).map_err(OpenImageError::SpawnQemuNbd)?;
        let mut opts =
            b"driver=qcow2,read-only=on,force-share=on,file.driver=file,file.filename=".to_vec();
        // In QEMU option strings a comma is escaped by doubling it.
        for &b in path.as_os_str().as_bytes() {
            opts.push(b);
            if b == b',' {
                opts.push(b',');
            }
        }
        let child = Command::new("qemu-nbd")
            .args(["-r", "-x", EXPORT, "-k"])
            .arg(dir.path().join("nbd.sock"))
            .arg("--image-opts")
            .arg(OsString::from_vec(opts))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(stderr)
            .spawn()
            .map_err(OpenImageError::SpawnQemuNbd)?;
        Ok(QemuNbd { child, dir })
    }
}

impl Drop for QemuNbd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A qcow2 image served by our own qemu-nbd.
pub(crate) struct NbdImage {
    client: Option<NbdClient<UnixStream>>,
    rt: Option<tokio::runtime::Runtime>,
    _server: QemuNbd,
    path: PathBuf,
}

impl Drop for NbdImage {
    fn drop(&mut self) {
        // The connection first, then the runtime without blocking (so that a reader may
        // be dropped inside async code), then (field drop) the server.
        drop(self.client.take());
        if let Some(rt) = self.rt.take() {
            rt.shutdown_background();
        }
    }
}

impl NbdImage {
    fn open(path: &Path) -> Result<Self, OpenImageError> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(OpenImageError::Runtime)?;
        let mut server = QemuNbd::spawn(path)?;
        let sock = server.socket();
        let opts = ConnectOptions::new(EXPORT).with_base_allocation();
        let deadline = Instant::now() + QEMU_NBD_STARTUP;
        let client = loop {
            if let Ok(Some(status)) = server.child.try_wait() {
                return Err(OpenImageError::QemuNbdExited {
                    path: path.to_path_buf(),
                    status,
                    stderr: server.stderr().trim().to_string(),
                });
            }
            if sock.exists() {
                match rt.block_on(NbdClient::connect_unix(&sock, &opts)) {
                    Ok(c) => break c,
                    // Bound but not yet listening: retry until the deadline.
                    Err(tern_nbd::ConnectError::Connect { .. }) if Instant::now() < deadline => {}
                    Err(source) => {
                        return Err(OpenImageError::Connect {
                            path: path.to_path_buf(),
                            source: Box::new(source),
                        })
                    }
                }
            }
            if Instant::now() >= deadline {
                return Err(OpenImageError::QemuNbdTimeout {
                    path: path.to_path_buf(),
                });
            }
            std::thread::sleep(Duration::from_millis(5));
        };
        Ok(NbdImage {
            client: Some(client),
            rt: Some(rt),
            _server: server,
            path: path.to_path_buf(),
        })
    }

    fn parts(&mut self) -> (&tokio::runtime::Runtime, &mut NbdClient<UnixStream>) {
        (
            self.rt.as_ref().expect("runtime lives until drop"),
            self.client.as_mut().expect("client lives until drop"),
        )
    }
}

/// A readable image: guest-visible bytes by offset.
pub(crate) enum ImageReader {
    Raw {
        file: File,
        size: u64,
        path: PathBuf,
    },
    Nbd(Box<NbdImage>),
}

impl ImageReader {
    pub(crate) fn open(path: &Path, format: ImageFormat) -> Result<Self, OpenImageError> {
        match format {
            ImageFormat::Raw => {
                let open_err = |source| OpenImageError::Open {
                    path: path.to_path_buf(),
                    source,
                };
                let file = File::open(path).map_err(open_err)?;
                let size = file.metadata().map_err(open_err)?.len();
                Ok(ImageReader::Raw {
                    file,
                    size,
                    path: path.to_path_buf(),
                })
            }
            ImageFormat::Qcow2 => Ok(ImageReader::Nbd(Box::new(NbdImage::open(path)?))),
        }
    }

    /// Guest-visible size in bytes.
    pub(crate) fn size(&self) -> u64 {
        match self {
            ImageReader::Raw { size, .. } => *size,
            ImageReader::Nbd(n) => n.client.as_ref().map_or(0, |c| c.size()),
        }
    }

    /// Fills `buf` from `offset`; bytes past the end of the image read as zero.
    pub(crate) fn read_at(&mut self, buf: &mut [u8], offset: u64) -> Result<(), ReadImageError> {
        let size = self.size();
        let avail = size.saturating_sub(offset).min(buf.len() as u64) as usize;
        buf[avail..].fill(0);
        if avail == 0 {
            return Ok(());
        }
        let (head, _) = buf.split_at_mut(avail);
        match self {
            ImageReader::Raw { file, path, .. } => {
                let mut done = 0;
                while done < head.len() {
                    match file.read_at(&mut head[done..], offset + done as u64) {
                        // The file shrank since it was opened: the rest reads as zero,
                        // and the hash check of whoever reads it will notice.
                        Ok(0) => {
                            head[done..].fill(0);
                            break;
                        }
                        Ok(n) => done += n,
                        Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                        Err(source) => {
                            return Err(ReadImageError::Io {
                                path: path.clone(),
                                offset,
                                len: head.len(),
                                source,
                            })
                        }
                    }
                }
                Ok(())
            }
            ImageReader::Nbd(n) => {
                let path = n.path.clone();
                let (rt, client) = n.parts();
                rt.block_on(client.read_into(head, offset))
                    .map_err(|source| ReadImageError::Nbd {
                        path,
                        offset,
                        len: avail,
                        source: Box::new(source),
                    })
            }
        }
    }

    /// Block-aligned ranges that may hold non-zero data, in order; everything else reads
    /// as zero. Raw: the whole file (holes are read and found zero). qcow2: what
    /// `base:allocation` does not report as zero, across the backing chain.
    pub(crate) fn data_ranges(&mut self) -> Result<Vec<Range<u64>>, ReadImageError> {
        let size = self.size();
        let end = size.div_ceil(BLOCK_SIZE) * BLOCK_SIZE;
        match self {
            ImageReader::Raw { .. } => {
                let mut whole = Vec::with_capacity(1);
                if size > 0 {
                    whole.push(0..end);
                }
                Ok(whole)
            }
            ImageReader::Nbd(n) => {
                let path = n.path.clone();
                let (rt, client) = n.parts();
                let err = |source| ReadImageError::BlockStatus {
                    path: path.clone(),
                    source: Box::new(source),
                };
                if size == 0 {
                    return Ok(vec![]);
                }
                let ctx = client
                    .meta_context_id(BASE_ALLOCATION)
                    .ok_or(tern_nbd::BlockStatusError::NoMetaContexts)
                    .map_err(err)?;
                let extents = rt.block_on(client.extents(ctx, 0..size)).map_err(err)?;
                let mut out: Vec<Range<u64>> = Vec::new();
                for e in extents.iter().filter(|e| !e.is_zero()) {
                    let start = e.offset / BLOCK_SIZE * BLOCK_SIZE;
                    let stop = (e.end().div_ceil(BLOCK_SIZE) * BLOCK_SIZE).min(end);
                    match out.last_mut() {
                        Some(last) if last.end >= start => last.end = last.end.max(stop),
                        _ => out.push(start..stop),
                    }
                }
                Ok(out)
            }
        }
    }
}

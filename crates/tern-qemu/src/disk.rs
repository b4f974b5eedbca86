//! A VM's disks inside QEMU, for live disk migration: the names tern gives them (node
//! names, device ids, export names), and the typed QMP operations an agent drives on both
//! ends. Owns the QMP sequences and the order they must run in; must not move disk bytes
//! (tern-nbd reads and writes them, the agent carries them) or decide when to stop
//! iterating.
//!
//! # Names
//!
//! Disk N of a [`crate::spec::VmSpec`] (from 0, in spec order) is, in every QEMU tern
//! starts (source and incoming destination alike):
//!
//! | what | name | used for |
//! |---|---|---|
//! | format node (qcow2/raw) | `diskN` ([`node_name`]) | bitmaps, exports, `query-named-block-nodes` |
//! | protocol node (file) | `diskN-file` ([`file_node_name`]) | nothing after launch |
//! | device | `virtio-diskN` ([`device_id`]), `/dev/vdX` in the guest | |
//! | NBD export | name `diskN`, id `tern-diskN` ([`export_id`]) | tern-nbd `ConnectOptions::new("diskN")` |
//! | dirty bitmaps | `tern-rK` on `diskN`, K = round ([`DirtyTracker`]) | `qemu:dirty-bitmap:tern-rK` |
//!
//! A qcow2's backing file is opened by QEMU from the qcow2 header, as a node with a
//! generated name; reads of `diskN` (and so its NBD export) see the whole chain.
//!
//! # Source: rounds of a frozen dirty bitmap
//!
//! ```text
//! start_nbd_server(sock)                       nbd-server-start {addr: unix sock}
//! DirtyTracker::start(disk0)                   block-dirty-bitmap-add tern-r0 (recording)
//! loop (round K):
//!   tracker.freeze() -> FrozenBitmap tern-rK   transaction [bitmap-add tern-rK+1, bitmap-disable tern-rK]
//!   export_frozen(&frozen)                     block-export-add {nbd, disk0, read-only, bitmaps [tern-rK]}
//!   (tern-nbd: K = 0: read everything allocated; K > 0: read the ranges tern-rK marks dirty)
//!   (disconnect the NBD client)
//!   remove_export(.., Safe)                    block-export-del, wait for BLOCK_EXPORT_DELETED
//!   tracker.release(frozen)                    block-dirty-bitmap-remove tern-rK
//!     or, if the round's bytes did not arrive: tracker.requeue(frozen)  (merge into tern-rK+1)
//! ```
//!
//! QEMU refuses to export a recording bitmap read-only ("Enabled bitmap ... incompatible
//! with readonly export"), hence the freeze; an exported bitmap is busy (cannot be removed
//! or merged) until its export is really gone, hence the wait. Round 0's bitmap is frozen
//! right after tracking starts, so the full copy reads the disk while tern-r1 records.
//!
//! # Destination: a writable export of an incoming disk
//!
//! [`export_writable`] on a QEMU started with `-incoming defer -S` (before or after
//! `migrate-incoming`, checked on QEMU 10.0): `block-export-add` **activates** the inactive
//! node (`query-named-block-nodes` shows `active: true` afterwards), so the image must not
//! be open read-write anywhere else (never the source's own file: shared storage needs
//! no disk migration). The guest's virtio-blk then shares write permission with the
//! export only until the VM first runs: [`remove_export`] it before `cont`. If the VM
//! runs with the export still there, QEMU only prints a permission conflict to stderr and
//! keeps accepting NBD writes while the guest runs; [`finish_incoming`] refuses to return
//! until the export is gone.
//!
//! # Switchover
//!
//! [`enable_pause_before_switchover`] on the source before `migrate`; then
//! [`wait_for_pre_switchover`]: the source's vCPUs are stopped and its disks drained and
//! flushed, so the last round ([`DirtyTracker::freeze`] ... [`DirtyTracker::stop`]) sees
//! every write the guest made; then [`continue_switchover`]; QEMU finishes the device state.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::{json, Value};
use tokio::time::Instant;

use crate::qmp::{MigrationInfo, QmpClient, QmpError};
use crate::spec::DiskFormat;

/// Prefix of the dirty bitmaps tern creates; [`DirtyTracker::stop`] removes every bitmap of
/// the node with it.
pub const BITMAP_PREFIX: &str = "tern-r";

/// How often waits re-ask QEMU when no event came.
const POLL: Duration = Duration::from_millis(20);

/// Format node of disk `index`: the node tern addresses (`disk0`, `disk1`, ...).
pub fn node_name(index: usize) -> String {
    format!("disk{index}")
}

/// Protocol (file) node under [`node_name`] (`disk0-file`, ...).
pub fn file_node_name(index: usize) -> String {
    format!("disk{index}-file")
}

/// Guest device id of disk `index` (`virtio-disk0`, ...).
pub fn device_id(index: usize) -> String {
    format!("virtio-disk{index}")
}

/// Block export id of the NBD export of `node` (`tern-disk0`); its NBD export name is
/// the node name itself.
pub fn export_id(node: &str) -> String {
    format!("tern-{node}")
}

fn bitmap_name(round: u64) -> String {
    format!("{BITMAP_PREFIX}{round}")
}

fn is_command_error(e: &QmpError, needle: &str) -> bool {
    matches!(e, QmpError::Command { desc, .. } if desc.contains(needle))
}

// ---- block node queries ---------------------------------------------------------------

/// A dirty bitmap as `query-named-block-nodes` shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DirtyBitmapInfo {
    pub name: String,
    /// Still collecting writes (false once frozen).
    pub recording: bool,
    /// In use by an export (cannot be removed, merged or re-enabled).
    pub busy: bool,
    pub granularity: u32,
    /// Dirty bytes.
    pub dirty_bytes: u64,
}

/// A block node as `query-named-block-nodes` shows it (`query-block` lists nothing for
/// `-blockdev` nodes).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BlockNodeInfo {
    pub node: String,
    /// Block driver (`qcow2`, `raw`, `file`).
    pub driver: String,
    pub filename: PathBuf,
    pub virtual_size: u64,
    /// False while an incoming QEMU has not taken the image over yet.
    pub active: bool,
    pub read_only: bool,
    pub backing_file: Option<PathBuf>,
    pub dirty_bitmaps: Vec<DirtyBitmapInfo>,
}

impl BlockNodeInfo {
    fn from_json(v: &Value) -> Option<BlockNodeInfo> {
        let s = |k: &str| v.get(k).and_then(Value::as_str);
        let image = v.get("image");
        Some(BlockNodeInfo {
            node: s("node-name")?.to_string(),
            driver: s("drv").unwrap_or_default().to_string(),
            filename: PathBuf::from(s("file").unwrap_or_default()),
            virtual_size: image
                .and_then(|i| i.get("virtual-size"))
                .and_then(Value::as_u64)?,
            active: v.get("active").and_then(Value::as_bool).unwrap_or(true),
            read_only: v.get("ro").and_then(Value::as_bool).unwrap_or(false),
            backing_file: s("backing_file").map(PathBuf::from),
            dirty_bitmaps: v
                .get("dirty-bitmaps")
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
                .filter_map(|b| {
                    Some(DirtyBitmapInfo {
                        name: b.get("name")?.as_str()?.to_string(),
                        recording: b.get("recording").and_then(Value::as_bool).unwrap_or(false),
                        busy: b.get("busy").and_then(Value::as_bool).unwrap_or(false),
                        granularity: b.get("granularity").and_then(Value::as_u64).unwrap_or(0)
                            as u32,
                        dirty_bytes: b.get("count").and_then(Value::as_u64).unwrap_or(0),
                    })
                })
                .collect(),
        })
    }
}

/// Why a block node could not be described.
#[derive(Debug, thiserror::Error)]
pub enum QueryNodeError {
    #[error("query-named-block-nodes failed")]
    Qmp(#[source] QmpError),
    #[error("QEMU has no block node named {0:?}")]
    NoSuchNode(String),
}

/// `query-named-block-nodes` for one node: its size (for creating the destination image),
/// whether it is active, its dirty bitmaps.
pub async fn query_node(qmp: &QmpClient, node: &str) -> Result<BlockNodeInfo, QueryNodeError> {
    let v = qmp
        .execute("query-named-block-nodes", Some(json!({ "flat": true })))
        .await
        .map_err(QueryNodeError::Qmp)?;
    v.as_array()
        .into_iter()
        .flatten()
        .filter(|n| n.get("node-name").and_then(Value::as_str) == Some(node))
        .find_map(BlockNodeInfo::from_json)
        .ok_or_else(|| QueryNodeError::NoSuchNode(node.to_string()))
}

/// Ids of the block exports QEMU has (`query-block-exports`), including ones shutting down.
pub async fn export_ids(qmp: &QmpClient) -> Result<Vec<String>, QmpError> {
    let v = qmp.execute("query-block-exports", None).await?;
    Ok(v.as_array()
        .into_iter()
        .flatten()
        .filter_map(|e| Some(e.get("id")?.as_str()?.to_string()))
        .collect())
}

// ---- images ---------------------------------------------------------------------------

/// Why a disk image could not be created.
#[derive(Debug, thiserror::Error)]
pub enum CreateImageError {
    #[error("{path} already exists")]
    Exists { path: PathBuf },
    #[error("cannot run {binary}")]
    Spawn {
        binary: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("qemu-img create {path} failed: {stderr}")]
    Failed { path: PathBuf, stderr: String },
}

/// `qemu-img` unless `TERN_QEMU_IMG` names another binary.
pub fn qemu_img_binary() -> PathBuf {
    std::env::var_os("TERN_QEMU_IMG")
        .filter(|s| !s.is_empty())
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("qemu-img"))
}

/// Creates an empty image of `virtual_size` bytes (a flat qcow2 or a sparse raw file): the
/// destination's disk before its QEMU starts. Refuses to overwrite an existing file.
pub async fn create_image(
    path: &Path,
    format: DiskFormat,
    virtual_size: u64,
) -> Result<(), CreateImageError> {
    if path.exists() {
        return Err(CreateImageError::Exists {
            path: path.to_path_buf(),
        });
    }
    let binary = qemu_img_binary();
    let out = tokio::process::Command::new(&binary)
        .args(["create", "-q", "-f", format.as_str()])
        .arg(path)
        .arg(virtual_size.to_string())
        .output()
        .await
        .map_err(|source| CreateImageError::Spawn {
            binary: binary.clone(),
            source,
        })?;
    if !out.status.success() {
        return Err(CreateImageError::Failed {
            path: path.to_path_buf(),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        });
    }
    Ok(())
}

// ---- dirty tracking (source) ----------------------------------------------------------

/// Why dirty tracking could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartTrackingError {
    #[error("granularity must be a power of two between 512 B and 64 MiB, got {0}")]
    BadGranularity(u32),
    #[error("block-dirty-bitmap-add {bitmap} on {node} failed")]
    Qmp {
        node: String,
        bitmap: String,
        #[source]
        source: QmpError,
    },
}

/// Why a round's bitmap could not be frozen.
#[derive(Debug, thiserror::Error)]
#[error(
    "freezing dirty bitmap {bitmap} of {node} (transaction: add {next}, disable {bitmap}) failed"
)]
pub struct FreezeRoundError {
    pub node: String,
    pub bitmap: String,
    pub next: String,
    #[source]
    pub source: QmpError,
}

/// Why a frozen bitmap could not be dropped or merged back.
#[derive(Debug, thiserror::Error)]
pub enum ReleaseBitmapError {
    #[error("dirty bitmap {bitmap} of {node} is still exported: remove the export first")]
    Busy { node: String, bitmap: String },
    #[error("{command} of dirty bitmap {bitmap} on {node} failed")]
    Qmp {
        command: &'static str,
        node: String,
        bitmap: String,
        #[source]
        source: QmpError,
    },
}

/// Why dirty tracking could not be stopped.
#[derive(Debug, thiserror::Error)]
pub enum StopTrackingError {
    #[error("cannot list the dirty bitmaps of {node}")]
    Query {
        node: String,
        #[source]
        source: QueryNodeError,
    },
    #[error("dirty bitmap {bitmap} of {node} is still exported: remove the export first")]
    Busy { node: String, bitmap: String },
    #[error("block-dirty-bitmap-remove {bitmap} on {node} failed")]
    Qmp {
        node: String,
        bitmap: String,
        #[source]
        source: QmpError,
    },
}

/// The source's dirty tracking of one disk node, in rounds. Round K's bitmap `tern-rK`
/// records writes until [`DirtyTracker::freeze`] turns it into a [`FrozenBitmap`] and
/// starts `tern-rK+1` in the same QMP transaction, so no write falls between two rounds.
#[derive(Debug)]
pub struct DirtyTracker {
    node: String,
    round: u64,
    granularity: Option<u32>,
}

/// A round's bitmap, no longer recording: the writes between the freeze before it and
/// the freeze that made it. Export it ([`export_frozen`]), read it, then
/// [`DirtyTracker::release`] (or [`DirtyTracker::requeue`] if its bytes were not delivered).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FrozenBitmap {
    pub node: String,
    pub bitmap: String,
    pub round: u64,
}

impl DirtyTracker {
    /// `block-dirty-bitmap-add tern-r0` (not persistent, recording): every write to `node`
    /// from now on is tracked. `granularity` in bytes (QEMU's default, the qcow2 cluster
    /// size, if None).
    pub async fn start(
        qmp: &QmpClient,
        node: &str,
        granularity: Option<u32>,
    ) -> Result<DirtyTracker, StartTrackingError> {
        if let Some(g) = granularity {
            if !g.is_power_of_two() || !(512..=64 << 20).contains(&g) {
                return Err(StartTrackingError::BadGranularity(g));
            }
        }
        let t = DirtyTracker {
            node: node.to_string(),
            round: 0,
            granularity,
        };
        let bitmap = bitmap_name(0);
        qmp.execute("block-dirty-bitmap-add", Some(t.bitmap_args(&bitmap)))
            .await
            .map_err(|source| StartTrackingError::Qmp {
                node: node.to_string(),
                bitmap,
                source,
            })?;
        Ok(t)
    }

    pub fn node(&self) -> &str {
        &self.node
    }

    /// The round whose bitmap records writes now.
    pub fn round(&self) -> u64 {
        self.round
    }

    /// Name of the bitmap recording writes now.
    pub fn recording_bitmap(&self) -> String {
        bitmap_name(self.round)
    }

    fn bitmap_args(&self, bitmap: &str) -> Value {
        let mut a = json!({ "node": self.node, "name": bitmap, "persistent": false });
        if let Some(g) = self.granularity {
            a["granularity"] = json!(g);
        }
        a
    }

    /// Ends the current round: one `transaction` [block-dirty-bitmap-add next,
    /// block-dirty-bitmap-disable current]. Returns the frozen bitmap.
    pub async fn freeze(&mut self, qmp: &QmpClient) -> Result<FrozenBitmap, FreezeRoundError> {
        let bitmap = bitmap_name(self.round);
        let next = bitmap_name(self.round + 1);
        let actions = json!({ "actions": [
            { "type": "block-dirty-bitmap-add", "data": self.bitmap_args(&next) },
            { "type": "block-dirty-bitmap-disable", "data": { "node": self.node, "name": bitmap } },
        ]});
        if let Err(source) = qmp.execute("transaction", Some(actions)).await {
            return Err(FreezeRoundError {
                node: self.node.clone(),
                bitmap,
                next,
                source,
            });
        }
        let frozen = FrozenBitmap {
            node: self.node.clone(),
            bitmap,
            round: self.round,
        };
        self.round += 1;
        Ok(frozen)
    }

    /// The round's bytes reached the destination: `block-dirty-bitmap-remove`. Its export
    /// must be gone ([`remove_export`] waits for that).
    pub async fn release(
        &self,
        qmp: &QmpClient,
        frozen: FrozenBitmap,
    ) -> Result<(), ReleaseBitmapError> {
        qmp.execute(
            "block-dirty-bitmap-remove",
            Some(json!({ "node": frozen.node, "name": frozen.bitmap })),
        )
        .await
        .map_err(|source| release_error("block-dirty-bitmap-remove", &frozen, source))?;
        Ok(())
    }

    /// The round's bytes did not reach the destination: its dirty bits go into the bitmap
    /// recording now (`block-dirty-bitmap-merge`), then it is removed, so the next round
    /// sends them again. Its export must be gone.
    pub async fn requeue(
        &self,
        qmp: &QmpClient,
        frozen: FrozenBitmap,
    ) -> Result<(), ReleaseBitmapError> {
        qmp.execute(
            "block-dirty-bitmap-merge",
            Some(
                json!({ "node": self.node, "target": self.recording_bitmap(),
                         "bitmaps": [frozen.bitmap] }),
            ),
        )
        .await
        .map_err(|source| release_error("block-dirty-bitmap-merge", &frozen, source))?;
        self.release(qmp, frozen).await
    }

    /// Removes every `tern-r*` bitmap of the node (the recording one and any frozen one
    /// left over): tracking ends. Exports of them must be gone.
    pub async fn stop(self, qmp: &QmpClient) -> Result<(), StopTrackingError> {
        remove_tern_bitmaps(qmp, &self.node).await
    }
}

fn release_error(command: &'static str, f: &FrozenBitmap, source: QmpError) -> ReleaseBitmapError {
    if is_command_error(&source, "in use by another operation") {
        ReleaseBitmapError::Busy {
            node: f.node.clone(),
            bitmap: f.bitmap.clone(),
        }
    } else {
        ReleaseBitmapError::Qmp {
            command,
            node: f.node.clone(),
            bitmap: f.bitmap.clone(),
            source,
        }
    }
}

/// Removes every bitmap named `tern-r*` on `node`, e.g. after an aborted migration or
/// when an agent that restarted finds them left over.
pub async fn remove_tern_bitmaps(qmp: &QmpClient, node: &str) -> Result<(), StopTrackingError> {
    let info = query_node(qmp, node)
        .await
        .map_err(|source| StopTrackingError::Query {
            node: node.to_string(),
            source,
        })?;
    for b in info
        .dirty_bitmaps
        .iter()
        .filter(|b| b.name.starts_with(BITMAP_PREFIX))
    {
        if let Err(source) = qmp
            .execute(
                "block-dirty-bitmap-remove",
                Some(json!({ "node": node, "name": b.name })),
            )
            .await
        {
            return Err(if b.busy {
                StopTrackingError::Busy {
                    node: node.to_string(),
                    bitmap: b.name.clone(),
                }
            } else {
                StopTrackingError::Qmp {
                    node: node.to_string(),
                    bitmap: b.name.clone(),
                    source,
                }
            });
        }
    }
    Ok(())
}

// ---- NBD server and exports -----------------------------------------------------------

/// Why QEMU's NBD server could not be started.
#[derive(Debug, thiserror::Error)]
pub enum StartNbdServerError {
    #[error("NBD socket path {0} is too long for a unix socket (max 96 bytes)")]
    PathTooLong(PathBuf),
    #[error("QEMU already runs an NBD server (one per QEMU): stop it first")]
    AlreadyRunning,
    #[error("nbd-server-start on {path} failed")]
    Qmp {
        path: PathBuf,
        #[source]
        source: QmpError,
    },
    #[error("cannot listen on {path} for QEMU's NBD server")]
    Listen {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// QEMU's NBD server on `socket`: the caller binds the listening socket (an unprivileged
/// QEMU could not create it in a private directory) and hands it over (`getfd`, then
/// `nbd-server-start {addr: {type: fd}}`); a stale socket file is replaced. One server per
/// QEMU; exports come and go on it; clients connect to `socket`.
pub async fn start_nbd_server(qmp: &QmpClient, socket: &Path) -> Result<(), StartNbdServerError> {
    if socket.as_os_str().len() > 96 {
        return Err(StartNbdServerError::PathTooLong(socket.to_path_buf()));
    }
    let listen_err = |source| StartNbdServerError::Listen {
        path: socket.to_path_buf(),
        source,
    };
    // bound under a new name and moved into place once QEMU serves it: a server that
    // runs already keeps its socket
    let mut fresh = socket.as_os_str().to_owned();
    fresh.push(".new");
    let fresh = PathBuf::from(fresh);
    let _ = std::fs::remove_file(&fresh);
    let listener = std::os::unix::net::UnixListener::bind(&fresh).map_err(listen_err)?;
    let name = "tern-nbd-listen";
    let qmp_err = |source| StartNbdServerError::Qmp {
        path: socket.to_path_buf(),
        source,
    };
    let started = async {
        qmp.getfd(name, std::os::fd::OwnedFd::from(listener))
            .await?;
        // (the legacy form: nbd-server-start's flat form has no fd type)
        qmp.execute(
            "nbd-server-start",
            Some(json!({ "addr": { "type": "fd", "data": { "str": name } } })),
        )
        .await
    }
    .await;
    if started.is_err() {
        let _ = std::fs::remove_file(&fresh);
    } else {
        std::fs::rename(&fresh, socket).map_err(listen_err)?;
    }
    match started {
        Ok(_) => Ok(()),
        Err(e) if is_command_error(&e, "already running") => {
            Err(StartNbdServerError::AlreadyRunning)
        }
        Err(source) => Err(qmp_err(source)),
    }
}

/// Why QEMU's NBD server could not be stopped.
#[derive(Debug, thiserror::Error)]
#[error("nbd-server-stop failed")]
pub struct StopNbdServerError(#[source] pub QmpError);

/// `nbd-server-stop`: closes the socket and drops every NBD export with its clients (the
/// exports' `BLOCK_EXPORT_DELETED` may follow a little later: wait with
/// [`wait_export_gone`] before removing their bitmaps). A server that is not running is
/// not an error.
pub async fn stop_nbd_server(qmp: &QmpClient) -> Result<(), StopNbdServerError> {
    match qmp.execute("nbd-server-stop", None).await {
        Ok(_) => Ok(()),
        Err(e) if is_command_error(&e, "not running") => Ok(()),
        Err(e) => Err(StopNbdServerError(e)),
    }
}

/// An NBD export of a disk node on QEMU's NBD server.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NbdExport {
    /// Block export id (`tern-diskN`).
    pub id: String,
    /// NBD export name clients ask for (the node name).
    pub name: String,
    pub node: String,
    /// The frozen bitmap it carries (`qemu:dirty-bitmap:NAME`), source exports only.
    pub bitmap: Option<String>,
    pub writable: bool,
}

/// Why an export could not be added.
#[derive(Debug, thiserror::Error)]
pub enum ExportError {
    #[error("{node} is already exported (export {id} exists): remove it first")]
    AlreadyExported { node: String, id: String },
    #[error("no NBD server runs in this QEMU: start_nbd_server first")]
    NoServer,
    #[error("block-export-add of {node} failed")]
    Qmp {
        node: String,
        #[source]
        source: QmpError,
    },
}

async fn add_export(qmp: &QmpClient, e: NbdExport, extra: Value) -> Result<NbdExport, ExportError> {
    let mut args = json!({ "type": "nbd", "id": e.id, "node-name": e.node, "name": e.name,
                           "writable": e.writable });
    if let (Some(a), Some(extra)) = (args.as_object_mut(), extra.as_object()) {
        a.extend(extra.clone());
    }
    match qmp.execute("block-export-add", Some(args)).await {
        Ok(_) => Ok(e),
        Err(err) if is_command_error(&err, "already in use") => Err(ExportError::AlreadyExported {
            node: e.node,
            id: e.id,
        }),
        Err(err) if is_command_error(&err, "NBD server not running") => Err(ExportError::NoServer),
        Err(source) => Err(ExportError::Qmp {
            node: e.node,
            source,
        }),
    }
}

/// Source: exports the frozen bitmap's node read-only with the bitmap
/// (`qemu:dirty-bitmap:tern-rK`) and `qemu:allocation-depth`:
/// `block-export-add {type: nbd, id: tern-diskN, node-name: diskN, name: diskN,
/// writable: false, bitmaps: [tern-rK], allocation-depth: true}`. Reads see the disk as
/// it is now (including writes after the freeze, which the next round carries again).
pub async fn export_frozen(
    qmp: &QmpClient,
    frozen: &FrozenBitmap,
) -> Result<NbdExport, ExportError> {
    let e = NbdExport {
        id: export_id(&frozen.node),
        name: frozen.node.clone(),
        node: frozen.node.clone(),
        bitmap: Some(frozen.bitmap.clone()),
        writable: false,
    };
    add_export(
        qmp,
        e,
        json!({ "bitmaps": [frozen.bitmap], "allocation-depth": true }),
    )
    .await
}

/// Destination: exports `node` writable (`block-export-add {type: nbd, id: tern-diskN,
/// node-name: diskN, name: diskN, writable: true}`), so tern writes the disk's blocks into
/// the incoming QEMU's image, whatever its format. Activates an inactive (incoming) node;
/// see the module doc for what that implies. Remove it before the VM runs
/// ([`finish_incoming`]).
pub async fn export_writable(qmp: &QmpClient, node: &str) -> Result<NbdExport, ExportError> {
    let e = NbdExport {
        id: export_id(node),
        name: node.to_string(),
        node: node.to_string(),
        bitmap: None,
        writable: true,
    };
    add_export(qmp, e, json!({})).await
}

/// How [`remove_export`] treats clients still connected.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RemoveMode {
    /// Wait (retrying `block-export-del` mode safe) for clients to leave; a client that
    /// just sent `NBD_CMD_DISC` may still hold the export for a moment.
    Safe,
    /// Drop connected clients at once (`mode: hard`), e.g. on abort.
    Hard,
}

/// Why an export could not be removed.
#[derive(Debug, thiserror::Error)]
pub enum RemoveExportError {
    #[error("export {id} still has NBD clients after {waited:?}")]
    StillInUse { id: String, waited: Duration },
    #[error("export {id} was still shutting down after {waited:?}")]
    NotGone { id: String, waited: Duration },
    #[error("block-export-del {id} failed")]
    Qmp {
        id: String,
        #[source]
        source: QmpError,
    },
}

/// `block-export-del`, then waits until QEMU has really deleted the export
/// (`BLOCK_EXPORT_DELETED`, or `query-block-exports` no longer listing it); only then is
/// its bitmap free again. An export that does not exist counts as removed.
pub async fn remove_export(
    qmp: &QmpClient,
    export: &NbdExport,
    mode: RemoveMode,
    timeout: Duration,
) -> Result<(), RemoveExportError> {
    let t0 = Instant::now();
    let deadline = t0 + timeout;
    // Subscribe first: QEMU may send BLOCK_EXPORT_DELETED before its reply.
    let mut events = qmp.subscribe();
    let id = export.id.as_str();
    let mode_arg = match mode {
        RemoveMode::Safe => "safe",
        RemoveMode::Hard => "hard",
    };
    loop {
        match qmp
            .execute(
                "block-export-del",
                Some(json!({ "id": id, "mode": mode_arg })),
            )
            .await
        {
            Ok(_) => break,
            Err(e) if is_command_error(&e, "not found") => return Ok(()),
            Err(e) if is_command_error(&e, "still in use") => {
                if Instant::now() >= deadline {
                    return Err(RemoveExportError::StillInUse {
                        id: id.to_string(),
                        waited: t0.elapsed(),
                    });
                }
                tokio::time::sleep(POLL).await;
            }
            Err(source) => {
                return Err(RemoveExportError::Qmp {
                    id: id.to_string(),
                    source,
                })
            }
        }
    }
    wait_export_gone_inner(qmp, id, &mut events, t0, deadline).await
}

/// Waits until export `id` is gone (e.g. after [`stop_nbd_server`]).
pub async fn wait_export_gone(
    qmp: &QmpClient,
    id: &str,
    timeout: Duration,
) -> Result<(), RemoveExportError> {
    let t0 = Instant::now();
    let mut events = qmp.subscribe();
    wait_export_gone_inner(qmp, id, &mut events, t0, t0 + timeout).await
}

async fn wait_export_gone_inner(
    qmp: &QmpClient,
    id: &str,
    events: &mut tokio::sync::broadcast::Receiver<crate::qmp::QmpEvent>,
    t0: Instant,
    deadline: Instant,
) -> Result<(), RemoveExportError> {
    let qmp_err = |source| RemoveExportError::Qmp {
        id: id.to_string(),
        source,
    };
    loop {
        // Drain the events that already arrived.
        loop {
            match events.try_recv() {
                Ok(e)
                    if e.event == "BLOCK_EXPORT_DELETED"
                        && e.data.get("id").and_then(Value::as_str) == Some(id) =>
                {
                    return Ok(())
                }
                Ok(_) | Err(tokio::sync::broadcast::error::TryRecvError::Lagged(_)) => {}
                Err(_) => break,
            }
        }
        if !export_ids(qmp)
            .await
            .map_err(qmp_err)?
            .iter()
            .any(|e| e == id)
        {
            return Ok(());
        }
        if Instant::now() >= deadline {
            return Err(RemoveExportError::NotGone {
                id: id.to_string(),
                waited: t0.elapsed(),
            });
        }
        // Wakes on any event; the loop re-checks (a matching one shows in the query too).
        let _ = tokio::time::timeout(POLL, events.recv()).await;
    }
}

/// Why the destination's disk could not be handed to the guest.
#[derive(Debug, thiserror::Error)]
pub enum FinishIncomingError {
    #[error("removing the writable export of {node}")]
    Remove {
        node: String,
        #[source]
        source: RemoveExportError,
    },
    #[error("export {id} is still listed by query-block-exports: the guest must not run")]
    StillExported { id: String },
    #[error("query-block-exports failed")]
    Qmp(#[source] QmpError),
}

/// Destination, after the last round and before `cont`: removes the writable export
/// (mode safe: tern's client must have flushed and disconnected) and checks QEMU lists it
/// no more. Only then may the guest run.
pub async fn finish_incoming(
    qmp: &QmpClient,
    export: &NbdExport,
    timeout: Duration,
) -> Result<(), FinishIncomingError> {
    remove_export(qmp, export, RemoveMode::Safe, timeout)
        .await
        .map_err(|source| FinishIncomingError::Remove {
            node: export.node.clone(),
            source,
        })?;
    if export_ids(qmp)
        .await
        .map_err(FinishIncomingError::Qmp)?
        .contains(&export.id)
    {
        return Err(FinishIncomingError::StillExported {
            id: export.id.clone(),
        });
    }
    Ok(())
}

// ---- switchover -----------------------------------------------------------------------

/// Why pause-before-switchover could not be set.
#[derive(Debug, thiserror::Error)]
#[error("migrate-set-capabilities pause-before-switchover failed")]
pub struct PauseBeforeSwitchoverError(#[source] pub QmpError);

/// Source, before `migrate`: `migrate-set-capabilities [pause-before-switchover, events]`.
/// QEMU then stops the vCPUs, drains and flushes the disks, and waits in state
/// `pre-switchover` before it sends the device state, until [`continue_switchover`].
pub async fn enable_pause_before_switchover(
    qmp: &QmpClient,
) -> Result<(), PauseBeforeSwitchoverError> {
    qmp.set_migrate_capabilities(&[("pause-before-switchover", true), ("events", true)])
        .await
        .map_err(PauseBeforeSwitchoverError)
}

/// Why the source did not reach `pre-switchover`.
#[derive(Debug, thiserror::Error)]
pub enum WaitPreSwitchoverError {
    #[error("migration ended in state {status} before pre-switchover{}", error_desc.as_deref().map(|d| format!(": {d}")).unwrap_or_default())]
    Ended {
        status: String,
        error_desc: Option<String>,
    },
    #[error("no migration is running (state {0}): migrate first")]
    NotMigrating(String),
    #[error("migration still {status} after {waited:?}")]
    Timeout { status: String, waited: Duration },
    #[error("query-migrate failed")]
    Qmp(#[source] QmpError),
}

/// Source: waits (MIGRATION events, with `query-migrate` as the authority) until QEMU's
/// outgoing migration is in state `pre-switchover`: the guest is stopped and its disks
/// quiescent. Returns QEMU's migration statistics at that point.
pub async fn wait_for_pre_switchover(
    qmp: &QmpClient,
    timeout: Duration,
) -> Result<MigrationInfo, WaitPreSwitchoverError> {
    let t0 = Instant::now();
    let mut events = qmp.subscribe();
    loop {
        let info = qmp
            .query_migrate()
            .await
            .map_err(WaitPreSwitchoverError::Qmp)?;
        match info.status.as_str() {
            "pre-switchover" => return Ok(info),
            "completed" | "failed" | "cancelled" | "cancelling" => {
                return Err(WaitPreSwitchoverError::Ended {
                    status: info.status,
                    error_desc: info.error_desc,
                })
            }
            "none" => return Err(WaitPreSwitchoverError::NotMigrating(info.status)),
            _ => {}
        }
        if t0.elapsed() >= timeout {
            return Err(WaitPreSwitchoverError::Timeout {
                status: info.status,
                waited: t0.elapsed(),
            });
        }
        // Wake on the next MIGRATION event, or re-ask after a short while.
        let wait = async {
            loop {
                match events.recv().await {
                    Ok(e) if e.event == "MIGRATION" => return,
                    Ok(_) | Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {}
                    Err(_) => return,
                }
            }
        };
        let _ = tokio::time::timeout(Duration::from_millis(100), wait).await;
    }
}

/// Why the switchover could not be continued.
#[derive(Debug, thiserror::Error)]
#[error("migrate-continue (pre-switchover) failed")]
pub struct ContinueSwitchoverError(#[source] pub QmpError);

/// Source, after the last disk round: `migrate-continue {state: pre-switchover}`; QEMU
/// sends the device state and the migration completes.
pub async fn continue_switchover(qmp: &QmpClient) -> Result<(), ContinueSwitchoverError> {
    qmp.execute(
        "migrate-continue",
        Some(json!({ "state": "pre-switchover" })),
    )
    .await
    .map_err(ContinueSwitchoverError)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_stable() {
        assert_eq!(node_name(0), "disk0");
        assert_eq!(file_node_name(3), "disk3-file");
        assert_eq!(device_id(1), "virtio-disk1");
        assert_eq!(export_id("disk0"), "tern-disk0");
        assert_eq!(bitmap_name(12), "tern-r12");
        assert!(bitmap_name(0).starts_with(BITMAP_PREFIX));
    }

    #[test]
    fn parses_named_block_nodes() {
        let v: Value = serde_json::from_str(
            r#"{"active": true, "image": {"virtual-size": 67108864, "filename": "/d/a.qcow2",
                "format": "qcow2", "backing-filename": "base.qcow2"},
                "ro": false, "node-name": "disk0", "drv": "qcow2", "backing_file": "/d/base.qcow2",
                "dirty-bitmaps": [
                  {"name": "tern-r1", "recording": true, "persistent": false, "busy": false,
                   "granularity": 4096, "count": 8192},
                  {"name": "tern-r0", "recording": false, "persistent": false, "busy": true,
                   "granularity": 4096, "count": 0}],
                "file": "/d/a.qcow2"}"#,
        )
        .unwrap();
        let n = BlockNodeInfo::from_json(&v).unwrap();
        assert_eq!(n.node, "disk0");
        assert_eq!(n.driver, "qcow2");
        assert_eq!(n.virtual_size, 64 << 20);
        assert!(n.active && !n.read_only);
        assert_eq!(n.backing_file.as_deref(), Some(Path::new("/d/base.qcow2")));
        assert_eq!(n.dirty_bitmaps.len(), 2);
        assert_eq!(
            n.dirty_bitmaps[0],
            DirtyBitmapInfo {
                name: "tern-r1".into(),
                recording: true,
                busy: false,
                granularity: 4096,
                dirty_bytes: 8192
            }
        );
        assert!(n.dirty_bitmaps[1].busy && !n.dirty_bitmaps[1].recording);
        // a node without an image (no size) is not a disk
        assert!(BlockNodeInfo::from_json(&json!({"node-name": "x"})).is_none());
    }
}

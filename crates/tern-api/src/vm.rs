//! VMs as the API shows them, and the requests about one.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

/// What `tern vm list` shows for a VM.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct VmInfo {
    pub name: String,
    pub state: String,
    pub memory_mib: u32,
    pub vcpus: u32,
    pub accel: String,
    pub pid: Option<u32>,
    pub qemu_version: String,
    pub run_dir: PathBuf,
    pub console_log: PathBuf,
    pub qmp_socket: PathBuf,
    /// Its local disks as this host has them (after a migration: the images tern made).
    #[serde(default)]
    pub disks: Vec<VmDisk>,
    /// Its network cards, in guest order.
    #[serde(default)]
    pub nics: Vec<VmNic>,
}

/// One network card of a VM: its virtual network, its MAC (kept wherever the VM goes) and
/// the tap it has on this host (None if its QEMU is gone or the tap cannot be read).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmNic {
    pub network: String,
    pub mac: String,
    pub tap: Option<String>,
}

/// One disk of a VM: the image on this host and its format (`raw`, `qcow2`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmDisk {
    pub path: PathBuf,
    pub format: String,
}

/// `POST /v1/vms`: start a VM from a TOML spec.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StartVmRequest {
    pub spec_toml: String,
}

/// `POST /v1/vms/{name}/qmp`: one QMP command (only `query-*` and run control pass).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct QmpRequest {
    pub execute: String,
    #[serde(default)]
    pub arguments: Option<serde_json::Value>,
}

/// `POST /v1/vms/{name}/memory`: the guest's physical memory `[0, size)` as raw bytes, in
/// a new file at `path` on the agent's host (mode 0600).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SaveMemoryRequest {
    pub path: PathBuf,
    pub size: u64,
}

/// `POST /v1/vms/{name}/upgrade`: continue the VM in a new QEMU process on this host, its
/// memory handed over without a copy (`tern vm upgrade`).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct UpgradeRequest {
    /// The new QEMU binary on the agent's host; None: the one new VMs get.
    #[serde(default)]
    pub qemu: Option<PathBuf>,
}

/// What an upgrade did.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UpgradeReport {
    pub vm: String,
    pub old_qemu_version: String,
    pub new_qemu_version: String,
    pub new_binary: PathBuf,
    pub new_pid: Option<u32>,
    /// The VM ran (and runs again in the new QEMU); false: it was paused and stays so.
    pub running: bool,
    /// From the request to the new QEMU running the VM.
    pub total_ms: u64,
    /// The guest's pause as tern saw it: from the old QEMU stopping to the new one
    /// running (None when the VM was paused anyway).
    pub downtime_ms: Option<u64>,
    /// The old QEMU's own measure of the pause (its `downtime`).
    pub qemu_downtime_ms: u64,
    /// The device-state stream tern carried from the old QEMU to the new one.
    pub stream_bytes: u64,
    /// RAM pages (and their bytes) in that stream: 0 when memory was handed over.
    pub ram_pages_copied: u64,
    pub ram_bytes_copied: u64,
    /// RAM pages sent as "all one byte" records (also 0 when handed over).
    pub zero_pages: u64,
}

/// `POST /v1/vms/{name}/move`: hand the VM to another agent on this host, its memory
/// handed over without a copy (`tern vm move`).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct MoveLocalRequest {
    /// The other agent's API, `unix:/path` (root only, like this one's).
    pub agent: String,
}

/// `POST /v1/handover` (from another agent on this host): start a QEMU that takes over a
/// VM's memory and device state from the caller's QEMU.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct HandOverRequest {
    pub spec_toml: String,
    /// The VM runs (and must run here after the commit).
    pub running: bool,
    /// The VM's vTPM migration key (hex), when it has a TPM.
    #[serde(default)]
    pub tpm_key_hex: Option<String>,
    /// The user the caller's QEMU runs as: it must reach the new QEMU's sockets.
    #[serde(default)]
    pub source_qemu_user: Option<String>,
}

/// The answer to a [`HandOverRequest`]: where the new QEMU listens.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct HandOverReady {
    pub id: String,
    pub cpr: PathBuf,
    pub main: PathBuf,
    /// The new QEMU's run directory (it holds the switchover record after the commit).
    pub run_dir: PathBuf,
}

/// `POST /v1/handover/{id}/commit`: the VM runs in the new QEMU.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct HandOverDone {
    pub pid: Option<u32>,
    pub qemu_version: String,
    pub binary: PathBuf,
}

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

//! What a host and its VMs use, as the agent samples it (`GET /v1/load`): the input a
//! cluster controller places and balances VMs by. Counters are given both as rates over
//! the agent's last sample interval and as totals, so a poller can average over a window
//! of its own.

use serde::{Deserialize, Serialize};

/// The leading cluster controller's poll. Only this request on an agent's control
/// listener is the controller's word for the agent's fence (`tern agent --fence-after`);
/// a dry-run controller polls `/v1/load` without it.
pub const LEADER_POLL: &str = "/v1/load?leader=1";

/// One host's load at the agent's latest sample.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HostLoad {
    /// The agent's name (`tern agent --name`).
    pub host: String,
    /// The host's labels, from its certificate (granted by the cluster CA).
    pub labels: Vec<String>,
    /// CPU cores VMs may use on this host: `tern agent --capacity-cores`, else the cores
    /// the agent's process may run on.
    pub capacity_cores: f64,
    /// The host's memory (`MemTotal` of /proc/meminfo), bytes.
    pub mem_total_bytes: u64,
    /// Memory the host can give without swapping (`MemAvailable`), bytes.
    pub mem_available_bytes: u64,
    /// CPU cores busy host-wide (everything, not only VMs: /proc/stat) over the last
    /// sample interval; 0 in a first sample.
    pub cpu_busy_cores: f64,
    /// The agent's monotonic clock at the sample: milliseconds since the agent started.
    pub uptime_ms: u64,
    /// Length of the interval the rates are over, milliseconds; 0 in a first sample
    /// (no rates yet).
    pub interval_ms: u64,
    /// The VMs this agent runs, by name.
    pub vms: Vec<VmLoad>,
    /// `tern agent --fence-after`, seconds: how long a silent controller takes to make
    /// this host pause its VMs (None: it never does).
    #[serde(default)]
    pub fence_after_s: Option<f64>,
}

/// One VM's load at the agent's latest sample. Rates are over the host's last sample
/// interval (0 when the VM was not in the previous sample, or its QEMU changed); totals
/// are since its QEMU started. Network counters are from the guest's point of view.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct VmLoad {
    pub name: String,
    /// Its state as `GET /v1/vms` reports it (`running`, `paused`, `migrating`, ...).
    pub state: String,
    /// Virtual CPUs configured.
    pub vcpus: u32,
    /// Guest memory configured, bytes.
    pub mem_bytes: u64,
    /// Resident memory of its QEMU process (`VmRSS`), bytes.
    pub rss_bytes: u64,
    /// CPU cores its QEMU used over the last interval (all threads; its own cgroup's
    /// when it has one).
    pub cpu_cores: f64,
    /// CPU time its QEMU used since it started, seconds (cumulative).
    pub cpu_seconds: f64,
    /// Bytes per second its QEMU read from storage over the last interval.
    pub disk_read_bps: f64,
    /// Bytes per second its QEMU wrote to storage over the last interval.
    pub disk_write_bps: f64,
    /// Bytes per second the guest received on its network cards over the last interval.
    pub net_rx_bps: f64,
    /// Bytes per second the guest sent on its network cards over the last interval.
    pub net_tx_bps: f64,
    /// Bytes its QEMU read from storage (/proc/PID/io `read_bytes`), cumulative.
    pub disk_read_bytes: u64,
    /// Bytes its QEMU wrote to storage (/proc/PID/io `write_bytes`), cumulative.
    pub disk_write_bytes: u64,
    /// Bytes the guest received on all its cards (its taps' `tx_bytes`), cumulative.
    pub net_rx_bytes: u64,
    /// Bytes the guest sent on all its cards (its taps' `rx_bytes`), cumulative.
    pub net_tx_bytes: u64,
    /// It has a vTPM (the authorisation policy sends such VMs only to `trusted` hosts).
    pub tpm: bool,
    /// Virtual size of its disks that are not shared (what a migration copies), bytes.
    pub local_disk_bytes: u64,
    /// A migration (or upgrade) owns it now.
    pub migrating: bool,
}

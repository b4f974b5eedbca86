//! The VMs this agent runs: one supervised QEMU process per VM, its QMP handle and its
//! run directory. Owns starting, stopping, noticing when QEMU exits, and re-attaching to
//! VMs that outlived a previous agent process; knows nothing about migration beyond a
//! "busy" mark. VMs are not tied to the agent's life: stopping or restarting the agent
//! leaves them running.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use tern_qemu::launch::{LaunchError, QemuProcess};
use tern_qemu::qmp::QmpClient;
use tern_qemu::spec::VmSpec;
use tokio::sync::{mpsc, watch};

/// How to stop a VM.
#[derive(Debug, Clone, Copy)]
pub enum StopMode {
    /// QMP `quit`, then SIGKILL after a grace period.
    Quit,
    /// SIGKILL at once.
    Kill,
}

pub struct Vm {
    pub spec: VmSpec,
    pub qmp: QmpClient,
    pub run_dir: PathBuf,
    pub console_log: PathBuf,
    pub pid: Option<u32>,
    pub qemu_version: String,
    /// Set while a migration owns this VM.
    pub migrating: AtomicBool,
    /// When this agent began running it (microseconds since the epoch): its cards'
    /// claim on the overlay ([`crate::overlay`]).
    pub since_us: u64,
    exited: watch::Receiver<Option<String>>,
    stop_tx: mpsc::Sender<StopMode>,
}

pub use tern_api::vm::VmInfo;

impl Vm {
    /// Takes ownership of a launched QEMU and supervises it until it exits or is stopped.
    pub fn supervise(spec: VmSpec, mut process: QemuProcess) -> Vm {
        let (exit_tx, exited) = watch::channel(None);
        let (stop_tx, mut stop_rx) = mpsc::channel::<StopMode>(1);
        let qmp = process.qmp.clone();
        let run_dir = process.run_dir.clone();
        let console_log = process.console_log.clone();
        let pid = process.pid();
        let qemu_version = qmp.version().to_string();
        let name = spec.name.clone();
        let taps = taps_of(&spec, pid);
        tokio::spawn(async move {
            let how = tokio::select! {
                st = process.wait() => {
                    let how = match st {
                        Ok(s) => format!("exited ({s})"),
                        Err(e) => format!("lost ({e})"),
                    };
                    tracing::warn!(vm = %name, pid = ?pid, "the VM's QEMU {how} without being asked to stop");
                    how
                }
                Some(mode) = stop_rx.recv() => {
                    match mode {
                        StopMode::Quit => process.quit(Duration::from_secs(10)).await,
                        StopMode::Kill => process.kill().await,
                    }
                    "stopped".to_string()
                }
            };
            remove_taps(&taps).await;
            let _ = exit_tx.send(Some(how));
        });
        Vm {
            spec,
            qmp,
            run_dir,
            console_log,
            pid,
            qemu_version,
            migrating: AtomicBool::new(false),
            since_us: crate::overlay::now_us(),
            exited,
            stop_tx,
        }
    }

    /// `Some(reason)` once QEMU is gone.
    pub fn exit_reason(&self) -> Option<String> {
        self.exited.borrow().clone()
    }

    /// Watches for QEMU going away (`Some(reason)` then).
    pub fn exit_watch(&self) -> watch::Receiver<Option<String>> {
        self.exited.clone()
    }

    /// Supervises a QEMU that is not our child: one a previous agent process started.
    /// Its exit is noticed by polling `/proc/PID`; stopping uses QMP `quit`, then SIGKILL.
    pub fn reattach(spec: VmSpec, qmp: QmpClient, pid: u32, run_dir: PathBuf) -> Vm {
        let (exit_tx, exited) = watch::channel(None);
        let (stop_tx, mut stop_rx) = mpsc::channel::<StopMode>(1);
        let qemu_version = qmp.version().to_string();
        let q = qmp.clone();
        let taps = taps_of(&spec, Some(pid));
        tokio::spawn(async move {
            let gone = || !process_alive(pid);
            let how = loop {
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_millis(500)) => {
                        if gone() {
                            break "exited".to_string();
                        }
                    }
                    Some(mode) = stop_rx.recv() => {
                        if let StopMode::Quit = mode {
                            let _ = tokio::time::timeout(Duration::from_secs(10), q.execute("quit", None)).await;
                            for _ in 0..100 {
                                if gone() {
                                    break;
                                }
                                tokio::time::sleep(Duration::from_millis(100)).await;
                            }
                        }
                        if !gone() {
                            kill_pid(pid);
                        }
                        break "stopped".to_string();
                    }
                }
            };
            remove_taps(&taps).await;
            let _ = exit_tx.send(Some(how));
        });
        Vm {
            console_log: run_dir.join("console.log"),
            spec,
            qmp,
            run_dir,
            pid: Some(pid),
            qemu_version,
            migrating: AtomicBool::new(false),
            since_us: crate::overlay::now_us(),
            exited,
            stop_tx,
        }
    }

    /// Stops QEMU and waits until it is gone.
    pub async fn stop(&self, mode: StopMode) {
        let _ = self.stop_tx.send(mode).await;
        let mut rx = self.exited.clone();
        let _ = rx.wait_for(|e| e.is_some()).await;
    }

    pub async fn info(&self) -> VmInfo {
        let state = match self.exit_reason() {
            Some(r) => r,
            None if self.migrating.load(Ordering::SeqCst) => "migrating".into(),
            None => {
                match tokio::time::timeout(Duration::from_secs(2), self.qmp.query_status()).await {
                    Ok(Ok(s)) => s.status,
                    Ok(Err(e)) => format!("unknown ({e})"),
                    Err(_) => "unresponsive".into(),
                }
            }
        };
        VmInfo {
            name: self.spec.name.clone(),
            state,
            memory_mib: self.spec.memory_mib,
            vcpus: self.spec.vcpus,
            accel: self.spec.accel.as_str().into(),
            pid: self.pid,
            qemu_version: self.qemu_version.clone(),
            run_dir: self.run_dir.clone(),
            console_log: self.console_log.clone(),
            qmp_socket: self.run_dir.join("qmp.sock"),
            disks: self
                .spec
                .disks
                .iter()
                .map(|d| tern_api::vm::VmDisk {
                    path: d.path.clone(),
                    format: d.format.as_str().into(),
                })
                .collect(),
            nics: self
                .spec
                .nics
                .iter()
                .enumerate()
                .map(|(i, n)| tern_api::vm::VmNic {
                    network: n.network.clone(),
                    mac: n.mac.map(|m| m.to_string()).unwrap_or_default(),
                    tap: self.pid.and_then(|pid| {
                        tern_net::tap::name_in(pid, tern_qemu::launch::NIC_FD_BASE + i as i32)
                    }),
                })
                .collect(),
        }
    }
}

/// Whether a process exists and is not a zombie.
pub fn process_alive(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(s) => s
            .rsplit_once(") ")
            .is_some_and(|(_, rest)| !rest.starts_with('Z')),
        Err(_) => false,
    }
}

/// The interface indexes of the taps QEMU `pid` holds for `spec`'s cards (where the
/// agent passed them: `NIC_FD_BASE + N`).
fn taps_of(spec: &VmSpec, pid: Option<u32>) -> Vec<u32> {
    let Some(pid) = pid else { return Vec::new() };
    (0..spec.nics.len())
        .filter_map(|i| tern_net::tap::name_in(pid, tern_qemu::launch::NIC_FD_BASE + i as i32))
        .filter_map(|name| tern_net::tap::index_of(&name))
        .collect()
}

/// A gone QEMU's taps go with it: a tap vanishes with its last descriptor, unless QEMU
/// made it persistent (a QEMU that escaped its sandbox can: the descriptor needs no
/// privilege for that), so the agent deletes what is left, by index (a name is
/// reused at once; an index is not).
async fn remove_taps(taps: &[u32]) {
    if taps.is_empty() {
        return;
    }
    match tern_net::bridge::Netlink::open() {
        Ok(nl) => {
            for &index in taps {
                if let Err(e) = nl.delete(index).await {
                    tracing::warn!("a gone VM's tap: {e}");
                }
            }
        }
        Err(e) => tracing::warn!("a gone VM's taps: {e}"),
    }
}

/// SIGKILL a process that is not our child (no unsafe code: the `kill` utility).
pub fn kill_pid(pid: u32) {
    let _ = std::process::Command::new("kill")
        .args(["-KILL", &pid.to_string()])
        .status();
}

/// Why `tern vm start` failed.
#[derive(Debug, thiserror::Error)]
pub enum StartVmError {
    #[error("invalid VM spec")]
    Spec(#[from] tern_qemu::spec::SpecError),
    #[error("{0}")]
    SharedDisk(String),
    #[error("a VM named {0:?} already exists on this host")]
    Exists(String),
    #[error("the spec names a libvirt domain ([libvirt]): libvirt starts its domains; tern only carries their migrations (tern migrate --libvirt)")]
    LibvirtDomain,
    #[error("could not start QEMU")]
    Launch(#[from] LaunchError),
    #[error("could not start the VM's TPM (swtpm)")]
    Tpm(#[from] tern_qemu::swtpm::SwtpmStartError),
    #[error("could not make a MAC address for the VM's network card")]
    Mac(#[source] std::io::Error),
    #[error("MAC {mac} on network {network:?} is VM {vm:?}'s on this host: give the card another mac (or none: one is made)")]
    MacInUse {
        mac: String,
        network: String,
        vm: String,
    },
    #[error("could not set up the VM's network cards on this host")]
    Net(#[from] tern_net::NetError),
}

/// Why `tern vm stop` failed.
#[derive(Debug, thiserror::Error)]
pub enum StopVmError {
    #[error("no VM named {0:?} on this host")]
    NotFound(String),
    #[error("VM {0:?} is being migrated; cancel the migration first (tern migrate --cancel {0})")]
    Migrating(String),
}

/// Why `tern vm upgrade` failed.
#[derive(Debug, thiserror::Error)]
pub enum UpgradeVmError {
    #[error("no VM named {0:?} on this host")]
    NotFound(String),
    #[error("VM {0:?} is being migrated or upgraded; wait for it or cancel it first")]
    Busy(String),
    #[error("the upgrade of VM {vm:?} failed")]
    Failed {
        vm: String,
        #[source]
        source: Box<tern_engine::local::UpgradeFailed>,
    },
}

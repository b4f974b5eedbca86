//! Same-host moves: a running VM continues in a new QEMU process on this host (a newer
//! QEMU binary, or the same one after a library update) without a page of its memory
//! being copied. Owns the hand-over and its safety; the daemon owns the VM registry and
//! swaps the VM's entry when [`upgrade`] returns.
//!
//! ```text
//!  old QEMU (running) ── cpr socket: memfd descriptors ──────────────> new QEMU (-S)
//!      └─ src socket ─> tern: parse + count (relay) ─> main socket ──────┘
//!  record the switchover (new run dir) ─ cont new ─ daemon stops old, removes its dir
//! ```
//!
//! Guest RAM lives in a memfd both QEMUs map ([`tern_qemu::spec::GuestMemory::Shared`]);
//! QEMU's `cpr-transfer` mode passes its descriptors over a unix socket and sends only the
//! device state (TPM state included), which tern carries and counts ([`relay`]). The old
//! QEMU stops when the hand-over starts and stays intact (paused, `postmigrate`) until the
//! new one runs, so until the commit any failure resumes it: [`upgrade`] returns
//! [`UpgradeFailed`] with where the VM is. The commit is the [`SwitchRecord`] in the new
//! run directory; the old one carries an [`UPGRADING`] mark naming the new one, so an agent
//! restarted at any point knows which QEMU is the VM ([`UpgradeMark`]).

mod relay;

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde_json::json;
use tern_qemu::launch::{binary_version, CprIncoming, LaunchOptions, QemuProcess};
use tern_qemu::qmp::{QmpClient, QmpError};
use tern_qemu::spec::{GuestMemory, VmSpec};

pub use relay::{Carried, RelayError};

use crate::dest::{SwitchRecord, INCOMING_MARKER};
use crate::fault::fault;
use crate::{BoxFuture, Fault, Host, HostLaunchError};

/// File in the old QEMU's run directory while an upgrade hands its VM over ([`UpgradeMark`]).
pub const UPGRADING: &str = "upgrading";

/// Oldest QEMU that can hand a VM over (`cpr-transfer` came in 10.0).
const CPR_QEMU: (u32, u32) = (10, 0);

/// Longest any one step may take (start-up of the new QEMU, the device state).
const STEP: Duration = Duration::from_secs(60);

/// What the old run directory says during an upgrade: the new QEMU's run directory, and
/// whether the VM ran. A restarted agent finds the VM in `to` if `to` holds a
/// [`SwitchRecord`], else here (resumed if it ran).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct UpgradeMark {
    pub to: PathBuf,
    pub source_running: bool,
    /// A move to another agent: where to reach its hand-over (a restarted sender asks it
    /// to give up, and waits for its answer, before it runs the VM here again).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub handover: Option<HandOverPeer>,
}

/// The receiving agent of a move, as the sender's upgrade mark names it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct HandOverPeer {
    /// Its local API, `unix:/path`.
    pub agent: String,
    /// The hand-over's id there.
    pub id: String,
}

impl UpgradeMark {
    /// Writes the mark into the old QEMU's `run_dir`, durably.
    pub fn write(&self, run_dir: &Path) -> std::io::Result<()> {
        crate::dest::record::write_durably(
            run_dir,
            UPGRADING,
            &serde_json::to_vec(self).map_err(std::io::Error::other)?,
        )
    }

    /// The mark in `run_dir`, if there is a readable one.
    pub fn read(run_dir: &Path) -> Option<UpgradeMark> {
        serde_json::from_slice(&std::fs::read(run_dir.join(UPGRADING)).ok()?).ok()
    }

    /// Whether the hand-over committed: the new QEMU's directory holds the switchover record.
    pub fn committed(&self) -> bool {
        SwitchRecord::read(&self.to).is_some()
    }
}

/// The VM as it runs now.
pub struct LocalVm<'a> {
    pub spec: &'a VmSpec,
    pub qmp: &'a QmpClient,
    pub run_dir: &'a Path,
    /// Its QEMU's pid: only that process may send the device state.
    pub pid: Option<u32>,
}

/// How to upgrade.
#[derive(Debug, Clone, Default)]
pub struct UpgradeOptions {
    /// The new QEMU binary; None: the one new VMs get (`TERN_QEMU` or
    /// `qemu-system-x86_64` on the PATH).
    pub qemu_binary: Option<PathBuf>,
    /// The user QEMU runs as (the old QEMU connects to the new one's socket as it).
    pub qemu_user: Option<String>,
    pub fault: Option<Fault>,
}

/// A finished hand-over: the new QEMU (running if the VM ran) and what it cost.
pub struct Upgraded {
    pub process: QemuProcess,
    pub report: tern_api::vm::UpgradeReport,
}

/// Why an upgrade did not happen.
#[derive(Debug, thiserror::Error)]
pub enum UpgradeError {
    #[error("VM {0:?} has private memory (the default; its spec has no memory = \"shared\"): it cannot be handed to a new QEMU without a copy; restart it with memory = \"shared\", or migrate it to another host")]
    PrivateMemory(String),
    #[error("VM {vm:?} is {status}: only a running or paused VM can be upgraded")]
    NotRunning { vm: String, status: String },
    #[error("VM {vm:?} has a migration in QEMU ({status}): wait for it or cancel it first")]
    MigrationActive { vm: String, status: String },
    #[error("cannot run {binary} -version (is it a QEMU binary?)")]
    Binary {
        binary: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{what} is QEMU {major}.{minor}: handing a VM over needs QEMU 10.0 or newer on both sides (cpr-transfer)")]
    OldQemu {
        what: String,
        major: u32,
        minor: u32,
    },
    #[error("cannot prepare the hand-over ({what})")]
    Files {
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error("the new QEMU did not start: {0}")]
    Launch(String),
    #[error("the new QEMU did not open its hand-over socket within {0} s (see its qemu.log)")]
    NoCprSocket(u64),
    #[error("{step} failed")]
    Qmp {
        step: &'static str,
        #[source]
        source: QmpError,
    },
    #[error("QEMU's hand-over failed on the {side} side: {message}")]
    Qemu { side: &'static str, message: String },
    #[error("carrying the device state failed")]
    Relay(#[from] RelayError),
    #[error("{0} did not finish within {1} s")]
    Timeout(&'static str, u64),
    #[error("the other agent: {0}")]
    Peer(String),
    #[error("cannot record the switchover in {dir}: the VM stays with its old QEMU")]
    Record {
        dir: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// A failed upgrade: why, and where the VM is now.
#[derive(Debug, thiserror::Error)]
#[error("{error} ({vm_state})")]
pub struct UpgradeFailed {
    #[source]
    pub error: UpgradeError,
    pub vm_state: String,
}

fn qmp_err(step: &'static str) -> impl FnOnce(QmpError) -> UpgradeError {
    move |source| UpgradeError::Qmp { step, source }
}

/// Hands the VM over to a new QEMU on this host. On success the new QEMU runs the VM (or
/// holds it paused, as it was) and the old one is paused for good: the caller stops it
/// and removes its run directory, then clears the new directory's incoming mark
/// ([`finish`]). On failure the old QEMU runs the VM as before.
pub async fn upgrade(
    host: &dyn Host,
    vm: LocalVm<'_>,
    o: &UpgradeOptions,
) -> Result<Upgraded, UpgradeFailed> {
    let fail = |error, vm_state: &str| UpgradeFailed {
        error,
        vm_state: vm_state.to_string(),
    };
    let untouched = "the VM runs in its old QEMU, untouched";
    let started = Instant::now();
    let checked = check(&vm, o).await.map_err(|e| fail(e, untouched))?;
    // the new QEMU's run directory, marked incoming until the daemon took it over
    let to = host.new_run_dir(&vm.spec.name);
    let mark = UpgradeMark {
        to: to.clone(),
        source_running: checked.running,
        handover: None,
    };
    if let Err(e) = prepare_dirs(&vm, &to, &mark) {
        let _ = std::fs::remove_dir_all(&to);
        let _ = std::fs::remove_file(vm.run_dir.join(UPGRADING));
        return Err(fail(e, untouched));
    }
    match hand_over(host, &vm, o, &checked, &to, started).await {
        Ok(u) => Ok(u),
        Err(error) => {
            tracing::warn!(vm = %vm.spec.name, "upgrade failed: {}", crate::error_chain(&error));
            let vm_state = roll_back(host, &vm, &to, checked.running).await;
            Err(UpgradeFailed { error, vm_state })
        }
    }
}

/// After the daemon took the new QEMU over and stopped the old one: the new run
/// directory is the VM's for good.
pub fn finish(new_run_dir: &Path) {
    let _ = std::fs::remove_file(new_run_dir.join(INCOMING_MARKER));
}

struct Checked {
    running: bool,
    binary: PathBuf,
}

async fn check(vm: &LocalVm<'_>, o: &UpgradeOptions) -> Result<Checked, UpgradeError> {
    let running = check_source(vm).await?;
    let binary = o
        .qemu_binary
        .clone()
        .unwrap_or_else(|| LaunchOptions::new(PathBuf::new()).qemu_binary);
    check_binary(&binary)?;
    Ok(Checked { running, binary })
}

/// Whether `binary` is a QEMU that can take a VM over (10.0 or newer).
pub fn check_binary(binary: &Path) -> Result<(), UpgradeError> {
    let (major, minor) = binary_version(binary).map_err(|source| UpgradeError::Binary {
        binary: binary.to_path_buf(),
        source,
    })?;
    if (major, minor) < CPR_QEMU {
        return Err(UpgradeError::OldQemu {
            what: binary.display().to_string(),
            major,
            minor,
        });
    }
    Ok(())
}

/// Whether the VM can be handed over from its QEMU: shared memory, QEMU 10.0 or newer,
/// running or paused, no migration in QEMU. Whether it runs.
pub async fn check_source(vm: &LocalVm<'_>) -> Result<bool, UpgradeError> {
    let name = vm.spec.name.clone();
    if vm.spec.memory != GuestMemory::Shared {
        return Err(UpgradeError::PrivateMemory(name));
    }
    let v = vm.qmp.version();
    if (v.major, v.minor) < CPR_QEMU {
        return Err(UpgradeError::OldQemu {
            what: "the VM's QEMU".into(),
            major: v.major,
            minor: v.minor,
        });
    }
    let status = vm
        .qmp
        .query_status()
        .await
        .map_err(qmp_err("query-status"))?;
    if !status.running && status.status != "paused" {
        return Err(UpgradeError::NotRunning {
            vm: name,
            status: status.status,
        });
    }
    let m = vm
        .qmp
        .query_migrate()
        .await
        .map_err(qmp_err("query-migrate"))?;
    if matches!(
        m.status.as_str(),
        "setup" | "active" | "device" | "pre-switchover" | "cancelling" | "wait-unplug"
    ) {
        return Err(UpgradeError::MigrationActive {
            vm: name,
            status: m.status,
        });
    }
    Ok(status.running)
}

fn prepare_dirs(vm: &LocalVm<'_>, to: &Path, mark: &UpgradeMark) -> Result<(), UpgradeError> {
    let files = |what: &str| {
        let what = what.to_string();
        move |source| UpgradeError::Files { what, source }
    };
    std::fs::create_dir_all(to).map_err(files("the new run directory"))?;
    std::fs::write(to.join(INCOMING_MARKER), b"upgrade").map_err(files("the incoming mark"))?;
    if vm.spec.tpm {
        // the TPM state crosses in the device state, sealed with the VM's migration key
        std::fs::copy(
            crate::tpm_migration_key_path(vm.run_dir),
            crate::tpm_migration_key_path(to),
        )
        .map_err(files("the TPM migration key"))?;
    }
    mark.write(vm.run_dir).map_err(files("the upgrade mark"))
}

/// `(uid, gid)` of a user, from `id`.
fn user_ids(user: &str) -> std::io::Result<(u32, u32)> {
    let id = |flag: &str| -> std::io::Result<u32> {
        let out = std::process::Command::new("id")
            .args([flag, user])
            .output()?;
        String::from_utf8_lossy(&out.stdout)
            .trim()
            .parse()
            .map_err(|_| std::io::Error::other(format!("no user {user:?}")))
    };
    Ok((id("-u")?, id("-g")?))
}

/// Where the two QEMUs meet: a fresh directory only the old QEMU's user (and root) can
/// enter, with the new QEMU's two listening sockets and tern's relay socket.
pub struct HandOverDir {
    dir: tempfile::TempDir,
    /// `(uid, gid)` of the old QEMU's user, who gets the directory and the sockets it
    /// connects to (None: root's).
    owner: Option<(u32, u32)>,
}

impl HandOverDir {
    /// A new directory (mode 0700) for the old QEMU, which runs as `user` (None: root).
    pub fn new(user: Option<&str>) -> Result<HandOverDir, UpgradeError> {
        let files = |source| UpgradeError::Files {
            what: "the hand-over directory".into(),
            source,
        };
        let owner = user
            .map(|u| {
                user_ids(u).map_err(|source| UpgradeError::Files {
                    what: format!("the ids of user {u}"),
                    source,
                })
            })
            .transpose()?;
        let dir = tempfile::Builder::new()
            .prefix("tern-cpr-")
            .tempdir()
            .map_err(files)?;
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o700))
            .map_err(files)?;
        let h = HandOverDir { dir, owner };
        h.give(h.dir.path())?;
        Ok(h)
    }

    /// Gives `path` to the old QEMU's user (it connects to it as that user).
    fn give(&self, path: &Path) -> Result<(), UpgradeError> {
        let Some((uid, gid)) = self.owner else {
            return Ok(());
        };
        std::os::unix::fs::chown(path, Some(uid), Some(gid)).map_err(|source| UpgradeError::Files {
            what: format!("giving {} to uid {uid}", path.display()),
            source,
        })
    }
    /// The new QEMU's channel for the memory's descriptors.
    pub fn cpr(&self) -> PathBuf {
        self.dir.path().join("cpr.sock")
    }
    /// The new QEMU's channel for the device state.
    pub fn main(&self) -> PathBuf {
        self.dir.path().join("main.sock")
    }
    /// How the new QEMU starts: paused, listening here, kept when the agent exits.
    pub fn receiver_options(&self, to: &Path, binary: &Path) -> LaunchOptions {
        let mut opts = LaunchOptions::new(to.to_path_buf());
        opts.qemu_binary = binary.to_path_buf();
        opts.start_paused = true;
        opts.kill_on_drop = false; // the VM outlives the agent
        opts.cpr_incoming = Some(CprIncoming {
            main: self.main(),
            cpr: self.cpr(),
        });
        opts
    }
}

/// A new QEMU that started and listens for the memory (no QMP yet: it opens its monitor
/// only once it has the memory). Await it with [`loaded`].
pub type Pending<'a> = BoxFuture<'a, Result<QemuProcess, HostLaunchError>>;

/// The receiving half, first step: starts the new QEMU (`opts` from
/// [`HandOverDir::receiver_options`]) and returns once its cpr socket exists.
pub async fn start_receiver<'a>(
    host: &'a dyn Host,
    spec: &'a VmSpec,
    opts: &'a LaunchOptions,
    h: &HandOverDir,
) -> Result<Pending<'a>, UpgradeError> {
    let cpr = h.cpr();
    let mut launch = host.launch(spec, opts);
    let deadline = Instant::now() + STEP;
    // listening, not only there: QEMU binds the socket (the file appears) a moment
    // before it listens, and an old QEMU that connects in between is refused
    while !listening(&cpr) {
        tokio::select! {
            r = &mut launch => {
                return Err(match r {
                    Err(e) => UpgradeError::Launch(e.0),
                    Ok(mut p) => {
                        p.kill().await;
                        UpgradeError::Launch("it answered QMP before it had the memory".into())
                    }
                });
            }
            _ = tokio::time::sleep(Duration::from_millis(5)) => {}
        }
        if Instant::now() > deadline {
            return Err(UpgradeError::NoCprSocket(STEP.as_secs()));
        }
    }
    // QEMU made it as root (before dropping to its user)
    h.give(&cpr)?;
    Ok(launch)
}

/// Whether a unix socket listens at `path` (`/proc/net/unix`: its flags hold
/// `__SO_ACCEPTCON`), in this network namespace.
fn listening(path: &Path) -> bool {
    let Ok(table) = std::fs::read_to_string("/proc/net/unix") else {
        return path.exists();
    };
    let want = path.to_string_lossy();
    table.lines().skip(1).any(|l| {
        let f: Vec<&str> = l.split_whitespace().collect();
        f.len() >= 8
            && f[7] == want
            && u32::from_str_radix(f[3], 16).is_ok_and(|flags| flags & 0x0001_0000 != 0)
    })
}

/// The receiving half, second step: the new QEMU answers QMP and has loaded the device
/// state (it stays paused).
pub async fn loaded(
    pending: Pending<'_>,
    fault: Option<Fault>,
) -> Result<QemuProcess, UpgradeError> {
    let mut p = tokio::time::timeout(STEP, pending)
        .await
        .map_err(|_| UpgradeError::Timeout("the new QEMU's start", STEP.as_secs()))?
        .map_err(|e| UpgradeError::Launch(e.0))?;
    if fault!(fault, UpgradeKillNewQemu) {
        tracing::warn!("fault injection: killing the new QEMU during the hand-over");
        if let Some(pid) = p.pid() {
            kill(pid);
        }
    }
    if let Err(e) = wait_completed(&p.qmp, "new").await {
        p.kill().await;
        return Err(e);
    }
    Ok(p)
}

/// The receiving half, last step: the commit (the switchover record in `to`), then the
/// VM runs there if it ran. A failure here kills the new QEMU; before `cont` the record
/// is taken back, so the old QEMU may still run the VM.
pub async fn commit(
    process: &mut QemuProcess,
    to: &Path,
    running: bool,
    fault: Option<Fault>,
) -> Result<(), UpgradeError> {
    if fault!(fault, UpgradeExitBeforeCommit) {
        tracing::warn!("fault injection: exiting before the upgrade's commit");
        std::process::exit(72);
    }
    let record = SwitchRecord {
        migration_id: format!("upgrade-{}", crate::new_migration_id()),
        peer: "this host".into(),
        source_running: running,
        resumed_unix_us: 0,
    };
    let written = if fault!(fault, FailSwitchRecord) {
        tracing::warn!("fault injection: the hand-over's switchover record cannot be written");
        Err(std::io::Error::other("fault injection"))
    } else {
        record.write(to)
    };
    if let Err(source) = written {
        process.kill().await;
        return Err(UpgradeError::Record {
            dir: to.to_path_buf(),
            source,
        });
    }
    if fault!(fault, UpgradeExitAfterCommit) {
        tracing::warn!("fault injection: exiting between the upgrade's commit and cont");
        std::process::exit(73);
    }
    if fault!(fault, UpgradeKillBeforeCont) {
        tracing::warn!("fault injection: killing the new QEMU between the commit and cont");
        process.kill().await;
    }
    if running {
        if let Err(e) = process.qmp.execute("cont", None).await {
            // it never ran: the old QEMU may still take the VM back
            let _ = std::fs::remove_file(to.join(crate::dest::SWITCHED_IN));
            process.kill().await;
            return Err(UpgradeError::Qmp {
                step: "cont (new QEMU)",
                source: e,
            });
        }
        // its network cards are on new taps (docs/network.md): they say so at once, so
        // the bridge forwards to them and not to the old QEMU's taps (none for a VM
        // without cards)
        crate::source::recover::announce(&process.qmp).await;
    }
    Ok(())
}

/// What the sending half did.
pub struct Sent {
    pub carried: Carried,
    /// The old QEMU's own measure of its pause.
    pub qemu_downtime_ms: u64,
    /// When the old QEMU stopped the guest.
    pub stopped: Instant,
}

/// The sending half: the old QEMU hands its memory to the QEMU listening on `cpr` and
/// sends its device state through tern's relay (its socket in `own`) to `main`.
pub async fn send(
    vm: &LocalVm<'_>,
    own: &HandOverDir,
    cpr: &Path,
    main: &Path,
    fault: Option<Fault>,
) -> Result<Sent, UpgradeError> {
    let q = vm.qmp;
    q.set_migrate_capabilities(&[("pause-before-switchover", false)])
        .await
        .map_err(qmp_err("migrate-set-capabilities"))?;
    q.set_migrate_parameters(json!({ "mode": "cpr-transfer" }))
        .await
        .map_err(qmp_err("migrate-set-parameters mode=cpr-transfer"))?;
    // QEMU 10.0.2 crashes in cpr-transfer with an `fd:` main channel (checked): the old
    // QEMU connects to tern by path instead, and tern takes only that process.
    let src = own.dir.path().join("src.sock");
    let listener = tokio::net::UnixListener::bind(&src).map_err(|source| UpgradeError::Files {
        what: "tern's hand-over socket".into(),
        source,
    })?;
    own.give(&src)?;
    let stopped = Instant::now();
    q.execute(
        "migrate",
        Some(json!({ "channels": [
            { "channel-type": "main",
              "addr": { "transport": "socket", "type": "unix", "path": src.to_string_lossy() } },
            { "channel-type": "cpr",
              "addr": { "transport": "socket", "type": "unix", "path": cpr.to_string_lossy() } },
        ] })),
    )
    .await
    .map_err(qmp_err("migrate (cpr-transfer)"))?;
    let cut = fault!(fault, UpgradeCutStream).then_some(4096);
    // the old QEMU's own failure (or its exit) ends the wait at once, with its words
    let carried = tokio::select! {
        r = tokio::time::timeout(STEP, relay::carry(&listener, vm.pid, main, cut)) => {
            r.map_err(|_| UpgradeError::Timeout("the hand-over", STEP.as_secs()))??
        }
        e = until_failed(q, "old") => return Err(e),
    };
    let qemu_downtime_ms = wait_completed(q, "old").await?;
    if fault!(fault, MoveExitBeforeCommit) {
        tracing::warn!("fault injection: exiting after sending the VM, before its commit");
        std::process::exit(74);
    }
    Ok(Sent {
        carried,
        qemu_downtime_ms,
        stopped,
    })
}

async fn hand_over(
    host: &dyn Host,
    vm: &LocalVm<'_>,
    o: &UpgradeOptions,
    checked: &Checked,
    to: &Path,
    started: Instant,
) -> Result<Upgraded, UpgradeError> {
    let h = HandOverDir::new(o.qemu_user.as_deref())?;
    let opts = h.receiver_options(to, &checked.binary);
    let pending = start_receiver(host, vm.spec, &opts, &h).await?;
    let (cpr, main) = (h.cpr(), h.main());
    let (sent, mut process) =
        tokio::try_join!(send(vm, &h, &cpr, &main, o.fault), loaded(pending, o.fault))?;
    commit(&mut process, to, checked.running, o.fault).await?;
    let new = NewQemu::of(&process, &checked.binary);
    let report = report(vm, &new, checked.running, &sent, started);
    Ok(Upgraded { process, report })
}

/// The QEMU that took the VM over, as a report names it.
#[derive(Debug, Clone)]
pub struct NewQemu {
    pub version: String,
    pub pid: Option<u32>,
    pub binary: PathBuf,
}

impl NewQemu {
    pub fn of(process: &QemuProcess, binary: &Path) -> NewQemu {
        let v = process.qmp.version();
        NewQemu {
            version: format!("{}.{}.{}", v.major, v.minor, v.micro),
            pid: process.pid(),
            binary: binary.to_path_buf(),
        }
    }
}

/// The report of a hand-over that committed.
pub fn report(
    vm: &LocalVm<'_>,
    new: &NewQemu,
    running: bool,
    sent: &Sent,
    started: Instant,
) -> tern_api::vm::UpgradeReport {
    let v = vm.qmp.version();
    tern_api::vm::UpgradeReport {
        vm: vm.spec.name.clone(),
        old_qemu_version: format!("{}.{}.{}", v.major, v.minor, v.micro),
        new_qemu_version: new.version.clone(),
        new_binary: new.binary.clone(),
        new_pid: new.pid,
        running,
        total_ms: started.elapsed().as_millis() as u64,
        downtime_ms: running.then(|| sent.stopped.elapsed().as_millis() as u64),
        qemu_downtime_ms: sent.qemu_downtime_ms,
        stream_bytes: sent.carried.bytes,
        ram_pages_copied: sent.carried.ram_pages,
        ram_bytes_copied: sent.carried.ram_page_bytes,
        zero_pages: sent.carried.zero_pages,
    }
}

/// Waits until `qmp`'s migration completed (polled: both ends, in milliseconds); the old
/// side's QEMU-measured downtime (ms).
async fn wait_completed(qmp: &QmpClient, side: &'static str) -> Result<u64, UpgradeError> {
    let deadline = Instant::now() + STEP;
    loop {
        let m = qmp
            .query_migrate()
            .await
            .map_err(qmp_err("query-migrate"))?;
        match m.status.as_str() {
            "completed" => return Ok(m.downtime_ms.unwrap_or(0)),
            _ if failed(&m) => return Err(qemu_failure(m, side)),
            _ if Instant::now() > deadline => {
                return Err(UpgradeError::Timeout("QEMU's hand-over", STEP.as_secs()))
            }
            _ => tokio::time::sleep(Duration::from_millis(2)).await,
        }
    }
}

/// Returns only when `qmp`'s migration failed or its QEMU stopped answering: why.
async fn until_failed(qmp: &QmpClient, side: &'static str) -> UpgradeError {
    loop {
        match qmp.query_migrate().await {
            Err(source) => return qmp_err("query-migrate")(source),
            Ok(m) if failed(&m) => return qemu_failure(m, side),
            Ok(_) => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    }
}

/// Whether QEMU's migration ended without completing.
fn failed(m: &tern_qemu::qmp::MigrationInfo) -> bool {
    matches!(m.status.as_str(), "failed" | "cancelled")
}

/// A failed QEMU migration on `side`, in QEMU's words.
fn qemu_failure(m: tern_qemu::qmp::MigrationInfo, side: &'static str) -> UpgradeError {
    UpgradeError::Qemu {
        side,
        message: m.error_desc.unwrap_or(m.status),
    }
}

/// Before the commit: the new QEMU goes (it may never have answered QMP, so by its pid
/// file), its directory with it, and the old QEMU runs the VM as before.
async fn roll_back(host: &dyn Host, vm: &LocalVm<'_>, to: &Path, was_running: bool) -> String {
    discard_new(host, to).await;
    resume_old(vm, to, was_running).await
}

/// The receiving half gives up: the new QEMU in `to` is killed by its pid file (it may
/// never have answered QMP) and its run directory removed (its swtpm's state first).
pub async fn discard_new(host: &dyn Host, to: &Path) {
    if let Some(pid) = std::fs::read_to_string(to.join("qemu.pid"))
        .ok()
        .and_then(|p| p.trim().parse::<u32>().ok())
    {
        if cmdline_mentions(pid, to) {
            kill(pid);
            let deadline = Instant::now() + Duration::from_secs(10);
            while cmdline_mentions(pid, to) && Instant::now() < deadline {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    }
    host.remove_run_dir(to).await;
}

/// The old QEMU takes the VM back (its migration cancelled if it still runs, resumed if
/// it ran), unless `to` recorded the switchover: then the VM is there and the old QEMU
/// stays paused for good. Clears the upgrade mark either way; says where the VM is.
pub async fn resume_old(vm: &LocalVm<'_>, to: &Path, was_running: bool) -> String {
    let pid = vm.pid.map(|p| format!(", pid {p}")).unwrap_or_default();
    if SwitchRecord::read(to).is_some() {
        return format!(
            "the VM runs in its new QEMU (the switchover was recorded in {})",
            to.display()
        );
    }
    let state = crate::source::recover::recover_source(vm.qmp, None, was_running).await;
    let _ = vm
        .qmp
        .set_migrate_parameters(json!({ "mode": "normal" }))
        .await;
    let _ = std::fs::remove_file(vm.run_dir.join(UPGRADING));
    match vm.qmp.query_status().await {
        Ok(s) if s.running => format!("the VM runs in its old QEMU{pid}"),
        Ok(s) => format!("the VM is {} in its old QEMU{pid} ({state})", s.status),
        Err(_) => format!("the VM's old QEMU: {state}"),
    }
}

/// Whether process `pid` is alive and its command line mentions `dir` (a QEMU of ours).
fn cmdline_mentions(pid: u32, dir: &Path) -> bool {
    std::fs::read(format!("/proc/{pid}/cmdline"))
        .map(|c| String::from_utf8_lossy(&c).contains(&*dir.to_string_lossy()))
        .unwrap_or(false)
        && std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| {
            s.rsplit_once(") ")
                .is_some_and(|(_, r)| !r.starts_with('Z'))
        })
}

fn kill(pid: u32) {
    if let Some(p) = rustix::process::Pid::from_raw(pid as i32) {
        let _ = rustix::process::kill_process(p, rustix::process::Signal::KILL);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_socket_is_listening_only_once_it_listens() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("s.sock");
        assert!(!listening(&p));
        // bound, not listening: the file is there, the socket refuses
        let bound =
            socket2::Socket::new(socket2::Domain::UNIX, socket2::Type::STREAM, None).unwrap();
        bound.bind(&socket2::SockAddr::unix(&p).unwrap()).unwrap();
        assert!(p.exists() && !listening(&p));
        bound.listen(1).unwrap();
        assert!(listening(&p));
    }

    #[test]
    fn the_mark_says_the_upgrade_committed_only_once_the_new_directory_holds_the_record() {
        let old = tempfile::tempdir().unwrap();
        let new = tempfile::tempdir().unwrap();
        let mark = UpgradeMark {
            to: new.path().to_path_buf(),
            source_running: true,
            handover: None,
        };
        mark.write(old.path()).unwrap();
        let read = UpgradeMark::read(old.path()).unwrap();
        assert_eq!(read, mark);
        assert!(!read.committed(), "no record yet: the VM is the old QEMU's");
        SwitchRecord {
            migration_id: "upgrade-x".into(),
            peer: "this host".into(),
            source_running: true,
            resumed_unix_us: 0,
        }
        .write(new.path())
        .unwrap();
        assert!(read.committed(), "the record is the commit");
        assert!(UpgradeMark::read(new.path()).is_none());

        // a move's mark names the receiver; a mark written before moves existed still reads
        let moved = UpgradeMark {
            handover: Some(HandOverPeer {
                agent: "unix:/run/b.sock".into(),
                id: "m1".into(),
            }),
            ..mark.clone()
        };
        moved.write(old.path()).unwrap();
        assert_eq!(UpgradeMark::read(old.path()), Some(moved));
        std::fs::write(
            old.path().join(UPGRADING),
            format!(r#"{{"to":{:?},"source_running":false}}"#, new.path()),
        )
        .unwrap();
        assert_eq!(UpgradeMark::read(old.path()).unwrap().handover, None);
    }
}

//! Turning a [`VmSpec`] into a running QEMU process: the command line, the per-VM run
//! directory (QMP socket, serial console log, QEMU's own log), spawning, connecting QMP,
//! and stopping. Owns the QEMU process lifetime; must not decide when to stop it. A VM
//! with `tpm = true` needs its swtpm listening before launch ([`crate::swtpm`]); the
//! launcher only connects QEMU to it. Disks become `-blockdev` nodes and virtio-blk
//! devices named as [`crate::disk`] documents, on the source and on an incoming
//! destination alike (the destination's image must exist before launch). Network cards
//! are virtio-net devices on taps whose descriptors the caller opened
//! ([`LaunchOptions::nic_fds`]); QEMU never opens a tap itself.

use std::ffi::OsString;
use std::os::fd::{OwnedFd, RawFd};
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::sync::Arc;
use std::time::Duration;

use tokio::process::{Child, Command};

use serde_json::json;

use crate::disk;
use crate::qmp::{QmpClient, QmpError};
use crate::spec::{Accel, Firmware, GuestMemory, SpecError, VmSpec, SHARED_RAM_ID};

/// How to launch a VM.
#[derive(Debug, Clone)]
pub struct LaunchOptions {
    /// `qemu-system-x86_64` unless `TERN_QEMU` names another binary.
    pub qemu_binary: PathBuf,
    /// Per-VM directory: qmp.sock, console.log and qemu.log live here.
    pub run_dir: PathBuf,
    /// `-incoming defer`: the VM waits for `migrate-incoming`.
    pub incoming_defer: bool,
    /// `-S`: do not start the vCPUs.
    pub start_paused: bool,
    /// Kill QEMU when the [`QemuProcess`] is dropped (tests, tools). An agent sets this to
    /// false: its VMs outlive it and a restarted agent re-attaches to them.
    pub kill_on_drop: bool,
    /// The control socket of the VM's swtpm, used when the spec has `tpm = true`. None:
    /// [`crate::swtpm::ctrl_socket_path`] of `run_dir` (where
    /// [`crate::swtpm::SwtpmConfig::for_run_dir`] puts it).
    pub tpm_ctrl_socket: Option<PathBuf>,
    /// Run QEMU as this user: it opens its start-up files (kernel, initrd, disk images,
    /// console log, QMP socket) as the caller, then drops to the user (`-run-with user=`,
    /// `-runas` before QEMU 9.1). Everything it needs later is passed as a descriptor.
    pub run_as: Option<String>,
    /// QEMU's seccomp sandbox ([`SANDBOX`]).
    pub sandbox: bool,
    /// Start as the new QEMU of a same-host hand-over (`cpr-transfer`): listen on these
    /// two unix sockets instead of `-incoming defer`. Its QMP socket appears only after
    /// the old QEMU sent its memory on `cpr`, so [`QemuProcess::launch`] waits for it.
    pub cpr_incoming: Option<CprIncoming>,
    /// One open tap descriptor per card of the spec, in its order (QEMU gets card N's at
    /// descriptor [`NIC_FD_BASE`]` + N`). The caller keeps its own copies or drops them.
    pub nic_fds: Vec<Arc<OwnedFd>>,
    /// Disk N's image as an open descriptor (read-write, O_DIRECT), for a disk the caller
    /// opened itself (a shared disk a peer named): QEMU gets it at [`DISK_FD_BASE`]` + N`
    /// (`-add-fd`, `filename=/dev/fdset/N+1`) and never opens that path. None, or no
    /// entry: QEMU opens the path.
    pub disk_fds: Vec<Option<Arc<OwnedFd>>>,
}

/// The MTU a VM's card offers its guest (virtio-net `host_mtu`): a 1500-byte underlay
/// less VXLAN's 50 bytes, so every frame a guest sends fits a network that spans hosts
/// (`tern_net::vxlan`), wherever the VM runs. The same on every host: it is part of the
/// device a migration carries.
pub const GUEST_MTU: u16 = 1450;

/// QEMU finds card N's tap at this descriptor plus N (`-netdev tap,fd=`).
pub const NIC_FD_BASE: RawFd = 100;

/// Where QEMU finds disk N's descriptor when the caller opened it
/// ([`LaunchOptions::disk_fds`]).
pub const DISK_FD_BASE: RawFd = 200;

/// The listening sockets of a QEMU that takes a VM over on the same host.
#[derive(Debug, Clone)]
pub struct CprIncoming {
    /// The migration stream (device state; RAM stays where it is).
    pub main: PathBuf,
    /// The channel on which the old QEMU passes its memory's descriptors.
    pub cpr: PathBuf,
}

/// QEMU's seccomp sandbox as tern runs it: no obsolete system calls, no spawning
/// programs, no resource control. Set-uid calls stay allowed only because QEMU drops to
/// its user after the filter is in place (`-run-with user=`); after that it holds no
/// capabilities and cannot gain any.
pub const SANDBOX: &str =
    "on,obsolete=deny,elevateprivileges=allow,spawn=deny,resourcecontrol=deny";

impl LaunchOptions {
    pub fn new(run_dir: PathBuf) -> Self {
        let qemu_binary = std::env::var_os("TERN_QEMU")
            .filter(|s| !s.is_empty())
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from("qemu-system-x86_64"));
        LaunchOptions {
            qemu_binary,
            run_dir,
            incoming_defer: false,
            start_paused: false,
            kill_on_drop: true,
            tpm_ctrl_socket: None,
            run_as: None,
            sandbox: false,
            cpr_incoming: None,
            nic_fds: Vec::new(),
            disk_fds: Vec::new(),
        }
    }

    /// Where QEMU looks for the VM's swtpm (see [`LaunchOptions::tpm_ctrl_socket`]).
    pub fn tpm_ctrl_socket(&self) -> PathBuf {
        self.tpm_ctrl_socket
            .clone()
            .unwrap_or_else(|| crate::swtpm::ctrl_socket_path(&self.run_dir))
    }
}

/// The machine types `qemu_binary` knows (`-machine help`), e.g. `pc`, `q35`,
/// `pc-i440fx-10.0`.
pub fn machine_types(qemu_binary: &Path) -> std::io::Result<Vec<String>> {
    let out = std::process::Command::new(qemu_binary)
        .args(["-machine", "help"])
        .stdin(Stdio::null())
        .stderr(Stdio::null())
        .output()?;
    if !out.status.success() {
        return Err(std::io::Error::other(format!(
            "{} -machine help exited with {}",
            qemu_binary.display(),
            out.status
        )));
    }
    Ok(parse_machine_help(&String::from_utf8_lossy(&out.stdout)))
}

/// `(major, minor)` of `qemu_binary`, from `-version` (asked once per binary).
pub fn binary_version(qemu_binary: &Path) -> std::io::Result<(u32, u32)> {
    use std::collections::HashMap;
    use std::sync::Mutex;
    static SEEN: Mutex<Option<HashMap<PathBuf, (u32, u32)>>> = Mutex::new(None);
    if let Some(v) = SEEN
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .as_ref()
        .and_then(|m| m.get(qemu_binary).copied())
    {
        return Ok(v);
    }
    let out = std::process::Command::new(qemu_binary)
        .arg("-version")
        .stdin(Stdio::null())
        .output()?;
    let text = String::from_utf8_lossy(&out.stdout);
    let v = parse_version_line(&text).ok_or_else(|| {
        std::io::Error::other(format!(
            "{} -version printed no version: {}",
            qemu_binary.display(),
            text.trim()
        ))
    })?;
    SEEN.lock()
        .unwrap_or_else(|e| e.into_inner())
        .get_or_insert_with(HashMap::new)
        .insert(qemu_binary.to_path_buf(), v);
    Ok(v)
}

/// "QEMU emulator version 10.0.2 (Debian ...)" -> (10, 0).
fn parse_version_line(text: &str) -> Option<(u32, u32)> {
    let v = text.split("version ").nth(1)?.split_whitespace().next()?;
    let mut it = v.split('.');
    Some((it.next()?.parse().ok()?, it.next()?.parse().ok()?))
}

fn parse_machine_help(text: &str) -> Vec<String> {
    text.lines()
        .filter(|l| !l.starts_with("Supported machines"))
        .filter_map(|l| l.split_whitespace().next())
        .map(str::to_string)
        .collect()
}

/// OVMF as Debian's `ovmf` package installs it: (code, variable-store template), the
/// 4 MiB flash layout first.
pub const OVMF: &[(&str, &str)] = &[
    (
        "/usr/share/OVMF/OVMF_CODE_4M.fd",
        "/usr/share/OVMF/OVMF_VARS_4M.fd",
    ),
    (
        "/usr/share/OVMF/OVMF_CODE.fd",
        "/usr/share/OVMF/OVMF_VARS.fd",
    ),
];

/// This host's OVMF (code, variable-store template), if installed.
pub fn ovmf() -> Option<(PathBuf, PathBuf)> {
    OVMF.iter()
        .map(|(c, v)| (PathBuf::from(c), PathBuf::from(v)))
        .find(|(c, v)| c.exists() && v.exists())
}

/// Block node names of a UEFI VM's firmware code and variable store.
pub const EFI_CODE_NODE: &str = "efi-code";
pub const EFI_VARS_NODE: &str = "efi-vars";

/// A UEFI VM's own variable store: a copy of OVMF's template, made at its first start.
pub fn efi_vars_path(run_dir: &Path) -> PathBuf {
    run_dir.join("efivars.fd")
}

/// `s` as one value inside a QEMU `-opt key=value,...` list (commas doubled).
fn qemu_opt_value(s: &Path) -> String {
    s.display().to_string().replace(',', ",,")
}

#[derive(Debug, thiserror::Error)]
pub enum LaunchError {
    #[error("invalid VM spec")]
    Spec(#[from] SpecError),
    #[error("accel = \"kvm\" but /dev/kvm is not available on this host: use accel = \"tcg\" or enable KVM")]
    NoKvm,
    #[error("run directory {path} is too long for a unix socket path (max 100 bytes): use a shorter --state-dir")]
    PathTooLong { path: PathBuf },
    #[error("cannot create run directory {path}")]
    RunDir {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot start {binary} (is QEMU installed? run scripts/setup.sh)")]
    Spawn {
        binary: PathBuf,
        source: std::io::Error,
    },
    #[error("QEMU exited during start-up ({status}): {stderr_tail}")]
    Exited {
        status: ExitStatus,
        stderr_tail: String,
    },
    #[error("QEMU started but its QMP socket did not answer")]
    Qmp(#[source] QmpError),
    #[error("the VM spec has tpm = true but no swtpm listens on {path}: start the VM's swtpm first (tern_qemu::swtpm)")]
    NoSwtpm { path: PathBuf },
    #[error("the VM spec has firmware = \"uefi\" but OVMF is not installed on this host (none of {}): apt install ovmf", OVMF.iter().map(|(c, _)| *c).collect::<Vec<_>>().join(", "))]
    NoOvmf,
    #[error("the VM has {cards} network cards but {taps} taps were opened for it")]
    NicFds { cards: usize, taps: usize },
    #[error("network card {0} has no MAC (the agent gives every card one before it starts)")]
    NicWithoutMac(usize),
    #[error("cannot make the VM's UEFI variable store {path}")]
    EfiVars {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// QEMU inherits `fds` at [`NIC_FD_BASE`], [`NIC_FD_BASE`]` + 1`, ... (copies; no other
/// descriptor of the caller's: the rest are close-on-exec).
fn pass_fds(
    cmd: &mut Command,
    fds: &[Arc<OwnedFd>],
    disks: &[Option<Arc<OwnedFd>>],
) -> std::io::Result<()> {
    use command_fds::{CommandFdExt, FdMapping};
    let mut mappings = Vec::new();
    for (i, fd) in fds.iter().enumerate() {
        mappings.push(FdMapping {
            parent_fd: fd.try_clone()?,
            child_fd: NIC_FD_BASE + i as RawFd,
        });
    }
    for (i, fd) in disks.iter().enumerate() {
        if let Some(fd) = fd {
            mappings.push(FdMapping {
                parent_fd: fd.try_clone()?,
                child_fd: DISK_FD_BASE + i as RawFd,
            });
        }
    }
    if mappings.is_empty() {
        return Ok(());
    }
    cmd.fd_mappings(mappings)
        .map_err(|_| std::io::Error::other("two descriptors for one number"))?;
    Ok(())
}

/// A running QEMU, killed if dropped.
pub struct QemuProcess {
    pub qmp: QmpClient,
    pub run_dir: PathBuf,
    pub console_log: PathBuf,
    child: Child,
    exited: Option<ExitStatus>,
}

/// The last `max` bytes of a process's log, trimmed, or "(`who` printed nothing)".
pub(crate) fn log_tail(path: &Path, max: usize, who: &str) -> String {
    let b = std::fs::read(path).unwrap_or_default();
    let s = String::from_utf8_lossy(&b[b.len().saturating_sub(max)..])
        .trim()
        .to_string();
    if s.is_empty() {
        format!("({who} printed nothing)")
    } else {
        s
    }
}

impl QemuProcess {
    /// The QEMU command line for `spec` (without the binary), for QEMU 10.
    pub fn command_line(spec: &VmSpec, opts: &LaunchOptions) -> Vec<OsString> {
        Self::command_line_for(spec, opts, (10, 0))
    }

    /// The command line for a QEMU of version `(major, minor)` (it decides how the user
    /// to run as is named).
    fn command_line_for(
        spec: &VmSpec,
        opts: &LaunchOptions,
        qemu_version: (u32, u32),
    ) -> Vec<OsString> {
        let rd = &opts.run_dir;
        let mut a: Vec<OsString> = Vec::new();
        let mut push = |s: &str| a.push(s.into());
        if opts.sandbox {
            push("-sandbox");
            push(SANDBOX);
        }
        if let Some(u) = &opts.run_as {
            if qemu_version >= (9, 1) {
                push("-run-with");
                push(&format!("user={u}"));
            } else {
                push("-runas");
                push(u);
            }
        }
        push("-name");
        push(&format!("guest={},debug-threads=on", spec.name));
        push("-machine");
        let machine = match spec.firmware {
            Firmware::Bios => spec.machine.clone(),
            Firmware::Uefi => format!(
                "{},pflash0={EFI_CODE_NODE},pflash1={EFI_VARS_NODE}",
                spec.machine
            ),
        };
        match spec.memory {
            // RAM in a memfd both QEMUs of a same-host upgrade map (cpr-transfer hands
            // it over); aux-ram-share puts the machine's other RAM (ROMs, VGA) there too.
            GuestMemory::Shared => {
                push(&format!(
                    "{machine},memory-backend={SHARED_RAM_ID},aux-ram-share=on"
                ));
                push("-object");
                push(&format!(
                    "memory-backend-memfd,id={SHARED_RAM_ID},size={}M,share=on",
                    spec.memory_mib
                ));
            }
            GuestMemory::Private => push(&machine),
        }
        push("-accel");
        push(spec.accel.as_str());
        if spec.accel == Accel::Kvm {
            push("-cpu");
            push("host");
        }
        push("-m");
        push(&spec.memory_mib.to_string());
        push("-smp");
        push(&spec.vcpus.to_string());
        for f in ["-nodefaults", "-no-user-config", "-no-reboot"] {
            push(f);
        }
        push("-display");
        push("none");
        push("-serial");
        push(&format!("file:{}", rd.join("console.log").display()));
        push("-qmp");
        push(&format!(
            "unix:{},server=on,wait=off",
            rd.join("qmp.sock").display()
        ));
        push("-pidfile");
        push(&rd.join("qemu.pid").display().to_string());
        if opts.start_paused {
            push("-S");
        }
        if let Some(c) = &opts.cpr_incoming {
            // cpr-transfer: the memory's descriptors arrive on `cpr`, the device state on
            // `main`; QEMU waits for `cpr` before it opens its QMP socket.
            for (channel, path) in [("main", &c.main), ("cpr", &c.cpr)] {
                push("-incoming");
                push(
                    &json!({ "channel-type": channel,
                             "addr": { "transport": "socket", "type": "unix",
                                       "path": path.to_string_lossy() } })
                    .to_string(),
                );
            }
        } else if opts.incoming_defer {
            push("-incoming");
            push("defer");
        }
        if spec.firmware == Firmware::Uefi {
            // The code read-only from the package; the variables the VM's own (`launch`
            // copies the template). Block nodes, not `-drive if=pflash`: a -drive is
            // auto-read-only, so QEMU reopens its file by path when the migration
            // inactivates it, which fails once QEMU runs as an unprivileged user (the
            // source's migration then fails at completion: bdrv_inactivate_all() -1).
            let code = ovmf().map_or_else(|| PathBuf::from(OVMF[0].0), |(c, _)| c);
            for s in [
                format!(
                    "driver=file,filename={},node-name={EFI_CODE_NODE}-file,read-only=on",
                    qemu_opt_value(&code)
                ),
                format!(
                    "driver=raw,file={EFI_CODE_NODE}-file,node-name={EFI_CODE_NODE},read-only=on"
                ),
                format!(
                    "driver=file,filename={},node-name={EFI_VARS_NODE}-file",
                    qemu_opt_value(&efi_vars_path(rd))
                ),
                format!("driver=raw,file={EFI_VARS_NODE}-file,node-name={EFI_VARS_NODE}"),
            ] {
                a.push("-blockdev".into());
                a.push(s.into());
            }
        }
        if let Some(k) = &spec.kernel {
            a.push("-kernel".into());
            a.push(k.clone().into());
        }
        if let Some(i) = &spec.initrd {
            a.push("-initrd".into());
            a.push(i.clone().into());
        }
        if !spec.append.is_empty() {
            a.push("-append".into());
            a.push(spec.append.clone().into());
        }
        for (i, d) in spec.disks.iter().enumerate() {
            let node = disk::node_name(i);
            let file = disk::file_node_name(i);
            // JSON syntax: any path is one value, commas included.
            let mut protocol = json!({ "driver": "file", "node-name": file,
                                       "filename": d.path.to_string_lossy() });
            if opts.disk_fds.get(i).is_some_and(Option::is_some) {
                // the caller opened it: QEMU takes the descriptor, not the path
                let set = i + 1;
                a.push("-add-fd".into());
                a.push(format!("fd={},set={set}", DISK_FD_BASE + i as RawFd).into());
                protocol["filename"] = json!(format!("/dev/fdset/{set}"));
            }
            if d.shared {
                // past this host's page cache: another host opens the same image at a
                // switchover and must read what this QEMU wrote (QEMU flushes at the
                // end of a migration; O_DIRECT keeps NFS clients' caches out of it)
                protocol["cache"] = json!({ "direct": true });
            }
            let format = json!({ "driver": d.format.as_str(), "node-name": node, "file": file });
            for s in [
                "-blockdev".to_string(),
                protocol.to_string(),
                "-blockdev".to_string(),
                format.to_string(),
                "-device".to_string(),
                format!(
                    "virtio-blk-pci,drive={node},id={}{}",
                    disk::device_id(i),
                    // no kernel: the firmware boots disk 0
                    if i == 0 && spec.kernel.is_none() {
                        ",bootindex=0"
                    } else {
                        ""
                    }
                ),
            ] {
                a.push(s.into());
            }
        }
        for (i, n) in spec.nics.iter().enumerate() {
            let mac = n.mac.map(|m| m.to_string()).unwrap_or_default();
            for s in [
                "-netdev".to_string(),
                format!("tap,id=net{i},fd={}", NIC_FD_BASE + i as RawFd),
                "-device".to_string(),
                // no option ROM: tern's VMs do not boot from the network
                format!("virtio-net-pci,netdev=net{i},id=nic{i},mac={mac},host_mtu={GUEST_MTU},romfile="),
            ] {
                a.push(s.into());
            }
        }
        if spec.tpm {
            let ctrl = qemu_opt_value(&opts.tpm_ctrl_socket());
            for s in [
                "-chardev",
                &format!("socket,id=chrtpm,path={ctrl}"),
                "-tpmdev",
                "emulator,id=tpm0,chardev=chrtpm",
                "-device",
                // ppi=off: QEMU 10.0's TPM Physical Presence Interface keeps its buffer
                // in uninitialised memory and, at machine reset, zeroes all guest RAM
                // when a stray bit there asks for it (hw/tpm/tpm_ppi.c, no cpr check).
                // A cpr-transfer target resets its machine while the old QEMU still
                // runs the guest on the same shared memory: that wiped a running guest
                // in a move test. tern's guests do not use PPI.
                "tpm-tis,tpmdev=tpm0,ppi=off",
            ] {
                a.push(s.into());
            }
        }
        a
    }

    pub async fn launch(spec: &VmSpec, opts: &LaunchOptions) -> Result<QemuProcess, LaunchError> {
        spec.validate()?;
        spec.check_files()?;
        if spec.accel == Accel::Kvm && !Path::new("/dev/kvm").exists() {
            return Err(LaunchError::NoKvm);
        }
        if spec.nics.len() != opts.nic_fds.len() {
            return Err(LaunchError::NicFds {
                cards: spec.nics.len(),
                taps: opts.nic_fds.len(),
            });
        }
        if let Some(i) = spec.nics.iter().position(|n| n.mac.is_none()) {
            return Err(LaunchError::NicWithoutMac(i));
        }
        let qmp_path = opts.run_dir.join("qmp.sock");
        if qmp_path.as_os_str().len() > 100 {
            return Err(LaunchError::PathTooLong {
                path: opts.run_dir.clone(),
            });
        }
        if spec.tpm {
            let ctrl = opts.tpm_ctrl_socket();
            if ctrl.as_os_str().len() > 100 {
                return Err(LaunchError::PathTooLong { path: ctrl });
            }
            // QEMU would fail too, but with a less helpful message.
            if !ctrl.exists() {
                return Err(LaunchError::NoSwtpm { path: ctrl });
            }
        }
        std::fs::create_dir_all(&opts.run_dir).map_err(|e| LaunchError::RunDir {
            path: opts.run_dir.clone(),
            source: e,
        })?;
        let _ = std::fs::remove_file(&qmp_path);
        if spec.firmware == Firmware::Uefi {
            let (_, template) = ovmf().ok_or(LaunchError::NoOvmf)?;
            let vars = efi_vars_path(&opts.run_dir);
            if !vars.exists() {
                std::fs::copy(&template, &vars).map_err(|source| LaunchError::EfiVars {
                    path: vars.clone(),
                    source,
                })?;
            }
        }
        let log_path = opts.run_dir.join("qemu.log");
        let log = std::fs::File::create(&log_path).map_err(|e| LaunchError::RunDir {
            path: log_path.clone(),
            source: e,
        })?;
        let log2 = log.try_clone().map_err(|e| LaunchError::RunDir {
            path: log_path.clone(),
            source: e,
        })?;
        // What a restarted agent needs to find this VM again (see tern-agent `reattach`).
        std::fs::write(opts.run_dir.join("spec.toml"), spec.to_toml()).map_err(|e| {
            LaunchError::RunDir {
                path: opts.run_dir.clone(),
                source: e,
            }
        })?;
        let version = if opts.run_as.is_some() {
            binary_version(&opts.qemu_binary).map_err(|e| LaunchError::Spawn {
                binary: opts.qemu_binary.clone(),
                source: e,
            })?
        } else {
            (10, 0)
        };
        let mut cmd = Command::new(&opts.qemu_binary);
        cmd.args(Self::command_line_for(spec, opts, version))
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log2)
            .kill_on_drop(opts.kill_on_drop);
        pass_fds(&mut cmd, &opts.nic_fds, &opts.disk_fds).map_err(|e| LaunchError::Spawn {
            binary: opts.qemu_binary.clone(),
            source: e,
        })?;
        let mut child = cmd.spawn().map_err(|e| LaunchError::Spawn {
            binary: opts.qemu_binary.clone(),
            source: e,
        })?;
        // Connect QMP, but give up at once if QEMU exits (bad kernel path, no KVM, ...).
        let connect = QmpClient::connect(&qmp_path, Duration::from_secs(30));
        tokio::pin!(connect);
        let qmp = tokio::select! {
            r = &mut connect => match r {
                Ok(q) => q,
                Err(e) => {
                    // QEMU may have created its socket and then died (bad kernel, ...):
                    // its own message is what the operator needs.
                    if let Ok(Ok(status)) = tokio::time::timeout(Duration::from_secs(3), child.wait()).await {
                        return Err(LaunchError::Exited { status, stderr_tail: log_tail(&log_path, 2000, "QEMU") });
                    }
                    // a QEMU that never answered is not left running (with its memory, its
                    // taps), whoever would have owned it
                    let _ = child.start_kill();
                    let _ = child.wait().await;
                    return Err(LaunchError::Qmp(e));
                }
            },
            st = child.wait() => {
                let status = st.map_err(|e| LaunchError::Spawn { binary: opts.qemu_binary.clone(), source: e })?;
                return Err(LaunchError::Exited { status, stderr_tail: log_tail(&log_path, 2000, "QEMU") });
            }
        };
        let mut p = QemuProcess {
            qmp,
            run_dir: opts.run_dir.clone(),
            console_log: opts.run_dir.join("console.log"),
            child,
            exited: None,
        };
        // (a cpr-transfer target takes no migration settings: it is mid-migration)
        if !spec.migration_capabilities.is_empty() && opts.cpr_incoming.is_none() {
            let caps: Vec<(&str, bool)> = spec
                .migration_capabilities
                .iter()
                .map(|c| (c.as_str(), true))
                .collect();
            if let Err(e) = p.qmp.set_migrate_capabilities(&caps).await {
                p.kill().await;
                return Err(LaunchError::Qmp(e));
            }
        }
        Ok(p)
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.id()
    }

    /// Non-blocking: `Some` once QEMU has exited.
    pub fn try_exited(&mut self) -> Option<ExitStatus> {
        if self.exited.is_none() {
            self.exited = self.child.try_wait().ok().flatten();
        }
        self.exited
    }

    pub async fn wait(&mut self) -> std::io::Result<ExitStatus> {
        if let Some(s) = self.exited {
            return Ok(s);
        }
        let s = self.child.wait().await?;
        self.exited = Some(s);
        Ok(s)
    }

    /// QMP `quit`; SIGKILL if QEMU is still there after `timeout`.
    pub async fn quit(&mut self, timeout: Duration) {
        if self.try_exited().is_some() {
            return;
        }
        let _ = tokio::time::timeout(timeout, self.qmp.execute("quit", None)).await;
        if tokio::time::timeout(timeout, self.wait()).await.is_err() {
            self.kill().await;
        }
    }

    /// SIGKILL and reap.
    pub async fn kill(&mut self) {
        if self.try_exited().is_some() {
            return;
        }
        let _ = self.child.start_kill();
        let _ = self.wait().await;
    }

    pub fn console_text(&self) -> String {
        String::from_utf8_lossy(&std::fs::read(&self.console_log).unwrap_or_default()).into_owned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::spec::{DiskFormat, DiskSpec};

    fn spec(accel: Accel) -> VmSpec {
        VmSpec {
            name: "t1".into(),
            memory_mib: 256,
            vcpus: 2,
            accel,
            kernel: Some("/k".into()),
            initrd: Some("/i".into()),
            append: "console=ttyS0 a=b".into(),
            machine: "pc".into(),
            migration_capabilities: vec![],
            tpm: false,
            disks: vec![],
            nics: vec![],
            memory: Default::default(),
            libvirt: None,
            firmware: Default::default(),
        }
    }

    fn args(v: Vec<OsString>) -> Vec<String> {
        v.into_iter().map(|s| s.into_string().unwrap()).collect()
    }

    fn after<'a>(a: &'a [String], flag: &str) -> Option<&'a str> {
        a.iter()
            .position(|x| x == flag)
            .and_then(|i| a.get(i + 1))
            .map(String::as_str)
    }

    #[test]
    fn shared_memory_is_a_memfd_and_a_cpr_target_listens_on_two_channels() {
        let mut o = LaunchOptions::new(PathBuf::from("/run/x"));
        o.start_paused = true;
        o.cpr_incoming = Some(CprIncoming {
            main: "/h/main.sock".into(),
            cpr: "/h/cpr.sock".into(),
        });
        let mut shared = spec(Accel::Tcg);
        shared.memory = crate::spec::GuestMemory::Shared;
        let a: Vec<String> = QemuProcess::command_line(&shared, &o)
            .into_iter()
            .map(|s| s.into_string().unwrap())
            .collect();
        assert_eq!(
            after(&a, "-machine"),
            Some("pc,memory-backend=tern-ram,aux-ram-share=on")
        );
        assert!(a
            .iter()
            .any(|s| s.starts_with("memory-backend-memfd,id=tern-ram,size=")
                && s.ends_with(",share=on")));
        let incoming: Vec<serde_json::Value> = a
            .windows(2)
            .filter(|w| w[0] == "-incoming")
            .map(|w| serde_json::from_str(&w[1]).unwrap())
            .collect();
        assert_eq!(incoming.len(), 2, "{a:?}");
        assert_eq!(incoming[0]["channel-type"], "main");
        assert_eq!(incoming[0]["addr"]["path"], "/h/main.sock");
        assert_eq!(incoming[1]["channel-type"], "cpr");
        assert_eq!(incoming[1]["addr"]["path"], "/h/cpr.sock");
        assert!(!a.contains(&"defer".to_string()));

        let a: Vec<String> =
            QemuProcess::command_line(&spec(Accel::Tcg), &LaunchOptions::new("/r".into()))
                .into_iter()
                .map(|s| s.into_string().unwrap())
                .collect();
        assert_eq!(after(&a, "-machine"), Some("pc"));
        assert!(!a.iter().any(|s| s.contains("memory-backend")));
    }

    #[test]
    fn unprivileged_sandboxed_command_line_names_the_user_as_the_version_wants() {
        let mut o = LaunchOptions::new("/run/x".into());
        o.run_as = Some("tern-qemu".into());
        o.sandbox = true;
        let new = args(QemuProcess::command_line_for(
            &spec(Accel::Tcg),
            &o,
            (10, 0),
        ));
        assert_eq!(after(&new, "-run-with"), Some("user=tern-qemu"));
        assert_eq!(after(&new, "-sandbox"), Some(SANDBOX));
        let old = args(QemuProcess::command_line_for(&spec(Accel::Tcg), &o, (7, 2)));
        assert_eq!(after(&old, "-runas"), Some("tern-qemu"));
        assert!(!old.contains(&"-run-with".to_string()));
        let plain = args(QemuProcess::command_line(
            &spec(Accel::Tcg),
            &LaunchOptions::new("/run/x".into()),
        ));
        assert!(
            !plain.contains(&"-sandbox".to_string()) && !plain.contains(&"-run-with".to_string())
        );
        assert_eq!(
            parse_version_line("QEMU emulator version 10.0.2 (Debian 1:10.0.2+ds-2)\nCopyright"),
            Some((10, 0))
        );
        assert_eq!(
            parse_version_line("QEMU emulator version 7.2.15"),
            Some((7, 2))
        );
    }

    #[test]
    fn machine_help_lists_names() {
        let text = "Supported machines are:\nmicrovm              microvm (i386)\npc                   Standard PC (i440FX + PIIX, 1996) (alias of pc-i440fx-10.0)\npc-i440fx-10.0       Standard PC (i440FX + PIIX, 1996) (default)\nq35                  Standard PC (Q35 + ICH9, 2009)\n";
        assert_eq!(
            parse_machine_help(text),
            vec!["microvm", "pc", "pc-i440fx-10.0", "q35"]
        );
    }

    #[test]
    fn tcg_command_line() {
        let mut o = LaunchOptions::new("/run/x".into());
        o.incoming_defer = true;
        o.start_paused = true;
        let a = args(QemuProcess::command_line(&spec(Accel::Tcg), &o));
        assert_eq!(after(&a, "-accel"), Some("tcg"));
        assert!(!a.contains(&"-cpu".to_string()));
        assert_eq!(after(&a, "-m"), Some("256"));
        assert_eq!(after(&a, "-smp"), Some("2"));
        assert_eq!(after(&a, "-incoming"), Some("defer"));
        assert!(a.contains(&"-S".to_string()));
        assert_eq!(
            after(&a, "-qmp"),
            Some("unix:/run/x/qmp.sock,server=on,wait=off")
        );
        assert_eq!(after(&a, "-serial"), Some("file:/run/x/console.log"));
        assert_eq!(after(&a, "-pidfile"), Some("/run/x/qemu.pid"));
        assert_eq!(after(&a, "-append"), Some("console=ttyS0 a=b"));
    }

    #[test]
    fn kvm_command_line() {
        let o = LaunchOptions::new("/run/x".into());
        let a = args(QemuProcess::command_line(&spec(Accel::Kvm), &o));
        assert_eq!(after(&a, "-accel"), Some("kvm"));
        assert_eq!(after(&a, "-cpu"), Some("host"));
        assert!(!a.contains(&"-S".to_string()) && !a.contains(&"-incoming".to_string()));
        assert!(
            !a.contains(&"-tpmdev".to_string()),
            "no TPM unless the spec asks"
        );
    }

    #[test]
    fn tpm_command_line() {
        let mut s = spec(Accel::Tcg);
        s.tpm = true;
        let mut o = LaunchOptions::new("/run/x".into());
        let a = args(QemuProcess::command_line(&s, &o));
        assert_eq!(
            after(&a, "-chardev"),
            Some("socket,id=chrtpm,path=/run/x/swtpm.sock")
        );
        assert_eq!(
            after(&a, "-tpmdev"),
            Some("emulator,id=tpm0,chardev=chrtpm")
        );
        assert_eq!(after(&a, "-device"), Some("tpm-tis,tpmdev=tpm0,ppi=off"));
        o.tpm_ctrl_socket = Some("/other/a,b.sock".into());
        let a = args(QemuProcess::command_line(&s, &o));
        assert_eq!(
            after(&a, "-chardev"),
            Some("socket,id=chrtpm,path=/other/a,,b.sock")
        );
    }

    /// The value after each `flag` in a command line.
    fn values_of<'a>(a: &'a [String], flag: &str) -> Vec<&'a String> {
        a.iter()
            .enumerate()
            .filter(|(_, x)| *x == flag)
            .map(|(i, _)| &a[i + 1])
            .collect()
    }

    #[test]
    fn a_uefi_vm_gets_ovmf_read_only_and_its_own_variable_store() {
        let mut s = spec(Accel::Tcg);
        let bios = args(QemuProcess::command_line(
            &s,
            &LaunchOptions::new("/run/x".into()),
        ));
        assert!(!bios.iter().any(|x| x.contains("pflash")), "{bios:?}");
        s.firmware = Firmware::Uefi;
        let a = args(QemuProcess::command_line(
            &s,
            &LaunchOptions::new("/run/x,y".into()),
        ));
        assert!(
            values_of(&a, "-drive").is_empty(),
            "no auto-read-only drive: {a:?}"
        );
        let nodes = values_of(&a, "-blockdev");
        assert_eq!(nodes.len(), 4, "{a:?}");
        assert!(
            nodes[0].starts_with("driver=file,filename=/usr/share/OVMF/OVMF_CODE")
                && nodes[0].ends_with("read-only=on"),
            "{nodes:?}"
        );
        assert_eq!(
            nodes[2],
            "driver=file,filename=/run/x,,y/efivars.fd,node-name=efi-vars-file"
        );
        assert_eq!(
            after(&a, "-machine"),
            Some("pc,pflash0=efi-code,pflash1=efi-vars")
        );
    }

    #[test]
    fn each_card_is_virtio_net_on_the_tap_passed_at_its_descriptor() {
        use crate::spec::{Mac, NicSpec};
        let mut s = spec(Accel::Tcg);
        assert!(!args(QemuProcess::command_line(
            &s,
            &LaunchOptions::new("/r".into())
        ))
        .iter()
        .any(|x| x.contains("netdev")));
        s.nics = vec![
            NicSpec {
                network: "blue".into(),
                mac: Some(Mac([0x52, 0x54, 0, 1, 2, 3])),
                ip: None,
            },
            NicSpec {
                network: "red".into(),
                mac: Some(Mac([0x52, 0x54, 0, 0xa, 0xb, 0xc])),
                ip: None,
            },
        ];
        let a = args(QemuProcess::command_line(
            &s,
            &LaunchOptions::new("/r".into()),
        ));
        assert_eq!(
            values_of(&a, "-netdev"),
            ["tap,id=net0,fd=100", "tap,id=net1,fd=101"]
        );
        let devices = values_of(&a, "-device");
        assert!(devices.contains(
            &&"virtio-net-pci,netdev=net1,id=nic1,mac=52:54:00:0a:0b:0c,host_mtu=1450,romfile="
                .to_string()
        ));
    }

    #[tokio::test]
    async fn a_vm_whose_cards_have_no_taps_is_refused_before_qemu_starts() {
        let mut s = spec(Accel::Tcg);
        s.kernel = Some("/".into()); // exists
        s.initrd = None;
        s.nics = vec![crate::spec::NicSpec {
            network: "blue".into(),
            mac: None,
            ip: None,
        }];
        let dir = std::env::temp_dir().join(format!("tern-nic-{}", std::process::id()));
        let e = QemuProcess::launch(&s, &LaunchOptions::new(dir.clone()))
            .await
            .err()
            .unwrap();
        assert!(
            matches!(e, LaunchError::NicFds { cards: 1, taps: 0 }),
            "{e}"
        );
        assert!(!dir.exists());
    }

    #[test]
    fn disk_command_line() {
        let mut s = spec(Accel::Tcg);
        s.disks = vec![
            DiskSpec {
                path: "/d/web,1.qcow2".into(),
                format: DiskFormat::Qcow2,
                shared: false,
                sample: None,
            },
            DiskSpec {
                path: "/d/data \"x\".img".into(),
                format: DiskFormat::Raw,
                shared: false,
                sample: None,
            },
        ];
        let a = args(QemuProcess::command_line(
            &s,
            &LaunchOptions::new("/run/x".into()),
        ));
        let blockdevs: Vec<serde_json::Value> = a
            .iter()
            .enumerate()
            .filter(|(_, x)| *x == "-blockdev")
            .map(|(i, _)| serde_json::from_str(&a[i + 1]).unwrap())
            .collect();
        assert_eq!(
            blockdevs,
            vec![
                json!({"driver": "file", "node-name": "disk0-file", "filename": "/d/web,1.qcow2"}),
                json!({"driver": "qcow2", "node-name": "disk0", "file": "disk0-file"}),
                json!({"driver": "file", "node-name": "disk1-file", "filename": "/d/data \"x\".img"}),
                json!({"driver": "raw", "node-name": "disk1", "file": "disk1-file"}),
            ]
        );
        let devices = values_of(&a, "-device");
        assert_eq!(
            devices,
            vec![
                "virtio-blk-pci,drive=disk0,id=virtio-disk0",
                "virtio-blk-pci,drive=disk1,id=virtio-disk1"
            ]
        );
        let none = args(QemuProcess::command_line(
            &spec(Accel::Tcg),
            &LaunchOptions::new("/run/x".into()),
        ));
        assert!(!none.contains(&"-blockdev".to_string()));

        // without a kernel the firmware boots disk 0, and nothing else is booted
        s.kernel = None;
        s.initrd = None;
        s.append.clear();
        let a = args(QemuProcess::command_line(
            &s,
            &LaunchOptions::new("/run/x".into()),
        ));
        for flag in ["-kernel", "-initrd", "-append"] {
            assert!(!a.contains(&flag.to_string()), "{flag} in {a:?}");
        }
        let devices = values_of(&a, "-device");
        assert_eq!(
            devices,
            vec![
                "virtio-blk-pci,drive=disk0,id=virtio-disk0,bootindex=0",
                "virtio-blk-pci,drive=disk1,id=virtio-disk1"
            ]
        );
    }

    #[tokio::test]
    async fn tpm_vm_without_swtpm_is_refused_before_qemu_starts() {
        let d = tempfile::tempdir().unwrap();
        let k = d.path().join("k");
        std::fs::write(&k, b"kernel").unwrap();
        let mut s = spec(Accel::Tcg);
        s.kernel = Some(k);
        s.initrd = None;
        s.tpm = true;
        let mut o = LaunchOptions::new(d.path().join("run"));
        o.qemu_binary = "/nonexistent/qemu".into();
        match QemuProcess::launch(&s, &o).await {
            Err(LaunchError::NoSwtpm { path }) => {
                assert_eq!(path, d.path().join("run/swtpm.sock"))
            }
            Err(e) => panic!("expected NoSwtpm, got {e:?}"),
            Ok(_) => panic!("launched without a swtpm"),
        }
    }
}

//! A VM's software TPM 2.0: starting and stopping `swtpm` for one VM, its key file, and
//! removing its state after the VM left this host. Owns the swtpm process lifetime and the
//! layout of its files; must not decide when a VM starts, migrates or stops (the agent does).
//!
//! ## How the pieces fit (verified with swtpm 0.7.1 and QEMU 10.0.2)
//!
//! ```text
//!  swtpm socket --tpm2 --ctrl type=unixio,path=RUN/swtpm.sock,mode=0600 --terminate
//!               --tpmstate dir=RUN/tpm,mode=0600 --key file=KEY,mode=aes-256-cbc,format=binary
//!               [--migration-key file=MKEY,mode=aes-256-cbc,format=binary] --pid file=RUN/swtpm.pid
//!    ^ control channel (QEMU passes the data channel over it)
//!  qemu -chardev socket,id=chrtpm,path=RUN/swtpm.sock -tpmdev emulator,id=tpm0,chardev=chrtpm
//!       -device tpm-tis,tpmdev=tpm0                                   (see crate::launch)
//! ```
//!
//! - **Start swtpm first.** QEMU connects to the control socket once, at start-up, and
//!   refuses to start if nothing listens there. [`Swtpm::start`] returns once the socket
//!   accepts connections (a probe connection, which swtpm shrugs off), or fails with what
//!   swtpm printed if it exits first. swtpm 0.7.1 exits silently (status 1, no message) on
//!   a key file of the wrong size, so the key is checked here first ([`check_key_file`]).
//! - **No manufacturing step, no start-up flags.** An empty state directory gives a fresh
//!   TPM (libtpms creates its seeds on the first init); `swtpm_setup` would only add EK
//!   certificates, which nothing here needs. No `--flags`: QEMU sends `INIT` over the
//!   control channel at machine reset and the firmware (SeaBIOS) sends `TPM2_Startup` and
//!   measures the boot into PCRs 0-7. `startup-clear` implies `not-need-init` and would
//!   only start a TPM that QEMU then re-initialises.
//! - **Encrypted at rest.** `--key` encrypts the state files (`tpm2-00.permall`, and the
//!   volatile state when swtpm writes one) with AES-256-CBC plus an HMAC; the key is a
//!   32-byte binary file, mode 0600 ([`ensure_key_file`]). Without it the permanent state
//!   file holds libtpms' blob magic `ab 36 47 23` in the clear; with it, it does not.
//! - **Migration: the TPM state travels inside QEMU's migration stream.** QEMU's
//!   tpm-emulator backend fetches the permanent, volatile and save-state blobs from the
//!   source swtpm (`GET_STATEBLOB`, decrypted from the at-rest key) when it saves device
//!   state, and on the destination pushes them into swtpm (`SET_STATEBLOB`) and re-inits it
//!   (`INIT` with "delete volatile") when it loads. So the destination starts its own swtpm
//!   exactly like a new one, with an **empty** state directory and its **own** at-rest key:
//!   swtpm 0.7.1 has no `--migration` option (that arrived in 0.8, for shared storage) and
//!   needs no `not-need-init` here. The destination's swtpm writes the received state
//!   encrypted with its own key.
//! - **In the stream the blobs are plaintext unless a migration key is set.** Without
//!   `--migration-key` the libtpms state (seeds included) is in the clear inside QEMU's
//!   stream; tern's link encryption must cover it. With the same `--migration-key` on both
//!   swtpms the blobs are encrypted end to end. A destination with a different migration
//!   key fails to load ("Setting the stateblob (type 1) failed with a TPM error 0x21
//!   decryption error"), the incoming migration fails, and the source must resume. A
//!   destination with a migration key accepts plaintext blobs from a source without one.
//! - **Lifetimes.** `--terminate` makes swtpm exit when QEMU's connection to it closes
//!   (QEMU quit, died, or failed to load an incoming migration), so a VM's swtpm does not
//!   outlive its QEMU, also when the agent that started both is gone. A swtpm whose QEMU
//!   never started waits forever: stop it ([`Swtpm::stop`] with zero grace). After a successful switchover the source quits its QEMU, waits
//!   for its swtpm ([`Swtpm::stop`], or [`remove_state`]'s wait after a re-attach) and
//!   removes the state with [`remove_state`]; it refuses while a swtpm still holds the
//!   state's lock (swtpm holds a POSIX lock on `STATE/.lock`, visible in /proc/locks).

use std::ffi::OsString;
use std::io::{Read, Write};
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::time::{Duration, Instant};

use tokio::process::{Child, Command};

/// Size of an AES-256 key file, in bytes (binary format).
pub const KEY_LEN: usize = 32;

/// Longest control-socket path accepted (sun_path holds 108 bytes; same margin as QMP's).
const MAX_SOCKET_PATH: usize = 100;

/// The control socket of the swtpm of the VM whose run directory is `run_dir`; the
/// launcher connects QEMU there unless told otherwise.
pub fn ctrl_socket_path(run_dir: &Path) -> PathBuf {
    run_dir.join("swtpm.sock")
}

/// `swtpm` unless `TERN_SWTPM` names another binary.
pub fn default_binary() -> PathBuf {
    std::env::var_os("TERN_SWTPM")
        .filter(|s| !s.is_empty())
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("swtpm"))
}

/// How to run the swtpm of one VM.
#[derive(Debug, Clone)]
pub struct SwtpmConfig {
    /// [`default_binary`] unless set.
    pub binary: PathBuf,
    /// The TPM's state, encrypted at rest. Created (mode 0700) if missing; empty for a new
    /// TPM and for the destination of a migration.
    pub state_dir: PathBuf,
    /// The control socket QEMU connects to (`-chardev socket,path=...`).
    pub ctrl_socket: PathBuf,
    /// 32-byte AES-256 key (binary) for the state files; mode 0600.
    pub key_file: PathBuf,
    /// 32-byte AES-256 key (binary) for the state blobs QEMU carries in its migration
    /// stream; the same file on source and destination. None: the blobs are plaintext in
    /// the stream.
    pub migration_key_file: Option<PathBuf>,
    /// swtpm's stdout and stderr (its error messages).
    pub log_file: PathBuf,
    pub pid_file: PathBuf,
    /// How long [`Swtpm::start`] waits for the control socket.
    pub start_timeout: Duration,
    /// Kill swtpm when the [`Swtpm`] is dropped (tests, tools). An agent sets this to
    /// false, like for QEMU: swtpm exits by itself when its QEMU goes (`--terminate`).
    pub kill_on_drop: bool,
}

impl SwtpmConfig {
    /// The layout for a VM's run directory: state in `RUN/tpm`, control socket
    /// [`ctrl_socket_path`], `RUN/swtpm.log`, `RUN/swtpm.pid`.
    pub fn for_run_dir(run_dir: &Path, key_file: PathBuf) -> SwtpmConfig {
        SwtpmConfig {
            binary: default_binary(),
            state_dir: run_dir.join("tpm"),
            ctrl_socket: ctrl_socket_path(run_dir),
            key_file,
            migration_key_file: None,
            log_file: run_dir.join("swtpm.log"),
            pid_file: run_dir.join("swtpm.pid"),
            start_timeout: Duration::from_secs(10),
            kill_on_drop: true,
        }
    }
}

/// Why a key file cannot be used or made.
#[derive(Debug, thiserror::Error)]
pub enum SwtpmKeyError {
    #[error("cannot read TPM key file {path}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "TPM key file {path} holds {len} bytes; it must hold exactly 32 (a binary AES-256 key)"
    )]
    BadLength { path: PathBuf, len: u64 },
    #[error("TPM key file {path} has mode {mode:04o}: others may read it; chmod 600 it")]
    TooOpen { path: PathBuf, mode: u32 },
    #[error("cannot create TPM key file {path}")]
    Create {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// Why swtpm did not start.
#[derive(Debug, thiserror::Error)]
pub enum SwtpmStartError {
    #[error("TPM key unusable")]
    Key(#[from] SwtpmKeyError),
    #[error("TPM state {dir} is in use by another swtpm (pid {pid})")]
    InUse { dir: PathBuf, pid: u32 },
    #[error("swtpm control socket path {path} is too long for a unix socket (max 100 bytes)")]
    PathTooLong { path: PathBuf },
    #[error("cannot prepare {path} for swtpm")]
    Files {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot start {binary} (is swtpm installed? run scripts/setup.sh)")]
    Spawn {
        binary: PathBuf,
        source: std::io::Error,
    },
    #[error("swtpm exited during start-up ({status}): {log_tail}")]
    Exited {
        status: ExitStatus,
        log_tail: String,
    },
    #[error(
        "swtpm's control socket {path} did not accept connections within {waited:?}: {log_tail}"
    )]
    Timeout {
        path: PathBuf,
        waited: Duration,
        log_tail: String,
    },
}

/// Why stopping swtpm failed.
#[derive(Debug, thiserror::Error)]
pub enum SwtpmStopError {
    #[error("cannot reap swtpm (pid {pid:?})")]
    Wait {
        pid: Option<u32>,
        source: std::io::Error,
    },
}

/// Why a TPM state directory was not removed.
#[derive(Debug, thiserror::Error)]
pub enum RemoveStateError {
    #[error(
        "TPM state {dir} is still in use by swtpm (pid {pid}) after {waited:?}: stop it first"
    )]
    StillRunning {
        dir: PathBuf,
        pid: u32,
        waited: Duration,
    },
    #[error("cannot remove TPM state {dir}")]
    Remove {
        dir: PathBuf,
        source: std::io::Error,
    },
}

/// Checks that `path` holds a 32-byte key that only its owner can read.
pub fn check_key_file(path: &Path) -> Result<(), SwtpmKeyError> {
    let md = std::fs::metadata(path).map_err(|e| SwtpmKeyError::Read {
        path: path.to_path_buf(),
        source: e,
    })?;
    if md.len() != KEY_LEN as u64 {
        return Err(SwtpmKeyError::BadLength {
            path: path.to_path_buf(),
            len: md.len(),
        });
    }
    let mode = md.permissions().mode() & 0o7777;
    if mode & 0o077 != 0 {
        return Err(SwtpmKeyError::TooOpen {
            path: path.to_path_buf(),
            mode,
        });
    }
    Ok(())
}

/// Creates a random 32-byte key file (mode 0600) if `path` does not exist, then checks it
/// with [`check_key_file`]. An existing key is never replaced: the state it encrypts would
/// be lost.
pub fn ensure_key_file(path: &Path) -> Result<(), SwtpmKeyError> {
    let create_err = |e| SwtpmKeyError::Create {
        path: path.to_path_buf(),
        source: e,
    };
    match std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
    {
        Ok(mut f) => {
            let mut key = [0u8; KEY_LEN];
            std::fs::File::open("/dev/urandom")
                .and_then(|mut r| r.read_exact(&mut key))
                .and_then(|()| f.write_all(&key))
                .and_then(|()| f.sync_all())
                .map_err(|e| {
                    let _ = std::fs::remove_file(path);
                    create_err(e)
                })?;
        }
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
        Err(e) => return Err(create_err(e)),
    }
    check_key_file(path)
}

/// A running swtpm serving one VM.
pub struct Swtpm {
    config: SwtpmConfig,
    child: Child,
    exited: Option<ExitStatus>,
}

impl std::fmt::Debug for Swtpm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Swtpm")
            .field("pid", &self.child.id())
            .field("ctrl_socket", &self.config.ctrl_socket)
            .field("state_dir", &self.config.state_dir)
            .finish()
    }
}

fn key_arg(path: &Path) -> OsString {
    let mut s = OsString::from("file=");
    s.push(path);
    s.push(",mode=aes-256-cbc,format=binary");
    s
}

impl Swtpm {
    /// The swtpm command line for `config` (without the binary).
    pub fn command_line(config: &SwtpmConfig) -> Vec<OsString> {
        let mut a: Vec<OsString> = vec!["socket".into(), "--tpm2".into()];
        let mut opt = |flag: &str, parts: &[&std::ffi::OsStr]| {
            a.push(flag.into());
            a.push(parts.iter().fold(OsString::new(), |mut s, p| {
                s.push(p);
                s
            }));
        };
        opt(
            "--tpmstate",
            &[
                "dir=".as_ref(),
                config.state_dir.as_os_str(),
                ",mode=0600".as_ref(),
            ],
        );
        opt(
            "--ctrl",
            &[
                "type=unixio,path=".as_ref(),
                config.ctrl_socket.as_os_str(),
                ",mode=0600".as_ref(),
            ],
        );
        opt("--key", &[key_arg(&config.key_file).as_os_str()]);
        if let Some(m) = &config.migration_key_file {
            opt("--migration-key", &[key_arg(m).as_os_str()]);
        }
        opt("--pid", &["file=".as_ref(), config.pid_file.as_os_str()]);
        a.push("--terminate".into());
        a
    }

    /// Starts swtpm and waits until its control socket accepts connections. For a new TPM
    /// and for the destination of a migration alike (see the module doc).
    pub async fn start(config: &SwtpmConfig) -> Result<Swtpm, SwtpmStartError> {
        check_key_file(&config.key_file)?;
        if let Some(m) = &config.migration_key_file {
            check_key_file(m)?;
        }
        if config.ctrl_socket.as_os_str().len() > MAX_SOCKET_PATH {
            return Err(SwtpmStartError::PathTooLong {
                path: config.ctrl_socket.clone(),
            });
        }
        let files_err = |path: &Path| {
            let path = path.to_path_buf();
            move |e| SwtpmStartError::Files { path, source: e }
        };
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&config.state_dir)
            .map_err(files_err(&config.state_dir))?;
        if let Some(pid) = state_lock_holder(&config.state_dir) {
            return Err(SwtpmStartError::InUse {
                dir: config.state_dir.clone(),
                pid,
            });
        }
        for p in [&config.ctrl_socket, &config.pid_file] {
            match std::fs::remove_file(p) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(files_err(p)(e)),
                _ => {}
            }
        }
        let log = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&config.log_file)
            .map_err(files_err(&config.log_file))?;
        let log2 = log.try_clone().map_err(files_err(&config.log_file))?;
        let mut child = Command::new(&config.binary)
            .args(Self::command_line(config))
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log2)
            .kill_on_drop(config.kill_on_drop)
            .spawn()
            .map_err(|e| SwtpmStartError::Spawn {
                binary: config.binary.clone(),
                source: e,
            })?;
        let t0 = Instant::now();
        loop {
            if let Some(status) = child.try_wait().ok().flatten() {
                return Err(SwtpmStartError::Exited {
                    status,
                    log_tail: crate::launch::log_tail(&config.log_file, 2000, "swtpm"),
                });
            }
            // A connection proves swtpm listens (the file alone appears at bind(), before
            // listen()). swtpm serves one control client at a time and forgets this one.
            if tokio::net::UnixStream::connect(&config.ctrl_socket)
                .await
                .is_ok()
            {
                return Ok(Swtpm {
                    config: config.clone(),
                    child,
                    exited: None,
                });
            }
            if t0.elapsed() >= config.start_timeout {
                let _ = child.start_kill();
                let _ = child.wait().await;
                return Err(SwtpmStartError::Timeout {
                    path: config.ctrl_socket.clone(),
                    waited: config.start_timeout,
                    log_tail: crate::launch::log_tail(&config.log_file, 2000, "swtpm"),
                });
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    pub fn config(&self) -> &SwtpmConfig {
        &self.config
    }

    pub fn ctrl_socket(&self) -> &Path {
        &self.config.ctrl_socket
    }

    pub fn state_dir(&self) -> &Path {
        &self.config.state_dir
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.id()
    }

    /// Non-blocking: `Some` once swtpm has exited.
    pub fn try_exited(&mut self) -> Option<ExitStatus> {
        if self.exited.is_none() {
            self.exited = self.child.try_wait().ok().flatten();
        }
        self.exited
    }

    /// What swtpm printed (the end of its log), for error reports.
    pub fn log_tail(&self) -> String {
        crate::launch::log_tail(&self.config.log_file, 2000, "swtpm")
    }

    /// Waits up to `grace` for swtpm to exit by itself (it does when its QEMU has gone),
    /// then kills it; reaps it either way. With `grace` zero: kill at once (QEMU never
    /// started). swtpm writes its permanent state as it changes, so a kill loses nothing
    /// that a TPM would keep across a power cut.
    pub async fn stop(&mut self, grace: Duration) -> Result<ExitStatus, SwtpmStopError> {
        if let Some(s) = self.try_exited() {
            return Ok(s);
        }
        let pid = self.child.id();
        let wait_err = |e| SwtpmStopError::Wait { pid, source: e };
        if !grace.is_zero() {
            if let Ok(r) = tokio::time::timeout(grace, self.child.wait()).await {
                let s = r.map_err(wait_err)?;
                self.exited = Some(s);
                return Ok(s);
            }
        }
        let _ = self.child.start_kill();
        let s = self.child.wait().await.map_err(wait_err)?;
        self.exited = Some(s);
        Ok(s)
    }
}

/// The pid of the process holding swtpm's lock on the state in `dir`, if any (swtpm holds
/// a POSIX lock on `dir/.lock` while it runs; read from /proc/locks).
pub fn state_lock_holder(dir: &Path) -> Option<u32> {
    let md = std::fs::metadata(dir.join(".lock")).ok()?;
    let locks = std::fs::read_to_string("/proc/locks").ok()?;
    lock_holder_in(&locks, md.dev(), md.ino())
}

/// Parses /proc/locks lines such as
/// `1: POSIX  ADVISORY  WRITE 22739 fe:00:10019178 0 EOF` (device major:minor in hex).
fn lock_holder_in(locks: &str, dev: u64, ino: u64) -> Option<u32> {
    let major = ((dev >> 8) & 0xfff) | ((dev >> 32) & !0xfff);
    let minor = (dev & 0xff) | ((dev >> 12) & !0xff);
    locks.lines().find_map(|l| {
        let f: Vec<&str> = l.split_whitespace().collect();
        // "->" marks a waiter, shifting the fields by one.
        let f = if f.get(1) == Some(&"->") {
            &f[1..]
        } else {
            &f[..]
        };
        if f.get(1) != Some(&"POSIX") {
            return None;
        }
        let pid: u32 = f.get(4)?.parse().ok()?;
        let mut id = f.get(5)?.split(':');
        let ma = u64::from_str_radix(id.next()?, 16).ok()?;
        let mi = u64::from_str_radix(id.next()?, 16).ok()?;
        let i: u64 = id.next()?.parse().ok()?;
        (ma == major && mi == minor && i == ino).then_some(pid)
    })
}

/// Removes a VM's TPM state directory, after a successful switchover moved the TPM
/// elsewhere (or when the VM is deleted). Waits up to `wait` for the swtpm using it to exit
/// (after its QEMU quit), and refuses while one still holds it. A missing directory is
/// fine.
pub async fn remove_state(dir: &Path, wait: Duration) -> Result<(), RemoveStateError> {
    let t0 = Instant::now();
    while let Some(pid) = state_lock_holder(dir) {
        if t0.elapsed() >= wait {
            return Err(RemoveStateError::StillRunning {
                dir: dir.to_path_buf(),
                pid,
                waited: wait,
            });
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    match std::fs::remove_dir_all(dir) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(RemoveStateError::Remove {
            dir: dir.to_path_buf(),
            source: e,
        }),
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(config: &SwtpmConfig) -> Vec<String> {
        Swtpm::command_line(config)
            .into_iter()
            .map(|s| s.into_string().unwrap())
            .collect()
    }

    fn after<'a>(a: &'a [String], flag: &str) -> Option<&'a str> {
        a.iter()
            .position(|x| x == flag)
            .and_then(|i| a.get(i + 1))
            .map(String::as_str)
    }

    #[test]
    fn command_line_encrypts_state_and_ends_with_qemu() {
        let mut c = SwtpmConfig::for_run_dir(Path::new("/run/x"), "/k/tpm.key".into());
        let a = args(&c);
        assert_eq!(&a[..2], ["socket", "--tpm2"]);
        assert_eq!(after(&a, "--tpmstate"), Some("dir=/run/x/tpm,mode=0600"));
        assert_eq!(
            after(&a, "--ctrl"),
            Some("type=unixio,path=/run/x/swtpm.sock,mode=0600")
        );
        assert_eq!(
            after(&a, "--key"),
            Some("file=/k/tpm.key,mode=aes-256-cbc,format=binary")
        );
        assert_eq!(after(&a, "--pid"), Some("file=/run/x/swtpm.pid"));
        assert!(a.contains(&"--terminate".to_string()));
        assert!(!a.contains(&"--flags".to_string()));
        assert!(!a.contains(&"--migration-key".to_string()));
        c.migration_key_file = Some("/k/m.key".into());
        assert_eq!(
            after(&args(&c), "--migration-key"),
            Some("file=/k/m.key,mode=aes-256-cbc,format=binary")
        );
    }

    #[test]
    fn key_files_are_made_once_and_checked() {
        let d = tempfile::tempdir().unwrap();
        let k = d.path().join("tpm.key");
        ensure_key_file(&k).unwrap();
        let first = std::fs::read(&k).unwrap();
        assert_eq!(first.len(), KEY_LEN);
        assert_eq!(
            std::fs::metadata(&k).unwrap().permissions().mode() & 0o777,
            0o600
        );
        ensure_key_file(&k).unwrap();
        assert_eq!(std::fs::read(&k).unwrap(), first, "an existing key is kept");

        std::fs::set_permissions(&k, std::fs::Permissions::from_mode(0o644)).unwrap();
        assert!(matches!(
            check_key_file(&k),
            Err(SwtpmKeyError::TooOpen { mode: 0o644, .. })
        ));
        let short = d.path().join("short.key");
        std::fs::write(&short, [1u8; 10]).unwrap();
        assert!(matches!(
            ensure_key_file(&short),
            Err(SwtpmKeyError::BadLength { len: 10, .. })
        ));
        assert!(matches!(
            check_key_file(&d.path().join("none")),
            Err(SwtpmKeyError::Read { .. })
        ));
    }

    #[test]
    fn lock_holders_are_found_by_device_and_inode() {
        let locks = "1: POSIX  ADVISORY  WRITE 22739 fe:00:10019178 0 EOF\n\
                     2: FLOCK  ADVISORY  WRITE 22457 fe:00:5431783 0 EOF\n\
                     3: -> POSIX  ADVISORY  WRITE 555 08:11:42 0 EOF\n";
        let dev_fe00 = 0xfe << 8;
        assert_eq!(lock_holder_in(locks, dev_fe00, 10019178), Some(22739));
        assert_eq!(lock_holder_in(locks, dev_fe00, 5431783), None, "flock");
        assert_eq!(lock_holder_in(locks, (0x08 << 8) | 0x11, 42), Some(555));
        assert_eq!(lock_holder_in(locks, 0x801, 10019178), None);
    }

    #[tokio::test]
    async fn removing_absent_or_unlocked_state_succeeds() {
        let d = tempfile::tempdir().unwrap();
        let s = d.path().join("tpm");
        remove_state(&s, Duration::ZERO).await.unwrap();
        std::fs::create_dir(&s).unwrap();
        std::fs::write(s.join(".lock"), b"").unwrap();
        std::fs::write(s.join("tpm2-00.permall"), b"x").unwrap();
        remove_state(&s, Duration::ZERO).await.unwrap();
        assert!(!s.exists());
    }
}

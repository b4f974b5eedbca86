//! Shared helpers for the tern-nbd integration tests: a test qcow2 image with known
//! content and a persistent dirty bitmap, and RAII guards for qemu-nbd / QEMU processes.
//! Tier: crate `tests/`, real qemu-img / qemu-io / qemu-nbd binaries, no guests.
#![allow(dead_code)]

use std::ops::Range;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use tern_nbd::{ConnectOptions, NbdClient};
use tokio::net::UnixStream;

pub const KIB: u64 = 1024;
pub const MIB: u64 = 1024 * 1024;
pub const IMAGE_SIZE: u64 = 8 * MIB;
pub const BITMAP: &str = "b0";
pub const EXPORT: &str = "disk";

/// How long a server gets to come up before the test fails.
pub const STARTUP_DEADLINE: Duration = Duration::from_secs(20);

pub fn run(cmd: &mut Command) -> Result<String> {
    let out = cmd.output().with_context(|| format!("running {cmd:?}"))?;
    if !out.status.success() {
        bail!(
            "{cmd:?} failed: {}\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

pub fn qemu_io(img: &Path, commands: &[&str]) -> Result<()> {
    let mut cmd = Command::new("qemu-io");
    cmd.args(["-f", "qcow2"]);
    for c in commands {
        cmd.args(["-c", c]);
    }
    cmd.arg(img);
    run(&mut cmd).map(drop)
}

/// What the test image holds and which ranges its bitmap marks dirty.
pub struct TestImage {
    pub path: PathBuf,
    pub expected: Vec<u8>,
    /// Written after the bitmap was added, rounded out to its 64 KiB granularity.
    pub dirty: Vec<Range<u64>>,
    /// Never written at all (qcow2 unallocated clusters).
    pub unwritten: Vec<Range<u64>>,
    /// Written with write-zeroes (reads as zero, dirty, not data).
    pub zeroed: Range<u64>,
}

/// An 8 MiB qcow2: 0xab over [0, 1 MiB) before the bitmap `b0` is added; then, with the
/// bitmap enabled, 0xcd over [2 MiB, 2 MiB + 64 KiB), 1000 bytes of 0xef at 3 MiB + 100
/// (unaligned: dirties one 64 KiB cluster) and write-zeroes over [5 MiB, 5 MiB + 128 KiB).
pub fn make_test_image(dir: &Path) -> Result<TestImage> {
    let path = dir.join("img.qcow2");
    run(Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2"])
        .arg(&path)
        .arg(IMAGE_SIZE.to_string()))?;
    qemu_io(&path, &["write -q -P 0xab 0 1M"])?;
    // Also pre-fill 5 MiB region with data, so that write-zeroes below changes content.
    qemu_io(&path, &["write -q -P 0x11 5M 128k"])?;
    run(Command::new("qemu-img")
        .args(["bitmap", "--add", "--enable", "-f", "qcow2"])
        .arg(&path)
        .arg(BITMAP))?;
    qemu_io(
        &path,
        &[
            "write -q -P 0xcd 2M 64k",
            "write -q -P 0xef 3145828 1000",
            "write -q -z 5M 128k",
        ],
    )?;

    let mut expected = vec![0u8; IMAGE_SIZE as usize];
    expected[..MIB as usize].fill(0xab);
    expected[2 * MIB as usize..(2 * MIB + 64 * KIB) as usize].fill(0xcd);
    expected[3 * MIB as usize + 100..3 * MIB as usize + 1100].fill(0xef);
    Ok(TestImage {
        path,
        expected,
        dirty: vec![
            2 * MIB..2 * MIB + 64 * KIB,
            3 * MIB..3 * MIB + 64 * KIB,
            5 * MIB..5 * MIB + 128 * KIB,
        ],
        unwritten: vec![
            MIB..2 * MIB,
            2 * MIB + 64 * KIB..3 * MIB,
            3 * MIB + 64 * KIB..5 * MIB,
            5 * MIB + 128 * KIB..IMAGE_SIZE,
        ],
        zeroed: 5 * MIB..5 * MIB + 128 * KIB,
    })
}

/// The image's guest-visible bytes, as qemu-img sees them.
pub fn raw_content(img: &Path, dir: &Path) -> Result<Vec<u8>> {
    let raw = dir.join(format!(
        "{}.raw",
        img.file_name().unwrap().to_string_lossy()
    ));
    run(Command::new("qemu-img")
        .args(["convert", "-f", "qcow2", "-O", "raw"])
        .arg(img)
        .arg(&raw))?;
    Ok(std::fs::read(&raw)?)
}

/// A child process killed (and reaped) on drop, so a failing test cannot leak it.
pub struct KillOnDrop {
    pub child: Child,
    pub what: &'static str,
    stderr_path: PathBuf,
}

impl KillOnDrop {
    pub fn spawn(what: &'static str, cmd: &mut Command, stderr_path: PathBuf) -> Result<Self> {
        let stderr = std::fs::File::create(&stderr_path)?;
        let child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(stderr)
            .spawn()
            .with_context(|| format!("spawning {cmd:?}"))?;
        Ok(Self {
            child,
            what,
            stderr_path,
        })
    }

    /// Fails if the process has exited (with its stderr), so waiting loops end early.
    pub fn check_alive(&mut self) -> Result<()> {
        if let Some(status) = self.child.try_wait()? {
            let err = std::fs::read_to_string(&self.stderr_path).unwrap_or_default();
            bail!("{} exited early ({status}): {err}", self.what);
        }
        Ok(())
    }
}

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// qemu-nbd serving `img` on a unix socket in `dir`, persistent (-t) so a test can connect
/// several times, up to 4 clients at once.
pub fn spawn_qemu_nbd(dir: &Path, img: &Path, extra: &[&str]) -> Result<(KillOnDrop, PathBuf)> {
    let sock = dir.join("nbd.sock");
    let mut cmd = Command::new("qemu-nbd");
    cmd.args(["-t", "-e", "4", "-f", "qcow2", "-x", EXPORT, "-k"])
        .arg(&sock)
        .args(extra)
        .arg(img);
    let guard = KillOnDrop::spawn("qemu-nbd", &mut cmd, dir.join("qemu-nbd.stderr"))?;
    Ok((guard, sock))
}

/// Polls until `sock` accepts a connection (deadline, no fixed sleep), then hands that
/// connection to the NBD handshake.
pub async fn connect_when_ready(
    server: &mut KillOnDrop,
    sock: &Path,
    opts: &ConnectOptions,
) -> Result<NbdClient<UnixStream>> {
    let stream = wait_for_unix_socket(server, sock).await?;
    Ok(NbdClient::handshake(stream, opts).await?)
}

pub async fn wait_for_unix_socket(server: &mut KillOnDrop, sock: &Path) -> Result<UnixStream> {
    let deadline = Instant::now() + STARTUP_DEADLINE;
    loop {
        server.check_alive()?;
        match UnixStream::connect(sock).await {
            Ok(s) => return Ok(s),
            Err(e) if Instant::now() > deadline => {
                bail!(
                    "{} did not listen on {} within {STARTUP_DEADLINE:?}: {e}",
                    server.what,
                    sock.display()
                )
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(10)).await,
        }
    }
}

//! vTPM across live migration, with real parts: the test guest with a TPM 2.0 (swtpm via
//! `tern_qemu::swtpm`, QEMU's tpm-emulator + tpm-tis), plain QEMU-to-QEMU migration over
//! unix sockets through a relay that scans the stream. Skips (says so) without swtpm.
//!
//! The guest (guest/init) extends PCR 16 at boot (`tern.tpm_extend`) and prints every
//! sha256 PCR each second with a sequence number (`tern.tpm_print`); a destination's
//! console log starts empty, so its first `TERN-PCR` line was read after the switchover.

mod common;
use common::guest;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use tern_qemu::launch::{LaunchOptions, QemuProcess};
use tern_qemu::spec::{Accel, VmSpec};
use tern_qemu::swtpm::{self, RemoveStateError, Swtpm, SwtpmConfig};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// libtpms' PERSISTENT_ALL magic, at the start of its permanent-state blob: present in a
/// plaintext state file or stream, absent once swtpm encrypted the blob.
const LIBTPMS_PERMALL_MAGIC: [u8; 4] = [0xab, 0x36, 0x47, 0x23];

fn swtpm_installed() -> bool {
    std::process::Command::new(swtpm::default_binary())
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success())
}

fn count(hay: &[u8], needle: &[u8]) -> usize {
    hay.windows(needle.len()).filter(|w| *w == needle).count()
}

/// One VM instance on "host" `name`: its swtpm and its QEMU.
struct Instance {
    tpm: Swtpm,
    qemu: QemuProcess,
}

async fn start(
    name: &str,
    dir: &Path,
    spec: &VmSpec,
    migration_key: Option<&Path>,
    incoming: bool,
) -> Result<Instance> {
    let run = dir.join(name);
    let key = dir.join(format!("{name}.key"));
    swtpm::ensure_key_file(&key)?;
    let mut cfg = SwtpmConfig::for_run_dir(&run, key);
    cfg.migration_key_file = migration_key.map(Path::to_path_buf);
    let tpm = Swtpm::start(&cfg)
        .await
        .with_context(|| format!("swtpm {name}"))?;
    let mut opts = LaunchOptions::new(run);
    opts.incoming_defer = incoming;
    let qemu = QemuProcess::launch(spec, &opts)
        .await
        .with_context(|| format!("QEMU {name}"))?;
    Ok(Instance { tpm, qemu })
}

/// Complete lines (newline seen) of `console` starting with `prefix`.
fn lines_with(console: &str, prefix: &str) -> Vec<String> {
    let complete = &console[..console.rfind('\n').map_or(0, |i| i + 1)];
    complete
        .lines()
        .map(|l| l.trim_end_matches('\r'))
        .filter(|l| l.starts_with(prefix))
        .map(str::to_string)
        .collect()
}

/// The guest's `TERN-PCR` lines: (seq, "0=HEX 1=HEX ... 23=HEX").
fn pcr_lines(q: &QemuProcess) -> Result<Vec<(u64, String)>> {
    let text = q.console_text();
    if let Some(e) = lines_with(&text, "TERN-TPM error").first() {
        bail!("guest: {e}");
    }
    lines_with(&text, "TERN-PCR seq=")
        .iter()
        .map(|l| {
            let (seq, pcrs) = l["TERN-PCR seq=".len()..]
                .split_once(' ')
                .with_context(|| format!("malformed: {l}"))?;
            ensure!(pcrs.split(' ').count() == 24, "malformed: {l}");
            Ok((seq.parse()?, pcrs.to_string()))
        })
        .collect()
}

/// Waits for the first `TERN-PCR` line with a sequence number above `after_seq`.
async fn wait_pcr_line(q: &QemuProcess, after_seq: u64, limit: Duration) -> Result<(u64, String)> {
    let t0 = Instant::now();
    loop {
        if let Some(l) = pcr_lines(q)?.into_iter().find(|(seq, _)| *seq > after_seq) {
            return Ok(l);
        }
        if t0.elapsed() > limit {
            bail!(
                "no TERN-PCR line after seq {after_seq} in {limit:?}; console:\n{}",
                q.console_text()
            );
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// The last `TERN-PCR` line a (now stopped) source printed.
fn last_pcr_line(q: &QemuProcess) -> Result<(u64, String)> {
    pcr_lines(q)?.pop().context("no TERN-PCR line")
}

/// The guest ran on: no second boot, and its counter went on from the source's.
fn assert_continued(dst: &QemuProcess, src_last_seq: u64, dst_first_seq: u64) -> Result<()> {
    let text = dst.console_text();
    ensure!(
        !text.contains("tern-guest:") && !text.contains("TERN-TPM extended"),
        "the guest booted again on the destination:\n{text}"
    );
    ensure!(
        dst_first_seq > src_last_seq,
        "the destination's first TERN-PCR seq {dst_first_seq} does not follow the source's last {src_last_seq}"
    );
    Ok(())
}

fn pcr(pcrs: &str, index: usize) -> &str {
    pcrs.split(' ')
        .nth(index)
        .and_then(|p| p.split_once('=').map(|(_, v)| v))
        .unwrap_or("")
}

/// Migrates `src` into `dst` (started with `-incoming defer`) through a relay on a unix
/// socket that counts `needle` in the stream (across read boundaries).
async fn migrate(
    src: &QemuProcess,
    dst: &QemuProcess,
    dir: &Path,
    hop: &str,
    needle: &[u8],
) -> Result<usize> {
    let incoming = dir.join(format!("{hop}-in.sock"));
    dst.qmp
        .execute(
            "migrate-incoming",
            Some(serde_json::json!({ "uri": format!("unix:{}", incoming.display()) })),
        )
        .await?;
    let relay_path = dir.join(format!("{hop}-relay.sock"));
    let listener = tokio::net::UnixListener::bind(&relay_path)?;
    let needle = needle.to_vec();
    let relay = tokio::spawn(async move {
        let (mut from, _) = listener.accept().await?;
        let mut to = tokio::net::UnixStream::connect(&incoming).await?;
        let (mut buf, mut carry, mut hits) = (vec![0u8; 1 << 16], Vec::new(), 0usize);
        loop {
            let n = from.read(&mut buf).await?;
            if n == 0 {
                break;
            }
            to.write_all(&buf[..n]).await?;
            carry.extend_from_slice(&buf[..n]);
            hits += count(&carry, &needle);
            carry.drain(..carry.len() - (needle.len() - 1).min(carry.len()));
        }
        to.shutdown().await?;
        anyhow::Ok(hits)
    });
    src.qmp
        .execute(
            "migrate",
            Some(serde_json::json!({ "uri": format!("unix:{}", relay_path.display()) })),
        )
        .await?;
    let t0 = Instant::now();
    loop {
        let info = src.qmp.query_migrate().await?;
        match info.status.as_str() {
            "completed" => break,
            "failed" | "cancelled" => bail!("migration {hop} {}", info.status),
            _ if t0.elapsed() > Duration::from_secs(120) => {
                bail!("migration {hop} still {} after 120 s", info.status)
            }
            _ => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
    let hits = tokio::time::timeout(Duration::from_secs(30), relay).await???;
    let t0 = Instant::now();
    while !dst.qmp.query_status().await?.running {
        ensure!(
            t0.elapsed() < Duration::from_secs(30),
            "destination of {hop} did not run"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Ok(hits)
}

/// The permanent-state file swtpm wrote: present, 0600, and not plaintext.
fn assert_encrypted_at_rest(state_dir: &Path) -> Result<()> {
    let f = state_dir.join("tpm2-00.permall");
    let bytes = std::fs::read(&f).with_context(|| format!("{}", f.display()))?;
    ensure!(
        bytes.len() > 512,
        "{} holds only {} bytes",
        f.display(),
        bytes.len()
    );
    ensure!(
        count(&bytes, &LIBTPMS_PERMALL_MAGIC) == 0,
        "{} holds libtpms' state in the clear",
        f.display()
    );
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(&f)?.permissions().mode() & 0o777;
    ensure!(mode == 0o600, "{} has mode {mode:o}", f.display());
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "tier vm: needs QEMU 10, the test guest and root (bash scripts/test.sh runs it)"]
async fn tpm_pcrs_survive_two_migrations_and_state_is_encrypted() -> Result<()> {
    ensure!(
        swtpm_installed(),
        "swtpm is not installed: bash scripts/setup.sh installs swtpm and swtpm-tools"
    );
    let (kernel, initrd) = guest()?;
    let d = tempfile::tempdir()?;
    let dir = d.path();
    let spec = VmSpec {
        name: "tpm".into(),
        // 64 MiB triple-faults in early boot once a tpm-tis device is there (80 boots)
        memory_mib: 128,
        vcpus: 1,
        accel: Accel::Tcg,
        kernel: Some(kernel),
        initrd: Some(initrd),
        append: "console=ttyS0 panic=-1 tern.workload=idle tern.tpm_extend=1234 tern.tpm_print=1"
            .into(),
        machine: "pc".into(),
        migration_capabilities: vec![],
        tpm: true,
        disks: vec![],
        memory: Default::default(),
        libvirt: None,
        firmware: Default::default(),
        nics: vec![],
    };
    let mkey = dir.join("migration.key");
    swtpm::ensure_key_file(&mkey)?;

    // Host A boots the guest, which extends PCR 16.
    let mut a = start("a", dir, &spec, None, false).await?;
    let (_, pcrs_a) = wait_pcr_line(&a.qemu, 0, Duration::from_secs(120)).await?;
    let pcr16 = pcr(&pcrs_a, 16).to_string();
    ensure!(
        pcr16.len() == 64 && pcr16 != "0".repeat(64),
        "PCR 16 not extended: {pcr16}"
    );
    let extended = lines_with(
        &a.qemu.console_text(),
        "TERN-TPM extended pcr=16 seed=1234 value=",
    );
    ensure!(
        extended.len() == 1 && extended[0].ends_with(&pcr16),
        "extend: {extended:?}, PCR 16 {pcr16}"
    );

    // Hop 1: A (no migration key) -> B (its own at-rest key, and the migration key). The
    // blobs cross in the clear: the positive control for the magic the checks look for.
    let mut b = start("b", dir, &spec, Some(&mkey), true).await?;
    let clear_hits = migrate(&a.qemu, &b.qemu, dir, "hop1", &LIBTPMS_PERMALL_MAGIC).await?;
    ensure!(
        clear_hits > 0,
        "without a migration key QEMU's stream carries libtpms' blobs in the clear; the magic was not seen"
    );
    let (last_a, _) = last_pcr_line(&a.qemu)?;
    let (seq_b, pcrs_b) = wait_pcr_line(&b.qemu, 0, Duration::from_secs(60)).await?;
    assert_continued(&b.qemu, last_a, seq_b)?;
    ensure!(
        pcrs_b == pcrs_a,
        "PCRs changed across hop 1:\nA {pcrs_a}\nB {pcrs_b}"
    );

    // B's swtpm holds its state: remove_state refuses.
    match swtpm::remove_state(b.tpm.state_dir(), Duration::from_millis(100)).await {
        Err(RemoveStateError::StillRunning { pid, .. }) => ensure!(
            Some(pid) == b.tpm.pid(),
            "lock held by {pid}, swtpm B is {:?}",
            b.tpm.pid()
        ),
        r => bail!("remove_state of a running TPM's state: {r:?}"),
    }

    // A after the switchover: QEMU quits, its swtpm follows (--terminate), the state left
    // behind is encrypted, and remove_state deletes it.
    a.qemu.quit(Duration::from_secs(10)).await;
    let st = a.tpm.stop(Duration::from_secs(10)).await?;
    ensure!(st.success(), "swtpm A exit: {st} ({})", a.tpm.log_tail());
    assert_encrypted_at_rest(a.tpm.state_dir())?;
    assert_encrypted_at_rest(b.tpm.state_dir())?;
    swtpm::remove_state(a.tpm.state_dir(), Duration::from_secs(5)).await?;
    ensure!(!a.tpm.state_dir().exists(), "A's TPM state is still there");

    // Hop 2: B -> C, both with the migration key: none of the state in the clear.
    let mut c = start("c", dir, &spec, Some(&mkey), true).await?;
    let clear_hits = migrate(&b.qemu, &c.qemu, dir, "hop2", &LIBTPMS_PERMALL_MAGIC).await?;
    ensure!(
        clear_hits == 0,
        "with a migration key libtpms' blobs were in the stream in the clear ({clear_hits} hits)"
    );
    let (last_b, _) = last_pcr_line(&b.qemu)?;
    let (seq_c, pcrs_c) = wait_pcr_line(&c.qemu, 0, Duration::from_secs(60)).await?;
    assert_continued(&c.qemu, last_b, seq_c)?;
    ensure!(
        pcrs_c == pcrs_a,
        "PCRs changed across hop 2:\nA {pcrs_a}\nC {pcrs_c}"
    );
    assert_encrypted_at_rest(c.tpm.state_dir())?;

    b.qemu.quit(Duration::from_secs(10)).await;
    b.tpm.stop(Duration::from_secs(10)).await?;
    swtpm::remove_state(b.tpm.state_dir(), Duration::from_secs(5)).await?;
    c.qemu.quit(Duration::from_secs(10)).await;
    c.tpm.stop(Duration::from_secs(10)).await?;
    Ok(())
}

#[tokio::test]
#[ignore = "tier vm: needs QEMU 10, the test guest and root (bash scripts/test.sh runs it)"]
async fn swtpm_start_failures_carry_swtpm_own_words() -> Result<()> {
    ensure!(
        swtpm_installed(),
        "swtpm is not installed: bash scripts/setup.sh installs swtpm and swtpm-tools"
    );
    let d = tempfile::tempdir()?;
    let key = d.path().join("k");
    swtpm::ensure_key_file(&key)?;
    // a control socket in a directory that does not exist: swtpm cannot bind and says so
    let mut cfg = SwtpmConfig::for_run_dir(&d.path().join("run"), key);
    std::fs::create_dir_all(d.path().join("run"))?;
    cfg.ctrl_socket = d.path().join("nowhere/swtpm.sock");
    match Swtpm::start(&cfg).await {
        Err(swtpm::SwtpmStartError::Exited { log_tail, .. }) => {
            ensure!(
                log_tail.contains("UnixIO socket"),
                "swtpm's words: {log_tail}"
            )
        }
        r => bail!("expected Exited, got {r:?}"),
    }
    // and a good start answers on its socket, then stops when asked
    let mut cfg = SwtpmConfig::for_run_dir(&d.path().join("run"), d.path().join("k"));
    cfg.start_timeout = Duration::from_secs(10);
    let mut t = Swtpm::start(&cfg).await?;
    tokio::net::UnixStream::connect(t.ctrl_socket()).await?;
    // swtpm writes its pid file on its own schedule (it may come after the socket answers)
    let want = t.pid().unwrap_or(0).to_string();
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let got = std::fs::read_to_string(&cfg.pid_file).unwrap_or_default();
        if got.trim() == want {
            break;
        }
        ensure!(
            std::time::Instant::now() < deadline,
            "pid file holds {got:?}, swtpm is {want}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    t.stop(Duration::ZERO).await?;
    ensure!(t.try_exited().is_some());
    Ok(())
}

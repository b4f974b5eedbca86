//! Failover, the agent's side, end to end: a VM that migrated away leaves a restartable
//! snapshot (its stream, recorded on the way, and its disk as kept); when its new host
//! "dies", the old host runs it again from there with its memory intact. And an agent
//! that stops hearing from its controller pauses its VMs until released.

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use serde_json::json;
use tern_api::client::ClientError;
use tern_testkit::agents::{
    e2e_lock, free_port, issue_cert, test_ca, wait_for_text, AgentOptions, TestAgent, TEST_CA,
};
use tern_testkit::guest::{ensure_guest, GuestImage};

const BIN: &str = env!("CARGO_BIN_EXE_tern");

/// A 128 MiB guest holding a 16 MiB pattern it re-verifies every second (TERN-CORRUPT on
/// a mismatch), with `extra` appended to its spec.
fn pattern_vm(name: &str, g: &GuestImage, extra: &str) -> String {
    format!(
        "name = {name:?}\nmemory_mib = 128\nvcpus = 1\naccel = \"tcg\"\nkernel = {:?}\ninitrd = {:?}\nappend = \"console=ttyS0 panic=-1 tern.workload=pattern tern.mib=16 tern.seed=7\"\n{extra}",
        g.kernel.display().to_string(),
        g.initrd.display().to_string()
    )
}

fn boot(a: &TestAgent, spec: &str) -> Result<std::path::PathBuf> {
    let info = a.start_vm(spec)?;
    let console = std::path::PathBuf::from(info["console_log"].as_str().context("console")?);
    wait_for_text(&console, "tern-pattern ok round", Duration::from_secs(90))?;
    Ok(console)
}

/// The pattern checker goes on in `console` (`rounds` fresh rounds after `since` bytes),
/// clean.
fn pattern_goes_on(console: &Path, since: usize, rounds: usize) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let text =
            String::from_utf8_lossy(&std::fs::read(console).unwrap_or_default()).into_owned();
        let fresh = text.get(since..).unwrap_or("");
        ensure!(
            !fresh.contains("TERN-CORRUPT") && !fresh.contains("bad round"),
            "the restarted guest's memory is not what it was:\n{fresh}"
        );
        if fresh.matches("tern-pattern ok round").count() >= rounds {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("the restarted guest's pattern checker did not go on:\n{fresh}");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
#[ignore = "tier vm: needs QEMU 10, the test guest and root (bash scripts/test.sh runs it)"]
fn a_vm_whose_new_host_died_runs_again_from_the_snapshot_it_left_with_its_memory_intact(
) -> Result<()> {
    let _l = e2e_lock();
    let g = ensure_guest()?;
    let t0 = Instant::now();
    let a = TestAgent::start(Path::new(BIN), "host-a", &[])?;
    let b = TestAgent::start(Path::new(BIN), "host-b", &[])?;
    // a disk the operator owns: it stays on A as it was at the switchover
    let disks = tempfile::tempdir()?;
    let disk = disks.path().join("snap1.qcow2");
    let made = std::process::Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2"])
        .arg(&disk)
        .arg("32M")
        .status()?;
    ensure!(made.success(), "qemu-img create failed");
    let extra = format!(
        "[[disk]]\npath = {:?}\nformat = \"qcow2\"\n",
        disk.display().to_string()
    );
    boot(&a, &pattern_vm("snap1", &g, &extra))?;
    let booted = t0.elapsed();

    let id = a.start_migration("snap1", &b.peer_addr.to_string(), json!({}))?;
    let st = a.wait_migration(&id, Duration::from_secs(120))?;
    let report = st
        .report
        .with_context(|| format!("migration failed: {:?}\n{}", st.error, a.log_text()))?;
    ensure!(b.vm_status("snap1")? == "running");

    // A keeps a restartable snapshot of it (written once the recording is on disk)
    let deadline = Instant::now() + Duration::from_secs(30);
    let snap = loop {
        let list = a.client.snapshots()?;
        if let Some(s) = list.into_iter().find(|s| s.meta.vm == "snap1") {
            break s;
        }
        ensure!(
            Instant::now() < deadline,
            "no snapshot on A:\n{}",
            a.log_text()
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    let kept_at = t0.elapsed();
    eprintln!(
        "snapshot: {} bytes of stream for {} MiB of RAM (QEMU sent {}), age {:.1} s",
        snap.meta.file_bytes,
        snap.meta.mem_bytes >> 20,
        report.bytes_from_qemu,
        snap.age_s
    );
    ensure!(snap.meta.restartable, "{:?}", snap.meta);
    ensure!(snap.meta.mem_bytes == 128 << 20, "{:?}", snap.meta);
    ensure!(snap.meta.migration_id == id && snap.meta.destination == b.peer_addr.to_string());
    ensure!(snap.age_s >= 0.0 && snap.age_s < 30.0, "age {}", snap.age_s);
    // the whole stream QEMU sent is what was kept
    ensure!(
        snap.meta.file_bytes == report.bytes_from_qemu,
        "recorded {} of {} bytes",
        snap.meta.file_bytes,
        report.bytes_from_qemu
    );
    ensure!(snap.meta.file_bytes > 16 << 20, "{:?}", snap.meta);
    ensure!(snap.meta.disks.len() == 1 && snap.meta.disks[0].path == disk);
    let stream = a.state_dir.join("snapshots/snap1/stream");
    ensure!(std::fs::metadata(&stream)?.len() == snap.meta.file_bytes);
    let disk_before = std::fs::read(&disk)?;

    // B "dies": its copy is gone
    b.call("DELETE", "/v1/vms/snap1", None)?;

    let t = Instant::now();
    let r = a.client.restart_snapshot("snap1")?;
    let restart_took = t.elapsed();
    ensure!(r.vm == "snap1" && r.restarted_from_unix_ms == snap.meta.taken_unix_ms);
    ensure!(r.age_s >= snap.age_s && r.age_s < 60.0, "age {}", r.age_s);
    ensure!(a.vm_status("snap1")? == "running");
    let info = a.vm("snap1")?;
    let overlay = info["disks"][0]["path"].as_str().context("disk path")?;
    ensure!(
        Path::new(overlay).starts_with(&r.run_dir),
        "the restarted VM runs on {overlay}, not an overlay in {}",
        r.run_dir.display()
    );
    // the guest goes on from where it was: its pattern intact
    pattern_goes_on(&a.console_log("snap1")?, 0, 2)?;
    ensure!(
        std::fs::read(&disk)? == disk_before,
        "the kept disk changed under the restarted VM"
    );
    ensure!(
        a.client.snapshots()?.is_empty(),
        "the snapshot is still listed"
    );
    ensure!(!stream.exists());

    // there is nothing to restart a second time
    match a.client.restart_snapshot("snap1") {
        Err(ClientError::Api {
            status: 404,
            message,
        }) => {
            ensure!(message.contains("no snapshot"), "{message}")
        }
        other => bail!("a second restart: {other:?}"),
    }
    // and the restarted VM is like any other: it migrates again
    let id = a.start_migration("snap1", &b.peer_addr.to_string(), json!({}))?;
    let st = a.wait_migration(&id, Duration::from_secs(120))?;
    ensure!(st.report.is_some(), "{:?}", st.error);
    ensure!(b.vm_status("snap1")? == "running");
    eprintln!(
        "timings: boot {booted:?}, snapshot listed at {kept_at:?}, restart {restart_took:?}, total {:?}",
        t0.elapsed()
    );
    Ok(())
}

#[test]
#[ignore = "tier vm: needs QEMU 10, the test guest and root (bash scripts/test.sh runs it)"]
fn an_agent_that_no_longer_hears_its_controller_pauses_its_vms_until_released() -> Result<()> {
    let _l = e2e_lock();
    let g = ensure_guest()?;
    let t0 = Instant::now();
    let control = format!("127.0.0.1:{}", free_port()?);
    let a = TestAgent::start_with(
        Path::new(BIN),
        "host-a",
        AgentOptions {
            args: &["--fence-after", "3", "--control-listen", &control],
            ..Default::default()
        },
    )?;
    let ctl_dir = tempfile::tempdir()?;
    issue_cert(
        &test_ca(Path::new(TEST_CA))?,
        "ctl",
        "127.0.0.1".parse()?,
        &["controller"],
        ctl_dir.path(),
    )?;
    let ctl = tern_agent::control::client_for(&control, ctl_dir.path())?;
    let leader_poll = || ctl.call("GET", tern_api::load::LEADER_POLL, None);
    let a_word = a.state_dir.join("fence-word");
    boot(&a, &pattern_vm("fenced1", &g, ""))?;
    // not armed before the controller spoke; a poll that is not the leader's (a dry-run
    // controller's) is not its word
    ctl.load()?;
    ensure!(!a.client.fence()?.fenced);
    ensure!(!a_word.exists(), "a plain poll armed the fence");

    // the leading controller polls once, then goes silent
    leader_poll()?;
    let heard = Instant::now();
    ensure!(a_word.exists(), "the word is not written down");
    let deadline = heard + Duration::from_secs(10);
    while a.vm_status("fenced1")? != "paused" {
        ensure!(Instant::now() < deadline, "not fenced:\n{}", a.log_text());
        std::thread::sleep(Duration::from_millis(100));
    }
    let fenced_after = heard.elapsed();
    ensure!(
        fenced_after >= Duration::from_millis(2500),
        "fenced after {fenced_after:?}"
    );
    let f = a.client.fence()?;
    ensure!(f.fenced && f.vms == vec!["fenced1".to_string()], "{f:?}");
    ensure!(f.fence_after_s == Some(3.0) && f.since_unix_ms.is_some());
    ensure!(a.state_dir.join("fenced.json").exists());
    ensure!(a.log_text().contains("fenced: no word from the controller"));

    // nothing resumes it or takes it away but the release
    match a.client.call(
        "POST",
        "/v1/vms/fenced1/qmp",
        Some(&json!({ "execute": "cont" })),
    ) {
        Err(ClientError::Api {
            status: 409,
            message,
        }) => {
            ensure!(message.contains("fenced"), "{message}")
        }
        other => bail!("cont while fenced: {other:?}"),
    }
    match a.client.call(
        "POST",
        "/v1/vms/fenced1/migrate",
        Some(&json!({ "to": "127.0.0.1:1" })),
    ) {
        Err(ClientError::Api {
            status: 409,
            message,
        }) => {
            ensure!(message.contains("fenced"), "{message}")
        }
        other => bail!("a migration while fenced: {other:?}"),
    }
    match a.client.restart_snapshot("other") {
        Err(ClientError::Api {
            status: 409,
            message,
        }) => {
            ensure!(message.contains("fenced"), "{message}")
        }
        other => bail!("a restart while fenced: {other:?}"),
    }
    // a word from the controller does not unfence
    leader_poll()?;
    ensure!(a.client.fence()?.fenced);
    ensure!(a.vm_status("fenced1")? == "paused");

    let released = ctl.release_fence(&tern_api::FenceRelease {
        resume: vec!["fenced1".into()],
        stop: vec![],
    })?;
    ensure!(
        released.resumed == vec!["fenced1".to_string()] && released.stopped.is_empty(),
        "{released:?}"
    );
    ensure!(a.vm_status("fenced1")? == "running");
    ensure!(!a.client.fence()?.fenced);
    ensure!(!a.state_dir.join("fenced.json").exists());
    let console = a.console_log("fenced1")?;
    let since = std::fs::read(&console)?.len();
    // (one round: the controller is silent again, so the fence falls again 3 s on)
    pattern_goes_on(&console, since, 1)?;
    let deadline = Instant::now() + Duration::from_secs(10);
    while !a.client.fence()?.fenced {
        ensure!(
            Instant::now() < deadline,
            "not fenced again:\n{}",
            a.log_text()
        );
        std::thread::sleep(Duration::from_millis(100));
    }

    // an agent that crashes while cut off and starts again: armed from its start by the
    // word its last run wrote down, it fences once the silence reaches --fence-after
    ctl.release_fence(&tern_api::FenceRelease {
        resume: vec!["fenced1".into()],
        stop: vec![],
    })?;
    ensure!(a.vm_status("fenced1")? == "running");
    leader_poll()?;
    let word = Instant::now();
    let mut a = a;
    a.kill();
    let b = TestAgent::start_with(
        Path::new(BIN),
        "host-a",
        AgentOptions {
            args: &["--fence-after", "3", "--control-listen", &control],
            state_dir: Some(&a.state_dir),
            listen: Some(a.peer_addr),
            ..Default::default()
        },
    )?;
    let deadline = word + Duration::from_secs(10);
    while b.vm_status("fenced1")? != "paused" {
        ensure!(
            Instant::now() < deadline,
            "the restarted agent did not fence:\n{}",
            b.log_text()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let restarted_fenced_after = word.elapsed();
    ensure!(
        restarted_fenced_after >= Duration::from_millis(2500),
        "fenced {restarted_fenced_after:?} after the word"
    );
    ensure!(
        b.log_text().contains("armed since a previous run"),
        "{}",
        b.log_text()
    );
    ensure!(b.client.fence()?.vms == vec!["fenced1".to_string()]);
    eprintln!(
        "fenced {fenced_after:?} after the controller's last word, and {restarted_fenced_after:?} after it across an agent crash; total {:?}",
        t0.elapsed()
    );
    Ok(())
}

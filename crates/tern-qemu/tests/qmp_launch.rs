//! The launcher and QMP client against a real QEMU 10 (TCG).

mod common;
use common::guest;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{bail, Result};
use tern_qemu::launch::{LaunchError, LaunchOptions, QemuProcess};
use tern_qemu::qmp::QmpError;
use tern_qemu::spec::{Accel, VmSpec};

fn spec(kernel: PathBuf, initrd: Option<PathBuf>) -> VmSpec {
    VmSpec {
        name: "qmp-test".into(),
        memory_mib: 64,
        vcpus: 1,
        accel: Accel::Tcg,
        kernel: Some(kernel),
        initrd,
        append: "console=ttyS0 panic=-1 tern.workload=idle".into(),
        machine: "pc".into(),
        migration_capabilities: vec![],
        tpm: false,
        disks: vec![],
        memory: Default::default(),
        libvirt: None,
        firmware: Default::default(),
        nics: vec![],
    }
}

#[tokio::test]
#[ignore = "tier qemu: needs QEMU 10 and its tools (bash scripts/test.sh runs it)"]
async fn a_qemu_that_cannot_start_reports_its_own_message() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let not_a_kernel = dir.path().join("not-a-kernel");
    std::fs::write(&not_a_kernel, b"this is not a kernel")?;
    let opts = LaunchOptions::new(dir.path().join("run"));
    match QemuProcess::launch(&spec(not_a_kernel, None), &opts).await {
        Err(LaunchError::Exited { stderr_tail, .. }) => {
            assert!(
                stderr_tail.contains("kernel"),
                "QEMU's own words: {stderr_tail}"
            );
        }
        Err(e) => bail!("expected Exited, got {e:?}"),
        Ok(_) => bail!("QEMU started with a bogus kernel"),
    }
    // a missing binary is a clear error too
    let mut opts = LaunchOptions::new(dir.path().join("run2"));
    opts.qemu_binary = "/nonexistent/qemu".into();
    let (k, i) = guest()?;
    assert!(matches!(
        QemuProcess::launch(&spec(k, Some(i)), &opts).await,
        Err(LaunchError::Spawn { .. })
    ));
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "tier qemu: needs QEMU 10 and its tools (bash scripts/test.sh runs it)"]
async fn qmp_answers_concurrently_sees_events_and_fails_fast_when_qemu_dies() -> Result<()> {
    let (k, i) = guest()?;
    let dir = tempfile::tempdir()?;
    let mut opts = LaunchOptions::new(dir.path().join("run"));
    opts.start_paused = true;
    let mut q = QemuProcess::launch(&spec(k, Some(i)), &opts).await?;
    assert_eq!(q.qmp.version().major, 10);
    let st = q.qmp.query_status().await?;
    assert!(!st.running, "-S keeps the VM paused: {}", st.status);
    assert_eq!(q.qmp.query_migrate().await?.status, "none");

    // capabilities round-trip
    q.qmp
        .set_migrate_capabilities(&[("return-path", true)])
        .await?;
    let caps = q.qmp.query_migrate_capabilities().await?;
    assert!(caps.iter().any(|(c, on)| c == "return-path" && *on));

    // events: cont -> RESUME
    let mut ev = q.qmp.subscribe();
    q.qmp.execute("cont", None).await?;
    let e = q
        .qmp
        .wait_event(&mut ev, "RESUME", Duration::from_secs(10))
        .await?;
    assert!(e.timestamp.elapsed().unwrap_or_default() < Duration::from_secs(10));
    assert!(q.qmp.query_status().await?.running);

    // many tasks at once, each gets its own answer
    let mut set = tokio::task::JoinSet::new();
    for _ in 0..16 {
        let qmp = q.qmp.clone();
        set.spawn(async move { qmp.query_status().await.map(|s| s.running) });
    }
    while let Some(r) = set.join_next().await {
        assert!(r??);
    }

    // a failing command carries QEMU's error class and text
    match q.qmp.execute("no-such-command", None).await {
        Err(QmpError::Command { class, .. }) => assert_eq!(class, "CommandNotFound"),
        r => bail!("expected a command error, got {r:?}"),
    }

    // QEMU killed behind our back: calls fail promptly with Closed, never hang
    let pid = q.pid().expect("pid");
    std::process::Command::new("kill")
        .args(["-KILL", &pid.to_string()])
        .status()?;
    let t = Instant::now();
    let r = tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            match q.qmp.query_status().await {
                Err(QmpError::Closed) => return Ok(()),
                Err(e) => return Err(e),
                Ok(_) => tokio::time::sleep(Duration::from_millis(20)).await,
            }
        }
    })
    .await;
    assert!(
        matches!(r, Ok(Ok(()))),
        "QMP after QEMU died: {r:?} after {:?}",
        t.elapsed()
    );
    assert!(q.qmp.is_closed());
    q.wait().await?;
    Ok(())
}

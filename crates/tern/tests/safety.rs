//! No split brain, nothing that waits forever, and nothing of a guest readable by local
//! users: the switchover record is durable before the guest runs, a restarted destination
//! finishes a switchover its predecessor recorded, a busy destination keeps the source
//! from declaring doubt, a panic cleans up like an error; QEMU runs unprivileged and
//! sandboxed; the state directory, page store and incoming disks are root's only; the API
//! is local and its QMP pass-through cannot open files or run programs.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use serde_json::json;
use tern_testkit::agents::{
    checker_clean, e2e_lock, pid_alive, wait_for_text, AgentOptions, TestAgent,
};
use tern_testkit::guest::{ensure_guest, GuestImage};
use tern_testkit::hostile::{files_below, listable_by_nobody, readable_by_nobody, uid_and_seccomp};

const BIN: &str = env!("CARGO_BIN_EXE_tern");

fn spec(name: &str, g: &GuestImage, workload: &str, extra: &str) -> String {
    format!(
        "name = {name:?}\nmemory_mib = 256\nvcpus = 1\naccel = \"tcg\"\nkernel = {:?}\ninitrd = {:?}\nappend = \"console=ttyS0 panic=-1 {workload}\"\n{extra}",
        g.kernel.display().to_string(),
        g.initrd.display().to_string()
    )
}

const DIRTY: &str = "tern.workload=dirty tern.mib=32 tern.rate=4";

fn boot(a: &TestAgent, spec_toml: &str) -> Result<PathBuf> {
    let info = a.start_vm(spec_toml)?;
    let console = PathBuf::from(info["console_log"].as_str().context("console path")?);
    wait_for_text(&console, "TERN-READY", Duration::from_secs(90))?;
    Ok(console)
}

fn agent_with(name: &str, env: &[(&str, &str)]) -> Result<TestAgent> {
    TestAgent::start_with(
        Path::new(BIN),
        name,
        AgentOptions {
            env,
            args: &["--stall-timeout-secs", "8"],
            ..Default::default()
        },
    )
}

fn console_of(a: &TestAgent, vm: &str) -> Result<PathBuf> {
    Ok(a.vm(vm)?["console_log"].as_str().context("console")?.into())
}

#[test]
#[ignore = "tier vm: needs QEMU 10, the test guest and root (bash scripts/test.sh runs it)"]
fn a_destination_restarted_between_recording_the_switchover_and_cont_runs_the_vm_exactly_once(
) -> Result<()> {
    let _l = e2e_lock();
    let g = ensure_guest()?;
    let a = agent_with("host-a", &[])?;
    let mut b = agent_with("host-b", &[("TERN_FAULT", "exit-at-switchover")])?;
    boot(&a, &spec("sw1", &g, DIRTY, ""))?;
    let id = a.start_migration("sw1", &b.peer_addr.to_string(), json!({}))?;
    // B records the switchover and dies before the guest runs; the source committed
    let deadline = Instant::now() + Duration::from_secs(120);
    while b.pid().is_some_and(pid_alive) {
        ensure!(
            Instant::now() < deadline,
            "the destination did not exit at the switchover"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    b.kill();
    let b2 = b.successor(Path::new(BIN))?;
    // the restarted agent finishes the switchover; the source learns it by asking
    let st = a.wait_migration(&id, Duration::from_secs(120))?;
    let r = st
        .report
        .with_context(|| format!("migration failed: {:?}\n{}", st.error, a.log_text()))?;
    ensure!(
        r.resolved_by_query,
        "the outcome came from asking the restarted destination"
    );
    ensure!(a.vms()?.is_empty(), "the source's copy is gone");
    ensure!(
        b2.vm_status("sw1")? == "running",
        "the destination runs the VM"
    );
    let console = console_of(&b2, "sw1")?;
    let since = std::fs::read_to_string(&console)?.len();
    checker_clean(&console, since)?;
    Ok(())
}

#[test]
#[ignore = "tier vm: needs QEMU 10, the test guest and root (bash scripts/test.sh runs it)"]
fn a_destination_that_cannot_record_the_switchover_does_not_run_the_vm() -> Result<()> {
    let _l = e2e_lock();
    let g = ensure_guest()?;
    let a = agent_with("host-a", &[])?;
    let b = agent_with("host-b", &[("TERN_FAULT", "fail-switch-record")])?;
    let console = boot(&a, &spec("sw2", &g, DIRTY, ""))?;
    let id = a.start_migration("sw2", &b.peer_addr.to_string(), json!({}))?;
    let st = a.wait_migration(&id, Duration::from_secs(120))?;
    let e = st
        .error
        .context("the migration succeeded without a switchover record")?;
    ensure!(
        e.code == "resource-exhausted" && e.message.contains("switchover"),
        "{e:?}"
    );
    ensure!(a.vm_status("sw2")? == "running");
    ensure!(
        b.vms()?.is_empty() && b.run_dirs().is_empty(),
        "the destination kept something"
    );
    let since = std::fs::read_to_string(&console)?.len();
    checker_clean(&console, since)?;
    Ok(())
}

#[test]
#[ignore = "tier vm: needs QEMU 10, the test guest and root (bash scripts/test.sh runs it)"]
fn a_panic_in_an_incoming_migration_cleans_up_and_the_next_one_succeeds() -> Result<()> {
    let _l = e2e_lock();
    let g = ensure_guest()?;
    let a = agent_with("host-a", &[])?;
    let b = agent_with("host-b", &[("TERN_FAULT", "panic-in-transfer")])?;
    boot(&a, &spec("sw3", &g, DIRTY, ""))?;
    let id = a.start_migration("sw3", &b.peer_addr.to_string(), json!({}))?;
    let st = a.wait_migration(&id, Duration::from_secs(120))?;
    st.error.context("the panicking migration succeeded")?;
    ensure!(a.vm_status("sw3")? == "running");
    let failed = b.migrations()?;
    ensure!(
        failed.iter().any(|m| m
            .error
            .as_ref()
            .is_some_and(|e| e.code == "internal" && e.message.contains("internally"))),
        "the destination's record of it: {failed:?}"
    );
    let pids: Vec<u32> = b
        .migrations()?
        .iter()
        .filter_map(|m| m.dest_qemu_pid)
        .collect();
    let deadline = Instant::now() + Duration::from_secs(10);
    while !(b.run_dirs().is_empty() && pids.iter().all(|p| !pid_alive(*p))) {
        ensure!(
            Instant::now() < deadline,
            "the destination kept its QEMU or run directory after the panic"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    // the same agent takes the next migration (its page store's lock was held by the
    // panic: no poisoning)
    let id = a.start_migration("sw3", &b.peer_addr.to_string(), json!({}))?;
    let st = a.wait_migration(&id, Duration::from_secs(180))?;
    ensure!(
        st.report.is_some(),
        "the next migration failed: {:?}\n{}",
        st.error,
        b.log_text()
    );
    ensure!(b.vm_status("sw3")? == "running");
    Ok(())
}

#[test]
#[ignore = "tier vm: needs QEMU 10, the test guest and root (bash scripts/test.sh runs it)"]
fn a_destination_busy_finishing_keeps_the_source_waiting_instead_of_in_doubt() -> Result<()> {
    let _l = e2e_lock();
    let g = ensure_guest()?;
    let a = agent_with("host-a", &[])?;
    let b = agent_with("host-b", &[("TERN_FAULT", "slow-finish")])?;
    boot(&a, &spec("sw4", &g, "tern.workload=idle", ""))?;
    let id = a.start_migration("sw4", &b.peer_addr.to_string(), json!({}))?;
    let st = a.wait_migration(&id, Duration::from_secs(180))?;
    let r = st.report.with_context(|| format!("{:?}", st.error))?;
    ensure!(
        !r.resolved_by_query,
        "the source gave up waiting and had to ask: {r:?}"
    );
    ensure!(b.vm_status("sw4")? == "running");
    Ok(())
}

#[test]
#[ignore = "tier vm: needs QEMU 10, the test guest and root (bash scripts/test.sh runs it)"]
fn qemu_runs_unprivileged_and_sandboxed_and_local_users_read_nothing_of_a_guest() -> Result<()> {
    let _l = e2e_lock();
    let g = ensure_guest()?;
    let a = TestAgent::start(Path::new(BIN), "host-a", &[])?;
    let b = TestAgent::start(Path::new(BIN), "host-b", &[])?;
    // a guest with a disk, moved to B: B has an incoming disk, both have page stores
    let disk = a.dir.path().join("lu.raw");
    std::fs::write(&disk, vec![0x5au8; 8 << 20])?;
    boot(
        &a,
        &spec(
            "lu",
            &g,
            "tern.workload=idle",
            &format!(
                "[[disk]]\npath = {:?}\nformat = \"raw\"\n",
                disk.display().to_string()
            ),
        ),
    )?;
    let pid = a.vm("lu")?["pid"].as_u64().context("pid")? as u32;
    let tern_qemu = users_uid("tern-qemu")?;
    ensure!(
        uid_and_seccomp(pid)? == (tern_qemu, 2),
        "source QEMU: (uid, seccomp) = {:?}",
        uid_and_seccomp(pid)?
    );
    let id = a.start_migration("lu", &b.peer_addr.to_string(), json!({}))?;
    let st = a.wait_migration(&id, Duration::from_secs(180))?;
    ensure!(st.report.is_some(), "{:?}", st.error);
    let info = b.vm("lu")?;
    let pid = info["pid"].as_u64().context("pid")? as u32;
    ensure!(
        uid_and_seccomp(pid)? == (tern_qemu, 2),
        "destination QEMU: {:?}",
        uid_and_seccomp(pid)?
    );
    let incoming_disk = PathBuf::from(info["disks"][0]["path"].as_str().context("disk path")?);
    ensure!(
        incoming_disk.starts_with(&b.state_dir),
        "{}",
        incoming_disk.display()
    );

    for agent in [&a, &b] {
        ensure!(
            !listable_by_nobody(&agent.state_dir)?,
            "{} is listable by nobody",
            agent.state_dir.display()
        );
        let store = agent.state_dir.join("pages.store");
        ensure!(store.exists(), "no page store at {}", store.display());
        // whatever nobody could reach: every file the agent made is private too (the
        // test's own files in the same directory are not the agent's)
        let mine =
            ["run", "images", "chunks", "pages.store", "tpm.key"].map(|f| agent.state_dir.join(f));
        for f in mine.iter().flat_map(|d| {
            if d.is_dir() {
                files_below(d)
            } else {
                vec![d.clone()]
            }
        }) {
            use std::os::unix::fs::PermissionsExt;
            let Ok(md) = std::fs::symlink_metadata(&f) else {
                continue;
            };
            if md.file_type().is_socket() || md.file_type().is_symlink() {
                continue;
            }
            ensure!(
                md.permissions().mode() & 0o077 == 0,
                "{} has mode {:o}",
                f.display(),
                md.permissions().mode() & 0o7777
            );
        }
    }
    for f in [
        b.state_dir.join("pages.store"),
        incoming_disk,
        console_of(&b, "lu")?,
    ] {
        ensure!(!readable_by_nobody(&f)?, "nobody can read {}", f.display());
    }
    Ok(())
}

fn users_uid(name: &str) -> Result<u32> {
    let out = std::process::Command::new("id")
        .args(["-u", name])
        .output()?;
    ensure!(
        out.status.success(),
        "no user {name} (scripts/setup.sh makes it)"
    );
    Ok(String::from_utf8_lossy(&out.stdout).trim().parse()?)
}

use std::os::unix::fs::FileTypeExt;

#[test]
#[ignore = "tier vm: needs QEMU 10, the test guest and root (bash scripts/test.sh runs it)"]
fn keys_with_loose_modes_and_a_tcp_api_are_refused_and_qmp_cannot_open_files() -> Result<()> {
    let _l = e2e_lock();
    let g = ensure_guest()?;
    // a TCP API: refused with words that say why
    let out = std::process::Command::new(BIN)
        .args([
            "agent",
            "--name",
            "x",
            "--api",
            "tcp:127.0.0.1:0",
            "--listen",
            "127.0.0.1:0",
            "--state-dir",
            "/tmp/tern-never",
        ])
        .output()?;
    let err = String::from_utf8_lossy(&out.stderr);
    ensure!(
        !out.status.success() && err.contains("unix socket only"),
        "{err}"
    );
    // a key others may read: refused at start
    let a = TestAgent::start(Path::new(BIN), "host-a", &[])?;
    boot(&a, &spec("q1", &g, "tern.workload=idle", ""))?;
    let tls = a.dir.path().join("tls");
    let loose = tempfile::Builder::new()
        .prefix("tern-loose-")
        .tempdir_in("/tmp")?;
    for f in ["ca.pem", "agent.pem", "agent.key", "cluster.key"] {
        if tls.join(f).exists() {
            std::fs::copy(tls.join(f), loose.path().join(f))?;
        }
    }
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(
        loose.path().join("agent.key"),
        std::fs::Permissions::from_mode(0o644),
    )?;
    match TestAgent::start_with(
        Path::new(BIN),
        "host-l",
        AgentOptions {
            tls_dir: Some(loose.path()),
            ..Default::default()
        },
    ) {
        Ok(_) => bail!("an agent started with an agent.key others can read"),
        Err(e) => ensure!(format!("{e:#}").contains("chmod 600"), "{e:#}"),
    }
    // the QMP pass-through: queries and run control, nothing that opens files or runs programs
    ensure!(a.vm_status("q1")? == "running");
    for (cmd, args) in [
        ("migrate", json!({ "uri": "exec:touch /tmp/tern-pwned" })),
        (
            "human-monitor-command",
            json!({ "command-line": "info version" }),
        ),
        (
            "pmemsave",
            json!({ "val": 0, "size": 4096, "filename": "/tmp/tern-pwned" }),
        ),
        (
            "blockdev-add",
            json!({ "driver": "file", "node-name": "x", "filename": "/etc/shadow" }),
        ),
    ] {
        match a.qmp("q1", cmd, Some(args)) {
            Ok(v) => bail!("{cmd} passed through: {v}"),
            Err(e) => ensure!(
                format!("{e:#}").contains("not passed through"),
                "{cmd}: {e:#}"
            ),
        }
    }
    ensure!(!Path::new("/tmp/tern-pwned").exists());
    // the agent saves guest memory itself
    let ram = a.dir.path().join("q1.ram");
    a.save_memory("q1", 1 << 20, &ram)?;
    ensure!(std::fs::metadata(&ram)?.len() == 1 << 20);
    Ok(())
}

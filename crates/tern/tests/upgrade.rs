//! Same-host upgrades (`tern vm upgrade`): a running VM continues in a new QEMU process
//! with its memory handed over (QEMU's cpr-transfer), its disk and its TPM; tern carries
//! the device state and counts it (no RAM page crosses). Every failure before the commit
//! leaves the VM running in its old QEMU, and an agent that dies at either side of the
//! commit is followed by one that runs the VM exactly once.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use serde_json::json;
use tern_api::vm::UpgradeReport;
use tern_testkit::agents::{
    checker_clean, e2e_lock, pid_alive, wait_for_text, AgentOptions, TestAgent,
};
use tern_testkit::guest::{ensure_guest, GuestImage};

const BIN: &str = env!("CARGO_BIN_EXE_tern");

/// The dirtier writes 32 MiB at 4 MiB/s and checks every page it wrote.
const DIRTY: &str = "tern.workload=dirty tern.mib=32 tern.rate=4";

/// A VM spec with shared memory (what an upgrade needs) unless `extra` says otherwise.
fn spec(name: &str, g: &GuestImage, mib: u32, append: &str, extra: &str) -> String {
    let memory = if extra.contains("memory =") {
        ""
    } else {
        "memory = \"shared\"\n"
    };
    format!(
        "name = {name:?}\nmemory_mib = {mib}\nvcpus = 1\naccel = \"tcg\"\nkernel = {:?}\ninitrd = {:?}\nappend = \"console=ttyS0 panic=-1 {append}\"\n{memory}{extra}",
        g.kernel.display().to_string(),
        g.initrd.display().to_string()
    )
}

fn agent(env: &[(&str, &str)]) -> Result<TestAgent> {
    TestAgent::start_with(
        Path::new(BIN),
        "host-a",
        AgentOptions {
            env,
            ..Default::default()
        },
    )
}

fn boot(a: &TestAgent, spec_toml: &str, ready: &str) -> Result<PathBuf> {
    let info = a.start_vm(spec_toml)?;
    let console = PathBuf::from(info["console_log"].as_str().context("console path")?);
    wait_for_text(&console, ready, Duration::from_secs(120)).context("guest did not boot")?;
    Ok(console)
}

fn upgrade(a: &TestAgent, vm: &str, body: serde_json::Value) -> Result<UpgradeReport> {
    let v = a
        .call("POST", &format!("/v1/vms/{vm}/upgrade"), Some(&body))
        .with_context(|| logs(a))?;
    Ok(serde_json::from_value(v)?)
}

/// The agent's log and each QEMU's, for a failure's message.
fn logs(a: &TestAgent) -> String {
    let mut s = format!(
        "agent log:\n{}",
        tern_testkit::agents::tail(&a.log_text(), 3000)
    );
    for d in a.run_dirs() {
        let q = std::fs::read_to_string(d.join("qemu.log")).unwrap_or_default();
        // the guest's last words too (a QEMU that exits by itself may have a guest
        // that panicked or reset: -no-reboot)
        let c = std::fs::read_to_string(d.join("console.log")).unwrap_or_default();
        s += &format!(
            "\n{}: qemu.log: {q}\nconsole (end): {}",
            d.display(),
            tern_testkit::agents::tail(&c, 1500)
        );
    }
    s
}

/// The API's error for an upgrade that must fail.
fn upgrade_error(a: &TestAgent, vm: &str, body: serde_json::Value) -> Result<String> {
    match a.call("POST", &format!("/v1/vms/{vm}/upgrade"), Some(&body)) {
        Ok(v) => bail!("the upgrade succeeded: {v}"),
        Err(e) => Ok(format!("{e:#}")),
    }
}

fn pid_of(a: &TestAgent, vm: &str) -> Result<u32> {
    Ok(a.vm(vm)?["pid"].as_u64().context("pid")? as u32)
}

fn console_of(a: &TestAgent, vm: &str) -> Result<PathBuf> {
    Ok(a.vm(vm)?["console_log"].as_str().context("console")?.into())
}

fn console_len(console: &Path) -> usize {
    std::fs::read_to_string(console)
        .map(|t| t.len())
        .unwrap_or(0)
}

/// The VM runs, in the QEMU with `pid`, and the agent keeps one run directory for it.
fn runs_in(a: &TestAgent, vm: &str, pid: u32) -> Result<()> {
    ensure!(a.vm_status(vm)? == "running", "{vm} is not running");
    ensure!(pid_of(a, vm)? == pid, "{vm} runs in another QEMU");
    let dirs = a.run_dirs();
    ensure!(dirs.len() == 1, "one run directory, found {dirs:?}");
    Ok(())
}

fn wait_exit(a: &TestAgent) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(120);
    while a.pid().is_some_and(pid_alive) {
        ensure!(Instant::now() < deadline, "the agent did not exit");
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok(())
}

fn ext4_image(dir: &Path) -> Result<PathBuf> {
    let img = dir.join("data.raw");
    let out = Command::new("mkfs.ext4")
        .args(["-q", "-F"])
        .arg(&img)
        .arg("32M")
        .output()?;
    ensure!(out.status.success(), "mkfs.ext4: {out:?}");
    Ok(img)
}

/// The newest `TERN-DISK ok seq=K` on a console.
fn disk_seq(console: &Path) -> Option<u64> {
    let text = std::fs::read_to_string(console).ok()?;
    text.lines().rev().find_map(|l| {
        l.trim()
            .strip_prefix("TERN-DISK ok seq=")?
            .split_whitespace()
            .next()?
            .parse()
            .ok()
    })
}

/// The newest complete `TERN-PCR seq=K 0=HEX ... 23=HEX` line on a console: (K, PCR 16).
fn pcr16(console: &Path) -> Option<(u64, String)> {
    let text = std::fs::read_to_string(console).ok()?;
    let whole = &text[..text.rfind('\n')? + 1];
    whole.lines().rev().find_map(|l| {
        let rest = l.trim().strip_prefix("TERN-PCR seq=")?;
        let mut it = rest.split_whitespace();
        let seq = it.next()?.parse().ok()?;
        let p = it.find_map(|kv| kv.strip_prefix("16="))?.to_string();
        (p.len() == 64).then_some((seq, p))
    })
}

fn wait_until<T>(what: &str, mut f: impl FnMut() -> Option<T>) -> Result<T> {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if let Some(v) = f() {
            return Ok(v);
        }
        ensure!(Instant::now() < deadline, "{what}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
#[ignore = "tier vm: needs QEMU 10, the test guest and root (bash scripts/test.sh runs it)"]
fn a_running_vm_continues_in_a_new_qemu_with_its_disk_and_tpm_and_no_ram_copied() -> Result<()> {
    let _l = e2e_lock();
    let g = ensure_guest()?;
    let d = tempfile::tempdir()?;
    let img = ext4_image(d.path())?;
    let a = agent(&[])?;
    let console = boot(
        &a,
        &spec(
            "up1",
            &g,
            192,
            &format!("{DIRTY} tern.disk=1 tern.disk_rate=256 tern.tpm_extend=5 tern.tpm_print=1"),
            &format!(
                "tpm = true\n[[disk]]\npath = {:?}\nformat = \"raw\"\n",
                img.display().to_string()
            ),
        ),
        "TERN-DISK-READY",
    )?;
    let (_, pcr_before) = wait_until("no TERN-PCR line", || pcr16(&console))?;
    ensure!(pcr_before != "0".repeat(64), "PCR 16 was extended");
    let disk_before = wait_until("no TERN-DISK ok line", || disk_seq(&console))?;
    let old_pid = pid_of(&a, "up1")?;
    let old_dir = a.run_dirs().into_iter().next().context("run dir")?;

    let r = upgrade(&a, "up1", json!({}))?;
    eprintln!("upgrade: {r:?}");
    ensure!(r.running, "the VM ran before and runs after");
    ensure!(
        r.ram_pages_copied == 0 && r.ram_bytes_copied == 0 && r.zero_pages == 0,
        "no RAM page crossed: {r:?}"
    );
    ensure!(
        r.stream_bytes > 0 && r.stream_bytes < 4 << 20,
        "only device state crossed: {} bytes",
        r.stream_bytes
    );
    let downtime = r.downtime_ms.context("downtime of a running VM")?;
    ensure!(downtime < 10_000, "downtime {downtime} ms");
    let new_pid = r.new_pid.context("new pid")?;
    ensure!(new_pid != old_pid, "a new QEMU process");
    runs_in(&a, "up1", new_pid)?;
    ensure!(!pid_alive(old_pid), "the old QEMU is gone");
    ensure!(!old_dir.exists(), "the old run directory is removed");

    // the guest goes on in the new QEMU: memory checker, disk writer, TPM
    let console = console_of(&a, "up1")?;
    checker_clean(&console, 0)?;
    let (_, pcr_after) = wait_until("no TERN-PCR line after the upgrade", || pcr16(&console))?;
    assert_eq!(pcr_after, pcr_before, "PCR 16 is the same in the new QEMU");
    let disk_after = wait_until("the disk writer did not go on", || {
        disk_seq(&console).filter(|s| *s > disk_before)
    })?;
    let text = std::fs::read_to_string(&console)?;
    ensure!(
        !text.contains("TERN-DISK-CORRUPT") && !text.contains("TERN-DISK-ERROR"),
        "disk writer: {}",
        tern_testkit::agents::tail(&text, 800)
    );
    eprintln!("disk seq {disk_before} -> {disk_after}");
    // and it can be upgraded again (the new QEMU shares its memory the same way)
    let r2 = upgrade(&a, "up1", json!({}))?;
    ensure!(r2.ram_bytes_copied == 0, "{r2:?}");
    runs_in(&a, "up1", r2.new_pid.context("pid")?)?;
    Ok(())
}

#[test]
#[ignore = "tier vm: needs QEMU 10, the test guest and root (bash scripts/test.sh runs it)"]
fn a_paused_vm_stays_paused_and_its_memory_is_identical_in_the_new_qemu() -> Result<()> {
    let _l = e2e_lock();
    let g = ensure_guest()?;
    let d = tempfile::tempdir()?;
    let a = agent(&[])?;
    boot(&a, &spec("up2", &g, 128, DIRTY, ""), "TERN-READY")?;
    a.qmp("up2", "stop", None)?;
    let size = 128u64 << 20;
    let before = d.path().join("before.ram");
    let after = d.path().join("after.ram");
    a.save_memory("up2", size, &before)?;
    let r = upgrade(&a, "up2", json!({}))?;
    ensure!(!r.running && r.downtime_ms.is_none(), "{r:?}");
    ensure!(a.vm_status("up2")? == "paused", "the VM stays paused");
    a.save_memory("up2", size, &after)?;
    let (x, y) = (std::fs::read(&before)?, std::fs::read(&after)?);
    ensure!(x.len() as u64 == size && y.len() as u64 == size);
    let differ = x
        .chunks(4096)
        .zip(y.chunks(4096))
        .filter(|(p, q)| p != q)
        .count();
    ensure!(differ == 0, "{differ} pages differ after the upgrade");
    ensure!(
        x.chunks(4096).filter(|p| p.iter().any(|b| *b != 0)).count() > 4096,
        "the comparison covered a guest with data"
    );
    a.qmp("up2", "cont", None)?;
    checker_clean(&console_of(&a, "up2")?, 0)?;
    Ok(())
}

#[test]
#[ignore = "tier vm: needs QEMU 10, the test guest and root (bash scripts/test.sh runs it)"]
fn a_new_qemu_that_cannot_take_the_vm_leaves_it_running_in_the_old_one() -> Result<()> {
    let _l = e2e_lock();
    let g = ensure_guest()?;
    let d = tempfile::tempdir()?;
    let a = agent(&[])?;
    let console = boot(&a, &spec("up3", &g, 128, DIRTY, ""), "TERN-READY")?;
    let pid = pid_of(&a, "up3")?;

    let e = upgrade_error(&a, "up3", json!({ "qemu": "/nonexistent/qemu" }))?;
    ensure!(e.contains("/nonexistent/qemu -version"), "{e}");
    runs_in(&a, "up3", pid)?;

    // a binary that says it is QEMU 10 but dies at start-up
    let wrapper = d.path().join("qemu-broken");
    std::fs::write(
        &wrapper,
        "#!/bin/sh\nif [ \"$1\" = -version ]; then exec qemu-system-x86_64 -version; fi\necho 'broken build' >&2\nexit 3\n",
    )?;
    std::fs::set_permissions(
        &wrapper,
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )?;
    let since = console_len(&console);
    let e = upgrade_error(&a, "up3", json!({ "qemu": wrapper }))?;
    ensure!(
        e.contains("new QEMU did not start") && e.contains("broken build"),
        "{e}"
    );
    ensure!(
        e.contains("the VM runs in its old QEMU"),
        "the error says where the VM is: {e}"
    );
    runs_in(&a, "up3", pid)?;
    checker_clean(&console, since)?;

    // private memory cannot be handed over: said before anything starts
    boot(
        &a,
        &spec(
            "up4",
            &g,
            128,
            "tern.workload=idle",
            "memory = \"private\"\n",
        ),
        "TERN-READY",
    )?;
    let e = upgrade_error(&a, "up4", json!({}))?;
    ensure!(e.contains("private memory"), "{e}");
    Ok(())
}

/// An agent with `fault` upgrades a running VM: it fails, and the VM runs on in its old
/// QEMU with every page intact.
fn fault_leaves_the_old_qemu_running(fault: &str, expect: &str) -> Result<()> {
    let _l = e2e_lock();
    let g = ensure_guest()?;
    let a = agent(&[("TERN_FAULT", fault)])?;
    let console = boot(&a, &spec("upf", &g, 128, DIRTY, ""), "TERN-READY")?;
    let pid = pid_of(&a, "upf")?;
    let since = console_len(&console);
    let e = upgrade_error(&a, "upf", json!({}))?;
    ensure!(e.contains(expect), "{e}");
    ensure!(e.contains("the VM runs in its old QEMU"), "{e}");
    runs_in(&a, "upf", pid)?;
    checker_clean(&console, since)?;
    // nothing of the new QEMU is left: one run directory, the old one's
    ensure!(a.run_dirs().len() == 1, "{:?}", a.run_dirs());
    Ok(())
}

#[test]
#[ignore = "tier vm: needs QEMU 10, the test guest and root (bash scripts/test.sh runs it)"]
fn a_cut_device_state_stream_leaves_the_vm_in_its_old_qemu() -> Result<()> {
    fault_leaves_the_old_qemu_running("upgrade-cut-stream", "stream was cut")
}

#[test]
#[ignore = "tier vm: needs QEMU 10, the test guest and root (bash scripts/test.sh runs it)"]
fn a_new_qemu_killed_during_the_hand_over_leaves_the_vm_in_its_old_qemu() -> Result<()> {
    fault_leaves_the_old_qemu_running("upgrade-kill-new-qemu", "upgrade of VM \"upf\" failed")
}

#[test]
#[ignore = "tier vm: needs QEMU 10, the test guest and root (bash scripts/test.sh runs it)"]
fn a_switchover_record_that_cannot_be_written_leaves_the_vm_in_its_old_qemu() -> Result<()> {
    fault_leaves_the_old_qemu_running("fail-switch-record", "cannot record the switchover")
}

#[test]
#[ignore = "tier vm: needs QEMU 10, the test guest and root (bash scripts/test.sh runs it)"]
fn a_new_qemu_that_dies_between_the_commit_and_cont_gives_the_vm_back_to_the_old_one() -> Result<()>
{
    fault_leaves_the_old_qemu_running("upgrade-kill-before-cont", "cont (new QEMU) failed")
}

/// The agent dies at `fault` during an upgrade; the next agent must run the VM exactly
/// once: in the old QEMU (`in_new` false) or in the new one.
fn agent_death_runs_the_vm_once(fault: &str, in_new: bool) -> Result<()> {
    let _l = e2e_lock();
    let g = ensure_guest()?;
    let mut a = agent(&[("TERN_FAULT", fault)])?;
    let console = boot(&a, &spec("upx", &g, 128, DIRTY, ""), "TERN-READY")?;
    let old_pid = pid_of(&a, "upx")?;
    let _ = a.call("POST", "/v1/vms/upx/upgrade", Some(&json!({})));
    wait_exit(&a)?;
    a.kill();
    let qemus: Vec<u32> = a
        .run_dirs()
        .iter()
        .filter_map(|d| std::fs::read_to_string(d.join("qemu.pid")).ok())
        .filter_map(|p| p.trim().parse().ok())
        .filter(|p| pid_alive(*p))
        .collect();
    ensure!(qemus.len() == 2, "both QEMUs are alive: {qemus:?}");
    let new_pid = *qemus.iter().find(|p| **p != old_pid).context("new QEMU")?;
    let b = a.successor(Path::new(BIN))?;
    let (runs, gone) = if in_new {
        (new_pid, old_pid)
    } else {
        (old_pid, new_pid)
    };
    runs_in(&b, "upx", runs)?;
    let deadline = Instant::now() + Duration::from_secs(20);
    while pid_alive(gone) {
        ensure!(Instant::now() < deadline, "the other QEMU is still alive");
        std::thread::sleep(Duration::from_millis(50));
    }
    let console_now = console_of(&b, "upx")?;
    let since = if in_new { 0 } else { console_len(&console) };
    checker_clean(&console_now, since)?;
    Ok(())
}

#[test]
#[ignore = "tier vm: needs QEMU 10, the test guest and root (bash scripts/test.sh runs it)"]
fn an_agent_that_dies_before_the_upgrades_commit_is_followed_by_the_old_qemu_running() -> Result<()>
{
    agent_death_runs_the_vm_once("upgrade-exit-before-commit", false)
}

#[test]
#[ignore = "tier vm: needs QEMU 10, the test guest and root (bash scripts/test.sh runs it)"]
fn an_agent_that_dies_after_the_upgrades_commit_is_followed_by_the_new_qemu_running() -> Result<()>
{
    agent_death_runs_the_vm_once("upgrade-exit-after-commit", true)
}

/// The operator's path (docs/upgrade.md): the agent is replaced by a new binary while the
/// VM runs (it re-attaches), then the VM moves to the new QEMU binary.
#[test]
#[ignore = "tier vm: needs QEMU 10, the test guest and root (bash scripts/test.sh runs it)"]
fn an_operator_upgrades_the_agent_then_qemu_while_the_vm_runs() -> Result<()> {
    let _l = e2e_lock();
    let g = ensure_guest()?;
    let d = tempfile::tempdir()?;
    let mut a = agent(&[])?;
    let console = boot(&a, &spec("up5", &g, 128, DIRTY, ""), "TERN-READY")?;
    let pid = pid_of(&a, "up5")?;
    // 1. the agent: stop the old one (its VMs keep running), start the new binary
    let new_tern = d.path().join("tern-new");
    std::fs::copy(BIN, &new_tern)?;
    a.terminate();
    ensure!(pid_alive(pid), "the VM outlives its agent");
    let b = a.successor(&new_tern)?;
    runs_in(&b, "up5", pid)?;
    // 2. QEMU: the "new" binary (a wrapper in its own path standing in for a new build)
    let new_qemu = d.path().join("qemu-new");
    std::fs::write(&new_qemu, "#!/bin/sh\nexec qemu-system-x86_64 \"$@\"\n")?;
    std::fs::set_permissions(
        &new_qemu,
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )?;
    let r = upgrade(&b, "up5", json!({ "qemu": new_qemu }))?;
    ensure!(r.new_binary == new_qemu, "{r:?}");
    ensure!(r.ram_bytes_copied == 0, "{r:?}");
    let new_pid = r.new_pid.context("pid")?;
    runs_in(&b, "up5", new_pid)?;
    ensure!(!pid_alive(pid), "the re-attached old QEMU is stopped");
    ensure!(
        !console_of(&b, "up5")?.starts_with(console.parent().context("run dir")?),
        "the VM has a new run directory"
    );
    checker_clean(&console_of(&b, "up5")?, 0)?;
    Ok(())
}

/// Shared memory has a price: migrating fills all of it (a read of an untouched shmem
/// page allocates it). A guest larger than this host's available memory is refused
/// before anything moves, instead of the OOM killer taking its QEMU.
#[test]
#[ignore = "tier vm: needs QEMU 10, the test guest and root (bash scripts/test.sh runs it)"]
fn a_shared_memory_guest_too_large_to_fill_here_is_refused_before_it_migrates() -> Result<()> {
    let _l = e2e_lock();
    let g = ensure_guest()?;
    let a = agent(&[])?;
    let b = TestAgent::start(Path::new(BIN), "host-b", &[])?;
    let meminfo = std::fs::read_to_string("/proc/meminfo")?;
    let total_mib: u32 = meminfo
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))
        .and_then(|v| v.split_whitespace().next()?.parse::<u32>().ok())
        .context("MemTotal")?
        >> 10;
    // larger than the host (it boots: untouched memfd pages take no memory)
    let mib = total_mib + 4096;
    boot(
        &a,
        &spec("big", &g, mib, "tern.workload=idle", ""),
        "TERN-READY",
    )?;
    let pid = pid_of(&a, "big")?;
    let id = a.start_migration("big", &b.peer_addr.to_string(), json!({}))?;
    let st = a.wait_migration(&id, Duration::from_secs(60))?;
    let e = st.error.context("the migration must be refused")?;
    ensure!(e.code == "resource-exhausted", "{e:?}");
    ensure!(
        e.message.contains("shared memory") && e.message.contains("MiB available"),
        "{}",
        e.message
    );
    runs_in(&a, "big", pid)?;
    ensure!(b.vms()?.is_empty(), "nothing started at the destination");
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let shmem_mib: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("RssShmem:"))
        .and_then(|v| v.split_whitespace().next()?.parse::<u64>().ok())
        .context("RssShmem")?
        >> 10;
    ensure!(
        shmem_mib < u64::from(total_mib) / 2,
        "QEMU did not start filling the guest's memory: {shmem_mib} MiB resident"
    );
    Ok(())
}

/// `tern vm move --to-agent`: a VM goes to another agent on this host, its memory handed
/// over (QEMU's cpr-transfer across the two agents' QEMUs), its TPM state with it; a
/// receiving agent whose new QEMU dies leaves the VM with the sender.
#[test]
#[ignore = "tier vm: needs QEMU 10, the test guest and root (bash scripts/test.sh runs it)"]
fn a_vm_moves_to_another_agent_on_this_host_without_its_memory_copied() -> Result<()> {
    let _l = e2e_lock();
    let g = ensure_guest()?;
    let a = agent(&[])?;
    let console = boot(
        &a,
        &spec(
            "mv1",
            &g,
            128,
            &format!("{DIRTY} tern.tpm_extend=9 tern.tpm_print=1"),
            "tpm = true\n",
        ),
        "TERN-READY",
    )?;
    let (_, pcr_before) = wait_until("no TERN-PCR line", || pcr16(&console))?;
    let pid = pid_of(&a, "mv1")?;
    let to = |b: &TestAgent| json!({ "agent": format!("unix:{}", b.api.display()) });

    // a receiver whose new QEMU dies once it has the memory: the VM stays here
    let broken = TestAgent::start(
        Path::new(BIN),
        "host-a2",
        &[("TERN_FAULT", "upgrade-kill-new-qemu")],
    )?;
    let since = console_len(&console);
    let e = match a.call("POST", "/v1/vms/mv1/move", Some(&to(&broken))) {
        Ok(v) => bail!("the move succeeded: {v}"),
        Err(e) => format!("{e:#}"),
    };
    ensure!(e.contains("the VM runs in its old QEMU"), "{e}");
    runs_in(&a, "mv1", pid)?;
    ensure!(
        broken.vms()?.is_empty() && broken.run_dirs().is_empty(),
        "the receiver cleaned up"
    );
    checker_clean(&console, since)?;

    // a good receiver takes it
    let b = TestAgent::start(Path::new(BIN), "host-a3", &[])?;
    let v = a
        .call("POST", "/v1/vms/mv1/move", Some(&to(&b)))
        .with_context(|| format!("{}\n{}", logs(&a), logs(&b)))?;
    let r: UpgradeReport = serde_json::from_value(v)?;
    eprintln!("move: {r:?}");
    ensure!(r.ram_bytes_copied == 0 && r.ram_pages_copied == 0, "{r:?}");
    let new_pid = r.new_pid.context("pid")?;
    runs_in(&b, "mv1", new_pid)?;
    ensure!(
        a.vms()?.is_empty() && a.run_dirs().is_empty(),
        "the sender forgot it"
    );
    ensure!(!pid_alive(pid), "the old QEMU is gone");
    let console = console_of(&b, "mv1")?;
    checker_clean(&console, 0)?;
    let (_, pcr_after) = wait_until("no TERN-PCR line after the move", || pcr16(&console))?;
    assert_eq!(pcr_after, pcr_before, "PCR 16 moved with the VM");
    Ok(())
}

/// Where a move between two agents ends when one of them dies at the worst moment: the
/// VM runs exactly once, in the QEMU the commit (the record in the receiver's run
/// directory) says, once the dead agent is back.
fn move_with_a_dying_agent(
    sender_fault: &'static str,
    receiver_fault: &'static str,
    at_receiver: bool,
) -> Result<()> {
    let _l = e2e_lock();
    let g = ensure_guest()?;
    let fault = |f: &'static str| {
        if f.is_empty() {
            vec![]
        } else {
            vec![("TERN_FAULT", f)]
        }
    };
    let mut a = agent(&fault(sender_fault))?;
    let console = boot(&a, &spec("mvd", &g, 128, DIRTY, ""), "TERN-READY")?;
    let old_pid = pid_of(&a, "mvd")?;
    let mut b = TestAgent::start(Path::new(BIN), "host-b", &fault(receiver_fault))?;
    let to = json!({ "agent": format!("unix:{}", b.api.display()) });
    let answer = a.call("POST", "/v1/vms/mvd/move", Some(&to));
    ensure!(answer.is_err(), "the move succeeded: {answer:?}");
    // the new QEMU: the receiver's only run directory's
    let new_pid = |b: &TestAgent| -> Option<u32> {
        b.run_dirs()
            .iter()
            .filter_map(|d| std::fs::read_to_string(d.join("qemu.pid")).ok())
            .filter_map(|p| p.trim().parse().ok())
            .find(|p| pid_alive(*p))
    };
    let (new, a, b) = if !sender_fault.is_empty() {
        wait_exit(&a)?;
        let new = new_pid(&b).context("the receiver's new QEMU")?;
        a.kill();
        (new, a.successor(Path::new(BIN))?, b)
    } else {
        wait_exit(&b)?;
        let new = new_pid(&b).context("the receiver's new QEMU")?;
        b.kill();
        let e = format!("{:#}", answer.unwrap_err());
        let said = if at_receiver {
            "runs in its new QEMU"
        } else {
            "runs in its old QEMU"
        };
        ensure!(e.contains(said), "the sender says where the VM is: {e}");
        let b2 = b.successor(Path::new(BIN))?;
        (new, a, b2)
    };
    let (runs, idle, pid, gone) = if at_receiver {
        (&b, &a, new, old_pid)
    } else {
        (&a, &b, old_pid, new)
    };
    runs_in(runs, "mvd", pid)?;
    // a receiver whose sender died is told to give up by the restarted sender (which
    // waits for that before it runs the VM again); else by its own 60 s commit wait
    let deadline = Instant::now() + Duration::from_secs(20);
    while pid_alive(gone) || !idle.vms()?.is_empty() || !idle.run_dirs().is_empty() {
        ensure!(
            Instant::now() < deadline,
            "the other side still holds the VM: pid {gone} alive {}, vms {:?}, dirs {:?}",
            pid_alive(gone),
            idle.vms()?,
            idle.run_dirs()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let now = console_of(runs, "mvd")?;
    let since = if at_receiver {
        0
    } else {
        console_len(&console)
    };
    checker_clean(&now, since)?;
    ensure!(new != old_pid);
    Ok(())
}

#[test]
#[ignore = "tier vm: needs QEMU 10, the test guest and root (bash scripts/test.sh runs it)"]
fn a_receiving_agent_that_dies_before_the_moves_commit_leaves_the_vm_with_the_sender() -> Result<()>
{
    move_with_a_dying_agent("", "upgrade-exit-before-commit", false)
}

#[test]
#[ignore = "tier vm: needs QEMU 10, the test guest and root (bash scripts/test.sh runs it)"]
fn a_receiving_agent_that_dies_after_the_moves_commit_runs_the_vm_when_it_is_back() -> Result<()> {
    move_with_a_dying_agent("", "upgrade-exit-after-commit", true)
}

#[test]
#[ignore = "tier vm: needs QEMU 10, the test guest and root (bash scripts/test.sh runs it)"]
fn a_sending_agent_that_dies_before_the_moves_commit_gets_its_vm_back_when_it_is_back() -> Result<()>
{
    move_with_a_dying_agent("move-exit-before-commit", "", false)
}

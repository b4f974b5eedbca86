//! Post-copy through tern end to end (increment 1 of issue 16): two real agents, a real
//! QEMU guest (TCG) writing fresh random data faster than the migration may send it. With
//! `postcopy` the guest is never slowed: after the first pass it runs at the destination
//! while the rest of its memory follows through the agents; memory ends exact (digests and
//! the guest's own checker). What post-copy cannot carry is refused before anything moves.

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use serde_json::json;
use tern_testkit::agents::{
    e2e_lock, lab_agents, random_dirtier_runs_on, wait_for_text, TestAgent,
};
use tern_testkit::guest::{ensure_guest, GuestImage};

const BIN: &str = env!("CARGO_BIN_EXE_tern");

/// The migration's cap, MiB/s: the "link" the guest outruns.
const CAP_MIBPS: u64 = 4;

/// A guest rewriting a 32 MiB set with fresh random bytes at about 1.5x the cap
/// (`convergence.rs`'s).
fn random_dirtier(name: &str, g: &GuestImage, extra: &str) -> String {
    format!(
        "name = {name:?}\nmemory_mib = 256\nvcpus = 1\naccel = \"tcg\"\nkernel = {:?}\ninitrd = {:?}\nappend = \"console=ttyS0 panic=-1 tern.workload=random tern.mib=32 tern.rate={} tern.pace=cpu\"\n{extra}",
        g.kernel.display().to_string(),
        g.initrd.display().to_string(),
        CAP_MIBPS * 3 / 2
    )
}

/// The report of a migration that must have succeeded; else what failed, with the logs
/// of the agents that ran it (the source first).
fn report_of(
    st: &tern_api::MigrationStatus,
    what: &str,
    agents: &[&TestAgent],
) -> Result<tern_api::MigrationReport> {
    match &st.report {
        Some(r) => Ok(r.clone()),
        None => {
            let logs: Vec<String> = agents
                .iter()
                .map(|a| format!("{}'s log:\n{}", a.name, a.log_text()))
                .collect();
            bail!("{what} failed: {:?}\n{}", st.error, logs.join("\n"))
        }
    }
}

fn boot(a: &TestAgent, spec: &str) -> Result<std::path::PathBuf> {
    let info = a.start_vm(spec)?;
    let console = std::path::PathBuf::from(info["console_log"].as_str().context("console path")?);
    wait_for_text(&console, "tern-random pass", Duration::from_secs(120))
        .context("the guest did not start dirtying")?;
    Ok(console)
}

#[test]
#[ignore = "tier vm: needs QEMU 10, the test guest, root and /dev/userfaultfd for tern-qemu (scripts/setup.sh; bash scripts/test.sh runs it)"]
fn a_guest_outrunning_the_link_moves_with_postcopy_unslowed_and_memory_exact() -> Result<()> {
    let _l = e2e_lock();
    let g = ensure_guest()?;
    let a = TestAgent::start(Path::new(BIN), "host-a", &[])?;
    let b = TestAgent::start(Path::new(BIN), "host-b", &[])?;
    boot(&a, &random_dirtier("hot", &g, ""))?;
    let t0 = Instant::now();
    let id = a.start_migration(
        "hot",
        &b.peer_addr.to_string(),
        json!({ "max_bandwidth_mibps": CAP_MIBPS, "max_throttle": 0, "postcopy": true }),
    )?;
    let st = a.wait_migration(&id, Duration::from_secs(300))?;
    let r = report_of(&st, "the migration", &[&a, &b])?;
    eprintln!(
        "post-copy: total {} ms, downtime {} ms, post-copy phase {:?} ms, throttle {} %, in {:?}",
        r.total_time_ms,
        r.downtime_ms,
        r.postcopy_ms,
        r.convergence.throttle_max_pct,
        t0.elapsed()
    );
    // the risk was said (the migration's notes)
    assert!(
        st.progress
            .notes
            .iter()
            .any(|n| n.contains("post-copy") && n.contains("lost")),
        "{:?}",
        st.progress.notes
    );
    assert!(r.digest_ok, "{r:?}");
    assert!(r.postcopy, "the report says post-copy was used");
    assert!(r.postcopy_ms.is_some(), "{r:?}");
    // the guest at B touched pages it did not have: the destination counted its requests,
    // and its QEMU measured what they cost the guest
    let f = r
        .postcopy_faults
        .expect("the destination reported post-copy's page faults");
    eprintln!("page faults: {f:?}");
    assert!(f.requests > 0 && f.pages >= f.requests, "{f:?}");
    assert!(
        f.max_vcpu_blocked_ms.is_some() && f.all_vcpus_blocked_ms <= f.max_vcpu_blocked_ms,
        "{f:?}"
    );
    assert_eq!(r.convergence.throttle_max_pct, 0, "never slowed");
    assert_eq!(r.encoding.data_path, "lean", "{:?}", r.encoding);
    // at B, running; gone from A
    assert_eq!(b.vm_status("hot")?, "running");
    let deadline = Instant::now() + Duration::from_secs(10);
    while a.vms()?.iter().any(|v| v["name"] == "hot") {
        assert!(
            Instant::now() < deadline,
            "the VM is still listed at the source"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    // the guest's own checker runs on at the destination and finds no lost page
    random_dirtier_runs_on(&b.console_log("hot")?)
}

/// Waits until `ok` holds for what `agent` says of migration `id` (it must not fail meanwhile).
fn wait_for(
    agent: &TestAgent,
    id: &str,
    within: Duration,
    what: &str,
    ok: impl Fn(&tern_api::MigrationStatus) -> bool,
) -> Result<()> {
    let deadline = Instant::now() + within;
    loop {
        // (the destination knows the migration only from its Prepare on)
        let Ok(st) = agent.migration(id) else {
            ensure!(
                Instant::now() < deadline,
                "{what}: {} never heard of {id}",
                agent.name
            );
            std::thread::sleep(Duration::from_millis(20));
            continue;
        };
        ensure!(
            st.error.is_none(),
            "{what}: the migration failed at {}: {:?}\nits log:\n{}",
            agent.name,
            st.error,
            agent.log_text()
        );
        if ok(&st) {
            return Ok(());
        }
        ensure!(
            Instant::now() < deadline,
            "{what}: not within {within:?} ({:?})",
            st.phase
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
#[ignore = "tier vm: needs QEMU 10, the test guest, root and /dev/userfaultfd for tern-qemu (scripts/setup.sh; bash scripts/test.sh runs it)"]
fn a_10_s_link_cut_during_postcopy_is_resumed_with_memory_exact() -> Result<()> {
    let _l = e2e_lock();
    let g = ensure_guest()?;
    // agents that notice a silent link after 4 s
    let (lab, a, b) = lab_agents(Path::new(BIN))?;
    boot(&a, &random_dirtier("cut", &g, ""))?;
    let id = a.start_migration(
        "cut",
        "198.18.0.2:7700",
        json!({ "max_bandwidth_mibps": CAP_MIBPS, "max_throttle": 0, "postcopy": true }),
    )?;
    // cut as soon as the VM runs at B with pages still at A
    wait_for(
        &b,
        &id,
        Duration::from_secs(120),
        "the VM runs at B",
        |st| st.progress.qemu_status == "postcopy-active",
    )?;
    lab.link_b(false)?;
    let cut = Instant::now();
    // both sides notice, and wait instead of giving up
    let waiting = |st: &tern_api::MigrationStatus| st.phase == tern_api::Phase::WaitingForLink;
    wait_for(
        &a,
        &id,
        Duration::from_secs(9),
        "the source waits for the link",
        waiting,
    )?;
    wait_for(
        &b,
        &id,
        Duration::from_secs(9),
        "the destination waits for the source",
        waiting,
    )?;
    std::thread::sleep(Duration::from_secs(10).saturating_sub(cut.elapsed()));
    lab.link_b(true)?;
    let st = a.wait_migration(&id, Duration::from_secs(240))?;
    let r = report_of(&st, "post-copy after the cut", &[&a, &b])?;
    eprintln!(
        "post-copy cut 10 s: total {} ms, post-copy phase {:?} ms, outages {:?}",
        r.total_time_ms, r.postcopy_ms, r.outages
    );
    assert!(r.postcopy, "{r:?}");
    assert!(r.digest_ok, "{r:?}");
    assert_eq!(
        r.outages.len(),
        1,
        "one break, resumed once: {:?}",
        r.outages
    );
    let o = &r.outages[0];
    assert!(
        (2_000..60_000).contains(&o.waited_ms),
        "waited {} ms for a 10 s cut",
        o.waited_ms
    );
    // the faults' report came over the new connection, and the guest waited the break out
    let f = r
        .postcopy_faults
        .expect("page faults reported after the resume");
    assert!(
        f.requests > 0 && f.max_vcpu_blocked_ms.is_some_and(|ms| ms >= 2_000),
        "{f:?}"
    );
    let incoming = b.migration(&id)?;
    assert!(incoming.report.is_some(), "{:?}", incoming.error);
    assert_eq!(b.vm_status("cut")?, "running");
    // the guest's own checker runs on at B and finds no lost page
    random_dirtier_runs_on(&b.console_log("cut")?)
}

#[test]
#[ignore = "tier vm: needs QEMU 10, the test guest and root (bash scripts/test.sh runs it)"]
fn what_postcopy_cannot_carry_is_refused_before_anything_moves() -> Result<()> {
    let _l = e2e_lock();
    let g = ensure_guest()?;
    let a = TestAgent::start(Path::new(BIN), "host-a", &[])?;
    let b = TestAgent::start(Path::new(BIN), "host-b", &[])?;
    let d = tempfile::tempdir()?;
    let disk = d.path().join("pc.raw");
    std::fs::write(&disk, vec![0u8; 16 << 20])?;
    let with_disk = random_dirtier(
        "pc-disk",
        &g,
        &format!(
            "[[disk]]\npath = {:?}\nformat = \"raw\"\n",
            disk.display().to_string()
        ),
    );
    let shared = random_dirtier("pc-shared", &g, "memory = \"shared\"\n");
    for (vm, spec, says) in [
        ("pc-disk", with_disk, "local disks"),
        ("pc-shared", shared, "shared memory"),
    ] {
        boot(&a, &spec)?;
        let id = a.start_migration(
            vm,
            &b.peer_addr.to_string(),
            json!({ "postcopy": true, "max_throttle": 0 }),
        )?;
        let st = a.wait_migration(&id, Duration::from_secs(60))?;
        let Some(e) = st.error else {
            bail!("{vm}: post-copy was not refused: {:?}", st.report)
        };
        assert_eq!(e.code, "spec-rejected", "{vm}: {e:?}");
        assert!(
            e.message.contains("post-copy") && e.message.contains(says),
            "{vm}: {}",
            e.message
        );
        // nothing moved: the VM runs here, the destination never heard of it
        assert_eq!(a.vm_status(vm)?, "running");
        assert!(b.migrations()?.is_empty(), "{vm}: the destination saw it");
        assert!(b.run_dirs().is_empty());
    }
    // a destination older than protocol v10 is never offered post-copy
    let old = TestAgent::start(Path::new(BIN), "host-c", &[("TERN_PROTOCOL_MAX", "9")])?;
    boot(&a, &random_dirtier("pc-plain", &g, ""))?;
    let id = a.start_migration(
        "pc-plain",
        &old.peer_addr.to_string(),
        json!({ "postcopy": true, "max_throttle": 0 }),
    )?;
    let st = a.wait_migration(&id, Duration::from_secs(60))?;
    let Some(e) = st.error else {
        bail!(
            "post-copy to a v9 destination was not refused: {:?}",
            st.report
        )
    };
    assert!(
        e.message.contains("post-copy") && e.message.contains("v10"),
        "{}",
        e.message
    );
    assert_eq!(e.code, "spec-rejected", "{e:?}");
    assert_eq!(a.vm_status("pc-plain")?, "running");
    assert!(old.run_dirs().is_empty(), "nothing was prepared there");
    // post-copy never slows the guest: a throttle with it is refused, by the API and the CLI
    let err = a
        .call(
            "POST",
            "/v1/vms/pc-shared/migrate",
            Some(&json!({ "to": b.peer_addr.to_string(), "postcopy": true, "max_throttle": 50 })),
        )
        .unwrap_err();
    assert!(format!("{err:#}").contains("--postcopy"), "{err:#}");
    let out = std::process::Command::new(BIN)
        .args(["--agent", &format!("unix:{}", a.api.display())])
        .args([
            "migrate",
            "pc-shared",
            "--to",
            "127.0.0.1:1",
            "--postcopy",
            "--plan",
        ])
        .output()?;
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("--plan"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(a.vm_status("pc-shared")?, "running");
    Ok(())
}

/// How many times the guest's pattern checker passed so far.
fn pattern_rounds(console: &Path) -> Result<usize> {
    let text = std::fs::read_to_string(console)?;
    ensure!(
        !text.contains("TERN-CORRUPT"),
        "the guest lost pages:\n{text}"
    );
    Ok(text.matches("tern-pattern ok round").count())
}

#[test]
#[ignore = "tier vm: needs QEMU 10, the test guest, root and /dev/userfaultfd for tern-qemu (scripts/setup.sh; bash scripts/test.sh runs it)"]
fn a_return_trip_in_postcopy_serves_faults_on_pages_seen_before_from_the_store() -> Result<()> {
    let _l = e2e_lock();
    let g = ensure_guest()?;
    let a = TestAgent::start(Path::new(BIN), "host-a", &[])?;
    let b = TestAgent::start(Path::new(BIN), "host-b", &[])?;
    // beside the random dirtier (which makes post-copy needed), 32 MiB of pattern pages
    // rewritten with the same content at 2 MiB/s: dirty, but content A saw on the way out
    boot(
        &a,
        &random_dirtier("trip", &g, "")
            .replace(" tern.pace=cpu", " tern.pace=cpu tern.pattern=32:2"),
    )?;
    wait_for_text(
        &a.console_log("trip")?,
        "tern-pattern ok round 1",
        Duration::from_secs(60),
    )?;
    // out to B, unhurried on loopback, by the dedup path: A keeps every page it sent
    let out = a.start_migration("trip", &b.peer_addr.to_string(), json!({ "dedup": true }))?;
    let st = a.wait_migration(&out, Duration::from_secs(300))?;
    let r = report_of(&st, "the way out", &[&a, &b])?;
    ensure!(r.digest_ok && !r.postcopy, "{r:?}");
    // back to A in post-copy over a link the guest outruns
    let back = b.start_migration(
        "trip",
        &a.peer_addr.to_string(),
        json!({ "max_bandwidth_mibps": CAP_MIBPS, "max_throttle": 0, "postcopy": true }),
    )?;
    let st = b.wait_migration(&back, Duration::from_secs(300))?;
    let r = report_of(&st, "the way back", &[&b, &a])?;
    let f = r.postcopy_faults.expect("page faults reported");
    eprintln!(
        "way back in post-copy: total {} ms, downtime {} ms, {} pages as references (A held {}), {:.1} MiB on the wire; faults {f:?}",
        r.total_time_ms,
        r.downtime_ms,
        r.pages.refs,
        r.encoding.destination_held_pages,
        r.bytes_on_wire as f64 / 1048576.0
    );
    assert!(r.postcopy && r.digest_ok, "{r:?}");
    // what A held went as references: the pattern's 8192 pages at least (the random set
    // changed since)
    assert!(r.pages.refs >= 8192, "{:?}", r.pages);
    // the guest at A faulted on pattern pages it had rewritten at B; those came from A's
    // store, not across the link
    assert!(f.served_locally > 0 && f.served_locally <= f.pages, "{f:?}");
    assert_eq!(a.vm_status("trip")?, "running");
    // both checkers run on at A and find no lost page
    let console = a.console_log("trip")?;
    let rounds = pattern_rounds(&console)?;
    let deadline = Instant::now() + Duration::from_secs(60);
    while pattern_rounds(&console)? < rounds + 2 {
        ensure!(
            Instant::now() < deadline,
            "the pattern checker stopped at A"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    random_dirtier_runs_on(&console)
}

#[test]
#[ignore = "tier vm: needs QEMU 10, the test guest, root and /dev/userfaultfd for tern-qemu (scripts/setup.sh; bash scripts/test.sh runs it)"]
fn a_guest_the_allowed_throttle_cannot_tame_goes_on_in_postcopy_as_the_last_resort() -> Result<()> {
    let _l = e2e_lock();
    let g = ensure_guest()?;
    let a = TestAgent::start(Path::new(BIN), "host-a", &[])?;
    let b = TestAgent::start(Path::new(BIN), "host-b", &[])?;
    boot(&a, &random_dirtier("resort", &g, ""))?;
    // pre-copy by the dedup path, the guest throttled at most 20% (not enough: it writes
    // at 1.5x the cap), post-copy allowed as the last resort
    let id = a.start_migration(
        "resort",
        &b.peer_addr.to_string(),
        json!({
            "max_bandwidth_mibps": CAP_MIBPS,
            "max_throttle": 20,
            "dedup": true,
            "postcopy_fallback": true,
        }),
    )?;
    let st = a.wait_migration(&id, Duration::from_secs(400))?;
    let r = report_of(&st, "the migration", &[&a, &b])?;
    eprintln!(
        "last resort: total {} ms, downtime {} ms, post-copy phase {:?} ms, steps {:?}, faults {:?}",
        r.total_time_ms, r.downtime_ms, r.postcopy_ms, r.convergence.steps, r.postcopy_faults
    );
    // the risk was said before anything moved, and again when post-copy began
    let notes = &st.progress.notes;
    assert!(
        notes
            .iter()
            .any(|n| n.starts_with("if pre-copy cannot converge")),
        "{notes:?}"
    );
    assert!(
        notes
            .iter()
            .any(|n| n.starts_with("post-copy as the last resort")),
        "{notes:?}"
    );
    assert!(r.postcopy && r.digest_ok, "{r:?}");
    // the throttle came first, as far as allowed, then post-copy
    let c = &r.convergence;
    assert!(
        (1..=20).contains(&c.throttle_max_pct),
        "throttle {}",
        c.throttle_max_pct
    );
    assert!(
        c.steps.first().is_some_and(|s| s.contains("throttle"))
            && c.steps.last().is_some_and(|s| s.contains("post-copy")),
        "{:?}",
        c.steps
    );
    assert!(r.encoding.dedup, "{:?}", r.encoding);
    assert!(r.postcopy_faults.is_some(), "{r:?}");
    assert_eq!(b.vm_status("resort")?, "running");
    random_dirtier_runs_on(&b.console_log("resort")?)
}

#[test]
#[ignore = "tier vm: needs QEMU 10, the test guest, root and /dev/userfaultfd for tern-qemu (scripts/setup.sh; bash scripts/test.sh runs it)"]
fn a_source_agent_killed_during_postcopy_is_followed_by_one_that_resumes_it() -> Result<()> {
    let _l = e2e_lock();
    let g = ensure_guest()?;
    let mut a = TestAgent::start(Path::new(BIN), "host-a", &[])?;
    let b = TestAgent::start(Path::new(BIN), "host-b", &[])?;
    boot(&a, &random_dirtier("crash", &g, ""))?;
    let id = a.start_migration(
        "crash",
        &b.peer_addr.to_string(),
        json!({ "max_bandwidth_mibps": CAP_MIBPS, "max_throttle": 0, "postcopy": true }),
    )?;
    wait_for(
        &b,
        &id,
        Duration::from_secs(120),
        "the VM runs at B",
        |st| st.progress.qemu_status == "postcopy-active",
    )?;
    // the source agent dies (its QEMU lives on, paused on its broken stream); B waits
    a.kill();
    wait_for(
        &b,
        &id,
        Duration::from_secs(30),
        "B waits for the source",
        |st| st.phase == tern_api::Phase::WaitingForLink,
    )?;
    let a2 = a.successor(Path::new(BIN))?;
    let st = a2.wait_migration(&id, Duration::from_secs(300))?;
    let r = report_of(&st, "post-copy resumed by the new agent", &[&a2, &b])?;
    eprintln!(
        "resumed by a new agent: {} ms after it started, outages {:?}, faults {:?}",
        r.total_time_ms, r.outages, r.postcopy_faults
    );
    assert!(r.postcopy, "{r:?}");
    assert_eq!(r.outages.len(), 1, "{:?}", r.outages);
    // the old agent's digest left with it: not compared, and said so
    assert!(!r.digest_ok);
    assert!(
        st.progress
            .notes
            .iter()
            .any(|n| n.contains("restarted during post-copy") && n.contains("cannot be compared")),
        "{:?}",
        st.progress.notes
    );
    assert!(r.postcopy_faults.is_some(), "{r:?}");
    // B completed and runs the VM whole; A let it go
    let incoming = b.migration(&id)?;
    assert!(incoming.report.is_some(), "{:?}", incoming.error);
    assert_eq!(b.vm_status("crash")?, "running");
    let deadline = Instant::now() + Duration::from_secs(10);
    while a2.vms()?.iter().any(|v| v["name"] == "crash") {
        ensure!(Instant::now() < deadline, "the VM is still listed at A");
        std::thread::sleep(Duration::from_millis(50));
    }
    random_dirtier_runs_on(&b.console_log("crash")?)
}

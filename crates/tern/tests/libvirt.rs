//! libvirt domains, migrated by libvirt with tern carrying the stream (`tern migrate
//! --libvirt`): two real libvirtd instances (the distribution's, 11.3 from
//! bookworm-backports) as two hosts on this machine, each with its agent in its mount
//! namespace, a real guest whose memory checker runs through the move.

use std::path::Path;
use std::time::Duration;

use anyhow::{ensure, Context, Result};
use tern_testkit::agents::{checker_clean, e2e_lock, wait_for_text, TestAgent};
use tern_testkit::guest::ensure_guest;
use tern_testkit::libvirt::{test_domain, LibvirtHost, IMAGES};

const BIN: &str = env!("CARGO_BIN_EXE_tern");

/// A libvirt host and its agent (the agent dropped first).
struct Host {
    agent: TestAgent,
    libvirt: LibvirtHost,
}

fn host(name: &str, env: &[(&str, &str)]) -> Result<Host> {
    let libvirt = LibvirtHost::start(name)?;
    let agent = libvirt.start_agent(Path::new(BIN), None, None, env)?;
    Ok(Host { agent, libvirt })
}

/// Starts the test guest's dirtier as a libvirt domain on `h`; its console.
fn boot(h: &Host, name: &str) -> Result<std::path::PathBuf> {
    boot_with(h, name, None)
}

/// The same, with `disk` (a path libvirt sees) as its virtio disk.
fn boot_with(h: &Host, name: &str, disk: Option<&Path>) -> Result<std::path::PathBuf> {
    let g = ensure_guest()?;
    let console = h.libvirt.dir().join(format!("{name}.console"));
    let xml = h.libvirt.dir().join(format!("{name}.xml"));
    std::fs::write(
        &xml,
        test_domain(
            name,
            &g,
            128,
            "tern.workload=dirty tern.mib=32 tern.rate=4",
            &console,
            disk,
        ),
    )?;
    h.libvirt.virsh(&["create", &xml.display().to_string()])?;
    wait_for_text(&console, "tern-dirty pass 1", Duration::from_secs(90))
        .with_context(|| format!("domain {name} did not boot"))?;
    Ok(console)
}

/// The same with the domain's local disks (`--copy-storage`).
fn migrate_with_disks(
    from: &Host,
    to: &Host,
    domain: &str,
) -> Result<(bool, serde_json::Value, String)> {
    to.libvirt.migrate_here_with(
        Path::new(BIN),
        &from.agent,
        &to.agent,
        domain,
        &["--copy-storage"],
    )
}

/// `len` bytes that do not compress (xorshift).
fn noise(len: usize) -> Vec<u8> {
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

/// `tern migrate --libvirt` through the CLI, as an operator runs it.
fn migrate(from: &Host, to: &Host, domain: &str) -> Result<(bool, serde_json::Value, String)> {
    to.libvirt
        .migrate_here(Path::new(BIN), &from.agent, &to.agent, domain)
}

#[test]
#[ignore = "tier vm: needs root, libvirt and QEMU 10 (bash scripts/test.sh runs it)"]
fn a_libvirt_domain_and_its_local_disk_migrate_through_tern_and_libvirt_runs_it_at_the_destination(
) -> Result<()> {
    let _l = e2e_lock();
    let a = host("lv-a", &[])?;
    let b = host("lv-b", &[])?;
    // a 48 MiB disk at the same path on both hosts: half data that does not compress,
    // half text that does
    let disk = Path::new(IMAGES).join("data.raw");
    let mut image = noise(24 << 20);
    let mut n = 0u64;
    while image.len() < 48 << 20 {
        image.extend_from_slice(format!("line {n} of a log file that compresses\n").as_bytes());
        n += 1;
    }
    image.truncate(48 << 20);
    std::fs::write(a.libvirt.images().join("data.raw"), &image)?;
    let console = boot_with(&a, "web", Some(&disk))?;

    // no image at the destination: libvirt refuses, the domain stays where it runs
    let since = std::fs::read(&console)?.len();
    let (ok, failure, stderr) = migrate_with_disks(&a, &b, "web")?;
    ensure!(
        !ok,
        "migrated without an image at the destination: {failure}"
    );
    ensure!(
        failure["error"]["message"]
            .as_str()
            .is_some_and(|m| m.contains("same path and size")),
        "{failure}"
    );
    ensure!(a.libvirt.running()? == vec!["web".to_string()], "{stderr}");
    ensure!(b.libvirt.running()?.is_empty());
    checker_clean(&console, since)?;

    // with an empty image of its size there, the disk moves through tern's tunnels
    let copy = b.libvirt.images().join("data.raw");
    std::fs::write(&copy, vec![0u8; image.len()])?;
    let since = std::fs::read(&console)?.len();
    let (ok, report, stderr) = migrate_with_disks(&a, &b, "web")?;
    ensure!(
        ok,
        "tern migrate --libvirt --copy-storage failed: {stderr}\nsource agent:\n{}\ndestination agent:\n{}",
        a.agent.log_text(),
        b.agent.log_text()
    );
    // tern carried the memory: pages through its data path, both digests equal
    ensure!(report["outcome"] == "succeeded", "{report}");
    ensure!(report["digest_ok"] == true, "{report}");
    let pages = report["pages"]["total"].as_u64().unwrap_or(0);
    ensure!(
        pages >= 128 * 256 / 2,
        "only {pages} pages crossed: {report}"
    );
    // and the disk: every byte of it through one tunnel (libvirt's one NBD connection)
    let sent = report["disk"]["sent_bytes"].as_u64().unwrap_or(0);
    ensure!(
        sent >= image.len() as u64,
        "the tunnels carried {sent} bytes of a {} byte disk: {report}",
        image.len()
    );
    ensure!(report["disk"]["disks"] == 1, "{report}");
    // compressed on the way: the text half shrank
    let wire = report["disk"]["wire_bytes"].as_u64().unwrap_or(0);
    ensure!(
        wire > 0 && wire < sent - (16 << 20),
        "the tunnel's {wire} bytes on the wire for {sent} bytes of disk: {report}"
    );
    ensure!(
        report["bytes_on_wire"].as_u64().unwrap_or(0) > sent,
        "{report}"
    );
    eprintln!(
        "with its disk: total {} ms, downtime {} ms, disk {sent} bytes",
        report["total_time_ms"], report["downtime_ms"]
    );
    // libvirt measured the pause, and tern reports it
    ensure!(report["qemu_downtime_ms"].as_u64().is_some(), "{report}");
    // libvirt runs it at the destination and no longer at the source
    ensure!(b.libvirt.running()? == vec!["web".to_string()]);
    ensure!(a.libvirt.running()?.is_empty(), "{:?}", a.libvirt.running());
    // and the guest goes on there with every page it had, on the same disk
    checker_clean(&console, since)?;
    ensure!(
        std::fs::read(&copy)? == image,
        "the destination's image is not the source's"
    );
    // the destination agent saw the same migration
    let incoming = b.agent.migrations()?;
    ensure!(
        incoming
            .iter()
            .any(|m| m.vm == "web" && m.finished && m.error.is_none()),
        "{incoming:?}"
    );
    // and back, the same way (the source kept its image)
    std::fs::write(a.libvirt.images().join("data.raw"), vec![0u8; image.len()])?;
    let since = std::fs::read(&console)?.len();
    let (ok, report, stderr) = migrate_with_disks(&b, &a, "web")?;
    ensure!(ok, "the way back failed: {stderr}");
    ensure!(report["digest_ok"] == true, "{report}");
    ensure!(a.libvirt.running()? == vec!["web".to_string()]);
    checker_clean(&console, since)?;
    ensure!(std::fs::read(a.libvirt.images().join("data.raw"))? == image);
    Ok(())
}

#[test]
#[ignore = "tier vm: needs root, libvirt and QEMU 10 (bash scripts/test.sh runs it)"]
fn a_libvirt_migration_whose_memory_arrives_wrong_leaves_the_domain_running_at_the_source(
) -> Result<()> {
    let _l = e2e_lock();
    let a = host("lv-c", &[])?;
    // the destination corrupts one page it writes to its QEMU
    let b = host("lv-d", &[("TERN_FAULT", "corrupt-page")])?;
    let console = boot(&a, "db")?;
    let since = std::fs::read(&console)?.len();
    let (ok, failure, stderr) = migrate(&a, &b, "db")?;
    ensure!(
        !ok,
        "the migration succeeded with a corrupted page: {failure}"
    );
    ensure!(
        stderr.contains("digest-mismatch"),
        "not refused for its digest: {stderr}"
    );
    // libvirt keeps it running where it was; nothing of it runs at the destination
    ensure!(a.libvirt.running()? == vec!["db".to_string()], "{stderr}");
    ensure!(b.libvirt.running()?.is_empty(), "{:?}", b.libvirt.running());
    checker_clean(&console, since)?;
    // and a second try, without the fault, moves it
    drop(b);
    let b = host("lv-e", &[])?;
    let since = std::fs::read(&console)?.len();
    let (ok, _, stderr) = migrate(&a, &b, "db")?;
    ensure!(ok, "{stderr}");
    ensure!(b.libvirt.running()? == vec!["db".to_string()]);
    checker_clean(&console, since)?;
    Ok(())
}

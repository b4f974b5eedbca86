//! `tern-bench libvirt`: a libvirt domain migrated by libvirt alone (`virsh migrate --live`
//! over TCP, QEMU's stream as is) against the same domain migrated by libvirt with tern
//! carrying the stream (`tern migrate --libvirt`), across the emulated WAN of
//! `scripts/wan.sh`, in the same run: two libvirtd (the distribution's) in the lab's two
//! host namespaces, each with its agent. The domain runs the test guest's realistic
//! memory (page cache, processes), idle. Trips alternate A -> B and back: tern's first
//! trip, libvirt's, then tern's second (its destination then holds the pages of its
//! first: what a return trip costs).
//!
//! Usage: tern-bench libvirt --tern target/release/tern [--profile wan-100m-50ms]
//! [--mem-mib 512] [--fill-mib 256] [--out FILE]

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use tern_testkit::agents::{wait_for_text, TestAgent, WanLab};
use tern_testkit::guest::GuestImage;
use tern_testkit::libvirt::{test_domain, LibvirtHost};

struct Host {
    agent: TestAgent,
    libvirt: LibvirtHost,
    ip: &'static str,
}

struct Trip {
    label: String,
    total_s: f64,
    downtime_ms: Option<u64>,
    link_mb: f64,
}

fn host(bin: &Path, name: &str, ns: &str, ip: &'static str) -> Result<Host> {
    let libvirt = LibvirtHost::start_in(name, Some(ns))?;
    let agent = libvirt.start_agent(bin, Some(ns), Some(format!("{ip}:7700").parse()?), &[])?;
    Ok(Host { agent, libvirt, ip })
}

/// libvirt's own measure of the pause, at the destination.
fn libvirt_downtime(to: &Host, dom: &str) -> Option<u64> {
    let text = to.libvirt.virsh(&["domjobinfo", "--completed", dom]).ok()?;
    tern_agent::libvirt::parse_job(&text).downtime_ms
}

fn direct(from: &Host, to: &Host, dom: &str) -> Result<Trip> {
    let link0 = WanLab::link_bytes()?;
    let t0 = Instant::now();
    from.libvirt.virsh(&[
        "migrate",
        "--live",
        dom,
        &to.libvirt.uri(),
        "--migrateuri",
        &format!("tcp://{}:49152", to.ip),
    ])?;
    let total_s = t0.elapsed().as_secs_f64();
    Ok(Trip {
        label: format!(
            "libvirt direct ({} -> {})",
            from.libvirt.name, to.libvirt.name
        ),
        total_s,
        downtime_ms: libvirt_downtime(to, dom),
        link_mb: (WanLab::link_bytes()? - link0) as f64 / 1e6,
    })
}

fn carried(bin: &Path, from: &Host, to: &Host, dom: &str, label: &str) -> Result<Trip> {
    let link0 = WanLab::link_bytes()?;
    let t0 = Instant::now();
    let (ok, r, stderr) = to.libvirt.migrate_here(bin, &from.agent, &to.agent, dom)?;
    let total_s = t0.elapsed().as_secs_f64();
    if !ok {
        bail!("tern migrate --libvirt failed: {stderr}");
    }
    ensure!(r["digest_ok"] == true, "{r}");
    Ok(Trip {
        label: format!(
            "tern carrying libvirt's stream, {label} ({} -> {})",
            from.libvirt.name, to.libvirt.name
        ),
        total_s,
        downtime_ms: r["qemu_downtime_ms"].as_u64(),
        link_mb: (WanLab::link_bytes()? - link0) as f64 / 1e6,
    })
}

pub fn bench(bin: &Path, g: &GuestImage, profile: &str, mem: u32, fill: u32) -> Result<String> {
    let lab = WanLab::up(profile)?;
    let a = host(bin, "lv-host-a", "tern-a", "198.18.0.1")?;
    let b = host(bin, "lv-host-b", "tern-b", "198.18.0.2")?;
    let dom = "bench";
    let console = a.libvirt.dir().join("bench.console");
    let xml = a.libvirt.dir().join("bench.xml");
    std::fs::write(
        &xml,
        test_domain(
            dom,
            g,
            mem,
            &format!("tern.workload=realistic tern.mib={fill} tern.seed=1"),
            &console,
            None,
        ),
    )?;
    a.libvirt.virsh(&["create", &xml.display().to_string()])?;
    wait_for_text(&console, "TERN-READY", Duration::from_secs(900))
        .context("the domain did not fill its memory")?;
    let trips = vec![
        carried(bin, &a, &b, dom, "first trip")?,
        direct(&b, &a, dom)?,
        carried(bin, &a, &b, dom, "second trip")?,
    ];
    let text = std::fs::read_to_string(&console)?;
    ensure!(!text.contains("TERN-CORRUPT"), "the guest lost pages");
    drop(lab);
    let direct_trip = &trips[1];
    let mut out = format!(
        "libvirt 11.3 (bookworm-backports) on both hosts, QEMU 10.0.2, TCG; link {profile} (scripts/wan.sh); domain {mem} MiB, {fill} MiB of realistic memory, idle.\n\n\
         | trip | total s | downtime ms (libvirt's) | MB on the link | total vs libvirt direct | link vs libvirt direct |\n|---|---|---|---|---|---|\n"
    );
    for t in &trips {
        out.push_str(&format!(
            "| {} | {:.1} | {} | {:.1} | {:.2}x | {:.2}x |\n",
            t.label,
            t.total_s,
            t.downtime_ms.map_or("?".into(), |d| d.to_string()),
            t.link_mb,
            t.total_s / direct_trip.total_s,
            t.link_mb / direct_trip.link_mb,
        ));
    }
    Ok(out)
}

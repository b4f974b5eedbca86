//! `tern-bench libvirt`: a libvirt domain migrated by libvirt alone (`virsh migrate --live`
//! over TCP, QEMU's stream as is) against the same domain migrated by libvirt with tern
//! carrying the stream (`tern migrate --libvirt`), across the emulated WAN of
//! `scripts/wan.sh`, in the same run: two libvirtd (the distribution's) in the lab's two
//! host namespaces, each with its agent. The domain runs the test guest's realistic
//! memory (page cache, processes), idle. Trips alternate A -> B and back: tern's first
//! trip, libvirt's, then tern's second (its destination then holds the pages of its
//! first: what a return trip costs). With `--disk-mib N` the domain has a local disk of
//! N MiB that reads like a used file system (this machine's /usr files, a quarter left
//! unwritten) and every trip moves it too: libvirt alone over NBD on TCP
//! (`--copy-storage-all --disks-uri tcp://`), tern with `--copy-storage` (libvirt's NBD
//! through tern's storage tunnels).
//!
//! Usage: tern-bench libvirt --tern target/release/tern [--profile wan-100m-50ms]
//! [--mem-mib 512] [--fill-mib 256] [--disk-mib N] [--out FILE]

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use tern_testkit::agents::{wait_for_text, TestAgent, WanLab};
use tern_testkit::guest::GuestImage;
use tern_testkit::libvirt::{test_domain, LibvirtHost, IMAGES};

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

fn direct(from: &Host, to: &Host, dom: &str, disks: bool) -> Result<Trip> {
    let link0 = WanLab::link_bytes()?;
    let t0 = Instant::now();
    let mut args = vec![
        "migrate".to_string(),
        "--live".into(),
        dom.into(),
        to.libvirt.uri(),
        "--migrateuri".into(),
        format!("tcp://{}:49152", to.ip),
    ];
    if disks {
        args.extend([
            "--copy-storage-all".into(),
            "--disks-uri".into(),
            format!("tcp://{}:49153", to.ip),
        ]);
    }
    from.libvirt
        .virsh(&args.iter().map(String::as_str).collect::<Vec<_>>())?;
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

fn carried(
    bin: &Path,
    from: &Host,
    to: &Host,
    dom: &str,
    label: &str,
    disks: bool,
) -> Result<Trip> {
    let link0 = WanLab::link_bytes()?;
    let t0 = Instant::now();
    let extra: &[&str] = if disks { &["--copy-storage"] } else { &[] };
    let (ok, r, stderr) = to
        .libvirt
        .migrate_here_with(bin, &from.agent, &to.agent, dom, extra)?;
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

/// A raw disk of `mib` MiB that reads like a used file system: its first three quarters
/// this machine's /usr files one after another (programs, libraries, text, in path
/// order), the rest never written. Returns the bytes written.
fn system_disk(path: &Path, mib: u64) -> Result<u64> {
    let size = mib << 20;
    let want = size / 4 * 3;
    let mut out = std::fs::File::create(path)?;
    let mut written = 0u64;
    let mut dirs = vec![PathBuf::from("/usr/lib"), PathBuf::from("/usr/share")];
    let mut buf = Vec::new();
    'walk: while let Some(d) = dirs.pop() {
        let Ok(rd) = std::fs::read_dir(&d) else {
            continue;
        };
        let mut entries: Vec<_> = rd.flatten().map(|e| e.path()).collect();
        entries.sort();
        for p in entries.into_iter().rev() {
            let Ok(meta) = std::fs::symlink_metadata(&p) else {
                continue;
            };
            if meta.is_dir() {
                dirs.push(p);
            } else if meta.is_file() {
                buf.clear();
                let Ok(mut f) = std::fs::File::open(&p) else {
                    continue;
                };
                if f.read_to_end(&mut buf).is_err() {
                    continue;
                }
                let take = buf.len().min((want - written) as usize);
                out.write_all(&buf[..take])?;
                written += take as u64;
                if written >= want {
                    break 'walk;
                }
            }
        }
    }
    out.set_len(size)?;
    Ok(written)
}

pub fn bench(
    bin: &Path,
    g: &GuestImage,
    profile: &str,
    mem: u32,
    fill: u32,
    disk_mib: Option<u64>,
) -> Result<String> {
    let lab = WanLab::up(profile)?;
    let a = host(bin, "lv-host-a", "tern-a", "198.18.0.1")?;
    let b = host(bin, "lv-host-b", "tern-b", "198.18.0.2")?;
    let dom = "bench";
    let disk = IMAGES.to_string() + "/bench.raw";
    let disk_note = match disk_mib {
        Some(mib) => {
            let data = system_disk(&a.libvirt.images().join("bench.raw"), mib)?;
            // the destination's image: the same size, empty (as libvirt wants it)
            std::fs::File::create(b.libvirt.images().join("bench.raw"))?.set_len(mib << 20)?;
            format!(
                "; a {mib} MiB local disk with {:.0} MiB of /usr's files (zstd -1 takes them to about {:.0}%), moved on every trip",
                data as f64 / 1048576.0,
                100.0 * zstd_ratio(&a.libvirt.images().join("bench.raw"), data)?
            )
        }
        None => String::new(),
    };
    let disks = disk_mib.is_some();
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
            disks.then_some(Path::new(&disk)),
        ),
    )?;
    a.libvirt.virsh(&["create", &xml.display().to_string()])?;
    wait_for_text(&console, "TERN-READY", Duration::from_secs(900))
        .context("the domain did not fill its memory")?;
    let trips = vec![
        carried(bin, &a, &b, dom, "first trip", disks)?,
        direct(&b, &a, dom, disks)?,
        carried(bin, &a, &b, dom, "second trip", disks)?,
    ];
    let text = std::fs::read_to_string(&console)?;
    ensure!(!text.contains("TERN-CORRUPT"), "the guest lost pages");
    drop(lab);
    let direct_trip = &trips[1];
    let mut out = format!(
        "libvirt 11.3 (bookworm-backports) on both hosts, QEMU 10.0.2, TCG; link {profile} (scripts/wan.sh); domain {mem} MiB, {fill} MiB of realistic memory, idle{disk_note}.\n\n\
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

/// What zstd -1 makes of the first `len` bytes of `path`, as a fraction.
fn zstd_ratio(path: &Path, len: u64) -> Result<f64> {
    let mut data = vec![0u8; len as usize];
    std::fs::File::open(path)?.read_exact(&mut data)?;
    let packed = zstd::bulk::compress(&data, 1)?;
    Ok(packed.len() as f64 / len.max(1) as f64)
}

//! `tern-bench disk`: moving a VM's local disk across the emulated WAN of `scripts/wan.sh`,
//! tern against QEMU's own way, same VM, same link, same run.
//!
//! QEMU's way is what libvirt does for non-shared storage (`virsh migrate
//! --copy-storage-all`): the destination QEMU starts `-incoming defer -S` on a blank image
//! of the same size and exports it writable on its NBD server (TCP, inside host B); the
//! source QEMU adds an `nbd` block node for that export and runs `blockdev-mirror
//! sync=full` into it; at `BLOCK_JOB_READY` it migrates memory over TCP across the same
//! link; once memory is `completed` the source cancels the job (keeping its image), the
//! destination removes its export, stops its NBD server and runs (`cont`).
//!
//! tern's way: two agents in the lab's namespaces; the destination agent first imports
//! the image it holds (`POST /v1/images`), then the source agent migrates the VM, disk
//! included, and reports what the disk cost (`report.disk`, a `DiskReport`).
//!
//! Three disks (deterministic data from a seed; random data is incompressible):
//! - `base` (a): a qcow2 overlay on a base image (75% of its 64 KiB clusters random, the
//!   rest zero) with ~2% of the disk written into the overlay; the destination holds a copy
//!   of the base (another file, same content).
//! - `partial` (b): a flat qcow2, all data; its first 70% is content of an image the
//!   destination holds, found there at another offset (shifted by some MiB, 4 KiB
//!   aligned), the rest fresh random.
//! - `random` (c): a flat qcow2 of fresh random data; the destination holds nothing.
//!
//! Measured for both ways alike: bytes through host A's side of the link (both
//! directions, TCP/IP headers included) in the disk phase and in total, the disk phase's
//! time, the total time, and downtime (source QEMU's STOP event to the destination QEMU's
//! RESUME event). The disk phase is, for QEMU, `blockdev-add` of the NBD node to
//! `BLOCK_JOB_READY`; for tern, the request to the first memory bytes (the agent copies the
//! disk before memory moves). Each run ends with `qemu-img compare` of the source's image
//! against the destination's.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use serde_json::{json, Value};
use tern_qemu::disk as qdisk;
use tern_qemu::launch::{LaunchOptions, QemuProcess};
use tern_qemu::qmp::QmpEvent;
use tern_qemu::spec::{DiskFormat, DiskSpec, VmSpec};
use tern_testkit::agents::{wait_for_text, TestAgent, WanLab};
use tern_testkit::guest::GuestImage;
use tokio::sync::broadcast;

use super::wan::{self, qemu_in};
use super::{event_us, median};

/// qcow2's default cluster: the unit of the base image's data/zero layout.
const CLUSTER: u64 = 64 << 10;
/// tern-chunks' block: shifts stay aligned to it, so content addressing can match.
const BLOCK: u64 = 4 << 10;
const GUEST_MIB: u32 = 128;
const GUEST_APPEND: &str = "tern.workload=idle";
/// Host B's addresses for QEMU's way.
const DST_IP: &str = "198.18.0.2";
const NBD_PORT: &str = "10809";
const MIGRATE_URI: &str = "tcp:198.18.0.2:4444";
const MIRROR_JOB: &str = "mirror-disk0";
const MIRROR_NODE: &str = "mirror-dst";
const TERN_VM: &str = "disk-vm";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scenario {
    Base,
    Partial,
    Random,
}

impl Scenario {
    fn parse(s: &str) -> Result<Scenario> {
        Ok(match s {
            "a" | "base" => Scenario::Base,
            "b" | "partial" => Scenario::Partial,
            "c" | "random" => Scenario::Random,
            _ => bail!("--scenario: a|b|c (base, partial, random), got {s:?}"),
        })
    }

    fn letter(self) -> &'static str {
        match self {
            Scenario::Base => "a",
            Scenario::Partial => "b",
            Scenario::Random => "c",
        }
    }

    fn name(self) -> &'static str {
        match self {
            Scenario::Base => "base",
            Scenario::Partial => "partial",
            Scenario::Random => "random",
        }
    }

    /// (what, limit): tern/QEMU ratios that must not exceed the limit.
    fn targets(self) -> &'static [(Metric, f64)] {
        match self {
            Scenario::Base => &[(Metric::DiskBytes, 0.10)],
            // the published -59% is the storage migration's time; the whole migration's is
            // shown beside it
            Scenario::Partial => &[
                (Metric::DiskBytes, 0.34),
                (Metric::DiskTime, 0.41),
                (Metric::TotalTime, 0.41),
            ],
            Scenario::Random => &[(Metric::DiskBytes, 1.02)],
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Metric {
    DiskBytes,
    DiskTime,
    TotalTime,
}

impl Metric {
    fn label(self) -> &'static str {
        match self {
            Metric::DiskBytes => "disk-phase bytes on the link",
            Metric::DiskTime => "disk-phase time (the storage migration)",
            Metric::TotalTime => "total time (the whole migration, memory included)",
        }
    }

    fn of(self, r: &Summary) -> f64 {
        match self {
            Metric::DiskBytes => r.disk_link,
            Metric::DiskTime => r.disk_s,
            Metric::TotalTime => r.total_s,
        }
    }
}

pub struct Options {
    pub link: String,
    pub rounds: usize,
    pub disk_mib: u64,
    /// Run only QEMU's way or only tern's.
    pub only: Option<Side>,
    pub scenarios: Vec<Scenario>,
    pub limit: Duration,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    Qemu,
    Tern,
}

impl Options {
    /// From the command line (`arg("--rounds")` gives the value after `--rounds`).
    pub fn parse(arg: impl Fn(&str) -> Option<String>) -> Result<Options> {
        let only = match arg("--only").as_deref() {
            None => None,
            Some("qemu") => Some(Side::Qemu),
            Some("tern") => Some(Side::Tern),
            Some(o) => bail!("--only: qemu|tern, got {o:?}"),
        };
        let scenarios = match arg("--scenario") {
            None => vec![Scenario::Base, Scenario::Partial, Scenario::Random],
            Some(s) => s
                .split(',')
                .map(|x| Scenario::parse(x.trim()))
                .collect::<Result<_>>()?,
        };
        let disk_mib: u64 = arg("--disk-mib")
            .map(|m| m.parse())
            .transpose()
            .context("--disk-mib")?
            .unwrap_or(256);
        ensure!((16..=1 << 20).contains(&disk_mib), "--disk-mib: 16 or more");
        Ok(Options {
            link: arg("--link").unwrap_or_else(|| "wan-100m-50ms".into()),
            rounds: arg("--rounds")
                .map(|r| r.parse())
                .transpose()
                .context("--rounds")?
                .unwrap_or(1)
                .max(1),
            disk_mib,
            only,
            scenarios,
            limit: Duration::from_secs(
                arg("--limit-secs")
                    .map(|r| r.parse())
                    .transpose()
                    .context("--limit-secs")?
                    .unwrap_or(600),
            ),
        })
    }
}

/// Appends the bench's output to `path` (`--out`).
pub fn append(path: &str, text: &str) -> Result<()> {
    use std::io::Write;
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .with_context(|| format!("opening {path}"))?;
    f.write_all(text.as_bytes())
        .with_context(|| format!("writing {path}"))
}

// ---- data -----------------------------------------------------------------------------

/// xorshift64* seeded through splitmix64: fast, deterministic, and its output does not
/// compress (lz4, zstd find nothing to take out).
struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Rng {
        let mut z = seed.wrapping_add(0x9E37_79B9_7F4A_7C15);
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        Rng((z ^ (z >> 31)) | 1)
    }

    fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    fn below(&mut self, n: u64) -> u64 {
        // the high bits (xorshift's low bits are its weakest)
        ((self.next() as u128 * n as u128) >> 64) as u64
    }

    fn fill(&mut self, buf: &mut [u8]) {
        for c in buf.chunks_mut(8) {
            let v = self.next().to_le_bytes();
            c.copy_from_slice(&v[..c.len()]);
        }
    }
}

/// Writes `len` random bytes at `off`.
fn write_random(f: &File, off: u64, len: u64, rng: &mut Rng) -> Result<()> {
    let mut buf = vec![0u8; (1 << 20).min(len) as usize];
    let mut at = 0;
    while at < len {
        let n = (len - at).min(buf.len() as u64) as usize;
        rng.fill(&mut buf[..n]);
        f.write_all_at(&buf[..n], off + at)?;
        at += n as u64;
    }
    Ok(())
}

/// Copies `len` bytes of `from` at `from_off` into `to` at `to_off`.
fn copy_range(from: &File, from_off: u64, to: &File, to_off: u64, len: u64) -> Result<()> {
    let mut buf = vec![0u8; 1 << 20];
    let mut at = 0;
    while at < len {
        let n = (len - at).min(buf.len() as u64) as usize;
        from.read_exact_at(&mut buf[..n], from_off + at)?;
        to.write_all_at(&buf[..n], to_off + at)?;
        at += n as u64;
    }
    Ok(())
}

fn run_ok(cmd: &mut Command) -> Result<String> {
    let out = cmd.output().with_context(|| format!("running {cmd:?}"))?;
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    ensure!(out.status.success(), "{cmd:?} failed: {}", text.trim());
    Ok(text)
}

/// A raw file becomes a flat qcow2 (`qemu-img convert` leaves zero clusters unallocated);
/// the raw file goes.
fn raw_to_qcow2(raw: &Path, qcow2: &Path) -> Result<()> {
    run_ok(
        Command::new(qdisk::qemu_img_binary())
            .args(["convert", "-q", "-f", "raw", "-O", "qcow2"])
            .arg(raw)
            .arg(qcow2),
    )?;
    std::fs::remove_file(raw)?;
    Ok(())
}

/// A scenario's images.
struct Images {
    /// The VM's disk on the source (top of its chain), qcow2.
    source: PathBuf,
    /// What the destination's agent holds (imported before tern's run).
    library: Option<PathBuf>,
    virtual_size: u64,
    description: String,
}

fn build_images(sc: Scenario, dir: &Path, size: u64) -> Result<Images> {
    std::fs::create_dir_all(dir)?;
    let mib = |b: u64| b as f64 / 1048576.0;
    match sc {
        Scenario::Base => {
            let raw = dir.join("base.raw");
            let f = File::create(&raw)?;
            f.set_len(size)?;
            let mut rng = Rng::new(0xA11CE);
            let clusters = size / CLUSTER;
            let mut data = 0u64;
            for c in 0..clusters {
                if rng.below(4) != 0 {
                    write_random(&f, c * CLUSTER, CLUSTER, &mut rng)?;
                    data += 1;
                }
            }
            drop(f);
            let base = dir.join("base.qcow2");
            raw_to_qcow2(&raw, &base)?;
            // the destination's copy: another file, same content
            let library = dir.join("library-base.qcow2");
            std::fs::copy(&base, &library)?;
            let overlay = dir.join("overlay.qcow2");
            run_ok(
                Command::new(qdisk::qemu_img_binary())
                    .args(["create", "-q", "-f", "qcow2", "-F", "qcow2", "-b"])
                    .arg(&base)
                    .arg(&overlay),
            )?;
            // ~2% of the disk written into the overlay, in 8 extents anywhere on the disk
            let extents = 8u64;
            let ext = ((size / 50 / extents) / CLUSTER * CLUSTER).max(CLUSTER);
            let mut cmd = Command::new("qemu-io");
            cmd.args(["-f", "qcow2"]).arg(&overlay);
            let mut files = Vec::new();
            for k in 0..extents {
                let off = rng.below((size - ext) / CLUSTER) * CLUSTER;
                let p = dir.join(format!("overlay-{k}.bin"));
                let f = File::create(&p)?;
                write_random(&f, 0, ext, &mut rng)?;
                cmd.arg("-c")
                    .arg(format!("write -q -s {} {off} {ext}", p.display()));
                files.push(p);
            }
            run_ok(&mut cmd)?;
            for p in files {
                std::fs::remove_file(p)?;
            }
            Ok(Images {
                source: overlay,
                library: Some(library),
                virtual_size: size,
                description: format!(
                    "a qcow2 overlay on a {:.0} MiB base image ({:.0}% of its 64 KiB clusters random, the rest zero), \
                     {:.2} MiB written into the overlay before the VM starts ({extents} extents); the destination \
                     holds a copy of the base image",
                    mib(size),
                    100.0 * data as f64 / clusters.max(1) as f64,
                    mib(ext * extents)
                ),
            })
        }
        Scenario::Partial => {
            // The destination's image: all random. The disk: 70% of it is that image's
            // content shifted by `shift`, the rest fresh random.
            let lib_raw = dir.join("library.raw");
            let lib = std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(true)
                .open(&lib_raw)?;
            lib.set_len(size)?;
            write_random(&lib, 0, size, &mut Rng::new(0xB0B))?;
            let shared = (size * 7 / 10) / CLUSTER * CLUSTER;
            let shift = ((size - shared) / 2) / BLOCK * BLOCK + BLOCK;
            ensure!(shift + shared <= size, "disk too small for the shift");
            let raw = dir.join("disk.raw");
            let f = File::create(&raw)?;
            f.set_len(size)?;
            copy_range(&lib, shift, &f, 0, shared)?;
            write_random(&f, shared, size - shared, &mut Rng::new(0xB0B02))?;
            drop((f, lib));
            let disk = dir.join("disk.qcow2");
            raw_to_qcow2(&raw, &disk)?;
            let library = dir.join("library.qcow2");
            raw_to_qcow2(&lib_raw, &library)?;
            Ok(Images {
                source: disk,
                library: Some(library),
                virtual_size: size,
                description: format!(
                    "a flat qcow2 of {:.0} MiB, all data: its first {:.1} MiB ({:.0}%) are found in an image the \
                     destination holds {:.2} MiB further on (not at the same offsets), the rest is fresh random",
                    mib(size),
                    mib(shared),
                    100.0 * shared as f64 / size as f64,
                    mib(shift)
                ),
            })
        }
        Scenario::Random => {
            let raw = dir.join("disk.raw");
            let f = File::create(&raw)?;
            f.set_len(size)?;
            write_random(&f, 0, size, &mut Rng::new(0xC0FFEE))?;
            drop(f);
            let disk = dir.join("disk.qcow2");
            raw_to_qcow2(&raw, &disk)?;
            Ok(Images {
                source: disk,
                library: None,
                virtual_size: size,
                description: format!(
                    "a flat qcow2 of {:.0} MiB of fresh random data; the destination holds nothing related",
                    mib(size)
                ),
            })
        }
    }
}

/// The source image for one run: a copy of the scenario's top image (an overlay keeps
/// pointing at its base), so every run starts from the same bytes.
fn run_copy(img: &Images, dir: &Path) -> Result<PathBuf> {
    std::fs::create_dir_all(dir)?;
    let p = dir.join("source.qcow2");
    std::fs::copy(&img.source, &p).with_context(|| format!("copying {}", img.source.display()))?;
    Ok(p)
}

fn vm_spec(name: &str, g: &GuestImage, disk: &Path) -> VmSpec {
    let mut s = wan::vm_spec(name, g, GUEST_MIB, GUEST_APPEND);
    s.disks = vec![DiskSpec {
        path: disk.to_path_buf(),
        format: DiskFormat::Qcow2,
        shared: false,
        sample: None,
    }];
    s
}

// ---- measuring ------------------------------------------------------------------------

/// `qemu-img compare` of the source's image (its whole chain) against the destination's.
fn compare_images(src: &Path, dst: &Path, dst_format: &str) -> String {
    let out = Command::new(qdisk::qemu_img_binary())
        .args(["compare", "-U", "-f", "qcow2", "-F", dst_format])
        .arg(src)
        .arg(dst)
        .output();
    match out {
        Ok(o) => {
            let text = format!(
                "{}{}",
                String::from_utf8_lossy(&o.stdout),
                String::from_utf8_lossy(&o.stderr)
            );
            let first = text.lines().next().unwrap_or("").trim().to_string();
            match o.status.code() {
                Some(0) => "identical".into(),
                Some(1) => format!("DIFFER ({first})"),
                _ => format!("compare failed: {}", text.trim().replace('\n', " ")),
            }
        }
        Err(e) => format!("compare failed: {e}"),
    }
}

/// One migration's outcome.
#[derive(Debug, Clone)]
struct Run {
    /// "completed", or why not.
    outcome: String,
    /// Bytes on the link during the disk phase.
    disk_link: f64,
    disk_s: f64,
    /// The disk phase's link bytes were estimated (tern: no memory-free disk phase seen).
    disk_estimated: bool,
    total_link: f64,
    total_s: f64,
    downtime_ms: f64,
    /// `qemu-img compare` after the run.
    compare: String,
    /// tern's `report.disk` and `report.bytes_on_wire`.
    disk_report: Option<Value>,
}

impl Run {
    fn failed(outcome: String) -> Run {
        Run {
            outcome,
            disk_link: f64::NAN,
            disk_s: f64::NAN,
            disk_estimated: false,
            total_link: f64::NAN,
            total_s: f64::NAN,
            downtime_ms: f64::NAN,
            compare: "-".into(),
            disk_report: None,
        }
    }

    fn completed(&self) -> bool {
        self.outcome == "completed"
    }
}

/// Waits for block job `job`'s event among `want`; a job that ends otherwise is an error.
async fn wait_job(
    rx: &mut broadcast::Receiver<QmpEvent>,
    job: &str,
    want: &[&str],
    within: Duration,
) -> Result<QmpEvent> {
    let deadline = tokio::time::Instant::now() + within;
    loop {
        let e = match tokio::time::timeout_at(deadline, rx.recv()).await {
            Err(_) => bail!("block job {job}: no {want:?} within {} s", within.as_secs()),
            Ok(Err(broadcast::error::RecvError::Lagged(_))) => continue,
            Ok(Err(broadcast::error::RecvError::Closed)) => bail!("QMP closed"),
            Ok(Ok(e)) => e,
        };
        if e.data.get("device").and_then(Value::as_str) != Some(job) {
            continue;
        }
        if want.contains(&e.event.as_str()) {
            if let Some(err) = e.data.get("error").and_then(Value::as_str) {
                bail!("block job {job} ended ({}) with an error: {err}", e.event);
            }
            return Ok(e);
        }
        match e.event.as_str() {
            "BLOCK_JOB_ERROR" | "BLOCK_JOB_COMPLETED" | "BLOCK_JOB_CANCELLED" => {
                bail!("block job {job}: {} {}", e.event, e.data)
            }
            _ => {}
        }
    }
}

/// Polls `query-migrate` until `completed`; Ok(None) then, Ok(Some(why)) if it failed or
/// ran out of time (after cancelling).
async fn wait_migrated(q: &QemuProcess, limit: Duration, t0: Instant) -> Result<Option<String>> {
    loop {
        let info = q.qmp.query_migrate().await?;
        match info.status.as_str() {
            "completed" => return Ok(None),
            "failed" | "cancelled" => {
                return Ok(Some(format!(
                    "memory migration {}: {}",
                    info.status,
                    info.error_desc.unwrap_or_default()
                )))
            }
            _ => {}
        }
        if t0.elapsed() > limit {
            let _ = q.qmp.execute("migrate_cancel", None).await;
            return Ok(Some(format!(
                "memory did not converge in {} s",
                limit.as_secs()
            )));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// QEMU's way, as libvirt drives it for non-shared storage.
async fn via_qemu(g: &GuestImage, img: &Images, dir: &Path, limit: Duration) -> Result<Run> {
    let src_img = run_copy(img, dir)?;
    let mut so = LaunchOptions::new(dir.join("src"));
    so.qemu_binary = qemu_in("tern-a", dir)?;
    let mut src = QemuProcess::launch(&vm_spec("disk-direct", g, &src_img), &so)
        .await
        .context("source QEMU")?;
    wait_for_text(&src.console_log, "TERN-READY", Duration::from_secs(120))?;
    let node = qdisk::node_name(0);
    let size = qdisk::query_node(&src.qmp, &node).await?.virtual_size;
    ensure!(size == img.virtual_size, "source disk is {size} B");

    // destination: blank image of the same size, incoming, paused, exported writable over TCP
    let dst_img = dir.join("destination.qcow2");
    qdisk::create_image(&dst_img, DiskFormat::Qcow2, size).await?;
    let mut dopts = LaunchOptions::new(dir.join("dst"));
    dopts.qemu_binary = qemu_in("tern-b", dir)?;
    dopts.incoming_defer = true;
    dopts.start_paused = true;
    let mut dst = QemuProcess::launch(&vm_spec("disk-direct", g, &dst_img), &dopts)
        .await
        .context("destination QEMU")?;
    dst.qmp
        .execute(
            "nbd-server-start",
            Some(
                json!({ "addr": { "type": "inet", "data": { "host": DST_IP, "port": NBD_PORT } } }),
            ),
        )
        .await
        .context("nbd-server-start on the destination")?;
    let export = qdisk::export_writable(&dst.qmp, &node).await?;
    for q in [&src.qmp, &dst.qmp] {
        q.set_migrate_capabilities(&[("events", true)]).await?;
    }
    src.qmp
        .set_migrate_parameters(json!({ "downtime-limit": 300, "max-bandwidth": 1u64 << 40 }))
        .await?;
    dst.qmp
        .execute("migrate-incoming", Some(json!({ "uri": MIGRATE_URI })))
        .await?;

    let mut sev = src.qmp.subscribe();
    let mut dev = dst.qmp.subscribe();
    let mut jobs = src.qmp.subscribe();
    let bytes0 = WanLab::link_bytes()?;
    let t0 = Instant::now();
    src.qmp
        .execute(
            "blockdev-add",
            Some(
                json!({ "driver": "nbd", "node-name": MIRROR_NODE, "export": node,
                         "server": { "type": "inet", "host": DST_IP, "port": NBD_PORT } }),
            ),
        )
        .await
        .context("blockdev-add of the destination's NBD export")?;
    src.qmp
        .execute(
            "blockdev-mirror",
            Some(
                json!({ "job-id": MIRROR_JOB, "device": node, "target": MIRROR_NODE,
                         "sync": "full" }),
            ),
        )
        .await
        .context("blockdev-mirror")?;
    let ready = match wait_job(&mut jobs, MIRROR_JOB, &["BLOCK_JOB_READY"], limit).await {
        Ok(e) => e,
        Err(e) => {
            let _ = src
                .qmp
                .execute(
                    "block-job-cancel",
                    Some(json!({ "device": MIRROR_JOB, "force": true })),
                )
                .await;
            src.kill().await;
            dst.kill().await;
            return Ok(Run::failed(format!("mirror: {e:#}")));
        }
    };
    let disk_s = t0.elapsed().as_secs_f64();
    let disk_link = (WanLab::link_bytes()? - bytes0) as f64;
    eprintln!(
        "  QEMU: mirror READY after {disk_s:.1} s, {:.1} MB on the link (job: offset {}, len {})",
        disk_link / 1e6,
        ready.data["offset"],
        ready.data["len"]
    );

    // memory, across the same link, the mirror still running
    src.qmp
        .execute("migrate", Some(json!({ "uri": MIGRATE_URI })))
        .await?;
    if let Some(why) = wait_migrated(&src, limit, t0).await? {
        src.kill().await;
        dst.kill().await;
        return Ok(Run::failed(why));
    }
    let mem = src.qmp.query_migrate().await?;
    eprintln!(
        "  QEMU: memory completed at {:.1} s: RAM {} B sent ({:?} normal pages, {:?} zero), QEMU's total {:?} ms, downtime {:?} ms; {:.1} MB on the link so far",
        t0.elapsed().as_secs_f64(),
        mem.ram_transferred.unwrap_or(0),
        mem.ram_normal,
        mem.ram_duplicate,
        mem.total_time_ms,
        mem.downtime_ms,
        (WanLab::link_bytes()? - bytes0) as f64 / 1e6
    );
    let t_handover = Instant::now();
    // libvirt keeps the source image: cancel (not complete) the ready job
    src.qmp
        .execute("block-job-cancel", Some(json!({ "device": MIRROR_JOB })))
        .await
        .context("block-job-cancel")?;
    wait_job(
        &mut jobs,
        MIRROR_JOB,
        &["BLOCK_JOB_COMPLETED", "BLOCK_JOB_CANCELLED"],
        Duration::from_secs(60),
    )
    .await?;
    if let Err(e) = src
        .qmp
        .execute("blockdev-del", Some(json!({ "node-name": MIRROR_NODE })))
        .await
    {
        eprintln!("  QEMU: blockdev-del {MIRROR_NODE} on the source: {e}");
    }
    // destination: incoming done, export and NBD server gone, then run
    let t_dst = Instant::now();
    loop {
        let st = dst.qmp.query_migrate().await?.status;
        if st == "completed" {
            break;
        }
        ensure!(
            st != "failed" && t_dst.elapsed() < Duration::from_secs(60),
            "destination's incoming migration: {st}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    qdisk::finish_incoming(&dst.qmp, &export, Duration::from_secs(10)).await?;
    qdisk::stop_nbd_server(&dst.qmp).await?;
    let t_cont = Instant::now();
    dst.qmp.execute("cont", None).await?;
    eprintln!(
        "  QEMU: handover (block-job-cancel, blockdev-del, destination export removed, NBD server stopped) {:.0} ms before cont",
        (t_cont - t_handover).as_secs_f64() * 1000.0
    );
    let stop = src
        .qmp
        .wait_event(&mut sev, "STOP", Duration::from_secs(5))
        .await?;
    let resume = dst
        .qmp
        .wait_event(&mut dev, "RESUME", Duration::from_secs(60))
        .await?;
    let total_s = t0.elapsed().as_secs_f64();
    let total_link = (WanLab::link_bytes()? - bytes0) as f64;
    let downtime_ms = (event_us(resume.timestamp) - event_us(stop.timestamp)) / 1000.0;
    // both QEMUs gone (everything flushed), then the images must be identical
    src.quit(Duration::from_secs(10)).await;
    dst.quit(Duration::from_secs(10)).await;
    let compare = compare_images(&src_img, &dst_img, "qcow2");
    Ok(Run {
        outcome: "completed".into(),
        disk_link,
        disk_s,
        disk_estimated: false,
        total_link,
        total_s,
        downtime_ms,
        compare,
        disk_report: None,
    })
}

/// The destination VM's disk: from its spec as the agent shows it, else from the
/// `spec.toml` in its run directory.
fn destination_disk(b: &TestAgent, vm: &str) -> Result<(PathBuf, String)> {
    let info = b.vm(vm)?;
    for key in ["disk", "disks"] {
        if let Some(d) = info["spec"][key].get(0) {
            if let Some(p) = d["path"].as_str() {
                let f = d["format"].as_str().unwrap_or("qcow2");
                return Ok((PathBuf::from(p), f.to_string()));
            }
        }
    }
    let text = match info["spec_toml"].as_str() {
        Some(t) => t.to_string(),
        None => {
            let rd = info["run_dir"].as_str().context("the VM has no run_dir")?;
            std::fs::read_to_string(Path::new(rd).join("spec.toml"))
                .with_context(|| format!("reading {rd}/spec.toml"))?
        }
    };
    let spec = VmSpec::from_toml(&text)?;
    let d = spec
        .disks
        .first()
        .context("the destination's spec has no disk")?;
    Ok((d.path.clone(), d.format.as_str().to_string()))
}

fn error_text(e: &Value) -> String {
    if e.is_null() {
        return "no report and no error".into();
    }
    format!(
        "{}: {} (retryable: {}; VM: {})",
        e["code"].as_str().unwrap_or("?"),
        e["message"].as_str().unwrap_or("?"),
        e["retryable"],
        e["vm_state"].as_str().unwrap_or("?")
    )
}

/// tern's way: two agents, the destination's holding the scenario's library image.
fn via_tern(bin: &Path, g: &GuestImage, img: &Images, dir: &Path, limit: Duration) -> Result<Run> {
    let src_img = run_copy(img, dir)?;
    let (a, b) = wan::agents(bin, dir)?;
    if let Some(lib) = &img.library {
        let body = json!({ "path": lib, "format": "qcow2" });
        match b.call("POST", "/v1/images", Some(&body)) {
            Ok(r) => eprintln!(
                "  tern: destination imported {}: {} data blocks, {} zero, {} new chunks, {} ms",
                lib.display(),
                r["data_blocks"],
                r["zero_blocks"],
                r["new_chunks"],
                r["elapsed_ms"]
            ),
            Err(e) => {
                let why =
                    format!("destination could not import its image (POST /v1/images): {e:#}");
                eprintln!("  tern: {why}");
                return Ok(Run::failed(format!("not run: {why}")));
            }
        }
    }
    let w = wan::Workload {
        label: "disk",
        append: GUEST_APPEND.into(),
        running: "TERN-READY",
    };
    wan::boot(&a, &vm_spec(TERN_VM, g, &src_img), &w)?;
    let bytes0 = WanLab::link_bytes()?;
    let t0 = Instant::now();
    let id = match a.start_migration(TERN_VM, "198.18.0.2:7700", json!({ "downtime_ms": 300 })) {
        Ok(id) => id,
        Err(e) => {
            eprintln!("  tern: migration refused: {e:#}");
            return Ok(Run::failed(format!("refused: {e:#}")));
        }
    };
    // the last moment memory had not started yet (elapsed s, link bytes)
    let mut before_memory = (0.0, bytes0);
    let mut memory_seen = false;
    let mut cancelled = false;
    let st = loop {
        let now_bytes = WanLab::link_bytes()?;
        let now_s = t0.elapsed().as_secs_f64();
        let st = a.call("GET", &format!("/v1/migrations/{id}"), None)?;
        if st["finished"].as_bool() == Some(true) {
            break st;
        }
        if !memory_seen {
            if st["progress"]["bytes_from_qemu"].as_u64().unwrap_or(0) == 0 {
                before_memory = (now_s, now_bytes);
            } else {
                memory_seen = true;
            }
        }
        if !cancelled && t0.elapsed() > limit {
            let _ = a.call("POST", &format!("/v1/migrations/{id}/cancel"), None);
            cancelled = true;
        }
        if t0.elapsed() > limit + Duration::from_secs(60) {
            bail!("tern migration {id} did not end after being cancelled");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let total_link = (WanLab::link_bytes()? - bytes0) as f64;
    let elapsed = t0.elapsed().as_secs_f64();
    let report = &st["report"];
    if report.is_null() {
        let why = if cancelled {
            format!("did not finish in {} s (cancelled)", limit.as_secs())
        } else {
            format!("failed: {}", error_text(&st["error"]))
        };
        eprintln!("  tern: migration {why}");
        let mut r = Run::failed(why);
        r.total_link = total_link;
        r.total_s = elapsed;
        return Ok(r);
    }
    let disk = report["disk"].clone();
    let wire = disk["wire_bytes"].as_f64().unwrap_or(f64::NAN);
    let on_wire = report["bytes_on_wire"].as_f64().unwrap_or(f64::NAN);
    // the link bytes up to the first memory bytes, unless they cannot have covered the
    // disk copy (disk and memory overlapping): then the disk's wire bytes, plus the same
    // share of TCP/IP overhead the whole migration had on the link
    let measured = (before_memory.1 - bytes0) as f64;
    let (disk_link, disk_s, disk_estimated) =
        if memory_seen && (wire.is_nan() || measured >= 0.9 * wire) {
            (measured, before_memory.0, false)
        } else {
            (
                wire * total_link / on_wire,
                disk["copy_ms"].as_f64().unwrap_or(f64::NAN) / 1000.0,
                true,
            )
        };
    let total_s = report["total_time_ms"]
        .as_f64()
        .map(|ms| ms / 1000.0)
        .unwrap_or(elapsed);
    eprintln!(
        "  tern: {:.1} s total, {} ms downtime (switchover {}), {:.1} MB on the link; disk report {}",
        total_s,
        report["downtime_ms"],
        report["switchover"],
        total_link / 1e6,
        disk
    );
    let compare = match destination_disk(&b, TERN_VM) {
        Ok((p, fmt)) => {
            // paused (QEMU drains and flushes its disks), so the file is complete
            if let Err(e) = b.qmp(TERN_VM, "stop", None) {
                eprintln!("  tern: stop on the destination: {e:#}");
            }
            compare_images(&src_img, &p, &fmt)
        }
        Err(e) => format!("destination disk not found: {e:#}"),
    };
    for agent in [&a, &b] {
        let _ = agent.call("DELETE", &format!("/v1/vms/{TERN_VM}"), None);
    }
    let mut dr = disk;
    if dr.is_object() {
        dr["bytes_on_wire"] = json!(on_wire);
    }
    Ok(Run {
        outcome: "completed".into(),
        disk_link,
        disk_s,
        disk_estimated,
        total_link,
        total_s,
        downtime_ms: report["downtime_ms"].as_f64().unwrap_or(f64::NAN),
        compare,
        disk_report: if dr.is_object() { Some(dr) } else { None },
    })
}

// ---- the table ------------------------------------------------------------------------

/// Medians over a path's completed runs.
struct Summary {
    outcome: String,
    disk_link: f64,
    disk_s: f64,
    disk_estimated: bool,
    total_link: f64,
    total_s: f64,
    downtime_ms: f64,
    compare: String,
    /// Every completed run's images were identical.
    identical: bool,
    completed: usize,
}

fn summarize(runs: &[Run]) -> Option<Summary> {
    if runs.is_empty() {
        return None;
    }
    let done: Vec<&Run> = runs.iter().filter(|r| r.completed()).collect();
    let m = |f: fn(&Run) -> f64| {
        if done.is_empty() {
            f64::NAN
        } else {
            median(done.iter().map(|r| f(r)).collect())
        }
    };
    let outcome = if done.len() == runs.len() {
        "completed".to_string()
    } else {
        let failed: Vec<&str> = runs
            .iter()
            .filter(|r| !r.completed())
            .map(|r| r.outcome.as_str())
            .collect();
        let mut why = failed[0].to_string();
        if failed.iter().any(|f| *f != failed[0]) {
            why.push_str(" (and other failures)");
        }
        if done.is_empty() {
            why
        } else {
            format!("completed {}/{}; {why}", done.len(), runs.len())
        }
    };
    let mut compares: Vec<&str> = done.iter().map(|r| r.compare.as_str()).collect();
    compares.sort_unstable();
    compares.dedup();
    Some(Summary {
        outcome: outcome.trim().replace('|', "/").replace('\n', " "),
        disk_link: m(|r| r.disk_link),
        disk_s: m(|r| r.disk_s),
        disk_estimated: done.iter().any(|r| r.disk_estimated),
        total_link: m(|r| r.total_link),
        total_s: m(|r| r.total_s),
        downtime_ms: m(|r| r.downtime_ms),
        compare: if compares.is_empty() {
            "-".into()
        } else {
            compares.join(", ").replace('|', "/")
        },
        identical: !done.is_empty() && done.iter().all(|r| r.compare == "identical"),
        completed: done.len(),
    })
}

fn num(x: f64, p: usize) -> String {
    if x.is_nan() {
        "-".into()
    } else {
        format!("{x:.p$}")
    }
}

fn mb(bytes: f64) -> String {
    let m = bytes / 1e6;
    num(m, if m < 10.0 { 2 } else { 1 })
}

fn row(path: &str, s: &Summary) -> String {
    format!(
        "| {path} | {} | {}{} | {} | {} | {} | {} | {} |\n",
        s.outcome,
        mb(s.disk_link),
        if s.disk_estimated { " (est.)" } else { "" },
        num(s.disk_s, 1),
        mb(s.total_link),
        num(s.total_s, 1),
        num(s.downtime_ms, 0),
        s.compare
    )
}

/// tern's DiskReport, medians over completed runs.
fn disk_report_line(runs: &[Run]) -> Option<String> {
    let reps: Vec<&Value> = runs.iter().filter_map(|r| r.disk_report.as_ref()).collect();
    if reps.is_empty() {
        return None;
    }
    let m = |k: &str| median(reps.iter().filter_map(|r| r[k].as_f64()).collect());
    Some(format!(
        "- tern's DiskReport{}: data {} MB, filled locally at the destination {} MB, sent {} MB, \
         disk frames on the wire {} MB (of {} MB tern put on the wire), {} rounds, copy {} ms, \
         last round {} MB in {} ms\n",
        if reps.len() > 1 { " (medians)" } else { "" },
        mb(m("data_bytes")),
        mb(m("local_bytes")),
        mb(m("sent_bytes")),
        mb(m("wire_bytes")),
        mb(m("bytes_on_wire")),
        num(m("rounds"), 0),
        num(m("copy_ms"), 0),
        mb(m("last_round_bytes")),
        num(m("last_round_ms"), 1),
    ))
}

fn ratio(t: f64, q: f64) -> String {
    if t.is_nan() || q.is_nan() || q <= 0.0 {
        "-".into()
    } else {
        format!("{:.2}x", t / q)
    }
}

fn scenario_section(
    sc: Scenario,
    img: &Images,
    qemu: &[Run],
    tern: &[Run],
    rounds: usize,
) -> String {
    let mut out = format!(
        "### ({}) {}: {}\n\n",
        sc.letter(),
        sc.name(),
        img.description
    );
    if rounds > 1 {
        out.push_str(&format!("Medians of {rounds} rounds (completed runs).\n\n"));
    }
    out.push_str(
        "| path | outcome | disk phase: link MB | disk phase s | total: link MB | total s | downtime ms | images after (qemu-img compare) |\n\
         |---|---|---|---|---|---|---|---|\n",
    );
    let q = summarize(qemu);
    let t = summarize(tern);
    if let Some(q) = &q {
        out.push_str(&row("QEMU (blockdev-mirror over NBD, then migrate)", q));
    }
    if let Some(t) = &t {
        out.push_str(&row("tern", t));
    }
    out.push('\n');
    if let (Some(q), Some(t)) = (&q, &t) {
        if q.completed > 0 && t.completed > 0 {
            out.push_str(&format!(
                "- tern/QEMU: disk-phase bytes {}, total bytes {}, disk-phase time {}, total time {}, downtime {} ({:+.0} ms)\n",
                ratio(t.disk_link, q.disk_link),
                ratio(t.total_link, q.total_link),
                ratio(t.disk_s, q.disk_s),
                ratio(t.total_s, q.total_s),
                ratio(t.downtime_ms, q.downtime_ms),
                t.downtime_ms - q.downtime_ms
            ));
        }
    }
    if let Some(l) = disk_report_line(tern) {
        out.push_str(&l);
    }
    for (metric, limit) in sc.targets() {
        let verdict = match (&q, &t) {
            (Some(q), Some(t)) if q.completed > 0 && t.completed > 0 => {
                let v = metric.of(t) / metric.of(q);
                let est = if *metric == Metric::DiskBytes && t.disk_estimated {
                    ", tern's disk-phase bytes estimated"
                } else {
                    ""
                };
                if v.is_nan() {
                    "not measured".to_string()
                } else if !(q.identical && t.identical) {
                    format!("{v:.2}x{est}: **NOT met** (images not identical after the migration)")
                } else if v <= *limit {
                    format!("{v:.2}x{est}: met")
                } else {
                    format!("{v:.2}x{est}: **NOT met**")
                }
            }
            (None, _) => "not measured (QEMU's way not run)".into(),
            (_, None) => "not measured (tern not run)".into(),
            (Some(q), Some(_)) if q.completed == 0 => {
                "not measured (QEMU's way did not complete)".into()
            }
            _ => "not measured (tern's migration did not complete)".into(),
        };
        out.push_str(&format!(
            "- target ({}) {} <= {limit:.2}x QEMU's: {verdict}\n",
            sc.letter(),
            metric.label()
        ));
    }
    out.push('\n');
    out
}

pub fn bench(bin: &Path, g: &GuestImage, o: &Options) -> Result<String> {
    let work = tempfile::Builder::new()
        .prefix("tern-bench-disk-")
        .tempdir_in("/tmp")?;
    let _lab = WanLab::up(&o.link)?;
    let rt = tokio::runtime::Runtime::new()?;
    let size = o.disk_mib << 20;
    let qemu_version = Command::new("qemu-system-x86_64")
        .arg("--version")
        .output()
        .map(|o| {
            String::from_utf8_lossy(&o.stdout)
                .lines()
                .next()
                .unwrap_or("")
                .to_string()
        })
        .unwrap_or_default();
    let mut out = format!(
        "Disk migration, profile {}, {} MiB disk, {GUEST_MIB} MiB idle guest (TCG), {} round(s), {qemu_version}. \
         Bytes: host A's link, both directions, headers included. Disk phase: QEMU, blockdev-add of the NBD \
         target to BLOCK_JOB_READY; tern, the request to the first memory bytes. Total: QEMU, blockdev-add to \
         the destination's RESUME (destination QEMU started before); tern, the request to the VM running at the \
         destination. Downtime: source STOP to destination RESUME.\n\n",
        o.link, o.disk_mib, o.rounds
    );
    for &sc in &o.scenarios {
        let dir = work.path().join(sc.name());
        eprintln!("[{}] building images ({} MiB)", sc.name(), o.disk_mib);
        let t = Instant::now();
        let img = match build_images(sc, &dir.join("images"), size) {
            Ok(img) => img,
            Err(e) => {
                eprintln!("[{}] images: {e:#}", sc.name());
                out.push_str(&format!(
                    "### ({}) {}: not run, its images could not be built: {e:#}\n\n",
                    sc.letter(),
                    sc.name()
                ));
                let _ = std::fs::remove_dir_all(&dir);
                continue;
            }
        };
        eprintln!(
            "[{}] {} ({:.1} s)",
            sc.name(),
            img.description,
            t.elapsed().as_secs_f64()
        );
        let mut qemu = Vec::new();
        let mut tern = Vec::new();
        for r in 0..o.rounds {
            if o.only != Some(Side::Tern) {
                eprintln!("[{}] round {}: QEMU", sc.name(), r + 1);
                let d = dir.join(format!("qemu-{r}"));
                let run = rt
                    .block_on(via_qemu(g, &img, &d, o.limit))
                    .unwrap_or_else(|e| {
                        eprintln!("  QEMU: {e:#}");
                        Run::failed(format!("error: {e:#}"))
                    });
                qemu.push(run);
                let _ = std::fs::remove_dir_all(&d);
            }
            if o.only != Some(Side::Qemu) {
                eprintln!("[{}] round {}: tern", sc.name(), r + 1);
                let d = dir.join(format!("tern-{r}"));
                let run = via_tern(bin, g, &img, &d, o.limit).unwrap_or_else(|e| {
                    eprintln!("  tern: {e:#}");
                    Run::failed(format!("error: {e:#}"))
                });
                tern.push(run);
                let _ = std::fs::remove_dir_all(&d);
            }
        }
        let section = scenario_section(sc, &img, &qemu, &tern, o.rounds);
        eprint!("{section}");
        out.push_str(&section);
        let _ = std::fs::remove_dir_all(&dir);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rng_is_deterministic_and_spread() {
        let mut a = Rng::new(7);
        let mut b = Rng::new(7);
        let mut x = vec![0u8; 4096];
        let mut y = vec![0u8; 4096];
        a.fill(&mut x);
        b.fill(&mut y);
        assert_eq!(x, y);
        let mut counts = [0u32; 256];
        for v in &x {
            counts[*v as usize] += 1;
        }
        assert!(counts.iter().all(|c| *c > 0 && *c < 64), "{counts:?}");
    }
}

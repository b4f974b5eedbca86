//! `tern-bench loopback`: the foundation benchmark (`tern-bench datapath`: see
//! [`datapath`]; `tern-bench wan`: see [`wan`];
//! `tern-bench tls`: see [`tls`]; `tern-bench disk`: see [`disk`]; `tern-bench shared`:
//! see [`shared`]; `tern-bench upgrade`: see [`upgrade`]; `tern-bench segments`: see
//! [`segments`]; `tern-bench postcopy`: see [`postcopy`]; `tern-bench cluster`, the
//! cluster controller on a simulated cluster: see
//! [`cluster`]). Same guest, same
//! machine, one run:
//! QEMU's own migration (QEMU to QEMU over loopback TCP) against the same migration
//! through two tern agents, alternating, N rounds per workload. Prints a Markdown table of
//! total time, downtime (end to end: source STOP event to destination RESUME event, and
//! QEMU's own figure), throughput and CPU seconds, with tern/QEMU ratios.
//!
//! Usage: tern-bench loopback --tern target/release/tern [--rounds 3] [--out FILE]

mod cluster;
mod datapath;
mod disk;
mod libvirt;
mod postcopy;
mod predict;
mod segments;
mod shared;
mod tls;
mod upgrade;
mod wan;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use serde_json::json;
use tern_qemu::launch::{LaunchOptions, QemuProcess};
use tern_qemu::spec::VmSpec;
use tern_testkit::agents::{wait_for_text, TestAgent};
use tern_testkit::guest::{ensure_guest, GuestImage};

pub(crate) struct Sample {
    /// Operator's view: from the request to the VM running at the destination.
    total_ms: f64,
    /// The source QEMU's own migration time (transfer only).
    qemu_ms: f64,
    downtime_ms: f64,
    qemu_downtime_ms: f64,
    mbytes: f64,
    throughput_mbps: f64,
    cpu_s: f64,
}

/// CPU seconds used by the whole machine so far (user + nice + system + irq + softirq
/// from /proc/stat). The benchmark runs nothing else, so a difference over a migration is
/// that migration's cost: both QEMUs, the agents, and the kernel's socket work.
fn machine_cpu_seconds() -> f64 {
    let s = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let f: Vec<u64> = s
        .lines()
        .next()
        .unwrap_or("")
        .split_whitespace()
        .skip(1)
        .filter_map(|x| x.parse().ok())
        .collect();
    let busy: u64 = [0usize, 1, 2, 5, 6].iter().filter_map(|i| f.get(*i)).sum();
    busy as f64 / 100.0
}

fn spec(name: &str, g: &GuestImage, append: &str) -> VmSpec {
    VmSpec {
        name: name.into(),
        memory_mib: 512,
        vcpus: 1,
        accel: tern_qemu::spec::Accel::Tcg,
        kernel: Some(g.kernel.clone()),
        initrd: Some(g.initrd.clone()),
        append: format!("console=ttyS0 panic=-1 {append}"),
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

fn event_us(t: std::time::SystemTime) -> f64 {
    t.duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs_f64() * 1e6)
        .unwrap_or(0.0)
}

/// A source QEMU running `s` (ready once its console says TERN-READY) and a destination
/// QEMU waiting for it on a loopback TCP port, both with the parameters tern uses
/// (events on, downtime limit 300 ms, no rate cap); returns them and the URI to migrate to.
pub(crate) async fn direct_pair(
    s: &VmSpec,
    work: &Path,
    ready_within: Duration,
) -> Result<(QemuProcess, QemuProcess, String)> {
    let src = QemuProcess::launch(s, &LaunchOptions::new(work.join("direct-src"))).await?;
    wait_for_text(&src.console_log, "TERN-READY", ready_within)?;
    let mut dst_opts = LaunchOptions::new(work.join("direct-dst"));
    dst_opts.incoming_defer = true;
    let dst = QemuProcess::launch(s, &dst_opts).await?;
    let port = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    for q in [&src.qmp, &dst.qmp] {
        q.set_migrate_capabilities(&[("events", true)]).await?;
    }
    src.qmp
        .set_migrate_parameters(json!({ "downtime-limit": 300, "max-bandwidth": 1u64 << 40 }))
        .await?;
    let uri = format!("tcp:127.0.0.1:{port}");
    dst.qmp
        .execute("migrate-incoming", Some(json!({ "uri": uri })))
        .await?;
    Ok((src, dst, uri))
}

/// QEMU to QEMU directly, over loopback TCP, same parameters tern uses.
async fn qemu_direct(g: &GuestImage, append: &str, work: &Path) -> Result<Sample> {
    let s = spec("bench-direct", g, append);
    let (mut src, mut dst, uri) = direct_pair(&s, work, Duration::from_secs(90)).await?;
    let mut sev = src.qmp.subscribe();
    let mut dev = dst.qmp.subscribe();
    let cpu0 = machine_cpu_seconds();
    let t0 = Instant::now();
    src.qmp
        .execute("migrate", Some(json!({ "uri": uri })))
        .await?;
    let stop = src
        .qmp
        .wait_event(&mut sev, "STOP", Duration::from_secs(300))
        .await?;
    let resume = dst
        .qmp
        .wait_event(&mut dev, "RESUME", Duration::from_secs(300))
        .await?;
    let total = t0.elapsed();
    let info = src.qmp.query_migrate().await?;
    let cpu1 = machine_cpu_seconds();
    if info.status != "completed" {
        bail!("QEMU direct migration ended {:?}", info.status);
    }
    let bytes = info.ram_transferred.unwrap_or(0) as f64;
    src.quit(Duration::from_secs(5)).await;
    dst.quit(Duration::from_secs(5)).await;
    let qemu_ms = info.total_time_ms.unwrap_or(0) as f64;
    Ok(Sample {
        total_ms: total.as_secs_f64() * 1000.0,
        qemu_ms,
        downtime_ms: (event_us(resume.timestamp) - event_us(stop.timestamp)) / 1000.0,
        qemu_downtime_ms: info.downtime_ms.unwrap_or(0) as f64,
        mbytes: bytes / 1e6,
        throughput_mbps: bytes * 8.0 / 1e6 / (qemu_ms / 1000.0).max(1e-6),
        cpu_s: cpu1 - cpu0,
    })
}

/// The same migration through two tern agents.
pub(crate) fn via_tern(
    bin: &Path,
    g: &GuestImage,
    append: &str,
    env: &[(&str, &str)],
) -> Result<Sample> {
    let a = TestAgent::start(bin, "bench-a", env)?;
    let b = TestAgent::start(bin, "bench-b", env)?;
    let s = spec("bench-tern", g, append);
    let info = a.start_vm(&s.to_toml())?;
    let console = PathBuf::from(info["console_log"].as_str().context("console")?);
    wait_for_text(&console, "TERN-READY", Duration::from_secs(90))?;
    let cpu0 = machine_cpu_seconds();
    let req = bench_request()?;
    let id = a.start_migration("bench-tern", &b.peer_addr.to_string(), req)?;
    let st = a.wait_migration(&id, Duration::from_secs(300))?;
    let cpu1 = machine_cpu_seconds();
    let r = st
        .report
        .with_context(|| format!("tern migration failed: {:?}", st.error))?;
    let qemu_ms = r.qemu_total_time_ms.unwrap_or(0) as f64;
    eprintln!(
        "  tern: {} ms downtime, switchover {:?}, {} / {}",
        r.downtime_ms, r.switchover, r.encoding.data_path, r.encoding.codec
    );
    Ok(Sample {
        total_ms: r.total_time_ms as f64,
        qemu_ms,
        downtime_ms: r.downtime_ms as f64,
        qemu_downtime_ms: r.qemu_downtime_ms.unwrap_or(0) as f64,
        mbytes: r.bytes_on_wire as f64 / 1e6,
        throughput_mbps: r.bytes_from_qemu as f64 * 8.0 / 1e6 / (qemu_ms / 1000.0).max(1e-6),
        cpu_s: cpu1 - cpu0,
    })
}

pub(crate) fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    if v.is_empty() {
        return 0.0;
    }
    v[v.len() / 2]
}

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let arg = |k: &str| {
        args.iter()
            .position(|a| a == k)
            .and_then(|i| args.get(i + 1))
            .cloned()
    };
    // a bench's table: printed, and written to --out when given
    let emit = |out: &str| -> Result<()> {
        print!("{out}");
        if let Some(p) = arg("--out") {
            std::fs::write(&p, out).with_context(|| format!("writing {p}"))?;
        }
        Ok(())
    };
    let bin = PathBuf::from(arg("--tern").unwrap_or_else(|| "target/release/tern".into()));
    match args.get(1).map(String::as_str) {
        Some("loopback") => {}
        Some("tls") => {
            let rounds: usize = arg("--rounds").map(|r| r.parse()).transpose()?.unwrap_or(3);
            let only = arg("--only");
            let out = tls::bench(&bin, &ensure_guest()?, rounds, only.as_deref())?;
            return emit(&out);
        }
        Some("wan") => {
            let g = ensure_guest()?;
            let profile = arg("--profile").unwrap_or_else(|| "wan-100m-50ms".into());
            let mem: u32 = arg("--mem-mib").map(|m| m.parse()).transpose()?.unwrap_or(1024);
            let limit: u64 = arg("--limit-secs").map(|m| m.parse()).transpose()?.unwrap_or(180);
            let only = arg("--only");
            let out = wan::bench(&bin, &g, &profile, mem, Duration::from_secs(limit), only.as_deref())?;
            return emit(&out);
        }
        Some("postcopy") => {
            let g = ensure_guest()?;
            let profile = arg("--profile").unwrap_or_else(|| "wan-100m-50ms".into());
            let mem: u32 = arg("--mem-mib").map(|m| m.parse()).transpose()?.unwrap_or(1024);
            let limit: u64 = arg("--limit-secs").map(|m| m.parse()).transpose()?.unwrap_or(180);
            let tern_only = arg("--only").is_some_and(|o| o == "tern");
            let out = postcopy::bench(&bin, &g, &profile, mem, Duration::from_secs(limit), tern_only)?;
            return emit(&out);
        }
        Some("cluster") => {
            let opts = cluster::Options::parse(arg)?;
            let out = cluster::bench(&opts)?;
            return emit(&out);
        }
        Some("segments") => {
            let profile = arg("--profile").unwrap_or_else(|| "wan-100m-50ms".into());
            let runs: usize = arg("--runs").map(|m| m.parse()).transpose()?.unwrap_or(10);
            let out = segments::bench(&bin, &ensure_guest()?, &profile, runs)?;
            return emit(&out);
        }
        Some("shared") => {
            let profile = arg("--profile").unwrap_or_else(|| "wan-100m-50ms".into());
            let mem: u32 = arg("--mem-mib").map(|m| m.parse()).transpose()?.unwrap_or(512);
            let fill: u32 = arg("--fill-mib").map(|m| m.parse()).transpose()?.unwrap_or(320);
            let out = shared::bench(&bin, &ensure_guest()?, &profile, mem, fill)?;
            return emit(&out);
        }
        Some("predict") => {
            let profiles: Vec<String> = arg("--profiles")
                .unwrap_or_else(|| "wan-100m-50ms,wan-1g-20ms".into())
                .split(',')
                .map(|s| s.trim().to_string())
                .collect();
            let mem: u32 = arg("--mem-mib").map(|m| m.parse()).transpose()?.unwrap_or(512);
            let out = predict::bench(&bin, &ensure_guest()?, &profiles, mem)?;
            return emit(&out);
        }
        Some("spread") => {
            let profile = arg("--profile").unwrap_or_else(|| "wan-100m-50ms".into());
            let mem: u32 = arg("--mem-mib").map(|m| m.parse()).transpose()?.unwrap_or(1024);
            let runs: usize = arg("--runs").map(|r| r.parse()).transpose()?.unwrap_or(20);
            let out = wan::spread(&bin, &ensure_guest()?, &profile, mem, runs)?;
            return emit(&out);
        }
        Some("datapath") => {
            let sizes: Vec<u32> = arg("--sizes")
                .unwrap_or_else(|| "2048,8192".into())
                .split(',')
                .map(|s| s.trim().parse().context("--sizes: MiB, comma-separated"))
                .collect::<Result<_>>()?;
            let rounds: usize = arg("--rounds").map(|r| r.parse()).transpose()?.unwrap_or(5);
            let out = datapath::bench(&bin, &ensure_guest()?, &sizes, rounds)?;
            return emit(&out);
        }
        Some("upgrade") => {
            let sizes: Vec<u32> = arg("--sizes")
                .unwrap_or_else(|| "1024,4096,16384".into())
                .split(',')
                .map(|s| s.trim().parse().context("--sizes: MiB, comma-separated"))
                .collect::<Result<_>>()?;
            let fill: u32 = arg("--fill-mib").map(|m| m.parse()).transpose()?.unwrap_or(512);
            let rounds: usize = arg("--rounds").map(|r| r.parse()).transpose()?.unwrap_or(3);
            let out = upgrade::bench(&bin, &ensure_guest()?, &sizes, fill, rounds)?;
            return emit(&out);
        }
        Some("libvirt") => {
            let profile = arg("--profile").unwrap_or_else(|| "wan-100m-50ms".into());
            let mem: u32 = arg("--mem-mib").map(|m| m.parse()).transpose()?.unwrap_or(512);
            let fill: u32 = arg("--fill-mib").map(|m| m.parse()).transpose()?.unwrap_or(256);
            let disk: Option<u64> = arg("--disk-mib").map(|m| m.parse()).transpose()?;
            let out = libvirt::bench(&bin, &ensure_guest()?, &profile, mem, fill, disk)?;
            return emit(&out);
        }
        Some("disk") => {
            let opts = disk::Options::parse(arg)?;
            let out = disk::bench(&bin, &ensure_guest()?, &opts)?;
            print!("{out}");
            if let Some(p) = arg("--out") {
                disk::append(&p, &out)?;
            }
            return Ok(());
        }
        _ => bail!(
            "usage: tern-bench loopback --tern PATH [--rounds N] [--out FILE]\n       tern-bench datapath --tern PATH [--sizes 2048,8192] [--rounds 5] [--out FILE]\n       tern-bench spread --tern PATH [--profile wan-100m-50ms] [--mem-mib 1024] [--runs 20] [--out FILE]\n       tern-bench tls --tern PATH [--rounds N] [--only TEXT] [--out FILE]\n       tern-bench predict --tern PATH [--profiles wan-100m-50ms,wan-1g-20ms] [--mem-mib 512] [--out FILE]\n       tern-bench shared --tern PATH [--profile wan-100m-50ms] [--mem-mib 512] [--fill-mib 320] [--out FILE]\n       tern-bench wan --tern PATH [--profile wan-100m-50ms] [--mem-mib 1024] [--limit-secs 180] [--only TEXT] [--out FILE]\n       tern-bench postcopy --tern PATH [--profile wan-100m-50ms] [--mem-mib 1024] [--limit-secs 180] [--only tern] [--out FILE]\n       tern-bench upgrade --tern PATH [--sizes 1024,4096,16384] [--fill-mib 512] [--rounds 3] [--out FILE]\n       tern-bench libvirt --tern PATH [--profile wan-100m-50ms] [--mem-mib 512] [--fill-mib 256] [--disk-mib N] [--out FILE]\n       tern-bench disk --tern PATH [--link wan-100m-50ms] [--disk-mib 256] [--rounds 1] [--scenario a|b|c] [--only qemu|tern] [--limit-secs 600] [--out FILE (appended)]\n       tern-bench cluster [--hosts 100] [--vms 2000] [--hours 24] [--seed 1] [--step 30] [--link-gbps 10] [--trace LOAD.csv --inventory INVENTORY.csv [--rules RULES.toml]] [--dump-trace DIR] [--out FILE]"
        ),
    }
    let rounds: usize = arg("--rounds").map(|r| r.parse()).transpose()?.unwrap_or(3);
    let g = ensure_guest()?;
    let work = tempfile::Builder::new()
        .prefix("tern-bench-")
        .tempdir_in("/tmp")?;
    let rt = tokio::runtime::Runtime::new()?;
    let workloads = [
        ("idle 512 MiB", "tern.workload=idle"),
        (
            "dirtier 512 MiB, 64 MiB hot",
            "tern.workload=dirty tern.mib=64 tern.rate=0",
        ),
    ];
    let mut out = String::new();
    out.push_str(&format!(
        "Loopback, same machine, same guest, alternating runs, median of {rounds}. QEMU {}.\n\n",
        std::process::Command::new("qemu-system-x86_64")
            .arg("--version")
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout)
                .lines()
                .next()
                .unwrap_or("")
                .to_string())
            .unwrap_or_default()
    ));
    out.push_str("| workload | path | total ms (request to running) | QEMU migration ms | downtime ms (STOP to RESUME) | QEMU downtime ms | MB moved | throughput Mbit/s (QEMU bytes / QEMU time) | CPU s (whole machine, during the migration) |\n|---|---|---|---|---|---|---|---|---|\n");
    let mut ratios = String::new();
    for (label, append) in workloads {
        let mut direct = Vec::new();
        let mut tern = Vec::new();
        for i in 0..rounds {
            eprintln!("[{label}] round {}: QEMU direct", i + 1);
            direct.push(rt.block_on(qemu_direct(
                &g,
                append,
                &work.path().join(format!("r{i}")),
            ))?);
            eprintln!("[{label}] round {}: via tern", i + 1);
            tern.push(via_tern(&bin, &g, append, &[])?);
        }
        let row = |name: &str, v: &[Sample]| {
            format!(
                "| {label} | {name} | {:.0} | {:.0} | {:.0} | {:.0} | {:.0} | {:.0} | {:.2} |\n",
                median(v.iter().map(|s| s.total_ms).collect()),
                median(v.iter().map(|s| s.qemu_ms).collect()),
                median(v.iter().map(|s| s.downtime_ms).collect()),
                median(v.iter().map(|s| s.qemu_downtime_ms).collect()),
                median(v.iter().map(|s| s.mbytes).collect()),
                median(v.iter().map(|s| s.throughput_mbps).collect()),
                median(v.iter().map(|s| s.cpu_s).collect()),
            )
        };
        out.push_str(&row("QEMU direct", &direct));
        out.push_str(&row("tern", &tern));
        let d_down = median(tern.iter().map(|s| s.downtime_ms).collect())
            - median(direct.iter().map(|s| s.downtime_ms).collect());
        let thr = median(tern.iter().map(|s| s.throughput_mbps).collect())
            / median(direct.iter().map(|s| s.throughput_mbps).collect()).max(1e-9);
        ratios.push_str(&format!(
            "- {label}: tern adds {d_down:+.0} ms of end-to-end downtime (target <= +10 ms); throughput {:.2}x QEMU's (target >= 0.90x)\n",
            thr
        ));
    }
    out.push('\n');
    out.push_str(&ratios);
    emit(&out)
}

/// The migrate request of a bench: downtime limit 300 ms, plus the fields of
/// TERN_BENCH_REQUEST (e.g. '{"dedup": false}' to measure one part of the data path).
/// `bench_request` as a whole request to `to` (for a plan).
pub(crate) fn bench_request_to(to: &str) -> Result<serde_json::Value> {
    let mut req = bench_request()?;
    req["to"] = json!(to);
    Ok(req)
}

pub(crate) fn bench_request() -> Result<serde_json::Value> {
    let mut req = json!({ "downtime_ms": 300 });
    if let Ok(extra) = std::env::var("TERN_BENCH_REQUEST") {
        let extra: serde_json::Value =
            serde_json::from_str(&extra).context("TERN_BENCH_REQUEST")?;
        for (k, v) in extra.as_object().context("TERN_BENCH_REQUEST: an object")? {
            req[k] = v.clone();
        }
    }
    Ok(req)
}

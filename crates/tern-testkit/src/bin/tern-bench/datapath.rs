//! `tern-bench datapath`: the pure data path. A paused guest whose memory is filled with
//! non-zero data (guest workload `fill`: half English-like text, half random bytes, every
//! page distinct, so there is nothing to deduplicate), migrated over loopback by QEMU
//! itself (QEMU to QEMU over TCP) and through two tern agents, alternating, one fresh guest
//! per run. The guest is paused, so nothing is dirtied and nothing runs but the migration:
//! what is measured is how fast each path moves memory, and what CPU it costs.
//!
//! Usage: tern-bench datapath --tern PATH [--sizes 2048,8192] [--rounds 5] [--out FILE]

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use serde_json::json;
use tern_testkit::agents::{wait_for_text, TestAgent};
use tern_testkit::guest::GuestImage;

use crate::{direct_pair, machine_cpu_seconds, median, spec};

/// What one paused migration did.
struct Run {
    /// From the migrate command to the destination holding everything.
    wall_ms: f64,
    /// The source QEMU's own migration time.
    qemu_ms: f64,
    /// Bytes of QEMU's stream.
    bytes: f64,
    /// Busy CPU seconds of the machine, and of its processes by name, during the run.
    cpu_s: f64,
    cpu_by: HashMap<&'static str, f64>,
    /// What tern's report says of its data path (tern runs only).
    data_path: String,
}

impl Run {
    fn gbit_s(&self) -> f64 {
        self.bytes * 8.0 / 1e9 / (self.qemu_ms / 1000.0).max(1e-6)
    }
    fn cpu_per_gib(&self) -> f64 {
        self.cpu_s / (self.bytes / (1u64 << 30) as f64).max(1e-9)
    }
}

/// Busy CPU seconds of the processes this benchmark cares about, by kind, over a run:
/// a thread samples every process of each kind every 100 ms and keeps what it last saw
/// (so a QEMU that quits at the end of the run still counts, up to its last 100 ms).
struct ProcessCpu {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    thread: Option<std::thread::JoinHandle<HashMap<&'static str, f64>>>,
}

/// (pid, kind, CPU seconds so far) of every QEMU and tern process.
fn scan() -> Vec<(u32, &'static str, f64)> {
    let tick = 100.0; // USER_HZ
    let mut v = Vec::new();
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return v;
    };
    for e in dir.flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|p| p.parse().ok()) else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(e.path().join("stat")) else {
            continue;
        };
        // pid (comm) state ... utime stime: fields 14 and 15, the 12th and 13th after ')'
        let Some((head, rest)) = stat.rsplit_once(')') else {
            continue;
        };
        let kind = if head.contains("(qemu-system") {
            "QEMUs"
        } else if head.ends_with("(tern") {
            "agents"
        } else {
            continue;
        };
        let f: Vec<&str> = rest.split_whitespace().collect();
        let ticks: f64 = [11, 12]
            .iter()
            .filter_map(|i| f.get(*i)?.parse::<f64>().ok())
            .sum();
        v.push((pid, kind, ticks / tick));
    }
    v
}

impl ProcessCpu {
    fn start() -> ProcessCpu {
        use std::sync::atomic::Ordering;
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let s = stop.clone();
        let first: HashMap<u32, f64> = scan().into_iter().map(|(p, _, c)| (p, c)).collect();
        let thread = std::thread::spawn(move || {
            let mut last: HashMap<u32, (&'static str, f64)> = HashMap::new();
            loop {
                for (pid, kind, cpu) in scan() {
                    last.insert(pid, (kind, cpu));
                }
                if s.load(Ordering::Relaxed) {
                    break;
                }
                std::thread::sleep(Duration::from_millis(100));
            }
            let mut by: HashMap<&'static str, f64> = HashMap::new();
            for (pid, (kind, cpu)) in last {
                *by.entry(kind).or_default() += cpu - first.get(&pid).copied().unwrap_or(0.0);
            }
            by
        });
        ProcessCpu {
            stop,
            thread: Some(thread),
        }
    }

    fn finish(mut self) -> HashMap<&'static str, f64> {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        self.thread
            .take()
            .and_then(|t| t.join().ok())
            .unwrap_or_default()
    }
}

fn guest_spec(g: &GuestImage, name: &str, mib: u32) -> tern_qemu::spec::VmSpec {
    // leave the guest kernel its own (256 MiB, or 1/16 of a large guest: page tables and
    // the kernel's own structures grow with it); fill the rest
    let fill = mib.saturating_sub((mib / 16).max(256));
    let mut s = spec(name, g, &format!("tern.workload=fill tern.mib={fill}"));
    s.memory_mib = mib;
    s
}

/// QEMU to QEMU over loopback TCP, the guest paused before the migration starts.
async fn direct(g: &GuestImage, mib: u32, work: &Path) -> Result<Run> {
    let s = guest_spec(g, "bench-direct", mib);
    let (mut src, mut dst, uri) = direct_pair(&s, work, Duration::from_secs(600)).await?;
    src.qmp.execute("stop", None).await?;
    let cpu0 = (machine_cpu_seconds(), ProcessCpu::start());
    let t0 = Instant::now();
    src.qmp
        .execute("migrate", Some(json!({ "uri": uri })))
        .await?;
    let deadline = t0 + Duration::from_secs(600);
    loop {
        let d = dst.qmp.query_migrate().await?;
        match d.status.as_str() {
            "completed" => break,
            "failed" | "cancelled" => bail!("QEMU direct: the destination says {}", d.status),
            _ if Instant::now() > deadline => bail!("QEMU direct: not done in 600 s"),
            _ => tokio::time::sleep(Duration::from_millis(20)).await,
        }
    }
    let wall = t0.elapsed();
    let cpu1 = machine_cpu_seconds();
    let cpu_by = cpu0.1.finish();
    let info = src.qmp.query_migrate().await?;
    if info.status != "completed" {
        bail!("QEMU direct migration ended {:?}", info.status);
    }
    src.quit(Duration::from_secs(5)).await;
    dst.quit(Duration::from_secs(5)).await;
    Ok(Run {
        wall_ms: wall.as_secs_f64() * 1000.0,
        qemu_ms: info.total_time_ms.unwrap_or(0) as f64,
        bytes: info.ram_transferred.unwrap_or(0) as f64,
        cpu_s: cpu1 - cpu0.0,
        cpu_by,
        data_path: String::new(),
    })
}

/// The same through two tern agents.
fn via_tern(bin: &Path, g: &GuestImage, mib: u32) -> Result<Run> {
    let a = TestAgent::start(bin, "bench-a", &[])?;
    let b = TestAgent::start(bin, "bench-b", &[])?;
    let s = guest_spec(g, "bench-tern", mib);
    let info = a.start_vm(&s.to_toml())?;
    let console = PathBuf::from(info["console_log"].as_str().context("console")?);
    wait_for_text(&console, "TERN-READY", Duration::from_secs(600))?;
    a.qmp("bench-tern", "stop", None)?;
    let req = super::bench_request()?;
    let cpu0 = (machine_cpu_seconds(), ProcessCpu::start());
    let t0 = Instant::now();
    let id = a.start_migration("bench-tern", &b.peer_addr.to_string(), req)?;
    let st = a.wait_migration(&id, Duration::from_secs(600))?;
    let wall = t0.elapsed();
    let cpu1 = machine_cpu_seconds();
    let cpu_by = cpu0.1.finish();
    let r = st
        .report
        .with_context(|| format!("tern migration failed: {:?}", st.error))?;
    let e = &r.encoding;
    Ok(Run {
        wall_ms: wall.as_secs_f64() * 1000.0,
        qemu_ms: r.qemu_total_time_ms.unwrap_or(0) as f64,
        bytes: r.bytes_from_qemu as f64,
        cpu_s: cpu1 - cpu0.0,
        cpu_by,
        data_path: format!(
            "{} ({} changes), {} ({} changes)",
            e.data_path, e.data_path_switches, e.codec, e.codec_switches
        ),
    })
}

pub fn bench(bin: &Path, g: &GuestImage, sizes: &[u32], rounds: usize) -> Result<String> {
    let work = tempfile::Builder::new()
        .prefix("tern-bench-dp-")
        .tempdir_in("/tmp")?;
    let rt = tokio::runtime::Runtime::new()?;
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let mut out = format!(
        "Paused guest filled with non-zero data (half text, half random, every page distinct), \
         loopback, {cores} cores shared by both QEMUs and (tern) both agents; alternating runs, \
         median of {rounds}; TLS on.\n\n\
         | guest | path | QEMU migration ms | wall ms (migrate to destination done) | GB of stream | Gbit/s (stream / QEMU time) | CPU s | CPU s per GiB | CPU s of QEMUs / agents | data path |\n\
         |---|---|---|---|---|---|---|---|---|---|\n"
    );
    let mut verdicts = String::new();
    for &mib in sizes {
        let mut d = Vec::new();
        let mut t = Vec::new();
        for i in 0..rounds {
            eprintln!("[{mib} MiB] round {}: QEMU direct", i + 1);
            let r = rt.block_on(direct(g, mib, &work.path().join(format!("{mib}-{i}"))))?;
            eprintln!(
                "  {:.0} ms, {:.2} Gbit/s, {:.2} CPU s",
                r.qemu_ms,
                r.gbit_s(),
                r.cpu_s
            );
            d.push(r);
            eprintln!("[{mib} MiB] round {}: via tern", i + 1);
            let r = via_tern(bin, g, mib)?;
            eprintln!(
                "  {:.0} ms, {:.2} Gbit/s, {:.2} CPU s, {}",
                r.qemu_ms,
                r.gbit_s(),
                r.cpu_s,
                r.data_path
            );
            t.push(r);
        }
        let row = |name: &str, v: &[Run]| {
            let by = |k: &str| {
                median(
                    v.iter()
                        .map(|r| r.cpu_by.get(k).copied().unwrap_or(0.0))
                        .collect(),
                )
            };
            format!(
                "| {mib} MiB | {name} | {:.0} | {:.0} | {:.2} | {:.2} | {:.2} | {:.2} | {:.2} / {:.2} | {} |\n",
                median(v.iter().map(|r| r.qemu_ms).collect()),
                median(v.iter().map(|r| r.wall_ms).collect()),
                median(v.iter().map(|r| r.bytes / 1e9).collect()),
                median(v.iter().map(Run::gbit_s).collect()),
                median(v.iter().map(|r| r.cpu_s).collect()),
                median(v.iter().map(Run::cpu_per_gib).collect()),
                by("QEMUs"),
                by("agents"),
                v.last().map(|r| r.data_path.as_str()).unwrap_or(""),
            )
        };
        out.push_str(&row("QEMU direct", &d));
        out.push_str(&row("tern", &t));
        let thr = median(t.iter().map(Run::gbit_s).collect())
            / median(d.iter().map(Run::gbit_s).collect()).max(1e-9);
        let cpu = median(t.iter().map(Run::cpu_per_gib).collect())
            / median(d.iter().map(Run::cpu_per_gib).collect()).max(1e-9);
        verdicts.push_str(&format!(
            "- {mib} MiB: tern's throughput {thr:.2}x QEMU's (target >= 0.90x); CPU per GiB {cpu:.2}x QEMU's\n"
        ));
    }
    out.push('\n');
    out.push_str(&verdicts);
    Ok(out)
}

//! `tern-bench upgrade`: what a same-host upgrade (`tern vm upgrade`, memory handed over)
//! costs against a normal migration of the same guest over loopback between two agents on
//! this machine, for guests of several sizes. Each guest fills the same amount of memory
//! (the rest stays untouched), then runs idle: the upgrade's pause should not grow with
//! the guest's size, a copy's does. QEMU's own cpr-transfer between two QEMUs (no tern)
//! is measured in the same run, on the same guest configuration.
//!
//! Usage: tern-bench upgrade --tern target/release/tern [--sizes 1024,4096,16384]
//! [--fill-mib 512] [--rounds 3] [--out FILE]

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use serde_json::json;
use tern_api::vm::UpgradeReport;
use tern_qemu::launch::{CprIncoming, LaunchOptions, QemuProcess};
use tern_qemu::spec::VmSpec;
use tern_testkit::agents::{wait_for_text, TestAgent};
use tern_testkit::guest::GuestImage;

use super::{bench_request, machine_cpu_seconds, median, spec};

struct Row {
    mib: u32,
    /// QEMU's own cpr-transfer, QEMU to QEMU (no tern): paused ms, QEMU's downtime ms.
    direct: Vec<(f64, f64)>,
    upgrades: Vec<UpgradeReport>,
    upgrade_cpu_s: Vec<f64>,
    /// The migration, or why the agents refused it.
    migrate: Result<Migrated, String>,
}

struct Migrated {
    downtime_ms: f64,
    total_ms: f64,
    mb: f64,
    cpu_s: f64,
}

/// QEMU's own same-host hand-over, without tern: `rounds` cpr-transfers in a row (each
/// new QEMU the next one's source), from `migrate` to the new QEMU running (polled every
/// 2 ms, as tern's own wait polls).
async fn qemu_direct(s: &VmSpec, work: &Path, rounds: usize) -> Result<Vec<(f64, f64)>> {
    let mut src = QemuProcess::launch(s, &LaunchOptions::new(work.join("d0"))).await?;
    wait_for_text(&src.console_log, "TERN-READY", Duration::from_secs(600))?;
    let mut out = Vec::new();
    for i in 1..=rounds {
        let hand = work.join(format!("h{i}"));
        std::fs::create_dir_all(&hand)?;
        let mut o = LaunchOptions::new(work.join(format!("d{i}")));
        o.cpr_incoming = Some(CprIncoming {
            main: hand.join("main.sock"),
            cpr: hand.join("cpr.sock"),
        });
        let launch = QemuProcess::launch(s, &o);
        tokio::pin!(launch);
        let cpr = hand.join("cpr.sock");
        while !cpr.exists() {
            tokio::select! {
                r = &mut launch => {
                    r?;
                    anyhow::bail!("the new QEMU answered before the memory came");
                }
                _ = tokio::time::sleep(Duration::from_millis(5)) => {}
            }
        }
        src.qmp
            .set_migrate_parameters(json!({ "mode": "cpr-transfer" }))
            .await?;
        let t0 = Instant::now();
        src.qmp
            .execute(
                "migrate",
                Some(json!({ "channels": [
                    { "channel-type": "main", "addr": { "transport": "socket", "type": "unix",
                      "path": hand.join("main.sock").to_string_lossy() } },
                    { "channel-type": "cpr", "addr": { "transport": "socket", "type": "unix",
                      "path": cpr.to_string_lossy() } } ] })),
            )
            .await?;
        let dst = launch.await?;
        while !dst.qmp.query_status().await?.running {
            anyhow::ensure!(
                t0.elapsed() < Duration::from_secs(60),
                "the new QEMU never ran"
            );
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        let paused = t0.elapsed().as_secs_f64() * 1e3;
        let qemu = src.qmp.query_migrate().await?.downtime_ms.unwrap_or(0) as f64;
        eprintln!("  QEMU direct {i}: {paused:.0} ms paused (QEMU {qemu} ms)");
        out.push((paused, qemu));
        src.kill().await;
        src = dst;
    }
    src.kill().await;
    Ok(out)
}

pub fn bench(
    bin: &Path,
    g: &GuestImage,
    sizes: &[u32],
    fill: u32,
    rounds: usize,
) -> Result<String> {
    let rt = tokio::runtime::Runtime::new()?;
    let mut rows = Vec::new();
    for &mib in sizes {
        eprintln!("[{mib} MiB] boot, fill {fill} MiB");
        let a = TestAgent::start(bin, "bench-a", &[])?;
        let b = TestAgent::start(bin, "bench-b", &[])?;
        let mut s = spec(
            "bench-up",
            g,
            &format!("tern.workload=fill tern.mib={fill}"),
        );
        s.memory_mib = mib;
        s.memory = tern_qemu::spec::GuestMemory::Shared;
        eprintln!("[{mib} MiB] QEMU's own cpr-transfer, no tern");
        let work = tempfile::Builder::new()
            .prefix("tern-bench-")
            .tempdir_in("/tmp")?;
        let direct = rt.block_on(qemu_direct(&s, work.path(), rounds))?;
        let info = a.start_vm(&s.to_toml())?;
        let console = PathBuf::from(info["console_log"].as_str().context("console")?);
        wait_for_text(&console, "TERN-READY", Duration::from_secs(600))?;
        let mut upgrades = Vec::new();
        let mut upgrade_cpu_s = Vec::new();
        for i in 0..rounds {
            let cpu0 = machine_cpu_seconds();
            let v = a
                .call("POST", "/v1/vms/bench-up/upgrade", Some(&json!({})))
                .with_context(|| format!("upgrade {} of the {mib} MiB guest", i + 1))?;
            upgrade_cpu_s.push(machine_cpu_seconds() - cpu0);
            let r: UpgradeReport = serde_json::from_value(v)?;
            eprintln!(
                "  upgrade {}: {:?} ms paused (QEMU {} ms), {} B of device state, {} RAM B",
                i + 1,
                r.downtime_ms,
                r.qemu_downtime_ms,
                r.stream_bytes,
                r.ram_bytes_copied
            );
            upgrades.push(r);
        }
        // both ends of this migration live on this machine, and each fills the guest's
        // shared memory completely (tern_engine::hostmem): skip what cannot fit twice
        let available = tern_engine::hostmem::available_mib().unwrap_or(0);
        if 2 * u64::from(mib) + 1024 > available {
            let why = format!(
                "both ends are on this machine and each fills all {mib} MiB of shared memory; {available} MiB available"
            );
            eprintln!("  migration skipped: {why}");
            rows.push(Row {
                mib,
                direct: direct.clone(),
                upgrades,
                upgrade_cpu_s,
                migrate: Err(why),
            });
            continue;
        }
        eprintln!("[{mib} MiB] migrate to a second agent over loopback");
        let cpu0 = machine_cpu_seconds();
        let id = a.start_migration("bench-up", &b.peer_addr.to_string(), bench_request()?)?;
        let st = a.wait_migration(&id, Duration::from_secs(900))?;
        let cpu = machine_cpu_seconds() - cpu0;
        let Some(r) = st.report else {
            // a guest too large to fill twice here is refused (crate::hostmem), not killed
            let e = st.error.context("neither report nor error")?;
            anyhow::ensure!(
                e.code == "resource-exhausted",
                "the migration failed: {e:?}"
            );
            eprintln!("  migration refused: {}", e.message);
            rows.push(Row {
                mib,
                direct: direct.clone(),
                upgrades,
                upgrade_cpu_s,
                migrate: Err(e.message),
            });
            continue;
        };
        eprintln!(
            "  migration: {} ms paused, {} ms in all, {} B on the wire",
            r.downtime_ms, r.total_time_ms, r.bytes_on_wire
        );
        rows.push(Row {
            mib,
            direct,
            upgrades,
            upgrade_cpu_s,
            migrate: Ok(Migrated {
                downtime_ms: r.downtime_ms as f64,
                total_ms: r.total_time_ms as f64,
                mb: r.bytes_on_wire as f64 / 1e6,
                cpu_s: cpu,
            }),
        });
    }
    let mut out = format!(
        "Same host, 2 cores shared by every QEMU and agent, TCG. Each guest filled {fill} MiB, then idle. \
         Upgrade: median of {rounds} in a row on one guest; migration: one, to a second agent over loopback (TLS), after the upgrades.\n\n\
         QEMU direct: QEMU's own cpr-transfer between two QEMUs (no tern, no sandbox), median of {rounds}, `migrate` to the new QEMU running.\n\n\
         | guest | QEMU direct: paused ms | tern upgrade: paused ms (stop to running) | tern / QEMU direct | QEMU's own downtime ms (tern's run) | total ms | device state KB | RAM copied B | CPU s | migration: paused ms | total ms | MB on the wire | CPU s | paused, upgrade / migration |\n\
         |---|---|---|---|---|---|---|---|---|---|---|---|---|---|\n"
    );
    for r in &rows {
        let m = |f: &dyn Fn(&UpgradeReport) -> f64| median(r.upgrades.iter().map(f).collect());
        let paused = m(&|u| u.downtime_ms.unwrap_or(0) as f64);
        let migration = match &r.migrate {
            Ok(x) => format!(
                "{:.0} | {:.0} | {:.1} | {:.2} | {:.3}x",
                x.downtime_ms,
                x.total_ms,
                x.mb,
                x.cpu_s,
                paused / x.downtime_ms.max(1.0)
            ),
            Err(why) => format!("not run: {why} | | | | "),
        };
        let direct = median(r.direct.iter().map(|d| d.0).collect());
        out += &format!(
            "| {} GiB | {direct:.0} | {:.0} | {:.2}x | {:.0} | {:.0} | {:.0} | {:.0} | {:.2} | {migration} |\n",
            r.mib / 1024,
            paused,
            paused / direct.max(1.0),
            m(&|u| u.qemu_downtime_ms as f64),
            m(&|u| u.total_ms as f64),
            m(&|u| u.stream_bytes as f64 / 1e3),
            m(&|u| u.ram_bytes_copied as f64),
            median(r.upgrade_cpu_s.clone()),
        );
    }
    Ok(out)
}

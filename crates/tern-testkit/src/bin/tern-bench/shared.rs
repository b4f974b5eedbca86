//! `tern-bench shared`: a migration on a link it shares with other traffic. The WAN lab of
//! `scripts/wan.sh` (100 Mbit/s, 50 ms by default) carries one bulk TCP flow from host A
//! to host B for the whole run (socat, `CrossTraffic`), and the same guest (incompressible
//! memory, nothing for compression or dedup to win) migrates beside it: QEMU's own
//! precopy, tern `fastest` (its default), tern `least-link-use`, and tern with a deadline
//! of 2.5x QEMU's time. For each: how long the migration took, its downtime, and what
//! the other flow got while it ran, against what it gets alone; ratios against QEMU's
//! migration in the same run.
//!
//! Usage: tern-bench shared --tern target/release/tern [--profile wan-100m-50ms]
//!        [--mem-mib 512] [--fill-mib 320] [--out FILE]

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{bail, Result};
use serde_json::json;
use tern_testkit::agents::{CrossTraffic, WanLab};
use tern_testkit::guest::GuestImage;

use super::wan::{agents, boot, qemu_direct, via_tern_with, vm_spec, QemuMode, Run, Workload};

const MIB: f64 = 1048576.0;

struct Row {
    label: String,
    run: Run,
    /// The other flow's rate while the migration ran, bytes/s.
    other: f64,
}

pub fn bench(
    bin: &Path,
    g: &GuestImage,
    profile: &str,
    mem_mib: u32,
    fill_mib: u32,
) -> Result<String> {
    let _lab = WanLab::up(profile)?;
    let rt = tokio::runtime::Runtime::new()?;
    let limit = Duration::from_secs(600);
    let w = Workload {
        label: "random memory",
        append: format!("tern.workload=random tern.mib={fill_mib} tern.rate=1"),
        running: "tern-random pass",
    };
    let work = tempfile::Builder::new()
        .prefix("tern-bench-shared-")
        .tempdir_in("/tmp")?;

    // what the other flow gets alone
    let alone = {
        let cross = CrossTraffic::start(5300)?;
        std::thread::sleep(Duration::from_secs(8));
        let now = Instant::now();
        cross.rate(now - Duration::from_secs(5), now)
    };
    eprintln!("other flow alone: {:.1} MiB/s", alone / MIB);
    if alone < MIB {
        bail!(
            "the other flow got {:.2} MiB/s alone: is socat installed (bash scripts/setup.sh)?",
            alone / MIB
        );
    }

    let mut rows: Vec<Row> = Vec::new();
    let beside = |port: u16, f: &mut dyn FnMut() -> Result<Run>| -> Result<(Run, f64)> {
        let cross = CrossTraffic::start(port)?;
        // the flow at full speed before the migration starts
        std::thread::sleep(Duration::from_secs(4));
        let run = f()?;
        let other = cross.rate(run.span.0, run.span.1);
        Ok((run, other))
    };

    eprintln!("[shared] QEMU precopy");
    let mut port = 5301;
    let (qemu, other) = beside(port, &mut || {
        rt.block_on(qemu_direct(
            g,
            &w,
            mem_mib,
            &work.path().join("qemu"),
            QemuMode::Precopy,
            limit,
        ))
    })?;
    let qemu_s = qemu.total_s;
    rows.push(Row {
        label: "QEMU precopy".into(),
        run: qemu,
        other,
    });
    let deadline_s = (qemu_s * 2.5).round().max(30.0) as u64;
    for (label, extra) in [
        ("tern fastest (default)".to_string(), json!({})),
        (
            "tern least-link-use".to_string(),
            json!({ "objective": "least-link-use" }),
        ),
        (
            format!("tern --deadline {deadline_s}s (2.5x QEMU's time)"),
            json!({ "deadline_s": deadline_s }),
        ),
    ] {
        eprintln!("[shared] {label}");
        port += 1;
        let dir = work.path().join(format!("tern-{port}"));
        std::fs::create_dir_all(&dir)?;
        let (a, b) = agents(bin, &dir)?;
        let s = vm_spec("shared-vm", g, mem_mib, &w.append);
        boot(&a, &s, &w)?;
        let (run, other) = beside(port, &mut || {
            via_tern_with(&a, "shared-vm", limit, extra.clone())
        })?;
        let _ = b.call("DELETE", "/v1/vms/shared-vm", None);
        drop((a, b));
        rows.push(Row { label, run, other });
    }

    let mut out = format!(
        "Profile {profile}, {mem_mib} MiB guest with {fill_mib} MiB of random memory (rewriting 1 MiB/s), \
         one bulk TCP flow from host A to host B through the whole run; one run each, same machine and link. \
         The other flow alone: {:.1} MiB/s.\n\n\
         | migration | outcome | total s | downtime ms | migration MiB/s | other flow MiB/s during | other flow's share of what it gets alone |\n|---|---|---|---|---|---|---|\n",
        alone / MIB
    );
    let f = |x: f64, p: usize| {
        if x.is_nan() {
            "-".to_string()
        } else {
            format!("{x:.p$}")
        }
    };
    for r in &rows {
        // host A's link carried both: the migration's part is what the other flow did not
        let secs = r.run.total_s.max(1e-3);
        let migration = (r.run.link_mb * 1e6 - r.other * secs).max(0.0) / secs;
        out.push_str(&format!(
            "| {} | {} | {} | {} | {} | {} | {:.0}% |\n",
            r.label,
            r.run.outcome,
            f(r.run.total_s, 1),
            f(r.run.downtime_ms, 0),
            f(migration / MIB, 1),
            f(r.other / MIB, 1),
            100.0 * r.other / alone
        ));
    }
    out.push('\n');
    let q = &rows[0];
    for r in &rows[1..] {
        out.push_str(&format!(
            "- {} / QEMU precopy: total time {:.2}x, downtime {:.2}x, the other flow's rate {:.2}x\n",
            r.label,
            r.run.total_s / q.run.total_s,
            r.run.downtime_ms / q.run.downtime_ms,
            r.other / q.other
        ));
    }
    Ok(out)
}

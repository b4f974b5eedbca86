//! `tern-bench postcopy`: post-copy through tern against QEMU's own post-copy, with and
//! without its preempt channel, across the emulated WAN (`scripts/wan.sh`): the same guest
//! writing fresh random data at 1.5x the link, the same link, the same run. Each switches
//! to post-copy after QEMU's first pass. For each: the total time, the time until the VM
//! runs at the destination, the downtime, the bytes on host A's link, and the guest's
//! dirtying rate before the migration (at A) and at the destination while post-copy
//! fetched its pages (the slowdown the page faults cost it). Then tern with post-copy as
//! the last resort (`postcopy_fallback`, the throttle allowed up to 30%): pre-copy first,
//! post-copy once the throttle did not make it converge.

use std::path::Path;
use std::time::Duration;

use anyhow::Result;
use serde_json::json;
use tern_testkit::agents::WanLab;
use tern_testkit::guest::GuestImage;

use super::wan::{self, QemuMode, Run, Workload};

pub fn bench(
    bin: &Path,
    g: &GuestImage,
    profile: &str,
    mem_mib: u32,
    limit: Duration,
    tern_only: bool,
) -> Result<String> {
    let _lab = WanLab::up(profile)?;
    let rt = tokio::runtime::Runtime::new()?;
    let rate = wan::dirtier_rate(profile);
    let w = Workload {
        label: "random dirtier at 1.5x the link (incompressible)",
        append: format!("tern.workload=random tern.mib=128 tern.rate={rate} tern.pace=cpu"),
        running: "tern-random pass",
    };
    let work = tempfile::Builder::new()
        .prefix("tern-bench-postcopy-")
        .tempdir_in("/tmp")?;
    let mut runs: Vec<Run> = Vec::new();
    let modes = if tern_only {
        vec![]
    } else {
        vec![QemuMode::Postcopy, QemuMode::PostcopyPreempt]
    };
    for mode in modes {
        eprintln!("[postcopy] QEMU {mode:?}");
        let dir = work.path().join(format!("{mode:?}"));
        runs.push(rt.block_on(wan::qemu_direct(g, &w, mem_mib, &dir, mode, limit))?);
    }
    let terns = [
        (
            "tern --postcopy",
            json!({ "postcopy": true, "max_throttle": 0 }),
        ),
        (
            "tern --postcopy-fallback --max-throttle 30",
            json!({ "postcopy_fallback": true, "max_throttle": 30 }),
        ),
    ];
    for (i, (label, req)) in terns.into_iter().enumerate() {
        eprintln!("[postcopy] {label}");
        let dir = work.path().join(format!("tern-{i}"));
        std::fs::create_dir_all(&dir)?;
        let (a, b) = wan::agents(bin, &dir)?;
        wan::boot(&a, &wan::vm_spec("wan-vm", g, mem_mib, &w.append), &w)?;
        let mut t = wan::via_tern_with(&a, "wan-vm", limit, req)?;
        t.path = label.into();
        if let Ok(console) = b.console_log("wan-vm") {
            t.rate_at_b = wan::mean_rate(&wan::console_from(&console, 0).0);
        }
        if t.switch_s.is_nan() {
            // not post-copy after all: what the source said of it
            for l in a
                .log_text()
                .lines()
                .filter(|l| l.contains("post-copy") || l.contains("pre-copy"))
            {
                eprintln!("  source: {l}");
            }
        }
        let _ = b.call("DELETE", "/v1/vms/wan-vm", None);
        drop((a, b));
        runs.push(t);
    }

    let f = wan::cell;
    let mut out = format!(
        "Profile {profile}, {mem_mib} MiB guest writing fresh random data over 128 MiB at {rate} MiB/s (1.5x the link), \
         post-copy after QEMU's first pass, one run each, same machine and link. Bytes: host A's link, both directions. \
         Downtime: source STOP to destination RESUME. Guest rate: the guest's own dirtying rate, MiB/s (its console), \
         before the migration at A, at A during pre-copy, and at B from the switchover to the end; throttle: the most tern applied. Page requests: what the destination QEMU asked \
         for (QEMU: the source's `postcopy-requests`; tern: counted by the destination agent); vCPU blocked: the destination \
         QEMU's `postcopy-vcpu-blocktime` (the guest has one vCPU).\n\n\
         | path | outcome | total s | to switchover s | downtime ms | link MB | CPU s (machine) | guest MiB/s before | at A during pre-copy | throttle % | at B during post-copy | page requests | vCPU blocked s |\n\
         |---|---|---|---|---|---|---|---|---|---|---|---|---|\n"
    );
    for r in &runs {
        out.push_str(&format!(
            "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |\n",
            r.path,
            r.outcome,
            f(r.total_s, 1),
            f(r.switch_s, 1),
            f(r.downtime_ms, 0),
            f(r.link_mb, 1),
            f(r.cpu_s, 1),
            f(r.guest_rate_before, 1),
            f(r.guest_rate, 1),
            r.throttle.map_or("-".into(), |t| t.to_string()),
            f(r.rate_at_b, 1),
            f(r.page_requests, 0),
            f(r.vcpu_blocked_ms / 1e3, 1),
        ));
    }
    out.push('\n');
    let (qemu, tern) = runs.split_at(runs.len() - 2);
    for (t, q) in tern.iter().flat_map(|t| qemu.iter().map(move |q| (t, q))) {
        out.push_str(&format!(
            "- {} vs {}: total time {:.2}x, time to switchover {:.2}x, downtime {:.2}x, bytes {:.2}x, guest rate at B during post-copy {:.2}x, vCPU blocked {:.2}x\n",
            t.path,
            q.path,
            t.total_s / q.total_s,
            t.switch_s / q.switch_s,
            t.downtime_ms / q.downtime_ms,
            t.link_mb / q.link_mb,
            t.rate_at_b / q.rate_at_b,
            t.vcpu_blocked_ms / q.vcpu_blocked_ms,
        ));
    }
    Ok(out)
}

//! `tern-bench wan`: tern against QEMU's own migration across the emulated WAN of
//! `scripts/wan.sh` (two network namespaces, tc rate limit, userspace delay), same guest,
//! same link, same run. For every workload: QEMU precopy (downtime limit 300 ms, no rate
//! cap), QEMU postcopy (switched to after the first pass), and tern (defaults). Bytes are
//! counted on host A's link (both directions, headers included) for all three alike;
//! downtime is end to end, source STOP event to destination RESUME event.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use serde_json::json;
use tern_qemu::launch::{LaunchOptions, QemuProcess};
use tern_qemu::spec::VmSpec;
use tern_testkit::agents::{wait_for_text, AgentOptions, TestAgent, WanLab};
use tern_testkit::guest::GuestImage;

use super::{event_us, machine_cpu_seconds};

/// One migration's outcome.
pub struct Run {
    pub path: String,
    /// "completed", or why not.
    pub outcome: String,
    pub total_s: f64,
    pub downtime_ms: f64,
    pub qemu_downtime_ms: f64,
    pub link_mb: f64,
    pub cpu_s: f64,
    /// The guest's own dirtying rate while it ran at the source during the migration,
    /// against before it (MiB/s, from its console; NaN: it prints none).
    pub guest_rate: f64,
    pub guest_rate_before: f64,
    /// tern: the highest throttle it applied (QEMU auto-converge: the last one seen).
    pub throttle: Option<u64>,
    /// When the migration was started and when it ended.
    pub span: (Instant, Instant),
    /// Post-copy: from the start to the VM running at the destination (s; NaN: not
    /// post-copy), and the guest's dirtying rate there until the migration ended (MiB/s).
    pub switch_s: f64,
    pub rate_at_b: f64,
    /// Post-copy: the destination's page requests and the most one vCPU waited on them
    /// (ms, QEMU's `postcopy-vcpu-blocktime`); NaN: not measured.
    pub page_requests: f64,
    pub vcpu_blocked_ms: f64,
}

/// The mean of the `rate=R MiB/s` lines a dirtier printed in `text` (NaN: none).
pub(crate) fn mean_rate(text: &str) -> f64 {
    let v: Vec<f64> = text
        .lines()
        .filter_map(|l| {
            l.split("rate=")
                .nth(1)?
                .split_whitespace()
                .next()?
                .parse()
                .ok()
        })
        .collect();
    if v.is_empty() {
        f64::NAN
    } else {
        v.iter().sum::<f64>() / v.len() as f64
    }
}

/// What the console at `path` holds from byte `from` on, and its length now.
pub(crate) fn console_from(path: &Path, from: usize) -> (String, usize) {
    let b = std::fs::read(path).unwrap_or_default();
    let s = String::from_utf8_lossy(b.get(from.min(b.len())..).unwrap_or_default()).into_owned();
    (s, b.len())
}

impl Run {
    fn completed(&self) -> bool {
        self.outcome == "completed"
    }
}

pub struct Workload {
    pub label: &'static str,
    pub append: String,
    /// A console line that shows the workload is under way (its dirtier runs).
    pub running: &'static str,
}

/// A QEMU binary that runs in a network namespace (`ip netns exec` keeps the pid).
pub(crate) fn qemu_in(ns: &str, work: &Path) -> Result<PathBuf> {
    let p = work.join(format!("qemu-in-{ns}"));
    std::fs::write(
        &p,
        format!("#!/bin/sh\nexec ip netns exec {ns} qemu-system-x86_64 \"$@\"\n"),
    )?;
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755))?;
    Ok(p)
}

pub fn vm_spec(name: &str, g: &GuestImage, mem_mib: u32, append: &str) -> VmSpec {
    let mut s = super::spec(name, g, append);
    s.memory_mib = mem_mib;
    s
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum QemuMode {
    Precopy,
    Postcopy,
    /// Postcopy with its preempt channel (page requests answered on their own connection).
    PostcopyPreempt,
    /// Precopy with QEMU's auto-converge (its defaults: throttle 20%, +10% per step).
    AutoConverge,
}

/// QEMU to QEMU across the WAN lab.
pub async fn qemu_direct(
    g: &GuestImage,
    w: &Workload,
    mem_mib: u32,
    work: &Path,
    mode: QemuMode,
    limit: Duration,
) -> Result<Run> {
    std::fs::create_dir_all(work)?;
    let s = vm_spec("wan-direct", g, mem_mib, &w.append);
    let mut so = LaunchOptions::new(work.join("src"));
    so.qemu_binary = qemu_in("tern-a", work)?;
    let mut src = QemuProcess::launch(&s, &so).await?;
    wait_for_text(&src.console_log, w.running, Duration::from_secs(120))?;
    let mut dopts = LaunchOptions::new(work.join("dst"));
    dopts.qemu_binary = qemu_in("tern-b", work)?;
    dopts.incoming_defer = true;
    let mut dst = QemuProcess::launch(&s, &dopts).await?;
    let post = matches!(mode, QemuMode::Postcopy | QemuMode::PostcopyPreempt);
    for q in [&src.qmp, &dst.qmp] {
        let mut caps = vec![("events", true)];
        if post {
            caps.push(("postcopy-ram", true));
            // (the destination measures what page faults cost its vCPUs)
            caps.push(("postcopy-blocktime", true));
        }
        if mode == QemuMode::PostcopyPreempt {
            caps.push(("postcopy-preempt", true));
        }
        if mode == QemuMode::AutoConverge {
            caps.push(("auto-converge", true));
        }
        q.set_migrate_capabilities(&caps).await?;
    }
    src.qmp
        .set_migrate_parameters(json!({ "downtime-limit": 300, "max-bandwidth": 1u64 << 40 }))
        .await?;
    let uri = "tcp:198.18.0.2:4444";
    dst.qmp
        .execute("migrate-incoming", Some(json!({ "uri": uri })))
        .await?;
    let mut sev = src.qmp.subscribe();
    let mut dev = dst.qmp.subscribe();
    let (before, mark) = console_from(&src.console_log, 0);
    let mut throttle = None;
    let bytes0 = WanLab::link_bytes()?;
    let cpu0 = machine_cpu_seconds();
    let t0 = Instant::now();
    let t0_wall = std::time::SystemTime::now();
    src.qmp
        .execute("migrate", Some(json!({ "uri": uri })))
        .await?;
    let mut switched = false;
    let outcome = loop {
        tokio::time::sleep(Duration::from_millis(200)).await;
        let info = src.qmp.query_migrate().await?;
        throttle = info.cpu_throttle_percentage.or(throttle);
        match info.status.as_str() {
            "completed" => break "completed".to_string(),
            "failed" | "cancelled" => {
                break format!("failed: {}", info.error_desc.unwrap_or_default())
            }
            _ => {}
        }
        if post && !switched && info.dirty_sync_count.unwrap_or(0) >= 2 {
            src.qmp.execute("migrate-start-postcopy", None).await?;
            switched = true;
        }
        if t0.elapsed() > limit {
            let _ = src.qmp.execute("migrate_cancel", None).await;
            break format!("did not converge in {} s", limit.as_secs());
        }
    };
    let total = t0.elapsed();
    let ended = Instant::now();
    let cpu = machine_cpu_seconds() - cpu0;
    let link = WanLab::link_bytes()? - bytes0;
    let info = src.qmp.query_migrate().await?;
    let (during, _) = console_from(&src.console_log, mark);
    let mut run = Run {
        path: match mode {
            QemuMode::Precopy => "QEMU precopy",
            QemuMode::Postcopy => "QEMU postcopy",
            QemuMode::PostcopyPreempt => "QEMU postcopy+preempt",
            QemuMode::AutoConverge => "QEMU auto-converge",
        }
        .into(),
        outcome,
        total_s: total.as_secs_f64(),
        downtime_ms: f64::NAN,
        qemu_downtime_ms: info.downtime_ms.map(|d| d as f64).unwrap_or(f64::NAN),
        link_mb: link as f64 / 1e6,
        cpu_s: cpu,
        guest_rate: mean_rate(&during),
        guest_rate_before: mean_rate(tail_lines(&before, 5)),
        throttle,
        span: (t0, ended),
        switch_s: f64::NAN,
        rate_at_b: f64::NAN,
        page_requests: info.postcopy_requests.map_or(f64::NAN, |n| n as f64),
        vcpu_blocked_ms: f64::NAN,
    };
    if run.completed() {
        let stop = src
            .qmp
            .wait_event(&mut sev, "STOP", Duration::from_secs(5))
            .await?;
        let resume = dst
            .qmp
            .wait_event(&mut dev, "RESUME", Duration::from_secs(60))
            .await?;
        run.downtime_ms = (event_us(resume.timestamp) - event_us(stop.timestamp)) / 1000.0;
        if post {
            run.switch_s = (event_us(resume.timestamp) - event_us(t0_wall)) / 1e6;
            run.rate_at_b = mean_rate(&console_from(&dst.console_log, 0).0);
            // (the destination's blocktime comes once it completed too)
            let mut d = dst.qmp.query_migrate().await?;
            for _ in 0..50 {
                if d.status == "completed" {
                    break;
                }
                let _ = dst
                    .qmp
                    .wait_event(&mut dev, "MIGRATION", Duration::from_millis(200))
                    .await;
                d = dst.qmp.query_migrate().await?;
            }
            run.vcpu_blocked_ms = d
                .postcopy_vcpu_blocktime_ms
                .and_then(|v| v.into_iter().max())
                .map_or(f64::NAN, |ms| ms as f64);
        }
    }
    src.kill().await;
    dst.kill().await;
    Ok(run)
}

/// Two agents in the lab's namespaces, sharing a cluster key, with fresh stores.
pub fn agents(bin: &Path, work: &Path) -> Result<(TestAgent, TestAgent)> {
    let key = work.join("cluster.key");
    let key = key.to_str().context("path")?.to_string();
    let args = ["--cluster-key", key.as_str()];
    let a = TestAgent::start_with(
        bin,
        "wan-a",
        AgentOptions {
            netns: Some("tern-a"),
            listen: Some("198.18.0.1:7700".parse()?),
            args: &args,
            ..Default::default()
        },
    )?;
    let b = TestAgent::start_with(
        bin,
        "wan-b",
        AgentOptions {
            netns: Some("tern-b"),
            listen: Some("198.18.0.2:7700".parse()?),
            args: &args,
            ..Default::default()
        },
    )?;
    Ok((a, b))
}

/// Starts the workload's VM on `a` and waits until it runs.
pub fn boot(a: &TestAgent, s: &VmSpec, w: &Workload) -> Result<()> {
    let info = a.start_vm(&s.to_toml())?;
    let console = PathBuf::from(info["console_log"].as_str().context("console")?);
    wait_for_text(&console, w.running, Duration::from_secs(120))?;
    Ok(())
}

/// Migrates `vm` from `a` to `b` through tern.
pub fn via_tern(a: &TestAgent, vm: &str, limit: Duration) -> Result<Run> {
    via_tern_with(a, vm, limit, json!({}))
}

/// Migrates `vm` from `a` to `b` through tern, with `extra` fields in the request.
pub fn via_tern_with(
    a: &TestAgent,
    vm: &str,
    limit: Duration,
    extra: serde_json::Value,
) -> Result<Run> {
    let console = PathBuf::from(a.vm(vm)?["console_log"].as_str().context("console")?);
    let (before, mark) = console_from(&console, 0);
    let bytes0 = WanLab::link_bytes()?;
    let cpu0 = machine_cpu_seconds();
    let t0 = Instant::now();
    let mut req = super::bench_request()?;
    for (k, v) in extra
        .as_object()
        .context("extra request fields: an object")?
    {
        req[k] = v.clone();
    }
    let id = a.start_migration(vm, "198.18.0.2:7700", req)?;
    // the source's console goes with its run directory once the VM moved: read it while
    // the migration runs
    let mut during = String::new();
    let st = loop {
        let st = a.migration(&id)?;
        let (text, _) = console_from(&console, mark);
        if text.len() >= during.len() {
            during = text;
        }
        if st.finished {
            break st;
        }
        if t0.elapsed() > limit {
            a.call("POST", &format!("/v1/migrations/{id}/cancel"), None)
                .ok();
            break a.wait_migration(&id, Duration::from_secs(30))?;
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    let total = t0.elapsed();
    let ended = Instant::now();
    let cpu = machine_cpu_seconds() - cpu0;
    let link = WanLab::link_bytes()? - bytes0;
    let (outcome, downtime, qd) = match &st.report {
        Some(r) => (
            "completed".to_string(),
            r.downtime_ms as f64,
            r.qemu_downtime_ms.map(|d| d as f64).unwrap_or(f64::NAN),
        ),
        None => match &st.error {
            Some(e) if e.code == "cancelled" => (
                format!("did not converge in {} s", limit.as_secs()),
                f64::NAN,
                f64::NAN,
            ),
            e => (format!("failed: {e:?}"), f64::NAN, f64::NAN),
        },
    };
    let faults = st.report.as_ref().and_then(|r| r.postcopy_faults);
    if let Some(r) = &st.report {
        eprintln!(
            "  tern: {} ms total, {} ms downtime ({:?}); pages {:?}; encoding {:?}",
            r.total_time_ms, r.downtime_ms, r.switchover, r.pages, r.encoding
        );
    }
    Ok(Run {
        path: "tern".into(),
        outcome,
        total_s: total.as_secs_f64(),
        downtime_ms: downtime,
        qemu_downtime_ms: qd,
        link_mb: link as f64 / 1e6,
        cpu_s: cpu,
        guest_rate: mean_rate(&during),
        guest_rate_before: mean_rate(tail_lines(&before, 5)),
        throttle: st
            .report
            .as_ref()
            .map(|r| u64::from(r.convergence.throttle_max_pct)),
        span: (t0, ended),
        switch_s: st
            .report
            .as_ref()
            .and_then(|r| {
                r.postcopy_ms
                    .map(|p| r.total_time_ms.saturating_sub(p) as f64 / 1e3)
            })
            .unwrap_or(f64::NAN),
        rate_at_b: f64::NAN,
        page_requests: faults.map_or(f64::NAN, |f| f.requests as f64),
        vcpu_blocked_ms: faults
            .and_then(|f| f.max_vcpu_blocked_ms)
            .map_or(f64::NAN, |ms| ms as f64),
    })
}

/// The last `n` lines of `s`.
fn tail_lines(s: &str, n: usize) -> &str {
    let mut idx = s.len();
    for _ in 0..=n {
        match s[..idx].rfind('\n') {
            Some(i) => idx = i,
            None => return s,
        }
    }
    &s[idx + 1..]
}

/// 1.5x the link's raw rate (MiB/s), for the dirtiers.
pub(crate) fn dirtier_rate(profile: &str) -> u32 {
    let link_mibps: f64 = match profile {
        "wan-1g-20ms" => 1e9 / 8.0 / 1048576.0,
        _ => 100e6 / 8.0 / 1048576.0,
    };
    (1.5 * link_mibps).round() as u32
}

pub fn bench(
    bin: &Path,
    g: &GuestImage,
    profile: &str,
    mem_mib: u32,
    limit: Duration,
    only: Option<&str>,
) -> Result<String> {
    let _lab = WanLab::up(profile)?;
    let rt = tokio::runtime::Runtime::new()?;
    let fill = mem_mib * 5 / 8;
    let rate = dirtier_rate(profile);
    let workloads = [
        Workload {
            label: "realistic (page cache, processes), idle",
            append: format!("tern.workload=realistic tern.mib={fill} tern.seed=1"),
            running: "TERN-READY",
        },
        Workload {
            label: "realistic + text dirtier at 1.5x the link",
            append: format!(
                "tern.workload=realistic tern.mib={} tern.seed=2 tern.dirty=128 tern.rate={rate}",
                fill / 2
            ),
            running: "tern-realistic pass",
        },
        Workload {
            label: "random dirtier at 1.5x the link (incompressible)",
            append: format!("tern.workload=random tern.mib=128 tern.rate={rate} tern.pace=cpu"),
            running: "tern-random pass",
        },
    ];
    let work = tempfile::Builder::new()
        .prefix("tern-bench-wan-")
        .tempdir_in("/tmp")?;
    let mut rows = String::new();
    let mut ratios = String::new();
    for (i, w) in workloads.iter().enumerate() {
        if only.is_some_and(|o| !w.label.contains(o)) {
            continue;
        }
        let mut runs = Vec::new();
        let mut modes = vec![QemuMode::Precopy, QemuMode::Postcopy];
        if w.label.starts_with("random") {
            // where throttling is the question: QEMU's own answer beside tern's
            modes.push(QemuMode::AutoConverge);
        }
        for mode in modes {
            eprintln!("[{}] QEMU {mode:?}", w.label);
            let dir = work.path().join(format!("w{i}-{}", runs.len()));
            runs.push(rt.block_on(qemu_direct(g, w, mem_mib, &dir, mode, limit))?);
        }
        eprintln!("[{}] tern", w.label);
        let dir = work.path().join(format!("w{i}-tern"));
        std::fs::create_dir_all(&dir)?;
        let (a, b) = agents(bin, &dir)?;
        let s = vm_spec("wan-vm", g, mem_mib, &w.append);
        boot(&a, &s, w)?;
        let t = via_tern(&a, "wan-vm", limit)?;
        let mut twin = None;
        if i == 0 {
            // a second VM of the same image, to a destination that holds the first
            eprintln!("[{}] tern, a second VM of the same image", w.label);
            let s2 = vm_spec("wan-twin", g, mem_mib, &w.append);
            boot(&a, &s2, w)?;
            twin = Some(via_tern(&a, "wan-twin", limit)?);
        }
        for vm in ["wan-vm", "wan-twin"] {
            let _ = a.call("DELETE", &format!("/v1/vms/{vm}"), None);
            let _ = b.call("DELETE", &format!("/v1/vms/{vm}"), None);
        }
        drop((a, b));
        for r in runs.iter().chain(std::iter::once(&t)) {
            rows.push_str(&row(w.label, r));
        }
        if let Some(tw) = &twin {
            rows.push_str(&row(
                &format!(
                    "{} — a second VM of the same image (QEMU: as the first)",
                    w.label
                ),
                tw,
            ));
        }
        ratios.push_str(&ratio_lines(w.label, &runs, &t));
        if let Some(tw) = &twin {
            ratios.push_str(&ratio_lines(&format!("{} (second VM)", w.label), &runs, tw));
        }
    }
    let mut out = format!(
        "Profile {profile}, {mem_mib} MiB guest, limit {} s per migration, one run each, same machine and link. \
         Bytes: host A's link, both directions, headers included. Downtime: source STOP to destination RESUME.\n\n",
        limit.as_secs()
    );
    out.push_str("| workload | path | outcome | total s | downtime ms | QEMU's downtime ms | link MB | CPU s (machine) | guest MiB/s during (before) | throttle % |\n|---|---|---|---|---|---|---|---|---|---|\n");
    out.push_str(&rows);
    out.push('\n');
    out.push_str(&ratios);
    Ok(out)
}

/// `x` with `p` decimals, "-" for NaN (not measured).
pub(crate) fn cell(x: f64, p: usize) -> String {
    if x.is_nan() {
        "-".to_string()
    } else {
        format!("{x:.p$}")
    }
}

fn row(label: &str, r: &Run) -> String {
    let f = cell;
    format!(
        "| {label} | {} | {} | {} | {} | {} | {} | {} | {} ({}) | {} |\n",
        r.path,
        r.outcome,
        f(r.total_s, 1),
        f(r.downtime_ms, 0),
        f(r.qemu_downtime_ms, 0),
        f(r.link_mb, 1),
        f(r.cpu_s, 1),
        f(r.guest_rate, 1),
        f(r.guest_rate_before, 1),
        r.throttle
            .map(|t| t.to_string())
            .unwrap_or_else(|| "-".into())
    )
}

fn ratio_lines(label: &str, qemu: &[Run], t: &Run) -> String {
    let mut s = String::new();
    for q in qemu {
        if !q.completed() {
            s.push_str(&format!(
                "- {label}: {} {}; tern {}\n",
                q.path, q.outcome, t.outcome
            ));
            continue;
        }
        if !t.completed() {
            s.push_str(&format!(
                "- {label}: tern {}, {} completed\n",
                t.outcome, q.path
            ));
            continue;
        }
        s.push_str(&format!(
            "- {label}: vs {}: bytes {:.2}x (target <= 0.35x), total time {:.2}x (target <= 0.5x), downtime {:.2}x (target <= 1.0x), CPU per migrated GiB {:.2}x (same guest: the machine's CPU seconds over the migration; target <= 1.5x)\n",
            q.path,
            t.link_mb / q.link_mb,
            t.total_s / q.total_s,
            t.downtime_ms / q.downtime_ms,
            t.cpu_s / q.cpu_s
        ));
    }
    s
}

/// `tern-bench spread`: how much tern's downtime varies. One idle realistic guest goes
/// back and forth across the emulated WAN `runs` times (the first trip sends its pages,
/// the later ones mostly references: the switchover is what they have in common);
/// prints every run's downtime, the median and the slowest against it.
pub fn spread(
    bin: &Path,
    g: &GuestImage,
    profile: &str,
    mem_mib: u32,
    runs: usize,
) -> Result<String> {
    let _lab = WanLab::up(profile)?;
    let work = tempfile::Builder::new()
        .prefix("tern-bench-spread-")
        .tempdir_in("/tmp")?;
    let (a, b) = agents(bin, work.path())?;
    let w = Workload {
        label: "realistic (page cache, processes), idle",
        append: format!(
            "tern.workload=realistic tern.mib={} tern.seed=1",
            mem_mib * 5 / 8
        ),
        running: "TERN-READY",
    };
    boot(&a, &vm_spec("spread-vm", g, mem_mib, &w.append), &w)?;
    let addr = |t: &TestAgent| t.peer_addr.to_string();
    let mut rows = String::new();
    let mut downtimes = Vec::new();
    for i in 0..runs {
        let (from, to) = if i % 2 == 0 { (&a, &b) } else { (&b, &a) };
        let id = from.start_migration("spread-vm", &addr(to), super::bench_request()?)?;
        let st = from.wait_migration(&id, Duration::from_secs(300));
        let r = st.and_then(|st| {
            st.report
                .with_context(|| format!("run {}: {:?}", i + 1, st.error))
        });
        let r = match r {
            Ok(r) => r,
            Err(e) => {
                // the agents' logs say why; the work directory goes with this function
                for (t, name) in [(&a, "a"), (&b, "b")] {
                    let keep = format!("/tmp/tern-bench-spread-{name}.log");
                    let _ = std::fs::copy(&t.log, &keep);
                    eprintln!("  agent log of host-{name} kept in {keep}");
                }
                return Err(e);
            }
        };
        eprintln!(
            "  run {}: {} ms downtime, {} ms total, switchover {:?}",
            i + 1,
            r.downtime_ms,
            r.total_time_ms,
            r.switchover
        );
        rows.push_str(&format!(
            "| {} | {} | {} | {:.1} | {} | {} |\n",
            i + 1,
            if i % 2 == 0 { "A to B" } else { "B to A" },
            r.downtime_ms,
            r.total_time_ms as f64 / 1000.0,
            r.qemu_downtime_ms
                .map(|d| d.to_string())
                .unwrap_or_default(),
            r.encoding.data_path,
        ));
        downtimes.push(r.downtime_ms as f64);
    }
    let med = super::median(downtimes.clone());
    let max = downtimes.iter().copied().fold(0.0, f64::max);
    let min = downtimes.iter().copied().fold(f64::INFINITY, f64::min);
    let mut out = format!(
        "Profile {profile}, {mem_mib} MiB realistic idle guest, {runs} migrations back and forth, \
         same agents (the first trip sends the pages, later ones mostly references). Downtime: \
         source STOP to destination RESUME.\n\n\
         | run | direction | downtime ms | total s | QEMU's downtime ms | data path |\n|---|---|---|---|---|---|\n"
    );
    out.push_str(&rows);
    out.push_str(&format!(
        "\n- downtime: median {med:.0} ms, fastest {min:.0} ms, slowest {max:.0} ms = {:.2}x the median (target <= 1.5x)\n",
        max / med.max(1e-9)
    ));
    Ok(out)
}

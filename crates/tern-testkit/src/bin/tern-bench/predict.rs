//! `tern-bench predict`: how close tern's predictions come to what happens. For each link
//! profile of `scripts/wan.sh`, two fresh agents; a warm-up migration, planned first (the
//! plan probes the link: nothing is known of it yet), teaches the source the link (as a
//! host learns it in service); then, for every workload of `tern-bench wan`, a fresh guest
//! (its own seed: the destination holds none of its pages) is planned (`--plan`, what an
//! operator sees before) and then migrated, and the report's own prediction (made at the
//! start, from the same inputs) is set beside what happened. The idle guest then makes the
//! return trip, planned at B (a probe again: B never migrated to A; A holds most of its
//! pages). The targets: time and bytes within 20%, downtime within 30% or 50 ms.
//!
//! Usage: tern-bench predict --tern target/release/tern
//!        [--profiles wan-100m-50ms,wan-1g-20ms] [--mem-mib 512] [--out FILE]

use std::path::Path;
use std::time::Duration;

use anyhow::{Context, Result};
use tern_api::{MigrationPlan, MigrationReport, PlanPrediction};
use tern_testkit::agents::{TestAgent, WanLab};
use tern_testkit::guest::GuestImage;

use super::wan::{agents, boot, vm_spec, Workload};

struct Row {
    profile: String,
    workload: String,
    plan: Option<PlanPrediction>,
    /// The dirty rate the plan measured, MiB/s.
    plan_dirty: f64,
    report: MigrationReport,
}

/// Relative error of `predicted` against `measured`, percent.
fn err_pct(predicted: f64, measured: f64) -> f64 {
    100.0 * (predicted - measured) / measured.max(1e-9)
}

/// Within the targets: time and bytes 20%, downtime 30% or 50 ms.
fn within(p: &PlanPrediction, r: &MigrationReport) -> (bool, bool, bool) {
    let t = err_pct(p.total_s, r.total_time_ms as f64 / 1e3).abs() <= 20.0;
    let bytes = (p.memory_wire_bytes + p.disk_wire_bytes) as f64;
    let b = err_pct(bytes, r.bytes_on_wire as f64).abs() <= 20.0;
    let d_abs = (p.downtime_ms - r.downtime_ms as f64).abs();
    let d = d_abs <= 50.0 || err_pct(p.downtime_ms, r.downtime_ms as f64).abs() <= 30.0;
    (t, b, d)
}

fn workloads(profile: &str, fill: u32) -> Vec<Workload> {
    let link_mibps: f64 = match profile {
        "wan-1g-20ms" => 1e9 / 8.0 / 1048576.0,
        _ => 100e6 / 8.0 / 1048576.0,
    };
    let rate = (1.5 * link_mibps).round() as u32;
    vec![
        Workload {
            label: "realistic, idle",
            append: format!("tern.workload=realistic tern.mib={fill} tern.seed=21"),
            running: "TERN-READY",
        },
        Workload {
            label: "realistic + text dirtier at 1.5x the link",
            append: format!(
                "tern.workload=realistic tern.mib={} tern.seed=22 tern.dirty=64 tern.rate={rate}",
                fill / 2
            ),
            running: "tern-realistic pass",
        },
        Workload {
            label: "random dirtier at 1.5x the link",
            append: format!("tern.workload=random tern.mib=64 tern.rate={rate} tern.pace=cpu"),
            running: "tern-random pass",
        },
    ]
}

const TO_B: &str = "198.18.0.2:7700";
const TO_A: &str = "198.18.0.1:7700";

fn migrate(a: &TestAgent, vm: &str, to: &str) -> Result<MigrationReport> {
    let id = a.start_migration(vm, to, super::bench_request()?)?;
    let st = a.wait_migration(&id, Duration::from_secs(600))?;
    st.report
        .with_context(|| format!("migration of {vm} failed: {:?}", st.error))
}

/// `--plan`, then the migration: one row.
fn planned(a: &TestAgent, vm: &str, to: &str, profile: &str, workload: String) -> Result<Row> {
    let plan: MigrationPlan = serde_json::from_value(a.call(
        "POST",
        &format!("/v1/vms/{vm}/plan"),
        Some(&super::bench_request_to(to)?),
    )?)?;
    eprintln!(
        "[predict {profile}] {workload}: plan's link {:?} MiB/s ({}), held {:?}, rewritten pages {:?} of a page on the wire, free cores {:?} (guest {:?}), {:?} CPU s/GiB",
        plan.inputs.link_mibps,
        plan.inputs.link_from,
        plan.inputs.held_fraction,
        plan.inputs.rewritten_ratio,
        plan.inputs.free_cores,
        plan.inputs.guest_cores,
        plan.inputs.core_s_per_gib,
    );
    let report = migrate(a, vm, to)?;
    eprintln!(
        "[predict {profile}] {workload}: host CPU {:?}, last dirty {:.1} MiB/s, crossing {:.1} MiB/s",
        report.host_cpu, report.convergence.dirty_mibps, report.convergence.transfer_mibps
    );
    Ok(Row {
        profile: profile.to_string(),
        workload,
        plan: plan.prediction,
        plan_dirty: plan.inputs.dirty_mibps,
        report,
    })
}

fn profile_rows(bin: &Path, g: &GuestImage, profile: &str, mem_mib: u32) -> Result<Vec<Row>> {
    let _lab = WanLab::up(profile)?;
    let work = tempfile::Builder::new()
        .prefix("tern-bench-predict-")
        .tempdir_in("/tmp")?;
    let (a, b) = agents(bin, work.path())?;
    // the warm-up: incompressible, distinct pages, so nothing of it helps the others
    let warm = Workload {
        label: "warm-up",
        append: "tern.workload=random tern.mib=96 tern.rate=1".into(),
        running: "tern-random pass",
    };
    eprintln!("[predict {profile}] warm-up migration (learns the link)");
    boot(&a, &vm_spec("warm", g, 256, &warm.append), &warm)?;
    let mut rows = vec![planned(
        &a,
        "warm",
        TO_B,
        profile,
        "warm-up: 256 MiB, 96 MiB random (link probed)".into(),
    )?];
    let _ = b.call("DELETE", "/v1/vms/warm", None);
    for (i, w) in workloads(profile, mem_mib * 5 / 8).into_iter().enumerate() {
        let name = format!("p{i}");
        eprintln!("[predict {profile}] {}", w.label);
        boot(&a, &vm_spec(&name, g, mem_mib, &w.append), &w)?;
        rows.push(planned(&a, &name, TO_B, profile, w.label.to_string())?);
        if i == 0 {
            // the return trip: A holds most of it; B has not migrated to A before
            rows.push(planned(
                &b,
                &name,
                TO_A,
                profile,
                format!("{}, back to A (link probed)", w.label),
            )?);
            let _ = a.call("DELETE", &format!("/v1/vms/{name}"), None);
        } else {
            let _ = b.call("DELETE", &format!("/v1/vms/{name}"), None);
        }
    }
    Ok(rows)
}

pub fn bench(bin: &Path, g: &GuestImage, profiles: &[String], mem_mib: u32) -> Result<String> {
    let mut rows = Vec::new();
    for p in profiles {
        rows.extend(profile_rows(bin, g, p, mem_mib)?);
    }
    let mut out = format!(
        "{mem_mib} MiB guests, one migration per row after a warm-up migration to the same \
         destination; `plan` is `--plan` just before, `start` the report's own prediction \
         (made as the migration started). Errors are predicted against measured.\n\n\
         | profile | workload | which | time s pred / meas (err) | downtime ms pred / meas | MB on the wire pred / meas (err) | throttle pred / meas | dirty MiB/s plan / last round | within targets (time, bytes, downtime) |\n\
         |---|---|---|---|---|---|---|---|---|\n"
    );
    let (mut cases, mut hits) = (0, [0; 3]);
    for r in &rows {
        let m = &r.report;
        let meas_s = m.total_time_ms as f64 / 1e3;
        for (which, p) in [("plan", r.plan.as_ref()), ("start", m.prediction.as_ref())] {
            let Some(p) = p else {
                out.push_str(&format!(
                    "| {} | {} | {which} | none / {meas_s:.1} | - / {} | - / {:.1} | - / {} | {:.1} / {:.1} | - |\n",
                    r.profile,
                    r.workload,
                    m.downtime_ms,
                    m.bytes_on_wire as f64 / 1e6,
                    m.convergence.throttle_max_pct,
                    r.plan_dirty,
                    m.convergence.dirty_mibps
                ));
                continue;
            };
            let bytes = (p.memory_wire_bytes + p.disk_wire_bytes) as f64;
            let (t, b, d) = within(p, m);
            cases += 1;
            for (h, ok) in hits.iter_mut().zip([t, b, d]) {
                *h += ok as u32;
            }
            let yes = |ok: bool| if ok { "yes" } else { "no" };
            out.push_str(&format!(
                "| {} | {} | {which} | {:.1} / {meas_s:.1} ({:+.0}%) | {:.0} / {} | {:.1} / {:.1} ({:+.0}%) | {} / {} | {:.1} / {:.1} | {}, {}, {} |\n",
                r.profile,
                r.workload,
                p.total_s,
                err_pct(p.total_s, meas_s),
                p.downtime_ms,
                m.downtime_ms,
                bytes / 1e6,
                m.bytes_on_wire as f64 / 1e6,
                err_pct(bytes, m.bytes_on_wire as f64),
                p.throttle_pct,
                m.convergence.throttle_max_pct,
                r.plan_dirty,
                m.convergence.dirty_mibps,
                yes(t),
                yes(b),
                yes(d),
            ));
        }
    }
    out.push_str(&format!(
        "\nWithin target, of {cases} predictions: time {}, bytes {}, downtime {}.\n",
        hits[0], hits[1], hits[2]
    ));
    Ok(out)
}

//! The report of a migration that moved the VM: what it cost (bytes, pages, time), where
//! the downtime went, and the timeline of its phases. Post-copy: the downtime is the
//! source's STOP to the destination's RESUME at POSTCOPY_RUN; `postcopy_ms` the time from
//! RUN to the stream's end.

use std::time::{Duration, SystemTime};

use super::switchover::Resolved;
use super::transfer::Transferred;
use super::{MigrateError, Migration, SourceQemu};
use crate::handle::{page_counts, unix_us, Counters, MigrationReport, SwitchoverTimes};

pub(super) async fn build(
    m: &mut Migration,
    t: Transferred,
    r: Resolved,
) -> Result<MigrationReport, MigrateError> {
    let info = match &m.vm.qemu {
        SourceQemu::Tern(qmp) => Some(qmp.query_migrate().await?),
        SourceQemu::Libvirt(_) => None, // libvirt's report has QEMU's times
    };
    let total = m.t0.elapsed();
    let ms = |a: Option<SystemTime>, b: SystemTime| -> Option<f64> {
        Some(b.duration_since(a?).ok()?.as_secs_f64() * 1000.0)
    };
    let resumed_at = SystemTime::UNIX_EPOCH + Duration::from_micros(r.resumed_us);
    let switchover = SwitchoverTimes {
        stop_to_stream_end_ms: t.t_stream_end.and_then(|e| ms(t.stopped_at, e)),
        stream_end_to_ready_ms: t.t_ready.and_then(|ready| ms(t.t_stream_end, ready)),
        ready_to_commit_ms: ms(t.t_ready, r.t_commit),
        commit_to_resume_ms: ms(Some(r.t_commit), resumed_at),
    };
    tracing::info!(migration = %m.handle.id, ?switchover, "switchover timing");
    let downtime_ms = match (m.source_running, t.stopped_at) {
        (true, Some(stop)) => r.resumed_us.saturating_sub(unix_us(stop)) / 1000,
        _ => 0,
    };
    let c = &m.handle.counters;
    let bytes_from_qemu = Counters::get(&c.bytes_from_qemu);
    let wire = {
        let w = t.writer.lock().await;
        w.bytes_written
            + Counters::get(&c.wire_in)
            + Counters::get(&c.wire_data)
            + Counters::get(&c.wire_earlier)
    };
    let status = m.handle.status();
    let secs = total.as_secs_f64().max(1e-6);
    let disk_allocated = t.disk_report.as_ref().map_or(0, |d| d.data_bytes);
    let prediction = super::plan::prediction_at_start(m, disk_allocated).await;
    let host_cpu = host_cpu(m, &t);
    Ok(MigrationReport {
        migration_id: m.handle.id.clone(),
        vm: m.vm.spec.name.clone(),
        source: m.engine.config.name.clone(),
        destination: format!("{} ({})", t.dest_agent, m.req.to),
        outcome: "succeeded".into(),
        total_time_ms: total.as_millis() as u64,
        downtime_ms,
        qemu_downtime_ms: info.as_ref().and_then(|i| i.downtime_ms),
        qemu_total_time_ms: info.as_ref().and_then(|i| i.total_time_ms),
        ram_bytes: status.progress.ram_total.unwrap_or(0),
        bytes_from_qemu,
        bytes_on_wire: wire,
        pages: page_counts(c),
        throughput_mbps: bytes_from_qemu as f64 * 8.0 / 1e6 / secs,
        digest_ok: true,
        digest: hex::encode(r.digest),
        qemu_version: m.vm.qemu_version.clone(),
        destination_qemu_version: t.dest_qemu,
        source_was_running: m.source_running,
        protocol_version: t.version,
        switchover: Some(switchover),
        resumed_unix_us: r.resumed_us,
        resolved_by_query: r.by_query,
        encoding: t.encoding.unwrap_or_default(),
        disk: t.disk_report,
        timeline: status.timeline,
        convergence: t.convergence,
        pacing: t.pacing.report(),
        prediction,
        outages: Vec::new(), // the driver adds them
        host_cpu,
        postcopy: t.t_postcopy.is_some(),
        postcopy_ms: t
            .t_stream_end
            .and_then(|e| ms(t.t_postcopy, e))
            .map(|x| x as u64),
        postcopy_faults: t.postcopy_faults,
    })
}

/// The source host's CPU before and over the transfer (None: not read, or the guest was
/// never paused here).
fn host_cpu(m: &Migration, t: &Transferred) -> Option<tern_api::HostCpuReport> {
    let (during, bytes) = t.cpu_during?;
    let before = *m.cpu_before.as_ref()?.get()?;
    Some(tern_api::HostCpuReport {
        cores: during.cores,
        busy_before: round2(before.busy_cores),
        busy_during: round2(during.busy_cores),
        qemu_during: during.process_cores.map(round2),
        core_s_per_gib: crate::hostcpu::core_seconds_per_gib(&before, &during, bytes).map(round2),
    })
}

fn round2(x: f64) -> f64 {
    (x * 100.0).round() / 100.0
}

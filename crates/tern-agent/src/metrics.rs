//! The agent's Prometheus endpoint (`tern agent --metrics-listen ADDR`, off by default):
//! `GET /metrics` in the text exposition format, computed at each scrape from the
//! migrations the agent knows (in flight and finished since it started) and its VMs.
//! Counters reset when the agent restarts, as Prometheus expects of a process.
//!
//! Owns the metric names and their meaning; must not change anything (read-only, no VM
//! content: names, sizes, times and counts only).

use std::collections::{BTreeMap, HashSet};
use std::fmt::Write;
use std::net::SocketAddr;
use std::sync::Arc;

use axum::routing::get;
use axum::Router;
use tern_api::{Direction, Phase};

use crate::{Agent, AgentError};

/// The text exposition of everything this agent measures.
pub fn render(agent: &Agent) -> String {
    let mut m = Metrics::default();
    m.gauge(
        "tern_vms",
        "VMs this agent runs.",
        &[],
        agent.vms().len() as f64,
    );
    let dir = |d: Direction| match d {
        Direction::Outgoing => "outgoing",
        Direction::Incoming => "incoming",
    };
    let mut in_flight: BTreeMap<&str, u64> = BTreeMap::new();
    let mut ended: BTreeMap<(&str, String), u64> = BTreeMap::new();
    let mut errors: BTreeMap<String, u64> = BTreeMap::new();
    let mut bytes: BTreeMap<&str, u64> = BTreeMap::new();
    let mut pages: BTreeMap<&str, u64> = BTreeMap::new();
    let mut phase_secs: BTreeMap<&str, f64> = BTreeMap::new();
    let (mut downtime_sum, mut downtime_count) = (0.0, 0u64);
    let (mut total_sum, mut total_count) = (0.0, 0u64);
    let mut throttle_max = 0u8;
    let mut backoffs = 0u64;
    let mut outages = 0u64;
    let mut running = Vec::new();
    for h in agent.engine.registry.migrations() {
        let s = h.status();
        let d = dir(s.direction);
        in_flight.entry(d).or_default();
        if !s.finished {
            *in_flight.entry(d).or_default() += 1;
        }
        let elapsed = std::time::Duration::from_millis(s.progress.elapsed_ms);
        let phases: HashSet<Phase> = s.timeline.spans.iter().map(|p| p.phase).collect();
        for phase in phases.into_iter().filter(|p| !p.is_final()) {
            *phase_secs.entry(phase.as_str()).or_default() +=
                s.timeline.time_in(phase, elapsed).as_secs_f64();
        }
        if s.direction == Direction::Outgoing {
            let p = &s.progress;
            *bytes.entry("memory_stream").or_default() += p.bytes_from_qemu;
            *bytes.entry("wire").or_default() += p.bytes_on_wire;
            if let Some(disk) = &p.disk {
                *bytes.entry("disk_wire").or_default() += disk.wire_bytes;
            }
            *pages.entry("zero").or_default() += p.pages.zero;
            *pages.entry("raw").or_default() += p.pages.raw;
            *pages.entry("reference").or_default() += p.pages.refs;
            *pages.entry("delta").or_default() += p.pages.deltas;
            throttle_max = throttle_max.max(p.throttle_pct);
            if !s.finished {
                let secs = (p.elapsed_ms as f64 / 1e3).max(1e-3);
                running.push(Running {
                    id: s.id.clone(),
                    vm: s.vm.clone(),
                    wire_rate: p.bytes_on_wire as f64 / secs,
                    progress: p.percent / 100.0,
                    rate_limit: p.rate_limit_mibps.map(|mib| mib * 1048576.0),
                    queue_delay: p.queue_delay_ms.map(|ms| ms / 1e3),
                });
            }
        }
        if s.finished {
            let result = match (&s.report, &s.error) {
                (Some(_), _) => "succeeded".to_string(),
                (None, Some(e)) => {
                    *errors.entry(e.code.clone()).or_default() += 1;
                    "failed".to_string()
                }
                (None, None) => "unknown".to_string(),
            };
            *ended.entry((d, result)).or_default() += 1;
            if let Some(r) = &s.report {
                if s.direction == Direction::Outgoing {
                    downtime_sum += r.downtime_ms as f64 / 1e3;
                    downtime_count += 1;
                    total_sum += r.total_time_ms as f64 / 1e3;
                    total_count += 1;
                    throttle_max = throttle_max.max(r.convergence.throttle_max_pct);
                    backoffs += u64::from(r.pacing.yields);
                    outages += r.outages.len() as u64;
                }
            }
        }
    }
    m.family(
        "tern_migrations_in_flight",
        "gauge",
        "Migrations running now.",
        "direction",
        in_flight.iter().map(|(d, n)| (*d, *n as f64)),
    );
    m.head(
        "tern_migrations_total",
        "counter",
        "Migrations that ended, by direction and result.",
    );
    for ((d, r), n) in &ended {
        m.sample(
            "tern_migrations_total",
            &[("direction", d), ("result", r)],
            *n as f64,
        );
    }
    m.family(
        "tern_migration_errors_total",
        "counter",
        "Failed migrations by error code (docs/protocol.md).",
        "code",
        errors.iter().map(|(c, n)| (c.as_str(), *n as f64)),
    );
    m.family(
        "tern_migration_bytes_total",
        "counter",
        "Bytes of outgoing migrations: QEMU's memory stream, all bytes on the wire, the disks' share of the wire.",
        "kind",
        bytes.iter().map(|(k, n)| (*k, *n as f64)),
    );
    m.family(
        "tern_migration_pages_total",
        "counter",
        "Pages of outgoing migrations by how they crossed.",
        "encoding",
        pages.iter().map(|(k, n)| (*k, *n as f64)),
    );
    m.family(
        "tern_migration_phase_seconds_total",
        "counter",
        "Time migrations spent in each phase.",
        "phase",
        phase_secs.iter().map(|(p, secs)| (*p, *secs)),
    );
    m.head(
        "tern_migration_downtime_seconds",
        "summary",
        "Downtime of outgoing migrations that succeeded (source stop to destination resume).",
    );
    m.sample("tern_migration_downtime_seconds_sum", &[], downtime_sum);
    m.sample(
        "tern_migration_downtime_seconds_count",
        &[],
        downtime_count as f64,
    );
    m.head(
        "tern_migration_duration_seconds",
        "summary",
        "Total time of outgoing migrations that succeeded.",
    );
    m.sample("tern_migration_duration_seconds_sum", &[], total_sum);
    m.sample(
        "tern_migration_duration_seconds_count",
        &[],
        total_count as f64,
    );
    m.gauge(
        "tern_migration_throttle_max_percent",
        "The highest guest CPU throttle an outgoing migration needed to converge.",
        &[],
        f64::from(throttle_max),
    );
    m.per_migration(
        "tern_migration_wire_rate_bytes_per_second",
        "Bytes on the wire per second of each outgoing migration in flight, since it began.",
        &running,
        |r| Some(r.wire_rate),
    );
    m.head(
        "tern_migration_backoffs_total",
        "counter",
        "Times outgoing migrations that succeeded backed off for other traffic on the link (least-link-use).",
    );
    m.sample("tern_migration_backoffs_total", &[], backoffs as f64);
    m.head(
        "tern_migration_link_outages_total",
        "counter",
        "Lost links that outgoing migrations which succeeded waited out (--outage-wait).",
    );
    m.sample("tern_migration_link_outages_total", &[], outages as f64);
    m.per_migration(
        "tern_migration_rate_limit_bytes_per_second",
        "The rate the bandwidth controller allows each outgoing migration in flight (absent: no limit).",
        &running,
        |r| r.rate_limit,
    );
    m.per_migration(
        "tern_migration_queue_delay_seconds",
        "Queueing delay on the path of each outgoing migration in flight: TCP's round trip above the least seen.",
        &running,
        |r| r.queue_delay,
    );
    m.per_migration(
        "tern_migration_progress_ratio",
        "How far each outgoing migration in flight is (0 to 1; never goes down).",
        &running,
        |r| Some(r.progress),
    );
    m.text
}

/// An outgoing migration in flight, as its gauges show it.
struct Running {
    id: String,
    vm: String,
    /// Bytes/s on the wire since it began; 0 to 1; the controller's limit, bytes/s;
    /// queueing delay on its path, seconds.
    wire_rate: f64,
    progress: f64,
    rate_limit: Option<f64>,
    queue_delay: Option<f64>,
}

#[derive(Default)]
struct Metrics {
    text: String,
}

impl Metrics {
    fn head(&mut self, name: &str, kind: &str, help: &str) {
        let _ = writeln!(self.text, "# HELP {name} {help}\n# TYPE {name} {kind}");
    }

    fn sample(&mut self, name: &str, labels: &[(&str, &str)], v: f64) {
        self.text.push_str(name);
        if !labels.is_empty() {
            self.text.push('{');
            for (i, (k, val)) in labels.iter().enumerate() {
                if i > 0 {
                    self.text.push(',');
                }
                let val = val
                    .replace('\\', "\\\\")
                    .replace('"', "\\\"")
                    .replace('\n', "\\n");
                let _ = write!(self.text, "{k}=\"{val}\"");
            }
            self.text.push('}');
        }
        let _ = writeln!(self.text, " {v}");
    }

    /// A family with one label: its head, then a sample per value of the label.
    fn family<'a>(
        &mut self,
        name: &str,
        kind: &str,
        help: &str,
        label: &str,
        samples: impl IntoIterator<Item = (&'a str, f64)>,
    ) {
        self.head(name, kind, help);
        for (value, v) in samples {
            self.sample(name, &[(label, value)], v);
        }
    }

    /// A gauge with one sample per migration in flight that has a `value`.
    fn per_migration(
        &mut self,
        name: &str,
        help: &str,
        running: &[Running],
        value: impl Fn(&Running) -> Option<f64>,
    ) {
        self.head(name, "gauge", help);
        for r in running {
            if let Some(v) = value(r) {
                self.sample(name, &[("migration", &r.id), ("vm", &r.vm)], v);
            }
        }
    }

    fn gauge(&mut self, name: &str, help: &str, labels: &[(&str, &str)], v: f64) {
        self.head(name, "gauge", help);
        self.sample(name, labels, v);
    }
}

/// Serves `GET /metrics` on `addr` (plain HTTP: bind it to a management address).
pub async fn serve(
    agent: Arc<Agent>,
    addr: SocketAddr,
) -> Result<impl std::future::Future<Output = ()> + Send, AgentError> {
    let app = Router::new().route(
        "/metrics",
        get(move || {
            let agent = agent.clone();
            async move {
                (
                    [("content-type", "text/plain; version=0.0.4")],
                    render(&agent),
                )
            }
        }),
    );
    let l = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|e| AgentError::Metrics(addr, e))?;
    tracing::info!(%addr, "metrics on http://{addr}/metrics");
    Ok(async move {
        let _ = axum::serve(l, app).await;
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn samples_follow_the_exposition_format() {
        let mut m = Metrics::default();
        m.head("tern_x_total", "counter", "Things.");
        m.sample("tern_x_total", &[("vm", "a\"b"), ("k", "v")], 3.0);
        m.sample("tern_y", &[], 0.5);
        assert_eq!(
            m.text,
            "# HELP tern_x_total Things.\n# TYPE tern_x_total counter\ntern_x_total{vm=\"a\\\"b\",k=\"v\"} 3\ntern_y 0.5\n"
        );
    }

    #[test]
    fn per_migration_gauges_leave_out_the_migrations_without_a_value() {
        let run = |id: &str, limit| Running {
            id: id.into(),
            vm: "web".into(),
            wire_rate: 1.0,
            progress: 0.5,
            rate_limit: limit,
            queue_delay: None,
        };
        let mut m = Metrics::default();
        m.per_migration(
            "tern_l",
            "Limits.",
            &[run("m1", Some(2.0)), run("m2", None)],
            |r| r.rate_limit,
        );
        assert_eq!(
            m.text,
            "# HELP tern_l Limits.\n# TYPE tern_l gauge\ntern_l{migration=\"m1\",vm=\"web\"} 2\n"
        );
    }
}

//! What tools see of an agent: structured logs (`tern agent --log-format json`: every line
//! one JSON object; what the engine logs during a migration carries the migration's id and
//! VM on both hosts, also from the tasks a migration spawns) and the event stream
//! (`GET /v1/events`, `tern events`: migrations' phases and VMs' lives as they happen).

use std::path::Path;
use std::time::Duration;

use anyhow::{ensure, Context, Result};
use serde_json::{json, Value};
use tern_api::client::{Client, Endpoint};
use tern_api::events::AgentEvent;
use tern_testkit::agents::{e2e_lock, wait_for_text, AgentOptions, TestAgent};
use tern_testkit::guest::ensure_guest;

const BIN: &str = env!("CARGO_BIN_EXE_tern");

fn json_agent(name: &str) -> Result<TestAgent> {
    TestAgent::start_with(
        Path::new(BIN),
        name,
        AgentOptions {
            env: &[("TERN_LOG", "info,tern_engine=debug")],
            args: &["--log-format", "json"],
            ..Default::default()
        },
    )
}

/// Every line of the agent's log as JSON (an error names the first line that is not).
fn json_lines(a: &TestAgent) -> Result<Vec<Value>> {
    a.log_text()
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str(l).with_context(|| format!("not a JSON log line: {l}")))
        .collect()
}

#[test]
#[ignore = "tier vm: needs QEMU 10, the test guest and root (bash scripts/test.sh runs it)"]
fn json_logs_carry_the_migration_id_on_every_engine_line_of_both_hosts() -> Result<()> {
    let _l = e2e_lock();
    let g = ensure_guest()?;
    let a = json_agent("host-a")?;
    let b = json_agent("host-b")?;
    let spec = format!(
        "name = \"lg1\"\nmemory_mib = 128\nvcpus = 1\naccel = \"tcg\"\nkernel = {:?}\ninitrd = {:?}\nappend = \"console=ttyS0 panic=-1 tern.workload=idle\"\n",
        g.kernel.display().to_string(),
        g.initrd.display().to_string()
    );
    let info = a.start_vm(&spec)?;
    let console = info["console_log"].as_str().context("console")?;
    wait_for_text(Path::new(console), "TERN-READY", Duration::from_secs(90))?;
    let id = a.start_migration("lg1", &b.peer_addr.to_string(), json!({}))?;
    let st = a.wait_migration(&id, Duration::from_secs(180))?;
    ensure!(st.report.is_some(), "migration failed: {:?}", st.error);
    for (host, agent) in [("source", &a), ("destination", &b)] {
        let lines = json_lines(agent)?;
        if std::env::var_os("TERN_TEST_SHOW_LOGS").is_some() {
            eprintln!("{}", agent.log_text());
        }
        let of_it = |l: &Value| l["span"]["migration"] == json!(id);
        let ts = |l: &Value| l["timestamp"].as_str().unwrap_or("").to_string();
        let marked: Vec<&Value> = lines.iter().filter(|l| of_it(l)).collect();
        ensure!(
            marked.len() >= 3,
            "the {host} logged {} lines with the migration's id",
            marked.len()
        );
        // while it ran, everything the engine logged belongs to it (one migration only)
        let (first, last) = (ts(marked[0]), ts(marked[marked.len() - 1]));
        let engine_then: Vec<&Value> = lines
            .iter()
            .filter(|l| {
                l["target"]
                    .as_str()
                    .is_some_and(|t| t.starts_with("tern_engine::"))
            })
            .filter(|l| (first.as_str()..=last.as_str()).contains(&ts(l).as_str()))
            .collect();
        for l in &engine_then {
            ensure!(
                of_it(l) && l["span"]["vm"] == json!("lg1"),
                "a {host} engine line during the migration without its id and VM: {l}"
            );
            ensure!(
                l["level"].is_string() && l["fields"]["message"].is_string(),
                "{l}"
            );
        }
        eprintln!(
            "{host}: {} lines with the id, {} engine lines checked",
            marked.len(),
            engine_then.len()
        );
    }
    Ok(())
}

/// Follows an agent's event stream on a thread; the events arrive on the receiver (the
/// first is `Open`, once the stream is subscribed).
fn follow(a: &TestAgent) -> std::sync::mpsc::Receiver<AgentEvent> {
    let (tx, rx) = std::sync::mpsc::channel();
    let client = Client::new(Endpoint::Unix(a.api.display().to_string()));
    std::thread::spawn(move || {
        let _ = client.events(|e| tx.send(e).is_ok());
    });
    rx
}

/// Events from `rx` until each of `wanted` matched one of them (within 60 s each).
fn until(
    rx: &std::sync::mpsc::Receiver<AgentEvent>,
    wanted: &[&dyn Fn(&AgentEvent) -> bool],
) -> Result<Vec<AgentEvent>> {
    let mut seen: Vec<AgentEvent> = Vec::new();
    while !wanted.iter().all(|w| seen.iter().any(w)) {
        let e = rx
            .recv_timeout(Duration::from_secs(60))
            .with_context(|| format!("no more events; so far {seen:?}"))?;
        seen.push(e);
    }
    Ok(seen)
}

/// The last event of migration `id` (it carries the report or the error).
fn ended(e: &AgentEvent, id: &str) -> bool {
    matches!(e, AgentEvent::Migration { status } if status.id == id && status.finished)
}

fn vm_event(e: &AgentEvent, vm: &str, what: &str) -> bool {
    matches!(e, AgentEvent::Vm { name, what: w, .. } if name == vm && w == what)
}

/// The phases a stream showed for migration `id`, in order.
fn phases(events: &[AgentEvent], id: &str) -> Vec<String> {
    events
        .iter()
        .filter_map(|e| match e {
            AgentEvent::Migration { status } if status.id == id => {
                Some(status.phase.as_str().to_string())
            }
            _ => None,
        })
        .collect()
}

#[test]
#[ignore = "tier vm: needs QEMU 10, the test guest and root (bash scripts/test.sh runs it)"]
fn the_event_stream_follows_a_migration_and_the_vm_on_both_hosts() -> Result<()> {
    let _l = e2e_lock();
    let g = ensure_guest()?;
    let a = TestAgent::start(Path::new(BIN), "host-a", &[])?;
    let b = TestAgent::start(Path::new(BIN), "host-b", &[])?;
    let (ra, rb) = (follow(&a), follow(&b));
    for (rx, name) in [(&ra, "host-a"), (&rb, "host-b")] {
        let first = until(rx, &[&|_| true])?;
        ensure!(
            matches!(&first[0], AgentEvent::Open { agent } if agent == name),
            "{first:?}"
        );
    }
    let spec = format!(
        "name = \"ev1\"\nmemory_mib = 128\nvcpus = 1\naccel = \"tcg\"\nkernel = {:?}\ninitrd = {:?}\nappend = \"console=ttyS0 panic=-1 tern.workload=idle\"\n",
        g.kernel.display().to_string(),
        g.initrd.display().to_string()
    );
    let info = a.start_vm(&spec)?;
    let pid = info["pid"].as_u64();
    // capped so that it lasts a few seconds: progress ticks come once a second
    let id = a.start_migration(
        "ev1",
        &b.peer_addr.to_string(),
        json!({ "max_bandwidth_mibps": 8 }),
    )?;
    let st = a.wait_migration(&id, Duration::from_secs(180))?;
    ensure!(st.report.is_some(), "migration failed: {:?}", st.error);

    let on_a = until(&ra, &[&|e| vm_event(e, "ev1", "left"), &|e| ended(e, &id)])?;
    let ticks: Vec<f64> = on_a
        .iter()
        .filter_map(|e| match e {
            AgentEvent::Progress { status } if status.id == id => Some(status.progress.percent),
            _ => None,
        })
        .collect();
    ensure!(
        !ticks.is_empty() && ticks.iter().all(|p| (0.0..=100.0).contains(p)),
        "progress ticks while it ran ({} ms): {ticks:?}",
        st.report.as_ref().map_or(0, |r| r.total_time_ms)
    );
    ensure!(
        on_a.iter().any(|e| matches!(e, AgentEvent::Vm { name, what, pid: p } if name == "ev1" && what == "started" && p.map(u64::from) == pid)),
        "the source told the VM's start with its pid: {on_a:?}"
    );
    let pa = phases(&on_a, &id);
    ensure!(
        pa.first().map(String::as_str) == Some("connect")
            && pa.last().map(String::as_str) == Some("done"),
        "the source's phases, first to last: {pa:?}"
    );
    ensure!(
        pa.contains(&"transfer".to_string()) && pa.contains(&"switchover".to_string()),
        "{pa:?}"
    );
    let done = on_a.iter().rev().find_map(|e| match e {
        AgentEvent::Migration { status } if status.id == id => Some(status),
        _ => None,
    });
    ensure!(
        done.is_some_and(|s| s.finished && s.report.is_some()),
        "the last migration event carries the report"
    );

    let on_b = until(
        &rb,
        &[&|e| vm_event(e, "ev1", "arrived"), &|e| ended(e, &id)],
    )?;
    let pb = phases(&on_b, &id);
    ensure!(
        !pb.is_empty(),
        "the destination told its side of the migration: {on_b:?}"
    );
    let arrived_pid = on_b.iter().find_map(|e| match e {
        AgentEvent::Vm { name, what, pid } if name == "ev1" && what == "arrived" => *pid,
        _ => None,
    });
    ensure!(
        arrived_pid.map(u64::from) == b.vm("ev1")?["pid"].as_u64(),
        "the destination told the VM's arrival with its pid"
    );

    // a listener that comes back later gets what it missed, numbered, without the ticks
    let all = replay(&a, 0, &id)?;
    let seqs: Vec<u64> = all.iter().filter_map(|(s, _)| *s).collect();
    ensure!(
        seqs.windows(2).all(|w| w[1] == w[0] + 1) && seqs.first() == Some(&1),
        "numbered 1, 2, 3, ...: {seqs:?}"
    );
    ensure!(
        !all.iter()
            .any(|(_, e)| matches!(e, AgentEvent::Progress { .. })),
        "progress ticks are not kept"
    );
    let events: Vec<AgentEvent> = all.iter().map(|(_, e)| e.clone()).collect();
    ensure!(
        events.iter().any(|e| vm_event(e, "ev1", "started"))
            && phases(&events, &id) == pa
            && events.iter().any(|e| vm_event(e, "ev1", "left")),
        "the replay holds the VM's start, the migration's phases as they came live ({pa:?}) and its leaving: {events:?}"
    );
    let started = all
        .iter()
        .find(|(_, e)| vm_event(e, "ev1", "started"))
        .and_then(|(s, _)| *s)
        .context("the start's number")?;
    let after = replay(&a, started, &id)?;
    ensure!(
        after.iter().filter_map(|(s, _)| *s).next() == Some(started + 1)
            && !after.iter().any(|(_, e)| vm_event(e, "ev1", "started")),
        "from number {started} on: {after:?}"
    );
    Ok(())
}

/// The events an agent still keeps after number `since` (`Last-Event-ID`), with their
/// numbers, until migration `id` ended and VM ev1 left.
fn replay(a: &TestAgent, since: u64, id: &str) -> Result<Vec<(Option<u64>, AgentEvent)>> {
    let (tx, rx) = std::sync::mpsc::channel();
    let client = Client::new(Endpoint::Unix(a.api.display().to_string()));
    std::thread::spawn(move || {
        let _ = client.events_since(Some(since), |seq, e| tx.send((seq, e)).is_ok());
    });
    let mut seen = Vec::new();
    loop {
        let (seq, e) = rx
            .recv_timeout(Duration::from_secs(10))
            .with_context(|| format!("the replay stopped short: {seen:?}"))?;
        if !matches!(e, AgentEvent::Open { .. }) {
            seen.push((seq, e));
        }
        let has = |f: &dyn Fn(&AgentEvent) -> bool| seen.iter().any(|(_, e)| f(e));
        if has(&|e| ended(e, id)) && has(&|e| vm_event(e, "ev1", "left")) {
            return Ok(seen);
        }
    }
}

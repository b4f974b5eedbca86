//! Structured logs (`tern agent --log-format json`): every line an agent writes is one
//! JSON object, and what the engine logs during a migration carries the migration's id
//! and VM on both hosts, also from the tasks a migration spawns.

use std::path::Path;
use std::time::Duration;

use anyhow::{ensure, Context, Result};
use serde_json::{json, Value};
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

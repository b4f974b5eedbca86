//! The agent's control listener (`tern agent --control-listen`): the cluster
//! controller's part of the API over mutual TLS. A certificate of the cluster CA labelled
//! `controller` gets the host's load and the routes the controller needs; any other
//! certificate gets no HTTP answer; routes outside the controller's part are not served.
//! Connections held in their TLS handshake lock neither the controller out of its
//! listener nor peers out of theirs (`--listen`).

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use tern_api::client::ClientError;
use tern_testkit::agents::{
    e2e_lock, free_port, issue_cert, test_ca, wait_for_text, AgentOptions, TestAgent, TEST_CA,
};
use tern_testkit::guest::ensure_guest;

const BIN: &str = env!("CARGO_BIN_EXE_tern");

/// A client certificate from the test CA with `labels`, in a new TLS directory.
fn credentials(name: &str, labels: &[&str]) -> Result<tempfile::TempDir> {
    let dir = tempfile::Builder::new().prefix("tern-ctl-").tempdir()?;
    issue_cert(
        &test_ca(Path::new(TEST_CA))?,
        name,
        "127.0.0.1".parse()?,
        labels,
        dir.path(),
    )?;
    Ok(dir)
}

#[test]
#[ignore = "tier vm: needs QEMU 10, the test guest and root (bash scripts/test.sh runs it)"]
fn the_control_listener_serves_the_load_to_the_controller_only() -> Result<()> {
    let _l = e2e_lock();
    let g = ensure_guest()?;
    let control = format!("127.0.0.1:{}", free_port()?);
    let a = TestAgent::start_with(
        Path::new(BIN),
        "host-ctl",
        AgentOptions {
            args: &["--control-listen", &control, "--capacity-cores", "3"],
            labels: &["trusted"],
            ..Default::default()
        },
    )?;
    ensure!(
        a.log_text()
            .contains(&format!("cluster controller API on {control}")),
        "the agent does not say where it serves the controller:\n{}",
        a.log_text()
    );
    let spec = format!(
        "name = \"idle\"\nmemory_mib = 128\nvcpus = 1\naccel = \"tcg\"\nkernel = {:?}\ninitrd = {:?}\nappend = \"console=ttyS0 panic=-1 tern.workload=idle\"\n",
        g.kernel.display().to_string(),
        g.initrd.display().to_string()
    );
    let info = a.start_vm(&spec)?;
    let console = info["console_log"].as_str().context("console path")?;
    wait_for_text(Path::new(console), "TERN-READY", Duration::from_secs(90))?;

    // (a) the controller's certificate: the host's load, with the VM in it, after a
    // sample that has an interval (its rates)
    let ctl_dir = credentials("controller", &["controller"])?;
    let ctl = tern_agent::control::client_for(&control, ctl_dir.path())?;
    let deadline = Instant::now() + Duration::from_secs(30);
    let load = loop {
        let l = ctl.load().context("GET /v1/load over TLS")?;
        if l.interval_ms > 0 && l.vms.iter().any(|v| v.cpu_seconds > 0.0) {
            break l;
        }
        ensure!(
            Instant::now() < deadline,
            "no sample with the VM's CPU: {l:?}"
        );
        std::thread::sleep(Duration::from_millis(500));
    };
    assert_eq!(load.host, "host-ctl", "{load:?}");
    assert_eq!(load.capacity_cores, 3.0, "{load:?}");
    assert_eq!(load.labels, vec!["trusted".to_string()], "{load:?}");
    assert!(
        load.mem_total_bytes >= load.mem_available_bytes && load.mem_available_bytes > 0,
        "{load:?}"
    );
    assert!(load.uptime_ms >= load.interval_ms, "{load:?}");
    let vm = load
        .vms
        .iter()
        .find(|v| v.name == "idle")
        .context("the VM is in the load")?;
    assert_eq!((vm.vcpus, vm.mem_bytes), (1, 128 << 20), "{vm:?}");
    assert!(vm.rss_bytes > 0, "{vm:?}");
    assert!(!vm.tpm && !vm.migrating, "{vm:?}");
    assert_eq!(vm.state, "running", "{vm:?}");
    assert!(
        (0.0..=4.0).contains(&vm.cpu_cores),
        "an idle guest's QEMU: {vm:?}"
    );
    // the rest of what the controller reads
    let agent = ctl.agent_info()?;
    assert_eq!(agent["name"], "host-ctl", "{agent}");
    let vms = ctl.vms()?;
    assert_eq!(vms.len(), 1, "{vms:?}");
    assert!(ctl.migrations()?.is_empty());
    // and the local API serves the load too
    let local = a.client.load()?;
    assert_eq!(local.capacity_cores, 3.0, "{local:?}");

    // (c) a route outside the controller's part: not served
    match ctl.call(
        "POST",
        "/v1/vms/idle/qmp",
        Some(&serde_json::json!({ "execute": "stop" })),
    ) {
        Err(ClientError::Api { status: 404, .. }) => {}
        other => bail!("QMP through the control listener: {other:?}"),
    }
    match ctl.call("DELETE", "/v1/vms/idle", None) {
        Err(ClientError::Api { status: 405, .. }) => {}
        other => bail!("stopping a VM through the control listener: {other:?}"),
    }
    ensure!(
        a.vm_status("idle")? == "running",
        "the VM stopped after the controller's refused calls"
    );

    // (b) a certificate of the cluster without the label (an agent's): no HTTP answer
    let agent_dir = credentials("host-x", &["trusted"])?;
    let other = tern_agent::control::client_for(&control, agent_dir.path())?;
    match other.load() {
        Err(ClientError::Api { status, message }) => {
            bail!("a certificate without the label got HTTP {status}: {message}")
        }
        Err(_) => {}
        Ok(l) => bail!("a certificate without the label got the load: {l:?}"),
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    while !a.log_text().contains("not labelled \"controller\"") {
        ensure!(
            Instant::now() < deadline,
            "no warning for the unlabelled certificate:\n{}",
            a.log_text()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    // ... and a certificate of another CA, labelled as it likes, not even a handshake
    let rogue_ca = tempfile::tempdir()?;
    tern_agent::pki::init_ca(&rogue_ca.path().join("ca"), "rogue")?;
    let rogue_dir = tempfile::tempdir()?;
    issue_cert(
        &rogue_ca.path().join("ca"),
        "controller",
        "127.0.0.1".parse()?,
        &["controller"],
        rogue_dir.path(),
    )?;
    // (its CA file is the rogue one: trust the cluster's to see the agent refuse it)
    std::fs::copy(
        Path::new(TEST_CA).join(tern_agent::pki::CA_CERT),
        rogue_dir.path().join(tern_agent::pki::CA_CERT),
    )?;
    let rogue = tern_agent::control::client_for(&control, rogue_dir.path())?;
    match rogue.load() {
        Err(ClientError::Api { status, .. }) => bail!("a rogue certificate got HTTP {status}"),
        Err(_) => {}
        Ok(l) => bail!("a rogue certificate got the load: {l:?}"),
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    while !a.log_text().contains("control connection refused") {
        ensure!(
            Instant::now() < deadline,
            "no warning for the rogue certificate's handshake:\n{}",
            a.log_text()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    // the controller is still served
    ensure!(ctl.load()?.vms.len() == 1);
    Ok(())
}

/// A TCP connection from `from` to `to` that never starts a TLS handshake.
fn raw_from(from: &str, to: &str) -> Result<std::net::TcpStream> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let (from, to): (std::net::SocketAddr, std::net::SocketAddr) =
        (format!("{from}:0").parse()?, to.parse()?);
    let s = rt.block_on(async {
        let s = tokio::net::TcpSocket::new_v4()?;
        s.bind(from)?;
        s.connect(to).await
    })?;
    let s = s.into_std()?;
    s.set_nonblocking(false)?;
    Ok(s)
}

/// Whether the agent closed `c` within `within` (rather than holding it).
/// Which of `raw` the listener holds (not closed within 100 ms).
fn held_of(raw: &mut [std::net::TcpStream]) -> Result<Vec<usize>> {
    let mut held = Vec::new();
    for (i, c) in raw.iter_mut().enumerate() {
        if !closed_within(c, Duration::from_millis(100))? {
            held.push(i);
        }
    }
    Ok(held)
}

/// The `held` connections of `raw`, opened at `started`, are dropped at the handshake
/// deadline `within` (3 s of slack).
fn dropped_by_deadline(
    raw: &mut [std::net::TcpStream],
    held: &[usize],
    started: Instant,
    within: Duration,
) -> Result<()> {
    for &i in held {
        let left =
            (started + within + Duration::from_secs(3)).saturating_duration_since(Instant::now());
        ensure!(
            closed_within(&mut raw[i], left.max(Duration::from_millis(1)))?,
            "a connection without a handshake outlived {within:?}"
        );
    }
    Ok(())
}

fn closed_within(c: &mut std::net::TcpStream, within: Duration) -> Result<bool> {
    use std::io::Read;
    c.set_read_timeout(Some(within))?;
    match c.read(&mut [0u8; 16]) {
        Ok(0) => Ok(true),
        Ok(n) => bail!("{n} bytes before a ClientHello"),
        Err(e)
            if matches!(
                e.kind(),
                std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
            ) =>
        {
            Ok(false)
        }
        Err(_) => Ok(true),
    }
}

#[test]
#[ignore = "tier vm: needs QEMU 10 and root (bash scripts/test.sh runs it)"]
fn held_handshakes_from_one_address_do_not_lock_the_controller_out() -> Result<()> {
    use tern_agent::control::{
        HANDSHAKE_WITHIN, MAX_CONTROL_CONNECTIONS, MAX_HANDSHAKES_PER_SOURCE,
    };
    let _l = e2e_lock();
    let control = format!("127.0.0.1:{}", free_port()?);
    let a = TestAgent::start_with(
        Path::new(BIN),
        "host-ctl-dos",
        AgentOptions {
            args: &["--control-listen", &control],
            ..Default::default()
        },
    )?;
    let ctl_dir = credentials("controller", &["controller"])?;
    let ctl = tern_agent::control::client_for(&control, ctl_dir.path())?;
    ensure!(ctl.agent_info()?["name"] == "host-ctl-dos");

    // more connections than the controller's budget, from one address (another than the
    // controller's), none starting a handshake
    let n = MAX_CONTROL_CONNECTIONS + 4;
    let mut raw = (0..n)
        .map(|_| raw_from("127.0.0.2", &control))
        .collect::<Result<Vec<_>>>()?;
    let started = Instant::now();
    // the controller is still served, again and again, while they are held
    for _ in 0..3 {
        let info = ctl
            .agent_info()
            .context("the controller, with handshakes held")?;
        ensure!(info["name"] == "host-ctl-dos", "{info}");
    }
    // the address got its share of the handshakes; the rest were closed at once
    std::thread::sleep(Duration::from_millis(200));
    let held = held_of(&mut raw)?;
    ensure!(
        started.elapsed() < HANDSHAKE_WITHIN,
        "too slow to tell held from refused before the handshake deadline"
    );
    ensure!(
        held.len() == MAX_HANDSHAKES_PER_SOURCE,
        "held {} of {n} connections from one address: {held:?}",
        held.len()
    );
    ensure!(
        a.log_text().contains("refused a control connection"),
        "no word of the refused connections:\n{}",
        a.log_text()
    );
    dropped_by_deadline(&mut raw, &held, started, HANDSHAKE_WITHIN)?;
    ensure!(ctl.load()?.host == "host-ctl-dos");
    Ok(())
}

#[test]
#[ignore = "tier vm: needs QEMU 10, the test guest and root (bash scripts/test.sh runs it)"]
fn held_handshakes_from_one_address_do_not_lock_peers_out() -> Result<()> {
    use tern_agent::{MAX_PEER_CONNECTIONS, MAX_PEER_HANDSHAKES_PER_SOURCE, PEER_HANDSHAKE_WITHIN};
    let _l = e2e_lock();
    let g = ensure_guest()?;
    let a = TestAgent::start(Path::new(BIN), "host-peer-a", &[])?;
    let b = TestAgent::start(Path::new(BIN), "host-peer-b", &[])?;
    let spec = format!(
        "name = \"idle\"\nmemory_mib = 128\nvcpus = 1\naccel = \"tcg\"\nkernel = {:?}\ninitrd = {:?}\nappend = \"console=ttyS0 panic=-1 tern.workload=idle\"\n",
        g.kernel.display().to_string(),
        g.initrd.display().to_string()
    );
    let info = a.start_vm(&spec)?;
    let console = info["console_log"].as_str().context("console path")?;
    wait_for_text(Path::new(console), "TERN-READY", Duration::from_secs(90))?;

    // more connections than the peers' whole budget, from one address (another than the
    // agents'), none starting a handshake
    let to = b.peer_addr.to_string();
    let n = MAX_PEER_CONNECTIONS + 4;
    let mut raw = (0..n)
        .map(|_| raw_from("127.0.0.2", &to))
        .collect::<Result<Vec<_>>>()?;
    let started = Instant::now();
    // the address got its share of the handshakes; the rest were closed at once
    let held = held_of(&mut raw)?;
    ensure!(
        held.len() == MAX_PEER_HANDSHAKES_PER_SOURCE,
        "held {} of {n} connections from one address: {held:?}",
        held.len()
    );
    // a migration goes through while they are held
    ensure!(
        started.elapsed() < PEER_HANDSHAKE_WITHIN,
        "too slow to migrate before the handshake deadline"
    );
    let id = a.start_migration("idle", &to, serde_json::json!({}))?;
    let st = a.wait_migration(&id, Duration::from_secs(120))?;
    ensure!(
        st.report.is_some_and(|r| r.digest_ok),
        "the migration, with handshakes held: {:?}\ndestination log:\n{}",
        st.error,
        b.log_text()
    );
    ensure!(b.vm_status("idle")? == "running");
    ensure!(
        b.log_text().contains("refused a peer connection"),
        "no word of the refused connections:\n{}",
        b.log_text()
    );
    dropped_by_deadline(&mut raw, &held, started, PEER_HANDSHAKE_WITHIN)?;
    Ok(())
}

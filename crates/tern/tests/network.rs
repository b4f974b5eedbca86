//! VM network cards (`[[nic]]`): a virtio-net card on a tap the agent makes and puts on
//! its network's bridge (`tern-NETWORK`); the MAC, made once when the VM starts, and the
//! network travel with the VM. Two agents in one network namespace the test makes (so
//! both hosts' bridges are one `tern-lab`, as one L2 segment), a real guest answering
//! ping at 198.18.60.2 from the bridge's 198.18.60.1, through a failed upgrade, a
//! migration and an upgrade (each new QEMU on a new tap).

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::{bail, ensure, Context, Result};
use serde_json::json;
use tern_testkit::agents::{checker_clean, e2e_lock, wait_for_text, AgentOptions, TestAgent};
use tern_testkit::guest::{ensure_guest, GuestImage};
use tern_testkit::probe::Echo;
use tern_testkit::run;

const BIN: &str = env!("CARGO_BIN_EXE_tern");
const GUEST_IP: &str = "198.18.60.2";

/// A network namespace of the test's own, deleted when dropped.
struct Netns(String);

impl Netns {
    fn new(name: &str) -> Result<Netns> {
        let _ = Command::new("ip")
            .args(["netns", "delete", name])
            .stderr(Stdio::null())
            .status();
        run(Command::new("ip").args(["netns", "add", name]))?;
        let ns = Netns(name.into());
        ns.ip(&["link", "set", "lo", "up"])?;
        Ok(ns)
    }

    /// `ip -n NS ARGS`.
    fn ip(&self, args: &[&str]) -> Result<String> {
        run(Command::new("ip").args(["-n", &self.0]).args(args))
    }

    /// One ping to the guest, waiting at most `secs` for its answer.
    fn ping(&self, secs: u32) -> Result<()> {
        run(Command::new("ip")
            .args(["netns", "exec", &self.0, "ping", "-n", "-c", "1"])
            .args(["-w", &secs.to_string(), GUEST_IP]))
        .map(|_| ())
    }

    /// The taps on bridge `tern-lab`, by name.
    fn taps(&self) -> Result<Vec<String>> {
        let out = self.ip(&["-o", "link", "show", "master", "tern-lab"])?;
        Ok(out
            .lines()
            .filter_map(|l| l.split(": ").nth(1))
            .map(|n| n.split('@').next().unwrap_or(n).to_string())
            .collect())
    }

    /// The MAC the host's neighbour table has for the guest.
    fn guest_mac(&self) -> Result<String> {
        let out = self.ip(&["neigh", "show", GUEST_IP])?;
        out.split_whitespace()
            .skip_while(|w| *w != "lladdr")
            .nth(1)
            .map(String::from)
            .with_context(|| format!("no MAC for {GUEST_IP}: {out:?}"))
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "delete", &self.0])
            .status();
    }
}

/// Pings the guest every 20 ms until stopped; how many went unanswered.
struct Pinger(Child);

impl Pinger {
    fn start(ns: &Netns) -> Result<Pinger> {
        Ok(Pinger(
            Command::new("ip")
                // -q: only the summary (a pipe nobody reads until the end stays empty)
                .args([
                    "netns", "exec", &ns.0, "ping", "-q", "-n", "-i", "0.02", GUEST_IP,
                ])
                .stdout(Stdio::piped())
                .stderr(Stdio::null())
                .spawn()?,
        ))
    }

    /// Stops; the guest, paused `pause_ms` by `what`, went unanswered for about that
    /// long, not longer (slack: 0.5 s). Prints what it saw.
    fn stop_after_pause(self, what: &str, pause_ms: u64) -> Result<()> {
        let (sent, answered) = self.stop()?;
        let lost = sent - answered;
        eprintln!("{what}: {sent} pings every 20 ms, {lost} unanswered, paused {pause_ms} ms");
        ensure!(
            lost <= pause_ms / 20 + 25,
            "{what}: {lost} of {sent} pings unanswered for a {pause_ms} ms pause"
        );
        Ok(())
    }

    /// (sent, answered)
    fn stop(self) -> Result<(u64, u64)> {
        run(Command::new("kill").args(["-INT", &self.0.id().to_string()]))?;
        let out = self.0.wait_with_output()?;
        let text = String::from_utf8_lossy(&out.stdout);
        let line = text
            .lines()
            .find(|l| l.contains("packets transmitted"))
            .with_context(|| format!("ping's summary: {text}"))?;
        let n: Vec<u64> = line
            .split(|c: char| !c.is_ascii_digit())
            .filter_map(|w| w.parse().ok())
            .collect();
        ensure!(n.len() >= 2, "{line}");
        Ok((n[0], n[1]))
    }
}

/// The test VM "web": the dirtier, its card on network `lab` at [`GUEST_IP`]; `extra`
/// goes before the card.
fn web_spec(g: &GuestImage, extra: &str) -> String {
    format!(
        "name = \"web\"\nmemory_mib = 128\nvcpus = 1\naccel = \"tcg\"\nkernel = {:?}\ninitrd = {:?}\n\
         append = \"console=ttyS0 panic=-1 tern.workload=dirty tern.mib=16 tern.rate=2 tern.ip={GUEST_IP}/24\"\n\
         {extra}[[nic]]\nnetwork = \"lab\"\n",
        g.kernel.display().to_string(),
        g.initrd.display().to_string()
    )
}

/// Starts `spec` on `a` and waits for its dirtier: the VM's info and its console.
fn boot(a: &TestAgent, spec: &str) -> Result<(serde_json::Value, PathBuf)> {
    let info = a.start_vm(spec)?;
    let console = PathBuf::from(info["console_log"].as_str().context("console")?);
    wait_for_text(&console, "tern-dirty pass 1", Duration::from_secs(120))
        .context("guest did not boot")?;
    Ok((info, console))
}

/// Migrates "web" from `a` to `b`; it must succeed.
fn migrate(a: &TestAgent, b: &TestAgent) -> Result<tern_api::migration::MigrationStatus> {
    let id = a.start_migration("web", &b.peer_addr.to_string(), json!({}))?;
    let m = a.wait_migration(&id, Duration::from_secs(120))?;
    ensure!(
        m.error.is_none(),
        "migration failed: {m:?}\n{}",
        a.log_text()
    );
    Ok(m)
}

fn agent(ns: &Netns, name: &str, env: &[(&str, &str)]) -> Result<TestAgent> {
    TestAgent::start_with(
        Path::new(BIN),
        name,
        AgentOptions {
            netns: Some(&ns.0),
            env,
            ..Default::default()
        },
    )
}

#[test]
#[ignore = "tier vm: needs root, network namespaces and QEMU (bash scripts/test.sh runs it)"]
fn a_vm_keeps_its_card_address_and_pings_through_a_migration_and_an_upgrade() -> Result<()> {
    let _l = e2e_lock();
    let g = ensure_guest()?;
    let ns = Netns::new(&format!("tern-nic-{}", std::process::id()))?;
    // A's upgrades fail once the new QEMU has the memory (it is killed)
    let a = agent(&ns, "host-a", &[("TERN_FAULT", "upgrade-kill-new-qemu")])?;
    let b = agent(&ns, "host-b", &[])?;
    let spec = web_spec(&g, "memory = \"shared\"\n");
    // a card with a bad network name is refused before anything starts
    let bad = spec.replace("network = \"lab\"", "network = \"Lab\"");
    let e = a
        .start_vm(&bad)
        .err()
        .context("a bad network name was taken")?;
    ensure!(e.to_string().contains("network name"), "{e:#}");

    let (info, console) = boot(&a, &spec)?;
    // the agent made the card's MAC and its tap, on the network's bridge (made too)
    let nic = &info["nics"][0];
    let mac = nic["mac"].as_str().context("no MAC")?.to_string();
    ensure!(mac.starts_with("52:54:00:"), "{info}");
    let tap_a = nic["tap"].as_str().context("no tap")?.to_string();
    ensure!(ns.taps()? == vec![tap_a.clone()], "{:?}", ns.taps());
    // a second VM may not take that MAC on that network
    let twin = spec.replace("name = \"web\"", "name = \"web2\"").replace(
        "network = \"lab\"",
        &format!("network = \"lab\"\nmac = \"{mac}\""),
    );
    let e = a
        .start_vm(&twin)
        .err()
        .context("a second card with the same MAC was taken")?;
    ensure!(format!("{e:#}").contains("is VM \"web\"'s"), "{e:#}");
    // the host took no address on the bridge (no IPv6 link-local either)
    ensure!(
        ns.ip(&["-6", "addr", "show", "dev", "tern-lab"])?
            .trim()
            .is_empty(),
        "{}",
        ns.ip(&["addr", "show", "dev", "tern-lab"])?
    );
    ns.ip(&["addr", "add", "198.18.60.1/24", "dev", "tern-lab"])?;
    ns.ping(20)
        .context("the guest does not answer on its card")?;
    ensure!(
        ns.guest_mac()? == mac,
        "the guest answered from another MAC"
    );

    // an upgrade that fails once the new QEMU has the memory and its own tap leaves the
    // VM running in its old QEMU, on its tap, answering (the new QEMU's tap is gone)
    let e = a
        .call("POST", "/v1/vms/web/upgrade", Some(&json!({})))
        .err()
        .context("the upgrade with its new QEMU killed succeeded")?;
    ensure!(
        format!("{e:#}").contains("the VM runs in its old QEMU"),
        "{e:#}"
    );
    let again = a.vm("web")?;
    ensure!(
        again["pid"] == info["pid"] && again["state"] == "running",
        "{again}"
    );
    ensure!(again["nics"][0]["tap"] == tap_a.as_str(), "{again}");
    ns.ping(10).context("no answer after the failed upgrade")?;
    ensure!(ns.taps()? == vec![tap_a.clone()], "{:?}", ns.taps());

    // migrate while pinging: the card arrives with its MAC on B's tap
    checker_clean(&console, 0)?;
    let pinger = Pinger::start(&ns)?;
    let m = migrate(&a, &b)?;
    let on_b = b.vm("web")?;
    ensure!(on_b["nics"][0]["mac"] == mac.as_str(), "{on_b}");
    let tap_b = on_b["nics"][0]["tap"]
        .as_str()
        .context("no tap on B")?
        .to_string();
    // the source's tap went with its QEMU: one tap on the bridge, B's
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while ns.taps()? != vec![tap_b.clone()] {
        if std::time::Instant::now() > deadline {
            bail!("taps on the bridge after the migration: {:?}", ns.taps()?);
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    ns.ping(10).context("no answer after the migration")?;
    pinger.stop_after_pause("migration", m.report.as_ref().map_or(0, |r| r.downtime_ms))?;
    ensure!(ns.guest_mac()? == mac);
    checker_clean(&b.console_log("web")?, 0)?;

    // a same-host upgrade: the new QEMU on a new tap on the same bridge, the old one's
    // gone with it
    let pinger = Pinger::start(&ns)?;
    let r = b
        .call("POST", "/v1/vms/web/upgrade", Some(&json!({})))
        .with_context(|| b.log_text())?;
    ensure!(r["ram_bytes_copied"] == 0, "{r}");
    let after = b.vm("web")?;
    ensure!(after["pid"] != on_b["pid"], "the same QEMU: {after}");
    let tap_new = after["nics"][0]["tap"]
        .as_str()
        .context("no tap")?
        .to_string();
    ensure!(tap_new != tap_b, "{after}");
    ensure!(ns.taps()? == vec![tap_new.clone()], "{:?}", ns.taps());
    ns.ping(10).context("no answer after the upgrade")?;
    pinger.stop_after_pause("upgrade", r["downtime_ms"].as_u64().unwrap_or(0))?;
    checker_clean(&b.console_log("web")?, 0)?;
    Ok(())
}

/// Three hosts in three IP subnets joined by a router (namespaces the test made): A
/// 198.18.1.1, B 198.18.2.1, C 198.18.3.1, the router .254 in each. Each runs an agent
/// with its VTEP and the other two as VXLAN peers, serving network `lab`.
struct RoutedLab {
    ns: Vec<Netns>,
}

impl RoutedLab {
    fn up(tag: &str) -> Result<RoutedLab> {
        let name = |h: &str| format!("tvx-{tag}-{h}");
        let router = Netns::new(&name("r"))?;
        let mut ns = Vec::new();
        for (i, h) in ["a", "b", "c"].iter().enumerate() {
            let host = Netns::new(&name(h))?;
            let net = i + 1;
            let (inside, outside) = (format!("u{h}"), format!("r{h}"));
            run(Command::new("ip").args([
                "link", "add", &inside, "netns", &host.0, "type", "veth", "peer", "name", &outside,
                "netns", &router.0,
            ]))?;
            host.ip(&["addr", "add", &format!("198.18.{net}.1/24"), "dev", &inside])?;
            host.ip(&["link", "set", &inside, "up"])?;
            host.ip(&[
                "route",
                "add",
                "default",
                "via",
                &format!("198.18.{net}.254"),
            ])?;
            router.ip(&[
                "addr",
                "add",
                &format!("198.18.{net}.254/24"),
                "dev",
                &outside,
            ])?;
            router.ip(&["link", "set", &outside, "up"])?;
            ns.push(host);
        }
        run(Command::new("ip").args([
            "netns",
            "exec",
            &router.0,
            "sysctl",
            "-q",
            "-w",
            "net.ipv4.ip_forward=1",
        ]))?;
        ns.push(router);
        Ok(RoutedLab { ns })
    }

    /// Host `i`'s agent (0: A, 1: B, 2: C).
    fn agent(&self, i: usize, env: &[(&str, &str)]) -> Result<TestAgent> {
        self.agent_in(i, env, None)
    }

    /// Host `i`'s agent, on state directory `state_dir` (a restart) or a new one.
    fn agent_in(
        &self,
        i: usize,
        env: &[(&str, &str)],
        state_dir: Option<&Path>,
    ) -> Result<TestAgent> {
        let me = format!("198.18.{}.1", i + 1);
        let peers: Vec<String> = (0..3)
            .filter(|&j| j != i)
            .map(|j| format!("198.18.{}.1", j + 1))
            .collect();
        let args = [
            "--vtep",
            &me,
            "--vxlan-peer",
            &peers[0],
            "--vxlan-peer",
            &peers[1],
            "--network",
            "lab",
        ];
        TestAgent::start_with(
            Path::new(BIN),
            ["host-a", "host-b", "host-c"][i],
            AgentOptions {
                netns: Some(&self.ns[i].0),
                listen: Some(format!("{me}:7700").parse()?),
                args: &args,
                env,
                state_dir,
                ..Default::default()
            },
        )
    }
}

/// The VXLAN port's own forwarding entry for `mac` on host `ns`: the VTEP it names.
fn fdb_dst(ns: &Netns, mac: &str) -> Result<Option<String>> {
    let out = run(Command::new("bridge").args(["-n", &ns.0, "fdb", "show", "dev", "tvx-lab"]))?;
    Ok(out
        .lines()
        .find(|l| l.starts_with(mac) && l.contains(" self"))
        .and_then(|l| {
            l.split_whitespace()
                .skip_while(|w| *w != "dst")
                .nth(1)
                .map(String::from)
        }))
}

/// Host `ns`'s filters that send frames for cards that left on to their new host: the
/// packets each sent on so far (none: no such filter).
fn forwarded(ns: &Netns) -> Result<Vec<u64>> {
    let out = run(Command::new("ip").args([
        "netns", "exec", &ns.0, "tc", "-s", "filter", "show", "dev", "tvx-lab", "ingress",
    ]))
    .unwrap_or_default();
    Ok(out
        .lines()
        .filter_map(|l| l.trim().strip_prefix("Sent "))
        .filter_map(|l| l.split_whitespace().nth(2).and_then(|n| n.parse().ok()))
        .collect())
}

/// ARP suppression on host C, the guest on B having told its address: C's bridge has
/// the guest's address as a permanent neighbour, its VXLAN port has `neigh_suppress`,
/// and a client behind one of the bridge's ports (a veth from a namespace of its own)
/// gets its ARP request answered by C itself: with C's flooding to the peers removed, no
/// request can reach the guest, yet the client reaches it.
fn arp_is_answered_on_c(lab: &RoutedLab, mac: &str) -> Result<()> {
    let c = &lab.ns[2];
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let n = c.ip(&["neigh", "show", GUEST_IP, "dev", "tern-lab"])?;
        if n.contains(&format!("lladdr {mac}")) && n.contains("PERMANENT") {
            break;
        }
        ensure!(
            std::time::Instant::now() < deadline,
            "C does not answer ARP for {GUEST_IP}: {n:?}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let port =
        run(Command::new("bridge").args(["-n", &c.0, "-d", "link", "show", "dev", "tvx-lab"]))?;
    ensure!(port.contains("neigh_suppress on"), "{port}");
    let behind = Netns::new(&format!("{}-k", c.0))?;
    run(Command::new("ip").args([
        "link", "add", "ck", "netns", &c.0, "type", "veth", "peer", "name", "k0", "netns",
        &behind.0,
    ]))?;
    c.ip(&["link", "set", "ck", "master", "tern-lab", "up"])?;
    behind.ip(&["addr", "add", "198.18.60.9/24", "dev", "k0"])?;
    behind.ip(&["link", "set", "k0", "up"])?;
    let floods: Vec<String> = ["198.18.1.1", "198.18.2.1"].map(String::from).to_vec();
    for f in &floods {
        run(Command::new("bridge").args([
            "-n",
            &c.0,
            "fdb",
            "del",
            "00:00:00:00:00:00",
            "dev",
            "tvx-lab",
            "dst",
            f,
            "self",
        ]))?;
    }
    let reached = behind.ping(10);
    if reached.is_err() {
        // what C's bridge knew, for the failure's message
        eprintln!(
            "C's bridge:\n{}\nits neighbours:\n{}",
            run(Command::new("bridge").args(["-n", &c.0, "fdb", "show", "br", "tern-lab"]))?,
            c.ip(&["neigh", "show", "dev", "tern-lab"])?
        );
    }
    for f in &floods {
        run(Command::new("bridge").args([
            "-n",
            &c.0,
            "fdb",
            "append",
            "00:00:00:00:00:00",
            "dev",
            "tvx-lab",
            "dst",
            f,
            "self",
            "permanent",
        ]))?;
    }
    reached.context("a client behind C's bridge, with no flooding to the peers, got no answer")?;
    ensure!(
        behind.guest_mac()? == mac,
        "the client's ARP answer names another MAC"
    );
    let _ = c.ip(&["link", "del", "ck"]);
    Ok(())
}

/// Waits (at most 10 s) until host `ns` forwards `mac` to `vtep`.
fn wait_fdb(ns: &Netns, mac: &str, vtep: &str) -> Result<()> {
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let dst = fdb_dst(ns, mac)?;
        if dst.as_deref() == Some(vtep) {
            return Ok(());
        }
        if std::time::Instant::now() > deadline {
            bail!("{}: {mac} goes to {dst:?}, not {vtep}", ns.0);
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
#[ignore = "tier vm: needs root, network namespaces and QEMU (bash scripts/test.sh runs it)"]
fn a_vm_keeps_its_address_and_connections_across_subnets_and_the_overlay_control_is_what_keeps_them(
) -> Result<()> {
    let _l = e2e_lock();
    let g = ensure_guest()?;
    let lab = RoutedLab::up(&std::process::id().to_string())?;
    // A never tells its peers where its cards are: the overlay as it is without its
    // control plane, for the move back
    let a = lab.agent(0, &[("TERN_FAULT", "overlay-silent")])?;
    // B forwards frames for a card that left it for 1 s, not 30
    let b = lab.agent(1, &[("TERN_FAULT", "overlay-forward-briefly")])?;
    let _c = lab.agent(2, &[])?;
    // C serves `lab` with no VM: its bridge and VXLAN port are there; the client is C's
    // own address on that bridge
    let client = &lab.ns[2];
    client.ip(&["addr", "add", "198.18.60.1/24", "dev", "tern-lab"])?;
    // the card's address is in the spec: the agents answer ARP for it (suppression)
    let spec = web_spec(&g, "")
        .replace("tern.ip=", "tern.echo=7 tern.ip=")
        .replace(
            "network = \"lab\"\n",
            &format!("network = \"lab\"\nip = \"{GUEST_IP}\"\n"),
        );
    let (info, _) = boot(&a, &spec)?;
    let mac = info["nics"][0]["mac"]
        .as_str()
        .context("no MAC")?
        .to_string();
    // nobody told C (A is silent): the client's first frames flood to every VTEP, and
    // the VXLAN port learns nothing from the answers
    client
        .ping(20)
        .context("the client on C does not reach the guest on A over the overlay")?;
    ensure!(client.guest_mac()? == mac);
    ensure!(fdb_dst(client, &mac)?.is_none(), "C learned {mac}");

    // A (198.18.1.0/24) -> B (198.18.2.0/24) while C pings every 20 ms and streams over
    // TCP: B tells A and C where the card is now
    let echo = Echo::start(&client.0, format!("{GUEST_IP}:7").parse()?)?;
    std::thread::sleep(Duration::from_millis(500));
    let pinger = Pinger::start(client)?;
    let m = migrate(&a, &b)?;
    // what C still sent to A after the guest stopped there went on to B
    let on = forwarded(&lab.ns[0])?;
    ensure!(
        on.len() == 1 && on[0] > 0,
        "A did not send the card's frames on to B: {on:?}"
    );
    eprintln!("A sent {} frames on to B", on[0]);
    wait_fdb(client, &mac, "198.18.2.1")?;
    wait_fdb(&lab.ns[0], &mac, "198.18.2.1")?;
    client
        .ping(10)
        .context("the client does not reach the guest on B")?;
    let downtime = m.report.as_ref().map_or(0, |r| r.downtime_ms);
    pinger.stop_after_pause("across subnets", downtime)?;
    let seen = echo.stop().context("the TCP connection through the move")?;
    eprintln!(
        "TCP echo through the move: {} bytes both ways, checked; longest silence {:?} (downtime {downtime} ms)",
        seen.bytes, seen.longest_silence
    );
    ensure!(seen.bytes > 0);
    ensure!(
        seen.longest_silence < Duration::from_millis(downtime + 2000),
        "the TCP stream stalled {:?} for a {downtime} ms pause",
        seen.longest_silence
    );
    ensure!(client.guest_mac()? == mac);
    checker_clean(&b.console_log("web")?, 0)?;
    // each agent kept the VXLAN port it made at its start (a port whose settings it
    // did not recognise would have been made again, cutting the network)
    for agent in [&a, &b] {
        ensure!(
            !agent.log_text().contains("replacing a VXLAN port"),
            "{}",
            agent.log_text()
        );
    }
    arp_is_answered_on_c(&lab, &mac)?;

    // B -> A: A keeps quiet, so C still forwards the card to B, which no longer has it:
    // without the control plane the guest is out of the client's reach after its move,
    // once B stops sending what still reaches it on to A (its own announcements change
    // nothing: no VTEP learns from frames)
    migrate(&b, &a)?;
    a.vm("web")?;
    // A sends the card's frames nowhere since its tap is here again (B would send them
    // back: a loop), and B stops forwarding them to A after its (shortened) while
    ensure!(
        forwarded(&lab.ns[0])?.is_empty(),
        "A still forwards the card"
    );
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while !forwarded(&lab.ns[1])?.is_empty() {
        ensure!(
            std::time::Instant::now() < deadline,
            "B forwards the card to A for more than 10 s"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    ensure!(
        client.ping(3).is_err(),
        "the client reached the guest on A though nobody told C"
    );
    ensure!(fdb_dst(client, &mac)?.as_deref() == Some("198.18.2.1"));

    // A's agent restarts without the fault: at its start it tells its peers what runs
    // there, C forwards the card to A, and the client reaches the guest again
    let mut a = a;
    a.terminate();
    let a2 = lab.agent_in(0, &[], Some(&a.state_dir))?;
    ensure!(a2.vm("web")?["state"] == "running", "{}", a2.log_text());
    wait_fdb(client, &mac, "198.18.1.1")?;
    client
        .ping(10)
        .context("the client does not reach the guest once A told C")?;
    checker_clean(&a2.console_log("web")?, 0)?;
    Ok(())
}

#[test]
#[ignore = "tier vm: needs root and network namespaces (bash scripts/test.sh runs it)"]
fn a_peer_claims_cards_only_for_its_own_vtep_and_a_host_that_is_no_peer_is_not_answered(
) -> Result<()> {
    use tern_proto::{ErrorCode, Location, Message};
    use tern_testkit::hostile::HostilePeer;
    let _l = e2e_lock();
    let lab = RoutedLab::up(&format!("h{}", std::process::id()))?;
    let a = lab.agent(0, &[])?;
    let addr = a.peer_addr;
    // a cluster certificate, from inside namespace `ns`: Locations, and what came back
    let tell = |ns: &Netns, entries: Vec<Location>| -> Result<Message> {
        let ns = ns.0.clone();
        std::thread::spawn(move || -> Result<Message> {
            tern_testkit::enter_netns(&ns)?;
            let mut p = HostilePeer::connect(addr, "evil", &[])?;
            p.hello(7)?;
            p.send(&Message::Locations { entries })?;
            p.recv(Duration::from_secs(15))?
                .context("the agent closed without an answer")
        })
        .join()
        .map_err(|_| anyhow::anyhow!("the peer's thread panicked"))?
    };
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)?
        .as_micros() as u64;
    let card = |last: u8, vtep: &str, seq: u64| -> Result<Location> {
        Ok(Location {
            network: "lab".into(),
            mac: [0x52, 0x54, 0, 0, 0, last],
            vtep: vtep.parse()?,
            seq,
        })
    };
    let (router, c) = (&lab.ns[3], &lab.ns[2]);
    // the router (198.18.1.254) holds a cluster certificate but is no --vxlan-peer of A
    match tell(router, vec![card(0x0c, "198.18.1.254", now)?])? {
        Message::Abort { code, message } => ensure!(
            code == ErrorCode::NotAuthorized && message.contains("overlay peers"),
            "{code:?} {message}"
        ),
        other => bail!("a host that is no peer was answered: {other:?}"),
    }
    // C (198.18.3.1) is a peer: it may claim a card for itself, not for B, and not from
    // the far future (a claim no real one could ever beat)
    let answer = tell(
        c,
        vec![
            card(0x0a, "198.18.2.1", now)?,
            card(0x0b, "198.18.3.1", u64::MAX / 2)?,
            card(0x0c, "198.18.3.1", now)?,
        ],
    )?;
    ensure!(
        matches!(&answer, Message::Locations { entries } if entries.is_empty()),
        "A runs no VM, yet answered {answer:?}"
    );
    let host_a = &lab.ns[0];
    wait_fdb(host_a, "52:54:00:00:00:0c", "198.18.3.1")?;
    for mac in ["52:54:00:00:00:0a", "52:54:00:00:00:0b"] {
        ensure!(
            fdb_dst(host_a, mac)?.is_none(),
            "A took a claim it should have refused: {mac}"
        );
    }
    ensure!(
        a.log_text()
            .contains("a peer may claim cards only for its own VTEP")
            && a.log_text().contains("ahead of this host's clock"),
        "{}",
        a.log_text()
    );
    Ok(())
}

#[test]
#[ignore = "tier vm: needs root and network namespaces (bash scripts/test.sh runs it)"]
fn a_vni_in_use_or_shared_by_two_networks_stops_the_agent_saying_what_to_do() -> Result<()> {
    let ns = Netns::new(&format!("tern-vni-{}", std::process::id()))?;
    let vtep = "198.18.9.1";
    // (a veth pair: this kernel may have no dummy devices)
    ns.ip(&["link", "add", "u0", "type", "veth", "peer", "name", "u1"])?;
    ns.ip(&["addr", "add", &format!("{vtep}/24"), "dev", "u0"])?;
    ns.ip(&["link", "set", "u0", "up"])?;
    // `tern agent` in `ns`, serving `networks` over an overlay: how it failed
    let refused = |networks: &[&str]| -> Result<String> {
        let mut args = vec!["--vtep", vtep, "--vxlan-peer", "198.18.9.2"];
        for n in networks {
            args.extend(["--network", n]);
        }
        let started = TestAgent::start_with(
            Path::new(BIN),
            "host-a",
            AgentOptions {
                netns: Some(&ns.0),
                listen: Some(format!("{vtep}:7700").parse()?),
                args: &args,
                ..Default::default()
            },
        );
        match started {
            Ok(a) => bail!("the agent started with {networks:?}:\n{}", a.log_text()),
            Err(e) => {
                let text = format!("{e:#}");
                ensure!(text.contains("exited (exit status: 1)"), "{text}");
                Ok(text)
            }
        }
    };
    let lab = tern_net::vxlan::vni("lab");

    // two networks whose names hash to one VNI ("lab", "s67tc": found by brute force):
    // refused before any interface is made
    ensure!(tern_net::vxlan::vni("s67tc") == lab);
    let e = refused(&["lab", "s67tc"])?;
    eprintln!("two networks of one VNI:\n{e}");
    for part in [
        "\"lab\"".to_string(),
        "\"s67tc\"".into(),
        format!("same VNI {lab}"),
        "rename one".into(),
    ] {
        ensure!(e.contains(&part), "{part:?} not in:\n{e}");
    }
    let links = ns.ip(&["-o", "link", "show"])?;
    ensure!(
        !links.contains("tern-lab") && !links.contains("tvx-"),
        "a refused agent made interfaces:\n{links}"
    );

    // a VXLAN device tern did not make holds lab's VNI on 4789 (another local address
    // would clash as well: the kernel does not look at it)
    let vni = lab.to_string();
    ns.ip(&[
        "link", "add", "vx9", "type", "vxlan", "id", &vni, "dstport", "4789", "local", vtep,
    ])?;
    let e = refused(&["lab"])?;
    for part in [
        "network \"lab\" needs VNI".to_string(),
        format!("VNI {lab} on UDP port 4789"),
        "VXLAN device vx9".into(),
        "ip link del vx9".into(),
        "rename network \"lab\"".into(),
    ] {
        ensure!(e.contains(&part), "{part:?} not in:\n{e}");
    }
    ensure!(!e.contains("netlink:"), "a raw netlink error:\n{e}");
    // the foreign device is left alone, and lab got no port
    let vx9 = ns.ip(&["-d", "link", "show", "vx9"])?;
    ensure!(vx9.contains(&format!("vxlan id {vni} ")), "{vx9}");
    ensure!(
        ns.ip(&["link", "show", "tvx-lab"]).is_err(),
        "tvx-lab was made"
    );
    eprintln!("a foreign device with the VNI:\n{e}");
    Ok(())
}

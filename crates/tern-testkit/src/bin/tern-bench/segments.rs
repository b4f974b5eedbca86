//! `tern-bench segments`: what a client sees of a VM that moves to another IP subnet over
//! the emulated WAN. The routed lab of `scripts/wan.sh routed` (hosts A 198.18.1.1, B
//! 198.18.2.1, C 198.18.3.1, each in its own subnet behind one router that carries the
//! profile's rate and delay); overlay network `lab`; the guest (a dirtier, an echo
//! server) at 198.19.0.2 on A; the client on C at 198.19.0.1 on C's bridge. Each run moves
//! the guest to the other host (A -> B, B -> A, ...) while the client pings it every 10 ms
//! and streams 1 KiB every 10 ms both ways over one TCP connection, every byte checked.
//! Three set-ups, one run of the benchmark:
//! - the agents' control plane (the default): the destination tells every peer at the
//!   switchover record;
//! - control off: the forwarding the agents programmed when the VM started, never moved
//!   (the destination runs `--overlay-control learn`, so it tells nobody);
//! - flood and learn (`--overlay-control learn` everywhere): the L2 behaviour, where only
//!   the guest's own announcements after the switchover move it.
//!
//! The targets: the longest gap <= the migration's downtime + 2 RTT, no
//! duplicates, the TCP connection survives every run.
//!
//! Usage: tern-bench segments --tern target/release/tern [--profile wan-100m-50ms]
//!        [--runs 10] [--out FILE]

use std::fmt::Write as _;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{bail, ensure, Context, Result};
use tern_testkit::agents::{wait_for_text, RoutedWan, TestAgent};
use tern_testkit::guest::GuestImage;
use tern_testkit::probe::{Echo, EchoSeen, Pings, PingsSeen};
use tern_testkit::run;

const GUEST: &str = "198.19.0.2";
const CLIENT: &str = "198.19.0.1/24";

struct Trip {
    from: usize,
    downtime_ms: u64,
    total_ms: u64,
    pings: PingsSeen,
    tcp: Result<EchoSeen, String>,
}

impl Trip {
    /// The client's longest time without an answer, ms: between two answers, or from the
    /// last answer to the end (10 ms a ping) when the guest never answered again.
    fn gap_ms(&self) -> f64 {
        (self.pings.longest_gap.as_secs_f64() * 1e3).max(self.pings.unanswered_at_end as f64 * 10.0)
    }
}

fn spec(g: &GuestImage) -> String {
    format!(
        "name = \"web\"\nmemory_mib = 128\nvcpus = 1\naccel = \"tcg\"\nkernel = {:?}\ninitrd = {:?}\n\
         append = \"console=ttyS0 panic=-1 tern.workload=dirty tern.mib=16 tern.rate=2 tern.echo=7 tern.ip={GUEST}/24\"\n\
         [[nic]]\nnetwork = \"lab\"\n",
        g.kernel.display().to_string(),
        g.initrd.display().to_string()
    )
}

/// The round trip between C and A, ms (median of 5 pings).
fn rtt_ms() -> Result<f64> {
    let out = run(Command::new("ip").args([
        "netns",
        "exec",
        "tern-c",
        "ping",
        "-n",
        "-q",
        "-c",
        "5",
        "-i",
        "0.2",
        "198.18.1.1",
    ]))?;
    let line = out
        .lines()
        .find(|l| l.starts_with("rtt"))
        .with_context(|| format!("ping: {out}"))?;
    // rtt min/avg/max/mdev = 50.4/50.5/50.6/0.08 ms
    line.split('=')
        .nth(1)
        .and_then(|v| v.trim().split('/').nth(1))
        .and_then(|v| v.parse().ok())
        .with_context(|| format!("ping: {line}"))
}

/// Whether the client gets an answer from the guest within `secs`.
fn reaches(secs: u32) -> bool {
    Command::new("ip")
        .args(["netns", "exec", "tern-c", "ping", "-n", "-c", "1", "-w"])
        .arg(secs.to_string())
        .arg(GUEST)
        .output()
        .is_ok_and(|o| o.status.success())
}

/// One move of "web" from `agents[from]` to the other of A and B, watched from C.
fn trip(agents: &[TestAgent], from: usize) -> Result<Trip> {
    let to = 1 - from;
    let guest: IpAddr = GUEST.parse()?;
    let echo = Echo::start("tern-c", format!("{GUEST}:7").parse()?)?;
    let pings = Pings::start("tern-c", guest, Duration::from_millis(10))?;
    // a second of steady state before
    std::thread::sleep(Duration::from_secs(1));
    let id = agents[from].start_migration(
        "web",
        &agents[to].peer_addr.to_string(),
        super::bench_request()?,
    )?;
    let st = agents[from].wait_migration(&id, Duration::from_secs(300))?;
    let r = st
        .report
        .with_context(|| format!("migration failed: {:?}", st.error))?;
    // the client reaches the guest again (or gives up after 10 s), then a second of
    // steady state after
    let back = reaches(10);
    std::thread::sleep(Duration::from_secs(1));
    let pings = pings.stop()?;
    let tcp = if back {
        echo.stop().map_err(|e| format!("{e:#}"))
    } else {
        // the guest is out of reach: the connection waits for it (until its timeout); do
        // not wait with it
        echo.abandon();
        Err("the guest is out of the client's reach".into())
    };
    eprintln!(
        "  {} -> {}: downtime {} ms, pings {}/{} answered, {} dup, longest gap {:?}, TCP {}",
        ["A", "B"][from],
        ["A", "B"][to],
        r.downtime_ms,
        pings.answered,
        pings.sent,
        pings.duplicates,
        pings.longest_gap,
        match &tcp {
            Ok(s) => format!(
                "ok, {} bytes, longest silence {:?}",
                s.bytes, s.longest_silence
            ),
            Err(e) => e.clone(),
        }
    );
    Ok(Trip {
        from,
        downtime_ms: r.downtime_ms,
        total_ms: r.total_time_ms,
        pings,
        tcp,
    })
}

/// Three agents with `args[i]` for host i; the guest booted on A; the client's address on
/// C's bridge; C reaches the guest.
fn setup(
    bin: &Path,
    g: &GuestImage,
    lab: &RoutedWan,
    args: [&[&str]; 3],
) -> Result<Vec<TestAgent>> {
    let agents = (0..3)
        .map(|i| lab.agent(bin, i, "lab", args[i], &[]))
        .collect::<Result<Vec<_>>>()?;
    run(Command::new("ip").args(["-n", "tern-c", "addr", "replace", CLIENT, "dev", "tern-lab"]))?;
    let info = agents[0].start_vm(&spec(g))?;
    let console = PathBuf::from(info["console_log"].as_str().context("console")?);
    wait_for_text(&console, "tern-dirty pass 1", Duration::from_secs(180))
        .context("guest did not boot")?;
    ensure!(reaches(20), "the client on C does not reach the guest on A");
    Ok(agents)
}

fn stop(agents: Vec<TestAgent>) {
    for a in &agents {
        let _ = a.call("DELETE", "/v1/vms/web", None);
    }
    drop(agents);
}

pub fn bench(bin: &Path, g: &GuestImage, profile: &str, runs: usize) -> Result<String> {
    let lab = RoutedWan::up(profile)?;
    let rtt = rtt_ms()?;
    eprintln!("[segments {profile}] RTT between hosts {rtt:.1} ms");

    let mut sets: Vec<(&str, Vec<Trip>)> = Vec::new();
    let learn: &[&str] = &["--overlay-control", "learn"];
    for (name, args) in [
        ("agents' control plane", [&[][..], &[], &[]]),
        (
            "flood and learn (announcements only)",
            [learn, learn, learn],
        ),
    ] {
        eprintln!("[segments] {name}: {runs} moves");
        let agents = setup(bin, g, &lab, args)?;
        let trips = (0..runs)
            .map(|k| trip(&agents, k % 2))
            .collect::<Result<Vec<_>>>()?;
        stop(agents);
        sets.push((name, trips));
    }

    eprintln!("[segments] control off: 1 move");
    let agents = setup(bin, g, &lab, [&[], learn, &[]])?;
    let off = trip(&agents, 0)?;
    let reached_later = reaches(5);
    stop(agents);
    if reached_later {
        bail!("with the control off the client still reaches the guest: the set-up is wrong");
    }
    sets.push(("control off (forwarding never moved)", vec![off]));

    let mut t = String::new();
    writeln!(
        t,
        "Routed lab (`scripts/wan.sh routed {profile}`): hosts in 198.18.1.0/24, 198.18.2.0/24 and \
         198.18.3.0/24 behind one router; measured RTT between hosts {rtt:.1} ms. Guest 128 MiB \
         (dirtier at 2 MiB/s, echo server), overlay IP {GUEST}; the client on host C pings it \
         every 10 ms and streams 1 KiB every 10 ms each way over one TCP connection. Each move \
         alternates A -> B, B -> A. Gap: the longest time between two ping answers (the times \
         ping printed them, -D). Target: gap <= downtime + 2 RTT.\n"
    )?;
    writeln!(
        t,
        "| set-up | moves | downtime ms (median, max) | longest gap ms (median, max) | gap - downtime ms (max) | within target | pings lost (median) | duplicates | TCP survived | bytes checked |"
    )?;
    writeln!(t, "|---|---|---|---|---|---|---|---|---|---|")?;
    for (name, trips) in &sets {
        let down: Vec<f64> = trips.iter().map(|x| x.downtime_ms as f64).collect();
        let gap: Vec<f64> = trips.iter().map(Trip::gap_ms).collect();
        let over = trips
            .iter()
            .map(|x| x.gap_ms() - x.downtime_ms as f64)
            .fold(f64::MIN, f64::max);
        let within = trips
            .iter()
            .filter(|x| x.gap_ms() <= x.downtime_ms as f64 + 2.0 * rtt)
            .count();
        let lost: Vec<f64> = trips
            .iter()
            .map(|x| (x.pings.sent - x.pings.answered) as f64)
            .collect();
        let dups: u64 = trips.iter().map(|x| x.pings.duplicates).sum();
        let tcp_ok = trips.iter().filter(|x| x.tcp.is_ok()).count();
        let bytes: u64 = trips
            .iter()
            .filter_map(|x| x.tcp.as_ref().ok())
            .map(|s| s.bytes)
            .sum();
        let maxf = |v: &[f64]| v.iter().copied().fold(0.0, f64::max);
        writeln!(
            t,
            "| {name} | {} | {:.0}, {:.0} | {:.0}, {:.0} | {over:.0} | {within} of {} | {:.0} | {dups} | {tcp_ok} of {} | {:.1} MiB |",
            trips.len(),
            super::median(down.clone()),
            maxf(&down),
            super::median(gap.clone()),
            maxf(&gap),
            trips.len(),
            super::median(lost),
            trips.len(),
            bytes as f64 / 1048576.0,
        )?;
    }
    writeln!(t, "\nEvery move:\n")?;
    writeln!(t, "| set-up | move | total ms | downtime ms | pings answered/sent | longest gap ms | gap began (s after the first answer) | TCP |")?;
    writeln!(t, "|---|---|---|---|---|---|---|---|")?;
    for (name, trips) in &sets {
        for x in trips {
            writeln!(
                t,
                "| {name} | {} | {} | {} | {}/{} | {:.0} | {:.1} | {} |",
                ["A -> B", "B -> A"][x.from],
                x.total_ms,
                x.downtime_ms,
                x.pings.answered,
                x.pings.sent,
                x.gap_ms(),
                x.pings.gap_began.as_secs_f64(),
                match &x.tcp {
                    Ok(s) => format!("ok, silence {} ms", s.longest_silence.as_millis()),
                    Err(e) => e.clone(),
                }
            )?;
        }
    }
    Ok(t)
}

//! `tern controller`, `tern cluster status|plan` and `tern host drain|undrain`: running the
//! cluster controller and talking to it (its local socket, [`tern_controller::api`]).

use std::io::IsTerminal;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::{Args, Subcommand};
use tern_api::client::{Client, Endpoint};
use tern_controller::api::ClusterStatus;
use tern_controller::config::ControllerConfig;
use tern_controller::decide::Decisions;

/// The controller's socket unless `--controller` or `TERN_CONTROLLER` says otherwise.
pub const DEFAULT_CONTROLLER: &str = "/run/tern/controller.sock";

#[derive(Args)]
pub struct ControllerArgs {
    /// The controller's configuration (TOML; docs/controller.md).
    #[arg(long)]
    config: PathBuf,
    /// Decide and log, move nothing.
    #[arg(long)]
    dry_run: bool,
}

#[derive(Subcommand)]
pub enum ClusterCmd {
    /// Hosts, their load, VMs, moves in flight, drained hosts and recent decisions.
    Status {
        #[arg(long)]
        json: bool,
    },
    /// What the controller would do now, and why (moves nothing).
    Plan {
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand)]
pub enum HostCmd {
    /// Move every VM away from HOST (placement as for balancing) and keep it empty.
    Drain {
        host: String,
        /// Wait until HOST runs no VM (or some VM can go nowhere), at most this many
        /// seconds, printing what moves.
        #[arg(long, value_name = "SECS")]
        wait: Option<u64>,
    },
    /// Let HOST take VMs again.
    Undrain { host: String },
}

fn client(controller: Option<String>) -> Result<Client> {
    let at = controller
        .or_else(|| std::env::var("TERN_CONTROLLER").ok())
        .unwrap_or_else(|| DEFAULT_CONTROLLER.into());
    Ok(Client::new(Endpoint::parse(&at)?))
}

/// `tern controller`.
pub fn run_controller(a: ControllerArgs) -> Result<()> {
    let filter = tracing_subscriber::EnvFilter::try_from_env("TERN_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr)
        .init();
    let mut config = ControllerConfig::load(&a.config)?;
    config.dry_run |= a.dry_run;
    let store: Box<dyn tern_controller::state::Store> = match &config.etcd {
        None => Box::new(tern_controller::state::FileStore::open(&config.state_dir)?),
        Some(e) => {
            let me = config.name.clone().unwrap_or_else(|| {
                rustix::system::uname()
                    .nodename()
                    .to_string_lossy()
                    .into_owned()
            });
            match (&e.ca, &e.cert, &e.key) {
                (Some(ca), Some(cert), Some(key)) => {
                    Box::new(tern_controller::etcd::EtcdStore::open_tls(
                        &e.endpoints,
                        &e.prefix,
                        &me,
                        e.ttl_s,
                        &tern_controller::etcd::EtcdTls {
                            ca: ca.clone(),
                            cert: cert.clone(),
                            key: key.clone(),
                        },
                    )?)
                }
                _ => Box::new(tern_controller::etcd::EtcdStore::open(
                    &e.endpoints,
                    &e.prefix,
                    &me,
                    e.ttl_s,
                )?),
            }
        }
    };
    let api = config.api.clone();
    let rt = tokio::runtime::Runtime::new()?;
    rt.block_on(async move {
        let svc = tern_controller::service::Service::new(config, store)?;
        let serving = tern_controller::api::serve(svc.clone(), &api)
            .await
            .with_context(|| format!("cannot serve the controller's API on {}", api.display()))?;
        tracing::info!(api = %api.display(), hosts = svc.config.hosts.len(), dry_run = svc.config.dry_run, "tern controller ready");
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
        tokio::select! {
            _ = svc.clone().run() => {}
            _ = serving => {}
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
        }
        anyhow::Ok(())
    })
}

/// `tern cluster ...`.
pub fn cluster(controller: Option<String>, cmd: ClusterCmd) -> Result<()> {
    let c = client(controller)?;
    match cmd {
        ClusterCmd::Status { json } => {
            let v = c.call("GET", "/v1/cluster", None)?;
            if json {
                println!("{}", serde_json::to_string_pretty(&v)?);
                return Ok(());
            }
            let s: ClusterStatus = serde_json::from_value(v).context("the controller's answer")?;
            print_status(&s);
        }
        ClusterCmd::Plan { json } => {
            let v = c.call("GET", "/v1/plan", None)?;
            if json {
                println!("{}", serde_json::to_string_pretty(&v)?);
                return Ok(());
            }
            let d: Decisions = serde_json::from_value(v).context("the controller's answer")?;
            print_decisions(&d);
        }
    }
    Ok(())
}

/// `tern host ...`.
pub fn host(controller: Option<String>, cmd: HostCmd) -> Result<()> {
    let c = client(controller)?;
    match cmd {
        HostCmd::Undrain { host } => {
            c.call("POST", &format!("/v1/hosts/{host}/undrain"), None)?;
            println!("host {host} undrained: the controller may place VMs there again");
        }
        HostCmd::Drain { host, wait } => {
            c.call("POST", &format!("/v1/hosts/{host}/drain"), None)?;
            println!("host {host} drained: the controller moves its VMs away");
            let Some(secs) = wait else { return Ok(()) };
            let until = Instant::now() + Duration::from_secs(secs);
            let mut seen_until = tern_controller::service::unix_now();
            loop {
                let s: ClusterStatus =
                    serde_json::from_value(c.call("GET", "/v1/cluster", None)?)
                        .context("the controller's answer")?;
                // what happened to this host's VMs since the last look
                for l in s.log.iter().filter(|l| l.at > seen_until) {
                    if l.text.contains(&host) {
                        println!("  {}", l.text);
                    }
                }
                seen_until = s.log.last().map_or(seen_until, |l| l.at.max(seen_until));
                let left: Vec<_> = s.vms.iter().filter(|v| v.host == host).collect();
                let stuck: Vec<_> = s
                    .last
                    .notes
                    .iter()
                    .filter(|n| {
                        n.text
                            .contains(&format!("cannot leave drained host {host}"))
                    })
                    .collect();
                if left.is_empty() {
                    println!("host {host} runs no VM");
                    return Ok(());
                }
                if !stuck.is_empty() && s.in_flight.iter().all(|m| m.from != host) {
                    for n in &stuck {
                        println!("  {}", n.text);
                    }
                    bail!(
                        "host {host} still runs {} VM(s) that no host may take: {}",
                        left.len(),
                        left.iter()
                            .map(|v| v.name.as_str())
                            .collect::<Vec<_>>()
                            .join(", ")
                    );
                }
                if Instant::now() >= until {
                    bail!(
                        "host {host} still runs {} VM(s) after {secs} s: {} (the drain goes on)",
                        left.len(),
                        left.iter()
                            .map(|v| v.name.as_str())
                            .collect::<Vec<_>>()
                            .join(", ")
                    );
                }
                std::thread::sleep(Duration::from_secs(1));
            }
        }
    }
    Ok(())
}

fn print_status(s: &ClusterStatus) {
    println!(
        "controller: {}{}, state in {}",
        if s.leading {
            "leading"
        } else {
            "standby (not acting)"
        },
        if s.dry_run { ", dry run" } else { "" },
        s.store
    );
    println!(
        "{:<12} {:>6} {:>8} {:>8} {:>6} {:>4}  notes",
        "host", "state", "cores", "load", "util", "vms"
    );
    for h in &s.hosts {
        let state = if !h.alive {
            "down"
        } else if h.drained {
            "drain"
        } else {
            "up"
        };
        let mut notes = Vec::new();
        if let Some(t) = h.hot_for_s {
            notes.push(format!("hot for {t:.0} s"));
        }
        if let Some(e) = &h.error {
            notes.push(e.clone());
        }
        println!(
            "{:<12} {:>6} {:>8.1} {:>8.2} {:>5.0}% {:>4}  {}",
            h.name,
            state,
            h.capacity_cores,
            h.load_cores,
            h.utilisation * 100.0,
            h.vms,
            notes.join("; ")
        );
    }
    println!(
        "{:<16} {:<12} {:>6} {:>8}  moving / last move",
        "vm", "host", "load", "MiB"
    );
    for v in &s.vms {
        let extra = match (&v.moving, &v.last_move) {
            (Some(to), _) => format!("moving to {to}"),
            (None, Some(m)) => format!(
                "came from {} ({:.0} s ago)",
                m.from,
                tern_controller::service::unix_now() - m.at
            ),
            _ => String::new(),
        };
        println!(
            "{:<16} {:<12} {:>6.2} {:>8}  {}",
            v.name,
            v.host,
            v.load_cores,
            v.mem_bytes >> 20,
            extra
        );
    }
    if !s.last.notes.is_empty() {
        println!("last round:");
        for n in &s.last.notes {
            println!("  {}", n.text);
        }
    }
    if !s.log.is_empty() {
        println!("recent:");
        for l in s
            .log
            .iter()
            .rev()
            .take(10)
            .collect::<Vec<_>>()
            .into_iter()
            .rev()
        {
            println!("  {}", l.text);
        }
    }
}

fn print_decisions(d: &Decisions) {
    if d.moves.is_empty() {
        println!("no move now");
    }
    for m in &d.moves {
        println!(
            "move {} from {} to {}: {}",
            m.vms.join("+"),
            m.from,
            m.to,
            m.numbers()
        );
    }
    for n in &d.notes {
        println!("  {}", n.text);
    }
}

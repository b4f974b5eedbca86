//! `tern`: the command line. `tern agent` runs the host daemon; every other command is a
//! thin client of an agent's control API (see `tern_agent::api`).

use std::io::{IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::{CommandFactory, FromArgMatches, Parser, Subcommand};
use serde_json::{json, Value};
use tern_api::{Compression, MigrateRequest, MigrationReport, MigrationStatus, Objective};

use tern_api::client::{Client, Endpoint};
use tern_api::image::{ImageInfo, ImportReport, RefreshSummary};

mod cluster;
mod config;
mod docs;

const DEFAULT_API: &str = "unix:/run/tern/agent.sock";

/// `--data-path`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum DataPath {
    Auto,
    Lean,
    Dedup,
}

#[derive(Parser)]
#[command(
    name = "tern",
    version,
    about = "Live-migrate running QEMU/KVM VMs between hosts"
)]
struct Cli {
    /// The agent to talk to: unix:/path [env: TERN_AGENT]
    #[arg(long, global = true)]
    agent: Option<String>,
    /// The cluster controller to talk to (`tern cluster`, `tern host`): unix:/path
    /// [env: TERN_CONTROLLER; default /run/tern/controller.sock]
    #[arg(long, global = true)]
    controller: Option<String>,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run the host agent (launches VMs, serves the API, accepts peer agents).
    Agent(Box<AgentArgs>),
    /// Manage VMs on the agent's host.
    Vm {
        #[command(subcommand)]
        cmd: VmCmd,
    },
    /// Live-migrate a VM to another host's agent, with progress and a final report.
    Migrate(MigrateArgs),
    /// The host's disk-image library: the images an incoming VM's disk is rebuilt from.
    Image {
        #[command(subcommand)]
        cmd: ImageCmd,
    },
    /// Show the agent's migrations (both directions).
    Migrations {
        #[arg(long)]
        json: bool,
    },
    /// Follow what happens on the agent as it happens (migrations' phases and outcomes;
    /// VMs started, stopped, arrived, left, upgraded) until interrupted.
    Events {
        /// One JSON object per line (the API's `GET /v1/events` data, with `seq`: the
        /// event's number).
        #[arg(long)]
        json: bool,
        /// First the kept events numbered after N (the last number a previous run
        /// printed), then new ones: nothing still kept is missed across a reconnect.
        #[arg(long, value_name = "N")]
        since: Option<u64>,
    },
    /// The cluster's certificate authority (agents accept only peers it certified).
    Ca {
        #[command(subcommand)]
        cmd: CaCmd,
    },
    /// Agent certificates.
    Cert {
        #[command(subcommand)]
        cmd: CertCmd,
    },
    /// Run the cluster controller: balances load across the agents it manages, drains
    /// hosts (docs/controller.md).
    Controller(cluster::ControllerArgs),
    /// What the cluster controller sees and would do.
    Cluster {
        #[command(subcommand)]
        cmd: cluster::ClusterCmd,
    },
    /// Drain a host for maintenance, or let it take VMs again (through the controller).
    Host {
        #[command(subcommand)]
        cmd: cluster::HostCmd,
    },
    /// Print a shell completion script, e.g. `tern completions bash > /etc/bash_completion.d/tern`.
    Completions { shell: clap_complete::Shell },
    /// Write man pages for tern and each of its commands (tern.1, tern-migrate.1, ...) into OUT.
    Man { out: PathBuf },
}

#[derive(Subcommand)]
enum ImageCmd {
    /// Index a disk image in place (read whole; the file stays where it is and must stay
    /// readable by the agent).
    Import {
        file: PathBuf,
        /// The image's format (default: told from the file).
        #[arg(long, value_parser = ["raw", "qcow2"])]
        format: Option<String>,
        #[arg(long)]
        json: bool,
    },
    /// Re-read the indexed images that changed; drop those whose file is gone.
    Index {
        #[arg(long)]
        json: bool,
    },
    /// List the indexed images.
    List {
        #[arg(long)]
        json: bool,
    },
    /// Drop an image from the index (the file stays).
    Remove { file: PathBuf },
}

#[derive(Subcommand)]
enum CaCmd {
    /// Create a cluster CA (ca.pem, ca.key) and cluster key in DIR; refuses to overwrite.
    Init {
        #[arg(long, default_value = "/etc/tern/ca")]
        dir: PathBuf,
        /// A name for the cluster, shown in the CA certificate.
        #[arg(long, default_value = "tern")]
        cluster: String,
    },
}

#[derive(Subcommand)]
enum CertCmd {
    /// Issue HOST's agent certificate; OUT is then that agent's --tls-dir.
    Issue {
        /// The host's DNS name or IP address, as peers dial it (a SAN of the certificate).
        host: String,
        /// The CA directory (from `tern ca init`).
        #[arg(long, default_value = "/etc/tern/ca")]
        ca: PathBuf,
        /// Where to write ca.pem, agent.pem, agent.key, cluster.key.
        #[arg(long)]
        out: PathBuf,
        /// More IP addresses the agent is dialled by.
        #[arg(long = "ip")]
        ips: Vec<std::net::IpAddr>,
        /// More DNS names the agent is dialled by.
        #[arg(long = "dns")]
        dns: Vec<String>,
        /// Host labels for the authorisation policy, e.g. --label trusted.
        #[arg(long = "label")]
        labels: Vec<String>,
        /// Validity in days.
        #[arg(long, default_value_t = 365)]
        days: u32,
    },
}

#[derive(clap::Args, Debug)]
struct AgentArgs {
    /// Read options from this TOML file (keys: these flags' names without the dashes;
    /// a flag given here wins). The package's unit uses /etc/tern/agent.toml.
    #[arg(long)]
    config: Option<PathBuf>,
    /// This host's name, shown to peers and in reports.
    #[arg(long, default_value_t = default_hostname())]
    name: String,
    /// Where VM run directories live.
    #[arg(long, default_value = "/var/lib/tern")]
    state_dir: PathBuf,
    /// Control API socket: unix:/path (root only).
    #[arg(long, default_value = DEFAULT_API)]
    api: String,
    /// Peer-agent listener (TCP).
    #[arg(long, default_value = "0.0.0.0:7700")]
    listen: std::net::SocketAddr,
    /// Fail a migration whose peer connection makes no progress for this long (seconds).
    #[arg(long, default_value_t = 20)]
    stall_timeout_secs: u64,
    /// Cluster key file (64 hex digits, created if missing; default STATE_DIR/cluster.key).
    /// Agents dedup pages against each other only when they use the same key.
    #[arg(long)]
    cluster_key: Option<PathBuf>,
    /// Page store in memory, MiB.
    #[arg(long, default_value_t = 512)]
    store_mem_mib: u64,
    /// Page store spill file (STATE_DIR/pages.store), MiB; 0 for none.
    #[arg(long, default_value_t = 4096)]
    store_file_mib: u64,
    /// This agent's TLS credentials (`tern cert issue HOST --out DIR`). Required: peers
    /// talk mutual TLS only.
    #[arg(long, default_value = "/etc/tern/tls")]
    tls_dir: PathBuf,
    /// Authorisation policy (TOML; which VMs may go to which host labels). Default: VMs
    /// with a vTPM go only to hosts labelled `trusted`.
    #[arg(long)]
    policy: Option<PathBuf>,
    /// A directory incoming VMs may boot from (kernel, initrd); repeat for more. A peer
    /// names the files: only files under these are launched. Default: STATE_DIR/boot.
    #[arg(long = "boot-dir")]
    boot_dirs: Vec<PathBuf>,
    /// A directory on storage every host mounts at the same path (NFS, a cluster
    /// filesystem); repeat for more. An incoming VM's shared disks (`shared = true`) may
    /// only be there. None: incoming VMs with shared disks are refused.
    #[arg(long = "shared-dir")]
    shared_dirs: Vec<PathBuf>,
    /// A virtual network this host serves (its bridge tern-NAME made when a VM needs it);
    /// repeat for more. An incoming VM's network card may join only these, or a network
    /// whose bridge already exists here. VMs started here may name any network.
    #[arg(long = "network")]
    networks: Vec<String>,
    /// This host's VTEP: its address in the underlay, for the VXLAN overlay that joins
    /// each network's bridges across hosts (UDP 4789; docs/network.md). Unset: networks
    /// stay on this host.
    #[arg(long)]
    vtep: Option<std::net::Ipv4Addr>,
    /// Another host's VTEP; repeat for each. Frames for unknown addresses go to all. Its
    /// agent listens for peers at that address, on this agent's --listen port.
    #[arg(long = "vxlan-peer")]
    vxlan_peers: Vec<std::net::Ipv4Addr>,
    /// How a host knows where another host's VM cards are: `agents` (the agents tell each
    /// other and program each host's forwarding, nothing learned from frames) or `learn`
    /// (flood and learn from received frames, no control plane).
    #[arg(long, value_enum, default_value_t = OverlayControl::Agents)]
    overlay_control: OverlayControl,
    /// The unprivileged user QEMU runs as (it opens its start-up files as root, then drops
    /// to this user, with its seccomp sandbox on). `root` keeps QEMU root (not advised).
    #[arg(long, default_value = tern_agent::DEFAULT_QEMU_USER)]
    qemu_user: String,
    /// Incoming migrations at once; more are refused until one ends.
    #[arg(long, default_value_t = 4)]
    max_incoming: usize,
    /// Log lines as text or as JSON objects (one per line, for log shippers); a line
    /// logged during a migration or a hand-over carries its id and VM either way.
    #[arg(long, value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
    /// Serve Prometheus metrics on this address (GET /metrics, plain HTTP: use a local or
    /// management address), e.g. 127.0.0.1:9477. Default: off.
    #[arg(long)]
    metrics_listen: Option<std::net::SocketAddr>,
    /// Serve the cluster controller on this address: the VMs, the host's load and
    /// migrations, HTTP over mutual TLS to certificates of the cluster CA labelled
    /// `controller` (`tern cert issue NAME --label controller`). Default: off.
    #[arg(long)]
    control_listen: Option<std::net::SocketAddr>,
    /// CPU cores VMs may use on this host, as its load reports it to the controller
    /// (e.g. when agents share a machine). Default: the cores this agent may run on.
    #[arg(long, value_name = "N")]
    capacity_cores: Option<f64>,
    /// What the departure snapshots may take on this host's disk in all, MiB: a VM that
    /// migrates away leaves its memory state here (the stream, recorded on the way) for a
    /// restart if its new host dies. A recording passing it stops; the oldest snapshots go
    /// when a new one is kept. 0: nothing is recorded (no write to local disk during
    /// outgoing migrations).
    #[arg(long, value_name = "MIB", default_value_t = tern_agent::snapshots::DEFAULT_LIMIT_MIB)]
    snapshot_limit_mib: u64,
    /// Pause every VM here when the cluster controller has not been heard from for SECS
    /// (once it was): a host that is only cut off then does not run VMs the controller
    /// restarts elsewhere. The controller releases the fence. Default: never.
    #[arg(long, value_name = "SECS")]
    fence_after: Option<f64>,
    /// This host's libvirt, for `tern migrate --libvirt` (virsh -c URI).
    #[arg(long, default_value = tern_agent::DEFAULT_LIBVIRT_URI)]
    libvirt_uri: String,
    /// Where the carrier sockets of libvirt domains are: the `--migrateuri
    /// unix://DIR/DOMAIN.sock` path, the same on every host.
    #[arg(long, default_value = "/run/tern/libvirt")]
    libvirt_socket_dir: PathBuf,
    /// libvirt's QEMU state directory (DOMAIN.pid names the domain's QEMU, the only
    /// process a carrier socket talks to).
    #[arg(long, default_value = "/run/libvirt/qemu")]
    libvirt_run_dir: PathBuf,
}

#[derive(Subcommand)]
enum VmCmd {
    /// Start a VM from a TOML spec file.
    Start { spec: PathBuf },
    /// List the VMs on this host.
    List {
        #[arg(long)]
        json: bool,
    },
    /// Stop a VM (QMP quit) and forget it.
    Stop { name: String },
    /// Continue a running VM in a new QEMU process on this host (e.g. after a QEMU
    /// update), its memory handed over without a copy; the old QEMU runs it on if
    /// anything fails. Needs memory = "shared" in the VM's spec (not the default).
    Upgrade {
        name: String,
        /// The new QEMU binary on the agent's host (default: the one new VMs get).
        #[arg(long)]
        qemu: Option<PathBuf>,
        #[arg(long)]
        json: bool,
    },
    /// Hand a running VM to another tern agent on this host (its new QEMU there takes
    /// the memory over, no copy); needs memory = "shared". The VM runs on here if
    /// anything fails.
    Move {
        name: String,
        /// The other agent's API socket, e.g. unix:/run/tern-b/agent.sock.
        #[arg(long = "to-agent")]
        to_agent: String,
        #[arg(long)]
        json: bool,
    },
    /// Send one QMP command to a VM, e.g. `tern vm qmp web1 query-status`.
    Qmp {
        name: String,
        command: String,
        /// Arguments as a JSON object.
        arguments: Option<String>,
    },
}

#[derive(clap::Args)]
struct MigrateArgs {
    /// The VM to move (with --libvirt: the libvirt domain).
    name: String,
    /// NAME is a libvirt domain on this host: libvirt runs the migration (virsh migrate,
    /// started by the agent) and tern carries its stream to the agent at --to.
    #[arg(long, requires = "libvirt_to", conflicts_with = "plan")]
    libvirt: bool,
    /// With --libvirt: the destination's libvirt, as virsh migrate takes it (e.g.
    /// qemu+tls://host-b/system).
    #[arg(long, requires = "libvirt")]
    libvirt_to: Option<String>,
    /// With --libvirt: a further virsh migrate flag (repeat for more): --persistent,
    /// --undefinesource, --auto-converge, --abort-on-error, --unsafe.
    #[arg(long = "virsh-flag", requires = "libvirt", allow_hyphen_values = true)]
    virsh_flags: Vec<String>,
    /// With --libvirt: the domain's local disks move too (virsh migrate
    /// --copy-storage-all; tern carries libvirt's NBD connections). The destination needs
    /// each image at the same path and size, as libvirt does.
    #[arg(long, requires = "libvirt")]
    copy_storage: bool,
    /// Destination agent, HOST:PORT.
    #[arg(long, required_unless_present = "cancel")]
    to: Option<String>,
    /// QEMU's downtime limit in ms (default 300).
    #[arg(long)]
    downtime_ms: Option<u64>,
    /// Cap on the migration rate, MiB/s (default: no cap).
    #[arg(long = "max-bandwidth")]
    max_bandwidth_mibps: Option<u64>,
    /// Frame compression: auto (picked from link speed and CPU), none, lz4, zstd-1..19.
    #[arg(long, default_value = "auto")]
    compression: Compression,
    /// The data path: auto (measured as it runs: lean where the link keeps up, dedup where
    /// it is the bottleneck), lean (every page's bytes, nothing hashed or kept) or dedup
    /// (references to content the destination holds and deltas, wherever smaller).
    #[arg(long, value_enum, default_value_t = DataPath::Auto)]
    data_path: DataPath,
    /// The same as --data-path lean.
    #[arg(long, conflicts_with = "data_path")]
    no_dedup: bool,
    /// Extra TCP connections for the data (default: 4 when the round trip is 10 ms or
    /// more, else 0: the control connection carries it).
    #[arg(long)]
    streams: Option<u16>,
    /// When pre-copy does not converge (the guest dirties memory faster than it crosses),
    /// tern slows the guest's CPUs just enough, up to this percentage (QEMU's throttle);
    /// 0 never slows it.
    #[arg(long, default_value_t = 99)]
    max_throttle: u8,
    /// Then it may raise the downtime limit up to this many ms (default: never raised).
    #[arg(long = "max-downtime")]
    max_downtime_ms: Option<u64>,
    /// With both at their most: seconds without getting closer to the switchover before the
    /// migration stops (the VM keeps running here).
    #[arg(long = "converge-timeout", default_value_t = 60)]
    converge_timeout_s: u64,
    /// What the bandwidth controller optimises: fastest (default), least-downtime (the
    /// link at full rate, a 50 ms starting downtime limit), least-link-use (yields to the
    /// link's other traffic; with --deadline, the lowest rate that finishes in time).
    #[arg(long)]
    objective: Option<Objective>,
    /// Finish within this long (90s, 10m, 2h) at the lowest rate that does; implies
    /// --objective least-link-use.
    #[arg(long, value_parser = tern_api::migration::parse_duration_s)]
    deadline: Option<u64>,
    /// When the link to the destination is lost before the switchover, wait this long in
    /// all (90s, 10m) for it to come back, the VM running here, then go on where it was
    /// (default 2m; 0 fails at the first stall).
    #[arg(long, value_parser = tern_api::migration::parse_duration_s)]
    outage_wait: Option<u64>,
    /// Post-copy: after the first pass the VM runs at the destination, which fetches the
    /// pages still here as it goes; the guest is never slowed (no throttle). Risk: if this
    /// host or the link dies during post-copy, the VM is lost. Not for libvirt domains,
    /// VMs with local disks or shared memory.
    #[arg(long, conflicts_with_all = ["plan", "libvirt"])]
    postcopy: bool,
    /// Post-copy as the last resort: pre-copy as usual (throttle, downtime limit as
    /// allowed), and only when that cannot converge, post-copy instead of giving up (with
    /// --postcopy's risk from then on). Ignored, with a note, where post-copy is not
    /// possible (local disks, shared memory, an older destination).
    #[arg(long, conflicts_with_all = ["postcopy", "libvirt"])]
    postcopy_fallback: bool,
    /// Move nothing: measure (the guest's dirty rate, the round trip, what the destination
    /// holds of a sample of RAM, the policy; the link with a 2 s probe when no past
    /// migration or --max-bandwidth says its rate) and print what the migration would cost
    /// and what tern would do.
    #[arg(long)]
    plan: bool,
    /// Print the final report as JSON on stdout.
    #[arg(long)]
    json: bool,
    /// Cancel this VM's running migration instead of starting one.
    #[arg(long, conflicts_with = "to")]
    cancel: bool,
}

fn default_hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| "localhost".into())
}

fn main() {
    let matches = Cli::command().get_matches();
    let cli = match Cli::from_arg_matches(&matches) {
        Ok(c) => c,
        Err(e) => e.exit(),
    };
    if let Err(e) = run(cli, &matches) {
        // Print the whole chain once (each layer's Display omits its source).
        let mut msg = format!("error: {e}");
        for c in e.chain().skip(1) {
            msg.push_str(&format!("\n  caused by: {c}"));
        }
        eprintln!("{msg}");
        std::process::exit(1);
    }
}

fn run(cli: Cli, matches: &clap::ArgMatches) -> Result<()> {
    let api = cli
        .agent
        .or_else(|| std::env::var("TERN_AGENT").ok())
        .unwrap_or_else(|| DEFAULT_API.to_string());
    match cli.cmd {
        // the agent's flags go over its config file
        Cmd::Agent(_) => run_agent(config::agent_args(
            matches
                .subcommand_matches("agent")
                .context("agent arguments")?,
        )?),
        Cmd::Controller(a) => cluster::run_controller(a),
        Cmd::Cluster { cmd } => cluster::cluster(cli.controller, cmd),
        Cmd::Host { cmd } => cluster::host(cli.controller, cmd),
        Cmd::Completions { shell } => Ok(docs::completions(shell, &mut std::io::stdout())?),
        Cmd::Man { out } => {
            let pages = docs::man_pages(&out)?;
            println!("{pages} man pages in {}", out.display());
            Ok(())
        }
        Cmd::Ca {
            cmd: CaCmd::Init { dir, cluster },
        } => {
            tern_agent::pki::init_ca(&dir, &cluster)?;
            println!(
                "cluster CA in {} (keep ca.key private); next: tern cert issue HOST --ca {} --out DIR",
                dir.display(),
                dir.display()
            );
            Ok(())
        }
        Cmd::Cert {
            cmd:
                CertCmd::Issue {
                    host,
                    ca,
                    out,
                    ips,
                    dns,
                    labels,
                    days,
                },
        } => {
            let req = tern_agent::pki::IssueRequest {
                host: host.clone(),
                ips,
                dns,
                labels,
                days,
            };
            tern_agent::pki::issue(&ca, &req, &out)?;
            println!(
                "certificate for {host} (labels {:?}) in {}; start its agent with --tls-dir {}",
                req.labels,
                out.display(),
                out.display()
            );
            Ok(())
        }
        Cmd::Vm { cmd } => vm(Client::new(Endpoint::parse(&api)?), cmd),
        Cmd::Migrate(m) => migrate(Client::new(Endpoint::parse(&api)?), m),
        Cmd::Image { cmd } => image(Client::new(Endpoint::parse(&api)?), cmd),
        Cmd::Events { json, since } => {
            use tern_api::events::AgentEvent;
            let mut failed = None;
            Client::new(Endpoint::parse(&api)?).events_since(since, |seq, e| {
                let line = if json {
                    let mut v = serde_json::to_value(&e).unwrap_or_default();
                    if let (Some(seq), Some(o)) = (seq, v.as_object_mut()) {
                        o.insert("seq".into(), seq.into());
                    }
                    v.to_string()
                } else {
                    match &e {
                        AgentEvent::Migration { status: m } => {
                            let mut l = format!(
                                "migration {} {} {:?} {}",
                                m.id,
                                m.vm,
                                m.direction,
                                m.phase.as_str()
                            );
                            if let Some(err) = &m.error {
                                l += &format!(": {} ({})", err.message, err.vm_state);
                            }
                            l
                        }
                        AgentEvent::Vm { name, what, pid } => match pid {
                            Some(p) => format!("vm {name} {what} (pid {p})"),
                            None => format!("vm {name} {what}"),
                        },
                        AgentEvent::Progress { status: m } => {
                            let p = &m.progress;
                            let eta = p
                                .eta_ms
                                .map(|e| format!(", {:.0} s left", e as f64 / 1000.0))
                                .unwrap_or_default();
                            format!(
                                "migration {} {} {} {:.0}% {} MiB on the wire{eta}",
                                m.id,
                                m.vm,
                                m.phase.as_str(),
                                p.percent,
                                p.bytes_on_wire >> 20
                            )
                        }
                        AgentEvent::Open { agent } => format!("following agent {agent}"),
                        AgentEvent::Lagged { missed } => {
                            format!("({missed} events missed: no longer kept, or this listener fell behind)")
                        }
                    }
                };
                let line = match seq {
                    Some(n) if !json => format!("#{n} {line}"),
                    _ => line,
                };
                use std::io::Write;
                let mut out = std::io::stdout().lock();
                if let Err(e) = writeln!(out, "{line}").and_then(|_| out.flush()) {
                    failed = Some(e);
                    return false;
                }
                true
            })?;
            if let Some(e) = failed {
                if e.kind() != std::io::ErrorKind::BrokenPipe {
                    return Err(e.into());
                }
            }
            Ok(())
        }
        Cmd::Migrations { json } => {
            let v = Client::new(Endpoint::parse(&api)?).call("GET", "/v1/migrations", None)?;
            if json {
                println!("{}", serde_json::to_string_pretty(&v)?);
            } else {
                let list: Vec<MigrationStatus> = serde_json::from_value(v)?;
                for m in list {
                    let p = &m.progress;
                    let mut how = String::new();
                    if m.direction == tern_api::Direction::Outgoing {
                        how = format!("{:5.1}%", p.percent);
                        if let (false, Some(eta)) = (m.finished, p.eta_ms) {
                            how.push_str(&format!(" ETA {:.0}s", eta as f64 / 1000.0));
                        }
                        if p.throttle_pct > 0 && !m.finished {
                            how.push_str(&format!(" throttled {}%", p.throttle_pct));
                        }
                    }
                    println!(
                        "{}  {:<8?} {:<12} {:<10} {:<28} {}",
                        m.id, m.direction, m.vm, m.phase, m.peer, how
                    );
                }
            }
            Ok(())
        }
    }
}

/// Where the overlay's forwarding comes from (`--overlay-control`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
enum OverlayControl {
    Agents,
    Learn,
}

/// How `tern agent` writes its log.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
enum LogFormat {
    Text,
    Json,
}

fn run_agent(a: AgentArgs) -> Result<()> {
    let filter = tracing_subscriber::EnvFilter::try_from_env("TERN_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let log = tracing_subscriber::fmt()
        .with_env_filter(filter)
        // colours only on a terminal (not into the journal or a log file)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr);
    match a.log_format {
        LogFormat::Text => log.init(),
        // the innermost span's fields (migration id, VM) on each line, flattened
        LogFormat::Json => log
            .json()
            .with_current_span(true)
            .with_span_list(false)
            .init(),
    }
    let fault = match std::env::var("TERN_FAULT") {
        Ok(f) if !f.is_empty() => Some(f.parse().map_err(anyhow::Error::msg)?),
        _ => None,
    };
    let mut config = tern_agent::AgentConfig::new(
        a.name,
        a.state_dir,
        a.api.parse().map_err(anyhow::Error::msg)?,
        a.listen,
    );
    config.fault = fault;
    config.stall_timeout = std::time::Duration::from_secs(a.stall_timeout_secs.max(1));
    config.cluster_key = a.cluster_key;
    config.store_mem_mib = a.store_mem_mib;
    config.store_file_mib = a.store_file_mib;
    config.policy = a.policy;
    config.boot_dirs = a.boot_dirs;
    config.shared_dirs = a.shared_dirs;
    if let Some(bad) = a
        .networks
        .iter()
        .find(|n| !tern_qemu::spec::valid_network_name(n))
    {
        anyhow::bail!("--network {bad:?}: a network name is 1-10 characters from [a-z0-9-], not starting with '-'");
    }
    config.networks = a.networks;
    config.overlay = match (a.vtep, a.vxlan_peers.is_empty()) {
        (Some(local), _) => {
            let mut seen = std::collections::HashSet::new();
            if let Some(p) = a
                .vxlan_peers
                .iter()
                .find(|p| **p == local || !seen.insert(**p))
            {
                anyhow::bail!(
                    "--vxlan-peer {p}: each peer once, and not this host's own --vtep {local}"
                );
            }
            Some(tern_net::vxlan::Overlay {
                local,
                peers: a.vxlan_peers,
                learning: a.overlay_control == OverlayControl::Learn,
            })
        }
        (None, true) => None,
        (None, false) => {
            anyhow::bail!("--vxlan-peer without --vtep: give this host's own VTEP address too")
        }
    };
    config.qemu_user = (a.qemu_user != "root").then_some(a.qemu_user);
    config.max_incoming = a.max_incoming.max(1);
    config.metrics_listen = a.metrics_listen;
    config.control_listen = a.control_listen;
    if let Some(c) = a.capacity_cores {
        anyhow::ensure!(
            c.is_finite() && c > 0.0,
            "--capacity-cores {c}: give the number of cores VMs may use here, greater than 0"
        );
    }
    config.capacity_cores = a.capacity_cores;
    config.snapshot_limit_mib = a.snapshot_limit_mib;
    if let Some(s) = a.fence_after {
        anyhow::ensure!(
            s.is_finite() && s > 0.0,
            "--fence-after {s}: give the seconds without the controller after which VMs are paused, greater than 0"
        );
    }
    config.fence_after = a.fence_after.map(std::time::Duration::from_secs_f64);
    config.libvirt_uri = a.libvirt_uri;
    config.libvirt_paths = tern_engine::libvirt::LibvirtPaths {
        socket_dir: a.libvirt_socket_dir,
        run_dir: a.libvirt_run_dir,
    };
    if std::env::var("TERN_INSECURE_PLAINTEXT").is_ok_and(|v| v == "1") {
        config.insecure_plaintext = true;
    } else {
        config.tls_dir = Some(a.tls_dir);
    }
    if let Ok(v) = std::env::var("TERN_PROTOCOL_MAX") {
        // for tests of mixed-version clusters
        config.max_protocol = v
            .parse()
            .map_err(|_| anyhow::anyhow!("TERN_PROTOCOL_MAX={v:?} is not a version number"))?;
    }
    let rt = tokio::runtime::Runtime::new()?;
    rt.block_on(async {
        let shutdown = async {
            let mut term =
                tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
                    .expect("SIGTERM handler");
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = term.recv() => {}
            }
        };
        tern_agent::run(config, shutdown).await
    })?;
    Ok(())
}

fn vm(c: Client, cmd: VmCmd) -> Result<()> {
    match cmd {
        VmCmd::Start { spec } => {
            let text = std::fs::read_to_string(&spec)
                .with_context(|| format!("cannot read VM spec {}", spec.display()))?;
            let v = c.call("POST", "/v1/vms", Some(&json!({ "spec_toml": text })))?;
            println!(
                "started {} (pid {}, console {})",
                v["name"].as_str().unwrap_or("?"),
                v["pid"],
                v["console_log"].as_str().unwrap_or("?")
            );
        }
        VmCmd::List { json } => {
            let v = c.call("GET", "/v1/vms", None)?;
            if json {
                println!("{}", serde_json::to_string_pretty(&v)?);
            } else {
                println!(
                    "{:<20} {:<12} {:>8} {:>5} {:<5} {:>8}  NICS",
                    "NAME", "STATE", "MEM(MiB)", "VCPU", "ACCEL", "PID"
                );
                for vm in v.as_array().into_iter().flatten() {
                    // serde_json's Display ignores widths: format numbers as strings
                    let num = |k: &str| {
                        vm[k]
                            .as_u64()
                            .map(|n| n.to_string())
                            .unwrap_or_else(|| "-".into())
                    };
                    // each card: NETWORK/MAC@TAP
                    let nics: Vec<String> = vm["nics"]
                        .as_array()
                        .into_iter()
                        .flatten()
                        .map(|n| {
                            format!(
                                "{}/{}@{}",
                                n["network"].as_str().unwrap_or("?"),
                                n["mac"].as_str().unwrap_or("?"),
                                n["tap"].as_str().unwrap_or("-")
                            )
                        })
                        .collect();
                    println!(
                        "{:<20} {:<12} {:>8} {:>5} {:<5} {:>8}  {}",
                        vm["name"].as_str().unwrap_or("?"),
                        vm["state"].as_str().unwrap_or("?"),
                        num("memory_mib"),
                        num("vcpus"),
                        vm["accel"].as_str().unwrap_or("?"),
                        num("pid"),
                        if nics.is_empty() {
                            "-".into()
                        } else {
                            nics.join(" ")
                        }
                    );
                }
            }
        }
        VmCmd::Stop { name } => {
            c.call("DELETE", &format!("/v1/vms/{name}"), None)?;
            println!("stopped {name}");
        }
        VmCmd::Upgrade { name, qemu, json } => {
            let qemu = match qemu {
                Some(q) => Some(
                    std::fs::canonicalize(&q)
                        .with_context(|| format!("QEMU binary {} not found", q.display()))?,
                ),
                None => None,
            };
            let req = tern_api::vm::UpgradeRequest { qemu };
            let v = c.call(
                "POST",
                &format!("/v1/vms/{name}/upgrade"),
                Some(&serde_json::to_value(&req)?),
            )?;
            print_handover("upgraded", &v, json)?;
        }
        VmCmd::Move {
            name,
            to_agent,
            json,
        } => {
            let req = tern_api::vm::MoveLocalRequest { agent: to_agent };
            let v = c.call(
                "POST",
                &format!("/v1/vms/{name}/move"),
                Some(&serde_json::to_value(&req)?),
            )?;
            print_handover("moved", &v, json)?;
        }
        VmCmd::Qmp {
            name,
            command,
            arguments,
        } => {
            let arguments: Option<Value> = match arguments {
                Some(a) => {
                    Some(serde_json::from_str(&a).context("QMP arguments must be a JSON object")?)
                }
                None => None,
            };
            let v = c.call(
                "POST",
                &format!("/v1/vms/{name}/qmp"),
                Some(&json!({ "execute": command, "arguments": arguments })),
            )?;
            println!("{}", serde_json::to_string_pretty(&v)?);
        }
    }
    Ok(())
}

/// A same-host hand-over's report (`tern vm upgrade`, `tern vm move`).
fn print_handover(what: &str, v: &Value, json: bool) -> Result<()> {
    let r: tern_api::vm::UpgradeReport = serde_json::from_value(v.clone())
        .context("the agent's report is not what this tern expects")?;
    if json {
        println!("{}", serde_json::to_string_pretty(v)?);
        return Ok(());
    }
    println!(
        "{what} {}: QEMU {} -> {} ({}, pid {})",
        r.vm,
        r.old_qemu_version,
        r.new_qemu_version,
        r.new_binary.display(),
        r.new_pid
            .map(|p| p.to_string())
            .unwrap_or_else(|| "?".into())
    );
    match r.downtime_ms {
        Some(d) => println!(
            "  guest paused {d} ms (QEMU's own measure {} ms), {} ms in all",
            r.qemu_downtime_ms, r.total_ms
        ),
        None => println!(
            "  the VM was paused and stays paused; {} ms in all",
            r.total_ms
        ),
    }
    println!(
        "  device state carried: {} bytes; RAM copied: {} pages, {} bytes (memory handed over)",
        r.stream_bytes, r.ram_pages_copied, r.ram_bytes_copied
    );
    Ok(())
}

/// The absolute path of an image for the agent (which has its own working directory).
fn image_path(p: &Path) -> Result<PathBuf> {
    match std::fs::canonicalize(p) {
        Ok(p) => Ok(p),
        // Not here, or not readable by us: the agent says what is wrong with it.
        Err(_) => std::path::absolute(p)
            .with_context(|| format!("cannot make the path {} absolute", p.display())),
    }
}

fn image(c: Client, cmd: ImageCmd) -> Result<()> {
    match cmd {
        ImageCmd::Import { file, format, json } => {
            let path = image_path(&file)?;
            let r = c.import_image(&path, format.as_deref())?;
            if json {
                println!("{}", serde_json::to_string_pretty(&r)?);
            } else {
                println!("indexed {}", import_line(&r));
            }
        }
        ImageCmd::Index { json } => {
            let s = c.index_images()?;
            if json {
                println!("{}", serde_json::to_string_pretty(&s)?);
            } else {
                print_refresh(&s);
            }
            if !s.failed.is_empty() {
                bail!(
                    "{} image(s) could not be read again: they stay listed and are tried again by the next `tern image index` (fix the file, or `tern image remove` it)",
                    s.failed.len()
                );
            }
        }
        ImageCmd::List { json } => {
            let list = c.images()?;
            if json {
                println!("{}", serde_json::to_string_pretty(&list)?);
            } else {
                print_images(&list);
            }
        }
        ImageCmd::Remove { file } => {
            let path = image_path(&file)?;
            c.remove_image(&path)?;
            println!("removed {} from the index (the file stays)", path.display());
        }
    }
    Ok(())
}

/// `PATH: FORMAT, SIZE, data blocks, new chunks, rate, time` of one indexed image.
fn import_line(r: &ImportReport) -> String {
    let secs = r.elapsed_ms as f64 / 1000.0;
    format!(
        "{}: {}, {:.1} MiB, {} data blocks, {} new chunks, read {:.1} MiB at {:.1} MiB/s in {:.2} s",
        r.path.display(),
        r.format,
        mib(r.virtual_size),
        r.data_blocks,
        r.new_chunks,
        mib(r.bytes_read),
        mib(r.bytes_read) / secs.max(0.001),
        secs
    )
}

fn print_refresh(s: &RefreshSummary) {
    for r in &s.reindexed {
        println!("reindexed {}", import_line(r));
    }
    for p in &s.unchanged {
        println!("unchanged {}", p.display());
    }
    for p in &s.dropped {
        println!("dropped   {} (the file is gone)", p.display());
    }
    for (p, why) in &s.failed {
        println!("failed    {}: {why}", p.display());
    }
    println!(
        "{} reindexed, {} unchanged, {} dropped, {} failed",
        s.reindexed.len(),
        s.unchanged.len(),
        s.dropped.len(),
        s.failed.len()
    );
}

fn print_images(list: &[ImageInfo]) {
    if list.is_empty() {
        println!("no images indexed (`tern image import FILE` adds one)");
        return;
    }
    println!(
        "{:<6} {:>10} {:>11} {:>11}  PATH",
        "FORMAT", "SIZE(MiB)", "DATA-BLOCKS", "ZERO-BLOCKS"
    );
    for i in list {
        let mut line = format!(
            "{:<6} {:>10.1} {:>11} {:>11}  {}",
            i.format,
            mib(i.virtual_size),
            i.data_blocks,
            i.zero_blocks,
            i.path.display()
        );
        for b in &i.backing_files {
            line.push_str(&format!("  (backing {})", b.display()));
        }
        if i.needs_reindex {
            // its blocks are out of the index until it is read again
            line.push_str("  [stale: `tern image index` reads it again]");
        }
        println!("{line}");
    }
}

fn migrate(c: Client, m: MigrateArgs) -> Result<()> {
    if m.cancel {
        let v = c.call(
            "POST",
            &format!("/v1/vms/{}/migration/cancel", m.name),
            None,
        )?;
        eprintln!(
            "cancel requested for migration {} of {}",
            v["id"].as_str().unwrap_or("?"),
            m.name
        );
        return Ok(());
    }
    let to = m.to.expect("clap requires --to");
    let req = MigrateRequest {
        to,
        downtime_ms: m.downtime_ms,
        max_bandwidth_mibps: m.max_bandwidth_mibps,
        compression: Some(m.compression),
        dedup: if m.no_dedup {
            Some(false)
        } else {
            match m.data_path {
                DataPath::Auto => None,
                DataPath::Lean => Some(false),
                DataPath::Dedup => Some(true),
            }
        },
        streams: m.streams,
        // post-copy never slows the guest
        max_throttle: Some(if m.postcopy { 0 } else { m.max_throttle }),
        max_downtime_ms: m.max_downtime_ms,
        converge_timeout_s: Some(m.converge_timeout_s),
        objective: m.objective,
        deadline_s: m.deadline,
        outage_wait_s: m.outage_wait,
        postcopy: m.postcopy,
        postcopy_fallback: m.postcopy_fallback,
    };
    if let Err(why) = req.validate() {
        bail!("{why}");
    }
    if m.plan {
        let v = c.call(
            "POST",
            &format!("/v1/vms/{}/plan", m.name),
            Some(&serde_json::to_value(&req)?),
        )?;
        if m.json {
            println!("{}", serde_json::to_string_pretty(&v)?);
        } else {
            print_plan(&serde_json::from_value(v)?);
        }
        return Ok(());
    }
    let id = if m.libvirt {
        let req = tern_api::LibvirtMigrateRequest {
            libvirt_to: m.libvirt_to.clone().expect("clap requires --libvirt-to"),
            virsh_flags: m.virsh_flags.clone(),
            copy_storage: m.copy_storage,
            migrate: req,
        };
        if let Err(why) = req.validate() {
            bail!("{why}");
        }
        c.migrate_libvirt(&m.name, &req)?.id
    } else {
        if req.postcopy {
            eprintln!("warning: {}", tern_api::migration::POSTCOPY_RISK);
        } else if req.postcopy_fallback {
            eprintln!(
                "warning: if pre-copy cannot converge, tern switches to {}",
                tern_api::migration::POSTCOPY_RISK
            );
        }
        c.migrate(&m.name, &req)?.id
    };

    // Ctrl-C cancels the migration (the source keeps running) instead of killing the CLI.
    let interrupted = Arc::new(AtomicBool::new(false));
    {
        let flag = interrupted.clone();
        std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build();
            if let Ok(rt) = rt {
                rt.block_on(async {
                    if tokio::signal::ctrl_c().await.is_ok() {
                        flag.store(true, Ordering::SeqCst);
                    }
                });
            }
        });
    }
    let tty = std::io::stderr().is_terminal();
    let mut cancel_sent = false;
    let mut last_line = std::time::Instant::now() - Duration::from_secs(10);
    let status: MigrationStatus = loop {
        if interrupted.load(Ordering::SeqCst) && !cancel_sent {
            cancel_sent = true;
            eprintln!("\ninterrupted: cancelling migration {id} (the source VM keeps running)");
            let _ = c.call("POST", &format!("/v1/migrations/{id}/cancel"), None);
        }
        let s = c.migration(&id)?;
        if s.finished {
            break s;
        }
        if tty || last_line.elapsed() >= Duration::from_secs(2) {
            let line = progress_line(&s);
            if tty {
                eprint!("\r\x1b[2K{line}");
            } else {
                eprintln!("{line}");
            }
            let _ = std::io::stderr().flush();
            last_line = std::time::Instant::now();
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    if tty {
        eprintln!();
    }
    match (&status.report, &status.error) {
        (Some(r), _) => {
            if m.json {
                println!("{}", serde_json::to_string_pretty(r)?);
            } else {
                print_report(r);
            }
            Ok(())
        }
        (None, Some(e)) => {
            if m.json {
                println!(
                    "{}",
                    serde_json::to_string_pretty(
                        &json!({ "outcome": "failed", "migration_id": status.id, "error": e })
                    )?
                );
            }
            bail!(
                "migration {} of {} failed [{}]: {}\n  the VM is {}",
                status.id,
                status.vm,
                e.code,
                e.message,
                e.vm_state
            )
        }
        (None, None) => bail!("migration {} ended without a report", status.id),
    }
}

fn mib(b: u64) -> f64 {
    b as f64 / (1u64 << 20) as f64
}

fn progress_line(s: &MigrationStatus) -> String {
    let p = &s.progress;
    let secs = (p.elapsed_ms as f64 / 1000.0).max(0.001);
    if s.phase == tern_api::Phase::WaitingForLink {
        let lost = s
            .timeline
            .spans
            .last()
            .map_or(0.0, |sp| sp.start_ms / 1000.0);
        return format!(
            "{} {} -> {} [waiting for the link, {:.0}s] {:.1}% {:.1}s  the VM runs here; tern goes on when the destination answers  wire {:.1} MiB",
            s.vm,
            s.id,
            s.peer,
            (secs - lost).max(0.0),
            p.percent,
            secs,
            mib(p.bytes_on_wire),
        );
    }
    let mut line = format!(
        "{} {} -> {} [{}] {:.1}%{} {:.1}s  from QEMU {:.1} MiB  wire {:.1} MiB  {:.0} Mbit/s  pages {} ({} zero)",
        s.vm,
        s.id,
        s.peer,
        if p.qemu_status.is_empty() { s.phase.as_str() } else { p.qemu_status.as_str() },
        p.percent,
        p.eta_ms.map(|ms| format!(" ETA {:.0}s", ms as f64 / 1000.0)).unwrap_or_default(),
        secs,
        mib(p.bytes_from_qemu),
        mib(p.bytes_on_wire),
        p.bytes_from_qemu as f64 * 8.0 / 1e6 / secs,
        p.pages.total,
        p.pages.zero,
    );
    if let Some(r) = p.ram_remaining {
        line.push_str(&format!("  remaining {:.1} MiB", mib(r)));
    }
    if let Some(d) = p.dirty_pages_rate {
        line.push_str(&format!("  dirty {d} pages/s"));
    }
    if p.throttle_pct > 0 {
        line.push_str(&format!("  guest throttled {}%", p.throttle_pct));
    }
    if let Some(r) = p.rate_limit_mibps {
        line.push_str(&format!("  paced {r:.1} MiB/s"));
    }
    if let (Some(rtt), Some(q)) = (p.rtt_ms, p.queue_delay_ms) {
        line.push_str(&format!("  rtt {rtt:.0} ms (queue {q:.0})"));
    }
    if let Some(d) = &p.disk {
        line.push_str(&format!(
            "  disk: read {:.0}/{:.0} MiB, {:.1} MiB held there, sent {:.1} MiB, round {}",
            mib(d.scanned_bytes),
            mib(d.virtual_bytes),
            mib(d.local_bytes),
            mib(d.sent_bytes),
            d.rounds
        ));
    }
    line
}

fn print_plan(p: &tern_api::MigrationPlan) {
    let i = &p.inputs;
    println!(
        "plan: {} to {} ({}, protocol v{}); nothing was moved",
        p.vm, p.destination, p.destination_agent, p.protocol_version
    );
    println!("  inputs");
    println!("    RAM             {:.0} MiB", mib(i.ram_bytes));
    if let (Some(z), Some(r)) = (i.zero_fraction, i.compressed_ratio) {
        println!(
            "    RAM sample      {:.0}% zero, the rest compresses to {:.0}%",
            z * 100.0,
            r * 100.0
        );
    }
    if let Some(h) = i.held_fraction {
        println!(
            "    held there      {:.0}% of the sample that is not zero (goes by reference)",
            h * 100.0
        );
    }
    if i.disk_bytes > 0 {
        match i.disk_held_fraction {
            Some(h) => println!(
                "    disks           {:.1} MiB allocated, {:.0}% of a sample held there",
                mib(i.disk_bytes),
                h * 100.0
            ),
            None => println!("    disks           {:.1} MiB allocated", mib(i.disk_bytes)),
        }
    }
    println!(
        "    dirty rate      {:.1} MiB/s (QEMU page sampling, {} s)",
        i.dirty_mibps, i.dirty_sample_s
    );
    if let Some(r) = i.rewritten_ratio {
        println!(
            "    rewritten pages {:.0}% of a page on the wire (against their previous version)",
            r * 100.0
        );
    }
    println!("    round trip      {:.1} ms", i.rtt_ms);
    if let Some(p) = i.probe_mibps {
        println!(
            "    link probe      {p:.1} MiB/s on the wire ({:.1} MiB of filler over the agents' TLS connection)",
            mib(i.probe_bytes)
        );
    }
    match i.link_mibps {
        Some(r) => println!(
            "    link            {r:.1} MiB/s of memory, {:.2} wire bytes per byte ({})",
            i.wire_ratio, i.link_from
        ),
        None => println!("    link            {}", i.link_from),
    }
    if let (Some(cores), Some(free)) = (i.cores, i.free_cores) {
        let guest = i
            .guest_cores
            .map_or(String::new(), |g| format!(", the guest's QEMU {g:.1}"));
        let cost = i
            .core_s_per_gib
            .map_or("the data path's cost not learnt yet".to_string(), |c| {
                format!("the data path {c:.1} CPU s per GiB here before")
            });
        println!("    host CPU        {free:.1} of {cores} cores free{guest}; {cost}");
    }
    println!(
        "    allowed         throttle up to {}%, downtime limit {} ms up to {} ms",
        i.max_throttle, i.downtime_limit_ms, i.max_downtime_ms
    );
    match &p.prediction {
        Some(pr) => {
            println!("  prediction");
            println!("    total time      {:.1} s", pr.total_s);
            println!("    downtime        {:.0} ms", pr.downtime_ms);
            println!(
                "    on the wire     {:.1} MiB memory, {:.1} MiB disks",
                mib(pr.memory_wire_bytes),
                mib(pr.disk_wire_bytes)
            );
            println!("    rounds          {}", pr.rounds);
            println!("    convergence     {}", pr.summary);
        }
        None => println!("  prediction      none (the link's rate is not known)"),
    }
    for n in &p.notes {
        println!("  note: {n}");
    }
}

fn print_report(r: &MigrationReport) {
    println!("migration {} of {}: {}", r.migration_id, r.vm, r.outcome);
    println!("  {} -> {}", r.source, r.destination);
    println!("  total time      {} ms", r.total_time_ms);
    println!(
        "  downtime        {} ms end to end (QEMU says {} ms)",
        r.downtime_ms,
        r.qemu_downtime_ms
            .map(|d| d.to_string())
            .unwrap_or_else(|| "?".into())
    );
    if r.postcopy {
        println!(
            "  post-copy       {} ms (the VM ran at the destination from its start)",
            r.postcopy_ms.unwrap_or(0)
        );
        if let Some(f) = &r.postcopy_faults {
            let blocked = match (f.all_vcpus_blocked_ms, f.max_vcpu_blocked_ms) {
                (Some(all), Some(one)) => format!(
                    "; the guest waited on them {one} ms (the most of one vCPU), all its vCPUs at once {all} ms"
                ),
                _ => String::new(),
            };
            let local = match f.served_locally {
                0 => String::new(),
                n => format!(" ({n} of them from the destination's page store)"),
            };
            println!(
                "  page faults     {} requests for {} pages fetched from the source{local}{blocked}",
                f.requests, f.pages
            );
        }
    }
    println!("  RAM             {:.1} MiB", mib(r.ram_bytes));
    println!("  from QEMU       {:.1} MiB", mib(r.bytes_from_qemu));
    println!("  on the wire     {:.1} MiB", mib(r.bytes_on_wire));
    println!(
        "  pages           {} ({} zero, {} raw, {} by reference, {} as deltas)",
        r.pages.total, r.pages.zero, r.pages.raw, r.pages.refs, r.pages.deltas
    );
    let e = &r.encoding;
    if e.frames_raw_bytes > 0 {
        println!(
            "  encoding        data path {} ({} changes, {} pages lean), compression {} ({} changes), frames {:.1} -> {:.1} MiB, {} pages held at the destination, {} asked for again, {} data streams",
            e.data_path,
            e.data_path_switches,
            e.lean_pages,
            e.codec,
            e.codec_switches,
            mib(e.frames_raw_bytes),
            mib(e.frames_wire_bytes),
            e.destination_held_pages,
            e.wants,
            e.data_streams
        );
    }
    if let Some(d) = &r.disk {
        println!(
            "  disks           {} ({:.1} MiB virtual, {:.1} MiB data): {:.1} MiB filled locally, {:.1} MiB sent, {:.1} MiB on the wire, {} rounds, copy {} ms",
            d.disks,
            mib(d.virtual_bytes),
            mib(d.data_bytes),
            mib(d.local_bytes),
            mib(d.sent_bytes),
            mib(d.wire_bytes),
            d.rounds,
            d.copy_ms
        );
        println!(
            "  disk last round {} bytes in {:.1} ms (guest paused); memory on the wire {:.1} MiB",
            d.last_round_bytes,
            d.last_round_ms,
            mib(r.bytes_on_wire.saturating_sub(d.wire_bytes))
        );
    }
    println!("  throughput      {:.0} Mbit/s", r.throughput_mbps);
    if let Some(c) = &r.host_cpu {
        let per_gib = c.core_s_per_gib.map_or(String::new(), |g| {
            format!("; {g:.1} CPU s per GiB of stream added")
        });
        println!(
            "  host CPU        {:.1} of {} cores busy before, {:.1} during the transfer{}{}",
            c.busy_before,
            c.cores,
            c.busy_during,
            c.qemu_during
                .map_or(String::new(), |q| format!(" (the guest's QEMU {q:.1})")),
            per_gib
        );
    }
    if let Some(p) = &r.prediction {
        println!(
            "  predicted       {:.1} s, downtime {:.0} ms, {:.1} MiB on the wire (from what was known at the start: {})",
            p.total_s,
            p.downtime_ms,
            mib(p.memory_wire_bytes + p.disk_wire_bytes),
            p.summary
        );
    }
    let cv = &r.convergence;
    println!(
        "  convergence     {} dirty syncs, guest throttled up to {}%, downtime limit {} ms, last dirty rate {:.1} MiB/s against {:.1} MiB/s crossing",
        cv.dirty_syncs, cv.throttle_max_pct, cv.downtime_limit_ms, cv.dirty_mibps, cv.transfer_mibps
    );
    for step in &cv.steps {
        println!("                  {step}");
    }
    let pc = &r.pacing;
    let mut pacing = format!(
        "  bandwidth       {}: delivered {:.1} MiB/s mean, {:.1} at most; path {:.0} ms",
        pc.objective, pc.delivered_mean_mibps, pc.delivered_max_mibps, pc.base_rtt_ms
    );
    if let (Some(lo), Some(hi)) = (pc.rate_min_mibps, pc.rate_max_mibps) {
        pacing.push_str(&format!("; paced {lo:.1} to {hi:.1} MiB/s"));
    }
    if let (Some(d), Some(met)) = (pc.deadline_s, pc.deadline_met) {
        pacing.push_str(&format!(
            "; deadline {d} s {}",
            if met { "met" } else { "MISSED" }
        ));
    }
    if pc.yields > 0 {
        pacing.push_str(&format!(
            "; backed off {} times ({:.1} s) for other traffic",
            pc.yields,
            pc.yielded_ms as f64 / 1e3
        ));
    }
    println!("{pacing}");
    for step in &pc.steps {
        println!("                  {step}");
    }
    for o in &r.outages {
        println!(
            "  link lost       at {:.1} s, back after {:.1} s ({:.1} MiB on the wire before; then went on): {}",
            o.lost_at_ms as f64 / 1e3,
            o.waited_ms as f64 / 1e3,
            mib(o.wire_bytes_before),
            o.cause
        );
    }
    println!(
        "  memory digest   {} ({})",
        if r.digest_ok { "equal" } else { "DIFFERENT" },
        &r.digest[..16.min(r.digest.len())]
    );
    println!(
        "  QEMU            {} -> {}",
        r.qemu_version, r.destination_qemu_version
    );
}

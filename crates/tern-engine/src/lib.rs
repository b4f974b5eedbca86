//! tern's migration engine: moves one running VM from the QEMU on this host to the QEMU on
//! another through tern's own data path, in either direction, and says what happened.
//!
//! ```text
//!  source (source::run)                            destination (dest::serve_peer)
//!  connect ─ prepare ─ disk copy ─ transfer ─ verify ─ switchover     (Phase, one each)
//!  QEMU ──fd──> parse ─ encode pages ─ frames ══TLS══> frames ─ rebuild ─ QEMU
//!                 (pages, codec)    (transport)        (pages, digest)
//! ```
//!
//! Same-host moves (`local`: a VM continues in a new QEMU, its memory handed over, not
//! copied) use the same switchover record and recovery rules.
//!
//! Owns: the phases on each side (`source`, `dest`), how pages travel (`pages`, `codec`,
//! `digest`), disks inside a migration (`disk`), the connections between agents
//! (`transport`), the migrations an agent knows (`registry`, `handle`), the switchover's
//! safety (the source is authoritative until the commit; after it only the destination's
//! word counts), and the faults tests inject (`fault`, a cargo feature).
//!
//! Must not: keep the VM registry, serve the API, decide policy or hold certificates of
//! its own. Those are the daemon's (`tern-agent`), which the engine reaches only through
//! [`Host`] and the values it is given ([`Engine`], [`source::SourceVm`]).
// One exception, in `transport::probe`: reading the kernel's TCP_INFO (no safe wrapper).
#![deny(unsafe_code)]

pub mod codec;
pub mod converge;
pub mod datapath;
pub mod dest;
pub mod digest;
pub mod disk;
pub mod error;
pub mod events;
pub mod fault;
pub mod handle;
pub mod hostcpu;
pub mod hostmem;
pub mod libvirt;
pub mod local;
pub mod overlay;
pub mod pace;
pub mod pages;
pub mod registry;
pub mod secret;
pub mod source;
pub mod transport;
pub mod tunnel;

use std::future::Future;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use tern_qemu::launch::{LaunchOptions, QemuProcess};
use tern_qemu::spec::VmSpec;

pub use error::error_chain;
pub use fault::Fault;
pub use handle::MigrationHandle;

/// A boxed future, for [`Host`]'s async methods (the trait is used as a trait object).
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// How this host's engine behaves; the daemon fills it from its own configuration.
#[derive(Debug, Clone)]
pub struct EngineConfig {
    /// This host's name, told to peers and shown in reports.
    pub name: String,
    /// A migration whose peer makes no progress for this long fails (a link that died
    /// silently never resets a TCP connection by itself).
    pub stall_timeout: Duration,
    /// Newest protocol version offered and accepted.
    pub max_protocol: u16,
    /// A fault injected for a test (`fault-injection` builds only).
    pub fault: Option<Fault>,
    /// Where an incoming VM's kernel and initrd may come from (canonical directories).
    pub boot_dirs: Vec<PathBuf>,
    /// Where an incoming VM's shared disks may be (canonical directories on storage
    /// every host sees at the same path); none: no shared disk is taken.
    pub shared_dirs: Vec<PathBuf>,
    /// The machine types this host's QEMU knows.
    pub machine_types: Vec<String>,
    /// This host's memory, MiB (0: unknown): no incoming VM may be larger.
    pub host_memory_mib: u64,
    /// Where libvirt domains' carrier sockets and pid files are.
    pub libvirt: libvirt::LibvirtPaths,
}

/// What one host's migrations share: made by the daemon at start.
pub struct Engine {
    pub config: EngineConfig,
    /// Pages of VMs that live or lived here, and pages received, by content hash.
    pub store: pages::SharedStore,
    pub hasher: tern_store::ContentHasher,
    /// The chunk index of this host's images: what an incoming disk is rebuilt from.
    pub chunks: disk::SharedIndex,
    /// How peer connections are secured.
    pub security: transport::tls::PeerSecurity,
    /// The migrations this host knows.
    pub registry: Arc<registry::Registry>,
}

impl Engine {
    /// The Hello that opens each connection to a peer agent: the versions this agent speaks
    /// (capped by its configuration), its name.
    pub(crate) fn hello(&self) -> tern_proto::Message {
        tern_proto::Message::Hello {
            min_version: tern_proto::MIN_PROTOCOL_VERSION,
            max_version: self.config.max_protocol,
            agent: self.config.name.clone(),
        }
    }
}

/// The policy on a destination agent: whether `spec` may go to the agent that called itself
/// `agent` and holds certificate `identity` (the cluster CA's labels).
pub(crate) fn authorize_there(
    host: &dyn Host,
    spec: &VmSpec,
    agent: &str,
    identity: &transport::tls::PeerIdentity,
) -> Result<(), String> {
    let there = match identity.names.first() {
        Some(n) => format!("{agent} ({n})"),
        None => agent.to_string(),
    };
    host.authorize_there(spec, &there, &identity.labels)
}

/// Why the daemon could not start an incoming VM's QEMU.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct HostLaunchError(pub String);

/// What the engine needs from the daemon that runs it, for incoming VMs: its policy, its
/// VM names, run directories and QEMU launches, and taking a VM over once it switched in.
pub trait Host: Send + Sync {
    /// Whether the daemon's policy lets `spec` run on this host (its own labels).
    fn authorize_here(&self, spec: &VmSpec) -> Result<(), String>;
    /// Whether the policy lets `spec` go to `host`, whose certificate carries `labels`.
    fn authorize_there(&self, spec: &VmSpec, host: &str, labels: &[String]) -> Result<(), String>;
    /// Whether an incoming `spec`'s network cards may join their networks here: a peer
    /// names them, so only networks this host has (or serves by configuration) are
    /// taken, never a bridge made for a peer's name.
    fn vet_networks<'a>(&'a self, spec: &'a VmSpec) -> BoxFuture<'a, Result<(), String>>;
    /// The VM here one of whose disks is the file `id` (device, inode), if any (a shared
    /// disk named by a peer must not be a running VM's).
    fn disk_user(&self, id: (u64, u64)) -> Option<String>;
    /// Holds a VM name for an incoming VM; false if the name is taken.
    fn reserve_name(&self, name: &str) -> bool;
    fn release_name(&self, name: &str);
    /// A fresh run directory for a VM instance (not created yet).
    fn new_run_dir(&self, name: &str) -> PathBuf;
    /// Starts QEMU for `spec` (with its swtpm when it has a TPM), as the daemon starts
    /// every QEMU (its user, its sandbox).
    fn launch<'a>(
        &'a self,
        spec: &'a VmSpec,
        opts: &'a LaunchOptions,
    ) -> BoxFuture<'a, Result<QemuProcess, HostLaunchError>>;
    /// `spec`'s VM runs here from now on: an incoming VM whose switchover is recorded
    /// (`cont` comes next), or a source VM that stays here after a failed migration
    /// (running again, or paused as it was). The
    /// daemon tells whoever forwards to its cards ([`overlay`]).
    fn runs_here(&self, spec: &VmSpec);
    /// `spec`'s VM stopped here for its switchover to the host at `to`: frames for its
    /// cards that still reach this host go on to `to` for a while ([`overlay`]), and stop
    /// when the VM runs here again ([`Host::runs_here`]).
    fn leaves(&self, spec: &VmSpec, to: std::net::IpAddr);
    /// Whether a VM about to be resumed here must stay paused (`cont` not sent): an
    /// incoming VM whose switchover is recorded, or a source VM whose migration failed.
    /// True when the daemon fenced itself meanwhile (its cluster controller went silent
    /// and may run the VM elsewhere); it then counts the VM among those it keeps paused.
    fn holds_paused(&self, spec: &VmSpec) -> bool {
        let _ = spec;
        false
    }
    /// An incoming VM switched over: the daemon runs it from now on.
    fn adopt(&self, spec: VmSpec, process: QemuProcess);
    /// VM `name`, adopted, still receives memory (post-copy): while `on`, the daemon sends
    /// its QEMU no in-band QMP of its own (status, load). A vCPU that waits on a missing
    /// page can hold QEMU's big lock; queued commands would then fill the monitor's queue
    /// and keep out the out-of-band `migrate-recover` that post-copy recovery needs.
    fn arriving(&self, name: &str, on: bool) {
        let _ = (name, on);
    }
    /// Removes a VM's run directory once its QEMU is gone (its TPM state first).
    fn remove_run_dir<'a>(&'a self, dir: &'a Path) -> BoxFuture<'a, ()>;
    /// The agent at `from` (which called itself `peer`) told where its VMs' network cards
    /// live ([`overlay`]): the daemon takes what it may into its forwarding and answers
    /// where its own VMs' cards live; an error (no overlay here, not a peer) refuses the
    /// exchange.
    fn located<'a>(
        &'a self,
        peer: &'a str,
        from: std::net::SocketAddr,
        entries: Vec<tern_proto::Location>,
    ) -> BoxFuture<'a, Result<Vec<tern_proto::Location>, String>>;
    /// The same peer, after the locations (v8), told its cards' IPv4 addresses: the daemon
    /// takes what it may (for ARP suppression) and answers with its own cards' addresses.
    fn addressed<'a>(
        &'a self,
        peer: &'a str,
        from: std::net::SocketAddr,
        entries: Vec<tern_proto::CardAddress>,
    ) -> BoxFuture<'a, Result<Vec<tern_proto::CardAddress>, String>>;
}

/// `tokio::spawn` keeping the caller's span: a task of a migration logs with its id.
pub(crate) fn spawn<F>(fut: F) -> tokio::task::JoinHandle<F::Output>
where
    F: Future + Send + 'static,
    F::Output: Send + 'static,
{
    use tracing::Instrument;
    tokio::spawn(fut.in_current_span())
}

/// QEMU's `announce-self` as tern sends it once a VM runs somewhere new (QEMU's own
/// defaults): five rounds, at 0, 50, 150, 250 and 350 ms (a RARP from each network card; a
/// guest that can also sends its own gratuitous ARP).
pub fn announce_args() -> serde_json::Value {
    serde_json::json!({ "initial": 50, "max": 550, "rounds": 5, "step": 100 })
}

/// Where a VM's vTPM migration key lives: its run directory (root only), random per VM
/// (made when its swtpm first starts, received from the source for an incoming VM).
pub fn tpm_migration_key_path(run_dir: &Path) -> PathBuf {
    run_dir.join("tpm-migration.key")
}

/// A new migration id: short, unique enough per agent pair, safe in file names.
pub fn new_migration_id() -> String {
    handle::new_migration_id()
}

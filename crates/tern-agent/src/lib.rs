//! `tern agent`: the host daemon.
//!
//! One agent per host. It launches and supervises QEMU VMs ([`vm`]), serves the local
//! control API over HTTP/JSON ([`api`]), accepts peer agents on a TCP listener and runs
//! migrations in both directions ([`migrate`]), samples what the host and its VMs use
//! ([`load`]) and, when asked to, serves part of its API to the cluster controller over
//! mutual TLS ([`control`]), keeps the snapshots VMs leave when they migrate away
//! ([`snapshots`]) and pauses its VMs when the controller goes silent ([`fence`]). The
//! binary (`tern agent`) is a thin
//! wrapper around [`run`]. VMs outlive the agent: a restarted agent re-attaches to them.
//!
//! The peer listener keeps connections still in their TLS handshake
//! ([`MAX_PEER_HANDSHAKES`], [`MAX_PEER_HANDSHAKES_PER_SOURCE`] from one source) and
//! authenticated peers ([`MAX_PEER_CONNECTIONS`]) in budgets of their own, as the control
//! listener does: who opens connections and never finishes a handshake cannot lock real
//! peers out.
#![forbid(unsafe_code)]

mod admission;
pub mod api;
pub mod control;
pub mod fence;
pub mod handover;
pub mod images;
pub mod libvirt;
pub mod links;
pub mod load;
pub mod metrics;
pub mod outgoing;
pub mod overlay;
pub mod pki;
pub mod policy;
pub mod snapshots;
pub mod vm;

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::path::Path;
use std::path::PathBuf;
use std::sync::Arc;

use parking_lot::Mutex;

use tern_qemu::launch::{LaunchOptions, QemuProcess};
use tern_qemu::spec::VmSpec;
use tokio::net::TcpListener;

use tern_engine::dest::{SwitchRecord, INCOMING_MARKER};
use tern_engine::transport::tls;
use tern_engine::{BoxFuture, Engine, EngineConfig, Host, HostLaunchError};
use vm::{StartVmError, StopMode, StopVmError, Vm};

/// Where the control API listens: a unix socket only root can use. There is no TCP API:
/// it could start VMs and reach their QEMU, and a network listener would need its own
/// authentication (reach another host's agent over ssh).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ApiAddr {
    Unix(PathBuf),
}

impl std::str::FromStr for ApiAddr {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        if let Some(p) = s.strip_prefix("unix:") {
            Ok(ApiAddr::Unix(p.into()))
        } else if s.starts_with('/') {
            Ok(ApiAddr::Unix(s.into()))
        } else if s.starts_with("tcp:") {
            Err(format!("API address {s:?}: the control API is a unix socket only (root-only); reach another host's agent over ssh"))
        } else {
            Err(format!("API address {s:?}: use unix:/path"))
        }
    }
}

/// Peer connections authenticated (their TLS handshake done) that an agent keeps open at
/// once; more are closed right after their handshake. Handshakes in progress do not count.
pub const MAX_PEER_CONNECTIONS: usize = 256;
/// Peer connections still in their TLS handshake, from all sources, held at once; more
/// are closed at once.
pub const MAX_PEER_HANDSHAKES: usize = 128;
/// Of [`MAX_PEER_HANDSHAKES`], those from one source (an IPv4 address, an IPv6 /64); more
/// from it are closed at once. More than the control listener's share: one peer agent
/// opens several connections at once (a domain's disks, each tunnelled on a connection of
/// its own; migrations side by side).
pub const MAX_PEER_HANDSHAKES_PER_SOURCE: usize = 16;
/// A peer that has not finished its TLS handshake by then is dropped.
pub const PEER_HANDSHAKE_WITHIN: std::time::Duration = std::time::Duration::from_secs(10);

/// The user QEMU runs as unless configured otherwise (`scripts/setup.sh` creates it).
pub const DEFAULT_QEMU_USER: &str = "tern-qemu";
/// The libvirt an agent asks about domains whose migration it carries.
pub const DEFAULT_LIBVIRT_URI: &str = "qemu:///system";

#[derive(Debug, Clone)]
pub struct AgentConfig {
    /// This host's name, told to peers and shown in reports.
    pub name: String,
    /// Run directories of VMs live under `state_dir/run`.
    pub state_dir: PathBuf,
    pub api: ApiAddr,
    /// TCP address for peer agents.
    pub peer_listen: SocketAddr,
    /// Fault injection for tests (`TERN_FAULT`; test builds only); see
    /// [`tern_engine::Fault`].
    pub fault: Option<tern_engine::Fault>,
    /// A migration whose peer connection makes no progress for this long fails (a link that
    /// died silently never resets a TCP connection by itself).
    pub stall_timeout: std::time::Duration,
    /// The cluster key file (64 hex digits): content hashes are keyed with it, and agents
    /// dedup against each other only when they share it. Created if missing; default
    /// `state_dir/cluster.key`.
    pub cluster_key: Option<PathBuf>,
    /// Page store capacity in memory, MiB.
    pub store_mem_mib: u64,
    /// Page store spill file capacity, MiB (`state_dir/pages.store`; 0 = no file).
    pub store_file_mib: u64,
    /// Newest protocol version offered and accepted (tests of older peers:
    /// `TERN_PROTOCOL_MAX`).
    pub max_protocol: u16,
    /// The agent's TLS credentials (`tern cert issue HOST --out DIR`): `ca.pem`,
    /// `agent.pem`, `agent.key`, and usually `cluster.key` (the default cluster key then).
    pub tls_dir: Option<PathBuf>,
    /// Test-only: peers talk plaintext (benchmarks of what TLS costs). Both agents must
    /// say so; never a default.
    pub insecure_plaintext: bool,
    /// Which VMs may go to which hosts ([`policy`]); the built-in policy if unset.
    pub policy: Option<PathBuf>,
    /// Where an incoming VM's kernel and initrd may come from: a peer names files, and
    /// the destination launches only files under one of these directories (default
    /// `STATE_DIR/boot`).
    pub boot_dirs: Vec<PathBuf>,
    /// Where an incoming VM's shared disks (`shared = true`) may be: directories on
    /// storage every host mounts at the same path (`--shared-dir`). None: an incoming VM
    /// with a shared disk is refused.
    pub shared_dirs: Vec<PathBuf>,
    /// Incoming migrations this agent runs at once (each starts a QEMU); more are refused
    /// with `resource-exhausted`.
    pub max_incoming: usize,
    /// The unprivileged user QEMU runs as (after opening its start-up files as root);
    /// None runs QEMU as root. Every QEMU runs with its seccomp sandbox on.
    pub qemu_user: Option<String>,
    /// Where `GET /metrics` (Prometheus) is served, plain HTTP; None: not at all.
    pub metrics_listen: Option<SocketAddr>,
    /// This host's libvirt (`virsh -c URI`), for domains whose migration tern carries;
    /// default `qemu:///system`.
    pub libvirt_uri: String,
    /// Carrier sockets and libvirt's pid files ([`tern_engine::libvirt`]).
    pub libvirt_paths: tern_engine::libvirt::LibvirtPaths,
    /// Virtual networks this host serves: an incoming VM's card may join one of these
    /// (its bridge made if missing) or a network whose bridge already exists here; any
    /// other is refused (a peer names networks). Local starts may name any network.
    pub networks: Vec<String>,
    /// This host's end of the VXLAN overlay (`--vtep`, `--vxlan-peer`): every network's
    /// bridge here gets a VXLAN port to the peers. None: networks stay on this host.
    pub overlay: Option<tern_net::vxlan::Overlay>,
    /// CPU cores VMs may use on this host, as the load reports it ([`load`],
    /// `--capacity-cores`); None: the cores this process may run on. Finite and > 0.
    pub capacity_cores: Option<f64>,
    /// Where the cluster controller's part of the API is served, HTTP over mutual TLS
    /// to certificates labelled `controller` ([`control`], `--control-listen`); None:
    /// not at all. Needs TLS.
    pub control_listen: Option<SocketAddr>,
    /// What the departure snapshots ([`snapshots`]) may take on disk in all, MiB
    /// (`--snapshot-limit-mib`); a recording passing it stops, and the oldest snapshots go
    /// when a new one is kept. 0: no stream is recorded, no snapshot kept.
    pub snapshot_limit_mib: u64,
    /// Pause every VM when the cluster controller has not been heard from for this long,
    /// once it was ([`fence`], `--fence-after`); None: never.
    pub fence_after: Option<std::time::Duration>,
}

impl AgentConfig {
    /// A config with the defaults for everything but the name, state dir and addresses.
    pub fn new(name: String, state_dir: PathBuf, api: ApiAddr, peer_listen: SocketAddr) -> Self {
        AgentConfig {
            name,
            state_dir,
            api,
            peer_listen,
            fault: None,
            stall_timeout: std::time::Duration::from_secs(20),
            cluster_key: None,
            store_mem_mib: 512,
            store_file_mib: 4096,
            max_protocol: tern_proto::PROTOCOL_VERSION,
            tls_dir: None,
            insecure_plaintext: false,
            policy: None,
            boot_dirs: Vec::new(),
            shared_dirs: Vec::new(),
            max_incoming: 4,
            qemu_user: Some(DEFAULT_QEMU_USER.into()),
            metrics_listen: None,
            libvirt_uri: DEFAULT_LIBVIRT_URI.into(),
            libvirt_paths: Default::default(),
            networks: Vec::new(),
            overlay: None,
            capacity_cores: None,
            control_listen: None,
            snapshot_limit_mib: snapshots::DEFAULT_LIMIT_MIB,
            fence_after: None,
        }
    }
}

/// Shared state of a running agent.
pub struct Agent {
    pub config: AgentConfig,
    /// The migration engine: page store, chunk index, peer security, migrations.
    pub engine: Arc<Engine>,
    pub policy: policy::Policy,
    /// Disks of VMs that left, kept for a return trip (`STATE_DIR/images`).
    pub images_dir: PathBuf,
    vms: Mutex<HashMap<String, Arc<Vm>>>,
    /// Names held by incoming migrations that have not switched over yet.
    reserved: Mutex<HashSet<String>>,
    /// Hand-overs from other agents on this host waiting for their sender's word.
    handovers: Mutex<HashMap<String, handover::HandOverSlot>>,
    /// Where other hosts' VMs' network cards live ([`overlay`]); held while the
    /// forwarding table is written, so claims land in order.
    remote_cards: Mutex<overlay::Remote>,
    /// The addresses of other hosts' VMs' cards (ARP suppression, [`overlay`]).
    remote_ips: Mutex<overlay::RemoteIps>,
    /// The cards that left this host whose frames still go on to their new host.
    departed: Mutex<overlay::Departed>,
    /// Held while forwarding filters are written (they go in the order they were asked).
    forwarding: tokio::sync::Mutex<()>,
    /// Held while ARP answers are written or removed (a card that came to run here is
    /// never pinned behind the VXLAN port again after its entries went).
    addressing: tokio::sync::Mutex<()>,
    /// What the host and its VMs use: the latest sample and what rates are computed
    /// against ([`load`]).
    load_sampler: load::Sampler,
    /// The snapshots VMs left here when they migrated away ([`snapshots`]).
    pub snapshots: snapshots::Snapshots,
    /// Whether this agent paused its VMs for want of the controller ([`fence`]).
    pub fence: fence::Fence,
    /// Itself, for handing to the engine as its [`Host`].
    me: std::sync::Weak<Agent>,
}

/// Why the agent could not run.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error("cannot create state directory {0}")]
    StateDir(PathBuf, #[source] std::io::Error),
    #[error("cannot listen for peers on {0}")]
    PeerListen(SocketAddr, #[source] std::io::Error),
    #[error("cannot serve the control API on {0:?}")]
    Api(ApiAddr, #[source] std::io::Error),
    #[error("cannot serve metrics on {0} (--metrics-listen)")]
    Metrics(SocketAddr, #[source] std::io::Error),
    #[error("cannot serve the cluster controller on {0} (--control-listen)")]
    ControlListen(SocketAddr, #[source] std::io::Error),
    #[error("--control-listen needs TLS: the controller's connections are authenticated by their certificates, and this agent runs without (TERN_INSECURE_PLAINTEXT)")]
    ControlWithoutTls,
    #[error("capacity of {0} cores (--capacity-cores): give a number of cores greater than 0")]
    CapacityCores(f64),
    #[error("cluster key {0}: {1} (it holds 64 hex digits; the same file on every agent of the cluster)")]
    ClusterKey(PathBuf, String),
    #[error("cannot write key file {0}")]
    KeyFile(PathBuf, #[source] pki::PkiError),
    #[error("cannot create the page store")]
    Store(#[from] tern_store::StoreError),
    #[error("no TLS credentials: make a cluster CA with `tern ca init --dir CA`, issue this host's certificate with `tern cert issue HOST --ca CA --out DIR`, then start the agent with --tls-dir DIR")]
    NoTls,
    #[error("cannot load the TLS credentials")]
    Tls(#[from] tls::TlsSetupError),
    #[error("cannot load the authorisation policy")]
    Policy(#[from] policy::PolicyError),
    #[error("cannot open the chunk index")]
    ChunkIndex(#[from] tern_chunks::OpenIndexError),
    #[error("cannot set up the networks this host serves (--network)")]
    Networks(#[source] tern_net::NetError),
    #[error("QEMU's user {0:?} does not exist on this host: create it (useradd --system --no-create-home --shell /usr/sbin/nologin {0}; add it to group kvm for KVM guests), or name another with --qemu-user")]
    NoQemuUser(String),
}

/// The vTPM migration key a VM's swtpm runs with: its own, or (a VM an older agent
/// started) the cluster-wide one it was started with.
pub fn tpm_migration_key_of(state_dir: &Path, run_dir: &Path) -> std::io::Result<[u8; 32]> {
    let own = tern_engine::tpm_migration_key_path(run_dir);
    let path = if own.exists() {
        own
    } else {
        state_dir.join("tpm-migration.key")
    };
    std::fs::read(path)?
        .try_into()
        .map_err(|_| std::io::Error::other("a vTPM migration key is 32 bytes"))
}

/// Reads the cluster key, creating it (random) if the file does not exist yet.
pub fn load_cluster_key(path: &std::path::Path) -> Result<[u8; 32], AgentError> {
    let err = |m: String| AgentError::ClusterKey(path.to_path_buf(), m);
    if !path.exists() {
        let key = pki::random_key().map_err(|e| err(format!("no randomness: {e}")))?;
        use std::io::Write;
        use std::os::unix::fs::OpenOptionsExt;
        match std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(path)
        {
            Ok(mut f) => f
                .write_all(format!("{}\n", hex::encode(key)).as_bytes())
                .map_err(|e| err(e.to_string()))?,
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {} // another agent won
            Err(e) => return Err(err(format!("cannot create: {e}"))),
        }
    }
    let text = pki::read_secret(path).map_err(|e| err(e.to_string()))?;
    let text = String::from_utf8_lossy(&text);
    let bytes = hex::decode(text.trim()).map_err(|e| err(format!("not hex: {e}")))?;
    bytes
        .try_into()
        .map_err(|b: Vec<u8>| err(format!("{} bytes, not 32", b.len())))
}

impl Agent {
    /// Opens the cluster key and the page store (whose spill file starts empty).
    pub fn new(config: AgentConfig) -> Result<Arc<Agent>, AgentError> {
        if let Some(u) = &config.qemu_user {
            let known = std::process::Command::new("id")
                .args(["-u", u])
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::null())
                .status()
                .is_ok_and(|s| s.success());
            if !known {
                return Err(AgentError::NoQemuUser(u.clone()));
            }
        } else {
            tracing::warn!(
                "QEMU runs as root (no --qemu-user): a guest that escapes QEMU owns the host"
            );
        }
        let security = match (&config.tls_dir, config.insecure_plaintext) {
            (_, true) => {
                tracing::warn!("peer connections are PLAINTEXT and unauthenticated (TERN_INSECURE_PLAINTEXT): for benchmarks only");
                tls::PeerSecurity::Plaintext
            }
            (Some(d), false) => tls::PeerSecurity::load(d)?,
            (None, false) => return Err(AgentError::NoTls),
        };
        let policy = match &config.policy {
            Some(p) => policy::Policy::load(p)?,
            None => policy::Policy::default(),
        };
        let key_path = config
            .cluster_key
            .clone()
            .unwrap_or_else(|| match &config.tls_dir {
                Some(d) if d.join(pki::CLUSTER_KEY).exists() => d.join(pki::CLUSTER_KEY),
                _ => config.state_dir.join("cluster.key"),
            });
        let cluster_key = load_cluster_key(&key_path)?;
        let hasher = tern_store::ContentHasher::new(cluster_key);
        std::fs::create_dir_all(&config.state_dir)
            .map_err(|e| AgentError::StateDir(config.state_dir.clone(), e))?;
        // root only, whatever an older agent or an administrator left: nothing below it
        // (page store, run directories, images, keys) is reachable by other users
        {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&config.state_dir, std::fs::Permissions::from_mode(0o700))
                .map_err(|e| AgentError::StateDir(config.state_dir.clone(), e))?;
        }
        const PAGE: usize = 4096;
        let pages = |mib: u64| (mib << 20) as usize / PAGE;
        let spill = config.state_dir.join("pages.store");
        let store = tern_store::TieredStore::new(
            PAGE,
            pages(config.store_mem_mib),
            Some((&spill, pages(config.store_file_mib))),
        )?;
        {
            // guest memory: root only, also when an older agent made the file
            use std::os::unix::fs::PermissionsExt;
            let _ = std::fs::set_permissions(&spill, std::fs::Permissions::from_mode(0o600));
        }
        let chunks =
            tern_chunks::ChunkIndex::open(config.state_dir.join("chunks"), hasher.clone())?;
        for p in chunks.load_problems() {
            tracing::warn!("chunk index: {p}");
        }
        let images_dir = config.state_dir.join("images");
        let wanted_boot_dirs = if config.boot_dirs.is_empty() {
            vec![config.state_dir.join("boot")]
        } else {
            config.boot_dirs.clone()
        };
        let boot_dirs = canonical_dirs(
            &wanted_boot_dirs,
            "boot directory unusable: incoming VMs cannot boot from it",
        );
        let qemu = tern_qemu::launch::LaunchOptions::new(PathBuf::new()).qemu_binary;
        let machine_types = tern_qemu::launch::machine_types(&qemu).unwrap_or_else(|e| {
            tracing::warn!(qemu = %qemu.display(), "cannot list QEMU's machine types ({e}): incoming migrations will be refused");
            Vec::new()
        });
        let engine = Engine {
            config: EngineConfig {
                name: config.name.clone(),
                stall_timeout: config.stall_timeout,
                max_protocol: config.max_protocol,
                fault: config.fault,
                shared_dirs: shared_dirs(&config, &boot_dirs),
                boot_dirs,
                machine_types,
                host_memory_mib: tern_engine::hostmem::total_mib().unwrap_or(0),
                libvirt: config.libvirt_paths.clone(),
            },
            store: Arc::new(Mutex::new(store)),
            hasher,
            chunks: Arc::new(std::sync::Mutex::new(chunks)),
            security,
            registry: Arc::new(tern_engine::registry::Registry::new(
                config.state_dir.join("run"),
                config.max_incoming,
            )),
        };
        let snapshots = snapshots::Snapshots::new(&config.state_dir, config.snapshot_limit_mib);
        let fence = fence::Fence::load(&config.state_dir, config.fence_after);
        Ok(Arc::new_cyclic(|me| Agent {
            snapshots,
            fence,
            engine: Arc::new(engine),
            images_dir,
            config,
            policy,
            vms: Mutex::new(HashMap::new()),
            reserved: Mutex::new(HashSet::new()),
            handovers: Mutex::new(HashMap::new()),
            remote_cards: Default::default(),
            remote_ips: Default::default(),
            departed: Default::default(),
            forwarding: Default::default(),
            addressing: Default::default(),
            load_sampler: Default::default(),
            me: me.clone(),
        }))
    }

    /// A fresh run directory for a VM instance (unique per launch).
    pub fn new_run_dir(&self, name: &str) -> PathBuf {
        let stamp = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_micros() % 1_000_000_000)
            .unwrap_or(0);
        self.config
            .state_dir
            .join("run")
            .join(format!("{name}.{stamp}"))
    }

    pub fn vm(&self, name: &str) -> Option<Arc<Vm>> {
        self.vms.lock().get(name).cloned()
    }

    /// The VM here whose card on `network` has `mac`, if any.
    pub fn mac_user(&self, network: &str, mac: tern_qemu::spec::Mac) -> Option<String> {
        self.vms.lock().values().find_map(|vm| {
            vm.spec
                .nics
                .iter()
                .any(|n| n.network == network && n.mac == Some(mac))
                .then(|| vm.spec.name.clone())
        })
    }

    pub fn vms(&self) -> Vec<Arc<Vm>> {
        let mut v: Vec<_> = self.vms.lock().values().cloned().collect();
        v.sort_by(|a, b| a.spec.name.cmp(&b.spec.name));
        v
    }

    /// Holds a name for an incoming VM; false if the name is taken.
    pub fn reserve_name(&self, name: &str) -> bool {
        let vms = self.vms.lock();
        let mut r = self.reserved.lock();
        if vms.contains_key(name) || r.contains(name) {
            return false;
        }
        r.insert(name.to_string());
        true
    }

    pub fn release_name(&self, name: &str) {
        self.reserved.lock().remove(name);
    }

    /// Adds a VM that now runs here (after an incoming switchover); releases its reservation.
    pub fn adopt(&self, vm: Arc<Vm>) {
        let name = vm.spec.name.clone();
        self.vms.lock().insert(name.clone(), vm);
        self.release_name(&name);
    }

    /// Tells the event stream what happened to VM `name` (`started`, `stopped`, `arrived`,
    /// `left`, `upgraded`).
    pub fn vm_event(&self, name: &str, what: &str, pid: Option<u32>) {
        self.engine.registry.emit(tern_api::events::AgentEvent::Vm {
            name: name.into(),
            what: what.into(),
            pid,
        });
    }

    /// Forgets a VM (after it left or stopped).
    pub fn forget(&self, name: &str) -> Option<Arc<Vm>> {
        self.vms.lock().remove(name)
    }

    pub async fn start_vm(&self, mut spec: VmSpec) -> Result<Arc<Vm>, StartVmError> {
        spec.validate()?;
        // (a migration's source sets it; a spec file's would mean nothing)
        for d in &mut spec.disks {
            d.sample = None;
        }
        // made once, here; kept in the spec wherever the VM goes. A card's MAC is unique
        // on its network here: a given one that is taken is refused, a drawn one drawn
        // again.
        let given: Vec<bool> = spec.nics.iter().map(|n| n.mac.is_some()).collect();
        for _ in 0..16 {
            spec.assign_macs().map_err(StartVmError::Mac)?;
            let mut again = false;
            for (i, n) in spec.nics.iter_mut().enumerate() {
                let Some(mac) = n.mac else { continue };
                if let Some(vm) = self.mac_user(&n.network, mac) {
                    if given[i] {
                        return Err(StartVmError::MacInUse {
                            mac: mac.to_string(),
                            network: n.network.clone(),
                            vm,
                        });
                    }
                    n.mac = None;
                    again = true;
                }
            }
            if !again {
                break;
            }
        }
        if let Some(n) = spec.nics.iter().find(|n| n.mac.is_none()) {
            return Err(StartVmError::Mac(std::io::Error::other(format!(
                "no free MAC on network {} after 16 draws",
                n.network
            ))));
        }
        if spec.libvirt.is_some() {
            return Err(StartVmError::LibvirtDomain);
        }
        spec.check_files()?;
        if !self.reserve_name(&spec.name) {
            return Err(StartVmError::Exists(spec.name));
        }
        let mut opts = LaunchOptions::new(self.new_run_dir(&spec.name));
        opts.kill_on_drop = false; // VMs outlive the agent
        match self.launch(&spec, &opts).await {
            Ok(p) => {
                let vm = Arc::new(Vm::supervise(spec, p));
                self.adopt(vm.clone());
                self.vm_event(&vm.spec.name, "started", vm.pid);
                if let Some(me) = self.me.upgrade() {
                    me.cards_here(&vm.spec);
                }
                Ok(vm)
            }
            Err(e) => {
                self.release_name(&spec.name);
                let _ = std::fs::remove_dir_all(&opts.run_dir);
                Err(e)
            }
        }
    }

    /// Launches QEMU for `spec`, with its swtpm first when the spec asks for a TPM; a
    /// swtpm whose QEMU did not start is stopped again.
    pub async fn launch(
        &self,
        spec: &VmSpec,
        opts: &LaunchOptions,
    ) -> Result<QemuProcess, StartVmError> {
        let mut opts = opts.clone();
        if opts.nic_fds.len() != spec.nics.len() {
            // every QEMU gets taps of its own (a new VM, an arriving one, a hand-over's
            // new QEMU); nothing is made for a spec that would be refused
            spec.validate_migrating()?;
            spec.check_files()?;
            // (a card that left here not long ago: its frames stay here from now on)
            self.stop_forwarding(spec).await;
            opts.nic_fds = open_nics(spec, self.config.overlay.as_ref()).await?;
        }
        if opts.disk_fds.is_empty() && spec.disks.iter().any(|d| d.shared) {
            // a shared image is opened here without following links (its path is in
            // storage other hosts write), and QEMU gets the descriptor
            opts.disk_fds = open_shared_disks(spec).await?;
        }
        let mut tpm = self.start_tpm(spec, &opts.run_dir).await?;
        opts.run_as = self.config.qemu_user.clone();
        opts.sandbox = true;
        match QemuProcess::launch(spec, &opts).await {
            Ok(p) => Ok(p),
            Err(e) => {
                if let Some(t) = tpm.as_mut() {
                    let _ = t.stop(std::time::Duration::ZERO).await;
                }
                Err(e.into())
            }
        }
    }

    /// Starts the VM's swtpm when its spec asks for a TPM: state in `RUN/tpm`, encrypted
    /// at rest with this host's `STATE_DIR/tpm.key`; QEMU connects to it at launch. An
    /// incoming VM gets an empty state, which QEMU fills from the migration stream. The
    /// state also travels encrypted with the VM's own migration key
    /// ([`tpm_migration_key_path`]): made at random for a new VM, received from the source
    /// (`TpmKey`) for an incoming one, which writes it into the run directory first.
    async fn start_tpm(
        &self,
        spec: &VmSpec,
        run_dir: &std::path::Path,
    ) -> Result<Option<tern_qemu::swtpm::Swtpm>, tern_qemu::swtpm::SwtpmStartError> {
        use tern_qemu::swtpm;
        if !spec.tpm {
            return Ok(None);
        }
        let key = self.config.state_dir.join("tpm.key");
        swtpm::ensure_key_file(&key)?;
        let mut cfg = swtpm::SwtpmConfig::for_run_dir(run_dir, key);
        let mkey = tern_engine::tpm_migration_key_path(run_dir);
        std::fs::create_dir_all(run_dir).map_err(|e| swtpm::SwtpmStartError::Files {
            path: run_dir.to_path_buf(),
            source: e,
        })?;
        swtpm::ensure_key_file(&mkey)?;
        cfg.migration_key_file = Some(mkey);
        cfg.kill_on_drop = false; // it lives as long as its QEMU
        Ok(Some(swtpm::Swtpm::start(&cfg).await?))
    }

    /// Removes a VM's run directory once its QEMU is gone; its TPM state (if any) first,
    /// after its swtpm let go of it.
    pub async fn remove_run_dir(&self, run_dir: &std::path::Path) {
        let tpm = run_dir.join("tpm");
        if tpm.exists() {
            if let Err(e) =
                tern_qemu::swtpm::remove_state(&tpm, std::time::Duration::from_secs(10)).await
            {
                tracing::warn!(dir = %tpm.display(), "TPM state: {}", tern_engine::error_chain(&e));
            }
        }
        let _ = std::fs::remove_dir_all(run_dir);
    }

    pub async fn stop_vm(&self, name: &str) -> Result<(), StopVmError> {
        let vm = self
            .vm(name)
            .ok_or_else(|| StopVmError::NotFound(name.into()))?;
        if vm.migrating.load(std::sync::atomic::Ordering::SeqCst) {
            return Err(StopVmError::Migrating(name.into()));
        }
        vm.stop(StopMode::Quit).await;
        self.forget(name);
        self.remove_run_dir(&vm.run_dir).await;
        self.vm_event(name, "stopped", None);
        Ok(())
    }

    /// Puts `vm` in the registry under `name` in place of the entry there (a same-host
    /// hand-over: the new QEMU takes the old one's place).
    pub(crate) fn replace(&self, name: &str, vm: Arc<Vm>) {
        self.vms.lock().insert(name.to_string(), vm);
    }

    /// The engine's view of this agent: its policy, names, run directories, launches.
    pub fn host(&self) -> Arc<dyn Host> {
        self.me.upgrade().expect("an agent outlives its own calls")
    }

    /// Finds the VMs a previous agent process left running (their run directories hold
    /// spec.toml, qemu.pid and qmp.sock) and supervises them again. A run directory marked
    /// `incoming` belongs to a migration that never switched over: its QEMU is killed and
    /// the directory removed. Directories whose QEMU is gone are removed too.
    ///
    /// A run directory marked [`tern_engine::local::UPGRADING`] held the VM when an
    /// upgrade began: if the new QEMU's directory recorded the switchover, the VM is there
    /// and this QEMU is stopped; otherwise the VM is here (resumed if it ran).
    ///
    /// Returns the VMs whose post-copy the previous agent began and a new agent must
    /// resume (their QEMU in a post-copy state, with the engine's mark): the caller runs
    /// [`outgoing::resume_restarted`] for each.
    pub async fn reattach(&self) -> Vec<(Arc<Vm>, tern_engine::source::restart::PostcopyMark)> {
        use tern_engine::source::restart::{postcopy_began, PostcopyMark};
        let mut resumes = Vec::new();
        let Ok(dirs) = std::fs::read_dir(self.config.state_dir.join("run")) else {
            return resumes;
        };
        for d in dirs.flatten().map(|e| e.path()) {
            let upgrade = tern_engine::local::UpgradeMark::read(&d);
            let pid = std::fs::read_to_string(d.join("qemu.pid"))
                .ok()
                .and_then(|p| p.trim().parse::<u32>().ok())
                .filter(|p| vm::process_alive(*p) && cmdline_mentions(*p, &d));
            let record = SwitchRecord::read(&d);
            // both marks: the previous agent died between recording the switchover and
            // resuming the VM; the source committed and the VM is this host's
            let unfinished_switch = d.join(INCOMING_MARKER).exists() && record.is_some();
            if d.join(INCOMING_MARKER).exists() && record.is_none() {
                if let Some(p) = pid {
                    tracing::warn!(dir = %d.display(), pid = p, "removing an incoming VM that never switched over");
                    vm::kill_pid(p);
                }
                let _ = std::fs::remove_dir_all(&d);
                continue;
            }
            let spec = std::fs::read_to_string(d.join("spec.toml"))
                .ok()
                .and_then(|t| VmSpec::from_toml(&t).ok());
            let (Some(pid), Some(spec)) = (pid, spec) else {
                tracing::info!(dir = %d.display(), "removing the run directory of a VM that is gone");
                let _ = std::fs::remove_dir_all(&d);
                continue;
            };
            let moving = upgrade.as_ref().filter(|u| !u.committed());
            if let Some(h) = moving.and_then(|u| u.handover.as_ref()) {
                // a move this agent's predecessor sent: the receiver must be done with it
                // (aborted, or committed after all) before its record says where the VM is
                handover::fence(&h.agent, &h.id).await;
            }
            if upgrade.as_ref().is_some_and(|u| u.committed()) {
                tracing::warn!(vm = %spec.name, pid, "stopping the old QEMU of an upgrade that committed");
                vm::kill_pid(pid);
                for _ in 0..100 {
                    if !vm::process_alive(pid) {
                        break;
                    }
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                }
                self.remove_run_dir(&d).await;
                continue;
            }
            match tern_qemu::qmp::QmpClient::connect(
                &d.join("qmp.sock"),
                std::time::Duration::from_secs(5),
            )
            .await
            {
                Ok(qmp) if self.reserve_name(&spec.name) => {
                    // a post-copy the previous agent began: the VM runs at the destination
                    // and waits there for the pages this QEMU still holds
                    let mark = match PostcopyMark::read(&d) {
                        Some(mark) => {
                            let status = qmp.query_migrate().await.map(|i| i.status).ok();
                            if postcopy_began(status.as_deref()) {
                                Some(mark)
                            } else {
                                tracing::info!(vm = %spec.name, status = ?status, "a post-copy mark beside a QEMU where post-copy never began: dropped");
                                PostcopyMark::remove(&d);
                                None
                            }
                        }
                        None => None,
                    };
                    if unfinished_switch {
                        finish_switchover(&qmp, &spec, &d, record.as_ref()).await;
                    } else if mark.is_none() {
                        clear_stale_migration(&qmp, &spec).await;
                    }
                    if let Some(u) = &upgrade {
                        // an upgrade that did not commit: the VM is in this QEMU
                        let vm = tern_engine::local::LocalVm {
                            spec: &spec,
                            qmp: &qmp,
                            run_dir: &d,
                            pid: Some(pid),
                        };
                        let state =
                            tern_engine::local::resume_old(&vm, &u.to, u.source_running).await;
                        tracing::warn!(vm = %spec.name, "an upgrade the previous agent began did not commit: {state}");
                    }
                    tracing::info!(vm = %spec.name, pid, "re-attached to a running VM");
                    let vm = Arc::new(Vm::reattach(spec, qmp, pid, d));
                    if let Some(mark) = mark {
                        tracing::warn!(vm = %vm.spec.name, migration = %mark.migration_id, "the previous agent died during this VM's post-copy: resuming it");
                        vm.migrating
                            .store(true, std::sync::atomic::Ordering::SeqCst);
                        resumes.push((vm.clone(), mark));
                    }
                    self.adopt(vm);
                }
                Ok(_) => {
                    tracing::error!(vm = %spec.name, pid, "two running VMs with one name; leaving this one alone")
                }
                Err(e) => tracing::error!(vm = %spec.name, pid, "cannot re-attach: {e}"),
            }
        }
        resumes
    }
}

impl Host for Agent {
    fn vet_networks<'a>(&'a self, spec: &'a VmSpec) -> BoxFuture<'a, Result<(), String>> {
        Box::pin(async move {
            let wanted: Vec<&str> = spec
                .nics
                .iter()
                .map(|n| n.network.as_str())
                .filter(|n| !self.config.networks.iter().any(|c| c == n))
                .collect();
            for n in &spec.nics {
                if let Some(vm) = n.mac.and_then(|m| self.mac_user(&n.network, m)) {
                    return Err(format!(
                        "MAC {} on network {:?} is VM {vm:?}'s here: two cards with one address on one network would take each other's traffic",
                        n.mac.map(|m| m.to_string()).unwrap_or_default(),
                        n.network
                    ));
                }
            }
            if wanted.is_empty() {
                return Ok(());
            }
            let nl = tern_net::bridge::Netlink::open().map_err(|e| tern_engine::error_chain(&e))?;
            for n in wanted {
                let has = nl
                    .has_bridge(n)
                    .await
                    .map_err(|e| tern_engine::error_chain(&e))?;
                if !has {
                    return Err(format!(
                        "network {n:?} is not served by this host (no bridge {} here, not in the agent's --network list): an incoming VM joins only the networks its destination has",
                        tern_net::bridge::bridge_name(n)
                    ));
                }
            }
            Ok(())
        })
    }

    fn authorize_here(&self, spec: &VmSpec) -> Result<(), String> {
        if let Some(why) = self.fence.refuses_arrival(&spec.name) {
            return Err(why);
        }
        self.policy
            .check(
                &policy::VmFacts::of(spec),
                &self.config.name,
                self.engine.security.own_labels(),
            )
            .map_err(|e| e.to_string())
    }

    fn authorize_there(&self, spec: &VmSpec, host: &str, labels: &[String]) -> Result<(), String> {
        self.policy
            .check(&policy::VmFacts::of(spec), host, labels)
            .map_err(|e| e.to_string())
    }

    fn holds_paused(&self, spec: &VmSpec) -> bool {
        self.fence.hold_arrival(&spec.name)
    }

    fn reserve_name(&self, name: &str) -> bool {
        Agent::reserve_name(self, name)
    }

    fn release_name(&self, name: &str) {
        Agent::release_name(self, name)
    }

    fn new_run_dir(&self, name: &str) -> PathBuf {
        Agent::new_run_dir(self, name)
    }

    fn launch<'a>(
        &'a self,
        spec: &'a VmSpec,
        opts: &'a LaunchOptions,
    ) -> BoxFuture<'a, Result<QemuProcess, HostLaunchError>> {
        Box::pin(async move {
            Agent::launch(self, spec, opts)
                .await
                .map_err(|e| HostLaunchError(tern_engine::error_chain(&e)))
        })
    }

    fn disk_user(&self, id: (u64, u64)) -> Option<String> {
        use std::os::unix::fs::MetadataExt;
        let same = |p: &Path| std::fs::metadata(p).is_ok_and(|m| (m.dev(), m.ino()) == id);
        self.vms()
            .iter()
            .find(|vm| vm.spec.disks.iter().any(|d| same(&d.path)))
            .map(|vm| vm.spec.name.clone())
    }

    fn runs_here(&self, spec: &VmSpec) {
        if let Some(me) = self.me.upgrade() {
            me.cards_here(spec);
        }
    }

    fn leaves(&self, spec: &VmSpec, to: std::net::IpAddr) {
        if let Some(me) = self.me.upgrade() {
            me.cards_left(spec, to);
        }
    }

    fn located<'a>(
        &'a self,
        peer: &'a str,
        from: SocketAddr,
        entries: Vec<tern_proto::Location>,
    ) -> BoxFuture<'a, Result<Vec<tern_proto::Location>, String>> {
        Box::pin(async move {
            let from = self.overlay_peer(from.ip())?;
            self.take_locations(peer, from, entries).await;
            Ok(self.local_locations())
        })
    }

    fn addressed<'a>(
        &'a self,
        peer: &'a str,
        from: SocketAddr,
        entries: Vec<tern_proto::CardAddress>,
    ) -> BoxFuture<'a, Result<Vec<tern_proto::CardAddress>, String>> {
        Box::pin(async move {
            let from = self.overlay_peer(from.ip())?;
            // (an opener names only the cards that began to run, unless it just started)
            self.take_addresses(peer, from, entries, false).await;
            Ok(self.local_addresses())
        })
    }

    fn adopt(&self, spec: VmSpec, process: QemuProcess) {
        let vm = Arc::new(Vm::supervise(spec, process));
        let (name, pid) = (vm.spec.name.clone(), vm.pid);
        Agent::adopt(self, vm);
        // its state here is the running VM's now: the snapshot it left is stale
        self.snapshots.arrived(&name);
        self.vm_event(&name, "arrived", pid);
    }

    fn arriving(&self, name: &str, on: bool) {
        if let Some(vm) = self.vms.lock().get(name) {
            vm.migrating.store(on, std::sync::atomic::Ordering::SeqCst);
        }
    }

    fn remove_run_dir<'a>(&'a self, dir: &'a Path) -> BoxFuture<'a, ()> {
        Box::pin(Agent::remove_run_dir(self, dir))
    }
}

/// The shared storage directories (`--shared-dir`) an incoming VM's disk may be in: never
/// one that holds this agent's state or boot files, or the root (a peer would name the
/// TLS key as a raw disk).
fn shared_dirs(config: &AgentConfig, boot_dirs: &[PathBuf]) -> Vec<PathBuf> {
    let state = std::fs::canonicalize(&config.state_dir).unwrap_or(config.state_dir.clone());
    canonical_dirs(
        &config.shared_dirs,
        "shared storage directory unusable: no incoming shared disk is taken from it",
    )
    .into_iter()
    .filter(|d| {
        let mine = d.as_os_str() == "/"
            || state.starts_with(d)
            || boot_dirs.iter().any(|b| b.starts_with(d))
            || config.tls_dir.as_ref().is_some_and(|t| t.starts_with(d));
        if mine {
            tracing::warn!(dir = %d.display(), "a shared storage directory may not hold the agent's own files (state, boot, TLS): no incoming shared disk is taken from it");
        }
        !mine
    })
    .collect()
}

/// `spec`'s shared disks opened for QEMU ([`tern_engine::disk::open_shared_image`]), by
/// disk index (None for a local disk), within 30 s.
async fn open_shared_disks(
    spec: &VmSpec,
) -> Result<Vec<Option<Arc<std::os::fd::OwnedFd>>>, StartVmError> {
    let disks = spec.disks.clone();
    let opened = tokio::time::timeout(
        std::time::Duration::from_secs(30),
        tokio::task::spawn_blocking(move || {
            disks
                .iter()
                .enumerate()
                .map(|(i, d)| match d.shared {
                    false => Ok(None),
                    true => tern_engine::disk::open_shared_image(&d.path)
                        .map(|(image, _)| Some(Arc::new(image.direct)))
                        .map_err(|why| format!("shared disk {i} ({}): {why}", d.path.display())),
                })
                .collect::<Result<Vec<_>, String>>()
        }),
    )
    .await
    .map_err(|_| "the shared storage did not answer within 30 s".to_string())
    .and_then(|r| r.map_err(|e| e.to_string()))
    .and_then(|r| r);
    opened.map_err(StartVmError::SharedDisk)
}

/// `dirs` as canonical paths; one that cannot be resolved is left out, logged with `why`.
fn canonical_dirs(dirs: &[PathBuf], why: &str) -> Vec<PathBuf> {
    dirs.iter()
        .filter_map(|d| match std::fs::canonicalize(d) {
            Ok(c) => Some(c),
            Err(e) => {
                tracing::warn!(dir = %d.display(), error = %e, "{why}");
                None
            }
        })
        .collect()
}

/// `network`'s bridge here (made if missing) and, with an overlay, its VXLAN port.
async fn network_here(
    nl: &tern_net::bridge::Netlink,
    network: &str,
    overlay: Option<&tern_net::vxlan::Overlay>,
) -> Result<u32, tern_net::NetError> {
    let bridge = nl.ensure_bridge(network).await?;
    match overlay {
        Some(o) => nl.ensure_vxlan(network, bridge, o).await?,
        None => nl.remove_vxlan(network).await?,
    }
    Ok(bridge)
}

/// A tap for each of `spec`'s cards, on its network's bridge (made if missing).
async fn open_nics(
    spec: &VmSpec,
    overlay: Option<&tern_net::vxlan::Overlay>,
) -> Result<Vec<Arc<std::os::fd::OwnedFd>>, tern_net::NetError> {
    if spec.nics.is_empty() {
        return Ok(Vec::new());
    }
    let nl = tern_net::bridge::Netlink::open()?;
    let mut fds = Vec::new();
    for (i, nic) in spec.nics.iter().enumerate() {
        let bridge = network_here(&nl, &nic.network, overlay).await?;
        let tap = tern_net::tap::create()?;
        nl.attach(&tap.name, bridge).await?;
        tracing::info!(
            vm = %spec.name,
            card = i,
            tap = %tap.name,
            bridge = %tern_net::bridge::bridge_name(&nic.network),
            "network card on its tap"
        );
        fds.push(Arc::new(tap.fd));
    }
    Ok(fds)
}

/// A previous agent that died mid-migration may have left the VM's QEMU migrating into a
/// socket nobody reads, or paused before its switchover (a VM with disks), with tern's
/// NBD server, exports and dirty bitmaps in it. The stream cannot have ended (the source
/// commits only after that), so no destination runs the VM: cancel (QEMU resumes a VM
/// that was running) and clear the rest.
async fn clear_stale_migration(qmp: &tern_qemu::qmp::QmpClient, spec: &VmSpec) {
    let active = |s: &str| {
        matches!(
            s,
            "setup" | "active" | "pre-switchover" | "device" | "cancelling"
        )
    };
    if let Ok(m) = qmp.query_migrate().await {
        if active(&m.status) {
            tracing::warn!(vm = %spec.name, status = %m.status, "cancelling a migration a previous agent left running");
            let _ = qmp.execute("migrate_cancel", None).await;
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
            while std::time::Instant::now() < deadline {
                match qmp.query_migrate().await {
                    Ok(m) if active(&m.status) => {
                        tokio::time::sleep(std::time::Duration::from_millis(50)).await
                    }
                    _ => break,
                }
            }
        }
    }
    if !spec.disks.is_empty() {
        tern_engine::source::recover::clear_disk_state(qmp, spec.disks.len()).await;
    }
}

/// A previous agent recorded an incoming VM's switchover and died before it resumed the
/// VM (or before it cleared the incoming mark): the source committed, so the VM is this
/// host's; run it if it ran on the source.
async fn finish_switchover(
    qmp: &tern_qemu::qmp::QmpClient,
    spec: &VmSpec,
    dir: &std::path::Path,
    record: Option<&SwitchRecord>,
) {
    let Some(r) = record else { return };
    if r.source_running {
        match qmp.query_status().await {
            Ok(s) if !s.running => {
                tracing::warn!(vm = %spec.name, migration = %r.migration_id, status = %s.status, "resuming a VM whose switchover the previous agent recorded but did not finish");
                if let Err(e) = qmp.execute("cont", None).await {
                    tracing::error!(vm = %spec.name, "cannot resume it: {e}");
                }
            }
            Ok(_) => {}
            Err(e) => tracing::error!(vm = %spec.name, "cannot ask its QEMU: {e}"),
        }
    }
    let _ = std::fs::remove_file(dir.join(INCOMING_MARKER));
}

/// Whether /proc/PID/cmdline mentions `dir` (the pid file is not reused by another process).
fn cmdline_mentions(pid: u32, dir: &std::path::Path) -> bool {
    std::fs::read(format!("/proc/{pid}/cmdline"))
        .map(|c| String::from_utf8_lossy(&c).contains(&*dir.to_string_lossy()))
        .unwrap_or(false)
}

/// Runs the agent until `shutdown` resolves; VMs are stopped on the way out.
pub async fn run(
    config: AgentConfig,
    shutdown: impl std::future::Future<Output = ()> + Send,
) -> Result<(), AgentError> {
    // two networks whose names give one VNI: refused before anything is made
    tern_net::vxlan::check_vnis(&config.networks).map_err(AgentError::Networks)?;
    if let Some(c) = config
        .capacity_cores
        .filter(|c| !(c.is_finite() && *c > 0.0))
    {
        return Err(AgentError::CapacityCores(c));
    }
    if config.control_listen.is_some() && config.insecure_plaintext {
        return Err(AgentError::ControlWithoutTls);
    }
    // Everything the agent creates is its own: guest memory (page store), disks made for
    // incoming VMs, console logs, keys. Nobody else reads them.
    rustix::process::umask(rustix::fs::Mode::from_raw_mode(0o077));
    std::fs::create_dir_all(config.state_dir.join("run"))
        .map_err(|e| AgentError::StateDir(config.state_dir.clone(), e))?;
    let peers = TcpListener::bind(config.peer_listen)
        .await
        .map_err(|e| AgentError::PeerListen(config.peer_listen, e))?;
    if !config.networks.is_empty() {
        // the networks this host serves are here before any VM needs them
        let nl = tern_net::bridge::Netlink::open().map_err(AgentError::Networks)?;
        for n in &config.networks {
            network_here(&nl, n, config.overlay.as_ref())
                .await
                .map_err(AgentError::Networks)?;
        }
    }
    if config.overlay.is_some() {
        // what this agent's last run left on every network of tern's here (configured or
        // made for a VM) is over: the frames it still forwarded for cards that had left,
        // and the ARP answers it wrote for remote cards (they are told again)
        let nl = tern_net::bridge::Netlink::open().map_err(AgentError::Networks)?;
        for n in nl.overlay_networks().await.map_err(AgentError::Networks)? {
            let Ok(Some(vx)) = nl.vxlan_index(&n).await else {
                continue;
            };
            nl.clear_forwards(vx).await.map_err(AgentError::Networks)?;
            if let Ok(Some(br)) = nl.bridge_index(&n).await {
                if let Err(e) = nl.clear_arp_answers(br, vx).await {
                    tracing::warn!(network = %n, "{}", tern_engine::error_chain(&e));
                }
            }
        }
    }
    let agent = Agent::new(config)?;
    // (what a previous agent left of recordings and snapshots being written)
    agent.snapshots.clean_partial();
    for (vm, mark) in agent.reattach().await {
        tokio::spawn(outgoing::resume_restarted(agent.clone(), vm, mark));
    }
    fence::keep_fenced(&agent).await;
    if agent.config.fence_after.is_some() {
        tokio::spawn(fence::run(agent.clone()));
    }
    {
        // the peers learn where this host's cards are, this host where theirs are
        // (and every minute after: a peer that missed a claim or restarted is repaired)
        let agent = agent.clone();
        tokio::spawn(async move {
            loop {
                let mine = agent.local_locations();
                agent.tell_peers(mine, agent.local_addresses()).await;
                tokio::time::sleep(overlay::RESYNC_EVERY).await;
            }
        });
    }
    // what the host and its VMs use, every 2 s
    tokio::spawn(load::run_sampler(agent.clone()));
    let api = api::serve(agent.clone()).await?;
    let metrics: std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>> =
        match agent.config.metrics_listen {
            Some(addr) => Box::pin(metrics::serve(agent.clone(), addr).await?),
            None => Box::pin(std::future::pending()),
        };
    let control: std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>> =
        match agent.config.control_listen {
            Some(addr) => Box::pin(control::serve(agent.clone(), addr).await?),
            None => Box::pin(std::future::pending()),
        };
    tracing::info!(
        agent = %agent.config.name,
        peers = %peers.local_addr().map(|a| a.to_string()).unwrap_or_default(),
        api = ?agent.config.api,
        "tern agent ready"
    );
    let peer_loop = {
        let security = agent.engine.security.clone();
        let dead_after = agent.config.stall_timeout;
        let agent = agent.clone();
        accept_peers(
            peers,
            security,
            dead_after,
            PEER_LIMITS,
            move |stream, addr, peer| {
                tern_engine::dest::serve_peer(
                    agent.engine.clone(),
                    agent.host(),
                    stream,
                    addr,
                    peer,
                )
            },
        )
    };
    tokio::select! {
        _ = peer_loop => {}
        _ = api => {}
        _ = metrics => {}
        _ = control => {}
        _ = shutdown => {}
    }
    tracing::info!(
        vms = agent.vms().len(),
        "tern agent shutting down; its VMs keep running"
    );
    let ApiAddr::Unix(p) = &agent.config.api;
    let _ = std::fs::remove_file(p);
    Ok(())
}

/// The peer listener's budgets (the constants; smaller in tests).
type PeerLimits = admission::Limits;

const PEER_LIMITS: PeerLimits = PeerLimits {
    handshakes: MAX_PEER_HANDSHAKES,
    handshakes_per_source: MAX_PEER_HANDSHAKES_PER_SOURCE,
    authenticated: MAX_PEER_CONNECTIONS,
    handshake_within: PEER_HANDSHAKE_WITHIN,
};

/// What the peer listener calls things in its log.
const PEER_NAMES: admission::Names = admission::Names {
    accept_failed: "peer accept failed",
    refused: "refused a peer connection",
    failed: "peer refused",
    over_budget: "peer connection closed",
};

/// The peer listener: accepts connections on `tcp`, authenticates them with `security`
/// and gives each peer to `serve`, within `limits`. Anyone who can reach the port can
/// open connections, so the budgets are kept apart: at most `handshakes` connections in
/// their TLS handshake at once, of them at most `handshakes_per_source` from one source
/// (an IPv4 address, an IPv6 /64), each handshake within `handshake_within`; and at most
/// `authenticated` peers, a budget no handshake takes from (a peer takes its slot there
/// once its handshake is done, then gives up its handshake slot). A connection over a
/// budget is closed; refusals are logged at warn level at most once per
/// [`control::REFUSALS_WARNED_EVERY`], at debug otherwise. Holding handshakes open can
/// still fill the handshake pool, but only from `handshakes / handshakes_per_source`
/// sources, and never takes a slot from a peer that got through. (The loop is
/// [`admission::accept`], shared with the control listener.)
///
/// Without TLS (`PeerSecurity::Plaintext`, benchmarks only) there is no handshake to
/// wait for: a connection takes a slot of the peers' budget as it is accepted.
async fn accept_peers<S, F>(
    tcp: TcpListener,
    security: tls::PeerSecurity,
    dead_after: std::time::Duration,
    limits: PeerLimits,
    serve: S,
) where
    S: Fn(tls::PeerStream, SocketAddr, tls::PeerIdentity) -> F + Send + Sync + 'static,
    F: std::future::Future<Output = ()> + Send + 'static,
{
    let admit = move |stream, addr, id, permit| {
        let served = serve(stream, addr, id);
        async move {
            // (the peer's slot, until it is served)
            let _permit = permit;
            served.await
        }
    };
    let vet = |_: SocketAddr, _: &tls::PeerIdentity| true;
    admission::accept(tcp, security, dead_after, limits, PEER_NAMES, vet, admit).await
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::admission::held::{closed, hold_share, raw_from};
    use std::time::Duration;
    use tokio::sync::{mpsc, oneshot};

    /// The peer listener on 127.0.0.1 within `limits`, its `serve` passing each peer on
    /// and keeping it (and its slot) until the sender passed with it is dropped.
    async fn peer_listener(
        security: tls::PeerSecurity,
        limits: PeerLimits,
    ) -> (
        SocketAddr,
        mpsc::Receiver<(SocketAddr, oneshot::Sender<()>)>,
        tokio::task::JoinHandle<()>,
    ) {
        let tcp = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = tcp.local_addr().unwrap();
        let (tx, rx) = mpsc::channel(16);
        let serve = move |stream: tls::PeerStream, peer: SocketAddr, _| {
            let tx = tx.clone();
            async move {
                let (release, released) = oneshot::channel();
                let _ = tx.send((peer, release)).await;
                let _ = released.await;
                drop(stream);
            }
        };
        let accept = tokio::spawn(accept_peers(
            tcp,
            security,
            Duration::from_secs(30),
            limits,
            serve,
        ));
        (addr, rx, accept)
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn held_handshakes_do_not_keep_peers_out() {
        let dir = tempfile::tempdir().unwrap();
        let ca = dir.path().join("ca");
        pki::init_ca(&ca, "test").unwrap();
        let issue = |name: &str, host: &str| {
            let out = dir.path().join(name);
            let req = pki::IssueRequest {
                host: host.into(),
                days: 1,
                ..Default::default()
            };
            pki::issue(&ca, &req, &out).unwrap();
            out
        };
        let here = tls::PeerSecurity::load(&issue("here", "127.0.0.1")).unwrap();
        let there = tls::PeerSecurity::load(&issue("there", "agent-b")).unwrap();
        let limits = PeerLimits {
            handshakes: 6,
            handshakes_per_source: 2,
            authenticated: 1,
            handshake_within: Duration::from_secs(30),
        };
        let (addr, mut rx, accept) = peer_listener(here.clone(), limits).await;
        let dial = || {
            let there = there.clone();
            async move {
                there
                    .connect(
                        &addr.to_string(),
                        Duration::from_secs(10),
                        Duration::from_secs(30),
                    )
                    .await
                    .map(|(stream, _)| stream)
            }
        };

        // one source: its share is held, the rest closed at once
        let _held = hold_share("127.0.0.2", addr, 2, 4).await;

        // a peer from another address: served while they are held
        let mut first = dial().await.expect("the first peer's handshake");
        let (peer, release) = tokio::time::timeout(Duration::from_secs(10), rx.recv())
            .await
            .expect("the peer got through within 10 s")
            .unwrap();
        assert_eq!(peer.ip(), "127.0.0.1".parse::<std::net::IpAddr>().unwrap());
        // the peers' budget is its own: a second one is closed after its handshake...
        use tokio::io::AsyncReadExt;
        let mut second = dial().await.expect("the second peer's handshake");
        let r = tokio::time::timeout(Duration::from_secs(5), second.read(&mut [0u8; 16]))
            .await
            .expect("a peer over the budget was held");
        assert!(matches!(r, Ok(0) | Err(_)), "{r:?}");
        assert!(rx.try_recv().is_err(), "a peer over the budget was served");
        // ... and the first one's slot, once free, is the next one's (its task may still
        // be ending when the next one comes: a next one closed too tries again)
        drop(release);
        let r = tokio::time::timeout(Duration::from_secs(5), first.read(&mut [0u8; 16])).await;
        assert!(
            matches!(r, Ok(Ok(0) | Err(_))),
            "the first peer was kept: {r:?}"
        );
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        let _next = loop {
            assert!(
                std::time::Instant::now() < deadline,
                "the first peer's slot was not given to the next one within 10 s"
            );
            let Ok(mut next) = dial().await else { continue };
            let mut b = [0u8; 16];
            let served = tokio::time::timeout(Duration::from_secs(10), async {
                tokio::select! {
                    got = rx.recv() => got.is_some(),
                    _ = next.read(&mut b) => false,
                }
            })
            .await
            .expect("the next peer was neither served nor closed");
            if served {
                break next;
            }
        };
        accept.abort();

        // the pool (a listener of its own, where nothing else is in a handshake): 2 held
        // from .2, 2 from .3, 2 from .4 fill it; .5 is closed at once
        let (addr, _rx, accept) = peer_listener(here, limits).await;
        let mut held = Vec::new();
        for from in ["2", "2", "3", "3", "4", "4"] {
            held.push(raw_from(&format!("127.0.0.{from}"), addr).await);
        }
        let mut late = raw_from("127.0.0.5", addr).await;
        assert!(
            closed(&mut late, Duration::from_secs(5)).await,
            "a handshake over the pool was held"
        );
        for c in &mut held {
            assert!(
                !closed(c, Duration::from_millis(100)).await,
                "a held handshake was closed"
            );
        }
        accept.abort();
    }

    #[tokio::test]
    async fn plaintext_peers_have_only_the_connection_budget() {
        let limits = PeerLimits {
            handshakes: 1,
            handshakes_per_source: 1,
            authenticated: 3,
            handshake_within: Duration::from_secs(30),
        };
        let (addr, mut rx, accept) = peer_listener(tls::PeerSecurity::Plaintext, limits).await;
        // no handshake to wait for: three at once from one source are served (no share
        // of a handshake pool)
        let mut conns = Vec::new();
        for _ in 0..3 {
            conns.push(raw_from("127.0.0.2", addr).await);
        }
        let mut served = Vec::new();
        for _ in 0..3 {
            let (_, release) = tokio::time::timeout(Duration::from_secs(5), rx.recv())
                .await
                .expect("a plaintext peer was not served")
                .unwrap();
            served.push(release);
        }
        // the fourth is over the peers' budget
        let mut fourth = raw_from("127.0.0.3", addr).await;
        assert!(
            closed(&mut fourth, Duration::from_secs(5)).await,
            "a connection over the budget was held"
        );
        assert!(rx.try_recv().is_err(), "a peer over the budget was served");
        accept.abort();
    }

    #[tokio::test]
    async fn networks_whose_names_give_one_vni_are_refused_before_anything_is_made() {
        let dir = tempfile::tempdir().unwrap();
        let state = dir.path().join("state");
        let mut config = AgentConfig::new(
            "a".into(),
            state.clone(),
            ApiAddr::Unix(dir.path().join("api.sock")),
            "127.0.0.1:0".parse().unwrap(),
        );
        // "lab" and "s67tc": one VNI (FNV-1a, 24 bits), found by brute force
        config.networks = vec!["lab".into(), "blue".into(), "s67tc".into()];
        let e = run(config, std::future::pending())
            .await
            .expect_err("the agent ran with two networks of one VNI");
        match &e {
            AgentError::Networks(tern_net::NetError::VniClash { first, second, vni }) => {
                assert_eq!((first.as_str(), second.as_str()), ("lab", "s67tc"));
                assert_eq!(*vni, tern_net::vxlan::vni("lab"));
            }
            other => panic!("{other:?}"),
        }
        assert!(
            !state.exists(),
            "the state directory was made before the refusal"
        );
    }
}

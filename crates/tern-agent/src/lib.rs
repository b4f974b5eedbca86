//! `tern agent`: the host daemon.
//!
//! One agent per host. It launches and supervises QEMU VMs ([`vm`]), serves the local
//! control API over HTTP/JSON ([`api`]), accepts peer agents on a TCP listener and runs
//! migrations in both directions ([`migrate`]). The binary (`tern agent`) is a thin
//! wrapper around [`run`]. VMs outlive the agent: a restarted agent re-attaches to them.
#![forbid(unsafe_code)]

pub mod api;
pub mod client;
pub mod conn;
pub mod images;
pub mod migrate;
pub mod pki;
pub mod policy;
pub mod tls;
pub mod vm;

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use tern_qemu::launch::{LaunchOptions, QemuProcess};
use tern_qemu::spec::VmSpec;
use tokio::net::TcpListener;

use migrate::MigrationHandle;
use vm::{StartVmError, StopMode, StopVmError, Vm};

/// Where the control API listens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ApiAddr {
    Unix(PathBuf),
    Tcp(SocketAddr),
}

impl std::str::FromStr for ApiAddr {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        if let Some(p) = s.strip_prefix("unix:") {
            Ok(ApiAddr::Unix(p.into()))
        } else if let Some(a) = s.strip_prefix("tcp:") {
            a.parse()
                .map(ApiAddr::Tcp)
                .map_err(|e| format!("bad address {a:?}: {e}"))
        } else if s.starts_with('/') {
            Ok(ApiAddr::Unix(s.into()))
        } else {
            Err(format!("API address {s:?}: use unix:/path or tcp:IP:PORT"))
        }
    }
}

#[derive(Debug, Clone)]
pub struct AgentConfig {
    /// This host's name, told to peers and shown in reports.
    pub name: String,
    /// Run directories of VMs live under `state_dir/run`.
    pub state_dir: PathBuf,
    pub api: ApiAddr,
    /// TCP address for peer agents.
    pub peer_listen: SocketAddr,
    /// Fault injection for tests (`TERN_FAULT`); see [`migrate::Fault`].
    pub fault: Option<migrate::Fault>,
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
        }
    }
}

/// Shared state of a running agent.
pub struct Agent {
    pub config: AgentConfig,
    /// Pages of VMs that live or lived here, and pages received, by content hash.
    pub store: migrate::pages::SharedStore,
    pub hasher: tern_store::ContentHasher,
    /// swtpm's `--migration-key`, derived from the cluster key (the same on every host of
    /// the cluster): a VM's TPM state is encrypted inside QEMU's stream too.
    tpm_migration_key: PathBuf,
    /// How peer connections are secured (mutual TLS unless the test-only plaintext mode).
    pub security: tls::PeerSecurity,
    pub policy: policy::Policy,
    /// The chunk index of this host's images (`STATE_DIR/chunks`): what an incoming disk
    /// is rebuilt from ([`images`]).
    pub chunks: images::SharedIndex,
    /// Disks of VMs that left, kept for a return trip (`STATE_DIR/images`).
    pub images_dir: PathBuf,
    vms: Mutex<HashMap<String, Arc<Vm>>>,
    /// Names held by incoming migrations that have not switched over yet.
    reserved: Mutex<HashSet<String>>,
    migrations: Mutex<HashMap<String, Arc<MigrationHandle>>>,
    /// Incoming migrations that accept extra data connections (parallel streams).
    streams: Mutex<HashMap<String, StreamSlot>>,
}

/// Where an incoming migration takes its extra data connections.
pub type StreamSlot = tokio::sync::mpsc::UnboundedSender<(u16, conn::FrameReader<tls::PeerRead>)>;

/// Stops accepting data connections for a migration when dropped.
pub struct StreamsGuard {
    agent: Arc<Agent>,
    id: String,
}

impl Drop for StreamsGuard {
    fn drop(&mut self) {
        self.agent.streams.lock().unwrap().remove(&self.id);
    }
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
}

/// Writes a 0600 binary key file, atomically, unless it already holds `key`.
fn write_key_file(path: &std::path::Path, key: &[u8]) -> Result<(), pki::PkiError> {
    if std::fs::read(path).is_ok_and(|k| k == key) {
        return Ok(());
    }
    pki::write_file(path, key, 0o600)
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
    let text = std::fs::read_to_string(path).map_err(|e| err(e.to_string()))?;
    let bytes = hex::decode(text.trim()).map_err(|e| err(format!("not hex: {e}")))?;
    bytes
        .try_into()
        .map_err(|b: Vec<u8>| err(format!("{} bytes, not 32", b.len())))
}

impl Agent {
    /// Opens the cluster key and the page store (whose spill file starts empty).
    pub fn new(config: AgentConfig) -> Result<Arc<Agent>, AgentError> {
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
        let tpm_migration_key = config.state_dir.join("tpm-migration.key");
        write_key_file(
            &tpm_migration_key,
            &blake3::derive_key("tern vTPM migration key v1", &cluster_key),
        )
        .map_err(|e| AgentError::KeyFile(tpm_migration_key.clone(), e))?;
        const PAGE: usize = 4096;
        let pages = |mib: u64| (mib << 20) as usize / PAGE;
        let spill = config.state_dir.join("pages.store");
        let store = tern_store::TieredStore::new(
            PAGE,
            pages(config.store_mem_mib),
            Some((&spill, pages(config.store_file_mib))),
        )?;
        let chunks =
            tern_chunks::ChunkIndex::open(config.state_dir.join("chunks"), hasher.clone())?;
        for p in chunks.load_problems() {
            tracing::warn!("chunk index: {p}");
        }
        let images_dir = config.state_dir.join("images");
        Ok(Arc::new(Agent {
            chunks: Arc::new(Mutex::new(chunks)),
            images_dir,
            config,
            store: Arc::new(Mutex::new(store)),
            hasher,
            tpm_migration_key,
            security,
            policy,
            vms: Mutex::new(HashMap::new()),
            reserved: Mutex::new(HashSet::new()),
            migrations: Mutex::new(HashMap::new()),
            streams: Mutex::new(HashMap::new()),
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
        self.vms.lock().unwrap().get(name).cloned()
    }

    pub fn vms(&self) -> Vec<Arc<Vm>> {
        let mut v: Vec<_> = self.vms.lock().unwrap().values().cloned().collect();
        v.sort_by(|a, b| a.spec.name.cmp(&b.spec.name));
        v
    }

    /// Lets data connections for incoming migration `id` reach it until the guard drops.
    pub fn accept_streams(self: &Arc<Self>, id: &str, slot: StreamSlot) -> StreamsGuard {
        self.streams.lock().unwrap().insert(id.to_string(), slot);
        StreamsGuard {
            agent: self.clone(),
            id: id.to_string(),
        }
    }

    /// Hands a data connection to its migration; false if no such migration takes one.
    pub fn attach_stream(
        &self,
        id: &str,
        index: u16,
        reader: conn::FrameReader<tls::PeerRead>,
    ) -> bool {
        match self.streams.lock().unwrap().get(id) {
            Some(slot) => slot.send((index, reader)).is_ok(),
            None => false,
        }
    }

    /// Holds a name for an incoming VM; false if the name is taken.
    pub fn reserve_name(&self, name: &str) -> bool {
        let vms = self.vms.lock().unwrap();
        let mut r = self.reserved.lock().unwrap();
        if vms.contains_key(name) || r.contains(name) {
            return false;
        }
        r.insert(name.to_string());
        true
    }

    pub fn release_name(&self, name: &str) {
        self.reserved.lock().unwrap().remove(name);
    }

    /// Adds a VM that now runs here (after an incoming switchover); releases its reservation.
    pub fn adopt(&self, vm: Arc<Vm>) {
        let name = vm.spec.name.clone();
        self.vms.lock().unwrap().insert(name.clone(), vm);
        self.release_name(&name);
    }

    /// Forgets a VM (after it left or stopped).
    pub fn forget(&self, name: &str) -> Option<Arc<Vm>> {
        self.vms.lock().unwrap().remove(name)
    }

    pub async fn start_vm(&self, spec: VmSpec) -> Result<Arc<Vm>, StartVmError> {
        spec.validate()?;
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
        let mut tpm = self.start_tpm(spec, &opts.run_dir).await?;
        match QemuProcess::launch(spec, opts).await {
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
    /// incoming VM gets an empty state, which QEMU fills from the migration stream.
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
        cfg.migration_key_file = Some(self.tpm_migration_key.clone());
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
                tracing::warn!(dir = %tpm.display(), "TPM state: {}", migrate::source::error_chain(&e));
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
        Ok(())
    }

    pub fn add_migration(&self, m: Arc<MigrationHandle>) {
        self.migrations.lock().unwrap().insert(m.id.clone(), m);
    }

    pub fn migration(&self, id: &str) -> Option<Arc<MigrationHandle>> {
        self.migrations.lock().unwrap().get(id).cloned()
    }

    pub fn migrations(&self) -> Vec<Arc<MigrationHandle>> {
        let mut v: Vec<_> = self.migrations.lock().unwrap().values().cloned().collect();
        v.sort_by_key(|m| m.started);
        v
    }

    /// What this agent knows of a migration it received (answers a source's Query).
    pub fn incoming_state(&self, id: &str) -> (tern_proto::MigrationState, u64) {
        use tern_proto::MigrationState as S;
        let Some(m) = self
            .migration(id)
            .filter(|m| m.direction == migrate::Direction::Incoming)
        else {
            // an agent restarted after the switchover still knows from the VM's run dir
            let arrived = self.vms().iter().any(|vm| {
                std::fs::read_to_string(vm.run_dir.join(migrate::dest::SWITCHED_IN))
                    .is_ok_and(|s| s == id)
            });
            return (if arrived { S::Running } else { S::Unknown }, 0);
        };
        let st = m.status();
        match (st.finished, st.report) {
            (true, Some(r)) => (S::Running, r.resumed_unix_us),
            (true, None) => (S::Discarded, 0),
            (false, _) => (S::InProgress, 0),
        }
    }

    /// The migration of `vm` that is still in progress, if any.
    pub fn active_migration_of(&self, vm: &str) -> Option<Arc<MigrationHandle>> {
        self.migrations()
            .into_iter()
            .rev()
            .find(|m| m.vm == vm && !m.is_finished())
    }

    /// Finds the VMs a previous agent process left running (their run directories hold
    /// spec.toml, qemu.pid and qmp.sock) and supervises them again. A run directory marked
    /// `incoming` belongs to a migration that never switched over: its QEMU is killed and
    /// the directory removed. Directories whose QEMU is gone are removed too.
    pub async fn reattach(&self) {
        let Ok(dirs) = std::fs::read_dir(self.config.state_dir.join("run")) else {
            return;
        };
        for d in dirs.flatten().map(|e| e.path()) {
            let pid = std::fs::read_to_string(d.join("qemu.pid"))
                .ok()
                .and_then(|p| p.trim().parse::<u32>().ok())
                .filter(|p| vm::process_alive(*p) && cmdline_mentions(*p, &d));
            if d.join(migrate::dest::INCOMING_MARKER).exists() {
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
            match tern_qemu::qmp::QmpClient::connect(
                &d.join("qmp.sock"),
                std::time::Duration::from_secs(5),
            )
            .await
            {
                Ok(qmp) if self.reserve_name(&spec.name) => {
                    clear_stale_migration(&qmp, &spec).await;
                    tracing::info!(vm = %spec.name, pid, "re-attached to a running VM");
                    self.adopt(Arc::new(Vm::reattach(spec, qmp, pid, d)));
                }
                Ok(_) => {
                    tracing::error!(vm = %spec.name, pid, "two running VMs with one name; leaving this one alone")
                }
                Err(e) => tracing::error!(vm = %spec.name, pid, "cannot re-attach: {e}"),
            }
        }
    }
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
        migrate::disk::stop_source_disks(qmp, spec.disks.len()).await;
        let _ = qmp
            .set_migrate_capabilities(&[("pause-before-switchover", false)])
            .await;
    }
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
    std::fs::create_dir_all(config.state_dir.join("run"))
        .map_err(|e| AgentError::StateDir(config.state_dir.clone(), e))?;
    let peers = TcpListener::bind(config.peer_listen)
        .await
        .map_err(|e| AgentError::PeerListen(config.peer_listen, e))?;
    let agent = Agent::new(config)?;
    agent.reattach().await;
    let api = api::serve(agent.clone()).await?;
    tracing::info!(
        agent = %agent.config.name,
        peers = %peers.local_addr().map(|a| a.to_string()).unwrap_or_default(),
        api = ?agent.config.api,
        "tern agent ready"
    );
    let peer_loop = {
        let agent = agent.clone();
        async move {
            loop {
                match peers.accept().await {
                    Ok((tcp, addr)) => {
                        let agent = agent.clone();
                        tokio::spawn(async move {
                            let shake = agent
                                .security
                                .accept(
                                    tcp,
                                    addr,
                                    std::time::Duration::from_secs(10),
                                    agent.config.stall_timeout,
                                )
                                .await;
                            match shake {
                                Ok((stream, peer)) => {
                                    migrate::dest::serve_peer(agent, stream, addr, peer).await
                                }
                                Err(e) => {
                                    tracing::warn!(peer = %addr, "peer refused: {}", migrate::source::error_chain(&e))
                                }
                            }
                        });
                    }
                    Err(e) => tracing::warn!("peer accept failed: {e}"),
                }
            }
        }
    };
    tokio::select! {
        _ = peer_loop => {}
        _ = api => {}
        _ = shutdown => {}
    }
    tracing::info!(
        vms = agent.vms().len(),
        "tern agent shutting down; its VMs keep running"
    );
    if let ApiAddr::Unix(p) = &agent.config.api {
        let _ = std::fs::remove_file(p);
    }
    Ok(())
}

//! Agents for tests: real `tern agent` processes on this machine, each with its own state
//! directory, API socket and peer port, killed when dropped. Also the lock that keeps
//! end-to-end tests from running more than one migration (two guests) at a time.

use std::io::Read;
use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use serde_json::{json, Value};
use tern_api::client::{Client, Endpoint};
use tern_api::MigrationStatus;

/// Serialises end-to-end tests: at most two guests run at once on a 2-core machine.
pub fn e2e_lock() -> MutexGuard<'static, ()> {
    static LOCK: Mutex<()> = Mutex::new(());
    LOCK.lock().unwrap_or_else(|p| p.into_inner())
}

pub struct TestAgent {
    pub name: String,
    pub dir: tempfile::TempDir,
    /// Where VM run directories live (`dir` unless the agent took over another's).
    pub state_dir: PathBuf,
    pub api: PathBuf,
    pub peer_addr: SocketAddr,
    /// Its certificate and key (a successor keeps them, as a restarted agent does).
    pub tls_dir: PathBuf,
    pub log: PathBuf,
    child: Option<Child>,
    pub client: Client,
}

/// A TCP port free on the loopback now (for an agent's `--listen`, `--control-listen`,
/// `--metrics-listen`; another process may take it before the agent binds it).
pub fn free_port() -> Result<u16> {
    let l = TcpListener::bind("127.0.0.1:0")?;
    Ok(l.local_addr()?.port())
}

/// Where and how to run a test agent.
/// The cluster key file every test agent uses unless told otherwise.
pub const TEST_CLUSTER_KEY: &str = "/tmp/tern-test-cluster.key";

#[derive(Default)]
pub struct AgentOptions<'a> {
    pub env: &'a [(&'a str, &'a str)],
    /// Run inside this network namespace (see [`WanLab`]); the API socket stays reachable.
    pub netns: Option<&'a str>,
    /// Peer listener; a free loopback port if unset.
    pub listen: Option<SocketAddr>,
    /// Extra `tern agent` arguments.
    pub args: &'a [&'a str],
    /// Reuse another agent's state directory (an agent restart); a fresh one if unset.
    pub state_dir: Option<&'a Path>,
    /// Host labels in the agent's certificate (from the shared test CA).
    pub labels: &'a [&'a str],
    /// TLS credentials to use instead of a certificate from the shared test CA.
    pub tls_dir: Option<&'a Path>,
    /// Run inside this mount namespace (`/proc/PID/ns/mnt`, e.g. a
    /// [`crate::libvirt::LibvirtHost`]'s), and in `netns` when that is set too.
    pub mountns: Option<&'a Path>,
}

/// The CA every test agent's certificate comes from unless told otherwise.
pub const TEST_CA: &str = "/tmp/tern-test-ca";

/// A CA directory made once (concurrent callers agree on one).
pub fn test_ca(dir: &Path) -> Result<PathBuf> {
    if !dir.join(tern_agent::pki::CA_CERT).exists() {
        let tmp = tempfile::Builder::new()
            .prefix("tern-ca-")
            .tempdir_in(dir.parent().unwrap_or(Path::new("/tmp")))?;
        tern_agent::pki::init_ca(tmp.path(), "test")?;
        // the first rename wins; the others use its CA
        if std::fs::rename(tmp.path(), dir).is_ok() {
            std::mem::forget(tmp);
        }
    }
    Ok(dir.to_path_buf())
}

/// Issues a certificate for an agent dialled at `ip`, into `out`.
pub fn issue_cert(
    ca: &Path,
    name: &str,
    ip: std::net::IpAddr,
    labels: &[&str],
    out: &Path,
) -> Result<()> {
    tern_agent::pki::issue(
        ca,
        &tern_agent::pki::IssueRequest {
            host: ip.to_string(),
            dns: vec![name.to_string()],
            labels: labels.iter().map(|l| l.to_string()).collect(),
            days: 2,
            ..Default::default()
        },
        out,
    )?;
    Ok(())
}

impl TestAgent {
    /// Starts `tern agent` (binary `bin`) with extra environment, and waits for its API.
    pub fn start(bin: &Path, name: &str, env: &[(&str, &str)]) -> Result<TestAgent> {
        Self::start_with(
            bin,
            name,
            AgentOptions {
                env,
                ..Default::default()
            },
        )
    }

    /// An agent restart: a new `tern agent` process with this one's name, state directory,
    /// certificate and peer address (default options otherwise), after this one stopped or
    /// died.
    pub fn successor(&self, bin: &Path) -> Result<TestAgent> {
        Self::start_with(
            bin,
            &self.name,
            AgentOptions {
                state_dir: Some(&self.state_dir),
                tls_dir: Some(&self.tls_dir),
                listen: Some(self.peer_addr),
                ..Default::default()
            },
        )
    }

    pub fn start_with(bin: &Path, name: &str, o: AgentOptions<'_>) -> Result<TestAgent> {
        let env = o.env;
        let dir = tempfile::Builder::new()
            .prefix("tern-")
            .tempdir_in("/tmp")?;
        let api = dir.path().join("api.sock");
        let peer_addr: SocketAddr = match o.listen {
            Some(a) => a,
            None => format!("127.0.0.1:{}", free_port()?).parse()?,
        };
        let log = dir.path().join("agent.log");
        let logf = std::fs::File::create(&log)?;
        let state_dir = o
            .state_dir
            .map(Path::to_path_buf)
            .unwrap_or_else(|| dir.path().to_path_buf());
        // ip netns exec NS  nsenter --mount=MNT --  BIN, each part when asked for
        let mut argv: Vec<std::ffi::OsString> = Vec::new();
        if let Some(ns) = o.netns {
            argv.extend(["ip", "netns", "exec", ns].map(Into::into));
        }
        if let Some(mnt) = o.mountns {
            argv.push("nsenter".into());
            argv.push(format!("--mount={}", mnt.display()).into());
            argv.push("--".into());
        }
        // absolute: nsenter starts the agent in the namespace's working directory
        argv.push(
            std::fs::canonicalize(bin)
                .unwrap_or_else(|_| bin.to_path_buf())
                .into(),
        );
        let mut cmd = Command::new(&argv[0]);
        cmd.args(&argv[1..]);
        cmd.args(["agent", "--name", name, "--listen", &peer_addr.to_string()])
            .args(o.args);
        if !o.args.contains(&"--cluster-key") {
            // one cluster: every test agent shares a key (created by the first agent)
            cmd.args(["--cluster-key", TEST_CLUSTER_KEY]);
        }
        if !o.args.contains(&"--boot-dir") {
            // incoming test VMs boot the test guest (guest/build.sh's cache)
            cmd.arg("--boot-dir")
                .arg(crate::guest::repo_root()?.join(".cache/guest"));
        }
        let tls_dir = match o.tls_dir {
            Some(d) => d.to_path_buf(),
            None => {
                let d = dir.path().join("tls");
                issue_cert(
                    &test_ca(Path::new(TEST_CA))?,
                    name,
                    peer_addr.ip(),
                    o.labels,
                    &d,
                )?;
                d
            }
        };
        if !o.env.iter().any(|(k, _)| *k == "TERN_INSECURE_PLAINTEXT") {
            cmd.arg("--tls-dir").arg(&tls_dir);
        }
        cmd.arg("--state-dir")
            .arg(&state_dir)
            .arg("--api")
            .arg(format!("unix:{}", api.display()))
            // TERN_AGENT_LOG (a tracing filter) asks for more, e.g. to see why a bench hangs
            .env(
                "TERN_LOG",
                std::env::var("TERN_AGENT_LOG").unwrap_or_else(|_| "info,tern_agent=debug".into()),
            )
            .stdin(Stdio::null())
            .stdout(logf.try_clone()?)
            .stderr(logf);
        for (k, v) in env {
            cmd.env(k, v);
        }
        let child = cmd
            .spawn()
            .with_context(|| format!("spawning {}", bin.display()))?;
        let client = Client::new(Endpoint::Unix(api.display().to_string()));
        let mut a = TestAgent {
            name: name.into(),
            dir,
            state_dir,
            api,
            peer_addr,
            tls_dir,
            log,
            child: Some(child),
            client,
        };
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if a.client.call("GET", "/v1/agent", None).is_ok() {
                return Ok(a);
            }
            if let Some(st) = a.child.as_mut().and_then(|c| c.try_wait().ok().flatten()) {
                bail!(
                    "agent {name} exited ({st}) before serving its API:\n{}",
                    a.log_text()
                );
            }
            if Instant::now() > deadline {
                bail!(
                    "agent {name} did not serve its API within 20 s:\n{}",
                    a.log_text()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(|c| c.id())
    }

    /// SIGTERM and wait: the agent exits, its VMs keep running (a restart or upgrade).
    pub fn terminate(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = Command::new("kill")
                .arg("-TERM")
                .arg(c.id().to_string())
                .status();
            let _ = c.wait();
        }
    }

    /// SIGKILL, as a crash would (its VMs keep running).
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    pub fn call(&self, method: &str, path: &str, body: Option<&Value>) -> Result<Value> {
        Ok(self.client.call(method, path, body)?)
    }

    pub fn start_vm(&self, spec_toml: &str) -> Result<Value> {
        self.call("POST", "/v1/vms", Some(&json!({ "spec_toml": spec_toml })))
    }

    pub fn vms(&self) -> Result<Vec<Value>> {
        Ok(self
            .call("GET", "/v1/vms", None)?
            .as_array()
            .cloned()
            .unwrap_or_default())
    }

    pub fn vm(&self, name: &str) -> Result<Value> {
        self.call("GET", &format!("/v1/vms/{name}"), None)
    }

    pub fn qmp(&self, vm: &str, command: &str, arguments: Option<Value>) -> Result<Value> {
        self.call(
            "POST",
            &format!("/v1/vms/{vm}/qmp"),
            Some(&json!({ "execute": command, "arguments": arguments })),
        )
    }

    /// The guest's physical memory `[0, size)` saved to `path` (a new file) by the agent.
    pub fn save_memory(&self, vm: &str, size: u64, path: &Path) -> Result<()> {
        self.call(
            "POST",
            &format!("/v1/vms/{vm}/memory"),
            Some(&json!({ "path": path, "size": size })),
        )?;
        Ok(())
    }

    /// The VM's run state as QEMU reports it (`running`, `paused`, ...).
    /// Where VM `vm`'s console is logged on this agent.
    pub fn console_log(&self, vm: &str) -> Result<PathBuf> {
        let v = self.vm(vm)?;
        Ok(PathBuf::from(
            v["console_log"]
                .as_str()
                .context("console_log in the VM's info")?,
        ))
    }

    pub fn vm_status(&self, vm: &str) -> Result<String> {
        let v = self.qmp(vm, "query-status", None)?;
        Ok(v["status"].as_str().unwrap_or_default().to_string())
    }

    pub fn migrations(&self) -> Result<Vec<MigrationStatus>> {
        Ok(serde_json::from_value(self.call(
            "GET",
            "/v1/migrations",
            None,
        )?)?)
    }

    /// Starts a migration and returns its id.
    pub fn start_migration(&self, vm: &str, to: &str, extra: Value) -> Result<String> {
        let mut body = json!({ "to": to });
        if let (Some(b), Some(e)) = (body.as_object_mut(), extra.as_object()) {
            for (k, v) in e {
                b.insert(k.clone(), v.clone());
            }
        }
        let v = self.call("POST", &format!("/v1/vms/{vm}/migrate"), Some(&body))?;
        Ok(v["id"].as_str().context("no migration id")?.to_string())
    }

    pub fn migration(&self, id: &str) -> Result<MigrationStatus> {
        Ok(serde_json::from_value(self.call(
            "GET",
            &format!("/v1/migrations/{id}"),
            None,
        )?)?)
    }

    /// Polls a migration until it finishes (bounded).
    pub fn wait_migration(&self, id: &str, within: Duration) -> Result<MigrationStatus> {
        let deadline = Instant::now() + within;
        loop {
            let s = self.migration(id)?;
            if s.finished {
                return Ok(s);
            }
            if Instant::now() > deadline {
                bail!("migration {id} still {} after {within:?}", s.phase);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Run directories this agent still has (each VM instance has one).
    pub fn run_dirs(&self) -> Vec<PathBuf> {
        std::fs::read_dir(self.state_dir.join("run"))
            .map(|d| d.filter_map(|e| e.ok().map(|e| e.path())).collect())
            .unwrap_or_default()
    }
}

impl Drop for TestAgent {
    fn drop(&mut self) {
        // VMs outlive their agent: stop them first so no test leaves a QEMU behind.
        if self.child.is_some() {
            for vm in self.vms().unwrap_or_default() {
                if let Some(n) = vm["name"].as_str() {
                    let _ = self.call("DELETE", &format!("/v1/vms/{n}"), None);
                }
            }
        }
        if let Some(mut c) = self.child.take() {
            // SIGTERM lets the agent stop its VMs; SIGKILL if it does not within 10 s.
            let _ = Command::new("kill")
                .arg("-TERM")
                .arg(c.id().to_string())
                .status();
            let deadline = Instant::now() + Duration::from_secs(10);
            while Instant::now() < deadline {
                if let Ok(Some(_)) = c.try_wait() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// The WAN lab of `scripts/wan.sh` (namespaces tern-a 198.18.0.1, tern-b 198.18.0.2,
/// joined through tern-sw), torn down when dropped.
pub struct WanLab;

impl WanLab {
    pub fn up(profile: &str) -> Result<WanLab> {
        wan_sh(&["up", profile])?;
        Ok(WanLab)
    }

    /// Two agents (`bin`), host-a in tern-a on 198.18.0.1:7700 and host-b in tern-b on
    /// 198.18.0.2:7700, with default options.
    pub fn agents(&self, bin: &Path) -> Result<(TestAgent, TestAgent)> {
        let agent = |name, ns, ip: &str| -> Result<TestAgent> {
            TestAgent::start_with(
                bin,
                name,
                AgentOptions {
                    netns: Some(ns),
                    listen: Some(format!("{ip}:7700").parse()?),
                    ..Default::default()
                },
            )
        };
        Ok((
            agent("host-a", "tern-a", "198.18.0.1")?,
            agent("host-b", "tern-b", "198.18.0.2")?,
        ))
    }

    /// Bytes through host A's side of the link so far (received + sent, headers
    /// included).
    pub fn link_bytes() -> Result<u64> {
        let out = Command::new("ip")
            .args(["-n", "tern-a", "-j", "-s", "link", "show", "a-up"])
            .output()?;
        let v: Value = serde_json::from_slice(&out.stdout).context("ip -j -s link")?;
        let s = &v[0]["stats64"];
        Ok(s["rx"]["bytes"].as_u64().unwrap_or(0) + s["tx"]["bytes"].as_u64().unwrap_or(0))
    }

    /// Takes host B's link down (`false`) or up again (`true`), at the switch.
    pub fn link_b(&self, up: bool) -> Result<()> {
        let st = Command::new("ip")
            .args([
                "-n",
                "tern-sw",
                "link",
                "set",
                "sw-b",
                if up { "up" } else { "down" },
            ])
            .status()?;
        if !st.success() {
            bail!("ip link set sw-b failed");
        }
        Ok(())
    }
}

impl Drop for WanLab {
    fn drop(&mut self) {
        let _ = wan_sh(&["down"]);
    }
}

/// Runs `scripts/wan.sh ARGS` to its end.
fn wan_sh(args: &[&str]) -> Result<()> {
    let out = Command::new("bash")
        .arg(crate::guest::repo_root()?.join("scripts/wan.sh"))
        .args(args)
        .output()?;
    if !out.status.success() {
        bail!(
            "wan.sh {} failed: {}{}",
            args.join(" "),
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(())
}

/// The routed lab of `scripts/wan.sh routed`: hosts tern-a 198.18.1.1, tern-b 198.18.2.1
/// and tern-c 198.18.3.1, each in its own subnet behind the router tern-sw (which carries
/// the profile's rate and delay), torn down when dropped.
pub struct RoutedWan;

impl RoutedWan {
    /// The hosts' namespaces, A, B, C.
    pub const HOSTS: [&'static str; 3] = ["tern-a", "tern-b", "tern-c"];

    pub fn up(profile: &str) -> Result<RoutedWan> {
        wan_sh(&["routed", profile])?;
        Ok(RoutedWan)
    }

    /// Host `i`'s address (0: A, 1: B, 2: C), its VTEP and its agent's.
    pub fn address(i: usize) -> std::net::Ipv4Addr {
        std::net::Ipv4Addr::new(198, 18, i as u8 + 1, 1)
    }

    /// Host `i`'s agent (`bin`, named host-a, host-b, host-c), listening on its address
    /// port 7700, serving overlay network `network` with the other two hosts as VXLAN
    /// peers; `args` go after those, on `state_dir` if given (a restart).
    pub fn agent(
        &self,
        bin: &Path,
        i: usize,
        network: &str,
        args: &[&str],
        env: &[(&str, &str)],
    ) -> Result<TestAgent> {
        let me = Self::address(i).to_string();
        let mut all: Vec<String> = vec!["--vtep".into(), me.clone()];
        for j in (0..3).filter(|&j| j != i) {
            all.push("--vxlan-peer".into());
            all.push(Self::address(j).to_string());
        }
        all.push("--network".into());
        all.push(network.into());
        all.extend(args.iter().map(|a| a.to_string()));
        let all: Vec<&str> = all.iter().map(String::as_str).collect();
        TestAgent::start_with(
            bin,
            ["host-a", "host-b", "host-c"][i],
            AgentOptions {
                netns: Some(Self::HOSTS[i]),
                listen: Some(format!("{me}:7700").parse()?),
                args: &all,
                env,
                ..Default::default()
            },
        )
    }
}

impl Drop for RoutedWan {
    fn drop(&mut self) {
        let _ = wan_sh(&["down"]);
    }
}

/// The rate between two instants, bytes/s, of a running count sampled as (when, total so
/// far), in time order: the last sample at or before each instant counts.
pub fn rate_between(samples: &[(Instant, u64)], from: Instant, to: Instant) -> f64 {
    let at = |t: Instant| {
        samples
            .iter()
            .take_while(|x| x.0 <= t)
            .last()
            .map_or(0, |x| x.1)
    };
    at(to).saturating_sub(at(from)) as f64 / to.duration_since(from).as_secs_f64().max(1e-3)
}

/// Other traffic on the WAN lab's link: one bulk TCP flow from tern-a to tern-b (socat,
/// `/dev/zero` into a socket), and what arrived at tern-b, counted as it comes. Stopped
/// (both ends killed) when dropped.
pub struct CrossTraffic {
    sender: Option<Child>,
    receiver: Child,
    arrivals: Arc<Mutex<Vec<(Instant, u64)>>>,
}

impl CrossTraffic {
    /// Starts the flow to 198.18.0.2:`port`.
    pub fn start(port: u16) -> Result<CrossTraffic> {
        let mut receiver = Command::new("ip")
            .args(["netns", "exec", "tern-b", "socat", "-u"])
            .arg(format!("TCP-LISTEN:{port},bind=198.18.0.2,reuseaddr"))
            .arg("STDOUT")
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .context("socat (bash scripts/setup.sh installs it)")?;
        let mut out = receiver.stdout.take().context("socat stdout")?;
        let arrivals = Arc::new(Mutex::new(vec![(Instant::now(), 0u64)]));
        let log = arrivals.clone();
        std::thread::spawn(move || {
            let mut buf = vec![0u8; 1 << 16];
            let mut total = 0u64;
            while let Ok(n) = out.read(&mut buf) {
                if n == 0 {
                    break;
                }
                total += n as u64;
                log.lock().unwrap().push((Instant::now(), total));
            }
        });
        // the listener may not be up yet: socat retries the connect
        let sender = Command::new("ip")
            .args(["netns", "exec", "tern-a", "socat", "-u", "/dev/zero"])
            .arg(format!("TCP:198.18.0.2:{port},retry=100,interval=0.05"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()?;
        Ok(CrossTraffic {
            sender: Some(sender),
            receiver,
            arrivals,
        })
    }

    /// Bytes that arrived so far.
    pub fn received(&self) -> u64 {
        self.arrivals.lock().unwrap().last().map_or(0, |a| a.1)
    }

    /// The flow's rate between two instants, bytes/s.
    pub fn rate(&self, from: Instant, to: Instant) -> f64 {
        rate_between(&self.arrivals.lock().unwrap(), from, to)
    }

    /// Stops sending (the receiver stays, so what was counted stays readable).
    pub fn stop_sending(&mut self) {
        if let Some(mut s) = self.sender.take() {
            let _ = s.kill();
            let _ = s.wait();
        }
    }
}

impl Drop for CrossTraffic {
    fn drop(&mut self) {
        self.stop_sending();
        let _ = self.receiver.kill();
        let _ = self.receiver.wait();
    }
}

/// Whether a process with this pid still exists (and is not a zombie).
pub use tern_agent::vm::process_alive as pid_alive;

/// Waits until `text` appears in the file (a guest console), returning the file's text.
/// The guest's dirtier (`tern.workload=dirty`) goes on and its checker finds every page:
/// two fresh `tern-dirty pass` lines and no `TERN-CORRUPT` after `since` bytes of
/// `console`, within 60 s.
pub fn checker_clean(console: &Path, since: usize) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let text = std::fs::read_to_string(console).unwrap_or_default();
        let fresh = text.get(since..).unwrap_or("");
        if fresh.contains("TERN-CORRUPT") {
            bail!("the guest lost pages:\n{fresh}");
        }
        if fresh.matches("tern-dirty pass").count() >= 2 {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("the guest's dirtier did not go on: {}", tail(&text, 1000));
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// The WAN lab (wan-1g-20ms) with an agent (binary `bin`) on each side that notices a
/// dead link after 4 s (`--stall-timeout-secs`), for the tests that cut it
/// ([`WanLab::link_b`]).
pub fn lab_agents(bin: &Path) -> Result<(WanLab, TestAgent, TestAgent)> {
    let lab = WanLab::up("wan-1g-20ms")?;
    let stall = ["--stall-timeout-secs", "4"];
    let start = |name, ns, ip: &str| -> Result<TestAgent> {
        TestAgent::start_with(
            bin,
            name,
            AgentOptions {
                netns: Some(ns),
                listen: Some(ip.parse()?),
                args: &stall,
                ..Default::default()
            },
        )
    };
    let a = start("host-a", "tern-a", "198.18.0.1:7700")?;
    let b = start("host-b", "tern-b", "198.18.0.2:7700")?;
    Ok((lab, a, b))
}

/// The guest's random dirtier (`tern.workload=random`) goes on and its checker finds every
/// page: two more `tern-random pass` lines than `console` has now, and no `TERN-CORRUPT` in
/// all of it, within 60 s.
pub fn random_dirtier_runs_on(console: &Path) -> Result<()> {
    let lines = |t: &str| t.matches("tern-random pass").count();
    let start = lines(&std::fs::read_to_string(console).unwrap_or_default());
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let text = std::fs::read_to_string(console).unwrap_or_default();
        if text.contains("TERN-CORRUPT") {
            bail!("the guest lost pages:\n{text}");
        }
        if lines(&text) >= start + 2 {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("the guest made no progress:\n{}", tail(&text, 2000));
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

pub fn wait_for_text(path: &Path, text: &str, within: Duration) -> Result<String> {
    let deadline = Instant::now() + within;
    loop {
        let s = String::from_utf8_lossy(&std::fs::read(path).unwrap_or_default()).into_owned();
        if s.contains(text) {
            return Ok(s);
        }
        if Instant::now() > deadline {
            bail!(
                "{text:?} did not appear in {} within {within:?}; it ends with:\n{}",
                path.display(),
                tail(&s, 2000)
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

pub fn tail(s: &str, n: usize) -> &str {
    let mut start = s.len().saturating_sub(n);
    while !s.is_char_boundary(start) {
        start += 1;
    }
    &s[start..]
}

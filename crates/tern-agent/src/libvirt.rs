//! libvirt domains whose migration tern carries (`tern migrate --libvirt DOMAIN`). libvirt
//! keeps managing both QEMUs and runs the migration itself; this agent starts it with
//! `virsh migrate --live DOMAIN DEST --migrateuri unix://DIR/DOMAIN.sock`, takes the stream
//! on the domain's carrier socket (`tern_engine::libvirt`) and hands it to the engine,
//! which carries it to the destination agent like any other (encoding, TLS, digest check
//! before the destination QEMU gets its device state). libvirt's outcome decides where
//! the domain runs; a failure on tern's side closes the stream, so libvirt's migration
//! fails and the domain stays running at the source, as libvirt does for any failure.
//! With `copy_storage`, libvirt copies the domain's local disks too (`--copy-storage-all
//! --disks-uri unix://DIR/DOMAIN.disks.sock`): each NBD connection its QEMU opens there is
//! carried to the destination agent through a storage tunnel ([`StorageTunnels`]).

use std::process::Stdio;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tern_api::LibvirtMigrateRequest;
use tern_engine::libvirt::{Carrier, CarrierError};
use tern_engine::source::{SourceOutcome, SourceQemu, SourceVm};
use tern_engine::MigrationHandle;
use tern_proto::ErrorCode;
use tern_qemu::spec::{LibvirtDomain, VmSpec};

use tokio::process::Command;

use crate::Agent;

/// How long libvirt may take from `virsh migrate` to its QEMU connecting (libvirt prepares
/// the destination, starting its QEMU, first).
const CONNECT_WITHIN: Duration = Duration::from_secs(90);
/// How long `virsh migrate` may take to report once the stream is through (libvirt's
/// Finish and Confirm phases).
const FINISH_WITHIN: Duration = Duration::from_secs(120);
/// A query of libvirt (`virsh dominfo`, `version`, `domstate`).
const QUERY_WITHIN: Duration = Duration::from_secs(30);

/// Why libvirt could not be asked, or said no.
#[derive(Debug, thiserror::Error)]
pub enum LibvirtError {
    #[error("cannot run virsh (install libvirt-clients)")]
    Spawn(#[source] std::io::Error),
    #[error("virsh {what} did not answer within {within:?}")]
    Timeout { what: String, within: Duration },
    #[error("virsh {what} failed: {stderr}")]
    Failed { what: String, stderr: String },
    #[error("libvirt domain {domain:?} is {state}, not running: tern carries live migrations of running domains")]
    NotRunning { domain: String, state: String },
    #[error("virsh dominfo {0:?} gave no memory size")]
    NoMemory(String),
    #[error("libvirt domain {domain:?} has {mib} MiB of memory: tern carries domains of 16 MiB to 1 TiB")]
    BadMemory { domain: String, mib: u64 },
    #[error(transparent)]
    Carrier(#[from] CarrierError),
}

/// What the migration needs to know of a domain before it starts.
pub struct Domain {
    pub name: String,
    pub memory_mib: u32,
    pub qemu_version: String,
}

/// `virsh -c URI ARGS`, its stdout (text, `LC_ALL=C`).
async fn virsh(uri: &str, args: &[&str], within: Duration) -> Result<String, LibvirtError> {
    let what = args.first().copied().unwrap_or_default().to_string();
    let out = Command::new("virsh")
        .arg("-c")
        .arg(uri)
        .args(args)
        .env("LC_ALL", "C")
        .stdin(Stdio::null())
        .kill_on_drop(true)
        .output();
    let out = tokio::time::timeout(within, out)
        .await
        .map_err(|_| LibvirtError::Timeout {
            what: what.clone(),
            within,
        })?
        .map_err(LibvirtError::Spawn)?;
    if !out.status.success() {
        return Err(LibvirtError::Failed {
            what,
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        });
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// The domain, running here, as libvirt describes it.
pub async fn domain(uri: &str, name: &str) -> Result<Domain, LibvirtError> {
    if !LibvirtDomain::valid_name(name) {
        return Err(CarrierError::BadName(name.into()).into());
    }
    let info = virsh(uri, &["dominfo", name], QUERY_WITHIN).await?;
    let field = |key: &str| {
        info.lines()
            .find_map(|l| l.strip_prefix(key))
            .map(|v| v.trim().to_string())
    };
    let state = field("State:").unwrap_or_default();
    if state != "running" {
        return Err(LibvirtError::NotRunning {
            domain: name.into(),
            state,
        });
    }
    let kib: u64 = field("Max memory:")
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .ok_or_else(|| LibvirtError::NoMemory(name.into()))?;
    let mib = kib.div_ceil(1024);
    let memory_mib = u32::try_from(mib)
        .ok()
        .filter(|m| (16..=1_048_576).contains(m))
        .ok_or(LibvirtError::BadMemory {
            domain: name.into(),
            mib,
        })?;
    let version = virsh(uri, &["version"], QUERY_WITHIN).await?;
    let qemu_version = version
        .lines()
        .find_map(|l| l.strip_prefix("Running hypervisor: QEMU "))
        .map(|v| v.trim().to_string())
        .unwrap_or_else(|| "unknown".into());
    Ok(Domain {
        name: name.into(),
        memory_mib,
        qemu_version,
    })
}

/// The storage tunnels of one carried migration: every NBD connection the domain's QEMU
/// opens on its storage socket, carried to the destination agent until it closes.
/// [`StorageTunnels::stop`] ends them and says what they carried; dropped, they end at
/// once (and the socket goes).
struct StorageTunnels {
    path: std::path::PathBuf,
    task: tokio::task::JoinHandle<()>,
    stop: Arc<tokio::sync::Notify>,
    totals: Arc<TunnelTotals>,
}

#[derive(Default)]
struct TunnelTotals {
    /// Tunnels that opened.
    opened: AtomicU32,
    to_destination: AtomicU64,
    /// Frames both ways on the tunnels' connections.
    wire: AtomicU64,
    /// The first tunnel that failed, and why (libvirt's mirror then fails with less to say).
    failure: parking_lot::Mutex<Option<String>>,
}

/// A wait bounded by other means (virsh's end, cancellation, the migration's end).
const NO_DEADLINE: Duration = Duration::from_secs(24 * 3600);

/// How long tunnels still open at the end may take to close.
const TUNNELS_CLOSE_WITHIN: Duration = Duration::from_secs(10);

impl StorageTunnels {
    fn start(agent: &Arc<Agent>, carrier: Carrier, to: &str, spec: &VmSpec) -> StorageTunnels {
        let totals = Arc::new(TunnelTotals::default());
        let stop = Arc::new(tokio::sync::Notify::new());
        let path = carrier.path().to_path_buf();
        let (agent, to, spec, t, stopped) = (
            agent.clone(),
            to.to_string(),
            spec.clone(),
            totals.clone(),
            stop.clone(),
        );
        let task = tokio::spawn(async move {
            let mut running = tokio::task::JoinSet::new();
            loop {
                let qemu = tokio::select! {
                    s = carrier.accept(NO_DEADLINE) => s,
                    Some(_) = running.join_next() => continue,
                    () = stopped.notified() => break,
                };
                let qemu = match qemu {
                    Ok(s) => s,
                    Err(e @ CarrierError::NoConnection { .. }) => {
                        tracing::warn!("storage socket: {}", tern_engine::error_chain(&e));
                        break;
                    }
                    // (a pid file between two states, no file descriptor left: the
                    // tunnels already open go on)
                    Err(e) => {
                        tracing::warn!("storage socket: {}", tern_engine::error_chain(&e));
                        tokio::time::sleep(Duration::from_millis(200)).await;
                        continue;
                    }
                };
                let (agent, to, spec, t) = (agent.clone(), to.clone(), spec.clone(), t.clone());
                running.spawn(async move {
                    let opened = || {
                        t.opened.fetch_add(1, Ordering::Relaxed);
                    };
                    match tern_engine::tunnel::carry_out(
                        &agent.engine,
                        &*agent.host(),
                        &to,
                        &spec,
                        opened,
                        qemu,
                    )
                    .await
                    {
                        Ok(b) => {
                            t.to_destination
                                .fetch_add(b.to_destination, Ordering::Relaxed);
                            t.wire
                                .fetch_add(b.wire_sent + b.wire_received, Ordering::Relaxed);
                            tracing::info!(
                                to_destination = b.to_destination,
                                to_source = b.to_source,
                                wire_sent = b.wire_sent,
                                wire_received = b.wire_received,
                                "storage tunnel ended"
                            );
                        }
                        // the QEMU's connection closes with the task: libvirt's mirror
                        // fails, and the migration's error says why
                        Err(e) => {
                            let why = tern_engine::error_chain(&e);
                            tracing::warn!("storage tunnel failed: {why}");
                            t.failure.lock().get_or_insert(why);
                        }
                    }
                });
            }
            drop(carrier); // no new tunnel; the socket goes
            let close = async { while running.join_next().await.is_some() {} };
            if tokio::time::timeout(TUNNELS_CLOSE_WITHIN, close)
                .await
                .is_err()
            {
                tracing::warn!(
                    "storage tunnels still open {TUNNELS_CLOSE_WITHIN:?} after the migration: closed"
                );
            }
        });
        StorageTunnels {
            path,
            task,
            stop,
            totals,
        }
    }

    /// Why a tunnel failed, if one did.
    fn failure(&self) -> Option<String> {
        self.totals.failure.lock().clone()
    }

    /// Takes no new tunnel, lets the open ones close (bounded) and says what they carried
    /// and why one failed, if one did.
    async fn stop(mut self) -> (tern_api::DiskReport, Option<String>) {
        self.stop.notify_one();
        let _ = (&mut self.task).await;
        let t = &self.totals;
        let report = tern_api::DiskReport {
            disks: t.opened.load(Ordering::Relaxed),
            sent_bytes: t.to_destination.load(Ordering::Relaxed),
            wire_bytes: t.wire.load(Ordering::Relaxed),
            ..Default::default()
        };
        (report, self.failure())
    }
}

impl Drop for StorageTunnels {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// A finished migration as libvirt measured it.
pub struct CompletedJob {
    pub downtime_ms: Option<u64>,
    pub total_ms: Option<u64>,
}

/// `virsh domjobinfo --completed` at `uri` (the destination's libvirt keeps the incoming
/// migration's statistics).
async fn completed_job(uri: &str, name: &str) -> Option<CompletedJob> {
    let text = virsh(uri, &["domjobinfo", "--completed", name], QUERY_WITHIN)
        .await
        .map_err(|e| tracing::debug!("no job statistics from libvirt: {e}"))
        .ok()?;
    Some(parse_job(&text))
}

/// `virsh domjobinfo --completed`'s text, read.
pub fn parse_job(text: &str) -> CompletedJob {
    let ms = |key: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(key))
            .and_then(|v| v.split_whitespace().next()?.parse().ok())
    };
    CompletedJob {
        downtime_ms: ms("Total downtime:"),
        total_ms: ms("Time elapsed:"),
    }
}

/// Where the domain is now, as this host's libvirt says (for a failure's report).
async fn state_here(uri: &str, name: &str) -> String {
    match virsh(uri, &["domstate", name], QUERY_WITHIN).await {
        Ok(s) => format!("{} on the source (libvirt)", s.trim()),
        Err(LibvirtError::Failed { .. }) => {
            "not on the source (libvirt does not know it here)".into()
        }
        Err(e) => format!("unknown ({e})"),
    }
}

/// The spec a carried domain travels with: its name, its memory (the destination's bound
/// on the RAM the stream may describe) and that libvirt runs it.
fn carried_spec(d: &Domain) -> Result<VmSpec, tern_qemu::spec::SpecError> {
    VmSpec::from_toml(&format!(
        "name = {name:?}\nmemory_mib = {}\n[libvirt]\ndomain = {name:?}\n",
        d.memory_mib,
        name = d.name
    ))
}

/// Runs the carried migration of `domain` to its end and records the outcome in `handle`.
pub async fn run(
    agent: Arc<Agent>,
    domain: Domain,
    req: LibvirtMigrateRequest,
    handle: Arc<MigrationHandle>,
) {
    let uri = agent.config.libvirt_uri.clone();
    let fail = |code: ErrorCode, message: String, state: String| {
        handle.finish_err(code, message, state);
    };
    // before virsh runs, a failure leaves everything as it was
    let refuse = |code: ErrorCode, e: &dyn std::error::Error| {
        fail(
            code,
            tern_engine::error_chain(e),
            "running on the source (nothing moved)".into(),
        );
    };
    let spec = match carried_spec(&domain) {
        Ok(s) => s,
        Err(e) => return refuse(ErrorCode::SpecRejected, &e),
    };
    let paths = &agent.config.libvirt_paths;
    let carrier = match Carrier::listen(paths, &domain.name) {
        Ok(c) => c,
        Err(e) => return refuse(ErrorCode::Internal, &e),
    };
    let tunnels = match req
        .copy_storage
        .then(|| Carrier::listen_disks(paths, &domain.name))
        .transpose()
    {
        Ok(c) => c.map(|c| StorageTunnels::start(&agent, c, &req.migrate.to, &spec)),
        Err(e) => return refuse(ErrorCode::Internal, &e),
    };
    let migrate_uri = format!("unix://{}", carrier.path().display());
    let mut cmd = Command::new("virsh");
    cmd.arg("-c")
        .arg(&uri)
        .args(["migrate", "--live", &domain.name, &req.libvirt_to])
        .arg("--migrateuri")
        .arg(&migrate_uri)
        .args(&req.virsh_flags)
        .env("LC_ALL", "C")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    if let Some(t) = &tunnels {
        cmd.arg("--copy-storage-all")
            .arg("--disks-uri")
            .arg(format!("unix://{}", t.path.display()));
    }
    tracing::info!(domain = %domain.name, to = %req.libvirt_to, %migrate_uri, disks = tunnels.is_some(), "virsh migrate");
    let virsh_run = match cmd.spawn() {
        Ok(c) => c.wait_with_output(),
        Err(e) => return refuse(ErrorCode::Internal, &LibvirtError::Spawn(e)),
    };
    let mut virsh_run = Box::pin(virsh_run);
    // libvirt prepares the destination, then its QEMU connects here; virsh ending first
    // means libvirt refused before any byte moved
    let mut cancel = handle.cancelled();
    // (with its disks, libvirt first copies them all: no bound but virsh's own end)
    let connect_within = if tunnels.is_some() {
        NO_DEADLINE
    } else {
        CONNECT_WITHIN
    };
    let stream = tokio::select! {
        s = carrier.accept(connect_within) => s,
        () = tern_engine::handle::wait_cancelled(&mut cancel) => {
            // virsh goes with its future (kill_on_drop): libvirt cancels the migration
            fail(
                ErrorCode::Cancelled,
                "cancelled before libvirt's QEMU connected".into(),
                state_here(&uri, &domain.name).await,
            );
            return;
        }
        out = &mut virsh_run => {
            let why = match out {
                Ok(o) => String::from_utf8_lossy(&o.stderr).trim().to_string(),
                Err(e) => e.to_string(),
            };
            let hint = match tunnels.as_ref().map(StorageTunnels::failure) {
                Some(Some(tunnel)) => format!(" (tern's storage tunnel failed: {tunnel})"),
                Some(None) => " (with --copy-storage the destination needs each of the domain's disk images at the same path and size; libvirt makes missing ones only through a storage pool)".into(),
                None => String::new(),
            };
            fail(
                ErrorCode::QemuFailed,
                format!("libvirt's migration failed before its QEMU connected to tern: {why}{hint}"),
                state_here(&uri, &domain.name).await,
            );
            return;
        }
    };
    let stream = match stream {
        Ok(s) => s,
        Err(e) => {
            // virsh goes with its future (kill_on_drop): libvirt cancels the migration
            fail(
                ErrorCode::Timeout,
                tern_engine::error_chain(&e),
                state_here(&uri, &domain.name).await,
            );
            return;
        }
    };
    drop(carrier); // one connection per migration; the socket file goes
    let vm = SourceVm {
        spec,
        qemu: SourceQemu::Libvirt(Some(stream)),
        run_dir: std::path::PathBuf::new(),
        qemu_version: domain.qemu_version.clone(),
        exited: tokio::sync::watch::channel(None).1,
        tpm_key: None,
        pid: agent.config.libvirt_paths.domain_pid(&domain.name).ok(),
        // a carried domain's stream is not recorded (libvirt restarts its domains)
        record: None,
    };
    let outcome = tern_engine::source::run(
        agent.engine.clone(),
        agent.host(),
        vm,
        req.migrate,
        handle.clone(),
        None,
    )
    .await;
    // libvirt has the last word: its Finish and Confirm phases run after the stream
    let libvirt = match tokio::time::timeout(FINISH_WITHIN, &mut virsh_run).await {
        Ok(Ok(o)) if o.status.success() => Ok(()),
        Ok(Ok(o)) => Err(String::from_utf8_lossy(&o.stderr).trim().to_string()),
        Ok(Err(e)) => Err(format!("waiting for virsh failed: {e}")),
        Err(_) => Err(format!(
            "virsh migrate did not end within {FINISH_WITHIN:?} of the stream's end"
        )),
    };
    // libvirt ended its mirrors (and their connections) before the switchover
    let (carried_disks, tunnel_failure) = match tunnels {
        Some(t) => {
            let (d, failure) = t.stop().await;
            (Some(d), failure)
        }
        None => (None, None),
    };
    let tunnel_note = tunnel_failure
        .map(|t| format!("; tern's storage tunnel failed: {t}"))
        .unwrap_or_default();
    match (outcome, libvirt) {
        (SourceOutcome::Moved(mut report), Ok(())) => {
            if let Some(d) = carried_disks {
                report.bytes_on_wire += d.wire_bytes;
                report.disk = Some(d);
            }
            // the whole of it, from virsh migrate on (the engine's clock starts when
            // libvirt's QEMU connected)
            report.total_time_ms = handle.started.elapsed().as_millis() as u64;
            // the guest's pause only libvirt saw: its destination's job statistics
            if let Some(j) = completed_job(&req.libvirt_to, &domain.name).await {
                report.downtime_ms = j.downtime_ms.unwrap_or(report.downtime_ms);
                report.qemu_downtime_ms = j.downtime_ms;
                report.qemu_total_time_ms = j.total_ms;
            }
            agent.vm_event(&domain.name, "left", None);
            handle.finish_ok(*report);
        }
        (SourceOutcome::Moved(_), Err(why)) => fail(
            ErrorCode::QemuFailed,
            format!("tern carried the whole stream and the digests agreed, but libvirt's migration failed: {why}{tunnel_note}"),
            state_here(&uri, &domain.name).await,
        ),
        (SourceOutcome::MovedAfterBug { message }, _) => fail(
            ErrorCode::Internal,
            message,
            state_here(&uri, &domain.name).await,
        ),
        (
            SourceOutcome::Failed { code, message, .. },
            libvirt,
        ) => {
            let libvirt = match libvirt {
                Ok(()) => "libvirt nevertheless reports success".to_string(),
                Err(why) => format!("libvirt: {why}"),
            };
            fail(
                code,
                format!("{message} ({libvirt}{tunnel_note})"),
                state_here(&uri, &domain.name).await,
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_carried_domain_travels_with_a_spec_that_names_it_and_launches_nothing() {
        let spec = carried_spec(&Domain {
            name: "web-1".into(),
            memory_mib: 2048,
            qemu_version: "10.0.2".into(),
        })
        .unwrap();
        assert_eq!(spec.name, "web-1");
        assert_eq!(spec.memory_mib, 2048);
        assert_eq!(spec.libvirt.as_ref().unwrap().domain, "web-1");
        assert!(spec.kernel.is_none() && spec.disks.is_empty() && !spec.tpm);
        // and it reads back the same at the destination
        assert_eq!(VmSpec::from_toml(&spec.to_toml()).unwrap(), spec);
    }

    #[test]
    fn libvirts_job_statistics_give_the_downtime() {
        // virsh domjobinfo --completed, libvirt 11.3, at the destination
        let text = "Job type:         Completed   \nOperation:        Incoming migration\nTime elapsed:     531          ms\nTime elapsed w/o network: 530          ms\nTotal downtime:   113          ms\nDowntime w/o network: 112          ms\n";
        let j = parse_job(text);
        assert_eq!(j.downtime_ms, Some(113));
        assert_eq!(j.total_ms, Some(531));
        let j = parse_job("Job type: None\n");
        assert_eq!((j.downtime_ms, j.total_ms), (None, None));
    }
}

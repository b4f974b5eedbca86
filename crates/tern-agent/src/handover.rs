//! Same-host moves the agent runs: `tern vm upgrade` (a new QEMU under this agent) and
//! `tern vm move --to-agent` (a new QEMU under another agent on this host), both through
//! [`tern_engine::local`]. For a move this agent is the sending half and calls the other
//! agent's local API (`/v1/handover`), which runs the receiving half; the commit is the
//! switchover record in the receiver's run directory, which the sender's upgrade mark
//! names, so either agent restarted at any point finds the VM in exactly one QEMU.

use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tern_api::client::{Client, Endpoint};
use tern_api::vm::{
    HandOverDone, HandOverReady, HandOverRequest, MoveLocalRequest, UpgradeReport, UpgradeRequest,
};
use tern_engine::local::{self, HandOverDir, LocalVm, UpgradeError, UpgradeFailed, UpgradeMark};
use tern_qemu::spec::{GuestMemory, VmSpec};
use tokio::sync::{mpsc, oneshot};
use tracing::Instrument;

use crate::vm::{StopMode, UpgradeVmError, Vm};
use crate::Agent;

/// How long a receiving agent waits for the sender's commit once its QEMU loaded the VM.
const COMMIT_WITHIN: Duration = Duration::from_secs(60);

/// What the sender tells a receiving hand-over.
pub(crate) enum HandOverCmd {
    Commit(oneshot::Sender<Result<HandOverDone, String>>),
    /// Answered (or dropped) once the hand-over is over: its QEMU gone, or committed.
    Abort(oneshot::Sender<()>),
}

impl HandOverCmd {
    /// An abort's reply (None for a commit).
    fn into_abort_reply(self) -> Option<oneshot::Sender<()>> {
        match self {
            HandOverCmd::Abort(reply) => Some(reply),
            HandOverCmd::Commit(_) => None,
        }
    }
}

/// A receiving hand-over that the sender aborted, or whose sender went away.
fn by_the_sender() -> UpgradeError {
    UpgradeError::Peer("aborted by the sender".into())
}

/// How long a receiving agent remembers why a hand-over failed (for the sender's commit).
const REMEMBER_FAILURE: Duration = Duration::from_secs(300);

/// A hand-over this agent receives: waiting for the sender's word, or failed (and why,
/// so the sender's commit gets the reason rather than "unknown").
pub(crate) enum HandOverSlot {
    Waiting(mpsc::Sender<HandOverCmd>),
    Failed { why: String, at: Instant },
}

/// Why a hand-over could not be received.
#[derive(Debug, thiserror::Error)]
pub enum ReceiveError {
    #[error("invalid VM spec")]
    Spec(#[from] tern_qemu::spec::SpecError),
    #[error("a VM named {0:?} already exists on this agent")]
    Exists(String),
    #[error("VM {0:?} does not have shared memory: it cannot be handed over")]
    NotShared(String),
    #[error("bad TPM migration key: {0}")]
    TpmKey(String),
    #[error(transparent)]
    Upgrade(#[from] UpgradeError),
    #[error("the hand-over {0:?} is not waiting here (it timed out, or it never was)")]
    Unknown(String),
    #[error("the hand-over {id:?} failed on this side: {why}")]
    Failed { id: String, why: String },
}

impl Agent {
    /// Continues VM `name` in a new QEMU process under this agent ([`local::upgrade`]):
    /// on success the VM's entry points at the new QEMU and the old one is stopped; on
    /// failure the old one runs the VM as before.
    pub async fn upgrade_vm(
        &self,
        name: &str,
        req: UpgradeRequest,
    ) -> Result<UpgradeReport, UpgradeVmError> {
        let vm = self.claim(name)?;
        let opts = local::UpgradeOptions {
            qemu_binary: req.qemu,
            qemu_user: self.config.qemu_user.clone(),
            fault: self.config.fault,
        };
        match local::upgrade(self, local_vm(&vm), &opts).await {
            Ok(up) => {
                let new = Arc::new(Vm::supervise(vm.spec.clone(), up.process));
                let new_dir = new.run_dir.clone();
                self.replace(name, new);
                self.retire(&vm).await;
                local::finish(&new_dir);
                self.vm_event(name, "upgraded", up.report.new_pid);
                tracing::info!(vm = name, downtime_ms = ?up.report.downtime_ms, new_qemu = %up.report.new_qemu_version, "upgraded to a new QEMU");
                Ok(up.report)
            }
            Err(e) => Err(self.failed(&vm, e)),
        }
    }

    /// Hands VM `name` to the agent at `req.agent` on this host: its new QEMU there takes
    /// the memory over. On success the VM is that agent's and this one forgets it.
    pub async fn move_vm_local(
        &self,
        name: &str,
        req: MoveLocalRequest,
    ) -> Result<UpgradeReport, UpgradeVmError> {
        let started = Instant::now();
        let vm = self.claim(name)?;
        let lv = local_vm(&vm);
        let untouched = |error| UpgradeFailed {
            error,
            vm_state: "the VM runs in its old QEMU, untouched".into(),
        };
        let running = match local::check_source(&lv).await {
            Ok(r) => r,
            Err(e) => return Err(self.failed(&vm, untouched(e))),
        };
        let peer = match Endpoint::parse(&req.agent) {
            Ok(e) => Client::new(e),
            Err(e) => return Err(self.failed(&vm, untouched(UpgradeError::Peer(e.to_string())))),
        };
        let tpm_key_hex = if vm.spec.tpm {
            match std::fs::read(tern_engine::tpm_migration_key_path(&vm.run_dir)) {
                Ok(k) => Some(hex::encode(k)),
                Err(source) => {
                    let e = UpgradeError::Files {
                        what: "the TPM migration key".into(),
                        source,
                    };
                    return Err(self.failed(&vm, untouched(e)));
                }
            }
        } else {
            None
        };
        let hreq = HandOverRequest {
            spec_toml: vm.spec.to_toml(),
            running,
            tpm_key_hex,
            source_qemu_user: self.config.qemu_user.clone(),
        };
        let ready: HandOverReady = match call(&peer, "/v1/handover", &hreq).await {
            Ok(r) => r,
            Err(e) => return Err(self.failed(&vm, untouched(e))),
        };
        let mark = UpgradeMark {
            to: ready.run_dir.clone(),
            source_running: running,
            handover: Some(local::HandOverPeer {
                agent: req.agent.clone(),
                id: ready.id.clone(),
            }),
        };
        let sent = async {
            mark.write(&vm.run_dir)
                .map_err(|source| UpgradeError::Files {
                    what: "the upgrade mark".into(),
                    source,
                })?;
            let own = HandOverDir::new(self.config.qemu_user.as_deref())?;
            local::send(&lv, &own, &ready.cpr, &ready.main, self.config.fault).await
        }
        .await;
        let committed = match sent {
            Ok(sent) => call(&peer, &format!("/v1/handover/{}/commit", ready.id), &())
                .await
                .map(|done: HandOverDone| (sent, done)),
            Err(e) => Err(e),
        };
        match committed {
            Ok((sent, done)) => {
                let new = local::NewQemu {
                    version: done.qemu_version,
                    pid: done.pid,
                    binary: done.binary,
                };
                let report = local::report(&lv, &new, running, &sent, started);
                self.forget(name);
                self.retire(&vm).await;
                self.vm_event(name, "left", None);
                tracing::info!(vm = name, to = %req.agent, "handed over to another agent on this host");
                Ok(report)
            }
            Err(error) => {
                // the receiver answers once its hand-over is over (aborted, or committed
                // if the commit reached it): only then does its directory say for sure
                fence(&req.agent, &ready.id).await;
                let vm_state = local::resume_old(&lv, &ready.run_dir, running).await;
                if mark.committed() {
                    // the other agent committed although this one saw an error: it runs
                    // there, and the old QEMU here stays paused for good
                    self.forget(name);
                    self.retire(&vm).await;
                }
                Err(self.failed(&vm, UpgradeFailed { error, vm_state }))
            }
        }
    }

    /// Receives a VM another agent on this host hands over: starts its new QEMU, answers
    /// once it listens, then (in a task) waits for it to load, for the sender's commit
    /// (`/v1/handover/{id}/commit`) and runs it; anything else removes it again.
    pub async fn receive_handover(
        self: &Arc<Self>,
        req: HandOverRequest,
    ) -> Result<HandOverReady, ReceiveError> {
        let spec = VmSpec::from_toml(&req.spec_toml)?;
        spec.validate_migrating()?;
        spec.check_files()?;
        if spec.memory != GuestMemory::Shared {
            return Err(ReceiveError::NotShared(spec.name));
        }
        let binary = tern_qemu::launch::LaunchOptions::new(PathBuf::new()).qemu_binary;
        local::check_binary(&binary)?;
        if !self.reserve_name(&spec.name) {
            return Err(ReceiveError::Exists(spec.name));
        }
        let to = self.new_run_dir(&spec.name);
        let prepared = (|| {
            std::fs::create_dir_all(&to)?;
            std::fs::write(to.join(tern_engine::dest::INCOMING_MARKER), b"handover")?;
            if let Some(k) = &req.tpm_key_hex {
                let key = hex::decode(k)
                    .ok()
                    .filter(|k| k.len() == 32)
                    .ok_or_else(|| std::io::Error::other("not 32 bytes of hex"))?;
                std::fs::write(tern_engine::tpm_migration_key_path(&to), key)?;
            }
            Ok::<_, std::io::Error>(())
        })();
        if let Err(e) = prepared {
            self.release_name(&spec.name);
            let _ = std::fs::remove_dir_all(&to);
            return Err(ReceiveError::TpmKey(e.to_string()));
        }
        let id = tern_engine::new_migration_id();
        let (cmd_tx, cmd_rx) = mpsc::channel(1);
        self.handovers
            .lock()
            .insert(id.clone(), HandOverSlot::Waiting(cmd_tx));
        let (ready_tx, ready_rx) = oneshot::channel();
        let me = self.clone();
        let task_id = id.clone();
        let span = tracing::info_span!("handover", id = %task_id, vm = %spec.name);
        tokio::spawn(
            async move {
                let r = me
                    .run_handover(task_id.clone(), spec, to, binary, req, ready_tx, cmd_rx)
                    .await;
                let mut slots = me.handovers.lock();
                slots.retain(|_, s| {
                    !matches!(s, HandOverSlot::Failed { at, .. } if at.elapsed() > REMEMBER_FAILURE)
                });
                match r {
                    Ok(()) => slots.remove(&task_id),
                    Err(why) => slots.insert(
                        task_id,
                        HandOverSlot::Failed {
                            why,
                            at: Instant::now(),
                        },
                    ),
                };
            }
            .instrument(span),
        );
        ready_rx.await.unwrap_or(Err(ReceiveError::Unknown(id)))
    }

    /// The receiving half's task (see [`Agent::receive_handover`]).
    #[allow(clippy::too_many_arguments)]
    async fn run_handover(
        &self,
        id: String,
        spec: VmSpec,
        to: PathBuf,
        binary: PathBuf,
        req: HandOverRequest,
        ready_tx: oneshot::Sender<Result<HandOverReady, ReceiveError>>,
        mut cmd_rx: mpsc::Receiver<HandOverCmd>,
    ) -> Result<(), String> {
        let fault = self.config.fault;
        let mut aborted: Option<oneshot::Sender<()>> = None;
        let outcome = async {
            let h = HandOverDir::new(req.source_qemu_user.as_deref())?;
            let opts = h.receiver_options(&to, &binary);
            let pending = local::start_receiver(self, &spec, &opts, &h).await?;
            let _ = ready_tx.send(Ok(HandOverReady {
                id: id.clone(),
                cpr: h.cpr(),
                main: h.main(),
                run_dir: to.clone(),
            }));
            // the sender may commit before this side saw its QEMU load (the old QEMU
            // finishes first): the commit then waits for the load
            let loading = local::loaded(pending, fault);
            tokio::pin!(loading);
            let mut early: Option<oneshot::Sender<Result<HandOverDone, String>>> = None;
            let mut process = loop {
                tokio::select! {
                    p = &mut loading => match p {
                        Ok(p) => break p,
                        Err(e) => {
                            if let Some(reply) = early.take() {
                                let _ = reply.send(Err(tern_engine::error_chain(&e)));
                            }
                            return Err(e);
                        }
                    },
                    c = cmd_rx.recv(), if early.is_none() => match c {
                        Some(HandOverCmd::Commit(reply)) => early = Some(reply),
                        abort => {
                            aborted = abort.and_then(HandOverCmd::into_abort_reply);
                            return Err(by_the_sender());
                        }
                    },
                }
            };
            let next = match early {
                Some(reply) => Ok(Some(HandOverCmd::Commit(reply))),
                None => tokio::time::timeout(COMMIT_WITHIN, cmd_rx.recv()).await,
            };
            let reply = match next {
                Ok(Some(HandOverCmd::Commit(reply))) => reply,
                Ok(abort) => {
                    aborted = abort.and_then(HandOverCmd::into_abort_reply);
                    process.kill().await;
                    return Err(by_the_sender());
                }
                Err(_) => {
                    process.kill().await;
                    return Err(UpgradeError::Timeout(
                        "the sender's commit",
                        COMMIT_WITHIN.as_secs(),
                    ));
                }
            };
            match local::commit(&mut process, &to, req.running, fault).await {
                Ok(()) => {
                    let new = local::NewQemu::of(&process, &binary);
                    let done = HandOverDone {
                        pid: new.pid,
                        qemu_version: new.version,
                        binary: new.binary,
                    };
                    // supervised, registered and told as "arrived", as a migration's VM
                    tern_engine::Host::adopt(self, spec.clone(), process);
                    local::finish(&to);
                    let _ = reply.send(Ok(done));
                    Ok(())
                }
                Err(e) => {
                    let _ = reply.send(Err(tern_engine::error_chain(&e)));
                    Err(e)
                }
            }
        }
        .await;
        let result = match outcome {
            Err(e) => {
                let why = tern_engine::error_chain(&e);
                tracing::warn!(vm = %spec.name, handover = %id, "receiving a hand-over failed: {why}");
                local::discard_new(self, &to).await;
                self.release_name(&spec.name);
                Err(why)
            }
            Ok(()) => Ok(()),
        };
        // the sender's abort is answered once nothing of the hand-over is left here
        if let Some(reply) = aborted {
            let _ = reply.send(());
        }
        result
    }

    /// The sender's word for a hand-over this agent receives.
    pub async fn handover_command(
        &self,
        id: &str,
        commit: bool,
    ) -> Result<HandOverDone, ReceiveError> {
        let tx = match self.handovers.lock().get(id) {
            Some(HandOverSlot::Waiting(tx)) => tx.clone(),
            Some(HandOverSlot::Failed { why, .. }) => {
                return Err(ReceiveError::Failed {
                    id: id.into(),
                    why: why.clone(),
                })
            }
            None => return Err(ReceiveError::Unknown(id.into())),
        };
        if !commit {
            // wait until the hand-over is over: aborted, or (a commit came first) committed
            let (done_tx, done_rx) = oneshot::channel();
            if tx.send(HandOverCmd::Abort(done_tx)).await.is_ok() {
                let _ = done_rx.await;
            }
            return Err(ReceiveError::Unknown(id.into()));
        }
        let (reply_tx, reply_rx) = oneshot::channel();
        tx.send(HandOverCmd::Commit(reply_tx))
            .await
            .map_err(|_| ReceiveError::Unknown(id.into()))?;
        match reply_rx.await {
            Ok(Ok(done)) => Ok(done),
            Ok(Err(e)) => Err(ReceiveError::Upgrade(UpgradeError::Peer(e))),
            Err(_) => Err(ReceiveError::Unknown(id.into())),
        }
    }

    /// Marks VM `name` as busy with a hand-over.
    fn claim(&self, name: &str) -> Result<Arc<Vm>, UpgradeVmError> {
        let vm = self
            .vm(name)
            .ok_or_else(|| UpgradeVmError::NotFound(name.into()))?;
        if vm.migrating.swap(true, Ordering::SeqCst) {
            return Err(UpgradeVmError::Busy(name.into()));
        }
        Ok(vm)
    }

    fn failed(&self, vm: &Vm, e: UpgradeFailed) -> UpgradeVmError {
        vm.migrating.store(false, Ordering::SeqCst);
        UpgradeVmError::Failed {
            vm: vm.spec.name.clone(),
            source: Box::new(e),
        }
    }

    /// The old QEMU of a committed hand-over: paused for good, stopped, its directory gone.
    async fn retire(&self, vm: &Vm) {
        vm.stop(StopMode::Quit).await;
        self.remove_run_dir(&vm.run_dir).await;
    }
}

fn local_vm(vm: &Vm) -> LocalVm<'_> {
    LocalVm {
        spec: &vm.spec,
        qmp: &vm.qmp,
        run_dir: &vm.run_dir,
        pid: vm.pid,
    }
}

/// Asks the receiving agent `agent` to give hand-over `id` up, and returns once it
/// answered: its hand-over is then over (aborted, or committed if the commit reached it
/// first), so its run directory says for sure where the VM is. An agent that is gone
/// (nobody at its socket) cannot commit any more either; one that does not answer within
/// the API call's timeout is taken as gone.
pub(crate) async fn fence(agent: &str, id: &str) {
    let Ok(endpoint) = Endpoint::parse(agent) else {
        return;
    };
    if let Err(e) = call::<_, serde_json::Value>(
        &Client::new(endpoint),
        &format!("/v1/handover/{id}/abort"),
        &(),
    )
    .await
    {
        tracing::debug!(handover = id, "abort: {e}");
    }
}

/// A POST to another agent's local API (a blocking client, on a worker thread).
async fn call<B: serde::Serialize, T: serde::de::DeserializeOwned + Send + 'static>(
    peer: &Client,
    path: &str,
    body: &B,
) -> Result<T, UpgradeError> {
    let endpoint = peer.endpoint.clone();
    let body = serde_json::to_value(body).map_err(|e| UpgradeError::Peer(e.to_string()))?;
    let path = path.to_string();
    tokio::task::spawn_blocking(move || {
        let v = Client::new(endpoint)
            .call("POST", &path, Some(&body))
            .map_err(|e| UpgradeError::Peer(tern_engine::error_chain(&e)))?;
        serde_json::from_value(v).map_err(|e| UpgradeError::Peer(e.to_string()))
    })
    .await
    .map_err(|e| UpgradeError::Peer(e.to_string()))?
}

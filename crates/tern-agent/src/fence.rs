//! Fencing (`tern agent --fence-after SECS`, off by default): an agent that stops hearing
//! from its cluster controller pauses its VMs, so that a host that is only cut off does
//! not keep running VMs the controller restarts elsewhere from their snapshots.
//!
//! The leading controller's poll (`GET /v1/load?leader=1` on the control listener,
//! [`tern_api::load::LEADER_POLL`]) is its word ([`Fence::heard`]); the first one arms the
//! fence. Other requests (a dry-run controller's polls, a standby's, an operator's) are
//! not. The time of the last word is kept in `STATE_DIR/fence-word`, so an agent
//! restarted while cut off is armed from its start and fences as soon as the silence
//! began `fence_after` ago. Checked every second ([`due`]): armed and no word for
//! `fence_after`, the agent fences: it cancels its VMs' outgoing migrations, pauses every
//! VM (QMP `stop`, never a kill) and writes the list to `STATE_DIR/fenced.json`, so a
//! restarted agent keeps them paused and fenced. While fenced it refuses outgoing
//! migrations and QMP `cont` of those VMs, incoming migrations and any restart from a
//! snapshot; a VM whose incoming migration switched over as the fence fell stays paused
//! and joins the fenced list ([`Fence::hold_arrival`]). Only `POST /v1/fence/release`
//! lifts it (the controller says which VMs to stop, having run them elsewhere, and which
//! to resume); a word from the controller while fenced re-arms the timer but does not
//! unfence.
//!
//! Owns the timer, the fenced state and its file; must not decide which copy of a VM
//! survives (the controller does).

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use parking_lot::Mutex;
use serde::{Deserialize, Serialize};
use tern_api::snapshot::{FenceRelease, FenceReleased, FenceStatus};

use crate::Agent;

/// The fenced state as `STATE_DIR/fenced.json` keeps it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Fenced {
    pub since_unix_ms: u64,
    pub vms: Vec<String>,
}

/// An agent's fence.
pub struct Fence {
    after: Option<Duration>,
    file: PathBuf,
    /// `STATE_DIR/fence-word`: when the controller was last heard from, ms since the
    /// Unix epoch (written at most every [`WORD_SAVED_EVERY`]).
    word_file: PathBuf,
    /// When the controller was last heard from; None: never (not armed).
    last_word: Mutex<Option<Instant>>,
    /// When `word_file` was last written.
    word_saved: Mutex<Option<Instant>>,
    fenced: Mutex<Option<Fenced>>,
}

/// How long fencing waits for the outgoing migrations it cancelled to end before it
/// pauses the VMs anyway (the controller counts it in its margin before a restart).
pub const CANCEL_WAIT: Duration = Duration::from_secs(3);

/// How often the time of the controller's last word is written down at most (a
/// restarted agent may take the silence for up to this much shorter).
pub const WORD_SAVED_EVERY: Duration = Duration::from_secs(1);

/// When the controller was last heard from, on this run's clock, given the time a
/// previous run wrote down (`saved_ms`, Unix ms) and the wall clock now (`now_ms`): the
/// silence goes on from where it was. A saved time in the future (the clock went back)
/// counts as now.
pub fn resumed_word(now: Instant, now_ms: u64, saved_ms: u64) -> Instant {
    let silent = Duration::from_millis(now_ms.saturating_sub(saved_ms));
    // an Instant cannot go before the machine's boot; a silence that long is over anyway
    now.checked_sub(silent)
        .or_else(|| now.checked_sub(Duration::from_secs(24 * 3600)))
        .unwrap_or(now)
}

/// Whether to fence now: armed (the controller was heard once), not fenced yet, and
/// nothing heard for `after`.
pub fn due(
    now: Instant,
    last_word: Option<Instant>,
    after: Option<Duration>,
    fenced: bool,
) -> bool {
    match (last_word, after) {
        (Some(last), Some(after)) if !fenced => now.saturating_duration_since(last) >= after,
        _ => false,
    }
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

impl Fence {
    /// The fence of the agent whose state is in `state_dir` (fenced still if its last run
    /// was).
    pub fn load(state_dir: &Path, after: Option<Duration>) -> Fence {
        let file = state_dir.join("fenced.json");
        let fenced = match std::fs::read(&file) {
            Ok(b) => match serde_json::from_slice::<Fenced>(&b) {
                Ok(f) => Some(f),
                Err(e) => {
                    // unreadable: fenced still, with no VM named (the operator releases)
                    tracing::error!(file = %file.display(), "the fenced state is unreadable ({e}): the agent stays fenced");
                    Some(Fenced {
                        since_unix_ms: now_ms(),
                        vms: Vec::new(),
                    })
                }
            },
            Err(_) => None,
        };
        let word_file = state_dir.join("fence-word");
        // armed by a previous run: the silence goes on from the controller's last word;
        // a file there but unreadable: armed, and the silence long over
        let last_word = after.and_then(|a| match std::fs::read_to_string(&word_file) {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
            r => Some(
                match r.ok().and_then(|t| t.trim().parse::<u64>().ok()) {
                    Some(saved) => resumed_word(Instant::now(), now_ms(), saved),
                    None => {
                        tracing::error!(file = %word_file.display(), "the controller's last word is unreadable: the fence falls at once");
                        Instant::now().checked_sub(a).unwrap_or_else(Instant::now)
                    }
                },
            ),
        });
        if let (Some(l), Some(a)) = (last_word, after) {
            tracing::info!(
                "the fence is armed since a previous run: the controller was last heard {:.0} s ago (--fence-after {:.0} s)",
                l.elapsed().as_secs_f64(),
                a.as_secs_f64()
            );
        }
        Fence {
            after,
            file,
            word_file,
            last_word: Mutex::new(last_word),
            word_saved: Mutex::new(None),
            fenced: Mutex::new(fenced),
        }
    }

    /// The leading controller polled ([`tern_api::load::LEADER_POLL`]).
    pub fn heard(&self) {
        let now = Instant::now();
        *self.last_word.lock() = Some(now);
        if self.after.is_none() {
            return;
        }
        let mut saved = self.word_saved.lock();
        if saved.is_none_or(|s| now.duration_since(s) >= WORD_SAVED_EVERY) {
            *saved = Some(now);
            // whole or not at all (an empty file would read as unreadable: fenced at once)
            if let Err(e) = tern_engine::secret::write_file(
                &self.word_file,
                now_ms().to_string().as_bytes(),
                0o600,
            ) {
                tracing::warn!(file = %self.word_file.display(), "cannot write down the controller's last word (a restarted agent would start with its fence disarmed): {e}");
            }
        }
    }

    /// Why no VM may arrive now; None: it may.
    pub fn refuses_arrival(&self, vm: &str) -> Option<String> {
        self.since()
            .map(|s| format!("VM {vm:?} cannot arrive here: {}", self.words(s)))
    }

    /// An incoming VM switched over here: true if the host is fenced, and then the VM is
    /// among the fenced ones (kept paused, its fate the controller's).
    pub fn hold_arrival(&self, vm: &str) -> bool {
        let f = {
            let mut g = self.fenced.lock();
            let Some(f) = g.as_mut() else {
                return false;
            };
            if !f.vms.iter().any(|v| v == vm) {
                f.vms.push(vm.to_string());
            }
            f.clone()
        };
        if let Err(e) = self.set(Some(f)) {
            tracing::error!(
                "cannot write the fenced state (a restarted agent would not know): {e}"
            );
        }
        true
    }

    pub fn status(&self) -> FenceStatus {
        let f = self.fenced.lock().clone();
        FenceStatus {
            fenced: f.is_some(),
            since_unix_ms: f.as_ref().map(|f| f.since_unix_ms),
            vms: f.map(|f| f.vms).unwrap_or_default(),
            fence_after_s: self.after.map(|d| d.as_secs_f64()),
        }
    }

    /// The VMs fenced now (none when not fenced).
    pub fn fenced_vms(&self) -> Vec<String> {
        self.fenced
            .lock()
            .as_ref()
            .map(|f| f.vms.clone())
            .unwrap_or_default()
    }

    fn since(&self) -> Option<u64> {
        self.fenced.lock().as_ref().map(|f| f.since_unix_ms)
    }

    fn words(&self, since: u64) -> String {
        let ago = now_ms().saturating_sub(since) as f64 / 1000.0;
        format!("this host fenced itself {ago:.0} s ago (no word from the cluster controller for --fence-after); the controller releases it (POST /v1/fence/release)")
    }

    /// Why VM `vm` may not migrate out or be resumed now; None: it may.
    pub fn refuses(&self, vm: &str) -> Option<String> {
        let f = self.fenced.lock();
        let f = f.as_ref()?;
        f.vms
            .iter()
            .any(|v| v == vm)
            .then(|| format!("VM {vm:?} is fenced: {}", self.words(f.since_unix_ms)))
    }

    /// Why no snapshot may restart now; None: they may.
    pub fn refuses_restart(&self) -> Option<String> {
        self.since()
            .map(|s| format!("no restart while fenced: {}", self.words(s)))
    }

    fn set(&self, f: Option<Fenced>) -> std::io::Result<()> {
        let r = match &f {
            Some(f) => serde_json::to_vec(f)
                .map_err(std::io::Error::other)
                .and_then(|b| {
                    tern_engine::secret::write_file(&self.file, &b, 0o600)
                        .map_err(std::io::Error::other)
                }),
            None => match std::fs::remove_file(&self.file) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e),
                _ => Ok(()),
            },
        };
        *self.fenced.lock() = f;
        r
    }
}

/// Checks the fence every second (with `--fence-after` only).
pub async fn run(agent: Arc<Agent>) {
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    loop {
        tick.tick().await;
        let f = &agent.fence;
        let last = *f.last_word.lock();
        if due(Instant::now(), last, f.after, f.since().is_some()) {
            fence(&agent, last.map(|l| l.elapsed())).await;
        } else if f.since().is_some() {
            enforce(&agent).await;
        }
    }
}

/// Pauses every VM here and records it.
async fn fence(agent: &Arc<Agent>, silent_for: Option<Duration>) {
    let vms = agent.vms();
    let names: Vec<String> = vms.iter().map(|v| v.spec.name.clone()).collect();
    // fenced first: from here no migration starts and no VM is resumed through the API
    if let Err(e) = agent.fence.set(Some(Fenced {
        since_unix_ms: now_ms(),
        vms: names.clone(),
    })) {
        tracing::error!("cannot write the fenced state (a restarted agent would not know): {e}");
    }
    // an outgoing migration that has not committed ends here (its VM stays); one that
    // did runs at its destination
    let mut migrating = Vec::new();
    for n in &names {
        if let Some(m) = agent.engine.registry.active_migration_of(n) {
            m.cancel();
            migrating.push(n.clone());
        }
    }
    if !migrating.is_empty() {
        let deadline = Instant::now() + CANCEL_WAIT;
        while Instant::now() < deadline
            && migrating
                .iter()
                .any(|n| agent.engine.registry.active_migration_of(n).is_some())
        {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    pause_all(agent, &names).await;
    tracing::error!(
        "fenced: no word from the controller for {:.0} s; paused VMs {names:?}",
        silent_for.unwrap_or_default().as_secs_f64()
    );
}

/// QMP `stop` on each VM named that runs here, all at once.
async fn pause_all(agent: &Agent, names: &[String]) {
    let stops = names.iter().filter_map(|n| {
        let vm = agent.vm(n)?;
        if vm.exit_reason().is_some() {
            return None;
        }
        Some(async move {
            match tokio::time::timeout(Duration::from_secs(10), vm.qmp.execute("stop", None)).await
            {
                Ok(Ok(_)) => {}
                Ok(Err(e)) => tracing::error!(vm = %n, "fencing: cannot pause the VM: {e}"),
                Err(_) => {
                    tracing::error!(vm = %n, "fencing: its QEMU did not answer `stop` within 10 s")
                }
            }
        })
    });
    futures_util::future::join_all(stops).await;
}

/// While fenced, every second: a VM found running here (resumed by a path that did not
/// see the fence fall: a failed outgoing migration's clean-up, a switchover or restart
/// under way as it fell, a same-host hand-over) is paused again and joins the fenced.
async fn enforce(agent: &Arc<Agent>) {
    let mut running = Vec::new();
    for vm in agent.vms() {
        if vm.exit_reason().is_some() {
            continue;
        }
        if let Ok(Ok(st)) =
            tokio::time::timeout(Duration::from_secs(2), vm.qmp.query_status()).await
        {
            if st.running {
                running.push(vm.spec.name.clone());
            }
        }
    }
    if running.is_empty() {
        return;
    }
    // (the fence may have been released while we looked)
    if agent.fence.since().is_none() {
        return;
    }
    for n in &running {
        agent.fence.hold_arrival(n);
    }
    pause_all(agent, &running).await;
    tracing::error!("fenced: VMs {running:?} were running; paused again");
}

/// A restarted agent that was fenced keeps its VMs paused (after re-attaching to them).
pub async fn keep_fenced(agent: &Agent) {
    let names = agent.fence.fenced_vms();
    if agent.fence.since().is_none() {
        return;
    }
    pause_all(agent, &names).await;
    tracing::error!(
        "fenced (since before this agent started): VMs {names:?} stay paused until the controller releases them"
    );
}

/// `POST /v1/fence/release`: stops and resumes the VMs named, lifts the fence.
pub async fn release(agent: &Agent, req: FenceRelease) -> FenceReleased {
    let mut out = FenceReleased::default();
    // a copy that runs elsewhere now and could not be stopped keeps the whole host fenced
    // (nothing resumed; the controller asks again); one not here any more is stopped
    let mut still = Vec::new();
    for n in &req.stop {
        match agent.stop_vm(n).await {
            Ok(()) | Err(crate::vm::StopVmError::NotFound(_)) => out.stopped.push(n.clone()),
            Err(e) => {
                out.failed.push(format!("stop {n}: {e}"));
                still.push(n.clone());
            }
        }
    }
    let was = agent.fence.since();
    if !still.is_empty() {
        for n in &req.resume {
            out.failed.push(format!(
                "resume {n}: not done, the host stays fenced while {still:?} could not be stopped"
            ));
        }
        tracing::error!(failed = ?out.failed, "fence kept: copies that run elsewhere could not be stopped");
        return out;
    }
    // lifted before the resumes (the fence's own check would pause them again)
    if let Err(e) = agent.fence.set(None) {
        tracing::error!("cannot remove the fenced state's file: {e}");
    }
    for n in &req.resume {
        let Some(vm) = agent.vm(n) else {
            out.failed
                .push(format!("resume {n}: no VM named {n:?} on this host"));
            continue;
        };
        match tokio::time::timeout(Duration::from_secs(10), vm.qmp.execute("cont", None)).await {
            Ok(Ok(_)) => out.resumed.push(n.clone()),
            Ok(Err(e)) => out.failed.push(format!("resume {n}: {e}")),
            Err(_) => out
                .failed
                .push(format!("resume {n}: its QEMU did not answer within 10 s")),
        }
    }
    if was.is_some() {
        tracing::warn!(
            stopped = ?out.stopped,
            resumed = ?out.resumed,
            failed = ?out.failed,
            "fence released"
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_fence_falls_only_once_armed_and_silent_for_long_enough() {
        let t0 = Instant::now();
        let after = Some(Duration::from_secs(3));
        let at = |s: f64| t0 + Duration::from_secs_f64(s);
        // never heard from the controller: not armed
        assert!(!due(at(100.0), None, after, false));
        // heard at 0: fine until 3 s
        assert!(!due(at(2.9), Some(t0), after, false));
        assert!(due(at(3.0), Some(t0), after, false));
        // heard again at 2: the timer starts again
        assert!(!due(at(4.0), Some(at(2.0)), after, false));
        assert!(due(at(5.5), Some(at(2.0)), after, false));
        // fenced already: nothing more to do
        assert!(!due(at(10.0), Some(t0), after, true));
        // no --fence-after: never
        assert!(!due(at(1e6), Some(t0), None, false));
    }

    #[test]
    fn a_restarted_agent_takes_up_the_silence_where_it_was() {
        let now = Instant::now();
        // last word 5 s before the wall clock's now: 5 s of silence already
        let w = resumed_word(now, 100_000, 95_000);
        assert_eq!(now.duration_since(w), Duration::from_secs(5));
        assert!(due(now, Some(w), Some(Duration::from_secs(4)), false));
        assert!(!due(now, Some(w), Some(Duration::from_secs(6)), false));
        // a word from the future (the clock went back): heard now
        assert_eq!(resumed_word(now, 100_000, 200_000), now);
    }

    #[test]
    fn a_restarted_agent_is_armed_by_the_word_its_last_run_wrote_down() {
        let dir = tempfile::tempdir().unwrap();
        let after = Some(Duration::from_secs(3));
        // never heard: not armed, nothing written
        let f = Fence::load(dir.path(), after);
        assert!(f.last_word.lock().is_none());
        f.heard();
        assert!(dir.path().join("fence-word").exists());
        // a restart: armed, silent for about as long as since the word
        let again = Fence::load(dir.path(), after);
        let w = again.last_word.lock().expect("armed from the file");
        assert!(w.elapsed() < Duration::from_secs(2));
        // a word written 10 s ago: the restarted agent fences at once
        std::fs::write(
            dir.path().join("fence-word"),
            (now_ms() - 10_000).to_string(),
        )
        .unwrap();
        let late = Fence::load(dir.path(), after);
        let w = *late.last_word.lock();
        assert!(due(Instant::now(), w, after, false));
        // without --fence-after the file is not read
        assert!(Fence::load(dir.path(), None).last_word.lock().is_none());
        // a file there but unreadable (a write cut short): armed and overdue
        std::fs::write(dir.path().join("fence-word"), "").unwrap();
        let cut = Fence::load(dir.path(), after);
        let w = *cut.last_word.lock();
        assert!(w.is_some() && due(Instant::now(), w, after, false));
    }

    #[test]
    fn a_vm_arriving_at_a_fenced_host_is_refused_or_held_paused() {
        let dir = tempfile::tempdir().unwrap();
        let f = Fence::load(dir.path(), Some(Duration::from_secs(3)));
        assert!(f.refuses_arrival("web1").is_none());
        assert!(!f.hold_arrival("web1"));
        f.set(Some(Fenced {
            since_unix_ms: 7,
            vms: vec!["db".into()],
        }))
        .unwrap();
        assert!(f
            .refuses_arrival("web1")
            .is_some_and(|w| w.contains("fenced")));
        assert!(f.hold_arrival("web1"));
        assert_eq!(f.fenced_vms(), vec!["db".to_string(), "web1".to_string()]);
        // kept for a restarted agent
        let again = Fence::load(dir.path(), None);
        assert_eq!(
            again.fenced_vms(),
            vec!["db".to_string(), "web1".to_string()]
        );
        assert!(again.refuses("web1").is_some());
    }

    #[test]
    fn a_fenced_state_outlives_the_agent_until_released() {
        let dir = tempfile::tempdir().unwrap();
        let f = Fence::load(dir.path(), Some(Duration::from_secs(3)));
        assert!(!f.status().fenced && f.refuses("web1").is_none() && f.refuses_restart().is_none());
        f.set(Some(Fenced {
            since_unix_ms: 7,
            vms: vec!["web1".into()],
        }))
        .unwrap();
        let again = Fence::load(dir.path(), Some(Duration::from_secs(3)));
        let st = again.status();
        assert!(st.fenced);
        assert_eq!(st.since_unix_ms, Some(7));
        assert_eq!(st.vms, vec!["web1".to_string()]);
        assert_eq!(st.fence_after_s, Some(3.0));
        assert!(again.refuses("web1").is_some_and(|w| w.contains("fenced")));
        assert!(again.refuses("other").is_none());
        assert!(again.refuses_restart().is_some());
        again.set(None).unwrap();
        assert!(!Fence::load(dir.path(), None).status().fenced);
    }
}

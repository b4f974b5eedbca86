//! Post-copy after the source agent restarted. Once post-copy began, the pages the VM
//! still lacks at the destination are only in the source QEMU, which outlives its agent:
//! when the agent dies, QEMU's stream breaks and it pauses (`postcopy-paused`), the
//! destination waits for a new connection (as after a broken link, `resume.rs`). So the
//! agent keeps, in the VM's run directory, what another agent needs to go on
//! ([`PostcopyMark`]: the migration, its request, QEMU's stream state), from just before it
//! asks its QEMU for post-copy until the migration ended; an agent that starts beside a
//! QEMU in a post-copy state with that mark resumes the migration ([`resume_restarted`]):
//! PostcopyResume on a new connection, QEMU's `migrate` with `resume`, the rest of the
//! stream, the v1 ending.
//!
//! The memory digest of what went before the restart left with the old process: the
//! destination's cannot be compared (the report has `digest_ok` false and a note says
//! why; the destination logs the mismatch and keeps the VM, as post-copy always does).

use std::path::Path;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use tern_api::{MigrateRequest, MigrationReport};
use tern_proto::{ErrorCode, Message};
use tern_qemu::stream::{Parser, ResumeState};

use super::forward::StreamState;
use super::peer::PeerEvent;
use super::resume::{self, Carrier};
use super::{send, unexpected, MigrateError, Migration, SourceOutcome, SourceQemu, SourceVm};
use crate::codec::CodecPolicy;
use crate::digest::MemoryDigest;
use crate::error::error_chain;
use crate::handle::{MigrationHandle, Phase};
use crate::pages::PageEncoder;
use crate::transport::rate::RateLimit;
use crate::{Engine, Host};

/// The mark's file in the VM's run directory.
const MARK: &str = "postcopy-source.json";

/// What an agent needs to resume a post-copy its predecessor began.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PostcopyMark {
    pub migration_id: String,
    /// The try on the wire (`Migration::wire_id`).
    pub attempt: u32,
    pub req: MigrateRequest,
    /// The source QEMU's stream as the forwarder had parsed it.
    pub stream: ResumeState,
    pub rtt_ms: u64,
    pub source_running: bool,
}

impl PostcopyMark {
    /// Written (synced) before tern asks its QEMU for post-copy.
    pub(super) fn write(&self, run_dir: &Path) -> std::io::Result<()> {
        let tmp = run_dir.join(format!("{MARK}.tmp"));
        {
            use std::io::Write;
            let mut f = std::fs::File::create(&tmp)?;
            f.write_all(&serde_json::to_vec(self).map_err(std::io::Error::other)?)?;
            f.sync_all()?;
        }
        std::fs::rename(&tmp, run_dir.join(MARK))
    }

    /// The mark a previous agent left (None: none, or unreadable: logged).
    pub fn read(run_dir: &Path) -> Option<PostcopyMark> {
        let text = std::fs::read(run_dir.join(MARK)).ok()?;
        match serde_json::from_slice(&text) {
            Ok(m) => Some(m),
            Err(e) => {
                tracing::error!(dir = %run_dir.display(), "unreadable post-copy mark: {e}");
                None
            }
        }
    }

    pub fn remove(run_dir: &Path) {
        let _ = std::fs::remove_file(run_dir.join(MARK));
    }
}

/// Keeps the mark for this migration, just before tern asks its QEMU for post-copy (a
/// failure to write it is logged: post-copy then goes on, without that safety).
pub(super) fn keep_mark(m: &Migration, rtt: Duration) {
    let Some(stream) = m.stream_resume.lock().expect("resume state").clone() else {
        tracing::error!(migration = %m.handle.id, "no RAM blocks seen yet: no post-copy mark (an agent restart during post-copy could not resume it)");
        return;
    };
    let mark = PostcopyMark {
        migration_id: m.handle.id.clone(),
        attempt: m.attempt,
        req: m.req.clone(),
        stream,
        rtt_ms: rtt.as_millis() as u64,
        source_running: m.source_running,
    };
    if let Err(e) = mark.write(&m.vm.run_dir) {
        tracing::error!(migration = %m.handle.id, "cannot keep the post-copy mark in {}: {e} (an agent restart during post-copy could not resume it)", m.vm.run_dir.display());
    }
}

/// Whether a QEMU beside a mark may hold pages of a post-copy that began: in a post-copy
/// state, `completed` (it sent everything; only the destination knows whether all of it
/// arrived), or its state unknown (`None`: QMP did not answer). Otherwise (pre-copy,
/// failed, cancelled) post-copy never began and the mark is stale.
pub fn postcopy_began(status: Option<&str>) -> bool {
    status.is_none_or(|s| s.starts_with("postcopy-") || s == "completed")
}

/// Resumes the post-copy `mark` describes, left by this host's previous agent, with the
/// VM's QEMU in `vm`: to its end (the VM moved) or until `outage_wait` ran out.
pub async fn resume_restarted(
    engine: Arc<Engine>,
    host: Arc<dyn Host>,
    vm: SourceVm,
    mark: PostcopyMark,
    handle: Arc<MigrationHandle>,
) -> SourceOutcome {
    let run_dir = vm.run_dir.clone();
    let mut m = Migration::new(engine, host, vm, mark.req.clone(), handle, None);
    m.attempt = mark.attempt.max(1);
    m.committed = true;
    m.source_running = mark.source_running;
    m.postcopy_run.store(true, Ordering::SeqCst);
    m.rtt = Duration::from_millis(mark.rtt_ms);
    let note = "the source agent restarted during post-copy: resuming it; what went before the restart is not in this agent's memory digest, so the digests cannot be compared";
    tracing::warn!(migration = %m.handle.id, "{note}");
    m.handle.update(|s| {
        s.progress.notes.push(note.into());
        s.progress.qemu_status = "postcopy-paused".into();
    });
    let outcome = match run(&mut m, mark).await {
        Ok(report) => SourceOutcome::Moved(Box::new(report)),
        // post-copy began: the one recovery path says where the VM is (never resumed here)
        Err(e) => super::recover::after_failure(&mut m, e).await,
    };
    PostcopyMark::remove(&run_dir);
    outcome
}

async fn run(m: &mut Migration, mark: PostcopyMark) -> Result<MigrationReport, MigrateError> {
    let SourceQemu::Tern(qmp) = &m.vm.qemu else {
        return Err(MigrateError::BadRequest(
            "a libvirt domain has no post-copy".into(),
        ));
    };
    let qmp = qmp.clone();
    // the stream as the last agent left it; the digest only of what comes from here on
    let parser = Parser::from_resume_state(mark.stream);
    let blocks: Vec<(String, u64)> = parser
        .blocks()
        .iter()
        .map(|b| (b.name.to_string(), b.used_length))
        .collect();
    let ps = parser.page_size();
    let mut pages = PageEncoder::new(
        m.engine.hasher.clone(),
        m.engine.store.clone(),
        false,
        Default::default(),
    );
    pages.set_blocks(ps, &blocks.iter().map(|b| b.1).collect::<Vec<_>>());
    let stream = Arc::new(tokio::sync::Mutex::new(StreamState {
        block_index: parser
            .blocks()
            .iter()
            .enumerate()
            .map(|(i, b)| (b.name.clone(), i as u16))
            .collect(),
        digest: Some(MemoryDigest::new(
            ps,
            blocks.iter().map(|(n, l)| (n.as_str(), *l)),
        )),
        parser,
        pages,
    }));
    let carrier = Carrier {
        stream,
        policy: CodecPolicy::from(m.req.compression.unwrap_or_default()),
        budget: m
            .req
            .max_bandwidth_mibps
            .map(|mib| Arc::new(RateLimit::new(mib << 20))),
        rtt: m.rtt,
    };
    let mut cause = MigrateError::AgentRestarted;
    let mut faults = None;
    let since = Instant::now();
    if resume::qemu_completed(&qmp).await {
        // the old agent saw QEMU send everything before it died
        return ask_destination(m, since, faults, cause).await;
    }
    for _ in 0..resume::MAX_RESUMES {
        let left = m.req.outage_wait().saturating_sub(Duration::from_millis(
            m.outages.iter().map(|o| o.waited_ms).sum(),
        ));
        let leg = resume::resume(m, &qmp, &carrier, &cause, left).await?;
        m.outages.push(leg.outage);
        let _tasks = leg.tasks;
        let (mut fwd, mut events, writer) = (leg.fwd, leg.events, leg.writer);
        let mut fwd_done = false;
        let mut commit_sent = false;
        let step: Result<u64, MigrateError> = loop {
            tokio::select! {
                r = &mut fwd, if !fwd_done => match r {
                    Ok(Ok(_)) => fwd_done = true,
                    Ok(Err(e)) => break Err(e),
                    Err(e) => break Err(MigrateError::Protocol(format!("forwarder failed: {e}"))),
                },
                ev = events.recv() => match ev {
                    Some(PeerEvent::Msg(Message::ReadyToResume { .. })) => {
                        // (its digest covers the whole stream, ours only what came after
                        // the restart)
                        m.handle.set_phase(Phase::Switchover);
                        commit_sent = true;
                        if let Err(e) = send(&writer, &Message::Commit).await {
                            break Err(e);
                        }
                    }
                    Some(PeerEvent::Msg(Message::Resumed { resumed_unix_us })) => break Ok(resumed_unix_us),
                    Some(PeerEvent::Msg(Message::PostcopyFaults { requests, pages, blocktime, local })) => {
                        faults = Some(tern_api::PostcopyFaults {
                            requests,
                            pages,
                            served_locally: local,
                            all_vcpus_blocked_ms: blocktime.map(|b| b.all_vcpus_ms),
                            max_vcpu_blocked_ms: blocktime.map(|b| b.max_vcpu_ms),
                        });
                    }
                    Some(PeerEvent::Msg(Message::Abort { code, message })) => break Err(MigrateError::Remote { code, message }),
                    Some(PeerEvent::Msg(msg)) => break Err(unexpected(&msg, "ReadyToResume or Resumed")),
                    Some(PeerEvent::Failed(e)) => break Err(MigrateError::Peer(e)),
                    Some(PeerEvent::Broken(why)) => break Err(MigrateError::Protocol(why)),
                    Some(PeerEvent::Closed) | None => break Err(MigrateError::PeerClosed("the resumed post-copy")),
                },
            }
        };
        fwd.abort();
        match step {
            Ok(resumed) => return Ok(report(m, since, resumed, faults, false)),
            // QEMU sent everything, or the commit went out: only the destination knows
            // whether the VM runs there whole
            Err(e) if commit_sent || resume::qemu_completed(&qmp).await => {
                return ask_destination(m, since, faults, e).await
            }
            Err(e) if resume::link_broke(&e) => cause = e,
            Err(e) => return Err(e),
        }
    }
    Err(MigrateError::Remote {
        code: ErrorCode::Timeout,
        message: format!(
            "post-copy broke {} times after the source agent restarted: {}",
            resume::MAX_RESUMES,
            error_chain(&cause)
        ),
    })
}

/// The report of a post-copy resumed by a restarted agent (the digests not compared).
fn report(
    m: &mut Migration,
    since: Instant,
    resumed: u64,
    faults: Option<tern_api::PostcopyFaults>,
    by_query: bool,
) -> MigrationReport {
    let st = m.handle.status();
    m.handle.set_phase(Phase::Done);
    MigrationReport {
        migration_id: m.handle.id.clone(),
        vm: m.vm.spec.name.clone(),
        source: m.engine.config.name.clone(),
        destination: m.req.to.clone(),
        outcome: "succeeded".into(),
        total_time_ms: since.elapsed().as_millis() as u64,
        bytes_from_qemu: st.progress.bytes_from_qemu,
        bytes_on_wire: st.progress.bytes_on_wire,
        pages: st.progress.pages.clone(),
        digest_ok: false,
        qemu_version: m.vm.qemu_version.clone(),
        source_was_running: m.source_running,
        resumed_unix_us: resumed,
        resolved_by_query: by_query,
        postcopy: true,
        postcopy_faults: faults,
        outages: std::mem::take(&mut m.outages),
        ..Default::default()
    }
}

/// How often, and how many times, the destination is asked what became of the VM.
const ASK_EVERY: Duration = Duration::from_secs(2);
const ASK_TIMES: u32 = 15;

/// QEMU sent its whole stream (or the commit went out) and then the connection was lost
/// (`e`): the destination says whether the VM runs there. Running: it moved. Anything
/// else, or no answer: `e` (the VM stays as post-copy left it; never resumed here).
async fn ask_destination(
    m: &mut Migration,
    since: Instant,
    faults: Option<tern_api::PostcopyFaults>,
    e: MigrateError,
) -> Result<MigrationReport, MigrateError> {
    for _ in 0..ASK_TIMES {
        match super::connect::query_once(m).await {
            Ok((tern_proto::MigrationState::Running, resumed)) => {
                tracing::info!(migration = %m.handle.id, "the destination runs the VM (asked after the stream ended)");
                return Ok(report(m, since, resumed, faults, true));
            }
            Ok((tern_proto::MigrationState::InProgress, _)) | Err(_) => {}
            Ok((state, _)) => {
                tracing::error!(migration = %m.handle.id, ?state, "the destination does not run the VM");
                return Err(e);
            }
        }
        tokio::time::sleep(ASK_EVERY).await;
    }
    Err(e)
}

//! Phase `DiskCopy` (a VM with local disks): round 0 of every disk and dirty rounds until
//! little is dirty, before memory moves; then QEMU is told to pause before its switchover.
//! During the transfer the rounds go on beside memory ([`LiveDisks`]), and at QEMU's
//! pre-switchover the last round runs with the guest paused ([`finish`]).

use std::time::{Duration, Instant, SystemTime};

use tern_proto::{Codec, DiskInfo};
use tokio::sync::watch;

use super::peer::peer_event_error;
use super::prepare::Prepared;
use super::{AbortOnDrop, MigrateError, Migration};
use crate::codec::CodecPolicy;
use crate::disk::{DiskInbox, SourceDiskError, SourceDisks};
use crate::handle::{wait_cancelled, DiskReport, Phase};

/// The copy done before memory moves, ready to go on beside it.
pub(super) struct CopiedDisks {
    disks: SourceDisks,
    inbox: DiskInbox,
}

type LiveTask = tokio::task::JoinHandle<(SourceDisks, DiskInbox, Result<(), SourceDiskError>)>;

/// The disk rounds running beside memory, until QEMU pauses before its switchover.
pub(super) struct LiveDisks {
    task: Option<LiveTask>,
    stop: Option<watch::Sender<bool>>,
    _guard: Option<AbortOnDrop>,
}

pub(super) async fn copy(
    m: &mut Migration,
    p: &mut Prepared,
    infos: Option<Vec<DiskInfo>>,
) -> Result<Option<CopiedDisks>, MigrateError> {
    let Some(infos) = infos else {
        return Ok(None);
    };
    m.handle.set_phase(Phase::DiskCopy);
    let mut cancel = m.handle.cancelled();
    let codec = match p.policy {
        CodecPolicy::Fixed(c) => c,
        CodecPolicy::Auto if p.rtt >= Duration::from_millis(10) => Codec::Zstd(3),
        CodecPolicy::Auto => Codec::Lz4,
    };
    let mut d = SourceDisks::start(
        m.vm.qmp()?.clone(),
        &m.vm.run_dir,
        &crate::disk::local_disks(&m.vm.spec),
        &infos,
        p.writer.clone(),
        m.engine.hasher.clone(),
        codec,
        m.engine.config.stall_timeout,
        p.budget.clone(),
        m.handle.clone(),
    )
    .await?;
    // (the inbox moves into the rounds; a fresh one stands in for the prepared state)
    let mut inbox = std::mem::replace(&mut p.disk_inbox, tokio::sync::mpsc::channel(1).1);
    tokio::select! {
        r = d.copy(&mut inbox) => r?,
        ev = p.events.recv() => return Err(peer_event_error(ev, "the disk copy")),
        _ = wait_cancelled(&mut cancel) => return Err(MigrateError::Cancelled),
    }
    tracing::info!(migration = %m.handle.id, report = ?d.report, "disk copy done, memory next");
    tern_qemu::disk::enable_pause_before_switchover(m.vm.qmp()?)
        .await
        .map_err(|e| MigrateError::Qmp(e.0))?;
    Ok(Some(CopiedDisks { disks: d, inbox }))
}

impl LiveDisks {
    /// Dirty rounds beside memory (none for a VM without disks).
    pub(super) fn start(copied: Option<CopiedDisks>) -> LiveDisks {
        let Some(CopiedDisks { disks, inbox }) = copied else {
            return LiveDisks {
                task: None,
                stop: None,
                _guard: None,
            };
        };
        let (stop, stop_rx) = watch::channel(false);
        let task = crate::spawn(disks.live(inbox, stop_rx));
        // a failed migration must not leave rounds running behind its cleanup
        let guard = AbortOnDrop(task.abort_handle());
        LiveDisks {
            task: Some(task),
            stop: Some(stop),
            _guard: Some(guard),
        }
    }

    pub(super) fn running(&self) -> bool {
        self.task.is_some()
    }

    /// Resolves only if the rounds end before they were told to (a failure).
    pub(super) async fn failed(&mut self) -> MigrateError {
        let Some(task) = self.task.as_mut() else {
            return std::future::pending().await;
        };
        let r = task.await;
        self.task = None;
        match r {
            Err(e) => MigrateError::Protocol(format!("disk task failed: {e}")),
            Ok((_, _, Err(e))) => e.into(),
            Ok((_, _, Ok(()))) => {
                MigrateError::Protocol("disk rounds ended before the switchover".into())
            }
        }
    }

    /// At QEMU's pause before the switchover (`paused_at`): ends the live rounds, runs the
    /// last one and lets QEMU send the device state, within `stall` (the guest is paused
    /// meanwhile). Without disks, QEMU just goes on. Tern's exports are gone then; the
    /// bitmaps and the NBD server go with the source QEMU, or with the cleanup of a
    /// failure.
    pub(super) async fn finish(
        &mut self,
        m: &Migration,
        paused_at: SystemTime,
    ) -> Result<Option<DiskReport>, MigrateError> {
        let qmp = m.vm.qmp()?;
        let Some(task) = self.task.take() else {
            tern_qemu::disk::continue_switchover(qmp)
                .await
                .map_err(|e| MigrateError::Qmp(e.0))?;
            return Ok(None);
        };
        let stall = m.engine.config.stall_timeout;
        let stop = self.stop.take();
        let work = async {
            let event_ms = SystemTime::now()
                .duration_since(paused_at)
                .map_or(0.0, |d| d.as_secs_f64() * 1e3);
            let t_seen = Instant::now();
            if let Some(s) = stop {
                let _ = s.send(true);
            }
            let (mut d, mut inbox, r) = task
                .await
                .map_err(|e| MigrateError::Protocol(format!("disk task failed: {e}")))?;
            r?;
            let live_ms = t_seen.elapsed().as_secs_f64() * 1e3;
            d.last_round(&mut inbox).await?;
            tern_qemu::disk::continue_switchover(qmp)
                .await
                .map_err(|e| MigrateError::Qmp(e.0))?;
            // where the guest's pause went before QEMU went on
            d.report.pause_ms = event_ms + t_seen.elapsed().as_secs_f64() * 1e3;
            d.report.live_round_wait_ms = live_ms;
            tracing::info!(migration = %m.handle.id, bytes = d.report.last_round_bytes, ms = d.report.last_round_ms, event_ms, live_ms, "last disk round done");
            Ok::<_, MigrateError>(d.report.clone())
        };
        tokio::time::timeout(stall, work)
            .await
            .map_err(|_| MigrateError::Timeout(stall, "the last disk round (guest paused)"))?
            .map(Some)
    }
}

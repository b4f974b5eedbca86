//! Phase `Prepare`: the destination learns the VM (DiskOffer, TpmKey only now that the
//! policy allowed it, Prepare) and starts its QEMU; the source learns what the
//! destination's page store holds (Summary, bounded) and sets up how the data will travel:
//! references and deltas or not, compression, extra data connections, the rate limit, the
//! encoder, and the reader of the destination's frames.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use tern_proto::{limits, Codec, DiskInfo, Message};
use tokio::net::unix;
use tokio::sync::{mpsc, oneshot};

use super::connect::{open_data_stream, Peer};
use super::pacing::{self, Pacing};
use super::peer::{peer_reader, PeerEvent};
use super::{expect, send, unexpected, AbortOnDrop, MigrateError, Migration};
use crate::codec::CodecPolicy;
use crate::disk::DiskInbox;
use crate::handle::{wait_cancelled, Phase};
use crate::pace::{PacePolicy, Pacer};
use crate::pages::PageEncoder;
use crate::transport::flow::Flow;
use crate::transport::links::{data_link, Links, PeerWriter};
use crate::transport::probe::TcpProbe;
use crate::transport::rate::RateLimit;

/// From Prepare to Prepared: the destination starts its QEMU (and makes its disk images)
/// meanwhile.
const PREPARE_WITHIN: Duration = Duration::from_secs(60);

/// What the migration travels with, once the destination is ready.
pub(super) struct Prepared {
    pub writer: PeerWriter,
    pub version: u16,
    /// The destination agent's name and its QEMU's version.
    pub dest_agent: String,
    pub dest_qemu: String,
    pub rtt: Duration,
    /// Frame compression (none with a v1 peer).
    pub policy: CodecPolicy,
    pub links: Links,
    pub encoder: PageEncoder,
    /// One budget for memory and disk bytes on the wire: `--max-bandwidth`, or the
    /// bandwidth controller's rate.
    pub budget: Option<Arc<RateLimit>>,
    /// The bandwidth controller, running.
    pub pacing: Pacing,
    /// The destination's control messages, disk replies, and where the return path goes
    /// once QEMU's socket exists.
    pub events: mpsc::Receiver<PeerEvent>,
    pub disk_inbox: DiskInbox,
    pub qemu_tx: Option<oneshot::Sender<unix::OwnedWriteHalf>>,
    /// A libvirt domain's QEMU: fires when the destination QEMU said SHUT (the stream is
    /// complete; the source QEMU waits for that SHUT before it closes the stream).
    pub stream_end: Option<oneshot::Receiver<()>>,
    /// v2 flow control.
    pub flow: Option<Arc<Flow>>,
    /// Tasks that end with the migration (the data connections' writers, the reader).
    pub tasks: Vec<AbortOnDrop>,
}

pub(super) async fn run(
    m: &mut Migration,
    peer: Peer,
    disks: Option<&[DiskInfo]>,
) -> Result<Prepared, MigrateError> {
    m.handle.set_phase(Phase::Prepare);
    let Peer {
        mut reader,
        writer,
        version,
        agent: dest_agent,
        rtt,
        probe,
    } = peer;
    let mut cancel = m.handle.cancelled();
    // (before anything goes to the destination)
    if version < 8 && m.vm.spec.nics.iter().any(|n| n.ip.is_some()) {
        return Err(MigrateError::BadRequest(format!(
            "VM {} has a card with an address (ip, for ARP suppression) and the destination agent speaks protocol v{version}: it would not read the spec; upgrade tern on {dest_agent}",
            m.vm.spec.name
        )));
    }
    if let Some(disks) = disks {
        if version < 3 {
            return Err(MigrateError::BadRequest(format!(
                "VM {} has local disks and the destination agent speaks protocol v{version}: moving disks needs v3 (upgrade tern on {dest_agent})",
                m.vm.spec.name
            )));
        }
        send(
            &writer,
            &Message::DiskOffer {
                disks: disks.to_vec(),
            },
        )
        .await?;
    }
    if m.postcopy_fallback && version < 13 {
        // (a v13 destination waits for a record's content before it runs the VM; an older
        // one refuses PostcopyRun behind such a record, which the dedup path may send)
        let note = format!("no post-copy as the last resort, pre-copy only: the destination agent speaks protocol v{version}, and post-copy after pre-copy needs v13 (upgrade tern on {dest_agent})");
        tracing::warn!(migration = %m.handle.id, "{note}");
        m.handle.update(|s| s.progress.notes.push(note));
        m.postcopy_fallback = false;
    }
    if m.req.postcopy || m.postcopy_fallback {
        if version < 10 {
            return Err(MigrateError::PostcopyRefused(format!(
                "the destination agent speaks protocol v{version}: post-copy needs v10 (upgrade tern on {dest_agent})"
            )));
        }
        send(&writer, &Message::PostcopyOffer).await?;
    }
    if m.vm.spec.tpm {
        // only now, after the policy allowed this destination: the key that opens the
        // VM's TPM state in the stream
        if version < 4 {
            return Err(MigrateError::BadRequest(format!(
                "VM {} has a vTPM and the destination agent speaks protocol v{version}: moving a vTPM needs v4 (upgrade tern on {dest_agent})",
                m.vm.spec.name
            )));
        }
        let key = m.vm.tpm_key.ok_or_else(|| {
            MigrateError::BadRequest(format!("VM {} has no vTPM migration key", m.vm.spec.name))
        })?;
        send(&writer, &Message::TpmKey { key }).await?;
    }
    // a shared disk goes with what this host sees of it, for the destination to compare
    let mut spec = m.vm.spec.clone();
    for (i, d) in spec.disks.iter_mut().enumerate() {
        d.sample = None;
        if d.shared {
            let path = d.path.clone();
            let read = tokio::time::timeout(
                Duration::from_secs(30),
                tokio::task::spawn_blocking(move || crate::disk::shared_sample(&path)),
            )
            .await
            .map_err(|_| "the shared storage did not answer within 30 s".to_string())
            .and_then(|r| r.map_err(|e| e.to_string()))
            .and_then(|r| r);
            let sample = read.map_err(|e| {
                MigrateError::BadRequest(format!("shared disk {i} ({}): {e}", d.path.display()))
            })?;
            d.sample = Some(sample);
        }
    }
    send(
        &writer,
        &Message::Prepare {
            migration_id: m.wire_id(),
            spec_toml: spec.to_toml(),
            source_running: m.source_running,
            qemu_version: m.vm.qemu_version.clone(),
        },
    )
    .await?;

    // the destination's summary (bounded) until Prepared; one budget for the whole
    // exchange: a destination that keeps sending Summary frames cannot hold the source
    let mut summary: HashSet<u64> = HashSet::new();
    let mut dest_key = None;
    let deadline = tokio::time::Instant::now() + PREPARE_WITHIN;
    let mut summary_cut = false;
    let dest_qemu = loop {
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        let msg = tokio::select! {
            msg = expect(&mut reader, left, "Prepared") => msg?,
            _ = wait_cancelled(&mut cancel) => return Err(MigrateError::Cancelled),
        };
        match msg {
            Message::Summary { key_id, prefixes } => {
                if dest_key.is_some_and(|k| k != key_id) {
                    return Err(MigrateError::Protocol(
                        "Summary frames with two cluster key ids".into(),
                    ));
                }
                dest_key = Some(key_id);
                let room = limits::MAX_SUMMARY_PREFIXES.saturating_sub(summary.len());
                if prefixes.len() > room && !summary_cut {
                    summary_cut = true;
                    tracing::warn!(migration = %m.handle.id, kept = limits::MAX_SUMMARY_PREFIXES, "the destination's summary is larger than this agent keeps: the rest is ignored (fewer references)");
                }
                summary.extend(prefixes.into_iter().take(room));
            }
            Message::Prepared { qemu_version } => break qemu_version,
            msg => return Err(unexpected(&msg, "Prepared")),
        }
    };

    // how the data travels
    let same_key = dest_key == Some(m.engine.hasher.key_id());
    if version >= 2 && !same_key {
        tracing::warn!(migration = %m.handle.id, "the destination uses another cluster key: no references or deltas (give both agents the same --cluster-key)");
    }
    // references and deltas are possible (whether they are used, the data path decides)
    let dedup = version >= 2 && same_key && m.req.dedup != Some(false);
    let policy = if version >= 2 {
        CodecPolicy::from(m.req.compression.unwrap_or_default())
    } else {
        CodecPolicy::Fixed(Codec::None)
    };
    m.handle
        .update(|s| s.progress.destination_held_pages = summary.len() as u64);
    // for the prediction: how much of the RAM sample the destination holds (the
    // sample's hashes serve nothing after this)
    let sample = std::mem::take(&mut m.sample_hashes);
    if let Some(c) = m.content.as_mut() {
        if same_key && !sample.is_empty() {
            let held = sample
                .iter()
                .filter(|h| summary.contains(&tern_store::prefix(h)))
                .count();
            c.held = Some(held as f64 / sample.len() as f64);
        }
    }
    let pace_policy = PacePolicy::from_request(&m.req);
    let pacer = Pacer::new(pace_policy, m.t0);
    let budget = pacing::budget(&pace_policy, &pacer);
    let mut probes: Vec<TcpProbe> = probe.into_iter().collect();
    // parallel streams: extra connections that carry the data frames, in sequence
    let data_streams = if version >= 2 {
        match m.req.streams {
            Some(n) => n.min(limits::MAX_DATA_STREAMS),
            None if rtt >= Duration::from_millis(10) => 4,
            None => 0,
        }
    } else {
        0
    };
    let mut links = Links::new(budget.clone());
    let mut tasks = Vec::new();
    for index in 1..=data_streams {
        let (w, probe) = open_data_stream(m, index).await?;
        probes.extend(probe);
        let (tx, rx) = mpsc::channel(2);
        let handle = m.handle.clone();
        let t = crate::spawn(async move {
            if let Err(e) = data_link(w, rx, handle).await {
                tracing::warn!("data stream {index} failed: {e}");
            }
        });
        tasks.push(AbortOnDrop(t.abort_handle()));
        links.senders.push(tx);
    }
    if data_streams > 0 {
        tracing::info!(migration = %m.handle.id, streams = data_streams, rtt_ms = rtt.as_millis() as u64, "parallel data streams");
    }
    let encoder = PageEncoder::new(
        m.engine.hasher.clone(),
        m.engine.store.clone(),
        dedup,
        summary,
    );

    // the destination's frames from here on: return path (once QEMU is connected), disk
    // replies, control messages
    let (ev_tx, events) = mpsc::channel(16);
    let (disk_tx, disk_inbox) = mpsc::channel(limits::MAX_DISK_REPLIES);
    let (qemu_tx, qemu_rx) = oneshot::channel();
    let flow = (version >= 2).then(|| Arc::new(Flow::new()));
    // a libvirt domain's QEMU: the destination QEMU's SHUT ends the stream (see
    // `peer_reader`)
    let (shut_gate, stream_end) = match m.vm.qemu {
        super::SourceQemu::Libvirt(_) => {
            let (tx, rx) = oneshot::channel();
            (Some(tx), Some(rx))
        }
        super::SourceQemu::Tern(_) => (None, None),
    };
    let t = crate::spawn(peer_reader(
        reader,
        (qemu_rx, shut_gate),
        ev_tx,
        disk_tx,
        m.handle.clone(),
        writer.clone(),
        (m.engine.store.clone(), encoder.offered()),
        flow.clone(),
    ));
    tasks.push(AbortOnDrop(t.abort_handle()));
    let dirty_hint = super::plan::dirty_rate_at_start(m).await;
    let pacing = Pacing::start(m.handle.clone(), probes, budget.clone(), pacer, dirty_hint);
    Ok(Prepared {
        writer,
        version,
        dest_agent,
        dest_qemu,
        rtt,
        policy,
        links,
        encoder,
        budget,
        pacing,
        events,
        disk_inbox,
        qemu_tx: Some(qemu_tx),
        stream_end,
        flow,
        tasks,
    })
}

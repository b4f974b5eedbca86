//! Phase `Prepare`: the incoming VM's spec vetted (`spec.rs`), the migration admitted (an
//! id used once, bound to the certificate that sent Prepare; at most so many at once), its
//! name reserved, its run directory made (marked incoming until the switchover), its disk
//! images made (room checked), its QEMU started paused with `-incoming defer` and handed
//! the socket its stream will come through; then the page summary (v2) and Prepared.

use std::path::PathBuf;
use std::sync::Arc;

use serde_json::json;
use tern_proto::{limits, ErrorCode, Message};
use tern_qemu::launch::LaunchOptions;
use tern_qemu::qmp::{QmpClient, QmpEvent};
use tern_qemu::spec::VmSpec;
use tokio::net::unix;
use tokio::sync::{broadcast, mpsc};

use super::hello::PrepareRequest;
use super::record::INCOMING_MARKER;
use super::spec::{major_minor, open_shared_disks, vet_incoming_spec};
use super::{qmp_failed, refuse, Conn, Incoming, IncomingError};
use crate::disk::{free_bytes, incoming_disk_path, DestDisks};
use crate::error::error_chain;
use crate::handle::{MigrationHandle, Phase};
use crate::pages::PageDecoder;
use crate::registry::{AddIncomingError, StreamsGuard};
use crate::transport::conn::FrameReader;
use crate::transport::tls::PeerRead;

/// An incoming migration whose QEMU waits for its stream.
pub(super) struct Prepared {
    pub id: String,
    pub handle: Arc<MigrationHandle>,
    pub spec: VmSpec,
    pub run_dir: PathBuf,
    pub source_running: bool,
    pub version: u16,
    /// tern's QEMU's monitor and events; None for a libvirt domain's QEMU (carried).
    pub qmp: Option<QmpClient>,
    pub qemu_events: Option<broadcast::Receiver<QmpEvent>>,
    pub qemu_rd: Option<unix::OwnedReadHalf>,
    /// QEMU's incoming stream, until the transfer's feeder takes it.
    pub qemu_wr: Option<unix::OwnedWriteHalf>,
    pub disks: Option<DestDisks>,
    /// The pages this host holds, pinned for the migration; what it receives goes there.
    pub pages: PageDecoder,
    /// Extra data connections of this migration, as they attach.
    pub attached: mpsc::UnboundedReceiver<(u16, FrameReader<PeerRead>)>,
    pub _streams: StreamsGuard,
    /// v10: a post-copy migration (the VM runs here from PostcopyRun on).
    pub postcopy: bool,
}

impl Prepared {
    /// tern's QEMU's monitor (a libvirt domain's QEMU has none for tern).
    pub fn qmp(&self) -> Result<QmpClient, IncomingError> {
        self.qmp.clone().ok_or_else(|| {
            IncomingError::Qemu("a libvirt domain's QEMU has no monitor for tern".into())
        })
    }
}

pub(super) async fn run(
    inc: &mut Incoming,
    conn: &mut Conn,
    r: PrepareRequest,
) -> Result<Prepared, IncomingError> {
    let engine = inc.engine.clone();
    let config = &engine.config;
    let PrepareRequest {
        id,
        spec_toml,
        source_running,
        source_qemu,
        disk_offer,
        tpm_key,
        postcopy,
        peer_name,
        version,
    } = r;
    if !id.chars().all(|c| c.is_ascii_alphanumeric() || c == '-') || id.is_empty() || id.len() > 64
    {
        return Err(refuse(
            ErrorCode::Protocol,
            format!("invalid migration id {id:?}"),
        ));
    }
    let mut spec = VmSpec::from_toml(&spec_toml)
        .and_then(|s| s.validate_migrating().map(|()| s))
        .map_err(|e| refuse(ErrorCode::SpecRejected, error_chain(&e)))?;
    if postcopy {
        // (the source refuses these too; a peer is authenticated, not trusted)
        if spec.libvirt.is_some()
            || !crate::disk::local_disks(&spec).is_empty()
            || spec.memory == tern_qemu::spec::GuestMemory::Shared
        {
            return Err(refuse(
                ErrorCode::SpecRejected,
                "post-copy is not available for a libvirt domain, a VM with local disks or one with shared memory",
            ));
        }
    }
    if spec.libvirt.is_some() {
        return prepare_carried(inc, conn, spec, id, source_running, version, peer_name).await;
    }
    vet_incoming_spec(config, &mut spec)?;
    if spec.tpm != tpm_key.is_some() {
        return Err(if spec.tpm {
            refuse(
                ErrorCode::SpecRejected,
                "a VM with a vTPM needs its migration key (TpmKey) before Prepare",
            )
        } else {
            refuse(ErrorCode::Protocol, "TpmKey for a VM without a vTPM")
        });
    }
    let offer = disk_offer.unwrap_or_default();
    let local = crate::disk::local_disks(&spec);
    if offer.len() != local.len() {
        return Err(refuse(
            ErrorCode::Protocol,
            format!(
                "the spec has {} local disks, the source offered {}",
                local.len(),
                offer.len()
            ),
        ));
    }
    {
        // the local disks are made here below, the shared ones opened after the policy
        let mut files = spec.clone();
        files.disks.clear();
        files
            .check_files()
            .map_err(|e| refuse(ErrorCode::SpecRejected, error_chain(&e)))?;
    }
    // the source checked our labels; check again with our own policy
    inc.host
        .authorize_here(&spec)
        .map_err(|e| refuse(ErrorCode::NotAuthorized, e))?;
    inc.host
        .vet_networks(&spec)
        .await
        .map_err(|e| refuse(ErrorCode::SpecRejected, e))?;
    let handle = admit(inc, conn, &id, &spec, &peer_name)?;
    if !inc.host.reserve_name(&spec.name) {
        return Err(refuse(
            ErrorCode::VmExists,
            format!(
                "a VM named {:?} already exists on {}",
                spec.name, config.name
            ),
        ));
    }
    inc.name = Some(spec.name.clone());
    handle.set_phase(Phase::Prepare);
    let shared = if spec.disks.iter().any(|d| d.shared) {
        let (host, mut s) = (config.name.clone(), spec.clone());
        let opened = tokio::time::timeout(
            std::time::Duration::from_secs(30),
            tokio::task::spawn_blocking(move || open_shared_disks(&mut s, &host).map(|o| (s, o))),
        )
        .await
        .map_err(|_| {
            refuse(
                ErrorCode::Timeout,
                "the shared storage did not answer within 30 s",
            )
        })?
        .map_err(|e| refuse(ErrorCode::Internal, e.to_string()))??;
        spec = opened.0;
        for (i, image) in opened.1.iter().enumerate() {
            let Some(image) = image else { continue };
            if let Some(vm) = inc.host.disk_user(image.id) {
                return Err(refuse(
                    ErrorCode::SpecRejected,
                    format!(
                        "shared disk {i} ({}) is VM {vm:?}'s disk here: two QEMUs writing one image would corrupt it",
                        spec.disks[i].path.display()
                    ),
                ));
            }
        }
        opened.1
    } else {
        Vec::new()
    };

    let run_dir = inc.host.new_run_dir(&spec.name);
    inc.run_dir = Some(run_dir.clone());
    let mut opts = LaunchOptions::new(run_dir.clone());
    opts.disk_fds = shared
        .into_iter()
        .map(|o| o.map(|i| std::sync::Arc::new(i.fd)))
        .collect();
    opts.incoming_defer = true;
    opts.start_paused = true;
    // cleanup is explicit; after the switchover the VM outlives us
    opts.kill_on_drop = false;
    // Until the switchover this QEMU is not a VM of ours: a restarted agent removes it.
    std::fs::create_dir_all(&run_dir)
        .and_then(|_| std::fs::write(run_dir.join(INCOMING_MARKER), id.as_bytes()))
        .map_err(|e| {
            refuse(
                ErrorCode::ResourceExhausted,
                format!("cannot create {}: {e}", run_dir.display()),
            )
        })?;
    if let Some(key) = &tpm_key {
        crate::secret::write_file(&crate::tpm_migration_key_path(&run_dir), key, 0o600).map_err(
            |e| {
                refuse(
                    ErrorCode::ResourceExhausted,
                    format!(
                        "cannot keep the vTPM key in {}: {}",
                        run_dir.display(),
                        error_chain(&e)
                    ),
                )
            },
        )?;
    }
    if !local.is_empty() {
        prepare_disks(&config.name, &mut spec, &local, &offer, &run_dir).await?;
    }
    let process = inc
        .host
        .launch(&spec, &opts)
        .await
        .map_err(|e| refuse(ErrorCode::QemuLaunchFailed, e.0))?;
    let qmp = process.qmp.clone();
    let qemu_version = qmp.version().to_string();
    handle.update(|s| s.dest_qemu_pid = process.pid());
    inc.process = Some(process);
    // QEMU migrates only to the same or a newer version (an older one rejects what it does
    // not know, e.g. 7.2 and SWITCHOVER_START): refuse before anything moves.
    if let (Some(src), Some(dst)) = (major_minor(&source_qemu), major_minor(&qemu_version)) {
        if dst < src {
            return Err(refuse(
                ErrorCode::SpecRejected,
                format!(
                    "destination QEMU {qemu_version} is older than the source's {source_qemu}: QEMU migrates only to the same or a newer version; upgrade QEMU on {}",
                    config.name
                ),
            ));
        }
    }
    // a shared disk's image is the source's too: this QEMU takes it (its write lock) only
    // when it runs the VM, after the commit, not as soon as the stream loaded; a source
    // that runs on after a failure then keeps it
    // (a VM that was paused is never continued here: its image is activated as usual)
    let late = source_running && spec.disks.iter().any(|d| d.shared);
    qmp.set_migrate_capabilities(&[
        ("return-path", true),
        ("events", true),
        ("late-block-activate", late),
        // post-copy (v10, PostcopyOffer): QEMU loads the device state at POSTCOPY_RUN
        // and fetches the rest of memory on demand over the return path
        ("postcopy-ram", postcopy),
        // and measures what the guest's page faults cost it (the report's faults)
        ("postcopy-blocktime", postcopy),
    ])
    .await
    .map_err(qmp_failed("setting its migration capabilities"))?;
    let qemu_events = qmp.subscribe();
    // the stream comes in over a socket QEMU is handed (it may not open paths itself)
    let qemu_sock = qmp
        .stream_socket("tern-incoming", tern_qemu::qmp::STREAM_SOCKET_BUFFER)
        .await
        .map_err(qmp_failed("handing it the stream's socket"))?;
    qmp.execute(
        "migrate-incoming",
        Some(json!({ "uri": "fd:tern-incoming" })),
    )
    .await
    .map_err(qmp_failed("migrate-incoming"))?;
    // the disks: written through the incoming QEMU's own NBD exports
    let disks = if local.is_empty() {
        None
    } else {
        Some(
            DestDisks::start(
                &qmp,
                &run_dir,
                &local,
                offer.iter().map(|d| d.virtual_size).collect(),
                offer
                    .iter()
                    .fold(0u64, |a, d| a.saturating_add(d.allocated)),
                engine.chunks.clone(),
                engine.hasher.clone(),
                conn.writer.clone(),
            )
            .await
            .map_err(|e| IncomingError::Qemu(format!("cannot export the incoming disks: {e}")))?,
        )
    };
    let (qemu_rd, qemu_wr) = qemu_sock.into_split();
    let (pages, attached, streams) = offer_pages(inc, conn, &id, version).await?;
    conn.send(&Message::Prepared { qemu_version }).await?;
    Ok(Prepared {
        id,
        handle,
        spec,
        run_dir,
        source_running,
        version,
        qmp: Some(qmp),
        qemu_events: Some(qemu_events),
        qemu_rd: Some(qemu_rd),
        qemu_wr: Some(qemu_wr),
        disks,
        pages,
        attached,
        _streams: streams,
        postcopy,
    })
}

/// The migration admitted: an id used once, at most so many at once; its handle.
fn admit(
    inc: &mut Incoming,
    conn: &Conn,
    id: &str,
    spec: &VmSpec,
    peer_name: &str,
) -> Result<Arc<MigrationHandle>, IncomingError> {
    let config = &inc.engine.config;
    let handle = Arc::new(MigrationHandle::incoming(
        id.to_string(),
        spec.name.clone(),
        format!("{peer_name} ({})", conn.addr),
        conn.peer.fingerprint.clone(),
    ));
    match inc.engine.registry.add_incoming(handle.clone()) {
        Ok(()) => {}
        Err(AddIncomingError::KnownId) => {
            return Err(refuse(
                ErrorCode::Protocol,
                format!("migration id {id} is already known on {}", config.name),
            ))
        }
        Err(AddIncomingError::Busy(n)) => {
            return Err(refuse(
                ErrorCode::ResourceExhausted,
                format!(
                    "{} already receives {n} migrations at once; try again when one has finished",
                    config.name
                ),
            ))
        }
    }
    inc.handle = Some(handle.clone());
    Ok(handle)
}

/// What this host holds, so the source can send references instead of pages (v2); and
/// where the extra data connections arrive.
async fn offer_pages(
    inc: &Incoming,
    conn: &mut Conn,
    id: &str,
    version: u16,
) -> Result<
    (
        PageDecoder,
        mpsc::UnboundedReceiver<(u16, FrameReader<PeerRead>)>,
        StreamsGuard,
    ),
    IncomingError,
> {
    let engine = &inc.engine;
    let mut pages = PageDecoder::new(engine.hasher.clone(), engine.store.clone());
    if version >= 2 {
        let (key_id, prefixes) = pages.summary();
        tracing::info!(migration = %id, pages = prefixes.len(), "sending the page summary");
        // 1 MiB frames: the source reads them as they come
        let mut chunks = prefixes.chunks(128 << 10).peekable();
        if chunks.peek().is_none() {
            conn.send(&Message::Summary {
                key_id,
                prefixes: Vec::new(),
            })
            .await?;
        }
        for chunk in chunks {
            conn.send(&Message::Summary {
                key_id,
                prefixes: chunk.to_vec(),
            })
            .await?;
        }
    }
    // Extra data connections (parallel streams) arrive through the registry.
    let (attach_tx, attached) = mpsc::unbounded_channel();
    let streams = engine
        .registry
        .accept_streams(id, &conn.peer.fingerprint, attach_tx);
    Ok((pages, attached, streams))
}

/// A libvirt domain's migration, carried: libvirt started the destination QEMU (listening
/// on the domain's carrier socket, `tern_engine::libvirt`); this side connects to it
/// instead of launching one. Nothing of the VM is tern's here: no name, no run directory.
async fn prepare_carried(
    inc: &mut Incoming,
    conn: &mut Conn,
    spec: VmSpec,
    id: String,
    source_running: bool,
    version: u16,
    peer_name: String,
) -> Result<Prepared, IncomingError> {
    let config = &inc.engine.config;
    let domain = spec
        .libvirt
        .as_ref()
        .map(|l| l.domain.clone())
        .unwrap_or_default();
    if version < 2 {
        return Err(refuse(
            ErrorCode::Protocol,
            "a carried libvirt migration needs protocol version 2 or newer",
        ));
    }
    super::spec::fits_here(config, &spec)?;
    inc.host
        .authorize_here(&spec)
        .map_err(|e| refuse(ErrorCode::NotAuthorized, e))?;
    let handle = admit(inc, conn, &id, &spec, &peer_name)?;
    handle.set_phase(Phase::Prepare);
    let qemu = crate::libvirt::connect(&inc.engine.config.libvirt, &domain)
        .await
        .map_err(|e| refuse(ErrorCode::QemuLaunchFailed, error_chain(&e)))?;
    let pid = inc.engine.config.libvirt.domain_pid(&domain).ok();
    // (a domain whose disks another peer tunnelled to is that peer's)
    inc.engine
        .registry
        .tunnel_claims
        .check_stream(&domain, pid.unwrap_or(0), &conn.peer.fingerprint)
        .map_err(|e| refuse(ErrorCode::NotAuthorized, e.to_string()))?;
    handle.update(|s| s.dest_qemu_pid = pid);
    tracing::info!(migration = %id, %domain, ?pid, "connected to the QEMU libvirt started for the domain");
    let (qemu_rd, qemu_wr) = qemu.into_split();
    let (pages, attached, streams) = offer_pages(inc, conn, &id, version).await?;
    conn.send(&Message::Prepared {
        qemu_version: format!("libvirt's (domain {domain})"),
    })
    .await?;
    Ok(Prepared {
        id,
        handle,
        spec,
        run_dir: PathBuf::new(),
        source_running,
        version,
        qmp: None,
        qemu_events: None,
        qemu_rd: Some(qemu_rd),
        qemu_wr: Some(qemu_wr),
        disks: None,
        pages,
        attached,
        _streams: streams,
        postcopy: false,
    })
}

/// Room, paths and empty images for an incoming VM's local disks (spec indexes `local`,
/// offered in that order): each goes to `RUN/disks/diskN.FMT` (a flat image of the source's virtual size; the rebuild fills
/// it), and `spec` is rewritten to use them. Refuses before QEMU starts when the
/// filesystem lacks room for what the source has allocated.
async fn prepare_disks(
    host_name: &str,
    spec: &mut VmSpec,
    local: &[usize],
    offer: &[tern_proto::DiskInfo],
    run_dir: &std::path::Path,
) -> Result<(), IncomingError> {
    let dir = run_dir.join("disks");
    std::fs::create_dir_all(&dir).map_err(|e| {
        refuse(
            ErrorCode::ResourceExhausted,
            format!("cannot create {}: {e}", dir.display()),
        )
    })?;
    for (i, d) in offer.iter().enumerate() {
        if d.virtual_size == 0
            || d.virtual_size > limits::MAX_DISK_BYTES
            || !d.virtual_size.is_multiple_of(512)
            || d.allocated > d.virtual_size
        {
            return Err(refuse(
                ErrorCode::Protocol,
                format!(
                    "DiskOffer: disk {i} of {} bytes with {} allocated (sizes are multiples of 512 up to {} TiB, allocated at most the size)",
                    d.virtual_size,
                    d.allocated,
                    limits::MAX_DISK_BYTES >> 40
                ),
            ));
        }
    }
    let needed = offer
        .iter()
        .fold(0u64, |a, d| a.saturating_add(d.allocated));
    // qcow2 metadata and the filesystem's own needs; the copy keeps this much free too,
    // whatever `allocated` said (the disk worker watches)
    let margin = crate::disk::FREE_SPACE_RESERVE;
    let free = free_bytes(&dir).map_err(|e| {
        refuse(
            ErrorCode::ResourceExhausted,
            format!("cannot tell the free space in {}: {e}", dir.display()),
        )
    })?;
    if free < needed.saturating_add(margin) {
        return Err(refuse(
            ErrorCode::ResourceExhausted,
            format!(
                "not enough disk space on {} for VM {}'s disks: they hold {} MiB on the source, {} has {} MiB free; free space there or migrate elsewhere",
                host_name,
                spec.name,
                needed.div_ceil(1 << 20),
                dir.display(),
                free >> 20
            ),
        ));
    }
    for (&i, info) in local.iter().zip(offer) {
        let d = &mut spec.disks[i];
        let path = incoming_disk_path(run_dir, i, d.format.as_str());
        tern_qemu::disk::create_image(&path, d.format, info.virtual_size)
            .await
            .map_err(|e| {
                refuse(
                    ErrorCode::ResourceExhausted,
                    format!(
                        "cannot create disk {i} at {}: {}",
                        path.display(),
                        error_chain(&e)
                    ),
                )
            })?;
        d.path = path;
    }
    Ok(())
}

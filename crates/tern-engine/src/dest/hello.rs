//! The opening of a peer connection: Hello and the version both speak, then what the
//! connection is for. A Query is answered here (only to the certificate that prepared the
//! migration); an Attach hands the connection to its migration, a PostcopyResume (v11)
//! too (post-copy goes on on it after the link broke); a Prepare (after the VM's
//! DiskOffer and TpmKey, when it has them) starts an incoming migration; a Tunnel carries a
//! libvirt domain's storage connection (`crate::tunnel`); Locations are where a peer's
//! VMs' network cards live (`crate::overlay`), answered with this host's; a PlanQuery is a
//! source's `--plan` (`plan.rs`).

use std::time::Duration;

use tern_proto::{DiskInfo, ErrorCode, Message};

use super::{refuse, Conn, Incoming, IncomingError};

/// What the source asked for in Prepare, and what came before it.
pub(super) struct PrepareRequest {
    pub id: String,
    pub spec_toml: String,
    pub source_running: bool,
    pub source_qemu: String,
    pub disk_offer: Option<Vec<DiskInfo>>,
    pub tpm_key: Option<[u8; 32]>,
    /// v10: the source offered post-copy (PostcopyOffer).
    pub postcopy: bool,
    /// The source agent's name, as it said it.
    pub peer_name: String,
    pub version: u16,
}

/// What the connection is for.
pub(super) enum Opening {
    Prepare(PrepareRequest),
    Attach {
        id: String,
        index: u16,
    },
    /// A Query, answered.
    Answered,
    /// Post-copy migration `id` goes on on this connection (v11), after the link broke.
    Resume {
        id: String,
    },
    /// A storage tunnel of libvirt domain `domain` (v6).
    Tunnel {
        domain: String,
    },
    /// A plan's question (v9): how much of a page sample is held here, then a link probe.
    Plan {
        key_id: u64,
        hashes: Vec<tern_proto::ContentHash>,
        chunks: Vec<tern_proto::ContentHash>,
    },
    /// Where the peer's VMs' cards live (v7), with its name, to be answered.
    Locations {
        peer: String,
        entries: Vec<tern_proto::Location>,
    },
}

pub(super) async fn run(inc: &mut Incoming, conn: &mut Conn) -> Result<Opening, IncomingError> {
    let config = &inc.engine.config;
    let (peer_min, peer_max, peer_name) = match conn.next(Duration::from_secs(30), "Hello").await? {
        Message::Hello {
            min_version,
            max_version,
            agent,
        } => (min_version, max_version, agent),
        m => {
            return Err(refuse(
                ErrorCode::Protocol,
                format!("expected Hello, got {}", m.name()),
            ))
        }
    };
    let Some(version) = tern_proto::negotiate(peer_min, peer_max.min(config.max_protocol)) else {
        return Err(refuse(
            ErrorCode::VersionMismatch,
            format!(
                "no common protocol version: peer speaks {peer_min}..={peer_max}, this agent {}..={}",
                tern_proto::MIN_PROTOCOL_VERSION,
                tern_proto::PROTOCOL_VERSION
            ),
        ));
    };
    conn.send(&Message::HelloAck {
        version,
        agent: config.name.clone(),
    })
    .await?;

    // (v3: the VM's disks first, when it has some; v4: its vTPM key)
    let mut disk_offer = None;
    let mut tpm_key = None;
    let mut postcopy = false;
    loop {
        match conn.next(Duration::from_secs(30), "Prepare").await? {
            Message::DiskOffer { disks } => disk_offer = Some(disks),
            Message::TpmKey { key } => tpm_key = Some(key),
            Message::PostcopyOffer => postcopy = true,
            Message::Prepare {
                migration_id,
                spec_toml,
                source_running,
                qemu_version,
            } => {
                return Ok(Opening::Prepare(PrepareRequest {
                    id: migration_id,
                    spec_toml,
                    source_running,
                    source_qemu: qemu_version,
                    disk_offer,
                    tpm_key,
                    postcopy,
                    peer_name,
                    version,
                }))
            }
            Message::Attach {
                migration_id,
                index,
            } => {
                return Ok(Opening::Attach {
                    id: migration_id,
                    index,
                })
            }
            Message::Tunnel { domain } => return Ok(Opening::Tunnel { domain }),
            Message::PostcopyResume { migration_id } => {
                return Ok(Opening::Resume { id: migration_id })
            }
            Message::PlanQuery {
                key_id,
                hashes,
                chunks,
            } => {
                return Ok(Opening::Plan {
                    key_id,
                    hashes,
                    chunks,
                })
            }
            Message::Locations { entries } => {
                return Ok(Opening::Locations {
                    peer: peer_name,
                    entries,
                })
            }
            Message::Query { migration_id } => {
                let (state, resumed_unix_us) = inc
                    .engine
                    .registry
                    .incoming_state(&migration_id, &conn.peer.fingerprint)
                    .map_err(|e| refuse(ErrorCode::NotAuthorized, e.to_string()))?;
                tracing::info!(migration = %migration_id, ?state, "answered a query");
                conn.send(&Message::QueryAnswer {
                    state,
                    resumed_unix_us,
                })
                .await?;
                return Ok(Opening::Answered);
            }
            m => {
                return Err(refuse(
                    ErrorCode::Protocol,
                    format!("expected Prepare, got {}", m.name()),
                ))
            }
        }
    }
}

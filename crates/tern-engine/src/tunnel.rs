//! Storage tunnels (protocol v6): one connection of a libvirt domain's storage migration,
//! carried byte for byte between the agents. libvirt copies a domain's local disks with
//! its source QEMU mirroring each disk over NBD to its destination QEMU, on the same
//! socket path on both hosts (`--disks-uri unix://...`, [`crate::libvirt`]). The source
//! agent accepts each of those connections and opens a tunnel for it ([`carry_out`]): a
//! mutually authenticated connection to the destination agent (Hello, the policy on the
//! destination's labels, `Tunnel{domain}`); the destination agent connects to the NBD
//! server libvirt's QEMU runs for that domain there (its listener must be that QEMU) and
//! answers `TunnelOpen` ([`serve`]); from then on the connection carries the NBD bytes
//! both ways, inside TLS, until either end closes. tern does not read the NBD protocol:
//! libvirt's mirror decides what is copied and whether the copy succeeded (a tunnel that
//! breaks fails the mirror, and libvirt keeps the domain at the source).

use std::time::Duration;

use bytes::BytesMut;
use tern_proto::{ErrorCode, Message};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio::net::UnixStream;

use crate::libvirt::CarrierError;
use crate::transport::conn::{ExpectError, FrameReader, FrameWriter};
use crate::transport::tls::{HandshakeError, PeerIdentity};
use crate::Engine;

/// The first protocol version with storage tunnels.
pub const TUNNEL_VERSION: u16 = 6;

/// How long each step of opening a tunnel may take.
const OPEN_WITHIN: Duration = Duration::from_secs(30);

/// What a tunnel carried.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TunnelBytes {
    /// From the source QEMU to the destination QEMU (the disks' data, mostly).
    pub to_destination: u64,
    /// The other way (NBD replies).
    pub to_source: u64,
}

/// Why a tunnel could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum TunnelError {
    #[error("cannot reach the destination agent for the storage tunnel")]
    Connect(#[from] HandshakeError),
    #[error("the destination agent speaks protocol v{0}: carrying a libvirt domain's disks needs v{TUNNEL_VERSION} (upgrade tern there)")]
    PeerTooOld(u16),
    #[error("the destination agent {0}")]
    NotAuthorized(String),
    #[error("the destination agent refused the storage tunnel ({}): {message}", .code.name())]
    Refused { code: ErrorCode, message: String },
    #[error("the storage tunnel's opening failed")]
    Opening(#[source] ExpectError),
    #[error("the destination agent answered {0} to a storage tunnel")]
    Unexpected(&'static str),
    #[error("writing to the destination agent failed")]
    Write(#[source] std::io::Error),
    #[error(transparent)]
    Carrier(#[from] CarrierError),
}

impl TunnelError {
    /// The code a refusal of this kind is sent with.
    fn code(&self) -> ErrorCode {
        match self {
            TunnelError::Carrier(_) => ErrorCode::QemuFailed,
            TunnelError::NotAuthorized(_) => ErrorCode::NotAuthorized,
            _ => ErrorCode::Internal,
        }
    }
}

/// Source side: carries `qemu` (one NBD connection the domain's QEMU opened on its storage
/// socket) to the agent at `to`, until either end closes. `authorize` gets the
/// destination agent's name and certificate (the policy, as for the migration).
pub async fn carry_out(
    engine: &Engine,
    to: &str,
    domain: &str,
    authorize: impl FnOnce(&str, &PeerIdentity) -> Result<(), String>,
    qemu: UnixStream,
) -> Result<TunnelBytes, TunnelError> {
    let (stream, identity) = engine
        .security
        .connect(to, OPEN_WITHIN, engine.config.stall_timeout)
        .await?;
    let (rd, wr) = stream.split();
    let mut reader = FrameReader::new(rd);
    let mut writer = FrameWriter::new(wr).with_deadline(engine.config.stall_timeout);
    writer
        .send(&Message::Hello {
            min_version: tern_proto::MIN_PROTOCOL_VERSION,
            max_version: engine.config.max_protocol,
            agent: engine.config.name.clone(),
        })
        .await
        .map_err(TunnelError::Write)?;
    let agent = match expect(&mut reader, "HelloAck").await? {
        Message::HelloAck { version, .. } if version < TUNNEL_VERSION => {
            return Err(TunnelError::PeerTooOld(version))
        }
        Message::HelloAck { agent, .. } => agent,
        m => return Err(TunnelError::Unexpected(m.name())),
    };
    authorize(&agent, &identity).map_err(TunnelError::NotAuthorized)?;
    writer
        .send(&Message::Tunnel {
            domain: domain.into(),
        })
        .await
        .map_err(TunnelError::Write)?;
    match expect(&mut reader, "TunnelOpen").await? {
        Message::TunnelOpen => {}
        m => return Err(TunnelError::Unexpected(m.name())),
    }
    let (rd, early) = reader.into_parts();
    let wr = writer.into_inner().await.map_err(TunnelError::Write)?;
    let (to_source, to_destination) = splice(rd, early, wr, qemu).await;
    Ok(TunnelBytes {
        to_destination,
        to_source,
    })
}

async fn expect<R: AsyncRead + Unpin>(
    reader: &mut FrameReader<R>,
    what: &'static str,
) -> Result<Message, TunnelError> {
    reader.expect(OPEN_WITHIN, what).await.map_err(|e| match e {
        ExpectError::Aborted { code, message } => TunnelError::Refused { code, message },
        e => TunnelError::Opening(e),
    })
}

/// Destination side, after `Tunnel{domain}`: connects to the NBD server of the QEMU
/// libvirt runs for `domain` here, answers `TunnelOpen` and carries the bytes until either
/// end closes; or refuses (Abort) when there is no such server.
pub(crate) async fn serve<R, W>(
    engine: &Engine,
    domain: &str,
    reader: FrameReader<R>,
    mut writer: FrameWriter<W>,
) -> Result<TunnelBytes, TunnelError>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let nbd = match crate::libvirt::connect_disks(&engine.config.libvirt, domain).await {
        Ok(s) => s,
        Err(e) => {
            let e = TunnelError::from(e);
            let _ = writer
                .send(&Message::Abort {
                    code: e.code(),
                    message: crate::error_chain(&e),
                })
                .await;
            return Err(e);
        }
    };
    writer
        .send(&Message::TunnelOpen)
        .await
        .map_err(TunnelError::Write)?;
    let (rd, early) = reader.into_parts();
    let wr = writer.into_inner().await.map_err(TunnelError::Write)?;
    let (to_destination, to_source) = splice(rd, early, wr, nbd).await;
    Ok(TunnelBytes {
        to_destination,
        to_source,
    })
}

/// Copies between the peer connection and `local` both ways until both directions ended
/// (each direction's end is passed on as a shutdown): (peer to local, local to peer).
/// Errors end a direction like a close does: the NBD client and server at either end see
/// the connection end and decide (libvirt's mirror fails and the migration with it).
async fn splice<R, W>(
    mut peer_r: R,
    early: BytesMut,
    mut peer_w: W,
    local: UnixStream,
) -> (u64, u64)
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let (mut local_r, mut local_w) = local.into_split();
    let inbound = async {
        let mut n = 0;
        if local_w.write_all(&early).await.is_ok() {
            n += early.len() as u64;
            match tokio::io::copy(&mut peer_r, &mut local_w).await {
                Ok(k) => n += k,
                Err(e) => tracing::debug!("storage tunnel, peer to local: {e}"),
            }
        }
        let _ = local_w.shutdown().await;
        n
    };
    let outbound = async {
        let n = tokio::io::copy(&mut local_r, &mut peer_w)
            .await
            .unwrap_or_else(|e| {
                tracing::debug!("storage tunnel, local to peer: {e}");
                0
            });
        let _ = peer_w.shutdown().await;
        n
    };
    tokio::join!(inbound, outbound)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_splice_carries_both_ways_with_what_came_early_first_and_passes_each_end_on() {
        use tokio::io::AsyncReadExt;
        // the peer side as a socket pair, the local side as QEMU's
        let (peer, mut far) = tokio::net::UnixStream::pair().unwrap();
        let (local, mut qemu) = tokio::net::UnixStream::pair().unwrap();
        let (pr, pw) = peer.into_split();
        let task = tokio::spawn(splice(pr, BytesMut::from(&b"early"[..]), pw, local));
        far.write_all(b" and late").await.unwrap();
        far.shutdown().await.unwrap();
        let mut got = Vec::new();
        qemu.read_to_end(&mut got).await.unwrap();
        assert_eq!(got, b"early and late", "the far end's close reaches QEMU");
        qemu.write_all(b"reply").await.unwrap();
        qemu.shutdown().await.unwrap();
        let mut back = Vec::new();
        far.read_to_end(&mut back).await.unwrap();
        assert_eq!(back, b"reply");
        assert_eq!(task.await.unwrap(), (14, 5));
    }
}

//! Storage tunnels (protocol v6): one connection of a libvirt domain's storage migration,
//! carried byte for byte between the agents. libvirt copies a domain's local disks with
//! its source QEMU mirroring each disk over NBD to its destination QEMU, on the same
//! socket path on both hosts (`--disks-uri unix://...`, [`crate::libvirt`]). The source
//! agent accepts each of those connections and opens a tunnel for it ([`carry_out`]): a
//! mutually authenticated connection to the destination agent (Hello, the policy on the
//! destination's labels, `Tunnel{domain}`); the destination agent connects to the NBD
//! server libvirt's QEMU runs for that domain there (its listener must be that QEMU) and
//! answers `TunnelOpen` ([`serve`]); from then on the connection carries the NBD bytes
//! both ways as `TunnelBytes` frames (the source's compressed with zstd, a frame that
//! does not shrink going as it is), inside TLS, until either end closes. tern does not
//! read the NBD protocol:
//! libvirt's mirror decides what is copied and whether the copy succeeded (a tunnel that
//! breaks fails the mirror, and libvirt keeps the domain at the source).
//!
//! libvirt's NBD server takes any number of connections, and they may write. So the
//! destination lets only one certificate at an incoming domain's QEMU ([`Claims`]): the
//! first peer whose tunnel reached it; another peer's tunnel, or its migration stream
//! for that domain, is refused while that QEMU lives. A peer that is first can only make
//! the real migration fail (libvirt then discards that QEMU and its disk writes).

use std::collections::HashMap;
use std::time::Duration;

use bytes::BytesMut;
use tern_proto::{Codec, ErrorCode, FrameCompressor, Message};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::UnixStream;

use crate::libvirt::CarrierError;
use crate::transport::conn::{ExpectError, FrameReader, FrameWriter};
use crate::transport::tls::HandshakeError;
use crate::{Engine, Host};
use tern_qemu::spec::VmSpec;

/// The first protocol version with storage tunnels.
pub const TUNNEL_VERSION: u16 = 6;

/// How long each step of opening a tunnel may take.
const OPEN_WITHIN: Duration = Duration::from_secs(30);

/// A read of the local connection becomes one frame of at most this many bytes.
const CHUNK: usize = 1 << 20;

/// How the source compresses what it sends (the disks' data): zstd's fastest level, which
/// keeps up with a LAN on one core and still halves ordinary file systems.
const SOURCE_CODEC: Codec = Codec::Zstd(1);

/// Tunnels one peer may hold open to one domain's QEMU at once (libvirt opens one per disk).
pub const MAX_TUNNELS_PER_DOMAIN: u32 = 64;

/// Who holds each libvirt domain migrating in: its incoming QEMU (by pid) and the
/// certificate of the peer that tunnelled to it first. A new QEMU (the next migration)
/// starts a new claim.
#[derive(Default)]
pub struct Claims {
    by_domain: parking_lot::Mutex<HashMap<String, Claim>>,
}

struct Claim {
    qemu_pid: u32,
    fingerprint: String,
    open: u32,
}

/// Why a peer may not tunnel to a domain.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ClaimRefused {
    #[error("another peer's certificate is migrating libvirt domain {0:?} here")]
    OtherPeer(String),
    #[error("{MAX_TUNNELS_PER_DOMAIN} storage tunnels to libvirt domain {0:?} are open already")]
    TooMany(String),
}

/// An open tunnel's hold on its claim; the claim stays (it belongs to the QEMU).
pub struct ClaimGuard<'a> {
    claims: &'a Claims,
    domain: String,
}

impl Drop for ClaimGuard<'_> {
    fn drop(&mut self) {
        if let Some(c) = self.claims.by_domain.lock().get_mut(&self.domain) {
            c.open = c.open.saturating_sub(1);
        }
    }
}

impl Claims {
    /// A tunnel from certificate `fingerprint` to `domain`'s QEMU `qemu_pid`.
    pub fn open(
        &self,
        domain: &str,
        qemu_pid: u32,
        fingerprint: &str,
    ) -> Result<ClaimGuard<'_>, ClaimRefused> {
        let mut all = self.by_domain.lock();
        match all.get_mut(domain) {
            Some(c) if c.qemu_pid == qemu_pid => {
                if c.fingerprint != fingerprint {
                    return Err(ClaimRefused::OtherPeer(domain.into()));
                }
                if c.open >= MAX_TUNNELS_PER_DOMAIN {
                    return Err(ClaimRefused::TooMany(domain.into()));
                }
                c.open += 1;
            }
            _ => {
                all.insert(
                    domain.into(),
                    Claim {
                        qemu_pid,
                        fingerprint: fingerprint.into(),
                        open: 1,
                    },
                );
            }
        }
        Ok(ClaimGuard {
            claims: self,
            domain: domain.into(),
        })
    }

    /// Whether certificate `fingerprint` may carry the migration stream of `domain`'s QEMU
    /// `qemu_pid`: yes, unless another certificate tunnelled to that QEMU.
    pub fn check_stream(
        &self,
        domain: &str,
        qemu_pid: u32,
        fingerprint: &str,
    ) -> Result<(), ClaimRefused> {
        match self.by_domain.lock().get(domain) {
            Some(c) if c.qemu_pid == qemu_pid && c.fingerprint != fingerprint => {
                Err(ClaimRefused::OtherPeer(domain.into()))
            }
            _ => Ok(()),
        }
    }
}

/// What a tunnel carried.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TunnelBytes {
    /// From the source QEMU to the destination QEMU (the disks' data, mostly).
    pub to_destination: u64,
    /// The other way (NBD replies).
    pub to_source: u64,
    /// Frames this side sent on the connection (compressed, headers included).
    pub wire_sent: u64,
    /// Frames this side received.
    pub wire_received: u64,
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
    #[error(transparent)]
    Claim(#[from] ClaimRefused),
}

impl TunnelError {
    /// The code a refusal of this kind is sent with.
    fn code(&self) -> ErrorCode {
        match self {
            TunnelError::Carrier(_) => ErrorCode::QemuFailed,
            TunnelError::NotAuthorized(_) | TunnelError::Claim(ClaimRefused::OtherPeer(_)) => {
                ErrorCode::NotAuthorized
            }
            TunnelError::Claim(ClaimRefused::TooMany(_)) => ErrorCode::ResourceExhausted,
            _ => ErrorCode::Internal,
        }
    }
}

/// Source side: carries `qemu` (one NBD connection the domain's QEMU opened on its storage
/// socket) to the agent at `to`, until either end closes, once `host`'s policy let `spec`
/// (the carried domain's) go there, as for its migration; `opened` is called once the
/// destination took the tunnel.
pub async fn carry_out(
    engine: &Engine,
    host: &dyn Host,
    to: &str,
    spec: &VmSpec,
    opened: impl FnOnce(),
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
        .send(&engine.hello())
        .await
        .map_err(TunnelError::Write)?;
    let agent = match expect(&mut reader, "HelloAck").await? {
        Message::HelloAck { version, .. } if version < TUNNEL_VERSION => {
            return Err(TunnelError::PeerTooOld(version))
        }
        Message::HelloAck { agent, .. } => agent,
        m => return Err(TunnelError::Unexpected(m.name())),
    };
    crate::authorize_there(host, spec, &agent, &identity).map_err(TunnelError::NotAuthorized)?;
    let domain = spec.libvirt.as_ref().map_or(&spec.name, |l| &l.domain);
    writer
        .send(&Message::Tunnel {
            domain: domain.clone(),
        })
        .await
        .map_err(TunnelError::Write)?;
    match expect(&mut reader, "TunnelOpen").await? {
        Message::TunnelOpen => opened(),
        m => return Err(TunnelError::Unexpected(m.name())),
    }
    let s = splice(reader, writer, qemu, SOURCE_CODEC).await;
    Ok(TunnelBytes {
        to_destination: s.local_to_peer,
        to_source: s.peer_to_local,
        wire_sent: s.wire_sent,
        wire_received: s.wire_received,
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
    fingerprint: &str,
    reader: FrameReader<R>,
    mut writer: FrameWriter<W>,
) -> Result<TunnelBytes, TunnelError>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let opened = async {
        let (nbd, pid) = crate::libvirt::connect_disks(&engine.config.libvirt, domain).await?;
        let claim = engine
            .registry
            .tunnel_claims
            .open(domain, pid, fingerprint)?;
        Ok::<_, TunnelError>((nbd, claim))
    };
    let (nbd, _claim) = match opened.await {
        Ok(x) => x,
        Err(e) => {
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
    // (what goes back is NBD's replies: small, not worth compressing)
    let s = splice(reader, writer, nbd, Codec::None).await;
    Ok(TunnelBytes {
        to_destination: s.peer_to_local,
        to_source: s.local_to_peer,
        wire_sent: s.wire_sent,
        wire_received: s.wire_received,
    })
}

/// What [`splice`] moved.
#[derive(Debug, Default, PartialEq, Eq)]
struct Spliced {
    local_to_peer: u64,
    peer_to_local: u64,
    wire_sent: u64,
    wire_received: u64,
}

/// Copies between the peer connection (TunnelBytes frames, what goes out compressed with
/// `codec`) and `local` both ways until both directions ended; each direction's end is
/// passed on as a shutdown. Errors end a direction like a close does: the NBD client and
/// server at either end see the connection end and decide (libvirt's mirror fails and the
/// migration with it). A frame other than TunnelBytes (an Abort too) ends both.
async fn splice<R, W>(
    mut peer_r: FrameReader<R>,
    mut peer_w: FrameWriter<W>,
    local: UnixStream,
    codec: Codec,
) -> Spliced
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let (mut local_r, mut local_w) = local.into_split();
    let read_before = peer_r.bytes_read;
    // a frame that breaks the tunnel's order (an Abort too) ends both directions
    let broken = tokio::sync::Notify::new();
    let inbound = async {
        let mut n = 0u64;
        loop {
            match peer_r.next().await {
                Ok(Some(Message::TunnelBytes(b))) => {
                    if let Err(e) = local_w.write_all(&b).await {
                        tracing::debug!("storage tunnel, to the local end: {e}");
                        break;
                    }
                    n += b.len() as u64;
                }
                Ok(None) => break,
                Ok(Some(m)) => {
                    tracing::warn!("storage tunnel: the peer sent {}: tunnel ended", m.name());
                    broken.notify_one();
                    break;
                }
                Err(e) => {
                    tracing::debug!("storage tunnel, from the peer: {e}");
                    break;
                }
            }
        }
        let _ = local_w.shutdown().await;
        (n, peer_r.bytes_read - read_before)
    };
    let outbound = async {
        let (mut n, mut wire) = (0u64, 0u64);
        let mut comp = FrameCompressor::default();
        let mut frames = BytesMut::new();
        loop {
            let mut buf = BytesMut::with_capacity(CHUNK);
            let read = tokio::select! {
                r = local_r.read_buf(&mut buf) => r,
                () = broken.notified() => break,
            };
            match read {
                Ok(0) => break,
                Ok(k) => n += k as u64,
                Err(e) => {
                    tracing::debug!("storage tunnel, from the local end: {e}");
                    break;
                }
            }
            let c = comp.encode(&Message::TunnelBytes(buf.freeze()), codec, &mut frames);
            wire += c.wire as u64;
            peer_w.push_encoded(frames.split().freeze());
            if let Err(e) = peer_w.flush().await {
                tracing::debug!("storage tunnel, to the peer: {e}");
                break;
            }
        }
        let _ = peer_w.shutdown().await;
        (n, wire)
    };
    let ((peer_to_local, wire_received), (local_to_peer, wire_sent)) =
        tokio::join!(inbound, outbound);
    Spliced {
        local_to_peer,
        peer_to_local,
        wire_sent,
        wire_received,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_splice_carries_both_ways_compressed_and_passes_each_end_on() {
        // the peer side as a socket pair speaking frames, the local side as QEMU's
        let (peer, far) = tokio::net::UnixStream::pair().unwrap();
        let (local, mut qemu) = tokio::net::UnixStream::pair().unwrap();
        let (pr, pw) = peer.into_split();
        let task = tokio::spawn(splice(
            FrameReader::new(pr),
            FrameWriter::new(pw),
            local,
            Codec::Zstd(1),
        ));
        let (fr, fw) = far.into_split();
        let (mut far_r, mut far_w) = (FrameReader::new(fr), FrameWriter::new(fw));
        far_w
            .send(&Message::TunnelBytes(bytes::Bytes::from_static(b"to qemu")))
            .await
            .unwrap();
        far_w.shutdown().await.unwrap();
        let mut got = Vec::new();
        qemu.read_to_end(&mut got).await.unwrap();
        assert_eq!(got, b"to qemu", "the far end's close reaches QEMU");
        // what QEMU writes goes out compressed, and arrives whole
        let disk = vec![7u8; 300_000];
        qemu.write_all(&disk).await.unwrap();
        qemu.shutdown().await.unwrap();
        let mut back = Vec::new();
        while let Some(m) = far_r.next().await.unwrap() {
            match m {
                Message::TunnelBytes(b) => back.extend_from_slice(&b),
                m => panic!("{}", m.name()),
            }
        }
        assert_eq!(back, disk);
        let s = task.await.unwrap();
        assert_eq!((s.local_to_peer, s.peer_to_local), (300_000, 7));
        assert!(s.wire_sent < 10_000, "not compressed: {s:?}");
        assert_eq!(s.wire_received, far_w_bytes());
    }

    #[test]
    fn a_domains_qemu_belongs_to_the_first_certificate_that_tunnelled_to_it() {
        let c = Claims::default();
        let first = c.open("web", 100, "cert-a").unwrap();
        let second = c.open("web", 100, "cert-a").unwrap();
        assert_eq!(
            c.open("web", 100, "cert-b").err(),
            Some(ClaimRefused::OtherPeer("web".into()))
        );
        assert!(c.check_stream("web", 100, "cert-b").is_err());
        c.check_stream("web", 100, "cert-a").unwrap();
        // the claim outlives its tunnels: it is the QEMU's
        drop((first, second));
        assert!(c.open("web", 100, "cert-b").is_err());
        // the next migration's QEMU is anyone's first
        let _next = c.open("web", 200, "cert-b").unwrap();
        assert!(c.open("web", 200, "cert-a").is_err());
        // other domains are apart, and open tunnels are bounded
        let held: Vec<_> = (0..MAX_TUNNELS_PER_DOMAIN)
            .map(|_| c.open("db", 7, "cert-a").unwrap())
            .collect();
        assert_eq!(
            c.open("db", 7, "cert-a").err(),
            Some(ClaimRefused::TooMany("db".into()))
        );
        drop(held);
        c.open("db", 7, "cert-a").unwrap();
    }

    /// A TunnelBytes frame of 7 bytes, header included.
    fn far_w_bytes() -> u64 {
        (tern_proto::HEADER_LEN + 7) as u64
    }
}

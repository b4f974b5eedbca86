//! Mutual TLS on every agent-to-agent connection: loads the agent's credentials
//! (`--tls-dir`, made by `tern cert issue`), dials and accepts peers, and tells who the peer
//! is (its certificate's names and labels). Both ends present a certificate from the
//! cluster CA; TLS 1.3 only. A peer without one is refused in the handshake, before any
//! frame is read. A record altered on the wire fails TLS authentication, so the connection
//! (and the migration on it) ends.
//!
//! [`PeerSecurity::Plaintext`] exists only so benchmarks can measure what TLS costs
//! (`TERN_INSECURE_PLAINTEXT=1` on both agents); it is never a default.

use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

use super::cert;
use crate::secret;

/// Why the agent's TLS credentials could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum TlsSetupError {
    #[error("cannot read {0} (make the files with `tern ca init` and `tern cert issue HOST --out DIR`, then pass --tls-dir DIR)")]
    Read(PathBuf, #[source] std::io::Error),
    #[error("{0} holds no PEM {1}")]
    Pem(PathBuf, &'static str),
    #[error("TLS configuration refused")]
    Rustls(#[from] rustls::Error),
    #[error("client certificate verifier")]
    Verifier(#[from] rustls::server::VerifierBuilderError),
    #[error("the agent's own certificate cannot be parsed")]
    Own(#[from] cert::CertParseError),
    #[error("cannot read the agent's key")]
    Key(#[from] secret::SecretError),
}

/// Why a peer connection could not be made secure.
#[derive(Debug, thiserror::Error)]
pub enum HandshakeError {
    #[error("cannot reach {addr}")]
    Connect {
        addr: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{addr} is not HOST:PORT")]
    BadAddress { addr: String },
    #[error("timed out after {0:?} in the TLS handshake")]
    Timeout(Duration),
    #[error("TLS handshake with {peer} failed: {}", describe(.cause))]
    Tls { peer: String, cause: std::io::Error },
}

/// How peer connections are protected.
#[derive(Clone)]
pub enum PeerSecurity {
    Tls(Arc<TlsConfigs>),
    /// Test-only: no encryption, no authentication (benchmarks of what TLS costs).
    Plaintext,
}

pub struct TlsConfigs {
    client: Arc<rustls::ClientConfig>,
    server: Arc<rustls::ServerConfig>,
    /// This agent's own names and labels (from its certificate).
    pub names: Vec<String>,
    pub labels: Vec<String>,
}

/// Who is at the other end, from its verified certificate (empty in plaintext mode).
#[derive(Debug, Clone, Default)]
pub struct PeerIdentity {
    pub names: Vec<String>,
    pub labels: Vec<String>,
    /// The certificate itself: hex of the first 16 bytes of the BLAKE3 of its DER (empty in
    /// plaintext mode). A migration is bound to the certificate that prepared it.
    pub fingerprint: String,
}

impl std::fmt::Debug for PeerSecurity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            PeerSecurity::Tls(c) => write!(f, "Tls(names={:?}, labels={:?})", c.names, c.labels),
            PeerSecurity::Plaintext => write!(f, "Plaintext"),
        }
    }
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

impl PeerSecurity {
    /// Loads `ca.pem`, `agent.pem` and `agent.key` from `dir`.
    pub fn load(dir: &Path) -> Result<Self, TlsSetupError> {
        let read = |f: &str| {
            let p = dir.join(f);
            std::fs::read(&p).map_err(|e| TlsSetupError::Read(p, e))
        };
        let ca_pem = read(cert::CA_CERT)?;
        let cert_pem = read(cert::AGENT_CERT)?;
        let key_pem = secret::read_secret(&dir.join(cert::AGENT_KEY))?;
        let cas: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(&ca_pem)
            .filter_map(Result::ok)
            .collect();
        if cas.is_empty() {
            return Err(TlsSetupError::Pem(dir.join(cert::CA_CERT), "certificate"));
        }
        let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(&cert_pem)
            .filter_map(Result::ok)
            .collect();
        if chain.is_empty() {
            return Err(TlsSetupError::Pem(
                dir.join(cert::AGENT_CERT),
                "certificate",
            ));
        }
        let key = PrivateKeyDer::from_pem_slice(&key_pem)
            .map_err(|_| TlsSetupError::Pem(dir.join(cert::AGENT_KEY), "private key"))?;
        let mut roots = rustls::RootCertStore::empty();
        for c in cas {
            roots.add(c)?;
        }
        let roots = Arc::new(roots);
        let (names, labels) = cert::names_and_labels(&chain[0])?;

        let client = rustls::ClientConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13])?
            .with_root_certificates(roots.clone())
            .with_client_auth_cert(chain.clone(), key.clone_key())?;
        let verifier =
            rustls::server::WebPkiClientVerifier::builder_with_provider(roots, provider())
                .build()?;
        let server = rustls::ServerConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13])?
            .with_client_cert_verifier(verifier)
            .with_single_cert(chain, key)?;
        Ok(PeerSecurity::Tls(Arc::new(TlsConfigs {
            client: Arc::new(client),
            server: Arc::new(server),
            names,
            labels,
        })))
    }

    /// The rustls configurations (None in plaintext mode), e.g. for test peers.
    pub fn configs(&self) -> Option<(Arc<rustls::ClientConfig>, Arc<rustls::ServerConfig>)> {
        match self {
            PeerSecurity::Tls(c) => Some((c.client.clone(), c.server.clone())),
            PeerSecurity::Plaintext => None,
        }
    }

    pub fn is_tls(&self) -> bool {
        matches!(self, PeerSecurity::Tls(_))
    }

    /// This agent's labels.
    pub fn own_labels(&self) -> &[String] {
        match self {
            PeerSecurity::Tls(c) => &c.labels,
            PeerSecurity::Plaintext => &[],
        }
    }

    /// Dials `addr` (HOST:PORT) and authenticates both ends; the destination's certificate
    /// must be from the cluster CA and name HOST.
    pub async fn connect(
        &self,
        addr: &str,
        within: Duration,
        dead_after: Duration,
    ) -> Result<(PeerStream, PeerIdentity), HandshakeError> {
        let host = host_of(addr).ok_or_else(|| HandshakeError::BadAddress { addr: addr.into() })?;
        let tcp = tokio::time::timeout(within, TcpStream::connect(addr))
            .await
            .map_err(|_| HandshakeError::Connect {
                addr: addr.into(),
                source: std::io::ErrorKind::TimedOut.into(),
            })?
            .map_err(|e| HandshakeError::Connect {
                addr: addr.into(),
                source: e,
            })?;
        let _ = tcp.set_nodelay(true);
        super::conn::watch_peer_socket(&tcp, dead_after);
        match self {
            PeerSecurity::Plaintext => Ok((PeerStream::Plain(tcp), PeerIdentity::default())),
            PeerSecurity::Tls(c) => {
                let name = match host.parse::<IpAddr>() {
                    Ok(ip) => ServerName::IpAddress(ip.into()),
                    Err(_) => ServerName::try_from(host.to_string())
                        .map_err(|_| HandshakeError::BadAddress { addr: addr.into() })?,
                };
                let conn = tokio_rustls::TlsConnector::from(c.client.clone());
                let s = tokio::time::timeout(within, conn.connect(name, buffered(tcp)))
                    .await
                    .map_err(|_| HandshakeError::Timeout(within))?
                    .map_err(|e| HandshakeError::Tls {
                        peer: addr.into(),
                        cause: e,
                    })?;
                let id = identity(s.get_ref().1.peer_certificates());
                Ok((PeerStream::Client(Box::new(s)), id))
            }
        }
    }

    /// Authenticates an accepted connection: the peer must present a certificate from the
    /// cluster CA.
    pub async fn accept(
        &self,
        tcp: TcpStream,
        peer: std::net::SocketAddr,
        within: Duration,
        dead_after: Duration,
    ) -> Result<(PeerStream, PeerIdentity), HandshakeError> {
        let _ = tcp.set_nodelay(true);
        super::conn::watch_peer_socket(&tcp, dead_after);
        match self {
            PeerSecurity::Plaintext => Ok((PeerStream::Plain(tcp), PeerIdentity::default())),
            PeerSecurity::Tls(c) => {
                let acc = tokio_rustls::TlsAcceptor::from(c.server.clone());
                let s = tokio::time::timeout(within, acc.accept(buffered(tcp)))
                    .await
                    .map_err(|_| HandshakeError::Timeout(within))?
                    .map_err(|e| HandshakeError::Tls {
                        peer: peer.to_string(),
                        cause: e,
                    })?;
                let id = identity(s.get_ref().1.peer_certificates());
                Ok((PeerStream::Server(Box::new(s)), id))
            }
        }
    }
}

fn identity(certs: Option<&[CertificateDer<'_>]>) -> PeerIdentity {
    let Some(cert) = certs.and_then(|c| c.first()) else {
        return PeerIdentity::default();
    };
    let fingerprint = hex::encode(&blake3::hash(cert).as_bytes()[..16]);
    match cert::names_and_labels(cert) {
        Ok((names, labels)) => PeerIdentity {
            names,
            labels,
            fingerprint,
        },
        Err(_) => PeerIdentity {
            fingerprint,
            ..PeerIdentity::default()
        },
    }
}

/// HOST of HOST:PORT or \[V6\]:PORT.
fn host_of(addr: &str) -> Option<&str> {
    if let Some(rest) = addr.strip_prefix('[') {
        return rest.split_once(']').map(|(h, _)| h);
    }
    addr.rsplit_once(':')
        .map(|(h, _)| h)
        .filter(|h| !h.is_empty())
}

/// Whether an I/O error is TLS refusing the peer or its data (not a network failure).
pub fn is_tls_failure(e: &std::io::Error) -> bool {
    e.get_ref().is_some_and(|i| i.is::<rustls::Error>())
}

/// A TLS failure in words an operator can act on.
pub fn describe(e: &std::io::Error) -> String {
    use rustls::{AlertDescription as A, CertificateError as C, Error as R};
    let Some(r) = e.get_ref().and_then(|i| i.downcast_ref::<R>()) else {
        return e.to_string();
    };
    match r {
        R::InvalidCertificate(C::UnknownIssuer) | R::InvalidCertificate(C::BadSignature) => {
            "the peer's certificate is not from this cluster's CA".into()
        }
        R::InvalidCertificate(C::NotValidForName)
        | R::InvalidCertificate(C::NotValidForNameContext { .. }) => {
            "the peer's certificate is not issued for the address dialled (issue it with that name or --ip)".into()
        }
        R::InvalidCertificate(C::Expired) | R::InvalidCertificate(C::ExpiredContext { .. }) => {
            "the peer's certificate has expired".into()
        }
        R::NoCertificatesPresented => "the peer presented no certificate".into(),
        // decrypt_error: a handshake signature did not verify (e.g. a certificate from
        // another CA of the same name)
        R::AlertReceived(
            A::UnknownCA | A::BadCertificate | A::CertificateRequired | A::DecryptError,
        ) => {
            format!("the peer refused this agent's certificate ({r}): is it from the same cluster CA?")
        }
        R::DecryptError | R::AlertReceived(A::BadRecordMac) => {
            format!("{r}: data was altered in transit")
        }
        other => other.to_string(),
    }
}

/// What rustls reads from: the TCP socket behind a read buffer of [`TLS_READ_BUFFER`].
/// rustls asks for 4 KiB at a time; without the buffer every 4 KiB of a migration would
/// be a `read` of its own (and often a window update sent back).
pub type TlsTcp = tokio::io::BufReader<TcpStream>;

/// The read buffer under rustls (see [`TlsTcp`]).
pub const TLS_READ_BUFFER: usize = 256 << 10;

fn buffered(tcp: TcpStream) -> TlsTcp {
    tokio::io::BufReader::with_capacity(TLS_READ_BUFFER, tcp)
}

/// An agent-to-agent connection, encrypted or (test-only) plain.
pub enum PeerStream {
    Client(Box<tokio_rustls::client::TlsStream<TlsTcp>>),
    Server(Box<tokio_rustls::server::TlsStream<TlsTcp>>),
    Plain(TcpStream),
}

pub type PeerRead = tokio::io::ReadHalf<PeerStream>;
pub type PeerWrite = tokio::io::WriteHalf<PeerStream>;

impl PeerStream {
    pub fn split(self) -> (PeerRead, PeerWrite) {
        tokio::io::split(self)
    }

    /// The TCP socket under the stream.
    pub fn tcp(&self) -> &TcpStream {
        match self {
            PeerStream::Client(s) => s.get_ref().0.get_ref(),
            PeerStream::Server(s) => s.get_ref().0.get_ref(),
            PeerStream::Plain(s) => s,
        }
    }

    /// A probe on the socket's path (None, with a warning, when it cannot be made).
    pub fn probe(&self) -> Option<super::probe::TcpProbe> {
        super::probe::TcpProbe::of(self.tcp())
            .inspect_err(|e| tracing::warn!("no TCP probe on a peer connection: {e}"))
            .ok()
    }
}

impl AsyncRead for PeerStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            PeerStream::Client(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
            PeerStream::Server(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
            PeerStream::Plain(s) => Pin::new(s).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for PeerStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        match self.get_mut() {
            PeerStream::Client(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
            PeerStream::Server(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
            PeerStream::Plain(s) => Pin::new(s).poll_write(cx, buf),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        match self.get_mut() {
            PeerStream::Client(s) => Pin::new(s.as_mut()).poll_write_vectored(cx, bufs),
            PeerStream::Server(s) => Pin::new(s.as_mut()).poll_write_vectored(cx, bufs),
            PeerStream::Plain(s) => Pin::new(s).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        true
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            PeerStream::Client(s) => Pin::new(s.as_mut()).poll_flush(cx),
            PeerStream::Server(s) => Pin::new(s.as_mut()).poll_flush(cx),
            PeerStream::Plain(s) => Pin::new(s).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            PeerStream::Client(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
            PeerStream::Server(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
            PeerStream::Plain(s) => Pin::new(s).poll_shutdown(cx),
        }
    }
}

//! The cluster controller's way in (`tern agent --control-listen ADDR`, off by default):
//! part of the control API ([`crate::api::control_router`]: what the agent, its VMs and
//! its host are and use, and migrations: start, plan, follow, cancel) as HTTP/1.1 over
//! mutual TLS. The client's certificate must be from the cluster CA (the handshake
//! refuses any other) and carry the label [`CONTROLLER_LABEL`]; an agent's own
//! certificate, or any other without that label, gets its connection closed right after
//! the handshake, no HTTP served. At most [`MAX_CONTROL_CONNECTIONS`] at once, each
//! handshake within [`HANDSHAKE_WITHIN`].
//!
//! Also the controller's end: [`client_for`], a blocking [`tern_api::client::Client`] that
//! dials an agent's control listener with the credentials of a TLS directory.
//!
//! Owns who may use this listener and its connections; must not add routes of its own
//! (they are the API's) nor serve anything without TLS.

use std::net::SocketAddr;
use std::path::Path;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use tern_api::client::{Client, ReadWrite};
use tern_engine::transport::tls::{self, PeerSecurity, PeerStream};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::{mpsc, OwnedSemaphorePermit, Semaphore};

use crate::{Agent, AgentError};

/// The label a certificate needs to use the control listener.
pub const CONTROLLER_LABEL: &str = "controller";
/// Connections (handshakes included) the control listener holds at once; more are
/// closed at once.
pub const MAX_CONTROL_CONNECTIONS: usize = 16;
/// A client that has not finished its TLS handshake by then is dropped.
pub const HANDSHAKE_WITHIN: Duration = Duration::from_secs(10);

/// Binds the control listener on `addr` and returns the serving future.
pub async fn serve(
    agent: Arc<Agent>,
    addr: SocketAddr,
) -> Result<impl std::future::Future<Output = ()> + Send, AgentError> {
    let security = agent.engine.security.clone();
    if !security.is_tls() {
        return Err(AgentError::ControlWithoutTls);
    }
    let tcp = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|e| AgentError::ControlListen(addr, e))?;
    let local = tcp
        .local_addr()
        .map_err(|e| AgentError::ControlListen(addr, e))?;
    tracing::info!(
        agent = %agent.config.name,
        control = %local,
        "cluster controller API on {local} (HTTP over mutual TLS, certificates labelled {CONTROLLER_LABEL:?})"
    );
    let (tx, rx) = mpsc::channel(MAX_CONTROL_CONNECTIONS);
    let accept = accept_loop(tcp, security, agent.config.stall_timeout, tx);
    let listener = Authenticated { rx, local };
    let app = crate::api::control_router(agent);
    Ok(async move {
        tokio::select! {
            _ = accept => {}
            _ = axum::serve(listener, app) => {}
        }
    })
}

/// Accepts TCP connections, authenticates them and passes on those of the controller.
async fn accept_loop(
    tcp: tokio::net::TcpListener,
    security: PeerSecurity,
    dead_after: Duration,
    authenticated: mpsc::Sender<(ControlStream, SocketAddr)>,
) {
    let slots = Arc::new(Semaphore::new(MAX_CONTROL_CONNECTIONS));
    loop {
        let (conn, addr) = match tcp.accept().await {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!("control accept failed: {e}");
                // (out of descriptors, say: not a busy loop)
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            tracing::warn!(client = %addr, "refused a control connection: {MAX_CONTROL_CONNECTIONS} are open");
            continue;
        };
        let security = security.clone();
        let authenticated = authenticated.clone();
        tokio::spawn(async move {
            let (mut stream, id) = match security
                .accept(conn, addr, HANDSHAKE_WITHIN, dead_after)
                .await
            {
                Ok(s) => s,
                Err(e) => {
                    tracing::warn!(client = %addr, "control connection refused: {}", tern_engine::error_chain(&e));
                    return;
                }
            };
            if !id.labels.iter().any(|l| l == CONTROLLER_LABEL) {
                tracing::warn!(
                    client = %addr,
                    names = ?id.names,
                    labels = ?id.labels,
                    certificate = %id.fingerprint,
                    "control connection closed: its certificate is the cluster's but not labelled {CONTROLLER_LABEL:?}"
                );
                use tokio::io::AsyncWriteExt;
                let _ = tokio::time::timeout(Duration::from_secs(1), stream.shutdown()).await;
                return;
            }
            tracing::debug!(client = %addr, names = ?id.names, "controller connected");
            let _ = authenticated
                .send((
                    ControlStream {
                        stream,
                        _slot: slot,
                    },
                    addr,
                ))
                .await;
        });
    }
}

/// The controller's connections, authenticated, as axum takes them.
struct Authenticated {
    rx: mpsc::Receiver<(ControlStream, SocketAddr)>,
    local: SocketAddr,
}

impl axum::serve::Listener for Authenticated {
    type Io = ControlStream;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (ControlStream, SocketAddr) {
        match self.rx.recv().await {
            Some(c) => c,
            // (the accept loop holds the sender as long as it runs)
            None => std::future::pending().await,
        }
    }

    fn local_addr(&self) -> std::io::Result<SocketAddr> {
        Ok(self.local)
    }
}

/// A controller's connection; its slot of [`MAX_CONTROL_CONNECTIONS`] is free again
/// when it is dropped.
struct ControlStream {
    stream: PeerStream,
    _slot: OwnedSemaphorePermit,
}

impl AsyncRead for ControlStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_read(cx, buf)
    }
}

impl AsyncWrite for ControlStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.get_mut().stream).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.get_mut().stream).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_shutdown(cx)
    }
}

/// Why [`client_for`] could not make a client.
#[derive(Debug, thiserror::Error)]
pub enum ControlClientError {
    #[error("cannot load the TLS credentials")]
    Tls(#[from] tls::TlsSetupError),
    #[error("{0:?} is not HOST:PORT")]
    BadAddress(String),
}

/// How long [`client_for`]'s client waits for a TCP connection.
pub const CONNECT_WITHIN: Duration = Duration::from_secs(5);
/// How long it waits for a write to go out (a request is small).
const WRITE_WITHIN: Duration = Duration::from_secs(30);

/// A client of the agent whose control listener is at `addr` (HOST:PORT), for the
/// cluster controller: each call dials `addr` and runs TLS 1.3 with the credentials in
/// `tls_dir` (`ca.pem`, `agent.pem`, `agent.key`: `tern cert issue NAME --label
/// controller --out DIR`). The agent's certificate must be from that CA and name HOST,
/// as between agents. Connecting waits [`CONNECT_WITHIN`], the handshake
/// [`HANDSHAKE_WITHIN`]; reading the answer as long as the call says.
pub fn client_for(addr: &str, tls_dir: &Path) -> Result<Client, ControlClientError> {
    use rustls::pki_types::ServerName;
    let host = host_of(addr).ok_or_else(|| ControlClientError::BadAddress(addr.into()))?;
    let server: ServerName<'static> = match host.parse::<std::net::IpAddr>() {
        Ok(ip) => ServerName::IpAddress(ip.into()),
        Err(_) => ServerName::try_from(host.to_string())
            .map_err(|_| ControlClientError::BadAddress(addr.into()))?,
    };
    let security = PeerSecurity::load(tls_dir)?;
    let (config, _) = security
        .configs()
        .expect("credentials loaded from a directory are TLS");
    let target = addr.to_string();
    let connect = move |timeout: Option<Duration>| -> std::io::Result<Box<dyn ReadWrite + Send>> {
        let mut tcp = dial(&target)?;
        let _ = tcp.set_nodelay(true);
        tcp.set_write_timeout(Some(WRITE_WITHIN))?;
        tcp.set_read_timeout(Some(HANDSHAKE_WITHIN))?;
        let mut tls = rustls::ClientConnection::new(config.clone(), server.clone())
            .map_err(std::io::Error::other)?;
        while tls.is_handshaking() {
            tls.complete_io(&mut tcp).map_err(|e| {
                std::io::Error::new(e.kind(), format!("TLS handshake: {}", tls::describe(&e)))
            })?;
        }
        tcp.set_read_timeout(timeout)?;
        Ok(Box::new(EofIsEnd(rustls::StreamOwned::new(tls, tcp))))
    };
    Ok(Client::with_connector(
        format!("tls:{addr}"),
        Arc::new(connect),
    ))
}

/// HOST of HOST:PORT or \[V6\]:PORT.
fn host_of(addr: &str) -> Option<&str> {
    let (host, port) = match addr.strip_prefix('[') {
        Some(rest) => {
            let (h, p) = rest.split_once(']')?;
            (h, p.strip_prefix(':')?)
        }
        None => addr.rsplit_once(':')?,
    };
    (!host.is_empty() && port.parse::<u16>().is_ok()).then_some(host)
}

/// A TCP connection to `addr`, trying each of its addresses within [`CONNECT_WITHIN`].
fn dial(addr: &str) -> std::io::Result<std::net::TcpStream> {
    use std::net::ToSocketAddrs;
    let mut last = None;
    for a in addr.to_socket_addrs()? {
        match std::net::TcpStream::connect_timeout(&a, CONNECT_WITHIN) {
            Ok(s) => return Ok(s),
            Err(e) => last = Some(e),
        }
    }
    Err(last.unwrap_or_else(|| {
        std::io::Error::new(
            std::io::ErrorKind::NotFound,
            format!("{addr} resolves to no address"),
        )
    }))
}

/// A TLS stream whose end without `close_notify` reads as an end: the client checks
/// the answer's length itself (`Content-Length`, the last chunk), so a cut is still seen.
struct EofIsEnd<S>(S);

impl<S: std::io::Read> std::io::Read for EofIsEnd<S> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        match self.0.read(buf) {
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => Ok(0),
            r => r,
        }
    }
}

impl<S: std::io::Write> std::io::Write for EofIsEnd<S> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.write(buf)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.0.flush()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_address_is_host_and_port() {
        assert_eq!(host_of("10.0.0.1:7701"), Some("10.0.0.1"));
        assert_eq!(host_of("agent-b.lab:7701"), Some("agent-b.lab"));
        assert_eq!(host_of("[fd00::1]:7701"), Some("fd00::1"));
        for bad in [
            "10.0.0.1",
            ":7701",
            "[fd00::1]",
            "h:port",
            "[fd00::1]7701",
            "",
        ] {
            assert_eq!(host_of(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn a_client_needs_an_address_and_credentials() {
        let dir = tempfile::tempdir().unwrap();
        let e = client_for("no-port", dir.path()).unwrap_err();
        assert!(matches!(e, ControlClientError::BadAddress(_)), "{e:?}");
        let e = client_for("127.0.0.1:1", dir.path()).unwrap_err();
        assert!(matches!(e, ControlClientError::Tls(_)), "{e:?}");
    }
}

//! The cluster controller's way in (`tern agent --control-listen ADDR`, off by default):
//! part of the control API ([`crate::api::control_router`]: what the agent, its VMs and
//! its host are and use, and migrations: start, plan, follow, cancel) as HTTP/1.1 over
//! mutual TLS. The client's certificate must be from the cluster CA (the handshake
//! refuses any other) and carry the label [`CONTROLLER_LABEL`]; an agent's own
//! certificate, or any other without that label, gets its connection closed right after
//! the handshake, no HTTP served.
//!
//! Anyone who can reach the port can open connections, so the budgets are kept apart:
//! at most [`MAX_HANDSHAKES`] connections in their handshake at once, of them at most
//! [`MAX_HANDSHAKES_PER_SOURCE`] from one source (an IPv4 address, an IPv6 /64), each
//! handshake within [`HANDSHAKE_WITHIN`]; and at most [`MAX_CONTROL_CONNECTIONS`]
//! connections authenticated as the controller, a budget no handshake takes from. A
//! connection over a budget is closed at once; refusals are logged at warn level at most
//! once per [`REFUSALS_WARNED_EVERY`] (with the count of the others), at debug otherwise.
//! Holding handshakes open can still fill the handshake pool, but only from
//! `MAX_HANDSHAKES / MAX_HANDSHAKES_PER_SOURCE` sources, and never locks out a
//! controller that got through. (The accept loop and the counting are `admission`'s,
//! shared with the peer listener; the numbers, the words in the log and the label check
//! are this listener's.)
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
use tern_engine::transport::tls::{self, PeerIdentity, PeerSecurity, PeerStream};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::{mpsc, OwnedSemaphorePermit};

use crate::admission::{self, Limits, Names};
use crate::{Agent, AgentError};

/// The label a certificate needs to use the control listener.
pub const CONTROLLER_LABEL: &str = "controller";
/// Connections authenticated as the controller that the listener holds at once; more
/// are closed right after their handshake. Handshakes in progress do not count.
pub const MAX_CONTROL_CONNECTIONS: usize = 16;
/// Connections still in their TLS handshake, from all sources, held at once; more are
/// closed at once.
pub const MAX_HANDSHAKES: usize = 64;
/// Of [`MAX_HANDSHAKES`], those from one source (an IPv4 address, an IPv6 /64); more
/// from it are closed at once.
pub const MAX_HANDSHAKES_PER_SOURCE: usize = 4;
/// A client that has not finished its TLS handshake by then is dropped.
pub const HANDSHAKE_WITHIN: Duration = Duration::from_secs(5);
/// Refused connections are logged at warn level at most this often (at debug otherwise).
pub const REFUSALS_WARNED_EVERY: Duration = Duration::from_secs(10);

const LIMITS: Limits = Limits {
    handshakes: MAX_HANDSHAKES,
    handshakes_per_source: MAX_HANDSHAKES_PER_SOURCE,
    authenticated: MAX_CONTROL_CONNECTIONS,
    handshake_within: HANDSHAKE_WITHIN,
};

/// What the control listener calls things in its log.
const NAMES: Names = Names {
    accept_failed: "control accept failed",
    refused: "refused a control connection",
    failed: "control connection refused",
    over_budget: "controller connection closed",
};

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
    let accept = accept_loop(tcp, security, agent.config.stall_timeout, LIMITS, tx);
    let listener = Authenticated { rx, local };
    let app = crate::api::control_router(agent);
    Ok(async move {
        tokio::select! {
            _ = accept => {}
            _ = axum::serve(listener, app) => {}
        }
    })
}

/// Accepts TCP connections, authenticates them and passes on those of the controller,
/// within `limits` (see the module's doc; the loop is `admission`'s).
async fn accept_loop(
    tcp: tokio::net::TcpListener,
    security: PeerSecurity,
    dead_after: Duration,
    limits: Limits,
    authenticated: mpsc::Sender<(ControlStream, SocketAddr)>,
) {
    let vet = |addr: SocketAddr, id: &PeerIdentity| {
        let controller = id.labels.iter().any(|l| l == CONTROLLER_LABEL);
        if !controller {
            tracing::warn!(
                client = %addr,
                names = ?id.names,
                labels = ?id.labels,
                certificate = %id.fingerprint,
                "control connection closed: its certificate is the cluster's but not labelled {CONTROLLER_LABEL:?}"
            );
        }
        controller
    };
    let admit = move |stream, addr, id: PeerIdentity, permit| {
        let authenticated = authenticated.clone();
        async move {
            tracing::debug!(client = %addr, names = ?id.names, "controller connected");
            let stream = ControlStream {
                stream,
                _slot: permit,
            };
            let _ = authenticated.send((stream, addr)).await;
        }
    };
    admission::accept(tcp, security, dead_after, limits, NAMES, vet, admit).await
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
    use crate::admission::held::{closed, hold_share, raw_from};

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

    fn ip(s: &str) -> std::net::IpAddr {
        s.parse().unwrap()
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn held_handshakes_do_not_keep_the_controller_out() {
        let dir = tempfile::tempdir().unwrap();
        let ca = dir.path().join("ca");
        crate::pki::init_ca(&ca, "test").unwrap();
        let issue = |name: &str, host: &str, labels: &[&str]| {
            let out = dir.path().join(name);
            let req = crate::pki::IssueRequest {
                host: host.into(),
                labels: labels.iter().map(|l| l.to_string()).collect(),
                days: 1,
                ..Default::default()
            };
            crate::pki::issue(&ca, &req, &out).unwrap();
            out
        };
        let server = issue("server", "127.0.0.1", &["trusted"]);
        let ctl = issue("ctl", "controller", &[CONTROLLER_LABEL]);
        let security = PeerSecurity::load(&server).unwrap();
        let tcp = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = tcp.local_addr().unwrap();
        let limits = Limits {
            handshakes: 6,
            handshakes_per_source: 2,
            authenticated: 1,
            handshake_within: Duration::from_secs(30),
        };
        let (tx, mut rx) = mpsc::channel(4);
        let accept = tokio::spawn(accept_loop(
            tcp,
            security,
            Duration::from_secs(30),
            limits,
            tx,
        ));
        let controller = |n: u32| {
            let client = client_for(&addr.to_string(), &ctl).unwrap();
            tokio::task::spawn_blocking(move || {
                let r = client.agent_info();
                assert!(
                    r.is_err(),
                    "controller {n}: nothing serves HTTP here: {r:?}"
                );
            })
        };

        // one source: its share is held, the rest closed at once
        let mut held = hold_share("127.0.0.2", addr, 2, 4).await;

        // a controller from another address: served while they are held
        let c1 = controller(1);
        let (first, peer) = tokio::time::timeout(Duration::from_secs(10), rx.recv())
            .await
            .expect("the controller got through within 10 s")
            .unwrap();
        assert_eq!(peer.ip(), ip("127.0.0.1"));
        // the controllers' budget is its own: a second one is closed after its handshake...
        let c2 = controller(2);
        c2.await.unwrap();
        assert!(
            rx.try_recv().is_err(),
            "a controller over the budget was passed on"
        );
        // ... and the first one's slot, once free, is the next one's
        drop(first);
        c1.await.unwrap();
        let c3 = controller(3);
        let (third, _) = tokio::time::timeout(Duration::from_secs(10), rx.recv())
            .await
            .expect("the next controller got through")
            .unwrap();
        drop(third);
        c3.await.unwrap();

        // the pool: 2 held from .2, 2 from .3, 2 from .4 fill it; .5 is closed at once
        for from in ["127.0.0.3", "127.0.0.3", "127.0.0.4", "127.0.0.4"] {
            held.push(raw_from(from, addr).await);
        }
        let mut late = raw_from("127.0.0.5", addr).await;
        assert!(
            closed(&mut late, Duration::from_secs(5)).await,
            "a handshake over the pool was held"
        );
        for c in &mut held {
            assert!(
                !closed(c, Duration::from_millis(100)).await,
                "a held handshake was closed"
            );
        }
        // handshakes that end (here: the client left) free the pool
        held.clear();
        tokio::time::sleep(Duration::from_millis(300)).await;
        let mut next = raw_from("127.0.0.5", addr).await;
        assert!(
            !closed(&mut next, Duration::from_millis(300)).await,
            "the pool stayed full"
        );
        accept.abort();
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

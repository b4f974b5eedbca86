//! A hostile peer: an agent-shaped client (or server) holding a valid certificate from the
//! test CA that says whatever a test makes it say, frame by frame. It plays a compromised
//! host of the cluster, the threat tern's peer checks are for: authenticated, not trusted.
//! Also the measures a test asserts on afterwards (the attacked agent's memory).

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use bytes::BytesMut;
use rustls::pki_types::ServerName;
use tern_engine::transport::tls::PeerSecurity;
use tern_proto::{ErrorCode, Message};

use crate::agents::{test_ca, TEST_CA};

/// One certificate per identity name and address (made once per test process), so two
/// connections of one identity present the same certificate and two identities differ.
fn identity(name: &str, ip: std::net::IpAddr, labels: &[&str]) -> Result<PeerSecurity> {
    static MADE: OnceLock<Mutex<Vec<(String, tempfile::TempDir)>>> = OnceLock::new();
    let key = format!("{name}|{ip}|{}", labels.join(","));
    let mut made = MADE
        .get_or_init(Default::default)
        .lock()
        .unwrap_or_else(|p| p.into_inner());
    if let Some((_, d)) = made.iter().find(|(k, _)| *k == key) {
        return Ok(PeerSecurity::load(d.path())?);
    }
    let d = tempfile::Builder::new()
        .prefix("tern-hostile-")
        .tempdir_in("/tmp")?;
    crate::agents::issue_cert(&test_ca(Path::new(TEST_CA))?, name, ip, labels, d.path())?;
    let sec = PeerSecurity::load(d.path())?;
    made.push((key, d));
    Ok(sec)
}

/// Either end of a TLS connection, as the hostile peer drives it.
enum Stream {
    Client(Box<rustls::StreamOwned<rustls::ClientConnection, TcpStream>>),
    Server(Box<rustls::StreamOwned<rustls::ServerConnection, TcpStream>>),
}

impl Stream {
    fn sock(&self) -> &TcpStream {
        match self {
            Stream::Client(s) => &s.sock,
            Stream::Server(s) => &s.sock,
        }
    }
}

impl Read for Stream {
    fn read(&mut self, b: &mut [u8]) -> std::io::Result<usize> {
        match self {
            Stream::Client(s) => s.read(b),
            Stream::Server(s) => s.read(b),
        }
    }
}

impl Write for Stream {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        match self {
            Stream::Client(s) => s.write(b),
            Stream::Server(s) => s.write(b),
        }
    }
    fn flush(&mut self) -> std::io::Result<()> {
        match self {
            Stream::Client(s) => s.flush(),
            Stream::Server(s) => s.flush(),
        }
    }
}

/// A peer with a valid cluster certificate that speaks raw frames.
pub struct HostilePeer {
    s: Stream,
    buf: BytesMut,
    /// Frames the peer read while looking for something else (Summary, Want, Applied...).
    pub seen: Vec<Message>,
}

/// How a hostile exchange ended, from the attacked agent's side.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Ended {
    Aborted(ErrorCode, String),
    /// The agent closed the connection without an Abort.
    Closed,
}

impl HostilePeer {
    /// Connects to an agent's peer port as identity `name` (a certificate of the test CA
    /// for `name`, with `labels`).
    pub fn connect(addr: SocketAddr, name: &str, labels: &[&str]) -> Result<HostilePeer> {
        let sec = identity(name, addr.ip(), labels)?;
        let (client, _) = sec.configs().context("TLS configs")?;
        let tcp = TcpStream::connect(addr)?;
        tcp.set_read_timeout(Some(Duration::from_secs(60)))?;
        let conn = rustls::ClientConnection::new(client, ServerName::IpAddress(addr.ip().into()))?;
        let mut s = rustls::StreamOwned::new(conn, tcp);
        while s.conn.is_handshaking() {
            s.conn.complete_io(&mut s.sock)?;
        }
        Ok(HostilePeer {
            s: Stream::Client(Box::new(s)),
            buf: BytesMut::new(),
            seen: Vec::new(),
        })
    }

    /// Accepts one agent's connection on `l`, presenting a certificate for `name` with
    /// `labels` (a hostile destination).
    pub fn accept(l: &TcpListener, name: &str, labels: &[&str]) -> Result<HostilePeer> {
        let sec = identity(name, l.local_addr()?.ip(), labels)?;
        let (_, server) = sec.configs().context("TLS configs")?;
        let (tcp, _) = l.accept()?;
        tcp.set_read_timeout(Some(Duration::from_secs(60)))?;
        let mut s = rustls::StreamOwned::new(rustls::ServerConnection::new(server)?, tcp);
        while s.conn.is_handshaking() {
            s.conn.complete_io(&mut s.sock)?;
        }
        Ok(HostilePeer {
            s: Stream::Server(Box::new(s)),
            buf: BytesMut::new(),
            seen: Vec::new(),
        })
    }

    pub fn send(&mut self, m: &Message) -> Result<()> {
        let mut b = BytesMut::new();
        tern_proto::encode(m, &mut b);
        self.send_raw(&b)
    }

    pub fn send_raw(&mut self, bytes: &[u8]) -> Result<()> {
        self.s.write_all(bytes)?;
        self.s.flush()?;
        Ok(())
    }

    /// The next frame (None: closed), waiting at most `within`.
    pub fn recv(&mut self, within: Duration) -> Result<Option<Message>> {
        self.s.sock().set_read_timeout(Some(within))?;
        loop {
            if let Some(m) = tern_proto::decode(&mut self.buf)? {
                return Ok(Some(m));
            }
            let mut chunk = vec![0u8; 256 << 10];
            let n = match self.s.read(&mut chunk) {
                Ok(n) => n,
                Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => 0,
                Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => 0,
                Err(e) => return Err(e.into()),
            };
            if n == 0 {
                return Ok(None);
            }
            self.buf.extend_from_slice(&chunk[..n]);
        }
    }

    /// Reads until the agent aborts or closes (other frames are kept in `seen`).
    pub fn ended(&mut self, within: Duration) -> Result<Ended> {
        let deadline = Instant::now() + within;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                bail!("the agent neither aborted nor closed within {within:?}");
            }
            match self.recv(left) {
                Ok(Some(Message::Abort { code, message })) => {
                    return Ok(Ended::Aborted(code, message))
                }
                Ok(Some(m)) => self.seen.push(m),
                Ok(None) => return Ok(Ended::Closed),
                Err(e) => {
                    if let Some(io) = e.downcast_ref::<std::io::Error>() {
                        if matches!(
                            io.kind(),
                            std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                        ) {
                            continue;
                        }
                        return Ok(Ended::Closed);
                    }
                    return Err(e);
                }
            }
        }
    }

    /// Reads whatever the agent has sent already, without waiting: Some when it ended the
    /// exchange (what else it sent goes to `seen`).
    pub fn drain(&mut self) -> Result<Option<Ended>> {
        loop {
            match self.recv(Duration::from_millis(1)) {
                Ok(Some(Message::Abort { code, message })) => {
                    return Ok(Some(Ended::Aborted(code, message)))
                }
                Ok(Some(m)) => self.seen.push(m),
                Ok(None) => return Ok(Some(Ended::Closed)),
                Err(e) => {
                    return match e.downcast_ref::<std::io::Error>().map(|e| e.kind()) {
                        Some(std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => {
                            Ok(None)
                        }
                        Some(_) => Ok(Some(Ended::Closed)),
                        None => Err(e),
                    }
                }
            }
        }
    }

    /// Hello with `version` (as both min and max); the agent's answer.
    pub fn hello(&mut self, version: u16) -> Result<u16> {
        self.send(&Message::Hello {
            min_version: version,
            max_version: version,
            agent: "hostile".into(),
        })?;
        match self.recv(Duration::from_secs(30))? {
            Some(Message::HelloAck { version, .. }) => Ok(version),
            other => bail!("expected HelloAck, got {other:?}"),
        }
    }

    /// Sends `before` (DiskOffer, TpmKey...) and Prepare, then reads until Prepared or the
    /// agent ends the exchange.
    pub fn prepare(
        &mut self,
        id: &str,
        spec_toml: &str,
        before: &[Message],
    ) -> Result<std::result::Result<(), Ended>> {
        for m in before {
            self.send(m)?;
        }
        self.send(&Message::Prepare {
            migration_id: id.into(),
            spec_toml: spec_toml.into(),
            source_running: true,
            qemu_version: "10.0.2".into(),
        })?;
        loop {
            match self.recv(Duration::from_secs(60))? {
                Some(Message::Prepared { .. }) => return Ok(Ok(())),
                Some(Message::Abort { code, message }) => {
                    return Ok(Err(Ended::Aborted(code, message)))
                }
                Some(m) => self.seen.push(m),
                None => return Ok(Err(Ended::Closed)),
            }
        }
    }
}

/// A process's resident memory, KiB (VmRSS).
pub fn rss_kib(pid: u32) -> Result<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    s.lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .context("no VmRSS")
}

/// The real uid of a process and its seccomp mode (0 none, 2 filter), from
/// /proc/PID/status.
pub fn uid_and_seccomp(pid: u32) -> Result<(u32, u32)> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let field = |k: &str| -> Option<u32> {
        s.lines()
            .find_map(|l| l.strip_prefix(k))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse().ok())
    };
    Ok((
        field("Uid:").context("no Uid")?,
        field("Seccomp:").context("no Seccomp")?,
    ))
}

/// Whether an unprivileged user (`nobody`) can read `path` (runs `cat` as that user).
pub fn readable_by_nobody(path: &Path) -> Result<bool> {
    as_nobody("cat", path)
}

/// Whether `nobody` can list directory `dir`.
pub fn listable_by_nobody(dir: &Path) -> Result<bool> {
    as_nobody("ls", dir)
}

fn as_nobody(program: &str, path: &Path) -> Result<bool> {
    let st = std::process::Command::new("setpriv")
        .args([
            "--reuid=nobody",
            "--regid=nogroup",
            "--clear-groups",
            program,
        ])
        .arg(path)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .context("setpriv (util-linux)")?;
    Ok(st.success())
}

/// Every file below `dir` (recursively).
pub fn files_below(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut todo = vec![dir.to_path_buf()];
    while let Some(d) = todo.pop() {
        let Ok(rd) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in rd.flatten() {
            let p = e.path();
            match e.file_type() {
                Ok(t) if t.is_dir() => todo.push(p),
                Ok(_) => out.push(p),
                Err(_) => {}
            }
        }
    }
    out
}

//! What sits on the wire between agents in tests: hand-driven TLS peers with certificates
//! from the test CA (to speak raw frames to an agent, or to play a broken destination), a
//! relay that alters one byte in transit (an attacker on the path), and a packet capture.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use rustls::pki_types::ServerName;
use tern_engine::transport::tls::PeerSecurity;

use crate::agents::{issue_cert, test_ca, TEST_CA};

pub type TlsClient = rustls::StreamOwned<rustls::ClientConnection, TcpStream>;
pub type TlsServer = rustls::StreamOwned<rustls::ServerConnection, TcpStream>;

fn creds(name: &str, ip: std::net::IpAddr) -> Result<(PeerSecurity, tempfile::TempDir)> {
    let d = tempfile::Builder::new()
        .prefix("tern-peer-")
        .tempdir_in("/tmp")?;
    issue_cert(&test_ca(Path::new(TEST_CA))?, name, ip, &[], d.path())?;
    Ok((PeerSecurity::load(d.path())?, d))
}

/// A TLS connection to an agent's peer port, authenticated by the test CA.
pub fn tls_client(addr: SocketAddr) -> Result<TlsClient> {
    let (sec, _d) = creds("test-peer", addr.ip())?;
    let (client, _) = sec.configs().context("TLS configs")?;
    let tcp = TcpStream::connect(addr)?;
    tcp.set_read_timeout(Some(Duration::from_secs(30)))?;
    let conn = rustls::ClientConnection::new(client, ServerName::IpAddress(addr.ip().into()))?;
    let mut s = rustls::StreamOwned::new(conn, tcp);
    while s.conn.is_handshaking() {
        s.conn.complete_io(&mut s.sock)?;
    }
    Ok(s)
}

/// Accepts one agent's TLS connection on `l` (a fake destination with a test-CA certificate).
pub fn tls_accept(l: &TcpListener) -> Result<TlsServer> {
    let (sec, _d) = creds("fake-destination", l.local_addr()?.ip())?;
    let (_, server) = sec.configs().context("TLS configs")?;
    let (tcp, _) = l.accept()?;
    tcp.set_read_timeout(Some(Duration::from_secs(30)))?;
    let mut s = rustls::StreamOwned::new(rustls::ServerConnection::new(server)?, tcp);
    while s.conn.is_handshaking() {
        s.conn.complete_io(&mut s.sock)?;
    }
    Ok(s)
}

/// A TCP relay to `target` that flips one byte of what clients send, once, after
/// `flip_at` bytes have passed (counted over all connections).
pub struct TamperRelay {
    pub addr: SocketAddr,
    flipped: Arc<AtomicBool>,
    stop: Arc<AtomicBool>,
}

impl TamperRelay {
    pub fn start(target: SocketAddr, flip_at: u64) -> Result<TamperRelay> {
        let l = TcpListener::bind(SocketAddr::new(target.ip(), 0))?;
        let addr = l.local_addr()?;
        let flipped = Arc::new(AtomicBool::new(false));
        let stop = Arc::new(AtomicBool::new(false));
        let passed = Arc::new(AtomicU64::new(0));
        let (f, st) = (flipped.clone(), stop.clone());
        std::thread::spawn(move || {
            for c in l.incoming() {
                if st.load(Ordering::SeqCst) {
                    break;
                }
                let Ok(c) = c else { continue };
                let Ok(up) = TcpStream::connect(target) else {
                    continue;
                };
                let (c2, up2) = (c.try_clone(), up.try_clone());
                let (Ok(c2), Ok(up2)) = (c2, up2) else {
                    continue;
                };
                let (f, passed) = (f.clone(), passed.clone());
                std::thread::spawn(move || pump(c, up, Some((flip_at, passed, f))));
                std::thread::spawn(move || pump(up2, c2, None));
            }
        });
        Ok(TamperRelay {
            addr,
            flipped,
            stop,
        })
    }

    /// Whether a byte has been altered yet.
    pub fn flipped(&self) -> bool {
        self.flipped.load(Ordering::SeqCst)
    }
}

impl Drop for TamperRelay {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        let _ = TcpStream::connect(self.addr); // wakes the accept loop
    }
}

fn pump(
    mut from: TcpStream,
    mut to: TcpStream,
    mut tamper: Option<(u64, Arc<AtomicU64>, Arc<AtomicBool>)>,
) {
    let mut buf = vec![0u8; 64 << 10];
    loop {
        let n = match from.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        if let Some((at, passed, flipped)) = &tamper {
            let before = passed.fetch_add(n as u64, Ordering::SeqCst);
            if before + n as u64 > *at && !flipped.swap(true, Ordering::SeqCst) {
                let i = at.saturating_sub(before).min(n as u64 - 1) as usize;
                buf[i] ^= 0x20;
                tamper = None;
            }
        }
        if to.write_all(&buf[..n]).is_err() {
            break;
        }
    }
    let _ = to.shutdown(std::net::Shutdown::Write);
}

/// `tcpdump` writing a pcap of one TCP port on one interface, stopped when dropped.
pub struct Capture {
    child: Option<Child>,
    pub file: PathBuf,
    err: PathBuf,
    _dir: tempfile::TempDir,
}

impl Capture {
    /// Starts capturing; returns once tcpdump is listening.
    pub fn start(iface: &str, port: u16) -> Result<Capture> {
        let dir = tempfile::Builder::new()
            .prefix("tern-pcap-")
            .tempdir_in("/tmp")?;
        let file = dir.path().join("cap.pcap");
        let err = dir.path().join("tcpdump.err");
        let mut child = Command::new("tcpdump")
            // a 64 MiB kernel buffer: a migration over loopback outruns the default
            .args(["-i", iface, "-U", "-n", "-s", "0", "-B", "65536", "-w"])
            .arg(&file)
            .arg(format!("tcp port {port}"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&err)?)
            .spawn()
            .context("tcpdump (apt-get install tcpdump; scripts/setup.sh installs it)")?;
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let text = std::fs::read_to_string(&err).unwrap_or_default();
            if text.contains("listening on") {
                break;
            }
            if let Some(st) = child.try_wait()? {
                bail!("tcpdump exited ({st}): {text}");
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                bail!("tcpdump did not start listening within 20 s: {text}");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(Capture {
            child: Some(child),
            file,
            err,
            _dir: dir,
        })
    }

    /// Stops the capture and returns the pcap's bytes; an error if the kernel dropped
    /// packets (the capture would not be the whole conversation).
    pub fn finish(mut self) -> Result<Vec<u8>> {
        if let Some(mut c) = self.child.take() {
            let _ = Command::new("kill")
                .arg("-INT")
                .arg(c.id().to_string())
                .status();
            c.wait()?;
        }
        let text = std::fs::read_to_string(&self.err).unwrap_or_default();
        let dropped: u64 = text
            .lines()
            .find(|l| l.contains("dropped by kernel"))
            .and_then(|l| l.split_whitespace().next()?.parse().ok())
            .unwrap_or(0);
        if dropped > 0 {
            bail!("the capture missed {dropped} packets (dropped by the kernel): {text}");
        }
        Ok(std::fs::read(&self.file)?)
    }
}

impl Drop for Capture {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// How many times `needle` occurs in `hay`.
pub fn count_occurrences(hay: &[u8], needle: &[u8]) -> usize {
    if needle.is_empty() || hay.len() < needle.len() {
        return 0;
    }
    hay.windows(needle.len()).filter(|w| *w == needle).count()
}

//! A real etcd server for a test (Debian's `etcd-server`, `scripts/setup.sh` installs it),
//! on free loopback ports with its own data directory, never the packaged service; killed
//! on drop. Plain HTTP, or mutual TLS with certificates made here.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use tern_controller::etcd::{EtcdStore, EtcdTls};

/// Where Debian's package puts the server.
pub const ETCD: &str = "/usr/bin/etcd";

/// An etcd server for one test, killed on drop.
pub struct Etcd {
    child: Child,
    dir: tempfile::TempDir,
    /// Its client URL (`http://127.0.0.1:PORT`, or `https://` with TLS).
    pub url: String,
}

impl Etcd {
    pub fn start() -> Etcd {
        Self::spawn(None)
    }

    /// With TLS on the client URL (server certificate for 127.0.0.1, client certificates
    /// required): the files are in `dir()` as `ca.pem`, `client.pem`, `client.key`.
    pub fn start_tls() -> Etcd {
        let dir = tempfile::tempdir().unwrap();
        make_certs(dir.path());
        Self::spawn(Some(dir))
    }

    fn spawn(dir: Option<tempfile::TempDir>) -> Etcd {
        assert!(
            Path::new(ETCD).exists(),
            "{ETCD} is missing: run `bash scripts/setup.sh` (it installs etcd-server)"
        );
        let tls = dir.is_some();
        let dir = dir.unwrap_or_else(|| tempfile::tempdir().unwrap());
        let (client, peer) = (
            crate::agents::free_port().unwrap(),
            crate::agents::free_port().unwrap(),
        );
        let scheme = if tls { "https" } else { "http" };
        let url = format!("{scheme}://127.0.0.1:{client}");
        let peer_url = format!("http://127.0.0.1:{peer}");
        let log = std::fs::File::create(dir.path().join("etcd.log")).unwrap();
        let mut cmd = Command::new(ETCD);
        cmd.arg("--data-dir")
            .arg(dir.path().join("data"))
            .args(["--name", "default"])
            .args(["--listen-client-urls", &url])
            .args(["--advertise-client-urls", &url])
            .args(["--listen-peer-urls", &peer_url])
            .args(["--initial-advertise-peer-urls", &peer_url])
            .args(["--initial-cluster", &format!("default={peer_url}")])
            .env_clear()
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log);
        if tls {
            let p = |f: &str| dir.path().join(f);
            cmd.arg("--cert-file")
                .arg(p("server.pem"))
                .arg("--key-file")
                .arg(p("server.key"))
                .arg("--trusted-ca-file")
                .arg(p("ca.pem"))
                .arg("--client-cert-auth");
        }
        let child = cmd.spawn().unwrap();
        let mut etcd = Etcd { child, dir, url };
        etcd.wait_ready(tls);
        etcd
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("etcd.log")).unwrap_or_default()
    }

    fn wait_ready(&mut self, tls: bool) {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                panic!("etcd exited ({status}) before it answered:\n{}", self.log());
            }
            let up = if tls {
                // The store's own client checks the handshake and the gateway at once.
                EtcdStore::open_tls(
                    std::slice::from_ref(&self.url),
                    "/probe",
                    "probe",
                    3,
                    &self.tls(),
                )
                .is_ok()
            } else {
                health(&self.url)
            };
            if up {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "etcd did not answer on {} within 30 s:\n{}",
                self.url,
                self.log()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    pub fn tls(&self) -> EtcdTls {
        EtcdTls {
            ca: self.dir.path().join("ca.pem"),
            cert: self.dir.path().join("client.pem"),
            key: self.dir.path().join("client.key"),
        }
    }
}

impl Drop for Etcd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `GET /health` answers `{"health":"true"}`.
pub fn health(url: &str) -> bool {
    let addr = url.trim_start_matches("http://");
    let Ok(mut s) = TcpStream::connect(addr) else {
        return false;
    };
    s.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
    let req = format!("GET /health HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
    if s.write_all(req.as_bytes()).is_err() {
        return false;
    }
    let mut answer = String::new();
    let _ = s.read_to_string(&mut answer);
    answer.contains("\"health\":\"true\"")
}

/// A CA, a server certificate for 127.0.0.1 and a client certificate, in `dir`.
pub fn make_certs(dir: &Path) {
    use rcgen::{
        BasicConstraints, CertificateParams, ExtendedKeyUsagePurpose, IsCa, KeyPair, SanType,
    };
    let ca_key = KeyPair::generate().unwrap();
    let mut p = CertificateParams::new(Vec::<String>::new()).unwrap();
    p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca = p.self_signed(&ca_key).unwrap();
    let issue = |name: &str, purposes: Vec<ExtendedKeyUsagePurpose>| {
        let key = KeyPair::generate().unwrap();
        let mut p = CertificateParams::new(vec!["localhost".to_string()]).unwrap();
        p.subject_alt_names
            .push(SanType::IpAddress("127.0.0.1".parse().unwrap()));
        p.extended_key_usages = purposes;
        let cert = p.signed_by(&key, &ca, &ca_key).unwrap();
        std::fs::write(dir.join(format!("{name}.pem")), cert.pem()).unwrap();
        std::fs::write(dir.join(format!("{name}.key")), key.serialize_pem()).unwrap();
    };
    // etcd 3.4's JSON gateway dials etcd's own gRPC port with the server certificate as its
    // client certificate: the server certificate needs client authentication too.
    issue(
        "server",
        vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ],
    );
    issue("client", vec![ExtendedKeyUsagePurpose::ClientAuth]);
    std::fs::write(dir.join("ca.pem"), ca.pem()).unwrap();
}

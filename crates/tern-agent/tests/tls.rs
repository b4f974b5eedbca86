//! Mutual TLS between agents with certificates `tern ca init` / `tern cert issue` make
//! (`tern_agent::pki`) and the engine's transport (`tern_engine::transport::tls`):
//! same-CA peers talk and see each other's labels, others are refused with words that
//! say so.

use std::path::{Path, PathBuf};
use std::time::Duration;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::CertificateDer;
use tern_agent::pki;
use tern_engine::transport::tls::{
    describe, HandshakeError, PeerIdentity, PeerSecurity, PeerStream,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

fn cluster(dir: &Path, name: &str, host: &str, labels: &[&str]) -> PathBuf {
    let ca = dir.join(format!("{name}-ca"));
    if !ca.join(pki::CA_CERT).exists() {
        pki::init_ca(&ca, name).unwrap();
    }
    let out = dir.join(format!("{name}-{host}"));
    pki::issue(
        &ca,
        &pki::IssueRequest {
            host: host.into(),
            labels: labels.iter().map(|s| s.to_string()).collect(),
            days: 1,
            ..Default::default()
        },
        &out,
    )
    .unwrap();
    out
}

async fn pair(
    server: &PeerSecurity,
    client: &PeerSecurity,
) -> (
    Result<(PeerStream, PeerIdentity), HandshakeError>,
    Result<(PeerStream, PeerIdentity), HandshakeError>,
) {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap().to_string();
    let server = server.clone();
    let acc = tokio::spawn(async move {
        let (s, a) = l.accept().await.unwrap();
        server
            .accept(s, a, Duration::from_secs(5), Duration::from_secs(5))
            .await
    });
    let c = client
        .connect(&addr, Duration::from_secs(5), Duration::from_secs(5))
        .await;
    (acc.await.unwrap(), c)
}

#[tokio::test]
async fn same_ca_talks_and_sees_labels_other_ca_is_refused_both_ways() {
    let d = tempfile::tempdir().unwrap();
    let a = PeerSecurity::load(&cluster(d.path(), "one", "127.0.0.1", &["trusted"])).unwrap();
    let b = PeerSecurity::load(&cluster(d.path(), "one", "127.0.0.1", &[])).unwrap();
    let x = PeerSecurity::load(&cluster(d.path(), "two", "127.0.0.1", &["trusted"])).unwrap();

    let (s, c) = pair(&a, &b).await;
    let ((mut s, sid), (mut c, cid)) = (s.unwrap(), c.unwrap());
    assert_eq!(sid.labels, Vec::<String>::new());
    assert_eq!(cid.labels, vec!["trusted".to_string()]);
    assert_eq!(cid.names, vec!["127.0.0.1".to_string()]);
    c.write_all(b"hello").await.unwrap();
    c.flush().await.unwrap();
    let mut got = [0u8; 5];
    s.read_exact(&mut got).await.unwrap();
    assert_eq!(&got, b"hello");

    // a client from another CA: the server refuses it
    let (s, c) = pair(&a, &x).await;
    let e = s.err().expect("server must refuse a foreign client");
    assert!(
        describe_err(&e).contains("certificate"),
        "{}",
        describe_err(&e)
    );
    // the client may finish its side of the handshake first; its first read fails
    if let Ok((mut c, _)) = c {
        let mut b = [0u8; 1];
        assert!(c.read(&mut b).await.is_err());
    }
    // a server from another CA: the client refuses it
    let (_, c) = pair(&x, &a).await;
    let e = c.err().expect("client must refuse a foreign server");
    assert!(
        describe_err(&e).contains("not from this cluster's CA"),
        "{}",
        describe_err(&e)
    );
}

#[tokio::test]
async fn a_certificate_for_another_name_is_refused() {
    let d = tempfile::tempdir().unwrap();
    let a = PeerSecurity::load(&cluster(d.path(), "one", "10.9.9.9", &[])).unwrap();
    let b = PeerSecurity::load(&cluster(d.path(), "one", "127.0.0.1", &[])).unwrap();
    let (_, c) = pair(&a, &b).await;
    let e = c.err().expect("name mismatch must be refused");
    assert!(
        describe_err(&e).contains("not issued for"),
        "{}",
        describe_err(&e)
    );
}

fn describe_err(e: &HandshakeError) -> String {
    match e {
        HandshakeError::Tls { cause, .. } => describe(cause),
        e => e.to_string(),
    }
}

#[test]
fn bad_names_and_labels_are_refused_and_ca_is_not_overwritten() {
    let d = tempfile::tempdir().unwrap();
    let ca = d.path().join("ca");
    pki::init_ca(&ca, "c").unwrap();
    assert!(matches!(
        pki::init_ca(&ca, "c"),
        Err(pki::PkiError::Exists(_))
    ));
    let req = |host: &str, label: &str| pki::IssueRequest {
        host: host.into(),
        labels: vec![label.into()],
        days: 1,
        ..Default::default()
    };
    let out = d.path().join("o");
    assert!(matches!(
        pki::issue(&ca, &req("bad host", "x"), &out),
        Err(pki::PkiError::BadHost(_))
    ));
    assert!(matches!(
        pki::issue(&ca, &req("h1", "Trusted!"), &out),
        Err(pki::PkiError::BadLabel(_))
    ));
    pki::issue(&ca, &req("h1.example", "zone-a"), &out).unwrap();
    let mode = |f: &str| {
        use std::os::unix::fs::PermissionsExt;
        std::fs::metadata(out.join(f)).unwrap().permissions().mode() & 0o777
    };
    assert_eq!(mode(pki::AGENT_KEY), 0o600);
    assert_eq!(mode(pki::CLUSTER_KEY), 0o600);
    let pem = std::fs::read(out.join(pki::AGENT_CERT)).unwrap();
    let der = CertificateDer::from_pem_slice(&pem).unwrap();
    let (names, labels) = pki::names_and_labels(&der).unwrap();
    assert_eq!(names, vec!["h1.example".to_string()]);
    assert_eq!(labels, vec!["zone-a".to_string()]);
}

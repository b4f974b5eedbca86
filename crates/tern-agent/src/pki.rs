//! The cluster's certificates: `tern ca init` makes a cluster CA (and the cluster key that
//! keys content hashes), `tern cert issue` makes an agent certificate signed by it, with
//! the host's names as SANs and its labels; [`labels_of`] reads the labels back from a
//! peer's certificate. Labels ride in the certificate (as `tern-label:NAME` URI SANs) so
//! that only the CA can say a host is, for example, `trusted`.
//!
//! Files: a CA directory holds `ca.pem`, `ca.key` (0600) and `cluster.key` (0600). An
//! agent directory (`--tls-dir`) holds `ca.pem`, `agent.pem`, `agent.key` (0600) and a copy
//! of `cluster.key`.

use std::net::IpAddr;
use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose, SanType,
};

pub use tern_engine::secret::{random_key, read_secret, write_file};
pub use tern_engine::transport::cert::{
    labels_of, names_and_labels, AGENT_CERT, AGENT_KEY, CA_CERT, CA_KEY, CLUSTER_KEY, LABEL_PREFIX,
};

/// Why the CA or a certificate could not be made.
#[derive(Debug, thiserror::Error)]
pub enum PkiError {
    #[error("{0} already exists: refusing to overwrite a CA (remove it first if you mean to start a new cluster)")]
    Exists(PathBuf),
    #[error("cannot read {0}")]
    Read(PathBuf, #[source] std::io::Error),
    #[error("cannot write {0}")]
    Write(PathBuf, #[source] std::io::Error),
    #[error("{0} is not a CA made by `tern ca init`")]
    BadCa(PathBuf, #[source] rcgen::Error),
    #[error("host name {0:?} is not a DNS name or an IP address")]
    BadHost(String),
    #[error("label {0:?} is invalid: use 1-63 characters from [a-z0-9_-]")]
    BadLabel(String),
    #[error("certificate generation failed")]
    Generate(#[from] rcgen::Error),
    #[error(transparent)]
    Parse(#[from] tern_engine::transport::cert::CertParseError),
    #[error(transparent)]
    Secret(#[from] tern_engine::secret::SecretError),
}

/// What `tern cert issue` puts in an agent certificate.
#[derive(Debug, Clone, Default)]
pub struct IssueRequest {
    /// The host's name (DNS name or IP address); always a SAN.
    pub host: String,
    /// More addresses and names peers dial this agent by.
    pub ips: Vec<IpAddr>,
    pub dns: Vec<String>,
    /// Host labels the authorisation policy matches (e.g. `trusted`).
    pub labels: Vec<String>,
    /// Validity in days.
    pub days: u32,
}

/// Creates a cluster CA in `dir`: a self-signed ECDSA P-256 CA valid for ten years, and a
/// fresh cluster key.
pub fn init_ca(dir: &Path, cluster: &str) -> Result<(), PkiError> {
    for f in [CA_CERT, CA_KEY] {
        if dir.join(f).exists() {
            return Err(PkiError::Exists(dir.join(f)));
        }
    }
    std::fs::create_dir_all(dir).map_err(|e| PkiError::Write(dir.into(), e))?;
    let key = KeyPair::generate()?;
    let mut p = CertificateParams::new(Vec::<String>::new())?;
    p.distinguished_name = ca_name(cluster);
    p.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    p.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    let now = time_now();
    p.not_before = now - std::time::Duration::from_secs(3600);
    p.not_after = now + std::time::Duration::from_secs(3650 * 86400);
    let cert = p.self_signed(&key)?;
    write_secret(&dir.join(CA_KEY), key.serialize_pem().as_bytes())?;
    write_file(&dir.join(CA_CERT), cert.pem().as_bytes(), 0o644)?;
    let ck = dir.join(CLUSTER_KEY);
    if !ck.exists() {
        let key = random_key().map_err(|e| PkiError::Read("/dev/urandom".into(), e))?;
        write_secret(&ck, format!("{}\n", hex::encode(key)).as_bytes())?;
    }
    Ok(())
}

/// Issues an agent certificate signed by the CA in `ca_dir` into `out`: `agent.pem`,
/// `agent.key`, and copies of `ca.pem` and `cluster.key`; everything an agent's
/// `--tls-dir` needs.
pub fn issue(ca_dir: &Path, req: &IssueRequest, out: &Path) -> Result<(), PkiError> {
    let ca_pem = read(&ca_dir.join(CA_CERT))?;
    let ca_key_pem = String::from_utf8(read_secret(&ca_dir.join(CA_KEY))?).map_err(|e| {
        PkiError::Read(
            ca_dir.join(CA_KEY),
            std::io::Error::new(std::io::ErrorKind::InvalidData, e),
        )
    })?;
    let ca_key =
        KeyPair::from_pem(&ca_key_pem).map_err(|e| PkiError::BadCa(ca_dir.join(CA_KEY), e))?;
    let ca_params = CertificateParams::from_ca_cert_pem(&ca_pem)
        .map_err(|e| PkiError::BadCa(ca_dir.join(CA_CERT), e))?;
    let ca = ca_params
        .self_signed(&ca_key)
        .map_err(|e| PkiError::BadCa(ca_dir.join(CA_KEY), e))?;

    let mut sans = Vec::new();
    match req.host.parse::<IpAddr>() {
        Ok(ip) => sans.push(SanType::IpAddress(ip)),
        Err(_) if valid_dns(&req.host) => sans.push(SanType::DnsName(req.host.clone().try_into()?)),
        Err(_) => return Err(PkiError::BadHost(req.host.clone())),
    }
    for ip in &req.ips {
        sans.push(SanType::IpAddress(*ip));
    }
    for d in &req.dns {
        if !valid_dns(d) {
            return Err(PkiError::BadHost(d.clone()));
        }
        sans.push(SanType::DnsName(d.clone().try_into()?));
    }
    for l in &req.labels {
        if !valid_label(l) {
            return Err(PkiError::BadLabel(l.clone()));
        }
        sans.push(SanType::URI(format!("{LABEL_PREFIX}{l}").try_into()?));
    }
    let key = KeyPair::generate()?;
    let mut p = CertificateParams::new(Vec::<String>::new())?;
    p.subject_alt_names = sans;
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, req.host.clone());
    p.distinguished_name = dn;
    p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    p.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ServerAuth,
        ExtendedKeyUsagePurpose::ClientAuth,
    ];
    let now = time_now();
    p.not_before = now - std::time::Duration::from_secs(3600);
    p.not_after = now + std::time::Duration::from_secs(u64::from(req.days.max(1)) * 86400);
    let cert = p.signed_by(&key, &ca, &ca_key)?;

    std::fs::create_dir_all(out).map_err(|e| PkiError::Write(out.into(), e))?;
    write_secret(&out.join(AGENT_KEY), key.serialize_pem().as_bytes())?;
    write_file(&out.join(AGENT_CERT), cert.pem().as_bytes(), 0o644)?;
    write_file(&out.join(CA_CERT), ca_pem.as_bytes(), 0o644)?;
    let ck = ca_dir.join(CLUSTER_KEY);
    if ck.exists() {
        write_secret(&out.join(CLUSTER_KEY), &read_secret(&ck)?)?;
    }
    Ok(())
}

fn ca_name(cluster: &str) -> DistinguishedName {
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, format!("tern cluster CA {cluster}"));
    dn.push(DnType::OrganizationName, "tern");
    dn
}

pub fn valid_label(l: &str) -> bool {
    !l.is_empty()
        && l.len() <= 63
        && l.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_')
}

fn valid_dns(d: &str) -> bool {
    !d.is_empty()
        && d.len() <= 253
        && d.split('.').all(|p| {
            !p.is_empty()
                && p.len() <= 63
                && !p.starts_with('-')
                && !p.ends_with('-')
                && p.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
        })
}

fn time_now() -> time::OffsetDateTime {
    time::OffsetDateTime::now_utc()
}

fn read(p: &Path) -> Result<String, PkiError> {
    std::fs::read_to_string(p).map_err(|e| PkiError::Read(p.into(), e))
}

fn write_secret(p: &Path, data: &[u8]) -> Result<(), PkiError> {
    Ok(write_file(p, data, 0o600)?)
}

//! What an agent certificate says: the names peers dial it by and the labels the cluster
//! CA granted it (`tern-label:NAME` URI SANs, so only the CA can say a host is `trusted`),
//! and where an agent's credentials live in its TLS directory. Issuing certificates is the
//! daemon's (`tern_agent::pki`).

use std::net::IpAddr;

/// The files of an agent's TLS directory (and of a CA directory).
pub const CA_CERT: &str = "ca.pem";
pub const CA_KEY: &str = "ca.key";
pub const CLUSTER_KEY: &str = "cluster.key";
pub const AGENT_CERT: &str = "agent.pem";
pub const AGENT_KEY: &str = "agent.key";
/// How a label rides in a certificate: a URI SAN `tern-label:NAME`.
pub const LABEL_PREFIX: &str = "tern-label:";

/// A certificate that cannot be read.
#[derive(Debug, thiserror::Error)]
#[error("the certificate cannot be parsed")]
pub struct CertParseError;

/// The host labels a certificate carries.
pub fn labels_of(cert_der: &[u8]) -> Result<Vec<String>, CertParseError> {
    Ok(names_and_labels(cert_der)?.1)
}

/// The DNS names and IP addresses (as text) and the labels of a certificate.
pub fn names_and_labels(cert_der: &[u8]) -> Result<(Vec<String>, Vec<String>), CertParseError> {
    use x509_parser::extensions::GeneralName;
    let (_, cert) = x509_parser::parse_x509_certificate(cert_der).map_err(|_| CertParseError)?;
    let mut names = Vec::new();
    let mut labels = Vec::new();
    if let Ok(Some(san)) = cert.subject_alternative_name() {
        for n in &san.value.general_names {
            match n {
                GeneralName::DNSName(d) => names.push(d.to_string()),
                GeneralName::IPAddress(b) => {
                    if let Ok(v4) = <[u8; 4]>::try_from(*b) {
                        names.push(IpAddr::from(v4).to_string());
                    } else if let Ok(v6) = <[u8; 16]>::try_from(*b) {
                        names.push(IpAddr::from(v6).to_string());
                    }
                }
                GeneralName::URI(u) => {
                    if let Some(l) = u.strip_prefix(LABEL_PREFIX) {
                        labels.push(l.to_string());
                    }
                }
                _ => {}
            }
        }
    }
    Ok((names, labels))
}

//! The platform's X.509, in one place.
//!
//! Broker nodes share one **agent CA**. With it each node issues itself the TLS server
//! certificate of its agent port, and the node that commits an enrollment signs the agent's
//! client certificate. An agent is identified by its **public key**: the broker records the
//! key's fingerprint at enrollment (from the signing request, whose signature proves the agent
//! holds the private key) and recognises the same key in the client certificate of every later
//! connection. A certificate is therefore only a carrier; revoking the agent in the broker's
//! state cuts it off at once, whatever the certificate's validity says.
//!
//! The same CA (the **cluster CA**) certifies the broker nodes to each other: at every start a
//! node issues itself a **peer certificate** naming it `suanli:broker:<id>`, good for both ends
//! of the mutual TLS between nodes (Raft, forwarded calls). A peer is recognised by that name
//! in a certificate the CA signed; an agent's certificate (`suanli:node:<id>`) never passes.

pub mod assertion;
pub mod shared_key;
pub mod ssh;
pub mod tunnel_ticket;

use std::io::Write;
use std::net::IpAddr;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::Duration;

use rcgen::{
    BasicConstraints, CertificateParams, CertificateSigningRequestParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SanType, SerialNumber,
};
use sha2::{Digest, Sha256};
use time::OffsetDateTime;

/// How long an agent's client certificate is valid.
pub const AGENT_CERTIFICATE_VALIDITY: Duration = Duration::from_secs(365 * 24 * 3600);
/// How long a CA made by [`Ca::generate`] is valid.
const CA_VALIDITY: Duration = Duration::from_secs(10 * 365 * 24 * 3600);
/// A node issues itself a fresh server certificate at every start.
const SERVER_VALIDITY: Duration = Duration::from_secs(90 * 24 * 3600);
/// Tolerated clock skew between the issuing node and its peers.
const BACKDATE: time::Duration = time::Duration::minutes(10);
/// Largest signing request accepted, in bytes of PEM.
pub const MAX_CSR_PEM: usize = 8 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum PkiError {
    #[error("certificate signing request: {0}")]
    Csr(String),
    #[error("certificate: {0}")]
    Certificate(String),
    #[error("key: {0}")]
    Key(String),
    #[error("{0}: {1}")]
    Io(PathBuf, std::io::Error),
}

/// SHA-256 of a subject public key's bits: what identifies an agent.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct KeyFingerprint(pub [u8; 32]);

impl KeyFingerprint {
    fn of(public_key_bits: &[u8]) -> Self {
        KeyFingerprint(Sha256::digest(public_key_bits).into())
    }

    pub fn to_hex(&self) -> String {
        hex::encode(self.0)
    }
}

impl std::fmt::Debug for KeyFingerprint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "KeyFingerprint({}…)", &self.to_hex()[..12])
    }
}

/// A certificate and its private key, both PEM.
#[derive(Clone, Debug)]
pub struct CertifiedKey {
    pub cert_pem: String,
    pub key_pem: String,
}

/// The agent CA: its certificate and the key that signs with it.
pub struct Ca {
    cert_pem: String,
    key_pem: String,
    issuer: Issuer<'static, KeyPair>,
    /// Every CA whose certificates are accepted (PEM): this one first, then those
    /// [`Ca::also_trusting`] added while the cluster CA is rotated.
    trust_pem: String,
}

impl Ca {
    /// A new self-signed CA (for `suanli-broker agent-ca init`, development and tests).
    pub fn generate(common_name: &str) -> Result<Ca, PkiError> {
        let key = KeyPair::generate().map_err(|e| PkiError::Key(e.to_string()))?;
        let mut params = CertificateParams::default();
        params.distinguished_name = name(common_name);
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
        set_validity(&mut params, CA_VALIDITY);
        params.serial_number = Some(random_serial());
        let cert = params.self_signed(&key).map_err(|e| PkiError::Certificate(e.to_string()))?;
        let key_pem = key.serialize_pem();
        let cert_pem = cert.pem();
        Ok(Ca { trust_pem: cert_pem.clone(), cert_pem, key_pem, issuer: Issuer::new(params, key) })
    }

    /// The CA of `cert_pem`, signing with `key_pem`, which must be that certificate's key (a
    /// mismatched pair would sign certificates nobody can chain).
    pub fn from_pem(cert_pem: &str, key_pem: &str) -> Result<Ca, PkiError> {
        use rcgen::PublicKeyData;
        let key = KeyPair::from_pem(key_pem).map_err(|e| PkiError::Key(e.to_string()))?;
        if KeyFingerprint::of(key.der_bytes()) != pem_certificate_fingerprint(cert_pem)? {
            return Err(PkiError::Key("the CA key does not belong to the CA certificate".into()));
        }
        let issuer = Issuer::from_ca_cert_pem(cert_pem, key).map_err(|e| PkiError::Certificate(e.to_string()))?;
        Ok(Ca { cert_pem: cert_pem.to_owned(), key_pem: key_pem.to_owned(), issuer, trust_pem: cert_pem.to_owned() })
    }

    /// This CA, also accepting certificates of the CAs in `bundle_pem` (one or more PEM
    /// certificates): how the cluster CA is rotated without cutting anyone off. First every
    /// node trusts the new CA beside the old; then the new one signs and the old is only
    /// trusted, while agents renew their certificates; then the old is dropped (ops/README.md).
    pub fn also_trusting(mut self, bundle_pem: &str) -> Result<Ca, PkiError> {
        let mut found = 0;
        for pem in x509_parser::pem::Pem::iter_from_buffer(bundle_pem.as_bytes()) {
            let pem = pem.map_err(|e| PkiError::Certificate(format!("the trusted CA bundle: {e}")))?;
            let cert = pem.parse_x509().map_err(|e| PkiError::Certificate(format!("the trusted CA bundle: {e}")))?;
            if !cert.is_ca() {
                return Err(PkiError::Certificate(format!("the trusted CA bundle holds {}, which is not a CA", cert.subject())));
            }
            found += 1;
        }
        if found == 0 {
            return Err(PkiError::Certificate("the trusted CA bundle holds no certificate".into()));
        }
        if !self.trust_pem.ends_with('\n') {
            self.trust_pem.push('\n');
        }
        self.trust_pem.push_str(bundle_pem);
        Ok(self)
    }

    /// Every CA accepted (PEM): what the mutual-TLS ports check client certificates against.
    pub fn trust_pem(&self) -> &str {
        &self.trust_pem
    }

    /// Reads `cert` and `key`; with `create`, makes a new CA there first if neither exists.
    pub fn load(cert: &Path, key: &Path, create: bool) -> Result<Ca, PkiError> {
        if create && !cert.exists() && !key.exists() {
            let ca = Ca::generate("Suanli agent CA")?;
            write_private_file(key, &ca.key_pem)?;
            std::fs::write(cert, &ca.cert_pem).map_err(|e| PkiError::Io(cert.to_owned(), e))?;
            return Ok(ca);
        }
        let read = |p: &Path| std::fs::read_to_string(p).map_err(|e| PkiError::Io(p.to_owned(), e));
        Ca::from_pem(&read(cert)?, &read(key)?)
    }

    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    pub fn key_pem(&self) -> &str {
        &self.key_pem
    }

    /// A TLS server certificate for a broker node, valid for `names` (DNS names or IP addresses).
    pub fn server_certificate(&self, names: &[String]) -> Result<CertifiedKey, PkiError> {
        self.named_server_certificate("suanli-broker", names)
    }

    /// A TLS server certificate for another listener of the platform (`suanli-broker
    /// server-cert`: the portal's agent tunnels, the artifact store), valid for `names`.
    pub fn named_server_certificate(&self, common_name: &str, names: &[String]) -> Result<CertifiedKey, PkiError> {
        if names.is_empty() {
            return Err(PkiError::Certificate("a server certificate names at least one host".into()));
        }
        self.node_certificate(common_name, san(names)?, vec![ExtendedKeyUsagePurpose::ServerAuth])
    }

    /// Broker node `node`'s peer certificate: server and client end of the mutual TLS between
    /// nodes, valid for `names` (DNS names or IP addresses it is reached by) and naming the
    /// node as `suanli:broker:<node>`.
    pub fn peer_certificate(&self, node: u64, names: &[String]) -> Result<CertifiedKey, PkiError> {
        let mut names = san(names)?;
        let uri = format!("{PEER_URI_PREFIX}{node}").try_into().map_err(|_| PkiError::Certificate("peer URI".into()))?;
        names.push(SanType::URI(uri));
        let usages = vec![ExtendedKeyUsagePurpose::ServerAuth, ExtendedKeyUsagePurpose::ClientAuth];
        self.node_certificate(&format!("suanli-broker node {node}"), names, usages)
    }

    /// A fresh key and a certificate for it, signed by this CA, for one of the broker's own
    /// endpoints (valid [`SERVER_VALIDITY`], never a CA).
    fn node_certificate(&self, common_name: &str, names: Vec<SanType>, usages: Vec<ExtendedKeyUsagePurpose>) -> Result<CertifiedKey, PkiError> {
        let key = KeyPair::generate().map_err(|e| PkiError::Key(e.to_string()))?;
        let mut params = CertificateParams::default();
        params.distinguished_name = name(common_name);
        params.subject_alt_names = names;
        params.extended_key_usages = usages;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.is_ca = IsCa::ExplicitNoCa;
        params.use_authority_key_identifier_extension = true;
        set_validity(&mut params, SERVER_VALIDITY);
        params.serial_number = Some(random_serial());
        let cert = params.signed_by(&key, &self.issuer).map_err(|e| PkiError::Certificate(e.to_string()))?;
        Ok(CertifiedKey { cert_pem: cert.pem(), key_pem: key.serialize_pem() })
    }

    /// The client certificate of enrolled node `node`, for the key of `csr_pem`. Nothing the
    /// request asks for is copied: the certificate is a client certificate for that key only.
    pub fn sign_agent(&self, csr_pem: &str, node: u64) -> Result<String, PkiError> {
        let csr = parse_csr(csr_pem)?;
        let mut params = CertificateParams::default();
        params.distinguished_name = name(&format!("suanli-agent node {node}"));
        let uri = format!("suanli:node:{node}").try_into().map_err(|_| PkiError::Certificate("node URI".into()))?;
        params.subject_alt_names = vec![SanType::URI(uri)];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.is_ca = IsCa::ExplicitNoCa;
        params.use_authority_key_identifier_extension = true;
        set_validity(&mut params, AGENT_CERTIFICATE_VALIDITY);
        params.serial_number = Some(random_serial());
        let cert = params.signed_by(&csr.public_key, &self.issuer).map_err(|e| PkiError::Certificate(e.to_string()))?;
        Ok(cert.pem())
    }
}

/// How a peer certificate names its broker node.
const PEER_URI_PREFIX: &str = "suanli:broker:";

fn san(names: &[String]) -> Result<Vec<SanType>, PkiError> {
    names
        .iter()
        .map(|n| match n.parse::<IpAddr>() {
            Ok(ip) => Ok(SanType::IpAddress(ip)),
            Err(_) => n.clone().try_into().map(SanType::DnsName).map_err(|_| PkiError::Certificate(format!("bad name {n:?}"))),
        })
        .collect()
}

/// The broker node a DER certificate (a TLS peer's, already verified against the cluster CA)
/// names as a peer certificate; `None` for any other certificate (an agent's).
pub fn broker_peer_of(der: &[u8]) -> Option<u64> {
    let (_, cert) = x509_parser::parse_x509_certificate(der).ok()?;
    let names = cert.subject_alternative_name().ok()??;
    names.value.general_names.iter().find_map(|n| match n {
        x509_parser::extensions::GeneralName::URI(uri) => uri.strip_prefix(PEER_URI_PREFIX)?.parse().ok(),
        _ => None,
    })
}

fn parse_csr(csr_pem: &str) -> Result<CertificateSigningRequestParams, PkiError> {
    if csr_pem.len() > MAX_CSR_PEM {
        return Err(PkiError::Csr(format!("larger than {MAX_CSR_PEM} bytes")));
    }
    // Verifies the request's signature: the sender holds the private key.
    CertificateSigningRequestParams::from_pem(csr_pem).map_err(|e| PkiError::Csr(e.to_string()))
}

/// The fingerprint of the key a signing request is for, once its signature checks out.
pub fn csr_fingerprint(csr_pem: &str) -> Result<KeyFingerprint, PkiError> {
    use rcgen::PublicKeyData;
    Ok(KeyFingerprint::of(parse_csr(csr_pem)?.public_key.der_bytes()))
}

/// The fingerprint of the key a DER certificate certifies (a TLS peer's, already verified).
pub fn certificate_fingerprint(der: &[u8]) -> Result<KeyFingerprint, PkiError> {
    let (_, cert) = x509_parser::parse_x509_certificate(der).map_err(|e| PkiError::Certificate(e.to_string()))?;
    Ok(KeyFingerprint::of(&cert.tbs_certificate.subject_pki.subject_public_key.data))
}

/// The fingerprint of the key a PEM certificate certifies (an agent's stored `agent.crt`).
pub fn pem_certificate_fingerprint(cert_pem: &str) -> Result<KeyFingerprint, PkiError> {
    let (_, pem) = x509_parser::pem::parse_x509_pem(cert_pem.as_bytes()).map_err(|e| PkiError::Certificate(e.to_string()))?;
    certificate_fingerprint(&pem.contents)
}

/// When a PEM certificate stops being valid, in seconds since the Unix epoch (what the
/// services export, so an alert fires before a certificate runs out).
pub fn pem_certificate_not_after(cert_pem: &str) -> Result<i64, PkiError> {
    let (_, pem) = x509_parser::pem::parse_x509_pem(cert_pem.as_bytes()).map_err(|e| PkiError::Certificate(e.to_string()))?;
    let (_, cert) = x509_parser::parse_x509_certificate(&pem.contents).map_err(|e| PkiError::Certificate(e.to_string()))?;
    Ok(cert.validity().not_after.timestamp())
}

/// A new private key for an agent, PEM (PKCS#8, ECDSA P-256).
pub fn new_private_key() -> Result<String, PkiError> {
    Ok(KeyPair::generate().map_err(|e| PkiError::Key(e.to_string()))?.serialize_pem())
}

/// A signing request for `key_pem`, naming `hostname` (informational: the broker ignores it).
pub fn signing_request(key_pem: &str, hostname: &str) -> Result<String, PkiError> {
    let key = KeyPair::from_pem(key_pem).map_err(|e| PkiError::Key(e.to_string()))?;
    let mut params = CertificateParams::default();
    params.distinguished_name = name(hostname);
    params.serialize_request(&key).and_then(|csr| csr.pem()).map_err(|e| PkiError::Csr(e.to_string()))
}

/// Writes a secret file readable by its owner only, durably.
pub fn write_private_file(path: &Path, contents: &str) -> Result<(), PkiError> {
    let io = |e| PkiError::Io(path.to_owned(), e);
    let mut file = std::fs::OpenOptions::new().create(true).write(true).truncate(true).mode(0o600).open(path).map_err(io)?;
    file.set_permissions(std::fs::Permissions::from_mode(0o600)).map_err(io)?;
    file.write_all(contents.as_bytes()).map_err(io)?;
    file.sync_all().map_err(io)
}

fn name(common_name: &str) -> DistinguishedName {
    let mut dn = DistinguishedName::new();
    dn.push(DnType::OrganizationName, "Suanli");
    dn.push(DnType::CommonName, common_name);
    dn
}

fn set_validity(params: &mut CertificateParams, valid: Duration) {
    let now = OffsetDateTime::now_utc();
    params.not_before = now - BACKDATE;
    params.not_after = now + valid;
}

fn random_serial() -> SerialNumber {
    let mut bytes: [u8; 16] = rand::random();
    bytes[0] &= 0x7f; // a positive DER integer
    SerialNumber::from_slice(&bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_rotating_ca_trusts_the_previous_one_and_refuses_a_bundle_that_is_no_ca() {
        let old = Ca::generate("old").expect("old");
        let new = Ca::from_pem(Ca::generate("new").expect("new").cert_pem(), &Ca::generate("x").expect("x").key_pem);
        assert!(new.is_err(), "a certificate with another CA's key is refused");
        let new = Ca::generate("new").expect("new");
        assert_eq!(new.trust_pem(), new.cert_pem(), "alone, a CA trusts itself only");
        let rotating = Ca::from_pem(new.cert_pem(), new.key_pem()).expect("load").also_trusting(old.cert_pem()).expect("trusting the old");
        let trusted: Vec<_> = x509_parser::pem::Pem::iter_from_buffer(rotating.trust_pem().as_bytes()).map(|p| p.expect("pem").contents).collect();
        assert_eq!(trusted.len(), 2);
        let keys: Vec<_> = trusted.iter().map(|der| certificate_fingerprint(der).expect("fp")).collect();
        assert_eq!(keys, [pem_certificate_fingerprint(new.cert_pem()).unwrap(), pem_certificate_fingerprint(old.cert_pem()).unwrap()]);
        // A leaf (a node's server certificate) is no CA; nor is nothing.
        let leaf = old.server_certificate(&["localhost".into()]).expect("leaf");
        assert!(Ca::from_pem(new.cert_pem(), new.key_pem()).unwrap().also_trusting(&leaf.cert_pem).is_err());
        assert!(Ca::from_pem(new.cert_pem(), new.key_pem()).unwrap().also_trusting("not pem").is_err());
    }

    #[test]
    fn a_signed_agent_certificate_carries_the_requested_key_only() {
        let ca = Ca::generate("test CA").expect("ca");
        let key = new_private_key().expect("key");
        let csr = signing_request(&key, "gpu-1").expect("csr");
        let cert = ca.sign_agent(&csr, 7).expect("signed");
        let der = pem_der(&cert);
        assert_eq!(certificate_fingerprint(&der).expect("fp"), csr_fingerprint(&csr).expect("fp"));
        assert_eq!(pem_certificate_fingerprint(&cert).expect("fp"), csr_fingerprint(&csr).expect("fp"));
        let (_, parsed) = x509_parser::parse_x509_certificate(&der).expect("parse");
        assert!(!parsed.is_ca());
        let eku = parsed.extended_key_usage().expect("eku").expect("present").value;
        assert!(eku.client_auth && !eku.server_auth);
        let ca_der = pem_der(ca.cert_pem());
        let (_, ca_parsed) = x509_parser::parse_x509_certificate(&ca_der).expect("parse ca");
        parsed.verify_signature(Some(ca_parsed.public_key())).expect("signed by the CA");
        // Another key's request yields another fingerprint.
        let other = signing_request(&new_private_key().expect("key"), "gpu-1").expect("csr");
        assert_ne!(csr_fingerprint(&other).expect("fp"), csr_fingerprint(&csr).expect("fp"));
    }

    #[test]
    fn a_tampered_or_foreign_request_is_refused() {
        let ca = Ca::generate("test CA").expect("ca");
        let csr = signing_request(&new_private_key().expect("key"), "gpu-1").expect("csr");
        let mut der = pem_der(&csr);
        let middle = der.len() / 2;
        der[middle] ^= 0x01;
        let tampered = format!("-----BEGIN CERTIFICATE REQUEST-----\n{}\n-----END CERTIFICATE REQUEST-----\n", base64(&der));
        assert!(matches!(ca.sign_agent(&tampered, 1), Err(PkiError::Csr(_))));
        assert!(matches!(ca.sign_agent("not a request", 1), Err(PkiError::Csr(_))));
        assert!(matches!(ca.sign_agent(&"A".repeat(MAX_CSR_PEM + 1), 1), Err(PkiError::Csr(_))));
    }

    #[test]
    fn a_loaded_ca_signs_like_the_generated_one() {
        let dir = tempfile::TempDir::new().expect("dir");
        let (cert, key) = (dir.path().join("ca.pem"), dir.path().join("ca.key"));
        let made = Ca::load(&cert, &key, true).expect("created");
        assert_eq!(std::fs::metadata(&key).expect("key").permissions().mode() & 0o777, 0o600);
        let loaded = Ca::load(&cert, &key, false).expect("loaded");
        assert_eq!(made.cert_pem(), loaded.cert_pem());
        let server = loaded.server_certificate(&["127.0.0.1".into(), "localhost".into()]).expect("server cert");
        let (server_der, ca_der) = (pem_der(&server.cert_pem), pem_der(made.cert_pem()));
        let (_, parsed) = x509_parser::parse_x509_certificate(&server_der).expect("parse");
        let (_, ca_parsed) = x509_parser::parse_x509_certificate(&ca_der).expect("parse ca");
        parsed.verify_signature(Some(ca_parsed.public_key())).expect("signed by the CA");
    }

    #[test]
    fn a_peer_certificate_names_its_node_and_an_agent_certificate_never_passes_for_one() {
        let ca = Ca::generate("test CA").expect("ca");
        let peer = ca.peer_certificate(3, &["127.0.0.1".into()]).expect("peer cert");
        let der = pem_der(&peer.cert_pem);
        assert_eq!(broker_peer_of(&der), Some(3));
        let (_, parsed) = x509_parser::parse_x509_certificate(&der).expect("parse");
        let eku = parsed.extended_key_usage().expect("eku").expect("present").value;
        assert!(eku.client_auth && eku.server_auth, "both ends of the peer TLS");
        let agent = ca.sign_agent(&signing_request(&new_private_key().expect("key"), "gpu").expect("csr"), 3).expect("agent");
        assert_eq!(broker_peer_of(&pem_der(&agent)), None);
        let server = ca.server_certificate(&["127.0.0.1".into()]).expect("server");
        assert_eq!(broker_peer_of(&pem_der(&server.cert_pem)), None);
    }

    fn pem_der(text: &str) -> Vec<u8> {
        pem::parse(text).expect("pem").into_contents()
    }

    fn base64(der: &[u8]) -> String {
        pem::encode(&pem::Pem::new("X", der.to_vec())).lines().filter(|l| !l.starts_with("-----")).collect()
    }
}

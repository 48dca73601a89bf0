//! The node's identity: enrolling once with the supplier's one-time token, then
//! authenticating as the node by mutual TLS with a key the agent made itself.
//!
//! The key is written to the state directory (mode 0600) *before* enrolling, as
//! `agent.key.pending`, and the enrollment's request ID derives from its fingerprint: an agent
//! that crashes after the broker enrolled it but before it heard the answer retries the very
//! same request and gets the same answer, instead of burning the token. The certificate the
//! broker signs is stored as `agent.crt`, then the key becomes `agent.key`.
//!
//! The certificate is renewed for the same key (the node's identity does not change) while the
//! agent runs: when a third of its validity is left, and when the broker names another CA as
//! the one that signs now (`AgentNode.ca_certificate_pem`: the cluster CA was rotated). The CA
//! that signed the stored certificate is kept beside it as `agent-ca.pem`.

use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};

use suanli_pki::{csr_fingerprint, new_private_key, signing_request, write_private_file};
use suanli_proto::client::{channel_with, ClientError};
use suanli_proto::convert::inventory_to_wire;
use suanli_proto::v1::supplier_service_client::SupplierServiceClient;
use suanli_proto::{decode_status, v1};
use suanli_types::{ErrorCode, NodeInventory};
use tonic::transport::{Certificate, Channel, ClientTlsConfig};

pub type Supplier = SupplierServiceClient<Channel>;

const KEY: &str = "agent.key";
const PENDING_KEY: &str = "agent.key.pending";
const CERTIFICATE: &str = "agent.crt";
/// The CA that signed `agent.crt`, as the broker said when it signed.
const SIGNED_BY: &str = "agent-ca.pem";

#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    #[error("this node is not enrolled: give the supplier's enrollment token (--enrollment-token)")]
    NoToken,
    #[error("the broker refused this agent's key (revoked?): enroll again with a new token")]
    Refused,
    #[error("enrollment refused: {0}")]
    Enrollment(String),
    #[error("state directory {0}: {1}")]
    State(PathBuf, std::io::Error),
    #[error("key or certificate: {0}")]
    Pki(#[from] suanli_pki::PkiError),
    #[error("broker: {0}")]
    Broker(String),
}

impl IdentityError {
    /// Whether trying again later (or another broker) may succeed.
    pub fn is_transient(&self) -> bool {
        match self {
            IdentityError::Broker(_) => true,
            IdentityError::Enrollment(why) => why.starts_with(ErrorCode::Unavailable.as_str()),
            _ => false,
        }
    }
}

/// How the agent reaches the brokers: TLS checked against the cluster CA (a bundle of CAs
/// while it is rotated) and, once enrolled, the node's client certificate, which every clone
/// shares: a renewal reaches every task's next connection.
#[derive(Clone)]
pub struct BrokerTls {
    ca: Certificate,
    client: Option<Arc<RwLock<tonic::transport::Identity>>>,
}

impl BrokerTls {
    pub fn new(ca_pem: &str) -> BrokerTls {
        BrokerTls { ca: Certificate::from_pem(ca_pem), client: None }
    }

    fn with_client(&self, cert_pem: &str, key_pem: &str) -> BrokerTls {
        let identity = tonic::transport::Identity::from_pem(cert_pem, key_pem);
        BrokerTls { ca: self.ca.clone(), client: Some(Arc::new(RwLock::new(identity))) }
    }

    /// A channel to a broker's agent port (`https://host:port`).
    pub async fn connect(&self, endpoint: &str) -> Result<Channel, ClientError> {
        let mut config = ClientTlsConfig::new().ca_certificate(self.ca.clone());
        if let Some(client) = &self.client {
            config = config.identity(client.read().unwrap_or_else(|p| p.into_inner()).clone());
        }
        channel_with(endpoint, Some(config)).await
    }
}

/// Renews the node's certificate (see the module's documentation) when it is due, given what
/// the broker just said about the node; `Ok(true)` when it did. Connections made after it use
/// the new certificate.
pub async fn renew_if_due(tls: &BrokerTls, state_dir: &Path, channel: Channel, node: &v1::AgentNode) -> Result<bool, IdentityError> {
    let Some(client) = &tls.client else { return Ok(false) };
    let (Some(key), Some(cert)) = (read_file(&state_dir.join(KEY))?, read_file(&state_dir.join(CERTIFICATE))?) else { return Ok(false) };
    let signed_by = read_file(&state_dir.join(SIGNED_BY))?;
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs() as i64);
    let Some(why) = renewal_due(&cert, signed_by.as_deref(), &node.ca_certificate_pem, now)? else { return Ok(false) };
    let csr_pem = signing_request(&key, "suanli-agent")?;
    let renewed = SupplierServiceClient::new(channel)
        .renew_agent_certificate(v1::RenewAgentCertificateRequest { csr_pem })
        .await
        .map_err(|status| {
            let e = decode_status(&status);
            IdentityError::Broker(format!("renewing the certificate: {}: {}", e.code.as_str(), e.message))
        })?
        .into_inner();
    if suanli_pki::pem_certificate_fingerprint(&renewed.certificate_pem)? != suanli_pki::pem_certificate_fingerprint(&cert)? {
        return Err(IdentityError::Broker("the renewed certificate is for another key".into()));
    }
    // The certificate first, then the record of its CA, each replaced whole by a rename: a
    // crash in between leaves the new certificate with the old record, which renews once more;
    // never an old certificate recorded as the new CA's (it would not be renewed in time).
    replace_file(state_dir, CERTIFICATE, &renewed.certificate_pem)?;
    replace_file(state_dir, SIGNED_BY, &renewed.ca_certificate_pem)?;
    *client.write().unwrap_or_else(|p| p.into_inner()) = tonic::transport::Identity::from_pem(&renewed.certificate_pem, &key);
    tracing::info!(why, "renewed this node's certificate");
    Ok(true)
}

/// Replaces `state_dir/name` with `contents` (mode 0600) in one rename, durably.
fn replace_file(state_dir: &Path, name: &str, contents: &str) -> Result<(), IdentityError> {
    let pending = state_dir.join(format!("{name}.pending"));
    write_private_file(&pending, contents)?;
    let state_error = |e| IdentityError::State(state_dir.to_owned(), e);
    std::fs::rename(&pending, state_dir.join(name)).map_err(state_error)?;
    std::fs::File::open(state_dir).and_then(|dir| dir.sync_all()).map_err(state_error)
}

/// Why the certificate `cert_pem` (signed by `signed_by`, where known) should be renewed at
/// `now` (Unix seconds), given the CA the broker signs with now (`current_ca`, empty from
/// brokers that do not say); `None` while it is good.
fn renewal_due(cert_pem: &str, signed_by: Option<&str>, current_ca: &str, now: i64) -> Result<Option<&'static str>, IdentityError> {
    let third = suanli_pki::AGENT_CERTIFICATE_VALIDITY.as_secs() as i64 / 3;
    if suanli_pki::pem_certificate_not_after(cert_pem)? - now < third {
        return Ok(Some("a third of its validity is left"));
    }
    if current_ca.trim().is_empty() {
        return Ok(None);
    }
    let current = suanli_pki::pem_certificate_fingerprint(current_ca)?;
    // An unreadable record (a torn write) counts as none: renewing is always safe.
    match signed_by.and_then(|pem| suanli_pki::pem_certificate_fingerprint(pem).ok()) {
        Some(ca) if ca == current => Ok(None),
        Some(_) => Ok(Some("the cluster CA was rotated")),
        None => Ok(Some("the CA that signed it is not recorded")),
    }
}

/// The enrolled node: who it is and how to reach the brokers as it.
#[derive(Clone)]
pub struct Identity {
    pub tls: BrokerTls,
    pub node: v1::AgentNode,
}

impl Identity {
    pub fn node_id(&self) -> u64 {
        self.node.node.as_ref().map_or(0, |n| n.node_id)
    }
}

/// Returns the node's identity, enrolling with `token` if the state directory holds no
/// certificate yet (or holds one the broker no longer accepts and a token is given).
pub async fn establish(endpoint: &str, trust: &BrokerTls, state_dir: &Path, token: Option<&str>, inventory: &NodeInventory) -> Result<Identity, IdentityError> {
    let state_error = |e| IdentityError::State(state_dir.to_owned(), e);
    std::fs::create_dir_all(state_dir).map_err(state_error)?;
    if let (Some(key), Some(cert)) = (read_file(&state_dir.join(KEY))?, read_file(&state_dir.join(CERTIFICATE))?) {
        let tls = trust.with_client(&cert, &key);
        match whoami(&tls, endpoint).await {
            Ok(node) => return Ok(Identity { tls, node }),
            Err(IdentityError::Refused) if token.is_some() => {
                tracing::warn!("the broker refused this node's key; enrolling again with the token given");
                std::fs::remove_file(state_dir.join(KEY)).map_err(state_error)?;
                std::fs::remove_file(state_dir.join(CERTIFICATE)).map_err(state_error)?;
            }
            Err(e) => return Err(e),
        }
    }
    let token = token.ok_or(IdentityError::NoToken)?;
    let pending = state_dir.join(PENDING_KEY);
    let key = match read_file(&pending)? {
        Some(key) => key,
        None => {
            let fresh = new_private_key()?;
            write_private_file(&pending, &fresh)?;
            fresh
        }
    };
    let csr_pem = signing_request(&key, &inventory.hostname)?;
    let request = v1::EnrollAgentRequest {
        request_id: format!("enroll-{}", &csr_fingerprint(&csr_pem)?.to_hex()[..24]),
        enrollment_token: token.to_owned(),
        csr_pem,
        inventory: Some(inventory_to_wire(inventory)),
    };
    let channel = trust.connect(endpoint).await.map_err(|e| IdentityError::Broker(e.to_string()))?;
    let enrolled = SupplierServiceClient::new(channel)
        .enroll_agent(request)
        .await
        .map_err(|status| {
            let e = decode_status(&status);
            IdentityError::Enrollment(format!("{}: {}", e.code.as_str(), e.message))
        })?
        .into_inner();
    write_private_file(&state_dir.join(SIGNED_BY), &enrolled.ca_certificate_pem)?;
    write_private_file(&state_dir.join(CERTIFICATE), &enrolled.certificate_pem)?;
    std::fs::rename(&pending, state_dir.join(KEY)).map_err(state_error)?;
    let tls = trust.with_client(&enrolled.certificate_pem, &key);
    let node = whoami(&tls, endpoint).await?;
    tracing::info!(node = node.node.as_ref().map_or(0, |n| n.node_id), "enrolled");
    Ok(Identity { tls, node })
}

/// The broker's view of this node, which also proves the key is still accepted.
pub async fn whoami(tls: &BrokerTls, endpoint: &str) -> Result<v1::AgentNode, IdentityError> {
    let channel = tls.connect(endpoint).await.map_err(|e| IdentityError::Broker(e.to_string()))?;
    match SupplierServiceClient::new(channel).get_agent_node(v1::GetAgentNodeRequest {}).await {
        Ok(reply) => Ok(reply.into_inner()),
        Err(status) => {
            let e = decode_status(&status);
            if e.code == ErrorCode::Unauthenticated {
                Err(IdentityError::Refused)
            } else {
                Err(IdentityError::Broker(format!("{}: {}", e.code.as_str(), e.message)))
            }
        }
    }
}

fn read_file(path: &Path) -> Result<Option<String>, IdentityError> {
    match std::fs::read_to_string(path) {
        Ok(text) => Ok(Some(text).filter(|s| !s.trim().is_empty())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(IdentityError::State(path.to_owned(), e)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn signed(ca: &suanli_pki::Ca) -> String {
        let key = suanli_pki::new_private_key().expect("key");
        ca.sign_agent(&signing_request(&key, "gpu-1").expect("csr"), 3).expect("sign")
    }

    #[test]
    fn a_certificate_is_renewed_when_the_ca_changed_or_a_third_of_its_life_is_left() {
        let old = suanli_pki::Ca::generate("old").expect("old");
        let new = suanli_pki::Ca::generate("new").expect("new");
        let cert = signed(&old);
        let expires = suanli_pki::pem_certificate_not_after(&cert).expect("not after");
        let now = expires - suanli_pki::AGENT_CERTIFICATE_VALIDITY.as_secs() as i64 + 60;
        let due = |signed_by: Option<&str>, current: &str, now| renewal_due(&cert, signed_by, current, now).expect("readable");
        assert_eq!(due(Some(old.cert_pem()), old.cert_pem(), now), None, "fresh, and signed by the CA that signs now");
        assert_eq!(due(Some(old.cert_pem()), "", now), None, "a broker that does not say which CA signs");
        assert_eq!(due(Some(old.cert_pem()), new.cert_pem(), now), Some("the cluster CA was rotated"));
        assert_eq!(due(None, old.cert_pem(), now), Some("the CA that signed it is not recorded"));
        assert_eq!(due(Some("-----BEGIN CERT"), old.cert_pem(), now), Some("the CA that signed it is not recorded"), "a torn record renews");
        let late = expires - suanli_pki::AGENT_CERTIFICATE_VALIDITY.as_secs() as i64 / 3 + 1;
        assert_eq!(due(Some(old.cert_pem()), old.cert_pem(), late), Some("a third of its validity is left"));
        assert!(renewal_due("garbage", None, "", now).is_err());
    }
}

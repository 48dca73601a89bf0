//! The node's identity: enrolling once with the supplier's one-time token, then
//! authenticating as the node by mutual TLS with a key the agent made itself.
//!
//! The key is written to the state directory (mode 0600) *before* enrolling, as
//! `agent.key.pending`, and the enrollment's request ID derives from its fingerprint: an agent
//! that crashes after the broker enrolled it but before it heard the answer retries the very
//! same request and gets the same answer, instead of burning the token. The certificate the
//! broker signs is stored as `agent.crt`, then the key becomes `agent.key`.

use std::path::{Path, PathBuf};

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

/// How the agent reaches the brokers: TLS checked against the agent CA and, once enrolled, the
/// node's client certificate.
#[derive(Clone)]
pub struct BrokerTls {
    ca: Certificate,
    client: Option<tonic::transport::Identity>,
}

impl BrokerTls {
    pub fn new(ca_pem: &str) -> BrokerTls {
        BrokerTls { ca: Certificate::from_pem(ca_pem), client: None }
    }

    fn with_client(&self, cert_pem: &str, key_pem: &str) -> BrokerTls {
        BrokerTls { ca: self.ca.clone(), client: Some(tonic::transport::Identity::from_pem(cert_pem, key_pem)) }
    }

    /// A channel to a broker's agent port (`https://host:port`).
    pub async fn connect(&self, endpoint: &str) -> Result<Channel, ClientError> {
        let mut config = ClientTlsConfig::new().ca_certificate(self.ca.clone());
        if let Some(client) = &self.client {
            config = config.identity(client.clone());
        }
        channel_with(endpoint, Some(config)).await
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

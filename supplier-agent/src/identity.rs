//! The node's identity: enrolling once with the supplier's one-time token, then
//! authenticating as the node with a credential the agent drew itself.
//!
//! The credential is written to the state directory (mode 0600) *before* enrolling, as
//! `credential.pending`, and the enrollment's request ID derives from it: an agent that crashes
//! after the broker enrolled it but before it heard the answer retries the very same request
//! and gets the same answer, instead of burning the token.

use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use rand::Rng;
use suanli_proto::client::{bearer, Bearer};
use suanli_proto::convert::inventory_to_wire;
use suanli_proto::v1::supplier_service_client::SupplierServiceClient;
use suanli_proto::{decode_status, v1};
use suanli_types::{ErrorCode, NodeInventory};
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;

pub type Supplier = SupplierServiceClient<InterceptedService<Channel, Bearer>>;

const CREDENTIAL: &str = "credential";
const PENDING: &str = "credential.pending";
const CREDENTIAL_LEN: usize = 48;

#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    #[error("this node is not enrolled: give the supplier's enrollment token (--enrollment-token)")]
    NoToken,
    #[error("the broker refused this agent's credential (revoked?): enroll again with a new token")]
    Refused,
    #[error("enrollment refused: {0}")]
    Enrollment(String),
    #[error("state directory {0}: {1}")]
    State(PathBuf, std::io::Error),
    #[error("broker: {0}")]
    Broker(String),
}

/// The enrolled node: who it is and the credential to call as.
#[derive(Clone, Debug)]
pub struct Identity {
    pub credential: String,
    pub node: v1::AgentNode,
}

impl Identity {
    pub fn node_id(&self) -> u64 {
        self.node.node.as_ref().map_or(0, |n| n.node_id)
    }
}

/// Returns the node's identity, enrolling with `token` if the state directory holds no
/// credential yet (or holds one the broker no longer accepts and a token is given).
pub async fn establish(
    channel: Channel,
    state_dir: &Path,
    token: Option<&str>,
    inventory: &NodeInventory,
) -> Result<Identity, IdentityError> {
    std::fs::create_dir_all(state_dir).map_err(|e| IdentityError::State(state_dir.to_owned(), e))?;
    if let Some(credential) = read_secret(&state_dir.join(CREDENTIAL))? {
        match whoami(channel.clone(), &credential).await {
            Ok(node) => return Ok(Identity { credential, node }),
            Err(IdentityError::Refused) if token.is_some() => {
                tracing::warn!("the broker refused the stored credential; enrolling again with the token given");
                std::fs::remove_file(state_dir.join(CREDENTIAL)).map_err(|e| IdentityError::State(state_dir.to_owned(), e))?;
            }
            Err(e) => return Err(e),
        }
    }
    let token = token.ok_or(IdentityError::NoToken)?;
    let pending = state_dir.join(PENDING);
    let credential = match read_secret(&pending)? {
        Some(c) => c,
        None => {
            let fresh = random_credential();
            write_secret(&pending, &fresh)?;
            fresh
        }
    };
    let request = v1::EnrollAgentRequest {
        request_id: format!("enroll-{}", &credential[..16]),
        enrollment_token: token.to_owned(),
        credential: credential.clone(),
        inventory: Some(inventory_to_wire(inventory)),
    };
    let mut client = SupplierServiceClient::new(channel.clone());
    client.enroll_agent(request).await.map_err(|status| {
        let e = decode_status(&status);
        IdentityError::Enrollment(format!("{}: {}", e.code.as_str(), e.message))
    })?;
    std::fs::rename(&pending, state_dir.join(CREDENTIAL)).map_err(|e| IdentityError::State(state_dir.to_owned(), e))?;
    let node = whoami(channel, &credential).await?;
    tracing::info!(node = node.node.as_ref().map_or(0, |n| n.node_id), "enrolled");
    Ok(Identity { credential, node })
}

/// The client for Icpcss calls as this node.
pub fn supplier_client(channel: Channel, credential: &str) -> Result<Supplier, IdentityError> {
    let auth = bearer(Some(credential)).map_err(|e| IdentityError::Broker(e.to_string()))?;
    Ok(SupplierServiceClient::with_interceptor(channel, auth))
}

pub async fn whoami(channel: Channel, credential: &str) -> Result<v1::AgentNode, IdentityError> {
    let mut client = supplier_client(channel, credential)?;
    match client.get_agent_node(v1::GetAgentNodeRequest {}).await {
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

fn random_credential() -> String {
    const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789";
    let mut rng = rand::rng();
    (0..CREDENTIAL_LEN).map(|_| ALPHABET[rng.random_range(0..ALPHABET.len())] as char).collect()
}

fn read_secret(path: &Path) -> Result<Option<String>, IdentityError> {
    match std::fs::read_to_string(path) {
        Ok(text) => Ok(Some(text.trim().to_owned()).filter(|s| !s.is_empty())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(IdentityError::State(path.to_owned(), e)),
    }
}

fn write_secret(path: &Path, secret: &str) -> Result<(), IdentityError> {
    let io = |e| IdentityError::State(path.to_owned(), e);
    let mut file = std::fs::OpenOptions::new().create(true).write(true).truncate(true).mode(0o600).open(path).map_err(io)?;
    file.set_permissions(std::fs::Permissions::from_mode(0o600)).map_err(io)?;
    file.write_all(secret.as_bytes()).map_err(io)?;
    file.sync_all().map_err(io)
}

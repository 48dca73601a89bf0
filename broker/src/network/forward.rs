//! Any node accepts any call: a tower layer in front of the gRPC services sends calls that need
//! the leader to the leader, over a cached channel, and serves the rest locally.
//!
//! - Writes and cluster administration go to the leader (only it can propose).
//! - Reads go to the leader too, where `ensure_linearizable` makes them linearizable — unless
//!   the caller asks for a stale read (`x-suanli-read: stale`), served from local state.
//! - `Watch` and Raft's own RPCs are always local.
//!
//! A forwarded call carries `x-suanli-forwarded`, and a node never forwards such a call again:
//! if leadership moved meanwhile it answers `UNAVAILABLE` and the client retries with the same
//! request ID.
//!
//! This layer also establishes the **transport identity** of a call, [`AgentKey`]: the key in
//! the client certificate of a mutual-TLS connection to the agent port. When it forwards such a
//! call it passes the key on in `x-suanli-agent-key`, with a peer proof (derived from the
//! platform token every node holds) as the value of `x-suanli-forwarded`; the receiving node
//! believes the key only with a valid proof, and drops the header from anyone else.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use futures::future::BoxFuture;
use tonic::body::Body;
use tonic::transport::{Channel, Endpoint};
use tower_layer::Layer;
use tower_service::Service;

use suanli_pki::{certificate_fingerprint, KeyFingerprint};
use suanli_types::SecretHash;
use tonic::transport::server::{TcpConnectInfo, TlsConnectInfo};

use super::PeerAddresses;
use crate::storage::Raft;

pub const FORWARDED_HEADER: &str = "x-suanli-forwarded";
pub const READ_HEADER: &str = "x-suanli-read";
pub const AGENT_KEY_HEADER: &str = "x-suanli-agent-key";
/// Hash domain of the proof one broker node gives another that it forwarded a call.
const PEER_PROOF_DOMAIN: &str = "peer-forwarding";

/// The agent key a call was made with, as the transport established it (see the module
/// documentation). Only this layer puts it in a request's extensions; clients cannot.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AgentKey(pub KeyFingerprint);

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Methods that only read; with `x-suanli-read: stale` any node serves them.
const READ_METHODS: &[&str] = &[
    "/suanli.v1.Broker/ListCatalogue",
    "/suanli.v1.Broker/GetCluster",
    "/suanli.v1.Broker/ListCards",
    "/suanli.v1.Broker/GetLease",
    "/suanli.v1.Broker/GetLeaseAccess",
    "/suanli.v1.Broker/ListLeases",
    "/suanli.v1.TaskService/GetTask",
    "/suanli.v1.TaskService/ListTasks",
    "/suanli.v1.SupplierService/ListAssignedLeases",
];

/// Methods every node serves itself.
const LOCAL_METHODS: &[&str] = &["/suanli.v1.Broker/Watch", "/suanli.v1.ClusterAdmin/Status"];

pub struct LeaderRouter {
    raft: Arc<Raft>,
    peers: PeerAddresses,
    channels: Mutex<HashMap<String, Channel>>,
    peer_proof: SecretHash,
}

impl LeaderRouter {
    pub fn new(raft: Arc<Raft>, peers: PeerAddresses, platform_token: &str) -> Self {
        let peer_proof = SecretHash::of(PEER_PROOF_DOMAIN, platform_token);
        LeaderRouter { raft, peers, channels: Mutex::new(HashMap::new()), peer_proof }
    }

    fn proven_peer(&self, value: &http::HeaderValue) -> bool {
        value.to_str().ok().and_then(SecretHash::from_hex).is_some_and(|h| h.matches(&self.peer_proof))
    }

    /// Sets the request's [`AgentKey`] from its TLS client certificate, or from a proven peer's
    /// header; removes any header nobody proved.
    fn establish_agent_key<B>(&self, request: &mut http::Request<B>) {
        let claimed = request.headers_mut().remove(AGENT_KEY_HEADER);
        let from_tls = request
            .extensions()
            .get::<TlsConnectInfo<TcpConnectInfo>>()
            .and_then(|info| info.peer_certs())
            .and_then(|certs| certs.first().and_then(|leaf| certificate_fingerprint(leaf).ok()));
        let from_peer = || {
            let proof = request.headers().get(FORWARDED_HEADER)?;
            let mut key = [0u8; 32];
            (self.proven_peer(proof) && hex::decode_to_slice(claimed?.as_bytes(), &mut key).is_ok())
                .then_some(KeyFingerprint(key))
        };
        if let Some(key) = from_tls.or_else(from_peer) {
            request.extensions_mut().insert(AgentKey(key));
        }
    }

    /// Where `request` should be served: `None` here, `Some(channel)` on the leader.
    fn route<B>(&self, request: &http::Request<B>) -> Option<Channel> {
        let path = request.uri().path();
        if path.starts_with("/suanli.v1.RaftInternal/")
            || LOCAL_METHODS.contains(&path)
            || request.headers().contains_key(FORWARDED_HEADER)
        {
            return None;
        }
        let stale = request.headers().get(READ_HEADER).is_some_and(|v| v.as_bytes() == b"stale");
        if stale && READ_METHODS.contains(&path) {
            return None;
        }
        let metrics = self.raft.metrics().borrow().clone();
        let leader = metrics.current_leader?;
        if leader == metrics.id {
            return None;
        }
        let address = self.peers.of(leader, metrics.membership_config.membership().get_node(&leader)?);
        let mut channels = self.channels.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(channel) = channels.get(&address) {
            return Some(channel.clone());
        }
        let endpoint = Endpoint::from_shared(format!("http://{address}")).ok()?;
        let channel = endpoint.connect_timeout(Duration::from_secs(1)).tcp_nodelay(true).connect_lazy();
        channels.insert(address, channel.clone());
        Some(channel)
    }
}

#[derive(Clone)]
pub struct ForwardLayer {
    router: Arc<LeaderRouter>,
}

impl ForwardLayer {
    pub fn new(router: Arc<LeaderRouter>) -> Self {
        ForwardLayer { router }
    }
}

impl<S> Layer<S> for ForwardLayer {
    type Service = Forward<S>;

    fn layer(&self, inner: S) -> Forward<S> {
        Forward { inner, router: self.router.clone() }
    }
}

#[derive(Clone)]
pub struct Forward<S> {
    inner: S,
    router: Arc<LeaderRouter>,
}

impl<S> Service<http::Request<Body>> for Forward<S>
where
    S: Service<http::Request<Body>, Response = http::Response<Body>> + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Into<BoxError>,
{
    type Response = http::Response<Body>;
    type Error = BoxError;
    type Future = BoxFuture<'static, Result<http::Response<Body>, BoxError>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, mut request: http::Request<Body>) -> Self::Future {
        self.router.establish_agent_key(&mut request);
        match self.router.route(&request) {
            None => {
                let local = self.inner.call(request);
                Box::pin(async move { local.await.map_err(Into::into) })
            }
            Some(mut leader) => {
                // Hex digits are always a valid header value.
                if let Ok(proof) = http::HeaderValue::from_str(&self.router.peer_proof.to_hex()) {
                    request.headers_mut().insert(FORWARDED_HEADER, proof);
                }
                let key = request.extensions().get::<AgentKey>().map(|AgentKey(k)| k.to_hex());
                if let Some(Ok(key)) = key.map(|k| http::HeaderValue::from_str(&k)) {
                    request.headers_mut().insert(AGENT_KEY_HEADER, key);
                }
                Box::pin(async move {
                    let sent = async {
                        futures::future::poll_fn(|cx| leader.poll_ready(cx)).await?;
                        leader.call(request).await
                    };
                    match sent.await {
                        Ok(response) => Ok(response),
                        // The leader is unreachable: say so the way every other unavailability
                        // is said, so clients retry with the same request ID.
                        Err(e) => Ok(suanli_proto::error::status(
                            suanli_types::ErrorCode::Unavailable,
                            format!("cannot reach the leader: {e}"),
                            &[],
                        )
                        .into_http()),
                    }
                })
            }
        }
    }
}

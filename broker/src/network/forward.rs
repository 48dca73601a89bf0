//! Any node accepts any call: a tower layer in front of the gRPC services sends calls that need
//! the leader to the leader, over a cached channel, and serves the rest locally.
//!
//! - Writes and cluster administration go to the leader (only it can propose).
//! - Reads go to the leader too, where `ensure_linearizable` makes them linearizable — unless
//!   the caller asks for a stale read (`x-suanli-read: stale`), served from local state.
//! - `Watch` and Raft's own RPCs are always local.
//!
//! Calls are forwarded to the leader's **peer port** only (mutual TLS with peer certificates,
//! `network::PeerTls`), so a caller's bearer token never crosses the network in the clear,
//! and a node never forwards a call that reached it on its peer port: if leadership moved
//! meanwhile it answers `UNAVAILABLE` and the client retries with the same request ID.
//!
//! This layer also establishes the **transport identity** of a call ([`Port`]): on the agent
//! port, [`AgentKey`], the key in the client certificate; on the peer port, that the caller is
//! a broker node at all (anything else is refused before any service sees the call), and the
//! agent key a forwarding node passes on in `x-suanli-agent-key`. That header, and
//! `x-suanli-forwarded`, are removed from every call on the other ports: no client can claim
//! them.

use std::sync::Arc;
use std::task::{Context, Poll};

use futures::future::{BoxFuture, FutureExt};
use tonic::body::Body;
use tonic::transport::Channel;
use tower_layer::Layer;
use tower_service::Service;
use tracing::Instrument;

use suanli_pki::{certificate_fingerprint, KeyFingerprint};
use tonic::transport::server::{TcpConnectInfo, TlsConnectInfo};

use super::{PeerAddresses, PeerTls};
use crate::storage::Raft;

pub const FORWARDED_HEADER: &str = "x-suanli-forwarded";
pub const READ_HEADER: &str = "x-suanli-read";
pub const AGENT_KEY_HEADER: &str = "x-suanli-agent-key";

/// Which of a node's listeners a call arrived on: what its transport proves.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Port {
    /// Clients (bearer tokens); plaintext on loopback.
    Client,
    /// Agents (their client certificate) and clients that want TLS.
    Agent,
    /// Other broker nodes only (their peer certificate): Raft and forwarded calls.
    Peer,
}

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
/// (`ExportState` answers only on the leader, which can vouch that its state is current.)
const LOCAL_METHODS: &[&str] = &["/suanli.v1.Broker/Watch", "/suanli.v1.ClusterAdmin/Status", "/suanli.v1.ClusterAdmin/ExportState"];

pub struct LeaderRouter {
    raft: Arc<Raft>,
    peers: PeerAddresses,
    channels: super::PeerChannels,
    /// `None`: this node has no peer port and forwards nothing.
    tls: Option<PeerTls>,
    /// Service tokens and their powers, checked before any call goes anywhere.
    services: crate::service::powers::Services,
}

/// The leaf certificate a call's TLS client showed, if any (already verified against the CA).
fn client_certificate<B>(request: &http::Request<B>) -> Option<Vec<u8>> {
    let info = request.extensions().get::<TlsConnectInfo<TcpConnectInfo>>()?;
    info.peer_certs()?.first().map(|leaf| leaf.as_ref().to_vec())
}

impl LeaderRouter {
    pub fn new(raft: Arc<Raft>, peers: PeerAddresses, tls: Option<PeerTls>, services: crate::service::powers::Services) -> Self {
        LeaderRouter { raft, peers, channels: super::PeerChannels::default(), tls, services }
    }

    /// Establishes what the transport proves about `request` (see [`Port`]); `Err`: a caller
    /// on the peer port that is no broker node.
    fn establish_identity<B>(&self, port: Port, request: &mut http::Request<B>) -> Result<(), &'static str> {
        let claimed = request.headers_mut().remove(AGENT_KEY_HEADER);
        let key = match port {
            Port::Client => {
                request.headers_mut().remove(FORWARDED_HEADER);
                None
            }
            Port::Agent => {
                request.headers_mut().remove(FORWARDED_HEADER);
                client_certificate(request).and_then(|leaf| certificate_fingerprint(&leaf).ok())
            }
            Port::Peer => {
                if client_certificate(request).and_then(|leaf| suanli_pki::broker_peer_of(&leaf)).is_none() {
                    return Err("the peer port serves broker nodes only (a peer certificate of the cluster CA)");
                }
                let mut key = [0u8; 32];
                claimed.filter(|k| hex::decode_to_slice(k.as_bytes(), &mut key).is_ok()).map(|_| KeyFingerprint(key))
            }
        };
        if let Some(key) = key {
            request.extensions_mut().insert(AgentKey(key));
        }
        Ok(())
    }

    /// Where `request` should be served: `None` here, `Some(channel)` on the leader.
    fn route<B>(&self, port: Port, request: &http::Request<B>) -> Option<Channel> {
        let path = request.uri().path();
        // Raft's own calls are served on the peer port only: anywhere else they are answered
        // here (unimplemented), never passed on with this node's peer certificate.
        if port == Port::Peer || path.starts_with("/suanli.v1.RaftInternal/") || LOCAL_METHODS.contains(&path) {
            return None;
        }
        let tls = self.tls.as_ref()?;
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
        self.channels.get(tls, address)
    }
}

#[derive(Clone)]
pub struct ForwardLayer {
    router: Arc<LeaderRouter>,
    port: Port,
}

impl ForwardLayer {
    pub fn new(router: Arc<LeaderRouter>, port: Port) -> Self {
        ForwardLayer { router, port }
    }
}

impl<S> Layer<S> for ForwardLayer {
    type Service = Forward<S>;

    fn layer(&self, inner: S) -> Forward<S> {
        Forward { inner, router: self.router.clone(), port: self.port }
    }
}

#[derive(Clone)]
pub struct Forward<S> {
    inner: S,
    router: Arc<LeaderRouter>,
    port: Port,
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

    fn call(&mut self, request: http::Request<Body>) -> Self::Future {
        // Every log line of this call, here and on the leader it is forwarded to, carries the
        // caller's request ID (`x-request-id`, which forwarding keeps).
        // The handler also finds it as the task's (`suanli_observability::current`).
        let request_id =
            request.headers().get(suanli_observability::REQUEST_ID_HEADER).and_then(|v| v.to_str().ok()).and_then(suanli_observability::RequestId::parse);
        let span = tracing::info_span!("call", method = request.uri().path(), request_id = request_id.as_ref().map(|id| id.as_str()));
        let call = self.route(request).instrument(span);
        match request_id {
            Some(id) => suanli_observability::scope(id, call).boxed(),
            None => call.boxed(),
        }
    }
}

impl<S> Forward<S>
where
    S: Service<http::Request<Body>, Response = http::Response<Body>> + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Into<BoxError>,
{
    fn route(&mut self, mut request: http::Request<Body>) -> BoxFuture<'static, Result<http::Response<Body>, BoxError>> {
        if let Err(why) = self.router.establish_identity(self.port, &mut request) {
            let refused = suanli_proto::error::status(suanli_types::ErrorCode::Unauthenticated, why, &[]);
            return Box::pin(async move { Ok(refused.into_http()) });
        }
        if let Some(why) = self.router.services.refusal(&request) {
            let refused = suanli_proto::error::status(suanli_types::ErrorCode::PermissionDenied, why, &[]);
            return Box::pin(async move { Ok(refused.into_http()) });
        }
        match self.router.route(self.port, &request) {
            None => {
                let local = self.inner.call(request);
                Box::pin(async move { local.await.map_err(Into::into) })
            }
            Some(mut leader) => {
                request.headers_mut().insert(FORWARDED_HEADER, http::HeaderValue::from_static("1"));
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
                        Err(e) => {
                            Ok(suanli_proto::error::status(suanli_types::ErrorCode::Unavailable, format!("cannot reach the leader: {e}"), &[]).into_http())
                        }
                    }
                })
            }
        }
    }
}

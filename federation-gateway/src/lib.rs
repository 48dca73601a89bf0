//! A member's federation gateway (`suanli-federation serve`): it reads its own broker's
//! catalogue (a service token with the `read` power), announces it to the federation
//! (`suanli-federation`'s node), and serves the merged catalogue (every member's offers, with
//! origin and age) to its portal and to the `suanli-federation catalogue` command.
//!
//! It also carries leases across members: as the owner of cards (`owner.rs`) it answers other
//! members' calls at its broker through their partner accounts; as the requester
//! (`requester.rs`) it holds its researchers' money, asks the owner, and settles when the lease
//! ends, both members signing each settlement (`settlements.rs`).
//!
//! Listeners: the federation port (libp2p; members only, see `suanli_federation::node`) and
//! the API port (HTTP, bearer token, constant-time compared; `/healthz` open).

pub mod api;
pub mod config;
pub mod offer;
pub mod owner;
pub mod requester;
pub mod settlements;

use std::net::SocketAddr;
use std::sync::Arc;

use suanli_federation::{FederationNode, Multiaddr, NodeConfig};

pub use config::GatewayConfig;

/// A running gateway.
pub struct Gateway {
    pub node: FederationNode,
    pub api: SocketAddr,
    pub p2p: Vec<Multiaddr>,
}

#[derive(Debug, thiserror::Error)]
pub enum GatewayError {
    #[error(transparent)]
    Config(#[from] config::ConfigError),
    #[error("federation: {0}")]
    Node(#[from] suanli_federation::NodeError),
    #[error("the API port: {0}")]
    Listen(#[source] std::io::Error),
    #[error("the settlement journal: {0}")]
    Journal(#[from] settlements::JournalError),
}

/// Starts the node, the announcing loop and the API on the current runtime.
pub async fn start(config: GatewayConfig) -> Result<Gateway, GatewayError> {
    let journal = settlements::Journal::open(&config.state_dir)?;
    let (calls_tx, calls_rx) = tokio::sync::mpsc::channel(64);
    let node = FederationNode::start(NodeConfig {
        keypair: config.keypair.clone(),
        membership: config.membership.clone(),
        listen: config.listen.clone(),
        dial: config.dial.clone(),
        transport: Default::default(),
        persist_membership: Some(config.membership_file.clone()),
        anti_entropy_every: config.anti_entropy_every,
        freshness: config.freshness,
        calls: Some(calls_tx),
    })
    .await?;
    let owner = owner::Owner {
        node: node.clone(),
        key: config.keypair.clone(),
        broker: config.broker.clone(),
        partners: Arc::new(config.partners.clone()),
        journal: journal.clone(),
    };
    tokio::spawn(owner.serve(calls_rx));
    let requester = requester::Requester {
        node: node.clone(),
        key: config.keypair.clone(),
        broker: config.broker.clone(),
        journal: journal.clone(),
        unreachable: Default::default(),
        delivered: Default::default(),
    };
    tokio::spawn(reconcile_loop(requester.clone(), config.anti_entropy_every));
    node.listen_addr().await?;
    let p2p = node.listen_addrs();
    tokio::spawn(offer::announce_loop(node.clone(), config.broker.clone(), config.announce_every));
    let listener = tokio::net::TcpListener::bind(config.api_listen).await.map_err(GatewayError::Listen)?;
    let api = listener.local_addr().map_err(GatewayError::Listen)?;
    let router = api::router(api::ApiState { node: node.clone(), token: Arc::new(config.api_token.clone()), requester, journal });
    tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, router).await {
            tracing::error!(error = %e, "the API stopped");
        }
    });
    Ok(Gateway { node, api, p2p })
}

/// Reconciles this member's remote leases with their owners every `every`.
async fn reconcile_loop(requester: requester::Requester, every: std::time::Duration) {
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        requester.reconcile().await;
    }
}

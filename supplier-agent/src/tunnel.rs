//! The agent's tunnel to the portal (`suanli-tunnel`, issue 23): the node listens to nothing
//! from outside for its services; the agent dials the portal instead, with a ticket the broker
//! issues for this node (asked for with the node's own certificate), and serves the portal's
//! requests on that connection. It dials again before the ticket runs out (the portal keeps a
//! tunnel no longer than its ticket), and after a failure with a growing pause. A new tunnel
//! open, the one before is retired: it takes no new request and closes once what it carries
//! (a terminal, a notebook's kernel) has ended.
//!
//! The requests it serves go to the node's services (`services.rs`), or are the portal's
//! control of them; an agent without lease access (no `--ssh-listen`) runs none, and every
//! service the portal names is unknown here ([`AgentError::UnknownService`]).

use std::sync::Arc;
use std::time::Duration;

use suanli_proto::v1::{self, supplier_service_client::SupplierServiceClient};
use suanli_tunnel::agent::{Address, Resolve};
use suanli_tunnel::tls::PortalTrust;
use suanli_tunnel::wire::AgentError;
use tokio::sync::oneshot;

use crate::config::PortalEndpoint;
use crate::identity::BrokerTls;
use crate::services::Services;

/// Pauses between failed dials: from the first to the longest.
const FIRST_PAUSE: Duration = Duration::from_millis(500);
const LONGEST_PAUSE: Duration = Duration::from_secs(30);
/// How long before its ticket runs out a tunnel is dialled again.
const REDIAL_BEFORE_EXPIRY: Duration = Duration::from_secs(60);
/// A tunnel that would be dialled again sooner than this is not dialled (a clock far ahead).
const SHORTEST_TUNNEL: Duration = Duration::from_secs(10);
/// How long after the next tunnel is open the one before is retired.
const RETIRE_AFTER: Duration = Duration::from_secs(5);
/// A dial (TCP, TLS, the upgrade) that has not opened the tunnel by then is given up: across a
/// network a peer that stalls would otherwise hold the agent's only dial for ever.
const DIAL_DEADLINE: Duration = Duration::from_secs(30);

pub struct PortalTunnel {
    pub brokers: Vec<String>,
    pub tls: BrokerTls,
    /// The portal: dialled in TLS, or in plain TCP on this host only ([`PortalEndpoint`]).
    pub portal: PortalEndpoint,
    /// What an `https://` portal's certificate must come from.
    pub portal_trust: PortalTrust,
    /// The node's services; `None` where the agent runs none.
    pub services: Option<Arc<Services>>,
}

/// What the tunnel reaches: the node's services, or nothing.
#[derive(Clone)]
struct NodeServices(Option<Arc<Services>>);

impl Resolve for NodeServices {
    async fn resolve(&self, service: &str) -> Result<Address, AgentError> {
        match &self.0 {
            Some(services) => services.resolve(service).await,
            None => Err(AgentError::UnknownService),
        }
    }

    async fn control(&self, request: http::Request<suanli_tunnel::Body>) -> http::Response<suanli_tunnel::Body> {
        match &self.0 {
            Some(services) => services.control(request).await,
            None => suanli_tunnel::agent::refuse(AgentError::UnknownService, "this agent runs no services (no lease access)"),
        }
    }
}

impl PortalTunnel {
    pub async fn run(self) {
        let mut pause = FIRST_PAUSE;
        // Retires the tunnel serving now, once the next one is open.
        let mut serving = None;
        loop {
            match self.once(&mut serving).await {
                Ok(()) => pause = FIRST_PAUSE,
                Err(e) => {
                    tracing::warn!(portal = %self.portal, error = %e, pause_ms = pause.as_millis() as u64, "tunnel to the portal: will dial again");
                    tokio::time::sleep(pause).await;
                    pause = (pause * 2).min(LONGEST_PAUSE);
                }
            }
        }
    }

    /// One tunnel: a ticket, a dial, then the previous tunnel retired (it takes nothing new and
    /// ends when what it carries has: no WebSocket is cut by the rotation), and this one served
    /// until it closes or its ticket is nearly spent (it goes on serving until the next one
    /// retires it).
    async fn once(&self, serving: &mut Option<oneshot::Sender<()>>) -> Result<(), String> {
        let ticket = self.ticket().await?;
        let connection = tokio::time::timeout(DIAL_DEADLINE, self.dial(&ticket.ticket))
            .await
            .unwrap_or_else(|_| Err(format!("no tunnel within {} s", DIAL_DEADLINE.as_secs())))?;
        tracing::info!(portal = %self.portal, "tunnel to the portal open");
        let good_for = Duration::from_millis(u64::try_from(ticket.expires_ms - crate::runtime::now_ms()).unwrap_or(0)).saturating_sub(REDIAL_BEFORE_EXPIRY);
        if good_for < SHORTEST_TUNNEL {
            // This clock runs ahead of the broker's: dialling again at once would loop.
            return Err(format!("the ticket is good for only {} s by this node's clock: is it ahead of the broker's?", good_for.as_secs()));
        }
        if let Some(previous) = serving.take() {
            // A moment after, once the portal keeps the new tunnel: a GOAWAY before would leave
            // the node without one there for that moment.
            tokio::spawn(async move {
                tokio::time::sleep(RETIRE_AFTER).await;
                let _ = previous.send(());
            });
        }
        let (retire, retired) = oneshot::channel::<()>();
        let services = NodeServices(self.services.clone());
        let mut served = tokio::spawn(suanli_tunnel::agent::serve_until(connection, services, async move {
            let _ = retired.await;
        }));
        *serving = Some(retire);
        tokio::select! {
            ended = &mut served => {
                *serving = None;
                match ended {
                    Ok(Ok(())) => Ok(()),
                    Ok(Err(e)) => Err(format!("the tunnel closed: {e}")),
                    Err(e) => Err(format!("the tunnel's task ended: {e}")),
                }
            }
            () = tokio::time::sleep(good_for) => Ok(()),
        }
    }

    /// TCP to the portal, TLS where it is not on this host, the upgrade with `ticket`.
    async fn dial(&self, ticket: &str) -> Result<suanli_tunnel::agent::Connection, String> {
        let authority = self.portal.authority();
        let tcp = tokio::net::TcpStream::connect(&authority).await.map_err(|e| format!("connecting to {authority}: {e}"))?;
        // HTTP/2 writes small frames on their own: without this each small answer would wait
        // for the portal's delayed ACK.
        tcp.set_nodelay(true).map_err(|e| e.to_string())?;
        if self.portal.tls {
            // The portal proves its name before the ticket goes out.
            let tls = self.portal_trust.connect(tcp, &self.portal.host).await.map_err(|e| e.to_string())?;
            suanli_tunnel::agent::dial(tls, &authority, ticket).await
        } else {
            suanli_tunnel::agent::dial(tcp, &authority, ticket).await
        }
        .map_err(|e| e.to_string())
    }

    /// A ticket from the first broker that answers.
    async fn ticket(&self) -> Result<v1::IssueTunnelTicketResponse, String> {
        let mut last = String::from("no broker configured");
        for broker in &self.brokers {
            let channel = match self.tls.connect(broker).await {
                Ok(channel) => channel,
                Err(e) => {
                    last = format!("{broker}: {e}");
                    continue;
                }
            };
            match SupplierServiceClient::new(channel).issue_tunnel_ticket(v1::IssueTunnelTicketRequest {}).await {
                Ok(answer) => return Ok(answer.into_inner()),
                Err(status) => last = format!("{broker}: {}", status.message()),
            }
        }
        Err(format!("no tunnel ticket: {last}"))
    }
}

//! Follows this node's leases. Every few seconds it asks the broker which live leases hold the
//! node's cards and hands them to [`Access::sync`] (accounts provisioned for new leases, torn
//! down for ended ones). Class B leases start without the supplier (SPEC §3: "Class B status
//! changes automatically through the monitoring interface"): once a Class B lease's account is
//! ready the agent confirms it, and the broker activates the lease when every node holding its
//! cards has confirmed. Class A leases wait for the supplier's approval instead.
//!
//! It also publishes, once per start, where the node's SSH gateway listens.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use suanli_proto::decode_status;
use suanli_proto::v1::{self, supplier_service_client::SupplierServiceClient};
use tonic::transport::Channel;

use crate::access::Access;
use crate::identity::BrokerTls;

pub struct Provisioner {
    pub brokers: Vec<String>,
    pub tls: BrokerTls,
    /// Lease access on this node; `None` when the agent runs no gateway.
    pub access: Option<Arc<Access>>,
    /// What to publish about the gateway.
    pub gateway: Option<v1::NodeAccess>,
    /// Where the node's key and certificate live (renewals write there).
    pub state_dir: std::path::PathBuf,
}

impl Provisioner {
    pub async fn run(self, every: Duration) {
        let mut state = Progress::default();
        let mut channel: Option<Channel> = None;
        let mut which = 0usize;
        let mut tick = tokio::time::interval(every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            match &self.access {
                Some(access) => tokio::select! {
                    _ = tick.tick() => {}
                    _ = access.refresh.notified() => {}
                },
                None => {
                    tick.tick().await;
                }
            }
            // Fail closed: a lease past its paid time ends here whether or not a broker answers.
            if let Some(access) = &self.access {
                let now_ms = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as i64);
                access.expire(now_ms).await;
            }
            if channel.is_none() {
                match self.tls.connect(&self.brokers[which % self.brokers.len()]).await {
                    Ok(c) => channel = Some(c),
                    Err(e) => {
                        tracing::debug!(error = %e, "provisioner: broker unreachable");
                        which += 1;
                        continue;
                    }
                }
            }
            let Some(c) = channel.clone() else { continue };
            if let Err(why) = self.follow(c, &mut state).await {
                tracing::warn!(%why, "provisioner: could not check this node's leases");
                channel = None;
                which += 1;
            }
        }
    }

    async fn follow(&self, channel: Channel, progress: &mut Progress) -> Result<(), String> {
        let mut client = SupplierServiceClient::new(channel.clone());
        let describe = |s: tonic::Status| decode_status(&s).to_string();
        if let (Some(gateway), false) = (&self.gateway, progress.gateway_reported) {
            let request = v1::ReportNodeAccessRequest {
                request_id: format!("node-access-{}-{}", gateway.ssh_host, gateway.host_key.len() + gateway.ssh_port as usize),
                access: Some(gateway.clone()),
            };
            // Tried again next round on failure; the node's leases and certificate are followed
            // meanwhile (a refused publication must not stop them).
            match client.report_node_access(request).await {
                Ok(_) => {
                    progress.gateway_reported = true;
                    tracing::info!(host = %gateway.ssh_host, port = gateway.ssh_port, "ssh gateway published");
                }
                Err(status) => tracing::warn!(error = %describe(status), "could not publish the ssh gateway"),
            }
        }
        let node = client.get_agent_node(v1::GetAgentNodeRequest {}).await.map_err(describe)?.into_inner();
        // A failed renewal is tried again on the next round; the current certificate stays.
        if let Err(e) = crate::identity::renew_if_due(&self.tls, &self.state_dir, channel.clone(), &node).await {
            tracing::warn!(error = %e, "could not renew this node's certificate");
        }
        let ready: BTreeSet<u64> = match &self.access {
            Some(access) => access.sync(&node).await,
            None => node.leases.iter().map(|l| l.lease_id).collect(),
        };
        if !node.full_telemetry {
            return Ok(()); // Class A: the supplier approves, nothing to confirm
        }
        let node_id = node.node.as_ref().map_or(0, |n| n.node_id);
        let waiting: BTreeSet<u64> = node.cards.iter().filter(|c| c.status() == v1::CardStatus::Reserved && c.lease_id != 0).map(|c| c.lease_id).collect();
        // Leases that moved on are forgotten, so the set stays as small as the node's leases.
        progress.confirmed.retain(|lease| waiting.contains(lease));
        let due: Vec<u64> = waiting.iter().filter(|l| ready.contains(l) && !progress.confirmed.contains(l)).copied().collect();
        for lease in &due {
            // The request that made the lease, as the broker remembers it: in this log line and
            // sent back with the confirmation, so one ID follows the lease portal → broker →
            // agent → broker.
            let request_id = node.leases.iter().find(|l| l.lease_id == *lease).map(|l| l.request_id.as_str()).filter(|id| !id.is_empty());
            let mut request = tonic::Request::new(v1::ConfirmProvisionedRequest { request_id: format!("provisioned-{lease}-{node_id}"), lease_id: *lease });
            if let Some(id) = request_id.and_then(suanli_observability::RequestId::parse) {
                if let Ok(value) = id.as_str().parse() {
                    request.metadata_mut().insert(suanli_observability::REQUEST_ID_HEADER, value);
                }
            }
            match client.confirm_provisioned(request).await {
                Ok(reply) => {
                    let state = reply.into_inner().state();
                    tracing::info!(lease, ?state, request_id, "lease provisioned on this node");
                    if let (Some(access), v1::LeaseState::Active) = (&self.access, state) {
                        access.mark_active(*lease);
                    }
                    progress.confirmed.insert(*lease);
                }
                Err(status) => tracing::warn!(lease, error = %describe(status), "could not confirm provisioning"),
            }
        }
        Ok(())
    }
}

#[derive(Default)]
struct Progress {
    confirmed: BTreeSet<u64>,
    gateway_reported: bool,
}

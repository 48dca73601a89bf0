//! Class B leases start without the supplier (SPEC §3: "Class B status changes automatically
//! through the monitoring interface"): the agent watches its node's cards, and when a Class B
//! lease reserves some of them it provisions them and confirms; the broker activates the lease
//! once every node holding its cards has confirmed. Provisioning itself — the lease's account,
//! SSH access, device isolation — arrives with the access issue; today there is nothing to set
//! up beyond the confirmation. Class A leases wait for the supplier's approval instead.

use std::collections::BTreeSet;
use std::time::Duration;

use suanli_proto::decode_status;
use suanli_proto::v1::{self, supplier_service_client::SupplierServiceClient};
use tonic::transport::Channel;

use crate::identity::BrokerTls;

pub async fn run(brokers: Vec<String>, tls: BrokerTls, every: Duration) {
    let mut confirmed: BTreeSet<u64> = BTreeSet::new();
    let mut channel: Option<Channel> = None;
    let mut which = 0usize;
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        if channel.is_none() {
            match tls.connect(&brokers[which % brokers.len()]).await {
                Ok(c) => channel = Some(c),
                Err(e) => {
                    tracing::debug!(error = %e, "provisioner: broker unreachable");
                    which += 1;
                    continue;
                }
            }
        }
        let Some(c) = channel.clone() else { continue };
        if let Err(why) = confirm_reserved(c, &mut confirmed).await {
            tracing::warn!(%why, "provisioner: could not check this node's leases");
            channel = None;
            which += 1;
        }
    }
}

/// Confirms every Class B lease that reserves cards of this node and is not confirmed yet.
async fn confirm_reserved(channel: Channel, confirmed: &mut BTreeSet<u64>) -> Result<(), String> {
    let mut client = SupplierServiceClient::new(channel);
    let describe = |s: tonic::Status| decode_status(&s).to_string();
    let node = client.get_agent_node(v1::GetAgentNodeRequest {}).await.map_err(describe)?.into_inner();
    if !node.full_telemetry {
        return Ok(());
    }
    let node_id = node.node.as_ref().map_or(0, |n| n.node_id);
    let waiting: BTreeSet<u64> = node
        .cards
        .iter()
        .filter(|c| c.status() == v1::CardStatus::Reserved && c.lease_id != 0)
        .map(|c| c.lease_id)
        .collect();
    // Leases that moved on are forgotten, so the set stays as small as the node's leases.
    confirmed.retain(|lease| waiting.contains(lease));
    for lease in waiting.difference(&confirmed.clone()) {
        let request = v1::ConfirmProvisionedRequest { request_id: format!("provisioned-{lease}-{node_id}"), lease_id: *lease };
        match client.confirm_provisioned(request).await {
            Ok(reply) => {
                tracing::info!(lease, state = ?reply.into_inner().state(), "lease provisioned on this node");
                confirmed.insert(*lease);
            }
            Err(status) => tracing::warn!(lease, error = %describe(status), "could not confirm provisioning"),
        }
    }
    Ok(())
}

//! Broker model → wire messages. (Types owned by `suanli-types` convert in `suanli-proto`.)

use suanli_proto::convert::{
    account_kind_to_wire, billing_mode_to_wire, card_health_to_wire, card_spec_to_wire, card_status_to_wire, cluster_class_to_wire, end_reason_to_wire,
    inventory_to_wire, job_end_reason_to_wire, lease_state_to_wire, listing_to_wire, money_to_wire,
};
use suanli_proto::v1;
use suanli_types::{ClusterState, LeaseUnit, NodeId};

use crate::state::{AppliedEvents, Card, ClusterSummary, Event, Lease, Node, State};

pub fn card(c: &Card) -> v1::Card {
    v1::Card {
        card_id: c.id.0,
        node_id: c.node.0,
        spec: Some(card_spec_to_wire(&c.spec)),
        status: card_status_to_wire(c.status),
        lease_id: c.lease.map_or(0, |l| l.0),
        health: card_health_to_wire(c.health),
    }
}

pub fn node(n: &Node) -> v1::Node {
    v1::Node {
        node_id: n.id.0,
        supplier_id: n.supplier.0,
        inventory: Some(inventory_to_wire(&n.inventory)),
        card_ids: n.cards.iter().map(|c| c.0).collect(),
        cluster_id: n.cluster.map_or(0, |c| c.0),
        enrolled_at_ms: n.enrolled_at.millis(),
        access: n.access.as_ref().map(|a| v1::NodeAccess {
            ssh_host: a.ssh_host.clone(),
            ssh_port: u32::from(a.ssh_port),
            host_key: a.host_key.as_str().to_owned(),
            login_prefix: a.login_prefix.clone(),
        }),
    }
}

/// How the lessee logs in: one entry per node holding the lease's cards whose agent runs a
/// gateway, in node order.
pub fn lease_access(s: &State, l: &Lease) -> v1::LeaseAccess {
    let mut by_node: std::collections::BTreeMap<NodeId, Vec<u32>> = std::collections::BTreeMap::new();
    for card in l.cards.iter().filter_map(|c| s.card(*c)) {
        by_node.entry(card.node).or_default().push(card.spec.index);
    }
    let nodes = by_node
        .into_iter()
        .filter_map(|(node, card_indexes)| {
            let access = s.node(node)?.access.as_ref()?;
            let vnc_port = suanli_types::node::vnc_port(&card_indexes).map_or(0, u32::from);
            Some(v1::NodeLogin {
                vnc_tunnel: format!("ssh -p {} -N -L 5901:127.0.0.1:{vnc_port} {}@{}", access.ssh_port, access.login(l.id), access.ssh_host),
                vnc_port,
                node_id: node.0,
                login: access.login(l.id),
                ssh_host: access.ssh_host.clone(),
                ssh_port: u32::from(access.ssh_port),
                known_hosts_line: access.known_hosts_line(),
                ssh_command: access.ssh_command(l.id),
                card_indexes,
            })
        })
        .collect();
    v1::LeaseAccess { lease_id: l.id.0, state: lease_state_to_wire(l.state), nodes }
}

pub fn cluster(s: &ClusterSummary<'_>) -> v1::Cluster {
    let c = s.cluster;
    v1::Cluster {
        cluster_id: c.id.0,
        cpc_id: c.cpc.as_str().to_owned(),
        supplier_id: c.supplier.0,
        class: cluster_class_to_wire(c.class),
        delisted: c.state == ClusterState::Delisted,
        node_ids: c.nodes.iter().map(|n| n.0).collect(),
        listing: Some(listing_to_wire(&c.listing)),
        total_cards: s.total_cards,
        idle_cards: s.idle_cards,
        published_at_ms: c.published_at.millis(),
        modified_at_ms: c.modified_at.millis(),
        revision: c.revision,
    }
}

pub fn lease(l: &Lease) -> v1::Lease {
    v1::Lease {
        lease_id: l.id.0,
        cluster_id: l.cluster.0,
        class: cluster_class_to_wire(l.class),
        researcher_id: l.researcher.0,
        supplier_id: l.supplier.0,
        node_ids: match &l.unit {
            LeaseUnit::Nodes(nodes) => nodes.iter().map(|n| n.0).collect(),
            LeaseUnit::Cards(_) => Vec::new(),
        },
        card_ids: l.cards.iter().map(|c| c.0).collect(),
        billing_mode: billing_mode_to_wire(l.billing_mode),
        periods: l.periods,
        price_per_card: Some(money_to_wire(&l.price_per_card)),
        amount: Some(money_to_wire(&l.amount)),
        state: lease_state_to_wire(l.state),
        requested_at_ms: l.requested_at.millis(),
        reserved_until_ms: l.reserved_until.millis(),
        activated_at_ms: l.activated_at.map_or(0, |t| t.millis()),
        paid_until_ms: l.paid_until.map_or(0, |t| t.millis()),
        ended_at_ms: l.ended_at.map_or(0, |t| t.millis()),
        end_reason: l.end_reason.map_or(0, end_reason_to_wire),
        auto_for_job_id: l.auto_for.map_or(0, |j| j.0),
        auth_code_attempts_left: l.auth_code.as_ref().map_or(0, |a| a.attempts_left),
    }
}

pub fn task(l: &Lease, cpc: &str) -> v1::Task {
    v1::Task {
        lease_id: l.id.0,
        cluster_id: l.cluster.0,
        cpc_id: cpc.to_owned(),
        researcher_id: l.researcher.0,
        supplier_id: l.supplier.0,
        state: lease_state_to_wire(l.state),
        billing_mode: billing_mode_to_wire(l.billing_mode),
        periods: l.periods,
        cards: l.cards.len() as u32,
        price_per_card: Some(money_to_wire(&l.price_per_card)),
        amount: Some(money_to_wire(&l.amount)),
        started_at_ms: l.activated_at.map_or(0, |t| t.millis()),
        paid_until_ms: l.paid_until.map_or(0, |t| t.millis()),
        ended_at_ms: l.ended_at.map_or(0, |t| t.millis()),
        end_reason: l.end_reason.map_or(0, end_reason_to_wire),
    }
}

pub fn event(e: &Event) -> v1::Event {
    use v1::event::Kind;
    let changed = |id: u64, cpc: String, revision: u64| v1::ClusterChanged { cluster_id: id, cpc_id: cpc, revision };
    let kind = match e {
        Event::AccountRegistered { account, kind } => {
            Kind::AccountRegistered(v1::AccountRegistered { account_id: account.0, kind: account_kind_to_wire(*kind) })
        }
        Event::SshKeyAdded { account } => Kind::SshKeyAdded(v1::SshKeyAdded { account_id: account.0 }),
        Event::SshKeyRemoved { account } => Kind::SshKeyRemoved(v1::SshKeyRemoved { account_id: account.0 }),
        Event::AccountTokenRotated { account } => Kind::AccountTokenRotated(v1::AccountTokenRotated { account_id: account.0 }),
        Event::RemoteLeaseChanged { remote, researcher, state } => Kind::RemoteLeaseChanged(v1::RemoteLeaseChanged {
            remote_lease_id: remote.0,
            researcher_id: researcher.0,
            state: remote_lease_state_to_wire(*state) as i32,
        }),
        Event::NodeEnrolled { node, supplier, cards } => {
            Kind::NodeEnrolled(v1::NodeEnrolled { node_id: node.0, supplier_id: supplier.0, card_ids: cards.iter().map(|c| c.0).collect() })
        }
        Event::ClusterPublished { cluster, cpc } => Kind::ClusterPublished(changed(cluster.0, cpc.as_str().into(), 1)),
        Event::ClusterModified { cluster, revision } => Kind::ClusterModified(changed(cluster.0, String::new(), *revision)),
        Event::ClusterDelisted { cluster } => Kind::ClusterDelisted(changed(cluster.0, String::new(), 0)),
        Event::CardStatusChanged { card, from, to, lease } => Kind::CardStatusChanged(v1::CardStatusChanged {
            card_id: card.0,
            from: card_status_to_wire(*from),
            to: card_status_to_wire(*to),
            lease_id: lease.map_or(0, |l| l.0),
        }),
        Event::LeaseStateChanged { lease, from, to, reason } => Kind::LeaseStateChanged(v1::LeaseStateChanged {
            lease_id: lease.0,
            from: from.map_or(0, lease_state_to_wire),
            to: lease_state_to_wire(*to),
            reason: reason.map_or(0, end_reason_to_wire),
        }),
        Event::LeaseExtended { lease, periods, paid_until } => {
            Kind::LeaseExtended(v1::LeaseExtended { lease_id: lease.0, periods: *periods, paid_until_ms: paid_until.millis() })
        }
        Event::AuthCodeRejected { lease, attempts_left } => Kind::AuthCodeRejected(v1::AuthCodeRejected { lease_id: lease.0, attempts_left: *attempts_left }),
        Event::AgentEnrolled { node, supplier, reenrolled } => {
            Kind::AgentEnrolled(v1::AgentEnrolled { node_id: node.0, supplier_id: supplier.0, reenrolled: *reenrolled })
        }
        Event::AgentRevoked { node } => Kind::AgentRevoked(v1::AgentRevoked { node_id: node.0 }),
        Event::CardHealthChanged { card, from, to } => {
            Kind::CardHealthChanged(v1::CardHealthChanged { card_id: card.0, from: card_health_to_wire(*from), to: card_health_to_wire(*to) })
        }
        Event::JobStateChanged { job, owner, from, to, attempt, reason } => Kind::JobStateChanged(v1::JobStateChanged {
            job_id: job.0,
            owner_id: owner.0,
            from: from.map_or("", |s| s.as_str()).into(),
            to: to.as_str().into(),
            attempt: *attempt,
            reason: reason.as_ref().map(job_end_reason_to_wire),
        }),
        Event::JobStopRequested { job, attempt, reason } => {
            Kind::JobStopRequested(v1::JobStopRequested { job_id: job.0, attempt: *attempt, reason: Some(job_end_reason_to_wire(reason)) })
        }
        Event::SchedulerLeaseChanged { holder, epoch } => Kind::SchedulerLeaseChanged(v1::SchedulerLeaseChanged { holder: holder.clone(), epoch: *epoch }),
        Event::Ledger { transaction, kind, lease, account } => Kind::LedgerPosted(v1::LedgerPosted {
            transaction_id: *transaction,
            kind: kind.as_str().into(),
            lease_id: lease.map_or(0, |l| l.0),
            account_id: account.map_or(0, |a| a.0),
        }),
        Event::LeaseEvaluated { lease, supplier, score } => {
            Kind::LeaseEvaluated(v1::LeaseEvaluated { lease_id: lease.0, supplier_id: supplier.0, score: *score })
        }
    };
    v1::Event { kind: Some(kind) }
}

pub fn batch(applied: &AppliedEvents) -> v1::WatchResponse {
    v1::WatchResponse {
        kind: Some(v1::watch_response::Kind::Batch(v1::EventBatch {
            index: applied.index,
            at_ms: applied.at.millis(),
            events: applied.events.iter().map(event).collect(),
        })),
    }
}

pub fn remote_lease(l: &crate::state::RemoteLease) -> v1::RemoteLease {
    v1::RemoteLease {
        remote_lease_id: l.id.0,
        researcher_id: l.researcher.0,
        member: l.member.clone(),
        member_name: l.member_name.clone(),
        remote_cluster_id: l.remote_cluster,
        remote_lease_id_at_owner: l.remote_lease.unwrap_or(0),
        cards: l.cards,
        billing_mode: billing_mode_to_wire(l.billing_mode),
        periods: l.periods,
        price_per_card: Some(money_to_wire(&l.price_per_card)),
        held: Some(money_to_wire(&l.held)),
        state: remote_lease_state_to_wire(l.state) as i32,
        requested_at_ms: l.requested_at.millis(),
        ended_at_ms: l.ended_at.map_or(0, |t| t.millis()),
        charged_minor: l.charged_minor,
    }
}

pub fn remote_lease_state_to_wire(state: suanli_types::RemoteLeaseState) -> v1::RemoteLeaseState {
    match state {
        suanli_types::RemoteLeaseState::Requested => v1::RemoteLeaseState::Requested,
        suanli_types::RemoteLeaseState::Active => v1::RemoteLeaseState::Active,
        suanli_types::RemoteLeaseState::Ended => v1::RemoteLeaseState::Ended,
    }
}

//! This member as the *owner* of cards another member's researcher leases: it answers the
//! calls of `suanli_federation::calls` by acting at its own broker with the calling member's
//! partner account (a researcher account the operator registered for that member and granted
//! credit to: `[[federation.partners]]`). The broker decides, in this member's Raft group, as
//! for any researcher; the partner account's token sees only that member's leases, so one
//! member can never reach another's.

use std::collections::BTreeMap;
use std::sync::Arc;

use suanli_federation::calls::{AccessNode, Answer, Call, Settlement, SignedSettlement};
use suanli_federation::{FederationNode, IncomingCall, Keypair, PeerId};
use suanli_proto::v1;
use tokio::sync::mpsc;

use crate::offer::BrokerAccess;
use crate::settlements::Journal;

/// What the owner side needs.
#[derive(Clone)]
pub struct Owner {
    pub node: FederationNode,
    pub key: Keypair,
    pub broker: BrokerAccess,
    /// Each partner member's account token at this member's broker.
    pub partners: Arc<BTreeMap<PeerId, String>>,
    pub journal: Journal,
}

/// How long a certificate for a remote lease is valid at most (the broker caps it at the
/// paid term too).
const CERTIFICATE_SECONDS: u32 = 8 * 3600;

pub fn refused(code: &str, message: impl Into<String>) -> Answer {
    Answer::Refused { code: code.into(), message: message.into() }
}

fn from_status(status: &tonic::Status) -> Answer {
    let e = suanli_proto::decode_status(status);
    refused(e.code.as_str(), e.message)
}

pub fn lease_state_name(raw: i32) -> String {
    v1::LeaseState::try_from(raw)
        .map_or("unspecified", |s| match s {
            v1::LeaseState::Requested => "requested",
            v1::LeaseState::Approved => "approved",
            v1::LeaseState::Active => "active",
            v1::LeaseState::Ended => "ended",
            v1::LeaseState::Expired => "expired",
            v1::LeaseState::Cancelled => "cancelled",
            v1::LeaseState::Unspecified => "unspecified",
        })
        .to_owned()
}

pub fn billing_mode_of(name: &str) -> Option<v1::BillingMode> {
    Some(match name {
        "hourly" => v1::BillingMode::Hourly,
        "daily" => v1::BillingMode::Daily,
        "monthly" => v1::BillingMode::Monthly,
        "yearly" => v1::BillingMode::Yearly,
        _ => return None,
    })
}

/// The broker's request ID for a call: the key is the caller's, so the same call retried (or
/// delivered twice) is the same request; the partner account scopes it to that member. A
/// SHA-256 digest (stable across builds, at most 64 characters whatever the key).
fn request_id(what: &str, key: &str) -> String {
    use sha2::Digest;
    let digest = sha2::Sha256::digest(format!("{what}\0{key}").as_bytes());
    format!("fed-{what}-{}", hex::encode(&digest[..20]))
}

/// Calls answered at once; more wait for a slot, and one that waits too long is answered
/// `UNAVAILABLE` (the caller retries with the same key).
const CONCURRENT_CALLS: usize = 32;
/// How long one call may take here (this member's broker decides in its own Raft group).
const ANSWER_WITHIN: std::time::Duration = std::time::Duration::from_secs(15);

impl Owner {
    /// Answers calls until the node stops.
    pub async fn serve(self, mut calls: mpsc::Receiver<IncomingCall>) {
        let slots = Arc::new(tokio::sync::Semaphore::new(CONCURRENT_CALLS));
        while let Some(incoming) = calls.recv().await {
            // Waiting here leaves the node's bounded queue full, so it refuses what comes next.
            let Ok(slot) = slots.clone().acquire_owned().await else { return };
            let owner = self.clone();
            tokio::spawn(async move {
                let answer = tokio::time::timeout(ANSWER_WITHIN, owner.answer(incoming.from, incoming.call))
                    .await
                    .unwrap_or_else(|_| refused("UNAVAILABLE", "this member's broker did not decide in time; retry"));
                let _ = incoming.reply.send(answer);
                drop(slot);
            });
        }
    }

    async fn client(&self, from: PeerId) -> Result<suanli_proto::client::Client, Answer> {
        let token = self.partners.get(&from).ok_or_else(|| refused("PERMISSION_DENIED", "this member has no partner account here"))?;
        self.broker.client(Some(token)).await.map_err(|e| refused("UNAVAILABLE", format!("the broker: {e}")))
    }

    pub async fn answer(&self, from: PeerId, call: Call) -> Answer {
        let mut broker = match self.client(from).await {
            Ok(c) => c,
            Err(refusal) => return refusal,
        };
        match call {
            Call::Lease { key, cluster_id, cards, billing_mode, periods, price_per_card_minor, currency } => {
                let Some(mode) = billing_mode_of(&billing_mode) else { return refused("INVALID_ARGUMENT", "billing_mode") };
                // Leased first, under the caller's key: every answer to this key, a refusal
                // included, is the broker's remembered one, so a retry after a lost answer
                // never gets a different verdict.
                let request =
                    v1::RequestLeaseRequest { request_id: request_id("lease", &key), cluster_id, node_ids: vec![], cards, billing_mode: mode as i32, periods };
                let lease = match broker.request_lease(request).await {
                    Ok(l) => l.into_inner(),
                    Err(s) => return from_status(&s),
                };
                // The requester held the price it saw announced: never dearer than that. A lease
                // made at a higher price is given back at once (nothing used, nothing charged),
                // and every retry finds it given back.
                let price = lease.price_per_card.clone().unwrap_or_default();
                if price.currency != currency || price.minor > price_per_card_minor {
                    let end =
                        v1::EndLeaseRequest { request_id: request_id("too-dear", &key), lease_id: lease.lease_id, reason: v1::EndReason::ByResearcher as i32 };
                    if let Err(s) = broker.end_lease(end).await {
                        if suanli_proto::decode_status(&s).code != suanli_types::ErrorCode::InvalidTransition {
                            return from_status(&s);
                        }
                    }
                    return refused("FAILED_PRECONDITION", format!("the price is now {} {} per card", price.minor, price.currency));
                }
                tracing::info!(target: "audit", member = %from, key, lease = lease.lease_id, "leased for a federation member");
                Answer::Lease { lease_id: lease.lease_id, state: lease_state_name(lease.state) }
            }
            Call::Access { lease_id, public_key, .. } => {
                let access = match broker.get_lease_access(v1::GetLeaseRequest { lease_id }).await {
                    Ok(a) => a.into_inner(),
                    Err(s) => return from_status(&s),
                };
                let certificate =
                    match broker.issue_ssh_certificate(v1::IssueSshCertificateRequest { lease_id, public_key, valid_seconds: CERTIFICATE_SECONDS }).await {
                        Ok(c) => c.into_inner(),
                        Err(s) => return from_status(&s),
                    };
                Answer::Access {
                    lease_id,
                    state: lease_state_name(access.state),
                    nodes: access
                        .nodes
                        .into_iter()
                        .map(|n| AccessNode {
                            host: n.ssh_host,
                            port: n.ssh_port,
                            login: n.login,
                            known_hosts_line: n.known_hosts_line,
                            card_indexes: n.card_indexes,
                        })
                        .collect(),
                    certificate: certificate.certificate,
                    valid_before_ms: certificate.valid_before_ms,
                }
            }
            Call::Status { key, lease_id } => self.status(&mut broker, from, &key, lease_id).await,
            Call::End { key, lease_id } => {
                let end = v1::EndLeaseRequest { request_id: request_id("end", &key), lease_id, reason: v1::EndReason::ByResearcher as i32 };
                match broker.end_lease(end).await {
                    Ok(_) => {}
                    // Already over (expired, or ended by its supplier): the status says how.
                    Err(s) if suanli_proto::decode_status(&s).code == suanli_types::ErrorCode::InvalidTransition => {}
                    Err(s) => return from_status(&s),
                }
                self.status(&mut broker, from, &key, lease_id).await
            }
            Call::Countersign { settlement } => {
                let s = &settlement.settlement;
                if s.owner != self.node.peer_id().to_base58() || s.requester != from.to_base58() {
                    return refused("PERMISSION_DENIED", "a settlement between other members");
                }
                match self.journal.record(settlement, &self.node.membership()) {
                    Ok(_) => Answer::Countersigned,
                    Err(e) => refused("INVALID_ARGUMENT", e.to_string()),
                }
            }
        }
    }

    /// The lease's state, and once it is over the settlement this member signs: what the
    /// partner account was charged for it, from its ledger.
    async fn status(&self, broker: &mut suanli_proto::client::Client, from: PeerId, key: &str, lease_id: u64) -> Answer {
        let lease = match broker.get_lease(v1::GetLeaseRequest { lease_id }).await {
            Ok(l) => l.into_inner(),
            Err(s) => return from_status(&s),
        };
        let state = lease_state_name(lease.state);
        if lease.ended_at_ms == 0 {
            return Answer::Status { lease_id, state, settlement: None };
        }
        let charged = match charged(broker, lease.researcher_id, lease_id).await {
            Ok(c) => c,
            Err(s) => return from_status(&s),
        };
        let settlement = Settlement {
            federation: self.node.membership().federation().to_owned(),
            owner: self.node.peer_id().to_base58(),
            owner_lease: lease_id,
            requester: from.to_base58(),
            requester_key: key.to_owned(),
            cluster_id: lease.cluster_id,
            currency: lease.amount.map(|m| m.currency).unwrap_or_default(),
            charged_minor: charged,
            ended_at_ms: lease.ended_at_ms,
        };
        match SignedSettlement::sign_as_owner(settlement, &self.key) {
            Ok(signed) => Answer::Status { lease_id, state, settlement: Some(signed) },
            Err(e) => refused("INTERNAL", e.to_string()),
        }
    }
}

/// What `account` was charged for `lease`: the charges taken from its hold.
async fn charged(broker: &suanli_proto::client::Client, account: u64, lease: u64) -> Result<i64, tonic::Status> {
    let held = format!("held:{account}");
    let transactions = suanli_proto::client::all_pages(|after| {
        let mut c = broker.clone();
        async move {
            let page = c
                .list_transactions(v1::ListTransactionsRequest {
                    account_id: 0,
                    month: String::new(),
                    page_after_id: after,
                    page_size: suanli_proto::client::LARGEST_PAGE,
                })
                .await?
                .into_inner();
            Ok((page.transactions, page.next_page_after_id))
        }
    })
    .await?;
    Ok(transactions.iter().filter(|t| t.lease_id == lease && t.kind == "charge").flat_map(|t| &t.entries).filter(|e| e.account == held).map(|e| -e.minor).sum())
}

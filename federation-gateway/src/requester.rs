//! This member as the *requester*: its researchers lease other members' cards. The order is
//! what keeps money and cards consistent when anything fails midway:
//!
//! 1. `RequestRemoteLease` at this member's broker, with the researcher's idempotency key as
//!    the request ID: the researcher's money is held (announced price × cards × periods) and
//!    the remote lease `rlease-N` recorded, once however often the request is retried;
//! 2. the `Lease` call to the owner with `rlease-N` as its key: the owner leases once however
//!    often it is asked;
//! 3. `ConfirmRemoteLease` with the owner's lease ID; or, when the owner refused,
//!    `EndRemoteLease` with nothing charged. When the owner did not answer, the remote lease
//!    stays requested and the reconciler asks again (same key) until it answers.
//!
//! At the end the owner signs a settlement (what it charged); this member checks it, takes
//! the charge from the hold (`EndRemoteLease`), countersigns, journals, and hands the
//! countersignature back (`Countersign`).

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use suanli_federation::calls::{Answer, Call, SignedSettlement};
use suanli_federation::{FederationNode, Keypair, NodeError, PeerId};
use suanli_proto::v1;

use crate::offer::BrokerAccess;
use crate::settlements::Journal;

#[derive(Clone)]
pub struct Requester {
    pub node: FederationNode,
    pub key: Keypair,
    pub broker: BrokerAccess,
    pub journal: Journal,
    /// Remote leases whose owner did not answer the last call, and since when.
    pub unreachable: Arc<Mutex<BTreeMap<u64, Instant>>>,
    /// Settlements whose owner took the countersignature (in this process's life).
    pub delivered: Arc<Mutex<std::collections::BTreeSet<(String, u64)>>>,
}

/// Why a requester-side operation failed, as the API reports it.
#[derive(Debug, thiserror::Error)]
pub enum RequestError {
    /// This member's broker refused or failed (its error code and message).
    #[error("{code}: {message}")]
    Broker { code: String, message: String },
    /// The owning member refused.
    #[error("the owning member refused: {code}: {message}")]
    Refused { code: String, message: String },
    /// The owning member did not answer; the same request may be retried.
    #[error("the owning member did not answer ({0}); retry with the same key")]
    Unreachable(String),
    #[error("{0}")]
    Invalid(String),
    #[error("not found")]
    NotFound,
}

impl RequestError {
    fn broker(status: &tonic::Status) -> RequestError {
        let e = suanli_proto::decode_status(status);
        if e.code == suanli_types::ErrorCode::NotFound {
            return RequestError::NotFound;
        }
        RequestError::Broker { code: e.code.as_str().to_owned(), message: e.message }
    }
}

/// What a researcher asks for.
#[derive(Clone, Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LeaseRequest {
    pub researcher_id: u64,
    /// The researcher's idempotency key (1–64 characters): a retry gets the same lease.
    pub key: String,
    /// The owning member, by name or peer ID.
    pub origin: String,
    pub cluster_id: u64,
    pub cards: u32,
    pub billing_mode: String,
    pub periods: u32,
}

impl Requester {
    async fn broker(&self) -> Result<suanli_proto::client::Client, RequestError> {
        self.broker.client(None).await.map_err(|e| RequestError::Broker { code: "UNAVAILABLE".into(), message: e.to_string() })
    }

    fn member(&self, origin: &str) -> Option<(PeerId, String)> {
        let membership = self.node.membership();
        let found =
            membership.peers().filter_map(|p| membership.member(p).map(|m| (*p, m.name.clone()))).find(|(p, name)| *name == origin || p.to_base58() == origin);
        found
    }

    /// Leases another member's cards for a researcher this member authenticated (steps 1–3).
    pub async fn lease(&self, request: LeaseRequest) -> Result<v1::RemoteLease, RequestError> {
        let (owner, owner_name) = self.member(&request.origin).ok_or_else(|| RequestError::Invalid(format!("{}: no such member", request.origin)))?;
        if owner == self.node.peer_id() {
            return Err(RequestError::Invalid("this member's own cards are leased directly".into()));
        }
        let mode = crate::owner::billing_mode_of(&request.billing_mode)
            .ok_or_else(|| RequestError::Invalid("billing_mode: hourly, daily, monthly or yearly".into()))?;
        // The price held is the one the owner announces now (a stale offer is not leased).
        let listing = self
            .node
            .catalogue()
            .into_iter()
            .find(|l| l.origin == owner && l.listing.cluster_id == request.cluster_id && !l.stale)
            .ok_or_else(|| RequestError::Invalid(format!("{owner_name} announces no cluster {} now", request.cluster_id)))?;
        let price =
            *listing.listing.prices.get(&request.billing_mode).ok_or_else(|| RequestError::Invalid(format!("{} is not offered", request.billing_mode)))?;
        if request.key.is_empty() || request.key.len() > 256 {
            return Err(RequestError::Invalid("key: 1 to 256 characters".into()));
        }
        let mut broker = self.broker().await?;
        let remote = broker
            .request_remote_lease(v1::RequestRemoteLeaseRequest {
                request_id: researcher_request_id(request.researcher_id, &request.key),
                researcher_id: request.researcher_id,
                member: owner.to_base58(),
                member_name: owner_name,
                remote_cluster_id: request.cluster_id,
                cards: request.cards,
                billing_mode: mode as i32,
                periods: request.periods,
                price_per_card: Some(v1::Money { currency: listing.listing.currency.clone(), minor: price }),
            })
            .await
            .map_err(|s| RequestError::broker(&s))?
            .into_inner();
        // A retry gets the first answer from the broker, which may be older than what happened
        // since (confirmed, refused, ended): go on from the remote lease as it is now.
        let now = broker
            .get_remote_lease(v1::GetRemoteLeaseRequest { remote_lease_id: remote.remote_lease_id })
            .await
            .map_err(|s| RequestError::broker(&s))?
            .into_inner();
        if now.state == v1::RemoteLeaseState::Ended as i32 && now.remote_lease_id_at_owner == 0 {
            return Err(RequestError::Refused {
                code: "REFUSED".into(),
                message: format!("the owner refused rlease-{}; ask again with a new key", now.remote_lease_id),
            });
        }
        self.ask_owner(&mut broker, now).await
    }

    /// Step 2 and 3 for a requested remote lease (again, when the owner did not answer).
    async fn ask_owner(&self, broker: &mut suanli_proto::client::Client, remote: v1::RemoteLease) -> Result<v1::RemoteLease, RequestError> {
        if remote.state != v1::RemoteLeaseState::Requested as i32 {
            return Ok(remote);
        }
        let owner: PeerId = remote.member.parse().map_err(|_| RequestError::Invalid("the remote lease names no peer".into()))?;
        let price = remote.price_per_card.clone().unwrap_or_default();
        let call = Call::Lease {
            key: key_of(&remote),
            cluster_id: remote.remote_cluster_id,
            cards: remote.cards,
            billing_mode: mode_name(remote.billing_mode).to_owned(),
            periods: remote.periods,
            price_per_card_minor: price.minor,
            currency: price.currency,
        };
        match self.call(remote.remote_lease_id, owner, call).await? {
            Answer::Lease { lease_id, .. } => {
                let confirmed = broker
                    .confirm_remote_lease(v1::ConfirmRemoteLeaseRequest {
                        request_id: format!("gw-confirm-{}", remote.remote_lease_id),
                        remote_lease_id: remote.remote_lease_id,
                        remote_lease_id_at_owner: lease_id,
                    })
                    .await;
                match confirmed {
                    Ok(r) => Ok(r.into_inner()),
                    // Ended here meanwhile (refused on an earlier try): the owner's lease has
                    // no one to pay for it; give it back.
                    Err(s) if suanli_proto::decode_status(&s).code == suanli_types::ErrorCode::InvalidArgument => {
                        let _ = self.node.call(owner, Call::End { key: key_of(&remote), lease_id }).await;
                        Err(RequestError::broker(&s))
                    }
                    Err(s) => Err(RequestError::broker(&s)),
                }
            }
            // The owner could not decide now: not a refusal; the reconciler asks again.
            Answer::Refused { code, message } if code == "INTERNAL" => Err(RequestError::Unreachable(message)),
            Answer::Refused { code, message } => {
                // The owner decided (and remembers deciding so for this key): nothing was
                // leased, the hold goes back whole.
                broker
                    .end_remote_lease(v1::EndRemoteLeaseRequest {
                        request_id: format!("gw-refused-{}", remote.remote_lease_id),
                        remote_lease_id: remote.remote_lease_id,
                        charged_minor: 0,
                    })
                    .await
                    .map_err(|s| RequestError::broker(&s))?;
                Err(RequestError::Refused { code, message })
            }
            other => Err(RequestError::Refused { code: "INTERNAL".into(), message: format!("an unexpected answer: {other:?}") }),
        }
    }

    /// Calls the owner, noting whether it answered (an `UNAVAILABLE` refusal counts as no
    /// answer: the owner could not decide now).
    async fn call(&self, remote: u64, owner: PeerId, call: Call) -> Result<Answer, RequestError> {
        let answer = self.node.call(owner, call).await;
        let mut unreachable = self.unreachable.lock().unwrap_or_else(|p| p.into_inner());
        match answer {
            Ok(Answer::Refused { code, message }) if code == "UNAVAILABLE" => {
                unreachable.entry(remote).or_insert_with(Instant::now);
                Err(RequestError::Unreachable(message))
            }
            Ok(answer) => {
                unreachable.remove(&remote);
                Ok(answer)
            }
            Err(e @ (NodeError::Call { .. } | NodeError::Stopped | NodeError::NotMember(_))) => {
                unreachable.entry(remote).or_insert_with(Instant::now);
                Err(RequestError::Unreachable(e.to_string()))
            }
            Err(e) => Err(RequestError::Unreachable(e.to_string())),
        }
    }

    /// The researcher's remote lease (refused as not found for anyone else's).
    pub async fn remote_lease(&self, researcher_id: u64, id: u64) -> Result<v1::RemoteLease, RequestError> {
        let remote =
            self.broker().await?.get_remote_lease(v1::GetRemoteLeaseRequest { remote_lease_id: id }).await.map_err(|s| RequestError::broker(&s))?.into_inner();
        if remote.researcher_id != researcher_id {
            return Err(RequestError::NotFound);
        }
        Ok(remote)
    }

    /// A researcher's remote leases, oldest first.
    pub async fn list(&self, researcher_id: u64) -> Result<Vec<v1::RemoteLease>, RequestError> {
        let broker = self.broker().await?;
        suanli_proto::client::all_pages(|after| {
            let mut c = broker.clone();
            async move {
                let page = c
                    .list_remote_leases(v1::ListRemoteLeasesRequest {
                        researcher_id,
                        live_only: false,
                        page_after_id: after,
                        page_size: suanli_proto::client::LARGEST_PAGE,
                    })
                    .await?
                    .into_inner();
                Ok((page.remote_leases, page.next_page_after_id))
            }
        })
        .await
        .map_err(|s| RequestError::broker(&s))
    }

    /// How to log into an active remote lease with `public_key`.
    pub async fn access(&self, researcher_id: u64, id: u64, public_key: String) -> Result<Answer, RequestError> {
        let remote = self.remote_lease(researcher_id, id).await?;
        if remote.state != v1::RemoteLeaseState::Active as i32 {
            return Err(RequestError::Invalid(format!("rlease-{id} is not active")));
        }
        let owner: PeerId = remote.member.parse().map_err(|_| RequestError::Invalid("the remote lease names no peer".into()))?;
        match self.call(id, owner, Call::Access { key: key_of(&remote), lease_id: remote.remote_lease_id_at_owner, public_key }).await? {
            Answer::Refused { code, message } => Err(RequestError::Refused { code, message }),
            answer => Ok(answer),
        }
    }

    /// Ends a remote lease at its owner and settles it here.
    pub async fn end(&self, researcher_id: u64, id: u64) -> Result<v1::RemoteLease, RequestError> {
        let remote = self.remote_lease(researcher_id, id).await?;
        if remote.state == v1::RemoteLeaseState::Ended as i32 {
            return Ok(remote);
        }
        if remote.state == v1::RemoteLeaseState::Requested as i32 {
            return Err(RequestError::Invalid(format!("rlease-{id} waits for its owner's answer; end it once active")));
        }
        let owner: PeerId = remote.member.parse().map_err(|_| RequestError::Invalid("the remote lease names no peer".into()))?;
        let answer = self.call(id, owner, Call::End { key: key_of(&remote), lease_id: remote.remote_lease_id_at_owner }).await?;
        self.settle_from(remote, owner, answer).await
    }

    /// Takes an owner's answer to `Status` or `End`: once it carries a settlement, checks it,
    /// charges the hold, countersigns, journals and hands the countersignature back.
    async fn settle_from(&self, remote: v1::RemoteLease, owner: PeerId, answer: Answer) -> Result<v1::RemoteLease, RequestError> {
        let settlement = match answer {
            Answer::Status { settlement: Some(s), .. } => s,
            Answer::Status { settlement: None, .. } => return Ok(remote),
            Answer::Refused { code, message } => return Err(RequestError::Refused { code, message }),
            other => return Err(RequestError::Refused { code: "INTERNAL".into(), message: format!("an unexpected answer: {other:?}") }),
        };
        let countersigned = self.check_and_countersign(&remote, owner, settlement)?;
        // Journalled before the money moves: a crash in between leaves the remote lease live,
        // and the next round settles it again (the journal keeps one record per lease).
        self.journal
            .record(countersigned.clone(), &self.node.membership())
            .map_err(|e| RequestError::Broker { code: "INTERNAL".into(), message: e.to_string() })?;
        // What is charged is what was journalled first (a settlement seen again after a crash
        // is the same record; the owner never signs two amounts for one lease).
        let countersigned = self.journal.get(&countersigned.settlement.owner, countersigned.settlement.owner_lease).unwrap_or(countersigned);
        let ended = self
            .broker()
            .await?
            .end_remote_lease(v1::EndRemoteLeaseRequest {
                request_id: format!("gw-settle-{}", remote.remote_lease_id),
                remote_lease_id: remote.remote_lease_id,
                charged_minor: countersigned.settlement.charged_minor,
            })
            .await
            .map_err(|s| RequestError::broker(&s))?
            .into_inner();
        self.deliver(owner, countersigned).await;
        Ok(ended)
    }

    /// The owner's settlement is about this remote lease, within its hold, and signed by the
    /// owner; returns it countersigned.
    fn check_and_countersign(&self, remote: &v1::RemoteLease, owner: PeerId, settlement: SignedSettlement) -> Result<SignedSettlement, RequestError> {
        let s = &settlement.settlement;
        let held = remote.held.clone().unwrap_or_default();
        let mismatch = if s.owner != owner.to_base58() || s.requester != self.node.peer_id().to_base58() {
            Some("names other members")
        } else if s.owner_lease != remote.remote_lease_id_at_owner || s.requester_key != key_of(remote) {
            Some("is for another lease")
        } else if s.currency != held.currency || s.charged_minor > held.minor {
            Some("charges more than was held")
        } else {
            None
        };
        if let Some(why) = mismatch {
            return Err(RequestError::Refused { code: "INVALID_ARGUMENT".into(), message: format!("the owner's settlement {why}") });
        }
        settlement.verify(&self.node.membership(), false).map_err(|e| RequestError::Refused { code: "INVALID_ARGUMENT".into(), message: e.to_string() })?;
        settlement.countersign(&self.key).map_err(|e| RequestError::Invalid(e.to_string()))
    }

    async fn deliver(&self, owner: PeerId, settlement: SignedSettlement) {
        let key = (settlement.settlement.owner.clone(), settlement.settlement.owner_lease);
        match self.node.call(owner, Call::Countersign { settlement }).await {
            Ok(Answer::Countersigned) => {
                self.delivered.lock().unwrap_or_else(|p| p.into_inner()).insert(key);
            }
            other => tracing::warn!(%owner, ?other, "the countersignature was not taken; it is sent again"),
        }
    }

    /// One reconciliation round: every live remote lease is asked about (a requested one
    /// again, an active one for its status), ended ones settled; countersignatures the owners
    /// may lack are sent again. Failures are logged and retried next round.
    pub async fn reconcile(&self) {
        let mut broker = match self.broker().await {
            Ok(b) => b,
            Err(e) => return tracing::warn!(error = %e, "reconcile: the broker"),
        };
        let live = suanli_proto::client::all_pages(|after| {
            let mut c = broker.clone();
            async move {
                let page = c
                    .list_remote_leases(v1::ListRemoteLeasesRequest {
                        researcher_id: 0,
                        live_only: true,
                        page_after_id: after,
                        page_size: suanli_proto::client::LARGEST_PAGE,
                    })
                    .await?
                    .into_inner();
                Ok((page.remote_leases, page.next_page_after_id))
            }
        })
        .await;
        let live = match live {
            Ok(l) => l,
            Err(s) => return tracing::warn!(error = %s, "reconcile: listing remote leases"),
        };
        for remote in live {
            let Ok(owner) = remote.member.parse::<PeerId>() else { continue };
            let id = remote.remote_lease_id;
            let outcome = if remote.state == v1::RemoteLeaseState::Requested as i32 {
                self.ask_owner(&mut broker, remote).await.map(drop)
            } else {
                match self.call(id, owner, Call::Status { key: key_of(&remote), lease_id: remote.remote_lease_id_at_owner }).await {
                    Ok(answer) => self.settle_from(remote, owner, answer).await.map(drop),
                    Err(e) => Err(e),
                }
            };
            if let Err(e) = outcome {
                tracing::debug!(remote = id, error = %e, "reconcile");
            }
        }
        let me = self.node.peer_id().to_base58();
        for settlement in self.journal.all().into_iter().filter(|s| s.settlement.requester == me) {
            let key = (settlement.settlement.owner.clone(), settlement.settlement.owner_lease);
            if self.delivered.lock().unwrap_or_else(|p| p.into_inner()).contains(&key) {
                continue;
            }
            if let Ok(owner) = settlement.settlement.owner.parse::<PeerId>() {
                self.deliver(owner, settlement).await;
            }
        }
    }

    /// Remote leases whose owner did not answer, and for how long.
    pub fn unreachable_for(&self, id: u64) -> Option<Duration> {
        self.unreachable.lock().unwrap_or_else(|p| p.into_inner()).get(&id).map(|since| since.elapsed())
    }

    /// How far this member's settling lags, at `now_ms` (Unix milliseconds): for `/metrics`.
    pub fn backlog(&self, now_ms: i64) -> Backlog {
        let me = self.node.peer_id().to_base58();
        let delivered = self.delivered.lock().unwrap_or_else(|p| p.into_inner()).clone();
        let mut backlog = undelivered(&self.journal.all(), &delivered, &me, now_ms);
        let unreachable = self.unreachable.lock().unwrap_or_else(|p| p.into_inner());
        backlog.owner_unreachable = unreachable.len();
        backlog.longest_unreachable = unreachable.values().map(|since| since.elapsed()).max().unwrap_or_default();
        backlog
    }
}

/// What settling has not finished: countersignatures owners have not confirmed taking (their
/// journals lack the record, so the two members' reports disagree), and remote leases whose
/// owner does not answer (the researcher's hold waits).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Backlog {
    pub undelivered: usize,
    /// Since the oldest undelivered settlement's lease ended.
    pub oldest_undelivered: Duration,
    pub owner_unreachable: usize,
    pub longest_unreachable: Duration,
}

impl Backlog {
    /// Prometheus' text format (`suanli_gateway_*`: the gateway's own series, beside the
    /// federation node's `suanli_federation_*`).
    pub fn metrics_text(&self) -> String {
        let gauge = |name: &str, help: &str, value: String| {
            format!("# HELP suanli_gateway_{name} {help}.\n# TYPE suanli_gateway_{name} gauge\nsuanli_gateway_{name} {value}\n")
        };
        [
            gauge("settlements_undelivered", "Settlements this member countersigned that their owner has not confirmed taking", self.undelivered.to_string()),
            gauge(
                "settlement_undelivered_oldest_seconds",
                "Seconds since the lease of the oldest undelivered settlement ended (0: none)",
                format!("{:.3}", self.oldest_undelivered.as_secs_f64()),
            ),
            gauge("remote_leases_owner_unreachable", "Remote leases whose owning member does not answer", self.owner_unreachable.to_string()),
            gauge(
                "remote_lease_unreachable_longest_seconds",
                "Seconds the longest-unanswered remote lease's owner has not answered (0: none)",
                format!("{:.3}", self.longest_unreachable.as_secs_f64()),
            ),
        ]
        .concat()
    }
}

/// The settlements `me` countersigned as requester that are not in `delivered`.
fn undelivered(journal: &[SignedSettlement], delivered: &std::collections::BTreeSet<(String, u64)>, me: &str, now_ms: i64) -> Backlog {
    let waiting: Vec<&SignedSettlement> =
        journal.iter().filter(|s| s.settlement.requester == me && !delivered.contains(&(s.settlement.owner.clone(), s.settlement.owner_lease))).collect();
    let oldest_end = waiting.iter().map(|s| s.settlement.ended_at_ms).min();
    Backlog {
        undelivered: waiting.len(),
        oldest_undelivered: oldest_end.map_or(Duration::ZERO, |end| Duration::from_millis(now_ms.saturating_sub(end).max(0) as u64)),
        ..Backlog::default()
    }
}

/// This member's broker request ID for a researcher's idempotency key: scoped to the
/// researcher (two researchers' keys never meet) and hashed, so no key a researcher picks can
/// be one of the gateway's own request IDs (`gw-…`).
fn researcher_request_id(researcher: u64, key: &str) -> String {
    use sha2::Digest;
    let digest = sha2::Sha256::digest(format!("{researcher}\0{key}").as_bytes());
    format!("rl-{}", hex::encode(&digest[..24]))
}

/// The key a remote lease is known by at its owner: its ID here (unique in this member).
fn key_of(remote: &v1::RemoteLease) -> String {
    format!("rlease-{}", remote.remote_lease_id)
}

fn mode_name(raw: i32) -> &'static str {
    match v1::BillingMode::try_from(raw) {
        Ok(v1::BillingMode::Hourly) => "hourly",
        Ok(v1::BillingMode::Daily) => "daily",
        Ok(v1::BillingMode::Monthly) => "monthly",
        Ok(v1::BillingMode::Yearly) => "yearly",
        _ => "unspecified",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use suanli_federation::calls::Settlement;

    fn settled(owner: &str, requester: &str, lease: u64, ended_at_ms: i64) -> SignedSettlement {
        let settlement = Settlement {
            federation: "f".into(),
            owner: owner.into(),
            owner_lease: lease,
            requester: requester.into(),
            requester_key: format!("rlease-{lease}"),
            cluster_id: 1,
            currency: "CNY".into(),
            charged_minor: 100,
            ended_at_ms,
        };
        SignedSettlement { settlement, owner_signature: vec![1], requester_signature: vec![2] }
    }

    #[test]
    fn the_backlog_counts_this_members_undelivered_countersignatures_and_the_oldest_age() {
        let journal = [settled("city", "me", 1, 10_000), settled("city", "me", 2, 40_000), settled("city", "other", 3, 0), settled("me", "city", 4, 0)];
        let delivered = [("city".to_owned(), 1)].into_iter().collect();
        let backlog = undelivered(&journal, &delivered, "me", 100_000);
        assert_eq!(backlog.undelivered, 1, "lease 2 only: 1 was delivered, 3 and 4 are not this member's to deliver");
        assert_eq!(backlog.oldest_undelivered, Duration::from_secs(60));
        let text = backlog.metrics_text();
        assert!(text.contains("suanli_gateway_settlements_undelivered 1\n"), "{text}");
        assert!(text.contains("suanli_gateway_settlement_undelivered_oldest_seconds 60.000\n"), "{text}");
    }

    #[test]
    fn nothing_waiting_reads_zero_not_the_age_of_the_journal() {
        let journal = [settled("city", "me", 1, 10_000)];
        let delivered = [("city".to_owned(), 1)].into_iter().collect();
        assert_eq!(undelivered(&journal, &delivered, "me", 100_000), Backlog::default());
        assert!(Backlog::default().metrics_text().contains("suanli_gateway_settlement_undelivered_oldest_seconds 0.000\n"));
    }
}

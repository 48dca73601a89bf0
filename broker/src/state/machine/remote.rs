//! Leases of other federation members' cards, as the requesting member keeps them (format 5).
//!
//! The owning member alone decides over its cards, in its own Raft group; this member holds its
//! researcher's money for the lease *before* asking (so the same money never pays twice) and
//! records the answer. The money moves `Available → RemoteHeld` at request; at the end what the
//! owner charged goes to `FederationPayable` (owed to the federation until the members settle,
//! `suanli-federation settlement`) and the rest back to `Available`. Only the platform's
//! federation gateway sends these commands (a service token with the `federation` power).

use suanli_types::error::EntityKind;
use suanli_types::{AccountId, BillingMode, DomainError, LedgerAccount, Money, RemoteLeaseId, RemoteLeaseState, Timestamp, TransactionKind};

use super::{check_periods, rules, Outcome, Response, State};
use crate::state::event::Event;
use crate::state::model::RemoteLease;

/// Longest member peer ID or name a remote lease records.
pub const MAX_MEMBER_FIELD: usize = 128;
/// Most cards one remote lease may ask for.
pub const MAX_REMOTE_CARDS: u32 = 1024;

/// What `RequestRemoteLease` asks for.
pub(super) struct Request<'a> {
    pub researcher: AccountId,
    pub member: &'a str,
    pub member_name: &'a str,
    pub remote_cluster: u64,
    pub cards: u32,
    pub billing_mode: BillingMode,
    pub periods: u32,
    pub price_per_card: &'a Money,
}

/// The request's fields are well formed (checked before proposing, and again when applied).
pub(super) fn validate(member: &str, member_name: &str, cards: u32, periods: u32, price_per_card: &Money) -> Result<(), DomainError> {
    let mut problems = Vec::new();
    for (field, value) in [("member", member), ("member_name", member_name)] {
        if value.is_empty() || value.len() > MAX_MEMBER_FIELD || value.chars().any(char::is_control) {
            problems.push(suanli_types::FieldError::new(field, format!("1 to {MAX_MEMBER_FIELD} printable characters")));
        }
    }
    if cards == 0 || cards > MAX_REMOTE_CARDS {
        problems.push(suanli_types::FieldError::new("cards", format!("between 1 and {MAX_REMOTE_CARDS}")));
    }
    if price_per_card.minor <= 0 {
        problems.push(suanli_types::FieldError::new("price_per_card", "a positive amount"));
    }
    if !problems.is_empty() {
        return Err(DomainError::Invalid(problems));
    }
    check_periods(periods)
}

impl State {
    pub(super) fn request_remote_lease(&mut self, r: Request<'_>, at: Timestamp, events: &mut Vec<Event>) -> Outcome {
        validate(r.member, r.member_name, r.cards, r.periods, r.price_per_card)?;
        let account = self.accounts.get(&r.researcher).ok_or(DomainError::not_found(EntityKind::Account, r.researcher))?;
        if account.kind != suanli_types::AccountKind::Researcher {
            return Err(DomainError::WrongAccountKind(r.researcher, suanli_types::AccountKind::Researcher));
        }
        let live = self.remote_leases.values().filter(|l| l.researcher == r.researcher && l.state.is_live()).count();
        if live >= rules::MAX_LIVE_REMOTE_LEASES_PER_RESEARCHER {
            return Err(DomainError::invalid(
                "researcher",
                format!("at most {} leases of other members' cards at once", rules::MAX_LIVE_REMOTE_LEASES_PER_RESEARCHER),
            ));
        }
        let total = r.price_per_card.minor as i128 * r.cards as i128 * r.periods as i128;
        let held = i64::try_from(total).map_err(|_| DomainError::invalid("periods", "the total price is out of range"))?;
        let currency = r.price_per_card.currency.clone();
        self.check_funds(r.researcher, &currency, held)?;
        let id = RemoteLeaseId(self.next());
        self.post(
            TransactionKind::Hold,
            &currency,
            None,
            vec![(LedgerAccount::Available(r.researcher), -held), (LedgerAccount::RemoteHeld(r.researcher), held)],
            at,
            events,
        );
        let lease = RemoteLease {
            id,
            researcher: r.researcher,
            member: r.member.to_owned(),
            member_name: r.member_name.to_owned(),
            remote_cluster: r.remote_cluster,
            remote_lease: None,
            cards: r.cards,
            billing_mode: r.billing_mode,
            periods: r.periods,
            price_per_card: r.price_per_card.clone(),
            held: Money::new(currency, held),
            state: RemoteLeaseState::Requested,
            requested_at: at,
            ended_at: None,
            charged_minor: 0,
        };
        events.push(Event::RemoteLeaseChanged { remote: id, researcher: r.researcher, state: lease.state });
        self.remote_leases.insert(id, lease.clone());
        Ok(Response::RemoteLease(Box::new(lease)))
    }

    pub(super) fn confirm_remote_lease(&mut self, id: RemoteLeaseId, remote_lease: u64, events: &mut Vec<Event>) -> Outcome {
        let l = self.remote_leases.get_mut(&id).ok_or(DomainError::not_found(EntityKind::RemoteLease, id))?;
        match (l.state, l.remote_lease) {
            (RemoteLeaseState::Requested, _) => {}
            // The same answer again (a retried confirmation): nothing changes.
            (RemoteLeaseState::Active, Some(known)) if known == remote_lease => return Ok(Response::RemoteLease(Box::new(l.clone()))),
            _ => return Err(DomainError::invalid("remote", format!("{id} is {}; only a requested one is confirmed", l.state.as_str()))),
        }
        l.state = RemoteLeaseState::Active;
        l.remote_lease = Some(remote_lease);
        events.push(Event::RemoteLeaseChanged { remote: id, researcher: l.researcher, state: l.state });
        Ok(Response::RemoteLease(Box::new(l.clone())))
    }

    pub(super) fn end_remote_lease(&mut self, id: RemoteLeaseId, charged: i64, at: Timestamp, events: &mut Vec<Event>) -> Outcome {
        let l = self.remote_leases.get(&id).ok_or(DomainError::not_found(EntityKind::RemoteLease, id))?;
        if !l.state.is_live() {
            return Err(DomainError::invalid("remote", format!("{id} has ended")));
        }
        if charged < 0 || charged > l.held.minor {
            return Err(DomainError::invalid("charged_minor", format!("between 0 and what was held ({})", l.held.minor)));
        }
        let (researcher, held, currency) = (l.researcher, l.held.minor, l.held.currency.clone());
        if charged > 0 {
            self.post(
                TransactionKind::Charge,
                &currency,
                None,
                vec![(LedgerAccount::RemoteHeld(researcher), -charged), (LedgerAccount::FederationPayable, charged)],
                at,
                events,
            );
        }
        if held > charged {
            self.post(
                TransactionKind::Refund,
                &currency,
                None,
                vec![(LedgerAccount::RemoteHeld(researcher), -(held - charged)), (LedgerAccount::Available(researcher), held - charged)],
                at,
                events,
            );
        }
        let l = self.remote_leases.get_mut(&id).ok_or(DomainError::not_found(EntityKind::RemoteLease, id))?;
        l.state = RemoteLeaseState::Ended;
        l.ended_at = Some(at);
        l.charged_minor = charged;
        events.push(Event::RemoteLeaseChanged { remote: id, researcher, state: l.state });
        Ok(Response::RemoteLease(Box::new(l.clone())))
    }

    pub fn remote_lease(&self, id: RemoteLeaseId) -> Option<&RemoteLease> {
        self.remote_leases.get(&id)
    }

    /// Remote leases after `after` in ID order.
    pub fn remote_leases_after(&self, after: u64) -> impl Iterator<Item = &RemoteLease> {
        self.remote_leases.range(RemoteLeaseId(after.saturating_add(1))..).map(|(_, l)| l)
    }

    /// What each researcher's `RemoteHeld` balance says equals what their live remote leases
    /// hold; nothing charged beyond a hold.
    pub(super) fn check_remote_lease_invariants(&self) -> Result<(), String> {
        let mut held: std::collections::BTreeMap<(AccountId, &suanli_types::Currency), i64> = Default::default();
        for l in self.remote_leases.values() {
            if l.charged_minor < 0 || l.charged_minor > l.held.minor {
                return Err(format!("{} charged {} of a hold of {}", l.id, l.charged_minor, l.held.minor));
            }
            if l.state.is_live() {
                *held.entry((l.researcher, &l.held.currency)).or_default() += l.held.minor;
            }
        }
        for ((account, currency), balance) in &self.balances {
            match account {
                LedgerAccount::RemoteHeld(a) => {
                    let want = held.get(&(*a, currency)).copied().unwrap_or(0);
                    if *balance != want {
                        return Err(format!("{account} is {balance} {currency}, its live remote leases hold {want}"));
                    }
                }
                LedgerAccount::FederationPayable if *balance < 0 => return Err(format!("{account} is negative: {balance} {currency}")),
                _ => {}
            }
        }
        Ok(())
    }
}

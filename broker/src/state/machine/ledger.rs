//! Money: prepaid balances, holds, metered charges, refunds and service credits, as a
//! double-entry ledger.
//!
//! A lease's price is held from the researcher's available balance when it is requested (and
//! when it is extended), so two requests can never spend the same money. While the lease is
//! active its use is charged from the hold — per card-millisecond of healthy cards, at the
//! price snapshot taken at request — in batches (`SettleLeases`) rather than one write per
//! second. Each lease's charge is recomputed from its start every time, *cumulatively*, and
//! only the difference is posted: rounding happens once per lease, never accumulates, and the
//! sum of a lease's charge lines is exactly the rounded charge of its whole use. When the lease
//! ends, whatever is left of the hold goes back: the part that paid for time a card had dropped
//! off as a service credit, the rest as a refund.
//!
//! The rules, all here:
//! - **Accounts** (vocabulary in `crates/types/src/ledger.rs`): `available:<researcher>`,
//!   `held:<researcher>`, `earnings:<supplier>`, `platform_fees`, `funding`, and for leases of
//!   other federation members' cards `remote_held:<researcher>` and `federation_payable`; every
//!   transaction sums to zero; money is integer minor units.
//! - **Prepaid.** A request (or extension) the balance plus granted credit cannot cover is
//!   `INSUFFICIENT_FUNDS` and changes nothing.
//! - **Metered** per healthy card-millisecond: the leader's reaper proposes one `SettleLeases` a
//!   minute for all active leases; charge = price × healthy card-ms / period, rounded half up
//!   once, posted as the difference from what was charged. The platform fee (10 %) is computed
//!   the same cumulative way; earnings go to the supplier.
//! - **Class B evaluation** at lease end: uptime = healthy card-time / card-time (bps); cards
//!   dropped; utilization = card-time jobs ran / card-time. Score = uptime % − 10 × cards
//!   dropped, within 0–100; a supplier's reliability is the mean of its last 50 scores.
//! - **Per-job cost**: each attempt's card-ms at each card's lease price, rounded once per
//!   attempt (over a common denominator of all billing periods).
//! - **Statements** (`GetStatement`, per UTC month): opening, deposits, charged, refunded,
//!   credited, earned, closing, a line per lease and the cost of each job that ended in it.

use std::collections::BTreeMap;

use suanli_types::error::EntityKind;
use suanli_types::ledger::PLATFORM_FEE_BPS;
use suanli_types::money::round_half_up;
use suanli_types::{
    AccountId, AccountKind, CardHealth, CardId, ClusterClass, Currency, DomainError, Entry, JobEndReason, LeaseId, LeaseState, LedgerAccount, Money, Month,
    Timestamp, Transaction, TransactionKind,
};

use super::{Outcome, Response, State};
use crate::state::event::Event;
use crate::state::model::{LeaseAccount, ServiceEvaluation};

/// The largest single deposit or credit line: 100 million CNY.
pub const MAX_DEPOSIT_MINOR: i64 = 10_000_000_000;
/// Leases one `SettleLeases` command may name.
pub const MAX_SETTLEMENTS_PER_COMMAND: usize = 10_000;
/// A supplier's reliability score is the mean of its last this many evaluations.
pub const RELIABILITY_WINDOW: usize = 50;

impl State {
    pub(super) fn deposit(&mut self, account: AccountId, amount: &Money, at: Timestamp, events: &mut Vec<Event>) -> Outcome {
        self.researcher(account)?;
        check_amount("amount", amount.minor)?;
        let tx = self.post(
            TransactionKind::Deposit,
            &amount.currency,
            None,
            vec![(LedgerAccount::Funding, -amount.minor), (LedgerAccount::Available(account), amount.minor)],
            at,
            events,
        );
        Ok(Response::Transaction(Box::new(tx)))
    }

    pub(super) fn grant_credit(&mut self, account: AccountId, limit: &Money) -> Outcome {
        self.researcher(account)?;
        if limit.minor != 0 {
            check_amount("limit", limit.minor)?;
        }
        self.credit_limits.insert((account, limit.currency.clone()), limit.minor);
        Ok(Response::Empty)
    }

    fn researcher(&self, account: AccountId) -> Result<(), DomainError> {
        let acc = self.accounts.get(&account).ok_or(DomainError::not_found(EntityKind::Account, account))?;
        if acc.kind != AccountKind::Researcher {
            return Err(DomainError::WrongAccountKind(account, AccountKind::Researcher));
        }
        Ok(())
    }

    /// Refuses a hold the researcher's balance and credit cannot cover; changes nothing.
    pub(super) fn check_funds(&self, researcher: AccountId, currency: &Currency, needed: i64) -> Result<(), DomainError> {
        let available =
            self.balance(LedgerAccount::Available(researcher), currency) + self.credit_limits.get(&(researcher, currency.clone())).copied().unwrap_or(0);
        if needed > available {
            return Err(DomainError::InsufficientFunds { needed, available: available.max(0) });
        }
        Ok(())
    }

    /// Holds `minor` for `lease` (checked with [`check_funds`] first).
    pub(super) fn hold(&mut self, lease: LeaseId, researcher: AccountId, currency: &Currency, minor: i64, at: Timestamp, events: &mut Vec<Event>) {
        self.lease_accounts.entry(lease).or_default().held_minor += minor;
        self.post(
            TransactionKind::Hold,
            currency,
            Some(lease),
            vec![(LedgerAccount::Available(researcher), -minor), (LedgerAccount::Held(researcher), minor)],
            at,
            events,
        );
    }

    pub(super) fn settle_leases(&mut self, leases: &[LeaseId], at: Timestamp, events: &mut Vec<Event>) -> Outcome {
        if leases.len() > MAX_SETTLEMENTS_PER_COMMAND {
            return Err(DomainError::invalid("leases", format!("at most {MAX_SETTLEMENTS_PER_COMMAND} per call")));
        }
        for lease in leases {
            if self.leases.get(lease).is_some_and(|l| l.state == LeaseState::Active) {
                self.settle(*lease, at, events);
            }
        }
        Ok(Response::Empty)
    }

    /// The lease's charge for its use from activation to `until` (capped at its paid term).
    fn cumulative_charge(&self, lease: LeaseId, until: Timestamp) -> Option<(i64, i64, Timestamp)> {
        let l = self.leases.get(&lease)?;
        let account = self.lease_accounts.get(&lease)?;
        let start = l.activated_at?;
        let end = until.min(l.paid_until.unwrap_or(until)).max(start);
        let total = end.millis_since(start) as i128 * l.cards.len() as i128;
        let open: i128 = account.down_since.values().map(|since| end.millis_since((*since).max(start)) as i128).sum();
        let billable = (total - account.down_card_ms as i128 - open).max(0);
        let period_ms = l.billing_mode.period_seconds() as i128 * 1000;
        let charge = round_half_up(l.price_per_card.minor as i128 * billable, period_ms);
        let charge = i64::try_from(charge).unwrap_or(i64::MAX).min(account.held_minor);
        let fee = i64::try_from(round_half_up(charge as i128 * PLATFORM_FEE_BPS as i128, 10_000)).unwrap_or(0);
        Some((charge, fee, end))
    }

    /// Posts what the lease's use up to `at` costs beyond what was already charged.
    fn settle(&mut self, lease: LeaseId, at: Timestamp, events: &mut Vec<Event>) {
        let Some((charge, fee, end)) = self.cumulative_charge(lease, at) else { return };
        let Some(l) = self.leases.get(&lease) else { return };
        let (researcher, supplier, currency) = (l.researcher, l.supplier, l.price_per_card.currency.clone());
        let Some(account) = self.lease_accounts.get_mut(&lease) else { return };
        let (delta_charge, delta_fee) = (charge - account.charged_minor, fee - account.fee_minor);
        account.settled_until = Some(end);
        if delta_charge <= 0 && delta_fee == 0 {
            return;
        }
        account.charged_minor = charge;
        account.fee_minor = fee;
        self.post(
            TransactionKind::Charge,
            &currency,
            Some(lease),
            vec![
                (LedgerAccount::Held(researcher), -delta_charge),
                (LedgerAccount::Earnings(supplier), delta_charge - delta_fee),
                (LedgerAccount::PlatformFees, delta_fee),
            ],
            at,
            events,
        );
    }

    /// A lease ended or was cancelled: charge its last use, return the rest of the hold and,
    /// for an active Class B lease, record its service evaluation.
    pub(super) fn close_lease_account(&mut self, lease: LeaseId, was_active: bool, at: Timestamp, events: &mut Vec<Event>) {
        if was_active {
            self.settle(lease, at, events);
        }
        let Some(l) = self.leases.get(&lease) else { return };
        let (researcher, currency, class) = (l.researcher, l.price_per_card.currency.clone(), l.class);
        let (price, period_ms) = (l.price_per_card.minor as i128, l.billing_mode.period_seconds() as i128 * 1000);
        let (activated, paid_until, cards) = (l.activated_at, l.paid_until, l.cards.len() as u64);
        let Some(account) = self.lease_accounts.get_mut(&lease) else { return };
        let end = at.min(paid_until.unwrap_or(at));
        for (_, since) in std::mem::take(&mut account.down_since) {
            account.down_card_ms += end.millis_since(since.max(activated.unwrap_or(since)));
        }
        let remaining = account.held_minor - account.charged_minor;
        let credit_value = i64::try_from(round_half_up(price * account.down_card_ms as i128, period_ms)).unwrap_or(i64::MAX);
        let credit = credit_value.min(remaining).max(0);
        let refund = remaining - credit;
        let evaluation = match (was_active, class, activated) {
            (true, ClusterClass::B, Some(start)) => {
                let total = end.millis_since(start) * cards;
                Some(evaluate(lease, total, account))
            }
            _ => None,
        };
        for (kind, minor) in [(TransactionKind::ServiceCredit, credit), (TransactionKind::Refund, refund)] {
            if minor > 0 {
                self.post(
                    kind,
                    &currency,
                    Some(lease),
                    vec![(LedgerAccount::Held(researcher), -minor), (LedgerAccount::Available(researcher), minor)],
                    at,
                    events,
                );
            }
        }
        if let Some(mut evaluation) = evaluation {
            evaluation.at = at;
            if let Some(l) = self.leases.get(&lease) {
                evaluation.supplier = l.supplier;
            }
            events.push(Event::LeaseEvaluated { lease, supplier: evaluation.supplier, score: evaluation.score });
            self.evaluations_by_supplier.entry(evaluation.supplier).or_default().push(lease);
            self.evaluations.insert(lease, evaluation);
        }
    }

    /// Health of a card changed: its active lease stops or resumes paying for it, and the
    /// jobs on it must leave it when it is no longer healthy.
    pub(super) fn note_card_health(&mut self, card: CardId, to: CardHealth, at: Timestamp, events: &mut Vec<Event>) {
        let Some(lease) = self.cards.get(&card).and_then(|c| c.lease) else { return };
        let Some(l) = self.leases.get(&lease).filter(|l| l.state == LeaseState::Active) else { return };
        let paid_until = l.paid_until.unwrap_or(at);
        let Some(account) = self.lease_accounts.get_mut(&lease) else { return };
        if to == CardHealth::Healthy {
            if let Some(since) = account.down_since.remove(&card) {
                account.down_card_ms += at.min(paid_until).millis_since(since);
            }
        } else {
            account.down_since.entry(card).or_insert(at);
            account.cards_dropped.insert(card);
            self.evict_jobs_from(card, JobEndReason::CardLost(card), at, events);
        }
    }

    /// The lease became active: metering starts, and cards already unhealthy are not charged.
    pub(super) fn open_lease_account(&mut self, lease: LeaseId, at: Timestamp) {
        let Some(l) = self.leases.get(&lease) else { return };
        let down: Vec<CardId> = l.cards.iter().copied().filter(|c| self.cards.get(c).is_some_and(|c| c.health != CardHealth::Healthy)).collect();
        let account = self.lease_accounts.entry(lease).or_default();
        account.settled_until = Some(at);
        for card in down {
            account.down_since.insert(card, at);
            account.cards_dropped.insert(card);
        }
    }

    pub(super) fn post(
        &mut self,
        kind: TransactionKind,
        currency: &Currency,
        lease: Option<LeaseId>,
        entries: Vec<(LedgerAccount, i64)>,
        at: Timestamp,
        events: &mut Vec<Event>,
    ) -> Transaction {
        let id = self.ledger_archived + self.transactions.len() as u64 + 1;
        let entries: Vec<Entry> = entries.into_iter().filter(|(_, m)| *m != 0).map(|(account, minor)| Entry { account, minor }).collect();
        for e in &entries {
            *self.balances.entry((e.account, currency.clone())).or_insert(0) += e.minor;
            if let Some(holder) = e.account.holder() {
                let list = self.transactions_by_holder.entry(holder).or_default();
                if list.last() != Some(&id) {
                    list.push(id);
                }
            }
        }
        let account = entries.iter().find_map(|e| match e.account {
            LedgerAccount::Available(a) | LedgerAccount::Held(a) | LedgerAccount::RemoteHeld(a) => Some(a),
            _ => None,
        });
        let tx = Transaction { id, at, kind, currency: currency.clone(), lease, job: None, entries };
        self.transactions.push(tx.clone());
        events.push(Event::Ledger { transaction: id, kind, lease, account });
        tx
    }

    // ---- reads -------------------------------------------------------------------------------

    pub fn balance(&self, account: LedgerAccount, currency: &Currency) -> i64 {
        self.balances.get(&(account, currency.clone())).copied().unwrap_or(0)
    }

    pub fn balances(&self) -> &BTreeMap<(LedgerAccount, Currency), i64> {
        &self.balances
    }

    pub fn credit_limit(&self, account: AccountId, currency: &Currency) -> i64 {
        self.credit_limits.get(&(account, currency.clone())).copied().unwrap_or(0)
    }

    /// The hot ledger: lines after the archived ones ([`State::ledger_archived`]).
    pub fn transactions(&self) -> &[Transaction] {
        &self.transactions
    }

    /// Transactions touching `holder`'s accounts, oldest first, optionally within a month.
    pub fn transactions_of(&self, holder: AccountId, month: Option<Month>) -> Vec<&Transaction> {
        let bounds = month.map(Month::bounds);
        self.transactions_by_holder
            .get(&holder)
            .into_iter()
            .flatten()
            .filter_map(|id| self.transactions.get(id.wrapping_sub(self.ledger_archived + 1) as usize))
            .filter(|tx| bounds.is_none_or(|(start, end)| tx.at >= start && tx.at < end))
            .collect()
    }

    pub fn lease_account(&self, lease: LeaseId) -> Option<&LeaseAccount> {
        self.lease_accounts.get(&lease)
    }

    /// Active leases not charged for at least `min_age_ms`: the leader's settlement work list.
    pub fn due_for_settlement(&self, now: Timestamp, min_age_ms: u64) -> Vec<LeaseId> {
        self.live_leases
            .keys()
            .filter(|id| self.leases.get(id).is_some_and(|l| l.state == LeaseState::Active))
            .filter(|id| self.lease_accounts.get(id).and_then(|a| a.settled_until).is_none_or(|s| now.millis_since(s) >= min_age_ms))
            .copied()
            .collect()
    }

    pub fn evaluation(&self, lease: LeaseId) -> Option<&ServiceEvaluation> {
        self.evaluations.get(&lease)
    }

    /// Mean score of the supplier's last [`RELIABILITY_WINDOW`] evaluations; `None` before
    /// its first evaluated lease.
    pub fn reliability(&self, supplier: AccountId) -> Option<(u32, usize)> {
        let leases = self.evaluations_by_supplier.get(&supplier)?;
        let recent: Vec<u32> = leases.iter().rev().take(RELIABILITY_WINDOW).filter_map(|l| self.evaluations.get(l)).map(|e| e.score).collect();
        if recent.is_empty() {
            return None;
        }
        Some(((recent.iter().sum::<u32>() as f64 / recent.len() as f64).round() as u32, recent.len()))
    }

    pub(super) fn check_ledger_invariants(&self) -> Result<(), String> {
        let mut sums: BTreeMap<&Currency, i128> = BTreeMap::new();
        for ((account, currency), balance) in &self.balances {
            *sums.entry(currency).or_default() += *balance as i128;
            match account {
                LedgerAccount::Available(a) if *balance < -self.credit_limit(*a, currency) => {
                    return Err(format!("{account} is {balance} {currency}, below its credit"));
                }
                LedgerAccount::Held(_) | LedgerAccount::Earnings(_) | LedgerAccount::PlatformFees if *balance < 0 => {
                    return Err(format!("{account} is negative: {balance} {currency}"));
                }
                _ => {}
            }
        }
        if let Some((currency, sum)) = sums.iter().find(|(_, s)| **s != 0) {
            return Err(format!("the ledger does not balance in {currency}: {sum}"));
        }
        if let Some(tx) = self.transactions.iter().find(|tx| !tx.balanced()) {
            return Err(format!("transaction {} does not sum to zero", tx.id));
        }
        // What each researcher has held equals what their leases still hold.
        let mut held: BTreeMap<(AccountId, Currency), i64> = BTreeMap::new();
        for (id, account) in &self.lease_accounts {
            let Some(l) = self.leases.get(id) else { return Err(format!("money for unknown {id}")) };
            if account.charged_minor > account.held_minor {
                return Err(format!("{id} charged {} beyond its hold {}", account.charged_minor, account.held_minor));
            }
            if l.state.is_live() {
                *held.entry((l.researcher, l.price_per_card.currency.clone())).or_default() += account.held_minor - account.charged_minor;
            }
        }
        for ((account, currency), balance) in &self.balances {
            if let LedgerAccount::Held(a) = account {
                let want = held.get(&(*a, currency.clone())).copied().unwrap_or(0);
                if *balance != want {
                    return Err(format!("{account} is {balance} {currency}, its live leases hold {want}"));
                }
            }
        }
        Ok(())
    }
}

/// SPEC §3 evaluation of a Class B lease. `uptime` is healthy card-time over all card-time of
/// the active period; `utilization` is the card-time scheduled jobs ran over the same. The
/// score is what the supplier controls: uptime in percent, minus 10 per card that dropped
/// off, within 0–100 (utilization is the researcher's business and only reported).
fn evaluate(lease: LeaseId, total_card_ms: u64, account: &LeaseAccount) -> ServiceEvaluation {
    let bps = |part: u64| if total_card_ms == 0 { 10_000 } else { (part.min(total_card_ms) as u128 * 10_000 / total_card_ms as u128) as u32 };
    let uptime_bps = bps(total_card_ms.saturating_sub(account.down_card_ms));
    let cards_dropped = account.cards_dropped.len() as u32;
    let score = (uptime_bps / 100).saturating_sub(10 * cards_dropped).min(100);
    ServiceEvaluation {
        lease,
        supplier: AccountId(0),
        uptime_bps,
        cards_dropped,
        utilization_bps: bps(account.job_card_ms),
        score,
        at: Timestamp::from_millis(0),
    }
}

fn check_amount(field: &str, minor: i64) -> Result<(), DomainError> {
    if minor <= 0 || minor > MAX_DEPOSIT_MINOR {
        return Err(DomainError::invalid(field, format!("between 1 and {MAX_DEPOSIT_MINOR} minor units")));
    }
    Ok(())
}

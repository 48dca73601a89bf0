//! Indexes derived from the rest of the state, so the questions asked on every request cost
//! the same in a market of ten clusters and of ten thousand: how many cards of a cluster are
//! idle (the catalogue, auto-leasing), the listed Class B clusters by price (auto-leasing takes
//! the cheapest), how many leases a researcher has waiting, whether a job already holds an
//! auto-lease.
//!
//! Never stored and never sent: a snapshot or an older format deserializes without them and
//! they are rebuilt from what was stored (`rebuild_indexes`) before the first command applies.
//! Until then reads fall back to scanning, so a state is never answered from an index that
//! does not describe it. `check_invariants` compares every index with a rebuild.

use std::collections::{BTreeMap, BTreeSet};

use suanli_types::{AccountId, BillingMode, CardId, CardStatus, ClusterClass, ClusterId, ClusterState, JobId, LeaseId, LeaseState};

use super::State;

/// How many cards a cluster has and how many of them are idle (in the market, no lease).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CardCounts {
    pub total: u32,
    pub idle: u32,
}

#[derive(Clone, Debug, Default)]
pub(super) struct Indexes {
    /// False after deserialization, until `rebuild_indexes`.
    built: bool,
    cards_by_cluster: BTreeMap<ClusterId, CardCounts>,
    /// Live leases not yet active (requested, approved), per researcher.
    waiting_by_researcher: BTreeMap<AccountId, usize>,
    /// The live lease each job leased for itself.
    auto_lease_of_job: BTreeMap<JobId, LeaseId>,
    /// Listed Class B clusters by (price per card, ID), per billing mode they offer.
    offers: BTreeMap<BillingMode, BTreeSet<(i64, ClusterId)>>,
}

/// Derived data: two states are equal when what they hold is, whether or not one of them has
/// built its indexes yet.
impl PartialEq for Indexes {
    fn eq(&self, _: &Self) -> bool {
        true
    }
}

impl Eq for Indexes {}

impl State {
    /// Builds every index from the stored fields. Called before the first command after a
    /// state is deserialized; cheap to call again (linear in the state).
    pub fn rebuild_indexes(&mut self) {
        self.index = self.computed_indexes();
    }

    pub(super) fn ensure_indexes(&mut self) {
        if !self.index.built {
            self.rebuild_indexes();
        }
    }

    fn computed_indexes(&self) -> Indexes {
        let mut index = Indexes { built: true, ..Indexes::default() };
        for cluster in self.clusters.values() {
            index.cards_by_cluster.insert(cluster.id, self.count_cards(cluster.id));
            for (mode, price) in self.offered(cluster.id) {
                index.offers.entry(mode).or_default().insert((price, cluster.id));
            }
        }
        for lease in self.live_leases.keys().filter_map(|id| self.leases.get(id)) {
            if lease.state != LeaseState::Active {
                *index.waiting_by_researcher.entry(lease.researcher).or_default() += 1;
            }
            if let Some(job) = lease.auto_for {
                index.auto_lease_of_job.insert(job, lease.id);
            }
        }
        index
    }

    /// The cluster's cards counted one by one.
    fn count_cards(&self, cluster: ClusterId) -> CardCounts {
        let cards = self.cards_of_cluster(cluster);
        CardCounts { total: cards.len() as u32, idle: cards.iter().filter(|c| c.status == CardStatus::Idle && c.lease.is_none()).count() as u32 }
    }

    /// The cluster's card counts: from the index once built, else counted.
    pub fn card_counts(&self, cluster: ClusterId) -> CardCounts {
        match self.index.built {
            true => self.index.cards_by_cluster.get(&cluster).copied().unwrap_or_default(),
            false => self.count_cards(cluster),
        }
    }

    /// What the cluster offers auto-leasing: each billing mode's price, if it is a listed
    /// Class B cluster ([`Self::reindex_offers`] needs it from before a cluster changes).
    pub(super) fn offered(&self, cluster: ClusterId) -> Vec<(BillingMode, i64)> {
        match self.clusters.get(&cluster) {
            Some(c) if c.class == ClusterClass::B && c.state == ClusterState::Listed => c.listing.prices.per_card.iter().map(|(m, p)| (*m, *p)).collect(),
            _ => Vec::new(),
        }
    }

    /// Listed Class B clusters offering `mode`, cheapest first (ties by ID).
    pub(super) fn class_b_offers(&self, mode: BillingMode) -> Box<dyn Iterator<Item = (i64, ClusterId)> + '_> {
        if self.index.built {
            return Box::new(self.index.offers.get(&mode).into_iter().flatten().copied());
        }
        let mut all: Vec<(i64, ClusterId)> =
            self.clusters.keys().flat_map(|c| self.offered(*c).into_iter().filter(|(m, _)| *m == mode).map(move |(_, price)| (price, *c))).collect();
        all.sort_unstable();
        Box::new(all.into_iter())
    }

    /// A cluster was published, re-priced or delisted: file it again by price.
    pub(super) fn reindex_offers(&mut self, cluster: ClusterId, before: &[(BillingMode, i64)]) {
        if !self.index.built {
            return;
        }
        for (mode, price) in before {
            if let Some(set) = self.index.offers.get_mut(mode) {
                set.remove(&(*price, cluster));
            }
        }
        for (mode, price) in self.offered(cluster) {
            self.index.offers.entry(mode).or_default().insert((price, cluster));
        }
    }

    /// Leases of `researcher` waiting for approval or provisioning.
    pub(super) fn waiting_leases(&self, researcher: AccountId) -> usize {
        match self.index.built {
            true => self.index.waiting_by_researcher.get(&researcher).copied().unwrap_or(0),
            false => {
                self.live_leases.keys().filter_map(|id| self.leases.get(id)).filter(|l| l.researcher == researcher && l.state != LeaseState::Active).count()
            }
        }
    }

    /// The live lease `job` leased for itself, if any.
    pub(super) fn auto_lease_of(&self, job: JobId) -> Option<LeaseId> {
        match self.index.built {
            true => self.index.auto_lease_of_job.get(&job).copied(),
            false => self.live_leases.keys().filter_map(|l| self.leases.get(l)).find(|l| l.auto_for == Some(job)).map(|l| l.id),
        }
    }

    /// A cluster's nodes or their card lists changed: count its cards again.
    pub(super) fn recount_cluster(&mut self, cluster: ClusterId) {
        if self.index.built {
            let counts = self.count_cards(cluster);
            self.index.cards_by_cluster.insert(cluster, counts);
        }
    }

    /// A card went from idle to not idle or back.
    pub(super) fn note_idle_change(&mut self, card: CardId, was_idle: bool, is_idle: bool) {
        if !self.index.built || was_idle == is_idle {
            return;
        }
        let Some(node) = self.cards.get(&card).and_then(|c| self.nodes.get(&c.node)) else { return };
        // A card gone at a reinstall keeps its node but left its card list: it counts nowhere,
        // whatever its health later says.
        let Some(cluster) = node.cluster.filter(|_| node.cards.contains(&card)) else { return };
        if let Some(counts) = self.index.cards_by_cluster.get_mut(&cluster) {
            counts.idle = if is_idle { counts.idle + 1 } else { counts.idle.saturating_sub(1) };
        }
    }

    /// A live lease was created.
    pub(super) fn note_lease_requested(&mut self, researcher: AccountId, lease: LeaseId, auto_for: Option<JobId>) {
        if !self.index.built {
            return;
        }
        *self.index.waiting_by_researcher.entry(researcher).or_default() += 1;
        if let Some(job) = auto_for {
            self.index.auto_lease_of_job.insert(job, lease);
        }
    }

    /// A waiting lease became active.
    pub(super) fn note_lease_activated(&mut self, researcher: AccountId) {
        if self.index.built {
            self.forget_waiting(researcher);
        }
    }

    /// A live lease ended, from state `from`.
    pub(super) fn note_lease_ended(&mut self, researcher: AccountId, from: LeaseState, auto_for: Option<JobId>) {
        if !self.index.built {
            return;
        }
        if from != LeaseState::Active {
            self.forget_waiting(researcher);
        }
        if let Some(job) = auto_for {
            self.index.auto_lease_of_job.remove(&job);
        }
    }

    fn forget_waiting(&mut self, researcher: AccountId) {
        if let Some(n) = self.index.waiting_by_researcher.get_mut(&researcher) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                self.index.waiting_by_researcher.remove(&researcher);
            }
        }
    }

    /// Every built index equals one built from scratch.
    pub(super) fn check_index_invariants(&self) -> Result<(), String> {
        if !self.index.built {
            return Ok(());
        }
        let fresh = self.computed_indexes();
        for (cluster, counts) in &fresh.cards_by_cluster {
            let kept = self.index.cards_by_cluster.get(cluster).copied().unwrap_or_default();
            if kept != *counts {
                return Err(format!("{cluster} card counts out of step: index {kept:?}, counted {counts:?}"));
            }
        }
        if self.index.cards_by_cluster.len() != fresh.cards_by_cluster.len() {
            return Err("card counts kept for a cluster that does not exist".into());
        }
        if self.index.waiting_by_researcher != fresh.waiting_by_researcher {
            return Err(format!("waiting leases out of step: index {:?}, counted {:?}", self.index.waiting_by_researcher, fresh.waiting_by_researcher));
        }
        if self.index.auto_lease_of_job != fresh.auto_lease_of_job {
            return Err("auto-lease index out of step".into());
        }
        let offers =
            |o: &BTreeMap<BillingMode, BTreeSet<(i64, ClusterId)>>| o.iter().filter(|(_, s)| !s.is_empty()).map(|(m, s)| (*m, s.clone())).collect::<Vec<_>>();
        if offers(&self.index.offers) != offers(&fresh.offers) {
            return Err("price index of Class B offers out of step".into());
        }
        Ok(())
    }
}

//! The placement core. Every policy places and preempts through [`Round`], so the hard
//! invariants of the crate (owner, usability, acceptance, gang, single node, no double use,
//! card sharing, useful preemption only) are enforced here once, whatever a policy orders.
//!
//! # Index
//!
//! A job runs only on its owner's cards, so cards are split into one `Pool` per owner.
//! Inside a pool, cards fall into a few *classes* (same model, same memory); a job accepts a
//! set of classes, and such a set is indexed on first use by the number of free cards it has
//! on every node, ordered by `(free, node)` (one bitmap over nodes per free count,
//! [`NodesByFree`]). That answers "smallest node with ≥ k free acceptable cards" and "nodes
//! with the most free acceptable cards" by a walk over a few counts and nodes / 64 words, so a
//! decision does not look at every card. Every card whose state changes updates the few sets
//! that contain its class, each in O(1).
//!
//! Iteration is only ever over sorted structures (vectors sorted by id, bitmaps in node order,
//! `BTree*`); the hash maps are lookups only, so decisions never depend on hashing.

use std::cmp::Reverse;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::hash::{BuildHasherDefault, Hasher};

use suanli_types::job::limits::MAX_JOBS_PER_SHARED_CARD;
use suanli_types::{AccountId, CardId, JobId, JobSpec, NodeId, Timestamp};

use crate::model::{is_sharing, CardView, Decision, QueuedJob, RunningJob, Snapshot};

/// A lookup-only hash map with a fast deterministic hash (FxHash's multiply-rotate): the
/// keys are small ids and slices of them, chosen by the platform, not by an attacker, and
/// SipHash showed up in profiles. Never iterated, so iteration order cannot leak into
/// decisions.
pub(crate) type FastMap<K, V> = HashMap<K, V, BuildHasherDefault<FxHasher>>;

#[derive(Default)]
pub(crate) struct FxHasher(u64);

impl Hasher for FxHasher {
    fn write(&mut self, bytes: &[u8]) {
        for chunk in bytes.chunks(8) {
            let mut word = [0u8; 8];
            word[..chunk.len()].copy_from_slice(chunk);
            self.write_u64(u64::from_le_bytes(word));
        }
    }

    fn write_u64(&mut self, n: u64) {
        self.0 = (self.0.rotate_left(5) ^ n).wrapping_mul(0x51_7c_c1_b7_27_22_0a_95);
    }

    fn write_usize(&mut self, n: usize) {
        self.write_u64(n as u64);
    }

    fn finish(&self) -> u64 {
        self.0
    }
}

pub(crate) type PoolId = usize;
/// A set of card classes of one pool, indexed by free cards per node.
pub(crate) type SetId = usize;
/// A card's index in its pool; pools keep cards sorted by id, so slot order is id order.
type Slot = u32;

/// One usable card and who holds it.
struct CardSlot {
    id: CardId,
    node: u32,
    class: u32,
    /// Jobs holding the whole card (more than one only if the snapshot is inconsistent; the
    /// count keeps release and restore exact either way).
    whole: u32,
    /// Sharing jobs on the card.
    sharing: u32,
}

impl CardSlot {
    fn is_free(&self) -> bool {
        self.whole == 0 && self.sharing == 0
    }

    /// `Some(n)`: hosts `n` sharing jobs and has room for one more.
    fn open_share(&self) -> Option<u32> {
        (self.whole == 0 && self.sharing > 0 && self.sharing < MAX_JOBS_PER_SHARED_CARD).then_some(self.sharing)
    }
}

/// A set of classes a job accepts, with its free cards counted per node.
struct ClassSet {
    classes: Vec<u32>,
    member: Vec<bool>,
    free_on_node: Vec<u32>,
    /// `(free, node)` for every node with a free card of the set.
    nodes_by_free: NodesByFree,
    free_total: u32,
    capacity_total: u32,
    capacity_max_node: u32,
}

/// The ordered set of `(free, node)` pairs of a [`ClassSet`], as one bitmap over nodes per
/// free count: a node holds a handful of cards, so there are few counts, and moving a node
/// between counts (every card taken or given back) is two bit flips instead of two B-tree
/// updates. Queries walk counts, then words, in the order a `BTreeSet<(free, node)>` would.
struct NodesByFree {
    /// Per free count: a bit per node, and how many bits are set.
    buckets: Vec<(Vec<u64>, u32)>,
    words: usize,
    len: usize,
}

impl NodesByFree {
    fn new(nodes: usize) -> NodesByFree {
        NodesByFree { buckets: Vec::new(), words: nodes.div_ceil(64), len: 0 }
    }

    fn contains(&self, free: u32, node: u32) -> bool {
        self.buckets.get(free as usize).is_some_and(|(bits, _)| bits[node as usize / 64] & (1 << (node % 64)) != 0)
    }

    fn insert(&mut self, free: u32, node: u32) {
        if self.contains(free, node) {
            return;
        }
        while self.buckets.len() <= free as usize {
            self.buckets.push((vec![0; self.words], 0));
        }
        let (bits, count) = &mut self.buckets[free as usize];
        bits[node as usize / 64] |= 1 << (node % 64);
        *count += 1;
        self.len += 1;
    }

    fn remove(&mut self, free: u32, node: u32) {
        if !self.contains(free, node) {
            return;
        }
        let (bits, count) = &mut self.buckets[free as usize];
        bits[node as usize / 64] &= !(1 << (node % 64));
        *count -= 1;
        self.len -= 1;
    }

    /// The smallest pair with at least `k` free: the lowest node of the lowest such count.
    fn first_at_least(&self, k: u32) -> Option<(u32, u32)> {
        let (free, (bits, _)) = self.buckets.iter().enumerate().skip(k as usize).find(|(_, (_, count))| *count > 0)?;
        let (w, word) = bits.iter().enumerate().find(|(_, &word)| word != 0)?;
        Some((free as u32, (w * 64) as u32 + word.trailing_zeros()))
    }

    /// The largest pair.
    fn last(&self) -> Option<(u32, u32)> {
        self.iter_rev().next()
    }

    /// Every pair, largest first.
    fn iter_rev(&self) -> impl Iterator<Item = (u32, u32)> + '_ {
        self.buckets.iter().enumerate().rev().filter(|(_, (_, count))| *count > 0).flat_map(|(free, (bits, _))| {
            bits.iter().enumerate().rev().flat_map(move |(w, &word)| {
                let mut rest = word;
                std::iter::from_fn(move || {
                    if rest == 0 {
                        return None;
                    }
                    let bit = 63 - rest.leading_zeros();
                    rest &= !(1 << bit);
                    Some((free as u32, (w * 64) as u32 + bit))
                })
            })
        })
    }
}

/// One owner's usable cards.
struct Pool {
    /// Distinct models, sorted.
    models: Vec<String>,
    /// Per class: index into `models`, and memory. Classes are sorted by (model, memory).
    class_model: Vec<u32>,
    class_vram: Vec<u64>,
    /// Per (node, class), at [`Pool::cell`]: the free cards, and the count of all cards.
    /// Flat rather than per node: building a pool every round should not allocate per node.
    /// A cell's free slots are a sorted `Vec` (a node holds a handful of cards of a class):
    /// cheaper to build, update and drop than a `BTreeSet`, and iterated in the same order.
    node_count: usize,
    node_free: Vec<Vec<Slot>>,
    node_capacity: Vec<u32>,
    cards: Vec<CardSlot>,
    sets: Vec<ClassSet>,
    set_ids: BTreeMap<Vec<u32>, SetId>,
    sets_with_class: Vec<Vec<SetId>>,
    /// Per class: cards hosting sharing jobs with room left, fullest first, then by id.
    open_shared: Vec<BTreeSet<(Reverse<u32>, Slot)>>,
    free_total: u32,
    open_shared_total: u32,
}

impl Pool {
    fn build(cards: &[&CardView]) -> Pool {
        // `cards` is sorted by id and free of duplicates. Neighbouring cards are nearly always
        // on the same node with the same model, so each card's model index is looked up only
        // when it differs from the previous card's.
        let mut models: Vec<&str> = cards.iter().map(|c| c.model.as_str()).collect();
        // Neighbours nearly always share a model: dropping repeats first leaves a handful
        // of names to sort instead of one per card.
        models.dedup();
        models.sort_unstable();
        models.dedup();
        let mut model_of_card: Vec<u32> = Vec::with_capacity(cards.len());
        let mut previous: Option<(&str, u32)> = None;
        for c in cards {
            let m = match previous {
                Some((name, m)) if name == c.model => m,
                _ => models.binary_search(&c.model.as_str()).unwrap_or(0) as u32,
            };
            previous = Some((c.model.as_str(), m));
            model_of_card.push(m);
        }
        let mut classes: Vec<(u32, u64)> = cards.iter().zip(&model_of_card).map(|(c, &m)| (m, c.vram_mib)).collect();
        classes.dedup();
        classes.sort_unstable();
        classes.dedup();
        let mut nodes: Vec<NodeId> = cards.iter().map(|c| c.node).collect();
        nodes.dedup();
        nodes.sort_unstable();
        nodes.dedup();
        let mut pool = Pool {
            models: models.iter().map(|&m| m.to_owned()).collect(),
            class_model: classes.iter().map(|c| c.0).collect(),
            class_vram: classes.iter().map(|c| c.1).collect(),
            node_count: nodes.len(),
            node_free: vec![Vec::new(); nodes.len() * classes.len()],
            node_capacity: vec![0; nodes.len() * classes.len()],
            cards: Vec::with_capacity(cards.len()),
            sets: Vec::new(),
            set_ids: BTreeMap::new(),
            sets_with_class: vec![Vec::new(); classes.len()],
            open_shared: vec![BTreeSet::new(); classes.len()],
            free_total: 0,
            open_shared_total: 0,
        };
        for (c, &m) in cards.iter().zip(&model_of_card) {
            let class = classes.binary_search(&(m, c.vram_mib)).unwrap_or(0) as u32;
            let node = nodes.binary_search(&c.node).unwrap_or(0) as u32;
            let cell = pool.cell(node, class as usize);
            pool.node_capacity[cell] += 1;
            pool.cards.push(CardSlot { id: c.id, node, class, whole: 0, sharing: 0 });
        }
        pool
    }

    fn cell(&self, node: u32, class: usize) -> usize {
        node as usize * self.class_model.len() + class
    }

    /// Puts every card into the free index; called once the running jobs are recorded.
    fn index_free_cards(&mut self) {
        for slot in 0..self.cards.len() as Slot {
            let c = &self.cards[slot as usize];
            let (node, class) = (c.node, c.class as usize);
            if c.is_free() {
                let cell = self.cell(node, class);
                // Slots come in ascending order, so pushing keeps the cell sorted.
                self.node_free[cell].push(slot);
                self.free_total += 1;
            } else if let Some(n) = c.open_share() {
                self.open_shared[class].insert((Reverse(n), slot));
                self.open_shared_total += 1;
            }
        }
    }

    /// The set of `classes` (sorted), indexing it on first use.
    fn class_set(&mut self, classes: Vec<u32>) -> SetId {
        if let Some(&id) = self.set_ids.get(&classes) {
            return id;
        }
        let mut set = ClassSet {
            member: (0..self.class_model.len() as u32).map(|c| classes.contains(&c)).collect(),
            classes: classes.clone(),
            free_on_node: vec![0; self.node_count],
            nodes_by_free: NodesByFree::new(self.node_count),
            free_total: 0,
            capacity_total: 0,
            capacity_max_node: 0,
        };
        for i in 0..self.node_count {
            let free: u32 = classes.iter().map(|&c| self.node_free[self.cell(i as u32, c as usize)].len() as u32).sum();
            let capacity: u32 = classes.iter().map(|&c| self.node_capacity[self.cell(i as u32, c as usize)]).sum();
            set.free_on_node[i] = free;
            if free > 0 {
                set.nodes_by_free.insert(free, i as u32);
            }
            set.free_total += free;
            set.capacity_total += capacity;
            set.capacity_max_node = set.capacity_max_node.max(capacity);
        }
        let id = self.sets.len();
        self.sets.push(set);
        for &c in &classes {
            self.sets_with_class[c as usize].push(id);
        }
        self.set_ids.insert(classes, id);
        id
    }

    /// Applies `change` to a card's holders and keeps every index in step.
    fn update(&mut self, slot: Slot, change: impl FnOnce(&mut CardSlot)) {
        let card = &mut self.cards[slot as usize];
        let (was_free, was_open) = (card.is_free(), card.open_share());
        change(card);
        let (is_free, is_open) = (card.is_free(), card.open_share());
        let (node, class) = (card.node, card.class as usize);
        if was_free != is_free {
            self.set_free(slot, node, class, is_free);
        }
        if was_open != is_open {
            if let Some(n) = was_open {
                self.open_shared[class].remove(&(Reverse(n), slot));
                self.open_shared_total -= 1;
            }
            if let Some(n) = is_open {
                self.open_shared[class].insert((Reverse(n), slot));
                self.open_shared_total += 1;
            }
        }
    }

    fn set_free(&mut self, slot: Slot, node: u32, class: usize, free: bool) {
        let cell = self.cell(node, class);
        let Pool { node_free, sets, sets_with_class, free_total, .. } = self;
        let node_free = &mut node_free[cell];
        if free {
            if let Err(at) = node_free.binary_search(&slot) {
                node_free.insert(at, slot);
            }
            *free_total += 1;
        } else {
            if let Ok(at) = node_free.binary_search(&slot) {
                node_free.remove(at);
            }
            *free_total -= 1;
        }
        for &sid in &sets_with_class[class] {
            let set = &mut sets[sid];
            let old = set.free_on_node[node as usize];
            let new = if free { old + 1 } else { old - 1 };
            if old > 0 {
                set.nodes_by_free.remove(old, node);
            }
            if new > 0 {
                set.nodes_by_free.insert(new, node);
            }
            set.free_on_node[node as usize] = new;
            if free {
                set.free_total += 1;
            } else {
                set.free_total -= 1;
            }
        }
    }

    fn hold(&mut self, slot: Slot, sharing: bool) {
        self.update(slot, |c| if sharing { c.sharing += 1 } else { c.whole += 1 });
    }

    fn release(&mut self, slot: Slot, sharing: bool) {
        self.update(slot, |c| {
            let count = if sharing { &mut c.sharing } else { &mut c.whole };
            *count = count.saturating_sub(1);
        });
    }

    fn has_room(&self) -> bool {
        self.free_total > 0 || self.open_shared_total > 0
    }

    /// Whether `d` might fit, judged by pool totals alone (no acceptance check).
    fn might_fit(&self, cards: u32, sharing: bool) -> bool {
        if sharing {
            self.has_room()
        } else {
            self.free_total >= cards
        }
    }

    fn could_fit(&self, d: &Demand, sid: SetId) -> bool {
        let set = &self.sets[sid];
        if d.sharing {
            set.free_total > 0 || set.classes.iter().any(|&c| !self.open_shared[c as usize].is_empty())
        } else {
            d.cards > 0 && set.free_total >= d.cards && (!d.single_node || set.nodes_by_free.last().is_some_and(|(free, _)| free >= d.cards))
        }
    }

    /// Cards for a whole-card gang of `k` from `sid`, without committing them.
    ///
    /// One node if any node has `k` free: the *smallest* such node (best fit), so that big
    /// nodes stay whole for big gangs. Otherwise (when allowed) the fewest nodes: take nodes
    /// with the most free cards first, and for the remainder again the smallest node that
    /// covers it. Taking the largest first is what minimises the node count.
    fn pick_whole(&self, sid: SetId, k: u32, single_node: bool) -> Option<Vec<Slot>> {
        let set = &self.sets[sid];
        if k == 0 || set.free_total < k {
            return None;
        }
        let mut plan: Vec<(u32, u32)> = Vec::new();
        if let Some((_, node)) = set.nodes_by_free.first_at_least(k) {
            plan.push((node, k));
        } else if single_node {
            return None;
        } else {
            let mut need = k;
            for (free, node) in set.nodes_by_free.iter_rev() {
                if free >= need {
                    // Every node chosen so far sorts above (free, node), so the best fit for
                    // the remainder, which sorts at or below it, is a node not yet chosen.
                    let (_, best) = set.nodes_by_free.first_at_least(need)?;
                    plan.push((best, need));
                    need = 0;
                    break;
                }
                plan.push((node, free));
                need -= free;
            }
            if need > 0 {
                return None;
            }
        }
        let mut slots: Vec<Slot> = plan.into_iter().flat_map(|(node, take)| self.cards_on_node(sid, node, take)).collect();
        slots.sort_unstable();
        Some(slots)
    }

    /// `take` free cards of `sid` on `node`: from its most plentiful class first, so a gang
    /// stays on one model where it can (a gang runs at the pace of its slowest card).
    fn cards_on_node(&self, sid: SetId, node: u32, take: u32) -> Vec<Slot> {
        let free = |c: u32| &self.node_free[self.cell(node, c as usize)];
        let mut classes = self.sets[sid].classes.clone();
        classes.sort_by_key(|&c| (Reverse(free(c).len()), c));
        classes.iter().flat_map(|&c| free(c).iter().copied()).take(take as usize).collect()
    }

    /// A card for a sharing job: the fullest shared card with room (lowest id among equals),
    /// else a free card on the node with the fewest free cards, keeping whole cards and
    /// whole nodes for training.
    fn pick_shared(&self, sid: SetId) -> Option<Slot> {
        let set = &self.sets[sid];
        let open = set.classes.iter().filter_map(|&c| self.open_shared[c as usize].first()).min();
        match open {
            Some(&(_, slot)) => Some(slot),
            None => self.pick_whole(sid, 1, true)?.first().copied(),
        }
    }
}

/// Where each usable card sits: `(pool, slot)` by card id. Card ids are handed out in
/// sequence, so they are usually dense: then a vector indexed by `id - first` (no hashing,
/// and built with no rehashing); otherwise a hash map.
enum CardIndex {
    Dense { base: u64, at: Vec<Option<(u32, Slot)>> },
    Sparse(FastMap<CardId, (PoolId, Slot)>),
}

impl CardIndex {
    /// For `len` distinct cards whose ids run from `first` to `last`.
    fn new(first: Option<CardId>, last: Option<CardId>, len: usize) -> CardIndex {
        match (first, last) {
            (Some(first), Some(last)) if last.0 - first.0 <= 2 * len as u64 + 64 => {
                CardIndex::Dense { base: first.0, at: vec![None; (last.0 - first.0 + 1) as usize] }
            }
            (None, _) | (_, None) => CardIndex::Dense { base: 0, at: Vec::new() },
            _ => CardIndex::Sparse(FastMap::with_capacity_and_hasher(len, Default::default())),
        }
    }

    fn insert(&mut self, id: CardId, pool: PoolId, slot: Slot) {
        match self {
            CardIndex::Dense { base, at } => at[(id.0 - *base) as usize] = Some((pool as u32, slot)),
            CardIndex::Sparse(map) => {
                map.insert(id, (pool, slot));
            }
        }
    }

    fn get(&self, id: CardId) -> Option<(PoolId, Slot)> {
        match self {
            CardIndex::Dense { base, at } => {
                let i = usize::try_from(id.0.checked_sub(*base)?).ok()?;
                at.get(i).copied().flatten().map(|(pool, slot)| (pool as PoolId, slot))
            }
            CardIndex::Sparse(map) => map.get(&id).copied(),
        }
    }
}

/// What a queued job needs from its owner's pool this round.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Demand {
    pub pool: PoolId,
    /// Every class of the pool the job accepts.
    pub set: SetId,
    pub cards: u32,
    pub single_node: bool,
    pub sharing: bool,
}

/// A running job a policy is willing to preempt, with the policy's rank for it (LAS: its
/// queue). Victim lists are kept least deserving first.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Victim<'s> {
    pub job: &'s RunningJob,
    pub rank: usize,
}

/// The queued and running jobs of one pool.
pub(crate) struct Work<'s> {
    pub pool: PoolId,
    pub queued: Vec<&'s QueuedJob>,
    pub running: Vec<&'s RunningJob>,
}

/// One scheduling round: the free-card index and the decisions taken so far.
pub(crate) struct Round<'s> {
    pub now: Timestamp,
    pools: Vec<Pool>,
    pool_of_owner: FastMap<AccountId, PoolId>,
    card_at: CardIndex,
    /// Accepted class set per (pool, model wishes, memory wish): `accepts_card` looks at
    /// nothing else, and jobs overwhelmingly repeat a few wishes.
    accepted: FastMap<(PoolId, &'s [String], u64), Option<SetId>>,
    decisions: Vec<Decision>,
}

impl<'s> Round<'s> {
    pub fn new(snapshot: &'s Snapshot, now: Timestamp) -> Round<'s> {
        let mut listed: Vec<&CardView> = snapshot.cards.iter().collect();
        listed.sort_by_key(|c| c.id);
        // A card listed twice is ambiguous (which owner? which node? usable?): left out.
        let mut cards: Vec<&CardView> = Vec::with_capacity(listed.len());
        let mut i = 0;
        while i < listed.len() {
            let mut j = i + 1;
            while j < listed.len() && listed[j].id == listed[i].id {
                j += 1;
            }
            if j == i + 1 && listed[i].usable {
                cards.push(listed[i]);
            }
            i = j;
        }
        let card_at = CardIndex::new(cards.first().map(|c| c.id), cards.last().map(|c| c.id), cards.len());
        let mut by_owner: BTreeMap<AccountId, Vec<&CardView>> = BTreeMap::new();
        for c in cards {
            by_owner.entry(c.owner).or_default().push(c);
        }
        let mut round = Round {
            now,
            pools: Vec::with_capacity(by_owner.len()),
            pool_of_owner: FastMap::default(),
            card_at,
            accepted: FastMap::default(),
            decisions: Vec::new(),
        };
        for (owner, cards) in by_owner {
            let id = round.pools.len();
            let pool = Pool::build(&cards);
            for (slot, c) in pool.cards.iter().enumerate() {
                round.card_at.insert(c.id, id, slot as Slot);
            }
            round.pools.push(pool);
            round.pool_of_owner.insert(owner, id);
        }
        // Holders first, index after: the index is built from the final card states.
        for job in &snapshot.running {
            for card in &job.cards {
                if let Some((pool, slot)) = round.card_at.get(*card) {
                    let c = &mut round.pools[pool].cards[slot as usize];
                    if job.shared {
                        c.sharing += 1;
                    } else {
                        c.whole += 1;
                    }
                }
            }
        }
        for pool in &mut round.pools {
            pool.index_free_cards();
        }
        round
    }

    pub fn finish(self) -> Vec<Decision> {
        self.decisions
    }

    /// Queued and running jobs grouped by their owner's pool, in owner order. Jobs of owners
    /// without a usable card are left out: nothing can be decided for them.
    pub fn work_by_pool(&self, snapshot: &'s Snapshot) -> Vec<Work<'s>> {
        let mut work: Vec<Work<'s>> = (0..self.pools.len()).map(|pool| Work { pool, queued: Vec::new(), running: Vec::new() }).collect();
        for job in &snapshot.queued {
            if let Some(&pool) = self.pool_of_owner.get(&job.owner) {
                work[pool].queued.push(job);
            }
        }
        for job in &snapshot.running {
            if let Some(&pool) = self.pool_of_owner.get(&job.owner) {
                work[pool].running.push(job);
            }
        }
        work.retain(|w| !w.queued.is_empty());
        work
    }

    /// A free card or a shared card with room exists in the pool.
    pub fn has_room(&self, pool: PoolId) -> bool {
        self.pools[pool].has_room()
    }

    /// Free whole cards in the pool.
    pub fn free_cards(&self, pool: PoolId) -> u32 {
        self.pools[pool].free_total
    }

    /// A cheap necessary condition for placing `spec` without preemption, before the
    /// acceptance check: enough free cards in the pool at all.
    pub fn might_fit(&self, pool: PoolId, spec: &JobSpec) -> bool {
        self.might_fit_shape(pool, spec.resources.cards, is_sharing(spec))
    }

    /// [`Round::might_fit`] for a gang of `cards`, sharing or not.
    pub fn might_fit_shape(&self, pool: PoolId, cards: u32, sharing: bool) -> bool {
        self.pools[pool].might_fit(cards, sharing)
    }

    /// What `spec` needs from `pool`, or `None` when no card of the pool is acceptable.
    pub fn demand(&mut self, pool: PoolId, spec: &'s JobSpec) -> Option<Demand> {
        let r = &spec.resources;
        let key = (pool, r.gpu_models.as_slice(), r.min_vram_mib);
        let set = match self.accepted.get(&key) {
            Some(&set) => set,
            None => {
                let p = &mut self.pools[pool];
                let classes: Vec<u32> = (0..p.class_model.len() as u32)
                    .filter(|&c| {
                        let c = c as usize;
                        spec.accepts_card(&p.models[p.class_model[c] as usize], p.class_vram[c])
                    })
                    .collect();
                let set = (!classes.is_empty()).then(|| p.class_set(classes));
                self.accepted.insert(key, set);
                set
            }
        }?;
        Some(Demand { pool, set, cards: r.cards, single_node: r.single_node, sharing: is_sharing(spec) })
    }

    /// Whether `d` fits on an empty pool (else it would wait forever and must not block).
    pub fn fits_ever(&self, d: &Demand) -> bool {
        let set = &self.pools[d.pool].sets[d.set];
        if d.sharing {
            set.capacity_total > 0
        } else {
            d.cards > 0 && set.capacity_total >= d.cards && (!d.single_node || set.capacity_max_node >= d.cards)
        }
    }

    /// The models `d` accepts in its pool, each with the subset of `d.set` on that model,
    /// in model-name order.
    pub fn models_of(&mut self, d: &Demand) -> Vec<(&str, SetId)> {
        let pool = &mut self.pools[d.pool];
        let mut by_model: BTreeMap<u32, Vec<u32>> = BTreeMap::new();
        for &c in &pool.sets[d.set].classes {
            by_model.entry(pool.class_model[c as usize]).or_default().push(c);
        }
        let ids: Vec<(u32, SetId)> = by_model.into_iter().map(|(m, classes)| (m, pool.class_set(classes))).collect();
        ids.into_iter().map(|(m, set)| (pool.models[m as usize].as_str(), set)).collect()
    }

    /// The set of every class in `sets` (of `pool`).
    pub fn union(&mut self, pool: PoolId, sets: &[SetId]) -> SetId {
        let p = &mut self.pools[pool];
        let classes: BTreeSet<u32> = sets.iter().flat_map(|&s| p.sets[s].classes.iter().copied()).collect();
        p.class_set(classes.into_iter().collect())
    }

    /// Places `job` on the first of `sets` (each a subset of `d.set`) where it fits.
    pub fn place(&mut self, job: JobId, d: &Demand, sets: &[SetId]) -> bool {
        match self.take_first(d, sets) {
            Some(cards) => {
                self.decisions.push(Decision::Place { job, cards });
                true
            }
            None => false,
        }
    }

    fn take_first(&mut self, d: &Demand, sets: &[SetId]) -> Option<Vec<CardId>> {
        let pool = &mut self.pools[d.pool];
        let slots = sets.iter().find_map(|&sid| {
            if !pool.could_fit(d, sid) {
                return None;
            }
            if d.sharing {
                pool.pick_shared(sid).map(|s| vec![s])
            } else {
                pool.pick_whole(sid, d.cards, d.single_node)
            }
        })?;
        for &slot in &slots {
            pool.hold(slot, d.sharing);
        }
        Some(slots.iter().map(|&s| pool.cards[s as usize].id).collect())
    }

    /// Places `job` by preempting some of `victims` (least deserving first) for which
    /// `eligible` holds. For each of `sets` in turn (each a subset of `d.set`, most wanted
    /// first), eligible victims holding a card of that set are released one by one until the
    /// job fits there; then it is placed there, and only the victims whose cards it actually
    /// got are preempted — the others get their cards back. If it never fits, everything is
    /// restored and the next set is tried. Emits the `Preempt`s, then the `Place`; preempted
    /// victims leave `victims`.
    ///
    /// Call it only when a plain [`Round::place`] on the same sets failed.
    pub fn place_by_preempting(
        &mut self,
        job: JobId,
        d: &Demand,
        sets: &[SetId],
        victims: &mut Vec<Victim<'s>>,
        eligible: impl Fn(&Victim<'s>) -> bool,
    ) -> bool {
        for &target in sets {
            let mut released: Vec<usize> = Vec::new();
            let mut cards = None;
            for (i, v) in victims.iter().enumerate() {
                if !eligible(v) || !self.holds_card_of(v.job, d.pool, target) {
                    continue;
                }
                self.release_running(v.job);
                released.push(i);
                if self.pools[d.pool].could_fit(d, target) {
                    cards = self.take_first(d, &[target]);
                    break;
                }
            }
            let Some(cards) = cards else {
                for &i in &released {
                    self.hold_running(victims[i].job);
                }
                continue;
            };
            let mut preempted: Vec<usize> = Vec::new();
            for &i in &released {
                // `cards` is sorted (slot order is id order).
                if victims[i].job.cards.iter().any(|c| cards.binary_search(c).is_ok()) {
                    preempted.push(i);
                } else {
                    // Not needed after all: its cards are untouched, so it keeps them.
                    self.hold_running(victims[i].job);
                }
            }
            for &i in &preempted {
                self.decisions.push(Decision::Preempt { job: victims[i].job.id });
            }
            self.decisions.push(Decision::Place { job, cards });
            let mut index = 0;
            victims.retain(|_| {
                let keep = preempted.binary_search(&index).is_err();
                index += 1;
                keep
            });
            return true;
        }
        false
    }

    fn holds_card_of(&self, job: &RunningJob, pool: PoolId, set: SetId) -> bool {
        let p = &self.pools[pool];
        let member = &p.sets[set].member;
        job.cards.iter().any(|card| self.card_at.get(*card).is_some_and(|(at, slot)| at == pool && member[p.cards[slot as usize].class as usize]))
    }

    fn hold_running(&mut self, job: &RunningJob) {
        for card in &job.cards {
            if let Some((pool, slot)) = self.card_at.get(*card) {
                self.pools[pool].hold(slot, job.shared);
            }
        }
    }

    fn release_running(&mut self, job: &RunningJob) {
        for card in &job.cards {
            if let Some((pool, slot)) = self.card_at.get(*card) {
                self.pools[pool].release(slot, job.shared);
            }
        }
    }

    #[cfg(test)]
    fn check_index(&self) {
        for pool in &self.pools {
            let free: u32 = pool.cards.iter().filter(|c| c.is_free()).count() as u32;
            assert_eq!(free, pool.free_total);
            for set in &pool.sets {
                for n in 0..pool.node_count {
                    let f: u32 = set.classes.iter().map(|&c| pool.node_free[pool.cell(n as u32, c as usize)].len() as u32).sum();
                    assert_eq!(f, set.free_on_node[n]);
                    assert_eq!(f > 0, set.nodes_by_free.contains(f, n as u32));
                }
                assert_eq!(set.nodes_by_free.len, set.free_on_node.iter().filter(|&&f| f > 0).count());
            }
            let open: usize = pool.open_shared.iter().map(BTreeSet::len).sum();
            assert_eq!(open as u32, pool.open_shared_total);
            for (slot, c) in pool.cards.iter().enumerate() {
                assert_eq!(self.card_at.get(c.id).map(|(_, s)| s), Some(slot as Slot));
                assert_eq!(c.is_free(), pool.node_free[pool.cell(c.node, c.class as usize)].binary_search(&(slot as Slot)).is_ok());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use suanli_types::{JobKind, JobRun, LeaseId, Resources};

    use super::*;

    fn card(id: u64, node: u64, model: &str) -> CardView {
        CardView { id: CardId(id), node: NodeId(node), model: model.into(), vram_mib: 80_000, lease: LeaseId(1), owner: AccountId(1), usable: true }
    }

    fn spec(cards: u32, single_node: bool, shared: bool) -> JobSpec {
        JobSpec {
            name: "t".into(),
            kind: if shared { JobKind::Inference } else { JobKind::Training },
            resources: Resources { cards, gpu_models: vec![], min_vram_mib: 0, single_node, shared },
            inputs: vec![],
            outputs: vec![],
            run: JobRun::Builtin { task: "x".into(), params: BTreeMap::new() },
            priority: 0,
            preemptible: false,
            deadline: None,
            budget_minor: None,
            max_attempts: 3,
            expected_seconds: None,
            auto_lease: None,
        }
    }

    /// Nodes 1..=3 with 1, 3 and 4 cards.
    fn snapshot() -> Snapshot {
        let mut cards = vec![card(10, 1, "A100")];
        cards.extend((20..23).map(|i| card(i, 2, "A100")));
        cards.extend((30..34).map(|i| card(i, 3, "A100")));
        Snapshot { cards, queued: vec![], running: vec![] }
    }

    #[test]
    fn best_fit_then_fewest_nodes_and_the_index_stays_exact() {
        let snap = snapshot();
        let mut round = Round::new(&snap, Timestamp(0));
        let one = spec(1, false, false);
        let d = round.demand(0, &one).expect("accepts A100");
        assert!(round.place(JobId(1), &d, &[d.set]));
        // Best fit: the one-card node.
        assert_eq!(round.decisions[0], Decision::Place { job: JobId(1), cards: vec![CardId(10)] });
        round.check_index();
        let seven = spec(7, false, false);
        let d = round.demand(0, &seven).expect("accepts A100");
        assert!(round.place(JobId(2), &d, &[d.set]));
        let Decision::Place { cards, .. } = &round.decisions[1] else { panic!("a placement") };
        assert_eq!(cards.len(), 7);
        round.check_index();
        assert_eq!(round.free_cards(0), 0);
    }

    #[test]
    fn release_and_restore_are_exact() {
        let mut snap = snapshot();
        snap.running.push(RunningJob {
            id: JobId(9),
            owner: AccountId(1),
            cards: vec![CardId(30), CardId(31)],
            shared: false,
            preemptible: true,
            priority: 0,
            started_at: Timestamp(0),
            expected_end: None,
            attained_gpu_ms: 0,
        });
        let mut round = Round::new(&snap, Timestamp(0));
        assert_eq!(round.free_cards(0), 6);
        round.release_running(&snap.running[0]);
        round.check_index();
        assert_eq!(round.free_cards(0), 8);
        round.hold_running(&snap.running[0]);
        round.check_index();
        assert_eq!(round.free_cards(0), 6);
        let shared = spec(1, false, true);
        let d = round.demand(0, &shared).expect("accepts A100");
        for job in 0..5 {
            assert!(round.place(JobId(job), &d, &[d.set]));
            round.check_index();
        }
    }
}

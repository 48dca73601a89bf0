//! An independent check of a decision list against the crate's hard invariants.
//!
//! Written naively on purpose — maps and linear scans, nothing shared with the placement
//! core — so that it can judge the core: the property tests and the simulator run every
//! policy's output through it, and the service may run it before acting.

use std::collections::{BTreeMap, BTreeSet};

use suanli_types::job::limits::MAX_JOBS_PER_SHARED_CARD;
use suanli_types::{CardId, JobId};

use crate::model::{is_sharing, CardView, Decision, Snapshot};

#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Violation {
    #[error("{0} is placed but is not queued (or placed twice)")]
    NotQueued(JobId),
    #[error("{job} asks for {wanted} cards and got {got}")]
    WrongCardCount { job: JobId, wanted: u32, got: usize },
    #[error("{job} got {card} twice")]
    DuplicateCard { job: JobId, card: CardId },
    #[error("{job} got {card}, which is unknown or not usable")]
    CardNotUsable { job: JobId, card: CardId },
    #[error("{job} got {card}, which its owner does not lease")]
    ForeignCard { job: JobId, card: CardId },
    #[error("{job} got {card}, which its spec does not accept")]
    NotAccepted { job: JobId, card: CardId },
    #[error("{0} must run on one node")]
    SpreadOverNodes(JobId),
    #[error("{job} got {card}, which is not free for it")]
    CardTaken { job: JobId, card: CardId },
    #[error("{0} is preempted but is not running (or preempted twice)")]
    NotRunning(JobId),
    #[error("{0} is preempted but is not preemptible")]
    NotPreemptible(JobId),
    #[error("preempting {0} frees no card that a later placement in the list uses")]
    UselessPreemption(JobId),
}

#[derive(Default)]
struct Holders {
    whole: u32,
    sharing: u32,
}

/// `Ok` if carrying out `decisions` in order keeps every invariant of the crate.
pub fn check_decisions(snapshot: &Snapshot, decisions: &[Decision]) -> Result<(), Violation> {
    let mut card_count: BTreeMap<CardId, usize> = BTreeMap::new();
    for c in &snapshot.cards {
        *card_count.entry(c.id).or_default() += 1;
    }
    let cards: BTreeMap<CardId, &CardView> = snapshot.cards.iter().filter(|c| c.usable && card_count[&c.id] == 1).map(|c| (c.id, c)).collect();
    let mut queued: BTreeMap<JobId, _> = snapshot.queued.iter().map(|j| (j.id, j)).collect();
    let mut running: BTreeMap<JobId, _> = snapshot.running.iter().map(|j| (j.id, j)).collect();
    let mut holders: BTreeMap<CardId, Holders> = BTreeMap::new();
    for job in &snapshot.running {
        for card in &job.cards {
            let h = holders.entry(*card).or_default();
            if job.shared {
                h.sharing += 1;
            } else {
                h.whole += 1;
            }
        }
    }
    // Preempted jobs whose cards no later placement has used yet.
    let mut pending: Vec<(JobId, Vec<CardId>)> = Vec::new();
    for decision in decisions {
        match decision {
            Decision::Preempt { job } => {
                let r = running.remove(job).ok_or(Violation::NotRunning(*job))?;
                if !r.preemptible {
                    return Err(Violation::NotPreemptible(*job));
                }
                for card in &r.cards {
                    if let Some(h) = holders.get_mut(card) {
                        let count = if r.shared { &mut h.sharing } else { &mut h.whole };
                        *count = count.saturating_sub(1);
                    }
                }
                pending.push((*job, r.cards.clone()));
            }
            Decision::Place { job, cards: placed } => {
                let q = queued.remove(job).ok_or(Violation::NotQueued(*job))?;
                let wanted = q.spec.resources.cards;
                if placed.len() != wanted as usize {
                    return Err(Violation::WrongCardCount { job: *job, wanted, got: placed.len() });
                }
                let sharing = is_sharing(&q.spec);
                let mut seen = BTreeSet::new();
                let mut nodes = BTreeSet::new();
                for &card in placed {
                    if !seen.insert(card) {
                        return Err(Violation::DuplicateCard { job: *job, card });
                    }
                    let c = cards.get(&card).ok_or(Violation::CardNotUsable { job: *job, card })?;
                    if c.owner != q.owner {
                        return Err(Violation::ForeignCard { job: *job, card });
                    }
                    if !q.spec.accepts_card(&c.model, c.vram_mib) {
                        return Err(Violation::NotAccepted { job: *job, card });
                    }
                    nodes.insert(c.node);
                    let h = holders.entry(card).or_default();
                    let free = if sharing { h.whole == 0 && h.sharing < MAX_JOBS_PER_SHARED_CARD } else { h.whole == 0 && h.sharing == 0 };
                    if !free {
                        return Err(Violation::CardTaken { job: *job, card });
                    }
                    if sharing {
                        h.sharing += 1;
                    } else {
                        h.whole += 1;
                    }
                }
                if q.spec.resources.single_node && nodes.len() > 1 {
                    return Err(Violation::SpreadOverNodes(*job));
                }
                pending.retain(|(_, freed)| !freed.iter().any(|c| seen.contains(c)));
            }
        }
    }
    match pending.first() {
        Some((job, _)) => Err(Violation::UselessPreemption(*job)),
        None => Ok(()),
    }
}

//! Jobs and the scheduler's leader lease.
//!
//! The scheduler decides; the state machine checks every placement against the rules it alone
//! can see whole: a card is used only by a job of a researcher who holds it in an active lease,
//! by one job at a time unless every job on it asked to share (inference), and only by the
//! replica holding the current leader lease (fencing by epoch).

use std::collections::{BTreeMap, BTreeSet};

use suanli_types::error::EntityKind;
use suanli_types::job::limits;
use suanli_types::{
    AccountId, AccountKind, Caller, CardHealth, CardId, ClusterId, DomainError, JobEndReason, JobId, JobSpec, JobState, LeaseState, NodeId, Timestamp,
};

use super::{Outcome, Response, State};
use crate::state::event::Event;
use crate::state::model::{Attempt, Job, SchedulerLease};

/// A scheduler lease lasts at most this long without renewal.
pub const MAX_SCHEDULER_LEASE_MS: u32 = 60_000;
pub const MAX_PLACEMENTS_PER_COMMAND: usize = 4_096;
/// A relayed progress line, at most.
pub const MAX_PROGRESS_BYTES: usize = 1024;
/// Live jobs one researcher may have queued or running.
pub const MAX_LIVE_JOBS_PER_OWNER: usize = 100_000;

impl State {
    pub(super) fn submit_job(&mut self, caller: &Caller, spec: &JobSpec, at: Timestamp, events: &mut Vec<Event>) -> Outcome {
        let owner = self.account_of_kind(caller, AccountKind::Researcher)?;
        let live = self.live_jobs_by_owner.get(&owner).map_or(0, BTreeSet::len);
        if live >= MAX_LIVE_JOBS_PER_OWNER {
            return Err(DomainError::invalid("spec", format!("at most {MAX_LIVE_JOBS_PER_OWNER} live jobs per researcher")));
        }
        let id = JobId(self.next());
        let job = Job {
            id,
            owner,
            spec: spec.clone(),
            state: JobState::Queued,
            submitted_at: at,
            failures: 0,
            attempts: Vec::new(),
            stop_requested: None,
            checkpoint: None,
            outputs: BTreeMap::new(),
            ended_at: None,
            end_reason: None,
            attained_card_ms: 0,
            cost_minor: 0,
            progress: None,
        };
        self.jobs.insert(id, job);
        self.queued_jobs.insert(id);
        self.live_jobs_by_owner.entry(owner).or_default().insert(id);
        events.push(Event::JobStateChanged { job: id, owner, from: None, to: JobState::Queued, attempt: 0, reason: None });
        Ok(Response::Job(Box::new(self.jobs[&id].clone())))
    }

    pub(super) fn cancel_job(&mut self, id: JobId, at: Timestamp, events: &mut Vec<Event>) -> Outcome {
        let job = self.jobs.get(&id).ok_or(DomainError::not_found(EntityKind::Job, id))?;
        match job.state {
            JobState::Queued | JobState::Placed => {
                self.end_attempt(id, JobEndReason::CancelledByUser, at);
                self.finish_job(id, JobState::Cancelled, JobEndReason::CancelledByUser, at, events);
            }
            JobState::Running => self.request_stop(id, JobEndReason::CancelledByUser, events),
            state => return Err(job_transition(id, state, "cancel")),
        }
        Ok(Response::Job(Box::new(self.jobs[&id].clone())))
    }

    pub(super) fn acquire_scheduler_lease(&mut self, holder: &str, ttl_ms: u32, at: Timestamp, events: &mut Vec<Event>) -> Outcome {
        let valid_holder = !holder.is_empty() && holder.len() <= 128 && holder.chars().all(|c| c.is_ascii_graphic());
        if !valid_holder {
            return Err(DomainError::invalid("holder", "1 to 128 printable characters"));
        }
        if ttl_ms == 0 || ttl_ms > MAX_SCHEDULER_LEASE_MS {
            return Err(DomainError::invalid("ttl_ms", format!("between 1 and {MAX_SCHEDULER_LEASE_MS} ms")));
        }
        let current = &self.scheduler_lease;
        let expired = at >= current.expires_at;
        if current.holder != holder && !expired && !current.holder.is_empty() {
            return Err(DomainError::StaleScheduler { presented: 0, current: current.epoch });
        }
        let epoch = if current.holder == holder && !expired { current.epoch } else { current.epoch + 1 };
        if epoch != current.epoch {
            events.push(Event::SchedulerLeaseChanged { holder: holder.to_owned(), epoch });
        }
        self.scheduler_lease = SchedulerLease { holder: holder.to_owned(), epoch, expires_at: at.plus_millis(i64::from(ttl_ms)) };
        Ok(Response::SchedulerLease(self.scheduler_lease.clone()))
    }

    fn check_epoch(&self, epoch: u64, at: Timestamp) -> Result<(), DomainError> {
        let lease = &self.scheduler_lease;
        if epoch != lease.epoch || at >= lease.expires_at {
            return Err(DomainError::StaleScheduler { presented: epoch, current: lease.epoch });
        }
        Ok(())
    }

    pub(super) fn place_jobs(&mut self, epoch: u64, placements: &[(JobId, Vec<CardId>)], at: Timestamp, events: &mut Vec<Event>) -> Outcome {
        self.check_epoch(epoch, at)?;
        if placements.len() > MAX_PLACEMENTS_PER_COMMAND {
            return Err(DomainError::invalid("placements", format!("at most {MAX_PLACEMENTS_PER_COMMAND} per call")));
        }
        let results = placements.iter().map(|(job, cards)| self.place_one(*job, cards, at, events)).collect();
        Ok(Response::Placements(results))
    }

    fn place_one(&mut self, id: JobId, cards: &[CardId], at: Timestamp, events: &mut Vec<Event>) -> Result<(), DomainError> {
        let job = self.jobs.get(&id).ok_or(DomainError::not_found(EntityKind::Job, id))?;
        if job.state != JobState::Queued {
            return Err(job_transition(id, job.state, "place"));
        }
        let spec = &job.spec;
        if cards.len() != spec.resources.cards as usize {
            return Err(DomainError::PlacementRefused(format!("{id} needs {} cards, got {}", spec.resources.cards, cards.len())));
        }
        let distinct: BTreeSet<CardId> = cards.iter().copied().collect();
        if distinct.len() != cards.len() {
            return Err(DomainError::PlacementRefused("a card is named twice".into()));
        }
        let mut leases = Vec::with_capacity(cards.len());
        let mut nodes = BTreeSet::new();
        for card_id in cards {
            let card = self.cards.get(card_id).ok_or(DomainError::not_found(EntityKind::Card, card_id))?;
            let lease = card
                .lease
                .and_then(|l| self.leases.get(&l))
                .filter(|l| l.state == LeaseState::Active && l.researcher == job.owner)
                .ok_or_else(|| DomainError::PlacementRefused(format!("{card_id} is not in an active lease of {}", job.owner)))?;
            if card.health != CardHealth::Healthy {
                return Err(DomainError::PlacementRefused(format!("{card_id} is {}", card.health)));
            }
            if !spec.accepts_card(&card.spec.model, card.spec.vram_mib) {
                return Err(DomainError::PlacementRefused(format!("{id} does not accept {card_id} ({})", card.spec.model)));
            }
            let holders = self.card_jobs.get(card_id);
            let occupied = holders.map_or(0, BTreeSet::len);
            if occupied > 0 {
                let all_share = holders.into_iter().flatten().all(|j| self.jobs.get(j).is_some_and(|j| j.spec.resources.shared));
                if !spec.resources.shared || !all_share || occupied >= limits::MAX_JOBS_PER_SHARED_CARD as usize {
                    return Err(DomainError::PlacementRefused(format!("{card_id} is held by another job")));
                }
            }
            leases.push(lease.id);
            nodes.insert(card.node);
        }
        if spec.resources.single_node && nodes.len() > 1 {
            return Err(DomainError::PlacementRefused(format!("{id} wants one node, got {}", nodes.len())));
        }
        let owner = job.owner;
        let number = job.attempts.last().map_or(1, |a| a.number + 1);
        for card in cards {
            self.card_jobs.entry(*card).or_default().insert(id);
        }
        self.queued_jobs.remove(&id);
        if let Some(job) = self.jobs.get_mut(&id) {
            job.attempts.push(Attempt {
                number,
                cards: cards.to_vec(),
                leases,
                placed_at: at,
                started_at: None,
                ended_at: None,
                end_reason: None,
                cost_minor: 0,
            });
            job.state = JobState::Placed;
            job.stop_requested = None;
        }
        events.push(Event::JobStateChanged { job: id, owner, from: Some(JobState::Queued), to: JobState::Placed, attempt: number, reason: None });
        Ok(())
    }

    pub(super) fn stop_jobs(&mut self, epoch: u64, stops: &[(JobId, JobEndReason)], at: Timestamp, events: &mut Vec<Event>) -> Outcome {
        self.check_epoch(epoch, at)?;
        if stops.len() > MAX_PLACEMENTS_PER_COMMAND {
            return Err(DomainError::invalid("stops", format!("at most {MAX_PLACEMENTS_PER_COMMAND} per call")));
        }
        let mut results = Vec::with_capacity(stops.len());
        for (id, reason) in stops {
            let result = match self.jobs.get(id).map(|j| j.state) {
                None => Err(DomainError::not_found(EntityKind::Job, id)),
                Some(JobState::Placed) if matches!(reason, JobEndReason::BudgetExhausted | JobEndReason::DeadlineMissed) => {
                    self.end_attempt(*id, reason.clone(), at);
                    self.finish_job(*id, JobState::Failed, reason.clone(), at, events);
                    Ok(())
                }
                Some(JobState::Placed) => {
                    self.requeue_or_fail(*id, reason.clone(), at, events);
                    Ok(())
                }
                Some(JobState::Running) if matches!(reason, JobEndReason::NodeLost(_)) => {
                    self.requeue_or_fail(*id, reason.clone(), at, events);
                    Ok(())
                }
                Some(JobState::Running) => {
                    self.request_stop(*id, reason.clone(), events);
                    Ok(())
                }
                // A queued job the scheduler gives up on: past its deadline, over its budget,
                // or asking for cards no lease of its owner has.
                Some(JobState::Queued) if matches!(reason, JobEndReason::DeadlineMissed | JobEndReason::BudgetExhausted | JobEndReason::Unplaceable(_)) => {
                    self.finish_job(*id, JobState::Failed, reason.clone(), at, events);
                    Ok(())
                }
                Some(state) => Err(job_transition(*id, state, "stop")),
            };
            results.push(result);
        }
        Ok(Response::Placements(results))
    }

    /// The agent of a node holding one of the attempt's cards, for the current attempt only.
    pub(super) fn reporting_attempt(&self, caller: &Caller, id: JobId, attempt: u32, action: &str) -> Result<&Job, DomainError> {
        let job = self.jobs.get(&id).ok_or(DomainError::not_found(EntityKind::Job, id))?;
        let Caller::Agent(node) = caller else {
            return Err(DomainError::PermissionDenied("only the agent of a placed node reports on a job".into()));
        };
        let current = job.current().filter(|a| a.number == attempt);
        let Some(current) = current else {
            return Err(job_transition(id, job.state, &format!("{action} attempt {attempt} of")));
        };
        if !current.cards.iter().any(|c| self.cards.get(c).is_some_and(|c| c.node == *node)) {
            return Err(DomainError::not_found(EntityKind::Job, id));
        }
        Ok(job)
    }

    pub(super) fn job_started(&mut self, caller: &Caller, id: JobId, attempt: u32, at: Timestamp, events: &mut Vec<Event>) -> Outcome {
        let job = self.reporting_attempt(caller, id, attempt, "start")?;
        if job.state == JobState::Placed {
            let owner = job.owner;
            if let Some(job) = self.jobs.get_mut(&id) {
                job.state = JobState::Running;
                if let Some(a) = job.attempts.last_mut() {
                    a.started_at = Some(at);
                }
            }
            events.push(Event::JobStateChanged { job: id, owner, from: Some(JobState::Placed), to: JobState::Running, attempt, reason: None });
        }
        // A job with several nodes starts once; later agents' reports change nothing.
        Ok(Response::Job(Box::new(self.jobs[&id].clone())))
    }

    pub(super) fn job_progress(&mut self, caller: &Caller, id: JobId, attempt: u32, progress: &str, at: Timestamp) -> Outcome {
        self.reporting_attempt(caller, id, attempt, "report progress of")?;
        if progress.len() > MAX_PROGRESS_BYTES || !progress.starts_with('{') {
            return Err(DomainError::invalid("progress", format!("one JSON object of at most {MAX_PROGRESS_BYTES} bytes")));
        }
        if let Some(job) = self.jobs.get_mut(&id) {
            job.progress = Some((progress.to_owned(), at));
        }
        Ok(Response::Empty)
    }

    pub(super) fn job_checkpoint(&mut self, caller: &Caller, id: JobId, attempt: u32, sha256: &str) -> Outcome {
        self.reporting_attempt(caller, id, attempt, "checkpoint")?;
        check_sha256("sha256", sha256)?;
        if let Some(job) = self.jobs.get_mut(&id) {
            job.checkpoint = Some(sha256.to_owned());
        }
        Ok(Response::Job(Box::new(self.jobs[&id].clone())))
    }

    #[allow(clippy::too_many_arguments)]
    pub(super) fn job_ended(
        &mut self,
        caller: &Caller,
        id: JobId,
        attempt: u32,
        reason: &JobEndReason,
        outputs: &BTreeMap<String, String>,
        at: Timestamp,
        events: &mut Vec<Event>,
    ) -> Outcome {
        let job = self.reporting_attempt(caller, id, attempt, "end")?;
        if outputs.len() > limits::MAX_ARTIFACTS {
            return Err(DomainError::invalid("outputs", format!("at most {}", limits::MAX_ARTIFACTS)));
        }
        for (name, hash) in outputs {
            check_sha256(&format!("outputs.{name}"), hash)?;
        }
        // The reason the platform asked for wins over how the process happened to die.
        let reason = job.stop_requested.clone().unwrap_or_else(|| reason.clone());
        match reason {
            JobEndReason::Completed => {
                self.end_attempt(id, JobEndReason::Completed, at);
                if let Some(job) = self.jobs.get_mut(&id) {
                    job.outputs = outputs.clone();
                }
                self.finish_job(id, JobState::Succeeded, JobEndReason::Completed, at, events);
            }
            JobEndReason::CancelledByUser => {
                self.end_attempt(id, reason.clone(), at);
                self.finish_job(id, JobState::Cancelled, reason, at, events);
            }
            JobEndReason::BudgetExhausted | JobEndReason::DeadlineMissed => {
                self.end_attempt(id, reason.clone(), at);
                self.finish_job(id, JobState::Failed, reason, at, events);
            }
            reason => self.requeue_or_fail(id, reason, at, events),
        }
        Ok(Response::Job(Box::new(self.jobs[&id].clone())))
    }

    /// Ends the current attempt and puts the job back in the queue, or fails it when the job
    /// itself has failed `max_attempts` times.
    pub(super) fn requeue_or_fail(&mut self, id: JobId, reason: JobEndReason, at: Timestamp, events: &mut Vec<Event>) {
        self.end_attempt(id, reason.clone(), at);
        let Some(job) = self.jobs.get_mut(&id) else { return };
        if reason.is_job_failure() {
            job.failures += 1;
        }
        if job.failures >= job.spec.max_attempts {
            self.finish_job(id, JobState::Failed, reason, at, events);
            return;
        }
        let from = job.state;
        let attempt = job.attempts.last().map_or(0, |a| a.number);
        job.state = JobState::Queued;
        job.stop_requested = None;
        let owner = job.owner;
        job.progress = None;
        self.queued_jobs.insert(id);
        events.push(Event::JobStateChanged { job: id, owner, from: Some(from), to: JobState::Queued, attempt, reason: Some(reason) });
    }

    fn request_stop(&mut self, id: JobId, reason: JobEndReason, events: &mut Vec<Event>) {
        let Some(job) = self.jobs.get_mut(&id) else { return };
        if job.stop_requested.is_some() {
            return;
        }
        job.stop_requested = Some(reason.clone());
        let attempt = job.attempts.last().map_or(0, |a| a.number);
        events.push(Event::JobStopRequested { job: id, attempt, reason });
    }

    /// Closes the current attempt, if the job holds cards: releases them, meters the
    /// card-time and prices it.
    fn end_attempt(&mut self, id: JobId, reason: JobEndReason, at: Timestamp) {
        let Some(job) = self.jobs.get(&id) else { return };
        if !job.state.holds_cards() {
            return;
        }
        let Some(attempt) = job.attempts.last() else { return };
        let ran_ms = attempt.started_at.map_or(0, |s| at.millis_since(s));
        let priced: Vec<(i64, i64)> =
            attempt.leases.iter().filter_map(|l| self.leases.get(l)).map(|l| (l.price_per_card.minor, l.billing_mode.period_seconds())).collect();
        let cost = suanli_types::money::card_time_cost(&priced, ran_ms);
        for card in attempt.cards.clone() {
            if let Some(holders) = self.card_jobs.get_mut(&card) {
                holders.remove(&id);
                if holders.is_empty() {
                    self.card_jobs.remove(&card);
                }
            }
        }
        for lease in attempt.leases.clone() {
            if let Some(account) = self.lease_accounts.get_mut(&lease) {
                account.job_card_ms += ran_ms;
            }
        }
        if let Some(job) = self.jobs.get_mut(&id) {
            let cards = job.attempts.last().map_or(0, |a| a.cards.len() as u64);
            job.attained_card_ms += ran_ms * cards;
            job.cost_minor += cost;
            if let Some(a) = job.attempts.last_mut() {
                a.ended_at = Some(at);
                a.end_reason = Some(reason);
                a.cost_minor = cost;
            }
        }
    }

    fn finish_job(&mut self, id: JobId, to: JobState, reason: JobEndReason, at: Timestamp, events: &mut Vec<Event>) {
        let Some(job) = self.jobs.get_mut(&id) else { return };
        let from = job.state;
        job.state = to;
        job.ended_at = Some(at);
        job.end_reason = Some(reason.clone());
        job.stop_requested = None;
        let (owner, attempt) = (job.owner, job.attempts.last().map_or(0, |a| a.number));
        self.queued_jobs.remove(&id);
        if let Some(live) = self.live_jobs_by_owner.get_mut(&owner) {
            live.remove(&id);
            if live.is_empty() {
                self.live_jobs_by_owner.remove(&owner);
            }
        }
        events.push(Event::JobStateChanged { job: id, owner, from: Some(from), to, attempt, reason: Some(reason) });
    }

    /// A card of a live job's attempt is gone (unhealthy, or its lease ended): the job must
    /// leave it. Placed attempts go back to the queue; running ones are asked to stop.
    pub(super) fn evict_jobs_from(&mut self, card: CardId, reason: JobEndReason, at: Timestamp, events: &mut Vec<Event>) {
        let holders: Vec<JobId> = self.card_jobs.get(&card).map(|h| h.iter().copied().collect()).unwrap_or_default();
        for id in holders {
            match self.jobs.get(&id).map(|j| j.state) {
                Some(JobState::Placed) => self.requeue_or_fail(id, reason.clone(), at, events),
                Some(JobState::Running) => self.request_stop(id, reason.clone(), events),
                _ => {}
            }
        }
    }

    /// Leases cards for a queued job that opted in (Class B only: Class A needs a supplier's
    /// approval). Among listed Class B clusters in the job's region with enough idle cards the
    /// job accepts (on one node if it wants one), the cheapest per card for the job's billing
    /// mode whose one period for the job's cards fits the budget left; ties by cluster ID.
    pub(super) fn auto_lease(&mut self, epoch: u64, id: JobId, at: Timestamp, events: &mut Vec<Event>) -> Outcome {
        self.check_epoch(epoch, at)?;
        let job = self.jobs.get(&id).ok_or(DomainError::not_found(EntityKind::Job, id))?;
        if job.state != JobState::Queued {
            return Err(job_transition(id, job.state, "auto-lease for"));
        }
        let Some(auto) = job.spec.auto_lease.clone() else {
            return Err(DomainError::invalid("job", format!("{id} did not opt in to auto_lease")));
        };
        if self.auto_lease_of(id).is_some() {
            return Err(DomainError::AlreadyExists { kind: EntityKind::Lease, id: format!("auto lease of {id}") });
        }
        let (owner, spec) = (job.owner, job.spec.clone());
        let need = spec.resources.cards as usize;
        let budget_left = spec.budget_minor.unwrap_or(0).saturating_sub(job.cost_minor);
        // Cheapest first (ties by ID): the first that fits is the best.
        let mut best: Option<(i64, ClusterId, Vec<CardId>)> = None;
        for (price, cluster_id) in self.class_b_offers(auto.billing_mode) {
            if price.saturating_mul(need as i64) > budget_left {
                break;
            }
            let Some(cluster) = self.clusters.get(&cluster_id) else { continue };
            let in_region = auto.region.as_ref().is_none_or(|r| cluster.listing.region.eq_ignore_ascii_case(r.trim()));
            // Too few idle cards of any kind: not worth looking at each card.
            if !in_region || (self.card_counts(cluster_id).idle as usize) < need {
                continue;
            }
            let idle_by_node: Vec<Vec<CardId>> = cluster
                .nodes
                .iter()
                .filter_map(|n| self.nodes.get(n))
                .map(|n| {
                    n.cards
                        .iter()
                        .copied()
                        .filter(|c| self.is_idle(*c) && self.cards.get(c).is_some_and(|c| spec.accepts_card(&c.spec.model, c.spec.vram_mib)))
                        .collect()
                })
                .collect();
            // The node that fits most tightly, else (when the job may span nodes) the fullest first.
            let cards = match idle_by_node.iter().filter(|idle| idle.len() >= need).min_by_key(|idle| idle.len()) {
                Some(idle) => idle[..need].to_vec(),
                None if !spec.resources.single_node => {
                    let mut nodes = idle_by_node.clone();
                    nodes.sort_by_key(|idle| std::cmp::Reverse(idle.len()));
                    nodes.into_iter().flatten().take(need).collect()
                }
                None => continue,
            };
            if cards.len() == need {
                best = Some((price, cluster_id, cards));
                break;
            }
        }
        let Some((_, cluster, cards)) = best else {
            return Err(DomainError::PlacementRefused(format!("no Class B cluster offers {need} cards {id} accepts within its budget and region")));
        };
        let unit = suanli_types::LeaseUnit::Cards(need as u32);
        self.request_lease(owner, cluster, &unit, auto.billing_mode, 1, Some((id, cards)), at, events)
    }

    // ---- reads -------------------------------------------------------------------------------

    pub fn job(&self, id: JobId) -> Option<&Job> {
        self.jobs.get(&id)
    }

    pub fn jobs(&self) -> impl Iterator<Item = &Job> {
        self.jobs.values()
    }

    pub fn jobs_of(&self, owner: AccountId) -> impl Iterator<Item = &Job> {
        self.jobs.values().filter(move |j| j.owner == owner)
    }

    /// Jobs with IDs after `after`, in ID order (a page's start).
    pub fn jobs_after(&self, after: u64) -> impl Iterator<Item = &Job> {
        self.jobs.range(JobId(after.saturating_add(1))..).map(|(_, j)| j)
    }

    /// Live jobs, oldest first: what a scheduler needs each round.
    pub fn live_jobs(&self) -> impl Iterator<Item = &Job> {
        self.live_jobs_by_owner.values().flatten().filter_map(|id| self.jobs.get(id))
    }

    /// Jobs with an attempt holding a card on `node`: what its agent must run or stop.
    pub fn jobs_on_node(&self, node: NodeId) -> Vec<&Job> {
        let Some(n) = self.nodes.get(&node) else { return Vec::new() };
        let ids: BTreeSet<JobId> = n.cards.iter().filter_map(|c| self.card_jobs.get(c)).flatten().copied().collect();
        ids.into_iter().filter_map(|id| self.jobs.get(&id)).collect()
    }

    pub fn scheduler_lease(&self) -> &SchedulerLease {
        &self.scheduler_lease
    }

    /// Which jobs hold each card; used by invariant checks and tests.
    pub fn card_jobs(&self) -> &BTreeMap<CardId, BTreeSet<JobId>> {
        &self.card_jobs
    }

    pub(super) fn check_job_invariants(&self) -> Result<(), String> {
        let mut holders: BTreeMap<CardId, BTreeSet<JobId>> = BTreeMap::new();
        for job in self.jobs.values() {
            if job.state.is_live() != self.live_jobs_by_owner.get(&job.owner).is_some_and(|l| l.contains(&job.id)) {
                return Err(format!("{} live index out of step", job.id));
            }
            if (job.state == JobState::Queued) != self.queued_jobs.contains(&job.id) {
                return Err(format!("{} queue index out of step", job.id));
            }
            let Some(attempt) = job.current() else { continue };
            for (card, lease) in attempt.cards.iter().zip(&attempt.leases) {
                holders.entry(*card).or_default().insert(job.id);
                let l = self.leases.get(lease).ok_or(format!("{} placed on unknown {lease}", job.id))?;
                if l.researcher != job.owner || !l.cards.contains(card) {
                    return Err(format!("{} holds {card} outside its owner's lease", job.id));
                }
                // A lease that ended takes its jobs with it: placed ones are requeued at once,
                // running ones wait for their agent to confirm the kill.
                if l.state != LeaseState::Active && job.state == JobState::Placed {
                    return Err(format!("{} is placed on {card} of {} lease {lease}", job.id, l.state));
                }
            }
        }
        for (card, jobs) in &holders {
            if jobs.len() > 1 {
                let all_share = jobs.iter().all(|j| self.jobs.get(j).is_some_and(|j| j.spec.resources.shared));
                if !all_share || jobs.len() > limits::MAX_JOBS_PER_SHARED_CARD as usize {
                    return Err(format!("{card} is held by {jobs:?}"));
                }
            }
        }
        if holders != self.card_jobs {
            return Err("card-to-job index out of step".into());
        }
        Ok(())
    }
}

fn job_transition(job: JobId, state: JobState, action: &str) -> DomainError {
    DomainError::JobTransition { job, state, action: action.to_owned() }
}

fn check_sha256(field: &str, hash: &str) -> Result<(), DomainError> {
    if hash.len() == 64 && hash.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)) {
        Ok(())
    } else {
        Err(DomainError::invalid(field, "64 lower-case hex digits"))
    }
}

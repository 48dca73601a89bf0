//! The broker's scheduling view → the policy library's snapshot.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use suanli_proto::convert::billing_mode_from_wire;
use suanli_proto::v1;
use suanli_scheduling::{is_sharing, CardView, QueuedJob, RunningJob, Snapshot};
use suanli_types::money::card_time_cost;
use suanli_types::{AccountId, BillingMode, CardId, JobEndReason, JobId, JobSpec, LeaseId, NodeId, Timestamp};

/// One round's input, and the stops the round must make whatever the policy says.
#[derive(Debug, Default)]
pub struct Round {
    pub snapshot: Snapshot,
    /// Stops the round makes whatever the policy says: jobs holding cards of nodes whose
    /// agents went silent (no one will report their end), jobs past their deadline before
    /// they started, jobs whose cost reached their budget.
    pub stops: Vec<(JobId, JobEndReason)>,
    /// Jobs whose spec the broker holds but this build cannot read (a newer format).
    pub unreadable: Vec<JobId>,
}

pub fn round(view: &v1::SchedulingView) -> Round {
    let now = Timestamp::from_millis(view.now_ms);
    let silent: BTreeSet<u64> = view.silent_node_ids.iter().copied().collect();
    // Each card's lease price, to price running attempts against their budgets.
    let price: BTreeMap<u64, (i64, i64)> = view
        .cards
        .iter()
        .map(|c| {
            let period = billing_mode_from_wire(c.billing_mode).map_or(0, BillingMode::period_seconds);
            (c.card_id, (c.price_per_card.as_ref().map_or(0, |m| m.minor), period))
        })
        .collect();
    let mut out = Round::default();
    out.snapshot.cards = view
        .cards
        .iter()
        .map(|c| CardView {
            id: CardId(c.card_id),
            node: NodeId(c.node_id),
            model: c.model.clone(),
            vram_mib: c.vram_mib,
            lease: LeaseId(c.lease_id),
            owner: AccountId(c.owner_id),
            // A card whose lease is about to run out would only start work it cannot finish.
            usable: c.healthy && !silent.contains(&c.node_id) && c.paid_until_ms > view.now_ms + 1_000,
        })
        .collect();
    for job in &view.live_jobs {
        let id = JobId(job.job_id);
        let Ok(spec) = serde_json::from_str::<JobSpec>(&job.spec_json) else {
            out.unreadable.push(id);
            continue;
        };
        let spec = Arc::new(spec);
        let over_budget = |running_cost: i64| spec.budget_minor.is_some_and(|b| job.cost_minor.saturating_add(running_cost) >= b);
        match job.state.as_str() {
            "queued" if spec.deadline.is_some_and(|d| now >= d) => out.stops.push((id, JobEndReason::DeadlineMissed)),
            "queued" if over_budget(0) => out.stops.push((id, JobEndReason::BudgetExhausted)),
            "queued" => out.snapshot.queued.push(QueuedJob {
                id,
                owner: AccountId(job.owner_id),
                spec,
                submitted_at: Timestamp::from_millis(job.submitted_at_ms),
                attained_gpu_ms: job.attained_card_ms,
            }),
            "placed" | "running" => {
                let Some(attempt) = job.attempts.last() else { continue };
                let started = if attempt.started_at_ms > 0 { attempt.started_at_ms } else { attempt.placed_at_ms };
                let started_at = Timestamp::from_millis(started);
                let ran_ms = if attempt.started_at_ms > 0 { now.millis_since(started_at) } else { 0 };
                let priced: Vec<(i64, i64)> = attempt.card_ids.iter().filter_map(|c| price.get(c).copied()).collect();
                if let Some(node) = attempt.node_ids.iter().copied().find(|n| silent.contains(n)) {
                    out.stops.push((id, JobEndReason::NodeLost(NodeId(node))));
                } else if job.stop_requested.is_none() && over_budget(card_time_cost(&priced, ran_ms)) {
                    out.stops.push((id, JobEndReason::BudgetExhausted));
                }
                let running_ms = now.millis_since(started_at) * attempt.card_ids.len() as u64;
                out.snapshot.running.push(RunningJob {
                    id,
                    owner: AccountId(job.owner_id),
                    cards: attempt.card_ids.iter().map(|c| CardId(*c)).collect(),
                    shared: is_sharing(&spec),
                    // A job already asked to stop is leaving: it cannot be preempted again.
                    preemptible: spec.preemptible && job.stop_requested.is_none(),
                    priority: spec.priority,
                    started_at,
                    expected_end: spec.expected_seconds.map(|s| started_at.plus_seconds(s as i64)),
                    attained_gpu_ms: job.attained_card_ms + if attempt.started_at_ms > 0 { running_ms } else { 0 },
                });
            }
            _ => {}
        }
    }
    out
}

//! The broker's scheduling view → the policy library's snapshot.

use std::collections::BTreeSet;
use std::sync::Arc;

use suanli_proto::v1;
use suanli_scheduling::{is_sharing, CardView, QueuedJob, RunningJob, Snapshot};
use suanli_types::{AccountId, CardId, JobEndReason, JobId, JobSpec, LeaseId, NodeId, Timestamp};

/// One round's input, and the stops the round must make whatever the policy says.
#[derive(Debug, Default)]
pub struct Round {
    pub snapshot: Snapshot,
    /// Jobs holding cards of nodes whose agents went silent: no one will report their end.
    pub lost: Vec<(JobId, JobEndReason)>,
    /// Jobs whose spec the broker holds but this build cannot read (a newer format).
    pub unreadable: Vec<JobId>,
}

pub fn round(view: &v1::SchedulingView) -> Round {
    let now = Timestamp::from_millis(view.now_ms);
    let silent: BTreeSet<u64> = view.silent_node_ids.iter().copied().collect();
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
        match job.state.as_str() {
            "queued" => out.snapshot.queued.push(QueuedJob {
                id,
                owner: AccountId(job.owner_id),
                spec,
                submitted_at: Timestamp::from_millis(job.submitted_at_ms),
                attained_gpu_ms: job.attained_card_ms,
            }),
            "placed" | "running" => {
                let Some(attempt) = job.attempts.last() else { continue };
                if attempt.node_ids.iter().any(|n| silent.contains(n)) {
                    let node = attempt.node_ids.iter().copied().find(|n| silent.contains(n)).unwrap_or_default();
                    out.lost.push((id, JobEndReason::NodeLost(NodeId(node))));
                }
                let started = if attempt.started_at_ms > 0 { attempt.started_at_ms } else { attempt.placed_at_ms };
                let started_at = Timestamp::from_millis(started);
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

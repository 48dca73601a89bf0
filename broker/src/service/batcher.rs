//! Group commit at the proposal layer: requests that arrive while earlier ones are being
//! committed go into the log together, as one `Batch` entry.
//!
//! Why here and not in storage: openraft 0.9 appends each `client_write` as its own entry and
//! waits for that append's disk sync before it takes the next request, so every write paid one
//! synced append on the leader and one on each follower, one after another. Whatever arrives
//! during those syncs now waits in this queue and is proposed as one entry: one sync per node
//! for the lot. A request that finds nothing in flight goes alone, as its own entry, so a single
//! client waits no longer than before. The batch is applied request by request
//! (`State::apply`), each with its own caller, request ID and outcome, so what a client sees
//! does not depend on whether its request shared an entry.
//!
//! A cluster below store format 7 cannot decode a `Batch`: until the cluster format is raised,
//! requests that arrived together are proposed side by side, one entry each, as before.

use std::sync::{Arc, Mutex, OnceLock};

use tokio::sync::{mpsc, oneshot, Semaphore};

use super::metrics::Metrics;
use crate::state::{Command, Envelope, Outcome, Response};
use crate::storage::{Raft, StateMachineStore};

/// How many requests one entry carries at most.
pub const MAX_BATCH_REQUESTS: usize = 256;
/// How many encoded bytes of requests one entry carries at most (each request is at most
/// `rules::MAX_COMMAND_BYTES`; a batch always takes at least one): no more than one
/// AppendEntries call carries (`network::MAX_APPEND_BYTES`).
pub const MAX_BATCH_BYTES: usize = crate::network::MAX_APPEND_BYTES;
/// Entries proposed and not yet applied at once. Two: while one is replicated, the next is
/// appended on the leader (openraft takes one append at a time), and whatever arrives during
/// both is the batch after.
pub const BATCHES_IN_FLIGHT: usize = 2;

/// Why a request was not committed (openraft's error, as text: the caller answers
/// `UNAVAILABLE` with it).
pub type NotCommitted = String;

struct Pending {
    envelope: Envelope,
    bytes: usize,
    answer: oneshot::Sender<Result<Outcome, NotCommitted>>,
}

/// The queue in front of `Raft::client_write`; one per node, its task started on first use.
pub struct Batcher {
    proposer: Arc<Proposer>,
    queue: mpsc::UnboundedSender<Pending>,
    waiting: Mutex<Option<mpsc::UnboundedReceiver<Pending>>>,
    started: OnceLock<()>,
}

/// What the proposing task holds.
struct Proposer {
    raft: Arc<Raft>,
    sm: StateMachineStore,
    metrics: Arc<Metrics>,
}

impl Batcher {
    pub fn new(raft: Arc<Raft>, sm: StateMachineStore, metrics: Arc<Metrics>) -> Self {
        let (queue, waiting) = mpsc::unbounded_channel();
        Batcher { proposer: Arc::new(Proposer { raft, sm, metrics }), queue, waiting: Mutex::new(Some(waiting)), started: OnceLock::new() }
    }

    /// Commits `envelope` (of `bytes` encoded bytes) and returns its outcome once applied here.
    pub async fn write(&self, envelope: Envelope, bytes: usize) -> Result<Outcome, NotCommitted> {
        self.started.get_or_init(|| {
            if let Some(waiting) = self.waiting.lock().unwrap_or_else(|p| p.into_inner()).take() {
                tokio::spawn(self.proposer.clone().run(waiting));
            }
        });
        let stopped = || "the proposer has stopped".to_owned();
        let (answer, answered) = oneshot::channel();
        self.queue.send(Pending { envelope, bytes, answer }).map_err(|_| stopped())?;
        answered.await.map_err(|_| stopped())?
    }
}

impl Proposer {
    /// Takes what is queued, up to a batch, whenever fewer than [`BATCHES_IN_FLIGHT`] are
    /// being committed; ends when every sender is gone.
    async fn run(self: Arc<Self>, mut waiting: mpsc::UnboundedReceiver<Pending>) {
        let in_flight = Arc::new(Semaphore::new(BATCHES_IN_FLIGHT));
        // A request too big to join the batch before it: it opens the next one.
        let mut carried: Option<Pending> = None;
        loop {
            // The permit first: while every slot is busy, requests gather in the queue.
            let Ok(permit) = in_flight.clone().acquire_owned().await else { return };
            let first = match carried.take() {
                Some(first) => first,
                None => match waiting.recv().await {
                    Some(first) => first,
                    None => return,
                },
            };
            let mut bytes = first.bytes;
            let mut batch = vec![first];
            while batch.len() < MAX_BATCH_REQUESTS {
                let Ok(next) = waiting.try_recv() else { break };
                if bytes + next.bytes > MAX_BATCH_BYTES {
                    carried = Some(next);
                    break;
                }
                bytes += next.bytes;
                batch.push(next);
            }
            let proposer = self.clone();
            tokio::spawn(async move {
                proposer.commit(batch).await;
                drop(permit);
            });
        }
    }

    /// Proposes `batch` (one entry, or one each below format 7) and answers every request in
    /// it.
    async fn commit(&self, mut batch: Vec<Pending>) {
        // A caller that gave up waiting is not answered, and its request not proposed: nothing
        // was applied, so its retry (same request ID) applies it then.
        batch.retain(|p| !p.answer.is_closed());
        if batch.is_empty() {
            return;
        }
        let cluster_format = self.sm.read(|s| s.cluster_format());
        if batch.len() == 1 || (Command::Batch { envelopes: Vec::new() }).may_propose_at(cluster_format).is_err() {
            let alone = batch.into_iter().map(|p| async move {
                self.metrics.requests_per_entry.observe(1.0);
                let written = self.raft.client_write(p.envelope).await;
                let _ = p.answer.send(written.map(|w| w.data).map_err(|e| e.to_string()));
            });
            futures::future::join_all(alone).await;
            return;
        }
        self.metrics.requests_per_entry.observe(batch.len() as f64);
        let (envelopes, answers): (Vec<Envelope>, Vec<_>) = batch.into_iter().map(|p| (p.envelope, p.answer)).unzip();
        // The batch's own time is its latest request's: `State::apply` gives each its own.
        let at = envelopes.iter().map(|e| e.at).max().unwrap_or_else(|| self.sm.proposal_time(super::now()));
        let envelope = Envelope {
            caller: suanli_types::Caller::System,
            request_id: suanli_types::RequestId::parse("batch").expect("a valid request ID"),
            at,
            command: Command::Batch { envelopes },
        };
        let outcomes = match self.raft.client_write(envelope).await {
            Ok(written) => match written.data {
                Ok(Response::Batch(outcomes)) if outcomes.len() == answers.len() => outcomes.into_iter().map(Ok).collect(),
                other => {
                    // Only a bug gets here: the leader's own batch refused, or answered otherwise.
                    tracing::error!(outcome = ?other, "a batch was not applied request by request");
                    vec![Err("the batch was not applied request by request".to_owned()); answers.len()]
                }
            },
            Err(e) => vec![Err(e.to_string()); answers.len()],
        };
        for (answer, outcome) in answers.into_iter().zip(outcomes) {
            let _ = answer.send(outcome);
        }
    }
}

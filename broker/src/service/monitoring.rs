//! Irmds (`MonitoringService`): agents stream telemetry in; suppliers, lessees and operators
//! query and watch it. Validation is strict: a sample out of range ends the stream with
//! `INVALID_ARGUMENT` naming the field, and nothing of that batch is stored.

use std::pin::Pin;
use std::sync::Arc;

use futures::{Stream, StreamExt};
use suanli_proto::to_status;
use suanli_proto::v1::{self, monitoring_service_server::MonitoringService};
use suanli_types::error::EntityKind;
use suanli_types::{Caller, CardId, ClusterClass, ClusterId, DomainError, FieldError, NodeId};
use tokio::sync::broadcast::error::RecvError;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};

use super::{now, Consistency, Shared};
use crate::state::State;
use crate::telemetry::health::{self, Observation};
use crate::telemetry::store::{Bucket, Reading};
use crate::telemetry::Telemetry;

/// Most samples in one batch.
pub const MAX_BATCH_SAMPLES: usize = 1000;
/// Samples older than this are refused (the windows keep no more).
const MAX_SAMPLE_AGE_MS: i64 = 25 * 3600 * 1000;
/// Agents' clocks may run this far ahead of the broker's.
const MAX_CLOCK_AHEAD_MS: i64 = 60 * 1000;
/// Hottest plausible reading; anything above is a broken sensor or a broken agent.
const MAX_TEMPERATURE_C: u32 = 150;
/// Longest query range, in steps.
const MAX_QUERY_POINTS: i64 = 10_000;

pub struct Irmds {
    shared: Shared,
    telemetry: Arc<Telemetry>,
}

impl Irmds {
    pub fn new(shared: Shared, telemetry: Arc<Telemetry>) -> Self {
        Irmds { shared, telemetry }
    }
}

/// What the broker needs to know about an agent's node while ingesting.
struct NodeView {
    node: NodeId,
    /// `cards[i]` is the card with index `indexes[i]`.
    cards: Vec<(u32, CardId, u64, suanli_types::CardHealth)>,
    full_telemetry: bool,
}

fn node_view(s: &State, node: NodeId) -> Option<NodeView> {
    let n = s.node(node)?;
    let class = n.cluster.and_then(|c| s.cluster(c)).map(|c| c.class);
    let cards = n.cards.iter().filter_map(|id| s.card(*id)).map(|c| (c.spec.index, c.id, c.spec.vram_mib, c.health)).collect();
    Some(NodeView { node, cards, full_telemetry: class != Some(ClusterClass::A) })
}

/// Every problem of one batch, field by field.
fn validate_batch(view: &NodeView, batch: &v1::TelemetryBatch, now_ms: i64) -> Result<(), DomainError> {
    let mut problems = Vec::new();
    let mut bad = |field: String, problem: &str| problems.push(FieldError { field, problem: problem.to_owned() });
    if batch.samples.len() > MAX_BATCH_SAMPLES {
        bad("samples".into(), "at most 1000 samples per batch");
    }
    let mut previous_seq = 0;
    for (i, sample) in batch.samples.iter().enumerate() {
        let at = format!("samples[{i}]");
        if sample.seq == 0 || sample.seq <= previous_seq {
            bad(format!("{at}.seq"), "must be positive and increase within a batch");
        }
        previous_seq = sample.seq;
        if sample.at_ms > now_ms + MAX_CLOCK_AHEAD_MS || sample.at_ms < now_ms - MAX_SAMPLE_AGE_MS {
            bad(format!("{at}.at_ms"), "more than a minute ahead of the broker or older than 25 hours");
        }
        if let Some(n) = &sample.node {
            if n.cpu_utilization_permille > 1000 {
                bad(format!("{at}.node.cpu_utilization_permille"), "at most 1000");
            }
            if n.packet_loss_ppm > 1_000_000 {
                bad(format!("{at}.node.packet_loss_ppm"), "at most 1000000");
            }
        }
        let mut seen = Vec::with_capacity(sample.cards.len());
        for (j, card) in sample.cards.iter().enumerate() {
            let at = format!("{at}.cards[{j}]");
            let Some(&(_, _, vram_mib, _)) = view.cards.iter().find(|c| c.0 == card.index) else {
                bad(format!("{at}.index"), "no such card on this node");
                continue;
            };
            if seen.contains(&card.index) {
                bad(format!("{at}.index"), "reported twice in one sample");
            }
            seen.push(card.index);
            if card.gpu_utilization_pct > 100 {
                bad(format!("{at}.gpu_utilization_pct"), "at most 100");
            }
            if card.memory_utilization_pct > 100 {
                bad(format!("{at}.memory_utilization_pct"), "at most 100");
            }
            if card.memory_used_mib > vram_mib {
                bad(format!("{at}.memory_used_mib"), "more than the card's memory");
            }
            if card.temperature_c > MAX_TEMPERATURE_C {
                bad(format!("{at}.temperature_c"), "above 150 °C");
            }
        }
    }
    if problems.is_empty() {
        Ok(())
    } else {
        Err(DomainError::Invalid(problems))
    }
}

impl Irmds {
    /// Stores one validated batch; returns the sequence stored through.
    fn ingest(&self, view: &NodeView, batch: &v1::TelemetryBatch) -> u64 {
        let card_of = |index: u32| view.cards.iter().find(|c| c.0 == index).map(|c| c.1);
        let mut stored_through = 0;
        let mut latest: Vec<(CardId, Observation)> = Vec::new();
        for sample in &batch.samples {
            let cards: Vec<(CardId, Option<Reading>)> = sample
                .cards
                .iter()
                .filter_map(|c| {
                    let id = card_of(c.index)?;
                    let reading = (c.present && view.full_telemetry).then_some(Reading {
                        gpu_utilization_pct: c.gpu_utilization_pct,
                        memory_utilization_pct: c.memory_utilization_pct,
                        memory_used_mib: c.memory_used_mib,
                        temperature_c: c.temperature_c,
                        power_draw_mw: c.power_draw_mw,
                    });
                    if c.xid_events.iter().any(|x| health::is_critical_xid(*x)) {
                        self.telemetry.note_critical_xid(id, sample.at_ms);
                    }
                    if c.present {
                        self.telemetry.note_ecc_uncorrected(id, c.ecc_uncorrected, sample.at_ms);
                    }
                    let observation = Observation { present: c.present, temperature_c: c.temperature_c, last_critical_xid_ms: None, at_ms: sample.at_ms };
                    match latest.iter_mut().find(|(card, _)| *card == id) {
                        Some(slot) => slot.1 = observation,
                        None => latest.push((id, observation)),
                    }
                    Some((id, if c.present { reading.or(Some(Reading::default())) } else { None }))
                })
                .collect();
            let stored = self.telemetry.store().add(view.node, sample.seq, sample.at_ms, &cards);
            stored_through = sample.seq;
            if stored == crate::telemetry::store::Stored::New {
                self.telemetry.publish(v1::LiveSample {
                    node_id: view.node.0,
                    sample: Some(sample.clone()),
                    card_ids: cards.iter().map(|(id, _)| id.0).collect(),
                });
            }
        }
        for (card, mut observation) in latest {
            let previous = view.cards.iter().find(|c| c.1 == card).map_or_else(Default::default, |c| c.3);
            observation.last_critical_xid_ms = self.telemetry.last_critical_xid(card);
            // Class A is monitored for availability only.
            if !view.full_telemetry {
                observation.temperature_c = 0;
                observation.last_critical_xid_ms = None;
            }
            self.telemetry.want_health(card, health::evaluate(previous, &observation, self.telemetry.rules()));
        }
        self.telemetry.heard_from(view.node);
        stored_through.max(self.telemetry.store().stored_through(view.node))
    }

    /// The cards `caller` may see in `scope`, as `(node, card)`.
    fn scoped_cards(&self, s: &State, caller: &Caller, scope: Scope) -> Result<Vec<(NodeId, CardId)>, DomainError> {
        let nodes: Vec<NodeId> = match scope {
            Scope::Card(card) => {
                let c = s.card(card).ok_or(DomainError::not_found(EntityKind::Card, card))?;
                if !may_monitor(s, caller, c.node) {
                    return Err(DomainError::not_found(EntityKind::Card, card));
                }
                return Ok(vec![(c.node, card)]);
            }
            Scope::Node(node) => vec![node],
            Scope::Cluster(cluster) => s.cluster(cluster).ok_or(DomainError::not_found(EntityKind::Cluster, cluster))?.nodes.clone(),
        };
        let mut cards = Vec::new();
        for node in nodes {
            let n = s.node(node).ok_or(DomainError::not_found(EntityKind::Node, node))?;
            if !may_monitor(s, caller, node) {
                return Err(match scope {
                    Scope::Cluster(c) => DomainError::not_found(EntityKind::Cluster, c),
                    _ => DomainError::not_found(EntityKind::Node, node),
                });
            }
            cards.extend(n.cards.iter().map(|c| (node, *c)));
        }
        Ok(cards)
    }
}

#[derive(Clone, Copy, Debug)]
enum Scope {
    Card(CardId),
    Node(NodeId),
    Cluster(ClusterId),
}

/// Who sees a node's telemetry: its supplier, its own agent, the platform and operators, and
/// researchers with a live lease on its Class B cluster (Class A is not monitored, SPEC §2).
fn may_monitor(s: &State, caller: &Caller, node: NodeId) -> bool {
    let Some(n) = s.node(node) else { return false };
    match caller {
        Caller::Platform | Caller::Operator(_) | Caller::System => true,
        Caller::Agent(own) => *own == node,
        Caller::Account(id) if *id == n.supplier => true,
        Caller::Account(id) => n.cluster.is_some_and(|cluster| {
            s.cluster(cluster).is_some_and(|c| c.class == ClusterClass::B)
                && s.leases_of(*id).any(|l| l.researcher == *id && l.cluster == cluster && l.state.is_live())
        }),
        Caller::Enrollee(_) => false,
    }
}

fn point(b: &Bucket) -> v1::CardPoint {
    v1::CardPoint {
        at_ms: b.start_ms,
        samples: b.samples,
        lost_samples: b.lost_samples,
        sum_gpu_utilization_pct: b.sum_gpu_utilization_pct,
        sum_memory_utilization_pct: b.sum_memory_utilization_pct,
        sum_memory_used_mib: b.sum_memory_used_mib,
        sum_temperature_c: b.sum_temperature_c,
        max_temperature_c: b.max_temperature_c,
        sum_power_draw_mw: b.sum_power_draw_mw,
    }
}

type AckStream = Pin<Box<dyn Stream<Item = Result<v1::TelemetryAck, Status>> + Send>>;
type LiveStream = Pin<Box<dyn Stream<Item = Result<v1::LiveSample, Status>> + Send>>;

#[tonic::async_trait]
impl MonitoringService for Irmds {
    type StreamTelemetryStream = AckStream;
    type SubscribeTelemetryStream = LiveStream;

    async fn stream_telemetry(&self, request: Request<Streaming<v1::TelemetryBatch>>) -> Result<Response<AckStream>, Status> {
        let Caller::Agent(node) = self.shared.caller(&request).await? else {
            return Err(to_status(&DomainError::PermissionDenied("only enrolled agents stream telemetry".into())));
        };
        let view = self.shared.sm.read(|s| node_view(s, node)).ok_or_else(|| to_status(&DomainError::not_found(EntityKind::Node, node)))?;
        let mut batches = request.into_inner();
        // One ack in flight per batch: a full channel stops reading the agent's stream, and
        // HTTP/2 flow control pushes back to the agent.
        let (tx, rx) = mpsc::channel(4);
        let first = v1::TelemetryAck { stored_through_seq: self.telemetry.store().stored_through(node), full_telemetry: view.full_telemetry };
        let ingest = Irmds { shared: self.shared.clone(), telemetry: self.telemetry.clone() };
        tokio::spawn(async move {
            if tx.send(Ok(first)).await.is_err() {
                return;
            }
            let mut view = view;
            while let Some(next) = batches.next().await {
                let batch = match next {
                    Ok(batch) => batch,
                    Err(status) => {
                        tracing::debug!(%node, %status, "telemetry stream ended");
                        return;
                    }
                };
                // The node's cards or cluster may have changed since the stream opened.
                if let Some(fresh) = ingest.shared.sm.read(|s| node_view(s, node)) {
                    view = fresh;
                }
                let outcome = validate_batch(&view, &batch, now().millis()).map(|()| ingest.ingest(&view, &batch));
                let reply = outcome.map(|seq| v1::TelemetryAck { stored_through_seq: seq, full_telemetry: view.full_telemetry }).map_err(|e| to_status(&e));
                let failed = reply.is_err();
                if tx.send(reply).await.is_err() || failed {
                    return;
                }
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn query_telemetry(&self, request: Request<v1::QueryTelemetryRequest>) -> Result<Response<v1::QueryTelemetryResponse>, Status> {
        self.shared
            .observe("QueryTelemetry", async {
                let consistency = Consistency::of(&request);
                let caller = self.shared.caller(&request).await?;
                let req = request.into_inner();
                let scope = match req.scope {
                    Some(v1::query_telemetry_request::Scope::CardId(id)) => Scope::Card(CardId(id)),
                    Some(v1::query_telemetry_request::Scope::NodeId(id)) => Scope::Node(NodeId(id)),
                    Some(v1::query_telemetry_request::Scope::ClusterId(id)) => Scope::Cluster(ClusterId(id)),
                    None => return Err(super::invalid("scope", "name a card, node or cluster")),
                };
                let to_ms = if req.to_ms == 0 { now().millis() + 1 } else { req.to_ms };
                let step_ms = i64::from(req.step_seconds.max(1)) * 1000;
                if req.from_ms >= to_ms {
                    return Err(super::invalid("from_ms", "must be before to_ms"));
                }
                if (to_ms - req.from_ms) / step_ms > MAX_QUERY_POINTS {
                    return Err(super::invalid("step_seconds", "at most 10000 steps per query; use a larger step"));
                }
                let cards = self.shared.read(consistency, |s| self.scoped_cards(s, &caller, scope)).await?.map_err(|e| to_status(&e))?;
                let (step, series) = self.telemetry.store().query(&cards, req.from_ms, to_ms, step_ms);
                let cards = cards
                    .iter()
                    .zip(series)
                    .map(|((node, card), buckets)| v1::CardSeries { card_id: card.0, node_id: node.0, points: buckets.iter().map(point).collect() })
                    .collect();
                Ok(Response::new(v1::QueryTelemetryResponse { step_seconds: (step / 1000) as u32, cards }))
            })
            .await
    }

    async fn subscribe_telemetry(&self, request: Request<v1::SubscribeTelemetryRequest>) -> Result<Response<LiveStream>, Status> {
        let caller = self.shared.caller(&request).await?;
        let scope = match request.get_ref().scope {
            Some(v1::subscribe_telemetry_request::Scope::NodeId(id)) => Scope::Node(NodeId(id)),
            Some(v1::subscribe_telemetry_request::Scope::ClusterId(id)) => Scope::Cluster(ClusterId(id)),
            None => return Err(super::invalid("scope", "name a node or cluster")),
        };
        let nodes: Vec<NodeId> =
            self.shared.sm.read(|s| self.scoped_cards(s, &caller, scope)).map_err(|e| to_status(&e))?.into_iter().map(|(node, _)| node).collect();
        let mut live = self.telemetry.subscribe();
        let (tx, rx) = mpsc::channel(64);
        tokio::spawn(async move {
            loop {
                match live.recv().await {
                    Ok(sample) if nodes.contains(&NodeId(sample.node_id)) => {
                        if tx.send(Ok((*sample).clone())).await.is_err() {
                            return;
                        }
                    }
                    Ok(_) | Err(RecvError::Lagged(_)) => {}
                    Err(RecvError::Closed) => return,
                }
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }
}

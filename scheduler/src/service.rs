//! The scheduling loop: take the leader lease, read the view, decide, commit.

use std::collections::BTreeSet;
use std::time::Duration;

use suanli_proto::client::{bearer, Bearer};
use suanli_proto::convert::job_end_reason_to_wire;
use suanli_proto::decode_status;
use suanli_proto::v1::{self, job_service_client::JobServiceClient};
use suanli_scheduling::{Decision, Policy};
use suanli_types::{CardId, ErrorCode, JobEndReason, JobId, Timestamp};
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;

use crate::view;

pub type Jobs = JobServiceClient<InterceptedService<Channel, Bearer>>;

/// Placements per `PlaceJobs` call: well inside the broker's 64 KiB command limit.
pub const PLACEMENTS_PER_CALL: usize = 1_000;

#[derive(Clone, Debug)]
pub struct Config {
    /// Broker endpoints (`http://host:port`); any node will do, writes are forwarded.
    pub brokers: Vec<String>,
    /// The cluster CA (PEM) an `https://` broker endpoint is checked against.
    pub broker_ca: Option<String>,
    pub platform_token: String,
    /// This replica's name in the leader lease; unique per replica.
    pub name: String,
    pub round: Duration,
    /// How long the lease lasts without renewal: a standby takes over this long after the
    /// acting replica stops renewing.
    pub lease_ttl: Duration,
}

/// What one round did, for logs and tests.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct RoundReport {
    pub acting: bool,
    pub epoch: u64,
    pub placed: usize,
    pub refused: usize,
    pub stopped: usize,
    pub auto_leased: usize,
    pub released: usize,
}

pub struct Scheduler {
    config: Config,
    policy: Box<dyn Policy>,
    client: Option<(Jobs, suanli_proto::client::Client)>,
    which: usize,
    rounds: u64,
    /// Jobs an auto-lease found nothing for, and when to look again: the market changes, but
    /// not every round.
    auto_lease_backoff: std::collections::BTreeMap<u64, std::time::Instant>,
    /// When each node was first seen silent: its jobs are requeued only after
    /// [`NODE_LOST_AFTER`], so a node that was merely slow to report does not end up running
    /// an attempt while its replacement runs elsewhere.
    silent_since: std::collections::BTreeMap<u64, std::time::Instant>,
    metrics: std::sync::Arc<crate::metrics::SchedulerMetrics>,
}

/// How long a node must stay silent before its running jobs are given up on.
pub const NODE_LOST_AFTER: Duration = Duration::from_secs(30);

/// How long to wait before retrying an auto-lease that found no cards.
const AUTO_LEASE_RETRY: Duration = Duration::from_secs(10);

impl Scheduler {
    pub fn new(config: Config, policy: Box<dyn Policy>) -> Self {
        Scheduler {
            config,
            policy,
            client: None,
            which: 0,
            rounds: 0,
            auto_lease_backoff: Default::default(),
            silent_since: Default::default(),
            metrics: Default::default(),
        }
    }

    /// What this replica's rounds report (`suanli_scheduler_*`), for its metrics listener.
    pub fn metrics(&self) -> std::sync::Arc<crate::metrics::SchedulerMetrics> {
        self.metrics.clone()
    }

    pub async fn run(mut self) {
        let mut tick = tokio::time::interval(self.config.round);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut was_acting = false;
        loop {
            tick.tick().await;
            let started = std::time::Instant::now();
            let result = self.round().await;
            self.metrics.observe_round(&result, started.elapsed());
            match result {
                Ok(report) => {
                    if report.acting != was_acting {
                        tracing::info!(acting = report.acting, epoch = report.epoch, "scheduler role changed");
                        was_acting = report.acting;
                    }
                    if report.placed + report.refused + report.stopped > 0 {
                        tracing::info!(placed = report.placed, refused = report.refused, stopped = report.stopped, "round");
                    }
                }
                Err(why) => {
                    tracing::warn!(%why, "scheduling round failed");
                    self.client = None;
                    self.which += 1;
                }
            }
        }
    }

    async fn connect(&mut self) -> Result<(Jobs, suanli_proto::client::Client), String> {
        if let Some(c) = &self.client {
            return Ok(c.clone());
        }
        let endpoint = &self.config.brokers[self.which % self.config.brokers.len()];
        let ch = suanli_proto::client::channel_checked(endpoint, self.config.broker_ca.as_deref()).await.map_err(|e| format!("{endpoint}: {e}"))?;
        let auth = bearer(Some(&self.config.platform_token)).map_err(|e| e.to_string())?;
        let jobs = JobServiceClient::with_interceptor(ch.clone(), auth).max_decoding_message_size(256 * 1024 * 1024);
        let broker = suanli_proto::client::with_token(ch, Some(&self.config.platform_token)).map_err(|e| e.to_string())?;
        self.client = Some((jobs.clone(), broker.clone()));
        Ok((jobs, broker))
    }

    /// One round. Standing by (another replica holds the lease) is not an error.
    pub async fn round(&mut self) -> Result<RoundReport, String> {
        let (mut client, mut broker) = self.connect().await?;
        self.rounds += 1;
        let describe = |s: tonic::Status| decode_status(&s);
        let lease = client
            .acquire_scheduler_lease(v1::AcquireSchedulerLeaseRequest {
                request_id: format!("{}-lease-{}-{}", self.config.name, std::process::id(), self.rounds),
                holder: self.config.name.clone(),
                ttl_ms: self.config.lease_ttl.as_millis() as u32,
            })
            .await;
        let epoch = match lease {
            Ok(l) => l.into_inner().epoch,
            Err(s) => {
                let e = describe(s);
                if e.code == ErrorCode::StaleScheduler {
                    return Ok(RoundReport::default());
                }
                return Err(e.to_string());
            }
        };
        let view = client.get_scheduling_view(v1::GetSchedulingViewRequest {}).await.map_err(|s| describe(s).to_string())?.into_inner();
        let round = view::round(&view);
        for job in &round.unreadable {
            tracing::warn!(%job, "job spec unreadable by this scheduler build; skipped");
        }
        let now = Timestamp::from_millis(view.now_ms);
        let decisions = self.policy.decide(&round.snapshot, now);
        let mut report = RoundReport { acting: true, epoch, ..Default::default() };

        let now_instant = std::time::Instant::now();
        self.silent_since.retain(|node, _| view.silent_node_ids.contains(node));
        for node in &view.silent_node_ids {
            self.silent_since.entry(*node).or_insert(now_instant);
        }
        let lost_long_enough = |node: &suanli_types::NodeId| self.silent_since.get(&node.0).is_some_and(|t| now_instant.duration_since(*t) >= NODE_LOST_AFTER);
        let mut stops: Vec<(JobId, JobEndReason)> =
            round.stops.iter().filter(|(_, r)| !matches!(r, JobEndReason::NodeLost(n) if !lost_long_enough(n))).cloned().collect();
        let mut freeing: BTreeSet<CardId> = BTreeSet::new();
        for d in &decisions {
            if let Decision::Preempt { job } = d {
                stops.push((*job, JobEndReason::Preempted));
                if let Some(r) = round.snapshot.running.iter().find(|r| r.id == *job) {
                    freeing.extend(r.cards.iter().copied());
                }
            }
        }
        // A placement onto cards being freed waits for the next round: the preempted jobs'
        // agents must stop them first, and the broker would refuse it until then.
        let placements: Vec<v1::Placement> = decisions
            .iter()
            .filter_map(|d| match d {
                Decision::Place { job, cards } if !cards.iter().any(|c| freeing.contains(c)) => {
                    Some(v1::Placement { job_id: job.0, card_ids: cards.iter().map(|c| c.0).collect() })
                }
                _ => None,
            })
            .collect();
        if !stops.is_empty() {
            let request = v1::StopJobsRequest {
                request_id: format!("{}-stop-{epoch}-{}-{}", self.config.name, std::process::id(), self.rounds),
                epoch,
                stops: stops.iter().map(|(j, r)| v1::JobStop { job_id: j.0, reason: Some(job_end_reason_to_wire(r)) }).collect(),
            };
            let results = client.stop_jobs(request).await.map_err(|s| describe(s).to_string())?.into_inner().results;
            report.stopped = results.iter().filter(|r| r.code.is_empty()).count();
        }
        self.auto_leases(&mut client, &mut broker, &view, &round, &placements, epoch, &mut report).await?;
        for (i, chunk) in placements.chunks(PLACEMENTS_PER_CALL).enumerate() {
            let request = v1::PlaceJobsRequest {
                request_id: format!("{}-place-{epoch}-{}-{}-{i}", self.config.name, std::process::id(), self.rounds),
                epoch,
                placements: chunk.to_vec(),
            };
            let results = client.place_jobs(request).await.map_err(|s| describe(s).to_string())?.into_inner().results;
            for (p, r) in chunk.iter().zip(&results) {
                if r.code.is_empty() {
                    report.placed += 1;
                } else {
                    report.refused += 1;
                    tracing::debug!(job = p.job_id, code = %r.code, message = %r.message, "placement refused");
                }
            }
        }
        Ok(report)
    }

    /// Leases cards for queued jobs that opted in and could not be placed this round, and
    /// releases the leases taken so once they are idle and their job is over.
    #[allow(clippy::too_many_arguments)]
    async fn auto_leases(
        &mut self,
        client: &mut Jobs,
        broker: &mut suanli_proto::client::Client,
        view: &v1::SchedulingView,
        round: &view::Round,
        placements: &[v1::Placement],
        epoch: u64,
        report: &mut RoundReport,
    ) -> Result<(), String> {
        let placed: BTreeSet<u64> = placements.iter().map(|p| p.job_id).collect();
        let covered: BTreeSet<u64> = view.auto_leases.iter().map(|a| a.job_id).collect();
        let now = std::time::Instant::now();
        self.auto_lease_backoff.retain(|_, until| *until > now);
        for job in &round.snapshot.queued {
            let id = job.id.0;
            if job.spec.auto_lease.is_none() || placed.contains(&id) || covered.contains(&id) || self.auto_lease_backoff.contains_key(&id) {
                continue;
            }
            let request = v1::AutoLeaseRequest { request_id: format!("{}-auto-{id}-{epoch}-{}", self.config.name, self.rounds), epoch, job_id: id };
            match client.auto_lease(request).await {
                Ok(lease) => {
                    let lease = lease.into_inner();
                    tracing::info!(job = id, lease = lease.lease_id, cards = lease.card_ids.len(), "leased cards for a job");
                    report.auto_leased += 1;
                }
                Err(status) => {
                    let e = decode_status(&status);
                    if e.code == ErrorCode::StaleScheduler {
                        return Err(e.to_string());
                    }
                    tracing::info!(job = id, error = %e, "auto-lease found nothing yet");
                    self.auto_lease_backoff.insert(id, now + AUTO_LEASE_RETRY);
                }
            }
        }
        let live: BTreeSet<u64> = view.live_jobs.iter().map(|j| j.job_id).collect();
        for a in &view.auto_leases {
            if a.state == v1::LeaseState::Active as i32 && a.idle && !live.contains(&a.job_id) {
                let request = v1::EndLeaseRequest {
                    request_id: format!("auto-release-{}", a.lease_id),
                    lease_id: a.lease_id,
                    reason: v1::EndReason::ByResearcher.into(),
                };
                match broker.end_lease(request).await {
                    Ok(_) => {
                        tracing::info!(lease = a.lease_id, job = a.job_id, "released an idle auto-lease");
                        report.released += 1;
                    }
                    Err(status) => tracing::warn!(lease = a.lease_id, error = %decode_status(&status), "could not release an auto-lease"),
                }
            }
        }
        Ok(())
    }
}

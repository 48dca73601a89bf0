//! `JobService` and `BillingService`: jobs for researchers, scheduler replicas and agents;
//! balances, the ledger and statements.

use std::collections::BTreeMap;

use suanli_proto::convert::{
    billing_mode_to_wire, job_end_reason_from_wire, job_end_reason_to_wire, lease_state_to_wire, money_from_wire, money_to_wire, transaction_to_wire,
};
use suanli_proto::to_status;
use suanli_proto::v1::{self, job_service_server::JobService};
use suanli_types::error::EntityKind;
use suanli_types::{
    AccountId, AccountKind, Caller, CardHealth, CardId, Currency, DomainError, JobId, JobSpec, LeaseId, LeaseState, LedgerAccount, Month, NodeId,
    TransactionKind,
};
use tonic::{Request, Response, Status};

use super::broker_api::unexpected;
use super::job_logs;
use super::paging::Page;
use super::{archived, invalid, may_see_lease, now, Consistency, Shared};
use crate::state::{Command, Job, Response as Applied, State};
use crate::storage::{StateMachineStore, StoreError};

pub struct Jobs {
    shared: Shared,
}

impl Jobs {
    pub fn new(shared: Shared) -> Self {
        Jobs { shared }
    }
}

/// The nodes of an attempt in rank order: the order each first holds one of its cards.
fn ranked_nodes(nodes: impl Iterator<Item = u64>) -> Vec<u64> {
    let mut ranked = Vec::new();
    for node in nodes {
        if !ranked.contains(&node) {
            ranked.push(node);
        }
    }
    ranked
}

pub fn job_to_wire(s: &State, j: &Job) -> v1::Job {
    let node_of = |c: &CardId| s.card(*c).map_or(0, |c| c.node.0);
    // As the node's supplier gave its host (what its SSH gateway is reached at).
    let host_of = |node: u64| s.node(NodeId(node)).and_then(|n| n.access.as_ref()).map(|access| access.ssh_host.clone()).unwrap_or_default();
    v1::Job {
        job_id: j.id.0,
        owner_id: j.owner.0,
        name: j.spec.name.clone(),
        kind: j.spec.kind.as_str().into(),
        state: j.state.as_str().into(),
        spec_json: serde_json::to_string(&j.spec).unwrap_or_default(),
        submitted_at_ms: j.submitted_at.millis(),
        failures: j.failures,
        attempts: j
            .attempts
            .iter()
            .map(|a| v1::JobAttempt {
                number: a.number,
                card_ids: a.cards.iter().map(|c| c.0).collect(),
                lease_ids: a.leases.iter().map(|l| l.0).collect(),
                node_ids: a.cards.iter().map(node_of).collect(),
                card_indexes: a.cards.iter().map(|c| s.card(*c).map_or(0, |c| c.spec.index)).collect(),
                rendezvous_host: a.cards.first().map(|c| host_of(node_of(c))).unwrap_or_default(),
                node_hosts: ranked_nodes(a.cards.iter().map(node_of)).into_iter().map(host_of).collect(),
                placed_at_ms: a.placed_at.millis(),
                started_at_ms: a.started_at.map_or(0, |t| t.millis()),
                ended_at_ms: a.ended_at.map_or(0, |t| t.millis()),
                end_reason: a.end_reason.as_ref().map(job_end_reason_to_wire),
                cost_minor: a.cost_minor,
            })
            .collect(),
        stop_requested: j.stop_requested.as_ref().map(job_end_reason_to_wire),
        checkpoint_sha256: j.checkpoint.clone().unwrap_or_default(),
        outputs: j.outputs.clone().into_iter().collect(),
        ended_at_ms: j.ended_at.map_or(0, |t| t.millis()),
        end_reason: j.end_reason.as_ref().map(job_end_reason_to_wire),
        attained_card_ms: j.attained_card_ms,
        cost_minor: j.cost_minor,
        progress_json: j.progress.as_ref().map(|(p, _)| p.clone()).unwrap_or_default(),
        progress_at_ms: j.progress.as_ref().map_or(0, |(_, t)| t.millis()),
        artifact_capability: String::new(),
    }
}

/// How long a capability the broker issues to an agent for one attempt lasts: renewed with
/// every listing, so this only bounds how long an attempt's outputs may still be uploaded
/// after the broker stopped listing it.
const CAPABILITY_LIFETIME_MS: i64 = 2 * 3600 * 1000;

/// The capability for `node`'s part in `job`'s current attempt: its inputs and checkpoint to
/// read, its outputs and checkpoints to write, charged to the job's owner.
fn capability_for(key: &suanli_artifacts::CapabilityKey, job: &Job, node: suanli_types::NodeId, now: suanli_types::Timestamp) -> String {
    let attempt = job.attempts.last().map_or(0, |a| a.number);
    let mut read: Vec<String> = job.spec.inputs.iter().map(|i| i.sha256.clone()).collect();
    read.extend(job.checkpoint.clone());
    let grant = suanli_artifacts::Grant {
        owner: job.owner.0,
        scope: format!("job {} attempt {attempt} on node {}", job.id.0, node.0),
        read,
        write: true,
        expires_ms: now.millis() + CAPABILITY_LIFETIME_MS,
    };
    key.sign(&grant)
}

/// How long a capability for a job's outputs lasts: long enough to start every download (a
/// download begun in time finishes).
const OUTPUTS_GRANT_LIFETIME_MS: i64 = 10 * 60 * 1000;

/// How long an upload-only capability lasts: long enough to start the upload it was asked for.
const UPLOAD_GRANT_LIFETIME_MS: i64 = 10 * 60 * 1000;

/// The longest a `ReadJobLog` waits for more output.
const MAX_LOG_WAIT_MS: u32 = 30_000;
/// How often a waiting `ReadJobLog` looks again whether its attempt has ended.
const LOG_RECHECK: std::time::Duration = std::time::Duration::from_millis(500);

fn may_see_job(caller: &Caller, job: &Job) -> bool {
    match caller {
        Caller::Account(id) => *id == job.owner,
        Caller::Platform | Caller::Operator(_) | Caller::System => true,
        Caller::Agent(_) | Caller::Enrollee(_) => false,
    }
}

fn job_reply(shared: &Shared, applied: Applied) -> Result<Response<v1::Job>, Status> {
    match applied {
        Applied::Job(j) => Ok(Response::new(shared.sm.read(|s| job_to_wire(s, &j)))),
        other => Err(unexpected(&other)),
    }
}

fn batch_reply(applied: Applied) -> Result<Response<v1::BatchResult>, Status> {
    match applied {
        Applied::Placements(results) => Ok(Response::new(v1::BatchResult {
            results: results
                .into_iter()
                .map(|r| match r {
                    Ok(()) => v1::ItemResult::default(),
                    Err(e) => v1::ItemResult { code: e.code().as_str().into(), message: e.to_string() },
                })
                .collect(),
        })),
        other => Err(unexpected(&other)),
    }
}

fn required_job(id: u64) -> Result<JobId, Status> {
    if id == 0 {
        return Err(invalid("job_id", "required"));
    }
    Ok(JobId(id))
}

fn end_reason(field: &str, reason: Option<&v1::JobEndReason>) -> Result<suanli_types::JobEndReason, Status> {
    reason.and_then(job_end_reason_from_wire).ok_or_else(|| invalid(field, "a known end reason kind"))
}

fn agent_node(caller: &Caller) -> Result<suanli_types::NodeId, Status> {
    match caller {
        Caller::Agent(node) => Ok(*node),
        _ => Err(to_status(&DomainError::PermissionDenied("only an enrolled agent, on the agent port".into()))),
    }
}

fn require_platform(caller: &Caller) -> Result<(), Status> {
    match caller {
        Caller::Platform => Ok(()),
        _ => Err(to_status(&DomainError::PermissionDenied("only the platform's scheduler".into()))),
    }
}

#[tonic::async_trait]
impl JobService for Jobs {
    async fn submit_job(&self, request: Request<v1::SubmitJobRequest>) -> Result<Response<v1::Job>, Status> {
        self.shared
            .observe("SubmitJob", async {
                let caller = self.shared.caller(&request).await?;
                let req = request.into_inner();
                let spec: JobSpec = serde_json::from_str(&req.spec_json).map_err(|e| invalid("spec_json", &e.to_string()))?;
                job_reply(&self.shared, self.shared.propose(caller, &req.request_id, Command::SubmitJob { spec }).await?)
            })
            .await
    }

    async fn cancel_job(&self, request: Request<v1::JobRef>) -> Result<Response<v1::Job>, Status> {
        self.shared
            .observe("CancelJob", async {
                let caller = self.shared.caller(&request).await?;
                let req = request.into_inner();
                let job = required_job(req.job_id)?;
                job_reply(&self.shared, self.shared.propose(caller, &req.request_id, Command::CancelJob { job }).await?)
            })
            .await
    }

    async fn get_job(&self, request: Request<v1::GetJobRequest>) -> Result<Response<v1::Job>, Status> {
        self.shared
            .observe("GetJob", async {
                let consistency = Consistency::of(&request);
                let caller = self.shared.caller(&request).await?;
                let id = required_job(request.get_ref().job_id)?;
                self.shared
                    .read_with_archive(consistency, |sm| {
                        let job = super::archived::job(sm, id)?.filter(|j| may_see_job(&caller, j));
                        Ok(job.map(|j| sm.read(|s| job_to_wire(s, &j))))
                    })
                    .await?
                    .map(Response::new)
                    .ok_or_else(|| to_status(&DomainError::not_found(EntityKind::Job, id)))
            })
            .await
    }

    async fn list_jobs(&self, request: Request<v1::ListJobsRequest>) -> Result<Response<v1::ListJobsResponse>, Status> {
        self.shared
            .observe("ListJobs", async {
                let consistency = Consistency::of(&request);
                let caller = self.shared.caller(&request).await?;
                let req = request.get_ref();
                let (live_only, page) = (req.live_only, Page::from_wire(req.page_after_id, req.page_size)?);
                let (jobs, next_page_after_id) = self
                    .shared
                    .read(consistency, |s| {
                        let pick = |j: &&Job| may_see_job(&caller, j) && (!live_only || j.state.is_live());
                        page.take(s.jobs_after(page.after).filter(pick).map(|j| (j.id.0, job_to_wire(s, j))))
                    })
                    .await?;
                Ok(Response::new(v1::ListJobsResponse { jobs, next_page_after_id }))
            })
            .await
    }

    async fn acquire_scheduler_lease(&self, request: Request<v1::AcquireSchedulerLeaseRequest>) -> Result<Response<v1::SchedulerLease>, Status> {
        self.shared
            .observe("AcquireSchedulerLease", async {
                let caller = self.shared.caller(&request).await?;
                let req = request.into_inner();
                let command = Command::AcquireSchedulerLease { holder: req.holder, ttl_ms: req.ttl_ms };
                match self.shared.propose(caller, &req.request_id, command).await? {
                    Applied::SchedulerLease(l) => {
                        Ok(Response::new(v1::SchedulerLease { holder: l.holder, epoch: l.epoch, expires_at_ms: l.expires_at.millis() }))
                    }
                    other => Err(unexpected(&other)),
                }
            })
            .await
    }

    async fn get_scheduling_view(&self, request: Request<v1::GetSchedulingViewRequest>) -> Result<Response<v1::SchedulingView>, Status> {
        self.shared
            .observe("GetSchedulingView", async {
                let consistency = Consistency::of(&request);
                require_platform(&self.shared.caller(&request).await?)?;
                let view = self.shared.read(consistency, scheduling_view).await?;
                Ok(Response::new(view))
            })
            .await
    }

    async fn place_jobs(&self, request: Request<v1::PlaceJobsRequest>) -> Result<Response<v1::BatchResult>, Status> {
        self.shared
            .observe("PlaceJobs", async {
                let caller = self.shared.caller(&request).await?;
                let req = request.into_inner();
                let placements = req
                    .placements
                    .iter()
                    .map(|p| Ok((required_job(p.job_id)?, p.card_ids.iter().map(|c| CardId(*c)).collect())))
                    .collect::<Result<Vec<_>, Status>>()?;
                batch_reply(self.shared.propose(caller, &req.request_id, Command::PlaceJobs { epoch: req.epoch, placements }).await?)
            })
            .await
    }

    async fn stop_jobs(&self, request: Request<v1::StopJobsRequest>) -> Result<Response<v1::BatchResult>, Status> {
        self.shared
            .observe("StopJobs", async {
                let caller = self.shared.caller(&request).await?;
                let req = request.into_inner();
                let stops = req
                    .stops
                    .iter()
                    .map(|s| Ok((required_job(s.job_id)?, end_reason("stops.reason", s.reason.as_ref())?)))
                    .collect::<Result<Vec<_>, Status>>()?;
                batch_reply(self.shared.propose(caller, &req.request_id, Command::StopJobs { epoch: req.epoch, stops }).await?)
            })
            .await
    }

    async fn auto_lease(&self, request: Request<v1::AutoLeaseRequest>) -> Result<Response<v1::Lease>, Status> {
        self.shared
            .observe("AutoLease", async {
                let caller = self.shared.caller(&request).await?;
                let req = request.into_inner();
                let command = Command::AutoLease { epoch: req.epoch, job: required_job(req.job_id)? };
                super::broker_api::lease_reply(self.shared.propose(caller, &req.request_id, command).await?)
            })
            .await
    }

    async fn list_node_jobs(&self, request: Request<v1::ListNodeJobsRequest>) -> Result<Response<v1::ListNodeJobsResponse>, Status> {
        self.shared
            .observe("ListNodeJobs", async {
                let consistency = Consistency::of(&request);
                let node = agent_node(&self.shared.caller(&request).await?)?;
                let key = self.shared.artifact_key.clone();
                let now = super::now();
                let jobs = self
                    .shared
                    .read(consistency, |s| {
                        s.jobs_on_node(node)
                            .into_iter()
                            .map(|j| {
                                let mut wire = job_to_wire(s, j);
                                if let Some(key) = &key {
                                    wire.artifact_capability = capability_for(key, j, node, now);
                                }
                                wire
                            })
                            .collect()
                    })
                    .await?;
                Ok(Response::new(v1::ListNodeJobsResponse { jobs }))
            })
            .await
    }

    async fn report_job_started(&self, request: Request<v1::ReportJobStartedRequest>) -> Result<Response<v1::Job>, Status> {
        self.shared
            .observe("ReportJobStarted", async {
                let caller = self.shared.caller(&request).await?;
                agent_node(&caller)?;
                let req = request.into_inner();
                let command = Command::JobStarted { job: required_job(req.job_id)?, attempt: req.attempt };
                job_reply(&self.shared, self.shared.propose(caller, &req.request_id, command).await?)
            })
            .await
    }

    async fn report_job_ended(&self, request: Request<v1::ReportJobEndedRequest>) -> Result<Response<v1::Job>, Status> {
        self.shared
            .observe("ReportJobEnded", async {
                let caller = self.shared.caller(&request).await?;
                agent_node(&caller)?;
                let req = request.into_inner();
                let command = Command::JobEnded {
                    job: required_job(req.job_id)?,
                    attempt: req.attempt,
                    reason: end_reason("reason", req.reason.as_ref())?,
                    outputs: req.outputs.into_iter().collect::<BTreeMap<_, _>>(),
                };
                job_reply(&self.shared, self.shared.propose(caller, &req.request_id, command).await?)
            })
            .await
    }

    async fn report_job_progress(&self, request: Request<v1::ReportJobProgressRequest>) -> Result<Response<v1::ReportJobProgressResponse>, Status> {
        self.shared
            .observe("ReportJobProgress", async {
                let caller = self.shared.caller(&request).await?;
                agent_node(&caller)?;
                let req = request.into_inner();
                let command = Command::JobProgress { job: required_job(req.job_id)?, attempt: req.attempt, progress: req.progress_json };
                self.shared.propose(caller, &req.request_id, command).await?;
                Ok(Response::new(v1::ReportJobProgressResponse {}))
            })
            .await
    }

    async fn append_job_log(&self, request: Request<v1::AppendJobLogRequest>) -> Result<Response<v1::AppendJobLogResponse>, Status> {
        self.shared
            .observe("AppendJobLog", async {
                let node = agent_node(&self.shared.caller(&request).await?)?;
                let req = request.into_inner();
                let job = required_job(req.job_id)?;
                if req.data.len() > job_logs::MAX_CHUNK {
                    return Err(to_status(&DomainError::PayloadTooLarge { size: req.data.len(), limit: job_logs::MAX_CHUNK }));
                }
                if req.offset.checked_add(req.data.len() as u64).is_none_or(|end| end > job_logs::MAX_OFFSET) {
                    return Err(invalid("offset", "beyond any output an attempt writes"));
                }
                // This call reaches the leader (`network::forward`), whose state is current. Only
                // rank 0 (the node of the attempt's first card) speaks for the job's output: a
                // multi-node attempt may span other suppliers' nodes.
                let rank_zero = self.shared.sm.read(|s| {
                    let attempt = s.job(job).and_then(|j| j.attempts.last()).filter(|a| a.number == req.attempt && a.ended_at.is_none());
                    attempt.and_then(|a| a.cards.first()).and_then(|c| s.card(*c)).is_some_and(|c| c.node == node)
                });
                if !rank_zero {
                    return Err(to_status(&DomainError::PermissionDenied(format!(
                        "attempt {} of job {} is not running with rank 0 on this node",
                        req.attempt, job.0
                    ))));
                }
                let append = job_logs::Append { offset: req.offset, data: &req.data, start_here: req.start_here };
                let next_offset = self.shared.job_logs.append((job, req.attempt), append);
                self.shared.metrics.job_log_bytes.set(self.shared.job_logs.held_bytes() as i64);
                Ok(Response::new(v1::AppendJobLogResponse { next_offset }))
            })
            .await
    }

    async fn read_job_log(&self, request: Request<v1::ReadJobLogRequest>) -> Result<Response<v1::ReadJobLogResponse>, Status> {
        self.shared
            .observe("ReadJobLog", async {
                let caller = self.shared.caller(&request).await?;
                let req = request.into_inner();
                let id = required_job(req.job_id)?;
                let max = match req.max_bytes as usize {
                    0 => job_logs::MAX_CHUNK,
                    n => n.min(job_logs::MAX_READ),
                };
                let deadline = tokio::time::Instant::now() + std::time::Duration::from_millis(u64::from(req.wait_ms.min(MAX_LOG_WAIT_MS)));
                let mut changes = self.shared.job_logs.subscribe();
                loop {
                    // Read on the leader (`network::forward`): the state the agents' appends were checked against.
                    let job = self.shared.read_with_archive(Consistency::Stale, |sm| archived::job(sm, id)).await?;
                    let job = job.filter(|j| may_see_job(&caller, j)).ok_or_else(|| to_status(&DomainError::not_found(EntityKind::Job, id)))?;
                    let number = if req.attempt == 0 { job.attempts.last().map_or(0, |a| a.number) } else { req.attempt };
                    let Some(attempt) = job.attempts.iter().find(|a| a.number == number) else {
                        if req.attempt != 0 {
                            return Err(invalid("attempt", &format!("job {} has no attempt {}", id.0, req.attempt)));
                        }
                        // Not placed yet: nothing to show, and more may come unless the job is over.
                        let over = !job.state.is_live();
                        let empty = v1::ReadJobLogResponse {
                            from_offset: req.from_offset,
                            next_offset: req.from_offset,
                            retained_from: req.from_offset,
                            ended: over,
                            ..Default::default()
                        };
                        if over || tokio::time::Instant::now() >= deadline {
                            return Ok(Response::new(empty));
                        }
                        let _ = tokio::time::timeout_at(deadline.min(tokio::time::Instant::now() + LOG_RECHECK), changes.changed()).await;
                        continue;
                    };
                    // The agent sends the rest of the output before it reports the end.
                    let attempt_ended = attempt.ended_at.is_some() || !job.state.is_live();
                    let chunk = self.shared.job_logs.read((id, number), req.from_offset, max).unwrap_or(job_logs::Chunk {
                        from: req.from_offset,
                        next: req.from_offset,
                        retained_from: req.from_offset,
                        end: req.from_offset,
                        data: Vec::new(),
                    });
                    let ended = attempt_ended && chunk.next >= chunk.end;
                    if !chunk.data.is_empty() || ended || tokio::time::Instant::now() >= deadline {
                        return Ok(Response::new(v1::ReadJobLogResponse {
                            attempt: number,
                            from_offset: chunk.from,
                            data: chunk.data,
                            next_offset: chunk.next,
                            retained_from: chunk.retained_from,
                            ended,
                        }));
                    }
                    // More output, or (checked again after a while) the attempt's end.
                    let _ = tokio::time::timeout_at(deadline.min(tokio::time::Instant::now() + LOG_RECHECK), changes.changed()).await;
                }
            })
            .await
    }

    async fn grant_job_outputs(&self, request: Request<v1::GetJobRequest>) -> Result<Response<v1::JobOutputsGrant>, Status> {
        self.shared
            .observe("GrantJobOutputs", async {
                let consistency = Consistency::of(&request);
                let caller = self.shared.caller(&request).await?;
                let id = required_job(request.get_ref().job_id)?;
                let job = self.shared.read_with_archive(consistency, |sm| archived::job(sm, id)).await?;
                // The owner's alone: operators see jobs, not what they made.
                let job = job.filter(|j| caller == Caller::Account(j.owner)).ok_or_else(|| to_status(&DomainError::not_found(EntityKind::Job, id)))?;
                let key = self.shared.artifact_key.as_ref().ok_or_else(|| {
                    suanli_proto::error::status(suanli_types::ErrorCode::Internal, "this broker node signs no artifact store capabilities", &[])
                })?;
                let expires_ms = now().millis() + OUTPUTS_GRANT_LIFETIME_MS;
                let grant = suanli_artifacts::Grant {
                    owner: job.owner.0,
                    scope: format!("outputs of job {} for its owner", job.id.0),
                    read: job.outputs.values().cloned().collect(),
                    write: false,
                    expires_ms,
                };
                Ok(Response::new(v1::JobOutputsGrant {
                    capability: key.sign(&grant),
                    expires_at_ms: expires_ms,
                    outputs: job.outputs.clone().into_iter().collect(),
                }))
            })
            .await
    }

    async fn grant_artifact_upload(&self, request: Request<v1::GrantArtifactUploadRequest>) -> Result<Response<v1::ArtifactUploadGrant>, Status> {
        self.shared
            .observe("GrantArtifactUpload", async {
                let consistency = Consistency::of(&request);
                let caller = self.shared.caller(&request).await?;
                let purpose = request.into_inner().purpose;
                if purpose.len() > 128 || purpose.chars().any(char::is_control) {
                    return Err(invalid("purpose", "at most 128 bytes, no control characters"));
                }
                let researcher = self
                    .shared
                    .read(consistency, |sm| match &caller {
                        Caller::Account(id) => sm.account(*id).filter(|a| a.kind == AccountKind::Researcher).map(|a| a.id),
                        _ => None,
                    })
                    .await?
                    .ok_or_else(|| to_status(&DomainError::PermissionDenied("only a researcher's account uploads artifacts".into())))?;
                let key = self.shared.artifact_key.as_ref().ok_or_else(|| {
                    suanli_proto::error::status(suanli_types::ErrorCode::Internal, "this broker node signs no artifact store capabilities", &[])
                })?;
                let expires_ms = now().millis() + UPLOAD_GRANT_LIFETIME_MS;
                let scope =
                    if purpose.is_empty() { format!("uploads of account {}", researcher.0) } else { format!("uploads of account {}: {purpose}", researcher.0) };
                let grant = suanli_artifacts::Grant { owner: researcher.0, scope, read: Vec::new(), write: true, expires_ms };
                Ok(Response::new(v1::ArtifactUploadGrant { capability: key.sign(&grant), expires_at_ms: expires_ms }))
            })
            .await
    }

    async fn report_job_checkpoint(&self, request: Request<v1::ReportJobCheckpointRequest>) -> Result<Response<v1::Job>, Status> {
        self.shared
            .observe("ReportJobCheckpoint", async {
                let caller = self.shared.caller(&request).await?;
                agent_node(&caller)?;
                let req = request.into_inner();
                let command = Command::JobCheckpoint { job: required_job(req.job_id)?, attempt: req.attempt, sha256: req.sha256 };
                job_reply(&self.shared, self.shared.propose(caller, &req.request_id, command).await?)
            })
            .await
    }
}

/// Everything one scheduling round needs, read at one index.
pub fn scheduling_view(s: &State) -> v1::SchedulingView {
    let mut cards = Vec::new();
    for lease in s.leases().filter(|l| l.state == LeaseState::Active) {
        for card in lease.cards.iter().filter_map(|c| s.card(*c)) {
            cards.push(v1::SchedulableCard {
                card_id: card.id.0,
                node_id: card.node.0,
                model: card.spec.model.clone(),
                vram_mib: card.spec.vram_mib,
                lease_id: lease.id.0,
                owner_id: lease.researcher.0,
                healthy: card.health == CardHealth::Healthy,
                paid_until_ms: lease.paid_until.map_or(0, |t| t.millis()),
                price_per_card: Some(money_to_wire(&lease.price_per_card)),
                billing_mode: billing_mode_to_wire(lease.billing_mode),
            });
        }
    }
    let silent: std::collections::BTreeSet<u64> = s.cards().filter(|c| c.health == CardHealth::AgentSilent).map(|c| c.node.0).collect();
    let auto_leases = s
        .leases()
        .filter(|l| l.state.is_live())
        .filter_map(|l| {
            let job = l.auto_for?;
            Some(v1::AutoLeaseState {
                lease_id: l.id.0,
                job_id: job.0,
                state: lease_state_to_wire(l.state),
                idle: !l.cards.iter().any(|c| s.card_jobs().contains_key(c)),
            })
        })
        .collect();
    let lease = s.scheduler_lease();
    v1::SchedulingView {
        auto_leases,
        cards,
        live_jobs: s.live_jobs().map(|j| job_to_wire(s, j)).collect(),
        lease: Some(v1::SchedulerLease { holder: lease.holder.clone(), epoch: lease.epoch, expires_at_ms: lease.expires_at.millis() }),
        now_ms: now().millis(),
        silent_node_ids: silent.into_iter().collect(),
    }
}

/// The account a billing read is about: 0 means the caller's own; anyone but the account
/// itself needs the platform or an operator.
fn billing_subject(caller: &Caller, account_id: u64) -> Result<AccountId, Status> {
    match (caller, account_id) {
        (Caller::Account(me), 0) => Ok(*me),
        (Caller::Account(me), id) if me.0 == id => Ok(*me),
        (Caller::Platform | Caller::Operator(_), id) if id != 0 => Ok(AccountId(id)),
        (Caller::Platform | Caller::Operator(_), _) => Err(invalid("account_id", "required")),
        _ => Err(to_status(&DomainError::not_found(EntityKind::Account, account_id))),
    }
}

fn currency_or_cny(raw: &str) -> Result<Currency, Status> {
    if raw.is_empty() {
        return Ok(Currency::cny());
    }
    Currency::parse(raw).map_err(|e| to_status(&e.into()))
}

fn month(raw: &str) -> Result<Month, Status> {
    Month::parse(raw).ok_or_else(|| invalid("month", "a month as YYYY-MM"))
}

fn balance_of(s: &State, account: AccountId, currency: &Currency) -> v1::Balance {
    let (reliability_score, evaluations) = s.reliability(account).unwrap_or((0, 0));
    v1::Balance {
        account_id: account.0,
        currency: currency.as_str().into(),
        available_minor: s.balance(LedgerAccount::Available(account), currency),
        held_minor: s.balance(LedgerAccount::Held(account), currency),
        remote_held_minor: s.balance(LedgerAccount::RemoteHeld(account), currency),
        earnings_minor: s.balance(LedgerAccount::Earnings(account), currency),
        credit_limit_minor: s.credit_limit(account, currency),
        reliability_score,
        evaluations: evaluations as u32,
    }
}

/// A month's statement: opening and closing balances, totals by kind, a line per lease, and
/// the cost of each job that ended in the month.
pub fn statement(sm: &StateMachineStore, account: AccountId, month: Month, currency: &Currency) -> Result<v1::Statement, StoreError> {
    let (start, _) = month.bounds();
    let mine = [LedgerAccount::Available(account), LedgerAccount::Earnings(account)];
    let every_line = archived::transactions_of(sm, account, None, 0, usize::MAX)?;
    let opening: i64 =
        every_line.iter().filter(|tx| tx.at < start && tx.currency == *currency).map(|tx| mine.iter().map(|a| tx.net_for(*a)).sum::<i64>()).sum();
    let mut st =
        v1::Statement { account_id: account.0, month: month.to_string(), currency: currency.as_str().into(), opening_minor: opening, ..Default::default() };
    let mut lines: BTreeMap<LeaseId, v1::StatementLine> = BTreeMap::new();
    let (start, end) = month.bounds();
    for tx in every_line.iter().filter(|tx| tx.at >= start && tx.at < end && tx.currency == *currency) {
        let available = tx.net_for(LedgerAccount::Available(account));
        let earned = tx.net_for(LedgerAccount::Earnings(account));
        let line = tx.lease.map(|l| lines.entry(l).or_insert_with(|| v1::StatementLine { lease_id: l.0, ..Default::default() }));
        match tx.kind {
            TransactionKind::Deposit => st.deposits_minor += available,
            TransactionKind::Charge if earned != 0 => {
                st.earned_minor += earned;
                if let Some(line) = line {
                    line.charged_minor += earned;
                    line.fee_minor += tx.net_for(LedgerAccount::PlatformFees);
                }
            }
            TransactionKind::Charge => {
                let charged = -tx.net_for(LedgerAccount::Held(account));
                st.charged_minor += charged;
                if let Some(line) = line {
                    line.charged_minor += charged;
                }
            }
            TransactionKind::Refund => {
                st.refunded_minor += available;
                if let Some(line) = line {
                    line.refunded_minor += available;
                }
            }
            TransactionKind::ServiceCredit => {
                st.credited_minor += available;
                if let Some(line) = line {
                    line.credited_minor += available;
                }
            }
            TransactionKind::Hold | TransactionKind::Payout => {}
        }
        st.closing_minor += available + earned;
    }
    st.closing_minor += opening;
    st.leases = lines.into_values().collect();
    st.jobs = archived::jobs_of(sm, account)?
        .iter()
        .filter(|j| j.ended_at.is_some_and(|t| t >= start && t < end))
        .map(|j| v1::JobCost { job_id: j.id.0, name: j.spec.name.clone(), card_ms: j.attained_card_ms, cost_minor: j.cost_minor })
        .collect();
    Ok(st)
}

/// The Broker service's money calls (`broker_api.rs` delegates here).
pub mod billing {
    use super::*;

    pub async fn deposit(shared: &Shared, request: Request<v1::DepositRequest>) -> Result<Response<v1::LedgerTransaction>, Status> {
        shared
            .observe("Deposit", async {
                let caller = shared.caller(&request).await?;
                let req = request.into_inner();
                let amount = req.amount.as_ref().ok_or_else(|| invalid("amount", "required"))?;
                let amount = money_from_wire(amount).map_err(|e| to_status(&e.into()))?;
                let account = AccountId(req.account_id);
                let limits = shared.deposit_limits;
                if amount.minor > limits.per_call_minor {
                    return Err(invalid("amount", &format!("at most {} minor units a deposit (max_deposit_minor)", limits.per_call_minor)));
                }
                // A retry of a deposit already made is answered below, whatever the day's total.
                let retry = shared.sm.read(|s| s.remembers(&caller, &req.request_id));
                let today = shared.sm.read(|s| deposited_since(s, super::now().plus_seconds(-24 * 3600)));
                if !retry && today.saturating_add(amount.minor) > limits.per_day_minor {
                    tracing::warn!(target: "audit", %caller, account = account.0, amount = amount.minor, today, "deposit refused: the daily cap");
                    return Err(to_status(&DomainError::PermissionDenied(format!(
                        "deposits today already total {today} minor units; the cap is {} a day (max_deposits_per_day_minor)",
                        limits.per_day_minor
                    ))));
                }
                match shared.propose(caller.clone(), &req.request_id, Command::Deposit { account, amount: amount.clone() }).await? {
                    Applied::Transaction(tx) => {
                        tracing::info!(target: "audit", %caller, account = account.0, amount = amount.minor, transaction = tx.id, "deposit");
                        Ok(Response::new(transaction_to_wire(&tx)))
                    }
                    other => Err(unexpected(&other)),
                }
            })
            .await
    }

    /// Money paid in since `since`, all accounts together (minor units).
    fn deposited_since(s: &crate::state::State, since: suanli_types::Timestamp) -> i64 {
        s.transactions()
            .iter()
            .rev()
            .take_while(|tx| tx.at >= since)
            .filter(|tx| tx.kind == TransactionKind::Deposit)
            .map(|tx| tx.entries.iter().map(|e| e.minor).filter(|m| *m > 0).sum::<i64>())
            .sum()
    }

    pub async fn grant_credit(shared: &Shared, request: Request<v1::GrantCreditRequest>) -> Result<Response<v1::Balance>, Status> {
        shared
            .observe("GrantCredit", async {
                let caller = shared.caller(&request).await?;
                let req = request.into_inner();
                let limit = req.limit.as_ref().ok_or_else(|| invalid("limit", "required"))?;
                let limit = money_from_wire(limit).map_err(|e| to_status(&e.into()))?;
                let account = AccountId(req.account_id);
                let currency = limit.currency.clone();
                shared.propose(caller, &req.request_id, Command::GrantCredit { account, limit }).await?;
                Ok(Response::new(shared.sm.read(|s| balance_of(s, account, &currency))))
            })
            .await
    }

    pub async fn get_balance(shared: &Shared, request: Request<v1::GetBalanceRequest>) -> Result<Response<v1::Balance>, Status> {
        shared
            .observe("GetBalance", async {
                let consistency = Consistency::of(&request);
                let caller = shared.caller(&request).await?;
                let account = billing_subject(&caller, request.get_ref().account_id)?;
                let currency = currency_or_cny(&request.get_ref().currency)?;
                Ok(Response::new(shared.read(consistency, |s| balance_of(s, account, &currency)).await?))
            })
            .await
    }

    pub async fn list_transactions(shared: &Shared, request: Request<v1::ListTransactionsRequest>) -> Result<Response<v1::ListTransactionsResponse>, Status> {
        shared
            .observe("ListTransactions", async {
                let consistency = Consistency::of(&request);
                let caller = shared.caller(&request).await?;
                let account = billing_subject(&caller, request.get_ref().account_id)?;
                let month = match request.get_ref().month.as_str() {
                    "" => None,
                    raw => Some(month(raw)?),
                };
                let page = Page::from_wire(request.get_ref().page_after_id, request.get_ref().page_size)?;
                let (transactions, next_page_after_id) = shared
                    .read_with_archive(consistency, |sm| {
                        // One more than a page from the archive tells whether another page follows.
                        let lines = archived::transactions_of(sm, account, month, page.after, page.limit() + 1)?;
                        Ok(page.take(lines.iter().map(|tx| (tx.id, transaction_to_wire(tx)))))
                    })
                    .await?;
                Ok(Response::new(v1::ListTransactionsResponse { transactions, next_page_after_id }))
            })
            .await
    }

    pub async fn get_statement(shared: &Shared, request: Request<v1::GetStatementRequest>) -> Result<Response<v1::Statement>, Status> {
        shared
            .observe("GetStatement", async {
                let consistency = Consistency::of(&request);
                let caller = shared.caller(&request).await?;
                let req = request.get_ref();
                let account = billing_subject(&caller, req.account_id)?;
                let month = month(&req.month)?;
                let currency = currency_or_cny(&req.currency)?;
                Ok(Response::new(shared.read_with_archive(consistency, |sm| statement(sm, account, month, &currency)).await?))
            })
            .await
    }

    pub async fn get_service_evaluation(shared: &Shared, request: Request<v1::GetServiceEvaluationRequest>) -> Result<Response<v1::ServiceEvaluation>, Status> {
        shared
            .observe("GetServiceEvaluation", async {
                let consistency = Consistency::of(&request);
                let caller = shared.caller(&request).await?;
                let lease = LeaseId(request.get_ref().lease_id);
                shared
                    .read_with_archive(consistency, |sm| {
                        let visible = archived::lease(sm, lease)?.is_some_and(|l| may_see_lease(&caller, &l));
                        Ok(archived::evaluation(sm, lease)?.filter(|_| visible).map(|e| v1::ServiceEvaluation {
                            lease_id: e.lease.0,
                            supplier_id: e.supplier.0,
                            uptime_bps: e.uptime_bps,
                            cards_dropped: e.cards_dropped,
                            utilization_bps: e.utilization_bps,
                            score: e.score,
                            at_ms: e.at.millis(),
                        }))
                    })
                    .await?
                    .map(Response::new)
                    .ok_or_else(|| to_status(&DomainError::not_found(EntityKind::Lease, lease)))
            })
            .await
    }
}

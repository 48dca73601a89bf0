//! `suanli.v1.ClusterAdmin`: membership of the broker's Raft group, platform token only.

use std::collections::BTreeSet;

use openraft::{BasicNode, ChangeMembers};
use suanli_proto::error::status;
use suanli_proto::to_status;
use suanli_proto::v1::{self, cluster_admin_server::ClusterAdmin};
use suanli_types::{Caller, DomainError, ErrorCode};
use tonic::{Request, Response, Status};

use super::{invalid, Shared};
use crate::state::Command;

pub struct Admin {
    shared: Shared,
}

impl Admin {
    pub fn new(shared: Shared) -> Self {
        Admin { shared }
    }

    async fn require_platform<T>(&self, request: &Request<T>) -> Result<(), Status> {
        match self.shared.caller(request).await? {
            Caller::Platform => Ok(()),
            _ => Err(to_status(&DomainError::PermissionDenied("cluster administration needs the platform token".into()))),
        }
    }

    fn status(&self) -> v1::ClusterStatus {
        let m = self.shared.raft.metrics().borrow().clone();
        let membership = m.membership_config.membership();
        let voters: BTreeSet<u64> = membership.voter_ids().collect();
        v1::ClusterStatus {
            node_id: m.id,
            leader_id: m.current_leader.unwrap_or(0),
            term: m.current_term,
            last_log_index: m.last_log_index.unwrap_or(0),
            applied_index: m.last_applied.map_or(0, |l| l.index),
            snapshot_index: m.snapshot.map_or(0, |l| l.index),
            members: membership
                .nodes()
                .map(|(id, node)| v1::ClusterMember {
                    node_id: *id,
                    address: node.addr.clone(),
                    voter: voters.contains(id),
                    newest_store_format: if *id == m.id {
                        crate::storage::FORMAT_VERSION
                    } else {
                        self.shared.peer_formats.newest(*id, std::time::Duration::MAX).unwrap_or(0)
                    },
                })
                .collect(),
            store_format: crate::storage::FORMAT_VERSION,
            cluster_format: self.shared.sm.read(|s| s.cluster_format()),
        }
    }
}

/// How long adding a learner waits for it to catch up with the log.
const LEARNER_CATCH_UP: std::time::Duration = std::time::Duration::from_secs(120);

/// Largest chunk of an exported state on the wire.
const EXPORT_CHUNK_BYTES: usize = 1 << 20;

pub type ExportStream = std::pin::Pin<Box<dyn futures::Stream<Item = Result<v1::StateChunk, Status>> + Send>>;

fn raft_error(e: impl std::fmt::Display) -> Status {
    status(ErrorCode::Unavailable, format!("membership change failed: {e}"), &[])
}

#[tonic::async_trait]
impl ClusterAdmin for Admin {
    async fn status(&self, request: Request<v1::StatusRequest>) -> Result<Response<v1::ClusterStatus>, Status> {
        self.require_platform(&request).await?;
        Ok(Response::new(self.status()))
    }

    type ExportStateStream = ExportStream;

    async fn export_state(&self, request: Request<v1::ExportStateRequest>) -> Result<Response<ExportStream>, Status> {
        use sha2::Digest as _;
        self.require_platform(&request).await?;
        // Everything committed before the call is in it: only a leader that has just confirmed
        // its leadership and applied all it committed exports.
        self.shared
            .linearizable()
            .await
            .map_err(|e| status(ErrorCode::Unavailable, format!("this node cannot vouch its state is current ({e}); ask the leader"), &[]))?;
        let (data, position) = self.shared.sm.export().map_err(|e| status(ErrorCode::Internal, e.to_string(), &[]))?;
        let header = v1::StateChunk {
            store_format: crate::storage::FORMAT_VERSION,
            last_applied_index: position.map_or(0, |l| l.index),
            last_applied_term: position.map_or(0, |l| l.leader_id.term),
            total_bytes: data.len() as u64,
            sha256: hex::encode(sha2::Sha256::digest(&data)),
            data: Vec::new(),
        };
        tracing::info!(target: "audit", index = header.last_applied_index, bytes = header.total_bytes, "state exported for a backup");
        let chunks: Vec<Result<v1::StateChunk, Status>> =
            std::iter::once(header).chain(data.chunks(EXPORT_CHUNK_BYTES).map(|c| v1::StateChunk { data: c.to_vec(), ..Default::default() })).map(Ok).collect();
        Ok(Response::new(Box::pin(tokio_stream::iter(chunks))))
    }

    async fn add_learner(&self, request: Request<v1::AddLearnerRequest>) -> Result<Response<v1::ClusterStatus>, Status> {
        self.require_platform(&request).await?;
        let req = request.into_inner();
        if req.node_id == 0 {
            return Err(invalid("node_id", "required"));
        }
        if req.address.parse::<std::net::SocketAddr>().is_err() && !req.address.contains(':') {
            return Err(invalid("address", "host:port"));
        }
        if self.shared.sm.read(|s| s.broker_node_retired(req.node_id)) {
            return Err(invalid("node_id", "this ID belonged to a removed node; a wiped node rejoins under a new ID"));
        }
        let _turn = self.shared.membership_turn.lock().await;
        // Waits for the learner to catch up, for a while: one that never does (a broker older
        // than the cluster format cannot read the log) is reported, not waited on forever.
        let added = tokio::time::timeout(LEARNER_CATCH_UP, self.shared.raft.add_learner(req.node_id, BasicNode { addr: req.address }, true));
        match added.await {
            Ok(result) => result.map_err(raft_error)?,
            Err(_) => {
                let format = self.shared.sm.read(|s| s.cluster_format());
                return Err(status(
                    ErrorCode::Unavailable,
                    format!(
                        "node {} was added as a learner but did not catch up within {}s; it must run a broker of store format {format} or later (`cluster remove` it otherwise)",
                        req.node_id,
                        LEARNER_CATCH_UP.as_secs()
                    ),
                    &[],
                ));
            }
        };
        Ok(Response::new(self.status()))
    }

    async fn promote(&self, request: Request<v1::NodeRef>) -> Result<Response<v1::ClusterStatus>, Status> {
        self.require_platform(&request).await?;
        let id = request.into_inner().node_id;
        let _turn = self.shared.membership_turn.lock().await;
        self.shared.raft.change_membership(ChangeMembers::AddVoterIds(BTreeSet::from([id])), false).await.map_err(raft_error)?;
        Ok(Response::new(self.status()))
    }

    async fn remove(&self, request: Request<v1::NodeRef>) -> Result<Response<v1::ClusterStatus>, Status> {
        self.require_platform(&request).await?;
        let id = request.into_inner().node_id;
        let _turn = self.shared.membership_turn.lock().await;
        let voter = self.shared.raft.metrics().borrow().membership_config.membership().voter_ids().any(|v| v == id);
        if voter {
            self.shared.raft.change_membership(ChangeMembers::RemoveVoters(BTreeSet::from([id])), false).await.map_err(raft_error)?;
        } else {
            self.shared.raft.change_membership(ChangeMembers::RemoveNodes(BTreeSet::from([id])), false).await.map_err(raft_error)?;
        }
        self.shared.propose(Caller::Platform, &format!("retire-broker-node-{id}"), Command::RetireBrokerNode { node: id }).await?;
        Ok(Response::new(self.status()))
    }
}

//! The cluster format: the store format every node of a cluster can read, which the cluster
//! writes in (its log entries, the snapshots it sends) and speaks on the Raft wire.
//!
//! During a rolling upgrade, nodes of store format N-1 and N run side by side. Nodes of format N
//! keep writing format N-1 to their cluster (the snapshots they send in its encoding, log
//! entries only of commands format N-1 knows, Raft messages in its wire format; their own data
//! directory and their backups are format N) until the leader, having heard
//! from every member that it runs format N or later, proposes `RaiseClusterFormat`. From that
//! entry on the cluster is format N: its new commands may be proposed, and a node of format
//! N-1 can no longer join (it could not read what follows). Every cluster starts at
//! [`FIRST_CLUSTER_FORMAT`] and is raised within a leader's round once its members agree, so a
//! cluster made by one version and one made by another reach the same state the same way.

use serde::{Deserialize, Serialize};

use super::State;
use crate::state::Response;

/// The oldest store format this code writes for its cluster (and speaks on the wire): the
/// format before it, for the nodes of a cluster that still run it.
pub const FIRST_CLUSTER_FORMAT: u32 = 5;

/// A cluster's store format; a state that does not record one (formats 3 to 5 wrote none)
/// is at [`FIRST_CLUSTER_FORMAT`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct ClusterFormat(pub u32);

impl Default for ClusterFormat {
    fn default() -> Self {
        ClusterFormat(FIRST_CLUSTER_FORMAT)
    }
}

impl State {
    /// The store format the cluster writes in.
    pub fn cluster_format(&self) -> u32 {
        self.cluster_format.0
    }

    pub(super) fn raise_cluster_format(&mut self, to: u32) -> Response {
        self.cluster_format = self.cluster_format.max(ClusterFormat(to));
        Response::Empty
    }

    /// The bytes format 5 wrote for this state: format 6's without the trailing cluster
    /// format (postcard writes a struct's fields one after another, and `cluster_format` is
    /// the last). Only meaningful while the cluster is at format 5.
    pub fn encode_as_format_5(&self) -> Result<Vec<u8>, postcard::Error> {
        let mut bytes = postcard::to_allocvec(self)?;
        let trailer = postcard::to_allocvec(&self.cluster_format)?;
        debug_assert!(bytes.ends_with(&trailer), "cluster_format is State's last serialized field");
        bytes.truncate(bytes.len() - trailer.len());
        Ok(bytes)
    }
}

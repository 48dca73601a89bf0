//! The portal's control of the services on an agent's node: requests through the tunnel that
//! name [`CONTROL_SERVICE`](crate::wire::CONTROL_SERVICE), which the agent answers itself. The
//! portal is the source of truth for which services should run; the agent keeps none of it on
//! disk and is told again whenever its tunnel opens.
//!
//! | Method | Path | Body | Answer |
//! |--------|------|------|--------|
//! | `PUT` | `/v1/services/{id}/files/{name}?sha256=…` | the file's bytes | `204`; `400` when they do not hash to `sha256` |
//! | `PUT` | `/v1/services/{id}` | [`ServiceSpec`] | `200` [`ServiceStatus`]; `409` for a generation older than the one running |
//! | `GET` | `/v1/services` | | `200` `[ServiceStatus]` |
//! | `GET` | `/v1/services/{id}/log` | | `200` the end of the service's output (text) |
//! | `DELETE` | `/v1/services/{id}` | | `204` (also when it was not running) |
//!
//! Errors are [`ControlError`] as JSON with a status. Part of `suanli-tunnel/1`: fields may be
//! added (readers ignore what they do not know); a new [`ServiceKind`] is refused by an older
//! agent with `400`, which the portal shows as "this node cannot run that".

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// What the portal asks the agent to keep running.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServiceSpec {
    /// The lease whose account, control groups and cards it runs with (it must be live here).
    pub lease: u64,
    /// Raised by every change the portal makes (a new model version). A higher one starts beside
    /// the running one, takes the traffic once it answers its health check, and the old one
    /// stops after the requests it holds have finished: an update without a failed request.
    pub generation: u64,
    /// Processes, each on its own card of the lease here (in turn when there are fewer cards).
    pub replicas: u32,
    pub kind: ServiceKind,
}

/// What runs.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum ServiceKind {
    /// `suanli-job serve` of a classifier (its `model.json` and `model.safetensors`), put with
    /// `files/{name}` first: `files` maps each name to its SHA-256.
    ClassifierDemo { files: BTreeMap<String, String> },
    /// A terminal in the browser: each WebSocket at `/pty` a login shell of the lease's user.
    Terminal,
    /// JupyterLab, in the lease's home, on the node's Python (and PyTorch).
    Jupyter,
}

/// No files.
static NONE: BTreeMap<String, String> = BTreeMap::new();

impl ServiceKind {
    pub fn files(&self) -> &BTreeMap<String, String> {
        match self {
            ServiceKind::ClassifierDemo { files } => files,
            ServiceKind::Terminal | ServiceKind::Jupyter => &NONE,
        }
    }
}

/// Where a service is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ServiceState {
    /// Started, not yet answering its health check.
    Starting,
    /// Answering (at least one replica of the serving generation).
    Ready,
    /// Its process ended; it starts again after a pause that grows with each end.
    Restarting,
    /// Stopped: asked to, or its lease is no longer live here.
    Stopped,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServiceStatus {
    pub id: u64,
    pub lease: u64,
    /// The generation taking requests (the newest one once it is ready).
    pub generation: u64,
    pub state: ServiceState,
    /// Replicas answering now.
    pub ready_replicas: u32,
    /// Times a process of it ended and was started again.
    pub restarts: u32,
    /// How the last process ended, when one did (`exit status 1`, `signal 9`).
    #[serde(default)]
    pub last_exit: Option<String>,
}

/// The agent's refusal of a control request, as its JSON body says it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
#[error("{code}: {message}")]
pub struct ControlError {
    pub code: String,
    pub message: String,
}

/// Names of a service's files: letters, digits, `.`, `-` and `_`, not starting with a dot, up to
/// 64 characters (they become file names on the node).
pub fn valid_file_name(name: &str) -> bool {
    (1..=64).contains(&name.len()) && !name.starts_with('.') && name.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b'_'))
}

/// The paths above, for both ends.
pub mod path {
    pub const SERVICES: &str = "/v1/services";

    pub fn service(id: u64) -> String {
        format!("{SERVICES}/{id}")
    }

    pub fn file(id: u64, name: &str, sha256: &str) -> String {
        format!("{SERVICES}/{id}/files/{name}?sha256={sha256}")
    }

    pub fn log(id: u64) -> String {
        format!("{SERVICES}/{id}/log")
    }
}

#[cfg(test)]
mod golden_tests {
    use super::*;

    /// Version 1's JSON, as agents and portals of other releases read it.
    #[test]
    fn version_1_is_pinned() {
        let spec = ServiceSpec {
            lease: 7,
            generation: 2,
            replicas: 1,
            kind: ServiceKind::ClassifierDemo { files: BTreeMap::from([("model.json".to_owned(), "ab".to_owned())]) },
        };
        let golden = r#"{"lease":7,"generation":2,"replicas":1,"kind":{"kind":"classifier_demo","files":{"model.json":"ab"}}}"#;
        assert_eq!(serde_json::to_string(&spec).unwrap(), golden);
        assert_eq!(serde_json::from_str::<ServiceSpec>(golden).unwrap(), spec);
        let status = ServiceStatus { id: 9, lease: 7, generation: 2, state: ServiceState::Ready, ready_replicas: 1, restarts: 0, last_exit: None };
        let golden = r#"{"id":9,"lease":7,"generation":2,"state":"ready","ready_replicas":1,"restarts":0,"last_exit":null}"#;
        assert_eq!(serde_json::to_string(&status).unwrap(), golden);
        assert_eq!(
            serde_json::from_str::<ServiceStatus>(r#"{"id":9,"lease":7,"generation":2,"state":"ready","ready_replicas":1,"restarts":0,"new":1}"#).unwrap(),
            status
        );
        let states: Vec<String> = [ServiceState::Starting, ServiceState::Ready, ServiceState::Restarting, ServiceState::Stopped]
            .iter()
            .map(|s| serde_json::to_string(s).unwrap())
            .collect();
        assert_eq!(states, [r#""starting""#, r#""ready""#, r#""restarting""#, r#""stopped""#]);
        assert_eq!(
            [path::service(9), path::file(9, "model.json", "ab"), path::log(9)],
            ["/v1/services/9", "/v1/services/9/files/model.json?sha256=ab", "/v1/services/9/log"]
        );
        let terminal = ServiceSpec { lease: 7, generation: 1, replicas: 1, kind: ServiceKind::Terminal };
        assert_eq!(serde_json::to_string(&terminal).unwrap(), r#"{"lease":7,"generation":1,"replicas":1,"kind":{"kind":"terminal"}}"#);
        assert_eq!(serde_json::to_string(&ServiceKind::Jupyter).unwrap(), r#"{"kind":"jupyter"}"#);
        assert!(
            serde_json::from_str::<ServiceSpec>(r#"{"lease":7,"generation":2,"replicas":1,"kind":{"kind":"unknown"}}"#).is_err(),
            "an unknown kind is refused"
        );
    }

    #[test]
    fn file_names_stay_file_names() {
        for good in ["model.json", "model.safetensors", "a-b_c.1"] {
            assert!(valid_file_name(good), "{good}");
        }
        for bad in ["", ".hidden", "..", "a/b", "a\\b", "a b", &"x".repeat(65), "模型"] {
            assert!(!valid_file_name(bad), "{bad:?}");
        }
    }
}

//! What crosses between an agent and a portal of different releases: the version is in the
//! upgrade token, so a portal answers only the versions it speaks (`426` with the ones it does)
//! and a newer agent can fall back. Everything inside the upgraded connection is HTTP/2 with
//! the headers below. Changing any of these is a new version.

/// The token an agent sends in `Upgrade:` (version 1).
pub const UPGRADE_TOKEN: &str = "suanli-tunnel/1";
/// The versions this build speaks, newest first.
pub const VERSIONS: &[&str] = &[UPGRADE_TOKEN];
/// Where the agent asks for the tunnel (`GET`, with `Authorization: Bearer <ticket>`).
pub const TUNNEL_PATH: &str = "/api/v1/agent-tunnel";
/// The service a forwarded request is for, as the portal names it (decimal service ID).
pub const SERVICE_HEADER: &str = "suanli-service";
/// On the `200` answer to an extended CONNECT: the status the service answered its upgrade
/// with (`101` when it switched; the portal relays it to the visitor).
pub const UPGRADED_HEADER: &str = "suanli-upgraded";
/// On an answer the agent made itself (not the service): why, as a code below.
pub const AGENT_ERROR_HEADER: &str = "suanli-agent-error";
/// The service name the agent answers itself: the portal's control of the node's services
/// ([`crate::control`]). Services are named by decimal IDs, so no service has this name.
pub const CONTROL_SERVICE: &str = "agent";

/// Why the agent answered a forwarded request itself.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AgentError {
    /// No such service on this node, or not one this lease may reach (`404`).
    UnknownService,
    /// The service exists but does not answer (stopped, starting, crashed) (`502`).
    Unreachable,
    /// The request cannot be forwarded (no service header, a malformed path) (`400`).
    BadRequest,
}

impl AgentError {
    pub const ALL: [AgentError; 3] = [AgentError::UnknownService, AgentError::Unreachable, AgentError::BadRequest];

    pub fn code(self) -> &'static str {
        match self {
            AgentError::UnknownService => "UNKNOWN_SERVICE",
            AgentError::Unreachable => "SERVICE_UNREACHABLE",
            AgentError::BadRequest => "BAD_REQUEST",
        }
    }

    pub fn status(self) -> http::StatusCode {
        match self {
            AgentError::UnknownService => http::StatusCode::NOT_FOUND,
            AgentError::Unreachable => http::StatusCode::BAD_GATEWAY,
            AgentError::BadRequest => http::StatusCode::BAD_REQUEST,
        }
    }

    pub fn from_code(code: &str) -> Option<AgentError> {
        AgentError::ALL.into_iter().find(|e| e.code() == code)
    }
}

#[cfg(test)]
mod golden_tests {
    use super::*;

    /// The bytes of version 1 as agents and portals of other releases see them: a change here
    /// is a new version (a new token beside the old one in `VERSIONS`), never an edit.
    #[test]
    fn version_1_is_pinned() {
        assert_eq!(UPGRADE_TOKEN, "suanli-tunnel/1");
        assert_eq!(TUNNEL_PATH, "/api/v1/agent-tunnel");
        assert_eq!([SERVICE_HEADER, UPGRADED_HEADER, AGENT_ERROR_HEADER], ["suanli-service", "suanli-upgraded", "suanli-agent-error"]);
        assert_eq!(CONTROL_SERVICE, "agent");
        let codes: Vec<(&str, u16)> = AgentError::ALL.iter().map(|e| (e.code(), e.status().as_u16())).collect();
        assert_eq!(codes, [("UNKNOWN_SERVICE", 404), ("SERVICE_UNREACHABLE", 502), ("BAD_REQUEST", 400)]);
        for e in AgentError::ALL {
            assert_eq!(AgentError::from_code(e.code()), Some(e));
        }
    }
}

//! Service identities: the platform's own services (the portal, the scheduler, the payment
//! intake) each get a token of their own with only the powers they need, instead of sharing the
//! one platform token that may do everything. A service token authenticates as the platform
//! (`Caller::Platform`, or an operator role it names), but before any service sees the call
//! the transport layer (`network::forward`) checks the method against the token's powers, so a
//! stolen scheduler token pays no money in and acts as no operator.
//!
//! The platform token itself keeps every power (a single-service deployment, development);
//! operators who split their services configure `[[broker.services]]` and stop handing it out.

use std::sync::Arc;

use serde::Deserialize;
use suanli_proto::client::ACTING_OPERATOR_HEADER;
use suanli_types::SecretHash;

use super::TOKEN_DOMAIN;

/// What a service token may do.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Power {
    /// Register accounts and manage their SSH keys and tokens (the portal).
    Accounts,
    /// Pay money in and grant credit (the payment intake).
    Deposits,
    /// Act as an operator in a role (`x-suanli-acting-operator`), as the portal does for the
    /// operators it authenticated.
    Operators,
    /// Place, stop and lease for jobs (the scheduler).
    Scheduling,
    /// Read the market, the ledger, jobs and telemetry, and watch events.
    Read,
    /// Change the cluster's membership.
    Admin,
    /// Lease other federation members' cards for this member's researchers, holding their
    /// money (the federation gateway).
    Federation,
}

/// The power a method needs when a service calls it; `None`: no service may call it (agents'
/// and suppliers' own calls).
fn power_of(path: &str) -> Option<Power> {
    let (service, method) = path.trim_start_matches("/suanli.v1.").split_once('/')?;
    Some(match (service, method) {
        ("Broker", "RegisterAccount" | "AddSshKey" | "RemoveSshKey" | "RotateAccountToken") => Power::Accounts,
        ("Broker", "Deposit" | "GrantCredit") => Power::Deposits,
        ("Broker", "RequestRemoteLease" | "ConfirmRemoteLease" | "EndRemoteLease") => Power::Federation,
        ("JobService", "AcquireSchedulerLease" | "GetSchedulingView" | "PlaceJobs" | "StopJobs" | "AutoLease") => Power::Scheduling,
        ("ClusterAdmin", "AddLearner" | "Promote" | "Remove" | "ExportState") => Power::Admin,
        ("ClusterAdmin", "Status") | ("Broker", "Watch") => Power::Read,
        ("Broker" | "JobService" | "TaskService", m) if m.starts_with("Get") || m.starts_with("List") => Power::Read,
        ("MonitoringService", "QueryTelemetry" | "SubscribeTelemetry") => Power::Read,
        _ => return None,
    })
}

/// One service's token (its hash) and powers.
#[derive(Clone, Debug)]
pub struct ServiceToken {
    pub name: String,
    pub token_hash: SecretHash,
    pub powers: Vec<Power>,
}

impl ServiceToken {
    pub fn new(name: &str, token: &str, powers: Vec<Power>) -> ServiceToken {
        ServiceToken { name: name.to_owned(), token_hash: SecretHash::of(TOKEN_DOMAIN, token), powers }
    }
}

/// The configured service tokens, the same on every node.
#[derive(Clone, Debug, Default)]
pub struct Services(Arc<Vec<ServiceToken>>);

impl Services {
    pub fn new(tokens: Vec<ServiceToken>) -> Services {
        Services(Arc::new(tokens))
    }

    /// Whether `hash` is a service's token.
    pub fn knows(&self, hash: &SecretHash) -> bool {
        self.0.iter().any(|s| s.token_hash.matches(hash))
    }

    /// Why a call made with a service token may not go on (`None`: it may, or it was not made
    /// with a service token at all: other credentials are checked where they are established).
    pub fn refusal<B>(&self, request: &http::Request<B>) -> Option<String> {
        if self.0.is_empty() {
            return None;
        }
        let header = request.headers().get(http::header::AUTHORIZATION)?.to_str().ok()?;
        let token = header.strip_prefix("Bearer ")?.trim();
        let hash = SecretHash::of(TOKEN_DOMAIN, token);
        let service = self.0.iter().find(|s| s.token_hash.matches(&hash))?;
        let path = request.uri().path();
        let needed = if request.headers().contains_key(ACTING_OPERATOR_HEADER) { Some(Power::Operators) } else { power_of(path) };
        match needed {
            Some(power) if service.powers.contains(&power) => None,
            Some(power) => Some(format!("the {} service's token lacks the {power:?} power {path} needs", service.name)),
            None => Some(format!("{path} is not a call services make")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn call(path: &str, token: &str, acting: bool) -> http::Request<()> {
        let mut builder = http::Request::builder().uri(path).header("authorization", format!("Bearer {token}"));
        if acting {
            builder = builder.header(ACTING_OPERATOR_HEADER, "dispatcher");
        }
        builder.body(()).expect("request")
    }

    #[test]
    fn each_service_token_does_only_what_its_powers_allow() {
        let services = Services::new(vec![
            ServiceToken::new("scheduler", "scheduler-token-0123456789", vec![Power::Scheduling, Power::Read]),
            ServiceToken::new("payments", "payments-token-0123456789", vec![Power::Deposits]),
        ]);
        let scheduler = |path: &str| services.refusal(&call(path, "scheduler-token-0123456789", false));
        assert_eq!(scheduler("/suanli.v1.JobService/PlaceJobs"), None);
        assert_eq!(scheduler("/suanli.v1.Broker/ListCatalogue"), None);
        assert!(scheduler("/suanli.v1.Broker/Deposit").is_some());
        assert!(scheduler("/suanli.v1.Broker/RegisterAccount").is_some());
        assert!(scheduler("/suanli.v1.ClusterAdmin/AddLearner").is_some());
        assert!(scheduler("/suanli.v1.SupplierService/EnrollAgent").is_some(), "not a service call");
        assert!(services.refusal(&call("/suanli.v1.Broker/EndLease", "scheduler-token-0123456789", true)).is_some(), "no operator");
        let payments = |path: &str| services.refusal(&call(path, "payments-token-0123456789", false));
        assert_eq!(payments("/suanli.v1.Broker/Deposit"), None);
        assert!(payments("/suanli.v1.Broker/ListLeases").is_some());
        // Other tokens are not this check's business.
        assert_eq!(services.refusal(&call("/suanli.v1.Broker/Deposit", "an-account-token", false)), None);
        assert_eq!(Services::default().refusal(&call("/suanli.v1.Broker/Deposit", "scheduler-token-0123456789", false)), None);
    }
}

//! `POST /api/v1/operations/alertmanager`: the platform's own monitoring reaches its operators
//! through the channels researchers and suppliers are alerted by (SPEC 000 §7.4.2) — mail,
//! SMS, webhooks, quiet hours, the per-hour limit. Prometheus' Alertmanager posts its webhook
//! here (`ops/prometheus/alertmanager.yml`) with the bearer token the portal was given
//! (`alertmanager_token_file`); without one configured every call is refused.
//!
//! Each incident is one condition (`ops:<fingerprint>:<startsAt>`): firing opens it once however
//! often Alertmanager repeats itself (and however many Alertmanager replicas post it: one open
//! alert per condition is a unique index), resolved closes it with one message to the same
//! people.

use std::collections::BTreeMap;

use axum::extract::State;
use axum::http::HeaderMap;
use serde::{Deserialize, Serialize};
use sha2::Digest as _;
use subtle::ConstantTimeEq;
use utoipa::ToSchema;

use super::ApiJson;
use crate::alerts::{self, Decision, Subject};
use crate::error::{ApiError, ApiResult, Problems};
use crate::state::AppState;

/// The most alerts one notification may carry (Alertmanager's `max_alerts`, set below it).
const MAX_ALERTS: usize = 1000;

/// Alertmanager's webhook payload (version 4); fields this endpoint does not use are ignored.
#[derive(Deserialize, ToSchema)]
pub struct AlertmanagerNotification {
    /// `4`.
    pub version: String,
    pub alerts: Vec<AlertmanagerAlert>,
}

#[derive(Deserialize, ToSchema)]
pub struct AlertmanagerAlert {
    /// `firing` or `resolved`.
    pub status: String,
    /// `alertname` names the alert.
    pub labels: BTreeMap<String, String>,
    /// `summary`, if any, goes into the message.
    #[serde(default)]
    pub annotations: BTreeMap<String, String>,
    /// Alertmanager's identity of the alert (hex): the same for every incident of one label set.
    pub fingerprint: String,
    /// When this incident began (RFC 3339): with the fingerprint, it names the incident, so a
    /// resolve that never arrived does not silence the next one.
    #[serde(rename = "startsAt")]
    pub starts_at: String,
}

#[derive(Serialize, ToSchema, Debug, PartialEq, Eq)]
pub struct AlertsReceived {
    pub firing: usize,
    pub resolved: usize,
}

/// Alertmanager, as its bearer token proves; checked before the body is read.
pub struct AlertmanagerCaller;

impl axum::extract::FromRequestParts<AppState> for AlertmanagerCaller {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut axum::http::request::Parts, state: &AppState) -> Result<Self, ApiError> {
        authorized(state, &parts.headers)?;
        Ok(AlertmanagerCaller)
    }
}

fn authorized(state: &AppState, headers: &HeaderMap) -> ApiResult<()> {
    // Not configured: nobody gets in (and nobody learns whether it is configured).
    let Some(expected) = &state.settings.alertmanager_token else { return Err(ApiError::unauthenticated()) };
    let presented = headers.get(axum::http::header::AUTHORIZATION).and_then(|v| v.to_str().ok()).and_then(|v| v.strip_prefix("Bearer ")).unwrap_or("");
    // Hashes of equal length: the comparison says nothing about the token's length either.
    let digest = |t: &str| sha2::Sha256::digest(t.as_bytes());
    if bool::from(digest(presented).as_slice().ct_eq(digest(expected).as_slice())) {
        Ok(())
    } else {
        Err(ApiError::unauthenticated())
    }
}

/// The decisions a notification asks for, or every problem with it.
fn decide(n: &AlertmanagerNotification) -> ApiResult<(Vec<Decision>, AlertsReceived)> {
    let mut problems = Problems::default();
    if n.version != "4" {
        problems.add("version", "only Alertmanager's webhook version 4 is understood");
    }
    if n.alerts.len() > MAX_ALERTS {
        problems.add("alerts", format!("at most {MAX_ALERTS} alerts per notification"));
    }
    let mut decisions = Vec::new();
    let mut received = AlertsReceived { firing: 0, resolved: 0 };
    for (i, alert) in n.alerts.iter().enumerate() {
        let fingerprint = &alert.fingerprint;
        if fingerprint.is_empty() || fingerprint.len() > 64 || !fingerprint.bytes().all(|b| b.is_ascii_hexdigit()) {
            problems.add(&format!("alerts[{i}].fingerprint"), "Alertmanager's hex fingerprint");
            continue;
        }
        let starts_at = alert.starts_at.trim();
        if starts_at.is_empty() || starts_at.len() > 40 || !starts_at.bytes().all(|b| b.is_ascii_digit() || b"-:.TZ+".contains(&b)) {
            problems.add(&format!("alerts[{i}].startsAt"), "an RFC 3339 time");
            continue;
        }
        let key = format!("ops:{}:{starts_at}", fingerprint.to_ascii_lowercase());
        let name = alert.labels.get("alertname").map(|n| n.trim()).unwrap_or_default();
        if name.is_empty() || name.chars().count() > 200 {
            problems.add(&format!("alerts[{i}].labels.alertname"), "the alert's name, 1 to 200 characters");
            continue;
        }
        let summary: String = alert.annotations.get("summary").map(|s| s.trim()).unwrap_or_default().chars().take(500).collect();
        match alert.status.as_str() {
            "firing" => {
                received.firing += 1;
                decisions.push(Decision::ForOperators { key, subject: Subject::Operations { name: name.to_owned(), summary } });
            }
            "resolved" => {
                received.resolved += 1;
                decisions.push(Decision::Resolve { key });
            }
            _ => problems.add(&format!("alerts[{i}].status"), "firing or resolved"),
        }
    }
    problems.finish()?;
    Ok((decisions, received))
}

#[utoipa::path(post, path = "/api/v1/operations/alertmanager", tag = "operations", request_body = AlertmanagerNotification,
    responses((status = 200, body = AlertsReceived), (status = 400, body = crate::error::ErrorBody), (status = 401, body = crate::error::ErrorBody),
        (status = 413, body = crate::error::ErrorBody)))]
pub async fn alertmanager(
    State(state): State<AppState>,
    _caller: AlertmanagerCaller,
    ApiJson(n): ApiJson<AlertmanagerNotification>,
) -> ApiResult<axum::Json<AlertsReceived>> {
    let (decisions, received) = decide(&n)?;
    alerts::record(&state, decisions).await?;
    Ok(axum::Json(received))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn alert(status: &str, name: &str, fingerprint: &str) -> AlertmanagerAlert {
        AlertmanagerAlert {
            status: status.into(),
            labels: [("alertname".to_owned(), name.to_owned())].into(),
            annotations: [("summary".to_owned(), "broker-2 is down".to_owned())].into(),
            fingerprint: fingerprint.into(),
            starts_at: "2026-12-03T08:00:00Z".into(),
        }
    }

    #[test]
    fn firing_opens_and_resolved_closes_one_condition_per_fingerprint() {
        let n = AlertmanagerNotification {
            version: "4".into(),
            alerts: vec![alert("firing", "SuanliBrokerNodeDown", "AB12"), alert("resolved", "SuanliBrokerNodeDown", "ab12")],
        };
        let (decisions, received) = decide(&n).expect("valid");
        assert_eq!(received, AlertsReceived { firing: 1, resolved: 1 });
        assert_eq!(
            decisions,
            vec![
                Decision::ForOperators {
                    key: "ops:ab12:2026-12-03T08:00:00Z".into(),
                    subject: Subject::Operations { name: "SuanliBrokerNodeDown".into(), summary: "broker-2 is down".into() }
                },
                Decision::Resolve { key: "ops:ab12:2026-12-03T08:00:00Z".into() },
            ]
        );
    }

    #[test]
    fn every_problem_is_named_and_nothing_is_decided() {
        let n = AlertmanagerNotification {
            version: "3".into(),
            alerts: vec![alert("firing", "", "ab"), alert("pending", "X", "cd"), alert("firing", "Y", "not hex"), alert("firing", "Z", "ef")],
        };
        let Err(e) = decide(&n) else { panic!("refused") };
        let fields: Vec<&str> = e.fields.iter().map(|f| f.field.as_str()).collect();
        assert_eq!(fields, ["version", "alerts[0].labels.alertname", "alerts[1].status", "alerts[2].fingerprint"]);
    }
}

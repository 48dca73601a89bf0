//! Signed webhooks. Each delivery is `POST url` with the event as JSON and
//!
//! - `X-Suanli-Event-Id`: stable across retries (receivers deduplicate on it),
//! - `X-Suanli-Attempt`: 1, 2, … ,
//! - `X-Suanli-Timestamp`: Unix seconds of this attempt,
//! - `X-Suanli-Signature`: `sha256=` + hex HMAC-SHA-256 over `"{timestamp}.{body}"` with the
//!   receiver's secret (the timestamp is signed so an old delivery cannot be replayed as new).

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use hmac::{Hmac, Mac};
use sha2::Sha256;
use subtle::ConstantTimeEq;

use crate::NotifyError;

pub fn signature(secret: &str, timestamp: u64, body: &str) -> String {
    let Ok(mut mac) = <Hmac<Sha256> as Mac>::new_from_slice(secret.as_bytes()) else { return String::new() };
    mac.update(format!("{timestamp}.{body}").as_bytes());
    format!("sha256={}", hex::encode(mac.finalize().into_bytes()))
}

/// What a receiver runs: the signature is right and the timestamp within `tolerance` of now.
pub fn verify(secret: &str, timestamp: u64, body: &str, sent: &str, tolerance: Duration) -> bool {
    let now = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
    now.abs_diff(timestamp) <= tolerance.as_secs() && bool::from(signature(secret, timestamp, body).as_bytes().ct_eq(sent.as_bytes()))
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WebhookEvent {
    pub id: String,
    pub attempt: u32,
    /// The JSON body.
    pub body: String,
}

#[derive(Clone, Debug)]
pub struct WebhookSender {
    client: reqwest::Client,
}

impl Default for WebhookSender {
    fn default() -> Self {
        WebhookSender { client: reqwest::Client::builder().timeout(Duration::from_secs(15)).build().unwrap_or_default() }
    }
}

impl WebhookSender {
    pub async fn send(&self, url: &str, secret: &str, event: &WebhookEvent) -> Result<(), NotifyError> {
        let timestamp = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
        let res = self
            .client
            .post(url)
            .header("content-type", "application/json")
            .header("x-suanli-event-id", &event.id)
            .header("x-suanli-attempt", event.attempt.to_string())
            .header("x-suanli-timestamp", timestamp.to_string())
            .header("x-suanli-signature", signature(secret, timestamp, &event.body))
            .body(event.body.clone())
            .send()
            .await
            .map_err(|e| NotifyError::Delivery { message: format!("webhook unreachable: {e}"), permanent: false })?;
        let status = res.status();
        if status.is_success() {
            Ok(())
        } else {
            // A receiver that refuses (4xx) will refuse again; one that fails (5xx) may recover.
            Err(NotifyError::Delivery { message: format!("webhook answered {status}"), permanent: status.is_client_error() && status.as_u16() != 429 })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signatures_verify_and_tampering_does_not() {
        let now = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
        let sig = signature("s3cret", now, "{\"a\":1}");
        assert!(verify("s3cret", now, "{\"a\":1}", &sig, Duration::from_secs(300)));
        assert!(!verify("s3cret", now, "{\"a\":2}", &sig, Duration::from_secs(300)));
        assert!(!verify("other", now, "{\"a\":1}", &sig, Duration::from_secs(300)));
        let old = now - 3600;
        assert!(!verify("s3cret", old, "{\"a\":1}", &signature("s3cret", old, "{\"a\":1}"), Duration::from_secs(300)), "a replayed old delivery");
    }
}

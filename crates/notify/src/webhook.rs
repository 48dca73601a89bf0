//! Signed webhooks. Each delivery is `POST url` with the event as JSON and
//!
//! - `X-Suanli-Event-Id`: stable across retries (receivers deduplicate on it),
//! - `X-Suanli-Attempt`: 1, 2, … ,
//! - `X-Suanli-Timestamp`: Unix seconds of this attempt,
//! - `X-Suanli-Signature`: `sha256=` + hex HMAC-SHA-256 over `"{timestamp}.{body}"` with the
//!   receiver's secret (the timestamp is signed so an old delivery cannot be replayed as new).
//!
//! The URL is the user's, the connection the platform's: a delivery goes only to a public
//! address. The host is resolved at each delivery, every address it resolves to must be
//! public (not loopback, private, link-local, shared, multicast, documentation or reserved),
//! and the connection goes to the address so checked (a name re-pointed between the check and
//! the connection is not followed); redirects are never followed. Hosts the operator lists in
//! [`WebhookSender::allowing`] are exempt (an internal receiver on purpose).

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
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

#[derive(Clone, Debug, Default)]
pub struct WebhookSender {
    /// Hosts (names or addresses, as written in URLs) exempt from the public-address rule.
    allowed: Arc<Vec<String>>,
}

/// How long one delivery may take.
const TIMEOUT: Duration = Duration::from_secs(15);

/// Whether a webhook may be delivered to `ip`: a public unicast address.
pub fn is_public(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => {
            let [a, b, c, _] = v4.octets();
            !(v4.is_unspecified()
                || v4.is_loopback()
                || v4.is_private()
                || v4.is_link_local()
                || v4.is_broadcast()
                || v4.is_documentation()
                || v4.is_multicast()
                || a == 0
                || (a == 100 && (64..128).contains(&b)) // shared address space (carrier NAT)
                || (a == 192 && b == 0 && c == 0) // IETF protocol assignments
                || (a == 198 && (b == 18 || b == 19)) // benchmarking
                || a >= 240) // reserved
        }
        IpAddr::V6(v6) => {
            if let Some(v4) = v6.to_ipv4_mapped() {
                return is_public(IpAddr::V4(v4));
            }
            let first = v6.segments()[0];
            !(v6.is_unspecified()
                || v6.is_loopback()
                || v6.is_multicast()
                || (first & 0xfe00) == 0xfc00 // unique local
                || (first & 0xffc0) == 0xfe80 // link local
                || (first == 0x2001 && v6.segments()[1] == 0x0db8) // documentation
                || (first == 0x0064 && v6.segments()[1] == 0xff9b)) // NAT64 (reaches IPv4 behind it)
        }
    }
}

impl WebhookSender {
    /// A sender that also delivers to `hosts` whatever they resolve to.
    pub fn allowing(hosts: Vec<String>) -> Self {
        WebhookSender { allowed: Arc::new(hosts.into_iter().map(|h| h.to_ascii_lowercase()).collect()) }
    }

    /// Where a delivery to `url` may connect: the URL and the checked address to use for its
    /// host. A permanent error says why not (the user's URL must change).
    pub async fn destination(&self, url: &str) -> Result<(reqwest::Url, SocketAddr), NotifyError> {
        let refuse = |why: String| NotifyError::Delivery { message: why, permanent: true };
        let parsed = reqwest::Url::parse(url).map_err(|e| refuse(format!("webhook URL: {e}")))?;
        if !matches!(parsed.scheme(), "http" | "https") {
            return Err(refuse("webhook URL: http or https only".into()));
        }
        let host = parsed.host_str().ok_or_else(|| refuse("webhook URL without a host".into()))?.to_ascii_lowercase();
        let port = parsed.port_or_known_default().unwrap_or(443);
        let bare = host.trim_start_matches('[').trim_end_matches(']');
        let addresses: Vec<SocketAddr> = match bare.parse::<IpAddr>() {
            Ok(ip) => vec![SocketAddr::new(ip, port)],
            Err(_) => tokio::net::lookup_host((bare, port))
                .await
                .map_err(|e| NotifyError::Delivery { message: format!("webhook host {host}: {e}"), permanent: false })?
                .collect(),
        };
        let first = *addresses.first().ok_or_else(|| refuse(format!("webhook host {host} has no address")))?;
        if !self.allowed.contains(&host) {
            if let Some(bad) = addresses.iter().find(|a| !is_public(a.ip())) {
                return Err(refuse(format!(
                    "webhook host {host} is {}: deliveries go to public addresses only (loopback, private, link-local and multicast are refused)",
                    bad.ip()
                )));
            }
        }
        Ok((parsed, first))
    }

    pub async fn send(&self, url: &str, secret: &str, event: &WebhookEvent) -> Result<(), NotifyError> {
        let (url, address) = self.destination(url).await?;
        // Pinned to the address just checked, and never redirected elsewhere.
        let mut client = reqwest::Client::builder().timeout(TIMEOUT).redirect(reqwest::redirect::Policy::none());
        if let Some(host) = url.host_str().filter(|h| h.parse::<IpAddr>().is_err()) {
            client = client.resolve(host, address);
        }
        let client = client.build().map_err(|e| NotifyError::Delivery { message: format!("webhook client: {e}"), permanent: false })?;
        let timestamp = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
        let res = client
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
        } else if status.is_redirection() {
            Err(NotifyError::Delivery { message: format!("webhook answered {status}; redirects are not followed"), permanent: true })
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
    fn only_public_unicast_addresses_take_deliveries() {
        let public = ["93.184.215.14", "8.8.8.8", "2606:4700::1111", "::ffff:1.1.1.1"];
        let refused = [
            "127.0.0.1",
            "10.1.2.3",
            "172.16.0.1",
            "192.168.1.1",
            "169.254.169.254",
            "100.64.0.1",
            "0.0.0.0",
            "224.0.0.1",
            "255.255.255.255",
            "192.0.2.1",
            "198.18.0.1",
            "240.0.0.1",
            "::1",
            "::",
            "fd00::1",
            "fe80::1",
            "ff02::1",
            "2001:db8::1",
            "::ffff:127.0.0.1",
            "::ffff:169.254.169.254",
            "64:ff9b::7f00:1",
        ];
        for ip in public {
            assert!(is_public(ip.parse().expect("ip")), "{ip} is public");
        }
        for ip in refused {
            assert!(!is_public(ip.parse().expect("ip")), "{ip} is refused");
        }
    }

    /// A receiver on loopback that counts the requests it got and answers `status`, with a
    /// `Location` when it redirects.
    async fn receiver(status: u16, location: Option<String>) -> (SocketAddr, Arc<std::sync::atomic::AtomicUsize>) {
        let hits = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let counted = hits.clone();
        let app = axum::Router::new().fallback(move || {
            counted.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            let location = location.clone();
            async move {
                let mut response = axum::response::Response::new(axum::body::Body::empty());
                *response.status_mut() = axum::http::StatusCode::from_u16(status).expect("status");
                if let Some(l) = location {
                    response.headers_mut().insert("location", l.parse().expect("location"));
                }
                response
            }
        });
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let address = listener.local_addr().expect("address");
        tokio::spawn(async move { axum::serve(listener, app).await });
        (address, hits)
    }

    fn event() -> WebhookEvent {
        WebhookEvent { id: "e1".into(), attempt: 1, body: "{}".into() }
    }

    #[tokio::test]
    async fn a_webhook_to_loopback_or_a_name_for_it_is_refused_and_never_connected() {
        let (address, hits) = receiver(200, None).await;
        let sender = WebhookSender::default();
        for url in
            [format!("http://{address}/hook"), format!("http://localhost:{}/hook", address.port()), format!("http://[::ffff:127.0.0.1]:{}/", address.port())]
        {
            let refused = sender.send(&url, "secret-secret-16", &event()).await;
            assert!(matches!(refused, Err(NotifyError::Delivery { permanent: true, .. })), "{url}: {refused:?}");
        }
        assert_eq!(hits.load(std::sync::atomic::Ordering::SeqCst), 0, "nothing reached the receiver");
        // An operator's exception delivers there.
        let allowed = WebhookSender::allowing(vec!["127.0.0.1".into()]);
        allowed.send(&format!("http://{address}/hook"), "secret-secret-16", &event()).await.expect("allowed host");
        assert_eq!(hits.load(std::sync::atomic::Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn a_redirect_is_never_followed() {
        let (inner, inner_hits) = receiver(200, None).await;
        let (outer, _) = receiver(302, Some(format!("http://{inner}/metadata"))).await;
        let sender = WebhookSender::allowing(vec!["127.0.0.1".into()]);
        let refused = sender.send(&format!("http://{outer}/hook"), "secret-secret-16", &event()).await;
        assert!(matches!(refused, Err(NotifyError::Delivery { permanent: true, .. })), "{refused:?}");
        assert_eq!(inner_hits.load(std::sync::atomic::Ordering::SeqCst), 0, "the redirect's target was never reached");
    }

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

//! What every request handler shares.

use std::sync::Arc;
use std::time::Duration;

use suanli_notify::Mailer;

use crate::crypto::KeyRing;
use crate::db::Db;
use crate::market::Market;

/// Settings handlers read at run time.
#[derive(Clone, Debug)]
pub struct Settings {
    /// The portal's address as users reach it (links in emails), e.g. `http://127.0.0.1:8080`.
    pub public_url: String,
    /// Absolute lifetime of a session; `refresh` starts a new one.
    pub session_ttl: Duration,
    /// A session unused this long ends.
    pub session_idle: Duration,
    /// Cookie attributes: `Secure` and the `__Host-` prefix (browsers accept both on
    /// http://localhost and http://127.0.0.1 as well as https).
    pub secure_cookies: bool,
    /// Failed logins allowed per username and per source address in `throttle_window`.
    pub max_login_failures: i64,
    pub throttle_window: Duration,
    /// Where activation and reset mail goes when no SMTP relay is configured: logged instead.
    pub mail_configured: bool,
    /// Registration with a mobile number needs the code sent to it by SMS.
    pub verify_phones: bool,
    /// Reverse proxies whose `X-Forwarded-For` names the client (`auth::source_address`).
    pub trusted_proxies: Vec<std::net::IpAddr>,
    /// The bearer token Alertmanager posts operators' alerts with; `None`: no such endpoint.
    pub alertmanager_token: Option<String>,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            public_url: "http://127.0.0.1:8080".into(),
            session_ttl: Duration::from_secs(12 * 3600),
            session_idle: Duration::from_secs(30 * 60),
            secure_cookies: true,
            max_login_failures: 5,
            throttle_window: Duration::from_secs(15 * 60),
            mail_configured: false,
            verify_phones: false,
            trusted_proxies: Vec::new(),
            alertmanager_token: None,
        }
    }
}

/// The non-email channels.
#[derive(Clone, Default)]
pub struct Notifiers {
    pub sms: Option<suanli_notify::sms::SmsGateway>,
    pub webhooks: suanli_notify::webhook::WebhookSender,
}

pub struct Inner {
    pub db: Db,
    pub keys: KeyRing,
    pub market: Market,
    pub mailer: Option<Mailer>,
    pub notifiers: Notifiers,
    pub settings: Settings,
    /// Wakes the outbox worker when a message is queued.
    pub outbox_wake: tokio::sync::Notify,
    /// This member's federation gateway, when the marketplace is in a federation.
    pub federation: Option<crate::federation::FederationLink>,
    /// The artifact store, where jobs' outputs are downloaded from (`--artifacts-url`).
    pub artifacts: Option<crate::artifacts::ArtifactStoreLink>,
    /// Where datasets' files and uploads are kept (`--data-dir`, or a bucket).
    pub datasets: Option<Arc<crate::datasets::DatasetStore>>,
    /// Similar-image search, when an embedder is configured (`--image-embedder-url`).
    pub image_search: Option<Arc<crate::image_search::ImageSearch>>,
    pub metrics: crate::metrics::PortalMetrics,
    /// Agents' tunnels to the portal, by node (`tunnels.rs`).
    pub tunnels: crate::tunnels::Tunnels,
    /// Services on leased cards: their origins, the proxy's state (`services.rs`).
    pub services: crate::services::ServiceHub,
}

#[derive(Clone)]
pub struct AppState(pub Arc<Inner>);

impl std::ops::Deref for AppState {
    type Target = Inner;
    fn deref(&self) -> &Inner {
        &self.0
    }
}

impl AppState {
    pub fn cookie_name(&self) -> &'static str {
        if self.settings.secure_cookies {
            "__Host-suanli"
        } else {
            "suanli"
        }
    }
}

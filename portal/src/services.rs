//! Services on leased cards (issue 23), the portal's side: which services should run (the
//! `services` table, the source of truth), telling agents so through their tunnels
//! (`suanli_tunnel::control`), and the authenticated reverse proxy visitors reach them by.
//!
//! **Origins.** Every service has an origin of its own, `<slug>.<services_domain>` (the slug is
//! 130 random bits: for a demo "anyone with the link" means exactly that). The portal's cookies
//! are host-only cookies of the portal's own host, so a browser never sends them to a service's
//! origin, and a service's pages never run where they could read them; the proxy also strips
//! any portal credential a request carries before it leaves for the node.
//!
//! **Who may.** A private service is its owner's alone: the owner arrives through
//! `/services/{id}/open` on the portal, which hands the service's origin a grant (sealed, one
//! use, a minute) that becomes a cookie of that origin; scripts send the owner's API token
//! (`Authorization: Bearer`), which is taken off the request. Anyone else gets `403`. A demo
//! with the link or public one takes anyone, each visitor (by address) held to the service's rate.
//!
//! **Gone.** A service whose lease is over, or that its owner stopped, answers `410` for good.
//! The sweeper ([`run_sweeper`]) stops the services of leases that ended, and environments
//! (terminals, JupyterLab) nobody has used for the configured time (`--environment-idle-s`):
//! used means a request, a connection held open (a browser tab's WebSocket), or for JupyterLab
//! a kernel running code, so an environment stops that long after its last tab closed and its
//! last cell ended. It also writes the request counts
//! (metering: time from start to stop, and requests) and when each service was last used, which
//! every portal process reads when it decides.
//!
//! **Agents** keep nothing: when a node's tunnel opens, every service that should run there is
//! sent again ([`reconcile_node`]). A service's files (a model's) are sent only when the agent
//! says it lacks them, streamed from the artifact store.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{header, HeaderMap, HeaderValue, Method, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use serde::{Deserialize, Serialize};
use sqlx::Row;
use suanli_tunnel::control::{path, ControlError, ServiceKind, ServiceSpec, ServiceStatus};
use suanli_tunnel::wire::{AgentError, AGENT_ERROR_HEADER, CONTROL_SERVICE};

use crate::db::{now_ms, opt_i64, opt_str};
use crate::error::{ApiError, ApiResult, Code};
use crate::model::{ServiceKindName, ServiceVisibility, UserId};
use crate::state::AppState;

/// The cookie a service's origin keeps its visitor's grant in (host-only, that origin's); over
/// https with the `__Host-` prefix, so that no other origin of the site can set one in its place.
pub const SERVICE_COOKIE: &str = "suanli-service";
const SERVICE_COOKIE_HTTPS: &str = "__Host-suanli-service";
/// The `t` of a sealed grant.
const GRANT_PURPOSE: &str = "service-visit";
/// Where a service's origin takes a grant from the portal.
pub const LOGIN_PATH: &str = "/.suanli/login";
/// Where the pages the portal serves on a service's origin keep their files (the rest of the
/// origin is the service's).
pub const ASSETS_PREFIX: &str = "/.suanli/";
/// How long a grant from `/services/{id}/open` may wait to be used.
const GRANT_LIFETIME_MS: i64 = 60_000;
/// How long a visitor's cookie on a service's origin lasts at most (it also ends with the portal
/// session it came from).
const VISIT_LIFETIME_MS: i64 = 2 * 3600 * 1000;
/// How long what the proxy read of a service is trusted before it is read again (a stop takes
/// effect within this).
const CACHE_FOR: Duration = Duration::from_secs(1);
/// Services (and tokens) the proxy remembers at most (beyond, what is stale is dropped).
const CACHE_ENTRIES: usize = 10_000;
/// How long the proxy trusts what it found an `Authorization` to be (a revoked API token still
/// opens its owner's services this long; a request is not a database query each).
const TOKENS_FOR: Duration = Duration::from_secs(5);
/// How long an agent has to answer a control request, and to take a file.
const CONTROL_TIMEOUT: Duration = Duration::from_secs(20);
const FILE_TIMEOUT: Duration = Duration::from_secs(30 * 60);
/// How often the sweeper writes counts and looks for leases that ended.
pub const SWEEP_EVERY: Duration = Duration::from_secs(2);
/// An environment nobody has used for this long stops (`--environment-idle-s`).
pub const DEFAULT_IDLE_STOP: Duration = Duration::from_secs(3600);
/// A JupyterLab not answering yet this long after it was made is not starting any more (its
/// first install takes minutes): it is idle like any other.
const STARTUP_GRACE_MS: i64 = 30 * 60 * 1000;
/// The classifier's files `suanli-job serve` loads.
pub const CLASSIFIER_FILES: [&str; 2] = ["model.json", "model.safetensors"];

/// A service as the proxy needs it.
#[derive(Clone, Debug)]
pub struct Published {
    pub id: i64,
    pub owner: UserId,
    pub lease: u64,
    pub node: u64,
    pub slug: String,
    pub kind: ServiceKindName,
    pub visibility: ServiceVisibility,
    pub running: bool,
    pub rate_per_minute: u32,
    pub model: String,
    pub version: u32,
}

/// What the proxy read of a slug, and when (`None`: no such service).
type Cached = (Instant, Option<Arc<Published>>);

/// A visitor's allowance of requests to one service (a token bucket).
struct Bucket {
    tokens: f64,
    at: Instant,
}

/// The proxy's and the control's state, in [`AppState`].
pub struct ServiceHub {
    /// `<slug>.<domain>` is a service's origin; `None`: this portal publishes no services.
    domain: Option<String>,
    /// `http` or `https`, and `:port` or nothing: as the portal's public address has them.
    scheme: String,
    port: String,
    cache: Mutex<HashMap<String, Cached>>,
    /// What each `Authorization` seen lately was, by its hash: a portal user's API token, or not.
    tokens: Recent<Option<UserId>>,
    /// Whether each portal session visits came from was still there lately, by its token's hash.
    sessions: Recent<bool>,
    /// Grants used, until they expire (each is good once).
    used_grants: Mutex<HashMap<String, i64>>,
    /// Requests not yet written, per service.
    counts: Mutex<HashMap<i64, u64>>,
    buckets: Mutex<HashMap<(i64, String), Bucket>>,
    /// Requests forwarded since start (the metrics).
    pub forwarded: AtomicU64,
    /// Visitors' connections open through this portal now (WebSockets), per service.
    connected: Arc<Mutex<HashMap<i64, u32>>>,
    /// An environment nobody uses stops after this long (`None`: never).
    idle_stop: Option<Duration>,
}

/// A visitor's connection to a service, open (a terminal's or a notebook's WebSocket): the
/// service is in use while it lasts.
struct Connected {
    table: Arc<Mutex<HashMap<i64, u32>>>,
    service: i64,
}

impl Drop for Connected {
    fn drop(&mut self) {
        let mut table = lock(&self.table);
        if let Some(open) = table.get_mut(&self.service) {
            *open -= 1;
            if *open == 0 {
                table.remove(&self.service);
            }
        }
    }
}

/// What the proxy learned lately, by key, trusted for [`TOKENS_FOR`] (what an `Authorization`
/// was, whether a session lives): no database query per request.
struct Recent<V> {
    entries: Mutex<HashMap<String, (V, Instant)>>,
}

impl<V> Default for Recent<V> {
    fn default() -> Self {
        Recent { entries: Mutex::default() }
    }
}

impl<V: Clone> Recent<V> {
    fn get(&self, key: &str) -> Option<V> {
        lock(&self.entries).get(key).filter(|(_, at)| at.elapsed() < TOKENS_FOR).map(|(value, _)| value.clone())
    }

    fn put(&self, key: String, value: V) {
        let mut entries = lock(&self.entries);
        if entries.len() >= CACHE_ENTRIES {
            entries.retain(|_, (_, at)| at.elapsed() < TOKENS_FOR);
        }
        entries.insert(key, (value, Instant::now()));
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

#[derive(Serialize, Deserialize)]
struct Grant {
    /// What it is for ([`GRANT_PURPOSE`]), so nothing else the portal seals with its keys passes
    /// for one.
    t: String,
    /// The service.
    s: i64,
    /// The user.
    u: i64,
    /// Good until (ms).
    e: i64,
    /// Drawn per grant: a grant is used once.
    #[serde(default)]
    n: String,
    /// The portal session the grant came from (its token's hash): the visit ends with it (a
    /// sign-out, a password change, an account disabled).
    #[serde(default)]
    k: String,
}

impl ServiceHub {
    /// `domain`: services' origins are its subdomains (`--services-domain`); `public_url` gives
    /// their scheme and port.
    pub fn new(domain: Option<String>, public_url: &str) -> ServiceHub {
        let (scheme, rest) = public_url.split_once("://").unwrap_or(("http", public_url));
        let authority = rest.split('/').next().unwrap_or_default();
        let default_port = if scheme == "https" { "443" } else { "80" };
        // The port as browsers write it in `Origin`: none when it is the scheme's own.
        let port = authority
            .rsplit_once(':')
            .filter(|(_, p)| p.bytes().all(|b| b.is_ascii_digit()) && *p != default_port)
            .map(|(_, p)| format!(":{p}"))
            .unwrap_or_default();
        ServiceHub {
            domain: domain.map(|d| d.trim_matches('.').to_ascii_lowercase()).filter(|d| !d.is_empty()),
            scheme: scheme.to_owned(),
            port,
            cache: Mutex::default(),
            tokens: Recent::default(),
            sessions: Recent::default(),
            used_grants: Mutex::default(),
            counts: Mutex::default(),
            buckets: Mutex::default(),
            forwarded: AtomicU64::new(0),
            connected: Arc::default(),
            idle_stop: Some(DEFAULT_IDLE_STOP),
        }
    }

    /// Environments nobody uses stop after `idle` (`None`: never).
    pub fn with_idle_stop(mut self, idle: Option<Duration>) -> ServiceHub {
        self.idle_stop = idle;
        self
    }

    /// Counts a visitor's connection to `service` as open until the guard is dropped.
    fn connect(&self, service: i64) -> Connected {
        *lock(&self.connected).entry(service).or_default() += 1;
        Connected { table: self.connected.clone(), service }
    }

    /// The services a visitor holds a connection to through this portal now.
    fn in_use(&self) -> Vec<i64> {
        lock(&self.connected).keys().copied().collect()
    }

    pub fn enabled(&self) -> bool {
        self.domain.is_some()
    }

    /// The name of a service origin's own cookie.
    fn cookie_name(&self) -> &'static str {
        if self.scheme == "https" {
            SERVICE_COOKIE_HTTPS
        } else {
            SERVICE_COOKIE
        }
    }

    /// The service's origin, `scheme://<slug>.<domain>[:port]`.
    pub fn origin(&self, slug: &str) -> String {
        format!("{}://{slug}.{}{}", self.scheme, self.domain.as_deref().unwrap_or("invalid"), self.port)
    }

    /// The slug a request's host names, when it is a service's origin.
    fn slug_of(&self, request: &Request) -> Option<String> {
        self.slug_of_host(request.headers().get(header::HOST).and_then(|h| h.to_str().ok()).or_else(|| request.uri().host())?)
    }

    /// The slug `host` (`name[:port]`) names, when it is a service's origin.
    fn slug_of_host(&self, host: &str) -> Option<String> {
        let domain = self.domain.as_deref()?;
        let host = host.rsplit_once(':').filter(|(_, p)| p.bytes().all(|b| b.is_ascii_digit())).map_or(host, |(h, _)| h).to_ascii_lowercase();
        let slug = host.strip_suffix(domain)?.strip_suffix('.')?;
        (!slug.is_empty() && slug.len() <= 64 && slug.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit())).then(|| slug.to_owned())
    }

    /// Whether the portal's own address (`public_url`) would be taken for a service's origin:
    /// its pages would then be answered by the proxy (`--services-domain` must be a domain of
    /// the services' own, e.g. `svc.portal.example` beside `portal.example`).
    pub fn would_take_the_portals_host(&self, public_url: &str) -> bool {
        let authority = public_url.split_once("://").map_or(public_url, |(_, rest)| rest).split('/').next().unwrap_or_default();
        self.slug_of_host(authority).is_some()
    }

    fn forget(&self, slug: &str) {
        lock(&self.cache).remove(slug);
    }

    /// Drops what the proxy read of service `id` (it changed).
    pub fn forget_id(&self, id: i64) {
        lock(&self.cache).retain(|_, (_, known)| known.as_ref().is_none_or(|p| p.id != id));
    }

    /// Whether a visitor at `address` may make one more request to `service` now.
    fn admit(&self, service: &Published, address: &str) -> bool {
        let rate = f64::from(service.rate_per_minute.max(1)) / 60.0;
        // A burst of a quarter minute's allowance (at least one request).
        let burst = (f64::from(service.rate_per_minute) / 4.0).max(1.0);
        let mut buckets = lock(&self.buckets);
        if buckets.len() > 100_000 {
            buckets.retain(|_, b| b.at.elapsed() < Duration::from_secs(60));
        }
        let now = Instant::now();
        let bucket = buckets.entry((service.id, address.to_owned())).or_insert(Bucket { tokens: burst, at: now });
        bucket.tokens = (bucket.tokens + now.duration_since(bucket.at).as_secs_f64() * rate).min(burst);
        bucket.at = now;
        if bucket.tokens >= 1.0 {
            bucket.tokens -= 1.0;
            true
        } else {
            false
        }
    }

    fn count(&self, service: i64) {
        *lock(&self.counts).entry(service).or_default() += 1;
        self.forwarded.fetch_add(1, Ordering::Relaxed);
    }
}

/// A random slug: 26 base-32 characters (130 bits).
pub fn new_slug() -> String {
    const ALPHABET: &[u8] = b"abcdefghijklmnopqrstuvwxyz234567";
    let bytes = crate::crypto::random_bytes::<26>();
    bytes.iter().map(|b| ALPHABET[usize::from(b & 31)] as char).collect()
}

const PUBLISHED_COLUMNS: &str = "id, owner_id, lease_id, node_id, slug, kind, visibility, state, rate_per_minute, model_name, model_version";

fn published_of(row: &sqlx::any::AnyRow) -> ApiResult<Published> {
    Ok(Published {
        id: row.try_get("id")?,
        owner: UserId(row.try_get("owner_id")?),
        lease: row.try_get::<i64, _>("lease_id")? as u64,
        node: row.try_get::<i64, _>("node_id")? as u64,
        slug: row.try_get("slug")?,
        kind: ServiceKindName::parse(&row.try_get::<String, _>("kind")?).ok_or_else(|| ApiError::internal("a service of an unknown kind"))?,
        visibility: ServiceVisibility::parse(&row.try_get::<String, _>("visibility")?).unwrap_or(ServiceVisibility::Private),
        running: row.try_get::<String, _>("state")? == "running",
        rate_per_minute: row.try_get::<i64, _>("rate_per_minute")?.clamp(1, i64::from(u32::MAX)) as u32,
        model: opt_str(row, "model_name")?.unwrap_or_default(),
        version: opt_i64(row, "model_version")?.unwrap_or(0) as u32,
    })
}

async fn published(state: &AppState, slug: &str) -> ApiResult<Option<Arc<Published>>> {
    if let Some((at, known)) = lock(&state.services.cache).get(slug) {
        if at.elapsed() < CACHE_FOR {
            return Ok(known.clone());
        }
    }
    let row = sqlx::query(&format!("SELECT {PUBLISHED_COLUMNS} FROM services WHERE slug = $1")).bind(slug).fetch_optional(&state.db.pool).await?;
    let known = row.as_ref().map(published_of).transpose()?.map(Arc::new);
    // Only services are remembered (a name nobody has is asked about again), and not too many.
    if known.is_some() {
        let mut cache = lock(&state.services.cache);
        if cache.len() >= CACHE_ENTRIES {
            cache.retain(|_, (at, _)| at.elapsed() < CACHE_FOR);
        }
        cache.insert(slug.to_owned(), (Instant::now(), known.clone()));
    }
    Ok(known)
}

/// The middleware that takes every request to a service's origin (outermost: nothing of the
/// portal's own pages, cookies or headers applies there).
pub async fn route(State(state): State<AppState>, request: Request, next: Next) -> Response {
    match state.services.slug_of(&request) {
        Some(slug) => visit(&state, &slug, request).await.unwrap_or_else(|e| page_error(e.code.status(), &e.message)),
        None => next.run(request).await,
    }
}

/// An answer of the proxy's own on a service's origin: a short text, with the code.
fn page_error(status: StatusCode, message: &str) -> Response {
    let mut response = (status, format!("{}\n", message)).into_response();
    response.headers_mut().insert("x-content-type-options", HeaderValue::from_static("nosniff"));
    response
}

/// Who the visitor is (`None`: anonymous), and whether their `Authorization` is a portal API
/// token, which is then taken off the request whoever it names (a service never sees one).
async fn visitor(state: &AppState, service: &Published, headers: &HeaderMap) -> (Option<UserId>, bool) {
    let mut by_token = None;
    if let Some(v) = headers.get(header::AUTHORIZATION) {
        let key = crate::crypto::token_hash(&String::from_utf8_lossy(v.as_bytes()));
        let known = state.services.tokens.get(&key);
        by_token = match known {
            Some(user) => user,
            None => {
                let mut only_token = HeaderMap::new();
                only_token.insert(header::AUTHORIZATION, v.clone());
                // A token that is not the portal's may be the service's own: not an error here.
                let user = crate::auth::resolve(state, &only_token).await.ok().flatten().map(|p| p.user);
                state.services.tokens.put(key, user);
                user
            }
        };
    }
    let visit = crate::auth::cookie_value(headers, state.services.cookie_name())
        .and_then(|cookie| state.keys.open(&cookie).ok())
        .and_then(|g| serde_json::from_str::<Grant>(&g).ok())
        .filter(|g| g.t == GRANT_PURPOSE && g.s == service.id && g.e > now_ms() && !g.k.is_empty());
    let by_cookie = match visit {
        Some(g) if session_lives(state, &g.k).await => Some(UserId(g.u)),
        _ => None,
    };
    (by_token.or(by_cookie), by_token.is_some())
}

/// Whether the portal session `token_hash` is still there and not expired (checked at most
/// every [`TOKENS_FOR`]): a session signed out, expired or ended by the account (a password
/// change ends the others) ends its visits too. A connection already open (a WebSocket) lasts
/// until it closes.
async fn session_lives(state: &AppState, token_hash: &str) -> bool {
    if let Some(lives) = state.services.sessions.get(token_hash) {
        return lives;
    }
    // Its existence and absolute expiry, not its idle time: using a service is not using the
    // portal's pages, which is what keeps a session from idling out.
    let row = sqlx::query("SELECT 1 AS one FROM sessions WHERE token_hash = $1 AND expires_ms > $2")
        .bind(token_hash)
        .bind(now_ms())
        .fetch_optional(&state.db.pool)
        .await;
    let lives = match row {
        Ok(row) => row.is_some(),
        // Not known now: refused, not cached.
        Err(e) => {
            tracing::warn!(error = %e, "a visit's session was not read");
            return false;
        }
    };
    state.services.sessions.put(token_hash.to_owned(), lives);
    lives
}

async fn visit(state: &AppState, slug: &str, mut request: Request) -> ApiResult<Response> {
    let Some(service) = published(state, slug).await? else {
        return Ok(page_error(StatusCode::NOT_FOUND, "no such service"));
    };
    if !service.running {
        return Ok(page_error(StatusCode::GONE, "this service has stopped (its lease ended, or its owner stopped it)"));
    }
    if request.uri().path() == LOGIN_PATH {
        return Ok(take_grant(state, &service, request.uri().query().unwrap_or_default()));
    }
    // A browser says where a request comes from: only the service's own pages may call it, so a
    // page on another origin (another service's, on the same site) cannot ride its visitor's
    // cookie into it (a terminal's WebSocket, a notebook's kernel).
    if let Some(origin) = request.headers().get(header::ORIGIN) {
        if origin.as_bytes() != state.services.origin(&service.slug).as_bytes() {
            return Ok(page_error(StatusCode::FORBIDDEN, "requests from other origins are refused"));
        }
    }
    let (who, portal_token) = visitor(state, &service, request.headers()).await;
    let owner = who == Some(service.owner);
    if service.visibility == ServiceVisibility::Private && !owner {
        let open = format!("{}/services/{}/open", state.settings.public_url, service.id);
        return Ok(page_error(StatusCode::FORBIDDEN, &format!("this service is private: its owner opens it from {open}")));
    }
    if !owner {
        let peer = request.extensions().get::<axum::extract::ConnectInfo<std::net::SocketAddr>>().map(|c| c.0);
        let address = crate::auth::source_address(&state.settings.trusted_proxies, peer, request.headers());
        if !state.services.admit(&service, &address) {
            let mut response = page_error(StatusCode::TOO_MANY_REQUESTS, "too many requests to this demo from your address: wait a little");
            response.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from_static("5"));
            return Ok(response);
        }
    }
    if service.kind.has_portal_pages() && request.method() == Method::GET && (request.uri().path() == "/" || request.uri().path().starts_with(ASSETS_PREFIX)) {
        return Ok(crate::pages::services::on_origin(&service, request.uri().path()));
    }
    strip_portal_credentials(request.headers_mut(), portal_token);
    let Some(tunnel) = state.tunnels.tunnel(service.node) else {
        return Ok(unavailable("the node this service runs on is not connected: try again shortly"));
    };
    state.services.count(service.id);
    // A connection that stays open (a WebSocket) keeps the service in use while it lasts.
    let held = request.headers().contains_key(header::UPGRADE).then(|| state.services.connect(service.id));
    match tunnel.forward_holding(&service.id.to_string(), request, held).await {
        Ok(response) => {
            let agent_error = response.headers().get(AGENT_ERROR_HEADER).and_then(|v| v.to_str().ok()).and_then(AgentError::from_code);
            Ok(match agent_error {
                // Not (yet) running there: the agent restarted, or the service is starting.
                Some(AgentError::UnknownService | AgentError::Unreachable) => unavailable("this service is starting: try again shortly"),
                _ => {
                    let mut response = response.map(Body::new);
                    keep_host_only_cookies(response.headers_mut());
                    response
                }
            })
        }
        Err(e) => {
            tracing::info!(service = service.id, error = %e, "a request to a service failed in the tunnel");
            Ok(page_error(StatusCode::BAD_GATEWAY, "the service's node did not answer"))
        }
    }
}

fn unavailable(message: &str) -> Response {
    let mut response = page_error(StatusCode::SERVICE_UNAVAILABLE, message);
    response.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from_static("2"));
    response
}

/// Takes the portal's own credentials off a request bound for a service: its session cookie
/// (under either name), the origin's grant cookie, and the API token a visitor authenticated
/// with; the visitor's other cookies (a notebook's own) go on.
fn strip_portal_credentials(headers: &mut HeaderMap, authenticated_by_token: bool) {
    const OURS: [&str; 4] = ["__Host-suanli", "suanli", SERVICE_COOKIE, SERVICE_COOKIE_HTTPS];
    let kept: Vec<String> = headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .map(str::trim)
        .filter(|c| !c.is_empty() && !OURS.iter().any(|name| c.split('=').next().map(str::trim) == Some(name)))
        .map(str::to_owned)
        .collect();
    headers.remove(header::COOKIE);
    if !kept.is_empty() {
        if let Ok(v) = HeaderValue::from_str(&kept.join("; ")) {
            headers.insert(header::COOKIE, v);
        }
    }
    if authenticated_by_token {
        headers.remove(header::AUTHORIZATION);
    }
}

/// Drops the cookies a service sets for more than its own host (`Domain=`): a service may keep
/// cookies on its origin, never plant them where the portal or other services would get them.
fn keep_host_only_cookies(headers: &mut HeaderMap) {
    let kept: Vec<HeaderValue> = headers
        .get_all(header::SET_COOKIE)
        .iter()
        // Unreadable ones go too.
        .filter(|v| v.to_str().is_ok_and(|c| !c.split(';').skip(1).any(|attribute| attribute.trim().to_ascii_lowercase().starts_with("domain"))))
        .cloned()
        .collect();
    headers.remove(header::SET_COOKIE);
    for v in kept {
        headers.append(header::SET_COOKIE, v);
    }
}

/// A grant for `user` to `service`'s origin (what `/services/{id}/open` redirects with).
/// A one-use, one-minute grant of service `service` to `user`, signed in with the portal session
/// `session` (its token's hash), whose end ends the visit.
pub fn grant(state: &AppState, service: i64, user: UserId, session: &str) -> String {
    let grant =
        Grant { t: GRANT_PURPOSE.into(), s: service, u: user.0, e: now_ms() + GRANT_LIFETIME_MS, n: crate::crypto::random_token(12), k: session.to_owned() };
    state.keys.seal(&serde_json::to_string(&grant).unwrap_or_default())
}

/// `GET /.suanli/login?grant=…` on a service's origin: a good, unused grant for this service
/// becomes the origin's cookie, and the visitor goes to the service's front page.
fn take_grant(state: &AppState, service: &Published, query: &str) -> Response {
    let sealed = query.split('&').find_map(|kv| kv.strip_prefix("grant=")).unwrap_or_default();
    let now = now_ms();
    let grant = state.keys.open(sealed).ok().and_then(|g| serde_json::from_str::<Grant>(&g).ok());
    let Some(grant) = grant.filter(|g| g.t == GRANT_PURPOSE && g.s == service.id && g.e > now && !g.n.is_empty() && !g.k.is_empty()) else {
        return page_error(StatusCode::FORBIDDEN, "this link has expired or is not for this service: open the service again from the portal");
    };
    {
        let mut used = lock(&state.services.used_grants);
        used.retain(|_, until| *until > now);
        if used.insert(grant.n.clone(), grant.e).is_some() {
            return page_error(StatusCode::FORBIDDEN, "this link was used already: open the service again from the portal");
        }
    }
    let visit = Grant { t: GRANT_PURPOSE.into(), s: service.id, u: grant.u, e: now + VISIT_LIFETIME_MS, n: String::new(), k: grant.k };
    let cookie_value = state.keys.seal(&serde_json::to_string(&visit).unwrap_or_default());
    let secure = if state.services.scheme == "https" { "; Secure" } else { "" };
    let cookie = format!("{}={cookie_value}; Path=/; HttpOnly; SameSite=Lax{secure}; Max-Age={}", state.services.cookie_name(), VISIT_LIFETIME_MS / 1000);
    let mut response = (StatusCode::SEE_OTHER, [(header::LOCATION, "/")]).into_response();
    if let Ok(v) = HeaderValue::from_str(&cookie) {
        response.headers_mut().insert(header::SET_COOKIE, v);
    }
    response
}

// ---- control: telling agents ----

/// Why an agent was not told.
#[derive(Debug, thiserror::Error)]
pub enum ControlFailure {
    #[error("the node's agent is not connected")]
    NotConnected,
    #[error("the agent refused: {0}")]
    Refused(ControlError),
    #[error("{0}")]
    Other(String),
}

impl From<ControlFailure> for ApiError {
    fn from(e: ControlFailure) -> ApiError {
        match e {
            // The broker says the lease is active; its node has not provisioned it yet.
            ControlFailure::Refused(refusal) if refusal.code == "UNKNOWN_LEASE" => {
                ApiError::unavailable(format!("the node is still making the lease ready ({})", refusal.message))
            }
            ControlFailure::Refused(refusal) if refusal.code == "BAD_SPEC" => ApiError::field("replicas", refusal.message),
            other => ApiError::unavailable(other),
        }
    }
}

/// One control request through the node's tunnel; the answer's body when it succeeded.
async fn control(state: &AppState, node: u64, method: Method, uri: &str, body: Body) -> Result<axum::body::Bytes, ControlFailure> {
    // A file (a model) may take a while; anything else answers at once or not at all.
    let limit = if method == Method::PUT && uri.contains("/files/") { FILE_TIMEOUT } else { CONTROL_TIMEOUT };
    tokio::time::timeout(limit, control_once(state, node, method, uri, body))
        .await
        .unwrap_or_else(|_| Err(ControlFailure::Other(format!("the agent did not answer within {} s", limit.as_secs()))))
}

async fn control_once(state: &AppState, node: u64, method: Method, uri: &str, body: Body) -> Result<axum::body::Bytes, ControlFailure> {
    let tunnel = state.tunnels.tunnel(node).ok_or(ControlFailure::NotConnected)?;
    let request = axum::http::Request::builder().method(method).uri(uri).body(body).map_err(|e| ControlFailure::Other(e.to_string()))?;
    let response = tunnel.forward(CONTROL_SERVICE, request).await.map_err(|e| ControlFailure::Other(e.to_string()))?;
    let status = response.status();
    let agent_error = response.headers().get(AGENT_ERROR_HEADER).is_some();
    // Control answers are small; a log's end is at most 64 KiB.
    let bytes = axum::body::to_bytes(Body::new(response.into_body()), 1 << 20).await.map_err(|e| ControlFailure::Other(e.to_string()))?;
    if status.is_success() {
        return Ok(bytes);
    }
    if agent_error {
        // The agent runs no services (it has no lease access, or it is older).
        return Err(ControlFailure::Refused(ControlError { code: "NO_SERVICES".into(), message: String::from_utf8_lossy(&bytes).into_owned() }));
    }
    Err(ControlFailure::Refused(
        serde_json::from_slice(&bytes)
            .unwrap_or_else(|_| ControlError { code: status.as_str().to_owned(), message: String::from_utf8_lossy(&bytes).into_owned() }),
    ))
}

/// What the table says of a service, for telling its agent.
#[derive(Clone, Debug)]
pub struct Deployment {
    pub id: i64,
    /// Whether the table says it runs (else it stopped for good).
    pub running: bool,
    pub owner: UserId,
    pub node: u64,
    pub job_id: u64,
    pub spec: ServiceSpec,
}

const DEPLOYMENT_COLUMNS: &str = "id, owner_id, node_id, lease_id, kind, job_id, generation, replicas, files, state";

fn deployment_of(row: &sqlx::any::AnyRow) -> ApiResult<Deployment> {
    let files: BTreeMap<String, String> = serde_json::from_str(&row.try_get::<String, _>("files")?).map_err(ApiError::internal)?;
    Ok(Deployment {
        id: row.try_get("id")?,
        running: row.try_get::<String, _>("state")? == "running",
        owner: UserId(row.try_get("owner_id")?),
        node: row.try_get::<i64, _>("node_id")? as u64,
        job_id: row.try_get::<i64, _>("job_id")? as u64,
        spec: ServiceSpec {
            lease: row.try_get::<i64, _>("lease_id")? as u64,
            generation: row.try_get::<i64, _>("generation")? as u64,
            replicas: row.try_get::<i64, _>("replicas")?.clamp(1, 64) as u32,
            kind: match ServiceKindName::parse(&row.try_get::<String, _>("kind")?) {
                Some(ServiceKindName::ClassifierDemo) => ServiceKind::ClassifierDemo { files },
                Some(ServiceKindName::Terminal) => ServiceKind::Terminal,
                Some(ServiceKindName::Jupyter) => ServiceKind::Jupyter,
                None => return Err(ApiError::internal("a service of an unknown kind")),
            },
        },
    })
}

pub async fn deployment(state: &AppState, id: i64) -> ApiResult<Option<Deployment>> {
    let row = sqlx::query(&format!("SELECT {DEPLOYMENT_COLUMNS} FROM services WHERE id = $1")).bind(id).fetch_optional(&state.db.pool).await?;
    row.as_ref().map(deployment_of).transpose()
}

/// Tells the node's agent to run `d` (its current generation); sends the files it lacks.
pub async fn deploy(state: &AppState, d: &Deployment) -> Result<ServiceStatus, ControlFailure> {
    let spec = serde_json::to_vec(&d.spec).map_err(|e| ControlFailure::Other(e.to_string()))?;
    match control(state, d.node, Method::PUT, &path::service(d.id as u64), Body::from(spec.clone())).await {
        Err(ControlFailure::Refused(refusal)) if refusal.code == "FILE_MISSING" => {}
        other => return parse_status(other?),
    }
    let owner = crate::auth::principal_of_user(state, d.owner)
        .await
        .map_err(|e| ControlFailure::Other(e.to_string()))?
        .ok_or_else(|| ControlFailure::Other("the service's owner is not an active user".into()))?;
    for (name, sha256) in d.spec.kind.files() {
        let file = crate::api::jobs::output_of(state, &owner, d.job_id, name).await.map_err(|e| ControlFailure::Other(format!("{name}: {e}")))?;
        control(state, d.node, Method::PUT, &path::file(d.id as u64, name, sha256), file.into_body()).await?;
    }
    parse_status(control(state, d.node, Method::PUT, &path::service(d.id as u64), Body::from(spec)).await?)
}

fn parse_status(bytes: axum::body::Bytes) -> Result<ServiceStatus, ControlFailure> {
    serde_json::from_slice(&bytes).map_err(|e| ControlFailure::Other(format!("the agent's answer: {e}")))
}

/// What the node's agent says of the service now (`None`: not connected, or it does not run it).
pub async fn live_status(state: &AppState, node: u64, id: i64) -> Option<ServiceStatus> {
    let bytes = control(state, node, Method::GET, path::SERVICES, Body::empty()).await.ok()?;
    let all: Vec<ServiceStatus> = serde_json::from_slice(&bytes).ok()?;
    all.into_iter().find(|s| s.id == id as u64)
}

/// The end of the service's log, from its agent.
pub async fn log(state: &AppState, node: u64, id: i64) -> Result<String, ControlFailure> {
    let bytes = control(state, node, Method::GET, &path::log(id as u64), Body::empty()).await?;
    Ok(String::from_utf8_lossy(&bytes).into_owned())
}

/// Marks the service stopped (for good: its origin answers 410) and tells its agent.
pub async fn stop(state: &AppState, id: i64, reason: &str) -> ApiResult<bool> {
    let row = sqlx::query("SELECT node_id, slug FROM services WHERE id = $1").bind(id).fetch_optional(&state.db.pool).await?;
    let Some(row) = row else { return Ok(false) };
    let (node, slug): (i64, String) = (row.try_get("node_id")?, row.try_get("slug")?);
    let changed = sqlx::query("UPDATE services SET state = 'stopped', stop_reason = $1, stopped_ms = $2 WHERE id = $3 AND state = 'running'")
        .bind(reason)
        .bind(now_ms())
        .bind(id)
        .execute(&state.db.pool)
        .await?
        .rows_affected()
        > 0;
    state.services.forget(&slug);
    if let Err(e) = control(state, node as u64, Method::DELETE, &path::service(id as u64), Body::empty()).await {
        // An agent not connected now is told nothing: when its tunnel opens it hears only of
        // the services that run, and it stops the ones it is not told of with their lease.
        tracing::info!(service = id, error = %e, "the agent was not told to stop a service");
    }
    Ok(changed)
}

/// Sends every service that should run on `node` to its agent (its tunnel just opened).
pub async fn reconcile_node(state: AppState, node: u64) {
    // The tunnel is kept a moment after its dial is accepted.
    for _ in 0..50 {
        if state.tunnels.tunnel(node).is_some() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // What the node runs is asked first and the table read after: a service created meanwhile
    // is then in the table, never taken for a stopped one.
    let on_node: Vec<ServiceStatus> = match control(&state, node, Method::GET, path::SERVICES, Body::empty()).await {
        Ok(bytes) => serde_json::from_slice(&bytes).unwrap_or_default(),
        Err(e) => return tracing::info!(node, error = %e, "the node's services were not listed"),
    };
    let rows = match sqlx::query("SELECT id FROM services WHERE node_id = $1 AND state = 'running'").bind(node as i64).fetch_all(&state.db.pool).await {
        Ok(rows) => rows,
        Err(e) => return tracing::warn!(node, error = %e, "services of a node not read"),
    };
    let should_run: std::collections::BTreeSet<i64> = rows.iter().filter_map(|r| r.try_get::<i64, _>("id").ok()).collect();
    for &id in &should_run {
        // Read again just before: a service stopped meanwhile is not sent.
        match deployment(&state, id).await {
            Ok(Some(d)) if d.running => {
                if let Err(e) = deploy(&state, &d).await {
                    tracing::warn!(node, service = id, error = %e, "a service was not sent to its node");
                }
            }
            Ok(_) => {}
            Err(e) => tracing::warn!(node, service = id, error = %e, "a service's row is unreadable"),
        }
    }
    // What was stopped while the node was away stops now.
    for stale in on_node.iter().filter(|s| !should_run.contains(&(s.id as i64))) {
        if let Err(e) = control(&state, node, Method::DELETE, &path::service(stale.id), Body::empty()).await {
            tracing::info!(node, service = stale.id, error = %e, "a stopped service was not stopped on its node");
        }
    }
}

/// How many services run on `lease` (its owner is told they stop with it).
pub async fn running_on_lease(state: &AppState, lease: u64) -> ApiResult<u32> {
    let row = sqlx::query("SELECT COUNT(*) AS n FROM services WHERE lease_id = $1 AND state = 'running'").bind(lease as i64).fetch_one(&state.db.pool).await?;
    Ok(row.try_get::<i64, _>("n")?.clamp(0, i64::from(u32::MAX)) as u32)
}

/// Writes request counts and stops the services of leases that ended, every [`SWEEP_EVERY`].
pub async fn run_sweeper(state: AppState) {
    loop {
        tokio::time::sleep(SWEEP_EVERY).await;
        if let Err(e) = sweep(&state).await {
            tracing::warn!(error = %e, "the services' sweep failed");
        }
    }
}

async fn sweep(state: &AppState) -> ApiResult<()> {
    let mut used: HashMap<i64, u64> = lock(&state.services.counts).drain().collect();
    // A connection held open is use, though it sends no request.
    for id in state.services.in_use() {
        used.entry(id).or_default();
    }
    let now = now_ms();
    for (id, n) in used {
        sqlx::query("UPDATE services SET requests = requests + $1, last_request_ms = $2 WHERE id = $3")
            .bind(n as i64)
            .bind(now)
            .bind(id)
            .execute(&state.db.pool)
            .await?;
    }
    if let Some(idle) = state.services.idle_stop {
        stop_idle_environments(state, now, idle).await?;
    }
    let running = sqlx::query("SELECT id, lease_id FROM services WHERE state = 'running'").fetch_all(&state.db.pool).await?;
    let mut leases: HashMap<i64, Vec<i64>> = HashMap::new();
    for row in &running {
        leases.entry(row.try_get("lease_id")?).or_default().push(row.try_get("id")?);
    }
    for (lease, services) in leases {
        let answer = state.market.platform()?.get_lease(suanli_proto::v1::GetLeaseRequest { lease_id: lease as u64 }).await;
        let ended = match answer {
            Ok(l) => {
                use suanli_proto::v1::LeaseState;
                !matches!(LeaseState::try_from(l.into_inner().state), Ok(LeaseState::Active | LeaseState::Approved | LeaseState::Requested))
            }
            Err(status) if status.code() == tonic::Code::NotFound => true,
            Err(_) => false,
        };
        if ended {
            for id in services {
                match stop(state, id, "the lease ended").await {
                    Ok(_) => tracing::info!(service = id, lease, "a service stopped with its lease"),
                    Err(e) => tracing::warn!(service = id, lease, error = %e, "a service of an ended lease was not stopped: next sweep"),
                }
            }
        }
    }
    Ok(())
}

/// Stops the environments nobody has used for `idle`: no request and no open connection, by
/// what every portal process wrote (each writes its own visitors' use at every sweep).
async fn stop_idle_environments(state: &AppState, now: i64, idle: Duration) -> ApiResult<()> {
    let idle_ms = i64::try_from(idle.as_millis()).unwrap_or(i64::MAX);
    let rows = sqlx::query("SELECT id, node_id, kind, created_ms, last_request_ms FROM services WHERE state = 'running'").fetch_all(&state.db.pool).await?;
    for row in rows {
        let Some(kind) = ServiceKindName::parse(&row.try_get::<String, _>("kind")?).filter(|k| k.stops_when_idle()) else { continue };
        let last_used = opt_i64(&row, "last_request_ms")?.unwrap_or(row.try_get("created_ms")?);
        if now.saturating_sub(last_used) < idle_ms {
            continue;
        }
        let (id, node): (i64, i64) = (row.try_get("id")?, row.try_get("node_id")?);
        // A notebook may be working with no tab open (a long training): asked before it stops.
        if kind == ServiceKindName::Jupyter && notebook_at_work(state, node as u64, id, row.try_get("created_ms")?).await {
            sqlx::query("UPDATE services SET last_request_ms = $1 WHERE id = $2").bind(now).bind(id).execute(&state.db.pool).await?;
            continue;
        }
        let minutes = idle.as_secs().div_ceil(60);
        match stop(state, id, &format!("nobody used it for {minutes} min")).await {
            Ok(_) => tracing::info!(service = id, idle_s = idle.as_secs(), "an environment nobody used stopped"),
            Err(e) => tracing::warn!(service = id, error = %e, "an idle environment was not stopped: next sweep"),
        }
    }
    Ok(())
}

/// Whether JupyterLab `id` is at work by its own account: a kernel running code (`busy` in its
/// `/api/kernels`), or, within [`STARTUP_GRACE_MS`] of `created_ms`, JupyterLab not answering yet
/// (installed the first time, which takes minutes). Asked through the node's tunnel as a
/// visitor's request would go, the whole answer within [`CONTROL_TIMEOUT`] (the lease's own
/// process answers it: it must not hold up the sweep); a node not connected says nothing, and
/// the notebook is taken for idle.
async fn notebook_at_work(state: &AppState, node: u64, id: i64, created_ms: i64) -> bool {
    let Some(tunnel) = state.tunnels.tunnel(node) else { return false };
    let Ok(request) = axum::http::Request::get("/api/kernels").body(Body::empty()) else { return false };
    let asked = async {
        let answer = tunnel.forward(&id.to_string(), request).await.ok()?;
        if answer.headers().get(AGENT_ERROR_HEADER).and_then(|v| v.to_str().ok()).and_then(AgentError::from_code) == Some(AgentError::Unreachable) {
            return Some(now_ms() - created_ms < STARTUP_GRACE_MS);
        }
        if !answer.status().is_success() {
            return Some(false);
        }
        let body = axum::body::to_bytes(Body::new(answer.into_body()), 1 << 20).await.ok()?;
        let kernels: Vec<serde_json::Value> = serde_json::from_slice(&body).unwrap_or_default();
        Some(kernels.iter().any(|k| k["execution_state"] == "busy"))
    };
    tokio::time::timeout(CONTROL_TIMEOUT, asked).await.ok().flatten().unwrap_or(false)
}

/// The portal's own codes for the proxy's answers, as documented.
pub fn gone() -> ApiError {
    ApiError::new(Code::ServiceGone, "this service has stopped")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_portals_credentials_never_leave_for_a_service() {
        let mut headers = HeaderMap::new();
        headers.append(header::COOKIE, HeaderValue::from_static("__Host-suanli=session; _xsrf=notebook"));
        headers.append(header::COOKIE, HeaderValue::from_static("suanli-service=grant;suanli = old ; theme=dark"));
        headers.insert(header::AUTHORIZATION, HeaderValue::from_static("Bearer portal-token"));
        strip_portal_credentials(&mut headers, true);
        assert_eq!(headers.get_all(header::COOKIE).iter().collect::<Vec<_>>(), [HeaderValue::from_static("_xsrf=notebook; theme=dark")]);
        assert!(headers.get(header::AUTHORIZATION).is_none(), "the token that authenticated the visitor");
        let mut service_token = HeaderMap::new();
        service_token.insert(header::AUTHORIZATION, HeaderValue::from_static("token notebook-token"));
        strip_portal_credentials(&mut service_token, false);
        assert!(service_token.get(header::AUTHORIZATION).is_some(), "a service's own token goes on");
        assert!(service_token.get(header::COOKIE).is_none());
    }

    #[test]
    fn a_service_keeps_cookies_on_its_own_host_only() {
        let mut headers = HeaderMap::new();
        for cookie in ["_xsrf=1; Path=/", "planted=1; Domain=localhost; Path=/", "also=1;domain=.svc.example.org", "notebook=2; HttpOnly"] {
            headers.append(header::SET_COOKIE, HeaderValue::from_static(cookie));
        }
        keep_host_only_cookies(&mut headers);
        let kept: Vec<&str> = headers.get_all(header::SET_COOKIE).iter().filter_map(|v| v.to_str().ok()).collect();
        assert_eq!(kept, ["_xsrf=1; Path=/", "notebook=2; HttpOnly"]);
    }

    #[test]
    fn a_service_origin_is_one_label_under_the_domain() {
        let hub = ServiceHub::new(Some("svc.example.org".into()), "https://portal.example.org");
        assert_eq!(hub.origin("abc"), "https://abc.svc.example.org");
        let slug = |host: &str| hub.slug_of(&axum::http::Request::builder().header(header::HOST, host).body(Body::empty()).unwrap());
        assert_eq!(slug("abc2.svc.example.org"), Some("abc2".into()));
        assert_eq!(slug("ABC.svc.example.org:443"), Some("abc".into()));
        for host in ["svc.example.org", "a.b.svc.example.org", "abcsvc.example.org", "portal.example.org", "a-b.svc.example.org", ".svc.example.org"] {
            assert_eq!(slug(host), None, "{host}");
        }
        let local = ServiceHub::new(Some("localhost".into()), "http://127.0.0.1:8080");
        assert_eq!(local.origin("x"), "http://x.localhost:8080");
        assert!(new_slug().len() == 26 && new_slug() != new_slug());
        assert!(!ServiceHub::new(None, "http://127.0.0.1:8080").enabled());
    }

    #[test]
    fn a_services_domain_that_covers_the_portals_own_host_is_caught() {
        let hub = ServiceHub::new(Some("example.org".into()), "https://portal.example.org");
        assert!(hub.would_take_the_portals_host("https://portal.example.org"));
        assert!(hub.would_take_the_portals_host("https://portal.example.org:8443/"));
        let hub = ServiceHub::new(Some("svc.example.org".into()), "https://portal.example.org");
        assert!(!hub.would_take_the_portals_host("https://portal.example.org"));
        assert!(!hub.would_take_the_portals_host("https://svc.example.org"), "the domain itself is no service's origin");
        let local = ServiceHub::new(Some("localhost".into()), "http://127.0.0.1:8080");
        assert!(!local.would_take_the_portals_host("http://127.0.0.1:8080"));
    }
}

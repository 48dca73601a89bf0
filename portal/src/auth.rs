//! Who is calling: a browser session (cookie + CSRF token) or a script's API token (bearer).
//!
//! Sessions are server-side rows keyed by the SHA-256 of a random token; the cookie is
//! `HttpOnly`, `SameSite=Strict`, `Secure`, `__Host-` prefixed. Every state-changing request made
//! with the cookie must echo the session's CSRF token in `X-CSRF-Token` (pages put it in a meta
//! tag). API tokens carry no ambient authority, so they need no CSRF token.

use std::sync::{Arc, OnceLock};

use axum::extract::FromRequestParts;
use axum::http::request::Parts;
use axum::http::{header, HeaderMap, Method};
use sqlx::Row;
use subtle::ConstantTimeEq;

use crate::crypto::{random_token, token_hash};
use crate::db::{now_ms, opt_i64, opt_str};
use crate::error::{ApiError, ApiResult, Code};
use crate::i18n::Lang;
use crate::model::{has_permission, AccountState, Permission, Role, UserId, UserKind};
use crate::state::AppState;

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Via {
    Session { token_hash: String, csrf: String, mfa_ok: bool },
    ApiToken,
}

/// An authenticated, active user.
#[derive(Clone, Debug)]
pub struct Principal {
    pub user: UserId,
    pub kind: UserKind,
    pub username: String,
    pub lang: Lang,
    pub roles: Vec<Role>,
    pub broker_account: Option<u64>,
    broker_token_enc: Option<String>,
    pub via: Via,
}

impl Principal {
    pub fn can(&self, p: Permission) -> bool {
        self.kind == UserKind::Operator && has_permission(&self.roles, p)
    }
    pub fn require(&self, p: Permission) -> ApiResult<()> {
        if self.can(p) {
            Ok(())
        } else {
            Err(ApiError::forbidden(format!("your roles do not include {p:?}")))
        }
    }
    pub fn require_kind(&self, kind: UserKind) -> ApiResult<()> {
        if self.kind == kind {
            Ok(())
        } else {
            Err(ApiError::forbidden(format!("this is for {kind} accounts")))
        }
    }
    pub fn csrf(&self) -> Option<&str> {
        match &self.via {
            Via::Session { csrf, .. } => Some(csrf),
            Via::ApiToken => None,
        }
    }
    /// The broker token this user acts with (researchers and suppliers).
    pub fn broker_token(&self, state: &AppState) -> ApiResult<String> {
        let sealed = self.broker_token_enc.as_deref().ok_or_else(|| ApiError::forbidden("this account has no marketplace account"))?;
        Ok(state.keys.open(sealed)?)
    }
}

/// Filled by the extractor so the audit middleware knows who acted.
#[derive(Clone, Default)]
pub struct AuditSlot(pub Arc<OnceLock<i64>>);

pub fn cookie_value(headers: &HeaderMap, name: &str) -> Option<String> {
    headers.get_all(header::COOKIE).iter().filter_map(|v| v.to_str().ok()).flat_map(|v| v.split(';')).find_map(|pair| {
        let (k, v) = pair.trim().split_once('=')?;
        (k == name).then(|| v.to_owned())
    })
}

fn bearer(headers: &HeaderMap) -> Option<&str> {
    headers.get(header::AUTHORIZATION)?.to_str().ok()?.strip_prefix("Bearer ").map(str::trim)
}

/// Where a request comes from: the direct peer, unless that peer is one of the operator's
/// `trusted` reverse proxies; then the last address in `X-Forwarded-For` that is not itself a
/// trusted proxy (the one the proxies saw). A client-chosen header from anyone else counts for
/// nothing: it would let anyone dodge the per-address login throttle or forge the audit log.
pub fn source_address(trusted: &[std::net::IpAddr], peer: Option<std::net::SocketAddr>, headers: &HeaderMap) -> String {
    let Some(peer) = peer.map(|p| p.ip()) else { return "unknown".into() };
    if !trusted.contains(&peer) {
        return peer.to_string();
    }
    let forwarded = headers.get_all("x-forwarded-for").iter().filter_map(|v| v.to_str().ok()).flat_map(|v| v.split(','));
    let hops: Vec<std::net::IpAddr> = forwarded.filter_map(|h| h.trim().parse().ok()).collect();
    hops.iter().rev().find(|ip| !trusted.contains(ip)).copied().unwrap_or(peer).to_string()
}

/// The user's columns and one of their roles (NULL for none): the rows of one user, as the
/// credential queries below join them, so a request costs one round trip to the database.
const USER_AND_ROLE_COLUMNS: &str = "u.id, u.kind, u.username, u.lang, u.state, u.broker_account_id, u.broker_token_enc, r.role";
const JOIN_USER_AND_ROLES: &str = "JOIN users u ON u.id = c.user_id LEFT JOIN roles r ON r.user_id = u.id";

/// How often a credential's "last used" time is written: at most once a minute, so that a busy
/// client does not turn every read into a write.
const LAST_USED_RESOLUTION_MS: i64 = 60_000;

/// The user a credential belongs to, from the rows of [`JOIN_USER_AND_ROLES`] (one per role,
/// or one with no role).
fn user_of(rows: &[sqlx::any::AnyRow]) -> ApiResult<Option<(Principal, AccountState)>> {
    let Some(row) = rows.first() else { return Ok(None) };
    let kind = UserKind::parse(&row.try_get::<String, _>("kind")?).ok_or_else(|| ApiError::internal("unknown user kind"))?;
    let account_state = AccountState::parse(&row.try_get::<String, _>("state")?).ok_or_else(|| ApiError::internal("unknown account state"))?;
    let mut roles = Vec::new();
    for r in rows {
        if let Some(role) = opt_str(r, "role")?.as_deref().and_then(Role::parse) {
            roles.push(role);
        }
    }
    Ok(Some((
        Principal {
            user: UserId(row.try_get("id")?),
            kind,
            username: row.try_get("username")?,
            lang: Lang::parse(&row.try_get::<String, _>("lang")?).unwrap_or_default(),
            roles,
            broker_account: opt_i64(row, "broker_account_id")?.map(|a| a as u64),
            broker_token_enc: opt_str(row, "broker_token_enc")?,
            via: Via::ApiToken,
        },
        account_state,
    )))
}

/// Resolves the caller from the request, without requiring one. Expired sessions are ignored.
/// One query per request reads the credential, its user and the user's roles together.
pub async fn resolve(state: &AppState, headers: &HeaderMap) -> ApiResult<Option<Principal>> {
    let now = now_ms();
    if let Some(token) = bearer(headers) {
        let rows = sqlx::query(&format!(
            "SELECT c.id AS token_id, c.last_used_ms, {USER_AND_ROLE_COLUMNS} FROM api_tokens c {JOIN_USER_AND_ROLES} \
             WHERE c.token_hash = $1 AND c.revoked_ms IS NULL AND c.expires_ms > $2"
        ))
        .bind(token_hash(token))
        .bind(now)
        .fetch_all(&state.db.pool)
        .await?;
        let Some(first) = rows.first() else { return Err(ApiError::broker(suanli_types::ErrorCode::Unauthenticated, "unknown, expired or revoked API token")) };
        if opt_i64(first, "last_used_ms")?.is_none_or(|last| now - last >= LAST_USED_RESOLUTION_MS) {
            sqlx::query("UPDATE api_tokens SET last_used_ms = $1 WHERE id = $2")
                .bind(now)
                .bind(first.try_get::<i64, _>("token_id")?)
                .execute(&state.db.pool)
                .await?;
        }
        return match user_of(&rows)? {
            Some((p, AccountState::Active)) => Ok(Some(p)),
            _ => Err(ApiError::new(Code::AccountDisabled, "this token's account is not active")),
        };
    }
    let Some(token) = cookie_value(headers, state.cookie_name()) else { return Ok(None) };
    let hash = token_hash(&token);
    let rows = sqlx::query(&format!(
        "SELECT c.csrf, c.mfa_ok, c.expires_ms, c.idle_until_ms, {USER_AND_ROLE_COLUMNS} FROM sessions c {JOIN_USER_AND_ROLES} WHERE c.token_hash = $1"
    ))
    .bind(&hash)
    .fetch_all(&state.db.pool)
    .await?;
    let Some(row) = rows.first() else { return Ok(None) };
    let (expires, idle_until): (i64, i64) = (row.try_get("expires_ms")?, row.try_get("idle_until_ms")?);
    if now >= expires || now >= idle_until {
        sqlx::query("DELETE FROM sessions WHERE token_hash = $1").bind(&hash).execute(&state.db.pool).await?;
        return Ok(None);
    }
    // Sliding idle timeout, written at most once a minute per session.
    let idle = state.settings.session_idle.as_millis() as i64;
    if idle_until - now < idle - LAST_USED_RESOLUTION_MS {
        sqlx::query("UPDATE sessions SET idle_until_ms = $1 WHERE token_hash = $2").bind(now + idle).bind(&hash).execute(&state.db.pool).await?;
    }
    let (csrf, mfa_ok) = (row.try_get("csrf")?, row.try_get::<i64, _>("mfa_ok")? == 1);
    match user_of(&rows)? {
        Some((mut p, AccountState::Active)) => {
            p.via = Via::Session { token_hash: hash, csrf, mfa_ok };
            Ok(Some(p))
        }
        _ => Ok(None),
    }
}

/// Requires a logged-in, fully authenticated caller; checks CSRF on state-changing requests.
impl FromRequestParts<AppState> for Principal {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, Self::Rejection> {
        let principal = resolve(state, &parts.headers).await?.ok_or_else(ApiError::unauthenticated)?;
        if let Some(slot) = parts.extensions.get::<AuditSlot>() {
            let _ = slot.0.set(principal.user.0);
        }
        if let Via::Session { csrf, mfa_ok, .. } = &principal.via {
            if !mfa_ok {
                return Err(ApiError::new(Code::MfaRequired, "enter your authenticator code to finish logging in"));
            }
            let safe = matches!(parts.method, Method::GET | Method::HEAD | Method::OPTIONS);
            if !safe {
                let sent = parts.headers.get("x-csrf-token").and_then(|v| v.to_str().ok()).unwrap_or("");
                if !bool::from(sent.as_bytes().ct_eq(csrf.as_bytes())) {
                    return Err(ApiError::new(Code::CsrfFailed, "missing or wrong X-CSRF-Token header"));
                }
            }
        }
        Ok(principal)
    }
}

macro_rules! kind_extractor {
    ($(#[$doc:meta])* $name:ident, $kind:expr) => {
        $(#[$doc])*
        pub struct $name(pub Principal);

        impl FromRequestParts<AppState> for $name {
            type Rejection = ApiError;

            async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, Self::Rejection> {
                let p = Principal::from_request_parts(parts, state).await?;
                p.require_kind($kind)?;
                Ok($name(p))
            }
        }
    };
}

kind_extractor!(
    /// A researcher, checked before the request body is read (a wrong role is a 403, not a 400).
    Researcher,
    UserKind::Researcher
);
kind_extractor!(
    /// A supplier, checked before the request body is read.
    Supplier,
    UserKind::Supplier
);
kind_extractor!(
    /// Any operator; each handler checks the permission it needs.
    Operator,
    UserKind::Operator
);

/// An active user as the portal acts for them while they are not calling (a service it keeps
/// running for its owner fetches the owner's model); `None` for a user not active.
pub async fn principal_of_user(state: &AppState, user: UserId) -> ApiResult<Option<Principal>> {
    let rows = sqlx::query(&format!("SELECT {USER_AND_ROLE_COLUMNS} FROM users u LEFT JOIN roles r ON r.user_id = u.id WHERE u.id = $1"))
        .bind(user.0)
        .fetch_all(&state.db.pool)
        .await?;
    Ok(user_of(&rows)?.filter(|(_, s)| *s == AccountState::Active).map(|(p, _)| p))
}

/// The caller if any (public pages and endpoints).
pub struct MaybePrincipal(pub Option<Principal>);

impl FromRequestParts<AppState> for MaybePrincipal {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, Self::Rejection> {
        // A bad bearer token on a public page is still an error worth telling; a stale cookie is not.
        let p = resolve(state, &parts.headers).await?.filter(|p| !matches!(p.via, Via::Session { mfa_ok: false, .. }));
        Ok(MaybePrincipal(p))
    }
}

/// A new session for `user`: a fresh token every login (no session fixation). Returns the token.
pub async fn create_session(state: &AppState, user: UserId, mfa_ok: bool) -> ApiResult<(String, String)> {
    let token = random_token(32);
    let csrf = random_token(24);
    let now = now_ms();
    sqlx::query("INSERT INTO sessions (token_hash, user_id, csrf, mfa_ok, created_ms, expires_ms, idle_until_ms) VALUES ($1, $2, $3, $4, $5, $6, $7)")
        .bind(token_hash(&token))
        .bind(user.0)
        .bind(&csrf)
        .bind(i64::from(mfa_ok))
        .bind(now)
        .bind(now + state.settings.session_ttl.as_millis() as i64)
        .bind(now + state.settings.session_idle.as_millis() as i64)
        .execute(&state.db.pool)
        .await?;
    Ok((token, csrf))
}

/// `Set-Cookie` for a session token; `None` clears it.
pub fn session_cookie(state: &AppState, token: Option<&str>) -> String {
    let secure = if state.settings.secure_cookies { "; Secure" } else { "" };
    match token {
        Some(t) => format!("{}={t}; Path=/; HttpOnly; SameSite=Strict{secure}; Max-Age={}", state.cookie_name(), state.settings.session_ttl.as_secs()),
        None => format!("{}=; Path=/; HttpOnly; SameSite=Strict{secure}; Max-Age=0", state.cookie_name()),
    }
}

/// The session row of a cookie, even one still waiting for its second factor.
pub async fn pending_session(state: &AppState, headers: &HeaderMap) -> ApiResult<Option<(String, UserId)>> {
    let Some(token) = cookie_value(headers, state.cookie_name()) else { return Ok(None) };
    let hash = token_hash(&token);
    let row = sqlx::query("SELECT user_id, expires_ms FROM sessions WHERE token_hash = $1").bind(&hash).fetch_optional(&state.db.pool).await?;
    Ok(match row {
        Some(r) if r.try_get::<i64, _>("expires_ms")? > now_ms() => Some((hash, UserId(r.try_get("user_id")?))),
        _ => None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn forwarded(value: &str) -> HeaderMap {
        let mut headers = HeaderMap::new();
        headers.insert("x-forwarded-for", value.parse().expect("header"));
        headers
    }

    #[test]
    fn forwarded_for_counts_only_from_a_trusted_proxy_and_only_its_last_untrusted_hop() {
        let proxy: std::net::IpAddr = "10.0.0.2".parse().expect("ip");
        let peer = |ip: &str| Some(std::net::SocketAddr::new(ip.parse().expect("ip"), 40000));
        // From anyone else the header is the client's own say-so: ignored.
        assert_eq!(source_address(&[proxy], peer("203.0.113.9"), &forwarded("198.51.100.1")), "203.0.113.9");
        assert_eq!(source_address(&[], peer("10.0.0.2"), &forwarded("198.51.100.1")), "10.0.0.2");
        // Through the proxy: the address it saw, not what the client prepended.
        assert_eq!(source_address(&[proxy], peer("10.0.0.2"), &forwarded("6.6.6.6, 198.51.100.1")), "198.51.100.1");
        assert_eq!(source_address(&[proxy], peer("10.0.0.2"), &forwarded("198.51.100.1, 10.0.0.2")), "198.51.100.1");
        assert_eq!(source_address(&[proxy], peer("10.0.0.2"), &forwarded("not an address")), "10.0.0.2");
        assert_eq!(source_address(&[proxy], peer("10.0.0.2"), &HeaderMap::new()), "10.0.0.2");
    }
}

//! Accounts (Ius, SPEC §1): registration, activation, sessions, second factor, password reset,
//! profile, API tokens, SSH keys, deregistration.

use std::net::SocketAddr;

use argon2::password_hash::{PasswordHash, PasswordHasher, PasswordVerifier, SaltString};
use argon2::Argon2;
use axum::extract::{ConnectInfo, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use base64::Engine;
use serde::{Deserialize, Serialize};
use sqlx::Row;
use suanli_proto::v1;
use utoipa::ToSchema;

use super::{request_id, ApiJson, ApiPath};
use crate::auth::{self, create_session, pending_session, session_cookie, Principal, Via};
use crate::crypto::{random_token, token_hash};
use crate::db::{new_id, now_ms, opt_i64, opt_str};
use crate::error::{ApiError, ApiResult, Code, Problems};
use crate::i18n::{Lang, Msg};
use crate::identity;
use crate::model::{AccountState, Role, UserId, UserKind, UserType};
use crate::outbox;
use crate::state::AppState;

pub const ACTIVATION_TTL_MS: i64 = 24 * 3600 * 1000;
pub const RESET_TTL_MS: i64 = 3600 * 1000;
const LICENCE_MAX_BYTES: usize = 5 * 1024 * 1024;

#[derive(Deserialize, ToSchema)]
pub struct RegisterRequest {
    /// `researcher` or `supplier`.
    pub kind: UserKind,
    /// Researchers: personal, university, institute, enterprise. Suppliers: enterprise, individual.
    pub user_type: UserType,
    pub username: String,
    pub email: String,
    #[serde(default)]
    pub phone: Option<String>,
    /// The code `POST /api/v1/phone-codes` sent to `phone` (where the portal verifies phones).
    #[serde(default)]
    pub phone_code: Option<String>,
    pub password: String,
    pub password_confirm: String,
    #[serde(default)]
    pub real_name: Option<String>,
    /// Resident identity card number (personal researchers, individual suppliers). Kept only as a keyed hash.
    #[serde(default)]
    pub id_number: Option<String>,
    #[serde(default)]
    pub org_name: Option<String>,
    /// Unified social credit code (organisations).
    #[serde(default)]
    pub credit_code: Option<String>,
    #[serde(default)]
    pub legal_representative: Option<String>,
    /// Registered capital in fen (enterprise suppliers).
    #[serde(default)]
    pub registered_capital_minor: Option<i64>,
    #[serde(default)]
    pub address: Option<String>,
    #[serde(default)]
    pub affiliation: Option<String>,
    #[serde(default)]
    pub settlement_account: Option<String>,
    #[serde(default)]
    pub licence_filename: Option<String>,
    /// The business licence, base64 (PDF, PNG or JPEG, at most 5 MiB).
    #[serde(default)]
    pub licence_base64: Option<String>,
    /// Must be true: the user agreement and privacy policy were accepted.
    pub agree_terms: bool,
    #[serde(default)]
    pub lang: Option<Lang>,
}

/// What is sealed as the profile: everything of SPEC §1 that is not searched on.
#[derive(Clone, Debug, Default, Serialize, Deserialize, ToSchema)]
pub struct Profile {
    pub org_name: Option<String>,
    pub credit_code: Option<String>,
    pub legal_representative: Option<String>,
    pub registered_capital_minor: Option<i64>,
    pub address: Option<String>,
    pub affiliation: Option<String>,
    pub settlement_account: Option<String>,
}

#[derive(Serialize, ToSchema)]
pub struct RegisterResponse {
    pub user_id: String,
    pub state: AccountState,
}

fn text(p: &mut Problems, field: &str, value: &Option<String>, required: bool, max: usize) -> Option<String> {
    match value.as_deref().map(str::trim).filter(|v| !v.is_empty()) {
        None if required => {
            p.add(field, "required");
            None
        }
        None => None,
        Some(v) if v.chars().count() > max => {
            p.add(field, format!("at most {max} characters"));
            None
        }
        Some(v) if v.chars().any(char::is_control) => {
            p.add(field, "must not contain control characters");
            None
        }
        Some(v) => Some(v.to_owned()),
    }
}

/// An optional field with a format rule: checked when given, a problem when missing but required.
fn checked(p: &mut Problems, field: &str, raw: Option<&str>, required: bool, rule: fn(&str) -> Result<String, &'static str>) -> Option<String> {
    match raw.map(str::trim).filter(|s| !s.is_empty()) {
        Some(raw) => p.check(field, rule(raw)),
        None => {
            if required {
                p.add(field, "required");
            }
            None
        }
    }
}

fn licence_type(bytes: &[u8]) -> Option<&'static str> {
    if bytes.starts_with(b"%PDF-") {
        Some("application/pdf")
    } else if bytes.starts_with(&[0x89, b'P', b'N', b'G']) {
        Some("image/png")
    } else if bytes.starts_with(&[0xff, 0xd8, 0xff]) {
        Some("image/jpeg")
    } else {
        None
    }
}

pub async fn hash_password(password: String) -> ApiResult<String> {
    tokio::task::spawn_blocking(move || {
        let salt = SaltString::encode_b64(&crate::crypto::random_bytes::<16>()).map_err(ApiError::internal)?;
        Argon2::default().hash_password(password.as_bytes(), &salt).map(|h| h.to_string()).map_err(ApiError::internal)
    })
    .await
    .map_err(ApiError::internal)?
}

pub async fn verify_password(password: String, hash: String) -> bool {
    tokio::task::spawn_blocking(move || PasswordHash::new(&hash).is_ok_and(|h| Argon2::default().verify_password(password.as_bytes(), &h).is_ok()))
        .await
        .unwrap_or(false)
}

#[utoipa::path(post, path = "/api/v1/accounts", request_body = RegisterRequest, tag = "accounts",
    responses((status = 201, body = RegisterResponse), (status = 400, body = crate::error::ErrorBody), (status = 409, body = crate::error::ErrorBody)))]
pub async fn register(State(state): State<AppState>, headers: HeaderMap, ApiJson(req): ApiJson<RegisterRequest>) -> ApiResult<Response> {
    let mut p = Problems::default();
    if req.kind == UserKind::Operator {
        p.add("kind", "operators are created by a system administrator");
    }
    if !req.user_type.allowed_for(req.kind) {
        p.add("user_type", format!("{} accounts cannot be of type {}", req.kind, req.user_type));
    }
    let username = p.check("username", identity::check_username(&req.username));
    let email = p.check("email", identity::check_email(&req.email));
    let phone = checked(&mut p, "phone", req.phone.as_deref(), req.kind == UserKind::Supplier, identity::check_mobile);
    p.check("password", identity::check_password(&req.password));
    if req.password != req.password_confirm {
        p.add("password_confirm", "does not match the password");
    }
    if !req.agree_terms {
        p.add("agree_terms", "the user agreement and privacy policy must be accepted");
    }
    let org = req.user_type.is_organisation() || (req.kind == UserKind::Supplier && req.user_type == UserType::Enterprise);
    let needs_id = matches!(req.user_type, UserType::Personal | UserType::Individual);
    let real_name = text(&mut p, "real_name", &req.real_name, true, 64);
    let id_number = checked(&mut p, "id_number", req.id_number.as_deref(), needs_id, identity::check_id_card);
    let supplier_enterprise = req.kind == UserKind::Supplier && req.user_type == UserType::Enterprise;
    let credit_code = checked(&mut p, "credit_code", req.credit_code.as_deref(), org, identity::check_credit_code);
    let profile = Profile {
        org_name: text(&mut p, "org_name", &req.org_name, org, 128),
        credit_code,
        legal_representative: text(&mut p, "legal_representative", &req.legal_representative, supplier_enterprise, 64),
        registered_capital_minor: match req.registered_capital_minor {
            Some(c) if c < 0 => {
                p.add("registered_capital_minor", "must not be negative");
                None
            }
            None if supplier_enterprise => {
                p.add("registered_capital_minor", "required");
                None
            }
            other => other,
        },
        address: text(&mut p, "address", &req.address, req.kind == UserKind::Supplier && !supplier_enterprise, 256),
        affiliation: text(&mut p, "affiliation", &req.affiliation, req.kind == UserKind::Supplier && !supplier_enterprise, 128),
        settlement_account: text(&mut p, "settlement_account", &req.settlement_account, supplier_enterprise, 64),
    };
    let licence = match req.licence_base64.as_deref().filter(|s| !s.is_empty()) {
        Some(b64) => match base64::engine::general_purpose::STANDARD.decode(b64.trim()) {
            Ok(bytes) if bytes.len() > LICENCE_MAX_BYTES => {
                p.add("licence_base64", "at most 5 MiB");
                None
            }
            Ok(bytes) => match licence_type(&bytes) {
                Some(ct) => Some((ct, b64.trim().to_owned())),
                None => {
                    p.add("licence_base64", "must be a PDF, PNG or JPEG file");
                    None
                }
            },
            Err(_) => {
                p.add("licence_base64", "is not base64");
                None
            }
        },
        None if org => {
            p.add("licence_base64", "organisations upload their business licence");
            None
        }
        None => None,
    };
    p.finish()?;
    if let (true, Some(phone)) = (state.settings.verify_phones, &phone) {
        take_phone_code(&state, phone, req.phone_code.as_deref().unwrap_or("")).await?;
    }
    let (Some(username), Some(email)) = (username, email) else { return Err(ApiError::internal("validated fields missing")) };
    let lang = req.lang.unwrap_or_else(|| Lang::from_accept_language(headers.get(header::ACCEPT_LANGUAGE).and_then(|v| v.to_str().ok()).unwrap_or("")));

    let id = new_id();
    let now = now_ms();
    let password_hash = hash_password(req.password.clone()).await?;
    let keys = &state.keys;
    let mut tx = state.db.pool.begin().await?;
    let inserted = sqlx::query(
        "INSERT INTO users (id, kind, user_type, username, email_hash, email_enc, phone_hash, phone_enc, password_hash, state,
            real_name_enc, id_number_hash, profile_enc, lang, totp_enabled, created_ms)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, 0, $15)",
    )
    .bind(id)
    .bind(req.kind.as_str())
    .bind(req.user_type.as_str())
    .bind(&username)
    .bind(keys.lookup_hash("email", &email.to_lowercase()))
    .bind(keys.seal(&email))
    .bind(phone.as_ref().map(|ph| keys.lookup_hash("phone", ph)))
    .bind(phone.as_ref().map(|ph| keys.seal(ph)))
    .bind(&password_hash)
    .bind(AccountState::PendingActivation.as_str())
    .bind(real_name.as_ref().map(|n| keys.seal(n)))
    .bind(id_number.as_ref().map(|n| keys.lookup_hash("id_number", n)))
    .bind(keys.seal(&serde_json::to_string(&profile).map_err(ApiError::internal)?))
    .bind(lang.as_str())
    .bind(now)
    .execute(&mut *tx)
    .await;
    if let Err(e) = inserted {
        if crate::db::Db::is_unique_violation(&e) {
            let msg = e.to_string();
            let field = if msg.contains("username") {
                "username"
            } else if msg.contains("phone") {
                "phone"
            } else {
                "email"
            };
            return Err(ApiError::conflict_field(field, "is already registered"));
        }
        return Err(e.into());
    }
    if let Some((content_type, b64)) = licence {
        sqlx::query("INSERT INTO licences (user_id, filename, content_type, data_enc) VALUES ($1, $2, $3, $4)")
            .bind(id)
            .bind(req.licence_filename.as_deref().unwrap_or("licence").chars().take(128).collect::<String>())
            .bind(content_type)
            .bind(keys.seal(&b64))
            .execute(&mut *tx)
            .await?;
    }
    let token = random_token(24);
    sqlx::query("INSERT INTO email_tokens (token_hash, user_id, purpose, expires_ms) VALUES ($1, $2, 'activation', $3)")
        .bind(token_hash(&token))
        .bind(id)
        .bind(now + ACTIVATION_TTL_MS)
        .execute(&mut *tx)
        .await?;
    let link = format!("{}/activate?token={token}", state.settings.public_url);
    let body = format!("{}\n\n{link}\n\n{}\n", Msg::MailActivateBody.text(lang), Msg::MailIgnore.text(lang));
    outbox::queue_email(&state, &mut *tx, &email, Msg::MailActivateSubject.text(lang), &body).await?;
    tx.commit().await?;
    state.outbox_wake.notify_one();
    Ok((StatusCode::CREATED, axum::Json(RegisterResponse { user_id: id.to_string(), state: AccountState::PendingActivation })).into_response())
}

const PHONE_CODE_TTL_MS: i64 = 10 * 60 * 1000;

/// Consumes the code sent to `phone`: right, unexpired, fewer than 5 wrong tries.
async fn take_phone_code(state: &AppState, phone: &str, code: &str) -> ApiResult<()> {
    let key = state.keys.lookup_hash("phone-code-to", phone);
    let wrong = || ApiError::field("phone_code", "wrong or expired code; ask for a new one");
    let row = sqlx::query("SELECT code_hash, expires_ms, attempts FROM phone_codes WHERE phone_hash = $1").bind(&key).fetch_optional(&state.db.pool).await?;
    let Some(row) = row else { return Err(wrong()) };
    if row.try_get::<i64, _>("expires_ms")? <= now_ms() || row.try_get::<i64, _>("attempts")? >= 5 {
        return Err(wrong());
    }
    let expected: String = row.try_get("code_hash")?;
    if !bool::from(subtle::ConstantTimeEq::ct_eq(state.keys.lookup_hash("phone-code", code.trim()).as_bytes(), expected.as_bytes())) {
        sqlx::query("UPDATE phone_codes SET attempts = attempts + 1 WHERE phone_hash = $1").bind(&key).execute(&state.db.pool).await?;
        return Err(wrong());
    }
    let used = sqlx::query("DELETE FROM phone_codes WHERE phone_hash = $1 AND code_hash = $2").bind(&key).bind(&expected).execute(&state.db.pool).await?;
    if used.rows_affected() == 1 {
        Ok(())
    } else {
        Err(wrong())
    }
}

#[derive(Deserialize, ToSchema)]
pub struct PhoneCodeRequest {
    pub phone: String,
    #[serde(default)]
    pub lang: Option<Lang>,
}

/// Sends a 6-digit code by SMS to a mobile number about to be registered (one a minute).
#[utoipa::path(post, path = "/api/v1/phone-codes", request_body = PhoneCodeRequest, tag = "accounts",
    responses((status = 202), (status = 400, body = crate::error::ErrorBody), (status = 429, body = crate::error::ErrorBody)))]
pub async fn send_phone_code(State(state): State<AppState>, ApiJson(req): ApiJson<PhoneCodeRequest>) -> ApiResult<StatusCode> {
    let phone = identity::check_mobile(&req.phone).map_err(|p| ApiError::field("phone", p))?;
    if !state.settings.verify_phones {
        return Err(ApiError::field("phone", "this portal does not verify phone numbers"));
    }
    let key = state.keys.lookup_hash("phone-code-to", &phone);
    let now = now_ms();
    let last = sqlx::query("SELECT sent_ms FROM phone_codes WHERE phone_hash = $1").bind(&key).fetch_optional(&state.db.pool).await?;
    if let Some(r) = last {
        if now - r.try_get::<i64, _>("sent_ms")? < 60_000 {
            return Err(ApiError::new(Code::TooManyAttempts, "one code a minute"));
        }
    }
    let code = format!("{:06}", u32::from_le_bytes(crate::crypto::random_bytes::<4>()) % 1_000_000);
    let lang = req.lang.unwrap_or_default();
    let text = format!("{} {code}", Msg::SmsCodeText.text(lang));
    let mut tx = state.db.pool.begin().await?;
    sqlx::query("DELETE FROM phone_codes WHERE phone_hash = $1").bind(&key).execute(&mut *tx).await?;
    sqlx::query("INSERT INTO phone_codes (phone_hash, code_hash, expires_ms, attempts, sent_ms) VALUES ($1, $2, $3, 0, $4)")
        .bind(&key)
        .bind(state.keys.lookup_hash("phone-code", &code))
        .bind(now + PHONE_CODE_TTL_MS)
        .bind(now)
        .execute(&mut *tx)
        .await?;
    let m =
        outbox::Outgoing { channel: outbox::Channel::Sms, recipient: &phone, subject: &text, body: &text, user_id: None, alert_id: None, not_before_ms: None };
    outbox::queue(&state, &mut *tx, &m).await?;
    tx.commit().await?;
    state.outbox_wake.notify_one();
    Ok(StatusCode::ACCEPTED)
}

#[derive(Deserialize, ToSchema)]
pub struct TokenRequest {
    pub token: String,
}

#[derive(Serialize, ToSchema)]
pub struct ActivationResponse {
    pub state: AccountState,
}

/// Consumes a one-time email token of `purpose`, returning its user.
/// The user an unused, unexpired email token of `purpose` is for, without spending it.
async fn valid_email_token(state: &AppState, token: &str, purpose: &str) -> ApiResult<UserId> {
    let row = sqlx::query("SELECT user_id, expires_ms, used_ms FROM email_tokens WHERE token_hash = $1 AND purpose = $2")
        .bind(token_hash(token))
        .bind(purpose)
        .fetch_optional(&state.db.pool)
        .await?;
    let invalid = || ApiError::new(Code::TokenInvalid, "this link is invalid, used or expired");
    let row = row.ok_or_else(invalid)?;
    if opt_i64(&row, "used_ms")?.is_some() || row.try_get::<i64, _>("expires_ms")? <= now_ms() {
        return Err(invalid());
    }
    Ok(UserId(row.try_get("user_id")?))
}

/// Spends an email token: the user it was for, if it was still good (only one caller wins).
async fn take_email_token(state: &AppState, token: &str, purpose: &str) -> ApiResult<UserId> {
    let user = valid_email_token(state, token, purpose).await?;
    let invalid = || ApiError::new(Code::TokenInvalid, "this link is invalid, used or expired");
    let claimed = sqlx::query("UPDATE email_tokens SET used_ms = $1 WHERE token_hash = $2 AND used_ms IS NULL")
        .bind(now_ms())
        .bind(token_hash(token))
        .execute(&state.db.pool)
        .await?;
    if claimed.rows_affected() != 1 {
        return Err(invalid());
    }
    Ok(user)
}

#[utoipa::path(post, path = "/api/v1/activation", request_body = TokenRequest, tag = "accounts",
    responses((status = 200, body = ActivationResponse), (status = 400, body = crate::error::ErrorBody)))]
pub async fn activate(State(state): State<AppState>, ApiJson(req): ApiJson<TokenRequest>) -> ApiResult<axum::Json<ActivationResponse>> {
    Ok(axum::Json(ActivationResponse { state: activate_with_token(&state, &req.token).await? }))
}

pub async fn activate_with_token(state: &AppState, token: &str) -> ApiResult<AccountState> {
    if token.is_empty() || token.len() > 128 {
        return Err(ApiError::new(Code::TokenInvalid, "this link is invalid, used or expired"));
    }
    // The link is spent only once the account is open: a failure on the way (the broker
    // unreachable) leaves it good for another try.
    let user = valid_email_token(state, token, "activation").await?;
    let row = sqlx::query("SELECT kind, user_type, state FROM users WHERE id = $1").bind(user.0).fetch_one(&state.db.pool).await?;
    let kind = UserKind::parse(&row.try_get::<String, _>("kind")?).unwrap_or(UserKind::Researcher);
    let user_type = UserType::parse(&row.try_get::<String, _>("user_type")?).unwrap_or(UserType::Personal);
    if row.try_get::<String, _>("state")? != AccountState::PendingActivation.as_str() {
        return Err(ApiError::new(Code::TokenInvalid, "this account is already activated"));
    }
    let org = user_type.is_organisation() || (kind == UserKind::Supplier && user_type == UserType::Enterprise);
    if org {
        sqlx::query("UPDATE users SET state = $1, activated_ms = $2 WHERE id = $3")
            .bind(AccountState::PendingReview.as_str())
            .bind(now_ms())
            .bind(user.0)
            .execute(&state.db.pool)
            .await?;
        take_email_token(state, token, "activation").await?;
        return Ok(AccountState::PendingReview);
    }
    open_market_account(state, user, kind).await?;
    take_email_token(state, token, "activation").await?;
    Ok(AccountState::Active)
}

/// Registers the user's account with the broker and makes the portal account active. Safe to
/// retry at any point: the request ID is the user's, and the account's broker token is drawn
/// and kept (sealed) here before the broker is asked, so an answer lost on the way loses
/// nothing.
pub async fn open_market_account(state: &AppState, user: UserId, kind: UserKind) -> ApiResult<()> {
    let broker_kind = match kind {
        UserKind::Researcher => v1::AccountKind::Researcher,
        UserKind::Supplier => v1::AccountKind::Supplier,
        UserKind::Operator => {
            sqlx::query("UPDATE users SET state = 'active', activated_ms = $1 WHERE id = $2").bind(now_ms()).bind(user.0).execute(&state.db.pool).await?;
            return Ok(());
        }
    };
    let drawn = state.keys.seal(&format!("sl_{}", crate::crypto::random_token(40)));
    // The first try's token, if there was one; else this one (and only one try's wins).
    sqlx::query("UPDATE users SET broker_token_enc = $1 WHERE id = $2 AND broker_token_enc IS NULL").bind(&drawn).bind(user.0).execute(&state.db.pool).await?;
    let row = sqlx::query("SELECT broker_token_enc FROM users WHERE id = $1").bind(user.0).fetch_one(&state.db.pool).await?;
    let sealed = opt_str(&row, "broker_token_enc")?.ok_or_else(|| ApiError::internal("the broker token was not kept"))?;
    let token = state.keys.open(&sealed).map_err(ApiError::internal)?;
    let request = v1::RegisterAccountRequest { request_id: request_id(&["portal-user", &user.0.to_string()]), kind: broker_kind.into(), token };
    let reply = state.market.platform()?.register_account(request).await?.into_inner();
    sqlx::query("UPDATE users SET state = 'active', activated_ms = $1, broker_account_id = $2 WHERE id = $3")
        .bind(now_ms())
        .bind(reply.account_id as i64)
        .bind(user.0)
        .execute(&state.db.pool)
        .await?;
    Ok(())
}

#[derive(Deserialize, ToSchema)]
pub struct LoginRequest {
    /// Username or email.
    pub login: String,
    pub password: String,
    /// The authenticator code, when two-factor authentication is on (or send it to /session/totp).
    #[serde(default)]
    pub totp_code: Option<String>,
}

#[derive(Serialize, ToSchema)]
pub struct SessionResponse {
    pub user_id: String,
    pub username: String,
    pub kind: UserKind,
    /// Send this in `X-CSRF-Token` with every state-changing request made with the cookie.
    pub csrf_token: String,
    /// True: the session is not usable until `POST /api/v1/session/totp`.
    pub mfa_required: bool,
}

/// Whether `key` has failed `limit` times within the throttle window.
async fn throttled(state: &AppState, key: &str, limit: i64) -> ApiResult<bool> {
    let row = sqlx::query("SELECT failures, window_start_ms FROM login_throttle WHERE throttle_key = $1").bind(key).fetch_optional(&state.db.pool).await?;
    Ok(match row {
        Some(r) => {
            let window = state.settings.throttle_window.as_millis() as i64;
            r.try_get::<i64, _>("failures")? >= limit && now_ms() - r.try_get::<i64, _>("window_start_ms")? < window
        }
        None => false,
    })
}

async fn record_failure(state: &AppState, key: &str) -> ApiResult<()> {
    let now = now_ms();
    let window = state.settings.throttle_window.as_millis() as i64;
    let updated = sqlx::query(
        "UPDATE login_throttle SET
            failures = CASE WHEN $1 - window_start_ms >= $2 THEN 1 ELSE failures + 1 END,
            window_start_ms = CASE WHEN $1 - window_start_ms >= $2 THEN $1 ELSE window_start_ms END
         WHERE throttle_key = $3",
    )
    .bind(now)
    .bind(window)
    .bind(key)
    .execute(&state.db.pool)
    .await?;
    if updated.rows_affected() == 0 {
        let inserted = sqlx::query("INSERT INTO login_throttle (throttle_key, failures, window_start_ms) VALUES ($1, 1, $2)")
            .bind(key)
            .bind(now)
            .execute(&state.db.pool)
            .await;
        if let Err(e) = inserted {
            if !crate::db::Db::is_unique_violation(&e) {
                return Err(e.into());
            }
            // Lost a race with a concurrent failure: count this one on the row it made.
            sqlx::query("UPDATE login_throttle SET failures = failures + 1 WHERE throttle_key = $1").bind(key).execute(&state.db.pool).await?;
        }
    }
    Ok(())
}

/// A valid argon2 hash of nothing anyone knows, so unknown logins cost as much as known ones.
const DUMMY_HASH: &str = "$argon2id$v=19$m=19456,t=2,p=1$c2FsdHNhbHRzYWx0c2FsdA$3BBqD5rlDwIjDJ2H3XB1D9fsVPuz2mLS/fOuIz+e/lc";

pub fn totp_for(secret: &[u8]) -> ApiResult<totp_rs::TOTP> {
    totp_rs::TOTP::new(totp_rs::Algorithm::SHA1, 6, 1, 30, secret.to_vec()).map_err(ApiError::internal)
}

/// Checks a code against the user's secret, accepting the previous, current and next 30 s
/// step (clock drift), and consumes it: a step once used, or any earlier one, never opens a
/// session again (no replay within the code's window).
pub async fn check_totp(state: &AppState, user: UserId, sealed_secret: &str, code: &str) -> ApiResult<bool> {
    let secret = base64::engine::general_purpose::STANDARD.decode(state.keys.open(sealed_secret)?).map_err(ApiError::internal)?;
    let code = code.trim();
    if code.len() != 6 || !code.bytes().all(|b| b.is_ascii_digit()) {
        return Ok(false);
    }
    let totp = totp_for(&secret)?;
    let now_step = (now_ms() / 1000 / 30) as u64;
    let Some(step) = [now_step.saturating_sub(1), now_step, now_step + 1].into_iter().find(|s| totp.generate(s * 30) == code) else { return Ok(false) };
    let claimed = sqlx::query("UPDATE users SET totp_last_step = $1 WHERE id = $2 AND (totp_last_step IS NULL OR totp_last_step < $1)")
        .bind(step as i64)
        .bind(user.0)
        .execute(&state.db.pool)
        .await?;
    Ok(claimed.rows_affected() == 1)
}

#[utoipa::path(post, path = "/api/v1/session", request_body = LoginRequest, tag = "accounts",
    responses((status = 200, body = SessionResponse), (status = 401, body = crate::error::ErrorBody), (status = 403, body = crate::error::ErrorBody), (status = 429, body = crate::error::ErrorBody)))]
pub async fn login(
    State(state): State<AppState>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    slot: Option<axum::Extension<auth::AuditSlot>>,
    ApiJson(req): ApiJson<LoginRequest>,
) -> ApiResult<Response> {
    let login = req.login.trim().to_lowercase();
    if login.is_empty() || login.len() > 254 || req.password.len() > 1024 {
        return Err(ApiError::field("login", "give a username or email and a password"));
    }
    let user_key = format!("login:{}", state.keys.lookup_hash("throttle", &login));
    let ip_key = format!("ip:{}", auth::source_address(&state.settings.trusted_proxies, Some(peer), &headers));
    // One address may fail more often than one login: many people share a NAT.
    let max = state.settings.max_login_failures;
    if throttled(&state, &user_key, max).await? || throttled(&state, &ip_key, max * 10).await? {
        return Err(ApiError::new(Code::TooManyAttempts, "too many failed logins; wait 15 minutes"));
    }
    let row = sqlx::query("SELECT id, kind, username, password_hash, state, totp_secret_enc, totp_enabled FROM users WHERE username = $1 OR email_hash = $2")
        .bind(req.login.trim())
        .bind(state.keys.lookup_hash("email", &login))
        .fetch_optional(&state.db.pool)
        .await?;
    let hash = match &row {
        Some(r) => r.try_get::<String, _>("password_hash")?,
        None => DUMMY_HASH.to_owned(),
    };
    let password_ok = verify_password(req.password.clone(), hash).await;
    let Some(row) = row.filter(|_| password_ok) else {
        record_failure(&state, &user_key).await?;
        record_failure(&state, &ip_key).await?;
        return Err(ApiError::broker(suanli_types::ErrorCode::Unauthenticated, "wrong username, email or password"));
    };
    let user = UserId(row.try_get("id")?);
    if let Some(slot) = slot {
        let _ = slot.0 .0.set(user.0);
    }
    match AccountState::parse(&row.try_get::<String, _>("state")?) {
        Some(AccountState::Active) => {}
        Some(AccountState::PendingActivation) => return Err(ApiError::new(Code::AccountNotActivated, "open the activation link we emailed you first")),
        Some(AccountState::PendingReview) => return Err(ApiError::new(Code::AccountPendingReview, "an operator is reviewing this organisation account")),
        _ => return Err(ApiError::new(Code::AccountDisabled, "this account is closed")),
    }
    sqlx::query("DELETE FROM login_throttle WHERE throttle_key = $1").bind(&user_key).execute(&state.db.pool).await?;
    let kind = UserKind::parse(&row.try_get::<String, _>("kind")?).unwrap_or(UserKind::Researcher);
    let totp_on = row.try_get::<i64, _>("totp_enabled")? == 1;
    let mut mfa_ok = !totp_on;
    if totp_on {
        if let (Some(code), Some(secret)) = (req.totp_code.as_deref(), opt_str(&row, "totp_secret_enc")?) {
            check_second_factor(&state, user, &secret, code).await?;
            mfa_ok = true;
        }
    }
    let (token, csrf) = create_session(&state, user, mfa_ok).await?;
    let body = SessionResponse { user_id: user.0.to_string(), username: row.try_get("username")?, kind, csrf_token: csrf, mfa_required: !mfa_ok };
    Ok(([(header::SET_COOKIE, session_cookie(&state, Some(&token)))], axum::Json(body)).into_response())
}

/// The second factor of a login, throttled on its own: wrong codes count per user whichever
/// way they arrive (with the password, or on the half-open session), and only a right code
/// clears them. A right password never does, or the password's holder could guess codes
/// without end.
async fn check_second_factor(state: &AppState, user: UserId, sealed_secret: &str, code: &str) -> ApiResult<()> {
    let key = format!("totp:{}", user.0);
    if throttled(state, &key, state.settings.max_login_failures).await? {
        return Err(ApiError::new(Code::TooManyAttempts, "too many wrong codes; wait 15 minutes"));
    }
    if !check_totp(state, user, sealed_secret, code).await? {
        record_failure(state, &key).await?;
        return Err(ApiError::new(Code::MfaInvalid, "wrong authenticator code"));
    }
    sqlx::query("DELETE FROM login_throttle WHERE throttle_key = $1").bind(&key).execute(&state.db.pool).await?;
    Ok(())
}

#[derive(Deserialize, ToSchema)]
pub struct TotpRequest {
    pub code: String,
}

#[utoipa::path(post, path = "/api/v1/session/totp", request_body = TotpRequest, tag = "accounts",
    responses((status = 200, body = SessionResponse), (status = 401, body = crate::error::ErrorBody)))]
pub async fn login_totp(State(state): State<AppState>, headers: HeaderMap, ApiJson(req): ApiJson<TotpRequest>) -> ApiResult<Response> {
    let (hash, user) = pending_session(&state, &headers).await?.ok_or_else(ApiError::unauthenticated)?;
    let row = sqlx::query("SELECT username, kind, totp_secret_enc FROM users WHERE id = $1").bind(user.0).fetch_one(&state.db.pool).await?;
    let secret = opt_str(&row, "totp_secret_enc")?.ok_or_else(|| ApiError::new(Code::MfaInvalid, "two-factor authentication is not set up"))?;
    check_second_factor(&state, user, &secret, &req.code).await?;
    // The half-open session is replaced by a new one: its token never becomes fully trusted.
    sqlx::query("DELETE FROM sessions WHERE token_hash = $1").bind(&hash).execute(&state.db.pool).await?;
    let (token, csrf) = create_session(&state, user, true).await?;
    let kind = UserKind::parse(&row.try_get::<String, _>("kind")?).unwrap_or(UserKind::Researcher);
    let body = SessionResponse { user_id: user.0.to_string(), username: row.try_get("username")?, kind, csrf_token: csrf, mfa_required: false };
    Ok(([(header::SET_COOKIE, session_cookie(&state, Some(&token)))], axum::Json(body)).into_response())
}

#[utoipa::path(delete, path = "/api/v1/session", tag = "accounts", responses((status = 204), (status = 401, body = crate::error::ErrorBody)))]
pub async fn logout(State(state): State<AppState>, principal: Principal) -> ApiResult<Response> {
    if let Via::Session { token_hash, .. } = &principal.via {
        sqlx::query("DELETE FROM sessions WHERE token_hash = $1").bind(token_hash).execute(&state.db.pool).await?;
    }
    Ok((StatusCode::NO_CONTENT, [(header::SET_COOKIE, session_cookie(&state, None))]).into_response())
}

#[utoipa::path(post, path = "/api/v1/session/refresh", tag = "accounts", responses((status = 200, body = SessionResponse), (status = 401, body = crate::error::ErrorBody)))]
pub async fn refresh(State(state): State<AppState>, principal: Principal) -> ApiResult<Response> {
    let Via::Session { token_hash, .. } = &principal.via else { return Err(ApiError::field("authorization", "API tokens do not refresh; sessions do")) };
    sqlx::query("DELETE FROM sessions WHERE token_hash = $1").bind(token_hash).execute(&state.db.pool).await?;
    let (token, csrf) = create_session(&state, principal.user, true).await?;
    let body =
        SessionResponse { user_id: principal.user.0.to_string(), username: principal.username, kind: principal.kind, csrf_token: csrf, mfa_required: false };
    Ok(([(header::SET_COOKIE, session_cookie(&state, Some(&token)))], axum::Json(body)).into_response())
}

#[derive(Serialize, ToSchema)]
pub struct MeResponse {
    pub user_id: String,
    pub kind: UserKind,
    pub user_type: UserType,
    pub username: String,
    pub email: String,
    pub phone: Option<String>,
    pub real_name: Option<String>,
    pub lang: Lang,
    #[schema(value_type = Vec<String>)]
    pub roles: Vec<Role>,
    pub totp_enabled: bool,
    /// The broker account (`acc-N`) this user leases or supplies as.
    pub market_account: Option<String>,
    pub profile: Profile,
}

pub async fn me_of(state: &AppState, p: &Principal) -> ApiResult<MeResponse> {
    let row = sqlx::query("SELECT user_type, email_enc, phone_enc, real_name_enc, profile_enc, totp_enabled FROM users WHERE id = $1")
        .bind(p.user.0)
        .fetch_one(&state.db.pool)
        .await?;
    let open = |v: Option<String>| v.map(|s| state.keys.open(&s)).transpose();
    Ok(MeResponse {
        user_id: p.user.0.to_string(),
        kind: p.kind,
        user_type: UserType::parse(&row.try_get::<String, _>("user_type")?).unwrap_or(UserType::Personal),
        username: p.username.clone(),
        email: state.keys.open(&row.try_get::<String, _>("email_enc")?)?,
        phone: open(opt_str(&row, "phone_enc")?)?,
        real_name: open(opt_str(&row, "real_name_enc")?)?,
        lang: p.lang,
        roles: p.roles.clone(),
        totp_enabled: row.try_get::<i64, _>("totp_enabled")? == 1,
        market_account: p.broker_account.map(|a| format!("acc-{a}")),
        profile: serde_json::from_str(&state.keys.open(&row.try_get::<String, _>("profile_enc")?)?).unwrap_or_default(),
    })
}

#[utoipa::path(get, path = "/api/v1/me", tag = "accounts", responses((status = 200, body = MeResponse), (status = 401, body = crate::error::ErrorBody)))]
pub async fn me(State(state): State<AppState>, principal: Principal) -> ApiResult<axum::Json<MeResponse>> {
    Ok(axum::Json(me_of(&state, &principal).await?))
}

#[derive(Deserialize, ToSchema)]
pub struct UpdateProfileRequest {
    #[serde(default)]
    pub lang: Option<Lang>,
    #[serde(default)]
    pub phone: Option<String>,
    #[serde(default)]
    pub address: Option<String>,
    #[serde(default)]
    pub affiliation: Option<String>,
    #[serde(default)]
    pub settlement_account: Option<String>,
    /// To change the password, give the current one too.
    #[serde(default)]
    pub new_password: Option<String>,
    #[serde(default)]
    pub current_password: Option<String>,
}

#[utoipa::path(patch, path = "/api/v1/me", request_body = UpdateProfileRequest, tag = "accounts",
    responses((status = 200, body = MeResponse), (status = 400, body = crate::error::ErrorBody), (status = 401, body = crate::error::ErrorBody)))]
pub async fn update_me(State(state): State<AppState>, principal: Principal, ApiJson(req): ApiJson<UpdateProfileRequest>) -> ApiResult<axum::Json<MeResponse>> {
    let mut p = Problems::default();
    let phone = req.phone.as_deref().map(|raw| p.check("phone", identity::check_mobile(raw)));
    let address = text(&mut p, "address", &req.address, false, 256);
    let affiliation = text(&mut p, "affiliation", &req.affiliation, false, 128);
    let settlement = text(&mut p, "settlement_account", &req.settlement_account, false, 64);
    if let Some(pw) = &req.new_password {
        p.check("new_password", identity::check_password(pw));
        if req.current_password.is_none() {
            p.add("current_password", "required to change the password");
        }
    }
    p.finish()?;
    if let (Some(new), Some(current)) = (&req.new_password, &req.current_password) {
        let row = sqlx::query("SELECT password_hash FROM users WHERE id = $1").bind(principal.user.0).fetch_one(&state.db.pool).await?;
        if !verify_password(current.clone(), row.try_get("password_hash")?).await {
            return Err(ApiError::field("current_password", "is wrong"));
        }
        let hash = hash_password(new.clone()).await?;
        sqlx::query("UPDATE users SET password_hash = $1 WHERE id = $2").bind(hash).bind(principal.user.0).execute(&state.db.pool).await?;
        // Every other session of this user ends with the old password.
        let keep = match &principal.via {
            Via::Session { token_hash, .. } => token_hash.clone(),
            Via::ApiToken => String::new(),
        };
        sqlx::query("DELETE FROM sessions WHERE user_id = $1 AND token_hash <> $2").bind(principal.user.0).bind(keep).execute(&state.db.pool).await?;
        revoke_api_tokens(&state, principal.user).await?;
    }
    if let Some(lang) = req.lang {
        sqlx::query("UPDATE users SET lang = $1 WHERE id = $2").bind(lang.as_str()).bind(principal.user.0).execute(&state.db.pool).await?;
    }
    if let Some(Some(phone)) = phone {
        let r = sqlx::query("UPDATE users SET phone_hash = $1, phone_enc = $2 WHERE id = $3")
            .bind(state.keys.lookup_hash("phone", &phone))
            .bind(state.keys.seal(&phone))
            .bind(principal.user.0)
            .execute(&state.db.pool)
            .await;
        if let Err(e) = r {
            return Err(if crate::db::Db::is_unique_violation(&e) { ApiError::conflict_field("phone", "is already registered") } else { e.into() });
        }
    }
    if address.is_some() || affiliation.is_some() || settlement.is_some() {
        let mut me = me_of(&state, &principal).await?.profile;
        me.address = address.or(me.address);
        me.affiliation = affiliation.or(me.affiliation);
        me.settlement_account = settlement.or(me.settlement_account);
        sqlx::query("UPDATE users SET profile_enc = $1 WHERE id = $2")
            .bind(state.keys.seal(&serde_json::to_string(&me).map_err(ApiError::internal)?))
            .bind(principal.user.0)
            .execute(&state.db.pool)
            .await?;
    }
    let mut refreshed = principal.clone();
    if let Some(lang) = req.lang {
        refreshed.lang = lang;
    }
    Ok(axum::Json(me_of(&state, &refreshed).await?))
}

#[derive(Deserialize, ToSchema)]
pub struct ResetRequest {
    pub email: String,
}

#[utoipa::path(post, path = "/api/v1/password-reset", request_body = ResetRequest, tag = "accounts", responses((status = 202), (status = 400, body = crate::error::ErrorBody)))]
pub async fn request_reset(State(state): State<AppState>, ApiJson(req): ApiJson<ResetRequest>) -> ApiResult<StatusCode> {
    let email = identity::check_email(&req.email).map_err(|p| ApiError::field("email", p))?;
    let row = sqlx::query("SELECT id, lang FROM users WHERE email_hash = $1 AND state = 'active'")
        .bind(state.keys.lookup_hash("email", &email.to_lowercase()))
        .fetch_optional(&state.db.pool)
        .await?;
    // The same answer whether or not the address is registered.
    if let Some(row) = row {
        let lang = Lang::parse(&row.try_get::<String, _>("lang")?).unwrap_or_default();
        let token = random_token(24);
        let mut tx = state.db.pool.begin().await?;
        sqlx::query("INSERT INTO email_tokens (token_hash, user_id, purpose, expires_ms) VALUES ($1, $2, 'reset', $3)")
            .bind(token_hash(&token))
            .bind(row.try_get::<i64, _>("id")?)
            .bind(now_ms() + RESET_TTL_MS)
            .execute(&mut *tx)
            .await?;
        let link = format!("{}/reset?token={token}", state.settings.public_url);
        let body = format!("{}\n\n{link}\n", Msg::MailResetBody.text(lang));
        outbox::queue_email(&state, &mut *tx, &email, Msg::MailResetSubject.text(lang), &body).await?;
        tx.commit().await?;
        state.outbox_wake.notify_one();
    }
    Ok(StatusCode::ACCEPTED)
}

#[derive(Deserialize, ToSchema)]
pub struct ResetConfirmRequest {
    pub token: String,
    pub password: String,
    pub password_confirm: String,
}

#[utoipa::path(post, path = "/api/v1/password-reset/confirm", request_body = ResetConfirmRequest, tag = "accounts", responses((status = 204), (status = 400, body = crate::error::ErrorBody)))]
pub async fn confirm_reset(State(state): State<AppState>, ApiJson(req): ApiJson<ResetConfirmRequest>) -> ApiResult<StatusCode> {
    let mut p = Problems::default();
    p.check("password", identity::check_password(&req.password));
    if req.password != req.password_confirm {
        p.add("password_confirm", "does not match the password");
    }
    if req.token.is_empty() || req.token.len() > 128 {
        p.add("token", "required");
    }
    p.finish()?;
    let user = take_email_token(&state, &req.token, "reset").await?;
    let hash = hash_password(req.password.clone()).await?;
    sqlx::query("UPDATE users SET password_hash = $1 WHERE id = $2").bind(hash).bind(user.0).execute(&state.db.pool).await?;
    sqlx::query("DELETE FROM sessions WHERE user_id = $1").bind(user.0).execute(&state.db.pool).await?;
    revoke_api_tokens(&state, user).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// A new password ends every API token too: whoever knew the old one may have made some.
async fn revoke_api_tokens(state: &AppState, user: UserId) -> ApiResult<()> {
    sqlx::query("UPDATE api_tokens SET revoked_ms = $1 WHERE user_id = $2 AND revoked_ms IS NULL").bind(now_ms()).bind(user.0).execute(&state.db.pool).await?;
    Ok(())
}

#[derive(Serialize, ToSchema)]
pub struct TotpSetup {
    /// Base32 secret for an authenticator app.
    pub secret: String,
    pub otpauth_url: String,
}

pub fn new_totp_secret(username: &str) -> (Vec<u8>, TotpSetup) {
    let secret = crate::crypto::random_bytes::<20>().to_vec();
    let b32 = match totp_rs::Secret::Raw(secret.clone()).to_encoded() {
        totp_rs::Secret::Encoded(s) => s,
        totp_rs::Secret::Raw(_) => String::new(),
    };
    let url = format!("otpauth://totp/Suanli:{username}?secret={b32}&issuer=Suanli&algorithm=SHA1&digits=6&period=30");
    (secret, TotpSetup { secret: b32, otpauth_url: url })
}

#[utoipa::path(post, path = "/api/v1/me/totp", tag = "accounts", responses((status = 200, body = TotpSetup), (status = 401, body = crate::error::ErrorBody)))]
pub async fn begin_totp(State(state): State<AppState>, principal: Principal) -> ApiResult<axum::Json<TotpSetup>> {
    let (secret, setup) = new_totp_secret(&principal.username);
    // Enabled only once a code from it is confirmed; until then the old factor (if any) stays.
    sqlx::query("UPDATE users SET totp_secret_enc = $1 WHERE id = $2 AND totp_enabled = 0")
        .bind(state.keys.seal(&base64::engine::general_purpose::STANDARD.encode(secret)))
        .bind(principal.user.0)
        .execute(&state.db.pool)
        .await?;
    Ok(axum::Json(setup))
}

#[utoipa::path(post, path = "/api/v1/me/totp/confirm", request_body = TotpRequest, tag = "accounts", responses((status = 204), (status = 401, body = crate::error::ErrorBody)))]
pub async fn confirm_totp(State(state): State<AppState>, principal: Principal, ApiJson(req): ApiJson<TotpRequest>) -> ApiResult<StatusCode> {
    let row = sqlx::query("SELECT totp_secret_enc FROM users WHERE id = $1").bind(principal.user.0).fetch_one(&state.db.pool).await?;
    let secret = opt_str(&row, "totp_secret_enc")?.ok_or_else(|| ApiError::field("code", "start with POST /api/v1/me/totp"))?;
    if !check_totp(&state, principal.user, &secret, &req.code).await? {
        return Err(ApiError::new(Code::MfaInvalid, "wrong authenticator code"));
    }
    sqlx::query("UPDATE users SET totp_enabled = 1 WHERE id = $1").bind(principal.user.0).execute(&state.db.pool).await?;
    Ok(StatusCode::NO_CONTENT)
}

#[derive(Deserialize, ToSchema)]
pub struct NewApiToken {
    pub name: String,
    /// Days until the token stops working: 1 to 365 (default 90).
    #[serde(default)]
    pub expires_in_days: Option<i64>,
    /// The authenticator code, when two-factor authentication is on: a stolen session cookie
    /// alone does not mint a long-lived credential.
    #[serde(default)]
    pub totp_code: Option<String>,
}

/// How long an API token lives unless its maker says otherwise, and at most.
const API_TOKEN_DEFAULT_DAYS: i64 = 90;
const API_TOKEN_MAX_DAYS: i64 = 365;
const DAY_MS: i64 = 24 * 3600 * 1000;

#[derive(Serialize, ToSchema)]
pub struct ApiTokenInfo {
    pub id: String,
    pub name: String,
    pub created_ms: i64,
    pub expires_ms: i64,
    pub last_used_ms: Option<i64>,
    /// Only in the answer that created it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub token: Option<String>,
}

#[utoipa::path(post, path = "/api/v1/me/api-tokens", request_body = NewApiToken, tag = "accounts", responses((status = 201, body = ApiTokenInfo), (status = 400, body = crate::error::ErrorBody), (status = 401, body = crate::error::ErrorBody)))]
pub async fn create_api_token(State(state): State<AppState>, principal: Principal, ApiJson(req): ApiJson<NewApiToken>) -> ApiResult<Response> {
    // A token makes no tokens: each is made by a person, in a session.
    if matches!(principal.via, Via::ApiToken) {
        return Err(ApiError::forbidden("API tokens are made in a signed-in session, not with another token"));
    }
    let mut p = Problems::default();
    let name = text(&mut p, "name", &Some(req.name), true, 64);
    let days = req.expires_in_days.unwrap_or(API_TOKEN_DEFAULT_DAYS);
    if !(1..=API_TOKEN_MAX_DAYS).contains(&days) {
        p.add("expires_in_days", format!("between 1 and {API_TOKEN_MAX_DAYS}"));
    }
    p.finish()?;
    let row = sqlx::query("SELECT totp_enabled, totp_secret_enc FROM users WHERE id = $1").bind(principal.user.0).fetch_one(&state.db.pool).await?;
    if row.try_get::<i64, _>("totp_enabled")? == 1 {
        let (Some(code), Some(secret)) = (req.totp_code.as_deref(), opt_str(&row, "totp_secret_enc")?) else {
            return Err(ApiError::field("totp_code", "the authenticator code is needed to make an API token"));
        };
        check_second_factor(&state, principal.user, &secret, code).await?;
    }
    let token = format!("slp_{}", random_token(32));
    let id = new_id();
    let now = now_ms();
    let expires_ms = now + days * DAY_MS;
    sqlx::query("INSERT INTO api_tokens (id, token_hash, user_id, name, created_ms, expires_ms) VALUES ($1, $2, $3, $4, $5, $6)")
        .bind(id)
        .bind(token_hash(&token))
        .bind(principal.user.0)
        .bind(name.clone().unwrap_or_default())
        .bind(now)
        .bind(expires_ms)
        .execute(&state.db.pool)
        .await?;
    let info = ApiTokenInfo { id: id.to_string(), name: name.unwrap_or_default(), created_ms: now, expires_ms, last_used_ms: None, token: Some(token) };
    Ok((StatusCode::CREATED, axum::Json(info)).into_response())
}

#[utoipa::path(get, path = "/api/v1/me/api-tokens", tag = "accounts", responses((status = 200, body = [ApiTokenInfo]), (status = 401, body = crate::error::ErrorBody)))]
pub async fn list_api_tokens(State(state): State<AppState>, principal: Principal) -> ApiResult<axum::Json<Vec<ApiTokenInfo>>> {
    let rows = sqlx::query("SELECT id, name, created_ms, expires_ms, last_used_ms FROM api_tokens WHERE user_id = $1 AND revoked_ms IS NULL AND expires_ms > $2 ORDER BY created_ms")
        .bind(principal.user.0)
        .bind(now_ms())
        .fetch_all(&state.db.pool)
        .await?;
    let mut out = Vec::new();
    for r in rows {
        out.push(ApiTokenInfo {
            id: r.try_get::<i64, _>("id")?.to_string(),
            name: r.try_get("name")?,
            created_ms: r.try_get("created_ms")?,
            expires_ms: r.try_get("expires_ms")?,
            last_used_ms: opt_i64(&r, "last_used_ms")?,
            token: None,
        });
    }
    Ok(axum::Json(out))
}

#[utoipa::path(delete, path = "/api/v1/me/api-tokens/{id}", params(("id" = String, Path)), tag = "accounts", responses((status = 204), (status = 404, body = crate::error::ErrorBody), (status = 401, body = crate::error::ErrorBody)))]
pub async fn revoke_api_token(State(state): State<AppState>, principal: Principal, ApiPath(id): ApiPath<String>) -> ApiResult<StatusCode> {
    let id: i64 = id.parse().map_err(|_| ApiError::not_found("token"))?;
    let r = sqlx::query("UPDATE api_tokens SET revoked_ms = $1 WHERE id = $2 AND user_id = $3 AND revoked_ms IS NULL")
        .bind(now_ms())
        .bind(id)
        .bind(principal.user.0)
        .execute(&state.db.pool)
        .await?;
    if r.rows_affected() == 0 {
        return Err(ApiError::not_found("token"));
    }
    Ok(StatusCode::NO_CONTENT)
}

#[derive(Deserialize, ToSchema)]
pub struct NewSshKey {
    /// OpenSSH public key line.
    pub public_key: String,
}

#[derive(Serialize, ToSchema)]
pub struct SshKeyInfo {
    pub id: String,
    pub public_key: String,
    pub added_ms: i64,
}

#[utoipa::path(post, path = "/api/v1/me/ssh-keys", request_body = NewSshKey, tag = "accounts", responses((status = 201, body = SshKeyInfo), (status = 400, body = crate::error::ErrorBody), (status = 401, body = crate::error::ErrorBody), (status = 403, body = crate::error::ErrorBody)))]
pub async fn add_ssh_key(
    State(state): State<AppState>,
    auth::Researcher(principal): auth::Researcher,
    ApiJson(req): ApiJson<NewSshKey>,
) -> ApiResult<Response> {
    let account = principal.broker_account.ok_or_else(|| ApiError::forbidden("no marketplace account"))?;
    let key = req.public_key.trim().to_owned();
    if key.is_empty() || key.len() > 16 * 1024 {
        return Err(ApiError::field("public_key", "an OpenSSH public key line"));
    }
    let id = new_id();
    state
        .market
        .platform()?
        .add_ssh_key(v1::AddSshKeyRequest { request_id: request_id(&["portal-key", &id.to_string()]), account_id: account, public_key: key.clone() })
        .await
        .map_err(|s| {
            let mut e = ApiError::from(s);
            for f in &mut e.fields {
                f.field = "public_key".into();
            }
            e
        })?;
    let now = now_ms();
    sqlx::query("INSERT INTO ssh_keys (id, user_id, public_key, added_ms) VALUES ($1, $2, $3, $4)")
        .bind(id)
        .bind(principal.user.0)
        .bind(&key)
        .bind(now)
        .execute(&state.db.pool)
        .await?;
    Ok((StatusCode::CREATED, axum::Json(SshKeyInfo { id: id.to_string(), public_key: key, added_ms: now })).into_response())
}

#[utoipa::path(get, path = "/api/v1/me/ssh-keys", tag = "accounts", responses((status = 200, body = [SshKeyInfo]), (status = 401, body = crate::error::ErrorBody)))]
pub async fn list_ssh_keys(State(state): State<AppState>, principal: Principal) -> ApiResult<axum::Json<Vec<SshKeyInfo>>> {
    let rows = sqlx::query("SELECT id, public_key, added_ms FROM ssh_keys WHERE user_id = $1 ORDER BY added_ms")
        .bind(principal.user.0)
        .fetch_all(&state.db.pool)
        .await?;
    let mut out = Vec::new();
    for r in rows {
        out.push(SshKeyInfo { id: r.try_get::<i64, _>("id")?.to_string(), public_key: r.try_get("public_key")?, added_ms: r.try_get("added_ms")? });
    }
    Ok(axum::Json(out))
}

#[utoipa::path(delete, path = "/api/v1/me/ssh-keys/{id}", params(("id" = String, Path)), tag = "accounts",
    responses((status = 204), (status = 404, body = crate::error::ErrorBody), (status = 401, body = crate::error::ErrorBody)))]
pub async fn remove_ssh_key(State(state): State<AppState>, principal: Principal, ApiPath(id): ApiPath<String>) -> ApiResult<StatusCode> {
    let id: i64 = id.parse().map_err(|_| ApiError::not_found("ssh key"))?;
    let row =
        sqlx::query("SELECT public_key FROM ssh_keys WHERE id = $1 AND user_id = $2").bind(id).bind(principal.user.0).fetch_optional(&state.db.pool).await?;
    let Some(row) = row else { return Err(ApiError::not_found("ssh key")) };
    let account = principal.broker_account.ok_or_else(|| ApiError::forbidden("no marketplace account"))?;
    let key: String = row.try_get("public_key")?;
    // The broker first: the key stops opening leases there; a retry (same request ID) after a
    // lost answer, or a key the broker no longer has, still ends with the key gone here.
    let removed = state
        .market
        .platform()?
        .remove_ssh_key(v1::RemoveSshKeyRequest { request_id: request_id(&["portal-key-removal", &id.to_string()]), account_id: account, public_key: key })
        .await;
    match removed {
        Ok(_) => {}
        Err(status) if suanli_proto::decode_status(&status).code == suanli_types::ErrorCode::NotFound => {}
        Err(status) => return Err(status.into()),
    }
    sqlx::query("DELETE FROM ssh_keys WHERE id = $1 AND user_id = $2").bind(id).bind(principal.user.0).execute(&state.db.pool).await?;
    Ok(StatusCode::NO_CONTENT)
}

#[derive(Deserialize, ToSchema)]
pub struct DeregisterRequest {
    pub password: String,
}

/// 注销: ends every live lease the user holds (or, for a supplier, that runs on its clusters),
/// delists a supplier's clusters, then erases personal data. Kept: the row's ID, kind, type,
/// the keyed hash of the ID number and the timestamps (real-name and accounting records the law
/// requires), and the broker account (the ledger refers to it).
#[utoipa::path(delete, path = "/api/v1/me", request_body = DeregisterRequest, tag = "accounts", responses((status = 204), (status = 400, body = crate::error::ErrorBody), (status = 401, body = crate::error::ErrorBody)))]
pub async fn deregister(State(state): State<AppState>, principal: Principal, ApiJson(req): ApiJson<DeregisterRequest>) -> ApiResult<Response> {
    if principal.kind == UserKind::Operator {
        return Err(ApiError::forbidden("operator accounts are closed by a system administrator"));
    }
    let row = sqlx::query("SELECT password_hash FROM users WHERE id = $1").bind(principal.user.0).fetch_one(&state.db.pool).await?;
    if !verify_password(req.password.clone(), row.try_get("password_hash")?).await {
        return Err(ApiError::field("password", "is wrong"));
    }
    if principal.broker_account.is_some() {
        let token = principal.broker_token(&state)?;
        let mut client = state.market.as_token(&token)?;
        let leases = suanli_proto::client::all_leases(&client, true).await?;
        for l in leases {
            let reason = if principal.kind == UserKind::Researcher { v1::EndReason::ByResearcher } else { v1::EndReason::SupplierMaintenance };
            client
                .end_lease(v1::EndLeaseRequest {
                    request_id: request_id(&["deregister", &l.lease_id.to_string()]),
                    lease_id: l.lease_id,
                    reason: reason.into(),
                })
                .await?;
        }
        if principal.kind == UserKind::Supplier {
            let mine: Vec<u64> = super::market::my_clusters(&state, &principal)?.iter().filter(|c| !c.delisted).map(|c| c.cluster_id).collect();
            for cluster_id in mine {
                client.delist_cluster(v1::DelistClusterRequest { request_id: request_id(&["deregister-cl", &cluster_id.to_string()]), cluster_id }).await?;
                state.market.refresh_cluster(cluster_id).await?;
            }
        }
    }
    // The market account's token stops working: it is replaced by one nobody keeps.
    if let Some(account) = principal.broker_account {
        let rotate = v1::RotateAccountTokenRequest { request_id: request_id(&["deregister-token", &account.to_string()]), account_id: account };
        state.market.platform()?.rotate_account_token(rotate).await?;
    }
    let id = principal.user.0;
    let mut tx = state.db.pool.begin().await?;
    sqlx::query(
        "UPDATE users SET state = 'deregistered', username = $1, email_hash = $2, email_enc = '', phone_hash = NULL, phone_enc = NULL,
            password_hash = '!', real_name_enc = NULL, profile_enc = $3, broker_token_enc = NULL, totp_secret_enc = NULL, totp_enabled = 0,
            deregistered_ms = $4 WHERE id = $5",
    )
    .bind(format!("closed-{id}"))
    .bind(format!("closed-{id}"))
    .bind(state.keys.seal("{}"))
    .bind(now_ms())
    .bind(id)
    .execute(&mut *tx)
    .await?;
    for table in ["sessions", "api_tokens", "ssh_keys", "licences", "email_tokens"] {
        sqlx::query(&format!("DELETE FROM {table} WHERE user_id = $1")).bind(id).execute(&mut *tx).await?;
    }
    tx.commit().await?;
    Ok((StatusCode::NO_CONTENT, [(header::SET_COOKIE, session_cookie(&state, None))]).into_response())
}

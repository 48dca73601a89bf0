//! Accounts that exist without registering: operators (made by a system administrator on the
//! command line) and the demo researcher, supplier and operator of the local marketplace.

use base64::Engine;
use sqlx::Row;

use crate::api::accounts::{hash_password, new_totp_secret, TotpSetup};
use crate::db::{new_id, now_ms};
use crate::error::{ApiError, ApiResult};
use crate::model::{role_conflict, AccountState, Role, UserId, UserKind, UserType};
use crate::state::AppState;

pub struct NewUser<'a> {
    pub kind: UserKind,
    pub user_type: UserType,
    pub username: &'a str,
    pub email: &'a str,
    pub password: &'a str,
    pub real_name: &'a str,
}

/// Inserts an active user directly (no activation mail). Returns `None` when the username exists.
pub async fn insert_active(state: &AppState, u: &NewUser<'_>, totp: bool) -> ApiResult<Option<(UserId, Option<TotpSetup>)>> {
    let exists = sqlx::query("SELECT id FROM users WHERE username = $1").bind(u.username).fetch_optional(&state.db.pool).await?;
    if exists.is_some() {
        return Ok(None);
    }
    let id = new_id();
    let (secret, setup) = new_totp_secret(u.username);
    let k = &state.keys;
    sqlx::query(
        "INSERT INTO users (id, kind, user_type, username, email_hash, email_enc, password_hash, state, real_name_enc, profile_enc, lang,
            totp_secret_enc, totp_enabled, created_ms, activated_ms)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, 'en', $11, $12, $13, $14)",
    )
    .bind(id)
    .bind(u.kind.as_str())
    .bind(u.user_type.as_str())
    .bind(u.username)
    .bind(k.lookup_hash("email", &u.email.to_lowercase()))
    .bind(k.seal(u.email))
    .bind(hash_password(u.password.to_owned()).await?)
    .bind(if u.kind == UserKind::Operator { AccountState::Active.as_str() } else { AccountState::PendingActivation.as_str() })
    .bind(k.seal(u.real_name))
    .bind(k.seal("{}"))
    .bind(totp.then(|| k.seal(&base64::engine::general_purpose::STANDARD.encode(&secret))))
    .bind(i64::from(totp))
    .bind(now_ms())
    .bind(now_ms())
    .execute(&state.db.pool)
    .await?;
    Ok(Some((UserId(id), totp.then_some(setup))))
}

/// An operator with `roles`; two-factor authentication is always on for operators.
pub async fn create_operator(state: &AppState, username: &str, email: &str, password: &str, roles: &[Role]) -> ApiResult<TotpSetup> {
    if let Some((a, b)) = role_conflict(roles) {
        return Err(ApiError::new(crate::error::Code::RoleConflict, format!("{} and {} may not be held together", a.as_str(), b.as_str())));
    }
    crate::identity::check_password(password).map_err(|p| ApiError::field("password", p))?;
    let user = NewUser { kind: UserKind::Operator, user_type: UserType::Staff, username, email, password, real_name: username };
    let (id, setup) = insert_active(state, &user, true).await?.ok_or_else(|| ApiError::conflict_field("username", "exists"))?;
    for role in roles {
        sqlx::query("INSERT INTO roles (user_id, role, granted_ms) VALUES ($1, $2, $3)")
            .bind(id.0)
            .bind(role.as_str())
            .bind(now_ms())
            .execute(&state.db.pool)
            .await?;
    }
    setup.ok_or_else(|| ApiError::internal("operator without a second factor"))
}

/// A marketplace account to adopt for a demo user: the broker's own demo accounts (so the demo
/// supplier owns the demo clusters and agents), given as `ID:TOKEN`.
#[derive(Clone, Debug)]
pub struct Adopt {
    pub account_id: u64,
    pub token: String,
}

impl std::str::FromStr for Adopt {
    type Err = String;
    fn from_str(s: &str) -> Result<Adopt, String> {
        let (id, token) = s.split_once(':').ok_or("expected ACCOUNT_ID:TOKEN")?;
        let account_id = id.trim_start_matches("acc-").parse().map_err(|_| "ACCOUNT_ID must be a number")?;
        Ok(Adopt { account_id, token: token.to_owned() })
    }
}

pub const DEMO_PASSWORD: &str = "demo-password-1";

/// The demo researcher, supplier and operator (idempotent). Returns lines to print.
pub async fn seed(state: &AppState, researcher: Option<Adopt>, supplier: Option<Adopt>) -> ApiResult<Vec<String>> {
    let mut lines = Vec::new();
    for (kind, user_type, name, adopt) in
        [(UserKind::Researcher, UserType::Personal, "demo-researcher", researcher), (UserKind::Supplier, UserType::Individual, "demo-supplier", supplier)]
    {
        let u = NewUser { kind, user_type, username: name, email: &format!("{name}@suanli.local"), password: DEMO_PASSWORD, real_name: name };
        if let Some((id, _)) = insert_active(state, &u, false).await? {
            match adopt {
                Some(a) => {
                    sqlx::query("UPDATE users SET state = 'active', broker_account_id = $1, broker_token_enc = $2 WHERE id = $3")
                        .bind(a.account_id as i64)
                        .bind(state.keys.seal(&a.token))
                        .bind(id.0)
                        .execute(&state.db.pool)
                        .await?;
                }
                None => crate::api::accounts::open_market_account(state, id, kind).await?,
            }
        }
        lines.push(format!("demo {kind:<10} {name} / {DEMO_PASSWORD}"));
    }
    let row = sqlx::query("SELECT totp_secret_enc FROM users WHERE username = 'demo-operator'").fetch_optional(&state.db.pool).await?;
    let secret = match row {
        Some(r) => {
            let raw =
                base64::engine::general_purpose::STANDARD.decode(state.keys.open(&r.try_get::<String, _>("totp_secret_enc")?)?).map_err(ApiError::internal)?;
            match totp_rs::Secret::Raw(raw).to_encoded() {
                totp_rs::Secret::Encoded(s) => s,
                totp_rs::Secret::Raw(_) => String::new(),
            }
        }
        None => create_operator(state, "demo-operator", "demo-operator@suanli.local", DEMO_PASSWORD, &[Role::Operator, Role::Monitor]).await?.secret,
    };
    lines.push(format!("demo operator   demo-operator / {DEMO_PASSWORD}, TOTP secret {secret} (code: suanli-portal totp {secret})"));
    Ok(lines)
}

//! Alerts (SPEC §5): the broker's events turned into messages for the people concerned.
//!
//! The engine follows the broker's `Watch` stream from a cursor kept in the database. Each batch
//! is handled in one transaction that writes the alerts, their recipients, every outbox message
//! and the new cursor together: after a crash the batch is handled again from scratch or not at
//! all — an alert is never lost and never sent twice. One alert stays open per condition (a card,
//! a node) until it resolves, which sends one resolve message to the same people.
//!
//! Conditions: a card's health (off the bus, overheating, XID errors → the supplier and the
//! researcher holding it), a node's agent going silent (grouped per node), a lease requested
//! (the supplier must approve), a lease ending within 24 h and within 1 h (the researcher), a
//! job that finished or failed (its owner), a researcher's available balance below the
//! operator's threshold (open until a deposit or refund lifts it), a paid lease whose cards all
//! showed 0 % utilization for `[portal.alerts] idle_lease_seconds` (default an hour; leases
//! checked every `check_seconds`), and the platform's own alerts from Alertmanager (for the
//! operators who watch the platform, `api/operations.rs`).
//!
//! The cursor (`event_cursor`) starts, on first start, at the events from then on. Before
//! writing, the engine asks the broker what it needs (which node and lease a card belongs to,
//! who holds the lease). One open alert per condition is a partial unique index on
//! `alerts(condition_key) WHERE state = 'open'`. Each message is rendered in its recipient's
//! language; email, SMS (a mobile number and an SMS gateway) and a signed webhook per the
//! person's settings; quiet hours (UTC+8) hold back SMS and webhooks, not mail; more than 30
//! messages an hour to one person wait for the next hour. The outbox (`outbox.rs`) claims a
//! message for 15 s before sending (replicas never send one twice at once), records every
//! attempt's error and retries with backoff for 24 h.

use std::collections::BTreeSet;
use std::time::Duration;

use sqlx::Row;
use suanli_proto::v1;
use tokio_stream::StreamExt;

use crate::db::{new_id, now_ms, opt_i64, opt_str};
use crate::error::ApiResult;
use crate::i18n::{datetime, Lang, Msg};
use crate::model::{AccountState, Role, UserKind};
use crate::outbox::{self, Channel, Outgoing};
use crate::state::AppState;

const CURSOR: &str = "alerts";
/// More messages than this to one person in an hour wait for the next hour.
const PER_HOUR_LIMIT: i64 = 30;

/// What happened, as the engine decided before writing anything.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Decision {
    Open {
        key: String,
        kind: &'static str,
        subject: Subject,
        accounts: BTreeSet<u64>,
    },
    Resolve {
        key: String,
    },
    /// A one-off notice (nothing to resolve), sent once per key.
    Notice {
        key: String,
        kind: &'static str,
        subject: Subject,
        accounts: BTreeSet<u64>,
    },
    /// An alert for the platform's operators (every active operator with a role that watches
    /// the platform: monitor, operator, system administrator), resolved by `Resolve`.
    ForOperators {
        key: String,
        subject: Subject,
    },
}

/// Who hears of an alert.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Recipient {
    Account(u64),
    User(i64),
}

/// The roles whose holders receive the platform's operational alerts.
pub const OPERATIONS_ROLES: [Role; 3] = [Role::Monitor, Role::Operator, Role::SystemAdministrator];

/// The parts of a message, rendered per recipient's language.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Subject {
    Card {
        host: String,
        index: u32,
        problem: Msg,
    },
    NodeSilent {
        host: String,
    },
    LeaseRequested {
        lease: u64,
        cpc: String,
    },
    LeaseExpiring {
        lease: u64,
        ends_ms: i64,
        /// Services running on the lease, which stop with it.
        services: u32,
    },
    LeaseIdle {
        lease: u64,
        minutes: u64,
    },
    JobEnded {
        job: u64,
        name: String,
        failed: bool,
        reason: String,
    },
    BalanceLow {
        available_minor: i64,
    },
    /// An alert from the platform's own monitoring (Prometheus' Alertmanager).
    Operations {
        name: String,
        summary: String,
    },
}

impl Subject {
    pub fn render(&self, lang: Lang) -> String {
        let t = |m: Msg| m.text(lang);
        match (self, lang) {
            (Subject::Card { host, index, problem }, Lang::En) => format!("card {index} on {host} {}", t(*problem)),
            (Subject::Card { host, index, problem }, Lang::Zh) => format!("{host} 的 {index} {}{}", t(Msg::CardOn), t(*problem)),
            (Subject::NodeSilent { host }, _) => format!("{host}: {}", t(Msg::ProblemSilent)),
            (Subject::LeaseRequested { lease, cpc }, _) => format!("lease-{lease} ({cpc}): {}", t(Msg::LeaseRequestedNotice)),
            (Subject::LeaseExpiring { lease, ends_ms, services: 0 }, _) => {
                format!("lease-{lease}: {} ({})", t(Msg::LeaseExpiringNotice), datetime(*ends_ms, lang))
            }
            (Subject::LeaseExpiring { lease, ends_ms, services }, Lang::En) => {
                format!("lease-{lease}: {} ({}); its {services} service(s) on leased cards stop with it", t(Msg::LeaseExpiringNotice), datetime(*ends_ms, lang))
            }
            (Subject::LeaseExpiring { lease, ends_ms, services }, Lang::Zh) => {
                format!("lease-{lease}: {} ({})；其上的 {services} 个服务将随之停止", t(Msg::LeaseExpiringNotice), datetime(*ends_ms, lang))
            }
            (Subject::LeaseIdle { lease, minutes }, Lang::En) => format!("lease-{lease}: its cards have been idle for {minutes} min while it is paid for"),
            (Subject::LeaseIdle { lease, minutes }, Lang::Zh) => format!("租用 lease-{lease} 的GPU已空闲 {minutes} 分钟（计费中）"),
            (Subject::JobEnded { job, name, failed: false, .. }, _) => format!("job-{job} ({name}): {}", t(Msg::JobSucceededNotice)),
            (Subject::JobEnded { job, name, failed: true, reason }, _) => format!("job-{job} ({name}): {} ({reason})", t(Msg::JobFailedNotice)),
            (Subject::BalanceLow { available_minor }, _) => format!("{}: {}", t(Msg::BalanceLowNotice), crate::i18n::money("CNY", *available_minor, lang)),
            (Subject::Operations { name, summary }, _) if summary.is_empty() => name.clone(),
            (Subject::Operations { name, summary }, _) => format!("{name}: {summary}"),
        }
    }
}

fn problem(health: v1::CardHealth) -> Option<Msg> {
    match health {
        v1::CardHealth::Lost => Some(Msg::ProblemLost),
        v1::CardHealth::Overheating => Some(Msg::ProblemOverheat),
        v1::CardHealth::XidError => Some(Msg::ProblemXid),
        _ => None,
    }
}

/// What operators tune (`[portal.alerts]`).
#[derive(Clone, Copy, Debug, serde::Deserialize)]
#[serde(default)]
pub struct AlertSettings {
    /// A paid lease whose cards all showed 0 % utilization this long is reported idle.
    pub idle_lease_seconds: u64,
    /// How often leases are checked for expiry and idleness.
    pub check_seconds: u64,
    /// A researcher's available balance below this (CNY fen) is reported, once, until a
    /// deposit or refund lifts it again.
    pub balance_low_minor: i64,
}

impl Default for AlertSettings {
    fn default() -> Self {
        AlertSettings { idle_lease_seconds: 3600, check_seconds: 60, balance_low_minor: 10_000 }
    }
}

/// Follows the broker's events forever (reconnecting), and checks leases periodically.
pub fn spawn(state: AppState, settings: AlertSettings) {
    let follower = state.clone();
    tokio::spawn(async move {
        let mut backoff = Duration::from_millis(200);
        loop {
            match follow(&follower, settings).await {
                Ok(()) => backoff = Duration::from_millis(200),
                Err(e) => {
                    tracing::warn!("alert engine: {e}; reconnecting in {backoff:?}");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(5));
                }
            }
        }
    });
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_secs(settings.check_seconds.max(1)));
        loop {
            tick.tick().await;
            if let Err(e) = check_leases(&state, settings).await {
                tracing::warn!("lease checks: {e}");
            }
        }
    });
}

async fn cursor(state: &AppState) -> ApiResult<(u64, i64)> {
    let row = sqlx::query("SELECT last_index, since_ms FROM event_cursor WHERE name = $1").bind(CURSOR).fetch_optional(&state.db.pool).await?;
    match row {
        Some(r) => Ok((r.try_get::<i64, _>("last_index")? as u64, r.try_get("since_ms")?)),
        None => {
            // First start: what happened before the portal alerted anyone is history, not news.
            let since = now_ms();
            sqlx::query("INSERT INTO event_cursor (name, last_index, since_ms) VALUES ($1, 0, $2)").bind(CURSOR).bind(since).execute(&state.db.pool).await?;
            Ok((0, since))
        }
    }
}

async fn follow(state: &AppState, settings: AlertSettings) -> ApiResult<()> {
    let (after, since) = cursor(state).await?;
    let mut stream = state.market.platform()?.watch(v1::WatchRequest { after_index: after, resync: false }).await?.into_inner();
    while let Some(message) = stream.next().await {
        match message?.kind {
            Some(v1::watch_response::Kind::Resync(r)) if !r.more => {
                // Events in between were compacted away: conditions that changed meanwhile are
                // missed; start again from here.
                tracing::warn!(index = r.index, "alert engine resynced: events before it were compacted");
                apply(state, r.index, Vec::new()).await?;
            }
            Some(v1::watch_response::Kind::Batch(b)) => {
                let decisions = if b.at_ms >= since { decide(state, &b, settings).await? } else { Vec::new() };
                apply(state, b.index, decisions).await?;
            }
            // The earlier parts of a resync: its last part carries the index to start from.
            Some(v1::watch_response::Kind::Resync(_)) | None => {}
        }
    }
    Ok(())
}

/// Reads what the events need from the broker and decides; writes nothing.
async fn decide(state: &AppState, b: &v1::EventBatch, settings: AlertSettings) -> ApiResult<Vec<Decision>> {
    use v1::event::Kind;
    let mut out = Vec::new();
    // One balance look-up per researcher per batch, however many entries moved it.
    let mut balances_seen = BTreeSet::new();
    for e in &b.events {
        match &e.kind {
            Some(Kind::CardHealthChanged(c)) => {
                let to = v1::CardHealth::try_from(c.to).unwrap_or(v1::CardHealth::Unspecified);
                let from = v1::CardHealth::try_from(c.from).unwrap_or(v1::CardHealth::Unspecified);
                let Some((node, card)) = card_of(state, c.card_id).await? else { continue };
                let host = node.inventory.as_ref().map(|i| i.hostname.clone()).unwrap_or_default();
                let index = card.spec.as_ref().map_or(0, |s| s.index);
                let mut accounts = BTreeSet::from([node.supplier_id]);
                if card.lease_id != 0 {
                    if let Ok(l) = state.market.platform()?.get_lease(v1::GetLeaseRequest { lease_id: card.lease_id }).await {
                        accounts.insert(l.into_inner().researcher_id);
                    }
                }
                if to == v1::CardHealth::AgentSilent {
                    out.push(Decision::Open { key: format!("node:{}", node.node_id), kind: "node_offline", subject: Subject::NodeSilent { host }, accounts });
                } else if let Some(problem) = problem(to) {
                    out.push(Decision::Open {
                        key: format!("card:{}", c.card_id),
                        kind: "card_health",
                        subject: Subject::Card { host, index, problem },
                        accounts,
                    });
                } else if to == v1::CardHealth::Healthy {
                    let key = if from == v1::CardHealth::AgentSilent { format!("node:{}", node.node_id) } else { format!("card:{}", c.card_id) };
                    out.push(Decision::Resolve { key });
                }
            }
            Some(Kind::LeaseStateChanged(l)) if l.to == v1::LeaseState::Requested as i32 => {
                let lease = state.market.platform()?.get_lease(v1::GetLeaseRequest { lease_id: l.lease_id }).await?.into_inner();
                if lease.class != v1::ClusterClass::A as i32 {
                    continue; // Class B is provisioned by the agent: nothing for the supplier to do
                }
                let cpc = state.market.cached(lease.cluster_id).map(|e| e.cluster.cpc_id.clone()).unwrap_or_default();
                out.push(Decision::Notice {
                    key: format!("lease-requested:{}", l.lease_id),
                    kind: "lease_requested",
                    subject: Subject::LeaseRequested { lease: l.lease_id, cpc },
                    accounts: BTreeSet::from([lease.supplier_id]),
                });
            }
            Some(Kind::JobStateChanged(j)) if j.to == "succeeded" || j.to == "failed" => {
                let name = match state.market.jobs_platform()?.get_job(v1::GetJobRequest { job_id: j.job_id }).await {
                    Ok(job) => job.into_inner().name,
                    Err(_) => String::new(),
                };
                let failed = j.to == "failed";
                out.push(Decision::Notice {
                    key: format!("job-ended:{}", j.job_id),
                    kind: if failed { "job_failed" } else { "job_finished" },
                    subject: Subject::JobEnded { job: j.job_id, name, failed, reason: j.reason.as_ref().map(|r| r.kind.clone()).unwrap_or_default() },
                    accounts: BTreeSet::from([j.owner_id]),
                });
            }
            Some(Kind::LedgerPosted(t)) if t.account_id != 0 && balances_seen.insert(t.account_id) => {
                let balance =
                    state.market.platform()?.get_balance(v1::GetBalanceRequest { account_id: t.account_id, currency: String::new() }).await?.into_inner();
                let key = format!("balance:{}", t.account_id);
                out.push(if balance.available_minor < settings.balance_low_minor {
                    Decision::Open {
                        key,
                        kind: "balance_low",
                        subject: Subject::BalanceLow { available_minor: balance.available_minor },
                        accounts: BTreeSet::from([t.account_id]),
                    }
                } else {
                    Decision::Resolve { key }
                });
            }
            _ => {}
        }
    }
    Ok(out)
}

async fn card_of(state: &AppState, card_id: u64) -> ApiResult<Option<(v1::Node, v1::Card)>> {
    let all = suanli_proto::client::all_nodes(&state.market.platform()?, false).await?;
    let Some(card) = all.cards.into_iter().find(|c| c.card_id == card_id) else { return Ok(None) };
    Ok(all.nodes.into_iter().find(|n| n.node_id == card.node_id).map(|n| (n, card)))
}

async fn check_leases(state: &AppState, settings: AlertSettings) -> ApiResult<()> {
    let leases = suanli_proto::client::all_leases(&state.market.platform()?, true).await?;
    let now = now_ms();
    let mut decisions = Vec::new();
    for l in leases.iter().filter(|l| l.state == v1::LeaseState::Active as i32 && l.paid_until_ms > now) {
        let left = l.paid_until_ms - now;
        let term = l.paid_until_ms - l.activated_at_ms;
        // A warning a whole term long says nothing: an hourly lease is not "ending within 24 h".
        for (window, name) in [(3_600_000, "1h"), (86_400_000, "24h")] {
            if left <= window && term > window {
                // Its owner is told of the demos and terminals that stop with it, too.
                let services = crate::services::running_on_lease(state, l.lease_id).await?;
                decisions.push(Decision::Notice {
                    key: format!("lease-expiring-{name}:{}", l.lease_id),
                    kind: "lease_expiring",
                    subject: Subject::LeaseExpiring { lease: l.lease_id, ends_ms: l.paid_until_ms, services },
                    accounts: BTreeSet::from([l.researcher_id]),
                });
                break;
            }
        }
        let idle_ms = settings.idle_lease_seconds as i64 * 1000;
        if now - l.activated_at_ms >= idle_ms {
            if let Some(idle) = lease_idle(state, l, now - idle_ms, settings.idle_lease_seconds).await? {
                let key = format!("idle:{}", l.lease_id);
                decisions.push(if idle {
                    Decision::Open {
                        key,
                        kind: "lease_idle",
                        subject: Subject::LeaseIdle { lease: l.lease_id, minutes: settings.idle_lease_seconds.div_ceil(60) },
                        accounts: BTreeSet::from([l.researcher_id]),
                    }
                } else {
                    Decision::Resolve { key }
                });
            }
        }
    }
    write(state, None, decisions).await
}

/// Whether every card of the lease showed 0 % utilization since `from_ms`; `None` when no
/// sample says either way (a silent agent is its own alert).
async fn lease_idle(state: &AppState, l: &v1::Lease, from_ms: i64, seconds: u64) -> ApiResult<Option<bool>> {
    let mut samples = 0u64;
    let mut utilization = 0u64;
    for card in &l.card_ids {
        let reply = state
            .market
            .monitoring()?
            .query_telemetry(v1::QueryTelemetryRequest {
                scope: Some(v1::query_telemetry_request::Scope::CardId(*card)),
                from_ms,
                to_ms: 0,
                step_seconds: seconds.clamp(1, 3600) as u32,
            })
            .await?
            .into_inner();
        for p in reply.cards.iter().flat_map(|c| &c.points) {
            samples += u64::from(p.samples);
            utilization += p.sum_gpu_utilization_pct;
        }
    }
    Ok((samples > 0).then_some(utilization == 0))
}

async fn apply(state: &AppState, index: u64, decisions: Vec<Decision>) -> ApiResult<()> {
    write(state, Some(index), decisions).await
}

struct Person {
    user: i64,
    lang: Lang,
    email: String,
    phone: Option<String>,
    email_on: bool,
    sms_on: bool,
    webhook: Option<String>,
    quiet: Option<(i64, i64)>,
}

/// The active user behind a recipient, with how they want to hear.
async fn person_of<'e, E>(state: &AppState, tx: E, recipient: Recipient) -> ApiResult<Option<Person>>
where
    E: sqlx::Executor<'e, Database = sqlx::Any>,
{
    let (column, id) = match recipient {
        Recipient::Account(account) => ("u.broker_account_id", account as i64),
        Recipient::User(user) => ("u.id", user),
    };
    let row = sqlx::query(&format!(
        "SELECT u.id, u.lang, u.email_enc, u.phone_enc, p.email_on, p.sms_on, p.webhook_enc, p.quiet_start_min, p.quiet_end_min
         FROM users u LEFT JOIN notify_prefs p ON p.user_id = u.id WHERE {column} = $1 AND u.state = 'active'"
    ))
    .bind(id)
    .fetch_optional(tx)
    .await?;
    let Some(r) = row else { return Ok(None) };
    let open = |v: Option<String>| v.map(|s| state.keys.open(&s)).transpose();
    Ok(Some(Person {
        user: r.try_get("id")?,
        lang: Lang::parse(&r.try_get::<String, _>("lang")?).unwrap_or_default(),
        email: state.keys.open(&r.try_get::<String, _>("email_enc")?)?,
        phone: open(opt_str(&r, "phone_enc")?)?,
        email_on: opt_i64(&r, "email_on")?.is_none_or(|v| v == 1),
        sms_on: opt_i64(&r, "sms_on")?.is_none_or(|v| v == 1),
        webhook: open(opt_str(&r, "webhook_enc")?)?,
        quiet: opt_i64(&r, "quiet_start_min")?.zip(opt_i64(&r, "quiet_end_min")?),
    }))
}

/// When a message may go out in quiet hours `(start, end)`, minutes of the day in UTC+8.
pub fn after_quiet_hours(now_ms: i64, quiet: (i64, i64)) -> i64 {
    const OFFSET_MS: i64 = 8 * 3_600_000;
    let day = 86_400_000;
    let local = (now_ms + OFFSET_MS).rem_euclid(day);
    let minute = local / 60_000;
    let (start, end) = quiet;
    let inside = if start <= end { minute >= start && minute < end } else { minute >= start || minute < end };
    if !inside {
        return now_ms;
    }
    let wait_min = (end - minute).rem_euclid(24 * 60);
    now_ms - (local % 60_000) + wait_min * 60_000
}

/// An alert's message as planned: its words in both languages, for whom.
struct Planned {
    alert: i64,
    en: String,
    zh: String,
    recipients: BTreeSet<Recipient>,
    prefix: Msg,
    resolving: bool,
}

/// The active operators who watch the platform.
async fn operators(tx: &mut sqlx::Transaction<'_, sqlx::Any>) -> ApiResult<BTreeSet<Recipient>> {
    let rows = sqlx::query("SELECT DISTINCT u.id FROM users u JOIN roles r ON r.user_id = u.id WHERE u.kind = $1 AND u.state = $2 AND r.role IN ($3, $4, $5)")
        .bind(UserKind::Operator.as_str())
        .bind(AccountState::Active.as_str())
        .bind(OPERATIONS_ROLES[0].as_str())
        .bind(OPERATIONS_ROLES[1].as_str())
        .bind(OPERATIONS_ROLES[2].as_str())
        .fetch_all(&mut **tx)
        .await?;
    Ok(rows.iter().map(|r| r.try_get("id").map(Recipient::User)).collect::<Result<_, _>>()?)
}

/// Records alerts that did not come from the broker's events (the platform's own monitoring),
/// with their messages, in one transaction.
pub async fn record(state: &AppState, decisions: Vec<Decision>) -> ApiResult<()> {
    write(state, None, decisions).await
}

/// Records the alerts, their recipients and every message, and moves the cursor, in one
/// transaction.
async fn write(state: &AppState, index: Option<u64>, decisions: Vec<Decision>) -> ApiResult<()> {
    let mut tx = state.db.pool.begin().await?;
    let now = now_ms();
    let mut queued = false;
    for d in decisions {
        let accounts = |accounts: BTreeSet<u64>| accounts.into_iter().map(Recipient::Account).collect::<BTreeSet<_>>();
        let opening = match d {
            Decision::Open { key, kind, subject, accounts: to } => Ok((key, kind, subject, accounts(to), false)),
            Decision::Notice { key, kind, subject, accounts: to } => Ok((key, kind, subject, accounts(to), true)),
            Decision::ForOperators { key, subject } => Ok((key, "operations", subject, operators(&mut tx).await?, false)),
            Decision::Resolve { key } => Err(key),
        };
        let planned = match opening {
            Ok((key, kind, subject, recipients, notice)) => {
                let existing = sqlx::query(if notice {
                    "SELECT id FROM alerts WHERE condition_key = $1"
                } else {
                    "SELECT id FROM alerts WHERE condition_key = $1 AND state = 'open'"
                })
                .bind(&key)
                .fetch_optional(&mut *tx)
                .await?;
                if existing.is_some() {
                    continue; // one open alert per condition; one notice per key
                }
                let (en, zh) = (subject.render(Lang::En), subject.render(Lang::Zh));
                let id = new_id();
                sqlx::query("INSERT INTO alerts (id, condition_key, kind, subject, state, opened_ms, detail) VALUES ($1, $2, $3, $4, $5, $6, $7)")
                    .bind(id)
                    .bind(&key)
                    .bind(kind)
                    .bind(&en)
                    .bind(if notice { "notice" } else { "open" })
                    .bind(now)
                    .bind(&zh)
                    .execute(&mut *tx)
                    .await?;
                Planned { alert: id, en, zh, recipients, prefix: if notice { Msg::NoticePrefix } else { Msg::AlertPrefix }, resolving: false }
            }
            Err(key) => {
                let row = sqlx::query("SELECT id, subject, detail FROM alerts WHERE condition_key = $1 AND state = 'open'")
                    .bind(&key)
                    .fetch_optional(&mut *tx)
                    .await?;
                let Some(row) = row else { continue };
                let id: i64 = row.try_get("id")?;
                sqlx::query("UPDATE alerts SET state = 'resolved', resolved_ms = $1 WHERE id = $2").bind(now).bind(id).execute(&mut *tx).await?;
                let recipients = sqlx::query("SELECT user_id FROM alert_recipients WHERE alert_id = $1")
                    .bind(id)
                    .fetch_all(&mut *tx)
                    .await?
                    .iter()
                    .map(|r| r.try_get("user_id").map(Recipient::User))
                    .collect::<Result<_, _>>()?;
                Planned { alert: id, en: row.try_get("subject")?, zh: row.try_get("detail")?, recipients, prefix: Msg::ResolvedPrefix, resolving: true }
            }
        };
        for recipient in &planned.recipients {
            let Some(p) = person_of(state, &mut *tx, *recipient).await? else { continue };
            if !planned.resolving {
                sqlx::query("INSERT INTO alert_recipients (alert_id, user_id) VALUES ($1, $2)").bind(planned.alert).bind(p.user).execute(&mut *tx).await?;
            }
            let words = if p.lang == Lang::Zh { &planned.zh } else { &planned.en };
            let title = format!("{}: {words}", planned.prefix.text(p.lang));
            let recent: i64 = sqlx::query("SELECT COUNT(*) AS n FROM outbox WHERE user_id = $1 AND created_ms > $2")
                .bind(p.user)
                .bind(now - 3_600_000)
                .fetch_one(&mut *tx)
                .await?
                .try_get("n")?;
            let limited = (recent >= PER_HOUR_LIMIT).then_some(now + 3_600_000);
            // Quiet hours hold back what buzzes (SMS, webhooks), not the mail.
            let quiet = p.quiet.map(|q| after_quiet_hours(now, q)).filter(|t| *t > now).max(limited);
            let text = format!("{title}\n\n{}/alerts\n", state.settings.public_url);
            let mut plan: Vec<(Channel, String, String, Option<i64>)> = Vec::new();
            if p.email_on {
                plan.push((Channel::Email, p.email.clone(), text.clone(), limited));
            }
            if let (true, Some(phone), true) = (p.sms_on, &p.phone, state.notifiers.sms.is_some()) {
                plan.push((Channel::Sms, phone.clone(), title.clone(), quiet));
            }
            if let Some(hook) = &p.webhook {
                let event =
                    serde_json::json!({"alert_id": planned.alert.to_string(), "state": if planned.resolving { "resolved" } else { "open" }, "title": title});
                plan.push((Channel::Webhook, hook.clone(), event.to_string(), quiet));
            }
            for (channel, recipient, body, not_before_ms) in plan {
                let m = Outgoing {
                    channel,
                    recipient: &recipient,
                    subject: &title,
                    body: &body,
                    user_id: Some(p.user),
                    alert_id: Some(planned.alert),
                    not_before_ms,
                };
                outbox::queue(state, &mut *tx, &m).await?;
                queued = true;
            }
        }
    }
    if let Some(index) = index {
        sqlx::query("UPDATE event_cursor SET last_index = $1 WHERE name = $2").bind(index as i64).bind(CURSOR).execute(&mut *tx).await?;
    }
    tx.commit().await?;
    if queued {
        state.outbox_wake.notify_one();
    }
    Ok(())
}

#[derive(serde::Serialize, utoipa::ToSchema)]
pub struct DeliveryView {
    /// email, sms or webhook
    pub channel: String,
    /// pending, sent or failed
    pub state: String,
    pub attempts: i64,
    pub sent_ms: Option<i64>,
    pub last_error: Option<String>,
}

#[derive(serde::Serialize, utoipa::ToSchema)]
pub struct AlertView {
    pub alert_id: String,
    pub kind: String,
    pub subject: String,
    /// open, resolved or notice
    pub state: String,
    pub opened_ms: i64,
    pub resolved_ms: Option<i64>,
    pub deliveries: Vec<DeliveryView>,
}

/// A user's alert history with what became of each message.
pub async fn alerts_of(state: &AppState, user: i64) -> ApiResult<Vec<AlertView>> {
    let rows = sqlx::query(
        "SELECT a.id, a.kind, a.subject, a.state, a.opened_ms, a.resolved_ms FROM alerts a JOIN alert_recipients r ON r.alert_id = a.id
         WHERE r.user_id = $1 ORDER BY a.opened_ms DESC LIMIT 200",
    )
    .bind(user)
    .fetch_all(&state.db.pool)
    .await?;
    let mut out = Vec::new();
    for r in rows {
        let id: i64 = r.try_get("id")?;
        let deliveries =
            sqlx::query("SELECT channel, state, attempts, sent_ms, last_error FROM outbox WHERE alert_id = $1 AND user_id = $2 ORDER BY created_ms")
                .bind(id)
                .bind(user)
                .fetch_all(&state.db.pool)
                .await?
                .iter()
                .map(|d| {
                    Ok(DeliveryView {
                        channel: d.try_get("channel")?,
                        state: d.try_get("state")?,
                        attempts: d.try_get("attempts")?,
                        sent_ms: opt_i64(d, "sent_ms")?,
                        last_error: opt_str(d, "last_error")?,
                    })
                })
                .collect::<Result<Vec<_>, sqlx::Error>>()?;
        out.push(AlertView {
            alert_id: id.to_string(),
            kind: r.try_get("kind")?,
            subject: r.try_get("subject")?,
            state: r.try_get("state")?,
            opened_ms: r.try_get("opened_ms")?,
            resolved_ms: opt_i64(&r, "resolved_ms")?,
            deliveries,
        });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_lease_ending_names_the_services_that_stop_with_it() {
        let bare = Subject::LeaseExpiring { lease: 7, ends_ms: 0, services: 0 };
        let with = Subject::LeaseExpiring { lease: 7, ends_ms: 0, services: 2 };
        assert!(!bare.render(Lang::En).contains("service"));
        assert!(with.render(Lang::En).contains("its 2 service(s) on leased cards stop with it"), "{}", with.render(Lang::En));
        assert!(with.render(Lang::Zh).contains("2 个服务将随之停止"));
    }

    #[test]
    fn quiet_hours_in_china_standard_time() {
        // 2026-12-01 14:00 UTC is 22:00 in Beijing.
        let t = 1_796_133_600_000;
        assert_eq!(after_quiet_hours(t, (9 * 60, 17 * 60)), t, "outside 09:00–17:00");
        assert_eq!(after_quiet_hours(t, (21 * 60, 8 * 60)), t + 10 * 3_600_000, "22:00 inside 21:00–08:00 waits until 08:00");
        assert_eq!(after_quiet_hours(t, (22 * 60, 23 * 60)), t + 3_600_000);
    }
}

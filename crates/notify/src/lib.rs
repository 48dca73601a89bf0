//! Outgoing notifications: email over SMTP (lettre), SMS through an HTTP gateway (`sms`), signed
//! webhooks (`webhook`). The caller owns durability: it records
//! a message before handing it here, and gives every message a stable ID so a retry after a crash
//! between "sent" and "marked sent" reaches the recipient as the same message (same Message-ID).

use std::time::Duration;

pub mod sms;
pub mod webhook;

use lettre::message::header::ContentType;
use lettre::message::{Mailbox, MultiPart, SinglePart};
use lettre::transport::smtp::authentication::Credentials;
use lettre::transport::smtp::client::{Tls, TlsParameters};
use lettre::{AsyncSmtpTransport, AsyncTransport, Message, Tokio1Executor};
use serde::Deserialize;

/// How the SMTP connection is protected.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SmtpSecurity {
    /// Plain SMTP: only for a relay on loopback (the embedded default and the tests).
    #[default]
    None,
    /// Plain connection upgraded with STARTTLS, which must succeed.
    StartTls,
    /// TLS from the first byte (SMTPS, usually port 465).
    Tls,
}

impl std::str::FromStr for SmtpSecurity {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "none" => Ok(SmtpSecurity::None),
            "starttls" => Ok(SmtpSecurity::StartTls),
            "tls" => Ok(SmtpSecurity::Tls),
            other => Err(format!("smtp security must be none, starttls or tls, not {other:?}")),
        }
    }
}

#[derive(Clone, Debug, Deserialize)]
pub struct SmtpConfig {
    pub host: String,
    pub port: u16,
    #[serde(default)]
    pub security: SmtpSecurity,
    #[serde(default)]
    pub username: Option<String>,
    #[serde(default)]
    pub password: Option<String>,
    /// The sender, e.g. `Suanli <noreply@suanli.example>`.
    pub from: String,
}

/// One email. `id` is the caller's durable identifier; the Message-ID header is derived from it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Email {
    pub id: String,
    pub to: String,
    pub subject: String,
    pub text: String,
    pub html: Option<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum NotifyError {
    #[error("invalid address {0:?}: {1}")]
    Address(String, String),
    #[error("invalid message: {0}")]
    Message(String),
    #[error("SMTP configuration: {0}")]
    Config(String),
    /// The server refused or the connection failed; worth retrying later unless `permanent`.
    #[error("SMTP delivery failed: {message}")]
    Delivery { message: String, permanent: bool },
}

impl NotifyError {
    /// Whether a retry can succeed (a full mailbox can; a malformed address cannot).
    pub fn is_retryable(&self) -> bool {
        matches!(self, NotifyError::Delivery { permanent: false, .. })
    }
}

/// Sends email through one SMTP relay; cheap to clone (connections are pooled). Create and drop
/// it inside a Tokio runtime: the pool's housekeeping runs as a task.
#[derive(Clone)]
pub struct Mailer {
    transport: AsyncSmtpTransport<Tokio1Executor>,
    from: Mailbox,
    domain: String,
}

impl Mailer {
    pub fn new(config: &SmtpConfig) -> Result<Mailer, NotifyError> {
        let from: Mailbox = config.from.parse().map_err(|e: lettre::address::AddressError| NotifyError::Address(config.from.clone(), e.to_string()))?;
        let domain = from.email.domain().to_owned();
        let tls = |host: &str| TlsParameters::new(host.to_owned()).map_err(|e| NotifyError::Config(e.to_string()));
        let mut builder = AsyncSmtpTransport::<Tokio1Executor>::builder_dangerous(&config.host).port(config.port).timeout(Some(Duration::from_secs(30)));
        builder = match config.security {
            SmtpSecurity::None => builder.tls(Tls::None),
            SmtpSecurity::StartTls => builder.tls(Tls::Required(tls(&config.host)?)),
            SmtpSecurity::Tls => builder.tls(Tls::Wrapper(tls(&config.host)?)),
        };
        if let (Some(user), Some(password)) = (&config.username, &config.password) {
            builder = builder.credentials(Credentials::new(user.clone(), password.clone()));
        }
        Ok(Mailer { transport: builder.build(), from, domain })
    }

    /// The Message-ID this mailer gives the email with `id`: the same on every attempt.
    pub fn message_id(&self, id: &str) -> String {
        format!("<{id}@{}>", self.domain)
    }

    pub fn build(&self, email: &Email) -> Result<Message, NotifyError> {
        let to: Mailbox = email.to.parse().map_err(|e: lettre::address::AddressError| NotifyError::Address(email.to.clone(), e.to_string()))?;
        let builder = Message::builder().from(self.from.clone()).to(to).subject(email.subject.clone()).message_id(Some(self.message_id(&email.id)));
        let text = SinglePart::builder().header(ContentType::TEXT_PLAIN).body(email.text.clone());
        let message = match &email.html {
            None => builder.singlepart(text),
            Some(html) => {
                builder.multipart(MultiPart::alternative().singlepart(text).singlepart(SinglePart::builder().header(ContentType::TEXT_HTML).body(html.clone())))
            }
        };
        message.map_err(|e| NotifyError::Message(e.to_string()))
    }

    pub async fn send(&self, email: &Email) -> Result<(), NotifyError> {
        let message = self.build(email)?;
        match self.transport.send(message).await {
            Ok(_) => {
                tracing::debug!(id = %email.id, "email delivered to the relay");
                Ok(())
            }
            // lettre's errors say their cause in their own message.
            Err(e) => Err(NotifyError::Delivery { permanent: e.is_permanent(), message: e.to_string() }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mailer() -> Mailer {
        Mailer::new(&SmtpConfig {
            host: "127.0.0.1".into(),
            port: 25,
            security: SmtpSecurity::None,
            username: None,
            password: None,
            from: "Suanli <noreply@suanli.test>".into(),
        })
        .expect("mailer")
    }

    #[tokio::test]
    async fn message_id_is_stable_per_id() {
        let m = mailer();
        let email = Email { id: "outbox-7".into(), to: "a@b.test".into(), subject: "s".into(), text: "t".into(), html: None };
        let first = String::from_utf8(m.build(&email).expect("build").formatted()).expect("utf8");
        let second = String::from_utf8(m.build(&email).expect("build").formatted()).expect("utf8");
        assert!(first.contains("Message-ID: <outbox-7@suanli.test>"), "{first}");
        assert!(second.contains("Message-ID: <outbox-7@suanli.test>"));
    }

    #[tokio::test]
    async fn bad_recipient_is_a_clear_error_not_a_retry() {
        let m = mailer();
        let email = Email { id: "x".into(), to: "not an address".into(), subject: "s".into(), text: "t".into(), html: None };
        let err = m.build(&email).expect_err("must fail");
        assert!(matches!(err, NotifyError::Address(..)));
        assert!(!err.is_retryable());
    }

    #[tokio::test]
    async fn non_ascii_subjects_are_encoded() {
        let m = mailer();
        let email =
            Email { id: "zh".into(), to: "a@b.test".into(), subject: "激活您的账户".into(), text: "你好".into(), html: Some("<p>你好</p>".into()) };
        let raw = String::from_utf8(m.build(&email).expect("build").formatted()).expect("utf8");
        assert!(raw.contains("Subject: =?utf-8?"), "{raw}");
        assert!(raw.contains("multipart/alternative"));
    }
}

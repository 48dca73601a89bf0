//! What every Suanli service does the same way so that operators can follow one request across
//! them: logs as text (people) or JSON lines (log pipelines: `SUANLI_LOG_FORMAT=json`), and a
//! **request ID** — made by the portal for each HTTP request (or taken from the caller's
//! `x-request-id`), kept for the request's task ([`scope`], [`current`]), sent to the broker in
//! the gRPC call's `x-request-id` metadata (`suanli_proto::client::Bearer`), and carried by
//! the broker's span for the call, forwarded to the leader with the call. In JSON each line
//! carries its spans' fields, the request ID among them.

use std::future::Future;

/// The HTTP header and gRPC metadata key that carries a request ID.
pub const REQUEST_ID_HEADER: &str = "x-request-id";

tokio::task_local! {
    static REQUEST_ID: RequestId;
}

/// A request ID: 1 to 64 characters of `[A-Za-z0-9._-]`, so it is safe in headers and logs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RequestId(String);

impl RequestId {
    /// A new random ID (16 hex digits).
    pub fn new() -> RequestId {
        RequestId(format!("{:016x}", rand::random::<u64>()))
    }

    /// The caller's ID if it is one; `None` for anything else (which gets a new one).
    pub fn parse(text: &str) -> Option<RequestId> {
        let ok = !text.is_empty() && text.len() <= 64 && text.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
        ok.then(|| RequestId(text.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl Default for RequestId {
    fn default() -> Self {
        RequestId::new()
    }
}

impl std::fmt::Display for RequestId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// Runs `f` with `id` as the current request's ID.
pub async fn scope<F: Future>(id: RequestId, f: F) -> F::Output {
    REQUEST_ID.scope(id, f).await
}

/// The ID of the request this task works for, if any.
pub fn current() -> Option<RequestId> {
    REQUEST_ID.try_with(RequestId::clone).ok()
}

/// How log lines are written.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LogFormat {
    Text,
    /// One JSON object per line, with the fields of every span it was logged in.
    Json,
}

impl LogFormat {
    /// `SUANLI_LOG_FORMAT`: `json`, or text (anything else, or unset).
    pub fn from_env() -> LogFormat {
        match std::env::var("SUANLI_LOG_FORMAT").as_deref() {
            Ok("json") => LogFormat::Json,
            _ => LogFormat::Text,
        }
    }
}

/// Where log lines go.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LogTo {
    Stdout,
    Stderr,
}

/// Installs the process's logger: `filter` (`info`, `suanli_broker=debug,openraft=warn`, …;
/// an unreadable one means `info`), in the format `SUANLI_LOG_FORMAT` asks for. A second call
/// changes nothing.
pub fn init_logging(filter: &str, to: LogTo) {
    let filter = tracing_subscriber::EnvFilter::try_new(filter).unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_target(false);
    let result = match (LogFormat::from_env(), to) {
        (LogFormat::Json, LogTo::Stdout) => builder.json().with_current_span(false).with_span_list(true).try_init(),
        (LogFormat::Json, LogTo::Stderr) => builder.json().with_current_span(false).with_span_list(true).with_writer(std::io::stderr).try_init(),
        (LogFormat::Text, LogTo::Stdout) => builder.try_init(),
        (LogFormat::Text, LogTo::Stderr) => builder.with_writer(std::io::stderr).try_init(),
    };
    drop(result);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_safe_ids_are_taken_from_callers() {
        assert_eq!(RequestId::parse("req-7f3a.b_2").map(|r| r.0), Some("req-7f3a.b_2".into()));
        for bad in ["", "a b", "x\r\nSet-Cookie: y", "é", &"a".repeat(65)] {
            assert!(RequestId::parse(bad).is_none(), "{bad:?}");
        }
        assert_eq!(RequestId::new().as_str().len(), 16);
    }

    #[tokio::test]
    async fn the_id_belongs_to_the_task_that_works_for_the_request() {
        assert_eq!(current(), None);
        let id = RequestId::parse("abc").expect("id");
        let seen = scope(id.clone(), async { current() }).await;
        assert_eq!(seen, Some(id));
        assert_eq!(current(), None);
    }
}

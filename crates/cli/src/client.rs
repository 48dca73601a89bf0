//! The portal's REST API with an API token. Every call the CLI makes is one of the portal's
//! documented operations (`/api/v1/openapi.json`); errors come back as the portal sent them
//! (`{"error": {"code", "message", "fields"}}`).

use std::fmt;

use serde::de::DeserializeOwned;
use serde::Deserialize;

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("the portal at {0}: {1}")]
    Transport(String, #[source] reqwest::Error),
    #[error("{0}")]
    Refused(Refusal),
    #[error("the portal answered {status} with something that is not its JSON: {body}")]
    Unreadable { status: u16, body: String },
    #[error("{path}: {source}")]
    File { path: String, source: std::io::Error },
    #[error("{path} arrived as {actual}, not {expected} as recorded: not kept")]
    ChecksumMismatch { path: String, expected: String, actual: String },
}

/// What the portal said when it refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    pub status: u16,
    pub code: String,
    pub message: String,
    pub fields: Vec<(String, String)>,
}

impl fmt::Display for Refusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.code, self.message)?;
        // The portal's message often names the problems already; the rest, one per line.
        for (field, problem) in self.fields.iter().filter(|(field, problem)| !self.message.contains(&format!("{field}: {problem}"))) {
            write!(f, "\n  {field}: {problem}")?;
        }
        Ok(())
    }
}

#[derive(Deserialize)]
struct ErrorBody {
    error: ErrorDetail,
}

#[derive(Deserialize)]
struct ErrorDetail {
    code: String,
    #[serde(default)]
    message: String,
    #[serde(default)]
    fields: Vec<FieldProblem>,
}

#[derive(Deserialize)]
struct FieldProblem {
    field: String,
    problem: String,
}

/// The header with which the portal names the SHA-256 of the bytes it sends (a model's file).
pub const SHA256_HEADER: &str = "x-suanli-sha256";

/// `text` as one segment of a URL's path: a name of the user's (a model, a username) cannot
/// reach another route. (`.` and `..` alone stay dot segments, as in any URL; the portal takes
/// no such names, and the request still goes to the same portal only.)
pub fn segment(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for byte in text.bytes() {
        if byte.is_ascii_alphanumeric() || matches!(byte, b'-' | b'.' | b'_' | b'~') {
            out.push(char::from(byte));
        } else {
            out.push_str(&format!("%{byte:02X}"));
        }
    }
    out
}

pub struct Portal {
    base: String,
    token: String,
    http: reqwest::Client,
}

impl Portal {
    pub fn new(base: &str, token: &str) -> Portal {
        // No proxy (it would see a loopback portal's token in the clear) and no redirects (the
        // token would follow one); a builder that cannot be made is a broken TLS setup.
        let http = reqwest::Client::builder()
            .user_agent(concat!("suanli/", env!("CARGO_PKG_VERSION")))
            .no_proxy()
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .expect("an HTTP client");
        Portal { base: base.trim_end_matches('/').to_owned(), token: token.to_owned(), http }
    }

    /// The portal's base URL, as given.
    pub fn base(&self) -> &str {
        &self.base
    }

    pub async fn get<T: DeserializeOwned>(&self, path: &str, query: &[(&str, String)]) -> Result<T, ClientError> {
        self.send(self.http.get(self.url(path)).query(query)).await
    }

    pub async fn post<T: DeserializeOwned>(&self, path: &str, body: &serde_json::Value) -> Result<T, ClientError> {
        self.send(self.http.post(self.url(path)).json(body)).await
    }

    /// `PUT` or `DELETE` and the like, answered with no body (204).
    pub async fn no_content(&self, method: reqwest::Method, path: &str) -> Result<(), ClientError> {
        let response = self.send_raw(self.request(method, path)).await?;
        if response.status().is_success() {
            return Ok(());
        }
        Err(self.refusal(response).await)
    }

    /// A request to `path` (below the portal's address) for headers of the caller's own; the
    /// token is added when it is sent ([`Portal::send`], [`Portal::send_raw`]).
    pub fn request(&self, method: reqwest::Method, path: &str) -> reqwest::RequestBuilder {
        self.http.request(method, self.url(path))
    }

    /// Sends `request` with the token and reads the portal's JSON answer, or its refusal.
    pub async fn send<T: DeserializeOwned>(&self, request: reqwest::RequestBuilder) -> Result<T, ClientError> {
        let response = self.send_raw(request).await?;
        self.answer(response).await
    }

    /// Sends `request` with the token; whatever the portal answered, for the caller to read
    /// (its headers, a stream of bytes). Only a failed connection is an error here.
    pub async fn send_raw(&self, request: reqwest::RequestBuilder) -> Result<reqwest::Response, ClientError> {
        request.bearer_auth(&self.token).send().await.map_err(|e| self.transport(e))
    }

    /// `GET path` whose bytes the caller reads as they come; a refusal is an error.
    pub async fn stream(&self, path: &str) -> Result<reqwest::Response, ClientError> {
        let response = self.send_raw(self.request(reqwest::Method::GET, path)).await?;
        if response.status().is_success() {
            return Ok(response);
        }
        Err(self.refusal(response).await)
    }

    /// What an unsuccessful answer said, as an error.
    pub async fn refusal(&self, response: reqwest::Response) -> ClientError {
        match self.answer::<serde_json::Value>(response).await {
            Err(e) => e,
            // A success is not a refusal; only a caller's mistake brings one here.
            Ok(_) => ClientError::Unreadable { status: 200, body: "a success where a refusal was expected".into() },
        }
    }

    /// A failed connection to the portal, as an error.
    pub fn transport(&self, e: reqwest::Error) -> ClientError {
        ClientError::Transport(self.base.clone(), e)
    }

    /// Streams `path`'s bytes into `dest`, which appears (by rename) only once they hash to
    /// `sha256`; returns their size. An `x-suanli-sha256` header that names other bytes is
    /// refused before any is written.
    pub async fn download(&self, path: &str, dest: &std::path::Path, sha256: &str) -> Result<u64, ClientError> {
        use sha2::Digest as _;
        use tokio::io::AsyncWriteExt;
        let file_error = |source| ClientError::File { path: dest.display().to_string(), source };
        let mut response = self.stream(path).await?;
        if let Some(announced) = response.headers().get(SHA256_HEADER).and_then(|v| v.to_str().ok()) {
            if !announced.eq_ignore_ascii_case(sha256) {
                let actual = announced.to_ascii_lowercase();
                return Err(ClientError::ChecksumMismatch { path: dest.display().to_string(), expected: sha256.to_owned(), actual });
            }
        }
        // A name of its own (never another output's, nor a file already there: create_new
        // follows no link either).
        let name = dest.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        let partial = dest.with_file_name(format!(".{name}.{}.partial", std::process::id()));
        let mut file = tokio::fs::OpenOptions::new().write(true).create_new(true).open(&partial).await.map_err(file_error)?;
        let (mut hasher, mut size) = (sha2::Sha256::new(), 0u64);
        let received = async {
            while let Some(chunk) = response.chunk().await.map_err(|e| ClientError::Transport(self.base.clone(), e))? {
                hasher.update(&chunk);
                size += chunk.len() as u64;
                file.write_all(&chunk).await.map_err(file_error)?;
            }
            file.sync_all().await.map_err(file_error)?;
            let actual = hex::encode(hasher.finalize());
            if actual != sha256 {
                return Err(ClientError::ChecksumMismatch { path: dest.display().to_string(), expected: sha256.to_owned(), actual });
            }
            tokio::fs::rename(&partial, dest).await.map_err(file_error)
        }
        .await;
        if received.is_err() {
            let _ = tokio::fs::remove_file(&partial).await;
        }
        received.map(|()| size)
    }

    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    /// The portal's JSON answer, or its refusal.
    async fn answer<T: DeserializeOwned>(&self, response: reqwest::Response) -> Result<T, ClientError> {
        let status = response.status().as_u16();
        let bytes = response.bytes().await.map_err(|e| ClientError::Transport(self.base.clone(), e))?;
        if (200..300).contains(&status) {
            return serde_json::from_slice(&bytes)
                .map_err(|_| ClientError::Unreadable { status, body: String::from_utf8_lossy(&bytes).chars().take(200).collect() });
        }
        match serde_json::from_slice::<ErrorBody>(&bytes) {
            Ok(ErrorBody { error }) => Err(ClientError::Refused(Refusal {
                status,
                code: error.code,
                message: error.message,
                fields: error.fields.into_iter().map(|f| (f.field, f.problem)).collect(),
            })),
            Err(_) => Err(ClientError::Unreadable { status, body: String::from_utf8_lossy(&bytes).chars().take(200).collect() }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::segment;

    #[test]
    fn a_name_stays_one_segment_of_the_path() {
        assert_eq!(segment("digits-cls_2.v1"), "digits-cls_2.v1");
        assert_eq!(segment("../a b/c"), "..%2Fa%20b%2Fc");
        assert_eq!(segment("名"), "%E5%90%8D");
    }
}

//! The artifact store: job inputs, outputs and checkpoints, addressed by the SHA-256 of their
//! bytes, so the same dataset is stored once and every download can be verified.
//!
//! - [`store`]: the backend trait and the local-directory backend (the embedded default).
//!   A write is acknowledged only after the bytes are on disk (`fsync`, then an atomic rename
//!   into place), so an acknowledged artifact is never lost to a crash.
//! - [`server`]: HTTP with bearer authentication — `PUT /v1/artifacts[?sha256=…]` (the server
//!   hashes what arrives and refuses a mismatch with the caller's hash), `GET`/`HEAD
//!   /v1/artifacts/{sha256}` with single `Range: bytes=…` requests (206, 416).
//! - [`client`]: streams uploads and downloads, hashing both ways.
//! - [`capability`]: what one job attempt may read and write, signed by the broker; supplier
//!   nodes hold capabilities, never the store-wide service token.
//! - [`server::Collector`]: garbage collection of what jobs uploaded and no job refers to any
//!   more (superseded checkpoints, outputs of attempts that lost), after a grace period.
//!
//! - [`backup`]: backups of a store's directory into a content-addressed pool shared by every
//!   backup, with the records of who uploaded what; restores into a new store.
//! - [`bucket`]: an S3-compatible bucket (off-site copies of backups), the one place that
//!   knows S3 (`object_store`).
//!
//! - [`tls`]: the listener's TLS (a certificate from the cluster CA); the client checks it
//!   against that CA ([`ArtifactClient::with_ca`]).
//!
//! Errors on the wire are `{"error": {"code": "...", "message": "..."}}` (every Suanli HTTP
//! service's shape) with the codes of [`ErrorCode`]; the client keeps the body as text, so it
//! reads either shape (stores of the previous release answer `{"code", "message"}`).

pub mod backup;
pub mod bucket;
pub mod capability;
pub mod client;
pub mod server;
pub mod store;
pub mod tls;

pub use bucket::{Bucket, BucketConfig, BucketStore};
pub use capability::{CapabilityKey, Grant};
pub use client::{ArtifactClient, ClientError};
pub use server::{Collected, Collector};
pub use store::{Digest, Listed, LocalStore, Store, StoreError};

/// Stable error codes of the HTTP API.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ErrorCode {
    /// 401: no or wrong bearer token.
    Unauthenticated,
    /// 404: no artifact with that hash.
    NotFound,
    /// 400: the path is not a lower-case hex SHA-256.
    InvalidDigest,
    /// 422: the bytes that arrived do not hash to the `sha256` the caller named.
    ChecksumMismatch,
    /// 416: the range is not within the artifact.
    RangeNotSatisfiable,
    /// 413: larger than the store accepts.
    TooLarge,
    /// 500: the store could not read or write.
    Storage,
    /// 403: the capability does not cover this artifact or this upload.
    Forbidden,
    /// 403: the owner's artifacts already fill its quota.
    QuotaExceeded,
}

impl ErrorCode {
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::Unauthenticated => "UNAUTHENTICATED",
            ErrorCode::NotFound => "NOT_FOUND",
            ErrorCode::InvalidDigest => "INVALID_DIGEST",
            ErrorCode::ChecksumMismatch => "CHECKSUM_MISMATCH",
            ErrorCode::RangeNotSatisfiable => "RANGE_NOT_SATISFIABLE",
            ErrorCode::TooLarge => "TOO_LARGE",
            ErrorCode::Storage => "STORAGE",
            ErrorCode::Forbidden => "FORBIDDEN",
            ErrorCode::QuotaExceeded => "QUOTA_EXCEEDED",
        }
    }
}

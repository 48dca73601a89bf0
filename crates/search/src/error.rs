//! Errors of this crate: one enum for index operations, so the portal can map each case to
//! a response (a caller's mistake such as a wrong model or a bad vector is not a server
//! fault), and a small one for parsing a [`ModelVersion`](crate::ModelVersion).

use crate::model::ModelVersion;

/// Why an index operation was refused or failed.
#[derive(Debug, thiserror::Error)]
pub enum SearchError {
    /// The vector was produced by another model than the one the index holds.
    #[error("vector is from model {given}, but the index holds vectors of model {index}")]
    ModelMismatch {
        /// The index's model.
        index: ModelVersion,
        /// The model the caller named.
        given: ModelVersion,
    },
    /// The vector's length is not the index's dimension.
    #[error("vector has {given} dimensions, the index expects {expected}")]
    Dimension {
        /// The index's dimension.
        expected: u32,
        /// The given vector's length.
        given: usize,
    },
    /// The vector contains a NaN or an infinity.
    #[error("vector contains a NaN or an infinite component")]
    NotFinite,
    /// The vector's L2 norm is not 1 (within [`NORM_TOLERANCE`](crate::NORM_TOLERANCE)).
    #[error("vector is not L2-normalised (norm {norm})")]
    NotNormalised {
        /// The vector's L2 norm.
        norm: f32,
    },
    /// The key is reserved by usearch to mark free slots ([`RESERVED_KEY`](crate::RESERVED_KEY)).
    #[error("key {0} is reserved and cannot be inserted")]
    ReservedKey(u64),
    /// A string that is not a [`ModelVersion`] (from its `FromStr` / `TryFrom<String>`).
    #[error("invalid model version: {0}")]
    InvalidModelVersion(#[from] ModelVersionError),
    /// Index parameters or space that cannot make an index (dimension 0, connectivity 1, …).
    #[error("invalid index parameters: {0}")]
    InvalidParams(String),
    /// A saved index we cannot read: unknown format version, bad header, missing, truncated
    /// or altered data file.
    #[error("unreadable saved index: {0}")]
    Format(String),
    /// Reading or writing the index directory failed.
    #[error("index i/o: {0}")]
    Io(#[from] std::io::Error),
    /// usearch refused or failed an operation (its message).
    #[error("usearch: {0}")]
    Index(String),
}

/// Why a string is not a [`ModelVersion`](crate::ModelVersion) (inside
/// [`SearchError::InvalidModelVersion`]).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ModelVersionError {
    /// Empty or longer than [`ModelVersion::MAX_LEN`](crate::ModelVersion::MAX_LEN).
    #[error("model version must be 1..={max} characters, got {len}")]
    Length {
        /// The given length in bytes.
        len: usize,
        /// The maximum length.
        max: usize,
    },
    /// A character outside `[A-Za-z0-9._:@+-]`.
    #[error("model version contains {0:?}; allowed are A-Z a-z 0-9 . _ : @ + -")]
    Character(char),
}

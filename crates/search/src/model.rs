//! Which model produced a vector. Two models' embeddings live in unrelated spaces, so an
//! index is tagged with exactly one [`ModelVersion`] and dimension (its [`Space`]), and the
//! tag is part of the saved header.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::error::{ModelVersionError, SearchError};

/// Which model (and weights) produced a vector, e.g. `resnet18w32@sha256:0123abcd…`.
///
/// 1 to [`MAX_LEN`](Self::MAX_LEN) characters of `[A-Za-z0-9._:@+-]`: safe in file names,
/// URLs, JSON and log lines without escaping. Serialised as a plain string; parsing fails
/// with [`SearchError::InvalidModelVersion`].
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct ModelVersion(String);

impl ModelVersion {
    /// The longest accepted model version, in characters.
    pub const MAX_LEN: usize = 160;

    /// The model version as a string.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    fn validate(s: &str) -> Result<(), ModelVersionError> {
        if s.is_empty() || s.len() > Self::MAX_LEN {
            return Err(ModelVersionError::Length { len: s.len(), max: Self::MAX_LEN });
        }
        match s.chars().find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | ':' | '@' | '+' | '-'))) {
            Some(c) => Err(ModelVersionError::Character(c)),
            None => Ok(()),
        }
    }
}

impl FromStr for ModelVersion {
    type Err = SearchError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::validate(s)?;
        Ok(Self(s.to_owned()))
    }
}

impl TryFrom<String> for ModelVersion {
    type Error = SearchError;

    fn try_from(s: String) -> Result<Self, Self::Error> {
        Self::validate(&s)?;
        Ok(Self(s))
    }
}

impl From<ModelVersion> for String {
    fn from(m: ModelVersion) -> Self {
        m.0
    }
}

impl AsRef<str> for ModelVersion {
    fn as_ref(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for ModelVersion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for ModelVersion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ModelVersion({:?})", self.0)
    }
}

/// The vector space of an index: which model made its vectors and their dimension.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Space {
    /// The model every vector of the index comes from.
    pub model: ModelVersion,
    /// The vectors' length.
    pub dim: u32,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn model_version_accepts_the_documented_alphabet() {
        let m: ModelVersion = "resnet18w32@sha256:0123abcd.v1+x_y-z".parse().expect("valid");
        assert_eq!(m.to_string(), "resnet18w32@sha256:0123abcd.v1+x_y-z");
        assert!("a".repeat(160).parse::<ModelVersion>().is_ok());
    }

    #[test]
    fn model_version_rejects_empty_long_and_odd_characters() {
        assert!(matches!("".parse::<ModelVersion>(), Err(SearchError::InvalidModelVersion(ModelVersionError::Length { len: 0, .. }))));
        assert!(matches!("a".repeat(161).parse::<ModelVersion>(), Err(SearchError::InvalidModelVersion(ModelVersionError::Length { len: 161, .. }))));
        for bad in ["a b", "a/b", "a\"b", "é", "a\nb", "../x"] {
            assert!(bad.parse::<ModelVersion>().is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn model_version_serde_is_a_plain_string_and_validates() {
        let m: ModelVersion = "m@1".parse().expect("valid");
        assert_eq!(serde_json::to_string(&m).expect("ser"), "\"m@1\"");
        let back: ModelVersion = serde_json::from_str("\"m@1\"").expect("de");
        assert_eq!(back, m);
        assert!(serde_json::from_str::<ModelVersion>("\"a b\"").is_err());
        let space: Space = serde_json::from_str(r#"{"model":"m@1","dim":4}"#).expect("space");
        assert_eq!(space, Space { model: m, dim: 4 });
    }
}

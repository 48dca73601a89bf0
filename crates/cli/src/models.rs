//! Models over the portal's REST API: versions registered from a succeeded job's output, one of
//! them serving; what `model pull` downloads when no version is named.

use std::collections::BTreeMap;

use serde::Deserialize;
use serde_json::Value;

#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    #[error("model {model} has no version {version} (it has: {})", .have.iter().map(u32::to_string).collect::<Vec<_>>().join(", "))]
    NoSuchVersion { model: String, version: u32, have: Vec<u32> },
    #[error("model {0} has no version yet")]
    NoVersions(String),
}

/// One version of a model (`POST /models`, and in `GET /models/{name}`).
#[derive(Debug, Clone, Deserialize)]
pub struct ModelVersionView {
    pub model: String,
    pub version: u32,
    pub job_id: u64,
    #[serde(default)]
    pub job_name: Option<String>,
    #[serde(default)]
    pub output: String,
    #[serde(default)]
    pub sha256: String,
    /// `digits@2`, when the job read a dataset.
    #[serde(default)]
    pub dataset: Option<String>,
    #[serde(default)]
    pub params: BTreeMap<String, Value>,
    #[serde(default)]
    pub metrics: BTreeMap<String, Value>,
    #[serde(default)]
    pub created_ms: u64,
    #[serde(default)]
    pub card: Option<String>,
}

/// A model as `GET /models` lists it.
#[derive(Debug, Clone, Deserialize)]
pub struct ModelSummary {
    #[serde(default)]
    pub model_id: u64,
    pub name: String,
    #[serde(default)]
    pub versions: u32,
    #[serde(default)]
    pub serving: Option<u32>,
    #[serde(default)]
    pub created_ms: u64,
}

/// `GET /models/{name}` (and what promoting answers).
#[derive(Debug, Clone, Deserialize)]
pub struct ModelView {
    pub name: String,
    #[serde(default)]
    pub serving: Option<u32>,
    #[serde(default)]
    pub versions: Vec<ModelVersionView>,
}

impl ModelView {
    /// The version asked for; else the serving one; else the latest.
    pub fn pick(&self, wanted: Option<u32>) -> Result<&ModelVersionView, ModelError> {
        let find = |v: u32| self.versions.iter().find(|m| m.version == v);
        match wanted.or(self.serving) {
            Some(version) => find(version).ok_or_else(|| ModelError::NoSuchVersion {
                model: self.name.clone(),
                version,
                have: self.versions.iter().map(|m| m.version).collect(),
            }),
            None => self.versions.iter().max_by_key(|m| m.version).ok_or_else(|| ModelError::NoVersions(self.name.clone())),
        }
    }
}

/// `GET /models/{name}/compare?a=&b=`.
#[derive(Debug, Clone, Deserialize)]
pub struct Comparison {
    pub a: ModelVersionView,
    pub b: ModelVersionView,
    #[serde(default)]
    pub metrics: Vec<MetricDelta>,
}

/// One metric of two versions; absent where a version did not report it.
#[derive(Debug, Clone, Deserialize)]
pub struct MetricDelta {
    pub metric: String,
    #[serde(default)]
    pub a: Option<f64>,
    #[serde(default)]
    pub b: Option<f64>,
    #[serde(default)]
    pub delta: Option<f64>,
}

/// Where `model pull` puts a version unless told: its output's own name when that is a plain
/// file name, else `MODEL-vN`.
pub fn default_file_name(version: &ModelVersionView) -> String {
    let plain = |s: &str| !s.is_empty() && !s.starts_with('.') && s.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'));
    if plain(&version.output) {
        version.output.clone()
    } else {
        format!("{}-v{}", version.model.chars().filter(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-')).collect::<String>(), version.version)
    }
}

/// `accuracy=0.93 loss=0.12`, for a table cell.
pub fn metrics_line(metrics: &BTreeMap<String, Value>) -> String {
    metrics.iter().map(|(k, v)| format!("{k}={}", v.as_str().map_or_else(|| v.to_string(), str::to_owned))).collect::<Vec<_>>().join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn version(v: u32, output: &str) -> ModelVersionView {
        serde_json::from_value(serde_json::json!({"model": "digits-cls", "version": v, "job_id": 12, "output": output, "sha256": "ab", "metrics": {"accuracy": 0.9, "loss": 0.25}}))
            .expect("a version")
    }

    #[test]
    fn pull_takes_the_version_named_else_the_serving_one_else_the_latest() {
        let mut model = ModelView { name: "digits-cls".into(), serving: Some(2), versions: vec![version(1, "m"), version(2, "m"), version(3, "m")] };
        assert_eq!(model.pick(Some(1)).expect("named").version, 1);
        assert_eq!(model.pick(None).expect("serving").version, 2);
        model.serving = None;
        assert_eq!(model.pick(None).expect("latest").version, 3);
        assert!(matches!(model.pick(Some(9)), Err(ModelError::NoSuchVersion { version: 9, .. })));
        model.versions.clear();
        assert!(matches!(model.pick(None), Err(ModelError::NoVersions(_))));
    }

    #[test]
    fn a_pulled_model_is_named_after_its_output_when_that_is_a_plain_name() {
        assert_eq!(default_file_name(&version(2, "model.safetensors")), "model.safetensors");
        assert_eq!(default_file_name(&version(2, "../etc/x")), "digits-cls-v2");
        assert_eq!(default_file_name(&version(2, "")), "digits-cls-v2");
        assert_eq!(metrics_line(&version(1, "m").metrics), "accuracy=0.9 loss=0.25");
    }
}

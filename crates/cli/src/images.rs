//! Similar-image search over the portal's REST API: search by a picture file, and the
//! libraries (`mine`, `global`) with their indexing status, datasets added, images removed.

use serde::Deserialize;

/// `mine`, `global`, or (searching only) `all`.
pub fn check_library(name: &str, searching: bool) -> Result<(), String> {
    match name {
        "mine" | "global" => Ok(()),
        "all" if searching => Ok(()),
        _ if searching => Err(format!("{name:?}: mine, global or all")),
        _ => Err(format!("{name:?}: mine or global")),
    }
}

/// One result of `POST /image-search`.
#[derive(Debug, Clone, Deserialize)]
pub struct Hit {
    pub library: String,
    pub sha256: String,
    pub name: String,
    #[serde(default)]
    pub dataset: Option<String>,
    #[serde(default)]
    pub version: u32,
    #[serde(default)]
    pub label: Option<String>,
    pub score: f32,
}

#[derive(Debug, Clone, Deserialize)]
pub struct Results {
    pub model: String,
    pub results: Vec<Hit>,
    #[serde(default)]
    pub skipped: Vec<Skipped>,
    pub took_ms: f64,
}

#[derive(Debug, Clone, Deserialize)]
pub struct Skipped {
    pub library: String,
    pub reason: String,
}

/// `GET /image-libraries`.
#[derive(Debug, Clone, Deserialize)]
pub struct Library {
    pub library: String,
    pub state: String,
    #[serde(default)]
    pub error: Option<String>,
    #[serde(default)]
    pub model: Option<String>,
    pub images: u64,
    pub indexed: u64,
    pub waiting: u64,
    pub failed: u64,
}

/// The results as a table: rank, score, library, dataset@version/name, label, hash prefix.
pub fn results_table(r: &Results) -> String {
    let rows: Vec<Vec<String>> = r
        .results
        .iter()
        .enumerate()
        .map(|(i, h)| {
            let from = match &h.dataset {
                Some(d) => format!("{d}@{}/{}", h.version, h.name),
                None => h.name.clone(),
            };
            vec![
                (i + 1).to_string(),
                format!("{:.3}", h.score),
                h.library.clone(),
                from,
                h.label.clone().unwrap_or_default(),
                h.sha256.chars().take(12).collect(),
            ]
        })
        .collect();
    crate::table::render(&["#", "SCORE", "LIBRARY", "IMAGE", "LABEL", "SHA256"], &rows)
}

pub fn libraries_table(libraries: &[Library]) -> String {
    let rows: Vec<Vec<String>> = libraries
        .iter()
        .map(|l| {
            let state = match &l.error {
                Some(e) => format!("{} ({e})", l.state),
                None => l.state.clone(),
            };
            vec![
                l.library.clone(),
                state,
                format!("{}/{}", l.indexed, l.images),
                l.waiting.to_string(),
                l.failed.to_string(),
                l.model.clone().unwrap_or_else(|| "-".into()),
            ]
        })
        .collect();
    crate::table::render(&["LIBRARY", "STATE", "INDEXED", "WAITING", "FAILED", "MODEL"], &rows)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn all_is_a_scope_for_searching_only() {
        assert!(check_library("all", true).is_ok());
        assert!(check_library("all", false).is_err());
        assert!(check_library("theirs", true).unwrap_err().contains("mine, global or all"));
    }

    #[test]
    fn results_show_where_each_picture_came_from() {
        let r: Results = serde_json::from_value(serde_json::json!({"model": "m", "took_ms": 3.0, "results": [
            {"library": "mine", "sha256": "ab".repeat(32), "name": "cats/1.png", "dataset": "pets", "version": 2, "label": "cats", "score": 0.987654}
        ]}))
        .unwrap();
        let table = results_table(&r);
        assert!(table.contains("pets@2/cats/1.png") && table.contains("0.988") && table.contains("abababababab"), "{table}");
    }
}

//! Datasets with version history, and train/val/test splits (SPEC §6).
//!
//! A dataset is a list of versions; a version is a complete item list (name, content hash,
//! label) with the changes from its parent. Editing or deleting items is committing a new
//! list: nothing is rewritten, so every earlier version stays reproducible. A version's `id`
//! is the SHA-256 of its items, so the same content has the same id whatever order it was
//! given in, and committing unchanged content makes no new version.
//!
//! Splits are reproducible from a seed and independent of input order: items are put in a
//! canonical order first, then shuffled with ChaCha8 by this module's own Fisher-Yates (not
//! `rand`'s `shuffle`, whose output may change between `rand` versions), so a recorded seed
//! gives the same split for as long as the items are the same.

use std::collections::{BTreeMap, BTreeSet};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use rand::{RngCore, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::intake::IntakeReport;
use crate::preprocess::{join_field_errors, FieldError};

/// The manifest file in a dataset's directory.
pub const MANIFEST: &str = "manifest.json";
/// Bumped when the manifest's layout changes incompatibly.
const MANIFEST_SCHEMA: u32 = 1;

#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Item {
    /// Unique within a version; the file's path relative to its import root.
    pub name: String,
    /// Hex SHA-256 of the file's bytes.
    pub sha256: String,
    #[serde(default)]
    pub label: Option<String>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Changes {
    pub added: Vec<String>,
    pub removed: Vec<String>,
    /// Same name, other content or label.
    pub modified: Vec<String>,
}

impl Changes {
    pub fn is_empty(&self) -> bool {
        self.added.is_empty() && self.removed.is_empty() && self.modified.is_empty()
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DatasetVersion {
    /// 1, 2, 3, … in commit order.
    pub number: u32,
    /// Hex SHA-256 over the items (see [`items_id`]).
    pub id: String,
    pub parent: Option<u32>,
    /// Sorted by name.
    pub items: Vec<Item>,
    /// From the parent (for the first version: everything added).
    pub changes: Changes,
    pub created_unix_ms: u64,
    pub note: String,
}

impl DatasetVersion {
    /// The items matching every condition of `query`, in name order.
    pub fn query(&self, query: &Query) -> Vec<&Item> {
        self.items.iter().filter(|item| query.matches(item)).collect()
    }

    /// Number of items per label (`None`: unlabeled).
    pub fn label_counts(&self) -> BTreeMap<Option<&str>, usize> {
        let mut counts = BTreeMap::new();
        for item in &self.items {
            *counts.entry(item.label.as_deref()).or_insert(0) += 1;
        }
        counts
    }

    pub fn split(&self, spec: &SplitSpec) -> Result<Split, DatasetError> {
        split(&self.items, spec)
    }
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, tag = "is", content = "value", rename_all = "snake_case")]
pub enum LabelFilter {
    #[default]
    Any,
    Unlabeled,
    Equals(String),
}

/// Conditions on items; the default matches everything.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Query {
    pub label: LabelFilter,
    pub name_prefix: Option<String>,
}

impl Query {
    pub fn label(label: impl Into<String>) -> Self {
        Query { label: LabelFilter::Equals(label.into()), ..Query::default() }
    }

    pub fn name_prefix(prefix: impl Into<String>) -> Self {
        Query { name_prefix: Some(prefix.into()), ..Query::default() }
    }

    pub fn matches(&self, item: &Item) -> bool {
        let label_ok = match &self.label {
            LabelFilter::Any => true,
            LabelFilter::Unlabeled => item.label.is_none(),
            LabelFilter::Equals(l) => item.label.as_deref() == Some(l.as_str()),
        };
        label_ok && self.name_prefix.as_deref().is_none_or(|p| item.name.starts_with(p))
    }
}

#[derive(Debug, thiserror::Error)]
pub enum DatasetError {
    #[error("invalid items: {}", join_field_errors(.0))]
    InvalidItems(Vec<FieldError>),
    #[error("dataset {dataset:?} has no version {number}")]
    NoSuchVersion { dataset: String, number: u32 },
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("{path}: not a valid dataset manifest: {reason}")]
    Manifest { path: PathBuf, reason: String },
    #[error("invalid split: {}", join_field_errors(.0))]
    InvalidSplit(Vec<FieldError>),
    #[error("a stratified split needs a label on every item; {count} have none (first: {first})")]
    Unlabeled { count: usize, first: String },
}

/// A named dataset and its full history. Always has at least one version.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Dataset {
    name: String,
    versions: Vec<DatasetVersion>,
}

/// The manifest on disk: the dataset plus a schema number.
#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Manifest {
    schema: u32,
    name: String,
    versions: Vec<DatasetVersion>,
}

impl Dataset {
    /// A new dataset whose version 1 holds `items`.
    pub fn create(name: impl Into<String>, items: Vec<Item>) -> Result<Dataset, DatasetError> {
        let items = canonical_items(items)?;
        let changes = Changes { added: items.iter().map(|i| i.name.clone()).collect(), ..Changes::default() };
        let first = DatasetVersion { number: 1, id: items_id(&items), parent: None, items, changes, created_unix_ms: now_ms(), note: "created".to_owned() };
        Ok(Dataset { name: name.into(), versions: vec![first] })
    }

    /// A dataset of the images an import accepted.
    pub fn from_intake(name: impl Into<String>, report: &IntakeReport) -> Result<Dataset, DatasetError> {
        Self::create(name, items_from_intake(report))
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// Oldest first.
    pub fn versions(&self) -> &[DatasetVersion] {
        &self.versions
    }

    pub fn latest(&self) -> &DatasetVersion {
        // `versions` is never empty: create() makes one, load() refuses a manifest without.
        &self.versions[self.versions.len() - 1]
    }

    pub fn version(&self, number: u32) -> Option<&DatasetVersion> {
        // Numbers are 1.. without gaps (load() checks), so the index is direct.
        number.checked_sub(1).and_then(|i| self.versions.get(i as usize)).filter(|v| v.number == number)
    }

    fn get(&self, number: u32) -> Result<&DatasetVersion, DatasetError> {
        self.version(number).ok_or_else(|| DatasetError::NoSuchVersion { dataset: self.name.clone(), number })
    }

    /// Makes `items` the new latest version, unless they are what the latest version already
    /// holds: then nothing changes and the latest version is returned.
    pub fn commit(&mut self, items: Vec<Item>, note: impl Into<String>) -> Result<&DatasetVersion, DatasetError> {
        let items = canonical_items(items)?;
        let id = items_id(&items);
        let latest = self.latest();
        if latest.id == id {
            return Ok(self.latest());
        }
        let version = DatasetVersion {
            number: latest.number + 1,
            id,
            parent: Some(latest.number),
            changes: diff_items(&latest.items, &items),
            items,
            created_unix_ms: now_ms(),
            note: note.into(),
        };
        self.versions.push(version);
        Ok(self.latest())
    }

    /// What changed from version `a` to version `b`.
    pub fn diff(&self, a: u32, b: u32) -> Result<Changes, DatasetError> {
        Ok(diff_items(&self.get(a)?.items, &self.get(b)?.items))
    }

    /// Writes `dir/manifest.json` atomically: a temporary file, fsynced, renamed over the old
    /// one, and the directory fsynced, so a crash leaves the old or the new manifest, never
    /// half of one.
    pub fn save(&self, dir: impl AsRef<Path>) -> Result<PathBuf, DatasetError> {
        let dir = dir.as_ref();
        let io = |path: &Path| {
            let path = path.to_path_buf();
            move |source| DatasetError::Io { path, source }
        };
        std::fs::create_dir_all(dir).map_err(io(dir))?;
        let path = dir.join(MANIFEST);
        let tmp = dir.join(format!(".{MANIFEST}.tmp-{}", std::process::id()));
        let manifest = Manifest { schema: MANIFEST_SCHEMA, name: self.name.clone(), versions: self.versions.clone() };
        let json = serde_json::to_vec_pretty(&manifest).map_err(|e| DatasetError::Manifest { path: path.clone(), reason: e.to_string() })?;
        let write = || -> std::io::Result<()> {
            let mut file = std::fs::File::create(&tmp)?;
            file.write_all(&json)?;
            file.sync_all()?;
            std::fs::rename(&tmp, &path)?;
            // The rename itself is durable only once the directory entry is.
            std::fs::File::open(dir)?.sync_all()
        };
        if let Err(e) = write() {
            let _ = std::fs::remove_file(&tmp);
            return Err(io(&path)(e));
        }
        Ok(path)
    }

    /// Reads `dir/manifest.json`, checking that its history is consistent (numbers, parents,
    /// ids matching the items) so that a hand-edited or damaged manifest is refused.
    pub fn load(dir: impl AsRef<Path>) -> Result<Dataset, DatasetError> {
        let path = dir.as_ref().join(MANIFEST);
        let bytes = std::fs::read(&path).map_err(|source| DatasetError::Io { path: path.clone(), source })?;
        let bad = |reason: String| DatasetError::Manifest { path: path.clone(), reason };
        let manifest: Manifest = serde_json::from_slice(&bytes).map_err(|e| bad(e.to_string()))?;
        if manifest.schema != MANIFEST_SCHEMA {
            return Err(bad(format!("schema {} (this build reads {MANIFEST_SCHEMA})", manifest.schema)));
        }
        if manifest.versions.is_empty() {
            return Err(bad("no versions".into()));
        }
        for (i, v) in manifest.versions.iter().enumerate() {
            let expected = i as u32 + 1;
            if v.number != expected {
                return Err(bad(format!("versions[{i}] is number {}, expected {expected}", v.number)));
            }
            if v.parent != expected.checked_sub(1).filter(|&p| p > 0) {
                return Err(bad(format!("version {expected} has parent {:?}", v.parent)));
            }
            let items = canonical_items(v.items.clone()).map_err(|e| bad(format!("version {expected}: {e}")))?;
            if items != v.items || items_id(&items) != v.id {
                return Err(bad(format!("version {expected}: id does not match its items")));
            }
        }
        Ok(Dataset { name: manifest.name, versions: manifest.versions })
    }
}

/// The items of the images an import accepted (duplicates are already left out there).
pub fn items_from_intake(report: &IntakeReport) -> Vec<Item> {
    report.images.iter().map(|img| Item { name: img.name.clone(), sha256: img.sha256.clone(), label: img.label.clone() }).collect()
}

/// Sorted by name; refuses empty or duplicate names and malformed hashes.
fn canonical_items(mut items: Vec<Item>) -> Result<Vec<Item>, DatasetError> {
    items.sort();
    let mut errors = Vec::new();
    for (i, pair) in items.windows(2).enumerate() {
        if pair[0].name == pair[1].name {
            errors.push(FieldError::new(format!("items[{}].name", i + 1), format!("duplicate name {:?}", pair[1].name)));
        }
    }
    for (i, item) in items.iter().enumerate() {
        if item.name.is_empty() {
            errors.push(FieldError::new(format!("items[{i}].name"), "must not be empty"));
        }
        if !(item.sha256.len() == 64 && item.sha256.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))) {
            errors.push(FieldError::new(format!("items[{i}].sha256"), "must be 64 lowercase hex digits"));
        }
    }
    if errors.is_empty() {
        Ok(items)
    } else {
        Err(DatasetError::InvalidItems(errors))
    }
}

/// Hex SHA-256 over the items sorted by name, each field length-prefixed so that no two
/// different item lists encode alike.
pub fn items_id(items: &[Item]) -> String {
    let mut sorted: Vec<&Item> = items.iter().collect();
    sorted.sort();
    let mut hasher = Sha256::new();
    hasher.update(b"suanli-cv dataset items v1\n");
    let field = |hasher: &mut Sha256, s: &str| {
        hasher.update((s.len() as u64).to_le_bytes());
        hasher.update(s.as_bytes());
    };
    for item in sorted {
        field(&mut hasher, &item.name);
        field(&mut hasher, &item.sha256);
        match &item.label {
            None => hasher.update([0u8]),
            Some(label) => {
                hasher.update([1u8]);
                field(&mut hasher, label);
            }
        }
    }
    hex::encode(hasher.finalize())
}

/// Changes from `old` to `new` (by name), each list sorted.
pub fn diff_items(old: &[Item], new: &[Item]) -> Changes {
    let old: BTreeMap<&str, &Item> = old.iter().map(|i| (i.name.as_str(), i)).collect();
    let new: BTreeMap<&str, &Item> = new.iter().map(|i| (i.name.as_str(), i)).collect();
    let mut changes = Changes::default();
    for (name, item) in &new {
        match old.get(name) {
            None => changes.added.push((*name).to_owned()),
            Some(before) if before != item => changes.modified.push((*name).to_owned()),
            Some(_) => {}
        }
    }
    changes.removed = old.keys().filter(|name| !new.contains_key(*name)).map(|n| (*n).to_owned()).collect();
    changes
}

fn now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}

// ---- splits ----

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SplitMethod {
    #[default]
    Random,
    /// Every label keeps its share in each split (needs a label on every item).
    Stratified,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SplitSpec {
    pub train: f32,
    pub val: f32,
    pub test: f32,
    #[serde(default)]
    pub method: SplitMethod,
    #[serde(default)]
    pub seed: u64,
}

impl SplitSpec {
    /// Every bad field: each ratio within 0..=1, and their sum 1 (within 1e-6).
    pub fn validate(&self) -> Vec<FieldError> {
        let mut errors = Vec::new();
        for (name, r) in [("train", self.train), ("val", self.val), ("test", self.test)] {
            if !(r.is_finite() && (0.0..=1.0).contains(&r)) {
                errors.push(FieldError::new(name, format!("must be within 0..=1, got {r}")));
            }
        }
        let sum = f64::from(self.train) + f64::from(self.val) + f64::from(self.test);
        if errors.is_empty() && (sum - 1.0).abs() > 1e-6 {
            errors.push(FieldError::new("train + val + test", format!("must sum to 1, got {sum}")));
        }
        errors
    }

    fn ratios(&self) -> [f64; 3] {
        [f64::from(self.train), f64::from(self.val), f64::from(self.test)]
    }
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Split {
    /// Each list sorted by name.
    pub train: Vec<Item>,
    pub val: Vec<Item>,
    pub test: Vec<Item>,
}

impl Split {
    pub fn sizes(&self) -> [usize; 3] {
        [self.train.len(), self.val.len(), self.test.len()]
    }
}

/// Splits `items` by `spec`. The result depends only on the set of items and the spec.
///
/// Sizes use largest-remainder rounding, so they sum to the item count and each is within 1
/// of `ratio * n`. Stratified splits round per label the same way (each label's count in
/// each split within 1 of `ratio * label size`), choosing which splits get a label's
/// leftover items so that the split totals stay as close to their targets as they can.
pub fn split(items: &[Item], spec: &SplitSpec) -> Result<Split, DatasetError> {
    let errors = spec.validate();
    if !errors.is_empty() {
        return Err(DatasetError::InvalidSplit(errors));
    }
    let mut sorted: Vec<&Item> = items.iter().collect();
    sorted.sort();
    let mut rng = ChaCha8Rng::seed_from_u64(spec.seed);
    let ratios = spec.ratios();
    let mut parts: [Vec<Item>; 3] = Default::default();
    match spec.method {
        SplitMethod::Random => {
            shuffle(&mut sorted, &mut rng);
            deal(&sorted, largest_remainder(sorted.len(), &ratios), &mut parts);
        }
        SplitMethod::Stratified => {
            let unlabeled: Vec<&&Item> = sorted.iter().filter(|i| i.label.is_none()).collect();
            if let Some(first) = unlabeled.first() {
                return Err(DatasetError::Unlabeled { count: unlabeled.len(), first: first.name.clone() });
            }
            let mut classes: BTreeMap<&str, Vec<&Item>> = BTreeMap::new();
            for item in &sorted {
                classes.entry(item.label.as_deref().unwrap_or_default()).or_default().push(item);
            }
            let sizes: Vec<usize> = classes.values().map(Vec::len).collect();
            let counts = stratified_counts(&sizes, &ratios);
            for (members, counts) in classes.values_mut().zip(counts) {
                shuffle(members, &mut rng);
                deal(members, counts, &mut parts);
            }
        }
    }
    for part in &mut parts {
        part.sort();
    }
    let [train, val, test] = parts;
    Ok(Split { train, val, test })
}

/// The first `counts[0]` items to train, the next `counts[1]` to val, the rest to test.
fn deal(items: &[&Item], counts: [usize; 3], parts: &mut [Vec<Item>; 3]) {
    let mut rest = items;
    for (part, count) in parts.iter_mut().zip(counts) {
        let (taken, left) = rest.split_at(count.min(rest.len()));
        part.extend(taken.iter().map(|i| (*i).clone()));
        rest = left;
    }
}

/// Fisher-Yates on ChaCha8's raw output: stable across `rand` releases.
fn shuffle<T>(items: &mut [T], rng: &mut ChaCha8Rng) {
    for i in (1..items.len()).rev() {
        // Multiply-shift: uniform in 0..=i up to a bias of (i+1)/2^64, immaterial here.
        let j = ((u128::from(rng.next_u64()) * (i as u128 + 1)) >> 64) as usize;
        items.swap(i, j);
    }
}

/// `n` split by `ratios`: floors, then the leftover to the largest fractional parts (ties to
/// the earlier split), so the counts sum to `n`.
pub fn largest_remainder(n: usize, ratios: &[f64; 3]) -> [usize; 3] {
    let total: f64 = ratios.iter().sum();
    let quotas = ratios.map(|r| if total > 0.0 { r / total * n as f64 } else { 0.0 });
    let mut counts = quotas.map(|q| q.floor() as usize);
    let mut order = [0, 1, 2];
    order.sort_by(|&a, &b| (quotas[b] - quotas[b].floor()).total_cmp(&(quotas[a] - quotas[a].floor())).then(a.cmp(&b)));
    let assigned: usize = counts.iter().sum();
    for &k in order.iter().cycle().take(n.saturating_sub(assigned)) {
        counts[k] += 1;
    }
    counts
}

/// Per class, counts that are each the floor or ceiling of `ratio * size` and sum to the
/// class size; which splits round up is chosen against the totals' own largest-remainder
/// targets, so that many small classes do not all round the same way (with per-class
/// rounding alone, ten classes of 3 at 0.8/0.1/0.1 would leave val and test empty).
fn stratified_counts(sizes: &[usize], ratios: &[f64; 3]) -> Vec<[usize; 3]> {
    let total: f64 = ratios.iter().sum();
    let n: usize = sizes.iter().sum();
    let targets = largest_remainder(n, ratios);
    let quotas: Vec<[f64; 3]> = sizes.iter().map(|&s| ratios.map(|r| r / total * s as f64)).collect();
    let mut counts: Vec<[usize; 3]> = quotas.iter().map(|q| q.map(|v| v.floor() as usize)).collect();
    let mut assigned = [0usize; 3];
    for c in &counts {
        for k in 0..3 {
            assigned[k] += c[k];
        }
    }
    // Classes with the largest leftover first: they have the most freedom to fix totals.
    let leftovers: Vec<usize> = sizes.iter().zip(&counts).map(|(s, c)| s - c.iter().sum::<usize>()).collect();
    let mut order: Vec<usize> = (0..sizes.len()).collect();
    order.sort_by_key(|&i| std::cmp::Reverse(leftovers[i]));
    for i in order {
        let mut left = leftovers[i];
        let mut used = BTreeSet::new();
        while left > 0 {
            // Only splits with a fractional quota may round up (else the count would be 1
            // over), and each at most once.
            let best = (0..3).filter(|&k| !used.contains(&k) && quotas[i][k] - quotas[i][k].floor() > 1e-9).max_by(|&a, &b| {
                let deficit = |k: usize| targets[k] as i64 - assigned[k] as i64;
                let frac = |k: usize| quotas[i][k] - quotas[i][k].floor();
                deficit(a).cmp(&deficit(b)).then(frac(a).total_cmp(&frac(b))).then(b.cmp(&a))
            });
            // Leftover = sum of fractional parts, so there are always enough candidates; a
            // float edge case falls back to train.
            let k = best.unwrap_or(0);
            used.insert(k);
            counts[i][k] += 1;
            assigned[k] += 1;
            left -= 1;
        }
    }
    counts
}

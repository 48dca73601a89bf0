//! [`LibraryIndex`]: one library's HNSW index (usearch, cosine, `f32`), with the rules of
//! this crate wrapped around it: one model per index, validated vectors, idempotent
//! inserts, and searches that are safe from any number of threads at once.

use std::sync::{Condvar, Mutex, PoisonError};

use serde::{Deserialize, Serialize};
use usearch::{Index, IndexOptions, MetricKind, ScalarKind};

use crate::error::SearchError;
use crate::model::{ModelVersion, Space};

/// How far a vector's L2 norm may be from 1 and still count as normalised.
pub const NORM_TOLERANCE: f32 = 1e-3;

/// The one key an index cannot hold: usearch marks free (removed) slots with it.
pub const RESERVED_KEY: u64 = u64::MAX;

/// The largest dimension an index accepts (well above any image embedding).
const MAX_DIM: u32 = 65_536;

/// Searches that may run at once, at least: usearch keeps one scratch context per
/// concurrent search, and refuses a search when all are taken ("Reserve capacity ahead of
/// searches!"). We reserve `max(cores, this)` contexts and make further searches wait.
const MIN_SEARCH_SLOTS: usize = 16;

/// Smallest capacity reserved at once; capacity then doubles as the index grows.
const MIN_RESERVE: usize = 64;

/// One search result.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Hit {
    /// The key the vector was inserted under.
    pub key: u64,
    /// Cosine similarity to the query, in `[-1, 1]`; higher is closer.
    pub score: f32,
}

/// HNSW parameters (the usual M / efConstruction / efSearch).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct IndexParams {
    /// Graph degree (HNSW's M): more costs memory and build time, gains recall.
    pub connectivity: usize,
    /// Candidate list length while inserting (efConstruction).
    pub expansion_add: usize,
    /// Candidate list length while searching (efSearch); raised to `k` when smaller.
    pub expansion_search: usize,
}

impl Default for IndexParams {
    /// M = 32, efConstruction = 200, efSearch = 256: recall@10 ≥ 0.95 even on 20,000
    /// uniformly random 128-d unit vectors, the hard case (M = 16 / efSearch = 64 reaches
    /// only ~0.5 there, in usearch and faiss alike). Real embeddings are clustered and
    /// easier; a search still costs well under a millisecond at library sizes, next to
    /// milliseconds for computing the query's embedding.
    fn default() -> Self {
        Self { connectivity: 32, expansion_add: 200, expansion_search: 256 }
    }
}

impl IndexParams {
    fn validate(&self) -> Result<(), SearchError> {
        if !(2..=1024).contains(&self.connectivity) {
            return Err(SearchError::InvalidParams(format!("connectivity must be 2..=1024, got {}", self.connectivity)));
        }
        for (name, v) in [("expansion_add", self.expansion_add), ("expansion_search", self.expansion_search)] {
            if !(1..=1 << 20).contains(&v) {
                return Err(SearchError::InvalidParams(format!("{name} must be 1..=1048576, got {v}")));
            }
        }
        Ok(())
    }
}

/// Checks that `v` may be inserted into, or searched in, an index of `space`: same model,
/// same dimension, finite, L2 norm within [`NORM_TOLERANCE`] of 1. Checked in that order.
pub fn check_vector(space: &Space, model: &ModelVersion, v: &[f32]) -> Result<(), SearchError> {
    if *model != space.model {
        return Err(SearchError::ModelMismatch { index: space.model.clone(), given: model.clone() });
    }
    if usize::try_from(space.dim).ok() != Some(v.len()) {
        return Err(SearchError::Dimension { expected: space.dim, given: v.len() });
    }
    if !v.iter().all(|x| x.is_finite()) {
        return Err(SearchError::NotFinite);
    }
    let norm = v.iter().map(|x| f64::from(*x) * f64::from(*x)).sum::<f64>().sqrt() as f32;
    if !norm.is_finite() || (norm - 1.0).abs() > NORM_TOLERANCE {
        return Err(SearchError::NotNormalised { norm });
    }
    Ok(())
}

pub(crate) fn usearch_error(e: impl std::fmt::Display) -> SearchError {
    SearchError::Index(e.to_string())
}

/// One library's vector index.
///
/// `Send + Sync`: keep it behind an `RwLock` and search from many tasks under the read
/// lock; inserts and removals take `&mut self`. Searches beyond the number of scratch
/// contexts usearch was given wait for one to free up rather than fail.
pub struct LibraryIndex {
    pub(crate) space: Space,
    pub(crate) params: IndexParams,
    pub(crate) index: Index,
    search_slots: Slots,
}

impl std::fmt::Debug for LibraryIndex {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LibraryIndex").field("space", &self.space).field("params", &self.params).field("len", &self.len()).finish_non_exhaustive()
    }
}

impl LibraryIndex {
    /// An empty index for vectors of `space`.
    pub fn create(space: Space, params: IndexParams) -> Result<Self, SearchError> {
        if !(1..=MAX_DIM).contains(&space.dim) {
            return Err(SearchError::InvalidParams(format!("dimension must be 1..={MAX_DIM}, got {}", space.dim)));
        }
        params.validate()?;
        let index = Index::new(&native_options(&space, &params)).map_err(usearch_error)?;
        let mut this = Self::from_parts(space, params, index);
        this.reserve_for(MIN_RESERVE)?;
        Ok(this)
    }

    /// Wraps a usearch index whose options match `space` and `params`.
    pub(crate) fn from_parts(space: Space, params: IndexParams, index: Index) -> Self {
        let slots = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1).max(MIN_SEARCH_SLOTS);
        index.change_expansion_add(params.expansion_add);
        index.change_expansion_search(params.expansion_search);
        Self { space, params, index, search_slots: Slots::new(slots) }
    }

    /// Makes room for at least `members` vectors (capacity doubles, so inserts stay
    /// amortised O(1) in reservations) and (re)creates the search contexts.
    pub(crate) fn reserve_for(&mut self, members: usize) -> Result<(), SearchError> {
        let capacity = self.index.capacity();
        if members <= capacity && capacity > 0 {
            return Ok(());
        }
        let target = members.max(capacity.saturating_mul(2)).max(MIN_RESERVE);
        self.index.reserve_capacity_and_threads(target, self.search_slots.total).map_err(usearch_error)
    }

    /// Reserves exactly `max(members, MIN_RESERVE)` slots and one search context per
    /// search slot, whatever the current capacity.
    pub(crate) fn reserve_exact(&mut self, members: usize) -> Result<(), SearchError> {
        self.index.reserve_capacity_and_threads(members.max(MIN_RESERVE), self.search_slots.total).map_err(usearch_error)
    }

    /// The model and dimension of this index's vectors.
    pub fn space(&self) -> &Space {
        &self.space
    }

    /// The HNSW parameters the index was created (or saved) with.
    pub fn params(&self) -> &IndexParams {
        &self.params
    }

    /// Number of vectors in the index (removed ones not counted).
    pub fn len(&self) -> usize {
        self.index.size()
    }

    /// Whether the index holds no vectors.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Whether a vector is stored under `key`.
    pub fn contains(&self, key: u64) -> bool {
        key != RESERVED_KEY && self.index.contains(key)
    }

    /// Adds `vector` under `key`.
    ///
    /// Idempotent: a key already present is left as it is and `false` returned (indexing
    /// a library twice adds nothing). To replace a vector, [`remove`](Self::remove) it
    /// first. A refused vector leaves the index unchanged.
    pub fn insert(&mut self, key: u64, model: &ModelVersion, vector: &[f32]) -> Result<bool, SearchError> {
        check_vector(&self.space, model, vector)?;
        if key == RESERVED_KEY {
            return Err(SearchError::ReservedKey(key));
        }
        if self.index.contains(key) {
            return Ok(false);
        }
        self.reserve_for(self.len().saturating_add(1))?;
        self.index.add(key, vector).map_err(usearch_error)?;
        Ok(true)
    }

    /// Removes the vector under `key`; `false` if there was none. A removed key is never
    /// returned by a search again (also after save and open) and may be inserted anew.
    pub fn remove(&mut self, key: u64) -> Result<bool, SearchError> {
        if key == RESERVED_KEY {
            return Ok(false);
        }
        let removed = self.index.remove(key).map_err(usearch_error)?;
        Ok(removed > 0)
    }

    /// The (approximately) `k` most similar vectors to `query`, best first; `k` is capped
    /// at [`len`](Self::len). With `filter`, only keys it accepts are returned (a very
    /// selective filter may yield fewer than `k` hits).
    pub fn search(&self, model: &ModelVersion, query: &[f32], k: usize, filter: Option<&dyn Fn(u64) -> bool>) -> Result<Vec<Hit>, SearchError> {
        check_vector(&self.space, model, query)?;
        let k = k.min(self.len());
        if k == 0 {
            return Ok(Vec::new());
        }
        let matches = {
            let _slot = self.search_slots.acquire();
            match filter {
                None => self.index.search(query, k),
                Some(accept) => self.index.filtered_search(query, k, accept),
            }
            .map_err(usearch_error)?
        };
        Ok(matches.keys.iter().zip(&matches.distances).map(|(&key, &distance)| Hit { key, score: 1.0 - distance }).collect())
    }

    /// The SIMD kernels usearch picked on this CPU (e.g. `haswell`, `skylake`, `serial`),
    /// for logs and benchmark reports.
    pub fn hardware_acceleration(&self) -> String {
        self.index.hardware_acceleration()
    }

    /// Bytes of memory the index uses (graph, vectors and reserved capacity).
    pub fn memory_bytes(&self) -> usize {
        self.index.memory_usage()
    }
}

pub(crate) fn native_options(space: &Space, params: &IndexParams) -> IndexOptions {
    IndexOptions {
        dimensions: space.dim as usize,
        metric: MetricKind::Cos,
        quantization: ScalarKind::F32,
        connectivity: params.connectivity,
        expansion_add: params.expansion_add,
        expansion_search: params.expansion_search,
        multi: false,
    }
}

/// A counting semaphore over usearch's search contexts.
struct Slots {
    total: usize,
    free: Mutex<usize>,
    freed: Condvar,
}

struct SlotGuard<'a>(&'a Slots);

impl Slots {
    fn new(total: usize) -> Self {
        Self { total, free: Mutex::new(total), freed: Condvar::new() }
    }

    fn acquire(&self) -> SlotGuard<'_> {
        let mut free = self.free.lock().unwrap_or_else(PoisonError::into_inner);
        while *free == 0 {
            free = self.freed.wait(free).unwrap_or_else(PoisonError::into_inner);
        }
        *free -= 1;
        SlotGuard(self)
    }
}

impl Drop for SlotGuard<'_> {
    fn drop(&mut self) {
        let mut free = self.0.free.lock().unwrap_or_else(PoisonError::into_inner);
        *free += 1;
        self.0.freed.notify_one();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn space() -> Space {
        Space { model: "m@1".parse().expect("model"), dim: 3 }
    }

    #[test]
    fn check_vector_accepts_unit_vectors_within_tolerance() {
        let s = space();
        assert!(check_vector(&s, &s.model, &[1.0, 0.0, 0.0]).is_ok());
        assert!(check_vector(&s, &s.model, &[1.0009, 0.0, 0.0]).is_ok());
        assert!(check_vector(&s, &s.model, &[0.9991, 0.0, 0.0]).is_ok());
        assert!(matches!(check_vector(&s, &s.model, &[1.002, 0.0, 0.0]), Err(SearchError::NotNormalised { .. })));
        assert!(matches!(
            check_vector(&s, &s.model, &[0.0, 0.0, 0.0]),
            Err(SearchError::NotNormalised { norm }) if norm == 0.0
        ));
    }

    #[test]
    fn check_vector_order_is_model_dimension_finite_norm() {
        let s = space();
        let other: ModelVersion = "m@2".parse().expect("model");
        assert!(matches!(check_vector(&s, &other, &[f32::NAN]), Err(SearchError::ModelMismatch { .. })));
        assert!(matches!(check_vector(&s, &s.model, &[f32::NAN]), Err(SearchError::Dimension { expected: 3, given: 1 })));
        assert!(matches!(check_vector(&s, &s.model, &[f32::INFINITY, 0.0, 0.0]), Err(SearchError::NotFinite)));
        // Huge but finite components: the norm overflows f32, still refused as not normalised.
        assert!(matches!(check_vector(&s, &s.model, &[f32::MAX, f32::MAX, 0.0]), Err(SearchError::NotNormalised { .. })));
    }

    #[test]
    fn invalid_params_are_refused() {
        for params in [
            IndexParams { connectivity: 1, ..IndexParams::default() },
            IndexParams { expansion_add: 0, ..IndexParams::default() },
            IndexParams { expansion_search: 0, ..IndexParams::default() },
        ] {
            assert!(matches!(LibraryIndex::create(space(), params), Err(SearchError::InvalidParams(_))));
        }
        let zero = Space { dim: 0, ..space() };
        assert!(matches!(LibraryIndex::create(zero, IndexParams::default()), Err(SearchError::InvalidParams(_))));
    }

    #[test]
    fn reserved_key_is_refused() {
        let s = space();
        let mut idx = LibraryIndex::create(s.clone(), IndexParams::default()).expect("create");
        assert!(matches!(idx.insert(RESERVED_KEY, &s.model, &[1.0, 0.0, 0.0]), Err(SearchError::ReservedKey(_))));
        assert!(idx.is_empty());
        assert!(!idx.contains(RESERVED_KEY));
        assert!(!idx.remove(RESERVED_KEY).expect("remove"));
    }

    #[test]
    fn slots_block_when_exhausted_and_wake_on_release() {
        let slots = std::sync::Arc::new(Slots::new(1));
        let held = slots.acquire();
        let s2 = std::sync::Arc::clone(&slots);
        let t = std::thread::spawn(move || {
            let _g = s2.acquire();
        });
        std::thread::sleep(std::time::Duration::from_millis(20));
        assert!(!t.is_finished());
        drop(held);
        t.join().expect("join");
        assert_eq!(*slots.free.lock().expect("lock"), 1);
    }
}

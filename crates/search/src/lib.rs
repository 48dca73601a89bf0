//! Suanli image similarity search (issue 24): one approximate-nearest-neighbour index per
//! library, over the L2-normalised image embeddings the vision models produce.
//!
//! # Why this crate exists
//!
//! Every place that indexes or searches image embeddings (the portal's "find similar
//! images", the importer that indexes a library) goes through this one crate, so that the
//! rules below hold everywhere and are tested once:
//!
//! * **One model per index.** Embeddings from two models (or two weight versions of one
//!   model) live in unrelated spaces; comparing them gives confident nonsense. Every index
//!   is tagged with the [`ModelVersion`] that produced its vectors, and every insert and
//!   search names the model of its vector and is refused ([`SearchError::ModelMismatch`])
//!   when it differs.
//! * **Only valid vectors.** Vectors must have the index's dimension, be finite and be
//!   L2-normalised (within 1e-3); [`check_vector`] is the single validation insert and
//!   search use. A NaN in an HNSW graph silently poisons every search that touches it.
//! * **We do not write an ANN index.** The graph is [usearch](https://github.com/unum-cloud/USearch)'s
//!   HNSW (cosine metric, `f32` scalars); this crate adds validation, idempotent inserts,
//!   safe concurrency and a versioned, crash-safe on-disk format around it.
//! * **A persisted format is a promise.** [`LibraryIndex::save`] writes a directory with a
//!   JSON header (`index.json`, format `suanli.vector-index/1`) naming a usearch data file;
//!   new files are written first and the header is renamed into place last, so a crash
//!   mid-save leaves the previous save readable. [`LibraryIndex::open`] refuses anything it
//!   does not understand (other format versions, a missing, truncated or altered data file)
//!   with [`SearchError::Format`] instead of handing suspicious bytes to C++.
//!
//! [`exact_search`] is the brute-force baseline that recall is measured against (tests and
//! `benches/index.rs`).

mod error;
mod exact;
mod index;
mod model;
mod store;

pub use error::{ModelVersionError, SearchError};
pub use exact::exact_search;
pub use index::{check_vector, Hit, IndexParams, LibraryIndex, NORM_TOLERANCE, RESERVED_KEY};
pub use model::{ModelVersion, Space};
pub use store::{FORMAT_V1, HEADER_FILE};

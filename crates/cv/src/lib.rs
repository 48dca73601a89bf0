//! The CV pipeline's library (SPEC §6).
//!
//! Everything outside [`torch`] is plain Rust and builds everywhere: the data side of the
//! pipeline (intake, preprocessing, datasets, annotation formats) and the pieces of training
//! and inference that are arithmetic rather than tensors (metrics, NMS, hyperparameter
//! search). The `torch` feature adds models, training, inference and the MTCNN detector on
//! libtorch.

pub mod annotation;
pub mod dataset;
pub mod embeddings;
pub mod hpo;
pub mod image;
pub mod intake;
pub mod metrics;
pub mod nms;
pub mod preprocess;
pub mod serve;
#[cfg(feature = "torch")]
pub mod torch;

pub use crate::image::Image;

//! The libtorch side of the pipeline (feature `torch`): models, training, inference, MTCNN.

pub mod data;
pub mod device;
pub mod models;
pub mod optim;
pub mod train;
pub mod mtcnn;
pub mod classifier;
pub mod jobs;

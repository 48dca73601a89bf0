//! The libtorch side of the pipeline (feature `torch`): models, training, inference, MTCNN.

pub mod classifier;
pub mod data;
pub mod device;
pub mod embed;
pub mod jobs;
pub mod models;
pub mod mtcnn;
pub mod optim;
pub mod train;

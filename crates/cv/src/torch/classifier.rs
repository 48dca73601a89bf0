//! A trained classifier as inference loads it: our own checkpoints (weights + model card) or a
//! TorchScript module exported from PyTorch (`torch.jit.trace`/`script`), with the card's
//! preprocessing applied before the network.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use tch::nn::{self, ModuleT};
use tch::{CModule, Device, Kind, Tensor};

use super::data::images_to_tensor;
use super::models::{ModelSpec, Network as OurNetwork};
use crate::image::Image;
use crate::metrics::Report;
use crate::preprocess::{Pipeline, Registry, Step};

/// File names inside a model directory.
pub const CARD_FILE: &str = "model.json";
pub const WEIGHTS_FILE: &str = "model.safetensors";
pub const TORCHSCRIPT_FILE: &str = "model.pt";

/// What a model directory holds besides the weights: enough to use the model correctly.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelCard {
    /// `None`: a TorchScript module in `model.pt`; otherwise our architecture in `model.safetensors`.
    #[serde(default)]
    pub model: Option<ModelSpec>,
    /// Class names; the network's output `i` is `classes[i]`.
    pub classes: Vec<String>,
    /// `[channels, height, width]` the network expects after preprocessing.
    pub input: [i64; 3],
    /// Steps applied to every image before the network (the deterministic ones of training).
    #[serde(default)]
    pub preprocess: Vec<Step>,
    /// The dataset version it was trained on, when it was trained here.
    #[serde(default)]
    pub dataset_version: Option<String>,
    #[serde(default)]
    pub test_metrics: Option<Report>,
}

#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    #[error("{path}: {reason}")]
    Card { path: PathBuf, reason: String },
    #[error("{path}: {source}")]
    Weights { path: PathBuf, source: tch::TchError },
    #[error("preprocessing of {name}: {reason}")]
    Preprocess { name: String, reason: String },
    #[error("{0}")]
    Shape(String),
    #[error(transparent)]
    Torch(#[from] tch::TchError),
}

enum Network {
    Ours { _vs: nn::VarStore, net: OurNetwork },
    Script(CModule),
}

pub struct Classifier {
    pub card: ModelCard,
    network: Network,
    pipeline: Pipeline,
    device: Device,
}

/// One image's answer.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Prediction {
    pub class: String,
    pub index: usize,
    pub score: f32,
    /// The best `top_k` classes with their probabilities, best first.
    pub top: Vec<(String, f32)>,
}

impl Classifier {
    /// Loads a model directory written by a training job (or prepared around a TorchScript file).
    pub fn load(dir: &Path, device: Device) -> Result<Self, ModelError> {
        let card_path = dir.join(CARD_FILE);
        let card_err = |reason: String| ModelError::Card { path: card_path.clone(), reason };
        let bytes = std::fs::read(&card_path).map_err(|e| card_err(e.to_string()))?;
        let card: ModelCard = serde_json::from_slice(&bytes).map_err(|e| card_err(e.to_string()))?;
        if card.classes.is_empty() || card.input.iter().any(|d| *d <= 0) {
            return Err(card_err("needs at least one class and a positive input shape".into()));
        }
        let pipeline = Pipeline::build(&card.preprocess, &Registry::new()).map_err(|e| card_err(e.to_string()))?;
        let network = match &card.model {
            Some(spec) => {
                let mut vs = nn::VarStore::new(device);
                let net = spec.build(&vs.root(), card.input[0], card.input[1], card.classes.len() as i64);
                let path = dir.join(WEIGHTS_FILE);
                vs.load(&path).map_err(|source| ModelError::Weights { path, source })?;
                vs.freeze();
                Network::Ours { _vs: vs, net }
            }
            None => {
                let path = dir.join(TORCHSCRIPT_FILE);
                let mut module = CModule::load_on_device(&path, device).map_err(|source| ModelError::Weights { path, source })?;
                module.set_eval();
                Network::Script(module)
            }
        };
        Ok(Classifier { card, network, pipeline, device })
    }

    pub fn device(&self) -> Device {
        self.device
    }

    /// Raw network output for an `N×C×H×W` batch.
    pub fn logits(&self, xs: &Tensor) -> Result<Tensor, ModelError> {
        let _guard = tch::no_grad_guard();
        let xs = xs.to_device(self.device);
        Ok(match &self.network {
            Network::Ours { net, .. } => net.forward_t(&xs, false),
            Network::Script(m) => m.forward_ts(&[xs])?,
        })
    }

    /// The representation before the last layer for an `N×C×H×W` batch, `N×D`: our networks'
    /// pooled features; for a TorchScript module, its output (export a backbone whose last
    /// layer is the identity to search by its features).
    pub fn features(&self, xs: &Tensor) -> Result<Tensor, ModelError> {
        let _guard = tch::no_grad_guard();
        let xs = xs.to_device(self.device);
        let out = match &self.network {
            Network::Ours { net, .. } => xs.apply_t(&net.features, false),
            Network::Script(m) => m.forward_ts(&[xs])?,
        };
        if out.dim() != 2 {
            return Err(ModelError::Shape(format!("features of shape {:?}, expected [batch, dimension]", out.size())));
        }
        Ok(out)
    }

    /// Preprocesses and stacks images into the batch the network expects.
    pub fn prepare(&self, images: &[(&str, &Image)]) -> Result<Tensor, ModelError> {
        let mut ready = Vec::with_capacity(images.len());
        for (i, (name, img)) in images.iter().enumerate() {
            // Inference steps are deterministic; the generator is only there for the signature.
            let mut rng = crate::preprocess::item_rng(0, i as u64);
            let out = self.pipeline.apply((*img).clone(), &mut rng).map_err(|e| ModelError::Preprocess { name: name.to_string(), reason: e.to_string() })?;
            let shape = [i64::from(out.channels), i64::from(out.height), i64::from(out.width)];
            if shape != self.card.input {
                return Err(ModelError::Shape(format!(
                    "{name}: {shape:?} after preprocessing, the model expects {:?} (channels, height, width)",
                    self.card.input
                )));
            }
            ready.push((*name, out));
        }
        images_to_tensor(ready.iter().map(|(n, i)| (*n, i))).map_err(|e| ModelError::Shape(e.to_string()))
    }

    /// Class probabilities for each image.
    pub fn classify(&self, images: &[(&str, &Image)], top_k: usize) -> Result<Vec<Prediction>, ModelError> {
        if images.is_empty() {
            return Ok(Vec::new());
        }
        let probs = self.logits(&self.prepare(images)?)?.softmax(-1, Kind::Float).to_device(Device::Cpu);
        let classes = self.card.classes.len();
        if probs.size() != [images.len() as i64, classes as i64] {
            return Err(ModelError::Shape(format!("the network answered {:?}, expected [{}, {classes}]", probs.size(), images.len())));
        }
        let flat: Vec<f32> = probs.flatten(0, -1).try_into()?;
        Ok(flat
            .chunks_exact(classes)
            .map(|row| {
                let mut order: Vec<usize> = (0..classes).collect();
                order.sort_by(|a, b| row[*b].total_cmp(&row[*a]).then(a.cmp(b)));
                let best = order[0];
                Prediction {
                    class: self.card.classes[best].clone(),
                    index: best,
                    score: row[best],
                    top: order.iter().take(top_k.max(1)).map(|&i| (self.card.classes[i].clone(), row[i])).collect(),
                }
            })
            .collect())
    }
}

//! Image embeddings for similar-image search: a model directory's features before its last
//! layer, L2-normalised, named by a model version so an index never mixes two models.
//!
//! Any model directory works: one of ours (`model.json` + `model.safetensors`; the pooled
//! features, 8×width for the ResNet-18 layout), or a TorchScript backbone exported from PyTorch
//! whose output is the feature vector (a ResNet-50 with `fc = Identity`, 2,048 dimensions).
//!
//! The embedding is the mean of the features of the image and of its mirror image, normalised:
//! the same photo flipped left-right then embeds to the same vector, which a library of
//! photos wants (mirrored copies are the most common near-duplicates after resizing and
//! recompression), at the price of one more forward pass.

use std::borrow::Cow;
use std::path::Path;

use sha2::{Digest, Sha256};
use tch::{Device, Kind, Tensor};

use super::classifier::{Classifier, ModelCard, ModelError, CARD_FILE, TORCHSCRIPT_FILE, WEIGHTS_FILE};
use super::models::ModelSpec;
use crate::image::Image;
use crate::preprocess::Step;

pub struct Embedder {
    model: Classifier,
    version: String,
    dim: usize,
}

impl Embedder {
    /// Loads a model directory; the version is the architecture's tag and the SHA-256 of the
    /// card and weights together (preprocessing changes the vectors as much as weights do).
    pub fn load(dir: &Path, device: Device) -> Result<Self, ModelError> {
        let model = Classifier::load(dir, device)?;
        let mut hash = Sha256::new();
        let weights = if model.card.model.is_some() { WEIGHTS_FILE } else { TORCHSCRIPT_FILE };
        for file in [CARD_FILE, weights] {
            let path = dir.join(file);
            let bytes = std::fs::read(&path).map_err(|e| ModelError::Card { path: path.clone(), reason: e.to_string() })?;
            hash.update((bytes.len() as u64).to_le_bytes());
            hash.update(&bytes);
        }
        let digest = hex::encode(hash.finalize());
        let tag = model.card.model.as_ref().map_or_else(|| "torchscript".to_owned(), |m| m.tag());
        let version = format!("{tag}@sha256:{}", &digest[..32]);
        let [c, h, w] = model.card.input;
        let dim = model.features(&Tensor::zeros([1, c, h, w], (Kind::Float, Device::Cpu)))?.size()[1] as usize;
        Ok(Embedder { model, version, dim })
    }

    /// `<arch tag>@sha256:<first 32 hex digits>`.
    pub fn version(&self) -> &str {
        &self.version
    }

    pub fn dim(&self) -> usize {
        self.dim
    }

    pub fn device(&self) -> Device {
        self.model.device()
    }

    /// One unit-length vector per image, in order.
    pub fn embed(&self, images: &[(&str, &Image)]) -> Result<Vec<Vec<f32>>, ModelError> {
        if images.is_empty() {
            return Ok(Vec::new());
        }
        let want = self.model.card.input[0];
        let converted: Vec<Cow<'_, Image>> = images.iter().map(|(_, img)| with_channels(img, want)).collect();
        let named: Vec<(&str, &Image)> = images.iter().zip(&converted).map(|((name, _), img)| (*name, img.as_ref())).collect();
        let xs = self.model.prepare(&named)?;
        let both = Tensor::cat(&[&xs, &xs.flip([3])], 0);
        let features = self.model.features(&both)?.to_device(Device::Cpu).to_kind(Kind::Float);
        let n = images.len() as i64;
        let mean = (features.narrow(0, 0, n) + features.narrow(0, n, n)) / 2.0;
        let flat: Vec<f32> = mean.flatten(0, -1).try_into()?;
        Ok(flat
            .chunks_exact(self.dim)
            .map(|row| {
                let mut v = row.to_vec();
                crate::embeddings::normalise(&mut v);
                v
            })
            .collect())
    }
}

/// A library mixes grayscale and colour photos; the network takes one kind. Grey becomes three
/// equal channels, colour becomes luma (0.299 R + 0.587 G + 0.114 B).
fn with_channels(img: &Image, channels: i64) -> Cow<'_, Image> {
    match (img.channels, channels) {
        (1, 3) => Cow::Owned(Image { channels: 3, data: img.data.iter().flat_map(|v| [*v; 3]).collect(), ..*img }),
        (3, 1) => Cow::Owned(Image { channels: 1, data: img.data.chunks_exact(3).map(|p| 0.299 * p[0] + 0.587 * p[1] + 0.114 * p[2]).collect(), ..*img }),
        _ => Cow::Borrowed(img),
    }
}

/// Writes a model directory holding `spec` with seeded, *untrained* weights, for `input`
/// (`[channels, side, side]`) images resized to fit and normalised with ImageNet's statistics.
/// Random convolutional features already place a photo and its resized, cropped, mirrored and
/// recompressed copies together (what near-duplicate search needs, and what the tests use);
/// search by meaning needs trained weights: a model from `train_classifier`, or a TorchScript
/// backbone exported from PyTorch.
pub fn write_untrained_backbone(dir: &Path, spec: &ModelSpec, input: [i64; 3], seed: i64) -> Result<(), ModelError> {
    let [channels, side, _] = input;
    tch::manual_seed(seed);
    let vs = tch::nn::VarStore::new(Device::Cpu);
    let _net = spec.build(&vs.root(), channels, side, 1);
    let weights = dir.join(WEIGHTS_FILE);
    vs.save(&weights).map_err(|source| ModelError::Weights { path: weights, source })?;
    let (mean, std) = if channels == 3 { (vec![0.485, 0.456, 0.406], vec![0.229, 0.224, 0.225]) } else { (vec![0.449], vec![0.226]) };
    let card = ModelCard {
        model: Some(spec.clone()),
        classes: vec!["untrained".into()],
        input,
        preprocess: vec![Step::Resize { width: side as u32, height: side as u32, filter: Default::default() }, Step::Normalize { mean, std }],
        dataset_version: None,
        test_metrics: None,
    };
    let path = dir.join(CARD_FILE);
    let bytes = serde_json::to_vec_pretty(&card).map_err(|e| ModelError::Card { path: path.clone(), reason: e.to_string() })?;
    std::fs::write(&path, bytes).map_err(|e| ModelError::Card { path, reason: e.to_string() })
}

//! Training a classifier: data-parallel replicas, our optimizers, checkpoints that resume
//! exactly, evaluation.
//!
//! Data parallelism is synchronous, as PyTorch's DDP: every replica holds the same weights,
//! takes an equal share of each batch, computes gradients on its own device (in its own
//! thread), the shares' gradients are averaged, weighted by shard size, on the first device,
//! one optimizer step is taken there, and the new weights (and batch-norm statistics, as DDP
//! broadcasts buffers from rank 0) are copied back to every replica. The averaged gradient is
//! exactly the single-device gradient of the combined batch (`tests/torch_train.rs` checks)
//! for networks without batch norm; with it, each replica normalizes by its own shard's
//! statistics, as DDP does without SyncBatchNorm.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

use rand::seq::SliceRandom;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};
use tch::nn::{self, ModuleT};
use tch::{Device, Kind, Tensor};

use super::data::{images_to_tensor, Samples};
use super::models::ModelSpec;
use super::optim::{Optimizer, OptimizerSpec, Schedule};
use crate::image::Image;
use crate::metrics::ConfusionMatrix;

#[derive(Debug, thiserror::Error)]
pub enum TrainError {
    #[error("invalid training settings: {}", .0.join("; "))]
    Invalid(Vec<String>),
    #[error("checkpoint {path}: {reason}")]
    Checkpoint { path: PathBuf, reason: String },
    #[error("augmentation of {name}: {reason}")]
    Augment { name: String, reason: String },
    #[error(transparent)]
    Data(#[from] super::data::DataError),
    #[error(transparent)]
    Torch(#[from] tch::TchError),
    #[error("{0}")]
    Io(String),
}

/// What a run trains and how (the tensor side; where the data comes from is the job's business).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrainConfig {
    pub model: ModelSpec,
    pub optimizer: OptimizerSpec,
    #[serde(default)]
    pub schedule: Schedule,
    pub epochs: u32,
    pub batch_size: usize,
    #[serde(default)]
    pub seed: u64,
    /// Write a checkpoint every this many optimizer steps (0: only at the end of each epoch).
    #[serde(default)]
    pub checkpoint_every_steps: u64,
}

impl TrainConfig {
    pub fn validate(&self) -> Result<(), TrainError> {
        let mut errors = Vec::new();
        if let Err(e) = self.model.validate() {
            errors.push(e);
        }
        self.optimizer.validate(&mut errors);
        self.schedule.validate(self.optimizer.lr(), &mut errors);
        if !(1..=100_000).contains(&self.epochs) {
            errors.push(format!("epochs: between 1 and 100000, got {}", self.epochs));
        }
        if !(1..=65_536).contains(&self.batch_size) {
            errors.push(format!("batch_size: between 1 and 65536, got {}", self.batch_size));
        }
        if errors.is_empty() {
            Ok(())
        } else {
            Err(TrainError::Invalid(errors))
        }
    }
}

/// A per-sample augmentation run on each training batch (seeded, so reproducible).
pub type Augment<'a> = &'a (dyn Fn(&Image, &mut ChaCha8Rng) -> Result<Image, String> + Sync);

/// What a run reports as it goes; the job binary prints each as one JSON line.
#[derive(Clone, Debug, Serialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum Progress {
    Step { epoch: u32, step: u64, total_steps: u64, loss: f64, lr: f64, samples_per_s: f64, eta_s: f64 },
    Epoch { epoch: u32, train_loss: f64, val_accuracy: Option<f64>, seconds: f64 },
    Checkpoint { step: u64, path: String },
    Resumed { step: u64 },
}

struct Replica {
    vs: nn::VarStore,
    net: Box<dyn ModuleT>,
    /// The trainable variables, listed once (the var store locks and clones on every call).
    params: Vec<Tensor>,
}

pub struct Trainer {
    config: TrainConfig,
    replicas: Vec<Replica>,
    optimizer: Optimizer,
    classes: i64,
    shape: [i64; 3],
    /// Steps already taken (after a resume, where to continue from).
    step: u64,
}

/// The result of [`Trainer::fit`].
#[derive(Clone, Debug, Serialize)]
pub struct TrainOutcome {
    pub steps: u64,
    pub final_train_loss: f64,
    pub epoch_seconds: Vec<f64>,
}

impl Trainer {
    /// A fresh network, identical on every device (initialized on the first, then copied).
    pub fn new(config: TrainConfig, devices: &[Device], shape: [i64; 3], classes: i64) -> Result<Self, TrainError> {
        config.validate()?;
        if devices.is_empty() {
            return Err(TrainError::Invalid(vec!["no device".into()]));
        }
        let mut replicas: Vec<Replica> = Vec::with_capacity(devices.len());
        with_seed(config.seed, || {
            for &device in devices {
                let vs = nn::VarStore::new(device);
                let net = Box::new(config.model.build(&vs.root(), shape[0], shape[1], classes));
                let params = vs.trainable_variables();
                replicas.push(Replica { vs, net, params });
            }
        });
        let (first, rest) = replicas.split_at_mut(1);
        for r in rest {
            r.vs.copy(&first[0].vs)?;
        }
        let params = replicas[0].vs.trainable_variables();
        let optimizer = Optimizer::new(config.optimizer.clone(), params);
        Ok(Trainer { config, replicas, optimizer, classes, shape, step: 0 })
    }

    pub fn config(&self) -> &TrainConfig {
        &self.config
    }

    /// Changes the settings of a run that has not started or was just resumed (the network
    /// must stay the same; the job binary uses it to continue with the original seed).
    pub fn set_config(&mut self, config: TrainConfig) {
        self.config = config;
    }

    pub fn steps_done(&self) -> u64 {
        self.step
    }

    pub fn var_store(&self) -> &nn::VarStore {
        &self.replicas[0].vs
    }

    pub fn steps_per_epoch(&self, samples: usize) -> u64 {
        samples.div_ceil(self.config.batch_size) as u64
    }

    /// Forward and backward of one batch on every replica; returns the batch's mean loss and
    /// leaves the averaged gradient in the first replica's parameters.
    pub fn accumulate_gradients(&mut self, xs: &Tensor, ys: &Tensor) -> Result<f64, TrainError> {
        let n = xs.size()[0];
        let parts = self.replicas.len() as i64;
        let chunk = (n + parts - 1) / parts;
        let shards: Vec<(Tensor, Tensor)> = (0..parts)
            .map(|r| (r * chunk, ((r + 1) * chunk).min(n)))
            .filter(|(a, b)| a < b)
            .map(|(a, b)| (xs.narrow(0, a, b - a), ys.narrow(0, a, b - a)))
            .collect();
        let used = shards.len();
        let losses: Vec<(f64, i64)> = if used == 1 {
            // One device: stay on this thread. libtorch's OpenMP pool belongs to the thread that
            // calls it, so a fresh thread per step would build a new pool every step.
            shards.into_iter().map(|(x, y)| replica_step(&mut self.replicas[0], x, y)).collect()
        } else {
            std::thread::scope(|scope| {
                let handles: Vec<_> =
                    self.replicas[..used].iter_mut().zip(shards).map(|(replica, (x, y))| scope.spawn(move || replica_step(replica, x, y))).collect();
                // A replica that panicked (a device out of memory, say) fails the step: averaging
                // without its share would silently train on part of the batch.
                handles
                    .into_iter()
                    .map(|h| h.join().map_err(|_| TrainError::Io("a data-parallel replica failed during its step".into())))
                    .collect::<Result<Vec<_>, _>>()
            })?
        };
        if used > 1 {
            let _guard = tch::no_grad_guard();
            let (master, others) = self.replicas.split_at(1);
            for (i, p) in master[0].params.iter().enumerate() {
                let mut sum = p.grad() * (losses[0].1 as f64 / n as f64);
                for (r, replica) in others[..used - 1].iter().enumerate() {
                    let g = replica.params[i].grad();
                    if g.defined() {
                        sum += g.to_device(p.device()) * (losses[r + 1].1 as f64 / n as f64);
                    }
                }
                p.grad().copy_(&sum);
            }
        }
        Ok(losses.iter().map(|(l, rows)| l * *rows as f64).sum::<f64>() / n as f64)
    }

    /// Copies the first replica's weights and buffers to the others.
    fn broadcast(&mut self) -> Result<(), TrainError> {
        let (first, rest) = self.replicas.split_at_mut(1);
        for r in rest {
            r.vs.copy(&first[0].vs)?;
        }
        Ok(())
    }

    /// Trains for the configured epochs, continuing from the current step (0, or a resume).
    pub fn fit(
        &mut self,
        train: &Samples,
        val: Option<&Samples>,
        augment: Option<Augment<'_>>,
        checkpoint: Option<&Path>,
        progress: &mut dyn FnMut(Progress),
    ) -> Result<TrainOutcome, TrainError> {
        if train.is_empty() {
            return Err(TrainError::Invalid(vec!["the training split has no images".into()]));
        }
        let per_epoch = self.steps_per_epoch(train.len());
        let total = per_epoch * u64::from(self.config.epochs);
        let started = Instant::now();
        let start_step = self.step;
        let mut epoch_seconds = Vec::new();
        let mut last_loss = f64::NAN;
        for epoch in (self.step / per_epoch) as u32..self.config.epochs {
            let epoch_start = Instant::now();
            let lr = self.config.schedule.lr(self.config.optimizer.lr(), epoch, self.config.epochs);
            // The order of an epoch depends only on the seed and the epoch, so a resumed run
            // sees the same batches as an uninterrupted one.
            let mut rng = ChaCha8Rng::seed_from_u64(self.config.seed ^ (u64::from(epoch) << 32));
            let mut order: Vec<i64> = (0..train.len() as i64).collect();
            order.shuffle(&mut rng);
            let (mut loss_sum, mut loss_n) = (0.0, 0usize);
            for (b, idx) in order.chunks(self.config.batch_size).enumerate() {
                let global = u64::from(epoch) * per_epoch + b as u64;
                if global < self.step {
                    continue;
                }
                let (xs, ys) = match augment {
                    None => train.batch(idx),
                    Some(aug) => {
                        // Draws of a batch depend on the seed and the step alone, so a resumed
                        // run augments each batch as the uninterrupted run did.
                        let mut rng = crate::preprocess::item_rng(self.config.seed, global);
                        let mut out = Vec::with_capacity(idx.len());
                        for &i in idx {
                            let name = &train.names[i as usize];
                            let img = aug(&train.images[i as usize], &mut rng).map_err(|reason| TrainError::Augment { name: name.clone(), reason })?;
                            out.push((name.as_str(), img));
                        }
                        let xs = images_to_tensor(out.iter().map(|(n, i)| (*n, i)))?;
                        (xs, Tensor::from_slice(&idx.iter().map(|&i| train.labels[i as usize]).collect::<Vec<_>>()))
                    }
                };
                let loss = self.accumulate_gradients(&xs, &ys)?;
                self.optimizer.step(lr);
                self.broadcast()?;
                self.step = global + 1;
                loss_sum += loss;
                loss_n += 1;
                last_loss = loss;
                let done = self.step - start_step;
                if done.is_multiple_of(10) || self.step == total {
                    let elapsed = started.elapsed().as_secs_f64();
                    let rate = done as f64 / elapsed.max(1e-9);
                    progress(Progress::Step {
                        epoch,
                        step: self.step,
                        total_steps: total,
                        loss,
                        lr,
                        samples_per_s: rate * self.config.batch_size as f64,
                        eta_s: (total - self.step) as f64 / rate.max(1e-9),
                    });
                }
                let every = self.config.checkpoint_every_steps;
                let epoch_end = (b as u64 + 1) == per_epoch;
                if let Some(path) = checkpoint {
                    if (every > 0 && self.step.is_multiple_of(every)) || (every == 0 && epoch_end) {
                        self.save_checkpoint(path)?;
                        progress(Progress::Checkpoint { step: self.step, path: path.display().to_string() });
                    }
                }
            }
            let seconds = epoch_start.elapsed().as_secs_f64();
            epoch_seconds.push(seconds);
            let val_accuracy = match val {
                Some(v) if !v.is_empty() => Some(self.evaluate(v)?.accuracy()),
                _ => None,
            };
            progress(Progress::Epoch { epoch, train_loss: loss_sum / loss_n.max(1) as f64, val_accuracy, seconds });
        }
        Ok(TrainOutcome { steps: self.step, final_train_loss: last_loss, epoch_seconds })
    }

    /// Logits for a batch, in evaluation mode.
    pub fn predict(&self, xs: &Tensor) -> Tensor {
        let r = &self.replicas[0];
        tch::no_grad(|| r.net.forward_t(&xs.to_device(r.vs.device()), false))
    }

    pub fn evaluate(&self, samples: &Samples) -> Result<ConfusionMatrix, TrainError> {
        evaluate_with(samples, self.classes, |xs| self.predict(xs))
    }

    /// One file: the weights (`model.*`), the optimizer's state (`optim.*`) and where the run
    /// stands (`meta.step`). Written to a temporary name and renamed, so a reader (the agent
    /// uploads it when it changes) never sees half a checkpoint.
    pub fn save_checkpoint(&self, path: &Path) -> Result<(), TrainError> {
        let mut named: Vec<(String, Tensor)> =
            self.replicas[0].vs.variables().into_iter().map(|(k, v)| (format!("model.{k}"), v.to_device(Device::Cpu))).collect();
        named.extend(self.optimizer.state());
        named.push(("meta.step".into(), Tensor::from_slice(&[self.step as i64])));
        named.sort_by(|a, b| a.0.cmp(&b.0));
        let tmp = path.with_extension("tmp.safetensors");
        Tensor::write_safetensors(&named, &tmp).map_err(|e| TrainError::Checkpoint { path: path.to_owned(), reason: e.to_string() })?;
        std::fs::File::open(&tmp).and_then(|f| f.sync_all()).map_err(|e| TrainError::Io(e.to_string()))?;
        std::fs::rename(&tmp, path).map_err(|e| TrainError::Checkpoint { path: path.to_owned(), reason: e.to_string() })?;
        Ok(())
    }

    /// Continues from a checkpoint of the same configuration.
    pub fn resume(&mut self, path: &Path, progress: &mut dyn FnMut(Progress)) -> Result<(), TrainError> {
        let err = |reason: String| TrainError::Checkpoint { path: path.to_owned(), reason };
        let named: HashMap<String, Tensor> = Tensor::read_safetensors(path).map_err(|e| err(e.to_string()))?.into_iter().collect();
        {
            let _guard = tch::no_grad_guard();
            for (name, mut var) in self.replicas[0].vs.variables() {
                let saved = named.get(&format!("model.{name}")).ok_or_else(|| err(format!("no weights for {name}")))?;
                if saved.size() != var.size() {
                    return Err(err(format!("{name}: shape {:?} saved, {:?} in this model", saved.size(), var.size())));
                }
                var.copy_(saved);
            }
        }
        self.optimizer.restore(&named).map_err(err)?;
        self.step = named.get("meta.step").ok_or_else(|| err("no meta.step".into()))?.int64_value(&[0]) as u64;
        self.broadcast()?;
        progress(Progress::Resumed { step: self.step });
        Ok(())
    }

    /// The trained weights alone, as inference loads them.
    pub fn save_weights(&self, path: &Path) -> Result<(), TrainError> {
        Ok(self.replicas[0].vs.save(path)?)
    }

    pub fn shape(&self) -> [i64; 3] {
        self.shape
    }
}

/// Forward and backward of one shard on its replica: (mean loss, rows).
fn replica_step(replica: &mut Replica, x: Tensor, y: Tensor) -> (f64, i64) {
    let device = replica.vs.device();
    for p in &mut replica.params {
        p.zero_grad();
    }
    let rows = x.size()[0];
    let loss = replica.net.forward_t(&x.to_device(device), true).cross_entropy_for_logits(&y.to_device(device));
    loss.backward();
    (loss.double_value(&[]), rows)
}

/// Runs `f` with libtorch's global generator seeded and no other thread drawing from it, so
/// the same seed gives the same initial weights even while other trainers start in parallel.
pub fn with_seed<T>(seed: u64, f: impl FnOnce() -> T) -> T {
    static GLOBAL_RNG: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let _held = GLOBAL_RNG.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
    tch::manual_seed(seed as i64);
    f()
}

/// Confusion matrix of a predictor over a sample set, in batches of 256.
pub fn evaluate_with(samples: &Samples, classes: i64, predict: impl Fn(&Tensor) -> Tensor) -> Result<ConfusionMatrix, TrainError> {
    let mut cm = ConfusionMatrix::new(classes as usize);
    let idx: Vec<i64> = (0..samples.len() as i64).collect();
    for chunk in idx.chunks(256) {
        let (xs, ys) = samples.batch(chunk);
        let predicted: Vec<i64> = predict(&xs).argmax(-1, false).to_kind(Kind::Int64).to_device(Device::Cpu).try_into()?;
        let truth: Vec<i64> = ys.try_into()?;
        for (t, p) in truth.into_iter().zip(predicted) {
            cm.add(t as usize, p as usize).map_err(|e| TrainError::Io(e.to_string()))?;
        }
    }
    Ok(cm)
}

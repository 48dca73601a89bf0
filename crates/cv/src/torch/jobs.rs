//! The tasks `suanli-job` runs, one spec each. Relative paths in a spec resolve against the
//! directories the agent gives a job (`SUANLI_INPUT_DIR` for what it reads, `SUANLI_OUTPUT_DIR`
//! for what it writes; the current directory when run by hand). Training checkpoints go to
//! `$SUANLI_CHECKPOINT_DIR/checkpoint` (the agent uploads it when it changes) and a rerun
//! continues from `$SUANLI_RESUME_FROM` when the agent provides one.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use tch::Device;

use super::classifier::{Classifier, ModelCard, CARD_FILE, WEIGHTS_FILE};
use super::data::Samples;
use super::device::{self, DevicePreference};
use super::embed::Embedder;
use super::mtcnn::{Mtcnn, MtcnnConfig};
use super::train::{Progress, TrainConfig, Trainer};
use crate::annotation::{AnnotatedImage, AnnotationSet, Format, Object, Shape};
use crate::dataset::{Dataset, Item, SplitMethod, SplitSpec};
use crate::hpo::{SearchSpace, Strategy};
use crate::intake::{import_dir, FrameOptions, FrameSampling, IntakeOptions, IntakeReport, LoadedImage};
use crate::preprocess::{Pipeline, Registry, Step};

#[derive(Debug, thiserror::Error)]
pub enum JobError {
    /// The spec itself is wrong: nothing was read or written.
    #[error("invalid job spec: {}", .0.join("; "))]
    Invalid(Vec<String>),
    #[error("{0}")]
    Failed(String),
}

impl JobError {
    fn failed(e: impl std::fmt::Display) -> Self {
        JobError::Failed(e.to_string())
    }
}

/// One job, tagged by `task`.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(tag = "task", rename_all = "snake_case")]
pub enum Task {
    PrepareDataset(PrepareDataset),
    ExtractFrames(ExtractFrames),
    TrainClassifier(TrainClassifier),
    SearchHyperparameters(SearchHyperparameters),
    Infer(Infer),
    Serve(Serve),
    PreAnnotate(PreAnnotate),
    Embed(Embed),
}

/// Where the agent put things (or the current directory).
#[derive(Clone, Debug)]
pub struct JobEnv {
    pub input_dir: PathBuf,
    pub output_dir: PathBuf,
    pub checkpoint: Option<PathBuf>,
    pub resume_from: Option<PathBuf>,
}

impl JobEnv {
    pub fn from_env() -> Self {
        let dir = |k: &str| std::env::var_os(k).map(PathBuf::from);
        JobEnv {
            input_dir: dir("SUANLI_INPUT_DIR").unwrap_or_else(|| PathBuf::from(".")),
            output_dir: dir("SUANLI_OUTPUT_DIR").unwrap_or_else(|| PathBuf::from(".")),
            checkpoint: dir("SUANLI_CHECKPOINT_DIR").map(|d| d.join("checkpoint")),
            resume_from: dir("SUANLI_RESUME_FROM").filter(|p| p.is_file()),
        }
    }

    fn input(&self, p: &Path) -> PathBuf {
        if p.is_absolute() {
            p.to_owned()
        } else {
            self.input_dir.join(p)
        }
    }

    fn output(&self, p: Option<&Path>) -> Result<PathBuf, JobError> {
        let dir = match p {
            Some(p) if p.is_absolute() => p.to_owned(),
            Some(p) => self.output_dir.join(p),
            None => self.output_dir.clone(),
        };
        std::fs::create_dir_all(&dir).map_err(|e| JobError::Failed(format!("{}: {e}", dir.display())))?;
        Ok(dir)
    }
}

/// Builds a task from the agent's form: `--task NAME` and a flat map of parameters whose
/// values are JSON where they parse as JSON (`"epochs": "5"` is the number 5) and strings
/// otherwise; dotted keys nest (`"training.epochs"`), and a `spec` parameter holds a whole
/// JSON object to start from.
pub fn task_from_params(task: &str, params: &BTreeMap<String, String>) -> Result<Task, JobError> {
    let mut root = serde_json::Map::new();
    if let Some(spec) = params.get("spec") {
        match serde_json::from_str::<Value>(spec) {
            Ok(Value::Object(m)) => root = m,
            _ => return Err(JobError::Invalid(vec!["spec: must be a JSON object".into()])),
        }
    }
    for (key, raw) in params.iter().filter(|(k, _)| k.as_str() != "spec") {
        let value = serde_json::from_str(raw).unwrap_or_else(|_| Value::String(raw.clone()));
        let mut at = &mut root;
        let parts: Vec<&str> = key.split('.').collect();
        for part in &parts[..parts.len() - 1] {
            let entry = at.entry(part.to_string()).or_insert_with(|| Value::Object(Default::default()));
            at = match entry {
                Value::Object(m) => m,
                _ => return Err(JobError::Invalid(vec![format!("{key}: {part} is not an object")])),
            };
        }
        at.insert(parts[parts.len() - 1].to_owned(), value);
    }
    root.insert("task".into(), Value::String(task.to_owned()));
    parse_task(Value::Object(root))
}

pub fn parse_task(value: Value) -> Result<Task, JobError> {
    let task: Task = serde_json::from_value(value).map_err(|e| JobError::Invalid(vec![e.to_string()]))?;
    task.validate()?;
    Ok(task)
}

impl Task {
    /// Every problem with the spec that can be seen without touching data.
    pub fn validate(&self) -> Result<(), JobError> {
        let mut errors = Vec::new();
        match self {
            Task::TrainClassifier(t) => t.validate(&mut errors),
            Task::SearchHyperparameters(s) => {
                s.base.validate(&mut errors);
                errors.extend(crate::hpo::validate(&s.space, &s.strategy).into_iter().map(|e| format!("{e}")));
                if s.base.split.val <= 0.0 {
                    errors.push("base.split.val: the search scores trials on the validation split; give it a share".into());
                }
            }
            Task::Infer(Infer { batch_size, .. }) | Task::Embed(Embed { batch_size, .. }) if *batch_size == 0 || *batch_size > 4096 => {
                errors.push("batch_size: between 1 and 4096".into())
            }
            Task::PreAnnotate(a) => {
                if !(0.0..=1.0).contains(&a.review_below) {
                    errors.push("review_below: within 0..=1".into());
                }
                if a.formats.is_empty() {
                    errors.push("formats: at least one of coco, voc, yolo".into());
                }
                if let DetectorSpec::Mtcnn { config, .. } = &a.detector {
                    if !(12.0..=10_000.0).contains(&config.min_face_size) {
                        errors.push("detector.config.min_face_size: between 12 and 10000 pixels".into());
                    }
                    if !(0.1..=0.95).contains(&config.factor) {
                        errors.push("detector.config.factor: between 0.1 and 0.95".into());
                    }
                    if config.thresholds.iter().any(|t| !(0.0..=1.0).contains(t)) {
                        errors.push("detector.config.thresholds: each within 0..=1".into());
                    }
                }
                if let DetectorSpec::Torchscript { classes, post, .. } = &a.detector {
                    if classes.is_empty() {
                        errors.push("detector.classes: name the model's classes".into());
                    }
                    for k in post.keep.iter().flatten().filter(|k| !classes.contains(k)) {
                        errors.push(format!("detector.post.keep: {k} is not one of the classes"));
                    }
                    if !(0.0..=1.0).contains(&post.iou) {
                        errors.push("detector.post.iou: within 0..=1".into());
                    }
                }
            }
            Task::PrepareDataset(p) => errors.extend(p.split.validate().into_iter().map(|e| format!("split.{e}"))),
            Task::ExtractFrames(f) => {
                match f.sampling {
                    FrameSampling::EveryNth { n: 0 } => errors.push("sampling.n: at least 1".into()),
                    FrameSampling::Fps { fps } if !(fps > 0.0 && fps <= 240.0) => errors.push("sampling.fps: above 0, at most 240".into()),
                    _ => {}
                }
                if f.max_frames.is_some_and(|m| m == 0 || m > 1_000_000) {
                    errors.push("max_frames: between 1 and 1000000".into());
                }
            }
            _ => {}
        }
        if errors.is_empty() {
            Ok(())
        } else {
            Err(JobError::Invalid(errors))
        }
    }

    /// Runs the task; `progress` gets one JSON object per event (the binary prints them as
    /// JSON lines, which the agent relays). Returns the summary.
    pub fn run(&self, env: &JobEnv, progress: &mut dyn FnMut(Value)) -> Result<Value, JobError> {
        match self {
            Task::PrepareDataset(t) => t.run(env, progress),
            Task::ExtractFrames(t) => t.run(env),
            Task::TrainClassifier(t) => t.run(env, progress),
            Task::SearchHyperparameters(t) => t.run(env, progress),
            Task::Infer(t) => t.run(env, progress),
            Task::Serve(t) => t.run(env, progress),
            Task::PreAnnotate(t) => t.run(env, progress),
            Task::Embed(t) => t.run(env, progress),
        }
    }
}

fn default_split() -> SplitSpec {
    SplitSpec { train: 0.8, val: 0.1, test: 0.1, method: SplitMethod::Stratified, seed: 0 }
}

/// Imports a folder, or an archive of one (`.tar`, `.tar.gz`, `.tgz`: how a dataset arrives
/// from the artifact store as a job input). An archive is unpacked into a temporary folder
/// (entries escaping it are refused by `tar`); when it holds a single top-level folder, that
/// folder is the root, so `tar czf digits.tgz digits/` and `tar czf digits.tgz -C digits .`
/// give the same names and labels.
fn import(path: &Path, labels: bool, progress: &mut dyn FnMut(Value)) -> Result<IntakeReport, JobError> {
    let name = path.file_name().and_then(|n| n.to_str()).unwrap_or_default();
    let gz = name.ends_with(".tar.gz") || name.ends_with(".tgz");
    if !(path.is_file() && (gz || name.ends_with(".tar"))) {
        return import_folder(path, labels, progress);
    }
    let fail = |e: std::io::Error| JobError::Failed(format!("{}: {e}", path.display()));
    let scratch = tempfile::Builder::new().prefix("suanli-data-").tempdir().map_err(fail)?;
    let file = std::fs::File::open(path).map_err(fail)?;
    let reader: Box<dyn std::io::Read> = if gz { Box::new(flate2::read::GzDecoder::new(file)) } else { Box::new(file) };
    let mut archive = tar::Archive::new(reader);
    let (mut bytes, mut count, mut skipped) = (0u64, 0u64, 0u64);
    for entry in archive.entries().map_err(fail)? {
        let mut entry = entry.map_err(fail)?;
        // Only folders and regular files: a link could point the import at any file the
        // lease's account can read.
        match entry.header().entry_type() {
            tar::EntryType::Regular | tar::EntryType::Directory => {}
            _ => {
                skipped += 1;
                continue;
            }
        }
        count += 1;
        bytes += entry.header().size().map_err(fail)?;
        if count > ARCHIVE_MAX_ENTRIES || bytes > ARCHIVE_MAX_BYTES {
            return Err(JobError::Failed(format!("{}: more than {ARCHIVE_MAX_ENTRIES} entries or {ARCHIVE_MAX_BYTES} bytes unpacked", path.display())));
        }
        entry.unpack_in(scratch.path()).map_err(fail)?;
    }
    if skipped > 0 {
        progress(json!({"event": "skipped_entries", "archive": name, "count": skipped, "reason": "not a regular file or folder"}));
    }
    let entries: Vec<std::fs::DirEntry> = std::fs::read_dir(scratch.path()).map_err(fail)?.filter_map(Result::ok).collect();
    let root = match entries.as_slice() {
        [only] if only.file_type().is_ok_and(|t| t.is_dir()) => only.path(),
        _ => scratch.path().to_owned(),
    };
    progress(json!({"event": "unpacked", "archive": name}));
    import_folder(&root, labels, progress)
}

/// What one archive may unpack to (a guard against decompression bombs in the temp folder).
const ARCHIVE_MAX_BYTES: u64 = 64 << 30;
const ARCHIVE_MAX_ENTRIES: u64 = 10_000_000;

fn import_folder(dir: &Path, labels: bool, progress: &mut dyn FnMut(Value)) -> Result<IntakeReport, JobError> {
    let report = import_dir(dir, &IntakeOptions { labels_from_subdirs: labels, ..Default::default() })
        .map_err(|e| JobError::Failed(format!("{}: {e}", dir.display())))?;
    for r in &report.rejected {
        progress(json!({"event": "rejected", "name": r.name, "reason": r.reason, "kind": r.kind}));
    }
    progress(json!({"event": "imported", "images": report.images.len(), "rejected": report.rejected.len(), "duplicates": report.duplicates.len()}));
    Ok(report)
}

// ---- prepare_dataset ----

/// Imports a folder into a versioned dataset (a new version when the folder changed since
/// the manifest in `output` was written) and splits it.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PrepareDataset {
    pub name: String,
    pub input: PathBuf,
    #[serde(default = "yes")]
    pub labels_from_subdirs: bool,
    #[serde(default = "default_split")]
    pub split: SplitSpec,
    #[serde(default)]
    pub note: String,
    #[serde(default)]
    pub output: Option<PathBuf>,
}

fn yes() -> bool {
    true
}

impl PrepareDataset {
    fn run(&self, env: &JobEnv, progress: &mut dyn FnMut(Value)) -> Result<Value, JobError> {
        let report = import(&env.input(&self.input), self.labels_from_subdirs, progress)?;
        let out = env.output(self.output.as_deref())?;
        let items = crate::dataset::items_from_intake(&report);
        let mut dataset = match Dataset::load(&out) {
            Ok(d) => d,
            Err(_) => Dataset::create(self.name.clone(), items.clone()).map_err(JobError::failed)?,
        };
        let version = dataset.commit(items, self.note.clone()).map_err(JobError::failed)?.clone();
        dataset.save(&out).map_err(JobError::failed)?;
        let split = version.split(&self.split).map_err(JobError::failed)?;
        write_json(&out.join("split.json"), &split)?;
        write_json(&out.join("rejected.json"), &report.rejected)?;
        Ok(json!({"dataset": self.name, "version": version.number, "id": version.id, "changes": version.changes, "sizes": split.sizes()}))
    }
}

// ---- extract_frames ----

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExtractFrames {
    pub video: PathBuf,
    pub sampling: FrameSampling,
    #[serde(default)]
    pub max_frames: Option<u32>,
    #[serde(default)]
    pub output: Option<PathBuf>,
}

impl ExtractFrames {
    fn run(&self, env: &JobEnv) -> Result<Value, JobError> {
        let out = env.output(self.output.as_deref())?;
        let options = FrameOptions { sampling: self.sampling.clone(), max_frames: self.max_frames };
        let frames = crate::intake::extract_frames(env.input(&self.video), &options, &out).map_err(JobError::failed)?;
        Ok(json!({"frames": frames.len(), "output": out}))
    }
}

// ---- train_classifier ----

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrainClassifier {
    /// A folder with one sub-folder of images per class, or a `.tar`/`.tar.gz` of one.
    pub data: PathBuf,
    #[serde(default = "default_split")]
    pub split: SplitSpec,
    /// Deterministic steps for every image (resize, grayscale, normalize …).
    #[serde(default)]
    pub preprocess: Vec<Step>,
    /// Random steps for training batches only (flips, rotations, noise …).
    #[serde(default)]
    pub augment: Vec<Step>,
    pub training: TrainConfig,
    #[serde(default)]
    pub device: DevicePreference,
    /// Data-parallel replicas on CPU; on CUDA every visible card is used.
    #[serde(default = "one")]
    pub replicas: usize,
    #[serde(default)]
    pub output: Option<PathBuf>,
}

fn one() -> usize {
    1
}

impl TrainClassifier {
    fn validate(&self, errors: &mut Vec<String>) {
        errors.extend(self.split.validate().into_iter().map(|e| format!("split.{e}")));
        errors.extend(crate::preprocess::validate(&self.preprocess).into_iter().map(|e| format!("preprocess.{e}")));
        errors.extend(crate::preprocess::validate(&self.augment).into_iter().map(|e| format!("augment.{e}")));
        if let Err(super::train::TrainError::Invalid(e)) = self.training.validate() {
            errors.extend(e.into_iter().map(|e| format!("training.{e}")));
        }
        if !(1..=64).contains(&self.replicas) {
            errors.push("replicas: between 1 and 64".into());
        }
        if self.split.train.is_nan() || self.split.train <= 0.0 {
            errors.push("split.train: must be above 0 to have anything to train on".into());
        }
    }

    fn run(&self, env: &JobEnv, progress: &mut dyn FnMut(Value)) -> Result<Value, JobError> {
        let data = LabelledData::load(self, env, progress)?;
        let devices = device::select(self.device, self.replicas).map_err(JobError::failed)?;
        let mut trainer = Trainer::new(self.training.clone(), &devices, data.train.shape(), data.classes.len() as i64).map_err(JobError::failed)?;
        let mut emit = |p: Progress| progress(serde_json::to_value(&p).unwrap_or(Value::Null));
        if let Some(resume) = &env.resume_from {
            trainer.resume(resume, &mut emit).map_err(JobError::failed)?;
        }
        let augment_fn = |img: &crate::Image, rng: &mut rand_chacha::ChaCha8Rng| data.augment.apply(img.clone(), rng).map_err(|e| e.to_string());
        let outcome = trainer
            .fit(&data.train, Some(&data.val), (!self.augment.is_empty()).then_some(&augment_fn as _), env.checkpoint.as_deref(), &mut emit)
            .map_err(JobError::failed)?;
        let eval = if data.test.is_empty() { &data.val } else { &data.test };
        let report = trainer.evaluate(eval).map_err(JobError::failed)?.report();
        let out = env.output(self.output.as_deref())?;
        trainer.save_weights(&out.join(WEIGHTS_FILE)).map_err(JobError::failed)?;
        let card = ModelCard {
            model: Some(self.training.model.clone()),
            classes: data.classes.clone(),
            input: data.train.shape(),
            preprocess: self.preprocess.clone(),
            dataset_version: Some(data.version.clone()),
            test_metrics: Some(report.clone()),
        };
        write_json(&out.join(CARD_FILE), &card)?;
        write_json(&out.join("metrics.json"), &report)?;
        Ok(json!({
            "accuracy": report.accuracy, "macro_f1": report.macro_f1, "steps": outcome.steps,
            "epoch_seconds": outcome.epoch_seconds, "dataset_version": data.version, "output": out,
            "parameters": super::models::parameter_count(trainer.var_store()), "devices": devices.iter().map(|d| format!("{d:?}")).collect::<Vec<_>>(),
        }))
    }
}

/// A class-per-folder image set, imported, versioned, split and preprocessed, with the
/// job's augmentation checked against it.
pub struct LabelledData {
    pub classes: Vec<String>,
    pub augment: Pipeline,
    pub version: String,
    pub train: Samples,
    pub val: Samples,
    pub test: Samples,
}

impl LabelledData {
    pub fn load(job: &TrainClassifier, env: &JobEnv, progress: &mut dyn FnMut(Value)) -> Result<Self, JobError> {
        let report = import(&env.input(&job.data), true, progress)?;
        let pipeline = Pipeline::build(&job.preprocess, &Registry::new()).map_err(JobError::failed)?;
        if pipeline.is_random() {
            return Err(JobError::Invalid(vec!["preprocess: has random steps; they belong under augment".into()]));
        }
        let dataset = Dataset::from_intake("training", &report).map_err(JobError::failed)?;
        let version = dataset.latest();
        let split = version.split(&job.split).map_err(JobError::failed)?;
        let classes: Vec<String> = version.label_counts().into_keys().flatten().map(str::to_owned).collect();
        if classes.len() < 2 {
            return Err(JobError::Failed(format!("{}: needs at least two class folders, found {}", job.data.display(), classes.len())));
        }
        if let Some(stray) = version.items.iter().find(|i| i.label.is_none()) {
            return Err(JobError::Failed(format!("{}: {} is not in a class folder; a training set has one folder per class", job.data.display(), stray.name)));
        }
        let by_name: HashMap<&str, &LoadedImage> = report.images.iter().map(|i| (i.name.as_str(), i)).collect();
        let index: HashMap<&str, i64> = classes.iter().enumerate().map(|(i, c)| (c.as_str(), i as i64)).collect();
        let samples = |items: &[Item]| -> Result<Samples, JobError> {
            let (mut names, mut images, mut labels) = (Vec::new(), Vec::new(), Vec::new());
            for (n, item) in items.iter().enumerate() {
                let img = by_name[item.name.as_str()];
                let mut rng = crate::preprocess::item_rng(0, n as u64);
                images.push(pipeline.apply(img.image.clone(), &mut rng).map_err(|e| JobError::Failed(format!("{}: {e}", item.name)))?);
                names.push(item.name.clone());
                labels.push(item.label.as_deref().map_or(0, |l| index[l]));
            }
            if names.is_empty() {
                return Ok(Samples::empty());
            }
            Samples::new(names, images, labels).map_err(JobError::failed)
        };
        let (train, val, test) = (samples(&split.train)?, samples(&split.val)?, samples(&split.test)?);
        drop(index);
        if train.is_empty() {
            return Err(JobError::Failed(format!("the split leaves no training images out of {}", version.items.len())));
        }
        // Augmentation must keep the shape the network is built for; find out now, not at
        // some step of epoch 3.
        let augment = Pipeline::build(&job.augment, &Registry::new()).map_err(JobError::failed)?;
        let probe = augment.apply(train.images[0].clone(), &mut crate::preprocess::item_rng(0, 0)).map_err(|e| JobError::Failed(format!("augment: {e}")))?;
        let shape = [i64::from(probe.channels), i64::from(probe.height), i64::from(probe.width)];
        if shape != train.shape() {
            return Err(JobError::Invalid(vec![format!(
                "augment: turns {:?} images into {shape:?} (channels, height, width); augmentation must keep the shape (resize, crop and grayscale belong under preprocess)",
                train.shape()
            )]));
        }
        Ok(LabelledData { classes, augment, version: version.id.clone(), train, val, test })
    }
}

// ---- search_hyperparameters ----

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SearchHyperparameters {
    /// The training job whose learning rate, batch size and epochs are searched.
    pub base: TrainClassifier,
    pub space: SearchSpace,
    pub strategy: Strategy,
    #[serde(default)]
    pub seed: u64,
}

impl SearchHyperparameters {
    fn run(&self, env: &JobEnv, progress: &mut dyn FnMut(Value)) -> Result<Value, JobError> {
        let data = LabelledData::load(&self.base, env, progress)?;
        let devices = device::select(self.base.device, self.base.replicas).map_err(JobError::failed)?;
        let classes = data.classes.len() as i64;
        let report = crate::hpo::search(&self.space, &self.strategy, self.seed, |trial, params| {
            let mut cfg = self.base.training.clone();
            cfg.optimizer = cfg.optimizer.with_lr(params.lr);
            cfg.batch_size = params.batch_size;
            cfg.epochs = params.epochs;
            let mut trainer = Trainer::new(cfg, &devices, data.train.shape(), classes)?;
            trainer.fit(&data.train, None, None, None, &mut |_| {})?;
            let cm = trainer.evaluate(&data.val)?;
            let metrics = json!({"val_accuracy": cm.accuracy(), "val_macro_f1": cm.macro_f1()});
            progress(json!({"event": "trial", "trial": trial, "params": params, "metrics": metrics}));
            Ok::<_, super::train::TrainError>(crate::hpo::Objective { score: cm.accuracy(), metrics })
        })
        .map_err(JobError::failed)?;
        let out = env.output(self.base.output.as_deref())?;
        write_json(&out.join("hpo.json"), &report)?;
        Ok(json!({"best": report.best, "trials": report.trials.len()}))
    }
}

// ---- infer ----

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Infer {
    /// A model directory (`model.json` with `model.safetensors` or a TorchScript `model.pt`).
    pub model: PathBuf,
    /// A folder of images (searched recursively).
    pub input: PathBuf,
    #[serde(default = "three")]
    pub top_k: usize,
    #[serde(default = "sixty_four")]
    pub batch_size: usize,
    #[serde(default)]
    pub device: DevicePreference,
    #[serde(default)]
    pub output: Option<PathBuf>,
}

fn three() -> usize {
    3
}
fn sixty_four() -> usize {
    64
}

fn first_device(pref: DevicePreference) -> Result<Device, JobError> {
    Ok(device::select(pref, 1).map_err(JobError::failed)?[0])
}

impl Infer {
    fn run(&self, env: &JobEnv, progress: &mut dyn FnMut(Value)) -> Result<Value, JobError> {
        let model = Classifier::load(&env.input(&self.model), first_device(self.device)?).map_err(JobError::failed)?;
        let report = import(&env.input(&self.input), false, progress)?;
        let mut results = Vec::with_capacity(report.images.len());
        let started = std::time::Instant::now();
        for chunk in report.images.chunks(self.batch_size) {
            let batch: Vec<(&str, &crate::Image)> = chunk.iter().map(|i| (i.name.as_str(), &i.image)).collect();
            for (img, p) in chunk.iter().zip(model.classify(&batch, self.top_k).map_err(JobError::failed)?) {
                results.push(json!({"name": img.name, "sha256": img.sha256, "class": p.class, "score": p.score, "top": p.top}));
            }
            progress(json!({"event": "progress", "done": results.len(), "total": report.images.len()}));
        }
        let seconds = started.elapsed().as_secs_f64();
        let out = env.output(self.output.as_deref())?;
        write_json(&out.join("predictions.json"), &json!({"predictions": results, "rejected": report.rejected}))?;
        Ok(json!({"images": results.len(), "rejected": report.rejected.len(), "images_per_s": results.len() as f64 / seconds.max(1e-9), "output": out}))
    }
}

// ---- embed ----

/// Feature vectors for similar-image search, in the format of [`crate::embeddings`].
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Embed {
    /// A model directory; its features before the last layer are the vectors ([`Embedder`]).
    pub model: PathBuf,
    /// A folder of images (searched recursively), or a `.tar`/`.tar.gz` of one.
    pub input: PathBuf,
    #[serde(default = "sixty_four")]
    pub batch_size: usize,
    #[serde(default)]
    pub device: DevicePreference,
    #[serde(default)]
    pub output: Option<PathBuf>,
}

impl Embed {
    fn run(&self, env: &JobEnv, progress: &mut dyn FnMut(Value)) -> Result<Value, JobError> {
        let embedder = Embedder::load(&env.input(&self.model), first_device(self.device)?).map_err(JobError::failed)?;
        let report = import(&env.input(&self.input), false, progress)?;
        let started = std::time::Instant::now();
        let mut vectors = Vec::with_capacity(report.images.len());
        for chunk in report.images.chunks(self.batch_size) {
            let batch: Vec<(&str, &crate::Image)> = chunk.iter().map(|i| (i.name.as_str(), &i.image)).collect();
            vectors.extend(embedder.embed(&batch).map_err(JobError::failed)?);
            progress(json!({"event": "progress", "done": vectors.len(), "total": report.images.len()}));
        }
        let seconds = started.elapsed().as_secs_f64();
        let items = report.images.iter().map(|i| crate::embeddings::EmbeddedItem { name: i.name.clone(), sha256: i.sha256.clone() }).collect();
        let out = env.output(self.output.as_deref())?;
        crate::embeddings::write(&out, embedder.version(), embedder.dim() as u32, items, &vectors).map_err(JobError::failed)?;
        write_json(&out.join("rejected.json"), &report.rejected)?;
        Ok(json!({"images": vectors.len(), "rejected": report.rejected.len(), "model": embedder.version(), "dim": embedder.dim(),
                  "images_per_s": vectors.len() as f64 / seconds.max(1e-9), "output": out}))
    }
}

// ---- serve ----

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Serve {
    pub model: PathBuf,
    /// A TCP address, or `unix:<path>` for a Unix socket (a lease's service).
    #[serde(default = "default_listen")]
    pub listen: String,
    #[serde(default)]
    pub top_k: Option<usize>,
    #[serde(default)]
    pub device: DevicePreference,
    #[serde(default)]
    pub config: Option<crate::serve::ServeConfig>,
    /// `classify` (the default) answers classes; `embed` answers search vectors
    /// (`{"model": version, "vector": [...]}`), the service image search embeds queries with.
    #[serde(default)]
    pub mode: ServeMode,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ServeMode {
    #[default]
    Classify,
    Embed,
}

fn default_listen() -> String {
    "127.0.0.1:8500".into()
}

/// A classifier answering the inference service's batches.
pub struct ClassifierService {
    pub model: Classifier,
    pub top_k: usize,
}

impl crate::serve::BatchPredictor for ClassifierService {
    fn predict_batch(&mut self, images: Vec<crate::Image>) -> Result<Vec<Value>, String> {
        let names: Vec<String> = (0..images.len()).map(|i| format!("request image {i}")).collect();
        let batch: Vec<(&str, &crate::Image)> = names.iter().map(String::as_str).zip(images.iter()).collect();
        let predictions = self.model.classify(&batch, self.top_k).map_err(|e| e.to_string())?;
        Ok(predictions.into_iter().map(|p| serde_json::to_value(p).unwrap_or(Value::Null)).collect())
    }

    fn describe(&self) -> Value {
        json!({"classes": self.model.card.classes, "input": self.model.card.input, "model": self.model.card.model, "device": format!("{:?}", self.model.device())})
    }
}

/// An embedder answering the inference service's batches with search vectors.
pub struct EmbedderService {
    pub embedder: Embedder,
}

impl crate::serve::BatchPredictor for EmbedderService {
    fn predict_batch(&mut self, images: Vec<crate::Image>) -> Result<Vec<Value>, String> {
        let names: Vec<String> = (0..images.len()).map(|i| format!("request image {i}")).collect();
        let batch: Vec<(&str, &crate::Image)> = names.iter().map(String::as_str).zip(images.iter()).collect();
        let vectors = self.embedder.embed(&batch).map_err(|e| e.to_string())?;
        Ok(vectors.into_iter().map(|v| json!({"model": self.embedder.version(), "vector": v})).collect())
    }

    fn describe(&self) -> Value {
        json!({"mode": "embed", "model": self.embedder.version(), "dim": self.embedder.dim(), "device": format!("{:?}", self.embedder.device())})
    }
}

impl Serve {
    fn run(&self, env: &JobEnv, progress: &mut dyn FnMut(Value)) -> Result<Value, JobError> {
        let device = first_device(self.device)?;
        let service: Box<dyn crate::serve::BatchPredictor> = match self.mode {
            ServeMode::Classify => {
                let model = Classifier::load(&env.input(&self.model), device).map_err(JobError::failed)?;
                Box::new(ClassifierService { model, top_k: self.top_k.unwrap_or(3) })
            }
            ServeMode::Embed => Box::new(EmbedderService { embedder: Embedder::load(&env.input(&self.model), device).map_err(JobError::failed)? }),
        };
        let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build().map_err(JobError::failed)?;
        runtime.block_on(async {
            let listener = crate::serve::Listener::bind(&self.listen).await.map_err(|e| JobError::Failed(format!("{}: {e}", self.listen)))?;
            let config = crate::serve::ServeConfig {
                bearer_token: std::env::var("SUANLI_SERVE_TOKEN").ok().filter(|t| !t.is_empty()),
                ..self.config.clone().unwrap_or_default()
            };
            let server = crate::serve::serve(listener, service, config).await.map_err(JobError::failed)?;
            match server.bound() {
                crate::serve::Bound::Tcp(addr) => progress(json!({"event": "serving", "url": format!("http://{addr}/v1/predict")})),
                crate::serve::Bound::Unix(path) => progress(json!({"event": "serving", "socket": path})),
            }
            // SIGINT by hand, SIGTERM from the agent ending the job.
            let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).map_err(JobError::failed)?;
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = term.recv() => {}
            }
            let stats = server.stats();
            server.shutdown().await.map_err(JobError::failed)?;
            Ok(json!({"stats": stats}))
        })
    }
}

// ---- pre_annotate ----

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum DetectorSpec {
    /// The MTCNN face detector; `weights` holds its three safetensors files.
    Mtcnn {
        weights: PathBuf,
        #[serde(default)]
        config: MtcnnConfig,
    },
    /// Any detector exported as TorchScript that maps a `1×3×H×W` image (RGB, 0..1) to
    /// `N×6` rows `x1, y1, x2, y2, score, class` in input pixels; its rows are filtered by
    /// score and class and then go through per-class NMS.
    Torchscript {
        model: PathBuf,
        /// Names of the model's class ids, in order.
        classes: Vec<String>,
        #[serde(default)]
        post: PostProcess,
    },
}

/// Detection post-processing (SPEC §6): score threshold, class filter, per-class NMS.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PostProcess {
    pub min_score: f32,
    pub iou: f32,
    /// Keep only these classes (names); all when absent.
    pub keep: Option<Vec<String>>,
}

impl Default for PostProcess {
    fn default() -> Self {
        PostProcess { min_score: 0.5, iou: 0.5, keep: None }
    }
}

/// A loaded detector: boxes with scores and class names for an RGB image.
pub enum Detector {
    Mtcnn(Box<Mtcnn>),
    Torchscript { module: tch::CModule, classes: Vec<String>, post: PostProcess, keep_ids: Option<Vec<u32>>, device: Device },
}

impl Detector {
    pub fn load(spec: &DetectorSpec, env: &JobEnv, device: Device) -> Result<Self, JobError> {
        Ok(match spec {
            DetectorSpec::Mtcnn { weights, config } => {
                Detector::Mtcnn(Box::new(Mtcnn::load(&env.input(weights), device, config.clone()).map_err(JobError::failed)?))
            }
            DetectorSpec::Torchscript { model, classes, post } => {
                let path = env.input(model);
                let mut module = tch::CModule::load_on_device(&path, device).map_err(|e| JobError::Failed(format!("{}: {e}", path.display())))?;
                module.set_eval();
                let keep_ids = match &post.keep {
                    None => None,
                    Some(names) => Some(
                        names
                            .iter()
                            .map(|n| {
                                classes
                                    .iter()
                                    .position(|c| c == n)
                                    .map(|i| i as u32)
                                    .ok_or_else(|| JobError::Invalid(vec![format!("detector.post.keep: {n} is not one of the classes")]))
                            })
                            .collect::<Result<Vec<_>, _>>()?,
                    ),
                };
                Detector::Torchscript { module, classes: classes.clone(), post: post.clone(), keep_ids, device }
            }
        })
    }

    pub fn detect(&self, img: &crate::Image) -> Result<Vec<(crate::nms::Detection, String)>, JobError> {
        match self {
            Detector::Mtcnn(m) => Ok(m
                .detect(img)
                .map_err(JobError::failed)?
                .into_iter()
                .map(|f| (crate::nms::Detection { x1: f.x1, y1: f.y1, x2: f.x2, y2: f.y2, score: f.score, class: 0 }, "face".to_owned()))
                .collect()),
            Detector::Torchscript { module, classes, post, keep_ids, device } => {
                let x = super::data::images_to_tensor([("image", img)]).map_err(JobError::failed)?.to_device(*device);
                let rows = tch::no_grad(|| module.forward_ts(&[x])).map_err(JobError::failed)?.to_device(Device::Cpu).to_kind(tch::Kind::Float);
                if rows.dim() != 2 || rows.size()[1] != 6 {
                    return Err(JobError::Failed(format!("the detector answered {:?}; expected N×6 rows", rows.size())));
                }
                let flat: Vec<f32> = rows.flatten(0, -1).try_into().map_err(JobError::failed)?;
                let mut dets = Vec::with_capacity(flat.len() / 6);
                for r in flat.chunks_exact(6) {
                    let class = r[5].round();
                    if !class.is_finite() || class < 0.0 || class as usize >= classes.len() {
                        return Err(JobError::Failed(format!("the detector gave class id {class}; it has {} classes", classes.len())));
                    }
                    // Rows that are not a box (not finite, no area) are dropped; corners ordered.
                    if r[..5].iter().all(|v| v.is_finite()) && r[0] != r[2] && r[1] != r[3] {
                        let score = r[4].clamp(0.0, 1.0);
                        dets.push(crate::nms::Detection {
                            x1: r[0].min(r[2]),
                            y1: r[1].min(r[3]),
                            x2: r[0].max(r[2]),
                            y2: r[1].max(r[3]),
                            score,
                            class: class as u32,
                        });
                    }
                }
                let kept = crate::nms::filter(&dets, post.min_score, keep_ids.as_deref());
                Ok(crate::nms::batched_nms(&kept, post.iou).into_iter().map(|i| (kept[i], classes[kept[i].class as usize].clone())).collect())
            }
        }
    }

    fn categories(&self) -> Vec<String> {
        match self {
            Detector::Mtcnn(_) => vec!["face".into()],
            Detector::Torchscript { classes, .. } => classes.clone(),
        }
    }
}

/// Model-assisted annotation: run a detector over a folder and write its boxes, with
/// confidences, in the chosen formats; boxes below `review_below` go to `review.json` for a
/// person to check.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PreAnnotate {
    pub input: PathBuf,
    pub detector: DetectorSpec,
    #[serde(default = "coco_only")]
    pub formats: Vec<Format>,
    #[serde(default = "default_review")]
    pub review_below: f32,
    #[serde(default)]
    pub device: DevicePreference,
    #[serde(default)]
    pub output: Option<PathBuf>,
}

fn coco_only() -> Vec<Format> {
    vec![Format::Coco]
}
fn default_review() -> f32 {
    0.9
}

/// An item a person should look at, and why.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ReviewItem {
    pub file_name: String,
    /// Index of the object in the image's list, or `None` for an image with no detection.
    pub object: Option<usize>,
    pub score: Option<f32>,
    pub reason: String,
}

impl PreAnnotate {
    fn run(&self, env: &JobEnv, progress: &mut dyn FnMut(Value)) -> Result<Value, JobError> {
        let detector = Detector::load(&self.detector, env, first_device(self.device)?)?;
        let report = import(&env.input(&self.input), false, progress)?;
        // VOC and YOLO name each image's file by its stem: find clashes before detecting.
        if self.formats.iter().any(|f| *f != Format::Coco) {
            let mut seen: HashMap<String, &str> = HashMap::new();
            for img in &report.images {
                let stem = Path::new(&img.name).file_stem().and_then(|s| s.to_str()).unwrap_or(&img.name).to_owned();
                if let Some(first) = seen.insert(stem.clone(), &img.name) {
                    return Err(JobError::Failed(format!(
                        "{first} and {} would both be written as {stem}.* in VOC/YOLO; rename one or ask for COCO only",
                        img.name
                    )));
                }
            }
        }
        let mut set = AnnotationSet { categories: detector.categories(), images: Vec::new() };
        let mut review = Vec::new();
        for (n, img) in report.images.iter().enumerate() {
            let rgb = if img.image.channels == 3 {
                img.image.clone()
            } else {
                crate::Image::from_dynamic(&::image::DynamicImage::ImageRgb8(img.image.to_dynamic().to_rgb8()))
            };
            let found = detector.detect(&rgb)?;
            let (w, h) = (img.image.width as f32, img.image.height as f32);
            let objects: Vec<Object> = found
                .iter()
                .map(|(f, category)| {
                    // Detector boxes may overhang the photo; annotations stay inside it.
                    let (x1, y1) = (f.x1.clamp(0.0, w), f.y1.clamp(0.0, h));
                    let (x2, y2) = (f.x2.clamp(0.0, w), f.y2.clamp(0.0, h));
                    Object { category: category.clone(), shape: Shape::Box { x: x1, y: y1, w: x2 - x1, h: y2 - y1 }, score: Some(f.score) }
                })
                .collect();
            for (i, o) in objects.iter().enumerate() {
                if o.score.unwrap_or(0.0) < self.review_below {
                    review.push(ReviewItem {
                        file_name: img.name.clone(),
                        object: Some(i),
                        score: o.score,
                        reason: format!("confidence below {}", self.review_below),
                    });
                }
            }
            set.images.push(AnnotatedImage { file_name: img.name.clone(), width: img.image.width, height: img.image.height, objects });
            progress(json!({"event": "progress", "done": n + 1, "total": report.images.len(), "objects": found.len()}));
        }
        let out = env.output(self.output.as_deref())?;
        for format in &self.formats {
            let dir = out.join(format!("{format:?}").to_lowercase());
            set.write_dir(*format, &dir).map_err(|e| JobError::Failed(format!("{}: {e}", dir.display())))?;
        }
        write_json(&out.join("review.json"), &review)?;
        let objects: usize = set.images.iter().map(|i| i.objects.len()).sum();
        Ok(json!({"images": set.images.len(), "objects": objects, "review": review.len(), "rejected": report.rejected.len(), "output": out}))
    }
}

fn write_json(path: &Path, value: &impl Serialize) -> Result<(), JobError> {
    let bytes = serde_json::to_vec_pretty(value).map_err(JobError::failed)?;
    std::fs::write(path, bytes).map_err(|e| JobError::Failed(format!("{}: {e}", path.display())))
}

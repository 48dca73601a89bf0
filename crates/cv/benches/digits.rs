//! Our side of the digits benchmark (`crates/cv/bench/digits.sh` runs it beside PyTorch):
//! trains the small CNN on the UCI digits with tch, measures seconds per epoch and test
//! accuracy, then inference throughput at batch 1 and 64 through the inference path
//! (`Classifier`). Prints one JSON object; writes the split it used so the Python side
//! trains and tests on exactly the same images.
//!
//!   cargo bench -p suanli-cv --features torch --bench digits -- DATA_DIR SPLIT_OUT [THREADS]

use std::path::PathBuf;
use std::time::Instant;

use serde_json::json;
use suanli_cv::dataset::{Dataset, SplitMethod, SplitSpec};
use suanli_cv::intake::{import_dir, IntakeOptions};
use suanli_cv::torch::classifier::{Classifier, ModelCard, CARD_FILE, WEIGHTS_FILE};
use suanli_cv::torch::data::Samples;
use suanli_cv::torch::models::ModelSpec;
use suanli_cv::torch::optim::{OptimizerSpec, Schedule};
use suanli_cv::torch::train::{TrainConfig, Trainer};
use tch::{Device, Tensor};

/// The settings the Python side mirrors (bench_digits.py reads them from our output).
fn config() -> TrainConfig {
    TrainConfig {
        model: ModelSpec::SmallCnn { width: 32 },
        optimizer: OptimizerSpec::Adam { lr: 2e-3, beta1: 0.9, beta2: 0.999, eps: 1e-8, weight_decay: 0.0 },
        schedule: Schedule::Cosine { min_lr: 0.0 },
        epochs: 12,
        batch_size: 32,
        seed: 3,
        checkpoint_every_steps: 0,
    }
}

/// Images per second: the best of five rounds of `seconds / 5` each (a shared 2-core machine
/// only ever slows a round down), `per_call` images per `run`. bench_digits.py measures alike.
fn throughput(per_call: usize, seconds: f64, mut run: impl FnMut()) -> f64 {
    for _ in 0..20 {
        run();
    }
    let mut best = 0.0f64;
    for _ in 0..5 {
        let start = Instant::now();
        let mut calls = 0usize;
        while start.elapsed().as_secs_f64() < seconds / 5.0 {
            run();
            calls += 1;
        }
        best = best.max((calls * per_call) as f64 / start.elapsed().as_secs_f64());
    }
    best
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).filter(|a| a != "--bench").collect();
    let data = PathBuf::from(args.first().expect("DATA_DIR (SUANLI_CV_DATA)"));
    let split_out = PathBuf::from(args.get(1).expect("SPLIT_OUT"));
    let threads: i32 = args.get(2).and_then(|t| t.parse().ok()).unwrap_or(2);
    tch::set_num_threads(threads);

    let report = import_dir(data.join("digits/images"), &IntakeOptions { labels_from_subdirs: true, ..Default::default() }).expect("import");
    let dataset = Dataset::from_intake("digits", &report).expect("dataset");
    let split = dataset.latest().split(&SplitSpec { train: 0.8, val: 0.0, test: 0.2, method: SplitMethod::Stratified, seed: 1 }).expect("split");
    std::fs::write(&split_out, serde_json::to_vec(&split).expect("json")).expect("write split");
    let by_name: std::collections::HashMap<_, _> = report.images.iter().map(|i| (i.name.as_str(), i)).collect();
    let samples = |items: &[suanli_cv::dataset::Item]| {
        Samples::new(
            items.iter().map(|i| i.name.clone()).collect(),
            items.iter().map(|i| by_name[i.name.as_str()].image.clone()).collect(),
            items.iter().map(|i| i.label.as_deref().and_then(|l| l.parse().ok()).expect("digit label")).collect(),
        )
        .expect("samples")
    };
    let (train, test) = (samples(&split.train), samples(&split.test));

    let cfg = config();
    let mut trainer = Trainer::new(cfg.clone(), &[Device::Cpu], train.shape(), 10).expect("trainer");
    let outcome = trainer.fit(&train, None, None, None, &mut |_| {}).expect("fit");
    let accuracy = trainer.evaluate(&test).expect("evaluate").accuracy();

    let dir = tempfile::tempdir().expect("tempdir");
    trainer.save_weights(&dir.path().join(WEIGHTS_FILE)).expect("weights");
    let card = ModelCard {
        model: Some(cfg.model.clone()),
        classes: (0..10).map(|d| d.to_string()).collect(),
        input: train.shape(),
        preprocess: vec![],
        dataset_version: None,
        test_metrics: None,
    };
    std::fs::write(dir.path().join(CARD_FILE), serde_json::to_vec(&card).expect("json")).expect("card");
    let model = Classifier::load(dir.path(), Device::Cpu).expect("load");
    let (xs, _) = test.all();
    let n = xs.size()[0];
    let singles: Vec<Tensor> = (0..n).map(|i| xs.narrow(0, i, 1)).collect();
    let batches: Vec<Tensor> = xs.split(64, 0).into_iter().filter(|b| b.size()[0] == 64).collect();
    let (mut i, mut j) = (0usize, 0usize);
    let batch1 = throughput(1, 3.0, || {
        let _ = model.logits(&singles[i % singles.len()]).expect("logits");
        i += 1;
    });
    let batch64 = throughput(64, 3.0, || {
        let _ = model.logits(&batches[j % batches.len()]).expect("logits");
        j += 1;
    });
    // The whole inference path a service pays per image: preprocessing, stacking, softmax, top-k.
    let images: Vec<(&str, &suanli_cv::Image)> = test.names.iter().map(String::as_str).zip(test.images.iter()).collect();
    let mut k = 0usize;
    let classify64 = throughput(64, 3.0, || {
        let start = (k * 64) % (images.len() - 64);
        let _ = model.classify(&images[start..start + 64], 3).expect("classify");
        k += 1;
    });
    println!(
        "{}",
        json!({
            "side": "suanli (tch)", "threads": threads, "epochs": cfg.epochs, "batch_size": cfg.batch_size,
            "train_images": train.len(), "test_images": test.len(), "test_accuracy": accuracy,
            "epoch_seconds": outcome.epoch_seconds,
            "infer_images_per_s_batch1": batch1, "infer_images_per_s_batch64": batch64,
            "classify_images_per_s_batch64": classify64,
        })
    );
}

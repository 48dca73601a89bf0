//! Training on real data (scikit-learn's UCI digits, exported by ops/setup-torch), exact
//! checkpoint resume, and data-parallel gradients. Needs `--features torch` and SUANLI_CV_DATA.
#![cfg(feature = "torch")]

mod support;

use support::data_dir;

use suanli_cv::dataset::{Dataset, SplitMethod, SplitSpec};
use suanli_cv::intake::{import_dir, IntakeOptions};
use suanli_cv::torch::data::Samples;
use suanli_cv::torch::models::ModelSpec;
use suanli_cv::torch::optim::{OptimizerSpec, Schedule};
use suanli_cv::torch::train::{with_seed, TrainConfig, Trainer};
use tch::{Device, Tensor};

/// (train, test) of the digits, split 80/20 stratified with a fixed seed.
fn digits(root: &std::path::Path) -> (Samples, Samples) {
    let report = import_dir(root.join("digits/images"), &IntakeOptions { labels_from_subdirs: true, ..Default::default() }).expect("import");
    assert_eq!(report.images.len(), 1797, "rejected: {:?}", report.rejected);
    let dataset = Dataset::from_intake("digits", &report).expect("dataset");
    let split = dataset.latest().split(&SplitSpec { train: 0.8, val: 0.0, test: 0.2, method: SplitMethod::Stratified, seed: 1 }).expect("split");
    let by_name: std::collections::HashMap<&str, &suanli_cv::intake::LoadedImage> = report.images.iter().map(|i| (i.name.as_str(), i)).collect();
    let samples = |items: &[suanli_cv::dataset::Item]| {
        let imgs: Vec<_> = items.iter().map(|it| by_name[it.name.as_str()]).collect();
        Samples::new(
            imgs.iter().map(|i| i.name.clone()).collect(),
            imgs.iter().map(|i| i.image.clone()).collect(),
            imgs.iter().map(|i| i.label.as_deref().expect("label").parse::<i64>().expect("digit")).collect(),
        )
        .expect("samples")
    };
    (samples(&split.train), samples(&split.test))
}

fn config(epochs: u32) -> TrainConfig {
    TrainConfig {
        model: ModelSpec::SmallCnn { width: 32 },
        optimizer: OptimizerSpec::Adam { lr: 2e-3, beta1: 0.9, beta2: 0.999, eps: 1e-8, weight_decay: 0.0 },
        schedule: Schedule::Cosine { min_lr: 0.0 },
        epochs,
        batch_size: 32,
        seed: 3,
        checkpoint_every_steps: 0,
    }
}

#[test]
fn small_cnn_learns_the_digits() {
    let Some(root) = data_dir() else { return };
    let (train, test) = digits(&root);
    let mut trainer = Trainer::new(config(12), &[Device::Cpu], train.shape(), 10).expect("trainer");
    let mut events = Vec::new();
    let outcome = trainer.fit(&train, Some(&test), None, None, &mut |p| events.push(p)).expect("fit");
    let report = trainer.evaluate(&test).expect("evaluate");
    eprintln!("{report}");
    eprintln!("epoch seconds {:?}", outcome.epoch_seconds);
    assert!(report.accuracy() >= 0.97, "test accuracy {} below 97 %", report.accuracy());
    assert!(events.iter().any(|e| matches!(e, suanli_cv::torch::train::Progress::Step { .. })));
}

#[test]
fn resume_from_a_checkpoint_continues_exactly() {
    let Some(root) = data_dir() else { return };
    let (train, _) = digits(&root);
    let dir = tempfile::tempdir().expect("tempdir");
    let ckpt = dir.path().join("checkpoint");
    let mut cfg = config(2);
    cfg.optimizer = OptimizerSpec::Sgd { lr: 0.05, momentum: 0.9, weight_decay: 1e-4, nesterov: true };
    cfg.checkpoint_every_steps = 7;
    let per_epoch = train.len().div_ceil(cfg.batch_size) as u64;

    let mut whole = Trainer::new(cfg.clone(), &[Device::Cpu], train.shape(), 10).expect("trainer");
    whole.fit(&train, None, None, None, &mut |_| {}).expect("fit");

    // A run that stops after the checkpoint at step 42 (mid-epoch), then a new process-like
    // trainer (other initial weights: other seed) resumes from it.
    let mut first = cfg.clone();
    first.epochs = 1;
    let mut interrupted = Trainer::new(first, &[Device::Cpu], train.shape(), 10).expect("trainer");
    interrupted.fit(&train, None, None, Some(&ckpt), &mut |_| {}).expect("fit");
    assert!(per_epoch > 42);
    let mut fresh_cfg = cfg.clone();
    fresh_cfg.seed = 999;
    let mut resumed = Trainer::new(fresh_cfg, &[Device::Cpu], train.shape(), 10).expect("trainer");
    resumed.resume(&ckpt, &mut |_| {}).expect("resume");
    assert_eq!(resumed.steps_done(), per_epoch / 7 * 7, "the last checkpoint of epoch 0");
    // The seed decides the batch order, so the resumed run must be told the original one.
    let mut resumed_cfg = resumed.config().clone();
    resumed_cfg.seed = cfg.seed;
    resumed.set_config(resumed_cfg);
    resumed.fit(&train, None, None, None, &mut |_| {}).expect("fit");
    let a = whole.var_store().variables();
    let b = resumed.var_store().variables();
    for (name, t) in &a {
        let diff = (t - &b[name]).abs().max().double_value(&[]);
        assert!(diff < 1e-5, "{name} differs by {diff}");
    }
}

#[test]
fn two_replicas_average_to_the_single_device_gradient() {
    let xs = with_seed(0, || Tensor::rand([16, 1, 8, 8], (tch::Kind::Float, Device::Cpu)));
    let ys = Tensor::from_slice(&[0i64, 1, 2, 3, 4, 5, 6, 7, 8, 9, 0, 1, 2, 3, 4, 5]);
    // Batch norm normalizes each shard by its own statistics, so only networks without it
    // have the exact equality (ResNet-18 is trained in `resnet18_trains_on_two_replicas`).
    for model in [ModelSpec::SmallCnn { width: 8 }] {
        let mut cfg = config(1);
        cfg.model = model.clone();
        let mut single = Trainer::new(cfg.clone(), &[Device::Cpu], [1, 8, 8], 10).expect("single");
        let mut pair = Trainer::new(cfg.clone(), &[Device::Cpu, Device::Cpu], [1, 8, 8], 10).expect("pair");
        let loss_single = single.accumulate_gradients(&xs, &ys).expect("step");
        let loss_pair = pair.accumulate_gradients(&xs, &ys).expect("step");
        assert!((loss_single - loss_pair).abs() < 1e-5, "{model:?}: loss {loss_single} vs {loss_pair}");
        let gs = single.var_store().trainable_variables();
        let gp = pair.var_store().trainable_variables();
        assert_eq!(gs.len(), gp.len());
        for (a, b) in gs.iter().zip(&gp) {
            let (a, b) = (a.grad(), b.grad());
            let diff = (&a - &b).abs().max().double_value(&[]);
            let scale = a.abs().max().double_value(&[]).max(1e-6);
            assert!(diff / scale < 1e-4, "{model:?}: gradient differs by {diff} (scale {scale})");
        }
    }
}

#[test]
fn resnet18_trains_on_two_replicas() {
    let Some(root) = data_dir() else { return };
    let (train, test) = digits(&root);
    let mut cfg = config(3);
    cfg.model = ModelSpec::ResNet18 { width: 8 };
    cfg.optimizer = OptimizerSpec::Sgd { lr: 0.1, momentum: 0.9, weight_decay: 5e-4, nesterov: false };
    cfg.schedule = Schedule::Step { every_epochs: 2, gamma: 0.1 };
    let mut trainer = Trainer::new(cfg, &[Device::Cpu, Device::Cpu], train.shape(), 10).expect("trainer");
    let mut losses = Vec::new();
    trainer
        .fit(&train, None, None, None, &mut |p| {
            if let suanli_cv::torch::train::Progress::Epoch { train_loss, .. } = p {
                losses.push(train_loss)
            }
        })
        .expect("fit");
    let accuracy = trainer.evaluate(&test).expect("evaluate").accuracy();
    assert!(losses[2] < losses[0] / 2.0, "loss did not fall: {losses:?}");
    assert!(accuracy > 0.9, "ResNet-18 test accuracy {accuracy}");
}

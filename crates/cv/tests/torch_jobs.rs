//! `suanli-job` as the agent runs it: a real process, its JSON-lines progress, the files it
//! writes, on real data (ops/setup-torch). Needs `--features torch` and SUANLI_CV_DATA.
#![cfg(feature = "torch")]

mod support;

use std::path::Path;

use std::process::Command;
use support::data_dir;

use serde_json::{json, Value};

struct Run {
    code: i32,
    events: Vec<Value>,
    stderr: String,
}

impl Run {
    fn done(&self) -> &Value {
        let last = self.events.last().unwrap_or_else(|| panic!("no output; stderr: {}", self.stderr));
        assert_eq!(last["event"], "done", "job failed: {last}\nstderr: {}", self.stderr);
        &last["summary"]
    }
}

/// Runs the binary with the agent's environment for a job directory.
fn job(dir: &Path, task: &str, params: Value, extra_env: &[(&str, &Path)]) -> Run {
    let params: serde_json::Map<String, Value> = params
        .as_object()
        .expect("object")
        .iter()
        .map(|(k, v)| (k.clone(), Value::String(if let Value::String(s) = v { s.clone() } else { v.to_string() })))
        .collect();
    for d in ["in", "out", "checkpoint"] {
        std::fs::create_dir_all(dir.join(d)).expect("mkdir");
    }
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_suanli-job"));
    cmd.args(["--task", task, "--params-json", &Value::Object(params).to_string()])
        .env("SUANLI_INPUT_DIR", dir.join("in"))
        .env("SUANLI_OUTPUT_DIR", dir.join("out"))
        .env("SUANLI_CHECKPOINT_DIR", dir.join("checkpoint"))
        .env_remove("SUANLI_RESUME_FROM");
    for (k, v) in extra_env {
        cmd.env(k, v);
    }
    let out = cmd.output().expect("run suanli-job");
    let events = String::from_utf8_lossy(&out.stdout).lines().map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}"))).collect();
    Run { code: out.status.code().unwrap_or(-1), events, stderr: String::from_utf8_lossy(&out.stderr).into_owned() }
}

fn train_params(root: &Path, epochs: u32) -> Value {
    json!({
        "data": root.join("digits/images"),
        "split": {"train": 0.7, "val": 0.1, "test": 0.2, "method": "stratified", "seed": 5},
        "training.model": {"arch": "small_cnn"},
        "training.optimizer": {"kind": "adam", "lr": 0.002},
        "training.schedule": {"kind": "cosine"},
        "training.epochs": epochs,
        "training.batch_size": 32,
        "training.seed": 1,
        "training.checkpoint_every_steps": 20,
    })
}

#[test]
fn train_then_infer_then_resume_through_the_binary() {
    let Some(root) = data_dir() else { return };
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path().join("train");
    let run = job(&dir, "train_classifier", train_params(&root, 8), &[]);
    assert_eq!(run.code, 0, "{}", run.stderr);
    let summary = run.done();
    assert!(summary["accuracy"].as_f64().expect("accuracy") >= 0.95, "{summary}");
    for kind in ["imported", "step", "epoch", "checkpoint"] {
        assert!(run.events.iter().any(|e| e["event"] == kind), "no {kind} event");
    }
    let step = run.events.iter().find(|e| e["event"] == "step").expect("step");
    for key in ["loss", "eta_s", "total_steps", "lr"] {
        assert!(step.get(key).is_some(), "step event lacks {key}: {step}");
    }
    let model = dir.join("out");
    for f in ["model.json", "model.safetensors", "metrics.json"] {
        assert!(model.join(f).is_file(), "{f} missing");
    }
    let metrics: Value = serde_json::from_slice(&std::fs::read(model.join("metrics.json")).expect("metrics")).expect("json");
    assert_eq!(metrics["confusion"].as_array().expect("confusion").len(), 10);
    assert_eq!(metrics["per_class"].as_array().expect("per class").len(), 10);

    // Batch inference with the trained model over one class folder: mostly that class.
    let infer_dir = tmp.path().join("infer");
    let run = job(&infer_dir, "infer", json!({"model": model, "input": root.join("digits/images/7"), "top_k": 2}), &[]);
    assert_eq!(run.code, 0, "{}", run.stderr);
    let out: Value = serde_json::from_slice(&std::fs::read(infer_dir.join("out/predictions.json")).expect("predictions")).expect("json");
    let predictions = out["predictions"].as_array().expect("array");
    assert_eq!(predictions.len(), std::fs::read_dir(root.join("digits/images/7")).expect("dir").count());
    let sevens = predictions.iter().filter(|p| p["class"] == "7").count();
    assert!(sevens as f64 >= 0.95 * predictions.len() as f64, "{sevens} of {} called 7", predictions.len());
    assert_eq!(predictions[0]["top"].as_array().expect("top").len(), 2);

    // A rerun handed the checkpoint continues from it instead of starting over.
    let ckpt = dir.join("checkpoint/checkpoint");
    assert!(ckpt.is_file());
    let rerun = job(&tmp.path().join("rerun"), "train_classifier", train_params(&root, 8), &[("SUANLI_RESUME_FROM", &ckpt)]);
    let resumed = rerun.events.iter().find(|e| e["event"] == "resumed").expect("resumed event");
    assert!(resumed["step"].as_u64().expect("step") > 0);
    let steps_after: Vec<u64> = rerun.events.iter().filter(|e| e["event"] == "step").filter_map(|e| e["step"].as_u64()).collect();
    assert!(steps_after.iter().all(|s| *s > resumed["step"].as_u64().unwrap_or(0)), "a resumed run repeats no step");
    assert_eq!(rerun.done()["steps"], summary["steps"]);
}

#[test]
fn an_invalid_spec_lists_every_problem_and_touches_nothing() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let run = job(
        tmp.path(),
        "train_classifier",
        json!({
            "data": "nowhere",
            "split": {"train": 0.9, "val": 0.9, "test": 0.0},
            "training.model": {"arch": "small_cnn", "width": 0},
            "training.optimizer": {"kind": "sgd", "lr": -1.0},
            "training.epochs": 0,
            "training.batch_size": 32,
        }),
        &[],
    );
    assert_eq!(run.code, 2, "{}", run.stderr);
    let last = run.events.last().expect("error line");
    assert_eq!(last["event"], "error");
    let message = last["message"].as_str().expect("message");
    for field in ["split.", "training.model.width", "training.optimizer.lr", "training.epochs"] {
        assert!(message.contains(field), "{field} not named in: {message}");
    }
    assert_eq!(std::fs::read_dir(tmp.path().join("out")).expect("out").count(), 0, "nothing written");

    let unknown = job(tmp.path(), "train_classifier", json!({"data": "x", "training.epochs": 1, "colour": "blue"}), &[]);
    assert_eq!(unknown.code, 2);
    let no_task = job(tmp.path(), "paint", json!({}), &[]);
    assert_eq!(no_task.code, 2);
}

#[test]
fn pre_annotation_writes_coco_yolo_voc_with_confidences_and_a_review_list() {
    let Some(root) = data_dir() else { return };
    let tmp = tempfile::tempdir().expect("tempdir");
    let photos = tmp.path().join("in/photos");
    std::fs::create_dir_all(&photos).expect("mkdir");
    let reference: Value = serde_json::from_slice(&std::fs::read(root.join("faces/reference.json")).expect("reference")).expect("json");
    for name in reference.as_object().expect("map").keys() {
        std::fs::copy(root.join("faces").join(name), photos.join(name)).expect("copy");
    }
    let run = job(
        tmp.path(),
        "pre_annotate",
        json!({"input": "photos", "detector": {"kind": "mtcnn", "weights": root.join("mtcnn")}, "formats": ["coco", "yolo", "voc"], "review_below": 0.9999}),
        &[],
    );
    assert_eq!(run.code, 0, "{}", run.stderr);
    let summary = run.done();
    let expected_faces: usize = reference.as_object().expect("map").values().map(|v| v.as_array().map_or(0, Vec::len)).sum();
    assert_eq!(summary["objects"].as_u64(), Some(expected_faces as u64));
    let out = tmp.path().join("out");
    let coco = suanli_cv::annotation::AnnotationSet::read_dir(suanli_cv::annotation::Format::Coco, &out.join("coco")).expect("coco");
    assert_eq!(coco.images.len(), reference.as_object().expect("map").len());
    for img in &coco.images {
        let want = reference[&img.file_name].as_array().map_or(0, Vec::len);
        assert_eq!(img.objects.len(), want, "{}", img.file_name);
        assert!(img.objects.iter().all(|o| o.score.is_some_and(|s| s > 0.7)), "{}: confidences kept", img.file_name);
    }
    assert!(out.join("yolo/classes.txt").is_file() && out.join("voc/Annotations").is_dir());
    let review: Vec<Value> = serde_json::from_slice(&std::fs::read(out.join("review.json")).expect("review")).expect("json");
    let low: usize = coco.images.iter().flat_map(|i| &i.objects).filter(|o| o.score.unwrap_or(0.0) < 0.9999).count();
    assert_eq!(review.len(), low, "exactly the boxes under the threshold are listed for review");
}

#[test]
fn successive_halving_over_real_training_reports_every_trial_and_the_best() {
    let Some(root) = data_dir() else { return };
    let tmp = tempfile::tempdir().expect("tempdir");
    let base = json!({
        "data": root.join("digits/images"),
        "split": {"train": 0.6, "val": 0.2, "test": 0.2, "method": "stratified", "seed": 2},
        "augment": [{"op": "gaussian_noise", "std": 0.02}],
        "training": {"model": {"arch": "small_cnn", "width": 8}, "optimizer": {"kind": "adam", "lr": 0.001}, "epochs": 1, "batch_size": 64},
    });
    let run = job(
        tmp.path(),
        "search_hyperparameters",
        json!({
            "base": base,
            "space": {"lr": {"kind": "log_uniform", "min": 1e-4, "max": 3e-2}, "batch_size": [32, 64], "epochs": [3]},
            "strategy": {"kind": "successive_halving", "trials": 3, "min_epochs": 1, "eta": 3},
            "seed": 4,
        }),
        &[],
    );
    assert_eq!(run.code, 0, "{}", run.stderr);
    let trials: Vec<&Value> = run.events.iter().filter(|e| e["event"] == "trial").collect();
    assert_eq!(trials.len(), 3 + 1, "three configurations at 1 epoch, the best of them at 3");
    let report: Value = serde_json::from_slice(&std::fs::read(tmp.path().join("out/hpo.json")).expect("hpo.json")).expect("json");
    let all = report["trials"].as_array().expect("trials");
    assert_eq!(all.len(), 4);
    let best = &report["best"];
    assert_eq!(best["rung"], 1);
    assert_eq!(best["params"]["epochs"], 3);
    let best_rung0 =
        all.iter().filter(|t| t["rung"] == 0).max_by(|a, b| a["score"].as_f64().partial_cmp(&b["score"].as_f64()).expect("scores")).expect("rung 0");
    assert_eq!(best["trial"], best_rung0["trial"], "the promoted configuration is rung 0's best");
}

#[test]
fn a_torchscript_detector_is_post_processed_as_torchvision_does() {
    let Some(root) = data_dir() else { return };
    let tmp = tempfile::tempdir().expect("tempdir");
    let photos = tmp.path().join("in/photos");
    std::fs::create_dir_all(&photos).expect("mkdir");
    std::fs::copy(root.join("faces/astronaut.png"), photos.join("astronaut.png")).expect("copy");
    let expected: Value = serde_json::from_slice(&std::fs::read(root.join("torchscript/toy_detector_expected.json")).expect("expected")).expect("json");
    let detector = json!({"kind": "torchscript", "model": root.join("torchscript/toy_detector.pt"), "classes": ["person", "helmet"],
                          "post": {"min_score": expected["min_score"], "iou": expected["iou"]}});
    let run = job(tmp.path(), "pre_annotate", json!({"input": "photos", "detector": detector, "review_below": 0.0}), &[]);
    assert_eq!(run.code, 0, "{}", run.stderr);
    let coco = suanli_cv::annotation::AnnotationSet::read_dir(suanli_cv::annotation::Format::Coco, &tmp.path().join("out/coco")).expect("coco");
    let objects = &coco.images[0].objects;
    let rows = expected["rows"].as_array().expect("rows");
    assert_eq!(objects.len(), rows.len(), "{objects:?}");
    for (o, r) in objects.iter().zip(rows) {
        let r: Vec<f32> = r.as_array().expect("row").iter().map(|v| v.as_f64().expect("number") as f32).collect();
        let suanli_cv::annotation::Shape::Box { x, y, w, h } = o.shape else { panic!("a box") };
        for (got, want) in [x, y, x + w, y + h].iter().zip(&r[..4]) {
            assert!((got - want).abs() < 1e-3, "{o:?} vs {r:?}");
        }
        assert!((o.score.expect("score") - r[4]).abs() < 1e-5, "{o:?} vs {r:?}");
        assert_eq!(o.category, ["person", "helmet"][r[5] as usize]);
    }

    // The class filter: only helmets.
    let tmp2 = tempfile::tempdir().expect("tempdir");
    std::fs::create_dir_all(tmp2.path().join("in/photos")).expect("mkdir");
    std::fs::copy(root.join("faces/astronaut.png"), tmp2.path().join("in/photos/astronaut.png")).expect("copy");
    let mut only = detector.clone();
    only["post"]["keep"] = json!(["helmet"]);
    let run = job(tmp2.path(), "pre_annotate", json!({"input": "photos", "detector": only}), &[]);
    assert_eq!(run.code, 0, "{}", run.stderr);
    let coco = suanli_cv::annotation::AnnotationSet::read_dir(suanli_cv::annotation::Format::Coco, &tmp2.path().join("out/coco")).expect("coco");
    let helmets = rows.iter().filter(|r| r[5] == 1.0).count();
    assert_eq!(coco.images[0].objects.len(), helmets);
    assert!(coco.images[0].objects.iter().all(|o| o.category == "helmet"));
    let bad = job(
        tmp2.path(),
        "pre_annotate",
        json!({"input": "photos", "detector": {"kind": "torchscript", "model": root.join("torchscript/toy_detector.pt"), "classes": ["person"], "post": {"keep": ["dog"]}}}),
        &[],
    );
    assert_eq!(bad.code, 2, "an unknown class to keep is a spec error");
}

#[test]
fn a_dataset_archive_from_the_store_is_unpacked_versioned_and_split() {
    let Some(root) = data_dir() else { return };
    let tmp = tempfile::tempdir().expect("tempdir");
    std::fs::create_dir_all(tmp.path().join("in")).expect("mkdir");
    let archive = tmp.path().join("in/digits.tgz");
    let tar = Command::new("tar").arg("czf").arg(&archive).arg("-C").arg(root.join("digits")).arg("images").output().expect("tar");
    assert!(tar.status.success(), "{}", String::from_utf8_lossy(&tar.stderr));
    let params = json!({"name": "digits", "input": "digits.tgz", "split": {"train": 0.8, "val": 0.1, "test": 0.1, "method": "stratified", "seed": 9}});
    let first = job(tmp.path(), "prepare_dataset", params.clone(), &[]);
    assert_eq!(first.code, 0, "{}", first.stderr);
    let summary = first.done();
    assert_eq!(summary["version"], 1);
    assert_eq!(summary["sizes"].as_array().expect("sizes").iter().filter_map(Value::as_u64).sum::<u64>(), 1797);
    let split: Value = serde_json::from_slice(&std::fs::read(tmp.path().join("out/split.json")).expect("split")).expect("json");
    assert!(split["train"][0]["name"].as_str().is_some_and(|n| !n.starts_with("images/")), "the archive's single folder is the root");
    assert!(split["train"][0]["label"].as_str().is_some_and(|l| l.len() == 1), "labels are the digit folders");
    // Unchanged data: no new version.
    let again = job(tmp.path(), "prepare_dataset", params, &[]);
    assert_eq!(again.done()["version"], 1);
}

#[test]
fn frames_from_a_video_become_images_the_pipeline_reads() {
    let tmp = tempfile::tempdir().expect("tempdir");
    std::fs::create_dir_all(tmp.path().join("in")).expect("mkdir");
    let video = tmp.path().join("in/clip.avi");
    let made = Command::new("ffmpeg")
        .args(["-loglevel", "error", "-f", "lavfi", "-i", "testsrc=size=64x48:rate=10", "-t", "3", "-c:v", "mpeg4"])
        .arg(&video)
        .output()
        .expect("ffmpeg (ops/install-build-deps installs it)");
    assert!(made.status.success(), "{}", String::from_utf8_lossy(&made.stderr));
    let run = job(tmp.path(), "extract_frames", json!({"video": "clip.avi", "sampling": {"mode": "every_nth", "n": 5}, "output": "frames"}), &[]);
    assert_eq!(run.code, 0, "{}", run.stderr);
    assert_eq!(run.done()["frames"], 6, "30 frames, every 5th");
    let report = suanli_cv::intake::import_dir(tmp.path().join("out/frames"), &Default::default()).expect("import");
    assert_eq!(report.images.len(), 6);
    assert!(report.images.iter().all(|i| (i.image.width, i.image.height) == (64, 48)));
    let typo = job(tmp.path(), "extract_frames", json!({"video": "clip.avi", "sampling": {"mode": "every_nth", "n": 5}, "max_frame": 3}), &[]);
    assert_eq!(typo.code, 2, "a misspelled field is refused");
}

#[test]
fn specs_that_would_fail_late_are_refused_up_front() {
    let Some(root) = data_dir() else { return };
    let tmp = tempfile::tempdir().expect("tempdir");
    let digits = root.join("digits/images");
    let train = |extra: Value| {
        let mut p = json!({"data": digits, "training.model": {"arch": "small_cnn", "width": 4}, "training.optimizer": {"kind": "sgd", "lr": 0.1}, "training.epochs": 1, "training.batch_size": 64});
        for (k, v) in extra.as_object().expect("object") {
            p[k] = v.clone();
        }
        job(tmp.path(), "train_classifier", p, &[])
    };
    // An augmentation that changes the shape would crash the network at the first batch.
    let run = train(json!({"augment": [{"op": "resize", "width": 4, "height": 4}]}));
    assert_eq!(run.code, 2, "{}", run.stderr);
    assert!(run.events.last().expect("error")["message"].as_str().expect("message").contains("augment"));
    // Nothing to train on, or a schedule that poisons the weights.
    assert_eq!(train(json!({"split": {"train": 0.0, "val": 0.5, "test": 0.5}})).code, 2);
    assert_eq!(train(json!({"training.schedule": {"kind": "cosine", "min_lr": 5.0}})).code, 2);
    // An image pyramid that never ends.
    let mtcnn =
        job(tmp.path(), "pre_annotate", json!({"input": "x", "detector": {"kind": "mtcnn", "weights": root.join("mtcnn"), "config": {"factor": 1.0}}}), &[]);
    assert_eq!(mtcnn.code, 2);
}

#[test]
fn links_in_a_dataset_archive_are_not_followed() {
    let Some(root) = data_dir() else { return };
    let tmp = tempfile::tempdir().expect("tempdir");
    let src = tmp.path().join("src/set");
    std::fs::create_dir_all(src.join("a")).expect("mkdir");
    std::fs::copy(root.join("faces/astronaut.png"), src.join("a/ok.png")).expect("copy");
    std::os::unix::fs::symlink("/etc", src.join("etc")).expect("symlink");
    std::os::unix::fs::symlink(root.join("faces/coffee.png"), src.join("a/linked.png")).expect("symlink");
    std::fs::create_dir_all(tmp.path().join("in")).expect("mkdir");
    let tar = Command::new("tar").arg("cf").arg(tmp.path().join("in/set.tar")).arg("-C").arg(tmp.path().join("src")).arg("set").output().expect("tar");
    assert!(tar.status.success());
    let run =
        job(tmp.path(), "prepare_dataset", json!({"name": "s", "input": "set.tar", "split": {"train": 1.0, "val": 0.0, "test": 0.0, "method": "random"}}), &[]);
    assert_eq!(run.code, 0, "{}", run.stderr);
    let skipped = run.events.iter().find(|e| e["event"] == "skipped_entries").expect("links reported");
    assert_eq!(skipped["count"], 2);
    assert_eq!(run.done()["sizes"][0], 1, "only the regular file was imported");
}

#[test]
fn images_that_would_share_a_voc_or_yolo_file_are_caught_before_detection() {
    let Some(root) = data_dir() else { return };
    let tmp = tempfile::tempdir().expect("tempdir");
    for d in ["a", "b"] {
        std::fs::create_dir_all(tmp.path().join("in/photos").join(d)).expect("mkdir");
        std::fs::copy(root.join(format!("faces/{}.png", if d == "a" { "astronaut" } else { "coffee" })), tmp.path().join("in/photos").join(d).join("1.png"))
            .expect("copy");
    }
    let spec = |formats: Value| json!({"input": "photos", "detector": {"kind": "mtcnn", "weights": root.join("mtcnn")}, "formats": formats});
    let clash = job(tmp.path(), "pre_annotate", spec(json!(["coco", "yolo"])), &[]);
    assert_eq!(clash.code, 1);
    let message = clash.events.last().expect("error")["message"].as_str().expect("message").to_owned();
    assert!(message.contains("a/1.png") && message.contains("b/1.png"), "{message}");
    assert!(!clash.events.iter().any(|e| e["event"] == "progress"), "nothing was detected first");
    let coco = job(tmp.path(), "pre_annotate", spec(json!(["coco"])), &[]);
    assert_eq!(coco.code, 0, "{}", coco.stderr);
}

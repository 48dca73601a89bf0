//! Image embeddings for similar-image search on the real test photos: a photo's resized,
//! cropped, mirrored and recompressed copies find it, the `embed` job writes the declared
//! format, and the service's embed mode answers what the embedder says directly.
//! Needs `--features torch` and SUANLI_CV_DATA.
#![cfg(feature = "torch")]

mod support;

use std::io::Cursor;
use std::path::{Path, PathBuf};

use image::{DynamicImage, ImageFormat};
use serde_json::{json, Value};
use suanli_cv::embeddings;
use suanli_cv::torch::embed::{write_untrained_backbone, Embedder};
use suanli_cv::torch::jobs::{parse_task, EmbedderService, JobEnv};
use suanli_cv::torch::models::ModelSpec;
use suanli_cv::Image;
use support::data_dir;
use tch::Device;

const PHOTOS: [&str; 5] = ["astronaut", "camera", "chelsea", "coffee", "rocket"];

fn backbone(dir: &Path, seed: i64) -> Embedder {
    write_untrained_backbone(dir, &ModelSpec::ResNet18 { width: 32 }, [3, 128, 128], seed).expect("write backbone");
    Embedder::load(dir, Device::Cpu).expect("load embedder")
}

fn photo(root: &Path, name: &str) -> DynamicImage {
    image::open(root.join("faces").join(format!("{name}.png"))).expect("open photo")
}

/// The copies a library really holds of one photo.
fn copies(img: &DynamicImage) -> Vec<(&'static str, DynamicImage)> {
    let (w, h) = (img.width(), img.height());
    let mut jpeg = Vec::new();
    img.to_rgb8().write_to(&mut Cursor::new(&mut jpeg), ImageFormat::Jpeg).expect("encode");
    let recompressed = {
        let mut out = Vec::new();
        let mut enc = image::codecs::jpeg::JpegEncoder::new_with_quality(&mut out, 35);
        enc.encode_image(&img.to_rgb8()).expect("encode");
        image::load_from_memory(&out).expect("decode")
    };
    vec![
        ("half size", img.resize_exact(w / 2, h / 2, image::imageops::FilterType::Triangle)),
        ("centre crop 80%", img.crop_imm(w / 10, h / 10, w * 8 / 10, h * 8 / 10)),
        ("mirrored", img.fliph()),
        ("jpeg quality 35", recompressed),
    ]
}

fn cosine(a: &[f32], b: &[f32]) -> f32 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

/// The library: the test photos plus 300 digits as distractors.
fn library(root: &Path) -> Vec<(String, Image)> {
    let mut items: Vec<(String, Image)> = PHOTOS.iter().map(|n| (n.to_string(), Image::from_dynamic(&photo(root, n)))).collect();
    let mut digits: Vec<PathBuf> = walk(&root.join("digits/images"));
    digits.sort();
    for path in digits.into_iter().step_by(6).take(300) {
        items.push((path.display().to_string(), Image::from_dynamic(&image::open(&path).expect("digit"))));
    }
    items
}

fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).expect("read dir").flatten() {
        let p = entry.path();
        if p.is_dir() {
            out.extend(walk(&p));
        } else {
            out.push(p);
        }
    }
    out
}

fn embed_all(embedder: &Embedder, items: &[(String, Image)]) -> Vec<Vec<f32>> {
    items.chunks(32).flat_map(|chunk| embedder.embed(&chunk.iter().map(|(n, i)| (n.as_str(), i)).collect::<Vec<_>>()).expect("embed")).collect()
}

#[test]
fn every_transformed_copy_finds_its_original_in_the_top_5() {
    let Some(root) = data_dir() else { return };
    let dir = tempfile::tempdir().expect("tempdir");
    let embedder = backbone(dir.path(), 7);
    let items = library(&root);
    let vectors = embed_all(&embedder, &items);
    let mut misses = Vec::new();
    for name in PHOTOS {
        for (how, copy) in copies(&photo(&root, name)) {
            let q = embedder.embed(&[("query", &Image::from_dynamic(&copy))]).expect("embed query").remove(0);
            let mut ranked: Vec<(f32, &str)> = vectors.iter().zip(&items).map(|(v, (n, _))| (cosine(&q, v), n.as_str())).collect();
            ranked.sort_by(|a, b| b.0.total_cmp(&a.0));
            let rank = ranked.iter().position(|(_, n)| *n == name).expect("original in the library");
            if rank >= 5 {
                misses.push(format!("{name} ({how}): rank {}, top {:?}", rank + 1, &ranked[..5]));
            }
        }
    }
    assert!(misses.is_empty(), "copies that did not find their original:\n{}", misses.join("\n"));
}

#[test]
fn a_mirrored_photo_embeds_to_the_same_vector() {
    let Some(root) = data_dir() else { return };
    let dir = tempfile::tempdir().expect("tempdir");
    let embedder = backbone(dir.path(), 7);
    let img = photo(&root, "chelsea");
    let a = embedder.embed(&[("a", &Image::from_dynamic(&img))]).expect("embed").remove(0);
    let b = embedder.embed(&[("b", &Image::from_dynamic(&img.fliph()))]).expect("embed").remove(0);
    assert_eq!(a.len(), 256);
    assert!((a.iter().map(|x| x * x).sum::<f32>() - 1.0).abs() < 1e-4, "unit length");
    assert!(cosine(&a, &b) > 0.9999, "cosine {}", cosine(&a, &b));
}

#[test]
fn different_weights_are_a_different_model_version() {
    let (one, two) = (tempfile::tempdir().expect("tempdir"), tempfile::tempdir().expect("tempdir"));
    let (a, b, a_again) = (backbone(one.path(), 1), backbone(two.path(), 2), Embedder::load(one.path(), Device::Cpu).expect("load"));
    assert_ne!(a.version(), b.version());
    assert_eq!(a.version(), a_again.version());
    assert!(a.version().starts_with("resnet18w32@sha256:"), "{}", a.version());
}

#[test]
fn grayscale_photos_are_embedded_by_a_colour_network() {
    let Some(root) = data_dir() else { return };
    let dir = tempfile::tempdir().expect("tempdir");
    let embedder = backbone(dir.path(), 7);
    let gray = Image::from_dynamic(&DynamicImage::ImageLuma8(photo(&root, "camera").to_luma8()));
    assert_eq!(gray.channels, 1);
    let v = embedder.embed(&[("camera", &gray)]).expect("embed").remove(0);
    assert_eq!(v.len(), 256);
    // The same picture in colour channels that are all equal embeds to the same vector.
    let rgb = Image::from_dynamic(&DynamicImage::ImageRgb8(DynamicImage::ImageLuma8(photo(&root, "camera").to_luma8()).to_rgb8()));
    assert!(cosine(&v, &embedder.embed(&[("rgb", &rgb)]).expect("embed").remove(0)) > 0.9999);
}

#[test]
fn the_embed_job_writes_the_declared_format_with_each_images_hash() {
    let Some(root) = data_dir() else { return };
    let model = tempfile::tempdir().expect("tempdir");
    let embedder = backbone(model.path(), 3);
    let out = tempfile::tempdir().expect("tempdir");
    let task = parse_task(json!({"task": "embed", "model": model.path(), "input": root.join("faces"), "batch_size": 4})).expect("valid spec");
    let env = JobEnv { input_dir: root.clone(), output_dir: out.path().to_owned(), checkpoint: None, resume_from: None };
    let summary = task.run(&env, &mut |_| {}).expect("run");
    assert_eq!(summary["model"], embedder.version());
    let read = embeddings::read(out.path()).expect("read back");
    assert_eq!(read.header.model, embedder.version());
    assert_eq!(read.vectors.len(), 9, "the nine test photos");
    let chelsea = read.header.items.iter().position(|i| i.name.ends_with("chelsea.png")).expect("chelsea embedded");
    let bytes = std::fs::read(root.join("faces/chelsea.png")).expect("read");
    assert_eq!(read.header.items[chelsea].sha256, sha256_hex(&bytes));
    let direct = embedder.embed(&[("c", &Image::from_dynamic(&photo(&root, "chelsea")))]).expect("embed").remove(0);
    assert!(cosine(&direct, &read.vectors[chelsea]) > 0.9999);
}

#[test]
fn an_embed_spec_with_a_bad_batch_size_is_refused_before_reading() {
    let err = parse_task(json!({"task": "embed", "model": "m", "input": "i", "batch_size": 0})).unwrap_err().to_string();
    assert!(err.contains("batch_size"), "{err}");
}

fn sha256_hex(bytes: &[u8]) -> String {
    use sha2::Digest;
    hex::encode(sha2::Sha256::digest(bytes))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_service_in_embed_mode_answers_what_the_embedder_says() {
    let Some(root) = data_dir() else { return };
    let dir = tempfile::tempdir().expect("tempdir");
    let direct = backbone(dir.path(), 5);
    let bytes = std::fs::read(root.join("faces/coffee.png")).expect("read");
    let expected = direct.embed(&[("coffee", &Image::from_dynamic(&image::load_from_memory(&bytes).expect("decode")))]).expect("embed").remove(0);
    let service = EmbedderService { embedder: Embedder::load(dir.path(), Device::Cpu).expect("load") };
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let server = suanli_cv::serve::serve(listener, Box::new(service), Default::default()).await.expect("serve");
    let url = format!("http://{}/v1/predict", server.local_addr().expect("a TCP service"));
    let answer: Value = reqwest::Client::new().post(url).body(bytes).send().await.expect("post").json().await.expect("json");
    assert_eq!(answer["result"]["model"], direct.version());
    let vector: Vec<f32> = serde_json::from_value(answer["result"]["vector"].clone()).expect("vector");
    assert!(cosine(&vector, &expected) > 0.99999);
    server.shutdown().await.expect("shutdown");
}

//! Our MTCNN against facenet-pytorch's on real photos: for every face the Python detector
//! finds (ops/setup-torch recorded them), ours finds one with IoU ≥ 0.9, and nothing where it
//! finds nothing. Needs `--features torch` and SUANLI_CV_DATA.
#![cfg(feature = "torch")]

mod support;

use std::collections::BTreeMap;

use serde::Deserialize;
use suanli_cv::intake::load_file;
use suanli_cv::nms::{iou, Detection};
use suanli_cv::torch::mtcnn::{Mtcnn, MtcnnConfig};
use support::data_dir;
use tch::Device;

#[derive(Deserialize)]
struct Reference {
    #[serde(rename = "box")]
    bbox: [f32; 4],
    score: f32,
}

fn det(b: [f32; 4], score: f32) -> Detection {
    Detection { x1: b[0], y1: b[1], x2: b[2], y2: b[3], score, class: 0 }
}

#[test]
fn boxes_match_facenet_pytorch_on_every_image() {
    let Some(root) = data_dir() else { return };
    let faces = root.join("faces");
    let reference: BTreeMap<String, Vec<Reference>> =
        serde_json::from_slice(&std::fs::read(faces.join("reference.json")).expect("reference.json")).expect("parse");
    assert!(reference.len() >= 8, "the reference covers the photo set");
    assert!(reference.values().any(Vec::is_empty), "some photos have no face");
    assert!(reference.values().any(|v| v.len() >= 2), "some photo has several faces");
    let detector = Mtcnn::load(&root.join("mtcnn"), Device::Cpu, MtcnnConfig::default()).expect("weights");
    for (name, expected) in &reference {
        let img = load_file(faces.join(name)).expect("image").image;
        let found = detector.detect(&img).expect("detect");
        let ours: Vec<Detection> = found.iter().map(|f| det([f.x1, f.y1, f.x2, f.y2], f.score)).collect();
        eprintln!("{name}: python {:?}", expected.iter().map(|r| r.bbox).collect::<Vec<_>>());
        eprintln!("{name}: ours   {:?}", ours.iter().map(|d| [d.x1, d.y1, d.x2, d.y2]).collect::<Vec<_>>());
        assert_eq!(ours.len(), expected.len(), "{name}: {} faces found, facenet-pytorch finds {}", ours.len(), expected.len());
        for r in expected {
            let best = ours.iter().map(|d| iou(d, &det(r.bbox, r.score))).fold(0.0f32, f32::max);
            assert!(best >= 0.9, "{name}: best IoU {best} with facenet's box {:?}", r.bbox);
        }
        for f in &found {
            assert!(f.score > 0.7 && f.score <= 1.0, "{name}: score {}", f.score);
        }
    }
}

//! Inference with real models: a TorchScript module exported by PyTorch (ops/setup-torch
//! traced it and recorded PyTorch's output) loads and answers the same, and the online
//! service answers HTTP and WebSocket clients with exactly what the model says directly.
//! Needs `--features torch` and SUANLI_CV_DATA.
#![cfg(feature = "torch")]

mod support;

use std::path::{Path, PathBuf};

use support::data_dir;

use futures::{SinkExt, StreamExt};
use serde_json::Value;
use suanli_cv::intake::load_file;
use suanli_cv::torch::classifier::{Classifier, ModelCard, CARD_FILE, TORCHSCRIPT_FILE};
use suanli_cv::torch::jobs::ClassifierService;
use tch::{Device, Tensor};

/// A model directory around the exported TorchScript digits network.
fn torchscript_model(root: &Path, dir: &Path) -> Classifier {
    std::fs::copy(root.join("torchscript/digits_conv.pt"), dir.join(TORCHSCRIPT_FILE)).expect("copy");
    let card = ModelCard {
        model: None,
        classes: (0..10).map(|d| d.to_string()).collect(),
        input: [1, 8, 8],
        preprocess: vec![],
        dataset_version: None,
        test_metrics: None,
    };
    std::fs::write(dir.join(CARD_FILE), serde_json::to_vec(&card).expect("json")).expect("card");
    Classifier::load(dir, Device::Cpu).expect("load TorchScript")
}

#[test]
fn a_torchscript_module_from_pytorch_gives_pytorchs_answer() {
    let Some(root) = data_dir() else { return };
    let dir = tempfile::tempdir().expect("tempdir");
    let model = torchscript_model(&root, dir.path());
    let expected: Value = serde_json::from_slice(&std::fs::read(root.join("torchscript/expected.json")).expect("expected")).expect("json");
    let shape: Vec<i64> = serde_json::from_value(expected["input_shape"].clone()).expect("shape");
    let input: Vec<f32> = serde_json::from_value(expected["input"].clone()).expect("input");
    let want: Vec<f32> = serde_json::from_value(expected["output"].clone()).expect("output");
    let got: Vec<f32> = model.logits(&Tensor::from_slice(&input).view(shape.as_slice())).expect("forward").flatten(0, -1).try_into().expect("floats");
    assert_eq!(got.len(), want.len());
    for (g, w) in got.iter().zip(&want) {
        assert!((g - w).abs() < 1e-5, "ours {g} vs PyTorch {w}");
    }
    // A card that does not fit the module is refused with the shapes named, not a crash.
    let img = load_file(root.join("faces/astronaut.png")).expect("photo").image;
    let err = model.classify(&[("astronaut.png", &img)], 1).expect_err("wrong input shape");
    assert!(err.to_string().contains("astronaut.png") && err.to_string().contains("[1, 8, 8]"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_online_service_answers_what_the_model_answers() {
    let Some(root) = data_dir() else { return };
    let dir = tempfile::tempdir().expect("tempdir");
    let direct = torchscript_model(&root, dir.path());
    let digits: Vec<PathBuf> =
        (0..10).map(|d| std::fs::read_dir(root.join(format!("digits/images/{d}"))).expect("dir").next().expect("a file").expect("entry").path()).collect();
    let images: Vec<_> = digits.iter().map(|p| load_file(p).expect("digit").image).collect();
    let named: Vec<(&str, &suanli_cv::Image)> = images.iter().map(|i| ("digit", i)).collect();
    let want = direct.classify(&named, 3).expect("classify");

    let service = ClassifierService { model: torchscript_model(&root, dir.path()), top_k: 3 };
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let server = suanli_cv::serve::serve(listener, Box::new(service), Default::default()).await.expect("serve");
    let base = format!("http://{}", server.local_addr().expect("a TCP service"));
    let http = reqwest::Client::new();
    let answers = futures::future::join_all(digits.iter().map(|p| {
        let body = std::fs::read(p).expect("read");
        let http = http.clone();
        let url = format!("{base}/v1/predict");
        async move { http.post(url).body(body).send().await.expect("send").json::<Value>().await.expect("json") }
    }))
    .await;
    for (got, want) in answers.iter().zip(&want) {
        assert_eq!(got["result"]["class"], want.class.as_str(), "{got}");
        let score = got["result"]["score"].as_f64().expect("score") as f32;
        assert!((score - want.score).abs() < 1e-6, "{got} vs {want:?}");
    }
    let model: Value = http.get(format!("{base}/v1/model")).send().await.expect("model").json().await.expect("json");
    assert_eq!(model["input"], serde_json::json!([1, 8, 8]));

    // The same digits as frames of a stream: one answer per frame, in order.
    let (mut ws, _) = tokio_tungstenite::connect_async(format!("ws://{}/v1/stream", server.local_addr().expect("a TCP service"))).await.expect("websocket");
    for p in &digits {
        ws.send(tokio_tungstenite::tungstenite::Message::Binary(std::fs::read(p).expect("read").into())).await.expect("send frame");
    }
    for (i, want) in want.iter().enumerate() {
        let msg = ws.next().await.expect("a reply").expect("ok");
        let v: Value = serde_json::from_str(msg.to_text().expect("text")).expect("json");
        assert_eq!(v["frame"], i);
        assert_eq!(v["result"]["class"], want.class.as_str());
    }
    ws.close(None).await.expect("close");
    server.shutdown().await.expect("shutdown");
}

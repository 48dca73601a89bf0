//! Preprocessing: exact results on tiny hand-made images, statistical checks on big ones, and
//! pipelines as job specs write them.

use proptest::prelude::*;
use rand::{RngCore, SeedableRng};
use rand_chacha::ChaCha8Rng;
use suanli_cv::preprocess::{self, CustomStep, DenoiseMethod, Filter, Pipeline, PipelineSpec, PreprocessError, Registry, Step};
use suanli_cv::Image;

/// A 1-channel image from rows.
fn gray(rows: &[&[f32]]) -> Image {
    Image { width: rows[0].len() as u32, height: rows.len() as u32, channels: 1, data: rows.concat() }
}

fn rows(img: &Image) -> Vec<Vec<f32>> {
    img.data.chunks(img.width as usize * img.channels as usize).map(<[f32]>::to_vec).collect()
}

/// A w x h RGB image whose samples are all distinct.
fn ramp(w: u32, h: u32) -> Image {
    let n = (w * h * 3) as usize;
    Image { width: w, height: h, channels: 3, data: (0..n).map(|i| i as f32 / n as f32).collect() }
}

fn run(steps: Vec<Step>, img: Image) -> Image {
    let pipeline = Pipeline::build(&steps, &Registry::new()).expect("valid");
    pipeline.apply(img, &mut ChaCha8Rng::seed_from_u64(0)).expect("applies")
}

fn close(a: &[f32], b: &[f32], tol: f32) -> bool {
    a.len() == b.len() && a.iter().zip(b).all(|(x, y)| (x - y).abs() <= tol)
}

#[test]
fn flips_and_crops_are_exact() {
    let img = gray(&[&[1.0, 2.0, 3.0], &[4.0, 5.0, 6.0]]);
    assert_eq!(rows(&run(vec![Step::FlipHorizontal { p: 1.0 }], img.clone())), [[3.0, 2.0, 1.0], [6.0, 5.0, 4.0]]);
    assert_eq!(rows(&run(vec![Step::FlipVertical { p: 1.0 }], img.clone())), [[4.0, 5.0, 6.0], [1.0, 2.0, 3.0]]);
    assert_eq!(run(vec![Step::FlipHorizontal { p: 0.0 }], img.clone()), img);
    assert_eq!(rows(&run(vec![Step::Crop { x: 1, y: 0, width: 2, height: 2 }], img.clone())), [[2.0, 3.0], [5.0, 6.0]]);
    assert_eq!(rows(&run(vec![Step::CenterCrop { width: 1, height: 1 }], img.clone())), [[2.0]]);
    // RGB pixels move as a whole.
    let rgb = Image { width: 2, height: 1, channels: 3, data: vec![1.0, 2.0, 3.0, 4.0, 5.0, 6.0] };
    assert_eq!(run(vec![Step::FlipHorizontal { p: 1.0 }], rgb).data, [4.0, 5.0, 6.0, 1.0, 2.0, 3.0]);
    let err = preprocess::crop(&img, 2, 0, 2, 1).map(|_| ()).expect_err("out of bounds");
    assert!(matches!(err, PreprocessError::OutOfBounds { .. }), "{err}");
}

#[test]
fn rotate_90_is_transpose_then_vertical_flip() {
    let img = ramp(4, 3);
    let rotated = preprocess::rotate(&img, 90.0);
    assert_eq!((rotated.width, rotated.height), (3, 4));
    let mut transposed = Image::new(3, 4, 3);
    for y in 0..3 {
        for x in 0..4 {
            for c in 0..3 {
                let i = transposed.index(y, x, c);
                transposed.data[i] = img.get(x, y, c);
            }
        }
    }
    preprocess::flip_vertical(&mut transposed);
    assert_eq!(rotated, transposed);
    // Counter-clockwise, by hand: the top-right corner comes to the top-left.
    let small = gray(&[&[1.0, 2.0], &[3.0, 4.0]]);
    assert_eq!(rows(&preprocess::rotate(&small, 90.0)), [[2.0, 4.0], [1.0, 3.0]]);
    assert_eq!(rows(&preprocess::rotate(&small, -90.0)), [[3.0, 1.0], [4.0, 2.0]]);
    assert_eq!(rows(&preprocess::rotate(&small, 180.0)), [[4.0, 3.0], [2.0, 1.0]]);
    assert_eq!(preprocess::rotate(&preprocess::rotate(&img, 270.0), 90.0), img);
    assert_eq!(preprocess::rotate(&img, 360.0), img);
}

#[test]
fn arbitrary_rotation_agrees_with_the_exact_path_and_fills_zero() {
    let img = ramp(5, 5);
    // The general path at (almost) 90 degrees matches the exact one on a square image.
    let general = preprocess::rotate_within(&img, 90.0);
    assert!(close(&general.data, &preprocess::rotate(&img, 90.0).data, 1e-5));
    let near_full_turn = preprocess::rotate(&img, 359.9999);
    assert!(close(&near_full_turn.data, &img.data, 1e-4));
    // 45 degrees keeps the canvas; the corners fall outside the rotated image.
    let ones = Image { width: 9, height: 9, channels: 1, data: vec![1.0; 81] };
    let r = preprocess::rotate(&ones, 45.0);
    assert_eq!((r.width, r.height), (9, 9));
    assert_eq!(r.get(0, 0, 0), 0.0);
    assert!((r.get(4, 4, 0) - 1.0).abs() < 1e-6);
}

#[test]
fn grayscale_uses_bt601_weights() {
    let rgb = Image { width: 2, height: 1, channels: 3, data: vec![1.0, 0.0, 0.0, 0.2, 0.4, 0.6] };
    let g = run(vec![Step::Grayscale { keep_channels: false }], rgb.clone());
    assert_eq!(g.channels, 1);
    assert!(close(&g.data, &[0.299, 0.299 * 0.2 + 0.587 * 0.4 + 0.114 * 0.6], 1e-6));
    let g3 = run(vec![Step::Grayscale { keep_channels: true }], rgb);
    assert_eq!(g3.channels, 3);
    assert!(close(&g3.data[..3], &[0.299; 3], 1e-6));
}

#[test]
fn normalize_and_brightness_contrast_are_exact() {
    let rgb = Image { width: 1, height: 2, channels: 3, data: vec![0.5, 0.5, 0.5, 1.0, 0.0, 0.25] };
    let n = run(vec![Step::Normalize { mean: vec![0.5, 0.25, 0.0], std: vec![0.5, 0.25, 0.5] }], rgb.clone());
    assert!(close(&n.data, &[0.0, 1.0, 1.0, 1.0, -1.0, 0.5], 1e-6));
    // One value for all channels.
    let n1 = run(vec![Step::Normalize { mean: vec![0.5], std: vec![0.5] }], rgb.clone());
    assert!(close(&n1.data, &[0.0, 0.0, 0.0, 1.0, -1.0, -0.5], 1e-6));
    // 3 values on a grayscale image is an error at apply time.
    let p = Pipeline::build(&[Step::Normalize { mean: vec![0.0; 3], std: vec![1.0; 3] }], &Registry::new()).expect("valid");
    let err = p.apply(gray(&[&[0.5]]), &mut ChaCha8Rng::seed_from_u64(0)).map(|_| ()).expect_err("mismatch");
    assert!(matches!(err, PreprocessError::ChannelMismatch { values: 3, channels: 1 }), "{err}");

    let img = gray(&[&[0.0, 0.25, 0.5, 0.75, 1.0]]);
    assert!(close(&run(vec![Step::BrightnessContrast { brightness: 0.1, contrast: 1.0 }], img.clone()).data, &[0.1, 0.35, 0.6, 0.85, 1.0], 1e-6));
    assert!(close(&run(vec![Step::BrightnessContrast { brightness: 0.0, contrast: 2.0 }], img.clone()).data, &[0.0, 0.0, 0.5, 1.0, 1.0], 1e-6));
    assert!(close(&run(vec![Step::BrightnessContrast { brightness: 0.0, contrast: 0.5 }], img.clone()).data, &[0.25, 0.375, 0.5, 0.625, 0.75], 1e-6));
    assert_eq!(run(vec![Step::BrightnessContrast { brightness: 0.0, contrast: 1.0 }], img.clone()), img);
}

#[test]
fn resizing() {
    let constant = Image { width: 7, height: 5, channels: 3, data: vec![0.3; 105] };
    for (w, h) in [(3, 2), (14, 11), (1, 1), (7, 9), (20, 5)] {
        for filter in [Filter::Bilinear, Filter::Nearest] {
            let r = run(vec![Step::Resize { width: w, height: h, filter }], constant.clone());
            assert_eq!((r.width, r.height, r.data.len()), (w, h, (w * h * 3) as usize));
            assert!(r.data.iter().all(|v| (v - 0.3).abs() < 1e-6), "{w}x{h} {filter:?}");
        }
    }
    // A 2x2 checker shrinks to its average; a 4x4 checker of 2x2 blocks to its blocks.
    let checker = gray(&[&[0.0, 1.0], &[1.0, 0.0]]);
    assert!(close(&run(vec![Step::Resize { width: 1, height: 1, filter: Filter::Bilinear }], checker).data, &[0.5], 1e-6));
    let blocks = gray(&[&[0.0, 0.0, 1.0, 1.0], &[0.0, 0.0, 1.0, 1.0], &[1.0, 1.0, 0.0, 0.0], &[1.0, 1.0, 0.0, 0.0]]);
    let half = run(vec![Step::Resize { width: 2, height: 2, filter: Filter::Bilinear }], blocks.clone());
    assert!(half.data.iter().all(|v| (0.0..=1.0).contains(v)));
    assert!(half.data[0] < 0.5 && half.data[1] > 0.5);
    // A 4x downscale of a fine checker is gray, not aliased to black or white.
    let fine = Image { width: 8, height: 8, channels: 1, data: (0..64).map(|i| ((i % 8 + i / 8) % 2) as f32).collect() };
    let small = run(vec![Step::Resize { width: 2, height: 2, filter: Filter::Bilinear }], fine);
    assert!(small.data.iter().all(|v| (v - 0.5).abs() < 0.1), "{:?}", small.data);
    // Nearest picks samples; upscaling by 2 repeats each pixel.
    let up = run(vec![Step::Resize { width: 4, height: 2, filter: Filter::Nearest }], gray(&[&[1.0, 2.0]]));
    assert_eq!(rows(&up), [[1.0, 1.0, 2.0, 2.0], [1.0, 1.0, 2.0, 2.0]]);
    let scaled = run(vec![Step::Scale { factor: 0.5, filter: Filter::Bilinear }], blocks);
    assert_eq!((scaled.width, scaled.height), (2, 2));
    let huge = Pipeline::build(&[Step::Scale { factor: 1e6, filter: Filter::Nearest }], &Registry::new()).expect("valid");
    let err = huge.apply(Image::new(1, 100, 1), &mut ChaCha8Rng::seed_from_u64(0)).map(|_| ()).expect_err("too large");
    assert!(matches!(err, PreprocessError::TooLarge { .. }), "{err}");
}

#[test]
fn median_removes_salt_and_gaussian_smooths() {
    let mut img = Image { width: 5, height: 5, channels: 1, data: vec![0.2; 25] };
    img.data[12] = 1.0;
    let cleaned = run(vec![Step::Denoise { method: DenoiseMethod::Median3 }], img.clone());
    assert!(cleaned.data.iter().all(|v| (v - 0.2).abs() < 1e-6));
    let blurred = run(vec![Step::Denoise { method: DenoiseMethod::Gaussian { sigma: 1.0 } }], img.clone());
    assert!(blurred.data[12] < 0.5 && blurred.data[12] > 0.2);
    // Blurring preserves the mean away from the edges and keeps a constant image constant.
    let constant = Image { width: 6, height: 4, channels: 3, data: vec![0.7; 72] };
    let same = run(vec![Step::Denoise { method: DenoiseMethod::Gaussian { sigma: 2.0 } }], constant.clone());
    assert!(close(&same.data, &constant.data, 1e-5));
}

#[test]
fn noise_has_the_requested_std() {
    let img = Image { width: 256, height: 256, channels: 3, data: vec![0.5; 256 * 256 * 3] };
    let noisy = run(vec![Step::GaussianNoise { std: 0.05 }], img);
    let n = noisy.data.len() as f64;
    let mean = noisy.data.iter().map(|&v| f64::from(v)).sum::<f64>() / n;
    let var = noisy.data.iter().map(|&v| (f64::from(v) - mean).powi(2)).sum::<f64>() / n;
    assert!((mean - 0.5).abs() < 0.002, "mean {mean}");
    assert!((var.sqrt() - 0.05).abs() < 0.002, "std {}", var.sqrt());
}

const JOB_SPEC: &str = r#"{
    "dataset": "faces@3",
    "preprocess": {"steps": [
        {"op": "random_crop", "width": 24, "height": 24},
        {"op": "flip_horizontal", "p": 0.5},
        {"op": "random_rotate", "max_degrees": 10},
        {"op": "random_brightness_contrast", "brightness": [-0.1, 0.1], "contrast": [0.8, 1.2]},
        {"op": "gaussian_noise", "std": 0.01},
        {"op": "denoise", "method": {"kind": "gaussian", "sigma": 0.8}},
        {"op": "resize", "width": 16, "height": 16},
        {"op": "grayscale"},
        {"op": "normalize", "mean": [0.5], "std": [0.25]}
    ]}
}"#;

#[derive(serde::Deserialize)]
struct JobSpec {
    dataset: String,
    preprocess: PipelineSpec,
}

#[test]
fn pipeline_from_a_job_spec_is_seeded() {
    let job: JobSpec = serde_json::from_str(JOB_SPEC).expect("parses");
    assert_eq!(job.dataset, "faces@3");
    assert!(job.preprocess.validate().is_empty());
    let pipeline = Pipeline::from_spec(&job.preprocess, &Registry::new()).expect("builds");
    assert!(pipeline.is_random());
    let img = ramp(32, 30);
    let a = pipeline.apply(img.clone(), &mut ChaCha8Rng::seed_from_u64(7)).expect("applies");
    let b = pipeline.apply(img.clone(), &mut ChaCha8Rng::seed_from_u64(7)).expect("applies");
    let c = pipeline.apply(img.clone(), &mut ChaCha8Rng::seed_from_u64(8)).expect("applies");
    assert_eq!((a.width, a.height, a.channels), (16, 16, 1));
    assert_eq!(a, b, "same seed, same output");
    assert_ne!(a, c, "other seed, other output");
    // Per-item generators: reproducible whatever order items are processed in.
    let first = pipeline.apply(img.clone(), &mut preprocess::item_rng(1, 5)).expect("applies");
    assert_eq!(first, pipeline.apply(img.clone(), &mut preprocess::item_rng(1, 5)).expect("applies"));
    assert_ne!(first, pipeline.apply(img, &mut preprocess::item_rng(1, 6)).expect("applies"));
    // Round trip through JSON.
    let json = serde_json::to_string(&job.preprocess).expect("serializes");
    assert_eq!(serde_json::from_str::<PipelineSpec>(&json).expect("parses"), job.preprocess);
}

#[test]
fn deterministic_steps_do_not_touch_the_generator() {
    let steps = vec![
        Step::FlipHorizontal { p: 1.0 },
        Step::FlipVertical { p: 0.0 },
        Step::Rotate { degrees: 30.0 },
        Step::RandomRotate { max_degrees: 0.0 },
        Step::BrightnessContrast { brightness: 0.1, contrast: 1.1 },
        Step::RandomBrightnessContrast { brightness: [0.1, 0.1], contrast: [1.0, 1.0] },
        Step::CenterCrop { width: 4, height: 4 },
    ];
    let pipeline = Pipeline::build(&steps, &Registry::new()).expect("valid");
    assert!(!pipeline.is_random());
    let mut rng = ChaCha8Rng::seed_from_u64(3);
    pipeline.apply(ramp(6, 6), &mut rng).expect("applies");
    assert_eq!(rng.next_u64(), ChaCha8Rng::seed_from_u64(3).next_u64(), "no draws");
}

#[test]
fn validation_lists_every_bad_field() {
    let spec: PipelineSpec = serde_json::from_str(
        r#"{"steps": [
            {"op": "resize", "width": 0, "height": 10},
            {"op": "flip_horizontal", "p": 1.5},
            {"op": "gaussian_noise", "std": 0},
            {"op": "normalize", "mean": [0.5, 0.5], "std": [1, 0, -1]},
            {"op": "random_brightness_contrast", "brightness": [0.2, -0.2], "contrast": [0.9, 1.1]},
            {"op": "denoise", "method": {"kind": "gaussian", "sigma": -1}},
            {"op": "random_scale", "min": 2, "max": 1}
        ]}"#,
    )
    .expect("parses");
    let errors: Vec<String> = spec.validate().iter().map(ToString::to_string).collect();
    let paths: Vec<&str> = errors.iter().map(|e| e.split(':').next().unwrap_or("")).collect();
    assert_eq!(
        paths,
        [
            "steps[0].width",
            "steps[1].p",
            "steps[2].std",
            "steps[3].mean",
            "steps[3].std",
            "steps[3].std[1]",
            "steps[3].std[2]",
            "steps[4].brightness",
            "steps[4]",
            "steps[5].method.sigma",
            "steps[6].max",
        ],
        "{errors:#?}"
    );
    assert!(errors.contains(&"steps[2].std: must be > 0".to_owned()));
    assert!(errors.iter().any(|e| e.starts_with("steps[4]: ") && e.contains("before normalize (steps[3])")), "{errors:#?}");
    let err = Pipeline::from_spec(&spec, &Registry::new()).map(|_| ()).expect_err("invalid");
    assert!(err.to_string().contains("steps[1].p: must be within 0..=1"), "{err}");
    // Unknown ops and fields are refused when parsing.
    for bad in [r#"{"op": "sharpen"}"#, r#"{"op": "flip_horizontal", "p": 0.5, "q": 1}"#, r#"{"op": "crop", "x": 0}"#] {
        assert!(serde_json::from_str::<Step>(bad).is_err(), "{bad}");
    }
}

/// Adds a constant; `{"add": 0.1}`.
struct AddConstant(f32);

impl CustomStep for AddConstant {
    fn apply(&self, mut img: Image, _rng: &mut dyn RngCore) -> Result<Image, PreprocessError> {
        img.data.iter_mut().for_each(|v| *v += self.0);
        Ok(img)
    }
    fn is_random(&self) -> bool {
        false
    }
}

fn registry() -> Registry {
    let mut registry = Registry::new();
    registry.register("add_constant", |params: &serde_json::Value| {
        let add = params.get("add").and_then(serde_json::Value::as_f64).ok_or_else(|| PreprocessError::Step("needs a number `add`".into()))?;
        Ok(Box::new(AddConstant(add as f32)) as Box<dyn CustomStep>)
    });
    registry
}

#[test]
fn custom_steps_are_registered_and_resolved_at_build() {
    let registry = registry();
    let steps: Vec<Step> =
        serde_json::from_str(r#"[{"op": "custom", "name": "add_constant", "params": {"add": 0.25}}, {"op": "flip_horizontal", "p": 1}]"#).expect("parses");
    let pipeline = Pipeline::build(&steps, &registry).expect("builds");
    assert!(!pipeline.is_random());
    let out = pipeline.apply(gray(&[&[0.0, 0.5]]), &mut ChaCha8Rng::seed_from_u64(0)).expect("applies");
    assert_eq!(out.data, [0.75, 0.25]);

    let unknown = [Step::Custom { name: "sharpen".into(), params: serde_json::Value::Null }];
    let err = Pipeline::build(&unknown, &registry).map(|_| ()).expect_err("unknown");
    let PreprocessError::Invalid(errors) = &err else { panic!("{err}") };
    assert_eq!(errors[0].path, "steps[0].name");
    assert!(errors[0].message.contains("sharpen") && errors[0].message.contains("add_constant"), "{err}");
    let bad_params = [Step::Custom { name: "add_constant".into(), params: serde_json::json!({"add": "lots"}) }];
    let err = Pipeline::build(&bad_params, &registry).map(|_| ()).expect_err("bad params");
    assert!(err.to_string().contains("steps[0].params: needs a number"), "{err}");
}

#[test]
fn a_custom_step_returning_a_broken_image_is_caught() {
    struct Broken;
    impl CustomStep for Broken {
        fn apply(&self, mut img: Image, _rng: &mut dyn RngCore) -> Result<Image, PreprocessError> {
            img.data.pop();
            Ok(img)
        }
    }
    let mut registry = Registry::new();
    registry.register("broken", |_: &serde_json::Value| Ok(Box::new(Broken) as Box<dyn CustomStep>));
    let pipeline = Pipeline::build(&[Step::Custom { name: "broken".into(), params: serde_json::Value::Null }, Step::FlipHorizontal { p: 1.0 }], &registry)
        .expect("builds");
    assert!(pipeline.is_random(), "custom steps are random unless they say otherwise");
    let err = pipeline.apply(ramp(3, 3), &mut ChaCha8Rng::seed_from_u64(0)).map(|_| ()).expect_err("broken");
    assert!(matches!(err, PreprocessError::Custom { .. }), "{err}");
    // A malformed input image is an error, not a panic.
    let bad = Image { width: 3, height: 3, channels: 3, data: vec![0.0; 5] };
    let flip = Pipeline::build(&[Step::FlipHorizontal { p: 1.0 }], &Registry::new()).expect("valid");
    assert!(matches!(flip.apply(bad, &mut ChaCha8Rng::seed_from_u64(0)), Err(PreprocessError::BadImage(_))));
}

fn arb_image() -> impl Strategy<Value = Image> {
    (1u32..12, 1u32..12, prop_oneof![Just(1u8), Just(3u8)]).prop_flat_map(|(w, h, c)| {
        proptest::collection::vec(0.0f32..1.0, (w * h * c as u32) as usize).prop_map(move |data| Image { width: w, height: h, channels: c, data })
    })
}

proptest! {
    #[test]
    fn flipping_twice_is_identity(img in arb_image()) {
        let mut twice = img.clone();
        preprocess::flip_horizontal(&mut twice);
        preprocess::flip_horizontal(&mut twice);
        prop_assert_eq!(&twice, &img);
        preprocess::flip_vertical(&mut twice);
        preprocess::flip_vertical(&mut twice);
        prop_assert_eq!(&twice, &img);
        prop_assert_eq!(&preprocess::rotate(&preprocess::rotate(&img, 90.0), 270.0), &img);
    }

    #[test]
    fn crop_succeeds_exactly_when_the_window_fits(img in arb_image(), x in 0u32..16, y in 0u32..16, w in 0u32..16, h in 0u32..16) {
        let fits = w > 0 && h > 0 && x + w <= img.width && y + h <= img.height;
        match preprocess::crop(&img, x, y, w, h) {
            Ok(out) => {
                prop_assert!(fits);
                prop_assert_eq!((out.width, out.height, out.data.len()), (w, h, (w * h * img.channels as u32) as usize));
                prop_assert_eq!(out.get(0, 0, 0), img.get(x, y, 0));
                prop_assert_eq!(out.get(w - 1, h - 1, 0), img.get(x + w - 1, y + h - 1, 0));
            }
            Err(PreprocessError::OutOfBounds { .. }) => prop_assert!(!fits),
            Err(e) => prop_assert!(false, "{}", e),
        }
    }

    #[test]
    fn random_pipelines_never_panic(img in arb_image(), seed in any::<u64>(), cw in 1u32..14, ch in 1u32..14) {
        let steps = vec![
            Step::RandomCrop { width: cw, height: ch },
            Step::RandomRotate { max_degrees: 45.0 },
            Step::RandomScale { min: 0.5, max: 2.0, filter: Filter::Bilinear },
            Step::Denoise { method: DenoiseMethod::Median3 },
        ];
        let pipeline = Pipeline::build(&steps, &Registry::new()).expect("valid");
        let result = pipeline.apply(img.clone(), &mut ChaCha8Rng::seed_from_u64(seed));
        prop_assert_eq!(result.is_ok(), cw <= img.width && ch <= img.height);
    }
}

//! Preprocessing and augmentation (SPEC §6): resize, crop, flip, rotate, grayscale,
//! normalize, brightness/contrast, noise, denoise, and plug-in custom steps, composed into a
//! [`Pipeline`] that a job spec describes as a list of [`Step`]s.
//!
//! A pipeline is checked completely when it is built ([`Pipeline::build`]): every bad field
//! is reported with its path (`steps[2].std: must be > 0`) and unknown custom steps are
//! refused, so a bad job spec fails before any data is touched. Applying it is deterministic
//! given the random generator: only the random steps draw from it, and steps whose
//! probability is 0 or 1 draw nothing. Random numbers are derived from the generator's raw
//! output with this module's own arithmetic rather than `rand`'s distributions, so a seed
//! gives the same augmentations across `rand` upgrades.
//!
//! Every operation also exists as a plain function ([`resize`], [`crop`], [`rotate`], …) for
//! callers that need one transform outside a pipeline (inference, previews).

use std::collections::BTreeMap;
use std::fmt;

use rand::{RngCore, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use crate::image::Image;

/// Outputs larger than this many pixels are refused instead of allocated (2^28, 16384²): a
/// mistyped scale factor must not take the machine's memory.
pub const MAX_OUTPUT_PIXELS: u64 = 1 << 28;

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Filter {
    /// Bilinear, widened when shrinking so that every source pixel contributes (what Pillow
    /// and torchvision's `antialias=True` do); a 2x downscale averages 2x2 blocks.
    #[default]
    Bilinear,
    Nearest,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, tag = "kind", rename_all = "snake_case")]
pub enum DenoiseMethod {
    /// 3x3 median per channel: removes salt-and-pepper noise, keeps edges.
    Median3,
    /// Gaussian blur with standard deviation `sigma` pixels.
    Gaussian { sigma: f32 },
}

/// One step of a pipeline, as a job spec writes it: `{"op": "resize", "width": 224, ...}`.
/// Angles are in degrees, counter-clockwise as the image is viewed.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, tag = "op", rename_all = "snake_case")]
pub enum Step {
    Resize {
        width: u32,
        height: u32,
        #[serde(default)]
        filter: Filter,
    },
    /// Both sides times `factor` (rounded, at least 1 pixel).
    Scale {
        factor: f32,
        #[serde(default)]
        filter: Filter,
    },
    /// [`Step::Scale`] by a factor drawn uniformly from `min..=max`.
    RandomScale {
        min: f32,
        max: f32,
        #[serde(default)]
        filter: Filter,
    },
    CenterCrop {
        width: u32,
        height: u32,
    },
    Crop {
        x: u32,
        y: u32,
        width: u32,
        height: u32,
    },
    /// A `width`x`height` window at a uniformly random position.
    RandomCrop {
        width: u32,
        height: u32,
    },
    /// Mirrors left-right with probability `p`.
    FlipHorizontal {
        p: f32,
    },
    /// Mirrors top-bottom with probability `p`.
    FlipVertical {
        p: f32,
    },
    /// Multiples of 90 are exact and lossless, and 90/270 swap width and height; any other
    /// angle rotates about the centre within the same canvas (bilinear, corners filled 0).
    Rotate {
        degrees: f32,
    },
    /// Rotates by an angle drawn uniformly from `-max_degrees..=max_degrees`, always within the
    /// same canvas (so every output of a pipeline has the same size).
    RandomRotate {
        max_degrees: f32,
    },
    /// RGB to luma, 0.299 R + 0.587 G + 0.114 B. With `keep_channels` the result keeps 3
    /// (equal) channels, for models that expect RGB input.
    Grayscale {
        #[serde(default)]
        keep_channels: bool,
    },
    /// `(v - mean[c]) / std[c]`, one value per channel (or one for all).
    Normalize {
        mean: Vec<f32>,
        std: Vec<f32>,
    },
    /// `(v - 0.5) * contrast + 0.5 + brightness`, clamped to 0..1. Identity: 0 and 1.
    BrightnessContrast {
        brightness: f32,
        contrast: f32,
    },
    /// [`Step::BrightnessContrast`] with each drawn uniformly from its `[min, max]`.
    RandomBrightnessContrast {
        brightness: [f32; 2],
        contrast: [f32; 2],
    },
    /// Adds normal noise of standard deviation `std` to every sample, clamped to 0..1.
    GaussianNoise {
        std: f32,
    },
    Denoise {
        method: DenoiseMethod,
    },
    /// A step registered in the [`Registry`] under `name`, configured by `params`.
    Custom {
        name: String,
        #[serde(default)]
        params: serde_json::Value,
    },
}

/// A pipeline as a job spec carries it: `{"steps": [...]}`.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PipelineSpec {
    pub steps: Vec<Step>,
}

impl PipelineSpec {
    /// Every bad field, without resolving custom steps (see [`validate`]).
    pub fn validate(&self) -> Vec<FieldError> {
        validate(&self.steps)
    }
}

/// One invalid field of a spec: `path` is like `steps[2].std`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FieldError {
    pub path: String,
    pub message: String,
}

impl FieldError {
    pub fn new(path: impl Into<String>, message: impl Into<String>) -> Self {
        FieldError { path: path.into(), message: message.into() }
    }
}

impl fmt::Display for FieldError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.path, self.message)
    }
}

/// `a: x; b: y`, for errors that carry a list of field errors.
pub fn join_field_errors(errors: &[FieldError]) -> String {
    errors.iter().map(ToString::to_string).collect::<Vec<_>>().join("; ")
}

#[derive(Debug, thiserror::Error)]
pub enum PreprocessError {
    #[error("invalid pipeline: {}", join_field_errors(.0))]
    Invalid(Vec<FieldError>),
    #[error("not a valid image: {0}")]
    BadImage(String),
    #[error("{op}: a {width}x{height} window at ({x}, {y}) does not fit in the {image_width}x{image_height} image")]
    OutOfBounds { op: &'static str, x: u32, y: u32, width: u32, height: u32, image_width: u32, image_height: u32 },
    #[error("normalize: {values} values per channel list, the image has {channels} channels")]
    ChannelMismatch { values: usize, channels: u8 },
    #[error("{op}: a {width}x{height} output is over the {MAX_OUTPUT_PIXELS}-pixel limit")]
    TooLarge { op: &'static str, width: u64, height: u64 },
    /// What a custom step reports; the pipeline adds the step's name.
    #[error("{0}")]
    Step(String),
    #[error("custom step {name:?}: {source}")]
    Custom { name: String, source: Box<PreprocessError> },
}

/// A user-supplied step. Implementations must draw randomness only from `rng`, so that
/// pipelines stay reproducible from a seed.
pub trait CustomStep: Send + Sync {
    fn apply(&self, img: Image, rng: &mut dyn RngCore) -> Result<Image, PreprocessError>;

    /// Whether the output depends on `rng`. Defaults to true, the safe answer for callers
    /// that would cache outputs of deterministic pipelines.
    fn is_random(&self) -> bool {
        true
    }
}

/// Makes a configured step from its spec's `params`; an error is reported as the field
/// `steps[i].params`.
pub type CustomFactory = Box<dyn Fn(&serde_json::Value) -> Result<Box<dyn CustomStep>, PreprocessError> + Send + Sync>;

/// Named custom steps a pipeline's [`Step::Custom`] entries may use.
#[derive(Default)]
pub struct Registry {
    factories: BTreeMap<String, CustomFactory>,
}

impl Registry {
    pub fn new() -> Self {
        Self::default()
    }

    /// Registers (or replaces) the factory for `name`.
    pub fn register<F>(&mut self, name: impl Into<String>, factory: F) -> &mut Self
    where
        F: Fn(&serde_json::Value) -> Result<Box<dyn CustomStep>, PreprocessError> + Send + Sync + 'static,
    {
        self.factories.insert(name.into(), Box::new(factory));
        self
    }

    pub fn contains(&self, name: &str) -> bool {
        self.factories.contains_key(name)
    }

    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.factories.keys().map(String::as_str)
    }
}

impl fmt::Debug for Registry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Registry").field("names", &self.factories.keys().collect::<Vec<_>>()).finish()
    }
}

/// A validated pipeline with its custom steps resolved. Cheap to share between data-loader
/// threads (`Send + Sync`).
pub struct Pipeline {
    steps: Vec<Step>,
    /// The resolved custom step for each `Step::Custom`, by index in `steps`.
    custom: BTreeMap<usize, Box<dyn CustomStep>>,
}

impl fmt::Debug for Pipeline {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Pipeline").field("steps", &self.steps).finish_non_exhaustive()
    }
}

impl Pipeline {
    /// Validates every step and resolves custom steps, reporting all problems at once.
    pub fn build(steps: &[Step], registry: &Registry) -> Result<Pipeline, PreprocessError> {
        let mut errors = validate(steps);
        let mut custom = BTreeMap::new();
        for (i, step) in steps.iter().enumerate() {
            let Step::Custom { name, params } = step else { continue };
            match registry.factories.get(name) {
                None if name.is_empty() => {} // already reported by validate()
                None => {
                    let known: Vec<&str> = registry.names().collect();
                    let known = if known.is_empty() { "none are registered".to_owned() } else { format!("registered: {}", known.join(", ")) };
                    errors.push(FieldError::new(format!("steps[{i}].name"), format!("unknown custom step {name:?} ({known})")));
                }
                Some(factory) => match factory(params) {
                    Ok(step) => {
                        custom.insert(i, step);
                    }
                    Err(e) => errors.push(FieldError::new(format!("steps[{i}].params"), e.to_string())),
                },
            }
        }
        if !errors.is_empty() {
            return Err(PreprocessError::Invalid(errors));
        }
        Ok(Pipeline { steps: steps.to_vec(), custom })
    }

    pub fn from_spec(spec: &PipelineSpec, registry: &Registry) -> Result<Pipeline, PreprocessError> {
        Self::build(&spec.steps, registry)
    }

    pub fn steps(&self) -> &[Step] {
        &self.steps
    }

    /// Whether any step's output depends on the random generator.
    pub fn is_random(&self) -> bool {
        self.steps.iter().enumerate().any(|(i, step)| match step {
            Step::Custom { .. } => self.custom.get(&i).is_some_and(|c| c.is_random()),
            Step::FlipHorizontal { p } | Step::FlipVertical { p } => *p > 0.0 && *p < 1.0,
            Step::RandomScale { min, max, .. } => min < max,
            Step::RandomRotate { max_degrees } => *max_degrees > 0.0,
            Step::RandomBrightnessContrast { brightness, contrast } => brightness[0] < brightness[1] || contrast[0] < contrast[1],
            Step::RandomCrop { .. } | Step::GaussianNoise { .. } => true,
            _ => false,
        })
    }

    /// Runs every step in order.
    pub fn apply(&self, img: Image, rng: &mut dyn RngCore) -> Result<Image, PreprocessError> {
        check_image(&img)?;
        let mut img = img;
        for (i, step) in self.steps.iter().enumerate() {
            img = match self.custom.get(&i) {
                Some(custom) => {
                    let name = match step {
                        Step::Custom { name, .. } => name.clone(),
                        _ => String::new(),
                    };
                    let out = custom.apply(img, rng).map_err(|e| PreprocessError::Custom { name: name.clone(), source: Box::new(e) })?;
                    // A plug-in's output is checked, so that later steps can index freely.
                    check_image(&out).map_err(|e| PreprocessError::Custom { name, source: Box::new(e) })?;
                    out
                }
                None => apply_step(step, img, rng)?,
            };
        }
        Ok(img)
    }
}

/// A generator for one item of one run: the same `(seed, item)` always gives the same
/// stream, whichever thread or in what order items are processed.
pub fn item_rng(seed: u64, item: u64) -> ChaCha8Rng {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    rng.set_stream(item);
    rng
}

/// Every bad field of `steps`, in order. Custom step names are resolved only by
/// [`Pipeline::build`].
pub fn validate(steps: &[Step]) -> Vec<FieldError> {
    let mut errors = Vec::new();
    let mut normalize_at = None;
    for (i, step) in steps.iter().enumerate() {
        let mut err = |field: &str, message: &str| {
            let path = if field.is_empty() { format!("steps[{i}]") } else { format!("steps[{i}].{field}") };
            errors.push(FieldError::new(path, message));
        };
        let positive = |v: f32| v.is_finite() && v > 0.0;
        let probability = |v: f32| (0.0..=1.0).contains(&v);
        match step {
            Step::Resize { width, height, .. } | Step::CenterCrop { width, height } | Step::RandomCrop { width, height } | Step::Crop { width, height, .. } => {
                if *width == 0 {
                    err("width", "must be >= 1");
                }
                if *height == 0 {
                    err("height", "must be >= 1");
                }
            }
            Step::Scale { factor, .. } => {
                if !positive(*factor) {
                    err("factor", "must be > 0");
                }
            }
            Step::RandomScale { min, max, .. } => {
                if !positive(*min) {
                    err("min", "must be > 0");
                }
                if !positive(*max) {
                    err("max", "must be > 0");
                } else if min > max {
                    err("max", "must be >= min");
                }
            }
            Step::FlipHorizontal { p } | Step::FlipVertical { p } => {
                if !probability(*p) {
                    err("p", "must be within 0..=1");
                }
            }
            Step::Rotate { degrees } => {
                if !degrees.is_finite() {
                    err("degrees", "must be a finite number");
                }
            }
            Step::RandomRotate { max_degrees } => {
                if !(0.0..=180.0).contains(max_degrees) {
                    err("max_degrees", "must be within 0..=180");
                }
            }
            Step::Grayscale { .. } => {}
            Step::Normalize { mean, std } => {
                normalize_at.get_or_insert(i);
                for (name, values) in [("mean", mean), ("std", std)] {
                    if !matches!(values.len(), 1 | 3) {
                        err(name, "must have 1 or 3 values (one per channel)");
                    }
                }
                if mean.len() != std.len() {
                    err("std", "must have as many values as mean");
                }
                for (j, m) in mean.iter().enumerate() {
                    if !m.is_finite() {
                        err(&format!("mean[{j}]"), "must be a finite number");
                    }
                }
                for (j, s) in std.iter().enumerate() {
                    if !positive(*s) {
                        err(&format!("std[{j}]"), "must be > 0");
                    }
                }
            }
            Step::BrightnessContrast { brightness, contrast } => {
                if !brightness.is_finite() {
                    err("brightness", "must be a finite number");
                }
                if !(contrast.is_finite() && *contrast >= 0.0) {
                    err("contrast", "must be >= 0");
                }
            }
            Step::RandomBrightnessContrast { brightness, contrast } => {
                if !(brightness.iter().all(|v| v.is_finite()) && brightness[0] <= brightness[1]) {
                    err("brightness", "must be [min, max] with min <= max");
                }
                if !(contrast.iter().all(|v| v.is_finite() && *v >= 0.0) && contrast[0] <= contrast[1]) {
                    err("contrast", "must be [min, max] with 0 <= min <= max");
                }
            }
            Step::GaussianNoise { std } => {
                if !positive(*std) {
                    err("std", "must be > 0");
                }
            }
            Step::Denoise { method: DenoiseMethod::Median3 } => {}
            Step::Denoise { method: DenoiseMethod::Gaussian { sigma } } => {
                if !(positive(*sigma) && *sigma <= 50.0) {
                    err("method.sigma", "must be within (0, 50]");
                }
            }
            Step::Custom { name, .. } => {
                if name.is_empty() {
                    err("name", "must not be empty");
                }
            }
        }
        // These clamp to 0..1, which would wipe out normalized (zero-mean) values.
        let clamps = matches!(step, Step::BrightnessContrast { .. } | Step::RandomBrightnessContrast { .. } | Step::GaussianNoise { .. });
        if let (true, Some(n)) = (clamps, normalize_at) {
            err("", &format!("works on 0..1 values (it clamps), so it must come before normalize (steps[{n}])"));
        }
    }
    errors
}

fn check_image(img: &Image) -> Result<(), PreprocessError> {
    if !matches!(img.channels, 1 | 3) {
        return Err(PreprocessError::BadImage(format!("{} channels, expected 1 or 3", img.channels)));
    }
    if img.width == 0 || img.height == 0 {
        return Err(PreprocessError::BadImage(format!("{}x{} pixels", img.width, img.height)));
    }
    let expected = img.width as usize * img.height as usize * img.channels as usize;
    if img.data.len() != expected {
        return Err(PreprocessError::BadImage(format!("{} samples for {}x{}x{}, expected {expected}", img.data.len(), img.width, img.height, img.channels)));
    }
    Ok(())
}

fn apply_step(step: &Step, mut img: Image, rng: &mut dyn RngCore) -> Result<Image, PreprocessError> {
    Ok(match step {
        Step::Resize { width, height, filter } => resize(&img, *width, *height, *filter)?,
        Step::Scale { factor, filter } => scale(&img, *factor, *filter)?,
        Step::RandomScale { min, max, filter } => scale(&img, uniform(rng, *min, *max), *filter)?,
        Step::CenterCrop { width, height } => center_crop(&img, *width, *height)?,
        Step::Crop { x, y, width, height } => crop(&img, *x, *y, *width, *height)?,
        Step::RandomCrop { width, height } => {
            if *width > img.width || *height > img.height {
                return Err(out_of_bounds("random_crop", 0, 0, *width, *height, &img));
            }
            let x = below(rng, img.width - width + 1);
            let y = below(rng, img.height - height + 1);
            crop(&img, x, y, *width, *height)?
        }
        Step::FlipHorizontal { p } => {
            if chance(rng, *p) {
                flip_horizontal(&mut img);
            }
            img
        }
        Step::FlipVertical { p } => {
            if chance(rng, *p) {
                flip_vertical(&mut img);
            }
            img
        }
        Step::Rotate { degrees } => rotate(&img, *degrees),
        Step::RandomRotate { max_degrees } => {
            if *max_degrees > 0.0 {
                rotate_within(&img, uniform(rng, -max_degrees, *max_degrees))
            } else {
                img
            }
        }
        Step::Grayscale { keep_channels } => grayscale(&img, *keep_channels),
        Step::Normalize { mean, std } => {
            normalize(&mut img, mean, std)?;
            img
        }
        Step::BrightnessContrast { brightness, contrast } => {
            brightness_contrast(&mut img, *brightness, *contrast);
            img
        }
        Step::RandomBrightnessContrast { brightness, contrast } => {
            let b = uniform(rng, brightness[0], brightness[1]);
            let c = uniform(rng, contrast[0], contrast[1]);
            brightness_contrast(&mut img, b, c);
            img
        }
        Step::GaussianNoise { std } => {
            gaussian_noise(&mut img, *std, rng);
            img
        }
        Step::Denoise { method: DenoiseMethod::Median3 } => median3(&img),
        Step::Denoise { method: DenoiseMethod::Gaussian { sigma } } => gaussian_blur(&img, *sigma),
        // Pipeline::build resolved every custom step; one missing here was not built by it.
        Step::Custom { name, .. } => {
            return Err(PreprocessError::Custom { name: name.clone(), source: Box::new(PreprocessError::Step("not resolved".into())) })
        }
    })
}

// ---- randomness: from raw generator output, stable across `rand` versions ----

/// Uniform in `[0, 1)` with 24 bits, exactly representable in `f32`.
fn unit(rng: &mut dyn RngCore) -> f32 {
    (rng.next_u32() >> 8) as f32 * (1.0 / (1u32 << 24) as f32)
}

/// Uniform in `[lo, hi]`; `lo` without drawing when the range is empty.
fn uniform(rng: &mut dyn RngCore, lo: f32, hi: f32) -> f32 {
    if hi <= lo {
        return lo;
    }
    lo + (hi - lo) * unit(rng)
}

/// Uniform in `0..n` (n >= 1), by multiply-shift; draws nothing for n = 1.
fn below(rng: &mut dyn RngCore, n: u32) -> u32 {
    if n <= 1 {
        return 0;
    }
    ((u64::from(rng.next_u32()) * u64::from(n)) >> 32) as u32
}

/// True with probability `p`; draws nothing when `p` is 0 or 1, so those are deterministic
/// and do not shift the random stream of later steps.
fn chance(rng: &mut dyn RngCore, p: f32) -> bool {
    if p <= 0.0 {
        false
    } else if p >= 1.0 {
        true
    } else {
        unit(rng) < p
    }
}

// ---- geometry ----

fn out_of_bounds(op: &'static str, x: u32, y: u32, width: u32, height: u32, img: &Image) -> PreprocessError {
    PreprocessError::OutOfBounds { op, x, y, width, height, image_width: img.width, image_height: img.height }
}

fn check_output(op: &'static str, width: u64, height: u64) -> Result<(), PreprocessError> {
    if width == 0 || height == 0 || width * height > MAX_OUTPUT_PIXELS {
        return Err(PreprocessError::TooLarge { op, width, height });
    }
    Ok(())
}

/// The `width`x`height` window with top-left corner `(x, y)`; an error unless it lies inside.
pub fn crop(img: &Image, x: u32, y: u32, width: u32, height: u32) -> Result<Image, PreprocessError> {
    let fits = width > 0 && height > 0 && u64::from(x) + u64::from(width) <= u64::from(img.width) && u64::from(y) + u64::from(height) <= u64::from(img.height);
    if !fits {
        return Err(out_of_bounds("crop", x, y, width, height, img));
    }
    let c = img.channels as usize;
    let row_len = width as usize * c;
    let mut data = Vec::with_capacity(row_len * height as usize);
    for row in y..y + height {
        let start = img.index(x, row, 0);
        data.extend_from_slice(&img.data[start..start + row_len]);
    }
    Ok(Image { width, height, channels: img.channels, data })
}

/// The centred `width`x`height` window (rounded towards the top-left).
pub fn center_crop(img: &Image, width: u32, height: u32) -> Result<Image, PreprocessError> {
    if width > img.width || height > img.height {
        return Err(out_of_bounds("center_crop", 0, 0, width, height, img));
    }
    crop(img, (img.width - width) / 2, (img.height - height) / 2, width, height)
}

pub fn flip_horizontal(img: &mut Image) {
    let c = img.channels as usize;
    let w = img.width as usize;
    if w == 0 || c == 0 {
        return;
    }
    for row in img.data.chunks_exact_mut(w * c) {
        for x in 0..w / 2 {
            let (left, right) = row.split_at_mut((w - 1 - x) * c);
            left[x * c..x * c + c].swap_with_slice(&mut right[..c]);
        }
    }
}

pub fn flip_vertical(img: &mut Image) {
    let row_len = img.width as usize * img.channels as usize;
    let h = img.height as usize;
    if row_len == 0 {
        return;
    }
    for y in 0..h / 2 {
        let (top, bottom) = img.data.split_at_mut((h - 1 - y) * row_len);
        top[y * row_len..(y + 1) * row_len].swap_with_slice(&mut bottom[..row_len]);
    }
}

/// Rotates counter-clockwise by `degrees`. Multiples of 90 are exact (90 and 270 swap width
/// and height); other angles rotate within the same canvas, see [`rotate_within`].
pub fn rotate(img: &Image, degrees: f32) -> Image {
    let turned = f64::from(degrees).rem_euclid(360.0);
    if turned == 0.0 {
        img.clone()
    } else if turned == 90.0 {
        rotate90(img, true)
    } else if turned == 180.0 {
        let c = img.channels as usize;
        let mut out = img.clone();
        // 180 degrees is the pixel sequence reversed.
        for (dst, src) in out.data.chunks_exact_mut(c).zip(img.data.chunks_exact(c).rev()) {
            dst.copy_from_slice(src);
        }
        out
    } else if turned == 270.0 {
        rotate90(img, false)
    } else {
        rotate_within(img, degrees)
    }
}

fn rotate90(img: &Image, counter_clockwise: bool) -> Image {
    let (w, h, c) = (img.width, img.height, img.channels as usize);
    let mut out = Image::new(h, w, img.channels);
    let mut i = 0;
    for y in 0..w {
        for x in 0..h {
            let (sx, sy) = if counter_clockwise { (w - 1 - y, x) } else { (y, h - 1 - x) };
            let s = img.index(sx, sy, 0);
            out.data[i..i + c].copy_from_slice(&img.data[s..s + c]);
            i += c;
        }
    }
    out
}

/// Rotates counter-clockwise by `degrees` about the image centre, keeping the canvas size:
/// bilinear sampling, and 0 where the rotated image does not cover the canvas.
pub fn rotate_within(img: &Image, degrees: f32) -> Image {
    let (w, h, c) = (img.width as usize, img.height as usize, img.channels as usize);
    let mut out = Image::new(img.width, img.height, img.channels);
    let theta = f64::from(degrees).to_radians();
    let (sin, cos) = (theta.sin() as f32, theta.cos() as f32);
    let (cx, cy) = ((w as f32 - 1.0) / 2.0, (h as f32 - 1.0) / 2.0);
    let mut acc = [0.0f32; 3];
    for y in 0..h {
        let dy = y as f32 - cy;
        for x in 0..w {
            let dx = x as f32 - cx;
            // Inverse map: where in the source this output pixel comes from (y points down,
            // so a counter-clockwise turn as viewed has these signs).
            let sx = dx * cos - dy * sin + cx;
            let sy = dx * sin + dy * cos + cy;
            let (x0, y0) = (sx.floor(), sy.floor());
            let (fx, fy) = (sx - x0, sy - y0);
            acc[..c].fill(0.0);
            for (yy, wy) in [(y0, 1.0 - fy), (y0 + 1.0, fy)] {
                if yy < 0.0 || yy >= h as f32 || wy == 0.0 {
                    continue;
                }
                for (xx, wx) in [(x0, 1.0 - fx), (x0 + 1.0, fx)] {
                    if xx < 0.0 || xx >= w as f32 || wx == 0.0 {
                        continue;
                    }
                    let s = (yy as usize * w + xx as usize) * c;
                    for (a, v) in acc[..c].iter_mut().zip(&img.data[s..s + c]) {
                        *a += wx * wy * v;
                    }
                }
            }
            let d = (y * w + x) * c;
            out.data[d..d + c].copy_from_slice(&acc[..c]);
        }
    }
    out
}

/// Both sides times `factor`, rounded, at least 1.
pub fn scale(img: &Image, factor: f32, filter: Filter) -> Result<Image, PreprocessError> {
    let side = |v: u32| (f64::from(v) * f64::from(factor)).round().max(1.0);
    let (w, h) = (side(img.width), side(img.height));
    if !(w.is_finite() && h.is_finite()) || w * h > MAX_OUTPUT_PIXELS as f64 {
        return Err(PreprocessError::TooLarge { op: "scale", width: w as u64, height: h as u64 });
    }
    resize(img, w as u32, h as u32, filter)
}

/// Per output coordinate: the first source index and `kernel` weights (normalized, padded
/// with zeros), computed once per resize instead of per pixel.
struct Taps {
    start: Vec<usize>,
    kernel: usize,
    weights: Vec<f32>,
}

fn bilinear_taps(src: u32, dst: u32) -> Taps {
    let scale = f64::from(src) / f64::from(dst);
    // Shrinking widens the triangle so that it covers every source pixel (antialiasing).
    let support = scale.max(1.0);
    let kernel = (support.ceil() as usize) * 2 + 1;
    let mut start = Vec::with_capacity(dst as usize);
    let mut weights = vec![0.0f32; dst as usize * kernel];
    for i in 0..dst as usize {
        let center = (i as f64 + 0.5) * scale;
        let lo = ((center - support + 0.5).floor().max(0.0)) as usize;
        let hi = ((center + support + 0.5).floor() as usize).min(src as usize).max(lo + 1);
        let row = &mut weights[i * kernel..(i + 1) * kernel];
        let mut sum = 0.0;
        for (k, j) in (lo..hi).take(kernel).enumerate() {
            let t = ((j as f64 + 0.5 - center) / support).abs();
            let wgt = (1.0 - t).max(0.0);
            row[k] = wgt as f32;
            sum += wgt;
        }
        if sum > 0.0 {
            for v in row.iter_mut() {
                *v = (f64::from(*v) / sum) as f32;
            }
        } else {
            row[0] = 1.0;
        }
        start.push(lo);
    }
    Taps { start, kernel, weights }
}

pub fn resize(img: &Image, width: u32, height: u32, filter: Filter) -> Result<Image, PreprocessError> {
    check_output("resize", u64::from(width), u64::from(height))?;
    if width == img.width && height == img.height {
        return Ok(img.clone());
    }
    match filter {
        Filter::Nearest => Ok(resize_nearest(img, width, height)),
        Filter::Bilinear => Ok(resize_bilinear(img, width, height)),
    }
}

fn resize_nearest(img: &Image, width: u32, height: u32) -> Image {
    let c = img.channels as usize;
    let map = |src: u32, dst: u32| -> Vec<usize> {
        (0..dst).map(|i| (((f64::from(i) + 0.5) * f64::from(src) / f64::from(dst)) as usize).min(src as usize - 1)).collect()
    };
    let (xs, ys) = (map(img.width, width), map(img.height, height));
    let mut data = Vec::with_capacity(width as usize * height as usize * c);
    for &sy in &ys {
        let row = &img.data[sy * img.width as usize * c..(sy + 1) * img.width as usize * c];
        for &sx in &xs {
            data.extend_from_slice(&row[sx * c..sx * c + c]);
        }
    }
    Image { width, height, channels: img.channels, data }
}

fn resize_bilinear(img: &Image, width: u32, height: u32) -> Image {
    let c = img.channels as usize;
    let (sw, sh) = (img.width as usize, img.height as usize);
    let (dw, dh) = (width as usize, height as usize);
    // Horizontal pass into an sh x dw buffer, then vertical; skipped where a side keeps its size.
    let horizontal = if dw == sw {
        img.data.clone()
    } else {
        let taps = bilinear_taps(img.width, width);
        let mut tmp = vec![0.0f32; sh * dw * c];
        for (src_row, dst_row) in img.data.chunks_exact(sw * c).zip(tmp.chunks_exact_mut(dw * c)) {
            for (x, dst) in dst_row.chunks_exact_mut(c).enumerate() {
                let weights = &taps.weights[x * taps.kernel..(x + 1) * taps.kernel];
                let start = taps.start[x];
                for (k, &wgt) in weights.iter().enumerate() {
                    if wgt == 0.0 {
                        continue;
                    }
                    let s = (start + k) * c;
                    for (d, v) in dst.iter_mut().zip(&src_row[s..s + c]) {
                        *d += wgt * v;
                    }
                }
            }
        }
        tmp
    };
    if dh == sh {
        return Image { width, height, channels: img.channels, data: horizontal };
    }
    let taps = bilinear_taps(img.height, height);
    let row_len = dw * c;
    let mut data = vec![0.0f32; dh * row_len];
    for (y, dst_row) in data.chunks_exact_mut(row_len).enumerate() {
        let weights = &taps.weights[y * taps.kernel..(y + 1) * taps.kernel];
        for (k, &wgt) in weights.iter().enumerate() {
            if wgt == 0.0 {
                continue;
            }
            let s = (taps.start[y] + k) * row_len;
            // Whole rows at a time: contiguous, so the compiler vectorizes it.
            for (d, v) in dst_row.iter_mut().zip(&horizontal[s..s + row_len]) {
                *d += wgt * v;
            }
        }
    }
    Image { width, height, channels: img.channels, data }
}

// ---- colour and values ----

/// Luma (ITU-R BT.601 weights). A grayscale input is returned as is.
pub fn grayscale(img: &Image, keep_channels: bool) -> Image {
    if img.channels != 3 {
        return img.clone();
    }
    let luma = img.data.chunks_exact(3).map(|p| 0.299 * p[0] + 0.587 * p[1] + 0.114 * p[2]);
    if keep_channels {
        Image { width: img.width, height: img.height, channels: 3, data: luma.flat_map(|v| [v, v, v]).collect() }
    } else {
        Image { width: img.width, height: img.height, channels: 1, data: luma.collect() }
    }
}

/// `(v - mean[c]) / std[c]` in place; one value applies to every channel.
pub fn normalize(img: &mut Image, mean: &[f32], std: &[f32]) -> Result<(), PreprocessError> {
    let c = img.channels as usize;
    let per_channel = |values: &[f32]| -> Result<[f32; 3], PreprocessError> {
        match values.len() {
            1 => Ok([values[0]; 3]),
            n if n == c => {
                let mut out = [values[0]; 3];
                out[..n].copy_from_slice(values);
                Ok(out)
            }
            n => Err(PreprocessError::ChannelMismatch { values: n, channels: img.channels }),
        }
    };
    let mean = per_channel(mean)?;
    let inv_std = per_channel(std)?.map(|s| 1.0 / s);
    for px in img.data.chunks_exact_mut(c) {
        for (k, v) in px.iter_mut().enumerate() {
            *v = (*v - mean[k]) * inv_std[k];
        }
    }
    Ok(())
}

/// `(v - 0.5) * contrast + 0.5 + brightness`, clamped to 0..1, in place.
pub fn brightness_contrast(img: &mut Image, brightness: f32, contrast: f32) {
    let offset = 0.5 - 0.5 * contrast + brightness;
    for v in &mut img.data {
        *v = (*v * contrast + offset).clamp(0.0, 1.0);
    }
}

/// Adds N(0, std²) to every sample (Box-Muller, two samples per pair of draws), clamped.
pub fn gaussian_noise(img: &mut Image, std: f32, rng: &mut dyn RngCore) {
    let mut pairs = img.data.chunks_exact_mut(2);
    for pair in &mut pairs {
        let (a, b) = normal_pair(rng);
        pair[0] = (pair[0] + a * std).clamp(0.0, 1.0);
        pair[1] = (pair[1] + b * std).clamp(0.0, 1.0);
    }
    if let [last] = pairs.into_remainder() {
        *last = (*last + normal_pair(rng).0 * std).clamp(0.0, 1.0);
    }
}

fn normal_pair(rng: &mut dyn RngCore) -> (f32, f32) {
    // u1 in (0, 1], so ln never sees 0.
    let u1 = 1.0 - unit(rng);
    let u2 = unit(rng);
    let r = (-2.0 * u1.ln()).sqrt();
    let (s, c) = (std::f32::consts::TAU * u2).sin_cos();
    (r * c, r * s)
}

// ---- denoising ----

/// 3x3 median per channel, edges replicated.
pub fn median3(img: &Image) -> Image {
    let (w, h, c) = (img.width as usize, img.height as usize, img.channels as usize);
    let mut out = Image::new(img.width, img.height, img.channels);
    let mut window = [0.0f32; 9];
    for y in 0..h {
        let rows = [y.saturating_sub(1), y, (y + 1).min(h - 1)];
        for x in 0..w {
            let cols = [x.saturating_sub(1), x, (x + 1).min(w - 1)];
            for ch in 0..c {
                let mut k = 0;
                for &yy in &rows {
                    for &xx in &cols {
                        window[k] = img.data[(yy * w + xx) * c + ch];
                        k += 1;
                    }
                }
                let (_, median, _) = window.select_nth_unstable_by(4, f32::total_cmp);
                out.data[(y * w + x) * c + ch] = *median;
            }
        }
    }
    out
}

/// Separable Gaussian blur (radius 3 sigma), edges replicated.
pub fn gaussian_blur(img: &Image, sigma: f32) -> Image {
    let (w, h, c) = (img.width as usize, img.height as usize, img.channels as usize);
    let radius = (3.0 * sigma).ceil().max(1.0) as usize;
    let mut kernel: Vec<f32> = (0..=2 * radius)
        .map(|i| {
            let d = i as f32 - radius as f32;
            (-d * d / (2.0 * sigma * sigma)).exp()
        })
        .collect();
    let sum: f32 = kernel.iter().sum();
    kernel.iter_mut().for_each(|k| *k /= sum);

    let clamp = |v: isize, n: usize| v.clamp(0, n as isize - 1) as usize;
    let mut tmp = vec![0.0f32; img.data.len()];
    for y in 0..h {
        let row = &img.data[y * w * c..(y + 1) * w * c];
        let dst = &mut tmp[y * w * c..(y + 1) * w * c];
        for x in 0..w {
            for (k, &wgt) in kernel.iter().enumerate() {
                let sx = clamp(x as isize + k as isize - radius as isize, w);
                for ch in 0..c {
                    dst[x * c + ch] += wgt * row[sx * c + ch];
                }
            }
        }
    }
    let row_len = w * c;
    let mut out = Image::new(img.width, img.height, img.channels);
    for (y, dst) in out.data.chunks_exact_mut(row_len).enumerate() {
        for (k, &wgt) in kernel.iter().enumerate() {
            let sy = clamp(y as isize + k as isize - radius as isize, h);
            for (d, v) in dst.iter_mut().zip(&tmp[sy * row_len..(sy + 1) * row_len]) {
                *d += wgt * v;
            }
        }
    }
    out
}

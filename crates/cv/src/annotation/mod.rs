//! Annotations: one in-memory model ([`AnnotationSet`]) and the three formats the pipeline
//! meets in the wild, COCO JSON ([`coco`]), Pascal VOC XML ([`voc`]) and YOLO txt ([`yolo`]).
//!
//! Every format converts through the model, so a COCO → YOLO conversion is `coco::read`
//! followed by `yolo::write`, and each format has exactly one place that knows its quirks.
//!
//! Conventions of the model, which every format converts to and from:
//! - coordinates are `f32` pixels in a continuous space with the origin at the top-left corner
//!   of the image: pixel `(i, j)` covers `[i, i+1) × [j, j+1)`, so a box covering a whole
//!   `W × H` image is `x = 0, y = 0, w = W, h = H`;
//! - shapes must lie inside the image, with [`EDGE_TOLERANCE_PX`] of slack because real
//!   labelling tools round and overhang by a fraction of a pixel;
//! - scores, where present (model pre-annotations), are confidences in `0.0..=1.0`.
//!
//! Files are validated when read *and* when written: a writer refuses a model it cannot
//! represent faithfully (with [`AnnotationError::Unsupported`]) or that is invalid, rather
//! than writing a file another tool would misread.

pub mod coco;
pub mod voc;
pub mod yolo;

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
pub use suanli_annotation::rle::{Rle, RleError};

pub type Result<T, E = AnnotationError> = std::result::Result<T, E>;

/// How far (in pixels) a shape may extend past the image's edges and still be accepted.
/// Annotation tools round coordinates and real datasets (COCO among them) contain boxes that
/// overhang by a fraction of a pixel; anything beyond this is a labelling error.
pub const EDGE_TOLERANCE_PX: f32 = 1.0;

/// The geometry of one annotated object, in pixels (see the module docs for the convention).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Shape {
    /// An axis-aligned box: top-left corner and size.
    Box { x: f32, y: f32, w: f32, h: f32 },
    /// A closed polygon (instance segmentation), at least 3 vertices.
    Polygon { points: Vec<(f32, f32)> },
    /// Keypoints (pose); only labelled points, at least one.
    Points { points: Vec<(f32, f32)> },
    /// A region of pixels (a brush mask, a COCO RLE segmentation) over the whole image: COCO's
    /// uncompressed run-length encoding, column-major, sized `[height, width]` of its image.
    Mask { rle: Rle },
}

/// Which kind of [`Shape`] an object has, for errors that talk about shapes without their data.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ShapeKind {
    Box,
    Polygon,
    Points,
    Mask,
}

impl fmt::Display for ShapeKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            ShapeKind::Box => "box",
            ShapeKind::Polygon => "polygon",
            ShapeKind::Points => "keypoints",
            ShapeKind::Mask => "mask",
        })
    }
}

impl Shape {
    pub fn kind(&self) -> ShapeKind {
        match self {
            Shape::Box { .. } => ShapeKind::Box,
            Shape::Polygon { .. } => ShapeKind::Polygon,
            Shape::Points { .. } => ShapeKind::Points,
            Shape::Mask { .. } => ShapeKind::Mask,
        }
    }

    /// The tightest box around the shape as `(x, y, w, h)`; `None` for a shape without points.
    /// Formats that need a box for every object (COCO's `bbox`, VOC's `<bndbox>`) use it.
    pub fn bounds(&self) -> Option<(f32, f32, f32, f32)> {
        match self {
            Shape::Box { x, y, w, h } => Some((*x, *y, *w, *h)),
            Shape::Polygon { points } | Shape::Points { points } => {
                let (first, rest) = points.split_first()?;
                let (mut x0, mut y0, mut x1, mut y1) = (first.0, first.1, first.0, first.1);
                for &(x, y) in rest {
                    x0 = x0.min(x);
                    y0 = y0.min(y);
                    x1 = x1.max(x);
                    y1 = y1.max(y);
                }
                Some((x0, y0, x1 - x0, y1 - y0))
            }
            Shape::Mask { rle } => rle.bounds().map(|(x, y, w, h)| (x as f32, y as f32, w as f32, h as f32)),
        }
    }

    /// Area in square pixels: the box's, the polygon's (shoelace formula), the mask's pixels
    /// set, or 0 for keypoints.
    pub fn area(&self) -> f32 {
        match self {
            Shape::Box { w, h, .. } => w * h,
            Shape::Polygon { points } => {
                let n = points.len();
                let twice: f64 = (0..n)
                    .map(|i| {
                        let (xa, ya) = points[i];
                        let (xb, yb) = points[(i + 1) % n];
                        f64::from(xa) * f64::from(yb) - f64::from(xb) * f64::from(ya)
                    })
                    .sum();
                (twice.abs() / 2.0) as f32
            }
            Shape::Points { .. } => 0.0,
            Shape::Mask { rle } => rle.area() as f32,
        }
    }

    /// Checks the shape against an image of `width × height` pixels.
    pub fn validate(&self, width: u32, height: u32) -> Result<(), Problem> {
        let (wf, hf) = (width as f32, height as f32);
        let inside = |x: f32, y: f32| (-EDGE_TOLERANCE_PX..=wf + EDGE_TOLERANCE_PX).contains(&x) && (-EDGE_TOLERANCE_PX..=hf + EDGE_TOLERANCE_PX).contains(&y);
        let outside = Problem::OutsideImage { width, height };
        match self {
            Shape::Box { x, y, w, h } => {
                if ![x, y, w, h].iter().all(|v| v.is_finite()) {
                    return Err(Problem::NotFinite);
                }
                if *w < 0.0 || *h < 0.0 {
                    return Err(Problem::NegativeSize { w: *w, h: *h });
                }
                if !inside(*x, *y) || !inside(x + w, y + h) {
                    return Err(outside);
                }
            }
            Shape::Polygon { points } | Shape::Points { points } => {
                let min = if self.kind() == ShapeKind::Polygon { 3 } else { 1 };
                if points.len() < min {
                    return Err(Problem::TooFewPoints { kind: self.kind(), found: points.len(), min });
                }
                if !points.iter().all(|(x, y)| x.is_finite() && y.is_finite()) {
                    return Err(Problem::NotFinite);
                }
                if !points.iter().all(|&(x, y)| inside(x, y)) {
                    return Err(outside);
                }
            }
            Shape::Mask { rle } => {
                rle.check(width, height).map_err(Problem::Mask)?;
                if rle.area() == 0 {
                    return Err(Problem::EmptyMask);
                }
            }
        }
        Ok(())
    }
}

/// One labelled (or predicted) object.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Object {
    pub category: String,
    pub shape: Shape,
    /// Confidence of a model pre-annotation, `0.0..=1.0`; `None` for human labels.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub score: Option<f32>,
}

impl Object {
    /// Checks the shape against the image and the score's range.
    pub fn validate(&self, width: u32, height: u32) -> Result<(), Problem> {
        self.shape.validate(width, height)?;
        match self.score {
            Some(score) if !(0.0..=1.0).contains(&score) => Err(Problem::ScoreOutOfRange { score }),
            _ => Ok(()),
        }
    }
}

/// The annotations of one image.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct AnnotatedImage {
    /// The image's file name (no directory), as the formats record it.
    pub file_name: String,
    pub width: u32,
    pub height: u32,
    pub objects: Vec<Object>,
}

impl AnnotatedImage {
    /// Checks size and objects; with `categories`, also that every object's category is listed.
    /// Errors point at the object (by image name and index), for writers to report.
    pub fn validate(&self, categories: Option<&[String]>) -> Result<()> {
        check_image_size(self.width, self.height).map_err(|problem| AnnotationError::invalid(Location::Image(self.file_name.clone()), problem))?;
        for (index, object) in self.objects.iter().enumerate() {
            let at = || Location::Object { image: self.file_name.clone(), index };
            if let Some(categories) = categories {
                if !categories.contains(&object.category) {
                    return Err(AnnotationError::UnknownCategory { at: at().into(), category: object.category.clone() });
                }
            }
            object.validate(self.width, self.height).map_err(|problem| AnnotationError::invalid(at(), problem))?;
        }
        Ok(())
    }

    /// The file name without its extension: the name of the per-image label file in VOC and
    /// YOLO layouts.
    pub fn stem(&self) -> &str {
        file_stem(&self.file_name)
    }
}

fn file_stem(file_name: &str) -> &str {
    Path::new(file_name).file_stem().and_then(|s| s.to_str()).unwrap_or(file_name)
}

/// A whole dataset's annotations.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct AnnotationSet {
    /// Ordered category names: the index is the YOLO class id, and COCO writes `index + 1` as
    /// the category id (COCO reserves 0 for background by convention).
    pub categories: Vec<String>,
    pub images: Vec<AnnotatedImage>,
}

impl AnnotationSet {
    /// The index (YOLO class id) of a category.
    pub fn category_index(&self, name: &str) -> Option<usize> {
        self.categories.iter().position(|c| c == name)
    }

    /// The index of a category, appending it when it is new.
    pub fn add_category(&mut self, name: &str) -> usize {
        self.category_index(name).unwrap_or_else(|| {
            self.categories.push(name.to_owned());
            self.categories.len() - 1
        })
    }

    /// Checks every image and that every object's category is listed (once).
    pub fn validate(&self) -> Result<()> {
        let mut seen = HashMap::new();
        for (index, name) in self.categories.iter().enumerate() {
            if seen.insert(name.as_str(), index).is_some() {
                return Err(AnnotationError::Duplicate { at: Location::Category(index).into(), kind: DuplicateKind::CategoryName, id: name.clone() });
            }
        }
        self.images.iter().try_for_each(|image| image.validate(Some(&self.categories)))
    }

    /// Writes the conventional layout of `format` under `dir`, creating directories:
    /// COCO `annotations.json`; VOC `Annotations/<stem>.xml` per image; YOLO
    /// `labels/<stem>.txt` per image plus `classes.txt` (images themselves are not written).
    pub fn write_dir(&self, format: Format, dir: &Path) -> Result<()> {
        self.validate()?;
        match format {
            Format::Coco => write_file(&dir.join(COCO_FILE), &coco::write(self)?),
            Format::Voc => self.write_per_image(&dir.join(VOC_DIR), "xml", voc::write),
            Format::Yolo => {
                write_file(&dir.join(YOLO_CLASSES), yolo::write_classes(&self.categories)?.as_bytes())?;
                self.write_per_image(&dir.join(YOLO_LABELS), "txt", |image| yolo::write(image, &self.categories))
            }
        }
    }

    /// Reads the layout [`write_dir`](Self::write_dir) writes. Images come sorted by file name.
    ///
    /// VOC has no class list, so its categories are the names used, sorted (the order VOC's
    /// own class lists use). YOLO labels have no image size, so the images are looked up in
    /// `images/` by stem (any format the `image` crate knows; only the header is read); an
    /// image without a label file is a background image (no objects), and a label file
    /// without an image is an error.
    pub fn read_dir(format: Format, dir: &Path) -> Result<AnnotationSet> {
        match format {
            Format::Coco => {
                let path = dir.join(COCO_FILE);
                coco::read(&read_file(&path)?).map_err(|e| e.in_file(&path))
            }
            Format::Voc => {
                let mut images = Vec::new();
                for path in list_files(&dir.join(VOC_DIR), |p| p.extension().is_some_and(|e| e == "xml"))? {
                    images.push(voc::read(&read_file(&path)?).map_err(|e| e.in_file(&path))?);
                }
                let mut categories: Vec<String> = images.iter().flat_map(|i| i.objects.iter().map(|o| o.category.clone())).collect();
                categories.sort();
                categories.dedup();
                Ok(AnnotationSet { categories, images })
            }
            Format::Yolo => read_yolo_dir(dir),
        }
    }

    /// One file per image, named by stem; two images with one stem would overwrite each other.
    fn write_per_image(&self, dir: &Path, ext: &str, render: impl Fn(&AnnotatedImage) -> Result<String>) -> Result<()> {
        let mut stems = HashMap::new();
        for (index, image) in self.images.iter().enumerate() {
            if stems.insert(image.stem(), index).is_some() {
                return Err(AnnotationError::Duplicate {
                    at: Location::Image(image.file_name.clone()).into(),
                    kind: DuplicateKind::FileStem,
                    id: image.stem().to_owned(),
                });
            }
            write_file(&dir.join(format!("{}.{ext}", image.stem())), render(image)?.as_bytes())?;
        }
        Ok(())
    }
}

const COCO_FILE: &str = "annotations.json";
const VOC_DIR: &str = "Annotations";
const YOLO_LABELS: &str = "labels";
const YOLO_IMAGES: &str = "images";
const YOLO_CLASSES: &str = "classes.txt";

fn read_yolo_dir(dir: &Path) -> Result<AnnotationSet> {
    let classes_path = dir.join(YOLO_CLASSES);
    let categories = yolo::read_classes(&read_text(&classes_path)?);
    let labels_dir = dir.join(YOLO_LABELS);
    let images_dir = dir.join(YOLO_IMAGES);
    let image_paths = if images_dir.is_dir() { list_files(&images_dir, |p| ::image::ImageFormat::from_path(p).is_ok())? } else { Vec::new() };
    let mut images = Vec::new();
    let mut stems = HashSet::new();
    for path in image_paths {
        let file_name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        let stem = file_stem(&file_name).to_owned();
        if !stems.insert(stem.clone()) {
            return Err(AnnotationError::Duplicate { at: Where { file: Some(path), location: Location::File }, kind: DuplicateKind::FileStem, id: stem });
        }
        let (width, height) = ::image::image_dimensions(&path).map_err(|source| AnnotationError::ImageHeader { path: path.clone(), source })?;
        let label = labels_dir.join(format!("{stem}.txt"));
        let objects = if label.is_file() { yolo::read(&read_text(&label)?, width, height, &categories).map_err(|e| e.in_file(&label))? } else { Vec::new() };
        images.push(AnnotatedImage { file_name, width, height, objects });
    }
    if labels_dir.is_dir() {
        for label in list_files(&labels_dir, |p| p.extension().is_some_and(|e| e == "txt"))? {
            let stem = label.file_stem().and_then(|s| s.to_str()).unwrap_or_default();
            if !stems.contains(stem) {
                return Err(AnnotationError::Missing {
                    at: Where { file: Some(label.clone()), location: Location::File },
                    what: format!("an image {YOLO_IMAGES}/{stem}.* to take the size from"),
                });
            }
        }
    }
    Ok(AnnotationSet { categories, images })
}

/// Regular files in `dir` that `keep` accepts, sorted by name (so reads are deterministic).
fn list_files(dir: &Path, keep: impl Fn(&Path) -> bool) -> Result<Vec<PathBuf>> {
    let io = |source| AnnotationError::Io { path: dir.to_path_buf(), source };
    let mut paths = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(io)? {
        let path = entry.map_err(io)?.path();
        if path.is_file() && keep(&path) {
            paths.push(path);
        }
    }
    paths.sort();
    Ok(paths)
}

fn read_file(path: &Path) -> Result<Vec<u8>> {
    std::fs::read(path).map_err(|source| AnnotationError::Io { path: path.to_path_buf(), source })
}

fn read_text(path: &Path) -> Result<String> {
    String::from_utf8(read_file(path)?)
        .map_err(|e| AnnotationError::Syntax { at: Where { file: Some(path.to_path_buf()), location: Location::File }, message: format!("not UTF-8 ({e})") })
}

fn write_file(path: &Path, bytes: &[u8]) -> Result<()> {
    let io = |source| AnnotationError::Io { path: path.to_path_buf(), source };
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent).map_err(io)?;
    }
    std::fs::write(path, bytes).map_err(io)
}

pub(crate) fn check_image_size(width: u32, height: u32) -> Result<(), Problem> {
    if width == 0 || height == 0 {
        Err(Problem::EmptyImage { width, height })
    } else {
        Ok(())
    }
}

/// The annotation formats, for [`AnnotationSet::write_dir`] and in errors.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Format {
    Coco,
    Voc,
    Yolo,
}

impl fmt::Display for Format {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Format::Coco => "COCO",
            Format::Voc => "Pascal VOC",
            Format::Yolo => "YOLO",
        })
    }
}

/// Where in a file (or in the model, when writing) a problem is.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Location {
    /// The file as a whole.
    File,
    /// A 1-based line (YOLO).
    Line(usize),
    /// A 1-based line and column, as serde_json reports syntax errors (COCO).
    LineColumn { line: usize, column: usize },
    /// A path into a COCO document, such as `annotations[3].bbox`.
    JsonPath(String),
    /// A VOC element, as an XPath-like path with 1-based indices
    /// (`annotation/object[2]/bndbox/xmin`), and the line its start tag is on.
    Element { path: String, line: usize },
    /// An image of the model being written, by file name.
    Image(String),
    /// An object of the model being written: image file name and 0-based index.
    Object { image: String, index: usize },
    /// A category of the model being written, by index.
    Category(usize),
}

impl fmt::Display for Location {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Location::File => f.write_str("file"),
            Location::Line(line) => write!(f, "line {line}"),
            Location::LineColumn { line, column } => write!(f, "line {line} column {column}"),
            Location::JsonPath(path) => f.write_str(path),
            Location::Element { path, line } => write!(f, "<{path}> (line {line})"),
            Location::Image(image) => write!(f, "image {image:?}"),
            Location::Object { image, index } => write!(f, "image {image:?} object {index}"),
            Location::Category(index) => write!(f, "category {index}"),
        }
    }
}

/// A [`Location`] and, once known, the file it is in: the per-format readers work on bytes
/// and leave `file` empty; [`AnnotationSet::read_dir`] fills it in ([`AnnotationError::in_file`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Where {
    pub file: Option<PathBuf>,
    pub location: Location,
}

impl From<Location> for Where {
    fn from(location: Location) -> Self {
        Where { file: None, location }
    }
}

impl fmt::Display for Where {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match (&self.file, &self.location) {
            (Some(file), Location::File) => write!(f, "{}", file.display()),
            (Some(file), location) => write!(f, "{}: {location}", file.display()),
            (None, location) => write!(f, "{location}"),
        }
    }
}

/// What is wrong with a shape, score or image size.
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
pub enum Problem {
    #[error("negative size {w} x {h}")]
    NegativeSize { w: f32, h: f32 },
    #[error("extends outside the {width}x{height} image")]
    OutsideImage { width: u32, height: u32 },
    #[error("{kind} with {found} points (at least {min} needed)")]
    TooFewPoints { kind: ShapeKind, found: usize, min: usize },
    #[error("coordinate is not a finite number")]
    NotFinite,
    #[error("normalized coordinate {value} is outside 0..1")]
    NormalizedOutOfRange { value: f32 },
    #[error("score {score} is outside 0..1")]
    ScoreOutOfRange { score: f32 },
    #[error("image size {width}x{height} is empty")]
    EmptyImage { width: u32, height: u32 },
    #[error("category name {name:?} cannot be written to a class list (empty, surrounding spaces or a line break)")]
    BadCategoryName { name: String },
    #[error("mask: {0}")]
    Mask(RleError),
    #[error("the mask has no pixel set")]
    EmptyMask,
}

/// What a format cannot represent.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Unrepresentable {
    Shape(ShapeKind),
    /// A score on a polygon (YOLO only allows a confidence on box lines).
    PolygonScore,
}

impl fmt::Display for Unrepresentable {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Unrepresentable::Shape(kind) => write!(f, "{kind} objects"),
            Unrepresentable::PolygonScore => f.write_str("a score on a polygon"),
        }
    }
}

/// Which identifier is duplicated.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DuplicateKind {
    ImageId,
    CategoryId,
    CategoryName,
    /// Two images whose file names differ only in extension: per-image label files collide.
    FileStem,
}

impl fmt::Display for DuplicateKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            DuplicateKind::ImageId => "image id",
            DuplicateKind::CategoryId => "category id",
            DuplicateKind::CategoryName => "category name",
            DuplicateKind::FileStem => "file stem",
        })
    }
}

/// Applies `$body` to the [`Where`] of every variant that has one (one list of variants for
/// both [`AnnotationError::location`] and [`AnnotationError::in_file`]).
macro_rules! with_location {
    ($error:expr, $at:ident => $body:expr) => {
        match $error {
            AnnotationError::Syntax { at: $at, .. }
            | AnnotationError::Missing { at: $at, .. }
            | AnnotationError::NotANumber { at: $at, .. }
            | AnnotationError::FieldCount { at: $at, .. }
            | AnnotationError::UnknownCategory { at: $at, .. }
            | AnnotationError::UnknownImage { at: $at, .. }
            | AnnotationError::Duplicate { at: $at, .. }
            | AnnotationError::Invalid { at: $at, .. }
            | AnnotationError::Unsupported { at: $at, .. } => Some($body),
            AnnotationError::Io { .. } | AnnotationError::ImageHeader { .. } => None,
        }
    };
}

#[derive(Debug, thiserror::Error)]
pub enum AnnotationError {
    /// The file is not well-formed JSON/XML/text, or a value has the wrong JSON type.
    #[error("{at}: malformed: {message}")]
    Syntax { at: Where, message: String },
    /// A required element, field or companion file is absent.
    #[error("{at}: missing {what}")]
    Missing { at: Where, what: String },
    #[error("{at}: {value:?} is not a number")]
    NotANumber { at: Where, value: String },
    /// A line or array has the wrong number of values.
    #[error("{at}: expected {expected}, found {found} values")]
    FieldCount { at: Where, expected: &'static str, found: usize },
    /// A category id (COCO, YOLO) or name (writing) that the category list lacks.
    #[error("{at}: unknown category {category}")]
    UnknownCategory { at: Where, category: String },
    /// A COCO annotation whose `image_id` no image has.
    #[error("{at}: unknown image id {image_id}")]
    UnknownImage { at: Where, image_id: u64 },
    #[error("{at}: duplicate {kind} {id}")]
    Duplicate { at: Where, kind: DuplicateKind, id: String },
    /// A shape, score or image size that is out of bounds.
    #[error("{at}: {problem}")]
    Invalid { at: Where, problem: Problem },
    #[error("{at}: {format} cannot represent {what}")]
    Unsupported { format: Format, at: Where, what: Unrepresentable },
    #[error("{}: {source}", path.display())]
    Io { path: PathBuf, source: std::io::Error },
    #[error("{}: cannot read the image's size: {source}", path.display())]
    ImageHeader { path: PathBuf, source: ::image::ImageError },
}

impl AnnotationError {
    pub(crate) fn invalid(at: impl Into<Where>, problem: Problem) -> Self {
        AnnotationError::Invalid { at: at.into(), problem }
    }

    /// Where the error is, for all but file-system errors (which carry their path).
    pub fn location(&self) -> Option<&Where> {
        with_location!(self, at => at)
    }

    /// Records the file the error is in (readers of bytes do not know it).
    pub fn in_file(mut self, path: &Path) -> Self {
        if let Some(at) = with_location!(&mut self, at => at) {
            at.file = Some(path.to_path_buf());
        }
        self
    }
}

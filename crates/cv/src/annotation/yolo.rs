//! YOLO txt: one label file per image, one object per line, coordinates normalized to 0..1 by
//! the image's width and height; a separate class list (`classes.txt`, one name per line,
//! line number = class id).
//!
//! Lines (whitespace-separated; blank lines are skipped):
//! - box: `class cx cy w h` (5 values), or `class cx cy w h conf` (6 values) for predictions;
//! - polygon (YOLO segmentation): `class x1 y1 x2 y2 x3 y3 ...`, an odd count of at least 7
//!   values (so an even number of coordinates, at least 3 vertices).
//!
//! The value count alone tells them apart: 5 or 6 is a box, odd ≥ 7 a polygon, anything else
//! is an error. That is why a confidence is allowed on boxes only: a polygon with a trailing
//! confidence would have an even count, which this reader refuses rather than guesses (the
//! writer refuses [`Unrepresentable::PolygonScore`]). Keypoints are not written
//! ([`Unrepresentable::Shape`]): YOLO pose needs a fixed keypoint count per dataset, which the
//! model does not have.
//!
//! YOLO cannot express a shape overhanging the image, so the writer clips to the image what
//! [`EDGE_TOLERANCE_PX`](super::EDGE_TOLERANCE_PX) lets through; the reader accepts
//! normalized values in `0..=1` up to [`NORMALIZED_TOLERANCE`].

use std::fmt::Write as _;

use super::{AnnotatedImage, AnnotationError, Format, Location, Object, Problem, Result, Shape, ShapeKind, Unrepresentable};

/// How far outside `0..=1` a normalized value read may be: other converters round.
pub const NORMALIZED_TOLERANCE: f32 = 1e-4;

/// Reads one label file of an image of `width × height` pixels; class ids index `categories`.
pub fn read(text: &str, width: u32, height: u32, categories: &[String]) -> Result<Vec<Object>> {
    super::check_image_size(width, height).map_err(|problem| AnnotationError::invalid(Location::File, problem))?;
    let (wf, hf) = (f64::from(width), f64::from(height));
    let mut objects = Vec::new();
    for (number, line) in text.lines().enumerate() {
        let at = || Location::Line(number + 1);
        let mut tokens = line.split_whitespace();
        let Some(class) = tokens.next() else { continue };
        let category = class.parse::<usize>().map_err(|_| AnnotationError::NotANumber { at: at().into(), value: class.to_owned() }).and_then(|id| {
            categories
                .get(id)
                .ok_or_else(|| AnnotationError::UnknownCategory { at: at().into(), category: format!("id {id} (the class list has {})", categories.len()) })
        })?;
        let values =
            tokens.map(|t| t.parse::<f32>().map_err(|_| AnnotationError::NotANumber { at: at().into(), value: t.to_owned() })).collect::<Result<Vec<f32>>>()?;
        if let Some(&value) = values.iter().find(|v| !(-NORMALIZED_TOLERANCE..=1.0 + NORMALIZED_TOLERANCE).contains(*v)) {
            return Err(AnnotationError::invalid(at(), Problem::NormalizedOutOfRange { value }));
        }
        let pixel_x = |v: f32| (f64::from(v) * wf) as f32;
        let pixel_y = |v: f32| (f64::from(v) * hf) as f32;
        let (shape, score) = match values[..] {
            [cx, cy, w, h, ref conf @ ..] if values.len() <= 5 => {
                let (cx, cy, w, h) = (f64::from(cx) * wf, f64::from(cy) * hf, f64::from(w) * wf, f64::from(h) * hf);
                let shape = Shape::Box { x: (cx - w / 2.0) as f32, y: (cy - h / 2.0) as f32, w: w as f32, h: h as f32 };
                (shape, conf.first().copied())
            }
            _ if values.len() >= 6 && values.len() % 2 == 0 => {
                let points = values.chunks_exact(2).map(|p| (pixel_x(p[0]), pixel_y(p[1]))).collect();
                (Shape::Polygon { points }, None)
            }
            _ => {
                return Err(AnnotationError::FieldCount {
                    at: at().into(),
                    expected: "5 or 6 values (class cx cy w h [conf]) or an odd count ≥ 7 (class x1 y1 x2 y2 x3 y3 ...)",
                    found: values.len() + 1,
                })
            }
        };
        let object = Object { category: category.clone(), shape, score };
        object.validate(width, height).map_err(|problem| AnnotationError::invalid(at(), problem))?;
        objects.push(object);
    }
    Ok(objects)
}

/// Writes one image's label file (after validating it against `categories`).
pub fn write(image: &AnnotatedImage, categories: &[String]) -> Result<String> {
    image.validate(Some(categories))?;
    let (wf, hf) = (f64::from(image.width), f64::from(image.height));
    // Normalized and clipped to the image (see the module docs) in f64, then written as the
    // shortest f32 decimal.
    let norm_x = |x: f32| (f64::from(x) / wf).clamp(0.0, 1.0);
    let norm_y = |y: f32| (f64::from(y) / hf).clamp(0.0, 1.0);
    let mut out = String::new();
    for (index, object) in image.objects.iter().enumerate() {
        let unsupported =
            |what| AnnotationError::Unsupported { format: Format::Yolo, at: Location::Object { image: image.file_name.clone(), index }.into(), what };
        let class = categories.iter().position(|c| *c == object.category).unwrap_or_default();
        // Writing to a String cannot fail.
        let _ = write!(out, "{class}");
        match &object.shape {
            Shape::Box { x, y, w, h } => {
                let (x0, x1) = (norm_x(*x), norm_x(x + w));
                let (y0, y1) = (norm_y(*y), norm_y(y + h));
                let values = [(x0 + x1) / 2.0, (y0 + y1) / 2.0, x1 - x0, y1 - y0];
                for value in values {
                    let _ = write!(out, " {}", value as f32);
                }
                if let Some(score) = object.score {
                    let _ = write!(out, " {score}");
                }
            }
            Shape::Polygon { points } => {
                if object.score.is_some() {
                    return Err(unsupported(Unrepresentable::PolygonScore));
                }
                for &(x, y) in points {
                    let _ = write!(out, " {} {}", norm_x(x) as f32, norm_y(y) as f32);
                }
            }
            Shape::Points { .. } => return Err(unsupported(Unrepresentable::Shape(ShapeKind::Points))),
            Shape::Mask { .. } => return Err(unsupported(Unrepresentable::Shape(ShapeKind::Mask))),
        }
        out.push('\n');
    }
    Ok(out)
}

/// Reads a class list: one name per line, surrounding whitespace trimmed, blank lines skipped.
pub fn read_classes(text: &str) -> Vec<String> {
    text.lines().map(str::trim).filter(|l| !l.is_empty()).map(str::to_owned).collect()
}

/// Writes a class list; refuses names that would not read back as themselves.
pub fn write_classes(categories: &[String]) -> Result<String> {
    let mut out = String::new();
    for (index, name) in categories.iter().enumerate() {
        if name.is_empty() || name.trim() != name || name.contains(['\n', '\r']) {
            return Err(AnnotationError::invalid(Location::Category(index), Problem::BadCategoryName { name: name.clone() }));
        }
        out.push_str(name);
        out.push('\n');
    }
    Ok(out)
}

//! COCO JSON: one document for the whole set, `images[]`, `annotations[]`, `categories[]`.
//!
//! Mapping to the model:
//! - one annotation is one object. On read, an annotation with a polygon `segmentation`
//!   becomes a [`Shape::Polygon`]; otherwise one with labelled `keypoints` becomes
//!   [`Shape::Points`]; otherwise its `bbox` `[x, y, w, h]` becomes a [`Shape::Box`].
//! - a segmentation made of several polygons (an object split by occlusion) becomes one
//!   object per polygon, same category and score: the model has no multi-part polygons, and
//!   refusing such files would make most real COCO data unreadable.
//! - an RLE segmentation `{"size": [h, w], "counts": …}` (crowd regions, brush masks) becomes a
//!   [`Shape::Mask`], whether its counts are a list of run lengths or COCO's compressed string;
//!   masks are written with the list (the form pycocotools' `frPyObjects` takes as it is).
//! - keypoints `[x, y, v, ...]`: points with visibility `v = 0` (not labelled) are dropped,
//!   the model keeps only labelled points. Written points all get `v = 2`.
//! - category ids in a file may be anything; the model keeps the categories in file order,
//!   and writing numbers them `index + 1`. Image ids are likewise renumbered `1..` on write.
//! - written polygons, masks and keypoints also get their bounding `bbox` and an `area`
//!   (polygon area, pixels of a mask, box area, 0 for keypoints), as COCO tools expect; `iscrowd` is always 0. `score`
//!   is written for predictions (as in COCO results files).
//!
//! Coordinates are written as the shortest `f32` decimal, so write → read is exact.

use std::collections::HashMap;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use suanli_annotation::rle::decode_compressed;

use super::{check_image_size, AnnotatedImage, AnnotationError, AnnotationSet, DuplicateKind, Location, Object, Result, Rle, Shape, Where};

#[derive(Serialize, Deserialize)]
struct CocoFile<Segmentation> {
    images: Vec<CocoImage>,
    #[serde(default = "Vec::new")]
    annotations: Vec<CocoAnnotation<Segmentation>>,
    categories: Vec<CocoCategory>,
}

#[derive(Serialize, Deserialize)]
struct CocoImage {
    id: u64,
    file_name: String,
    width: u32,
    height: u32,
}

#[derive(Serialize, Deserialize)]
struct CocoCategory {
    id: u64,
    name: String,
}

/// A written segmentation: polygons, or one RLE mask.
#[derive(Serialize)]
#[serde(untagged)]
enum WrittenSegmentation<'a> {
    Polygons(Vec<Vec<f32>>),
    Rle(&'a Rle),
}

/// (Missing `Option` fields read as `None`.) Generic over the segmentation so that reading can take any JSON (polygons or RLE, told
/// apart with a precise error) while writing emits typed `f32` polygons.
#[derive(Serialize, Deserialize)]
struct CocoAnnotation<Segmentation> {
    #[serde(default)]
    id: u64,
    image_id: u64,
    category_id: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    bbox: Option<Vec<f32>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    segmentation: Option<Segmentation>,
    #[serde(skip_serializing_if = "Option::is_none")]
    keypoints: Option<Vec<f32>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    num_keypoints: Option<usize>,
    #[serde(skip_serializing_if = "Option::is_none")]
    score: Option<f32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    area: Option<f32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    iscrowd: Option<u8>,
}

fn at(path: String) -> Where {
    Location::JsonPath(path).into()
}

/// Reads a COCO document. Unknown fields (`info`, `licenses`, `supercategory`, ...) are ignored.
pub fn read(bytes: &[u8]) -> Result<AnnotationSet> {
    let file: CocoFile<Value> = serde_json::from_slice(bytes).map_err(|e| {
        let full = e.to_string();
        // serde_json appends " at line L column C"; the location says that already.
        let message = full.rsplit_once(" at line ").map_or(full.as_str(), |(m, _)| m).to_owned();
        AnnotationError::Syntax { at: Location::LineColumn { line: e.line(), column: e.column() }.into(), message }
    })?;

    let mut set = AnnotationSet::default();
    let mut category_of_id = HashMap::new();
    for (i, category) in file.categories.iter().enumerate() {
        if category_of_id.insert(category.id, i).is_some() {
            return Err(duplicate(format!("categories[{i}].id"), DuplicateKind::CategoryId, category.id));
        }
        if set.category_index(&category.name).is_some() {
            return Err(AnnotationError::Duplicate { at: at(format!("categories[{i}].name")), kind: DuplicateKind::CategoryName, id: category.name.clone() });
        }
        set.categories.push(category.name.clone());
    }

    let mut image_of_id = HashMap::new();
    for (i, image) in file.images.iter().enumerate() {
        if image_of_id.insert(image.id, i).is_some() {
            return Err(duplicate(format!("images[{i}].id"), DuplicateKind::ImageId, image.id));
        }
        check_image_size(image.width, image.height).map_err(|problem| AnnotationError::invalid(at(format!("images[{i}]")), problem))?;
        set.images.push(AnnotatedImage { file_name: image.file_name.clone(), width: image.width, height: image.height, objects: Vec::new() });
    }

    for (i, annotation) in file.annotations.iter().enumerate() {
        let path = format!("annotations[{i}]");
        let image_index = *image_of_id
            .get(&annotation.image_id)
            .ok_or_else(|| AnnotationError::UnknownImage { at: at(format!("{path}.image_id")), image_id: annotation.image_id })?;
        let category = match category_of_id.get(&annotation.category_id) {
            Some(&index) => set.categories[index].clone(),
            None => return Err(AnnotationError::UnknownCategory { at: at(format!("{path}.category_id")), category: format!("id {}", annotation.category_id) }),
        };
        let image = &mut set.images[image_index];
        for (field, shape) in shapes(annotation, &path)? {
            let object = Object { category: category.clone(), shape, score: annotation.score };
            object.validate(image.width, image.height).map_err(|problem| AnnotationError::invalid(at(format!("{path}.{field}")), problem))?;
            image.objects.push(object);
        }
    }
    Ok(set)
}

/// An RLE segmentation, uncompressed (`counts` a list) or compressed (`counts` a string).
fn read_rle(rle: &serde_json::Map<String, Value>, path: &str) -> Result<Rle> {
    let syntax = |field: &str, message: &str| AnnotationError::Syntax { at: at(format!("{path}.{field}")), message: message.into() };
    let size = match rle.get("size").and_then(Value::as_array).map(|s| s.iter().map(|v| v.as_u64().and_then(|v| u32::try_from(v).ok())).collect::<Vec<_>>()) {
        Some(size) if size.len() == 2 && size.iter().all(Option::is_some) => [size[0].unwrap_or_default(), size[1].unwrap_or_default()],
        _ => return Err(syntax("size", "an RLE mask needs size [height, width]")),
    };
    let counts = match rle.get("counts") {
        Some(Value::Array(counts)) => counts
            .iter()
            .enumerate()
            .map(|(k, v)| {
                v.as_u64()
                    .and_then(|v| u32::try_from(v).ok())
                    .ok_or_else(|| AnnotationError::NotANumber { at: at(format!("{path}.counts[{k}]")), value: v.to_string() })
            })
            .collect::<Result<Vec<u32>>>()?,
        Some(Value::String(text)) => decode_compressed(text).map_err(|e| syntax("counts", &e.to_string()))?,
        _ => return Err(syntax("counts", "an RLE mask needs counts: a list of run lengths or a compressed string")),
    };
    Ok(Rle { size, counts })
}

fn duplicate(path: String, kind: DuplicateKind, id: u64) -> AnnotationError {
    AnnotationError::Duplicate { at: at(path), kind, id: id.to_string() }
}

/// The shapes of one annotation (several for a multi-polygon segmentation), each with the
/// field it came from for error messages.
fn shapes(annotation: &CocoAnnotation<Value>, path: &str) -> Result<Vec<(String, Shape)>> {
    match &annotation.segmentation {
        Some(Value::Array(polygons)) if !polygons.is_empty() => {
            return polygons
                .iter()
                .enumerate()
                .map(|(p, polygon)| {
                    let here = format!("{path}.segmentation[{p}]");
                    let coords = polygon
                        .as_array()
                        .ok_or_else(|| AnnotationError::Syntax { at: at(here.clone()), message: "a polygon must be an array of numbers".into() })?
                        .iter()
                        .enumerate()
                        .map(|(k, v)| {
                            v.as_f64().map(|v| v as f32).ok_or_else(|| AnnotationError::NotANumber { at: at(format!("{here}[{k}]")), value: v.to_string() })
                        })
                        .collect::<Result<Vec<f32>>>()?;
                    if coords.len() % 2 != 0 {
                        return Err(AnnotationError::FieldCount { at: at(here), expected: "an even number of polygon coordinates", found: coords.len() });
                    }
                    let points = coords.chunks_exact(2).map(|c| (c[0], c[1])).collect();
                    Ok((format!("segmentation[{p}]"), Shape::Polygon { points }))
                })
                .collect();
        }
        Some(Value::Object(rle)) => return Ok(vec![("segmentation".into(), Shape::Mask { rle: read_rle(rle, &format!("{path}.segmentation"))? })]),
        Some(Value::Array(_) | Value::Null) | None => {}
        Some(other) => {
            return Err(AnnotationError::Syntax { at: at(format!("{path}.segmentation")), message: format!("expected polygons or an RLE mask, found {other}") })
        }
    }
    if let Some(keypoints) = annotation.keypoints.as_deref().filter(|k| !k.is_empty()) {
        if keypoints.len() % 3 != 0 {
            return Err(AnnotationError::FieldCount {
                at: at(format!("{path}.keypoints")),
                expected: "a multiple of 3 values (x, y, visibility)",
                found: keypoints.len(),
            });
        }
        let points: Vec<(f32, f32)> = keypoints.chunks_exact(3).filter(|k| k[2] > 0.0).map(|k| (k[0], k[1])).collect();
        if !points.is_empty() {
            return Ok(vec![("keypoints".into(), Shape::Points { points })]);
        }
    }
    match annotation.bbox.as_deref() {
        Some(&[x, y, w, h]) => Ok(vec![("bbox".into(), Shape::Box { x, y, w, h })]),
        Some(other) => Err(AnnotationError::FieldCount { at: at(format!("{path}.bbox")), expected: "4 values [x, y, width, height]", found: other.len() }),
        None => Err(AnnotationError::Missing { at: at(path.to_owned()), what: "bbox (and no polygon segmentation or labelled keypoints)".into() }),
    }
}

/// Writes the set as one pretty-printed COCO document (after [`AnnotationSet::validate`]).
pub fn write(set: &AnnotationSet) -> Result<Vec<u8>> {
    set.validate()?;
    let categories = set.categories.iter().zip(1..).map(|(name, id)| CocoCategory { id, name: name.clone() }).collect();
    let mut images = Vec::with_capacity(set.images.len());
    let mut annotations = Vec::new();
    for (image, image_id) in set.images.iter().zip(1..) {
        images.push(CocoImage { id: image_id, file_name: image.file_name.clone(), width: image.width, height: image.height });
        for object in &image.objects {
            // Validated above: the category is listed and the shape has points.
            let category_id = set.category_index(&object.category).map_or(0, |i| i as u64 + 1);
            let (x, y, w, h) = object.shape.bounds().unwrap_or_default();
            let (segmentation, keypoints) = match &object.shape {
                Shape::Box { .. } => (None, None),
                Shape::Polygon { points } => (Some(WrittenSegmentation::Polygons(vec![points.iter().flat_map(|&(x, y)| [x, y]).collect()])), None),
                Shape::Points { points } => (None, Some(points.iter().flat_map(|&(x, y)| [x, y, 2.0]).collect())),
                Shape::Mask { rle } => (Some(WrittenSegmentation::Rle(rle)), None),
            };
            annotations.push(CocoAnnotation::<WrittenSegmentation> {
                id: annotations.len() as u64 + 1,
                image_id,
                category_id,
                bbox: Some(vec![x, y, w, h]),
                num_keypoints: keypoints.as_ref().map(|k: &Vec<f32>| k.len() / 3),
                segmentation,
                keypoints,
                score: object.score,
                area: Some(object.shape.area()),
                iscrowd: Some(0),
            });
        }
    }
    serde_json::to_vec_pretty(&CocoFile { images, annotations, categories })
        .map_err(|e| AnnotationError::Syntax { at: Location::File.into(), message: e.to_string() })
}

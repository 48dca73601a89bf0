//! What a project's owner declares (the classes, their colours and attributes, the shape kinds
//! allowed) and what an annotator saves (an [`Annotation`] per drawn shape), with the checks a
//! save passes before anything is stored.

use std::collections::{BTreeMap, HashSet};

use serde::{Deserialize, Serialize};

use crate::geometry::{Geometry, Problem, ShapeKind};

/// The most classes a schema lists.
pub const MAX_CLASSES: usize = 500;
/// The most shapes one annotator saves on one image.
pub const MAX_SHAPES_PER_IMAGE: usize = 2_000;
/// The most vertices of all of one save's shapes together (each polygon's check is quadratic
/// in its own: this bounds what one save may cost).
pub const MAX_VERTICES_PER_IMAGE: usize = 20_000;
/// The most mask runs of one save together (each mask's own limit is
/// [`MAX_MASK_RUNS`](crate::geometry::MAX_MASK_RUNS)): about 1.2 MB of JSON.
pub const MAX_MASK_RUNS_PER_IMAGE: usize = 200_000;

/// The labels of a project.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LabelSchema {
    pub classes: Vec<ClassDef>,
    /// The shape kinds annotators may draw.
    pub kinds: Vec<ShapeKind>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClassDef {
    pub name: String,
    /// `#rrggbb`, as the tool draws the class.
    pub colour: String,
    #[serde(default)]
    pub attributes: Vec<AttributeDef>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct AttributeDef {
    pub name: String,
    #[serde(flatten)]
    pub kind: AttributeKind,
}

/// An attribute's kind and what values it takes.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum AttributeKind {
    /// One of `values`.
    Select { values: Vec<String> },
    /// True or false.
    Checkbox,
    /// Free text, at most 200 characters.
    Text,
    /// A number in `min..=max`.
    Number { min: f64, max: f64 },
}

/// An attribute's value on one shape.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum AttributeValue {
    Bool(bool),
    Number(f64),
    Text(String),
}

/// One shape an annotator saved. Read from flat JSON (`{"id", "label", "type": "box", "x", …}`);
/// a field that is not the shape's own is refused, as elsewhere in the API.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(try_from = "serde_json::Value")]
pub struct Annotation {
    /// The tool's ID for the shape, stable across saves: 1 to 64 of `[A-Za-z0-9_-]`.
    pub id: String,
    pub label: String,
    #[serde(flatten)]
    pub geometry: Geometry,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub attributes: BTreeMap<String, AttributeValue>,
    /// A model's confidence, while the shape is a pre-annotation the annotator has not yet
    /// accepted or changed (the tool drops it when they do).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub score: Option<f32>,
}

/// [`Annotation`] as serde reads it (flattened, so it cannot deny unknown fields itself).
#[derive(Deserialize)]
struct AnnotationFields {
    id: String,
    label: String,
    #[serde(flatten)]
    geometry: Geometry,
    #[serde(default)]
    attributes: BTreeMap<String, AttributeValue>,
    #[serde(default)]
    score: Option<f32>,
}

impl TryFrom<serde_json::Value> for Annotation {
    type Error = String;

    fn try_from(value: serde_json::Value) -> Result<Annotation, String> {
        let serde_json::Value::Object(fields) = &value else {
            return Err("a shape is a JSON object".into());
        };
        let own: &[&str] = match fields.get("type").and_then(|t| t.as_str()) {
            Some("box") => &["x", "y", "w", "h"],
            Some("polygon" | "polyline" | "points") => &["points"],
            Some("mask") => &["rle"],
            _ => &[],
        };
        if let Some(unknown) = fields.keys().find(|k| !["id", "label", "type", "attributes", "score"].contains(&k.as_str()) && !own.contains(&k.as_str())) {
            return Err(format!("unknown field `{unknown}`"));
        }
        let AnnotationFields { id, label, geometry, attributes, score } = serde_json::from_value(value).map_err(|e| e.to_string())?;
        Ok(Annotation { id, label, geometry, attributes, score })
    }
}

/// Why a schema was refused.
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
pub enum SchemaError {
    #[error("a schema lists 1 to {MAX_CLASSES} classes")]
    ClassCount,
    #[error("class {index}: a name of 1 to 64 printable characters")]
    ClassName { index: usize },
    #[error("class {name:?} is listed twice")]
    DuplicateClass { name: String },
    #[error("class {name:?}: colour {colour:?} is not #rrggbb")]
    Colour { name: String, colour: String },
    #[error("class {name:?}: attribute {attribute:?}: {why}")]
    Attribute { name: String, attribute: String, why: &'static str },
    #[error("a schema allows at least one shape kind, each once")]
    Kinds,
}

/// Why a saved shape was refused: which one, and what is wrong with it.
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
#[error("shape {index} ({id:?}): {why}")]
pub struct ShapeError {
    pub index: usize,
    pub id: String,
    pub why: String,
}

impl LabelSchema {
    pub fn check(&self) -> Result<(), SchemaError> {
        if self.classes.is_empty() || self.classes.len() > MAX_CLASSES {
            return Err(SchemaError::ClassCount);
        }
        let mut names = HashSet::new();
        for (index, class) in self.classes.iter().enumerate() {
            if !is_name(&class.name) {
                return Err(SchemaError::ClassName { index });
            }
            if !names.insert(class.name.as_str()) {
                return Err(SchemaError::DuplicateClass { name: class.name.clone() });
            }
            if !is_colour(&class.colour) {
                return Err(SchemaError::Colour { name: class.name.clone(), colour: class.colour.clone() });
            }
            let mut attributes = HashSet::new();
            for attribute in &class.attributes {
                let bad = |why| SchemaError::Attribute { name: class.name.clone(), attribute: attribute.name.clone(), why };
                if !is_name(&attribute.name) {
                    return Err(bad("a name of 1 to 64 printable characters"));
                }
                if !attributes.insert(attribute.name.as_str()) {
                    return Err(bad("listed twice"));
                }
                match &attribute.kind {
                    AttributeKind::Select { values } if values.is_empty() || values.len() > 100 || !values.iter().all(|v| is_name(v)) => {
                        return Err(bad("a select lists 1 to 100 values, each a name"));
                    }
                    AttributeKind::Number { min, max } if !(min.is_finite() && max.is_finite() && min <= max) => return Err(bad("min ≤ max, both finite")),
                    _ => {}
                }
            }
        }
        let kinds: HashSet<_> = self.kinds.iter().collect();
        if self.kinds.is_empty() || kinds.len() != self.kinds.len() {
            return Err(SchemaError::Kinds);
        }
        Ok(())
    }

    pub fn class(&self, name: &str) -> Option<&ClassDef> {
        self.classes.iter().find(|c| c.name == name)
    }

    /// Checks what one annotator saves for one `width × height` image: every shape of an
    /// allowed kind, a listed class, valid attributes and geometry, IDs unique.
    pub fn check_shapes(&self, shapes: &[Annotation], width: u32, height: u32) -> Result<(), ShapeError> {
        if shapes.len() > MAX_SHAPES_PER_IMAGE {
            return Err(ShapeError { index: MAX_SHAPES_PER_IMAGE, id: String::new(), why: format!("at most {MAX_SHAPES_PER_IMAGE} shapes on one image") });
        }
        let vertices: usize = shapes
            .iter()
            .map(|s| match &s.geometry {
                Geometry::Polygon { points } | Geometry::Polyline { points } | Geometry::Points { points } => points.len(),
                Geometry::Box { .. } | Geometry::Mask { .. } => 4,
            })
            .sum();
        if vertices > MAX_VERTICES_PER_IMAGE {
            return Err(ShapeError {
                index: 0,
                id: String::new(),
                why: format!("{vertices} vertices in all; one image takes at most {MAX_VERTICES_PER_IMAGE}"),
            });
        }
        let runs: usize = shapes.iter().map(|s| if let Geometry::Mask { rle } = &s.geometry { rle.counts.len() } else { 0 }).sum();
        if runs > MAX_MASK_RUNS_PER_IMAGE {
            return Err(ShapeError { index: 0, id: String::new(), why: format!("{runs} mask runs in all; one image takes at most {MAX_MASK_RUNS_PER_IMAGE}") });
        }
        let mut ids = HashSet::new();
        for (index, shape) in shapes.iter().enumerate() {
            let refuse = |why: String| ShapeError { index, id: shape.id.clone(), why };
            if !is_shape_id(&shape.id) {
                return Err(refuse("an ID of 1 to 64 letters, digits, '-' or '_'".into()));
            }
            if !ids.insert(shape.id.as_str()) {
                return Err(refuse("another shape has the same ID".into()));
            }
            let Some(class) = self.class(&shape.label) else {
                return Err(refuse(format!("{:?} is not a class of this project", shape.label)));
            };
            let kind = shape.geometry.kind();
            if !self.kinds.contains(&kind) {
                return Err(refuse(format!("this project does not take {kind} shapes")));
            }
            shape.geometry.check(width, height).map_err(|p: Problem| refuse(p.to_string()))?;
            if let Some(score) = shape.score {
                if !(0.0..=1.0).contains(&score) {
                    return Err(refuse(format!("score {score} is outside 0..1")));
                }
            }
            for (name, value) in &shape.attributes {
                let Some(def) = class.attributes.iter().find(|a| &a.name == name) else {
                    return Err(refuse(format!("class {:?} has no attribute {name:?}", class.name)));
                };
                let fits = match (&def.kind, value) {
                    (AttributeKind::Select { values }, AttributeValue::Text(v)) => values.contains(v),
                    (AttributeKind::Checkbox, AttributeValue::Bool(_)) => true,
                    (AttributeKind::Text, AttributeValue::Text(v)) => v.chars().count() <= 200,
                    (AttributeKind::Number { min, max }, AttributeValue::Number(v)) => (*min..=*max).contains(v),
                    _ => false,
                };
                if !fits {
                    return Err(refuse(format!("attribute {name:?} does not take {value:?}")));
                }
            }
        }
        Ok(())
    }
}

fn is_name(s: &str) -> bool {
    !s.trim().is_empty() && s.chars().count() <= 64 && !s.chars().any(char::is_control)
}

fn is_colour(s: &str) -> bool {
    s.len() == 7 && s.starts_with('#') && s[1..].bytes().all(|b| b.is_ascii_hexdigit())
}

fn is_shape_id(s: &str) -> bool {
    (1..=64).contains(&s.len()) && s.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

#[cfg(test)]
mod tests {
    use super::*;

    fn schema() -> LabelSchema {
        serde_json::from_value(serde_json::json!({
            "classes": [
                {"name": "cat", "colour": "#ff0000", "attributes": [{"name": "pose", "kind": "select", "values": ["sitting", "standing"]}, {"name": "occluded", "kind": "checkbox"}]},
                {"name": "dog", "colour": "#00ff00"}
            ],
            "kinds": ["box", "polygon", "points"]
        }))
        .expect("a schema")
    }

    fn shape(json: serde_json::Value) -> Annotation {
        serde_json::from_value(json).expect("an annotation")
    }

    #[test]
    fn a_schema_reads_from_json_and_passes() {
        schema().check().expect("valid");
    }

    #[test]
    fn schemas_with_clashes_are_refused() {
        let mut twice = schema();
        twice.classes.push(twice.classes[0].clone());
        assert_eq!(twice.check(), Err(SchemaError::DuplicateClass { name: "cat".into() }));
        let mut colour = schema();
        colour.classes[1].colour = "green".into();
        assert!(matches!(colour.check(), Err(SchemaError::Colour { .. })));
        let mut kinds = schema();
        kinds.kinds.clear();
        assert_eq!(kinds.check(), Err(SchemaError::Kinds));
        kinds.kinds = vec![ShapeKind::Box, ShapeKind::Mask, ShapeKind::Box];
        assert_eq!(kinds.check(), Err(SchemaError::Kinds));
        kinds.kinds = vec![ShapeKind::Box, ShapeKind::Mask];
        kinds.check().expect("masks are painted with the brush");
    }

    #[test]
    fn an_annotation_is_flat_json() {
        let a =
            shape(serde_json::json!({"id": "s1", "label": "cat", "type": "box", "x": 1.0, "y": 2.0, "w": 3.0, "h": 4.0, "attributes": {"pose": "sitting"}}));
        assert_eq!(a.geometry, Geometry::Box { x: 1.0, y: 2.0, w: 3.0, h: 4.0 });
        assert_eq!(serde_json::to_value(&a).expect("json")["type"], "box");
        schema().check_shapes(&[a], 10, 10).expect("valid");
    }

    #[test]
    fn shapes_are_refused_with_which_and_why() {
        let s = schema();
        let bad = |json, why: &str| {
            let refused = s
                .check_shapes(&[shape(serde_json::json!({"id": "ok", "label": "dog", "type": "points", "points": [[1, 1]]})), shape(json)], 10, 10)
                .unwrap_err();
            assert_eq!(refused.index, 1, "{refused}");
            assert!(refused.why.contains(why), "{refused} should say {why}");
        };
        bad(serde_json::json!({"id": "b", "label": "bird", "type": "box", "x": 1, "y": 1, "w": 1, "h": 1}), "not a class");
        bad(serde_json::json!({"id": "b", "label": "cat", "type": "polyline", "points": [[1, 1], [2, 2]]}), "does not take polyline");
        bad(serde_json::json!({"id": "b", "label": "cat", "type": "box", "x": 8, "y": 1, "w": 5, "h": 1}), "outside");
        bad(serde_json::json!({"id": "b", "label": "cat", "type": "polygon", "points": [[0, 0], [9, 9], [9, 0], [0, 9]]}), "crosses itself");
        bad(serde_json::json!({"id": "b", "label": "cat", "type": "box", "x": 1, "y": 1, "w": 1, "h": 1, "attributes": {"pose": "lying"}}), "does not take");
        bad(serde_json::json!({"id": "b", "label": "dog", "type": "box", "x": 1, "y": 1, "w": 1, "h": 1, "attributes": {"pose": "sitting"}}), "no attribute");
        bad(serde_json::json!({"id": "ok", "label": "dog", "type": "box", "x": 1, "y": 1, "w": 1, "h": 1}), "same ID");
        bad(serde_json::json!({"id": "a b", "label": "dog", "type": "box", "x": 1, "y": 1, "w": 1, "h": 1}), "an ID of");
        bad(serde_json::json!({"id": "b", "label": "dog", "type": "box", "x": 1, "y": 1, "w": 1, "h": 1, "score": 1.5}), "outside 0..1");
    }

    #[test]
    fn a_save_of_too_many_vertices_is_refused() {
        let big = |i: usize| shape(serde_json::json!({"id": format!("p{i}"), "label": "dog", "type": "points", "points": vec![[1, 1]; 3_000]}));
        let refused = schema().check_shapes(&(0..7).map(big).collect::<Vec<_>>(), 10, 10).unwrap_err();
        assert!(refused.why.contains("21000 vertices"), "{refused}");
        let mut masks = schema();
        masks.kinds.push(ShapeKind::Mask);
        // Three masks of 80,000 runs each (alternating single pixels over a 2,000 × 120 image).
        let mask = |i: usize| {
            shape(
                serde_json::json!({"id": format!("m{i}"), "label": "dog", "type": "mask", "rle": {"size": [120, 2_000], "counts": std::iter::repeat_n(1u32, 80_000).chain([160_000]).collect::<Vec<u32>>()}}),
            )
        };
        masks.check_shapes(&[mask(0)], 2_000, 120).expect("one mask fits");
        let refused = masks.check_shapes(&(0..3).map(mask).collect::<Vec<_>>(), 2_000, 120).unwrap_err();
        assert!(refused.why.contains("240003 mask runs"), "{refused}");
    }

    #[test]
    fn unknown_fields_are_refused_when_read() {
        assert!(serde_json::from_value::<Annotation>(
            serde_json::json!({"id": "a", "label": "dog", "type": "box", "x": 1, "y": 1, "w": 1, "h": 1, "colour": "red"})
        )
        .is_err());
    }
}

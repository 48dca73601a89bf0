//! Pascal VOC XML: one `<annotation>` document per image.
//!
//! ```xml
//! <annotation>
//!   <filename>000001.jpg</filename>
//!   <size><width>353</width><height>500</height><depth>3</depth></size>
//!   <object>
//!     <name>dog</name>
//!     <bndbox><xmin>48</xmin><ymin>240</ymin><xmax>195</xmax><ymax>371</ymax></bndbox>
//!   </object>
//! </annotation>
//! ```
//!
//! Coordinates: VOC numbers pixels from 1 and its box corners are inclusive pixel indices, so
//! a box covering the whole image is `xmin = 1, xmax = width`. In the model's continuous
//! space (see [`super`]) that is `x = xmin - 1`, `w = xmax - xmin + 1`; the writer inverts it
//! (`xmin = x + 1`, `xmax = x + w`). The arithmetic is done in `f64` and numbers are written
//! as the shortest decimal, so write → read is exact; fractional coordinates (which many
//! tools write) are accepted. A box is refused when `xmax < xmin - 1` (negative width).
//!
//! Extensions, because VOC has no standard for them:
//! - polygons are written CVAT-style as `<polygon><x1>…</x1><y1>…</y1><x2>…` inside the
//!   object, in the model's 0-based continuous coordinates (as CVAT and LabelMe write
//!   points), *plus* their bounding `<bndbox>` so that plain VOC readers still see a box. On
//!   read a `<polygon>` wins over the `<bndbox>`;
//! - keypoints and masks are refused on write ([`Unrepresentable::Shape`]; VOC keeps masks as
//!   class-index PNGs beside the XML, which this layout does not write);
//! - a prediction's score is written as a `<score>` child of `<object>` and read back.
//!
//! `<pose>`, `<truncated>`, `<difficult>` are written with their neutral values and
//! ignored, as are `<folder>`, `<source>`, `<depth>` and anything else unknown, on read.

use std::fmt::Write as _;

use quick_xml::escape::{escape, resolve_predefined_entity};
use quick_xml::events::Event;
use quick_xml::Reader;

use super::{check_image_size, AnnotatedImage, AnnotationError, Format, Location, Object, Result, Shape, ShapeKind, Unrepresentable, Where};

/// A parsed element: just what VOC needs (no attributes, no mixed content).
struct Element {
    name: String,
    text: String,
    children: Vec<Element>,
    line: usize,
}

impl Element {
    fn child(&self, name: &str) -> Option<&Element> {
        self.children.iter().find(|c| c.name == name)
    }
}

/// An element and its path from the root, which every error names.
#[derive(Clone, Copy)]
struct At<'a> {
    element: &'a Element,
    path: &'a str,
}

impl<'a> At<'a> {
    fn here(&self) -> Where {
        Location::Element { path: self.path.to_owned(), line: self.element.line }.into()
    }

    fn child<T>(&self, name: &str, then: impl FnOnce(At<'_>) -> Result<T>) -> Result<Option<T>> {
        match self.element.child(name) {
            Some(element) => then(At { element, path: &format!("{}/{name}", self.path) }).map(Some),
            None => Ok(None),
        }
    }

    fn required<T>(&self, name: &str, then: impl FnOnce(At<'_>) -> Result<T>) -> Result<T> {
        self.child(name, then)?.ok_or_else(|| AnnotationError::Missing { at: self.here(), what: format!("<{name}>") })
    }

    fn text(&self) -> String {
        self.element.text.trim().to_owned()
    }

    fn number<T: std::str::FromStr>(&self) -> Result<T> {
        let text = self.element.text.trim();
        text.parse().map_err(|_| AnnotationError::NotANumber { at: self.here(), value: text.to_owned() })
    }

    fn number_child<T: std::str::FromStr>(&self, name: &str) -> Result<T> {
        self.required(name, |c| c.number())
    }
}

/// Reads one VOC document.
pub fn read(bytes: &[u8]) -> Result<AnnotatedImage> {
    let root = parse(bytes)?;
    if root.name != "annotation" {
        return Err(AnnotationError::Syntax {
            at: Location::Element { path: root.name.clone(), line: root.line }.into(),
            message: "the root element must be <annotation>".into(),
        });
    }
    let root = At { element: &root, path: "annotation" };
    let file_name = root.required("filename", |e| Ok(e.text()))?;
    let (width, height) = root.required("size", |size| {
        let (width, height) = (size.number_child("width")?, size.number_child("height")?);
        check_image_size(width, height).map_err(|problem| AnnotationError::invalid(size.here(), problem))?;
        Ok((width, height))
    })?;
    let objects = root
        .element
        .children
        .iter()
        .filter(|c| c.name == "object")
        .enumerate()
        .map(|(i, element)| read_object(At { element, path: &format!("annotation/object[{}]", i + 1) }, width, height))
        .collect::<Result<_>>()?;
    Ok(AnnotatedImage { file_name, width, height, objects })
}

fn read_object(object: At<'_>, width: u32, height: u32) -> Result<Object> {
    let category = object.required("name", |e| Ok(e.text()))?;
    let score = object.child("score", |e| e.number())?;
    let polygon = object.child("polygon", |polygon| {
        let mut points = Vec::new();
        for i in 1.. {
            let (x, y) = (format!("x{i}"), format!("y{i}"));
            if polygon.element.child(&x).is_none() {
                break;
            }
            points.push((polygon.number_child(&x)?, polygon.number_child(&y)?));
        }
        Ok((Shape::Polygon { points }, polygon.here()))
    })?;
    let (shape, at) = match polygon {
        Some(found) => found,
        None => object.required("bndbox", |bndbox| {
            let [xmin, ymin, xmax, ymax] = ["xmin", "ymin", "xmax", "ymax"].map(|name| bndbox.number_child::<f64>(name));
            let (xmin, ymin, xmax, ymax) = (xmin?, ymin?, xmax?, ymax?);
            let shape = Shape::Box { x: (xmin - 1.0) as f32, y: (ymin - 1.0) as f32, w: (xmax - xmin + 1.0) as f32, h: (ymax - ymin + 1.0) as f32 };
            Ok((shape, bndbox.here()))
        })?,
    };
    let object = Object { category, shape, score };
    object.validate(width, height).map_err(|problem| AnnotationError::invalid(at, problem))?;
    Ok(object)
}

/// Parses the document into a tree of elements, tracking the line of each start tag.
fn parse(bytes: &[u8]) -> Result<Element> {
    let text = std::str::from_utf8(bytes).map_err(|e| AnnotationError::Syntax { at: Location::File.into(), message: format!("not UTF-8 ({e})") })?;
    // Offsets of the line breaks, so that a byte offset's line is a binary search.
    let breaks: Vec<usize> = text.bytes().enumerate().filter(|&(_, b)| b == b'\n').map(|(i, _)| i).collect();
    let line_at = |offset: u64| {
        let offset = usize::try_from(offset).unwrap_or(usize::MAX);
        breaks.partition_point(|&b| b < offset) + 1
    };
    let syntax = |offset: u64, message: String| AnnotationError::Syntax { at: Location::Line(line_at(offset)).into(), message };
    let mut reader = Reader::from_str(text);
    let mut stack: Vec<Element> = Vec::new();
    let mut root = None;
    let mut attach = |element: Element, stack: &mut Vec<Element>, offset: u64| -> Result<()> {
        match stack.last_mut() {
            Some(parent) => parent.children.push(element),
            None if root.is_none() => root = Some(element),
            None => return Err(syntax(offset, format!("a second root element <{}>", element.name))),
        }
        Ok(())
    };
    loop {
        let offset = reader.buffer_position();
        let event = reader.read_event().map_err(|e| syntax(reader.error_position(), e.to_string()))?;
        let new = |name: &str| Element { name: name.to_owned(), text: String::new(), children: Vec::new(), line: line_at(offset) };
        match event {
            Event::Start(start) => stack.push(new(start.local_name().as_ref())),
            Event::Empty(start) => attach(new(start.local_name().as_ref()), &mut stack, offset)?,
            Event::End(_) => {
                // quick-xml checks that end tags match their start tags.
                if let Some(element) = stack.pop() {
                    attach(element, &mut stack, offset)?;
                }
            }
            Event::Text(t) => push_text(&mut stack, &t.xml10_content()),
            Event::CData(t) => push_text(&mut stack, &t.xml10_content()),
            Event::GeneralRef(r) => {
                let resolved = match r.resolve_char_ref() {
                    Ok(Some(c)) => c.to_string(),
                    Ok(None) => resolve_predefined_entity(&r).ok_or_else(|| syntax(offset, format!("unknown entity &{};", &*r)))?.to_owned(),
                    Err(e) => return Err(syntax(offset, e.to_string())),
                };
                push_text(&mut stack, &resolved);
            }
            Event::Eof => break,
            Event::Comment(_) | Event::Decl(_) | Event::PI(_) | Event::DocType(_) => {}
        }
    }
    if let Some(open) = stack.last() {
        return Err(AnnotationError::Syntax {
            at: Location::Element { path: open.name.clone(), line: open.line }.into(),
            message: format!("<{}> is never closed", open.name),
        });
    }
    root.ok_or_else(|| AnnotationError::Syntax { at: Location::File.into(), message: "no root element".into() })
}

fn push_text(stack: &mut [Element], text: &str) {
    if let Some(element) = stack.last_mut() {
        element.text.push_str(text);
    }
}

/// Writes one VOC document (after validating the image).
pub fn write(image: &AnnotatedImage) -> Result<String> {
    image.validate(None)?;
    let mut out = String::from("<annotation>\n");
    // Writing to a String cannot fail.
    let _ = write!(
        out,
        "  <filename>{}</filename>\n  <size>\n    <width>{}</width>\n    <height>{}</height>\n    <depth>3</depth>\n  </size>\n",
        escape(image.file_name.as_str()),
        image.width,
        image.height
    );
    for (index, object) in image.objects.iter().enumerate() {
        if let kind @ (ShapeKind::Points | ShapeKind::Mask) = object.shape.kind() {
            return Err(AnnotationError::Unsupported {
                format: Format::Voc,
                at: Location::Object { image: image.file_name.clone(), index }.into(),
                what: Unrepresentable::Shape(kind),
            });
        }
        let _ = write!(
            out,
            "  <object>\n    <name>{}</name>\n    <pose>Unspecified</pose>\n    <truncated>0</truncated>\n    <difficult>0</difficult>\n",
            escape(object.category.as_str())
        );
        if let Some(score) = object.score {
            let _ = writeln!(out, "    <score>{score}</score>");
        }
        // Validated: polygons have points, so there are bounds.
        let (x, y, w, h) = object.shape.bounds().unwrap_or_default();
        let (x, y) = (f64::from(x), f64::from(y));
        let _ = write!(
            out,
            "    <bndbox>\n      <xmin>{}</xmin>\n      <ymin>{}</ymin>\n      <xmax>{}</xmax>\n      <ymax>{}</ymax>\n    </bndbox>\n",
            x + 1.0,
            y + 1.0,
            x + f64::from(w),
            y + f64::from(h)
        );
        if let Shape::Polygon { points } = &object.shape {
            out.push_str("    <polygon>\n");
            for (i, (x, y)) in points.iter().enumerate() {
                let _ = write!(out, "      <x{n}>{x}</x{n}>\n      <y{n}>{y}</y{n}>\n", n = i + 1);
            }
            out.push_str("    </polygon>\n");
        }
        out.push_str("  </object>\n");
    }
    out.push_str("</annotation>\n");
    Ok(out)
}

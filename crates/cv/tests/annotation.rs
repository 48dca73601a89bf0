//! Annotation formats: round trips, conversions, fixtures, and malformed inputs (each error
//! checked for its variant and for naming where it is).

use std::path::Path;

use proptest::prelude::*;
use suanli_cv::annotation::{
    coco, voc, yolo, AnnotatedImage, AnnotationError, AnnotationSet, Format, Location, Object, Problem, Rle, RleError, Shape, ShapeKind, Unrepresentable,
};

fn fixture(name: &str) -> Vec<u8> {
    std::fs::read(Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/annotation").join(name)).expect("fixture exists")
}

fn bbox(category: &str, x: f32, y: f32, w: f32, h: f32) -> Object {
    Object { category: category.into(), shape: Shape::Box { x, y, w, h }, score: None }
}

fn polygon(category: &str, points: &[(f32, f32)]) -> Object {
    Object { category: category.into(), shape: Shape::Polygon { points: points.to_vec() }, score: None }
}

fn scored(object: Object, score: f32) -> Object {
    Object { score: Some(score), ..object }
}

fn image(file_name: &str, width: u32, height: u32, objects: Vec<Object>) -> AnnotatedImage {
    AnnotatedImage { file_name: file_name.into(), width, height, objects }
}

fn categories() -> Vec<String> {
    vec!["cat".into(), "dog".into(), "person".into()]
}

/// Boxes (one scored, one touching the far edges, one fractional) and a polygon.
fn boxes_and_polygons() -> AnnotationSet {
    AnnotationSet {
        categories: categories(),
        images: vec![
            image(
                "a.jpg",
                640,
                480,
                vec![
                    bbox("cat", 10.0, 20.0, 100.0, 50.0),
                    scored(bbox("dog", 0.0, 0.0, 640.0, 480.0), 0.875),
                    bbox("cat", 12.3, 45.6, 78.9, 10.1),
                    polygon("person", &[(100.0, 100.0), (200.5, 110.0), (150.0, 300.25), (90.0, 250.0)]),
                ],
            ),
            image("b.png", 32, 16, vec![]),
        ],
    }
}

/// [`boxes_and_polygons`] plus a keypoint object (COCO only).
fn with_points() -> AnnotationSet {
    let mut set = boxes_and_polygons();
    set.images[1].objects.push(Object { category: "person".into(), shape: Shape::Points { points: vec![(1.0, 2.0), (30.5, 15.25)] }, score: Some(0.5) });
    set
}

/// Asserts `actual` equals `expected` with coordinates within `tolerance` pixels.
fn assert_close(actual: &AnnotatedImage, expected: &AnnotatedImage, tolerance: f32) {
    assert_eq!((&actual.file_name, actual.width, actual.height), (&expected.file_name, expected.width, expected.height));
    assert_eq!(actual.objects.len(), expected.objects.len(), "{actual:?}");
    for (a, e) in actual.objects.iter().zip(&expected.objects) {
        assert_eq!(a.category, e.category);
        assert_eq!(a.score, e.score);
        let coords = |s: &Shape| -> Vec<f32> {
            match s {
                Shape::Box { x, y, w, h } => vec![*x, *y, *w, *h],
                Shape::Polygon { points } | Shape::Points { points } => points.iter().flat_map(|&(x, y)| [x, y]).collect(),
                Shape::Mask { rle } => rle.counts.iter().map(|&c| c as f32).collect(),
            }
        };
        assert_eq!(a.shape.kind(), e.shape.kind());
        let (ca, ce) = (coords(&a.shape), coords(&e.shape));
        assert_eq!(ca.len(), ce.len());
        for (va, ve) in ca.iter().zip(&ce) {
            assert!((va - ve).abs() <= tolerance, "{a:?} vs {e:?}");
        }
    }
}

/// The error's location, which every malformed-input test checks along with the variant.
fn location(error: &AnnotationError) -> &Location {
    &error.location().expect("error has a location").location
}

// ---- round trips ----

#[test]
fn coco_round_trip_is_exact_for_boxes_polygons_points_and_scores() {
    let set = with_points();
    let bytes = coco::write(&set).expect("write");
    assert_eq!(coco::read(&bytes).expect("read"), set);
}

#[test]
fn coco_writes_bbox_area_and_keypoint_fields() {
    let json: serde_json::Value = serde_json::from_slice(&coco::write(&with_points()).expect("write")).expect("json");
    let annotations = json["annotations"].as_array().expect("annotations");
    let polygon = &annotations[3];
    assert_eq!(polygon["category_id"], 3);
    assert_eq!(polygon["bbox"], serde_json::json!([90.0, 100.0, 110.5, 200.25]));
    assert_eq!(polygon["segmentation"].as_array().expect("polygons").len(), 1);
    assert_eq!(polygon["iscrowd"], 0);
    assert!(polygon["area"].as_f64().expect("area") > 0.0);
    let points = &annotations[4];
    assert_eq!(points["num_keypoints"], 2);
    assert_eq!(points["keypoints"], serde_json::json!([1.0, 2.0, 2.0, 30.5, 15.25, 2.0]));
    assert_eq!(points["score"], 0.5);
    assert_eq!(json["categories"][0], serde_json::json!({"id": 1, "name": "cat"}));
}

/// A 6×4 mask: pixels (1,0), (1,1), (2,1) and (5,3).
fn mask_object() -> Object {
    let mut pixels = vec![false; 24];
    for (x, y) in [(1, 0), (1, 1), (2, 1), (5, 3)] {
        pixels[y * 6 + x] = true;
    }
    Object { category: "cat".into(), shape: Shape::Mask { rle: Rle::from_row_major(6, 4, &pixels) }, score: None }
}

#[test]
fn coco_writes_a_mask_as_uncompressed_rle_and_reads_it_back() {
    let set = AnnotationSet { categories: categories(), images: vec![image("m.png", 6, 4, vec![mask_object()])] };
    let bytes = coco::write(&set).expect("write");
    let json: serde_json::Value = serde_json::from_slice(&bytes).expect("json");
    let mask = &json["annotations"][0];
    // Column-major: column 0 empty (4), column 1 rows 0-1 set, then (2,1), then (5,3) last.
    assert_eq!(mask["segmentation"], serde_json::json!({"size": [4, 6], "counts": [4, 2, 3, 1, 13, 1]}));
    assert_eq!(mask["bbox"], serde_json::json!([1.0, 0.0, 5.0, 4.0]));
    assert_eq!(mask["area"], 4.0);
    assert_eq!(mask["iscrowd"], 0);
    assert_eq!(coco::read(&bytes).expect("read"), set);
}

#[test]
fn coco_reads_compressed_rle() {
    // The same mask as above, counts in COCO's compressed string form.
    let counts = suanli_annotation::rle::encode_compressed(&[4, 2, 3, 1, 13, 1]);
    let set = coco_with(&format!(r#"{{"image_id": 7, "category_id": 1, "iscrowd": 1, "segmentation": {{"counts": "{counts}", "size": [50, 100]}}}}"#));
    let error = set.expect_err("runs cover 24 of 5,000 pixels");
    assert!(matches!(error, AnnotationError::Invalid { problem: Problem::Mask(_), .. }), "{error:?}");
    let covering = suanli_annotation::rle::encode_compressed(&[4, 2, 3, 1, 13, 1, 4_976]);
    let set = coco_with(&format!(r#"{{"image_id": 7, "category_id": 1, "iscrowd": 1, "segmentation": {{"counts": "{covering}", "size": [50, 100]}}}}"#))
        .expect("reads");
    assert_eq!(set.images[0].objects[0].shape, Shape::Mask { rle: Rle { size: [50, 100], counts: vec![4, 2, 3, 1, 13, 1, 4_976] } });
}

#[test]
fn voc_and_yolo_refuse_masks() {
    let with_mask = image("m.png", 6, 4, vec![bbox("cat", 0.0, 0.0, 1.0, 1.0), mask_object()]);
    let error = voc::write(&with_mask).expect_err("mask");
    assert!(matches!(error, AnnotationError::Unsupported { format: Format::Voc, what: Unrepresentable::Shape(ShapeKind::Mask), .. }), "{error:?}");
    let error = yolo::write(&with_mask, &categories()).expect_err("mask");
    assert!(matches!(error, AnnotationError::Unsupported { format: Format::Yolo, what: Unrepresentable::Shape(ShapeKind::Mask), .. }), "{error:?}");
    assert_eq!(location(&error), &Location::Object { image: "m.png".into(), index: 1 });
}

#[test]
fn voc_round_trip_is_exact_for_boxes_polygons_and_scores() {
    for image in &boxes_and_polygons().images {
        let xml = voc::write(image).expect("write");
        assert_eq!(&voc::read(xml.as_bytes()).expect("read"), image, "{xml}");
    }
}

#[test]
fn voc_uses_one_based_inclusive_corners_and_writes_a_bndbox_for_polygons() {
    let set = boxes_and_polygons();
    let xml = voc::write(&set.images[0]).expect("write");
    // The whole 640x480 image: pixels 1..=640, 1..=480.
    assert!(xml.contains("<xmin>1</xmin>\n      <ymin>1</ymin>\n      <xmax>640</xmax>\n      <ymax>480</ymax>"), "{xml}");
    assert!(xml.contains("<score>0.875</score>"));
    assert!(xml.contains("<polygon>\n      <x1>100</x1>\n      <y1>100</y1>"));
    assert!(xml.contains("<xmin>91</xmin>\n      <ymin>101</ymin>\n      <xmax>200.5</xmax>"), "{xml}");
}

#[test]
fn voc_refuses_keypoints() {
    let set = with_points();
    let error = voc::write(&set.images[1]).expect_err("keypoints");
    assert!(matches!(error, AnnotationError::Unsupported { format: Format::Voc, what: Unrepresentable::Shape(ShapeKind::Points), .. }), "{error:?}");
    assert_eq!(location(&error), &Location::Object { image: "b.png".into(), index: 0 });
}

#[test]
fn yolo_round_trip_within_a_thousandth() {
    let set = boxes_and_polygons();
    for image in &set.images {
        let text = yolo::write(image, &set.categories).expect("write");
        let objects = yolo::read(&text, image.width, image.height, &set.categories).expect("read");
        let back = AnnotatedImage { objects, ..image.clone() };
        assert_close(&back, image, 1e-3 * image.width.max(image.height) as f32);
    }
}

#[test]
fn yolo_lines_are_normalized_center_boxes_with_optional_confidence() {
    let set = boxes_and_polygons();
    let text = yolo::write(&set.images[0], &set.categories).expect("write");
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines[0], "0 0.09375 0.09375 0.15625 0.104166664");
    assert_eq!(lines[1], "1 0.5 0.5 1 1 0.875");
    assert_eq!(lines[3].split_whitespace().count(), 9);
}

#[test]
fn yolo_refuses_keypoints_and_scored_polygons() {
    let set = with_points();
    let error = yolo::write(&set.images[1], &set.categories).expect_err("keypoints");
    assert!(matches!(error, AnnotationError::Unsupported { what: Unrepresentable::Shape(ShapeKind::Points), .. }));
    let scored_polygon = image("p.jpg", 10, 10, vec![scored(polygon("cat", &[(1.0, 1.0), (5.0, 1.0), (3.0, 4.0)]), 0.5)]);
    let error = yolo::write(&scored_polygon, &set.categories).expect_err("scored polygon");
    assert!(matches!(error, AnnotationError::Unsupported { format: Format::Yolo, what: Unrepresentable::PolygonScore, .. }));
    assert_eq!(location(&error), &Location::Object { image: "p.jpg".into(), index: 0 });
}

#[test]
fn coco_to_yolo_to_coco_preserves_boxes() {
    let set = AnnotationSet {
        categories: categories(),
        images: vec![image("x.jpg", 1000, 750, vec![bbox("dog", 100.0, 200.0, 300.0, 150.0), scored(bbox("cat", 1.5, 2.5, 10.0, 20.0), 0.25)])],
    };
    let from_coco = coco::read(&coco::write(&set).expect("write coco")).expect("read coco");
    let mut via_yolo = from_coco.clone();
    for image in &mut via_yolo.images {
        let text = yolo::write(image, &from_coco.categories).expect("write yolo");
        image.objects = yolo::read(&text, image.width, image.height, &from_coco.categories).expect("read yolo");
    }
    let back = coco::read(&coco::write(&via_yolo).expect("write coco")).expect("read coco");
    assert_eq!(back.categories, set.categories);
    assert_close(&back.images[0], &set.images[0], 1e-3);
}

#[test]
fn dir_layouts_round_trip() {
    let dir = tempfile::tempdir().expect("tempdir");
    let set = boxes_and_polygons();

    set.write_dir(Format::Coco, &dir.path().join("coco")).expect("write coco");
    assert!(dir.path().join("coco/annotations.json").is_file());
    assert_eq!(AnnotationSet::read_dir(Format::Coco, &dir.path().join("coco")).expect("read coco"), set);

    set.write_dir(Format::Voc, &dir.path().join("voc")).expect("write voc");
    assert!(dir.path().join("voc/Annotations/a.xml").is_file());
    let voc = AnnotationSet::read_dir(Format::Voc, &dir.path().join("voc")).expect("read voc");
    assert_eq!(voc.images, set.images);
    // VOC has no class list: the names used, sorted.
    assert_eq!(voc.categories, vec!["cat", "dog", "person"]);

    let yolo_dir = dir.path().join("yolo");
    set.write_dir(Format::Yolo, &yolo_dir).expect("write yolo");
    assert_eq!(std::fs::read_to_string(yolo_dir.join("classes.txt")).expect("classes"), "cat\ndog\nperson\n");
    assert_eq!(std::fs::read_to_string(yolo_dir.join("labels/b.txt")).expect("empty label"), "");
    std::fs::create_dir_all(yolo_dir.join("images")).expect("images dir");
    for image in &set.images {
        ::image::RgbImage::new(image.width, image.height).save(yolo_dir.join("images").join(&image.file_name)).expect("png/jpg");
    }
    let yolo = AnnotationSet::read_dir(Format::Yolo, &yolo_dir).expect("read yolo");
    assert_eq!(yolo.categories, set.categories);
    assert_eq!(yolo.images.len(), 2);
    for (back, original) in yolo.images.iter().zip(&set.images) {
        assert_close(back, original, 0.5);
    }
}

#[test]
fn yolo_dir_label_without_image_is_an_error_naming_the_file() {
    let dir = tempfile::tempdir().expect("tempdir");
    let set = boxes_and_polygons();
    set.write_dir(Format::Yolo, dir.path()).expect("write");
    let error = AnnotationSet::read_dir(Format::Yolo, dir.path()).expect_err("no images");
    assert!(matches!(error, AnnotationError::Missing { .. }), "{error:?}");
    assert!(error.to_string().contains("a.txt"), "{error}");
}

#[test]
fn dir_layouts_refuse_colliding_stems() {
    let dir = tempfile::tempdir().expect("tempdir");
    let set = AnnotationSet { categories: categories(), images: vec![image("a.jpg", 10, 10, vec![]), image("a.png", 10, 10, vec![])] };
    let error = set.write_dir(Format::Voc, dir.path()).expect_err("same stem");
    assert!(matches!(error, AnnotationError::Duplicate { .. }), "{error:?}");
}

proptest! {
    #[test]
    fn random_boxes_round_trip(
        (width, height, boxes) in (1u32..4000, 1u32..4000).prop_flat_map(|(w, h)| {
            let one = (0.0f32..1.0, 0.0f32..1.0, 0.0f32..1.0, 0.0f32..1.0, 0usize..3, proptest::option::of(0.0f32..=1.0));
            (Just(w), Just(h), proptest::collection::vec(one, 0..8))
        })
    ) {
        let (wf, hf) = (width as f32, height as f32);
        let objects = boxes.iter().map(|&(a, b, c, d, class, score)| {
            // Corners drawn inside the image, in either order.
            let (x0, x1) = (a.min(b) * wf, a.max(b) * wf);
            let (y0, y1) = (c.min(d) * hf, c.max(d) * hf);
            Object { category: categories()[class].clone(), shape: Shape::Box { x: x0, y: y0, w: x1 - x0, h: y1 - y0 }, score }
        }).collect();
        let set = AnnotationSet { categories: categories(), images: vec![image("r.jpg", width, height, objects)] };

        prop_assert_eq!(&coco::read(&coco::write(&set).expect("coco")).expect("coco back"), &set);
        let img = &set.images[0];
        prop_assert_eq!(&voc::read(voc::write(img).expect("voc").as_bytes()).expect("voc back"), img);
        let text = yolo::write(img, &set.categories).expect("yolo");
        let objects = yolo::read(&text, width, height, &set.categories).expect("yolo back");
        assert_close(&AnnotatedImage { objects, ..img.clone() }, img, 1e-3 * width.max(height) as f32);
    }
}

// ---- fixtures ----

#[test]
fn reads_a_real_looking_coco_file() {
    let set = coco::read(&fixture("instances_sample.json")).expect("fixture");
    // File order, whatever the ids (1, 44, 3).
    assert_eq!(set.categories, vec!["person", "bottle", "car"]);
    assert_eq!(set.images.len(), 2);
    let first = &set.images[0];
    assert_eq!((first.file_name.as_str(), first.width, first.height), ("000000397133.jpg", 640, 427));
    // A polygon, a two-part polygon split into two objects, and keypoints (v=0 dropped).
    let kinds: Vec<ShapeKind> = first.objects.iter().map(|o| o.shape.kind()).collect();
    assert_eq!(kinds, vec![ShapeKind::Polygon, ShapeKind::Polygon, ShapeKind::Polygon, ShapeKind::Points]);
    assert_eq!(first.objects[0].category, "bottle");
    assert!(matches!(&first.objects[0].shape, Shape::Polygon { points } if points.len() == 13));
    assert_eq!(first.objects[3].shape, Shape::Points { points: vec![(388.0, 69.0), (392.5, 71.0)] });
    assert_eq!(set.images[1].objects, vec![bbox("bottle", 102.49, 118.47, 7.9, 17.31)]);
    // And it writes back out and reads in again unchanged.
    assert_eq!(coco::read(&coco::write(&set).expect("write")).expect("read"), set);
}

#[test]
fn reads_a_real_looking_voc_file() {
    let image = voc::read(&fixture("000005.xml")).expect("fixture");
    assert_eq!((image.file_name.as_str(), image.width, image.height), ("000005.jpg", 500, 375));
    assert_eq!(
        image.objects,
        vec![bbox("chair", 262.0, 210.0, 62.0, 129.0), bbox("dining table", 0.0, 0.0, 500.0, 375.0), scored(bbox("R&D bottle", 4.5, 236.0, 42.0, 87.0), 0.75),]
    );
    let xml = voc::write(&image).expect("write");
    assert!(xml.contains("<name>R&amp;D bottle</name>"));
    assert_eq!(voc::read(xml.as_bytes()).expect("read"), image);
}

// ---- malformed COCO ----

const COCO_HEAD: &str = r#"{"images": [{"id": 7, "file_name": "a.jpg", "width": 100, "height": 50}],
 "categories": [{"id": 1, "name": "cat"}],
 "annotations": ["#;

fn coco_with(annotation: &str) -> Result<AnnotationSet, AnnotationError> {
    coco::read(format!("{COCO_HEAD}{annotation}]}}").as_bytes())
}

#[test]
fn coco_truncated_json_names_line_and_column() {
    let error = coco::read(&COCO_HEAD.as_bytes()[..COCO_HEAD.len() - 5]).expect_err("truncated");
    assert!(matches!(error, AnnotationError::Syntax { .. }), "{error:?}");
    assert!(matches!(location(&error), Location::LineColumn { line: 3, .. }), "{error:?}");
    assert!(error.to_string().starts_with("line 3 column"), "{error}");
}

#[test]
fn coco_annotation_with_missing_image_or_category() {
    let error = coco_with(r#"{"id": 1, "image_id": 8, "category_id": 1, "bbox": [1, 2, 3, 4]}"#).expect_err("image");
    assert!(matches!(error, AnnotationError::UnknownImage { image_id: 8, .. }), "{error:?}");
    assert_eq!(location(&error), &Location::JsonPath("annotations[0].image_id".into()));

    let error = coco_with(
        r#"{"id": 1, "image_id": 7, "category_id": 1, "bbox": [1, 2, 3, 4]},
        {"id": 2, "image_id": 7, "category_id": 2, "bbox": [1, 2, 3, 4]}"#,
    )
    .expect_err("category");
    assert!(matches!(error, AnnotationError::UnknownCategory { .. }), "{error:?}");
    assert!(error.to_string().contains("annotations[1].category_id"), "{error}");
}

#[test]
fn coco_negative_width_and_box_outside_image() {
    let error = coco_with(r#"{"image_id": 7, "category_id": 1, "bbox": [10, 10, -5, 4]}"#).expect_err("negative");
    assert!(matches!(error, AnnotationError::Invalid { problem: Problem::NegativeSize { .. }, .. }), "{error:?}");
    assert_eq!(location(&error), &Location::JsonPath("annotations[0].bbox".into()));

    let error = coco_with(r#"{"image_id": 7, "category_id": 1, "bbox": [90, 10, 20, 4]}"#).expect_err("outside");
    assert!(matches!(error, AnnotationError::Invalid { problem: Problem::OutsideImage { width: 100, height: 50 }, .. }));
}

#[test]
fn coco_bad_shapes() {
    let error = coco_with(r#"{"image_id": 7, "category_id": 1, "bbox": [1, 2, 3]}"#).expect_err("3 values");
    assert!(matches!(error, AnnotationError::FieldCount { found: 3, .. }), "{error:?}");

    let error = coco_with(r#"{"image_id": 7, "category_id": 1, "segmentation": [[1, 1, 5, 5]]}"#).expect_err("2 points");
    assert!(matches!(error, AnnotationError::Invalid { problem: Problem::TooFewPoints { found: 2, min: 3, .. }, .. }));
    assert_eq!(location(&error), &Location::JsonPath("annotations[0].segmentation[0]".into()));

    let error = coco_with(r#"{"image_id": 7, "category_id": 1, "segmentation": [[1, 1, 5, "x", 3, 3]]}"#).expect_err("nan");
    assert!(matches!(error, AnnotationError::NotANumber { .. }), "{error:?}");
    assert_eq!(location(&error), &Location::JsonPath("annotations[0].segmentation[0][3]".into()));

    let error = coco_with(r#"{"image_id": 7, "category_id": 1, "iscrowd": 1, "segmentation": {"counts": [1, 2], "size": [50, 100]}}"#).expect_err("short rle");
    assert!(matches!(error, AnnotationError::Invalid { problem: Problem::Mask(RleError::WrongLength { covered: 3, expected: 5_000 }), .. }), "{error:?}");
    assert_eq!(location(&error), &Location::JsonPath("annotations[0].segmentation".into()));
    let error = coco_with(r#"{"image_id": 7, "category_id": 1, "segmentation": {"counts": [5000], "size": [50, 100]}}"#).expect_err("empty");
    assert!(matches!(error, AnnotationError::Invalid { problem: Problem::EmptyMask, .. }), "{error:?}");
    let error = coco_with(r#"{"image_id": 7, "category_id": 1, "segmentation": {"counts": "0 ", "size": [50, 100]}}"#).expect_err("bad string");
    assert!(matches!(error, AnnotationError::Syntax { .. }), "{error:?}");
    assert_eq!(location(&error), &Location::JsonPath("annotations[0].segmentation.counts".into()));
    let error = coco_with(r#"{"image_id": 7, "category_id": 1, "segmentation": {"counts": [1, -2], "size": [50, 100]}}"#).expect_err("negative");
    assert!(matches!(error, AnnotationError::NotANumber { .. }), "{error:?}");
    let error = coco_with(r#"{"image_id": 7, "category_id": 1, "segmentation": {"counts": [5000], "size": [50]}}"#).expect_err("size");
    assert!(matches!(error, AnnotationError::Syntax { .. }), "{error:?}");

    let error = coco_with(r#"{"image_id": 7, "category_id": 1}"#).expect_err("no geometry");
    assert!(matches!(error, AnnotationError::Missing { .. }), "{error:?}");
}

#[test]
fn coco_duplicate_ids() {
    let doc = r#"{"images": [{"id": 1, "file_name": "a", "width": 1, "height": 1}, {"id": 1, "file_name": "b", "width": 1, "height": 1}], "categories": []}"#;
    let error = coco::read(doc.as_bytes()).expect_err("duplicate");
    assert!(matches!(error, AnnotationError::Duplicate { .. }), "{error:?}");
    assert_eq!(location(&error), &Location::JsonPath("images[1].id".into()));
}

#[test]
fn writers_validate_the_model() {
    let mut set = boxes_and_polygons();
    set.images[0].objects[2] = bbox("cat", 600.0, 10.0, 100.0, 10.0);
    let error = coco::write(&set).expect_err("outside");
    assert!(matches!(error, AnnotationError::Invalid { problem: Problem::OutsideImage { .. }, .. }), "{error:?}");
    assert_eq!(location(&error), &Location::Object { image: "a.jpg".into(), index: 2 });

    let mut set = boxes_and_polygons();
    set.images[0].objects[0].category = "horse".into();
    for error in [coco::write(&set).expect_err("coco"), yolo::write(&set.images[0], &set.categories).expect_err("yolo")] {
        assert!(matches!(error, AnnotationError::UnknownCategory { .. }), "{error:?}");
    }

    let bad_score = image("s.jpg", 10, 10, vec![scored(bbox("cat", 0.0, 0.0, 1.0, 1.0), 1.5)]);
    let error = voc::write(&bad_score).expect_err("score");
    assert!(matches!(error, AnnotationError::Invalid { problem: Problem::ScoreOutOfRange { .. }, .. }));

    let error = yolo::write_classes(&["ok".into(), "two\nlines".into()]).expect_err("class name");
    assert!(matches!(error, AnnotationError::Invalid { problem: Problem::BadCategoryName { .. }, .. }));
}

// ---- malformed YOLO ----

fn yolo_read(text: &str) -> Result<Vec<Object>, AnnotationError> {
    yolo::read(text, 200, 100, &categories())
}

#[test]
fn yolo_line_with_four_numbers() {
    let error = yolo_read("0 0.5 0.5 0.1 0.1\n\n1 0.5 0.5 0.2\n").expect_err("4 numbers");
    assert!(matches!(error, AnnotationError::FieldCount { found: 4, .. }), "{error:?}");
    assert_eq!(location(&error), &Location::Line(3));
    assert!(error.to_string().starts_with("line 3:"), "{error}");
}

#[test]
fn yolo_even_counts_other_than_six_are_refused() {
    // 8 values: a polygon with a trailing confidence, which YOLO lines cannot tell apart.
    let error = yolo_read("0 0.1 0.1 0.5 0.1 0.3 0.5 0.9\n").expect_err("8 values");
    assert!(matches!(error, AnnotationError::FieldCount { found: 8, .. }), "{error:?}");
}

#[test]
fn yolo_class_id_out_of_range() {
    let error = yolo_read("3 0.5 0.5 0.1 0.1").expect_err("class 3 of 3");
    assert!(matches!(error, AnnotationError::UnknownCategory { .. }), "{error:?}");
    assert_eq!(location(&error), &Location::Line(1));
    let error = yolo_read("cat 0.5 0.5 0.1 0.1").expect_err("not an id");
    assert!(matches!(error, AnnotationError::NotANumber { ref value, .. } if value == "cat"), "{error:?}");
}

#[test]
fn yolo_coordinates_above_one() {
    let error = yolo_read("0 0.5 0.5 0.1 0.1\n0 1.5 0.5 0.1 0.1").expect_err("> 1");
    assert!(matches!(error, AnnotationError::Invalid { problem: Problem::NormalizedOutOfRange { .. }, .. }), "{error:?}");
    assert_eq!(location(&error), &Location::Line(2));
    // In range one by one, but the box sticks out of the image.
    let error = yolo_read("0 0.95 0.5 0.3 0.1").expect_err("overhang");
    assert!(matches!(error, AnnotationError::Invalid { problem: Problem::OutsideImage { .. }, .. }), "{error:?}");
}

#[test]
fn yolo_reads_boxes_confidences_and_polygons() {
    let objects = yolo_read("0 0.5 0.5 0.2 0.4\n1 0.25 0.5 0.5 1 0.9\n2 0 0 1 0 0.5 1\n").expect("valid");
    assert_eq!(objects[0], bbox("cat", 80.0, 30.0, 40.0, 40.0));
    assert_eq!(objects[1], scored(bbox("dog", 0.0, 0.0, 100.0, 100.0), 0.9));
    assert_eq!(objects[2], polygon("person", &[(0.0, 0.0), (200.0, 0.0), (100.0, 100.0)]));
}

// ---- malformed VOC ----

fn voc_doc(object: &str) -> String {
    format!("<annotation>\n<filename>a.jpg</filename>\n<size><width>100</width><height>50</height></size>\n{object}\n</annotation>")
}

#[test]
fn voc_missing_bndbox() {
    let error = voc::read(voc_doc("<object><name>cat</name></object>").as_bytes()).expect_err("no bndbox");
    assert!(matches!(error, AnnotationError::Missing { ref what, .. } if what == "<bndbox>"), "{error:?}");
    assert_eq!(location(&error), &Location::Element { path: "annotation/object[1]".into(), line: 4 });
}

#[test]
fn voc_non_numeric_xmin() {
    let doc = voc_doc(
        "<object><name>cat</name><bndbox><xmin>1</xmin><ymin>1</ymin><xmax>2</xmax><ymax>2</ymax></bndbox></object>\n\
         <object><name>cat</name>\n<bndbox><xmin>ten</xmin><ymin>1</ymin><xmax>20</xmax><ymax>2</ymax></bndbox></object>",
    );
    let error = voc::read(doc.as_bytes()).expect_err("ten");
    assert!(matches!(error, AnnotationError::NotANumber { ref value, .. } if value == "ten"), "{error:?}");
    assert_eq!(location(&error), &Location::Element { path: "annotation/object[2]/bndbox/xmin".into(), line: 6 });
    assert!(error.to_string().contains("<annotation/object[2]/bndbox/xmin> (line 6)"), "{error}");
}

#[test]
fn voc_xmax_below_xmin() {
    let doc = voc_doc("<object><name>cat</name><bndbox><xmin>50</xmin><ymin>1</ymin><xmax>20</xmax><ymax>2</ymax></bndbox></object>");
    let error = voc::read(doc.as_bytes()).expect_err("xmax < xmin");
    assert!(matches!(error, AnnotationError::Invalid { problem: Problem::NegativeSize { .. }, .. }), "{error:?}");
    assert_eq!(location(&error), &Location::Element { path: "annotation/object[1]/bndbox".into(), line: 4 });
}

#[test]
fn voc_malformed_xml_and_missing_size() {
    let error = voc::read(b"<annotation>\n<filename>a.jpg</name>\n</annotation>").expect_err("mismatched tag");
    assert!(matches!(error, AnnotationError::Syntax { .. }), "{error:?}");
    assert_eq!(location(&error), &Location::Line(2), "{error:?}");
    assert!(error.to_string().starts_with("line 2: malformed"), "{error}");

    let error = voc::read(b"<annotation><filename>a.jpg</filename></annotation>").expect_err("no size");
    assert!(matches!(error, AnnotationError::Missing { ref what, .. } if what == "<size>"), "{error:?}");

    let error = voc::read(b"<annotation><filename>a.jpg</filename><size><width>0</width><height>5</height></size></annotation>").expect_err("empty");
    assert!(matches!(error, AnnotationError::Invalid { problem: Problem::EmptyImage { .. }, .. }), "{error:?}");

    let error = voc::read(b"<annotation><filename>a.jpg</filename>").expect_err("unclosed");
    assert!(matches!(error, AnnotationError::Syntax { .. }), "{error:?}");
}

#[test]
fn voc_polygon_with_too_few_points() {
    let doc = voc_doc("<object><name>cat</name><polygon><x1>1</x1><y1>1</y1><x2>5</x2><y2>5</y2></polygon></object>");
    let error = voc::read(doc.as_bytes()).expect_err("2 points");
    assert!(matches!(error, AnnotationError::Invalid { problem: Problem::TooFewPoints { found: 2, .. }, .. }), "{error:?}");
    assert_eq!(location(&error), &Location::Element { path: "annotation/object[1]/polygon".into(), line: 4 });
}

#[test]
fn read_dir_errors_name_the_file() {
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::create_dir_all(dir.path().join("Annotations")).expect("dir");
    std::fs::write(dir.path().join("Annotations/bad.xml"), voc_doc("<object><name>cat</name></object>")).expect("write");
    let error = AnnotationSet::read_dir(Format::Voc, dir.path()).expect_err("bad");
    let at = error.location().expect("location");
    assert!(at.file.as_deref().is_some_and(|f| f.ends_with("Annotations/bad.xml")));
    assert!(error.to_string().contains("bad.xml: <annotation/object[1]> (line 4)"), "{error}");
}

//! Datasets: versions and their history, manifests on disk, and reproducible splits.

use std::collections::BTreeMap;

use proptest::prelude::*;
use suanli_cv::dataset::{items_id, split, Changes, Dataset, DatasetError, Item, LabelFilter, Query, SplitMethod, SplitSpec, MANIFEST};

fn sha(n: u64) -> String {
    use sha2::Digest;
    hex::encode(sha2::Sha256::digest(n.to_le_bytes()))
}

fn item(name: &str, content: u64, label: Option<&str>) -> Item {
    Item { name: name.to_owned(), sha256: sha(content), label: label.map(str::to_owned) }
}

fn names(items: &[Item]) -> Vec<&str> {
    items.iter().map(|i| i.name.as_str()).collect()
}

fn spec(train: f32, val: f32, test: f32, method: SplitMethod, seed: u64) -> SplitSpec {
    SplitSpec { train, val, test, method, seed }
}

#[test]
fn versions_record_their_changes() {
    let mut ds = Dataset::create("faces", vec![item("b.png", 2, Some("cat")), item("a.png", 1, Some("dog"))]).expect("create");
    let v1 = ds.latest().clone();
    assert_eq!((v1.number, v1.parent), (1, None));
    assert_eq!(names(&v1.items), ["a.png", "b.png"], "items are kept sorted");
    assert_eq!(v1.changes.added, ["a.png", "b.png"]);

    // Edit: relabel a, change b's content, delete nothing, add c.
    let v2 = ds.commit(vec![item("a.png", 1, Some("cat")), item("b.png", 22, Some("cat")), item("c.png", 3, None)], "relabel").expect("commit").clone();
    assert_eq!((v2.number, v2.parent, v2.note.as_str()), (2, Some(1), "relabel"));
    assert_eq!(v2.changes, Changes { added: vec!["c.png".into()], removed: vec![], modified: vec!["a.png".into(), "b.png".into()] });

    // Delete: commit without the item; history keeps it.
    let v3 = ds.commit(vec![item("a.png", 1, Some("cat")), item("c.png", 3, None)], "drop b").expect("commit").clone();
    assert_eq!(v3.changes.removed, ["b.png"]);
    assert_eq!(ds.versions().len(), 3);
    assert_eq!(names(&ds.version(2).expect("v2").items), ["a.png", "b.png", "c.png"]);
    assert_eq!(ds.diff(1, 3).expect("diff"), Changes { added: vec!["c.png".into()], removed: vec!["b.png".into()], modified: vec!["a.png".into()] });
    assert!(ds.diff(3, 3).expect("diff").is_empty());
    assert!(matches!(ds.diff(1, 9), Err(DatasetError::NoSuchVersion { number: 9, .. })));
    assert!(ds.version(0).is_none() && ds.version(4).is_none());

    // No-op commit, in another order: no new version.
    let same = ds.commit(vec![item("c.png", 3, None), item("a.png", 1, Some("cat"))], "again").expect("commit").clone();
    assert_eq!(same, v3);
    assert_eq!(ds.versions().len(), 3);
    // Going back to v1's content is a new version with v1's id.
    let v4 = ds.commit(v1.items.clone(), "revert").expect("commit").clone();
    assert_eq!((v4.number, v4.id.as_str()), (4, v1.id.as_str()));
}

#[test]
fn id_depends_on_content_not_order() {
    let a = vec![item("x", 1, Some("l")), item("y", 2, None), item("z", 3, Some("m"))];
    let mut b = a.clone();
    b.reverse();
    assert_eq!(items_id(&a), items_id(&b));
    assert_eq!(Dataset::create("one", a.clone()).expect("create").latest().id, Dataset::create("two", b).expect("create").latest().id);
    let mut relabeled = a.clone();
    relabeled[1].label = Some("l".into());
    assert_ne!(items_id(&a), items_id(&relabeled));
    let mut renamed = a.clone();
    renamed[0].name = "x2".into();
    assert_ne!(items_id(&a), items_id(&renamed));
    // Field boundaries matter: ("ab", "c") is not ("a", "bc").
    let ab = Item { name: "ab".into(), sha256: sha(1), label: Some("c".into()) };
    let a_bc = Item { name: "a".into(), sha256: sha(1), label: Some("bc".into()) };
    assert_ne!(items_id(&[ab]), items_id(&[a_bc]));
    assert_eq!(items_id(&[]).len(), 64);
}

#[test]
fn bad_items_are_refused() {
    let err = Dataset::create("d", vec![item("a", 1, None), item("a", 2, None), Item { name: String::new(), sha256: "xyz".into(), label: None }])
        .map(|_| ())
        .expect_err("invalid");
    let DatasetError::InvalidItems(errors) = &err else { panic!("{err}") };
    let text = err.to_string();
    assert_eq!(errors.len(), 3, "{text}");
    assert!(text.contains("duplicate name \"a\"") && text.contains("must not be empty") && text.contains("64 lowercase hex"), "{text}");
}

#[test]
fn query_by_label_and_prefix() {
    let ds = Dataset::create("d", vec![item("cats/1", 1, Some("cat")), item("cats/2", 2, Some("cat")), item("dogs/1", 3, Some("dog")), item("misc", 4, None)])
        .expect("create");
    let v = ds.latest();
    let found = |q: &Query| v.query(q).iter().map(|i| i.name.clone()).collect::<Vec<_>>();
    assert_eq!(found(&Query::label("cat")), ["cats/1", "cats/2"]);
    assert_eq!(found(&Query::name_prefix("dogs/")), ["dogs/1"]);
    assert_eq!(found(&Query { label: LabelFilter::Unlabeled, ..Query::default() }), ["misc"]);
    assert_eq!(found(&Query { label: LabelFilter::Equals("cat".into()), name_prefix: Some("cats/2".into()) }), ["cats/2"]);
    assert_eq!(found(&Query::default()).len(), 4);
    let q: Query = serde_json::from_str(r#"{"label": {"is": "equals", "value": "dog"}}"#).expect("parses");
    assert_eq!(found(&q), ["dogs/1"]);
    assert_eq!(v.label_counts().get(&Some("cat")), Some(&2));
}

#[test]
fn manifest_round_trips_and_damage_is_detected() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut ds = Dataset::create("faces", vec![item("a", 1, Some("x")), item("b", 2, None)]).expect("create");
    ds.commit(vec![item("a", 1, Some("y"))], "relabel and drop").expect("commit");
    let path = ds.save(dir.path()).expect("save");
    assert_eq!(path, dir.path().join(MANIFEST));
    let loaded = Dataset::load(dir.path()).expect("load");
    assert_eq!(loaded, ds);
    assert_eq!(loaded.name(), "faces");
    // No temporary file is left behind; saving again replaces the manifest.
    let leftovers: Vec<_> = std::fs::read_dir(dir.path()).expect("list").map(|e| e.expect("entry").file_name()).collect();
    assert_eq!(leftovers, [MANIFEST]);
    ds.commit(vec![], "empty it").expect("commit");
    ds.save(dir.path()).expect("save");
    assert_eq!(Dataset::load(dir.path()).expect("load").versions().len(), 3);

    // A hand-edited label no longer matches the version id.
    let text = std::fs::read_to_string(&path).expect("read");
    std::fs::write(&path, text.replacen("\"y\"", "\"z\"", 1)).expect("write");
    let err = Dataset::load(dir.path()).map(|_| ()).expect_err("tampered");
    assert!(matches!(err, DatasetError::Manifest { .. }) && err.to_string().contains("id does not match"), "{err}");
    std::fs::write(&path, "{not json").expect("write");
    assert!(matches!(Dataset::load(dir.path()), Err(DatasetError::Manifest { .. })));
    assert!(matches!(Dataset::load(dir.path().join("nowhere")), Err(DatasetError::Io { .. })));
}

#[test]
fn from_intake_report() {
    use suanli_cv::intake::{IntakeReport, LoadedImage};
    let image = |name: &str, n: u64, label: Option<&str>| LoadedImage {
        name: name.into(),
        sha256: sha(n),
        format: suanli_cv::intake::ImageFormat::Png,
        label: label.map(str::to_owned),
        image: suanli_cv::Image::new(1, 1, 1),
    };
    let report = IntakeReport { images: vec![image("cats/a.png", 1, Some("cats")), image("b.png", 2, None)], ..IntakeReport::default() };
    let ds = Dataset::from_intake("imported", &report).expect("create");
    assert_eq!(ds.latest().items, [item("b.png", 2, None), item("cats/a.png", 1, Some("cats"))]);
}

fn many(n: usize) -> Vec<Item> {
    (0..n).map(|i| item(&format!("img{i:04}"), i as u64, Some(["a", "b", "c"][i % 3]))).collect()
}

#[test]
fn random_split_sizes_and_reproducibility() {
    let items = many(10);
    let s = split(&items, &spec(0.8, 0.1, 0.1, SplitMethod::Random, 1)).expect("split");
    assert_eq!(s.sizes(), [8, 1, 1]);
    let all: std::collections::BTreeSet<&str> = s.train.iter().chain(&s.val).chain(&s.test).map(|i| i.name.as_str()).collect();
    assert_eq!(all.len(), 10, "a partition");
    for (n, ratios, expected) in [
        (7, (0.5, 0.25, 0.25), [3, 2, 2]),
        (3, (0.34, 0.33, 0.33), [1, 1, 1]),
        (0, (0.8, 0.1, 0.1), [0, 0, 0]),
        (5, (1.0, 0.0, 0.0), [5, 0, 0]),
        (100, (0.7, 0.15, 0.15), [70, 15, 15]),
    ] {
        let s = split(&many(n), &spec(ratios.0, ratios.1, ratios.2, SplitMethod::Random, 0)).expect("split");
        assert_eq!(s.sizes(), expected, "n={n} {ratios:?}");
    }

    let again = split(&items, &spec(0.8, 0.1, 0.1, SplitMethod::Random, 1)).expect("split");
    assert_eq!(again, s);
    let mut reversed = items.clone();
    reversed.reverse();
    assert_eq!(split(&reversed, &spec(0.8, 0.1, 0.1, SplitMethod::Random, 1)).expect("split"), s, "order independent");
    let other: Vec<_> = (2..12).map(|seed| split(&items, &spec(0.8, 0.1, 0.1, SplitMethod::Random, seed)).expect("split")).collect();
    assert!(other.iter().any(|o| *o != s), "other seeds give other splits");
    let big = many(200);
    assert_ne!(
        split(&big, &spec(0.5, 0.25, 0.25, SplitMethod::Random, 1)).expect("split"),
        split(&big, &spec(0.5, 0.25, 0.25, SplitMethod::Random, 2)).expect("split")
    );
}

#[test]
fn stratified_split_keeps_proportions() {
    // Imbalanced: 60 a, 30 b, 10 c.
    let items: Vec<Item> = (0..100)
        .map(|i| {
            item(
                &format!("i{i:03}"),
                i,
                Some(if i < 60 {
                    "a"
                } else if i < 90 {
                    "b"
                } else {
                    "c"
                }),
            )
        })
        .collect();
    let s = split(&items, &spec(0.8, 0.1, 0.1, SplitMethod::Stratified, 3)).expect("split");
    let count = |part: &[Item], label: &str| part.iter().filter(|i| i.label.as_deref() == Some(label)).count();
    assert_eq!([count(&s.train, "a"), count(&s.val, "a"), count(&s.test, "a")], [48, 6, 6]);
    assert_eq!([count(&s.train, "b"), count(&s.val, "b"), count(&s.test, "b")], [24, 3, 3]);
    assert_eq!([count(&s.train, "c"), count(&s.val, "c"), count(&s.test, "c")], [8, 1, 1]);
    let mut shuffled = items.clone();
    shuffled.rotate_left(37);
    assert_eq!(split(&shuffled, &spec(0.8, 0.1, 0.1, SplitMethod::Stratified, 3)).expect("split"), s);

    // Many small classes still fill val and test (rounding coordinated across classes).
    let small: Vec<Item> = (0..30).map(|i| item(&format!("s{i:02}"), i, Some(&format!("class{}", i / 3)))).collect();
    let s = split(&small, &spec(0.8, 0.1, 0.1, SplitMethod::Stratified, 0)).expect("split");
    assert_eq!(s.sizes(), [24, 3, 3]);

    let mut unlabeled = items;
    unlabeled[5].label = None;
    let err = split(&unlabeled, &spec(0.8, 0.1, 0.1, SplitMethod::Stratified, 0)).map(|_| ()).expect_err("unlabeled");
    assert!(matches!(err, DatasetError::Unlabeled { count: 1, .. }), "{err}");
    assert!(err.to_string().contains("i005"), "{err}");
}

#[test]
fn invalid_ratios_are_listed() {
    let bad = spec(-0.1, 1.5, f32::NAN, SplitMethod::Random, 0);
    let errors: Vec<String> = bad.validate().iter().map(ToString::to_string).collect();
    assert_eq!(errors.len(), 3, "{errors:?}");
    assert!(errors[0].starts_with("train:") && errors[1].starts_with("val:") && errors[2].starts_with("test:"), "{errors:?}");
    let sum = spec(0.5, 0.3, 0.3, SplitMethod::Random, 0);
    let err = split(&many(3), &sum).map(|_| ()).expect_err("sum");
    assert!(err.to_string().contains("train + val + test: must sum to 1"), "{err}");
    assert!(spec(0.7, 0.2, 0.1, SplitMethod::Random, 0).validate().is_empty());
    // As a job spec writes it.
    let parsed: SplitSpec = serde_json::from_str(r#"{"train": 0.8, "val": 0.1, "test": 0.1, "method": "stratified", "seed": 42}"#).expect("parses");
    assert_eq!(parsed, spec(0.8, 0.1, 0.1, SplitMethod::Stratified, 42));
    assert!(serde_json::from_str::<SplitSpec>(r#"{"train": 1, "val": 0, "test": 0, "shuffle": true}"#).is_err());
}

fn class_items(sizes: &[usize]) -> Vec<Item> {
    let mut items = Vec::new();
    for (c, &size) in sizes.iter().enumerate() {
        for k in 0..size {
            items.push(item(&format!("c{c}/{k}"), (c * 10_000 + k) as u64, Some(&format!("c{c}"))));
        }
    }
    items
}

proptest! {
    #[test]
    fn stratified_counts_within_one_of_the_ratio(
        sizes in proptest::collection::vec(1usize..60, 1..8),
        (a, b) in (0u32..=100, 0u32..=100),
        seed in any::<u64>(),
    ) {
        let (lo, hi) = (a.min(b), a.max(b));
        let ratios = [lo as f32 / 100.0, (hi - lo) as f32 / 100.0, (100 - hi) as f32 / 100.0];
        let spec = spec(ratios[0], ratios[1], ratios[2], SplitMethod::Stratified, seed);
        let items = class_items(&sizes);
        let s = split(&items, &spec).expect("split");
        prop_assert_eq!(s.sizes().iter().sum::<usize>(), items.len());
        let mut per_class: BTreeMap<(String, usize), usize> = BTreeMap::new();
        for (k, part) in [&s.train, &s.val, &s.test].into_iter().enumerate() {
            for i in part {
                *per_class.entry((i.label.clone().unwrap_or_default(), k)).or_default() += 1;
            }
        }
        let ratios = [spec.train, spec.val, spec.test];
        for (c, &size) in sizes.iter().enumerate() {
            for (k, r) in ratios.iter().enumerate() {
                let got = per_class.get(&(format!("c{c}"), k)).copied().unwrap_or(0) as f64;
                let want = f64::from(*r) * size as f64;
                prop_assert!((got - want).abs() <= 1.0 + 1e-6, "class {} size {} split {}: {} vs {}", c, size, k, got, want);
            }
        }
        // Totals stay near their own targets too.
        let n = items.len() as f64;
        for (k, r) in ratios.iter().enumerate() {
            let got = s.sizes()[k] as f64;
            prop_assert!((got - f64::from(*r) * n).abs() <= sizes.len() as f64, "split {}: {} of {}", k, got, n);
        }
    }

    #[test]
    fn random_split_sizes_sum_and_are_close(n in 0usize..300, (a, b) in (0u32..=100, 0u32..=100), seed in any::<u64>()) {
        let (lo, hi) = (a.min(b), a.max(b));
        let spec = spec(lo as f32 / 100.0, (hi - lo) as f32 / 100.0, (100 - hi) as f32 / 100.0, SplitMethod::Random, seed);
        let s = split(&many(n), &spec).expect("split");
        prop_assert_eq!(s.sizes().iter().sum::<usize>(), n);
        for (k, r) in [spec.train, spec.val, spec.test].iter().enumerate() {
            prop_assert!((s.sizes()[k] as f64 - f64::from(*r) * n as f64).abs() < 1.0 + 1e-6);
        }
    }
}

//! NMS (IoU by hand, known sets, torchvision's boundary rule, properties) and the
//! classification metrics (a worked 3-class example).

use proptest::prelude::*;
use suanli_cv::metrics::{ConfusionMatrix, LabelRole, MetricsError};
use suanli_cv::nms::{batched_nms, filter, iou, nms, overlap, Detection, IouMode};

fn det(x1: f32, y1: f32, x2: f32, y2: f32, score: f32, class: u32) -> Detection {
    Detection { x1, y1, x2, y2, score, class }
}

fn boxed(x1: f32, y1: f32, x2: f32, y2: f32) -> Detection {
    det(x1, y1, x2, y2, 1.0, 0)
}

// ---- IoU ----

#[test]
fn iou_by_hand() {
    let a = boxed(0.0, 0.0, 10.0, 10.0);
    assert_eq!(a.area(), 100.0);
    assert_eq!(iou(&a, &a), 1.0, "identical");
    assert_eq!(iou(&a, &boxed(20.0, 20.0, 30.0, 30.0)), 0.0, "disjoint");
    assert_eq!(iou(&a, &boxed(10.0, 0.0, 20.0, 10.0)), 0.0, "touching edges");
    // Contained: 25 / 100; over the smaller box it is complete.
    let inner = boxed(2.0, 2.0, 7.0, 7.0);
    assert_eq!(iou(&a, &inner), 0.25);
    assert_eq!(overlap(&a, &inner, IouMode::Min), 1.0);
    // Half of each box overlaps: 50 / (100 + 100 - 50).
    let half = boxed(5.0, 0.0, 15.0, 10.0);
    assert!((iou(&a, &half) - 1.0 / 3.0).abs() < 1e-6);
    assert_eq!(overlap(&a, &half, IouMode::Min), 0.5);
    assert_eq!(iou(&a, &half), iou(&half, &a), "symmetric");
}

#[test]
fn empty_boxes_have_zero_area_and_iou() {
    let point = boxed(5.0, 5.0, 5.0, 5.0);
    let inverted = boxed(10.0, 10.0, 0.0, 0.0);
    assert_eq!(inverted.area(), 0.0);
    assert_eq!(iou(&point, &point), 0.0, "empty union");
    assert_eq!(overlap(&point, &boxed(0.0, 0.0, 10.0, 10.0), IouMode::Min), 0.0);
    assert_eq!(iou(&inverted, &boxed(0.0, 0.0, 10.0, 10.0)), 0.0);
}

// ---- NMS ----

/// Class 0: 0 and 1 overlap (IoU 81/119), 2 and 4 overlap likewise; 3 is class 1 on top of 0.
fn known_set() -> Vec<Detection> {
    vec![
        det(0.0, 0.0, 10.0, 10.0, 0.9, 0),
        det(1.0, 1.0, 11.0, 11.0, 0.8, 0),
        det(20.0, 20.0, 30.0, 30.0, 0.7, 0),
        det(0.0, 0.0, 10.0, 10.0, 0.95, 1),
        det(21.0, 21.0, 31.0, 31.0, 0.6, 0),
    ]
}

#[test]
fn nms_on_a_known_set() {
    let dets = known_set();
    assert_eq!(nms(&dets, 0.5, IouMode::Union), vec![3, 2]);
    // IoU 81/119 ≈ 0.68 is under 0.7: only the identical box goes.
    assert_eq!(nms(&dets, 0.7, IouMode::Union), vec![3, 1, 2, 4], "3 still covers 0 exactly");
    assert_eq!(nms(&[], 0.5, IouMode::Union), Vec::<usize>::new());
}

#[test]
fn batched_nms_keeps_classes_independent() {
    let dets = known_set();
    assert_eq!(batched_nms(&dets, 0.5), vec![3, 0, 2]);
    let same_place = [det(0.0, 0.0, 1.0, 1.0, 0.5, 0), det(0.0, 0.0, 1.0, 1.0, 0.6, 1)];
    assert_eq!(batched_nms(&same_place, 0.5), vec![1, 0]);
    assert_eq!(nms(&same_place, 0.5, IouMode::Union), vec![1]);
}

#[test]
fn min_mode_suppresses_nested_boxes() {
    let dets = [det(0.0, 0.0, 100.0, 100.0, 0.9, 0), det(10.0, 10.0, 20.0, 20.0, 0.8, 0)];
    assert_eq!(nms(&dets, 0.5, IouMode::Union), vec![0, 1], "IoU is 0.01");
    assert_eq!(nms(&dets, 0.5, IouMode::Min), vec![0]);
}

#[test]
fn overlap_equal_to_the_threshold_is_kept() {
    // IoU exactly 0.5: 2 / (4 + 2 - 2).
    let dets = [det(0.0, 0.0, 4.0, 1.0, 0.9, 0), det(0.0, 0.0, 2.0, 1.0, 0.8, 0)];
    assert_eq!(iou(&dets[0], &dets[1]), 0.5);
    assert_eq!(nms(&dets, 0.5, IouMode::Union), vec![0, 1]);
    assert_eq!(nms(&dets, 0.49, IouMode::Union), vec![0]);
    // And for an IoU that is not a round number, the same computation as the threshold.
    let dets = [boxed(0.0, 0.0, 10.0, 10.0), boxed(5.0, 0.0, 15.0, 10.0)];
    assert_eq!(nms(&dets, iou(&dets[0], &dets[1]), IouMode::Union).len(), 2);
}

#[test]
fn ties_keep_the_lower_index_and_nan_scores_are_dropped() {
    let a = det(0.0, 0.0, 10.0, 10.0, 0.5, 0);
    assert_eq!(nms(&[a, a, a], 0.5, IouMode::Union), vec![0]);
    let disjoint = [det(0.0, 0.0, 1.0, 1.0, 0.5, 0), det(5.0, 5.0, 6.0, 6.0, 0.5, 0), det(9.0, 9.0, 10.0, 10.0, 0.7, 0)];
    assert_eq!(nms(&disjoint, 0.5, IouMode::Union), vec![2, 0, 1]);
    let nan = [det(0.0, 0.0, 1.0, 1.0, f32::NAN, 0), det(0.0, 0.0, 1.0, 1.0, 0.1, 0)];
    assert_eq!(nms(&nan, 0.5, IouMode::Union), vec![1]);
}

#[test]
fn filter_by_score_and_class() {
    let dets = known_set();
    let high = filter(&dets, 0.8, None);
    assert_eq!(high, vec![dets[0], dets[1], dets[3]], "min_score is inclusive");
    assert_eq!(filter(&dets, 0.0, Some(&[1])), vec![dets[3]]);
    assert_eq!(filter(&dets, 0.75, Some(&[0, 7])), vec![dets[0], dets[1]]);
    assert!(filter(&dets, 0.0, Some(&[])).is_empty());
}

fn detections() -> impl Strategy<Value = Vec<Detection>> {
    // Scores on a coarse grid so that ties happen.
    let one = (0.0f32..100.0, 0.0f32..100.0, 0.0f32..50.0, 0.0f32..50.0, 0u8..10, 0u32..3)
        .prop_map(|(x, y, w, h, s, class)| det(x, y, x + w, y + h, f32::from(s) / 10.0, class));
    proptest::collection::vec(one, 0..40)
}

/// The properties of greedy NMS, for the plain and the per-class variant.
fn check_nms(dets: &[Detection], keep: &[usize], threshold: f32, mode: IouMode, per_class: bool) -> Result<(), TestCaseError> {
    let competes = |a: &Detection, b: &Detection| !per_class || a.class == b.class;
    let rank = |i: usize| (std::cmp::Reverse(ordered(dets[i].score)), i);
    prop_assert!(keep.windows(2).all(|w| rank(w[0]) < rank(w[1])), "sorted by score, then index: {keep:?}");
    for (n, &a) in keep.iter().enumerate() {
        for &b in &keep[n + 1..] {
            if competes(&dets[a], &dets[b]) {
                prop_assert!(overlap(&dets[a], &dets[b], mode) <= threshold, "kept {a} and {b} overlap");
            }
        }
    }
    for dropped in (0..dets.len()).filter(|i| !keep.contains(i)) {
        let by = keep.iter().find(|&&k| rank(k) < rank(dropped) && competes(&dets[k], &dets[dropped]) && overlap(&dets[k], &dets[dropped], mode) > threshold);
        prop_assert!(by.is_some(), "{dropped} dropped without a higher-ranked kept box over the threshold");
    }
    Ok(())
}

fn ordered(score: f32) -> u32 {
    score.to_bits() // scores are non-negative, so bit order is numeric order
}

proptest! {
    #[test]
    fn nms_properties(dets in detections(), threshold in 0.0f32..1.0, min_mode in any::<bool>()) {
        let mode = if min_mode { IouMode::Min } else { IouMode::Union };
        check_nms(&dets, &nms(&dets, threshold, mode), threshold, mode, false)?;
        check_nms(&dets, &batched_nms(&dets, threshold), threshold, IouMode::Union, true)?;
    }
}

// ---- metrics ----

/// Rows are truth, columns predictions:
/// ```text
/// 3 1 1   (support 5)
/// 0 2 0   (support 2)
/// 1 1 2   (support 4)
/// ```
fn worked_example() -> ConfusionMatrix {
    let counts = [[3, 1, 1], [0, 2, 0], [1, 1, 2]];
    let pairs = counts.iter().enumerate().flat_map(|(t, row)| row.iter().enumerate().flat_map(move |(p, &n)| std::iter::repeat_n((t, p), n)));
    ConfusionMatrix::from_pairs(3, pairs).expect("labels in range")
}

fn close(a: f64, b: f64) -> bool {
    (a - b).abs() < 1e-12
}

#[test]
fn worked_three_class_example() {
    let m = worked_example();
    assert_eq!(m.total(), 11);
    assert_eq!(m.count(2, 0), 1);
    assert!(close(m.accuracy(), 7.0 / 11.0));
    let per_class = m.per_class();
    // class 0: TP 3, predicted 4, support 5; class 1: TP 2, predicted 4, support 2;
    // class 2: TP 2, predicted 3, support 4.
    let expected = [(0.75, 0.6, 2.0 / 3.0, 5), (0.5, 1.0, 2.0 / 3.0, 2), (2.0 / 3.0, 0.5, 4.0 / 7.0, 4)];
    for (got, (precision, recall, f1, support)) in per_class.iter().zip(expected) {
        assert!(close(got.precision, precision), "{got:?}");
        assert!(close(got.recall, recall), "{got:?}");
        assert!(close(got.f1, f1), "{got:?}");
        assert_eq!(got.support, support);
    }
    assert!(close(m.macro_f1(), 40.0 / 63.0));
}

#[test]
fn empty_classes_score_zero() {
    // Class 2 never occurs; class 1 is predicted but never true.
    let m = ConfusionMatrix::from_pairs(3, [(0, 0), (0, 1), (0, 0)]).expect("in range");
    let per_class = m.per_class();
    assert_eq!((per_class[2].precision, per_class[2].recall, per_class[2].f1, per_class[2].support), (0.0, 0.0, 0.0, 0));
    assert_eq!((per_class[1].precision, per_class[1].recall, per_class[1].f1), (0.0, 0.0, 0.0));
    assert!(close(per_class[0].f1, 0.8)); // P 1, R 2/3
    assert!(close(m.macro_f1(), 0.8 / 3.0), "all classes count");
    let empty = ConfusionMatrix::new(2);
    assert_eq!((empty.accuracy(), empty.macro_f1()), (0.0, 0.0));
    assert_eq!(ConfusionMatrix::new(0).macro_f1(), 0.0);
}

#[test]
fn labels_out_of_range_are_errors() {
    let mut m = ConfusionMatrix::new(3);
    assert_eq!(m.add(3, 0), Err(MetricsError::LabelOutOfRange { role: LabelRole::Truth, label: 3, num_classes: 3 }));
    let error = m.add(0, 5).expect_err("predicted 5");
    assert_eq!(error, MetricsError::LabelOutOfRange { role: LabelRole::Predicted, label: 5, num_classes: 3 });
    assert_eq!(error.to_string(), "predicted label 5 is out of range for 3 classes");
    assert_eq!(m.total(), 0, "unchanged");
    assert!(ConfusionMatrix::from_pairs(2, [(0, 0), (2, 1)]).is_err());
}

#[test]
fn report_as_json_and_table() {
    let m = worked_example();
    let json = serde_json::to_value(m.report()).expect("json");
    assert_eq!(json["confusion"], serde_json::json!([[3, 1, 1], [0, 2, 0], [1, 1, 2]]));
    assert_eq!(json["per_class"][1]["recall"], 1.0);
    assert_eq!(json["per_class"][2]["support"], 4);
    assert!(close(json["accuracy"].as_f64().expect("accuracy"), 7.0 / 11.0));
    assert!(json["macro_f1"].is_f64());
    assert_eq!(m.to_string(), "true\\pred 0 1 2\n        0 3 1 1\n        1 0 2 0\n        2 1 1 2\n");
}

//! Non-maximum suppression for detector post-processing (inference and the MTCNN detector).
//!
//! Semantics follow torchvision (`torchvision.ops.nms` / `batched_nms`), so results match a
//! Python reference: boxes are visited by descending score, and a box is discarded when its
//! overlap with an already kept box is *strictly greater* than the threshold (an overlap
//! exactly equal to the threshold is kept). Ties in score are broken by the lower index, so
//! results are deterministic. Detections with a NaN score cannot be ranked and are never kept.

/// One detection, as corners in pixels (`x1 <= x2`, `y1 <= y2` for a non-empty box).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Detection {
    pub x1: f32,
    pub y1: f32,
    pub x2: f32,
    pub y2: f32,
    pub score: f32,
    pub class: u32,
}

impl Detection {
    /// Area in square pixels; 0 for an inverted (empty) box rather than a negative number.
    pub fn area(&self) -> f32 {
        (self.x2 - self.x1).max(0.0) * (self.y2 - self.y1).max(0.0)
    }

    fn intersection(&self, other: &Detection) -> f32 {
        let w = self.x2.min(other.x2) - self.x1.max(other.x1);
        let h = self.y2.min(other.y2) - self.y1.max(other.y1);
        w.max(0.0) * h.max(0.0)
    }
}

/// How overlap is measured.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum IouMode {
    /// Intersection over union: the usual IoU.
    #[default]
    Union,
    /// Intersection over the smaller box's area. MTCNN uses it in its last stage, where a
    /// small box nested inside a large one should be suppressed although their IoU is low.
    Min,
}

/// Intersection over union; 0 when the union is empty (two empty boxes).
pub fn iou(a: &Detection, b: &Detection) -> f32 {
    overlap(a, b, IouMode::Union)
}

/// Overlap of two boxes under `mode`; 0 when the denominator is 0.
pub fn overlap(a: &Detection, b: &Detection, mode: IouMode) -> f32 {
    overlap_with_areas(a, b, a.area(), b.area(), mode)
}

fn overlap_with_areas(a: &Detection, b: &Detection, area_a: f32, area_b: f32, mode: IouMode) -> f32 {
    let inter = a.intersection(b);
    let denominator = match mode {
        IouMode::Union => area_a + area_b - inter,
        IouMode::Min => area_a.min(area_b),
    };
    if denominator > 0.0 {
        inter / denominator
    } else {
        0.0
    }
}

/// Indices of the detections kept by NMS, by descending score (ties: lower index first).
/// Classes are ignored: every box competes with every other (see [`batched_nms`]).
pub fn nms(dets: &[Detection], iou_threshold: f32, mode: IouMode) -> Vec<usize> {
    suppress(dets, iou_threshold, mode, false)
}

/// NMS within each class independently (boxes of different classes never suppress each
/// other), IoU in [`IouMode::Union`], as `torchvision.ops.batched_nms`. Indices by descending
/// score across all classes.
pub fn batched_nms(dets: &[Detection], iou_threshold: f32) -> Vec<usize> {
    suppress(dets, iou_threshold, IouMode::Union, true)
}

/// One greedy pass over the detections sorted once by score. Per-class NMS is the same pass
/// with cross-class pairs skipped, which keeps the global score order without merging
/// per-class results. O(n²) comparisons, allocations only up front.
fn suppress(dets: &[Detection], iou_threshold: f32, mode: IouMode, per_class: bool) -> Vec<usize> {
    let mut order: Vec<usize> = (0..dets.len()).filter(|&i| !dets[i].score.is_nan()).collect();
    // A stable sort on descending score keeps equal scores in index order.
    order.sort_by(|&a, &b| dets[b].score.total_cmp(&dets[a].score));
    let areas: Vec<f32> = dets.iter().map(Detection::area).collect();
    let mut suppressed = vec![false; dets.len()];
    let mut keep = Vec::new();
    for (rank, &i) in order.iter().enumerate() {
        if suppressed[i] {
            continue;
        }
        keep.push(i);
        for &j in &order[rank + 1..] {
            if suppressed[j] || (per_class && dets[j].class != dets[i].class) {
                continue;
            }
            if overlap_with_areas(&dets[i], &dets[j], areas[i], areas[j], mode) > iou_threshold {
                suppressed[j] = true;
            }
        }
    }
    keep
}

/// The detections with `score >= min_score` and, when `classes` is given, a class in it; in
/// their original order. Usually applied before [`nms`] to cut its quadratic cost.
pub fn filter(dets: &[Detection], min_score: f32, classes: Option<&[u32]>) -> Vec<Detection> {
    dets.iter().filter(|d| d.score >= min_score && classes.is_none_or(|c| c.contains(&d.class))).copied().collect()
}

//! Agreement between the annotators of one image, the conflicts a reviewer settles, and
//! honeypot scores.
//!
//! Shapes of different annotators are grouped into **clusters**: the most alike pairs first
//! (similarity at least [`MATCH_THRESHOLD`], whatever their labels), never two shapes of one
//! annotator in one cluster (greedy matching in order of similarity, as COCO's evaluation
//! matches detections). A cluster is **agreed** when every annotator drew it, with one label;
//! otherwise it is a conflict: someone left it out, or the labels differ. Agreement between
//! two annotators is the F1 score of their label-respecting matches: `2·matched / (n_a + n_b)`.

use std::collections::HashMap;

use crate::geometry::Geometry;
use crate::rle::Rle;
use crate::schema::Annotation;

/// Shapes at least this alike are the same object (IoU for regions).
pub const MATCH_THRESHOLD: f64 = 0.5;
/// How much more alike two shapes of one label rank when matching (see [`compare_image`]).
pub const SAME_LABEL_BONUS: f64 = 0.1;
/// The most annotators compared on one image (a cluster's annotators are a bit set).
pub const MAX_ANNOTATORS: usize = 64;

/// One annotator's shapes on one image.
#[derive(Clone, Copy, Debug)]
pub struct Work<'a> {
    pub annotator: u64,
    pub shapes: &'a [Annotation],
}

/// Shapes of different annotators taken for one object.
#[derive(Clone, Debug, PartialEq)]
pub struct Cluster {
    /// `(work, shape)` indexes into what was compared, in work order.
    pub members: Vec<(usize, usize)>,
    /// `None` when every annotator drew it with one label.
    pub conflict: Option<Disagreement>,
    /// The member most like the others: the image's shape when nobody changes it.
    pub consensus: (usize, usize),
    /// Names the cluster stably (its members' annotators and shape IDs), for a reviewer's
    /// decision to refer to.
    pub key: String,
}

/// What a conflict is about.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Disagreement {
    /// Annotators who did not draw it.
    pub missing: Vec<u64>,
    /// Whether those who drew it chose different labels.
    pub labels_differ: bool,
}

/// Agreement between two annotators on one image.
#[derive(Clone, Debug, PartialEq)]
pub struct PairScore {
    pub a: u64,
    pub b: u64,
    pub f1: f64,
}

#[derive(Clone, Debug, PartialEq)]
pub struct ImageAgreement {
    pub clusters: Vec<Cluster>,
    pub pairs: Vec<PairScore>,
    /// The mean of the pairs' F1 scores; `None` with fewer than two annotators.
    pub score: Option<f64>,
}

impl ImageAgreement {
    pub fn conflicts(&self) -> impl Iterator<Item = &Cluster> {
        self.clusters.iter().filter(|c| c.conflict.is_some())
    }
}

/// Compares the annotators' shapes on one `width × height` image.
///
/// # Panics
/// With more than [`MAX_ANNOTATORS`] works (the portal allows at most 10 per image).
pub fn compare_image(width: u32, height: u32, works: &[Work<'_>]) -> ImageAgreement {
    assert!(works.len() <= MAX_ANNOTATORS, "at most {MAX_ANNOTATORS} annotators per image");
    let shapes: Vec<(usize, usize, &Annotation)> =
        works.iter().enumerate().flat_map(|(w, work)| work.shapes.iter().enumerate().map(move |(s, a)| (w, s, a))).collect();
    let compared = Compared::new(width, height, shapes.iter().map(|(_, _, a)| &a.geometry));

    // Every cross-annotator pair alike enough, most alike first; a pair that agrees on the label
    // ranks as if [`SAME_LABEL_BONUS`] more alike, so a cat matches the other cat before the dog
    // drawn over it.
    let mut pairs = Vec::new();
    for i in 0..shapes.len() {
        for j in i + 1..shapes.len() {
            if shapes[i].0 != shapes[j].0 {
                let similarity = compared.similarity(i, j);
                if similarity >= MATCH_THRESHOLD {
                    let bonus = if shapes[i].2.label == shapes[j].2.label { SAME_LABEL_BONUS } else { 0.0 };
                    pairs.push((similarity + bonus, i, j));
                }
            }
        }
    }
    pairs.sort_by(|a, b| b.0.total_cmp(&a.0).then((a.1, a.2).cmp(&(b.1, b.2))));

    let mut parent: Vec<usize> = (0..shapes.len()).collect();
    let mut annotators: Vec<u64> = shapes.iter().map(|(w, _, _)| 1u64 << w).collect();
    fn root(parent: &mut [usize], mut i: usize) -> usize {
        while parent[i] != i {
            parent[i] = parent[parent[i]];
            i = parent[i];
        }
        i
    }
    for &(_, i, j) in &pairs {
        let (ri, rj) = (root(&mut parent, i), root(&mut parent, j));
        if ri != rj && annotators[ri] & annotators[rj] == 0 {
            parent[rj] = ri;
            annotators[ri] |= annotators[rj];
        }
    }
    let mut grouped: HashMap<usize, Vec<usize>> = HashMap::new();
    for i in 0..shapes.len() {
        let r = root(&mut parent, i);
        grouped.entry(r).or_default().push(i);
    }
    let mut groups: Vec<Vec<usize>> = grouped.into_values().collect();
    groups.sort_by_key(|g| g[0]);

    let clusters: Vec<Cluster> = groups
        .iter()
        .map(|group| {
            let members: Vec<(usize, usize)> = group.iter().map(|&i| (shapes[i].0, shapes[i].1)).collect();
            let label = &shapes[group[0]].2.label;
            let labels_differ = group.iter().any(|&i| &shapes[i].2.label != label);
            let missing: Vec<u64> = works.iter().enumerate().filter(|(w, _)| !members.iter().any(|(m, _)| m == w)).map(|(_, work)| work.annotator).collect();
            let conflict = (labels_differ || !missing.is_empty()).then_some(Disagreement { missing, labels_differ });
            // The medoid; the earliest on a tie.
            let centre = group
                .iter()
                .map(|&i| (group.iter().filter(|&&j| j != i).map(|&j| compared.similarity(i, j)).sum::<f64>(), i))
                .fold((f64::MIN, usize::MAX), |best, (total, i)| if total > best.0 { (total, i) } else { best })
                .1;
            let mut names: Vec<String> = group.iter().map(|&i| format!("{}:{}", works[shapes[i].0].annotator, shapes[i].2.id)).collect();
            names.sort();
            Cluster { members, conflict, consensus: (shapes[centre].0, shapes[centre].1), key: names.join(",") }
        })
        .collect();

    let mut pair_scores = Vec::new();
    for a in 0..works.len() {
        for b in a + 1..works.len() {
            let matched = clusters
                .iter()
                .filter(|c| {
                    let label_of = |w: usize| c.members.iter().find(|(m, _)| *m == w).map(|&(m, s)| &works[m].shapes[s].label);
                    matches!((label_of(a), label_of(b)), (Some(x), Some(y)) if x == y)
                })
                .count();
            let drawn = works[a].shapes.len() + works[b].shapes.len();
            let f1 = if drawn == 0 { 1.0 } else { 2.0 * matched as f64 / drawn as f64 };
            pair_scores.push(PairScore { a: works[a].annotator, b: works[b].annotator, f1 });
        }
    }
    let score = (!pair_scores.is_empty()).then(|| pair_scores.iter().map(|p| p.f1).sum::<f64>() / pair_scores.len() as f64);
    ImageAgreement { clusters, pairs: pair_scores, score }
}

/// How well an annotator's shapes on a honeypot match its known labels (F1, labels must
/// match): 1.0 for a perfect annotator, 0.0 for one who matched nothing.
pub fn score_against_gold(width: u32, height: u32, drawn: &[Annotation], gold: &[Annotation]) -> f64 {
    let agreement = compare_image(width, height, &[Work { annotator: 0, shapes: gold }, Work { annotator: 1, shapes: drawn }]);
    agreement.score.unwrap_or(1.0)
}

/// What a reviewer decided about one conflict.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(tag = "decision", rename_all = "snake_case")]
pub enum Decision {
    /// Keep this annotator's shape (by its ID) as drawn.
    Accept { annotator: u64, shape: String },
    /// Keep a shape the reviewer drew or fixed instead.
    Replace { shape: Annotation },
    /// The object is not there: keep nothing.
    Reject,
}

/// Why a decision cannot apply to its conflict.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum DecisionError {
    #[error("no conflict {0:?} on this image")]
    NoSuchConflict(String),
    #[error("shape {shape:?} of annotator {annotator} is not part of this conflict")]
    NotAMember { annotator: u64, shape: String },
}

/// Checks that a decision names a conflict of the image and, when it accepts a shape, one of
/// the conflict's own.
pub fn check_decision(agreement: &ImageAgreement, works: &[Work<'_>], key: &str, decision: &Decision) -> Result<(), DecisionError> {
    let cluster = agreement.conflicts().find(|c| c.key == key).ok_or_else(|| DecisionError::NoSuchConflict(key.to_owned()))?;
    if let Decision::Accept { annotator, shape } = decision {
        let member = cluster.members.iter().any(|&(w, s)| works[w].annotator == *annotator && works[w].shapes[s].id == *shape);
        if !member {
            return Err(DecisionError::NotAMember { annotator: *annotator, shape: shape.clone() });
        }
    }
    Ok(())
}

/// The image's reviewed shapes: each agreed cluster's consensus, each decided conflict as
/// decided; and the keys of conflicts nobody has decided yet (left out of the shapes).
pub fn reviewed_shapes(agreement: &ImageAgreement, works: &[Work<'_>], decisions: &HashMap<String, Decision>) -> (Vec<Annotation>, Vec<String>) {
    let mut shapes = Vec::new();
    let mut undecided = Vec::new();
    for cluster in &agreement.clusters {
        let member = |(w, s): (usize, usize)| works[w].shapes[s].clone();
        match (&cluster.conflict, decisions.get(&cluster.key)) {
            (None, _) => shapes.push(member(cluster.consensus)),
            (Some(_), None) => undecided.push(cluster.key.clone()),
            (Some(_), Some(Decision::Reject)) => {}
            (Some(_), Some(Decision::Replace { shape })) => shapes.push(shape.clone()),
            (Some(_), Some(Decision::Accept { annotator, shape })) => {
                if let Some(&found) = cluster.members.iter().find(|&&(w, s)| works[w].annotator == *annotator && works[w].shapes[s].id == *shape) {
                    shapes.push(member(found));
                } else {
                    undecided.push(cluster.key.clone());
                }
            }
        }
    }
    (shapes, undecided)
}

/// Region coverage computed once per shape (polygons and masks; boxes compare in closed form).
struct Compared<'a> {
    width: u32,
    height: u32,
    geometry: Vec<&'a Geometry>,
    coverage: Vec<Option<Rle>>,
    bounds: Vec<Option<(f32, f32, f32, f32)>>,
}

impl<'a> Compared<'a> {
    fn new(width: u32, height: u32, geometry: impl Iterator<Item = &'a Geometry>) -> Compared<'a> {
        let geometry: Vec<&Geometry> = geometry.collect();
        let coverage =
            geometry.iter().map(|g| if matches!(g, Geometry::Polygon { .. } | Geometry::Mask { .. }) { g.coverage(width, height) } else { None }).collect();
        let bounds = geometry.iter().map(|g| g.bounds()).collect();
        Compared { width, height, geometry, coverage, bounds }
    }

    fn similarity(&self, i: usize, j: usize) -> f64 {
        let (a, b) = (self.geometry[i], self.geometry[j]);
        if a.kind().is_region() && b.kind().is_region() {
            // Regions whose bounds do not meet share no pixel.
            if let (Some((ax, ay, aw, ah)), Some((bx, by, bw, bh))) = (self.bounds[i], self.bounds[j]) {
                if ax > bx + bw || bx > ax + aw || ay > by + bh || by > ay + ah {
                    return 0.0;
                }
            }
            if let (Geometry::Box { .. }, Geometry::Box { .. }) = (a, b) {
                return a.similarity(b, self.width, self.height);
            }
            // A box beside a polygon or mask is rasterized here (boxes are not cached: two boxes
            // compare in closed form above).
            let cover = |k: usize| match &self.coverage[k] {
                Some(rle) => Some(std::borrow::Cow::Borrowed(rle)),
                None => self.geometry[k].coverage(self.width, self.height).map(std::borrow::Cow::Owned),
            };
            return match (cover(i), cover(j)) {
                (Some(x), Some(y)) => x.iou(&y),
                _ => 0.0,
            };
        }
        a.similarity(b, self.width, self.height)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn boxed(id: &str, label: &str, x: f32, y: f32, w: f32, h: f32) -> Annotation {
        Annotation { id: id.into(), label: label.into(), geometry: Geometry::Box { x, y, w, h }, attributes: Default::default(), score: None }
    }

    #[test]
    fn three_annotators_who_agree_have_no_conflict() {
        let a = [boxed("a1", "cat", 10.0, 10.0, 50.0, 50.0), boxed("a2", "dog", 100.0, 100.0, 20.0, 20.0)];
        let b = [boxed("b1", "dog", 101.0, 100.0, 20.0, 20.0), boxed("b2", "cat", 11.0, 10.0, 50.0, 50.0)];
        let c = [boxed("c1", "cat", 10.0, 12.0, 50.0, 50.0), boxed("c2", "dog", 100.0, 101.0, 20.0, 20.0)];
        let works = [Work { annotator: 1, shapes: &a }, Work { annotator: 2, shapes: &b }, Work { annotator: 3, shapes: &c }];
        let agreement = compare_image(200, 200, &works);
        assert_eq!(agreement.clusters.len(), 2);
        assert_eq!(agreement.conflicts().count(), 0);
        assert_eq!(agreement.score, Some(1.0));
        // The cat's consensus is the box most like the other two: annotator 1's, between them.
        let cat = agreement.clusters.iter().find(|c| c.members.contains(&(0, 0))).expect("the cat");
        assert_eq!(cat.consensus, (0, 0));
        assert_eq!(cat.key, "1:a1,2:b2,3:c1");
    }

    #[test]
    fn a_shape_one_annotator_left_out_is_a_conflict_naming_them() {
        let a = [boxed("a1", "cat", 10.0, 10.0, 50.0, 50.0), boxed("a2", "dog", 100.0, 100.0, 20.0, 20.0)];
        let b = [boxed("b1", "cat", 10.0, 10.0, 50.0, 50.0)];
        let agreement = compare_image(200, 200, &[Work { annotator: 7, shapes: &a }, Work { annotator: 8, shapes: &b }]);
        let conflicts: Vec<_> = agreement.conflicts().collect();
        assert_eq!(conflicts.len(), 1);
        assert_eq!(conflicts[0].conflict, Some(Disagreement { missing: vec![8], labels_differ: false }));
        assert!((agreement.score.expect("two annotators") - 2.0 / 3.0).abs() < 1e-12);
    }

    #[test]
    fn one_object_with_two_labels_is_a_conflict() {
        let a = [boxed("a1", "cat", 10.0, 10.0, 50.0, 50.0)];
        let b = [boxed("b1", "dog", 10.0, 10.0, 50.0, 50.0)];
        let agreement = compare_image(200, 200, &[Work { annotator: 1, shapes: &a }, Work { annotator: 2, shapes: &b }]);
        assert_eq!(agreement.clusters.len(), 1);
        assert_eq!(agreement.clusters[0].conflict, Some(Disagreement { missing: vec![], labels_differ: true }));
        assert_eq!(agreement.score, Some(0.0));
    }

    #[test]
    fn two_shapes_of_one_annotator_never_share_a_cluster() {
        let a = [boxed("a1", "cat", 10.0, 10.0, 50.0, 50.0), boxed("a2", "cat", 11.0, 10.0, 50.0, 50.0)];
        let b = [boxed("b1", "cat", 10.0, 10.0, 50.0, 50.0)];
        let agreement = compare_image(200, 200, &[Work { annotator: 1, shapes: &a }, Work { annotator: 2, shapes: &b }]);
        assert_eq!(agreement.clusters.len(), 2);
        // The exact match pairs up; the near duplicate is left alone, missing annotator 2.
        assert!(agreement.clusters.iter().any(|c| c.members == vec![(0, 0), (1, 0)] && c.conflict.is_none()));
        assert!(agreement.clusters.iter().any(|c| c.members == vec![(0, 1)] && c.conflict.as_ref().is_some_and(|d| d.missing == vec![2])));
    }

    #[test]
    fn a_shape_matches_its_own_label_before_a_closer_other_one() {
        // B drew a dog exactly over A's cat and a cat slightly off it: the cats pair up.
        let a = [boxed("a1", "cat", 10.0, 10.0, 50.0, 50.0)];
        let b = [boxed("b1", "dog", 10.0, 10.0, 50.0, 50.0), boxed("b2", "cat", 12.0, 10.0, 50.0, 50.0)];
        let agreement = compare_image(200, 200, &[Work { annotator: 1, shapes: &a }, Work { annotator: 2, shapes: &b }]);
        assert!(agreement.clusters.iter().any(|c| c.members == vec![(0, 0), (1, 1)] && c.conflict.is_none()), "{agreement:?}");
    }

    #[test]
    fn a_polygon_and_a_box_of_one_object_match() {
        let a = [boxed("a1", "cat", 10.0, 10.0, 40.0, 40.0)];
        let b = [Annotation {
            id: "b1".into(),
            label: "cat".into(),
            geometry: Geometry::Polygon { points: vec![(10.0, 10.0), (50.0, 10.0), (50.0, 50.0), (10.0, 48.0)] },
            attributes: Default::default(),
            score: None,
        }];
        let agreement = compare_image(100, 100, &[Work { annotator: 1, shapes: &a }, Work { annotator: 2, shapes: &b }]);
        assert_eq!(agreement.clusters.len(), 1);
        assert_eq!(agreement.score, Some(1.0));
    }

    #[test]
    fn nothing_drawn_by_anyone_is_full_agreement() {
        let agreement = compare_image(10, 10, &[Work { annotator: 1, shapes: &[] }, Work { annotator: 2, shapes: &[] }]);
        assert_eq!(agreement.score, Some(1.0));
        assert!(agreement.clusters.is_empty());
        assert_eq!(compare_image(10, 10, &[Work { annotator: 1, shapes: &[] }]).score, None);
    }

    #[test]
    fn honeypots_score_labels_and_places() {
        let gold = [boxed("g1", "cat", 10.0, 10.0, 50.0, 50.0), boxed("g2", "dog", 100.0, 100.0, 20.0, 20.0)];
        assert_eq!(score_against_gold(200, 200, &gold, &gold), 1.0);
        let half = [boxed("x", "cat", 12.0, 10.0, 50.0, 50.0), boxed("y", "cat", 100.0, 100.0, 20.0, 20.0)];
        assert!((score_against_gold(200, 200, &half, &gold) - 0.5).abs() < 1e-12);
        assert_eq!(score_against_gold(200, 200, &[], &gold), 0.0);
    }

    #[test]
    fn decisions_settle_conflicts_and_undecided_ones_are_named() {
        let a = [boxed("a1", "cat", 10.0, 10.0, 50.0, 50.0), boxed("a2", "dog", 100.0, 100.0, 20.0, 20.0), boxed("a3", "dog", 150.0, 150.0, 20.0, 20.0)];
        let b = [boxed("b1", "cat", 10.0, 10.0, 50.0, 50.0), boxed("b2", "cat", 100.0, 100.0, 20.0, 20.0)];
        let works = [Work { annotator: 1, shapes: &a }, Work { annotator: 2, shapes: &b }];
        let agreement = compare_image(200, 200, &works);
        let keys: Vec<String> = agreement.conflicts().map(|c| c.key.clone()).collect();
        assert_eq!(keys, vec!["1:a2,2:b2".to_owned(), "1:a3".to_owned()]);

        let accept = Decision::Accept { annotator: 2, shape: "b2".into() };
        check_decision(&agreement, &works, &keys[0], &accept).expect("a member");
        assert_eq!(
            check_decision(&agreement, &works, &keys[0], &Decision::Accept { annotator: 1, shape: "a1".into() }),
            Err(DecisionError::NotAMember { annotator: 1, shape: "a1".into() })
        );
        assert_eq!(check_decision(&agreement, &works, "1:a1,2:b1", &Decision::Reject), Err(DecisionError::NoSuchConflict("1:a1,2:b1".into())));

        let (shapes, undecided) = reviewed_shapes(&agreement, &works, &HashMap::from([(keys[0].clone(), accept)]));
        assert_eq!(shapes.iter().map(|s| s.id.as_str()).collect::<Vec<_>>(), vec!["a1", "b2"]);
        assert_eq!(undecided, vec!["1:a3".to_owned()]);
        let (shapes, undecided) =
            reviewed_shapes(&agreement, &works, &HashMap::from([(keys[0].clone(), Decision::Reject), (keys[1].clone(), Decision::Reject)]));
        assert_eq!(shapes.len(), 1);
        assert!(undecided.is_empty());
    }
}

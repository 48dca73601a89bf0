//! The shapes annotators draw, the checks every saved shape passes, and how two shapes are
//! compared.
//!
//! Regions (boxes, polygons, masks) are compared by intersection over union on the image's
//! pixel grid (a pixel is in a region when its centre is, see [`Geometry::coverage`]), exactly,
//! whatever the two kinds; points and polylines, which cover no area, by how far apart they lie
//! relative to the image ([`Geometry::similarity`]).

use serde::{Deserialize, Serialize};

use crate::rle::{Rle, RleError};

/// How far (pixels) a vertex may lie outside the image: the tool clamps what is drawn to the
/// image, so only rounding can put a point past the edge.
pub const EDGE_TOLERANCE_PX: f32 = 0.5;
/// The most vertices of one polygon, polyline or point set (a polygon's self-intersection check
/// is quadratic in them: 2,000 vertices are 2 million segment pairs).
pub const MAX_VERTICES: usize = 2_000;
/// The most runs of one mask (100,000 runs are ~600 KB of JSON: a brush outline crossing each
/// of a 24-megapixel image's 6,000 columns eight times stays well inside).
pub const MAX_MASK_RUNS: usize = 100_000;

/// One drawn shape, in image pixels.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Geometry {
    /// An axis-aligned box: top-left corner and size.
    Box { x: f32, y: f32, w: f32, h: f32 },
    /// A closed, simple polygon of at least 3 vertices (the last joins the first).
    Polygon { points: Vec<(f32, f32)> },
    /// An open line of at least 2 vertices (lanes, edges); it may cross itself.
    Polyline { points: Vec<(f32, f32)> },
    /// Labelled points (keypoints), at least one.
    Points { points: Vec<(f32, f32)> },
    /// Pixels painted with the brush.
    Mask { rle: Rle },
}

/// Which kind a [`Geometry`] is: what a label schema allows.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ShapeKind {
    Box,
    Polygon,
    Polyline,
    Points,
    Mask,
}

impl ShapeKind {
    pub const ALL: [ShapeKind; 5] = [ShapeKind::Box, ShapeKind::Polygon, ShapeKind::Polyline, ShapeKind::Points, ShapeKind::Mask];

    pub fn as_str(self) -> &'static str {
        match self {
            ShapeKind::Box => "box",
            ShapeKind::Polygon => "polygon",
            ShapeKind::Polyline => "polyline",
            ShapeKind::Points => "points",
            ShapeKind::Mask => "mask",
        }
    }

    /// Boxes, polygons and masks cover pixels and are compared by overlap.
    pub fn is_region(self) -> bool {
        matches!(self, ShapeKind::Box | ShapeKind::Polygon | ShapeKind::Mask)
    }
}

impl std::fmt::Display for ShapeKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Why a shape was refused: said so an annotator can fix it.
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
pub enum Problem {
    #[error("a coordinate is not a finite number")]
    NotFinite,
    #[error("the box is {w}×{h} pixels: it must have a width and a height")]
    EmptyBox { w: f32, h: f32 },
    #[error("it reaches outside the {width}×{height} image")]
    OutsideImage { width: u32, height: u32 },
    #[error("a {kind} needs at least {min} points; it has {found}")]
    TooFewPoints { kind: ShapeKind, found: usize, min: usize },
    #[error("a {kind} may have at most {max} points; it has {found}")]
    TooManyPoints { kind: ShapeKind, found: usize, max: usize },
    #[error("vertices {at} and {next} are the same point")]
    RepeatedVertex { at: usize, next: usize },
    #[error("the polygon crosses itself: edge {first} (from vertex {first}) meets edge {second} (from vertex {second})")]
    SelfIntersecting { first: usize, second: usize },
    #[error("the polygon encloses no area")]
    NoArea,
    #[error("the mask: {0}")]
    Mask(#[from] RleError),
    #[error("the mask paints no pixel")]
    EmptyMask,
    #[error("the mask has {found} runs; at most {max}")]
    TooManyRuns { found: usize, max: usize },
}

impl Geometry {
    pub fn kind(&self) -> ShapeKind {
        match self {
            Geometry::Box { .. } => ShapeKind::Box,
            Geometry::Polygon { .. } => ShapeKind::Polygon,
            Geometry::Polyline { .. } => ShapeKind::Polyline,
            Geometry::Points { .. } => ShapeKind::Points,
            Geometry::Mask { .. } => ShapeKind::Mask,
        }
    }

    /// Checks the shape against an image of `width × height` pixels.
    pub fn check(&self, width: u32, height: u32) -> Result<(), Problem> {
        let (wf, hf) = (width as f32, height as f32);
        let inside =
            |&(x, y): &(f32, f32)| (-EDGE_TOLERANCE_PX..=wf + EDGE_TOLERANCE_PX).contains(&x) && (-EDGE_TOLERANCE_PX..=hf + EDGE_TOLERANCE_PX).contains(&y);
        let outside = Problem::OutsideImage { width, height };
        match self {
            Geometry::Box { x, y, w, h } => {
                if ![x, y, w, h].iter().all(|v| v.is_finite()) {
                    return Err(Problem::NotFinite);
                }
                if *w <= 0.0 || *h <= 0.0 {
                    return Err(Problem::EmptyBox { w: *w, h: *h });
                }
                if !inside(&(*x, *y)) || !inside(&(x + w, y + h)) {
                    return Err(outside);
                }
            }
            Geometry::Polygon { points } | Geometry::Polyline { points } | Geometry::Points { points } => {
                let kind = self.kind();
                let min = match kind {
                    ShapeKind::Polygon => 3,
                    ShapeKind::Polyline => 2,
                    _ => 1,
                };
                if points.len() < min {
                    return Err(Problem::TooFewPoints { kind, found: points.len(), min });
                }
                if points.len() > MAX_VERTICES {
                    return Err(Problem::TooManyPoints { kind, found: points.len(), max: MAX_VERTICES });
                }
                if !points.iter().all(|(x, y)| x.is_finite() && y.is_finite()) {
                    return Err(Problem::NotFinite);
                }
                if !points.iter().all(inside) {
                    return Err(outside);
                }
                if kind == ShapeKind::Polygon {
                    check_simple_polygon(points)?;
                }
            }
            Geometry::Mask { rle } => {
                if rle.counts.len() > MAX_MASK_RUNS {
                    return Err(Problem::TooManyRuns { found: rle.counts.len(), max: MAX_MASK_RUNS });
                }
                rle.check(width, height)?;
                if rle.area() == 0 {
                    return Err(Problem::EmptyMask);
                }
            }
        }
        Ok(())
    }

    /// The pixels a region covers on a `width × height` image (`None` for points and
    /// polylines). A pixel is covered when its centre lies inside, as pycocotools rasterizes.
    pub fn coverage(&self, width: u32, height: u32) -> Option<Rle> {
        match self {
            Geometry::Box { x, y, w, h } => {
                let (x0, x1) = (centre_index(*x), centre_index(x + w));
                let (y0, y1) = (centre_index(*y).min(height), centre_index(y + h).min(height));
                Some(Rle::from_columns(width, height, x0..x1, |_| if y1 > y0 { vec![(y0, y1)] } else { Vec::new() }))
            }
            Geometry::Polygon { points } => {
                let (x0, x1) = points.iter().fold((f32::MAX, f32::MIN), |(lo, hi), p| (lo.min(p.0), hi.max(p.0)));
                Some(Rle::from_columns(width, height, centre_index(x0)..centre_index(x1), |x| column_spans(points, x as f64 + 0.5, height)))
            }
            Geometry::Mask { rle } => Some(rle.clone()),
            Geometry::Polyline { .. } | Geometry::Points { .. } => None,
        }
    }

    /// How alike two shapes are, `0.0..=1.0`: intersection over union for two regions; for two
    /// point sets or two polylines, `exp(-d²/2σ²)` of their mean distance `d` with `σ` 1 % of
    /// the image's diagonal; 0 for shapes of kinds that do not compare (a box and a line).
    pub fn similarity(&self, other: &Geometry, width: u32, height: u32) -> f64 {
        if let (Geometry::Box { x, y, w, h }, Geometry::Box { x: ox, y: oy, w: ow, h: oh }) = (self, other) {
            // Two boxes: their overlap in closed form (the same number the grid gives for boxes
            // on whole pixels, and exact for the rest).
            let ix = (f64::from(x + w).min(f64::from(ox + ow)) - f64::from(*x).max(f64::from(*ox))).max(0.0);
            let iy = (f64::from(y + h).min(f64::from(oy + oh)) - f64::from(*y).max(f64::from(*oy))).max(0.0);
            let both = ix * iy;
            let union = f64::from(*w) * f64::from(*h) + f64::from(*ow) * f64::from(*oh) - both;
            return if union > 0.0 { both / union } else { 0.0 };
        }
        if self.kind().is_region() && other.kind().is_region() {
            return match (self.coverage(width, height), other.coverage(width, height)) {
                (Some(a), Some(b)) => a.iou(&b),
                _ => 0.0,
            };
        }
        let sigma = 0.01 * (f64::from(width).hypot(f64::from(height))).max(1.0);
        let closeness = |d: f64| (-(d * d) / (2.0 * sigma * sigma)).exp();
        match (self, other) {
            (Geometry::Points { points: a }, Geometry::Points { points: b }) => {
                // Each point of the larger set to its nearest unused point of the other; a point
                // with no partner counts as far away.
                let (small, large) = if a.len() <= b.len() { (a, b) } else { (b, a) };
                let mut used = vec![false; small.len()];
                let mut total = 0.0;
                for p in large {
                    let nearest = small.iter().enumerate().filter(|(i, _)| !used[*i]).min_by(|(_, q), (_, r)| distance(p, q).total_cmp(&distance(p, r)));
                    if let Some((i, q)) = nearest {
                        used[i] = true;
                        total += closeness(distance(p, q));
                    }
                }
                total / large.len().max(1) as f64
            }
            (Geometry::Polyline { points: a }, Geometry::Polyline { points: b }) => {
                let mean = |from: &[(f32, f32)], to: &[(f32, f32)]| from.iter().map(|p| distance_to_line(p, to)).sum::<f64>() / from.len().max(1) as f64;
                closeness((mean(a, b) + mean(b, a)) / 2.0)
            }
            _ => 0.0,
        }
    }

    /// The tightest box around the shape as `(x, y, w, h)`.
    pub fn bounds(&self) -> Option<(f32, f32, f32, f32)> {
        match self {
            Geometry::Box { x, y, w, h } => Some((*x, *y, *w, *h)),
            Geometry::Polygon { points } | Geometry::Polyline { points } | Geometry::Points { points } => {
                let (first, rest) = points.split_first()?;
                let (mut x0, mut y0, mut x1, mut y1) = (first.0, first.1, first.0, first.1);
                for &(x, y) in rest {
                    (x0, y0, x1, y1) = (x0.min(x), y0.min(y), x1.max(x), y1.max(y));
                }
                Some((x0, y0, x1 - x0, y1 - y0))
            }
            Geometry::Mask { rle } => rle.bounds().map(|(x, y, w, h)| (x as f32, y as f32, w as f32, h as f32)),
        }
    }
}

/// The first pixel index whose centre lies at or past `v` (pixel `i`'s centre is `i + 0.5`).
fn centre_index(v: f32) -> u32 {
    (f64::from(v) - 0.5).ceil().max(0.0) as u32
}

/// The rows of the column whose centre line is `x = xc` that lie inside the polygon (even-odd
/// rule; pixel `j` is inside when `(xc, j + 0.5)` is).
fn column_spans(points: &[(f32, f32)], xc: f64, height: u32) -> Vec<(u32, u32)> {
    let n = points.len();
    let mut ys: Vec<f64> = Vec::new();
    for i in 0..n {
        let (ax, ay) = (f64::from(points[i].0), f64::from(points[i].1));
        let (bx, by) = (f64::from(points[(i + 1) % n].0), f64::from(points[(i + 1) % n].1));
        // Half-open in x, so a vertex on the line is counted once.
        if (ax <= xc) != (bx <= xc) {
            ys.push(ay + (xc - ax) * (by - ay) / (bx - ax));
        }
    }
    ys.sort_by(f64::total_cmp);
    ys.chunks_exact(2)
        .filter_map(|pair| {
            let start = (pair[0] - 0.5).ceil().max(0.0) as u32;
            let end = ((pair[1] - 0.5).ceil().max(0.0) as u32).min(height);
            (end > start).then_some((start.min(height), end))
        })
        .collect()
}

fn distance(a: &(f32, f32), b: &(f32, f32)) -> f64 {
    f64::from(a.0 - b.0).hypot(f64::from(a.1 - b.1))
}

fn distance_to_segment(p: &(f32, f32), a: &(f32, f32), b: &(f32, f32)) -> f64 {
    let (px, py, ax, ay, bx, by) = (f64::from(p.0), f64::from(p.1), f64::from(a.0), f64::from(a.1), f64::from(b.0), f64::from(b.1));
    let (dx, dy) = (bx - ax, by - ay);
    let length2 = dx * dx + dy * dy;
    let t = if length2 == 0.0 { 0.0 } else { (((px - ax) * dx + (py - ay) * dy) / length2).clamp(0.0, 1.0) };
    (px - (ax + t * dx)).hypot(py - (ay + t * dy))
}

fn distance_to_line(p: &(f32, f32), line: &[(f32, f32)]) -> f64 {
    match line {
        [] => f64::INFINITY,
        [only] => distance(p, only),
        _ => line.windows(2).map(|w| distance_to_segment(p, &w[0], &w[1])).fold(f64::INFINITY, f64::min),
    }
}

/// A polygon must be simple: no repeated consecutive vertex, no two edges that meet other than
/// neighbours at their shared vertex, and some area.
fn check_simple_polygon(points: &[(f32, f32)]) -> Result<(), Problem> {
    let n = points.len();
    let p = |i: usize| (f64::from(points[i % n].0), f64::from(points[i % n].1));
    for i in 0..n {
        if p(i) == p(i + 1) {
            return Err(Problem::RepeatedVertex { at: i, next: (i + 1) % n });
        }
    }
    for i in 0..n {
        for j in i + 1..n {
            let neighbours = j == i + 1 || (i == 0 && j == n - 1);
            let (a, b, c, d) = (p(i), p(i + 1), p(j), p(j + 1));
            let crosses = if neighbours {
                // Neighbours share a vertex; they may not fold back over each other.
                let (shared, other_a, other_b) = if j == i + 1 { (b, a, d) } else { (a, b, c) };
                orientation(shared, other_a, other_b) == 0.0 && dot(sub(other_a, shared), sub(other_b, shared)) > 0.0
            } else {
                segments_meet(a, b, c, d)
            };
            if crosses {
                return Err(Problem::SelfIntersecting { first: i, second: j });
            }
        }
    }
    let twice_area: f64 = (0..n).map(|i| p(i).0 * p(i + 1).1 - p(i + 1).0 * p(i).1).sum();
    if twice_area.abs() < 1e-9 {
        return Err(Problem::NoArea);
    }
    Ok(())
}

type Point = (f64, f64);

fn sub(a: Point, b: Point) -> Point {
    (a.0 - b.0, a.1 - b.1)
}

fn dot(a: Point, b: Point) -> f64 {
    a.0 * b.0 + a.1 * b.1
}

/// Twice the signed area of the triangle `a b c`: its sign says which side of `ab` `c` is on.
fn orientation(a: Point, b: Point, c: Point) -> f64 {
    (b.0 - a.0) * (c.1 - a.1) - (b.1 - a.1) * (c.0 - a.0)
}

/// Whether `c` lies on segment `ab`, given that the three are collinear.
fn within(a: Point, b: Point, c: Point) -> bool {
    c.0 >= a.0.min(b.0) && c.0 <= a.0.max(b.0) && c.1 >= a.1.min(b.1) && c.1 <= a.1.max(b.1)
}

/// Whether segments `ab` and `cd` share any point (touching counts).
fn segments_meet(a: Point, b: Point, c: Point, d: Point) -> bool {
    let (o1, o2, o3, o4) = (orientation(a, b, c), orientation(a, b, d), orientation(c, d, a), orientation(c, d, b));
    if ((o1 > 0.0 && o2 < 0.0) || (o1 < 0.0 && o2 > 0.0)) && ((o3 > 0.0 && o4 < 0.0) || (o3 < 0.0 && o4 > 0.0)) {
        return true;
    }
    (o1 == 0.0 && within(a, b, c)) || (o2 == 0.0 && within(a, b, d)) || (o3 == 0.0 && within(c, d, a)) || (o4 == 0.0 && within(c, d, b))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn polygon(points: &[(f32, f32)]) -> Geometry {
        Geometry::Polygon { points: points.to_vec() }
    }

    #[test]
    fn a_box_inside_the_image_passes() {
        Geometry::Box { x: 0.0, y: 0.0, w: 640.0, h: 480.0 }.check(640, 480).expect("the whole image");
    }

    #[test]
    fn a_box_outside_the_image_is_refused() {
        let refused = Geometry::Box { x: 600.0, y: 10.0, w: 50.0, h: 10.0 }.check(640, 480);
        assert_eq!(refused, Err(Problem::OutsideImage { width: 640, height: 480 }));
        assert_eq!(Geometry::Box { x: -3.0, y: 0.0, w: 5.0, h: 5.0 }.check(640, 480), Err(Problem::OutsideImage { width: 640, height: 480 }));
    }

    #[test]
    fn a_box_without_area_or_with_nan_is_refused() {
        assert_eq!(Geometry::Box { x: 1.0, y: 1.0, w: 0.0, h: 5.0 }.check(10, 10), Err(Problem::EmptyBox { w: 0.0, h: 5.0 }));
        assert_eq!(Geometry::Box { x: f32::NAN, y: 1.0, w: 1.0, h: 5.0 }.check(10, 10), Err(Problem::NotFinite));
    }

    #[test]
    fn a_self_intersecting_polygon_is_refused_with_the_edges() {
        // A bow tie: edge 0 (0,0)→(10,10) crosses edge 2 (10,0)→(0,10).
        let bow_tie = polygon(&[(0.0, 0.0), (10.0, 10.0), (10.0, 0.0), (0.0, 10.0)]);
        assert_eq!(bow_tie.check(20, 20), Err(Problem::SelfIntersecting { first: 0, second: 2 }));
        let message = bow_tie.check(20, 20).unwrap_err().to_string();
        assert!(message.contains("crosses itself"), "{message}");
    }

    #[test]
    fn a_polygon_touching_itself_at_a_vertex_is_refused() {
        // The fourth vertex lies on the first edge.
        let pinched = polygon(&[(0.0, 0.0), (10.0, 0.0), (10.0, 10.0), (5.0, 0.0), (0.0, 10.0)]);
        assert!(matches!(pinched.check(20, 20), Err(Problem::SelfIntersecting { .. })));
    }

    #[test]
    fn a_polygon_folding_back_or_flat_is_refused() {
        assert!(matches!(polygon(&[(0.0, 0.0), (10.0, 0.0), (5.0, 0.0)]).check(20, 20), Err(Problem::SelfIntersecting { .. })));
        assert_eq!(polygon(&[(0.0, 0.0), (1.0, 1.0), (1.0, 1.0)]).check(20, 20), Err(Problem::RepeatedVertex { at: 1, next: 2 }));
    }

    #[test]
    fn simple_polygons_pass_convex_or_not() {
        polygon(&[(0.0, 0.0), (10.0, 0.0), (10.0, 10.0), (0.0, 10.0)]).check(20, 20).expect("square");
        polygon(&[(0.0, 0.0), (10.0, 0.0), (5.0, 3.0), (10.0, 10.0), (0.0, 10.0)]).check(20, 20).expect("an arrow head");
    }

    #[test]
    fn polygons_and_lines_need_their_points() {
        assert_eq!(polygon(&[(0.0, 0.0), (1.0, 1.0)]).check(5, 5), Err(Problem::TooFewPoints { kind: ShapeKind::Polygon, found: 2, min: 3 }));
        assert_eq!(Geometry::Polyline { points: vec![(1.0, 1.0)] }.check(5, 5), Err(Problem::TooFewPoints { kind: ShapeKind::Polyline, found: 1, min: 2 }));
        let many = Geometry::Points { points: vec![(1.0, 1.0); MAX_VERTICES + 1] };
        assert!(matches!(many.check(5, 5), Err(Problem::TooManyPoints { .. })));
    }

    #[test]
    fn a_mask_must_fit_and_paint_something() {
        let empty = Geometry::Mask { rle: Rle { size: [4, 4], counts: vec![16] } };
        assert_eq!(empty.check(4, 4), Err(Problem::EmptyMask));
        assert!(matches!(empty.check(5, 4), Err(Problem::Mask(_))));
        let noise = Geometry::Mask { rle: Rle { size: [1000, 1000], counts: vec![5; 200_000] } };
        assert_eq!(noise.check(1000, 1000), Err(Problem::TooManyRuns { found: 200_000, max: MAX_MASK_RUNS }));
    }

    #[test]
    fn a_box_covers_the_pixels_whose_centres_it_holds() {
        let cover = Geometry::Box { x: 1.0, y: 1.0, w: 2.0, h: 3.0 }.coverage(6, 6).expect("a region");
        assert_eq!(cover.area(), 6);
        assert!(cover.get(1, 1) && cover.get(2, 3) && !cover.get(3, 1) && !cover.get(1, 4));
        assert_eq!(cover.bounds(), Some((1, 1, 2, 3)));
    }

    #[test]
    fn a_triangle_rasterizes_as_pycocotools_would() {
        // The right triangle (0,0) (4,0) (0,4): centres (i+.5, j+.5) with i + j + 1 < 4 inside.
        let cover = polygon(&[(0.0, 0.0), (4.0, 0.0), (0.0, 4.0)]).coverage(4, 4).expect("a region");
        assert_eq!(cover.area(), 6);
        assert!(cover.get(0, 0) && cover.get(2, 0) && cover.get(0, 2) && cover.get(1, 1));
        assert!(!cover.get(3, 0) && !cover.get(2, 1));
    }

    #[test]
    fn a_polygon_drawn_as_a_box_agrees_with_the_box() {
        let square = polygon(&[(2.0, 2.0), (8.0, 2.0), (8.0, 8.0), (2.0, 8.0)]);
        let boxed = Geometry::Box { x: 2.0, y: 2.0, w: 6.0, h: 6.0 };
        assert!((square.similarity(&boxed, 10, 10) - 1.0).abs() < 1e-12);
        let mask = Geometry::Mask { rle: boxed.coverage(10, 10).expect("region") };
        assert!((mask.similarity(&square, 10, 10) - 1.0).abs() < 1e-12);
    }

    #[test]
    fn box_overlap_is_exact() {
        let a = Geometry::Box { x: 0.0, y: 0.0, w: 10.0, h: 10.0 };
        let b = Geometry::Box { x: 5.0, y: 0.0, w: 10.0, h: 10.0 };
        assert!((a.similarity(&b, 20, 20) - 50.0 / 150.0).abs() < 1e-12);
        assert_eq!(a.similarity(&Geometry::Box { x: 15.0, y: 15.0, w: 2.0, h: 2.0 }, 20, 20), 0.0);
    }

    #[test]
    fn points_and_lines_compare_by_distance_and_not_with_regions() {
        let a = Geometry::Points { points: vec![(10.0, 10.0), (50.0, 50.0)] };
        let near = Geometry::Points { points: vec![(50.5, 50.0), (10.0, 10.5)] };
        let far = Geometry::Points { points: vec![(90.0, 90.0), (10.0, 10.0)] };
        assert!(a.similarity(&near, 100, 100) > 0.9);
        assert!(a.similarity(&far, 100, 100) < 0.6);
        let line = Geometry::Polyline { points: vec![(0.0, 0.0), (100.0, 100.0)] };
        assert!(line.similarity(&Geometry::Polyline { points: vec![(0.0, 0.5), (100.0, 100.5)] }, 100, 100) > 0.9);
        assert_eq!(line.similarity(&Geometry::Box { x: 0.0, y: 0.0, w: 5.0, h: 5.0 }, 100, 100), 0.0);
    }
}

//! Crowdsourced annotation (seed 001), the part without I/O: what a project's owner declares
//! ([`schema`]), what annotators draw and how it is checked ([`geometry`], [`rle`]), how a
//! project's images become tasks of overlapping slots ([`plan`]) and how the overlap is turned
//! into agreement scores, conflicts for a reviewer and honeypot scores ([`agreement`]).
//!
//! The portal keeps projects, tasks and work in SQL and serves the browser tool
//! (`portal/src/annotation.rs`); everything it decides about shapes is decided here, once, so the
//! checks a saved shape passes are the checks an export relies on.
//!
//! Conventions (those of `suanli_cv::annotation`, which exports convert to): coordinates are
//! pixels with the origin at the image's top-left corner, pixel `(i, j)` covering
//! `[i, i+1) × [j, j+1)`; a pixel belongs to a region when its centre does (as COCO's own
//! rasterizer decides), so a box, a polygon and a painted mask are compared on one pixel grid.

pub mod agreement;
pub mod geometry;
pub mod plan;
pub mod rle;
pub mod schema;

pub use agreement::{check_decision, compare_image, reviewed_shapes, score_against_gold, Cluster, Decision, DecisionError, Disagreement, ImageAgreement, Work};
pub use geometry::{Geometry, Problem, ShapeKind};
pub use plan::{plan_tasks, PlanError, PlanRequest};
pub use rle::Rle;
pub use schema::{Annotation, AttributeValue, LabelSchema, SchemaError, ShapeError};

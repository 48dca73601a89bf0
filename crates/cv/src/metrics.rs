//! Classification evaluation: a confusion matrix and the metrics derived from it.
//!
//! Conventions (those of scikit-learn with `zero_division=0`, so numbers match a Python
//! reference): a ratio with a zero denominator is 0.0 — precision of a class never predicted,
//! recall of a class with no samples, F1 when both are 0, accuracy of an empty matrix. The
//! macro F1 averages over *all* classes, including those without samples, because a class
//! the model should know but never saw in evaluation is still a class.

use std::fmt;

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MetricsError {
    #[error("{role} label {label} is out of range for {num_classes} classes")]
    LabelOutOfRange { role: LabelRole, label: usize, num_classes: usize },
}

/// Which side of a (truth, predicted) pair a label is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum LabelRole {
    Truth,
    Predicted,
}

impl fmt::Display for LabelRole {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            LabelRole::Truth => "true",
            LabelRole::Predicted => "predicted",
        })
    }
}

/// Counts of (true class, predicted class) pairs: row = truth, column = prediction.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfusionMatrix {
    num_classes: usize,
    /// Row-major `num_classes × num_classes`.
    counts: Vec<u64>,
}

/// Precision, recall and F1 of one class (one-vs-rest), and its number of true samples.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct ClassMetrics {
    pub class: usize,
    pub precision: f64,
    pub recall: f64,
    pub f1: f64,
    pub support: u64,
}

/// Everything a run reports, as JSON: `{"accuracy", "macro_f1", "per_class", "confusion"}`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Report {
    pub accuracy: f64,
    pub macro_f1: f64,
    pub per_class: Vec<ClassMetrics>,
    /// Rows are true classes, columns predicted ones.
    pub confusion: Vec<Vec<u64>>,
}

fn ratio(numerator: u64, denominator: u64) -> f64 {
    if denominator == 0 {
        0.0
    } else {
        numerator as f64 / denominator as f64
    }
}

impl ConfusionMatrix {
    pub fn new(num_classes: usize) -> Self {
        ConfusionMatrix { num_classes, counts: vec![0; num_classes * num_classes] }
    }

    /// A matrix of `(truth, predicted)` pairs; fails on the first label out of range.
    pub fn from_pairs(num_classes: usize, pairs: impl IntoIterator<Item = (usize, usize)>) -> Result<Self, MetricsError> {
        let mut matrix = Self::new(num_classes);
        for (truth, predicted) in pairs {
            matrix.add(truth, predicted)?;
        }
        Ok(matrix)
    }

    pub fn num_classes(&self) -> usize {
        self.num_classes
    }

    /// Records one sample. The matrix is unchanged on error.
    pub fn add(&mut self, truth: usize, predicted: usize) -> Result<(), MetricsError> {
        let check = |role, label| {
            if label < self.num_classes {
                Ok(())
            } else {
                Err(MetricsError::LabelOutOfRange { role, label, num_classes: self.num_classes })
            }
        };
        check(LabelRole::Truth, truth)?;
        check(LabelRole::Predicted, predicted)?;
        self.counts[truth * self.num_classes + predicted] += 1;
        Ok(())
    }

    /// How many samples of class `truth` were predicted as `predicted` (0 out of range).
    pub fn count(&self, truth: usize, predicted: usize) -> u64 {
        if truth < self.num_classes && predicted < self.num_classes {
            self.counts[truth * self.num_classes + predicted]
        } else {
            0
        }
    }

    pub fn total(&self) -> u64 {
        self.counts.iter().sum()
    }

    fn correct(&self) -> u64 {
        (0..self.num_classes).map(|c| self.count(c, c)).sum()
    }

    /// Fraction of samples predicted correctly; 0.0 for an empty matrix.
    pub fn accuracy(&self) -> f64 {
        ratio(self.correct(), self.total())
    }

    /// One-vs-rest metrics for every class, in class order.
    pub fn per_class(&self) -> Vec<ClassMetrics> {
        (0..self.num_classes)
            .map(|class| {
                let true_positive = self.count(class, class);
                let support: u64 = (0..self.num_classes).map(|p| self.count(class, p)).sum();
                let predicted: u64 = (0..self.num_classes).map(|t| self.count(t, class)).sum();
                let precision = ratio(true_positive, predicted);
                let recall = ratio(true_positive, support);
                let f1 = if precision + recall > 0.0 { 2.0 * precision * recall / (precision + recall) } else { 0.0 };
                ClassMetrics { class, precision, recall, f1, support }
            })
            .collect()
    }

    /// Unweighted mean of the per-class F1 over all classes; 0.0 without classes.
    pub fn macro_f1(&self) -> f64 {
        if self.num_classes == 0 {
            return 0.0;
        }
        self.per_class().iter().map(|m| m.f1).sum::<f64>() / self.num_classes as f64
    }

    /// Rows (true classes) of counts.
    pub fn rows(&self) -> Vec<Vec<u64>> {
        self.counts.chunks(self.num_classes.max(1)).take(self.num_classes).map(<[u64]>::to_vec).collect()
    }

    pub fn report(&self) -> Report {
        Report { accuracy: self.accuracy(), macro_f1: self.macro_f1(), per_class: self.per_class(), confusion: self.rows() }
    }
}

/// The matrix as a right-aligned table, true classes down, predicted across:
///
/// ```text
/// true\pred  0  1
///         0  5  1
///         1  0  3
/// ```
impl fmt::Display for ConfusionMatrix {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        const CORNER: &str = "true\\pred";
        let cell = self.counts.iter().map(|c| c.to_string().len()).chain([self.num_classes.saturating_sub(1).to_string().len()]).max().unwrap_or(1);
        write!(f, "{CORNER}")?;
        for p in 0..self.num_classes {
            write!(f, " {p:>cell$}")?;
        }
        writeln!(f)?;
        for (t, row) in self.rows().iter().enumerate() {
            write!(f, "{t:>width$}", width = CORNER.len())?;
            for count in row {
                write!(f, " {count:>cell$}")?;
            }
            writeln!(f)?;
        }
        Ok(())
    }
}

//! Measured speed of job types on GPU models, for the heterogeneity-aware policy.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// Steps per second of a job type on a GPU model, per gang size.
///
/// Keys are exact: the type key is [`type_key`](crate::type_key) of the spec (its name), the
/// model is the card's [`model`](crate::CardView::model) string as the agent reports it. The
/// speed of a gang of `cards` is the whole job's rate on that many cards of the model.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct ThroughputTable {
    by_type: BTreeMap<String, BTreeMap<u32, BTreeMap<String, f64>>>,
}

impl ThroughputTable {
    pub fn new() -> Self {
        Self::default()
    }

    /// Records a measurement. Negative or non-finite speeds are ignored (a policy must not be
    /// steered by garbage); zero is kept and means "does not run there".
    pub fn insert(&mut self, type_key: impl Into<String>, cards: u32, model: impl Into<String>, steps_per_s: f64) {
        if steps_per_s.is_finite() && steps_per_s >= 0.0 {
            self.by_type.entry(type_key.into()).or_default().entry(cards).or_default().insert(model.into(), steps_per_s);
        }
    }

    pub fn is_empty(&self) -> bool {
        self.by_type.is_empty()
    }

    /// The speed of `type_key` on `cards` cards of `model`: the measurement for exactly that
    /// gang size if there is one, else the one for the nearest gang size that has this model
    /// (the smaller on a tie). Policies compare models by ratios, which change little with
    /// gang size, so a neighbour is a better guess than nothing.
    pub fn speed(&self, type_key: &str, cards: u32, model: &str) -> Option<f64> {
        let by_cards = self.by_type.get(type_key)?;
        if let Some(&s) = by_cards.get(&cards).and_then(|m| m.get(model)) {
            return Some(s);
        }
        by_cards
            .iter()
            .filter_map(|(&n, models)| models.get(model).map(|&s| (n.abs_diff(cards), n, s)))
            .min_by_key(|&(distance, n, _)| (distance, n))
            .map(|(_, _, s)| s)
    }

    /// The measurement for exactly this gang size, without falling back.
    pub fn exact(&self, type_key: &str, cards: u32, model: &str) -> Option<f64> {
        self.by_type.get(type_key)?.get(&cards)?.get(model).copied()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exact_then_nearest_gang_size() {
        let mut t = ThroughputTable::new();
        t.insert("resnet", 1, "v100", 10.0);
        t.insert("resnet", 4, "v100", 35.0);
        t.insert("resnet", 4, "k80", 5.0);
        t.insert("resnet", 8, "k80", f64::NAN);
        assert_eq!(t.speed("resnet", 4, "v100"), Some(35.0));
        assert_eq!(t.speed("resnet", 2, "v100"), Some(10.0));
        assert_eq!(t.speed("resnet", 3, "v100"), Some(35.0));
        assert_eq!(t.speed("resnet", 8, "k80"), Some(5.0));
        assert_eq!(t.exact("resnet", 8, "k80"), None);
        assert_eq!(t.speed("bert", 1, "v100"), None);
    }
}

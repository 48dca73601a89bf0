//! Hyperparameter search over learning rate, batch size and epochs (SPEC §6).
//!
//! Pure and generic over what is being trained: [`search`] takes an objective closure that
//! trains with the given [`Params`] and returns a score (higher is better: validation
//! accuracy, macro F1, ...). The torch trainer supplies that closure; nothing here knows
//! about tensors, so the search logic is tested without a GPU.
//!
//! Two strategies:
//!
//! * [`Strategy::Random`]: `trials` independent samples, each trained for its sampled epochs.
//! * [`Strategy::SuccessiveHalving`]: the synchronous form of successive halving (Jamieson &
//!   Talwalkar 2016; the synchronous variant in the ASHA paper, Li et al. 2020). All
//!   configurations are trained for `min_epochs`; the best `ceil(n / eta)` go on to a rung
//!   with `eta` times the epochs (capped at `max(space.epochs)`), until one configuration is
//!   left or the budget reaches the cap.
//!
//! ## Reproducibility
//!
//! Trials are a pure function of the seed. The ChaCha8 key is expanded from the seed with
//! SplitMix64 rather than `SeedableRng::seed_from_u64`, and every value is derived from the
//! generator's raw `next_u64` output with the arithmetic in this file rather than through
//! `rand`'s distributions: both of those are `rand` implementation details that have changed
//! between releases, and a recorded `(seed, space)` in a job spec must keep naming the same
//! trials after a dependency upgrade. Each trial consumes exactly three words (lr, batch
//! size, epochs) whatever the space, so trial `k` depends only on the seed and the space, and
//! raising `trials` keeps the earlier trials unchanged. Successive halving samples the very
//! same configurations as random search for the same seed.

use std::fmt;

use rand::{RngCore, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use crate::preprocess::{join_field_errors, FieldError};

/// The most trials one search may ask for: each is a training run, and a typo'd `100000`
/// should be a validation error rather than a month of GPU time.
pub const MAX_TRIALS: u32 = 1000;

/// How failures are shown in [`SearchError::AllFailed`]'s message; the full list stays in
/// the variant.
const SHOWN_FAILURES: usize = 5;

/// Where the learning rate is drawn from.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum Range {
    /// `exp(uniform(ln min, ln max))`: equal mass per decade, the usual choice for learning
    /// rates, whose useful values span orders of magnitude.
    LogUniform {
        min: f64,
        max: f64,
    },
    Uniform {
        min: f64,
        max: f64,
    },
    /// One of `values`, each equally likely (repeat a value to weight it).
    Choice {
        values: Vec<f64>,
    },
}

/// What [`search`] samples from.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SearchSpace {
    pub lr: Range,
    /// Choices, each equally likely.
    pub batch_size: Vec<usize>,
    /// Choices, each equally likely. For successive halving only `max(epochs)` matters: it is
    /// the budget of the last rung, and the sampled choice is ignored.
    pub epochs: Vec<u32>,
}

/// How [`search`] spends its trials.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum Strategy {
    Random {
        trials: u32,
    },
    SuccessiveHalving {
        /// Configurations sampled for rung 0.
        trials: u32,
        /// Rung 0's epochs.
        min_epochs: u32,
        /// Both the survival ratio (the top `1/eta` go on) and the epoch multiplier per rung.
        #[serde(default = "default_eta")]
        eta: u32,
    },
}

fn default_eta() -> u32 {
    3
}

/// One configuration as the objective sees it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Params {
    pub lr: f64,
    pub batch_size: usize,
    /// For successive halving, the rung's budget rather than the sampled choice.
    pub epochs: u32,
}

/// What the objective returns for one training run.
#[derive(Clone, Debug, PartialEq)]
pub struct Objective {
    /// Higher is better. NaN and infinite scores are recorded as failures: they are what a
    /// diverged run produces, and letting one win (or sort unpredictably) would be worse.
    pub score: f64,
    /// Anything worth keeping in the report (per-class recall, loss curve, ...).
    pub metrics: serde_json::Value,
}

/// One evaluation of the objective.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrialResult {
    /// The configuration's id, `0..trials`; under successive halving the same id recurs on
    /// every rung the configuration reaches.
    pub trial: u32,
    pub params: Params,
    /// 0 for random search.
    pub rung: u32,
    /// `-inf` for a failed run. JSON has no infinities, so it is written as `null`.
    #[serde(with = "score_json")]
    pub score: f64,
    /// The objective's metrics, or `{"error": message}` for a failed run.
    pub metrics: serde_json::Value,
}

impl TrialResult {
    /// Whether the objective failed (returned an error or a non-finite score).
    pub fn is_failed(&self) -> bool {
        !self.score.is_finite()
    }
}

/// What a search found; the job writes it as `hpo.json`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SearchReport {
    /// The highest score (ties: the lower trial id). For successive halving, taken from the
    /// highest rung that has a successful run, since lower rungs' scores come from fewer
    /// epochs and are not comparable. Its `params.epochs` is the budget it was scored at,
    /// which is below `max(space.epochs)` when the field narrowed to one configuration
    /// before the budget reached the cap.
    pub best: TrialResult,
    /// Every evaluation, in run order.
    pub trials: Vec<TrialResult>,
    pub strategy: Strategy,
}

#[derive(Debug, thiserror::Error)]
pub enum SearchError {
    #[error("invalid hyperparameter search: {}", join_field_errors(.0))]
    Invalid(Vec<FieldError>),
    /// Every evaluation failed; one `trial N: message` per failure, in run order.
    #[error("every trial failed: {}", show_failures(.0))]
    AllFailed(Vec<String>),
}

fn show_failures(failures: &[String]) -> String {
    let mut shown = failures.iter().take(SHOWN_FAILURES).cloned().collect::<Vec<_>>().join("; ");
    if failures.len() > SHOWN_FAILURES {
        shown.push_str(&format!(" (and {} more)", failures.len() - SHOWN_FAILURES));
    }
    shown
}

impl Range {
    /// Errors under `path` (e.g. `lr`). Every learning rate must be positive and finite.
    fn validate(&self, path: &str) -> Vec<FieldError> {
        let mut errors = Vec::new();
        match self {
            Range::LogUniform { min, max } | Range::Uniform { min, max } => {
                let log = matches!(self, Range::LogUniform { .. });
                for (name, v) in [("min", min), ("max", max)] {
                    if !v.is_finite() {
                        errors.push(FieldError::new(format!("{path}.{name}"), "must be a finite number"));
                    } else if *v <= 0.0 {
                        let why = if log {
                            "must be greater than 0 (a log-uniform range cannot reach 0)"
                        } else {
                            "must be greater than 0 (a learning rate is positive)"
                        };
                        errors.push(FieldError::new(format!("{path}.{name}"), why));
                    }
                }
                if min.is_finite() && max.is_finite() && min >= max {
                    errors.push(FieldError::new(format!("{path}.max"), format!("must be greater than min ({min}); use choice for a fixed value")));
                }
            }
            Range::Choice { values } => {
                if values.is_empty() {
                    errors.push(FieldError::new(format!("{path}.values"), "must list at least one value"));
                }
                for (i, v) in values.iter().enumerate() {
                    if !v.is_finite() || *v <= 0.0 {
                        errors.push(FieldError::new(format!("{path}.values[{i}]"), "must be a finite number greater than 0"));
                    }
                }
            }
        }
        errors
    }

    /// Draws one value from one raw word. Assumes a valid range.
    fn draw(&self, word: u64) -> f64 {
        match self {
            Range::LogUniform { min, max } => {
                let (lo, hi) = (min.ln(), max.ln());
                // Rounding in exp/ln can land a hair outside; the bounds are promised.
                (lo + unit(word) * (hi - lo)).exp().clamp(*min, *max)
            }
            Range::Uniform { min, max } => (min + unit(word) * (max - min)).clamp(*min, *max),
            Range::Choice { values } => values.get(index(word, values.len())).copied().unwrap_or(f64::NAN),
        }
    }
}

impl SearchSpace {
    /// Every invalid field, with paths like `lr.min` or `batch_size[2]`; empty when valid.
    pub fn validate(&self) -> Vec<FieldError> {
        let mut errors = self.lr.validate("lr");
        if self.batch_size.is_empty() {
            errors.push(FieldError::new("batch_size", "must list at least one batch size"));
        }
        for (i, b) in self.batch_size.iter().enumerate() {
            if *b == 0 {
                errors.push(FieldError::new(format!("batch_size[{i}]"), "must be at least 1"));
            }
        }
        if self.epochs.is_empty() {
            errors.push(FieldError::new("epochs", "must list at least one epoch count"));
        }
        for (i, e) in self.epochs.iter().enumerate() {
            if *e == 0 {
                errors.push(FieldError::new(format!("epochs[{i}]"), "must be at least 1"));
            }
        }
        errors
    }

    /// The epoch budget: successive halving's cap, `None` when `epochs` is empty.
    pub fn max_epochs(&self) -> Option<u32> {
        self.epochs.iter().copied().max()
    }
}

impl Strategy {
    pub fn trials(&self) -> u32 {
        match self {
            Strategy::Random { trials } | Strategy::SuccessiveHalving { trials, .. } => *trials,
        }
    }

    /// Every invalid field (`trials`, `min_epochs`, `eta`); empty when valid. Takes the space
    /// because `min_epochs` is bounded by its largest epochs choice.
    pub fn validate(&self, space: &SearchSpace) -> Vec<FieldError> {
        let mut errors = Vec::new();
        let trials = self.trials();
        if !(1..=MAX_TRIALS).contains(&trials) {
            errors.push(FieldError::new("trials", format!("must be between 1 and {MAX_TRIALS}, got {trials}")));
        }
        if let Strategy::SuccessiveHalving { min_epochs, eta, .. } = self {
            if *eta < 2 {
                errors.push(FieldError::new("eta", format!("must be at least 2, got {eta}")));
            }
            if *min_epochs == 0 {
                errors.push(FieldError::new("min_epochs", "must be at least 1"));
            } else if let Some(max) = space.max_epochs() {
                // With an empty `epochs` list the space reports its own error; nothing to
                // compare against here.
                if *min_epochs > max {
                    errors.push(FieldError::new("min_epochs", format!("must be at most the largest epochs choice ({max}), got {min_epochs}")));
                }
            }
        }
        errors
    }
}

/// `space`'s and `strategy`'s errors together, as [`search`] reports them.
pub fn validate(space: &SearchSpace, strategy: &Strategy) -> Vec<FieldError> {
    let mut errors = space.validate();
    errors.extend(strategy.validate(space));
    errors
}

/// The first `n` configurations for `seed`: what both strategies train (successive halving
/// then overrides `epochs`). See the module docs for why this is stable across `rand`
/// upgrades.
pub fn sample(space: &SearchSpace, seed: u64, n: u32) -> Result<Vec<Params>, SearchError> {
    let errors = space.validate();
    if !errors.is_empty() {
        return Err(SearchError::Invalid(errors));
    }
    let mut rng = ChaCha8Rng::from_seed(expand_seed(seed));
    let mut out = Vec::with_capacity(n.min(MAX_TRIALS) as usize);
    for _ in 0..n {
        // Three words per trial, drawn in a fixed order, whatever the space.
        let (w_lr, w_batch, w_epochs) = (rng.next_u64(), rng.next_u64(), rng.next_u64());
        let batch_size = space.batch_size.get(index(w_batch, space.batch_size.len()));
        let epochs = space.epochs.get(index(w_epochs, space.epochs.len()));
        // Validation guarantees non-empty choices; the fallbacks are never taken.
        let (Some(&batch_size), Some(&epochs)) = (batch_size, epochs) else {
            return Err(SearchError::Invalid(vec![FieldError::new("batch_size", "no choices")]));
        };
        out.push(Params { lr: space.lr.draw(w_lr), batch_size, epochs });
    }
    Ok(out)
}

/// Runs the search. The objective gets the trial id (`0..trials`, the same on every rung)
/// and the parameters; an `Err`, or a NaN or infinite score, marks that one evaluation
/// failed (score `-inf`, metrics `{"error": message}`) and the search goes on. Only when
/// every evaluation fails is that an error.
pub fn search<E: fmt::Display>(
    space: &SearchSpace,
    strategy: &Strategy,
    seed: u64,
    mut objective: impl FnMut(u32, &Params) -> Result<Objective, E>,
) -> Result<SearchReport, SearchError> {
    let errors = validate(space, strategy);
    if !errors.is_empty() {
        return Err(SearchError::Invalid(errors));
    }
    let configs = sample(space, seed, strategy.trials())?;
    let mut run = |trial: u32, params: Params, rung: u32| evaluate(&mut objective, trial, params, rung);

    let (trials, best) = match strategy {
        Strategy::Random { .. } => {
            let trials: Vec<TrialResult> = (0u32..).zip(configs).map(|(id, params)| run(id, params, 0)).collect();
            let best = best_of(trials.iter());
            (trials, best)
        }
        Strategy::SuccessiveHalving { min_epochs, eta, .. } => {
            // Validation guarantees a non-empty `epochs` list.
            let max_epochs = space.max_epochs().unwrap_or(*min_epochs);
            let mut trials = Vec::new();
            let mut alive: Vec<(u32, Params)> = (0u32..).zip(configs).collect();
            let mut budget = *min_epochs;
            let mut best = None;
            for rung in 0u32.. {
                let start = trials.len();
                for (id, params) in &alive {
                    let params = Params { epochs: budget, ..params.clone() };
                    trials.push(run(*id, params, rung));
                }
                let results = &trials[start..];
                // Only successful runs are promoted: a configuration that crashed at a small
                // budget would not be improved by a bigger one, and its -inf carries no rank.
                let mut ranked: Vec<&TrialResult> = results.iter().filter(|t| !t.is_failed()).collect();
                if ranked.is_empty() {
                    // Nothing to promote; the best stays the one from the rung below.
                    break;
                }
                ranked.sort_by(|a, b| b.score.total_cmp(&a.score).then(a.trial.cmp(&b.trial)));
                best = ranked.first().map(|t| (*t).clone());
                if alive.len() <= 1 || budget >= max_epochs {
                    break;
                }
                let keep = alive.len().div_ceil(*eta as usize).min(ranked.len());
                let survivors: Vec<u32> = ranked.iter().take(keep).map(|t| t.trial).collect();
                // Survivors keep their id order, so each rung runs in the same order as rung 0.
                alive.retain(|(id, _)| survivors.contains(id));
                budget = budget.saturating_mul(*eta).min(max_epochs);
            }
            (trials, best)
        }
    };

    match best {
        Some(best) => Ok(SearchReport { best, trials, strategy: strategy.clone() }),
        None => Err(SearchError::AllFailed(trials.iter().map(|t| format!("trial {}: {}", t.trial, error_message(&t.metrics))).collect())),
    }
}

fn evaluate<E: fmt::Display>(objective: &mut impl FnMut(u32, &Params) -> Result<Objective, E>, trial: u32, params: Params, rung: u32) -> TrialResult {
    let failed =
        |params: Params, message: String| TrialResult { trial, params, rung, score: f64::NEG_INFINITY, metrics: serde_json::json!({ "error": message }) };
    match objective(trial, &params) {
        Ok(Objective { score, metrics }) if score.is_finite() => TrialResult { trial, params, rung, score, metrics },
        Ok(Objective { score, .. }) => failed(params, format!("objective returned a non-finite score ({score})")),
        Err(e) => failed(params, e.to_string()),
    }
}

/// The highest successful score, ties to the earliest (lowest id, as ids run in order).
fn best_of<'a>(trials: impl Iterator<Item = &'a TrialResult>) -> Option<TrialResult> {
    let mut best: Option<&TrialResult> = None;
    for t in trials.filter(|t| !t.is_failed()) {
        if best.is_none_or(|b| t.score > b.score || (t.score == b.score && t.trial < b.trial)) {
            best = Some(t);
        }
    }
    best.cloned()
}

fn error_message(metrics: &serde_json::Value) -> String {
    match metrics.get("error") {
        Some(serde_json::Value::String(s)) => s.clone(),
        _ => "failed".to_owned(),
    }
}

/// A 53-bit-precision float in `[0, 1)` from the top bits of `word`.
fn unit(word: u64) -> f64 {
    (word >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
}

/// An index in `0..n` by widening multiply (Lemire): one word per draw, so the stream stays
/// aligned, at a bias of at most `n / 2^64`, far below anything a search could notice.
/// Returns 0 for `n == 0`, which callers' `get` then rejects.
fn index(word: u64, n: usize) -> usize {
    ((u128::from(word) * n as u128) >> 64) as usize
}

/// The ChaCha8 key for `seed`: four SplitMix64 outputs, little-endian. SplitMix64 is a fixed,
/// published function, unlike the expansion behind `seed_from_u64`.
fn expand_seed(seed: u64) -> [u8; 32] {
    let mut state = seed;
    let mut key = [0u8; 32];
    for chunk in key.chunks_exact_mut(8) {
        state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = state;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^= z >> 31;
        chunk.copy_from_slice(&z.to_le_bytes());
    }
    key
}

/// A failed run's `-inf` score as JSON `null`, and back: serde_json would write `null` for a
/// non-finite float anyway but then refuse to read it.
mod score_json {
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(score: &f64, s: S) -> Result<S::Ok, S::Error> {
        if score.is_finite() {
            s.serialize_f64(*score)
        } else {
            s.serialize_none()
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<f64, D::Error> {
        Ok(Option::<f64>::deserialize(d)?.unwrap_or(f64::NEG_INFINITY))
    }
}

//! Aggregating peers' logits into the ensemble teacher.
//!
//! Input is a set of `rows × classes` logit matrices on the same public
//! subset (the node's own and every accepted peer share), each with the
//! contributor's private sample count; output is one matrix the student is
//! distilled towards. Only shares that passed
//! [`fd_protocol::LogitShare::validate`] ever get here, and the aggregators
//! still refuse non-finite input (the node's own predictions are not
//! validated) so a diverged model cannot turn the teacher into NaN.
//!
//! Two families:
//! - probability-based ([`Aggregator::MeanProbabilities`],
//!   [`Aggregator::Weighted`], [`Aggregator::Era`]) average the
//!   contributors' softmax distributions, row by row, and return logits whose
//!   softmax is the averaged distribution;
//! - logit-based ([`Aggregator::Mean`], [`Aggregator::Median`],
//!   [`Aggregator::TrimmedMean`]) combine raw logits coordinate by
//!   coordinate. Median and trimmed mean are the robust ones: a contributor
//!   sending arbitrary values cannot move a coordinate outside the range of
//!   the honest contributors' values as long as the honest ones outnumber
//!   the trimmed (for the median: at least two honest, one adversary).
//!
//! Every aggregator accumulates in f64 and allocates only per call (an
//! accumulator of `rows × classes`, one row of probabilities, one buffer of
//! `n` values per coordinate), never per element: a benchmark aggregates
//! 100 peers × 1,000 samples × 10 classes.

use std::cmp::Ordering;

use serde::{Deserialize, Serialize};

use fd_protocol::secagg::KnowledgeSums;
use fd_protocol::share::softmax_into;

/// Which teacher rows are distilled: those with max probability ≥
/// `min_confidence` and entropy ≤ `max_entropy` (a 0 disables a test).
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct TeacherFilter {
    pub min_confidence: f64,
    pub max_entropy: f64,
}

impl TeacherFilter {
    pub fn is_off(&self) -> bool {
        self.min_confidence == 0.0 && self.max_entropy == 0.0
    }

    /// Whether a teacher row with probabilities `p` (summing to 1) is kept.
    pub fn keeps(&self, p: &[f64]) -> bool {
        if self.min_confidence > 0.0 {
            let max = p.iter().copied().fold(0.0, f64::max);
            if max < self.min_confidence {
                return false;
            }
        }
        if self.max_entropy > 0.0 {
            let h: f64 = p
                .iter()
                .filter(|&&q| q > 0.0)
                .map(|&q| -q * q.ln())
                .sum();
            if h > self.max_entropy {
                return false;
            }
        }
        true
    }
}


/// One member's logits (rows × classes) and its private sample count.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Contribution<'a> {
    pub logits: &'a [f32],
    /// Training samples behind these logits; only [`Aggregator::Weighted`]
    /// reads it. Self-reported by peers (signed, but unverifiable), so a
    /// member that lies about it gets a larger vote under `Weighted`.
    pub samples: u64,
    /// The contributor's knowledge weight of each row in [0, 1] (its
    /// signed share's `row_weights`; `None`: 1 everywhere). Read by the
    /// probability-based aggregators; the logit-based ones ignore it.
    pub row_weights: Option<&'a [f32]>,
}

impl<'a> Contribution<'a> {
    /// A contribution without row weights.
    pub fn new(logits: &'a [f32], samples: u64) -> Self {
        Contribution {
            logits,
            samples,
            row_weights: None,
        }
    }
}

/// How the teacher is formed from the contributors' logits.
///
/// Serialized externally tagged in kebab-case: in TOML the unit variants are
/// plain strings (`aggregator = "median"`) and the others tables
/// (`aggregator = { trimmed-mean = { beta = 0.2 } }`). Parameters are checked
/// by [`Aggregator::validate`] (and again by every aggregation).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Aggregator {
    /// Element-wise mean of logits (FedMD's consensus).
    Mean,
    /// Mean of the contributors' softmax probabilities; the teacher's logits
    /// are the log of that mean. Under label skew a member that never saw a
    /// class still emits confident logits for its own classes; averaging
    /// probabilities bounds each member's vote to 1, where averaging logits
    /// lets the most confident member dominate (see the test
    /// `mean_of_probabilities_bounds_each_vote`; docs/results.md has the
    /// measured effect on accuracy).
    MeanProbabilities,
    /// Mean of probabilities weighted by each contributor's sample count
    /// (FedAvg's weighting applied to predictions). Contributors with zero
    /// samples have no vote; if all have zero, aggregation fails.
    Weighted,
    /// DS-FL's entropy reduction aggregation: the mean probabilities `q` are
    /// sharpened to `softmax(q / temperature)` (temperature < 1 sharpens,
    /// which DS-FL uses against the high-entropy average of non-IID
    /// members). The teacher's logits are the log of that distribution.
    Era { temperature: f64 },
    /// Coordinate-wise median of logits (the mean of the two middle values
    /// for an even count).
    Median,
    /// Coordinate-wise trimmed mean of logits: drop the ⌊beta·n⌋ lowest and
    /// highest values of each coordinate and average the rest. `beta` is in
    /// [0, 0.5), so at least one value always remains.
    TrimmedMean { beta: f64 },
}

/// The default is ERA at temperature 0.1: with `density` row weights and
/// the default recipe it was the best teacher measured (docs/results.md,
/// "How the default recipe was chosen").
impl Default for Aggregator {
    fn default() -> Self {
        Aggregator::Era { temperature: 0.1 }
    }
}

/// The aggregated logits a student is distilled towards.
#[derive(Debug, Clone, PartialEq)]
pub struct EnsembleTeacher {
    /// `rows × classes`, row-major.
    pub logits: Vec<f32>,
    pub rows: usize,
    pub classes: usize,
    /// How many logit matrices went into it (under `Weighted`, including any
    /// with zero samples and so zero weight).
    pub contributors: usize,
    /// Rows to distil (`rows` entries): false where no contributor vouched
    /// for the row (all its row weights 0) or the [`TeacherFilter`]
    /// dropped it. Such a row's logits are uniform and must not be used.
    pub kept: Vec<bool>,
}

impl EnsembleTeacher {
    /// Fraction of the kept rows whose largest logit is at their label
    /// (`labels[row]`, one per row); `None` when no row is kept or the
    /// labels do not match the rows.
    pub fn accuracy(&self, labels: &[u8]) -> Option<f64> {
        if labels.len() != self.rows || self.classes == 0 {
            return None;
        }
        let (mut kept, mut right) = (0usize, 0usize);
        for (row, (&label, &keep)) in labels.iter().zip(&self.kept).enumerate() {
            if !keep {
                continue;
            }
            kept += 1;
            let logits = &self.logits[row * self.classes..(row + 1) * self.classes];
            right += usize::from(crate::model::argmax(logits) == usize::from(label));
        }
        (kept > 0).then(|| right as f64 / kept as f64)
    }

    /// Fraction of rows kept for distillation.
    pub fn kept_fraction(&self) -> f64 {
        if self.rows == 0 {
            return 0.0;
        }
        self.kept.iter().filter(|k| **k).count() as f64 / self.rows as f64
    }
}

/// Why contributions could not be aggregated.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum AggregateError {
    #[error("no contributions to aggregate")]
    Empty,
    #[error("contribution {index} has {got} values, expected {expected} (rows × classes)")]
    Shape {
        index: usize,
        expected: usize,
        got: usize,
    },
    #[error("`{what}` has {got} entries, expected {expected}")]
    Length {
        what: &'static str,
        expected: usize,
        got: usize,
    },
    #[error("contribution {index} has a non-finite value at position {position}")]
    NonFinite { index: usize, position: usize },
    #[error("contribution {index} has a row weight outside [0, 1] at row {position}")]
    RowWeight { index: usize, position: usize },
    #[error("weighted aggregation over contributors whose sample counts sum to zero")]
    ZeroWeight,
    #[error("invalid aggregator: {0}")]
    Invalid(String),
}

impl Aggregator {
    /// Checks the parameters: `trimmed-mean` needs `beta` in [0, 0.5) and
    /// `era` a finite `temperature` > 0. The message names the field.
    pub fn validate(&self) -> Result<(), String> {
        match *self {
            Aggregator::Era { temperature } if !(temperature.is_finite() && temperature > 0.0) => {
                Err(format!(
                    "era: `temperature` must be finite and > 0, got {temperature}"
                ))
            }
            Aggregator::TrimmedMean { beta } if !(0.0..0.5).contains(&beta) => Err(format!(
                "trimmed-mean: `beta` must be in [0, 0.5), got {beta}"
            )),
            _ => Ok(()),
        }
    }

    /// Whether row weights change this aggregator's teacher: the
    /// probability-based ones weigh each row's vote by them; `mean`,
    /// `median` and `trimmed-mean` combine raw logits and ignore them.
    pub fn uses_row_weights(self) -> bool {
        matches!(
            self,
            Aggregator::MeanProbabilities | Aggregator::Weighted | Aggregator::Era { .. }
        )
    }

    /// The teacher of `contributions`, every row kept unless no contributor
    /// vouched for it (see [`Self::aggregate_filtered`]).
    pub fn aggregate(
        self,
        contributions: &[Contribution],
        rows: usize,
        classes: usize,
    ) -> Result<EnsembleTeacher, AggregateError> {
        self.aggregate_filtered(contributions, rows, classes, TeacherFilter::default())
    }

    /// The teacher of `contributions`, with rows the ensemble is not sure
    /// of dropped by `filter`. For the probability-based aggregators each
    /// row is Σ_k v_k·w_k,r·p_k,r / Σ_k v_k·w_k,r (v_k: the member's vote,
    /// 1/n or its sample share; w_k,r: its row weight), and the filter
    /// reads that mean before ERA sharpens it; for the logit-based ones it
    /// reads the softmax of the teacher's logits.
    pub fn aggregate_filtered(
        self,
        contributions: &[Contribution],
        rows: usize,
        classes: usize,
        filter: TeacherFilter,
    ) -> Result<EnsembleTeacher, AggregateError> {
        self.validate().map_err(AggregateError::Invalid)?;
        if contributions.is_empty() {
            return Err(AggregateError::Empty);
        }
        let len = rows * classes;
        for (index, c) in contributions.iter().enumerate() {
            if c.logits.len() != len {
                return Err(AggregateError::Shape {
                    index,
                    expected: len,
                    got: c.logits.len(),
                });
            }
            if let Some(position) = c.logits.iter().position(|v| !v.is_finite()) {
                return Err(AggregateError::NonFinite { index, position });
            }
            if let Some(weights) = c.row_weights {
                if weights.len() != rows {
                    return Err(AggregateError::Length {
                        what: "row_weights",
                        expected: rows,
                        got: weights.len(),
                    });
                }
                if let Some(position) = weights.iter().position(|w| !(0.0..=1.0).contains(w)) {
                    return Err(AggregateError::RowWeight { index, position });
                }
            }
        }
        let mut kept = vec![true; rows];
        let logits = match self {
            Aggregator::Mean => mean_logits(contributions, len),
            Aggregator::MeanProbabilities => {
                let n = contributions.len() as f64;
                let probs = mean_probabilities(contributions, classes, |_| 1.0 / n, filter, &mut kept);
                log_floored(probs)
            }
            Aggregator::Weighted => {
                // Sum in u128: u64 counts from peers cannot overflow it.
                let total: u128 = contributions.iter().map(|c| u128::from(c.samples)).sum();
                if total == 0 {
                    return Err(AggregateError::ZeroWeight);
                }
                // Normalise the weights first: with equal counts every weight
                // is exactly fl(1/n), the same as MeanProbabilities'.
                let total = total as f64;
                let probs = mean_probabilities(
                    contributions,
                    classes,
                    |c| c.samples as f64 / total,
                    filter,
                    &mut kept,
                );
                log_floored(probs)
            }
            Aggregator::Era { temperature } => {
                let n = contributions.len() as f64;
                let mut q =
                    mean_probabilities(contributions, classes, |_| 1.0 / n, filter, &mut kept);
                for row in q.chunks_mut(classes) {
                    log_softmax_scaled(row, 1.0 / temperature);
                }
                q.into_iter().map(|l| l as f32).collect()
            }
            Aggregator::Median => coordinate_wise(contributions, len, median),
            Aggregator::TrimmedMean { beta } => {
                let trim = (beta * contributions.len() as f64).floor() as usize;
                coordinate_wise(contributions, len, |values| trimmed_mean(values, trim))
            }
        };
        if !self.uses_row_weights() && !filter.is_off() {
            let mut p = vec![0f64; classes];
            for (row, keep) in logits.chunks(classes).zip(kept.iter_mut()) {
                softmax_into(row, &mut p);
                *keep = filter.keeps(&p);
            }
        }
        Ok(EnsembleTeacher {
            logits,
            rows,
            classes,
            contributors: contributions.len(),
            kept,
        })
    }

    /// Whether this aggregator can run under secure aggregation, where a
    /// member only ever sees the round's sums Σ w and Σ w·p (see
    /// [`fd_protocol::secagg`]): the mean of probabilities and ERA can;
    /// `mean` (of logits, unbounded), `weighted` (the sample counts would
    /// have to be encoded too) and the robust `median` and `trimmed-mean`
    /// (order statistics of individual values, which masking hides) cannot.
    pub fn supports_secure_aggregation(self) -> bool {
        matches!(self, Aggregator::MeanProbabilities | Aggregator::Era { .. })
    }

    /// The teacher from the unmasked sums of a securely aggregated round:
    /// row r is Σ w·p / Σ w, exactly what [`Self::aggregate_filtered`]
    /// computes from the individual contributions (up to the fixed-point
    /// encoding), then filtered and, for ERA, sharpened the same way.
    pub fn aggregate_sums(
        self,
        sums: &KnowledgeSums,
        contributors: usize,
        filter: TeacherFilter,
    ) -> Result<EnsembleTeacher, AggregateError> {
        self.validate().map_err(AggregateError::Invalid)?;
        if !self.supports_secure_aggregation() {
            return Err(AggregateError::Invalid(format!(
                "aggregator {self:?} cannot run on securely aggregated shares (use mean-probabilities or era)"
            )));
        }
        if contributors == 0 {
            return Err(AggregateError::Empty);
        }
        let (rows, classes) = (sums.rows, sums.classes);
        let mut kept = vec![true; rows];
        let mut q = sums.weighted_probabilities.clone();
        for (r, (row, keep)) in q.chunks_mut(classes).zip(kept.iter_mut()).enumerate() {
            let norm = sums.weight[r];
            // The sums are exact integers: 0 means every weight was 0.
            if norm <= 0.0 {
                row.fill(1.0 / classes as f64);
                *keep = false;
                continue;
            }
            for a in row.iter_mut() {
                *a /= norm;
            }
            if !filter.is_off() && !filter.keeps(row) {
                *keep = false;
            }
        }
        let logits = match self {
            Aggregator::Era { temperature } => {
                for row in q.chunks_mut(classes) {
                    log_softmax_scaled(row, 1.0 / temperature);
                }
                q.into_iter().map(|l| l as f32).collect()
            }
            _ => log_floored(q),
        };
        Ok(EnsembleTeacher {
            logits,
            rows,
            classes,
            contributors,
            kept,
        })
    }

    /// The same over a dense `[peers, rows, classes]` stack with a mask of
    /// peers that arrived: peer `i`'s logits are
    /// `stack[i·rows·classes .. (i+1)·rows·classes]` and its sample count is
    /// `samples[i]`; peers whose `mask[i]` is false are left out entirely.
    pub fn aggregate_masked(
        self,
        stack: &[f32],
        samples: &[u64],
        mask: &[bool],
        rows: usize,
        classes: usize,
    ) -> Result<EnsembleTeacher, AggregateError> {
        let peers = mask.len();
        let len = rows * classes;
        if samples.len() != peers {
            return Err(AggregateError::Length {
                what: "samples",
                expected: peers,
                got: samples.len(),
            });
        }
        if stack.len() != peers * len {
            return Err(AggregateError::Length {
                what: "stack",
                expected: peers * len,
                got: stack.len(),
            });
        }
        let contributions: Vec<Contribution> = mask
            .iter()
            .zip(samples)
            .enumerate()
            .filter(|(_, (arrived, _))| **arrived)
            .map(|(i, (_, &samples))| Contribution {
                logits: &stack[i * len..(i + 1) * len],
                samples,
                row_weights: None,
            })
            .collect();
        self.aggregate(&contributions, rows, classes)
    }
}

/// Element-wise mean of logits, accumulated in f64 so the result does not
/// depend on the order of contributions beyond the last bit of f32.
fn mean_logits(contributions: &[Contribution], len: usize) -> Vec<f32> {
    let mut sum = vec![0f64; len];
    for c in contributions {
        for (s, v) in sum.iter_mut().zip(c.logits) {
            *s += f64::from(*v);
        }
    }
    let n = contributions.len() as f64;
    sum.into_iter().map(|s| (s / n) as f32).collect()
}

/// Σ vote(c) · softmax(c's row), row by row, in f64: the mean of the
/// contributors' probabilities under `vote`. With row weights, row r is
/// Σ vote·w_r·p_r / Σ vote·w_r instead; a row nobody vouches for (the sum of
/// its weights is 0) becomes uniform and is marked not kept. Rows the
/// `filter` rejects are marked not kept too.
fn mean_probabilities(
    contributions: &[Contribution],
    classes: usize,
    vote: impl Fn(&Contribution) -> f64,
    filter: TeacherFilter,
    kept: &mut [bool],
) -> Vec<f64> {
    let len = contributions.first().map_or(0, |c| c.logits.len());
    let mut acc = vec![0f64; len];
    let mut probs = vec![0f64; classes];
    let weighted = contributions.iter().any(|c| c.row_weights.is_some());
    let mut norm = vec![0f64; if weighted { kept.len() } else { 0 }];
    for c in contributions {
        let v = vote(c);
        if v == 0.0 {
            continue;
        }
        for (r, (row, acc)) in c.logits.chunks(classes).zip(acc.chunks_mut(classes)).enumerate() {
            let w = match c.row_weights {
                Some(weights) => v * f64::from(weights[r]),
                None => v,
            };
            if weighted {
                norm[r] += w;
            }
            if w == 0.0 {
                continue;
            }
            softmax_into(row, &mut probs);
            for (a, p) in acc.iter_mut().zip(&probs) {
                *a += w * p;
            }
        }
    }
    for (r, (row, keep)) in acc.chunks_mut(classes).zip(kept.iter_mut()).enumerate() {
        if weighted {
            if norm[r] <= 0.0 {
                row.fill(1.0 / classes as f64);
                *keep = false;
                continue;
            }
            for a in row.iter_mut() {
                *a /= norm[r];
            }
        }
        if !filter.is_off() && !filter.keeps(row) {
            *keep = false;
        }
    }
    acc
}

/// Teacher logits from probabilities. The floor keeps ln finite for classes
/// no contributor gives any mass.
fn log_floored(probs: Vec<f64>) -> Vec<f32> {
    probs
        .into_iter()
        .map(|p| p.max(1e-12).ln() as f32)
        .collect()
}

/// Replaces `row` by `ln softmax(row · scale)`. Computed as a log-softmax
/// rather than the log of a softmax, so a sharp distribution keeps exact
/// logits instead of hitting a probability floor.
fn log_softmax_scaled(row: &mut [f64], scale: f64) {
    let max = row.iter().fold(f64::NEG_INFINITY, |m, v| m.max(v * scale));
    let log_total = row
        .iter()
        .map(|v| (v * scale - max).exp())
        .sum::<f64>()
        .ln();
    for v in row.iter_mut() {
        *v = *v * scale - max - log_total;
    }
}

/// Applies `reduce` to each coordinate's values across contributors, through
/// one reused buffer of `n` values (`reduce` may reorder it).
fn coordinate_wise(
    contributions: &[Contribution],
    len: usize,
    mut reduce: impl FnMut(&mut [f32]) -> f64,
) -> Vec<f32> {
    let mut values = vec![0f32; contributions.len()];
    (0..len)
        .map(|j| {
            for (v, c) in values.iter_mut().zip(contributions) {
                *v = c.logits[j];
            }
            reduce(&mut values) as f32
        })
        .collect()
}

fn by_value(a: &f32, b: &f32) -> Ordering {
    a.total_cmp(b)
}

/// Median of a non-empty slice; for an even count the mean of the two middle
/// values. Selection, not a sort: O(n).
fn median(values: &mut [f32]) -> f64 {
    let n = values.len();
    let mid = n / 2;
    let (lower, upper, _) = values.select_nth_unstable_by(mid, by_value);
    let upper = f64::from(*upper);
    if n % 2 == 1 {
        return upper;
    }
    // The lower middle value is the largest of the lower half.
    let lower = lower.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    (f64::from(lower) + upper) / 2.0
}

/// Mean of a slice after dropping its `trim` lowest and `trim` highest values
/// (2·trim < len). Two selections, O(n).
fn trimmed_mean(values: &mut [f32], trim: usize) -> f64 {
    let kept = if trim == 0 {
        &values[..]
    } else {
        // Move the `trim` lowest to the front, then, among the rest, the
        // `trim` highest to the back.
        values.select_nth_unstable_by(trim, by_value);
        let rest = &mut values[trim..];
        let keep = rest.len() - trim;
        rest.select_nth_unstable_by(keep - 1, by_value);
        &rest[..keep]
    };
    kept.iter().map(|v| f64::from(*v)).sum::<f64>() / kept.len() as f64
}

/// Each row's softmax, as f32: what a member encodes for secure
/// aggregation (the same softmax the probability-based aggregators apply).
pub fn probabilities(logits: &[f32], classes: usize) -> Vec<f32> {
    let mut p = vec![0f64; classes];
    let mut out = Vec::with_capacity(logits.len());
    for row in logits.chunks(classes) {
        softmax_into(row, &mut p);
        out.extend(p.iter().map(|v| *v as f32));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn the_filter_drops_unsure_and_spread_rows() {
        let filter = TeacherFilter {
            min_confidence: 0.5,
            max_entropy: 0.0,
        };
        assert!(filter.keeps(&[0.6, 0.4]));
        assert!(!filter.keeps(&[0.4, 0.3, 0.3]));
        let filter = TeacherFilter {
            min_confidence: 0.0,
            max_entropy: 0.5,
        };
        assert!(filter.keeps(&[0.95, 0.05]));
        assert!(!filter.keeps(&[0.5, 0.5]));
        assert!(TeacherFilter::default().keeps(&[0.1; 10]));
    }

    /// Contributions with one sample each.
    fn each<'a>(logits: &[&'a [f32]]) -> Vec<Contribution<'a>> {
        logits
            .iter()
            .map(|l| Contribution::new(l, 1))
            .collect()
    }

    fn softmax(row: &[f32]) -> Vec<f64> {
        let mut p = vec![0.0; row.len()];
        softmax_into(row, &mut p);
        p
    }

    const EVERY: [Aggregator; 7] = [
        Aggregator::Mean,
        Aggregator::MeanProbabilities,
        Aggregator::Weighted,
        Aggregator::Era { temperature: 0.5 },
        Aggregator::Median,
        Aggregator::TrimmedMean { beta: 0.0 },
        Aggregator::TrimmedMean { beta: 0.3 },
    ];

    /// Two members on two rows of 3 classes: A knows row 0 (class 0), B
    /// knows row 1 (class 2); each answers the other's row wrongly and
    /// confidently.
    fn vouched() -> ([f32; 6], [f32; 6]) {
        ([9.0, 0.0, 0.0, 9.0, 0.0, 0.0], [0.0, 9.0, 0.0, 0.0, 0.0, 9.0])
    }

    #[test]
    fn row_weights_leave_only_the_members_who_know_a_row_in_it() {
        let (a, b) = vouched();
        let (wa, wb) = ([1.0, 0.0], [0.0, 1.0]);
        let weighted = [
            Contribution { logits: &a, samples: 1, row_weights: Some(&wa) },
            Contribution { logits: &b, samples: 1, row_weights: Some(&wb) },
        ];
        for aggregator in [
            Aggregator::MeanProbabilities,
            Aggregator::Weighted,
            Aggregator::Era { temperature: 0.5 },
        ] {
            let t = aggregator.aggregate(&weighted, 2, 3).unwrap();
            assert_eq!(t.kept, vec![true, true]);
            let rows: Vec<usize> = t.logits.chunks(3).map(crate::model::argmax).collect();
            assert_eq!(rows, vec![0, 2], "{aggregator:?}");
            // Row 0 is A's answer alone: B's wrong, confident vote is gone.
            let p0 = softmax(&t.logits[..3]);
            let a0 = softmax(&a[..3]);
            if aggregator != (Aggregator::Era { temperature: 0.5 }) {
                assert!((p0[0] - a0[0]).abs() < 1e-6, "{aggregator:?}: {p0:?} vs {a0:?}");
            }
            // Without weights the same rows are a tie between the two answers.
            let plain = aggregator.aggregate(&each(&[&a, &b]), 2, 3).unwrap();
            let p = softmax(&plain.logits[..3]);
            assert!((p[0] - p[1]).abs() < 1e-6, "{aggregator:?}: {p:?}");
        }
    }

    #[test]
    fn a_row_nobody_vouches_for_is_not_kept() {
        let (a, b) = vouched();
        let (wa, wb) = ([1.0, 0.0], [0.0, 0.0]);
        let t = Aggregator::MeanProbabilities
            .aggregate(
                &[
                    Contribution { logits: &a, samples: 1, row_weights: Some(&wa) },
                    Contribution { logits: &b, samples: 1, row_weights: Some(&wb) },
                ],
                2,
                3,
            )
            .unwrap();
        assert_eq!(t.kept, vec![true, false]);
        assert_eq!(t.kept_fraction(), 0.5);
        assert!(t.logits.iter().all(|l| l.is_finite()));
    }

    #[test]
    fn teacher_accuracy_counts_kept_rows_whose_argmax_is_the_label() {
        let teacher = EnsembleTeacher {
            logits: vec![
                2.0, 0.0, 0.0, // row 0: class 0
                0.0, 3.0, 1.0, // row 1: class 1
                0.0, 0.0, 5.0, // row 2: class 2, not kept
                1.0, 0.0, 4.0, // row 3: class 2
            ],
            rows: 4,
            classes: 3,
            contributors: 2,
            kept: vec![true, true, false, true],
        };
        // Right on rows 0 and 3, wrong on row 1; row 2 (wrong) is not kept.
        assert_eq!(teacher.accuracy(&[0, 2, 1, 2]), Some(2.0 / 3.0));
        assert_eq!(teacher.accuracy(&[0, 1, 2]), None, "labels must match the rows");
        let none_kept = EnsembleTeacher { kept: vec![false; 4], ..teacher };
        assert_eq!(none_kept.accuracy(&[0, 1, 2, 2]), None);
    }

    #[test]
    fn logit_aggregators_ignore_row_weights() {
        let (a, b) = vouched();
        let (wa, wb) = ([1.0, 0.0], [0.0, 1.0]);
        let weighted = [
            Contribution { logits: &a, samples: 1, row_weights: Some(&wa) },
            Contribution { logits: &b, samples: 1, row_weights: Some(&wb) },
        ];
        for aggregator in [Aggregator::Mean, Aggregator::Median, Aggregator::TrimmedMean { beta: 0.0 }] {
            assert!(!aggregator.uses_row_weights());
            let with = aggregator.aggregate(&weighted, 2, 3).unwrap();
            let without = aggregator.aggregate(&each(&[&a, &b]), 2, 3).unwrap();
            assert_eq!(with, without, "{aggregator:?}");
        }
    }

    #[test]
    fn bad_row_weights_are_refused() {
        let (a, _) = vouched();
        let short = [1.0];
        let Err(AggregateError::Length { what: "row_weights", .. }) = Aggregator::MeanProbabilities
            .aggregate(&[Contribution { logits: &a, samples: 1, row_weights: Some(&short) }], 2, 3)
        else {
            panic!("a short weight vector must be refused");
        };
        let wild = [0.5, 1.5];
        assert_eq!(
            Aggregator::MeanProbabilities
                .aggregate(&[Contribution { logits: &a, samples: 1, row_weights: Some(&wild) }], 2, 3)
                .unwrap_err(),
            AggregateError::RowWeight { index: 0, position: 1 }
        );
    }

    #[test]
    fn the_filter_drops_rows_the_ensemble_is_not_sure_of() {
        // Row 0: both agree on class 0; row 1: they disagree (0.5 / 0.5).
        let a = [9.0, 0.0, 0.0, 9.0, 0.0, 0.0];
        let b = [9.0, 0.0, 0.0, 0.0, 9.0, 0.0];
        let filter = TeacherFilter { min_confidence: 0.8, max_entropy: 0.0 };
        for aggregator in EVERY {
            let t = aggregator
                .aggregate_filtered(&each(&[&a, &b]), 2, 3, filter)
                .unwrap();
            // ERA filters before it sharpens; with two members, median
            // and trimmed mean are the mean of logits, [4.5, 4.5, 0] in row 1.
            assert_eq!(t.kept, vec![true, false], "{aggregator:?}");
            let unfiltered = aggregator.aggregate(&each(&[&a, &b]), 2, 3).unwrap();
            assert_eq!(unfiltered.kept, vec![true, true]);
            assert_eq!(unfiltered.logits, t.logits, "the filter only marks rows");
        }
    }

    #[test]
    fn mean_of_probabilities_bounds_each_vote() {
        // Row 0: contributor A is sure of class 0 (logit 50), B mildly prefers class 1.
        let a = [50.0, 0.0, 0.0];
        let b = [0.0, 2.0, 0.0];
        let by_logits = Aggregator::Mean.aggregate(&each(&[&a, &b]), 1, 3).unwrap();
        let by_probs = Aggregator::MeanProbabilities
            .aggregate(&each(&[&a, &b]), 1, 3)
            .unwrap();
        let p: Vec<f64> = by_probs.logits.iter().map(|l| (*l as f64).exp()).collect();
        assert!(
            (p.iter().sum::<f64>() - 1.0).abs() < 1e-5,
            "teacher is a distribution: {p:?}"
        );
        // A's certainty adds at most 1/2 to class 0; the rest is B's softmax.
        let b0 = 1.0 / (2.0 + 2f64.exp());
        assert!((p[0] - (1.0 + b0) / 2.0).abs() < 1e-5, "{p:?}");
        assert!(p[1] > 0.35, "B's preference survives: {p:?}");
        // Averaging logits lets A's magnitude swamp B entirely.
        assert!(by_logits.logits[0] - by_logits.logits[1] > 20.0);
        let same = Aggregator::MeanProbabilities
            .aggregate(&each(&[&b, &b]), 1, 3)
            .unwrap();
        let single = Aggregator::MeanProbabilities
            .aggregate(&each(&[&b]), 1, 3)
            .unwrap();
        assert_eq!(same.logits, single.logits);
    }

    #[test]
    fn mean_of_contributions() {
        let a = [1.0, 2.0, 3.0, 4.0];
        let b = [3.0, 2.0, 1.0, 0.0];
        let t = Aggregator::Mean.aggregate(&each(&[&a, &b]), 2, 2).unwrap();
        assert_eq!(t.logits, vec![2.0, 2.0, 2.0, 2.0]);
        assert_eq!(t.contributors, 2);
        let same = Aggregator::Mean
            .aggregate(&each(&[&a, &a, &a]), 2, 2)
            .unwrap();
        assert_eq!(same.logits, a.to_vec());
        let swapped = Aggregator::Mean.aggregate(&each(&[&b, &a]), 2, 2).unwrap();
        assert_eq!(swapped.logits, t.logits);
    }

    #[test]
    fn shape_and_empty_errors() {
        for aggregator in EVERY {
            assert_eq!(aggregator.aggregate(&[], 1, 1), Err(AggregateError::Empty));
            let a = [1.0, 2.0];
            let b = [1.0, 2.0, 3.0, 4.0];
            assert!(matches!(
                aggregator.aggregate(&each(&[&b, &a]), 2, 2),
                Err(AggregateError::Shape {
                    index: 1,
                    expected: 4,
                    got: 2
                })
            ));
            let nan = [1.0, f32::NAN, 0.0, 0.0];
            assert_eq!(
                aggregator.aggregate(&each(&[&b, &nan]), 2, 2),
                Err(AggregateError::NonFinite {
                    index: 1,
                    position: 1
                })
            );
        }
    }

    #[test]
    fn weighted_follows_sample_counts() {
        let a = [4.0, 0.0];
        let b = [0.0, 4.0];
        let both = |sa, sb| {
            Aggregator::Weighted
                .aggregate(
                    &[
                        Contribution {
                            logits: &a,
                            samples: sa,
                            row_weights: None,
                        },
                        Contribution {
                            logits: &b,
                            samples: sb,
                            row_weights: None,
                        },
                    ],
                    1,
                    2,
                )
                .map(|t| t.logits)
        };
        let (pa, pb) = (softmax(&a), softmax(&b));
        let p: Vec<f64> = both(300, 100)
            .unwrap()
            .iter()
            .map(|l| f64::from(*l).exp())
            .collect();
        for c in 0..2 {
            assert!((p[c] - (0.75 * pa[c] + 0.25 * pb[c])).abs() < 1e-6, "{p:?}");
        }
        // No samples, no vote; nobody with samples, no teacher.
        assert_eq!(
            both(7, 0).unwrap(),
            Aggregator::MeanProbabilities
                .aggregate(&each(&[&a]), 1, 2)
                .unwrap()
                .logits
        );
        assert_eq!(both(0, 0), Err(AggregateError::ZeroWeight));
        // Counts near u64::MAX neither overflow nor lose the proportion.
        let huge = both(u64::MAX, u64::MAX).unwrap();
        let half = both(1, 1).unwrap();
        assert_eq!(huge, half);
    }

    #[test]
    fn era_sharpens_the_mean_distribution() {
        let a = [2.0, 1.0, 0.0];
        let b = [0.0, 1.5, 0.5];
        let c = each(&[&a, &b]);
        let mean = Aggregator::MeanProbabilities.aggregate(&c, 1, 3).unwrap();
        let era = Aggregator::Era { temperature: 0.25 }
            .aggregate(&c, 1, 3)
            .unwrap();
        // By hand: q = mean softmax, teacher = softmax(q / T).
        let (pa, pb) = (softmax(&a), softmax(&b));
        let q: Vec<f64> = pa.iter().zip(&pb).map(|(x, y)| (x + y) / 2.0).collect();
        let z: f64 = q.iter().map(|v| (v / 0.25).exp()).sum();
        for (got, q) in era.logits.iter().zip(&q) {
            let want = ((q / 0.25).exp() / z).ln();
            assert!((f64::from(*got) - want).abs() < 1e-6, "{era:?}");
        }
        let entropy = |logits: &[f32]| -> f64 { softmax(logits).iter().map(|p| -p * p.ln()).sum() };
        assert!(entropy(&era.logits) < entropy(&mean.logits));
        // A high temperature flattens instead, towards uniform.
        let flat = Aggregator::Era { temperature: 1e6 }
            .aggregate(&c, 1, 3)
            .unwrap();
        for p in softmax(&flat.logits) {
            assert!((p - 1.0 / 3.0).abs() < 1e-6);
        }
        // A tiny temperature stays finite: log-softmax, no probability floor.
        let sharp = Aggregator::Era { temperature: 1e-6 }
            .aggregate(&c, 1, 3)
            .unwrap();
        assert!(sharp.logits.iter().all(|l| l.is_finite()));
        assert!(sharp.logits.iter().any(|l| *l < -1e3), "{sharp:?}");
    }

    #[test]
    fn median_and_trimmed_mean_values() {
        let cols = |values: &[f32]| -> Vec<[f32; 1]> { values.iter().map(|v| [*v]).collect() };
        let run = |aggregator: Aggregator, values: &[f32]| -> f32 {
            let rows = cols(values);
            let refs: Vec<&[f32]> = rows.iter().map(|r| r.as_slice()).collect();
            aggregator.aggregate(&each(&refs), 1, 1).unwrap().logits[0]
        };
        assert_eq!(run(Aggregator::Median, &[5.0, 1.0, 3.0]), 3.0);
        assert_eq!(run(Aggregator::Median, &[100.0, 1.0, 3.0, 2.0]), 2.5);
        assert_eq!(run(Aggregator::Median, &[-7.0]), -7.0);
        // n = 4, beta 0.25: drop one from each end.
        let trimmed = |beta| Aggregator::TrimmedMean { beta };
        assert_eq!(run(trimmed(0.25), &[100.0, 1.0, 3.0, 2.0]), 2.5);
        // beta 0.2 of 4 rounds down to no trimming: the plain mean.
        assert_eq!(run(trimmed(0.2), &[100.0, 1.0, 3.0, 2.0]), 26.5);
        // n = 5, beta 0.49: two from each end leave the median.
        assert_eq!(run(trimmed(0.49), &[9.0, -50.0, 4.0, 50.0, 1.0]), 4.0);
        assert_eq!(run(trimmed(0.4), &[9.0, -50.0, 4.0, 50.0, 1.0, 0.0]), 2.5);
    }

    #[test]
    fn parameters_are_validated_and_name_the_field() {
        for beta in [0.5, -0.1, 1.0, f64::NAN, f64::INFINITY] {
            let a = Aggregator::TrimmedMean { beta };
            let e = a.validate().unwrap_err();
            assert!(e.contains("beta"), "{e}");
            assert!(matches!(
                a.aggregate(&each(&[&[0.0]]), 1, 1),
                Err(AggregateError::Invalid(m)) if m == e
            ));
        }
        for temperature in [0.0, -1.0, f64::NAN, f64::INFINITY] {
            let e = Aggregator::Era { temperature }.validate().unwrap_err();
            assert!(e.contains("temperature"), "{e}");
        }
        for ok in EVERY {
            ok.validate().unwrap();
        }
        Aggregator::TrimmedMean { beta: 0.499 }.validate().unwrap();
    }

    #[test]
    fn masked_stack_leaves_out_absent_peers() {
        // 3 peers × 1 row × 2 classes.
        let stack = [1.0, 2.0, 50.0, 60.0, 3.0, 0.0];
        let samples = [1, 9, 3];
        for aggregator in EVERY {
            let masked = aggregator
                .aggregate_masked(&stack, &samples, &[true, false, true], 1, 2)
                .unwrap();
            let direct = aggregator
                .aggregate(
                    &[
                        Contribution {
                            logits: &stack[0..2],
                            samples: 1,
                            row_weights: None,
                        },
                        Contribution {
                            logits: &stack[4..6],
                            samples: 3,
                            row_weights: None,
                        },
                    ],
                    1,
                    2,
                )
                .unwrap();
            assert_eq!(masked, direct, "{aggregator:?}");
            assert_eq!(masked.contributors, 2);
            assert_eq!(
                aggregator.aggregate_masked(&stack, &samples, &[false; 3], 1, 2),
                Err(AggregateError::Empty)
            );
        }
        assert_eq!(
            Aggregator::Mean.aggregate_masked(&stack, &samples[..2], &[true; 3], 1, 2),
            Err(AggregateError::Length {
                what: "samples",
                expected: 3,
                got: 2
            })
        );
        assert_eq!(
            Aggregator::Mean.aggregate_masked(&stack[..5], &samples, &[true; 3], 1, 2),
            Err(AggregateError::Length {
                what: "stack",
                expected: 6,
                got: 5
            })
        );
    }

    #[test]
    fn toml_forms() {
        #[derive(Debug, PartialEq, Serialize, Deserialize)]
        struct Config {
            aggregator: Aggregator,
        }
        let cases = [
            (r#"aggregator = "mean""#, Aggregator::Mean),
            (
                r#"aggregator = "mean-probabilities""#,
                Aggregator::MeanProbabilities,
            ),
            (r#"aggregator = "weighted""#, Aggregator::Weighted),
            (r#"aggregator = "median""#, Aggregator::Median),
            (
                "aggregator = { trimmed-mean = { beta = 0.2 } }",
                Aggregator::TrimmedMean { beta: 0.2 },
            ),
            (
                "aggregator = { era = { temperature = 0.1 } }",
                Aggregator::Era { temperature: 0.1 },
            ),
        ];
        for (text, aggregator) in cases {
            let parsed: Config = toml::from_str(text).unwrap();
            assert_eq!(parsed.aggregator, aggregator, "{text}");
            let back: Config = toml::from_str(&toml::to_string(&parsed).unwrap()).unwrap();
            assert_eq!(back, parsed);
        }
        assert!(toml::from_str::<Config>(r#"aggregator = "trimmed-mean""#).is_err());
        assert_eq!(Aggregator::default(), Aggregator::Era { temperature: 0.1 });
    }

    /// `n` contributions of `rows × classes` logits in [-20, 20], with sample counts.
    fn contributions(
        n: std::ops::Range<usize>,
    ) -> impl Strategy<Value = (usize, usize, Vec<(Vec<f32>, u64)>)> {
        (1usize..4, 1usize..5).prop_flat_map(move |(rows, classes)| {
            (
                Just(rows),
                Just(classes),
                proptest::collection::vec(
                    (
                        proptest::collection::vec(-20f32..20.0, rows * classes),
                        1u64..1000,
                    ),
                    n.clone(),
                ),
            )
        })
    }

    fn borrow(owned: &[(Vec<f32>, u64)]) -> Vec<Contribution<'_>> {
        owned
            .iter()
            .map(|(logits, samples)| Contribution::new(logits, *samples))
            .collect()
    }

    fn close(a: &[f32], b: &[f32], tolerance: f32) -> bool {
        a.len() == b.len()
            && a.iter()
                .zip(b)
                .all(|(x, y)| (x - y).abs() <= tolerance * x.abs().max(1.0))
    }

    fn any_aggregator() -> impl Strategy<Value = Aggregator> {
        prop_oneof![
            Just(Aggregator::Mean),
            Just(Aggregator::MeanProbabilities),
            Just(Aggregator::Weighted),
            (0.05f64..4.0).prop_map(|temperature| Aggregator::Era { temperature }),
            Just(Aggregator::Median),
            (0f64..0.5).prop_map(|beta| Aggregator::TrimmedMean { beta }),
        ]
    }

    proptest! {
        #[test]
        fn every_aggregator_is_permutation_invariant(
            (rows, classes, owned) in contributions(1..8),
            aggregator in any_aggregator(),
            keys in proptest::collection::vec(any::<u32>(), 8),
        ) {
            let original = borrow(&owned);
            // A random permutation: indices ordered by random keys.
            let mut order: Vec<usize> = (0..original.len()).collect();
            order.sort_by_key(|&i| (keys[i], i));
            let shuffled: Vec<Contribution> = order.iter().map(|&i| original[i]).collect();
            let a = aggregator.aggregate(&original, rows, classes).unwrap();
            let b = aggregator.aggregate(&shuffled, rows, classes).unwrap();
            prop_assert!(close(&a.logits, &b.logits, 1e-6), "{:?}: {:?} vs {:?}", aggregator, a.logits, b.logits);
        }

        #[test]
        fn identical_inputs_give_that_input_back(
            (rows, classes, owned) in contributions(1..2),
            copies in 1usize..8,
            aggregator in any_aggregator(),
        ) {
            let x = &owned[0].0;
            let same = vec![Contribution::new(x, owned[0].1); copies];
            let t = aggregator.aggregate(&same, rows, classes).unwrap();
            match aggregator {
                Aggregator::Mean | Aggregator::Median | Aggregator::TrimmedMean { .. } => {
                    prop_assert!(close(&t.logits, x, 1e-6), "{:?} vs {:?}", t.logits, x);
                }
                Aggregator::MeanProbabilities | Aggregator::Weighted => {
                    for (got, want) in t.logits.chunks(classes).zip(x.chunks(classes)) {
                        for (p, q) in softmax(got).iter().zip(softmax(want)) {
                            prop_assert!((p - q).abs() <= 1e-6, "{} vs {}", p, q);
                        }
                    }
                }
                Aggregator::Era { .. } => {
                    // ERA reshapes even a unanimous distribution, so the fixed
                    // point is: n copies teach what one copy teaches.
                    let one = aggregator.aggregate(&same[..1], rows, classes).unwrap();
                    prop_assert!(close(&t.logits, &one.logits, 1e-5), "{:?} vs {:?}", t.logits, one.logits);
                }
            }
        }

        #[test]
        fn robust_aggregators_stay_within_the_honest_range(
            (rows, classes, owned) in contributions(2..8),
            adversary in proptest::collection::vec(
                prop_oneof![Just(f32::MAX), Just(-f32::MAX), -1e30f32..1e30, -1e6f32..1e6],
                1..=12,
            ),
            at in any::<prop::sample::Index>(),
            trim_fraction in 0f64..1.0,
        ) {
            let len = rows * classes;
            let adversary: Vec<f32> = adversary.iter().cycle().take(len).copied().collect();
            let mut all = borrow(&owned);
            all.insert(at.index(all.len() + 1), Contribution::new(&adversary, u64::MAX));
            let n = all.len();
            // The smallest beta that trims at least one from each end, up to 0.5.
            let low = (1.0 / n as f64) * (1.0 + 1e-9);
            let beta = low + trim_fraction * (0.5 - low) * 0.999;
            prop_assume!(beta < 0.5);
            for aggregator in [Aggregator::Median, Aggregator::TrimmedMean { beta }] {
                let t = aggregator.aggregate(&all, rows, classes).unwrap();
                for (j, v) in t.logits.iter().enumerate() {
                    let honest = owned.iter().map(|(l, _)| l[j]);
                    let lo = honest.clone().fold(f32::INFINITY, f32::min);
                    let hi = honest.fold(f32::NEG_INFINITY, f32::max);
                    prop_assert!(lo <= *v && *v <= hi, "{:?} coordinate {}: {} outside [{}, {}]", aggregator, j, v, lo, hi);
                }
            }
        }

        #[test]
        fn weighted_with_equal_counts_is_mean_probabilities(
            (rows, classes, owned) in contributions(1..8),
            count in 1u64..1_000_000,
        ) {
            let equal: Vec<Contribution> = owned
                .iter()
                .map(|(logits, _)| Contribution::new(logits, count))
                .collect();
            prop_assert_eq!(
                Aggregator::Weighted.aggregate(&equal, rows, classes).unwrap(),
                Aggregator::MeanProbabilities.aggregate(&equal, rows, classes).unwrap()
            );
        }

        #[test]
        fn selection_matches_sorting(
            mut values in proptest::collection::vec(-1e3f32..1e3, 1..40),
            trim_fraction in 0f64..1.0,
        ) {
            let n = values.len();
            let trim = ((n - 1) / 2).min((trim_fraction * n as f64) as usize);
            let mut sorted = values.clone();
            sorted.sort_by(f32::total_cmp);
            let want_median = if n % 2 == 1 {
                f64::from(sorted[n / 2])
            } else {
                (f64::from(sorted[n / 2 - 1]) + f64::from(sorted[n / 2])) / 2.0
            };
            let kept = &sorted[trim..n - trim];
            let want_trimmed = kept.iter().map(|v| f64::from(*v)).sum::<f64>() / kept.len() as f64;
            prop_assert_eq!(median(&mut values), want_median);
            let got = trimmed_mean(&mut values, trim);
            prop_assert!((got - want_trimmed).abs() <= 1e-9 * want_trimmed.abs().max(1.0), "{} vs {}", got, want_trimmed);
        }
    }

    #[test]
    fn teacher_from_secure_sums_matches_the_plain_teacher() {
        use fd_protocol::secagg::{KnowledgeSums, encode_knowledge};
        let (rows, classes, members) = (50, 10, 7);
        let mut state = 12345u64;
        let mut next = || {
            state = state.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            ((state >> 33) as f64 / (1u64 << 31) as f64) as f32
        };
        let logits: Vec<Vec<f32>> = (0..members)
            .map(|_| (0..rows * classes).map(|_| next() * 12.0 - 6.0).collect())
            .collect();
        // Quantised row weights as shares carry them; some rows unvouched.
        let weights: Vec<Vec<f32>> = (0..members)
            .map(|m| {
                (0..rows)
                    .map(|r| if r < 3 { 0.0 } else { ((next() * 255.0).round() / 255.0).max(if m == 0 { 0.2 } else { 0.0 }) })
                    .collect()
            })
            .collect();
        for weighted in [false, true] {
            let contributions: Vec<Contribution> = logits
                .iter()
                .zip(&weights)
                .map(|(l, w)| Contribution {
                    logits: l,
                    samples: 1,
                    row_weights: weighted.then_some(&w[..]),
                })
                .collect();
            let mut sum = vec![0u32; rows * (classes + 1)];
            for c in &contributions {
                let encoded =
                    encode_knowledge(&probabilities(c.logits, classes), c.row_weights, classes).unwrap();
                for (s, v) in sum.iter_mut().zip(encoded) {
                    *s = s.wrapping_add(v);
                }
            }
            let sums = KnowledgeSums::decode(&sum, classes).unwrap();
            for aggregator in [Aggregator::MeanProbabilities, Aggregator::Era { temperature: 0.1 }] {
                let plain = aggregator.aggregate(&contributions, rows, classes).unwrap();
                let secure = aggregator
                    .aggregate_sums(&sums, members, TeacherFilter::default())
                    .unwrap();
                assert_eq!(plain.kept, secure.kept, "{aggregator:?} weighted {weighted}");
                let mut worst = 0f64;
                for ((a, b), kept) in plain
                    .logits
                    .chunks(classes)
                    .zip(secure.logits.chunks(classes))
                    .zip(&plain.kept)
                {
                    if !kept {
                        continue;
                    }
                    let (pa, pb) = (softmax(a), softmax(b));
                    for (x, y) in pa.iter().zip(&pb) {
                        worst = worst.max((x - y).abs());
                    }
                }
                // Fixed point: each value within 2^-21, the mean within a
                // few steps; ERA at T = 0.1 amplifies differences tenfold.
                assert!(worst < 1e-4, "{aggregator:?} weighted {weighted}: max |Δp| {worst}");
            }
        }
        let Err(AggregateError::Invalid(m)) =
            Aggregator::Median.aggregate_sums(&KnowledgeSums::decode(&[0; 11], 10).unwrap(), 2, TeacherFilter::default())
        else {
            panic!("median must refuse masked sums");
        };
        assert!(m.contains("securely aggregated"), "{m}");
    }
}

//! Aggregating peers' logits into the ensemble teacher.
//!
//! Input is a set of `rows × classes` logit matrices on the same public
//! subset (the node's own and every accepted peer share); output is one
//! matrix the student is distilled towards. Only shares that passed
//! [`fd_protocol::LogitShare::validate`] ever get here.

use serde::{Deserialize, Serialize};

/// How the teacher is formed from the contributors' logits.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
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
    #[default]
    MeanProbabilities,
}

/// The aggregated logits a student is distilled towards.
#[derive(Debug, Clone, PartialEq)]
pub struct EnsembleTeacher {
    /// `rows × classes`, row-major.
    pub logits: Vec<f32>,
    pub rows: usize,
    pub classes: usize,
    /// How many logit matrices went into it.
    pub contributors: usize,
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
}

impl Aggregator {
    pub fn aggregate(
        self,
        contributions: &[&[f32]],
        rows: usize,
        classes: usize,
    ) -> Result<EnsembleTeacher, AggregateError> {
        if contributions.is_empty() {
            return Err(AggregateError::Empty);
        }
        let len = rows * classes;
        for (index, c) in contributions.iter().enumerate() {
            if c.len() != len {
                return Err(AggregateError::Shape {
                    index,
                    expected: len,
                    got: c.len(),
                });
            }
        }
        let logits = match self {
            Aggregator::Mean => {
                // Accumulate in f64 so the mean does not depend on the order
                // of contributions beyond the last bit of f32.
                let mut sum = vec![0f64; len];
                for c in contributions {
                    for (s, v) in sum.iter_mut().zip(c.iter()) {
                        *s += f64::from(*v);
                    }
                }
                let n = contributions.len() as f64;
                sum.into_iter().map(|s| (s / n) as f32).collect()
            }
            Aggregator::MeanProbabilities => {
                let mut sum = vec![0f64; len];
                let mut probs = vec![0f64; classes];
                for c in contributions {
                    for (row, acc) in c.chunks(classes).zip(sum.chunks_mut(classes)) {
                        softmax_into(row, &mut probs);
                        for (a, p) in acc.iter_mut().zip(&probs) {
                            *a += p;
                        }
                    }
                }
                let n = contributions.len() as f64;
                // Floor keeps ln finite for classes no contributor gives any mass.
                sum.into_iter()
                    .map(|s| (s / n).max(1e-12).ln() as f32)
                    .collect()
            }
        };
        Ok(EnsembleTeacher {
            logits,
            rows,
            classes,
            contributors: contributions.len(),
        })
    }
}

/// Numerically stable softmax of one row, in f64.
fn softmax_into(row: &[f32], out: &mut [f64]) {
    let max = row.iter().fold(f32::NEG_INFINITY, |m, v| m.max(*v)) as f64;
    let mut total = 0.0;
    for (o, v) in out.iter_mut().zip(row) {
        *o = (*v as f64 - max).exp();
        total += *o;
    }
    for o in out.iter_mut() {
        *o /= total;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mean_of_probabilities_bounds_each_vote() {
        // Row 0: contributor A is sure of class 0 (logit 50), B mildly prefers class 1.
        let a = [50.0, 0.0, 0.0];
        let b = [0.0, 2.0, 0.0];
        let by_logits = Aggregator::Mean.aggregate(&[&a, &b], 1, 3).unwrap();
        let by_probs = Aggregator::MeanProbabilities
            .aggregate(&[&a, &b], 1, 3)
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
            .aggregate(&[&b, &b], 1, 3)
            .unwrap();
        let single = Aggregator::MeanProbabilities
            .aggregate(&[&b], 1, 3)
            .unwrap();
        assert_eq!(same.logits, single.logits);
    }

    #[test]
    fn mean_of_contributions() {
        let a = [1.0, 2.0, 3.0, 4.0];
        let b = [3.0, 2.0, 1.0, 0.0];
        let t = Aggregator::Mean.aggregate(&[&a, &b], 2, 2).unwrap();
        assert_eq!(t.logits, vec![2.0, 2.0, 2.0, 2.0]);
        assert_eq!(t.contributors, 2);
        let same = Aggregator::Mean.aggregate(&[&a, &a, &a], 2, 2).unwrap();
        assert_eq!(same.logits, a.to_vec());
        let swapped = Aggregator::Mean.aggregate(&[&b, &a], 2, 2).unwrap();
        assert_eq!(swapped.logits, t.logits);
    }

    #[test]
    fn shape_and_empty_errors() {
        assert_eq!(
            Aggregator::Mean.aggregate(&[], 1, 1),
            Err(AggregateError::Empty)
        );
        let a = [1.0, 2.0];
        assert!(matches!(
            Aggregator::Mean.aggregate(&[&a], 2, 2),
            Err(AggregateError::Shape {
                index: 0,
                expected: 4,
                got: 2
            })
        ));
    }
}

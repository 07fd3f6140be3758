//! Which public samples a member knows: per-row knowledge weights.
//!
//! # Why
//!
//! Under label skew a member trained on two or three classes still answers
//! confidently on public samples of classes it never saw, and a plain mean
//! lets those wrong answers into every member's teacher. Selective methods
//! (Selective-FD, Shao et al. 2024; class-coverage and density weighting)
//! decide **per public sample** which members know it.
//!
//! # What
//!
//! The sender scores each row of the round's public subset in [0, 1] with a
//! [`Selector`] and signs the scores with its logits
//! (`fd_protocol::RowWeights`, one u8 per row). The receiver forms the
//! teacher row by row as the weighted mean of the contributors'
//! probabilities ([`crate::aggregate`]), then drops rows nobody vouches for
//! or whose teacher is not confident ([`TeacherFilter`](crate::aggregate::TeacherFilter)); dropped rows are
//! left out of the distillation loss.
//!
//! Selectors (cost per round, for P public rows, C classes, D feature
//! dimensions, A anchors):
//! - `all`: weight 1 everywhere; no weights are sent (today's shares).
//! - `confidence`: the row's max probability, rescaled so a uniform answer
//!   scores 0 and a one-hot answer 1. O(P·C).
//! - `class-coverage`: Σ_c p(c) · n_c / max n, the probability mass the
//!   member puts on classes it holds, weighted by how much it holds of each
//!   (its label counts `n` never leave it). O(P·C).
//! - `density`: is the sample in-distribution for this member's private
//!   data? The distance from the row to its k-th nearest private anchor in
//!   the student's penultimate-layer feature space, compared with the
//!   `quantile` of the anchors' own k-NN distances: weight 1 within that
//!   radius, falling off as (radius / distance)² beyond it (Selective-FD's
//!   density-ratio idea with a k-NN estimator). One forward pass over A
//!   anchors, a P × A and an A × A distance matrix: O((P + A)·A·D).
//!
//! Everything is deterministic: anchors are the first A private samples of
//! a fixed seeded shuffle, and the k-NN selection is exact.

use rand::SeedableRng;
use rand::seq::SliceRandom;
use rand_chacha::ChaCha8Rng;
use fd_protocol::share::softmax_into;
use serde::{Deserialize, Serialize};

use crate::aggregate::TeacherFilter;

/// How a member scores the public rows it shares (`[knowledge] selector`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Selector {
    /// Every row weight 1: no weights travel.
    All,
    /// The row's (rescaled) max probability.
    Confidence,
    /// Probability mass on the classes the member holds, by how much it holds.
    ClassCoverage,
    /// In-distribution score against the member's private data (k-NN in
    /// the student's feature space). The default: the best measured.
    #[default]
    Density,
}

impl Selector {
    pub fn name(self) -> &'static str {
        match self {
            Selector::All => "all",
            Selector::Confidence => "confidence",
            Selector::ClassCoverage => "class-coverage",
            Selector::Density => "density",
        }
    }
}

/// Parameters of the `density` selector.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DensityConfig {
    /// The k of the k-nearest-neighbour distance.
    pub k: usize,
    /// Rows within this quantile of the anchors' own k-NN distances get weight 1.
    pub quantile: f64,
    /// Private samples used as anchors (fewer if the member holds fewer).
    pub anchors: usize,
}

impl Default for DensityConfig {
    fn default() -> Self {
        DensityConfig {
            k: 5,
            quantile: 0.95,
            anchors: 1000,
        }
    }
}

/// `[knowledge]` of a node (and of an experiment): what the member says it
/// knows, and which teacher rows it distils from.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct KnowledgeConfig {
    pub selector: Selector,
    pub density: DensityConfig,
    /// Receiver's ensemble filter: rows whose teacher's max probability is
    /// below this are not distilled (0 = keep all).
    pub min_confidence: f64,
    /// Receiver's ensemble filter: rows whose teacher's entropy (nats) is
    /// above this are not distilled (0 = keep all).
    pub max_entropy: f64,
}

impl KnowledgeConfig {
    /// Checks every field, naming the first bad one.
    pub fn validate(&self) -> Result<(), String> {
        let d = &self.density;
        if d.k == 0 {
            return Err("knowledge.density.k must be at least 1".into());
        }
        if d.anchors <= d.k {
            return Err(format!(
                "knowledge.density.anchors must be greater than k = {}, got {}",
                d.k, d.anchors
            ));
        }
        if !(d.quantile > 0.0 && d.quantile <= 1.0) {
            return Err(format!(
                "knowledge.density.quantile must be in (0, 1], got {}",
                d.quantile
            ));
        }
        if !(0.0..=1.0).contains(&self.min_confidence) {
            return Err(format!(
                "knowledge.min_confidence must be in [0, 1], got {}",
                self.min_confidence
            ));
        }
        if !(self.max_entropy.is_finite() && self.max_entropy >= 0.0) {
            return Err(format!(
                "knowledge.max_entropy must be ≥ 0, got {}",
                self.max_entropy
            ));
        }
        Ok(())
    }

    /// The receiver's filter of teacher rows.
    pub fn filter(&self) -> TeacherFilter {
        TeacherFilter {
            min_confidence: self.min_confidence,
            max_entropy: self.max_entropy,
        }
    }
}

/// `confidence`: per row, (max p − 1/C) / (1 − 1/C), in [0, 1].
pub fn confidence_weights(logits: &[f32], classes: usize) -> Vec<f32> {
    let floor = 1.0 / classes as f64;
    let mut p = vec![0.0; classes];
    logits
        .chunks(classes)
        .map(|row| {
            softmax_into(row, &mut p);
            let max = p.iter().copied().fold(0.0, f64::max);
            if classes == 1 {
                1.0
            } else {
                ((max - floor) / (1.0 - floor)).clamp(0.0, 1.0) as f32
            }
        })
        .collect()
}

/// `class-coverage`: per row, Σ_c p(c) · counts[c] / max(counts).
pub fn class_coverage_weights(logits: &[f32], classes: usize, counts: &[usize]) -> Vec<f32> {
    assert_eq!(counts.len(), classes, "one count per class");
    let most = counts.iter().copied().max().unwrap_or(0).max(1) as f64;
    let coverage: Vec<f64> = counts.iter().map(|&n| n as f64 / most).collect();
    let mut p = vec![0.0; classes];
    logits
        .chunks(classes)
        .map(|row| {
            softmax_into(row, &mut p);
            let w: f64 = p.iter().zip(&coverage).map(|(p, c)| p * c).sum();
            w.clamp(0.0, 1.0) as f32
        })
        .collect()
}

/// The anchors of `density`: up to `count` of `private`, a fixed seeded sample.
pub fn density_anchors(private: &[usize], count: usize, seed: u64) -> Vec<usize> {
    let mut anchors = private.to_vec();
    anchors.shuffle(&mut ChaCha8Rng::seed_from_u64(seed ^ 0x6b6e_6f77_6c65_6467));
    anchors.truncate(count);
    anchors
}

/// Squared Euclidean distances between the rows of `a` (n × dim) and `b`
/// (m × dim), row-major n × m, accumulated in f64.
fn squared_distances(a: &[f32], b: &[f32], dim: usize) -> Vec<f64> {
    let norms = |x: &[f32]| -> Vec<f64> {
        x.chunks(dim)
            .map(|r| r.iter().map(|&v| f64::from(v) * f64::from(v)).sum())
            .collect()
    };
    let (na, nb) = (norms(a), norms(b));
    let mut out = Vec::with_capacity(na.len() * nb.len());
    for (ra, &sa) in a.chunks(dim).zip(&na) {
        for (rb, &sb) in b.chunks(dim).zip(&nb) {
            out.push((sa + sb - 2.0 * f64::from(dot(ra, rb))).max(0.0));
        }
    }
    out
}

/// Dot product in eight independent lanes, so the compiler vectorises it
/// (a single f32 accumulator is a serial dependency chain); the lane order
/// is fixed, so the result is deterministic.
fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut lanes = [0f32; 8];
    let (ca, cb) = (a.chunks_exact(8), b.chunks_exact(8));
    let (ra, rb) = (ca.remainder(), cb.remainder());
    for (x, y) in ca.zip(cb) {
        for i in 0..8 {
            lanes[i] += x[i] * y[i];
        }
    }
    let tail: f32 = ra.iter().zip(rb).map(|(x, y)| x * y).sum();
    lanes.iter().sum::<f32>() + tail
}

/// The k-th smallest value of each row of an n × m matrix (1-based k ≤ m),
/// skipping the first `skip` smallest (an anchor's distance to itself).
fn kth_smallest(matrix: &mut [f64], m: usize, k: usize, skip: usize) -> Vec<f64> {
    matrix
        .chunks_mut(m)
        .map(|row| {
            let (_, kth, _) = row.select_nth_unstable_by(k - 1 + skip, f64::total_cmp);
            *kth
        })
        .collect()
}

/// `density`: weights of `rows` (n × dim features of public samples)
/// against `anchors` (m × dim features of private samples), see the
/// module doc. Returns the weights and the radius (k-NN distance at
/// `quantile` among the anchors).
pub fn density_weights(
    rows: &[f32],
    anchors: &[f32],
    dim: usize,
    config: &DensityConfig,
) -> (Vec<f32>, f64) {
    let m = anchors.len() / dim;
    if m <= config.k {
        // Too few private samples to estimate a density: vouch for nothing.
        return (vec![0.0; rows.len() / dim], 0.0);
    }
    let mut self_distances = squared_distances(anchors, anchors, dim);
    let mut radii = kth_smallest(&mut self_distances, m, config.k, 1);
    radii.sort_by(f64::total_cmp);
    let at = ((config.quantile * m as f64).ceil() as usize).clamp(1, m) - 1;
    let radius = radii[at].sqrt();
    let mut distances = squared_distances(rows, anchors, dim);
    let weights = kth_smallest(&mut distances, m, config.k, 0)
        .into_iter()
        .map(|d2| {
            let d = d2.sqrt();
            if d <= radius {
                1.0
            } else {
                ((radius / d).powi(2)) as f32
            }
        })
        .collect();
    (weights, radius)
}

/// One contributor's decoded knowledge of a round: its logits on the
/// public subset, its declared private sample count, its row weights.
#[derive(Debug, Clone, PartialEq)]
pub struct SharedKnowledge {
    pub logits: Vec<f32>,
    pub samples: u64,
    /// In [0, 1], one per row; `None`: 1 everywhere.
    pub row_weights: Option<Vec<f32>>,
}

impl SharedKnowledge {
    pub fn new(logits: Vec<f32>, samples: u64, row_weights: Option<Vec<f32>>) -> Self {
        SharedKnowledge {
            logits,
            samples,
            row_weights,
        }
    }

    /// What an accepted (validated) share carries.
    pub fn of_share(share: &fd_protocol::LogitShare, logits: Vec<f32>) -> Self {
        SharedKnowledge::new(
            logits,
            share.samples,
            share.row_weights.as_ref().map(fd_protocol::RowWeights::to_f32),
        )
    }

    pub fn contribution(&self) -> crate::aggregate::Contribution<'_> {
        crate::aggregate::Contribution {
            logits: &self.logits,
            samples: self.samples,
            row_weights: self.row_weights.as_deref(),
        }
    }
}

/// How many of `labels` fall in each of `classes` classes (others are ignored).
pub fn label_counts(labels: impl IntoIterator<Item = u8>, classes: usize) -> Vec<usize> {
    let mut counts = vec![0; classes];
    for l in labels {
        if let Some(c) = counts.get_mut(l as usize) {
            *c += 1;
        }
    }
    counts
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Logits that put `sure` probability-ish mass on `class`.
    fn peaked(class: usize, classes: usize, height: f32) -> Vec<f32> {
        (0..classes)
            .map(|c| if c == class { height } else { 0.0 })
            .collect()
    }

    #[test]
    fn confidence_scores_a_uniform_row_zero_and_a_sure_row_one() {
        let mut logits = vec![0.0; 10];
        logits.extend(peaked(3, 10, 50.0));
        let w = confidence_weights(&logits, 10);
        assert!(w[0].abs() < 1e-6, "uniform row: {}", w[0]);
        assert!(w[1] > 0.999, "sure row: {}", w[1]);
    }

    #[test]
    fn class_coverage_gives_no_weight_to_a_class_the_member_never_held() {
        // A member holding only classes 0 and 1, whose student (distilled
        // from the federation) recognises a class-7 sample as class 7.
        let counts = label_counts([0u8, 0, 1, 1, 1], 10);
        let mut logits = peaked(7, 10, 20.0);
        logits.extend(peaked(1, 10, 20.0));
        let w = class_coverage_weights(&logits, 10, &counts);
        assert!(w[0] < 0.01, "class 7 (never held): {}", w[0]);
        assert!(w[1] > 0.99, "class 1 (its largest class): {}", w[1]);
    }

    #[test]
    fn density_vouches_for_samples_near_the_private_data_only() {
        // Private data: a square cluster around (0, 0); public rows: one
        // inside it, one far away (another class's cluster).
        let mut anchors = Vec::new();
        for i in 0..7 {
            for j in 0..7 {
                anchors.extend([i as f32 / 6.0 - 0.5, j as f32 / 6.0 - 0.5]);
            }
        }
        let rows = vec![0.1, -0.1, 10.0, 10.0];
        let config = DensityConfig {
            k: 3,
            quantile: 0.95,
            anchors: 49,
        };
        let (w, radius) = density_weights(&rows, &anchors, 2, &config);
        assert!(radius > 0.0 && radius < 1.0, "radius {radius}");
        assert_eq!(w[0], 1.0);
        assert!(w[1] < 0.01, "far row: {}", w[1]);
    }

    #[test]
    fn density_with_too_few_anchors_vouches_for_nothing() {
        let (w, _) = density_weights(&[0.0, 0.0], &[0.0, 0.0, 1.0, 1.0], 2, &Default::default());
        assert_eq!(w, vec![0.0]);
    }

    #[test]
    fn bad_fields_are_named() {
        let mut c = KnowledgeConfig::default();
        assert!(c.validate().is_ok());
        c.min_confidence = 1.5;
        assert!(c.validate().unwrap_err().contains("knowledge.min_confidence"));
        let mut c = KnowledgeConfig::default();
        c.density.anchors = 3;
        assert!(c.validate().unwrap_err().contains("knowledge.density.anchors"));
    }
}

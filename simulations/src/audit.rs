//! The leakage audit (`[audit]`): how much a curious member learns about the
//! other members' private label distributions from the shares it receives.
//!
//! ## Why
//!
//! A federated-distillation share is a member's predictions on public
//! samples, not its data, and that is often taken as private enough. It is
//! not free of information: a student trained on data skewed towards a few
//! classes predicts those classes more often, on any input. Under strong
//! label skew (Dirichlet α = 0.1) a member's label distribution is a large
//! part of what is private about it, so the audit measures exactly that leak,
//! per member and round, before and after a protection is switched on.
//!
//! ## What is estimated
//!
//! One member, `curious`, follows the protocol honestly and keeps every share
//! its inbox accepted (shares that passed the validation gate, on time; late
//! and rejected shares are not counted, so with a tight deadline the
//! measured leak is a lower bound). From sender j's share of round r it
//! guesses j's label distribution, with no other knowledge:
//!
//! * `argmax`: the histogram of the predicted class over the public rows,
//!   normalised;
//! * `mean-probabilities` (default): the mean of the rows' softmax
//!   probabilities.
//!
//! When the share carries row weights (a knowledge selector, see
//! `fd_node::knowledge`), each row counts with its weight, as a curious
//! member would use them: a sender says which rows it knows about, which is
//! itself a hint of its classes. A share whose weights are all 0 counts every
//! row equally. The guess is compared with j's true distribution (the label
//! counts of its private part, normalised) by total-variation distance,
//! TV(p, q) = ½·Σ|p − q| ∈ [0, 1]: 0 is a perfect guess, 1 disjoint supports.
//!
//! ## The baselines
//!
//! Two guesses that need no share from j at all give the reference errors:
//!
//! * the uniform distribution: knowing nothing;
//! * the federation-wide distribution (every member's private data pooled):
//!   what the sum, or mean, of all shares reveals, i.e. what a member would
//!   learn even if the shares were securely aggregated.
//!
//! An estimate below both baselines is a leak of j's own distribution, beyond
//! what the federation as a whole gives away. The baselines are properties of
//! the partition, so they are the same in every round; per round they are
//! averaged over the same members as the estimates.
//!
//! ## Where the numbers go
//!
//! `metrics.csv` gets `audit_tv`: the curious member's error on that row's
//! member in that round, and an empty field when there is none (audit off,
//! the curious member's own row, a member it did not hear that round).
//! `summary.json` gets `audit` ([`AuditSummary`]): per round the mean error
//! and the two baseline means over the honest members it heard (Byzantine
//! members share corrupted logits, not their knowledge), and the per-member
//! errors of the last round. The estimates are computed from the shares in
//! sender order and kept by (round, sender), so the numbers replay exactly.
//!
//! Only fd runs over the in-memory network are audited: the tap is the
//! network's delivery hook ([`crate::memnet::MemoryNetwork::on_delivery`]).

use std::collections::BTreeMap;
use std::sync::Mutex;

use fd_protocol::LogitShare;
use serde::{Deserialize, Serialize};

use crate::runner::NodeRow;

/// How the curious member turns a share into a label distribution.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Estimator {
    /// Histogram of each row's predicted class, normalised.
    Argmax,
    /// Mean of each row's softmax probabilities.
    #[default]
    MeanProbabilities,
}

impl Estimator {
    pub fn name(self) -> &'static str {
        match self {
            Estimator::Argmax => "argmax",
            Estimator::MeanProbabilities => "mean-probabilities",
        }
    }
}

/// The experiment's `[audit]` table.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuditConfig {
    /// Run the audit (fd over the in-memory network only).
    #[serde(default)]
    pub enabled: bool,
    /// Index of the curious member.
    #[serde(default)]
    pub curious: usize,
    #[serde(default)]
    pub estimator: Estimator,
}


/// Total-variation distance ½·Σ|p − q| of two distributions of equal length.
pub fn total_variation(p: &[f64], q: &[f64]) -> f64 {
    debug_assert_eq!(p.len(), q.len());
    0.5 * p.iter().zip(q).map(|(a, b)| (a - b).abs()).sum::<f64>()
}

/// `counts` normalised to sum to 1; uniform when there are none.
pub fn normalise(counts: &[f64]) -> Vec<f64> {
    let total: f64 = counts.iter().sum();
    if total > 0.0 {
        counts.iter().map(|c| c / total).collect()
    } else {
        uniform(counts.len())
    }
}

pub fn uniform(classes: usize) -> Vec<f64> {
    vec![1.0 / classes.max(1) as f64; classes]
}

/// The estimate of a sender's label distribution from its decoded `logits`
/// (rows × `classes`, row-major), each row counted with its weight when
/// `row_weights` gives one per row with a positive sum.
pub fn estimate(
    estimator: Estimator,
    logits: &[f32],
    classes: usize,
    row_weights: Option<&[f32]>,
) -> Vec<f64> {
    let rows = logits.len() / classes.max(1);
    let weights = row_weights.filter(|w| w.len() == rows && w.iter().any(|&x| x > 0.0));
    let mut sum = vec![0f64; classes];
    let mut probs = vec![0f64; classes];
    for (r, row) in logits.chunks_exact(classes).enumerate() {
        let w = weights.map_or(1.0, |w| f64::from(w[r]));
        if w == 0.0 {
            continue;
        }
        match estimator {
            Estimator::Argmax => {
                // The first of equal maxima, like an argmax over the row.
                let best = row
                    .iter()
                    .enumerate()
                    .fold(0, |best, (c, &v)| if v > row[best] { c } else { best });
                sum[best] += w;
            }
            Estimator::MeanProbabilities => {
                let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                let mut z = 0f64;
                for (p, &v) in probs.iter_mut().zip(row) {
                    *p = f64::from(v - max).exp();
                    z += *p;
                }
                for (s, p) in sum.iter_mut().zip(&probs) {
                    *s += w * p / z;
                }
            }
        }
    }
    normalise(&sum)
}

/// The true label distributions: each member's private part, and all of
/// them pooled (the federation-wide distribution).
#[derive(Debug, Clone, PartialEq)]
pub struct Truth {
    pub members: Vec<Vec<f64>>,
    pub federation: Vec<f64>,
}

impl Truth {
    /// From the training labels and each member's indices into them.
    pub fn new(labels: &[u8], classes: usize, parts: &[Vec<usize>]) -> Self {
        let mut pooled = vec![0f64; classes];
        let members = parts
            .iter()
            .map(|part| {
                let mut counts = vec![0f64; classes];
                for &i in part {
                    counts[usize::from(labels[i])] += 1.0;
                }
                for (p, c) in pooled.iter_mut().zip(&counts) {
                    *p += c;
                }
                normalise(&counts)
            })
            .collect();
        Truth {
            members,
            federation: normalise(&pooled),
        }
    }

    /// TV error of the uniform guess for member `j`.
    pub fn uniform_tv(&self, j: usize) -> f64 {
        total_variation(&uniform(self.federation.len()), &self.members[j])
    }

    /// TV error of the federation-wide guess for member `j`.
    pub fn federation_tv(&self, j: usize) -> f64 {
        total_variation(&self.federation, &self.members[j])
    }
}

/// The curious member's notebook: its estimate of each sender, by (round, sender).
pub struct Eavesdropper {
    pub curious: usize,
    pub estimator: Estimator,
    pub classes: usize,
    estimates: Mutex<BTreeMap<(u64, usize), Vec<f64>>>,
}

impl Eavesdropper {
    pub fn new(config: &AuditConfig, classes: usize) -> Self {
        Eavesdropper {
            curious: config.curious,
            estimator: config.estimator,
            classes,
            estimates: Mutex::new(BTreeMap::new()),
        }
    }

    /// A share from member `sender` that member `receiver` accepted: noted
    /// when the receiver is the curious member (the first per sender and round).
    pub fn observe(&self, sender: usize, receiver: usize, share: &LogitShare) {
        if receiver != self.curious || share.classes as usize != self.classes {
            return;
        }
        // The share passed the receiver's gate, which decoded the same payload.
        let Ok(logits) = share
            .encoding
            .decode(&share.payload, share.rows, share.classes)
        else {
            return;
        };
        let weights = share.row_weights.as_ref().map(|w| w.to_f32());
        let guess = estimate(self.estimator, &logits, self.classes, weights.as_deref());
        self.estimates
            .lock()
            .unwrap()
            .entry((share.round, sender))
            .or_insert(guess);
    }

    /// Notes `guess` as the curious member's estimate of `sender` in
    /// `round`, however it was made (under secure aggregation: from the
    /// sum, the same guess for every sender).
    pub fn note(&self, round: u64, sender: usize, guess: Vec<f64>) {
        self.estimates
            .lock()
            .unwrap()
            .entry((round, sender))
            .or_insert(guess);
    }

    /// The estimates of `round`, by sender.
    pub fn round(&self, round: u64) -> BTreeMap<usize, Vec<f64>> {
        self.estimates
            .lock()
            .unwrap()
            .range((round, 0)..=(round, usize::MAX))
            .map(|(&(_, sender), guess)| (sender, guess.clone()))
            .collect()
    }
}

/// `summary.json`'s `audit`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AuditSummary {
    pub curious: usize,
    pub estimator: Estimator,
    /// Per round: mean TV error of the curious member's estimates over the
    /// honest members it heard (`null`: it heard none).
    pub mean_tv_per_round: Vec<Option<f64>>,
    /// Per round, over the same members: mean TV error of the uniform guess.
    pub uniform_tv_per_round: Vec<Option<f64>>,
    /// Per round, over the same members: mean TV error of the federation-wide guess.
    pub federation_tv_per_round: Vec<Option<f64>>,
    /// Per member: TV error in the last round (`null`: the curious member
    /// itself, or not heard in the last round).
    pub final_tv_per_member: Vec<Option<f64>>,
    /// Per member: TV error of the uniform guess (the same every round).
    pub uniform_tv_per_member: Vec<f64>,
    /// Per member: TV error of the federation-wide guess (the same every round).
    pub federation_tv_per_member: Vec<f64>,
}

fn mean(values: impl Iterator<Item = f64>) -> Option<f64> {
    let (sum, n) = values.fold((0.0, 0usize), |(s, n), v| (s + v, n + 1));
    (n > 0).then(|| sum / n as f64)
}

impl AuditSummary {
    /// From the rows of a run (their `audit_tv`) and the truth.
    pub fn new(config: &AuditConfig, truth: &Truth, rows: &[NodeRow], rounds: u64) -> Self {
        let nodes = truth.members.len();
        let heard = |round: u64| {
            rows.iter()
                .filter(move |r| r.round == round && !r.byzantine)
                .filter_map(|r| r.audit_tv.map(|tv| (r.node, tv)))
        };
        let mut final_tv = vec![None; nodes];
        for r in rows.iter().filter(|r| r.round == rounds) {
            final_tv[r.node] = r.audit_tv;
        }
        AuditSummary {
            curious: config.curious,
            estimator: config.estimator,
            mean_tv_per_round: (1..=rounds)
                .map(|round| mean(heard(round).map(|(_, tv)| tv)))
                .collect(),
            uniform_tv_per_round: (1..=rounds)
                .map(|round| mean(heard(round).map(|(j, _)| truth.uniform_tv(j))))
                .collect(),
            federation_tv_per_round: (1..=rounds)
                .map(|round| mean(heard(round).map(|(j, _)| truth.federation_tv(j))))
                .collect(),
            final_tv_per_member: final_tv,
            uniform_tv_per_member: (0..nodes).map(|j| truth.uniform_tv(j)).collect(),
            federation_tv_per_member: (0..nodes).map(|j| truth.federation_tv(j)).collect(),
        }
    }

    /// The last round's mean error and baselines (`None`: nobody heard then).
    pub fn last(&self) -> Option<(f64, f64, f64)> {
        Some((
            (*self.mean_tv_per_round.last()?)?,
            (*self.uniform_tv_per_round.last()?)?,
            (*self.federation_tv_per_round.last()?)?,
        ))
    }

    /// One line for the console.
    pub fn line(&self) -> String {
        let heard = self
            .final_tv_per_member
            .iter()
            .filter(|tv| tv.is_some())
            .count();
        match self.last() {
            Some((tv, uniform, federation)) => format!(
                "audit: member {} ({}) guesses the others' label distributions to TV {tv:.4} in the last round (uniform guess {uniform:.4}, federation-wide guess {federation:.4}; {heard} members heard)",
                self.curious,
                self.estimator.name()
            ),
            None => format!(
                "audit: member {} heard no honest member in the last round",
                self.curious
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn close(a: f64, b: f64) -> bool {
        (a - b).abs() < 1e-9
    }

    #[test]
    fn total_variation_of_known_vectors() {
        assert!(close(total_variation(&[1.0, 0.0], &[0.0, 1.0]), 1.0));
        assert!(close(total_variation(&[0.5, 0.5], &[0.5, 0.5]), 0.0));
        assert!(close(
            total_variation(&[0.5, 0.5, 0.0, 0.0], &[0.25; 4]),
            0.5
        ));
        assert!(close(
            total_variation(&[0.7, 0.2, 0.1], &[0.1, 0.2, 0.7]),
            0.6
        ));
        assert!(close(total_variation(&[0.3, 0.7], &[0.6, 0.4]), 0.3));
    }

    /// Rows of 4 classes whose logits favour class `rows[i]` by `margin`.
    fn logits(favoured: &[usize], margin: f32) -> Vec<f32> {
        favoured
            .iter()
            .flat_map(|&c| (0..4).map(move |k| if k == c { margin } else { 0.0 }))
            .collect()
    }

    #[test]
    fn a_sender_favouring_two_classes_is_estimated_near_them() {
        // Three rows in four favour class 0, one favours class 1: truth (¾, ¼, 0, 0).
        let favoured: Vec<usize> = (0..40).map(|i| usize::from(i % 4 == 3)).collect();
        let truth = [0.75, 0.25, 0.0, 0.0];
        let x = logits(&favoured, 8.0);
        let argmax = estimate(Estimator::Argmax, &x, 4, None);
        assert!(
            close(argmax[0], 0.75) && close(argmax[1], 0.25),
            "{argmax:?}"
        );
        let mean = estimate(Estimator::MeanProbabilities, &x, 4, None);
        assert!(close(mean.iter().sum::<f64>(), 1.0));
        let tv = total_variation(&mean, &truth);
        assert!(tv < 0.01, "{mean:?}: TV {tv}");
        assert!(tv < total_variation(&uniform(4), &truth) / 10.0);
        // Softer logits: the mean of probabilities spreads mass, the argmax does not.
        let soft = logits(&favoured, 1.0);
        let mean_soft = estimate(Estimator::MeanProbabilities, &soft, 4, None);
        assert!(total_variation(&mean_soft, &truth) > tv);
        assert_eq!(estimate(Estimator::Argmax, &soft, 4, None), argmax);
        // A tie goes to the first class.
        assert_eq!(
            estimate(Estimator::Argmax, &[1.0, 1.0, 0.0, 0.0], 4, None),
            [1.0, 0.0, 0.0, 0.0]
        );
    }

    #[test]
    fn row_weights_shift_the_estimate() {
        // Half the rows favour class 0, half class 2.
        let favoured: Vec<usize> = (0..20).map(|i| if i < 10 { 0 } else { 2 }).collect();
        let x = logits(&favoured, 40.0);
        for estimator in [Estimator::Argmax, Estimator::MeanProbabilities] {
            let plain = estimate(estimator, &x, 4, None);
            assert!(close(plain[0], 0.5) && close(plain[2], 0.5), "{plain:?}");
            // The sender vouches mostly for its class-0 rows: weight ¾ there, ¼ elsewhere.
            let w: Vec<f32> = favoured
                .iter()
                .map(|&c| if c == 0 { 0.75 } else { 0.25 })
                .collect();
            let weighted = estimate(estimator, &x, 4, Some(w.as_slice()));
            assert!(close(weighted[0], 0.75), "{estimator:?}: {weighted:?}");
            assert!(close(weighted[2], 0.25), "{estimator:?}: {weighted:?}");
            // Weight 0 drops a row; all zeros (or the wrong count) count every row.
            let only2: Vec<f32> = favoured.iter().map(|&c| f32::from(c == 2)).collect();
            assert!(close(
                estimate(estimator, &x, 4, Some(only2.as_slice()))[2],
                1.0
            ));
            assert_eq!(estimate(estimator, &x, 4, Some(&[0.0; 20][..])), plain);
            assert_eq!(estimate(estimator, &x, 4, Some(&[1.0; 3][..])), plain);
        }
    }

    #[test]
    fn truth_and_baselines() {
        let labels = [0u8, 0, 1, 1, 2, 3, 0, 0];
        // Member 0: {0, 0, 1, 1}; member 1: {2, 3, 0, 0}.
        let truth = Truth::new(&labels, 4, &[vec![0, 1, 2, 3], vec![4, 5, 6, 7]]);
        assert_eq!(truth.members[0], [0.5, 0.5, 0.0, 0.0]);
        assert_eq!(truth.members[1], [0.5, 0.0, 0.25, 0.25]);
        assert_eq!(truth.federation, [0.5, 0.25, 0.125, 0.125]);
        assert!(close(truth.uniform_tv(0), 0.5));
        assert!(close(truth.federation_tv(0), 0.25));
        assert!(close(truth.federation_tv(1), 0.25));
        // An empty part counts as uniform rather than dividing by zero.
        assert_eq!(Truth::new(&labels, 4, &[vec![]]).members[0], uniform(4));
    }

    #[test]
    fn config_defaults_and_names() {
        let c: AuditConfig = toml::from_str("enabled = true").unwrap();
        assert_eq!(c.curious, 0);
        assert_eq!(c.estimator, Estimator::MeanProbabilities);
        let c: AuditConfig = toml::from_str("estimator = \"argmax\"\ncurious = 2").unwrap();
        assert!(!c.enabled && c.curious == 2 && c.estimator == Estimator::Argmax);
        assert!(toml::from_str::<AuditConfig>("curios = 2").is_err());
    }
}

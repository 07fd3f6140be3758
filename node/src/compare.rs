//! A/B comparison of two exported models on the same samples
//! (`fd-node compare A B`, issue 16 §5).
//!
//! Why: before a new model replaces the one in service (int8 for f32, a
//! compressed student for its teacher, this round's export for last
//! week's), the question is whether the accuracy difference is real or
//! noise of the test set. Both models classify the same samples, so the
//! comparison is paired, which is far tighter than comparing two accuracies
//! with their own intervals:
//! - **paired bootstrap**: resample the samples (with replacement, seeded)
//!   and take the 2.5 % and 97.5 % percentiles of the resampled difference
//!   `acc(B) − acc(A)`; identical predictions give exactly [0, 0];
//! - **McNemar's exact test**: only samples on which the two disagree carry
//!   information; under "equally accurate" each such sample is A's or B's
//!   with probability ½, so the two-sided p-value is a binomial tail
//!   (exact, not the χ² approximation, which is poor for few disagreements).
//!
//! Accuracy, latency, throughput and size of each side come from
//! [`crate::evaluate::evaluate_with_predictions`], so the numbers match
//! `fd-node evaluate`'s; the same pass gives the per-sample predictions the
//! paired test compares (each model is loaded and run once).

use std::path::{Path, PathBuf};

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use fd_data::Dataset;
use crate::device::DeviceKind;
use crate::evaluate::{EvaluateError, EvaluateOptions, Latency, Throughput, evaluate_with_predictions};
use crate::export::{ExportFormat, read_card};

/// How to compare.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct CompareOptions {
    /// Bootstrap resamples of the paired difference.
    pub resamples: usize,
    /// Seed of the bootstrap.
    pub seed: u64,
    /// Latency and throughput measurement of each model.
    pub evaluate: EvaluateOptions,
}

impl Default for CompareOptions {
    fn default() -> Self {
        CompareOptions {
            resamples: 2000,
            seed: 0,
            evaluate: EvaluateOptions::default(),
        }
    }
}

/// One side of the comparison.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Side {
    pub model_dir: PathBuf,
    pub architecture: String,
    pub format: ExportFormat,
    pub params: usize,
    pub weights_bytes: u64,
    pub correct: u64,
    pub accuracy: f64,
    pub latency: Latency,
    pub throughput: Throughput,
}

/// McNemar's exact test on the disagreements.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct McNemar {
    /// Samples A classifies correctly and B does not.
    pub only_a_correct: u64,
    /// Samples B classifies correctly and A does not.
    pub only_b_correct: u64,
    /// Two-sided exact p-value (1 when they never disagree).
    pub p_value: f64,
}

/// `acc(B) − acc(A)` with its paired-bootstrap interval.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Difference {
    pub b_minus_a: f64,
    pub ci_low: f64,
    pub ci_high: f64,
    pub confidence: f64,
    pub resamples: usize,
    pub seed: u64,
    /// Whether the interval excludes 0.
    pub significant: bool,
    pub mcnemar: McNemar,
}

/// Everything `fd-node compare` reports.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ComparisonReport {
    pub data: String,
    pub samples: usize,
    pub device: String,
    pub a: Side,
    pub b: Side,
    pub difference: Difference,
}

/// Why a comparison could not run.
#[derive(Debug, thiserror::Error)]
pub enum CompareError {
    #[error(transparent)]
    Evaluate(#[from] EvaluateError),
    #[error("the models do not take the same samples: {0}")]
    Mismatch(String),
    #[error("options: {0}")]
    Options(String),
}

/// Compares the exports in `a` and `b` on `data` (`name` says what it is).
pub fn compare_exported(
    a: &Path,
    b: &Path,
    data: &Dataset,
    name: &str,
    options: CompareOptions,
) -> Result<ComparisonReport, CompareError> {
    if options.resamples == 0 {
        return Err(CompareError::Options("resamples must be at least 1".into()));
    }
    let device = DeviceKind::Flex;
    let (ca, cb) = (
        read_card(a).map_err(EvaluateError::from)?,
        read_card(b).map_err(EvaluateError::from)?,
    );
    if ca.input.shape != cb.input.shape || ca.classes != cb.classes {
        return Err(CompareError::Mismatch(format!(
            "{} takes {:?} with {} classes, {} takes {:?} with {}",
            a.display(),
            ca.input.shape,
            ca.classes,
            b.display(),
            cb.input.shape,
            cb.classes
        )));
    }
    // Each model is loaded and run once: its report and its predictions.
    let (ra, pa) = evaluate_with_predictions(a, Some(data), device, options.evaluate)?;
    let (rb, pb) = evaluate_with_predictions(b, Some(data), device, options.evaluate)?;
    let (ca, cb) = (correct(&pa, data), correct(&pb, data));
    let side = |r: crate::evaluate::EvaluationReport, c: &[bool]| Side {
        model_dir: r.model_dir,
        architecture: r.architecture,
        format: r.format,
        params: r.params,
        weights_bytes: r.file.weights_bytes,
        correct: c.iter().filter(|&&x| x).count() as u64,
        accuracy: r.accuracy.overall,
        latency: r.latency,
        throughput: r.throughput,
    };
    Ok(ComparisonReport {
        data: name.to_string(),
        samples: data.len(),
        device: device.name().into(),
        difference: paired_difference(&ca, &cb, options.resamples, options.seed),
        a: side(ra, &ca),
        b: side(rb, &cb),
    })
}

/// Per sample: is the predicted class the label?
fn correct(predictions: &[usize], data: &Dataset) -> Vec<bool> {
    predictions
        .iter()
        .zip(&data.labels)
        .map(|(&p, &label)| p == label as usize)
        .collect()
}

/// The paired difference of two per-sample correctness vectors (same samples,
/// same order): point estimate, 95 % paired-bootstrap interval, McNemar.
///
/// # Panics
/// If the vectors differ in length or are empty.
pub fn paired_difference(a: &[bool], b: &[bool], resamples: usize, seed: u64) -> Difference {
    assert_eq!(a.len(), b.len(), "paired samples");
    assert!(!a.is_empty(), "at least one sample");
    let n = a.len();
    // d_i ∈ {−1, 0, 1}: +1 where only B is right.
    let d: Vec<i32> = a
        .iter()
        .zip(b)
        .map(|(&x, &y)| i32::from(y) - i32::from(x))
        .collect();
    let point = d.iter().map(|&v| v as f64).sum::<f64>() / n as f64;
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut means: Vec<f64> = (0..resamples.max(1))
        .map(|_| {
            let s: i64 = (0..n)
                .map(|_| d[rng.random_range(0..n as u64) as usize] as i64)
                .sum();
            s as f64 / n as f64
        })
        .collect();
    means.sort_by(f64::total_cmp);
    let confidence = 0.95;
    // Nearest rank: percentiles of the resampled means.
    let q = |p: f64| crate::evaluate::percentile(&means, p);
    let (low, high) = (
        q((1.0 - confidence) / 2.0),
        q(1.0 - (1.0 - confidence) / 2.0),
    );
    let only_a = d.iter().filter(|&&v| v == -1).count() as u64;
    let only_b = d.iter().filter(|&&v| v == 1).count() as u64;
    Difference {
        b_minus_a: point,
        ci_low: low,
        ci_high: high,
        confidence,
        resamples: means.len(),
        seed,
        significant: low > 0.0 || high < 0.0,
        mcnemar: McNemar {
            only_a_correct: only_a,
            only_b_correct: only_b,
            p_value: mcnemar_exact(only_a, only_b),
        },
    }
}

/// Two-sided exact McNemar p-value: `min(1, 2 · P(X ≤ min(b, c)))` for
/// `X ~ Binomial(b + c, ½)`, summed in log space (b + c may be thousands).
pub fn mcnemar_exact(b: u64, c: u64) -> f64 {
    let n = b + c;
    if n == 0 {
        return 1.0;
    }
    let k = b.min(c);
    let ln_half_n = n as f64 * std::f64::consts::LN_2;
    // ln C(n, i), i = 0..=k, by the recurrence C(n, i+1) = C(n, i)(n − i)/(i + 1).
    let mut ln_c = 0.0f64;
    let mut terms = Vec::with_capacity(k as usize + 1);
    for i in 0..=k {
        terms.push(ln_c - ln_half_n);
        ln_c += ((n - i) as f64).ln() - ((i + 1) as f64).ln();
    }
    let max = terms.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    let tail = max.exp() * terms.iter().map(|t| (t - max).exp()).sum::<f64>();
    (2.0 * tail).min(1.0)
}

impl std::fmt::Display for ComparisonReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(
            f,
            "data        {} ({} samples), device {}",
            self.data, self.samples, self.device
        )?;
        for (label, s) in [("A", &self.a), ("B", &self.b)] {
            writeln!(
                f,
                "{label}           {} ({} {}, {} params, {} bytes): accuracy {:.4} ({} correct); \
                 latency p50 {:.3} ms p95 {:.3} ms p99 {:.3} ms; {:.0} samples/s at batch {}",
                s.model_dir.display(),
                s.architecture,
                s.format,
                s.params,
                s.weights_bytes,
                s.accuracy,
                s.correct,
                s.latency.p50_ms,
                s.latency.p95_ms,
                s.latency.p99_ms,
                s.throughput.samples_per_second,
                s.throughput.batch
            )?;
        }
        let d = &self.difference;
        writeln!(
            f,
            "B − A       {:+.4}, {:.0} % CI [{:+.4}, {:+.4}] (paired bootstrap, {} resamples, seed {}){}",
            d.b_minus_a,
            100.0 * d.confidence,
            d.ci_low,
            d.ci_high,
            d.resamples,
            d.seed,
            if d.significant { "" } else { ": contains 0" }
        )?;
        writeln!(
            f,
            "McNemar     only A right {}, only B right {}: exact p = {:.4}",
            d.mcnemar.only_a_correct, d.mcnemar.only_b_correct, d.mcnemar.p_value
        )
    }
}

/// `fd-node compare`'s arguments.
#[derive(Debug, clap::Args)]
pub struct CompareArgs {
    /// Folder of model A (written by `fd-node export` or `compress`).
    pub a: PathBuf,
    /// Folder of model B.
    pub b: PathBuf,
    /// TOML file with the data source (a node config or its `[data]` keys);
    /// its test split is used. Default: the source in A's model.json.
    #[arg(long)]
    pub data: Option<PathBuf>,
    /// Also write the report as JSON here.
    #[arg(long)]
    pub json: Option<PathBuf>,
    /// Bootstrap resamples.
    #[arg(long, default_value_t = 2000)]
    pub resamples: usize,
    /// Bootstrap seed.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    #[command(flatten)]
    pub latency: crate::evaluate::LatencyArgs,
}

/// Runs `fd-node compare`: prints the report (and writes `--json`).
pub fn run_cli(args: CompareArgs) -> Result<ComparisonReport, Box<dyn std::error::Error>> {
    let source = match &args.data {
        Some(path) => crate::evaluate::data_source_from_file(path)?,
        None => crate::export::read_card(&args.a)?.data.ok_or_else(|| {
            format!(
                "{} records no data source: pass --data",
                args.a.join(crate::export::CARD_FILE).display()
            )
        })?,
    };
    let splits = source.load().map_err(|e| format!("data: {e}"))?;
    let options = CompareOptions {
        resamples: args.resamples,
        seed: args.seed,
        evaluate: args.latency.options(),
    };
    let name = format!("{} (test split)", splits.source);
    let report = compare_exported(&args.a, &args.b, &splits.test, &name, options)?;
    print!("{report}");
    if let Some(path) = &args.json {
        crate::evaluate::write_json_report(path, &report)?;
        println!("report      {}", path.display());
    }
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::module::Module as _;
    use fd_data::{DataSource, DataSplits};
    use crate::export::{Provenance, export_student};
    use crate::learner::{Learner, TrainingConfig};
    use crate::model::{InputShape, ModelConfig, Student};

    const INPUT: InputShape = InputShape {
        channels: 1,
        height: 28,
        width: 28,
    };

    fn data() -> DataSplits {
        DataSource::Synthetic {
            seed: 5,
            train: 1500,
            test: 1000,
        }
        .load()
        .unwrap()
    }

    fn trained(data: &DataSplits) -> Student {
        let mut learner = Learner::new(
            &ModelConfig::Mlp { hidden: vec![32] },
            TrainingConfig {
                local_epochs: 4,
                optimizer: crate::learner::OptimizerKind::Adam,
                learning_rate: 1e-3,
                seed: 2,
                // Plain supervised training of a fixture, not a member's round.
                local_ntd: 0.0,
                ..TrainingConfig::default()
            },
            DeviceKind::Flex,
            INPUT,
            10,
        );
        let all: Vec<usize> = (0..data.train.len()).collect();
        learner.train_local(&data.train, &all);
        learner.student().valid()
    }

    fn export(student: &Student, dir: &Path) {
        export_student(
            student,
            &ModelConfig::Mlp { hidden: vec![32] },
            INPUT,
            10,
            Provenance::default(),
            ExportFormat::F32,
            dir,
        )
        .unwrap();
    }

    fn quick() -> CompareOptions {
        CompareOptions {
            resamples: 1000,
            seed: 9,
            evaluate: EvaluateOptions {
                warmup: 5,
                latency_runs: 50,
                throughput_batch: 64,
                throughput_batches: 3,
            },
        }
    }

    #[test]
    fn mcnemar_matches_hand_computed_binomial_tails() {
        assert_eq!(mcnemar_exact(0, 0), 1.0);
        // 1 vs 9: 2 · (C(10,0) + C(10,1)) / 2^10 = 22 / 1024.
        assert!((mcnemar_exact(1, 9) - 22.0 / 1024.0).abs() < 1e-12);
        assert!((mcnemar_exact(9, 1) - 22.0 / 1024.0).abs() < 1e-12);
        // 0 vs 5: 2 / 32.
        assert!((mcnemar_exact(0, 5) - 2.0 / 32.0).abs() < 1e-12);
        // Balanced disagreements are no evidence: p = 1 (capped).
        assert_eq!(mcnemar_exact(7, 7), 1.0);
        // Thousands of disagreements stay finite and tiny when lopsided.
        let p = mcnemar_exact(1000, 1400);
        assert!(p > 0.0 && p < 1e-9, "{p}");
    }

    #[test]
    fn bootstrap_interval_is_seeded_and_brackets_the_difference() {
        let a: Vec<bool> = (0..500).map(|i| i % 4 != 0).collect(); // 75 %
        let b: Vec<bool> = (0..500).map(|i| i % 5 != 0).collect(); // 80 %
        let d = paired_difference(&a, &b, 1000, 1);
        assert!((d.b_minus_a - 0.05).abs() < 1e-12);
        assert!(d.ci_low <= d.b_minus_a && d.b_minus_a <= d.ci_high, "{d:?}");
        assert_eq!(d, paired_difference(&a, &b, 1000, 1));
        assert_ne!(d.ci_low, paired_difference(&a, &b, 1000, 2).ci_low);
    }

    #[test]
    fn identical_models_differ_by_zero_and_a_broken_one_significantly() {
        let data = data();
        let student = trained(&data);
        let tmp = tempfile::tempdir().unwrap();
        let (a, a2, broken) = (
            tmp.path().join("a"),
            tmp.path().join("a2"),
            tmp.path().join("broken"),
        );
        export(&student, &a);
        export(&student, &a2);
        // Broken: an untrained student (chance level on 10 classes).
        let untrained =
            ModelConfig::Mlp { hidden: vec![32] }.init(INPUT, 10, 77, &DeviceKind::Flex.device());
        export(&untrained, &broken);

        let same = compare_exported(&a, &a2, &data.test, "synthetic", quick()).unwrap();
        assert_eq!(same.a.accuracy, same.b.accuracy);
        assert_eq!(same.difference.b_minus_a, 0.0);
        assert!(same.difference.ci_low <= 0.0 && 0.0 <= same.difference.ci_high);
        assert!(!same.difference.significant);
        assert_eq!(same.difference.mcnemar.p_value, 1.0);
        assert!(same.a.accuracy > 0.4, "{}", same.a.accuracy);

        let worse = compare_exported(&a, &broken, &data.test, "synthetic", quick()).unwrap();
        let d = &worse.difference;
        assert!(d.b_minus_a < -0.2, "{d:?}");
        assert!(d.ci_high < 0.0 && d.significant, "{d:?}");
        assert!(d.mcnemar.p_value < 1e-6, "{d:?}");
        assert_eq!(
            worse.a.correct as f64 / worse.samples as f64,
            worse.a.accuracy,
            "the paired counts agree with evaluate's accuracy"
        );
        // Each side was measured with the options given (percentile order
        // is evaluate's own test).
        for s in [&worse.a, &worse.b] {
            assert_eq!((s.latency.runs, s.latency.warmup), (50, 5), "{:?}", s.latency);
            assert_eq!(s.throughput.batch, 64);
            assert!(s.latency.p50_ms > 0.0 && s.throughput.samples_per_second > 0.0);
            assert!(s.weights_bytes > 0);
        }

        // The JSON has every field and parses back into the same report.
        let json = serde_json::to_string(&worse).unwrap();
        let value: serde_json::Value = serde_json::from_str(&json).unwrap();
        for field in ["data", "samples", "device", "a", "b", "difference"] {
            assert!(value.get(field).is_some(), "{field}");
        }
        for field in [
            "b_minus_a",
            "ci_low",
            "ci_high",
            "confidence",
            "resamples",
            "seed",
            "significant",
        ] {
            assert!(value["difference"].get(field).is_some(), "{field}");
        }
        for field in ["only_a_correct", "only_b_correct", "p_value"] {
            assert!(
                value["difference"]["mcnemar"].get(field).is_some(),
                "{field}"
            );
        }
        for side in ["a", "b"] {
            for field in [
                "model_dir",
                "architecture",
                "format",
                "params",
                "weights_bytes",
                "correct",
                "accuracy",
                "latency",
                "throughput",
            ] {
                assert!(value[side].get(field).is_some(), "{side}.{field}");
            }
            for field in ["p50_ms", "p95_ms", "p99_ms"] {
                assert!(
                    value[side]["latency"][field].as_f64().is_some(),
                    "{side}.latency.{field}"
                );
            }
        }
        // Parses back into a report (floats only up to serde_json's parsing precision).
        let back: ComparisonReport = serde_json::from_str(&json).unwrap();
        assert_eq!(back.difference.mcnemar, worse.difference.mcnemar);
        assert_eq!(
            (back.a.correct, back.b.correct),
            (worse.a.correct, worse.b.correct)
        );
        assert!((back.difference.ci_low - worse.difference.ci_low).abs() < 1e-12);
    }

    #[test]
    fn models_of_other_inputs_are_refused() {
        let tmp = tempfile::tempdir().unwrap();
        let device = DeviceKind::Flex.device();
        let config = ModelConfig::Mlp { hidden: vec![4] };
        let small = config.init(INPUT, 10, 1, &device);
        export_student(
            &small,
            &config,
            INPUT,
            10,
            Provenance::default(),
            ExportFormat::F32,
            &tmp.path().join("a"),
        )
        .unwrap();
        let other = config.init(INPUT, 5, 1, &device);
        export_student(
            &other,
            &config,
            INPUT,
            5,
            Provenance::default(),
            ExportFormat::F32,
            &tmp.path().join("b"),
        )
        .unwrap();
        let d = data();
        let err = compare_exported(
            &tmp.path().join("a"),
            &tmp.path().join("b"),
            &d.test,
            "x",
            quick(),
        )
        .unwrap_err();
        assert!(matches!(err, CompareError::Mismatch(_)), "{err}");
    }
}

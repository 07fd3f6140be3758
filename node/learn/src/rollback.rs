//! Monitoring a member's student on a held-out validation split, and rolling
//! back a distillation that made it worse.
//!
//! Why: the teacher a member distils comes from its peers, and a poisoned or
//! simply bad teacher (a Byzantine peer under the mean aggregator, a round
//! of stragglers) can drag the student down in one round. The member cannot
//! judge the teacher, but it can judge the result on data it never trained
//! on. So:
//!
//! - [`validation_split`] sets aside `validation_fraction` of the member's
//!   private samples, stratified by class, with a seeded shuffle; the member
//!   never trains, selects or distils on them (they are not in
//!   `LocalMember::private`).
//! - Before a distillation the member keeps its whole learner state (student
//!   record, optimizer moments, shuffling RNG); afterwards it measures
//!   validation accuracy. If that is more than `rollback_tolerance` below the
//!   best so far (the best of the students it kept at the end of earlier
//!   rounds; in round 1, this round's locally trained student), the state
//!   is put back: the round is kept as if it had
//!   not distilled ([`Monitor::judge`]). Privacy spent by DP-SGD during the
//!   discarded distillation stays spent.
//! - The best student kept at a round's end is saved to its own file
//!   ([`BestStudent`]), atomically, so `fd-node export` ships the best
//!   student, not merely the last one.
//!
//! Best-student file: [`fd_data::fsutil::seal`] (magic `"FDBEST\0\n"`,
//! version, length, bincode 2 body, SHA-256) of [`BestStudent`]: the
//! validation accuracy and the [`Checkpoint`] of the student.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::checkpoint::Checkpoint;

/// `[rollback]` of a node's config (and of an fd-sim experiment).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
///
/// Without the table, [`RollbackConfig::default`] applies (a 10 % split, a
/// 0.10 tolerance). Inside a table, an omitted `rollback_tolerance` means
/// "measure only, never roll back", so it can be switched off explicitly.
#[serde(deny_unknown_fields)]
pub struct RollbackConfig {
    /// Fraction of the private samples held out for validation, in [0, 1).
    #[serde(default = "default_validation_fraction")]
    pub validation_fraction: f64,
    /// Largest drop of validation accuracy below the best so far that a
    /// distillation may cause and be kept; `None`: never roll back (the
    /// validation accuracy is still measured and reported).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rollback_tolerance: Option<f64>,
    /// Where the best student is kept (default `<name>.best` beside the
    /// config); fd-node only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub best_file: Option<PathBuf>,
}

fn default_validation_fraction() -> f64 {
    0.1
}

impl Default for RollbackConfig {
    /// fd-node's defaults: a 10 % validation split and a 0.10 tolerance,
    /// the best of 0.02 / 0.05 / 0.10 in docs/results.md §9 (the only one
    /// that cost nothing in clean federations; with a split of ~100
    /// samples, tighter tolerances undo distillations that helped).
    fn default() -> Self {
        RollbackConfig {
            validation_fraction: 0.1,
            rollback_tolerance: Some(0.10),
            best_file: None,
        }
    }
}

impl RollbackConfig {
    /// No validation split and no rollback: members train on all their
    /// private data (fd-sim's default, so published runs reproduce).
    pub fn off() -> Self {
        RollbackConfig {
            validation_fraction: 0.0,
            rollback_tolerance: None,
            best_file: None,
        }
    }

    /// Whether distillations are judged (and possibly undone).
    pub fn enabled(&self) -> bool {
        self.validation_fraction > 0.0 && self.rollback_tolerance.is_some()
    }

    /// Checks the fields; the error is `(field, reason)`.
    pub fn validate(&self) -> Result<(), (&'static str, String)> {
        let f = self.validation_fraction;
        if !(f.is_finite() && (0.0..1.0).contains(&f)) {
            return Err((
                "rollback.validation_fraction",
                format!("must be in [0, 1), got {f}"),
            ));
        }
        if let Some(t) = self.rollback_tolerance {
            if !(t.is_finite() && t >= 0.0) {
                return Err((
                    "rollback.rollback_tolerance",
                    format!("must be a finite number ≥ 0, got {t}"),
                ));
            }
            if f == 0.0 {
                return Err((
                    "rollback.rollback_tolerance",
                    "needs a validation split to judge rounds on: set `rollback.validation_fraction` > 0 (e.g. 0.1), or remove the tolerance".into(),
                ));
            }
        }
        Ok(())
    }
}

/// Splits `private` (indices into a data set whose labels are `labels_of`)
/// into `(train, validation)`: per class, a seeded shuffle and the first
/// `round(fraction · n_c)` samples to validation, at most `n_c − 1` so every
/// class the member holds stays in its training data. Both lists keep the
/// order of `private`. Deterministic in `seed`.
pub fn validation_split(
    private: &[usize],
    labels: &[u8],
    classes: usize,
    fraction: f64,
    seed: &[u64],
) -> (Vec<usize>, Vec<usize>) {
    if fraction <= 0.0 || private.is_empty() {
        return (private.to_vec(), Vec::new());
    }
    let mut by_class: Vec<Vec<usize>> = vec![Vec::new(); classes.max(1)];
    for (position, &label) in labels.iter().enumerate() {
        let class = (label as usize).min(by_class.len() - 1);
        by_class[class].push(position);
    }
    let mut rng = fd_data::derived_rng("validation-split", seed);
    let mut held_out = vec![false; private.len()];
    for positions in &mut by_class {
        let n = positions.len();
        if n < 2 {
            continue;
        }
        let k = ((fraction * n as f64).round() as usize).min(n - 1);
        fd_data::portable_shuffle(positions, &mut rng);
        for &p in &positions[..k] {
            held_out[p] = true;
        }
    }
    let mut train = Vec::with_capacity(private.len());
    let mut validation = Vec::new();
    for (&index, &out) in private.iter().zip(&held_out) {
        if out {
            validation.push(index);
        } else {
            train.push(index);
        }
    }
    (train, validation)
}

/// What happened to one round's distillation.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Verdict {
    /// Validation accuracy of the locally trained student, before distilling.
    pub before: f64,
    /// Validation accuracy right after distilling.
    pub after: f64,
    /// The best so far the round was judged against.
    pub best: f64,
    /// The distilled student was discarded and `before`'s state restored.
    pub rolled_back: bool,
}

impl Verdict {
    /// Validation accuracy of the student the member keeps.
    pub fn kept(&self) -> f64 {
        if self.rolled_back { self.before } else { self.after }
    }
}

/// A member's validation record: the best accuracy of a student it kept at
/// the end of a round, and how many rounds it rolled back.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Monitor {
    /// Best validation accuracy of a round's final student (None before the first round).
    pub best_kept: Option<f64>,
    /// Rollbacks since the member started.
    pub rollbacks: u64,
}

impl Monitor {
    /// Judges a distillation: `before`/`after` are the validation accuracies
    /// around it. Rolls back when `after` is more than `tolerance` below the
    /// best kept at the end of an earlier round (in round 1: `before`).
    pub fn judge(&mut self, before: f64, after: f64, tolerance: f64) -> Verdict {
        // The best *kept* student, not this round's locally trained one:
        // validation data follow the member's own (skewed) label
        // distribution, so local training alone scores high on it and a
        // distillation that trades some of that for the federation's
        // classes would look like a loss. Round 1, with nothing kept yet, is
        // judged against the locally trained student.
        let best = self.best_kept.unwrap_or(before);
        // A tiny margin so an accuracy exactly `tolerance` below (a multiple
        // of 1/n) is not rolled back by rounding.
        let rolled_back = best - after > tolerance + 1e-9;
        if rolled_back {
            self.rollbacks += 1;
        }
        Verdict {
            before,
            after,
            best,
            rolled_back,
        }
    }

    /// Records the validation accuracy of the student kept at a round's end;
    /// true when it is the best so far (ties count: the later student is
    /// the one saved).
    pub fn observe_kept(&mut self, accuracy: f64) -> bool {
        let improved = self.best_kept.is_none_or(|b| accuracy >= b);
        if improved {
            self.best_kept = Some(accuracy);
        }
        improved
    }
}

const MAGIC: &[u8; 8] = b"FDBEST\0\n";
/// Bump when the fields change.
pub const BEST_VERSION: u32 = 2;

/// The best student a member kept, with its validation accuracy.
#[derive(Debug, Clone, PartialEq, bincode::Encode, bincode::Decode)]
pub struct BestStudent {
    pub validation_accuracy: f64,
    pub checkpoint: Checkpoint,
}

/// Why a best-student file could not be written or read.
#[derive(Debug, thiserror::Error)]
pub enum BestStudentError {
    #[error("best-student file {}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("best-student file {}: {reason}", path.display())]
    Malformed { path: PathBuf, reason: String },
    #[error("best-student file {}: checksum mismatch, the file is corrupt", path.display())]
    Checksum { path: PathBuf },
}

impl BestStudent {
    /// The file contents (see the module doc).
    pub fn encode(&self) -> Vec<u8> {
        fd_data::fsutil::seal(MAGIC, BEST_VERSION, self)
    }

    /// Parses [`Self::encode`]'s output; `path` names the file in errors.
    pub fn decode(bytes: &[u8], path: &Path) -> Result<Self, BestStudentError> {
        fd_data::fsutil::unseal(MAGIC, BEST_VERSION, bytes).map_err(|e| match e {
            fd_data::fsutil::SealError::Checksum => BestStudentError::Checksum {
                path: path.to_path_buf(),
            },
            other => BestStudentError::Malformed {
                path: path.to_path_buf(),
                reason: other.to_string(),
            },
        })
    }

    /// Writes the file atomically ([`fd_data::fsutil::write_atomic`]): after a
    /// crash `path` holds the previous best or this one, whole.
    pub fn save(&self, path: &Path) -> Result<(), BestStudentError> {
        fd_data::fsutil::write_atomic(path, &self.encode(), 0o600).map_err(|source| {
            BestStudentError::Io {
                path: path.to_path_buf(),
                source,
            }
        })
    }

    /// Reads the file at `path`; `Ok(None)` when there is none yet.
    pub fn load(path: &Path) -> Result<Option<Self>, BestStudentError> {
        match std::fs::read(path) {
            Ok(bytes) => Self::decode(&bytes, path).map(Some),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(source) => Err(BestStudentError::Io {
                path: path.to_path_buf(),
                source,
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use fd_protocol::digest::sha256;

    #[test]
    fn the_validation_split_is_disjoint_stratified_and_deterministic_per_seed() {
        // 1000 samples of 10 classes, indices offset so positions ≠ indices.
        let private: Vec<usize> = (0..1000).map(|i| 5000 + 3 * i).collect();
        let labels: Vec<u8> = (0..1000).map(|i| ((i * 7) % 10) as u8).collect();
        let (train, validation) = validation_split(&private, &labels, 10, 0.1, &[1, 2]);
        assert_eq!(validation.len(), 100, "10 % of each class of 100");
        assert_eq!(train.len() + validation.len(), private.len());
        let train_set: std::collections::HashSet<_> = train.iter().collect();
        assert!(validation.iter().all(|i| !train_set.contains(i)), "disjoint");
        let mut all: Vec<usize> = train.iter().chain(&validation).copied().collect();
        all.sort_unstable();
        assert_eq!(all, private, "a partition of the private samples");
        let label_of = |i: usize| labels[(i - 5000) / 3];
        for class in 0..10u8 {
            let n = validation.iter().filter(|&&i| label_of(i) == class).count();
            assert_eq!(n, 10, "class {class} stratified");
        }
        let again = validation_split(&private, &labels, 10, 0.1, &[1, 2]);
        assert_eq!(again, (train.clone(), validation.clone()), "same seed, same split");
        let other = validation_split(&private, &labels, 10, 0.1, &[1, 3]);
        assert_ne!(other.1, validation, "another seed, another split");
        // A class with one sample stays in training; fraction 0 holds nothing out.
        let (t, v) = validation_split(&[7, 8, 9], &[0, 1, 1], 2, 0.5, &[0]);
        assert!(t.contains(&7) && v.len() == 1 && t.len() == 2);
        assert_eq!(
            validation_split(&private, &labels, 10, 0.0, &[1]),
            (private.clone(), vec![])
        );
    }

    #[test]
    fn the_monitor_rolls_back_only_beyond_the_tolerance() {
        let mut m = Monitor::default();
        // Round 1: judged against the locally trained student itself.
        let v = m.judge(0.80, 0.70, 0.02);
        assert!(v.rolled_back && v.best == 0.80 && v.kept() == 0.80);
        assert!(m.observe_kept(v.kept()));
        let v = m.judge(0.79, 0.78, 0.02);
        assert!(!v.rolled_back, "exactly the tolerance below is kept");
        assert!(!m.observe_kept(v.kept()));
        let v = m.judge(0.75, 0.7799, 0.02);
        assert!(v.rolled_back, "0.0201 below the best of 0.80");
        assert_eq!(m.rollbacks, 2);
        assert_eq!(m.best_kept, Some(0.80));
        // A round whose local training scores above the best kept is judged
        // against the kept best, not against its own local student.
        let v = m.judge(0.95, 0.79, 0.02);
        assert!(!v.rolled_back && v.best == 0.80 && v.kept() == 0.79);
    }

    #[test]
    fn an_omitted_table_rolls_back_and_an_omitted_tolerance_only_measures() {
        #[derive(Deserialize)]
        struct File {
            #[serde(default)]
            rollback: RollbackConfig,
        }
        let absent: File = toml::from_str("").unwrap();
        assert_eq!(absent.rollback, RollbackConfig::default());
        assert!(absent.rollback.enabled());
        let measure: File = toml::from_str("[rollback]\nvalidation_fraction = 0.2\n").unwrap();
        assert_eq!(measure.rollback.rollback_tolerance, None);
        assert!(!measure.rollback.enabled());
        let typo = toml::from_str::<File>("[rollback]\ntolerance = 0.1\n");
        assert!(typo.is_err(), "unknown fields are refused");
    }

    #[test]
    fn fields_are_validated_with_their_names() {
        assert!(RollbackConfig::default().validate().is_ok());
        assert!(RollbackConfig::off().validate().is_ok());
        let bad = |c: RollbackConfig| c.validate().unwrap_err().0;
        assert_eq!(
            bad(RollbackConfig {
                validation_fraction: 1.0,
                ..RollbackConfig::default()
            }),
            "rollback.validation_fraction"
        );
        assert_eq!(
            bad(RollbackConfig {
                validation_fraction: -0.1,
                ..RollbackConfig::default()
            }),
            "rollback.validation_fraction"
        );
        assert_eq!(
            bad(RollbackConfig {
                rollback_tolerance: Some(-0.01),
                ..RollbackConfig::default()
            }),
            "rollback.rollback_tolerance"
        );
        assert_eq!(
            bad(RollbackConfig {
                validation_fraction: 0.0,
                ..RollbackConfig::default()
            }),
            "rollback.rollback_tolerance"
        );
    }

    #[test]
    fn a_best_student_file_round_trips_and_refuses_corruption() {
        let best = BestStudent {
            validation_accuracy: 0.8125,
            checkpoint: Checkpoint {
                federation_id: "f".into(),
                member: fd_protocol::SigningKey::from_seed([3; 32]).public_key(),
                round: 4,
                learner: vec![1, 2, 3, 4, 5],
                weights_digest: sha256(b"w"),
            },
        };
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("m.best");
        assert!(BestStudent::load(&path).unwrap().is_none());
        best.save(&path).unwrap();
        assert_eq!(BestStudent::load(&path).unwrap(), Some(best.clone()));
        let mut bytes = best.encode();
        bytes[fd_data::fsutil::SEAL_HEADER + 2] ^= 1;
        assert!(matches!(
            BestStudent::decode(&bytes, &path),
            Err(BestStudentError::Checksum { .. })
        ));
        let bytes = best.encode();
        assert!(BestStudent::decode(&bytes[..bytes.len() - 1], &path).is_err());
    }
}

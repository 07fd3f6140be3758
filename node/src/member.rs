//! The learning side of one federation member: its data, its student and
//! the steps of a round, with no networking.
//!
//! The networked runtime ([`crate::runtime`]), the isolated baseline and the
//! simulator all drive a [`LocalMember`] through the same calls, so there is
//! one implementation of what a round does to a student.

use std::sync::Arc;
use std::time::Instant;

use fd_protocol::{Digest, FederationManifest, PublicKey};

use crate::aggregate::{AggregateError, Aggregator, Contribution, EnsembleTeacher};
use crate::knowledge::{self, KnowledgeConfig, Selector, SharedKnowledge};
use crate::checkpoint::Checkpoint;
use crate::config::NodeConfig;
use fd_data::DataSplits;
use fd_data::public::{round_subset, split_public};
use crate::learner::{Learner, LearnerStateError};
use crate::model::InputShape;
use crate::rollback::{Monitor, RollbackConfig, Verdict, validation_split};

/// Seconds spent in each step of a round.
#[derive(Debug, Default, Clone, Copy, PartialEq)]
pub struct StepTimes {
    pub train: f64,
    pub predict: f64,
    pub aggregate: f64,
    pub distill: f64,
    /// Scoring the public rows with the knowledge selector.
    pub select: f64,
}

/// Where a member's samples come from: the data (shared, read-only, so a
/// simulator holds one copy for hundreds of members), the public set and
/// this member's private part.
#[derive(Clone)]
pub struct MemberData {
    pub data: Arc<DataSplits>,
    pub manifest: FederationManifest,
    /// Indices into `data.train` of the public set, in manifest order.
    pub public: Vec<usize>,
    /// Indices into `data.train` of every member's private part, by partition index.
    pub parts: Arc<Vec<Vec<usize>>>,
}

impl MemberData {
    /// Loads the data, derives the public set and partitions the rest the
    /// way `config` says; the result serves every member of the federation.
    pub fn load(config: &NodeConfig) -> anyhow::Result<Self> {
        Self::from_data(config, Arc::new(config.data.load()?))
    }

    /// Member `index`'s private part `part` split into the samples it
    /// trains on and its validation hold-out (never trained on: the
    /// member's rounds and `fd-node compress` both take it from here).
    /// Seeded by what identifies the member's data and student, so a
    /// restarted node holds out the same samples.
    pub fn trained_and_validation(
        &self,
        config: &NodeConfig,
        index: usize,
        part: &[usize],
    ) -> (Vec<usize>, Vec<usize>) {
        validation_split(
            part,
            &self.data.train.labels_of(part),
            self.data.train.classes,
            config.rollback.validation_fraction,
            &[config.federation.seed, index as u64, config.training.seed],
        )
    }

    /// As [`Self::load`], for data already in memory.
    pub fn from_data(config: &NodeConfig, data: Arc<DataSplits>) -> anyhow::Result<Self> {
        let manifest = config.federation.manifest(&data)?;
        let split = split_public(
            data.train.len(),
            config.federation.public_size,
            config.federation.seed,
        )?;
        let labels = data.train.labels_of(&split.private);
        let parts = config.partition.scheme.partition(
            &labels,
            data.train.classes,
            config.partition.nodes,
            config.federation.seed,
        )?;
        // Partition positions refer to the private pool; map them back to the training set.
        let parts = parts
            .into_iter()
            .map(|part| part.iter().map(|&p| split.private[p]).collect())
            .collect();
        Ok(MemberData {
            data,
            manifest,
            public: split.public,
            parts: Arc::new(parts),
        })
    }
}

/// Why [`LocalMember::restore`] refused a checkpoint; the member is unchanged.
#[derive(Debug, thiserror::Error)]
pub enum RestoreError {
    #[error("the checkpoint is of federation {saved:?}, this member is in {here:?}")]
    Federation { saved: String, here: String },
    #[error("the checkpoint belongs to member {saved}, this member is {here}")]
    Member { saved: String, here: String },
    #[error("the checkpoint's learner state does not fit this member: {0}")]
    Learner(#[from] LearnerStateError),
    #[error("restored weights have digest {restored}, the checkpoint says {saved}")]
    WeightsDigest { saved: Digest, restored: Digest },
}

pub struct LocalMember {
    pub name: String,
    pub data: Arc<DataSplits>,
    /// Indices into `data.train` of the public set, in manifest order.
    pub public: Vec<usize>,
    /// Indices into `data.train` of the private samples this member trains
    /// on (its validation split excluded).
    pub private: Vec<usize>,
    /// Indices into `data.train` of the private samples held out to judge
    /// its student ([`crate::rollback`]); never trained, selected or distilled on.
    pub validation: Vec<usize>,
    /// `[rollback]`: the split's size and the tolerance rounds are judged with.
    pub rollback: RollbackConfig,
    /// Best validation accuracy kept so far and rollbacks counted.
    pub monitor: Monitor,
    pub learner: Learner,
    pub manifest: FederationManifest,
    pub aggregator: Aggregator,
    /// What this member says it knows, and which teacher rows it distils.
    pub knowledge: KnowledgeConfig,
    /// Private samples per class: read by the `class-coverage` selector,
    /// never shared.
    label_counts: Vec<usize>,
    /// Private samples the `density` selector measures distances to.
    anchors: Vec<usize>,
    /// δ of the ε the learner reports under DP-SGD (`[dp] delta`).
    pub dp_delta: f64,
    pub times: StepTimes,
    /// How often the last teacher this member distilled towards agreed with
    /// the labels the public rows carry (argmax over kept rows): a research
    /// measure the simulator reports (`teacher_accuracy` in metrics.csv),
    /// never shared. `None` before the first distillation.
    pub last_teacher_accuracy: Option<f64>,
}

impl LocalMember {
    /// Loads the data, derives the public set and this member's private
    /// partition, and builds the student.
    pub fn prepare(config: &NodeConfig) -> anyhow::Result<Self> {
        Self::with_data(config, &MemberData::load(config)?, config.partition.index)
    }

    /// Builds the member holding part `index` of `shared`, with the student,
    /// recipe and aggregator of `config`.
    pub fn with_data(
        config: &NodeConfig,
        shared: &MemberData,
        index: usize,
    ) -> anyhow::Result<Self> {
        let data = shared.data.clone();
        let part = shared.parts.get(index).ok_or_else(|| {
            anyhow::anyhow!(
                "partition index {index} is out of range ({} parts)",
                shared.parts.len()
            )
        })?;
        config
            .rollback
            .validate()
            .map_err(|(field, reason)| anyhow::anyhow!("field `{field}` {reason}"))?;
        let (private, validation) = shared.trained_and_validation(config, index, part);
        if config.rollback.enabled() && validation.is_empty() {
            anyhow::bail!(
                "field `rollback.validation_fraction` = {} holds out no sample of this member's {} private ones; raise it or remove `rollback.rollback_tolerance`",
                config.rollback.validation_fraction,
                part.len()
            );
        }
        let input = InputShape::new(data.train.shape);
        config.model.validate(input).map_err(|reason| {
            anyhow::anyhow!("[model] does not fit the data ({}): {reason}", data.source)
        })?;
        let summary = config.model.describe(input, data.train.classes);
        tracing::debug!(
            node = %config.name,
            model = %summary.name,
            params = summary.params,
            weight_bytes = summary.weight_bytes,
            "student"
        );
        if !matches!(config.device, crate::device::DeviceKind::Flex) {
            config
                .device
                .probe()
                .map_err(|reason| anyhow::anyhow!("field `device`: {reason}"))?;
        }
        let mut learner = Learner::new(
            &config.model,
            config.training.clone(),
            config.device,
            input,
            data.train.classes,
        );
        if config.dp.enabled {
            learner
                .enable_dp(config.dp.clone(), private.len())
                .map_err(|e| anyhow::anyhow!("[dp]: {e}"))?;
        }
        if config.knowledge.selector != Selector::All && !config.aggregator.uses_row_weights() {
            tracing::warn!(
                node = %config.name,
                selector = config.knowledge.selector.name(),
                aggregator = ?config.aggregator,
                "this aggregator combines raw logits and ignores row weights: the member's weights travel, but its own teacher does not use anyone's"
            );
        }
        let label_counts =
            knowledge::label_counts(data.train.labels_of(&private), data.train.classes);
        let anchors = knowledge::density_anchors(
            &private,
            config.knowledge.density.anchors,
            config.training.seed,
        );
        Ok(LocalMember {
            name: config.name.clone(),
            public: shared.public.clone(),
            private,
            learner,
            manifest: shared.manifest.clone(),
            aggregator: config.aggregator,
            knowledge: config.knowledge.clone(),
            validation,
            rollback: config.rollback.clone(),
            monitor: Monitor::default(),
            label_counts,
            anchors,
            dp_delta: config.dp.delta,
            data,
            times: StepTimes::default(),
            last_teacher_accuracy: None,
        })
    }

    pub fn classes(&self) -> usize {
        self.data.train.classes
    }

    /// Indices into `data.train` of the public samples of `round`.
    pub fn subset_indices(&self, round: u64) -> Vec<usize> {
        round_subset(
            self.public.len(),
            self.manifest.subset_size as usize,
            self.manifest.seed,
            round,
        )
        .into_iter()
        .map(|p| self.public[p])
        .collect()
    }

    /// Step 1: local supervised training on private data.
    pub fn train(&mut self) -> f64 {
        // Names the member in the learner's own log lines (e.g. DP budget reached).
        let _span = tracing::info_span!("member", node = %self.name).entered();
        let start = Instant::now();
        let loss = self.learner.train_local(&self.data.train, &self.private);
        self.times.train = start.elapsed().as_secs_f64();
        loss
    }

    /// Step 2: logits on the round's public subset (subset rows × classes).
    pub fn predict(&mut self, round: u64) -> Vec<f32> {
        let start = Instant::now();
        let logits = self
            .learner
            .predict(&self.data.train, &self.subset_indices(round));
        self.times.predict = start.elapsed().as_secs_f64();
        logits
    }

    /// Step 2½: this member's knowledge weight of each row of `logits`
    /// (its prediction on the round's subset) under its selector, quantised
    /// as they travel; `None` under `all`.
    pub fn select(&mut self, round: u64, logits: &[f32]) -> Option<fd_protocol::RowWeights> {
        let start = Instant::now();
        self.times.select = 0.0;
        let classes = self.classes();
        let weights = match self.knowledge.selector {
            Selector::All => return None,
            Selector::Confidence => knowledge::confidence_weights(logits, classes),
            Selector::ClassCoverage => {
                knowledge::class_coverage_weights(logits, classes, &self.label_counts)
            }
            Selector::Density => {
                let (rows, dim) = self
                    .learner
                    .features(&self.data.train, &self.subset_indices(round));
                let (anchors, _) = self.learner.features(&self.data.train, &self.anchors);
                knowledge::density_weights(&rows, &anchors, dim, &self.knowledge.density).0
            }
        };
        self.times.select = start.elapsed().as_secs_f64();
        Some(
            fd_protocol::RowWeights::quantize(&weights)
                .expect("every selector scores in [0, 1]"),
        )
    }

    /// Step 4: the teacher from this member's own knowledge and the
    /// accepted peers', each weighted per row as its share says, filtered
    /// by `[knowledge]`.
    pub fn teacher(
        &self,
        own: &SharedKnowledge,
        peers: &[SharedKnowledge],
    ) -> Result<EnsembleTeacher, AggregateError> {
        let all: Vec<Contribution> = std::iter::once(own)
            .chain(peers)
            .map(SharedKnowledge::contribution)
            .collect();
        self.aggregator.aggregate_filtered(
            &all,
            self.manifest.subset_size as usize,
            self.classes(),
            self.knowledge.filter(),
        )
    }

    /// [`Self::teacher`], recording its time in [`StepTimes::aggregate`].
    pub fn teacher_timed(
        &mut self,
        own: &SharedKnowledge,
        peers: &[SharedKnowledge],
    ) -> Result<EnsembleTeacher, AggregateError> {
        let start = Instant::now();
        let teacher = self.teacher(own, peers);
        self.times.aggregate = start.elapsed().as_secs_f64();
        teacher
    }

    /// Step 4 under secure aggregation: the teacher of the round's unmasked
    /// sums, recording its time in [`StepTimes::aggregate`].
    pub fn teacher_of_sums_timed(
        &mut self,
        sums: &fd_protocol::secagg::KnowledgeSums,
        contributors: usize,
    ) -> Result<EnsembleTeacher, AggregateError> {
        let start = Instant::now();
        let teacher = self
            .aggregator
            .aggregate_sums(sums, contributors, self.knowledge.filter());
        self.times.aggregate = start.elapsed().as_secs_f64();
        teacher
    }

    /// Step 5: distil the teacher into the student on the round's subset,
    /// on the rows the teacher kept only (none kept: the student is left
    /// as it is and the loss is 0).
    pub fn distill(&mut self, round: u64, teacher: &EnsembleTeacher) -> f64 {
        let _span = tracing::info_span!("member", node = %self.name).entered();
        let start = Instant::now();
        let t = self.learner.temperature(round, self.manifest.rounds);
        let classes = self.classes();
        let mut indices = Vec::with_capacity(teacher.rows);
        let mut logits = Vec::with_capacity(teacher.logits.len());
        for ((index, row), kept) in self
            .subset_indices(round)
            .into_iter()
            .zip(teacher.logits.chunks(classes))
            .zip(&teacher.kept)
        {
            if *kept {
                indices.push(index);
                logits.extend_from_slice(row);
            }
        }
        let loss = if indices.is_empty() {
            0.0
        } else {
            self.learner
                .distill(&self.data.train, &indices, &logits, t, &self.private)
        };
        self.times.distill = start.elapsed().as_secs_f64();
        loss
    }

    /// Accuracy of the current student on the validation split; `None` without one.
    pub fn validation_accuracy(&self) -> Option<f64> {
        (!self.validation.is_empty())
            .then(|| self.learner.accuracy_on(&self.data.train, &self.validation))
    }

    /// Step 5 under monitoring ([`crate::rollback`]): distils like
    /// [`Self::distill`], then judges the result on the validation split
    /// and, when it fell more than `rollback_tolerance` below the best so
    /// far, restores the learner state from before the distillation (the
    /// privacy DP-SGD spent stays counted). Returns the loss and the verdict
    /// (`None` when rollback is off).
    pub fn distill_monitored(
        &mut self,
        round: u64,
        teacher: &EnsembleTeacher,
    ) -> (f64, Option<Verdict>) {
        let labels = self.data.train.labels_of(&self.subset_indices(round));
        self.last_teacher_accuracy = teacher.accuracy(&labels);
        let Some(tolerance) = self.rollback.rollback_tolerance.filter(|_| self.rollback.enabled())
        else {
            return (self.distill(round, teacher), None);
        };
        let before = self
            .validation_accuracy()
            .expect("rollback is only enabled with a validation split");
        let saved = self.learner.state_bytes();
        let loss = self.distill(round, teacher);
        let after = self
            .validation_accuracy()
            .expect("rollback is only enabled with a validation split");
        let verdict = self.monitor.judge(before, after, tolerance);
        if verdict.rolled_back {
            self.learner
                .undo_to_state(&saved)
                .expect("a state this learner just saved fits it");
            tracing::warn!(
                node = %self.name,
                round,
                before = verdict.before,
                after = verdict.after,
                best = verdict.best,
                tolerance,
                rollbacks = self.monitor.rollbacks,
                "rolled back the distillation: validation accuracy {:.4} is {:.4} below the best {:.4} (tolerance {tolerance}); keeping the student from before it ({:.4})",
                verdict.after,
                verdict.best - verdict.after,
                verdict.best,
                verdict.before
            );
        }
        (loss, Some(verdict))
    }

    /// The validation accuracy of the student this member keeps at the end
    /// of a round (`verdict`: the distillation's, when it was judged),
    /// recorded in [`Self::monitor`]; `None` without a validation split.
    pub fn end_round_validation(&mut self, verdict: Option<&Verdict>) -> Option<f64> {
        let accuracy = match verdict {
            Some(v) => Some(v.kept()),
            None => self.validation_accuracy(),
        }?;
        self.monitor.observe_kept(accuracy);
        Some(accuracy)
    }

    /// Test accuracy of the current student.
    pub fn evaluate(&self) -> f64 {
        self.learner.evaluate(&self.data.test)
    }

    /// [`Learner::weights_digest`] of the student.
    pub fn weights_digest(&self) -> Digest {
        self.learner.weights_digest()
    }

    /// This member's learning state after completing `round`, as `member`
    /// (the member's public key, which the learning side does not hold).
    pub fn checkpoint(&self, round: u64, member: PublicKey) -> Checkpoint {
        Checkpoint {
            federation_id: self.manifest.federation_id.clone(),
            member,
            round,
            learner: self.learner.state_bytes(),
            weights_digest: self.weights_digest(),
        }
    }

    /// Puts the student, optimizer and shuffling back as `checkpoint` saved
    /// them; the next round to run is `checkpoint.round + 1`. Refuses a
    /// checkpoint of another federation or member, or of another
    /// architecture or optimizer.
    pub fn restore(
        &mut self,
        checkpoint: &Checkpoint,
        member: &PublicKey,
    ) -> Result<(), RestoreError> {
        if checkpoint.federation_id != self.manifest.federation_id {
            return Err(RestoreError::Federation {
                saved: checkpoint.federation_id.clone(),
                here: self.manifest.federation_id.clone(),
            });
        }
        if checkpoint.member != *member {
            return Err(RestoreError::Member {
                saved: checkpoint.member.to_hex(),
                here: member.to_hex(),
            });
        }
        // Kept to undo the restore if the digest disagrees; restores are rare, one copy is cheap.
        let previous = self.learner.state_bytes();
        self.learner.restore_state(&checkpoint.learner)?;
        let restored = self.weights_digest();
        if restored != checkpoint.weights_digest {
            self.learner
                .restore_state(&previous)
                .expect("a state this learner just saved fits it");
            return Err(RestoreError::WeightsDigest {
                saved: checkpoint.weights_digest,
                restored,
            });
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::argmax;
    use fd_protocol::PayloadEncoding;

    fn member(index: usize) -> LocalMember {
        member_with(index, "[rollback]\nvalidation_fraction = 0.0\n")
    }

    /// Member `index` of the test federation with `rollback` (a TOML table) appended.
    fn member_with(index: usize, rollback: &str) -> LocalMember {
        let text = format!(
            r#"name = "m{index}"
key_file = "k"
[federation]
id = "enc"
rounds = 1
public_size = 3000
subset_size = 1000
seed = 11
[data]
kind = "synthetic"
seed = 5
train = 12000
test = 2000
[partition]
nodes = 3
index = {index}
scheme = {{ kind = "dirichlet", alpha = 0.5 }}
[training]
seed = {index}
local_epochs = 2
{rollback}"#
        );
        LocalMember::prepare(&NodeConfig::parse(&text, std::path::Path::new("m.toml")).unwrap())
            .unwrap()
    }

    /// One round with no peers: train, predict, teacher of own logits alone,
    /// distil, evaluate. Uses every learning step and both RNG consumers.
    fn solo_round(m: &mut LocalMember, round: u64) -> f64 {
        m.train();
        let own = m.predict(round);
        let teacher = m
            .teacher(&SharedKnowledge::new(own, m.private.len() as u64, None), &[])
            .unwrap();
        m.distill(round, &teacher);
        m.evaluate()
    }

    /// A teacher whose every row claims `class` with a large margin (the
    /// `constant-class` attack of fd-sim's scenarios, as a whole teacher:
    /// what a mean aggregator gives when poisoned shares dominate).
    fn constant_class_teacher(m: &LocalMember, class: usize) -> EnsembleTeacher {
        let rows = m.manifest.subset_size as usize;
        let classes = m.classes();
        let mut logits = vec![0.0f32; rows * classes];
        for row in logits.chunks_mut(classes) {
            row[class] = 20.0;
        }
        EnsembleTeacher {
            logits,
            rows,
            classes,
            contributors: 1,
            kept: vec![true; rows],
        }
    }

    const ROLLBACK: &str = "[rollback]\nvalidation_fraction = 0.2\nrollback_tolerance = 0.02\n";

    /// Issue 16 §3: a clean round keeps its distillation; a round whose
    /// teacher says "class c" for everything is rolled back to exactly the
    /// learner state from before the distillation (student, optimizer,
    /// RNG), and the verdict and counter say so.
    #[test]
    fn a_constant_class_poisoned_teacher_is_rolled_back_and_a_clean_one_is_not() {
        let mut m = member_with(0, ROLLBACK);
        assert!(!m.validation.is_empty());

        // Round 1, clean: the teacher is the member's own knowledge.
        m.train();
        let own = m.predict(1);
        let teacher = m
            .teacher(&SharedKnowledge::new(own, m.private.len() as u64, None), &[])
            .unwrap();
        let pre = m.weights_digest();
        let (_, verdict) = m.distill_monitored(1, &teacher);
        let verdict = verdict.expect("rollback is on");
        assert!(!verdict.rolled_back, "clean round rolled back: {verdict:?}");
        assert_ne!(m.weights_digest(), pre, "the clean distillation is kept");
        assert_eq!(m.monitor.rollbacks, 0);
        let kept = m.end_round_validation(Some(&verdict)).unwrap();
        assert_eq!(Some(kept), m.validation_accuracy());

        // Round 2, poisoned: everything is the member's least common class.
        m.train();
        let rarest = (0..m.classes())
            .min_by_key(|&c| m.label_counts[c])
            .unwrap();
        let state_before = m.learner.state_bytes();
        let digest_before = m.weights_digest();
        let (_, verdict) = m.distill_monitored(2, &constant_class_teacher(&m, rarest));
        let verdict = verdict.expect("rollback is on");
        assert!(
            verdict.rolled_back,
            "poisoned round kept: {verdict:?} (best {:?})",
            m.monitor.best_kept
        );
        assert!(verdict.after < verdict.best - 0.02);
        assert_eq!(m.weights_digest(), digest_before, "student restored");
        assert_eq!(m.monitor.rollbacks, 1);
        assert_eq!(m.validation_accuracy(), Some(verdict.before));
        assert_eq!(m.end_round_validation(Some(&verdict)), Some(verdict.before));
        // Optimizer and RNG restored too: the member trains on exactly like
        // one given the state from before the distillation. (The bytes
        // themselves may order the optimizer record differently.)
        let mut twin = member_with(0, ROLLBACK);
        twin.learner.restore_state(&state_before).unwrap();
        m.train();
        twin.train();
        assert_eq!(m.weights_digest(), twin.weights_digest());
    }

    /// Without a tolerance the same poisoned round is kept: the rollback
    /// above is the monitor's doing, not something distillation does anyway.
    #[test]
    fn without_a_tolerance_the_poisoned_round_is_kept() {
        let mut m = member_with(0, "[rollback]\nvalidation_fraction = 0.2\n");
        m.train();
        let before = m.validation_accuracy().unwrap();
        let digest = m.weights_digest();
        let (_, verdict) = m.distill_monitored(1, &constant_class_teacher(&m, 0));
        assert!(verdict.is_none());
        assert_ne!(m.weights_digest(), digest);
        assert!(m.validation_accuracy().unwrap() < before - 0.02);
    }

    /// The split is part of the member: disjoint from what it trains on,
    /// the same for the same seeds, different for another training seed;
    /// fraction 0 trains on the whole partition, as before rollback existed.
    #[test]
    fn the_validation_split_is_held_out_of_training_and_deterministic() {
        let a = member_with(1, ROLLBACK);
        let b = member_with(1, ROLLBACK);
        let whole = member(1);
        assert_eq!((&a.private, &a.validation), (&b.private, &b.validation));
        let held: std::collections::HashSet<_> = a.validation.iter().collect();
        assert!(a.private.iter().all(|i| !held.contains(i)));
        assert!(a.anchors.iter().all(|i| !held.contains(i)), "density anchors too");
        let mut all: Vec<usize> = a.private.iter().chain(&a.validation).copied().collect();
        all.sort_unstable();
        let mut part = whole.private.clone();
        part.sort_unstable();
        assert_eq!(all, part);
        assert!(whole.validation.is_empty());
        let share = a.validation.len() as f64 / part.len() as f64;
        assert!((share - 0.2).abs() < 0.02, "{share}");
    }

    /// Rounds 1–2, checkpoint through a file, round 3; versus a member that
    /// had trained on its own and is then restored from that file: round 3
    /// gives the same accuracy and bit-identical weights.
    #[test]
    fn a_restored_member_continues_exactly_where_the_checkpoint_was_taken() {
        let key = fd_protocol::SigningKey::from_seed([1; 32]).public_key();
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("m0.ckpt");

        let mut a = member(0);
        solo_round(&mut a, 1);
        solo_round(&mut a, 2);
        a.checkpoint(2, key).save(&path).unwrap();
        let digest_at_2 = a.weights_digest();
        let accuracy_a = solo_round(&mut a, 3);

        let mut b = member(0);
        solo_round(&mut b, 1); // state of its own, which the restore must replace
        let checkpoint = Checkpoint::load(&path).unwrap().unwrap();
        assert_eq!(
            (checkpoint.round, checkpoint.weights_digest),
            (2, digest_at_2)
        );
        b.restore(&checkpoint, &key).unwrap();
        assert_eq!(b.weights_digest(), digest_at_2);
        let accuracy_b = solo_round(&mut b, checkpoint.round + 1);
        assert_eq!(accuracy_a, accuracy_b);
        assert_eq!(a.weights_digest(), b.weights_digest());
        assert_ne!(
            a.weights_digest(),
            digest_at_2,
            "round 3 changed the weights"
        );
    }

    #[test]
    fn a_checkpoint_of_another_federation_member_or_student_is_refused() {
        let key = fd_protocol::SigningKey::from_seed([1; 32]).public_key();
        let other = fd_protocol::SigningKey::from_seed([2; 32]).public_key();
        let mut m = member(0);
        let before = m.weights_digest();
        let good = member(1).checkpoint(0, key);

        let foreign = Checkpoint {
            federation_id: "other".into(),
            ..good.clone()
        };
        assert!(matches!(
            m.restore(&foreign, &key),
            Err(RestoreError::Federation { .. })
        ));
        assert!(matches!(
            m.restore(&good, &other),
            Err(RestoreError::Member { .. })
        ));
        let lying = Checkpoint {
            weights_digest: fd_protocol::digest::sha256(b"not these weights"),
            ..good.clone()
        };
        assert!(matches!(
            m.restore(&lying, &key),
            Err(RestoreError::WeightsDigest { .. })
        ));
        let garbage = Checkpoint {
            learner: b"FDLS".to_vec(),
            ..good.clone()
        };
        assert!(matches!(
            m.restore(&garbage, &key),
            Err(RestoreError::Learner(_))
        ));
        assert_eq!(
            m.weights_digest(),
            before,
            "refusals leave the member unchanged"
        );
        m.restore(&good, &key).unwrap();
        assert_eq!(m.weights_digest(), good.weights_digest);
    }

    /// The teacher's accuracy on the round's public subset when every share
    /// travels in `encoding`, next to f32. Prints the table quoted in
    /// docs/performance.md.
    #[test]
    fn compressed_payloads_keep_the_teachers_accuracy() {
        let mut members: Vec<LocalMember> = (0..3).map(member).collect();
        let logits: Vec<Vec<f32>> = members
            .iter_mut()
            .map(|m| {
                m.train();
                m.predict(1)
            })
            .collect();
        let labels = members[0]
            .data
            .train
            .labels_of(&members[0].subset_indices(1));
        let accuracy = |encoding: PayloadEncoding| {
            let decoded: Vec<Vec<f32>> = logits
                .iter()
                .map(|l| {
                    let payload = encoding.encode(l, 10).unwrap();
                    encoding.decode(&payload, 1000, 10).unwrap()
                })
                .collect();
            let peers: Vec<SharedKnowledge> = decoded[1..]
                .iter()
                .map(|l| SharedKnowledge::new(l.clone(), 1, None))
                .collect();
            let own = SharedKnowledge::new(decoded[0].clone(), 1, None);
            let teacher = members[0].teacher(&own, &peers).unwrap();
            let correct = teacher
                .logits
                .chunks(10)
                .zip(&labels)
                .filter(|(row, label)| argmax(row) == **label as usize)
                .count();
            (
                correct as f64 / labels.len() as f64,
                encoding.payload_len(1000, 10),
            )
        };
        let (reference, f32_bytes) = accuracy(PayloadEncoding::F32Le);
        println!("encoding | payload bytes | teacher accuracy | change vs f32");
        for (encoding, max_loss) in [
            (PayloadEncoding::F32Le, 0.0),
            (PayloadEncoding::F16Le, 0.002),
            (PayloadEncoding::Int8, 0.01),
            (PayloadEncoding::TopK { k: 3 }, 0.03),
            (PayloadEncoding::TopK { k: 1 }, 0.10),
        ] {
            let (acc, bytes) = accuracy(encoding);
            println!(
                "{:>8} | {bytes:>13} | {acc:>16.4} | {:+.4}",
                encoding.name(),
                acc - reference
            );
            assert!(
                acc >= reference - max_loss,
                "{} loses {:.4}",
                encoding.name(),
                reference - acc
            );
            assert!(bytes <= f32_bytes);
        }
        assert!(
            reference > 0.5,
            "the f32 teacher learned something: {reference}"
        );
    }
}

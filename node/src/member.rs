//! The learning side of one federation member: its data, its student and
//! the steps of a round, with no networking.
//!
//! The networked runtime ([`crate::runtime`]), the isolated baseline and the
//! simulator all drive a [`LocalMember`] through the same calls, so there is
//! one implementation of what a round does to a student.

use std::time::Instant;

use fd_protocol::FederationManifest;

use crate::aggregate::{AggregateError, Aggregator, Contribution, EnsembleTeacher};
use crate::config::NodeConfig;
use crate::data::DataSplits;
use crate::data::public::{round_subset, split_public};
use crate::learner::Learner;
use crate::model::InputShape;

/// Seconds spent in each step of a round.
#[derive(Debug, Default, Clone, Copy, PartialEq)]
pub struct StepTimes {
    pub train: f64,
    pub predict: f64,
    pub distill: f64,
}

pub struct LocalMember {
    pub name: String,
    pub data: DataSplits,
    /// Indices into `data.train` of the public set, in manifest order.
    pub public: Vec<usize>,
    /// Indices into `data.train` of this member's private samples.
    pub private: Vec<usize>,
    pub learner: Learner,
    pub manifest: FederationManifest,
    pub aggregator: Aggregator,
    pub times: StepTimes,
}

impl LocalMember {
    /// Loads the data, derives the public set and this member's private
    /// partition, and builds the student.
    pub fn prepare(config: &NodeConfig) -> anyhow::Result<Self> {
        let data = config.data.load()?;
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
        let private = parts[config.partition.index]
            .iter()
            .map(|&p| split.private[p])
            .collect();
        let learner = Learner::new(
            &config.model,
            config.training.clone(),
            config.device,
            InputShape::new(data.train.shape),
            data.train.classes,
        );
        Ok(LocalMember {
            name: config.name.clone(),
            public: split.public,
            private,
            learner,
            manifest,
            aggregator: config.aggregator,
            data,
            times: StepTimes::default(),
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

    /// Step 4: the teacher from own and accepted peer logits, each peer's
    /// with the sample count its share declared.
    pub fn teacher(
        &self,
        own: &[f32],
        peers: &[(Vec<f32>, u64)],
    ) -> Result<EnsembleTeacher, AggregateError> {
        let mut all = vec![Contribution {
            logits: own,
            samples: self.private.len() as u64,
        }];
        all.extend(peers.iter().map(|(logits, samples)| Contribution {
            logits,
            samples: *samples,
        }));
        self.aggregator
            .aggregate(&all, self.manifest.subset_size as usize, self.classes())
    }

    /// Step 5: distil the teacher into the student on the round's subset.
    pub fn distill(&mut self, round: u64, teacher: &EnsembleTeacher) -> f64 {
        let start = Instant::now();
        let t = self.learner.temperature(round, self.manifest.rounds);
        let loss = self.learner.distill(
            &self.data.train,
            &self.subset_indices(round),
            &teacher.logits,
            t,
            &self.private,
        );
        self.times.distill = start.elapsed().as_secs_f64();
        loss
    }

    /// Test accuracy of the current student.
    pub fn evaluate(&self) -> f64 {
        self.learner.evaluate(&self.data.test)
    }
}

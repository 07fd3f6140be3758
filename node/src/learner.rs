//! Local learning on one node: supervised training, prediction, distillation
//! and evaluation of its student.
//!
//! The [`Learner`] owns the student, its optimizer and its shuffling RNG, and
//! nothing else: data is passed in by reference, so the same learner serves
//! `fd-node`, the isolated baseline and the simulator. All randomness comes
//! from the training seed, so one config and seed give the same numbers.

use burn::nn::loss::CrossEntropyLossConfig;
use burn::optim::{
    AdamConfig, GradientsParams, ModuleOptimizer, SgdConfig, momentum::MomentumConfig,
};
use burn::prelude::*;
use burn::tensor::activation::{log_softmax, softmax};
use rand::SeedableRng;
use rand::seq::SliceRandom;
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use crate::data::Dataset;
use crate::device::DeviceKind;
use crate::model::{InputShape, ModelConfig, Student};

/// Optimizer of local training and distillation.
#[derive(Debug, Clone, Copy, PartialEq, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum OptimizerKind {
    #[default]
    Adam,
    /// SGD with momentum 0.9.
    Sgd,
}

/// The round recipe of one node (`[training]` in its config).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TrainingConfig {
    /// Epochs over the private data per round.
    pub local_epochs: usize,
    /// Epochs over the round's public subset, towards the teacher.
    pub distill_epochs: usize,
    pub batch_size: usize,
    pub learning_rate: f64,
    pub optimizer: OptimizerKind,
    /// Distillation temperature T (the KL term is scaled by T²).
    pub temperature: f64,
    /// Seed of weight initialisation and shuffling.
    pub seed: u64,
    /// Test samples used for evaluation (0 = all).
    pub eval_samples: usize,
}

impl Default for TrainingConfig {
    fn default() -> Self {
        TrainingConfig {
            local_epochs: 1,
            distill_epochs: 5,
            batch_size: 64,
            learning_rate: 1e-3,
            optimizer: OptimizerKind::Adam,
            temperature: 3.0,
            seed: 0,
            eval_samples: 0,
        }
    }
}

impl TrainingConfig {
    /// Checks every field, naming the first bad one.
    pub fn validate(&self) -> Result<(), String> {
        if self.batch_size == 0 {
            return Err("training.batch_size must be at least 1".into());
        }
        if !(self.learning_rate.is_finite() && self.learning_rate > 0.0) {
            return Err(format!(
                "training.learning_rate must be positive, got {}",
                self.learning_rate
            ));
        }
        if !(self.temperature.is_finite() && self.temperature > 0.0) {
            return Err(format!(
                "training.temperature must be positive, got {}",
                self.temperature
            ));
        }
        Ok(())
    }
}

/// A node's student with its optimizer.
pub struct Learner {
    student: Option<Student>,
    optimizer: ModuleOptimizer,
    device: Device,
    inference_device: Device,
    config: TrainingConfig,
    classes: usize,
    rng: ChaCha8Rng,
}

impl Learner {
    pub fn new(
        model: &ModelConfig,
        config: TrainingConfig,
        device: DeviceKind,
        input: InputShape,
        classes: usize,
    ) -> Self {
        let training_device = device.training_device();
        let student = model.init(input, classes, config.seed, &training_device);
        let optimizer = match config.optimizer {
            OptimizerKind::Adam => AdamConfig::new().init(),
            OptimizerKind::Sgd => SgdConfig::new()
                .with_momentum(Some(
                    MomentumConfig::new().with_momentum(0.9).with_dampening(0.0),
                ))
                .init(),
        };
        Learner {
            student: Some(student),
            optimizer,
            device: training_device,
            inference_device: device.device(),
            // A separate stream for shuffling, so changing the model does not change the order.
            rng: ChaCha8Rng::seed_from_u64(config.seed ^ 0x5eed_5eed),
            config,
            classes,
        }
    }

    pub fn config(&self) -> &TrainingConfig {
        &self.config
    }

    pub fn student(&self) -> &Student {
        self.student
            .as_ref()
            .expect("student is present between steps")
    }

    fn batch(&self, data: &Dataset, indices: &[usize], device: &Device) -> Tensor<2> {
        Tensor::from_data(
            TensorData::new(data.features_f32(indices), [indices.len(), data.features]),
            device,
        )
    }

    fn step(&mut self, loss: Tensor<1>) -> f64 {
        let value = loss
            .clone()
            .into_data()
            .iter::<f64>()
            .next()
            .unwrap_or(f64::NAN);
        let student = self
            .student
            .take()
            .expect("student is present between steps");
        let grads = GradientsParams::from_grads(loss.backward(), &student);
        self.student = Some(
            self.optimizer
                .step(self.config.learning_rate, student, grads),
        );
        value
    }

    /// Supervised epochs over `indices` of `data`; returns the mean loss of the last epoch.
    pub fn train_local(&mut self, data: &Dataset, indices: &[usize]) -> f64 {
        let loss_fn = CrossEntropyLossConfig::new().init(&self.device);
        let mut order = indices.to_vec();
        let mut last = f64::NAN;
        for _ in 0..self.config.local_epochs {
            order.shuffle(&mut self.rng);
            let (mut sum, mut batches) = (0.0, 0usize);
            for chunk in order.chunks(self.config.batch_size) {
                let x = self.batch(data, chunk, &self.device.clone());
                let labels: Vec<i64> = data.labels_of(chunk).into_iter().map(i64::from).collect();
                let y = Tensor::<1, Int>::from_data(
                    TensorData::new(labels, [chunk.len()]),
                    &self.device,
                );
                let logits = self.student().forward(x);
                sum += self.step(loss_fn.forward(logits, y));
                batches += 1;
            }
            last = sum / batches.max(1) as f64;
        }
        last
    }

    /// Logits on `indices` of `data`, row-major `indices.len() × classes`.
    pub fn predict(&self, data: &Dataset, indices: &[usize]) -> Vec<f32> {
        let model = self.student().valid();
        let mut out = Vec::with_capacity(indices.len() * self.classes);
        for chunk in indices.chunks(1024) {
            let x = self.batch(data, chunk, &self.inference_device);
            out.extend(model.forward(x).into_data().iter::<f32>());
        }
        out
    }

    /// Distils the teacher's logits (`indices.len() × classes`, aligned with
    /// `indices`) into the student: loss = T² · KL(softmax(t/T) ‖ softmax(s/T)).
    /// Returns the mean loss of the last epoch.
    pub fn distill(&mut self, data: &Dataset, indices: &[usize], teacher: &[f32]) -> f64 {
        assert_eq!(
            teacher.len(),
            indices.len() * self.classes,
            "teacher rows must match indices"
        );
        let t = self.config.temperature;
        let mut order: Vec<usize> = (0..indices.len()).collect();
        let mut last = f64::NAN;
        for _ in 0..self.config.distill_epochs {
            order.shuffle(&mut self.rng);
            let (mut sum, mut batches) = (0.0, 0usize);
            for chunk in order.chunks(self.config.batch_size) {
                let rows: Vec<usize> = chunk.iter().map(|&i| indices[i]).collect();
                let x = self.batch(data, &rows, &self.device.clone());
                let mut target = Vec::with_capacity(chunk.len() * self.classes);
                for &i in chunk {
                    target.extend_from_slice(&teacher[i * self.classes..(i + 1) * self.classes]);
                }
                let teacher_logits = Tensor::<2>::from_data(
                    TensorData::new(target, [chunk.len(), self.classes]),
                    &self.device,
                );
                let p = softmax(teacher_logits / t, 1);
                let log_q = log_softmax(self.student().forward(x) / t, 1);
                let kl = (p.clone() * (p.clamp_min(1e-12).log() - log_q))
                    .sum_dim(1)
                    .mean()
                    * (t * t);
                sum += self.step(kl);
                batches += 1;
            }
            last = sum / batches.max(1) as f64;
        }
        last
    }

    /// Fraction of `data` (its first `eval_samples`, or all) classified correctly.
    pub fn evaluate(&self, data: &Dataset) -> f64 {
        let n = match self.config.eval_samples {
            0 => data.len(),
            k => k.min(data.len()),
        };
        if n == 0 {
            return 0.0;
        }
        let indices: Vec<usize> = (0..n).collect();
        let logits = self.predict(data, &indices);
        let correct = logits
            .chunks(self.classes)
            .zip(data.labels_of(&indices))
            .filter(|(row, label)| argmax(row) == *label as usize)
            .count();
        correct as f64 / n as f64
    }
}

/// Index of the largest value (first on ties).
pub fn argmax(row: &[f32]) -> usize {
    let mut best = 0;
    for (i, v) in row.iter().enumerate() {
        if *v > row[best] {
            best = i;
        }
    }
    best
}

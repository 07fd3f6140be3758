//! Compressing a member's federated student into a smaller deployable one
//! (`fd-node compress`, issue 16 §4).
//!
//! Why: a member may train a large student in the federation (it only ever
//! shares logits, so its size costs nothing on the wire) and still need a
//! small model on the device it ships to. Distilling the federated student
//! into a small one keeps most of what the federation taught it; training
//! the small one from the labels alone does not see the teacher's knowledge
//! of the public set.
//!
//! What one stage optimises, per batch of the member's private samples
//! (labelled) and public samples (unlabelled), layered as in layered
//! distillation (weights per stage, [`LossWeights`]):
//! - **head** (response): `T² · KL(softmax(teacher/T) ‖ softmax(student/T))`
//!   on every sample (Hinton et al. 2015; T² keeps the gradient scale
//!   independent of T);
//! - **labels**: cross-entropy on the private samples of the batch;
//! - **backbone** and **neck** (hints, FitNets, Romero et al. 2015): the
//!   student's first and last stage ([`Student::forward_features`]) mapped
//!   by a learned linear projection onto the teacher's first and last stage,
//!   mean squared error divided by the teacher activations' mean square in
//!   the batch, so that a weight means the same for layers of any scale. The
//!   projections are trained with the student and thrown away afterwards.
//!
//! Progressive distillation ([`CompressOptions::via`]): teacher →
//! intermediate → … → small, each stage distilling the previous stage's
//! result, for when the gap between teacher and small student is large.
//!
//! Everything random (initial weights of students and projections, batch
//! order) derives from [`CompressOptions::seed`], and kernels run in a pool
//! of [`CompressOptions::threads`] threads (1: bit-identical reruns).
//! [`train_from_scratch`] is the baseline the report compares against: the
//! same student, seed, optimizer and number of steps, on the private labels
//! alone.

use std::path::{Path, PathBuf};

use burn::module::Module;
use burn::nn::{Linear, LinearConfig};
use burn::optim::{AdamConfig, GradientsParams};
use burn::prelude::*;
use burn::tensor::activation::log_softmax;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use fd_data::{Dataset, portable_shuffle};
use crate::device::DeviceKind;
use crate::export::{ExportFormat, ModelCard, Provenance, export_student, load_exported};
use crate::learner::distillation_kl;
use crate::model::{InputShape, ModelConfig, Student, batch_of, predicted_classes};

/// Weight of each loss term of a stage (0 switches a term off).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct LossWeights {
    /// Head: `T² · KL` to the teacher's softened outputs, on every sample.
    pub response: f64,
    /// Cross-entropy on the private (labelled) samples.
    pub label: f64,
    /// Hint between the first stages of student and teacher.
    pub backbone: f64,
    /// Hint between the last stages (the penultimate layers).
    pub neck: f64,
}

impl LossWeights {
    /// Response and labels only, no hints.
    pub fn response_only(&self) -> LossWeights {
        LossWeights {
            backbone: 0.0,
            neck: 0.0,
            ..*self
        }
    }

    fn hints(&self) -> bool {
        self.backbone > 0.0 || self.neck > 0.0
    }
}

impl Default for LossWeights {
    fn default() -> Self {
        LossWeights {
            response: 1.0,
            label: 0.5,
            backbone: 0.5,
            neck: 0.5,
        }
    }
}

/// How to compress.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CompressOptions {
    /// The small student.
    pub student: ModelConfig,
    /// Intermediate students of a progressive compression, largest first:
    /// teacher → via[0] → … → student. Empty: one stage.
    pub via: Vec<ModelConfig>,
    /// Epochs over private + public samples, per stage.
    pub epochs: usize,
    pub batch_size: usize,
    /// Adam's step size.
    pub learning_rate: f64,
    /// T of the response term.
    pub temperature: f64,
    pub weights: LossWeights,
    /// Seed of initial weights (student and projections) and batch order.
    pub seed: u64,
    /// CPU threads of the kernels (1: bit-identical reruns).
    pub threads: usize,
}

impl Default for CompressOptions {
    fn default() -> Self {
        CompressOptions {
            student: ModelConfig::Mlp { hidden: vec![32] },
            via: Vec::new(),
            epochs: 5,
            batch_size: 64,
            learning_rate: 1e-3,
            temperature: 4.0,
            weights: LossWeights::default(),
            seed: 0,
            threads: 1,
        }
    }
}

impl CompressOptions {
    /// Checks every field, naming the bad one.
    pub fn validate(&self) -> Result<(), CompressError> {
        let bad = |field: &'static str, reason: String| CompressError::Options { field, reason };
        if self.epochs == 0 {
            return Err(bad("epochs", "must be at least 1".into()));
        }
        if self.batch_size == 0 {
            return Err(bad("batch_size", "must be at least 1".into()));
        }
        if !(self.learning_rate.is_finite() && self.learning_rate > 0.0) {
            return Err(bad(
                "learning_rate",
                format!("must be a positive number, got {}", self.learning_rate),
            ));
        }
        if !(self.temperature.is_finite() && self.temperature > 0.0) {
            return Err(bad(
                "temperature",
                format!("must be a positive number, got {}", self.temperature),
            ));
        }
        let w = &self.weights;
        for (field, value) in [
            ("weights.response", w.response),
            ("weights.label", w.label),
            ("weights.backbone", w.backbone),
            ("weights.neck", w.neck),
        ] {
            if !(value.is_finite() && value >= 0.0) {
                return Err(bad(field, format!("must be ≥ 0, got {value}")));
            }
        }
        if w.response + w.label + w.backbone + w.neck == 0.0 {
            return Err(bad(
                "weights",
                "at least one weight must be positive".into(),
            ));
        }
        for (field, model) in
            std::iter::once(("student", &self.student)).chain(self.via.iter().map(|m| ("via", m)))
        {
            model
                .validate_fields()
                .map_err(|reason| bad(field, reason))?;
        }
        Ok(())
    }
}

/// The samples a compression trains on: the member's private (labelled)
/// and public (unlabelled) rows of one dataset.
#[derive(Clone, Copy)]
pub struct CompressData<'a> {
    pub data: &'a Dataset,
    pub private: &'a [usize],
    pub public: &'a [usize],
}

/// Mean loss terms of one epoch (unweighted; `total` is the weighted sum).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EpochLosses {
    pub epoch: usize,
    pub total: f64,
    pub response: Option<f64>,
    pub label: Option<f64>,
    pub backbone: Option<f64>,
    pub neck: Option<f64>,
}

/// One stage of a compression (or the from-scratch baseline).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StageReport {
    pub student: String,
    /// `None` for the from-scratch baseline.
    pub teacher: Option<String>,
    pub params: usize,
    pub steps: usize,
    pub weights: LossWeights,
    pub epochs: Vec<EpochLosses>,
    pub seconds: f64,
}

/// A compressed (or baseline) student, in inference mode on flex.
#[derive(Debug)]
pub struct Compressed {
    pub config: ModelConfig,
    pub student: Student,
    pub stages: Vec<StageReport>,
}

/// Why a compression could not run.
#[derive(Debug, thiserror::Error)]
pub enum CompressError {
    #[error("field `{field}`: {reason}")]
    Options { field: &'static str, reason: String },
    #[error("data: {0}")]
    Data(String),
    #[error("teacher: {0}")]
    Teacher(String),
    #[error(transparent)]
    Export(#[from] crate::export::ExportError),
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// Distils `teacher` (inference mode, on flex) into `options.student`,
/// through `options.via` when set. `input` and `classes` are the teacher's.
pub fn compress(
    teacher: &Student,
    teacher_name: &str,
    input: InputShape,
    classes: usize,
    data: CompressData<'_>,
    options: &CompressOptions,
) -> Result<Compressed, CompressError> {
    options.validate()?;
    check_data(input, classes, data)?;
    let pool = crate::fpenv::computing_pool(options.threads, "fd-compress");
    pool.install(|| {
        let mut stages = Vec::new();
        let mut current: Option<(ModelConfig, Student)> = None;
        for (i, config) in options.via.iter().chain([&options.student]).enumerate() {
            let (name, previous) = match &current {
                Some((c, s)) => (c.name(), s),
                None => (teacher_name.to_string(), teacher),
            };
            let (student, report) = train_stage(
                Some((previous, name.as_str())),
                config,
                input,
                classes,
                data,
                options,
                options.seed.wrapping_add(i as u64),
                None,
            )?;
            stages.push(report);
            current = Some((config.clone(), student));
        }
        let (config, student) = current.expect("at least the final stage ran");
        Ok(Compressed {
            config,
            student,
            stages,
        })
    })
}

/// The baseline: `options.student` trained on the private labels alone
/// (cross-entropy), same seed, optimizer and batch size, for as many steps
/// as one stage of [`compress`] takes.
pub fn train_from_scratch(
    input: InputShape,
    classes: usize,
    data: CompressData<'_>,
    options: &CompressOptions,
) -> Result<Compressed, CompressError> {
    options.validate()?;
    check_data(input, classes, data)?;
    let steps = steps_per_stage(data, options);
    let seed = options.seed.wrapping_add(options.via.len() as u64);
    let pool = crate::fpenv::computing_pool(options.threads, "fd-compress");
    pool.install(|| {
        let (student, report) = train_stage(
            None,
            &options.student,
            input,
            classes,
            data,
            options,
            seed,
            Some(steps),
        )?;
        Ok(Compressed {
            config: options.student.clone(),
            student,
            stages: vec![report],
        })
    })
}

/// Optimizer steps of one stage: `epochs · ⌈(private + public) / batch⌉`.
pub fn steps_per_stage(data: CompressData<'_>, options: &CompressOptions) -> usize {
    options.epochs * (data.private.len() + data.public.len()).div_ceil(options.batch_size)
}

/// Fraction of `data` that `student` (inference mode) classifies correctly.
pub fn accuracy(student: &Student, data: &Dataset) -> f64 {
    if data.is_empty() {
        return 0.0;
    }
    let predicted = predicted_classes(student, data, &DeviceKind::Flex.device());
    let correct = predicted
        .into_iter()
        .zip(&data.labels)
        .filter(|&(p, &label)| p == label as usize)
        .count();
    correct as f64 / data.len() as f64
}

fn check_data(input: InputShape, classes: usize, d: CompressData<'_>) -> Result<(), CompressError> {
    let shape = [input.channels, input.height, input.width];
    if d.data.shape != shape {
        return Err(CompressError::Data(format!(
            "samples are {:?} (channels, height, width), the teacher takes {shape:?}",
            d.data.shape
        )));
    }
    if d.data.classes > classes {
        return Err(CompressError::Data(format!(
            "the data has {} classes, the teacher {classes}",
            d.data.classes
        )));
    }
    if d.private.is_empty() {
        return Err(CompressError::Data("no private samples".into()));
    }
    if let Some(&i) = d
        .private
        .iter()
        .chain(d.public)
        .find(|&&i| i >= d.data.len())
    {
        return Err(CompressError::Data(format!(
            "sample index {i} is out of range ({} samples)",
            d.data.len()
        )));
    }
    Ok(())
}

/// The module a stage trains: the student and the hint projections (student
/// stage width → teacher stage width), which exist only during training.
#[derive(Module, Debug)]
struct Trainee {
    student: Student,
    backbone: Option<Linear>,
    neck: Option<Linear>,
}

/// A projection drawn from `seed` under the zoo's seeding lock, so its
/// initial weights depend on the seed alone (see [`ModelConfig::init`]).
fn projection(from: usize, to: usize, seed: u64, device: &Device) -> Linear {
    crate::model::seeded_init(device, seed, || {
        let linear = LinearConfig::new(from, to).init(device);
        let _ = linear.weight.val();
        if let Some(b) = &linear.bias {
            let _ = b.val();
        }
        linear
    })
}

/// Widths of the first and last stage of `model` (none: no hidden stage).
fn stage_widths(model: &Student, input: InputShape, device: &Device) -> Option<(usize, usize)> {
    let x = Tensor::<2>::zeros([1, input.features()], device);
    let (_, stages) = model.forward_features(x);
    Some((stages.first()?.dims()[1], stages.last()?.dims()[1]))
}

/// A scalar loss tensor's value.
fn value(t: &Tensor<1>) -> f64 {
    t.clone()
        .into_data()
        .iter::<f64>()
        .next()
        .unwrap_or(f64::NAN)
}

/// `mean((proj(s) − t)²) / mean(t²)`, the teacher side constant.
fn hint_loss(projection: &Linear, student: Tensor<2>, teacher: Tensor<2>) -> Tensor<1> {
    let energy = value(&teacher.clone().powi_scalar(2).mean()).max(1e-8);
    (projection.forward(student) - teacher)
        .powi_scalar(2)
        .mean()
        / energy
}

/// One stage: `teacher` (with its name) into a fresh `config`, or, without
/// a teacher, `config` on the private labels for `scratch_steps` steps.
#[allow(clippy::too_many_arguments)]
fn train_stage(
    teacher: Option<(&Student, &str)>,
    config: &ModelConfig,
    input: InputShape,
    classes: usize,
    data: CompressData<'_>,
    options: &CompressOptions,
    seed: u64,
    scratch_steps: Option<usize>,
) -> Result<(Student, StageReport), CompressError> {
    config
        .validate(input)
        .map_err(|reason| CompressError::Options {
            field: "student",
            reason,
        })?;
    let start = std::time::Instant::now();
    let kind = DeviceKind::Flex;
    let (train, infer) = (kind.training_device(), kind.device());
    let student = config.init(input, classes, seed, &train);
    let weights = match teacher {
        Some(_) => options.weights,
        None => LossWeights {
            response: 0.0,
            label: 1.0,
            backbone: 0.0,
            neck: 0.0,
        },
    };
    let (mut backbone, mut neck) = (None, None);
    if let Some((t, t_name)) = teacher
        && weights.hints()
    {
        let t_widths = stage_widths(t, input, &infer);
        let s_widths = stage_widths(&student.valid(), input, &infer);
        let (Some(tw), Some(sw)) = (t_widths, s_widths) else {
            return Err(CompressError::Options {
                field: "weights.backbone",
                reason: format!(
                    "hint losses need a hidden stage in teacher ({t_name}) and student ({}); \
                     set the backbone and neck weights to 0",
                    config.name()
                ),
            });
        };
        if weights.backbone > 0.0 {
            backbone = Some(projection(sw.0, tw.0, seed ^ 0xb4c6_b0e0, &train));
        }
        if weights.neck > 0.0 {
            neck = Some(projection(sw.1, tw.1, seed ^ 0x4ec6_4ec6, &train));
        }
    }
    let mut model = Trainee {
        student,
        backbone,
        neck,
    };
    let mut optimizer = AdamConfig::new().init();
    let mut rng = ChaCha8Rng::seed_from_u64(seed ^ 0xc0de_c0de);
    // The rows of an epoch and whether each is labelled.
    let rows: Vec<(usize, bool)> = match scratch_steps {
        None => data
            .private
            .iter()
            .map(|&i| (i, true))
            .chain(data.public.iter().map(|&i| (i, false)))
            .collect(),
        Some(_) => data.private.iter().map(|&i| (i, true)).collect(),
    };
    let t = options.temperature;
    let mut epochs = Vec::new();
    let mut steps = 0usize;
    let mut epoch = 0usize;
    loop {
        let done = match scratch_steps {
            Some(limit) => steps >= limit,
            None => epoch >= options.epochs,
        };
        if done {
            break;
        }
        epoch += 1;
        let mut order = rows.clone();
        portable_shuffle(&mut order, &mut rng);
        let mut sums = [0.0f64; 5];
        let mut counts = [0usize; 5];
        for chunk in order.chunks(options.batch_size) {
            if scratch_steps.is_some_and(|limit| steps >= limit) {
                break;
            }
            let idx: Vec<usize> = chunk.iter().map(|&(i, _)| i).collect();
            let labelled: Vec<usize> = (0..chunk.len()).filter(|&k| chunk[k].1).collect();
            let x = batch_of(data.data, &idx, &train);
            let (logits, stages) = model.student.forward_features(x);
            let mut terms: Vec<(usize, f64, Tensor<1>)> = Vec::new();
            if let Some((teacher, _)) = teacher {
                let (t_logits, t_stages) =
                    teacher.forward_features(batch_of(data.data, &idx, &infer));
                // The teacher's outputs enter as constants on the training device.
                let on_train = |x: Tensor<2>| Tensor::<2>::from_data(x.into_data(), &train);
                if weights.response > 0.0 {
                    let kl = distillation_kl(on_train(t_logits), logits.clone(), t);
                    terms.push((0, weights.response, kl.reshape([1])));
                }
                if let Some(p) = &model.backbone {
                    let loss = hint_loss(
                        p,
                        stages.first().expect("checked").clone(),
                        on_train(t_stages.first().expect("checked").clone()),
                    );
                    terms.push((2, weights.backbone, loss));
                }
                if let Some(p) = &model.neck {
                    let loss = hint_loss(
                        p,
                        stages.last().expect("checked").clone(),
                        on_train(t_stages.last().expect("checked").clone()),
                    );
                    terms.push((3, weights.neck, loss));
                }
            }
            if weights.label > 0.0 && !labelled.is_empty() {
                let rows: Vec<usize> = labelled.iter().map(|&k| idx[k]).collect();
                let y: Vec<i64> = data
                    .data
                    .labels_of(&rows)
                    .into_iter()
                    .map(i64::from)
                    .collect();
                let y = Tensor::<1, Int>::from_data(TensorData::new(y, [rows.len()]), &train);
                let pick = Tensor::<1, Int>::from_data(
                    TensorData::new(
                        labelled.iter().map(|&k| k as i64).collect::<Vec<_>>(),
                        [labelled.len()],
                    ),
                    &train,
                );
                let chosen = logits.clone().select(0, pick);
                let ce = -log_softmax(chosen, 1)
                    .gather(1, y.reshape([rows.len(), 1]))
                    .mean();
                terms.push((1, weights.label, ce.reshape([1])));
            }
            let Some(total) = terms
                .iter()
                .map(|(_, w, l)| l.clone() * *w)
                .reduce(|a, b| a + b)
            else {
                // Only public rows and no teacher term: nothing to learn from.
                continue;
            };
            for (slot, _, loss) in &terms {
                sums[*slot] += value(loss);
                counts[*slot] += 1;
            }
            sums[4] += value(&total);
            counts[4] += 1;
            let grads = GradientsParams::from_grads(total.backward(), &model);
            model = optimizer.step(options.learning_rate, model, grads);
            steps += 1;
        }
        let mean = |s: usize| (counts[s] > 0).then(|| sums[s] / counts[s] as f64);
        let losses = EpochLosses {
            epoch,
            total: mean(4).unwrap_or(f64::NAN),
            response: mean(0),
            label: mean(1),
            backbone: mean(2),
            neck: mean(3),
        };
        tracing::debug!(student = %config.name(), ?losses, "compress epoch");
        epochs.push(losses);
        if scratch_steps.is_some() && counts[4] == 0 {
            // No labelled row at all: more epochs would not step either.
            break;
        }
    }
    let student = model.student.valid();
    let report = StageReport {
        student: config.name(),
        teacher: teacher.map(|(_, n)| n.to_string()),
        params: student.params(),
        steps,
        weights,
        epochs,
        seconds: start.elapsed().as_secs_f64(),
    };
    Ok((student, report))
}

/// What `fd-node compress` did: accuracies on the test split, the stages,
/// and where the exports went. Written as `compress.json` beside the export.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CompressReport {
    pub teacher: String,
    pub teacher_params: usize,
    pub teacher_test_accuracy: f64,
    pub student: String,
    pub student_params: usize,
    pub student_test_accuracy: f64,
    /// Student accuracy / teacher accuracy.
    pub retained: f64,
    pub private_samples: usize,
    pub public_samples: usize,
    pub options: CompressOptions,
    pub stages: Vec<StageReport>,
    pub out: PathBuf,
    pub card: ModelCard,
    /// The from-scratch baseline, when asked for.
    pub baseline: Option<BaselineReport>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BaselineReport {
    pub test_accuracy: f64,
    pub stage: StageReport,
    pub out: PathBuf,
}

/// The file [`compress_from_config`] writes beside the export.
pub const REPORT_FILE: &str = "compress.json";

/// `fd-node compress`: the member of `config` (its data, public set and
/// private partition), its best student (or its checkpoint's; as `fd-node
/// export` takes it, [`crate::export::MemberStudent`]), or the export in
/// `teacher_dir`, compressed into `options.student` and exported
/// to `out` in `format`; with `baseline`, the same student trained from
/// scratch is exported there too.
pub fn compress_from_config(
    config: &crate::config::NodeConfig,
    teacher_dir: Option<&Path>,
    options: &CompressOptions,
    out: &Path,
    format: ExportFormat,
    baseline: Option<&Path>,
) -> Result<CompressReport, CompressError> {
    options.validate()?;
    let shared = crate::member::MemberData::load(config)
        .map_err(|e| CompressError::Data(format!("{e:#}")))?;
    let splits = &shared.data;
    let part = shared
        .parts
        .get(config.partition.index)
        .ok_or_else(|| CompressError::Data("field `partition.index` is out of range".into()))?;
    // The member's validation hold-out stays untouched, as in its rounds.
    let (private, _validation) = shared.trained_and_validation(config, config.partition.index, part);
    let input = InputShape::new(splits.train.shape);
    let classes = splits.train.classes;
    let (teacher, teacher_config, federation_id, round) = match teacher_dir {
        Some(dir) => {
            let model = load_exported(dir, &DeviceKind::Flex.device())?;
            if model.card.input.shape != splits.train.shape || model.card.classes != classes {
                return Err(CompressError::Teacher(format!(
                    "{} takes {:?} with {} classes, the config's data is {:?} with {classes}",
                    dir.display(),
                    model.card.input.shape,
                    model.card.classes,
                    splits.train.shape
                )));
            }
            (
                model.student,
                model.card.architecture,
                model.card.federation_id,
                model.card.round,
            )
        }
        None => {
            // The member's best student, as `fd-node export` takes it.
            let member = crate::export::MemberStudent::load(
                config,
                crate::export::Which::Best,
                input,
                classes,
            )
            .map_err(CompressError::Teacher)?;
            (
                member.learner.student().valid(),
                config.model.clone(),
                Some(member.federation_id),
                Some(member.round),
            )
        }
    };
    let data = CompressData {
        data: &splits.train,
        private: &private,
        public: &shared.public,
    };
    let teacher_accuracy = accuracy(&teacher, &splits.test);
    tracing::info!(
        teacher = %teacher_config.name(),
        accuracy = teacher_accuracy,
        private = private.len(),
        public = shared.public.len(),
        student = %options.student.name(),
        "compressing"
    );
    let compressed = compress(
        &teacher,
        &teacher_config.name(),
        input,
        classes,
        data,
        options,
    )?;
    let student_accuracy = accuracy(&compressed.student, &splits.test);
    let provenance = |test_accuracy| Provenance {
        federation_id: federation_id.clone(),
        round,
        test_accuracy: Some(test_accuracy),
        validation_accuracy: None,
        data: Some(config.data.resolve()),
    };
    let card = export_student(
        &compressed.student,
        &compressed.config,
        input,
        classes,
        provenance(student_accuracy),
        format,
        out,
    )?;
    let baseline = match baseline {
        Some(dir) => {
            let scratch = train_from_scratch(input, classes, data, options)?;
            let acc = accuracy(&scratch.student, &splits.test);
            export_student(
                &scratch.student,
                &scratch.config,
                input,
                classes,
                provenance(acc),
                format,
                dir,
            )?;
            Some(BaselineReport {
                test_accuracy: acc,
                stage: scratch.stages.into_iter().next().expect("one stage"),
                out: dir.to_path_buf(),
            })
        }
        None => None,
    };
    let report = CompressReport {
        teacher: teacher_config.name(),
        teacher_params: teacher.params(),
        teacher_test_accuracy: teacher_accuracy,
        student: compressed.config.name(),
        student_params: compressed.student.params(),
        student_test_accuracy: student_accuracy,
        retained: student_accuracy / teacher_accuracy.max(f64::MIN_POSITIVE),
        private_samples: private.len(),
        public_samples: shared.public.len(),
        options: options.clone(),
        stages: compressed.stages,
        out: out.to_path_buf(),
        card,
        baseline,
    };
    let path = out.join(REPORT_FILE);
    let json = serde_json::to_vec_pretty(&report).expect("a report serializes");
    fd_data::fsutil::write_atomic(&path, &json, 0o644)
        .map_err(|source| CompressError::Io { path, source })?;
    Ok(report)
}

impl std::fmt::Display for CompressReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(
            f,
            "teacher     {} ({} params): test accuracy {:.4}",
            self.teacher, self.teacher_params, self.teacher_test_accuracy
        )?;
        writeln!(
            f,
            "student     {} ({} params): test accuracy {:.4} ({:.1} % of the teacher's)",
            self.student,
            self.student_params,
            self.student_test_accuracy,
            100.0 * self.retained
        )?;
        writeln!(
            f,
            "data        {} private (labelled) + {} public (unlabelled) samples",
            self.private_samples, self.public_samples
        )?;
        for s in &self.stages {
            let last = s.epochs.last();
            let opt = |v: Option<f64>| v.map_or("-".into(), |v| format!("{v:.4}"));
            writeln!(
                f,
                "stage       {} → {}: {} steps, {:.1} s; last epoch loss {} (response {}, label {}, backbone {}, neck {})",
                s.teacher.as_deref().unwrap_or("labels"),
                s.student,
                s.steps,
                s.seconds,
                opt(last.map(|e| e.total)),
                opt(last.and_then(|e| e.response)),
                opt(last.and_then(|e| e.label)),
                opt(last.and_then(|e| e.backbone)),
                opt(last.and_then(|e| e.neck)),
            )?;
        }
        if let Some(b) = &self.baseline {
            writeln!(
                f,
                "baseline    {} from scratch, {} steps: test accuracy {:.4} ({})",
                self.student,
                b.stage.steps,
                b.test_accuracy,
                b.out.display()
            )?;
        }
        writeln!(
            f,
            "exported    {} ({}, {} bytes) to {}",
            self.card.architecture_name,
            self.card.format,
            self.card.weights_bytes,
            self.out.display()
        )
    }
}

/// `fd-node compress`'s arguments (here so the binary's edit stays one line).
#[derive(Debug, clap::Args)]
pub struct CompressArgs {
    /// The member's TOML config: its data, public set and partition, and
    /// (without --teacher) the best-student file or checkpoint whose student
    /// is the teacher, as `fd-node export` takes it.
    #[arg(long, short)]
    pub config: PathBuf,
    /// The small student: mlp-64, mlp-32, cnn-8-16-fc32, … (`ModelConfig::name` form).
    #[arg(long, default_value = "mlp-32")]
    pub student: ModelConfig,
    /// Teacher from an export folder instead of the config's member.
    #[arg(long)]
    pub teacher: Option<PathBuf>,
    /// Progressive: intermediate students, largest first (comma-separated).
    #[arg(long, value_delimiter = ',')]
    pub via: Vec<ModelConfig>,
    /// Folder of the exported compressed student (and compress.json).
    #[arg(long)]
    pub out: PathBuf,
    #[arg(long, default_value = "f32")]
    pub format: ExportFormat,
    /// Epochs per stage over private + public samples.
    #[arg(long, default_value_t = 5)]
    pub epochs: usize,
    #[arg(long, default_value_t = 64)]
    pub batch_size: usize,
    #[arg(long, default_value_t = 1e-3)]
    pub learning_rate: f64,
    #[arg(long, default_value_t = 4.0)]
    pub temperature: f64,
    /// Weight of the head (response) term T²·KL.
    #[arg(long, default_value_t = 1.0)]
    pub response_weight: f64,
    /// Weight of cross-entropy on the private labels.
    #[arg(long, default_value_t = 0.5)]
    pub label_weight: f64,
    /// Weight of the first-stage hint (0: off).
    #[arg(long, default_value_t = 0.5)]
    pub backbone_weight: f64,
    /// Weight of the last-stage hint (0: off).
    #[arg(long, default_value_t = 0.5)]
    pub neck_weight: f64,
    /// Seed (default: the config's `training.seed`).
    #[arg(long)]
    pub seed: Option<u64>,
    #[arg(long, default_value_t = 1)]
    pub threads: usize,
    /// Also train the student from scratch on the private labels for the
    /// same number of steps, and export it to this folder.
    #[arg(long)]
    pub baseline: Option<PathBuf>,
}

/// Runs `fd-node compress`: prints the report, returns it.
pub fn run_cli(args: CompressArgs) -> Result<CompressReport, Box<dyn std::error::Error>> {
    let config = crate::config::NodeConfig::from_file(&args.config)?;
    let options = CompressOptions {
        student: args.student,
        via: args.via,
        epochs: args.epochs,
        batch_size: args.batch_size,
        learning_rate: args.learning_rate,
        temperature: args.temperature,
        weights: LossWeights {
            response: args.response_weight,
            label: args.label_weight,
            backbone: args.backbone_weight,
            neck: args.neck_weight,
        },
        seed: args.seed.unwrap_or(config.training.seed),
        threads: args.threads,
    };
    let report = compress_from_config(
        &config,
        args.teacher.as_deref(),
        &options,
        &args.out,
        args.format,
        args.baseline.as_deref(),
    )?;
    print!("{report}");
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;
    use fd_data::{DataSource, DataSplits};
    use crate::learner::{Learner, OptimizerKind, TrainingConfig};

    const INPUT: InputShape = InputShape {
        channels: 1,
        height: 28,
        width: 28,
    };

    fn synthetic() -> DataSplits {
        DataSource::Synthetic {
            seed: 7,
            train: 4000,
            test: 1000,
        }
        .load()
        .unwrap()
    }

    /// The "federated" teacher: an MLP 200-200 that saw labels of all 4,000
    /// training samples (the member itself holds labels of only 300).
    fn teacher(data: &DataSplits) -> Student {
        let mut learner = Learner::new(
            &ModelConfig::default(),
            TrainingConfig {
                local_epochs: 4,
                optimizer: OptimizerKind::Adam,
                learning_rate: 1e-3,
                seed: 1,
                // A centrally trained teacher: nothing to keep from round to round.
                local_ntd: 0.0,
                ..TrainingConfig::default()
            },
            DeviceKind::Flex,
            INPUT,
            data.train.classes,
        );
        let all: Vec<usize> = (0..data.train.len()).collect();
        learner.train_local(&data.train, &all);
        learner.student().valid()
    }

    fn member(data: &DataSplits) -> (Vec<usize>, Vec<usize>) {
        ((0..300).collect(), (300..data.train.len()).collect())
    }

    fn options(weights: LossWeights) -> CompressOptions {
        CompressOptions {
            student: ModelConfig::Mlp { hidden: vec![32] },
            epochs: 4,
            weights,
            seed: 3,
            ..CompressOptions::default()
        }
    }

    #[test]
    fn distilled_small_student_beats_the_same_student_from_scratch() {
        let data = synthetic();
        let teacher = teacher(&data);
        let (private, public) = member(&data);
        let d = CompressData {
            data: &data.train,
            private: &private,
            public: &public,
        };
        let o = options(LossWeights::default().response_only());
        let distilled = compress(&teacher, "mlp-200-200", INPUT, 10, d, &o).unwrap();
        let scratch = train_from_scratch(INPUT, 10, d, &o).unwrap();
        assert_eq!(distilled.stages[0].steps, steps_per_stage(d, &o));
        assert_eq!(scratch.stages[0].steps, distilled.stages[0].steps);
        let (t, s, b) = (
            accuracy(&teacher, &data.test),
            accuracy(&distilled.student, &data.test),
            accuracy(&scratch.student, &data.test),
        );
        eprintln!("teacher {t:.4}, distilled mlp-32 {s:.4}, from scratch {b:.4}");
        assert!(s > b + 0.01, "distilled {s} vs scratch {b} (teacher {t})");
        // Seeded: a rerun gives the same student, bit for bit.
        let again = compress(&teacher, "mlp-200-200", INPUT, 10, d, &o).unwrap();
        let x = batch_of(&data.test, &[0, 1, 2], &DeviceKind::Flex.device());
        let bits = |m: &Student| -> Vec<u32> {
            m.forward(x.clone())
                .into_data()
                .iter::<f32>()
                .map(f32::to_bits)
                .collect()
        };
        assert_eq!(bits(&again.student), bits(&distilled.student));
    }

    #[test]
    fn hint_losses_decrease_and_progressive_stages_chain() {
        let data = synthetic();
        let teacher = teacher(&data);
        let (private, public) = member(&data);
        let d = CompressData {
            data: &data.train,
            private: &private,
            public: &public,
        };
        let mut o = options(LossWeights::default());
        o.via = vec![ModelConfig::Mlp { hidden: vec![64] }];
        let c = compress(&teacher, "mlp-200-200", INPUT, 10, d, &o).unwrap();
        assert_eq!(c.stages.len(), 2);
        assert_eq!(c.stages[0].teacher.as_deref(), Some("mlp-200-200"));
        assert_eq!(c.stages[0].student, "mlp-64");
        assert_eq!(c.stages[1].teacher.as_deref(), Some("mlp-64"));
        assert_eq!(c.stages[1].student, "mlp-32");
        assert_eq!(c.config, ModelConfig::Mlp { hidden: vec![32] });
        for stage in &c.stages {
            let (first, last) = (&stage.epochs[0], stage.epochs.last().unwrap());
            for (name, a, b) in [
                ("backbone", first.backbone, last.backbone),
                ("neck", first.neck, last.neck),
            ] {
                let (a, b) = (a.unwrap(), b.unwrap());
                assert!(
                    a.is_finite() && b < 0.9 * a,
                    "{}: {name} hint {a} → {b}",
                    stage.student
                );
            }
        }
        let acc = accuracy(&c.student, &data.test);
        eprintln!("progressive mlp-200-200 → mlp-64 → mlp-32 with hints: {acc:.4}");
        assert!(acc > 0.5, "{acc}");
    }

    #[test]
    fn small_cnn_learns_from_a_cnn_teacher_through_hints() {
        // Conv stages are spatially averaged before the projection: check the
        // shapes line up and the hint loss falls for a convolutional pair.
        let data = DataSource::Synthetic {
            seed: 7,
            train: 600,
            test: 200,
        }
        .load()
        .unwrap();
        let teacher = ModelConfig::SmallCnn {
            channels: vec![16, 32],
            fc: 64,
        }
        .init(INPUT, 10, 0, &DeviceKind::Flex.device());
        let private: Vec<usize> = (0..200).collect();
        let public: Vec<usize> = (200..600).collect();
        let d = CompressData {
            data: &data.train,
            private: &private,
            public: &public,
        };
        let o = CompressOptions {
            student: ModelConfig::SmallCnn {
                channels: vec![8, 16],
                fc: 32,
            },
            epochs: 2,
            ..options(LossWeights::default())
        };
        let c = compress(&teacher, "cnn-16-32-fc64", INPUT, 10, d, &o).unwrap();
        let e = &c.stages[0].epochs;
        assert!(e[1].neck.unwrap() < e[0].neck.unwrap(), "{e:?}");
        assert!(e[1].backbone.unwrap() < e[0].backbone.unwrap(), "{e:?}");
    }

    #[test]
    fn bad_options_name_their_field() {
        let data = DataSource::Synthetic {
            seed: 7,
            train: 100,
            test: 10,
        }
        .load()
        .unwrap();
        let teacher = ModelConfig::default().init(INPUT, 10, 0, &DeviceKind::Flex.device());
        let private: Vec<usize> = (0..50).collect();
        let d = CompressData {
            data: &data.train,
            private: &private,
            public: &[],
        };
        let cases: Vec<(CompressOptions, &str)> = vec![
            (
                CompressOptions {
                    epochs: 0,
                    ..Default::default()
                },
                "`epochs`",
            ),
            (
                CompressOptions {
                    batch_size: 0,
                    ..Default::default()
                },
                "`batch_size`",
            ),
            (
                CompressOptions {
                    learning_rate: -1.0,
                    ..Default::default()
                },
                "`learning_rate`",
            ),
            (
                CompressOptions {
                    temperature: f64::NAN,
                    ..Default::default()
                },
                "`temperature`",
            ),
            (
                CompressOptions {
                    weights: LossWeights {
                        neck: -0.5,
                        ..Default::default()
                    },
                    ..Default::default()
                },
                "`weights.neck`",
            ),
            (
                CompressOptions {
                    weights: LossWeights {
                        response: 0.0,
                        label: 0.0,
                        backbone: 0.0,
                        neck: 0.0,
                    },
                    ..Default::default()
                },
                "`weights`",
            ),
            (
                CompressOptions {
                    student: ModelConfig::Mlp { hidden: vec![0] },
                    ..Default::default()
                },
                "`student`",
            ),
            // An MLP without hidden layers has no stage to give a hint to.
            (
                CompressOptions {
                    student: ModelConfig::Mlp { hidden: vec![] },
                    ..Default::default()
                },
                "`weights.backbone`",
            ),
            (
                CompressOptions {
                    student: ModelConfig::FedAvgCnn {},
                    ..Default::default()
                },
                "`student`",
            ),
        ];
        for (o, field) in cases {
            let flat = InputShape::new([1, 1, 784]);
            let input = if matches!(o.student, ModelConfig::FedAvgCnn {}) {
                flat
            } else {
                INPUT
            };
            let data_for = if input == flat {
                // Tabular data of the same values, so only the student is at fault.
                let mut t = data.train.clone();
                t.shape = [1, 1, 784];
                t
            } else {
                data.train.clone()
            };
            let d = CompressData {
                data: &data_for,
                ..d
            };
            let err = compress(&teacher, "mlp-200-200", input, 10, d, &o).unwrap_err();
            assert!(err.to_string().contains(field), "{field}: {err}");
        }
        let err = compress(
            &teacher,
            "mlp-200-200",
            INPUT,
            10,
            CompressData { private: &[], ..d },
            &CompressOptions::default(),
        )
        .unwrap_err();
        assert!(err.to_string().contains("no private samples"), "{err}");
    }
}

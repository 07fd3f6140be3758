//! Exporting a member's student as a deployable model, and loading it back.
//!
//! Why it exists: a member joins a federation to end up with a model it can
//! ship, and the checkpoint ([`crate::checkpoint`]) is fd's own format that
//! nothing outside fd reads. An export is a folder with two files:
//!
//! - `model.safetensors`: the weights, written and read by burn's own store
//!   (`burn-store`'s `SafetensorsStore`), not by a writer of ours. Tensors
//!   are named and laid out as a `torch.nn` module of the same structure
//!   would name them (burn's `BurnToPyTorchAdapter`: `Linear` weights
//!   transposed to `[out, in]`, batch-norm `gamma`/`beta` renamed
//!   `weight`/`bias`; enum variant names left out of the paths), so a
//!   PyTorch user reads the f32 file with `safetensors.torch.load_file`
//!   and `load_state_dict` (docs/operating.md has the name map).
//! - `model.json` ([`ModelCard`]): what is needed to rebuild and feed the
//!   model (architecture config, classes, input shape and scaling), where
//!   it came from (federation, round, accuracy) and the SHA-256 of the
//!   weights file, which [`load_exported`] checks before trusting it.
//!
//! Formats and why:
//! - `f32`: the student's own values; loading gives bit-identical logits.
//! - `f16`: every float tensor cast by burn's `FloatCastAdapter` on save,
//!   cast back to f32 on load: half the size, computation stays f32.
//! - `int8`: weights of rank ≥ 2 (linear and convolution kernels) quantised
//!   symmetrically per output channel (axis 0 in the PyTorch layout):
//!   `scale[c] = max|w[c, …]| / 127`, `q = round(w / scale[c])` in
//!   [−127, 127], stored as `I8` with the scales beside them as f32
//!   tensors named `<weight>_scale`; biases and batch-norm tensors stay f32
//!   (they are a few hundred values). Loading dequantises (`q · scale`) to
//!   f32. burn 0.22's own post-training quantisation (`QuantScheme`,
//!   per-tensor or per-block) does run on the flex backend (burn-flex
//!   implements its quantised tensor ops), but burn-store 0.22.1's
//!   SafeTensors writer refuses quantised tensors ("Quantized tensors not
//!   yet supported in safetensors"; a test here pins that), and a file of
//!   plain `I8` + scales is what any reader can dequantise with one multiply.
//!   The int8 format is thus a storage format: inference runs in f32.
//! - Writes are atomic ([`fd_data::fsutil::write_atomic`]): weights first,
//!   then the card that names their digest, so a reader never sees a card
//!   whose weights are missing or half-written.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use burn::module::{Module, Param};
use burn::prelude::*;
use burn::tensor::DType;
use burn_store::burn_pack::Tensor as PackTensor;
use burn_store::{
    BurnToPyTorchAdapter, FloatCastAdapter, KeyRemapper, ModuleAdapter, ModuleContext,
    ModuleSnapshot, ModuleStore, PyTorchToBurnAdapter, SafetensorsStore, bridge,
};
use fd_protocol::digest::sha256;
use serde::{Deserialize, Serialize};

use fd_data::DataSource;
use crate::model::{InputShape, ModelConfig, Student};

/// The weights file inside an export folder.
pub const WEIGHTS_FILE: &str = "model.safetensors";
/// The model card inside an export folder.
pub const CARD_FILE: &str = "model.json";
/// Bump when [`ModelCard`]'s meaning changes.
pub const CARD_VERSION: u32 = 1;
/// Suffix of the per-channel scale tensor stored beside each int8 weight.
pub const SCALE_SUFFIX: &str = "_scale";

/// How the weights are stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ExportFormat {
    F32,
    F16,
    Int8,
}

impl ExportFormat {
    pub const ALL: [ExportFormat; 3] = [ExportFormat::F32, ExportFormat::F16, ExportFormat::Int8];

    pub fn name(self) -> &'static str {
        match self {
            ExportFormat::F32 => "f32",
            ExportFormat::F16 => "f16",
            ExportFormat::Int8 => "int8",
        }
    }
}

impl std::fmt::Display for ExportFormat {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl std::str::FromStr for ExportFormat {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "f32" => Ok(ExportFormat::F32),
            "f16" => Ok(ExportFormat::F16),
            "int8" => Ok(ExportFormat::Int8),
            other => Err(format!(
                "unknown format {other:?}: expected f32, f16 or int8"
            )),
        }
    }
}

/// What a sample must look like before it reaches the model.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct InputSpec {
    /// `[channels, height, width]` (tabular data: `[1, 1, features]`).
    pub shape: [usize; 3],
    /// How the model takes a batch: `[batch, channels · height · width]`,
    /// each sample flattened channel-major (convolutional students reshape
    /// inside).
    pub layout: String,
    /// `x = byte · scale`: the students see pixel bytes scaled to [0, 1],
    /// no mean/std normalisation.
    pub scale: f64,
    pub mean: f64,
    pub std: f64,
}

impl InputSpec {
    pub fn for_shape(shape: [usize; 3]) -> Self {
        InputSpec {
            shape,
            layout: "[batch, channels*height*width], channel-major".into(),
            scale: 1.0 / 255.0,
            mean: 0.0,
            std: 1.0,
        }
    }
}

/// How int8 weights are quantised (only in int8 cards).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct QuantisationSpec {
    pub scheme: String,
    /// Axis of the per-channel scales (in the stored, PyTorch layout).
    pub axis: usize,
    /// Name suffix of the scale tensors: `<weight><suffix>`.
    pub scale_suffix: String,
    /// The stored tensors that are int8 (the others are f32).
    pub quantised: Vec<String>,
}

/// `model.json`: everything needed to rebuild, feed and trust the weights.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelCard {
    pub card_version: u32,
    pub format: ExportFormat,
    /// The `[model]` table the student was built from.
    pub architecture: ModelConfig,
    /// [`ModelConfig::name`].
    pub architecture_name: String,
    pub classes: usize,
    pub input: InputSpec,
    /// Trainable parameters.
    pub params: usize,
    pub federation_id: Option<String>,
    /// The last completed round of the checkpoint exported.
    pub round: Option<u64>,
    /// Accuracy on the data source's test split at export (f32 student).
    pub test_accuracy: Option<f64>,
    /// Accuracy on the member's validation split (not measured yet: None).
    pub validation_accuracy: Option<f64>,
    /// The data the student was trained on (paths absolute), so `evaluate`
    /// can default to its test split.
    pub data: Option<DataSource>,
    pub weights_file: String,
    pub weights_bytes: u64,
    /// SHA-256 of `weights_file`, hex.
    pub weights_sha256: String,
    pub quantisation: Option<QuantisationSpec>,
    /// `fd-node <version>`.
    pub producer: String,
}

/// Where a student came from; the card fields that the student itself does not know.
#[derive(Debug, Clone, Default)]
pub struct Provenance {
    pub federation_id: Option<String>,
    pub round: Option<u64>,
    pub test_accuracy: Option<f64>,
    pub validation_accuracy: Option<f64>,
    pub data: Option<DataSource>,
}

/// A loaded export: the card and the student (f32, inference mode) on the requested device.
#[derive(Debug)]
pub struct ExportedModel {
    pub card: ModelCard,
    pub student: Student,
    pub dir: PathBuf,
}

/// Why an export could not be written or read.
#[derive(Debug, thiserror::Error)]
pub enum ExportError {
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{}: not a valid model card: {reason}", path.display())]
    Card { path: PathBuf, reason: String },
    #[error(
        "{}: SHA-256 is {actual}, {CARD_FILE} says {expected}: the weights are not the ones exported",
        path.display()
    )]
    Digest {
        path: PathBuf,
        expected: String,
        actual: String,
    },
    #[error("{}: {reason}", path.display())]
    Weights { path: PathBuf, reason: String },
    #[error("cannot export: {0}")]
    Source(String),
}

/// `(dims, values)` of a stored float tensor.
fn pack_f32(tensor: &PackTensor) -> Result<(Vec<usize>, Vec<f32>), String> {
    let data = bridge::to_data(tensor).map_err(|e| format!("{}: {e:?}", tensor.name))?;
    let dims = data.shape().to_vec();
    let values = data
        .convert_dtype(DType::F32)
        .try_to_vec::<f32>()
        .map_err(|e| format!("{}: {e:?}", tensor.name))?;
    Ok((dims, values))
}

/// Symmetric per-row scales of a `[rows, …]` tensor: `max |w| / 127` per row.
fn row_scales(dims: &[usize], values: &[f32]) -> Vec<f32> {
    let rows = dims[0];
    let per_row = values.len().checked_div(rows).unwrap_or(0);
    (0..rows)
        .map(|r| {
            let max = values[r * per_row..(r + 1) * per_row]
                .iter()
                .fold(0f32, |m, v| m.max(v.abs()));
            max / 127.0
        })
        .collect()
}

fn quantise_row(values: &[f32], scale: f32, out: &mut Vec<i8>) {
    out.extend(values.iter().map(|&v| {
        if scale > 0.0 {
            (v / scale).round().clamp(-127.0, 127.0) as i8
        } else {
            0
        }
    }));
}

/// Save side of int8: turns each f32 weight that has scales into `I8`.
/// Its tensor names are module paths of [`Int8Export`] (`model.` prefix).
#[derive(Clone)]
struct Quantise {
    scales: Arc<HashMap<String, Vec<f32>>>,
}

impl ModuleAdapter for Quantise {
    fn adapt(&self, tensor: PackTensor, _ctx: ModuleContext<'_>) -> PackTensor {
        let key = tensor.name.strip_prefix("model.").unwrap_or(&tensor.name);
        let Some(scales) = self.scales.get(key).cloned() else {
            return tensor;
        };
        let (name, shape) = (tensor.name.clone(), tensor.shape.clone());
        bridge::map_data(tensor, name, DType::I8, shape, move |data| {
            let dims = data.shape().to_vec();
            let values = data
                .convert_dtype(DType::F32)
                .try_to_vec::<f32>()
                .expect("f32 weights");
            let per_row = values.len() / dims[0].max(1);
            let mut q = Vec::with_capacity(values.len());
            for (r, &s) in scales.iter().enumerate() {
                quantise_row(&values[r * per_row..(r + 1) * per_row], s, &mut q);
            }
            TensorData::new(q, dims)
        })
    }

    fn clone_box(&self) -> Box<dyn ModuleAdapter> {
        Box::new(self.clone())
    }
}

/// Load side of int8: `I8` weights back to f32 with their scales.
#[derive(Clone)]
struct Dequantise {
    scales: Arc<HashMap<String, Vec<f32>>>,
}

impl ModuleAdapter for Dequantise {
    fn adapt(&self, tensor: PackTensor, _ctx: ModuleContext<'_>) -> PackTensor {
        if tensor.dtype != DType::I8 {
            return tensor;
        }
        // A weight without scales is left as is; the applier then reports its dtype.
        let Some(scales) = self.scales.get(&tensor.name).cloned() else {
            return tensor;
        };
        let (name, shape) = (tensor.name.clone(), tensor.shape.clone());
        bridge::map_data(tensor, name, DType::F32, shape, move |data| {
            let dims = data.shape().to_vec();
            let q = data.try_to_vec::<i8>().expect("i8 weights");
            let per_row = q.len() / dims[0].max(1);
            let values: Vec<f32> = q
                .iter()
                .enumerate()
                .map(|(i, &v)| f32::from(v) * scales[i / per_row.max(1)])
                .collect();
            TensorData::new(values, dims)
        })
    }

    fn clone_box(&self) -> Box<dyn ModuleAdapter> {
        Box::new(self.clone())
    }
}

/// What the int8 file is collected from: the student and one scale vector
/// per quantised weight (renamed `<weight>_scale` on save).
#[derive(Module, Debug)]
struct Int8Export {
    model: Student,
    scales: Vec<Param<Tensor<1>>>,
}

/// A store that writes in memory with PyTorch names.
fn torch_store() -> SafetensorsStore {
    SafetensorsStore::from_bytes(None)
        .skip_enum_variants(true)
        .metadata("producer", format!("fd-node {}", env!("CARGO_PKG_VERSION")))
}

fn store_error(e: impl std::fmt::Debug) -> String {
    format!("{e:?}")
}

/// The safetensors bytes of `student` in `format`, and the int8 spec if any.
/// `student` must be an inference-mode module (`valid()`).
pub fn encode_weights(
    student: &Student,
    format: ExportFormat,
) -> Result<(Vec<u8>, Option<QuantisationSpec>), String> {
    let mut store = torch_store().metadata("fd.format", format.name());
    match format {
        ExportFormat::F32 => {
            store = store.with_to_adapter(BurnToPyTorchAdapter);
            student.save_into(&mut store).map_err(store_error)?;
            Ok((store.get_bytes().map_err(store_error)?, None))
        }
        ExportFormat::F16 => {
            store =
                store.with_to_adapter(BurnToPyTorchAdapter.chain(FloatCastAdapter::to(DType::F16)));
            student.save_into(&mut store).map_err(store_error)?;
            Ok((store.get_bytes().map_err(store_error)?, None))
        }
        ExportFormat::Int8 => {
            // The f32 export in PyTorch layout, to compute the scales on the
            // layout they apply to (axis 0 = output channel).
            let (f32_bytes, _) = encode_weights(student, ExportFormat::F32)?;
            let mut reader = SafetensorsStore::from_bytes(Some(f32_bytes));
            let mut scales = HashMap::new();
            for (name, tensor) in reader.get_all_tensors().map_err(store_error)? {
                if tensor.shape.len() >= 2 {
                    let (dims, values) = pack_f32(tensor)?;
                    scales.insert(name.clone(), row_scales(&dims, &values));
                }
            }
            let mut names: Vec<String> = scales.keys().cloned().collect();
            names.sort();
            let device = Device::flex();
            let wrapper = Int8Export {
                model: student.clone(),
                scales: names
                    .iter()
                    .map(|n| {
                        let s = &scales[n];
                        Param::from_tensor(Tensor::from_data(
                            TensorData::new(s.clone(), [s.len()]),
                            &device,
                        ))
                    })
                    .collect(),
            };
            let mut patterns = vec![("^model\\.".to_string(), String::new())];
            for (i, n) in names.iter().enumerate() {
                patterns.push((format!("^scales\\.{i}$"), format!("{n}{SCALE_SUFFIX}")));
            }
            let remapper = KeyRemapper::from_patterns(patterns).map_err(store_error)?;
            let quantise = Quantise {
                scales: Arc::new(scales),
            };
            let mut store = store
                .remap(remapper)
                .with_to_adapter(BurnToPyTorchAdapter.chain(quantise));
            wrapper.save_into(&mut store).map_err(store_error)?;
            let spec = QuantisationSpec {
                scheme: "symmetric per-channel int8: scale = max|w| / 127 per output channel, \
                         q = round(w / scale) in [-127, 127], w ≈ q · scale; \
                         biases and batch-norm tensors f32"
                    .into(),
                axis: 0,
                scale_suffix: SCALE_SUFFIX.into(),
                quantised: names,
            };
            Ok((store.get_bytes().map_err(store_error)?, Some(spec)))
        }
    }
}

/// Reads weights written by [`encode_weights`] into a new `config` student
/// on `device` (f32; int8 dequantised, f16 widened).
pub fn decode_weights(
    bytes: Vec<u8>,
    config: &ModelConfig,
    input: InputShape,
    classes: usize,
    device: &Device,
) -> Result<Student, String> {
    let mut probe = SafetensorsStore::from_bytes(Some(bytes.clone()));
    let tensors = probe.get_all_tensors().map_err(store_error)?;
    let mut scales = HashMap::new();
    for (name, tensor) in tensors {
        if let Some(weight) = name.strip_suffix(SCALE_SUFFIX) {
            scales.insert(weight.to_string(), pack_f32(tensor)?.1);
        }
    }
    // Every int8 tensor needs one scale per row, checked here so that a
    // malformed file is an error naming the tensor, not a panic in the loader.
    for (name, tensor) in tensors {
        if tensor.dtype != DType::I8 {
            continue;
        }
        let rows = if !tensor.shape.is_empty() { tensor.shape[0] } else { 0 };
        match scales.get(name) {
            None => return Err(format!("int8 tensor {name} has no {name}{SCALE_SUFFIX}")),
            Some(s) if s.len() != rows => {
                return Err(format!(
                    "{name}{SCALE_SUFFIX} has {} values, {name} has {rows} rows",
                    s.len()
                ));
            }
            Some(_) => {}
        }
    }
    let mut store = SafetensorsStore::from_bytes(Some(bytes))
        .skip_enum_variants(true)
        .with_from_adapter(
            Dequantise {
                scales: Arc::new(scales),
            }
            .chain(FloatCastAdapter::to(DType::F32))
            .chain(PyTorchToBurnAdapter),
        );
    let mut student = config.init(input, classes, 0, device);
    let result = student.load_from(&mut store).map_err(store_error)?;
    if !result.errors.is_empty() {
        return Err(format!("{:?}", result.errors));
    }
    Ok(student)
}

/// Writes `student` (inference mode) to `dir` in `format`: weights, then card.
#[allow(clippy::too_many_arguments)]
pub fn export_student(
    student: &Student,
    config: &ModelConfig,
    input: InputShape,
    classes: usize,
    provenance: Provenance,
    format: ExportFormat,
    dir: &Path,
) -> Result<ModelCard, ExportError> {
    std::fs::create_dir_all(dir).map_err(|source| ExportError::Io {
        path: dir.to_path_buf(),
        source,
    })?;
    let weights_path = dir.join(WEIGHTS_FILE);
    let (bytes, quantisation) =
        encode_weights(student, format).map_err(|reason| ExportError::Weights {
            path: weights_path.clone(),
            reason,
        })?;
    fd_data::fsutil::write_atomic(&weights_path, &bytes, 0o644).map_err(|source| {
        ExportError::Io {
            path: weights_path.clone(),
            source,
        }
    })?;
    let card = ModelCard {
        card_version: CARD_VERSION,
        format,
        architecture: config.clone(),
        architecture_name: config.name(),
        classes,
        input: InputSpec::for_shape([input.channels, input.height, input.width]),
        params: student.params(),
        federation_id: provenance.federation_id,
        round: provenance.round,
        test_accuracy: provenance.test_accuracy,
        validation_accuracy: provenance.validation_accuracy,
        data: provenance.data,
        weights_file: WEIGHTS_FILE.into(),
        weights_bytes: bytes.len() as u64,
        weights_sha256: sha256(&bytes).to_hex(),
        quantisation,
        producer: format!("fd-node {}", env!("CARGO_PKG_VERSION")),
    };
    let card_path = dir.join(CARD_FILE);
    let json = serde_json::to_vec_pretty(&card).expect("a model card serializes");
    fd_data::fsutil::write_atomic(&card_path, &json, 0o644).map_err(|source| ExportError::Io {
        path: card_path,
        source,
    })?;
    Ok(card)
}

/// Reads and checks `dir/model.json`.
pub fn read_card(dir: &Path) -> Result<ModelCard, ExportError> {
    let path = dir.join(CARD_FILE);
    let text = std::fs::read(&path).map_err(|source| ExportError::Io {
        path: path.clone(),
        source,
    })?;
    let card: ModelCard = serde_json::from_slice(&text).map_err(|e| ExportError::Card {
        path: path.clone(),
        reason: e.to_string(),
    })?;
    let bad = |reason: String| ExportError::Card {
        path: path.clone(),
        reason,
    };
    if card.card_version != CARD_VERSION {
        return Err(bad(format!(
            "field `card_version` is {}, this fd-node reads {CARD_VERSION}",
            card.card_version
        )));
    }
    if card.classes == 0 {
        return Err(bad("field `classes` must be at least 1".into()));
    }
    let input = InputShape::new(card.input.shape);
    card.architecture.validate(input).map_err(|reason| {
        bad(format!(
            "field `architecture` does not fit `input.shape`: {reason}"
        ))
    })?;
    if card.weights_file.contains('/') || card.weights_file.contains('\\') {
        return Err(bad(format!(
            "field `weights_file` must be a file name inside the folder, got {:?}",
            card.weights_file
        )));
    }
    Ok(card)
}

/// Loads the export in `dir` onto `device`: checks the card, the weights'
/// SHA-256 against it, and that every tensor fits the architecture.
pub fn load_exported(dir: &Path, device: &Device) -> Result<ExportedModel, ExportError> {
    let card = read_card(dir)?;
    let path = dir.join(&card.weights_file);
    let bytes = std::fs::read(&path).map_err(|source| ExportError::Io {
        path: path.clone(),
        source,
    })?;
    let actual = sha256(&bytes).to_hex();
    if actual != card.weights_sha256 {
        return Err(ExportError::Digest {
            path,
            expected: card.weights_sha256.clone(),
            actual,
        });
    }
    let student = decode_weights(
        bytes,
        &card.architecture,
        InputShape::new(card.input.shape),
        card.classes,
        device,
    )
    .map_err(|reason| ExportError::Weights {
        path: path.clone(),
        reason,
    })?;
    Ok(ExportedModel {
        card,
        student,
        dir: dir.to_path_buf(),
    })
}

/// Which of a member's students `fd-node export` takes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Which {
    /// The best student kept so far on the validation split
    /// (`[rollback] best_file`, [`crate::rollback::BestStudent`]).
    #[default]
    Best,
    /// The student of the last completed round (`checkpoint_file`).
    Current,
}

impl std::str::FromStr for Which {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "best" => Ok(Which::Best),
            "current" => Ok(Which::Current),
            other => Err(format!("unknown student {other:?}: expected best or current")),
        }
    }
}

/// `fd-node export`: the member's best student ([`Which::Best`]) exported
/// to `dir`; see [`export_which`].
pub fn export_from_config(
    config: &crate::config::NodeConfig,
    format: ExportFormat,
    dir: &Path,
) -> Result<ModelCard, ExportError> {
    export_which(config, Which::Best, format, dir)
}

/// `fd-node export --which`: the student of `config`'s best-student file
/// or of its checkpoint ([`MemberStudent::load`]), exported to `dir`. Loads
/// the data source (for the input shape, classes and test accuracy).
pub fn export_which(
    config: &crate::config::NodeConfig,
    which: Which,
    format: ExportFormat,
    dir: &Path,
) -> Result<ModelCard, ExportError> {
    let source = config.data.resolve();
    let data = source
        .load()
        .map_err(|e| ExportError::Source(format!("field `data`: {e}")))?;
    let input = InputShape::new(data.train.shape);
    let member = MemberStudent::load(config, which, input, data.train.classes)
        .map_err(ExportError::Source)?;
    let test_accuracy = member.learner.evaluate(&data.test);
    let student = member.learner.student().valid();
    export_student(
        &student,
        &config.model,
        input,
        data.train.classes,
        Provenance {
            federation_id: Some(member.federation_id),
            round: Some(member.round),
            test_accuracy: Some(test_accuracy),
            validation_accuracy: member.validation_accuracy,
            data: Some(source),
        },
        format,
        dir,
    )
}

/// A member's saved student, restored from its best-student file or its
/// checkpoint (`fd-node export` and `fd-node compress` take it the same
/// way), with where it came from.
pub struct MemberStudent {
    pub learner: crate::learner::Learner,
    pub federation_id: String,
    pub round: u64,
    /// The validation accuracy it was kept for; `None` when it came from the
    /// checkpoint.
    pub validation_accuracy: Option<f64>,
}

impl MemberStudent {
    /// The student `which` names, for data of `input` with `classes`. A
    /// config without a validation split (`rollback.validation_fraction =
    /// 0`) keeps no best student: there `Best` takes the checkpoint, and
    /// says so. The error names the config field at fault.
    pub fn load(
        config: &crate::config::NodeConfig,
        which: Which,
        input: InputShape,
        classes: usize,
    ) -> Result<MemberStudent, String> {
        use crate::checkpoint::Checkpoint;
        use crate::learner::Learner;
        use crate::rollback::BestStudent;

        let mut validation_accuracy = None;
        let (checkpoint, path) =
            if which == Which::Best && config.rollback.validation_fraction > 0.0 {
                let path = config
                    .rollback
                    .best_file
                    .clone()
                    .ok_or("the config has no `rollback.best_file`")?;
                let best = BestStudent::load(&path).map_err(|e| e.to_string())?.ok_or_else(|| {
                    format!(
                        "no best student at {} (field `rollback.best_file`): run the node for at least one round first, or take the checkpoint's student with `--which current`",
                        path.display()
                    )
                })?;
                validation_accuracy = Some(best.validation_accuracy);
                (best.checkpoint, path)
            } else {
                if which == Which::Best {
                    tracing::warn!(
                        "`rollback.validation_fraction` is 0: no best student is kept, taking the checkpoint's (current) student"
                    );
                }
                let path = config
                    .checkpoint_file
                    .clone()
                    .ok_or("the config has no `checkpoint_file`")?;
                let checkpoint = Checkpoint::load(&path).map_err(|e| e.to_string())?.ok_or_else(|| {
                    format!(
                        "no checkpoint at {} (field `checkpoint_file`): run the node for at least one round first",
                        path.display()
                    )
                })?;
                (checkpoint, path)
            };
        config
            .model
            .validate(input)
            .map_err(|reason| format!("field `model`: {reason}"))?;
        let mut learner = Learner::new(
            &config.model,
            config.training.clone(),
            crate::device::DeviceKind::Flex,
            input,
            classes,
        );
        learner.restore_state(&checkpoint.learner).map_err(|e| {
            format!(
                "{} does not fit `[model]`/`[training]`: {e}",
                path.display()
            )
        })?;
        if learner.weights_digest() != checkpoint.weights_digest {
            return Err(format!(
                "{}: restored weights do not match its digest",
                path.display()
            ));
        }
        Ok(MemberStudent {
            learner,
            federation_id: checkpoint.federation_id,
            round: checkpoint.round,
            validation_accuracy,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use fd_data::{DataSource, DataSplits};
    use crate::device::DeviceKind;
    use crate::learner::{Learner, TrainingConfig};
    use crate::model::argmax;

    fn synthetic(train: usize, test: usize) -> DataSplits {
        DataSource::Synthetic {
            seed: 5,
            train,
            test,
        }
        .load()
        .unwrap()
    }

    /// A learner of `model` trained for one pass over `samples` private samples
    /// (so batch-norm running statistics are no longer their initial values).
    fn trained(model: &ModelConfig, data: &DataSplits, samples: usize) -> Learner {
        trained_for(model, data, samples, 1)
    }

    fn trained_for(
        model: &ModelConfig,
        data: &DataSplits,
        samples: usize,
        epochs: usize,
    ) -> Learner {
        let mut learner = Learner::new(
            model,
            TrainingConfig {
                local_epochs: epochs,
                // Plain supervised training of a fixture, not a member's round.
                local_ntd: 0.0,
                ..TrainingConfig::default()
            },
            DeviceKind::Flex,
            InputShape::new(data.train.shape),
            data.train.classes,
        );
        learner.train_local(&data.train, &(0..samples).collect::<Vec<_>>());
        learner
    }

    fn logits(student: &Student, data: &fd_data::Dataset, n: usize) -> Vec<f32> {
        let indices: Vec<usize> = (0..n).collect();
        let x = Tensor::from_data(
            TensorData::new(data.features_f32(&indices), [n, data.features]),
            &Device::flex(),
        );
        student.forward(x).into_data().iter::<f32>().collect()
    }

    fn export(
        model: &ModelConfig,
        learner: &Learner,
        data: &DataSplits,
        format: ExportFormat,
        dir: &Path,
    ) -> ModelCard {
        export_student(
            &learner.student().valid(),
            model,
            InputShape::new(data.train.shape),
            data.train.classes,
            Provenance {
                federation_id: Some("fed-test".into()),
                round: Some(3),
                test_accuracy: None,
                validation_accuracy: None,
                data: None,
            },
            format,
            dir,
        )
        .unwrap()
    }

    #[test]
    fn f32_round_trip_gives_bit_identical_logits_for_every_zoo_model() {
        let data = synthetic(64, 32);
        for model in ModelConfig::zoo() {
            let learner = trained(&model, &data, 32);
            let dir = tempfile::tempdir().unwrap();
            let card = export(&model, &learner, &data, ExportFormat::F32, dir.path());
            assert_eq!(card.architecture, model);
            assert_eq!(card.round, Some(3));
            let loaded = load_exported(dir.path(), &Device::flex()).unwrap();
            let before = logits(&learner.student().valid(), &data.test, 32);
            let after = logits(&loaded.student, &data.test, 32);
            let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
            assert_eq!(bits(&before), bits(&after), "{}", model.name());
            // And the loaded weights are the trained ones, not a fresh init.
            let fresh = model.init(InputShape::new(data.train.shape), 10, 0, &Device::flex());
            assert_ne!(bits(&logits(&fresh, &data.test, 32)), bits(&after));
        }
    }

    #[test]
    fn safetensors_names_shapes_and_dtypes_are_torch_ones() {
        let data = synthetic(16, 8);
        let read = |dir: &Path| -> Vec<(String, safetensors::Dtype, Vec<usize>)> {
            let bytes = std::fs::read(dir.join(WEIGHTS_FILE)).unwrap();
            let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
            let mut out: Vec<_> = st
                .tensors()
                .into_iter()
                .map(|(n, v)| (n, v.dtype(), v.shape().to_vec()))
                .collect();
            out.sort();
            out
        };
        use safetensors::Dtype::{F16, F32, I8};
        let mlp = ModelConfig::default();
        let learner = trained(&mlp, &data, 8);
        let dir = tempfile::tempdir().unwrap();
        export(&mlp, &learner, &data, ExportFormat::F32, dir.path());
        let names = |v: &[(String, safetensors::Dtype, Vec<usize>)]| {
            v.iter()
                .map(|(n, d, s)| (n.clone(), *d, s.clone()))
                .collect::<Vec<_>>()
        };
        let expect = |d: safetensors::Dtype| {
            vec![
                ("layers.0.bias".to_string(), F32, vec![200]),
                ("layers.0.weight".to_string(), d, vec![200, 784]),
                ("layers.1.bias".to_string(), F32, vec![200]),
                ("layers.1.weight".to_string(), d, vec![200, 200]),
                ("layers.2.bias".to_string(), F32, vec![10]),
                ("layers.2.weight".to_string(), d, vec![10, 200]),
            ]
        };
        assert_eq!(names(&read(dir.path())), expect(F32));
        export(&mlp, &learner, &data, ExportFormat::F16, dir.path());
        let f16: Vec<_> = expect(F16)
            .into_iter()
            .map(|(n, _, s)| (n, F16, s))
            .collect();
        assert_eq!(read(dir.path()), f16);
        let card = export(&mlp, &learner, &data, ExportFormat::Int8, dir.path());
        let mut int8 = expect(I8);
        for (name, rows) in [
            ("layers.0.weight_scale", 200),
            ("layers.1.weight_scale", 200),
            ("layers.2.weight_scale", 10),
        ] {
            int8.push((name.to_string(), F32, vec![rows]));
        }
        int8.sort();
        assert_eq!(read(dir.path()), int8);
        assert_eq!(
            card.quantisation.unwrap().quantised,
            ["layers.0.weight", "layers.1.weight", "layers.2.weight"]
        );

        // The ResNet: convolutions, batch norms (PyTorch's weight/bias/
        // running_mean/running_var) and the projection shortcut.
        let resnet = ModelConfig::ResNet { blocks: vec![1, 1] };
        let learner = trained(&resnet, &data, 8);
        export(&resnet, &learner, &data, ExportFormat::F32, dir.path());
        let got = read(dir.path());
        let find = |n: &str| {
            got.iter()
                .find(|(name, _, _)| name == n)
                .unwrap_or_else(|| panic!("no {n} in {got:?}"))
                .2
                .clone()
        };
        assert_eq!(find("stem.weight"), [16, 1, 3, 3]);
        for p in ["weight", "bias", "running_mean", "running_var"] {
            assert_eq!(find(&format!("stem_norm.{p}")), [16]);
            assert_eq!(find(&format!("blocks.1.shortcut.norm.{p}")), [32]);
        }
        assert_eq!(find("blocks.0.conv1.weight"), [16, 16, 3, 3]);
        assert_eq!(find("blocks.1.conv1.weight"), [32, 16, 3, 3]);
        assert_eq!(find("blocks.1.shortcut.conv.weight"), [32, 16, 1, 1]);
        assert_eq!(find("output.weight"), [10, 32]);
        assert_eq!(find("output.bias"), [10]);
        // 1 stem conv + 2·2 block convs + 1 shortcut conv, 6 batch norms × 4, output 2.
        assert_eq!(got.len(), 1 + 4 + 1 + 6 * 4 + 2, "{got:?}");
        assert!(
            got.iter()
                .all(|(n, _, _)| !n.contains("gamma") && !n.contains("ResNet"))
        );
    }

    fn accuracy(student: &Student, data: &fd_data::Dataset) -> f64 {
        let n = data.len();
        let l = logits(student, data, n);
        let correct = l
            .chunks(10)
            .zip(&data.labels)
            .filter(|(row, y)| argmax(row) == **y as usize)
            .count();
        correct as f64 / n as f64
    }

    /// f16 and int8 against f32 on a fixed synthetic test set (2,000
    /// samples, seed 5), for the MLP and the FedAvg CNN. Bounds: f16 within
    /// 0.5 points, int8 within 1 point (the target), and the int8
    /// weights file at least 3.5× smaller than f32.
    #[test]
    fn quantised_exports_stay_within_the_stated_accuracy_bounds() {
        let data = synthetic(2000, 2000);
        for (model, samples, epochs) in [
            (ModelConfig::default(), 2000, 8),
            (ModelConfig::FedAvgCnn {}, 1000, 3),
        ] {
            let learner = trained_for(&model, &data, samples, epochs);
            let mut acc = HashMap::new();
            let mut size = HashMap::new();
            for format in ExportFormat::ALL {
                let dir = tempfile::tempdir().unwrap();
                let card = export(&model, &learner, &data, format, dir.path());
                let loaded = load_exported(dir.path(), &Device::flex()).unwrap();
                acc.insert(format, accuracy(&loaded.student, &data.test));
                size.insert(format, card.weights_bytes);
            }
            let f32_acc = acc[&ExportFormat::F32];
            println!(
                "{}: accuracy f32 {f32_acc:.4} f16 {:.4} int8 {:.4}; bytes f32 {} f16 {} int8 {}",
                model.name(),
                acc[&ExportFormat::F16],
                acc[&ExportFormat::Int8],
                size[&ExportFormat::F32],
                size[&ExportFormat::F16],
                size[&ExportFormat::Int8],
            );
            // Chance is 0.1: the deltas are measured on a model that has learned.
            assert!(f32_acc > 0.4, "{}: undertrained ({f32_acc})", model.name());
            assert!(
                (acc[&ExportFormat::F16] - f32_acc).abs() <= 0.005,
                "{acc:?}"
            );
            assert!(
                (acc[&ExportFormat::Int8] - f32_acc).abs() <= 0.01,
                "{acc:?}"
            );
            let ratio = size[&ExportFormat::F32] as f64 / size[&ExportFormat::Int8] as f64;
            assert!(ratio >= 3.5, "int8 only {ratio:.2}× smaller");
            let half = size[&ExportFormat::F32] as f64 / size[&ExportFormat::F16] as f64;
            assert!(half > 1.9, "f16 only {half:.2}× smaller");
        }
    }

    #[test]
    fn bad_exports_are_errors_naming_the_file_or_field() {
        let data = synthetic(16, 8);
        let mlp = ModelConfig::Mlp { hidden: vec![8] };
        let learner = trained(&mlp, &data, 8);
        let dir = tempfile::tempdir().unwrap();
        let err = load_exported(dir.path(), &Device::flex()).unwrap_err();
        assert!(
            matches!(err, ExportError::Io { .. }) && err.to_string().contains(CARD_FILE),
            "{err}"
        );

        export(&mlp, &learner, &data, ExportFormat::Int8, dir.path());
        let weights = dir.path().join(WEIGHTS_FILE);
        let mut bytes = std::fs::read(&weights).unwrap();
        let last = bytes.len() - 1;
        bytes[last] ^= 1;
        std::fs::write(&weights, &bytes).unwrap();
        let err = load_exported(dir.path(), &Device::flex()).unwrap_err();
        assert!(matches!(err, ExportError::Digest { .. }), "{err}");
        assert!(err.to_string().contains(WEIGHTS_FILE), "{err}");

        // An int8 file whose scales do not fit its weights: an error naming them.
        let (bytes, _) = encode_weights(&learner.student().valid(), ExportFormat::Int8).unwrap();
        let mut reader = SafetensorsStore::from_bytes(Some(bytes));
        let names: Vec<String> = reader.keys().unwrap();
        assert!(
            names.contains(&"layers.0.weight_scale".to_string()),
            "{names:?}"
        );
        let st_bytes = {
            let (bytes, _) =
                encode_weights(&learner.student().valid(), ExportFormat::Int8).unwrap();
            let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
            let mut views: Vec<(String, safetensors::tensor::TensorView)> = st
                .tensors()
                .into_iter()
                .filter(|(n, _)| n != "layers.0.weight_scale")
                .collect();
            let short = [0u8; 4 * 3];
            views.push((
                "layers.0.weight_scale".into(),
                safetensors::tensor::TensorView::new(safetensors::Dtype::F32, vec![3], &short)
                    .unwrap(),
            ));
            safetensors::serialize(views, None).unwrap()
        };
        let input = InputShape::new(data.train.shape);
        let err = decode_weights(st_bytes, &mlp, input, 10, &Device::flex()).unwrap_err();
        assert!(err.contains("layers.0.weight_scale has 3 values"), "{err}");

        // Weights of another architecture behind a card that names their digest.
        export(&mlp, &learner, &data, ExportFormat::F32, dir.path());
        let card_path = dir.path().join(CARD_FILE);
        let mut card: serde_json::Value =
            serde_json::from_slice(&std::fs::read(&card_path).unwrap()).unwrap();
        card["architecture"] = serde_json::json!({"kind": "mlp", "hidden": [9]});
        std::fs::write(&card_path, serde_json::to_vec(&card).unwrap()).unwrap();
        let err = load_exported(dir.path(), &Device::flex()).unwrap_err();
        assert!(matches!(err, ExportError::Weights { .. }), "{err}");

        card["architecture"] = serde_json::json!({"kind": "cnn"});
        card["input"]["shape"] = serde_json::json!([1, 1, 784]);
        std::fs::write(&card_path, serde_json::to_vec(&card).unwrap()).unwrap();
        let err = load_exported(dir.path(), &Device::flex()).unwrap_err();
        assert!(err.to_string().contains("`architecture`"), "{err}");

        std::fs::write(&card_path, b"{\"card_version\": 1}").unwrap();
        let err = load_exported(dir.path(), &Device::flex()).unwrap_err();
        assert!(matches!(err, ExportError::Card { .. }), "{err}");
        assert!(err.to_string().contains("missing field"), "{err}");
    }

    /// Why int8 is not burn's own quantisation (module doc): burn
    /// quantises on flex, but its SafeTensors store refuses the result.
    /// When this fails, burn-store has learnt to write quantised tensors.
    #[test]
    fn burn_store_refuses_burns_quantised_tensors() {
        use burn::tensor::quantization::QuantScheme;
        let device = Device::flex();
        let mut linear = burn::nn::LinearConfig::new(8, 4).init(&device);
        linear.weight = linear
            .weight
            .map(|w| w.quantize_dynamic(&QuantScheme::default()));
        // Quantisation itself works on flex: the dequantised weight is close.
        let w = linear.weight.val().dequantize();
        assert_eq!(w.dims(), [8, 4]);
        let mut store = SafetensorsStore::from_bytes(None);
        let err = linear.save_into(&mut store).unwrap_err();
        assert!(format!("{err:?}").contains("Quantized"), "{err:?}");
    }

    #[test]
    fn formats_parse_and_print() {
        for f in ExportFormat::ALL {
            assert_eq!(f.name().parse::<ExportFormat>().unwrap(), f);
        }
        assert!("bf16".parse::<ExportFormat>().unwrap_err().contains("bf16"));
    }
}

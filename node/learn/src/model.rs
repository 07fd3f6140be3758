//! Student models (burn 0.22): the model zoo.
//!
//! Each node may choose its own architecture: only logits on the public set
//! are ever compared across nodes, never weights. The zoo is one serde enum
//! ([`ModelConfig`], tagged by `kind` in the `[model]` table) mapped onto one
//! burn module enum ([`Student`]), so the learner, the member and the
//! simulator handle every architecture through the same three calls:
//! [`ModelConfig::init`], [`Student::forward`] and the optimizer step.
//!
//! Design points:
//! - Tensors in burn 0.22 carry their backend in their `Device`, so one model
//!   definition runs on flex, ndarray or wgpu; the node picks the device from
//!   its config ([`crate::device::DeviceKind`]).
//! - `forward` always takes flattened samples `[batch, features]`, because the
//!   data layer and the public-set logits are flat. Convolutional students
//!   reshape to `[batch, c, h, w]` with the [`InputShape`] captured at init,
//!   held as a skipped (`#[module(skip)]`) field: it is neither trained nor
//!   written into records, and a model cannot be fed data of another shape.
//! - burn creates parameters lazily: the random draw happens on first access,
//!   not in `XConfig::init`. [`ModelConfig::init`] therefore forces every
//!   parameter while it holds the seeding lock; otherwise initial weights would
//!   depend on whichever other node in the process touched the global RNG first.
//! - Parameter counts: [`ModelSummary::params`] counts what the optimizer
//!   trains; [`ModelSummary::weight_bytes`] counts the whole module state as
//!   f32, batch-norm running statistics included, because that is what a
//!   weight-sharing scheme such as FedAvg would have to send.

use std::sync::Mutex;

use burn::module::{Module, ModuleVisitor, Param};
use burn::nn::{BatchNorm, BatchNormConfig, Linear, LinearConfig, Relu};
use burn::prelude::*;
use burn::tensor::activation::relu;
use serde::{Deserialize, Serialize};

use crate::fastconv::{FastConv2d, FastConv2dConfig, max_pool2x2};

/// The shape of one input sample: channels × height × width (tabular data: 1 × 1 × features).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct InputShape {
    pub channels: usize,
    pub height: usize,
    pub width: usize,
}

impl InputShape {
    pub fn new([channels, height, width]: [usize; 3]) -> Self {
        InputShape {
            channels,
            height,
            width,
        }
    }

    /// Values per sample.
    pub fn features(&self) -> usize {
        self.channels * self.height * self.width
    }
}

/// Which student a node trains. Deserialized from the `[model]` table:
///
/// ```toml
/// kind = "mlp"          # hidden = [200, 200]
/// kind = "cnn"          # channels = [16, 32], fc = 128
/// kind = "fedavg-cnn"   # no options: the CNN of McMahan et al. 2017
/// kind = "resnet"       # blocks = [1, 1, 1]
/// ```
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "kebab-case", deny_unknown_fields)]
pub enum ModelConfig {
    /// Fully connected ReLU network; `hidden` lists the hidden layer widths.
    Mlp {
        #[serde(default = "default_hidden")]
        hidden: Vec<usize>,
    },
    /// Small CNN: per entry of `channels` a 3×3 convolution (padding 1), ReLU
    /// and 2×2 max-pool; then a hidden fully connected layer of `fc` units
    /// with ReLU and the output layer.
    #[serde(rename = "cnn")]
    SmallCnn {
        #[serde(default = "default_cnn_channels")]
        channels: Vec<usize>,
        #[serde(default = "default_cnn_fc")]
        fc: usize,
    },
    /// The CNN of McMahan et al. 2017 (FedAvg): 5×5 convolutions with 32 and
    /// 64 channels (padding 2), each with ReLU and 2×2 max-pool, then fully
    /// connected 512 with ReLU and the output layer. An empty struct variant
    /// rather than a unit one so that `deny_unknown_fields` rejects options.
    #[serde(rename = "fedavg-cnn")]
    FedAvgCnn {},
    /// A small ResNet: stem 3×3 convolution (16 channels) with batch norm and
    /// ReLU, then stages of basic residual blocks; stage `i` is
    /// `16 · 2^i` channels wide, has `blocks[i]` blocks and halves the
    /// resolution at its start (except stage 0); global average pooling and
    /// the output layer.
    #[serde(rename = "resnet")]
    ResNet {
        #[serde(default = "default_resnet_blocks")]
        blocks: Vec<usize>,
    },
}

fn default_hidden() -> Vec<usize> {
    vec![200, 200]
}

fn default_cnn_channels() -> Vec<usize> {
    vec![16, 32]
}

fn default_cnn_fc() -> usize {
    128
}

fn default_resnet_blocks() -> Vec<usize> {
    vec![1, 1, 1]
}

/// Channels of the first ResNet stage; each later stage doubles them.
const RESNET_BASE_WIDTH: usize = 16;
/// Most ResNet stages accepted: 8 stages already end 2048 channels wide, and
/// the cap keeps `16 << stage` far from overflow.
const RESNET_MAX_STAGES: usize = 8;

impl ModelConfig {
    /// One of each architecture at its default size: the models the tests,
    /// the export round trips and `fd-sim bench` go through.
    pub fn zoo() -> Vec<ModelConfig> {
        vec![
            ModelConfig::default(),
            ModelConfig::SmallCnn {
                channels: default_cnn_channels(),
                fc: default_cnn_fc(),
            },
            ModelConfig::FedAvgCnn {},
            ModelConfig::ResNet {
                blocks: default_resnet_blocks(),
            },
        ]
    }
}

impl ModelConfig {
    /// Multiply-adds of one sample's forward pass when the student is fully
    /// connected (an MLP): Σ in × out over its layers. `None` for students
    /// with convolutions, whose work does not follow from their weights.
    pub fn dense_multiply_adds(&self, input: InputShape, classes: usize) -> Option<usize> {
        let ModelConfig::Mlp { hidden } = self else {
            return None;
        };
        let mut widths = Vec::with_capacity(hidden.len() + 2);
        widths.push(input.features());
        widths.extend(hidden.iter().copied());
        widths.push(classes);
        Some(widths.windows(2).map(|w| w[0] * w[1]).sum())
    }

    /// The small deployable students `fd-node compress` distils the zoo's
    /// larger ones into: MLP 64 and MLP 32 (for the MLP 200-200) and a
    /// two-stage CNN of 8 and 16 channels with a 32-unit hidden layer (for
    /// the FedAvg CNN, 1.66 M parameters → about 26 k on 28×28 inputs).
    pub fn compact_zoo() -> Vec<ModelConfig> {
        vec![
            ModelConfig::Mlp { hidden: vec![64] },
            ModelConfig::Mlp { hidden: vec![32] },
            ModelConfig::SmallCnn {
                channels: vec![8, 16],
                fc: 32,
            },
        ]
    }
}

/// Parses what [`ModelConfig::name`] prints, so the command line can name a
/// student: `mlp-32`, `mlp-200-200`, `mlp` (no hidden layer), `cnn-8-16`,
/// `cnn-8-16-fc32`, `fedavg-cnn`, `resnet-1-1-1`.
impl std::str::FromStr for ModelConfig {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let widths = |rest: &str| -> Result<Vec<usize>, String> {
            rest.split('-')
                .filter(|p| !p.is_empty())
                .map(|p| {
                    p.parse::<usize>()
                        .map_err(|_| format!("model {s:?}: {p:?} is not a width"))
                })
                .collect()
        };
        let config = if s == "fedavg-cnn" {
            ModelConfig::FedAvgCnn {}
        } else if let Some(rest) = s.strip_prefix("mlp").filter(|r| r.is_empty() || r.starts_with('-')) {
            ModelConfig::Mlp { hidden: widths(rest)? }
        } else if let Some(rest) = s.strip_prefix("cnn").filter(|r| r.is_empty() || r.starts_with('-')) {
            let (rest, fc) = match rest.rsplit_once("-fc") {
                Some((head, fc)) => (
                    head,
                    fc.parse::<usize>()
                        .map_err(|_| format!("model {s:?}: fc width {fc:?} is not a number"))?,
                ),
                None => (rest, default_cnn_fc()),
            };
            let channels = widths(rest)?;
            ModelConfig::SmallCnn {
                channels: if channels.is_empty() { default_cnn_channels() } else { channels },
                fc,
            }
        } else if let Some(rest) = s.strip_prefix("resnet").filter(|r| r.is_empty() || r.starts_with('-')) {
            let blocks = widths(rest)?;
            ModelConfig::ResNet {
                blocks: if blocks.is_empty() { default_resnet_blocks() } else { blocks },
            }
        } else {
            return Err(format!(
                "unknown model {s:?}: expected mlp-<widths>, cnn-<channels>[-fc<n>], fedavg-cnn or resnet-<blocks>"
            ));
        };
        config.validate_fields().map_err(|e| format!("model {s:?}: {e}"))?;
        Ok(config)
    }
}

impl Default for ModelConfig {
    fn default() -> Self {
        ModelConfig::Mlp {
            hidden: default_hidden(),
        }
    }
}

/// What a config builds into, for logs and reports.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ModelSummary {
    /// [`ModelConfig::name`].
    pub name: String,
    /// Trainable parameters (what the optimizer updates).
    pub params: usize,
    /// The whole module state as f32, running statistics included.
    pub weight_bytes: usize,
}

/// How a plain convolutional stack is laid out; [`ModelConfig::SmallCnn`] and
/// [`ModelConfig::FedAvgCnn`] differ only in these numbers.
struct ConvNetSpec<'a> {
    channels: &'a [usize],
    kernel: usize,
    fc: usize,
}

impl ModelConfig {
    /// A short description: `mlp-200-200`, `cnn-16-32` (`cnn-16-32-fc64`
    /// when `fc` is not the default 128), `fedavg-cnn`, `resnet-1-1-1`.
    pub fn name(&self) -> String {
        fn join(prefix: &str, widths: &[usize]) -> String {
            let mut name = prefix.to_string();
            for w in widths {
                name.push_str(&format!("-{w}"));
            }
            name
        }
        match self {
            ModelConfig::Mlp { hidden } => join("mlp", hidden),
            ModelConfig::SmallCnn { channels, fc } => {
                let mut name = join("cnn", channels);
                if *fc != default_cnn_fc() {
                    name.push_str(&format!("-fc{fc}"));
                }
                name
            }
            ModelConfig::FedAvgCnn {} => "fedavg-cnn".to_string(),
            ModelConfig::ResNet { blocks } => join("resnet", blocks),
        }
    }

    /// Checks the fields that do not depend on the data (zero widths, empty
    /// lists), naming the bad one. Config loading calls this before the data
    /// and hence the input shape are known.
    pub fn validate_fields(&self) -> Result<(), String> {
        match self {
            ModelConfig::Mlp { hidden } => {
                if hidden.contains(&0) {
                    return Err(format!(
                        "`hidden` widths must be at least 1, got {hidden:?}"
                    ));
                }
            }
            ModelConfig::SmallCnn { channels, fc } => {
                if channels.is_empty() {
                    return Err("`channels` must list at least one convolution".into());
                }
                if channels.contains(&0) {
                    return Err(format!(
                        "`channels` widths must be at least 1, got {channels:?}"
                    ));
                }
                if *fc == 0 {
                    return Err("`fc` must be at least 1".into());
                }
            }
            ModelConfig::FedAvgCnn {} => {}
            ModelConfig::ResNet { blocks } => {
                if blocks.is_empty() {
                    return Err("`blocks` must list at least one stage".into());
                }
                if blocks.len() > RESNET_MAX_STAGES {
                    return Err(format!(
                        "`blocks` lists {} stages, at most {RESNET_MAX_STAGES} are supported",
                        blocks.len()
                    ));
                }
                if blocks.contains(&0) {
                    return Err(format!(
                        "`blocks` must be at least 1 per stage, got {blocks:?}"
                    ));
                }
            }
        }
        Ok(())
    }

    /// Checks the config against the data it will see: [`Self::validate_fields`]
    /// plus whether the architecture fits `input` (e.g. a CNN whose max-pools
    /// would shrink a 1×1×N tabular sample to nothing).
    pub fn validate(&self, input: InputShape) -> Result<(), String> {
        self.validate_fields()?;
        if input.features() == 0 {
            return Err(format!("input shape {input:?} has no features"));
        }
        let pools = |field: &str, n: usize| -> Result<(), String> {
            let (h, w) = (input.height >> n, input.width >> n);
            if h == 0 || w == 0 {
                return Err(format!(
                    "{field}: {n} 2×2 max-pools shrink a {}×{} input (height × width) to {h}×{w}; \
                     this model needs images of at least {}×{} pixels",
                    input.height,
                    input.width,
                    1usize << n,
                    1usize << n
                ));
            }
            Ok(())
        };
        match self {
            ModelConfig::SmallCnn { channels, .. } => pools("`channels`", channels.len()),
            ModelConfig::FedAvgCnn {} => pools("`kind` = \"fedavg-cnn\"", 2),
            // Stride-2 3×3 convolutions with padding 1 map any size ≥ 1 to a
            // size ≥ 1, so a ResNet fits every input, even a 1×N "image".
            ModelConfig::Mlp { .. } | ModelConfig::ResNet { .. } => Ok(()),
        }
    }

    /// Name and size of the student this config builds for `input` and
    /// `classes`, read off a real (unmaterialised, so cheap) module.
    ///
    /// # Panics
    /// If [`Self::validate`] rejects `input`.
    pub fn describe(&self, input: InputShape, classes: usize) -> ModelSummary {
        // Parameters are lazy until touched, and counting reads only their
        // shapes: nothing is drawn or allocated beyond a few small buffers.
        let student = self.build(input, classes, &Device::flex());
        ModelSummary {
            name: self.name(),
            params: student.params(),
            weight_bytes: student.weight_bytes(),
        }
    }

    /// Builds the student with weights drawn from `seed`.
    ///
    /// burn draws initial weights from a per-backend (possibly global) RNG,
    /// and only when a parameter is first touched. Holding a lock while
    /// seeding, building and touching every parameter keeps initial weights a
    /// function of the seed alone, even when many nodes share one process.
    ///
    /// # Panics
    /// If [`Self::validate`] rejects `input` (configs are validated when loaded).
    pub fn init(&self, input: InputShape, classes: usize, seed: u64, device: &Device) -> Student {
        let _guard = INIT_LOCK.lock().unwrap_or_else(|e| e.into_inner());
        device.seed(seed);
        let student = self.build(input, classes, device);
        student.visit(&mut Materialize);
        student
    }

    /// The module with lazy (not yet drawn) parameters.
    fn build(&self, input: InputShape, classes: usize, device: &Device) -> Student {
        if let Err(reason) = self.validate(input) {
            panic!("model {} cannot take {input:?}: {reason}", self.name());
        }
        match self {
            ModelConfig::Mlp { hidden } => {
                let mut layers = Vec::with_capacity(hidden.len() + 1);
                let mut width = input.features();
                for &h in hidden {
                    layers.push(LinearConfig::new(width, h).init(device));
                    width = h;
                }
                layers.push(LinearConfig::new(width, classes).init(device));
                Student::Mlp(Mlp {
                    layers,
                    activation: Relu::new(),
                })
            }
            ModelConfig::SmallCnn { channels, fc } => Student::SmallCnn(ConvNet::new(
                ConvNetSpec {
                    channels,
                    kernel: 3,
                    fc: *fc,
                },
                input,
                classes,
                device,
            )),
            ModelConfig::FedAvgCnn {} => Student::FedAvgCnn(ConvNet::new(
                ConvNetSpec {
                    channels: &[32, 64],
                    kernel: 5,
                    fc: 512,
                },
                input,
                classes,
                device,
            )),
            ModelConfig::ResNet { blocks } => {
                Student::ResNet(ResNet::new(blocks, input, classes, device))
            }
        }
    }
}

/// Serialises seeding and initialisation across the process (see [`ModelConfig::init`]).
pub(crate) static INIT_LOCK: Mutex<()> = Mutex::new(());

/// Runs `build` with `device` seeded with `seed`, under the same process-wide
/// lock as [`ModelConfig::init`], so parameters `build` draws (and touches,
/// burn initialises lazily) depend on the seed alone: for modules outside
/// the zoo, such as compression's hint projections.
pub fn seeded_init<T>(device: &Device, seed: u64, build: impl FnOnce() -> T) -> T {
    let _guard = INIT_LOCK.lock().unwrap_or_else(|e| e.into_inner());
    device.seed(seed);
    build()
}

/// Touches every float parameter so lazy initialisers run now, in field order.
struct Materialize;

impl ModuleVisitor for Materialize {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
        let _ = param.val();
    }
}

/// A multilayer perceptron.
#[derive(Module, Debug)]
pub struct Mlp {
    layers: Vec<Linear>,
    activation: Relu,
}

impl Mlp {
    pub fn forward(&self, input: Tensor<2>) -> Tensor<2> {
        let last = self.layers.len() - 1;
        self.layers[last].forward(self.features(input))
    }

    /// The last hidden layer's activations (the input without hidden layers).
    pub fn features(&self, input: Tensor<2>) -> Tensor<2> {
        let last = self.layers.len() - 1;
        let mut x = input;
        for layer in &self.layers[..last] {
            x = self.activation.forward(layer.forward(x));
        }
        x
    }
}

/// `[batch, features]` → `[batch, c, h, w]`.
fn unflatten(input: Tensor<2>, shape: InputShape) -> Tensor<4> {
    let [batch, _] = input.dims();
    input.reshape([batch, shape.channels, shape.height, shape.width])
}

/// A plain CNN: (conv "same" → ReLU → 2×2 max-pool) per stage, then one hidden
/// fully connected layer with ReLU and the output layer.
///
/// Convolutions and pools are [`crate::fastconv`]'s (fast on flex, burn's
/// own ops elsewhere). ReLU is applied after the pool, on a quarter of the
/// values: max-pooling commutes with ReLU, so values and gradients are those
/// of conv → ReLU → pool.
#[derive(Module, Debug)]
pub struct ConvNet {
    convs: Vec<FastConv2d>,
    hidden: Linear,
    output: Linear,
    #[module(skip)]
    input: InputShape,
}

impl ConvNet {
    fn new(spec: ConvNetSpec, input: InputShape, classes: usize, device: &Device) -> Self {
        let pad = spec.kernel / 2;
        let mut convs = Vec::with_capacity(spec.channels.len());
        let mut width = input.channels;
        for &c in spec.channels {
            convs.push(
                FastConv2dConfig::new([width, c], spec.kernel)
                    .with_padding(pad)
                    .init(device),
            );
            width = c;
        }
        // Each pool halves (floor) both sides; repeated floor-halving is a shift.
        let n = spec.channels.len();
        let flat = width * (input.height >> n) * (input.width >> n);
        ConvNet {
            convs,
            hidden: LinearConfig::new(flat, spec.fc).init(device),
            output: LinearConfig::new(spec.fc, classes).init(device),
            input,
        }
    }

    pub fn forward(&self, input: Tensor<2>) -> Tensor<2> {
        self.output.forward(self.features(input))
    }

    /// The hidden fully connected layer's activations.
    pub fn features(&self, input: Tensor<2>) -> Tensor<2> {
        let mut x = unflatten(input, self.input);
        for conv in &self.convs {
            x = relu(max_pool2x2(conv.forward(x)));
        }
        let x: Tensor<2> = x.flatten(1, 3);
        relu(self.hidden.forward(x))
    }
}

/// 3×3 convolution without bias (a batch norm follows, whose shift replaces it).
fn conv3x3(in_channels: usize, out_channels: usize, stride: usize, device: &Device) -> FastConv2d {
    FastConv2dConfig::new([in_channels, out_channels], 3)
        .with_stride(stride)
        .with_padding(1)
        .with_bias(false)
        .init(device)
}

/// The 1×1 convolution + batch norm that matches the identity path's shape to
/// a block that changes width or resolution.
#[derive(Module, Debug)]
pub struct Projection {
    conv: FastConv2d,
    norm: BatchNorm,
}

/// A basic residual block: conv-BN-ReLU-conv-BN plus the (projected) input, ReLU.
#[derive(Module, Debug)]
pub struct BasicBlock {
    conv1: FastConv2d,
    norm1: BatchNorm,
    conv2: FastConv2d,
    norm2: BatchNorm,
    shortcut: Option<Projection>,
}

impl BasicBlock {
    fn new(in_channels: usize, out_channels: usize, stride: usize, device: &Device) -> Self {
        let shortcut = (stride != 1 || in_channels != out_channels).then(|| Projection {
            conv: FastConv2dConfig::new([in_channels, out_channels], 1)
                .with_stride(stride)
                .with_bias(false)
                .init(device),
            norm: BatchNormConfig::new(out_channels).init(device),
        });
        BasicBlock {
            conv1: conv3x3(in_channels, out_channels, stride, device),
            norm1: BatchNormConfig::new(out_channels).init(device),
            conv2: conv3x3(out_channels, out_channels, 1, device),
            norm2: BatchNormConfig::new(out_channels).init(device),
            shortcut,
        }
    }

    fn forward(&self, x: Tensor<4>) -> Tensor<4> {
        let identity = match &self.shortcut {
            Some(p) => p.norm.forward(p.conv.forward(x.clone())),
            None => x.clone(),
        };
        let y = relu(self.norm1.forward(self.conv1.forward(x)));
        let y = self.norm2.forward(self.conv2.forward(y));
        relu(y + identity)
    }

    fn norms(&self) -> impl Iterator<Item = &BatchNorm> {
        [&self.norm1, &self.norm2]
            .into_iter()
            .chain(self.shortcut.as_ref().map(|p| &p.norm))
    }
}

/// A small ResNet (see [`ModelConfig::ResNet`]).
///
/// Its batch norms use batch statistics and update their running statistics
/// on an autodiff device, and use the running statistics once `valid()` has
/// switched the module to inference (as the learner's `predict` does).
#[derive(Module, Debug)]
pub struct ResNet {
    stem: FastConv2d,
    stem_norm: BatchNorm,
    blocks: Vec<BasicBlock>,
    output: Linear,
    #[module(skip)]
    input: InputShape,
}

impl ResNet {
    fn new(stages: &[usize], input: InputShape, classes: usize, device: &Device) -> Self {
        let mut blocks = Vec::new();
        let mut width = RESNET_BASE_WIDTH;
        for (stage, &count) in stages.iter().enumerate() {
            let out = RESNET_BASE_WIDTH << stage;
            for i in 0..count {
                let stride = if stage > 0 && i == 0 { 2 } else { 1 };
                blocks.push(BasicBlock::new(width, out, stride, device));
                width = out;
            }
        }
        ResNet {
            stem: conv3x3(input.channels, RESNET_BASE_WIDTH, 1, device),
            stem_norm: BatchNormConfig::new(RESNET_BASE_WIDTH).init(device),
            blocks,
            output: LinearConfig::new(width, classes).init(device),
            input,
        }
    }

    pub fn forward(&self, input: Tensor<2>) -> Tensor<2> {
        self.output.forward(self.features(input))
    }

    /// The globally average-pooled activations of the last block.
    pub fn features(&self, input: Tensor<2>) -> Tensor<2> {
        let x = unflatten(input, self.input);
        let mut x = relu(self.stem_norm.forward(self.stem.forward(x)));
        for block in &self.blocks {
            x = block.forward(x);
        }
        let [batch, channels, _, _] = x.dims();
        // Global average pooling.
        x.mean_dim(3).mean_dim(2).reshape([batch, channels])
    }

    /// Values in running statistics (mean and variance per batch-norm channel):
    /// module state, but not trained by the optimizer.
    fn running_stat_values(&self) -> usize {
        std::iter::once(&self.stem_norm)
            .chain(self.blocks.iter().flat_map(BasicBlock::norms))
            .map(|n| 2 * n.gamma.lazy_shape().num_elements())
            .sum()
    }
}

/// Any student of the zoo. Its variants differ in size (a ResNet holds more
/// layer handles than an MLP); a learner holds one, so boxing them would buy
/// nothing but an indirection in burn's derived `Module` code.
#[derive(Module, Debug)]
#[allow(clippy::large_enum_variant)]
pub enum Student {
    Mlp(Mlp),
    SmallCnn(ConvNet),
    FedAvgCnn(ConvNet),
    ResNet(ResNet),
}

impl Student {
    /// Logits `[batch, classes]` for a batch of flattened samples `[batch, features]`.
    pub fn forward(&self, input: Tensor<2>) -> Tensor<2> {
        match self {
            Student::Mlp(m) => m.forward(input),
            Student::SmallCnn(m) | Student::FedAvgCnn(m) => m.forward(input),
            Student::ResNet(m) => m.forward(input),
        }
    }

    /// Penultimate-layer features `[batch, dim]`: what the output layer
    /// reads (used by the `density` knowledge selector).
    pub fn features(&self, input: Tensor<2>) -> Tensor<2> {
        match self {
            Student::Mlp(m) => m.features(input),
            Student::SmallCnn(m) | Student::FedAvgCnn(m) => m.features(input),
            Student::ResNet(m) => m.features(input),
        }
    }

    /// [`Self::forward`] that also returns the activations of every stage,
    /// as `[batch, width]` matrices, for feature (hint) distillation
    /// (fd-node's `compress`): the logits are those of `forward`, computed in
    /// the same pass. Stages, first to last:
    /// - MLP: each hidden layer after its ReLU;
    /// - CNN / FedAvg CNN: each convolution stage after pool and ReLU,
    ///   averaged over its spatial positions (one value per channel, so a
    ///   projection between two students is a small channel-to-channel map,
    ///   not one over every pixel), then the hidden fully connected layer;
    /// - ResNet: the stem and each block, averaged the same way.
    ///
    /// The last stage is what [`Self::features`] returns, except for an
    /// MLP without hidden layers, which has no stage.
    pub fn forward_features(&self, input: Tensor<2>) -> (Tensor<2>, Vec<Tensor<2>>) {
        fn pooled(x: &Tensor<4>) -> Tensor<2> {
            let [batch, channels, _, _] = x.dims();
            x.clone().mean_dim(3).mean_dim(2).reshape([batch, channels])
        }
        let mut stages = Vec::new();
        let logits = match self {
            Student::Mlp(m) => {
                let last = m.layers.len() - 1;
                let mut x = input;
                for layer in &m.layers[..last] {
                    x = m.activation.forward(layer.forward(x));
                    stages.push(x.clone());
                }
                m.layers[last].forward(x)
            }
            Student::SmallCnn(m) | Student::FedAvgCnn(m) => {
                let mut x = unflatten(input, m.input);
                for conv in &m.convs {
                    x = relu(max_pool2x2(conv.forward(x)));
                    stages.push(pooled(&x));
                }
                let x: Tensor<2> = x.flatten(1, 3);
                let x = relu(m.hidden.forward(x));
                stages.push(x.clone());
                m.output.forward(x)
            }
            Student::ResNet(m) => {
                let x = unflatten(input, m.input);
                let mut x = relu(m.stem_norm.forward(m.stem.forward(x)));
                stages.push(pooled(&x));
                for block in &m.blocks {
                    x = block.forward(x);
                    stages.push(pooled(&x));
                }
                let features = stages.last().expect("the stem is a stage").clone();
                m.output.forward(features)
            }
        };
        (logits, stages)
    }

    /// [`Self::forward`] for per-sample gradient norms (DP-SGD,
    /// [`crate::privacy::dpsgd`]): a zero "probe" leaf that requires a
    /// gradient is added to the output of every layer with parameters, and
    /// each layer's input is kept (detached). After a backward pass of the
    /// *sum* of per-sample losses, a probe's gradient row `i` is sample
    /// `i`'s gradient with respect to that layer's output, from which the
    /// norm of its parameter gradient follows without a backward pass per
    /// sample. `None` for the ResNet: batch norm mixes the samples of a
    /// batch, so per-sample gradients (and DP-SGD) do not apply to it.
    pub fn forward_probed(&self, input: Tensor<2>) -> Option<(Tensor<2>, Vec<ProbedLayer>)> {
        let mut layers = Vec::new();
        let logits = match self {
            Student::Mlp(m) => {
                let last = m.layers.len() - 1;
                let mut x = input;
                for layer in &m.layers[..last] {
                    x = m.activation.forward(probe_linear(layer, x, &mut layers));
                }
                probe_linear(&m.layers[last], x, &mut layers)
            }
            Student::SmallCnn(m) | Student::FedAvgCnn(m) => {
                let mut x = unflatten(input, m.input);
                for conv in &m.convs {
                    x = relu(max_pool2x2(probe_conv(conv, x, &mut layers)));
                }
                let x: Tensor<2> = x.flatten(1, 3);
                let x = relu(probe_linear(&m.hidden, x, &mut layers));
                probe_linear(&m.output, x, &mut layers)
            }
            Student::ResNet(_) => return None,
        };
        Some((logits, layers))
    }

    /// Trainable parameters. burn's `num_params` also counts batch-norm
    /// running statistics, which the optimizer never updates.
    pub fn params(&self) -> usize {
        let buffers = match self {
            Student::ResNet(m) => m.running_stat_values(),
            Student::Mlp(_) | Student::SmallCnn(_) | Student::FedAvgCnn(_) => 0,
        };
        self.num_params() - buffers
    }

    /// Bytes the whole module state would take as f32 (what FedAvg would send),
    /// running statistics included.
    pub fn weight_bytes(&self) -> usize {
        self.num_params() * 4
    }
}

/// One layer of [`Student::forward_probed`]: its input (detached) and the
/// zero probe added to its output.
pub enum ProbedLayer {
    Linear {
        input: Tensor<2>,
        probe: Tensor<2>,
        bias: bool,
    },
    Conv {
        input: Tensor<4>,
        probe: Tensor<4>,
        kernel: usize,
        stride: usize,
        padding: usize,
        bias: bool,
    },
}

fn probe_linear(layer: &Linear, x: Tensor<2>, layers: &mut Vec<ProbedLayer>) -> Tensor<2> {
    let [batch, _] = x.dims();
    let [_, out] = layer.weight.shape().dims();
    let probe = Tensor::zeros([batch, out], &x.device()).require_grad();
    layers.push(ProbedLayer::Linear {
        input: x.clone().detach(),
        probe: probe.clone(),
        bias: layer.bias.is_some(),
    });
    layer.forward(x) + probe
}

fn probe_conv(conv: &FastConv2d, x: Tensor<4>, layers: &mut Vec<ProbedLayer>) -> Tensor<4> {
    let [_, _, kernel, _] = conv.weight.shape().dims();
    let (stride, padding) = conv.stride_padding();
    let input = x.clone().detach();
    let y = conv.forward(x);
    let probe = Tensor::zeros(y.dims(), &y.device()).require_grad();
    layers.push(ProbedLayer::Conv {
        input,
        probe: probe.clone(),
        kernel,
        stride,
        padding,
        bias: conv.bias.is_some(),
    });
    y + probe
}

/// `rows` of `data` as one `[rows, features]` batch on `device`.
pub fn batch_of(data: &fd_data::Dataset, rows: &[usize], device: &Device) -> Tensor<2> {
    Tensor::from_data(
        TensorData::new(data.features_f32(rows), [rows.len(), data.features]),
        device,
    )
}

/// For every sample of `data`, the class `student` (inference mode) ranks
/// first; forwarded 1,024 rows at a time so memory stays bounded.
pub fn predicted_classes(student: &Student, data: &fd_data::Dataset, device: &Device) -> Vec<usize> {
    let all: Vec<usize> = (0..data.len()).collect();
    let mut out = Vec::with_capacity(data.len());
    for chunk in all.chunks(1024) {
        let logits: Vec<f32> = student
            .forward(batch_of(data, chunk, device))
            .into_data()
            .iter::<f32>()
            .collect();
        let classes = logits.len() / chunk.len();
        out.extend(logits.chunks(classes).map(argmax));
    }
    out
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

#[cfg(test)]
mod tests {
    use std::time::Instant;

    use burn::nn::loss::CrossEntropyLossConfig;
    use burn::optim::{AdamConfig, GradientsParams};
    use rand::{Rng, SeedableRng};
    use rand_chacha::ChaCha8Rng;

    use super::*;

    const CLASSES: usize = 10;
    const MNIST: InputShape = InputShape {
        channels: 1,
        height: 28,
        width: 28,
    };
    const CIFAR: InputShape = InputShape {
        channels: 3,
        height: 32,
        width: 32,
    };

    /// Seeded samples in [0, 1) and labels cycling through the classes.
    fn batch(input: InputShape, n: usize, device: &Device) -> (Tensor<2>, Tensor<1, Int>) {
        let mut rng = ChaCha8Rng::seed_from_u64(99);
        let f = input.features();
        let values: Vec<f32> = (0..n * f).map(|_| rng.random::<f32>()).collect();
        let labels: Vec<i64> = (0..n as i64).map(|i| i % CLASSES as i64).collect();
        (
            Tensor::from_data(TensorData::new(values, [n, f]), device),
            Tensor::from_data(TensorData::new(labels, [n]), device),
        )
    }

    fn values(t: Tensor<2>) -> Vec<f32> {
        t.into_data().iter::<f32>().collect()
    }

    /// Inference logits, as the learner's `predict` computes them.
    fn predict(model: &Student, x: Tensor<2>) -> Vec<f32> {
        values(model.valid().forward(x))
    }

    // Closed-form parameter counts, derived from the architectures by hand.

    fn linear(i: usize, o: usize) -> usize {
        i * o + o
    }

    fn mlp_params(input: InputShape, hidden: &[usize]) -> usize {
        let mut widths = vec![input.features()];
        widths.extend_from_slice(hidden);
        widths.push(CLASSES);
        widths.windows(2).map(|w| linear(w[0], w[1])).sum()
    }

    fn convnet_params(input: InputShape, channels: &[usize], k: usize, fc: usize) -> usize {
        let mut total = 0;
        let mut c_in = input.channels;
        for &c in channels {
            total += c_in * c * k * k + c;
            c_in = c;
        }
        let n = channels.len();
        let flat = c_in * (input.height >> n) * (input.width >> n);
        total + linear(flat, fc) + linear(fc, CLASSES)
    }

    /// (trainable, running statistics) of the ResNet.
    fn resnet_params(input: InputShape, blocks: &[usize]) -> (usize, usize) {
        let bn = |c: usize| 2 * c; // gamma and beta; also mean and var
        let mut trainable = input.channels * 16 * 9 + bn(16);
        let mut stats = bn(16);
        let mut c_in = 16;
        for (s, &b) in blocks.iter().enumerate() {
            let c = 16 << s;
            for i in 0..b {
                trainable += 9 * c_in * c + bn(c) + 9 * c * c + bn(c);
                stats += 2 * bn(c);
                if s > 0 && i == 0 {
                    trainable += c_in * c + bn(c);
                    stats += bn(c);
                }
                c_in = c;
            }
        }
        (trainable + linear(c_in, CLASSES), stats)
    }

    #[test]
    fn every_model_maps_a_batch_to_logits_on_flex() {
        let device = Device::flex();
        for config in ModelConfig::zoo() {
            for input in [MNIST, CIFAR] {
                let model = config.init(input, CLASSES, 1, &device);
                let (x, _) = batch(input, 3, &device);
                let start = Instant::now();
                let logits = model.valid().forward(x);
                let took = start.elapsed();
                assert_eq!(
                    logits.dims(),
                    [3, CLASSES],
                    "{} on {input:?}",
                    config.name()
                );
                let v = values(logits);
                assert!(v.iter().all(|x| x.is_finite()), "{}", config.name());
                eprintln!(
                    "forward {} {}x{}x{} batch 3: {took:?}",
                    config.name(),
                    input.channels,
                    input.height,
                    input.width
                );
            }
        }
    }

    #[test]
    fn parameter_counts_match_closed_forms() {
        // The FedAvg paper's CNN on 28×28 greyscale with 10 classes.
        assert_eq!(
            ModelConfig::FedAvgCnn {}.describe(MNIST, CLASSES).params,
            1_663_370
        );
        for input in [MNIST, CIFAR] {
            let cases = [
                (ModelConfig::default(), mlp_params(input, &[200, 200]), 0),
                (
                    ModelConfig::Mlp { hidden: vec![] },
                    mlp_params(input, &[]),
                    0,
                ),
                (
                    ModelConfig::SmallCnn {
                        channels: vec![16, 32],
                        fc: 128,
                    },
                    convnet_params(input, &[16, 32], 3, 128),
                    0,
                ),
                (
                    ModelConfig::SmallCnn {
                        channels: vec![8, 8, 4],
                        fc: 20,
                    },
                    convnet_params(input, &[8, 8, 4], 3, 20),
                    0,
                ),
                (
                    ModelConfig::FedAvgCnn {},
                    convnet_params(input, &[32, 64], 5, 512),
                    0,
                ),
                {
                    let (t, s) = resnet_params(input, &[1, 1, 1]);
                    (
                        ModelConfig::ResNet {
                            blocks: vec![1, 1, 1],
                        },
                        t,
                        s,
                    )
                },
                {
                    let (t, s) = resnet_params(input, &[2, 1]);
                    (ModelConfig::ResNet { blocks: vec![2, 1] }, t, s)
                },
            ];
            for (config, trainable, stats) in cases {
                let summary = config.describe(input, CLASSES);
                assert_eq!(summary.name, config.name());
                assert_eq!(summary.params, trainable, "{} on {input:?}", config.name());
                assert_eq!(
                    summary.weight_bytes,
                    4 * (trainable + stats),
                    "{}",
                    config.name()
                );
                // describe reads a lazy module; a fully drawn one must agree.
                let student = config.init(input, CLASSES, 0, &Device::flex());
                assert_eq!(student.params(), trainable, "{}", config.name());
                assert_eq!(student.num_params(), trainable + stats, "{}", config.name());
            }
        }
        // Pinned so a change to the closed forms above cannot go unnoticed.
        assert_eq!(
            ModelConfig::default().describe(MNIST, CLASSES).params,
            199_210
        );
        assert_eq!(ModelConfig::zoo()[1].describe(MNIST, CLASSES).params, 206_922);
        assert_eq!(ModelConfig::zoo()[1].describe(CIFAR, CLASSES).params, 268_650);
        assert_eq!(ModelConfig::zoo()[3].describe(MNIST, CLASSES).params, 77_754);
        assert_eq!(ModelConfig::zoo()[3].describe(MNIST, CLASSES).weight_bytes, 4 * 78_426);
    }

    #[test]
    fn same_seed_same_weights_other_seed_other_weights() {
        let device = Device::flex();
        for config in ModelConfig::zoo() {
            let (x, _) = batch(MNIST, 2, &device);
            let a = predict(&config.init(MNIST, CLASSES, 5, &device), x.clone());
            let b = predict(&config.init(MNIST, CLASSES, 5, &device), x.clone());
            let c = predict(&config.init(MNIST, CLASSES, 6, &device), x);
            let bits = |v: &[f32]| v.iter().map(|f| f.to_bits()).collect::<Vec<_>>();
            assert_eq!(bits(&a), bits(&b), "{}", config.name());
            assert_ne!(bits(&a), bits(&c), "{}", config.name());
        }
    }

    #[test]
    fn initial_weights_do_not_depend_on_later_rng_use() {
        // burn draws weights lazily; init must draw them all before it
        // releases the seeded RNG, or a draw in between would change them.
        let device = Device::flex();
        let config = ModelConfig::SmallCnn {
            channels: vec![4],
            fc: 8,
        };
        let (x, _) = batch(MNIST, 2, &device);
        let reference = predict(&config.init(MNIST, CLASSES, 11, &device), x.clone());
        let model = config.init(MNIST, CLASSES, 11, &device);
        {
            // Same lock as init, so concurrently running tests' inits are not disturbed.
            let _guard = INIT_LOCK.lock().unwrap_or_else(|e| e.into_inner());
            let _ =
                Tensor::<1>::random([64], burn::tensor::Distribution::Default, &device).into_data();
        }
        assert_eq!(predict(&model, x), reference);
    }

    #[test]
    fn a_few_adam_steps_reduce_the_loss_on_flex() {
        let device = Device::flex().autodiff();
        let loss_fn = CrossEntropyLossConfig::new().init(&device);
        for config in ModelConfig::zoo() {
            let (x, y) = batch(MNIST, 8, &device);
            let mut model = config.init(MNIST, CLASSES, 2, &device);
            let mut optimizer = AdamConfig::new().init();
            let mut losses = Vec::new();
            let start = Instant::now();
            for step in 0..=5 {
                let loss = loss_fn.forward(model.forward(x.clone()), y.clone());
                losses.push(loss.clone().into_data().iter::<f32>().next().unwrap());
                if step < 5 {
                    let grads = GradientsParams::from_grads(loss.backward(), &model);
                    model = optimizer.step(1e-3, model, grads);
                }
            }
            eprintln!(
                "train {} batch 8, 5 Adam steps: {:?}, losses {losses:?}",
                config.name(),
                start.elapsed()
            );
            assert!(losses.iter().all(|l| l.is_finite()), "{}", config.name());
            // Fixed data, seed and step size: every step must go downhill, and
            // the five together by a clear margin.
            assert!(
                losses.windows(2).all(|w| w[1] < w[0]) && losses[5] < 0.95 * losses[0],
                "{}: losses {losses:?}",
                config.name()
            );
        }
    }

    #[test]
    fn resnet_inference_uses_running_statistics() {
        // In training, batch norm normalises with the batch's statistics, so a
        // sample's logits depend on its batch mates; after valid() they must not.
        let config = ModelConfig::ResNet {
            blocks: vec![1, 1, 1],
        };
        let device = Device::flex().autodiff();
        let model = config.init(MNIST, CLASSES, 4, &device);
        let (x, _) = batch(MNIST, 8, &device);
        // burn's `slice` takes one range per leading dimension.
        #[allow(clippy::single_range_in_vec_init)]
        let first = || x.clone().slice([0..1]);
        #[allow(clippy::single_range_in_vec_init)]
        let rows = |t: Tensor<2>| values(t.slice([0..1]));

        let train_full = rows(model.forward(x.clone()));
        let train_alone = rows(model.forward(first()));
        assert!(
            train_full
                .iter()
                .zip(&train_alone)
                .any(|(a, b)| (a - b).abs() > 1e-3),
            "training mode should use batch statistics"
        );

        let valid = model.valid();
        let full = rows(valid.forward(x.clone().without_autodiff()));
        let alone = rows(valid.forward(first().without_autodiff()));
        for (a, b) in full.iter().zip(&alone) {
            assert!(
                (a - b).abs() < 1e-5,
                "inference depends on the batch: {a} vs {b}"
            );
        }
    }

    #[test]
    #[cfg(feature = "ndarray")]
    fn ndarray_gives_flex_logits_for_the_same_weights() {
        #[allow(deprecated)]
        let ndarray = Device::ndarray();
        let flex = Device::flex();
        for config in ModelConfig::zoo() {
            let on_flex = config.init(MNIST, CLASSES, 8, &flex);
            // A different seed, so only loading the record can make them agree.
            let on_ndarray = config
                .init(MNIST, CLASSES, 9, &ndarray)
                .load_record(on_flex.valid().into_record());
            let (xf, _) = batch(MNIST, 2, &flex);
            let (xn, _) = batch(MNIST, 2, &ndarray);
            let a = predict(&on_flex, xf);
            let b = predict(&on_ndarray, xn);
            assert_eq!(a.len(), b.len());
            for (a, b) in a.iter().zip(&b) {
                assert!((a - b).abs() < 1e-4, "{}: {a} vs {b}", config.name());
            }
        }
    }

    #[test]
    fn validation_names_the_bad_field() {
        let tabular = InputShape::new([1, 1, 784]);
        let cnn = ModelConfig::SmallCnn {
            channels: vec![16, 32],
            fc: 128,
        };
        let err = cnn.validate(tabular).unwrap_err();
        assert!(err.contains("`channels`") && err.contains("1×784"), "{err}");
        assert!(cnn.validate_fields().is_ok());
        assert!(cnn.validate(MNIST).is_ok());
        // Two pools need 4×4; 3 pixels high pools to 0.
        assert!(cnn.validate(InputShape::new([1, 4, 4])).is_ok());
        assert!(cnn.validate(InputShape::new([1, 3, 8])).is_err());
        let err = ModelConfig::FedAvgCnn {}.validate(tabular).unwrap_err();
        assert!(err.contains("fedavg-cnn"), "{err}");
        // Stride-2 convolutions never reach 0, so a ResNet and an MLP fit tabular data.
        assert!(ModelConfig::zoo()[3].validate(tabular).is_ok());
        assert!(ModelConfig::zoo()[0].validate(tabular).is_ok());
        assert!(ModelConfig::zoo()[0].validate(InputShape::new([1, 1, 0])).is_err());

        let bad = [
            (ModelConfig::Mlp { hidden: vec![5, 0] }, "`hidden`"),
            (
                ModelConfig::SmallCnn {
                    channels: vec![],
                    fc: 1,
                },
                "`channels`",
            ),
            (
                ModelConfig::SmallCnn {
                    channels: vec![8, 0],
                    fc: 1,
                },
                "`channels`",
            ),
            (
                ModelConfig::SmallCnn {
                    channels: vec![8],
                    fc: 0,
                },
                "`fc`",
            ),
            (ModelConfig::ResNet { blocks: vec![] }, "`blocks`"),
            (ModelConfig::ResNet { blocks: vec![1, 0] }, "`blocks`"),
            (ModelConfig::ResNet { blocks: vec![1; 9] }, "`blocks`"),
        ];
        for (config, field) in bad {
            let err = config.validate_fields().unwrap_err();
            assert!(err.contains(field), "{config:?}: {err}");
            assert_eq!(config.validate(MNIST).unwrap_err(), err);
        }
        for config in ModelConfig::zoo() {
            assert!(config.validate_fields().is_ok(), "{config:?}");
        }
    }

    #[test]
    #[should_panic(expected = "cannot take")]
    fn init_refuses_an_input_the_model_cannot_take() {
        ModelConfig::FedAvgCnn {}.init(InputShape::new([1, 1, 20]), CLASSES, 0, &Device::flex());
    }

    #[test]
    fn toml_forms_parse_with_defaults_and_round_trip() {
        #[derive(Debug, PartialEq, Serialize, Deserialize)]
        struct File {
            model: ModelConfig,
        }
        let parse = |s: &str| toml::from_str::<File>(s).map(|f| f.model);
        assert_eq!(parse("[model]\nkind = \"mlp\"").unwrap(), ModelConfig::zoo()[0]);
        assert_eq!(parse("[model]\nkind = \"cnn\"").unwrap(), ModelConfig::zoo()[1]);
        assert_eq!(parse("[model]\nkind = \"fedavg-cnn\"").unwrap(), ModelConfig::zoo()[2]);
        assert_eq!(parse("[model]\nkind = \"resnet\"").unwrap(), ModelConfig::zoo()[3]);
        assert_eq!(
            parse("[model]\nkind = \"cnn\"\nchannels = [8]\nfc = 64").unwrap(),
            ModelConfig::SmallCnn {
                channels: vec![8],
                fc: 64
            }
        );
        assert_eq!(
            parse("[model]\nkind = \"resnet\"\nblocks = [3, 3, 3]").unwrap(),
            ModelConfig::ResNet {
                blocks: vec![3, 3, 3]
            }
        );
        assert!(parse("[model]\nkind = \"fedavg-cnn\"\nfc = 10").is_err());
        assert!(parse("[model]\nkind = \"cnn\"\nhidden = [10]").is_err());
        assert!(parse("[model]\nkind = \"resnet18\"").is_err());
        for model in ModelConfig::zoo() {
            let text = toml::to_string(&File {
                model: model.clone(),
            })
            .unwrap();
            assert_eq!(parse(&text).unwrap(), model, "{text}");
        }
    }

    #[test]
    fn forward_features_gives_forward_logits_and_every_stage() {
        let device = Device::flex();
        let mut configs = ModelConfig::zoo();
        configs.extend(ModelConfig::compact_zoo());
        configs.push(ModelConfig::Mlp { hidden: vec![] });
        for config in configs {
            let model = config.init(MNIST, CLASSES, 3, &device).valid();
            let (x, _) = batch(MNIST, 3, &device);
            let (logits, stages) = model.forward_features(x.clone());
            assert_eq!(values(logits), values(model.forward(x.clone())), "{}", config.name());
            let widths: Vec<usize> = stages.iter().map(|s| s.dims()[1]).collect();
            assert!(stages.iter().all(|s| s.dims()[0] == 3), "{}", config.name());
            let expected: Vec<usize> = match &config {
                ModelConfig::Mlp { hidden } => hidden.clone(),
                ModelConfig::SmallCnn { channels, fc } => {
                    channels.iter().copied().chain([*fc]).collect()
                }
                ModelConfig::FedAvgCnn {} => vec![32, 64, 512],
                ModelConfig::ResNet { blocks } => std::iter::once(16)
                    .chain(blocks.iter().enumerate().flat_map(|(s, &b)| vec![16 << s; b]))
                    .collect(),
            };
            assert_eq!(widths, expected, "{}", config.name());
            if let Some(last) = stages.last() {
                assert_eq!(
                    values(last.clone()),
                    values(model.features(x)),
                    "{}: the last stage is `features`",
                    config.name()
                );
            }
        }
    }

    #[test]
    fn names_parse_back_into_their_configs() {
        let mut configs = ModelConfig::zoo();
        configs.extend(ModelConfig::compact_zoo());
        configs.push(ModelConfig::Mlp { hidden: vec![] });
        configs.push(ModelConfig::SmallCnn {
            channels: vec![4],
            fc: 128,
        });
        for config in configs {
            assert_eq!(config.name().parse::<ModelConfig>(), Ok(config.clone()));
        }
        assert_eq!(
            "mlp-32".parse::<ModelConfig>(),
            Ok(ModelConfig::Mlp { hidden: vec![32] })
        );
        for bad in ["mlp-x", "mlp-0", "cnn-8-fcx", "transformer", "mlpx-3", "resnet-0"] {
            assert!(bad.parse::<ModelConfig>().is_err(), "{bad}");
        }
    }

    #[test]
    fn names_describe_the_architecture() {
        let names: Vec<String> = ModelConfig::zoo().iter().map(ModelConfig::name).collect();
        assert_eq!(
            names,
            ["mlp-200-200", "cnn-16-32", "fedavg-cnn", "resnet-1-1-1"]
        );
        let custom = ModelConfig::SmallCnn {
            channels: vec![8, 16, 32],
            fc: 64,
        };
        assert_eq!(custom.name(), "cnn-8-16-32-fc64");
        assert_eq!(
            ModelConfig::ResNet {
                blocks: vec![3, 3, 3]
            }
            .name(),
            "resnet-3-3-3"
        );
    }
}

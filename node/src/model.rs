//! Student models (burn 0.22).
//!
//! Tensors in burn 0.22 carry their backend in their `Device`, so one model
//! definition runs on flex, ndarray or wgpu; the node picks the device from
//! its config ([`crate::device::DeviceKind`]). Each node may choose its own
//! architecture: only logits on the public set are ever compared across
//! nodes, never weights.

use std::sync::Mutex;

use burn::module::Module;
use burn::nn::{Linear, LinearConfig, Relu};
use burn::prelude::*;
use serde::{Deserialize, Serialize};

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

/// Which student a node trains. Deserialized from the `[model]` table, e.g.
/// `kind = "mlp"`, `hidden = [200, 200]`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "kebab-case", deny_unknown_fields)]
pub enum ModelConfig {
    /// Fully connected ReLU network; `hidden` lists the hidden layer widths.
    Mlp {
        #[serde(default = "default_hidden")]
        hidden: Vec<usize>,
    },
}

fn default_hidden() -> Vec<usize> {
    vec![200, 200]
}

impl Default for ModelConfig {
    fn default() -> Self {
        ModelConfig::Mlp {
            hidden: default_hidden(),
        }
    }
}

impl ModelConfig {
    /// A short description, e.g. `mlp-200-200`.
    pub fn name(&self) -> String {
        match self {
            ModelConfig::Mlp { hidden } => {
                let mut name = "mlp".to_string();
                for h in hidden {
                    name.push_str(&format!("-{h}"));
                }
                name
            }
        }
    }

    /// Builds the student with weights drawn from `seed`.
    ///
    /// burn draws initial weights from a per-backend (possibly global) RNG;
    /// holding a lock while seeding and initialising keeps initial weights a
    /// function of the seed alone, even when many nodes share one process.
    pub fn init(&self, input: InputShape, classes: usize, seed: u64, device: &Device) -> Student {
        static INIT: Mutex<()> = Mutex::new(());
        let _guard = INIT.lock().unwrap_or_else(|e| e.into_inner());
        device.seed(seed);
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
        }
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
        let mut x = input;
        for (i, layer) in self.layers.iter().enumerate() {
            x = layer.forward(x);
            if i < last {
                x = self.activation.forward(x);
            }
        }
        x
    }
}

/// Any student of the zoo.
#[derive(Module, Debug)]
pub enum Student {
    Mlp(Mlp),
}

impl Student {
    /// Logits for a batch of flattened images (batch × features).
    pub fn forward(&self, input: Tensor<2>) -> Tensor<2> {
        match self {
            Student::Mlp(m) => m.forward(input),
        }
    }

    /// Bytes the weights would take as f32 (what FedAvg would send).
    pub fn weight_bytes(&self) -> usize {
        self.num_params() * 4
    }
}

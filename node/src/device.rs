//! Choosing where a node computes.
//!
//! burn 0.22 picks the backend at run time through `Device`; the node config
//! names it. `flex` is the default CPU device (its conv2d is about 10× faster
//! than `ndarray`'s here, matmul on par).

use burn::prelude::Device;
use serde::{Deserialize, Serialize};

/// The compute device named in a node's config (`device = "flex"`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum DeviceKind {
    /// burn's pure-Rust CPU backend.
    #[default]
    Flex,
}

impl DeviceKind {
    /// The inference device (no autodiff).
    pub fn device(self) -> Device {
        match self {
            DeviceKind::Flex => Device::flex(),
        }
    }

    /// The training device (autodiff over [`Self::device`]).
    pub fn training_device(self) -> Device {
        self.device().autodiff()
    }
}

//! Choosing where a node computes.
//!
//! burn 0.22 picks the backend at run time through `Device`; the node config
//! names it, so one model definition runs everywhere and the choice is a
//! deployment detail. `flex` is the default CPU device (its conv2d is about
//! 10× faster than `ndarray`'s here, matmul on par). `ndarray` is burn's
//! older, deprecated CPU backend; it stays selectable as an independent
//! implementation to cross-check flex's numbers against.

use burn::prelude::Device;
use serde::{Deserialize, Serialize};

/// The compute device named in a node's config (`device = "flex"`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum DeviceKind {
    /// burn's pure-Rust CPU backend.
    #[default]
    Flex,
    /// burn's ndarray CPU backend (deprecated upstream in favour of flex).
    Ndarray,
}

impl DeviceKind {
    /// The inference device (no autodiff).
    pub fn device(self) -> Device {
        match self {
            DeviceKind::Flex => Device::flex(),
            // Deprecated upstream but still shipped in 0.22; chosen only when a
            // config asks for it explicitly.
            #[allow(deprecated)]
            DeviceKind::Ndarray => Device::ndarray(),
        }
    }

    /// The training device (autodiff over [`Self::device`]).
    pub fn training_device(self) -> Device {
        self.device().autodiff()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Deserialize)]
    struct Wrapper {
        device: DeviceKind,
    }

    #[test]
    fn config_names_parse_to_their_devices() {
        for (name, kind) in [("flex", DeviceKind::Flex), ("ndarray", DeviceKind::Ndarray)] {
            let w: Wrapper = toml::from_str(&format!("device = \"{name}\"")).unwrap();
            assert_eq!(w.device, kind);
        }
        assert!(toml::from_str::<Wrapper>("device = \"wgpu\"").is_err());
    }

    #[test]
    fn devices_compute_and_training_devices_differentiate() {
        for kind in [DeviceKind::Flex, DeviceKind::Ndarray] {
            let device = kind.device();
            assert!(!device.is_autodiff(), "{kind:?}");
            assert!(kind.training_device().is_autodiff(), "{kind:?}");
            let t = burn::tensor::Tensor::<1>::from_floats([1.0, 2.0, 3.0], &device);
            let sum: f32 = t.sum().into_scalar();
            assert_eq!(sum, 6.0, "{kind:?}");
        }
    }
}

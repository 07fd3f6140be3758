//! Choosing where a node computes.
//!
//! burn 0.22 picks the backend at run time through `Device`; the node config
//! names it, so one model definition runs everywhere and the choice is a
//! deployment detail. `flex` is the default CPU device (its conv2d is about
//! 10× faster than `ndarray`'s here, matmul on par). `ndarray` is burn's
//! older, deprecated CPU backend; it stays selectable as an independent
//! implementation to cross-check flex's numbers against. `wgpu` runs on the
//! best graphics adapter wgpu finds (Vulkan, Metal, DX12); `wgpu-cpu` asks
//! for a software adapter, such as Mesa's lavapipe (Debian package
//! `mesa-vulkan-drivers`), which is how the wgpu path is tested on machines
//! without a GPU.

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
    /// burn's wgpu backend on the default adapter (a GPU when there is one).
    Wgpu,
    /// burn's wgpu backend on a CPU (software) adapter, e.g. lavapipe.
    WgpuCpu,
}

impl DeviceKind {
    /// Every device kind, in config-name order of the docs.
    pub const ALL: [DeviceKind; 4] = [
        DeviceKind::Flex,
        DeviceKind::Ndarray,
        DeviceKind::Wgpu,
        DeviceKind::WgpuCpu,
    ];

    /// The cargo feature of fd-node that builds this device (`None`: always built).
    pub fn feature(self) -> Option<&'static str> {
        match self {
            DeviceKind::Flex => None,
            DeviceKind::Ndarray => Some("ndarray"),
            DeviceKind::Wgpu | DeviceKind::WgpuCpu => Some("wgpu"),
        }
    }

    /// Whether this binary was built with the device.
    pub fn is_built(self) -> bool {
        match self.feature() {
            None => true,
            Some("ndarray") => cfg!(feature = "ndarray"),
            Some(_) => cfg!(feature = "wgpu"),
        }
    }

    /// Why this binary cannot run on the device, or `None` when it can.
    pub fn not_built_reason(self) -> Option<String> {
        self.missing_reason(self.is_built())
    }

    fn missing_reason(self, built: bool) -> Option<String> {
        let feature = self.feature()?;
        (!built).then(|| {
            format!(
                "device {} was not built into this binary: rebuild with the cargo feature \
                 `{feature}` (`cargo build --workspace` and `cargo build -p fd-node` build it; \
                 for fd-sim alone, `cargo run -p fd-sim --features {feature} -- ...`), or use \
                 device = \"flex\"",
                self.name()
            )
        })
    }

    /// The inference device (no autodiff).
    ///
    /// # Panics
    /// On a device that was not built in ([`Self::probe`] says so first at
    /// start-up, with the feature to turn on).
    pub fn device(self) -> Device {
        if let Some(reason) = self.not_built_reason() {
            panic!("{reason}");
        }
        match self {
            DeviceKind::Flex => Device::flex(),
            // Deprecated upstream but still shipped in 0.22; chosen only when a
            // config asks for it explicitly.
            #[cfg(feature = "ndarray")]
            #[allow(deprecated)]
            DeviceKind::Ndarray => Device::ndarray(),
            #[cfg(feature = "wgpu")]
            DeviceKind::Wgpu => Device::wgpu(burn::tensor::DeviceKind::DefaultDevice),
            #[cfg(feature = "wgpu")]
            DeviceKind::WgpuCpu => Device::wgpu(burn::tensor::DeviceKind::Cpu),
            #[allow(unreachable_patterns)]
            _ => unreachable!("not_built_reason covers every device without its feature"),
        }
    }

    /// The config name (`device = "..."`).
    pub fn name(self) -> &'static str {
        match self {
            DeviceKind::Flex => "flex",
            DeviceKind::Ndarray => "ndarray",
            DeviceKind::Wgpu => "wgpu",
            DeviceKind::WgpuCpu => "wgpu-cpu",
        }
    }

    /// Runs one small computation on the device, so a missing adapter is a
    /// clear error at start-up instead of a panic in the first round.
    pub fn probe(self) -> Result<(), String> {
        if let Some(reason) = self.not_built_reason() {
            return Err(reason);
        }
        let attempt = std::panic::catch_unwind(|| {
            let t = burn::tensor::Tensor::<1>::from_floats([1.0, 2.0, 3.0], &self.device());
            t.sum().into_scalar::<f32>()
        });
        match attempt {
            Ok(6.0) => Ok(()),
            Ok(sum) => Err(format!("device {} computed 1 + 2 + 3 = {sum}", self.name())),
            Err(panic) => {
                let reason = panic
                    .downcast_ref::<String>()
                    .cloned()
                    .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
                    .unwrap_or_else(|| "unknown error".into());
                Err(format!(
                    "device {} is not usable here ({reason}); without a GPU install a software \
                     Vulkan driver (Debian: mesa-vulkan-drivers) or use device = \"flex\"",
                    self.name()
                ))
            }
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
        for kind in [
            DeviceKind::Flex,
            DeviceKind::Ndarray,
            DeviceKind::Wgpu,
            DeviceKind::WgpuCpu,
        ] {
            let w: Wrapper = toml::from_str(&format!("device = \"{}\"", kind.name())).unwrap();
            assert_eq!(w.device, kind);
        }
        assert!(toml::from_str::<Wrapper>("device = \"cuda\"").is_err());
    }

    #[test]
    fn a_device_left_out_of_the_build_is_refused_with_its_feature() {
        assert_eq!(DeviceKind::Flex.feature(), None);
        assert!(DeviceKind::Flex.is_built());
        for kind in [DeviceKind::Ndarray, DeviceKind::Wgpu, DeviceKind::WgpuCpu] {
            let feature = kind.feature().unwrap();
            assert!(kind.missing_reason(true).is_none(), "{kind:?}");
            let reason = kind.missing_reason(false).unwrap();
            assert!(
                reason.contains(&format!("device {} ", kind.name()))
                    && reason.contains(&format!("`{feature}`"))
                    && reason.contains("--features"),
                "{reason}"
            );
        }
        // This build's own answer follows its features.
        assert_eq!(DeviceKind::Wgpu.is_built(), cfg!(feature = "wgpu"));
        assert_eq!(DeviceKind::Ndarray.is_built(), cfg!(feature = "ndarray"));
    }

    #[test]
    #[cfg(all(feature = "ndarray", feature = "wgpu"))]
    fn devices_compute_and_training_devices_differentiate() {
        for kind in [DeviceKind::Flex, DeviceKind::Ndarray, DeviceKind::WgpuCpu] {
            kind.probe().unwrap();
            let device = kind.device();
            assert!(!device.is_autodiff(), "{kind:?}");
            assert!(kind.training_device().is_autodiff(), "{kind:?}");
            let t = burn::tensor::Tensor::<1>::from_floats([1.0, 2.0, 3.0], &device);
            let sum: f32 = t.sum().into_scalar();
            assert_eq!(sum, 6.0, "{kind:?}");
        }
    }
}

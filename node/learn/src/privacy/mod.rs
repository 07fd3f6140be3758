//! Differential privacy of a member's local training (DP-SGD).
//!
//! What is protected, and why this boundary: a member's private samples
//! reach the outside world only through its student (every share is logits
//! of the student on the public set, a post-processing of the student).
//! Making every optimizer step that reads private samples a Gaussian
//! mechanism on clipped per-sample gradients therefore covers all the shares
//! a member ever sends, whatever the other members do with them. The steps
//! that read only the public set and the peers' teacher (the KL term of
//! distillation) are not mechanisms on private data and cost no budget.
//! Anything else computed from private data and sent out is *outside* the
//! guarantee, which is why fd-node's config refuses the knowledge selectors
//! that read private data (`density`, `class-coverage`) when DP is on.
//!
//! - [`accountant`]: RDP of the Poisson-subsampled Gaussian, RDP → (ε, δ).
//! - [`dpsgd`]: per-sample gradient norms from layer probes, clip factors,
//!   and the seeded Gaussian noise added to the summed clipped gradients.

pub mod accountant;
pub mod dpsgd;

use serde::{Deserialize, Serialize};

/// The `[dp]` table of a node (and of an fd-sim experiment).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DpConfig {
    /// Train on private data with DP-SGD.
    pub enabled: bool,
    /// C: every per-sample gradient is scaled to L2 norm at most C.
    pub clip_norm: f64,
    /// σ: the Gaussian noise added to the sum of clipped gradients has
    /// standard deviation σ·C.
    pub noise_multiplier: f64,
    /// δ of the reported (ε, δ).
    pub delta: f64,
    /// Stop training on private data before a step would take ε past this
    /// (none: no limit).
    pub max_epsilon: Option<f64>,
}

impl Default for DpConfig {
    fn default() -> Self {
        DpConfig {
            enabled: false,
            clip_norm: 1.0,
            noise_multiplier: 1.0,
            delta: 1e-5,
            max_epsilon: None,
        }
    }
}

impl DpConfig {
    /// Checks every field, naming the first bad one (`dp.<field>`).
    pub fn validate(&self) -> Result<(), (&'static str, String)> {
        if !(self.clip_norm.is_finite() && self.clip_norm > 0.0) {
            return Err((
                "dp.clip_norm",
                format!("must be positive, got {}", self.clip_norm),
            ));
        }
        if !(self.noise_multiplier.is_finite() && self.noise_multiplier > 0.0) {
            return Err((
                "dp.noise_multiplier",
                format!(
                    "must be positive (0 gives no privacy, ε = ∞), got {}",
                    self.noise_multiplier
                ),
            ));
        }
        if !(self.delta > 0.0 && self.delta < 1.0) {
            return Err(("dp.delta", format!("must be in (0, 1), got {}", self.delta)));
        }
        if let Some(m) = self.max_epsilon
            && !(m.is_finite() && m > 0.0)
        {
            return Err((
                "dp.max_epsilon",
                format!("must be positive when given, got {m}"),
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bad_values_name_their_field() {
        let ok = DpConfig {
            enabled: true,
            ..DpConfig::default()
        };
        assert!(ok.validate().is_ok());
        for (bad, field) in [
            (
                DpConfig {
                    clip_norm: 0.0,
                    ..ok.clone()
                },
                "dp.clip_norm",
            ),
            (
                DpConfig {
                    noise_multiplier: -1.0,
                    ..ok.clone()
                },
                "dp.noise_multiplier",
            ),
            (
                DpConfig {
                    noise_multiplier: f64::NAN,
                    ..ok.clone()
                },
                "dp.noise_multiplier",
            ),
            (
                DpConfig {
                    delta: 1.0,
                    ..ok.clone()
                },
                "dp.delta",
            ),
            (
                DpConfig {
                    max_epsilon: Some(0.0),
                    ..ok.clone()
                },
                "dp.max_epsilon",
            ),
        ] {
            assert_eq!(bad.validate().unwrap_err().0, field);
        }
    }
}

//! DP-SGD's per-sample machinery: gradient norms, clip factors, noise.
//!
//! Per-sample gradient norms without a backward pass per sample ("ghost
//! norms", Goodfellow 2015; Li et al. 2021): for a linear layer
//! z = a·W + b, sample i's gradient is W: a_iᵀg_i, b: g_i, with g_i = ∂ℓ_i/∂z_i,
//! so ‖∇_W ℓ_i‖² + ‖∇_b ℓ_i‖² = ‖g_i‖²(‖a_i‖² + 1). The g_i are read off the
//! gradient of a zero probe added to z ([`crate::model::Student::forward_probed`])
//! after one backward pass of Σ_i ℓ_i. A convolution's weight gradient is a
//! sum over output positions, so the product trick does not apply; there the
//! per-sample gradient G_i·U_iᵀ (G_i: `[c_out, positions]` from the probe,
//! U_i: the unfolded input `[c_in·k², positions]`) is materialised as one
//! batched matrix product, `[batch, c_out, c_in·k²]`, small for the CNNs of
//! the zoo. The clipped sum Σ_i c_i ∇ℓ_i, c_i = min(1, C/‖∇ℓ_i‖), then comes
//! from a second forward and backward pass of Σ_i c_i ℓ_i with the c_i
//! detached (burn cannot run backward twice through one graph), so one DP
//! step costs about two ordinary steps plus the norms.

use burn::module::{ModuleVisitor, Param};
use burn::optim::GradientsParams;
use burn::prelude::*;
use burn::tensor::module::unfold4d;
use burn::tensor::ops::UnfoldOptions;
use burn::tensor::{Gradients, Tensor};
use rand::Rng;
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, StandardNormal};

use crate::model::ProbedLayer;

/// Squared L2 norm of each sample's gradient over all parameters of the
/// probed layers, `[batch]`, from the probes' gradients in `grads` (a
/// backward pass of the sum of per-sample losses).
pub fn per_sample_sq_norms(layers: &[ProbedLayer], grads: &Gradients) -> Tensor<1> {
    let mut total: Option<Tensor<1>> = None;
    for layer in layers {
        let sq = match layer {
            ProbedLayer::Linear { input, probe, bias } => {
                let g = probe.grad(grads).expect("the probe is on the loss's path");
                let [batch, _] = g.dims();
                let g2 = g.square().sum_dim(1).reshape([batch]);
                let mut a2 = input.clone().square().sum_dim(1).reshape([batch]);
                if *bias {
                    a2 = a2 + 1.0;
                }
                g2 * a2
            }
            ProbedLayer::Conv {
                input,
                probe,
                kernel,
                stride,
                padding,
                bias,
            } => {
                let g = probe.grad(grads).expect("the probe is on the loss's path");
                let [batch, c_out, h, w] = g.dims();
                let g = g.reshape([batch, c_out, h * w]);
                let u = unfold4d(
                    input.clone(),
                    [*kernel, *kernel],
                    UnfoldOptions::new([*stride, *stride], [*padding, *padding], [1, 1]),
                );
                // [batch, c_out, positions] × [batch, positions, c_in·k²].
                let per_sample = g.clone().matmul(u.swap_dims(1, 2));
                let mut sq = per_sample.square().sum_dim(2).sum_dim(1).reshape([batch]);
                if *bias {
                    sq = sq + g.sum_dim(2).square().sum_dim(1).reshape([batch]);
                }
                sq
            }
        };
        total = Some(match total {
            Some(t) => t + sq,
            None => sq,
        });
    }
    total.expect("a student has at least one layer")
}

/// c_i = min(1, C / (‖∇ℓ_i‖ + 1e-6)) for per-sample norms (as Opacus).
pub fn clip_factors(norms: &[f32], clip_norm: f64) -> Vec<f32> {
    norms
        .iter()
        .map(|&n| (clip_norm / (n as f64 + 1e-6)).min(1.0) as f32)
        .collect()
}

/// Poisson sampling: each of `indices` independently with probability `q`.
pub fn poisson_sample(indices: &[usize], q: f64, rng: &mut ChaCha8Rng) -> Vec<usize> {
    indices
        .iter()
        .copied()
        .filter(|_| rng.random::<f64>() < q)
        .collect()
}

/// Adds N(0, std²) noise, drawn from `rng`, to the gradient of every float
/// parameter of the visited module (a parameter without a gradient gets
/// noise alone). Parameters are visited in module order, so one seed gives
/// the same noise.
pub struct AddNoise<'a> {
    pub grads: &'a mut GradientsParams,
    pub rng: &'a mut ChaCha8Rng,
    pub std: f64,
    /// Where new gradients are made (the learner's non-autodiff device).
    pub device: Device,
}

impl ModuleVisitor for AddNoise<'_> {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
        let shape = param.shape();
        let n = shape.num_elements();
        let noise: Vec<f32> = (0..n)
            .map(|_| {
                let z: f64 = StandardNormal.sample(&mut *self.rng);
                (z * self.std) as f32
            })
            .collect();
        let grad = match self.grads.remove::<D>(param.id) {
            Some(g) => {
                let noise = Tensor::<D>::from_data(TensorData::new(noise, shape), &g.device());
                g + noise
            }
            None => Tensor::<D>::from_data(TensorData::new(noise, shape), &self.device),
        };
        self.grads.register(param.id, grad);
    }
}

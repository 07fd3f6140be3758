//! The fast layers against burn's own `conv2d` / `max_pool2d` on flex:
//! forward values, input, weight and bias gradients, max-pool gradients, a
//! few SGD steps of the FedAvg CNN, determinism across thread counts, and the
//! fallback route (ndarray) that wgpu also takes.

use burn::module::{Module, Param};
use burn::nn::loss::CrossEntropyLossConfig;
use burn::nn::pool::MaxPool2dConfig;
use burn::nn::{Linear, LinearConfig};
use burn::optim::{GradientsParams, SgdConfig};
use burn::prelude::*;
use burn::tensor::activation::relu;
use burn::tensor::ops::ConvOptions;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use super::*;

fn random(shape: [usize; 4], seed: u64, device: &Device) -> Tensor<4> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let n = shape.iter().product();
    let v: Vec<f32> = (0..n).map(|_| rng.random_range(-1.0f32..1.0)).collect();
    Tensor::from_data(TensorData::new(v, shape), device)
}

fn random1(n: usize, seed: u64, device: &Device) -> Tensor<1> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let v: Vec<f32> = (0..n).map(|_| rng.random_range(-1.0f32..1.0)).collect();
    Tensor::from_data(TensorData::new(v, [n]), device)
}

fn values<const D: usize>(t: Tensor<D>) -> Vec<f32> {
    t.into_data().iter::<f32>().collect()
}

/// Largest |a − b| relative to the reference's largest magnitude.
fn assert_close(what: &str, got: Vec<f32>, want: Vec<f32>, rel: f32) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    let scale = want.iter().fold(0.0f32, |m, v| m.max(v.abs())).max(1e-6);
    let worst = got
        .iter()
        .zip(&want)
        .map(|(a, b)| (a - b).abs())
        .fold(0.0f32, f32::max);
    assert!(
        got.iter().all(|v| v.is_finite()),
        "{what}: non-finite values"
    );
    assert!(
        worst <= rel * scale,
        "{what}: max |diff| {worst} > {rel} × {scale}"
    );
}

/// Relative tolerance against burn's own ops: they sum in another order.
const TOL: f32 = 1e-5;

/// (batch, c_in, h, w, c_out, kernel, stride, padding, bias)
type Case = (usize, usize, usize, usize, usize, usize, usize, usize, bool);
const CASES: [Case; 7] = [
    (3, 1, 28, 28, 8, 5, 1, 2, true),  // FedAvg CNN conv1
    (5, 8, 14, 14, 16, 5, 1, 2, true), // FedAvg CNN conv2 shape, fewer channels
    (4, 3, 9, 7, 5, 3, 1, 1, false),   // ResNet 3×3, odd sides
    (4, 3, 9, 7, 6, 3, 2, 1, false),   // ResNet stride-2 3×3
    (3, 4, 7, 8, 6, 1, 2, 0, false),   // ResNet 1×1 projection
    (2, 2, 6, 5, 3, 3, 1, 0, true),    // no padding
    (9, 2, 5, 5, 3, 4, 3, 2, true),    // even kernel, stride 3, > 1 chunk
];

fn burn_conv(
    x: Tensor<4>,
    w: Tensor<4>,
    b: Option<Tensor<1>>,
    stride: usize,
    pad: usize,
) -> Tensor<4> {
    burn::tensor::module::conv2d(
        x,
        w,
        b,
        ConvOptions::new([stride, stride], [pad, pad], [1, 1], 1),
    )
}

#[test]
fn conv_forward_matches_burn_on_flex() {
    let device = Device::flex();
    assert!(uses_kernels(&device) && uses_kernels(&device.clone().autodiff()));
    for (i, &(n, ci, h, w, co, k, s, p, bias)) in CASES.iter().enumerate() {
        let seed = 10 * i as u64;
        let x = random([n, ci, h, w], seed, &device);
        let wt = random([co, ci, k, k], seed + 1, &device);
        let b = bias.then(|| random1(co, seed + 2, &device));
        let got = conv2d(x.clone(), wt.clone(), b.clone(), s, p);
        let want = burn_conv(x, wt, b, s, p);
        assert_eq!(got.dims(), want.dims(), "case {i}");
        assert_close(&format!("forward case {i}"), values(got), values(want), TOL);
    }
}

#[test]
fn conv_input_weight_and_bias_gradients_match_burn_on_flex() {
    let device = Device::flex().autodiff();
    for (i, &(n, ci, h, w, co, k, s, p, bias)) in CASES.iter().enumerate() {
        let seed = 100 + 10 * i as u64;
        // Gradients of Σ out ⊙ r: the output gradient is r, not all ones.
        let run = |fast: bool| {
            let x = random([n, ci, h, w], seed, &device).require_grad();
            let wt = random([co, ci, k, k], seed + 1, &device).require_grad();
            let b = bias.then(|| random1(co, seed + 2, &device).require_grad());
            let out = if fast {
                conv2d(x.clone(), wt.clone(), b.clone(), s, p)
            } else {
                burn_conv(x.clone(), wt.clone(), b.clone(), s, p)
            };
            let r = random(out.dims(), seed + 3, &device);
            let grads = (out * r).sum().backward();
            (
                values(x.grad(&grads).unwrap()),
                values(wt.grad(&grads).unwrap()),
                b.map(|b| values(b.grad(&grads).unwrap())),
            )
        };
        let (gx, gw, gb) = run(true);
        let (rx, rw, rb) = run(false);
        assert_close(&format!("input gradient case {i}"), gx, rx, TOL);
        assert_close(&format!("weight gradient case {i}"), gw, rw, TOL);
        if let (Some(gb), Some(rb)) = (gb, rb) {
            assert_close(&format!("bias gradient case {i}"), gb, rb, TOL);
        }
    }
}

#[test]
fn only_the_wanted_gradients_are_computed() {
    // Input data does not require a gradient: the layer must still give the
    // weight gradient, and none for the input.
    let device = Device::flex().autodiff();
    let x = random([2, 1, 6, 6], 1, &device);
    let wt = random([3, 1, 3, 3], 2, &device).require_grad();
    let grads = conv2d(x.clone(), wt.clone(), None, 1, 1).sum().backward();
    assert!(x.grad(&grads).is_none());
    let want = burn_conv(x, wt.clone(), None, 1, 1).sum().backward();
    assert_close(
        "weight gradient",
        values(wt.grad(&grads).unwrap()),
        values(wt.grad(&want).unwrap()),
        TOL,
    );
}

#[test]
fn max_pool_forward_and_gradient_match_burn_on_flex() {
    let device = Device::flex().autodiff();
    let pool = MaxPool2dConfig::new([2, 2]).init();
    for (i, shape) in [[2, 3, 8, 8], [3, 2, 7, 9], [1, 4, 28, 28], [2, 1, 1, 5]]
        .into_iter()
        .enumerate()
    {
        let run = |fast: bool| {
            let x = random(shape, 7 + i as u64, &device).require_grad();
            let out = if fast {
                max_pool2x2(x.clone())
            } else {
                pool.forward(x.clone())
            };
            let dims = out.dims();
            let r = random(dims, 70 + i as u64, &device);
            let grads = (out.clone() * r).sum().backward();
            (dims, values(out), values(x.grad(&grads).unwrap()))
        };
        let (gd, go, gx) = run(true);
        let (rd, ro, rx) = run(false);
        assert_eq!(gd, rd, "pool shape {shape:?}");
        // Selection, no arithmetic: exactly equal.
        assert_eq!(go, ro, "pool forward {shape:?}");
        assert_eq!(gx, rx, "pool gradient {shape:?}");
    }
    // Ties go to the first maximum in the window, as in burn.
    let x = Tensor::<4>::from_data(
        TensorData::new(vec![1.0f32, 1.0, 0.0, 1.0], [1, 1, 2, 2]),
        &device,
    )
    .require_grad();
    let grads = max_pool2x2(x.clone()).sum().backward();
    assert_eq!(values(x.grad(&grads).unwrap()), [1.0, 0.0, 0.0, 0.0]);
}

/// Windows holding NaN and infinities pick the same element as burn's flex
/// `max_pool2d` (the comparison chain, not `f32::max`, decides).
#[test]
fn max_pool_with_nan_and_infinities_matches_burn_on_flex() {
    let device = Device::flex().autodiff();
    let pool = MaxPool2dConfig::new([2, 2]).init();
    let (nan, inf) = (f32::NAN, f32::INFINITY);
    // Each 2×2 window of a 2×16 plane, written as its four values.
    let windows: [[f32; 4]; 8] = [
        [nan, 1.0, 2.0, 3.0],
        [1.0, nan, 2.0, 0.0],
        [nan, nan, 1.0, 2.0],
        [1.0, 2.0, 3.0, nan],
        [-inf, -inf, -inf, -inf],
        [inf, nan, inf, 1.0],
        [0.0, -0.0, nan, 5.0],
        [-1.0, inf, nan, nan],
    ];
    let w = 2 * windows.len();
    let mut plane = vec![0.0f32; 2 * w];
    for (i, [a, b, c, d]) in windows.into_iter().enumerate() {
        plane[2 * i] = a;
        plane[2 * i + 1] = b;
        plane[w + 2 * i] = c;
        plane[w + 2 * i + 1] = d;
    }
    let run = |fast: bool| {
        let x = Tensor::<4>::from_data(TensorData::new(plane.clone(), [1, 1, 2, w]), &device)
            .require_grad();
        let out = if fast {
            max_pool2x2(x.clone())
        } else {
            pool.forward(x.clone())
        };
        let r = Tensor::<4>::from_data(
            TensorData::new(
                (1..=windows.len()).map(|i| i as f32).collect::<Vec<_>>(),
                out.dims(),
            ),
            &device,
        );
        let grads = (out.clone() * r).sum().backward();
        let bits = |v: Vec<f32>| v.iter().map(|f| f.to_bits()).collect::<Vec<_>>();
        (bits(values(out)), values(x.grad(&grads).unwrap()))
    };
    let (fast_out, fast_grad) = run(true);
    let (burn_out, burn_grad) = run(false);
    assert_eq!(fast_out, burn_out, "pooled values (bit patterns)");
    assert_eq!(fast_grad, burn_grad, "gradient positions");
}

/// The model zoo's lock around the process-wide RNG (see `ModelConfig::init`).
fn init_lock() -> std::sync::MutexGuard<'static, ()> {
    crate::model::INIT_LOCK
        .lock()
        .unwrap_or_else(|e| e.into_inner())
}

struct Materialize;

impl burn::module::ModuleVisitor for Materialize {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
        let _ = param.val();
    }
}

/// The FedAvg CNN (conv 5×5 32, pool, conv 5×5 64, pool, fc 512, fc 10) on
/// 1×28×28, computed either by this module or by burn's own ops, with the
/// same parameters.
#[derive(Module, Debug)]
struct FedAvgCnn {
    convs: Vec<FastConv2d>,
    hidden: Linear,
    output: Linear,
    #[module(skip)]
    fast: bool,
}

impl FedAvgCnn {
    /// Seeded, and every parameter drawn before the lock is released (so a
    /// clone shares the values instead of drawing its own).
    fn new(device: &Device) -> Self {
        let _guard = init_lock();
        device.seed(3);
        let conv = |i, o| {
            FastConv2dConfig::new([i, o], 5)
                .with_padding(2)
                .init(device)
        };
        let model = FedAvgCnn {
            convs: vec![conv(1, 32), conv(32, 64)],
            hidden: LinearConfig::new(64 * 7 * 7, 512).init(device),
            output: LinearConfig::new(512, 10).init(device),
            fast: true,
        };
        model.visit(&mut Materialize);
        model
    }

    fn forward(&self, x: Tensor<4>) -> Tensor<2> {
        let pool = MaxPool2dConfig::new([2, 2]).init();
        let mut x = x;
        for conv in &self.convs {
            x = if self.fast {
                relu(max_pool2x2(conv.forward(x)))
            } else {
                let w = conv.weight.val();
                let b = conv.bias.as_ref().map(|b| b.val());
                pool.forward(relu(burn_conv(x, w, b, 1, 2)))
            };
        }
        let x: Tensor<2> = x.flatten(1, 3);
        self.output.forward(relu(self.hidden.forward(x)))
    }
}

/// Cross-entropy losses of `steps` SGD steps on a fixed batch.
fn sgd_losses(model: FedAvgCnn, steps: usize, device: &Device) -> (Vec<f32>, FedAvgCnn) {
    let x = random([16, 1, 28, 28], 5, device);
    let y = Tensor::<1, Int>::from_data(
        TensorData::new((0..16i64).map(|i| i % 10).collect::<Vec<_>>(), [16]),
        device,
    );
    let loss_fn = CrossEntropyLossConfig::new().init(device);
    let mut optimizer = SgdConfig::new().init();
    let mut model = model;
    let mut losses = Vec::new();
    for _ in 0..steps {
        let loss = loss_fn.forward(model.forward(x.clone()), y.clone());
        losses.push(values(loss.clone())[0]);
        let grads = GradientsParams::from_grads(loss.backward(), &model);
        model = optimizer.step(0.05, model, grads);
    }
    (losses, model)
}

#[test]
fn fedavg_cnn_sgd_steps_match_burn_on_flex() {
    let device = Device::flex().autodiff();
    let fast = FedAvgCnn::new(&device);
    let reference = FedAvgCnn {
        fast: false,
        ..fast.clone()
    };
    let (got, fast) = sgd_losses(fast, 5, &device);
    let (want, reference) = sgd_losses(reference, 5, &device);
    eprintln!("fast {got:?}\nburn {want:?}");
    assert!(
        got.windows(2).all(|w| w[1] < w[0]),
        "SGD should go downhill: {got:?}"
    );
    for (g, w) in got.iter().zip(&want) {
        assert!(
            (g - w).abs() <= 1e-4 * w.abs().max(1.0),
            "losses {got:?} vs {want:?}"
        );
    }
    // And the weights they arrive at.
    for (a, b) in fast.convs.iter().zip(&reference.convs) {
        assert_close(
            "conv weight after SGD",
            values(a.weight.val()),
            values(b.weight.val()),
            1e-4,
        );
    }
}

#[test]
fn results_do_not_depend_on_the_thread_count() {
    let device = Device::flex().autodiff();
    let run = |threads: usize| {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .build()
            .unwrap();
        pool.install(|| {
            let x = random([37, 3, 12, 12], 1, &device).require_grad();
            let wt = random([8, 3, 3, 3], 2, &device).require_grad();
            let b = random1(8, 3, &device).require_grad();
            let out = relu(max_pool2x2(conv2d(
                x.clone(),
                wt.clone(),
                Some(b.clone()),
                1,
                1,
            )));
            let r = random(out.dims(), 4, &device);
            let grads = (out.clone() * r).sum().backward();
            let bits = |v: Vec<f32>| v.into_iter().map(f32::to_bits).collect::<Vec<_>>();
            (
                bits(values(out)),
                bits(values(x.grad(&grads).unwrap())),
                bits(values(wt.grad(&grads).unwrap())),
                bits(values(b.grad(&grads).unwrap())),
            )
        })
    };
    let one = run(1);
    assert_eq!(one, run(1));
    assert_eq!(one, run(2));
    assert_eq!(one, run(3));
}

#[test]
#[cfg(feature = "ndarray")]
#[allow(deprecated)]
fn other_devices_fall_back_to_burn_ops() {
    // ndarray takes the route wgpu takes: burn's own conv2d and max_pool2d.
    let ndarray = Device::ndarray();
    assert!(!uses_kernels(&ndarray) && !uses_kernels(&ndarray.clone().autodiff()));
    let flex = Device::flex();
    let run = |device: &Device| {
        let x = random([2, 3, 9, 9], 1, device);
        let w = random([4, 3, 3, 3], 2, device);
        let b = random1(4, 3, device);
        values(max_pool2x2(conv2d(x, w, Some(b), 1, 1)))
    };
    assert_close("ndarray vs flex", run(&ndarray), run(&flex), TOL);
    // Autodiff on the fallback route.
    let device = ndarray.autodiff();
    let w = random([4, 3, 3, 3], 2, &device).require_grad();
    let x = random([2, 3, 9, 9], 1, &device);
    let grads = max_pool2x2(conv2d(x, w.clone(), None, 1, 1))
        .sum()
        .backward();
    assert!(w.grad(&grads).is_some());
}

#[test]
fn layer_takes_over_burns_initialisation() {
    // Same seed, same draws as burn's Conv2d: the zoo's initial weights do not
    // change by switching layers.
    let device = Device::flex();
    let _guard = init_lock();
    device.seed(42);
    let ours = FastConv2dConfig::new([3, 6], 3)
        .with_padding(1)
        .init(&device);
    let ours = (values(ours.weight.val()), values(ours.bias.unwrap().val()));
    device.seed(42);
    let theirs = burn::nn::conv::Conv2dConfig::new([3, 6], [3, 3])
        .with_padding(burn::nn::PaddingConfig2d::Explicit(1, 1, 1, 1))
        .init(&device);
    let theirs = (
        values(theirs.weight.val()),
        values(theirs.bias.unwrap().val()),
    );
    assert_eq!(ours, theirs);
    assert!(
        FastConv2dConfig::new([3, 6], 1)
            .with_bias(false)
            .init(&device)
            .bias
            .is_none()
    );
}

#[test]
fn strided_gemm_multiplies_and_refuses_strides_that_overrun() {
    // [1 2; 3 4] · [5 6; 7 8] with the right operand stored column-major.
    let lhs = [1.0, 2.0, 3.0, 4.0];
    let rhs_t = [5.0, 7.0, 6.0, 8.0];
    let mut dst = [0.0f32; 4];
    kernels::gemm(2, 2, 2, &mut dst, (2, 1), false, &lhs, (2, 1), &rhs_t, (1, 2));
    assert_eq!(dst, [19.0, 22.0, 43.0, 50.0]);
    kernels::gemm(2, 2, 2, &mut dst, (2, 1), true, &lhs, (2, 1), &rhs_t, (1, 2));
    assert_eq!(dst, [38.0, 44.0, 86.0, 100.0]);
    // A row stride one too long reaches past the 4-element lhs.
    let overrun = std::panic::catch_unwind(|| {
        let mut dst = [0.0f32; 4];
        kernels::gemm(2, 2, 2, &mut dst, (2, 1), false, &lhs, (3, 1), &rhs_t, (1, 2));
    });
    let message = overrun.unwrap_err();
    let message = message.downcast_ref::<String>().unwrap();
    assert!(message.contains("lhs 2×2 overruns"), "{message}");
}

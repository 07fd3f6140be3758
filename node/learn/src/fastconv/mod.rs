//! Fast convolution and max-pooling for the zoo's convolutional students on
//! the CPU (issue 7).
//!
//! burn's flex backend computes a convolution's input gradient as a
//! transposed convolution and its weight gradient as another convolution with
//! batch and channels swapped; with max-pooling's index bookkeeping these took
//! ~80% of a FedAvg-CNN training step (profile in docs/performance.md). This
//! module replaces them, inside burn, with a backend extension
//! ([`backend::FastConvBackend`], burn's `extension` feature): im2col →
//! one GEMM (the `gemm` crate flex itself uses) per chunk of samples for the
//! forward pass, and for the backward pass one GEMM each for the weight
//! gradient (`col · Gᵀ`, the transpose of `G · colᵀ`) and the input
//! gradient (`Wᵀ · G`, then col2im), with the columns rebuilt per chunk
//! instead of stored; 2×2 max-pooling recomputes
//! each window's maximum in its backward pass instead of keeping indices.
//!
//! Routing: [`conv2d`] and [`max_pool2x2`] (and the [`FastConv2d`] layer)
//! use the kernels for `f32` tensors on a flex device, with or without
//! autodiff. Everything else — ndarray, wgpu, other dtypes — goes to burn's
//! own `conv2d` / `max_pool2d`, so the layers run on every device and ndarray
//! stays an independent implementation to check flex's numbers against.
//!
//! Determinism: chunks are whole samples, sized from the layer shape alone;
//! the only cross-sample sums (weight and bias gradients) add per-chunk
//! partial sums in chunk order. Results do not depend on the thread count.
//! They differ from burn's own ops only by float summation order (tests:
//! relative error ≤ 1e-4, see `tests.rs`).

pub mod backend;
pub mod kernels;
#[cfg(test)]
mod tests;

use burn::backend::{Dispatch, DispatchDevice};
use burn::module::{Module, Param};
use burn::nn::PaddingConfig2d;
use burn::nn::conv::Conv2dConfig;
use burn::nn::pool::MaxPool2dConfig;
use burn::prelude::*;
use burn::tensor::DType;
use burn::tensor::ops::ConvOptions;

use backend::FastConvBackend;

/// Whether tensors on `device` use this module's kernels (flex, with or
/// without autodiff) rather than burn's own operations.
pub fn uses_kernels(device: &Device) -> bool {
    match device.as_dispatch() {
        DispatchDevice::Flex(_) => true,
        DispatchDevice::Autodiff(inner) => matches!(**inner, DispatchDevice::Flex(_)),
        #[allow(unreachable_patterns)]
        _ => false,
    }
}

fn fast(x: &Tensor<4>) -> bool {
    x.dtype() == DType::F32 && uses_kernels(&x.device())
}

/// 2-D convolution of NCHW `x` with weight `[c_out, c_in, k_h, k_w]` and
/// optional bias, the same `stride` and zero `padding` on both axes, one
/// group, no dilation. Equals `burn::tensor::module::conv2d` up to float
/// rounding.
pub fn conv2d(
    x: Tensor<4>,
    weight: Tensor<4>,
    bias: Option<Tensor<1>>,
    stride: usize,
    padding: usize,
) -> Tensor<4> {
    if fast(&x) && weight.dtype() == DType::F32 {
        Tensor::from_dispatch(match bias {
            Some(bias) => <Dispatch as FastConvBackend>::fastconv_conv2d(
                x.into_dispatch(),
                weight.into_dispatch(),
                bias.into_dispatch(),
                stride,
                padding,
            ),
            None => <Dispatch as FastConvBackend>::fastconv_conv2d_no_bias(
                x.into_dispatch(),
                weight.into_dispatch(),
                stride,
                padding,
            ),
        })
    } else {
        burn::tensor::module::conv2d(
            x,
            weight,
            bias,
            ConvOptions::new([stride, stride], [padding, padding], [1, 1], 1),
        )
    }
}

/// 2×2 max-pooling with stride 2 (odd sides round down), as burn's
/// `MaxPool2dConfig::new([2, 2])`: the same values, and the gradient goes to
/// the same element of each window (the first maximum).
pub fn max_pool2x2(x: Tensor<4>) -> Tensor<4> {
    if fast(&x) {
        Tensor::from_dispatch(<Dispatch as FastConvBackend>::fastconv_max_pool2x2(
            x.into_dispatch(),
        ))
    } else {
        MaxPool2dConfig::new([2, 2]).init().forward(x)
    }
}

/// A 2-D convolution layer with square kernel, stride and symmetric zero
/// padding, built and initialised exactly like burn's `Conv2d` from
/// [`FastConv2dConfig`] (same parameter shapes, initializer and draw order),
/// computed by [`conv2d`].
#[derive(Module, Debug)]
pub struct FastConv2d {
    /// `[c_out, c_in, kernel, kernel]`.
    pub weight: Param<Tensor<4>>,
    /// `[c_out]`.
    pub bias: Option<Param<Tensor<1>>>,
    #[module(skip)]
    stride: usize,
    #[module(skip)]
    padding: usize,
}

/// Builds a [`FastConv2d`].
#[derive(Debug, Clone)]
pub struct FastConv2dConfig {
    pub channels: [usize; 2],
    pub kernel: usize,
    pub stride: usize,
    pub padding: usize,
    pub bias: bool,
}

impl FastConv2dConfig {
    /// Stride 1, no padding, with bias (burn's `Conv2dConfig` defaults).
    pub fn new(channels: [usize; 2], kernel: usize) -> Self {
        FastConv2dConfig {
            channels,
            kernel,
            stride: 1,
            padding: 0,
            bias: true,
        }
    }

    pub fn with_stride(mut self, stride: usize) -> Self {
        self.stride = stride;
        self
    }

    pub fn with_padding(mut self, padding: usize) -> Self {
        self.padding = padding;
        self
    }

    pub fn with_bias(mut self, bias: bool) -> Self {
        self.bias = bias;
        self
    }

    /// The layer, with lazy parameters initialised as burn's `Conv2d`'s
    /// (`Conv2dConfig` builds them; this takes them over).
    pub fn init(&self, device: &Device) -> FastConv2d {
        let p = self.padding;
        let conv = Conv2dConfig::new(self.channels, [self.kernel, self.kernel])
            .with_stride([self.stride, self.stride])
            .with_padding(PaddingConfig2d::Explicit(p, p, p, p))
            .with_bias(self.bias)
            .init(device);
        FastConv2d {
            weight: conv.weight,
            bias: conv.bias,
            stride: self.stride,
            padding: self.padding,
        }
    }
}

impl FastConv2d {
    /// Stride and zero padding per side (the kernel size is the weight's).
    pub fn stride_padding(&self) -> (usize, usize) {
        (self.stride, self.padding)
    }

    /// `[batch, c_in, h, w]` → `[batch, c_out, h_out, w_out]`.
    pub fn forward(&self, x: Tensor<4>) -> Tensor<4> {
        conv2d(
            x,
            self.weight.val(),
            self.bias.as_ref().map(Param::val),
            self.stride,
            self.padding,
        )
    }
}

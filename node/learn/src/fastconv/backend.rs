//! How the kernels plug into burn: a backend extension (`#[backend_extension]`,
//! burn's `extension` feature) with two operations, implemented for the flex
//! backend (the kernels on its tensors' storage) and for `Autodiff<Flex>`
//! (the same forward plus a hand-written backward registered on the graph).
//!
//! Only flex is a selector: [`super`] sends tensors of every other device
//! (ndarray, wgpu, ...) to burn's own operations and never calls these.

use burn::backend::autodiff::{
    Autodiff,
    checkpoint::{base::Checkpointer, strategy::CheckpointStrategy},
    grads::Gradients,
    ops::{Backward, Ops, OpsKind},
};
use burn::backend::flex::FlexTensor;
use burn::backend::{Backend, Flex, TensorMetadata, backend_extension, tensor::FloatTensor};
use burn::tensor::{DType, TensorData};

use super::kernels::{self, ConvGeom};

/// Custom operations of the fast CPU layers. Tensors are NCHW `f32`.
#[backend_extension(Flex, Autodiff)]
pub trait FastConvBackend: Backend {
    /// 2-D convolution, one group, no dilation, `stride` and zero `padding`
    /// equal on both axes; weight `[c_out, c_in, kh, kw]`, bias `[c_out]`.
    fn fastconv_conv2d(
        x: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        bias: FloatTensor<Self>,
        stride: usize,
        padding: usize,
    ) -> FloatTensor<Self>;

    /// [`Self::fastconv_conv2d`] without bias. (Two operations rather than an
    /// `Option` argument: burn 0.22.1's `#[backend_extension]` does not unwrap
    /// `Option<FloatTensor>` inputs from their dispatch form.)
    fn fastconv_conv2d_no_bias(
        x: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        stride: usize,
        padding: usize,
    ) -> FloatTensor<Self>;

    /// 2×2 max-pool with stride 2, no padding, floor.
    fn fastconv_max_pool2x2(x: FloatTensor<Self>) -> FloatTensor<Self>;
}

/// A flex tensor's values as one contiguous `f32` slice (copying only when
/// the tensor is a strided view), kept alive by the returned tensor.
fn contiguous(t: FlexTensor) -> FlexTensor {
    assert_eq!(t.dtype(), DType::F32, "fastconv: f32 tensors only");
    if t.as_slice::<f32>().is_some() {
        t
    } else {
        t.to_contiguous()
    }
}

fn values(t: &FlexTensor) -> &[f32] {
    t.as_slice::<f32>()
        .expect("fastconv: contiguous f32 tensor")
}

fn dims4(t: &FlexTensor) -> [usize; 4] {
    let shape = t.shape();
    assert_eq!(shape.num_dims(), 4, "fastconv: expected a 4-d NCHW tensor");
    shape.dims::<4>()
}

fn flex(values: Vec<f32>, shape: &[usize]) -> FlexTensor {
    FlexTensor::from_data(TensorData::new(values, shape.to_vec()))
}

fn conv_forward(
    x: &FlexTensor,
    weight: &FlexTensor,
    bias: Option<&FlexTensor>,
    stride: usize,
    padding: usize,
) -> FlexTensor {
    let g = ConvGeom::new(dims4(x), dims4(weight), stride, padding);
    if let Some(bias) = bias {
        assert_eq!(bias.shape().num_elements(), g.c_out, "conv2d: bias length");
    }
    let out = kernels::conv2d_forward(&g, values(x), values(weight), bias.map(values));
    flex(out, &g.out_shape())
}

fn pool_forward(x: &FlexTensor) -> FlexTensor {
    let [n, c, h, w] = dims4(x);
    let (oh, ow) = kernels::pool_out(h, w);
    let out = kernels::max_pool2x2_forward(values(x), n * c, h, w);
    flex(out, &[n, c, oh, ow])
}

impl FastConvBackend for Flex {
    fn fastconv_conv2d(
        x: FlexTensor,
        weight: FlexTensor,
        bias: FlexTensor,
        stride: usize,
        padding: usize,
    ) -> FlexTensor {
        conv_forward(
            &contiguous(x),
            &contiguous(weight),
            Some(&contiguous(bias)),
            stride,
            padding,
        )
    }

    fn fastconv_conv2d_no_bias(
        x: FlexTensor,
        weight: FlexTensor,
        stride: usize,
        padding: usize,
    ) -> FlexTensor {
        conv_forward(&contiguous(x), &contiguous(weight), None, stride, padding)
    }

    fn fastconv_max_pool2x2(x: FlexTensor) -> FlexTensor {
        pool_forward(&contiguous(x))
    }
}

/// What a convolution's backward step keeps from the forward pass.
#[derive(Debug, Clone)]
struct ConvState {
    x: FlexTensor,
    weight: FlexTensor,
    stride: usize,
    padding: usize,
}

impl ConvState {
    /// The gradients for the inputs flagged in `need` (x, weight, bias).
    fn grads(
        self,
        grad: FlexTensor,
        [need_x, need_w, need_b]: [bool; 3],
    ) -> (Option<FlexTensor>, Option<FlexTensor>, Option<FlexTensor>) {
        let grad = contiguous(grad);
        let (x_shape, w_shape) = (dims4(&self.x), dims4(&self.weight));
        let g = ConvGeom::new(x_shape, w_shape, self.stride, self.padding);
        assert_eq!(
            dims4(&grad),
            g.out_shape(),
            "conv2d backward: gradient shape"
        );
        let out = kernels::conv2d_backward(
            &g,
            values(&self.x),
            values(&self.weight),
            values(&grad),
            need_x,
            need_w,
            need_b,
        );
        (
            out.x.map(|v| flex(v, &x_shape)),
            out.weight.map(|v| flex(v, &w_shape)),
            out.bias.map(|v| flex(v, &[g.c_out])),
        )
    }
}

#[derive(Debug)]
struct ConvWithBias;

impl Backward<Flex, 3> for ConvWithBias {
    type State = ConvState;

    fn backward(self, ops: Ops<ConvState, 3>, grads: &mut Gradients, _: &mut Checkpointer) {
        let [px, pw, pb] = ops.parents;
        let grad = grads.consume::<Flex>(&ops.node);
        let (dx, dw, db) = ops
            .state
            .grads(grad, [px.is_some(), pw.is_some(), pb.is_some()]);
        for (parent, value) in [(px, dx), (pw, dw), (pb, db)] {
            if let (Some(node), Some(value)) = (parent, value) {
                grads.register::<Flex>(node.id, value);
            }
        }
    }
}

#[derive(Debug)]
struct ConvNoBias;

impl Backward<Flex, 2> for ConvNoBias {
    type State = ConvState;

    fn backward(self, ops: Ops<ConvState, 2>, grads: &mut Gradients, _: &mut Checkpointer) {
        let [px, pw] = ops.parents;
        let grad = grads.consume::<Flex>(&ops.node);
        let (dx, dw, _) = ops.state.grads(grad, [px.is_some(), pw.is_some(), false]);
        for (parent, value) in [(px, dx), (pw, dw)] {
            if let (Some(node), Some(value)) = (parent, value) {
                grads.register::<Flex>(node.id, value);
            }
        }
    }
}

#[derive(Debug)]
struct MaxPool2x2;

impl Backward<Flex, 1> for MaxPool2x2 {
    /// The pooled input: the backward step recomputes each window's maximum.
    type State = FlexTensor;

    fn backward(self, ops: Ops<FlexTensor, 1>, grads: &mut Gradients, _: &mut Checkpointer) {
        let [px] = ops.parents;
        let grad = contiguous(grads.consume::<Flex>(&ops.node));
        if let Some(node) = px {
            let x = ops.state;
            let [n, c, h, w] = dims4(&x);
            let dx = kernels::max_pool2x2_backward(values(&x), values(&grad), n * c, h, w);
            grads.register::<Flex>(node.id, flex(dx, &[n, c, h, w]));
        }
    }
}

impl<C: CheckpointStrategy> FastConvBackend for Autodiff<Flex, C> {
    fn fastconv_conv2d(
        x: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        bias: FloatTensor<Self>,
        stride: usize,
        padding: usize,
    ) -> FloatTensor<Self> {
        let state = ConvState {
            x: contiguous(x.primitive().clone()),
            weight: contiguous(weight.primitive().clone()),
            stride,
            padding,
        };
        let b = contiguous(bias.primitive().clone());
        let out = conv_forward(&state.x, &state.weight, Some(&b), stride, padding);
        match ConvWithBias
            .prepare::<C>([x.node(), weight.node(), bias.node()])
            .compute_bound()
            .stateful()
        {
            OpsKind::Tracked(prep) => prep.finish(state, out),
            OpsKind::UnTracked(prep) => prep.finish(out),
        }
    }

    fn fastconv_conv2d_no_bias(
        x: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        stride: usize,
        padding: usize,
    ) -> FloatTensor<Self> {
        let state = ConvState {
            x: contiguous(x.primitive().clone()),
            weight: contiguous(weight.primitive().clone()),
            stride,
            padding,
        };
        let out = conv_forward(&state.x, &state.weight, None, stride, padding);
        match ConvNoBias
            .prepare::<C>([x.node(), weight.node()])
            .compute_bound()
            .stateful()
        {
            OpsKind::Tracked(prep) => prep.finish(state, out),
            OpsKind::UnTracked(prep) => prep.finish(out),
        }
    }

    fn fastconv_max_pool2x2(x: FloatTensor<Self>) -> FloatTensor<Self> {
        let input = contiguous(x.primitive().clone());
        match MaxPool2x2
            .prepare::<C>([x.node()])
            .compute_bound()
            .stateful()
        {
            OpsKind::Tracked(prep) => {
                let out = pool_forward(&input);
                prep.finish(input, out)
            }
            OpsKind::UnTracked(prep) => prep.finish(pool_forward(&input)),
        }
    }
}

//! The CPU kernels behind [`super`]: 2-D convolution (forward, input
//! gradient, weight and bias gradients) as im2col / col2im around one GEMM
//! per chunk of samples, and 2×2 max-pooling, on contiguous NCHW `f32` slices.
//!
//! Work is split into chunks of whole samples whose size depends on the layer
//! shape alone, never on the thread count. Chunks run in parallel on the
//! current rayon pool (the learner's); a chunk's outputs are its own samples'
//! rows, and the one cross-sample reduction (weight and bias gradients) adds
//! per-chunk partial sums in chunk order. So results are bit-identical for
//! any thread count and any scheduling.

use std::cell::RefCell;

use rayon::prelude::*;

/// Target size of one chunk's im2col buffer, in `f32`s (2 MiB: a chunk's
/// columns stay in this machine's 4 MiB L2 while the GEMM packs them).
const COL_BUDGET: usize = 512 * 1024;
/// Most chunks are at most 1/MIN_CHUNKS of the batch, so even a layer whose
/// columns fit the budget many times over is spread over several threads.
const MIN_CHUNKS: usize = 4;

/// Shape of one 2-D convolution: NCHW input, OIHW weight, square stride and
/// symmetric zero padding, no dilation, one group.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConvGeom {
    pub batch: usize,
    pub c_in: usize,
    pub h: usize,
    pub w: usize,
    pub c_out: usize,
    pub kh: usize,
    pub kw: usize,
    pub stride: usize,
    pub pad: usize,
    pub oh: usize,
    pub ow: usize,
}

impl ConvGeom {
    /// # Panics
    /// If the channels disagree, the stride is 0 or the kernel does not fit
    /// the padded input.
    pub fn new(x: [usize; 4], weight: [usize; 4], stride: usize, pad: usize) -> Self {
        let [batch, c_in, h, w] = x;
        let [c_out, wc_in, kh, kw] = weight;
        assert_eq!(
            c_in, wc_in,
            "conv2d: input has {c_in} channels, weight expects {wc_in}"
        );
        assert!(stride > 0, "conv2d: stride must be at least 1");
        assert!(
            h + 2 * pad >= kh && w + 2 * pad >= kw,
            "conv2d: kernel {kh}×{kw} larger than padded input {h}×{w} + {pad}"
        );
        ConvGeom {
            batch,
            c_in,
            h,
            w,
            c_out,
            kh,
            kw,
            stride,
            pad,
            oh: (h + 2 * pad - kh) / stride + 1,
            ow: (w + 2 * pad - kw) / stride + 1,
        }
    }

    /// Rows of the im2col matrix: values under one kernel placement.
    pub fn k(&self) -> usize {
        self.c_in * self.kh * self.kw
    }

    /// Output positions per sample and channel.
    pub fn p(&self) -> usize {
        self.oh * self.ow
    }

    pub fn in_len(&self) -> usize {
        self.c_in * self.h * self.w
    }

    pub fn out_len(&self) -> usize {
        self.c_out * self.p()
    }

    pub fn out_shape(&self) -> [usize; 4] {
        [self.batch, self.c_out, self.oh, self.ow]
    }

    /// Samples per chunk: a function of the shape only.
    pub fn chunk(&self) -> usize {
        let per_sample = (self.k() * self.p()).max(1);
        let by_budget = (COL_BUDGET / per_sample).max(1);
        let spread = self.batch.div_ceil(MIN_CHUNKS).max(1);
        by_budget.min(spread).min(self.batch.max(1))
    }
}

thread_local! {
    /// Per-thread scratch (columns, gathered gradient), reused across calls
    /// so large buffers are not mapped and faulted in on every chunk.
    static SCRATCH: RefCell<(Vec<f32>, Vec<f32>)> = const { RefCell::new((Vec::new(), Vec::new())) };
}

fn with_scratch<R>(a: usize, b: usize, f: impl FnOnce(&mut [f32], &mut [f32]) -> R) -> R {
    SCRATCH.with(|cell| {
        let mut guard = cell.borrow_mut();
        let (va, vb) = &mut *guard;
        if va.len() < a {
            va.resize(a, 0.0);
        }
        if vb.len() < b {
            vb.resize(b, 0.0);
        }
        f(&mut va[..a], &mut vb[..b])
    })
}

/// `dst[m×n] (+)= lhs[m×k] · rhs[k×n]` with explicit (row, column) strides,
/// single-threaded (parallelism is over chunks). Public for
/// `examples/gemm_shapes.rs`, which times the products this module issues.
///
/// The one `unsafe` call of fd-node's kernels lives here, behind checks that
/// make it sound for any arguments: every index the strides reach is asserted
/// to lie inside its slice, and `dst` cannot overlap `lhs` or `rhs` because
/// it is borrowed mutably while they are borrowed shared.
///
/// # Panics
/// When a matrix's last element (`(rows − 1)·rs + (cols − 1)·cs`) lies
/// outside its slice.
#[allow(clippy::too_many_arguments)]
#[allow(unsafe_code)]
pub fn gemm(
    m: usize,
    n: usize,
    k: usize,
    dst: &mut [f32],
    (dst_rs, dst_cs): (usize, usize),
    accumulate: bool,
    lhs: &[f32],
    (lhs_rs, lhs_cs): (usize, usize),
    rhs: &[f32],
    (rhs_rs, rhs_cs): (usize, usize),
) {
    assert!(
        extent(m, n, dst_rs, dst_cs) <= dst.len(),
        "gemm: dst {m}×{n} overruns its buffer"
    );
    assert!(
        extent(m, k, lhs_rs, lhs_cs) <= lhs.len(),
        "gemm: lhs {m}×{k} overruns its buffer"
    );
    assert!(
        extent(k, n, rhs_rs, rhs_cs) <= rhs.len(),
        "gemm: rhs {k}×{n} overruns its buffer"
    );
    if m == 0 || n == 0 {
        return;
    }
    // SAFETY: the asserts above put every index the dimensions and strides
    // reach inside its slice; `dst` is a unique borrow, so it overlaps
    // neither operand; gemm reads only `lhs`/`rhs` and writes only `dst`.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst.as_mut_ptr(),
            dst_cs as isize,
            dst_rs as isize,
            accumulate,
            lhs.as_ptr(),
            lhs_cs as isize,
            lhs_rs as isize,
            rhs.as_ptr(),
            rhs_cs as isize,
            rhs_rs as isize,
            1.0,
            1.0,
            false,
            false,
            false,
            gemm::Parallelism::None,
        )
    }
}

/// Elements a `rows × cols` matrix with these strides spans (0 when empty).
fn extent(rows: usize, cols: usize, rs: usize, cs: usize) -> usize {
    if rows == 0 || cols == 0 {
        0
    } else {
        (rows - 1) * rs + (cols - 1) * cs + 1
    }
}

/// For output column `o` and kernel offset `kx`, the input column is
/// `o·stride + kx − pad`; the range of `o` that lands inside `0..w`.
fn valid_range(out: usize, stride: usize, k: usize, pad: usize, len: usize) -> (usize, usize) {
    // o·s + k ≥ pad  ⇔  o ≥ ceil((pad − k) / s)
    let lo = if pad > k {
        (pad - k).div_ceil(stride)
    } else {
        0
    };
    // o·s + k − pad ≤ len − 1  ⇔  o ≤ (len − 1 + pad − k) / s
    let hi = if len + pad > k {
        ((len - 1 + pad - k) / stride + 1).min(out)
    } else {
        0
    };
    (lo.min(hi), hi)
}

/// Fills `col` (`[k × cs·p]`, row-major) with the patches of `cs` samples.
fn im2col(g: &ConvGeom, x: &[f32], cs: usize, col: &mut [f32]) {
    let (p, n) = (g.p(), cs * g.p());
    let plane = g.h * g.w;
    let mut row_index = 0;
    for c in 0..g.c_in {
        for ky in 0..g.kh {
            for kx in 0..g.kw {
                let row = &mut col[row_index * n..(row_index + 1) * n];
                row_index += 1;
                let (xlo, xhi) = valid_range(g.ow, g.stride, kx, g.pad, g.w);
                for b in 0..cs {
                    let src = &x[(b * g.c_in + c) * plane..][..plane];
                    for oy in 0..g.oh {
                        let dst = &mut row[b * p + oy * g.ow..][..g.ow];
                        let iy = (oy * g.stride + ky) as isize - g.pad as isize;
                        if iy < 0 || iy >= g.h as isize {
                            dst.fill(0.0);
                            continue;
                        }
                        let src_row = &src[iy as usize * g.w..][..g.w];
                        dst[..xlo].fill(0.0);
                        dst[xhi..].fill(0.0);
                        if xhi == xlo {
                            continue;
                        }
                        if g.stride == 1 {
                            let start = xlo + kx - g.pad;
                            dst[xlo..xhi].copy_from_slice(&src_row[start..start + (xhi - xlo)]);
                        } else {
                            for (ox, d) in dst[xlo..xhi].iter_mut().enumerate() {
                                *d = src_row[(ox + xlo) * g.stride + kx - g.pad];
                            }
                        }
                    }
                }
            }
        }
    }
}

/// The adjoint of [`im2col`]: adds `col` (`[k × cs·p]`) into `dx` (`cs`
/// samples, zeroed by the caller), in a fixed order.
fn col2im(g: &ConvGeom, col: &[f32], cs: usize, dx: &mut [f32]) {
    let (p, n) = (g.p(), cs * g.p());
    let plane = g.h * g.w;
    let mut row_index = 0;
    for c in 0..g.c_in {
        for ky in 0..g.kh {
            for kx in 0..g.kw {
                let row = &col[row_index * n..(row_index + 1) * n];
                row_index += 1;
                let (xlo, xhi) = valid_range(g.ow, g.stride, kx, g.pad, g.w);
                for b in 0..cs {
                    let dst = &mut dx[(b * g.c_in + c) * plane..][..plane];
                    for oy in 0..g.oh {
                        let iy = (oy * g.stride + ky) as isize - g.pad as isize;
                        if iy < 0 || iy >= g.h as isize || xhi == xlo {
                            continue;
                        }
                        let src = &row[b * p + oy * g.ow..][..g.ow];
                        let dst_row = &mut dst[iy as usize * g.w..][..g.w];
                        if g.stride == 1 {
                            let start = xlo + kx - g.pad;
                            for (d, s) in dst_row[start..start + (xhi - xlo)]
                                .iter_mut()
                                .zip(&src[xlo..xhi])
                            {
                                *d += *s;
                            }
                        } else {
                            for (ox, s) in src[xlo..xhi].iter().enumerate() {
                                dst_row[(ox + xlo) * g.stride + kx - g.pad] += *s;
                            }
                        }
                    }
                }
            }
        }
    }
}

/// Forward convolution: `x` NCHW, `weight` OIHW, optional bias; returns the
/// NCHW output.
pub fn conv2d_forward(g: &ConvGeom, x: &[f32], weight: &[f32], bias: Option<&[f32]>) -> Vec<f32> {
    assert_eq!(x.len(), g.batch * g.in_len());
    assert_eq!(weight.len(), g.c_out * g.k());
    let mut out = vec![0.0f32; g.batch * g.out_len()];
    if out.is_empty() {
        return out;
    }
    let (k, p, cs) = (g.k(), g.p(), g.chunk());
    out.par_chunks_mut(cs * g.out_len())
        .zip(x.par_chunks(cs * g.in_len()))
        .for_each(|(out, x)| {
            let cs = x.len() / g.in_len();
            let n = cs * p;
            with_scratch(k * n, g.c_out * n, |col, res| {
                im2col(g, x, cs, col);
                // res[c_out × n] = W[c_out × k] · col[k × n], dense row-major.
                gemm(g.c_out, n, k, res, (n, 1), false, weight, (k, 1), col, (n, 1));
                // [c_out × (cs·p)] → NCHW, adding the bias.
                for b in 0..cs {
                    for co in 0..g.c_out {
                        let src = &res[co * n + b * p..][..p];
                        let dst = &mut out[(b * g.c_out + co) * p..][..p];
                        match bias {
                            Some(bias) => {
                                let v = bias[co];
                                for (d, s) in dst.iter_mut().zip(src) {
                                    *d = *s + v;
                                }
                            }
                            None => dst.copy_from_slice(src),
                        }
                    }
                }
            });
        });
    out
}

/// Gradients of [`conv2d_forward`] with respect to the requested inputs.
#[derive(Debug, Default)]
pub struct ConvGrads {
    pub x: Option<Vec<f32>>,
    pub weight: Option<Vec<f32>>,
    pub bias: Option<Vec<f32>>,
}

/// Backward convolution: from the output gradient `grad` (NCHW, the forward
/// output's shape) computes the gradients asked for.
pub fn conv2d_backward(
    g: &ConvGeom,
    x: &[f32],
    weight: &[f32],
    grad: &[f32],
    need_x: bool,
    need_weight: bool,
    need_bias: bool,
) -> ConvGrads {
    assert_eq!(x.len(), g.batch * g.in_len());
    assert_eq!(weight.len(), g.c_out * g.k());
    assert_eq!(grad.len(), g.batch * g.out_len());
    let (k, p, cs) = (g.k(), g.p(), g.chunk());
    let chunks = g.batch.div_ceil(cs.max(1));
    let mut dx = need_x.then(|| vec![0.0f32; g.batch * g.in_len()]);
    // Per-chunk partial sums, added in chunk order below.
    let mut dw_parts = vec![0.0f32; if need_weight { chunks * g.c_out * k } else { 0 }];
    let mut db_parts = vec![0.0f32; if need_bias { chunks * g.c_out } else { 0 }];
    if chunks > 0 && (need_x || need_weight || need_bias) {
        let dw_len = if need_weight { g.c_out * k } else { 0 };
        let db_len = if need_bias { g.c_out } else { 0 };
        let mut dx_chunks: Vec<Option<&mut [f32]>> = match dx.as_mut() {
            Some(dx) => dx.chunks_mut(cs * g.in_len()).map(Some).collect(),
            None => (0..chunks).map(|_| None).collect(),
        };
        let mut dw_chunks: Vec<&mut [f32]> = if need_weight {
            dw_parts.chunks_mut(dw_len).collect()
        } else {
            (0..chunks).map(|_| <&mut [f32]>::default()).collect()
        };
        let mut db_chunks: Vec<&mut [f32]> = if need_bias {
            db_parts.chunks_mut(db_len).collect()
        } else {
            (0..chunks).map(|_| <&mut [f32]>::default()).collect()
        };
        dx_chunks
            .par_iter_mut()
            .zip(dw_chunks.par_iter_mut())
            .zip(db_chunks.par_iter_mut())
            .enumerate()
            .for_each(|(ci, ((dx, dw), db))| {
                let b0 = ci * cs;
                let cs = cs.min(g.batch - b0);
                let n = cs * p;
                let x = &x[b0 * g.in_len()..(b0 + cs) * g.in_len()];
                let grad = &grad[b0 * g.out_len()..(b0 + cs) * g.out_len()];
                with_scratch(k * n, g.c_out * n, |col, gc| {
                    // gc[c_out × n]: this chunk's output gradient, samples side by side.
                    for b in 0..cs {
                        for co in 0..g.c_out {
                            gc[co * n + b * p..][..p]
                                .copy_from_slice(&grad[(b * g.c_out + co) * p..][..p]);
                        }
                    }
                    if need_bias {
                        for (co, d) in db.iter_mut().enumerate() {
                            *d = gc[co * n..(co + 1) * n].iter().sum();
                        }
                    }
                    if need_weight {
                        im2col(g, x, cs, col);
                        // dwᵀ[k × c_out] = col[k × n] · gcᵀ[n × c_out]: the
                        // transposed product packs both operands along their
                        // contiguous axis; `gc · colᵀ` ran 1.4–1.6× slower
                        // (strided packing of colᵀ). Transposed back after the
                        // chunk sum (`transpose` below).
                        // gcᵀ is gc read with swapped strides.
                        gemm(k, g.c_out, n, dw, (g.c_out, 1), false, col, (n, 1), gc, (1, n));
                    }
                    if let Some(dx) = dx.as_deref_mut() {
                        // col[k × n] = Wᵀ[k × c_out] · gc[c_out × n]
                        // Wᵀ is W read with swapped strides.
                        gemm(k, n, g.c_out, col, (n, 1), false, weight, (1, k), gc, (n, 1));
                        col2im(g, col, cs, dx);
                    }
                });
            });
    }
    let reduce = |parts: Vec<f32>, len: usize| -> Vec<f32> {
        if len == 0 {
            return Vec::new();
        }
        let mut total = vec![0.0f32; len];
        // Parallel over elements; each element adds its chunks in chunk order.
        const SPAN: usize = 4096;
        total.par_chunks_mut(SPAN).enumerate().for_each(|(i, t)| {
            for part in parts.chunks(len) {
                for (d, s) in t.iter_mut().zip(&part[i * SPAN..]) {
                    *d += *s;
                }
            }
        });
        total
    };
    // The partial weight gradients are [k × c_out]; the result is OIHW.
    let transpose = |dwt: Vec<f32>| -> Vec<f32> {
        let mut dw = vec![0.0f32; dwt.len()];
        for (r, row) in dwt.chunks(g.c_out).enumerate() {
            for (co, v) in row.iter().enumerate() {
                dw[co * k + r] = *v;
            }
        }
        dw
    };
    ConvGrads {
        x: dx,
        weight: need_weight.then(|| transpose(reduce(dw_parts, g.c_out * k))),
        bias: need_bias.then(|| reduce(db_parts, g.c_out)),
    }
}

/// Output side of a 2×2, stride-2 max-pool (floor).
pub fn pool_out(h: usize, w: usize) -> (usize, usize) {
    (h / 2, w / 2)
}

/// Which element of a 2×2 window `[a, b, c, d]` (row-major) is its maximum:
/// the first maximum in row-major order, or the last NaN, as burn's flex
/// `max_pool2d` picks it; and that element's value. Written as selects, not
/// branches: on real activations the comparisons are unpredictable, and the
/// branchy version spent most of its time in mispredictions (profile in
/// docs/performance.md).
#[inline(always)]
fn window_max(a: f32, b: f32, c: f32, d: f32) -> (f32, u32) {
    let (mut m, mut at) = (a, 0u32);
    let take = b > m || b.is_nan();
    m = if take { b } else { m };
    at = if take { 1 } else { at };
    let take = c > m || c.is_nan();
    m = if take { c } else { m };
    at = if take { 2 } else { at };
    let take = d > m || d.is_nan();
    m = if take { d } else { m };
    at = if take { 3 } else { at };
    (m, at)
}

/// Several planes per parallel task: one plane is too little work to schedule.
fn planes_per_task(h: usize, w: usize) -> usize {
    (4096 / (h * w).max(1)).max(1)
}

/// 2×2 stride-2 max-pool of NCHW `x` of shape `[planes, h, w]` (planes = n·c).
pub fn max_pool2x2_forward(x: &[f32], planes: usize, h: usize, w: usize) -> Vec<f32> {
    assert_eq!(x.len(), planes * h * w);
    let (oh, ow) = pool_out(h, w);
    let mut out = vec![0.0f32; planes * oh * ow];
    if out.is_empty() {
        return out;
    }
    let per = planes_per_task(h, w);
    out.par_chunks_mut(per * oh * ow)
        .zip(x.par_chunks(per * h * w))
        .for_each(|(out, x)| {
            for (out, x) in out.chunks_exact_mut(oh * ow).zip(x.chunks_exact(h * w)) {
                for (row, pair) in out.chunks_exact_mut(ow).zip(x.chunks_exact(2 * w)) {
                    let (top, bottom) = pair.split_at(w);
                    for ((o, t), b) in row
                        .iter_mut()
                        .zip(top.chunks_exact(2))
                        .zip(bottom.chunks_exact(2))
                    {
                        *o = window_max(t[0], t[1], b[0], b[1]).0;
                    }
                }
            }
        });
    out
}

/// Gradient of [`max_pool2x2_forward`]: each output gradient goes to its
/// window's maximum (recomputed from `x`); everything else is zero. Every
/// element of a window is written (the gradient or 0), so the loop has no
/// data-dependent stores.
pub fn max_pool2x2_backward(
    x: &[f32],
    grad: &[f32],
    planes: usize,
    h: usize,
    w: usize,
) -> Vec<f32> {
    let (oh, ow) = pool_out(h, w);
    assert_eq!(x.len(), planes * h * w);
    assert_eq!(grad.len(), planes * oh * ow);
    // Zeroed: with odd sides the last row / column belongs to no window.
    let mut dx = vec![0.0f32; planes * h * w];
    if grad.is_empty() {
        return dx;
    }
    let per = planes_per_task(h, w);
    dx.par_chunks_mut(per * h * w)
        .zip(x.par_chunks(per * h * w))
        .zip(grad.par_chunks(per * oh * ow))
        .for_each(|((dx, x), grad)| {
            for ((dx, x), grad) in dx
                .chunks_exact_mut(h * w)
                .zip(x.chunks_exact(h * w))
                .zip(grad.chunks_exact(oh * ow))
            {
                for ((dpair, pair), grow) in dx
                    .chunks_exact_mut(2 * w)
                    .zip(x.chunks_exact(2 * w))
                    .zip(grad.chunks_exact(ow))
                {
                    // Indexed, not zipped: this form vectorises.
                    let (top, bottom) = pair.split_at(w);
                    let (dtop, dbottom) = dpair.split_at_mut(w);
                    let (t, b) = (&top[..2 * ow], &bottom[..2 * ow]);
                    let (dt, db) = (&mut dtop[..2 * ow], &mut dbottom[..2 * ow]);
                    for (i, g) in grow.iter().enumerate() {
                        let at = window_max(t[2 * i], t[2 * i + 1], b[2 * i], b[2 * i + 1]).1;
                        dt[2 * i] = if at == 0 { *g } else { 0.0 };
                        dt[2 * i + 1] = if at == 1 { *g } else { 0.0 };
                        db[2 * i] = if at == 2 { *g } else { 0.0 };
                        db[2 * i + 1] = if at == 3 { *g } else { 0.0 };
                    }
                }
            }
        });
    dx
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn valid_range_matches_a_brute_force_scan() {
        for len in 1..7 {
            for k in 0..5 {
                for pad in 0..3 {
                    for stride in 1..4 {
                        if len + 2 * pad < k + 1 {
                            continue;
                        }
                        let out = (len + 2 * pad - (k + 1)) / stride + 1;
                        for kx in 0..=k {
                            let inside: Vec<usize> = (0..out)
                                .filter(|o| {
                                    let i = (o * stride + kx) as isize - pad as isize;
                                    i >= 0 && i < len as isize
                                })
                                .collect();
                            let (lo, hi) = valid_range(out, stride, kx, pad, len);
                            assert_eq!(
                                (lo..hi).collect::<Vec<_>>(),
                                inside,
                                "len {len} k {kx} pad {pad} stride {stride}"
                            );
                        }
                    }
                }
            }
        }
    }
}

//! GFLOP/s of the matrix products behind one FedAvg-CNN convolution (conv2:
//! 32 → 64 channels, 5×5, on 14×14) as `fd_learn::fastconv` issues them, one
//! thread, through the `gemm` crate with this build's features and profile.
//! Also the layouts fastconv does not use, to show why it picks the ones it
//! does (issue 7, docs/performance.md).
//!
//! ```text
//! cargo build --workspace --examples
//! target/debug/examples/gemm_shapes [columns per chunk, default 588 = 3 samples × 196]
//! ```

use std::time::Instant;

/// `dst[m×n] = lhs[m×k] · rhs[k×n]`, each with (row, column) strides.
#[allow(clippy::too_many_arguments)]
fn product(
    (m, n, k): (usize, usize, usize),
    dst: &mut [f32],
    (drs, dcs): (usize, usize),
    lhs: &[f32],
    (lrs, lcs): (usize, usize),
    rhs: &[f32],
    (rrs, rcs): (usize, usize),
) {
    fd_learn::fastconv::kernels::gemm(m, n, k, dst, (drs, dcs), false, lhs, (lrs, lcs), rhs, (rrs, rcs));
}

fn report(name: &str, (m, n, k): (usize, usize, usize), mut f: impl FnMut()) {
    for _ in 0..3 {
        f();
    }
    let (start, mut runs) = (Instant::now(), 0u32);
    while start.elapsed().as_secs_f64() < 0.5 {
        f();
        runs += 1;
    }
    let seconds = start.elapsed().as_secs_f64() / f64::from(runs);
    let gflops = 2.0 * (m * n * k) as f64 / seconds / 1e9;
    println!(
        "| {name} | {m} | {n} | {k} | {:.3} | {gflops:.1} |",
        seconds * 1e3
    );
}

fn main() {
    let n: usize = std::env::args()
        .nth(1)
        .map(|s| s.parse().expect("columns per chunk: a positive integer"))
        .unwrap_or(3 * 196);
    let (c_out, k) = (64usize, 32 * 5 * 5);
    let weight = vec![0.5f32; c_out * k];
    let col = vec![0.25f32; k * n];
    let grad = vec![0.1f32; c_out * n];
    let mut out = vec![0.0f32; c_out * n];
    let mut dw = vec![0.0f32; c_out * k];
    let mut dcol = vec![0.0f32; k * n];
    println!("| product | m | n | k | ms | GFLOP/s |\n|---|---:|---:|---:|---:|---:|");
    let shape = (c_out, n, k);
    report("forward: W · col (used)", shape, || {
        product(shape, &mut out, (n, 1), &weight, (k, 1), &col, (n, 1))
    });
    let shape = (c_out, k, n);
    report("weight grad: G · colᵀ (replaced)", shape, || {
        product(shape, &mut dw, (k, 1), &grad, (n, 1), &col, (1, n))
    });
    let shape = (k, c_out, n);
    report("weight grad: col · Gᵀ (used)", shape, || {
        product(shape, &mut dw, (c_out, 1), &col, (n, 1), &grad, (1, n))
    });
    let shape = (k, n, c_out);
    report("input grad: Wᵀ · G (used)", shape, || {
        product(shape, &mut dcol, (n, 1), &weight, (1, k), &grad, (n, 1))
    });
    let (a, b) = (vec![0.1f32; 64 * 3136], vec![0.1f32; 3136 * 512]);
    let mut c = vec![0.0f32; 64 * 512];
    let shape = (64, 512, 3136);
    report(
        "fc1 forward, batch 64 (burn's matmul, same crate)",
        shape,
        || product(shape, &mut c, (512, 1), &a, (3136, 1), &b, (512, 1)),
    );
}

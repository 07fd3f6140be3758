//! Rényi-DP accountant of the Poisson-subsampled Gaussian mechanism.
//!
//! Why its own module and no crate: no maintained Rust crate computes the
//! RDP of the *sampled* Gaussian mechanism (Mironov, Talwar and Zhang 2019,
//! "Rényi Differential Privacy of the Sampled Gaussian Mechanism",
//! arXiv:1908.10530). The computation is short and is the one TF-Privacy's
//! `rdp_accountant.compute_rdp` and Opacus' `accountants/analysis/rdp.py`
//! run: for an integer order α the binomial expansion of
//! A_α = E_{z∼μ0}[(μ(z)/μ0(z))^α] (Section 3.3 of the paper), for a
//! fractional α the two-sided series split at z₀ = σ²·ln(1/q − 1) + ½ with
//! erfc tails (Section 3.4), everything in log space because e^{(i²−i)/2σ²}
//! overflows f64 for small σ and large α. Its tests reproduce TF-Privacy's
//! published test values.
//!
//! RDP → (ε, δ): the conversion of Balle, Barthe, Gaboardi, Hsu and Sato
//! 2020 ("Hypothesis Testing Interpretations and Renyi Differential
//! Privacy", Theorem 21), ε = r + ln(1 − 1/α) − (ln δ + ln α)/(α − 1),
//! minimised over the orders, the one TF-Privacy and Opacus use today. It
//! is never looser than the classic ε = r + ln(1/δ)/(α − 1) (Mironov 2017,
//! Proposition 3), which [`classic_epsilon`] keeps for comparison.
//!
//! Adjacency: add/remove one sample (the setting of both papers and of
//! Poisson sampling). The accountant assumes each step includes every
//! sample independently with probability q; the learner samples exactly so.

/// The orders Opacus uses by default: 1.1, 1.2, …, 10.9 and 12, 13, …, 63.
pub fn default_orders() -> Vec<f64> {
    (1..100)
        .map(|x| 1.0 + x as f64 / 10.0)
        .chain((12..64).map(f64::from))
        .collect()
}

/// ln(e^a + e^b).
fn log_add(a: f64, b: f64) -> f64 {
    let (hi, lo) = if a > b { (a, b) } else { (b, a) };
    if lo == f64::NEG_INFINITY {
        return hi;
    }
    hi + (lo - hi).exp().ln_1p()
}

/// A signed number held as (sign, ln |value|), for the alternating series
/// of fractional orders.
#[derive(Clone, Copy)]
struct SignedLog {
    negative: bool,
    log_abs: f64,
}

impl SignedLog {
    const ZERO: SignedLog = SignedLog {
        negative: false,
        log_abs: f64::NEG_INFINITY,
    };

    fn add(self, negative: bool, log_abs: f64) -> SignedLog {
        if log_abs == f64::NEG_INFINITY {
            return self;
        }
        if self.log_abs == f64::NEG_INFINITY {
            return SignedLog { negative, log_abs };
        }
        if self.negative == negative {
            return SignedLog {
                negative,
                log_abs: log_add(self.log_abs, log_abs),
            };
        }
        // Opposite signs: the larger magnitude keeps its sign.
        let (big, small, sign) = if self.log_abs >= log_abs {
            (self.log_abs, log_abs, self.negative)
        } else {
            (log_abs, self.log_abs, negative)
        };
        if big == small {
            return SignedLog::ZERO;
        }
        SignedLog {
            negative: sign,
            log_abs: big + (-(small - big).exp()).ln_1p(),
        }
    }
}

/// ln erfc(x), accurate where erfc underflows f64 (x ≳ 26).
fn log_erfc(x: f64) -> f64 {
    if x < 25.0 {
        return libm::erfc(x).ln();
    }
    // Asymptotic series: erfc(x) = e^{−x²}/(x√π) · (1 − 1/(2x²) + 3/(2x²)² − 15/(2x²)³ + 105/(2x²)⁴ …);
    // at x ≥ 25 the fifth term is below 1e-13 of the first.
    let u = 1.0 / (2.0 * x * x);
    let series = 1.0 - u + 3.0 * u * u - 15.0 * u.powi(3) + 105.0 * u.powi(4);
    -x * x - x.ln() - 0.5 * std::f64::consts::PI.ln() + series.ln()
}

/// ln A_α for an integer α ≥ 2: Σ_{i=0}^{α} C(α,i) q^i (1−q)^{α−i} e^{(i²−i)/(2σ²)}.
fn log_a_int(q: f64, sigma: f64, alpha: u64) -> f64 {
    let (lq, l1q) = (q.ln(), (-q).ln_1p());
    let mut log_a = f64::NEG_INFINITY;
    let mut log_binom = 0.0; // ln C(α, 0)
    for i in 0..=alpha {
        if i > 0 {
            log_binom += ((alpha - i + 1) as f64).ln() - (i as f64).ln();
        }
        let fi = i as f64;
        let term =
            log_binom + fi * lq + (alpha - i) as f64 * l1q + (fi * fi - fi) / (2.0 * sigma * sigma);
        log_a = log_add(log_a, term);
    }
    log_a
}

/// ln A_α for a fractional α > 1 (Mironov, Talwar, Zhang 2019, Section 3.4):
/// the series over i of C(α,i)·[q^i(1−q)^{α−i} e^{(i²−i)/2σ²}·½erfc((i−z₀)/(√2σ))
/// \+ q^{α−i}(1−q)^i e^{(j²−j)/2σ²}·½erfc((z₀−j)/(√2σ))], j = α − i, summed
/// until both terms fall below e^{−30}.
fn log_a_frac(q: f64, sigma: f64, alpha: f64) -> f64 {
    let (lq, l1q) = (q.ln(), (-q).ln_1p());
    let z0 = sigma * sigma * (1.0 / q - 1.0).ln() + 0.5;
    let (mut a0, mut a1) = (SignedLog::ZERO, SignedLog::ZERO);
    // C(α, i) by its recurrence C(α, i+1) = C(α, i)·(α − i)/(i + 1), as sign and log.
    let (mut binom_negative, mut log_binom) = (false, 0.0f64);
    let mut i = 0u64;
    loop {
        let fi = i as f64;
        let j = alpha - fi;
        let log_t0 = log_binom + fi * lq + j * l1q;
        let log_t1 = log_binom + j * lq + fi * l1q;
        let log_e0 = 0.5f64.ln() + log_erfc((fi - z0) / (std::f64::consts::SQRT_2 * sigma));
        let log_e1 = 0.5f64.ln() + log_erfc((z0 - j) / (std::f64::consts::SQRT_2 * sigma));
        let log_s0 = log_t0 + (fi * fi - fi) / (2.0 * sigma * sigma) + log_e0;
        let log_s1 = log_t1 + (j * j - j) / (2.0 * sigma * sigma) + log_e1;
        a0 = a0.add(binom_negative, log_s0);
        a1 = a1.add(binom_negative, log_s1);
        if log_s0.max(log_s1) < -30.0 || i > 100_000 {
            break;
        }
        let factor = alpha - fi;
        if factor == 0.0 {
            break; // every later coefficient is 0
        }
        if factor < 0.0 {
            binom_negative = !binom_negative;
        }
        log_binom += factor.abs().ln() - (fi + 1.0).ln();
        i += 1;
    }
    let sum = a0.add(a1.negative, a1.log_abs);
    debug_assert!(!sum.negative, "A_α is a moment of a positive ratio");
    sum.log_abs
}

/// RDP at order `alpha` of one step of the Gaussian mechanism with noise
/// multiplier `sigma` (noise std / sensitivity) on a Poisson sample of rate `q`.
pub fn rdp_step(q: f64, sigma: f64, alpha: f64) -> f64 {
    if q == 0.0 {
        return 0.0;
    }
    if sigma == 0.0 || alpha.is_infinite() {
        return f64::INFINITY;
    }
    if q >= 1.0 {
        return alpha / (2.0 * sigma * sigma);
    }
    let log_a = if alpha.fract() == 0.0 && alpha <= 1e6 {
        log_a_int(q, sigma, alpha as u64)
    } else {
        log_a_frac(q, sigma, alpha)
    };
    log_a / (alpha - 1.0)
}

/// RDP at each of `orders` after `steps` steps (composition adds RDP).
pub fn compute_rdp(q: f64, sigma: f64, steps: u64, orders: &[f64]) -> Vec<f64> {
    orders
        .iter()
        .map(|&a| rdp_step(q, sigma, a) * steps as f64)
        .collect()
}

/// The smallest ε over `orders` such that the mechanism with RDP `rdp` is
/// (ε, δ)-DP, by Balle et al. 2020, Theorem 21; and the order attaining it.
/// Orders ≤ 1.01 are skipped (the bound is numerically unstable there), as
/// in TF-Privacy.
pub fn epsilon(orders: &[f64], rdp: &[f64], delta: f64) -> (f64, f64) {
    assert_eq!(orders.len(), rdp.len(), "one RDP value per order");
    let mut best = (f64::INFINITY, f64::NAN);
    for (&a, &r) in orders.iter().zip(rdp) {
        let eps = if delta * delta + (-r).exp_m1() >= 0.0 {
            // δ ≥ sqrt(1 − e^{−r}) bounds the total variation: ε = 0 suffices.
            0.0
        } else if a > 1.01 {
            r + (-1.0 / a).ln_1p() - (delta * a).ln() / (a - 1.0)
        } else {
            f64::INFINITY
        };
        if eps < best.0 {
            best = (eps, a);
        }
    }
    (best.0.max(0.0), best.1)
}

/// The classic conversion ε = min_α r_α + ln(1/δ)/(α − 1) (Mironov 2017).
pub fn classic_epsilon(orders: &[f64], rdp: &[f64], delta: f64) -> (f64, f64) {
    let mut best = (f64::INFINITY, f64::NAN);
    for (&a, &r) in orders.iter().zip(rdp) {
        let eps = r + (1.0 / delta).ln() / (a - 1.0);
        if a > 1.0 && eps < best.0 {
            best = (eps, a);
        }
    }
    best
}

/// The privacy spent by a member that runs DP-SGD steps with one sampling
/// rate and one noise multiplier: the per-step RDP is computed once, and
/// `steps` steps compose to `steps` times it.
#[derive(Debug, Clone, PartialEq)]
pub struct Accountant {
    q: f64,
    sigma: f64,
    orders: Vec<f64>,
    per_step: Vec<f64>,
}

impl Accountant {
    pub fn new(q: f64, sigma: f64) -> Self {
        let orders = default_orders();
        let per_step = compute_rdp(q, sigma, 1, &orders);
        Accountant {
            q,
            sigma,
            orders,
            per_step,
        }
    }

    pub fn sample_rate(&self) -> f64 {
        self.q
    }

    pub fn noise_multiplier(&self) -> f64 {
        self.sigma
    }

    /// ε at `delta` after `steps` steps (0 steps: 0).
    pub fn epsilon(&self, steps: u64, delta: f64) -> f64 {
        if steps == 0 {
            return 0.0;
        }
        let rdp: Vec<f64> = self.per_step.iter().map(|r| r * steps as f64).collect();
        epsilon(&self.orders, &rdp, delta).0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // Expected values below are those published in TF-Privacy's
    // tensorflow_privacy/privacy/analysis/rdp_accountant_test.py
    // (github.com/tensorflow/privacy), to the digits and tolerances given there.

    /// `test_compute_rdp_no_data` / `test_compute_rdp_no_sampling`.
    #[test]
    fn degenerate_rates() {
        assert_eq!(compute_rdp(0.0, 10.0, 1, &[20.0])[0], 0.0);
        assert_eq!(compute_rdp(1.0, 10.0, 1, &[20.0])[0], 0.1);
    }

    /// `test_compute_rdp_scalar`: compute_rdp(0.1, 2, 10, 5) ≈ 0.07737 (places=5).
    #[test]
    fn rdp_of_an_integer_order_matches_tf_privacy() {
        let r = compute_rdp(0.1, 2.0, 10, &[5.0])[0];
        assert!((r - 0.07737).abs() < 5e-6, "{r}");
    }

    /// `test_compute_rdp_sequence`: compute_rdp(0.01, 2.5, 50,
    /// [1.5, 2.5, 5, 50, 100, inf]) ≈ [0.00065, 0.001085, 0.00218075,
    /// 0.023846, 167.416307, inf] (delta=1e-5): fractional and integer
    /// orders, and a large order where the series needs log space.
    #[test]
    fn rdp_of_fractional_and_integer_orders_matches_tf_privacy() {
        let orders = [1.5, 2.5, 5.0, 50.0, 100.0, f64::INFINITY];
        let expected = [0.00065, 0.001085, 0.00218075, 0.023846, 167.416307];
        let r = compute_rdp(0.01, 2.5, 50, &orders);
        for (i, e) in expected.iter().enumerate() {
            assert!(
                (r[i] - e).abs() < 1e-5,
                "order {}: {} vs {e}",
                orders[i],
                r[i]
            );
        }
        assert!(r[5].is_infinite());
    }

    /// `test_get_privacy_spent_check_target_delta`, first part: constant
    /// RDP 1.1 over orders 2..=32 at δ = 1e-5 gives ε ≈ 1.32783806176
    /// (assertAlmostEqual: 7 places) at order 32.
    #[test]
    fn conversion_to_epsilon_matches_tf_privacy() {
        let orders: Vec<f64> = (2..33).map(f64::from).collect();
        let rdp = vec![1.1; orders.len()];
        let (eps, order) = epsilon(&orders, &rdp, 1e-5);
        assert_eq!(order, 32.0);
        assert!((eps - 1.327_838_061_76).abs() < 5e-8, "{eps}");
        // The classic conversion is looser: 1.1 + ln(1e5)/31.
        let (classic, _) = classic_epsilon(&orders, &rdp, 1e-5);
        assert!((classic - (1.1 + 1e5f64.ln() / 31.0)).abs() < 1e-12);
        assert!(classic > eps);
    }

    /// `test_get_privacy_spent_check_target_delta`, second part: the
    /// unsampled Gaussian with σ = 4.530877117 over the orders 1.000,
    /// 1.001, …, 99.999 is (1, 1e-6)-DP (assertAlmostEqual: 7 places).
    #[test]
    fn gaussian_mechanism_calibrated_to_epsilon_one() {
        let orders: Vec<f64> = (1000..100_000).map(|i| 0.001 * i as f64).collect();
        let rdp = compute_rdp(1.0, 4.530_877_117, 1, &orders);
        let (eps, _) = epsilon(&orders, &rdp, 1e-6);
        assert!((eps - 1.0).abs() < 5e-8, "{eps}");
    }

    /// Fractional and integer routes agree where both apply (an integer
    /// order pushed through the fractional series), and RDP grows with the
    /// order and the sampling rate, and falls with the noise.
    #[test]
    fn series_agree_and_rdp_is_monotone() {
        for (q, sigma) in [(0.01, 1.0), (0.1, 0.8), (0.003, 1.5), (0.5, 3.0)] {
            for alpha in [2u64, 3, 8, 32] {
                let int = log_a_int(q, sigma, alpha);
                let frac = log_a_frac(q, sigma, alpha as f64);
                assert!(
                    (int - frac).abs() <= 1e-9 * int.abs().max(1e-6),
                    "q {q} σ {sigma} α {alpha}: {int} vs {frac}"
                );
            }
        }
        let orders = default_orders();
        let r = compute_rdp(0.01, 1.0, 1, &orders);
        assert!(r.windows(2).all(|w| w[0] <= w[1] + 1e-15));
        let more_q = compute_rdp(0.02, 1.0, 1, &orders);
        let more_noise = compute_rdp(0.01, 2.0, 1, &orders);
        for i in 0..orders.len() {
            assert!(more_q[i] > r[i] && more_noise[i] < r[i]);
        }
    }

    #[test]
    fn accountant_composes_steps() {
        let a = Accountant::new(0.01, 1.1);
        assert_eq!(a.epsilon(0, 1e-5), 0.0);
        let (e1, e2) = (a.epsilon(1000, 1e-5), a.epsilon(2000, 1e-5));
        assert!(e1 > 0.0 && e2 > e1);
        let direct = epsilon(
            &default_orders(),
            &compute_rdp(0.01, 1.1, 2000, &default_orders()),
            1e-5,
        )
        .0;
        assert!((direct - e2).abs() < 1e-12);
    }
}

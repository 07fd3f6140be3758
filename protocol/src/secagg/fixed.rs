//! Fixed-point encoding of a member's knowledge as a vector in Z_2³².
//!
//! Masks cancel only under exact arithmetic, so what is summed must be
//! integers. Each public row r of a contribution becomes `classes + 1`
//! values: the member's row weight w_r and w_r·p_r,c for every class (its
//! softmax probabilities scaled by the weight; without row weights w = 1).
//! The sum over members then holds Σ w and Σ w·p per row, which is all the
//! weighted mean teacher needs (Σ w·p / Σ w), and nothing per member.
//!
//! Every value in [0, 1] is scaled by 2^[`FRACTION_BITS`] and rounded, so
//! one value is off by at most 2^-(FRACTION_BITS+1) ≈ 4.8·10⁻⁷, and the sum
//! of [`MAX_CONTRIBUTORS`] values of at most 2^FRACTION_BITS still fits in
//! 32 bits: the modular sum is the true sum.

use super::SecAggError;

/// Fractional bits of the encoding.
pub const FRACTION_BITS: u32 = 20;
/// Most contributions whose encoded sum cannot wrap around 2³².
pub const MAX_CONTRIBUTORS: usize = (u32::MAX >> FRACTION_BITS) as usize;

const SCALE: f64 = (1u64 << FRACTION_BITS) as f64;

fn quantize(value: f64) -> u32 {
    (value * SCALE).round() as u32
}

/// Encodes `probabilities` (`rows × classes`, each row a distribution) with
/// optional per-row weights in [0, 1] into `rows × (classes + 1)` values.
pub fn encode_knowledge(
    probabilities: &[f32],
    row_weights: Option<&[f32]>,
    classes: usize,
) -> Result<Vec<u32>, SecAggError> {
    if classes == 0 || !probabilities.len().is_multiple_of(classes) {
        return Err(SecAggError::Malformed(format!(
            "`probabilities` has {} values, not a multiple of {classes} classes",
            probabilities.len()
        )));
    }
    let rows = probabilities.len() / classes;
    if let Some(w) = row_weights
        && w.len() != rows
    {
        return Err(SecAggError::Malformed(format!(
            "`row_weights` has {} values for {rows} rows",
            w.len()
        )));
    }
    let mut out = Vec::with_capacity(rows * (classes + 1));
    for (r, row) in probabilities.chunks(classes).enumerate() {
        let w = row_weights.map_or(1.0, |w| w[r]);
        if !(0.0..=1.0).contains(&w) {
            return Err(SecAggError::Malformed(format!(
                "`row_weights[{r}]` = {w} is outside [0, 1]"
            )));
        }
        out.push(quantize(f64::from(w)));
        for (c, &p) in row.iter().enumerate() {
            if !(0.0..=1.0).contains(&p) {
                return Err(SecAggError::Malformed(format!(
                    "`probabilities[{}]` = {p} is outside [0, 1]",
                    r * classes + c
                )));
            }
            out.push(quantize(f64::from(w) * f64::from(p)));
        }
    }
    Ok(out)
}

/// The summed knowledge of a round: per row Σ w and Σ w·p.
#[derive(Debug, Clone, PartialEq)]
pub struct KnowledgeSums {
    pub rows: usize,
    pub classes: usize,
    /// Σ w per row (`rows` values).
    pub weight: Vec<f64>,
    /// Σ w·p per row and class (`rows × classes`, row-major).
    pub weighted_probabilities: Vec<f64>,
}

impl KnowledgeSums {
    /// Decodes the unmasked sum of [`encode_knowledge`] vectors.
    pub fn decode(sum: &[u32], classes: usize) -> Result<Self, SecAggError> {
        let width = classes + 1;
        if classes == 0 || !sum.len().is_multiple_of(width) {
            return Err(SecAggError::Malformed(format!(
                "a sum of {} values is not rows × ({classes} classes + 1)",
                sum.len()
            )));
        }
        let rows = sum.len() / width;
        let mut weight = Vec::with_capacity(rows);
        let mut weighted_probabilities = Vec::with_capacity(rows * classes);
        for row in sum.chunks(width) {
            weight.push(f64::from(row[0]) / SCALE);
            weighted_probabilities.extend(row[1..].iter().map(|&v| f64::from(v) / SCALE));
        }
        Ok(KnowledgeSums {
            rows,
            classes,
            weight,
            weighted_probabilities,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encoding_is_within_half_a_step_and_refuses_bad_values() {
        let p = [0.25f32, 0.75, 1.0, 0.0, 0.123_456_7, 0.876_543_3];
        let w = [1.0f32, 0.5, 0.2];
        let v = encode_knowledge(&p, Some(&w), 2).unwrap();
        assert_eq!(v.len(), 9);
        let sums = KnowledgeSums::decode(&v, 2).unwrap();
        let step = 1.0 / SCALE;
        for r in 0..3 {
            assert!((sums.weight[r] - f64::from(w[r])).abs() <= step / 2.0);
            for c in 0..2 {
                let exact = f64::from(w[r]) * f64::from(p[r * 2 + c]);
                assert!((sums.weighted_probabilities[r * 2 + c] - exact).abs() <= step / 2.0);
            }
        }
        let e = encode_knowledge(&[0.5, f32::NAN], None, 2).unwrap_err();
        assert!(e.to_string().contains("probabilities[1]"), "{e}");
        let e = encode_knowledge(&[0.5, 0.5], Some(&[1.5]), 2).unwrap_err();
        assert!(e.to_string().contains("row_weights[0]"), "{e}");
        assert!(encode_knowledge(&[0.5, 0.5, 0.1], None, 2).is_err());
    }

    #[test]
    fn the_largest_sum_does_not_wrap() {
        let one = encode_knowledge(&[1.0], None, 1).unwrap();
        let total = (0..MAX_CONTRIBUTORS).fold(0u32, |acc, _| acc.wrapping_add(one[1]));
        assert_eq!(f64::from(total) / SCALE, MAX_CONTRIBUTORS as f64);
    }
}

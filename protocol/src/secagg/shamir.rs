//! Shamir secret sharing of 32-byte secrets over GF(2⁸).
//!
//! Secure aggregation shares two secrets per member and round (its mask key
//! and its self-mask seed) among the round's members, so that any
//! `threshold` of them can rebuild a secret and fewer learn nothing about it.
//! Each byte of the secret is the constant term of its own random
//! polynomial of degree `threshold − 1` over GF(2⁸) (the AES field,
//! x⁸ + x⁴ + x³ + x + 1); member k's share is every polynomial evaluated at
//! x = k (1-based, so at most 255 members). Bytes rather than one big prime
//! field keep the arithmetic to two 256-entry tables, constant per byte, and
//! make a share exactly as long as the secret.

use rand_chacha::rand_core::CryptoRng;

use super::SecAggError;

/// Most holders a secret can be split among (x runs over 1..=255).
pub const MAX_HOLDERS: usize = 255;

/// `(exp, log)` tables of GF(2⁸) with generator 3; `exp` is doubled so a
/// sum of two logs indexes it without a reduction.
const fn tables() -> ([u8; 512], [u8; 256]) {
    let mut exp = [0u8; 512];
    let mut log = [0u8; 256];
    let mut x: u16 = 1;
    let mut i = 0;
    while i < 255 {
        exp[i] = x as u8;
        log[x as usize] = i as u8;
        // x · 3 = x · 2 ⊕ x, reduced by the AES polynomial.
        let mut doubled = x << 1;
        if doubled & 0x100 != 0 {
            doubled ^= 0x11b;
        }
        x = doubled ^ x;
        i += 1;
    }
    let mut i = 255;
    while i < 512 {
        exp[i] = exp[i - 255];
        i += 1;
    }
    (exp, log)
}

const TABLES: ([u8; 512], [u8; 256]) = tables();

fn mul(a: u8, b: u8) -> u8 {
    if a == 0 || b == 0 {
        return 0;
    }
    let (exp, log) = &TABLES;
    exp[log[a as usize] as usize + log[b as usize] as usize]
}

fn div(a: u8, b: u8) -> u8 {
    debug_assert!(b != 0, "division by zero in GF(256)");
    if a == 0 {
        return 0;
    }
    let (exp, log) = &TABLES;
    exp[log[a as usize] as usize + 255 - log[b as usize] as usize]
}

/// Holder `x`'s share of a secret (`x` ≥ 1).
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct SecretShare {
    pub x: u8,
    pub y: [u8; 32],
}

impl std::fmt::Debug for SecretShare {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print share material.
        write!(f, "SecretShare {{ x: {}, .. }}", self.x)
    }
}

/// Splits `secret` into `holders` shares (x = 1..=holders), any
/// `threshold` of which rebuild it.
pub fn split(
    secret: &[u8; 32],
    threshold: usize,
    holders: usize,
    rng: &mut impl CryptoRng,
) -> Result<Vec<SecretShare>, SecAggError> {
    if holders == 0 || holders > MAX_HOLDERS {
        return Err(SecAggError::Config(format!(
            "cannot share a secret among {holders} holders (1..={MAX_HOLDERS})"
        )));
    }
    if threshold == 0 || threshold > holders {
        return Err(SecAggError::Config(format!(
            "threshold {threshold} is outside 1..={holders}"
        )));
    }
    // coefficients[d][b]: coefficient of x^d of byte b's polynomial.
    let mut coefficients = vec![[0u8; 32]; threshold];
    coefficients[0] = *secret;
    for c in coefficients.iter_mut().skip(1) {
        rng.fill_bytes(c);
    }
    Ok((1..=holders as u8)
        .map(|x| {
            let mut y = [0u8; 32];
            for (b, out) in y.iter_mut().enumerate() {
                // Horner from the highest degree down.
                let mut acc = 0u8;
                for c in coefficients.iter().rev() {
                    acc = mul(acc, x) ^ c[b];
                }
                *out = acc;
            }
            SecretShare { x, y }
        })
        .collect())
}

/// Rebuilds a secret from at least `threshold` shares with distinct x
/// (Lagrange interpolation at 0 over the first `threshold`). With fewer the
/// secret is undetermined and this refuses.
pub fn combine(shares: &[SecretShare], threshold: usize) -> Result<[u8; 32], SecAggError> {
    let mut distinct: Vec<SecretShare> = Vec::with_capacity(threshold);
    for share in shares {
        if share.x == 0 {
            return Err(SecAggError::Malformed("a secret share has x = 0".into()));
        }
        match distinct.iter().find(|s| s.x == share.x) {
            Some(same) if same.y != share.y => {
                return Err(SecAggError::Malformed(format!(
                    "two different secret shares for holder {}",
                    share.x
                )));
            }
            Some(_) => {}
            None => distinct.push(*share),
        }
    }
    if threshold == 0 || distinct.len() < threshold {
        return Err(SecAggError::Config(format!(
            "{} distinct shares cannot rebuild a secret of threshold {threshold}",
            distinct.len()
        )));
    }
    let used = &distinct[..threshold];
    let mut secret = [0u8; 32];
    for (i, si) in used.iter().enumerate() {
        // L_i(0) = Π_{j≠i} x_j / (x_j − x_i); subtraction is XOR.
        let mut basis = 1u8;
        for (j, sj) in used.iter().enumerate() {
            if i != j {
                basis = mul(basis, div(sj.x, sj.x ^ si.x));
            }
        }
        for (out, y) in secret.iter_mut().zip(&si.y) {
            *out ^= mul(*y, basis);
        }
    }
    Ok(secret)
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand_chacha::ChaCha20Rng;
    use rand_chacha::rand_core::{RngCore, SeedableRng};

    #[test]
    fn field_inverse_and_distributivity() {
        for a in 1..=255u8 {
            assert_eq!(mul(a, div(1, a)), 1, "inverse of {a}");
            for b in [1u8, 2, 3, 0x53, 0xca, 0xff] {
                assert_eq!(div(mul(a, b), b), a);
                assert_eq!(mul(a, b ^ 7), mul(a, b) ^ mul(a, 7));
            }
        }
        // The AES field's textbook example: {53} · {CA} = {01}.
        assert_eq!(mul(0x53, 0xca), 0x01);
    }

    #[test]
    fn any_threshold_subset_rebuilds_and_fewer_refuse() {
        let mut rng = ChaCha20Rng::seed_from_u64(7);
        for (threshold, holders) in [(1, 1), (2, 3), (3, 5), (6, 10), (11, 20), (200, 255)] {
            let mut secret = [0u8; 32];
            rng.fill_bytes(&mut secret);
            let shares = split(&secret, threshold, holders, &mut rng).unwrap();
            assert_eq!(shares.len(), holders);
            // Several random subsets of exactly `threshold` shares.
            for _ in 0..5 {
                let mut subset = shares.clone();
                for i in (1..subset.len()).rev() {
                    subset.swap(i, rng.next_u32() as usize % (i + 1));
                }
                subset.truncate(threshold);
                assert_eq!(combine(&subset, threshold).unwrap(), secret);
                if threshold > 1 {
                    assert!(combine(&subset[1..], threshold).is_err());
                }
            }
        }
    }

    #[test]
    fn fewer_than_threshold_shares_are_consistent_with_every_secret() {
        // Perfect secrecy for threshold 2: one share's bytes are uniform
        // whatever the secret. Count the first byte of holder 1's share over
        // many splits of two very different secrets.
        let mut rng = ChaCha20Rng::seed_from_u64(11);
        for secret in [[0u8; 32], [0xffu8; 32]] {
            let mut counts = [0u32; 256];
            let draws = 256 * 64;
            for _ in 0..draws {
                let shares = split(&secret, 2, 3, &mut rng).unwrap();
                counts[shares[0].y[0] as usize] += 1;
            }
            let expected = draws as f64 / 256.0;
            let chi2: f64 = counts
                .iter()
                .map(|&c| (c as f64 - expected).powi(2) / expected)
                .sum();
            // 255 degrees of freedom: the 99.9 % quantile is 330.5.
            assert!(chi2 < 330.5, "chi-square {chi2}");
        }
    }

    #[test]
    fn bad_inputs_are_refused() {
        let mut rng = ChaCha20Rng::seed_from_u64(1);
        assert!(split(&[1; 32], 0, 3, &mut rng).is_err());
        assert!(split(&[1; 32], 4, 3, &mut rng).is_err());
        assert!(split(&[1; 32], 2, 256, &mut rng).is_err());
        let shares = split(&[1; 32], 2, 3, &mut rng).unwrap();
        let mut forged = shares[1];
        forged.y[0] ^= 1;
        assert!(combine(&[shares[0], shares[0]], 2).is_err(), "duplicates count once");
        assert!(combine(&[shares[1], forged, shares[0]], 2).is_err());
    }
}

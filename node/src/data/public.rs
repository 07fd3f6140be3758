//! The public set: training samples every federation member holds and on
//! which students exchange predictions (used unlabelled), carved out of the
//! training set before the rest is partitioned privately.
//!
//! Members must agree on it bit for bit, so everything here is deterministic
//! in explicit seeds, uses a platform-independent shuffle (draws are `u64`,
//! never `usize`), and [`public_set_digest`] pins the exact bytes so a member
//! with a different copy of the dataset is detected instead of silently
//! distilling on different inputs.

use fd_protocol::digest::{Digest, Sha256};
use rand::Rng;

use super::{DataError, Dataset, derived_rng, portable_shuffle};

/// The split of a training set into the public set (held by every member,
/// unlabelled use) and the private pool (partitioned among nodes). Both hold
/// indices into the training set, in seeded-permutation order.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PublicSplit {
    pub public: Vec<usize>,
    pub private: Vec<usize>,
}

/// Deterministic in `seed`: a seeded permutation of `0..n`, the first
/// `public_size` go public, the rest private. Errors if `public_size` is 0 or
/// leaves no private samples (`public_size >= n`).
pub fn split_public(n: usize, public_size: usize, seed: u64) -> Result<PublicSplit, DataError> {
    if public_size == 0 || public_size >= n {
        return Err(DataError::Config {
            field: "public_size",
            reason: format!(
                "public set size must be between 1 and {} (training set has {n} samples)",
                n.saturating_sub(1)
            ),
        });
    }
    let mut rng = derived_rng("fd-node/public/split", &[seed]);
    let mut perm: Vec<usize> = (0..n).collect();
    portable_shuffle(&mut perm, &mut rng);
    let private = perm.split_off(public_size);
    Ok(PublicSplit {
        public: perm,
        private,
    })
}

/// SHA-256 over exactly the bytes a node would use: for each public index in
/// order, the sample's pixel bytes. Labels are not part of it: the public set
/// is used unlabelled.
pub fn public_set_digest(train: &Dataset, public: &[usize]) -> Digest {
    let mut hasher = Sha256::new();
    for &i in public {
        hasher.update(train.sample(i));
    }
    hasher.finish()
}

/// Positions (into the public list, `0..public_len`) of round `round`'s subset:
/// deterministic in `(seed, round)`, `size` clamped to `public_len`, sorted
/// ascending, distinct. Every member computes the same subset without talking.
pub fn round_subset(public_len: usize, size: usize, seed: u64, round: u64) -> Vec<usize> {
    let size = size.min(public_len);
    let mut rng = derived_rng("fd-node/public/round-subset", &[seed, round]);
    // Partial Fisher–Yates: the first `size` slots become a uniform sample.
    let mut positions: Vec<usize> = (0..public_len).collect();
    for i in 0..size {
        let j = i + rng.random_range(0..(public_len - i) as u64) as usize;
        positions.swap(i, j);
    }
    positions.truncate(size);
    positions.sort_unstable();
    positions
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::synthetic;

    #[test]
    fn split_is_deterministic_and_exact() {
        let a = split_public(1000, 100, 5).unwrap();
        assert_eq!(a, split_public(1000, 100, 5).unwrap());
        assert_ne!(a, split_public(1000, 100, 6).unwrap());
        assert_eq!((a.public.len(), a.private.len()), (100, 900));
        let mut all = [a.public.clone(), a.private.clone()].concat();
        all.sort_unstable();
        assert_eq!(all, (0..1000).collect::<Vec<_>>());
        for bad in [0, 1000, 2000] {
            let e = split_public(1000, bad, 5).unwrap_err();
            assert!(
                matches!(
                    e,
                    DataError::Config {
                        field: "public_size",
                        ..
                    }
                ),
                "{e}"
            );
        }
    }

    #[test]
    fn round_subsets() {
        let a = round_subset(500, 50, 1, 0);
        assert_eq!(a, round_subset(500, 50, 1, 0));
        assert_ne!(a, round_subset(500, 50, 1, 1));
        assert_ne!(a, round_subset(500, 50, 2, 0));
        assert_eq!(a.len(), 50);
        assert!(a.windows(2).all(|w| w[0] < w[1]), "sorted and distinct");
        assert!(a.iter().all(|&p| p < 500));
        assert_eq!(round_subset(20, 100, 1, 3), (0..20).collect::<Vec<_>>());
        assert!(round_subset(0, 10, 1, 0).is_empty());
        assert!(round_subset(10, 0, 1, 0).is_empty());
    }

    #[test]
    fn digest_tracks_pixels_not_labels() {
        let mut d = synthetic::generate(1, 200, 10).train;
        let split = split_public(d.len(), 50, 3).unwrap();
        let h = public_set_digest(&d, &split.public);
        assert_eq!(h, public_set_digest(&d, &split.public));
        // Labels do not matter.
        let i = split.public[7];
        d.labels[i] = (d.labels[i] + 1) % 10;
        assert_eq!(h, public_set_digest(&d, &split.public));
        // One pixel of one public sample does.
        d.pixels[i * d.features + 300] ^= 1;
        assert_ne!(h, public_set_digest(&d, &split.public));
        // A private sample does not.
        d.pixels[i * d.features + 300] ^= 1;
        let j = split.private[0];
        d.pixels[j * d.features] ^= 0xff;
        assert_eq!(h, public_set_digest(&d, &split.public));
        // Order matters (members must feed samples in the same order).
        let mut reversed = split.public.clone();
        reversed.reverse();
        assert_ne!(h, public_set_digest(&d, &reversed));
    }
}

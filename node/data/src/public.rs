//! The public set: training samples every federation member holds and on
//! which students exchange predictions (used unlabelled), carved out of the
//! training set before the rest is partitioned privately.
//!
//! Members must agree on it bit for bit, so everything here is deterministic
//! in explicit seeds, uses a platform-independent shuffle (draws are `u64`,
//! never `usize`), and [`public_set_digest`] pins the exact bytes so a member
//! with a different copy of the dataset is detected instead of silently
//! distilling on different inputs. [`PublicSetManifest`] bundles the three
//! facts a member checks before it joins — where the set came from, which
//! training indices it is, and their digest — and [`PublicSetManifest::verify`]
//! is the check, with an error that says which digest each side had.

use fd_protocol::digest::{Digest, Sha256};
use rand::Rng;

use super::{DataError, DataSplits, Dataset, derived_rng, portable_shuffle};

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

/// The public set pinned down: its origin, its training-set indices in order,
/// and [`public_set_digest`] over them. Built once from the federation's data
/// and seed; a member whose own data gives a different digest must stop
/// rather than distil on inputs its peers do not share.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PublicSetManifest {
    /// [`DataSplits::source`] of the data it was built from, for messages.
    pub source: String,
    /// Indices into the training split, in public-set order.
    pub indices: Vec<usize>,
    pub digest: Digest,
}

impl PublicSetManifest {
    /// The manifest of `split_public(train.len(), public_size, seed)` over `splits.train`.
    pub fn build(
        splits: &DataSplits,
        public_size: usize,
        seed: u64,
    ) -> Result<PublicSetManifest, DataError> {
        let split = split_public(splits.train.len(), public_size, seed)?;
        let digest = public_set_digest(&splits.train, &split.public);
        Ok(PublicSetManifest {
            source: splits.source.clone(),
            indices: split.public,
            digest,
        })
    }

    /// Recomputes the digest over `train` and compares. A training set too
    /// short for the indices cannot hold the public set at all, and is
    /// reported the same way (with no computed digest to show).
    pub fn verify(&self, train: &Dataset) -> Result<(), DataError> {
        if let Some(&i) = self.indices.iter().find(|&&i| i >= train.len()) {
            return Err(DataError::Config {
                field: "public_set",
                reason: format!(
                    "public set from {} has index {i}, but this training set has only {} samples",
                    self.source,
                    train.len()
                ),
            });
        }
        let computed = public_set_digest(train, &self.indices);
        if computed != self.digest {
            return Err(DataError::PublicSetMismatch {
                expected: self.digest,
                computed,
                samples: self.indices.len(),
                source_name: self.source.clone(),
            });
        }
        Ok(())
    }
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
    use crate::synthetic;

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
    fn manifest_builds_and_verifies() {
        let splits = synthetic::generate(2, 300, 10);
        let m = PublicSetManifest::build(&splits, 40, 9).unwrap();
        let split = split_public(300, 40, 9).unwrap();
        assert_eq!(m.indices, split.public);
        assert_eq!(m.digest, public_set_digest(&splits.train, &split.public));
        assert_eq!(m.source, "synthetic (seed 2)");
        assert_eq!(m, PublicSetManifest::build(&splits, 40, 9).unwrap());
        m.verify(&splits.train).unwrap();

        // A private sample may differ; a public one may not.
        let mut other = splits.train.clone();
        other.pixels[split.private[0] * other.features] ^= 1;
        m.verify(&other).unwrap();
        other.pixels[split.public[5] * other.features + 9] ^= 1;
        let computed = public_set_digest(&other, &m.indices);
        let e = m.verify(&other).unwrap_err();
        let msg = e.to_string();
        assert!(
            matches!(e, DataError::PublicSetMismatch { samples: 40, .. }),
            "{msg}"
        );
        assert_eq!(
            msg,
            format!(
                "public set digest mismatch: expected {}, computed {computed} over 40 samples from synthetic (seed 2)",
                m.digest
            )
        );

        // Another seed's data (same shape) is caught too.
        let foreign = synthetic::generate(3, 300, 10);
        assert!(matches!(
            m.verify(&foreign.train),
            Err(DataError::PublicSetMismatch { .. })
        ));
        // Too short to hold the indices: an error, not a panic.
        let short = splits.train.select(&[0, 1, 2]);
        let msg = m.verify(&short).unwrap_err().to_string();
        assert!(msg.contains("only 3 samples"), "{msg}");
        assert!(PublicSetManifest::build(&splits, 300, 9).is_err());
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

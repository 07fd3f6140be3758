//! The primitives of secure aggregation: X25519 agreement, HKDF, the mask
//! PRG, and authenticated encryption of key shares.
//!
//! - Agreement is X25519 through `x25519-dalek`'s bare function rather than
//!   ring: ring only has single-use ephemeral keys, and recovery from a
//!   dropout must rebuild a member's mask *secret* from Shamir shares and
//!   agree with it again.
//! - Every derived key is HKDF-SHA256 (ring) of the agreed point with the
//!   federation, the round, the two members (in a fixed order) and the
//!   purpose in its info, so keys never repeat across rounds, pairs or uses.
//! - Masks are the ChaCha20 keystream (`rand_chacha`) from a 32-byte seed,
//!   read as little-endian u32 words: fast (≈ 1 GB/s here) and
//!   indistinguishable from uniform without the seed.
//! - Key shares travel sealed with ChaCha20-Poly1305 (ring) under a key
//!   derived from the two members' encryption keys; the AAD binds the
//!   federation, round, sender and receiver. Each key seals one message, so
//!   the all-zero nonce is never reused.

use rand_chacha::ChaCha20Rng;
use rand_chacha::rand_core::{RngCore, SeedableRng};
use ring::{aead, hkdf};
use x25519_dalek::{X25519_BASEPOINT_BYTES, x25519};

use super::SecAggError;
use crate::identity::PublicKey;

const HKDF_SALT: &[u8] = b"fd/secagg/v1";

/// What a derived key is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Purpose {
    /// The seed of the pairwise mask between two members.
    PairMask,
    /// The AEAD key that seals key shares from the first to the second member.
    SealShares,
}

impl Purpose {
    fn label(self) -> &'static [u8] {
        match self {
            Purpose::PairMask => b"pair-mask",
            Purpose::SealShares => b"seal-shares",
        }
    }
}

/// An X25519 key pair; the secret is clamped by X25519 itself.
#[derive(Clone)]
pub(crate) struct DhKeyPair {
    pub secret: [u8; 32],
    pub public: [u8; 32],
}

impl DhKeyPair {
    pub fn generate(rng: &mut impl RngCore) -> Self {
        let mut secret = [0u8; 32];
        rng.fill_bytes(&mut secret);
        Self::from_secret(secret)
    }

    pub fn from_secret(secret: [u8; 32]) -> Self {
        DhKeyPair {
            secret,
            public: x25519(secret, X25519_BASEPOINT_BYTES),
        }
    }
}

struct Len(usize);

impl hkdf::KeyType for Len {
    fn len(&self) -> usize {
        self.0
    }
}

/// A key for `purpose` between `first` and `second`, from `secret`
/// (ours) and `their_public`. Refuses a low-order public key (the agreed
/// point would be all zeros and the key public).
pub(crate) fn derive_key(
    secret: &[u8; 32],
    their_public: &[u8; 32],
    federation_id: &str,
    round: u64,
    first: &PublicKey,
    second: &PublicKey,
    purpose: Purpose,
) -> Result<[u8; 32], SecAggError> {
    let shared = x25519(*secret, *their_public);
    if shared == [0u8; 32] {
        return Err(SecAggError::Malformed(
            "an X25519 public key of low order (the agreed secret would be zero)".into(),
        ));
    }
    let round = round.to_le_bytes();
    let fed_len = (federation_id.len() as u64).to_le_bytes();
    let info: [&[u8]; 7] = [
        purpose.label(),
        &fed_len,
        federation_id.as_bytes(),
        &round,
        &first.0,
        &second.0,
        b"",
    ];
    let prk = hkdf::Salt::new(hkdf::HKDF_SHA256, HKDF_SALT).extract(&shared);
    let okm = prk
        .expand(&info, Len(32))
        .map_err(|_| SecAggError::Malformed("HKDF refused the key length".into()))?;
    let mut key = [0u8; 32];
    okm.fill(&mut key)
        .map_err(|_| SecAggError::Malformed("HKDF refused the key length".into()))?;
    Ok(key)
}

/// Adds (or subtracts) the mask expanded from `seed` to `values`, mod 2³².
pub(crate) fn apply_mask(values: &mut [u32], seed: &[u8; 32], add: bool) {
    let mut rng = ChaCha20Rng::from_seed(*seed);
    let mut block = [0u8; 4096];
    for chunk in values.chunks_mut(block.len() / 4) {
        let bytes = &mut block[..chunk.len() * 4];
        rng.fill_bytes(bytes);
        for (v, word) in chunk.iter_mut().zip(bytes.chunks_exact(4)) {
            let m = u32::from_le_bytes([word[0], word[1], word[2], word[3]]);
            *v = if add {
                v.wrapping_add(m)
            } else {
                v.wrapping_sub(m)
            };
        }
    }
}

fn aad(federation_id: &str, round: u64, from: &PublicKey, to: &PublicKey) -> Vec<u8> {
    let mut aad = Vec::with_capacity(federation_id.len() + 8 + 8 + 64 + 16);
    aad.extend_from_slice(b"fd/secagg/shares/v1");
    aad.extend_from_slice(&(federation_id.len() as u64).to_le_bytes());
    aad.extend_from_slice(federation_id.as_bytes());
    aad.extend_from_slice(&round.to_le_bytes());
    aad.extend_from_slice(&from.0);
    aad.extend_from_slice(&to.0);
    aad
}

fn sealing_key(key: [u8; 32]) -> Result<aead::LessSafeKey, SecAggError> {
    aead::UnboundKey::new(&aead::CHACHA20_POLY1305, &key)
        .map(aead::LessSafeKey::new)
        .map_err(|_| SecAggError::Malformed("bad AEAD key".into()))
}

/// Seals `plaintext` from `from` to `to` under `key` (used once).
pub(crate) fn seal(
    key: [u8; 32],
    federation_id: &str,
    round: u64,
    from: &PublicKey,
    to: &PublicKey,
    plaintext: &[u8],
) -> Result<Vec<u8>, SecAggError> {
    let mut buffer = plaintext.to_vec();
    sealing_key(key)?
        .seal_in_place_append_tag(
            aead::Nonce::assume_unique_for_key([0u8; 12]),
            aead::Aad::from(aad(federation_id, round, from, to)),
            &mut buffer,
        )
        .map_err(|_| SecAggError::Malformed("sealing failed".into()))?;
    Ok(buffer)
}

/// Opens what [`seal`] produced; any change to the ciphertext, the key or
/// the bound context fails.
pub(crate) fn open(
    key: [u8; 32],
    federation_id: &str,
    round: u64,
    from: &PublicKey,
    to: &PublicKey,
    ciphertext: &[u8],
) -> Result<Vec<u8>, SecAggError> {
    let mut buffer = ciphertext.to_vec();
    let plain = sealing_key(key)?
        .open_in_place(
            aead::Nonce::assume_unique_for_key([0u8; 12]),
            aead::Aad::from(aad(federation_id, round, from, to)),
            &mut buffer,
        )
        .map_err(|_| SecAggError::Rejected {
            from: *from,
            reason: "key shares do not decrypt (wrong key, context or tampered)".into(),
        })?;
    Ok(plain.to_vec())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn both_sides_derive_the_same_key_and_contexts_separate_it() {
        let mut rng = ChaCha20Rng::seed_from_u64(3);
        let a = DhKeyPair::generate(&mut rng);
        let b = DhKeyPair::generate(&mut rng);
        let (pa, pb) = (PublicKey([1; 32]), PublicKey([2; 32]));
        let k = |s: &[u8; 32], p: &[u8; 32], round, purpose| {
            derive_key(s, p, "fed", round, &pa, &pb, purpose).unwrap()
        };
        let ab = k(&a.secret, &b.public, 1, Purpose::PairMask);
        assert_eq!(ab, k(&b.secret, &a.public, 1, Purpose::PairMask));
        assert_ne!(ab, k(&a.secret, &b.public, 2, Purpose::PairMask));
        assert_ne!(ab, k(&a.secret, &b.public, 1, Purpose::SealShares));
        assert_ne!(
            ab,
            derive_key(&a.secret, &b.public, "other", 1, &pa, &pb, Purpose::PairMask).unwrap()
        );
        // A low-order point (here 0) is refused.
        assert!(derive_key(&a.secret, &[0; 32], "fed", 1, &pa, &pb, Purpose::PairMask).is_err());
    }

    #[test]
    fn masks_cancel_and_sealed_shares_are_authenticated() {
        let mut values: Vec<u32> = (0..10_000).collect();
        let seed = [9u8; 32];
        apply_mask(&mut values, &seed, true);
        assert_ne!(values[..10], (0..10).collect::<Vec<u32>>()[..]);
        apply_mask(&mut values, &seed, false);
        assert_eq!(values, (0..10_000).collect::<Vec<u32>>());

        let (from, to) = (PublicKey([1; 32]), PublicKey([2; 32]));
        let sealed = seal([5; 32], "fed", 3, &from, &to, b"secret").unwrap();
        assert_eq!(open([5; 32], "fed", 3, &from, &to, &sealed).unwrap(), b"secret");
        assert!(open([5; 32], "fed", 4, &from, &to, &sealed).is_err());
        assert!(open([5; 32], "fed", 3, &to, &from, &sealed).is_err());
        let mut tampered = sealed.clone();
        tampered[0] ^= 1;
        assert!(open([5; 32], "fed", 3, &from, &to, &tampered).is_err());
    }
}

//! The signed [`LogitShare`]: the only learning artefact that leaves a node.
//!
//! A share carries a node's logits on one round's public subset: never
//! weights, never private data. It is signed over a canonical encoding of
//! every field except the signature, with a domain-separation prefix so a
//! signature on a share can never be replayed as a signature on anything else.
//!
//! [`LogitShare::validate`] is the single gate between the network and
//! aggregation: it checks the cheap, structural facts first (federation,
//! round, subset, shape) and then the signature, and only then decodes the
//! payload and rejects non-finite values.

use serde::{Deserialize, Serialize};

use crate::codec::canonical_bytes;
use crate::digest::Digest;
use crate::error::ProtocolError;
use crate::identity::{PublicKey, Signature, SigningKey};

const SIGNING_DOMAIN: &[u8] = b"fd/logit-share/v1\0";

/// Which public samples a share's rows refer to. Both sides derive the
/// sample indices from it (`fd-node`'s `round_subset`), so only the recipe
/// travels, not the index list.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct PublicSubset {
    /// Digest of the whole public set the subset is drawn from.
    pub public_set_digest: Digest,
    pub seed: u64,
    pub round: u64,
    /// Number of samples (rows).
    pub size: u32,
}

/// How the logits are laid out in the payload.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum PayloadEncoding {
    /// Row-major little-endian IEEE-754 f32, rows × classes values.
    F32Le,
}

impl PayloadEncoding {
    /// Payload bytes for a rows × classes matrix.
    pub fn payload_len(self, rows: u32, classes: u32) -> usize {
        match self {
            PayloadEncoding::F32Le => rows as usize * classes as usize * 4,
        }
    }

    pub fn encode(self, logits: &[f32]) -> Vec<u8> {
        match self {
            PayloadEncoding::F32Le => logits.iter().flat_map(|v| v.to_le_bytes()).collect(),
        }
    }

    /// Decodes a payload already checked to have [`Self::payload_len`] bytes.
    pub fn decode(self, payload: &[u8]) -> Result<Vec<f32>, ProtocolError> {
        match self {
            PayloadEncoding::F32Le => {
                let (chunks, rest) = payload.as_chunks::<4>();
                if !rest.is_empty() {
                    return Err(ProtocolError::ShapeMismatch {
                        field: "payload",
                        expected: "a multiple of 4 bytes".into(),
                        got: format!("{} bytes", payload.len()),
                    });
                }
                let values: Vec<f32> = chunks.iter().map(|c| f32::from_le_bytes(*c)).collect();
                if let Some(index) = values.iter().position(|v| !v.is_finite()) {
                    return Err(ProtocolError::NonFinite { index });
                }
                Ok(values)
            }
        }
    }
}

/// A node's logits on one round's public subset, signed by the node.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LogitShare {
    pub federation_id: String,
    pub round: u64,
    pub sender: PublicKey,
    pub subset: PublicSubset,
    /// Rows (= subset size).
    pub rows: u32,
    /// Columns (= classes).
    pub classes: u32,
    pub encoding: PayloadEncoding,
    pub payload: Vec<u8>,
    pub signature: Signature,
}

/// The fields a share is signed over: everything but the signature.
#[derive(Serialize)]
struct SignedFields<'a> {
    federation_id: &'a str,
    round: u64,
    sender: &'a PublicKey,
    subset: &'a PublicSubset,
    rows: u32,
    classes: u32,
    encoding: PayloadEncoding,
    payload: &'a [u8],
}

/// What a receiver expects of a share in the round it is collecting.
#[derive(Debug, Clone, PartialEq)]
pub struct ShareExpectation {
    pub federation_id: String,
    pub round: u64,
    pub subset: PublicSubset,
    pub classes: u32,
}

impl LogitShare {
    /// Encodes `logits` (rows × classes, row-major) and signs the share with `key`.
    pub fn new_signed(
        key: &SigningKey,
        federation_id: &str,
        subset: PublicSubset,
        classes: u32,
        encoding: PayloadEncoding,
        logits: &[f32],
    ) -> Result<Self, ProtocolError> {
        let expected = subset.size as usize * classes as usize;
        if logits.len() != expected {
            return Err(ProtocolError::ShapeMismatch {
                field: "logits",
                expected: format!("{} × {} = {expected} values", subset.size, classes),
                got: format!("{} values", logits.len()),
            });
        }
        let mut share = LogitShare {
            federation_id: federation_id.to_owned(),
            round: subset.round,
            sender: key.public_key(),
            subset,
            rows: subset.size,
            classes,
            encoding,
            payload: encoding.encode(logits),
            signature: Signature([0; 64]),
        };
        share.signature = key.sign(&share.signing_bytes()?);
        Ok(share)
    }

    /// The canonical bytes the signature covers.
    pub fn signing_bytes(&self) -> Result<Vec<u8>, ProtocolError> {
        let mut bytes = SIGNING_DOMAIN.to_vec();
        bytes.extend(canonical_bytes(&SignedFields {
            federation_id: &self.federation_id,
            round: self.round,
            sender: &self.sender,
            subset: &self.subset,
            rows: self.rows,
            classes: self.classes,
            encoding: self.encoding,
            payload: &self.payload,
        })?);
        Ok(bytes)
    }

    /// Checks the signature against the claimed sender's key.
    pub fn verify_signature(&self) -> Result<(), ProtocolError> {
        self.sender.verify(&self.signing_bytes()?, &self.signature)
    }

    /// The gate before aggregation: returns the decoded logits
    /// (rows × classes) only if every check passes.
    pub fn validate(&self, expect: &ShareExpectation) -> Result<Vec<f32>, ProtocolError> {
        if self.federation_id != expect.federation_id {
            return Err(ProtocolError::WrongFederation {
                expected: expect.federation_id.clone(),
                got: self.federation_id.clone(),
            });
        }
        if self.round != expect.round {
            return Err(ProtocolError::WrongRound {
                expected: expect.round,
                got: self.round,
            });
        }
        if self.subset != expect.subset {
            return Err(ProtocolError::SubsetMismatch(format!(
                "expected {:?}, got {:?}",
                expect.subset, self.subset
            )));
        }
        if self.rows != expect.subset.size || self.classes != expect.classes {
            return Err(ProtocolError::ShapeMismatch {
                field: "rows × classes",
                expected: format!("{} × {}", expect.subset.size, expect.classes),
                got: format!("{} × {}", self.rows, self.classes),
            });
        }
        let expected_len = self.encoding.payload_len(self.rows, self.classes);
        if self.payload.len() != expected_len {
            return Err(ProtocolError::ShapeMismatch {
                field: "payload",
                expected: format!("{expected_len} bytes"),
                got: format!("{} bytes", self.payload.len()),
            });
        }
        self.verify_signature()?;
        self.encoding.decode(&self.payload)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::codec::{decode, encode};
    use crate::error::RejectReason;
    use crate::message::Message;
    use proptest::prelude::*;

    fn subset(size: u32) -> PublicSubset {
        PublicSubset {
            public_set_digest: crate::digest::sha256(b"public"),
            seed: 3,
            round: 2,
            size,
        }
    }

    fn expectation(size: u32) -> ShareExpectation {
        ShareExpectation {
            federation_id: "fed".into(),
            round: 2,
            subset: subset(size),
            classes: 3,
        }
    }

    fn share(key: &SigningKey, logits: &[f32]) -> LogitShare {
        LogitShare::new_signed(key, "fed", subset(2), 3, PayloadEncoding::F32Le, logits).unwrap()
    }

    const LOGITS: [f32; 6] = [0.5, -1.0, 2.0, 3.25, 0.0, -7.5];

    #[test]
    fn valid_share_round_trips_and_validates() {
        let key = SigningKey::from_seed([7; 32]);
        let s = share(&key, &LOGITS);
        let frame = encode(&Message::Share(s.clone())).unwrap();
        let Message::Share(back) = decode(&frame).unwrap() else {
            panic!("not a share")
        };
        assert_eq!(back, s);
        assert_eq!(back.validate(&expectation(2)).unwrap(), LOGITS.to_vec());
    }

    #[test]
    fn every_flipped_payload_byte_breaks_the_signature() {
        let key = SigningKey::from_seed([7; 32]);
        let s = share(&key, &LOGITS);
        for i in 0..s.payload.len() {
            let mut t = s.clone();
            t.payload[i] ^= 0x01;
            assert_eq!(
                t.validate(&expectation(2)).unwrap_err().reason(),
                RejectReason::BadSignature,
                "byte {i}"
            );
        }
    }

    #[test]
    fn share_signed_by_another_key_is_rejected() {
        let real = SigningKey::from_seed([7; 32]);
        let forger = SigningKey::from_seed([8; 32]);
        let mut s = share(&forger, &LOGITS);
        s.sender = real.public_key();
        assert!(matches!(
            s.validate(&expectation(2)),
            Err(ProtocolError::BadSignature { sender }) if sender == real.public_key()
        ));
    }

    #[test]
    fn structural_checks_name_the_problem() {
        let key = SigningKey::from_seed([7; 32]);
        let s = share(&key, &LOGITS);
        let mut e = expectation(2);
        e.round = 3;
        assert_eq!(
            s.validate(&e).unwrap_err().reason(),
            RejectReason::WrongRound
        );
        let mut e = expectation(2);
        e.federation_id = "other".into();
        assert_eq!(
            s.validate(&e).unwrap_err().reason(),
            RejectReason::WrongFederation
        );
        let mut e = expectation(2);
        e.subset.seed = 4;
        assert_eq!(s.validate(&e).unwrap_err().reason(), RejectReason::Subset);
        let mut e = expectation(2);
        e.classes = 4;
        assert_eq!(s.validate(&e).unwrap_err().reason(), RejectReason::Shape);
        let mut t = s.clone();
        t.payload.pop();
        assert_eq!(
            t.validate(&expectation(2)).unwrap_err().reason(),
            RejectReason::Shape
        );
        assert!(matches!(
            LogitShare::new_signed(&key, "fed", subset(2), 3, PayloadEncoding::F32Le, &[1.0]),
            Err(ProtocolError::ShapeMismatch {
                field: "logits",
                ..
            })
        ));
    }

    #[test]
    fn non_finite_logits_are_rejected_even_when_signed() {
        let key = SigningKey::from_seed([7; 32]);
        let mut bad = LOGITS;
        bad[4] = f32::NAN;
        let s = share(&key, &bad);
        assert_eq!(
            s.validate(&expectation(2)).unwrap_err(),
            ProtocolError::NonFinite { index: 4 }
        );
        bad[4] = f32::INFINITY;
        assert_eq!(
            share(&key, &bad)
                .validate(&expectation(2))
                .unwrap_err()
                .reason(),
            RejectReason::NonFinite
        );
    }

    proptest! {
        #[test]
        fn encode_decode_round_trip(values in proptest::collection::vec(-1e6f32..1e6, 6), seed in any::<[u8; 32]>()) {
            let key = SigningKey::from_seed(seed);
            let s = share(&key, &values);
            let frame = encode(&Message::Share(s.clone())).unwrap();
            prop_assert_eq!(decode(&frame).unwrap(), Message::Share(s.clone()));
            prop_assert_eq!(s.validate(&expectation(2)).unwrap(), values);
        }

        #[test]
        fn decoding_arbitrary_bytes_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
            let mut frame = 1u16.to_le_bytes().to_vec();
            frame.extend(bytes);
            let _ = decode(&frame);
        }
    }
}

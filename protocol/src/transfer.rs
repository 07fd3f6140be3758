//! Moving shares too large for one frame: announce, then pull in chunks.
//!
//! # Why
//!
//! A [`LogitShare`](crate::LogitShare) grows with the public subset and the
//! number of classes: 50,000 public samples × 100 classes × f32 is 20 MB.
//! Pushing that as one request-response frame would force every receiver to
//! accept (and buffer) frames of that size from anyone who can connect, and
//! flooding it over gossip would copy it to every peer of every peer. So a
//! frame stays small ([`MAX_MESSAGE_BYTES`](crate::MAX_MESSAGE_BYTES), a few
//! MiB) and large shares travel in two steps:
//!
//! 1. **Announce.** The sender encodes its share once with
//!    [`encode_share`](crate::codec::encode_share) (bounded by
//!    [`MAX_SHARE_BYTES`], not by the frame limit), hashes the encoding with
//!    SHA-256 and publishes a small [`ShareAnnouncement`] (federation, round,
//!    sender key, digest, size) as `Message::ShareAvailable` on the
//!    federation's gossip topic. The gossip message is signed by the sender's
//!    libp2p identity, which is the same Ed25519 key as the share's `sender`,
//!    so a receiver can tell an announcement from its author from one forged
//!    by someone else.
//! 2. **Pull.** Each receiver that wants the share asks the sender directly,
//!    over request-response, for chunk `0, 1, …, chunk_count(bytes) - 1`
//!    (`Message::FetchChunk { round, digest, index }` → `Message::Chunk { index,
//!    data }`, or `Message::ChunkUnavailable { reason }` when the sender no
//!    longer holds it). Every chunk is [`CHUNK_BYTES`] long except the last,
//!    which holds the remainder; the receiver checks each chunk's index and
//!    length before appending it, so it never holds more than the announced
//!    size, and checks the SHA-256 of the whole against the announced digest
//!    before handing the bytes on. Only then are the bytes decoded
//!    ([`decode_share`](crate::codec::decode_share)) and the share validated
//!    like any pushed share (signature, federation, round, subset, shape,
//!    values).
//!
//! Shares of at most [`INLINE_SHARE_BYTES`] are still pushed whole as
//! `Message::Share`, which is one round trip and needs no gossip.
//!
//! # Limits
//!
//! | constant | value | bounds |
//! |---|---|---|
//! | [`CHUNK_BYTES`] | 1 MiB | data of one `Chunk` |
//! | [`INLINE_SHARE_BYTES`] | 1 MiB | a share pushed whole in one frame |
//! | [`MAX_SHARE_BYTES`] | 256 MiB | an encoded share, i.e. an announcement's `bytes` |
//! | [`MAX_CHUNKS`] | 256 | chunks of the largest share |
//! | [`MAX_MESSAGE_BYTES`](crate::MAX_MESSAGE_BYTES) | 4 MiB | any frame, chunk or inline share plus overhead |
//!
//! An announcement is only a pointer: the digest binds it to exactly one
//! byte string, and the signature inside the share binds that byte string to
//! its sender. A forged or tampered announcement can at worst make a receiver
//! download up to `bytes` and then throw them away on the digest check.

use serde::{Deserialize, Serialize};

use crate::digest::{Digest, sha256};
use crate::error::ProtocolError;
use crate::identity::PublicKey;

/// Size of every chunk of a pulled share except the last: 1 MiB.
pub const CHUNK_BYTES: usize = 1024 * 1024;

/// Largest encoded share accepted or produced: 256 MiB. 50,000 public samples
/// × 100 classes × f32 (20 MB) fits with room for larger subsets.
pub const MAX_SHARE_BYTES: usize = 256 * 1024 * 1024;

/// Shares whose encoding is at most this long are pushed whole in one
/// request (`Message::Share`); larger ones are announced and pulled: 1 MiB.
pub const INLINE_SHARE_BYTES: usize = 1024 * 1024;

/// Chunks of the largest share.
pub const MAX_CHUNKS: u32 = MAX_SHARE_BYTES.div_ceil(CHUNK_BYTES) as u32;

/// Number of chunks a share of `bytes` bytes is pulled in.
pub fn chunk_count(bytes: u64) -> u32 {
    bytes.div_ceil(CHUNK_BYTES as u64) as u32
}

/// "Round `round`'s share from `sender`, `bytes` long with SHA-256 `digest`,
/// can be fetched from its sender." The gossip payload of
/// `Message::ShareAvailable`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct ShareAnnouncement {
    pub federation_id: String,
    pub round: u64,
    /// The share's sender; its libp2p identity is the peer to fetch from.
    pub sender: PublicKey,
    /// SHA-256 of the encoded share ([`crate::codec::encode_share`]).
    pub digest: Digest,
    /// Length of the encoded share.
    pub bytes: u64,
}

impl ShareAnnouncement {
    /// Describes `encoded` (the output of [`crate::codec::encode_share`]).
    pub fn describe(federation_id: &str, round: u64, sender: PublicKey, encoded: &[u8]) -> Self {
        ShareAnnouncement {
            federation_id: federation_id.to_string(),
            round,
            sender,
            digest: sha256(encoded),
            bytes: encoded.len() as u64,
        }
    }

    /// The checks a receiver makes before fetching anything: the federation
    /// is its own, and the size is non-zero and at most [`MAX_SHARE_BYTES`].
    pub fn check(&self, federation_id: &str) -> Result<(), ProtocolError> {
        if self.federation_id != federation_id {
            return Err(ProtocolError::WrongFederation {
                expected: federation_id.to_string(),
                got: self.federation_id.clone(),
            });
        }
        if self.bytes > MAX_SHARE_BYTES as u64 {
            return Err(ProtocolError::TooLarge {
                size: usize::try_from(self.bytes).unwrap_or(usize::MAX),
                max: MAX_SHARE_BYTES,
            });
        }
        if self.bytes == 0 {
            return Err(ProtocolError::InvalidField {
                field: "bytes",
                reason: "an announced share cannot be empty".into(),
            });
        }
        Ok(())
    }

    /// Number of chunks to fetch.
    pub fn chunks(&self) -> u32 {
        chunk_count(self.bytes)
    }

    /// Length chunk `index` must have, or `None` past the last chunk.
    pub fn chunk_len(&self, index: u32) -> Option<usize> {
        let start = index as u64 * CHUNK_BYTES as u64;
        (start < self.bytes).then(|| (self.bytes - start).min(CHUNK_BYTES as u64) as usize)
    }

    /// Whether `encoded` is the announced byte string: its length and SHA-256.
    pub fn verify(&self, encoded: &[u8]) -> Result<(), ProtocolError> {
        if encoded.len() as u64 != self.bytes {
            return Err(ProtocolError::ShapeMismatch {
                field: "bytes",
                expected: self.bytes.to_string(),
                got: encoded.len().to_string(),
            });
        }
        let digest = sha256(encoded);
        if digest != self.digest {
            return Err(ProtocolError::InvalidField {
                field: "digest",
                reason: format!(
                    "SHA-256 of the fetched share is {}, the announcement says {}",
                    digest.to_hex(),
                    self.digest.to_hex()
                ),
            });
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn announcement(bytes: u64) -> ShareAnnouncement {
        ShareAnnouncement {
            federation_id: "f".into(),
            round: 1,
            sender: PublicKey([7; 32]),
            digest: Digest([0; 32]),
            bytes,
        }
    }

    #[test]
    fn check_refuses_other_federations_oversize_and_empty() {
        assert!(announcement(20_000_000).check("f").is_ok());
        assert!(announcement(MAX_SHARE_BYTES as u64).check("f").is_ok());
        assert!(matches!(
            announcement(10).check("g"),
            Err(ProtocolError::WrongFederation { .. })
        ));
        assert!(matches!(
            announcement(MAX_SHARE_BYTES as u64 + 1).check("f"),
            Err(ProtocolError::TooLarge { .. })
        ));
        assert!(matches!(
            announcement(0).check("f"),
            Err(ProtocolError::InvalidField { field: "bytes", .. })
        ));
    }

    #[test]
    fn chunks_cover_the_share_exactly() {
        let a = announcement(2 * CHUNK_BYTES as u64 + 5);
        assert_eq!(a.chunks(), 3);
        assert_eq!(a.chunk_len(0), Some(CHUNK_BYTES));
        assert_eq!(a.chunk_len(1), Some(CHUNK_BYTES));
        assert_eq!(a.chunk_len(2), Some(5));
        assert_eq!(a.chunk_len(3), None);
        assert_eq!(announcement(CHUNK_BYTES as u64).chunks(), 1);
        assert_eq!(chunk_count(20_000_000), 20);
        assert_eq!(chunk_count(MAX_SHARE_BYTES as u64), MAX_CHUNKS);
    }

    #[test]
    fn verify_checks_length_and_digest() {
        let data = vec![3u8; 1000];
        let a = ShareAnnouncement::describe("f", 1, PublicKey([1; 32]), &data);
        assert!(a.verify(&data).is_ok());
        assert!(matches!(
            a.verify(&data[..999]),
            Err(ProtocolError::ShapeMismatch { .. })
        ));
        let mut other = data.clone();
        other[0] = 4;
        assert!(matches!(
            a.verify(&other),
            Err(ProtocolError::InvalidField {
                field: "digest",
                ..
            })
        ));
    }
}

//! Versioned, size-limited framing of [`Message`]s with bincode 2.
//!
//! A frame is `version: u16 (little endian) || bincode(message)`. The version
//! comes first and is fixed-width so a peer speaking another version gets a
//! clear [`ProtocolError::UnsupportedVersion`] instead of a decoding error.
//! The same [`MAX_MESSAGE_BYTES`] bounds encoding and decoding, so a frame one
//! side can send is one the other side accepts; bincode's own limit keeps a
//! forged length prefix inside the frame from allocating more than that.
//!
//! Frames are small ([`MAX_MESSAGE_BYTES`]): a share larger than
//! [`INLINE_SHARE_BYTES`](crate::transfer::INLINE_SHARE_BYTES) is encoded on
//! its own with [`encode_share`] (bounded by [`MAX_SHARE_BYTES`]) and pulled
//! in chunks, see [`crate::transfer`].

use crate::error::ProtocolError;
use crate::message::Message;
use crate::share::LogitShare;
use crate::transfer::MAX_SHARE_BYTES;

/// The protocol version this build speaks.
/// 2: control messages are signed by the coordinator ([`crate::control`]),
/// `Refused` answers non-share requests.
/// 3: a [`LogitShare`] may carry signed per-row knowledge weights
/// ([`crate::share::RowWeights`]; signing domain `fd/logit-share/v2`).
/// 4: [`crate::RoundMetrics`] reports `shares_relayed`.
/// 5: secure aggregation between members (`Message::SecAgg`, with the
/// signed [`crate::secagg::SurvivorView`]).
pub const PROTOCOL_VERSION: u16 = 5;

/// Largest frame accepted or produced: 4 MiB. Room for one chunk
/// ([`CHUNK_BYTES`](crate::transfer::CHUNK_BYTES)) or one inline share
/// ([`INLINE_SHARE_BYTES`](crate::transfer::INLINE_SHARE_BYTES)) plus
/// overhead, and for a share pushed whole by a peer that predates chunking
/// (e.g. 100,000 f32 logits = 400 KB; anything up to about 1 M f32 logits).
/// Larger shares go through [`crate::transfer`].
pub const MAX_MESSAGE_BYTES: usize = 4 * 1024 * 1024;

fn config() -> impl bincode::config::Config {
    bincode::config::standard().with_limit::<MAX_MESSAGE_BYTES>()
}

/// The same encoding, bounded by [`MAX_SHARE_BYTES`]: for a share on its own
/// and for what gets signed (bincode's limit only applies when decoding).
fn share_config() -> impl bincode::config::Config {
    bincode::config::standard().with_limit::<MAX_SHARE_BYTES>()
}

/// Encodes a message into one frame.
pub fn encode(message: &Message) -> Result<Vec<u8>, ProtocolError> {
    encode_versioned(message, config(), MAX_MESSAGE_BYTES)
}

/// Decodes one frame. Rejects oversize frames, other versions and trailing bytes.
pub fn decode(frame: &[u8]) -> Result<Message, ProtocolError> {
    decode_versioned(frame, config(), MAX_MESSAGE_BYTES, "message")
}

/// Encodes a share on its own, for announce-and-pull transfer
/// ([`crate::transfer`]): `version: u16 (little endian) || bincode(share)`,
/// at most [`MAX_SHARE_BYTES`] long. Its SHA-256 is the announcement's digest.
pub fn encode_share(share: &LogitShare) -> Result<Vec<u8>, ProtocolError> {
    encode_versioned(share, share_config(), MAX_SHARE_BYTES)
}

/// Decodes what [`encode_share`] produced. Rejects more than
/// [`MAX_SHARE_BYTES`], other versions and trailing bytes. The share still
/// has to pass [`LogitShare::validate`].
pub fn decode_share(bytes: &[u8]) -> Result<LogitShare, ProtocolError> {
    decode_versioned(bytes, share_config(), MAX_SHARE_BYTES, "share")
}

/// `version || bincode(value)`, refused above `max` bytes.
fn encode_versioned<T: serde::Serialize>(
    value: &T,
    config: impl bincode::config::Config,
    max: usize,
) -> Result<Vec<u8>, ProtocolError> {
    let mut out = PROTOCOL_VERSION.to_le_bytes().to_vec();
    bincode::serde::encode_into_std_write(value, &mut out, config)
        .map_err(|e| ProtocolError::Encode(e.to_string()))?;
    if out.len() > max {
        return Err(ProtocolError::TooLarge {
            size: out.len(),
            max,
        });
    }
    Ok(out)
}

/// The inverse of [`encode_versioned`]: checks the size, the version and
/// that nothing trails the `what` (named in errors).
fn decode_versioned<T: serde::de::DeserializeOwned>(
    bytes: &[u8],
    config: impl bincode::config::Config,
    max: usize,
    what: &str,
) -> Result<T, ProtocolError> {
    if bytes.len() > max {
        return Err(ProtocolError::TooLarge {
            size: bytes.len(),
            max,
        });
    }
    let (head, body) = bytes.split_first_chunk::<2>().ok_or_else(|| {
        ProtocolError::Malformed(format!("{what} of {} bytes has no version", bytes.len()))
    })?;
    let version = u16::from_le_bytes(*head);
    if version != PROTOCOL_VERSION {
        return Err(ProtocolError::UnsupportedVersion {
            got: version,
            expected: PROTOCOL_VERSION,
        });
    }
    let (value, used): (T, usize) = bincode::serde::decode_from_slice(body, config)
        .map_err(|e| ProtocolError::Malformed(e.to_string()))?;
    if used != body.len() {
        return Err(ProtocolError::Malformed(format!(
            "{} trailing bytes after the {what}",
            body.len() - used
        )));
    }
    Ok(value)
}

/// Length of `message`'s frame as [`encode`] would produce it, without the
/// frame limit (e.g. to report what a large share would cost pushed whole).
/// Fails only if the message cannot be encoded at all.
pub fn encoded_len(message: &Message) -> Result<usize, ProtocolError> {
    let mut size = bincode::enc::write::SizeWriter::default();
    bincode::serde::encode_into_writer(message, &mut size, share_config())
        .map_err(|e| ProtocolError::Encode(e.to_string()))?;
    Ok(PROTOCOL_VERSION.to_le_bytes().len() + size.bytes_written)
}

/// [`encoded_len`] of `Message::Share(share)`, without building that message:
/// a share may be megabytes, and a round asks for its frame length on every
/// push. Serializes the share as the `Share` variant of [`Message`] would be.
pub fn share_frame_len(share: &LogitShare) -> Result<usize, ProtocolError> {
    /// `Message::Share`'s position in [`Message`] (checked by a test).
    const SHARE_VARIANT: u32 = 4;
    struct AsMessage<'a>(&'a LogitShare);
    impl serde::Serialize for AsMessage<'_> {
        fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
            s.serialize_newtype_variant("Message", SHARE_VARIANT, "Share", self.0)
        }
    }
    let mut size = bincode::enc::write::SizeWriter::default();
    bincode::serde::encode_into_writer(AsMessage(share), &mut size, share_config())
        .map_err(|e| ProtocolError::Encode(e.to_string()))?;
    Ok(PROTOCOL_VERSION.to_le_bytes().len() + size.bytes_written)
}

/// Canonical bytes of any serializable value, for signing. Uses the same
/// bincode encoding as the wire so there is one encoding to reason about
/// (with the share limit, since a signed share may exceed one frame).
pub fn canonical_bytes<T: serde::Serialize>(value: &T) -> Result<Vec<u8>, ProtocolError> {
    bincode::serde::encode_to_vec(value, share_config())
        .map_err(|e| ProtocolError::Encode(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn version_and_trailing_bytes_and_size_are_checked() {
        let frame = encode(&Message::Ack).unwrap();
        assert_eq!(decode(&frame).unwrap(), Message::Ack);

        let mut other = frame.clone();
        other[0] = 9;
        assert!(matches!(
            decode(&other),
            Err(ProtocolError::UnsupportedVersion {
                got: 9,
                expected: PROTOCOL_VERSION
            })
        ));

        let mut trailing = frame.clone();
        trailing.push(0);
        assert!(matches!(
            decode(&trailing),
            Err(ProtocolError::Malformed(_))
        ));

        // A frame of the previous version (4: no secure aggregation between
        // members) is refused as `version`, before its body is read.
        let mut previous = frame.clone();
        previous[..2].copy_from_slice(&4u16.to_le_bytes());
        let err = decode(&previous).unwrap_err();
        assert_eq!(
            err,
            ProtocolError::UnsupportedVersion {
                got: 4,
                expected: 5
            }
        );
        assert_eq!(err.reason(), crate::RejectReason::Version);
        assert!(matches!(
            decode_share(&previous),
            Err(ProtocolError::UnsupportedVersion { got: 4, .. })
        ));

        assert!(matches!(decode(&[1]), Err(ProtocolError::Malformed(_))));
        let huge = vec![0u8; MAX_MESSAGE_BYTES + 1];
        assert!(matches!(decode(&huge), Err(ProtocolError::TooLarge { .. })));
    }

    #[test]
    fn a_share_larger_than_a_frame_encodes_on_its_own() {
        use crate::digest::Digest;
        use crate::identity::SigningKey;
        use crate::share::{PayloadEncoding, PublicSubset};
        let key = SigningKey::from_seed([3; 32]);
        // 2 M f32 logits = 8 MB: too large for a frame, fine for encode_share.
        let (rows, classes) = (200_000u32, 10u32);
        let logits = vec![0.25f32; (rows * classes) as usize];
        let subset = PublicSubset {
            public_set_digest: Digest([1; 32]),
            seed: 9,
            round: 1,
            size: rows,
        };
        let share = LogitShare::new_signed(
            &key,
            "fed",
            subset,
            classes,
            10,
            PayloadEncoding::F32Le,
            &logits,
        )
        .unwrap();
        let message = Message::Share(share.clone());
        assert!(matches!(
            encode(&message),
            Err(ProtocolError::TooLarge { .. })
        ));
        let bytes = encode_share(&share).unwrap();
        assert!(bytes.len() > MAX_MESSAGE_BYTES);
        assert_eq!(encoded_len(&message).unwrap(), bytes.len() + 1);
        assert_eq!(share_frame_len(&share).unwrap(), encoded_len(&message).unwrap());
        // And for a share that fits a frame, the frame [`encode`] writes.
        let small = LogitShare::new_signed(
            &key,
            "fed",
            PublicSubset { size: 3, ..subset },
            classes,
            10,
            PayloadEncoding::F32Le,
            &logits[..30],
        )
        .unwrap();
        assert_eq!(
            share_frame_len(&small).unwrap(),
            encode(&Message::Share(small.clone())).unwrap().len()
        );
        let back = decode_share(&bytes).unwrap();
        assert_eq!(back, share);
        back.verify_signature().unwrap();

        let mut trailing = bytes.clone();
        trailing.push(0);
        assert!(matches!(
            decode_share(&trailing),
            Err(ProtocolError::Malformed(_))
        ));
        let mut version = bytes.clone();
        version[0] = 9;
        assert!(matches!(
            decode_share(&version),
            Err(ProtocolError::UnsupportedVersion { .. })
        ));
        assert!(matches!(
            decode_share(&bytes[..bytes.len() / 2]),
            Err(ProtocolError::Malformed(_))
        ));
    }
}

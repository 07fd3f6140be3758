//! Versioned, size-limited framing of [`Message`]s with bincode 2.
//!
//! A frame is `version: u16 (little endian) || bincode(message)`. The version
//! comes first and is fixed-width so a peer speaking another version gets a
//! clear [`ProtocolError::UnsupportedVersion`] instead of a decoding error.
//! The same [`MAX_MESSAGE_BYTES`] bounds encoding and decoding, so a frame one
//! side can send is one the other side accepts; bincode's own limit keeps a
//! forged length prefix inside the frame from allocating more than that.

use crate::error::ProtocolError;
use crate::message::Message;

/// The protocol version this build speaks.
pub const PROTOCOL_VERSION: u16 = 1;

/// Largest frame accepted or produced: 64 MiB, enough for a share of
/// 1.6 M f32 logits (e.g. 160,000 public samples × 10 classes).
pub const MAX_MESSAGE_BYTES: usize = 64 * 1024 * 1024;

fn config() -> impl bincode::config::Config {
    bincode::config::standard().with_limit::<MAX_MESSAGE_BYTES>()
}

/// Encodes a message into one frame.
pub fn encode(message: &Message) -> Result<Vec<u8>, ProtocolError> {
    let mut out = PROTOCOL_VERSION.to_le_bytes().to_vec();
    let body = bincode::serde::encode_to_vec(message, config())
        .map_err(|e| ProtocolError::Encode(e.to_string()))?;
    out.extend_from_slice(&body);
    if out.len() > MAX_MESSAGE_BYTES {
        return Err(ProtocolError::TooLarge {
            size: out.len(),
            max: MAX_MESSAGE_BYTES,
        });
    }
    Ok(out)
}

/// Decodes one frame. Rejects oversize frames, other versions and trailing bytes.
pub fn decode(frame: &[u8]) -> Result<Message, ProtocolError> {
    if frame.len() > MAX_MESSAGE_BYTES {
        return Err(ProtocolError::TooLarge {
            size: frame.len(),
            max: MAX_MESSAGE_BYTES,
        });
    }
    let (head, body) = frame.split_first_chunk::<2>().ok_or_else(|| {
        ProtocolError::Malformed(format!("frame of {} bytes has no version", frame.len()))
    })?;
    let version = u16::from_le_bytes(*head);
    if version != PROTOCOL_VERSION {
        return Err(ProtocolError::UnsupportedVersion {
            got: version,
            expected: PROTOCOL_VERSION,
        });
    }
    let (message, used): (Message, usize) = bincode::serde::decode_from_slice(body, config())
        .map_err(|e| ProtocolError::Malformed(e.to_string()))?;
    if used != body.len() {
        return Err(ProtocolError::Malformed(format!(
            "{} trailing bytes after the message",
            body.len() - used
        )));
    }
    Ok(message)
}

/// Canonical bytes of any serializable value, for signing. Uses the same
/// bincode configuration as the wire so there is one encoding to reason about.
pub(crate) fn canonical_bytes<T: serde::Serialize>(value: &T) -> Result<Vec<u8>, ProtocolError> {
    bincode::serde::encode_to_vec(value, config()).map_err(|e| ProtocolError::Encode(e.to_string()))
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
                expected: 1
            })
        ));

        let mut trailing = frame.clone();
        trailing.push(0);
        assert!(matches!(
            decode(&trailing),
            Err(ProtocolError::Malformed(_))
        ));

        assert!(matches!(decode(&[1]), Err(ProtocolError::Malformed(_))));
        let huge = vec![0u8; MAX_MESSAGE_BYTES + 1];
        assert!(matches!(decode(&huge), Err(ProtocolError::TooLarge { .. })));
    }
}

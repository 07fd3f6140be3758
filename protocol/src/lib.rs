//! # fd-protocol
//!
//! The wire format of an fd federation: what members say to each other and to
//! the optional coordinator, how it is encoded, signed and checked.
//!
//! This crate has no networking and no machine learning. It turns messages
//! into bytes and back, and decides whether a [`LogitShare`] may be trusted;
//! everything that moves bytes (libp2p) or makes logits (burn) lives in
//! `fd-node`. Keeping it small means the rules a member enforces can be read
//! in one place and fuzzed in isolation.
//!
//! - [`codec`]: versioned bincode 2 framing with an explicit size limit.
//! - [`identity`]: Ed25519 keys and signatures (ring).
//! - [`digest`]: SHA-256 of the public dataset.
//! - [`message`]: the messages (join, manifest, round announcement, metrics).
//! - [`control`]: the coordinator's signed control messages (rounds, done).
//! - [`share`]: the signed [`LogitShare`] and its validation.
//! - [`secagg`]: secure aggregation of shares among peers (pairwise masks,
//!   Shamir recovery of dropouts), as messages and a per-round state machine.

pub mod codec;
pub mod control;
pub mod digest;
pub mod error;
pub mod identity;
pub mod message;
pub mod secagg;
pub mod share;
pub mod transfer;

pub use codec::{MAX_MESSAGE_BYTES, PROTOCOL_VERSION, decode, decode_share, encode, encode_share};
pub use control::{Control, SignedControl};
pub use digest::Digest;
pub use error::{ProtocolError, RejectReason};
pub use identity::{PublicKey, Signature, SigningKey};
pub use message::*;
pub use share::{
    LogitShare, PayloadEncoding, PayloadEncodingName, PublicSubset, RowWeights, ShareExpectation,
};
pub use transfer::{CHUNK_BYTES, INLINE_SHARE_BYTES, MAX_SHARE_BYTES, ShareAnnouncement};

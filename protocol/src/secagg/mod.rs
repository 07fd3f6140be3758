//! Secure aggregation of shares among peers: every member learns the sum of
//! the round's contributions and nothing about any single one beyond what
//! the sum reveals.
//!
//! The protocol is SecAgg (Bonawitz et al., CCS 2017) without a server: the
//! messages a server would relay go from member to member, and every member
//! unmasks the sum itself. Per round, among the round's member list:
//!
//! 1. **Advertise** ([`KeyAdvertisement`], signed with the member's Ed25519
//!    identity): two fresh X25519 public keys (one to seal key shares, one
//!    for masks) and a SHA-256 commitment to a fresh self-mask seed. Keys are
//!    per round, so a reveal after a dropout exposes only that round.
//! 2. **Share keys** ([`EncryptedKeyShares`], ChaCha20-Poly1305 under a key
//!    agreed with the receiver): Shamir shares (threshold t) of the member's
//!    mask secret and of its self-mask seed, one to every advertised member.
//! 3. **Masked input** ([`MaskedInput`], signed): the member's vector in
//!    Z_2³² ([`encode_knowledge`]) plus the ChaCha20 mask of its self seed,
//!    plus, for every member j whose key shares it holds, the mask expanded
//!    from the X25519 agreement with j, added if the member's key sorts
//!    before j's and subtracted otherwise. It names those j (`masked_with`).
//! 4. **Reveal** ([`Reveal`], signed, bound to the digest of the agreed
//!    survivor set S): for each member of S, the revealer's share of its
//!    self seed; for each member outside S, its share of that member's mask
//!    secret. An honest member never reveals both for the same member, never
//!    a mask-secret share of a member whose masked input it accepted, never
//!    for two different survivor sets in one round, and refuses a masked
//!    input once it revealed the sender's mask secret.
//! 5. **Unmask** ([`Participant::unmask`]): Σ over S of the masked inputs,
//!    minus every survivor's self mask (rebuilt from t shares and checked
//!    against its commitment), minus the pair masks survivors share with
//!    dropped members (their mask secrets rebuilt from t shares and checked
//!    against their advertised public keys). Pair masks among survivors
//!    cancel. With fewer than t shares for any secret it refuses: the round
//!    is not aggregated (the member keeps its local student).
//!
//! Why the self mask: a member that drops after sending its input to some
//! members but not others would otherwise be unmasked individually by whoever
//! received its input and collects t shares of its mask secret. With the self
//! mask, that also needs t shares of its self seed, which honest members give
//! out only for survivors, and never both for the same member.
//!
//! Agreeing on S: the simulator's hub plays every member with one S. Between
//! processes nobody announces S: between steps 3 and 4 each member signs the
//! set of members whose input it accepted ([`SurvivorView`]) and sends it to
//! the others, and reveals only once every other member of its set sent the
//! same set ([`Participant::reveal_confirmed`]); a member that sees another
//! set, or none from one of its survivors, does not reveal and the round is
//! not aggregated. So two honest members never reveal for different sets
//! (each would need the other's confirmation of its own set), which is what
//! could expose both secrets of one member. There is no networking here:
//! `fd-node` moves these messages ([`SecAggMessage`]). It is semi-honest
//! secure against up to t − 1 colluding members (t > n/2 is enforced); a
//! malicious member can make a round fail (a wrong share fails the
//! commitment check and the round is refused), never make another member
//! accept a wrong sum.

mod crypto;
pub mod fixed;
pub mod session;
pub mod shamir;

pub use fixed::{FRACTION_BITS, KnowledgeSums, MAX_CONTRIBUTORS, encode_knowledge};
pub use session::{
    EncryptedKeyShares, KeyAdvertisement, MaskedInput, Participant, Reveal, RoundContext,
    SurvivorView, Unmasked,
};

use crate::identity::PublicKey;
use rand_chacha::ChaCha20Rng;
use rand_chacha::rand_core::SeedableRng;
use serde::{Deserialize, Serialize};

/// One secure-aggregation message between members (`Message::SecAgg`).
/// Each names its sender, which the receiver checks against the
/// authenticated peer before it looks any further.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum SecAggMessage {
    Advertise(KeyAdvertisement),
    KeyShares(EncryptedKeyShares),
    Input(MaskedInput),
    View(SurvivorView),
    Reveal(Reveal),
}

impl SecAggMessage {
    /// The member that claims to have sent it.
    pub fn sender(&self) -> &PublicKey {
        match self {
            SecAggMessage::Advertise(m) => &m.member,
            SecAggMessage::KeyShares(m) => &m.from,
            SecAggMessage::Input(m) => &m.from,
            SecAggMessage::View(m) => &m.from,
            SecAggMessage::Reveal(m) => &m.from,
        }
    }

    pub fn round(&self) -> u64 {
        match self {
            SecAggMessage::Advertise(m) => m.round,
            SecAggMessage::KeyShares(m) => m.round,
            SecAggMessage::Input(m) => m.round,
            SecAggMessage::View(m) => m.round,
            SecAggMessage::Reveal(m) => m.round,
        }
    }

    pub fn federation_id(&self) -> &str {
        match self {
            SecAggMessage::Advertise(m) => &m.federation_id,
            SecAggMessage::KeyShares(m) => &m.federation_id,
            SecAggMessage::Input(m) => &m.federation_id,
            SecAggMessage::View(m) => &m.federation_id,
            SecAggMessage::Reveal(m) => &m.federation_id,
        }
    }

    /// The step's name, for logs and errors.
    pub fn kind(&self) -> &'static str {
        match self {
            SecAggMessage::Advertise(_) => "key advertisement",
            SecAggMessage::KeyShares(_) => "key shares",
            SecAggMessage::Input(_) => "masked input",
            SecAggMessage::View(_) => "survivor view",
            SecAggMessage::Reveal(_) => "reveal",
        }
    }
}

/// A generator for a member's per-round keys and seeds, seeded from the
/// operating system (ring's `SystemRandom`). Tests and the simulator seed
/// theirs instead.
pub fn os_rng() -> ChaCha20Rng {
    use ring::rand::{SecureRandom, SystemRandom};
    let mut seed = [0u8; 32];
    SystemRandom::new()
        .fill(&mut seed)
        .expect("the operating system's random number generator failed");
    ChaCha20Rng::from_seed(seed)
}

/// Bytes a secure-aggregation message takes on the wire (bincode 2,
/// standard configuration, as every fd message; without the 2-byte version
/// prefix and the transport's framing).
pub fn wire_len<T: serde::Serialize>(message: &T) -> usize {
    bincode::serde::encode_to_vec(message, bincode::config::standard())
        .map_or(0, |bytes| bytes.len())
}

/// Why a secure-aggregation step refused.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum SecAggError {
    #[error("secure aggregation misconfigured: {0}")]
    Config(String),
    #[error("malformed secure-aggregation input: {0}")]
    Malformed(String),
    #[error("{from}: {reason}")]
    Rejected { from: PublicKey, reason: String },
    #[error("{0} is not a member of this round")]
    NotAMember(PublicKey),
    #[error("out of order: {0}")]
    OutOfOrder(&'static str),
    #[error("no masked input from survivor {0}")]
    MissingInput(PublicKey),
    #[error("{a} and {b} disagree on whether they masked with each other; the round cannot be unmasked")]
    Inconsistent { a: PublicKey, b: PublicKey },
    #[error(
        "only {have} of the {need} shares needed to rebuild the {secret} of {member}: below the threshold, the round is not aggregated"
    )]
    BelowThreshold {
        member: PublicKey,
        secret: &'static str,
        have: usize,
        need: usize,
    },
    #[error("{member} has not confirmed the survivor set: no reveal without every survivor's confirmation")]
    Unconfirmed { member: PublicKey },
    #[error(
        "{member} saw a different survivor set ({theirs} members, this member {mine}): no reveal, the round is not aggregated"
    )]
    Disagreement {
        member: PublicKey,
        theirs: usize,
        mine: usize,
    },
    #[error("the revealed shares rebuild a {secret} of {member} that does not match its advertisement")]
    BadReveal {
        member: PublicKey,
        secret: &'static str,
    },
}

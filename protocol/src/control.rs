//! The control plane: what only the coordinator may say, signed.
//!
//! A round announcement decides what a member aggregates (the member list)
//! and when (the round and its deadline); `Done` ends the federation. Both
//! travel as one [`SignedControl`]: the [`Control`] body, the coordinator's
//! public key and an Ed25519 signature over a domain-separated encoding of
//! the federation id, the body (for a round: number, deadline and the
//! SHA-256 of the member list) and the coordinator's key.
//!
//! The signature alone does not make a message trustworthy: a member pins
//! the coordinator's key from its configured address (`/p2p/<PeerId>`) and
//! checks [`SignedControl::verify`] against that key, and only for messages
//! that arrive on a connection from that same peer (`fd-node`'s `gate`).
//! The signature binds every field, so a message relayed or replayed by
//! anyone else, or altered in transit, is refused; the forward-only rule
//! (a round never goes back) is the receiver's.

use serde::{Deserialize, Serialize};

use crate::codec::canonical_bytes;
use crate::digest::{Digest, sha256};
use crate::error::ProtocolError;
use crate::identity::{PublicKey, Signature, SigningKey};
use crate::message::{Member, RoundAnnouncement};

/// Domain separation: a control signature can never be taken for a share
/// signature (`fd/logit-share/v1`) or anything else the key signs.
const CONTROL_DOMAIN: &[u8] = b"fd/control/v1\0";

/// What only the coordinator may say.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Control {
    /// Opens a round: number, deadline, the members to exchange shares with.
    Round(RoundAnnouncement),
    /// The federation finished its last round.
    Done { federation_id: String, rounds: u64 },
}

impl Control {
    pub fn federation_id(&self) -> &str {
        match self {
            Control::Round(a) => &a.federation_id,
            Control::Done { federation_id, .. } => federation_id,
        }
    }

    /// The round the message is about (`Done`: the last round).
    pub fn round(&self) -> u64 {
        match self {
            Control::Round(a) => a.round,
            Control::Done { rounds, .. } => *rounds,
        }
    }

    /// Short name for logs.
    pub fn kind(&self) -> &'static str {
        match self {
            Control::Round(_) => "round announcement",
            Control::Done { .. } => "done",
        }
    }
}

/// SHA-256 over the canonical encoding of a member list, in its order.
pub fn members_digest(members: &[Member]) -> Result<Digest, ProtocolError> {
    Ok(sha256(&canonical_bytes(&members)?))
}

/// The fields a control signature covers.
#[derive(Serialize)]
enum SignedBody {
    Round {
        round: u64,
        deadline_unix_ms: u64,
        members: Digest,
    },
    Done {
        rounds: u64,
    },
}

#[derive(Serialize)]
struct SignedFields<'a> {
    federation_id: &'a str,
    body: SignedBody,
    coordinator: &'a PublicKey,
}

/// A [`Control`] message with the coordinator's signature.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SignedControl {
    pub control: Control,
    /// The key that signed; a member compares it with the coordinator it pinned.
    pub coordinator: PublicKey,
    pub signature: Signature,
}

impl SignedControl {
    /// Signs `control` with the coordinator's `key`.
    pub fn sign(control: Control, key: &SigningKey) -> Result<Self, ProtocolError> {
        let coordinator = key.public_key();
        let signature = key.sign(&signing_bytes(&control, &coordinator)?);
        Ok(SignedControl {
            control,
            coordinator,
            signature,
        })
    }

    /// Checks that `expected` (the pinned coordinator) signed exactly this
    /// message; returns the body.
    pub fn verify(&self, expected: &PublicKey) -> Result<&Control, ProtocolError> {
        if self.coordinator != *expected {
            return Err(ProtocolError::ForgedControl(format!(
                "signed by {}, not by the coordinator {expected}",
                self.coordinator
            )));
        }
        let bytes = signing_bytes(&self.control, &self.coordinator)?;
        self.coordinator
            .verify(&bytes, &self.signature)
            .map_err(|_| {
                ProtocolError::ForgedControl(format!(
                    "the signature over the {} does not verify",
                    self.control.kind()
                ))
            })?;
        Ok(&self.control)
    }
}

/// `CONTROL_DOMAIN || bincode(federation id, body, coordinator key)`.
fn signing_bytes(control: &Control, coordinator: &PublicKey) -> Result<Vec<u8>, ProtocolError> {
    let body = match control {
        Control::Round(a) => SignedBody::Round {
            round: a.round,
            deadline_unix_ms: a.deadline_unix_ms,
            members: members_digest(&a.members)?,
        },
        Control::Done { rounds, .. } => SignedBody::Done { rounds: *rounds },
    };
    let mut bytes = CONTROL_DOMAIN.to_vec();
    bytes.extend(canonical_bytes(&SignedFields {
        federation_id: control.federation_id(),
        body,
        coordinator,
    })?);
    Ok(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn member(seed: u8) -> Member {
        Member {
            key: SigningKey::from_seed([seed; 32]).public_key(),
            name: format!("m{seed}"),
            addrs: vec![format!("/ip4/127.0.0.1/tcp/{}", 4000 + u16::from(seed))],
        }
    }

    fn round(n: u64) -> Control {
        Control::Round(RoundAnnouncement {
            federation_id: "fed".into(),
            round: n,
            deadline_unix_ms: 1_000,
            members: vec![member(1), member(2)],
        })
    }

    #[test]
    fn every_field_is_bound_by_the_signature() {
        let coordinator = SigningKey::from_seed([9; 32]);
        let pinned = coordinator.public_key();
        let signed = SignedControl::sign(round(3), &coordinator).unwrap();
        assert_eq!(signed.verify(&pinned).unwrap(), &round(3));

        let tamper = |f: &dyn Fn(&mut RoundAnnouncement)| {
            let mut s = signed.clone();
            let Control::Round(a) = &mut s.control else {
                unreachable!()
            };
            f(a);
            s.verify(&pinned).unwrap_err()
        };
        for e in [
            tamper(&|a| a.round = 4),
            tamper(&|a| a.deadline_unix_ms += 1),
            tamper(&|a| a.federation_id = "other".into()),
            tamper(&|a| {
                a.members.pop();
            }),
            tamper(&|a| a.members[0].addrs[0] = "/ip4/127.0.0.1/tcp/1".into()),
            tamper(&|a| a.members.reverse()),
        ] {
            assert_eq!(e.reason(), crate::RejectReason::ForgedAnnouncement, "{e}");
        }

        // Another key, even if it names itself honestly, is not the coordinator.
        let mallory = SigningKey::from_seed([7; 32]);
        let theirs = SignedControl::sign(round(3), &mallory).unwrap();
        assert!(theirs.verify(&mallory.public_key()).is_ok());
        assert!(theirs.verify(&pinned).is_err());
        // Nor does claiming the coordinator's key help without its secret.
        let claimed = SignedControl {
            coordinator: pinned,
            ..theirs
        };
        assert!(claimed.verify(&pinned).is_err());

        // A round's signature does not cover a Done, and vice versa.
        let done = SignedControl::sign(
            Control::Done {
                federation_id: "fed".into(),
                rounds: 3,
            },
            &coordinator,
        )
        .unwrap();
        assert!(done.verify(&pinned).is_ok());
        let swapped = SignedControl {
            control: round(3),
            ..done
        };
        assert!(swapped.verify(&pinned).is_err());
    }
}

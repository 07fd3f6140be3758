//! Where peers' shares wait for their round, and the gate they pass first.
//!
//! [`ShareInbox::offer`] is called for every share that arrives, in the
//! network task, and answers at once whether it was accepted: the sender
//! learns the reason for a rejection and the node counts it. Only accepted
//! shares are stored, already decoded, and [`ShareInbox::take_round`] is the
//! only way out of the inbox towards aggregation.
//!
//! A share is accepted only if its sender is a current member, it is for a
//! round this node has not closed yet (older rounds are replays or late) and
//! not beyond the last one, it is the first from that sender for that round,
//! and it passes [`LogitShare::validate`] against what this node itself
//! expects for that round (federation, public subset, shape, signature,
//! finite values).

use std::collections::{BTreeMap, HashMap};

use fd_protocol::{
    FederationManifest, LogitShare, Member, ProtocolError, PublicKey, PublicSubset, RejectReason,
    ShareExpectation,
};

pub struct ShareInbox {
    manifest: FederationManifest,
    members: HashMap<PublicKey, Member>,
    /// The lowest round still open.
    open_round: u64,
    /// Per round, per sender: the decoded logits and the share's sample count.
    accepted: BTreeMap<u64, BTreeMap<PublicKey, (Vec<f32>, u64)>>,
    rejected: BTreeMap<RejectReason, u64>,
    rejected_total: u64,
}

impl ShareInbox {
    pub fn new(manifest: FederationManifest) -> Self {
        ShareInbox {
            manifest,
            members: HashMap::new(),
            open_round: 1,
            accepted: BTreeMap::new(),
            rejected: BTreeMap::new(),
            rejected_total: 0,
        }
    }

    /// The public subset every member uses in `round`.
    pub fn subset(&self, round: u64) -> PublicSubset {
        subset_for(&self.manifest, round)
    }

    /// Replaces the member list (from a welcome or round announcement).
    pub fn set_members(&mut self, members: &[Member]) {
        self.members = members.iter().map(|m| (m.key, m.clone())).collect();
    }

    pub fn members(&self) -> impl Iterator<Item = &Member> {
        self.members.values()
    }

    /// Validates `share`; stores its logits if accepted.
    pub fn offer(&mut self, share: &LogitShare) -> Result<(), ProtocolError> {
        let result = self.check(share);
        match result {
            Ok(logits) => {
                self.accepted
                    .entry(share.round)
                    .or_default()
                    .insert(share.sender, (logits, share.samples));
                Ok(())
            }
            Err(e) => {
                *self.rejected.entry(e.reason()).or_default() += 1;
                self.rejected_total += 1;
                Err(e)
            }
        }
    }

    fn check(&self, share: &LogitShare) -> Result<Vec<f32>, ProtocolError> {
        if !self.members.contains_key(&share.sender) {
            return Err(ProtocolError::UnknownSender(share.sender));
        }
        self.check_round(share.round)?;
        let expect = ShareExpectation {
            federation_id: self.manifest.federation_id.clone(),
            round: share.round,
            subset: self.subset(share.round),
            classes: self.manifest.classes,
        };
        let logits = share.validate(&expect)?;
        // After the signature: a share forged in the name of a member that
        // already sent one is reported as forged, not as a duplicate.
        self.check_first(&share.sender, share.round)?;
        Ok(logits)
    }

    fn check_round(&self, round: u64) -> Result<(), ProtocolError> {
        if round < self.open_round || round > self.manifest.rounds {
            return Err(ProtocolError::WrongRound {
                expected: self.open_round,
                got: round,
            });
        }
        Ok(())
    }

    /// Whether a share from `sender` for `round` is already held.
    pub fn has_accepted(&self, sender: &PublicKey, round: u64) -> bool {
        self.accepted
            .get(&round)
            .is_some_and(|r| r.contains_key(sender))
    }

    fn check_first(&self, sender: &PublicKey, round: u64) -> Result<(), ProtocolError> {
        if self.has_accepted(sender, round) {
            return Err(ProtocolError::InvalidField {
                field: "sender",
                reason: format!("a share from {sender} for round {round} was already accepted"),
            });
        }
        Ok(())
    }

    /// Accepted shares for `round` so far.
    pub fn accepted_count(&self, round: u64) -> usize {
        self.accepted.get(&round).map_or(0, |r| r.len())
    }

    /// Closes `round` (and every earlier one) and hands its accepted logits
    /// over, each with its sender and the sample count the share declared.
    pub fn take_round(&mut self, round: u64) -> Vec<(PublicKey, Vec<f32>, u64)> {
        self.open_round = self.open_round.max(round + 1);
        let taken = self.accepted.remove(&round).unwrap_or_default();
        self.accepted.retain(|r, _| *r > round);
        taken
            .into_iter()
            .map(|(sender, (logits, samples))| (sender, logits, samples))
            .collect()
    }

    /// Counts a share refused before it could be offered (an oversize frame,
    /// an announcement that fails its checks, a pulled share that does not
    /// decode), so every rejection shows in the metrics by reason.
    pub fn count_rejection(&mut self, reason: RejectReason) {
        *self.rejected.entry(reason).or_default() += 1;
        self.rejected_total += 1;
    }

    /// Whether a share from `sender` for `round` could still be accepted:
    /// checked before pulling a large share, so nothing is fetched in vain.
    pub fn precheck(&self, sender: &PublicKey, round: u64) -> Result<(), ProtocolError> {
        if !self.members.contains_key(sender) {
            return Err(ProtocolError::UnknownSender(*sender));
        }
        self.check_round(round)?;
        self.check_first(sender, round)
    }

    /// Rejections so far, by reason.
    pub fn rejections(&self) -> Vec<(String, u64)> {
        self.rejected
            .iter()
            .map(|(r, n)| (r.as_str().to_string(), *n))
            .collect()
    }

    pub fn rejected_total(&self) -> u64 {
        self.rejected_total
    }
}

/// The public subset of `round` under `manifest`.
pub fn subset_for(manifest: &FederationManifest, round: u64) -> PublicSubset {
    PublicSubset {
        public_set_digest: manifest.public_set.digest,
        seed: manifest.seed,
        round,
        size: manifest.subset_size,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use fd_protocol::{PayloadEncoding, PublicSetDescriptor, SigningKey, digest::sha256};

    fn manifest() -> FederationManifest {
        FederationManifest {
            federation_id: "fed".into(),
            public_set: PublicSetDescriptor {
                source: "test".into(),
                samples: 10,
                digest: sha256(b"public"),
            },
            classes: 2,
            rounds: 3,
            subset_size: 2,
            seed: 1,
        }
    }

    fn member(key: &SigningKey) -> Member {
        Member {
            key: key.public_key(),
            name: "m".into(),
            addrs: vec![],
        }
    }

    fn share(key: &SigningKey, round: u64, logits: &[f32]) -> LogitShare {
        LogitShare::new_signed(
            key,
            "fed",
            subset_for(&manifest(), round),
            2,
            // From the key, so the test can tell whose count take_round hands over.
            u64::from(key.public_key().0[0]),
            PayloadEncoding::F32Le,
            logits,
        )
        .unwrap()
    }

    #[test]
    fn only_valid_member_shares_reach_take_round() {
        let alice = SigningKey::from_seed([1; 32]);
        let bob = SigningKey::from_seed([2; 32]);
        let mallory = SigningKey::from_seed([3; 32]);
        let mut inbox = ShareInbox::new(manifest());
        inbox.set_members(&[member(&alice), member(&bob)]);

        let good = share(&bob, 1, &[1.0, 2.0, 3.0, 4.0]);
        let mut flipped = good.clone();
        flipped.payload[5] ^= 0x40;
        let mut forged = share(&mallory, 1, &[9.0; 4]);
        forged.sender = alice.public_key();
        let stranger = share(&mallory, 1, &[9.0; 4]);

        assert_eq!(
            inbox.offer(&flipped).unwrap_err().reason(),
            RejectReason::BadSignature
        );
        assert_eq!(
            inbox.offer(&forged).unwrap_err().reason(),
            RejectReason::BadSignature
        );
        assert_eq!(
            inbox.offer(&stranger).unwrap_err().reason(),
            RejectReason::UnknownSender
        );
        inbox.offer(&good).unwrap();
        assert_eq!(
            inbox.offer(&good).unwrap_err().reason(),
            RejectReason::InvalidField
        );
        inbox.offer(&share(&bob, 2, &[0.0; 4])).unwrap();
        assert_eq!(inbox.accepted_count(1), 1);

        let taken = inbox.take_round(1);
        assert_eq!(
            taken,
            vec![(
                bob.public_key(),
                vec![1.0, 2.0, 3.0, 4.0],
                u64::from(bob.public_key().0[0])
            )]
        );
        // Round 1 is closed: a replay is refused; round 2 is still waiting.
        assert_eq!(
            inbox.offer(&good).unwrap_err().reason(),
            RejectReason::WrongRound
        );
        assert_eq!(inbox.accepted_count(2), 1);
        assert_eq!(
            inbox
                .offer(&share(&alice, 4, &[0.0; 4]))
                .unwrap_err()
                .reason(),
            RejectReason::WrongRound
        );
        assert_eq!(inbox.rejected_total(), 6);
        assert!(
            inbox
                .rejections()
                .contains(&("bad_signature".to_string(), 2))
        );
    }
}

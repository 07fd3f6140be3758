//! Where peers' shares wait for their round, and the gate they pass first.
//!
//! [`ShareInbox::offer`] is called for every share that arrives, in the
//! network task, and answers at once whether it was accepted: the sender
//! learns the reason for a rejection and the node counts it. Only accepted
//! shares are stored, already decoded, and [`ShareInbox::take_round`] is the
//! only way out of the inbox towards aggregation.
//!
//! A share is accepted only if its sender is a current member, it is for a
//! round this node has not closed yet (older rounds are replays or late)
//! and that is open already (announced, plus [`ShareInbox::set_window`]
//! rounds for clock skew; later ones are refused as `future_round`, so
//! nothing can be planted ahead), it is the first from that sender for that
//! round, and it passes [`LogitShare::validate`] against what this node
//! itself expects for that round (federation, public subset, shape,
//! signature, finite values).
//!
//! The checks are split so the expensive one can run elsewhere:
//! [`ShareInbox::check_sender_and_round`] (a few lookups) under the lock, [`LogitShare::validate`] (signature, payload decoding)
//! outside it, then [`ShareInbox::accept`] re-checks what may have changed
//! meanwhile and stores the logits.

use std::collections::{BTreeMap, HashMap};

use fd_protocol::{
    FederationManifest, LogitShare, Member, ProtocolError, PublicKey, PublicSubset, RejectReason,
    ShareExpectation,
};

use crate::knowledge::SharedKnowledge;

pub struct ShareInbox {
    manifest: FederationManifest,
    members: HashMap<PublicKey, Member>,
    /// The lowest round still open.
    open_round: u64,
    /// The latest round announced (by the coordinator or the schedule).
    announced: u64,
    /// Rounds beyond `announced` whose shares are accepted anyway.
    window: u64,
    /// Per round, per sender: the decoded logits, sample count and row weights.
    accepted: BTreeMap<u64, BTreeMap<PublicKey, SharedKnowledge>>,
    rejected: BTreeMap<RejectReason, u64>,
    rejected_total: u64,
}

impl ShareInbox {
    pub fn new(manifest: FederationManifest) -> Self {
        ShareInbox {
            manifest,
            members: HashMap::new(),
            open_round: 1,
            announced: 0,
            window: 0,
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

    /// Opens `round` (and every earlier one) for shares: called when the
    /// round is announced, before this member's own round starts.
    pub fn announce(&mut self, round: u64) {
        self.announced = self.announced.max(round);
    }

    /// Accept shares for up to `rounds` rounds beyond the latest announced
    /// one (members whose clocks run ahead); 0 by default.
    pub fn set_window(&mut self, rounds: u64) {
        self.window = rounds;
    }

    /// Validates `share` and stores its logits if accepted, all under the
    /// caller's lock (the in-memory network and tests; the network path
    /// validates outside the lock, see the module doc).
    pub fn offer(&mut self, share: &LogitShare) -> Result<(), ProtocolError> {
        let result = self
            .check_sender_and_round(&share.sender, share.round)
            .and_then(|()| share.validate(&self.expectation(share.round)));
        match result {
            Ok(logits) => self.accept(share, logits),
            Err(e) => Err(self.refuse(e)),
        }
    }

    /// What a share of `round` must match.
    pub fn expectation(&self, round: u64) -> ShareExpectation {
        ShareExpectation {
            federation_id: self.manifest.federation_id.clone(),
            round,
            subset: self.subset(round),
            classes: self.manifest.classes,
        }
    }

    /// Stores `logits`, the result of validating `share`, unless the round
    /// closed or another share from the same sender got in meanwhile.
    pub fn accept(&mut self, share: &LogitShare, logits: Vec<f32>) -> Result<(), ProtocolError> {
        // After the signature: a share forged in the name of a member that
        // already sent one is reported as forged, not as a duplicate.
        if let Err(e) = self
            .check_round(share.round)
            .and_then(|()| self.check_first(&share.sender, share.round))
        {
            return Err(self.refuse(e));
        }
        self.accepted
            .entry(share.round)
            .or_default()
            .insert(share.sender, SharedKnowledge::of_share(share, logits));
        Ok(())
    }

    /// Counts `e` as a rejection and hands it back.
    pub fn refuse(&mut self, e: ProtocolError) -> ProtocolError {
        self.count_rejection(e.reason());
        e
    }

    fn check_round(&self, round: u64) -> Result<(), ProtocolError> {
        if round < self.open_round || round > self.manifest.rounds {
            return Err(ProtocolError::WrongRound {
                expected: self.open_round,
                got: round,
            });
        }
        let open = self.announced.max(self.open_round);
        if round > open + self.window {
            return Err(ProtocolError::FutureRound { open, got: round });
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

    /// Closes `round` (and every earlier one) and hands its accepted
    /// knowledge over (logits, declared sample count, row weights), each
    /// with its sender, in the order of the senders' keys.
    pub fn take_round(&mut self, round: u64) -> Vec<(PublicKey, SharedKnowledge)> {
        self.open_round = self.open_round.max(round + 1);
        let taken = self.accepted.remove(&round).unwrap_or_default();
        self.accepted.retain(|r, _| *r > round);
        taken.into_iter().collect()
    }

    /// Counts a share refused before it could be offered (an oversize frame,
    /// an announcement that fails its checks, a pulled share that does not
    /// decode), so every rejection shows in the metrics by reason.
    pub fn count_rejection(&mut self, reason: RejectReason) {
        *self.rejected.entry(reason).or_default() += 1;
        self.rejected_total += 1;
    }

    /// The checks before the signature: `sender` is a member and `round`
    /// is open. Lookups only, so they run under the lock and nobody gets
    /// signature work done for a share of a stranger or of another round.
    /// The duplicate check comes after the signature (see [`Self::accept`]).
    /// Does not count a rejection.
    pub fn check_sender_and_round(
        &self,
        sender: &PublicKey,
        round: u64,
    ) -> Result<(), ProtocolError> {
        if !self.members.contains_key(sender) {
            return Err(ProtocolError::UnknownSender(*sender));
        }
        self.check_round(round)
    }

    /// Whether a share from `sender` for `round` could still be accepted,
    /// checked before pulling a large share, so nothing is fetched in vain.
    /// Does not count a rejection.
    pub fn precheck(&self, sender: &PublicKey, round: u64) -> Result<(), ProtocolError> {
        self.check_sender_and_round(sender, round)?;
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

/// A small federation for the tests of the gates (`inbox`, `secure`).
#[cfg(test)]
pub(crate) mod test_support {
    use fd_protocol::{FederationManifest, Member, PublicSetDescriptor, SigningKey, digest::sha256};

    /// Federation `fed`: 2 classes, 3 rounds, 2 public rows per round.
    pub fn manifest() -> FederationManifest {
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

    pub fn member(key: &SigningKey) -> Member {
        Member {
            key: key.public_key(),
            name: "m".into(),
            addrs: vec![],
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use fd_protocol::{PayloadEncoding, SigningKey};

    use super::test_support::{manifest, member};

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
        // Nothing is announced yet: round 1 is open, round 2 is not.
        assert_eq!(
            inbox
                .offer(&share(&bob, 2, &[0.0; 4]))
                .unwrap_err()
                .reason(),
            RejectReason::FutureRound
        );
        inbox.announce(2);

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
                SharedKnowledge::new(
                    vec![1.0, 2.0, 3.0, 4.0],
                    u64::from(bob.public_key().0[0]),
                    None
                )
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
        // Round 3 is planted before it is announced, unless the window allows it.
        assert_eq!(
            inbox
                .offer(&share(&alice, 3, &[0.0; 4]))
                .unwrap_err()
                .reason(),
            RejectReason::FutureRound
        );
        inbox.set_window(1);
        inbox.offer(&share(&alice, 3, &[0.0; 4])).unwrap();
        assert_eq!(inbox.rejected_total(), 8);
        assert!(
            inbox
                .rejections()
                .contains(&("bad_signature".to_string(), 2))
        );
    }
}

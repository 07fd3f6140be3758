//! Secure aggregation between `fd-node` processes: the protocol of
//! [`fd_protocol::secagg`] carried over libp2p.
//!
//! Design: two halves that meet in a [`SecureMailbox`].
//! - **Inbound** (the inbound server, [`crate::runtime::serve_inbound`]):
//!   every `Message::SecAgg` is checked with lookups only before it is kept
//!   — the authenticated peer must be the member the message names, a
//!   member of the round, for this federation and an open round (the share
//!   inbox's own check), key shares addressed to this member — and kept in
//!   one slot per (round, step, sender). A retry of the same message is
//!   acknowledged; a second, different one is equivocation and refused. So
//!   a member holds at most five messages per member and open round, and a
//!   flood costs a comparison, never a signature check. Signatures and
//!   ciphertexts are checked by the round's [`Participant`], on a blocking
//!   thread.
//! - **The round** ([`SecureRound::run`], called through
//!   `ShareTransport::secure_sum` once the member has its knowledge): the
//!   five steps of the protocol, each sent to the round's other members
//!   (every send retried by an owned task until the step's deadline, so a
//!   peer a moment behind still gets it) and each waiting until every peer
//!   that is still in the protocol has answered, or until the step's
//!   deadline:
//!   1. key advertisements, until the round's share deadline (members
//!      finish training at different times; a member that never advertises
//!      is left out of the round's masks altogether);
//!   2. key shares, 3. masked inputs, 4. survivor views, 5. reveals: each
//!      waits at most `phase_timeout_secs` more, since only members that are
//!      already in the protocol take part.
//!
//!   Then the member unmasks the sum itself. Any refusal — below the
//!   threshold, members that saw different survivors, a reveal that fails
//!   its commitment — ends the round without a teacher: the member keeps
//!   its local student, as below quorum.
//!
//! Why survivor views: without a server nobody announces the survivor set,
//! and two members revealing for different sets could expose both secrets
//! of one member (see [`fd_protocol::secagg`]); a member reveals only for
//! the set every one of its survivors confirmed.
//!
//! What a member learns: the masked inputs (uniform without the masks), the
//! survivor sets, and the sum. What it costs: see docs/performance.md
//! ("Secure aggregation cost").

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context as _, anyhow};
use fd_net::{self as net, Client, request_with_retry};
use fd_protocol::secagg::{
    EncryptedKeyShares, KeyAdvertisement, KnowledgeSums, MaskedInput, Participant, Reveal,
    RoundContext, SecAggError, SecAggMessage, SurvivorView, os_rng, wire_len,
};
use fd_protocol::{Member, Message, ProtocolError, PublicKey, RejectReason, SigningKey};
use libp2p::PeerId;
use tokio::sync::watch;
use tokio::task::JoinSet;
use tokio::time::Instant;

pub use crate::config::SecureAggregationConfig;
use crate::round::{RoundPlan, SecureSum, SharedInbox};

/// The messages of one round, one slot per step and sender.
#[derive(Default)]
struct RoundMail {
    advertisements: BTreeMap<PublicKey, KeyAdvertisement>,
    key_shares: BTreeMap<PublicKey, EncryptedKeyShares>,
    inputs: BTreeMap<PublicKey, MaskedInput>,
    views: BTreeMap<PublicKey, SurvivorView>,
    reveals: BTreeMap<PublicKey, Reveal>,
    /// Bytes of the messages kept.
    bytes: u64,
}

/// Puts `value` in `slot` unless a different one is there.
fn keep<T: PartialEq + Clone>(
    slot: &mut BTreeMap<PublicKey, T>,
    sender: PublicKey,
    value: &T,
    kind: &'static str,
    round: u64,
) -> Result<bool, ProtocolError> {
    match slot.get(&sender) {
        Some(known) if known == value => Ok(false),
        Some(_) => Err(ProtocolError::InvalidField {
            field: "secagg",
            reason: format!("a second, different {kind} from {sender} for round {round}"),
        }),
        None => {
            slot.insert(sender, value.clone());
            Ok(true)
        }
    }
}

/// Where checked secure-aggregation messages wait for the round that
/// needs them (see the module note).
pub struct SecureMailbox {
    me: PublicKey,
    federation_id: String,
    inbox: Arc<SharedInbox>,
    enabled: AtomicBool,
    rounds: Mutex<BTreeMap<u64, RoundMail>>,
    /// Bumped whenever a message is kept.
    arrived: watch::Sender<u64>,
}

impl SecureMailbox {
    pub fn new(me: PublicKey, federation_id: &str, inbox: Arc<SharedInbox>) -> Arc<Self> {
        Arc::new(SecureMailbox {
            me,
            federation_id: federation_id.to_string(),
            inbox,
            enabled: AtomicBool::new(false),
            rounds: Mutex::new(BTreeMap::new()),
            arrived: watch::channel(0).0,
        })
    }

    /// This member runs secure aggregation; until then every message is
    /// refused as `unexpected`.
    pub fn enable(&self) {
        self.enabled.store(true, Ordering::Relaxed);
    }

    /// Checks `message` from `peer` and keeps it (see the module note).
    /// Lookups and a comparison only: no signature work for anybody.
    pub fn offer(&self, peer: &PeerId, message: SecAggMessage) -> Result<(), ProtocolError> {
        if !self.enabled.load(Ordering::Relaxed) {
            return Err(ProtocolError::Unexpected("SecAgg"));
        }
        let sender = *message.sender();
        if net::peer_id_of(&sender).ok().as_ref() != Some(peer) {
            return Err(ProtocolError::NotSender {
                named: sender.to_string(),
                peer: peer.to_string(),
            });
        }
        if message.federation_id() != self.federation_id {
            return Err(ProtocolError::WrongFederation {
                expected: self.federation_id.clone(),
                got: message.federation_id().chars().take(64).collect(),
            });
        }
        let round = message.round();
        self.inbox.lock().check_sender_and_round(&sender, round)?;
        let bytes = wire_len(&message) as u64;
        let mut rounds = self.rounds.lock().unwrap();
        let mail = rounds.entry(round).or_default();
        let kind = message.kind();
        let new = match &message {
            SecAggMessage::Advertise(m) => keep(&mut mail.advertisements, sender, m, kind, round)?,
            SecAggMessage::KeyShares(m) => {
                if m.to != self.me {
                    return Err(ProtocolError::InvalidField {
                        field: "to",
                        reason: format!("key shares addressed to {}, not to this member", m.to),
                    });
                }
                keep(&mut mail.key_shares, sender, m, kind, round)?
            }
            SecAggMessage::Input(m) => keep(&mut mail.inputs, sender, m, kind, round)?,
            SecAggMessage::View(m) => keep(&mut mail.views, sender, m, kind, round)?,
            SecAggMessage::Reveal(m) => keep(&mut mail.reveals, sender, m, kind, round)?,
        };
        if new {
            mail.bytes += bytes;
            drop(rounds);
            self.arrived.send_modify(|n| *n += 1);
        }
        Ok(())
    }

    /// Reads `round`'s messages.
    fn read<T>(&self, round: u64, f: impl FnOnce(&RoundMail) -> T) -> T {
        let mut rounds = self.rounds.lock().unwrap();
        f(rounds.entry(round).or_default())
    }

    /// Waits until `done` holds for `round`'s messages or `deadline`
    /// passes (the caller then works with what arrived).
    async fn wait_until(&self, round: u64, deadline: Instant, done: impl Fn(&RoundMail) -> bool) {
        let mut arrived = self.arrived.subscribe();
        while !self.read(round, &done) {
            // Deadline, or the mailbox is gone.
            if !matches!(tokio::time::timeout_at(deadline, arrived.changed()).await, Ok(Ok(()))) {
                return;
            }
        }
    }

    /// Forgets rounds up to `round` (finished).
    fn finish(&self, round: u64) {
        self.rounds.lock().unwrap().retain(|r, _| *r > round);
    }
}

/// Which rejection code a participant's refusal counts under.
fn reason_of(e: &SecAggError) -> RejectReason {
    match e {
        SecAggError::NotAMember(_) => RejectReason::UnknownSender,
        SecAggError::Rejected { reason, .. } if reason.contains("signature") => {
            RejectReason::BadSignature
        }
        _ => RejectReason::InvalidField,
    }
}

/// Sends `message` to `peer` until it is acknowledged, refused for good,
/// or `until` passes. A peer that has not opened the round yet
/// (`future_round`, `unknown_sender`) or cannot be reached is tried again.
async fn deliver(client: Client, peer: Member, message: SecAggMessage, until: Instant) {
    let kind = message.kind();
    let round = message.round();
    let Ok(peer_id) = client.add_member(&peer).await else {
        return;
    };
    let request = Message::SecAgg(message);
    let mut pause = Duration::from_millis(100);
    loop {
        let retry = match request_with_retry(&client, peer_id, request.clone(), 2).await {
            Ok(Message::Ack) => return,
            Ok(Message::Refused { code, .. })
                if code == RejectReason::FutureRound.as_str()
                    || code == RejectReason::UnknownSender.as_str() =>
            {
                true
            }
            Ok(Message::Refused { code, reason }) => {
                tracing::warn!(peer = %peer.name, round, kind, code, "secure aggregation message refused: {reason}");
                return;
            }
            Ok(other) => {
                tracing::warn!(peer = %peer.name, round, kind, "unexpected answer {}", other.kind());
                return;
            }
            Err(e) => {
                tracing::debug!(peer = %peer.name, round, kind, "not delivered yet: {e:#}");
                true
            }
        };
        let at = Instant::now() + pause;
        if !retry || at >= until {
            tracing::debug!(peer = %peer.name, round, kind, "gave up delivering");
            return;
        }
        tokio::time::sleep_until(at).await;
        pause = (pause * 2).min(Duration::from_secs(1));
    }
}

/// Runs `f` on the participant on a blocking thread (signature checks,
/// mask expansion), handing the participant back.
async fn on_participant<T: Send + 'static>(
    participant: Participant,
    f: impl FnOnce(&mut Participant) -> T + Send + 'static,
) -> anyhow::Result<(Participant, T)> {
    tokio::task::spawn_blocking(move || {
        let mut participant = participant;
        let out = f(&mut participant);
        (participant, out)
    })
    .await
    .context("secure-aggregation step panicked")
}

/// One member's secure-aggregation round over libp2p.
pub struct SecureRound<'a> {
    pub client: &'a Client,
    pub mailbox: &'a SecureMailbox,
    pub config: &'a SecureAggregationConfig,
    /// Where deliveries run; they outlive the round until their deadline,
    /// so a slower member still gets this member's reveal.
    pub sends: &'a Mutex<JoinSet<()>>,
    /// Classes of the federation's task (the words' layout).
    pub classes: usize,
}

impl SecureRound<'_> {
    /// Sends `message` to each of `to` (owned tasks, retried until `until`);
    /// returns the bytes put on the wire.
    fn send(&self, to: &[&Member], message: SecAggMessage, until: Instant) -> u64 {
        let bytes = wire_len(&message) as u64;
        let mut sends = self.sends.lock().unwrap();
        while sends.try_join_next().is_some() {}
        for peer in to {
            sends.spawn(deliver(self.client.clone(), (*peer).clone(), message.clone(), until));
        }
        bytes * to.len() as u64
    }

    /// Logs and counts a message the participant refused.
    fn refused(&self, round: u64, kind: &'static str, from: &PublicKey, e: &SecAggError) {
        let reason = reason_of(e);
        self.mailbox.inbox.lock().count_rejection(reason);
        tracing::warn!(round, kind, %from, reason = reason.as_str(), "secure aggregation message refused: {e}");
    }

    /// The protocol for `plan.round` with this member's `encoded` knowledge.
    pub async fn run(
        &self,
        plan: &RoundPlan,
        key: &SigningKey,
        encoded: Vec<u32>,
    ) -> anyhow::Result<SecureSum> {
        let round = plan.round;
        let result = self.steps(plan, key, encoded).await;
        self.mailbox.finish(round);
        result
    }

    async fn steps(
        &self,
        plan: &RoundPlan,
        key: &SigningKey,
        encoded: Vec<u32>,
    ) -> anyhow::Result<SecureSum> {
        let round = plan.round;
        let me = key.public_key();
        let peers: BTreeMap<PublicKey, &Member> = plan.targets.iter().map(|m| (m.key, m)).collect();
        let mut members: Vec<PublicKey> = peers.keys().copied().collect();
        members.push(me);
        let threshold = self
            .config
            .threshold
            .unwrap_or_else(|| RoundContext::minimum_threshold(members.len()));
        let ctx = RoundContext::new(&self.mailbox.federation_id, round, &members, threshold)?;
        let phase = Duration::from_secs(self.config.phase_timeout_secs);
        // Deliveries are worth retrying until the last step could still use them.
        let last_use = |from: Instant| from + 4 * phase;
        let to = |keys: &mut dyn Iterator<Item = &PublicKey>| -> Vec<&Member> {
            keys.filter_map(|k| peers.get(k).copied()).collect()
        };
        let mut sent = 0u64;

        // 1. Advertise; wait for every member's advertisement until the
        // round's deadline (at least one step's time).
        let (mut participant, advertisement) = {
            let mut rng = os_rng();
            Participant::new(ctx, key, &mut rng)?
        };
        let now = Instant::now();
        let deadline = plan.deadline.map_or(now + phase, |d| d.max(now + phase));
        sent += self.send(&to(&mut peers.keys()), SecAggMessage::Advertise(advertisement), last_use(deadline));
        // Only the round's members count: a member of the federation that is
        // not in this round must not end the wait early.
        self.mailbox
            .wait_until(round, deadline, |m| {
                peers.keys().all(|k| m.advertisements.contains_key(k))
            })
            .await;
        let advertisements: Vec<KeyAdvertisement> =
            self.mailbox.read(round, |m| m.advertisements.values().cloned().collect());
        let (p, (refused, shares)) = on_participant(participant, move |p| {
            let refused: Vec<(PublicKey, SecAggError)> = advertisements
                .into_iter()
                .filter_map(|a| {
                    let from = a.member;
                    p.accept_advertisement(a).err().map(|e| (from, e))
                })
                .collect();
            (refused, p.key_shares(&mut os_rng()))
        })
        .await?;
        participant = p;
        for (from, e) in &refused {
            self.refused(round, "key advertisement", from, e);
        }
        let shares = shares.context("too few members advertised keys")?;

        // 2. Key shares to every advertised member; wait for theirs.
        let expected_shares: BTreeSet<PublicKey> = shares.iter().map(|s| s.to).collect();
        let step_end = Instant::now() + phase;
        for s in shares {
            let peer = to(&mut std::iter::once(&s.to));
            sent += self.send(&peer, SecAggMessage::KeyShares(s), last_use(step_end));
        }
        self.mailbox
            .wait_until(round, step_end, |m| {
                expected_shares.iter().all(|k| m.key_shares.contains_key(k))
            })
            .await;
        let key_shares: Vec<EncryptedKeyShares> =
            self.mailbox.read(round, |m| m.key_shares.values().cloned().collect());
        let (p, (refused, input)) = on_participant(participant, move |p| {
            let refused: Vec<(PublicKey, SecAggError)> = key_shares
                .iter()
                .filter_map(|s| p.accept_key_shares(s).err().map(|e| (s.from, e)))
                .collect();
            (refused, p.masked_input(&encoded))
        })
        .await?;
        participant = p;
        for (from, e) in &refused {
            self.refused(round, "key shares", from, e);
        }
        let input = input?;
        // The members this member masked with: the only inputs it can use.
        let masked_with: BTreeSet<PublicKey> = input.masked_with.iter().copied().collect();
        let words = input.values.len();

        // 3. Masked input to every member it masked with; wait for theirs.
        let step_end = Instant::now() + phase;
        sent += self.send(
            &to(&mut masked_with.iter()),
            SecAggMessage::Input(input.clone()),
            last_use(step_end),
        );
        self.mailbox
            .wait_until(round, step_end, |m| masked_with.iter().all(|k| m.inputs.contains_key(k)))
            .await;
        let inputs: Vec<MaskedInput> = self.mailbox.read(round, |m| {
            m.inputs
                .values()
                .filter(|i| masked_with.contains(&i.from))
                .cloned()
                .collect()
        });
        let (p, (refused, view, accepted)) = on_participant(participant, move |p| {
            let mut refused = Vec::new();
            let mut accepted = vec![input];
            for i in inputs {
                let check = if i.values.len() != words {
                    Err(SecAggError::Malformed(format!(
                        "masked input of {} words, this round has {words}",
                        i.values.len()
                    )))
                } else if !i.masked_with.contains(&me) {
                    Err(SecAggError::Inconsistent { a: i.from, b: me })
                } else {
                    p.accept_masked_input(&i)
                };
                match check {
                    Ok(()) => accepted.push(i),
                    Err(e) => refused.push((i.from, e)),
                }
            }
            (refused, p.survivor_view(), accepted)
        })
        .await?;
        participant = p;
        for (from, e) in &refused {
            self.refused(round, "masked input", from, e);
        }
        let view = view?;
        let survivors = view.survivors.clone();
        let others: Vec<PublicKey> = survivors.iter().copied().filter(|k| *k != me).collect();

        // 4. Survivor view to the survivors; wait for theirs.
        let step_end = Instant::now() + phase;
        sent += self.send(&to(&mut others.iter()), SecAggMessage::View(view), last_use(step_end));
        self.mailbox
            .wait_until(round, step_end, |m| others.iter().all(|k| m.views.contains_key(k)))
            .await;
        let views: Vec<SurvivorView> = self.mailbox.read(round, |m| {
            others.iter().filter_map(|k| m.views.get(k).cloned()).collect()
        });
        let (p, (refused, reveal)) = on_participant(participant, move |p| {
            let refused: Vec<(PublicKey, SecAggError)> = views
                .iter()
                .filter_map(|v| p.accept_view(v).err().map(|e| (v.from, e)))
                .collect();
            (refused, p.reveal_confirmed())
        })
        .await?;
        participant = p;
        for (from, e) in &refused {
            self.refused(round, "survivor view", from, e);
        }
        let (survivors, reveal) = reveal?;

        // 5. Reveal to the survivors; wait for theirs, then unmask.
        let step_end = Instant::now() + phase;
        sent += self.send(&to(&mut others.iter()), SecAggMessage::Reveal(reveal.clone()), last_use(step_end));
        self.mailbox
            .wait_until(round, step_end, |m| others.iter().all(|k| m.reveals.contains_key(k)))
            .await;
        let mut reveals: Vec<Reveal> = self.mailbox.read(round, |m| {
            others.iter().filter_map(|k| m.reveals.get(k).cloned()).collect()
        });
        reveals.push(reveal);
        let received = self.mailbox.read(round, |m| m.bytes);
        let contributors = survivors.len();
        let (_, unmasked) = on_participant(participant, move |p| {
            p.unmask(&survivors, &accepted, &reveals)
        })
        .await?;
        let unmasked = unmasked.map_err(|e| anyhow!(e))?;
        for e in &unmasked.refused {
            if let SecAggError::Rejected { from, .. } = e {
                self.refused(round, "reveal", from, e);
            }
        }
        let sums = KnowledgeSums::decode(&unmasked.sum, self.classes)?;
        Ok(SecureSum {
            sums,
            contributors,
            bytes_sent: sent,
            bytes_received: received,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::inbox::test_support::{manifest, member};
    use rand_chacha::ChaCha20Rng;
    use rand_chacha::rand_core::SeedableRng;

    fn peer(key: &SigningKey) -> PeerId {
        net::peer_id_of(&key.public_key()).unwrap()
    }

    /// Every way a member or an outsider could get a message into another
    /// member's round is refused with its reason, before any signature work;
    /// a retry of the same message is acknowledged, a changed one refused.
    #[test]
    fn the_mailbox_keeps_only_one_message_per_step_from_the_member_that_sent_it() {
        let (me, alice, bob, mallory) = (
            SigningKey::from_seed([1; 32]),
            SigningKey::from_seed([2; 32]),
            SigningKey::from_seed([3; 32]),
            SigningKey::from_seed([4; 32]),
        );
        let inbox = SharedInbox::new(manifest());
        inbox.set_members(&[member(&me), member(&alice), member(&bob)]);
        let mailbox = SecureMailbox::new(me.public_key(), "fed", inbox.clone());
        let members = [me.public_key(), alice.public_key(), bob.public_key()];
        let ctx = RoundContext::new("fed", 1, &members, 2).unwrap();
        let mut rng = ChaCha20Rng::seed_from_u64(7);
        let (mut alices, advert) = Participant::new(ctx.clone(), &alice, &mut rng).unwrap();
        let message = SecAggMessage::Advertise(advert.clone());
        let reason = |r: Result<(), ProtocolError>| r.unwrap_err().reason();

        // Not running secure aggregation: refused.
        assert_eq!(reason(mailbox.offer(&peer(&alice), message.clone())), RejectReason::Unexpected);
        mailbox.enable();
        // Bob relays (or forges) Alice's advertisement: not its sender.
        assert_eq!(reason(mailbox.offer(&peer(&bob), message.clone())), RejectReason::NotSender);
        // A stranger's, correctly signed for itself.
        let strangers = RoundContext::new("fed", 1, &[me.public_key(), mallory.public_key()], 2).unwrap();
        let (_, own) = Participant::new(strangers, &mallory, &mut rng).unwrap();
        assert_eq!(
            reason(mailbox.offer(&peer(&mallory), SecAggMessage::Advertise(own))),
            RejectReason::UnknownSender
        );
        // Another federation, a round not announced yet.
        let mut other = advert.clone();
        other.federation_id = "other".into();
        assert_eq!(
            reason(mailbox.offer(&peer(&alice), SecAggMessage::Advertise(other))),
            RejectReason::WrongFederation
        );
        let mut later = advert.clone();
        later.round = 2;
        assert_eq!(
            reason(mailbox.offer(&peer(&alice), SecAggMessage::Advertise(later))),
            RejectReason::FutureRound
        );
        // Alice's own: kept; the same again: acknowledged; a different one: refused.
        mailbox.offer(&peer(&alice), message.clone()).unwrap();
        mailbox.offer(&peer(&alice), message).unwrap();
        let mut changed = advert.clone();
        changed.mask_key[0] ^= 1;
        assert_eq!(
            reason(mailbox.offer(&peer(&alice), SecAggMessage::Advertise(changed))),
            RejectReason::InvalidField
        );
        assert_eq!(mailbox.read(1, |m| m.advertisements.len()), 1);
        assert_eq!(mailbox.read(1, |m| m.advertisements[&alice.public_key()].clone()), advert);

        // Key shares Alice addressed to Bob do not belong in this mailbox.
        let (_, bobs) = Participant::new(ctx.clone(), &bob, &mut rng).unwrap();
        let (_, mine) = Participant::new(ctx, &me, &mut rng).unwrap();
        alices.accept_advertisement(bobs).unwrap();
        alices.accept_advertisement(mine).unwrap();
        let shares = alices.key_shares(&mut rng).unwrap();
        let for_bob = shares.iter().find(|s| s.to == bob.public_key()).unwrap().clone();
        let for_me = shares.iter().find(|s| s.to == me.public_key()).unwrap().clone();
        assert_eq!(
            reason(mailbox.offer(&peer(&alice), SecAggMessage::KeyShares(for_bob))),
            RejectReason::InvalidField
        );
        mailbox.offer(&peer(&alice), SecAggMessage::KeyShares(for_me)).unwrap();

        // A finished round is forgotten.
        mailbox.finish(1);
        assert_eq!(mailbox.read(1, |m| m.advertisements.len()), 0);
    }

    #[test]
    fn the_config_refuses_a_minority_threshold_and_oversized_inputs() {
        let bad = SecureAggregationConfig {
            enabled: true,
            threshold: Some(1),
            ..Default::default()
        };
        assert_eq!(bad.validate().unwrap_err().0, "secure_aggregation.threshold");
        let bad = SecureAggregationConfig {
            enabled: true,
            phase_timeout_secs: 0,
            ..Default::default()
        };
        assert_eq!(bad.validate().unwrap_err().0, "secure_aggregation.phase_timeout_secs");
        let on = SecureAggregationConfig {
            enabled: true,
            ..Default::default()
        };
        on.check_input_size(5_000, 10).unwrap();
        let e = on.check_input_size(200_000, 10).unwrap_err().to_string();
        assert!(e.contains("federation.subset_size"), "{e}");
    }
}

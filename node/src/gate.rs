//! Who may steer a member: the gate for control messages, and the bounded
//! pool where every signature of an inbound message is checked.
//!
//! # Design
//!
//! A round announcement decides what a member aggregates (its member list)
//! and when (round number, deadline); `Done` ends the federation for it. So
//! only the coordinator the member was configured with may send them, and
//! [`ControlGate::admit`] checks, cheapest first:
//!
//! 1. the connection's peer is the coordinator's PeerId, pinned from the
//!    configured address (`not_coordinator` otherwise: no signature work is
//!    spent on anyone else);
//! 2. the message is signed by that PeerId's key over every field
//!    ([`fd_protocol::control`]; `forged_announcement`);
//! 3. it is for this federation (`wrong_federation`) and for a round that
//!    exists (`wrong_round`);
//! 4. rounds only move forward: an announcement older than the latest one,
//!    or the same round without a later deadline, is a replay
//!    (`stale_announcement`). The coordinator re-announces an open round
//!    with a fresh deadline after a restart, which passes.
//!
//! In a members-only federation the announced member list is also cut down
//! to the configured one, so even the coordinator cannot add a stranger.
//! Without a coordinator there is no gate: the member list comes from the
//! config and the clock from the schedule, and every control message is
//! refused (`not_coordinator`).
//!
//! What an admitted message does (replace the inbox's members, open the
//! round for shares, wake the round loop) runs under the gate's lock, so two
//! announcements verified at the same time take effect in round order.
//!
//! Signature checks and payload decoding are CPU work an attacker can ask
//! for at will; [`VerifyPool`] runs them on tokio's blocking threads, at
//! most `threads` at a time, so neither the swarm task nor the tokio workers
//! that answer peers ever run them, and a flood queues instead of spreading.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};

use fd_protocol::{Control, Member, ProtocolError, PublicKey, RoundAnnouncement, SignedControl};
use libp2p::PeerId;
use tokio::sync::Semaphore;

/// Runs verification work on at most `threads` blocking threads at a time.
#[derive(Clone, Debug)]
pub struct VerifyPool {
    permits: Arc<Semaphore>,
}

impl VerifyPool {
    pub fn new(threads: usize) -> Self {
        VerifyPool {
            permits: Arc::new(Semaphore::new(threads.max(1))),
        }
    }

    /// One thread per core, at most 4: verification of a round's shares is
    /// milliseconds, more threads only let a flood take more of the machine.
    pub fn for_this_machine() -> Self {
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        VerifyPool::new(cores.min(4))
    }

    /// Runs `work` on a blocking thread once a slot is free.
    pub async fn run<T: Send + 'static>(&self, work: impl FnOnce() -> T + Send + 'static) -> T {
        let _permit = self
            .permits
            .clone()
            .acquire_owned()
            .await
            .expect("the verification semaphore is never closed");
        match tokio::task::spawn_blocking(work).await {
            Ok(value) => value,
            Err(e) => std::panic::resume_unwind(e.into_panic()),
        }
    }
}

impl Default for VerifyPool {
    fn default() -> Self {
        VerifyPool::for_this_machine()
    }
}

/// A control message that passed the gate.
#[derive(Debug, Clone, PartialEq)]
pub enum Admitted {
    /// A round to run; its member list already filtered to the configured members.
    Round(RoundAnnouncement),
    /// The federation is over.
    Done { rounds: u64 },
}

/// The latest announcement admitted: rounds only move forward from it.
#[derive(Debug, Clone, Copy)]
struct Latest {
    round: u64,
    deadline_unix_ms: u64,
}

/// Admits control messages from the pinned coordinator only (see the module doc).
#[derive(Debug)]
pub struct ControlGate {
    federation_id: String,
    coordinator: PeerId,
    coordinator_key: PublicKey,
    /// The federation's last round.
    rounds: u64,
    /// Members-only federations: the configured member keys.
    listed: Option<HashSet<PublicKey>>,
    latest: Mutex<Option<Latest>>,
}

impl ControlGate {
    /// A gate for the coordinator `coordinator` (an Ed25519 PeerId, which
    /// embeds the key its messages must be signed with).
    pub fn new(
        federation_id: &str,
        coordinator: PeerId,
        rounds: u64,
        listed: Option<Vec<PublicKey>>,
    ) -> anyhow::Result<Self> {
        let coordinator_key = fd_net::membership::key_of_peer(&coordinator).map_err(|e| {
            anyhow::anyhow!("field `coordinator`: the PeerId {coordinator} cannot pin a key: {e}")
        })?;
        Ok(ControlGate {
            federation_id: federation_id.to_string(),
            coordinator,
            coordinator_key,
            rounds,
            listed: listed.map(|keys| keys.into_iter().collect()),
            latest: Mutex::new(None),
        })
    }

    /// Step 1: the cheap check, before any signature work.
    pub fn check_sender(&self, peer: &PeerId) -> Result<(), ProtocolError> {
        if *peer != self.coordinator {
            return Err(ProtocolError::NotCoordinator {
                peer: peer.to_string(),
            });
        }
        Ok(())
    }

    /// Checks `signed`, received from `peer`; if it is admitted, runs
    /// `apply` with it before any later message can be admitted.
    pub fn admit(
        &self,
        peer: &PeerId,
        signed: &SignedControl,
        apply: impl FnOnce(Admitted),
    ) -> Result<(), ProtocolError> {
        self.check_sender(peer)?;
        let control = signed.verify(&self.coordinator_key)?;
        if control.federation_id() != self.federation_id {
            return Err(ProtocolError::WrongFederation {
                expected: self.federation_id.clone(),
                got: control.federation_id().to_string(),
            });
        }
        let mut latest = self.latest.lock().unwrap_or_else(|e| e.into_inner());
        match control {
            Control::Round(announcement) => {
                let round = announcement.round;
                if round == 0 || round > self.rounds {
                    return Err(ProtocolError::WrongRound {
                        expected: latest.map_or(1, |l| l.round + 1),
                        got: round,
                    });
                }
                if let Some(l) = *latest
                    && (round < l.round
                        || (round == l.round
                            && announcement.deadline_unix_ms <= l.deadline_unix_ms))
                {
                    return Err(ProtocolError::StaleAnnouncement {
                        kind: control.kind(),
                        latest: l.round,
                        got: round,
                    });
                }
                *latest = Some(Latest {
                    round,
                    deadline_unix_ms: announcement.deadline_unix_ms,
                });
                let mut admitted = announcement.clone();
                admitted.members = self.filter_members(&announcement.members);
                apply(Admitted::Round(admitted));
            }
            Control::Done { rounds, .. } => {
                if *rounds != self.rounds {
                    return Err(ProtocolError::WrongRound {
                        expected: self.rounds,
                        got: *rounds,
                    });
                }
                apply(Admitted::Done { rounds: *rounds });
            }
        }
        Ok(())
    }

    /// The announced members that the config lists (all of them when it
    /// lists none), each key once.
    pub fn filter_members(&self, members: &[Member]) -> Vec<Member> {
        let mut seen = HashSet::new();
        members
            .iter()
            .filter(|m| self.listed.as_ref().is_none_or(|l| l.contains(&m.key)))
            .filter(|m| seen.insert(m.key))
            .cloned()
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use fd_protocol::{RejectReason, SigningKey};

    fn member(seed: u8) -> Member {
        Member {
            key: SigningKey::from_seed([seed; 32]).public_key(),
            name: format!("m{seed}"),
            addrs: vec![],
        }
    }

    fn announce(
        key: &SigningKey,
        round: u64,
        deadline: u64,
        members: Vec<Member>,
    ) -> SignedControl {
        SignedControl::sign(
            Control::Round(RoundAnnouncement {
                federation_id: "fed".into(),
                round,
                deadline_unix_ms: deadline,
                members,
            }),
            key,
        )
        .unwrap()
    }

    #[test]
    fn only_the_pinned_coordinator_moves_rounds_forward() {
        let coordinator = SigningKey::from_seed([100; 32]);
        let coordinator_peer = fd_net::peer_id_of(&coordinator.public_key()).unwrap();
        let mallory = SigningKey::from_seed([66; 32]);
        let mallory_peer = fd_net::peer_id_of(&mallory.public_key()).unwrap();
        let listed = vec![member(1).key, member(2).key];
        let gate = ControlGate::new("fed", coordinator_peer, 5, Some(listed)).unwrap();
        let mut admitted = Vec::new();
        let mut admit = |peer: &PeerId, s: &SignedControl| {
            gate.admit(peer, s, |a| admitted.push(a))
                .map_err(|e| e.reason())
        };

        let all = vec![member(1), member(2)];
        let genuine = announce(&coordinator, 2, 1_000, all.clone());
        // Anyone else, even relaying the coordinator's own signed message.
        assert_eq!(
            admit(&mallory_peer, &genuine),
            Err(RejectReason::NotCoordinator)
        );
        // Signed by someone else but arriving from the coordinator's peer.
        let forged = announce(&mallory, 2, 1_000, all.clone());
        assert_eq!(
            admit(&coordinator_peer, &forged),
            Err(RejectReason::ForgedAnnouncement)
        );
        let mut altered = genuine.clone();
        if let Control::Round(a) = &mut altered.control {
            a.members.pop();
        }
        assert_eq!(
            admit(&coordinator_peer, &altered),
            Err(RejectReason::ForgedAnnouncement)
        );
        let beyond = announce(&coordinator, 6, 1_000, all.clone());
        assert_eq!(
            admit(&coordinator_peer, &beyond),
            Err(RejectReason::WrongRound)
        );

        assert_eq!(admit(&coordinator_peer, &genuine), Ok(()));
        // Replayed, or older, or the same round without a later deadline.
        assert_eq!(
            admit(&coordinator_peer, &genuine),
            Err(RejectReason::StaleAnnouncement)
        );
        let older = announce(&coordinator, 1, 5_000, all.clone());
        assert_eq!(
            admit(&coordinator_peer, &older),
            Err(RejectReason::StaleAnnouncement)
        );
        // A restarted coordinator re-announces the open round with a fresh deadline.
        let again = announce(&coordinator, 2, 2_000, all.clone());
        assert_eq!(admit(&coordinator_peer, &again), Ok(()));
        // Even the coordinator cannot add a member the config does not list.
        let with_stranger = announce(
            &coordinator,
            3,
            3_000,
            vec![member(1), member(9), member(2), member(1)],
        );
        assert_eq!(admit(&coordinator_peer, &with_stranger), Ok(()));

        let done = |key: &SigningKey, rounds| {
            SignedControl::sign(
                Control::Done {
                    federation_id: "fed".into(),
                    rounds,
                },
                key,
            )
            .unwrap()
        };
        assert_eq!(
            admit(&mallory_peer, &done(&coordinator, 5)),
            Err(RejectReason::NotCoordinator)
        );
        assert_eq!(
            admit(&coordinator_peer, &done(&mallory, 5)),
            Err(RejectReason::ForgedAnnouncement)
        );
        assert_eq!(
            admit(&coordinator_peer, &done(&coordinator, 4)),
            Err(RejectReason::WrongRound)
        );
        assert_eq!(admit(&coordinator_peer, &done(&coordinator, 5)), Ok(()));

        let rounds: Vec<(u64, u64, usize)> = admitted
            .iter()
            .filter_map(|a| match a {
                Admitted::Round(r) => Some((r.round, r.deadline_unix_ms, r.members.len())),
                Admitted::Done { .. } => None,
            })
            .collect();
        assert_eq!(rounds, vec![(2, 1_000, 2), (2, 2_000, 2), (3, 3_000, 2)]);
        assert_eq!(admitted.last(), Some(&Admitted::Done { rounds: 5 }));
    }
}

//! Secure aggregation in the simulator: every member runs its own
//! [`Participant`] of `fd_protocol::secagg`, and the hub carries their
//! messages.
//!
//! The hub is the simulator's carrier for the protocol's messages, the way
//! [`crate::memnet`] carries plain shares: each member of a round hands its
//! encoded knowledge in ([`SecureHub::submit`], called through
//! `ShareTransport::secure_sum` by `fd-node`'s round engine); when the
//! round's last active member has, the hub plays the four steps among their
//! participants (advertise, share keys, masked inputs, reveal), every
//! member unmasks the sum itself, and each gets its own result and the bytes
//! its messages took on the wire. Nothing is shortcut: the sums the members
//! distil come out of the same masks and Shamir recovery as they would
//! between processes.
//!
//! Members that the scenario drops out of a round never submit and are not
//! in the round's member list (the round clock announces who is in).
//! `dropout_after_key_shares` drops members in the middle of the protocol,
//! after their key shares went out and before their masked input: the
//! survivors recover the dropped members' pair masks from Shamir shares,
//! and the dropped members keep their local students. The survivor set is
//! the one the round clock would announce: every member whose input went
//! out (all inputs reach everyone in memory).
//!
//! The leakage audit: the curious member sees only masked inputs, which
//! are uniform without the masks (tested in the protocol crate), and the
//! sum. Its best estimate of any one other member is therefore the one it
//! makes from the sum of the others (the sum minus its own input), the same
//! for every member; that is what the hub notes for it.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use anyhow::{Context as _, anyhow};
use fd_node::round::SecureSum;
use fd_protocol::SigningKey;
use fd_protocol::secagg::{
    KnowledgeSums, MaskedInput, Participant, Reveal, RoundContext, wire_len,
};
use rand_chacha::ChaCha20Rng;
use rand::Rng as _;
use rand_chacha::rand_core::SeedableRng;
use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use crate::audit::{Eavesdropper, estimate};

/// The experiment's `[secure_aggregation]` table.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SecureAggregationConfig {
    /// Aggregate by secure aggregation (fd over the memory network).
    #[serde(default)]
    pub enabled: bool,
    /// Shamir threshold: how many members must reveal to unmask. Default:
    /// the smallest majority of each round's members. Must be a majority.
    #[serde(default)]
    pub threshold: Option<usize>,
    /// Probability that a member of the round stops after sharing its keys
    /// and never sends its masked input: its pair masks are in the others'
    /// inputs and must be recovered from the Shamir shares (it keeps its
    /// local student that round). Drawn per (seed, round, member).
    #[serde(default)]
    pub dropout_after_key_shares: f64,
}

/// One member's result of a round.
type MemberResult = Result<SecureSum, String>;

struct Round {
    round: u64,
    active: Vec<usize>,
    submitted: BTreeMap<usize, (SigningKey, Vec<u32>)>,
    results: BTreeMap<usize, MemberResult>,
}

/// The carrier of one simulated federation's secure-aggregation messages.
pub struct SecureHub {
    federation: String,
    seed: u64,
    threshold: Option<usize>,
    dropout: f64,
    classes: usize,
    spy: Option<Arc<Eavesdropper>>,
    state: Mutex<Round>,
    finished: watch::Sender<u64>,
}

impl SecureHub {
    pub fn new(
        federation: &str,
        seed: u64,
        config: &SecureAggregationConfig,
        classes: usize,
        spy: Option<Arc<Eavesdropper>>,
    ) -> Arc<Self> {
        Arc::new(SecureHub {
            federation: federation.to_string(),
            seed,
            threshold: config.threshold,
            dropout: config.dropout_after_key_shares,
            classes,
            spy,
            state: Mutex::new(Round {
                round: 0,
                active: Vec::new(),
                submitted: BTreeMap::new(),
                results: BTreeMap::new(),
            }),
            finished: watch::channel(0).0,
        })
    }

    /// Opens `round` for the members in `active` (sorted indices).
    pub fn start_round(&self, round: u64, active: Vec<usize>) {
        let mut state = self.state.lock().unwrap();
        *state = Round {
            round,
            active,
            submitted: BTreeMap::new(),
            results: BTreeMap::new(),
        };
    }

    /// Member `index`'s input for `round`; resolves with its result once
    /// every active member has submitted.
    pub async fn submit(
        &self,
        index: usize,
        round: u64,
        key: &SigningKey,
        encoded: Vec<u32>,
    ) -> anyhow::Result<SecureSum> {
        let complete = {
            let mut state = self.state.lock().unwrap();
            anyhow::ensure!(state.round == round, "round {round} is not open at the hub");
            anyhow::ensure!(
                state.active.binary_search(&index).is_ok(),
                "member {index} is not in round {round}"
            );
            state.submitted.insert(index, (key.clone(), encoded));
            state.submitted.len() == state.active.len()
        };
        if complete {
            let submitted = std::mem::take(&mut self.state.lock().unwrap().submitted);
            let results = self.play(round, submitted);
            self.state.lock().unwrap().results = results;
            self.finished.send_replace(round);
        }
        let mut finished = self.finished.subscribe();
        finished
            .wait_for(|done| *done >= round)
            .await
            .context("the secure-aggregation hub closed")?;
        let state = self.state.lock().unwrap();
        state
            .results
            .get(&index)
            .cloned()
            .ok_or_else(|| anyhow!("no result for member {index} in round {round}"))?
            .map_err(|e| anyhow!(e))
    }

    /// The protocol among the submitted members, every message delivered.
    fn play(
        &self,
        round: u64,
        submitted: BTreeMap<usize, (SigningKey, Vec<u32>)>,
    ) -> BTreeMap<usize, MemberResult> {
        match self.try_play(round, &submitted) {
            Ok(results) => results,
            Err(e) => submitted
                .keys()
                .map(|&i| (i, Err(format!("{e:#}"))))
                .collect(),
        }
    }

    fn try_play(
        &self,
        round: u64,
        submitted: &BTreeMap<usize, (SigningKey, Vec<u32>)>,
    ) -> anyhow::Result<BTreeMap<usize, MemberResult>> {
        let indices: Vec<usize> = submitted.keys().copied().collect();
        let keys: Vec<fd_protocol::PublicKey> =
            submitted.values().map(|(k, _)| k.public_key()).collect();
        let n = keys.len();
        let threshold = self
            .threshold
            .unwrap_or_else(|| RoundContext::minimum_threshold(n));
        let ctx = RoundContext::new(&self.federation, round, &keys, threshold)?;
        let mut rng = ChaCha20Rng::seed_from_u64(
            self.seed ^ round.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ 0x5ec_a66,
        );
        let mut sent = vec![0u64; n];
        let mut received = vec![0u64; n];
        // Everything member `from` sends to all the others.
        let broadcast = |sent: &mut [u64], received: &mut [u64], from: usize, bytes: usize| {
            sent[from] += (bytes * (n - 1)) as u64;
            for (j, r) in received.iter_mut().enumerate() {
                if j != from {
                    *r += bytes as u64;
                }
            }
        };
        let mut participants = Vec::with_capacity(n);
        let mut advertisements = Vec::with_capacity(n);
        for (k, (key, _)) in submitted.values().enumerate() {
            let (p, a) = Participant::new(ctx.clone(), key, &mut rng)?;
            broadcast(&mut sent, &mut received, k, wire_len(&a));
            participants.push(p);
            advertisements.push(a);
        }
        for p in participants.iter_mut() {
            for a in &advertisements {
                p.accept_advertisement(a.clone())?;
            }
        }
        let mut sealed = Vec::new();
        for (k, p) in participants.iter_mut().enumerate() {
            for m in p.key_shares(&mut rng)? {
                let bytes = wire_len(&m) as u64;
                sent[k] += bytes;
                let to = keys
                    .iter()
                    .position(|k| *k == m.to)
                    .ok_or_else(|| anyhow!("key shares for {}, not in the round", m.to))?;
                received[to] += bytes;
                sealed.push((to, m));
            }
        }
        for (to, m) in &sealed {
            participants[*to].accept_key_shares(m)?;
        }
        let dropped: Vec<bool> = indices
            .iter()
            .map(|&i| {
                self.dropout > 0.0
                    && crate::scenario::stream(self.seed, "secagg-dropout", round, i as u64)
                        .random_bool(self.dropout.min(1.0))
            })
            .collect();
        let mut inputs: Vec<MaskedInput> = Vec::with_capacity(n);
        for (k, (p, (_, encoded))) in participants.iter_mut().zip(submitted.values()).enumerate() {
            if dropped[k] {
                continue;
            }
            let input = p.masked_input(encoded)?;
            broadcast(&mut sent, &mut received, k, wire_len(&input));
            inputs.push(input);
        }
        let survivors: Vec<fd_protocol::PublicKey> = inputs.iter().map(|i| i.from).collect();
        let mut reveals: Vec<Reveal> = Vec::with_capacity(n);
        for (k, p) in participants.iter_mut().enumerate() {
            if dropped[k] {
                continue;
            }
            for input in &inputs {
                p.accept_masked_input(input)?;
            }
            let reveal = p.reveal(&survivors)?;
            broadcast(&mut sent, &mut received, k, wire_len(&reveal));
            reveals.push(reveal);
        }
        let mut results = BTreeMap::new();
        for (k, p) in participants.iter().enumerate() {
            if dropped[k] {
                results.insert(
                    indices[k],
                    Err("dropped out after sharing its keys (simulated)".to_string()),
                );
                continue;
            }
            let unmasked = p.unmask(&survivors, &inputs, &reveals);
            if let (Some(spy), Ok(u)) = (&self.spy, &unmasked)
                && indices[k] == spy.curious
                && let Ok(sum) = KnowledgeSums::decode(&u.sum, self.classes)
            {
                let own = &submitted[&indices[k]].1;
                note_guess_from_sum(spy, round, own, &sum, indices.iter().copied());
            }
            let result = unmasked
                .map_err(anyhow::Error::from)
                .and_then(|u| Ok(KnowledgeSums::decode(&u.sum, self.classes)?))
                .map(|sums| SecureSum {
                    sums,
                    contributors: survivors.len(),
                    bytes_sent: sent[k],
                    bytes_received: received[k],
                })
                .map_err(|e| format!("{e:#}"));
            results.insert(indices[k], result);
        }
        Ok(results)
    }
}

/// What the curious member notes under secure aggregation, wherever the
/// sum came from (the hub, or libp2p): one guess from the others'
/// knowledge — the round's unmasked `sum` minus its own encoded input
/// `own` — the same for each member of `members` but itself.
pub fn note_guess_from_sum(
    spy: &Eavesdropper,
    round: u64,
    own: &[u32],
    sum: &KnowledgeSums,
    members: impl Iterator<Item = usize>,
) {
    let classes = spy.classes;
    let Ok(own) = KnowledgeSums::decode(own, classes) else {
        return;
    };
    // Exact: both are multiples of 2⁻²⁰ below 2¹², and sum ≥ own.
    let mut others = sum.clone();
    for (s, o) in others.weight.iter_mut().zip(&own.weight) {
        *s -= o;
    }
    for (s, o) in others.weighted_probabilities.iter_mut().zip(&own.weighted_probabilities) {
        *s -= o;
    }
    let max_weight = others.weight.iter().copied().fold(0.0, f64::max);
    if max_weight <= 0.0 {
        return;
    }
    let mut logits = Vec::with_capacity(others.rows * classes);
    let mut weights = Vec::with_capacity(others.rows);
    for (r, w) in others.weight.iter().enumerate() {
        weights.push((w / max_weight) as f32);
        for c in 0..classes {
            let q = if *w > 0.0 {
                others.weighted_probabilities[r * classes + c] / w
            } else {
                1.0 / classes as f64
            };
            logits.push(q.max(1e-12).ln() as f32);
        }
    }
    let guess = estimate(spy.estimator, &logits, classes, Some(&weights));
    for j in members.filter(|&j| j != spy.curious) {
        spy.note(round, j, guess.clone());
    }
}

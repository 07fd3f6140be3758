//! One round of a member, whatever carries the shares.
//!
//! [`RoundEngine::run_round`] is the only implementation of a federated
//! round: train on private data, predict on the round's public subset, sign
//! the share and push it to the round's targets, wait for the peers' shares
//! (all expected ones, or until the round closes), aggregate them into the
//! teacher, distil, evaluate. `fd-node` drives it over libp2p
//! ([`crate::runtime`]); `fd-sim` drives it over libp2p on 127.0.0.1 or over
//! an in-memory network. Only the [`ShareTransport`] differs, so a result
//! from the simulator is a result of the code that runs in production.
//!
//! The learning steps run in `spawn_blocking` (optionally behind a semaphore
//! that bounds how many members compute at once), so a slow student never
//! stalls the network task that answers peers.

use std::future::Future;
use std::sync::{Arc, Mutex, MutexGuard};

use anyhow::Context as _;
use fd_protocol::secagg::{KnowledgeSums, encode_knowledge};
use fd_protocol::{
    FederationManifest, LogitShare, Member, PayloadEncoding, ProtocolError, RoundMetrics,
    SigningKey,
};
use tokio::sync::{Notify, Semaphore};
use tokio::time::Instant;

use crate::gate::VerifyPool;
use crate::inbox::{ShareInbox, subset_for};
use crate::knowledge::SharedKnowledge;
use crate::member::LocalMember;
use fd_net::Traffic;

/// A member's [`ShareInbox`], shared between whatever receives shares (a
/// network task, or the in-memory network) and the round that consumes them.
pub struct SharedInbox {
    inbox: Mutex<ShareInbox>,
    arrived: Notify,
    /// Seconds spent validating and decoding offered shares, by round.
    verify_seconds: Mutex<std::collections::BTreeMap<u64, f64>>,
}

impl SharedInbox {
    pub fn new(manifest: FederationManifest) -> Arc<Self> {
        Arc::new(SharedInbox {
            inbox: Mutex::new(ShareInbox::new(manifest)),
            arrived: Notify::new(),
            verify_seconds: Mutex::new(Default::default()),
        })
    }

    /// Validates and stores `share` (see [`ShareInbox::offer`]); wakes a waiting round.
    pub fn offer(&self, share: &LogitShare) -> Result<(), ProtocolError> {
        let start = std::time::Instant::now();
        let verdict = self.lock().offer(share);
        self.add_verify_time(share.round, start);
        if verdict.is_ok() {
            self.arrived.notify_waiters();
        }
        verdict
    }

    /// [`Self::offer`] for shares from the network: the cheap checks under
    /// the lock, the signature and payload in `pool` (never on the calling
    /// task's thread, never holding the lock), then the store.
    pub async fn offer_verified_in(
        self: &Arc<Self>,
        share: LogitShare,
        pool: &VerifyPool,
    ) -> Result<(), ProtocolError> {
        let expect = {
            let mut inbox = self.lock();
            if let Err(e) = inbox.check_sender_and_round(&share.sender, share.round) {
                return Err(inbox.refuse(e));
            }
            inbox.expectation(share.round)
        };
        let (share, validated, start) = pool
            .run(move || {
                let start = std::time::Instant::now();
                let validated = share.validate(&expect);
                (share, validated, start)
            })
            .await;
        let verdict = {
            let mut inbox = self.lock();
            match validated {
                Ok(logits) => inbox.accept(&share, logits),
                Err(e) => Err(inbox.refuse(e)),
            }
        };
        self.add_verify_time(share.round, start);
        if verdict.is_ok() {
            self.arrived.notify_waiters();
        }
        verdict
    }

    fn add_verify_time(&self, round: u64, start: std::time::Instant) {
        *self
            .verify_seconds
            .lock()
            .expect("timing lock poisoned")
            .entry(round)
            .or_default() += start.elapsed().as_secs_f64();
    }

    /// Opens `round` for shares (see [`ShareInbox::announce`]).
    pub fn announce(&self, round: u64) {
        self.lock().announce(round);
    }

    /// Seconds spent in [`Self::offer`] on shares of `round` (and forgets them).
    pub fn take_verify_seconds(&self, round: u64) -> f64 {
        let mut times = self.verify_seconds.lock().expect("timing lock poisoned");
        let seconds = times.remove(&round).unwrap_or(0.0);
        times.retain(|r, _| *r > round);
        seconds
    }

    pub fn set_members(&self, members: &[Member]) {
        self.lock().set_members(members);
    }

    pub fn lock(&self) -> MutexGuard<'_, ShareInbox> {
        self.inbox.lock().expect("inbox lock poisoned")
    }

    /// Waits until `expected` shares of `round` were accepted or `deadline`
    /// passed; returns whether all arrived.
    pub async fn wait_for(&self, round: u64, expected: usize, deadline: Option<Instant>) -> bool {
        loop {
            let notified = self.arrived.notified();
            if self.lock().accepted_count(round) >= expected {
                return true;
            }
            match deadline {
                Some(deadline) => {
                    if tokio::time::timeout_at(deadline, notified).await.is_err() {
                        return false;
                    }
                }
                None => notified.await,
            }
        }
    }
}

/// What a member does in one round, decided by whoever runs the clock (the
/// coordinator's announcement, or the simulator's scenario).
#[derive(Debug, Clone)]
pub struct RoundPlan {
    pub round: u64,
    /// Members this member pushes its share to.
    pub targets: Vec<Member>,
    /// Shares this member waits for before it aggregates.
    pub expected: usize,
    /// Peer shares that must have been accepted when the round closes for it
    /// to distil; with fewer, the member keeps its locally trained student.
    pub quorum: usize,
    /// When the round closes for shares still missing (wall clock).
    pub deadline: Option<Instant>,
}

impl RoundPlan {
    /// The plan for `round`: push to `targets`, wait for `expected` peer
    /// shares until `deadline`, and distil only if at least
    /// `quorum_fraction` of them (rounded up) were accepted. fd-node and
    /// fd-sim both build their plans here, so the quorum rule is one.
    pub fn new(
        round: u64,
        targets: Vec<Member>,
        expected: usize,
        quorum_fraction: f64,
        deadline: Option<Instant>,
    ) -> Self {
        RoundPlan {
            round,
            targets,
            expected,
            quorum: (quorum_fraction * expected as f64).ceil() as usize,
            deadline,
        }
    }
}

/// How shares travel between members.
pub trait ShareTransport: Send + Sync {
    /// Marks the start of `plan.round` for this member (traffic is counted per round from here).
    fn begin_round(&self, plan: &RoundPlan);
    /// Delivers `share` to `peer`; `Ok` once the peer accepted it.
    fn push(
        &self,
        plan: &RoundPlan,
        peer: &Member,
        share: &LogitShare,
    ) -> impl Future<Output = anyhow::Result<()>> + Send;
    /// Resolves when the round is closed for this member: its expected shares
    /// are in `inbox` or no more will come in time.
    fn wait_for_shares(
        &self,
        plan: &RoundPlan,
        inbox: &SharedInbox,
    ) -> impl Future<Output = ()> + Send;
    /// Share traffic of this member in `round` so far.
    fn round_traffic(&self, round: u64) -> Traffic;
    /// Secure aggregation ([`fd_protocol::secagg`]): hands this member's
    /// encoded knowledge into the round's protocol and resolves with the
    /// unmasked sum of the survivors, or an error when the round cannot be
    /// unmasked (then the member keeps its local student). Carriers that
    /// do not run the protocol refuse.
    fn secure_sum(
        &self,
        plan: &RoundPlan,
        key: &SigningKey,
        encoded: Vec<u32>,
    ) -> impl Future<Output = anyhow::Result<SecureSum>> + Send {
        let _ = (plan, key, encoded);
        async { anyhow::bail!("this share carrier does not run secure aggregation") }
    }
}

/// What a securely aggregated round gives a member.
#[derive(Debug, Clone, PartialEq)]
pub struct SecureSum {
    /// Σ w and Σ w·p over the survivors (this member included).
    pub sums: KnowledgeSums,
    /// How many members' inputs are in the sum.
    pub contributors: usize,
    /// Bytes of secure-aggregation messages this member sent and received.
    pub bytes_sent: u64,
    pub bytes_received: u64,
}

/// Rewrites a member's own logits before they are shared: how the simulator
/// plays a Byzantine member. Honest members have none.
pub type ShareTamper = Box<dyn FnMut(u64, &mut [f32]) + Send>;

/// A member with what it needs to take part in rounds.
pub struct RoundEngine {
    member: Option<LocalMember>,
    key: SigningKey,
    encoding: PayloadEncoding,
    inbox: Arc<SharedInbox>,
    tamper: Option<ShareTamper>,
    slots: Option<Arc<Semaphore>>,
    rejected_reported: u64,
    /// Aggregate through [`ShareTransport::secure_sum`] instead of plain shares.
    secure: bool,
}

impl RoundEngine {
    pub fn new(member: LocalMember, key: SigningKey, encoding: PayloadEncoding) -> Self {
        let inbox = SharedInbox::new(member.manifest.clone());
        RoundEngine {
            member: Some(member),
            key,
            encoding,
            inbox,
            tamper: None,
            slots: None,
            rejected_reported: 0,
            secure: false,
        }
    }

    /// Shares pass through `tamper` before they are signed.
    pub fn with_tamper(mut self, tamper: ShareTamper) -> Self {
        self.tamper = Some(tamper);
        self
    }

    /// Learning steps wait for a permit of `slots`: at most that many members compute at once.
    pub fn with_learning_slots(mut self, slots: Arc<Semaphore>) -> Self {
        self.slots = Some(slots);
        self
    }

    /// Rounds aggregate by secure aggregation: no plain share leaves the
    /// member; it learns only the sum of the round's contributions. Refused
    /// for aggregators that cannot run on sums.
    pub fn with_secure_aggregation(mut self) -> anyhow::Result<Self> {
        let aggregator = self.member().aggregator;
        anyhow::ensure!(
            aggregator.supports_secure_aggregation(),
            "`aggregator` = {aggregator:?} cannot run under secure aggregation: members only see the sum of the round's probabilities; use \"mean-probabilities\" or {{ era = {{ temperature = … }} }} (median and trimmed mean need individual values, which is what secure aggregation hides)"
        );
        self.secure = true;
        Ok(self)
    }

    pub fn member(&self) -> &LocalMember {
        self.member
            .as_ref()
            .expect("member is present between steps")
    }

    pub fn inbox(&self) -> &Arc<SharedInbox> {
        &self.inbox
    }

    pub fn key(&self) -> &SigningKey {
        &self.key
    }

    /// Runs `step` on the member in the blocking pool.
    pub async fn learn<T: Send + 'static>(
        &mut self,
        step: impl FnOnce(&mut LocalMember) -> T + Send + 'static,
    ) -> anyhow::Result<T> {
        let _permit = match &self.slots {
            Some(slots) => Some(slots.clone().acquire_owned().await?),
            None => None,
        };
        let mut member = self.member.take().expect("member is present between steps");
        let (member, out) = tokio::task::spawn_blocking(move || {
            let out = step(&mut member);
            (member, out)
        })
        .await
        .context("learning step panicked")?;
        self.member = Some(member);
        Ok(out)
    }

    /// Logs the privacy spent so far when the member trains with DP-SGD.
    fn log_privacy(&self, round: u64) {
        let member = self.member();
        let learner = &member.learner;
        if let (Some(epsilon), Some(steps)) = (learner.dp_epsilon(), learner.dp_steps()) {
            tracing::info!(
                node = %member.name,
                round,
                epsilon,
                delta = member.dp_delta,
                steps,
                budget_reached = learner.dp_exhausted(),
                "differential privacy spent so far: ({epsilon:.3}, {})-DP",
                member.dp_delta
            );
        }
    }

    fn metrics(&self, round: u64) -> RoundMetrics {
        let member = self.member();
        RoundMetrics {
            train_seconds: member.times.train,
            ..RoundMetrics::new(
                &member.manifest.federation_id,
                round,
                self.key.public_key(),
                &member.name,
            )
        }
    }

    /// A round without peers: local training, then evaluation (the isolated baseline).
    pub async fn run_local_round(&mut self, round: u64) -> anyhow::Result<RoundMetrics> {
        let (loss, accuracy, validation_accuracy) = self
            .learn(|m| {
                let loss = m.train();
                let validation = m.end_round_validation(None);
                (loss, m.evaluate(), validation)
            })
            .await?;
        self.log_privacy(round);
        Ok(RoundMetrics {
            test_accuracy: accuracy,
            local_accuracy: accuracy,
            validation_accuracy,
            train_loss: loss,
            train_seconds: self.member().times.train,
            ..self.metrics(round)
        })
    }

    /// One federated round (see the module doc).
    pub async fn run_round<T: ShareTransport>(
        &mut self,
        plan: &RoundPlan,
        transport: &T,
    ) -> anyhow::Result<RoundMetrics> {
        let round = plan.round;
        // Whoever runs the clock opened it already; the simulator's rounds too.
        self.inbox.announce(round);
        transport.begin_round(plan);

        // 1–2: train on private data, predict on the public subset, score
        // which rows this member knows.
        let (train_loss, local_accuracy, own, row_weights) = self
            .learn(move |m| {
                let loss = m.train();
                let accuracy = m.evaluate();
                let own = m.predict(round);
                let weights = m.select(round, &own);
                (loss, accuracy, own, weights)
            })
            .await?;

        // 3: hand the knowledge to the others: a signed share to each
        // target, or this member's masked input to secure aggregation.
        let exchange = if self.secure {
            self.exchange_secure(plan, transport, own, row_weights).await?
        } else {
            self.exchange_shares(plan, transport, own, row_weights).await?
        };

        // 4–5: aggregate and distil (undone when the validation split says
        // it made the student worse, crate::rollback); then evaluate.
        let distilled = exchange.knowledge.is_some();
        let (distill_loss, accuracy, teacher_rows_kept, validation_accuracy, rolled_back) =
            match exchange.knowledge {
                Some(knowledge) => self
                    .learn(move |m| -> anyhow::Result<_> {
                        let teacher = match &knowledge {
                            RoundKnowledge::Shares { own, peers } => {
                                m.teacher_timed(own, peers)?
                            }
                            RoundKnowledge::Sums(secure) => {
                                m.teacher_of_sums_timed(&secure.sums, secure.contributors)?
                            }
                        };
                        let (loss, verdict) = m.distill_monitored(round, &teacher);
                        let validation = m.end_round_validation(verdict.as_ref());
                        let rolled_back = verdict.is_some_and(|v| v.rolled_back);
                        // A rolled-back student is the locally trained one.
                        let accuracy = if rolled_back { local_accuracy } else { m.evaluate() };
                        Ok((loss, accuracy, teacher.kept_fraction(), validation, rolled_back))
                    })
                    .await??,
                None => {
                    let validation = self.learn(|m| m.end_round_validation(None)).await?;
                    (0.0, local_accuracy, 0.0, validation, false)
                }
            };

        let traffic = transport.round_traffic(round);
        let times = self.member().times;
        let (protocol_sent, protocol_received) = exchange.protocol_bytes;
        let metrics = RoundMetrics {
            test_accuracy: accuracy,
            local_accuracy,
            bytes_sent: traffic.share_bytes_sent + protocol_sent,
            bytes_received: traffic.share_bytes_received + protocol_received,
            share_bytes: exchange.share_bytes,
            shares_sent: traffic.shares_sent as u32,
            shares_relayed: traffic.shares_relayed as u32,
            shares_aggregated: exchange.aggregated,
            shares_rejected: (exchange.rejected_total - self.rejected_reported) as u32,
            rejections: exchange.rejections,
            train_loss,
            distill_loss,
            train_seconds: times.train,
            predict_seconds: times.predict + times.select,
            encode_seconds: exchange.encode_seconds,
            network_seconds: exchange.network_seconds,
            verify_seconds: self.inbox.take_verify_seconds(round),
            distill_seconds: if distilled { times.distill } else { 0.0 },
            aggregate_seconds: if distilled { times.aggregate } else { 0.0 },
            distilled,
            teacher_rows_kept,
            validation_accuracy,
            rolled_back,
            ..self.metrics(round)
        };
        self.rejected_reported = exchange.rejected_total;
        self.log_privacy(round);
        Ok(metrics)
    }

    /// Step 3 with plain shares: sign this member's logits, push them to
    /// the round's targets, wait for the peers' shares and take them from
    /// the inbox.
    async fn exchange_shares<T: ShareTransport>(
        &mut self,
        plan: &RoundPlan,
        transport: &T,
        own: Vec<f32>,
        row_weights: Option<fd_protocol::RowWeights>,
    ) -> anyhow::Result<Exchange> {
        let round = plan.round;
        let mut shared = own.clone();
        if let Some(tamper) = &mut self.tamper {
            tamper(round, &mut shared);
        }
        let encode_start = std::time::Instant::now();
        let manifest = &self.member().manifest;
        let samples = self.member().private.len() as u64;
        // The member's own vote is weighted like the peers': by the
        // quantised weights its share carries.
        let own = SharedKnowledge::new(
            own,
            samples,
            row_weights.as_ref().map(fd_protocol::RowWeights::to_f32),
        );
        let share = LogitShare::new_signed_weighted(
            &self.key,
            &manifest.federation_id,
            subset_for(manifest, round),
            manifest.classes,
            samples,
            self.encoding,
            &shared,
            row_weights,
        )?;
        let share_bytes = fd_net::share_frame_len(&share)?;
        let encode_seconds = encode_start.elapsed().as_secs_f64();
        let name = self.member().name.clone();
        let network_start = std::time::Instant::now();
        let pushes = plan
            .targets
            .iter()
            .map(|peer| transport.push(plan, peer, &share));
        for (peer, result) in plan
            .targets
            .iter()
            .zip(futures::future::join_all(pushes).await)
        {
            if let Err(e) = result {
                tracing::warn!(node = %name, round, peer = ?peer.name, "share not delivered: {e:#}");
            }
        }

        // Wait for the peers' shares, then close the round in the inbox.
        transport.wait_for_shares(plan, &self.inbox).await;
        let network_seconds = network_start.elapsed().as_secs_f64();
        let (peers, rejections, rejected_total) = {
            let mut inbox = self.inbox.lock();
            let taken: Vec<SharedKnowledge> = inbox
                .take_round(round)
                .into_iter()
                .map(|(_, knowledge)| knowledge)
                .collect();
            (taken, inbox.rejections(), inbox.rejected_total())
        };
        if peers.len() < plan.expected {
            tracing::warn!(node = %name, round, arrived = peers.len(), expected = plan.expected, "round closed before every share arrived");
        }
        let quorate = peers.len() >= plan.quorum;
        if !quorate {
            tracing::warn!(node = %name, round, arrived = peers.len(), quorum = plan.quorum, "quorum not met: keeping the locally trained student this round");
        }
        Ok(Exchange {
            aggregated: if quorate { peers.len() as u32 } else { 0 },
            knowledge: quorate.then_some(RoundKnowledge::Shares { own, peers }),
            share_bytes,
            encode_seconds,
            network_seconds,
            protocol_bytes: (0, 0),
            rejections,
            rejected_total,
        })
    }

    /// Step 3 under secure aggregation: encode this member's knowledge
    /// (probabilities, weighted per row) and take part in the round's
    /// protocol; the knowledge to distil is the unmasked sum.
    async fn exchange_secure<T: ShareTransport>(
        &mut self,
        plan: &RoundPlan,
        transport: &T,
        mut own: Vec<f32>,
        row_weights: Option<fd_protocol::RowWeights>,
    ) -> anyhow::Result<Exchange> {
        let round = plan.round;
        if let Some(tamper) = &mut self.tamper {
            tamper(round, &mut own);
        }
        let encode_start = std::time::Instant::now();
        let classes = self.member().classes();
        let weights = row_weights.as_ref().map(fd_protocol::RowWeights::to_f32);
        let encoded = encode_knowledge(
            &crate::aggregate::probabilities(&own, classes),
            weights.as_deref(),
            classes,
        )?;
        let share_bytes = 4 * encoded.len() as u64;
        let encode_seconds = encode_start.elapsed().as_secs_f64();
        let name = self.member().name.clone();
        let network_start = std::time::Instant::now();
        let outcome = transport.secure_sum(plan, &self.key, encoded).await;
        let network_seconds = network_start.elapsed().as_secs_f64();
        let (knowledge, aggregated, protocol_bytes) = match outcome {
            Ok(secure) if secure.contributors > plan.quorum => {
                // The peers whose knowledge is in the sum (this member excluded).
                let aggregated = secure.contributors.saturating_sub(1) as u32;
                let bytes = (secure.bytes_sent, secure.bytes_received);
                (Some(RoundKnowledge::Sums(secure)), aggregated, bytes)
            }
            Ok(secure) => {
                tracing::warn!(node = %name, round, contributors = secure.contributors, quorum = plan.quorum, "quorum not met: keeping the locally trained student this round");
                (None, 0, (secure.bytes_sent, secure.bytes_received))
            }
            Err(e) => {
                tracing::warn!(node = %name, round, "secure aggregation failed, keeping the locally trained student this round: {e:#}");
                (None, 0, (0, 0))
            }
        };
        let (rejections, rejected_total) = {
            let inbox = self.inbox.lock();
            (inbox.rejections(), inbox.rejected_total())
        };
        Ok(Exchange {
            knowledge,
            share_bytes,
            encode_seconds,
            network_seconds,
            aggregated,
            protocol_bytes,
            rejections,
            rejected_total,
        })
    }
}

/// What a member distils in a round.
enum RoundKnowledge {
    /// Its own knowledge and the accepted peer shares.
    Shares {
        own: SharedKnowledge,
        peers: Vec<SharedKnowledge>,
    },
    /// The unmasked sum of secure aggregation.
    Sums(SecureSum),
}

/// How step 3 went, whichever way the knowledge travelled.
struct Exchange {
    /// `None`: below quorum or failed; the member keeps its local student.
    knowledge: Option<RoundKnowledge>,
    /// Size of what this member sent each target (a share frame, or the
    /// masked words).
    share_bytes: u64,
    encode_seconds: f64,
    network_seconds: f64,
    /// Peers whose knowledge went into the teacher.
    aggregated: u32,
    /// Secure aggregation's message bytes (sent, received), which the
    /// carrier's share traffic does not include.
    protocol_bytes: (u64, u64),
    rejections: Vec<(String, u64)>,
    rejected_total: u64,
}

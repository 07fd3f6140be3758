//! The networked member: joins through the coordinator, then runs each
//! announced round with the [`RoundEngine`] over a [`Libp2pTransport`], and
//! reports.
//!
//! Two tasks share the member's [`SharedInbox`]: the *inbound* task
//! ([`serve_inbound`]) answers every request (shares are validated as they
//! arrive, control messages pass the [`ControlGate`]; the signature work of
//! both runs in a bounded [`VerifyPool`], one owned task per request), and
//! the *round* task runs the engine, whose learning steps run in
//! `spawn_blocking` so slow training never stalls the network. The isolated
//! baseline ([`run_isolated`]) runs the same engine without peers.

use std::io::Write as _;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context as _, bail};
use fd_protocol::transfer::{INLINE_SHARE_BYTES, ShareAnnouncement};
use fd_protocol::{
    FederationManifest, JoinRequest, LogitShare, Member, Message, ProtocolError, PublicKey,
    RejectReason, RoundAnnouncement, RoundMetrics, SignedControl, SigningKey,
};
use fd_net::telemetry::{self, Telemetry};
use fd_net::{
    self as net, Client, InboundRequest, NetConfig, Network, Traffic, load_psk,
    request_with_retry, split_peer_addr,
};
use libp2p::{Multiaddr, PeerId};
use tokio::sync::mpsc;
use tokio::task::JoinSet;

use crate::checkpoint::Checkpoint;
use crate::config::{NodeConfig, Schedule};
use crate::gate::{Admitted, ControlGate, VerifyPool};
use crate::member::LocalMember;
use crate::rollback::BestStudent;
use crate::round::{RoundEngine, RoundPlan, SecureSum, ShareTransport, SharedInbox};
use crate::secure::{SecureAggregationConfig, SecureMailbox, SecureRound};

/// Where a caller may watch rounds finish.
pub type MetricsObserver = mpsc::UnboundedSender<RoundMetrics>;

async fn blocking<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> anyhow::Result<T> {
    tokio::task::spawn_blocking(f)
        .await
        .context("learning task panicked")
}

/// Appends one JSON line per round, flushed at once so a killed node keeps its history.
/// A member training with DP-SGD adds `dp_epsilon`, the ε spent so far at
/// its `[dp] delta` (a local field: the coordinator's report has no column for it).
fn append_metrics(
    path: Option<&std::path::Path>,
    metrics: &RoundMetrics,
    dp_epsilon: Option<f64>,
) -> anyhow::Result<()> {
    if let Some(path) = path {
        let line = match dp_epsilon {
            None => serde_json::to_string(metrics)?,
            Some(eps) => {
                let mut value = serde_json::to_value(metrics)?;
                if let Some(fields) = value.as_object_mut() {
                    fields.insert("dp_epsilon".into(), eps.into());
                }
                value.to_string()
            }
        };
        let mut file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .with_context(|| format!("cannot open metrics file {}", path.display()))?;
        writeln!(file, "{line}")?;
        file.sync_data()?;
    }
    Ok(())
}

fn report_line(m: &RoundMetrics) -> String {
    format!(
        "round {}: {} accuracy {:.4} (local {:.4}), sent {} B in {} shares, aggregated {}, rejected {}{}",
        m.round,
        m.name,
        m.test_accuracy,
        m.local_accuracy,
        m.bytes_sent,
        m.shares_sent,
        m.shares_aggregated,
        m.shares_rejected,
        if m.rolled_back { ", rolled back" } else { "" }
    )
}

/// Saves the member's student to `config.rollback.best_file` when the
/// round just completed (`metrics`) kept a new best validation accuracy
/// ([`crate::rollback`]; ties count, so it equals the monitor's best);
/// atomic, so a kill leaves the previous best.
async fn save_best_student(
    engine: &mut RoundEngine,
    config: &NodeConfig,
    metrics: &RoundMetrics,
    key: &SigningKey,
) -> anyhow::Result<()> {
    let (Some(path), Some(accuracy)) = (
        config.rollback.best_file.clone(),
        engine.member().monitor.best_kept,
    ) else {
        return Ok(());
    };
    if metrics.validation_accuracy != Some(accuracy) {
        return Ok(());
    }
    let round = metrics.round;
    let public = key.public_key();
    let name = config.name.clone();
    engine
        .learn(move |m| -> anyhow::Result<()> {
            BestStudent {
                validation_accuracy: accuracy,
                checkpoint: m.checkpoint(round, public),
            }
            .save(&path)?;
            tracing::info!(node = %name, round, validation_accuracy = accuracy, path = %path.display(), "best student saved");
            Ok(())
        })
        .await?
}

/// Runs `config.federation.rounds` rounds of local training only: the
/// no-collaboration baseline, with the same data, seed and local steps.
pub async fn run_isolated(
    config: &NodeConfig,
    key: &SigningKey,
) -> anyhow::Result<Vec<RoundMetrics>> {
    let prepare_config = config.clone();
    let member = blocking(move || LocalMember::prepare(&prepare_config)).await??;
    let mut engine = RoundEngine::new(member, key.clone(), config.encoding.0);
    let mut out = Vec::new();
    for round in 1..=config.federation.rounds {
        let metrics = engine.run_local_round(round).await?;
        save_best_student(&mut engine, config, &metrics, key).await?;
        // Saved (not resumed from) so the baseline's student can be exported too.
        if let Some(path) = config.checkpoint_file.clone() {
            let public = key.public_key();
            engine
                .learn(move |m| m.checkpoint(round, public).save(&path))
                .await??;
        }
        tracing::info!("{}", report_line(&metrics));
        append_metrics(
            config.metrics_file.as_deref(),
            &metrics,
            engine.member().learner.dp_epsilon(),
        )?;
        out.push(metrics);
    }
    Ok(out)
}

/// Shares over libp2p. A share of at most [`INLINE_SHARE_BYTES`] is pushed
/// whole to each target with request-response and answered by
/// [`serve_inbound`]; a larger one is announced once over gossipsub and each
/// target pulls it in chunks ([`pull_announced_shares`]), so no frame is
/// ever bigger than a chunk and gossip never carries the payload.
pub struct Libp2pTransport {
    client: Client,
    /// Counters at the start of the current round.
    round_start: Mutex<Traffic>,
    /// The round whose large share was already announced.
    announced: tokio::sync::Mutex<Option<u64>>,
    /// Oversize frames the codec refused and requests answered `busy`,
    /// already counted as rejections.
    refusals_counted: Mutex<(u64, u64)>,
    /// Secure aggregation, when this member runs it.
    secure: Option<SecureCarrier>,
}

/// What [`Libp2pTransport::secure_sum`] needs (see [`crate::secure`]).
struct SecureCarrier {
    mailbox: Arc<SecureMailbox>,
    config: SecureAggregationConfig,
    classes: usize,
    /// Deliveries of secure-aggregation messages, owned by the transport so
    /// they finish after the round that sent them (bounded by their
    /// deadlines) and stop when the member does.
    sends: Mutex<JoinSet<()>>,
}

impl Libp2pTransport {
    pub fn new(client: Client) -> Self {
        let start = client.traffic();
        Libp2pTransport {
            client,
            round_start: Mutex::new(start),
            announced: tokio::sync::Mutex::new(None),
            refusals_counted: Mutex::new((0, 0)),
            secure: None,
        }
    }

    /// Rounds aggregate by secure aggregation through `mailbox` (which this
    /// enables) with `config`, for a task of `classes` classes.
    pub fn with_secure_aggregation(
        mut self,
        mailbox: Arc<SecureMailbox>,
        config: SecureAggregationConfig,
        classes: usize,
    ) -> Self {
        mailbox.enable();
        self.secure = Some(SecureCarrier {
            mailbox,
            config,
            classes,
            sends: Mutex::new(JoinSet::new()),
        });
        self
    }

    /// Offers `share` for pulling and announces it to the round's targets (once per round).
    async fn announce(&self, plan: &RoundPlan, share: &LogitShare) -> anyhow::Result<()> {
        let mut announced = self.announced.lock().await;
        if *announced == Some(plan.round) {
            return Ok(());
        }
        let bytes = fd_protocol::encode_share(share)?;
        let announcement =
            ShareAnnouncement::describe(&share.federation_id, share.round, share.sender, &bytes);
        self.client
            .offer_share(announcement.clone(), Arc::new(bytes))
            .await?;
        let targets = plan
            .targets
            .iter()
            .map(|m| net::peer_id_of(&m.key))
            .collect::<anyhow::Result<Vec<_>>>()?;
        for member in &plan.targets {
            self.client.add_member(member).await?;
        }
        self.client
            .announce(announcement, targets, Duration::from_secs(30))
            .await?;
        *announced = Some(plan.round);
        Ok(())
    }
}

impl ShareTransport for Libp2pTransport {
    fn begin_round(&self, _plan: &RoundPlan) {
        *self.round_start.lock().unwrap() = self.client.traffic();
    }

    async fn push(
        &self,
        plan: &RoundPlan,
        peer: &Member,
        share: &LogitShare,
    ) -> anyhow::Result<()> {
        let inline = matches!(net::share_frame_len(share), Ok(n) if n <= INLINE_SHARE_BYTES as u64);
        if !inline {
            return self.announce(plan, share).await;
        }
        // A peer that cannot be reached now (restarting, perhaps on a new
        // address) may be back before the round closes: keep trying until
        // the deadline. Its new address comes from identify when it
        // reconnects to us, or the connection it opens is used directly.
        let mut pause = Duration::from_millis(250);
        loop {
            match send_share(&self.client, peer, share.clone()).await {
                Err(e) if e.is::<Unreachable>() => {
                    let retry_at = tokio::time::Instant::now() + pause;
                    if plan.deadline.is_none_or(|deadline| retry_at >= deadline) {
                        return Err(e);
                    }
                    tracing::debug!(peer = ?peer.name, round = plan.round, "share not delivered yet, retrying: {e:#}");
                    tokio::time::sleep_until(retry_at).await;
                    pause = (pause * 2).min(Duration::from_secs(2));
                }
                other => return other,
            }
        }
    }

    async fn wait_for_shares(&self, plan: &RoundPlan, inbox: &SharedInbox) {
        inbox
            .wait_for(plan.round, plan.expected, plan.deadline)
            .await;
        // Frames over the limit and requests refused as busy never became
        // messages; count them with the inbox's rejections so they show in
        // the metrics by reason.
        let traffic = self.client.traffic();
        let mut counted = self.refusals_counted.lock().unwrap();
        let mut inbox = inbox.lock();
        for _ in counted.0..traffic.frames_too_large {
            inbox.count_rejection(RejectReason::TooLarge);
        }
        for _ in counted.1..traffic.requests_busy {
            inbox.count_rejection(RejectReason::Busy);
        }
        *counted = (traffic.frames_too_large, traffic.requests_busy);
    }

    fn round_traffic(&self, _round: u64) -> Traffic {
        self.client
            .traffic()
            .since(&self.round_start.lock().unwrap())
    }

    async fn secure_sum(
        &self,
        plan: &RoundPlan,
        key: &SigningKey,
        encoded: Vec<u32>,
    ) -> anyhow::Result<SecureSum> {
        let Some(carrier) = &self.secure else {
            bail!("secure aggregation is not enabled on this member's transport");
        };
        SecureRound {
            client: &self.client,
            mailbox: &carrier.mailbox,
            config: &carrier.config,
            sends: &carrier.sends,
            classes: carrier.classes,
        }
        .run(plan, key, encoded)
        .await
    }
}

/// Where a member learns which round to run: the coordinator's
/// announcements, or a schedule every member derives from its config.
enum RoundClock {
    Coordinator { peer: PeerId, addr: Multiaddr },
    Schedule(Schedule),
}

/// How long a member keeps its swarm after the coordinator's `Done`, so
/// its answer is delivered (loopback needs milliseconds; WAN links more).
const DONE_ANSWER_GRACE: Duration = Duration::from_millis(500);

/// The libp2p settings a member's config implies: the allow-list (members,
/// coordinator, bootstrap peers), the pre-shared key, and discovery.
pub fn net_config(config: &NodeConfig) -> anyhow::Result<NetConfig> {
    let mut allowed = None;
    if !config.federation.members.is_empty() {
        let mut peers = Vec::new();
        for key in config.federation.member_keys() {
            peers.push(net::peer_id_of(&key)?);
        }
        for addr in config
            .coordinator
            .iter()
            .chain(&config.bootstrap)
            .chain(&config.relay.relays)
        {
            peers.push(split_peer_addr(&addr.parse()?)?.0);
        }
        allowed = Some(peers);
    }
    Ok(NetConfig {
        allowed,
        psk: config.psk_file.as_deref().map(load_psk).transpose()?,
        kademlia: config.coordinator.is_none() || !config.bootstrap.is_empty(),
        mdns: config.mdns,
        federation_id: config.federation.id.clone(),
        relay: relay_use(config)?,
        relay_service: config.relay.serve.then_some(config.relay.limits),
    })
}

/// The relays a member's config names (`relay.relays`, else its
/// coordinator), and when it reserves on them.
fn relay_use(config: &NodeConfig) -> anyhow::Result<net::RelayUse> {
    let named = if config.relay.relays.is_empty() {
        config.coordinator.iter().collect::<Vec<_>>()
    } else {
        config.relay.relays.iter().collect()
    };
    let relays = named
        .into_iter()
        .map(|a| split_peer_addr(&a.parse()?))
        .collect::<anyhow::Result<Vec<_>>>()?;
    Ok(net::RelayUse {
        mode: config.relay.mode,
        relays,
        max_relayed_share_bytes: config.relay.max_relayed_share_bytes,
    })
}

/// The members a config names, for a federation without a coordinator.
fn configured_members(config: &NodeConfig) -> Vec<Member> {
    config
        .federation
        .member_keys()
        .into_iter()
        .map(|key| Member {
            name: peer_id_string(&key),
            key,
            addrs: vec![],
        })
        .collect()
}

/// Runs the federation's rounds: through the coordinator at
/// `config.coordinator`, or without one on `config.federation.schedule`.
/// Resumes after the round saved in `config.checkpoint_file`. Returns the
/// metrics of the rounds this process ran.
pub async fn run_federated(
    config: NodeConfig,
    key: SigningKey,
    observer: Option<MetricsObserver>,
) -> anyhow::Result<Vec<RoundMetrics>> {
    let clock = match (&config.coordinator, config.federation.schedule) {
        (Some(addr), _) => {
            let addr: Multiaddr = addr
                .parse()
                .context("field `coordinator` is not a multiaddress")?;
            let (peer, addr) = split_peer_addr(&addr)?;
            RoundClock::Coordinator { peer, addr }
        }
        (None, Some(schedule)) => {
            if config.federation.members.is_empty() {
                bail!(
                    "field `federation.members` must list the members' PeerIds when there is no coordinator"
                );
            }
            RoundClock::Schedule(schedule)
        }
        (None, None) => bail!(
            "no coordinator address and no federation.schedule in the config: set one, or run with --isolated"
        ),
    };

    let prepare_config = config.clone();
    let mut member = blocking(move || LocalMember::prepare(&prepare_config)).await??;
    tracing::info!(
        node = %config.name,
        private = member.private.len(),
        public = member.public.len(),
        digest = %member.manifest.public_set.digest,
        "data ready"
    );
    let mut last_done = 0u64;
    if let Some(path) = &config.checkpoint_file
        && let Some(checkpoint) = Checkpoint::load(path)?
    {
        if checkpoint.round >= member.manifest.rounds {
            bail!(
                "checkpoint {} says all {} rounds of federation `{}` are done; remove it to run the federation again",
                path.display(),
                member.manifest.rounds,
                checkpoint.federation_id
            );
        }
        let public = key.public_key();
        last_done = checkpoint.round;
        member = blocking(move || member.restore(&checkpoint, &public).map(|()| member)).await??;
        tracing::info!(
            node = %config.name,
            round = last_done,
            weights = %member.weights_digest(),
            path = %path.display(),
            "resumed from checkpoint"
        );
        // Rounds are judged against the best kept before the restart.
        if let Some(best_path) = &config.rollback.best_file
            && let Some(best) = BestStudent::load(best_path)?
            && best.checkpoint.federation_id == member.manifest.federation_id
            && best.checkpoint.member == key.public_key()
            && best.checkpoint.round <= last_done
        {
            member.monitor.best_kept = Some(best.validation_accuracy);
            tracing::info!(node = %config.name, round = best.checkpoint.round, validation_accuracy = best.validation_accuracy, path = %best_path.display(), "best student so far");
        }
    }

    let telemetry = Arc::new(Telemetry::new("node", &config.name));
    // The endpoint stops when this function returns (the server is dropped).
    let _metrics_server = match &config.metrics_listen {
        Some(addr) => {
            let (bound, server) = telemetry::serve(addr.parse()?, telemetry.clone()).await?;
            tracing::info!(node = %config.name, %bound, "Prometheus metrics at http://{bound}/metrics");
            Some(server)
        }
        None => None,
    };

    let listen = config
        .listen
        .addrs()
        .iter()
        .map(|a| a.parse())
        .collect::<Result<Vec<Multiaddr>, _>>()
        .context("field `listen` is not a multiaddress")?;
    let mut network = MemberNetwork::start(&key, &net_config(&config)?, &listen).await?;
    let client = network.client().clone();
    telemetry.count_busy_from(client.counters());
    let mut addrs = Vec::new();
    for listen in network.listening() {
        tracing::info!(node = %config.name, peer = %client.local_peer_id(), %listen, "listening");
        addrs.push(listen.to_string());
    }
    let me = Member {
        key: key.public_key(),
        name: config.name.clone(),
        addrs,
    };
    if !config.bootstrap.is_empty() {
        let addrs = config
            .bootstrap
            .iter()
            .map(|a| a.parse())
            .collect::<Result<Vec<Multiaddr>, _>>()?;
        if let Err(e) = client.bootstrap(addrs).await {
            tracing::warn!(node = %config.name, "bootstrap did not complete yet: {e:#}");
        }
    }

    let last_round = member.manifest.rounds;
    let manifest = member.manifest.clone();
    let classes = member.classes();
    let secure_config = config.secure_aggregation.clone();
    if secure_config.enabled {
        secure_config.check_input_size(manifest.subset_size as usize, classes)?;
    }
    let mut engine = RoundEngine::new(member, key.clone(), config.encoding.0);
    if secure_config.enabled {
        engine = engine.with_secure_aggregation()?;
    }
    engine.inbox().lock().set_window(config.share_window_rounds);
    // Shares of rounds this member already finished are replays.
    engine.inbox().lock().take_round(last_done);
    let (rounds_tx, mut rounds_rx) = mpsc::unbounded_channel::<RoundAnnouncement>();
    let (done_tx, mut done_rx) = mpsc::unbounded_channel::<u64>();
    // The round schedule's task (no coordinator), owned here like the
    // network's: stopped when this function returns.
    let mut tasks = JoinSet::new();
    let listed = (!config.federation.members.is_empty()).then(|| config.federation.member_keys());
    let (coordinator_peer, control) = match clock {
        RoundClock::Coordinator { peer, addr } => {
            client.add_address(peer, addr).await?;
            let train_samples = engine.member().private.len() as u64;
            let members = join(&client, peer, &config, &manifest, &me, train_samples).await?;
            let gate = ControlGate::new(&manifest.federation_id, peer, last_round, listed)?;
            engine.inbox().set_members(&gate.filter_members(&members));
            telemetry.set_members(members.len());
            let control = ControlPlane {
                gate,
                rounds: rounds_tx,
                done: done_tx,
            };
            (Some(peer), Some(control))
        }
        RoundClock::Schedule(schedule) => {
            let members = configured_members(&config);
            engine.inbox().set_members(&members);
            telemetry.set_members(members.len());
            tasks.spawn(scheduled_rounds(
                schedule,
                manifest.clone(),
                members,
                last_done + 1,
                rounds_tx,
                engine.inbox().clone(),
            ));
            drop(done_tx);
            (None, None)
        }
    };
    network.serve(
        engine.inbox().clone(),
        telemetry.clone(),
        control,
        &manifest.federation_id,
    );
    let mut transport = Libp2pTransport::new(client.clone());
    if secure_config.enabled {
        let mailbox = network.secure_mailbox().expect("serve ran above");
        transport = transport.with_secure_aggregation(mailbox, secure_config, classes);
        tracing::info!(node = %config.name, "secure aggregation: only masked knowledge leaves this member");
    }

    let mut results: Vec<RoundMetrics> = Vec::new();
    let quorum_fraction = config.federation.quorum;
    let mut last_deadline = None;
    while let Some(announcement) = rounds_rx.recv().await {
        let round = announcement.round;
        if round <= last_done {
            // A restarted coordinator re-announces the round it lost track of:
            // give it this member's metrics again.
            if let (Some(peer), Some(m)) =
                (coordinator_peer, results.iter().find(|m| m.round == round))
            {
                let _ = request_with_retry(&client, peer, Message::Metrics(m.clone()), 3).await;
            }
            continue;
        }
        if round > last_round {
            continue;
        }
        let targets: Vec<Member> = announcement
            .members
            .iter()
            .filter(|m| m.key != me.key)
            .cloned()
            .collect();
        let deadline = tokio::time::Instant::now()
            + Duration::from_millis(
                announcement
                    .deadline_unix_ms
                    .saturating_sub(fd_data::fsutil::now_unix_ms()),
            );
        last_deadline = Some(announcement.deadline_unix_ms);
        let expected = targets.len();
        let plan = RoundPlan::new(round, targets, expected, quorum_fraction, Some(deadline));
        let mut metrics = engine.run_round(&plan, &transport).await?;
        if metrics.rolled_back {
            telemetry.rolled_back();
        }
        telemetry.set_validation_accuracy(metrics.validation_accuracy);
        // Before the checkpoint: a node killed between the two resumes with
        // the best of the rounds it completed.
        save_best_student(&mut engine, &config, &metrics, &key).await?;
        if let Some(path) = config.checkpoint_file.clone() {
            let public = key.public_key();
            let (seconds, digest) = engine
                .learn(move |m| -> anyhow::Result<_> {
                    let start = std::time::Instant::now();
                    let checkpoint = m.checkpoint(round, public);
                    checkpoint.save(&path)?;
                    Ok((start.elapsed().as_secs_f64(), checkpoint.weights_digest))
                })
                .await??;
            metrics.checkpoint_seconds = seconds;
            tracing::info!(node = %config.name, round, weights = %digest, seconds, "checkpoint saved");
        }
        last_done = round;
        telemetry.round_completed(round, metrics.test_accuracy);
        telemetry.bytes(metrics.bytes_sent, metrics.bytes_received);
        tracing::info!("{}", report_line(&metrics));
        append_metrics(
            config.metrics_file.as_deref(),
            &metrics,
            engine.member().learner.dp_epsilon(),
        )?;
        if let Some(observer) = &observer {
            let _ = observer.send(metrics.clone());
        }
        if let Some(peer) = coordinator_peer {
            match request_with_retry(&client, peer, Message::Metrics(metrics.clone()), 3).await {
                Err(e) => {
                    tracing::warn!(node = %config.name, round, "metrics not delivered to the coordinator (sent again if it re-announces the round): {e:#}");
                }
                Ok(Message::Refused { code, reason }) => {
                    tracing::warn!(node = %config.name, round, code, "metrics refused by the coordinator: {reason}");
                }
                Ok(_) => {}
            }
        }
        results.push(metrics);
        if round == last_round {
            break;
        }
    }
    if last_done != last_round {
        bail!("the rounds stopped after round {last_done} of {last_round}");
    }
    match coordinator_peer {
        // Stay reachable until the coordinator closes the federation (a
        // `Done` that passed the gate), so slower members can still deliver
        // their last shares to us.
        Some(_) => {
            let done = tokio::time::timeout(Duration::from_secs(30), done_rx.recv()).await;
            if done.is_ok() {
                // `Done` is acted on before its answer is written: give the
                // answer time to reach the coordinator before the swarm
                // goes, or it sees a closed connection, redials a member
                // that is gone and logs it as not reached.
                tokio::time::sleep(DONE_ANSWER_GRACE).await;
            }
        }
        // Without a coordinator nobody says the federation is done: serve
        // our last share until the last round's window has closed.
        None => {
            if let Some(deadline) = last_deadline {
                let wait = deadline.saturating_sub(fd_data::fsutil::now_unix_ms()) + 2_000;
                tokio::time::sleep(Duration::from_millis(wait)).await;
            }
        }
    }
    tasks.shutdown().await;
    network.shutdown().await;
    Ok(results)
}

/// Joins through the coordinator; returns the member list.
async fn join(
    client: &Client,
    coordinator: PeerId,
    config: &NodeConfig,
    manifest: &FederationManifest,
    me: &Member,
    train_samples: u64,
) -> anyhow::Result<Vec<Member>> {
    let join = Message::Join(JoinRequest {
        federation_id: config.federation.id.clone(),
        member: me.clone(),
        public_set_digest: manifest.public_set.digest,
        train_samples,
    });
    match request_with_retry(client, coordinator, join, 20).await? {
        Message::Welcome {
            manifest: theirs,
            members,
        } => {
            if theirs != *manifest {
                bail!(
                    "the coordinator's federation manifest differs from this node's: coordinator {theirs:?}, node {manifest:?}; check [federation] and [data]"
                );
            }
            Ok(members)
        }
        Message::JoinRefused { reason } => {
            bail!("the coordinator refused to let this node join: {reason}")
        }
        other => bail!("unexpected answer to join: {other:?}"),
    }
}

/// Announces the rounds of a coordinator-less federation on its schedule,
/// from `first` on. A member that starts late joins at the current round:
/// rounds whose share window has already closed are skipped.
async fn scheduled_rounds(
    schedule: Schedule,
    manifest: FederationManifest,
    members: Vec<Member>,
    first: u64,
    rounds: mpsc::UnboundedSender<RoundAnnouncement>,
    inbox: Arc<SharedInbox>,
) {
    let now = fd_data::fsutil::now_unix_ms();
    let first = first.max(schedule.current_round(now));
    for round in first..=manifest.rounds {
        let (open, deadline) = schedule.window_ms(round);
        let now = fd_data::fsutil::now_unix_ms();
        if now < open {
            tokio::time::sleep(Duration::from_millis(open - now)).await;
        }
        let announcement = RoundAnnouncement {
            federation_id: manifest.federation_id.clone(),
            round,
            deadline_unix_ms: deadline,
            members: members.clone(),
        };
        // Open for shares now, even while this member still runs an earlier round.
        inbox.announce(round);
        if rounds.send(announcement).is_err() {
            return;
        }
    }
}

/// Pulls the large shares peers announce over gossipsub (chunk by chunk,
/// see [`net::Client::fetch_share`]) and offers them to the inbox. Cheap
/// checks come first, so nothing is fetched for a stranger, a closed round
/// or a size over the limit.
pub async fn pull_announced_shares(
    client: Client,
    inbox: Arc<SharedInbox>,
    mut announcements: mpsc::Receiver<(PeerId, ShareAnnouncement)>,
    federation_id: String,
    telemetry: Arc<Telemetry>,
    pool: VerifyPool,
) {
    // One pull at a time per (sender, round): a member announcing again and
    // again cannot make this node fetch its share in parallel.
    let mut pulling = std::collections::HashSet::new();
    let mut pulls = JoinSet::new();
    loop {
        let (source, announcement) = tokio::select! {
            next = announcements.recv() => match next {
                Some(next) => next,
                None => break,
            },
            Some(done) = pulls.join_next(), if !pulls.is_empty() => {
                if let Ok(key) = done {
                    pulling.remove(&key);
                }
                continue;
            }
        };
        let round = announcement.round;
        let sender = announcement.sender;
        // A repeated announcement of a share we already hold, or are
        // pulling, is not an attack.
        if pulling.contains(&(sender, round)) || inbox.lock().has_accepted(&sender, round) {
            continue;
        }
        let checked = announcement
            .check(&federation_id)
            .and_then(|()| inbox.lock().precheck(&sender, round))
            .and_then(|()| match net::peer_id_of(&sender) {
                Ok(id) if id == source => Ok(()),
                _ => Err(ProtocolError::InvalidField {
                    field: "sender",
                    reason: format!("announced by {source}, not by the sender"),
                }),
            });
        if let Err(e) = checked {
            let reason = e.reason();
            tracing::warn!(%source, round, reason = reason.as_str(), "share announcement rejected: {e}");
            inbox.lock().count_rejection(reason);
            telemetry.share_rejected(reason.as_str());
            continue;
        }
        pulling.insert((sender, round));
        let (client, inbox, telemetry, pool) = (
            client.clone(),
            inbox.clone(),
            telemetry.clone(),
            pool.clone(),
        );
        pulls.spawn(async move {
            pull_one(&client, &inbox, &telemetry, &pool, source, announcement).await;
            (sender, round)
        });
    }
    pulls.shutdown().await;
}

/// How long a pull of a share over `max_relayed_share_bytes` waits for a
/// direct connection when only a relayed one exists.
const PULL_DIRECT_WAIT: Duration = Duration::from_secs(60);

/// Fetches one announced share and offers it to the inbox.
async fn pull_one(
    client: &Client,
    inbox: &Arc<SharedInbox>,
    telemetry: &Telemetry,
    pool: &VerifyPool,
    source: PeerId,
    announcement: ShareAnnouncement,
) {
    let (round, sender) = (announcement.round, announcement.sender);
    // A share too large for a relay waits for a direct connection (hole
    // punching, or a direct dial) for up to PULL_DIRECT_WAIT.
    let started = tokio::time::Instant::now();
    let bytes = loop {
        match client.fetch_share(source, &announcement).await {
            Ok(bytes) => break bytes,
            Err(e) if e.is::<net::RelayedOnly>() && started.elapsed() < PULL_DIRECT_WAIT => {
                tracing::debug!(%source, round, "{e:#}");
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
            Err(e) => {
                tracing::warn!(%source, round, "pulling an announced share failed: {e:#}");
                return;
            }
        }
    };
    let reject = |e: ProtocolError| {
        tracing::warn!(%source, round, reason = e.reason().as_str(), "pulled share rejected: {e}");
        telemetry.share_rejected(e.reason().as_str());
    };
    let decoded = pool.run(move || fd_protocol::decode_share(&bytes)).await;
    let share = match decoded {
        Ok(share) if share.sender == sender && share.round == round => share,
        Ok(_) => {
            let e = ProtocolError::InvalidField {
                field: "sender",
                reason: "the pulled share is not the announced one".into(),
            };
            inbox.lock().count_rejection(e.reason());
            return reject(e);
        }
        Err(e) => {
            inbox.lock().count_rejection(e.reason());
            return reject(e);
        }
    };
    // The inbox counts its own rejections.
    match inbox.offer_verified_in(share, pool).await {
        Ok(()) => telemetry.share_accepted(),
        Err(e) => reject(e),
    }
}

/// A member's libp2p stack, as `fd-node` and `fd-sim --network libp2p` both
/// run it: the swarm's event loop from [`MemberNetwork::start`], then, from
/// [`MemberNetwork::serve`], the inbound server ([`serve_inbound`]) and the
/// large-share puller ([`pull_announced_shares`]). They are tasks this value
/// owns (a `JoinSet`): [`MemberNetwork::shutdown`], or dropping it, stops
/// them, so no network task outlives the member that started it.
pub struct MemberNetwork {
    client: Client,
    me: PublicKey,
    /// Secure-aggregation messages, once [`MemberNetwork::serve`] runs.
    secure: Option<Arc<SecureMailbox>>,
    listening: Vec<Multiaddr>,
    requests: Option<mpsc::Receiver<InboundRequest>>,
    announcements: Option<mpsc::Receiver<(PeerId, ShareAnnouncement)>>,
    tasks: JoinSet<()>,
}

impl MemberNetwork {
    /// Builds the swarm for `key`, starts its event loop and listens on
    /// every address of `listen`. Requests that arrive before
    /// [`serve`](Self::serve) wait in the event loop's bounded queue.
    pub async fn start(key: &SigningKey, config: &NetConfig, listen: &[Multiaddr]) -> anyhow::Result<Self> {
        let Network {
            client,
            requests,
            announcements,
            event_loop,
        } = net::new_with(key, config)?;
        let mut tasks = JoinSet::new();
        tasks.spawn(event_loop.run());
        let mut listening = Vec::with_capacity(listen.len());
        for addr in listen {
            listening.push(client.listen(addr.clone()).await?);
        }
        Ok(MemberNetwork {
            client,
            me: key.public_key(),
            secure: None,
            listening,
            requests: Some(requests),
            announcements: Some(announcements),
            tasks,
        })
    }

    pub fn client(&self) -> &Client {
        &self.client
    }

    /// The addresses the swarm listens on (with the ports it was given).
    pub fn listening(&self) -> &[Multiaddr] {
        &self.listening
    }

    /// Starts answering peers: shares into `inbox`, control messages through
    /// `control` (`None`: all refused), secure-aggregation messages into
    /// [`Self::secure_mailbox`] (refused unless a transport enables it), and
    /// pulls the large shares announced on `federation_id`'s topic. Call it
    /// once.
    pub fn serve(
        &mut self,
        inbox: Arc<SharedInbox>,
        telemetry: Arc<Telemetry>,
        control: Option<ControlPlane>,
        federation_id: &str,
    ) {
        let (Some(requests), Some(announcements)) =
            (self.requests.take(), self.announcements.take())
        else {
            panic!("MemberNetwork::serve called twice");
        };
        let pool = VerifyPool::for_this_machine();
        let secure = SecureMailbox::new(self.me, federation_id, inbox.clone());
        self.secure = Some(secure.clone());
        self.tasks.spawn(pull_announced_shares(
            self.client.clone(),
            inbox.clone(),
            announcements,
            federation_id.to_string(),
            telemetry.clone(),
            pool.clone(),
        ));
        self.tasks.spawn(serve_inbound(
            Inbound {
                client: self.client.clone(),
                inbox,
                telemetry,
                pool,
                control,
                secure,
            },
            requests,
        ));
    }

    /// Where this member's secure-aggregation messages are kept; `None`
    /// before [`Self::serve`].
    pub fn secure_mailbox(&self) -> Option<Arc<SecureMailbox>> {
        self.secure.clone()
    }

    /// Stops the event loop, the server and the puller, and waits for them.
    pub async fn shutdown(mut self) {
        self.tasks.shutdown().await;
    }
}

/// Where admitted control messages go (see [`ControlGate`]).
pub struct ControlPlane {
    pub gate: ControlGate,
    pub rounds: mpsc::UnboundedSender<RoundAnnouncement>,
    pub done: mpsc::UnboundedSender<u64>,
}

/// What [`serve_inbound`] needs.
pub struct Inbound {
    pub client: Client,
    pub inbox: Arc<SharedInbox>,
    pub telemetry: Arc<Telemetry>,
    /// Where signatures and payloads are checked.
    pub pool: VerifyPool,
    /// None: every control message is refused (`not_coordinator`): a
    /// federation without a coordinator, or the simulator's own clock.
    pub control: Option<ControlPlane>,
    /// Secure-aggregation messages (see [`crate::secure`]).
    pub secure: Arc<SecureMailbox>,
}

impl Inbound {
    /// Admits a control message from `peer` through the gate and acts on it.
    async fn control(
        self: &Arc<Self>,
        peer: PeerId,
        signed: SignedControl,
    ) -> Result<(), ProtocolError> {
        let Some(control) = &self.control else {
            return Err(ProtocolError::NotCoordinator {
                peer: peer.to_string(),
            });
        };
        // Nobody but the coordinator gets signature work done for it.
        control.gate.check_sender(&peer)?;
        let this = self.clone();
        self.pool
            .run(move || {
                let control = this.control.as_ref().expect("checked above");
                control
                    .gate
                    .admit(&peer, &signed, |admitted| match admitted {
                        Admitted::Round(announcement) => {
                            this.inbox.set_members(&announcement.members);
                            this.inbox.announce(announcement.round);
                            this.telemetry.set_members(announcement.members.len());
                            let _ = control.rounds.send(announcement);
                        }
                        Admitted::Done { rounds } => {
                            let _ = control.done.send(rounds);
                        }
                    })
            })
            .await
    }

    /// The answer to one request.
    async fn answer(self: &Arc<Self>, peer: PeerId, message: Message) -> Message {
        match message {
            Message::Share(share) => {
                let (round, sender) = (share.round, share.sender);
                match self.inbox.offer_verified_in(share, &self.pool).await {
                    Ok(()) => {
                        self.telemetry.share_accepted();
                        Message::ShareAccepted
                    }
                    Err(e) => {
                        self.telemetry.share_rejected(e.reason().as_str());
                        tracing::warn!(%peer, round, %sender, reason = e.reason().as_str(), "share rejected: {e}");
                        Message::ShareRejected {
                            code: e.reason().as_str().to_string(),
                            reason: e.to_string(),
                        }
                    }
                }
            }
            Message::Control(signed) => {
                let (kind, round) = (signed.control.kind(), signed.control.round());
                match self.control(peer, signed).await {
                    Ok(()) => Message::Ack,
                    Err(e) => {
                        tracing::warn!(%peer, kind, round, reason = e.reason().as_str(), "control message refused: {e}");
                        self.refused(&e)
                    }
                }
            }
            Message::SecAgg(message) => {
                let (kind, round) = (message.kind(), message.round());
                match self.secure.offer(&peer, message) {
                    Ok(()) => Message::Ack,
                    Err(e) => {
                        tracing::warn!(%peer, kind, round, reason = e.reason().as_str(), "secure aggregation message refused: {e}");
                        self.refused(&e)
                    }
                }
            }
            other => {
                let e = ProtocolError::Unexpected(other.kind());
                tracing::warn!(%peer, reason = e.reason().as_str(), "request refused: {e}");
                self.refused(&e)
            }
        }
    }

    /// Counts a refused request (metrics and telemetry) and answers it.
    fn refused(&self, e: &ProtocolError) -> Message {
        let code = e.reason().as_str();
        self.inbox.lock().count_rejection(e.reason());
        self.telemetry.refused(code);
        Message::Refused {
            code: code.to_string(),
            reason: e.to_string(),
        }
    }
}

/// Answers every inbound request: shares go through the inbox's gate,
/// control messages through the [`ControlGate`], anything else a member
/// does not take is refused. Each request is its own task, owned here; how
/// many exist at once is bounded by the event loop's in-flight limits
/// ([`net::MAX_IN_FLIGHT`]), and the CPU they use by the [`VerifyPool`].
pub async fn serve_inbound(inbound: Inbound, mut requests: mpsc::Receiver<InboundRequest>) {
    let inbound = Arc::new(inbound);
    let mut tasks = JoinSet::new();
    loop {
        tokio::select! {
            request = requests.recv() => {
                let Some(InboundRequest { peer, message, channel }) = request else {
                    break;
                };
                let inbound = inbound.clone();
                tasks.spawn(async move {
                    let answer = inbound.answer(peer, message).await;
                    if inbound.client.respond(channel, answer).await.is_err() {
                        tracing::debug!(%peer, "answer dropped: the network stopped");
                    }
                });
            }
            Some(finished) = tasks.join_next(), if !tasks.is_empty() => {
                if let Err(e) = finished
                    && e.is_panic()
                {
                    std::panic::resume_unwind(e.into_panic());
                }
            }
        }
    }
    tasks.shutdown().await;
}

/// The peer could not be reached at all (no connection, or the request
/// failed in transport): worth trying again, unlike a verdict on the share.
#[derive(Debug, thiserror::Error)]
#[error("{peer} unreachable: {reason}")]
struct Unreachable {
    peer: String,
    reason: String,
}

/// Pushes `share` to `peer`; retries while the peer does not know us yet
/// (its member list may lag the announcement by a moment).
async fn send_share(client: &Client, peer: &Member, share: LogitShare) -> anyhow::Result<()> {
    let peer_id = client.add_member(peer).await?;
    for attempt in 0..5u64 {
        let answer = request_with_retry(client, peer_id, Message::Share(share.clone()), 3)
            .await
            .map_err(|e| Unreachable {
                peer: peer.name.clone(),
                reason: format!("{e:#}"),
            })?;
        match answer {
            Message::ShareAccepted => return Ok(()),
            // The peer has not seen this round's announcement (or our
            // membership) yet: a moment behind us, not a verdict.
            Message::ShareRejected { code, .. }
                if (code == RejectReason::UnknownSender.as_str()
                    || code == RejectReason::FutureRound.as_str())
                    && attempt < 4 =>
            {
                tokio::time::sleep(Duration::from_millis(200 * (attempt + 1))).await;
            }
            Message::ShareRejected { code, reason } => {
                bail!("{} rejected our share ({code}): {reason}", peer.name)
            }
            other => bail!("unexpected answer to a share: {other:?}"),
        }
    }
    unreachable!("the last attempt returns")
}

/// The member's public key as a libp2p PeerId, for printing.
pub fn peer_id_string(key: &PublicKey) -> String {
    net::peer_id_of(key)
        .map(|p| p.to_string())
        .unwrap_or_default()
}

//! The networked member: joins through the coordinator, then runs each
//! announced round with the [`RoundEngine`] over a [`Libp2pTransport`], and
//! reports.
//!
//! Two tasks share the member's [`SharedInbox`]: the *inbound* task
//! ([`serve_inbound`]) answers every request at once (shares are validated as
//! they arrive, announcements are queued), and the *round* task runs the
//! engine, whose learning steps run in `spawn_blocking` so slow training
//! never stalls the network. The isolated baseline ([`run_isolated`]) runs
//! the same engine without peers.

use std::io::Write as _;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context as _, anyhow, bail};
use fd_protocol::transfer::{INLINE_SHARE_BYTES, ShareAnnouncement};
use fd_protocol::{
    FederationManifest, JoinRequest, LogitShare, Member, Message, ProtocolError, PublicKey,
    RejectReason, RoundAnnouncement, RoundMetrics, SigningKey,
};
use libp2p::multiaddr::Protocol;
use libp2p::pnet::PreSharedKey;
use libp2p::{Multiaddr, PeerId};
use tokio::sync::mpsc;

use crate::checkpoint::Checkpoint;
use crate::config::{NodeConfig, Schedule};
use crate::member::LocalMember;
use crate::net::{self, Client, InboundRequest, NetConfig, Network, Traffic};
use crate::round::{RoundEngine, RoundPlan, ShareTransport, SharedInbox};
use crate::telemetry::{self, Telemetry};

/// Where a caller may watch rounds finish.
pub type MetricsObserver = mpsc::UnboundedSender<RoundMetrics>;

/// Splits `/ip4/../tcp/../p2p/<id>` into its peer id and dialable address.
pub fn split_peer_addr(addr: &Multiaddr) -> anyhow::Result<(PeerId, Multiaddr)> {
    let mut base = addr.clone();
    match base.pop() {
        Some(Protocol::P2p(peer)) => Ok((peer, base)),
        _ => bail!("address {addr} does not end in /p2p/<peer id>"),
    }
}

async fn blocking<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> anyhow::Result<T> {
    tokio::task::spawn_blocking(f)
        .await
        .context("learning task panicked")
}

/// Appends one JSON line per round, flushed at once so a killed node keeps its history.
fn append_metrics(path: Option<&std::path::Path>, metrics: &RoundMetrics) -> anyhow::Result<()> {
    if let Some(path) = path {
        let mut file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .with_context(|| format!("cannot open metrics file {}", path.display()))?;
        writeln!(file, "{}", serde_json::to_string(metrics)?)?;
        file.sync_data()?;
    }
    Ok(())
}

fn report_line(m: &RoundMetrics) -> String {
    format!(
        "round {}: {} accuracy {:.4} (local {:.4}), sent {} B in {} shares, aggregated {}, rejected {}",
        m.round,
        m.name,
        m.test_accuracy,
        m.local_accuracy,
        m.bytes_sent,
        m.shares_sent,
        m.shares_aggregated,
        m.shares_rejected
    )
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
        tracing::info!("{}", report_line(&metrics));
        append_metrics(config.metrics_file.as_deref(), &metrics)?;
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
    /// Oversize frames the codec refused, already counted as rejections.
    too_large_counted: Mutex<u64>,
}

impl Libp2pTransport {
    pub fn new(client: Client) -> Self {
        let start = client.traffic();
        Libp2pTransport {
            client,
            round_start: Mutex::new(start),
            announced: tokio::sync::Mutex::new(None),
            too_large_counted: Mutex::new(0),
        }
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
            add_addresses(&self.client, member).await?;
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
        let inline = matches!(net::frame_len(&Message::Share(share.clone())), Ok(n) if n <= INLINE_SHARE_BYTES as u64);
        if inline {
            send_share(&self.client, peer, share.clone()).await
        } else {
            self.announce(plan, share).await
        }
    }

    async fn wait_for_shares(&self, plan: &RoundPlan, inbox: &SharedInbox) {
        inbox
            .wait_for(plan.round, plan.expected, plan.deadline)
            .await;
        // Frames over the limit never became messages; count them with the
        // inbox's rejections so they show in the metrics by reason.
        let total = self.client.frames_too_large();
        let mut counted = self.too_large_counted.lock().unwrap();
        for _ in *counted..total {
            inbox.lock().count_rejection(RejectReason::TooLarge);
        }
        *counted = total;
    }

    fn round_traffic(&self, _round: u64) -> Traffic {
        self.client
            .traffic()
            .since(&self.round_start.lock().unwrap())
    }
}

/// Where a member learns which round to run: the coordinator's
/// announcements, or a schedule every member derives from its config.
enum RoundClock {
    Coordinator { peer: PeerId, addr: Multiaddr },
    Schedule(Schedule),
}

/// The libp2p settings a member's config implies: the allow-list (members,
/// coordinator, bootstrap peers), the pre-shared key, and discovery.
pub fn net_config(config: &NodeConfig) -> anyhow::Result<NetConfig> {
    let mut allowed = None;
    if !config.federation.members.is_empty() {
        let mut peers = Vec::new();
        for key in config.federation.member_keys() {
            peers.push(net::peer_id_of(&key)?);
        }
        for addr in config.coordinator.iter().chain(&config.bootstrap) {
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
    })
}

/// Reads a pre-shared key in the go-ipfs `swarm.key` format.
pub fn load_psk(path: &std::path::Path) -> anyhow::Result<PreSharedKey> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("cannot read psk_file {}", path.display()))?;
    text.parse::<PreSharedKey>().map_err(|e| {
        anyhow!(
            "psk_file {} is not a pre-shared key (\"/key/swarm/psk/1.0.0/\", \"/base16/\", 64 hex digits): {e}",
            path.display()
        )
    })
}

/// A fresh pre-shared key in the `swarm.key` format.
pub fn new_psk_text() -> String {
    let key: [u8; 32] = rand::random();
    let hex: String = key.iter().map(|b| format!("{b:02x}")).collect();
    format!("/key/swarm/psk/1.0.0/\n/base16/\n{hex}\n")
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
    }

    let telemetry = Arc::new(Telemetry::new("node", &config.name));
    if let Some(addr) = &config.metrics_listen {
        let (bound, _) = telemetry::serve(addr.parse()?, telemetry.clone()).await?;
        tracing::info!(node = %config.name, %bound, "Prometheus metrics at http://{bound}/metrics");
    }

    let Network {
        client,
        requests,
        announcements,
        event_loop,
    } = net::new_with(&key, &net_config(&config)?)?;
    tokio::spawn(event_loop.run());
    let listen = client.listen(config.listen.parse()?).await?;
    let me = Member {
        key: key.public_key(),
        name: config.name.clone(),
        addrs: vec![listen.to_string()],
    };
    tracing::info!(node = %config.name, peer = %client.local_peer_id(), %listen, "listening");
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
    let mut engine = RoundEngine::new(member, key.clone(), config.encoding.0);
    let (rounds_tx, mut rounds_rx) = mpsc::unbounded_channel::<RoundAnnouncement>();
    let (done_tx, mut done_rx) = mpsc::unbounded_channel::<u64>();
    let coordinator_peer = match clock {
        RoundClock::Coordinator { peer, addr } => {
            client.add_address(peer, addr).await?;
            let train_samples = engine.member().private.len() as u64;
            let members = join(&client, peer, &config, &manifest, &me, train_samples).await?;
            engine.inbox().set_members(&members);
            telemetry.set_members(members.len());
            Some(peer)
        }
        RoundClock::Schedule(schedule) => {
            let members = configured_members(&config);
            engine.inbox().set_members(&members);
            telemetry.set_members(members.len());
            tokio::spawn(scheduled_rounds(
                schedule,
                manifest.clone(),
                members,
                last_done + 1,
                rounds_tx.clone(),
            ));
            None
        }
    };
    tokio::spawn(serve_inbound(
        client.clone(),
        engine.inbox().clone(),
        requests,
        coordinator_peer.map(|_| rounds_tx),
        Some(done_tx),
        telemetry.clone(),
    ));
    tokio::spawn(pull_announced_shares(
        client.clone(),
        engine.inbox().clone(),
        announcements,
        manifest.federation_id.clone(),
        telemetry.clone(),
    ));
    let transport = Libp2pTransport::new(client.clone());

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
                    .saturating_sub(crate::fsutil::now_unix_ms()),
            );
        last_deadline = Some(announcement.deadline_unix_ms);
        let plan = RoundPlan {
            round,
            expected: targets.len(),
            quorum: (quorum_fraction * targets.len() as f64).ceil() as usize,
            targets,
            deadline: Some(deadline),
        };
        let mut metrics = engine.run_round(&plan, &transport).await?;
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
        append_metrics(config.metrics_file.as_deref(), &metrics)?;
        if let Some(observer) = &observer {
            let _ = observer.send(metrics.clone());
        }
        if let Some(peer) = coordinator_peer
            && let Err(e) =
                request_with_retry(&client, peer, Message::Metrics(metrics.clone()), 3).await
        {
            tracing::warn!(node = %config.name, round, "metrics not delivered to the coordinator (sent again if it re-announces the round): {e:#}");
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
        // Stay reachable until the coordinator closes the federation, so
        // slower members can still deliver their last shares to us.
        Some(_) => {
            let _ = tokio::time::timeout(Duration::from_secs(30), done_rx.recv()).await;
        }
        // Without a coordinator nobody says the federation is done: serve
        // our last share until the last round's window has closed.
        None => {
            if let Some(deadline) = last_deadline {
                let wait = deadline.saturating_sub(crate::fsutil::now_unix_ms()) + 2_000;
                tokio::time::sleep(Duration::from_millis(wait)).await;
            }
        }
    }
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
) {
    let now = crate::fsutil::now_unix_ms();
    let first = first.max(schedule.current_round(now));
    for round in first..=manifest.rounds {
        let (open, deadline) = schedule.window_ms(round);
        let now = crate::fsutil::now_unix_ms();
        if now < open {
            tokio::time::sleep(Duration::from_millis(open - now)).await;
        }
        let announcement = RoundAnnouncement {
            federation_id: manifest.federation_id.clone(),
            round,
            deadline_unix_ms: deadline,
            members: members.clone(),
        };
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
) {
    while let Some((source, announcement)) = announcements.recv().await {
        let round = announcement.round;
        let sender = announcement.sender;
        // A repeated announcement of a share we already hold is not an attack.
        if inbox.lock().has_accepted(&sender, round) {
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
        let (client, inbox, telemetry) = (client.clone(), inbox.clone(), telemetry.clone());
        tokio::spawn(async move {
            let bytes = match client.fetch_share(source, &announcement).await {
                Ok(bytes) => bytes,
                Err(e) => {
                    tracing::warn!(%source, round, "pulling an announced share failed: {e:#}");
                    return;
                }
            };
            let reject = |e: ProtocolError| {
                tracing::warn!(%source, round, reason = e.reason().as_str(), "pulled share rejected: {e}");
                telemetry.share_rejected(e.reason().as_str());
            };
            let share = match fd_protocol::decode_share(&bytes) {
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
            // offer() counts its own rejections.
            match inbox.offer(&share) {
                Ok(()) => telemetry.share_accepted(),
                Err(e) => reject(e),
            }
        });
    }
}

/// Answers every inbound request at once: shares go through `inbox`'s gate,
/// round announcements and the federation's end to `rounds` and `done`
/// (when given; the simulator runs its own clock).
pub async fn serve_inbound(
    client: Client,
    inbox: Arc<SharedInbox>,
    mut requests: mpsc::Receiver<InboundRequest>,
    rounds: Option<mpsc::UnboundedSender<RoundAnnouncement>>,
    done: Option<mpsc::UnboundedSender<u64>>,
    telemetry: Arc<Telemetry>,
) {
    while let Some(InboundRequest {
        peer,
        message,
        channel,
    }) = requests.recv().await
    {
        let answer = match message {
            Message::Round(announcement) if rounds.is_some() => {
                inbox.set_members(&announcement.members);
                telemetry.set_members(announcement.members.len());
                if let Some(rounds) = &rounds {
                    let _ = rounds.send(announcement);
                }
                Message::Ack
            }
            Message::Share(share) => {
                let verdict = inbox.offer(&share);
                match verdict {
                    Ok(()) => {
                        telemetry.share_accepted();
                        Message::ShareAccepted
                    }
                    Err(e) => {
                        telemetry.share_rejected(e.reason().as_str());
                        tracing::warn!(%peer, round = share.round, sender = %share.sender, reason = e.reason().as_str(), "share rejected: {e}");
                        Message::ShareRejected {
                            code: e.reason().as_str().to_string(),
                            reason: e.to_string(),
                        }
                    }
                }
            }
            Message::Done { rounds } if done.is_some() => {
                if let Some(done) = &done {
                    let _ = done.send(rounds);
                }
                Message::Ack
            }
            other => {
                tracing::debug!(%peer, "ignoring unexpected request {other:?}");
                Message::Ack
            }
        };
        if client.respond(channel, answer).await.is_err() {
            return;
        }
    }
}

/// Sends a request, retrying transport failures with a short pause.
pub async fn request_with_retry(
    client: &Client,
    peer: PeerId,
    message: Message,
    attempts: u32,
) -> anyhow::Result<Message> {
    let mut last = None;
    for attempt in 0..attempts.max(1) {
        match client.request(peer, message.clone()).await {
            Ok(answer) => return Ok(answer),
            Err(e) => {
                tracing::debug!(%peer, attempt, "request failed: {e:#}");
                last = Some(e);
                tokio::time::sleep(Duration::from_millis(250 * (attempt as u64 + 1))).await;
            }
        }
    }
    Err(last.unwrap_or_else(|| anyhow!("no attempt made")))
}

/// Pushes `share` to `peer`; retries while the peer does not know us yet
/// (its member list may lag the announcement by a moment).
async fn send_share(client: &Client, peer: &Member, share: LogitShare) -> anyhow::Result<()> {
    let peer_id = add_addresses(client, peer).await?;
    for attempt in 0..5u64 {
        match request_with_retry(client, peer_id, Message::Share(share.clone()), 3).await? {
            Message::ShareAccepted => return Ok(()),
            Message::ShareRejected { code, .. }
                if code == RejectReason::UnknownSender.as_str() && attempt < 4 =>
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

/// Tells the swarm where `member` listens (its announced addresses, or,
/// without any, whatever Kademlia finds); returns its PeerId.
async fn add_addresses(client: &Client, member: &Member) -> anyhow::Result<PeerId> {
    let peer = net::peer_id_of(&member.key)?;
    let mut known = false;
    for addr in &member.addrs {
        if let Ok(addr) = addr.parse() {
            client.add_address(peer, addr).await?;
            known = true;
        }
    }
    if !known
        && !client.connected_peers().await?.contains(&peer)
        && let Err(e) = client.find_peer(peer).await
    {
        tracing::debug!(%peer, "no address found for the member yet: {e:#}");
    }
    Ok(peer)
}

/// The member's public key as a libp2p PeerId, for printing.
pub fn peer_id_string(key: &PublicKey) -> String {
    net::peer_id_of(key)
        .map(|p| p.to_string())
        .unwrap_or_default()
}

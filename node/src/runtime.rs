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
use fd_protocol::{
    JoinRequest, LogitShare, Member, Message, PublicKey, RejectReason, RoundAnnouncement,
    RoundMetrics, SigningKey,
};
use libp2p::multiaddr::Protocol;
use libp2p::{Multiaddr, PeerId};
use tokio::sync::mpsc;

use crate::config::NodeConfig;
use crate::member::LocalMember;
use crate::net::{self, Client, InboundRequest, Traffic};
use crate::round::{RoundEngine, RoundPlan, ShareTransport, SharedInbox};

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

/// Shares over libp2p: pushed with request-response to each target,
/// received by [`serve_inbound`] into the member's inbox.
pub struct Libp2pTransport {
    client: Client,
    /// Counters at the start of the current round.
    round_start: Mutex<Traffic>,
}

impl Libp2pTransport {
    pub fn new(client: Client) -> Self {
        let start = client.traffic();
        Libp2pTransport {
            client,
            round_start: Mutex::new(start),
        }
    }
}

impl ShareTransport for Libp2pTransport {
    fn begin_round(&self, _plan: &RoundPlan) {
        *self.round_start.lock().unwrap() = self.client.traffic();
    }

    async fn push(
        &self,
        _plan: &RoundPlan,
        peer: &Member,
        share: &LogitShare,
    ) -> anyhow::Result<()> {
        send_share(&self.client, peer, share.clone()).await
    }

    async fn wait_for_shares(&self, plan: &RoundPlan, inbox: &SharedInbox) {
        inbox
            .wait_for(plan.round, plan.expected, plan.deadline)
            .await;
    }

    fn round_traffic(&self, _round: u64) -> Traffic {
        self.client
            .traffic()
            .since(&self.round_start.lock().unwrap())
    }
}

/// Joins the federation at `config.coordinator` and runs every round.
/// Returns this member's metrics, one per round.
pub async fn run_federated(
    config: NodeConfig,
    key: SigningKey,
    observer: Option<MetricsObserver>,
) -> anyhow::Result<Vec<RoundMetrics>> {
    let coordinator: Multiaddr = config
        .coordinator
        .as_deref()
        .ok_or_else(|| {
            anyhow!(
                "no coordinator address in the config: run with --isolated or set `coordinator`"
            )
        })?
        .parse()
        .context("field `coordinator` is not a multiaddress")?;
    let (coordinator_peer, coordinator_addr) = split_peer_addr(&coordinator)?;

    let prepare_config = config.clone();
    let member = blocking(move || LocalMember::prepare(&prepare_config)).await??;
    tracing::info!(
        node = %config.name,
        private = member.private.len(),
        public = member.public.len(),
        digest = %member.manifest.public_set.digest,
        "data ready"
    );

    let (client, requests, event_loop) = net::new(&key)?;
    tokio::spawn(event_loop.run());
    let listen = client.listen(config.listen.parse()?).await?;
    let me = Member {
        key: key.public_key(),
        name: config.name.clone(),
        addrs: vec![listen.to_string()],
    };
    tracing::info!(node = %config.name, peer = %client.local_peer_id(), %listen, "listening");

    client
        .add_address(coordinator_peer, coordinator_addr)
        .await?;
    let join = Message::Join(JoinRequest {
        federation_id: config.federation.id.clone(),
        member: me.clone(),
        public_set_digest: member.manifest.public_set.digest,
        train_samples: member.private.len() as u64,
    });
    let members = match request_with_retry(&client, coordinator_peer, join, 20).await? {
        Message::Welcome { manifest, members } => {
            if manifest != member.manifest {
                bail!(
                    "the coordinator's federation manifest differs from this node's: coordinator {manifest:?}, node {:?}; check [federation] and [data]",
                    member.manifest
                );
            }
            members
        }
        Message::JoinRefused { reason } => {
            bail!("the coordinator refused to let this node join: {reason}")
        }
        other => bail!("unexpected answer to join: {other:?}"),
    };

    let last_round = member.manifest.rounds;
    let mut engine = RoundEngine::new(member, key.clone(), config.encoding.0);
    engine.inbox().set_members(&members);
    let (rounds_tx, mut rounds_rx) = mpsc::unbounded_channel::<RoundAnnouncement>();
    let (done_tx, mut done_rx) = mpsc::unbounded_channel::<u64>();
    tokio::spawn(serve_inbound(
        client.clone(),
        engine.inbox().clone(),
        requests,
        Some(rounds_tx),
        Some(done_tx),
    ));
    let transport = Libp2pTransport::new(client.clone());

    let mut results = Vec::new();
    while let Some(announcement) = rounds_rx.recv().await {
        let round = announcement.round;
        if round <= results.last().map_or(0, |m: &RoundMetrics| m.round) || round > last_round {
            continue;
        }
        let targets: Vec<Member> = announcement
            .members
            .iter()
            .filter(|m| m.key != me.key)
            .cloned()
            .collect();
        let plan = RoundPlan {
            round,
            expected: targets.len(),
            targets,
            deadline: Some(
                tokio::time::Instant::now()
                    + Duration::from_millis(
                        announcement
                            .deadline_unix_ms
                            .saturating_sub(crate::fsutil::now_unix_ms()),
                    ),
            ),
        };
        let metrics = engine.run_round(&plan, &transport).await?;
        tracing::info!("{}", report_line(&metrics));
        append_metrics(config.metrics_file.as_deref(), &metrics)?;
        if let Some(observer) = &observer {
            let _ = observer.send(metrics.clone());
        }
        if let Err(e) = request_with_retry(
            &client,
            coordinator_peer,
            Message::Metrics(metrics.clone()),
            3,
        )
        .await
        {
            tracing::warn!(node = %config.name, round, "metrics not delivered to the coordinator: {e:#}");
        }
        results.push(metrics);
        if round == last_round {
            break;
        }
    }
    if results.len() as u64 != last_round {
        bail!(
            "the coordinator stopped announcing rounds after {} of {last_round}",
            results.len()
        );
    }
    // Stay reachable until the coordinator closes the federation, so slower
    // members can still deliver their last shares to us.
    let _ = tokio::time::timeout(Duration::from_secs(30), done_rx.recv()).await;
    Ok(results)
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
                if let Some(rounds) = &rounds {
                    let _ = rounds.send(announcement);
                }
                Message::Ack
            }
            Message::Share(share) => {
                let verdict = inbox.offer(&share);
                match verdict {
                    Ok(()) => Message::ShareAccepted,
                    Err(e) => {
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
    let peer_id = net::peer_id_of(&peer.key)?;
    for addr in &peer.addrs {
        if let Ok(addr) = addr.parse() {
            client.add_address(peer_id, addr).await?;
        }
    }
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

/// The member's public key as a libp2p PeerId, for printing.
pub fn peer_id_string(key: &PublicKey) -> String {
    net::peer_id_of(key)
        .map(|p| p.to_string())
        .unwrap_or_default()
}

//! # fd-coordinator
//!
//! The optional rendezvous of an fd federation: members bootstrap through it,
//! it holds the federation manifest (public-set digest, classes, rounds),
//! announces each round with a deadline and the current member list, and
//! collects the per-round metrics members report. It never receives private
//! data and never needs the logits: shares travel member to member.
//!
//! Like `fd-node`'s runtime, two tasks share the state: one answers requests
//! (joins, metrics) at once, the other is the round clock.

use std::collections::BTreeMap;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context as _, bail};
use fd_node::config::{ConfigError, FederationConfig, resolve};
use fd_node::data::DataSource;
use fd_node::fsutil::{now_unix_ms, write_atomic};
use fd_node::net::{self, Client, InboundRequest};
use fd_node::runtime::request_with_retry;
use fd_protocol::{
    FederationManifest, Member, Message, PublicKey, RoundAnnouncement, RoundMetrics, SigningKey,
};
use futures::future::join_all;
use libp2p::Multiaddr;
use libp2p::multiaddr::Protocol;
use serde::{Deserialize, Serialize};
use tokio::sync::{Notify, mpsc};

/// An annotated coordinator config.
pub const EXAMPLE_CONFIG: &str = r#"# fd-coordinator configuration file (TOML): every field and its meaning.
# Relative paths are relative to this file.

listen = "/ip4/127.0.0.1/tcp/7000"   # libp2p listen address
key_file = "coordinator.key"         # Ed25519 identity; created (mode 0600) if missing
min_members = 3                      # round 1 starts once this many members joined
round_timeout_secs = 600             # each round's deadline, from its announcement
metrics_file = "metrics.csv"         # optional: per-round, per-member metrics (CSV)
address_file = "coordinator.addr"    # optional: the full address members dial is written here

[federation]                         # members' [federation] must be identical
id = "demo"
rounds = 3
public_size = 5000
subset_size = 2000
seed = 42

[data]                               # to compute the public-set digest
kind = "auto"
"#;

/// The coordinator's configuration.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CoordinatorConfig {
    #[serde(default = "default_listen")]
    pub listen: String,
    pub key_file: PathBuf,
    pub min_members: usize,
    #[serde(default = "default_round_timeout")]
    pub round_timeout_secs: u64,
    #[serde(default)]
    pub metrics_file: Option<PathBuf>,
    #[serde(default)]
    pub address_file: Option<PathBuf>,
    pub federation: FederationConfig,
    #[serde(default)]
    pub data: DataSource,
}

fn default_listen() -> String {
    "/ip4/127.0.0.1/tcp/7000".into()
}

fn default_round_timeout() -> u64 {
    600
}

impl CoordinatorConfig {
    pub fn parse(text: &str, path: &Path) -> Result<Self, ConfigError> {
        let mut c: CoordinatorConfig = toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: path.to_owned(),
            message: e.to_string(),
        })?;
        let base = path.parent().unwrap_or(Path::new("."));
        c.key_file = resolve(base, &c.key_file);
        c.metrics_file = c.metrics_file.map(|p| resolve(base, &p));
        c.address_file = c.address_file.map(|p| resolve(base, &p));
        c.data.rebase(base);
        let invalid = |field, reason: String| ConfigError::Invalid {
            path: path.to_owned(),
            field,
            reason,
        };
        if c.min_members == 0 {
            return Err(invalid("min_members", "must be at least 1".into()));
        }
        if c.round_timeout_secs == 0 {
            return Err(invalid("round_timeout_secs", "must be at least 1".into()));
        }
        if c.listen.parse::<Multiaddr>().is_err() {
            return Err(invalid(
                "listen",
                format!("is not a multiaddress: {}", c.listen),
            ));
        }
        if c.federation.rounds == 0 {
            return Err(invalid("federation.rounds", "must be at least 1".into()));
        }
        Ok(c)
    }

    pub fn from_file(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        Self::parse(&text, path)
    }
}

/// What the coordinator tells an embedding program (e.g. `fd-sim`).
#[derive(Debug, Clone)]
pub enum CoordinatorEvent {
    /// Listening; members dial this full address.
    Listening(Multiaddr),
    Joined(Member),
    RoundStarted(u64),
    /// Every member reported (or the deadline passed).
    RoundClosed {
        round: u64,
        metrics: Vec<RoundMetrics>,
    },
}

#[derive(Default)]
struct State {
    members: Vec<Member>,
    metrics: BTreeMap<u64, BTreeMap<PublicKey, RoundMetrics>>,
}

struct Shared {
    manifest: FederationManifest,
    state: Mutex<State>,
    changed: Notify,
}

pub const CSV_HEADER: &str = "round,node,name,test_accuracy,local_accuracy,bytes_sent,bytes_received,share_bytes,shares_sent,shares_aggregated,shares_rejected,train_loss,distill_loss,train_seconds,predict_seconds,encode_seconds,network_seconds,verify_seconds,aggregate_seconds,distill_seconds";

/// One CSV row of [`CSV_HEADER`].
pub fn csv_row(m: &RoundMetrics) -> String {
    format!(
        "{},{},{},{:.6},{:.6},{},{},{},{},{},{},{:.6},{:.6},{:.3},{:.3},{:.4},{:.4},{:.4},{:.4},{:.3}",
        m.round,
        m.node.to_hex(),
        m.name.replace(',', ";"),
        m.test_accuracy,
        m.local_accuracy,
        m.bytes_sent,
        m.bytes_received,
        m.share_bytes,
        m.shares_sent,
        m.shares_aggregated,
        m.shares_rejected,
        m.train_loss,
        m.distill_loss,
        m.train_seconds,
        m.predict_seconds,
        m.encode_seconds,
        m.network_seconds,
        m.verify_seconds,
        m.aggregate_seconds,
        m.distill_seconds
    )
}

/// Runs the federation to its last round. Returns every round's metrics.
pub async fn run(
    config: CoordinatorConfig,
    key: SigningKey,
    events: Option<mpsc::UnboundedSender<CoordinatorEvent>>,
) -> anyhow::Result<BTreeMap<u64, Vec<RoundMetrics>>> {
    let emit = |e: CoordinatorEvent| {
        if let Some(tx) = &events {
            let _ = tx.send(e);
        }
    };
    let data_source = config.data.clone();
    let federation = config.federation.clone();
    let manifest = tokio::task::spawn_blocking(move || -> anyhow::Result<FederationManifest> {
        let data = data_source.load()?;
        Ok(federation.manifest(&data)?)
    })
    .await??;
    tracing::info!(federation = %manifest.federation_id, digest = %manifest.public_set.digest, source = %manifest.public_set.source, "manifest ready");

    let (client, requests, event_loop) = net::new(&key)?;
    tokio::spawn(event_loop.run());
    let mut address = client.listen(config.listen.parse()?).await?;
    address.push(Protocol::P2p(client.local_peer_id()));
    if let Some(path) = &config.address_file {
        write_atomic(path, format!("{address}\n").as_bytes(), 0o644)
            .with_context(|| format!("cannot write {}", path.display()))?;
    }
    tracing::info!(%address, "coordinator listening");
    emit(CoordinatorEvent::Listening(address.clone()));

    let shared = Arc::new(Shared {
        manifest: manifest.clone(),
        state: Mutex::new(State::default()),
        changed: Notify::new(),
    });
    let (joined_tx, mut joined_rx) = mpsc::unbounded_channel();
    tokio::spawn(serve(client.clone(), shared.clone(), requests, joined_tx));

    if let Some(path) = &config.metrics_file {
        write_atomic(path, format!("{CSV_HEADER}\n").as_bytes(), 0o644)
            .with_context(|| format!("cannot write {}", path.display()))?;
    }

    // Wait for enough members.
    loop {
        let count = shared.state.lock().unwrap().members.len();
        if count >= config.min_members {
            break;
        }
        match joined_rx.recv().await {
            Some(member) => emit(CoordinatorEvent::Joined(member)),
            None => bail!("the network stopped before enough members joined"),
        }
    }
    while let Ok(member) = joined_rx.try_recv() {
        emit(CoordinatorEvent::Joined(member));
    }

    let mut all = BTreeMap::new();
    for round in 1..=manifest.rounds {
        let timeout = Duration::from_secs(config.round_timeout_secs);
        let members = shared.state.lock().unwrap().members.clone();
        let announcement = RoundAnnouncement {
            federation_id: manifest.federation_id.clone(),
            round,
            deadline_unix_ms: now_unix_ms() + timeout.as_millis() as u64,
            members: members.clone(),
        };
        emit(CoordinatorEvent::RoundStarted(round));
        tracing::info!(round, members = members.len(), "announcing round");
        broadcast(&client, &members, Message::Round(announcement)).await;

        // Members report after their deadline at the latest; allow a grace period.
        let deadline = tokio::time::Instant::now() + timeout + Duration::from_secs(30);
        loop {
            let notified = shared.changed.notified();
            let reported = shared
                .state
                .lock()
                .unwrap()
                .metrics
                .get(&round)
                .map_or(0, |m| m.len());
            if reported >= members.len() {
                break;
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                tracing::warn!(
                    round,
                    reported,
                    expected = members.len(),
                    "round closed by deadline"
                );
                break;
            }
        }
        let metrics: Vec<RoundMetrics> = shared
            .state
            .lock()
            .unwrap()
            .metrics
            .get(&round)
            .map(|m| m.values().cloned().collect())
            .unwrap_or_default();
        if let Some(path) = &config.metrics_file {
            let mut file = std::fs::OpenOptions::new().append(true).open(path)?;
            for m in &metrics {
                writeln!(file, "{}", csv_row(m))?;
            }
            file.sync_data()?;
        }
        emit(CoordinatorEvent::RoundClosed {
            round,
            metrics: metrics.clone(),
        });
        all.insert(round, metrics);
    }
    let members = shared.state.lock().unwrap().members.clone();
    broadcast(
        &client,
        &members,
        Message::Done {
            rounds: manifest.rounds,
        },
    )
    .await;
    Ok(all)
}

async fn broadcast(client: &Client, members: &[Member], message: Message) {
    let sends = members.iter().map(|m| {
        let message = message.clone();
        async move {
            let peer = net::peer_id_of(&m.key)?;
            request_with_retry(client, peer, message, 3).await
        }
    });
    for (member, result) in members.iter().zip(join_all(sends).await) {
        if let Err(e) = result {
            tracing::warn!(member = %member.name, "not reached: {e:#}");
        }
    }
}

async fn serve(
    client: Client,
    shared: Arc<Shared>,
    mut requests: mpsc::Receiver<InboundRequest>,
    joined: mpsc::UnboundedSender<Member>,
) {
    while let Some(InboundRequest {
        peer,
        message,
        channel,
    }) = requests.recv().await
    {
        let answer = match message {
            Message::Join(join) => match check_join(&shared.manifest, &join, peer) {
                Ok(()) => {
                    for addr in &join.member.addrs {
                        if let Ok(addr) = addr.parse() {
                            let _ = client.add_address(peer, addr).await;
                        }
                    }
                    let mut state = shared.state.lock().unwrap();
                    state.members.retain(|m| m.key != join.member.key);
                    state.members.push(join.member.clone());
                    tracing::info!(member = %join.member.name, %peer, total = state.members.len(), "member joined");
                    let _ = joined.send(join.member.clone());
                    Message::Welcome {
                        manifest: shared.manifest.clone(),
                        members: state.members.clone(),
                    }
                }
                Err(reason) => {
                    tracing::warn!(%peer, "join refused: {reason}");
                    Message::JoinRefused { reason }
                }
            },
            Message::Metrics(m) => {
                let known = shared
                    .state
                    .lock()
                    .unwrap()
                    .members
                    .iter()
                    .any(|x| x.key == m.node);
                if known && m.federation_id == shared.manifest.federation_id {
                    shared
                        .state
                        .lock()
                        .unwrap()
                        .metrics
                        .entry(m.round)
                        .or_default()
                        .insert(m.node, m);
                    shared.changed.notify_waiters();
                }
                Message::Ack
            }
            _ => Message::Ack,
        };
        if client.respond(channel, answer).await.is_err() {
            return;
        }
    }
}

fn check_join(
    manifest: &FederationManifest,
    join: &fd_protocol::JoinRequest,
    peer: libp2p::PeerId,
) -> Result<(), String> {
    if join.federation_id != manifest.federation_id {
        return Err(format!(
            "this is federation `{}`, not `{}`",
            manifest.federation_id, join.federation_id
        ));
    }
    if join.public_set_digest != manifest.public_set.digest {
        return Err(format!(
            "public-set digest {} differs from the manifest's {}: the node holds different public data",
            join.public_set_digest, manifest.public_set.digest
        ));
    }
    match net::peer_id_of(&join.member.key) {
        Ok(id) if id == peer => Ok(()),
        _ => Err("the member key in the join request is not the key of the connection".into()),
    }
}

//! # fd-coordinator
//!
//! The optional rendezvous of an fd federation: members bootstrap through it,
//! it holds the federation manifest (public-set digest, classes, rounds),
//! announces each round with a deadline and the current member list, and
//! collects the per-round metrics members report. It never receives private
//! data and never needs the logits: shares travel member to member.
//!
//! Like `fd-node`'s runtime, two tasks share the state: one answers requests
//! (joins, metrics) at once, the other is the round clock. The state
//! ([`state::CoordinatorState`]) is saved after every change, so a restarted
//! coordinator resumes where it was instead of restarting the federation.

pub mod state;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use anyhow::{Context as _, bail};
use fd_net::config::{ConfigError, FederationConfig, resolve};
use fd_data::DataSource;
use fd_data::fsutil::{now_unix_ms, write_atomic};
use fd_net::{self as net, Client, InboundRequest, Traffic};
use fd_net::request_with_retry;
use fd_net::telemetry::{self, Telemetry};
use fd_protocol::{
    Control, FederationManifest, Member, Message, ProtocolError, PublicKey, RoundMetrics,
    SignedControl, SigningKey,
};
use futures::future::join_all;
use libp2p::Multiaddr;
use libp2p::multiaddr::Protocol;
use serde::{Deserialize, Serialize};
use tokio::sync::{Notify, mpsc};
use tokio::task::JoinSet;

use crate::state::{CoordinatorState, NextRound, Recorded, StateError};

/// An annotated coordinator config.
pub const EXAMPLE_CONFIG: &str = r#"# fd-coordinator configuration file (TOML): every field and its meaning.
# Relative paths are relative to this file.

listen = "/ip4/127.0.0.1/tcp/7000"   # libp2p listen address (or /ip4/…/udp/7000/quic-v1)
key_file = "coordinator.key"         # Ed25519 identity; created (mode 0600) if missing
min_members = 3                      # round 1 starts once this many members joined
round_timeout_secs = 600             # each round's deadline, from its announcement
metrics_file = "metrics.csv"         # optional: per-round, per-member metrics (CSV)
address_file = "coordinator.addr"    # optional: the full address members dial is written here
state_file = "coordinator-state.json"  # members, round, metrics; a restart resumes from it (this is the default)
# metrics_listen = "127.0.0.1:9101"  # optional: OpenMetrics text (Prometheus) at http://<this>/metrics
# psk_file = "swarm.key"             # closed network: the members' pre-shared key (libp2p pnet)

[federation]                         # members' [federation] must be identical
id = "demo"
rounds = 3
public_size = 5000
subset_size = 2000
seed = 42
# members = ["12D3KooW..."]          # optional: only these PeerIds may join (empty = anyone)

[relay]                              # relay for members behind NATs (libp2p circuit relay v2)
serve = true                         # members reserve a slot here by default (their [relay] mode = "auto")
limits = { max_reservations = 128, max_circuits = 64, max_circuit_bytes = 4194304, max_circuit_secs = 600 }

[data]                               # to compute the public-set digest
kind = "auto"
"#;

/// The state file's name beside the config when `state_file` is not given.
pub const DEFAULT_STATE_FILE: &str = "coordinator-state.json";

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
    /// Where the coordinator saves its state; [`CoordinatorConfig::parse`]
    /// fills in [`DEFAULT_STATE_FILE`] beside the config. None (only when
    /// built in code): nothing persisted, a restart starts over.
    #[serde(default)]
    pub state_file: Option<PathBuf>,
    /// Serve the metrics (OpenMetrics text) at `GET /metrics` on this address.
    #[serde(default)]
    pub metrics_listen: Option<SocketAddr>,
    /// Pre-shared key of a closed network (libp2p pnet), the members' `psk_file`.
    #[serde(default)]
    pub psk_file: Option<PathBuf>,
    /// Relay for members behind NATs (libp2p circuit relay v2): members
    /// reserve a slot here by default.
    #[serde(default)]
    pub relay: RelayService,
    pub federation: FederationConfig,
    #[serde(default)]
    pub data: DataSource,
}

fn default_listen() -> String {
    "/ip4/127.0.0.1/tcp/7000".into()
}

/// The coordinator's `[relay]` table.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RelayService {
    #[serde(default = "default_serve")]
    pub serve: bool,
    #[serde(default)]
    pub limits: fd_net::RelayLimits,
}

impl Default for RelayService {
    fn default() -> Self {
        RelayService {
            serve: true,
            limits: fd_net::RelayLimits::default(),
        }
    }
}

fn default_serve() -> bool {
    true
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
        c.psk_file = c.psk_file.map(|p| resolve(base, &p));
        c.state_file = Some(resolve(
            base,
            c.state_file
                .as_deref()
                .unwrap_or(Path::new(DEFAULT_STATE_FILE)),
        ));
        c.data.rebase(base);
        let invalid = |field, reason: String| ConfigError::Invalid {
            path: path.to_owned(),
            field,
            reason,
        };
        if c.min_members == 0 {
            return Err(invalid("min_members", "must be at least 1".into()));
        }
        c.relay
            .limits
            .validate()
            .map_err(|(field, reason)| invalid(field, reason))?;
        if c.round_timeout_secs == 0 {
            return Err(invalid("round_timeout_secs", "must be at least 1".into()));
        }
        if c.listen.parse::<Multiaddr>().is_err() {
            return Err(invalid(
                "listen",
                format!("is not a multiaddress: {}", c.listen),
            ));
        }
        if c.psk_file.is_some()
            && let Some(reason) = fd_net::quic_under_psk("listen", &c.listen)
        {
            return Err(invalid("listen", reason));
        }
        if c.federation.rounds == 0 {
            return Err(invalid("federation.rounds", "must be at least 1".into()));
        }
        for (i, member) in c.federation.members.iter().enumerate() {
            if let Err(e) = fd_net::membership::member_key(member) {
                return Err(invalid(
                    "federation.members",
                    format!("entry {i} (`{member}`) is not an Ed25519 PeerId: {e}"),
                ));
            }
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

/// What the request server and the round clock share.
struct Shared {
    manifest: FederationManifest,
    /// Signs the control messages (round announcements, done).
    key: SigningKey,
    /// `federation.members` as keys; empty = anyone holding the public set may join.
    allowed: Vec<PublicKey>,
    state: Mutex<CoordinatorState>,
    state_file: Option<PathBuf>,
    changed: Notify,
    telemetry: Arc<Telemetry>,
    /// Traffic already added to `telemetry`.
    counted: Mutex<Traffic>,
}

impl Shared {
    fn state(&self) -> MutexGuard<'_, CoordinatorState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Saves `state` while its lock is held, so saves land in the order of changes.
    fn persist(&self, state: &CoordinatorState) -> Result<(), StateError> {
        match &self.state_file {
            Some(path) => state.save(path),
            None => Ok(()),
        }
    }

    /// Adds the bytes moved since the last call to the telemetry.
    fn count_traffic(&self, client: &Client) {
        let now = client.traffic();
        let mut counted = self.counted.lock().unwrap_or_else(|e| e.into_inner());
        let d = now.since(&counted);
        self.telemetry.bytes(
            d.share_bytes_sent + d.other_bytes_sent,
            d.share_bytes_received + d.other_bytes_received,
        );
        *counted = now;
    }
}

pub const CSV_HEADER: [&str; 22] = [
    "round",
    "node",
    "name",
    "test_accuracy",
    "local_accuracy",
    "bytes_sent",
    "bytes_received",
    "share_bytes",
    "shares_sent",
    "shares_relayed",
    "shares_aggregated",
    "shares_rejected",
    "train_loss",
    "distill_loss",
    "train_seconds",
    "predict_seconds",
    "encode_seconds",
    "network_seconds",
    "verify_seconds",
    "aggregate_seconds",
    "distill_seconds",
    "teacher_rows_kept",
];

/// The fields of one row of [`CSV_HEADER`].
fn csv_fields(m: &RoundMetrics) -> [String; 22] {
    [
        m.round.to_string(),
        m.node.to_hex(),
        m.name.clone(),
        format!("{:.6}", m.test_accuracy),
        format!("{:.6}", m.local_accuracy),
        m.bytes_sent.to_string(),
        m.bytes_received.to_string(),
        m.share_bytes.to_string(),
        m.shares_sent.to_string(),
        m.shares_relayed.to_string(),
        m.shares_aggregated.to_string(),
        m.shares_rejected.to_string(),
        format!("{:.6}", m.train_loss),
        format!("{:.6}", m.distill_loss),
        format!("{:.3}", m.train_seconds),
        format!("{:.3}", m.predict_seconds),
        format!("{:.4}", m.encode_seconds),
        format!("{:.4}", m.network_seconds),
        format!("{:.4}", m.verify_seconds),
        format!("{:.4}", m.aggregate_seconds),
        format!("{:.3}", m.distill_seconds),
        format!("{:.4}", m.teacher_rows_kept),
    ]
}

/// The metrics table as CSV (RFC 4180 quoting by the `csv` crate: a
/// member's name is remote text and may hold commas, quotes or newlines).
pub fn metrics_csv<'a>(
    rows: impl IntoIterator<Item = &'a RoundMetrics>,
) -> anyhow::Result<Vec<u8>> {
    let mut writer = csv::Writer::from_writer(Vec::new());
    writer.write_record(CSV_HEADER)?;
    for m in rows {
        writer.write_record(csv_fields(m))?;
    }
    writer
        .into_inner()
        .map_err(|e| anyhow::anyhow!("cannot write the metrics CSV: {e}"))
}

/// Rewrites the metrics CSV from the closed rounds: derived from the state,
/// it neither loses nor repeats rows when the coordinator restarts.
fn write_csv(path: &Path, closed: &BTreeMap<u64, Vec<RoundMetrics>>) -> anyhow::Result<()> {
    let bytes = metrics_csv(closed.values().flatten())?;
    write_atomic(path, &bytes, 0o644).with_context(|| format!("cannot write {}", path.display()))
}

/// Runs the federation to its last round. Returns every round's metrics.
///
/// With a state file from an earlier run of the same federation it resumes:
/// members are kept (`min_members` is not awaited again once a round has
/// opened), a round left open is announced again to every member with a
/// fresh deadline, otherwise the round after the last closed one opens.
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

    let resumed = match &config.state_file {
        Some(path) => CoordinatorState::load(path, &manifest)?,
        None => None,
    };
    let resuming = resumed.is_some();
    let state = resumed.unwrap_or_else(|| CoordinatorState::new(manifest.clone()));
    if resuming {
        tracing::info!(
            state_file = %config.state_file.as_deref().unwrap_or(Path::new("")).display(),
            members = state.members.len(),
            last_closed = state.last_closed,
            open = ?state.open.as_ref().map(|a| a.round),
            "resuming from the saved state"
        );
    }

    let telemetry = Arc::new(Telemetry::new("coordinator", &manifest.federation_id));
    telemetry.set_members(state.members.len());
    let _metrics_server = match config.metrics_listen {
        Some(addr) => {
            let (bound, server) = telemetry::serve(addr, telemetry.clone()).await?;
            tracing::info!(%bound, "metrics at http://{bound}/metrics");
            Some(server)
        }
        None => None,
    };

    // With a member list, only members may even connect (libp2p allow-list).
    let allowed = config
        .federation
        .member_keys()
        .iter()
        .map(net::peer_id_of)
        .collect::<anyhow::Result<Vec<_>>>()?;
    let net_config = net::NetConfig {
        allowed: (!allowed.is_empty()).then_some(allowed),
        psk: config
            .psk_file
            .as_deref()
            .map(fd_net::load_psk)
            .transpose()?,
        relay_service: config.relay.serve.then_some(config.relay.limits),
        relay: net::RelayUse {
            mode: fd_net::RelayMode::Off,
            ..Default::default()
        },
        ..net::NetConfig::open()
    };
    let net::Network {
        client,
        requests,
        event_loop,
        ..
    } = net::new_with(&key, &net_config)?;
    // Requests refused as busy and relay refusals, among the refusals.
    telemetry.count_busy_from(client.counters());
    // The network's tasks (event loop, request server), owned here: they stop
    // when this function returns, however it returns.
    let mut network = JoinSet::new();
    network.spawn(event_loop.run());
    let mut address = client.listen(config.listen.parse()?).await?;
    address.push(Protocol::P2p(client.local_peer_id()));
    // Restored members are dialled at the addresses they joined with.
    for member in &state.members {
        add_addresses(&client, member).await;
    }
    if let Some(path) = &config.address_file {
        write_atomic(path, format!("{address}\n").as_bytes(), 0o644)
            .with_context(|| format!("cannot write {}", path.display()))?;
    }
    tracing::info!(%address, "coordinator listening");
    emit(CoordinatorEvent::Listening(address.clone()));

    if let Some(path) = &config.metrics_file {
        write_csv(path, &state.closed_metrics())?;
    }
    let started = state.open.is_some() || state.last_closed > 0;
    for member in &state.members {
        emit(CoordinatorEvent::Joined(member.clone()));
    }
    let shared = Arc::new(Shared {
        manifest: manifest.clone(),
        key: key.clone(),
        allowed: config.federation.member_keys(),
        state: Mutex::new(state),
        state_file: config.state_file.clone(),
        changed: Notify::new(),
        telemetry: telemetry.clone(),
        counted: Mutex::new(Traffic::default()),
    });
    let (joined_tx, mut joined_rx) = mpsc::unbounded_channel();
    network.spawn(serve(client.clone(), shared.clone(), requests, joined_tx));

    // Wait for enough members, unless a run before a restart already started rounds.
    if !started {
        loop {
            let notified = shared.changed.notified();
            while let Ok(member) = joined_rx.try_recv() {
                emit(CoordinatorEvent::Joined(member));
            }
            if shared.state().members.len() >= config.min_members {
                break;
            }
            tokio::select! {
                _ = notified => {}
                _ = network.join_next() => bail!("the network stopped before enough members joined"),
            }
        }
    }

    let timeout = Duration::from_secs(config.round_timeout_secs);
    loop {
        while let Ok(member) = joined_rx.try_recv() {
            emit(CoordinatorEvent::Joined(member));
        }
        let next = {
            let mut state = shared.state();
            let next = state.next_round(now_unix_ms() + timeout.as_millis() as u64);
            shared.persist(&state)?;
            next
        };
        let NextRound::Announce(announcement) = next else {
            break;
        };
        let round = announcement.round;
        emit(CoordinatorEvent::RoundStarted(round));
        tracing::info!(
            round,
            members = announcement.members.len(),
            "announcing round"
        );
        let members = announcement.members.clone();
        let signed = SignedControl::sign(Control::Round(announcement), &key)?;
        broadcast(&client, &members, Message::Control(signed)).await;
        shared.count_traffic(&client);

        // Members report after their deadline at the latest; allow a grace period.
        let deadline = tokio::time::Instant::now() + timeout + Duration::from_secs(30);
        loop {
            let notified = shared.changed.notified();
            let (reported, expected) = shared.state().reports();
            if reported >= expected {
                break;
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                tracing::warn!(round, reported, expected, "round closed by deadline");
                break;
            }
        }
        let (round, metrics, closed) = {
            let mut state = shared.state();
            let (round, metrics) = state.close_round().expect("the round is open");
            shared.persist(&state)?;
            (round, metrics, state.closed_metrics())
        };
        if let Some(path) = &config.metrics_file {
            write_csv(path, &closed)?;
        }
        let mean = metrics.iter().map(|m| m.test_accuracy).sum::<f64>() / metrics.len() as f64;
        telemetry.round_completed(round, mean);
        while let Ok(member) = joined_rx.try_recv() {
            emit(CoordinatorEvent::Joined(member));
        }
        emit(CoordinatorEvent::RoundClosed { round, metrics });
    }
    let members = shared.state().members.clone();
    let done = Control::Done {
        federation_id: manifest.federation_id.clone(),
        rounds: manifest.rounds,
    };
    broadcast(
        &client,
        &members,
        Message::Control(SignedControl::sign(done, &key)?),
    )
    .await;
    shared.count_traffic(&client);
    let all = shared.state().closed_metrics();
    network.shutdown().await;
    Ok(all)
}

async fn add_addresses(client: &Client, member: &Member) {
    let Ok(peer) = net::peer_id_of(&member.key) else {
        return;
    };
    for addr in &member.addrs {
        if let Ok(addr) = addr.parse() {
            let _ = client.add_address(peer, addr).await;
        }
    }
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
            tracing::warn!(member = ?member.name, "not reached: {e:#}");
        }
    }
}

async fn serve(
    client: Client,
    shared: Arc<Shared>,
    mut requests: mpsc::Receiver<InboundRequest>,
    joined: mpsc::UnboundedSender<Member>,
) {
    // Catch-up announcements in flight, owned here (stopped with the server);
    // finished ones are reaped as requests come in.
    let mut catch_ups = JoinSet::new();
    while let Some(InboundRequest {
        peer,
        message,
        channel,
    }) = requests.recv().await
    {
        while catch_ups.try_join_next().is_some() {}
        // The open round's announcement, for a member that joins while it runs.
        let mut catch_up = None;
        let answer = match message {
            Message::Join(join) => match check_join(&shared.manifest, &shared.allowed, &join, peer)
            {
                Ok(()) => {
                    add_addresses(&client, &join.member).await;
                    let mut state = shared.state();
                    state.join(join.member.clone());
                    if let Err(e) = shared.persist(&state) {
                        tracing::error!("{e}");
                    }
                    shared.telemetry.set_members(state.members.len());
                    catch_up = state.open.clone();
                    tracing::info!(member = ?join.member.name, %peer, total = state.members.len(), "member joined");
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
                let (node, round) = (m.node, m.round);
                match check_report(&m, peer) {
                    Err(e) => refuse(&shared, peer, "report", &e),
                    Ok(()) => {
                        let mut state = shared.state();
                        match state.record_metrics(m) {
                            Recorded::New => {
                                if let Err(e) = shared.persist(&state) {
                                    tracing::error!("{e}");
                                }
                                shared.telemetry.metrics_received();
                                Message::Ack
                            }
                            Recorded::Repeat => Message::Ack,
                            Recorded::Conflict => {
                                drop(state);
                                let e = ProtocolError::InvalidField {
                                    field: "round",
                                    reason: format!(
                                        "this member already reported round {round} with other values; the first report stands"
                                    ),
                                };
                                refuse(&shared, peer, "report", &e)
                            }
                            Recorded::Ignored => {
                                tracing::debug!(%peer, node = %node.to_hex(), round, "metrics ignored: not a member or not the open round");
                                Message::Ack
                            }
                        }
                    }
                }
            }
            other => {
                let e = ProtocolError::Unexpected(other.kind());
                refuse(&shared, peer, "request", &e)
            }
        };
        // Also wakes the clock waiting for `min_members`.
        shared.changed.notify_waiters();
        if client.respond(channel, answer).await.is_err() {
            return;
        }
        if let Some(announcement) = catch_up {
            // After the Welcome, so the member knows the federation first; in
            // a task, so a slow member does not hold up other requests.
            let client = client.clone();
            let round = announcement.round;
            let signed = match SignedControl::sign(Control::Round(announcement), &shared.key) {
                Ok(signed) => signed,
                Err(e) => {
                    tracing::error!(%peer, round, "cannot sign the round announcement: {e}");
                    continue;
                }
            };
            catch_ups.spawn(async move {
                if let Err(e) = request_with_retry(&client, peer, Message::Control(signed), 3).await
                {
                    tracing::warn!(%peer, round, "round announcement not delivered: {e:#}");
                }
            });
        }
        shared.count_traffic(&client);
    }
}

/// A report is accepted only from the member it describes (the connection's
/// peer must be the key named in it) and only with values a member can have
/// measured ([`RoundMetrics::check`]): it replaces that member's row in the
/// state file, metrics.csv and the round's summary.
fn check_report(m: &RoundMetrics, peer: libp2p::PeerId) -> Result<(), ProtocolError> {
    match net::peer_id_of(&m.node) {
        Ok(id) if id == peer => m.check(),
        _ => Err(ProtocolError::NotSender {
            named: m.node.to_string(),
            peer: peer.to_string(),
        }),
    }
}

/// Logs and counts a refused request; the answer that says why.
fn refuse(shared: &Shared, peer: libp2p::PeerId, what: &str, e: &ProtocolError) -> Message {
    let code = e.reason().as_str();
    tracing::warn!(%peer, reason = code, "{what} refused: {e}");
    shared.telemetry.refused(code);
    Message::Refused {
        code: code.to_string(),
        reason: e.to_string(),
    }
}

fn check_join(
    manifest: &FederationManifest,
    allowed: &[PublicKey],
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
    join.member.check().map_err(|e| e.to_string())?;
    match net::peer_id_of(&join.member.key) {
        Ok(id) if id == peer => {}
        _ => {
            return Err(
                "the member key in the join request is not the key of the connection".into(),
            );
        }
    }
    if !allowed.is_empty() && !allowed.contains(&join.member.key) {
        return Err(format!(
            "{peer} is not in federation `{}`'s member list (federation.members)",
            manifest.federation_id
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use fd_protocol::{JoinRequest, RoundAnnouncement};
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

    const WAIT: Duration = Duration::from_secs(60);
    const COORDINATOR_SEED: [u8; 32] = [200; 32];

    #[test]
    fn the_example_config_parses_and_the_state_file_defaults_beside_it() {
        let path = Path::new("/etc/fd/coordinator.toml");
        let c = CoordinatorConfig::parse(EXAMPLE_CONFIG, path).unwrap();
        assert_eq!(
            c.state_file.as_deref(),
            Some(Path::new("/etc/fd/coordinator-state.json"))
        );
        assert_eq!(c.metrics_listen, None);
        let text = "key_file = \"k\"\nmin_members = 1\nstate_file = \"s/state.json\"\nmetrics_listen = \"127.0.0.1:9101\"\n[federation]\nid = \"f\"\nrounds = 1\n";
        let c = CoordinatorConfig::parse(text, path).unwrap();
        assert_eq!(
            c.state_file.as_deref(),
            Some(Path::new("/etc/fd/s/state.json"))
        );
        assert_eq!(c.metrics_listen, Some("127.0.0.1:9101".parse().unwrap()));
        let bad = text.replace("rounds = 1\n", "rounds = 1\nmembers = [\"nope\"]\n");
        let err = CoordinatorConfig::parse(&bad, path)
            .unwrap_err()
            .to_string();
        assert!(err.contains("federation.members"), "{err}");
    }

    fn config(dir: &Path, id: &str, min_members: usize, members: Vec<String>) -> CoordinatorConfig {
        CoordinatorConfig {
            listen: "/ip4/127.0.0.1/tcp/0".into(),
            key_file: dir.join("coordinator.key"),
            min_members,
            round_timeout_secs: 60,
            metrics_file: Some(dir.join("metrics.csv")),
            address_file: None,
            state_file: Some(dir.join("state.json")),
            metrics_listen: None,
            psk_file: None,
            relay: RelayService::default(),
            federation: FederationConfig {
                id: id.into(),
                rounds: 3,
                public_size: 100,
                subset_size: 20,
                seed: 1,
                members,
                quorum: 0.0,
                schedule: None,
            },
            data: DataSource::Synthetic {
                seed: 3,
                train: 300,
                test: 50,
            },
        }
    }

    fn manifest_of(config: &CoordinatorConfig) -> FederationManifest {
        config
            .federation
            .manifest(&config.data.load().unwrap())
            .unwrap()
    }

    /// A member speaking the protocol in-process, on 127.0.0.1.
    struct TestMember {
        key: SigningKey,
        client: Client,
        requests: mpsc::Receiver<InboundRequest>,
        member: Member,
    }

    impl TestMember {
        async fn new(seed: u8) -> Self {
            let key = SigningKey::from_seed([seed; 32]);
            let (client, requests, event_loop) = net::new(&key).unwrap();
            tokio::spawn(event_loop.run());
            let listen = client
                .listen("/ip4/127.0.0.1/tcp/0".parse().unwrap())
                .await
                .unwrap();
            let member = Member {
                key: key.public_key(),
                name: format!("m{seed}"),
                addrs: vec![listen.to_string()],
            };
            TestMember {
                key,
                client,
                requests,
                member,
            }
        }

        async fn join(&self, coordinator: &Multiaddr, manifest: &FederationManifest) -> Message {
            let (peer, addr) = fd_net::split_peer_addr(coordinator).unwrap();
            self.client.add_address(peer, addr).await.unwrap();
            let join = Message::Join(JoinRequest {
                federation_id: manifest.federation_id.clone(),
                member: self.member.clone(),
                public_set_digest: manifest.public_set.digest,
                train_samples: 10,
            });
            request_with_retry(&self.client, peer, join, 5)
                .await
                .unwrap()
        }

        /// The next request from the coordinator, answered with Ack.
        async fn next(&mut self) -> Message {
            let request = tokio::time::timeout(WAIT, self.requests.recv())
                .await
                .expect("a request from the coordinator in time")
                .expect("the network is up");
            self.client
                .respond(request.channel, Message::Ack)
                .await
                .unwrap();
            request.message
        }

        /// The next control message, checked against the coordinator's key.
        async fn next_control(&mut self) -> Control {
            match self.next().await {
                Message::Control(signed) => signed
                    .verify(&SigningKey::from_seed(COORDINATOR_SEED).public_key())
                    .expect("signed by the coordinator")
                    .clone(),
                other => panic!("expected a control message, got {other:?}"),
            }
        }

        async fn next_round(&mut self) -> RoundAnnouncement {
            match self.next_control().await {
                Control::Round(a) => a,
                other => panic!("expected a round announcement, got {other:?}"),
            }
        }

        async fn next_done(&mut self) -> u64 {
            match self.next_control().await {
                Control::Done { rounds, .. } => rounds,
                other => panic!("expected done, got {other:?}"),
            }
        }

        async fn report(&self, coordinator: &Multiaddr, manifest: &FederationManifest, round: u64) {
            let (peer, _) = fd_net::split_peer_addr(coordinator).unwrap();
            let m = metrics(manifest, &self.member, round);
            let answer = request_with_retry(&self.client, peer, Message::Metrics(m), 5)
                .await
                .unwrap();
            assert_eq!(answer, Message::Ack);
        }
    }

    fn metrics(manifest: &FederationManifest, member: &Member, round: u64) -> RoundMetrics {
        RoundMetrics {
            test_accuracy: 0.1 * round as f64,
            bytes_sent: 1,
            bytes_received: 2,
            share_bytes: 3,
            shares_sent: 1,
            shares_aggregated: 1,
            distilled: true,
            teacher_rows_kept: 0.75,
            ..RoundMetrics::new(&manifest.federation_id, round, member.key, &member.name)
        }
    }

    type Running = tokio::task::JoinHandle<anyhow::Result<BTreeMap<u64, Vec<RoundMetrics>>>>;

    /// Starts the coordinator; returns its task and the address members dial.
    async fn start(config: CoordinatorConfig) -> (Running, Multiaddr) {
        let (tx, mut events) = mpsc::unbounded_channel();
        let key = SigningKey::from_seed(COORDINATOR_SEED);
        let task = tokio::spawn(run(config, key, Some(tx)));
        loop {
            match tokio::time::timeout(WAIT, events.recv()).await.unwrap() {
                Some(CoordinatorEvent::Listening(a)) => return (task, a),
                Some(_) => {}
                None => panic!("coordinator stopped: {:?}", task.await),
            }
        }
    }

    async fn scrape(addr: SocketAddr) -> String {
        let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
        stream
            .write_all(b"GET /metrics HTTP/1.1\r\n\r\n")
            .await
            .unwrap();
        let mut response = String::new();
        stream.read_to_string(&mut response).await.unwrap();
        response
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_restarted_coordinator_announces_the_open_round_again_and_finishes() {
        let dir = tempfile::tempdir().unwrap();
        let dir = dir.path();
        // min_members 5 of which only one ever existed: a resumed federation must not wait.
        let mut config = config(dir, "resume", 5, Vec::new());
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let metrics_addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
        config.metrics_listen = Some(metrics_addr);
        let manifest = manifest_of(&config);
        let mut a = TestMember::new(1).await;

        // What a coordinator that stopped during round 2 of 3 left behind.
        let mut saved = CoordinatorState::new(manifest.clone());
        saved.join(a.member.clone());
        saved.next_round(1);
        assert_eq!(
            saved.record_metrics(metrics(&manifest, &a.member, 1)),
            Recorded::New
        );
        saved.close_round();
        let NextRound::Announce(stale) = saved.next_round(1) else {
            panic!("round 2 opens")
        };
        assert_eq!(stale.round, 2);
        saved.save(config.state_file.as_ref().unwrap()).unwrap();
        let csv = dir.join("metrics.csv");
        write_csv(&csv, &saved.closed_metrics()).unwrap();

        let before = now_unix_ms();
        let (coordinator, address) = start(config.clone()).await;
        let round = a.next_round().await;
        assert_eq!(round.round, 2, "the open round is announced again");
        assert!(
            round.deadline_unix_ms >= before + 59_000,
            "with a fresh deadline"
        );
        assert_eq!(round.members, vec![a.member.clone()]);

        // A member joining mid-round is welcomed, then told the current round.
        let mut b = TestMember::new(2).await;
        assert!(matches!(
            b.join(&address, &manifest).await,
            Message::Welcome { .. }
        ));
        let round = b.next_round().await;
        assert_eq!(round.round, 2);
        assert_eq!(round.members, vec![a.member.clone(), b.member.clone()]);

        // One report of two: round 2 stays open, and the report is saved.
        a.report(&address, &manifest, 2).await;
        tokio::time::sleep(Duration::from_millis(300)).await;
        let state = CoordinatorState::load(config.state_file.as_ref().unwrap(), &manifest)
            .unwrap()
            .unwrap();
        assert_eq!(state.open.as_ref().map(|o| o.round), Some(2));
        assert_eq!(state.metrics[&2].len(), 1);
        assert_eq!(state.members.len(), 2);

        b.report(&address, &manifest, 2).await;
        assert_eq!(a.next_round().await.round, 3);
        assert_eq!(b.next_round().await.round, 3);
        let scraped = scrape(metrics_addr).await;
        for line in [
            "fd_members 2\n",
            "fd_last_round 2\n",
            "fd_rounds_completed_total 1\n",
            "fd_metrics_received_total 2\n",
        ] {
            assert!(scraped.contains(line), "{line} missing from\n{scraped}");
        }
        a.report(&address, &manifest, 3).await;
        b.report(&address, &manifest, 3).await;
        assert_eq!(a.next_done().await, 3);
        assert_eq!(b.next_done().await, 3);

        let all = tokio::time::timeout(WAIT, coordinator)
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        let counts: Vec<(u64, usize)> = all.iter().map(|(r, m)| (*r, m.len())).collect();
        assert_eq!(counts, vec![(1, 1), (2, 2), (3, 2)]);
        // Every row once, the header once.
        let text = std::fs::read_to_string(&csv).unwrap();
        let rounds: Vec<&str> = text.lines().map(|l| l.split(',').next().unwrap()).collect();
        assert_eq!(rounds, vec!["round", "1", "2", "2", "3", "3"]);
        let state = CoordinatorState::load(config.state_file.as_ref().unwrap(), &manifest)
            .unwrap()
            .unwrap();
        assert_eq!((state.last_closed, state.open), (3, None));

        // Restarting a finished federation announces nothing and returns its metrics.
        let (again, _) = start(config).await;
        assert_eq!(a.next_done().await, 3);
        assert_eq!(b.next_done().await, 3);
        let all_again = tokio::time::timeout(WAIT, again)
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        assert_eq!(all_again, all);
        assert_eq!(std::fs::read_to_string(&csv).unwrap(), text);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn reports_are_bound_to_their_sender_and_names_are_quoted_in_the_csv() {
        let dir = tempfile::tempdir().unwrap();
        let config = config(dir.path(), "reports", 2, Vec::new());
        let manifest = manifest_of(&config);
        let (coordinator, address) = start(config.clone()).await;
        let (peer, _) = fd_net::split_peer_addr(&address).unwrap();
        let mut a = TestMember::new(1).await;
        let mut b = TestMember::new(2).await;
        b.member.name = "b, \"quoted\"\nsecond line".into();
        // A control character other than a newline is refused at join.
        let mut c = TestMember::new(3).await;
        c.member.name = "c\u{1b}[31m".into();
        assert!(matches!(
            c.join(&address, &manifest).await,
            Message::JoinRefused { reason } if reason.contains("member.name")
        ));
        for m in [&a, &b] {
            assert!(matches!(
                m.join(&address, &manifest).await,
                Message::Welcome { .. }
            ));
        }
        for round in 1..=3 {
            assert_eq!(a.next_round().await.round, round);
            assert_eq!(b.next_round().await.round, round);
            // Member a reports in b's name: refused, nothing recorded.
            let forged = RoundMetrics {
                test_accuracy: 0.999,
                ..metrics(&manifest, &b.member, round)
            };
            let answer = request_with_retry(&a.client, peer, Message::Metrics(forged), 5)
                .await
                .unwrap();
            assert!(
                matches!(&answer, Message::Refused { code, .. } if code == "not_sender"),
                "{answer:?}"
            );
            a.report(&address, &manifest, round).await;
            b.report(&address, &manifest, round).await;
        }
        assert_eq!(a.next_done().await, 3);
        assert_eq!(b.next_done().await, 3);
        let all = tokio::time::timeout(WAIT, coordinator)
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        assert!(all.values().flatten().all(|m| m.test_accuracy < 0.9));

        let text = std::fs::read(dir.path().join("metrics.csv")).unwrap();
        let mut reader = csv::Reader::from_reader(text.as_slice());
        assert_eq!(reader.headers().unwrap().len(), CSV_HEADER.len());
        assert_eq!(
            reader.headers().unwrap().iter().next_back(),
            Some("teacher_rows_kept")
        );
        let rows: Vec<csv::StringRecord> = reader.records().map(|r| r.unwrap()).collect();
        assert_eq!(rows.len(), 6, "3 rounds × 2 members");
        for row in &rows {
            assert_eq!(row.len(), CSV_HEADER.len());
            let round: f64 = row[0].parse().unwrap();
            let accuracy: f64 = row[3].parse().unwrap();
            assert!((accuracy - 0.1 * round).abs() < 1e-9, "{row:?}");
            assert_eq!(&row[CSV_HEADER.len() - 1], "0.7500", "teacher_rows_kept");
        }
        let names: Vec<&str> = rows.iter().map(|r| &r[2]).collect();
        assert_eq!(names.iter().filter(|n| **n == b.member.name).count(), 3);
        assert_eq!(names.iter().filter(|n| **n == "m1").count(), 3);
    }

    /// The malicious member: after its honest report it sends reports whose
    /// values no member can have measured (NaN or out-of-range accuracies,
    /// negative seconds, a rejection list of megabytes), then a plausible
    /// but different one. Each would replace its honest row in the
    /// coordinator's state file, metrics.csv and the round's summary; each
    /// must be refused, counted, and leave the honest row in place.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn reports_with_impossible_values_are_refused_and_the_honest_row_stays() {
        let dir = tempfile::tempdir().unwrap();
        // Two members, so the round stays open until b reports last.
        let mut config = config(dir.path(), "ranges", 2, Vec::new());
        config.federation.rounds = 1;
        let manifest = manifest_of(&config);
        let (coordinator, address) = start(config.clone()).await;
        let (peer, _) = fd_net::split_peer_addr(&address).unwrap();
        let mut a = TestMember::new(1).await;
        let mut b = TestMember::new(2).await;
        for m in [&a, &b] {
            assert!(matches!(
                m.join(&address, &manifest).await,
                Message::Welcome { .. }
            ));
        }
        assert_eq!(a.next_round().await.round, 1);
        assert_eq!(b.next_round().await.round, 1);
        a.report(&address, &manifest, 1).await;
        let honest = metrics(&manifest, &a.member, 1);
        let mut bad: Vec<(&str, RoundMetrics)> = vec![
            (
                "test_accuracy",
                RoundMetrics {
                    test_accuracy: f64::NAN,
                    ..honest.clone()
                },
            ),
            (
                "local_accuracy",
                RoundMetrics {
                    local_accuracy: 7.0,
                    ..honest.clone()
                },
            ),
            (
                "validation_accuracy",
                RoundMetrics {
                    validation_accuracy: Some(-0.5),
                    ..honest.clone()
                },
            ),
            (
                "teacher_rows_kept",
                RoundMetrics {
                    teacher_rows_kept: f64::INFINITY,
                    ..honest.clone()
                },
            ),
            (
                "train_seconds",
                RoundMetrics {
                    train_seconds: -1.0,
                    ..honest.clone()
                },
            ),
            (
                "distill_loss",
                RoundMetrics {
                    distill_loss: f64::NEG_INFINITY,
                    ..honest.clone()
                },
            ),
            (
                "rejections",
                RoundMetrics {
                    rejections: (0..20_000).map(|i| (format!("code{i:0>100}"), 1)).collect(),
                    ..honest.clone()
                },
            ),
            (
                "rejections",
                RoundMetrics {
                    rejections: vec![("no_such_reason".into(), 1)],
                    ..honest.clone()
                },
            ),
        ];
        // Well-formed but different from the recorded report: a member
        // cannot rewrite its row (nor make the coordinator rewrite its state
        // file on every request); a retry of the same report is answered Ack.
        bad.push((
            "already reported",
            RoundMetrics {
                test_accuracy: 0.99,
                ..honest.clone()
            },
        ));
        assert_eq!(
            request_with_retry(&a.client, peer, Message::Metrics(honest.clone()), 5)
                .await
                .unwrap(),
            Message::Ack
        );
        for (field, report) in bad {
            let answer = request_with_retry(&a.client, peer, Message::Metrics(report), 5)
                .await
                .unwrap();
            assert!(
                matches!(&answer, Message::Refused { code, reason }
                    if code == "invalid_field" && reason.contains(field)),
                "a report with a bad `{field}` was answered {answer:?}"
            );
        }
        b.report(&address, &manifest, 1).await;
        assert_eq!(a.next_done().await, 1);
        assert_eq!(b.next_done().await, 1);
        let all = tokio::time::timeout(WAIT, coordinator)
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        let recorded: Vec<&RoundMetrics> = all[&1].iter().filter(|m| m.node == a.member.key).collect();
        assert_eq!(recorded, vec![&honest], "the honest report is what was recorded");
        let text = std::fs::read_to_string(dir.path().join("metrics.csv")).unwrap();
        assert!(!text.contains("NaN") && !text.contains("inf"), "{text}");
    }

    #[tokio::test]
    async fn a_state_file_of_another_federation_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let config = config(dir.path(), "mine", 1, Vec::new());
        let mut other = config.clone();
        other.federation.id = "theirs".into();
        let path = config.state_file.clone().unwrap();
        CoordinatorState::new(manifest_of(&other))
            .save(&path)
            .unwrap();
        let err = run(config, SigningKey::from_seed([200; 32]), None)
            .await
            .unwrap_err();
        let err = format!("{err:#}");
        assert!(err.contains(&path.display().to_string()), "{err}");
        assert!(err.contains("`theirs`"), "{err}");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_peer_outside_the_member_list_cannot_connect_or_join() {
        let dir = tempfile::tempdir().unwrap();
        let insider = TestMember::new(1).await;
        let mut outsider = TestMember::new(2).await;
        let listed = net::peer_id_of(&insider.key.public_key())
            .unwrap()
            .to_string();
        let config = config(dir.path(), "closed", 1, vec![listed]);
        let manifest = manifest_of(&config);
        let (coordinator, address) = start(config).await;

        // The allow-list closes the outsider's connection before it can ask.
        let (peer, addr) = fd_net::split_peer_addr(&address).unwrap();
        outsider.client.add_address(peer, addr).await.unwrap();
        let join = Message::Join(JoinRequest {
            federation_id: manifest.federation_id.clone(),
            member: outsider.member.clone(),
            public_set_digest: manifest.public_set.digest,
            train_samples: 10,
        });
        let answer = request_with_retry(&outsider.client, peer, join, 2).await;
        assert!(answer.is_err(), "an outsider was answered {answer:?}");
        // Behind the allow-list, the join check refuses the key too.
        let outsider_id = net::peer_id_of(&outsider.key.public_key()).unwrap();
        let refusal = check_join(
            &manifest,
            &[insider.key.public_key()],
            &JoinRequest {
                federation_id: manifest.federation_id.clone(),
                member: outsider.member.clone(),
                public_set_digest: manifest.public_set.digest,
                train_samples: 10,
            },
            outsider_id,
        )
        .unwrap_err();
        assert!(refusal.contains(&outsider_id.to_string()), "{refusal}");
        assert!(matches!(
            insider.join(&address, &manifest).await,
            Message::Welcome { .. }
        ));
        // The outsider is never announced a round.
        assert!(
            tokio::time::timeout(Duration::from_millis(500), outsider.requests.recv())
                .await
                .is_err()
        );
        coordinator.abort();
    }
}

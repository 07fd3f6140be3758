//! Runs one experiment (one sweep cell) and returns its rows.
//!
//! Every algorithm starts from the same [`MemberData`]: one copy of the data
//! in memory, one public split, one partition, so isolated, FedAvg, FD and
//! centralized runs of a seed see identical private sets. Federated
//! distillation is the [`RoundEngine`] of `fd-node`, over the in-memory
//! network ([`crate::memnet`]) or over one libp2p swarm per member on
//! 127.0.0.1; the baselines drive the same [`LocalMember`] learning steps.
//!
//! Members run concurrently as tokio tasks; their learning steps wait for
//! one of `jobs` permits, so `jobs` bounds CPU and memory use without
//! changing any number (each member's learning is deterministic on its own
//! and shares are aggregated in sender-key order).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Instant;

use anyhow::{Context as _, bail};
use fd_node::member::{LocalMember, MemberData};
use fd_net::Traffic;
use fd_node::round::{RoundEngine, RoundPlan, SecureSum, ShareTransport, SharedInbox};
use fd_node::runtime::{Libp2pTransport, MemberNetwork};
use fd_protocol::{LogitShare, Member, RoundMetrics, SigningKey, digest};
use indicatif::{MultiProgress, ProgressBar, ProgressStyle};
use tokio::sync::Semaphore;
use tokio::task::JoinSet;

use crate::audit::{AuditSummary, Eavesdropper, Truth};
use crate::experiment::{Algorithm, Experiment, Network};
use crate::memnet::{MemoryEndpoint, MemoryNetwork};
use crate::scenario::stream;
use crate::secure::SecureHub;
use crate::topology::out_neighbours;

/// One member in one round: the deterministic numbers (`metrics.csv`).
#[derive(Debug, Clone, PartialEq)]
pub struct NodeRow {
    pub round: u64,
    pub node: usize,
    pub model: String,
    /// Took part in the round (picked and not dropped).
    pub active: bool,
    pub byzantine: bool,
    pub test_accuracy: f64,
    pub local_accuracy: f64,
    pub train_loss: f64,
    pub distill_loss: f64,
    pub bytes_sent: u64,
    pub bytes_received: u64,
    pub shares_aggregated: u32,
    pub shares_rejected: u32,
    pub shares_late: u64,
    /// Fraction of the round's public rows the member distilled (fd; 0 when
    /// it did not distil).
    pub teacher_rows_kept: f64,
    /// Fraction of the kept public rows on which the teacher this member
    /// distilled towards this round agreed with their labels (fd; empty
    /// when it did not distil): how good the knowledge was, apart from how
    /// well it was distilled.
    pub teacher_accuracy: Option<f64>,
    /// Leakage audit ([`crate::audit`]): TV distance between the curious
    /// member's estimate of this member's label distribution and the truth;
    /// `None` when not audited, for the curious member itself, or when it
    /// heard nothing from this member this round.
    pub audit_tv: Option<f64>,
    /// ε spent so far (at the experiment's `[dp] delta`) by a member that
    /// trains with DP-SGD; `None` without DP.
    pub dp_epsilon: Option<f64>,
    /// Accuracy on the member's validation split of the student it kept
    /// (`[rollback]`); `None` without a validation split.
    pub validation_accuracy: Option<f64>,
    /// The member undid this round's distillation ([`fd_node::rollback`]).
    pub rolled_back: bool,
    /// Simulated clock at the end of the round (memory network; wall clock over libp2p).
    pub sim_seconds: f64,
}

/// One member in one round: measured wall-clock seconds (`timings.csv`).
#[derive(Debug, Clone, PartialEq)]
pub struct TimingRow {
    pub round: u64,
    pub node: usize,
    pub train: f64,
    pub predict: f64,
    pub encode: f64,
    pub network: f64,
    pub verify: f64,
    pub aggregate: f64,
    pub distill: f64,
}

#[derive(Debug, Clone, Default)]
pub struct RunResult {
    pub rows: Vec<NodeRow>,
    pub timings: Vec<TimingRow>,
    /// Wall-clock seconds of each round.
    pub round_wall_seconds: Vec<f64>,
    /// Wall-clock seconds of the whole run, data loading included.
    pub wall_seconds: f64,
    /// Private samples per member.
    pub private_sizes: Vec<usize>,
    pub byzantine: Vec<usize>,
    /// The leakage audit, when `[audit]` is enabled.
    pub audit: Option<AuditSummary>,
}

/// Progress display: rounds and members of the current round.
pub struct Progress {
    rounds: ProgressBar,
    nodes: ProgressBar,
}

impl Progress {
    pub fn new(multi: &MultiProgress, label: &str, rounds: u64, nodes: usize) -> Self {
        let style = ProgressStyle::with_template("{prefix:>24} {bar:30} {pos}/{len} {msg}")
            .expect("valid template");
        let r = multi.add(ProgressBar::new(rounds).with_style(style.clone()));
        r.set_prefix(format!("{label} rounds"));
        let n = multi.add(ProgressBar::new(nodes as u64).with_style(style));
        n.set_prefix("members");
        Progress {
            rounds: r,
            nodes: n,
        }
    }

    pub fn hidden() -> Self {
        Progress {
            rounds: ProgressBar::hidden(),
            nodes: ProgressBar::hidden(),
        }
    }

    fn start_round(&self, members: usize) {
        self.nodes.set_length(members as u64);
        self.nodes.set_position(0);
    }

    fn member_done(&self) {
        self.nodes.inc(1);
    }

    fn round_done(&self, mean_accuracy: f64) {
        self.rounds.inc(1);
        self.rounds
            .set_message(format!("mean accuracy {mean_accuracy:.4}"));
    }

    pub fn finish(&self) {
        self.nodes.finish_and_clear();
        self.rounds.finish_and_clear();
    }
}

/// Member `index`'s signing key in a simulation with `seed`.
pub fn member_key(seed: u64, index: usize) -> SigningKey {
    SigningKey::from_seed(digest::sha256(format!("fd-sim member {seed} {index}").as_bytes()).0)
}

/// Peak resident memory of this process so far (Linux `VmHWM`), in bytes.
pub fn peak_rss_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

/// Loads the data and splits it once for every member.
pub fn prepare_data(e: &Experiment) -> anyhow::Result<MemberData> {
    let config = e.node_config(0);
    let data = config
        .data
        .load()
        .with_context(|| format!("cannot load the data of experiment {}", e.name))?;
    MemberData::from_data(&config, Arc::new(data))
}

/// Runs `e` on `shared` (from [`prepare_data`]).
pub async fn run(
    e: &Experiment,
    shared: &MemberData,
    progress: &Progress,
) -> anyhow::Result<RunResult> {
    let start = Instant::now();
    let mut result = match e.algorithm {
        Algorithm::Fd => run_fd(e, shared, progress).await?,
        Algorithm::Isolated => run_isolated(e, shared, progress).await?,
        Algorithm::Fedavg => run_fedavg(e, shared, progress).await?,
        Algorithm::Centralized => run_centralized(e, shared, progress).await?,
    };
    result.wall_seconds = start.elapsed().as_secs_f64();
    result.private_sizes = shared.parts.iter().map(Vec::len).collect();
    progress.finish();
    Ok(result)
}

fn members(e: &Experiment) -> Vec<Member> {
    (0..e.nodes)
        .map(|i| Member {
            key: member_key(e.seed, i).public_key(),
            name: format!("node-{i}"),
            addrs: vec![],
        })
        .collect()
}

/// Every member's round engine, learning behind one semaphore of `jobs`
/// permits; `None` marks an engine lent to a round task.
fn build_engines(e: &Experiment, shared: &MemberData) -> anyhow::Result<Vec<Option<RoundEngine>>> {
    let slots = Arc::new(Semaphore::new(e.jobs));
    (0..e.nodes)
        .map(|i| {
            let member = LocalMember::with_data(&e.node_config(i), shared, i)?;
            Ok(Some(
                RoundEngine::new(member, member_key(e.seed, i), e.encoding.0)
                    .with_learning_slots(slots.clone()),
            ))
        })
        .collect()
}

fn timing(round: u64, node: usize, m: &RoundMetrics) -> TimingRow {
    TimingRow {
        round,
        node,
        train: m.train_seconds,
        predict: m.predict_seconds,
        encode: m.encode_seconds,
        network: m.network_seconds,
        verify: m.verify_seconds,
        aggregate: m.aggregate_seconds,
        distill: m.distill_seconds,
    }
}

fn row_from(e: &Experiment, round: u64, node: usize, m: &RoundMetrics) -> NodeRow {
    NodeRow {
        round,
        node,
        model: e.model_of(node).name(),
        active: true,
        byzantine: false,
        test_accuracy: m.test_accuracy,
        local_accuracy: m.local_accuracy,
        train_loss: m.train_loss,
        distill_loss: m.distill_loss,
        bytes_sent: m.bytes_sent,
        bytes_received: m.bytes_received,
        shares_aggregated: m.shares_aggregated,
        shares_rejected: m.shares_rejected,
        shares_late: 0,
        teacher_rows_kept: m.teacher_rows_kept,
        audit_tv: None,
        teacher_accuracy: None,
        dp_epsilon: None,
        validation_accuracy: m.validation_accuracy,
        rolled_back: m.rolled_back,
        sim_seconds: 0.0,
    }
}

/// The row of a member that sat a round out: its last accuracy carries over.
fn idle_row(e: &Experiment, round: u64, node: usize, previous: Option<&NodeRow>) -> NodeRow {
    NodeRow {
        round,
        node,
        model: e.model_of(node).name(),
        active: false,
        byzantine: false,
        test_accuracy: previous.map_or(0.0, |r| r.test_accuracy),
        local_accuracy: previous.map_or(0.0, |r| r.local_accuracy),
        train_loss: 0.0,
        distill_loss: 0.0,
        bytes_sent: 0,
        bytes_received: 0,
        shares_aggregated: 0,
        shares_rejected: 0,
        shares_late: 0,
        teacher_rows_kept: 0.0,
        audit_tv: None,
        teacher_accuracy: None,
        dp_epsilon: previous.and_then(|r| r.dp_epsilon),
        validation_accuracy: previous.and_then(|r| r.validation_accuracy),
        rolled_back: false,
        sim_seconds: 0.0,
    }
}

fn mean_accuracy(rows: &[NodeRow]) -> f64 {
    let honest: Vec<f64> = rows
        .iter()
        .filter(|r| !r.byzantine)
        .map(|r| r.test_accuracy)
        .collect();
    honest.iter().sum::<f64>() / honest.len().max(1) as f64
}

/// Shares over the in-memory network or libp2p, or secure aggregation
/// through the hub: one round engine, three carriers. One per member, so
/// the libp2p variant's size does not matter.
#[allow(clippy::large_enum_variant)]
enum SimTransport {
    Memory(MemoryEndpoint),
    /// A member's own libp2p stack; under secure aggregation the curious
    /// member's transport also takes the audit's notes from its sums.
    Libp2p(Libp2pTransport, Option<SumAudit>),
    /// Member `.1`'s side of the secure-aggregation hub (no plain shares).
    Secure(Arc<SecureHub>, usize),
}

/// The curious member's view under secure aggregation over libp2p: what
/// the hub notes for it in memory, from the sums it unmasked itself.
struct SumAudit {
    spy: Arc<Eavesdropper>,
    /// Member index of each key.
    index_of: std::collections::HashMap<fd_protocol::PublicKey, usize>,
}

impl SumAudit {
    /// Notes one guess for every other member of the round from the sum
    /// minus this member's own encoded input (`own`).
    fn note(&self, plan: &RoundPlan, own: &[u32], sum: &SecureSum) {
        let members = plan.targets.iter().filter_map(|m| self.index_of.get(&m.key).copied());
        crate::secure::note_guess_from_sum(&self.spy, plan.round, own, &sum.sums, members);
    }
}

impl ShareTransport for SimTransport {
    fn begin_round(&self, plan: &RoundPlan) {
        match self {
            SimTransport::Memory(t) => t.begin_round(plan),
            SimTransport::Libp2p(t, _) => t.begin_round(plan),
            SimTransport::Secure(..) => {}
        }
    }

    async fn push(
        &self,
        plan: &RoundPlan,
        peer: &Member,
        share: &LogitShare,
    ) -> anyhow::Result<()> {
        match self {
            SimTransport::Memory(t) => t.push(plan, peer, share).await,
            SimTransport::Libp2p(t, _) => t.push(plan, peer, share).await,
            SimTransport::Secure(..) => bail!("no plain shares under secure aggregation"),
        }
    }

    async fn wait_for_shares(&self, plan: &RoundPlan, inbox: &SharedInbox) {
        match self {
            SimTransport::Memory(t) => t.wait_for_shares(plan, inbox).await,
            SimTransport::Libp2p(t, _) => t.wait_for_shares(plan, inbox).await,
            SimTransport::Secure(..) => {}
        }
    }

    fn round_traffic(&self, round: u64) -> Traffic {
        match self {
            SimTransport::Memory(t) => t.round_traffic(round),
            SimTransport::Libp2p(t, _) => t.round_traffic(round),
            SimTransport::Secure(..) => Traffic::default(),
        }
    }

    async fn secure_sum(
        &self,
        plan: &RoundPlan,
        key: &SigningKey,
        encoded: Vec<u32>,
    ) -> anyhow::Result<SecureSum> {
        match self {
            SimTransport::Secure(hub, index) => hub.submit(*index, plan.round, key, encoded).await,
            SimTransport::Libp2p(t, audit) => {
                let own = audit.as_ref().map(|_| encoded.clone());
                let sum = t.secure_sum(plan, key, encoded).await?;
                if let (Some(audit), Some(own)) = (audit, own) {
                    audit.note(plan, &own, &sum);
                }
                Ok(sum)
            }
            SimTransport::Memory(_) => {
                bail!("secure aggregation needs the hub (`[secure_aggregation] enabled = true`)")
            }
        }
    }
}

/// Federated distillation with the fd round engine.
async fn run_fd(
    e: &Experiment,
    shared: &MemberData,
    progress: &Progress,
) -> anyhow::Result<RunResult> {
    let n = e.nodes;
    let byzantine = e.scenario.byzantine_members(n, e.seed);
    let classes = shared.data.train.classes;
    let mut engines = build_engines(e, shared)?;
    for &i in &byzantine {
        let (attack, seed) = (e.scenario.attack, e.seed);
        engines[i] = engines[i].take().map(|engine| {
            engine.with_tamper(Box::new(move |round, logits| {
                attack.apply(
                    logits,
                    classes,
                    &mut stream(seed, "attack", round, i as u64),
                );
            }))
        });
    }

    if e.secure_aggregation.enabled {
        for engine in engines.iter_mut() {
            let secure = engine.take().map(RoundEngine::with_secure_aggregation).transpose()?;
            *engine = secure;
        }
    }
    let spy = e
        .audit
        .enabled
        .then(|| Arc::new(Eavesdropper::new(&e.audit, classes)));
    // In memory the hub carries secure aggregation; over libp2p each
    // member's own transport does.
    let hub = (e.secure_aggregation.enabled && e.network == Network::Memory).then(|| {
        SecureHub::new(&e.name, e.seed, &e.secure_aggregation, classes, spy.clone())
    });

    // The carrier: one in-memory network, or one swarm per member on
    // 127.0.0.1, or the secure-aggregation hub.
    let mut members = members(e);
    let mut memory = None;
    // The members' libp2p stacks (`Network::Libp2p`), owned by this run.
    let mut networks: Vec<MemberNetwork> = Vec::new();
    let transports: Vec<Arc<SimTransport>> = match e.network {
        Network::Memory if hub.is_some() => {
            let hub = hub.clone().expect("checked");
            (0..n)
                .map(|i| Arc::new(SimTransport::Secure(hub.clone(), i)))
                .collect()
        }
        Network::Memory => {
            let inboxes = engines
                .iter()
                .map(|x| x.as_ref().unwrap().inbox().clone())
                .collect();
            let network = MemoryNetwork::new(&members, inboxes, e.scenario.clone());
            memory = Some(network.clone());
            (0..n)
                .map(|i| Arc::new(SimTransport::Memory(network.endpoint(i))))
                .collect()
        }
        Network::Libp2p => {
            // Every member's key and index, for the curious member's notes.
            let index_of: HashMap<fd_protocol::PublicKey, usize> =
                members.iter().enumerate().map(|(i, m)| (m.key, i)).collect();
            let mut transports = Vec::with_capacity(n);
            for (i, engine) in engines.iter().enumerate() {
                let engine = engine.as_ref().unwrap();
                let config = fd_net::NetConfig {
                    federation_id: e.name.clone(),
                    ..fd_net::NetConfig::open()
                };
                let mut network =
                    MemberNetwork::start(engine.key(), &config, &["/ip4/127.0.0.1/tcp/0".parse()?])
                        .await?;
                members[i].addrs = network.listening().iter().map(|a| a.to_string()).collect();
                // The simulator runs the clock itself: no control plane.
                network.serve(
                    engine.inbox().clone(),
                    Arc::new(fd_net::telemetry::Telemetry::default()),
                    None,
                    &e.name,
                );
                let mut transport = Libp2pTransport::new(network.client().clone());
                let mut audit = None;
                if e.secure_aggregation.enabled {
                    let config = fd_node::config::SecureAggregationConfig {
                        enabled: true,
                        threshold: e.secure_aggregation.threshold,
                        ..Default::default()
                    };
                    let mailbox = network.secure_mailbox().expect("serve ran above");
                    transport = transport.with_secure_aggregation(mailbox, config, classes);
                    audit = spy.as_ref().filter(|s| s.curious == i).map(|spy| SumAudit {
                        spy: spy.clone(),
                        index_of: index_of.clone(),
                    });
                }
                networks.push(network);
                transports.push(Arc::new(SimTransport::Libp2p(transport, audit)));
            }
            transports
        }
    };
    for engine in engines.iter().flatten() {
        engine.inbox().set_members(&members);
    }
    // The leakage audit: the curious member's notes, taken on delivery.
    // (Under secure aggregation the hub takes the notes instead.)
    let audit = spy.map(|spy| {
        if let Some(network) = &memory {
            let notes = spy.clone();
            network.on_delivery(Box::new(move |from, to, share| {
                notes.observe(from, to, share)
            }));
        }
        let truth = Truth::new(&shared.data.train.labels, classes, &shared.parts);
        (spy, truth)
    });

    let hears = e.topology.in_neighbours(n, e.seed);
    let tells = out_neighbours(&hears);
    let mut result = RunResult {
        byzantine: byzantine.clone(),
        ..RunResult::default()
    };
    let mut clock = 0.0f64;
    let mut last: Vec<Option<NodeRow>> = vec![None; n];
    for round in 1..=e.rounds {
        let round_start = Instant::now();
        let draw = e.scenario.draw(n, e.seed, round);
        let active = draw.active();
        if let Some(network) = &memory {
            network.start_round(round, active.len(), draw.delays.clone());
        }
        if let Some(hub) = &hub {
            hub.start_round(round, active.clone());
        }
        progress.start_round(active.len());
        let deadline = match e.network {
            Network::Memory => None,
            Network::Libp2p => Some(
                tokio::time::Instant::now()
                    + std::time::Duration::from_secs_f64(e.scenario.deadline),
            ),
        };
        // Every inbox opens the round before any member can push to it.
        for engine in engines.iter().flatten() {
            engine.inbox().announce(round);
        }
        let mut tasks = JoinSet::new();
        let mut expected_of = vec![0usize; n];
        for &i in &active {
            let targets: Vec<Member> = tells[i]
                .iter()
                .filter(|j| active.binary_search(j).is_ok())
                .map(|&j| members[j].clone())
                .collect();
            // A receiver cannot know who dropped out: it expects everyone picked.
            let expected = hears[i]
                .iter()
                .filter(|j| draw.picked.binary_search(j).is_ok())
                .count();
            expected_of[i] = expected;
            let plan = RoundPlan::new(round, targets, expected, e.scenario.quorum, deadline);
            let mut engine = engines[i].take().expect("engine is home between rounds");
            let transport = transports[i].clone();
            tasks.spawn(async move {
                let metrics = engine.run_round(&plan, transport.as_ref()).await;
                (i, engine, metrics)
            });
        }
        let mut metrics: Vec<Option<RoundMetrics>> = vec![None; n];
        while let Some(joined) = tasks.join_next().await {
            let (i, engine, m) = joined.context("a member's round task failed")?;
            engines[i] = Some(engine);
            metrics[i] = Some(m.with_context(|| format!("member {i}, round {round}"))?);
            progress.member_done();
        }
        let wall = round_start.elapsed().as_secs_f64();
        // The simulated clock: a receiver's round closes at its last on-time
        // share, or at the deadline if an expected share never came.
        let (late, round_seconds) = match &memory {
            Some(network) => {
                let t = network.timing();
                let close = active
                    .iter()
                    .map(|&r| {
                        if t.arrivals[r].len() >= expected_of[r] {
                            t.arrivals[r].iter().copied().fold(0.0, f64::max)
                        } else {
                            e.scenario.deadline
                        }
                    })
                    .fold(0.0, f64::max);
                (t.late, close)
            }
            // Secure aggregation: four message steps, each one link's
            // latency plus the largest inbound volume over its bandwidth
            // (learning time is not simulated, as over the memory network).
            None if hub.is_some() => {
                let inbound = metrics
                    .iter()
                    .flatten()
                    .map(|m| m.bytes_received)
                    .max()
                    .unwrap_or(0);
                let transfer = if e.scenario.bandwidth > 0.0 {
                    inbound as f64 / e.scenario.bandwidth
                } else {
                    0.0
                };
                (vec![0; n], 4.0 * e.scenario.latency + transfer)
            }
            None => (vec![0; n], wall),
        };
        clock += round_seconds;
        let heard = audit
            .as_ref()
            .map(|(spy, _)| spy.round(round))
            .unwrap_or_default();
        let mut rows = Vec::with_capacity(n);
        for i in 0..n {
            let mut row = match &metrics[i] {
                Some(m) => {
                    result.timings.push(timing(round, i, m));
                    row_from(e, round, i, m)
                }
                None => idle_row(e, round, i, last[i].as_ref()),
            };
            row.byzantine = byzantine.contains(&i);
            row.shares_late = late[i];
            if let Some((spy, truth)) = &audit {
                row.audit_tv = heard
                    .get(&i)
                    .filter(|_| i != spy.curious)
                    .map(|guess| crate::audit::total_variation(guess, &truth.members[i]));
            }
            row.sim_seconds = clock;
            row.dp_epsilon = engines[i]
                .as_ref()
                .and_then(|engine| engine.member().learner.dp_epsilon());
            if metrics[i].as_ref().is_some_and(|m| m.distilled) {
                row.teacher_accuracy = engines[i]
                    .as_ref()
                    .and_then(|engine| engine.member().last_teacher_accuracy);
            }
            last[i] = Some(row.clone());
            rows.push(row);
        }
        progress.round_done(mean_accuracy(&rows));
        result.rows.extend(rows);
        result.round_wall_seconds.push(wall);
    }
    if let Some((_, truth)) = &audit {
        result.audit = Some(AuditSummary::new(&e.audit, truth, &result.rows, e.rounds));
    }
    drop(transports);
    for network in networks {
        network.shutdown().await;
    }
    Ok(result)
}

/// No collaboration: every member trains on its own data each round.
async fn run_isolated(
    e: &Experiment,
    shared: &MemberData,
    progress: &Progress,
) -> anyhow::Result<RunResult> {
    let mut engines = build_engines(e, shared)?;
    let mut result = RunResult::default();
    for round in 1..=e.rounds {
        let round_start = Instant::now();
        progress.start_round(e.nodes);
        let mut tasks = JoinSet::new();
        for (i, slot) in engines.iter_mut().enumerate() {
            let mut engine = slot.take().expect("engine is home between rounds");
            tasks.spawn(async move {
                let m = engine.run_local_round(round).await;
                (i, engine, m)
            });
        }
        let mut rows = vec![None; e.nodes];
        while let Some(joined) = tasks.join_next().await {
            let (i, engine, m) = joined.context("a member's round task failed")?;
            let m = m?;
            engines[i] = Some(engine);
            result.timings.push(timing(round, i, &m));
            let mut row = row_from(e, round, i, &m);
            row.dp_epsilon = engines[i]
                .as_ref()
                .and_then(|engine| engine.member().learner.dp_epsilon());
            rows[i] = Some(row);
            progress.member_done();
        }
        let rows: Vec<NodeRow> = rows.into_iter().flatten().collect();
        progress.round_done(mean_accuracy(&rows));
        result.rows.extend(rows);
        result
            .round_wall_seconds
            .push(round_start.elapsed().as_secs_f64());
    }
    result.timings.sort_by_key(|t| (t.round, t.node));
    Ok(result)
}

/// Bytes of one weight upload or download, framed like a share: length
/// prefix, version, vector length, then f32 values.
pub fn fedavg_frame_bytes(params: usize) -> u64 {
    4 + 2 + 8 + 4 * params as u64
}

/// FedAvg: picked members download the global model, train locally and
/// upload their weights; the server averages them weighted by sample count.
async fn run_fedavg(
    e: &Experiment,
    shared: &MemberData,
    progress: &Progress,
) -> anyhow::Result<RunResult> {
    let mut engines = build_engines(e, shared)?;
    // Every member starts from member 0's initial weights, as FedAvg prescribes.
    let mut global: Vec<f32> = engines[0].as_ref().unwrap().member().learner.weights();
    let frame = fedavg_frame_bytes(global.len());
    let mut result = RunResult::default();
    let mut last: Vec<Option<NodeRow>> = vec![None; e.nodes];
    for round in 1..=e.rounds {
        let round_start = Instant::now();
        let draw = e.scenario.draw(e.nodes, e.seed, round);
        let active = draw.active();
        progress.start_round(active.len());
        let mut tasks = JoinSet::new();
        for &i in &active {
            let mut engine = engines[i].take().expect("engine is home between rounds");
            let weights = global.clone();
            tasks.spawn(async move {
                let out = engine
                    .learn(move |m| -> anyhow::Result<_> {
                        m.learner
                            .set_weights(&weights)
                            .map_err(|e| anyhow::anyhow!(e))?;
                        let loss = m.train();
                        let local = m.evaluate();
                        Ok((loss, local, m.learner.weights(), m.private.len(), m.times))
                    })
                    .await;
                (i, engine, out)
            });
        }
        let mut uploads = vec![None; e.nodes];
        while let Some(joined) = tasks.join_next().await {
            let (i, engine, out) = joined.context("a member's round task failed")?;
            engines[i] = Some(engine);
            uploads[i] = Some(out??);
            progress.member_done();
        }
        // Weighted average, in member order.
        let total: usize = uploads.iter().flatten().map(|u| u.3).sum();
        if total == 0 {
            bail!("round {round}: the picked members hold no samples");
        }
        let mut sum = vec![0f64; global.len()];
        for (_, _, weights, samples, _) in uploads.iter().flatten() {
            let w = *samples as f64 / total as f64;
            for (s, x) in sum.iter_mut().zip(weights) {
                *s += w * f64::from(*x);
            }
        }
        global = sum.into_iter().map(|x| x as f32).collect();
        // The global model is the same for everyone: evaluate it once.
        let evaluator = active[0];
        let mut engine = engines[evaluator].take().unwrap();
        let weights = global.clone();
        let accuracy = engine
            .learn(move |m| -> anyhow::Result<f64> {
                m.learner
                    .set_weights(&weights)
                    .map_err(|e| anyhow::anyhow!(e))?;
                Ok(m.evaluate())
            })
            .await??;
        engines[evaluator] = Some(engine);
        let mut rows = Vec::with_capacity(e.nodes);
        for i in 0..e.nodes {
            let row = match &uploads[i] {
                Some((loss, local, _, _, times)) => {
                    result.timings.push(TimingRow {
                        round,
                        node: i,
                        train: times.train,
                        predict: 0.0,
                        encode: 0.0,
                        network: 0.0,
                        verify: 0.0,
                        aggregate: 0.0,
                        distill: 0.0,
                    });
                    NodeRow {
                        round,
                        node: i,
                        model: e.model_of(i).name(),
                        active: true,
                        byzantine: false,
                        test_accuracy: accuracy,
                        local_accuracy: *local,
                        train_loss: *loss,
                        distill_loss: 0.0,
                        bytes_sent: frame,
                        bytes_received: frame,
                        shares_aggregated: 0,
                        shares_rejected: 0,
                        shares_late: 0,
                        teacher_rows_kept: 0.0,
                        audit_tv: None,
                        teacher_accuracy: None,
                        dp_epsilon: None,
                        validation_accuracy: None,
                        rolled_back: false,
                        sim_seconds: 0.0,
                    }
                }
                None => NodeRow {
                    test_accuracy: accuracy,
                    ..idle_row(e, round, i, last[i].as_ref())
                },
            };
            last[i] = Some(row.clone());
            rows.push(row);
        }
        progress.round_done(mean_accuracy(&rows));
        result.rows.extend(rows);
        result
            .round_wall_seconds
            .push(round_start.elapsed().as_secs_f64());
    }
    Ok(result)
}

/// One model on every member's private data pooled: the upper bound.
async fn run_centralized(
    e: &Experiment,
    shared: &MemberData,
    progress: &Progress,
) -> anyhow::Result<RunResult> {
    let mut pooled: Vec<usize> = shared.parts.iter().flatten().copied().collect();
    pooled.sort_unstable();
    let data = MemberData {
        parts: Arc::new(vec![pooled]),
        ..shared.clone()
    };
    let mut config = e.node_config(0);
    config.name = "central".into();
    let member = LocalMember::with_data(&config, &data, 0)?;
    let mut engine = RoundEngine::new(member, member_key(e.seed, 0), e.encoding.0);
    let mut result = RunResult::default();
    for round in 1..=e.rounds {
        let round_start = Instant::now();
        progress.start_round(1);
        let m = engine.run_local_round(round).await?;
        progress.member_done();
        result.timings.push(timing(round, 0, &m));
        let row = row_from(e, round, 0, &m);
        progress.round_done(row.test_accuracy);
        result.rows.push(row);
        result
            .round_wall_seconds
            .push(round_start.elapsed().as_secs_f64());
    }
    Ok(result)
}

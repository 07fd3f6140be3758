//! A node's configuration file (TOML).
//!
//! [`EXAMPLE_CONFIG`] documents every field; it is what `fd-node --help`
//! prints and a test parses it, so the documentation cannot drift from the
//! parser. Relative paths are resolved against the config file's folder, so
//! a federation's configs can be moved around as a unit.

use std::path::{Path, PathBuf};

use fd_data::DataSource;
use fd_data::partition::Partitioner;
use fd_protocol::PayloadEncodingName;
use serde::{Deserialize, Serialize};

// The `[federation]` table and config errors are shared with the coordinator,
// so they live in fd-net (below both); a node config embeds them.
pub use fd_net::config::{
    ConfigError, FederationConfig, RelayConfig, RelayLimits, RelayMode, Schedule, resolve,
};

use crate::aggregate::Aggregator;
use crate::device::DeviceKind;
use crate::knowledge::{KnowledgeConfig, Selector};
use crate::learner::TrainingConfig;
use crate::model::ModelConfig;
use crate::privacy::DpConfig;

/// An annotated node config: every field, its meaning and its default.
pub const EXAMPLE_CONFIG: &str = r#"# fd-node configuration file (TOML): every field, its meaning, its default.
# Relative paths are relative to this file.

name = "node-0"                       # shown in logs and tables
listen = "/ip4/127.0.0.1/tcp/0"       # libp2p listen address (tcp/0 = any free port), or a list:
                                      # ["/ip4/0.0.0.0/tcp/7001", "/ip4/0.0.0.0/udp/7001/quic-v1"]
key_file = "node-0.key"               # Ed25519 identity; created (mode 0600) if missing
# Coordinator's full address, printed by fd-coordinator. Omit to run isolated (no collaboration).
coordinator = "/ip4/127.0.0.1/tcp/7000/p2p/12D3KooWPjceQrSwdWXPyLLeABRXmuqt69Rg3sBYbU1Nft9HyQ6X"
device = "flex"                       # compute device: flex (CPU, default) | ndarray (CPU, deprecated)
                                      # | wgpu (best GPU adapter) | wgpu-cpu (software Vulkan, e.g. lavapipe)
aggregator = { era = { temperature = 0.1 } }   # teacher from own + peers' logits: era (DS-FL: mean of
                                      # probabilities sharpened at T) | mean-probabilities | mean (of logits)
                                      # | weighted (by sample count) | median | { trimmed-mean = { beta = 0.2 } }
encoding = "f32"                      # payload of shared logits: f32 | f16 | int8 | top-k:K
metrics_file = "node-0-metrics.jsonl" # optional: one JSON line per round
checkpoint_file = "node-0.checkpoint"  # learning state saved after every round (default: <name>.checkpoint);
                                      # a restarted node resumes after the round it holds
# psk_file = "swarm.key"              # closed network: libp2p pre-shared key over TCP (`fd-node gen-psk`)
# bootstrap = ["/ip4/192.0.2.7/tcp/7001/p2p/12D3KooW..."]  # without a coordinator: peers to dial first;
                                      # Kademlia finds the other members
mdns = false                          # also find members on the local network with mDNS
# metrics_listen = "127.0.0.1:9100"   # OpenMetrics text (Prometheus) at http://<addr>/metrics
share_window_rounds = 0               # accept shares this many rounds beyond the announced one
                                      # (clock skew); later ones are refused as `future_round`

[federation]                          # must equal the coordinator's, or joining fails
id = "demo"                           # federation name
rounds = 3                            # number of rounds
public_size = 5000                    # public samples, drawn from the training split
subset_size = 2000                    # public samples predicted and shared per round
seed = 42                             # seed of the public split, subsets and partition
members = []                          # PeerIds of the members (`fd-node peer-id`); when given, only they
                                      # (and the coordinator, bootstrap peers) may connect, join and share;
                                      # empty = an open federation
quorum = 0.5                          # fraction of the expected peer shares needed when the deadline passes
                                      # to distil; below it the node keeps its locally trained student
# schedule = { start_unix = 1767225600, round_secs = 300, share_deadline_secs = 200 }
                                      # round clock without a coordinator: round r opens at
                                      # start_unix + (r-1)*round_secs and waits for shares share_deadline_secs

[relay]                               # behind a NAT or an inbound-closed firewall (docs/operating.md §2)
mode = "auto"                         # auto: reserve a slot on the relays once AutoNAT finds this node
                                      # unreachable from outside | always (known to be behind a NAT) | off
relays = []                           # relay addresses (/ip4/../tcp/../p2p/<id>); empty = the coordinator
max_relayed_share_bytes = 1048576     # larger shares wait for a direct connection (hole punching) instead
serve = false                         # relay for other members, within these limits:
limits = { max_reservations = 128, max_circuits = 64, max_circuit_bytes = 4194304, max_circuit_secs = 600 }

[data]                                # where samples come from (same on every member)
kind = "auto"                         # auto (Fashion-MNIST if installed, else synthetic)
# kind = "fashion-mnist", dir = "/usr/share/datasets/fashion-mnist"   (IDX, .gz or raw)
# kind = "mnist", dir = "..."                                        (IDX)
# kind = "cifar10", dir = "..."                                      (binary batches)
# kind = "synthetic", seed = 7, train = 12000, test = 2000
# kind = "csv", train = "train.csv", test = "test.csv", label_column = "label", values = "auto"
# kind = "npy", train_x = "...", train_y = "...", test_x = "...", test_y = "..."

[partition]                           # which private part of the data this node holds
nodes = 3                             # number of parts
index = 0                             # this node's part, 0-based
scheme = { kind = "dirichlet", alpha = 0.1 }   # | { kind = "iid" } | { kind = "shards", classes_per_node = 2 }
                                               # | { kind = "quantity-skew", sigma = 1.0 }

[model]                               # this node's student; may differ between nodes
kind = "mlp"                          # mlp | cnn | fedavg-cnn | resnet
hidden = [200, 200]                   # mlp: hidden layer widths
# kind = "cnn": channels = [16, 32], fc = 128  (conv3x3+ReLU+maxpool2 per entry, then fc)
# kind = "fedavg-cnn": the 2-conv CNN of McMahan et al. 2017 (32/64 channels, 5x5, fc 512)
# kind = "resnet": blocks = [1, 1, 1]  (basic blocks per stage, widths 16/32/64)

[training]                            # round recipe (the best measured: docs/results.md)
local_epochs = 1                      # epochs on private data per round
distill_epochs = 2                    # epochs on the public subset towards the teacher
batch_size = 32
learning_rate = 0.02
optimizer = "sgd"                     # sgd (with `momentum`) | adam
temperature = 1.0                     # distillation temperature T in round 1 (loss scaled by T^2)
final_temperature = 1.0               # T in the last round, for non-constant schedules
temperature_schedule = "constant"     # constant | linear | cosine (from temperature to final_temperature)
distill_alpha = 0.5                   # loss = a*T^2*KL(teacher||student) + (1-a)*CE(private labels)
weight_decay = 0.0                    # L2 penalty
momentum = 0.9                        # SGD momentum (ignored by adam)
seed = 0                              # weight init and shuffling
eval_samples = 0                      # test samples to evaluate on (0 = all)
local_ntd = 1.0                       # not-true distillation in local training (FedNTD): keeps what the
                                      # federation taught about classes this node lacks; 0 = off
logit_adjustment = 0.0                # tau: cross-entropy on private labels reads logits + tau*ln(own label
                                      # frequencies), against the pull towards classes this node holds; 0 = off
# threads = 1                         # CPU threads; default: every core of the machine (faster;
                                      # small MLP steps still take one). 1 = bit-identical reruns

[knowledge]                           # which public samples this node says it knows (docs/results.md)
selector = "density"                  # density (k-NN in the student's feature space vs private data)
                                      # | all (no weights sent) | confidence | class-coverage
density = { k = 5, quantile = 0.95, anchors = 1000 }   # density: weight 1 within the quantile of the
                                      # private anchors' own k-NN distances, (radius/d)^2 beyond
                                      # weights are used by mean-probabilities, weighted and era;
                                      # mean, median and trimmed-mean ignore them
min_confidence = 0.0                  # receiver: distil only rows whose teacher's max probability is >= this
max_entropy = 0.0                     # receiver: distil only rows whose teacher's entropy (nats) is <= this
                                      # (0 = off)

[dp]                                  # differentially private training on private data (DP-SGD), see
                                      # docs/operating.md for what the guarantee covers
enabled = false                       # Poisson batches, per-sample clipping, Gaussian noise in local training
                                      # and in distillation's private cross-entropy term; needs
                                      # [knowledge] selector = "all" or "confidence" and a model without
                                      # batch norm (mlp, cnn, fedavg-cnn)
clip_norm = 1.0                       # C: bound on each sample's gradient L2 norm
noise_multiplier = 1.0                # sigma: noise std sigma*C on the sum of clipped gradients
delta = 1e-5                          # delta of the (epsilon, delta) logged every round; < 1/private samples
# max_epsilon = 8.0                   # stop training on private data before epsilon would pass this

[secure_aggregation]                  # members see only the sum of the round's knowledge (docs/operating.md)
enabled = false                       # masked knowledge instead of signed shares (SecAgg among the members);
                                      # needs aggregator mean-probabilities or era, and the same on every member
# threshold = 3                       # reveals needed to unmask (default: the smallest majority of the round)
phase_timeout_secs = 5                # each step after the key advertisements waits this long for members
                                      # still in the protocol; a member that never advertises by the
                                      # round's deadline is left out of that round. The four steps after
                                      # the deadline take at most 4x this: keep it under the coordinator's
                                      # 30 s grace for reports

[rollback]                            # monitoring on a held-out validation split (docs/operating.md)
validation_fraction = 0.1             # private samples held out per class (seeded), never trained on; [0, 1)
rollback_tolerance = 0.10             # undo a distillation that leaves validation accuracy more than this
                                      # below the best so far (omit: measure only, never roll back)
best_file = "node-0.best"             # the best student kept so far (default: <name>.best); export takes it
"#;

/// The node config's `[secure_aggregation]` table.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SecureAggregationConfig {
    /// Members share only masked knowledge; each learns the round's sum.
    #[serde(default)]
    pub enabled: bool,
    /// Shamir threshold: reveals needed to unmask. Default: the smallest
    /// majority of the round's members; a smaller one is refused.
    #[serde(default)]
    pub threshold: Option<usize>,
    /// How long each step after the key advertisements waits for members
    /// that are still in the protocol.
    #[serde(default = "default_phase_timeout")]
    pub phase_timeout_secs: u64,
}

fn default_phase_timeout() -> u64 {
    5
}

impl Default for SecureAggregationConfig {
    fn default() -> Self {
        SecureAggregationConfig {
            enabled: false,
            threshold: None,
            phase_timeout_secs: default_phase_timeout(),
        }
    }
}

impl SecureAggregationConfig {
    /// Field and reason of the first bad value.
    pub fn validate(&self) -> Result<(), (&'static str, String)> {
        if let Some(t) = self.threshold
            && t < 2
        {
            return Err((
                "secure_aggregation.threshold",
                format!("must be at least 2 (a majority of the round's members), got {t}"),
            ));
        }
        if self.phase_timeout_secs == 0 || self.phase_timeout_secs > 600 {
            return Err((
                "secure_aggregation.phase_timeout_secs",
                format!("must be in 1..=600, got {}", self.phase_timeout_secs),
            ));
        }
        Ok(())
    }

    /// Refuses a public subset whose masked input would not fit in one
    /// frame: `rows × (classes + 1)` words of 4 bytes (whether or not
    /// secure aggregation is enabled: the caller asks when it is).
    pub fn check_input_size(&self, rows: usize, classes: usize) -> anyhow::Result<()> {
        let bytes = rows * (classes + 1) * 4;
        // Room for the header fields, the signature and the member list.
        let limit = fd_protocol::MAX_MESSAGE_BYTES - 64 * 1024;
        if bytes > limit {
            anyhow::bail!(
                "field `federation.subset_size`: {rows} rows × {} words × 4 bytes = {bytes} bytes of masked input, over the {limit}-byte frame limit of secure aggregation; use at most {} rows",
                classes + 1,
                limit / ((classes + 1) * 4)
            );
        }
        Ok(())
    }
}

/// The `[partition]` table.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PartitionConfig {
    pub nodes: usize,
    pub index: usize,
    pub scheme: Partitioner,
}

/// A node's whole configuration.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NodeConfig {
    pub name: String,
    /// One libp2p listen address or a list (TCP and QUIC, say); all of
    /// them are announced to the other members.
    #[serde(default = "default_listen")]
    pub listen: ListenAddrs,
    pub key_file: PathBuf,
    #[serde(default)]
    pub coordinator: Option<String>,
    #[serde(default)]
    pub device: DeviceKind,
    #[serde(default)]
    pub aggregator: Aggregator,
    /// How this node encodes the logits it shares.
    #[serde(default)]
    pub encoding: PayloadEncodingName,
    #[serde(default)]
    pub metrics_file: Option<PathBuf>,
    /// Where the learning state is saved after every round; defaults to
    /// `<name>.checkpoint` beside the config.
    #[serde(default)]
    pub checkpoint_file: Option<PathBuf>,
    /// Pre-shared key of a closed network (libp2p pnet, TCP only).
    #[serde(default)]
    pub psk_file: Option<PathBuf>,
    /// Peers to dial first without a coordinator (`/ip4/../tcp/../p2p/<id>`); Kademlia finds the rest.
    #[serde(default)]
    pub bootstrap: Vec<String>,
    /// Discover members on the local network with mDNS.
    #[serde(default)]
    pub mdns: bool,
    /// Serve OpenMetrics text (for Prometheus) over HTTP here (e.g. "127.0.0.1:9100").
    #[serde(default)]
    pub metrics_listen: Option<String>,
    /// Shares are accepted for the announced round and this many rounds
    /// beyond it (members whose clocks run ahead); later ones are refused
    /// as `future_round`. 0: only rounds already announced.
    #[serde(default)]
    pub share_window_rounds: u64,
    pub federation: FederationConfig,
    #[serde(default)]
    pub data: DataSource,
    pub partition: PartitionConfig,
    #[serde(default)]
    pub model: ModelConfig,
    #[serde(default)]
    pub training: TrainingConfig,
    #[serde(default)]
    pub knowledge: KnowledgeConfig,
    /// Differentially private training on private data.
    #[serde(default)]
    pub dp: DpConfig,
    /// Relays, AutoNAT and hole punching for members behind NATs.
    #[serde(default)]
    pub relay: RelayConfig,
    /// Validation split, rollback of harmful distillations, best student.
    #[serde(default)]
    pub rollback: crate::rollback::RollbackConfig,
    /// Secure aggregation of the members' knowledge.
    #[serde(default)]
    pub secure_aggregation: SecureAggregationConfig,
}

fn default_listen() -> ListenAddrs {
    ListenAddrs::One("/ip4/127.0.0.1/tcp/0".into())
}

/// `listen = "/ip4/0.0.0.0/tcp/7001"` or
/// `listen = ["/ip4/0.0.0.0/tcp/7001", "/ip4/0.0.0.0/udp/7001/quic-v1"]`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum ListenAddrs {
    One(String),
    Many(Vec<String>),
}

impl From<&str> for ListenAddrs {
    fn from(addr: &str) -> Self {
        ListenAddrs::One(addr.to_string())
    }
}

impl ListenAddrs {
    /// The addresses, in config order.
    pub fn addrs(&self) -> &[String] {
        match self {
            ListenAddrs::One(addr) => std::slice::from_ref(addr),
            ListenAddrs::Many(addrs) => addrs,
        }
    }
}


/// `training.threads` when node.toml does not set it: every core the
/// machine offers. A node is usually alone on its machine and wants its
/// rounds fast; the simulator, which runs many members in one process and
/// promises bit-identical reruns, keeps [`TrainingConfig`]'s default of 1.
pub fn default_training_threads() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

/// Whether `[training]` of this (already parsed) TOML text sets `threads`.
fn training_threads_set(text: &str) -> bool {
    text.parse::<toml::Table>().is_ok_and(|table| {
        table
            .get("training")
            .and_then(toml::Value::as_table)
            .is_some_and(|training| training.contains_key("threads"))
    })
}

impl NodeConfig {
    /// Parses TOML text; `path` is used for messages and relative paths.
    pub fn parse(text: &str, path: &Path) -> Result<Self, ConfigError> {
        let mut config: NodeConfig = toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: path.to_owned(),
            message: e.to_string(),
        })?;
        if !training_threads_set(text) {
            config.training.threads = default_training_threads();
        }
        let base = path.parent().unwrap_or(Path::new("."));
        config.key_file = resolve(base, &config.key_file);
        config.metrics_file = config.metrics_file.map(|p| resolve(base, &p));
        config.checkpoint_file = Some(resolve(
            base,
            &config
                .checkpoint_file
                .unwrap_or_else(|| PathBuf::from(format!("{}.checkpoint", config.name))),
        ));
        config.psk_file = config.psk_file.map(|p| resolve(base, &p));
        config.rollback.best_file = Some(resolve(
            base,
            &config
                .rollback
                .best_file
                .unwrap_or_else(|| PathBuf::from(format!("{}.best", config.name))),
        ));
        config.data.rebase(base);
        config.validate(path)?;
        Ok(config)
    }

    pub fn from_file(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        Self::parse(&text, path)
    }

    /// Checks every field; `path` names the file in the error.
    pub fn validate(&self, path: &Path) -> Result<(), ConfigError> {
        let invalid = |field, reason| ConfigError::Invalid {
            path: path.to_owned(),
            field,
            reason,
        };
        self.federation.validate().map_err(|(f, r)| invalid(f, r))?;
        self.rollback.validate().map_err(|(f, r)| invalid(f, r))?;
        self.relay.validate().map_err(|(f, r)| invalid(f, r))?;
        if self.partition.nodes == 0 {
            return Err(invalid("partition.nodes", "must be at least 1".into()));
        }
        if self.partition.index >= self.partition.nodes {
            return Err(invalid(
                "partition.index",
                format!(
                    "must be below partition.nodes ({}), got {}",
                    self.partition.nodes, self.partition.index
                ),
            ));
        }
        if self.listen.addrs().is_empty() {
            return Err(invalid("listen", "must name at least one address".into()));
        }
        for addr in self.listen.addrs() {
            if addr.parse::<libp2p::Multiaddr>().is_err() {
                return Err(invalid("listen", format!("is not a multiaddress: {addr}")));
            }
        }
        if self.psk_file.is_some() {
            let dialled = self.coordinator.iter().map(|a| ("coordinator", a));
            let dialled = dialled.chain(self.bootstrap.iter().map(|a| ("bootstrap", a)));
            let listened = self.listen.addrs().iter().map(|a| ("listen", a));
            for (field, addr) in listened.chain(dialled) {
                if let Some(reason) = fd_net::quic_under_psk(field, addr) {
                    return Err(invalid(field, reason));
                }
            }
        }
        if let Some(c) = &self.coordinator
            && c.parse::<libp2p::Multiaddr>().is_err()
        {
            return Err(invalid(
                "coordinator",
                format!("is not a multiaddress: {c}"),
            ));
        }
        for (i, b) in self.bootstrap.iter().enumerate() {
            let parsed = b
                .parse::<libp2p::Multiaddr>()
                .map_err(|e| e.to_string())
                .and_then(|a| {
                    fd_net::split_peer_addr(&a)
                        .map(|_| ())
                        .map_err(|e| e.to_string())
                });
            if let Err(e) = parsed {
                return Err(invalid(
                    "bootstrap",
                    format!("entry {i} (`{b}`) is not /ip4/../tcp/../p2p/<peer id>: {e}"),
                ));
            }
        }
        if let Some(m) = &self.metrics_listen
            && m.parse::<std::net::SocketAddr>().is_err()
        {
            return Err(invalid(
                "metrics_listen",
                format!("is not an address like 127.0.0.1:9100: {m}"),
            ));
        }
        if self.coordinator.is_none()
            && (!self.bootstrap.is_empty() || self.mdns)
            && self.federation.schedule.is_none()
        {
            return Err(invalid(
                "federation.schedule",
                "is needed without a coordinator: peers are listed (bootstrap/mdns) but nothing sets the round clock".into(),
            ));
        }
        self.model
            .validate_fields()
            .map_err(|r| invalid("model", r))?;
        self.training
            .validate()
            .map_err(|r| invalid("training", r))?;
        self.knowledge
            .validate()
            .map_err(|r| invalid("knowledge", r))?;
        self.dp.validate().map_err(|(field, r)| invalid(field, r))?;
        self.secure_aggregation
            .validate()
            .map_err(|(field, r)| invalid(field, r))?;
        if self.secure_aggregation.enabled && !self.aggregator.supports_secure_aggregation() {
            return Err(invalid(
                "aggregator",
                format!(
                    "is {:?}, which cannot run under [secure_aggregation]: members see only the sum of the round's probabilities; use \"mean-probabilities\" or {{ era = {{ temperature = … }} }} (median and trimmed mean need each member's values, which secure aggregation hides)",
                    self.aggregator
                ),
            ));
        }
        if self.dp.enabled {
            dp_compatible(&self.model, &self.knowledge).map_err(|(field, r)| invalid(field, r))?;
        }
        Ok(())
    }
}

/// Whether DP-SGD's guarantee can cover this member: its model must have
/// per-sample gradients, and nothing it shares may be computed from private
/// data outside DP-SGD (the `density` and `class-coverage` selectors score
/// the shared rows with private samples and label counts).
pub fn dp_compatible(
    model: &ModelConfig,
    knowledge: &KnowledgeConfig,
) -> Result<(), (&'static str, String)> {
    if matches!(
        knowledge.selector,
        Selector::Density | Selector::ClassCoverage
    ) {
        return Err((
            "knowledge.selector",
            format!(
                "is `{}`, which weighs shared rows with private data outside DP-SGD's guarantee; \
                 with [dp] enabled use \"all\" or \"confidence\"",
                knowledge.selector.name()
            ),
        ));
    }
    if matches!(model, ModelConfig::ResNet { .. }) {
        return Err((
            "model",
            "is a resnet, whose batch norm mixes the samples of a batch: DP-SGD needs per-sample \
             gradients (use mlp, cnn or fedavg-cnn with [dp] enabled)"
                .into(),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dp_section_is_checked_and_names_the_field() {
        let base = EXAMPLE_CONFIG.to_string();
        let parse = |extra: &str| {
            // The first `enabled` of the example is [dp]'s.
            let text = base.replacen("enabled = false ", extra, 1);
            NodeConfig::parse(&text, Path::new("/etc/fd/node.toml"))
        };
        // On with the default selector (density): refused, naming the selector.
        let err = parse("enabled = true ").unwrap_err().to_string();
        assert!(err.contains("knowledge.selector"), "{err}");
        let with_all = base
            .replace("selector = \"density\"", "selector = \"all\"")
            .replacen("enabled = false ", "enabled = true ", 1);
        let c = NodeConfig::parse(&with_all, Path::new("/etc/fd/node.toml")).unwrap();
        assert!(c.dp.enabled);
        assert_eq!(c.dp.noise_multiplier, 1.0);
        let bad = with_all.replace("noise_multiplier = 1.0", "noise_multiplier = 0.0");
        let err = NodeConfig::parse(&bad, Path::new("/etc/fd/node.toml"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("dp.noise_multiplier"), "{err}");
        let bad = with_all.replace("# max_epsilon = 8.0", "max_epsilon = -1.0");
        let err = NodeConfig::parse(&bad, Path::new("/etc/fd/node.toml"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("dp.max_epsilon"), "{err}");
    }

    #[test]
    fn secure_aggregation_is_refused_with_an_aggregator_that_needs_each_members_values() {
        let on = EXAMPLE_CONFIG.replace(
            "enabled = false                       # masked knowledge",
            "enabled = true                        # masked knowledge",
        );
        assert_ne!(on, EXAMPLE_CONFIG);
        let c = NodeConfig::parse(&on, Path::new("/etc/fd/node.toml")).unwrap();
        assert!(c.secure_aggregation.enabled && !c.dp.enabled);
        assert_eq!(c.secure_aggregation.phase_timeout_secs, 5);
        let median = on.replace(
            "aggregator = { era = { temperature = 0.1 } }",
            "aggregator = \"median\"",
        );
        let err = NodeConfig::parse(&median, Path::new("/etc/fd/node.toml"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("aggregator") && err.contains("secure_aggregation"), "{err}");
        let minority = on.replace("# threshold = 3 ", "threshold = 1 ");
        let err = NodeConfig::parse(&minority, Path::new("/etc/fd/node.toml"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("secure_aggregation.threshold"), "{err}");
    }

    #[test]
    fn listen_takes_one_address_or_a_list_and_quic_is_refused_under_a_psk() {
        let tcp = "\"/ip4/0.0.0.0/tcp/7001\"";
        let quic = "\"/ip4/0.0.0.0/udp/7001/quic-v1\"";
        let with = |listen: &str, extra: &str| {
            let text = EXAMPLE_CONFIG.replace(
                "listen = \"/ip4/127.0.0.1/tcp/0\"",
                &format!("listen = {listen}\n{extra}"),
            );
            NodeConfig::parse(&text, Path::new("/etc/fd/node.toml"))
        };
        let both = with(&format!("[{tcp}, {quic}]"), "").unwrap();
        assert_eq!(
            both.listen.addrs(),
            ["/ip4/0.0.0.0/tcp/7001", "/ip4/0.0.0.0/udp/7001/quic-v1"]
        );
        assert_eq!(with(quic, "").unwrap().listen.addrs().len(), 1);
        let err = with("[]", "").unwrap_err().to_string();
        assert!(err.contains("`listen`") && err.contains("at least one"), "{err}");
        let err = with(&format!("[{tcp}, \"nonsense\"]"), "").unwrap_err().to_string();
        assert!(err.contains("nonsense"), "{err}");
        // A closed federation: TCP only, and the message says why.
        with(tcp, "psk_file = \"swarm.key\"").unwrap();
        let err = with(&format!("[{tcp}, {quic}]"), "psk_file = \"swarm.key\"")
            .unwrap_err()
            .to_string();
        assert!(err.contains("`listen`") && err.contains("pnet"), "{err}");
    }

    #[test]
    fn example_config_parses_with_documented_values() {
        let c = NodeConfig::parse(EXAMPLE_CONFIG, Path::new("/etc/fd/node.toml")).unwrap();
        assert_eq!(c.key_file, PathBuf::from("/etc/fd/node-0.key"));
        assert_eq!(c.partition.scheme, Partitioner::Dirichlet { alpha: 0.1 });
        assert_eq!(
            c.training,
            TrainingConfig {
                threads: default_training_threads(),
                ..TrainingConfig::default()
            },
            "the template's recipe, on every core"
        );
        assert_eq!(c.dp, DpConfig::default());
        assert_eq!(c.federation.rounds, 3);
        let pinned = EXAMPLE_CONFIG.replace("# threads = 1 ", "threads = 1   ");
        assert_ne!(pinned, EXAMPLE_CONFIG);
        let pinned = NodeConfig::parse(&pinned, Path::new("/etc/fd/node.toml")).unwrap();
        assert_eq!(pinned.training.threads, 1, "an explicit thread count is kept");
        assert!(c.coordinator.is_some());
    }

    #[test]
    fn bad_fields_are_named() {
        let text = EXAMPLE_CONFIG.replace("index = 0", "index = 5");
        let err = NodeConfig::parse(&text, Path::new("n.toml"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("partition.index"), "{err}");
        let text = EXAMPLE_CONFIG.replace("batch_size = 32", "batch_sise = 32");
        let err = NodeConfig::parse(&text, Path::new("n.toml"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("batch_sise"), "{err}");
        let text = EXAMPLE_CONFIG.replace("subset_size = 2000", "subset_size = 9000");
        let err = NodeConfig::parse(&text, Path::new("n.toml"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("federation.subset_size"), "{err}");
    }
}

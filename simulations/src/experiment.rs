//! An experiment file (`fd-sim run experiment.toml`): what to simulate.
//!
//! An experiment names everything a result depends on: members, rounds,
//! data, public set, partition, each member's student, the round recipe,
//! aggregator, payload encoding, algorithm, topology, scenario and seed,
//! and whether a curious member audits what the shares leak ([`AuditConfig`]).
//! Each member's configuration is derived as an ordinary
//! [`NodeConfig`] ([`Experiment::node_config`]) and checked by the same
//! validation `fd-node` applies, so a simulated member is configured exactly
//! like a deployed one.
//!
//! A `[sweep]` table maps dotted keys of the file to lists of values; the
//! experiment expands to the cartesian product of those lists
//! ([`expand_sweep`]), each cell an ordinary experiment with its own name.
//! [`EXAMPLE_EXPERIMENT`] documents every field; a test parses it.

use std::path::{Path, PathBuf};

use anyhow::{Context as _, bail};
use fd_node::aggregate::Aggregator;
use fd_node::config::{FederationConfig, NodeConfig, PartitionConfig};
use fd_data::DataSource;
use fd_data::partition::Partitioner;
use fd_node::device::DeviceKind;
use fd_node::knowledge::KnowledgeConfig;
use fd_node::learner::TrainingConfig;
use fd_node::model::ModelConfig;
use fd_node::privacy::DpConfig;
use fd_node::rollback::RollbackConfig;
use fd_protocol::PayloadEncodingName;
use serde::{Deserialize, Serialize};

use crate::audit::AuditConfig;
use crate::secure::SecureAggregationConfig;
use crate::scenario::Scenario;
use crate::topology::Topology;

/// An annotated experiment: every field, its meaning and its default.
pub const EXAMPLE_EXPERIMENT: &str = r#"# fd-sim experiment (TOML): every field, its meaning, its default.
name = "example"            # results go to <out>/<name>/ (sweep cells: <out>/<name>/<cell>/)
seed = 42                   # seed of the public split, subsets, partition, scenario and weights
nodes = 10                  # members
rounds = 5
algorithm = "fd"            # fd | isolated | fedavg | centralized
network = "memory"          # memory (in-process, simulated time) | libp2p (real stack on 127.0.0.1)
aggregator = { era = { temperature = 0.1 } }   # fd: era | mean | mean-probabilities | weighted
                                    #   | median | { trimmed-mean = { beta = 0.2 } }
encoding = "f32"            # fd: shared payload, f32 | f16 | int8 | top-k:K
device = "flex"             # flex | ndarray | wgpu
jobs = 2                    # members computing at once (results do not depend on it)

[data]                      # as in fd-node's config
kind = "auto"               # Fashion-MNIST if installed, else the synthetic set

[public]
size = 5000                 # public samples, drawn from the training split
subset_size = 2000          # public samples predicted and shared per round

[partition]                 # how private data is split among the members
kind = "dirichlet"          # iid | dirichlet (alpha) | shards (classes_per_node) | quantity-skew (sigma)
alpha = 0.1

[model]                     # every member's student unless a group says otherwise
kind = "mlp"
hidden = [200, 200]

# [[groups]]                # optional: the next `nodes` members get this student
# nodes = 3
# model = { kind = "cnn", channels = [16, 32], fc = 128 }

[training]                  # round recipe, as in fd-node's config; member i's seed is seed + i
local_epochs = 1            # the defaults are the best recipe measured (docs/results.md)
distill_epochs = 2
batch_size = 32
learning_rate = 0.02
optimizer = "sgd"
temperature = 1.0
distill_alpha = 0.5
local_ntd = 1.0             # not-true distillation in local training (FedNTD); 0 = off
logit_adjustment = 0.0      # cross-entropy on private labels with logits + tau*ln(label frequencies); 0 = off

[knowledge]                 # fd: as in fd-node's config
selector = "density"        # density | all | confidence | class-coverage
min_confidence = 0.0        # receiver: distil only rows whose teacher is at least this sure (0 = all)

[topology]                  # fd: who hears whom
kind = "full"               # full | random (each member hears k random others: k = 3) | ring

[scenario]
participation = 1.0         # fraction of members picked each round
dropout = 0.0               # probability that a picked member goes silent for the round
deadline = 60.0             # seconds after the round starts that late shares are ignored
                            #   (simulated time in memory, wall time over libp2p)
delay = { kind = "none" }   # stragglers: | { kind = "constant", seconds = 2.0 }
                            #   | { kind = "uniform", min = 0.0, max = 10.0 } | { kind = "exponential", mean = 5.0 }
latency = 0.0               # seconds per share on a link (memory network)
bandwidth = 0.0             # bytes per second of a link, 0 = unlimited (memory network)
byzantine = 0.0             # fraction of members that attack (fd shares)
attack = "random"           # random | label-flip | { scaled = { factor = -10.0 } } | { constant-class = { class = 0 } }
quorum = 0.0                # fraction of expected peer shares a member needs to distil (fd-node's
                            #   federation.quorum, default 0.5 there); 0 = distil whatever arrived

[audit]                     # leakage audit (fd in memory, or under secure aggregation): a curious member estimates
                            #   every other member's label distribution from the shares it receives
enabled = false             # adds `audit_tv` to metrics.csv and `audit` to summary.json
curious = 0                 # index of the curious member
estimator = "mean-probabilities"    # mean-probabilities (mean softmax over the public rows) | argmax (histogram)

[secure_aggregation]        # fd: members see only the round's sum of knowledge (pairwise masks + Shamir
enabled = false             #   recovery, fd_protocol::secagg; in memory through a hub, over libp2p as
                            #   fd-node runs it); aggregator must be mean-probabilities or era;
                            #   `threshold = 6` overrides the default majority
dropout_after_key_shares = 0.0  # memory only: probability a member stops mid-protocol (its masks are recovered)
[dp]                        # fd, isolated: DP-SGD on every member's private data, as in fd-node's config
enabled = false             # adds `dp_epsilon` (epsilon spent at delta) to metrics.csv; needs
                            #   [knowledge] selector = "all" or "confidence" and no resnet
clip_norm = 1.0             # C: per-sample gradient norm bound
noise_multiplier = 1.0      # sigma: noise std sigma*C on the sum of clipped gradients
delta = 1e-5
# max_epsilon = 8.0         # members stop training on private data before epsilon would pass this

# [rollback]                # off without this table (every member trains on all its private data)
# validation_fraction = 0.1 # private samples held out per class (seeded); adds `validation_accuracy`
#                           #   and `rolled_back` to metrics.csv, `rollbacks_per_round` to summary.json
# rollback_tolerance = 0.10 # undo a distillation that leaves validation accuracy more than this below
#                           #   the best so far; omit (with a fraction) to measure without rolling back

# [sweep]                   # lists of values for dotted keys; one cell per combination
# "partition.alpha" = [0.1, 0.5]
# algorithm = ["fd", "isolated"]
# partition = [{ label = "iid", kind = "iid" }]          # a table's `label` names its cell
# variant = [{ label = "fd-era", algorithm = "fd", aggregator = { era = { temperature = 0.1 } } }]
#                           # `variant` tables set several top-level fields at once
"#;

/// Which algorithm a run compares.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Algorithm {
    /// Federated distillation: the members share logits (the fd round engine).
    #[default]
    Fd,
    /// No collaboration: local training only.
    Isolated,
    /// FedAvg (McMahan et al. 2017): weights averaged by sample count after local training.
    Fedavg,
    /// All private data pooled in one model: the upper bound.
    Centralized,
}

impl Algorithm {
    pub fn name(self) -> &'static str {
        match self {
            Algorithm::Fd => "fd",
            Algorithm::Isolated => "isolated",
            Algorithm::Fedavg => "fedavg",
            Algorithm::Centralized => "centralized",
        }
    }
}

/// How shares travel in an fd run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Network {
    /// In one process, shares handed over in memory; time is simulated.
    #[default]
    Memory,
    /// Every member has its own libp2p swarm on 127.0.0.1.
    Libp2p,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PublicConfig {
    #[serde(default = "default_public_size")]
    pub size: usize,
    #[serde(default = "default_subset_size")]
    pub subset_size: usize,
}

fn default_public_size() -> usize {
    5000
}
fn default_subset_size() -> usize {
    2000
}

impl Default for PublicConfig {
    fn default() -> Self {
        PublicConfig {
            size: default_public_size(),
            subset_size: default_subset_size(),
        }
    }
}

/// The next `nodes` members (in order of the groups) get `model`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Group {
    pub nodes: usize,
    pub model: ModelConfig,
}

/// One experiment (or one cell of a sweep).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Experiment {
    pub name: String,
    #[serde(default)]
    pub seed: u64,
    pub nodes: usize,
    pub rounds: u64,
    #[serde(default)]
    pub algorithm: Algorithm,
    #[serde(default)]
    pub network: Network,
    #[serde(default)]
    pub aggregator: Aggregator,
    #[serde(default)]
    pub encoding: PayloadEncodingName,
    #[serde(default)]
    pub device: DeviceKind,
    #[serde(default = "default_jobs")]
    pub jobs: usize,
    #[serde(default)]
    pub data: DataSource,
    #[serde(default)]
    pub public: PublicConfig,
    pub partition: Partitioner,
    #[serde(default)]
    pub model: ModelConfig,
    #[serde(default)]
    pub groups: Vec<Group>,
    #[serde(default)]
    pub training: TrainingConfig,
    /// fd: what members say they know and which teacher rows they distil.
    #[serde(default)]
    pub knowledge: KnowledgeConfig,
    #[serde(default)]
    pub topology: Topology,
    #[serde(default)]
    pub scenario: Scenario,
    /// fd over the memory network: the leakage audit.
    #[serde(default)]
    pub audit: AuditConfig,
    /// fd: aggregate by secure aggregation (memory network).
    #[serde(default)]
    pub secure_aggregation: SecureAggregationConfig,
    /// fd and isolated: every member trains on its private data with DP-SGD.
    #[serde(default)]
    pub dp: DpConfig,
    /// Validation split and rollback ([`fd_node::rollback`]); off unless
    /// the file has a `[rollback]` table (inside it, fd-node's defaults).
    #[serde(default = "RollbackConfig::off")]
    pub rollback: RollbackConfig,
    /// Only in files: expanded by [`expand_sweep`] before a cell runs.
    #[serde(default, skip_serializing_if = "toml::Table::is_empty")]
    pub sweep: toml::Table,
}

fn default_jobs() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

impl Experiment {
    /// The student of member `index`.
    pub fn model_of(&self, index: usize) -> &ModelConfig {
        let mut first = 0;
        for group in &self.groups {
            if index < first + group.nodes {
                return &group.model;
            }
            first += group.nodes;
        }
        &self.model
    }

    pub fn federation(&self) -> FederationConfig {
        FederationConfig {
            id: self.name.clone(),
            rounds: self.rounds,
            public_size: self.public.size,
            subset_size: self.public.subset_size,
            seed: self.seed,
            members: Vec::new(),
            quorum: self.scenario.quorum,
            schedule: None,
        }
    }

    /// Member `index`'s configuration, as `fd-node` would read it.
    pub fn node_config(&self, index: usize) -> NodeConfig {
        NodeConfig {
            name: format!("node-{index}"),
            listen: "/ip4/127.0.0.1/tcp/0".into(),
            key_file: PathBuf::from(format!("node-{index}.key")),
            coordinator: None,
            device: self.device,
            aggregator: self.aggregator,
            encoding: self.encoding,
            metrics_file: None,
            checkpoint_file: None,
            psk_file: None,
            bootstrap: Vec::new(),
            mdns: false,
            metrics_listen: None,
            share_window_rounds: 0,
            // In-process members on loopback: every one is reachable.
            relay: fd_node::config::RelayConfig {
                mode: fd_node::config::RelayMode::Off,
                ..Default::default()
            },
            federation: self.federation(),
            data: self.data.clone(),
            partition: PartitionConfig {
                nodes: self.nodes,
                index,
                scheme: self.partition.clone(),
            },
            model: self.model_of(index).clone(),
            training: TrainingConfig {
                seed: self.seed.wrapping_add(index as u64),
                ..self.training.clone()
            },
            knowledge: self.knowledge.clone(),
            dp: self.dp.clone(),
            rollback: RollbackConfig {
                best_file: None,
                ..self.rollback.clone()
            },
            // The simulator runs secure aggregation through its own hub
            // (`[secure_aggregation]` of the experiment, crate::secure).
            secure_aggregation: Default::default(),
        }
    }

    /// Checks the experiment and every member's derived config; errors name the field.
    pub fn validate(&self, path: &Path) -> anyhow::Result<()> {
        let field =
            |f: &str, reason: String| anyhow::anyhow!("{}: field `{f}` {reason}", path.display());
        if self.nodes == 0 {
            return Err(field("nodes", "must be at least 1".into()));
        }
        if self.jobs == 0 {
            return Err(field("jobs", "must be at least 1".into()));
        }
        if let Some(reason) = self.device.not_built_reason() {
            return Err(field("device", reason));
        }
        if self.name.is_empty() || self.name.contains(['/', '\\']) {
            return Err(field(
                "name",
                format!("must be a non-empty folder name, got {:?}", self.name),
            ));
        }
        let grouped: usize = self.groups.iter().map(|g| g.nodes).sum();
        if grouped > self.nodes {
            return Err(field(
                "groups",
                format!(
                    "assign {grouped} members but the experiment has nodes = {}",
                    self.nodes
                ),
            ));
        }
        self.aggregator
            .validate()
            .map_err(|r| field("aggregator", r))?;
        self.scenario.validate().map_err(|(f, r)| field(f, r))?;
        self.rollback.validate().map_err(|(f, r)| field(f, r))?;
        self.topology
            .validate(self.nodes)
            .map_err(|r| field("topology", r))?;
        if self.algorithm == Algorithm::Fedavg {
            let first = self.model_of(0);
            if let Some(i) = (1..self.nodes).find(|&i| self.model_of(i) != first) {
                return Err(field(
                    "groups",
                    format!(
                        "fedavg averages weights, so every member needs the same student; member {i} differs from member 0"
                    ),
                ));
            }
        }
        if self.network == Network::Libp2p && self.algorithm != Algorithm::Fd {
            return Err(field(
                "network",
                format!(
                    "libp2p carries fd shares; algorithm {} runs in memory",
                    self.algorithm.name()
                ),
            ));
        }
        if self.audit.curious >= self.nodes {
            return Err(field(
                "audit.curious",
                format!(
                    "must be a member index below nodes = {}, got {}",
                    self.nodes, self.audit.curious
                ),
            ));
        }
        if self.audit.enabled && self.algorithm != Algorithm::Fd {
            return Err(field(
                "audit.enabled",
                format!(
                    "audits the shares of fd; algorithm {} shares none",
                    self.algorithm.name()
                ),
            ));
        }
        if self.audit.enabled && self.network != Network::Memory && !self.secure_aggregation.enabled {
            return Err(field(
                "audit.enabled",
                "needs network = \"memory\" (the audit taps the in-memory network's deliveries) or secure aggregation (the curious member audits the sums it unmasks)"
                    .into(),
            ));
        }
        if self.secure_aggregation.enabled {
            let why = if self.algorithm != Algorithm::Fd {
                Some(format!(
                    "secures fd's shares; algorithm {} shares none",
                    self.algorithm.name()
                ))
            } else if self.network == Network::Libp2p
                && self.secure_aggregation.dropout_after_key_shares > 0.0
            {
                Some("over libp2p members run the protocol themselves: `dropout_after_key_shares` is the in-memory hub's (use [scenario] dropout)".into())
            } else if self.network == Network::Libp2p && self.topology != Topology::Full {
                Some("over libp2p needs topology = { kind = \"full\" }: every member masks with every other".into())
            } else if !self.aggregator.supports_secure_aggregation() {
                Some(format!(
                    "needs an aggregator that runs on sums (mean-probabilities or era), not {:?}: median and trimmed mean need individual values, which secure aggregation hides",
                    self.aggregator
                ))
            } else {
                None
            };
            if let Some(why) = why {
                return Err(field("secure_aggregation.enabled", why));
            }
        }
        let p = self.secure_aggregation.dropout_after_key_shares;
        if !(0.0..=1.0).contains(&p) {
            return Err(field(
                "secure_aggregation.dropout_after_key_shares",
                format!("must be a probability in [0, 1], got {p}"),
            ));
        }
        if let Some(t) = self.secure_aggregation.threshold
            && (t > self.nodes
                || t < fd_protocol::secagg::RoundContext::minimum_threshold(self.nodes))
        {
            return Err(field(
                "secure_aggregation.threshold",
                format!(
                    "must be a majority of the {} members and at most all of them ({}..={}), got {t}",
                    self.nodes,
                    fd_protocol::secagg::RoundContext::minimum_threshold(self.nodes),
                    self.nodes
                ),
            ));
        }
        if self.dp.enabled && !matches!(self.algorithm, Algorithm::Fd | Algorithm::Isolated) {
            return Err(field(
                "dp.enabled",
                format!(
                    "applies to fd and isolated members; algorithm {} is not supported with DP",
                    self.algorithm.name()
                ),
            ));
        }
        if !self.sweep.is_empty() {
            return Err(field(
                "sweep",
                "must be expanded before a run (fd-sim run does this)".into(),
            ));
        }
        for index in 0..self.nodes {
            self.node_config(index)
                .validate(path)
                .with_context(|| format!("member {index}'s configuration"))?;
        }
        Ok(())
    }
}

/// Reads an experiment file; relative data paths are resolved against its folder.
pub fn load(path: &Path) -> anyhow::Result<toml::Table> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("cannot read experiment {}", path.display()))?;
    let table: toml::Table = toml::from_str(&text)
        .with_context(|| format!("experiment {} is not valid TOML", path.display()))?;
    Ok(table)
}

/// Turns one (expanded) table into an experiment and validates it.
pub fn parse(table: toml::Table, path: &Path) -> anyhow::Result<Experiment> {
    let mut experiment: Experiment =
        toml::Value::Table(table)
            .try_into()
            .map_err(|e: toml::de::Error| {
                anyhow::anyhow!("experiment {} is not valid: {e}", path.display())
            })?;
    experiment
        .data
        .rebase(path.parent().unwrap_or(Path::new(".")));
    experiment.validate(path)?;
    Ok(experiment)
}

/// One cell of a sweep: its folder name and its table.
#[derive(Debug, Clone)]
pub struct Cell {
    /// `key=value` pairs joined by `,` (empty for an experiment without a sweep).
    pub name: String,
    pub table: toml::Table,
}

fn value_label(value: &toml::Value) -> String {
    let text = match value {
        toml::Value::String(s) => s.clone(),
        toml::Value::Table(_) | toml::Value::Array(_) => value.to_string(),
        other => other.to_string(),
    };
    text.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || "-_.".contains(c) {
                c
            } else {
                '_'
            }
        })
        .collect::<String>()
        .trim_matches('_')
        .to_string()
}

/// Sets the dotted `key` of `table` to `value`, creating tables on the way.
fn set_dotted(table: &mut toml::Table, key: &str, value: toml::Value) -> anyhow::Result<()> {
    let mut parts: Vec<&str> = key.split('.').collect();
    let last = parts.pop().filter(|p| !p.is_empty());
    let Some(last) = last else {
        bail!("sweep key {key:?} is empty");
    };
    let mut current = table;
    for part in parts {
        let entry = current
            .entry(part.to_string())
            .or_insert_with(|| toml::Value::Table(toml::Table::new()));
        current = match entry {
            toml::Value::Table(t) => t,
            _ => bail!("sweep key {key:?}: `{part}` is not a table in the experiment"),
        };
    }
    current.insert(last.to_string(), value);
    Ok(())
}

/// The label of a swept value, and the value to set: a table with a
/// `label` key is named by it (and the key removed); other values by their text.
fn split_label(value: &toml::Value) -> (String, toml::Value) {
    if let toml::Value::Table(t) = value
        && let Some(toml::Value::String(label)) = t.get("label")
    {
        let mut t = t.clone();
        t.remove("label");
        return (label.clone(), toml::Value::Table(t));
    }
    (value_label(value), value.clone())
}

/// Expands the `[sweep]` table of `table` into cells, in a fixed order
/// (keys in alphabetical order, values in list order, the last key varying fastest).
///
/// A key names the field its values replace (`"partition.alpha"`), except
/// `variant`, whose values are tables merged into the experiment's top
/// level: `variant = [{ label = "fd-era", algorithm = "fd", aggregator = { era = { temperature = 0.1 } } }]`
/// sets several fields at once, for comparisons that are not a product.
pub fn expand_sweep(mut table: toml::Table) -> anyhow::Result<Vec<Cell>> {
    let sweep = match table.remove("sweep") {
        None => toml::Table::new(),
        Some(toml::Value::Table(t)) => t,
        Some(_) => bail!("field `sweep` must be a table of lists"),
    };
    let mut axes: Vec<(String, Vec<toml::Value>)> = Vec::new();
    for (key, values) in sweep {
        match values {
            toml::Value::Array(values) if !values.is_empty() => axes.push((key, values)),
            _ => bail!("field `sweep.{key}` must be a non-empty list of values"),
        }
    }
    let mut cells = vec![Cell {
        name: String::new(),
        table,
    }];
    for (key, values) in &axes {
        let mut next = Vec::with_capacity(cells.len() * values.len());
        for cell in &cells {
            for value in values {
                let mut c = cell.clone();
                let (label, value) = split_label(value);
                if key == "variant" {
                    let toml::Value::Table(fields) = &value else {
                        bail!("field `sweep.variant` must list tables of fields to set");
                    };
                    for (k, v) in fields {
                        set_dotted(&mut c.table, k, v.clone())?;
                    }
                } else {
                    set_dotted(&mut c.table, key, value)?;
                }
                let label = format!("{}={label}", key.rsplit('.').next().unwrap_or(key));
                c.name = if c.name.is_empty() {
                    label
                } else {
                    format!("{},{label}", c.name)
                };
                next.push(c);
            }
        }
        cells = next;
    }
    Ok(cells)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn example_parses_and_derives_valid_member_configs() {
        let table: toml::Table = toml::from_str(EXAMPLE_EXPERIMENT).unwrap();
        let e = parse(table, Path::new("/x/e.toml")).unwrap();
        assert_eq!(e.nodes, 10);
        assert_eq!(e.partition, Partitioner::Dirichlet { alpha: 0.1 });
        assert_eq!(e.training.distill_epochs, 2);
        assert_eq!(e.training, fd_node::learner::TrainingConfig::default());
        let c = e.node_config(3);
        assert_eq!(c.partition.index, 3);
        assert_eq!(c.training.seed, 45);
        assert_eq!(c.federation.subset_size, 2000);
    }

    #[test]
    fn groups_assign_students_in_order() {
        let text = EXAMPLE_EXPERIMENT.to_string()
            + "\n[[groups]]\nnodes = 2\nmodel = { kind = \"cnn\", channels = [8], fc = 16 }\n";
        let e = parse(toml::from_str(&text).unwrap(), Path::new("e.toml")).unwrap();
        assert!(matches!(e.model_of(0), ModelConfig::SmallCnn { .. }));
        assert!(matches!(e.model_of(1), ModelConfig::SmallCnn { .. }));
        assert_eq!(e.model_of(2), &e.model);
    }

    #[test]
    fn bad_fields_are_named() {
        for (from, to, field) in [
            ("nodes = 10", "nodes = 0", "nodes"),
            ("dropout = 0.0", "dropout = 1.5", "scenario.dropout"),
            (
                "participation = 1.0",
                "participation = 0.0",
                "scenario.participation",
            ),
            ("kind = \"full\"", "kind = \"random\"\nk = 10", "topology"),
            ("local_epochs = 1", "local_epoch = 1", "local_epoch"),
        ] {
            let text = EXAMPLE_EXPERIMENT.replace(from, to);
            assert_ne!(text, EXAMPLE_EXPERIMENT, "{from}");
            let err = parse(toml::from_str(&text).unwrap(), Path::new("e.toml"))
                .map(|_| ())
                .unwrap_err();
            let err = format!("{err:#}");
            assert!(err.contains(field), "{field}: {err}");
        }
    }

    #[test]
    fn dp_is_validated_with_the_field_named() {
        let with_dp = |text: &str| {
            let mut table: toml::Table = toml::from_str(text).unwrap();
            let dp = table["dp"].as_table_mut().unwrap();
            dp.insert("enabled".into(), true.into());
            table
        };
        let all = EXAMPLE_EXPERIMENT.replace("selector = \"density\"", "selector = \"all\"");
        let e = parse(with_dp(&all), Path::new("e.toml")).unwrap();
        assert!(e.dp.enabled && e.node_config(3).dp.enabled);
        for (text, field) in [
            (EXAMPLE_EXPERIMENT.to_string(), "knowledge.selector"),
            (
                all.replace("algorithm = \"fd\"", "algorithm = \"fedavg\""),
                "dp.enabled",
            ),
            (
                all.replace("noise_multiplier = 1.0", "noise_multiplier = -1.0"),
                "dp.noise_multiplier",
            ),
        ] {
            let err = format!(
                "{:#}",
                parse(with_dp(&text), Path::new("e.toml")).unwrap_err()
            );
            assert!(err.contains(field), "{field}: {err}");
        }
    }

    #[test]
    fn the_audit_is_validated() {
        // The first `enabled = false` is the audit's (the second is [dp]'s).
        let audited = EXAMPLE_EXPERIMENT.replacen("enabled = false", "enabled = true", 1);
        let e = parse(toml::from_str(&audited).unwrap(), Path::new("e.toml")).unwrap();
        assert!(e.audit.enabled);
        for (from, to, field) in [
            ("curious = 0", "curious = 10", "audit.curious"),
            (
                "algorithm = \"fd\"",
                "algorithm = \"isolated\"",
                "audit.enabled",
            ),
            (
                "network = \"memory\"",
                "network = \"libp2p\"",
                "audit.enabled",
            ),
            (
                "estimator = \"mean-probabilities\"",
                "estimator = \"mode\"",
                "estimator",
            ),
        ] {
            let text = audited.replace(from, to);
            assert_ne!(text, audited, "{from}");
            let err = parse(toml::from_str(&text).unwrap(), Path::new("e.toml")).unwrap_err();
            let err = format!("{err:#}");
            assert!(err.contains(field), "{field}: {err}");
        }
    }

    #[test]
    fn fedavg_needs_one_student() {
        let text = EXAMPLE_EXPERIMENT.replace("algorithm = \"fd\"", "algorithm = \"fedavg\"")
            + "\n[[groups]]\nnodes = 2\nmodel = { kind = \"mlp\", hidden = [10] }\n";
        let err = parse(toml::from_str(&text).unwrap(), Path::new("e.toml")).unwrap_err();
        assert!(format!("{err:#}").contains("same student"), "{err:#}");
    }

    #[test]
    fn sweep_expands_to_the_cartesian_product_in_order() {
        let text = EXAMPLE_EXPERIMENT.to_string()
            + "\n[sweep]\n\"partition.alpha\" = [0.1, 0.5]\nalgorithm = [\"fd\", \"isolated\", \"fedavg\"]\n";
        let cells = expand_sweep(toml::from_str(&text).unwrap()).unwrap();
        let names: Vec<&str> = cells.iter().map(|c| c.name.as_str()).collect();
        assert_eq!(
            names,
            [
                "algorithm=fd,alpha=0.1",
                "algorithm=fd,alpha=0.5",
                "algorithm=isolated,alpha=0.1",
                "algorithm=isolated,alpha=0.5",
                "algorithm=fedavg,alpha=0.1",
                "algorithm=fedavg,alpha=0.5"
            ]
        );
        let e = parse(cells[3].table.clone(), Path::new("e.toml")).unwrap();
        assert_eq!(e.partition, Partitioner::Dirichlet { alpha: 0.5 });
        assert_eq!(e.algorithm, Algorithm::Isolated);
        let text = EXAMPLE_EXPERIMENT.to_string()
            + "\n[sweep]\npartition = [{ label = \"iid\", kind = \"iid\" }]\nvariant = [{ label = \"fd-era\", aggregator = { era = { temperature = 0.1 } }, \"training.distill_epochs\" = 3 }]\n";
        let cells = expand_sweep(toml::from_str(&text).unwrap()).unwrap();
        assert_eq!(cells[0].name, "partition=iid,variant=fd-era");
        let e = parse(cells[0].table.clone(), Path::new("e.toml")).unwrap();
        assert_eq!(e.partition, Partitioner::Iid);
        assert_eq!(e.aggregator, Aggregator::Era { temperature: 0.1 });
        assert_eq!(e.training.distill_epochs, 3);
        let bad = EXAMPLE_EXPERIMENT.to_string() + "\n[sweep]\nseed = 3\n";
        assert!(expand_sweep(toml::from_str(&bad).unwrap()).is_err());
    }
}

//! A node's configuration file (TOML).
//!
//! [`EXAMPLE_CONFIG`] documents every field; it is what `fd-node --help`
//! prints and a test parses it, so the documentation cannot drift from the
//! parser. Relative paths are resolved against the config file's folder, so
//! a federation's configs can be moved around as a unit.

use std::path::{Path, PathBuf};

use fd_protocol::{FederationManifest, PayloadEncodingName, PublicSetDescriptor};
use serde::{Deserialize, Serialize};

use crate::aggregate::Aggregator;
use crate::data::partition::Partitioner;
use crate::data::public::{public_set_digest, split_public};
use crate::data::{DataSource, DataSplits};
use crate::device::DeviceKind;
use crate::learner::TrainingConfig;
use crate::model::ModelConfig;

/// An annotated node config: every field, its meaning and its default.
pub const EXAMPLE_CONFIG: &str = r#"# fd-node configuration file (TOML): every field, its meaning, its default.
# Relative paths are relative to this file.

name = "node-0"                       # shown in logs and tables
listen = "/ip4/127.0.0.1/tcp/0"       # libp2p listen address (tcp/0 = any free port)
key_file = "node-0.key"               # Ed25519 identity; created (mode 0600) if missing
# Coordinator's full address, printed by fd-coordinator. Omit to run isolated (no collaboration).
coordinator = "/ip4/127.0.0.1/tcp/7000/p2p/12D3KooWPjceQrSwdWXPyLLeABRXmuqt69Rg3sBYbU1Nft9HyQ6X"
device = "flex"                       # compute device: flex (CPU, default) | ndarray (CPU, deprecated)
                                      # | wgpu (best GPU adapter) | wgpu-cpu (software Vulkan, e.g. lavapipe)
aggregator = "mean-probabilities"     # teacher from own + peers' logits: mean-probabilities | mean (of logits)
                                      # | weighted (by sample count) | median | { era = { temperature = 0.1 } }
                                      # | { trimmed-mean = { beta = 0.2 } }
encoding = "f32"                      # payload of shared logits: f32 | f16 | int8 | top-k:K
metrics_file = "node-0-metrics.jsonl" # optional: one JSON line per round

[federation]                          # must equal the coordinator's, or joining fails
id = "demo"                           # federation name
rounds = 3                            # number of rounds
public_size = 5000                    # public samples, drawn from the training split
subset_size = 2000                    # public samples predicted and shared per round
seed = 42                             # seed of the public split, subsets and partition

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

[training]                            # round recipe
local_epochs = 1                      # epochs on private data per round
distill_epochs = 10                   # epochs on the public subset towards the teacher
batch_size = 64
learning_rate = 0.001
optimizer = "adam"                    # adam | sgd (momentum 0.9)
temperature = 3.0                     # distillation temperature T in round 1 (loss scaled by T^2)
final_temperature = 1.0               # T in the last round, for non-constant schedules
temperature_schedule = "constant"     # constant | linear | cosine (from temperature to final_temperature)
distill_alpha = 1.0                   # loss = a*T^2*KL(teacher||student) + (1-a)*CE(private labels)
weight_decay = 0.0                    # L2 penalty
momentum = 0.9                        # SGD momentum (ignored by adam)
seed = 0                              # weight init and shuffling
eval_samples = 0                      # test samples to evaluate on (0 = all)
threads = 1                           # CPU threads; 1 = bit-identical reruns, more = faster
"#;

/// Errors reading or checking a config file; each names the file and field.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("config {path} is not valid: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("config {path}: field `{field}` {reason}")]
    Invalid {
        path: PathBuf,
        field: &'static str,
        reason: String,
    },
}

/// The `[federation]` table, shared by nodes and the coordinator.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FederationConfig {
    pub id: String,
    pub rounds: u64,
    #[serde(default = "default_public_size")]
    pub public_size: usize,
    #[serde(default = "default_subset_size")]
    pub subset_size: usize,
    #[serde(default)]
    pub seed: u64,
}

fn default_public_size() -> usize {
    5000
}

fn default_subset_size() -> usize {
    2000
}

impl FederationConfig {
    fn validate(&self) -> Result<(), (&'static str, String)> {
        if self.id.is_empty() {
            return Err(("federation.id", "must not be empty".into()));
        }
        if self.rounds == 0 {
            return Err(("federation.rounds", "must be at least 1".into()));
        }
        if self.subset_size == 0 || self.subset_size > self.public_size {
            return Err((
                "federation.subset_size",
                format!(
                    "must be between 1 and public_size ({}), got {}",
                    self.public_size, self.subset_size
                ),
            ));
        }
        Ok(())
    }

    /// The manifest this federation implies for the given data: the digest
    /// is computed over the public samples actually used.
    pub fn manifest(
        &self,
        splits: &DataSplits,
    ) -> Result<FederationManifest, crate::data::DataError> {
        let split = split_public(splits.train.len(), self.public_size, self.seed)?;
        Ok(FederationManifest {
            federation_id: self.id.clone(),
            public_set: PublicSetDescriptor {
                source: format!("{}: {} training samples", splits.source, split.public.len()),
                samples: split.public.len() as u64,
                digest: public_set_digest(&splits.train, &split.public),
            },
            classes: splits.train.classes as u32,
            rounds: self.rounds,
            subset_size: self.subset_size as u32,
            seed: self.seed,
        })
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
    #[serde(default = "default_listen")]
    pub listen: String,
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
    pub federation: FederationConfig,
    #[serde(default)]
    pub data: DataSource,
    pub partition: PartitionConfig,
    #[serde(default)]
    pub model: ModelConfig,
    #[serde(default)]
    pub training: TrainingConfig,
}

fn default_listen() -> String {
    "/ip4/127.0.0.1/tcp/0".into()
}

/// Resolves `path` against `base` unless it is absolute.
pub fn resolve(base: &Path, path: &Path) -> PathBuf {
    if path.is_absolute() {
        path.to_owned()
    } else {
        base.join(path)
    }
}

impl NodeConfig {
    /// Parses TOML text; `path` is used for messages and relative paths.
    pub fn parse(text: &str, path: &Path) -> Result<Self, ConfigError> {
        let mut config: NodeConfig = toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: path.to_owned(),
            message: e.to_string(),
        })?;
        let base = path.parent().unwrap_or(Path::new("."));
        config.key_file = resolve(base, &config.key_file);
        config.metrics_file = config.metrics_file.map(|p| resolve(base, &p));
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
        if self.listen.parse::<libp2p::Multiaddr>().is_err() {
            return Err(invalid(
                "listen",
                format!("is not a multiaddress: {}", self.listen),
            ));
        }
        if let Some(c) = &self.coordinator {
            if c.parse::<libp2p::Multiaddr>().is_err() {
                return Err(invalid(
                    "coordinator",
                    format!("is not a multiaddress: {c}"),
                ));
            }
        }
        self.model
            .validate_fields()
            .map_err(|r| invalid("model", r))?;
        self.training
            .validate()
            .map_err(|r| invalid("training", r))?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn example_config_parses_with_documented_values() {
        let c = NodeConfig::parse(EXAMPLE_CONFIG, Path::new("/etc/fd/node.toml")).unwrap();
        assert_eq!(c.key_file, PathBuf::from("/etc/fd/node-0.key"));
        assert_eq!(c.partition.scheme, Partitioner::Dirichlet { alpha: 0.1 });
        assert_eq!(c.training, TrainingConfig::default());
        assert_eq!(c.federation.rounds, 3);
        assert!(c.coordinator.is_some());
    }

    #[test]
    fn bad_fields_are_named() {
        let text = EXAMPLE_CONFIG.replace("index = 0", "index = 5");
        let err = NodeConfig::parse(&text, Path::new("n.toml"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("partition.index"), "{err}");
        let text = EXAMPLE_CONFIG.replace("batch_size = 64", "batch_sise = 64");
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

//! `fd-sim quickstart`: one coordinator and N members on 127.0.0.1, in one
//! process, over the real libp2p stack; prints a per-round table and writes
//! the per-round, per-member numbers to a CSV.
//!
//! Members are the same [`fd_node::runtime::run_federated`] used by the
//! `fd-node` binary, and the coordinator the same [`fd_coordinator::run`];
//! only the process boundary is missing.

use std::path::PathBuf;

use anyhow::{Context as _, bail};
use fd_coordinator::{CoordinatorConfig, CoordinatorEvent, metrics_csv};
use fd_node::aggregate::Aggregator;
use fd_node::config::{FederationConfig, NodeConfig, PartitionConfig};
use fd_data::DataSource;
use fd_data::partition::Partitioner;
use fd_node::device::DeviceKind;
use fd_data::fsutil::write_atomic;
use fd_node::learner::TrainingConfig;
use fd_node::model::ModelConfig;
use fd_node::runtime;
use fd_protocol::RoundMetrics;

use crate::runner::member_key;
use indicatif::{ProgressBar, ProgressStyle};
use tokio::sync::mpsc;

/// Options of the quickstart.
#[derive(Debug, Clone, clap::Args)]
pub struct QuickstartOptions {
    /// Number of members.
    #[arg(long, default_value_t = 5)]
    pub nodes: usize,
    /// Number of rounds.
    #[arg(long, default_value_t = 5)]
    pub rounds: u64,
    /// Dirichlet concentration of the label skew (smaller = more non-IID).
    #[arg(long, default_value_t = 0.1)]
    pub alpha: f64,
    /// Public samples predicted and shared per round.
    #[arg(long, default_value_t = 2000)]
    pub subset_size: usize,
    /// Public set size (drawn from the training split).
    #[arg(long, default_value_t = 5000)]
    pub public_size: usize,
    /// Seed of everything random.
    #[arg(long, default_value_t = 42)]
    pub seed: u64,
    /// Use the synthetic dataset even if Fashion-MNIST is installed.
    #[arg(long)]
    pub synthetic: bool,
    /// Distillation temperature.
    #[arg(long, default_value_t = TrainingConfig::default().temperature)]
    pub temperature: f64,
    /// Distillation epochs per round on the public subset.
    #[arg(long, default_value_t = TrainingConfig::default().distill_epochs)]
    pub distill_epochs: usize,
    /// Weight of the distillation term (1 − it weighs CE on private labels).
    #[arg(long, default_value_t = TrainingConfig::default().distill_alpha)]
    pub distill_alpha: f64,
    /// Results folder.
    #[arg(long, default_value = "results/quickstart")]
    pub out: PathBuf,
    /// Skip the isolated (no-collaboration) baseline.
    #[arg(long)]
    pub no_baseline: bool,
}

fn node_config(
    o: &QuickstartOptions,
    data: &DataSource,
    federation: &FederationConfig,
    index: usize,
    coordinator: Option<String>,
) -> NodeConfig {
    NodeConfig {
        name: format!("node-{index}"),
        listen: "/ip4/127.0.0.1/tcp/0".into(),
        key_file: o.out.join(format!("node-{index}.key")),
        coordinator,
        device: DeviceKind::Flex,
        aggregator: Aggregator::default(),
        encoding: Default::default(),
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
        federation: federation.clone(),
        data: data.clone(),
        partition: PartitionConfig {
            nodes: o.nodes,
            index,
            scheme: Partitioner::Dirichlet { alpha: o.alpha },
        },
        model: ModelConfig::default(),
        training: TrainingConfig {
            seed: o.seed + index as u64,
            temperature: o.temperature,
            distill_epochs: o.distill_epochs,
            distill_alpha: o.distill_alpha,
            ..TrainingConfig::default()
        },
        knowledge: Default::default(),
        dp: Default::default(),
        // The quickstart reproduces the README's published numbers: every
        // member trains on all its private data.
        rollback: fd_node::rollback::RollbackConfig::off(),
        secure_aggregation: Default::default(),
    }
}

/// Per-round summary line of the table.
fn table_row(round: u64, metrics: &[RoundMetrics]) -> String {
    let acc: Vec<f64> = metrics.iter().map(|m| m.test_accuracy).collect();
    let n = acc.len().max(1) as f64;
    let mean = acc.iter().sum::<f64>() / n;
    let min = acc.iter().cloned().fold(f64::INFINITY, f64::min);
    let max = acc.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
    let bytes: Vec<u64> = metrics.iter().map(|m| m.bytes_sent).collect();
    let (bmin, bmax) = (
        bytes.iter().min().copied().unwrap_or(0),
        bytes.iter().max().copied().unwrap_or(0),
    );
    let bytes = if bmin == bmax {
        format!("{bmin}")
    } else {
        format!("{bmin}–{bmax}")
    };
    format!("{round:>5} | {mean:>8.4} | {min:>8.4} | {max:>8.4} | {bytes:>16}")
}

pub const TABLE_HEADER: &str = "round | mean acc |  min acc |  max acc | bytes sent/node\n------+----------+----------+----------+-----------------";

/// Runs the quickstart; returns the metrics of every round.
pub async fn run(o: QuickstartOptions) -> anyhow::Result<Vec<RoundMetrics>> {
    if o.nodes < 2 {
        bail!("--nodes must be at least 2 for a federation");
    }
    std::fs::create_dir_all(&o.out)
        .with_context(|| format!("cannot create {}", o.out.display()))?;
    let data = if o.synthetic {
        DataSource::Synthetic {
            seed: o.seed,
            train: 12000,
            test: 2000,
        }
    } else {
        DataSource::Auto.resolve()
    };
    match &data {
        DataSource::FashionMnist { dir } => println!("data: Fashion-MNIST from {}", dir.display()),
        other => println!(
            "data: built-in synthetic set ({other:?}); install the Debian package dataset-fashion-mnist for real data"
        ),
    }
    let federation = FederationConfig {
        id: "quickstart".into(),
        rounds: o.rounds,
        public_size: o.public_size,
        subset_size: o.subset_size,
        seed: o.seed,
        members: Vec::new(),
        quorum: 0.0,
        schedule: None,
    };
    println!(
        "federation: {} members, {} rounds, Dirichlet alpha {}, public set {}, {} shared per round, MLP students",
        o.nodes, o.rounds, o.alpha, o.public_size, o.subset_size
    );

    let (events_tx, mut events) = mpsc::unbounded_channel();
    let coordinator_config = CoordinatorConfig {
        listen: "/ip4/127.0.0.1/tcp/0".into(),
        key_file: o.out.join("coordinator.key"),
        min_members: o.nodes,
        round_timeout_secs: 600,
        metrics_file: None,
        address_file: None,
        state_file: None,
        psk_file: None,
        metrics_listen: None,
        relay: Default::default(),
        federation: federation.clone(),
        data: data.clone(),
    };
    let coordinator = tokio::spawn(fd_coordinator::run(
        coordinator_config,
        member_key(o.seed, usize::MAX),
        Some(events_tx),
    ));
    let address = loop {
        match events.recv().await {
            Some(CoordinatorEvent::Listening(a)) => break a,
            Some(_) => {}
            None => {
                return Err(coordinator
                    .await?
                    .err()
                    .unwrap_or_else(|| anyhow::anyhow!("coordinator stopped")));
            }
        }
    };

    let mut members = Vec::new();
    for i in 0..o.nodes {
        let config = node_config(&o, &data, &federation, i, Some(address.to_string()));
        members.push(tokio::spawn(runtime::run_federated(
            config,
            member_key(o.seed, i),
            None,
        )));
    }

    let bar = ProgressBar::new(o.rounds);
    bar.set_style(ProgressStyle::with_template(
        "{bar:30} {pos}/{len} rounds  {elapsed}  {msg}",
    )?);
    bar.set_message("members joining");
    // indicatif hides the bar (and its println) when stderr is not a terminal.
    let print = |line: &str| {
        if bar.is_hidden() {
            println!("{line}")
        } else {
            bar.println(line)
        }
    };
    print(TABLE_HEADER);
    let mut all = Vec::new();
    while let Some(event) = events.recv().await {
        match event {
            CoordinatorEvent::Joined(m) => bar.set_message(format!("{} joined", m.name)),
            CoordinatorEvent::RoundStarted(r) => {
                bar.set_message(format!("round {r}: train, share, distil"))
            }
            CoordinatorEvent::RoundClosed { round, mut metrics } => {
                metrics.sort_by(|a, b| a.name.cmp(&b.name));
                print(&table_row(round, &metrics));
                bar.inc(1);
                all.extend(metrics);
            }
            CoordinatorEvent::Listening(_) => {}
        }
    }
    bar.finish_and_clear();
    coordinator.await??;
    for m in members {
        m.await??;
    }

    let csv_path = o.out.join("metrics.csv");
    write_atomic(&csv_path, &metrics_csv(&all)?, 0o644)?;

    if !o.no_baseline {
        let mut finals = Vec::new();
        for i in 0..o.nodes {
            let config = node_config(&o, &data, &federation, i, None);
            let key = member_key(o.seed, i);
            let metrics = runtime::run_isolated(&config, &key).await?;
            finals.push(metrics.last().map_or(0.0, |m| m.test_accuracy));
        }
        let mean = finals.iter().sum::<f64>() / finals.len() as f64;
        let fd_final: Vec<f64> = all
            .iter()
            .filter(|m| m.round == o.rounds)
            .map(|m| m.test_accuracy)
            .collect();
        let fd_mean = fd_final.iter().sum::<f64>() / fd_final.len().max(1) as f64;
        println!(
            "\nfinal mean test accuracy: federated distillation {fd_mean:.4}, isolated (same local training, no collaboration) {mean:.4}"
        );
    }
    println!("per-round, per-member metrics: {}", csv_path.display());
    Ok(all)
}
